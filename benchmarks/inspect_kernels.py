"""Compile the kernels an op launches at a model shape for an H100 (sm_90), on the CPU: are the loads pipelined?

    env -u TRITON_INTERPRET python benchmarks/inspect_kernels.py [--only gemm|attention|skinny|dense]

No GPU needed: each launcher runs on CPU tensors of the real shape, bf16, with its launches recorded instead of run
(the table's configs, an H100's 132 SMs for the split rules), and every recorded launch is compiled by triton for
sm_90 with the specialisation a real launch gets (ints equal to 1 become constants, ints and pointers that are
multiples of 16 carry that divisibility, except the kernel's do_not_specialize arguments). Per launch: grid, shared
memory and the programs per SM it allows (228 KB per SM, 1 KB reserved per program), the registers a thread uses and
the programs per SM they allow (`ptxas -v` with the ptxas triton ships; 64K registers per SM), and for each innermost
loop with a dot (the main loop; " | " then a masked tail loop) the tiles loaded by async copies (pipelined; "x3":
three buffers deep) and the ones loaded synchronously into shared memory for a dot; for a kernel with no dot (the
passes: split finish, the dense path's gather and scatter), its global memory instructions by width ("v4.b32": 16
bytes a thread, "b16": 2), where a mask that varies element by element shows as 2-byte accesses.
Session 28 found this way that the down kernels load their y tile synchronously in every step (LaunchConfig.pipeline_y).
Session 43 found this way that a launch over every group (group_index None) compiled to 96 registers where an index
launch takes 114: five programs a SM, not the table's four (the split kernel's all_groups is now a runtime value).
Run it from a shell without TRITON_INTERPRET (compiling needs real JIT functions).
"""

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("inspect_kernels.py compiles real JIT functions: run it without TRITON_INTERPRET=1")

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_compile.ops import selective_attention as sa
from polar_compile.ops import selective_gemm as sg
from polar_compile.ops import skinny_linear as sk

H100_SMS = 132
SMEM_PER_SM = 228 * 1024
REGS_PER_SM = 65536
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
           torch.int32: "i32", torch.bool: "i1"}  # fmt: skip


@dataclasses.dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))


def record(call) -> list[Launch]:
    """The launches `call()` makes, none of them run (outputs stay uninitialised)."""
    launches: list[Launch] = []
    saved = {}
    for module in (sg, sa):
        saved[module] = (module._kernel, module._sm_count_on)
        module._kernel = lambda kernel, device: _Recorder(kernel, launches)
        module._sm_count_on = lambda device: H100_SMS
    rows_kernel = sk._rows_kernel  # launched by name, unwrapped on the CPU
    sk._rows_kernel = _Recorder(rows_kernel, launches)
    try:
        call()
    finally:
        for module, (kernel, sm_count_on) in saved.items():
            module._kernel, module._sm_count_on = kernel, sm_count_on
        sk._rows_kernel = rows_kernel
    return launches


def _signature_and_attrs(launch: Launch):
    fn = launch.kernel
    names = fn.arg_names
    constexprs = {n: v for n, v in launch.kwargs.items() if n not in ("num_warps", "num_stages")}
    if "DOT_FP32" in constexprs:  # the CPU launchers ask for fp32 dots (the interpreter's bf16 dot is wrong)
        constexprs["DOT_FP32"] = 0
    skip = {fn.arg_names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or [])}
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(names, launch.args, strict=False)):
        if name in constexprs:
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):  # bool too
            value = int(value)
            if name not in skip and value == 1:
                constexprs[name] = 1
                continue
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if name not in skip and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    for name in constexprs:
        signature[name] = "constexpr"
    return {n: signature[n] for n in names}, constexprs, attrs


def inspect_launch(launch: Launch) -> dict:
    signature, constexprs, attrs = _signature_and_attrs(launch)
    source = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ir = compiled.asm["ttgir"]
    shared = compiled.metadata.shared
    # the pipeliner's buffers: local_alloc : () -> memdesc<N x tile>, N deep (the deepest of a tile shape)
    depth = {}
    for n, shape, dtype in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x([\dx]+)x(\w+),", ir):
        depth[f"{shape} {dtype}"] = max(depth.get(f"{shape} {dtype}", 0), int(n))
    loops = []
    for loop in _dot_loops(ir):
        async_tiles = sorted(set(re.findall(r"async_copy_global_to_local .*?: (tensor<[^>]*>)", loop)))
        loaded = dict(re.findall(r"(%[\w.]+) = tt\.load .*?: (tensor<[^>]*>)", loop))
        sync_tiles = sorted({loaded[v] for v in re.findall(r"ttg\.local_alloc (%[\w.]+)", loop) if v in loaded})
        loops.append(
            dict(
                async_tiles=[f"{_short(t)} x{depth.get(_short(t), '?')}" for t in async_tiles],
                sync_tiles=[_short(t) for t in sync_tiles],
            )
        )
    accesses = collections.Counter(re.findall(r"\b(?:ld|st|red|atom)\.global\.[\w.]+", compiled.asm["ptx"]))
    registers = ptxas_registers(compiled.asm["ptx"])
    warps = options.get("num_warps", 4)
    return dict(
        kernel=launch.kernel.__name__,
        grid=launch.grid,
        global_accesses=", ".join(f"{op} x{n}" for op, n in sorted(accesses.items())),
        warps=options.get("num_warps"),
        stages=options.get("num_stages"),
        shared_kb=round(shared / 1024, 1),
        per_sm=SMEM_PER_SM // (shared + 1024),
        registers=registers,
        # registers are allocated 8 a thread at a time; None where ptxas is not at hand
        per_sm_by_registers=None if registers is None else REGS_PER_SM // (-(-registers // 8) * 8 * 32 * warps),
        loops=loops,
        constants={k: v for k, v in constexprs.items() if k.isupper()},
    )


def ptxas_registers(ptx: str) -> int | None:
    """Registers a thread of the kernel uses, from `ptxas -v` for sm_90a: the ptxas triton ships (it reads the PTX
    version this triton writes). None if there is none."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return None
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        run = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(source), "-o", str(Path(folder) / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    match = re.search(r"Used (\d+) registers", run.stdout + run.stderr)
    return int(match[1]) if match else None


def _dot_loops(ir: str) -> list[str]:
    """The bodies of the innermost scf.for loops that hold a dot (a kernel's main loop, and a short masked one for a
    tail where it has one), in program order; the whole IR when no loop holds a dot."""
    loops = []
    for match in re.finditer(r"scf\.for", ir):
        depth, i = 0, ir.index("{\n", match.start())  # the brace that ends the header line (types hold some too)
        for j in range(i, len(ir)):
            depth += {"{": 1, "}": -1}.get(ir[j], 0)
            if depth == 0:
                loops.append(ir[match.start() : j])
                break
    with_dot = [body for body in loops if "tt.dot" in body or "warp_group_dot" in body]
    innermost = [body for body in with_dot if not any(other in body for other in with_dot if other is not body)]
    return innermost or [ir]


def _short(tensor_type: str) -> str:
    match = re.match(r"tensor<([\dx]+)x!tt\.ptr<(\w+)>", tensor_type)
    return f"{match[1]} {match[2]}" if match else tensor_type


def gemm_cases(pipeline_y: bool):
    dev = torch.device("cpu")
    for name, d, num_neurons, density in (("opt-66b", 9216, 36864, 0.1), ("opt-66b", 9216, 36864, 0.3),
                                          ("llama-3-8b", 4096, 14336, 0.1)):  # fmt: skip
        k = round(density * num_neurons)
        index = torch.randperm(num_neurons)[:k]
        gated = name.startswith("llama")
        weight = torch.empty(num_neurons, d, dtype=torch.bfloat16)
        down = torch.empty(num_neurons, d, dtype=torch.bfloat16).t()  # neuron-major, as prepare_down_weight lays it
        for M in (16, 64):
            x = torch.zeros(M, d, dtype=torch.bfloat16)
            y = sg.empty_hidden(M, k, device=dev, dtype=torch.bfloat16).zero_()
            label = f"{name} density {density} M={M}"
            if gated:
                yield f"{label} gated up", lambda x=x, w=weight, i=index: sg.launch_selective_gated_up(x, w, w, i)
            else:
                yield f"{label} up", lambda x=x, w=weight, i=index: sg.launch_selective_up(x, w, None, i, 1)
            config = sg.config_for("down", M, d, k, num_neurons)
            if pipeline_y and not config.dense:
                config = dataclasses.replace(config, pipeline_y=True)
            yield (
                f"{label} down{' pipeline_y' if config.pipeline_y else ''}",
                lambda y=y, w=down, i=index, c=config: sg.launch_selective_down(y, w, i, None, config=c),
            )


def skinny_cases():
    """The decode step's dense linears at M = 16 (polar::skinny_linear's rows), Llama-3-8B's widths."""
    for name, columns, width in (("q/k/v", 6144, 4096), ("o", 4096, 4096), ("gate/up", 28672, 4096),
                                 ("down", 4096, 14336)):  # fmt: skip
        x = torch.zeros(16, width, dtype=torch.bfloat16)
        weight = torch.empty(columns, width, dtype=torch.bfloat16)
        config = sk._CONFIGS[16]
        yield f"llama-3-8b {name} M=16 skinny_linear", lambda x=x, w=weight, c=config: sk._launch(x, w, None, c)


def dense_cases():
    """LaunchConfig.dense (cuBLAS over the whole weight, then the gather / scatter passes), OPT-66B at density 1.0,
    M = 256. On the CPU the scatter buffer of a bf16 y is fp32 (the interpreter has no bf16 atomics); bf16 on CUDA."""
    d, num_neurons, M = 9216, 36864, 256
    index = torch.randperm(num_neurons)
    weight = torch.empty(num_neurons, d, dtype=torch.bfloat16)
    x = torch.zeros(M, d, dtype=torch.bfloat16)
    y = sg.empty_hidden(M, num_neurons, device=torch.device("cpu"), dtype=torch.bfloat16).zero_()
    dense = sg.LaunchConfig(dense=True)
    yield "opt-66b density 1.0 M=256 up, dense", lambda: sg.launch_selective_up(x, weight, None, index, 1, config=dense)
    yield (
        "opt-66b density 1.0 M=256 down, dense",
        lambda: sg.launch_selective_down(y, weight.t(), index, None, config=dense),
    )


def attention_cases():
    """Index launches (int64, as the routers give them), and over every group (group_index None: a density-1.0 layer)
    at Llama-3 B=128 L=16384 and Llama-2 B=32 L=4096."""
    for name, heads, groups, batch, length, k in (
        ("llama3-8b", 32, 8, 1, 1024, 8), ("llama3-8b", 32, 8, 16, 4096, 8), ("llama3-8b", 32, 8, 16, 4096, 2),
        ("llama3-8b", 32, 8, 64, 4096, 4), ("llama2-7b", 32, 32, 32, 4096, 16), ("llama3-8b", 32, 8, 128, 16384, 8),
        ("llama3-8b", 32, 8, 128, 16384, None), ("llama2-7b", 32, 32, 32, 4096, None),
    ):  # fmt: skip
        cache = length + 256
        q = torch.zeros(batch, heads, 1, 128, dtype=torch.bfloat16)
        kv = torch.zeros(batch, groups, cache, 128, dtype=torch.bfloat16)
        group_index = None if k is None else torch.arange(k).repeat(batch, 1)
        mask = torch.zeros(batch, 1, 1, cache, dtype=torch.bool)
        mask[..., :length] = True
        span = sa.key_span(mask)
        config = sa.config_for(
            heads // groups, 128, torch.device("cuda"), torch.bfloat16, pairs=batch * (k or groups), cache_len=cache
        )
        yield (
            f"{name} B={batch} L={length} k={k or 'every group (None)'}",
            lambda q=q, kv=kv, g=group_index, m=mask, s=span, c=config: sa._launch(q, kv, kv, g, m, 0.088, s, c),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("gemm", "attention", "skinny", "dense"))
    args = parser.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}; compiled for sm_90, {H100_SMS} SMs")
    cases = []
    if args.only in (None, "gemm"):
        cases += list(gemm_cases(pipeline_y=False)) + [c for c in gemm_cases(pipeline_y=True) if "pipeline_y" in c[0]]
    if args.only in (None, "skinny"):
        cases += list(skinny_cases())
    if args.only in (None, "dense"):
        cases += list(dense_cases())
    if args.only in (None, "attention"):
        sa._sm_count_on = lambda device: H100_SMS  # config_for(device="cuda") sizes its wide rule by the SM count
        cases += list(attention_cases())
    for label, call in cases:
        print(label)
        for launch in record(call):
            info = inspect_launch(launch)
            loops = " | ".join(
                f"async {loop['async_tiles'] or '-'}, synchronous {loop['sync_tiles'] or '-'}" for loop in info["loops"]
            )
            print(
                f"  {info['kernel']} grid {info['grid']} warps {info['warps']} stages {info['stages']}: "
                f"{info['shared_kb']} KB shared ({info['per_sm']} per SM), {info['registers']} registers "
                f"({info['per_sm_by_registers']} per SM); {loops}",
                flush=True,
            )
            if info["loops"] == [dict(async_tiles=[], sync_tiles=[])]:  # no dot: what its accesses are
                print(f"    global: {info['global_accesses']}")


if __name__ == "__main__":
    main()
