"""Probes behind notes/selective_gemm.md, session 5: what limits selective down at M = 64 (GPU only).

    python benchmarks/probe_down.py index      # no index vs an int32 index: is the gather's indirection the cost?
    python benchmarks/probe_down.py alignment  # y with a contiguous (4-byte aligned) vs a padded row stride
    python benchmarks/probe_down.py pipeline_y # session 28: the y tile through the software pipeline or not

index: a copy of the down kernel's main loop (split-K partials, no split pass) that reads rows of a compacted
    weight (MODE 0), or gathers them through an int32 index (MODE 1), or gathers with no weight mask (MODE 2).
pipeline_y: compiled for sm_90 (tests/ops/test_library.py), the down kernels load their y tile synchronously in every
    step: only the weight tiles are async copies. LaunchConfig.pipeline_y runs whole blocks unmasked along the slots
    (then one masked partial block), which lets Triton pipeline y too, at more shared memory per stage. Per shape
    and M: the table config as it is, the same with pipeline_y, and pipeline_y at each stage count (a stage fewer
    may keep two programs per SM); the up + down MLP is what issue 4 counts (OPT-66B M=64 at 0.1: >= 7x).
alignment: the library's down op at several shapes with y = torch.randn(M, k) (row stride k) and with y from
    `selective_gemm.empty_hidden` (row stride rounded up to 16), for the table config, a split config and a
    stream-K config.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_gemm as bsg

from polar_compile.ops import selective_gemm as sg


@triton.jit
def _down_variant(
    y_ptr, w_ptr, index_ptr, workspace_ptr, M, d, k, k_per_split, stride_ym, stride_wf,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(k_start, k_end, BLOCK_K):
        slot = j0 + offs_j
        mask_j = slot < k_end
        # MODE 0: rows j of a compacted weight; else the index's rows
        neuron = slot.to(tl.int64) if MODE == 0 else tl.load(index_ptr + slot, mask=mask_j, other=0).to(tl.int64)
        y = tl.load(y_ptr + offs_m[:, None] * stride_ym + slot[None, :], mask=mask_j[None, :], other=0.0)
        if MODE == 2:
            w = tl.load(w_ptr + neuron[:, None] * stride_wf + offs_o[None, :])
        else:
            w = tl.load(w_ptr + neuron[:, None] * stride_wf + offs_o[None, :], mask=mask_j[:, None], other=0.0)
        acc = tl.dot(y, w, acc)
    tl.store(workspace_ptr + (pid_s * M + offs_m[:, None]) * d + offs_o[None, :], acc)


def _variant(y, weight, index32, workspace, per_split, mode, block):
    """One launch of _down_variant (a closure over its own arguments, for time_calls)."""
    block_n, block_k, warps, stages = block
    M, k = y.shape
    d = weight.shape[1]
    grid = (1, d // block_n, workspace.shape[0])
    return lambda: _down_variant[grid](
        y, weight, index32, workspace, M, d, k, per_split, y.stride(0), weight.stride(0),
        MODE=mode, BLOCK_M=M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def probe_index() -> None:
    M, k, d, num_neurons = 64, 3686, 9216, 36864
    weights = bsg.Weights(bsg.MlpShape("opt-66b", d, num_neurons, gated=False, bias=True), bsg.copies_for(k * d * 2))
    copies = len(weights.down)
    index = torch.randperm(num_neurons, device="cuda")[:k]
    index32 = index.int()
    y = sg.empty_hidden(M, k, device=torch.device("cuda"), dtype=torch.bfloat16).normal_()
    compact = [weights.down[i][:, index].t().contiguous() for i in range(copies)]  # (k, d): rows j of the gather
    nbytes = k * d * 2
    for block in [(128, 128, 8, 3), (128, 64, 8, 4)]:
        for split in (3, 4):
            per_split = math.ceil(math.ceil(k / split) / block[1]) * block[1]
            workspace = torch.empty(math.ceil(k / per_split), M, d, device="cuda", dtype=torch.float32)
            for mode, name in ((0, "no index (compacted rows)"), (1, "int32 index"), (2, "int32 index, no w mask")):
                rows = [compact[i] if mode == 0 else weights.down[i].t() for i in range(copies)]  # (rows, d)
                calls = [_variant(y, rows[i], index32, workspace, per_split, mode, block) for i in range(copies)]
                ms = bsg.time_calls(calls)
                print(f"{block} split {split}: {name:26s} {ms * 1e3:6.1f} us {nbytes / ms / 1e9:4.2f} TB/s", flush=True)
            config = bsg._config((64, *block), split=split)
            ms = bsg.time_calls([bsg.down_call(weights, i, y, index, config) for i in range(copies)])
            print(f"    the library's down (int64 index one ahead, + split pass): {ms * 1e3:6.1f} us", flush=True)


def probe_alignment() -> None:
    for name, d, num_neurons, k in (
        ("opt-66b 0.1", 9216, 36864, 3686), ("opt-66b 0.3", 9216, 36864, 11059),
        ("opt-6.7b 0.1", 4096, 16384, 1638), ("llama-3-8b 0.3", 4096, 14336, 4301),
    ):  # fmt: skip
        weights = bsg.Weights(bsg.MlpShape(name, d, num_neurons, gated=False, bias=True), bsg.copies_for(k * d * 2))
        index = torch.randperm(num_neurons, device="cuda")[:k]
        for M in (16, 64, 128):
            block_m = min(M, 64)
            configs = {
                "table": None,
                "split 3": bsg._config((block_m, 128, 128, 8, 3), split=3),
                "stream-k": bsg._config((block_m, 128, 128, 4, 3), 2, stream_k=True),
            }
            contiguous = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            padded = sg.empty_hidden(M, k, device=torch.device("cuda"), dtype=torch.bfloat16).copy_(contiguous)
            cells = []
            for label, y in (("stride k", contiguous), ("padded", padded)):
                for config_name, config in configs.items():
                    calls = [bsg.down_call(weights, i, y, index, config) for i in range(len(weights.down))]
                    cells.append(f"{label}/{config_name} {bsg.time_calls(calls) * 1e3:6.1f}")
            print(f"{name} M={M} (us): " + " | ".join(cells), flush=True)
        del weights
        torch.cuda.empty_cache()


PIPELINE_Y_SHAPES = {
    "opt-66b 0.1": (9216, 36864, 3686), "opt-66b 0.3": (9216, 36864, 11059), "opt-6.7b 0.1": (4096, 16384, 1638),
    "opt-6.7b 0.5": (4096, 16384, 8192), "opt-6.7b 1.0": (4096, 16384, 16384), "llama-3-8b 0.1": (4096, 14336, 1434),
    "llama-3-8b 0.3": (4096, 14336, 4301),
}  # fmt: skip


def probe_pipeline_y(ms_list=(16, 64, 128), shapes=("opt-66b 0.1", "opt-66b 0.3", "opt-6.7b 0.1", "llama-3-8b 0.1",
                                                        "llama-3-8b 0.3")) -> None:  # fmt: skip
    """The table config as it is, the same with pipeline_y, and pipeline_y at 2-4 stages x 1-3 programs per SM (a
    y buffer per stage changes how many programs fit on an SM, and so which split count fills the GPU), split-K and
    stream-K; the best of each kind is printed last."""
    import dataclasses

    for name in shapes:
        d, num_neurons, k = PIPELINE_Y_SHAPES[name]
        weights = bsg.Weights(bsg.MlpShape(name, d, num_neurons, gated=False, bias=True), bsg.copies_for(k * d * 2))
        index = torch.randperm(num_neurons, device="cuda")[:k]
        nbytes = k * d * 2
        for M in ms_list:
            y = sg.empty_hidden(M, k, device=torch.device("cuda"), dtype=torch.bfloat16).normal_()  # as up returns it
            table = sg.config_for("down", M, d, k, num_neurons)
            if table.dense:
                continue
            configs = {"table": table, "table + pipeline_y": dataclasses.replace(table, pipeline_y=True)}
            for stages in (2, 3, 4):
                for pps in (1, 2, 3):
                    for stream_k in (False, True):
                        label = f"pipeline_y {stages} stages {pps}/SM{' stream-k' if stream_k else ''}"
                        configs[label] = dataclasses.replace(
                            table, pipeline_y=True, num_stages=stages, programs_per_sm=pps, stream_k=stream_k
                        )
            times = {}
            for label, config in configs.items():
                calls = [bsg.down_call(weights, i, y, index, config) for i in range(len(weights.down))]
                try:
                    times[label] = bsg.time_calls(calls)
                except Exception as error:  # out of shared memory
                    print(f"  {label}: {type(error).__name__}")
            best = min((label for label in times if label != "table"), key=times.get)
            print(f"{name} M={M} (table: {table})", flush=True)
            for label in ("table", "table + pipeline_y", best):
                ms = times[label]
                print(f"    {label:40s} {ms * 1e3:7.1f} us {nbytes / ms / 1e9:5.2f} TB/s", flush=True)
        del weights
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=("index", "alignment", "pipeline_y"))
    parser.add_argument("--m", nargs="+", type=int, default=[16, 64, 128], help="pipeline_y: batch sizes")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"pipeline_y: of {sorted(PIPELINE_Y_SHAPES)}")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    if args.probe == "pipeline_y":
        probe_pipeline_y(tuple(args.m), *([tuple(args.shapes)] if args.shapes else []))
    else:
        {"index": probe_index, "alignment": probe_alignment}[args.probe]()


if __name__ == "__main__":
    main()
