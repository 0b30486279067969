"""How the polar ops register themselves with torch.library (shared by every op file)."""

from __future__ import annotations

import torch


def register_op(name: str, *, have_triton: bool):
    """Decorator: ``triton_op`` (inductor sees the kernels) when triton is importable, else a plain custom op
    with the same body (which then always takes its reference branch)."""

    def decorator(fn):
        if have_triton:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)  # the body is traceable: on fake tensors it runs the reference's shape logic
        return op

    return decorator
