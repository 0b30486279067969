"""Shared test helpers: dtype-bounded tolerances, hypothesis profiles, tiny seeded HF models.

Used by the test suite and by the GPU property runs; importing it needs torch and transformers only
(hypothesis is imported lazily by :func:`register_hypothesis_profiles`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch

# Unit roundoff of each dtype: the error one rounding to that dtype can introduce, relative.
_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative rounding error of ``dtype`` (2^-8 for bf16, 2^-11 for fp16, 2^-24 for fp32)."""
    try:
        return _UNIT_ROUNDOFF[dtype]
    except KeyError:
        raise ValueError(f"no rounding model for dtype {dtype}") from None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError("result holds NaN or Inf")
    denominator = e.norm().item()
    numerator = (a - e).norm().item()
    if denominator == 0.0:
        return numerator
    return numerator / denominator


def assert_close_to_reference(
    actual: torch.Tensor,
    exact: torch.Tensor,
    same_dtype_baseline: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    slack: float | None = None,
) -> None:
    """Assert ``actual`` is as close to ``exact`` as the dtype allows (flash-attention's rule).

    exact: the same math in float64 (the truth).
    same_dtype_baseline: the same math done in plain PyTorch at ``actual``'s dtype; the kernel may be at
        most ``factor`` times as far from the truth as this baseline is. Without one, the bound is a few
        unit roundoffs of ``actual``'s dtype.
    slack: small absolute allowance on the relative error (default: 4 unit roundoffs of a 16-bit dtype, 16 of
        fp32, ~1e-6: a single fp32 output whose plain-PyTorch baseline happens to be exact may be a few roundoffs
        off through another summation order and an activation, which 4 did not cover).
    """
    dtype = actual.dtype
    eps = unit_roundoff(dtype)
    slack = (16.0 if dtype == torch.float32 else 4.0) * eps if slack is None else slack
    error = relative_error(actual, exact)
    if same_dtype_baseline is not None:
        bound = factor * relative_error(same_dtype_baseline, exact) + slack
        what = f"{factor} x baseline error {relative_error(same_dtype_baseline, exact):.3e} + {slack:.1e}"
    else:
        bound = 8.0 * eps + slack
        what = f"8 unit roundoffs of {dtype} + {slack:.1e}"
    if not error <= bound:
        raise AssertionError(f"relative error {error:.3e} exceeds {bound:.3e} ({what})")


# --------------------------------------------------------------------------------------------------
# Hypothesis profiles: "ci" is small and derandomised (2-core CI, interpreter-run kernels); "dev" digs
# deeper. Select with HYPOTHESIS_PROFILE=dev; tests/conftest.py loads "ci" by default.
# --------------------------------------------------------------------------------------------------


def register_hypothesis_profiles() -> None:
    from hypothesis import HealthCheck, settings

    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    settings.register_profile("ci", max_examples=12, derandomize=True, print_blob=True, **common)
    settings.register_profile("dev", max_examples=100, **common)
    settings.register_profile("gpu", max_examples=40, derandomize=True, print_blob=True, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --------------------------------------------------------------------------------------------------
# Where to run the Triton kernels in tests.
# --------------------------------------------------------------------------------------------------


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_device() -> str | None:
    """Device to run the real Triton kernels on: "cuda", "cpu" (interpreter) or None (cannot run)."""
    if not triton_available():
        return None
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


# --------------------------------------------------------------------------------------------------
# Tiny random HF models, seeded. head_dim 64 so the GPU kernels' supported sizes are exercised.
# --------------------------------------------------------------------------------------------------

TINY_HIDDEN = 256
TINY_LAYERS = 3
TINY_VOCAB = 256


def _build(config_cls_name: str, seed: int, dtype: torch.dtype, **fields) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, config_cls_name)(**fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if dtype != torch.float32:
        # The same model in every dtype: torch 2.11 draws a bf16 / fp16 model's initial weights in that dtype (other
        # values than the fp32 model's, rounded), 2.13 draws them in fp32 and rounds. Take the fp32 model's, rounded
        # (load_state_dict casts into each tensor's dtype), so a router file made on the fp32 model fits on both.
        torch.manual_seed(seed)
        full = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32, attn_implementation="sdpa")
        model.load_state_dict(full.state_dict())
    # transformers initialises linear biases to zero: a pass or kernel that dropped a bias (or read it at the wrong
    # offset) would then compute the same numbers. Random biases make every test model's biases count.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(module, torch.nn.Linear) and bias is not None:
                bias.copy_(0.1 * torch.randn(bias.shape, generator=generator).to(bias.dtype))
    return model.eval()


def tiny_model(config_name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **fields) -> torch.nn.Module:
    """Any Hugging Face decoder from its config class name and fields, randomly initialised, SDPA attention."""
    return _build(config_name, seed, dtype, **fields)


def tiny_llama(*, gqa: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Llama, 3 layers, 4 query heads of 64; GQA (2 KV heads) or MHA (4 KV heads)."""
    return _build(
        "LlamaConfig",
        seed,
        dtype,
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=512,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def tiny_mistral(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Mistral, 8 query heads of 64 over 2 KV heads (ratio 4); sliding window off so StaticCache stays plain."""
    return _build(
        "MistralConfig",
        seed,
        dtype,
        vocab_size=TINY_VOCAB,
        hidden_size=512,
        intermediate_size=512,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=None,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def tiny_qwen2(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Qwen2 (q/k/v projections with bias), 6 query heads of 64 over 2 KV heads (ratio 3)."""
    return _build(
        "Qwen2Config",
        seed,
        dtype,
        vocab_size=TINY_VOCAB,
        hidden_size=384,
        intermediate_size=512,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )


def tiny_opt(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """OPT (ReLU MLP, biases everywhere, MHA), 4 heads of 64."""
    return _build(
        "OPTConfig",
        seed,
        dtype,
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        ffn_dim=512,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=TINY_HIDDEN,
        max_position_embeddings=512,
        activation_function="relu",
        enable_bias=True,
    )


TINY_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "llama-gqa": lambda **kw: tiny_llama(gqa=True, **kw),
    "llama-mha": lambda **kw: tiny_llama(gqa=False, **kw),
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "opt": tiny_opt,
}
