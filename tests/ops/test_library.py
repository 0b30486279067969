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
    renamed = {name: value.fn.__name__ for name, value in helpers.items() if value.fn.__name__ != name}
    assert not renamed, f"Triton functions bound under another name (name -> __name__): {renamed}"


def _is_triton_function(value) -> bool:
    # triton.jit's JITFunction, or the InterpretedFunction it becomes under TRITON_INTERPRET=1
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(value, (JITFunction, InterpretedFunction))


@pytest.mark.skipif(_library.triton is None, reason="needs triton")
def test_the_check_sees_the_shared_helper_and_an_alias_of_it():
    assert _is_triton_function(_library.dot_acc) and _library.dot_acc.fn.__name__ == "dot_acc"
    aliased = {"_dot": _library.dot_acc}  # what commit 796c5fb did
    assert [name for name, f in aliased.items() if f.fn.__name__ != name] == ["_dot"]
