"""Parallel projections in one buffer, so the compiled step can run them as one GEMM.

A decoder layer multiplies the same normalised hidden state by q, k and v (and, in a gated MLP, by gate and
up). At decode batch sizes those GEMMs are bound by weight bytes, and one GEMM over the concatenated
weights streams them faster than three small ones (H200, bf16, cuBLAS, every layer of Llama-2-7B at
M = 32: 4.25 -> 3.69 ms per step; benchmarks/probe_fused_linears.py). A graph pass cannot concatenate
weights without copying them every step, so :func:`pack_projections` does it once, in place:

- each group's weights are concatenated into one new tensor and each ``nn.Linear``'s weight (and bias) is
  re-bound as a row view of it; the old storages are freed, so the model's memory is unchanged once done
  (the peak is one group's weights more, for a moment);
- values, shapes, dtypes and the modules' own forward are unchanged: eager code computes exactly what it
  did, and in-place updates (``load_state_dict``, ``weight.copy_``) still reach the packed buffer.

The ``fuse_projections`` pass (``polar_compile/passes/fuse_projections.py``) then finds linears that share
an input and whose weights are adjacent rows of one storage, and emits one linear over that buffer.
:func:`unpack_projections` (called by ``restore``) gives every parameter its own storage again, which
safetensors' own ``save_file`` needs (it refuses tensors that share memory; ``save_pretrained`` handles shared
storage itself).
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import nn

from polar_compile.model_info import ModelInfo

logger = logging.getLogger("polar_compile.packing")

_PACKABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def projection_groups(info: ModelInfo) -> list[tuple[str, tuple[nn.Module, ...]]]:
    """(name, linears) of every group that reads one input: q/k/v per layer, and gate/up for gated MLPs."""
    groups = []
    for layer in info.layers:
        attention = layer.attention
        qkv = tuple(getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj"))
        if all(module is not None for module in qkv):
            groups.append((f"layer {layer.index} q/k/v", qkv))
        if layer.mlp_kind == "gated" and layer.mlp_gate is not None and layer.mlp_up is not None:  # not fused already
            groups.append((f"layer {layer.index} gate/up", (layer.mlp_gate, layer.mlp_up)))
    return groups


def is_packed(linears) -> bool:
    """True when the weights (and biases) are consecutive row blocks of one storage, in this order."""
    return _adjacent([m.weight for m in linears]) and (linears[0].bias is None or _adjacent([m.bias for m in linears]))


def _adjacent(tensors) -> bool:
    return all(consecutive(before, after) for before, after in itertools.pairwise(tensors))


def consecutive(before: torch.Tensor, after: torch.Tensor) -> bool:
    """True when ``after`` is stored right after ``before``: one storage, both contiguous, one dtype."""
    return (
        before.is_contiguous()
        and after.is_contiguous()
        and before.dtype == after.dtype
        and before.untyped_storage().data_ptr() == after.untyped_storage().data_ptr()
        and after.storage_offset() == before.storage_offset() + before.numel()
    )


def _why_not_packable(linears) -> str | None:
    if any(type(m) is not nn.Linear for m in linears):
        return "not all plain nn.Linear (quantised or wrapped layers are left alone)"
    weights = [m.weight for m in linears]
    if any(w.device.type == "meta" for w in weights):
        return "weights on the meta device (offloaded)"
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or weights[0].dtype not in _PACKABLE_DTYPES:
        return "weights differ in dtype, device or input width"
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return "some have a bias and some do not"
    return None


@torch.no_grad()
def _pack(linears) -> None:
    for attribute in ("weight", "bias"):
        tensors = [getattr(m, attribute) for m in linears]
        if tensors[0] is None:
            continue
        buffer = torch.cat([t.detach() for t in tensors])  # the one new storage
        for module, old, part in zip(linears, tensors, buffer.split([t.shape[0] for t in tensors]), strict=True):
            setattr(module, attribute, nn.Parameter(part, requires_grad=old.requires_grad))


def _shared_parameters(groups) -> set[int]:
    """ids of parameters that more than one projection holds (a tied k_proj, say): packing would untie them."""
    seen, shared = set(), set()
    for _, linears in groups:
        for module in linears:
            for parameter in (module.weight, module.bias):
                if parameter is not None:
                    (shared if id(parameter) in seen else seen).add(id(parameter))
    return shared


def _why_not(linears, shared: set[int]) -> str | None:
    if any(id(p) in shared for m in linears for p in (m.weight, m.bias) if p is not None):
        return "a parameter is shared with another projection (packing would untie it)"
    return _why_not_packable(linears)


def needs_packing(info: ModelInfo) -> bool:
    """True when a group that :func:`pack_projections` would pack is not packed now (its weights moved or were
    replaced since)."""
    groups = projection_groups(info)
    shared = _shared_parameters(groups)
    return any(_why_not(linears, shared) is None and not is_packed(linears) for _, linears in groups)


def pack_projections(info: ModelInfo) -> tuple[int, dict[str, str]]:
    """Pack every group of :func:`projection_groups` in place; returns (groups packed, {group: why not})."""
    packed, reasons = 0, {}
    groups = projection_groups(info)
    shared = _shared_parameters(groups)
    for name, linears in groups:
        reason = _why_not(linears, shared)
        if reason is not None:
            reasons[name] = reason
            logger.info("%s not packed: %s", name, reason)
            continue
        if not is_packed(linears):
            _pack(linears)
        packed += 1
    return packed, reasons


@torch.no_grad()
def unpack_projections(info: ModelInfo) -> int:
    """Give each packed group's parameters their own storage again (same values); returns groups unpacked."""
    count = 0
    for _, linears in projection_groups(info):
        if _why_not_packable(linears) is not None or not is_packed(linears):
            continue
        for module in linears:
            for attribute in ("weight", "bias"):
                old = getattr(module, attribute)
                if old is not None:
                    setattr(module, attribute, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
        count += 1
    return count
