"""Probe (session 36): can the one-program union select decide several bits per block-wide count? (GPU only)

    python benchmarks/probe_topk_bits.py

The library's `_union_select_kernel` finds the k-th largest of the F summed scores bit by bit: ~21 serial rounds
(early exit) of one block-wide count each, ~1.1 us a round on the H100, all on one SM. The variants here decide
BITS bits a round, so 31 / BITS rounds: each key's rank among the round's 2^BITS - 1 candidate thresholds is
j = clamp((key - threshold) >> shift, 0, 2^BITS - 1), and the counts at every candidate come from
- pack BITS (METHOD 1): j as a thermometer code in 16-bit fields of int64 words, summed in ONE multi-operand
  reduction (one set of barriers for all candidates);
- hist BITS (METHOD 2): tl.histogram of j over 2^BITS bins, then a reversed cumsum.
Same set and tie rule as the library kernel (the search's end goes through its `_union_take`); every variant's
index set is checked equal to the library's before timing. Each variant is captured 32 times in one CUDA graph (M=64
bf16 scores, ReLU-sum included), as benchmarks/probe_topk.py does.

H100, results/probe_topk_bits_h100_s36.log, us per layer at F = 11,008 / 14,336 / 16,384: the library 28-31;
pack 2-4 47-68; hist 2 52-61; hist 4-6 32-42 (best hist 5 at 16 warps, 32.2-34.7). Fewer rounds, each far dearer (the
int64 packing, or tl.histogram's per-element ballots, on one SM's ALUs): no variant beats the bitwise search, which
stays. A faster select needs more than one SM (session 28's radix select: five launches, 33-39 us).
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from polar_compile import bench
from polar_compile.ops import selective_gemm as sg
from polar_compile.ops.selective_gemm import _union_key, _union_take

VARIANTS = {f"pack{b}": (b, 1) for b in (2, 3, 4)} | {f"hist{b}": (b, 2) for b in (2, 4, 5, 6)}  # name: (BITS, METHOD)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _fields(j, q: tl.constexpr):
    """Word q of j's thermometer code: fields 4q+1 .. 4q+4 (16 bits each) set where j reaches them."""
    n = tl.minimum(tl.maximum(j - 4 * q, 0), 4).to(tl.int64)
    return (
        (n > 0).to(tl.int64)
        + ((n > 1).to(tl.int64) << 16)
        + ((n > 2).to(tl.int64) << 32)
        + ((n > 3).to(tl.int64) << 48)
    )


@triton.jit
def _field(i, w0, w1, w2, w3):
    """Field i (1-based) of the four summed words, as a vector over i."""
    q = (i - 1) // 4
    word = tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))
    return ((word >> (((i - 1) % 4) * 16).to(tl.int64)) & 0xFFFF).to(tl.int32)


@triton.jit
def _select_bits_kernel(summed_ptr, out_ptr, F, k, BLOCK: tl.constexpr, BITS: tl.constexpr, METHOD: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < F
    key = tl.where(valid, _union_key(tl.load(summed_ptr + offs, mask=valid, other=0.0)), -1)
    threshold = tl.program_id(0) * 0
    count = threshold + F  # invariant, as in the library kernel: count keys >= threshold, count >= k
    pos = threshold + 30
    bins = tl.arange(0, 1 << BITS)
    while (pos >= 0) & (count != k):
        shift = tl.maximum(pos - BITS + 1, 0)
        top = (1 << (pos - shift + 1)) - 1  # candidates threshold + i << shift, i = 1 .. top (fewer in a last round)
        j = tl.minimum(tl.maximum((key - threshold) >> shift, 0), top)
        if METHOD == 1:
            if BITS <= 2:
                w0 = tl.sum(_fields(j, 0), axis=0)
                w1 = w0 * 0
                w2 = w1
                w3 = w1
            elif BITS == 3:
                w0, w1 = tl.reduce((_fields(j, 0), _fields(j, 1)), 0, _add2)
                w2 = w0 * 0
                w3 = w2
            else:
                w0, w1, w2, w3 = tl.reduce((_fields(j, 0), _fields(j, 1), _fields(j, 2), _fields(j, 3)), 0, _add4)
            at_least = tl.where(bins == 0, count, _field(bins, w0, w1, w2, w3))
        else:
            hist = tl.histogram(j, 1 << BITS)
            at_least = tl.where(bins == 0, count, BLOCK - tl.cumsum(hist, 0) + hist)
        at_least = tl.where(bins <= top, at_least, 0)
        best = tl.max(tl.where(at_least >= k, bins, 0), axis=0)
        threshold = threshold + (best << shift)
        count = tl.max(tl.where(bins == best, at_least, 0), axis=0)
        pos = shift - 1
    _union_take(key, offs, threshold, count, k, out_ptr)


def select(summed: torch.Tensor, k: int, bits: int, method: int, num_warps: int = 8) -> torch.Tensor:
    out = torch.empty(k, device=summed.device, dtype=torch.int64)
    if k:
        block = max(triton.next_power_of_2(summed.shape[0]), 16)
        _select_bits_kernel[(1,)](summed, out, summed.shape[0], k, BLOCK=block, BITS=bits, METHOD=method,
                                  num_warps=num_warps)  # fmt: skip
    return out


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    bench.require_cuda(__file__)
    from probe_topk import _summed, time_graph

    print(torch.cuda.get_device_name(), "M=64, 32 layers per graph, us per layer (ReLU-sum included)")
    names = [(name, warps) for name in VARIANTS for warps in (8, 16)]
    print(f"{'F':>6} {'share':>5} {'lib':>6} {'sum':>5} " + " ".join(f"{f'{n}-w{w}':>9}" for n, w in names))
    for num in (11008, 14336, 16384):
        scores = torch.randn(32, 64, num, device="cuda", dtype=torch.bfloat16)
        for share in (0.1, 0.3, 0.5):
            k = round(share * num)
            expected = sg.launch_union_select(_summed(scores[0]), k)
            for name, warps in names:
                got = select(_summed(scores[0]), k, *VARIANTS[name], num_warps=warps)
                assert torch.equal(got, expected), f"{name} w{warps} differs from the library at F={num}, k={k}"
            lib = time_graph(lambda s, k: sg.launch_union_select(_summed(s), k), scores, k, 32)
            only = time_graph(lambda s, k: _summed(s), scores, k, 32)
            times = [
                time_graph(lambda s, k, n=n, w=w: select(_summed(s), k, *VARIANTS[n], num_warps=w), scores, k, 32)
                for n, w in names
            ]
            print(f"{num:>6} {share:>5} {lib:>6.1f} {only:>5.1f} " + " ".join(f"{t:>9.1f}" for t in times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
