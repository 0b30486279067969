"""Replace a decode step's MLP with router -> batch-union top-k -> ``polar::selective_*`` GEMMs.

From each MLP anchor (see ``ops/router_anchor.py``; the anchor marks the MLP input and carries the low-rank
router d -> r -> F and k for this batch size) the pass proves one of three shapes, and nothing else:

    plain:  linear(anchor, W1, b1) -> act -> linear(., W2, b2)                 (OPT: fc1 / relu / fc2)
    gated:  linear(anchor, Wg) -> silu -> mul(., linear(x, Wu)) -> linear(., Wd)   (Llama-style)
    fused:  linear(anchor, Wgu) -> chunk(2, dim=-1) -> silu(one half) * other half -> linear(., Wd)   (Phi-3)

(fused: the half the graph passes through silu is the gate; the ops take the two halves of Wgu as views.)

with act in {relu, gelu (exact), silu} (the kernel also has identity, which the pass does not match). It then
computes, on the (M, d) view of the input:
scores = (x @ R1.T) @ R2.T + b; idx = batch_union_topk(scores, k); h = selective_up / selective_gated_up;
out = selective_down(h, W_down, idx, b_down). Only decode graphs (every SDPA has one query token) are
rewritten; prefill stays dense. The MLP's input, weights, router and the dense graph's own results must share one
dtype (under torch.autocast an fp32 model's linears compute in bf16): otherwise it stays dense, with the dtypes.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from polar_compile.passes.context import (
    PassContext,
    activation,
    example_value,
    is_linear,
    linear_parts,
    mlp_anchors,
    query_lengths,
    single_user,
)


def _halves(node: Node) -> tuple[Node, Node] | None:
    """The two getitems of ``chunk(node, 2, dim=-1)`` when that chunk is node's only use and they its only uses."""
    chunk = single_user(node)
    if not isinstance(chunk, Node) or not chunk.args or chunk.args[0] is not node:
        return None
    if not ((chunk.op == "call_method" and chunk.target == "chunk") or chunk.target is torch.chunk):
        return None
    chunks = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    if chunks != 2 or dim not in (-1, example_value(node).dim() - 1):
        return None
    getitems = {user.args[1]: user for user in chunk.users if user.target is operator.getitem}
    if len(chunk.users) != 2 or set(getitems) != {0, 1}:
        return None
    return getitems[0], getitems[1]


def _match_fused(anchor: Node, first: Node) -> tuple[dict | None, str]:
    _, weight, bias = linear_parts(first)
    halves = _halves(first)
    if halves is None:
        return None, "the first MLP linear is followed neither by an activation nor by chunk(2, dim=-1)"
    gates = [i for i, half in enumerate(halves) if activation(single_user(half)) == "silu"]
    if len(gates) != 1 or bias is not None:
        return None, "a fused gate/up MLP without bias must pass exactly one half through silu"
    gate_half, up_half = halves[gates[0]], halves[1 - gates[0]]
    act_node = single_user(gate_half)
    mul = single_user(act_node)
    down = single_user(mul) if isinstance(mul, Node) else None
    if not (
        isinstance(mul, Node)
        and mul.op == "call_function"
        and mul.target is operator.mul
        and set(mul.args) == {act_node, up_half}
        and single_user(up_half) is mul
        and is_linear(down)
        and down.args[0] is mul
    ):
        return None, "fused gate/up MLP is not silu(gate half) * up half -> linear"
    width = example_value(weight).shape[0] // 2
    if width != example_value(anchor.args[2]).shape[0]:  # the router's up projection: one score per neuron
        return None, "the fused gate/up's halves are not as wide as the router's neurons"
    _, down_weight, down_bias = linear_parts(down)
    dead = [down, mul, act_node, *halves, single_user(first), first]
    return {"kind": "gated", "fused": (weight, gates[0] * width, (1 - gates[0]) * width, width), "down": down,
            "down_parts": (down_weight, down_bias), "dead": dead}, ""  # fmt: skip


def _match(anchor: Node) -> tuple[dict | None, str]:
    hidden, k = anchor.args[0], anchor.args[5]
    if not isinstance(k, int):
        return None, "k is not a constant int in the graph"
    first = single_user(anchor)
    if not is_linear(first) or first.args[0] is not anchor:
        return None, "the MLP input does not feed exactly one linear"
    _, first_weight, first_bias = linear_parts(first)
    act_node = single_user(first)
    act = activation(act_node)
    if act is None:
        return _match_fused(anchor, first)
    follower = single_user(act_node)
    if is_linear(follower):  # plain MLP
        _, down_weight, down_bias = linear_parts(follower)
        return {"kind": "plain", "act": act, "up": (first_weight, first_bias), "down": follower,
                "down_parts": (down_weight, down_bias), "dead": [follower, act_node, first]}, ""  # fmt: skip
    is_mul = isinstance(follower, Node) and follower.op == "call_function" and follower.target is operator.mul
    if act == "silu" and is_mul and first_bias is None:
        other = next((a for a in follower.args if a is not act_node), None)
        down = single_user(follower)
        if is_linear(other) and other.args[0] is hidden and linear_parts(other)[2] is None and is_linear(down):
            _, down_weight, down_bias = linear_parts(down)
            dead = [down, follower, other, act_node, first]
            return {"kind": "gated", "gate": first_weight, "up": (linear_parts(other)[1], None), "down": down,
                    "down_parts": (down_weight, down_bias), "dead": dead}, ""  # fmt: skip
    return None, "MLP is neither linear->act->linear nor silu(gate)*up->down without biases"


def _dtype_reason(anchor: Node, match: dict) -> str | None:
    """Why the MLP's input, weights, router and the dense graph's own results do not share one dtype (None: they
    do). Under ``torch.autocast`` an fp32 model's linears compute in the autocast dtype: the selective ops, handed
    the fp32 input and weights as they are, would not (and the router's linears, autocast at run time, would)."""
    hidden, down_rank, up_rank, up_bias = anchor.args[:4]
    parts = {"input": [hidden], "router": [down_rank, up_rank, up_bias], "weights": [], "results": []}
    for node in match["dead"]:
        if is_linear(node):
            _, weight, bias = linear_parts(node)
            parts["weights"] += [weight, bias]
        parts["results"].append(node)
    dtypes = {}
    for name, nodes in parts.items():
        for node in nodes:
            if node is None:  # no bias
                continue
            value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
            if isinstance(value, (tuple, list)) and name == "results":  # chunk's pair of halves: each checked
                continue
            if not isinstance(value, torch.Tensor):
                return f"the MLP's {name} have no recorded dtype: it cannot be checked"
            dtypes.setdefault(name, set()).add(value.dtype)
    if len(set().union(*dtypes.values())) > 1:
        listed = ", ".join(f"{name} {'/'.join(sorted(str(d).removeprefix('torch.') for d in found))}"
                           for name, found in dtypes.items())  # fmt: skip
        return f"the MLP's tensors differ in dtype ({listed}; torch.autocast?): the selective ops take one dtype"
    return None


def rewrite_mlp(gm: GraphModule, ctx: PassContext) -> int:
    """Swap each matched decode MLP for routed selective GEMMs; returns rewrites made."""
    anchors = mlp_anchors(gm)
    if not anchors:
        return 0
    from polar_compile.ops.selective_gemm import unsupported_reason  # also registers torch.ops.polar.selective_*

    ops = torch.ops.polar
    lengths = query_lengths(gm)
    graph, count = gm.graph, 0
    for anchor in anchors:
        layer = anchor.args[4]
        if lengths != {1}:
            ctx.left_dense(layer, "mlp", f"not a decode step (query lengths {sorted(lengths)}): stays dense")
            continue
        match, reason = _match(anchor)
        if match is None:
            ctx.left_dense(layer, "mlp", reason)
            continue
        why = _dtype_reason(anchor, match)
        if why is not None:
            ctx.left_dense(layer, "mlp", why)
            continue
        hidden, down_rank, up_rank, up_bias, _, k = anchor.args
        hidden_value, out_value = example_value(hidden), example_value(match["down"])
        why = unsupported_reason(hidden_value.dtype, hidden_value.device)
        if why is not None:
            ctx.left_dense(layer, "mlp", why)
            continue
        width = hidden_value.shape[-1]
        down = match["down"]
        with graph.inserting_before(down):
            rows = graph.call_function(torch.reshape, (hidden, (-1, width)))
            low = graph.call_function(torch._C._nn.linear, (rows, down_rank, None))
            scores = graph.call_function(torch._C._nn.linear, (low, up_rank, up_bias))
            index = graph.call_function(ops.batch_union_topk.default, (scores, k))
            if match["kind"] == "plain":
                weight, bias = match["up"]
                from polar_compile.ops.selective_gemm import ACTIVATIONS

                up = graph.call_function(
                    ops.selective_up.default, (rows, weight, bias, index, ACTIVATIONS[match["act"]])
                )
            elif "fused" in match:  # the two halves of the fused weight, as views
                weight, gate_start, up_start, width = match["fused"]
                gate = graph.call_function(torch.narrow, (weight, 0, gate_start, width))
                up_weight = graph.call_function(torch.narrow, (weight, 0, up_start, width))
                up = graph.call_function(ops.selective_gated_up.default, (rows, gate, up_weight, index))
            else:
                up = graph.call_function(ops.selective_gated_up.default, (rows, match["gate"], match["up"][0], index))
            down_weight, down_bias = match["down_parts"]
            result = graph.call_function(ops.selective_down.default, (up, down_weight, index, down_bias))
            shaped = graph.call_function(torch.reshape, (result, tuple(out_value.shape)))
        down.replace_all_uses_with(shaped)
        for node in match["dead"]:
            if not node.users:
                graph.erase_node(node)
        ctx.rewritten(layer, "mlp", f"{k} of {example_value(up_rank).shape[0]} neurons shared by the batch")
        ctx.counters["mlp"] += 1
        count += 1
    return count
