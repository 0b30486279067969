"""The skinny_linears pass on captured decode graphs: which linears it moves, that nothing else changes, the option.

On the CPU the kernel's rule (CUDA, bf16/fp16, N >= 2048) takes nothing in a tiny fp32 model, so these tests widen
the pass's ``takes`` to the rule's shape part alone (M <= MAX_ROWS, N <= K; no lower bound on M, for the tiny test
batches); the op itself keeps the real rule and runs F.linear on the CPU, so the rewritten graph must give the same
numbers. On CUDA the last test runs the real rule end to end.
"""

import copy
import importlib

import pytest
import torch

import polar_compile
import polar_compile.ops.skinny_linear as sk
from polar_compile.config import SparsityConfig
from polar_compile.passes import PassContext, run_passes
from polar_compile.passes.context import LINEAR_TARGETS
from tests.passes.test_passes import _capture_decode_graph

# the module (the package's attribute of that name is the pass function it exports)
pass_module = importlib.import_module("polar_compile.passes.skinny_linears")


def _shape_rule(rows, weight_shape, dtype, device):
    columns, width = weight_shape
    return 1 <= rows <= sk.MAX_ROWS and columns <= width


def _linear_weights(gm):
    """The (N, K) of each linear's weight in the graph; a packed weight fuse_projections made (an as_strided view,
    no recorded value) counts as wide: it stacks q/k/v or gate/up rows over the same K."""
    from polar_compile.passes.context import example_value

    shapes = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            value = example_value(node.args[1])
            if value is None:
                assert node.args[1].target is torch.as_strided, node.args[1]
                shapes.append((float("inf"), 0))
            else:
                shapes.append(tuple(value.shape))
    return shapes


def _fresh(inputs):
    """The graph mutates the static cache: each run gets its own copy, but the same parameters (the packed q/k/v
    and gate/up weights must stay views of one buffer)."""
    return [x if isinstance(x, torch.nn.Parameter) else copy.deepcopy(x) for x in inputs]


@pytest.mark.parametrize("name", ["llama-gqa", "opt", "qwen2"])
def test_narrow_linears_move_to_the_skinny_op_and_the_step_is_unchanged(name, monkeypatch):
    monkeypatch.setattr(pass_module, "takes", _shape_rule)
    _, gm, inputs = _capture_decode_graph(name, 0.5)
    expected = copy.deepcopy(gm)
    run_passes(expected, PassContext(example_inputs=list(inputs), skinny_linears=False))
    narrow = sum(n <= k for n, k in _linear_weights(expected))
    ctx = run_passes(gm, PassContext(example_inputs=list(inputs)))
    after = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    layers = len([t for t in after if t is torch.ops.polar.selective_attention.default])
    assert narrow >= 2 * layers  # at least each layer's o and down projections
    assert ctx.counters["skinny_linears"] == narrow == after.count(torch.ops.polar.skinny_linear.default)
    assert all(n > k for n, k in _linear_weights(gm))  # what is left: the wide ones (q/k/v, gate/up)
    want = expected(*_fresh(inputs))
    got = gm(*_fresh(inputs))
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        if isinstance(a, torch.Tensor):  # F.linear on the CPU either way; BLAS may block the sums differently
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _BiasedLinear(torch.nn.Module):
    def forward(self, x, weight, bias):
        return torch._C._nn.linear(x, weight, bias)


def test_the_skinny_op_keeps_the_bias(monkeypatch):
    """A dropped bias once passed: the tiny models' biases were all zero then (they are random since ccbf1b7)."""
    monkeypatch.setattr(pass_module, "takes", _shape_rule)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 8, generator=generator), torch.randn(4, 8, generator=generator)]
    inputs.append(torch.randn(4, generator=generator) + 1.0)
    gm = torch.fx.symbolic_trace(_BiasedLinear())
    for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), inputs, strict=True):
        node.meta["example_value"] = value  # what Dynamo records and the pass reads
    expected = gm(*inputs)
    ctx = run_passes(gm, PassContext(example_inputs=inputs))
    assert ctx.counters["skinny_linears"] == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.polar.skinny_linear.default]
    torch.testing.assert_close(gm(*inputs), expected)


def test_option_off_and_the_real_rule_on_the_cpu_move_nothing(monkeypatch):
    _, gm, inputs = _capture_decode_graph("llama-gqa", 0.5)
    ctx = run_passes(copy.deepcopy(gm), PassContext(example_inputs=list(inputs)))
    assert ctx.counters["skinny_linears"] == 0  # fp32 on the CPU: the kernel's rule takes nothing
    monkeypatch.setattr(pass_module, "takes", _shape_rule)
    ctx = run_passes(gm, PassContext(example_inputs=list(inputs), skinny_linears=False))
    assert ctx.counters["skinny_linears"] == 0


def test_backend_option_must_be_a_bool():
    from polar_compile.backend import polar_backend

    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="polar.skinny_linears"):
        polar_backend(gm, [torch.zeros(2, 4)], options={"polar.skinny_linears": "yes", "polar.inductor": False})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real rule takes CUDA bf16 linears only")
def test_real_rule_on_cuda_a_model_wide_enough_decodes_like_cublas():
    from transformers import LlamaConfig, LlamaForCausalLM

    from polar_compile.backend import compile_reports
    from polar_compile.compiler import restore
    from polar_compile.routers.modules import PolarRouters
    from tests.compiler_helpers import generate, logits_until_tokens_part, prompt_batch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    routers = PolarRouters.for_model(model, density=1.0)
    ids, mask = (t.cuda() for t in prompt_batch(config.vocab_size, batch=16))
    runs = {}
    for skinny in (False, True):
        options = {"triton.cudagraphs": True, "polar.skinny_linears": skinny}
        polar_compile.optimize(model, routers, SparsityConfig(attention_density=1.0), options=options)
        runs[skinny] = generate(model, ids, mask, new_tokens=4)
        counters = compile_reports[-1].counters
        assert counters.get("skinny_linears", 0) == (2 * config.num_hidden_layers if skinny else 0)
        # and each layer's gate, up and SiLU-mul on polar::skinny_gated_linear (passes/fuse_gate_up.py)
        assert counters.get("skinny_gated_linears", 0) == (config.num_hidden_layers if skinny else 0)
        if skinny:
            assert f"{config.num_hidden_layers} dense MLP gate/up pairs" in str(polar_compile.explain(model))
        restore(model)
        torch._dynamo.reset()
    steps, largest = logits_until_tokens_part(runs[False], runs[True])
    assert steps >= 1 and largest < 0.1, largest


def _one_linear_graph(rows):
    """A graph of one linear whose example values are fake tensors: x (rows, 64), weight (32, 64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    rows = env.create_unbacked_symint() if rows is None else rows
    with FakeTensorMode(shape_env=env):
        values = {"x": torch.empty(rows, 64), "w": torch.empty(32, 64)}
    gm = torch.fx.symbolic_trace(lambda x, w: torch._C._nn.linear(x, w, None))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["example_value"] = values[node.target]
    return gm


def test_symbolic_row_counts_are_left_alone(monkeypatch):
    """A linear over a data-dependent number of rows (a mixture of experts' tokens per expert) is not the rule's
    to judge: the pass must skip it without asking for the number (that would fail the compile)."""

    def rule(rows, weight_shape, dtype, device):
        assert isinstance(rows, int), "the rule was asked about a symbolic row count"
        return True

    monkeypatch.setattr(pass_module, "takes", rule)
    assert pass_module.skinny_linears(_one_linear_graph(8), PassContext()) == 1  # the control: concrete rows
    assert pass_module.skinny_linears(_one_linear_graph(None), PassContext()) == 0


def test_explain_counts_the_linears_on_the_skinny_op(monkeypatch):
    from polar_compile.testing import TINY_MODELS
    from tests.compiler_helpers import prompt_batch, quick_routers

    monkeypatch.setattr(pass_module, "takes", _shape_rule)
    gated_pass = importlib.import_module("polar_compile.passes.fuse_gate_up")
    monkeypatch.setattr(gated_pass, "takes_gated", lambda rows, weight_shape, dtype, device: True)
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = prompt_batch(model.config.vocab_size)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static")
    explanation = polar_compile.explain(model)
    assert explanation.skinny_linears >= 2 * model.config.num_hidden_layers  # o and down of every layer
    assert f"{explanation.skinny_linears} narrow linears" in str(explanation)
    layers = model.config.num_hidden_layers
    assert explanation.skinny_gated_linears == layers  # each layer's gate, up and SiLU-mul (fuse_gate_up)
    assert f"{layers} dense MLP gate/up pairs (and SiLU-mul) on polar::skinny_gated_linear" in str(explanation)
