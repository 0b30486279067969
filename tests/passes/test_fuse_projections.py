"""fuse_projections on real captured decode graphs: what it fuses, the numerics, and the layout check."""

import copy

import pytest
import torch

from polar_compile.backend import polar_backend
from polar_compile.passes import PassContext, run_passes
from polar_compile.passes.fuse_projections import PackedLayoutError
from tests.passes.test_passes import _capture_decode_graph


def _linears(gm) -> int:
    return sum(n.op == "call_function" and n.target in (torch._C._nn.linear, torch.nn.functional.linear)
               for n in gm.graph.nodes)  # fmt: skip


@pytest.mark.parametrize(("name", "per_layer"), [("llama-gqa", 2), ("qwen2", 2), ("opt", 1)])
def test_packed_projections_become_one_linear_each(name, per_layer):
    model, gm, inputs = _capture_decode_graph(name, 0.5)
    layers = model.config.num_hidden_layers
    unfused = copy.deepcopy(gm)
    run_passes(unfused)  # the same rewrites without real inputs: nothing fused
    ctx = run_passes(gm, PassContext(example_inputs=inputs))
    # q/k/v: 3 linears -> 1; gate/up: 2 -> 1 (OPT has no gated MLP)
    assert ctx.counters["fused_projection_groups"] == per_layer * layers
    assert _linears(gm) == _linears(unfused) - layers * (2 + (per_layer - 1))
    biases = name != "llama-gqa"  # Qwen2's and OPT's q/k/v have biases: checked too
    assert len(ctx.layout_checks) == layers * (2 * (2 if biases else 1) + (per_layer - 1))
    # the graph writes the static cache in place: each run gets its own copy of the non-parameter inputs
    expected, actual = (graph(*_fresh(inputs)) for graph in (unfused, gm))
    for a, e in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def _fresh(inputs):
    return [x if isinstance(x, torch.nn.Parameter) else copy.deepcopy(x) for x in inputs]


def test_no_fusion_without_packing_or_without_real_inputs():
    _, gm, inputs = _capture_decode_graph("llama-gqa", 0.5, fuse_projections=False)
    assert run_passes(gm, PassContext(example_inputs=inputs)).counters["fused_projection_groups"] == 0
    _, gm, _ = _capture_decode_graph("llama-gqa", 0.5)
    assert run_passes(gm).counters["fused_projection_groups"] == 0  # adjacency is read from real inputs only


def test_a_replaced_parameter_is_caught_before_the_call():
    _, gm, inputs = _capture_decode_graph("llama-gqa", 0.5)
    compiled = polar_backend(gm, inputs, options={"polar.inductor": False})
    compiled(*_fresh(inputs))  # the packed layout: runs
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    k_weight = next(i for i, name in enumerate(placeholders) if "k_proj" in name and "weight" in name)
    replaced = _fresh(inputs)
    replaced[k_weight] = inputs[k_weight].clone()  # same shape, dtype and values, its own storage
    with pytest.raises(PackedLayoutError, match="k_proj"):
        compiled(*replaced)


class _TwoHeads(torch.nn.Module):
    def forward(self, x, w1, w2, b1, b2):
        return torch._C._nn.linear(x, w1, b1), torch._C._nn.linear(x, w2, b2)


class _TwoHeadsComputedBias(torch.nn.Module):
    def forward(self, x, w1, w2, b1, b2):
        return torch._C._nn.linear(x, w1, b1 * 2), torch._C._nn.linear(x, w2, b2 * 2)


@pytest.mark.parametrize(("module", "fused"), [(_TwoHeads, 1), (_TwoHeadsComputedBias, 0)])
def test_biases_must_be_packed_inputs_too(module, fused):
    """A bias computed in the graph has no storage to check: that pair stays two linears (it used to crash)."""
    generator = torch.Generator().manual_seed(0)
    weights, biases = torch.randn(7, 5, generator=generator), torch.randn(7, generator=generator)
    inputs = [torch.randn(3, 5, generator=generator), weights[:4], weights[4:], biases[:4], biases[4:]]
    gm = torch.fx.symbolic_trace(module())
    expected = gm(*inputs)
    ctx = run_passes(gm, PassContext(example_inputs=inputs))
    assert ctx.counters["fused_projection_groups"] == fused and len(ctx.layout_checks) == 2 * fused
    for a, e in zip(gm(*inputs), expected, strict=True):
        torch.testing.assert_close(a, e)


def test_packed_biases_are_read_from_their_own_offset():
    """The packed bias view starts where the first bias does: a view from the buffer's start once passed, when the
    tiny models' q/k/v biases were zero (they are random since ccbf1b7)."""
    generator = torch.Generator().manual_seed(0)
    weights, pool = torch.randn(7, 5, generator=generator), torch.randn(10, generator=generator)
    biases = pool[3:]  # the biases start 3 elements into their storage
    inputs = [torch.randn(3, 5, generator=generator), weights[:4], weights[4:], biases[:4], biases[4:]]
    gm = torch.fx.symbolic_trace(_TwoHeads())
    expected = gm(*inputs)
    assert run_passes(gm, PassContext(example_inputs=inputs)).counters["fused_projection_groups"] == 1
    for a, e in zip(gm(*inputs), expected, strict=True):
        torch.testing.assert_close(a, e)
