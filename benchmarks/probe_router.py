"""What the attention router and its top-k cost a layer: F.linear + torch.topk against polar::route_groups
(as the op picks its path, and each of its two kernel paths forced).

    python benchmarks/probe_router.py

Each variant runs for 32 layers (distinct weights and inputs, as in a decode step) inside one CUDA graph; the
table gives us per layer (median of the replays) and checks the kernel against the fp32 reference's choice.
Shapes: the attention routers of Llama-3-8B (8 groups, k 4), Llama-2-7B and OPT-6.7B (32 heads, k 16) and
OPT-66B (72 heads, k 22) at decode batch sizes.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from polar_compile import bench
from polar_compile.ops import route_groups as rg

SHAPES = [  # (name, batch, d, groups, k)
    ("llama3-8b", 16, 4096, 8, 4),
    ("llama3-8b", 64, 4096, 8, 4),
    ("llama3-8b", 128, 4096, 8, 4),
    ("llama2-7b", 32, 4096, 32, 16),
    ("opt-6.7b", 64, 4096, 32, 16),
    ("opt-66b", 64, 9216, 72, 22),
]
LAYERS = 32


def variants():
    return {
        "linear+topk": lambda x, w, b, k: torch.topk(F.linear(x, w, b), k, dim=-1).indices,
        "linear+topk(unsorted)": lambda x, w, b, k: torch.topk(F.linear(x, w, b), k, dim=-1, sorted=False).indices,
        "route_groups": lambda x, w, b, k: rg.route_groups(x, w, b, k),
        "rows kernel": lambda x, w, b, k: rg.launch_route_groups(x, w, b, k, row_kernel=True),
        "partial kernels": lambda x, w, b, k: rg.launch_route_groups(x, w, b, k, row_kernel=False),
    }


def time_graph(fn, layers, replays: int = 20) -> float:
    """us per layer of ``fn`` over all layers, captured in one CUDA graph (median of ``replays``)."""
    for args in layers:  # compile / warm up outside the capture
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in layers:
            fn(*args)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(layers))
    return statistics.median(times)


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    bench.require_cuda(__file__)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    torch.manual_seed(0)
    names = list(variants())
    print(f"{'shape':<28}" + "".join(f"{n:>22}" for n in names) + "   rows differing from the reference")
    for name, batch, width, groups, k in SHAPES:
        layers = [
            (
                torch.randn(batch, 1, width, device="cuda", dtype=torch.bfloat16),
                torch.randn(groups, width, device="cuda", dtype=torch.bfloat16) * width**-0.5,
                torch.randn(groups, device="cuda", dtype=torch.bfloat16) * 0.1,
                k,
            )
            for _ in range(LAYERS)
        ]
        row = [time_graph(fn, layers) for fn in variants().values()]
        # rows where the kernel's choice differs from the fp32 reference's (summation order can flip a near-tie)
        differing = sum(
            int((rg.route_groups(*args) != rg.route_groups_reference(*args).to(args[0].device)).any(1).sum())
            for args in layers
        )
        label = f"{name} B={batch} G={groups} k={k}"
        times = "".join(f"{t:>19.1f} us" for t in row)
        print(f"{label:<28}{times}   {differing} of {batch * LAYERS}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
