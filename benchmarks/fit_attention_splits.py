"""Fit the split rule of the attention table's narrow entries (num_splits_for's constants) to measured times.

    python benchmarks/fit_attention_splits.py --measure splits.json [--shapes llama3-8b:1:1024:8 ...]   # GPU
    python benchmarks/fit_attention_splits.py --fit splits.json                                        # CPU

--measure times split counts 1-16 and 20-64 (SPLIT_COUNTS, up to one block of keys a split) of the entry config_for
picks (its block config) for each grid (model:B:L:k, k < Hkv with a random group index, k = Hkv with none; the key
span passed as the compiled decode step passes it), and cuDNN SDPA (enable_gqa) over every group, and writes them to
a JSON file. Grids that config_for gives a -wide
entry, or the narrow one unsplit (a full wave over a short cache), are skipped: their split counts are not this
rule's. --fit scores every (saturating_per_sm, overhead_keys, min_keys_per_split) of a grid by how much slower the
split count it implies runs than each grid's fastest (the nearest count timed), and prints the best rules and each
grid's picks. Nothing is written to the table: its entries are edited by hand, naming the run in its note.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_selective_attention as bsa

from polar_compile import bench
from polar_compile.ops import selective_attention as sa

# The split rule's shapes of the tuning sweep, the B = 1 rows of the benchmark grid, and grids between them.
SHAPES = [f"{m}:{b}:{length}:{k}" for m, b, length, k in bsa.SPLIT_SHAPES] + [
    "llama3-8b:1:1024:8", "llama3-8b:1:4096:8", "llama3-8b:1:16384:8", "llama2-7b:1:1024:32", "llama2-7b:1:4096:32",
    "llama2-7b:1:16384:32", "opt-66b:1:1024:72", "opt-66b:1:4096:72", "opt-66b:1:16384:72", "llama3-8b:16:4096:5",
    "llama3-8b:16:1024:8", "llama3-8b:16:4096:8", "llama2-7b:16:4096:10", "opt-66b:1:4096:18", "llama3-8b:1:4096:2",
    "opt-66b:16:1024:36", "llama2-7b:16:1024:10", "llama3-8b:64:1024:4",
]  # fmt: skip
SPLIT_COUNTS = [*range(1, 17), 20, 24, 28, 32, 40, 48, 56, 64]
SATURATING = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
OVERHEAD_KEYS = (0, 128, 256, 384, 512, 768, 1024, 1536, 2048)
MIN_KEYS = (32, 64, 128, 256, 512)


def measure_grid(spec: str, rep: float) -> dict | None:
    """SPLIT_COUNTS timed on one grid (model:B:L:k) with the entry config_for picks; None for another entry's grid."""
    device = torch.device("cuda")
    model, batch, valid_len, k = bsa.grid_point(spec)
    heads, groups, head_dim = bsa.MODELS[model]
    inputs = bsa.make_inputs(model, batch, valid_len)
    cache_len = inputs.key_cache.shape[2]
    entry = sa.config_for(heads // groups, head_dim, device, pairs=batch * k, cache_len=cache_len)
    key = sa._table_key(heads // groups, head_dim)
    if entry != sa._config_table().get(key):
        print(f"{spec}: config_for gives another entry than {key} (-wide, or unsplit), skipped", flush=True)
        return None
    span = sa.key_span(inputs.mask)
    index = None if k == groups else bsa.random_groups(batch, groups, k)

    def timed(splits: int, warmup: float, rep: float) -> float:
        config = dataclasses.replace(entry, num_splits=splits)

        def call():
            return sa.launch_selective_attention(
                inputs.query, inputs.key_cache, inputs.value_cache, index, inputs.mask, inputs.scale, span,
                config=config,
            )  # fmt: skip

        return bsa.time_ms(call, warmup=warmup, rep=rep)

    cudnn = min(bsa.time_ms(bsa.cudnn_dense(inputs), warmup=3, rep=1.5 * rep) for _ in range(2))
    # every count up to one block a split, once each; then the best and the rule's pick in two more rounds
    times = {s: timed(s, 2, rep) for s in SPLIT_COUNTS if s <= -(-valid_len // entry.block_n)}
    rule = sa.num_splits_for(entry, batch * k, cache_len, device)
    for splits in {min(times, key=times.get), rule} & set(times):
        times[splits] = min([times[splits]] + [timed(splits, 3, 1.5 * rep) for _ in range(2)])
    best = min(times, key=times.get)
    print(f"{spec}: cudnn {cudnn * 1e3:.1f} us; rule {rule} splits: {times.get(rule, math.nan) * 1e3:.1f} us; "
          f"best {best}: {times[best] * 1e3:.1f} us", flush=True)  # fmt: skip
    return dict(shape=spec, key=key, pairs=batch * k, cache_len=cache_len, cudnn_ms=cudnn, rule=rule,
                times={str(s): t for s, t in times.items()})  # fmt: skip


def measure(shapes: list[str], out_path: Path, rep: float) -> None:
    grids = []
    for spec in dict.fromkeys(shapes):
        grid = measure_grid(spec, rep)
        torch.cuda.empty_cache()
        if grid is not None:
            grids.append(grid)
    out_path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "grids": grids}, indent=1) + "\n")
    print(f"wrote {out_path}")


def rule_losses(grids: list[dict], sm_count: int, **rule) -> list[float]:
    """Per grid: time at the split count the table entry with ``rule``'s fields implies (the nearest count timed)
    over the grid's fastest time."""
    losses = []
    for grid in grids:
        entry = dataclasses.replace(sa._config_table()[grid["key"]], **rule)
        times = {int(s): t for s, t in grid["times"].items()}
        splits = sa.num_splits_with(entry, grid["pairs"], grid["cache_len"], sm_count)
        nearest = min(times, key=lambda s: (abs(math.log(s / splits)), s))
        losses.append(times[nearest] / min(times.values()))
    return losses


def fit(grids: list[dict], sm_count: int) -> list[tuple[float, float, dict]]:
    """Every rule of the grid, best first: (geometric-mean loss, worst loss, fields)."""
    scored = []
    for saturating, overhead, min_keys in itertools.product(SATURATING, OVERHEAD_KEYS, MIN_KEYS):
        rule = dict(saturating_per_sm=saturating, overhead_keys=overhead, min_keys_per_split=min_keys)
        losses = rule_losses(grids, sm_count, **rule)
        scored.append((statistics.geometric_mean(losses), max(losses), rule))
    return sorted(scored, key=lambda row: (round(row[0], 6), round(row[1], 6)))


def report(path: Path, sm_count: int) -> None:
    data = json.loads(path.read_text())
    grids = data["grids"]
    print(f"{len(grids)} grids measured on {data['gpu']}; {sm_count} SMs")
    for key in sorted({g["key"] for g in grids}):
        current = {f: getattr(sa._config_table()[key], f) for f in ("saturating_per_sm", "overhead_keys",
                                                                      "min_keys_per_split")}  # fmt: skip
        print(f"{key} in the table: {current}")
    now = rule_losses(grids, sm_count)
    print(f"the table's rules: mean loss {statistics.geometric_mean(now):.4f}, worst {max(now):.4f}")
    ranked = fit(grids, sm_count)
    for mean, worst, rule in ranked[:10]:
        print(f"  mean loss {mean:.4f}, worst {worst:.4f}: {rule}")
    best = ranked[0][2]
    print("per grid (the table's pick -> the best rule's pick; loss against the fastest count):")
    for grid, old, new in zip(grids, now, rule_losses(grids, sm_count, **best)):
        entry = dataclasses.replace(sa._config_table()[grid["key"]], **best)
        times = {int(s): t for s, t in grid["times"].items()}
        fastest = min(times, key=times.get)
        print(
            f"  {grid['shape']:22s} pairs {grid['pairs']:4d}: fastest {fastest:2d} splits "
            f"({times[fastest] * 1e3:7.1f} us, {grid['cudnn_ms'] / times[fastest]:.3f}x cuDNN); table "
            f"{sa.num_splits_with(sa._config_table()[grid['key']], grid['pairs'], grid['cache_len'], sm_count):2d}"
            f" {old:.3f} -> {sa.num_splits_with(entry, grid['pairs'], grid['cache_len'], sm_count):2d} {new:.3f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", type=Path, help="GPU: time every split count, write this JSON")
    parser.add_argument("--fit", type=Path, help="CPU: fit the rule to this JSON")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="grids as model:B:L:k")
    parser.add_argument(
        "--rep",
        type=float,
        default=10.0,
        help="time_kernel repetition time a count, ms (x1.5 for cuDNN and the re-timed counts)",
    )
    parser.add_argument("--sm-count", type=int, default=132, help="--fit: the measuring GPU's SMs (H100: 132)")
    args = parser.parse_args()
    if (args.measure is None) == (args.fit is None):
        parser.error("give one of --measure or --fit")
    if args.fit is not None:
        report(args.fit, args.sm_count)
        return 0
    bench.require_cuda(__file__)
    start = time.time()
    measure(args.shapes, args.measure, args.rep)
    print(f"{time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
