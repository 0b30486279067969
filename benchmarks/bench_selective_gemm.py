"""Selective GEMM (polar::selective_*) against the dense MLP through cuBLAS, on the MLP shapes of issue 4.

    python benchmarks/bench_selective_gemm.py --csv benchmarks/results/selective_gemm.csv   # benchmark (GPU)
    python benchmarks/bench_selective_gemm.py --tune table.json --csv out.csv               # tune, then benchmark
    python benchmarks/bench_selective_gemm.py --plot-only --csv benchmarks/results/selective_gemm.csv
    python benchmarks/bench_selective_gemm.py --index-order ascending   # indices as batch_union_topk orders them
    python benchmarks/bench_selective_gemm.py --dense-from table.json --csv out.csv  # fit dense_from, then bench

--dense-from times, per op and M bucket, the table's gather kernel against LaunchConfig.dense (cuBLAS over the
whole weight + the gather / scatter pass) at densities DENSE_SWEEP on the benchmark shapes, and writes the
current table with `dense_from` refitted (fit_dense_from) to the given path.

Timing: every variant is captured in one CUDA graph of several calls, each call on its own copy of the weights
(copies chosen so one graph touches > 3x L2 of weight bytes), and `polar_compile.bench.time_kernel` (median, L2
flushed by a 256 MB read before each replay, so no dirty line is left to write back) times the replays: no host
launch overhead, no weight read served from L2. (Rows before 2026-11-22 session 11 used triton's do_bench, whose
flush writes 256 MB: ~10 us more per replay, shared by its calls.) TB/s counts
the weight (and bias) bytes each call must read: k rows (columns) of d, or all F of them for dense (and for a
selective row whose config is LaunchConfig.dense: that path reads the whole weight). Since 2026-12-05 each
variant is timed in two rounds, dense and selective alternating, keeping its best; up+down is compared with the
stronger of the eager dense MLP and its two dense GEMMs alone (rows before: one round, dense first, against the
eager MLP, whose unfused activation cost 3-15%).

Each neuron index is drawn at random, in random order unless --index-order ascending (the order batch_union_topk
gives the decode step on CUDA; ~1% faster for the down kernel on an H100, session 44); the CSV's `index_order`
column keeps the runs apart, and the summary and plot read the order asked for.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from polar_compile import bench
from polar_compile.ops import selective_gemm as sg

DTYPE = torch.bfloat16
DEVICE = "cuda"


@dataclasses.dataclass(frozen=True)
class MlpShape:
    name: str
    d: int
    num_neurons: int
    gated: bool
    bias: bool


SHAPES = (
    MlpShape("opt-66b", 9216, 36864, gated=False, bias=True),
    MlpShape("opt-6.7b", 4096, 16384, gated=False, bias=True),
    MlpShape("llama-3-8b", 4096, 14336, gated=True, bias=False),
)
M_VALUES = (1, 8, 16, 32, 64, 128, 256)
DENSITIES = (0.05, 0.1, 0.3, 0.5, 1.0)

# Tuning sweep: (block_m, block_n, block_r, num_warps, num_stages) per M bucket; programs_per_sm separately.
# Run 1 (notes/selective_gemm.md) kept the winners and showed where deeper pipelines or smaller tiles could help.
UP_CANDIDATES = {
    16: [
        (16, 32, 256, 4, 4), (16, 32, 256, 4, 5), (16, 16, 256, 4, 6), (16, 32, 128, 4, 8),
        (16, 64, 128, 4, 6), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3),
    ],
    32: [
        (32, 32, 256, 4, 4), (32, 32, 256, 4, 5), (32, 16, 256, 4, 6), (32, 32, 128, 4, 8),
        (32, 64, 128, 4, 6), (32, 64, 256, 4, 3), (32, 128, 128, 4, 3),
    ],
    64: [
        (64, 64, 128, 4, 4), (64, 64, 64, 4, 6), (64, 32, 128, 4, 5), (32, 64, 128, 4, 4),
        (64, 64, 128, 4, 5), (64, 128, 64, 4, 5), (64, 128, 128, 8, 3),
    ],
    128: [
        (64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 64, 128, 4, 3),
        (64, 64, 128, 4, 4), (128, 128, 128, 8, 3),
    ],
    256: [
        (128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 128, 8, 3),
        (128, 64, 128, 4, 3), (128, 128, 64, 8, 5),
    ],
}  # fmt: skip
DOWN_CANDIDATES = {
    16: [
        (16, 64, 128, 4, 4), (16, 64, 64, 4, 6), (16, 128, 64, 4, 4), (16, 64, 128, 4, 5),
        (16, 128, 128, 4, 3), (16, 256, 64, 4, 3), (16, 32, 128, 4, 6),
    ],
    32: [
        (32, 64, 128, 4, 4), (32, 64, 64, 4, 6), (32, 128, 64, 4, 4), (32, 64, 128, 4, 5),
        (32, 128, 128, 4, 3), (32, 256, 64, 4, 3), (32, 32, 128, 4, 6),
    ],
    64: [
        (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 6),
        (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (32, 128, 64, 4, 4),
    ],
    128: [
        (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
        (128, 128, 64, 8, 4), (64, 128, 128, 8, 3),
    ],
    256: [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 256, 32, 8, 4),
        (128, 128, 128, 8, 3), (128, 128, 64, 8, 3),
    ],
}  # fmt: skip
PROGRAMS_PER_SM = (0, 1, 2, 3, 4, 6)
# Down is also tried as a stream-K grid of this many programs per SM (session 5: a tiles x splits grid leaves
# SMs unevenly loaded, e.g. 216 programs in 264 slots at OPT-66B M=64).
STREAM_PROGRAMS_PER_SM = (1, 2, 3)
# Extra down candidates for stream-K (one program per SM wants deep pipelines and wide tiles), and the same tile at
# 2 stages: with pipeline_y its 3 stages take 144 KB of shared memory (one program per SM), 2 stages 96 KB (two).
DOWN_CANDIDATES[64] = DOWN_CANDIDATES[64] + [(64, 128, 128, 8, 3), (64, 128, 128, 8, 2)]
# One M tile of 256 rows at M = 256 (session 30): with 128-row tiles every weight tile is read by two programs, as
# 64-row tiles did at M = 128 before session 29's tune. Compiled for sm_90 on the CPU: no spills (down 256x128x64 at
# 8 warps: 229 registers, 144 KB shared at 3 stages); a gated up keeps two accumulators: 64-wide tiles only (_spills).
# Measured (H100): they won the OPT-66B down only (6-8%); 128-row tiles stayed ahead everywhere else.
UP_CANDIDATES[256] = UP_CANDIDATES[256] + [(256, 128, 64, 8, 3), (256, 128, 64, 8, 2), (256, 64, 64, 8, 4),
                                           (256, 128, 32, 8, 4)]  # fmt: skip
DOWN_CANDIDATES[256] = DOWN_CANDIDATES[256] + [(256, 128, 64, 8, 3), (256, 128, 64, 8, 2), (256, 64, 64, 8, 4),
                                               (256, 128, 32, 8, 4), (256, 128, 64, 16, 3)]  # fmt: skip


def _spills(op: str, candidate) -> bool:
    """A gated up keeps two fp32 accumulators: above 128 registers a thread for them they spill (256 x 128 at 8
    warps, compiled for sm_90: 255 registers and 1.1 KB of spill stores a thread); the sweep leaves those out."""
    block_m, block_n, _, num_warps, _ = candidate
    return op == "gated_up" and 2 * block_m * block_n > 128 * num_warps * 32


# (op, d, F, k) pairs the sweep tunes on: densities 0.1 / 0.3 / 0.5 / 1.0 of the benchmark shapes.
# OPT-66B at density 1.0 since session 29 (before, its rows took the 0.3 entry's config, tuned at a third of k).
_PAIRS = [(9216, 36864, 3686), (9216, 36864, 11059), (9216, 36864, 36864), (4096, 16384, 1638), (4096, 16384, 8192),
          (4096, 16384, 16384)]  # fmt: skip
TUNE_PAIRS = {
    "up": _PAIRS,
    "gated_up": [(4096, 14336, 1434), (4096, 14336, 4301), (4096, 14336, 7168), (4096, 14336, 14336)],
    "down": _PAIRS,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def copies_for(bytes_per_call: int, limit: int = 16) -> int:
    """Weight copies so that one graph replay reads > 3x L2 before it reuses a copy."""
    return max(1, min(limit, math.ceil(3 * l2_bytes() / max(bytes_per_call, 1))))


def time_calls(calls: list[Callable[[], object]], warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """Median ms per call: all calls in one CUDA graph (at least 4), replayed under bench.time_kernel."""
    calls = [calls[i % len(calls)] for i in range(max(4, len(calls)))]
    for call in calls[:1]:
        call()  # compile / load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    torch.cuda.synchronize()
    ms = bench.time_kernel(graph.replay, warmup_ms=warmup_ms, rep_ms=rep_ms)
    del graph
    return ms / len(calls)


class Weights:
    """Copies of one MLP's weights, bf16, random (speed does not depend on values; never zeros)."""

    def __init__(self, shape: MlpShape, copies: int):
        d, f = shape.d, shape.num_neurons
        rows = 2 * f if shape.gated else f
        self.shape = shape
        self.up = [torch.randn(rows, d, device=DEVICE, dtype=DTYPE) * d**-0.5 for _ in range(copies)]
        self.up_bias = [torch.randn(f, device=DEVICE, dtype=DTYPE) if shape.bias else None for _ in range(copies)]
        # Neuron-major down weights (prepare_down_weight's layout) for the selective kernel.
        self.down = [(torch.randn(f, d, device=DEVICE, dtype=DTYPE) * f**-0.5).t() for _ in range(copies)]
        self.down_bias = [torch.randn(d, device=DEVICE, dtype=DTYPE) if shape.bias else None for _ in range(copies)]
        # Dense baseline reads the standard nn.Linear layout (d, F) row-major: one copy (>= 2x L2 on its own).
        self.dense_down = torch.randn(d, f, device=DEVICE, dtype=DTYPE) * f**-0.5

    def gate_up(self, i: int):
        f = self.shape.num_neurons
        return self.up[i][:f], self.up[i][f:]


def up_call(weights: Weights, i: int, x, index, config=None):
    if weights.shape.gated:
        gate, up = weights.gate_up(i)
        if config is not None:
            return lambda: sg.launch_selective_gated_up(x, gate, up, index, config=config)
        return lambda: torch.ops.polar.selective_gated_up(x, gate, up, index)
    relu = sg.ACTIVATIONS["relu"]
    if config is not None:
        return lambda: sg.launch_selective_up(x, weights.up[i], weights.up_bias[i], index, relu, config=config)
    return lambda: torch.ops.polar.selective_up(x, weights.up[i], weights.up_bias[i], index, relu)


def down_call(weights: Weights, i: int, y, index, config=None):
    if config is not None:
        return lambda: sg.launch_selective_down(y, weights.down[i], index, weights.down_bias[i], config=config)
    return lambda: torch.ops.polar.selective_down(y, weights.down[i], index, weights.down_bias[i])


# --------------------------------------------------------------------------------------------------
# Precompile (process pool) and tuning sweep
# --------------------------------------------------------------------------------------------------


def _config(candidate, programs_per_sm=2.0, split=None, stream_k=False, pipeline_y=False) -> sg.LaunchConfig:
    block_m, block_n, block_r, num_warps, num_stages = candidate
    return sg.LaunchConfig(
        block_m, block_n, block_r, num_warps, num_stages, programs_per_sm, split, stream_k, pipeline_y=pipeline_y
    )


def _compile_jobs(ops=("up", "gated_up", "down"), buckets=None) -> list[tuple[str, tuple, bool, int, bool]]:
    jobs = []
    for candidates, group in ((UP_CANDIDATES, ("up", "gated_up")), (DOWN_CANDIDATES, ("down",))):
        for bucket_candidates in (c for b, c in candidates.items() if buckets is None or b in buckets):
            for candidate in bucket_candidates:
                for op in (op for op in group if op in ops and not _spills(op, candidate)):
                    # (split, stream_k): one program and a split grid (USE_WORKSPACE both ways); stream-K for down,
                    # and for down each of them with pipeline_y too
                    variants = [(1, False), (2, False)] + ([(2, True)] if op == "down" else [])
                    for split, stream_k in variants:
                        biases = (True, False) if op == "down" else (op == "up",)
                        for pipeline_y in (False, True) if op == "down" else (False,):
                            jobs.extend((op, candidate, b, split, stream_k, pipeline_y) for b in biases)
    return sorted(set(jobs))


def _compile_worker(jobs) -> tuple[int, int]:
    """Launch each (op, candidate, bias, split) once on tiny tensors with the benchmark's specialisations
    (bf16, d % 16 == 0, unit inner strides): fills Triton's on-disk cache for the main process."""
    torch.manual_seed(0)
    d, f, k = 512, 1024, 512
    x = torch.randn(64, d, device=DEVICE, dtype=DTYPE)
    up = torch.randn(2 * f, d, device=DEVICE, dtype=DTYPE)
    bias_f = torch.randn(f, device=DEVICE, dtype=DTYPE)
    down = torch.randn(f, d, device=DEVICE, dtype=DTYPE).t()
    bias_d = torch.randn(d, device=DEVICE, dtype=DTYPE)
    y = torch.randn(64, k, device=DEVICE, dtype=DTYPE)
    index = torch.randperm(f, device=DEVICE)[:k]
    done = failed = 0
    for op, candidate, has_bias, split, stream_k, pipeline_y in jobs:
        config = _config(candidate, split=split, stream_k=stream_k, pipeline_y=pipeline_y)
        try:
            if op == "up":
                sg.launch_selective_up(x, up[:f], bias_f if has_bias else None, index, 1, config=config)
            elif op == "gated_up":
                sg.launch_selective_gated_up(x, up[:f], up[f:], index, config=config)
            else:
                sg.launch_selective_down(y, down, index, bias_d if has_bias else None, config=config)
            done += 1
        except Exception:  # out of shared memory and the like: the sweep skips these too
            failed += 1
    torch.cuda.synchronize()
    return done, failed


def precompile(workers: int, ops=("up", "gated_up", "down"), buckets=None) -> None:
    jobs = _compile_jobs(ops, buckets)
    start = time.time()
    chunks = [jobs[i::workers] for i in range(workers)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = list(pool.map(_compile_worker, chunks))
    done, failed = sum(r[0] for r in results), sum(r[1] for r in results)
    log(f"precompiled {done} kernels ({failed} configs failed to launch) in {time.time() - start:.0f}s")


def _tune_variants(op: str, candidates, bucket: int, outputs: int, reduction: int):
    """(config, splits or stream-K programs, label) for each distinct launch of the sweep; each down launch also
    with pipeline_y (label suffix " pipe-y")."""
    seen = set()
    for candidate in (c for c in candidates if not _spills(op, c)):
        for pps in PROGRAMS_PER_SM:
            config = _config(candidate, programs_per_sm=pps)
            tiles = math.ceil(bucket / config.block_m) * math.ceil(outputs / config.block_n)
            splits, _ = sg._split(config, tiles, reduction, torch.device(DEVICE))
            if (candidate, splits) not in seen:
                seen.add((candidate, splits))
                yield config, splits, f"pps={pps}"
                if op == "down":
                    yield dataclasses.replace(config, pipeline_y=True), splits, f"pps={pps} pipe-y"
        if op == "down":
            for pps in STREAM_PROGRAMS_PER_SM:
                yield _config(candidate, programs_per_sm=pps, stream_k=True), 0, f"stream-k pps={pps}"
                config = _config(candidate, programs_per_sm=pps, stream_k=True, pipeline_y=True)
                yield config, 0, f"stream-k pps={pps} pipe-y"
        else:
            # Neurons spread over one program per SM, where the block_n tiles alone leave SMs idle (session 12:
            # 7-15% faster for Llama-3's gated up at density 0.1-0.3 and M 64-128, slower or equal elsewhere).
            config = dataclasses.replace(_config(candidate, programs_per_sm=0), spread=1.0)
            m_tiles = math.ceil(bucket / config.block_m)
            if sg._neurons_per_program(config, m_tiles, outputs, torch.device(DEVICE)) < config.block_n:
                yield config, 1, "spread=1"


def merge_tuned(table: dict, tuned: dict) -> dict:
    """Each tuned op's entries, plus the current table's entries of that op that the sweep did not reach (a deadline
    stops it part-way: those keep their tuned configs instead of falling back to the default)."""
    merged = {}
    for op, entries in tuned.items():
        new = {(e["m"], e["d"], e["k"]): e for e in entries}
        old = [new.pop((e["m"], e["d"], e["k"]), e) for e in table.get(op, [])]  # in the table's order
        merged[op] = old + list(new.values())
    return merged


def draw_index(f: int, k: int, order: str) -> torch.Tensor:
    """k distinct neurons of f, drawn at random, in random order or ascending (as batch_union_topk returns them on
    CUDA, the order the decode step passes the ops)."""
    index = torch.randperm(f, device=DEVICE)[:k]
    if order == "ascending":
        return index.sort().values
    if order != "random":
        raise ValueError(f"index order must be 'random' or 'ascending', got {order!r}")
    return index


def tune(
    deadline: float,
    log_rows: list[dict],
    ops=("up", "gated_up", "down"),
    ks=None,
    buckets=None,
    index_order: str = "random",
) -> dict:
    """Sweep candidates x programs_per_sm (and stream-K grids for down) per (op, M bucket, d, k); return the
    JSON table of the best for each op in `ops`. ks / buckets: only the TUNE_PAIRS with these k and the M buckets
    named (None: all); merge_tuned keeps the table's other entries. index_order: as draw_index."""
    table: dict[str, list[dict]] = {op: [] for op in ops}
    for op, pairs in TUNE_PAIRS.items():
        if op not in ops:
            continue
        candidates = DOWN_CANDIDATES if op == "down" else UP_CANDIDATES
        for d, f, k in (pair for pair in pairs if ks is None or pair[2] in ks):
            shape = MlpShape("tune", d, f, gated=op == "gated_up", bias=op != "gated_up")
            per_call = k * d * 2 * (2 if op == "gated_up" else 1)
            copies = copies_for(per_call, limit=8)
            weights = Weights(shape, copies)
            index = draw_index(f, k, index_order)
            for bucket in (b for b in sg.M_BUCKETS if buckets is None or b in buckets):
                if time.time() > deadline:
                    log(f"tune: deadline reached at {op} d={d} k={k} M={bucket}")
                    return table
                x = torch.randn(bucket, d, device=DEVICE, dtype=DTYPE)
                y = sg.empty_hidden(bucket, k, device=torch.device(DEVICE), dtype=DTYPE).normal_()  # as up returns it
                best = None
                outputs, reduction = (d, k) if op == "down" else (k, d)
                make = down_call if op == "down" else up_call
                arg = y if op == "down" else x
                for config, splits, label in _tune_variants(op, candidates[bucket], bucket, outputs, reduction):
                    candidate = (config.block_m, config.block_n, config.block_r, config.num_warps, config.num_stages)
                    try:
                        ms = time_calls([make(weights, i, arg, index, config) for i in range(copies)], 3, 15)
                    except Exception as error:  # a config that cannot launch (shared memory) is skipped
                        log(f"tune: skip {op} {candidate} {label}: {type(error).__name__}")
                        continue
                    tbps = per_call / ms / 1e9
                    row = dict(op=op, m=bucket, d=d, k=k, config=str(candidate), variant=label, splits=splits, ms=ms)
                    log_rows.append({**row, "tbps": tbps})
                    if best is None or ms < best[0]:
                        best = (ms, config, splits)
                if best is not None:
                    ms, config, splits = best
                    entry = dataclasses.asdict(config)
                    entry.pop("split")
                    table[op].append({"m": bucket, "d": d, "k": k, "config": entry, "ms": round(ms, 5)})
                    table[op][-1]["splits"] = splits
                    tbps = per_call / ms / 1e9
                    log(f"tune {op:8s} M<={bucket:3d} d={d} k={k:5d}: {ms * 1e3:7.1f} us {tbps:5.2f} TB/s {entry}")
            del weights
            torch.cuda.empty_cache()
    return table


# --------------------------------------------------------------------------------------------------
# dense_from: where cuBLAS over the whole weight beats the gather kernel
# --------------------------------------------------------------------------------------------------

DENSE_SWEEP = (0.3, 0.5, 0.7, 0.85, 1.0)
# Each bucket is timed at its smallest and largest M: the gather kernel's cost grows with M, the dense path's
# barely (bytes-bound), so the smallest M is where the kernel does best and the largest where it does worst.
BUCKET_M = {16: (1, 16), 32: (17, 32), 64: (33, 64), 128: (65, 128), 256: (129, 256)}
DENSE_OPS = {"up": ("opt-66b", "opt-6.7b"), "gated_up": ("llama-3-8b",), "down": ("opt-66b", "opt-6.7b", "llama-3-8b")}


def dense_sweep(deadline: float, buckets=None, index_order: str = "random") -> list[dict]:
    """Time the table's kernel and LaunchConfig.dense for every op, bucket M (of `buckets`, None: all) and density
    of DENSE_SWEEP, each index drawn by draw_index in `index_order`."""
    rows = []
    dense = sg.LaunchConfig(dense=True)
    for op, names in DENSE_OPS.items():
        for shape in (s for s in SHAPES if s.name in names):
            d, f = shape.d, shape.num_neurons
            per_call = round(min(DENSE_SWEEP) * f) * d * 2 * (2 if shape.gated else 1)
            copies = copies_for(per_call, limit=8)
            weights = Weights(shape, copies)
            for bucket, m_values in BUCKET_M.items():
                if buckets is not None and bucket not in buckets:
                    continue
                for M in m_values:
                    if time.time() > deadline:
                        log(f"dense sweep: deadline reached at {op} {shape.name} M={M}")
                        return rows
                    x = torch.randn(M, d, device=DEVICE, dtype=DTYPE)
                    for density in DENSE_SWEEP:
                        k = max(1, round(density * f))
                        index = draw_index(f, k, index_order)
                        y = sg.empty_hidden(M, k, device=torch.device(DEVICE), dtype=DTYPE).normal_()
                        make, arg = (down_call, y) if op == "down" else (up_call, x)
                        table = sg.config_for(op, M, d, k)
                        n_kernel = copies_for(k * d * 2, limit=copies)
                        n_dense = copies_for(f * d * 2, limit=copies)
                        kernel_ms = time_calls([make(weights, i, arg, index, table) for i in range(n_kernel)])
                        dense_ms = time_calls([make(weights, i, arg, index, dense) for i in range(n_dense)])
                        rows.append(
                            dict(op=op, model=shape.name, bucket=bucket, M=M, density=density, k=k,
                                 kernel_ms=round(kernel_ms, 6), dense_ms=round(dense_ms, 6))
                        )  # fmt: skip
                        log(
                            f"dense sweep {op:8s} {shape.name:10s} M={M:3d} density {density:4.2f}: kernel "
                            f"{kernel_ms * 1e3:7.1f} us, dense {dense_ms * 1e3:7.1f} us ({kernel_ms / dense_ms:4.2f}x)"
                        )
            del weights
            torch.cuda.empty_cache()
    return rows


def _lowest_dense_density(rows: list[dict]) -> float | None:
    """The lowest density of ``rows`` from which the dense path was faster in every row at it or above; None."""
    threshold = None
    for density in sorted({r["density"] for r in rows}, reverse=True):
        if all(r["dense_ms"] < r["kernel_ms"] for r in rows if r["density"] >= density):
            threshold = density
        else:
            break
    return threshold


def fit_dense_from(rows: list[dict]) -> dict[str, dict[str, float | dict[str, float]]]:
    """Per op and M bucket, the lowest swept density from which the dense path was faster in EVERY measured case
    (each shape, both ends of the bucket, every higher density). Where no density holds for every shape, the same
    rule per model width, as a map from width to density (sg.dense_from) of the widths that have one; a bucket
    where neither exists is left out (the gather kernel always)."""
    width = {shape.name: shape.d for shape in SHAPES}
    fitted: dict[str, dict[str, float | dict[str, float]]] = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        for bucket in dict.fromkeys(r["bucket"] for r in rows if r["op"] == op):
            mine = [r for r in rows if r["op"] == op and r["bucket"] == bucket]
            threshold = _lowest_dense_density(mine)
            if threshold is None:
                widths = sorted({width[r["model"]] for r in mine})
                per_width = {str(d): _lowest_dense_density([r for r in mine if width[r["model"]] == d]) for d in widths}
                threshold = {d: value for d, value in per_width.items() if value is not None} or None
            if threshold is not None:
                fitted.setdefault(op, {})[str(bucket)] = threshold
    return fitted


def complete_buckets(rows: list[dict]) -> dict[str, set[int]]:
    """Per op, the M buckets the sweep timed in full: every shape of DENSE_OPS (in SHAPES) at both ends of the
    bucket and every density of DENSE_SWEEP. A deadline can stop the sweep inside a bucket; fitting that bucket from
    the rows it has would judge the dense path on part of the cases, so such a bucket keeps the table's threshold."""
    complete: dict[str, set[int]] = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        for bucket in dict.fromkeys(r["bucket"] for r in rows if r["op"] == op):
            have = {(r["model"], r["M"], r["density"]) for r in rows if r["op"] == op and r["bucket"] == bucket}
            models = [s.name for s in SHAPES if s.name in DENSE_OPS[op]]
            want = {(m, M, d) for m in models for M in BUCKET_M[bucket] for d in DENSE_SWEEP}
            if want <= have:
                complete.setdefault(op, set()).add(bucket)
    return complete


def refit_dense_from(current: dict, sweep: list[dict]) -> tuple[dict, list[tuple[str, int]]]:
    """The table's dense_from refitted from a dense sweep's rows, and the (op, bucket)s the sweep left part-way
    (complete_buckets), which keep their thresholds."""
    swept = complete_buckets(sweep)
    finished = [r for r in sweep if r["bucket"] in swept.get(r["op"], ())]
    partial = sorted({(r["op"], r["bucket"]) for r in sweep} - {(r["op"], r["bucket"]) for r in finished})
    return merge_dense_from(current, fit_dense_from(finished), swept), partial


def merge_dense_from(current: dict, fitted: dict, swept: dict[str, set[int]]) -> dict:
    """The table's dense_from with each swept (op, bucket) replaced by the fit: set where the fit found a density,
    removed where it found none (the kernel won somewhere); buckets and ops not swept keep their value."""
    merged = {op: dict(buckets) for op, buckets in current.items()}
    for op, buckets in swept.items():
        mine = merged.setdefault(op, {})
        for bucket in map(str, buckets):
            mine.pop(bucket, None)
            if bucket in fitted.get(op, {}):
                mine[bucket] = fitted[op][bucket]
        if not mine:
            del merged[op]
    return merged


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------

FIELDS = [
    "gpu", "torch", "triton", "model", "d", "F", "gated", "M", "density", "k", "op", "impl",
    "ms", "weight_bytes", "tbps", "dense_ms", "speedup", "config", "index_order",
]  # fmt: skip


def benchmark(shapes, m_values, densities, csv_path: Path, deadline: float, index_order: str = "random") -> list[dict]:
    rows: list[dict] = []
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for shape in shapes:
            min_k = max(1, round(min(densities) * shape.num_neurons))
            copies = copies_for(min_k * shape.d * 2 * (3 if shape.gated else 2))
            weights = Weights(shape, copies)
            log(f"{shape.name}: {copies} weight copies")
            for M in m_values:
                if time.time() > deadline:
                    log("benchmark: deadline reached")
                    return rows
                new_rows = bench_batch(weights, copies, M, densities, index_order=index_order)
                writer.writerows(new_rows)
                handle.flush()
                rows.extend(new_rows)
            del weights
            torch.cuda.empty_cache()
    return rows


def bench_batch(
    weights: Weights, copies: int, M: int, densities, rounds: int = 2, index_order: str = "random"
) -> list[dict]:
    """Dense and selective up, down and up+down (mlp) of one shape at batch M, every density.

    Every variant is timed once a round, dense and selective alternating, and keeps its fastest round: an order
    effect between them (5-25% in the attention bench before it alternated) falls on both sides alike.
    """
    shape = weights.shape
    d, f = shape.d, shape.num_neurons
    up_rows = 2 if shape.gated else 1
    x = torch.randn(M, d, device=DEVICE, dtype=DTYPE)
    hidden = torch.randn(M, f, device=DEVICE, dtype=DTYPE)

    def dense_up(i):
        return F.linear(x, weights.up[i], weights.up_bias[i])

    def dense_down(i):
        return F.linear(hidden, weights.dense_down, weights.down_bias[i])

    def dense_mlp(i):
        h = F.linear(x, weights.up[i], weights.up_bias[i])
        h = F.silu(h[:, :f]) * h[:, f:] if shape.gated else F.relu(h)
        return F.linear(h, weights.dense_down, weights.down_bias[i])

    dense_up_bytes = (up_rows * f * d + (f if shape.bias else 0)) * 2
    dense_down_bytes = (f * d + (d if shape.bias else 0)) * 2
    variants = []  # [density, k, op, impl, calls, bytes, config, best ms]
    for op, make, nbytes in (
        ("up", dense_up, dense_up_bytes),
        ("down", dense_down, dense_down_bytes),
        ("mlp", dense_mlp, dense_up_bytes + dense_down_bytes),
    ):
        variants.append(["dense", f, op, "dense", [functools.partial(make, i) for i in range(min(copies, 2))],
                         nbytes, "", math.inf])  # fmt: skip
    for density in densities:
        k = max(1, round(density * f))
        index = draw_index(f, k, index_order)
        y = sg.empty_hidden(M, k, device=torch.device(DEVICE), dtype=DTYPE).normal_()  # as the up ops return it
        up_bytes = (up_rows * k * d + (k if shape.bias else 0)) * 2
        down_bytes = (k * d + (d if shape.bias else 0)) * 2

        def mlp(i, index=index):
            return down_call(weights, i, up_call(weights, i, x, index)(), index)()

        up_config = sg.config_for("gated_up" if shape.gated else "up", M, d, k, f)
        down_config = sg.config_for("down", M, d, k, f)
        # The dense path (LaunchConfig.dense) reads the whole weight: count those bytes.
        up_bytes = dense_up_bytes if up_config.dense else up_bytes
        down_bytes = dense_down_bytes if down_config.dense else down_bytes
        variants += [
            [density, k, "up", "selective", [up_call(weights, i, x, index) for i in range(copies)], up_bytes,
             up_config, math.inf],
            [density, k, "down", "selective", [down_call(weights, i, y, index) for i in range(copies)], down_bytes,
             down_config, math.inf],
            [density, k, "mlp", "selective", [functools.partial(mlp, i) for i in range(copies)],
             up_bytes + down_bytes, "", math.inf],
        ]  # fmt: skip
    for _ in range(rounds):
        for variant in variants:
            variant[7] = min(variant[7], time_calls(variant[4]))
    dense = {op: ms for _, _, op, impl, _, _, _, ms in variants if impl == "dense"}
    # Eager dense_mlp runs its activation as separate kernels (3-15% of the MLP at M <= 64 on the H100); a compiled
    # dense model fuses it into one, and the selective up kernel applies it in its epilogue. The baseline is the
    # stronger of the two: the dense GEMMs alone when they are faster, as if the activation were free.
    baseline = {**dense, "mlp": min(dense["mlp"], dense["up"] + dense["down"])}
    rows = []
    for density, k, op, impl, _, nbytes, config, ms in variants:
        dense_ms = ms if impl == "dense" else baseline[op]
        rows.append(_row(shape, M, density, k, op, impl, ms, nbytes, dense_ms, config, index_order))
        if impl == "selective" and op == "mlp":
            r = rows[-1]
            log(
                f"{shape.name:10s} M={M:3d} density={density:4.2f}: mlp {r['ms'] * 1e3:7.1f} us {r['tbps']:5.2f} "
                f"TB/s, {r['speedup']:5.2f}x dense ({baseline['mlp'] * 1e3:.1f} us)"
            )
    return rows


def _row(shape, M, density, k, op, impl, ms, nbytes, dense_ms, config, index_order) -> dict:
    import triton

    versions = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    problem = dict(model=shape.name, d=shape.d, F=shape.num_neurons, gated=int(shape.gated), M=M, density=density, k=k)
    timing = dict(ms=round(ms, 6), weight_bytes=nbytes, tbps=round(nbytes / ms / 1e9, 4), dense_ms=round(dense_ms, 6))
    return {
        **versions,
        **problem,
        "op": op,
        "impl": impl,
        **timing,
        "speedup": round(dense_ms / ms, 4),
        "config": config,
        "index_order": index_order,
    }


# --------------------------------------------------------------------------------------------------
# Summary and plot (from the CSV)
# --------------------------------------------------------------------------------------------------


def read_rows(csv_path: Path, gpu: str | None = None, index_order: str = "random") -> list[dict]:
    """The newest row of each (model, M, density, op, impl) measured on ``gpu`` (default: the last row's GPU) with
    neuron indices in ``index_order``: the CSV keeps every run, the summary and the plot show the latest."""
    with csv_path.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["index_order"] == index_order]
    if gpu is None and rows:
        gpu = rows[-1]["gpu"]
    latest = {(r["model"], r["M"], r["density"], r["op"], r["impl"]): r for r in rows if r["gpu"] == gpu}
    return list(latest.values())


def with_strongest_dense(rows: list[dict]) -> list[dict]:
    """``rows`` with each selective up+down row's baseline the stronger of the eager dense MLP and the two dense
    GEMMs alone (the CSV's rows before 2026-12-05 took the eager MLP, whose unfused activation cost 3-15%)."""
    gemms: dict = {}
    for r in rows:
        if r["impl"] == "dense" and r["op"] in ("up", "down"):
            gemms.setdefault((r["model"], r["M"]), {})[r["op"]] = float(r["ms"])
    out = []
    for r in rows:
        pair = gemms.get((r["model"], r["M"]), {})
        if r["impl"] == "selective" and r["op"] == "mlp" and len(pair) == 2:
            dense_ms = min(float(r["dense_ms"]), pair["up"] + pair["down"])
            r = {**r, "dense_ms": f"{dense_ms:.6f}", "speedup": f"{dense_ms / float(r['ms']):.4f}"}
        out.append(r)
    return out


def summary(rows: list[dict]) -> str:
    """The issue-4 targets, each with its number (up+down against the strongest dense baseline)."""
    sel = [r for r in with_strongest_dense(rows) if r["impl"] == "selective"]
    lines = []
    key = ("opt-66b", "64", "0.1", "mlp")
    target = [r for r in sel if (r["model"], r["M"], r["density"], r["op"]) == key]
    if target:
        r = target[-1]
        met = "MET" if float(r["speedup"]) >= 7 else "NOT MET"
        lines.append(
            f"OPT-66B M=64 density 0.1 up+down: {float(r['ms']) * 1e3:.1f} us vs dense "
            f"{float(r['dense_ms']) * 1e3:.1f} us = {float(r['speedup']):.2f}x (target >= 7x): {met}"
        )
    bandwidth = [r for r in sel if int(r["M"]) <= 64 and float(r["density"]) >= 0.1]
    for op in ("up", "down", "mlp"):
        group = [r for r in bandwidth if r["op"] == op]
        if group:
            worst = min(group, key=lambda r: float(r["tbps"]))
            met = sum(float(r["tbps"]) >= 2.4 for r in group)
            median = sorted(float(r["tbps"]) for r in group)[len(group) // 2]
            lines.append(
                f"TB/s M<=64 density>=0.1 {op:4s}: {met}/{len(group)} cases >= 2.4 TB/s; worst "
                f"{float(worst['tbps']):.2f} ({worst['model']} M={worst['M']} density {worst['density']}); "
                f"median {median:.2f}"
            )
    full = [r for r in sel if r["density"] == "1.0" and r["op"] == "mlp"]
    if full:
        worst = min(full, key=lambda r: float(r["speedup"]))
        met = sum(float(r["speedup"]) >= 0.9 for r in full)
        lines.append(
            f"density 1.0 up+down: {met}/{len(full)} cases >= 0.9x dense; "
            f"worst {float(worst['speedup']):.2f}x ({worst['model']} M={worst['M']})"
        )
    return "\n".join(lines)


def plot(csv_path: Path, png_path: Path, index_order: str = "random") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = with_strongest_dense(read_rows(csv_path, index_order=index_order))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model and r["op"] == "mlp"]
        densities = sorted({r["density"] for r in mine if r["impl"] == "selective"}, key=float)
        for density in densities:
            pts = sorted((int(r["M"]), float(r["speedup"]), float(r["tbps"])) for r in mine if r["density"] == density)
            axes[0][column].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"density {density}")
            axes[1][column].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"density {density}")
        dense = sorted((int(r["M"]), float(r["tbps"])) for r in mine if r["impl"] == "dense")
        axes[1][column].plot([p[0] for p in dense], [p[1] for p in dense], "k--", label="dense cuBLAS")
        axes[1][column].axhline(2.4, color="gray", linestyle=":", linewidth=1, label="2.4 TB/s target")
        axes[0][column].axhline(0.9, color="gray", linestyle=":", linewidth=1, label="0.9x (density 1.0 target)")
        axes[0][column].set_title(f"{model}: up+down speedup vs dense GEMMs")
        axes[1][column].set_title(f"{model}: TB/s on weight bytes read")
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch M")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    last = rows[-1]
    fig.suptitle(
        f"polar::selective_gemm, bf16, {last['gpu']} (torch {last['torch']}, triton {last['triton']}; "
        f"{index_order} neuron indices)"
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


# --------------------------------------------------------------------------------------------------


def use_table(path: Path) -> None:
    """Point the ops at the table just written (the benchmark that follows measures it)."""
    sg._CONFIG_FILE = path
    sg._config_json.cache_clear()
    sg._config_table.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/selective_gemm.csv"))
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--tune", type=Path, default=None, help="sweep launch configs and write the table here")
    parser.add_argument("--tune-log", type=Path, default=None)
    parser.add_argument(
        "--tune-ops", nargs="+", default=["up", "gated_up", "down"], choices=["up", "gated_up", "down"],
        help="ops to retune; the others keep their entries from the current table",
    )  # fmt: skip
    parser.add_argument("--tune-k", nargs="+", type=int, default=None, help="tune only the TUNE_PAIRS with these k")
    parser.add_argument("--tune-m", nargs="+", type=int, default=None, choices=sg.M_BUCKETS, help="only these buckets")
    parser.add_argument("--precompile-workers", type=int, default=0, help="compile the sweep's kernels in parallel")
    parser.add_argument("--precompile-only", action="store_true")
    parser.add_argument("--tune-budget-s", type=float, default=1e9, help="stop tuning after this long")
    parser.add_argument("--models", nargs="*", default=[s.name for s in SHAPES])
    parser.add_argument("--m", nargs="*", type=int, default=list(M_VALUES))
    parser.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop starting new work after this long")
    parser.add_argument(
        "--index-order", choices=["random", "ascending"], default="random",
        help="order of each neuron index in the benchmark, the tune and the dense sweep (ascending: as "
        "batch_union_topk returns it on CUDA)",
    )  # fmt: skip
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--dense-from", type=Path, default=None, help="refit dense_from and write the table here")
    parser.add_argument("--dense-log", type=Path, default=None, help="the dense sweep's timings (JSON lines)")
    parser.add_argument(
        "--dense-m", nargs="+", type=int, default=None, choices=sg.M_BUCKETS,
        help="sweep only these M buckets; the others keep their dense_from",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.plot_only:
        bench.require_cuda(__file__)
    png = args.png or args.csv.with_suffix(".png")
    start = time.time()
    if args.precompile_only:
        precompile(args.precompile_workers or os.cpu_count() or 1)
        return
    if not args.plot_only:
        if args.tune is not None:
            if args.precompile_workers:
                precompile(args.precompile_workers, args.tune_ops, args.tune_m)
            tune_rows: list[dict] = []
            table = json.loads(sg._CONFIG_FILE.read_text())["configs"] if sg._CONFIG_FILE.exists() else {}
            deadline = start + min(args.tune_budget_s, args.budget_s)
            tuned = tune(deadline, tune_rows, args.tune_ops, args.tune_k, args.tune_m, args.index_order)
            table.update(merge_tuned(table, tuned))
            payload = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "configs": table}
            if "dense_from" in sg._config_json():
                payload["dense_from"] = sg._config_json()["dense_from"]
            args.tune.write_text(json.dumps(payload, indent=1) + "\n")
            if args.tune_log is not None:
                args.tune_log.write_text("\n".join(json.dumps(r) for r in tune_rows) + "\n")
            use_table(args.tune)
            log(f"tuned table written to {args.tune}")
        if args.dense_from is not None:
            sweep = dense_sweep(start + args.budget_s, args.dense_m, args.index_order)
            dense_from, partial = refit_dense_from(sg._config_json().get("dense_from", {}), sweep)
            if partial:
                log(f"dense sweep: buckets cut by the deadline keep their dense_from: {partial}")
            payload = {**sg._config_json(), "dense_from": dense_from}
            args.dense_from.write_text(json.dumps(payload, indent=1) + "\n")
            if args.dense_log is not None:
                args.dense_log.write_text("\n".join(json.dumps(r) for r in sweep) + "\n")
            use_table(args.dense_from)
            log(f"dense_from {payload['dense_from']} written to {args.dense_from}")
        log(f"device copy: {bench.copy_bandwidth() / 1e12:.2f} TB/s (read + write)")
        shapes = [s for s in SHAPES if s.name in args.models]
        benchmark(shapes, args.m, args.densities, args.csv, start + args.budget_s, args.index_order)
    print(summary(read_rows(args.csv, index_order=args.index_order)), flush=True)
    try:
        plot(args.csv, png, args.index_order)
        log(f"plot written to {png}")
    except ImportError:
        log("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
