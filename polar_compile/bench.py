"""End-to-end decode benchmark: stock HF ``generate`` vs polar at density 1.0 vs polar at the paper's density.

Random-weight models in real shapes (speed does not depend on weight values), built directly on the GPU.
Each system runs ``generate(cache_implementation="static")`` twice with identical shapes: the first run
compiles, the second is measured. A logits processor synchronises and timestamps every step, so decode
time excludes prefill; the median step time gives ms/step and tokens/s (batch / step time).

Each row also gives the byte floor of one decode step (weights read + KV actually read, at the measured
copy bandwidth) and the fraction of it achieved, plus the number of graphs compiled and cudagraph skips
during the measured run (both must be 0: no recompiles across decode steps, everything in CUDA graphs).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from polar_compile.config import SparsityConfig, groups_for_density

# name -> (config class, config fields); hidden / layers / heads / KV heads / MLP width as published.
MODEL_SHAPES: dict[str, tuple[str, dict]] = {
    "llama3-8b": (
        "LlamaConfig",
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    ),
    "llama2-7b": (
        "LlamaConfig",
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
             intermediate_size=11008, vocab_size=32000),
    ),
    "mistral-7b": (
        "MistralConfig",
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, vocab_size=32000, sliding_window=None),
    ),
    "qwen2-7b": (
        "Qwen2Config",
        dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
             intermediate_size=18944, vocab_size=152064, use_sliding_window=False),
    ),
    "opt-6.7b": (
        "OPTConfig",
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, vocab_size=50272,
             word_embed_proj_dim=4096, max_position_embeddings=16384, activation_function="relu"),
    ),
}  # fmt: skip

# The paper's densities: 4 of 8 groups for GQA, half the heads for MHA.
PAPER_DENSITY = {"llama3-8b": 0.5, "llama2-7b": 0.5, "mistral-7b": 0.5, "qwen2-7b": 0.5, "opt-6.7b": 0.5}


@dataclass
class DecodeResult:
    gpu: str
    model: str
    system: str
    batch: int
    context: int
    density: float
    mlp_density: float  # share of MLP neurons read (1.0 = dense MLP)
    new_tokens: int
    ms_per_step: float
    tokens_per_s: float
    floor_ms: float
    fraction_of_floor: float
    speedup_vs_polar_dense: float
    speedup_vs_stock: float
    graphs_compiled_measured: int
    cudagraph_skips: int
    tokens_equal_to_stock: float  # share of generated tokens equal to stock HF's at the same position
    layers_rewritten: str  # "attention/mlp" layers the last compiled decode graph rewrote (stock: "-")
    torch_version: str
    date: str


def build_model(name: str, context: int, dtype=torch.bfloat16, device="cuda"):
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, fields = MODEL_SHAPES[name]
    fields = dict(fields)
    fields.setdefault("max_position_embeddings", max(context + 256, 8192))
    config = getattr(transformers, class_name)(**fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class _StepClock:
    """A logits processor that timestamps each generation step (after a device sync)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def _graphs_and_skips() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])


def time_generate(model, batch: int, context: int, new_tokens: int, prefill_chunk: int = 1024):
    """Median decode step (ms) of a measured generate after a compiling one; graphs compiled, skips, tokens."""
    from transformers import GenerationConfig, LogitsProcessorList

    prompt = context - new_tokens
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), device=device, generator=generator)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static")  # fmt: skip
    if prefill_chunk and hasattr(GenerationConfig(), "prefill_chunk_size"):
        kwargs["prefill_chunk_size"] = prefill_chunk  # bounds prefill activations at B=64 x 4k (not timed)
    with torch.no_grad():
        model.generate(ids, **kwargs)  # compiles, captures graphs
        graphs_before, skips_before = _graphs_and_skips()
        clock = _StepClock()
        out = model.generate(ids, logits_processor=LogitsProcessorList([clock]), **kwargs)
    graphs_after, skips_after = _graphs_and_skips()
    steps = [b - a for a, b in itertools.pairwise(clock.times[1:])]  # times[0] follows prefill
    generated = out[:, prompt:].cpu()
    return 1e3 * statistics.median(steps), graphs_after - graphs_before, skips_after - skips_before, generated


def step_floor_ms(
    model, batch: int, context: int, density: float | None, bandwidth: float, mlp_density: float = 1.0
) -> float:
    """Bytes one decode step must read (weights without the embedding table + KV read) / bandwidth.

    density: attention density (None = dense); mlp_density: share of MLP neurons read in layers >= 1.
    """
    from polar_compile.model_info import describe_model

    info = describe_model(model)
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    if model.config.tie_word_embeddings:
        weights += embedding.numel() * embedding.element_size()  # the LM head reads it
    mlp_bytes = sum(
        linear.weight.numel() * linear.weight.element_size()
        for layer in info.layers[1:]
        for linear in (layer.mlp_up, layer.mlp_gate, layer.mlp_down)
        if linear is not None
    )
    weights -= (1.0 - mlp_density) * mlp_bytes
    per_layer_kv = 2 * batch * info.num_kv_heads * context * info.head_dim * embedding.element_size()
    if density is None:
        kv = info.num_layers * per_layer_kv
    else:
        kept = groups_for_density(density, info.num_groups) / info.num_groups
        kv = per_layer_kv * (1 + (info.num_layers - 1) * kept)  # layer 0 stays dense
    return 1e3 * (weights + kv) / bandwidth


def random_routers(model, density: float, mlp_density: float | None = None):
    """Randomly initialised routers for ``model`` (speed work only: recall on random weights is meaningless).

    mlp_density: MLP routers with a flat k-table keeping that share of neurons (an assumption stated in the
    results, since a real k-table needs calibration on real weights).
    """
    from polar_compile.routers.modules import PolarRouters

    mlp = mlp_density is not None
    return PolarRouters.for_model(model, density=density, mlp=mlp, mlp_density=mlp_density)


SYSTEMS = ("stock", "polar-1.0", "polar-paper", "polar-paper-mlp")


def run(
    models,
    batches,
    contexts,
    systems,
    new_tokens,
    bandwidth,
    csv_path: Path | None,
    mlp_density: float = 0.3,
    device: str = "cuda",
    prefill_chunk: int = 1024,
) -> list[DecodeResult]:
    """Measure each system on each grid point. prefill_chunk: chunked prefill size (0: one piece; OPT's mask
    code is not compilable for chunked prefill in transformers 5.17)."""
    import polar_compile
    from polar_compile.backend import compile_reports
    from polar_compile.compiler import restore

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results: list[DecodeResult] = []
    from tqdm import tqdm

    grid = [(m, b, c) for m in models for c in contexts for b in batches]
    for name, batch, context in tqdm(grid, desc="decode grid"):
        model = build_model(name, context, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
        measured: dict[str, tuple] = {}
        for system in systems:
            density, with_mlp = None, False
            if system == "stock":
                restore(model)
            else:
                density = 1.0 if system == "polar-1.0" else PAPER_DENSITY[name]
                with_mlp = system == "polar-paper-mlp"
                routers = random_routers(model, density, mlp_density if with_mlp else None)
                config = SparsityConfig(attention_density=density, mlp="on" if with_mlp else "off")
                polar_compile.optimize(model, routers, config)
            try:
                ms, graphs, skips, tokens = time_generate(model, batch, context, new_tokens, prefill_chunk)
            except torch.OutOfMemoryError:
                print(f"{name} B={batch} S={context} {system}: out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            rewritten = "-"
            if system != "stock":
                counters = compile_reports[-1].counters
                rewritten = f"{counters.get('attention', 0)}/{counters.get('mlp', 0)}"
                print(polar_compile.explain(model))
            measured[system] = (ms, density, graphs, skips, tokens, mlp_density if with_mlp else 1.0, rewritten)
        restore(model)
        del model
        torch._dynamo.reset()  # this process owns its compiles: drop the grid point's graphs and guards
        if device == "cuda":
            torch.cuda.empty_cache()
        stock_ms = measured.get("stock", (float("nan"),))[0]
        dense_ms = measured.get("polar-1.0", (float("nan"),))[0]
        stock_tokens = measured["stock"][4] if "stock" in measured else None
        for system, (ms, density, graphs, skips, tokens, mlp_share, rewritten) in measured.items():
            agree = float("nan") if stock_tokens is None else (tokens == stock_tokens).float().mean().item()
            floor = step_floor_ms_cached(name, batch, context, density, bandwidth, mlp_share)
            results.append(
                DecodeResult(
                    gpu=gpu, model=name, system=system, batch=batch, context=context,
                    density=1.0 if density is None else density, mlp_density=mlp_share, new_tokens=new_tokens,
                    ms_per_step=round(ms, 3), tokens_per_s=round(1e3 * batch / ms, 1), floor_ms=round(floor, 3),
                    fraction_of_floor=round(floor / ms, 3), speedup_vs_polar_dense=round(dense_ms / ms, 3),
                    speedup_vs_stock=round(stock_ms / ms, 3), graphs_compiled_measured=graphs,
                    cudagraph_skips=skips, tokens_equal_to_stock=round(agree, 4), layers_rewritten=rewritten,
                    torch_version=torch.__version__,
                    date=datetime.date.today().isoformat(),
                )
            )  # fmt: skip
        if csv_path is not None and measured:
            append_csv(csv_path, results[-len(measured) :])
    return results


_floor_cache: dict = {}


def step_floor_ms_cached(name, batch, context, density, bandwidth, mlp_density=1.0) -> float:
    key = (name, batch, context, density, bandwidth, mlp_density)
    if key not in _floor_cache:
        model = build_model(name, context, device="meta")
        _floor_cache[key] = step_floor_ms(model, batch, context, density, bandwidth, mlp_density)
    return _floor_cache[key]


def append_csv(path: Path, rows: list) -> None:
    """Append dataclass rows to a CSV file (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        if new:
            writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def print_table(results: list[DecodeResult]) -> None:
    header = f"{'model':<11}{'B':>5}{'ctx':>6} {'system':<12}{'ms/step':>9}{'tok/s':>9}{'floor%':>8}{'vs dense':>9}"
    print(header + f"{'vs stock':>9}{'graphs':>7}{'skips':>6}{'=stock':>8}{'rewritten':>10}")
    for r in results:
        print(
            f"{r.model:<11}{r.batch:>5}{r.context:>6} {r.system:<12}{r.ms_per_step:>9.2f}{r.tokens_per_s:>9.0f}"
            f"{100 * r.fraction_of_floor:>7.0f}%{r.speedup_vs_polar_dense:>8.2f}x{r.speedup_vs_stock:>8.2f}x"
            f"{r.graphs_compiled_measured:>7}{r.cudagraph_skips:>6}{100 * r.tokens_equal_to_stock:>7.1f}%"
            f"{r.layers_rewritten:>10}"
        )


def add_bench_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="llama3-8b", help=f"comma list of {','.join(MODEL_SHAPES)}")
    parser.add_argument("--batch", default="64", help="comma list of batch sizes")
    parser.add_argument("--context", default="4096", help="comma list of context lengths (tokens at decode)")
    parser.add_argument("--systems", default="stock,polar-1.0,polar-paper", help=f"comma list of {','.join(SYSTEMS)}")
    parser.add_argument("--mlp-density", type=float, default=0.3, help="MLP share kept by polar-paper-mlp")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s for the floor (H100 copy: 3.0e12)")
    parser.add_argument("--csv", default="benchmarks/results/decode.csv")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("polar-compile bench measures GPU decode speed: no CUDA device found")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 8))
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    models = args.models.split(",")
    unknown = set(models) - set(MODEL_SHAPES)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {sorted(MODEL_SHAPES)}")
    results = run(
        models,
        [int(b) for b in args.batch.split(",")],
        [int(c) for c in args.context.split(",")],
        systems,
        args.new_tokens,
        args.bandwidth,
        Path(args.csv) if args.csv else None,
        args.mlp_density,
    )
    print_table(results)
    return 0
