"""The dense-layer selection: its fast parallel scoring equals the compiled decode path, it keeps the most sensitive
layers dense within the budget, and what it chooses reaches ``optimize`` through the router file."""

import logging

import pytest
import torch

import polar_compile
from polar_compile.compiler import restore
from polar_compile.config import CalibrationConfig, SparsityConfig, groups_for_density
from polar_compile.evaluate import paired_change, score_continuations
from polar_compile.routers.calibrate import add_layer_selection, calibrate
from polar_compile.routers.io import load_routers, save_routers
from polar_compile.routers.modules import PolarRouters, RouterMismatchError
from polar_compile.routers.select import decode_log_likelihoods, select_dense_layers, selection_windows
from polar_compile.testing import TINY_MODELS, tiny_model
from tests.compiler_helpers import ARCHITECTURES, DEVICES
from tests.routers.conftest import QUICK, random_token_batches

PREFIX = 4


def _windows(vocab: int, count: int = 6, length: int = 14, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def _six_layer_llama():
    return tiny_model("LlamaConfig", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_parallel_scores_equal_the_compiled_decode_path(name, device):
    """One forward with per-token group masks at decode positions scores each window as the compiled decode steps
    do (the K/V cache is written for every group either way): the selection measures what is deployed. fp32; on
    CUDA the decode steps run through inductor, CUDA graphs and the Triton kernels."""
    model = TINY_MODELS[name]().to(device)
    routers = PolarRouters.for_model(model, density=0.5)
    windows = _windows(model.config.vocab_size)
    k = max(1, routers.num_groups // 2)
    sparse = {layer: k for layer in range(1, model.config.num_hidden_layers)}
    fast = decode_log_likelihoods(model, routers, windows, sparse, prefix=PREFIX, batch=4)
    fast_dense = decode_log_likelihoods(model, routers, windows, {}, prefix=PREFIX)

    polar_compile.optimize(model, routers, SparsityConfig(attention_density=0.5, dense_layers=(0,)))
    rows = windows.tolist()
    sums, counts = score_continuations(model, [r[:PREFIX] for r in rows], [r[PREFIX:] for r in rows], 0)
    restore(model)
    dense_sums, _ = score_continuations(model, [r[:PREFIX] for r in rows], [r[PREFIX:] for r in rows], 0)

    assert [c for _, c in fast.items] == counts == [windows.shape[1] - PREFIX] * len(rows)
    for (nll, _), decoded in zip(fast.items, sums, strict=True):
        assert nll == pytest.approx(-decoded, rel=1e-4, abs=1e-3)
    for (nll, _), decoded in zip(fast_dense.items, dense_sums, strict=True):
        assert nll == pytest.approx(-decoded, rel=1e-4, abs=1e-3)
    assert max(abs(a[0] - b[0]) for a, b in zip(fast.items, fast_dense.items, strict=True)) > 0.01  # really sparse


def test_selection_keeps_the_most_sensitive_layers_dense_within_the_budget(caplog):
    model = _six_layer_llama()
    routers = PolarRouters.for_model(model, density=0.5)
    windows = _windows(256, count=8, length=20)
    k = 2  # of 4 heads

    loose = select_dense_layers(model, routers, windows, budget=1e6, k=k, ranking="single", prefix=PREFIX,
                                progress=False)  # fmt: skip
    assert loose.dense_layers == (0,) and loose.curve[0][2] <= 1e6  # every routed layer sparse
    order = sorted(loose.sensitivity, key=lambda i: -loose.sensitivity[i][0])
    assert loose.ranking == "single" and sorted(loose.sensitivity) == [1, 2, 3, 4, 5]

    # a budget between the all-sparse upper bound and 0: some but not all layers dense, the most sensitive first
    budget = loose.curve[0][2] / 3
    chosen = select_dense_layers(model, routers, windows, budget=budget, k=k, ranking="single", prefix=PREFIX,
                                 progress=False)  # fmt: skip
    n = len(chosen.dense_layers) - 1
    assert set(chosen.dense_layers) == {0, *order[:n]}
    assert chosen.change[2] <= budget and chosen.curve[n] == chosen.change
    assert all(change[2] > budget for m, change in chosen.curve.items() if m < n)  # fewer dense ones measured over
    # its reported change is a measurement of that very set
    dense = decode_log_likelihoods(model, routers, windows, {}, prefix=PREFIX)
    sparse = {layer: k for layer in range(1, 6) if layer not in chosen.dense_layers}
    again = paired_change(decode_log_likelihoods(model, routers, windows, sparse, prefix=PREFIX), dense)
    assert again == pytest.approx(chosen.change, abs=1e-6)

    with caplog.at_level(logging.WARNING, logger="polar_compile"):
        strict = select_dense_layers(model, routers, windows, budget=-0.0, k=k, ranking="single", prefix=PREFIX,
                                     progress=False)  # fmt: skip
    if strict.dense_layers == (0, 1, 2, 3, 4, 5):
        assert "no layer can be sparse" in caplog.text
    assert strict.change[2] <= 0.0


def test_leave_one_out_ranks_by_the_gain_of_keeping_one_layer_dense():
    model = _six_layer_llama()
    routers = PolarRouters.for_model(model, density=0.5)
    windows = _windows(256, count=8, length=20)
    loose = select_dense_layers(model, routers, windows, budget=1e6, k=2, ranking="leave-one-out", prefix=PREFIX,
                                progress=False)  # fmt: skip
    assert loose.dense_layers == (0,) and loose.ranking == "leave-one-out"
    dense = decode_log_likelihoods(model, routers, windows, {}, prefix=PREFIX)
    for layer, change in loose.sensitivity.items():  # every routed layer sparse but that one
        others = {i: 2 for i in range(1, 6) if i != layer}
        assert paired_change(decode_log_likelihoods(model, routers, windows, others, prefix=PREFIX), dense) == (
            pytest.approx(change, abs=1e-6)
        )
    budget = loose.curve[0][2] / 3
    chosen = select_dense_layers(model, routers, windows, budget=budget, k=2, ranking="leave-one-out", prefix=PREFIX,
                                 progress=False)  # fmt: skip
    order = sorted(loose.sensitivity, key=lambda i: loose.sensitivity[i][0])  # lowest change without it first
    n = len(chosen.dense_layers) - 1
    assert set(chosen.dense_layers) == {0, *order[:n]} and chosen.change[2] <= budget
    with pytest.raises(ValueError, match="ranking"):
        select_dense_layers(model, routers, windows, ranking="greedy", prefix=PREFIX, progress=False)


def test_the_choice_reaches_optimize_through_the_router_file(tmp_path):
    model = _six_layer_llama()
    routers = PolarRouters.for_model(model, density=0.5)
    windows = _windows(256, count=8, length=20)
    all_sparse = select_dense_layers(model, routers, windows, budget=1e6, k=2, prefix=PREFIX, progress=False).change
    budget = all_sparse[2] / 3  # some layers dense, some sparse (those of the test above)
    add_layer_selection(model, routers, windows, CalibrationConfig(perplexity_budget=budget), prefix=PREFIX,
                        progress=False)  # fmt: skip
    chosen = routers.dense_layers
    assert chosen is not None and chosen[0] == 0 and 1 < len(chosen) < 6
    assert routers.metadata["layer_selection"]["budget_percent"] == budget
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    loaded = load_routers(path, model)
    assert loaded.dense_layers == chosen

    polar_compile.optimize(model, loaded)  # the default config: the router file's dense layers
    plan = model._polar_plan
    assert tuple(sorted(plan.dense_reasons)) == chosen
    assert all("router file's calibrated dense_layers" in plan.dense_reasons[i] for i in chosen)
    assert sorted(plan.sparse_layers) == [i for i in range(6) if i not in chosen]
    polar_compile.optimize(model, loaded, SparsityConfig(attention_density=0.5, dense_layers=(0,)))  # overrides
    assert sorted(model._polar_plan.sparse_layers) == [1, 2, 3, 4, 5]
    restore(model)
    assert PolarRouters.for_model(model).dense_layers is None  # no selection: optimize keeps layer 0 dense
    assert SparsityConfig().resolve_dense_layers(PolarRouters.for_model(model)).dense_layers == (0,)


def test_calibrate_selects_on_held_out_text_and_skips_without_it(caplog):
    model = TINY_MODELS["llama-mha"]()
    batches = random_token_batches(model.config.vocab_size, 4096)
    config = CalibrationConfig(**{**QUICK.__dict__, "tokens": 4096, "epochs": 2})
    windows = _windows(model.config.vocab_size, count=8, length=40)  # calibrate's 32 tokens of context, 8 scored
    routers = calibrate(model, batches, config, selection_texts=windows, progress=False)
    assert routers.dense_layers is not None and 0 in routers.dense_layers
    assert routers.metadata["layer_selection"]["windows"] == 8 and "select" in routers.metadata["seconds"]
    with caplog.at_level(logging.WARNING, logger="polar_compile"):
        routers = calibrate(model, batches, config, progress=False)
    assert routers.dense_layers is None and "no dense-layer selection" in caplog.text
    off = CalibrationConfig(**{**config.__dict__, "perplexity_budget": None})
    assert calibrate(model, batches, off, selection_texts=windows, progress=False).dense_layers is None


class _Tokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) % 200 + 3 for c in text]}


def test_selection_windows_cut_like_the_evaluation():
    windows = selection_windows(["a" * 50, "short", "b" * 40, "c" * 45], _Tokenizer(), prefix=8, tokens=32, limit=2)
    assert windows.shape == (2, 40) and windows[1, 0] == ord("b") % 200 + 3
    with pytest.raises(ValueError, match="40 tokens a window needs"):
        selection_windows(["short"], _Tokenizer(), prefix=8, tokens=32)


def test_bad_input_is_named():
    model = TINY_MODELS["llama-gqa"]()
    routers = PolarRouters.for_model(model)
    windows = _windows(model.config.vocab_size)
    for bad, match in [
        (dict(budget=-1.0), "budget"),
        (dict(budget=True), "budget"),
        (dict(k=3), "k must be in"),
        (dict(prefix=14), "prefix"),
        (dict(prefix=0), "prefix"),
    ]:
        with pytest.raises(ValueError, match=match):
            select_dense_layers(model, routers, windows, **{"prefix": PREFIX, "progress": False, **bad})
    for bad_windows in (windows.float(), windows[0], windows[:0]):
        with pytest.raises(ValueError, match="window"):
            select_dense_layers(model, routers, bad_windows, prefix=PREFIX, progress=False)
    with pytest.raises(RouterMismatchError):
        select_dense_layers(TINY_MODELS["opt"](), routers, windows, prefix=PREFIX, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        add_layer_selection(model, routers, ["some text"], progress=False)
    with pytest.raises(ValueError, match="perplexity_budget"):  # None means no selection: not silently 5%
        add_layer_selection(model, routers, windows, CalibrationConfig(perplexity_budget=None), prefix=PREFIX)
    with pytest.raises(ValueError, match="perplexity_budget"):
        CalibrationConfig(perplexity_budget=-2.0)
    with pytest.raises(ValueError, match="dense_layers"):
        SparsityConfig(dense_layers=3)
    with pytest.raises(ValueError, match="resolved"):
        SparsityConfig().density_for(1)


def test_without_k_the_selection_measures_the_k_optimize_runs():
    """Routers with no stored k (uncalibrated) at a density whose k is a half (0.625 of 4 groups = 2.5): the
    selection rounds it up to 3 like optimize (config.groups_for_density), not to 2 like Python's round."""
    model = TINY_MODELS["opt"]()  # 4 KV groups
    routers = PolarRouters.for_model(model, density=0.625)
    assert "k" not in routers.metadata
    selection = select_dense_layers(model, routers, _windows(model.config.vocab_size), prefix=PREFIX, progress=False)
    assert selection.k == groups_for_density(0.625, 4) == 3
