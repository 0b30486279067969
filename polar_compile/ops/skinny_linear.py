"""polar::skinny_linear and polar::skinny_gated_linear: a decode step's narrow linears (few rows, N <= K), and a
dense gated MLP's first half, on a kernel of our own.

    skinny_linear:        out = x @ weight.T + bias          x (..., K), weight (N, K) in nn.Linear layout, bias (N,)
    skinny_gated_linear:  out = silu(x @ Wg.T) * (x @ Wu.T)   Wg, Wu (F, K): Llama / Mistral / Qwen2 gate and up

At decode batch sizes a linear is a read of its weight. For the narrow ones of a layer (the attention output
projection, N = K, and the MLP down projection, N < K) cuBLAS splits K and adds a reduce launch; at M = 16-32 it
reads them at 2.2-3.6 TB/s on an H200 (copy rate 4.29). ``_rows_kernel`` gives each program BLOCK_N output columns
and the whole of K in one pipelined loop of tensor-core dots (no split, no reduce): 32 columns give N / 32 programs
(128 for N = 4096), each streaming its 32 weight rows, which reads those weights 1.07-1.26x faster than cuBLAS
(benchmarks/probe_skinny_gemm.py, results/probe_skinny_gemm_h200_s21.log: o projection 4096 x 4096 at M = 16
13.4 -> 11.0 us, down 4096 x 14336 32.7 -> 30.5 us). Where N > K (q/k/v, gate/up) the two were even or cuBLAS won.
End to end the win held at M = 16 only (H200, lean decode step, same machine with and without: Llama-3-8B 16 x 4096
-3.8%); at M = 32 the whole step was 0.4-0.7% slower for the 4096-wide Llama-3, Mistral and Llama-2 and 0.8-1.2%
faster for Qwen2-7B (benchmarks/results/decode_skinny_ab_s22.csv), and M < 9 was never timed against cuBLAS's
GEMV-class kernels. So the ``skinny_linears`` pass takes only linears inside :func:`takes` (9 <= M <= 16). Measured
on the H200 only; the backend option ``"polar.skinny_linears": False`` leaves every linear to cuBLAS.

The gated op runs the same kernel with both weights' rows of a block of neurons in one program (two accumulators)
and writes ``silu(g) * u``: the decode step then has no (M, 2F) product and no SiLU-mul kernel (one launch a layer
instead of two). At M = 16 it ran 1.03-1.10x as fast as cuBLAS over the packed [Wg; Wu] + inductor's SiLU-mul
(H100; Llama-3-8B 85.8 -> 82.9 us, Qwen2-7B 103.4 -> 94.1; results/probe_skinny_gated_h100_s39.log), and the lean
decode step (polar 1.0, same H100, without and with the ``fuse_gate_up`` pass) went 6.92 -> 6.78 ms at Llama-3-8B
16 x 1,024 and 7.18 -> 6.92 ms at Qwen2-7B 16 x 4,096 (results/decode_gate_up_ab_h100_s39.log). Its rule,
:func:`takes_gated`, takes 9 <= M <= MAX_GATED_ROWS (64) and F >= MIN_COLUMNS: the kernel's two weights a program
keep it ahead of cuBLAS + SiLU-mul at M = 32 and 64 too (H100, the table's config: Llama-3-8B 86.8 -> 83.4 us and
90.6 -> 85.0 us, Qwen2-7B at M = 32 103.8 -> 100.1 us; results/probe_skinny_gated_m64_h100_s40.log), and the lean
step (polar 1.0, one H100, the default rule against the rule widened to M = 64) went 9.27 -> 9.08 ms at Llama-3-8B
64 x 1,024 (9.09 ms in a rerun) and 8.36 -> 8.26 ms at Qwen2-7B 32 x 4,096 (results/decode_gated_rows_ab_h100_s40.log).

Contract: the result equals ``F.linear`` (gated: ``silu(F.linear(x, Wg)) * F.linear(x, Wu)``) up to summation order
(fp32 accumulation and SiLU, one rounding to the output dtype). No host sync: CUDA-graph capturable. CPU (and any
device without triton): the PyTorch expression itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polar_compile.ops._library import check_same_dtype_and_device, dot_acc, tl, triton
from polar_compile.ops._library import jit as _jit
from polar_compile.ops._library import register_op as _register

__all__ = [
    "MAX_GATED_ROWS",
    "MAX_ROWS",
    "MIN_COLUMNS",
    "MIN_ROWS",
    "LaunchConfig",
    "launch_skinny_gated_linear",
    "launch_skinny_linear",
    "skinny_gated_linear",
    "skinny_linear",
    "takes",
    "takes_gated",
]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MIN_ROWS = 9  # M: below this (one 16-row block, as at M = 16) cuBLAS was never timed against the kernel
MAX_ROWS = 16  # M: above this the decode step was as fast or faster on cuBLAS (H200: M = 32 end to end)
MAX_GATED_ROWS = 64  # M: the gated kernel beat cuBLAS + SiLU-mul at M = 16, 32 and 64 (H100; not timed between)
MIN_COLUMNS = 2048  # N: fewer columns make too few programs to fill the GPU
_KERNEL_MAX_ROWS = 64  # a 128-row block (smaller K steps to fit shared memory) lost to cuBLAS at M = 128 on an H100:
# gated Qwen2-7B 0.95x at best (benchmarks/results/skinny_m128_h100_s48.log)


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int


# Best of a sweep (BLOCK_N 16-64, BLOCK_K 128-512, 3-6 stages, 4-8 warps) at the o and down projections of
# Llama-3-8B, Llama-2-7B and Qwen2-7B on the H200 (results/probe_skinny_gemm_h200_s21.log).
_CONFIGS = {16: LaunchConfig(32, 512, 4, 4), 32: LaunchConfig(32, 256, 4, 4)}
# The gated kernel (two weights a program): best of a sweep (BLOCK_N 16-64, BLOCK_K 64-256, 3-5 stages, 4-8 warps)
# at the gate/up of Llama-3-8B, Llama-2-7B and Qwen2-7B on the H100 (results/probe_skinny_gated_h100_s39.log). At
# M = 16 this config is within 1% of each shape's best, 1.03-1.10x cuBLAS over the packed weight + the SiLU-mul.
# At M = 32 and 64 (results/probe_skinny_gated_m64_h100_s40.log) the 64 x 128 tile is within 0.4% of the best at
# Llama-3-8B and 1.1% at Qwen2-7B M = 32; at Qwen2-7B M = 64 it was not among the three fastest (the best, 16 x 128 at
# 3 stages, 1.09x), and its own time there was not printed.
_GATED_CONFIGS = {16: LaunchConfig(32, 256, 4, 4), 32: LaunchConfig(64, 128, 4, 4), 64: LaunchConfig(64, 128, 4, 4)}
_INTERPRETER_CONFIG = LaunchConfig(16, 32, 1, 1)  # small blocks: tiny test shapes still loop over K


def takes(rows: int, weight_shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a linear of ``rows`` rows and this weight runs faster on the kernel than through cuBLAS: CUDA,
    bf16/fp16, MIN_ROWS <= M <= MAX_ROWS, MIN_COLUMNS <= N <= K (the measured wins; see the module docstring)."""
    columns, width = (int(size) for size in weight_shape)
    return (
        device.type == "cuda"
        and triton is not None
        and dtype in _KERNEL_DTYPES
        and MIN_ROWS <= int(rows) <= MAX_ROWS
        and MIN_COLUMNS <= columns <= width
    )


def takes_gated(rows: int, weight_shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a gated MLP's ``silu(x @ Wg.T) * (x @ Wu.T)`` (each weight (F, K)) of ``rows`` rows runs on the
    kernel: CUDA, bf16/fp16, MIN_ROWS <= M <= MAX_GATED_ROWS, F >= MIN_COLUMNS."""
    columns = int(weight_shape[0])
    return (
        device.type == "cuda"
        and triton is not None
        and dtype in _KERNEL_DTYPES
        and MIN_ROWS <= int(rows) <= MAX_GATED_ROWS
        and columns >= MIN_COLUMNS
    )


def _check_gated(x, gate_weight, up_weight) -> None:
    _check(x, gate_weight, None, weight_name="gate_weight")
    if not isinstance(up_weight, torch.Tensor):
        raise TypeError(f"up_weight must be a Tensor, got {type(up_weight).__name__}")
    if tuple(up_weight.shape) != tuple(gate_weight.shape):
        raise ValueError(
            f"up_weight must have gate_weight's shape {tuple(gate_weight.shape)}, got {tuple(up_weight.shape)}"
        )
    check_same_dtype_and_device({"x": x, "gate_weight": gate_weight, "up_weight": up_weight})


def _check(x, weight, bias, weight_name: str = "weight") -> None:
    """Shapes, dtypes and devices (metadata only: runs before any launch, and under tracing). ``weight_name``: the
    weight's argument name in the op the messages are about."""
    for name, value in (("x", x), (weight_name, weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be (N, K), got shape {tuple(weight.shape)}")
    columns, width = weight.shape
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(
            f"x must be (..., K={width}) to match {weight_name} (N={columns}, K={width}), got {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (columns,):
        raise ValueError(f"bias must be (N={columns},), got shape {tuple(bias.shape)}")
    check_same_dtype_and_device({"x": x, weight_name: weight, "bias": bias})


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@_jit(do_not_specialize=("rows",))
def _rows_kernel(
    x_ptr,  # (M, K), unit stride along K
    w_ptr,  # (N, K), unit stride along K (GATED: the gate weight)
    u_ptr,  # GATED: the up weight (N, K), unit stride along K
    b_ptr,  # (N,) when HAS_BIAS
    out_ptr,  # (M, N), contiguous
    rows,
    columns,
    width,
    stride_xm,
    stride_wn,
    stride_un,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,  # out = silu(x @ w.T) * (x @ u.T)
    DOT_FP32: tl.constexpr,  # see dot_acc
    BLOCK_M: tl.constexpr,  # >= rows, >= 16
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < columns
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, width, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < width
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        acc = dot_acc(x, tl.trans(w), acc, DOT_FP32)
        if GATED:
            u = tl.load(u_ptr + offs_n[:, None].to(tl.int64) * stride_un + cols[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            acc_up = dot_acc(x, tl.trans(u), acc_up, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = out_ptr + offs_m[:, None] * columns + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def launch_skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config: LaunchConfig | None = None
) -> torch.Tensor:
    """Run the Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1) for any M up to 64 (tests take it past
    MAX_ROWS; the pass does not). Shapes as in the module docstring; the result is (..., N) in x's dtype.
    config: blocks, stages and warps instead of the table's (benchmarks/probe_skinny_gemm.py sweeps them)."""
    if triton is None:
        raise RuntimeError("launch_skinny_linear needs triton")
    _check(x, weight, bias)
    if x.device.type != "cpu" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the skinny kernel takes {', '.join(map(str, _KERNEL_DTYPES))} on the GPU; x is {x.dtype}")
    return _launch(x, weight, bias, config)


def launch_skinny_gated_linear(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, *, config: LaunchConfig | None = None
) -> torch.Tensor:
    """``silu(x @ gate_weight.T) * (x @ up_weight.T)`` on the Triton kernel (a gated MLP's first half in one
    launch: no (M, 2F) product, no separate SiLU-mul kernel). Rows, devices and config as launch_skinny_linear."""
    if triton is None:
        raise RuntimeError("launch_skinny_gated_linear needs triton")
    _check_gated(x, gate_weight, up_weight)
    if x.device.type != "cpu" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the skinny kernel takes {', '.join(map(str, _KERNEL_DTYPES))} on the GPU; x is {x.dtype}")
    return _launch(x, gate_weight, None, config, up_weight=up_weight)


def _launch(x, weight, bias, config: LaunchConfig | None = None, *, up_weight: torch.Tensor | None = None):
    columns, width = weight.shape
    rows2d = x.reshape(-1, width)
    if rows2d.shape[0] > _KERNEL_MAX_ROWS:
        raise ValueError(f"the skinny kernel takes at most {_KERNEL_MAX_ROWS} rows, got {rows2d.shape[0]}")
    if rows2d.stride(-1) != 1:
        rows2d = rows2d.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    gated = up_weight is not None
    if gated and up_weight.stride(-1) != 1:
        up_weight = up_weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel reads it with unit stride
    rows = rows2d.shape[0]
    if rows == 0 or columns == 0 or width == 0:
        return _reference(x, weight, bias, up_weight)
    out = torch.empty((rows, columns), device=x.device, dtype=x.dtype)
    cpu = x.device.type == "cpu"
    block_m = max(16, triton.next_power_of_2(rows))
    if config is None:
        table = _GATED_CONFIGS if gated else _CONFIGS
        config = _INTERPRETER_CONFIG if cpu else table.get(block_m, table[32])
    up = up_weight if gated else weight
    wrap = (lambda kernel: kernel) if cpu else torch.library.wrap_triton
    wrap(_rows_kernel)[(triton.cdiv(columns, config.block_n),)](
        rows2d, weight, up, weight if bias is None else bias, out, rows, columns, width, rows2d.stride(0),
        weight.stride(0), up.stride(0), HAS_BIAS=int(bias is not None), GATED=int(gated),
        DOT_FP32=int(cpu or x.dtype == torch.float32), BLOCK_M=block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_stages=config.num_stages, num_warps=config.num_warps,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], columns)


def _reference(x, weight, bias, up_weight):
    if up_weight is None:
        return F.linear(x, weight, bias)
    return F.silu(F.linear(x, weight)) * F.linear(x, up_weight)


# --------------------------------------------------------------------------------------------------
# The registered ops: CUDA -> the Triton kernel where it is faster, anything else -> the PyTorch expression
# --------------------------------------------------------------------------------------------------


@_register("polar::skinny_linear")
def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, weight, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if not takes(rows, weight.shape, x.dtype, x.device):
        return F.linear(x, weight, bias)
    return _launch(x, weight, bias)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.polar.skinny_linear``: ``F.linear(x, weight, bias)``, on the Triton kernel where it is faster."""
    _check(x, weight, bias)
    return torch.ops.polar.skinny_linear(x, weight, bias)


@_register("polar::skinny_gated_linear")
def _skinny_gated_linear_op(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    _check_gated(x, gate_weight, up_weight)
    rows = x.numel() // max(1, x.shape[-1])
    if not takes_gated(rows, gate_weight.shape, x.dtype, x.device):
        return _reference(x, gate_weight, None, up_weight)
    return _launch(x, gate_weight, None, up_weight=up_weight)


def skinny_gated_linear(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """``torch.ops.polar.skinny_gated_linear``: ``silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)``, on
    the Triton kernel where it is faster."""
    _check_gated(x, gate_weight, up_weight)
    return torch.ops.polar.skinny_gated_linear(x, gate_weight, up_weight)
