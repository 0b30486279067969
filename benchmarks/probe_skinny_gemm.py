"""Can a Triton kernel of our own read a decode step's weights faster than cuBLAS at M = 16-64?

    python benchmarks/probe_skinny_gemm.py                      # the GPU: every shape, a small config sweep
    TRITON_INTERPRET=1 python benchmarks/probe_skinny_gemm.py --check   # CPU: the kernels against F.linear

Why: the H200 profile of the B=16 dense step (notes/decode_step.md, session 21) has cuBLAS's narrow GEMMs (q/k/v,
o: 34-50 MB, split-K plus a reduce launch) at 2.6-3.2 TB/s against the 4.29 TB/s copy rate. Two kernels:
- ``rows``: one program per BLOCK_N output columns, the whole of K in a pipelined loop of tl.dot (no split, no
  reduce launch); small BLOCK_N gives N / BLOCK_N programs (256 for N = 4096 at 16), enough to fill the SMs.
- ``splitk``: BLOCK_N x a 1/SPLIT share of K, fp32 partials, then a reduce kernel (what cuBLAS does).
Each is timed in a CUDA graph that cycles over enough copies of the weight that every call reads it from HBM (as
the 32 layers of a step do), against F.linear timed the same way. Prints one line per (shape, M): cuBLAS, the best
config of each kernel, TB/s on the weight bytes.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < K
        x = tl.load(x_ptr + offs_m[:, None] * K + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + cols[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, part_ptr, M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    start = split * K_PER_SPLIT
    for k0 in range(start, start + K_PER_SPLIT, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < K
        x = tl.load(x_ptr + offs_m[:, None] * K + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + cols[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(part_ptr + (split * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask_n[None, :])


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, M, N, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs // N
    n = offs % N
    mask = offs < M * N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + (s * BLOCK_M + m) * N + n, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def rows_linear(x, w, block_n, block_k, stages, warps):
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    block_m = max(16, triton.next_power_of_2(m))
    _rows_kernel[(triton.cdiv(n, block_n),)](x, w, out, m, n, k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_stages=stages, num_warps=warps)  # fmt: skip
    return out


def splitk_linear(x, w, block_n, block_k, stages, warps, split):
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    part = torch.empty((split, block_m, n), device=x.device, dtype=torch.float32)
    _splitk_kernel[(triton.cdiv(n, block_n), split)](x, w, part, m, n, k, per_split, BLOCK_M=block_m,
                                                     BLOCK_N=block_n, BLOCK_K=block_k, num_stages=stages,
                                                     num_warps=warps)  # fmt: skip
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    _reduce_kernel[(triton.cdiv(m * n, 1024),)](part, out, m, n, SPLIT=split, BLOCK_M=block_m, BLOCK=1024)
    return out


SHAPES = {  # (N, K) of a layer's GEMMs after q/k/v and gate/up are packed
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "qwen2-7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
}
ROWS = [(bn, bk, st, wp) for bn, bk, st, wp in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6), (4, 8))
        if bn * bk * 2 * st <= 160 * 1024 and not (wp == 8 and bn == 16)]  # fmt: skip
SPLITK = [(bn, bk, st, 4, sp) for bn, bk, st, sp in itertools.product((64, 128), (128, 256), (3, 4), (2, 4, 8))]


def time_graph(fn, xs, ws, calls=48, replays=10):
    """us per call: a CUDA graph of `calls` calls cycling over the weight copies, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(xs[i % len(xs)], ws[i % len(ws)])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(xs[i % len(xs)], ws[i % len(ws)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def check(device):
    torch.manual_seed(0)
    for m, n, k in ((1, 40, 48), (16, 64, 96), (5, 33, 70)):
        x = torch.randn(m, k, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=x.dtype)
        ref = F.linear(x.float(), w.float())
        for out in (rows_linear(x, w, 16, 32, 2, 4), splitk_linear(x, w, 16, 32, 2, 4, 2)):
            err = (out.float() - ref).abs().max().item()
            assert err < (1e-3 if x.dtype == torch.float32 else 0.1), err
    print("kernels agree with F.linear")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--m", default="16,32,64")
    parser.add_argument("--models", default=",".join(SHAPES))
    args = parser.parse_args()
    if args.check:
        check("cpu" if not torch.cuda.is_available() else "cuda")
        return 0
    check("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    l2 = 60 * 2**20
    totals = {}
    for model in args.models.split(","):
        for name, (n, k) in SHAPES[model].items():
            size = n * k * 2
            copies = max(2, -(-3 * l2 // size))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
            for m in map(int, args.m.split(",")):
                xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                ref = F.linear(xs[0], ws[0]).float()
                dense = time_graph(lambda x, w: F.linear(x, w), xs, ws)
                best = {}
                for kind, configs, fn in (("rows", ROWS, rows_linear), ("splitk", SPLITK, splitk_linear)):
                    for config in configs:
                        try:
                            out = fn(xs[0], ws[0], *config)
                            if (out.float() - ref).abs().max().item() > 0.05 * ref.abs().max().item():
                                print(f"  WRONG {kind} {config}")
                                continue
                            us = time_graph(lambda x, w, c=config, f=fn: f(x, w, *c), xs, ws)
                        except Exception as error:  # out of shared memory and the like
                            if "resources" not in str(error).lower():
                                print(f"  {kind} {config}: {type(error).__name__}: {str(error)[:100]}")
                            continue
                        if kind not in best or us < best[kind][0]:
                            best[kind] = (us, config)
                tbps = {kind: size / (us * 1e-6) / 1e12 for kind, (us, _) in best.items()}
                line = f"{model:>10} {name:>7} M={m:<3} N={n:<6} K={k:<6}"
                line += f" cuBLAS {dense:7.1f} us {size / dense / 1e6:5.2f} TB/s"
                for kind, (us, config) in best.items():
                    line += f" | {kind} {us:7.1f} us {tbps[kind]:5.2f} TB/s {dense / us:5.2f}x {config}"
                print(line, flush=True)
                entry = totals.setdefault((model, m), [0.0, 0.0])
                entry[0] += dense
                entry[1] += min(dense, *(us for us, _ in best.values()))
            del ws
    for (model, m), (dense, ours) in totals.items():
        print(
            f"{model} M={m}: a layer's four GEMMs cuBLAS {dense:.1f} us, best of cuBLAS / ours each {ours:.1f} us"
            f" ({dense / ours:.3f}x); x32 layers: {(dense - ours) * 32 / 1e3:.3f} ms a step saved"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
