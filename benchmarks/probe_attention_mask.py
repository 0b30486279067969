"""What do the split kernel's per-block mask loads cost? One GPU call; prints a table, adopts nothing.

    python benchmarks/probe_attention_mask.py [--shapes llama3-8b:16:1024:8 ... | d64] [--blocks table 64/4/3]

Compiled for sm_90 (benchmarks/inspect_kernels.py), every key block's K/V async copies are predicated on that
block's mask bytes, loaded synchronously just before them: one more dependent memory latency per block, on the
critical path of every program (at 128/4/2, one K/V buffer, nothing else overlaps it). For each shape (model:B:L:k,
all at the table's split count) and block config ("table": the table's entry for the grid) this times three calls:
the mask with a (first, last) span (every block loads its mask bytes), the mask with ``key_span(mask)``'s three
columns (no_holes: a hole-free row skips the loads, as the decode pass calls it), and the span alone (no mask: the
kernel compiled without mask loads, the floor of the second), against cuDNN SDPA (enable_gqa) over all groups of the
valid keys. The shapes default to issue 3's misses in session 27: the density-1.0 rows under 0.95x cuDNN and the
2.7 / 2.4 TB/s misses. Session 32's runs: results/probe_attention_mask*_h100_s32.log (notes/selective_attention.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_attention as bsa

from polar_compile import bench
from polar_compile.ops import selective_attention as sa

# head_dim-64 shapes, for the gqa-d64 / mha-d64 entries (still 128/4/2): SmolLM2-135M (the shipped model) and an MHA
# one (OPT-1.3B, Pythia-1.4B: 32 heads of 64). Compiled for sm_90 on the CPU, 64/4/3 takes 36 KB of shared memory
# against 128/4/2's 38 KB (6 and 5 programs per SM by shared memory; registers may allow fewer).
bsa.MODELS.setdefault("smollm2-135m", (9, 3, 64))
bsa.MODELS.setdefault("mha-d64", (32, 32, 64))
D64_SHAPES = [f"smollm2-135m:{b}:{n}:3" for b in (1, 16, 64, 128) for n in (1024, 4096)] + [
    f"mha-d64:{b}:{n}:32" for b in (1, 16, 64) for n in (1024, 4096)
]
SHAPES = ["llama3-8b:1:1024:8", "llama3-8b:1:4096:8", "llama3-8b:1:16384:8", "llama2-7b:1:1024:32",
          "llama2-7b:1:4096:32", "opt-66b:1:1024:72", "opt-66b:1:4096:72", "llama3-8b:16:1024:8",
          "llama2-7b:16:1024:32", "opt-66b:16:1024:72", "llama3-8b:64:1024:8", "llama3-8b:128:1024:8",
          "llama3-8b:16:4096:8", "llama3-8b:16:4096:5", "llama3-8b:16:4096:4", "llama3-8b:16:4096:2",
          "llama3-8b:64:4096:8"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="model:B:L:k ...; 'd64': the head_dim-64 set")
    parser.add_argument("--blocks", nargs="+", default=["table", "64/4/3"], help="'table' or block_n/warps/stages")
    parser.add_argument("--rep", type=float, default=20.0)
    args = parser.parse_args()
    bench.require_cuda(__file__)
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    print(
        "shape | pairs | splits | cuDNN | per block config: mask + (first, last) / mask + no_holes span / span only, "
        "gain of no_holes | best vs cuDNN"
    )
    shapes = [shape for name in args.shapes for shape in (D64_SHAPES if name == "d64" else [name])]
    for spec in shapes:
        model, batch, valid_len, k = bsa.grid_point(spec)
        num_heads, num_groups, head_dim = bsa.MODELS[model]
        inputs = bsa.make_inputs(model, batch, valid_len)
        span = sa.key_span(inputs.mask)
        group_index = bsa.random_groups(batch, num_groups, k)
        table = sa.config_for(
            num_heads // num_groups, head_dim, device, pairs=batch * k, cache_len=inputs.key_cache.shape[2]
        )
        splits = sa.num_splits_for(table, batch * k, inputs.key_cache.shape[2], device)
        cudnn = bsa.time_ms(bsa.cudnn_dense(inputs), warmup=5, rep=args.rep)
        cells, best = [], float("inf")
        for block in args.blocks:
            if block == "table":
                config = dataclasses.replace(table, num_splits=splits)
            else:
                block_n, warps, stages = (int(x) for x in block.split("/"))
                config = dataclasses.replace(
                    table, block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits
                )
            times, outputs = [], []
            # the mask with the two-column span (every block loads its mask bytes), with key_span's no_holes
            # column (the loads predicated off), and the span alone (no mask: the kernel compiled without them)
            for mask, row_span in ((inputs.mask, span[:, :2]), (inputs.mask, span), (None, span)):

                def call(mask=mask, config=config, inputs=inputs, group_index=group_index, span=row_span):
                    return sa.launch_selective_attention(
                        inputs.query, inputs.key_cache, inputs.value_cache, group_index, mask, inputs.scale, span,
                        config=config,
                    )  # fmt: skip

                times.append(bsa.time_ms(call, warmup=5, rep=args.rep))
                outputs.append(call().float())
            for out in outputs[1:]:  # no hole inside the span: the mask changes nothing
                diff = (out - outputs[0]).abs().max().item()
                if diff > 2e-2:  # two compiles of the kernel: rounding only
                    raise AssertionError(f"{spec} {block}: a call without mask loads differs by {diff}")
            best = min(best, *times[:2])  # what the decode pass can call
            cells.append(
                f"{block} {times[0] * 1e3:.1f} / {times[1] * 1e3:.1f} / {times[2] * 1e3:.1f} us "
                f"{times[0] / times[1]:.3f}x"
            )
        print(
            f"{spec} | {batch * k} | {splits} | {cudnn * 1e3:.1f} us | " + " | ".join(cells)
            + f" | {cudnn / best:.3f}x",
            flush=True,
        )  # fmt: skip
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
