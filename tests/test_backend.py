"""The polar backend: registration, modes, graphs it must leave alone, and inductor."""

import pytest
import torch

import polar_compile
from polar_compile.backend import compile_reports, ensure_registered, polar_backend
from polar_compile.config import SparsityConfig
from polar_compile.routers.modules import PolarRouters
from polar_compile.testing import TINY_MODELS
from tests.compiler_helpers import generate, max_logit_difference, prompt_batch, quick_routers


def test_backend_name_resolves_once():
    from torch._dynamo.backends.registry import lookup_backend

    ensure_registered()
    ensure_registered()  # a second call must not register the name twice (that would raise)
    assert lookup_backend("polar") is polar_backend


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode"):
        polar_backend(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], mode="fast")


def test_unknown_blas_option_is_refused():
    with pytest.raises(ValueError, match="polar.blas"):
        polar_backend(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], options={"polar.blas": "cublas"})


def test_blas_choice_holds_only_during_each_call(monkeypatch):
    # the wrapper sets torch's preferred BLAS library around every call of the compiled graph and restores the
    # caller's choice afterwards, also when the call raises (a CPU build cannot set cuBLASLt: recorded here)
    from polar_compile import backend

    state = {"current": "cublas"}

    def preferred_blas_library(value=None):
        if value is not None:
            state["current"] = value
        return state["current"]

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred_blas_library)
    seen = []

    def compiled(*args):
        seen.append(state["current"])
        if args and args[0] == "raise":
            raise RuntimeError("boom")
        return args

    call = backend._wrapped(compiled, (), "cublaslt")
    assert call(1, 2) == (1, 2)
    assert seen == ["cublaslt"] and state["current"] == "cublas"
    with pytest.raises(RuntimeError, match="boom"):
        call("raise")
    assert seen[-1] == "cublaslt" and state["current"] == "cublas"
    assert backend._wrapped(compiled, (), "torch") is compiled  # nothing to check, nothing to set: no wrapper


def test_blas_choice_falls_back_to_torch_where_it_cannot_be_set(monkeypatch, caplog):
    from polar_compile import backend

    def preferred_blas_library(value=None):
        if value == "cublaslt":
            raise RuntimeError("Cannot set preferred backend to cuBLASLt")
        return "cublas"

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred_blas_library)
    with caplog.at_level("WARNING", logger="polar_compile.backend"):
        assert backend._resolve_blas("cublaslt", on_cuda=True) == "torch"
    assert "not available" in caplog.text
    assert backend._resolve_blas("cublaslt", on_cuda=False) == "torch"  # CPU graphs: nothing to choose
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", lambda value=None: value or "cublas")
    assert backend._resolve_blas("cublaslt", on_cuda=True) == "cublaslt"


def test_blas_option_is_inert_without_cuda_inputs():
    # CPU graphs (and CPU builds, where setting cuBLASLt raises) run with torch's setting untouched
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    x = torch.randn(3, 2)
    compiled = polar_backend(gm, [x], options={"polar.inductor": False, "polar.blas": "cublaslt"})
    assert compiled == gm.forward  # the graph itself, not wrapped
    assert torch.equal(compiled(x), gm(x))


def test_model_without_routers_compiles_dense_and_untouched():
    model = TINY_MODELS["llama-gqa"]()
    ids = torch.randint(0, 256, (2, 5))
    expected = model(ids).logits
    compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, fullgraph=True)
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-5)
    assert compile_reports[-1].counters.get("attention", 0) == 0


def test_prefill_graph_stays_dense_with_a_reason():
    model = TINY_MODELS["mistral"]()
    polar_compile.optimize(model, quick_routers("mistral"), SparsityConfig(attention_density=0.5))
    ids = torch.randint(0, 256, (2, 5))
    expected = model(ids).logits  # eager: hooks inactive, dense
    compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, fullgraph=True)
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-5)
    report = compile_reports[-1]
    assert report.counters.get("attention", 0) == 0
    assert report.counters["anchors_removed"] == model.config.num_hidden_layers  # layer 0: no router
    assert all("query length 5" in row.detail for row in report.layers if not row.rewritten)


def test_unmatchable_graph_stays_dense_with_a_reason():
    # eager attention: no SDPA node behind the q projection, so nothing may be rewritten
    model = TINY_MODELS["llama-gqa"]()
    model.config._attn_implementation = "eager"
    ids, mask = prompt_batch(model.config.vocab_size)
    dense = generate(model, ids, mask)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    polar = generate(model, ids, mask)
    assert torch.equal(dense.sequences, polar.sequences)
    assert max_logit_difference(dense, polar) < 1e-4
    report = compile_reports[-1]
    assert report.counters.get("attention", 0) == 0
    assert all(not row.rewritten and "scaled_dot_product_attention" in row.detail for row in report.layers)
    assert "dense: no scaled_dot_product_attention" in str(polar_compile.explain(model))


@pytest.mark.slow
def test_inductor_path_matches_dense_at_density_one():
    model = TINY_MODELS["qwen2"]()
    ids, mask = prompt_batch(model.config.vocab_size)
    dense = generate(model, ids, mask, new_tokens=4)
    polar_compile.optimize(model, quick_routers("qwen2"), SparsityConfig(attention_density=1.0), mode="default")
    polar = generate(model, ids, mask, new_tokens=4)
    assert compile_reports[-1].inductor and compile_reports[-1].counters["attention"] == 2
    # q/k/v (with biases) and gate/up of every layer run as one GEMM each, through inductor's as_strided
    assert compile_reports[-1].counters["fused_projection_groups"] == 2 * model.config.num_hidden_layers
    assert torch.equal(dense.sequences, polar.sequences)
    assert max_logit_difference(dense, polar) < 1e-4


@pytest.mark.parametrize(
    ("mode", "options", "message"),
    [
        ("turbo", None, "unknown mode 'turbo'"),
        (None, ["polar.inductor"], "options must be a dict"),
        (
            None,
            {"polar.skinny_linear": False},
            "unknown option 'polar.skinny_linear' \\(did you mean 'polar.skinny_linears'",
        ),
        (None, {"polar.blass": "torch"}, "unknown option 'polar.blass' \\(did you mean 'polar.blas'"),
        (None, {"polar.inductor": "false"}, "'polar.inductor' must be True or False"),
        (None, {"polar.inductor": False, "max_autotune": True}, "inductor options \\['max_autotune'\\] do nothing"),
        (None, {"max_autotun": True}, "inductor has no option 'max_autotun' \\(did you mean 'max_autotune'"),
    ],
)
def test_a_misspelt_or_misplaced_option_is_refused_by_name(mode, options, message):
    """A typo in a polar option was ignored in silence (or, with inductor on, failed inside inductor at the first
    call); optimize checks before it touches the model."""
    from polar_compile.backend import check_options

    with pytest.raises(ValueError, match=message):
        check_options(mode, options)
    model = TINY_MODELS["llama-gqa"]()
    kwargs = {"mode": mode} if options is None else {"options": options}
    with pytest.raises(ValueError, match=message):
        polar_compile.optimize(model, PolarRouters.for_model(model, density=0.5), **kwargs)
    assert not hasattr(model, "_polar_plan")
    check_options("reduce-overhead", None)
    check_options(None, {"polar.inductor": False, "polar.blas": "torch", "polar.skinny_linears": False})
    check_options(None, {"triton.cudagraphs": True, "polar.skinny_linears": True})


def _lean_decode(model, compiled, steps: int = 3):
    """A static-cache decode loop as examples/torch_compile_backend.py writes it: eager prefill, compiled steps."""
    import inspect

    from transformers import StaticCache

    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        token = model(ids, **{name: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        for step in range(steps):
            position = torch.tensor([ids.shape[1] + step])
            token = compiled(token, **{name: cache}, cache_position=position, use_cache=True).logits.argmax(-1)


def test_symbolic_shapes_that_leave_every_layer_dense_say_so(caplog):
    """torch.compile(..., dynamic=True) decoded dense with no word (every layer: 'softmax scale is not a
    constant'): the backend now warns and names dynamic=False."""
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, dynamic=True)
    with caplog.at_level("WARNING", logger="polar_compile.backend"):
        _lean_decode(model, compiled)
    said = [r.getMessage() for r in caplog.records if r.name == "polar_compile.backend"]
    assert said and "symbolic shapes" in said[0] and "dynamic=False" in said[0], said


def test_a_model_without_routers_through_the_backend_says_it_compiles_dense(caplog):
    """torch.compile(model, backend="polar") on a model that optimize never gave routers compiled a plain dense graph
    with no word but an INFO line; it now warns and names optimize. With routers, no such warning."""
    for routed in (False, True):
        model = TINY_MODELS["llama-gqa"]()
        if routed:
            polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
        compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, dynamic=False)
        caplog.clear()
        with caplog.at_level("WARNING", logger="polar_compile.backend"):
            _lean_decode(model, compiled)
        said = [r.getMessage() for r in caplog.records if r.name == "polar_compile.backend"]
        if routed:
            assert not said, said
        else:
            assert len(said) == 1 and "3 attention calls and no polar routers compiles dense" in said[0], said
            assert "polar_compile.optimize(model, routers)" in said[0]


def test_a_prefill_through_the_backend_does_not_hide_the_decode_graph_in_explain():
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, dynamic=False)
    _lean_decode(model, compiled)
    assert polar_compile.explain(model).rewritten_layers == [1, 2]
    with torch.no_grad():
        compiled(torch.randint(3, 256, (2, 6)))  # a prompt through the compiled model: a prefill graph
    assert "prefill" in compile_reports[-1].layers[0].detail
    assert polar_compile.explain(model).rewritten_layers == [1, 2]


def test_cuda_graphs_get_combo_kernels_unless_the_options_say_otherwise():
    from polar_compile.backend import inductor_patches

    cuda = inductor_patches("reduce-overhead", {}, on_cuda=True)
    assert cuda["combo_kernels"] is True and cuda["triton.cudagraphs"] is True  # the mode's options are kept
    assert inductor_patches(None, {"combo_kernels": False}, on_cuda=True)["combo_kernels"] is False
    assert "combo_kernels" not in inductor_patches(None, {}, on_cuda=False)  # CPU graphs: inductor's own default
    from torch._inductor import config as inductor_config

    assert "combo_kernels" in inductor_config.get_config_copy()  # a key this torch's inductor has


def test_a_graph_that_fails_with_our_inductor_default_compiles_again_without_it(monkeypatch, caplog):
    """combo_kernels is on by our choice, not the user's: if inductor cannot compile a graph with it, the user
    still gets the compiled graph (without it) and a warning; a failure with the user's own options propagates."""
    import torch._inductor.compile_fx as compile_fx_module

    from polar_compile.backend import inductor_compile, inductor_patches

    calls = []

    def fake_compile_fx(gm, example_inputs, config_patches):
        calls.append(dict(config_patches))
        if config_patches.get("combo_kernels"):
            raise RuntimeError("combo kernel codegen failed\nlong trace")
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    patches = inductor_patches("reduce-overhead", {}, on_cuda=True)
    with caplog.at_level("WARNING", logger="polar_compile.backend"):
        compiled = inductor_compile(gm, [torch.zeros(2, 4)], patches, {})
    assert [c.get("combo_kernels") for c in calls] == [True, None]
    assert calls[1]["triton.cudagraphs"] is True  # the rest of the patches kept
    assert "inductor failed with ['combo_kernels'] on (RuntimeError: combo kernel codegen failed)" in caplog.text
    assert compiled(torch.ones(2, 4)).shape == (2, 4)
    calls.clear()
    user = {"combo_kernels": True}
    with pytest.raises(RuntimeError, match="combo kernel codegen failed"):  # the user asked for it: no retry
        inductor_compile(gm, [torch.zeros(2, 4)], inductor_patches(None, user, on_cuda=True), user)
    assert len(calls) == 1
