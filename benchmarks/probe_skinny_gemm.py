"""Can polar::skinny_linear's kernel read a decode step's weights faster than cuBLAS at M = 16-64?

    python benchmarks/probe_skinny_gemm.py --m 16,32,64
    python benchmarks/probe_skinny_gemm.py --gated --m 8,16,32     # silu(x @ Wg.T) * (x @ Wu.T) in one kernel

Why: the H200 profile of the B=16 dense step (notes/decode_step.md, session 21) has cuBLAS's narrow GEMMs (q/k/v,
o: 34-50 MB, split-K plus a reduce launch) at 2.6-3.2 TB/s against the 4.29 TB/s copy rate. For every GEMM of a
layer (q/k/v and gate/up packed) of three models, the kernel (``launch_skinny_linear``: BLOCK_N output columns a
program, all of K in one pipelined loop; no split, no reduce) is timed over a sweep of block sizes, stages and warps
against F.linear, each in one CUDA graph over enough weight copies that every call reads from HBM
(``bench_selective_gemm.time_calls``). Prints, per (shape, M), cuBLAS and the best config, TB/s on the weight bytes.

results/probe_skinny_gemm_h200_s21.log was measured by the first version of this probe (commit 08e8d8b: its own
copy of the kernel without the bias, timed without the L2 clean, plus a split-K variant that lost everywhere);
the op's configs come from it.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import bench_selective_gemm as bsg
import torch
import torch.nn.functional as F

from polar_compile import bench
from polar_compile.ops import skinny_linear as sk

SHAPES = {  # (N, K) of a layer's GEMMs after q/k/v and gate/up are packed
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "qwen2-7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
}
CONFIGS = [sk.LaunchConfig(bn, bk, stages, warps)
           for bn, bk, stages, warps in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6), (4, 8))
           if bn * bk * 2 * stages <= 160 * 1024 and not (warps == 8 and bn == 16)]  # fmt: skip


GATED_CONFIGS = [sk.LaunchConfig(bn, bk, stages, warps)
                 for bn, bk, stages, warps in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 5), (4, 8))
                 if (2 * bn + 16) * bk * 2 * stages <= 200 * 1024 and not (warps == 8 and bn == 16)]  # fmt: skip


def _runs_right(launch, ref: torch.Tensor, tolerance: float, config) -> bool:
    """Whether ``launch()`` runs (a config can need more shared memory than an SM has) and matches ``ref`` to
    ``tolerance`` of its largest magnitude; prints why not."""
    try:
        out = launch()
    except Exception as error:  # out of shared memory and the like
        if "resources" not in str(error).lower():
            print(f"  {config}: {type(error).__name__}: {str(error)[:100]}")
        return False
    if (out.float() - ref).abs().max().item() > tolerance * ref.abs().max().item():
        print(f"  WRONG {config}")
        return False
    return True


def gated(models: list[str], ms: list[int]) -> None:
    """A gated MLP's first half, silu(x @ Wg.T) * (x @ Wu.T): cuBLAS over the packed [Wg; Wu] then inductor's
    SiLU-mul kernel (what the decode step runs after fuse_projections), against launch_skinny_gated_linear."""

    def packed_then_silu_mul(x, w):
        y = F.linear(x, w)
        half = w.shape[0] // 2
        return F.silu(y[..., :half]) * y[..., half:]

    baseline = torch.compile(packed_then_silu_mul, dynamic=False)
    for model in models:
        n2, k = SHAPES[model]["gate_up"]
        n, size = n2 // 2, n2 * k * 2
        ws = [torch.randn(n2, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(bsg.copies_for(size))]
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(len(ws))]
            pairs = list(zip(xs, ws, strict=True))
            ref = packed_then_silu_mul(xs[0], ws[0]).float()
            dense = 1e3 * bsg.time_calls([lambda x=x, w=w: baseline(x, w) for x, w in pairs])
            timed = []
            for config in GATED_CONFIGS:
                launch = functools.partial(sk.launch_skinny_gated_linear, xs[0], ws[0][:n], ws[0][n:], config=config)
                if not _runs_right(launch, ref, 0.02, config):
                    continue
                calls = [lambda x=x, g=w[:n], u=w[n:], c=config: sk.launch_skinny_gated_linear(x, g, u, config=c)
                         for x, w in pairs]  # fmt: skip
                timed.append((1e3 * bsg.time_calls(calls), config))
            timed.sort(key=lambda entry: entry[0])
            line = f"{model:>10} gated   M={m:<3} F={n:<6} K={k:<6}"
            line += f" cuBLAS+silu_mul {dense:7.1f} us {size / dense / 1e6:5.2f} TB/s"
            for us, config in timed[:3]:
                line += f" | {us:7.1f} us {size / us / 1e6:5.2f} TB/s {dense / us:5.2f}x {config}"
            print(line, flush=True)
            table = sk._GATED_CONFIGS.get(max(16, 1 << (m - 1).bit_length()))
            mine = [us for us, config in timed if config == table]
            if mine:
                print(f"{'':>10} table config {table}: {mine[0]:7.1f} us ({dense / mine[0]:5.2f}x)")
        del ws


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", default="16,32,64")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--gated", action="store_true", help="the gated kernel against cuBLAS + SiLU-mul instead")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.gated:
        gated(args.models.split(","), [int(m) for m in args.m.split(",")])
        return 0
    totals = {}
    for model in args.models.split(","):
        for name, (n, k) in SHAPES[model].items():
            size = n * k * 2
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(bsg.copies_for(size))]
            for m in map(int, args.m.split(",")):
                xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(len(ws))]
                pairs = list(zip(xs, ws, strict=True))
                ref = F.linear(xs[0], ws[0]).float()
                dense = 1e3 * bsg.time_calls([lambda x=x, w=w: F.linear(x, w) for x, w in pairs])
                best = None
                for config in CONFIGS:
                    launch = functools.partial(sk.launch_skinny_linear, xs[0], ws[0], config=config)
                    if not _runs_right(launch, ref, 0.05, config):
                        continue
                    calls = [lambda x=x, w=w, c=config: sk.launch_skinny_linear(x, w, config=c) for x, w in pairs]
                    us = 1e3 * bsg.time_calls(calls)
                    if best is None or us < best[0]:
                        best = (us, config)
                line = f"{model:>10} {name:>7} M={m:<3} N={n:<6} K={k:<6}"
                line += f" cuBLAS {dense:7.1f} us {size / dense / 1e6:5.2f} TB/s"
                if best is not None:
                    us, config = best
                    line += f" | kernel {us:7.1f} us {size / us / 1e6:5.2f} TB/s {dense / us:5.2f}x {config}"
                print(line, flush=True)
                entry = totals.setdefault((model, m), [0.0, 0.0])
                entry[0] += dense
                entry[1] += min(dense, best[0] if best else dense)
            del ws
    for (model, m), (dense, ours) in totals.items():
        print(
            f"{model} M={m}: a layer's four GEMMs cuBLAS {dense:.1f} us, the faster of the two each {ours:.1f} us"
            f" ({dense / ours:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
