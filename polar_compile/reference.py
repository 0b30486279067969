"""An eager, hook-based equivalent of the polar decode path, to check the compiled one against.

Inside :func:`masked_reference`, an optimized model runs its ordinary (dense, eager) attention, and on
decode steps (one query token, past a generate call's first forward, its prefill) each sparse layer's
attention output is multiplied, per sequence, by a 0/1 mask of the groups its router picks (the same router,
the same k) before the output projection. That is the definition of head-sparse attention: selected heads
exact, the others zero. Likewise for sparse MLPs: the activations of neurons outside the batch-union top-k of
the MLP router's ReLU'd scores are zeroed before the down projection. It computes everything and so saves
nothing; it exists only as an independent statement of what the compiled graph must equal.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from polar_compile.ops.route_groups import route_groups_reference


def group_keep_columns(hidden, weight, bias, k: int, num_groups: int, group_width: int, dtype) -> torch.Tensor:
    """(..., num_groups * group_width) 0/1 mask over the attention output's columns keeping, for each row of
    ``hidden`` (..., d), the k groups its router picks (``polar::route_groups``' rule)."""
    chosen = route_groups_reference(hidden, weight, bias, k)  # (rows, k)
    keep = torch.zeros(chosen.shape[0], num_groups, device=hidden.device).scatter_(-1, chosen, 1.0)
    return keep.repeat_interleave(group_width, dim=-1).to(dtype).view(*hidden.shape[:-1], -1)


def _hooks_for_layer(layer, router: nn.Linear, k: int, group_width: int, step: dict):
    router_input: dict[str, torch.Tensor] = {}

    def keep_router_input(module, args):
        router_input["hidden"] = args[0]

    def mask_inactive_groups(module, args):
        attention = args[0]  # (B, T, Hq * D)
        if not step.get("decode"):
            return None  # prefill stays dense
        num_groups = router.weight.shape[0]
        keep = group_keep_columns(router_input["hidden"], router.weight, router.bias, k, num_groups, group_width,
                                  attention.dtype)  # fmt: skip
        return (attention * keep, *args[1:])

    return (
        layer.q_proj.register_forward_pre_hook(keep_router_input),
        layer.o_proj.register_forward_pre_hook(mask_inactive_groups),
    )


def _mlp_hooks(layer, router: nn.Module, k_by_rows: tuple, step: dict):
    mlp_input: dict[str, torch.Tensor] = {}
    first = layer.mlp_gate if layer.mlp_kind == "gated" else layer.mlp_up

    def keep_mlp_input(module, args):
        mlp_input["hidden"] = args[0]

    def mask_unselected_neurons(module, args):
        activation = args[0]  # (..., F)
        rows = activation.numel() // activation.shape[-1]
        k = k_by_rows[rows] if rows < len(k_by_rows) else None
        if not step.get("decode") or k is None:
            return None
        hidden = mlp_input["hidden"].reshape(rows, -1)
        # batch union: one index for the whole batch, the ReLU'd scores summed in fp32 as polar::batch_union_topk sums
        scores = router(hidden).relu().sum(0, dtype=torch.float32)
        keep = torch.zeros_like(scores).scatter_(0, scores.topk(k).indices, 1.0).to(activation.dtype)
        return (activation * keep, *args[1:])

    return first.register_forward_pre_hook(keep_mlp_input), layer.mlp_down.register_forward_pre_hook(
        mask_unselected_neurons
    )


@contextmanager
def masked_reference(model: nn.Module):
    """Within this block, eager calls of an optimized ``model`` compute the head-masked reference."""
    plan = getattr(model, "_polar_plan", None)
    if plan is None:
        raise ValueError("masked_reference needs a model set up by polar_compile.optimize")
    info = plan.info
    group_width = info.group_size * info.head_dim  # columns of the o_proj input per KV group
    handles = []
    step: dict[str, bool] = {}

    # A decode step is one query token per sequence, except the first forward of a generate call: its prefill,
    # which generate runs with the model's own forward (dense) whatever its length, a one-token prompt included.
    def note_query_length(module, args):
        step["decode"] = args[0].shape[1] == 1 and not step.get("prefill")

    def note_prefill(module, args, kwargs):
        step["prefill"] = step.pop("generate_started", False)

    generate = model.generate

    def generate_marking_its_prefill(*args, **kwargs):
        step["generate_started"] = True
        return generate(*args, **kwargs)

    had_own_generate = "generate" in model.__dict__
    try:
        object.__setattr__(model, "generate", generate_marking_its_prefill)
        handles.append(model.register_forward_pre_hook(note_prefill, with_kwargs=True))
        for layer in info.layers:
            handles.append(layer.o_proj.register_forward_pre_hook(note_query_length))
            if layer.index in plan.mlp_layers:
                router = model.polar_routers.mlp_router(layer.index)
                handles.extend(_mlp_hooks(layer, router, plan.mlp_layers[layer.index], step))
            k = plan.sparse_layers.get(layer.index)
            if k is not None:
                router = model.polar_routers.attention_router(layer.index)
                handles.extend(_hooks_for_layer(layer, router, k, group_width, step))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        if had_own_generate:
            object.__setattr__(model, "generate", generate)
        else:
            model.__dict__.pop("generate", None)
