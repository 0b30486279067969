"""polar::selective_gemm: batch-union gather-GEMM for the MLP projections of a decode step.

The batch shares one neuron index ``index`` (k,) (arXiv 2505.14884). The up projection reads only those k
rows of the (F, d) up/gate weights, the down projection only those k columns of the (d, F) down weight:

    selective_up(x, W, b, index, act)      = act(x @ W[index].T + b[index])            (M, d) -> (M, k)
    selective_gated_up(x, Wg, Wu, index)   = silu(x @ Wg[index].T) * (x @ Wu[index].T)  (M, d) -> (M, k)
    selective_down(y, W, index, b)         = y @ W[:, index].T + b                       (M, k) -> (M, d)

(the argument orders of ``torch.ops.polar.*``; the Python wrappers below take ``bias`` and ``activation`` as
keywords: ``selective_up(x, W, index, bias=b, activation="relu")``)
    batch_union_topk(scores, k)            = relu(scores).sum(0).topk(k).indices as a set   (M, F) -> (k,)

Below M ~ 128 these are bound by weight bytes, so the kernels stream each selected weight row once (16-byte
loads of contiguous rows), multiply it with the whole (padded) batch through ``tl.dot``, and split the
reduction over more programs when the tiles alone cannot fill the GPU (fp32 partials in a workspace, then
one small pass that sums them and applies bias and activation: no atomics, deterministic). The down kernel
can also run as a stream-K grid (a table option, chosen per shape bucket where it measured faster): a fixed
number of programs share the reduction iterations of all output tiles evenly. The up ops return their (M, k)
output as a view with the row stride rounded up to 16 elements (:func:`empty_hidden`), so that the down
kernel reads it with 16-byte loads.

Index semantics (all four ops agree with the plain-PyTorch references, ``*_reference``):
- Output column j of the up ops belongs to ``index[j]``: any order is allowed and permuting ``index``
  permutes the columns the same way.
- A duplicate neuron gives a repeated column in the up ops and contributes once per occurrence in
  ``selective_down`` (exactly ``y @ W[:, index].T``).
- Index values must lie in [0, F). The CPU path (the references) checks this and raises ValueError; the CUDA
  kernels cannot check without a host sync, and an out-of-range value there reads out of bounds.

Layouts: x, y and the up/gate weights may have any strides (the kernels read through them; the fast path
wants a unit stride along d). A fused gate/up weight (2F, d) is passed as the views ``W[:F]``, ``W[F:]``
(no copy). The down weight is read through its strides too: the fast path wants it neuron-major, which
:func:`prepare_down_weight` makes once; the standard row-major layout is correct but gathers single 2-byte
elements at stride F (uncoalesced; not benchmarked).

Launch configs come from a static table (``selective_gemm_configs.json``, tuned on an H100) keyed by
(M bucket, d, k): no autotuning and no host sync, so every op is CUDA-graph capturable. The table's
``dense_from`` sends an op to its dense path (``LaunchConfig.dense``: cuBLAS over the whole weight plus a
gather / scatter pass) from the density k / F where the gather kernel measured slower than that, on every
benchmark shape, or per model width where it won on some only. The shipped table's (fitted on an H100 in session
35, results/gemm_dense_from_fit_h100_s35.log and dense_sweep_m128_m256_h100_s35.jsonl) are all at the OPT-66B width
(9216): the up op at density 1.0 at M 65-256, the down op from 0.85 at M 129-256 (M = 256, all neurons: 281.5 us
against the kernel's 373.1). On the 4096-wide shapes the kernels won (down, M = 256, all neurons: 76.8 us against
83.5 on OPT-6.7B).
Importing this module needs no triton: without it the ops run their references on every device.
"""

from __future__ import annotations  # kernel annotations (tl.constexpr) stay unevaluated without triton

import dataclasses
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from polar_compile.ops._library import check_same_dtype_and_device, dot_acc, tl, triton
from polar_compile.ops._library import jit as _jit
from polar_compile.ops._library import register_op as _register

__all__ = [
    "ACTIVATIONS",
    "LaunchConfig",
    "batch_union_topk",
    "batch_union_topk_reference",
    "config_for",
    "empty_hidden",
    "launch_selective_down",
    "launch_selective_gated_up",
    "launch_selective_up",
    "launch_union_radix_select",
    "launch_union_select",
    "prepare_down_weight",
    "selective_down",
    "selective_down_reference",
    "selective_gated_up",
    "selective_gated_up_reference",
    "selective_up",
    "selective_up_reference",
    "unsupported_reason",
]

ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}  # gelu = exact (erf) gelu

_INDEX_DTYPES = (torch.int32, torch.int64)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_REFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes, devices: metadata only, so they run before any launch and under tracing)
# --------------------------------------------------------------------------------------------------


def unsupported_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the selective GEMM ops cannot take a model's MLP of this dtype on ``device`` (None: they can); the
    compiler pass asks before rewriting, so such a layer stays dense with this reason."""
    return _dtype_reason(dtype, on_kernel=device.type == "cuda" and triton is not None)


def _dtype_reason(dtype: torch.dtype, on_kernel: bool) -> str | None:
    allowed = _KERNEL_DTYPES if on_kernel else _REFERENCE_DTYPES
    if dtype in allowed:
        return None
    where = "the CUDA kernels take" if on_kernel else "selective GEMM takes"
    return f"{where} {', '.join(map(str, allowed))}; got {dtype}"


def _check_matrix(name: str, tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D {what}, got shape {tuple(tensor.shape)}")


def _check_float(tensors: dict[str, torch.Tensor | None], on_kernel: bool) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    why = _dtype_reason(first.dtype, on_kernel)
    if why is not None:
        raise TypeError(f"{why} ({first_name})")
    check_same_dtype_and_device(present)


def _check_index(index: torch.Tensor, device: torch.device) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a Tensor, got {type(index).__name__}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D (k,), got shape {tuple(index.shape)}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if index.device != device:
        raise ValueError(f"device mismatch: index is on {index.device} but the inputs are on {device}")


def _check_index_values(index: torch.Tensor, size: int) -> None:
    """Range check of the index VALUES: reads the data, so only where that costs no host sync (CPU, eager)."""
    if index.numel() == 0 or index.device.type != "cpu":
        return
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(index) or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in index.aminmax())
    if low < 0 or high >= size:
        raise ValueError(f"index values must lie in [0, {size}), got values in [{low}, {high}]")


def _check_interpreted(tensor: torch.Tensor, index: torch.Tensor, size: int) -> None:
    """A launcher on the CPU runs the kernels under TRITON_INTERPRET=1: they take fp32 there too but not fp64
    (their dots would read it as garbage), and the index values are checked, as the reference does (the kernels
    do not range-check: an out-of-range index would read outside the weight)."""
    if tensor.device.type == "cuda":
        return
    if tensor.dtype not in (*_KERNEL_DTYPES, torch.float32):
        raise TypeError(f"the Triton kernels take {', '.join(map(str, (*_KERNEL_DTYPES, torch.float32)))} under the "
                        f"interpreter; got {tensor.dtype}")  # fmt: skip
    _check_index_values(index, size)


def _check_activation(activation: int) -> None:
    if activation not in ACTIVATIONS.values():
        raise ValueError(f"activation must be one of {ACTIVATIONS} (the int code), got {activation!r}")


def _on_kernel(device: torch.device) -> bool:
    return device.type == "cuda" and triton is not None


def _check_up(x, weight, bias, index, activation, *, on_kernel: bool) -> None:
    _check_matrix("x", x, "(M, d)")
    _check_matrix("weight", weight, "(F, d)")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"d mismatch: x is {tuple(x.shape)} (M, d) but weight is {tuple(weight.shape)} (F, d)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) = (F,), got {tuple(bias.shape)}")
    _check_float({"x": x, "weight": weight, "bias": bias}, on_kernel)
    _check_index(index, x.device)
    _check_activation(activation)


def _check_gated_up(x, gate_weight, up_weight, index, *, on_kernel: bool) -> None:
    _check_matrix("x", x, "(M, d)")
    _check_matrix("gate_weight", gate_weight, "(F, d)")
    _check_matrix("up_weight", up_weight, "(F, d)")
    if gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"d mismatch: x is {tuple(x.shape)} but gate_weight is {tuple(gate_weight.shape)} (F, d)")
    if up_weight.shape != gate_weight.shape:
        raise ValueError(
            f"gate_weight {tuple(gate_weight.shape)} and up_weight {tuple(up_weight.shape)} must have one shape"
        )
    _check_float({"x": x, "gate_weight": gate_weight, "up_weight": up_weight}, on_kernel)
    _check_index(index, x.device)


def _check_down(y, weight, index, bias, *, on_kernel: bool) -> None:
    _check_matrix("y", y, "(M, k)")
    _check_matrix("weight", weight, "(d, F)")
    _check_index(index, y.device)
    if y.shape[1] != index.shape[0]:
        raise ValueError(f"k mismatch: y is {tuple(y.shape)} (M, k) but index has {index.shape[0]} entries")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) = (d,), got {tuple(bias.shape)}")
    _check_float({"y": y, "weight": weight, "bias": bias}, on_kernel)


# --------------------------------------------------------------------------------------------------
# References in plain PyTorch (the CPU implementation of the ops, and the tests' ground truth)
# --------------------------------------------------------------------------------------------------


def _activate_reference(h: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == ACTIVATIONS["relu"]:
        return F.relu(h)
    if activation == ACTIVATIONS["gelu"]:
        return F.gelu(h)
    if activation == ACTIVATIONS["silu"]:
        return F.silu(h)
    return h


def selective_up_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, activation: int
) -> torch.Tensor:
    """act(x @ weight[index].T + bias[index]): x (M, d), weight (F, d), bias (F,) or None, index (k,) -> (M, k)."""
    _check_up(x, weight, bias, index, activation, on_kernel=False)
    _check_index_values(index, weight.shape[0])
    selected_bias = None if bias is None else bias.index_select(0, index)
    return _activate_reference(F.linear(x, weight.index_select(0, index), selected_bias), activation)


def selective_gated_up_reference(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """silu(x @ gate_weight[index].T) * (x @ up_weight[index].T): x (M, d), weights (F, d), index (k,) -> (M, k)."""
    _check_gated_up(x, gate_weight, up_weight, index, on_kernel=False)
    _check_index_values(index, gate_weight.shape[0])
    gate = F.linear(x, gate_weight.index_select(0, index))
    return F.silu(gate) * F.linear(x, up_weight.index_select(0, index))


def selective_down_reference(
    y: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y @ weight[:, index].T + bias: y (M, k), weight (d, F) any strides, index (k,), bias (d,) or None -> (M, d)."""
    _check_down(y, weight, index, bias, on_kernel=False)
    _check_index_values(index, weight.shape[1])
    return F.linear(y, weight.index_select(1, index), bias)


def _check_topk(scores: torch.Tensor, k: int) -> None:
    _check_matrix("scores", scores, "(M, F)")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    if not 0 <= k <= scores.shape[1]:
        raise ValueError(f"k must lie in [0, F={scores.shape[1]}], got {k}")


def batch_union_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """relu(scores).sum(0).topk(k).indices: scores (M, F) -> (k,) int64, highest summed score first.

    The sum runs in fp32 (bf16 sums over a batch of 256 lose the ranking). Plain torch ops: inductor fuses the
    relu and the sum, and the shapes are static (k is a Python int).
    """
    _check_topk(scores, k)
    return _relu_sum(scores).topk(k).indices


def _relu_sum(scores: torch.Tensor) -> torch.Tensor:
    return scores.clamp_min(0).sum(0, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@_jit()
def _activate(v, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        v = tl.where(v < 0.0, 0.0, v)  # not tl.maximum, which would turn a NaN into 0 (torch.relu keeps it)
    elif ACTIVATION == 2:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACTIVATION == 3:
        v = v * tl.sigmoid(v)
    return v


@_jit(do_not_specialize=("M", "k", "n_per_program", "stride_om"))
def _selective_up_kernel(
    x_ptr,  # (M, d)
    gate_ptr,  # (F, d): the only weight, or the gate weight when GATED
    up_ptr,  # (F, d): the up weight when GATED
    bias_ptr,  # (F,) when HAS_BIAS
    index_ptr,  # (k,) int32/int64
    out_ptr,  # (M, k), written when not USE_WORKSPACE
    workspace_ptr,  # (1 + GATED, splits, M, k) fp32 partial sums, when USE_WORKSPACE
    M,
    d,
    k,
    d_per_split,  # a multiple of BLOCK_D
    n_per_program,  # selected neurons per program, <= BLOCK_N (less when the config spreads them)
    stride_xm,
    stride_xd,
    stride_gn,
    stride_gd,
    stride_un,
    stride_ud,
    stride_om,
    stride_on,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,
    EVEN_D: tl.constexpr,  # d % BLOCK_D == 0: no mask along d, so the row loads stay 16 bytes wide
    MASK_ROWS: tl.constexpr,  # n_per_program < BLOCK_N: the weight loads skip the tile's unused rows
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows of a program's neuron tile
    BLOCK_D: tl.constexpr,
):
    # Grid (M tiles, neuron tiles, d splits), M tiles fastest so programs that share weight rows run together.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * n_per_program + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_n = (tl.arange(0, BLOCK_N) < n_per_program) & (offs_n < k)
    # Padding slots of the last neuron tile read row 0 (always valid); their columns are never stored. With
    # MASK_ROWS the weight loads of unused slots are masked off (no bytes).
    neuron = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)

    d_start = pid_s * d_per_split
    d_end = tl.minimum(d_start + d_per_split, d)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (d_start + offs_d)[None, :] * stride_xd
    gate_ptrs = gate_ptr + neuron[:, None] * stride_gn + (d_start + offs_d)[None, :] * stride_gd
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        up_ptrs = up_ptr + neuron[:, None] * stride_un + (d_start + offs_d)[None, :] * stride_ud
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(d_start, d_end, BLOCK_D):
        mask_d = (d0 + offs_d) < d_end
        if EVEN_D:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        w_gate = _load_rows(gate_ptrs, mask_n, mask_d, EVEN_D, MASK_ROWS)
        acc_gate = dot_acc(x, tl.trans(w_gate), acc_gate, DOT_FP32)
        if GATED:
            w_up = _load_rows(up_ptrs, mask_n, mask_d, EVEN_D, MASK_ROWS)
            acc_up = dot_acc(x, tl.trans(w_up), acc_up, DOT_FP32)
            up_ptrs += BLOCK_D * stride_ud
        x_ptrs += BLOCK_D * stride_xd
        gate_ptrs += BLOCK_D * stride_gd

    mask_out = mask_m[:, None] & mask_n[None, :]
    if USE_WORKSPACE:
        partial = (pid_s * M + offs_m[:, None]) * k + offs_n[None, :]
        tl.store(workspace_ptr + partial, acc_gate, mask=mask_out)
        if GATED:
            tl.store(workspace_ptr + tl.num_programs(2) * M * k + partial, acc_up, mask=mask_out)
    else:
        if HAS_BIAS:
            acc_gate += tl.load(bias_ptr + neuron, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        result = _activate(acc_gate, ACTIVATION)
        if GATED:
            result = result * acc_up
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask_out)


@_jit()
def _load_rows(ptrs, mask_n, mask_d, EVEN_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of weight rows: masked along d unless EVEN_D, along the rows when MASK_ROWS."""
    if EVEN_D:
        w = tl.load(ptrs, mask=mask_n[:, None], other=0.0) if MASK_ROWS else tl.load(ptrs)
    else:
        mask = (mask_n[:, None] & mask_d[None, :]) if MASK_ROWS else mask_d[None, :]
        w = tl.load(ptrs, mask=mask, other=0.0)
    return w


@_jit()
def _down_step(
    acc, y_ptr, w_ptr, neuron, slot, mask_j, offs_m, mask_m, offs_o, mask_o,
    stride_ym, stride_yk, stride_wd, stride_wf, DOT_FP32: tl.constexpr, MASK_J: tl.constexpr,
):  # fmt: skip
    """One reduction step of the down projection: acc + y[offs_m, slot] @ W[offs_o, neuron].T.

    MASK_J = 0 for a block of slots all in range: then no mask depends on where the reduction ends, and Triton
    loads the y tile with 16-byte async copies, pipelined like the weights. With a mask on `slot < k_end` (or
    without alignment known for the slots) it is a synchronous load in every iteration: compiled for sm_90 by
    triton 3.6 (session 28, tests/ops/test_library.py). LaunchConfig.pipeline_y picks the first."""
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + slot[None, :] * stride_yk
    # Neuron-major storage: row `neuron` of the (F, d) buffer is contiguous along the outputs.
    w_ptrs = w_ptr + neuron[:, None] * stride_wf + offs_o[None, :] * stride_wd
    if MASK_J:
        y = tl.load(y_ptrs, mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_j[:, None] & mask_o[None, :], other=0.0)
    else:
        y = tl.load(y_ptrs, mask=mask_m[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=mask_o[None, :], other=0.0)
    return dot_acc(y, w, acc, DOT_FP32)


@_jit()
def _store_down(acc, bias_ptr, out_ptr, offs_m, mask_m, offs_o, mask_o, stride_om, stride_od, HAS_BIAS: tl.constexpr):
    """Add the bias (when HAS_BIAS) to a tile of fp32 sums and store it in the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_o[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


@_jit(do_not_specialize=("M", "k", "k_per_split"))
def _selective_down_kernel(
    y_ptr,  # (M, k)
    w_ptr,  # (d, F), any strides; neuron-major (stride_wd == 1) is the fast path
    bias_ptr,  # (d,) when HAS_BIAS
    index_ptr,  # (k,)
    out_ptr,  # (M, d), written when not USE_WORKSPACE
    workspace_ptr,  # (splits, M, d) fp32, when USE_WORKSPACE
    M,
    d,
    k,
    k_per_split,  # a multiple of BLOCK_K
    stride_ym,
    stride_yk,
    stride_wd,
    stride_wf,
    stride_om,
    stride_od,
    HAS_BIAS: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr,  # LaunchConfig.pipeline_y
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # outputs (of d) per program
    BLOCK_K: tl.constexpr,  # selected neurons per step
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_o = offs_o < d

    k_start = pid_s * k_per_split
    if WHOLE_BLOCKS:
        k_start = tl.multiple_of(k_start, BLOCK_K)  # k_per_split is a multiple of BLOCK_K (_split)
    k_end = tl.minimum(k_start + k_per_split, k)
    # With WHOLE_BLOCKS the loop runs over the split's whole blocks only, unmasked along the slots, and a last
    # partial block follows it (see _down_step); else every step is masked.
    k_loop = k_start + (k_end - k_start) // BLOCK_K * BLOCK_K if WHOLE_BLOCKS else k_end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The index block is loaded one iteration ahead: a weight load whose address comes from a load in the same
    # iteration counts as "indirect" for Triton's pipeliner, which then prefetches it only (num_stages - 1) / 2
    # iterations ahead instead of num_stages - 1 (measured: the down kernel ran at ~60% of the up kernel's TB/s).
    next_neuron = tl.load(index_ptr + k_start + offs_j, mask=k_start + offs_j < k_end, other=0)
    for j0 in range(k_start, k_loop, BLOCK_K):
        slot = j0 + offs_j
        neuron = next_neuron.to(tl.int64)
        next_neuron = tl.load(index_ptr + BLOCK_K + slot, mask=BLOCK_K + slot < k_end, other=0)
        acc = _down_step(
            acc, y_ptr, w_ptr, neuron, slot, slot < k_end, offs_m, mask_m, offs_o, mask_o,
            stride_ym, stride_yk, stride_wd, stride_wf, DOT_FP32, MASK_J=not WHOLE_BLOCKS,
        )  # fmt: skip
    if WHOLE_BLOCKS:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if k_loop < k_end:  # the last, partial block
            slot = k_loop + offs_j
            acc = _down_step(
                acc, y_ptr, w_ptr, next_neuron.to(tl.int64), slot, slot < k_end, offs_m, mask_m, offs_o, mask_o,
                stride_ym, stride_yk, stride_wd, stride_wf, DOT_FP32, MASK_J=1,
            )  # fmt: skip

    if USE_WORKSPACE:
        mask_out = mask_m[:, None] & mask_o[None, :]
        tl.store(workspace_ptr + (pid_s * M + offs_m[:, None]) * d + offs_o[None, :], acc, mask=mask_out)
    else:
        _store_down(acc, bias_ptr, out_ptr, offs_m, mask_m, offs_o, mask_o, stride_om, stride_od, HAS_BIAS)


@_jit()
def _first_program(iteration, q, r):
    """The program of a stream-K grid whose range holds `iteration` (programs 0..r-1 take q + 1 iterations)."""
    boundary = r * (q + 1)
    return tl.where(iteration < boundary, iteration // (q + 1), r + (iteration - boundary) // q)


@_jit(do_not_specialize=("M", "k", "blocks_per_tile", "q", "r"))
def _selective_down_stream_kernel(
    y_ptr,  # (M, k)
    w_ptr,  # (d, F), any strides; neuron-major (stride_wd == 1) is the fast path
    bias_ptr,  # (d,) when HAS_BIAS
    index_ptr,  # (k,)
    out_ptr,  # (M, d): tiles that one program computes whole
    workspace_ptr,  # (programs, 2, BLOCK_M, BLOCK_N) fp32: a program's first and last partial tile
    M,
    d,
    k,
    tiles_m,
    blocks_per_tile,  # cdiv(k, BLOCK_K), at least 1
    q,  # iterations per program: q + 1 for programs < r, q for the rest (q >= 1)
    r,
    stride_ym,
    stride_yk,
    stride_wd,
    stride_wf,
    stride_om,
    stride_od,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr,  # LaunchConfig.pipeline_y
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # outputs (of d) per tile
    BLOCK_K: tl.constexpr,  # selected neurons per iteration
):
    """Stream-K down projection: every program runs the same number (+-1) of BLOCK_K iterations.

    The iterations of all output tiles are laid end to end (tile-major, m tiles fastest so that programs reading
    the same weight columns run together) and cut into `programs` equal ranges, so a grid of one or two programs
    per SM is evenly loaded whatever the tile count (a split-K grid of tiles x splits programs rarely fills
    whole waves). A tile computed whole by one program is written out; a tile cut by a range boundary leaves
    fp32 partials (slot 0: the program's first segment, slot 1: its last) that _finish_stream_kernel sums in
    program order: deterministic, no atomics.
    """
    pid = tl.program_id(0)
    start = pid * q + tl.minimum(pid, r)
    end = start + q + (pid < r).to(tl.int32)
    offs_i = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K)
    it = start
    while it < end:
        tile = it // blocks_per_tile
        block0 = it - tile * blocks_per_tile
        block1 = tl.minimum(blocks_per_tile, block0 + end - it)
        offs_m = (tile % tiles_m) * BLOCK_M + offs_i
        offs_o = (tile // tiles_m) * BLOCK_N + offs_c
        mask_m = offs_m < M
        mask_o = offs_o < d
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WHOLE_BLOCKS:
            # Blocks before `whole` lie inside k and run unmasked along the slots (see _down_step), with the index
            # block loaded one iteration ahead, as in the split-K kernel (the pipeliner then buffers the weights
            # num_stages - 1 deep: compiled, the loop below had one buffer at 3 stages).
            whole = tl.maximum(tl.minimum(block1, k // BLOCK_K), block0)
            next_neuron = tl.load(
                index_ptr + block0 * BLOCK_K + offs_j, mask=block0 * BLOCK_K + offs_j < whole * BLOCK_K, other=0
            )
            for j0 in range(block0 * BLOCK_K, whole * BLOCK_K, BLOCK_K):
                slot = j0 + offs_j
                neuron = next_neuron.to(tl.int64)
                next_neuron = tl.load(index_ptr + BLOCK_K + slot, mask=BLOCK_K + slot < whole * BLOCK_K, other=0)
                acc = _down_step(
                    acc, y_ptr, w_ptr, neuron, slot, slot < k, offs_m, mask_m, offs_o, mask_o,
                    stride_ym, stride_yk, stride_wd, stride_wf, DOT_FP32, MASK_J=0,
                )  # fmt: skip
        else:
            whole = block0
        # Masked steps: every block of the range, or with WHOLE_BLOCKS the tile's partial last one (or an empty one
        # when k = 0).
        for j0 in range(whole * BLOCK_K, block1 * BLOCK_K, BLOCK_K):
            slot = j0 + offs_j
            mask_j = slot < k
            neuron = tl.load(index_ptr + slot, mask=mask_j, other=0).to(tl.int64)
            acc = _down_step(
                acc, y_ptr, w_ptr, neuron, slot, mask_j, offs_m, mask_m, offs_o, mask_o,
                stride_ym, stride_yk, stride_wd, stride_wf, DOT_FP32, MASK_J=1,
            )  # fmt: skip
        if (block0 == 0) & (block1 == blocks_per_tile):
            _store_down(acc, bias_ptr, out_ptr, offs_m, mask_m, offs_o, mask_o, stride_om, stride_od, HAS_BIAS)
        else:
            partial = (pid * 2 + (it != start).to(tl.int32)) * BLOCK_M + offs_i
            tl.store(workspace_ptr + partial[:, None] * BLOCK_N + offs_c[None, :], acc)
        it += block1 - block0


@_jit(do_not_specialize=("M", "blocks_per_tile", "q", "r", "stride_om"))
def _finish_stream_kernel(
    workspace_ptr,  # (programs, 2, BLOCK_M, BLOCK_N) fp32
    bias_ptr,
    out_ptr,  # (M, d)
    M,
    d,
    tiles_m,
    blocks_per_tile,
    q,
    r,
    stride_om,
    stride_od,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,  # rows of the tile per program (grid: tiles x BLOCK_M / ROWS)
):
    """Sum the partials of the tiles that range boundaries cut, in program order (ROWS rows of a tile each)."""
    tile = tl.program_id(0)
    first = tile * blocks_per_tile
    p_first = _first_program(first, q, r)
    p_last = _first_program(first + blocks_per_tile - 1, q, r)
    if p_first != p_last:
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        offs_m = (tile % tiles_m) * BLOCK_M + rows
        offs_o = (tile // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        inner = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for p in range(p_first, p_last + 1):
            start = p * q + tl.minimum(p, r)
            slot = p * 2 + (start < first).to(tl.int32)  # the tile is p's first segment unless p began earlier
            acc += tl.load(workspace_ptr + slot * BLOCK_M * BLOCK_N + inner)
        _store_down(acc, bias_ptr, out_ptr, offs_m, offs_m < M, offs_o, offs_o < d, stride_om, stride_od, HAS_BIAS)


@_jit(do_not_specialize=("M", "N", "stride_om"))
def _finish_split_kernel(
    workspace_ptr,  # (1 + GATED, splits, M, N) fp32
    bias_ptr,
    index_ptr,
    out_ptr,  # (M, N)
    M,
    N,
    splits,
    stride_om,
    stride_on,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BIAS_MODE: tl.constexpr,  # 0 none, 1 bias[index[n]] (up), 2 bias[n] (down)
    BLOCK: tl.constexpr,
):
    """Sum the split partials, add bias, activate, cast: the second (small) pass of a split reduction."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(workspace_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if BIAS_MODE == 1:
        neuron = tl.load(index_ptr + n, mask=mask, other=0).to(tl.int64)
        acc += tl.load(bias_ptr + neuron, mask=mask, other=0.0).to(tl.float32)
    elif BIAS_MODE == 2:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    result = _activate(acc, ACTIVATION)
    if GATED:
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(splits):
            up += tl.load(workspace_ptr + (splits + s) * M * N + offs, mask=mask, other=0.0)
        result = result * up
    tl.store(out_ptr + (offs // N) * stride_om + n * stride_on, result.to(out_ptr.dtype.element_ty), mask=mask)


@_jit(do_not_specialize=("M", "k"))
def _gather_rows_kernel(
    gate_ptr,  # (F, M), unit stride along M: the transposed dense product (the gate's when GATED)
    up_ptr,  # (F, M) the up product when GATED
    bias_ptr,  # (F,) when HAS_BIAS
    index_ptr,  # (k,); unused when IDENTITY
    out_ptr,  # (M, k), unit stride along k
    M,
    M_PAD,  # the product's columns: M rounded up to 16 (a multiple of 16, so it is specialised as one)
    k,
    stride_gf,
    stride_uf,
    stride_om,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IDENTITY: tl.constexpr,  # index[j] = j: a transposed copy (the dense down path's output)
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[m, j] = act(gate[index[j], m] + bias[index[j]]) (GATED: silu(gate[..]) * up[index[j], m]), fp32 math:
    rows of the transposed product are read whole (coalesced along M) and written transposed.

    Every mask is constant over runs of 16 along the axis an access is contiguous in, so that Triton vectorises it
    (compiled for sm_90, benchmarks/inspect_kernels.py --only dense): the loads are masked by M_PAD, not M (the
    padded columns hold the product of zero rows, read and never written), and a block of whole index entries
    stores without a mask along k. Masked by M and k, every access was a 2-byte one."""
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_j = offs_j < k
    load_mask = mask_j[:, None] & (offs_m < M_PAD)[None, :]
    if IDENTITY:  # noqa: SIM108 (a constexpr branch: the index is not loaded)
        neuron = offs_j.to(tl.int64)
    else:
        neuron = tl.load(index_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
    value = tl.load(gate_ptr + neuron[:, None] * stride_gf + offs_m[None, :], mask=load_mask, other=0.0)
    value = value.to(tl.float32)
    if HAS_BIAS:
        value += tl.load(bias_ptr + neuron, mask=mask_j, other=0.0).to(tl.float32)[:, None]
    value = _activate(value, ACTIVATION)
    if GATED:
        up = tl.load(up_ptr + neuron[:, None] * stride_uf + offs_m[None, :], mask=load_mask, other=0.0)
        value = value * up.to(tl.float32)
    value = value.to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_j[:, None]
    mask_m = (offs_m < M)[None, :]
    if tl.program_id(0) * BLOCK_J + BLOCK_J <= k:  # whole index entries: no mask along k
        tl.store(out_ptrs, value, mask=mask_m)
    else:
        tl.store(out_ptrs, value, mask=mask_j[:, None] & mask_m)


@_jit(do_not_specialize=("k", "num_neurons"))
def _claim_rows_kernel(index_ptr, owner_ptr, k, num_neurons, BLOCK: tl.constexpr):
    """owner[index[j]] = the largest j naming that neuron (owner starts at -1): who writes the neuron's row."""
    offs_j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    neuron = tl.load(index_ptr + offs_j, mask=offs_j < k, other=-1).to(tl.int64)
    valid = (offs_j < k) & (neuron >= 0) & (neuron < num_neurons)
    tl.atomic_max(owner_ptr + neuron, offs_j.to(tl.int32), mask=valid, sem="relaxed")


@_jit(do_not_specialize=("M", "k", "num_neurons", "index_blocks"))
def _scatter_rows_kernel(
    y_ptr,  # (M, k)
    index_ptr,  # (k,)
    owner_ptr,  # (F,) int32 from _claim_rows_kernel
    full_ptr,  # (F, M_PAD), unit stride along M; uninitialised: the first pass writes every row
    M,
    M_PAD,  # full's columns: M rounded up to 16 (a multiple of 16, so it is specialised as one)
    k,
    num_neurons,
    index_blocks,  # programs [0, index_blocks) scatter the index's entries; the rest (first pass) zero rows
    stride_ym,
    stride_yk,
    stride_ff,
    REPEATS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """full[index[j], m] = y[m, j] for the owner j of each neuron (plain stores: every row written once), and the
    first pass's programs from index_blocks on write zeros over the rows of the neurons no entry names (full starts
    uninitialised); with REPEATS, the second pass, full[index[j], m] += y[m, j] for every other j (atomics: a
    repeated neuron sums its columns; nothing to do, and no bytes read, when the index has no repeats). An index
    value outside [0, F) writes nothing.

    As in _gather_rows_kernel, the masks are constant over runs of 16 along each access's contiguous axis, so that
    the accesses are vectorised: a block of whole index entries loads y with no mask along k (the values of
    entries it does not own are loaded and dropped), and a row is stored over all M_PAD columns (zeros past M)."""
    if tl.program_id(0) >= index_blocks:  # the first pass's zero rows: BLOCK_J neurons a program
        offs_f = (tl.program_id(0) - index_blocks) * BLOCK_J + tl.arange(0, BLOCK_J)
        unnamed = tl.load(owner_ptr + offs_f, mask=offs_f < num_neurons, other=0) < 0
        if tl.max(unnamed.to(tl.int32), axis=0) > 0:
            zero_ptrs = full_ptr + offs_f[:, None].to(tl.int64) * stride_ff
            for m0 in range(0, M_PAD, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                zeros = tl.zeros((BLOCK_J, BLOCK_M), dtype=full_ptr.dtype.element_ty)
                tl.store(zero_ptrs + offs_m[None, :], zeros, mask=unnamed[:, None] & (offs_m < M_PAD)[None, :])
    else:
        # One program per BLOCK_J entries of the index, looping over M: the index -> owner loads are paid once.
        offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
        neuron = tl.load(index_ptr + offs_j, mask=offs_j < k, other=-1).to(tl.int64)
        mask_j = (offs_j < k) & (neuron >= 0) & (neuron < num_neurons)
        owner = tl.load(owner_ptr + neuron, mask=mask_j, other=-1)
        if REPEATS:  # noqa: SIM108 (a constexpr branch)
            mask_j = mask_j & (owner != offs_j)
        else:
            mask_j = mask_j & (owner == offs_j)
        whole = tl.program_id(0) * BLOCK_J + BLOCK_J <= k
        if tl.max(mask_j.to(tl.int32), axis=0) > 0:  # the repeats pass: no index repeats here, nothing to do
            y_ptrs = y_ptr + offs_j[:, None] * stride_yk
            full_ptrs = full_ptr + neuron[:, None] * stride_ff
            for m0 in range(0, M_PAD, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                y_offsets = offs_m[None, :].to(tl.int64) * stride_ym
                if whole:
                    value = tl.load(y_ptrs + y_offsets, mask=(offs_m < M)[None, :], other=0.0)
                else:
                    value = tl.load(y_ptrs + y_offsets, mask=(offs_j < k)[:, None] & (offs_m < M)[None, :], other=0.0)
                value = value.to(full_ptr.dtype.element_ty)
                mask = mask_j[:, None] & (offs_m < M_PAD)[None, :]
                if REPEATS:
                    tl.atomic_add(full_ptrs + offs_m[None, :], value, mask=mask, sem="relaxed")
                else:
                    tl.store(full_ptrs + offs_m[None, :], value, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launch configs: a static table tuned offline (benchmarks/bench_selective_gemm.py --tune)
# --------------------------------------------------------------------------------------------------

M_BUCKETS = (16, 32, 64, 128, 256)
_CONFIG_FILE = Path(__file__).with_name("selective_gemm_configs.json")
_INTERPRETER_SM_COUNT = 4  # a pretend GPU for TRITON_INTERPRET runs, so that the split path is exercised


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Block shapes and launch options of one kernel launch.

    block_n: neurons per program (up) or outputs per program (down); block_r: the reduction step (d for up,
    selected neurons for down). programs_per_sm: split the reduction until about this many programs run per
    SM (0: never split). split: an explicit number of splits (tests), overriding programs_per_sm.
    stream_k (down only): launch max(programs_per_sm, 1) x SMs programs (or `split` of them) that share the
    iterations of all tiles evenly, instead of a tiles x splits grid.
    spread (up ops only): when the neuron tiles of block_n leave SMs idle, spread the k neurons evenly over
    about spread x SMs programs instead (cdiv(k, programs) rows each, the rest of the block_n tile masked off:
    no bytes read for it). 0: off. E.g. k = 3686 at block_n 32 gives 116 tiles on a 132-SM H100; spread 1.0
    gives 132 programs of 28 neurons.
    dense: run no gather kernel; multiply by the WHOLE weight through torch (cuBLAS) instead, then take the
    index's columns of the product (up ops: one small Triton pass gathers, activates and casts) or scatter y
    into the full neuron dimension first (down: see _dense_down). Reads every weight byte, so it only pays
    where the gather kernels lose to cuBLAS (high density at large M). Block fields are then unused.
    pipeline_y (down only): run the reduction over whole blocks of slots, then one masked partial block, so that
    the y tile is loaded by pipelined async copies like the weights instead of a synchronous load every step
    (see _down_step). The tuner tries it on every down candidate; the table's entries say where it won.
    """

    block_m: int = 16
    block_n: int = 64
    block_r: int = 128
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: float = 2.0
    split: int | None = None
    stream_k: bool = False
    spread: float = 0.0
    dense: bool = False
    pipeline_y: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_r"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.split is not None and self.split < 1:
            raise ValueError(f"split must be >= 1, got {self.split}")
        if not self.spread >= 0:  # also NaN
            raise ValueError(f"spread must be >= 0, got {self.spread}")
        if self.dense and (self.stream_k or self.spread or self.split is not None or self.pipeline_y):
            raise ValueError(
                "LaunchConfig.dense launches no gather kernel: stream_k, spread, split and pipeline_y do not apply"
            )


def m_bucket(M: int) -> int:
    """The smallest bucket of M_BUCKETS that holds M (256 for anything larger)."""
    for bucket in M_BUCKETS:
        if bucket >= M:
            return bucket
    return M_BUCKETS[-1]


def _default_config(op: str, M: int) -> LaunchConfig:
    block_m = min(m_bucket(M), 64 if M <= 128 else 128)
    if op == "down":
        return LaunchConfig(block_m=block_m, block_n=64, block_r=64, num_warps=4, num_stages=4)
    return LaunchConfig(block_m=block_m, block_n=64, block_r=128 if op == "up" else 64, num_warps=4, num_stages=4)


@functools.cache
def _config_json() -> dict:
    return json.loads(_CONFIG_FILE.read_text()) if _CONFIG_FILE.exists() else {}


@functools.cache
def _config_table() -> dict[str, list[tuple[int, int, int, LaunchConfig]]]:
    raw = _config_json()
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    return {
        op: [
            (e["m"], e["d"], e["k"], LaunchConfig(**{f: v for f, v in e["config"].items() if f in fields}))
            for e in rows
        ]
        for op, rows in raw.get("configs", {}).items()
    }


def dense_from(op: str, M: int, d: int | None = None) -> float | None:
    """The density k / F from which the table runs ``op`` at batch M and model width d through cuBLAS over the whole
    weight (``LaunchConfig.dense``) because the gather kernel measured slower there; None: never.

    A bucket's entry is one density for every width, or a map from width to density where the dense path won at
    some widths only (as measured for the OPT-66B MLP, 9216 wide, at M 129-256); a width it does not name, or d
    None, gets None."""
    bucket = str(m_bucket(M))
    value = _config_json().get("dense_from", {}).get(op, {}).get(bucket)
    where = f"dense_from[{op!r}][{bucket!r}]"
    if isinstance(value, dict):
        where, value = f"{where}[{str(d)!r}]", value.get(str(d))
    if value is None:
        return None
    if not 0 < float(value) <= 1:  # also NaN
        raise ValueError(f"{_CONFIG_FILE.name}: {where} must be a density in (0, 1], got {value!r}")
    return float(value)


def config_for(op: str, M: int, d: int, k: int, num_neurons: int | None = None) -> LaunchConfig:
    """Launch config for op ("up", "gated_up", "down") from the tuned table: same M bucket, nearest (d, k).

    With num_neurons (F) given, a density k / F at or above :func:`dense_from` gives the dense config.
    """
    if op not in ("up", "gated_up", "down"):
        raise ValueError(f"op must be 'up', 'gated_up' or 'down', got {op!r}")
    threshold = dense_from(op, M, d)
    # k as the dense sweep draws it for a density (bench_selective_gemm: round(density * F)) takes its threshold
    if num_neurons and threshold is not None and k >= round(threshold * num_neurons):
        return LaunchConfig(dense=True)
    bucket = m_bucket(M)
    rows = [row for row in _config_table().get(op, []) if row[0] == bucket]
    if not rows:
        return _default_config(op, M)
    log_d, log_k = math.log(max(d, 1)), math.log(max(k, 1))
    return min(rows, key=lambda row: abs(math.log(row[1]) - log_d) + abs(math.log(row[2]) - log_k))[3]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a, b):
    return (a + b - 1) // b


def _sm_count_on(device: torch.device) -> int:
    """The SMs the grid rules size for: the GPU's, or the interpreter's pretend count on the CPU."""
    return _INTERPRETER_SM_COUNT if device.type == "cpu" else _sm_count(device.index or 0)


def _split(config: LaunchConfig, tiles: int, reduction: int, device: torch.device) -> tuple[int, int]:
    """(splits, reduction length per split, a multiple of block_r) for a grid of `tiles` output tiles."""
    blocks = max(_cdiv(reduction, config.block_r), 1)
    if config.split is not None:
        splits = config.split
    elif config.programs_per_sm <= 0:
        splits = 1
    else:
        sm_count = _sm_count_on(device)
        # Keep >= 2 reduction blocks per split: shorter chunks cost more in partial sums than they hide.
        splits = min(round(config.programs_per_sm * sm_count / tiles), max(blocks // 2, 1), 32)
    splits = max(min(splits, blocks), 1)
    per_split = _cdiv(blocks, splits) * config.block_r
    return _cdiv(reduction, per_split) if reduction else 1, per_split


def _kernel(kernel, device: torch.device):
    # wrap_triton lets make_fx / inductor see the launch; interpreted kernels (CPU, tests) launch directly
    # (torch 2.11's wrap_triton rejects them).
    return kernel if device.type == "cpu" else torch.library.wrap_triton(kernel)


def _dot_fp32(dtype: torch.dtype, device: torch.device) -> int:
    return int(dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu"))


def _finish(workspace, bias, index, out, splits, activation, gated, bias_mode, columns: int) -> None:
    """out[:, :columns] = the split partials of ``workspace`` summed, then bias and activation (out may be wider:
    the up ops pass their padded buffer, _padded_hidden)."""
    M, N = out.shape[0], columns
    block = 1024
    _kernel(_finish_split_kernel, out.device)[(_cdiv(M * N, block),)](
        workspace,
        bias if bias is not None else workspace,
        index,
        out,
        M,
        N,
        splits,
        out.stride(0),
        out.stride(1),
        ACTIVATION=activation,
        GATED=int(gated),
        BIAS_MODE=bias_mode,
        BLOCK=block,
        num_warps=4,
    )


# --------------------------------------------------------------------------------------------------
# Launchers (tests call these directly with CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------------


def empty_hidden(M: int, k: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (M, k) buffer for the up ops' output, the down op's input: row stride rounded up to a
    multiple of 16 elements (at most 15 unused columns per row). With k = 3686 (OPT-66B at density 0.1) a
    contiguous row starts only 4-byte aligned, and the down kernel's loads of it become 4-byte accesses through
    L1: measured on an H200, down at M = 64 took 38.4 us with a contiguous (64, 3686) input, 34.9 us with a
    padded one (notes/selective_gemm.md, session 5)."""
    return _padded_hidden(M, k, device=device, dtype=dtype)[:, :k]


def _padded_hidden(M: int, k: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The whole (M, k rounded up to 16) buffer behind :func:`empty_hidden`. The up launchers hand this buffer, not
    the (M, k) view, to their kernels (which write only the first k columns): a kernel that mutates a view makes
    inductor clone the view before the launch and scatter it back into the buffer after it (two copies a layer on
    the GPU, 1.3 us each at OPT-6.7B B=16; notes/selective_gemm.md, session 37), where a mutated fresh buffer is
    written in place."""
    return torch.empty((M, -(-k // 16) * 16), device=device, dtype=dtype)


def _neurons_per_program(config: LaunchConfig, m_tiles: int, k: int, device: torch.device) -> int:
    """Rows of the neuron index one up program takes: block_n, or fewer when config.spread asks for more programs
    than the block_n tiles give (LaunchConfig)."""
    if config.spread <= 0 or k == 0:
        return config.block_n
    programs = max(round(config.spread * _sm_count_on(device) / m_tiles), 1)
    return max(min(_cdiv(k, programs), config.block_n), 1)


def _launch_up(x, gate_weight, up_weight, bias, index, activation, config):
    M, d = x.shape
    k = index.shape[0]
    gated = up_weight is not None
    buffer = _padded_hidden(M, k, device=x.device, dtype=x.dtype)  # the kernels write it, not the view
    out = buffer[:, :k]
    if M == 0 or k == 0:
        return out
    if config is None:
        config = config_for("gated_up" if gated else "up", M, d, k, gate_weight.shape[0])
    for option in ("stream_k", "pipeline_y"):
        if getattr(config, option):
            raise ValueError(f"LaunchConfig.{option} applies to the down kernel only; the up kernels split d")
    index = index.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernels read it with unit stride
    if config.dense:
        _dense_up(x, gate_weight, up_weight, bias, index, activation, buffer, k)
        return out
    m_tiles = _cdiv(M, config.block_m)
    n_per_program = _neurons_per_program(config, m_tiles, k, x.device)
    n_tiles = _cdiv(k, n_per_program)
    splits, d_per_split = _split(config, m_tiles * n_tiles, d, x.device)
    workspace = buffer
    if splits > 1:
        workspace = torch.empty((1 + int(gated), splits, M, k), device=x.device, dtype=torch.float32)
    up = up_weight if gated else gate_weight
    _kernel(_selective_up_kernel, x.device)[(m_tiles, n_tiles, splits)](
        x,
        gate_weight,
        up,
        bias if bias is not None else x,
        index,
        buffer,
        workspace,
        M,
        d,
        k,
        d_per_split,
        n_per_program,
        x.stride(0),
        x.stride(1),
        gate_weight.stride(0),
        gate_weight.stride(1),
        up.stride(0),
        up.stride(1),
        out.stride(0),
        out.stride(1),
        ACTIVATION=activation,
        GATED=int(gated),
        HAS_BIAS=int(bias is not None),
        USE_WORKSPACE=int(splits > 1),
        EVEN_D=int(d % config.block_r == 0),
        MASK_ROWS=int(n_per_program < config.block_n),
        DOT_FP32=_dot_fp32(x.dtype, x.device),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=config.block_r,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        _finish(workspace, bias, index, buffer, splits, activation, gated, 1 if bias is not None else 0, k)
    return out


def _dense_up(x, gate_weight, up_weight, bias, index, activation, out, columns):
    """LaunchConfig.dense for the up ops: the whole product, transposed, through cuBLAS (hT = W @ x.T, (F, M):
    a selected neuron's outputs are one contiguous row), then one Triton pass reads the index's rows, adds the
    bias, activates (gated: silu(gate) * up) in fp32 and writes the first ``columns`` (= k) columns of ``out``."""
    M = out.shape[0]
    # The product's rows are padded to 16 entries: cuBLAS picks far slower kernels for an odd leading dimension
    # (H100, OPT-66B up at M = 65: 891 us unpadded against 247 us at M = 64; benchmarks/results/
    # dense_sweep_unpadded_h100_s14.jsonl); 16 rather than 8 so that the row stride meets Triton's
    # divisibility-by-16 specialisation. Where M is already a multiple of 16, x is used as it is: the same GEMM
    # with no zero-fill and copy launches.
    if M % 16:
        x_t = x.new_zeros((_cdiv(M, 16) * 16, x.shape[1]))
        x_t[:M] = x
        x_t = x_t.t()
    else:
        x_t = x.t()
    gate_t = torch.mm(gate_weight, x_t)
    up_t = torch.mm(up_weight, x_t) if up_weight is not None else None
    return _gather_rows(gate_t, up_t, bias, index, out, columns, activation)


def _gather_rows(gate_t, up_t, bias, index, out, columns, activation=0):
    """out[:, :columns] (M, k = columns) = act(gate_t[index].T + bias[index]) (with up_t: silu(..) *
    up_t[index].T) through _gather_rows_kernel; gate_t and up_t (F, M rounded up to 16) are transposed products,
    and index None reads their first k rows in order (a transposed copy)."""
    M, k = out.shape[0], columns
    block_j, block_m = 64, min(max(triton.next_power_of_2(M), 16), 64)
    up_arg = up_t if up_t is not None else gate_t  # unread unless GATED
    _kernel(_gather_rows_kernel, out.device)[(_cdiv(k, block_j), _cdiv(M, block_m))](
        gate_t,
        up_arg,
        bias if bias is not None else gate_t,
        index if index is not None else gate_t,
        out,
        M,
        gate_t.shape[1],
        k,
        gate_t.stride(0),
        up_arg.stride(0),
        out.stride(0),
        ACTIVATION=activation,
        GATED=int(up_t is not None),
        HAS_BIAS=int(bias is not None),
        IDENTITY=int(index is None),
        BLOCK_J=block_j,
        BLOCK_M=block_m,
        num_warps=4,
    )
    return out


def _dense_down(y, weight, index, bias):
    """LaunchConfig.dense for the down op: y scattered, transposed, into the full neuron dimension (yT (F, M);
    each neuron's row is written by one column of y, its owner, or zeroed when no entry names it, and the columns
    of a repeated neuron's other entries are then added: see _scatter_rows_kernel), then the whole product through
    cuBLAS: out = yT.T @ W.T (+ bias) where _product_into_out says, elsewhere outT = W @ yT and one pass that adds
    the bias and writes the (M, d) output. Exact and deterministic unless the index repeats a neuron (those adds are
    atomics in y's dtype; under the CPU interpreter, which has no bf16 atomics, a bf16 y goes through an fp32
    buffer). H100, OPT-66B, M = 256 (benchmarks/probe_dense_down.py): the whole path took 452 us with atomics for
    every column and 342 us with the owner's plain stores, against 251 us for the product alone (session 14: the
    scatter 51 us, the output's transposed copy 21 us; results/probe_dense_down_pieces_h100_s14.log). With the
    passes' accesses vectorised (session 34, same probe, one machine): 341.9 -> 292.7 us, and the up ops' dense
    path 322.0 -> 286.8 us (cuBLAS: 251.6 and 281.1; results/probe_dense_paths_vectorised_h100_s34.log). With the
    zero rows in the scatter and _product_into_out (session 35, same probe, one machine): 294.0 -> 281.2 us at
    M = 256, 294.9 -> 276.1 at M = 128; OPT-6.7B 87.0 -> 81.7 and 77.2 -> 63.8 (results/
    probe_dense_paths_h100_s35.log)."""
    M, k = y.shape
    d, num_neurons = weight.shape
    atomic_dtype = torch.float32 if (y.device.type == "cpu" and y.dtype == torch.bfloat16) else y.dtype
    # Rows padded to 16 entries, as in _dense_up (aligned cuBLAS operands, vectorised atomics). No zero-fill: the
    # first scatter pass writes every row, zeros where no index entry names the neuron.
    full_t = torch.empty((num_neurons, _cdiv(M, 16) * 16), device=y.device, dtype=atomic_dtype)
    owner = torch.full((num_neurons,), -1, device=y.device, dtype=torch.int32)
    if k:
        _kernel(_claim_rows_kernel, y.device)[(_cdiv(k, 1024),)](index, owner, k, num_neurons, BLOCK=1024)
    block_j, block_m = 32, min(max(triton.next_power_of_2(M), 16), 128)
    index_blocks = _cdiv(k, block_j)
    for repeats in (0, 1) if k else (0,):
        zero_blocks = 0 if repeats else _cdiv(num_neurons, block_j)
        _kernel(_scatter_rows_kernel, y.device)[(index_blocks + zero_blocks,)](
            y,
            index,
            owner,
            full_t,
            M,
            full_t.shape[1],
            k,
            num_neurons,
            index_blocks,
            y.stride(0),
            y.stride(1),
            full_t.stride(0),
            REPEATS=repeats,
            BLOCK_J=block_j,
            BLOCK_M=block_m,
            num_warps=4,
        )
    full_t = full_t.to(y.dtype)
    if _product_into_out(M, d):
        # out = yfull @ W.T (+ bias) straight from the transposed buffer: no transposed copy of the product
        return torch.mm(full_t.t(), weight.t()) if bias is None else torch.addmm(bias, full_t.t(), weight.t())
    out_t = torch.mm(weight, full_t)  # (d, M padded)
    out = torch.empty((M, d), device=y.device, dtype=y.dtype)
    return _gather_rows(out_t, None, bias, None, out, d)  # out = out_t[:, :M].T + bias


def _product_into_out(M: int, d: int) -> bool:
    """Whether _dense_down multiplies as out = yT.T @ W.T (M, d), not outT = W @ yT then a transposed copy.
    Timed on the H100 with benchmarks/probe_dense_down.py (us; results/probe_dense_down_h100_s14.log and
    probe_dense_paths_vectorised_h100_s34.log; the copy costs 4-21 us more on top of outT):

    - M a multiple of 16 (yT has exactly M columns): yT.T @ W.T was as fast or faster at M = 16, 64 and 128 on all
      three shapes (OPT-66B M=128: 236.4 against 273.9; OPT-6.7B M=128: 51.9 against 60.1; Llama-3 M=128: 45.8
      against 43.9 + the copy), and at M = 256 on the 4096-wide ones (OPT-6.7B 65.9 / 65.8, Llama-3 55.1 / 58.2),
      but at OPT-66B M = 256 cuBLAS ran it at 337 against 251: so not past 128 rows above 4096 wide. (At OPT-66B
      M = 128 cuBLAS's pick for yT.T @ W.T varied between processes: 236-237 us in one, 267-273 in another, in
      sessions 34 and 35 alike; outT read 267-274 in both, so the form is never the slower one there.)
    - Otherwise it would read the padded buffer's first M columns, an odd leading dimension, for which cuBLAS
      picked far slower kernels (M = 65: OPT-66B 508.6 against 247.2, Llama-3 133.2 against 48.8)."""
    return M % 16 == 0 and (M <= 128 or d <= 4096)


def launch_selective_up(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    activation: int,
    *,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Run the up kernel (CUDA, or CPU under TRITON_INTERPRET=1). Shapes as :func:`selective_up_reference`."""
    _check_up(x, weight, bias, index, activation, on_kernel=x.device.type == "cuda")
    _check_interpreted(x, index, weight.shape[0])
    return _launch_up(x, weight, None, bias, index, activation, config)


def launch_selective_gated_up(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    index: torch.Tensor,
    *,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Run the gated up kernel. Shapes as :func:`selective_gated_up_reference`."""
    _check_gated_up(x, gate_weight, up_weight, index, on_kernel=x.device.type == "cuda")
    _check_interpreted(x, index, gate_weight.shape[0])
    return _launch_up(x, gate_weight, up_weight, None, index, ACTIVATIONS["silu"], config)


def launch_selective_down(
    y: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Run the down kernel. Shapes as :func:`selective_down_reference`; weight read through its strides."""
    _check_down(y, weight, index, bias, on_kernel=y.device.type == "cuda")
    _check_interpreted(y, index, weight.shape[1])
    M, k = y.shape
    d = weight.shape[0]
    if M == 0 or d == 0:
        return torch.empty((M, d), device=y.device, dtype=y.dtype)
    if config is None:
        config = config_for("down", M, d, k, weight.shape[1])
    if config.spread:
        raise ValueError("LaunchConfig.spread applies to the up kernels only; the down kernel tiles d")
    index = index.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernels read it with unit stride
    if config.dense:
        return _dense_down(y, weight, index, bias)
    out = torch.empty((M, d), device=y.device, dtype=y.dtype)
    if config.stream_k:
        return _launch_down_stream(y, weight, index, bias, out, config)
    m_tiles, n_tiles = _cdiv(M, config.block_m), _cdiv(d, config.block_n)
    splits, k_per_split = _split(config, m_tiles * n_tiles, k, y.device)
    workspace = out
    if splits > 1:
        workspace = torch.empty((splits, M, d), device=y.device, dtype=torch.float32)
    _kernel(_selective_down_kernel, y.device)[(m_tiles, n_tiles, splits)](
        y,
        weight,
        bias if bias is not None else y,
        index,
        out,
        workspace,
        M,
        d,
        k,
        k_per_split,
        y.stride(0),
        y.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=int(bias is not None),
        USE_WORKSPACE=int(splits > 1),
        DOT_FP32=_dot_fp32(y.dtype, y.device),
        WHOLE_BLOCKS=int(config.pipeline_y),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_r,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        _finish(workspace, bias, index, out, splits, ACTIVATIONS["identity"], False, 2 if bias is not None else 0, d)
    return out


def _stream_programs(config: LaunchConfig, total: int, device: torch.device) -> int:
    if config.split is not None:
        programs = config.split
    else:
        programs = round(max(config.programs_per_sm, 1.0) * _sm_count_on(device))
    return max(min(programs, total), 1)


def _launch_down_stream(y, weight, index, bias, out, config):
    M, k = y.shape
    d = weight.shape[0]
    tiles_m, tiles_n = _cdiv(M, config.block_m), _cdiv(d, config.block_n)
    blocks_per_tile = max(_cdiv(k, config.block_r), 1)  # k = 0: one empty iteration writes the bias
    total = tiles_m * tiles_n * blocks_per_tile
    programs = _stream_programs(config, total, y.device)
    q, r = divmod(total, programs)
    workspace = torch.empty((programs, 2, config.block_m, config.block_n), device=y.device, dtype=torch.float32)
    bias_arg = bias if bias is not None else y
    _kernel(_selective_down_stream_kernel, y.device)[(programs,)](
        y,
        weight,
        bias_arg,
        index,
        out,
        workspace,
        M,
        d,
        k,
        tiles_m,
        blocks_per_tile,
        q,
        r,
        y.stride(0),
        y.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=int(bias is not None),
        DOT_FP32=_dot_fp32(y.dtype, y.device),
        WHOLE_BLOCKS=int(config.pipeline_y),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_r,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if blocks_per_tile > 1 and (r or q % blocks_per_tile):  # a range boundary cuts some tile
        rows = min(config.block_m, max(1024 // config.block_n, 1))  # about 1024 outputs per program
        _kernel(_finish_stream_kernel, y.device)[(tiles_m * tiles_n, config.block_m // rows)](
            workspace,
            bias_arg,
            out,
            M,
            d,
            tiles_m,
            blocks_per_tile,
            q,
            r,
            out.stride(0),
            out.stride(1),
            HAS_BIAS=int(bias is not None),
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            ROWS=rows,
            num_warps=4,
        )
    return out


# --------------------------------------------------------------------------------------------------
# batch_union_topk on the GPU: one program selects the k largest of the F summed scores
# --------------------------------------------------------------------------------------------------

UNION_SELECT_MAX_F = 1 << 14  # one program holds all F scores in registers; larger F: launch_union_radix_select


@_jit()
def _union_select_kernel(summed_ptr, out_ptr, F, k, BLOCK: tl.constexpr):
    # The summed scores are >= 0 (sums of ReLUs), and a non-negative fp32 orders like its bit pattern read as
    # int32. Find the k-th largest key bit by bit from the top (up to 31 block-wide counts over the keys held
    # in registers), then write every key above it and the lowest-index ties that complete k, in ascending
    # neuron order: exactly k distinct indices whatever the values (NaN too).
    offs = tl.arange(0, BLOCK)
    valid = offs < F
    value = tl.load(summed_ptr + offs, mask=valid, other=0.0)
    key = tl.where(valid, _union_key(value), -1)  # padding ranks below every valid key
    # Invariant: `count` keys are >= threshold, and count >= k. Stop early once exactly k are (relu-sums of
    # random bf16 scores get there after 21-22 of the 31 bits); else threshold ends as the k-th largest key.
    threshold = tl.program_id(0) * 0
    count = threshold + F
    bit = threshold + 30
    while (bit >= 0) & (count != k):
        candidate = threshold | (1 << bit)
        at_least = tl.sum((key >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(at_least >= k, candidate, threshold)
        count = tl.where(at_least >= k, at_least, count)
        bit -= 1
    _union_take(key, offs, threshold, count, k, out_ptr)


@_jit()
def _union_take(key, offs, threshold, count, k, out_ptr):
    """Write the indices of the k largest keys in ascending order, given the k-th largest key (threshold) and the
    number of keys at or above it (count >= k): every key above it and the lowest-index ties that complete k."""
    if count == k:
        chosen = key >= threshold
    else:  # ties at the k-th largest key: `need` (>= 1) of them, the lowest-index ones, complete k
        above = key > threshold
        tied = key == threshold
        need = k - tl.sum(above.to(tl.int32), axis=0)
        chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + slot, offs.to(tl.int64), mask=chosen)


def launch_union_select(summed: torch.Tensor, k: int, *, num_warps: int | None = None) -> torch.Tensor:
    """The k largest entries of ``summed`` (F,) fp32, all >= 0, as indices (k,) int64 in ascending order.

    One Triton program (F <= UNION_SELECT_MAX_F): a bitwise search for the k-th largest value over the scores
    held in registers, then a compaction; ties at the threshold go to the lowest indices. No host sync
    (CUDA-graph capturable).
    """
    if summed.dim() != 1 or summed.dtype != torch.float32:
        raise ValueError(f"summed must be 1-D fp32 (F,), got {summed.dtype} {tuple(summed.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    summed = summed.contiguous()  # the kernel reads it with unit stride
    num = summed.shape[0]
    if not 0 <= k <= num:
        raise ValueError(f"k must lie in [0, F={num}], got {k}")
    if num > UNION_SELECT_MAX_F:
        raise ValueError(f"launch_union_select takes F <= {UNION_SELECT_MAX_F}, got {num}")
    out = torch.empty(k, device=summed.device, dtype=torch.int64)
    if k == 0:
        return out
    block = max(triton.next_power_of_2(num), 16)
    if num_warps is None:
        num_warps = 8 if block >= 4096 else 4  # H100, F = 16384: 8 warps 29.3 us, 16: 30.3, 32: 40.9
    _kernel(_union_select_kernel, summed.device)[(1,)](summed, out, num, k, BLOCK=block, num_warps=num_warps)
    return out


# The same selection spread over many programs: a radix select of the 31-bit keys in three histogram rounds
# (bits 30-21, 20-10, 9-0), then a compaction. Five launches (a memset and four kernels) whatever F, each over a
# few KB that stay in L2, against the one-program search's ~21 serial block-wide counts. The first kernel also
# sums the ReLU'd scores over the batch, so the (M, F) scores are read once and no separate sum runs.

UNION_RADIX_BINS = (1024, 2048, 1024)  # bins of the three rounds: the key's bits 30-21, 20-10 and 9-0


@_jit()
def _union_key(value):
    """A summed score as an int32 that orders like it: NaN ranks first (as torch.topk ranks it), -0.0 as 0.0."""
    value = tl.where(value != value, float("inf"), value)
    value = tl.maximum(value, 0.0) + 0.0  # -0.0 -> +0.0: every key >= 0, so its bit pattern orders like it
    return value.to(tl.int32, bitcast=True)


@_jit()
def _union_bucket(hist_ptr, need, BINS: tl.constexpr):
    """(the bin that holds the need-th largest of the keys this histogram counts, the keys in higher bins)."""
    bins = tl.arange(0, BINS)
    counts = tl.load(hist_ptr + bins)
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    bucket = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
    return bucket, tl.sum(tl.where(bins > bucket, counts, 0), axis=0)


@_jit(do_not_specialize=("M", "F"))
def _union_sum_kernel(
    scores_ptr, keys_ptr, hist_ptr, M, F, stride_m, stride_f, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr
):
    """Round 1: each program sums its CHUNK columns of relu(scores) over the batch (fp32), stores them as keys and
    adds the histogram of their bits 30-21 to the global one."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < F
    rows = tl.arange(0, BLOCK_M)
    total = tl.zeros((CHUNK,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mask = ((m0 + rows) < M)[:, None] & valid[None, :]
        ptrs = scores_ptr + (m0 + rows)[:, None] * stride_m + offs[None, :] * stride_f
        score = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(tl.where(score < 0.0, 0.0, score), axis=0)  # not tl.maximum: a NaN stays NaN
    key = _union_key(total)
    tl.store(keys_ptr + offs, key, mask=valid)
    counts = tl.histogram(key >> 21, 1024, mask=valid)
    tl.atomic_add(hist_ptr + tl.arange(0, 1024), counts, mask=counts > 0, sem="relaxed")


@_jit(do_not_specialize=("F", "k"))
def _union_refine_kernel(keys_ptr, hist_ptr, F, k, ROUND: tl.constexpr, CHUNK: tl.constexpr):
    """Rounds 2 (bits 20-10 of the keys in round 1's bucket) and 3 (bits 9-0 of those in round 2's)."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < F
    key = tl.load(keys_ptr + offs, mask=valid, other=0)
    bucket1, above1 = _union_bucket(hist_ptr, k, 1024)
    if ROUND == 2:
        counts = tl.histogram((key >> 10) & 2047, 2048, mask=valid & ((key >> 21) == bucket1))
        tl.atomic_add(hist_ptr + 1024 + tl.arange(0, 2048), counts, mask=counts > 0, sem="relaxed")
    else:
        bucket2, _ = _union_bucket(hist_ptr + 1024, k - above1, 2048)
        prefix = (bucket1 << 11) | bucket2
        counts = tl.histogram(key & 1023, 1024, mask=valid & ((key >> 10) == prefix))
        tl.atomic_add(hist_ptr + 3072 + tl.arange(0, 1024), counts, mask=counts > 0, sem="relaxed")


@_jit(do_not_specialize=("F", "k"))
def _union_compact_kernel(keys_ptr, hist_ptr, out_ptr, F, k, CHUNK: tl.constexpr, SCAN: tl.constexpr):
    """Write every key above the k-th largest and the lowest-index ties that complete k, in ascending order: each
    program counts what the chunks before its own select (keys in L2), then compacts its chunk."""
    bucket1, above1 = _union_bucket(hist_ptr, k, 1024)
    bucket2, above2 = _union_bucket(hist_ptr + 1024, k - above1, 2048)
    bucket3, above3 = _union_bucket(hist_ptr + 3072, k - above1 - above2, 1024)
    threshold = (((bucket1 << 11) | bucket2) << 10) | bucket3  # the k-th largest key
    need = k - above1 - above2 - above3  # >= 1 keys equal to it complete k
    start = tl.program_id(0) * CHUNK
    greater = tl.program_id(0) * 0
    tied = greater
    for s0 in range(0, start, SCAN):
        offs = s0 + tl.arange(0, SCAN)
        key = tl.load(keys_ptr + offs, mask=offs < start, other=-1)
        greater += tl.sum((key > threshold).to(tl.int32), axis=0)
        tied += tl.sum((key == threshold).to(tl.int32), axis=0)
    offs = start + tl.arange(0, CHUNK)
    key = tl.load(keys_ptr + offs, mask=offs < F, other=-1)
    is_tie = key == threshold
    chosen = (key > threshold) | (is_tie & (tied + tl.cumsum(is_tie.to(tl.int32), axis=0) <= need))
    slot = greater + tl.minimum(tied, need) + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + slot, offs.to(tl.int64), mask=chosen & (slot < k))  # slot < k holds: a guard, not a rule


def launch_union_radix_select(
    scores: torch.Tensor, k: int, *, chunk: int = 1024, compact_chunk: int = 1024, num_warps: int = 4
) -> torch.Tensor:
    """batch_union_topk on many programs: the k largest of relu(scores).sum(0) (fp32 sums) as indices (k,) int64
    in ascending order, ties at the k-th largest going to the lowest indices (the set
    :func:`launch_union_select` gives for the same sums). Any F; no host sync (CUDA-graph capturable).

    chunk: score columns per program of the sum and histogram rounds (H100, F = 36,864: 1,024 42 us a layer, 256
    50 us; benchmarks/probe_topk.py); compact_chunk: keys per program of the compaction.
    """
    _check_topk(scores, k)
    M, num = scores.shape
    for name, value in (("chunk", chunk), ("compact_chunk", compact_chunk)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    out = torch.empty(k, device=scores.device, dtype=torch.int64)
    if k == 0:
        return out
    keys = torch.empty(num, device=scores.device, dtype=torch.int32)
    hist = torch.zeros(sum(UNION_RADIX_BINS), device=scores.device, dtype=torch.int32)
    programs = _cdiv(num, chunk)
    _kernel(_union_sum_kernel, scores.device)[(programs,)](
        scores, keys, hist, M, num, scores.stride(0), scores.stride(1),
        BLOCK_M=max(min(triton.next_power_of_2(max(M, 1)), 16), 2), CHUNK=chunk, num_warps=num_warps,
    )  # fmt: skip
    for round_ in (2, 3):
        _kernel(_union_refine_kernel, scores.device)[(programs,)](
            keys, hist, num, k, ROUND=round_, CHUNK=chunk, num_warps=num_warps
        )
    _kernel(_union_compact_kernel, scores.device)[(_cdiv(num, compact_chunk),)](
        keys, hist, out, num, k, CHUNK=compact_chunk, SCAN=4096, num_warps=num_warps
    )
    return out


# --------------------------------------------------------------------------------------------------
# The registered ops: CUDA -> Triton kernels, anything else -> the reference
# --------------------------------------------------------------------------------------------------


@_register("polar::selective_up")
def _selective_up_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, activation: int
) -> torch.Tensor:
    if not _on_kernel(x.device):
        return selective_up_reference(x, weight, bias, index, activation)
    _check_up(x, weight, bias, index, activation, on_kernel=True)
    return _launch_up(x, weight, None, bias, index, activation, None)


@_register("polar::selective_gated_up")
def _selective_gated_up_op(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    if not _on_kernel(x.device):
        return selective_gated_up_reference(x, gate_weight, up_weight, index)
    _check_gated_up(x, gate_weight, up_weight, index, on_kernel=True)
    return _launch_up(x, gate_weight, up_weight, None, index, ACTIVATIONS["silu"], None)


@_register("polar::selective_down")
def _selective_down_op(
    y: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if not _on_kernel(y.device):
        return selective_down_reference(y, weight, index, bias)
    return launch_selective_down(y, weight, index, bias)


@_register("polar::batch_union_topk")
def _batch_union_topk_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    # CUDA, F <= UNION_SELECT_MAX_F: the ReLU-sum in torch (inductor fuses it), then one Triton program selects the k
    # neurons. H100, M = 64, 32 layers in one CUDA graph, per layer with the sum: 28-30 us against torch.topk's
    # 75-148 us and the many-program radix select's 33-39 us (its five launches cost more than one program's serial
    # counts at this size). Larger F (OPT-66B's 36,864): the radix select with 1,024 columns a program, 42 us, against
    # a full sort's 60 us (topk(sorted=False): 57 us, but 56-98 us at other F). benchmarks/probe_topk.py,
    # results/probe_topk_h100_s28.log.
    if not _on_kernel(scores.device):
        return batch_union_topk_reference(scores, k)
    _check_topk(scores, k)
    if scores.shape[1] > UNION_SELECT_MAX_F:
        return launch_union_radix_select(scores, k)
    return launch_union_select(_relu_sum(scores), k)


# --------------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------------


def _activation_code(activation: str | int) -> int:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        return ACTIVATIONS[activation]
    return activation


def selective_up(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | int = "identity",
) -> torch.Tensor:
    """act(x @ weight[index].T + bias[index]).

    x (M, d); weight (F, d) (nn.Linear layout); index (k,) int32/int64 in [0, F); bias (F,) or None;
    activation: "identity", "relu", "gelu" (exact erf) or "silu", or its ACTIVATIONS code. Returns (M, k),
    column j for neuron index[j].
    """
    return torch.ops.polar.selective_up(x, weight, bias, index, _activation_code(activation))


def selective_gated_up(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """silu(x @ gate_weight[index].T) * (x @ up_weight[index].T): x (M, d), weights (F, d), index (k,) -> (M, k).

    A fused gate/up weight W (2F, d) is passed as the views W[:F], W[F:] (no copy).
    """
    return torch.ops.polar.selective_gated_up(x, gate_weight, up_weight, index)


def selective_down(
    y: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, *, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y @ weight[:, index].T + bias: y (M, k), weight (d, F), index (k,), bias (d,) or None -> (M, d).

    Each occurrence of a neuron in index contributes once. Fast when weight is neuron-major
    (:func:`prepare_down_weight`); correct but uncoalesced (slow) for the row-major nn.Linear layout.
    """
    return torch.ops.polar.selective_down(y, weight, index, bias)


def batch_union_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The batch's shared neuron index: the k neurons of highest relu(scores).sum(0), scores (M, F) -> (k,) int64.

    The set is that of ``topk(k)``; the order is not part of the contract (the selective ops take any order).
    CPU: highest first (torch.topk). CUDA: ascending neuron order, ties at the k-th value broken towards the lowest
    index (F <= UNION_SELECT_MAX_F: one Triton program; larger F: the many-program radix select).
    """
    return torch.ops.polar.batch_union_topk(scores, k)


def prepare_down_weight(linear: torch.nn.Module) -> None:
    """Make ``linear.weight`` (d, F) neuron-major: same logical shape and values, strides (1, d).

    Memory: the weight is copied once into a (F, d)-contiguous buffer that becomes the module's new Parameter;
    the old buffer is freed as soon as nothing else refers to it (no second copy is kept; the peak during the
    call is two copies of this one weight). F.linear (dense prefill) reads the new layout unchanged. Idempotent.
    A new Parameter object, not a ``.data`` swap: graphs compiled earlier for the old layout (torch 2.11 keeps
    per-parameter fake tensors) must see a different input, not the same one with new strides.
    """
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"prepare_down_weight needs a module with a 2-D weight (nn.Linear), got {type(linear)}")
    d, num_neurons = weight.shape
    if weight.stride() == (1, d):
        return
    with torch.no_grad():  # empty_strided, not t().contiguous().t(): that keeps the strides of size-1 dims
        neuron_major = torch.empty_strided((d, num_neurons), (1, d), dtype=weight.dtype, device=weight.device)
        linear.weight = torch.nn.Parameter(neuron_major.copy_(weight), requires_grad=weight.requires_grad)
