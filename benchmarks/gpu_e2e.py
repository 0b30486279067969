"""One GPU session's end-to-end decode measurements, in priority order, within a wall-clock budget.

    python benchmarks/gpu_e2e.py --budget 480 --csv benchmarks/results/decode.csv

1. A 2-layer Llama-3-8B-width model: the pipeline check (rewrites happen, 0 recompiles, 0 cudagraph skips,
   density 1.0 against stock HF's tokens) in seconds, before the long runs.
2. The issue targets, most important first: Llama-3-8B B=64 ctx 4096 (stock, eager, polar 1.0, polar 4/8);
   Llama-2-7B B=32 ctx 4096 (polar 1.0, polar 0.5); OPT-6.7B B=64 ctx 1920 (polar 1.0, 0.5, 0.5 + MLP).
   A grid point starts only if the budget left can hold it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from polar_compile import bench

PLAN = [
    # (model, batch, context, systems, rough seconds needed)
    ("check-llama3-2layer", 16, 1024, ["stock", "eager", "polar-1.0", "polar-paper"], 60),
    ("llama3-8b", 64, 4096, ["stock", "eager", "polar-1.0", "polar-paper"], 300),
    ("llama2-7b", 32, 4096, ["polar-1.0", "polar-paper"], 150),
    ("opt-6.7b", 64, 1920, ["polar-1.0", "polar-paper", "polar-paper-mlp"], 200),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=480.0, help="seconds this script may use")
    parser.add_argument("--csv", default="benchmarks/results/decode.csv")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--mlp-density", type=float, default=0.3)
    parser.add_argument("--only", help="comma list of plan entries to run (default: all)")
    parser.add_argument("--loops", default="generate,lean")
    parser.add_argument("--systems", help="comma list overriding each plan entry's systems")
    args = parser.parse_args()
    bench.require_cuda(__file__)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 8))
    fields = dict(bench.MODEL_SHAPES["llama3-8b"][1], num_hidden_layers=2)
    bench.MODEL_SHAPES["check-llama3-2layer"] = ("LlamaConfig", fields)
    bench.PAPER_DENSITY["check-llama3-2layer"] = 0.5
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    bandwidth = bench.copy_bandwidth()
    print(f"device copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", flush=True)
    start, results = time.perf_counter(), []
    wanted = set(args.only.split(",")) if args.only else None
    for name, batch, context, systems, needed in PLAN:
        if wanted is not None and name not in wanted:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < needed:
            print(f"skipping {name} B={batch} ctx={context}: {left:.0f} s left, needs ~{needed} s", flush=True)
            continue
        t0 = time.perf_counter()
        csv_path = None if name.startswith("check") else Path(args.csv)
        try:
            if args.systems:
                systems = args.systems.split(",")
            rows = bench.run(
                [name], [batch], [context], systems, new_tokens=args.new_tokens, bandwidth=bandwidth,
                csv_path=csv_path, mlp_density=args.mlp_density, loops=tuple(args.loops.split(",")),
            )  # fmt: skip
        except Exception as error:  # report and go on: later grid points are independent
            import traceback

            traceback.print_exc()
            print(f"{name} failed: {type(error).__name__}: {error}", flush=True)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            continue
        results += rows
        bench.print_table(rows)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n=== all results ===")
    bench.print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
