"""Remove every router anchor left in the graph: the q projection reads its input directly again."""

from __future__ import annotations

from torch.fx import GraphModule

from polar_compile.passes.context import PassContext, anchors, mlp_anchors


def remove_anchors(gm: GraphModule, ctx: PassContext) -> int:
    """Replace each router / MLP anchor by its input; returns how many were removed."""
    count = 0
    for anchor in [*anchors(gm), *mlp_anchors(gm)]:
        anchor.replace_all_uses_with(anchor.args[0])
        gm.graph.erase_node(anchor)
        count += 1
    ctx.counters["anchors_removed"] += count
    return count
