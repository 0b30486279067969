"""Run a graph's narrow linears at decode batch sizes on ``polar::skinny_linear`` instead of cuBLAS.

    linear(x, W, b)   with x of 9 <= M <= 16 rows and W (N, K), 2048 <= N <= K, bf16/fp16 on CUDA
    ->  polar::skinny_linear(x, W, b)

Which linears qualify is ``polar_compile.ops.skinny_linear.takes``, the shapes where the kernel was measured
faster (a layer's attention output and MLP down projections at M = 16); everything else is left to cuBLAS.
The result is the same linear (fp32 accumulation; summation order aside). Runs after ``fuse_projections`` (a
packed q/k/v or gate/up GEMM has N > K and stays on cuBLAS). Off with the backend option
``"polar.skinny_linears": False``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import polar_compile.ops.skinny_linear  # noqa: F401  (registers torch.ops.polar.skinny_linear)
from polar_compile.ops.skinny_linear import takes
from polar_compile.passes.context import PassContext, example_value, is_linear, linear_parts


def skinny_linears(gm: GraphModule, ctx: PassContext) -> int:
    """Replace each qualifying linear by ``polar::skinny_linear``; returns how many were replaced."""
    if not ctx.skinny_linears:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if not is_linear(node):
            continue
        x, weight, bias = linear_parts(node)
        x_value, weight_value = example_value(x), example_value(weight)
        if x_value is None or weight_value is None or weight_value.dim() != 2 or x_value.dim() < 1:
            continue
        if weight_value.stride(-1) != 1 or (bias is not None and example_value(bias) is None):
            continue
        if not all(isinstance(size, int) for size in (*x_value.shape, *weight_value.shape)):
            continue  # a symbolic size (e.g. a mixture of experts' tokens per expert): the rule needs numbers
        rows = x_value.numel() // max(1, x_value.shape[-1])
        if not takes(rows, weight_value.shape, x_value.dtype, x_value.device):
            continue
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_function(torch.ops.polar.skinny_linear.default, (x, weight, bias))
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        count += 1
    ctx.counters["skinny_linears"] += count
    return count
