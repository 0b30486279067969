"""polar_compile/ops/_library.py: the helpers every op file shares."""

from __future__ import annotations

import pytest

from polar_compile.ops import _library, route_groups, selective_attention, selective_gemm


@pytest.mark.skipif(_library.triton is None, reason="needs triton")
@pytest.mark.parametrize(
    "module", [route_groups, selective_attention, selective_gemm], ids=lambda m: m.__name__.rsplit(".", 1)[-1]
)
def test_kernel_helpers_are_bound_under_their_own_names(module):
    # Inductor re-emits every Triton function a kernel calls under the function's __name__: a helper bound
    # under another name (``import dot_acc as _dot``) runs under TRITON_INTERPRET but is a NameError when
    # inductor compiles the graph on a GPU (seen on the H100). This is the CPU-side guard for that.
    helpers = {name: value for name, value in vars(module).items() if _is_triton_function(value)}
    assert helpers, "no Triton functions found: the check would be vacuous"
    renamed = _renamed(helpers)
    assert not renamed, f"Triton functions bound under another name (name -> __name__): {renamed}"


def _renamed(namespace: dict) -> dict:
    """The Triton functions of ``namespace`` bound under a name other than their own: name -> __name__."""
    return {name: value.fn.__name__ for name, value in namespace.items() if value.fn.__name__ != name}


def _is_triton_function(value) -> bool:
    # triton.jit's JITFunction, or the InterpretedFunction it becomes under TRITON_INTERPRET=1
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(value, (JITFunction, InterpretedFunction))


@pytest.mark.skipif(_library.triton is None, reason="needs triton")
def test_the_check_sees_the_shared_helper_and_an_alias_of_it():
    assert _is_triton_function(_library.dot_acc)
    assert _renamed({"_dot": _library.dot_acc}) == {"_dot": "dot_acc"}  # what commit 796c5fb did
    assert _renamed({"dot_acc": _library.dot_acc}) == {}


# One launch variant of every Triton kernel of the ops (bf16 data, the constants of a typical launch). Pointers not
# named in _POINTERS are bf16; scalars are i32.
_POINTERS = {
    "group_ptr": "*i64",
    "index_ptr": "*i64",
    "owner_ptr": "*i32",
    "mask_ptr": "*i1",
    "span_ptr": "*i32",
    "acc_ptr": "*fp32",
    "max_ptr": "*fp32",
    "sum_ptr": "*fp32",
    "workspace_ptr": "*fp32",
    "partial_ptr": "*fp32",
    "summed_ptr": "*fp32",
    "keys_ptr": "*i32",
    "hist_ptr": "*i32",
    "qk_scale": "fp32",
}
_KERNEL_VARIANTS = {
    "selective_attention": {
        # a list: each variant compiled (here: a split launch and a one-launch grid)
        "_split_kernel": [dict(HAS_MASK=1, HAS_SPAN=1, DIRECT=0, DOT_FP32=0, EVEN_D=1, BLOCK_R=16, BLOCK_N=128,
                               BLOCK_D=128, BLOCK_K=16, SCAN_BLOCK=4096),
                          dict(HAS_MASK=1, HAS_SPAN=1, DIRECT=1, DOT_FP32=0, EVEN_D=1, BLOCK_R=16, BLOCK_N=128,
                               BLOCK_D=128, BLOCK_K=16, SCAN_BLOCK=4096)],
        "_merge_kernel": [dict(ALL_GROUPS=0, BLOCK_K=16, BLOCK_S=32, BLOCK_D=128),
                          dict(ALL_GROUPS=1, BLOCK_K=16, BLOCK_S=32, BLOCK_D=128)],
    },
    "selective_gemm": {
        "_selective_up_kernel": dict(ACTIVATION=3, GATED=1, HAS_BIAS=0, USE_WORKSPACE=1, EVEN_D=1, MASK_ROWS=0,
                                     DOT_FP32=0, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128),
        "_selective_down_kernel": dict(HAS_BIAS=1, USE_WORKSPACE=1, DOT_FP32=0, WHOLE_BLOCKS=1, BLOCK_M=64,
                                       BLOCK_N=128, BLOCK_K=128),
        "_selective_down_stream_kernel": dict(HAS_BIAS=1, DOT_FP32=0, WHOLE_BLOCKS=1, BLOCK_M=64, BLOCK_N=128,
                                              BLOCK_K=128),
        "_finish_stream_kernel": dict(HAS_BIAS=1, BLOCK_M=64, BLOCK_N=128, ROWS=8),
        "_finish_split_kernel": dict(ACTIVATION=1, GATED=0, BIAS_MODE=1, BLOCK=1024),
        "_gather_rows_kernel": dict(ACTIVATION=3, GATED=1, HAS_BIAS=0, IDENTITY=0, BLOCK_J=64, BLOCK_M=16),
        "_claim_rows_kernel": dict(BLOCK=1024),
        "_scatter_rows_kernel": dict(REPEATS=1, BLOCK_J=64, BLOCK_M=16),
        "_union_select_kernel": dict(BLOCK=16384),
        "_union_sum_kernel": dict(BLOCK_M=16, CHUNK=128),
        "_union_refine_kernel": dict(ROUND=3, CHUNK=128),
        "_union_compact_kernel": dict(CHUNK=1024, SCAN=4096),
    },
    "route_groups": {
        "_route_rows_kernel": dict(HAS_BIAS=1, BLOCK_G=32, BLOCK_D=128),
        "_route_partial_kernel": dict(DOT_FP32=0, BLOCK_M=16, BLOCK_G=32, BLOCK_D=128, SLICE=512),
        "_route_rank_kernel": dict(HAS_BIAS=1, BLOCK_G=32),
    },
}  # fmt: skip

_REEMIT_AND_COMPILE = """
import importlib, importlib.util, inspect, json, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as reemit

variants, pointers = json.loads(sys.argv[1]), json.loads(sys.argv[2])
folder = Path(tempfile.mkdtemp())
for module_name, kernels in variants.items():
    module = importlib.import_module(f"polar_compile.ops.{module_name}")
    for name, constant_sets in kernels.items():
        path = folder / f"{module_name}{name}.py"
        path.write_text("import triton\\nimport triton.language as tl\\n" + reemit(getattr(module, name)))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        emitted = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(emitted)
        kernel = triton.jit(getattr(emitted, name))  # inductor adds the top-level decorator itself
        default = lambda arg: "*bf16" if arg.endswith("_ptr") else "i32"
        for constants in constant_sets if isinstance(constant_sets, list) else [constant_sets]:
            signature = {arg: "constexpr" if arg in constants else pointers.get(arg, default(arg))
                         for arg in inspect.signature(kernel.fn).parameters}
            source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
            options = dict(num_warps=4, num_stages=3)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"], name
            print(f"{module_name}.{name}")
"""


@pytest.mark.skipif(_library.triton is None, reason="needs triton")
def test_kernels_compile_for_hopper_from_the_source_inductor_re_emits():
    """Under torch.compile inductor re-emits each kernel's source with the Triton helpers it calls into the compiled
    graph's module, and there the real compiler builds it: a helper it cannot re-emit, or code the interpreter takes
    but the compiler rejects, breaks every compiled decode step on the GPU only. Re-emit every kernel here and compile
    it for sm_90 with triton's own ptxas, on the CPU (in a process without TRITON_INTERPRET: re-emitting needs real
    JITFunctions), so CI catches that."""
    import json
    import os
    import subprocess
    import sys

    wrapper = pytest.importorskip("torch._inductor.codegen.wrapper")
    if not hasattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code"):
        pytest.skip("this torch re-emits user kernels differently")
    kernels = {module: sorted(names) for module, names in _KERNEL_VARIANTS.items()}
    for module in (route_groups, selective_attention, selective_gemm):
        launched = {
            name for name, value in vars(module).items() if name.endswith("_kernel") and _is_triton_function(value)
        }
        listed = set(kernels[module.__name__.rsplit(".", 1)[-1]])
        assert launched == listed, f"{module.__name__}: kernels without a variant here: {sorted(launched - listed)}"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _REEMIT_AND_COMPILE, json.dumps(_KERNEL_VARIANTS), json.dumps(_POINTERS)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [
        f"{module}.{name}"
        for module, names in _KERNEL_VARIANTS.items()
        for name, variants in names.items()
        for _ in (variants if isinstance(variants, list) else [variants])
    ]
    assert result.stdout.split() == compiled


_Y_TILE_COPIES = """
import dataclasses, json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd() / "benchmarks"))
import inspect_kernels
from polar_compile.ops import selective_gemm as sg

# The down launch of the OPT-66B MLP at M = 64, density 0.1, recorded from the real launcher (so specialised as it is
# launched) and compiled for sm_90: the y tile (64 x 128) and the weight tile (128 x 128) of its main loop.
d, num_neurons, k, M = 9216, 36864, 3686, 64
y = sg.empty_hidden(M, k, device=torch.device("cpu"), dtype=torch.bfloat16).zero_()
weight = torch.empty(num_neurons, d, dtype=torch.bfloat16).t()
index = torch.arange(k)
config = sg.LaunchConfig(64, 128, 128, 8, 2, programs_per_sm=2, pipeline_y=bool(int(sys.argv[1])))
launches = inspect_kernels.record(lambda: sg.launch_selective_down(y, weight, index, None, config=config))
loop = inspect_kernels.inspect_launch(launches[0])["loops"][0]
print(json.dumps(loop))
"""


def _inspect_for_hopper(script: str, *args: str) -> list:
    """Run ``script`` (which prints one JSON value a line) from the repository root in a process without
    TRITON_INTERPRET (benchmarks/inspect_kernels.py compiles real JIT functions); the values it printed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


@pytest.mark.skipif(_library.triton is None, reason="needs triton")
def test_pipeline_y_loads_the_down_kernels_y_tile_by_async_copies():
    """The claim behind LaunchConfig.pipeline_y, checked where it is made: compiled for sm_90 as the launcher
    specialises it (benchmarks/inspect_kernels.py), the masked down kernel loads its (64, 128) y tile synchronously in
    every step (only the weight tiles are async copies), and the whole-blocks kernel loads both through the software
    pipeline."""
    loops = {pipeline_y: _inspect_for_hopper(_Y_TILE_COPIES, str(pipeline_y))[-1] for pipeline_y in (0, 1)}
    tiles = lambda names: {name.split(" x")[0] for name in names}  # noqa: E731 ("64x128 bf16 x2": drop the depth)
    assert tiles(loops[0]["sync_tiles"]) == {"64x128 bf16"} and "128x128 bf16" in tiles(loops[0]["async_tiles"]), loops
    assert not loops[1]["sync_tiles"] and {"64x128 bf16", "128x128 bf16"} <= tiles(loops[1]["async_tiles"]), loops


_DENSE_ACCESSES = """
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path.cwd() / "benchmarks"))
import inspect_kernels

for label, call in inspect_kernels.dense_cases():
    for launch in inspect_kernels.record(call):
        info = inspect_kernels.inspect_launch(launch)
        print(json.dumps([label, info["kernel"], info["constants"], info["global_accesses"]]))
"""


@pytest.mark.skipif(_library.triton is None, reason="needs triton")
def test_dense_path_passes_move_16_bytes_an_access_over_whole_blocks():
    """LaunchConfig.dense's gather and scatter passes at OPT-66B, M = 256, compiled for sm_90 as launched: their
    accesses of the (F, M) transposed products and of the (M, k) activations are 16-byte vector ones (masked by M and
    k element by element, each was a 2-byte one). The partial last block's branch stays 2-byte."""
    passes = [row for row in _inspect_for_hopper(_DENSE_ACCESSES) if row[1] != "_claim_rows_kernel"]
    kernels = [kernel for _, kernel, _, _ in passes]  # up: gather; down: scatter, its repeats pass, the output copy
    assert kernels == ["_gather_rows_kernel", "_scatter_rows_kernel", "_scatter_rows_kernel", "_gather_rows_kernel"]
    for label, kernel, constants, accesses in passes:
        # the repeats pass adds with atomics (red.global... from triton 3.9, atom.global... from 3.6)
        store = "global.gpu.relaxed.add.v4.f32" if constants.get("REPEATS") else "st.global.v4.b32"
        assert "ld.global.v4.b32" in accesses and store in accesses, (label, kernel, accesses)
