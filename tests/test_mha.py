import pytest
import torch

from polar_compile.mha import expand_kv_heads
from polar_compile.model_info import describe_model
from polar_compile.testing import TINY_MODELS


@pytest.mark.parametrize("name", ["llama-gqa", "mistral", "qwen2"])
def test_expanded_model_is_the_same_function(name):
    model = TINY_MODELS[name]()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        expand_kv_heads(model)
        after = model(ids).logits
    info = describe_model(model)
    assert info.num_kv_heads == info.num_heads and info.group_size == 1
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert out.shape == (2, 12)


def test_mha_model_is_left_alone():
    model = TINY_MODELS["llama-mha"]()
    weight = model.model.layers[0].self_attn.k_proj.weight
    assert expand_kv_heads(model).model.layers[0].self_attn.k_proj.weight is weight


def test_expand_refuses_an_optimized_model_and_a_norm_over_the_kv_heads():
    """A k norm over all KV heads (OLMo-2) returned normally and crashed at the first forward, with the model
    already changed; an optimized model went dense in silence."""
    import pytest

    import polar_compile
    from polar_compile.mha import expand_kv_heads
    from polar_compile.model_info import UnsupportedModelError
    from polar_compile.testing import TINY_MODELS, tiny_model

    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, polar_compile.PolarRouters.for_model(model, density=0.5))
    with pytest.raises(ValueError, match="restore"):
        expand_kv_heads(model)
    olmo = tiny_model("Olmo2Config", vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    k_proj = olmo.model.layers[0].self_attn.k_proj
    with pytest.raises(UnsupportedModelError, match="k_norm of layer 0 has weights sized to the 2 KV heads"):
        expand_kv_heads(olmo)
    assert olmo.model.layers[0].self_attn.k_proj is k_proj and olmo.config.num_key_value_heads == 2  # untouched
