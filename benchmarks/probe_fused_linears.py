"""Would concatenating parallel projections help? cuBLAS time of a decode step's linears, separate vs fused.

    python benchmarks/probe_fused_linears.py --batches 16 32 64
    python benchmarks/probe_fused_linears.py --models qwen2-7b --batches 64 128 256 --blas cublas   # BLAS A/B

Per model shape and batch M: one CUDA graph runs every layer's linears (distinct weights per layer, so nothing
is served from L2), either as HF runs them (q, k, v, o, gate, up, down: seven GEMMs) or with q/k/v and
gate/up concatenated (four GEMMs). Reports ms per step and TB/s over the weight bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from polar_compile import bench

SHAPES = {  # d, q heads x head_dim, kv width, F
    "llama2-7b": (4096, 4096, 4096, 11008),
    "llama3-8b": (4096, 4096, 1024, 14336),
    "qwen2-7b": (3584, 3584, 512, 18944),
}


def step_fn(weights, fused: bool):
    def run(x):
        for w in weights:
            if fused:
                qkv = F.linear(x, w["qkv"])
                o = F.linear(qkv[:, : w["q"]], w["o"])
                gu = F.linear(o, w["gu"])
                x = F.linear(gu[:, : w["f"]], w["down"])
            else:
                q = F.linear(x, w["wq"])
                F.linear(x, w["wk"]), F.linear(x, w["wv"])
                o = F.linear(q, w["o"])
                g = F.linear(o, w["wg"])
                F.linear(o, w["wu"])
                x = F.linear(g, w["down"])
        return x

    return run


def time_graph(fn, x, reps: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default")
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    args = parser.parse_args()
    bench.require_cuda(__file__)
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    blas = torch.backends.cuda.preferred_blas_library()
    print(torch.cuda.get_device_name(), torch.__version__, "blas:", blas, flush=True)
    dtype = torch.bfloat16
    for name in args.models:
        d, q, kv, f = SHAPES[name]
        weights = []
        for _ in range(args.layers):
            qkv = torch.randn(q + 2 * kv, d, device="cuda", dtype=dtype) * 0.02
            gu = torch.randn(2 * f, d, device="cuda", dtype=dtype) * 0.02
            weights.append({
                "qkv": qkv, "wq": qkv[:q], "wk": qkv[q : q + kv], "wv": qkv[q + kv :], "q": q,
                "o": torch.randn(d, q, device="cuda", dtype=dtype) * 0.02,
                "gu": gu, "wg": gu[:f], "wu": gu[f:], "f": f,
                "down": torch.randn(d, f, device="cuda", dtype=dtype) * 0.02,
            })  # fmt: skip
        nbytes = args.layers * 2 * (d * (q + 2 * kv) + q * d + 3 * d * f)
        for m in args.batches:
            x = torch.randn(m, d, device="cuda", dtype=dtype)
            separate = time_graph(step_fn(weights, False), x)
            fused = time_graph(step_fn(weights, True), x)
            print(
                f"{name:10s} M={m:<4d} separate {separate:.3f} ms {nbytes / separate / 1e9:.2f} TB/s | "
                f"fused {fused:.3f} ms {nbytes / fused / 1e9:.2f} TB/s | x{separate / fused:.3f}",
                flush=True,
            )
        del weights
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
