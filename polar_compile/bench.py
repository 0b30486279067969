"""End-to-end decode benchmark: stock HF ``generate`` vs polar at density 1.0 vs polar at the paper's density.

Random-weight models in real shapes (speed does not depend on weight values), built directly on the GPU.
Two loops per system:
- "generate": ``generate(cache_implementation="static")`` twice with identical shapes; the first compiles,
  the second is measured. A logits processor records a CUDA event at every step (no host sync beyond what
  generate itself does), so decode time excludes prefill; the median step gives ms/step and tokens/s.
- "lean": :func:`lean_decode`, the same compiled decode step called in a bare loop on generate's StaticCache
  (what the kernels allow once generate's per-step host work is gone). Non-stock systems are fed stock's
  tokens there (teacher forcing), so their per-step argmax can be compared with stock's exactly.

Each row also gives the byte floor of one decode step (weights read + KV actually read, at the measured
copy bandwidth) and the fraction of it achieved, plus the number of graphs compiled and cudagraph skips
during the measured run (both must be 0: no recompiles across decode steps, everything in CUDA graphs).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import inspect
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
    # one fused q/k/v linear and a fused gate/up (a gated MLP: dense unless mlp='on'); a mixture of experts (dense)
    "phi3-mini": (
        "Phi3Config",
        dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
             intermediate_size=8192, vocab_size=32064, pad_token_id=32000),
    ),
    "mixtral-8x7b": (
        "MixtralConfig",
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
             sliding_window=None),
    ),
}  # fmt: skip

# OPT's mask code (transformers 5.17, prepare_padding_mask) fails under torch.compile in a chunked prefill. HF's own
# generate compiles each prefill chunk (the stock and eager systems), so there these model types prefill in one piece
# (more activation memory during prefill, which is not timed). A polar system's generate runs its prefill chunks on
# the eager forward (polar_compile/generation.py), so it keeps the chunk: OPT-6.7B B=64 x 1,920 needs it to fit an
# H100 80GB (one piece asked for 3.7 GiB more than was free, session 28).
NO_CHUNKED_PREFILL = frozenset({"opt"})


def prefill_chunk_for(model_type: str, system: str, chunk: int) -> int:
    """The prefill chunk a system prefills a model type with: 0 (one piece) where HF would compile the chunks of a
    model in NO_CHUNKED_PREFILL, else ``chunk``."""
    return 0 if system in ("stock", "eager") and model_type in NO_CHUNKED_PREFILL else chunk


# The paper's densities: 4 of 8 groups for GQA, half the heads for MHA.
PAPER_DENSITY = dict.fromkeys(MODEL_SHAPES, 0.5)


@dataclass
class DecodeResult:
    gpu: str
    model: str
    system: str
    loop: str  # "generate" (what users call) or "lean" (the static-cache decode loop alone, see lean_decode)
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
    # lean rows: share of steps whose argmax equals stock's when both are fed stock's tokens (teacher forcing),
    # and the largest logit difference over the first steps relative to the std of stock's logits
    argmax_equal_forced: float
    logit_error: float
    layers_rewritten: str  # "attention/mlp" layers the last compiled decode graph rewrote (stock: "-")
    torch_version: str
    date: str
    # wall seconds the system took at this grid point, all its loops together: optimize (routers, packing), the
    # prefills, compiling the decode step (most of it for polar and stock on a GPU: the whole model) and the steps
    system_s: float = float("nan")


def with_layers(name: str, layers: int | None) -> str:
    """The name of ``name``'s shape cut to ``layers`` decoder layers (registered on first use), or ``name`` itself
    when layers is None: probes use it to fit a shape's per-layer behaviour on a smaller GPU."""
    if not layers:
        return name
    short = f"{name}-{layers}l"
    config_type, fields = MODEL_SHAPES[name]
    MODEL_SHAPES[short] = (config_type, dict(fields, num_hidden_layers=layers))
    PAPER_DENSITY[short] = PAPER_DENSITY[name]
    return short


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
    """A logits processor that marks each generation step on the GPU timeline (a CUDA event, no host sync, so
    the host runs ahead as it does for users; on the CPU a wall-clock timestamp)."""

    def __init__(self):
        self.marks: list = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def step_ms(self) -> list[float]:
        """Times between consecutive steps after the first (which follows prefill)."""
        marks = self.marks[1:]
        if marks and isinstance(marks[0], float):
            return [1e3 * (b - a) for a, b in itertools.pairwise(marks)]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]


def _graphs_and_skips() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])


LEAN_WARMUP = 3  # steps lean_decode runs before its timed ones


def _prompt_length(context: int, generated: int) -> int:
    """The prompt that leaves ``generated`` tokens of a ``context``-token static cache to decode; at least one."""
    if context - generated < 1:
        raise ValueError(f"a context of {context} tokens leaves no prompt for {generated} decoded tokens: the "
                         f"context must be at least {generated + 1}")  # fmt: skip
    return context - generated


def time_generate(model, batch: int, context: int, new_tokens: int, prefill_chunk: int = 1024):
    """Median decode step (ms) of a measured generate after a compiling one; graphs compiled, skips, tokens."""
    from transformers import GenerationConfig, LogitsProcessorList

    prompt = _prompt_length(context, new_tokens)
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
    generated = out[:, prompt:].cpu()
    return statistics.median(clock.step_ms()), graphs_after - graphs_before, skips_after - skips_before, generated


class _StopAfterPrefill:
    """Stopping criterion: stop once prefill has produced the first token (the lean loop takes over)."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_call(model):
    """The compiled decode step ``generate`` would use now (polar's after ``optimize``, HF's default otherwise)."""
    return model.get_compiled_call(getattr(model.generation_config, "compile_config", None))


@dataclass
class LeanRun:
    ms_per_step: float  # mean over the measured steps (CUDA events around the whole loop; no sync inside it)
    graphs_compiled: int  # during the measured steps (must be 0)
    cudagraph_skips: int
    inputs: torch.Tensor  # (B, warmup + steps) the token fed at each step (warm-up included: pass as forced=)
    argmax: torch.Tensor  # (B, steps) the greedy token each step produced
    logits: torch.Tensor  # (B, keep_logits, V) float32: the first steps' last-position logits


def lean_decode(
    model,
    call,
    batch: int,
    context: int,
    steps: int,
    *,
    warmup: int = LEAN_WARMUP,
    forced: torch.Tensor | None = None,
    keep_logits: int = 0,
    prefill_chunk: int = 1024,
    around_steps=None,
) -> LeanRun:
    """The lean static-cache decode loop: ``generate`` prefills (dense) and stops; then ``call`` (a compiled
    decode step, see :func:`decode_call`) runs ``warmup + steps`` greedy steps straight on generate's
    StaticCache, with the same inputs generate gives it (one token per sequence, a (B, 1, 1, S_max) boolean
    mask, the token's position) and nothing else per step: no logits processors, no stopping checks, no host
    synchronisation.

    The prompt fills ``context - warmup - steps - 1`` positions and the static cache is ``context`` long (the
    length generate uses in :func:`time_generate`, so the same compiled graph serves both loops).
    forced: (B, >= warmup + steps) tokens to feed instead of the greedy ones (teacher forcing: two systems
    then see identical inputs and their argmaxes can be compared step by step).
    around_steps: a context manager entered for the measured steps only (e.g. a torch.profiler.profile).
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    total = warmup + steps
    prompt = _prompt_length(context, total + 1)  # the static cache then holds exactly ``context`` (as generate's)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), device=device, generator=generator)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=total + 1, do_sample=False,
                  cache_implementation="static", return_dict_in_generate=True,
                  stopping_criteria=StoppingCriteriaList([_StopAfterPrefill()]))  # fmt: skip
    if prefill_chunk and hasattr(GenerationConfig(), "prefill_chunk_size"):
        kwargs["prefill_chunk_size"] = prefill_chunk
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
        cache = out.past_key_values
        # transformers 5.25 renamed forward's past_key_values to cache (the old name warns, and goes in 5.40)
        parameters = inspect.signature(model.forward).parameters
        cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # generate passes logits_to_keep=1 to a forward that takes it: the same keywords here, else the compiled
        # step's guards (on the keyword count) fail and the whole model compiles a second time for this loop
        same_as_generate = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        # (B, 1): the token prefill chose, in a fresh buffer with the strides (1, 1) of every later step's argmax
        # (the compiled step guards on strides: a slice of sequences would compile the whole model a second time;
        # .contiguous() keeps a B=1 slice's stride (prompt + 1, 1), as a size-1 dim is contiguous whatever its stride)
        token = out.sequences[:, prompt:].to(device).clone(memory_format=torch.contiguous_format)
        length = cache.layers[0].keys.shape[-2]  # = context (see the prompt length above)
        mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
        mask[..., :prompt] = True
        # Each step's position, passed explicitly: some decoders (OPT) derive positions from a 2-D attention mask
        # when given none, and the 4-D mask here would give them 4-D positions. No padding: the same for all rows.
        # One (B, 1) tensor per step with generate's strides (1, 1), made before the timed steps: a slice of one
        # (B, total) tensor has other strides, and the compiled step's stride guard would compile a second graph.
        positions = [torch.full((batch, 1), prompt + step, dtype=torch.long, device=device) for step in range(total)]
        if forced is not None:
            forced = forced.to(device)  # once: a host-to-device copy per step would sit in the timed loop
        inputs, argmax, logits = [], [], []
        start = end = None
        around = around_steps if around_steps is not None else contextlib.nullcontext()
        for step in range(total):
            if step == warmup:
                around.__enter__()
                graphs_before, skips_before = _graphs_and_skips()
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                else:
                    start = time.perf_counter()
            if forced is not None:
                token = forced[:, step : step + 1]
            mask[..., prompt + step] = True
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            step_logits = call(
                input_ids=token,
                **{cache_argument: cache},
                attention_mask=mask,
                position_ids=positions[step],
                use_cache=True,
                return_dict=True,
                **same_as_generate,
            ).logits
            inputs.append(token)
            token = step_logits[:, -1].argmax(-1, keepdim=True)
            argmax.append(token)
            if step >= warmup and step - warmup < keep_logits:
                logits.append(step_logits[:, -1].float().clone())
        if device.type == "cuda":
            end.record()
            end.synchronize()
            around.__exit__(None, None, None)
            ms = start.elapsed_time(end) / steps
        else:
            ms = 1e3 * (time.perf_counter() - start) / steps
            around.__exit__(None, None, None)
    graphs_after, skips_after = _graphs_and_skips()
    return LeanRun(
        ms_per_step=ms,
        graphs_compiled=graphs_after - graphs_before,
        cudagraph_skips=skips_after - skips_before,
        inputs=torch.cat(inputs, 1).cpu(),
        argmax=torch.cat(argmax, 1)[:, warmup:].cpu(),
        logits=torch.stack(logits, 1) if logits else torch.empty(0),
    )


_FLUSH_BYTES = 256 * 2**20  # > 5x the L2 of an H100 / H200 (50 MB)


def require_cuda(script: str) -> None:
    """Exit with a message naming ``script`` when no CUDA GPU is visible: the GPU-only benchmarks and probes call
    this after parsing their arguments, so ``--help`` works anywhere and a CPU run says why it stops."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{Path(script).name} needs a CUDA GPU; torch {torch.__version__} sees none")


def time_kernel(run, *, warmup_ms: float = 25, rep_ms: float = 100, device="cuda") -> float:
    """Median ms of ``run()`` (a CUDA graph's replay, or any GPU work) with a cold but clean L2 before each call.

    triton's ``do_bench`` empties the L2 by writing a 256 MB buffer, which leaves the L2 full of dirty lines:
    the timed call then writes up to 50 MB back to memory as it reads its own data, ~10 us on an H100 that a
    kernel inside a decode step does not pay (benchmarks/results/attention_flush_h100_s11.log: every row, ours and cuDNN
    alike, 8-10 us faster with a clean flush). Here the flush READS 256 MB instead: the call still finds none
    of its data in the L2, and nothing to write back.
    """
    flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    sink = torch.empty((), dtype=torch.int64, device=device)

    def cold():
        torch.sum(flush, dim=0, out=sink)

    run()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cold()
        run()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)  # ms per flush + call
    for _ in range(max(1, int(warmup_ms / estimate))):
        cold()
        run()
    repeats = max(5, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for begin, finish in zip(starts, ends):
        cold()
        begin.record()
        run()
        finish.record()
    torch.cuda.synchronize(device)
    return statistics.median(begin.elapsed_time(finish) for begin, finish in zip(starts, ends))


def graphed(fn):
    """``fn`` captured in a CUDA graph, returned as the graph's replay: one call first (compiles, warms caches), one on
    a side stream (as capture wants), then the capture."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device="cuda") -> float:
    """Bytes/s of a 2 GiB device-to-device copy (bytes read + written): the rate the byte floor is taken at."""
    source = torch.empty(2**30, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    ms = time_kernel(lambda: target.copy_(source), warmup_ms=50, rep_ms=300, device=device)
    return 2 * source.numel() * source.element_size() / (ms * 1e-3)


def step_floor_ms(
    model, batch: int, context: int, density: float | None, bandwidth: float, mlp_density: float = 1.0
) -> float:
    """Bytes one decode step must read (weights without the embedding table + KV read + the routers that run) /
    bandwidth.

    density: attention density (None = dense); mlp_density: share of MLP neurons read in layers >= 1. The routers
    are those ``random_routers`` gives the bench: an attention router in each layer >= 1 when fewer than all
    groups are kept, and an MLP router of the default rank in each layer >= 1 when mlp_density < 1 (for
    OPT-6.7B 1.3 GB a step, about 10% of its weights: left out before 2026-12-05).
    """
    from polar_compile.model_info import describe_model, sparse_mlp_layers
    from polar_compile.routers.modules import default_mlp_rank, router_parameters

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
    routed = density is not None and groups_for_density(density, info.num_groups) < info.num_groups
    mlp_routed = len([i for i in sparse_mlp_layers(info) if i >= 1]) if mlp_density < 1 else 0
    routers = embedding.element_size() * router_parameters(
        info.hidden_size,
        info.num_groups,
        attention_layers=info.num_layers - 1 if routed else 0,
        mlp_layers=mlp_routed,
        mlp_rank=default_mlp_rank(info.hidden_size),
        intermediate_size=info.intermediate_size or 0,
    )
    return 1e3 * (weights + kv + routers) / bandwidth


def random_routers(model, density: float, mlp_density: float | None = None):
    """Randomly initialised routers for ``model`` (speed work only: recall on random weights is meaningless).

    mlp_density: MLP routers with a flat k-table keeping that share of neurons (an assumption stated in the
    results, since a real k-table needs calibration on real weights).
    """
    from polar_compile.routers.modules import PolarRouters

    mlp = mlp_density is not None
    return PolarRouters.for_model(model, density=density, mlp=mlp, mlp_density=mlp_density)


# "eager": the dense model without torch.compile, lean loop only: a second dense implementation, whose
# teacher-forced argmax agreement with stock is the noise floor for polar-1.0's (bf16 rounding alone).
SYSTEMS = ("stock", "eager", "polar-1.0", "polar-paper", "polar-paper-mlp")


def _oom_hint(chunk: int, context: int) -> str:
    """What an out-of-memory skip suggests: prefill activations grow with the chunk (Llama-2-7B B=32 x 4,096 fits an
    H100 80GB with 256-token chunks, not 1,024). Nothing when the prefill was one piece or already small."""
    if min(chunk, context) <= 256:
        return ""
    return f"; prefill ran in chunks of up to {min(chunk, context)} tokens: a smaller --prefill-chunk may fit"


def run(
    models,
    batches,
    contexts,
    systems,
    *,
    new_tokens: int,
    bandwidth: float,
    csv_path: Path | None = None,
    mlp_density: float = 0.3,
    device: str = "cuda",
    prefill_chunk: int = 1024,
    loops: tuple[str, ...] = ("generate", "lean"),
    budget_s: float | None = None,
    missing_only: bool = False,
    skinny_linears: bool = True,
) -> list[DecodeResult]:
    """Measure each system on each grid point, in each loop. prefill_chunk: chunked prefill size (0: one
    piece). The stock and eager systems prefill models in NO_CHUNKED_PREFILL in one piece (prefill_chunk_for).

    budget_s: wall-clock seconds for the whole grid. A system is not started when the time spent so far plus the
    longest any system has taken in this run would exceed it (each compiles the whole model: minutes on a GPU); the
    systems of the point that did finish are still written, and the grid stops there.
    missing_only: skip a point whose rows for every system and loop asked for are already in csv_path for this
    GPU, so that successive runs (and sessions) fill a grid that one run cannot.
    skinny_linears: the polar systems' backend option of that name (False: every linear on cuBLAS, for an A/B; the
    polar systems' rows are then named with a "+cublas" suffix, e.g. "polar-1.0+cublas", so that the two arms of
    the A/B never pass for one another in a CSV)."""
    import polar_compile
    from polar_compile.backend import compile_reports
    from polar_compile.compiler import restore

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results: list[DecodeResult] = []
    from tqdm import tqdm

    grid = [(m, b, c) for m in models for c in contexts for b in batches]
    done = measured_rows(csv_path, gpu) if missing_only and csv_path is not None else set()
    wanted = [(s, loop) for s in systems for loop in loops if (s, loop) != ("eager", "generate")]
    started, longest, out_of_budget = _clock(), 0.0, False

    def over_budget(what: str) -> bool:
        if budget_s is None or not longest or _clock() - started + longest <= budget_s:
            return False
        print(
            f"budget: {_clock() - started:.0f} of {budget_s:.0f} s spent and a system has taken up to {longest:.0f} s: "
            f"stopping before {what}"
        )
        return True

    for name, batch, context in tqdm(grid, desc="decode grid"):
        if done and all((name, batch, context, row_system(s, skinny_linears), loop) in done for s, loop in wanted):
            print(f"{name} B={batch} S={context}: measured on this GPU already ({csv_path}), skipped")
            continue
        if over_budget(f"{name} B={batch} S={context}"):
            break
        model = build_model(name, context, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
        measured: dict[tuple[str, str], dict] = {}
        stock_lean = None
        for system in systems:
            if over_budget(f"{name} B={batch} S={context} {system}"):
                out_of_budget = True
                break
            system_started = _clock()
            chunk = prefill_chunk_for(model.config.model_type, system, prefill_chunk)
            density, with_mlp = None, False
            torch._dynamo.reset()  # each system compiles afresh (one code object: recompile_limit counts all)
            if system in ("stock", "eager"):
                restore(model)
            else:
                density = 1.0 if system == "polar-1.0" else PAPER_DENSITY[name]
                with_mlp = system == "polar-paper-mlp"
                routers = random_routers(model, density, mlp_density if with_mlp else None)
                config = SparsityConfig(attention_density=density, mlp="on" if with_mlp else "off")
                options = None if skinny_linears else {"triton.cudagraphs": True, "polar.skinny_linears": False}
                polar_compile.optimize(model, routers, config, options=options)
            common = dict(density=density, mlp_share=mlp_density if with_mlp else 1.0)
            try:
                if "generate" in loops and system != "eager":
                    ms, graphs, skips, tokens = time_generate(model, batch, context, new_tokens, chunk)
                    measured[system, "generate"] = dict(common, ms=ms, graphs=graphs, skips=skips, tokens=tokens)
                if "lean" in loops:
                    forced = None if stock_lean is None else stock_lean.inputs
                    call = model.__call__ if system == "eager" else decode_call(model)
                    lean = lean_decode(
                        model, call, batch, context, new_tokens, forced=forced,
                        keep_logits=4, prefill_chunk=chunk,
                    )  # fmt: skip
                    agree = error = float("nan")
                    if system == "stock":
                        stock_lean = lean
                    elif stock_lean is not None:
                        agree = (lean.argmax == stock_lean.argmax).float().mean().item()
                        reference = stock_lean.logits
                        error = ((lean.logits - reference).abs().max() / reference.std()).item()
                    measured[system, "lean"] = dict(
                        common, ms=lean.ms_per_step, graphs=lean.graphs_compiled, skips=lean.cudagraph_skips,
                        tokens=lean.argmax, agree=agree, error=error,
                    )  # fmt: skip
            except torch.OutOfMemoryError as error:
                detail = ". ".join(str(error).split(". ")[:2])  # "CUDA out of memory. Tried to allocate X GiB"
                hint = _oom_hint(chunk, context)
                print(f"{name} B={batch} S={context} {system}: out of memory ({detail}), skipped{hint}")
                torch.cuda.empty_cache()
                for key in [key for key in measured if key[0] == system]:
                    del measured[key]  # a loop measured before the other ran out: drop both, keep the other systems
                continue
            finally:
                took = _clock() - system_started
                longest = max(longest, took)
                for key in measured:
                    if key[0] == system:
                        measured[key]["seconds"] = took
            rewritten = "-"
            if system not in ("stock", "eager"):
                counters = compile_reports[-1].counters
                rewritten = f"{counters.get('attention', 0)}/{counters.get('mlp', 0)}"
                print(polar_compile.explain(model))
            for key in measured:
                if key[0] == system:
                    measured[key]["rewritten"] = rewritten
        restore(model)
        del model
        torch._dynamo.reset()  # this process owns its compiles: drop the grid point's graphs and guards
        if device == "cuda":
            torch.cuda.empty_cache()
        rows = []
        for (system, loop), m in measured.items():
            stock = measured.get(("stock", loop))
            dense_ms = measured.get(("polar-1.0", loop), {}).get("ms", float("nan"))
            agree = float("nan") if stock is None else (m["tokens"] == stock["tokens"]).float().mean().item()
            floor = step_floor_ms_cached(name, batch, context, m["density"], bandwidth, m["mlp_share"])
            rows.append(
                DecodeResult(
                    gpu=gpu, model=name, system=row_system(system, skinny_linears), loop=loop, batch=batch,
                    context=context,
                    density=1.0 if m["density"] is None else m["density"], mlp_density=m["mlp_share"],
                    new_tokens=new_tokens, ms_per_step=round(m["ms"], 3), tokens_per_s=round(1e3 * batch / m["ms"], 1),
                    floor_ms=round(floor, 3), fraction_of_floor=round(floor / m["ms"], 3),
                    speedup_vs_polar_dense=round(dense_ms / m["ms"], 3),
                    speedup_vs_stock=round((stock or {}).get("ms", float("nan")) / m["ms"], 3),
                    graphs_compiled_measured=m["graphs"], cudagraph_skips=m["skips"],
                    tokens_equal_to_stock=round(agree, 4), argmax_equal_forced=round(m.get("agree", float("nan")), 4),
                    logit_error=round(m.get("error", float("nan")), 5), layers_rewritten=m["rewritten"],
                    torch_version=torch.__version__, date=datetime.date.today().isoformat(),
                    system_s=round(m["seconds"], 1),
                )
            )  # fmt: skip
        results += rows
        if csv_path is not None and rows:
            append_csv(csv_path, rows)
        if out_of_budget:
            break
    return results


def row_system(system: str, skinny_linears: bool = True) -> str:
    """The system's name in a CSV row: a polar system run with every linear on cuBLAS gets "+cublas"."""
    return system if skinny_linears or system in ("stock", "eager") else f"{system}+cublas"


def _clock() -> float:
    return time.monotonic()


def measured_rows(csv_path: Path, gpu: str) -> set[tuple[str, int, int, str, str]]:
    """(model, batch, context, system, loop) of every row of ``gpu`` in a decode CSV (empty if there is none)."""
    if not Path(csv_path).exists():
        return set()
    with open(csv_path, newline="") as handle:
        return {
            (row["model"], int(row["batch"]), int(row["context"]), row["system"], row["loop"])
            for row in csv.DictReader(handle)
            if row["gpu"] == gpu
        }


_floor_cache: dict = {}


def step_floor_ms_cached(name, batch, context, density, bandwidth, mlp_density=1.0) -> float:
    key = (name, batch, context, density, bandwidth, mlp_density)
    if key not in _floor_cache:
        model = build_model(name, context, device="meta")
        _floor_cache[key] = step_floor_ms(model, batch, context, density, bandwidth, mlp_density)
    return _floor_cache[key]


def check_csv(path: Path, row_type) -> None:
    """ValueError unless ``append_csv`` can append rows of the dataclass ``row_type`` at ``path``, checked before a
    run, not after its work: not a folder, its nearest existing parent a folder (the missing ones are created), the
    file appendable or its parent writable, and no columns in the file that the rows lack."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--csv {path} is a folder: name a file in it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--csv {path}: {parent} is a file, not a folder")
    if not path.exists():
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--csv {path}: cannot create it, {parent} is not writable")
        return
    try:
        open(path, "a").close()
    except OSError as error:
        raise ValueError(f"--csv {path}: cannot append to it ({error.strerror})") from None
    if not path.stat().st_size:
        return
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    fields = {f.name for f in dataclasses.fields(row_type)}
    missing = [name for name in header if name not in fields]
    if missing:
        shown = ", ".join(repr(name[:40] + ("..." if len(name) > 40 else "")) for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{path} has columns [{shown}]{more} that these rows lack: is it another kind of CSV? write "
                         "to another file (--csv)")  # fmt: skip


def append_csv(path: Path, rows: list) -> None:
    """Append dataclass rows, or dict rows with the same keys in the same order, to a CSV file (header written
    when the file is new).

    A file written before the row type gained columns is rewritten once with the new header (its rows get
    empty values there); a file whose columns are not a subset of the rows' raises ValueError instead of
    mixing two layouts under one header.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [row if isinstance(row, dict) else asdict(row) for row in rows]
    fields = list(rows[0])
    if any(list(row) != fields for row in rows):
        raise ValueError("append_csv rows must all have the same columns in the same order")
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header, old_rows = list(reader.fieldnames or []), list(reader)
        if header != fields:
            missing = [name for name in header if name not in fields]
            if missing:
                raise ValueError(f"{path} has columns {missing} that the rows lack: write to another file")
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(old_rows)
    new = not path.exists() or not path.stat().st_size
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def print_table(results: list[DecodeResult]) -> None:
    header = f"{'model':<11}{'B':>5}{'ctx':>6} {'system loop':<16}{'ms/step':>9}{'tok/s':>9}{'floor%':>8}"
    header += f"{'vs dense':>9}"
    print(header + f"{'vs stock':>9}{'graphs':>7}{'skips':>6}{'=stock':>8}{'=forced':>8}{'rewritten':>10}{'s':>7}")
    for r in results:
        print(
            f"{r.model:<11}{r.batch:>5}{r.context:>6} {r.system + ' ' + r.loop[:3]:<16}{r.ms_per_step:>9.2f}"
            f"{r.tokens_per_s:>9.0f}"
            f"{100 * r.fraction_of_floor:>7.0f}%{r.speedup_vs_polar_dense:>8.2f}x{r.speedup_vs_stock:>8.2f}x"
            f"{r.graphs_compiled_measured:>7}{r.cudagraph_skips:>6}{100 * r.tokens_equal_to_stock:>7.1f}%"
            f"{100 * r.argmax_equal_forced:>7.1f}%{r.layers_rewritten:>10}{r.system_s:>7.0f}"
        )


def add_bench_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="llama3-8b", help=f"comma list of {','.join(MODEL_SHAPES)}")
    parser.add_argument("--batch", default="64", help="comma list of batch sizes")
    parser.add_argument("--context", default="4096", help="comma list of context lengths (tokens at decode)")
    parser.add_argument("--systems", default="stock,polar-1.0,polar-paper", help=f"comma list of {','.join(SYSTEMS)}")
    parser.add_argument("--mlp-density", type=float, default=0.3, help="MLP share kept by polar-paper-mlp")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="tokens each sequence generates; the median decode step is reported (prefill excluded; "
                        "the prompt is sized so the cache ends at --context tokens)")  # fmt: skip
    parser.add_argument("--loops", default="generate,lean", help="comma list of generate,lean")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="bytes/s for the floor (default: measured, a 2 GiB device-to-device copy)")  # fmt: skip
    parser.add_argument("--csv", default="benchmarks/results/decode.csv",
                        help="CSV the rows are appended to (default: %(default)s, under the current folder; '' for "
                        "none)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop before a system that would not finish within this many seconds (judged by the "
                             "longest one so far); the finished ones are written")  # fmt: skip
    parser.add_argument("--prefill-chunk", type=int, default=1024,
                        help="tokens per sequence a prefill chunk holds (untimed; a smaller one needs less memory "
                             "at large B x context; 0: one piece); OPT's stock, eager: one piece")  # fmt: skip
    parser.add_argument(
        "--no-skinny-linears",
        action="store_true",
        help="polar systems leave every linear to cuBLAS (an A/B of polar::skinny_linear and skinny_gated_linear; "
        "rows: polar-1.0+cublas, ...)",
    )
    parser.add_argument(
        "--missing-only",
        action="store_true",
        help="skip grid points this GPU already has rows for in --csv (fill a grid over several runs)",
    )
    parser.set_defaults(func=_main)


def _positive_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma list of whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes numbers >= 1, got {text!r}")
    return values


def _main(args) -> int:
    """The subcommand; a bad argument ends it with one line naming the problem, before any GPU work."""
    try:
        return _run_bench(args)
    except ValueError as error:
        raise SystemExit(f"polar-compile bench: {error}") from None


def _run_bench(args) -> int:
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    models = args.models.split(",")
    unknown = set(models) - set(MODEL_SHAPES)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {sorted(MODEL_SHAPES)}")
    loops = tuple(args.loops.split(","))
    unknown = set(loops) - {"generate", "lean"}
    if unknown:
        raise ValueError(f"unknown loops {sorted(unknown)}; choose from generate, lean")
    batches, contexts = _positive_ints("--batch", args.batch), _positive_ints("--context", args.context)
    if args.new_tokens < 3:
        raise ValueError(f"--new-tokens must be >= 3 (the first token comes from the prefill, and a step is timed "
                         f"between two others), got {args.new_tokens}")  # fmt: skip
    decoded = args.new_tokens + (LEAN_WARMUP + 1 if "lean" in loops else 0)  # lean: its warm-up steps, and one more
    if min(contexts) <= decoded:
        raise ValueError(f"--context {min(contexts)} leaves no prompt: with --new-tokens {args.new_tokens} "
                         f"and loops {','.join(loops)} every context must be at least {decoded + 1}")  # fmt: skip
    if not 0 < args.mlp_density <= 1:
        raise ValueError(f"--mlp-density must be in (0, 1], got {args.mlp_density}")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise ValueError(f"--bandwidth must be > 0 bytes/s, got {args.bandwidth}")
    if args.budget_s is not None and not args.budget_s > 0:
        raise ValueError(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 0 tokens (0: one piece), got {args.prefill_chunk}")
    if args.missing_only and not args.csv:
        raise ValueError("--missing-only reads the rows already measured from --csv: give a CSV path")
    if args.csv:
        check_csv(Path(args.csv), DecodeResult)
    if not torch.cuda.is_available():
        raise ValueError("it measures GPU decode speed: no CUDA device found")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 8))
    bandwidth = args.bandwidth
    if bandwidth is None:
        bandwidth = copy_bandwidth()
        torch.cuda.empty_cache()  # its 4 GiB of buffers back to the GPU: a large static cache needs every GiB
        name = torch.cuda.get_device_name()
        print(f"{name}: device copy {bandwidth / 1e12:.2f} TB/s (read + write), the rate of the byte floor")
    results = run(
        models,
        batches,
        contexts,
        systems,
        new_tokens=args.new_tokens,
        bandwidth=bandwidth,
        csv_path=Path(args.csv) if args.csv else None,
        mlp_density=args.mlp_density,
        prefill_chunk=args.prefill_chunk,
        loops=loops,
        budget_s=args.budget_s,
        missing_only=args.missing_only,
        skinny_linears=not args.no_skinny_linears,
    )
    print_table(results)
    return 0
