"""How fast can a kernel move N bytes on this GPU? The size-aware ceiling for the TB/s targets of issues 3 and 4.

    python benchmarks/bench_read_ceiling.py             # GPU: measure, append to benchmarks/results/read_ceiling.csv
    python benchmarks/bench_read_ceiling.py --report    # no GPU: each target row against the ceiling at its bytes

The targets ask for TB/s on the bytes an op reads (issue 3: >= 2.7 TB/s at B >= 16, L >= 4096, density >= 0.5, and
>= 2.4 at density 0.25; issue 4: >= 2.4 TB/s at M <= 64, density >= 0.1). Many of those ops read 12-140 MB, which an
H100 streams in 5-50 us, where a kernel's ramp-up and tail are a large share of its time. This measures, at each
byte count, three ways of moving that many bytes: a Triton kernel that reads them and writes one int32 a program
(a few block shapes, the best kept), torch.sum over them (ATen's reduction, int32 summed as int64), and a
device-to-device copy of half of them (reads half, writes half). The ceiling at a size is the fastest of the three.
The copy counts although it also writes: on the H100 it moved 8-128 MB faster than any pure read here (32 MB:
2.55 against 2.19 TB/s; results/read_ceiling_h100_s37.log), so leaving it out would make the ceiling lower and the
verdict "the target is above the ceiling" easier to reach than it should be. Every call is replayed from a CUDA
graph with a clean, cold L2 before it (polar_compile.bench.time_kernel: the timer of the op benchmarks).

Sizes: a log-spaced grid from 4 MB to 2 GB, plus the exact byte counts of the target rows of the latest H100 runs in
benchmarks/results/selective_attention.csv and selective_gemm.csv (so that --report compares equal byte counts).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_compile.ops._library import tl, triton

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["gpu", "torch", "triton", "bytes", "impl", "config", "ms", "tbps", "date"]
GRID_MB = [4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048]
MAX_BYTES = 2**31  # the largest size measured; larger rows take its rate (flat from ~1 GB on: 3.20-3.22 TB/s)
# the Triton read's configs: (int32s a block, blocks a program, warps)
CONFIGS = [(2048, 1, 4), (4096, 1, 8), (8192, 1, 8), (16384, 1, 16), (4096, 2, 8), (4096, 4, 8), (8192, 4, 16)]


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    """Program p reads int32 blocks p*BLOCKS .. p*BLOCKS + BLOCKS - 1 and writes their sum to out[p]."""
    start = tl.program_id(0).to(tl.int64) * BLOCKS * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(BLOCKS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def launch_read(x: torch.Tensor, out: torch.Tensor | None, block: int, blocks: int, warps: int) -> torch.Tensor:
    """Sum x (int32, 1-D) in programs of ``blocks`` blocks of ``block`` elements; out: (programs,) int32 or None."""
    if x.dtype != torch.int32 or x.dim() != 1:
        raise ValueError(f"x must be a 1-D int32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    programs = triton.cdiv(x.numel(), block * blocks)
    if out is None:
        out = torch.empty(programs, dtype=torch.int32, device=x.device)
    _read_kernel[(programs,)](x, out, x.numel(), BLOCK=block, BLOCKS=blocks, num_warps=warps)
    return out


def measured_size(size: int) -> int:
    """The byte count measured for a row of ``size`` bytes: rounded up to whole int32s."""
    return 4 * math.ceil(size / 4)


def target_bytes(results: Path = RESULTS) -> set[int]:
    """Byte counts of the issue-3 and issue-4 target rows (latest H100 row of each point)."""
    return {size for row in target_rows(results) for size in (row["parts"] or [row["bytes"]])}


def target_rows(results: Path = RESULTS) -> list[dict]:
    """The TB/s target rows, latest H100 row of each point: issue, name, bytes, ours (TB/s), target (TB/s), parts (the
    byte counts of the launches an up+down ("mlp") row adds up, else None)."""
    rows = []
    attention = _latest(results / "selective_attention.csv", ("model", "batch", "valid_len", "k"))
    for r in attention:
        batch, length, density = int(r["batch"]), int(r["valid_len"]), float(r["density"])
        if batch < 16 or length < 4096:
            continue
        target = 2.7 if density >= 0.5 else 2.4 if abs(density - 0.25) < 1e-6 else None
        if target is not None:
            name = f"attention {r['model']} B={batch} L={length} k={r['k']}"
            rows.append(
                dict(
                    issue=3,
                    name=name,
                    bytes=int(r["ours_bytes"]),
                    ours=float(r["ours_tbps"]),
                    target=target,
                    parts=None,
                )
            )
    gemm = _latest(results / "selective_gemm.csv", ("model", "M", "density", "op", "impl"), index_order="random")
    for r in gemm:
        if r["impl"] != "selective" or int(r["M"]) > 64 or float(r["density"]) < 0.1:
            continue
        name = f"gemm {r['model']} {r['op']} M={r['M']} density={r['density']}"
        parts = None
        if r["op"] == "mlp":  # up + down: two launches, so the ceiling is that of reading each one's bytes
            parts = [int(p["weight_bytes"]) for p in gemm if _same_point(p, r) and p["op"] in ("up", "down")]
            if len(parts) != 2:
                continue
        size = int(r["weight_bytes"])
        rows.append(dict(issue=4, name=name, bytes=size, ours=float(r["tbps"]), target=2.4, parts=parts))
    return rows


def _same_point(a: dict, b: dict) -> bool:
    return all(a[key] == b[key] for key in ("model", "M", "density", "impl"))


def _latest(path: Path, key: tuple[str, ...], **where: str) -> list[dict]:
    """The last H100 row of each ``key`` among the rows whose columns equal ``where``."""
    if not path.exists():
        return []
    latest = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if "H100" in row["gpu"] and all(row[column] == value for column, value in where.items()):
                latest[tuple(row[k] for k in key)] = row
    return list(latest.values())


def ceiling(rows: list[dict], gpu: str = "H100") -> dict[int, tuple[float, str]]:
    """Best rate (TB/s, impl) at each byte count measured on ``gpu``, from read_ceiling.csv rows."""
    best: dict[int, tuple[float, str]] = {}
    for row in rows:
        if gpu in row["gpu"]:
            size, rate = int(row["bytes"]), float(row["tbps"])
            if rate > best.get(size, (0.0, ""))[0]:
                best[size] = (rate, row["impl"])
    return best


def report(results: Path = RESULTS) -> list[dict]:
    """Each target row with the ceiling measured at its exact byte count (None when not measured)."""
    path = results / "read_ceiling.csv"
    measured = ceiling(list(csv.DictReader(path.open()))) if path.exists() else {}
    out = []
    for row in target_rows(results):
        sizes = [min(measured_size(size), MAX_BYTES) for size in row["parts"] or [row["bytes"]]]
        rates = [measured.get(size, (None, ""))[0] for size in sizes]
        if None in rates:
            rate = None
        else:  # the time of reading each launch's bytes at the ceiling, added up
            rate = row["bytes"] / sum(size / r for size, r in zip(row["parts"] or [row["bytes"]], rates))
        out.append({**row, "ceiling": rate})
    return out


def print_report(rows: list[dict]) -> None:
    print(f"{'target row':52s} {'MB':>7s} {'ours':>6s} {'target':>6s} {'ceiling':>7s}  verdict")
    for row in sorted(rows, key=lambda r: (r["issue"], r["bytes"])):
        ceil = row["ceiling"]
        if row["ours"] >= row["target"]:
            verdict = "met"
        elif ceil is None:
            verdict = "missed (ceiling not measured)"
        elif ceil < row["target"]:
            verdict = "missed; the target is above the ceiling at this size"
        else:
            verdict = f"missed; {row['ours'] / ceil:.0%} of the ceiling"
        ceil_text = "-" if ceil is None else f"{ceil:.2f}"
        line = f"{row['name']:52s} {row['bytes'] / 1e6:7.1f} {row['ours']:6.2f} {row['target']:6.2f} {ceil_text:>7s}"
        print(f"{line}  {verdict}")
    missed = [r for r in rows if r["ours"] < r["target"]]
    above = [r for r in missed if r["ceiling"] is not None and r["ceiling"] < r["target"]]
    print(f"{len(rows)} target rows, {len(missed)} missed, {len(above)} of them above the ceiling at their size")


def measure(sizes: list[int], csv_path: Path, rep_ms: float) -> None:
    from polar_compile import bench

    gpu = torch.cuda.get_device_name()
    largest = max(sizes)
    buffer = torch.randint(-(2**20), 2**20, (largest // 4,), dtype=torch.int32, device="cuda")
    copy_target = torch.empty(largest // 8, dtype=torch.int32, device="cuda")
    sink = torch.empty((), dtype=torch.int64, device="cuda")
    rows = []
    for size in sorted(set(sizes)):
        x = buffer[: size // 4]
        expected = int(x.sum(dtype=torch.int64).item()) & 0xFFFFFFFF
        candidates = {}
        for block, blocks, warps in CONFIGS:
            out = launch_read(x, None, block, blocks, warps)
            got = int(out.sum(dtype=torch.int64).item()) & 0xFFFFFFFF  # int32 wrap-around agrees mod 2^32
            if got != expected:
                raise AssertionError(f"read kernel {block}/{blocks}/{warps} summed {got}, expected {expected}")
            candidates[("triton", f"{block}x{blocks}/{warps}w")] = lambda x=x, out=out, c=(block, blocks, warps): (
                launch_read(x, out, *c)
            )
        candidates[("torch.sum", "")] = lambda x=x: torch.sum(x, dim=0, dtype=torch.int64, out=sink)
        half = x[: x.numel() // 2]
        candidates[("copy", "read half, write half")] = lambda half=half: copy_target[: half.numel()].copy_(half)
        for (impl, config), fn in candidates.items():
            ms = bench.time_kernel(bench.graphed(fn), warmup_ms=rep_ms / 4, rep_ms=rep_ms)
            rate = size / (ms * 1e-3) / 1e12
            rows.append(
                dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, bytes=size, impl=impl,
                     config=config, ms=f"{ms:.5f}", tbps=f"{rate:.4f}", date=date.today().isoformat())
            )  # fmt: skip
        best = max((r for r in rows if r["bytes"] == size), key=lambda r: float(r["tbps"]))
        print(f"{size / 1e6:9.1f} MB  best {best['impl']:9s} {best['config']:24s} {best['ms']} ms {best['tbps']} TB/s")
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows appended to {csv_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=RESULTS / "read_ceiling.csv")
    parser.add_argument("--report", action="store_true", help="no measuring: target rows against the ceiling")
    parser.add_argument("--no-target-sizes", action="store_true", help="the log grid only")
    parser.add_argument("--rep", type=float, default=20.0, help="time_kernel repetition time, ms")
    args = parser.parse_args(argv)
    if args.report:
        print_report(report(args.csv.parent))
        return
    if not torch.cuda.is_available():
        raise SystemExit("measuring needs a CUDA GPU (--report reads the CSVs on any machine)")
    sizes = [mb * 2**20 for mb in GRID_MB]
    if not args.no_target_sizes:
        sizes += [measured_size(size) for size in target_bytes(args.csv.parent)]
    measure([size for size in sizes if size <= MAX_BYTES], args.csv, args.rep)


if __name__ == "__main__":
    main()
