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
