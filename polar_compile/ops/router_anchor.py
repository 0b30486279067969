"""``polar::router_anchor`` / ``polar::mlp_anchor``: markers that carry a layer's routers into the traced graph.

``optimize`` puts a forward pre-hook on each sparse layer's q projection. While Dynamo traces (never in
eager mode), the hook passes the q projection's input through this op together with the router's weight
and bias and two ints: the layer index and k (groups kept per sequence); a dense layer passes no router and
k = G (every group, through the same kernel). That way:

- the router parameters reach the compiled graph as ordinary graph inputs owned by the model (``.to()``,
  dtype changes and re-loaded routers are simply new inputs; nothing is registered globally);
- k is a constant in the graph, so Dynamo guards on it and a graph compiled for one density is never
  reused for another;
- the pass finds "this layer's router input" as a node instead of guessing from names.

It is a ``custom_op`` (opaque) on purpose: it must survive Dynamo untouched until the polar passes run,
and they always remove it (``passes/remove_anchors.py``). If it ever executes, it is an identity (clone).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("polar::router_anchor", mutates_args=())
def router_anchor(
    hidden: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, layer: int, k: int
) -> torch.Tensor:
    """hidden (..., d): the q projection's input; weight (G, d), bias (G,): the layer's router; returns hidden.

    weight None marks a dense layer whose attention goes through the polar kernel with all k = G groups."""
    return hidden.clone()


@router_anchor.register_fake
def _(hidden, weight, bias, layer, k):
    return torch.empty_like(hidden)


@torch.library.custom_op("polar::mlp_anchor", mutates_args=())
def mlp_anchor(
    hidden: torch.Tensor, down_rank: torch.Tensor, up_rank: torch.Tensor, up_bias: torch.Tensor, layer: int, k: int
) -> torch.Tensor:
    """hidden (..., d): the MLP's input; the MLP router is d -> r (down_rank (r, d)) -> F (up_rank (F, r),
    up_bias (F,)); k: neurons kept for this batch size. Returns hidden (same role as router_anchor)."""
    return hidden.clone()


@mlp_anchor.register_fake
def _(hidden, down_rank, up_rank, up_bias, layer, k):
    return torch.empty_like(hidden)


def _pass_gradient_through(ctx, grad):
    # Only a caller's own torch.compile of an optimized model ever runs these ops with autograd (the hooks mark
    # tensors only while Dynamo traces); in training the marker is the identity it is at run time.
    return grad, *(None,) * ctx.extra_inputs


def _count_extra_inputs(ctx, inputs, output):
    ctx.extra_inputs = len(inputs) - 1


router_anchor.register_autograd(_pass_gradient_through, setup_context=_count_extra_inputs)
mlp_anchor.register_autograd(_pass_gradient_through, setup_context=_count_extra_inputs)
