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


def check_same_dtype_and_device(tensors: dict) -> None:
    """Every tensor of ``{name: tensor or None}`` has the first one's dtype and device; the error names both."""
    present = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    first_name, first = next(iter(present.items()))
    for name, tensor in present.items():
        if tensor.dtype != first.dtype:
            raise TypeError(f"dtype mismatch: {first_name} is {first.dtype} but {name} is {tensor.dtype}")
        if tensor.device != first.device:
            raise ValueError(f"device mismatch: {first_name} is on {first.device} but {name} is on {tensor.device}")


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


def resident_programs(kernel, device: torch.device) -> list[dict]:
    """Every compiled variant of a Triton kernel on this CUDA device, with how many of its programs one SM holds
    at once (the least of what shared memory, registers and threads allow) and the numbers behind it. The split
    rules take this occupancy from their tables; the GPU tests check the tables against it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    found = []
    for key, cache in getattr(kernel, "device_caches", {}).items():
        if key not in (index, device, str(device)):
            continue
        compiled_kernels = cache[0] if isinstance(cache, tuple) else cache
        for compiled in compiled_kernels.values():
            compiled._init_handles()
            shared = compiled.metadata.shared
            warps = compiled.metadata.num_warps
            regs = compiled.n_regs
            by_smem = smem_per_sm // (shared + 1024)  # the driver reserves 1 KB of shared memory per block
            by_regs = regs_per_sm // (((regs * 32 + 255) // 256) * 256 * warps) if regs else 32
            found.append(
                dict(
                    occupancy=int(min(by_smem, by_regs, threads_per_sm // (32 * warps), 32)),
                    shared=shared,
                    regs=regs,
                    spills=getattr(compiled, "n_spills", None),
                    warps=warps,
                    stages=getattr(compiled.metadata, "num_stages", None),
                    constants=_named_constants(compiled),
                )
            )
    return found


def _named_constants(compiled) -> dict:
    """The compiled variant's int constexprs by parameter name (triton keys them by name or by arg position)."""
    source = getattr(compiled, "src", None)
    names = getattr(getattr(source, "fn", None), "arg_names", None) or []
    named = {}
    for key, value in getattr(source, "constants", {}).items():
        if isinstance(key, tuple) and len(key) == 1:
            key = key[0]
        if isinstance(key, int) and key < len(names):
            key = names[key]
        if isinstance(key, str) and isinstance(value, int):
            named[key] = value
    return named
