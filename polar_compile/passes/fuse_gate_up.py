"""Run a dense gated MLP's first half at decode batch sizes as one ``polar::skinny_gated_linear`` launch.

    mul(silu(linear(x, Wg)), linear(x, Wu))      x of 9 <= M <= 64 rows, Wg and Wu (F, K), no biases
    ->  polar::skinny_gated_linear(x, Wg, Wu)

What the graph would otherwise run: one cuBLAS GEMM over [Wg; Wu] (after ``fuse_projections``) writing an (M, 2F)
product, then inductor's SiLU-mul kernel reading it back. The kernel computes both products of a block of neurons
in one program and writes ``silu(g) * u`` directly: one launch a layer instead of two. Which shapes qualify is
``polar_compile.ops.skinny_linear.takes_gated``. Runs before ``fuse_projections`` (the two linears it replaces are
then gone) and only on what it can prove: the gate linear's only use is the silu, the silu's and the up linear's
only use is the mul, both read the same input. A gated MLP stored fused (Phi-3's ``gate_up_proj`` + ``chunk``) is not
matched and keeps cuBLAS + the SiLU-mul. Off with the backend option ``"polar.skinny_linears": False``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import polar_compile.ops.skinny_linear  # noqa: F401  (registers torch.ops.polar.skinny_gated_linear)
from polar_compile.ops.skinny_linear import takes_gated
from polar_compile.passes.context import PassContext, activation, example_value, is_linear, linear_parts, single_user


def _match(mul: Node) -> tuple[Node, Node, Node, list[Node]] | None:
    """(x, gate weight, up weight, nodes made dead) when ``mul`` is silu(linear(x, Wg)) * linear(x, Wu)."""
    if mul.op != "call_function" or mul.target is not operator.mul or len(mul.args) != 2 or mul.kwargs:
        return None
    for act, other in (mul.args, mul.args[::-1]):
        if not isinstance(act, Node) or activation(act) != "silu" or act.kwargs.get("inplace"):
            continue
        gate = act.args[0] if act.args else None
        if not (is_linear(gate) and is_linear(other)) or gate is other:
            continue
        (x, gate_weight, gate_bias), (x_up, up_weight, up_bias) = linear_parts(gate), linear_parts(other)
        if x is not x_up or gate_bias is not None or up_bias is not None:
            continue
        if single_user(gate) is not act or single_user(act) is not mul or single_user(other) is not mul:
            continue
        return x, gate_weight, up_weight, [mul, act, gate, other]
    return None


def fuse_gate_up(gm: GraphModule, ctx: PassContext) -> int:
    """Replace each qualifying silu(gate) * up by ``polar::skinny_gated_linear``; returns how many."""
    if not ctx.skinny_linears:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        match = _match(node) if node.op == "call_function" else None
        if match is None:
            continue
        x, gate_weight, up_weight, dead = match
        x_value, gate_value, up_value = (example_value(n) for n in (x, gate_weight, up_weight))
        out_value = example_value(node)
        if any(v is None for v in (x_value, gate_value, up_value, out_value)) or gate_value.dim() != 2:
            continue
        dtypes = {value.dtype for value in (x_value, gate_value, up_value, out_value)}
        if tuple(gate_value.shape) != tuple(up_value.shape) or len(dtypes) != 1:
            continue
        if gate_value.stride(-1) != 1 or up_value.stride(-1) != 1:
            continue
        if not all(isinstance(size, int) for size in (*x_value.shape, *gate_value.shape)):
            continue  # symbolic sizes: the rule needs numbers
        rows = x_value.numel() // max(1, x_value.shape[-1])
        if not takes_gated(rows, gate_value.shape, x_value.dtype, x_value.device):
            continue
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(
                torch.ops.polar.skinny_gated_linear.default, (x, gate_weight, up_weight)
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        for gone in dead:
            gm.graph.erase_node(gone)
        count += 1
    ctx.counters["skinny_gated_linears"] += count
    return count
