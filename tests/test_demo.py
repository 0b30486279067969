"""`polar-compile demo` end to end on the CPU with the shipped SmolLM2 routers."""

import re

import pytest

from polar_compile.cli import main
from polar_compile.demo import shipped_routers_path

pytestmark = pytest.mark.slow


def test_shipped_routers_exist_and_load():
    import polar_compile

    model, _ = polar_compile.load_smollm2()
    routers = polar_compile.load_routers(shipped_routers_path(), model)  # fingerprint must match the real model
    assert routers.num_groups == 3 and routers.metadata["calibrated"]
    # the calibrated dense layers optimize keeps dense by default (polar_compile.routers.select)
    assert routers.dense_layers[0] == 0 and 1 < len(routers.dense_layers) < 30
    assert routers.metadata["layer_selection"]["budget_percent"] == 5.0
    assert shipped_routers_path().stat().st_size < 1_000_000


def test_demo_runs_on_cpu(capsys):
    assert main(["demo", "--cpu", "--new-tokens", "6", "--prompt", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "token agreement" in out and "dense :" in out and "polar :" in out
    assert "rewritten: 2 of 3 KV groups" in out
    assert "the router file's calibrated dense_layers" in out  # the default: the shipped file's dense layers


def test_demo_keeps_the_layers_asked_for_dense(capsys):
    # before any text is generated
    with pytest.raises(SystemExit, match=r"polar-compile demo: .*layers \[30\] but the model has 30 layers"):
        main(["demo", "--cpu", "--dense-layers", "30"])
    assert "dense :" not in capsys.readouterr().out
    assert main(["demo", "--cpu", "--new-tokens", "4", "--prompt", "Paris is", "--dense-layers", "2,5"]) == 0
    out = capsys.readouterr().out
    assert "dense layers 0,2,5" in out
    plan = {}  # layer -> its row of explain's attention table (the first table; a row per run: "3-4")
    for line in out.splitlines():
        if re.fullmatch(r"\d+(-\d+)?", line[:6].strip()):
            first, _, last = line.split()[0].partition("-")
            for layer in range(int(first), int(last or first) + 1):
                plan.setdefault(layer, line)
    assert "kept dense: config.dense_layers" in plan[2] and "rewritten: 2 of 3 KV groups" in plan[3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--density", "0"], "--density must be in \\(0, 1\\], got 0.0"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1"),
        (["--routers", "missing.safetensors"], "--routers: no file at missing.safetensors"),
        (["--calibrate", "--routers", "r.safetensors"], "--routers and --calibrate exclude each other"),
        (["--calibrate", "--tokens", "0"], "tokens must be a positive int"),
        (["--calibrate", "--tokens", "10"], "--tokens must be more than one sequence of 512 tokens"),
        (["--prompt", ""], "--prompt needs some text"),  # was a traceback from the model
        (["--prompt", "Paris is", "--prompt", "  "], "--prompt needs some text"),
    ],
)
def test_demo_names_a_bad_argument_before_loading_the_model(monkeypatch, argv, message):
    import polar_compile.assets

    monkeypatch.setattr(polar_compile.assets, "load_smollm2", lambda **_: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit, match=f"^polar-compile demo: {message}"):
        main(["demo", "--cpu", *argv])


@pytest.mark.parametrize(("new_tokens", "expected"), [(1, None), (2, 0.5), (4, 0.5)])
def test_every_decode_step_after_prefill_is_timed(monkeypatch, new_tokens, expected):
    """The processor's first call follows prefill; the rest each follow a decode step. pairwise(stamps[1:]) dropped
    the first decode step too, so --new-tokens 2 (one decode step) printed no tokens/s line."""
    import time

    import torch

    from polar_compile.demo import _generate

    clock = iter([10.0 + 0.5 * i for i in range(100)])  # prefill ends at 10 s, then a decode step every 0.5 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))

    class FakeModel:
        def generate(self, input_ids, max_new_tokens, logits_processor=None, **kwargs):
            for _ in range(max_new_tokens):
                if logits_processor is not None:
                    logits_processor[0](input_ids, torch.zeros(1, 8))
            return torch.zeros(1, input_ids.shape[1] + max_new_tokens, dtype=torch.long)

    ids, step = _generate(FakeModel(), {"input_ids": torch.ones(1, 3, dtype=torch.long)}, new_tokens)
    assert ids.shape == (1, new_tokens) and step == expected
