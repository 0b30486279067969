"""Where generate's extra time per step goes: host time of the compiled decode call, in the lean loop and in
``generate``, against the GPU time per step of each loop.

    python benchmarks/probe_host.py --model llama3-8b --batch 64 --context 4096 --systems polar-1.0,polar-paper
    python benchmarks/probe_host.py --model llama2-7b --batch 32 --fuse on,off   # fused projections: A/B
    python benchmarks/probe_host.py --model llama2-7b --batch 32 --blas cublaslt,torch   # BLAS library: A/B
    python benchmarks/probe_host.py --model llama3-8b --context 1024 --systems polar-paper --profile
    python benchmarks/probe_host.py --model llama3-8b --batch 64 --defer off,on   # deferred stop check: A/B
    python benchmarks/probe_host.py --model llama2-7b --batch 32 --layers 8 --pdl off,on   # inductor's PDL: A/B

transformers' generate on CUDA reads ``unfinished_sequences.max() == 0`` on the host every step (a sync; its
DeferredStopCheck is enabled for "mps" only), so the host work between one step's end and the next graph
launch leaves the GPU idle. ``optimize`` enables that deferred check on CUDA for its models
(``SparsityConfig.defer_stop_check``); ``--defer off,on`` measures both.
This probe times the compiled call's own host work (perf_counter around it) in
both loops; the rest of the gap is transformers' per-step Python. ``--profile`` then attributes the host time
of one generate (torch.profiler's CPU ops and CUDA runtime calls, and cProfile).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from polar_compile import bench


def timed(call, sink: list):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = call(*args, **kwargs)
        sink.append(1e3 * (time.perf_counter() - start))
        return out

    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--layers", type=int, help="override the model's layer count")
    parser.add_argument("--systems", default="polar-1.0,polar-paper")
    parser.add_argument("--fuse", default="on", help="comma list of on,off: SparsityConfig.fuse_projections")
    parser.add_argument("--blas", default="cublaslt", help="comma list of cublaslt,torch: the 'polar.blas' option")
    parser.add_argument("--defer", default="on", help="comma list of on,off: SparsityConfig.defer_stop_check")
    parser.add_argument("--pdl", default="off", help="comma list of off,on: inductor's triton.enable_pdl")
    parser.add_argument("--gemm-autotune", default="off", help="comma list of off,on: inductor's max_autotune_gemm")
    parser.add_argument("--generate", default="on", help="on/off: also time generate (off: the lean loop only)")
    parser.add_argument("--profile", action="store_true", help="also profile the host side of generate's steps")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    import polar_compile
    from polar_compile.compiler import restore
    from polar_compile.config import SparsityConfig

    name = bench.with_layers(args.model, args.layers)
    print(torch.cuda.get_device_name(), torch.__version__, name, args.batch, args.context, flush=True)
    model = bench.build_model(name, args.context)
    runs = itertools.product(*(getattr(args, option).split(",") for option in
                               ("fuse", "blas", "defer", "pdl", "gemm_autotune", "systems")))  # fmt: skip
    for fuse, blas, defer, pdl, autotune, system in runs:
        torch._dynamo.reset()
        restore(model)
        density = 1.0 if system == "polar-1.0" else bench.PAPER_DENSITY[name]
        config = SparsityConfig(attention_density=density, mlp="off", fuse_projections=fuse == "on",
                                defer_stop_check=defer == "on")  # fmt: skip
        # mode="reduce-overhead" plus the polar option; PDL: programmatic dependent launch of inductor's kernels
        # max_autotune_gemm: inductor times its Triton GEMM templates against cuBLAS at compile time
        options = {"triton.cudagraphs": True, "polar.blas": blas, "triton.enable_pdl": pdl == "on"}
        if autotune == "on":
            options.update({"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"})
        polar_compile.optimize(model, bench.random_routers(model, density), config, options=options)
        started = time.perf_counter()
        lean_host: list[float] = []
        lean = bench.lean_decode(model, timed(bench.decode_call(model), lean_host), args.batch, args.context,
                                 args.steps)  # fmt: skip
        lean_call = statistics.median(lean_host[-args.steps :])
        label = f"{system} (fuse {fuse}, blas {blas}, defer {defer}, pdl {pdl}, gemm autotune {autotune})"
        print(f"  (compile + lean loop: {time.perf_counter() - started:.0f} s)", flush=True)
        if args.generate == "off":
            print(f"{label}: lean {lean.ms_per_step:.2f} ms/step (call host {lean_call:.2f} ms)", flush=True)
            continue
        generate_host: list[float] = []
        mine = model.__dict__.get("get_compiled_call")  # optimize's own (decode steps only), if any
        original = model.get_compiled_call
        model.get_compiled_call = lambda config, original=original, sink=generate_host: timed(original(config), sink)
        try:
            ms, graphs, skips, _ = bench.time_generate(model, args.batch, args.context, args.steps)
        finally:
            del model.get_compiled_call
            if mine is not None:
                model.get_compiled_call = mine
        measured = generate_host[-(args.steps - 1) :]  # the measured generate's decode calls
        print(
            f"{label}: lean {lean.ms_per_step:.2f} ms/step"
            f" (call host {lean_call:.2f} ms) | generate {ms:.2f} ms/step (call host"
            f" {statistics.median(measured):.2f} ms, graphs {graphs}, skips {skips})"
            f" | gap {ms - lean.ms_per_step:.2f} ms",
            flush=True,
        )
        if args.profile:
            profile_generate(model, args.batch, args.context, args.steps)
    restore(model)
    return 0


def profile_generate(model, batch: int, context: int, steps: int, top: int = 25) -> None:
    """Host-side attribution of generate's steps: torch.profiler (CPU ops and CUDA runtime calls) and cProfile.

    Runs after the timed generate, so everything is compiled and captured; each tool gets its own generate.
    """
    import cProfile
    import io
    import pstats

    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.randint(10, model.config.vocab_size, (batch, context - steps), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                  cache_implementation="static")  # fmt: skip
    if hasattr(GenerationConfig(), "prefill_chunk_size"):
        kwargs["prefill_chunk_size"] = 1024
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        model.generate(ids, **kwargs)
    print(f"  torch.profiler, one generate of {steps} tokens (prefill included), by self CPU time:", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70))
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        model.generate(ids, **kwargs)
        profiler.disable()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(top)
        print(f"  cProfile, one generate of {steps} tokens, by {key}:")
        print("\n".join(line[:160] for line in text.getvalue().splitlines()[6:]), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
