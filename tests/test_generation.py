"""polar_compile/generation.py: generate's deferred stop check (on only inside a polar model's generate, on CUDA,
undone by restore; the same tokens with and without it, on CUDA where it runs), and the compiled call that takes
only decode steps (prefill, chunked or not, stays eager)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessorList
from transformers.generation.utils import DeferredStopCheck

import polar_compile
from polar_compile import generation
from polar_compile.compiler import restore
from polar_compile.config import SparsityConfig
from polar_compile.routers.modules import PolarRouters
from polar_compile.testing import TINY_MODELS
from tests.compiler_helpers import generate, max_logit_difference, prompt_batch, quick_routers

CUDA = torch.device("cuda")
# The compile-path tests run on the CPU here and in CI, and on CUDA too where there is one (inductor + CUDA graphs).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _AskTransformers:
    """A logits processor that asks transformers, mid-generate, whether it would defer its stop check on CUDA."""

    def __init__(self, cache=None, cache_is_returned=False, is_assistant=False):
        self.arguments = (cache, cache_is_returned, is_assistant)
        self.answers: list[bool] = []

    def __call__(self, input_ids, scores):
        self.answers.append(bool(DeferredStopCheck.is_supported(CUDA, *self.arguments)))
        return scores


def _ask_during_generate(model, **arguments) -> list[bool]:
    ids, mask = prompt_batch(model.config.vocab_size)
    asker = _AskTransformers(**arguments)
    generate(model, ids, mask, new_tokens=3, logits_processor=LogitsProcessorList([asker]))
    return asker.answers


class _Cache:
    def __init__(self, croppable: bool):
        self.is_croppable = croppable


def test_cuda_defers_only_inside_an_optimized_models_generate():
    model = TINY_MODELS["llama-gqa"]()
    assert _ask_during_generate(model) == [False] * 3  # stock transformers: "mps" only
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    assert model._polar_plan.defers_stop_check
    assert _ask_during_generate(model) == [True] * 3
    # transformers' own rules still apply: no deferral for assistants, or for a returned cache it cannot crop
    assert _ask_during_generate(model, is_assistant=True) == [False] * 3
    assert _ask_during_generate(model, cache=_Cache(False), cache_is_returned=True) == [False] * 3
    assert _ask_during_generate(model, cache=_Cache(True), cache_is_returned=True) == [True] * 3
    assert _ask_during_generate(model, cache=_Cache(False), cache_is_returned=False) == [True] * 3
    # outside generate, and for other devices, nothing changes
    assert not DeferredStopCheck.is_supported(CUDA, None, False, False)
    assert not generation._ACTIVE.get()
    restore(model)
    assert "generate" not in model.__dict__
    assert _ask_during_generate(model) == [False] * 3


def test_other_devices_keep_transformers_answer():
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    answers = []

    def ask(input_ids, scores):
        answers.append((DeferredStopCheck.is_supported(torch.device("cpu"), None, False, False),
                        DeferredStopCheck.is_supported(torch.device("mps"), None, False, False)))  # fmt: skip
        return scores

    ids, mask = prompt_batch(model.config.vocab_size)
    generate(model, ids, mask, new_tokens=2, logits_processor=LogitsProcessorList([ask]))
    assert answers == [(False, True)] * 2


def test_defer_stop_check_off_leaves_generate_alone():
    model = TINY_MODELS["llama-gqa"]()
    config = SparsityConfig(attention_density=0.5, defer_stop_check=False)
    polar_compile.optimize(model, quick_routers("llama-gqa"), config)
    assert not model._polar_plan.defers_stop_check
    assert "generate" not in model.__dict__
    assert _ask_during_generate(model) == [False] * 3


def test_restore_gives_back_an_instance_generate_set_before():
    model = TINY_MODELS["llama-gqa"]()
    calls = []
    stock = model.generate

    def users_generate(*args, **kwargs):
        calls.append(1)
        return stock(*args, **kwargs)

    model.generate = users_generate
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    assert _ask_during_generate(model) == [True] * 3
    assert calls == [1]  # ours wraps theirs, it does not bypass it
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))  # again
    restore(model)
    assert model.generate is users_generate


def test_config_rejects_a_non_boolean():
    with pytest.raises(ValueError, match="defer_stop_check must be True or False"):
        SparsityConfig(defer_stop_check="yes")


class _Never:
    @staticmethod
    def is_supported(device, cache, cache_is_returned, is_assistant):
        return False  # defers nowhere: handing CUDA the "mps" answer would not defer either


class _Everywhere:
    @staticmethod
    def is_supported(device, cache, cache_is_returned, is_assistant):
        return not is_assistant  # a transformers that defers on CUDA by itself


class _OtherSignature:
    @staticmethod
    def is_supported(device, cache):
        return True


@pytest.mark.parametrize(
    "changed, message",
    [(_Never, "no longer defers on 'mps'"), (_OtherSignature, "takes ['device', 'cache']"), (None, "no DeferredStop")],
)
def test_install_refuses_a_transformers_it_does_not_recognise(monkeypatch, caplog, changed, message):
    monkeypatch.setattr(generation, "_install_result", [])
    monkeypatch.setattr(generation, "_deferred_stop_check_class", lambda: changed)
    with caplog.at_level("WARNING", logger="polar_compile.generation"):
        reason = generation.install()
    assert message in reason
    assert "keeps its per-step stop check" in caplog.text
    model = TINY_MODELS["llama-gqa"]()
    assert not generation.wrap_generate(model)
    assert "generate" not in model.__dict__
    if changed is not None:
        assert "_polar_original" not in vars(changed)["is_supported"].__func__.__dict__  # left untouched


def test_nothing_to_do_where_transformers_already_defers_on_cuda(monkeypatch):
    monkeypatch.setattr(generation, "_install_result", [])
    monkeypatch.setattr(generation, "_deferred_stop_check_class", lambda: _Everywhere)
    original = vars(_Everywhere)["is_supported"]
    assert generation.install() is None
    assert vars(_Everywhere)["is_supported"] is original  # not wrapped
    model = TINY_MODELS["llama-gqa"]()
    assert generation.wrap_generate(model)  # deferral is available ...
    assert "generate" not in model.__dict__  # ... without a wrapper


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeferredStopCheck needs CUDA events")
@pytest.mark.parametrize("stop", ["eos", "length"])
def test_deferred_generate_returns_the_same_tokens_on_cuda(stop):
    model = TINY_MODELS["llama-gqa"]().to("cuda", torch.bfloat16)
    ids, mask = prompt_batch(model.config.vocab_size)
    ids, mask = ids.cuda(), mask.cuda()
    results = []
    for defer in (False, True):
        config = SparsityConfig(attention_density=0.5, defer_stop_check=defer)
        polar_compile.optimize(model, quick_routers("llama-gqa"), config)
        reference = generate(model, ids, mask, new_tokens=8).sequences
        kwargs = {}
        if stop == "eos":  # every sequence stops by its 3rd new token: one forward runs past the stop, undone
            third = reference[:, ids.shape[1] + 2].tolist()
            kwargs = dict(eos_token_id=sorted(set(third)), pad_token_id=0)
        results.append(generate(model, ids, mask, new_tokens=8, **kwargs).sequences.cpu())
    assert torch.equal(results[0], results[1])
    if stop == "eos":
        assert results[0].shape[1] <= ids.shape[1] + 3  # it did stop early


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.skipif(not hasattr(GenerationConfig(), "prefill_chunk_size"), reason="no chunked prefill here")
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_stays_eager_and_only_the_decode_step_compiles(device):
    model = TINY_MODELS["llama-gqa"]().to(device)
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size, length=10))
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    before = _compiled_graphs()
    chunked = generate(model, ids, mask, new_tokens=4, prefill_chunk_size=4)  # chunks of 4, 4 and 2 tokens
    # transformers sends every chunk through the compiled call: without ours, chunk lengths 4 and 2 compile too
    assert _compiled_graphs() - before == 1
    whole = generate(model, ids, mask, new_tokens=4)
    assert _compiled_graphs() - before == 1  # the same decode graph serves both
    assert torch.equal(chunked.sequences, whole.sequences)
    assert max_logit_difference(chunked, whole) < 1e-4


@pytest.mark.skipif(not hasattr(GenerationConfig(), "prefill_chunk_size"), reason="no chunked prefill here")
@pytest.mark.parametrize("device", DEVICES)
def test_a_one_token_last_prefill_chunk_stays_dense_and_shares_the_decode_graph(device):
    """Chunks of 4, 4 and 1 tokens: the last is one token a sequence, like a decode step. It took the compiled,
    sparse call, with position_ids a column of the prefill's (B, 9) tensor; Dynamo guards on strides, so it also
    compiled a second graph at the shape of the decode steps. Now it runs eager and dense, as the whole prompt does."""
    model = TINY_MODELS["llama-gqa"]().to(device)
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size, length=9))
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    before = _compiled_graphs()
    chunked = generate(model, ids, mask, new_tokens=4, prefill_chunk_size=4)
    assert _compiled_graphs() - before == 1
    whole = generate(model, ids, mask, new_tokens=4)
    assert torch.equal(chunked.sequences, whole.sequences)
    assert max_logit_difference(chunked, whole) < 1e-4
    assert generation._IN_PREFILL not in model.__dict__


def test_the_compiled_call_takes_decode_steps_only_and_restore_removes_it():
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ours = model.get_compiled_call(model.generation_config.compile_config)
    assert ours is model.get_compiled_call(model.generation_config.compile_config)  # one dispatcher per compile
    assert ours.compiled is model._compiled_call  # transformers' own compiled forward, behind it
    calls = []
    dispatch = generation._decode_only(model, lambda **kwargs: calls.append(kwargs["input_ids"].shape[1]))
    dispatch(input_ids=torch.zeros(2, 1, dtype=torch.long))  # one token per sequence: the compiled call
    out = dispatch(input_ids=torch.zeros(2, 5, dtype=torch.long))  # more: the model's own eager forward
    assert calls == [1] and tuple(out.logits.shape[:2]) == (2, 5)
    assert generation.tokens_per_sequence((torch.zeros(2, 1, dtype=torch.long),), {}) == 1
    assert generation.tokens_per_sequence((), {"inputs_embeds": torch.zeros(2, 3, 8)}) == 3
    theirs = model.get_compiled_call(CompileConfig(backend="eager"))  # a config of the caller's own: unchanged
    assert not hasattr(theirs, "compiled")
    restore(model)
    assert "get_compiled_call" not in model.__dict__ and not hasattr(model, generation._DISPATCH_ATTRIBUTE)


def _graph_limited_models(device, max_decode_graphs: int):
    """(a Llama optimized at density 0.5 with this max_decode_graphs, the same model left dense)."""
    model, dense_model = (TINY_MODELS["llama-gqa"]().to(device) for _ in range(2))
    config = SparsityConfig(attention_density=0.5, max_decode_graphs=max_decode_graphs)
    polar_compile.optimize(model, quick_routers("llama-gqa"), config)
    return model, dense_model


def _decode_batches(model, dense_model, device, steps) -> None:
    """Generate at each (batch size, graphs the step must compile, whether it decodes sparse or dense)."""
    for batch, compiles, sparse in steps:
        before = _compiled_graphs()
        ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size, batch=batch))
        out = generate(model, ids, mask, new_tokens=3)
        assert _compiled_graphs() - before == compiles, batch
        dense = generate(dense_model, ids, mask, new_tokens=3, disable_compile=True)
        assert (max_logit_difference(out, dense) > 1e-3) == sparse, batch


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("device", DEVICES)
def test_past_dynamos_recompile_limit_new_shapes_compile_under_ours_then_run_dense_with_a_warning(caplog, device):
    """A fullgraph compile fails outright on the shape past Dynamo's recompile_limit (a server with more batch
    sizes than that would crash): those shapes compile under SparsityConfig.max_decode_graphs, and past it they run
    the eager dense forward, with a warning naming the shape (and not Dynamo's advice to raise its limit)."""
    model, dense_model = _graph_limited_models(device, max_decode_graphs=3)
    dynamo = _Records()  # on Dynamo's logger itself: torch's loggers do not propagate to caplog's
    logging.getLogger("torch._dynamo.convert_frame").addHandler(dynamo)
    try:
        with (
            torch._dynamo.config.patch(recompile_limit=2),
            caplog.at_level("WARNING", logger="polar_compile.generation"),
        ):
            # Dynamo compiles batch 1 and 2, ours 3; 4 runs dense; 1 again is compiled already
            _decode_batches(
                model, dense_model, device, ((1, 1, True), (2, 1, True), (3, 1, True), (4, 0, False), (1, 0, True))
            )
    finally:
        logging.getLogger("torch._dynamo.convert_frame").removeHandler(dynamo)
    warnings = [r.getMessage() for r in caplog.records if "max_decode_graphs" in r.getMessage()]
    assert len(warnings) == 1 and "batch 4" in warnings[0], warnings
    assert not [record for record in dynamo.records if "hit config." in str(record.msg)], dynamo.records
    steps = polar_compile.explain(model).eager_steps
    assert len(steps) == 1 and steps[0].startswith("batch 4") and "max_decode_graphs" in steps[0], steps


@pytest.mark.parametrize("device", DEVICES)
def test_max_decode_graphs_below_dynamos_limit_is_honoured(caplog, device):
    """max_decode_graphs counts the shapes this model's steps compiled a graph for, also below Dynamo's own
    recompile_limit (8): with 2, a third batch size runs the eager dense forward, with a warning, while the shapes
    compiled already keep their sparse graphs."""
    model, dense_model = _graph_limited_models(device, max_decode_graphs=2)
    assert torch._dynamo.config.recompile_limit > 3
    with caplog.at_level("WARNING", logger="polar_compile.generation"):
        _decode_batches(
            model, dense_model, device, ((1, 1, True), (2, 1, True), (3, 0, False), (2, 0, True), (3, 0, False))
        )
    warnings = [r.getMessage() for r in caplog.records if "max_decode_graphs" in r.getMessage()]
    assert len(warnings) == 1 and "batch 3" in warnings[0] and "compiled 2 decode graphs" in warnings[0], warnings
    steps = polar_compile.explain(model).eager_steps
    assert len(steps) == 1 and steps[0].startswith("batch 3") and "(2 graphs)" in steps[0], steps


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_that_recompiles_at_every_token_runs_eagerly_after_a_few_graphs(caplog, device):
    """transformers' sliding-window cache layers make Dynamo recompile the decode step at every token (a Python int
    fill level): a 7-8B model would spend ~45 s a token compiling. optimize says so, and after GRAPHS_PER_SHAPE
    graphs at one shape its steps run the eager dense forward, with a warning naming the cause. The window (4096)
    is wider than the context here, so every path computes the same tokens."""
    from polar_compile.testing import tiny_model

    fields = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192, sliding_window=4096)  # fmt: skip
    model, dense_model = (tiny_model("MistralConfig", **fields).to(device) for _ in range(2))
    assert polar_compile.compiler.sliding_window(model) == 4096
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    dense = generate(dense_model, ids, mask, new_tokens=8, disable_compile=True)
    routers = PolarRouters.for_model(model, density=0.5)
    with caplog.at_level("WARNING", logger="polar_compile"):
        polar_compile.optimize(model, routers, SparsityConfig(attention_density=1.0))
        before = _compiled_graphs()
        out = generate(model, ids, mask, new_tokens=8)
        assert _compiled_graphs() - before == generation.GRAPHS_PER_SHAPE  # not one per token
    said = [r.getMessage() for r in caplog.records]
    assert any("sliding window (4096 tokens)" in m and "#44609" in m for m in said), said  # at optimize
    assert any("compiled 3 decode graphs at one shape" in m and "sliding-window layers" in m for m in said), said
    assert "cache length" in str(polar_compile.explain(model)).splitlines()[-1]  # explain says it too
    assert "sliding-window" in polar_compile.explain(model).eager_steps[0]
    assert torch.equal(out.sequences, dense.sequences)
    assert max_logit_difference(out, dense) < 1e-4
    model.config.sliding_window = None  # the remedy the warnings give (a window wider than every context)
    assert polar_compile.compiler.sliding_window(model) is None
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=1.0))
    before = _compiled_graphs()
    assert torch.equal(generate(model, ids, mask, new_tokens=8).sequences, dense.sequences)
    assert _compiled_graphs() - before == 1


def test_generate_that_transformers_does_not_compile_is_never_silently_dense(caplog):
    """transformers' get_compiled_call hands some models back their eager forward (Llama-4 in transformers 5.x:
    ``if "llama4" in model_type: return self.__call__``), so generate never reaches the polar step. Whatever this
    transformers does, the sparse model must either decode through the compiled polar step or say, in a warning
    and in explain, that it decodes dense."""
    import transformers

    from polar_compile.testing import tiny_model

    if not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip("this transformers has no Llama-4")
    fields = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=512, num_local_experts=2)  # fmt: skip
    model, dense_model = (tiny_model("Llama4TextConfig", **fields) for _ in range(2))
    ids, mask = prompt_batch(model.config.vocab_size, seed=3)
    try:
        dense = generate(dense_model, ids, mask, disable_compile=True)
    except TypeError as error:  # transformers 5.17: Llama-4 passes its chunked mask builder an argument it lacks
        pytest.skip(f"this transformers' Llama-4 does not generate at all: {error}")
    polar_compile.optimize(model, PolarRouters.for_model(model, density=0.5), SparsityConfig(attention_density=0.5))
    with caplog.at_level("WARNING", logger="polar_compile.generation"):
        before = _compiled_graphs()
        for _ in range(2):  # said once
            sparse = generate(model, ids, mask)
        compiled = _compiled_graphs() - before
    said = [r.getMessage() for r in caplog.records if "does not compile" in r.getMessage()]
    steps = polar_compile.explain(model).eager_steps
    if compiled:  # a transformers that compiles it: the polar step ran
        assert said == [] and steps == ()
        assert polar_compile.explain(model).rewritten_layers == [1, 2]
        return
    assert len(said) == 1 and "Llama4ForCausalLM" in said[0] and "dense model" in said[0], said
    assert len(steps) == 1 and steps[0].startswith("every shape") and "does not compile" in steps[0], steps
    assert torch.equal(sparse.sequences, dense.sequences) and max_logit_difference(sparse, dense) < 1e-4
    restore(model)
    assert polar_compile.generation.eager_decode_steps(model) == ()


@pytest.mark.parametrize("device", DEVICES)
def test_generate_with_an_empty_batch_says_so(device):
    """transformers itself fails on an empty batch inside the first attention layer ("cannot reshape tensor of 0
    elements"); an optimized model's generate names the problem before the prefill runs, static cache or not."""
    model = TINY_MODELS["llama-gqa"]().to(device)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    for call in (
        lambda: generate(model, ids[:0], mask[:0]),
        lambda: model.generate(ids[:0], max_new_tokens=2, do_sample=False),
    ):
        with pytest.raises(ValueError, match="empty batch: 0 sequences"):
            call()
    assert generate(model, ids, mask, new_tokens=2).sequences.shape[0] == ids.shape[0]  # a real batch still runs


@pytest.mark.parametrize("device", DEVICES)
def test_beam_search_assisted_and_continuous_batching_say_they_decode_dense(caplog, device):
    """transformers runs beam search without its compiled decode step, assisted generation verifies several tokens
    a step, and continuous batching decodes through its own paged attention: none reaches the polar step, so an
    optimized model says so (once) instead of decoding dense in silence, and explain lists it; greedy decoding stays
    quiet."""
    model, dense_model = TINY_MODELS["llama-gqa"]().to(device), TINY_MODELS["llama-gqa"]().to(device)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    with caplog.at_level("WARNING", logger="polar_compile.generation"):
        generate(model, ids, mask, new_tokens=3)
        assert [r for r in caplog.records if "this generate uses" in r.getMessage()] == []
        for _ in range(2):
            beams = generate(model, ids, mask, new_tokens=4, num_beams=2)
    said = [r.getMessage() for r in caplog.records if "this generate uses" in r.getMessage()]
    assert len(said) == 1 and "beam search" in said[0] and "dense model" in said[0], said
    assert torch.equal(beams.sequences, generate(dense_model, ids, mask, new_tokens=4, num_beams=2).sequences)
    steps = polar_compile.explain(model).eager_steps
    assert len(steps) == 1 and "generate calls that use beam search" in steps[0], steps
    with caplog.at_level("WARNING", logger="polar_compile.generation"):  # verifies several tokens a step
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3, do_sample=False, assistant_model=dense_model)
    assert any("assisted generation" in r.getMessage() for r in caplog.records)
    if hasattr(model, "generate_batch"):
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
        with caplog.at_level("WARNING", logger="polar_compile.generation"):
            try:
                model.generate_batch([ids[0].tolist()], generation_config=config, progress_bar=False)
            except (MemoryError, ValueError) as error:
                # transformers 5.17 sizes its paged cache from the free device memory, which it reads as 0 bytes on
                # the CPU (5.25 runs there); the call was still made, and that is what must be said
                if device != "cpu" or not ("available memory 0" in str(error) or "num_blocks = -1" in str(error)):
                    raise
        assert any("continuous batching" in r.getMessage() for r in caplog.records)
        assert any(
            "generate calls that use continuous batching" in step for step in polar_compile.explain(model).eager_steps
        )
    restore(model)
    assert not any(name.startswith("_polar_") for name in model.__dict__), sorted(model.__dict__)
    assert "_get_deprecated_gen_repo" not in model.__dict__ and "generate_batch" not in model.__dict__


@pytest.mark.parametrize("device", DEVICES)
def test_output_attentions_runs_the_dense_forward_with_a_warning(caplog, device):
    """The polar step computes no attention weights, and compiling the step with output_attentions=True failed inside
    transformers' own warning about SDPA: such steps now run the model's eager forward (what transformers gives
    without a compile), with a warning and a line in explain; other calls still decode sparse."""
    model, dense_model = TINY_MODELS["llama-gqa"]().to(device), TINY_MODELS["llama-gqa"]().to(device)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    with caplog.at_level("WARNING", logger="polar_compile.generation"):
        for _ in range(2):
            out = generate(model, ids, mask, new_tokens=3, output_attentions=True)
    said = [r.getMessage() for r in caplog.records if r.name == "polar_compile.generation"]
    assert len(said) == 1 and "eager, dense forward" in said[0], said
    dense = generate(dense_model, ids, mask, new_tokens=3, output_attentions=True, disable_compile=True)
    assert torch.equal(out.sequences, dense.sequences) and max_logit_difference(out, dense) < 1e-5
    assert any("output_attentions=True" in step for step in polar_compile.explain(model).eager_steps)
    sparse = generate(model, ids, mask, new_tokens=3)
    assert max_logit_difference(sparse, dense) > 1e-3 and polar_compile.explain(model).rewritten_layers == [1, 2]


def test_generate_without_a_static_cache_says_it_decodes_dense_and_why(caplog):
    model = TINY_MODELS["llama-gqa"]()
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = prompt_batch(model.config.vocab_size)
    with caplog.at_level("WARNING", logger="polar_compile.generation"):
        for _ in range(2):  # said once
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)  # HF's default: dynamic
        generate(model, ids, mask, new_tokens=3, disable_compile=True)  # asked for: nothing to say
        generate(model, ids, mask, new_tokens=3)  # static: compiled, nothing to say
    said = [r.getMessage() for r in caplog.records if r.name == "polar_compile.generation"]
    assert len(said) == 1 and "DynamicCache" in said[0] and "cache_implementation='static'" in said[0], said
    caplog.clear()
    with caplog.at_level("WARNING", logger="polar_compile.generation"):  # static asked for, but no cache at all
        generate(model, ids, mask, new_tokens=2, use_cache=False)
    said = [r.getMessage() for r in caplog.records if r.name == "polar_compile.generation"]
    assert len(said) == 1 and "use_cache=False" in said[0], said
    restore(model)
    assert "_valid_auto_compile_criteria" not in model.__dict__


def _sparse_reference(model, ids, mask, **kwargs):
    from polar_compile.reference import masked_reference

    with masked_reference(model):
        return generate(model, ids, mask, disable_compile=True, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_graphs_compiled_between_calls_do_not_demote_a_shape(caplog, device):
    """GRAPHS_PER_SHAPE catches a step that recompiles at every token; graphs compiled once each by separate calls
    at one shape (grad mode, requires_grad_, ...) used to add up to it, and every later call at that shape (and the
    rest of the third one) decoded dense.

    Which changes recompile differs between torch versions: 2.13 recompiles after requires_grad_(False), 2.11 does
    not (session 26, H200). A flipped cuBLAS bf16-reduction flag recompiles on both (Dynamo guards the global state
    it is part of) and changes nothing in an fp32 model, so it makes the third graph on either."""
    matmul = torch.backends.cuda.matmul
    model = TINY_MODELS["llama-gqa"]().to(device)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    reference = _sparse_reference(model, ids, mask)
    before = _compiled_graphs()
    reduction = matmul.allow_bf16_reduced_precision_reduction
    try:
        with caplog.at_level("WARNING", logger="polar_compile.generation"):
            for step in range(5):
                context = {1: torch.inference_mode(), 3: torch.enable_grad()}.get(step, torch.no_grad())
                matmul.allow_bf16_reduced_precision_reduction = reduction != (step == 2)
                if step == 3:
                    model.requires_grad_(False)
                with context:
                    out = generate(model, ids, mask)
                assert torch.equal(out.sequences, reference.sequences), step
                assert max_logit_difference(out, reference) < 1e-4, step
    finally:
        matmul.allow_bf16_reduced_precision_reduction = reduction
    assert _compiled_graphs() - before >= 3  # each of the first calls compiled a graph at the one shape
    assert [r for r in caplog.records if r.name == "polar_compile.generation"] == []
    assert polar_compile.explain(model).eager_steps == ()


@pytest.mark.parametrize("device", DEVICES)
def test_packing_follows_the_config_and_the_weights(device):
    """A graph fused over packed weights used to be reused for the same model re-optimized with
    fuse_projections=False (and for another instance of its class), and after a dtype round trip: each raised
    PackedLayoutError, whose remedy (optimize again) did not help. The graph now depends on the packing, and a decode
    step packs weights that model.to() gave their own storage again."""
    from polar_compile.packing import is_packed, projection_groups

    model = TINY_MODELS["llama-gqa"]().to(device)
    routers = quick_routers("llama-gqa")
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5))
    reference = _sparse_reference(model, ids, mask)
    assert torch.equal(generate(model, ids, mask).sequences, reference.sequences)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, fuse_projections=False))
    out = generate(model, ids, mask)
    assert torch.equal(out.sequences, reference.sequences) and max_logit_difference(out, reference) < 1e-4
    other = TINY_MODELS["llama-gqa"]().to(device)  # same class, unpacked, after the packed graph exists
    polar_compile.optimize(other, routers, SparsityConfig(attention_density=0.5, fuse_projections=False))
    assert torch.equal(generate(other, ids, mask).sequences, reference.sequences)

    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5))
    groups = [linears for _, linears in projection_groups(model._polar_plan.info)]
    model.double()  # each weight its own storage again
    assert not any(is_packed(linears) for linears in groups)
    model.float()
    assert not any(is_packed(linears) for linears in groups)
    out = generate(model, ids, mask)  # the fused fp32 graph again, over weights packed again
    assert all(is_packed(linears) for linears in groups)
    assert torch.equal(out.sequences, reference.sequences) and max_logit_difference(out, reference) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_a_replaced_generation_config_still_decodes_sparse_and_a_foreign_compile_config_says_it_is_dense(
    caplog, device
):
    """model.generation_config = GenerationConfig(...) after optimize (a chat model's settings) dropped the polar
    compile config: generate decoded dense with no word. The call now gets the polar one back; a compile_config of
    the caller's own still decodes dense, but says so."""
    model = TINY_MODELS["llama-gqa"]().to(device)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=0.5))
    ids, mask = (t.to(device) for t in prompt_batch(model.config.vocab_size))
    reference = _sparse_reference(model, ids, mask)
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=0)
    out = generate(model, ids, mask)
    assert torch.equal(out.sequences, reference.sequences) and max_logit_difference(out, reference) < 1e-4
    assert model.generation_config.compile_config is None  # the caller's object is left as they set it
    with caplog.at_level("WARNING", logger="polar_compile.generation"):
        for _ in range(2):  # said once
            generate(model, ids, mask, compile_config=CompileConfig(backend="eager"))
    said = [r.getMessage() for r in caplog.records if r.name == "polar_compile.generation"]
    assert len(said) == 1 and "compile_config of its own (backend 'eager')" in said[0], said
    assert any("backend 'eager'" in step for step in polar_compile.explain(model).eager_steps)


def test_a_model_moved_after_optimize_compiles_for_its_new_device():
    """optimize chose the CPU's passes-only compile config for a model then on the CPU; moved to CUDA it must get
    CUDA graphs and inductor (and the reverse). Checked on the config generate is handed, on any machine."""
    from types import SimpleNamespace

    from polar_compile.compiler import compile_config_for

    configs = {device: compile_config_for(device) for device in ("cuda", "cpu")}
    plan = SimpleNamespace(device_compile_configs=configs)
    for device, other in (("cuda", "cpu"), ("cpu", "cuda")):
        stored = GenerationConfig(compile_config=compile_config_for(other))
        model = SimpleNamespace(device=torch.device(device), generation_config=stored)
        call = GenerationConfig(compile_config=compile_config_for(other))  # generate's copy for this call
        generation._follow_the_device(model, plan, call)
        assert call.compile_config is configs[device] and stored.compile_config is configs[device]
        assert (call.compile_config.mode == "reduce-overhead") == (device == "cuda")
    chosen = GenerationConfig(compile_config=compile_config_for("cpu", mode="max-autotune"))
    generation._follow_the_device(SimpleNamespace(device=torch.device("cuda")), plan, chosen)
    assert chosen.compile_config.mode == "max-autotune"  # a config the caller chose is theirs


def test_a_step_shape_reads_the_cache_length_from_a_dict_of_masks():
    """Hybrid sliding-window models (Gemma-2, Gemma-3) pass one mask per attention type: the shape read
    'cache length ?', so every cache length at a batch size shared one entry (and one demotion to eager)."""
    ids = torch.zeros(3, 1, dtype=torch.long)
    masks = {"full_attention": torch.ones(3, 1, 1, 40, dtype=torch.bool), "sliding_attention": None}
    assert generation._step_shape((ids,), {"attention_mask": masks}) == "batch 3, cache length 40"
    assert generation._step_shape((ids,), {"attention_mask": torch.ones(3, 1, 1, 24)}) == "batch 3, cache length 24"
    assert generation._step_shape((ids,), {}) == "batch 3, cache length ?"
