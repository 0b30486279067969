"""The ``polar`` torch.compile backend: run the polar passes on the Dynamo graph, then inductor.

    torch.compile(model, backend="polar", mode="reduce-overhead")     # CUDA graphs, like inductor
    torch.compile(model, backend="polar", options={"polar.inductor": False})  # rewritten graph, no inductor

``mode`` and ``options`` mean what they mean for inductor (torch.compile accepts one or the other);
the one polar option, ``"polar.inductor": False``, runs the rewritten FX graph as is (for debugging and CPU
evaluation). The name is registered through the ``torch_dynamo_backends`` entry point; only when that
entry point is absent (running from a source tree without installing) is it registered here, so it is
never registered twice.

The passes work on the graph *before* AOT autograd, where each SDPA is still one
``scaled_dot_product_attention`` node (after AOT it becomes a device-specific aten op).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from polar_compile.passes import LayerReport, PassContext, run_passes
from polar_compile.passes.fuse_projections import check_layout

logger = logging.getLogger("polar_compile.backend")

BACKEND_NAME = "polar"
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class GraphReport:
    """What the passes did to one compiled graph."""

    counters: dict[str, int]
    layers: tuple[LayerReport, ...]
    inductor: bool


# The reports of the most recent compilations, for ``polar_compile.explain`` (diagnostics only).
compile_reports: deque[GraphReport] = deque(maxlen=32)


def polar_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options=None):
    """Rewrite ``gm`` with the polar passes, then compile it with inductor (or not, see module doc)."""
    if mode not in _MODES:
        raise ValueError(f"polar backend: unknown mode {mode!r}; expected one of {_MODES[1:]}")
    options = dict(options or {})
    use_inductor = bool(options.pop("polar.inductor", True))
    ctx = run_passes(gm, PassContext(example_inputs=list(example_inputs)))
    report = GraphReport(dict(ctx.counters), tuple(ctx.layers), use_inductor)
    compile_reports.append(report)
    logger.info("polar passes: %s", report.counters)
    if not use_inductor:
        return _checked(gm.forward, tuple(ctx.layout_checks))
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = {**list_mode_options(mode or "default"), **options}
    return _checked(compile_fx(gm, example_inputs, config_patches=config_patches), tuple(ctx.layout_checks))


def _checked(compiled, checks):
    """``compiled``, checking first that fused projections still share their packed buffer (see fuse_projections)."""
    if not checks:
        return compiled

    def call(*args):  # Dynamo calls a backend's result with the graph inputs as positional arguments
        check_layout(args, checks)
        return compiled(*args)

    # keep what inductor attached to its result (its serialiser), but not a boxed-call flag this wrapper breaks
    call.__dict__.update({key: value for key, value in vars(compiled).items() if key != "_boxed_call"})
    return call


def ensure_registered() -> None:
    """Make ``backend="polar"`` resolvable: through the entry point when installed, else registered here once."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):  # includes entry-point backends not yet loaded
        register_backend(name=BACKEND_NAME)(polar_backend)
