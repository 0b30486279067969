"""What every op file shares: the guarded triton import, op registration and the kernels' common helpers."""

from __future__ import annotations

import torch

try:  # the CPU build of torch comes without triton: the ops then run their references everywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised in a subprocess test
    triton = None
    tl = None


def register_op(name: str):
    """Decorator: ``triton_op`` (inductor sees the kernels) when triton is importable, else a plain custom op
    with the same body (which then always takes its reference branch)."""

    def decorator(fn):
        if triton is not None:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)  # the body is traceable: on fake tensors it runs the reference's shape logic
        return op

    return decorator


def jit(**options):
    """triton.jit(**options), or the bare function when triton is missing (the kernels are then never called)."""
    if triton is None:
        return lambda fn: fn
    return triton.jit(**options)


@jit()
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
    # Kernels import this under its own name: inductor re-emits a helper kernel by its __name__, so an
    # alias (``import dot_acc as _d``) compiles under TRITON_INTERPRET but fails in inductor on the GPU.
    # DOT_FP32: fp32 inputs (ieee, not tf32), and bf16 under TRITON_INTERPRET, whose tl.dot multiplies the raw
    # bf16 bit patterns (triton-lang/triton#11584); on the GPU bf16/fp16 go straight to the tensor cores.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)
