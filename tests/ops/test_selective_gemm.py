"""polar::selective_gemm: properties of the ops and of the real Triton kernels.

Every property runs against the registered op (CPU: the reference; CUDA: the kernels) and against the Triton
kernels called through their launchers (CUDA, or the CPU under TRITON_INTERPRET=1). Sizes follow the device:
tiny on the CPU (interpreter), realistic on a GPU (``HYPOTHESIS_PROFILE=gpu pytest tests/ops/test_selective_gemm.py``).
"""

import math
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from polar_compile.ops import selective_gemm as sg
from polar_compile.testing import assert_close_to_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ACTIVATION_CODES = sorted(sg.ACTIVATIONS.values())

# On a GPU every new dtype / flag / block shape is a fresh Triton compile (seconds): the hypothesis runs there
# use bf16, d divisible by 16 and one launch config; odd d, fp16 and the tuned table get their own tests.
if ON_GPU:
    MAX_M, D_CHOICES, MAX_F = 256, (2048, 4096), 16384
    FLOAT_DTYPES = (torch.bfloat16,)
else:
    MAX_M, D_CHOICES, MAX_F = 5, (1, 7, 16, 33, 64, 96), 160
    FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


@st.composite
def problems(draw, *, max_m: int = MAX_M):
    """(M, d, F, index, dtype): index drawn over densities 0..1, in sorted, shuffled or repeating order."""
    M = draw(st.integers(1, max_m))
    d = draw(st.sampled_from(D_CHOICES))
    num_neurons = draw(st.integers(1, MAX_F))
    density = draw(st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.5, 1.0]))
    k = max(round(density * num_neurons), 1 if density > 0 else 0)
    order = draw(st.sampled_from(["sorted", "shuffled", "duplicates"]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if order == "duplicates":
        index = torch.randint(0, num_neurons, (k,), generator=generator)
    else:
        index = torch.randperm(num_neurons, generator=generator)[:k]
        if order == "sorted":
            index = index.sort().values
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    torch.manual_seed(seed)
    return M, d, num_neurons, index.to(DEVICE, index_dtype), dtype


def kernel_configs(stream_k=None, spread=None, pipeline_y=None):
    """Launch configs for the kernel runs: tiny blocks and forced splits (or stream-K program counts) on the CPU,
    one small config on a GPU (the tuned table has its own test at model shapes). The up ops also get neurons
    spread over more programs than their tiles (spread: the CPU pretends to have 4 SMs, so 3.0 asks for 12).
    One draw in four is the dense path instead (cuBLAS over the whole weight + the gather / scatter pass)."""
    stream_k = st.just(False) if stream_k is None else stream_k
    spread = st.sampled_from([0.0, 0.5, 1.0, 3.0]) if spread is None else spread
    pipeline_y = st.just(False) if pipeline_y is None else pipeline_y
    if ON_GPU:
        gather = st.builds(
            sg.LaunchConfig, block_m=st.just(16), block_n=st.just(64), block_r=st.just(64), num_stages=st.just(3),
            stream_k=stream_k, spread=spread, pipeline_y=pipeline_y,
        )  # fmt: skip
    else:
        gather = st.builds(
            sg.LaunchConfig,
            block_m=st.just(16),
            block_n=st.sampled_from([16, 32]),
            block_r=st.sampled_from([16, 32, 64]),
            split=st.sampled_from([None, 1, 2, 3, 7]),
            stream_k=stream_k,
            spread=spread,
            pipeline_y=pipeline_y,
        )
    return st.tuples(st.integers(0, 3), gather).map(lambda t: sg.LaunchConfig(dense=True) if t[0] == 0 else t[1])


def down_configs():
    """Split-K and stream-K launches of the down kernel, each with its reduction masked at every step or run over
    whole blocks and a partial one (pipeline_y)."""
    return kernel_configs(stream_k=st.booleans(), spread=st.just(0.0), pipeline_y=st.booleans())


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def float64(*tensors):
    return [None if t is None else t.to(torch.float64) for t in tensors]


# The layouts x (up ops) and y (down op) come in: contiguous, the first columns of a wider buffer (a row stride past
# the width, as the rows of a fused activation buffer), or column-major. The kernels read them through their strides.
LAYOUTS = ("contiguous", "wide", "column-major")


def laid_out(tensor, layout):
    """``tensor`` (M, n) with the same values in ``layout``."""
    if layout == "wide":
        wide = randn(tensor.shape[0], tensor.shape[1] + 5, dtype=tensor.dtype)
        wide[:, : tensor.shape[1]] = tensor
        return wide[:, : tensor.shape[1]]
    if layout == "column-major":
        return tensor.t().contiguous().t()
    return tensor


# --------------------------------------------------------------------------------------------------
# The implementations under test: the registered op, and the kernels through their launchers
# --------------------------------------------------------------------------------------------------


def up_impl(impl, x, weight, bias, index, activation, config=None):
    if impl == "op":
        return torch.ops.polar.selective_up(x, weight, bias, index, activation)
    return sg.launch_selective_up(x, weight, bias, index, activation, config=config)


def gated_impl(impl, x, gate_weight, up_weight, index, config=None):
    if impl == "op":
        return torch.ops.polar.selective_gated_up(x, gate_weight, up_weight, index)
    return sg.launch_selective_gated_up(x, gate_weight, up_weight, index, config=config)


def down_impl(impl, y, weight, index, bias, config=None):
    if impl == "op":
        return torch.ops.polar.selective_down(y, weight, index, bias)
    return sg.launch_selective_down(y, weight, index, bias, config=config)


IMPLS = [
    pytest.param("op", id="op"),
    pytest.param("kernel", id="kernel", marks=pytest.mark.triton_kernel),
]


@pytest.fixture(scope="module")
def impl_device(request):
    """Skip the kernel runs where no Triton kernel can run (no triton, or no CUDA and no interpreter)."""
    from polar_compile.testing import kernel_device

    if request.param == "kernel" and kernel_device() is None:
        pytest.skip("no triton, or no CUDA and TRITON_INTERPRET != 1")
    return request.param


def parametrize_impl(fn):
    return pytest.mark.parametrize("impl_device", IMPLS, indirect=True)(fn)


def parametrize_impl_hypothesis(fn):
    # The kernels only. Off CUDA the registered op is the reference, whose expression the properties' baselines
    # share, so "op" could not fail there; on a GPU the registered ops (tuned table) are covered by
    # test_ops_at_model_shapes.
    return pytest.mark.parametrize("impl_device", IMPLS[1:], indirect=True)(fn)


# --------------------------------------------------------------------------------------------------
# Up projection
# --------------------------------------------------------------------------------------------------


@parametrize_impl_hypothesis
@given(
    problem=problems(),
    activation=st.sampled_from(ACTIVATION_CODES),
    has_bias=st.booleans(),
    config=kernel_configs(),
    layout=st.sampled_from(LAYOUTS),
)
def test_up_equals_dense_linear_on_gathered_weights(impl_device, problem, activation, has_bias, config, layout):
    M, d, num_neurons, index, dtype = problem
    x = laid_out(randn(M, d, dtype=dtype), layout)
    weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    bias = randn(num_neurons, dtype=dtype) if has_bias else None
    out = up_impl(impl_device, x, weight, bias, index, activation, config)

    def gathered(x, weight, bias):  # act(x @ W[idx].T + b[idx]) through a dense F.linear
        selected_bias = None if bias is None else bias[index]
        return sg._activate_reference(F.linear(x, weight[index], selected_bias), activation)

    assert out.shape == (M, index.shape[0]) and out.dtype == dtype
    assert_close_to_reference(out, gathered(*float64(x, weight, bias)), gathered(x, weight, bias))


@parametrize_impl_hypothesis
@given(problem=problems(), activation=st.sampled_from(ACTIVATION_CODES), config=kernel_configs())
def test_up_all_neurons_equals_dense_and_order_permutes_columns(impl_device, problem, activation, config):
    M, d, num_neurons, _, dtype = problem
    x = randn(M, d, dtype=dtype)
    weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    bias = randn(num_neurons, dtype=dtype)
    every = torch.arange(num_neurons, device=DEVICE)
    dense_exact = sg._activate_reference(F.linear(*float64(x, weight, bias)), activation)
    dense = sg._activate_reference(F.linear(x, weight, bias), activation)
    assert_close_to_reference(up_impl(impl_device, x, weight, bias, every, activation, config), dense_exact, dense)

    perm = torch.randperm(num_neurons, device=DEVICE)
    out = up_impl(impl_device, x, weight, bias, perm, activation, config)
    assert_close_to_reference(out, dense_exact[:, perm], dense[:, perm])


@parametrize_impl
@pytest.mark.parametrize("activation", ACTIVATION_CODES)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16] if ON_GPU else [torch.bfloat16, torch.float16])  # GPU: bf16 above
def test_up_batch_of_one_odd_sizes_every_activation(impl_device, activation, has_bias, dtype):
    # M = 1, d and k odd, F odd, a duplicate neuron: the corners every model hits in decode.
    M, d, num_neurons = 1, 33 if not ON_GPU else 1001, 37
    x = randn(M, d, dtype=dtype)
    weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    bias = randn(num_neurons, dtype=dtype) if has_bias else None
    index = torch.tensor([5, 0, 36, 5, 11], device=DEVICE)
    out = up_impl(impl_device, x, weight, bias, index, activation)
    exact = sg.selective_up_reference(*float64(x, weight, bias), index, activation)
    assert_close_to_reference(out, exact, sg.selective_up_reference(x, weight, bias, index, activation))
    torch.testing.assert_close(out[:, 0], out[:, 3], rtol=0, atol=0)  # duplicate -> repeated column


# --------------------------------------------------------------------------------------------------
# Gated up projection
# --------------------------------------------------------------------------------------------------


@parametrize_impl_hypothesis
@given(problem=problems(), fused=st.booleans(), config=kernel_configs(), layout=st.sampled_from(LAYOUTS))
def test_gated_up_matches_reference_and_accepts_fused_views(impl_device, problem, fused, config, layout):
    M, d, num_neurons, index, dtype = problem
    x = laid_out(randn(M, d, dtype=dtype), layout)
    if fused:  # one (2F, d) weight, passed as two views without a copy
        gate_up = randn(2 * num_neurons, d, dtype=dtype, scale=d**-0.5)
        gate_weight, up_weight = gate_up[:num_neurons], gate_up[num_neurons:]
        assert up_weight.data_ptr() == gate_up.data_ptr() + num_neurons * d * gate_up.element_size()
    else:
        gate_weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
        up_weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    out = gated_impl(impl_device, x, gate_weight, up_weight, index, config)

    def gathered(x, gate_weight, up_weight):
        return F.silu(F.linear(x, gate_weight[index])) * F.linear(x, up_weight[index])

    assert out.shape == (M, index.shape[0])
    assert_close_to_reference(out, gathered(*float64(x, gate_weight, up_weight)), gathered(x, gate_weight, up_weight))


@parametrize_impl_hypothesis
@given(problem=problems(), config=kernel_configs())
def test_gated_up_all_neurons_equals_dense_mlp_up(impl_device, problem, config):
    M, d, num_neurons, _, dtype = problem
    x = randn(M, d, dtype=dtype)
    gate_weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    up_weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    perm = torch.randperm(num_neurons, device=DEVICE)

    def dense(x, gate_weight, up_weight):
        return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)

    out = gated_impl(impl_device, x, gate_weight, up_weight, perm, config)
    exact = dense(*float64(x, gate_weight, up_weight))[:, perm]
    assert_close_to_reference(out, exact, dense(x, gate_weight, up_weight)[:, perm])


# --------------------------------------------------------------------------------------------------
# Down projection
# --------------------------------------------------------------------------------------------------


def down_weight(d, num_neurons, dtype, neuron_major):
    weight = randn(d, num_neurons, dtype=dtype, scale=max(num_neurons, 1) ** -0.5)
    if neuron_major:
        linear = torch.nn.Linear(num_neurons, d, bias=False, device=DEVICE, dtype=dtype)
        linear.weight.data = weight
        sg.prepare_down_weight(linear)
        weight = linear.weight.detach()
        assert weight.stride() == (1, d)
    return weight


@parametrize_impl_hypothesis
@given(
    problem=problems(),
    has_bias=st.booleans(),
    neuron_major=st.booleans(),
    config=down_configs(),
    layout=st.sampled_from(LAYOUTS),
)
def test_down_equals_dense_linear_on_gathered_columns(impl_device, problem, has_bias, neuron_major, config, layout):
    M, d, num_neurons, index, dtype = problem
    k = index.shape[0]
    y = laid_out(randn(M, k, dtype=dtype), layout)
    weight = down_weight(d, num_neurons, dtype, neuron_major)
    bias = randn(d, dtype=dtype) if has_bias else None
    out = down_impl(impl_device, y, weight, index, bias, config)

    def gathered(y, weight, bias):  # duplicates contribute once per occurrence
        return F.linear(y, weight[:, index], bias)

    assert out.shape == (M, d) and out.dtype == dtype
    assert_close_to_reference(out, gathered(*float64(y, weight, bias)), gathered(y, weight, bias))


@parametrize_impl_hypothesis
@given(problem=problems(), neuron_major=st.booleans(), config=down_configs())
def test_down_all_neurons_equals_dense_and_ignores_order(impl_device, problem, neuron_major, config):
    M, d, num_neurons, _, dtype = problem
    y = randn(M, num_neurons, dtype=dtype)
    weight = down_weight(d, num_neurons, dtype, neuron_major)
    bias = randn(d, dtype=dtype)
    exact = F.linear(*float64(y, weight, bias))
    dense = F.linear(y, weight, bias)
    every = torch.arange(num_neurons, device=DEVICE)
    assert_close_to_reference(down_impl(impl_device, y, weight, every, bias, config), exact, dense)
    perm = torch.randperm(num_neurons, device=DEVICE)  # permute index and y's columns together
    assert_close_to_reference(down_impl(impl_device, y[:, perm], weight, perm, bias, config), exact, dense)


@parametrize_impl
@pytest.mark.parametrize("launch", ["table", "stream_k", "dense", "split, pipeline_y", "stream_k, pipeline_y"])
def test_down_duplicates_count_once_per_occurrence_and_empty_index_gives_bias(impl_device, launch):
    if impl_device == "op" and launch != "table":
        pytest.skip("the op takes its config from the table")
    dtype = torch.float16
    d, num_neurons = 40, 12
    config = {
        "table": None,
        "stream_k": sg.LaunchConfig(block_m=16, block_n=16, block_r=16, stream_k=True),
        "dense": sg.LaunchConfig(dense=True),
        "split, pipeline_y": sg.LaunchConfig(block_m=16, block_n=16, block_r=16, split=2, pipeline_y=True),
        "stream_k, pipeline_y": sg.LaunchConfig(block_m=16, block_n=16, block_r=16, stream_k=True, pipeline_y=True),
    }[launch]
    weight = down_weight(d, num_neurons, dtype, neuron_major=True)
    bias = randn(d, dtype=dtype)
    for times in (2, 3):  # a neuron named twice, and more than twice (the dense path: more than one atomic add)
        y = torch.ones(2, times, dtype=dtype, device=DEVICE)
        repeated = down_impl(impl_device, y, weight, torch.full((times,), 3, device=DEVICE), None, config)
        exact = times * weight[:, 3].to(torch.float64)
        assert_close_to_reference(repeated, exact.expand(2, d), (times * weight[:, 3]).expand(2, d))
    empty = down_impl(impl_device, y[:, :0], weight, torch.empty(0, dtype=torch.int64, device=DEVICE), bias, config)
    torch.testing.assert_close(empty, bias.expand(2, d), rtol=0, atol=0)


@pytest.mark.triton_kernel
def test_up_output_rows_are_16_element_aligned_and_down_reads_them(kernel_device):
    # The up kernels return a view of a buffer whose row stride is k rounded up to 16 (16-byte loads in down).
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    M, d, num_neurons, k = 3, 32, 50, 37
    x = randn(M, d, dtype=dtype)
    up = randn(num_neurons, d, dtype=dtype)
    index = torch.randperm(num_neurons, device=DEVICE)[:k]
    hidden = sg.launch_selective_up(x, up, None, index, sg.ACTIVATIONS["relu"])
    assert hidden.shape == (M, k) and hidden.stride() == (48, 1)
    assert_close_to_reference(hidden, F.relu(F.linear(*float64(x, up[index]))), F.relu(F.linear(x, up[index])))
    down = down_weight(d, num_neurons, dtype, neuron_major=True)
    out = sg.launch_selective_down(hidden, down, index, None)
    assert_close_to_reference(out, F.linear(*float64(hidden, down[:, index])), F.linear(hidden, down[:, index]))


@pytest.mark.triton_kernel
def test_pipeline_y_down_gives_the_masked_kernels_bits(kernel_device):
    """pipeline_y runs the same blocks in the same order, the partial one last with the same masks, so its output
    must be bitwise the masked kernel's: for k below, at and past whole blocks, every split count of split-K and
    program counts of stream-K that cut tiles anywhere."""
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    M, d, num_neurons = 3, 40, 120
    weight = down_weight(d, num_neurons, dtype, neuron_major=True)
    bias = randn(d, dtype=dtype)
    for k in (1, 15, 16, 17, 47, 48, 49, 100):
        y = randn(M, k, dtype=dtype)
        index = torch.randperm(num_neurons, device=DEVICE)[:k]
        exact = F.linear(*float64(y, weight[:, index], bias))
        blocks = -(-k // 16)
        launches = [dict(split=s) for s in range(1, blocks + 1)]
        launches += [dict(split=p, stream_k=True) for p in (1, 2, 3, 5, 3 * blocks)]
        for launch in launches:
            masked = sg.LaunchConfig(16, 16, 16, **launch)
            out = sg.launch_selective_down(y, weight, index, bias, config=masked)
            whole = sg.launch_selective_down(
                y, weight, index, bias, config=masked.__class__(16, 16, 16, **launch, pipeline_y=True)
            )
            assert torch.equal(whole, out), (k, launch)
            assert_close_to_reference(whole, exact, F.linear(y, weight[:, index], bias))


@pytest.mark.triton_kernel
def test_stream_k_down_is_right_for_every_program_count(kernel_device):
    # Every way of cutting the iteration line into equal ranges: boundaries inside tiles, on tile edges, ranges
    # shorter and longer than a tile, one program per iteration. Each result must match the reference, and be
    # bitwise the same when launched again (fixed summation order).
    # Blocks (16, 16): 2 x 9 tiles of 6 iterations (16 neurons each), 108 in all. Blocks (32, 128): 1 x 2 tiles of
    # 6 iterations, every program count, and the finish pass splits each tile into 4 row chunks.
    M, d, num_neurons, k = 20, 140, 100, 90
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    y = randn(M, k, dtype=dtype)
    weight = down_weight(d, num_neurons, dtype, neuron_major=True)
    bias = randn(d, dtype=dtype)
    index = torch.randperm(num_neurons, device=DEVICE)[:k]
    exact = F.linear(*float64(y, weight[:, index], bias))
    rounded = F.linear(y, weight[:, index], bias)
    for block_m, block_n, total in ((16, 16, 2 * 9 * 6), (32, 128, 2 * 6)):
        for programs in range(1, total + 1) if total < 20 else (1, 2, 5, 6, 7, 13, 36, 53, 107, 108):
            for pipeline_y in (False, True):
                config = sg.LaunchConfig(block_m, block_n, 16, split=programs, stream_k=True, pipeline_y=pipeline_y)
                out = sg.launch_selective_down(y, weight, index, bias, config=config)
                assert_close_to_reference(out, exact, rounded)
                assert torch.equal(out, sg.launch_selective_down(y, weight, index, bias, config=config)), programs
    with pytest.raises(ValueError, match="stream_k applies to the down kernel only"):
        sg.launch_selective_up(randn(M, d, dtype=dtype), weight.t(), None, index, 0, config=config)
    with pytest.raises(ValueError, match="pipeline_y applies to the down kernel only"):
        sg.launch_selective_up(
            randn(M, d, dtype=dtype), weight.t(), None, index, 0, config=sg.LaunchConfig(pipeline_y=True)
        )
    with pytest.raises(ValueError, match="split and pipeline_y do not apply"):
        sg.LaunchConfig(dense=True, pipeline_y=True)


@pytest.mark.triton_kernel
def test_spread_up_covers_every_neuron_once_for_every_program_count(kernel_device):
    # Spreading k neurons over P programs of cdiv(k, P) rows each (the rest of the block masked): every P from
    # one row per program to whole blocks, with and without d splits, for both up ops. k = 45 with block_n 16
    # gives 3 tiles; spread asks for round(spread x SMs / m_tiles) programs (SMs = 4 under the interpreter, 132 on
    # an H100), capped at one neuron each.
    M, d, num_neurons, k = 20, 72, 60, 45
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    sms = sg._sm_count_on(torch.device(DEVICE))
    x = randn(M, d, dtype=dtype)
    gate, up = randn(num_neurons, d, dtype=dtype, scale=d**-0.5), randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    bias = randn(num_neurons, dtype=dtype)
    index = torch.randperm(num_neurons, device=DEVICE)[:k]
    exact_up = F.relu(F.linear(*float64(x, gate[index], bias[index])))
    exact_gated = F.silu(F.linear(*float64(x, gate[index]))) * F.linear(*float64(x, up[index]))
    seen = set()
    for programs in (1, 2, 3, 4, 5, 8, 15, 23, 44, 45, 60):
        spread = programs * 2 / sms  # M = 20 at block_m 16: 2 m tiles
        for split in (None, 2):
            config = sg.LaunchConfig(block_m=16, block_n=16, block_r=16, split=split, spread=spread)
            rows = sg._neurons_per_program(config, 2, k, torch.device(DEVICE))
            assert rows == min(-(-k // programs), 16)
            seen.add(rows)
            out = sg.launch_selective_up(x, gate, bias, index, 1, config=config)
            assert_close_to_reference(out, exact_up, F.relu(F.linear(x, gate[index], bias[index])))
            out = sg.launch_selective_gated_up(x, gate, up, index, config=config)
            rounded = F.silu(F.linear(x, gate[index])) * F.linear(x, up[index])
            assert_close_to_reference(out, exact_gated, rounded)
    assert seen >= {1, 2, 3, 9, 15, 16}
    with pytest.raises(ValueError, match="spread applies to the up kernels only"):
        sg.launch_selective_down(out, gate.t(), index, None, config=sg.LaunchConfig(spread=1.0))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="spread must be >= 0"):
            sg.LaunchConfig(spread=bad)


# --------------------------------------------------------------------------------------------------
# The whole selective MLP, and batch_union_topk
# --------------------------------------------------------------------------------------------------


@parametrize_impl
def test_mlp_with_all_neurons_equals_dense_mlp(impl_device):
    # OPT-style ReLU MLP with biases: batch_union_topk(k=F) selects every neuron, so sparse == dense.
    dtype = torch.bfloat16
    M, d, num_neurons = (3, 48, 96) if not ON_GPU else (64, 1024, 4096)
    fc1 = torch.nn.Linear(d, num_neurons, device=DEVICE, dtype=dtype)
    fc2 = torch.nn.Linear(num_neurons, d, device=DEVICE, dtype=dtype)
    x = randn(M, d, dtype=dtype)
    with torch.no_grad():
        dense = fc2(F.relu(fc1(x)))
        exact = F.linear(F.relu(F.linear(*float64(x, fc1.weight, fc1.bias))), *float64(fc2.weight, fc2.bias))
        sg.prepare_down_weight(fc2)
        index = sg.batch_union_topk(randn(M, num_neurons, dtype=dtype), num_neurons)
        hidden = up_impl(impl_device, x, fc1.weight, fc1.bias, index, sg.ACTIVATIONS["relu"])
        out = down_impl(impl_device, hidden, fc2.weight, index, fc2.bias)
    assert_close_to_reference(out, exact, dense)


@given(
    M=st.integers(1, 8),
    num_neurons=st.integers(1, 64),
    fraction=st.floats(0, 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_batch_union_topk_is_topk_of_relu_sum(M, num_neurons, fraction, dtype):
    k = round(fraction * num_neurons)
    scores = randn(M, num_neurons, dtype=dtype)
    index = sg.batch_union_topk(scores, k)
    assert index.shape == (k,) and index.dtype == torch.int64
    assert index.unique().numel() == k
    summed = scores.float().relu().sum(0)
    if 0 < k < num_neurons:  # every chosen neuron scores at least as high as every other one
        chosen = torch.zeros(num_neurons, dtype=torch.bool, device=DEVICE)
        chosen[index] = True
        assert summed[chosen].min() >= summed[~chosen].max()
    if k == num_neurons:
        assert torch.equal(index.sort().values, torch.arange(num_neurons, device=DEVICE))


def union_values(kind: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Scores (or sums) for the union-select kernels: ties, radix digits, signed zeros and NaNs as the kind asks."""
    if kind == "distinct":
        return torch.rand(shape, generator=generator) * 10
    if kind == "integers":  # fp32 sums of these are exact in any order
        return torch.randint(-50, 50, shape, generator=generator).float()
    if kind == "wide range":  # keys that differ in every radix digit
        return torch.randn(shape, generator=generator).mul(20).exp()
    if kind == "few levels":  # many ties at the threshold: the lowest indices among them are taken
        return torch.randint(0, 3, shape, generator=generator).float()
    if kind == "all zero":
        return torch.zeros(shape)
    if kind == "with -0.0":  # equal to +0.0 and must rank with it
        values = torch.randint(0, 2, shape, generator=generator).float()
        values[values == 0] = -0.0
        return values
    assert kind == "with NaN", kind  # a NaN sum ranks first, as torch.topk ranks it
    values = torch.randint(-3, 4, shape, generator=generator).float()
    if values.numel():
        values.view(-1)[torch.randint(0, values.numel(), (3,), generator=generator)] = float("nan")
    return values


@pytest.mark.triton_kernel
@given(
    num_neurons=st.integers(1, 16384 if ON_GPU else 300),
    fraction=st.floats(0, 1),
    values=st.sampled_from(["distinct", "wide range", "few levels", "all zero", "with -0.0"]),
    seed=st.integers(0, 2**16),
)
def test_union_select_kernel_picks_k_largest_in_ascending_order(num_neurons, fraction, values, seed):
    from polar_compile.testing import kernel_device

    device = kernel_device()
    if device is None:
        pytest.skip("no triton, or no CUDA and TRITON_INTERPRET != 1")
    k = round(fraction * num_neurons)
    summed = union_values(values, (num_neurons,), torch.Generator().manual_seed(seed))
    index = sg.launch_union_select(summed.to(device), k).cpu()
    assert index.shape == (k,) and index.dtype == torch.int64
    assert bool((index[1:] > index[:-1]).all()) and (k == 0 or 0 <= index[0] <= index[-1] < num_neurons)
    chosen = torch.zeros(num_neurons, dtype=torch.bool)
    chosen[index] = True
    if 0 < k < num_neurons:
        threshold = summed[chosen].min()
        assert threshold >= summed[~chosen].max()
        # ties at the threshold: the chosen ones are the lowest-index ones
        tied = (summed == threshold).nonzero().flatten()
        assert torch.equal(chosen[tied], torch.arange(tied.numel()) < int(chosen[tied].sum()))


@pytest.mark.triton_kernel
def test_union_select_kernel_ranks_negative_zero_with_zero(kernel_device):
    summed = torch.tensor([1.0, -0.0, 0.0, -0.0, 2.0, 1.0])
    index = sg.launch_union_select(summed.to(kernel_device), 5).cpu()
    assert index.tolist() == [0, 1, 2, 4, 5]  # the two ones, the two, then the lowest-index zeros


def test_union_select_rejects_what_it_cannot_take():
    summed = torch.rand(10)
    for call, match in [
        (lambda: sg.launch_union_select(summed.double(), 3), "1-D fp32"),
        (lambda: sg.launch_union_select(summed[None], 3), "1-D fp32"),
        (lambda: sg.launch_union_select(summed, 11), "k must lie in"),
        (lambda: sg.launch_union_select(torch.zeros(sg.UNION_SELECT_MAX_F + 1), 3), "F <="),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.triton_kernel
@given(
    M=st.integers(0, 6),
    num_neurons=st.integers(1, 16384 if ON_GPU else 3000),
    fraction=st.floats(0, 1),
    values=st.sampled_from(["integers", "wide range", "few levels", "all zero", "with -0.0", "with NaN"]),
    layout=st.sampled_from(["contiguous", "wide", "column-major"]),
    chunk=st.sampled_from([16, 64, 1024]),
    seed=st.integers(0, 2**16),
)
def test_union_radix_select_matches_the_one_program_select(M, num_neurons, fraction, values, layout, chunk, seed):
    """The many-program select sums the batch itself, so the same set needs the same sums: integer scores (their
    fp32 sums are exact in any order) or one row. Then it must give exactly the one-program kernel's indices, ties
    at the threshold included, whatever the chunking."""
    from polar_compile.testing import kernel_device

    device = kernel_device()
    if device is None:
        pytest.skip("no triton, or no CUDA and TRITON_INTERPRET != 1")
    k = round(fraction * num_neurons)
    rows = min(M, 1) if values in ("wide range", "with -0.0") else M  # one row: sums exact in any order
    scores = union_values(values, (rows, num_neurons), torch.Generator().manual_seed(seed))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # small integers are exact in bf16
    scores = laid_out(scores.to(device, dtype), layout)
    expected = sg.launch_union_select(sg._relu_sum(scores), k) if num_neurons <= sg.UNION_SELECT_MAX_F else None
    index = sg.launch_union_radix_select(scores, k, chunk=chunk)
    assert index.shape == (k,) and index.dtype == torch.int64
    if expected is not None:
        assert torch.equal(index.cpu(), expected.cpu())


@pytest.mark.triton_kernel
def test_union_radix_select_takes_any_number_of_neurons(kernel_device):
    """Past the one-program kernel's F (OPT-66B has 36,864 neurons): the k largest sums, ascending, ties (there
    are many: 5 levels) to the lowest indices."""
    num_neurons = sg.UNION_SELECT_MAX_F + 3619
    scores = torch.randint(-2, 3, (3, num_neurons), generator=torch.Generator().manual_seed(0)).float()
    summed = scores.relu().sum(0)
    k = 7000
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float32
    index = sg.launch_union_radix_select(scores.to(kernel_device, dtype), k).cpu()
    order = torch.sort(-summed, stable=True).indices  # descending, ties by index
    assert index.tolist() == sorted(order[:k].tolist())


@pytest.mark.triton_kernel
@pytest.mark.parametrize("values", ["distinct", "wide range", "few levels"])
def test_union_radix_select_every_k(kernel_device, values):
    """Every k of one small row, so that each round meets the k-th largest key at the top, inside and at the bottom
    of its bucket (the off-by-one cases of the bucket search)."""
    generator = torch.Generator().manual_seed(1)
    num_neurons = 48
    if values == "distinct":
        summed = torch.randperm(num_neurons, generator=generator).float() + 1
    elif values == "wide range":
        summed = torch.randn(num_neurons, generator=generator).mul(20).exp()
    else:
        summed = torch.randint(0, 4, (num_neurons,), generator=generator).float()
    scores = summed[None].to(kernel_device)
    order = torch.sort(-summed, stable=True).indices  # descending, ties by index
    for k in range(num_neurons + 1):
        index = sg.launch_union_radix_select(scores, k, chunk=16, compact_chunk=16).cpu()
        assert index.tolist() == sorted(order[:k].tolist()), f"k={k}"


def test_union_radix_select_rejects_what_it_cannot_take():
    scores = torch.rand(2, 10)
    for call, error, match in [
        (lambda: sg.launch_union_radix_select(scores, 11), ValueError, "k must lie in"),
        (lambda: sg.launch_union_radix_select(scores, True), TypeError, "Python int"),
        (lambda: sg.launch_union_radix_select(scores[0], 3), ValueError, "scores must be 2-D"),
        (lambda: sg.launch_union_radix_select(scores.long(), 3), TypeError, "floating point"),
        (lambda: sg.launch_union_radix_select(scores, 3, chunk=48), ValueError, "chunk must be a power of two"),
        (lambda: sg.launch_union_radix_select(scores, 3, compact_chunk=8), ValueError, "compact_chunk must be"),
    ]:
        with pytest.raises(error, match=match):
            call()


def test_batch_union_topk_above_the_kernel_limit_falls_back_to_topk():
    scores = randn(2, sg.UNION_SELECT_MAX_F + 5, dtype=torch.float32)
    index = sg.batch_union_topk(scores, 100)
    expected = scores.relu().sum(0).topk(100).indices
    assert torch.equal(index.sort().values, expected.sort().values)


# --------------------------------------------------------------------------------------------------
# opcheck, tracing, layouts, import without triton
# --------------------------------------------------------------------------------------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    index = torch.tensor([4, 0, 9, 4])
    return [
        (torch.ops.polar.selective_up, (r(3, 24), r(10, 24), r(10), index, 1)),
        (torch.ops.polar.selective_up, (r(1, 7), r(10, 7), None, index.int(), 2)),
        (torch.ops.polar.selective_up, (r(2, 8, dtype=torch.bfloat16), r(10, 8, dtype=torch.bfloat16), None, index, 3)),
        (torch.ops.polar.selective_up, (r(2, 8), r(10, 8), None, index[:0], 0)),
        (torch.ops.polar.selective_gated_up, (r(3, 16), r(10, 16), r(10, 16), index)),
        (
            torch.ops.polar.selective_gated_up,
            (r(1, 5, dtype=torch.float16), *r(20, 5, dtype=torch.float16).chunk(2), index),
        ),
        (torch.ops.polar.selective_down, (r(3, 4), r(24, 10), index, None)),
        (torch.ops.polar.selective_down, (r(2, 4), r(10, 24).t(), index.int(), r(24))),
        (torch.ops.polar.selective_down, (r(1, 0), r(24, 10), index[:0], r(24))),
        (torch.ops.polar.batch_union_topk, (r(3, 40), 5)),
        (torch.ops.polar.batch_union_topk, (r(1, 7, dtype=torch.bfloat16), 7)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_trace_through_compile_without_graph_breaks():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 24), torch.randn(40, 24), torch.randn(40)
    down = torch.randn(24, 40).t().contiguous().t()

    def mlp(scores, x):
        index = sg.batch_union_topk(scores, 9)
        return sg.selective_down(sg.selective_up(x, weight, index, bias=bias, activation="gelu"), down, index)

    scores = torch.randn(3, 40)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(scores, x), mlp(scores, x))


def test_prepare_down_weight_is_a_new_neuron_major_parameter_and_idempotent():
    linear = torch.nn.Linear(12, 5)
    before = linear.weight.detach().clone()
    parameter = linear.weight
    x = torch.randn(3, 12)
    expected = linear(x)
    sg.prepare_down_weight(linear)
    # a new Parameter (graphs compiled for the old layout must not mistake it for the old input)
    assert linear.weight is not parameter and isinstance(linear.weight, torch.nn.Parameter)
    assert linear.weight.shape == (5, 12) and linear.weight.stride() == (1, 5)
    assert torch.equal(linear.weight, before)
    torch.testing.assert_close(linear(x), expected)
    prepared = linear.weight
    sg.prepare_down_weight(linear)
    assert linear.weight is prepared
    with pytest.raises(TypeError, match="2-D weight"):
        sg.prepare_down_weight(torch.nn.ReLU())


def test_config_table_covers_every_bucket():
    """Every op has tuned entries in every M bucket, and config_for picks one of them, never the untuned default."""
    table = sg._config_table()
    for op in ("up", "gated_up", "down"):
        assert {row[0] for row in table[op]} == set(sg.M_BUCKETS), op
        for M in (1, 16, 17, 64, 100, 256, 300):
            config = sg.config_for(op, M, 4096, 1638)
            assert config in [row[3] for row in table[op] if row[0] == sg.m_bucket(M)], (op, M)
            assert config.block_m >= 16 and config.num_warps in (1, 2, 4, 8, 16)
    with pytest.raises(ValueError, match="op must be"):
        sg.config_for("sideways", 1, 1, 1)
    with pytest.raises(ValueError, match="power of two"):
        sg.LaunchConfig(block_m=8)


def _table_configs(op: str) -> list:
    """The distinct launch configs of ``op`` in the tuned table, in table order."""
    unique = []
    for _, _, _, config in sg._config_table().get(op, []):
        if config not in unique:
            unique.append(config)
    return unique


TABLE_CASES = [(op, number) for op in ("up", "gated_up", "down") for number in range(len(_table_configs(op)))]


@pytest.mark.triton_kernel
@pytest.mark.skipif(ON_GPU, reason="90 fresh compiles on a GPU; test_ops_at_model_shapes runs the table there")
@pytest.mark.parametrize("even", [False, True], ids=["tail", "even"])
@pytest.mark.parametrize("op,number", TABLE_CASES, ids=[f"{op}-{number}" for op, number in TABLE_CASES])
def test_every_tuned_table_config_runs_right_under_the_interpreter(op, number, even):
    """The interpreter runs got tiny blocks only, so a table config's own shapes (128-256-wide tiles, 5 stages,
    stream-K over the pretend SMs, spread) ran on the GPU alone. Each distinct one here, in bf16 as on the GPU, at a
    size that leaves its tiles partial (rows under block_m, neurons past one block_n tile, repeated and unsorted
    neurons) with a reduction of four block_r steps and a tail, or of exactly four (the unmasked EVEN_D loads of
    model widths)."""
    from polar_compile.testing import kernel_device

    if kernel_device() is None:
        pytest.skip("no triton, or TRITON_INTERPRET != 1")
    config = _table_configs(op)[number]
    dtype, generator = torch.bfloat16, torch.Generator().manual_seed(number)
    M = config.block_m // 2 + 1
    reduction = 4 * config.block_r + (0 if even else 5)  # 4 steps: a config with programs_per_sm splits them
    if op == "down":  # the reduction runs over the selected neurons, the outputs over d
        d, k = config.block_n + 3, reduction
    else:
        d, k = reduction, config.block_n + 3
    num_neurons = k + 7
    index = torch.randint(0, num_neurons, (k,), generator=generator).to(DEVICE)
    if op == "up":
        x = randn(M, d, dtype=dtype)
        weight, bias = randn(num_neurons, d, dtype=dtype, scale=d**-0.5), randn(num_neurons, dtype=dtype)
        code = sg.ACTIVATIONS["relu"]
        out = sg.launch_selective_up(x, weight, bias, index, code, config=config)
        exact = sg.selective_up_reference(*float64(x, weight, bias), index, code)
        baseline = sg.selective_up_reference(x, weight, bias, index, code)
    elif op == "gated_up":
        x = randn(M, d, dtype=dtype)
        gate, up = (randn(num_neurons, d, dtype=dtype, scale=d**-0.5) for _ in range(2))
        out = sg.launch_selective_gated_up(x, gate, up, index, config=config)
        exact = sg.selective_gated_up_reference(*float64(x, gate, up), index)
        baseline = sg.selective_gated_up_reference(x, gate, up, index)
    else:
        y = randn(M, k, dtype=dtype)
        weight, bias = down_weight(d, num_neurons, dtype, neuron_major=True), randn(d, dtype=dtype)
        out = sg.launch_selective_down(y, weight, index, bias, config=config)
        exact = sg.selective_down_reference(*float64(y, weight), index, bias.double())
        baseline = sg.selective_down_reference(y, weight, index, bias)
    assert out.shape == exact.shape and out.dtype == dtype
    assert_close_to_reference(out, exact, baseline)


def test_split_gives_at_most_the_splits_asked_for_and_covers_the_reduction():
    """Each split's share is rounded up to whole blocks: a floor gave more splits than asked (5 blocks in 2 splits
    became 3 of 2 blocks, 63 in 32 became 63 of 1), each with its own fp32 workspace and partial sums."""
    for blocks in range(1, 70):
        reduction = blocks * 32 - 5
        for asked in (1, 2, 3, 8, 32):
            splits, per_split = sg._split(sg.LaunchConfig(block_r=32, split=asked), 1, reduction, torch.device("cpu"))
            assert per_split % 32 == 0 and 1 <= splits <= min(asked, blocks), (blocks, asked, splits)
            assert (splits - 1) * per_split < reduction <= splits * per_split, (blocks, asked, splits, per_split)
    assert sg._split(sg.LaunchConfig(block_r=32, split=2), 1, 5 * 32, torch.device("cpu")) == (2, 96)


def test_dense_from_sends_high_densities_to_the_dense_path(monkeypatch):
    table = {**sg._config_json(), "dense_from": {"down": {"256": 0.5}}}
    monkeypatch.setattr(sg, "_config_json", lambda: table)
    assert sg.dense_from("down", 200) == 0.5 and sg.dense_from("down", 64) is None and sg.dense_from("up", 256) is None
    assert sg.config_for("down", 200, 4096, 8192, 16384) == sg.LaunchConfig(dense=True)
    assert not sg.config_for("down", 200, 4096, 8191, 16384).dense  # density just under the threshold
    assert not sg.config_for("down", 64, 4096, 16384, 16384).dense  # another M bucket
    assert not sg.config_for("up", 256, 4096, 16384, 16384).dense  # another op
    assert not sg.config_for("down", 256, 4096, 16384).dense  # no F given: no density to compare


def test_dense_from_per_model_width(monkeypatch):
    """A bucket's threshold given per model width (the dense path won at OPT-66B's 9216 only) applies to that width,
    and to no other width, nor where the width is not known."""
    table = {**sg._config_json(), "dense_from": {"up": {"256": {"9216": 1.0}}, "down": {"256": {"9216": 0.85}}}}
    monkeypatch.setattr(sg, "_config_json", lambda: table)
    assert sg.dense_from("down", 200, 9216) == 0.85 and sg.dense_from("up", 256, 9216) == 1.0
    assert sg.dense_from("down", 200, 4096) is None and sg.dense_from("down", 200) is None
    assert sg.config_for("down", 256, 9216, 31334, 36864) == sg.LaunchConfig(dense=True)  # density 0.85
    assert sg.config_for("up", 256, 9216, 36864, 36864) == sg.LaunchConfig(dense=True)
    assert not sg.config_for("up", 256, 9216, 31334, 36864).dense  # under the up threshold
    assert not sg.config_for("down", 256, 4096, 16384, 16384).dense  # another width
    assert not sg.config_for("down", 128, 9216, 36864, 36864).dense  # another bucket
    table["dense_from"] = {"down": {"256": {"9216": 1.5}}}
    with pytest.raises(ValueError, match=r"dense_from\['down'\]\['256'\]\['9216'\] must be a density"):
        sg.config_for("down", 256, 9216, 36864, 36864)


def test_the_tuned_table_dense_thresholds_are_densities(monkeypatch):
    """The shipped table's thresholds (per model width since session 35) are densities in a known op and bucket; a
    threshold out of (0, 1] is refused with the table, op and bucket named instead of silently sending every call (or
    none) to the dense path."""
    for op, buckets in sg._config_json().get("dense_from", {}).items():
        assert op in ("up", "gated_up", "down")
        for bucket, value in buckets.items():
            for width in value if isinstance(value, dict) else [None]:  # one density, or one a model width
                assert int(bucket) in sg.M_BUCKETS and 0 < sg.dense_from(op, int(bucket), width and int(width)) <= 1
    for bad in (0, 1.5, float("nan"), -0.3):
        table = {**sg._config_json(), "dense_from": {"down": {"64": bad}}}
        monkeypatch.setattr(sg, "_config_json", lambda table=table: table)
        with pytest.raises(ValueError, match=r"dense_from\['down'\]\['64'\] must be a density"):
            sg.config_for("down", 40, 4096, 1024, 16384)


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_selective_gemm.py"
    spec = importlib.util.spec_from_file_location("bench_selective_gemm", path)
    bench_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_module)
    return bench_module


def test_draw_index_gives_distinct_neurons_in_the_order_asked(monkeypatch):
    bench_module = _bench_module()
    monkeypatch.setattr(bench_module, "DEVICE", "cpu")
    torch.manual_seed(3)
    shuffled = bench_module.draw_index(50, 20, "random")
    torch.manual_seed(3)
    ascending = bench_module.draw_index(50, 20, "ascending")
    assert ascending.tolist() == sorted(shuffled.tolist())  # the same draw, only reordered
    assert len(set(shuffled.tolist())) == 20 and max(shuffled.tolist()) < 50
    assert shuffled.tolist() != ascending.tolist()  # seed 3: a random order, not already sorted
    with pytest.raises(ValueError, match="index order"):
        bench_module.draw_index(50, 20, "descending")


def test_read_rows_keeps_the_runs_of_one_index_order_apart(tmp_path):
    import csv

    bench_module = _bench_module()
    path = tmp_path / "gemm.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=bench_module.FIELDS)
        writer.writeheader()
        for ms, order in ((0.30, "random"), (0.20, "ascending"), (0.25, "random")):
            writer.writerow(dict(gpu="H100", model="m", M=8, density=0.5, op="down", impl="selective", ms=ms,
                                 index_order=order))  # fmt: skip
    assert [r["ms"] for r in bench_module.read_rows(path)] == ["0.25"]  # the latest random-order run
    assert [r["ms"] for r in bench_module.read_rows(path, index_order="ascending")] == ["0.2"]


def test_summary_judges_up_down_against_the_stronger_dense_baseline():
    bench_module = _bench_module()

    def row(M, op, impl, ms, dense_ms, density="1.0", model="opt-66b"):
        return dict(model=model, M=str(M), density=density, op=op, impl=impl, ms=str(ms), dense_ms=str(dense_ms),
                    tbps="3.0", speedup=str(dense_ms / ms))  # fmt: skip

    rows = [
        row(64, "up", "dense", 0.20, 0.20), row(64, "down", "dense", 0.25, 0.25),
        row(64, "mlp", "dense", 0.48, 0.48),  # eager activation: 30 us over the GEMMs
        row(64, "mlp", "selective", 0.46, 0.48),  # 1.04x the eager MLP, 0.98x the GEMMs
        row(8, "up", "dense", 0.10, 0.10), row(8, "down", "dense", 0.10, 0.10),
        row(8, "mlp", "dense", 0.19, 0.19),  # already faster than the GEMMs summed: kept
        row(8, "mlp", "selective", 0.19, 0.19),
        row(64, "mlp", "selective", 0.07, 0.48, density="0.1"),
    ]  # fmt: skip
    fixed = {(r["M"], r["density"]): r for r in bench_module.with_strongest_dense(rows) if r["impl"] == "selective"}
    assert float(fixed["64", "1.0"]["speedup"]) == pytest.approx(0.45 / 0.46, rel=1e-3)
    assert float(fixed["8", "1.0"]["dense_ms"]) == pytest.approx(0.19)
    text = bench_module.summary(rows)
    assert "= 6.43x (target >= 7x): NOT MET" in text  # 0.45 / 0.07, not 0.48 / 0.07 = 6.86x
    assert "density 1.0 up+down: 2/2 cases >= 0.9x dense" in text


@pytest.mark.parametrize("gated", [False, True])
def test_bench_batch_alternates_dense_and_selective_and_keeps_each_best_round(monkeypatch, gated):
    bench_module = _bench_module()
    monkeypatch.setattr(bench_module, "DEVICE", "cpu")
    monkeypatch.setattr(bench_module, "DTYPE", torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    order, outputs = [], {}

    def fake_time_calls(calls):  # runs every call (the CPU reference) and gives each variant a fixed time a round
        results = [call() for call in calls]
        key = id(calls)
        outputs[key] = results[0]
        order.append(key)
        seen = order.count(key)
        return 2.0 if seen == 1 else 1.0  # the second round is faster: the best round must be kept

    monkeypatch.setattr(bench_module, "time_calls", fake_time_calls)
    shape = bench_module.MlpShape("tiny", 16, 24, gated=gated, bias=not gated)
    weights = bench_module.Weights(shape, 2)
    rows = bench_module.bench_batch(weights, 2, 3, (0.5, 1.0))
    variants = len(set(order))
    assert variants == 9 and order[:variants] == order[variants:]  # 3 dense + 3 per density, in two equal rounds
    assert [(r["density"], r["op"], r["impl"]) for r in rows][:4] == [
        ("dense", "up", "dense"), ("dense", "down", "dense"), ("dense", "mlp", "dense"), (0.5, "up", "selective")
    ]  # fmt: skip
    assert all(r["ms"] == 1.0 and r["index_order"] == "random" for r in rows)
    mlp = [r for r in rows if r["op"] == "mlp" and r["impl"] == "selective"]
    assert all(r["dense_ms"] == 1.0 and r["speedup"] == 1.0 for r in mlp)  # min(eager mlp 1.0, up + down 2.0)
    k = {r["density"]: r["k"] for r in mlp}
    assert k == {0.5: 12, 1.0: 24}
    up_bytes = (2 if gated else 1) * 12 * 16 * 2 + (0 if gated else 12 * 2)
    assert [r["weight_bytes"] for r in rows if r["density"] == 0.5 and r["op"] == "up"] == [up_bytes]


def test_fit_dense_from_takes_the_lowest_density_from_which_dense_always_won():
    bench_module = _bench_module()

    def row(op, bucket, M, density, kernel_ms, dense_ms, model="opt-6.7b"):
        return dict(op=op, model=model, bucket=bucket, M=M, density=density, kernel_ms=kernel_ms, dense_ms=dense_ms)

    rows = [
        # down, bucket 256: dense wins from 0.5 at both ends of the bucket
        *(row("down", 256, M, 0.3, 1.0, 1.1) for M in (129, 256)),
        *(row("down", 256, M, density, 1.0, 0.9) for M in (129, 256) for density in (0.5, 0.7, 1.0)),
        # down, bucket 128: dense wins at 0.7 only at M = 128, and at 1.0 everywhere: 1.0
        row("down", 128, 65, 0.7, 1.0, 1.01), row("down", 128, 128, 0.7, 1.0, 0.9),
        *(row("down", 128, M, 1.0, 1.0, 0.9) for M in (65, 128)),
        # up, bucket 16: dense wins at 0.5 but not at 1.0 (noise): never
        row("up", 16, 16, 0.5, 1.0, 0.9), row("up", 16, 16, 1.0, 1.0, 1.2),
        # up, bucket 256: dense wins from 0.85 on the 9216-wide shape only (never on the 4096-wide one): per width
        *(row("up", 256, M, density, 1.0, 0.9, "opt-66b") for M in (129, 256) for density in (0.85, 1.0)),
        *(row("up", 256, M, density, 1.0, 1.1) for M in (129, 256) for density in (0.85, 1.0)),
        row("up", 256, 129, 0.7, 1.0, 1.1, "opt-66b"), row("up", 256, 256, 0.7, 1.0, 1.2),
    ]  # fmt: skip
    assert bench_module.fit_dense_from(rows) == {"down": {"256": 0.5, "128": 1.0}, "up": {"256": {"9216": 0.85}}}


def test_a_dense_sweep_of_some_buckets_refits_only_those(monkeypatch):
    """--dense-m: the sweep times only the named buckets, and the table's dense_from changes only there (set where
    dense always won, removed where the kernel won once); other buckets and ops keep their thresholds."""
    bench_module = _bench_module()
    monkeypatch.setattr(bench_module, "DEVICE", "cpu")
    monkeypatch.setattr(bench_module, "Weights", lambda shape, copies: None)
    monkeypatch.setattr(bench_module, "copies_for", lambda *args, **kwargs: 1)
    monkeypatch.setattr(bench_module, "SHAPES", (bench_module.MlpShape("opt-6.7b", 16, 32, gated=False, bias=True),))
    monkeypatch.setattr(bench_module, "down_call", lambda weights, i, y, index, config: ("down", config.dense))
    monkeypatch.setattr(bench_module, "up_call", lambda weights, i, x, index, config: ("up", config.dense))
    # dense faster for down everywhere, slower for up everywhere
    timings = {("down", True): 1.0, ("down", False): 2.0, ("up", True): 2.0, ("up", False): 1.0}
    monkeypatch.setattr(bench_module, "time_calls", lambda calls, *rest: timings[calls[0]])
    rows = bench_module.dense_sweep(math.inf, buckets=[256])
    assert {r["bucket"] for r in rows} == {256} and {r["M"] for r in rows} == {129, 256}
    assert {r["op"] for r in rows} == {"up", "down"}
    swept = {"up": {256}, "down": {256}}
    current = {"down": {"128": 1.0, "256": 0.7}, "up": {"256": 1.0}, "gated_up": {"64": 0.85}}
    merged = bench_module.merge_dense_from(current, bench_module.fit_dense_from(rows), swept)
    assert merged == {"down": {"128": 1.0, "256": min(bench_module.DENSE_SWEEP)}, "gated_up": {"64": 0.85}}
    assert current["up"] == {"256": 1.0}  # the table read is not changed in place


def test_the_tuner_leaves_out_gated_tiles_whose_accumulators_spill(monkeypatch):
    bench_module = _bench_module()
    monkeypatch.setattr(bench_module, "DEVICE", "cpu")
    assert bench_module._spills("gated_up", (256, 128, 64, 8, 3)) and bench_module._spills(
        "gated_up", (128, 256, 64, 8, 3)
    )
    assert not bench_module._spills("gated_up", (256, 64, 64, 8, 4)) and not bench_module._spills(
        "up", (256, 128, 64, 8, 3)
    )
    for bucket, candidates in bench_module.UP_CANDIDATES.items():
        variants = list(bench_module._tune_variants("gated_up", candidates, bucket, 4096, 4096))
        assert variants and not any(bench_module._spills("gated_up", _candidate(c)) for c, _, _ in variants)
    assert not any(
        job[0] == "gated_up" and bench_module._spills("gated_up", job[1]) for job in bench_module._compile_jobs()
    )


def _candidate(config):
    return (config.block_m, config.block_n, config.block_r, config.num_warps, config.num_stages)


def test_a_tune_stopped_by_its_deadline_keeps_the_entries_it_did_not_reach():
    """The tuner replaced an op's whole list with what it had tuned: a deadline part-way dropped the other entries,
    and their shapes fell back to the nearest tuned one. Reached entries are replaced in place, the rest kept, new
    ones appended; ops not tuned are not touched by the merge."""
    bench_module = _bench_module()

    def entry(m, k, ms):
        return dict(m=m, d=4096, k=k, config=dict(block_m=16), ms=ms)

    table = {"down": [entry(16, 1638, 1.0), entry(64, 1638, 2.0), entry(16, 8192, 3.0)], "up": [entry(16, 1638, 4.0)]}
    tuned = {"down": [entry(64, 1638, 0.5), entry(128, 1638, 0.7)]}
    merged = bench_module.merge_tuned(table, tuned)
    assert merged == {"down": [entry(16, 1638, 1.0), entry(64, 1638, 0.5), entry(16, 8192, 3.0), entry(128, 1638, 0.7)]}


def test_a_tune_limited_to_some_pairs_and_buckets_times_only_those(monkeypatch):
    """--tune-k / --tune-m: the sweep reaches only the named TUNE_PAIRS and M buckets (timing stubbed out: this
    checks which entries the sweep visits, every variant of each, not what they measure)."""
    bench_module = _bench_module()
    monkeypatch.setattr(bench_module, "DEVICE", "cpu")
    monkeypatch.setattr(bench_module, "Weights", lambda shape, copies: None)
    monkeypatch.setattr(bench_module, "copies_for", lambda *args, **kwargs: 2)
    monkeypatch.setattr(bench_module, "down_call", lambda *args: None)
    timed = []
    monkeypatch.setattr(bench_module, "time_calls", lambda calls, *rest: timed.append(len(calls)) or 1.0)
    rows = []
    table = bench_module.tune(math.inf, rows, ("down",), ks=[1638, 8192], buckets=[16, 64])
    assert [(e["m"], e["d"], e["k"]) for e in table["down"]] == [(16, 4096, 1638), (64, 4096, 1638), (16, 4096, 8192),
                                                                 (64, 4096, 8192)]  # fmt: skip
    assert len(timed) == len(rows) > 4 and {(r["m"], r["k"]) for r in rows} == {(16, 1638), (64, 1638), (16, 8192),
                                                                                  (64, 8192)}  # fmt: skip
    assert bench_module.tune(math.inf, [], ("down",), ks=[5], buckets=None) == {"down": []}


@pytest.mark.triton_kernel
def test_launchers_take_the_dense_path_where_the_table_says(kernel_device, monkeypatch):
    table = {**sg._config_json(), "dense_from": {op: {"16": 0.5} for op in ("up", "gated_up", "down")}}
    monkeypatch.setattr(sg, "_config_json", lambda: table)
    calls = []
    for name in ("_dense_up", "_dense_down"):
        original = getattr(sg, name)
        monkeypatch.setattr(sg, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    dtype, d, num_neurons = torch.float16, 24, 10
    x, weight, up = randn(3, d, dtype=dtype), randn(num_neurons, d, dtype=dtype), randn(num_neurons, d, dtype=dtype)
    down = down_weight(d, num_neurons, dtype, neuron_major=True)
    for k, dense in ((5, True), (4, False)):
        calls.clear()
        index = torch.randperm(num_neurons, device=DEVICE)[:k]
        out = sg.launch_selective_up(x, weight, None, index, sg.ACTIVATIONS["silu"])
        assert_close_to_reference(out, F.silu(x.double() @ weight[index].double().T), F.silu(x @ weight[index].T))
        gated = sg.launch_selective_gated_up(x, weight, up, index)
        exact = F.silu(x.double() @ weight[index].double().T) * (x.double() @ up[index].double().T)
        assert_close_to_reference(gated, exact, F.silu(x @ weight[index].T) * (x @ up[index].T))
        result = sg.launch_selective_down(out, down, index, None)
        assert_close_to_reference(result, out.double() @ down[:, index].double().T, out @ down[:, index].T)
        assert calls == (["_dense_up", "_dense_up", "_dense_down"] if dense else []), (k, calls)


def test_import_and_cpu_ops_need_no_triton():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        import polar_compile
        from polar_compile.ops import selective_gemm as sg
        assert sg.triton is None
        x, w, idx = torch.randn(2, 8), torch.randn(6, 8), torch.tensor([1, 5])
        out = sg.selective_up(x, w, idx, activation="relu")
        torch.testing.assert_close(out, torch.relu(x @ w[idx].T))
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------------------------------
# Errors: named, raised before any launch
# --------------------------------------------------------------------------------------------------


def _error_cases():
    x, w, b, i = torch.randn(2, 8), torch.randn(6, 8), torch.randn(6), torch.tensor([1, 2])
    y, wd = torch.randn(2, 2), torch.randn(8, 6)
    up, gated, down = sg.selective_up, sg.selective_gated_up, sg.selective_down
    return [
        (lambda: up(x[0], w, i), ValueError, "x must be 2-D"),
        (lambda: up(x, w[0], i), ValueError, "weight must be 2-D"),
        (lambda: up(x, w[:, :7], i), ValueError, "d mismatch"),
        (lambda: up(x, w, i, bias=b[:5]), ValueError, "bias must have shape"),
        (lambda: up(x, w.half(), i), TypeError, "dtype mismatch"),
        (lambda: up(x, w, i, bias=b.double()), TypeError, "dtype mismatch"),
        (lambda: up(x.int(), w.int(), i), TypeError, "selective GEMM takes"),
        (lambda: up(x, w, i.float()), TypeError, "int32 or int64"),
        (lambda: up(x, w, i[None]), ValueError, "index must be 1-D"),
        (lambda: up(x, w, torch.tensor([0, 6])), ValueError, r"index values must lie in \[0, 6\)"),
        (lambda: up(x, w, torch.tensor([-1])), ValueError, "index values"),
        (lambda: up(x, w, i, activation="tanh"), ValueError, "activation must be one of"),
        (lambda: up(x, w, i, activation=7), ValueError, "activation must be one of"),
        (lambda: gated(x, w, w[:5], i), ValueError, "must have one shape"),
        (lambda: gated(x, w[:, :4], w[:, :4], i), ValueError, "d mismatch"),
        (lambda: gated(x.half(), w.half(), w, i), TypeError, "dtype mismatch"),
        (lambda: gated(x, w, w, torch.tensor([9])), ValueError, "index values"),
        (lambda: down(y, wd, i[:1]), ValueError, "k mismatch"),
        (lambda: down(y[0], wd, i), ValueError, "y must be 2-D"),
        (lambda: down(y, wd, i, bias=torch.randn(6)), ValueError, "bias must have shape"),
        (lambda: down(y.half(), wd, i), TypeError, "dtype mismatch"),
        (lambda: down(y, wd, torch.tensor([0, 6])), ValueError, "index values"),
        (lambda: sg.batch_union_topk(torch.randn(2, 5), 6), ValueError, "k must lie in"),
        (lambda: sg.batch_union_topk(torch.randn(2, 5), -1), ValueError, "k must lie in"),
        (lambda: sg.batch_union_topk(torch.randn(5), 1), ValueError, "scores must be 2-D"),
        (lambda: sg.batch_union_topk(torch.ones(2, 5, dtype=torch.int64), 1), TypeError, "floating point"),
        (lambda: sg.batch_union_topk_reference(torch.randn(2, 5), 1.5), TypeError, "Python int"),
    ]


@pytest.mark.parametrize("case", range(len(_error_cases())))
def test_bad_inputs_raise_named_errors(case):
    fn, error, match = _error_cases()[case]
    with pytest.raises(error, match=match):
        fn()


@pytest.mark.triton_kernel
def test_launchers_check_inputs_before_launch(kernel_device):
    dtype = torch.bfloat16
    x, w = torch.randn(2, 8, device=kernel_device, dtype=dtype), torch.randn(6, 8, device=kernel_device, dtype=dtype)
    i = torch.tensor([1])
    with pytest.raises(ValueError, match="d mismatch"):
        sg.launch_selective_up(x, w[:, :4], None, i.to(kernel_device), 0)
    with pytest.raises(ValueError, match="k mismatch"):
        sg.launch_selective_down(x, w.t(), i.to(kernel_device), None)
    if kernel_device == "cuda":
        with pytest.raises(ValueError, match="device mismatch"):
            sg.launch_selective_up(x, w, None, i, 0)
        with pytest.raises(TypeError, match="CUDA kernels take"):
            sg.selective_up(x.float(), w.float(), i.cuda())


# --------------------------------------------------------------------------------------------------
# GPU only: inductor, CUDA graphs
# --------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")


@gpu
@pytest.mark.gpu
@pytest.mark.triton_kernel
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("M", "k"), [(48, 819), (200, 6554)])
def test_inductor_and_cuda_graphs_run_the_kernels(gated, M, k, monkeypatch):
    # (200, 6554): density 0.8 at M = 200, where this table sends the down op to its dense path (the tuned one has
    # no dense_from since session 30: its retuned M = 256 kernels beat the dense path on the 4096-wide shapes).
    table = {**sg._config_json(), "dense_from": {"down": {"256": 0.7}}}
    monkeypatch.setattr(sg, "_config_json", lambda: table)
    torch.manual_seed(0)
    dtype, d, num_neurons = torch.bfloat16, 2048, 8192
    assert sg.config_for("down", M, d, k, num_neurons).dense == (M == 200)
    x = randn(M, d, dtype=dtype)
    up_weight = randn(num_neurons, d, dtype=dtype, scale=d**-0.5)
    gate_up = randn(2 * num_neurons, d, dtype=dtype, scale=d**-0.5)
    down = randn(num_neurons, d, dtype=dtype, scale=k**-0.5).t()  # neuron-major (d, F)
    bias = randn(d, dtype=dtype)

    def mlp(scores, x):
        index = sg.batch_union_topk(scores, k)
        if gated:
            hidden = sg.selective_gated_up(x, gate_up[:num_neurons], gate_up[num_neurons:], index)
        else:
            hidden = sg.selective_up(x, up_weight, index, activation="relu")
        return sg.selective_down(hidden, down, index, bias=bias)

    scores = randn(M, num_neurons, dtype=dtype)
    index = sg.batch_union_topk(scores, k)
    if gated:
        g, u = gate_up.double()[index], gate_up.double()[num_neurons:][index]
        hidden_exact = F.silu(x.double() @ g.T) * (x.double() @ u.T)
    else:
        hidden_exact = F.relu(x.double() @ up_weight.double()[index].T)
    exact = F.linear(hidden_exact, down.double()[:, index], bias.double())
    eager = mlp(scores, x)
    baseline_error = (eager.double() - exact).norm() / exact.norm()
    assert baseline_error < 2e-2
    compiled = torch.compile(mlp, fullgraph=True)(scores, x)
    assert_close_to_reference(compiled, exact, eager)

    graph = torch.cuda.CUDAGraph()
    static_scores, static_x = scores.clone(), x.clone()
    mlp(static_scores, static_x)  # warm-up compiles outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = mlp(static_scores, static_x)
    static_x.copy_(randn(M, d, dtype=dtype))
    graph.replay()
    torch.testing.assert_close(static_out, mlp(static_scores, static_x), rtol=0, atol=0)


@gpu
@pytest.mark.gpu
@pytest.mark.triton_kernel
def test_inductor_and_cuda_graphs_run_the_union_select_past_the_one_program_limit():
    """F > UNION_SELECT_MAX_F (OPT-66B: 36,864) takes the many-program radix select: eager, compiled by inductor and
    replayed in a CUDA graph it gives the k largest sums in ascending order, ties (five levels) to the lowest index."""
    num_neurons, k, M = 36864, 11059, 64
    scores = torch.randint(-2, 3, (M, num_neurons), device=DEVICE).to(torch.bfloat16)
    order = torch.sort(-scores.float().relu().sum(0), stable=True).indices  # descending, ties by index
    expected = order[:k].sort().values
    assert torch.equal(sg.batch_union_topk(scores, k), expected)
    assert torch.equal(torch.compile(sg.batch_union_topk, fullgraph=True)(scores, k), expected)
    static = scores.clone()
    sg.batch_union_topk(static, k)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sg.batch_union_topk(static, k)
    static.copy_(scores.flip(1))
    graph.replay()
    flipped = torch.sort(-scores.flip(1).float().relu().sum(0), stable=True).indices[:k].sort().values
    assert torch.equal(out, flipped)


@gpu
@pytest.mark.gpu
@pytest.mark.triton_kernel
@pytest.mark.parametrize(
    ("M", "d", "num_neurons", "k"),
    [(1, 4096, 14336, 1434), (8, 4096, 16384, 819), (64, 9216, 36864, 3686), (256, 4096, 16384, 16384)],
)
def test_ops_at_model_shapes(M, d, num_neurons, k):
    # The registered ops with the tuned launch table, at the benchmark's shapes (bf16, neuron-major down).
    torch.manual_seed(M)
    dtype = torch.bfloat16
    x = randn(M, d, dtype=dtype)
    gate_up = randn(2 * num_neurons, d, dtype=dtype, scale=d**-0.5)
    gate_weight, up_weight = gate_up[:num_neurons], gate_up[num_neurons:]
    bias = randn(num_neurons, dtype=dtype)
    down = randn(num_neurons, d, dtype=dtype, scale=k**-0.5).t()
    down_bias = randn(d, dtype=dtype)
    index = torch.randperm(num_neurons, device=DEVICE)[:k]
    g, u, b = float64(gate_weight[index], up_weight[index], bias[index])
    x64 = x.double()

    up = sg.selective_up(x, up_weight, index, bias=bias, activation="relu")
    exact = F.relu(F.linear(x64, u, b))
    assert_close_to_reference(up, exact, F.relu(F.linear(x, up_weight[index], bias[index])))

    gated = sg.selective_gated_up(x, gate_weight, up_weight, index)
    exact = F.silu(x64 @ g.T) * (x64 @ u.T)
    baseline = F.silu(x @ gate_weight[index].T) * (x @ up_weight[index].T)
    assert_close_to_reference(gated, exact, baseline)

    out = sg.selective_down(up, down, index, bias=down_bias)
    exact = F.linear(up.double(), down[:, index].double(), down_bias.double())
    assert_close_to_reference(out, exact, F.linear(up, down[:, index], down_bias))


def test_unsupported_reason_names_what_the_kernels_cannot_take():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sg.unsupported_reason(torch.float16, cuda) is None
    assert "float32" in sg.unsupported_reason(torch.float32, cuda)
    assert sg.unsupported_reason(torch.float32, cpu) is None
    assert "int8" in sg.unsupported_reason(torch.int8, cpu)


def test_kernels_read_a_strided_bias_right(kernel_device):
    """The kernels read the bias with unit stride: a strided view (a column of a (F, 2) tensor) or a broadcast one
    used to give wrong numbers in silence, on the GPU as under the interpreter."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float32  # the CUDA kernels take 16-bit only

    def rand(*shape):
        return torch.randn(*shape, device=kernel_device).to(dtype)

    def f64(*tensors):
        return [t.double() for t in tensors]

    M, d, F, k = 3, 32, 40, 12
    x = rand(M, d)
    weight = rand(F, d)
    index = torch.randperm(F, device=kernel_device)[:k]
    for bias in (rand(F, 2)[:, 0], torch.tensor(0.5, device=kernel_device).to(dtype).expand(F)):
        for config in (None, sg.LaunchConfig(16, 16, 32, 4, 1, split=2), sg.LaunchConfig(dense=True)):
            out = sg.launch_selective_up(x, weight, bias, index, sg.ACTIVATIONS["identity"], config=config)
            exact = sg.selective_up_reference(*f64(x, weight, bias), index, 0)
            assert_close_to_reference(out, exact, sg.selective_up_reference(x, weight, bias, index, 0))
    y = rand(M, k)
    down = rand(d, F)
    bias = rand(d, 3)[:, 1]
    exact = sg.selective_down_reference(*f64(y, down), index, bias.double())
    assert_close_to_reference(
        sg.launch_selective_down(y, down, index, bias), exact, sg.selective_down_reference(y, down, index, bias)
    )
    summed = torch.rand(F, 2, device=kernel_device)[:, 0]
    assert sg.launch_union_select(summed, 5).cpu().tolist() == sorted(summed.cpu().topk(5).indices.tolist())


@pytest.mark.triton_kernel
@pytest.mark.parametrize("M", [19, 32])
@pytest.mark.parametrize("order", ["permutation", "duplicates"])
def test_dense_path_whole_and_partial_index_blocks_past_16_rows(kernel_device, order, M, monkeypatch):
    """LaunchConfig.dense with k = 150 of 160 neurons: the gather (64 entries a program) and scatter (32) passes
    each take whole blocks, whose accesses carry no mask along the index, and a partial last one; bias on both ops,
    ReLU and gated up. M = 19: the transposed products padded to 32 columns (read past M, never written there) and
    the down product copied out transposed; M = 32: x used unpadded and the down product written straight into the
    output (sg._product_into_out). torch.empty hands out NaN-filled memory here, so a row of the down path's scatter
    buffer that no pass wrote (the neurons the index leaves out, and an empty index) turns the output to NaN."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(float("nan")))
    torch.manual_seed(1)
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    d, num_neurons, k = 48, 160, 150
    assert sg._product_into_out(M, d) == (M == 32)
    if order == "permutation":
        index = torch.randperm(num_neurons, device=DEVICE)[:k]
    else:
        index = torch.randint(0, num_neurons, (k,), device=DEVICE)
    dense = sg.LaunchConfig(dense=True)
    x = randn(M, d, dtype=dtype)
    gate, up = (randn(num_neurons, d, dtype=dtype, scale=d**-0.5) for _ in range(2))
    up_bias = randn(num_neurons, dtype=dtype)
    out = sg.launch_selective_up(x, up, up_bias, index, sg.ACTIVATIONS["relu"], config=dense)
    exact = sg.selective_up_reference(*float64(x, up, up_bias), index, sg.ACTIVATIONS["relu"])
    assert_close_to_reference(out, exact, sg.selective_up_reference(x, up, up_bias, index, sg.ACTIVATIONS["relu"]))
    out = sg.launch_selective_gated_up(x, gate, up, index, config=dense)
    exact = sg.selective_gated_up_reference(*float64(x, gate, up), index)
    assert_close_to_reference(out, exact, sg.selective_gated_up_reference(x, gate, up, index))
    y = randn(M, k, dtype=dtype)
    weight = down_weight(d, num_neurons, dtype, neuron_major=True)
    bias = randn(d, dtype=dtype)
    out = sg.launch_selective_down(y, weight, index, bias, config=dense)
    exact = sg.selective_down_reference(*float64(y, weight), index, bias.double())
    assert_close_to_reference(out, exact, sg.selective_down_reference(y, weight, index, bias))
    nothing = index[:0]
    out = sg.launch_selective_down(y[:, :0], weight, nothing, bias, config=dense)
    torch.testing.assert_close(out, bias.expand(M, d), rtol=0, atol=0)


@pytest.mark.triton_kernel
@pytest.mark.parametrize("layout", ["wide", "column-major"])
def test_kernels_read_x_and_y_through_their_strides(kernel_device, layout):
    """x (up, gated up) and y (down) as the first columns of a wider buffer or column-major: a kernel that took
    them as contiguous read the wrong rows in silence (one tile and split-d launches alike)."""
    torch.manual_seed(0)
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    M, d, num_neurons, k = 4, 32, 20, 6
    x = laid_out(randn(M, d, dtype=dtype), layout)
    gate, up = (randn(num_neurons, d, dtype=dtype, scale=d**-0.5) for _ in range(2))
    index = torch.tensor([3, 7, 1, 19, 0, 7], device=DEVICE)
    for config in (sg.LaunchConfig(16, 16, 16, split=1), sg.LaunchConfig(16, 16, 16, split=2)):
        out = sg.launch_selective_up(x, up, None, index, sg.ACTIVATIONS["identity"], config=config)
        assert_close_to_reference(out, F.linear(*float64(x, up[index])), F.linear(x, up[index]))
        out = sg.launch_selective_gated_up(x, gate, up, index, config=config)
        exact = F.silu(F.linear(*float64(x, gate[index]))) * F.linear(*float64(x, up[index]))
        assert_close_to_reference(out, exact, F.silu(F.linear(x, gate[index])) * F.linear(x, up[index]))
    y = laid_out(randn(M, k, dtype=dtype), layout)
    down = randn(d, num_neurons, dtype=dtype, scale=k**-0.5)
    for config in (sg.LaunchConfig(16, 16, 16, split=1), sg.LaunchConfig(16, 16, 16, stream_k=True)):
        out = sg.launch_selective_down(y, down, index, None, config=config)
        assert_close_to_reference(out, F.linear(*float64(y, down[:, index])), F.linear(y, down[:, index]))


def test_interpreted_launchers_refuse_float64_and_out_of_range_indices():
    """On the CPU the launchers run the kernels under the interpreter: fp64 came back as garbage (~1e-310) and an
    index past F read outside the weight; both are refused by name, as the reference refuses them."""
    x, weight, y, down = torch.randn(2, 8), torch.randn(10, 8), torch.randn(2, 2), torch.randn(8, 10)
    with pytest.raises(TypeError, match="under the interpreter; got torch.float64"):
        sg.launch_selective_up(x.double(), weight.double(), None, torch.tensor([0, 1]), 0)
    for bad in ([0, 10], [-1, 2]):
        index = torch.tensor(bad)
        with pytest.raises(ValueError, match="index values must lie in \\[0, 10\\)"):
            sg.launch_selective_up(x, weight, None, index, 0)
        with pytest.raises(ValueError, match="index values must lie in \\[0, 10\\)"):
            sg.launch_selective_gated_up(x, weight, weight, index)
        with pytest.raises(ValueError, match="index values must lie in \\[0, 10\\)"):
            sg.launch_selective_down(y, down, index, None)
    with pytest.raises(TypeError, match="k must be a Python int, got bool"):
        sg.launch_union_select(torch.rand(10), True)


def test_relu_keeps_a_nan_as_torch_does(kernel_device):
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float32  # the CUDA kernels take 16-bit only
    x = torch.randn(2, 16, device=kernel_device).to(dtype)
    x[0, 3] = float("nan")
    weight, index = torch.randn(8, 16, device=kernel_device).to(dtype), torch.arange(8, device=kernel_device)
    out = sg.launch_selective_up(x, weight, None, index, sg.ACTIVATIONS["relu"]).cpu()
    assert out[0].isnan().all() and not out[1].isnan().any()


def test_union_select_kernel_ranks_nan_first_as_topk_does(kernel_device):
    """The kernel clamped a NaN sum to 0 and dropped its neuron, where topk (the reference, and the sort path above
    the kernel's F) ranks it first."""
    summed = torch.tensor([0.5, float("nan"), 2.0, 0.0, 1.0])
    index = sg.launch_union_select(summed.to(kernel_device), 2).cpu()
    assert index.tolist() == [1, 2] == sorted(summed.topk(2).indices.tolist())


def test_a_dense_sweep_cut_by_its_deadline_refits_only_the_buckets_it_finished(monkeypatch):
    """The sweep checks its deadline before each M: a bucket it left part-way (one end timed, not the other) must
    keep the table's threshold, not be refitted from the half it has."""
    bench_module = _bench_module()
    monkeypatch.setattr(bench_module, "DEVICE", "cpu")
    monkeypatch.setattr(bench_module, "Weights", lambda shape, copies: None)
    monkeypatch.setattr(bench_module, "copies_for", lambda *args, **kwargs: 1)
    monkeypatch.setattr(bench_module, "SHAPES", (bench_module.MlpShape("opt-6.7b", 16, 32, gated=False, bias=True),))
    monkeypatch.setattr(bench_module, "DENSE_OPS", {"down": ("opt-6.7b",)})
    monkeypatch.setattr(bench_module, "down_call", lambda weights, i, y, index, config: config.dense)
    clock = [0.0]  # advanced by each timing only, so nothing else that reads time.time can move it

    def time_calls(calls, *rest):
        clock[0] += 1.0
        return 1.0 if calls[0] else 2.0  # the dense path wins

    monkeypatch.setattr(bench_module, "time_calls", time_calls)
    monkeypatch.setattr(bench_module, "time", types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime))
    # 2 timings a density, so each M takes 2 x len(DENSE_SWEEP) "seconds": M 65, 128 (bucket 128) and 129 start
    # before the deadline, M 256 after it
    per_m = 2 * len(bench_module.DENSE_SWEEP)
    rows = bench_module.dense_sweep(deadline=2.5 * per_m, buckets=[128, 256])
    assert sorted({(r["bucket"], r["M"]) for r in rows}) == [(128, 65), (128, 128), (256, 129)]
    assert bench_module.complete_buckets(rows) == {"down": {128}}
    merged, partial = bench_module.refit_dense_from({"down": {"256": 1.0}}, rows)
    assert merged == {"down": {"128": min(bench_module.DENSE_SWEEP), "256": 1.0}}
    assert partial == [("down", 256)]


_UP_LAUNCHES_IN_PLACE = """
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._functorch.aot_autograd import aot_module_simplified
from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core
from polar_compile.ops import selective_gemm as sg


class Hopper:  # what inductor's kernel analysis asks of the active driver: the sm_90 target, as on the H100
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True


triton.runtime.driver.set_active(Hopper())
sg._on_kernel = lambda device: True  # trace the CUDA branch (kernels wrapped as for the GPU) on CPU tensors
sg._kernel = lambda kernel, device: torch.library.wrap_triton(kernel)
config = {"direct": sg.LaunchConfig(split=1), "split": sg.LaunchConfig(split=2), "dense": sg.LaunchConfig(dense=True)}
sg.config_for = lambda op, *args: config[sys.argv[1]] if op != "down" else sg.LaunchConfig(split=1)
report = []


def backend(gm, inputs):
    def inspect(graph_module, _):
        graph = graph_module.graph
        reinplace_inplaceable_ops_core(graph)  # what inductor's post-grad passes do before it lowers the graph
        for node in graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                report.append(["kernel", node.kwargs["tensors_to_clone"]])
            elif "scatter" in str(node.target) or node.target is torch.ops.aten.copy_.default:
                report.append(["copy", str(node.target)])
        raise SystemExit(print(json.dumps(report)))  # traced only: the kernels cannot run on the CPU

    return aot_module_simplified(gm, inputs, fw_compiler=inspect)


M, d, num_neurons, k = 16, 64, 256, 37  # k not a multiple of 16: the up output is a view of a padded buffer;
# M = 16: the dense path pads x to 16 rows otherwise (a copy of its own)
x, w, w2 = (torch.randn(shape, dtype=torch.bfloat16) for shape in ((M, d), (num_neurons, d), (num_neurons, d)))
index = torch.randperm(num_neurons)[:k]


def mlp(x, w, w2, index):
    hidden = torch.ops.polar.selective_up(x, w, None, index, 1) + torch.ops.polar.selective_gated_up(x, w, w2, index)
    return torch.ops.polar.selective_down(hidden, w2.t(), index, None)


with torch.no_grad():
    torch.compile(mlp, backend=backend, fullgraph=True)(x, w, w2, index)
"""


@pytest.mark.skipif(sg.triton is None, reason="needs triton")
@pytest.mark.parametrize("path", ["direct", "split", "dense"])
def test_compiled_up_ops_write_their_output_in_place(path):
    """The up ops return an (M, k) view of a buffer padded to 16 columns (empty_hidden). Inductor clones a view that
    a Triton kernel mutates before the launch and scatters it back into its buffer after it: two copies a layer,
    seen in the compiled OPT-6.7B decode step on the H100. The launchers hand their kernels the whole fresh buffer,
    which inductor's reinplacing writes in place. Checked on the graph inductor lowers (traced on the CPU against
    an sm_90 target, in a process without TRITON_INTERPRET: inductor analyses real JITFunctions), for the direct
    launch, the split launch with its finish kernel, and the dense path's gather kernel."""
    import json
    import os
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _UP_LAUNCHES_IN_PLACE, path], capture_output=True, text=True, env=env, timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = [clones for kind, clones in report if kind == "kernel"]
    assert len(kernels) >= 3, report  # both up ops and the down op were traced
    assert [clones for clones in kernels if clones] == [], report  # no launch clones a mutated argument
    assert [entry for entry in report if entry[0] == "copy"] == [], report  # and nothing is scattered back
