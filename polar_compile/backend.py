"""The ``polar`` torch.compile backend: run the polar passes on the Dynamo graph, then inductor.

    torch.compile(model, backend="polar", mode="reduce-overhead")     # CUDA graphs, like inductor
    torch.compile(model, backend="polar", options={"polar.inductor": False})  # rewritten graph, no inductor

``mode`` and ``options`` mean what they mean for inductor (torch.compile accepts one or the other), plus
three polar options:

- ``"polar.inductor": False`` runs the rewritten FX graph as is (for debugging and CPU evaluation);
- ``"polar.blas"``: which BLAS library the compiled graph's GEMMs call on CUDA. ``"cublaslt"`` (default) sets
  ``torch.backends.cuda.preferred_blas_library("cublaslt")`` for the duration of each call of the compiled graph
  and puts the previous choice back after it (so the rest of the process is untouched; with CUDA graphs the
  choice is baked in when the graph is captured); ``"torch"`` leaves torch's own setting. At decode batch sizes
  cuBLASLt's kernels read the weights faster: one decode step's GEMMs in a CUDA graph, Llama-2-7B M=32, 3.45 ->
  3.61 TB/s on an H200 and 2.53 -> 2.54 on an H100 (Llama-3-8B M=64: 3.43 -> 3.61 and 2.56 -> 2.63); the whole
  decode step (H200, Llama-2-7B B=32 ctx 1024, lean loop) 8.64 / 8.58 -> 8.46 / 8.41 ms
  (benchmarks/results/probe_blas_s9.log, probe_blas_e2e_h200_s9.log). At M = 128 it still led on an H100 (Qwen2-7B's
  linears 2.49 against 2.41 TB/s; the B=128 x 1,024 dense step 9.02 against 9.15 ms), and at B=256 the two steps were
  even (12.54 / 12.49 ms; results/blas_m128_h100_s49.log). The set and restore cost ~1 us of host time a call.
  torch logs once that the setting is "an experimental feature".
- ``"polar.skinny_linears"`` (default True): the narrow linears of a decode step (attention output and MLP down
  projections at 9-16 rows) run on ``polar::skinny_linear`` where it was measured faster than cuBLAS
  (``polar_compile/passes/skinny_linears.py``), and a dense gated MLP's gate, up and SiLU-mul at 9-64 rows on
  ``polar::skinny_gated_linear`` (``passes/fuse_gate_up.py``); False leaves every linear to cuBLAS.

On CUDA the graph is compiled with inductor's ``combo_kernels`` on (horizontal fusion: independent small kernels,
such as a layer's rotary + cache writes and transformers' cache-length add, share one launch), unless the options
set ``"combo_kernels"`` themselves. The lean decode step, polar 1.0, Llama-3-8B 16 x 1,024 on an H100: 6.78 -> 6.69
ms (benchmarks/results/decode_gate_up_ab_h100_s39.log). Inductor marks the feature experimental: should a graph fail
to compile with it, the backend logs a warning and compiles the graph again without it.

The name is registered through the ``torch_dynamo_backends`` entry point; only when that
entry point is absent (running from a source tree without installing) is it registered here, so it is
never registered twice.

The passes work on the graph *before* AOT autograd, where each SDPA is still one
``scaled_dot_product_attention`` node (after AOT it becomes a device-specific aten op).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from polar_compile.passes import LayerReport, PassContext, run_passes
from polar_compile.passes.context import is_sdpa
from polar_compile.passes.fuse_projections import check_layout

logger = logging.getLogger("polar_compile.backend")

BACKEND_NAME = "polar"
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_BLAS = ("cublaslt", "torch")
# Inductor options a CUDA graph gets unless the caller's options say otherwise (see the module docstring).
_CUDA_INDUCTOR_DEFAULTS = {"combo_kernels": True}


@dataclass(frozen=True)
class GraphReport:
    """What the passes did to one compiled graph."""

    counters: dict[str, int]
    layers: tuple[LayerReport, ...]
    inductor: bool


# The reports of the most recent compilations, for ``polar_compile.explain`` (diagnostics only).
compile_reports: deque[GraphReport] = deque(maxlen=32)
_compiles = [0]  # graphs compiled by this backend in this process (compile_reports keeps only the latest)


def graphs_compiled() -> int:
    """How many graphs the polar backend has compiled in this process (a caller compares two readings)."""
    return _compiles[0]


POLAR_OPTIONS = ("polar.inductor", "polar.blas", "polar.skinny_linears")


def check_options(mode: str | None, options) -> None:
    """Raise ValueError naming what is wrong with a mode or options for the polar backend: an unknown mode, options
    that are not a mapping, an unknown ``polar.*`` key (a typo would otherwise be ignored), a value of the wrong
    type, an inductor option inductor does not have, or inductor options with ``"polar.inductor": False``."""
    import difflib

    if mode not in _MODES:
        raise ValueError(f"polar backend: unknown mode {mode!r}; expected one of {_MODES[1:]}")
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise ValueError(f"polar backend: options must be a dict {{name: value}}, got {type(options).__name__}")
    for key in options:
        if not isinstance(key, str):
            raise ValueError(f"polar backend: option names are strings, got {key!r}")
    unknown = [key for key in options if key.startswith("polar.") and key not in POLAR_OPTIONS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], POLAR_OPTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"polar backend: unknown option {unknown[0]!r}{hint}; the polar options are {POLAR_OPTIONS}")
    for key in ("polar.inductor", "polar.skinny_linears"):
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"polar backend: option {key!r} must be True or False, got {options[key]!r}")
    if options.get("polar.blas", "cublaslt") not in _BLAS:
        raise ValueError(f"polar backend: option 'polar.blas' must be one of {_BLAS}, got {options['polar.blas']!r}")
    others = [key for key in options if not key.startswith("polar.")]
    if others and options.get("polar.inductor", True) is False:
        raise ValueError(f"polar backend: inductor options {others} do nothing with 'polar.inductor': False")
    if others:
        from torch._inductor import config as inductor_config

        known = inductor_config.get_config_copy()
        missing = [key for key in others if key not in known]
        if missing:
            close = difflib.get_close_matches(missing[0], list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"polar backend: inductor has no option {missing[0]!r}{hint}")


def polar_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options=None):
    """Rewrite ``gm`` with the polar passes, then compile it with inductor (or not, see module doc)."""
    check_options(mode, options)
    options = dict(options or {})
    use_inductor = options.pop("polar.inductor", True)
    on_cuda = any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)
    blas = _resolve_blas(options.pop("polar.blas", "cublaslt"), on_cuda)
    skinny = options.pop("polar.skinny_linears", True)
    ctx = run_passes(gm, PassContext(example_inputs=list(example_inputs), skinny_linears=skinny))
    report = GraphReport(dict(ctx.counters), tuple(ctx.layers), use_inductor)
    compile_reports.append(report)
    _compiles[0] += 1
    logger.info("polar passes: %s", report.counters)
    if not report.layers:
        calls = sum(is_sdpa(node) for node in gm.graph.nodes)
        if calls:
            logger.warning(
                "polar backend: a graph with %d attention calls and no polar routers compiles dense: nothing "
                "attached routers to this model (polar_compile.optimize(model, routers) does, before torch.compile "
                "with backend='polar').", calls,
            )  # fmt: skip
    attention = [row for row in report.layers if row.component == "attention"]
    if attention and all(row.groups is None for row in attention) and _symbolic(gm):
        logger.warning(
            "polar backend: a graph with %d polar layers was compiled with symbolic shapes (torch.compile "
            "dynamic=True?) and none could go on the polar kernels (layer %d: %s): it runs dense. Compile with "
            "dynamic=False (polar_compile.optimize does).", len(attention), attention[0].layer, attention[0].detail,
        )  # fmt: skip
    if not use_inductor:
        return _wrapped(gm.forward, tuple(ctx.layout_checks), blas)
    config_patches = inductor_patches(mode, options, on_cuda)
    with preferred_blas(blas):  # anything inductor runs while compiling sees the same library as the calls
        compiled = inductor_compile(gm, example_inputs, config_patches, options)
    return _wrapped(compiled, tuple(ctx.layout_checks), blas)


def inductor_patches(mode: str | None, options: Mapping, on_cuda: bool) -> dict:
    """Inductor's config for a graph: the mode's options, then the caller's (without the polar ones), over the
    CUDA defaults (``_CUDA_INDUCTOR_DEFAULTS``) when the graph runs on CUDA."""
    from torch._inductor import list_mode_options

    defaults = dict(_CUDA_INDUCTOR_DEFAULTS) if on_cuda else {}
    return {**defaults, **list_mode_options(mode or "default"), **options}


def inductor_compile(gm: torch.fx.GraphModule, example_inputs, config_patches: dict, options: Mapping):
    """``compile_fx`` with these patches. A default of ours (in the patches, not in the caller's ``options``) is an
    inductor feature marked experimental: should the compile fail with it, the graph is compiled again without it,
    with a warning, so that it never costs the user the compiled step. Failures with the caller's own options
    propagate."""
    from torch._inductor.compile_fx import compile_fx

    try:
        return compile_fx(gm, example_inputs, config_patches=config_patches)
    except Exception as error:
        ours = sorted(key for key in _CUDA_INDUCTOR_DEFAULTS if key in config_patches and key not in options)
        if not ours:
            raise
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        logger.warning("polar backend: inductor failed with %s on (%s: %s); compiling again without",
                       ours, type(error).__name__, first_line)  # fmt: skip
        return compile_fx(gm, example_inputs, config_patches={k: v for k, v in config_patches.items() if k not in ours})


def _symbolic(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced ``gm`` with symbolic shapes (a SymInt input, or a tensor of symbolic size)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or (
            isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)
        ):
            return True
    return False


def _resolve_blas(blas: str, on_cuda: bool) -> str:
    """The BLAS choice a graph runs with: ``blas`` on CUDA where torch can set it, else "torch" (with a log line
    when cuBLASLt was asked for but this torch build cannot use it)."""
    if blas not in _BLAS:
        raise ValueError(f"polar backend: option 'polar.blas' must be one of {_BLAS}, got {blas!r}")
    if blas == "torch" or not on_cuda:
        return "torch"
    try:
        with preferred_blas(blas):
            pass
    except RuntimeError as error:  # e.g. a build without cuBLASLt
        logger.warning("polar.blas=%r is not available (%s); the GEMMs use torch's default library", blas, error)
        return "torch"
    return blas


@contextlib.contextmanager
def preferred_blas(blas: str):
    """Within the block, torch's preferred CUDA BLAS library is ``blas`` ("torch": unchanged); restored after."""
    if blas == "torch":
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(blas)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def _wrapped(compiled, checks, blas: str):
    """``compiled``, checking first that fused projections still share their packed buffer (see fuse_projections)
    and running it with the chosen BLAS library (see the module docstring)."""
    if not checks and blas == "torch":
        return compiled

    def call(*args):  # Dynamo calls a backend's result with the graph inputs as positional arguments
        check_layout(args, checks)
        with preferred_blas(blas):
            return compiled(*args)

    # keep what inductor attached to its result (its serialiser), but not a boxed-call flag this wrapper breaks
    call.__dict__.update({key: value for key, value in vars(compiled).items() if key != "_boxed_call"})
    return call


def ensure_registered() -> None:
    """Make ``backend="polar"`` resolvable: through the entry point when installed, else registered here once."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):  # includes entry-point backends not yet loaded
        register_backend(name=BACKEND_NAME)(polar_backend)
