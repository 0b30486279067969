"""Router files: exact round trip for every tiny architecture, and each documented error."""

import json

import pytest
import torch
from safetensors.torch import save_file

from polar_compile.mha import expand_kv_heads
from polar_compile.routers.io import (
    RouterFileCorruptError,
    RouterFileError,
    RouterFormatError,
    RouterMismatchError,
    load_routers,
    model_fingerprint,
    save_routers,
)
from polar_compile.routers.modules import FORMAT_VERSION, PolarRouters
from polar_compile.testing import TINY_MODELS


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "mistral", "qwen2", "opt"])
def test_round_trip_is_exact(calibrated, name, tmp_path):
    model, routers = calibrated(name)
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    loaded = load_routers(path, model)
    assert loaded.metadata == routers.metadata
    assert loaded.state_dict().keys() == routers.state_dict().keys()
    for key, tensor in routers.state_dict().items():
        assert loaded.state_dict()[key].dtype == tensor.dtype
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert [loaded.mlp_k(layer, 16) for layer in (1, 2)] == [routers.mlp_k(layer, 16) for layer in (1, 2)]


def test_file_for_another_model_is_refused(calibrated, tmp_path):
    _, routers = calibrated("opt")
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    with pytest.raises(RouterMismatchError, match="architecture"):
        load_routers(path, TINY_MODELS["llama-mha"]())
    with pytest.raises(RouterMismatchError, match="weight_sample"):
        load_routers(path, TINY_MODELS["opt"](seed=7))  # same architecture, other weights
    with pytest.raises(RouterFileError):  # the common base class of every router file error
        load_routers(path, TINY_MODELS["opt"](seed=7))


def test_routers_for_the_gqa_layout_refuse_the_expanded_model(calibrated, tmp_path):
    _, routers = calibrated("llama-gqa")
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    expanded = expand_kv_heads(TINY_MODELS["llama-gqa"]())  # the same function, 4 groups instead of 2
    with pytest.raises(RouterMismatchError, match="num_kv_heads"):
        load_routers(path, expanded)


def test_same_model_in_another_dtype_is_accepted(calibrated, tmp_path):
    _, routers = calibrated("opt")
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    half = TINY_MODELS["opt"]().to(torch.bfloat16)  # the same weights, cast
    assert load_routers(path, half).attention_router(1).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.01])
def test_truncated_file_is_refused(calibrated, tmp_path, keep):
    _, routers = calibrated("opt")
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(RouterFileCorruptError, match="truncated or damaged"):
        load_routers(path)


def test_newer_format_is_refused(calibrated, tmp_path):
    _, routers = calibrated("qwen2")
    path = tmp_path / "routers.safetensors"
    metadata = dict(routers.metadata, format_version=FORMAT_VERSION + 1)
    tensors = {key: tensor.contiguous() for key, tensor in routers.state_dict().items()}
    save_file(tensors, str(path), metadata={"polar_compile": json.dumps(metadata)})
    with pytest.raises(RouterFormatError, match="format version"):
        load_routers(path)


def test_tensors_that_disagree_with_the_metadata_are_refused(calibrated, tmp_path):
    _, routers = calibrated("qwen2")
    path = tmp_path / "routers.safetensors"
    tensors = {
        key: tensor.contiguous() for key, tensor in routers.state_dict().items() if not key.startswith("attention.2")
    }
    save_file(tensors, str(path), metadata={"polar_compile": json.dumps(routers.metadata)})
    with pytest.raises(RouterFileCorruptError, match="do not match"):
        load_routers(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(RouterFileCorruptError, match="not a polar_compile router file"):
        load_routers(path)
    with pytest.raises(FileNotFoundError):
        load_routers(tmp_path / "missing.safetensors")


def test_fingerprint_ignores_dtype_but_not_weights():
    model = TINY_MODELS["mistral"]()
    fingerprint = model_fingerprint(model)
    assert fingerprint["num_kv_heads"] == 2 and fingerprint["architecture"] == "MistralForCausalLM"
    json.dumps(fingerprint)  # serialisable as is
    routers = PolarRouters.for_model(model, density=0.5)
    routers.check_compatible(model.to(torch.bfloat16))
    with pytest.raises(RouterMismatchError, match="weight_sample"):
        routers.check_compatible(TINY_MODELS["mistral"](seed=1))


def test_random_routers_know_their_model():
    model = TINY_MODELS["qwen2"]()
    routers = PolarRouters.for_model(model, density=0.5)
    routers.check_compatible(model)
    assert routers.num_groups == 2 and routers.attention_router(0) is None and routers.attention_router(2) is not None
