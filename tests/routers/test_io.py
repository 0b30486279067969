"""Router files: exact round trip, and each documented error."""

import json

import pytest
import torch
from safetensors.torch import save_file

from polar_compile.routers.io import (
    RouterFileCorruptError,
    RouterFormatError,
    RouterMismatchError,
    load_routers,
    save_routers,
)
from polar_compile.routers.modules import FORMAT_VERSION, PolarRouters
from polar_compile.testing import TINY_MODELS
from tests.routers.test_calibrate import QUICK, _batches


@pytest.fixture(scope="module")
def calibrated():
    from polar_compile.routers.calibrate import calibrate

    model = TINY_MODELS["opt"]()
    return model, calibrate(model, _batches(model.config.vocab_size, 8), QUICK, progress=False)


def test_round_trip_is_exact(calibrated, tmp_path):
    model, routers = calibrated
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    loaded = load_routers(path, model)
    assert loaded.metadata == routers.metadata
    assert routers.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in routers.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_file_for_another_model_is_refused(calibrated, tmp_path):
    _, routers = calibrated
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    with pytest.raises(RouterMismatchError, match="architecture"):
        load_routers(path, TINY_MODELS["llama-mha"]())
    with pytest.raises(RouterMismatchError, match="weight_sample"):
        load_routers(path, TINY_MODELS["opt"](seed=7))  # same architecture, other weights


def test_same_model_in_another_dtype_is_accepted(calibrated, tmp_path):
    _model, routers = calibrated
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    half = TINY_MODELS["opt"]().to(torch.bfloat16)  # the same weights, cast
    assert load_routers(path, half).attention_router(1).weight.dtype == torch.bfloat16


def test_truncated_file_is_refused(calibrated, tmp_path):
    _, routers = calibrated
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RouterFileCorruptError, match="truncated or damaged"):
        load_routers(path)


def test_newer_format_is_refused(calibrated, tmp_path):
    _, routers = calibrated
    path = tmp_path / "routers.safetensors"
    metadata = dict(routers.metadata, format_version=FORMAT_VERSION + 1)
    tensors = {n: t.contiguous() for n, t in routers.state_dict().items()}
    save_file(tensors, str(path), metadata={"polar_compile": json.dumps(metadata)})
    with pytest.raises(RouterFormatError, match="format version"):
        load_routers(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(RouterFileCorruptError, match="not a polar_compile router file"):
        load_routers(path)
    with pytest.raises(FileNotFoundError):
        load_routers(tmp_path / "missing.safetensors")


def test_random_routers_know_their_model():
    model = TINY_MODELS["qwen2"]()
    routers = PolarRouters.for_model(model, density=0.5)
    routers.check_compatible(model)
    assert routers.num_groups == 2 and routers.attention_router(0) is None and routers.attention_router(2) is not None
