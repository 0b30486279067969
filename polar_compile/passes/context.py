"""What the passes share: counters, a per-layer report of what was rewritten (or why not), and graph helpers."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger("polar_compile.passes")

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)

# Dynamo records the packet (torch.ops.polar.router_anchor) when the hook calls it; accept the overload too.
ANCHOR_TARGETS = (torch.ops.polar.router_anchor, torch.ops.polar.router_anchor.default)
MLP_ANCHOR_TARGETS = (torch.ops.polar.mlp_anchor, torch.ops.polar.mlp_anchor.default)
LINEAR_TARGETS = (torch._C._nn.linear, F.linear)  # an nn.Linear in the Dynamo graph
_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu"}


@dataclass(frozen=True)
class LayerReport:
    layer: int
    component: str  # "attention" | "mlp"
    rewritten: bool
    detail: str  # what was done (k of G groups ...) or the reason it stayed dense
    groups: tuple[int, int] | None = None  # attention on the polar kernel: (k, G) groups a sequence reads


@dataclass
class PassContext:
    """Per-graph state: counters by rewrite name, layer reports, and what kind of step the graph is."""

    counters: Counter = field(default_factory=Counter)
    layers: list[LayerReport] = field(default_factory=list)
    example_inputs: list | None = None  # the backend's real inputs, one per placeholder (None: not known)
    layout_checks: list = field(default_factory=list)  # fuse_projections.LayoutCheck, checked before every call
    skinny_linears: bool = True  # the skinny_linears pass runs (backend option "polar.skinny_linears")

    def rewritten(self, layer: int, component: str, detail: str, groups: tuple[int, int] | None = None) -> None:
        self.layers.append(LayerReport(layer, component, True, detail, groups))
        logger.debug("layer %d %s: rewritten (%s)", layer, component, detail)

    def dense_kernel(self, layer: int, detail: str, groups: int | None = None) -> None:
        """A dense layer whose attention now runs on the polar kernel with every group (not a sparse rewrite)."""
        self.layers.append(LayerReport(layer, "attention", False, detail, None if groups is None else (groups, groups)))
        logger.debug("layer %d attention: dense on the polar kernel (%s)", layer, detail)

    def left_dense(self, layer: int, component: str, reason: str) -> None:
        self.layers.append(LayerReport(layer, component, False, reason))
        logger.info("layer %d %s left dense: %s", layer, component, reason)


def anchors(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if is_anchor(node)]


def is_anchor(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ANCHOR_TARGETS


def mlp_anchors(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_mlp_anchor(n)]


def is_mlp_anchor(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in MLP_ANCHOR_TARGETS


def is_sdpa(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in SDPA_TARGETS


def query_lengths(gm: torch.fx.GraphModule) -> set[int]:
    """Query lengths T of the graph's attention calls: {1} for a decode step (an SDPA already replaced by
    ``polar::selective_attention`` counts as 1: the attention pass only rewrites single-token steps)."""
    lengths = set()
    for node in gm.graph.nodes:
        if is_sdpa(node):
            query = example_value(node.args[0] if node.args else node.kwargs.get("query"))
            lengths.add(int(query.shape[-2]) if query is not None else -1)
        elif node.op == "call_function" and node.target is _selective_attention():
            lengths.add(1)
    return lengths


def _selective_attention():
    import polar_compile.ops.selective_attention  # noqa: F401  (registers the op)

    return torch.ops.polar.selective_attention.default


def example_value(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for ``node`` (None for non-tensors and non-nodes)."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def is_linear(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in LINEAR_TARGETS


def linear_parts(node: torch.fx.Node):
    """(input, weight, bias) of a linear node; bias None when absent."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], weight, bias


def single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def activation(node) -> str | None:
    """ "relu", "silu" or "gelu" (exact) when ``node`` applies that activation, else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _ACTIVATIONS):
        return None
    name = _ACTIVATIONS[node.target]
    if name == "gelu" and node.kwargs.get("approximate", "none") != "none":
        return None  # tanh-approximate gelu is not the kernel's exact gelu
    return name
