"""How much of a sparse decode step the attention routers cost, end to end: the upper bound of any router fusion.

    python benchmarks/probe_router_bound.py --model llama2-7b --batch 32 --context 4096

Systems, each compiled afresh on one model (lean loop, as ``polar-compile bench``), each timed ``--repeats``
times (a new prefill each time):
- ``polar-1.0``, ``polar-paper``: as in the bench;
- ``paper-fixed``: polar-paper with every layer's ``polar::route_groups`` replaced by a constant index (the
  first k groups for every sequence): the same attention bytes with no router kernels, i.e. what a router
  that cost nothing would give (a bound, not a system: the selection is meaningless);
- ``+combo``: inductor's horizontal fusion (``combo_kernels``) on;
- ``+nofold``: ``SparsityConfig(fold_routers="off")``, only with results/probe_router_fold_s18.patch applied.
``--kernels`` also times, outside the model, the fused q/k/v GEMM with and without the router's rows appended
(the cost of folding the router into it; 32 layers in one CUDA graph, cuBLASLt), and, with the patch applied, the
attention of 8 layers with a group index against ``polar::routed_attention`` ranking the scores in-kernel (with
the compiled kernel's registers and resident programs per SM). Results: notes/decode_step.md, session 18.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from polar_compile import bench
from polar_compile.passes.context import example_value


def fixed_router_pass(gm, ctx) -> int:
    """Replace each route_groups node by arange(k) for every row (a constant index)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.polar.route_groups.default:
            hidden, _, _, k = node.args
            value = example_value(hidden)
            rows = value.numel() // value.shape[-1]
            with gm.graph.inserting_before(node):
                groups = gm.graph.call_function(torch.arange, (k,), {"dtype": torch.int64, "device": value.device})
                index = gm.graph.call_method("expand", (groups, rows, k))
                index = gm.graph.call_method("contiguous", (index,))
            node.replace_all_uses_with(index)
            gm.graph.erase_node(node)
            count += 1
    return count


def run_system(model, name, system, batch, context, steps, repeats):
    import polar_compile
    import polar_compile.passes as passes
    from polar_compile.compiler import restore
    from polar_compile.config import SparsityConfig

    base, *extras = system.split("+")
    torch._dynamo.reset()
    restore(model)
    torch._inductor.config.combo_kernels = "combo" in extras
    original = passes.PASSES
    if base == "paper-fixed":
        passes.PASSES = (original[0], fixed_router_pass, *original[1:])
    density = 1.0 if base == "polar-1.0" else bench.PAPER_DENSITY[name]
    routers = bench.random_routers(model, density)
    config = SparsityConfig(attention_density=density)
    if "nofold" in extras or (base == "paper-fixed" and hasattr(config, "fold_routers")):  # the patch's option
        config = dataclasses.replace(config, fold_routers="off")
    polar_compile.optimize(model, routers, config)
    call = bench.decode_call(model)
    started = time.perf_counter()
    try:
        times = []
        for _ in range(repeats):
            run = bench.lean_decode(model, call, batch, context, steps)
            times.append(run.ms_per_step)
    finally:
        passes.PASSES = original
        torch._inductor.config.combo_kernels = False
    print(
        f"{system:<22} {statistics.median(times):8.3f} ms/step  runs {[round(t, 3) for t in times]}  "
        f"graphs {run.graphs_compiled} skips {run.cudagraph_skips}  {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    restore(model)
    return statistics.median(times)


def time_graph(fn) -> float:
    """ms of ``fn()`` captured in one CUDA graph (median of the replays; probe_router.py's timer)."""
    from probe_router import time_graph as per_layer_us

    return per_layer_us(lambda: fn(), [()]) / 1e3


def attention_kernels(batch=32, heads=32, k=16, seq=4096, layers=8):
    try:
        from polar_compile.ops import routed_attention as ra
    except ImportError:
        print("attention kernels: polar::routed_attention needs results/probe_router_fold_s18.patch applied")
        return
    from polar_compile.ops import selective_attention as sa
    from polar_compile.ops._library import resident_programs

    shape = (batch, heads, seq, 128)
    caches = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
               torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]  # fmt: skip
    q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device="cuda")
    span = sa.key_span(mask)
    scores = torch.randn(batch, 12288 + heads, device="cuda", dtype=torch.bfloat16)[:, 12288:]  # a GEMM's slice
    bias = torch.randn(heads, device="cuda", dtype=torch.bfloat16)
    index = ra.routed_groups_reference(scores, bias, k)
    run_index = lambda: [sa.selective_attention(q, kc, vc, index, mask, None, span) for kc, vc in caches]  # noqa: E731
    run_routed = lambda: [ra.routed_attention(q, kc, vc, scores, bias, k, mask, None, span) for kc, vc in caches]  # noqa: E731
    assert torch.equal(run_index()[0], run_routed()[0])
    read = layers * batch * k * seq * 128 * 2 * 2
    for label, fn in (("group index", run_index), ("routed (in-kernel rank)", run_routed)):
        ms = time_graph(fn)
        print(f"attention {label}: {1e3 * ms / layers:7.2f} us a layer, {read / ms / 1e9:.2f} TB/s", flush=True)
    for entry in resident_programs(sa._split_kernel, torch.device("cuda")):
        c = entry["constants"]
        variant = f"ROUTED={c.get('ROUTED')} BLOCK_N={c.get('BLOCK_N')} DIRECT={c.get('DIRECT')}"
        usage = f"{entry['regs']} regs, {entry['shared']} B smem, {entry['occupancy']} programs/SM"
        print(f"  _split_kernel {variant}: {usage}", flush=True)


def gemm_fold(batch, d, rows, extra, layers=32):
    torch.backends.cuda.preferred_blas_library("cublaslt")
    x = [torch.randn(batch, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    for n in (rows, rows + extra):
        w = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        ms = time_graph(lambda w=w: [F.linear(a, b) for a, b in zip(x, w, strict=True)])
        tbs = layers * n * d * 2 / ms / 1e9
        print(f"q/k/v GEMM M={batch} N={n} K={d}: {1e3 * ms / layers:7.2f} us a layer ({tbs:.2f} TB/s)", flush=True)
    w = [torch.randn(extra, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    ms = time_graph(lambda: [F.linear(a, b) for a, b in zip(x, w, strict=True)])
    print(f"router alone as a GEMM M={batch} N={extra} K={d}: {1e3 * ms / layers:7.2f} us a layer", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default="polar-1.0,polar-paper,polar-paper+nofold,paper-fixed")
    parser.add_argument("--kernels", action="store_true", help="also the GEMM and attention kernel timings")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {vars(args)}", flush=True)
    if args.kernels:
        gemm_fold(32, 4096, 3 * 4096, 32)  # Llama-2-7B, B=32
        gemm_fold(64, 4096, 4096 + 2 * 1024, 8)  # Llama-3-8B, B=64
        attention_kernels()
    if not args.systems:
        return
    model = bench.build_model(args.model, args.context)
    for system in args.systems.split(","):
        run_system(model, args.model, system, args.batch, args.context, args.steps, args.repeats)


if __name__ == "__main__":
    main()
