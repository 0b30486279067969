"""``expand_kv_heads``: rewrite a GQA model as the mathematically identical MHA model.

Each KV head's k_proj / v_proj rows (and biases) are repeated for the query heads that share it, in HF's
``repeat_kv`` order, so every query head gets its own KV head and becomes its own routing group. The outputs
are unchanged (up to float rounding); the KV cache grows by the GQA ratio.
"""

from __future__ import annotations

import torch
from torch import nn

from polar_compile.model_info import UnsupportedModelError, describe_model


def _repeat_rows(linear: nn.Linear, num_kv_heads: int, head_dim: int, repeats: int) -> nn.Linear:
    weight = linear.weight.detach()
    grouped = weight.view(num_kv_heads, head_dim, -1).repeat_interleave(repeats, dim=0)
    expanded = nn.Linear(linear.in_features, grouped.shape[0] * head_dim, bias=linear.bias is not None)
    expanded = expanded.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        expanded.weight.copy_(grouped.reshape(-1, linear.in_features))
        if linear.bias is not None:
            expanded.bias.copy_(
                linear.bias.detach().view(num_kv_heads, head_dim).repeat_interleave(repeats, 0).reshape(-1)
            )
    return expanded


def expand_kv_heads(model: nn.Module) -> nn.Module:
    """In place: give every query head its own KV head (config.num_key_value_heads = num_attention_heads)."""
    info = describe_model(model)
    repeats = info.group_size
    if repeats == 1:
        return model
    if getattr(model, "_polar_plan", None) is not None:
        raise ValueError("expand_kv_heads on an optimized model: call polar_compile.restore(model) first, expand, then "
                         "optimize with routers made for the expanded model")  # fmt: skip
    if info.layers[0].qkv_fused:
        raise UnsupportedModelError("expand_kv_heads needs separate k_proj / v_proj linears; this model fuses q/k/v")
    kv_width = info.num_kv_heads * info.head_dim
    for layer in info.layers:  # checked for every layer before any is changed
        for name, module in layer.attention.named_children():
            if isinstance(module, nn.Linear):  # the projections: k/v are expanded, q/o do not depend on KV heads
                continue
            sized = [p for p in module.parameters() if p.shape and p.shape[0] == kv_width and kv_width != info.head_dim]
            if sized:
                raise UnsupportedModelError(
                    f"expand_kv_heads: {name} of layer {layer.index} has weights sized to the {info.num_kv_heads} KV "
                    f"heads ({kv_width}), such as a k norm over all of them (OLMo-2, Cohere qk-norm): it cannot be "
                    "expanded without changing the model"
                )
    for layer in info.layers:
        attention = layer.attention
        attention.k_proj = _repeat_rows(attention.k_proj, info.num_kv_heads, info.head_dim, repeats)
        attention.v_proj = _repeat_rows(attention.v_proj, info.num_kv_heads, info.head_dim, repeats)
        for name in ("num_key_value_groups",):
            if hasattr(attention, name):
                setattr(attention, name, 1)
        if hasattr(attention, "num_key_value_heads"):
            attention.num_key_value_heads = info.num_heads
    model.config.num_key_value_heads = info.num_heads
    return model
