"""polar::skinny_linear: the kernel equals F.linear, the op takes the kernel only where it was measured faster.

The kernel runs through its launcher on CUDA, or on the CPU under TRITON_INTERPRET=1. Integer-valued inputs make
every product and sum exact in fp32 whatever the summation order, so kernel and F.linear must agree exactly
there; real-valued bf16 inputs on the GPU agree to the rounding of one fp32 sum. Sizes follow the device: tiny
on the CPU, model-sized on a GPU (``HYPOTHESIS_PROFILE=gpu pytest tests/ops/test_skinny_linear.py``).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from polar_compile.ops import skinny_linear as sk

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if ON_GPU:
    ROWS, COLUMNS, WIDTHS = (1, 5, 16, 17, 32, 64), (2048, 3584, 4096, 4100), (4096, 5000, 14336)
    DTYPES = (torch.bfloat16, torch.float16)
else:
    ROWS, COLUMNS, WIDTHS = (1, 2, 5, 16, 17, 33), (1, 7, 16, 33, 40), (1, 5, 32, 70)  # 70: 3 blocks of K, a tail
    DTYPES = (torch.float32,)


def _sizes_and_values(draw):
    """(M, N, K) and ``values(*shape)``: small integers (-2..2) of one drawn dtype on DEVICE."""
    rows, columns, width = (draw(st.sampled_from(choices)) for choices in (ROWS, COLUMNS, WIDTHS))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def values(*shape):
        return torch.randint(-2, 3, shape, generator=generator).to(DEVICE, dtype)

    return rows, columns, width, values


@st.composite
def problems(draw):
    """(x (M, K) or (M, 1, K), weight (N, K), each with a row stride > K or not, bias or None): small integers."""
    rows, columns, width, values = _sizes_and_values(draw)
    pad = draw(st.sampled_from([0, 3]))  # the weight as the first K columns of a wider buffer (row stride K + 3)
    weight = values(columns, width + pad)[:, :width]
    pad = draw(st.sampled_from([0, 5]))  # x's rows too (a row stride K + 5: the rows of a fused buffer)
    x = values(rows, 1, width + pad)[..., :width] if draw(st.booleans()) else values(rows, width + pad)[:, :width]
    return x, weight, values(columns) if draw(st.booleans()) else None


def _needs_kernel():
    from polar_compile.testing import kernel_device

    if kernel_device() is None:
        pytest.skip("no triton, or no CUDA and TRITON_INTERPRET != 1")


@pytest.mark.triton_kernel
@given(problem=problems())
def test_kernel_equals_f_linear_exactly_on_integer_inputs(problem):
    _needs_kernel()
    x, weight, bias = problem
    out = sk.launch_skinny_linear(x, weight, bias)
    assert out.shape == (*x.shape[:-1], weight.shape[0]) and out.dtype == x.dtype and out.device == x.device
    # the exact sum (integers below 2**24 are exact in the kernel's fp32), rounded once to the output dtype
    expected = F.linear(x.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu())
    torch.testing.assert_close(out.cpu(), expected.to(x.dtype), rtol=0, atol=0)


@given(problem=problems())
def test_op_equals_f_linear(problem):
    """The registered op: the kernel on CUDA where ``takes`` says so, F.linear everywhere else.

    The kernel sums integer products exactly in fp32, so it equals the exact sum rounded once. F.linear on CUDA
    does not: cuBLAS may reduce bf16/fp16 split-K partials in reduced precision (one ulp off at M = 5, K = 14336
    in session 25's H200 suite), so where the op falls back it must equal F.linear itself, bit for bit."""
    x, weight, bias = problem
    out = torch.ops.polar.skinny_linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    if x.is_cuda and not sk.takes(rows, weight.shape, x.dtype, x.device):
        expected = F.linear(x, weight, bias).cpu()
    else:  # the kernel, or F.linear on the CPU (fp32 sums of small integers are exact there)
        exact = F.linear(x.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu())
        expected = exact.to(x.dtype)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


@pytest.mark.skipif(not ON_GPU, reason="bf16 rounding of real-valued products: the GPU's tensor cores")
@pytest.mark.parametrize("rows,columns,width", [(16, 4096, 4096), (16, 4096, 14336), (9, 3584, 18944)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_valued_model_shapes_match_cublas_to_rounding(rows, columns, width, dtype):
    generator = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, 1, width, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(columns, width, generator=generator) / width**0.5).to(DEVICE, dtype)
    bias = torch.randn(columns, generator=generator).to(DEVICE, dtype)
    assert sk.takes(rows, weight.shape, dtype, x.device)
    out = torch.ops.polar.skinny_linear(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), bias.double())
    scale = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one rounding of outputs of magnitude ~1-4
    torch.testing.assert_close(out.double(), expected, rtol=scale, atol=4 * scale)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_kernel_is_captured_in_a_cuda_graph():
    x = torch.randn(16, 4096, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16) / 64
    sk.launch_skinny_linear(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sk.launch_skinny_linear(x, weight)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, F.linear(x, weight), rtol=2e-2, atol=2e-2)


def test_takes_only_the_measured_wins():
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    if sk.triton is None:
        assert not sk.takes(16, (4096, 4096), bf16, cuda)
        return
    assert sk.takes(16, (4096, 4096), bf16, cuda)  # o projection
    assert sk.takes(16, (4096, 14336), torch.float16, cuda)  # down projection
    assert sk.takes(sk.MIN_ROWS, (sk.MIN_COLUMNS, sk.MIN_COLUMNS), bf16, cuda)
    assert not sk.takes(sk.MAX_ROWS + 1, (4096, 4096), bf16, cuda)  # the step as fast on cuBLAS at M = 32
    assert not sk.takes(32, (4096, 14336), bf16, cuda)
    assert not sk.takes(sk.MIN_ROWS - 1, (4096, 4096), bf16, cuda)  # never timed against cuBLAS's GEMV kernels
    assert not sk.takes(1, (4096, 4096), bf16, cuda)
    assert not sk.takes(0, (4096, 4096), bf16, cuda)
    assert not sk.takes(16, (6144, 4096), bf16, cuda)  # q/k/v, gate/up: N > K
    assert not sk.takes(16, (sk.MIN_COLUMNS - 1, 4096), bf16, cuda)  # too few programs
    assert not sk.takes(16, (4096, 4096), torch.float32, cuda)
    assert not sk.takes(16, (4096, 4096), bf16, cpu)


@pytest.mark.parametrize(
    "x_shape,w_shape,bias_shape,dtype,match",
    [
        ((4, 8), (6, 9), None, None, "x must be"),
        ((4, 8), (6, 8, 1), None, None, "weight must be"),
        ((4, 8), (6, 8), (5,), None, "bias must be"),
        ((4, 8), (6, 8), None, torch.float64, "dtype mismatch"),
    ],
)
def test_bad_input_names_the_problem(x_shape, w_shape, bias_shape, dtype, match):
    x = torch.zeros(x_shape, device=DEVICE)
    weight = torch.zeros(w_shape, device=DEVICE, dtype=dtype or torch.float32)
    bias = None if bias_shape is None else torch.zeros(bias_shape, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        sk.skinny_linear(x, weight, bias)


@pytest.mark.triton_kernel
def test_kernel_refuses_more_rows_than_it_takes(kernel_device):
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float32
    x = torch.zeros(65, 8, device=kernel_device, dtype=dtype)
    with pytest.raises(ValueError, match="at most 64 rows"):
        sk.launch_skinny_linear(x, torch.zeros(4, 8, device=kernel_device, dtype=dtype))


@pytest.mark.skipif(not ON_GPU, reason="the dtype rule of the GPU kernel")
def test_kernel_refuses_fp32_on_the_gpu():
    x = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="x is torch.float32"):
        sk.launch_skinny_linear(x, torch.zeros(4, 8, device=DEVICE))


def test_empty_batch_gives_no_rows():
    out = torch.ops.polar.skinny_linear(torch.zeros(0, 1, 16, device=DEVICE), torch.zeros(4, 16, device=DEVICE), None)
    assert out.shape == (0, 1, 4)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    for rows, columns, width in ((3, 8, 16), (16, 2048, 2048) if ON_GPU else (16, 24, 40)):
        x = torch.randn(rows, 1, width, device=DEVICE, dtype=dtype)
        weight = torch.randn(columns, width, device=DEVICE, dtype=dtype)
        bias = torch.randn(columns, device=DEVICE, dtype=dtype) if with_bias else None
        torch.library.opcheck(torch.ops.polar.skinny_linear.default, (x, weight, bias))


def test_kernel_reads_a_strided_bias_right(kernel_device):
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float32  # the CUDA kernel takes 16-bit only
    generator = torch.Generator().manual_seed(0)  # small integers: exact sums in either dtype

    def integers(*shape):
        return torch.randint(-2, 3, shape, generator=generator).to(kernel_device, dtype)

    x, weight, bias = integers(4, 64), integers(32, 64), integers(32, 2)[:, 1]
    out = sk.launch_skinny_linear(x, weight, bias)
    assert torch.equal(out.cpu(), F.linear(x.cpu().double(), weight.cpu().double(), bias.cpu().double()).to(dtype))


@pytest.mark.triton_kernel
def test_kernel_reads_x_with_a_row_stride_right(kernel_device):
    """x as the first K columns of a wider buffer (row stride K + 6): a kernel that stepped rows by K read the wrong
    rows in silence."""
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float32  # small integers: exact sums either way
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (5, 70), generator=generator).to(kernel_device, dtype)[:, :64]
    weight = torch.randint(-2, 3, (24, 64), generator=generator).to(kernel_device, dtype)
    out = sk.launch_skinny_linear(x, weight)
    assert torch.equal(out.cpu(), F.linear(x.cpu().double(), weight.cpu().double()).to(dtype))


# --------------------------------------------------------------------------------------------------
# polar::skinny_gated_linear: silu(x @ Wg.T) * (x @ Wu.T) in one kernel
# --------------------------------------------------------------------------------------------------


def _gated_exact(x, gate, up):
    """The products summed exactly (double), then SiLU and the product: what the kernel computes in fp32."""
    x, gate, up = (t.double().cpu() for t in (x, gate, up))
    return F.silu(F.linear(x, gate)) * F.linear(x, up)


@st.composite
def gated_problems(draw):
    """(x (M, K) or (M, 1, K), gate (F, K), up (F, K)), small integers; the weights may be rows of one wider
    buffer (a row stride > K) or the two halves of one packed [Wg; Wu]."""
    rows, columns, width, values = _sizes_and_values(draw)
    pad = draw(st.sampled_from([0, 3]))
    packed = values(2 * columns, width + pad)[:, :width]
    gate, up = (packed[:columns], packed[columns:]) if draw(st.booleans()) else (packed[columns:], packed[:columns])
    x = values(rows, 1, width) if draw(st.booleans()) else values(rows, width)
    return x, gate, up


@pytest.mark.triton_kernel
@given(problem=gated_problems())
def test_gated_kernel_equals_silu_gate_times_up(problem):
    _needs_kernel()
    x, gate, up = problem
    out = sk.launch_skinny_gated_linear(x, gate, up)
    assert out.shape == (*x.shape[:-1], gate.shape[0]) and out.dtype == x.dtype and out.device == x.device
    # exact products; SiLU and the product in fp32, then one rounding to the output dtype (fp16 overflows to inf
    # past 65504, as the expression itself would)
    expected = _gated_exact(x, gate, up).to(x.dtype).double()
    scale = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[x.dtype]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=scale, atol=scale)


@given(problem=gated_problems())
def test_gated_op_equals_its_expression(problem):
    """The op: the kernel where ``takes_gated`` says so, else ``silu(F.linear(x, Wg)) * F.linear(x, Wu)``."""
    x, gate, up = problem
    out = torch.ops.polar.skinny_gated_linear(x, gate, up)
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    if sk.takes_gated(rows, gate.shape, x.dtype, x.device):
        scale = 2.0**-7 if x.dtype == torch.bfloat16 else 2.0**-10
        expected = _gated_exact(x, gate, up).to(x.dtype).double()  # fp16: inf past 65504 on both sides
        torch.testing.assert_close(out.cpu().double(), expected, rtol=scale, atol=scale)
    else:
        assert torch.equal(out, F.silu(F.linear(x, gate)) * F.linear(x, up))


@pytest.mark.skipif(not ON_GPU, reason="bf16 rounding of real-valued products: the GPU's tensor cores")
@pytest.mark.parametrize(
    "rows,columns,width", [(16, 14336, 4096), (9, 18944, 3584), (64, 14336, 4096), (32, 18944, 3584)]
)
def test_gated_real_valued_model_shapes_match_the_expression(rows, columns, width):
    generator = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, 1, width, generator=generator).to(DEVICE, torch.bfloat16)
    packed = (torch.randn(2 * columns, width, generator=generator) / width**0.5).to(DEVICE, torch.bfloat16)
    gate, up = packed[:columns], packed[columns:]
    assert sk.takes_gated(rows, gate.shape, torch.bfloat16, x.device)
    out = torch.ops.polar.skinny_gated_linear(x, gate, up)
    torch.testing.assert_close(out.double(), _gated_exact(x, gate, up).cuda(), rtol=2.0**-7, atol=2.0**-7)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_gated_kernel_is_captured_in_a_cuda_graph():
    x = torch.randn(16, 4096, device=DEVICE, dtype=torch.bfloat16)
    gate, up = (torch.randn(2048, 4096, device=DEVICE, dtype=torch.bfloat16) / 64 for _ in range(2))
    sk.launch_skinny_gated_linear(x, gate, up)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sk.launch_skinny_gated_linear(x, gate, up)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, F.silu(F.linear(x, gate)) * F.linear(x, up), rtol=2e-2, atol=2e-2)


def test_takes_gated_only_the_measured_rows():
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    if sk.triton is None:
        assert not sk.takes_gated(16, (14336, 4096), bf16, cuda)
        return
    assert sk.takes_gated(16, (14336, 4096), bf16, cuda)  # Llama-3-8B: F > K, unlike the plain rule
    assert sk.takes_gated(sk.MIN_ROWS, (sk.MIN_COLUMNS, 4096), torch.float16, cuda)
    assert sk.takes_gated(sk.MAX_ROWS + 1, (14336, 4096), bf16, cuda)  # wider than the plain rule: M = 32, 64 timed
    assert sk.takes_gated(sk.MAX_GATED_ROWS, (14336, 4096), bf16, cuda)
    assert not sk.takes_gated(sk.MAX_GATED_ROWS + 1, (14336, 4096), bf16, cuda)
    assert not sk.takes_gated(sk.MIN_ROWS - 1, (14336, 4096), bf16, cuda)
    assert not sk.takes_gated(16, (sk.MIN_COLUMNS - 1, 4096), bf16, cuda)
    assert not sk.takes_gated(16, (14336, 4096), torch.float32, cuda)
    assert not sk.takes_gated(16, (14336, 4096), bf16, torch.device("cpu"))


@pytest.mark.parametrize(
    "x_shape,gate_shape,up_shape,dtype,match",
    [
        ((4, 8), (6, 9), (6, 9), None, "x must be .* to match gate_weight"),
        ((4, 8), (6, 8, 1), (6, 8, 1), None, "gate_weight must be \\(N, K\\)"),
        ((4, 8), (6, 8), (5, 8), None, "up_weight must have gate_weight's shape"),
        ((4, 8), (6, 8), (6, 8), torch.float64, "dtype mismatch: x is torch.float32 but up_weight"),
    ],
)
def test_gated_bad_input_names_the_problem(x_shape, gate_shape, up_shape, dtype, match):
    x = torch.zeros(x_shape, device=DEVICE)
    gate = torch.zeros(gate_shape, device=DEVICE)
    up = torch.zeros(up_shape, device=DEVICE, dtype=dtype or torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        sk.skinny_gated_linear(x, gate, up)


def test_gated_empty_batch_gives_no_rows():
    gate = torch.zeros(4, 16, device=DEVICE)
    out = torch.ops.polar.skinny_gated_linear(torch.zeros(0, 1, 16, device=DEVICE), gate, gate)
    assert out.shape == (0, 1, 4)


def test_gated_opcheck():
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    for rows, columns, width in ((3, 8, 16), (16, 2048, 2048) if ON_GPU else (16, 24, 40)):
        x = torch.randn(rows, 1, width, device=DEVICE, dtype=dtype)
        packed = torch.randn(2 * columns, width, device=DEVICE, dtype=dtype)
        torch.library.opcheck(torch.ops.polar.skinny_gated_linear.default, (x, packed[:columns], packed[columns:]))
