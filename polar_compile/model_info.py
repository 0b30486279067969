"""What polar_compile needs to know about a Hugging Face decoder, found from its config and module tree.

No per-model code: the decoder layers are the ``nn.ModuleList`` of length ``config.num_hidden_layers``;
in each layer, the attention block is the module owning ``q_proj``/``k_proj``/``v_proj`` linears, or one fused
linear d -> (Hq + 2 Hkv) * D (Phi-3's ``qkv_proj``, GPT-NeoX's and Falcon's ``query_key_value``: the passes follow
the graph from its input, whatever its layout), and its output projection is the remaining linear of width
``num_heads * head_dim``; the MLP is a child of the layer (or the layer's own linears, as OPT's ``fc1``/``fc2``),
never a module deeper down (a mixture of experts' shared expert is part of the experts' block), and is either gated
(``gate_proj``/``up_proj``/``down_proj``, or one fused gate/up linear d -> 2F with a down linear F -> d, as Phi-3's
``gate_up_proj``: which half is the gate the MLP pass reads from the graph) or a pair of linears d -> F -> d. An MLP
of any other form (a mixture of experts) is described as ``mlp_kind == "other"``: it stays dense, with that reason,
while the attention goes sparse. A layer without such an attention block raises :class:`UnsupportedModelError`
naming what was missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's structure is not one polar_compile understands (the message says which part)."""


@dataclass(frozen=True)
class LayerInfo:
    index: int
    path: str  # qualified name of the decoder layer, e.g. "model.layers.3"
    attention: nn.Module
    q_proj: nn.Linear  # the q projection, or the fused q/k/v one (qkv_fused): its input is the router's
    o_proj: nn.Linear
    mlp_kind: str  # "gated" | "plain" | "other" (not recognised: stays dense, see mlp_reason)
    mlp_up: nn.Linear | None  # up_proj (gated; None when fused with the gate) or fc1 (plain)
    mlp_gate: nn.Linear | None  # gate_proj, or the fused gate/up linear d -> 2F
    mlp_down: nn.Linear | None
    qkv_fused: bool = False
    mlp_reason: str = ""  # mlp_kind "other": what was looked for


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int | None  # None: no MLP of a recognised form (they stay dense)
    activation: str
    layers: tuple[LayerInfo, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_groups(self) -> int:
        """KV groups a router chooses among: the KV heads (for MHA, every head is its own group)."""
        return self.num_kv_heads

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def relu_mlp(self) -> bool:
        return self.mlp_kind == "plain" and self.activation == "relu"

    @property
    def mlp_kind(self) -> str:
        return self.layers[0].mlp_kind


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _find_layer_list(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(candidates) != 1:
        found = [name for name, _ in candidates] or "none"
        raise UnsupportedModelError(f"expected exactly one nn.ModuleList of {num_layers} decoder layers, found {found}")
    return candidates[0]


def _linear_child(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _is_linear(module: nn.Module, in_features: int, out_features: int) -> bool:
    return isinstance(module, nn.Linear) and (module.in_features, module.out_features) == (in_features, out_features)


def _describe_layer(
    index: int,
    path: str,
    layer: nn.Module,
    hidden: int,
    attn_width: int,
    qkv_width: int,
    intermediate: int | None,
    config_name: str,
) -> LayerInfo:
    attention, q_proj, fused = None, None, False
    for module in layer.modules():  # separate projections first, then one fused q/k/v linear
        if all(_linear_child(module, n) is not None for n in ("q_proj", "k_proj", "v_proj")):
            attention, q_proj = module, module.q_proj
            break
    for module in layer.modules() if attention is None else ():
        qkv = [m for m in module.children() if _is_linear(m, hidden, qkv_width)]
        if len(qkv) == 1:
            attention, q_proj, fused = module, qkv[0], True
            break
    if attention is None:
        raise UnsupportedModelError(
            f"layer {index} ({path}) has no attention block with q_proj/k_proj/v_proj linears or one fused "
            f"{hidden} -> {qkv_width} q/k/v linear (a Conv1D or otherwise shaped projection is not supported)"
        )
    outputs = [
        m
        for name, m in attention.named_children()
        if isinstance(m, nn.Linear)
        and m is not q_proj
        and name not in ("q_proj", "k_proj", "v_proj")
        and m.in_features == attn_width
        and m.out_features == hidden
    ]
    if len(outputs) != 1:
        raise UnsupportedModelError(
            f"layer {index}: expected one output projection ({attn_width} -> {hidden}) in the attention block,"
            f" found {len(outputs)}"
        )
    o_proj = outputs[0]

    found = dict(index=index, path=path, attention=attention, q_proj=q_proj, o_proj=o_proj, qkv_fused=fused)
    # The layer's own MLP only (a direct child, as layer.mlp is): a gate/up/down module deeper down is part of
    # something else, e.g. the shared expert inside Qwen2-MoE's or Llama-4's mixture of experts.
    gated = [m for m in layer.children() if all(_linear_child(m, n) for n in ("gate_proj", "up_proj", "down_proj"))]
    if gated:
        mlp = gated[0]
        return LayerInfo(**found, mlp_kind="gated", mlp_up=mlp.up_proj, mlp_gate=mlp.gate_proj, mlp_down=mlp.down_proj)
    if intermediate is None:
        why = (
            f"no gate_proj/up_proj/down_proj MLP, and {config_name} has no intermediate_size / ffn_dim to find another"
        )
        return LayerInfo(**found, mlp_kind="other", mlp_up=None, mlp_gate=None, mlp_down=None, mlp_reason=why)
    # Linears of the layer or of its direct children (OPT's fc1, GPT-NeoX's mlp.dense_h_to_4h), never deeper
    near = [m for child in layer.children() for m in (child, *child.children())]
    outside_attention = [m for m in near if not any(m is a for a in attention.modules())]
    ups = [m for m in outside_attention if _is_linear(m, hidden, intermediate)]
    downs = [m for m in outside_attention if _is_linear(m, intermediate, hidden)]
    gate_ups = [m for m in outside_attention if _is_linear(m, hidden, 2 * intermediate)]
    if not ups and len(gate_ups) == 1 and len(downs) == 1:
        return LayerInfo(**found, mlp_kind="gated", mlp_up=None, mlp_gate=gate_ups[0], mlp_down=downs[0])
    if len(ups) != 1 or len(downs) != 1:
        why = (
            f"neither gate_proj/up_proj/down_proj, one {hidden}->{intermediate}->{hidden} pair of linears nor a fused "
            f"{hidden}->{2 * intermediate} gate/up with its down linear (a mixture of experts?)"
        )
        return LayerInfo(**found, mlp_kind="other", mlp_up=None, mlp_gate=None, mlp_down=None, mlp_reason=why)
    return LayerInfo(**found, mlp_kind="plain", mlp_up=ups[0], mlp_gate=None, mlp_down=downs[0])


_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads")


def describe_model(model: nn.Module) -> ModelInfo:
    """Find the decoder layers and the shapes polar_compile works with, or raise UnsupportedModelError."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise UnsupportedModelError(
            f"this is torch.compile's wrapper (OptimizedModule) around a {type(model._orig_mod).__name__}: pass the "
            "model itself (its ._orig_mod). polar_compile compiles the model on its own, in generate or through "
            "torch.compile(model, backend='polar') after optimize"
        )
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config: pass a Hugging Face model")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError("encoder-decoder models are not supported: polar_compile targets decoders")
    num_layers = _config_int(config, "num_hidden_layers")
    hidden = _config_int(config, "hidden_size")
    num_heads = _config_int(config, "num_attention_heads")
    missing = [
        name for name, value in zip(_SHAPE_FIELDS, (num_layers, hidden, num_heads), strict=True) if value is None
    ]
    if missing:
        raise UnsupportedModelError(
            f"{type(config).__name__} has no {' / '.join(missing)}: polar_compile needs an attention decoder, whose "
            f"config gives {', '.join(_SHAPE_FIELDS)}"
        )
    # Falcon's config names it num_kv_heads (transformers < 5.2x has no num_key_value_heads alias for it)
    num_kv_heads = _config_int(config, "num_key_value_heads", "num_kv_heads") or num_heads
    head_dim = _config_int(config, "head_dim") or hidden // num_heads
    intermediate = _config_int(config, "intermediate_size", "ffn_dim")  # None: only a gated MLP can be found
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(f"num_attention_heads {num_heads} is not a multiple of KV heads {num_kv_heads}")
    activation = str(getattr(config, "hidden_act", None) or getattr(config, "activation_function", "unknown"))

    path, layer_list = _find_layer_list(model, num_layers)
    layers = tuple(
        _describe_layer(
            i,
            f"{path}.{i}",
            layer,
            hidden,
            num_heads * head_dim,
            (num_heads + 2 * num_kv_heads) * head_dim,
            intermediate,
            type(config).__name__,
        )
        for i, layer in enumerate(layer_list)
    )
    if intermediate is None and layers[0].mlp_up is not None:  # gated MLPs, found by name: their width
        intermediate = layers[0].mlp_up.out_features
    q_out = layers[0].q_proj.out_features
    if not layers[0].qkv_fused and q_out != num_heads * head_dim:
        raise UnsupportedModelError(f"q_proj width {q_out} != num_heads {num_heads} x head_dim {head_dim}")
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return ModelInfo(
        architecture=str(architecture),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        activation=activation,
        layers=layers,
    )


_GATED_ACTIVATIONS = ("silu", "swish")  # the gated kernel computes silu(x @ Wg.T) * (x @ Wu.T)
_PLAIN_ACTIVATIONS = ("relu", "gelu", "silu", "swish")  # the up kernel's relu, exact (erf) gelu and silu


def mlp_unsupported_reason(info: ModelInfo, layer: LayerInfo) -> str | None:
    """Why the selective GEMM cannot compute ``layer``'s MLP (None: it can). Layers are judged one by one: in a
    mixture of experts some layers may keep a plain MLP (Qwen2-MoE's mlp_only_layers, GLM-4.5's first dense layers)."""
    if layer.mlp_kind == "other":
        return f"MLP not recognised: {layer.mlp_reason}"
    activation = info.activation.lower()
    if layer.mlp_kind == "gated":
        if activation not in _GATED_ACTIVATIONS:
            return f"a gated MLP with activation {info.activation!r}: the gated kernel computes silu(gate) x up"
        if any(m is not None and m.bias is not None for m in (layer.mlp_gate, layer.mlp_up)):
            return "a gated MLP with biases on gate/up (mlp_bias): the gated kernel has none"
        return None
    if activation not in _PLAIN_ACTIVATIONS:
        return f"activation {info.activation!r}: the kernels compute relu, exact gelu and silu"
    return None


def sparse_mlp_layers(info: ModelInfo) -> list[int]:
    """The layers whose MLP the selective GEMM can compute (``mlp_unsupported_reason`` is None)."""
    return [layer.index for layer in info.layers if mlp_unsupported_reason(info, layer) is None]


def require_sparse_mlp(info: ModelInfo, asked: str) -> None:
    """Raise UnsupportedModelError when MLP sparsity (``asked``: the option that asked for it) meets a model none of
    whose MLPs polar_compile can make sparse."""
    if not sparse_mlp_layers(info):
        raise UnsupportedModelError(f"{asked}: this model's MLP is not one polar_compile can make sparse "
                                    f"({mlp_unsupported_reason(info, info.layers[0])})")  # fmt: skip


def require_static_rope(model: nn.Module, info: ModelInfo) -> None:
    """Raise UnsupportedModelError if a rotary embedding of ``model`` is one transformers updates at run time
    ("dynamic": NTK scaling past the cached length). Checked by ``optimize``, and by ``calibrate`` before it reads
    any text, so that a model optimize would refuse does not cost a calibration first."""
    for module in model.modules():
        rope = getattr(module, "rope_type", None)
        for kind in rope.values() if isinstance(rope, dict) else (rope,):
            if isinstance(kind, str) and "dynamic" in kind:
                raise UnsupportedModelError(
                    f"{info.architecture} uses rope_type {kind!r}: transformers recomputes that rotary embedding's "
                    "frequencies behind a data-dependent branch at every step, which torch.compile cannot trace as "
                    "one graph. Load the model with a static rope (e.g. rope_type 'linear' or 'yarn', or none) to "
                    "optimize it"
                )
