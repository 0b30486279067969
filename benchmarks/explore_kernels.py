"""Exploration sweeps for the open kernel targets (issues 3 and 4); each prints a table and appends CSV rows.

    python benchmarks/explore_kernels.py --out explore.csv            # GPU: both parts
    python benchmarks/explore_kernels.py --only attention --out a.csv

attention: on the shapes where selective attention misses issue 3's targets (all groups below 0.95x cuDNN;
    mid-size grids below 2.7 TB/s) and a few that meet them (controls), time the kernel with the split rule
    as tuned and with explicit split counts; for all groups also with the index sorted (what the compiled model
    passes at density 1). (Session 4 also timed walk-order options, rotated start blocks and interleaved
    sequences: no effect at equal occupancy, so they were removed from the kernel; results/explore_splits_h200.*.)
gemm: at OPT-66B M=64 density 0.1 (issue 4's 7x case) time selective down and up over block shapes and
    explicit split counts (down also as stream-K grids), and down's main kernel without its split pass.
Timing as in the two benchmark scripts (CUDA-graph replays, L2 flushed or defeated by weight copies).
"""

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_attention as bsa
import bench_selective_gemm as bsg

from polar_compile.ops import selective_attention as sa
from polar_compile.ops import selective_gemm as sg

ATTENTION_SHAPES = [  # (model, B, L, k): (sequence, group) pairs B*k from 160 to 4608
    ("llama3-8b", 64, 16384, 8),
    ("llama3-8b", 64, 16384, 5),
    ("llama3-8b", 64, 16384, 4),
    ("llama3-8b", 32, 16384, 8),
    ("llama3-8b", 128, 4096, 8),
    ("llama3-8b", 128, 4096, 5),
    ("llama3-8b", 128, 4096, 4),
    ("llama3-8b", 128, 1024, 8),
    ("llama3-8b", 64, 4096, 8),
    ("llama3-8b", 64, 4096, 5),
    ("llama3-8b", 64, 4096, 4),
    ("llama3-8b", 64, 1024, 5),
    ("llama3-8b", 32, 4096, 5),
    ("llama3-8b", 16, 4096, 8),
    ("llama3-8b", 16, 4096, 4),
    ("llama2-7b", 16, 4096, 20),
    ("llama2-7b", 16, 4096, 10),
    ("llama2-7b", 32, 4096, 32),
    ("llama2-7b", 32, 4096, 16),
    ("llama2-7b", 32, 4096, 10),
    ("llama2-7b", 64, 4096, 10),
    ("opt-66b", 64, 1920, 72),
    ("opt-66b", 64, 1920, 22),
    ("opt-66b", 64, 1024, 72),
    ("opt-66b", 16, 4096, 36),
    ("opt-66b", 16, 4096, 18),
]
ATTENTION_VARIANTS = [  # (name, LaunchConfig fields)
    ("rule", {}),
    ("splits=1", {"num_splits": 1}),
    ("splits=2", {"num_splits": 2}),
    ("splits=3", {"num_splits": 3}),
    ("splits=4", {"num_splits": 4}),
]

DOWN_BLOCKS = [  # (block_m, block_n, block_r, warps, stages)
    (32, 128, 64, 4, 4),  # the table's choice
    (64, 128, 128, 8, 3),
    (64, 128, 128, 8, 4),
    (64, 128, 128, 4, 3),
    (64, 128, 256, 8, 2),
    (64, 256, 128, 8, 2),
    (64, 64, 128, 4, 4),
    (64, 64, 256, 4, 3),
    (32, 128, 128, 4, 3),
    (64, 128, 64, 8, 5),
]
DOWN_SPLITS = (2, 3, 4)
UP_BLOCKS = [
    (64, 32, 128, 4, 5),  # the table's choice
    (64, 32, 64, 4, 8),
    (64, 32, 128, 4, 6),
    (64, 32, 256, 4, 3),
    (64, 32, 128, 8, 5),
    (64, 32, 256, 8, 4),
    (64, 16, 256, 4, 6),
]
UP_SPLITS = (1,)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def explore_attention(writer, warmup: float, rep: float) -> None:
    device = torch.device("cuda")
    for model, batch, valid_len, k in ATTENTION_SHAPES:
        num_heads, num_groups, head_dim = bsa.MODELS[model]
        ratio = num_heads // num_groups
        inputs = bsa.make_inputs(model, batch, valid_len)
        cudnn_ms = bsa.time_ms(bsa.cudnn_dense(inputs), warmup=warmup, rep=rep)
        nbytes = bsa.ours_bytes(inputs, k)
        base = sa.config_for(ratio, head_dim, device, pairs=batch * k, cache_len=inputs.key_cache.shape[2])
        rule = sa.num_splits_for(base, batch * k, inputs.key_cache.shape[2], device)
        indexes = {"random": bsa.random_groups(batch, num_groups, k)}
        if k == num_groups:
            indexes["sorted"] = torch.arange(num_groups, device=device).expand(batch, num_groups).contiguous()
        variants = ATTENTION_VARIANTS
        results = []
        for index_name, group_index in indexes.items():
            for name, options in variants:
                if index_name == "sorted" and "num_splits" in options:
                    continue
                config = dataclasses.replace(base, **options)

                def call(config=config, group_index=group_index, inputs=inputs):
                    return sa.launch_selective_attention(
                        inputs.query, inputs.key_cache, inputs.value_cache, group_index, inputs.mask,
                        inputs.scale, config=config,
                    )  # fmt: skip

                ms = bsa.time_ms(call, warmup=warmup, rep=rep)
                results.append((index_name, name, ms))
                writer.writerow(
                    dict(part="attention", shape=f"{model} B={batch} L={valid_len} k={k}", variant=name,
                         index=index_name, ms=round(ms, 5), tbps=round(nbytes / ms / 1e9, 4),
                         vs_dense=round(cudnn_ms / ms, 4), rule_splits=rule)
                )  # fmt: skip
        rule_ms = results[0][2]
        best = min(results, key=lambda r: r[2])
        cells = " ".join(f"{i[0]}:{n}={nbytes / ms / 1e9:.2f}" for i, n, ms in results)
        log(
            f"{model} B={batch} L={valid_len} k={k} (rule splits {rule}): cuDNN {cudnn_ms:.4f} ms; rule "
            f"{nbytes / rule_ms / 1e9:.2f} TB/s x{cudnn_ms / rule_ms:.3f}; best {best[0]}:{best[1]} "
            f"{nbytes / best[2] / 1e9:.2f} TB/s x{cudnn_ms / best[2]:.3f}\n    {cells}"
        )
        del inputs
        torch.cuda.empty_cache()


def explore_gemm(writer) -> None:
    shape = bsg.MlpShape("opt-66b", 9216, 36864, gated=False, bias=True)
    M, k = 64, 3686
    copies = bsg.copies_for(k * shape.d * 2)
    weights = bsg.Weights(shape, copies)
    index = torch.randperm(shape.num_neurons, device="cuda")[:k]
    x = torch.randn(M, shape.d, device="cuda", dtype=bsg.DTYPE)
    y = sg.empty_hidden(M, k, device=torch.device("cuda"), dtype=bsg.DTYPE).normal_()  # as the up ops return it
    nbytes = k * shape.d * 2
    hidden = torch.randn(M, shape.num_neurons, device="cuda", dtype=bsg.DTYPE)
    linear = torch.nn.functional.linear
    dense_up = bsg.time_calls([lambda i=i: linear(x, weights.up[i], weights.up_bias[i]) for i in range(2)])
    down_weight = weights.dense_down
    dense_down = bsg.time_calls([lambda i=i: linear(hidden, down_weight, weights.down_bias[i]) for i in range(2)])
    log(
        f"dense cuBLAS M={M}: up {dense_up * 1e3:.1f} us, down {dense_down * 1e3:.1f} us; 7x needs up + down <= "
        f"{(dense_up + dense_down) / 7 * 1e3:.1f} us"
    )
    for op, blocks, splits, arg, make in (
        ("down", DOWN_BLOCKS, DOWN_SPLITS, y, bsg.down_call),
        ("up", UP_BLOCKS, UP_SPLITS, x, bsg.up_call),
    ):
        table = sg.config_for(op, M, shape.d, k)
        ms = bsg.time_calls([make(weights, i, arg, index, table) for i in range(copies)])
        log(f"{op} table config {table}: {ms * 1e3:.1f} us {nbytes / ms / 1e9:.2f} TB/s")
        writer.writerow(dict(part="gemm", shape=f"{op} M={M} k={k}", variant="table", ms=round(ms, 6),
                             tbps=round(nbytes / ms / 1e9, 4)))  # fmt: skip
        results = []
        for block in blocks:
            variants = [(f"split={split}", bsg._config(block, split=split)) for split in splits]
            if op == "down":  # stream-K grids of 1-3 programs per SM
                variants += [(f"stream-k pps={pps}", bsg._config(block, pps, stream_k=True)) for pps in (1, 2, 3)]
            for label, config in variants:
                try:
                    ms = bsg.time_calls([make(weights, i, arg, index, config) for i in range(copies)], 3, 15)
                except Exception as error:  # out of shared memory
                    log(f"  skip {block} {label}: {type(error).__name__}")
                    continue
                results.append((ms, block, label))
                writer.writerow(dict(part="gemm", shape=f"{op} M={M} k={k}", variant=f"{block} {label}",
                                     ms=round(ms, 6), tbps=round(nbytes / ms / 1e9, 4)))  # fmt: skip
        results.sort()
        for ms, block, label in results[:8]:
            log(f"  {op} {block} {label}: {ms * 1e3:.1f} us {nbytes / ms / 1e9:.2f} TB/s")
    # down's main kernel alone (the split pass skipped): what the fp32 partials' second pass costs
    config = sg.config_for("down", M, shape.d, k)
    finish = sg._finish
    sg._finish = lambda *args, **kwargs: None
    try:
        ms = bsg.time_calls([bsg.down_call(weights, i, y, index, config) for i in range(copies)])
    finally:
        sg._finish = finish
    log(f"down main kernel only (table config, no split pass): {ms * 1e3:.1f} us {nbytes / ms / 1e9:.2f} TB/s")
    writer.writerow(dict(part="gemm", shape=f"down M={M} k={k}", variant="table, main kernel only",
                         ms=round(ms, 6), tbps=round(nbytes / ms / 1e9, 4)))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", choices=("attention", "gemm"), default=None)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rep", type=float, default=15.0)
    args = parser.parse_args()
    fields = ["part", "shape", "variant", "index", "ms", "tbps", "vs_dense", "rule_splits"]
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        if args.only in (None, "gemm"):
            explore_gemm(writer)
            handle.flush()
        if args.only in (None, "attention"):
            explore_attention(writer, args.warmup, args.rep)


if __name__ == "__main__":
    main()
