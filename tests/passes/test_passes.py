"""The passes on real captured decode graphs: which ops come out, counters, numerics, and what stays alone."""

import copy
import operator

import pytest
import torch

from polar_compile.config import SparsityConfig
from polar_compile.passes import PASSES, run_passes
from polar_compile.passes.context import ANCHOR_TARGETS, MLP_ANCHOR_TARGETS, SDPA_TARGETS
from polar_compile.testing import TINY_MODELS
from tests.compiler_helpers import capture_decode_graph, quick_routers, without_anchors


def _capture_decode_graph(
    name: str,
    density: float,
    mlp: bool = False,
    dense_attention: str = "polar",
    fuse_projections: bool = True,
    autocast: torch.dtype | None = None,
):
    """(graph module, example inputs) of the decode step generate() compiles for an optimized tiny model (under
    ``torch.autocast("cpu", autocast)`` when given)."""
    model = TINY_MODELS[name]()
    config = SparsityConfig(
        attention_density=density,
        mlp="on" if mlp else "off",
        dense_attention=dense_attention,
        fuse_projections=fuse_projections,
    )
    return model, *capture_decode_graph(model, quick_routers(name, mlp=mlp), config, autocast)


def _targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def test_passes_are_ordered_anchor_removal_then_fusion():
    names = [p.__name__ for p in PASSES]
    # q, k, v read one node only without anchors; a dense gated MLP fuse_gate_up takes is no pair left to pack;
    # the skinny pass sees the fused (wide) GEMMs and leaves them
    assert names[-4:] == ["remove_anchors", "fuse_gate_up", "fuse_projections", "skinny_linears"]
    assert all(callable(p) and p.__doc__ for p in PASSES)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral", "opt"])
def test_decode_graph_ops_after_the_passes(name):
    model, gm, _ = _capture_decode_graph(name, 0.5)
    layers = model.config.num_hidden_layers
    before = _targets(gm)
    assert sum(t in ANCHOR_TARGETS for t in before) == layers  # layer 0's carries no router
    ctx = run_passes(gm)
    after = _targets(gm)
    assert ctx.counters["attention"] == layers - 1 and ctx.counters["anchors_removed"] == layers
    assert ctx.counters["attention_dense"] == 1  # layer 0: dense, all groups on the polar kernel
    assert sum(t in SDPA_TARGETS for t in after) == 0
    assert after.count(torch.ops.polar.selective_attention.default) == layers
    assert after.count(torch.ops.polar.route_groups.default) == layers - 1  # no router for the dense layer
    assert after.count(torch.topk) == 0
    assert not any(t in ANCHOR_TARGETS or t in MLP_ANCHOR_TARGETS for t in after)
    # repeat_kv's expand/reshape are gone (K/V are read once per group: no 5-D expand of (B, Hkv, R, S, D) is
    # left). (Other expands, e.g. of the rotary inverse frequencies in some transformers versions, are not about K/V.)
    from polar_compile.passes.context import example_value

    expands = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"]
    assert not [n for n in expands if example_value(n) is not None and example_value(n).dim() == 5]
    # one key span for the whole step, from the mask every layer's SDPA had, passed to every layer's kernel
    from polar_compile.ops.selective_attention import key_span

    spans = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is key_span]
    attentions = [n for n in gm.graph.nodes if n.target is torch.ops.polar.selective_attention.default]
    assert len(spans) == 1 and all(n.args[6] is spans[0] and n.args[4] is spans[0].args[0] for n in attentions)
    # layer 0 (every group) passes no index: nothing builds one (inductor materialised an arange-expand before each
    # of the layer's two kernel launches); every other layer passes its router's
    indices = [n.args[3] for n in attentions]
    assert indices.count(None) == 1
    assert all(i is None or i.target is torch.ops.polar.route_groups.default for i in indices)
    assert after.count(torch.arange) == before.count(torch.arange)  # the model's own (rotary, positions) only


def test_dense_attention_sdpa_keeps_layer_zero_on_sdpa():
    model, gm, _ = _capture_decode_graph("llama-gqa", 0.5, dense_attention="sdpa")
    layers = model.config.num_hidden_layers
    assert sum(t in ANCHOR_TARGETS for t in _targets(gm)) == layers - 1
    ctx = run_passes(gm)
    after = _targets(gm)
    assert ctx.counters["attention"] == layers - 1 and ctx.counters["attention_dense"] == 0
    assert sum(t in SDPA_TARGETS for t in after) == 1
    assert after.count(torch.ops.polar.selective_attention.default) == layers - 1


def test_density_one_uses_no_router_and_no_topk():
    model, gm, _ = _capture_decode_graph("mistral", 1.0)
    ctx = run_passes(gm)
    after = _targets(gm)
    assert ctx.counters["attention"] == model.config.num_hidden_layers - 1
    assert after.count(torch.ops.polar.route_groups.default) == 0  # k = G: no router, no index (None)
    attentions = [n for n in gm.graph.nodes if n.target is torch.ops.polar.selective_attention.default]
    assert len(attentions) == model.config.num_hidden_layers and all(n.args[3] is None for n in attentions)


def test_density_one_rewrite_is_numerically_the_dense_graph():
    _, gm, inputs = _capture_decode_graph("qwen2", 1.0)
    expected = without_anchors(gm)  # the unrewritten graph: anchors are identities
    run_passes(gm)
    # the graph mutates the static cache in place: give each run its own copy of the inputs
    want = expected(*copy.deepcopy(inputs))
    got = gm(*copy.deepcopy(inputs))
    want, got = (torch.utils._pytree.tree_leaves(x) for x in (want, got))
    assert len(want) == len(got)
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mlp_pass_on_a_relu_model():
    model, gm, _ = _capture_decode_graph("opt", 0.5, mlp=True)
    ctx = run_passes(gm)
    after = _targets(gm)
    layers = model.config.num_hidden_layers
    assert ctx.counters["mlp"] == layers - 1
    assert after.count(torch.ops.polar.selective_up.default) == layers - 1
    assert after.count(torch.ops.polar.selective_down.default) == layers - 1
    assert after.count(torch.ops.polar.batch_union_topk.default) == layers - 1


def test_graph_without_anchors_is_left_untouched():
    model = TINY_MODELS["llama-gqa"]()
    captured = []

    def capture(gm, example_inputs, **kwargs):
        captured.append(gm)
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True)(torch.randint(0, 256, (2, 4)))
    gm = captured[0]
    code_before = gm.code
    ctx = run_passes(gm)
    assert gm.code == code_before
    assert ctx.layers == [] and sum(v for k, v in ctx.counters.items() if not k.startswith("pass:")) == 0


def test_layer_whose_cache_cannot_be_traced_stays_dense():
    # Break the repeat_kv chain of layer 1: its key becomes a fresh tensor, not a view of the cache.
    _, gm, _ = _capture_decode_graph("llama-gqa", 0.5)
    sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    victim = sdpas[1]  # layer 1
    key = victim.args[1]
    with gm.graph.inserting_before(victim):
        cloned = gm.graph.call_function(operator.mul, (key, 1.0))
    cloned.meta = dict(key.meta)
    victim.replace_input_with(key, cloned)
    ctx = run_passes(gm)
    dense = [row for row in ctx.layers if not row.rewritten and row.layer != 0]  # layer 0: dense by config
    assert [row.layer for row in dense] == [1] and "repeat_kv" in dense[0].detail
    assert ctx.counters["attention"] == 1


def test_layers_the_kernels_cannot_take_stay_dense_with_the_ops_reason(monkeypatch):
    # What a CUDA fp32 MLP or a head_dim-72 attention meets on the GPU: the op says it cannot run it, so the
    # pass leaves the layer dense with that reason instead of handing inductor a graph that fails to compile.
    from polar_compile.ops import selective_attention, selective_gemm

    asked = []

    def attention_says_no(dtype, device, head_dim, ratio):
        asked.append((dtype, device.type, head_dim, ratio))
        return f"pretend: no kernel for head_dim {head_dim}"

    monkeypatch.setattr(selective_attention, "unsupported_reason", attention_says_no)
    monkeypatch.setattr(selective_gemm, "unsupported_reason", lambda dtype, device: f"pretend: no kernel for {dtype}")
    model, gm, _ = _capture_decode_graph("opt", 0.5, mlp=True)
    ctx = run_passes(gm)
    layers = model.config.num_hidden_layers
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert asked and all(a == (torch.float32, "cpu", head_dim, 1) for a in asked)
    assert ctx.counters["attention"] == 0 and ctx.counters["mlp"] == 0
    assert torch.ops.polar.selective_attention.default not in _targets(gm)
    assert torch.ops.polar.selective_up.default not in _targets(gm)
    reasons = {(row.layer, row.component): row.detail for row in ctx.layers if not row.rewritten}
    for layer in range(1, layers):
        assert reasons[layer, "attention"] == f"pretend: no kernel for head_dim {head_dim}"
        assert reasons[layer, "mlp"] == "pretend: no kernel for torch.float32"


def test_mlp_under_autocast_stays_dense_and_runs():
    """An fp32 OPT decoded under autocast(bf16): its input, weights and routers are fp32 but its linears compute in
    bf16. The rewritten step handed polar::selective_down a bf16 activation and an fp32 weight: TypeError. The MLP
    now stays dense with the reason; the attention (q, k, v and the caches all bf16) still goes on the kernel."""
    model, gm, inputs = _capture_decode_graph("opt", 1.0, mlp=True, autocast=torch.bfloat16)
    expected = without_anchors(gm)  # the unrewritten graph: anchors are identities
    ctx = run_passes(gm)
    layers = model.config.num_hidden_layers
    mlp = {row.layer: row for row in ctx.layers if row.component == "mlp"}
    assert sorted(mlp) == list(range(1, layers)) and ctx.counters["mlp"] == 0
    assert all(not row.rewritten and "differ in dtype" in row.detail for row in mlp.values()), mlp
    assert ctx.counters["attention"] == layers - 1  # bf16 throughout: rewritten
    assert torch.ops.polar.selective_up.default not in _targets(gm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.utils._pytree.tree_leaves(expected(*copy.deepcopy(inputs)))
        got = torch.utils._pytree.tree_leaves(gm(*copy.deepcopy(inputs)))
    pairs = [(a, b) for a, b in zip(want, got, strict=True) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    assert pairs and all(a.dtype == b.dtype for a, b in pairs)
    assert max((a.float() - b.float()).abs().max().item() for a, b in pairs) < 0.1


def test_only_exact_gelu_is_taken_as_the_kernels_gelu():
    # the up kernel computes exact (erf) gelu; tanh-approximate gelu differs by up to ~4e-4 per activation
    import torch.nn.functional as F
    from torch import fx

    from polar_compile.passes.context import activation

    def activation_node(fn):
        graph = fx.symbolic_trace(fn).graph
        return next(node for node in graph.nodes if node.op == "call_function")

    assert activation(activation_node(lambda x: F.gelu(x))) == "gelu"
    assert activation(activation_node(lambda x: F.gelu(x, approximate="none"))) == "gelu"
    assert activation(activation_node(lambda x: F.gelu(x, approximate="tanh"))) is None
    assert activation(activation_node(lambda x: F.relu(x))) == "relu"
    assert activation(activation_node(lambda x: torch.tanh(x))) is None
