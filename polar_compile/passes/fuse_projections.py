"""Run linears that share an input and whose weights are adjacent rows of one storage as one linear.

    linear(x, Wq), linear(x, Wk), linear(x, Wv)       Wq, Wk, Wv: consecutive row blocks of one buffer
    ->  y = linear(x, as_strided(Wq, (rows_q + rows_k + rows_v, d), (d, 1), offset(Wq)))
        q, k, v = (part.contiguous() for part in y.split([rows_q, rows_k, rows_v], -1))

``polar_compile.optimize`` packs q/k/v and gate/up that way (``polar_compile/packing.py``); weights in
separate storages are never fused (a concatenation would copy them every step). Whether weights are adjacent
is read from the graph's real example inputs, so a fused graph depends on a memory layout its guards do not
see: the pass records, per fused group, the byte distance between its weights' inputs, and the backend checks
those distances before every call (:func:`check_layout`) and raises if a parameter was replaced since.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from polar_compile.packing import consecutive
from polar_compile.passes.context import PassContext, is_linear, linear_parts, logger


@dataclass(frozen=True)
class LayoutCheck:
    """Input ``other`` must start ``delta`` bytes after input ``first`` (both are weights of one fused group)."""

    first: int
    other: int
    delta: int
    name: str  # the placeholder of ``other``, for the error message


class PackedLayoutError(RuntimeError):
    """A parameter that a compiled graph reads through its packed buffer was replaced after compilation."""


def check_layout(args, checks: tuple[LayoutCheck, ...]) -> None:
    for check in checks:
        if args[check.other].data_ptr() - args[check.first].data_ptr() != check.delta:
            raise PackedLayoutError(
                f"polar_compile: {check.name} is no longer stored next to the other projections it was fused with "
                "(a parameter was replaced after the model was compiled). Call polar_compile.optimize(model, ...) "
                "again (or torch._dynamo.reset()) so the step is recompiled for the new weights."
            )


def _chains(members, value_of):
    """Split linears (sorted by weight offset) into runs whose weights and biases are consecutive in storage."""
    chains, current = [], []
    for node in members:
        if current and _follows(current[-1], node, value_of):
            current.append(node)
        else:
            if len(current) > 1:
                chains.append(current)
            current = [node]
    if len(current) > 1:
        chains.append(current)
    return chains


def _follows(previous: Node, node: Node, value_of) -> bool:
    """``node``'s weight (and bias) are stored right after ``previous``'s, with the same input width."""
    (_, weight_before, bias_before), (_, weight_after, bias_after) = linear_parts(previous), linear_parts(node)
    before, after = value_of(weight_before), value_of(weight_after)
    if before is None or after is None or before.shape[1] != after.shape[1] or not consecutive(before, after):
        return False
    if bias_before is None and bias_after is None:
        return True
    before, after = value_of(bias_before), value_of(bias_after)  # None when a bias is absent or computed
    return before is not None and after is not None and consecutive(before, after)


def fuse_projections(gm: GraphModule, ctx: PassContext) -> int:
    """Fuse every run of adjacent-weight linears on one input; returns the number of groups fused."""
    if ctx.example_inputs is None:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(ctx.example_inputs):
        logger.info(
            "fuse_projections skipped: %d placeholders for %d inputs", len(placeholders), len(ctx.example_inputs)
        )
        return 0
    index_of = {node: i for i, node in enumerate(placeholders)}

    def value_of(node):
        if not isinstance(node, Node) or node not in index_of:
            return None
        value = ctx.example_inputs[index_of[node]]
        if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_contiguous():
            return None
        if isinstance(value, torch._subclasses.FakeTensor) or value.device.type == "meta":
            return None  # no real storage to compare
        return value

    by_input = defaultdict(list)
    for node in gm.graph.nodes:
        if is_linear(node):
            source, weight, _ = linear_parts(node)
            if value_of(weight) is not None and value_of(weight).dim() == 2:
                by_input[source].append(node)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    fused = 0
    for members in by_input.values():
        if len(members) < 2:
            continue
        members.sort(
            key=lambda n: (
                value_of(linear_parts(n)[1]).untyped_storage().data_ptr(),
                value_of(linear_parts(n)[1]).storage_offset(),
            )
        )
        for chain in _chains(members, value_of):
            _fuse(gm, chain, value_of, index_of, order, ctx)
            fused += 1
    ctx.counters["fused_projection_groups"] += fused
    return fused


def _fuse(gm: GraphModule, chain: list[Node], value_of, index_of, order, ctx: PassContext) -> None:
    graph = gm.graph
    first = linear_parts(chain[0])
    source, first_weight_node, first_bias_node = first
    weights = [value_of(linear_parts(n)[1]) for n in chain]
    rows = [w.shape[0] for w in weights]
    width = weights[0].shape[1]
    for node in chain[1:]:
        for index in (1, 2):
            here, base = linear_parts(node)[index], first[index]
            if here is None:
                continue
            delta = value_of(here).data_ptr() - value_of(base).data_ptr()
            ctx.layout_checks.append(LayoutCheck(index_of[base], index_of[here], delta, here.name))
    with graph.inserting_before(min(chain, key=order.__getitem__)):
        weight = graph.call_function(
            torch.as_strided, (first_weight_node, (sum(rows), width), (width, 1), weights[0].storage_offset())
        )
        bias = None
        if first_bias_node is not None:
            bias = graph.call_function(
                torch.as_strided, (first_bias_node, (sum(rows),), (1,), value_of(first_bias_node).storage_offset())
            )
        output = graph.call_function(torch._C._nn.linear, (source, weight, bias))
        pieces = graph.call_function(torch.split, (output, rows), {"dim": -1})
        for i, node in enumerate(chain):
            piece = graph.call_function(operator.getitem, (pieces, i))
            contiguous = graph.call_method("contiguous", (piece,))
            node.replace_all_uses_with(contiguous)
    for node in chain:
        graph.erase_node(node)
