"""The fuse_gate_up pass: which gated MLPs it moves to polar::skinny_gated_linear, what it leaves, the option.

On the CPU the kernel's rule (CUDA, bf16/fp16, F >= 2048) takes nothing in a tiny fp32 model, so most tests widen
the pass's ``takes_gated`` to any shape; the op keeps its real rule and runs ``silu(F.linear) * F.linear`` on the
CPU, so the rewritten graph must give the same numbers. On CUDA the real rule runs end to end in
tests/passes/test_skinny_linears.py (same option: a 2-layer Llama decodes like cuBLAS with both passes on).
"""

import copy
import importlib
import operator

import pytest
import torch
import torch.nn.functional as F

from polar_compile.passes import PassContext, run_passes
from tests.passes.test_passes import _capture_decode_graph

pass_module = importlib.import_module("polar_compile.passes.fuse_gate_up")


def _any_shape(rows, weight_shape, dtype, device):
    return True


def _fresh(inputs):
    return [x if isinstance(x, torch.nn.Parameter) else copy.deepcopy(x) for x in inputs]


def _silu_muls(gm) -> int:
    silus = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.silu]
    return sum(any(u.target is operator.mul for u in n.users) for n in silus)


@pytest.mark.parametrize("name,gated", [("llama-gqa", True), ("qwen2", True), ("opt", False)])
def test_each_dense_gated_mlp_moves_to_the_gated_op_and_the_step_is_unchanged(name, gated, monkeypatch):
    monkeypatch.setattr(pass_module, "takes_gated", _any_shape)
    model, gm, inputs = _capture_decode_graph(name, 0.5)
    layers = model.config.num_hidden_layers
    expected = copy.deepcopy(gm)
    dense = run_passes(expected, PassContext(example_inputs=list(inputs), skinny_linears=False))
    assert _silu_muls(expected) == (layers if gated else 0)
    ctx = run_passes(gm, PassContext(example_inputs=list(inputs)))
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert ctx.counters["skinny_gated_linears"] == (layers if gated else 0)
    assert targets.count(torch.ops.polar.skinny_gated_linear.default) == ctx.counters["skinny_gated_linears"]
    assert _silu_muls(gm) == 0
    # q/k/v are still packed; the gate/up pairs the pass took are no longer there to pack
    packed = dense.counters["fused_projection_groups"]
    assert ctx.counters["fused_projection_groups"] == packed - ctx.counters["skinny_gated_linears"] >= layers
    want, got = expected(*_fresh(inputs)), gm(*_fresh(inputs))
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Gated(torch.nn.Module):
    """silu(x @ Wg.T) * (x @ Wu.T), with the variations the pass must refuse."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant

    def forward(self, x, gate, up, bias):
        g = torch._C._nn.linear(x, gate, bias if self.variant == "gate bias" else None)
        u = torch._C._nn.linear(x if self.variant != "other input" else x + 1, up, None)
        h = F.silu(g) if self.variant != "relu" else F.relu(g)
        out = u * h if self.variant == "up first" else h * u
        if self.variant == "gate reused":
            return out + g
        return out


def _traced(variant: str):
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 8, generator=generator), torch.randn(5, 8, generator=generator)]
    inputs += [torch.randn(5, 8, generator=generator), torch.randn(5, generator=generator)]
    gm = torch.fx.symbolic_trace(_Gated(variant))
    for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), inputs, strict=True):
        node.meta["example_value"] = value  # what Dynamo records and the pass reads
    for node in gm.graph.nodes:  # and the values of every node, as Dynamo records them
        if node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, lambda n: n.meta["example_value"])
            node.meta["example_value"] = node.target(*args, **node.kwargs)
    return gm, inputs


@pytest.mark.parametrize("variant", ["plain", "up first"])
def test_either_operand_order_is_taken(variant, monkeypatch):
    monkeypatch.setattr(pass_module, "takes_gated", _any_shape)
    gm, inputs = _traced(variant)
    expected = gm(*inputs)
    assert pass_module.fuse_gate_up(gm, PassContext()) == 1
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        torch.ops.polar.skinny_gated_linear.default
    ]
    torch.testing.assert_close(gm(*inputs), expected)


@pytest.mark.parametrize("variant", ["gate bias", "other input", "relu", "gate reused"])
def test_what_is_not_silu_gate_times_up_is_left_alone(variant, monkeypatch):
    monkeypatch.setattr(pass_module, "takes_gated", _any_shape)
    gm, _ = _traced(variant)
    before = [n.target for n in gm.graph.nodes]
    assert pass_module.fuse_gate_up(gm, PassContext()) == 0
    assert [n.target for n in gm.graph.nodes] == before


def test_option_off_and_the_real_rule_on_the_cpu_move_nothing(monkeypatch):
    gm, _ = _traced("plain")
    assert pass_module.fuse_gate_up(copy.deepcopy(gm), PassContext()) == 0  # fp32 on the CPU: the rule says no
    monkeypatch.setattr(pass_module, "takes_gated", _any_shape)
    assert pass_module.fuse_gate_up(gm, PassContext(skinny_linears=False)) == 0


def test_the_rule_is_asked_with_the_rows_and_the_weight_shape(monkeypatch):
    asked = []
    monkeypatch.setattr(pass_module, "takes_gated", lambda *args: asked.append(args) or False)
    gm, _ = _traced("plain")
    assert pass_module.fuse_gate_up(gm, PassContext()) == 0
    assert asked == [(3, torch.Size([5, 8]), torch.float32, torch.device("cpu"))]  # M = 3 rows, Wg (F=5, K=8)
