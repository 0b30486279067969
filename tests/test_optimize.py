"""optimize(): decode through the polar backend equals dense at density 1.0, and the masked reference below it."""

import pytest
import torch

import polar_compile
from polar_compile.backend import compile_reports
from polar_compile.config import SparsityConfig
from polar_compile.reference import masked_reference
from polar_compile.testing import TINY_MODELS
from tests.compiler_helpers import (
    ARCHITECTURES,
    DEVICES,
    far_apart,
    generate,
    logits_until_tokens_part,
    max_logit_difference,
    prompt_batch,
    quick_routers,
)

# fp32 end-to-end: the only differences are summation order in attention (~1e-6 relative).
LOGIT_TOLERANCE = 1e-4
BF16_LOGIT_TOLERANCE = 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_density_one_reproduces_dense_decode(name, device):
    model = TINY_MODELS[name]().to(device)
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    dense = generate(model, ids, mask, disable_compile=True)
    polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=1.0))
    polar = generate(model, ids, mask)
    assert torch.equal(dense.sequences, polar.sequences)
    assert max_logit_difference(dense, polar) < LOGIT_TOLERANCE
    explanation = polar_compile.explain(model)
    sparse_layers = list(range(1, model.config.num_hidden_layers))
    assert explanation.rewritten_layers == sparse_layers, str(explanation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_sparse_decode_matches_masked_reference(name, device):
    model = TINY_MODELS[name]().to(device)
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size, seed=1))
    polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    polar = generate(model, ids, mask)
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    dense = generate(TINY_MODELS[name]().to(device), ids, mask, disable_compile=True)
    assert torch.equal(reference.sequences, polar.sequences)
    assert max_logit_difference(reference, polar) < LOGIT_TOLERANCE
    # and sparsity really changed something (else the comparison above proves nothing)
    assert max_logit_difference(dense, polar) > 100 * LOGIT_TOLERANCE


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_sparse_mlp_decode_matches_masked_reference(name):
    model = TINY_MODELS[name]()
    ids, mask = prompt_batch(model.config.vocab_size, seed=2)
    polar_compile.optimize(model, quick_routers(name, mlp=True), SparsityConfig(attention_density=0.5, mlp="on"))
    polar = generate(model, ids, mask)
    report = compile_reports[-1]
    sparse_layers = model.config.num_hidden_layers - 1
    assert report.counters["attention"] == sparse_layers and report.counters["mlp"] == sparse_layers
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    assert torch.equal(reference.sequences, polar.sequences)
    assert max_logit_difference(reference, polar) < LOGIT_TOLERANCE
    assert "rewritten: " in polar_compile.explain(model).layers[1].mlp


def test_sparse_mlp_decode_keeps_the_up_and_down_biases():
    """The test above once passed with the selective down's bias dropped: the tiny OPT's fc1 / fc2 biases were zero
    then (they are random since ccbf1b7); this one sets its own."""
    model = TINY_MODELS["opt"]()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for linear in (layer.fc1, layer.fc2):
                linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.5)
    ids, mask = prompt_batch(model.config.vocab_size, seed=2)
    polar_compile.optimize(model, quick_routers("opt", mlp=True), SparsityConfig(attention_density=0.5, mlp="on"))
    polar = generate(model, ids, mask)
    assert compile_reports[-1].counters["mlp"] == model.config.num_hidden_layers - 1
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    assert torch.equal(reference.sequences, polar.sequences)
    assert max_logit_difference(reference, polar) < LOGIT_TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_bf16_sparse_mlp_decode_matches_the_masked_reference_in_fp32(name, device):
    """bf16, a dtype of the CUDA MLP kernels (an fp32 MLP stays dense on CUDA: the test after this), against the
    masked reference of the same weights in fp32: what is left is bf16 rounding, which moves these logits (|logit|
    ~1) by 0.0074 at most between the dense model in bf16 and in fp32."""
    model = TINY_MODELS[name]().to(device, torch.bfloat16)
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size, seed=2))
    routers = far_apart(quick_routers(name, mlp=True))
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="on"))
    polar = generate(model, ids, mask)
    sparse_layers = model.config.num_hidden_layers - 1
    assert compile_reports[-1].counters["mlp"] == sparse_layers == compile_reports[-1].counters["attention"]
    model.float()
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    steps, difference = logits_until_tokens_part(reference, polar)
    assert steps >= 2 and difference < BF16_LOGIT_TOLERANCE, (steps, difference)
    dense = generate(TINY_MODELS[name]().to(device, torch.bfloat16).float(), ids, mask, disable_compile=True)
    assert logits_until_tokens_part(dense, polar)[1] > 4 * BF16_LOGIT_TOLERANCE  # sparsity really changed the step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA MLP kernels' dtypes (CPU: tests/ops)")
def test_fp32_mlp_on_cuda_stays_dense_with_the_reason_while_attention_goes_sparse():
    model = TINY_MODELS["opt"]().cuda()
    polar_compile.optimize(model, quick_routers("opt", mlp=True), SparsityConfig(attention_density=0.5, mlp="on"))
    ids, mask = (t.cuda() for t in prompt_batch(model.config.vocab_size))
    generate(model, ids, mask, new_tokens=2)
    report = compile_reports[-1]
    assert report.counters["attention"] == model.config.num_hidden_layers - 1 and "mlp" not in report.counters
    assert "CUDA kernels take" in polar_compile.explain(model).layers[1].mlp


def test_mlp_auto_leaves_gated_mlps_dense():
    model = TINY_MODELS["llama-gqa"]()
    routers = quick_routers("llama-gqa", mlp=True)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="auto"))
    ids, mask = prompt_batch(model.config.vocab_size)
    generate(model, ids, mask, new_tokens=2)
    assert "mlp" not in compile_reports[-1].counters
    assert "not ReLU" in polar_compile.explain(model).layers[1].mlp


def test_by_default_a_relu_mlp_stays_dense_and_auto_makes_it_sparse():
    """MLP sparsity decoded slower than attention sparsity alone at every point measured (SparsityConfig.mlp), so
    the default leaves even a ReLU MLP with routers dense, and says how to turn it on; 'auto' does."""
    ids, mask = prompt_batch(TINY_MODELS["opt"]().config.vocab_size)
    for mode, rewritten in ((None, False), ("auto", True)):
        model = TINY_MODELS["opt"]()
        config = SparsityConfig(attention_density=0.5, **({} if mode is None else {"mlp": mode}))
        polar_compile.optimize(model, quick_routers("opt", mlp=True), config)
        generate(model, ids, mask, new_tokens=2)
        sparse_layers = model.config.num_hidden_layers - 1
        assert compile_reports[-1].counters["attention"] == sparse_layers
        assert compile_reports[-1].counters.get("mlp", 0) == (sparse_layers if rewritten else 0), mode
        reason = polar_compile.explain(model).layers[1].mlp
        assert ("rewritten" in reason) if rewritten else ("off by default" in reason and "mlp='auto'" in reason), reason


def test_reoptimizing_with_another_density_recompiles():
    model = TINY_MODELS["llama-mha"]()
    ids, mask = prompt_batch(model.config.vocab_size)
    routers = quick_routers("llama-mha")
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.25))
    first = generate(model, ids, mask)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=1.0))
    second = generate(model, ids, mask)
    dense = generate(TINY_MODELS["llama-mha"](), ids, mask)
    assert torch.equal(second.sequences, dense.sequences)
    assert max_logit_difference(first, second) > 100 * LOGIT_TOLERANCE
    assert "4 of 4 groups" in str(polar_compile.explain(model))


def test_dtype_change_after_optimize_moves_routers():
    model = TINY_MODELS["qwen2"]()
    polar_compile.optimize(model, quick_routers("qwen2"), SparsityConfig(attention_density=0.5))
    model.to(torch.bfloat16)
    assert model.polar_routers.attention_router(1).weight.dtype == torch.bfloat16
    ids, mask = prompt_batch(model.config.vocab_size)
    out = generate(model, ids, mask, new_tokens=3)
    assert out.sequences.shape == (3, 10)
    assert all(torch.isfinite(logits).all() for logits in out.logits)


def test_restore_gives_back_the_dense_model():
    model = TINY_MODELS["llama-gqa"]()
    ids, mask = prompt_batch(model.config.vocab_size)
    dense = generate(model, ids, mask)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    from polar_compile.compiler import restore

    restore(model)
    assert not hasattr(model, "polar_routers") and not hasattr(model, "_polar_plan")
    assert torch.equal(generate(model, ids, mask).sequences, dense.sequences)


def test_router_file_for_another_model_is_refused():
    from polar_compile.routers.modules import RouterMismatchError

    model = TINY_MODELS["qwen2"]()
    with pytest.raises(RouterMismatchError):
        polar_compile.optimize(model, quick_routers("llama-gqa"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SparsityConfig(layer_density={7: 0.5}), "layers \\[7\\]"),
        (SparsityConfig(dense_layers=(0, 9)), "layers \\[9\\]"),
    ],
)
def test_config_naming_missing_layers_is_refused(config, message):
    model = TINY_MODELS["llama-gqa"]()
    with pytest.raises(ValueError, match=message):
        polar_compile.optimize(model, quick_routers("llama-gqa"), config)


def test_explain_prints_one_row_per_run_of_layers_that_read_the_same():
    """A 30-80 layer model's plan stays a screen long: consecutive layers with the same plan and graph share a row,
    a layer that differs breaks the run, and each part (attention, MLP) has its own runs."""
    from polar_compile.compiler import Explanation, LayerExplanation

    rows = [LayerExplanation(0, "dense (no router)", "dense", mlp="dense (mlp='off')")]
    rows += [LayerExplanation(i, "2 of 3 groups", "rewritten: 2 of 3", mlp="dense (mlp='off')") for i in range(1, 10)]
    rows += [LayerExplanation(10, "dense (no router)", "dense", mlp="rewritten: 64 of 256 neurons")]
    rows += [LayerExplanation(11, "2 of 3 groups", "rewritten: 2 of 3", mlp="rewritten: 64 of 256 neurons")]
    lines = str(Explanation("LlamaForCausalLM", tuple(rows))).splitlines()
    assert lines == [
        "polar_compile plan for LlamaForCausalLM",
        "layer  plan               last compiled graph",
        "    0  dense (no router)  dense",
        "  1-9  2 of 3 groups      rewritten: 2 of 3",
        "   10  dense (no router)  dense",
        "   11  2 of 3 groups      rewritten: 2 of 3",
        "layer  mlp",
        "  0-9  dense (mlp='off')",
        "10-11  rewritten: 64 of 256 neurons",
    ]


def test_layer_density_overrides_a_default_dense_layer_and_conflicts_with_an_explicit_one():
    """An explicit per-layer density wins over the router file's calibrated dense layers (a default the user did
    not pass), which used to drop it in silence; the same layer in an explicit dense_layers is a contradiction, and
    a layer without an attention router cannot be sparse, whether or not dense_layers is explicit (with it, the
    check used to be skipped and the layer left dense in silence)."""
    model = TINY_MODELS["llama-gqa"]()
    routers = polar_compile.PolarRouters.for_model(model, density=0.5)  # its own: the metadata is edited below
    routers.metadata["dense_layers"] = [0, 2]
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5))
    assert model._polar_plan.sparse_layers == {1: 1}  # the file's layer 2 stays dense by default
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, layer_density={2: 1.0}))
    assert model._polar_plan.sparse_layers == {1: 1, 2: 2}
    assert "dense (kept dense: the router file's calibrated dense_layers)" in str(polar_compile.explain(model))
    with pytest.raises(ValueError, match="layer_density and dense_layers both name layers \\[2\\]"):
        polar_compile.optimize(model, routers, SparsityConfig(layer_density={2: 0.5}, dense_layers=(0, 2)))
    with pytest.raises(ValueError, match="layer_density names layers \\[0\\], which have no attention router"):
        polar_compile.optimize(model, routers, SparsityConfig(layer_density={0: 0.5}))
    with pytest.raises(ValueError, match="layer_density names layers \\[0\\], which have no attention router"):
        polar_compile.optimize(model, routers, SparsityConfig(layer_density={0: 0.5}, dense_layers=(2,)))
    routers.metadata["dense_layers"] = [0, 9]
    with pytest.raises(ValueError, match="the router file's dense_layers name layers \\[9\\]"):
        polar_compile.optimize(model, routers)


def test_mlp_routers_without_a_k_table_say_so():
    model = TINY_MODELS["opt"]()
    routers = polar_compile.PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=16)  # no mlp_density
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="on"))
    assert "no MLP k-table for this layer" in str(polar_compile.explain(model))


def test_unsupported_model_is_refused():
    from polar_compile.model_info import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        polar_compile.optimize(torch.nn.Linear(4, 4), quick_routers("llama-gqa"))


def test_a_torch_compile_wrapper_is_refused_naming_the_model_inside():
    """optimize(torch.compile(model)) used to fail as a router file "made for another model" (the wrapper's class name
    against the routers'): the error now says what was passed and what to pass instead, and so does calibrate."""
    from polar_compile.model_info import UnsupportedModelError

    model = TINY_MODELS["llama-gqa"]()
    wrapper = torch.compile(model)
    for call in (
        lambda: polar_compile.optimize(wrapper, quick_routers("llama-gqa")),
        lambda: polar_compile.calibrate(wrapper, [torch.zeros(2, 8, dtype=torch.long)], progress=False),
    ):
        with pytest.raises(UnsupportedModelError, match="OptimizedModule.*LlamaForCausalLM.*_orig_mod"):
            call()
    polar_compile.optimize(wrapper._orig_mod, quick_routers("llama-gqa"))  # the model inside is fine


def test_copies_of_an_optimized_model_are_refused_with_the_remedy():
    """Its hooks are closures over this instance (a copy's generate would drive the original); deepcopy failed with
    "cannot pickle 'mappingproxy' object" and torch.save(model) on a local hook function: now both say what to do,
    and the remedy works."""
    import copy
    import io

    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    for copier in (copy.deepcopy, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match="cannot be deep-copied or pickled.*restore"):
            copier(model)
    ids, mask = prompt_batch(model.config.vocab_size)
    sparse = generate(model, ids, mask).sequences
    polar_compile.restore(model)
    twin = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    for each in (model, twin):
        polar_compile.optimize(each, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
        assert torch.equal(generate(each, ids, mask).sequences, sparse)


def test_explain_before_optimize_says_so():
    with pytest.raises(ValueError, match="not optimized"):
        polar_compile.explain(TINY_MODELS["opt"]())


def test_dynamic_rope_is_refused_by_name():
    """transformers updates a dynamic-NTK rotary embedding behind a data-dependent branch: the fullgraph compile
    failed inside Dynamo at the first generate; optimize now says why, before touching the model."""
    from polar_compile.model_info import UnsupportedModelError
    from polar_compile.testing import tiny_model

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    try:
        model = tiny_model("LlamaConfig", **fields, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    except (TypeError, ValueError):  # a transformers that spells it rope_scaling
        model = tiny_model("LlamaConfig", **fields, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic'"):
        polar_compile.optimize(model, polar_compile.PolarRouters.for_model(model, density=0.5))
    assert not hasattr(model, "_polar_plan") and not hasattr(model, "polar_routers")
    texts = torch.randint(0, 128, (4, 16))  # calibrate refuses it too, before it reads a token of text
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic'"):
        polar_compile.calibrate(model, texts, progress=False)


def _mixed_moe():
    from polar_compile.testing import tiny_model

    # layers 0 and 2 keep a gated MLP, layer 1 has experts (Qwen2-MoE's decoder_sparse_step)
    return tiny_model("Qwen2MoeConfig", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                      decoder_sparse_step=2)  # fmt: skip


def test_a_mixture_of_experts_with_some_plain_mlps_is_planned_layer_by_layer():
    """The MLP was judged from layer 0 alone: optimize(mlp='on') failed in prepare_down_weight(None) on an expert
    layer (leaving hooks and routers behind), and calibrate in its collection hooks."""
    model = _mixed_moe()
    routers = polar_compile.PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=32, mlp_density=0.4)
    assert routers.metadata["mlp_layers"] == [2]  # layer 1's MLP is the experts
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="on"))
    assert sorted(model._polar_plan.mlp_layers) == [2]
    assert model._polar_plan.mlp_reasons[1].startswith("MLP not recognised")
    ids, mask = prompt_batch(model.config.vocab_size, seed=2)
    polar = generate(model, ids, mask)
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    assert torch.equal(polar.sequences, reference.sequences) and max_logit_difference(polar, reference) < 1e-4
    calibrated = polar_compile.calibrate(
        _mixed_moe(), [torch.randint(3, 256, (4, 64)) for _ in range(4)],
        polar_compile.CalibrationConfig(tokens=1024, epochs=1, mlp="on", mlp_rank=16, perplexity_budget=None),
        progress=False,
    )  # fmt: skip
    assert calibrated.metadata["mlp_layers"] == [2]


def test_a_failed_optimize_leaves_the_model_as_it_was(monkeypatch):
    import polar_compile.compiler as compiler

    model = TINY_MODELS["llama-gqa"]()
    monkeypatch.setattr(compiler, "pack_projections", lambda info: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        polar_compile.optimize(model, quick_routers("llama-gqa"))
    assert not hasattr(model, "_polar_plan") and "polar_routers" not in model._modules
    assert all(not layer.self_attn.q_proj._forward_pre_hooks for layer in model.model.layers)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"mlp_bias": True}, "biases on gate/up"),
        ({"hidden_act": "gelu"}, "a gated MLP with activation 'gelu'"),
    ],
)
def test_mlps_the_kernels_cannot_compute_are_refused_by_name(fields, reason):
    """Planned sparse, these were left dense by the pass, so the masked reference (which follows the plan) masked
    MLPs the compiled graph did not; they are now dense in the plan, with the reason."""
    from polar_compile.model_info import UnsupportedModelError
    from polar_compile.testing import tiny_model

    model = tiny_model("LlamaConfig", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **fields)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=reason):
        polar_compile.PolarRouters.for_model(model, density=0.5, mlp=True)
    supported = TINY_MODELS["llama-gqa"]()  # silu gate, no biases
    assert polar_compile.PolarRouters.for_model(supported, mlp=True).metadata["mlp_layers"] == [1, 2]


def test_the_reference_keeps_a_one_token_prompt_dense_as_generate_does():
    """generate runs its prefill with the model's own forward whatever its length: the reference masked a one-token
    prompt's prefill as if it were a decode step."""
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = prompt_batch(model.config.vocab_size, length=1)
    mask[:] = 1
    polar = generate(model, ids, mask)
    before = model.__dict__.get("generate")
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    assert torch.equal(polar.sequences, reference.sequences) and max_logit_difference(polar, reference) < 1e-4
    assert model.__dict__.get("generate") is before  # the reference's wrapper is gone


def test_explain_shows_only_a_graph_of_this_plan():
    """explain picked the newest graph whose layer numbers fit, whichever model compiled it: a 4-group model showed
    a 2-group model's graph, and a model re-optimized at another density showed its old graph as the latest."""
    from polar_compile.backend import compile_reports

    compile_reports.clear()  # an earlier test's graph of the same plan (same class, k and G) would count here
    mha, gqa = TINY_MODELS["llama-mha"](), TINY_MODELS["llama-gqa"]()  # 4 and 2 KV groups, 3 layers each
    polar_compile.optimize(
        mha, polar_compile.PolarRouters.for_model(mha, density=0.25), SparsityConfig(attention_density=0.25)
    )
    polar_compile.optimize(gqa, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = prompt_batch(256, seed=4)
    generate(mha, ids, mask)
    assert "rewritten: 1 of 4 KV groups" in str(polar_compile.explain(mha))
    assert "not compiled yet" in str(polar_compile.explain(gqa)) and "of 4 KV groups" not in str(
        polar_compile.explain(gqa)
    )
    generate(gqa, ids, mask)
    assert "rewritten: 1 of 2 KV groups" in str(polar_compile.explain(gqa))
    assert "rewritten: 1 of 4 KV groups" in str(polar_compile.explain(mha))  # still its own graph
    polar_compile.optimize(
        mha, polar_compile.PolarRouters.for_model(mha, density=0.75), SparsityConfig(attention_density=0.75)
    )
    assert "1 of 4 KV groups" not in str(polar_compile.explain(mha))  # the old plan's graph is not this one's
    generate(mha, ids, mask)
    assert "rewritten: 3 of 4 KV groups" in str(polar_compile.explain(mha))


def test_restore_gives_back_the_layout_and_a_compile_config_set_since():
    from transformers import CompileConfig

    model = TINY_MODELS["opt"]()
    down = [layer.fc2 for layer in model.model.decoder.layers]
    strides = [linear.weight.stride() for linear in down]
    routers = polar_compile.PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=16, mlp_density=0.4)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="on"))
    assert any(not linear.weight.is_contiguous() for linear in down)  # neuron-major while optimized
    mine = CompileConfig(backend="eager")
    model.generation_config.compile_config = mine
    polar_compile.restore(model)
    assert [linear.weight.stride() for linear in down] == strides
    assert model.generation_config.compile_config is mine


def test_explain_says_an_mlp_ran_dense_at_a_batch_size_its_k_table_keeps_dense():
    from polar_compile.backend import compile_reports

    compile_reports.clear()  # an earlier test's OPT graph of the same plan would count as this model's
    model = TINY_MODELS["opt"]()
    routers = polar_compile.PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=16, mlp_density=0.2)
    routers.metadata["mlp_k_table"] = {layer: {"1": 20, "8": None} for layer in routers.metadata["mlp_k_table"]}
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="on"))
    assert "(not compiled yet)" in str(polar_compile.explain(model))
    ids, mask = prompt_batch(model.config.vocab_size, batch=8)
    generate(model, ids, mask, new_tokens=2)
    text = str(polar_compile.explain(model))
    assert "dense in the last compiled graph: its batch size's k is above the threshold" in text, text


# --- the life of an optimized model: what users do with it after optimize ---


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_an_optimized_model_is_the_dense_model(strict):
    """torch.export traces through Dynamo too (is_compiling() is True there), so the program carried the layers'
    router_anchor ops: dense math, but a program tied to polar's ops and the routers' weights that no pass
    rewrites. The anchors are now left out under export."""
    model = TINY_MODELS["llama-gqa"]()
    dense = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids = prompt_batch(model.config.vocab_size)[0]
    program = torch.export.export(model, (ids,), {"use_cache": False}, strict=strict)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("polar" in op for op in ops), sorted(ops)
    with torch.no_grad():
        expected = dense(ids, use_cache=False).logits
    torch.testing.assert_close(program.module()(ids, use_cache=False).logits, expected)


def test_a_torch_whose_dynamo_says_exporting_under_compile_still_rewrites(monkeypatch):
    """torch 2.11's Dynamo folds torch.compiler.is_exporting() to True under every trace, torch.compile's too (2.13
    reads the flag torch.export sets). The check for export called it, so on torch 2.11 no layer got its router
    anchor and every compiled model ran dense (33 GPU tests failed there). This torch is made to answer as 2.11's
    Dynamo does; the layers must still be rewritten."""
    # True inside any Dynamo trace (is_compiling() folds to True there), False in eager code, Dynamo's own included
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = prompt_batch(model.config.vocab_size)
    generate(model, ids, mask, new_tokens=2)
    assert compile_reports[-1].counters["attention"] == model.config.num_hidden_layers - 1


def test_each_model_keeps_its_own_routers_so_moving_one_leaves_the_others():
    name, config = "llama-gqa", SparsityConfig(attention_density=0.5)
    routers = quick_routers(name)
    a, b = TINY_MODELS[name](), TINY_MODELS[name]()
    polar_compile.optimize(a, routers, config)
    polar_compile.optimize(b, routers, config)
    assert a.polar_routers is not routers and b.polar_routers is not a.polar_routers
    ids, mask = prompt_batch(b.config.vocab_size)
    before = generate(b, ids, mask)
    a.to(torch.bfloat16)  # moved a's routers in place, and with them the caller's and b's (a dtype error in b)
    assert routers.attention_router(1).weight.dtype == torch.float32
    assert torch.equal(generate(b, ids, mask).sequences, before.sequences)


@pytest.mark.parametrize("how", ["module", "forward"])
def test_a_model_compiled_in_place_is_refused_and_compiling_it_after_optimize_is_named(how, caplog):
    name = "llama-gqa"
    model = TINY_MODELS[name]()
    if how == "module":
        model.compile(backend="eager")
    else:
        model.forward = torch.compile(model.forward, backend="eager")
    with pytest.raises(ValueError, match="compiled in place"):
        polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    assert not hasattr(model, "polar_routers")
    model = TINY_MODELS[name]()
    polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    ids, mask = prompt_batch(model.config.vocab_size)
    generate(model, ids, mask, new_tokens=2)
    assert polar_compile.explain(model).rewritten_layers  # a sparse graph of this plan exists
    model.compile(backend="eager")  # after optimize: its steps would run through this graph, dense
    with caplog.at_level("WARNING", logger="polar_compile"):
        generate(model, ids, mask, new_tokens=2)
    assert "compiled in place: model.compile() was called on it after optimize" in caplog.text
    explained = polar_compile.explain(model)  # the graph is there, but this model's steps cannot run it now
    assert explained.rewritten_layers == [], str(explained)
    assert "not used: model.compile() was called on it after optimize" in str(explained)


def test_explain_does_not_call_a_graph_rewritten_for_a_model_whose_compile_config_is_another_backend():
    from transformers import CompileConfig

    name = "llama-gqa"
    model = TINY_MODELS[name]()
    polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    generate(model, *prompt_batch(model.config.vocab_size), new_tokens=2)
    polar = model.generation_config.compile_config
    assert polar_compile.explain(model).rewritten_layers
    model.generation_config.compile_config = CompileConfig(backend="eager")
    explained = polar_compile.explain(model)
    assert explained.rewritten_layers == [] and "backend 'eager'" in str(explained), str(explained)
    model.generation_config.compile_config = polar
    assert polar_compile.explain(model).rewritten_layers


def test_a_parameter_two_projections_share_stays_shared():
    from polar_compile.packing import pack_projections

    model = TINY_MODELS["llama-gqa"]()
    layers = model.model.layers
    layers[2].self_attn.k_proj.weight = layers[1].self_attn.k_proj.weight
    ids, mask = prompt_batch(model.config.vocab_size)
    dense = generate(model, ids, mask, disable_compile=True)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=1.0))
    assert layers[2].self_attn.k_proj.weight is layers[1].self_attn.k_proj.weight  # packing untied them
    _, reasons = pack_projections(model._polar_plan.info)
    assert set(reasons) == {"layer 1 q/k/v", "layer 2 q/k/v"}
    assert all("shared with another projection" in reason for reason in reasons.values())
    assert torch.equal(generate(model, ids, mask).sequences, dense.sequences)


def test_replacing_some_projection_weights_between_generate_calls_repacks_them():
    name = "llama-gqa"
    model = TINY_MODELS[name]()
    polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    ids, mask = prompt_batch(model.config.vocab_size)
    generate(model, ids, mask)  # compiles the step the next call reuses (same shapes)
    attention = model.model.layers[2].self_attn  # not the first group (the only one checked before)
    attention.k_proj.weight.data = attention.k_proj.weight.detach() * 2  # own storage: PackedLayoutError before
    polar = generate(model, ids, mask)
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    assert torch.equal(polar.sequences, reference.sequences)
    assert max_logit_difference(polar, reference) < LOGIT_TOLERANCE


def test_state_dict_leaves_the_routers_out_and_a_plain_checkpoint_loads_strictly():
    from polar_compile.routers.io import load_routers, save_routers

    name = "llama-gqa"
    plain = TINY_MODELS[name]()
    model = TINY_MODELS[name]()
    polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.load_state_dict(plain.state_dict())  # strict: the routers are not missing keys
    plain.load_state_dict(model.state_dict())  # strict: nor unexpected ones
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in plain.state_dict().items() if "layers.1." not in k})
    path = __import__("tempfile").mkdtemp() + "/routers.safetensors"
    save_routers(model.polar_routers, path)  # the routers' own state_dict keeps every tensor
    loaded = load_routers(path, model)
    assert loaded.state_dict().keys() == quick_routers(name).state_dict().keys()


def test_training_through_a_callers_compile_after_optimize_gets_the_plain_gradients():
    name = "llama-gqa"
    plain, model = TINY_MODELS[name](), TINY_MODELS[name]()
    polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    ids, _ = prompt_batch(model.config.vocab_size)
    losses = []
    for m in (plain, torch.compile(model, backend="eager")):  # the hooks mark tensors while Dynamo traces
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()  # "no autograd formula was registered" for polar::router_anchor before
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1])
    for (name_a, a), (_, b) in zip(plain.named_parameters(), model.named_parameters(), strict=False):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name_a


def test_explain_matches_the_mlp_k_of_this_plan():
    from types import SimpleNamespace

    from polar_compile.compiler import _mlp_row_matches

    def row(layer, detail, rewritten=True):
        return SimpleNamespace(layer=layer, detail=detail, rewritten=rewritten, component="mlp")

    table = {1: (None, 102, 102, 307)}
    assert _mlp_row_matches(row(1, "102 of 512 neurons shared by the batch"), table)
    assert _mlp_row_matches(row(1, "307 of 512 neurons shared by the batch"), table)
    assert not _mlp_row_matches(row(1, "205 of 512 neurons shared by the batch"), table)  # another model's k-table
    assert not _mlp_row_matches(row(2, "102 of 512 neurons shared by the batch"), table)  # not sparse in this plan
    assert _mlp_row_matches(row(2, "k above the threshold", rewritten=False), table)


def test_optimize_says_when_no_layer_can_decode_sparse_attention(caplog):
    """Routers with no attention router for the layers asked to be sparse, or a model loaded with eager attention,
    decode dense: optimize says so, not only explain after a generate. A router file that has them: no warning."""
    name = "llama-gqa"
    model = TINY_MODELS[name]()
    with caplog.at_level("WARNING", logger="polar_compile"):
        polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5, dense_layers=()))
    assert "no layer" not in caplog.text and "attention_implementation" not in caplog.text, caplog.text
    none = polar_compile.PolarRouters.for_model(model, layers=[])
    with caplog.at_level("WARNING", logger="polar_compile"):
        polar_compile.optimize(model, none, SparsityConfig(attention_density=0.5, dense_layers=()))
    assert "no layer of LlamaForCausalLM will decode sparse attention" in caplog.text, caplog.text
    assert "(0,1,2)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="polar_compile"):  # density 1.0 without routers: dense by request
        polar_compile.optimize(model, none, SparsityConfig(attention_density=1.0, dense_layers=()))
    assert "no layer" not in caplog.text, caplog.text
    model.set_attn_implementation("eager")
    with caplog.at_level("WARNING", logger="polar_compile"):
        polar_compile.optimize(model, quick_routers(name), SparsityConfig(attention_density=0.5))
    assert "runs attention_implementation 'eager'" in caplog.text, caplog.text
