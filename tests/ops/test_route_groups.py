"""polar::route_groups: properties of the op and of the real Triton kernel.

Every property runs against the registered op (CPU: the reference; CUDA: the kernel) and against the kernel
through its launcher (CUDA, or the CPU under TRITON_INTERPRET=1). Integer-valued inputs make every score exact
in fp32 whatever the summation order, so kernel and reference must agree exactly, ties included (small
integers tie often). Sizes follow the device: tiny on the CPU, model-sized on a GPU
(``HYPOTHESIS_PROFILE=gpu pytest tests/ops/test_route_groups.py``).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polar_compile.ops import route_groups as rg

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if ON_GPU:
    MAX_ROWS, WIDTHS, GROUPS = 256, (2048, 4096, 9216), (1, 3, 8, 32, 40, 72)
    DTYPES = (torch.bfloat16, torch.float16)
else:
    MAX_ROWS, WIDTHS, GROUPS = 20, (1, 7, 16, 33, 100, 1100), (1, 2, 3, 8, 13, 32)  # 1100: 3 slices of d
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _impl_params(fn):
    """The op and both kernel paths through the launcher (skipped where no kernel can run)."""
    kernel = pytest.mark.triton_kernel
    return pytest.mark.parametrize(
        "which",
        [
            "op",
            pytest.param("rows", id="rows-kernel", marks=kernel),
            pytest.param("partial", id="partial-kernels", marks=kernel),
        ],
    )(fn)


def _run(which, hidden, weight, bias, k):
    if which == "op":
        return torch.ops.polar.route_groups(hidden, weight, bias, k)
    from polar_compile.testing import kernel_device

    if kernel_device() is None:
        pytest.skip("no triton, or no CUDA and TRITON_INTERPRET != 1")
    return rg.launch_route_groups(hidden, weight, bias, k, row_kernel=which == "rows")


@st.composite
def problems(draw, *, integer=True):
    """(hidden (N, 1, d), weight (G, d) with a row stride > d or not, bias or None, k): small integer values (exact
    sums, frequent ties)."""
    rows = draw(st.integers(0 if not ON_GPU else 1, MAX_ROWS))
    width = draw(st.sampled_from(WIDTHS))
    groups = draw(st.sampled_from(GROUPS))
    k = draw(st.integers(1, groups))
    dtype = draw(st.sampled_from(DTYPES))
    has_bias = draw(st.booleans())
    spread = draw(st.sampled_from([1, 3]))  # 1: values in {-1, 0, 1}, many ties
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def values(*shape):
        return torch.randint(-spread, spread + 1, shape, generator=generator).to(DEVICE, dtype)

    bias = values(groups) if has_bias else None
    pad = draw(st.sampled_from([0, 5]))  # the weight as the first d columns of a wider buffer (row stride d + 5)
    return values(rows, 1, width), values(groups, width + pad)[:, :width], bias, k


def _exact_scores(hidden, weight, bias):
    scores = hidden.reshape(-1, weight.shape[1]).double() @ weight.double().T
    return scores if bias is None else scores + bias.double()


@_impl_params
@given(problem=problems())
def test_picks_the_k_best_groups_best_first_ties_to_the_lower_index(which, problem):
    hidden, weight, bias, k = problem
    out = _run(which, hidden, weight, bias, k)
    rows, groups = hidden.shape[0], weight.shape[0]
    assert out.shape == (rows, k) and out.dtype == torch.int64 and out.device == hidden.device
    scores = _exact_scores(hidden, weight, bias).cpu()
    out = out.cpu()
    for row in range(rows):
        chosen = out[row].tolist()
        assert len(set(chosen)) == k and all(0 <= g < groups for g in chosen)
        # best first, equal scores in index order: exactly the (-score, index) order
        expected = sorted(range(groups), key=lambda g: (-scores[row, g].item(), g))[:k]
        assert chosen == expected
    torch.testing.assert_close(out, rg.route_groups_reference(hidden, weight, bias, k).cpu(), rtol=0, atol=0)


@_impl_params
@given(problem=problems())
def test_chosen_set_equals_topk_values_on_real_valued_inputs(which, problem):
    hidden, weight, bias, k = problem
    # real-valued inputs: the chosen groups' scores must be the k largest (up to fp32 summation order)
    generator = torch.Generator().manual_seed(hidden.numel() + k)
    hidden = torch.randn(hidden.shape, generator=generator).to(hidden)
    weight = torch.randn(weight.shape, generator=generator).to(weight)
    bias = None if bias is None else torch.randn(bias.shape, generator=generator).to(bias)
    out = _run(which, hidden, weight, bias, k).cpu()
    scores = _exact_scores(hidden, weight, bias).cpu()
    if scores.shape[0] == 0:
        return
    picked = scores.gather(1, out).sort(dim=1, descending=True).values
    best = scores.topk(k, dim=1).values
    tolerance = 1e-4 * (hidden.double().abs().cpu().reshape(scores.shape[0], -1) @ weight.double().abs().cpu().T)
    torch.testing.assert_close(picked, best, rtol=0, atol=float(tolerance.max()) + 1e-6)


@_impl_params
def test_nan_scores_rank_first_and_rows_are_independent(which):
    dtype = torch.float32 if not ON_GPU else torch.bfloat16
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], device=DEVICE, dtype=dtype)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -1.0]], device=DEVICE, dtype=dtype)
    bias = torch.tensor([0.0, float("nan"), 0.0, 0.25], device=DEVICE, dtype=dtype)
    out = _run(which, hidden, weight, bias, 3).cpu()
    assert out[0].tolist() == [1, 2, 0]  # scores 1, NaN, 2, 0.25: NaN first
    assert out[1].tolist() == [1, 0, 2]  # 0, NaN, 0, -0.75: the tie 0 / 0 in index order
    assert out[2].tolist() == [1, 3, 0]  # 0, NaN, 0, 0.25


@_impl_params
def test_leading_dims_become_rows_and_strided_hidden_is_read_right(which):
    generator = torch.Generator().manual_seed(1)
    base = torch.randint(-2, 3, (4, 3, 2 * 40), generator=generator).float().to(DEVICE)
    hidden = base[..., ::2]  # (4, 3, 40) with a stride of 2 along d
    weight = torch.randint(-2, 3, (8, 40), generator=generator).float().to(DEVICE)
    out = _run(which, hidden, weight, None, 5)
    assert out.shape == (12, 5)
    expected = rg.route_groups_reference(hidden.contiguous(), weight, None, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_empty_batch_gives_no_rows():
    out = torch.ops.polar.route_groups(torch.zeros(0, 1, 16, device=DEVICE), torch.zeros(4, 16, device=DEVICE),
                                       None, 2)  # fmt: skip
    assert out.shape == (0, 2)


# --------------------------------------------------------------------------------------------------
# Errors, opcheck, compile
# --------------------------------------------------------------------------------------------------


def _bad_cases():
    x, w, b = torch.zeros(2, 1, 16), torch.zeros(4, 16), torch.zeros(4)
    return [
        ((x.int(), w.int(), None, 2), TypeError, "takes"),
        ((x, w.double(), b, 2), TypeError, "dtype mismatch"),
        ((x, w, b.half(), 2), TypeError, "dtype mismatch"),
        ((torch.zeros(2, 1, 8), w, b, 2), ValueError, "d=16"),
        ((x, torch.zeros(4, 16, 1), b, 2), ValueError, r"\(G, d\)"),
        ((x, w, torch.zeros(5), 2), ValueError, r"bias must be \(G=4,\)"),
        ((x, w, b, 0), ValueError, r"k must lie in \[1, G=4\]"),
        ((x, w, b, 5), ValueError, r"k must lie in \[1, G=4\]"),
        ((x, w, b, 2.0), TypeError, "k must be a Python int"),
        ((torch.zeros(2, 0), torch.zeros(4, 0), b, 2), ValueError, "weight has d = 0"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_named_errors(case):
    args, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        rg.route_groups(*args)


@pytest.mark.triton_kernel
def test_launcher_checks_before_launch_and_limits_groups(kernel_device):
    x = torch.zeros(2, 8, device=kernel_device)
    with pytest.raises(TypeError, match="Triton kernel takes"):
        rg.launch_route_groups(x.double(), torch.zeros(4, 8, device=kernel_device).double(), None, 2)
    with pytest.raises(ValueError, match=f"at most {rg.MAX_GROUPS} groups"):
        rg.launch_route_groups(x, torch.zeros(rg.MAX_GROUPS + 1, 8, device=kernel_device), None, 2)


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    generator = torch.Generator().manual_seed(case)
    rows, width, groups, k, has_bias = [(3, 16, 8, 4, True), (1, 33, 3, 3, False), (5, 64, 32, 7, True)][case]
    hidden = torch.randint(-3, 4, (rows, 1, width), generator=generator).float().to(DEVICE)
    weight = torch.randint(-3, 4, (groups, width), generator=generator).float().to(DEVICE)
    bias = torch.randint(-3, 4, (groups,), generator=generator).float().to(DEVICE) if has_bias else None
    torch.library.opcheck(torch.ops.polar.route_groups.default, (hidden, weight, bias, k))


def test_compiles_without_graph_breaks_and_matches_eager():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randint(-3, 4, (6, 1, 32), generator=generator).float().to(DEVICE)
    weight = torch.randint(-3, 4, (8, 32), generator=generator).float().to(DEVICE)
    bias = torch.randint(-3, 4, (8,), generator=generator).float().to(DEVICE)

    def route(hidden):
        return rg.route_groups(hidden * 2, weight, bias, 4)

    compiled = torch.compile(route, fullgraph=True)(hidden)
    torch.testing.assert_close(compiled, route(hidden), rtol=0, atol=0)


@pytest.mark.skipif(not ON_GPU, reason="the op takes the kernels on CUDA only")
@pytest.mark.gpu
def test_op_routes_more_groups_than_the_kernels_take_through_the_reference():
    generator = torch.Generator().manual_seed(3)
    groups = rg.MAX_GROUPS + 8
    hidden = torch.randint(-3, 4, (16, 1, 256), generator=generator).to("cuda", torch.bfloat16)
    weight = torch.randint(-3, 4, (groups, 256), generator=generator).to("cuda", torch.bfloat16)
    out = torch.ops.polar.route_groups(hidden, weight, None, 40)
    torch.testing.assert_close(out, rg.route_groups_reference(hidden, weight, None, 40), rtol=0, atol=0)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
@pytest.mark.gpu
@pytest.mark.triton_kernel
def test_cuda_graph_replay_follows_new_inputs():
    torch.manual_seed(0)
    hidden = torch.randn(64, 1, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(8, device="cuda", dtype=torch.bfloat16)
    rg.route_groups(hidden, weight, bias, 4)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rg.route_groups(hidden, weight, bias, 4)
    hidden.copy_(torch.randn_like(hidden))
    graph.replay()
    torch.testing.assert_close(out, rg.route_groups(hidden, weight, bias, 4), rtol=0, atol=0)


@pytest.mark.parametrize("row_kernel", [True, False])
def test_kernels_read_a_strided_bias_right(kernel_device, row_kernel):
    """A bias view with a stride (a column of a (G, 2) tensor) picked the wrong groups in silence."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 64, device=kernel_device), torch.randn(8, 64, device=kernel_device)
    bias = (10 * torch.randn(8, 2, device=kernel_device))[:, 0]
    assert bias.stride() == (2,)
    out = rg.launch_route_groups(hidden, weight, bias, 3, row_kernel=row_kernel)
    assert torch.equal(out.cpu(), rg.route_groups_reference(hidden, weight, bias, 3).cpu())


@pytest.mark.triton_kernel
@pytest.mark.parametrize("row_kernel", [True, False])
def test_kernels_read_a_column_slice_of_a_wider_weight_right(kernel_device, row_kernel):
    """The router weight as the first d columns of a wider buffer (row stride d + 8): a kernel that stepped rows by d
    scored the wrong weights in silence."""
    torch.manual_seed(0)
    hidden, bias = torch.randn(5, 32, device=kernel_device), torch.randn(8, device=kernel_device)
    weight = torch.randn(8, 40, device=kernel_device)[:, :32]
    out = rg.launch_route_groups(hidden, weight, bias, 3, row_kernel=row_kernel)
    assert torch.equal(out.cpu(), rg.route_groups_reference(hidden, weight.contiguous(), bias, 3).cpu())
