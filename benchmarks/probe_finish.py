"""Probe (GPU): what the split reduction's second pass costs, and whether LaunchConfig.fused_finish removes it.

    python benchmarks/probe_finish.py [--models ...] [--m ...] [--densities ...] [--budget-s 420]

Per (shape, density, M) of issue 4's grid, timed like bench_selective_gemm.py (one CUDA graph of calls on their own
weight copies, L2 flushed, median), us per call:
- down: the table's config ("table"); as a split grid with its finish pass ("split") where the table has stream-K;
  the split grid with fused_finish and per-launch zeroed counters ("fused"), with one persistent zeroed buffer
  instead ("fused-persist", no zeroing launch), and with the finish pass skipped ("no-finish": wrong sums, the
  lower bound of any finish).
- up: the table's config, and forced splits 2 / 3 / 4 with the pass and fused (per-launch counters).
Correctness on the GPU: each fused variant's output must equal the pass variant's exactly (same sums in the same
order), over 20 launches in a row (a missed arrival or a stale partial shows as a mismatch); printed as "equal".
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_gemm as bsg

from polar_compile.ops import selective_gemm as sg

PERSISTENT = None


def _persistent_counters(tiles, device):
    return PERSISTENT[:tiles]


def _time(make_call, weights, copies):
    return bsg.time_calls([make_call(i) for i in range(copies)]) * 1000


def _equal(first, second, repeats=20):
    want = first()
    return all(torch.equal(second(), want) for _ in range(repeats))


def down_variants(config):
    if config.dense:
        return {}
    split = dataclasses.replace(config, stream_k=False) if config.stream_k else config
    fused = dataclasses.replace(split, fused_finish=True)
    variants = {"table": (config, None), "fused": (fused, None), "fused-persist": (fused, "persist")}
    if config.stream_k:
        variants["split"] = (split, None)
    variants["no-finish"] = (split, "skip")
    return variants


def run_variant(kind, fn):
    saved = (sg._arrival_counters, sg._finish)
    if kind == "persist":
        sg._arrival_counters = _persistent_counters
    elif kind == "skip":
        sg._finish = lambda *args, **kwargs: None
    try:
        return fn()
    finally:
        sg._arrival_counters, sg._finish = saved


def main() -> None:
    global PERSISTENT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[s.name for s in bsg.SHAPES])
    parser.add_argument("--m", nargs="*", type=int, default=[1, 16, 32, 64, 128, 256])
    parser.add_argument("--densities", nargs="*", type=float, default=[0.1, 0.3, 0.5, 1.0])
    parser.add_argument("--up-splits", nargs="*", type=int, default=[2, 3, 4])
    parser.add_argument("--budget-s", type=float, default=420)
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    torch.manual_seed(0)
    PERSISTENT = torch.zeros(1 << 16, device="cuda", dtype=torch.int32)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for shape in (s for s in bsg.SHAPES if s.name in args.models):
        for density in args.densities:
            k = round(density * shape.num_neurons)
            per_call = k * shape.d * 2 * (3 if shape.gated else 2)
            copies = bsg.copies_for(per_call, limit=8)
            weights = bsg.Weights(shape, copies)
            index = torch.randperm(shape.num_neurons, device="cuda")[:k]
            for M in args.m:
                if time.time() > deadline:
                    print("# budget reached", flush=True)
                    return
                x = torch.randn(M, shape.d, device="cuda", dtype=bsg.DTYPE)
                y = sg.empty_hidden(M, k, device=x.device, dtype=x.dtype).normal_()
                op = "gated_up" if shape.gated else "up"
                label = f"{shape.name} density {density} M={M}"
                # down
                config = sg.config_for("down", M, shape.d, k, shape.num_neurons)
                times, pass_fn = {}, None
                for name, (variant, kind) in down_variants(config).items():
                    fns = [bsg.down_call(weights, i, y, index, variant) for i in range(copies)]
                    try:
                        times[name] = run_variant(kind, lambda fns=fns: bsg.time_calls(fns) * 1000)
                    except Exception as error:
                        times[name] = f"error {type(error).__name__}: {error}"[:80]
                        continue
                    if name == ("split" if config.stream_k else "table"):
                        pass_fn = fns[0]
                    if name.startswith("fused") and pass_fn is not None:
                        times[name + " equal"] = run_variant(kind, lambda f=fns[0], p=pass_fn: _equal(p, f))
                mb = k * shape.d * 2 / 1e6
                print(f"{label} down {mb:.1f} MB table={config} " + _fmt(times), flush=True)
                # up
                config = sg.config_for(op, M, shape.d, k, shape.num_neurons)
                if config.dense:
                    continue
                times = {"table": bsg.time_calls([bsg.up_call(weights, i, x, index, config) for i in range(copies)])}
                times["table"] *= 1000
                for splits in args.up_splits:
                    split = dataclasses.replace(config, split=splits)
                    fused = dataclasses.replace(split, fused_finish=True)
                    pass_fns = [bsg.up_call(weights, i, x, index, split) for i in range(copies)]
                    fused_fns = [bsg.up_call(weights, i, x, index, fused) for i in range(copies)]
                    try:
                        times[f"s{splits}"] = bsg.time_calls(pass_fns) * 1000
                        times[f"s{splits}-fused"] = bsg.time_calls(fused_fns) * 1000
                        times[f"s{splits}-fused equal"] = _equal(pass_fns[0], fused_fns[0])
                    except Exception as error:
                        times[f"s{splits}"] = f"error {type(error).__name__}"
                mb = k * shape.d * 2 * (2 if shape.gated else 1) / 1e6
                print(f"{label} {op} {mb:.1f} MB table={config} " + _fmt(times), flush=True)


def _fmt(times: dict) -> str:
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in times.items())


if __name__ == "__main__":
    main()
