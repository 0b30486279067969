"""``optimize(model, routers, config)``: make a Hugging Face decoder decode with Polar Sparsity.

What it does, all reversible with :func:`restore`; weights keep their values (only their memory layout may
change: packing below, and the neuron-major down projection of sparse MLPs):

1. checks the model's structure (``describe_model``) and the router file's fingerprint against the model;
2. attaches the routers as the submodule ``model.polar_routers`` (so ``.to()`` and dtype changes move them);
3. puts a forward pre-hook on each sparse layer's q projection that, only while torch.compile traces, marks
   the projection's input with ``polar::router_anchor`` (router weight, bias, layer, k);
4. packs each layer's q/k/v weights, and gate/up, into one buffer each (``polar_compile/packing.py``; same
   memory) so the ``fuse_projections`` pass runs each group as one GEMM (``SparsityConfig.fuse_projections``);
5. wraps ``model.generate`` so that on CUDA it reads its stop flag a step late, without a host sync per step
   (``SparsityConfig.defer_stop_check``, ``polar_compile/generation.py``);
6. sets ``model.generation_config.compile_config`` so that ``generate(..., cache_implementation="static")``
   compiles its decode step with the ``polar`` backend (CUDA graphs on GPU; on CPU the rewritten graph runs
   without inductor). Prefill runs eagerly and dense, as HF does; with ``prefill_chunk_size`` too, where HF
   would compile each chunk length (``polar_compile/generation.py``: ``get_compiled_call`` gives generate a call
   that sends only one-token-per-sequence steps to the compiled forward).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from polar_compile.backend import check_options, compile_reports, ensure_registered
from polar_compile.config import SparsityConfig, groups_for_density
from polar_compile.generation import (
    GRAPHS_PER_SHAPE,
    SLIDING_WINDOW_REMEDY,
    compiled_in_place,
    dense_now,
    eager_decode_steps,
    unwrap_compiled_call,
    unwrap_generate,
    wrap_compiled_call,
    wrap_generate,
)
from polar_compile.model_info import (
    ModelInfo,
    describe_model,
    mlp_unsupported_reason,
    require_static_rope,
)
from polar_compile.packing import pack_projections, unpack_projections

_ROUTERS_ATTRIBUTE = "polar_routers"
_ROUTER_PREFIX = f"{_ROUTERS_ATTRIBUTE}."  # their keys in a model's state_dict (left out: _keep_out_of_state_dict)
log = logging.getLogger("polar_compile.compiler")


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of a model whose static cache transformers builds with sliding-window layers (as it
    decides: the config's ``layer_types``, or else a ``sliding_window`` set), else None."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return window if isinstance(window, int) and not isinstance(window, bool) else None


@dataclass
class PolarPlan:
    """What ``optimize`` set up on a model (``model._polar_plan``)."""

    config: SparsityConfig
    info: ModelInfo
    sparse_layers: dict[int, int]  # layer -> k (groups kept per sequence)
    dense_reasons: dict[int, str]  # layer -> why it stays dense
    full_layers: dict[int, int] = field(default_factory=dict)  # dense layers on the polar kernel -> G
    mlp_layers: dict[int, tuple] = field(default_factory=dict)  # layer -> k by batch size (None = dense)
    mlp_reasons: dict[int, str] = field(default_factory=dict)  # layer -> why its MLP stays dense
    handles: list = field(default_factory=list, repr=False)
    previous_compile_config: object = field(default=None, repr=False)
    token: int = 0
    packed_groups: int = 0  # q/k/v and gate/up groups packed into one buffer each
    compile_config: object = field(default=None, repr=False)  # the polar CompileConfig optimize set on generate
    # {"cuda" | "cpu": the default polar CompileConfig there} when optimize chose mode/options itself, so that a
    # model moved to another device after optimize is compiled as one optimized there (generation.py)
    device_compile_configs: dict | None = field(default=None, repr=False)
    packing_reasons: dict[str, str] = field(default_factory=dict)  # group -> why it was not packed
    defers_stop_check: bool = False  # model.generate wrapped (polar_compile/generation.py)


_tokens = itertools.count(1)


def _tracing_for_polar() -> bool:
    """Whether a forward runs under the trace the polar passes rewrite: a torch.compile trace, not eager and not
    torch.export (whose program would carry anchor ops that no pass removes: dense math, but tied to this
    library's ops and the routers' weights)."""
    return torch.compiler.is_compiling() and not _exporting()


def _exporting() -> bool:
    """Whether torch.export is tracing. Reads the flag torch.export sets around its trace (strict and non-strict)
    rather than calling ``torch.compiler.is_exporting()``: torch 2.11's Dynamo folds that call to True under every
    trace, torch.compile's included (2.13 reads the flag), which left every layer of a compiled model dense."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    exporting = getattr(torch.compiler, "is_exporting", None)
    return exporting is not None and exporting()


def _make_hook(router: nn.Linear | None, layer: int, k: int, packed: bool):
    """router None: a dense layer (all k = G groups through the polar kernel, no router).

    packed: whether optimize packs the projections. The hook reads it while tracing, so Dynamo guards on it: a
    graph fused over packed weights is never reused for a model optimized without packing (same class, same k).
    """

    def mark_router_input(module, args):
        if not _tracing_for_polar():
            return None  # eager forward (prefill, plain calls) and torch.export stay exactly the dense model
        if packed:  # read for the guard (see above)
            pass
        hidden, *rest = args
        weight, bias = (None, None) if router is None else (router.weight, router.bias)
        return (torch.ops.polar.router_anchor(hidden, weight, bias, layer, k), *rest)

    return mark_router_input


MAX_MLP_BATCH = 512  # batch sizes (rows per decode step) the MLP k-table is expanded for


def _mlp_router_linears(router: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    linears = [m for m in router.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 2 or linears[0].bias is not None:
        raise ValueError("an MLP router must be Linear(d, r, bias=False) followed by Linear(r, F)")
    return linears[0], linears[1]


def _make_mlp_hook(router: nn.Module, layer: int, k_by_rows: tuple, packed: bool):
    down_rank, up_rank = _mlp_router_linears(router)

    def mark_mlp_input(module, args):
        if not _tracing_for_polar():
            return None
        if packed:  # read for Dynamo's guard, as in _make_hook
            pass
        hidden, *rest = args
        rows = hidden.numel() // hidden.shape[-1]  # static at trace time: decode batch size
        k = k_by_rows[rows] if rows < len(k_by_rows) else None
        if k is None:
            return None  # the k-table says this batch size is (nearly) dense: keep the dense MLP
        anchor = torch.ops.polar.mlp_anchor(hidden, down_rank.weight, up_rank.weight, up_rank.bias, layer, k)
        return (anchor, *rest)

    return mark_mlp_input


def _plan_mlp(model, routers, config: SparsityConfig, info: ModelInfo, handles: list, dense_reason: str):
    """Install MLP hooks where config and router file allow; returns (layer -> k table, layer -> reason)."""
    planned, reasons = {}, {}
    # an MLP no mode could make sparse says why whatever the mode (Mixtral's experts, Falcon's fused MLP)
    unknown = {layer.index: f"MLP not recognised: {layer.mlp_reason}" for layer in info.layers
               if layer.mlp_kind == "other"}  # fmt: skip
    if config.mlp == "off":
        why = "mlp='off'"
        if getattr(routers, "metadata", {}).get("mlp_layers"):
            why += " (off by default; this router file's MLP routers run with mlp='auto' for ReLU MLPs, or 'on')"
        return planned, {**dict.fromkeys(range(info.num_layers), why), **unknown}
    if config.mlp == "auto" and not info.relu_mlp:
        why = f"mlp='auto' and the MLP is not ReLU ({info.activation})"
        return planned, {**dict.fromkeys(range(info.num_layers), why), **unknown}
    from polar_compile.ops.selective_gemm import prepare_down_weight

    limit = config.mlp_dense_threshold * info.intermediate_size
    for layer in info.layers:
        router = routers.mlp_router(layer.index) if hasattr(routers, "mlp_router") else None
        unsupported = mlp_unsupported_reason(info, layer)
        if unsupported is not None:
            reasons[layer.index] = unsupported
        elif layer.index in config.dense_layers:
            reasons[layer.index] = dense_reason
        elif router is None:
            reasons[layer.index] = "the router file has no MLP router for this layer"
        else:
            if not routers.metadata.get("mlp_k_table", {}).get(str(layer.index)):
                reasons[layer.index] = "the router file has no MLP k-table for this layer (neurons to keep a batch)"
                continue
            table = [None] + [routers.mlp_k(layer.index, rows) for rows in range(1, MAX_MLP_BATCH)]
            table = tuple(None if k is None or k > limit else int(k) for k in table)
            if all(k is None for k in table):
                reasons[layer.index] = f"k-table above the dense threshold ({config.mlp_dense_threshold:.0%} of F)"
                continue
            planned[layer.index] = table
            prepare_down_weight(layer.mlp_down)  # neuron-major storage in place: same values, no second copy
            hook = layer.mlp_gate if layer.mlp_kind == "gated" else layer.mlp_up
            mlp_hook = _make_mlp_hook(router, layer.index, table, config.fuse_projections)
            handles.append(hook.register_forward_pre_hook(mlp_hook))
    return planned, reasons


def compile_config_for(device_type: str, mode: str | None = None, options: dict | None = None):
    """The CompileConfig of a polar generate: CUDA graphs and inductor on CUDA (``mode="reduce-overhead"``), the
    passes alone elsewhere (``options={"polar.inductor": False}``), unless mode or options are given."""
    from transformers import CompileConfig

    on_gpu = device_type == "cuda"
    if mode is None and options is None:
        if on_gpu:
            mode = "reduce-overhead"
        else:
            options = {"polar.inductor": False}
    # dynamic=False: a new cache length or batch size gets its own static graph (launch configs and the
    # split counts are per shape), never an automatic-dynamic one
    config = CompileConfig(backend="polar", fullgraph=True, dynamic=False, mode=mode, options=options)
    if not on_gpu:
        config._compile_all_devices = True  # HF compiles only on accelerators unless told
    return config


_NO_ROUTER = "the router file has no attention router for this layer"


def _warn_if_attention_stays_dense(model, info: ModelInfo, config: SparsityConfig, sparse, full, dense) -> None:
    """Say at optimize, not only in ``explain`` after a generate, when what is known now leaves attention dense:
    an attention implementation the rewrite does not match (it replaces scaled_dot_product_attention), or sparse
    layers asked for where the router file has no attention router for any of them."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if (sparse or full) and isinstance(implementation, str) and implementation != "sdpa":
        log.warning(
            "polar_compile: %s runs attention_implementation %r: the polar rewrite replaces "
            "scaled_dot_product_attention, so its decode steps will run the model's own, dense attention. Load it "
            "with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) before optimize",
            info.architecture, implementation,
        )  # fmt: skip
    missing = sorted(i for i, why in dense.items() if why == _NO_ROUTER and config.density_for(i) < 1.0)
    if missing and not any(k < info.num_groups for k in sparse.values()):
        log.warning(
            "polar_compile: no layer of %s will decode sparse attention: the layers asked to be sparse (%s) have no "
            "attention router in the router file. Calibrate routers for them (polar-compile calibrate), or load a "
            "router file that has them",
            info.architecture, ",".join(map(str, missing)),
        )  # fmt: skip


def _resolve_layers(config: SparsityConfig, routers, info: ModelInfo) -> tuple[SparsityConfig, str]:
    """``config`` with its dense layers resolved, and the reason a dense layer gives in ``explain``.

    An explicit ``layer_density`` entry needs an attention router (with or without an explicit ``dense_layers``),
    overrides a default dense layer (the router file's calibrated choice, or layer 0), and conflicts with the same
    layer in an explicit ``dense_layers``.
    """
    explicit = set(config.layer_density)
    beyond = sorted(i for i in (*explicit, *(config.dense_layers or ())) if i >= info.num_layers)
    if beyond:
        raise ValueError(f"config names layers {beyond} but the model has {info.num_layers} layers")
    missing = sorted(i for i in explicit if routers.attention_router(i) is None)
    if missing:
        raise ValueError(f"layer_density names layers {missing}, which have no attention router in the router file "
                         f"(it has routers for layers {sorted(int(i) for i in routers.attention)})")  # fmt: skip
    if config.dense_layers is not None:
        both = sorted(explicit & set(config.dense_layers))
        if both:
            raise ValueError(f"layer_density and dense_layers both name layers {both}: a layer is either dense or "
                             "sparse at a density")  # fmt: skip
        return config, "kept dense: config.dense_layers"
    from_routers = getattr(routers, "dense_layers", None) is not None
    config = config.resolve_dense_layers(routers)
    beyond = sorted(i for i in config.dense_layers if i >= info.num_layers)
    if beyond:
        raise ValueError(f"the router file's dense_layers name layers {beyond} but the model has {info.num_layers} "
                         "layers (a damaged file?)")  # fmt: skip
    config = dataclasses.replace(config, dense_layers=tuple(i for i in config.dense_layers if i not in explicit))
    source = "the router file's calibrated dense_layers" if from_routers else "layer 0 by default"
    return config, f"kept dense: {source}"


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: remove hooks and routers, unpack the projections (each parameter gets its own
    storage again) and lay sparse MLPs' down weights out row-major again, restore the previous generate compile
    config (unless one was set since). Values are as before; the projections' parameters are new Parameter objects
    (as after optimize), so build an optimizer after restore, not before optimize."""
    plan = getattr(model, "_polar_plan", None)
    if plan is None:
        return model
    for handle in plan.handles:
        handle.remove()
    if plan.packed_groups:
        unpack_projections(plan.info)
    for index in plan.mlp_layers:  # prepare_down_weight made them neuron-major: row-major again, as loaded
        down = plan.info.layers[index].mlp_down
        if not down.weight.is_contiguous():
            down.weight = nn.Parameter(down.weight.detach().contiguous(), requires_grad=down.weight.requires_grad)
    unwrap_generate(model)
    unwrap_compiled_call(model)
    if _ROUTERS_ATTRIBUTE in model._modules:
        del model._modules[_ROUTERS_ATTRIBUTE]
    config = getattr(model, "generation_config", None)
    if config is not None and config.compile_config is plan.compile_config:  # not one the user set since
        config.compile_config = plan.previous_compile_config
    for attribute in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    for name in ("__deepcopy__", "__reduce_ex__"):
        model.__dict__.pop(name, None)
    del model._polar_plan
    return model


def _refuse_copies(model: nn.Module):
    """An instance-level __deepcopy__ / __reduce_ex__ (copy.deepcopy and pickle look there first) that says what to
    do: the hooks optimize installs are closures over this instance, which a copy cannot carry."""

    def refuse(*_):
        raise TypeError(
            f"an optimized {type(model).__name__} cannot be deep-copied or pickled (torch.save(model)): its generate "
            "and compiled-call hooks belong to this instance. Copy or save it before polar_compile.optimize, or "
            "polar_compile.restore(model) first (save_pretrained and state_dict work as they are)"
        )

    return refuse


def optimize(
    model: nn.Module,
    routers,
    config: SparsityConfig | None = None,
    *,
    mode: str | None = None,
    options: dict | None = None,
) -> nn.Module:
    """Set ``model`` up to decode sparsely through the ``polar`` backend; returns the same model.

    routers: a :class:`~polar_compile.routers.modules.PolarRouters` for this model (its fingerprint is checked);
        the model keeps its own copy as ``model.polar_routers``, left out of ``model.state_dict()``.
    config: densities and dense layers; default ``SparsityConfig(attention_density=routers.density)``. Its
        ``dense_layers=None`` (the default) takes the router file's calibrated dense layers where it has them.
    mode / options: passed to the backend like inductor's (plus the backend's own ``"polar.*"`` options, see
        :mod:`polar_compile.backend`); default ``mode="reduce-overhead"`` (CUDA graphs) on GPU and
        ``options={"polar.inductor": False}`` on CPU.

    The q/k/v and gate/up weights (packed) and sparse MLP down weights (neuron-major) are re-bound as new
    ``Parameter`` objects with the same values: an optimizer built before ``optimize`` (or kept across ``restore``)
    holds the old ones, so build it after. A model compiled in place (``model.compile()``) is refused.
    """

    import os

    import polar_compile.ops.router_anchor  # noqa: F401  (registers polar::router_anchor)

    if isinstance(routers, (str, bytes, os.PathLike)):
        raise TypeError(f"optimize takes routers, not a path ({os.fsdecode(routers)!r}): load the file first with "
                        "routers = polar_compile.load_routers(path, model), then optimize(model, routers)")  # fmt: skip
    if not callable(getattr(routers, "check_compatible", None)):
        raise TypeError(f"routers must be a PolarRouters (polar_compile.load_routers(path, model), calibrate or "
                        f"PolarRouters.for_model), got {type(routers).__name__}")  # fmt: skip
    info = describe_model(model)
    how = compiled_in_place(model)
    if how is not None:
        raise ValueError(
            f"this {info.architecture} is compiled in place ({how}): its forward runs through that compiled graph, "
            "where the polar rewrite cannot reach, so it would decode dense. Optimize the uncompiled model (undo it "
            "with model._compiled_call_impl = None, or del model.forward): generate compiles the decode step with "
            "the polar backend itself"
        )
    window = sliding_window(model)
    if window is not None:
        log.warning(
            "polar_compile: %s attends through a sliding window (%d tokens). transformers' static cache keeps a "
            "sliding-window layer's fill level in a Python int that torch.compile specialises on, so the decode step "
            "recompiles at every token (huggingface/transformers#44609); after %d graphs at one shape its steps run "
            "the eager, dense forward. %s.",
            info.architecture, window, GRAPHS_PER_SHAPE, SLIDING_WINDOW_REMEDY,
        )  # fmt: skip
    require_static_rope(model, info)
    routers.check_compatible(model)
    if config is None:
        config = SparsityConfig(attention_density=float(routers.density))
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    config, dense_reason = _resolve_layers(config, routers, info)
    if mode is not None and options is not None:
        raise ValueError("pass mode or options, not both (as with torch.compile)")
    check_options(mode, options)  # before the model is touched: a typo would surface at the first generate

    restore(model)
    handles: list = []
    packed_now = False
    try:
        parameter = next(model.parameters())
        # the model's own copy: .to() converts a module in place, so moving or casting one optimized model would
        # otherwise move the caller's routers, and every other model optimized with them
        routers = _own_copy(routers, parameter.device, parameter.dtype)
        _keep_out_of_state_dict(routers)
        model.add_module(_ROUTERS_ATTRIBUTE, routers)

        sparse, dense, full = {}, {}, {}
        for layer in info.layers:
            density = config.density_for(layer.index)
            router = routers.attention_router(layer.index)
            if density is None:
                dense[layer.index] = dense_reason
                if config.dense_attention == "polar":
                    full[layer.index] = info.num_groups
                    hook = _make_hook(None, layer.index, info.num_groups, config.fuse_projections)
                    handles.append(layer.q_proj.register_forward_pre_hook(hook))
            elif router is None:
                dense[layer.index] = _NO_ROUTER
            else:
                k = groups_for_density(density, info.num_groups)
                sparse[layer.index] = k
                hook = _make_hook(router, layer.index, k, config.fuse_projections)
                handles.append(layer.q_proj.register_forward_pre_hook(hook))

        _warn_if_attention_stays_dense(model, info, config, sparse, full, dense)
        mlp_layers, mlp_reasons = _plan_mlp(model, routers, config, info, handles, dense_reason)
        packed_now = config.fuse_projections
        packed, packing_reasons = pack_projections(info) if config.fuse_projections else (0, {})

        ensure_registered()
        if mode is None and options is None:  # optimize's choice, per device: followed if the model moves
            device_configs = {device: compile_config_for(device) for device in ("cuda", "cpu")}
            compile_config = device_configs["cuda" if parameter.device.type == "cuda" else "cpu"]
        else:  # the caller's choice, wherever the model goes
            device_configs = None
            compile_config = compile_config_for(parameter.device.type, mode, options)
        plan = PolarPlan(
            config=config,
            info=info,
            sparse_layers=sparse,
            dense_reasons=dense,
            full_layers=full,
            mlp_layers=mlp_layers,
            mlp_reasons=mlp_reasons,
            handles=handles,
            previous_compile_config=model.generation_config.compile_config,
            token=next(_tokens),
            packed_groups=packed,
            packing_reasons=packing_reasons,
            defers_stop_check=config.defer_stop_check and wrap_generate(model),
            compile_config=compile_config,
            device_compile_configs=device_configs,
        )
        model.generation_config.compile_config = compile_config
        wrap_compiled_call(model)  # decode steps only: prefill (chunked or not) stays eager and dense
        for attribute in ("_compiled_call", "_last_compile_config"):  # never reuse a call compiled before
            if hasattr(model, attribute):
                delattr(model, attribute)
    except BaseException:  # leave the model as it was: no hooks, routers or packing of a failed optimize
        for handle in handles:
            handle.remove()
        model._modules.pop(_ROUTERS_ATTRIBUTE, None)
        if packed_now:
            unpack_projections(info)
        raise
    model._polar_plan = plan
    for name in ("__deepcopy__", "__reduce_ex__"):
        object.__setattr__(model, name, _refuse_copies(model))
    return model


def _own_copy(routers: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of ``routers`` with its floating tensors already on ``device`` in ``dtype`` (as ``.to`` would make
    them): each tensor is converted once into the copy, never copied whole first (OPT-66B's fp32 MLP routers are
    12 GB)."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(routers.parameters(), routers.buffers()):
        target = dtype if tensor.is_floating_point() else tensor.dtype
        converted = tensor.detach().to(device=device, dtype=target, copy=True)
        if isinstance(tensor, nn.Parameter):
            converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = converted
    return copy.deepcopy(routers, memo)


def _keep_out_of_state_dict(routers: nn.Module) -> None:
    """Leave the attached routers out of ``model.state_dict()`` (so ``save_pretrained`` writes the plain model, which
    transformers loads without unexpected keys) and out of ``load_state_dict``'s missing keys (so a plain
    checkpoint loads strictly into an optimized model). Routers are saved with ``save_routers``."""

    def drop(module, state_dict, prefix, local_metadata):
        if not prefix:
            return  # the routers' own state_dict (save_routers(model.polar_routers, ...)): keep everything
        for key in [key for key in state_dict if key.startswith(prefix)]:
            del state_dict[key]

    def not_missing(module, incompatible):
        keys = incompatible.missing_keys
        keys[:] = [key for key in keys if not (key.startswith(_ROUTER_PREFIX) or f".{_ROUTER_PREFIX}" in key)]

    routers.register_state_dict_post_hook(drop)
    routers.register_load_state_dict_post_hook(not_missing)


@dataclass(frozen=True)
class LayerExplanation:
    layer: int
    planned: str  # "k of G groups" or why the layer stays dense
    compiled: str  # what the last decode graph did with the layer (or "not compiled yet")
    mlp: str = "-"  # MLP: what the last decode graph did, or why it stays dense


@dataclass(frozen=True)
class Explanation:
    architecture: str
    layers: tuple[LayerExplanation, ...]
    eager_steps: tuple[str, ...] = ()  # decode shapes that run the eager dense forward, and why
    skinny_linears: int = 0  # linears the last compiled decode graph runs on polar::skinny_linear
    skinny_gated_linears: int = 0  # dense gated MLP halves (gate, up, SiLU-mul) it runs on polar::skinny_gated_linear

    def __str__(self) -> str:
        """A table per part; consecutive layers that read the same share one row ("1-9")."""
        attention = _layer_runs(self.layers, lambda row: (row.planned, row.compiled))
        mlp = _layer_runs(self.layers, lambda row: (row.mlp,))
        label = max(5, *(len(layers) for layers, _ in attention + mlp))
        width = max(len(planned) for _, (planned, _) in attention)
        lines = [f"polar_compile plan for {self.architecture}"]
        lines.append(f"{'layer':>{label}}  {'plan':<{width}}  last compiled graph")
        lines += [f"{layers:>{label}}  {planned:<{width}}  {compiled}" for layers, (planned, compiled) in attention]
        if any(row.mlp != "-" for row in self.layers):
            lines += [f"{'layer':>{label}}  mlp"] + [f"{layers:>{label}}  {text}" for layers, (text,) in mlp]
        if self.skinny_linears:
            lines.append(f"{self.skinny_linears} narrow linears (attention output, MLP down) on polar::skinny_linear")
        if self.skinny_gated_linears:
            lines.append(
                f"{self.skinny_gated_linears} dense MLP gate/up pairs (and SiLU-mul) on polar::skinny_gated_linear"
            )
        lines += [f"decode steps at {step}" for step in self.eager_steps]
        return "\n".join(lines)

    @property
    def rewritten_layers(self) -> list[int]:
        return [row.layer for row in self.layers if row.compiled.startswith("rewritten")]


def _layer_runs(rows, key) -> list[tuple[str, tuple]]:
    """(layers, key) per run of consecutive layers with the same key: "7" or "1-9"."""
    runs: list[list] = []
    for row in rows:
        if runs and runs[-1][2] == key(row) and runs[-1][1] == row.layer - 1:
            runs[-1][1] = row.layer
        else:
            runs.append([row.layer, row.layer, key(row)])
    return [(str(first) if first == last else f"{first}-{last}", value) for first, last, value in runs]


_NEURONS = re.compile(r"(\d+) of \d+ neurons")


def _mlp_row_matches(row, mlp_layers: dict[int, tuple]) -> bool:
    """A graph's MLP row fits a plan when a rewritten layer is one of the plan's sparse MLPs and its k is in that
    layer's k-table (two models of one class with other k-tables compile graphs of their own)."""
    if not row.rewritten:
        return True
    found = _NEURONS.match(row.detail)
    return row.layer in mlp_layers and (found is None or int(found.group(1)) in mlp_layers[row.layer])


def explain(model: nn.Module) -> Explanation:
    """Per layer: what ``optimize`` planned and what the most recent compiled decode graph of that plan did (a
    graph with the same layers, k and groups per layer: models of one class and plan share their graphs, so the
    graph may have been compiled for another instance). Where this model's steps cannot run that graph as the
    model stands (compiled in place, a compile_config of another backend), its rows say "not used" and why."""
    plan = getattr(model, "_polar_plan", None)
    if plan is None:
        raise ValueError("this model is not optimized (never, or restored since): call polar_compile.optimize(model, "
                         "routers) first")  # fmt: skip
    compiled: dict[int, str] = {}
    compiled_mlp: dict[int, str] = {}
    planned_layers = set(plan.sparse_layers) | set(plan.full_layers)
    planned_groups = {**{i: (k, plan.info.num_groups) for i, k in plan.sparse_layers.items()},
                      **{i: (g, g) for i, g in plan.full_layers.items()}}  # fmt: skip
    skinny = gated = 0
    for report in reversed(compile_reports):  # newest graph of this plan: its layers, with the k and G it planned
        mentioned = {row.layer for row in report.layers if row.component == "attention"}
        if all(row.detail.startswith("prefill") for row in report.layers if row.component == "attention"):
            continue  # a prefill graph (torch.compile(backend="polar") called on a prompt): not a decode step
        same_groups = all(
            row.groups is None or planned_groups.get(row.layer) == row.groups
            for row in report.layers
            if row.component == "attention"
        )
        same_neurons = all(_mlp_row_matches(row, plan.mlp_layers) for row in report.layers if row.component == "mlp")
        if mentioned and mentioned <= planned_layers and same_groups and same_neurons:
            skinny = report.counters.get("skinny_linears", 0)
            gated = report.counters.get("skinny_gated_linears", 0)
            for row in report.layers:
                text = ("rewritten: " if row.rewritten else "dense: ") + row.detail
                (compiled if row.component == "attention" else compiled_mlp).setdefault(row.layer, text)
            break
    blocked = dense_now(model)  # the graph exists (another instance's), but this model's steps cannot run it
    rows = []
    for layer in plan.info.layers:
        i = layer.index
        if i in plan.sparse_layers:
            planned = f"{plan.sparse_layers[i]} of {plan.info.num_groups} groups"
        else:
            planned = f"dense ({plan.dense_reasons[i]})"
        if i in plan.mlp_layers:
            unused = (
                "dense in the last compiled graph: its batch size's k is above the threshold"
                if compiled
                else "sparse when the batch size's k is below the threshold (not compiled yet)"
            )
            mlp = compiled_mlp.get(i, unused)
        else:
            mlp = f"dense ({plan.mlp_reasons.get(i, '-')})"
        attention = compiled.get(i, "not compiled yet" if i in planned_layers else "-")
        if blocked and i in compiled:
            attention, mlp = f"not used: {blocked}", (f"not used: {blocked}" if i in compiled_mlp else mlp)
        rows.append(LayerExplanation(i, planned, attention, mlp))
    return Explanation(plan.info.architecture, tuple(rows), eager_decode_steps(model), skinny, gated)
