"""The real SmolLM2-135M through the polar backend (CPU): density 1.0 reproduces dense greedy decoding."""

import pytest
import torch

import polar_compile
from polar_compile.assets import load_smollm2
from polar_compile.config import SparsityConfig
from polar_compile.routers.modules import PolarRouters

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "In 1969, the first humans", "A healthy breakfast includes"]


def _greedy(model, inputs, tokens=12):
    return model.generate(**inputs, max_new_tokens=tokens, do_sample=False, cache_implementation="static")


def test_density_one_matches_dense_greedy_tokens():
    model, tokenizer = load_smollm2()
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        dense = _greedy(model, inputs)
        # density 1.0 selects every group whatever the router says, so uncalibrated routers suffice here
        polar_compile.optimize(model, PolarRouters.for_model(model, density=1.0), SparsityConfig(attention_density=1.0))
        polar = _greedy(model, inputs)
    assert torch.equal(dense, polar)
    assert polar_compile.explain(model).rewritten_layers == list(range(1, 30))
    assert "Paris" in tokenizer.decode(polar[0])
