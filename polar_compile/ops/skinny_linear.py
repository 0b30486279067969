"""polar::skinny_linear: a decode step's narrow linear layers (few rows, N <= K) on a kernel of our own.

    out = x @ weight.T + bias          x (..., K), weight (N, K) in nn.Linear layout, bias (N,) or None

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

Contract: the result equals ``F.linear`` up to summation order (fp32 accumulation, one rounding to the output
dtype). No host sync: CUDA-graph capturable. CPU (and any device without triton): ``F.linear`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polar_compile.ops._library import check_same_dtype_and_device, dot_acc, tl, triton
from polar_compile.ops._library import jit as _jit
from polar_compile.ops._library import register_op as _register

__all__ = ["MAX_ROWS", "MIN_COLUMNS", "MIN_ROWS", "LaunchConfig", "launch_skinny_linear", "skinny_linear", "takes"]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MIN_ROWS = 9  # M: below this (one 16-row block, as at M = 16) cuBLAS was never timed against the kernel
MAX_ROWS = 16  # M: above this the decode step was as fast or faster on cuBLAS (H200: M = 32 end to end)
MIN_COLUMNS = 2048  # N: fewer columns make too few programs to fill the GPU
_KERNEL_MAX_ROWS = 64  # BLOCK_M = 128 with the table's blocks would need more shared memory than an SM has


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int


# Best of a sweep (BLOCK_N 16-64, BLOCK_K 128-512, 3-6 stages, 4-8 warps) at the o and down projections of
# Llama-3-8B, Llama-2-7B and Qwen2-7B on the H200 (results/probe_skinny_gemm_h200_s21.log).
_CONFIGS = {16: LaunchConfig(32, 512, 4, 4), 32: LaunchConfig(32, 256, 4, 4)}
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


def _check(x, weight, bias) -> None:
    """Shapes, dtypes and devices (metadata only: runs before any launch, and under tracing)."""
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (N, K), got shape {tuple(weight.shape)}")
    columns, width = weight.shape
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"x must be (..., K={width}) to match weight (N={columns}, K={width}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (columns,):
        raise ValueError(f"bias must be (N={columns},), got shape {tuple(bias.shape)}")
    check_same_dtype_and_device({"x": x, "weight": weight, "bias": bias})


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@_jit(do_not_specialize=("rows",))
def _rows_kernel(
    x_ptr,  # (M, K), unit stride along K
    w_ptr,  # (N, K), unit stride along K
    b_ptr,  # (N,) when HAS_BIAS
    out_ptr,  # (M, N), contiguous
    rows,
    columns,
    width,
    stride_xm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
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
    for k0 in range(0, width, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < width
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        acc = dot_acc(x, tl.trans(w), acc, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
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


def _launch(x, weight, bias, config: LaunchConfig | None = None):
    columns, width = weight.shape
    rows2d = x.reshape(-1, width)
    if rows2d.shape[0] > _KERNEL_MAX_ROWS:
        raise ValueError(f"the skinny kernel takes at most {_KERNEL_MAX_ROWS} rows, got {rows2d.shape[0]}")
    if rows2d.stride(-1) != 1:
        rows2d = rows2d.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel reads it with unit stride
    rows = rows2d.shape[0]
    if rows == 0 or columns == 0 or width == 0:
        return F.linear(x, weight, bias)
    out = torch.empty((rows, columns), device=x.device, dtype=x.dtype)
    cpu = x.device.type == "cpu"
    block_m = max(16, triton.next_power_of_2(rows))
    if config is None:
        config = _INTERPRETER_CONFIG if cpu else _CONFIGS.get(block_m, _CONFIGS[32])
    wrap = (lambda kernel: kernel) if cpu else torch.library.wrap_triton
    wrap(_rows_kernel)[(triton.cdiv(columns, config.block_n),)](
        rows2d, weight, weight if bias is None else bias, out, rows, columns, width, rows2d.stride(0),
        weight.stride(0), HAS_BIAS=int(bias is not None), DOT_FP32=int(cpu or x.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_stages=config.num_stages, num_warps=config.num_warps,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], columns)


# --------------------------------------------------------------------------------------------------
# The registered op: CUDA -> the Triton kernel where it is faster, anything else -> F.linear
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
