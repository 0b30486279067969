"""The polar backend: registration, modes, graphs it must leave alone, and inductor."""

import pytest
import torch

import polar_compile
from polar_compile.backend import compile_reports, ensure_registered, polar_backend
from polar_compile.config import SparsityConfig
from polar_compile.testing import TINY_MODELS
from tests.compiler_helpers import generate, max_logit_difference, prompt_batch, quick_routers


def test_backend_name_resolves_once():
    from torch._dynamo.backends.registry import lookup_backend

    ensure_registered()
    ensure_registered()  # a second call must not register the name twice (that would raise)
    assert lookup_backend("polar") is polar_backend


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode"):
        polar_backend(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], mode="fast")


def test_model_without_routers_compiles_dense_and_untouched():
    model = TINY_MODELS["llama-gqa"]()
    ids = torch.randint(0, 256, (2, 5))
    expected = model(ids).logits
    compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, fullgraph=True)
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-5)
    assert compile_reports[-1].counters.get("attention", 0) == 0


def test_prefill_graph_stays_dense_with_a_reason():
    model = TINY_MODELS["mistral"]()
    polar_compile.optimize(model, quick_routers("mistral"), SparsityConfig(attention_density=0.5))
    ids = torch.randint(0, 256, (2, 5))
    expected = model(ids).logits  # eager: hooks inactive, dense
    compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, fullgraph=True)
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-5)
    report = compile_reports[-1]
    assert report.counters.get("attention", 0) == 0
    assert report.counters["anchors_removed"] == model.config.num_hidden_layers  # layer 0: no router
    assert all("query length 5" in row.detail for row in report.layers if not row.rewritten)


def test_unmatchable_graph_stays_dense_with_a_reason():
    # eager attention: no SDPA node behind the q projection, so nothing may be rewritten
    model = TINY_MODELS["llama-gqa"]()
    model.config._attn_implementation = "eager"
    ids, mask = prompt_batch(model.config.vocab_size)
    dense = generate(model, ids, mask)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    polar = generate(model, ids, mask)
    assert torch.equal(dense.sequences, polar.sequences)
    assert max_logit_difference(dense, polar) < 1e-4
    report = compile_reports[-1]
    assert report.counters.get("attention", 0) == 0
    assert all(not row.rewritten and "scaled_dot_product_attention" in row.detail for row in report.layers)
    assert "dense: no scaled_dot_product_attention" in str(polar_compile.explain(model))


@pytest.mark.slow
def test_inductor_path_matches_dense_at_density_one():
    model = TINY_MODELS["qwen2"]()
    ids, mask = prompt_batch(model.config.vocab_size)
    dense = generate(model, ids, mask, new_tokens=4)
    polar_compile.optimize(model, quick_routers("qwen2"), SparsityConfig(attention_density=1.0), mode="default")
    polar = generate(model, ids, mask, new_tokens=4)
    assert compile_reports[-1].inductor and compile_reports[-1].counters["attention"] == 2
    # q/k/v (with biases) and gate/up of every layer run as one GEMM each, through inductor's as_strided
    assert compile_reports[-1].counters["fused_projection_groups"] == 2 * model.config.num_hidden_layers
    assert torch.equal(dense.sequences, polar.sequences)
    assert max_logit_difference(dense, polar) < 1e-4
