"""``polar-compile calibrate`` end to end on a tiny model folder and a text file (no network, no SmolLM2)."""

import pytest

from polar_compile.cli import main
from polar_compile.routers.cli import default_density
from polar_compile.routers.io import load_routers
from polar_compile.testing import TINY_MODELS


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_calibrate_command_writes_a_loadable_file(tmp_path):
    model = TINY_MODELS["llama-gqa"]()
    model.save_pretrained(tmp_path / "model")
    words = [f"w{i}" for i in range(200)]
    _word_tokenizer(words).save_pretrained(tmp_path / "model")
    documents = [" ".join(words[(7 * d + i) % 200] for i in range(60)) for d in range(80)]
    (tmp_path / "text.txt").write_text("\n\n".join(documents))
    out = tmp_path / "routers.safetensors"
    argv = ["calibrate", str(tmp_path / "model"), "--out", str(out), "--tokens", "2048", "--epochs", "1"]
    assert main([*argv, "--text-file", str(tmp_path / "text.txt"), "--density", "0.5", "--quiet"]) == 0
    routers = load_routers(out, model)
    assert routers.metadata["calibration_tokens"] == 2048 and routers.metadata["k"] == 1
    assert routers.metadata["layers"] == [1, 2] and not routers.mlp


@pytest.mark.parametrize(("heads", "groups", "density"), [(9, 3, 2 / 3), (32, 8, 5 / 8), (4, 2, 0.5), (16, 16, 0.5)])
def test_default_density(heads, groups, density):
    assert default_density(heads, groups) == density


def test_calibrate_command_selects_dense_layers_on_held_out_text(tmp_path, capsys):
    model = TINY_MODELS["llama-gqa"]()
    model.save_pretrained(tmp_path / "model")
    words = [f"w{i}" for i in range(200)]
    _word_tokenizer(words).save_pretrained(tmp_path / "model")
    documents = [" ".join(words[(7 * d + i) % 200] for i in range(60)) for d in range(80)]
    held_out = [" ".join(words[(11 * d + 3 * i) % 200] for i in range(140)) for d in range(6)]  # 128-token windows
    (tmp_path / "text.txt").write_text("\n\n".join(documents))
    (tmp_path / "held_out.txt").write_text("\n\n".join(held_out))
    out, again = tmp_path / "routers.safetensors", tmp_path / "again.safetensors"
    base = ["calibrate", str(tmp_path / "model"), "--quiet"]
    argv = [*base, "--tokens", "2048", "--epochs", "1"]
    selection = ["--selection-text-file", str(tmp_path / "held_out.txt")]
    assert main([*argv, "--out", str(out), "--text-file", str(tmp_path / "text.txt"), *selection]) == 0
    routers = load_routers(out, model)
    assert routers.dense_layers is not None and routers.dense_layers[0] == 0
    assert routers.metadata["layer_selection"]["windows"] == 6
    assert "dense layers " in capsys.readouterr().out
    # only the selection, for the routers of a file: the same tensors, a new choice (a budget nothing exceeds)
    assert main([*base, "--out", str(again), "--from-routers", str(out), "--perplexity-budget", "1e6", *selection]) == 0
    reselected = load_routers(again, model)
    assert reselected.dense_layers == (0,)
    assert all((a == b).all() for a, b in zip(routers.state_dict().values(), reselected.state_dict().values()))
    with pytest.raises(SystemExit, match="drop --no-layer-selection"):
        main([*base, "--out", str(again), "--from-routers", str(out), "--no-layer-selection"])
    with pytest.raises(SystemExit, match="so --tokens, --epochs, --text-file would do nothing"):  # no training there
        main([*argv, "--out", str(again), "--from-routers", str(out), "--text-file", str(tmp_path / "text.txt")])
    assert main([*argv, "--out", str(again), "--text-file", str(tmp_path / "text.txt"), "--no-layer-selection"]) == 0
    assert load_routers(again, model).dense_layers is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text-file", "{tmp}/missing.txt"], "--text-file: no file at .*missing.txt"),
        (["--selection-text-file", "{tmp}/missing.txt"], "--selection-text-file: no file at"),
        (["--text-file", "/dev/null"], "--text-file: not a regular file at /dev/null"),
        (["--text-file", "{tmp}"], "--text-file: not a regular file at "),
        (["--from-routers", "{tmp}/missing.safetensors"], "--from-routers: no file at"),
        (["--density", "1.5"], "density must be in \\(0, 1\\], got 1.5"),
        (["--tokens", "0"], "tokens must be a positive int, got 0"),
        (["--epochs", "0"], "epochs must be a positive int"),
        (["--perplexity-budget", "-1"], "perplexity_budget must be a percentage"),
        (["--density", "1"], "density must be below 1 to calibrate"),
        (["--tokens", "512"], "--tokens must be more than one sequence of 512 tokens"),
        (["--mlp-rank", "0"], "mlp_rank must be a positive int"),
        (["--lr", "inf"], "learning_rate must be a finite number"),
        (["--from-routers", "{tmp}/r0.safetensors", "--density", "0.5"], "--from-routers keeps .* so --density would"),
        (["--no-layer-selection", "--ranking", "single"], "--no-layer-selection skips .* so --ranking would"),
        (
            ["--text-file", "{tmp}/r0.safetensors", "--perplexity-budget", "3"],
            "with --text-file and no --selection-text-file the dense-layer selection is skipped, so "
            "--perplexity-budget would do nothing",
        ),
        (
            ["--text-file", "{tmp}/r0.safetensors", "--ranking", "single", "--perplexity-budget", "3"],
            "with --text-file .* so --perplexity-budget, --ranking would do nothing: .* drop them",
        ),
        (["--sequence-length", "0"], "sequence_length must be a positive int, got 0"),
        (["--sequence-length", "128", "--tokens", "100"], "--tokens must be more than one sequence of 128 tokens"),
        (["--out", "{tmp}/afile/r.safetensors"], "--out .*afile/r.safetensors: .*afile is a file, not a folder"),
    ],
)
def test_calibrate_command_names_a_bad_argument_before_loading_the_model(tmp_path, monkeypatch, extra, message):
    """A calibration runs for minutes: an argument that cannot work ends it at once, in one line, not in a traceback
    after the model has loaded (the model loader here fails the test if it is reached)."""
    import polar_compile.routers.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda *_: pytest.fail("the model loaded before the check"))
    argv = ["calibrate", "smollm2", "--out", str(tmp_path / "r.safetensors")]
    (tmp_path / "r0.safetensors").write_bytes(b"")  # exists: the check that follows is the one under test
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=f"^polar-compile calibrate: {message}"):
        main([*argv, *(part.replace("{tmp}", str(tmp_path)) for part in extra)])


def test_calibrate_command_names_a_missing_model_folder_and_a_folder_as_out(tmp_path, monkeypatch):
    import polar_compile.routers.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda *_: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit, match="^polar-compile calibrate: no model folder at .*nowhere$"):
        main(["calibrate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.safetensors")])
    with pytest.raises(SystemExit, match="^polar-compile calibrate: --out .* is a folder"):
        main(["calibrate", "smollm2", "--out", str(tmp_path)])


def test_calibrate_command_names_an_unsupported_model_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    _word_tokenizer(["a", "b"]).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SystemExit, match="^polar-compile calibrate: .*Conv1D"):
        main(["calibrate", str(tmp_path / "gpt2"), "--out", str(tmp_path / "r.safetensors"), "--quiet"])


def test_from_routers_keeps_the_files_float32_tensors_for_a_bf16_model(tmp_path, monkeypatch):
    """The selection runs on a bf16 copy of the routers (the model's dtype); the file written keeps the fp32 ones."""
    import torch
    from safetensors.torch import load_file

    import polar_compile.routers.cli as module
    from polar_compile.routers.io import save_routers
    from polar_compile.routers.modules import PolarRouters

    words = [f"w{i}" for i in range(200)]
    model = TINY_MODELS["llama-gqa"](dtype=torch.bfloat16)
    monkeypatch.setattr(module, "_load_model", lambda name, mha: (model, _word_tokenizer(words)))
    source, out = tmp_path / "fp32.safetensors", tmp_path / "out.safetensors"
    save_routers(PolarRouters.for_model(TINY_MODELS["llama-gqa"](), density=0.5), source)
    held_out = [" ".join(words[(11 * d + 3 * i) % 200] for i in range(140)) for d in range(6)]  # 128-token windows
    (tmp_path / "held_out.txt").write_text("\n\n".join(held_out))
    argv = ["calibrate", "tiny", "--quiet", "--out", str(out), "--from-routers", str(source),
            "--selection-text-file", str(tmp_path / "held_out.txt"), "--perplexity-budget", "1e6"]  # fmt: skip
    assert main(argv) == 0
    before, after = load_file(source), load_file(out)
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == torch.float32 and torch.equal(before[name], after[name]), name
    assert load_routers(out).dense_layers == (0,)
