"""The polar rewrites, in the order they run. Each is ``(gm, ctx) -> int`` (rewrites made).

``remove_anchors`` runs after every rewrite that reads anchors: each anchor a rewrite did not consume is
removed, so the graph handed to inductor never contains the marker op. ``fuse_gate_up`` runs next (a dense gated
MLP it takes is then no pair of linears to pack), ``fuse_projections`` after them, when q, k and v read the same node
again; ``skinny_linears`` last, on the linears as they will run.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

import polar_compile.ops.router_anchor  # noqa: F401  (registers torch.ops.polar.router_anchor)
from polar_compile.passes.context import LayerReport, PassContext
from polar_compile.passes.fuse_gate_up import fuse_gate_up
from polar_compile.passes.fuse_projections import fuse_projections
from polar_compile.passes.remove_anchors import remove_anchors
from polar_compile.passes.rewrite_attention import rewrite_attention
from polar_compile.passes.rewrite_mlp import rewrite_mlp
from polar_compile.passes.skinny_linears import skinny_linears

Pass = Callable[[GraphModule, PassContext], int]

PASSES: tuple[Pass, ...] = (
    rewrite_attention,
    rewrite_mlp,
    remove_anchors,
    fuse_gate_up,
    fuse_projections,
    skinny_linears,
)


def run_passes(gm: GraphModule, ctx: PassContext | None = None) -> PassContext:
    """Run every pass in order on ``gm`` (in place), lint and recompile it; returns the context."""
    ctx = ctx or PassContext()
    for rewrite in PASSES:
        ctx.counters[f"pass:{rewrite.__name__}"] += rewrite(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return ctx


__all__ = ["PASSES", "LayerReport", "PassContext", "run_passes"]
