"""Where one decode step's GPU time goes: a kernel-time table for stock and polar on one shape.

    python benchmarks/profile_decode.py --model llama3-8b --batch 64 --context 4096 --systems stock,polar-paper
    python benchmarks/profile_decode.py --model opt-6.7b --context 1920 --systems polar-paper,polar-paper-mlp

CUDA graphs hide the kernels from the profiler, so the step is compiled without them (inductor's default mode;
the kernels are the same, only the launch overhead differs). Each system: a lean decode loop warms up, then
``--steps`` steps run under torch.profiler (prefill and warm-up outside it); the table lists the GPU time per
step of the top kernels, grouped into attention / GEMM / top-k / other.
"""

from __future__ import annotations

import argparse
import collections

import torch

from polar_compile import bench


def category(name: str) -> str:
    lowered = name.lower()
    if "selective_up" in lowered or "selective_down" in lowered or "finish_s" in lowered:  # polar::selective_gemm
        return "sel-mlp"
    if "_split_kernel" in lowered or "_merge_kernel" in lowered:  # polar::selective_attention's two kernels
        return "attention"
    if "selective_attention" in lowered or "flash" in lowered or "fmha" in lowered or "attention" in lowered:
        return "attention"
    if "gemm" in lowered or "gemv" in lowered or "nvjet" in lowered or "sm90" in lowered or "cutlass" in lowered:
        return "gemm"
    if "topk" in lowered or "sort" in lowered or "radix" in lowered:
        return "top-k"
    return "other"


def profile_system(
    model, name: str, system: str, batch: int, context: int, steps: int, mlp_density: float = 0.3, prefill_chunk=1024
) -> None:
    import polar_compile
    from polar_compile.compiler import restore
    from polar_compile.config import SparsityConfig

    torch._dynamo.reset()
    restore(model)
    if system == "stock":
        from transformers import CompileConfig

        model.generation_config.compile_config = CompileConfig(mode="default")
    else:  # polar-1.0, polar-paper, polar-paper-mlp (as in bench.run)
        density = 1.0 if system == "polar-1.0" else bench.PAPER_DENSITY[name]
        with_mlp = system == "polar-paper-mlp"
        routers = bench.random_routers(model, density, mlp_density if with_mlp else None)
        config = SparsityConfig(attention_density=density, mlp="on" if with_mlp else "off")
        polar_compile.optimize(model, routers, config, mode="default")
    call = bench.decode_call(model)
    bench.lean_decode(model, call, batch, context, 4, warmup=2, prefill_chunk=prefill_chunk)  # compile
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    run = bench.lean_decode(
        model, call, batch, context, steps, warmup=1, around_steps=prof, prefill_chunk=prefill_chunk
    )
    per_kernel, launches = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" or getattr(event, "self_device_time_total", 0):
            per_kernel[event.key] += getattr(event, "self_device_time_total", 0) / 1e3
            launches[event.key] += event.count
    measured_steps = steps
    total = sum(per_kernel.values())
    groups = collections.Counter()
    for name, ms in per_kernel.items():
        groups[category(name)] += ms
    print(f"\n=== {system}: lean step {run.ms_per_step:.2f} ms (no CUDA graphs)", end="")
    print(f"; {total / steps:.2f} ms of kernels per step, {sum(launches.values()) / steps:.0f} launches per step")
    for name, ms in per_kernel.most_common(24):
        print(f"  {ms / measured_steps:8.3f} ms {launches[name] / steps:5.0f}x  {category(name):<9} {name[:100]}")
    print("  by category, ms per step:", {k: round(v / steps, 3) for k, v in groups.items()})
    counts = collections.Counter()
    for name, n in launches.items():
        counts[category(name)] += n
    print("  by category, launches per step:", {k: round(v / steps) for k, v in counts.items()})
    restore(model)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, help="override the model's layer count (a shape that fits the GPU)")
    parser.add_argument("--systems", default="stock,polar-paper")
    parser.add_argument("--mlp-density", type=float, default=0.3, help="MLP share kept by polar-paper-mlp")
    parser.add_argument(
        "--prefill-chunk", type=int, default=1024,
        help="generate's chunked prefill (0: off; off for OPT's stock system: bench.prefill_chunk_for)",
    )  # fmt: skip
    args = parser.parse_args()
    bench.require_cuda(__file__)
    name = bench.with_layers(args.model, args.layers)
    model = bench.build_model(name, args.context)
    for system in args.systems.split(","):
        chunk = bench.prefill_chunk_for(model.config.model_type, system, args.prefill_chunk)
        profile_system(model, name, system, args.batch, args.context, args.steps, args.mlp_density, chunk)
