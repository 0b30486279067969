"""polar::route_groups: a layer's attention router and its per-sequence top-k in one kernel.

The attention router of a sparse layer is one linear map from the layer's hidden state to a score per KV
group; the sequence keeps its k best-scoring groups (Polar Sparsity, arXiv 2505.14884: the attention router):

    scores[n] = hidden[n] @ weight.T + bias                  (N, G), computed in fp32
    out[n]    = the k groups of highest score, best first    (N, k) int64

Ties go to the lower group index; a NaN score ranks as +inf (as torch.topk ranks NaN first). The output is
``polar::selective_attention``'s ``group_index``.

Tensors
- hidden (..., d): every leading position is one row (a decode step's (B, 1, d) gives B rows).
- weight (G, d) in nn.Linear layout; bias (G,) or None; one float dtype for all three.
- k: a Python int, 1 <= k <= G.

Why kernels: in a decode step the router is a tiny GEMM (B x d x G) followed by torch.topk, which is two more
kernels (a radix select, then a sort of the k results): three launches a layer for a few KB of output.
- Small routers (G x d x 2 bytes <= ROW_KERNEL_MAX_BYTES, e.g. Llama-3's 8 x 4096): ``_route_rows_kernel``, one
  program per row, streams the row's hidden state against the whole router weight (from L2 after the first
  rows), sums in fp32, then ranks the G scores against each other in registers (G x G comparisons) and writes
  each selected group at its rank: one launch.
- Larger routers (MHA models: 32 to 72 heads): re-reading the weight for every row would cost more than the
  GEMM, so ``_route_partial_kernel`` computes fp32 partial scores for blocks of 16 rows and slices of d on the
  tensor cores (each weight slice read once per 16 rows), and ``_route_rank_kernel`` sums the slices in a fixed
  order (deterministic), adds the bias and ranks as above: two launches.
No host sync: the op is CUDA-graph capturable. CPU (and any device without triton), and routers of more than
MAX_GROUPS groups: the reference below, in plain PyTorch (no host sync either).
"""

from __future__ import annotations  # kernel annotations (tl.constexpr) stay unevaluated without triton

import torch

from polar_compile.ops._library import check_same_dtype_and_device, dot_acc, tl, triton
from polar_compile.ops._library import jit as _jit
from polar_compile.ops._library import register_op as _register

__all__ = ["launch_route_groups", "route_groups", "route_groups_reference"]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_REFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# The kernels rank a row's G scores against each other in registers (G x G): built and measured up to a block of
# 128 groups (OPT-66B's 72). The op computes more groups with the torch reference, on the same device.
MAX_GROUPS = 128
ROW_KERNEL_MAX_BYTES = 64 * 1024  # router weights up to this size take the one-launch row kernel
_BLOCK_ROWS = 16  # rows a partial-score program takes (tl.dot's minimum)
_SLICE = 512  # hidden features a partial-score program takes


def _check(hidden, weight, bias, k, *, kernel: bool) -> None:
    """Shapes, dtypes, devices and k (metadata only: runs before any launch, and under tracing)."""
    for name, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (G, d), got shape {tuple(weight.shape)}")
    groups, width = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        raise ValueError(f"hidden must be (..., d={width}) to match weight (G={groups}, d={width}), got "
                         f"{tuple(hidden.shape)}")  # fmt: skip
    if width == 0:
        raise ValueError("weight has d = 0 (no hidden features)")
    if bias is not None and tuple(bias.shape) != (groups,):
        raise ValueError(f"bias must be (G={groups},), got shape {tuple(bias.shape)}")
    if not 1 <= k <= groups:
        raise ValueError(f"k must lie in [1, G={groups}], got {k}")
    allowed = _KERNEL_DTYPES if kernel else _REFERENCE_DTYPES
    if hidden.dtype not in allowed:
        where = "the Triton kernel takes" if kernel else "route_groups takes"
        raise TypeError(f"{where} {', '.join(map(str, allowed))}; hidden is {hidden.dtype}")
    check_same_dtype_and_device({"hidden": hidden, "weight": weight, "bias": bias})
    if kernel and groups > MAX_GROUPS:
        raise ValueError(f"the Triton kernel takes at most {MAX_GROUPS} groups, got G={groups}")


# --------------------------------------------------------------------------------------------------
# Reference in plain PyTorch (the CPU implementation of the op, and the tests' ground truth)
# --------------------------------------------------------------------------------------------------


def route_groups_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int):
    """The k best groups of every row, best first, ties to the lower index; fp32 scores (fp64 stays fp64)."""
    _check(hidden, weight, bias, k, kernel=False)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = hidden.reshape(-1, weight.shape[1]).to(compute)
    scores = rows @ weight.to(compute).T
    if bias is not None:
        scores = scores + bias.to(compute)
    scores = torch.nan_to_num(scores, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    # A stable descending sort keeps equal scores in index order: the lower index ranks first.
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k].contiguous()


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@_jit()
def _store_ranked(score, offs_g, mask_g, out_row_ptr, k):
    # NaN ranks as +inf; padding ranks last (it loses index ties to real groups). rank[i] = #{j : score[j] >
    # score[i], or score[j] == score[i] and j < i}: a permutation of 0..BLOCK_G-1, so the k stores never collide.
    score = tl.where(score != score, float("inf"), score)
    score = tl.where(mask_g, score, float("-inf"))
    mine = score[:, None]
    other = score[None, :]
    beaten = (other > mine) | ((other == mine) & (offs_g[None, :] < offs_g[:, None]))
    rank = tl.sum(beaten.to(tl.int32), axis=1)
    tl.store(out_row_ptr + rank, offs_g.to(tl.int64), mask=mask_g & (rank < k))


@_jit(do_not_specialize=("rows", "k"))
def _route_rows_kernel(
    x_ptr,  # (N, d), unit stride along d
    w_ptr,  # (G, d), unit stride along d
    b_ptr,  # (G,) when HAS_BIAS
    out_ptr,  # (N, k) int64, contiguous
    rows,
    width,  # d
    groups,  # G
    k,
    stride_xn,
    stride_wg,
    HAS_BIAS: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= G
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < groups
    partial = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for d0 in range(0, width, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < width
        x = tl.load(x_ptr + row * stride_xn + cols, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_g[:, None] * stride_wg + cols[None, :], mask=mask_g[:, None] & mask_d[None, :],
                    other=0.0)  # fmt: skip
        partial += w.to(tl.float32) * x[None, :]
    score = tl.sum(partial, axis=1)
    if HAS_BIAS:
        score += tl.load(b_ptr + offs_g, mask=mask_g, other=0.0).to(tl.float32)
    _store_ranked(score, offs_g, mask_g, out_ptr + row * k, k)


@_jit(do_not_specialize=("rows",))
def _route_partial_kernel(
    x_ptr,  # (N, d), unit stride along d
    w_ptr,  # (G, d), unit stride along d
    partial_ptr,  # (slices, N, BLOCK_G) fp32
    rows,
    width,
    groups,
    stride_xn,
    stride_wg,
    DOT_FP32: tl.constexpr,  # see dot_acc
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= max(G, 16)
    BLOCK_D: tl.constexpr,
    SLICE: tl.constexpr,  # a multiple of BLOCK_D
):
    block = tl.program_id(0)
    piece = tl.program_id(1)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < rows
    mask_g = offs_g < groups
    acc = tl.zeros([BLOCK_M, BLOCK_G], tl.float32)
    for d0 in range(0, SLICE, BLOCK_D):
        cols = piece * SLICE + d0 + offs_d
        mask_d = cols < width
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xn + cols[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + offs_g[:, None] * stride_wg + cols[None, :], mask=mask_g[:, None] & mask_d[None, :],
                    other=0.0)  # fmt: skip
        acc = dot_acc(x, tl.trans(w), acc, DOT_FP32)
    out = partial_ptr + (piece * rows + offs_m[:, None]).to(tl.int64) * BLOCK_G + offs_g[None, :]
    tl.store(out, acc, mask=mask_m[:, None])


@_jit(do_not_specialize=("rows", "k", "slices"))
def _route_rank_kernel(
    partial_ptr,  # (slices, N, BLOCK_G) fp32
    b_ptr,  # (G,) when HAS_BIAS
    out_ptr,  # (N, k) int64, contiguous
    rows,
    groups,
    k,
    slices,
    HAS_BIAS: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < groups
    score = tl.zeros([BLOCK_G], tl.float32)
    for piece in range(0, slices):  # a fixed order: the same sums on every run
        score += tl.load(partial_ptr + (piece * rows + row) * BLOCK_G + offs_g)
    if HAS_BIAS:
        score += tl.load(b_ptr + offs_g, mask=mask_g, other=0.0).to(tl.float32)
    _store_ranked(score, offs_g, mask_g, out_ptr + row * k, k)


def launch_route_groups(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *, row_kernel: bool | None = None
) -> torch.Tensor:
    """Run the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1). Shapes as in the module docstring.
    row_kernel: force the one-launch row kernel (True) or the two-launch partial-score path (False); None picks
    by the router weight's size (ROW_KERNEL_MAX_BYTES)."""
    if triton is None:
        raise RuntimeError("launch_route_groups needs triton")
    _check(hidden, weight, bias, k, kernel=True)
    return _launch(hidden, weight, bias, k, row_kernel=row_kernel)


def _launch(hidden, weight, bias, k, *, row_kernel: bool | None = None):
    groups, width = weight.shape
    x = hidden.reshape(-1, width)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernels read it with unit stride
    rows = x.shape[0]
    device = hidden.device
    out = torch.empty((rows, k), device=device, dtype=torch.int64)
    if rows == 0:
        return out
    bias_arg = weight if bias is None else bias  # an unused stand-in when HAS_BIAS=0
    has_bias = int(bias is not None)
    if row_kernel is None:
        row_kernel = groups * width * weight.element_size() <= ROW_KERNEL_MAX_BYTES
    wrap = (lambda kernel: kernel) if device.type == "cpu" else torch.library.wrap_triton
    if row_kernel:
        block_g = max(triton.next_power_of_2(groups), 2)
        block_d = max(min(triton.next_power_of_2(width), max(8192 // block_g, 16)), 16)  # ~8K fp32 partials
        wrap(_route_rows_kernel)[(rows,)](
            x, weight, bias_arg, out, rows, width, groups, k, x.stride(0), weight.stride(0),
            HAS_BIAS=has_bias, BLOCK_G=block_g, BLOCK_D=block_d,
            num_warps=8 if block_g >= 64 else 4,  # the G x G ranking too: 16K compares a program at G = 128
        )  # fmt: skip
        return out
    block_g = max(triton.next_power_of_2(groups), 16)
    block_d = 64 if block_g >= 128 else 128
    slices = triton.cdiv(width, _SLICE)
    partial = torch.empty((slices, rows, block_g), device=device, dtype=torch.float32)
    wrap(_route_partial_kernel)[(triton.cdiv(rows, _BLOCK_ROWS), slices)](
        x, weight, partial, rows, width, groups, x.stride(0), weight.stride(0),
        DOT_FP32=int(device.type == "cpu" or x.dtype == torch.float32),
        BLOCK_M=_BLOCK_ROWS, BLOCK_G=block_g, BLOCK_D=block_d, SLICE=_SLICE, num_warps=4,
    )  # fmt: skip
    wrap(_route_rank_kernel)[(rows,)](
        partial, bias_arg, out, rows, groups, k, slices,
        HAS_BIAS=has_bias, BLOCK_G=block_g, num_warps=8 if block_g >= 64 else 4,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# The registered op: CUDA -> Triton kernels, anything else -> the reference
# --------------------------------------------------------------------------------------------------


@_register("polar::route_groups")
def _route_groups_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    if hidden.device.type != "cuda" or triton is None or weight.shape[0] > MAX_GROUPS:
        return route_groups_reference(hidden, weight, bias, k)
    _check(hidden, weight, bias, k, kernel=True)
    return _launch(hidden, weight, bias, k)


def route_groups(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """``torch.ops.polar.route_groups``: the k best-scoring KV groups of every row of ``hidden`` (N, k) int64."""
    _check(hidden, weight, bias, k, kernel=False)
    return torch.ops.polar.route_groups(hidden, weight, bias, k)
