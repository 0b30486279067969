"""polar::selective_attention: GQA-native head-sparse decode attention over the HF static KV cache.

One decode token per sequence attends over the cache for the KV groups that sequence selected; every other
query head's output is exactly zero (arXiv 2505.14884). With R = Hq // Hkv query heads per group (HF's
``repeat_kv`` ordering: heads g*R .. g*R+R-1 belong to KV head g):

    out[b, g*R + r] = softmax(scale * q[b, g*R + r] @ K[b, g, valid].T) @ V[b, g, valid]   if g in group_index[b]
    out[b, h]       = 0                                                                    otherwise

Tensors
- query (B, Hq, D), or HF's (B, Hq, 1, D) view (read through its strides; the output has the query's rank).
- key_cache, value_cache (B, Hkv, S_max, D): HF's StaticCache tensors, read through their strides (unit
  stride along D required).
- group_index (B, k) int32/int64, 1 <= k <= Hkv, values in [0, Hkv), any order; or None: every group (the dense
  layers' case, k = Hkv, the same result as an index of every group, with no index tensor to build or read).
- key_mask None (all S_max keys valid) or bool (B, S_max) / HF's (B, 1, 1, S_max) (True = attend); a batch
  dim of 1 broadcasts. A row with no valid key gives an output of 0 (not NaN).
- scale: the softmax scale (the wrapper defaults to D**-0.5).
- key_span None or int32/int64 (B, 2) / (1, 2) (a batch of 1 broadcasts; or 3 columns, below): each sequence
  attends only to keys s with first <= s < last (values clamped to [0, S_max]), on top of key_mask.
  ``key_span(key_mask)`` gives the span of each row's valid keys, which changes nothing but spares every kernel
  program its scan of the mask row: the compiler pass computes it once per decode step and passes it to every
  layer. A third column (B, 3), ``no_holes``, nonzero for a row, makes that row attend to every key of its span
  and not read key_mask at all; ``key_span`` sets it exactly where the mask holds no False inside the span (an HF
  mask: left padding before, unfilled slots after), so the result is again the mask's, and the kernel skips a
  dependent load of mask bytes before every key block's K/V copies.
- dtypes: one float dtype for query and caches. CUDA: bf16/fp16 (tensor cores, tuned table) and fp32 (ieee
  products, smaller tiles, untuned: for fp32 models and precision checks); the CPU reference also takes fp64.

Duplicates: a group listed twice in a row is computed once per occurrence (wasted work) and the output is
identical to listing it once. Out-of-range group values: the CPU path (the reference) raises ValueError; the
CUDA kernel cannot check without a host sync and ignores such an entry (it reads nothing for it).

The CUDA path is split-KV flash decoding:
1. ``_split_kernel``, grid (B*k selected (sequence, group) pairs, splits): each program loads its group's R
   query heads once (padded to 16 rows for ``tl.dot``: the kernel is memory bound, the idle rows cost no
   bytes), takes the sequence's valid span [first valid key, last valid key] from key_span, or else finds it
   by scanning the mask row (1 byte a key, against 2*D*2 bytes of K+V, but a serial start-up cost of 2-6 us
   a program at 4-16K slots on an H100), and streams its share of that span's K/V blocks ONCE for all R heads with an
   online softmax. Cache blocks outside the valid span are never read; keys masked inside it are not loaded
   either (predicated loads), so the cost follows the valid length without any host sync.
2. With one split (enough pairs to fill the GPU) that kernel normalises and writes the output itself, and the
   first program of each sequence writes zeros over the unselected groups: one launch. Otherwise
   ``_merge_kernel``, grid (B*Hkv, R), merges the splits of each query head of a selected group (all splits'
   partials loaded at once) and writes zeros for every group the sequence did not select (no separate memset
   either way).
Launch configs (block sizes, warps, stages, split rule) come from ``selective_attention_configs.json``
(tuned on an H100, the head_dim-96 entry on an H200; ``benchmarks/bench_selective_attention.py --tune``): no
autotuning, no host sync, so the op is CUDA-graph capturable. Importing this module needs no triton: without it
every device runs the reference.
"""

from __future__ import annotations  # kernel annotations (tl.constexpr) stay unevaluated without triton

import dataclasses
import functools
import json
import math
import numbers
from pathlib import Path

import torch

from polar_compile.ops._library import dot_acc, tl, triton
from polar_compile.ops._library import jit as _jit
from polar_compile.ops._library import register_op as _register

__all__ = [
    "LaunchConfig",
    "config_for",
    "key_span",
    "launch_selective_attention",
    "num_splits_for",
    "num_splits_with",
    "selective_attention",
    "selective_attention_reference",
    "unsupported_reason",
]

_INDEX_DTYPES = (torch.int32, torch.int64)
_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)  # the fast path, tuned table
# fp32 also runs the kernel (ieee tl.dot, smaller tiles: a precision path for fp32 models and checks, untuned)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_REFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256
_MAX_GROUP_RATIO = 128
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Input checks (metadata only: they run before any launch, and under tracing)
# --------------------------------------------------------------------------------------------------


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def _check_inputs(
    query, key_cache, value_cache, group_index, key_mask, scale, key_span=None, *, kernel_dtypes=None
) -> None:
    """Shapes, dtypes, devices and layouts; ``kernel_dtypes``: the dtypes the kernel takes (None: reference)."""
    for name, value in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        _check_tensor(name, value)
    if group_index is not None:
        _check_tensor("group_index", group_index)
    if query.dim() not in (3, 4) or (query.dim() == 4 and query.shape[2] != 1):
        raise ValueError(
            f"query must be (B, Hq, D) or (B, Hq, 1, D) (one decode token per sequence), got {tuple(query.shape)}"
        )
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache must be (B, Hkv, S_max, D), got shape {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} differs from key_cache shape {tuple(key_cache.shape)}"
        )
    batch, num_heads, head_dim = query.shape[0], query.shape[1], query.shape[-1]
    cache_batch, num_groups, seq_len, cache_head_dim = key_cache.shape
    if cache_batch != batch:
        raise ValueError(f"batch mismatch: query has {batch} sequences but key_cache has {cache_batch}")
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim mismatch: query has D={head_dim} but key_cache has D={cache_head_dim}")
    if num_groups == 0 or num_heads % num_groups:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of the KV heads ({num_groups})")
    if seq_len == 0:
        raise ValueError("key_cache has S_max = 0 (no cache slots)")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError(
            f"key_cache and value_cache need a unit stride along D, got strides {key_cache.stride()} and "
            f"{value_cache.stride()}"
        )

    allowed = _REFERENCE_DTYPES if kernel_dtypes is None else kernel_dtypes
    if query.dtype not in allowed:
        where = "selective_attention takes" if kernel_dtypes is None else "the Triton kernel takes"
        raise TypeError(f"{where} {', '.join(map(str, allowed))}; query is {query.dtype}")
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.dtype != query.dtype:
            raise TypeError(f"dtype mismatch: query is {query.dtype} but {name} is {tensor.dtype}")

    if group_index is not None:
        if group_index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"group_index must be int32 or int64, got {group_index.dtype}")
        if group_index.dim() != 2 or group_index.shape[0] != batch:
            raise ValueError(f"group_index must be (B={batch}, k), got shape {tuple(group_index.shape)}")
        if not 1 <= group_index.shape[1] <= num_groups:
            raise ValueError(f"group_index has k={group_index.shape[1]} columns; k must lie in [1, Hkv={num_groups}]")

    if key_mask is not None:
        _check_tensor("key_mask", key_mask)
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be bool (True = attend), got {key_mask.dtype}")
        shape = tuple(key_mask.shape)
        if shape not in ((batch, seq_len), (1, seq_len), (batch, 1, 1, seq_len), (1, 1, 1, seq_len)):
            raise ValueError(
                f"key_mask must be (B, S_max) or (B, 1, 1, S_max) with B={batch} or 1 and S_max={seq_len}, got {shape}"
            )
    if key_span is not None:
        _check_tensor("key_span", key_span)
        if key_span.dtype not in _INDEX_DTYPES:
            raise TypeError(f"key_span must be int32 or int64 (first, last) per sequence, got {key_span.dtype}")
        if key_span.dim() != 2 or key_span.shape[0] not in (batch, 1) or key_span.shape[1] not in (2, 3):
            raise ValueError(
                f"key_span must be (B={batch}, 2 or 3) or (1, 2 or 3): (first, last[, no_holes]) per sequence, "
                f"got shape {tuple(key_span.shape)}"
            )
        if key_span.device != query.device:
            raise ValueError(f"device mismatch: query is on {query.device} but key_span is on {key_span.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache), ("group_index", group_index)):
        if tensor is not None and tensor.device != query.device:
            raise ValueError(f"device mismatch: query is on {query.device} but {name} is on {tensor.device}")
    if key_mask is not None and key_mask.device != query.device:
        raise ValueError(f"device mismatch: query is on {query.device} but key_mask is on {key_mask.device}")

    if kernel_dtypes is not None:
        why = _kernel_shape_reason(head_dim, num_heads // num_groups)
        if why is not None:
            raise ValueError(why)


def unsupported_reason(dtype: torch.dtype, device: torch.device, head_dim: int, ratio: int) -> str | None:
    """Why the op cannot take a model's attention of this dtype / head_dim / query heads per group on ``device``
    (None: it can). The compiler pass asks before rewriting, so such a layer stays dense with this reason
    instead of failing inside inductor."""
    if device.type != "cuda" or triton is None:
        return None if dtype in _REFERENCE_DTYPES else f"selective_attention does not take {dtype}"
    if dtype not in _KERNEL_DTYPES:
        return f"the Triton kernel takes {', '.join(map(str, _KERNEL_DTYPES))}, not {dtype}"
    return _kernel_shape_reason(head_dim, ratio)


def _kernel_shape_reason(head_dim: int, ratio: int) -> str | None:
    if head_dim % 16 or not 16 <= head_dim <= _MAX_HEAD_DIM:
        return f"the Triton kernel takes head_dim a multiple of 16 in [16, {_MAX_HEAD_DIM}], got {head_dim}"
    if ratio > _MAX_GROUP_RATIO:
        return f"the Triton kernel takes at most {_MAX_GROUP_RATIO} query heads per KV head, got {ratio}"
    return None


def _check_group_values(group_index: torch.Tensor | None, num_groups: int) -> None:
    """Range check of the VALUES of group_index: reads data, so only where that costs no host sync (CPU, eager)."""
    if group_index is None or group_index.numel() == 0 or group_index.device.type != "cpu":
        return
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(group_index) or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in group_index.aminmax())
    if low < 0 or high >= num_groups:
        raise ValueError(f"group_index values must lie in [0, Hkv={num_groups}), got values in [{low}, {high}]")


def key_span(key_mask: torch.Tensor) -> torch.Tensor:
    """(B, 3) int32 [first, last) of each row's valid keys (True entries) of a bool mask (B, S_max) or
    (B, 1, 1, S_max), and no_holes: 1 where every key in [first, last) is valid (then the kernel does not read
    the row's mask). A row without a valid key gives (S_max, 0, 1), an empty span. Plain PyTorch (one fused
    reduction under inductor), so it runs wherever the mask is: the compiler pass computes it once per decode
    step for all layers, and ``selective_attention(..., key_span=key_span(mask))`` equals the call without it."""
    _check_tensor("key_mask", key_mask)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_span takes a bool mask (True = attend), got {key_mask.dtype}")
    if key_mask.dim() not in (2, 4) or (key_mask.dim() == 4 and key_mask.shape[1:3] != (1, 1)):
        raise ValueError(f"key_span takes a mask (B, S_max) or (B, 1, 1, S_max), got shape {tuple(key_mask.shape)}")
    rows = key_mask.reshape(key_mask.shape[0], key_mask.shape[-1])
    seq_len = rows.shape[-1]
    positions = torch.arange(seq_len, device=rows.device, dtype=torch.int32)
    first = torch.where(rows, positions, seq_len).amin(dim=1)
    last = torch.where(rows, positions + 1, 0).amax(dim=1)
    no_holes = rows.sum(dim=1, dtype=torch.int32) >= last - first  # the valid keys all lie in [first, last)
    return torch.stack((first, last, no_holes.to(first.dtype)), dim=1).to(torch.int32)


def _span_window(key_span: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B or 1, S_max) bool: first <= s < last, the span clamped to [0, S_max] as the kernel clamps it."""
    bounds = key_span[:, :2].to(torch.int64).clamp(0, seq_len)
    positions = torch.arange(seq_len, device=key_span.device)
    return (positions >= bounds[:, :1]) & (positions < bounds[:, 1:])


def _no_holes(key_span: torch.Tensor) -> torch.Tensor:
    """(B or 1, 1) bool: the rows whose span is attended whole, without their mask (a third column, nonzero)."""
    if key_span.shape[1] < 3:
        return torch.zeros(key_span.shape[0], 1, dtype=torch.bool, device=key_span.device)
    return key_span[:, 2:] != 0


# --------------------------------------------------------------------------------------------------
# Reference in plain PyTorch (the CPU implementation of the op, and the tests' ground truth)
# --------------------------------------------------------------------------------------------------


def selective_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group_index: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
    key_span: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-sparse decode attention in plain PyTorch; shapes as in the module docstring.

    Computes every head densely (fp32 math for bf16/fp16 inputs), then zeroes the heads of unselected groups.
    """
    _check_inputs(query, key_cache, value_cache, group_index, key_mask, scale, key_span)
    batch, num_groups, seq_len, head_dim = key_cache.shape
    ratio = query.shape[1] // num_groups
    _check_group_values(group_index, num_groups)
    compute = torch.float32 if query.dtype in _TENSOR_CORE_DTYPES else query.dtype
    q = query.reshape(batch, num_groups, ratio, head_dim).to(compute)
    scores = torch.matmul(q, key_cache.to(compute).transpose(-1, -2)) * scale  # (B, Hkv, R, S_max)
    if key_span is not None:  # the keys outside the span are masked out as well
        window = _span_window(key_span, seq_len)
        if key_mask is not None:  # a no_holes row attends its whole span, whatever its mask says
            window = window & (key_mask.reshape(-1, seq_len) | _no_holes(key_span))
        key_mask = window
    if key_mask is not None:
        valid = key_mask.reshape(key_mask.shape[0], 1, 1, seq_len)
        scores = scores.masked_fill(~valid, float("-inf"))
        # softmax of an all -inf row is NaN: a sequence without any valid key attends to nothing (output 0)
        weights = torch.softmax(scores, dim=-1).masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, value_cache.to(compute))  # (B, Hkv, R, D)
    if group_index is not None:
        groups = torch.arange(num_groups, device=group_index.device)
        active = (group_index[:, :, None] == groups).any(dim=1)  # (B, Hkv)
        out = out.masked_fill(~active[:, :, None, None], 0.0)
    return out.to(query.dtype).reshape(query.shape)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


# Ints that take many values (1 among them) are not specialised: one compile serves every batch, k, R and S_max.
_RUNTIME_INTS = ("num_selected", "num_groups", "ratio", "seq_len", "num_splits", "stride_gb", "stride_mb", "all_groups")


@_jit(do_not_specialize=_RUNTIME_INTS)
def _split_kernel(
    q_ptr,  # (B, Hq, [1,] D)
    k_ptr,  # (B, Hkv, S_max, D), unit stride along D
    v_ptr,  # (B, Hkv, S_max, D), unit stride along D
    group_ptr,  # (B, k) int32/int64; unread when all_groups
    mask_ptr,  # (B or 1, S_max) bool, when HAS_MASK
    span_ptr,  # (B or 1, 2 or 3) int32/int64 [first, last[, no_holes]), when HAS_SPAN
    out_ptr,  # (B, Hq, [1,] D) contiguous, the query dtype: written here when DIRECT
    acc_ptr,  # (B*k, splits, R, D) fp32: unnormalised partial outputs, when not DIRECT
    max_ptr,  # (B*k, splits, R) fp32: running max of the scores, log2 units
    sum_ptr,  # (B*k, splits, R) fp32: softmax denominators
    qk_scale,  # softmax scale * log2(e)
    num_selected,  # k
    num_groups,  # Hkv
    ratio,  # R = Hq // Hkv
    seq_len,  # S_max
    head_dim,
    num_splits,
    all_groups,  # group_index None: every group, pair b * Hkv + g is group g (k = Hkv). A value, not a constexpr
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_gb,
    stride_gk,
    stride_mb,
    stride_ms,
    stride_pb,
    stride_pk,
    stride_ob,
    stride_oh,
    HAS_MASK: tl.constexpr,
    HAS_SPAN: tl.constexpr,
    SPAN_NO_HOLES: tl.constexpr,  # key_span has its third column
    DIRECT: tl.constexpr,  # one split: normalise and write the output here, zero the unselected groups; no merge
    DOT_FP32: tl.constexpr,  # see dot_acc
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no mask along D, loads stay 16 bytes wide
    BLOCK_R: tl.constexpr,  # >= 16 (tl.dot), >= R
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= k
    SCAN_BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    split = tl.program_id(1)
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    batch = pair // num_selected
    slot = pair % num_selected
    # all_groups is a runtime value, so that a launch over every group compiles as an int32 index launch does, with
    # the group load and the zeroing below. As a constexpr it compiled them away: 96 registers instead of 114 at
    # Llama-3's wide entry (ptxas, sm_90; int32 and int64 indices alike), five programs a SM where the table counts
    # four, and 3-5% slower on 1,024-pair grids (Llama-3 B = 128 at density 1.0 on an H100; notes/
    # selective_attention.md, session 43).
    group = tl.load(group_ptr + batch * stride_gb + slot * stride_gk, mask=all_groups == 0, other=0).to(tl.int32)
    group = tl.where(all_groups != 0, slot.to(tl.int32), group)
    group_ok = (group >= 0) & (group < num_groups)
    # An out-of-range entry becomes group Hkv: its heads lie past Hq (masked everywhere), its span is empty.
    group = tl.where(group_ok, group, num_groups)
    batch64 = batch.to(tl.int64)

    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = group * ratio + offs_r
    mask_r = (offs_r < ratio) & (heads < num_groups * ratio)
    mask_d = offs_d < head_dim
    q = tl.load(  # issued before the mask scan: the two latencies overlap
        q_ptr + batch64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )

    # The sequence's valid span [first, last + 1), so that the splits share the VALID keys evenly with no host
    # sync: from key_span (one load), or else every program scans its mask row (S_max bytes, 1 byte a key against
    # 2*D*2 bytes of K+V, but serial: 2-6 us before the first K/V load at 4-16K slots).
    if HAS_MASK:
        mask_row = mask_ptr + batch64 * stride_mb
    if HAS_SPAN:
        span_row = span_ptr + batch64 * stride_pb
        first = tl.minimum(tl.maximum(tl.load(span_row), 0), seq_len).to(tl.int32)
        last = tl.minimum(tl.maximum(tl.load(span_row + stride_pk), 0), seq_len).to(tl.int32)
    elif HAS_MASK:
        offs_scan = tl.arange(0, SCAN_BLOCK)
        first = tl.zeros([], dtype=tl.int32) + seq_len
        last = tl.zeros([], dtype=tl.int32)
        count = tl.zeros([], dtype=tl.int32)
        for s0 in range(0, seq_len, SCAN_BLOCK):
            keys = s0 + offs_scan
            valid = tl.load(mask_row + keys * stride_ms, mask=keys < seq_len, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(valid, keys, seq_len), axis=0))
            last = tl.maximum(last, tl.max(tl.where(valid, keys + 1, 0), axis=0))
            count += tl.sum(valid.to(tl.int32), axis=0)
    else:
        first = 0
        last = seq_len
    last = tl.where(group_ok, last, first)
    span = tl.maximum(last - first, 0)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * chunk
    end = tl.minimum(start + chunk, last)

    k_rows = k_ptr + batch64 * stride_kb + group.to(tl.int64) * stride_kh + offs_d[None, :]
    v_rows = v_ptr + batch64 * stride_vb + group.to(tl.int64) * stride_vh + offs_d[None, :]
    if HAS_MASK:
        # Does the row's mask hold a hole inside the span? A row without one reads no mask bytes: a block's K/V
        # copies are predicated on its mask bytes, so their load is one more dependent latency in front of every
        # block's copies, 2-10% of a program over 1024 keys on an H100 (benchmarks/probe_attention_mask.py). A
        # branch around the load (a predicate on it measured no gain), one loop for both kinds of row. read_mask
        # is a runtime value in every variant, so the loop compiles to the same code (the same roundings)
        # whichever way the span arrives.
        if SPAN_NO_HOLES:
            read_mask = tl.load(span_row + 2 * stride_pk) == 0  # key_span's third column
        elif HAS_SPAN:
            read_mask = last > first  # holes unknown: read the mask wherever there is a key to read
        else:
            read_mask = count < last - first  # the scan counted the valid keys
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    length = tl.maximum(end - start, 0)
    for i in range(0, tl.cdiv(length, BLOCK_N)):
        offset = i * BLOCK_N + offs_n
        keys = start + offset
        valid = offset < length
        if HAS_MASK:  # noqa: SIM102 (HAS_MASK is a constexpr, read_mask a value: two kinds of branch)
            if read_mask:
                valid = valid & (tl.load(mask_row + keys * stride_ms, mask=valid, other=0) != 0)
        # Loads predicated on the mask: a masked key costs no bytes and its (possibly stale) values never
        # enter the sums.
        kv_mask = valid[:, None] if EVEN_D else valid[:, None] & mask_d[None, :]
        k = tl.load(k_rows + keys[:, None] * stride_ks, mask=kv_mask, other=0.0)
        v = tl.load(v_rows + keys[:, None] * stride_vs, mask=kv_mask, other=0.0)
        # R query rows padded to BLOCK_R >= 16 for the tensor cores: idle rows cost no bytes, and the kernel is
        # bound by bytes (for R = 1 a CUDA-core dot measured 2x slower: register-bound).
        scores = dot_acc(q, tl.trans(k), tl.zeros([BLOCK_R, BLOCK_N], tl.float32), DOT_FP32)
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # no valid key yet: keep exp2 finite
        p = tl.math.exp2(scores - safe_max[:, None])
        alpha = tl.math.exp2(row_max - safe_max)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        p = p.to(v.dtype)  # rounded to the cache dtype for the tensor cores, as flash attention does
        acc = dot_acc(p, v, acc, DOT_FP32)
        row_max = new_max

    if DIRECT:
        # no valid key: the sum is 0 and the output 0 (a NaN sum, from a NaN or infinite query or key, stays NaN)
        denominator = tl.where(row_sum > 0.0, row_sum, 1.0)
        out = tl.where(row_sum[:, None] == 0.0, 0.0, acc / denominator[:, None])
        out_rows = out_ptr + batch64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])
        if (slot == 0) & (all_groups == 0):  # every group selected: nothing to zero
            # The sequence's first program writes zeros over every head whose group the row does not select
            # (disjoint from what the other programs write, so no ordering is needed).
            offs_k = tl.arange(0, BLOCK_K)
            row = tl.load(group_ptr + batch * stride_gb + offs_k * stride_gk, mask=offs_k < num_selected, other=-1)
            for h0 in range(0, num_groups * ratio, BLOCK_R):
                zero_heads = h0 + offs_r
                selected = tl.sum((row[None, :] == (zero_heads // ratio)[:, None]).to(tl.int32), axis=1) > 0
                zero_mask = (~selected & (zero_heads < num_groups * ratio))[:, None] & mask_d[None, :]
                zero_rows = out_ptr + batch64 * stride_ob + zero_heads[:, None] * stride_oh + offs_d[None, :]
                tl.store(zero_rows, tl.zeros([BLOCK_R, BLOCK_D], out_ptr.dtype.element_ty), mask=zero_mask)
    else:
        rows = (pair * num_splits + split).to(tl.int64) * ratio + offs_r
        tl.store(max_ptr + rows, row_max, mask=mask_r)
        tl.store(sum_ptr + rows, row_sum, mask=mask_r)
        tl.store(acc_ptr + rows[:, None] * head_dim + offs_d[None, :], acc, mask=mask_r[:, None] & mask_d[None, :])


@_jit(do_not_specialize=("num_selected", "num_groups", "ratio", "num_splits", "stride_gb"))
def _merge_kernel(
    acc_ptr,  # (B*k, splits, R, D) fp32
    max_ptr,  # (B*k, splits, R) fp32
    sum_ptr,  # (B*k, splits, R) fp32
    group_ptr,  # (B, k); unread when ALL_GROUPS
    out_ptr,  # (B, Hq, [1,] D) contiguous, the query dtype
    num_selected,
    num_groups,
    ratio,
    head_dim,
    num_splits,
    stride_gb,
    stride_gk,
    stride_ob,
    stride_oh,
    ALL_GROUPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits merged per step: every split's partials of a step are loaded at once
    BLOCK_D: tl.constexpr,
):
    """One program per (sequence, KV group, query head of the group), grid (B*Hkv, R): the head's merged output
    if the sequence selected the group, else zeros.

    The partials of BLOCK_S splits are loaded together (one memory latency a step, not one a split): a loop of
    one split a step, one program per (sequence, group), took 7 us for 17 splits and 11 us for 29 at B = 1 on
    an H100 (torch profiler), against cuDNN's 17 us for the whole decode over 4096 keys
    (benchmarks/results/attention_b1_h100_s38.log)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    batch = pid // num_groups
    group = pid % num_groups
    if ALL_GROUPS:  # every group selected, group g in slot g
        hit = group
    else:
        offs_k = tl.arange(0, BLOCK_K)
        row = tl.load(group_ptr + batch * stride_gb + offs_k * stride_gk, mask=offs_k < num_selected, other=-1)
        hit = tl.min(tl.where(row == group, offs_k, BLOCK_K), axis=0)  # first occurrence (duplicates agree)
    found = hit < BLOCK_K
    pair = batch * num_selected + tl.where(found, hit, 0)

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    total_max = tl.full([], float("-inf"), tl.float32)
    total_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        split = s0 + offs_s
        # hit broadcast to a vector: the interpreter rejects a scalar & vector mask
        read = (split < num_splits) & ((offs_s * 0 + hit) < BLOCK_K)
        rows = (pair * num_splits + split).to(tl.int64) * ratio + head
        split_max = tl.load(max_ptr + rows, mask=read, other=float("-inf"))
        split_sum = tl.load(sum_ptr + rows, mask=read, other=0.0)
        split_acc = tl.load(acc_ptr + rows[:, None] * head_dim + offs_d[None, :], mask=read[:, None] & mask_d[None, :],
                            other=0.0)  # fmt: skip
        new_max = tl.maximum(total_max, tl.max(split_max, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.math.exp2(total_max - safe_max)
        beta = tl.math.exp2(split_max - safe_max)
        total_sum = total_sum * alpha + tl.sum(split_sum * beta, axis=0)
        acc = acc * alpha + tl.sum(split_acc * beta[:, None], axis=0)
        total_max = new_max
    # no valid key (or group not selected): the sum is 0 and the output is 0 (a NaN sum stays NaN, as above)
    denominator = tl.where(total_sum > 0.0, total_sum, 1.0)
    out = tl.where(total_sum == 0.0, 0.0, acc / denominator)
    tl.store(
        out_ptr + batch.to(tl.int64) * stride_ob + (group * ratio + head) * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


_MERGE_TILE = 4096  # BLOCK_S x BLOCK_D fp32 partials (and their pointers) in registers: 32 + 64 a thread at 4 warps


def _launch_merge(partials, groups, out, *, num_groups: int, num_selected: int, all_groups: bool) -> None:
    """The second launch of a split decode: merge ``partials`` = (acc (B*k, splits, R, D), max, sum) into ``out``
    (B, Hq, [1,] D), zeros over the groups a sequence did not select. ``groups``: the (B, k) index, or any tensor
    when ``all_groups``."""
    partial_acc, partial_max, partial_sum = partials
    pairs, splits, ratio, head_dim = partial_acc.shape
    batch = pairs // num_selected
    block_d = triton.next_power_of_2(head_dim)
    stride_gb, stride_gk = (0, 0) if all_groups else (groups.stride(0), groups.stride(1))
    _kernel(_merge_kernel, out.device)[(batch * num_groups, ratio)](
        partial_acc,
        partial_max,
        partial_sum,
        groups,
        out,
        num_selected,
        num_groups,
        ratio,
        head_dim,
        splits,
        stride_gb,
        stride_gk,
        out.stride(0),
        out.stride(1),
        ALL_GROUPS=int(all_groups),
        BLOCK_K=max(16, triton.next_power_of_2(num_selected)),
        BLOCK_S=max(1, min(triton.next_power_of_2(splits), _MERGE_TILE // block_d)),
        BLOCK_D=block_d,
        num_warps=4,
    )


# --------------------------------------------------------------------------------------------------
# Launch configs: a static table tuned offline on an H100 (benchmarks/bench_selective_attention.py --tune)
# --------------------------------------------------------------------------------------------------

_CONFIG_FILE = Path(__file__).with_name("selective_attention_configs.json")
_INTERPRETER_SM_COUNT = 4  # a pretend GPU for TRITON_INTERPRET runs, so that the split path is exercised


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Options of one launch of the split kernel.

    block_n: keys per loop step. occupancy, saturating_per_sm, overhead_keys, min_keys_per_split, max_splits:
    the split rule (:func:`num_splits_for`); occupancy is the resident programs per SM the rule was fitted with
    (the GPU tests check that the compiled kernel holds at least that many). min_cache_len: for a ``-wide``
    entry, the fewest cache slots (S_max) it is taken for (:func:`config_for`). min_pairs_per_sm,
    max_pairs_per_sm: for a ``-deep`` entry, the grids it is taken for, min x SMs < pairs <= max x SMs.
    num_splits: an explicit split count (tests, tuning), overriding the rule.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    occupancy: int = 2
    saturating_per_sm: float = 1.75
    overhead_keys: int = 128
    min_keys_per_split: int = 256
    max_splits: int = 64
    min_cache_len: int = 0
    min_pairs_per_sm: float = 0.0
    max_pairs_per_sm: float = 0.0
    num_splits: int | None = None

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")
        if self.occupancy < 1 or self.saturating_per_sm <= 0:
            raise ValueError(f"occupancy must be >= 1 and saturating_per_sm > 0, got {self.occupancy}, "
                             f"{self.saturating_per_sm}")  # fmt: skip
        if not 0 <= self.min_pairs_per_sm <= self.max_pairs_per_sm:
            raise ValueError(f"need 0 <= min_pairs_per_sm <= max_pairs_per_sm, got {self.min_pairs_per_sm}, "
                             f"{self.max_pairs_per_sm}")  # fmt: skip


def _table_key(ratio: int, head_dim: int) -> str:
    return f"{'mha' if ratio == 1 else 'gqa'}-d{triton.next_power_of_2(head_dim) if triton else head_dim}"


@functools.cache
def _config_table() -> dict[str, LaunchConfig]:
    if not _CONFIG_FILE.exists():
        return {}
    raw = json.loads(_CONFIG_FILE.read_text())
    fields = {f.name for f in dataclasses.fields(LaunchConfig)} - {"num_splits"}
    return {
        key: LaunchConfig(**{f: v for f, v in entry.items() if f in fields})
        for key, entry in raw.get("configs", {}).items()
    }


_FP32_SMEM_BYTES = 128 * 1024  # fp32 K + V tiles in flight, all stages (the H100 has 227 KB a block)


def config_for(
    ratio: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    pairs: int | None = None,
    cache_len: int | None = None,
) -> LaunchConfig:
    """Launch config for R query heads per group, this head_dim and cache dtype: the tuned table on CUDA (fp32
    halves the tile until K + V fit in shared memory), small blocks on CPU.

    pairs, cache_len: the grid's (sequence, selected group) pairs and the cache's S_max, when known. A grid of at
    least one wave of the table config's resident programs (occupancy x SMs) unsplit, over a cache of at least the
    entry's ``min_cache_len`` slots, takes the table's ``-wide`` entry where there is one:
    32-key blocks that fit 4 programs per SM instead of 3, so 512 pairs (Llama-2 B=32 at half the heads) run
    unsplit in one wave with no merge launch (H200: 3.95 -> 4.09 TB/s; 1024 pairs 4.19 -> 4.27). Below that the
    larger blocks read faster (256 pairs on the H200: 3.81 TB/s unsplit against 3.72 for the wide config's best);
    on the H100 the two agree within 2% (results/probe_attention_occupancy_h200_s9.log, tune_attention_*_s9.log).
    The wide entries were measured at head_dim 128 only; a head_dim below its padded tile (96: Phi-3) keeps the
    128-key blocks, 4-11% faster there (H200, Phi-3-mini shape, 1024-2048 pairs, the rule's split counts: 3.65-3.73
    -> 3.86-4.15 TB/s; results/probe_attention_splits_phi3_h200_s19.log). An entry for the exact head_dim wins over
    the padded one: ``mha-d96`` keeps those blocks and refits the split rule (3 splits, 2-5% faster at Phi-3's
    256-2048-pair grids; results/probe_attention_splits_phi3_h200_s20.log). Over short caches the narrow entry's
    two-deep 64-key pipeline beat the wide entry on full-wave grids too (H100, 1,280 slots: 3-4%), but not over
    long ones (4,352 slots: 10% slower; results/probe_attention_mask_h100_s32.log): the d128 wide entries start
    at 1,536 slots (``min_cache_len``; wide ahead from 1,792: 2-7%, session 34), and a full-wave grid over fewer
    takes the narrow entry unsplit.

    A sub-wave grid of more pairs than half the SMs and at most ``max_pairs_per_sm`` of them (67-132 pairs on an
    H100: up to one program per SM) takes the ``-deep`` entry where there is one: 128-key blocks, 3 stages, one
    program per SM, unsplit. There, two splits of the narrow entry no longer fit one program per SM and one split
    leaves each program fewer bytes in flight. H100, 4,352 slots (results/probe_attention_deep_h100_s42.log): 68-96
    pairs 4-6% faster than the narrow entry at its rule's split count (Llama-3 B=16 at 5 of 8 groups: 0.0674 ->
    0.0636 ms; OPT-66B B=1, all 72 heads: 0.0620 -> 0.0596), 106-132 level (from 1.5% slower to 0.9% faster),
    60-66 slower (two splits fill the SMs), 133 and up 1.3x slower (two waves); 1,280 slots: 0.7-2.5% faster at
    72-128 pairs; 16,640: 128 pairs 6-7% faster (Llama-3 B=16, all groups: 0.3824 -> 0.3580 ms, cuDNN 0.3603;
    session 43, results/probe_attention_128pairs_h100_s43.log), 112 4% faster, level at 80, 2.5% slower at 72
    (OPT-66B B=1).
    """
    if device.type == "cpu":  # interpreter: small blocks, so tiny test caches still loop over several blocks
        return LaunchConfig(block_n=16, num_warps=1, num_stages=1, occupancy=1, min_keys_per_split=16, max_splits=4)
    # Under a dynamic compile the sizes are SymInts: specialise (a guard per value), or the table key would be
    # built from a symbolic expression and miss.
    ratio, head_dim = int(ratio), int(head_dim)
    key = _table_key(ratio, head_dim)
    exact = f"{key.split('-')[0]}-d{head_dim}"  # an entry fitted at this head_dim (mha-d96) before the padded one
    config = _config_table().get(exact) or _config_table().get(key) or LaunchConfig()
    power_of_two = triton is None or triton.next_power_of_2(head_dim) == head_dim
    wide = _config_table().get(key + "-wide") if power_of_two else None
    full_wave = pairs is not None and int(pairs) >= config.occupancy * _sm_count_on(device)
    if wide is not None and full_wave and dtype != torch.float32:
        # A short cache keeps the narrow entry, unsplit: the grid is a full wave already, and session 32's narrow
        # split rule (fitted on sub-wave grids) cut 512 pairs over 1,280 slots in 2, 6-8% slower.
        long_cache = cache_len is None or int(cache_len) >= wide.min_cache_len
        config = wide if long_cache else dataclasses.replace(config, max_splits=1)
    deep = _config_table().get(key + "-deep") if power_of_two else None
    if deep is not None and pairs is not None and not full_wave and dtype != torch.float32:
        sm_count = _sm_count_on(device)
        if deep.min_pairs_per_sm * sm_count < int(pairs) <= deep.max_pairs_per_sm * sm_count:
            config = deep
    if dtype == torch.float32:
        stages = min(config.num_stages, 2)
        block_d = triton.next_power_of_2(head_dim) if triton else head_dim
        block_n = config.block_n
        while block_n > 16 and 2 * block_n * block_d * 4 * stages > _FP32_SMEM_BYTES:
            block_n //= 2
        config = dataclasses.replace(config, block_n=block_n, num_stages=stages, occupancy=1)  # ~128 KB smem
    return config


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count_on(device: torch.device) -> int:
    """The SMs the grid rules size for: the GPU's, or the interpreter's pretend count on the CPU."""
    if device.type == "cpu":
        return _INTERPRETER_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_splits_for(config: LaunchConfig, pairs: int, seq_len: int, device: torch.device) -> int:
    """Splits of each (sequence, group) pair's keys, from a wave model of the split kernel's grid.

    The pairs * splits programs all do the same work, so they run in waves of ``occupancy * SMs`` resident
    programs; about ``saturating_per_sm * SMs`` of them saturate memory bandwidth. A full wave then takes
    slots / saturating units of time and a last, partial wave of n programs max(1, n / saturating), whatever n
    is: a short tail wave costs nearly a full one (measured: 512 pairs in 396 slots run ~20% under 1536 pairs
    in the same slots). Each program also pays a fixed cost worth ``overhead_keys`` keys (mask scan, query,
    partials). The rule takes the split count with the least modelled time, >= min_keys_per_split cache slots a
    split, fewer splits on a tie.
    """
    if config.num_splits is not None:
        return config.num_splits
    return num_splits_with(config, pairs, seq_len, _sm_count_on(device))


def num_splits_with(config: LaunchConfig, pairs: int, seq_len: int, sm_count: int) -> int:
    """:func:`num_splits_for`'s wave model on a GPU of ``sm_count`` SMs (config.num_splits not consulted)."""
    # The choice is a discrete argmin: under symbolic shapes (dynamic compile, opcheck) it specialises on the
    # sizes (a guard per value), as the partial buffers' shapes depend on it.
    pairs, seq_len = int(pairs), int(seq_len)
    slots = config.occupancy * sm_count
    saturating = max(config.saturating_per_sm * sm_count, 1.0)
    limit = max(1, min(seq_len // config.min_keys_per_split, config.max_splits))
    pairs = max(pairs, 1)

    def modelled_time(splits: int) -> float:
        full_waves, tail = divmod(pairs * splits, slots)
        waves = full_waves * slots / saturating + (max(1.0, tail / saturating) if tail else 0.0)
        return waves * (1.0 / splits + config.overhead_keys / max(seq_len, 1))

    return min(range(1, limit + 1), key=lambda splits: (round(modelled_time(splits), 9), splits))


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _kernel(kernel, device: torch.device):
    # wrap_triton lets make_fx / inductor see the launch; interpreted kernels (CPU, tests) launch directly
    # (torch 2.11's wrap_triton rejects them).
    return kernel if device.type == "cpu" else torch.library.wrap_triton(kernel)


# --------------------------------------------------------------------------------------------------
# Launcher (tests call it directly with CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------------


def _launch(query, key_cache, value_cache, group_index, key_mask, scale, key_span, config: LaunchConfig | None):
    batch, num_groups, seq_len, head_dim = key_cache.shape
    num_heads = query.shape[1]
    ratio = num_heads // num_groups
    all_groups = group_index is None
    num_selected = num_groups if all_groups else group_index.shape[1]
    device = query.device
    out = torch.empty(query.shape, device=device, dtype=query.dtype)
    if batch == 0:
        return out
    pairs = batch * num_selected
    if config is None:
        config = config_for(ratio, head_dim, device, query.dtype, pairs=pairs, cache_len=seq_len)
    splits = num_splits_for(config, pairs, seq_len, device)
    direct = splits == 1
    if direct:  # the split kernel writes the output itself: no partials (never-read stand-ins), no second launch
        partial_acc, partial_max, partial_sum = (torch.empty(0, device=device, dtype=torch.float32) for _ in range(3))
    else:
        partial_acc = torch.empty((pairs, splits, ratio, head_dim), device=device, dtype=torch.float32)
        partial_max = torch.empty((pairs, splits, ratio), device=device, dtype=torch.float32)
        partial_sum = torch.empty((pairs, splits, ratio), device=device, dtype=torch.float32)
    if all_groups:  # never read; int32 with unit stride, so that the split kernel compiles as for an int32 index
        groups, stride_gb, stride_gk = torch.empty(0, device=device, dtype=torch.int32), 0, 1
    else:
        groups, stride_gb, stride_gk = group_index, group_index.stride(0), group_index.stride(1)
    if key_mask is None:
        mask, stride_mb, stride_ms = groups, 0, 0  # unused (HAS_MASK=0)
    else:
        mask = key_mask
        stride_mb = mask.stride(0) if mask.shape[0] > 1 else 0  # a batch of 1 broadcasts
        stride_ms = mask.stride(-1)
    if key_span is None:
        span, stride_pb, stride_pk = groups, 0, 0  # unused (HAS_SPAN=0)
    else:
        span = key_span
        stride_pb = span.stride(0) if span.shape[0] > 1 else 0
        stride_pk = span.stride(1)
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(16, triton.next_power_of_2(ratio))  # tl.dot needs >= 16 rows
    block_k = max(16, triton.next_power_of_2(num_selected))  # floor of 16: fewer compiles, idle lanes are free
    _kernel(_split_kernel, device)[(pairs, splits)](
        query,
        key_cache,
        value_cache,
        groups,
        mask,
        span,
        out,
        partial_acc,
        partial_max,
        partial_sum,
        float(scale) * _LOG2E,
        num_selected,
        num_groups,
        ratio,
        seq_len,
        head_dim,
        splits,
        int(all_groups),
        query.stride(0),
        query.stride(1),
        query.stride(-1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        stride_gb,
        stride_gk,
        stride_mb,
        stride_ms,
        stride_pb,
        stride_pk,
        out.stride(0),
        out.stride(1),
        HAS_MASK=int(key_mask is not None),
        HAS_SPAN=int(key_span is not None),
        SPAN_NO_HOLES=int(key_span is not None and key_span.shape[1] == 3),
        DIRECT=int(direct),
        DOT_FP32=int(device.type == "cpu" or query.dtype == torch.float32),
        EVEN_D=int(block_d == head_dim),
        BLOCK_R=block_r,
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
        SCAN_BLOCK=min(4096, max(triton.next_power_of_2(seq_len), 16)),  # larger: more registers (ptxas)
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not direct:
        _launch_merge(
            (partial_acc, partial_max, partial_sum),
            groups,
            out,
            num_groups=num_groups,
            num_selected=num_selected,
            all_groups=all_groups,
        )
    return out


def launch_selective_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group_index: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
    key_span: torch.Tensor | None = None,
    *,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Run the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1). Shapes as in the module docstring."""
    if triton is None:
        raise RuntimeError("launch_selective_attention needs triton")
    interpreted = query.device.type == "cpu"
    _check_inputs(query, key_cache, value_cache, group_index, key_mask, scale, key_span, kernel_dtypes=_KERNEL_DTYPES)
    if interpreted:
        _check_group_values(group_index, key_cache.shape[1])
    return _launch(query, key_cache, value_cache, group_index, key_mask, scale, key_span, config)


# --------------------------------------------------------------------------------------------------
# The registered op: CUDA -> Triton kernels, anything else -> the reference
# --------------------------------------------------------------------------------------------------


@_register("polar::selective_attention")
def _selective_attention_op(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group_index: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
    key_span: torch.Tensor | None = None,
) -> torch.Tensor:
    # Device first: CPU (and any device without the kernel) runs the reference, so eager, opcheck and
    # torch.compile all work on a CPU-only machine.
    if query.device.type != "cuda" or triton is None:
        return selective_attention_reference(query, key_cache, value_cache, group_index, key_mask, scale, key_span)
    _check_inputs(query, key_cache, value_cache, group_index, key_mask, scale, key_span, kernel_dtypes=_KERNEL_DTYPES)
    return _launch(query, key_cache, value_cache, group_index, key_mask, scale, key_span, None)


def selective_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group_index: torch.Tensor | None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    key_span: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-sparse decode attention: ``torch.ops.polar.selective_attention`` with scale defaulting to D**-0.5.

    query (B, Hq, D) or (B, Hq, 1, D); key_cache, value_cache (B, Hkv, S_max, D); group_index (B, k) int, or None
    for every group;
    key_mask None or bool (B, S_max) / (B, 1, 1, S_max) (batch 1 broadcasts); key_span None or int (B, 2) / (1, 2)
    [first, last) per sequence, or (B, 3) / (1, 3) with no_holes (``key_span(key_mask)``: the same result, without
    the kernel's mask scans, and without its mask loads for rows whose valid keys are contiguous).
    Returns the query's shape and dtype; heads of unselected groups are exactly zero.
    """
    for name, value in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        _check_tensor(name, value)
    if scale is None:
        if query.shape[-1] == 0:
            raise ValueError("query has head_dim 0")
        scale = query.shape[-1] ** -0.5
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = float(scale)  # numpy scalars too
    if not isinstance(scale, float):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if group_index is not None:
        _check_tensor("group_index", group_index)
    if key_mask is not None:
        _check_tensor("key_mask", key_mask)
    if key_span is not None:
        _check_tensor("key_span", key_span)
    return torch.ops.polar.selective_attention(
        query, key_cache, value_cache, group_index, key_mask, float(scale), key_span
    )
