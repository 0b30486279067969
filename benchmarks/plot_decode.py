"""Decode throughput vs batch per model, from benchmarks/results/decode.csv -> decode.png (decode_lean.png for
the lean loop).

    python benchmarks/plot_decode.py [--csv benchmarks/results/decode.csv] [--loop generate|lean]

One panel per (model, GPU, context); one line per system; the newest row of each point wins (the CSV keeps every
run). Rows measured before the step-timing change (loop "generate-synced") are drawn only with --loop
generate-synced.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def latest_points(rows: list[dict], loop: str) -> dict:
    """{(model, gpu, context): {system: {batch: tokens/s}}}, the last row of each point."""
    panels: dict = {}
    for row in rows:
        if row["loop"] != loop:
            continue
        panel = panels.setdefault((row["model"], row["gpu"], int(row["context"])), {})
        panel.setdefault(row["system"], {})[int(row["batch"])] = float(row["tokens_per_s"])
    return panels


def default_png(csv_path: Path, loop: str) -> Path:
    """decode.csv -> decode.png for the generate loop, decode_<loop>.png for any other (so a lean plot never
    overwrites the generate one)."""
    suffix = "" if loop == "generate" else f"_{loop}"
    return csv_path.with_name(f"{csv_path.stem}{suffix}.png")


def plot(csv_path: Path, png_path: Path, loop: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        panels = latest_points(list(csv.DictReader(handle)), loop)
    if not panels:
        raise SystemExit(f"no rows with loop={loop!r} in {csv_path}")
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    # One colour per system in every panel (matplotlib's cycle would shift with the systems a panel has).
    names = sorted({system for systems in panels.values() for system in systems})
    colours = {system: f"C{i}" for i, system in enumerate(names)}
    for ax, ((model, gpu, context), systems) in zip(axes.flat, sorted(panels.items())):
        for system, points in sorted(systems.items()):
            batches = sorted(points)
            ax.plot(batches, [points[b] for b in batches], marker="o", label=system, color=colours[system])
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{model}, ctx {context}\n{gpu}", fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"decode throughput ({loop} loop)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the top row
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/decode.csv"))
    parser.add_argument("--png", type=Path, default=None, help="default: <csv>.png; <csv>_<loop>.png for other loops")
    parser.add_argument("--loop", default="generate")
    args = parser.parse_args()
    plot(args.csv, args.png or default_png(args.csv, args.loop), args.loop)
