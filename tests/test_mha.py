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
