import pytest
import torch

from polar_compile.model_info import UnsupportedModelError, describe_model
from polar_compile.testing import TINY_MODELS, assert_close_to_reference, relative_error, unit_roundoff


def test_tolerance_accepts_dtype_level_error_and_rejects_more():
    torch.manual_seed(0)
    a, b = torch.randn(64, 64, dtype=torch.float64), torch.randn(64, 64, dtype=torch.float64)
    exact = a @ b
    baseline = (a.bfloat16() @ b.bfloat16()).float()
    # A kernel that computes the same bf16 math passes; one that is 10x noisier does not.
    assert_close_to_reference(baseline.bfloat16(), exact, baseline.bfloat16())
    noisy = (exact + 10 * (baseline.double() - exact)).bfloat16()
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference(noisy, exact, baseline.bfloat16())


def test_tolerance_rejects_nan_and_shape_mismatch():
    with pytest.raises(AssertionError, match="NaN"):
        relative_error(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(AssertionError, match="shape"):
        relative_error(torch.zeros(2), torch.zeros(3))
    assert unit_roundoff(torch.bfloat16) == 2.0**-8


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_models_build_run_and_describe(name):
    model = TINY_MODELS[name](seed=1)
    again = TINY_MODELS[name](seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, again(ids).logits), "factories must be seeded"
    assert logits.shape == (2, 5, model.config.vocab_size) and torch.isfinite(logits).all()
    info = describe_model(model)
    assert info.num_layers == model.config.num_hidden_layers
    assert info.num_heads % info.num_groups == 0 and info.head_dim == 64
    assert info.relu_mlp == (name == "opt")


def test_describe_model_refuses_what_it_cannot_read():
    with pytest.raises(UnsupportedModelError, match="no .config"):
        describe_model(torch.nn.Linear(2, 2))
    model = TINY_MODELS["llama-gqa"]()
    model.model.layers[1].self_attn.q_proj = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="layer 1.*q_proj"):
        describe_model(model)
