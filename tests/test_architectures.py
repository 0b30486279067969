"""Decoders beyond the five the benchmarks use: polar_compile has no per-model code, so any Hugging Face decoder
whose layers and decode graph match must work unchanged (separate or fused q/k/v linears; an MLP it cannot make
sparse stays dense), and any other must be refused with the reason.

Tiny random models, fp32, on the CPU (Dynamo's graph with the CPU references) and on CUDA where there is one
(inductor, CUDA graphs, the Triton kernels): density 1.0 reproduces the dense model, and half the KV groups
reproduce the masked reference (the dense model with the unselected heads zeroed).
"""

import pytest
import torch
import transformers

import polar_compile
from polar_compile.config import CalibrationConfig, SparsityConfig
from polar_compile.model_info import UnsupportedModelError
from polar_compile.reference import masked_reference
from polar_compile.routers.modules import PolarRouters
from polar_compile.testing import tiny_model
from tests import compiler_helpers as helpers
from tests.compiler_helpers import DEVICES, generate, max_logit_difference, prompt_batch, quick_routers

LOGIT_TOLERANCE = 1e-4  # fp32: summation order only
BF16_LOGIT_TOLERANCE = 0.05  # bf16 against fp32 (tests/test_optimize.py)
_COMMON = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=512)  # fmt: skip

_FULL = ["full_attention"] * 3  # no sliding-window layers: those recompile every token (tests/test_generation.py)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # within the tiny vocabulary
_MOE = dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)

SUPPORTED = {  # name: (config class, fields beyond _COMMON), each with something Llama does not have
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=64)),  # q/k RMSNorm per head
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=64)),  # scaled embeddings, GeLU gate
    "phi": ("PhiConfig", dict(num_key_value_heads=4)),  # partial rotary, biases, plain fc1/fc2 MLP
    "stablelm": ("StableLmConfig", dict(num_key_value_heads=2)),  # partial rotary, LayerNorm
    "starcoder2": ("Starcoder2Config", dict(num_key_value_heads=2, sliding_window=None)),  # biases, plain MLP
    "granite": ("GraniteConfig", dict(num_key_value_heads=2)),  # attention and residual multipliers
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2)),  # q/k norms over all heads, post-norms
    "cohere": ("CohereConfig", dict(num_key_value_heads=2)),  # attention and MLP in parallel from one norm
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=64, layer_types=_FULL)),  # q/k norms, scalar
    "glm4": ("Glm4Config", dict(num_key_value_heads=2, head_dim=64, **_IDS)),  # post-norms, interleaved rotary
    "smollm3": ("SmolLM3Config", dict(num_key_value_heads=2, no_rope_layers=[1, 0, 1], **_IDS)),  # layer 1: no rotary
    "exaone4": ("Exaone4Config", dict(num_key_value_heads=2, layer_types=_FULL)),  # post-norms, q/k norms
    "olmo3": ("Olmo3Config", dict(num_key_value_heads=2, layer_types=_FULL, **_IDS)),
    "arcee": ("ArceeConfig", dict(num_key_value_heads=2)),  # up/down MLP with ReLU squared, no gate
    # mixtures of experts: the attention goes sparse, the experts' block stays dense (with a shared gated expert
    # inside it in Qwen2-MoE, which is not the layer's MLP)
    "qwen2_moe": ("Qwen2MoeConfig", dict(_MOE, moe_intermediate_size=128, shared_expert_intermediate_size=256)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE, head_dim=64, moe_intermediate_size=128)),
    "olmoe": ("OlmoeConfig", _MOE),
    # one fused q/k/v linear: Phi-3 (q, k, v blocks; its gate/up fused too: see the tests below), GPT-NeoX (heads
    # interleaved), Falcon (GQA); Mixtral: a mixture of experts, so the attention is sparse and the MLP dense
    # (tiny Phi-3's fused q/k/v is 256 -> 512, the shape of an MLP up projection here: the MLP is looked for
    # outside the attention block)
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict()),
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}
MLP_NOT_RECOGNISED = {"mixtral", "falcon", "qwen2_moe", "qwen3_moe", "olmoe"}  # experts; Falcon: no intermediate_size

REFUSED = {  # name: (config class, fields, what the error names)
    "gpt2": ("GPT2Config", dict(n_embd=256, n_layer=3, n_head=4, vocab_size=256, n_positions=512), "Conv1D"),
}


def _falcon_caches_kv_groups() -> bool:
    """Whether this transformers' Falcon caches its KV groups (repeat_kv after the cache, as Llama does); the one on
    the GPU host (5.17) expands K and V to every query head before the cache instead."""
    from transformers.models.falcon import modeling_falcon

    return hasattr(modeling_falcon, "repeat_kv")


def _model(config_name: str, fields: dict):
    if not hasattr(transformers, config_name):
        pytest.skip(f"this transformers has no {config_name}")
    return tiny_model(config_name, **fields)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_decoder_works_with_no_per_model_code(name, device):
    config_name, fields = SUPPORTED[name]
    model = _model(config_name, dict(_COMMON, **fields)).to(device)
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size, seed=3))
    dense = generate(model, ids, mask, disable_compile=True)
    routers = PolarRouters.for_model(model, density=0.5)
    if name == "falcon" and not _falcon_caches_kv_groups():
        # no cache tensor has the router's groups: the layers stay dense, with the reason
        polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5))
        polar = generate(model, ids, mask)
        assert torch.equal(dense.sequences, polar.sequences)
        assert max_logit_difference(dense, polar) < LOGIT_TOLERANCE
        explanation = polar_compile.explain(model)
        assert explanation.rewritten_layers == [] and "not the router's 2 groups" in str(explanation), str(explanation)
        return

    polar_compile.optimize(model, routers, SparsityConfig(attention_density=1.0))
    polar = generate(model, ids, mask)
    assert torch.equal(dense.sequences, polar.sequences)
    assert max_logit_difference(dense, polar) < LOGIT_TOLERANCE
    explanation = polar_compile.explain(model)
    assert explanation.rewritten_layers == [1, 2], str(explanation)

    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5))
    sparse = generate(model, ids, mask)
    explanation = polar_compile.explain(model)
    assert explanation.rewritten_layers == [1, 2]
    if name in MLP_NOT_RECOGNISED:  # the attention goes sparse; the MLP stays dense and says why
        assert all(row.mlp.startswith("dense (MLP not recognised") for row in explanation.layers), str(explanation)
        with pytest.raises(UnsupportedModelError, match="MLP is not one polar_compile can make sparse"):
            PolarRouters.for_model(model, mlp=True)
        with pytest.raises(UnsupportedModelError, match="mlp='on'"):  # before any text is read
            polar_compile.calibrate(model, [ids], CalibrationConfig(mlp="on"), progress=False)
    with masked_reference(model):
        reference = generate(model, ids, mask, disable_compile=True)
    assert torch.equal(reference.sequences, sparse.sequences)
    assert max_logit_difference(reference, sparse) < LOGIT_TOLERANCE
    assert max_logit_difference(dense, sparse) > 100 * LOGIT_TOLERANCE  # sparsity really changed the step


def _phi3_with_mlp(forward=None):
    model = _model("Phi3Config", dict(_COMMON, **SUPPORTED["phi3"][1]))
    for layer in model.model.layers if forward is not None else ():
        layer.mlp.forward = forward.__get__(layer.mlp)
    return model


def _up_first(self, hidden_states):  # the fused weight's halves the other way round: [up; gate]
    up, gate = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return self.down_proj(up * self.activation_fn(gate))


def _gelu_gate(self, hidden_states):  # a gate the gated kernel does not compute
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return self.down_proj(torch.nn.functional.gelu(gate) * up)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forward", [None, _up_first], ids=["gate-first", "up-first"])
def test_fused_gate_up_mlp_goes_sparse_when_asked(forward, device):
    """Phi-3 keeps gate and up in one linear d -> 2F: with mlp='on' the MLP pass reads from the graph which half goes
    through silu, and the gated kernel takes the two halves of the weight as views (no copy). On CUDA the MLP
    kernels take bf16 (an fp32 MLP stays dense there), so the model runs in bf16 against the masked reference of
    the same weights in fp32, with routers whose choices do not hinge on rounding."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _phi3_with_mlp(forward).to(device, dtype)
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size, seed=4))
    weight = model.model.layers[1].mlp.gate_up_proj.weight
    storage = weight.untyped_storage().data_ptr()
    routers = PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=32, mlp_density=0.4)
    if device == "cuda":
        routers = helpers.far_apart(routers)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="on"))
    sparse = generate(model, ids, mask)
    explanation = polar_compile.explain(model)
    assert all(row.mlp.startswith("rewritten: ") for row in explanation.layers[1:]), str(explanation)
    assert model.model.layers[1].mlp.gate_up_proj.weight.untyped_storage().data_ptr() == storage
    if device == "cuda":
        model.float()
        with masked_reference(model):
            reference = generate(model, ids, mask, disable_compile=True)
        steps, difference = helpers.logits_until_tokens_part(reference, sparse)
        assert steps >= 2 and difference < BF16_LOGIT_TOLERANCE, (steps, difference)
        model.to(dtype)
    else:
        with masked_reference(model):
            reference = generate(model, ids, mask, disable_compile=True)
        assert torch.equal(reference.sequences, sparse.sequences)
        assert max_logit_difference(reference, sparse) < LOGIT_TOLERANCE
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="off"))
    attention_only = generate(model, ids, mask)
    floor = 4 * BF16_LOGIT_TOLERANCE if device == "cuda" else 100 * LOGIT_TOLERANCE
    assert helpers.logits_until_tokens_part(attention_only, sparse)[1] > floor  # the MLP really went sparse


def test_fused_gate_up_mlp_the_kernel_cannot_compute_stays_dense_with_the_reason():
    model = _phi3_with_mlp(_gelu_gate)
    ids, mask = prompt_batch(model.config.vocab_size, seed=4)
    routers = PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=32, mlp_density=0.4)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="on"))
    sparse = generate(model, ids, mask)
    explanation = polar_compile.explain(model)
    assert all("exactly one half through silu" in row.mlp for row in explanation.layers[1:]), str(explanation)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, mlp="off"))
    assert max_logit_difference(generate(model, ids, mask), sparse) < LOGIT_TOLERANCE  # attention sparse, MLP dense


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_decoder_that_does_not_match_is_refused_with_the_reason(name):
    config_name, fields, reason = REFUSED[name]
    model = _model(config_name, fields)
    with pytest.raises(UnsupportedModelError, match=reason):  # before anything about the routers is checked
        polar_compile.optimize(model, quick_routers("llama-gqa"))


def test_decoder_with_only_eager_attention_stays_dense_with_the_reason(caplog):
    """Gemma-2 has no SDPA path in transformers (it soft-caps its attention scores), so its decode graph has no
    scaled_dot_product_attention for the pass to rewrite: every layer stays dense, says why, and decodes as before."""
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma2Config")
    config = transformers.Gemma2Config(**dict(_COMMON, num_key_value_heads=2, head_dim=64, layer_types=_FULL))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids, mask = prompt_batch(model.config.vocab_size, seed=3)
    dense = generate(model, ids, mask, disable_compile=True)
    with caplog.at_level("WARNING", logger="polar_compile"):  # said at optimize, before any generate
        polar_compile.optimize(model, PolarRouters.for_model(model, density=0.5), SparsityConfig(attention_density=0.5))
    assert "attention_implementation 'eager'" in caplog.text and "attn_implementation='sdpa'" in caplog.text
    sparse = generate(model, ids, mask)
    explanation = polar_compile.explain(model)
    assert explanation.rewritten_layers == [], str(explanation)
    assert all("no scaled_dot_product_attention" in row.compiled for row in explanation.layers), str(explanation)
    assert torch.equal(dense.sequences, sparse.sequences)
    assert max_logit_difference(dense, sparse) < LOGIT_TOLERANCE


def test_a_model_without_attention_is_refused_naming_the_field_it_lacks():
    """Mamba's config has num_hidden_layers and hidden_size: the error named all three fields as missing."""
    if not hasattr(transformers, "MambaConfig"):
        pytest.skip("this transformers has no MambaConfig")
    config = transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=256, state_size=8)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="MambaConfig has no num_attention_heads: .*an attention decoder"):
        polar_compile.optimize(model, quick_routers("llama-gqa"))
