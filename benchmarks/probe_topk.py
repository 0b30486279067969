"""Probe behind the batch_union_topk kernel (session 6): what the MLP router's top-k costs per layer (GPU only).

    python benchmarks/probe_topk.py [--layers 32] [--neurons 14336,16384]

Per (F, k share): the ReLU-sum of (M=64, F) bf16 scores plus the selection of k neurons, by
  topk           torch.topk (sorted; what batch_union_topk_reference runs)
  topk-unsorted  torch.topk(sorted=False)
  sort           torch.sort(descending).indices[:k]
  kernel-wW      the library's one-program select kernel with W warps (F <= UNION_SELECT_MAX_F)
  radix-cC       launch_union_radix_select (session 28, any F): the sum and a three-round histogram select over
                 many programs of C score columns each (default 1,024; session 28's run also timed a default of about
                 two programs per SM, column "radix"), then a compaction
  sum-only       the ReLU-sum alone (the part every variant shares)
Each variant is captured `--layers` times in one CUDA graph (as in a decode step) and timed by replaying it; the
table gives microseconds per layer. The kernel's index set is checked against torch.topk's on every shape.
Tried and dropped (H200, results/probe_topk_*_h200_s6.log): 2 and 3 bits per round of the bitwise search (more
block-wide counts, slower), and a radix select of 8 bits a round through tl.histogram over chunks of the scores
(72-83 us at F=16384, 175 us at F=36864; the bitwise search with 32 warps took 46 us and 222 us). Session 36's
variants deciding 2-6 bits per count (benchmarks/probe_topk_bits.py) were slower too.
"""

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_compile import bench
from polar_compile.ops import selective_gemm as sg


def _summed(scores):
    return scores.clamp_min(0).sum(0, dtype=torch.float32)


def _kernel(s, k, **config):
    return sg.launch_union_select(_summed(s), k, **config)


def variants():
    return {
        "topk": lambda s, k: _summed(s).topk(k).indices,
        "topk-unsorted": lambda s, k: _summed(s).topk(k, sorted=False).indices,
        "sort": lambda s, k: _summed(s).sort(descending=True).indices[:k],
        **{f"kernel-w{warps}": functools.partial(_kernel, num_warps=warps) for warps in (8, 16, 32)},
        **{f"radix-c{c}": functools.partial(sg.launch_union_radix_select, chunk=c) for c in (64, 256, 1024)},
        "sum-only": lambda s, k: _summed(s),
    }


def time_graph(fn, scores, k, layers, replays=20):
    for _ in range(3):
        fn(scores[0], k)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            fn(scores[layer], k)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays / layers


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--neurons", default="14336,16384,18944,28672,36864", help="comma list of F")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    print(torch.cuda.get_device_name(), f"M={args.batch}, {args.layers} layers per graph, us per layer")
    names = list(variants())
    print(f"{'F':>6} {'share':>5} {'k':>6} " + " ".join(f"{n:>13}" for n in names))
    for num in map(int, args.neurons.split(",")):
        scores = torch.randn(args.layers, args.batch, num, device="cuda", dtype=torch.bfloat16)
        for share in (0.1, 0.3, 0.5):
            k = round(share * num)
            fits = num <= sg.UNION_SELECT_MAX_F
            expected = _summed(scores[0]).topk(k).indices.sort().values
            if fits:
                got = sg.launch_union_select(_summed(scores[0]), k)
                assert torch.equal(got, expected), f"kernel set differs from torch.topk at F={num}, k={k}"
            got = sg.launch_union_radix_select(scores[0], k)  # its own fp32 sum: a near-tie may order differently
            differ = (~torch.isin(got, expected)).sum().item()
            assert differ <= 2, f"radix set differs from torch.topk's in {differ} neurons at F={num}, k={k}"
            times = [
                time_graph(fn, scores, k, args.layers) if fits or not name.startswith("kernel") else math.nan
                for name, fn in variants().items()
            ]
            print(f"{num:>6} {share:>5} {k:>6} " + " ".join(f"{t:>13.1f}" for t in times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
