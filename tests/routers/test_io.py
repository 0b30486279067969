"""Router files: exact round trip for every tiny architecture, and each documented error."""

import json

import pytest
import torch
from safetensors.torch import save_file

from polar_compile.mha import expand_kv_heads
from polar_compile.model_info import UnsupportedModelError
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
from polar_compile.testing import TINY_MODELS, tiny_model


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


def test_a_module_that_is_not_a_hugging_face_model_is_named(calibrated, tmp_path):
    """The check used to read model.config first and fail with a bare AttributeError."""
    _, routers = calibrated("opt")
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    with pytest.raises(UnsupportedModelError, match="Linear has no .config: pass a Hugging Face model"):
        load_routers(path, torch.nn.Linear(2, 2))


def test_routers_for_the_gqa_layout_refuse_the_expanded_model(calibrated, tmp_path):
    _, routers = calibrated("llama-gqa")
    path = tmp_path / "routers.safetensors"
    save_routers(routers, path)
    expanded = expand_kv_heads(TINY_MODELS["llama-gqa"]())  # the same function, 4 groups instead of 2
    with pytest.raises(RouterMismatchError, match="num_kv_heads"):
        load_routers(path, expanded)


def test_routers_for_the_expanded_model_name_the_expansion_the_model_lacks(tmp_path):
    """A `calibrate --mha` file loaded into the model as it ships: the message says to expand it first."""
    path = tmp_path / "routers.safetensors"
    save_routers(PolarRouters.for_model(expand_kv_heads(TINY_MODELS["llama-gqa"]()), density=0.5), path)
    message = "num_kv_heads: routers 4 vs model 2.*call polar_compile.mha.expand_kv_heads\\(model\\) before loading"
    with pytest.raises(RouterMismatchError, match=message):
        load_routers(path, TINY_MODELS["llama-gqa"]())
    assert load_routers(path, expand_kv_heads(TINY_MODELS["llama-gqa"]())).num_groups == 4


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


def _write(path, routers, metadata=None, tensors=None):
    tensors = tensors or {key: t.detach().float().contiguous() for key, t in routers.state_dict().items()}
    save_file(
        tensors, str(path), metadata={"polar_compile": json.dumps(routers.metadata if metadata is None else metadata)}
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.fill_(float("nan")), "NaN or infinite values"),
        (lambda t: t.__setitem__(0, float("inf")), "NaN or infinite values"),
        (lambda t: t.round().to(torch.int32), "torch.int32, not floating point"),
    ],
)
def test_non_finite_or_integer_tensors_are_refused(tmp_path, edit, message):
    """A diverged calibration's NaN routers would rank groups by topk over NaN, in silence."""
    model = TINY_MODELS["qwen2"]()
    routers = PolarRouters.for_model(model, density=0.5)
    tensors = {key: t.detach().float().contiguous() for key, t in routers.state_dict().items()}
    edited = edit(tensors["attention.1.bias"])
    tensors["attention.1.bias"] = tensors["attention.1.bias"] if edited is None else edited
    _write(tmp_path / "r.safetensors", routers, tensors=tensors)
    with pytest.raises(RouterFileCorruptError, match=f"tensor attention.1.bias (is|holds) .*{message}"):
        load_routers(tmp_path / "r.safetensors", model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": 1}, "layers is 1, not a list"),
        ({"layers": ["1"]}, "layers is \\['1'\\]"),
        ({"density": "half"}, "density is 'half'"),
        ({"density": None}, "density is None"),
        ({"dense_layers": "0,1"}, "dense_layers is '0,1'"),
        ({"num_groups": "2"}, "num_groups is '2', not an int"),
        ({"mlp_rank": 0}, "mlp_rank is 0"),
        ({"mlp_k_table": {"1": {"1": "all"}}}, "mlp_k_table"),
        ({"fingerprint": [1]}, "fingerprint is \\[1\\]"),
    ],
)
def test_damaged_metadata_is_named(tmp_path, change, message):
    """Hand-edited or damaged metadata gives the documented error, naming the field, not a raw TypeError later."""
    model = TINY_MODELS["qwen2"]()
    routers = PolarRouters.for_model(model, density=0.5)
    _write(tmp_path / "r.safetensors", routers, metadata=dict(routers.metadata, **change))
    with pytest.raises(RouterFileCorruptError, match=f"damaged router metadata: {message}"):
        load_routers(tmp_path / "r.safetensors", model)


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ([1, 2], RouterFileCorruptError),
        ({"format_version": 0}, RouterFormatError),
        ({"format_version": True}, RouterFormatError),
    ],
)
def test_metadata_that_is_not_a_router_files_is_refused(tmp_path, metadata, error):
    routers = PolarRouters.for_model(TINY_MODELS["qwen2"](), density=0.5)
    _write(tmp_path / "r.safetensors", routers, metadata=metadata)
    with pytest.raises(error):
        load_routers(tmp_path / "r.safetensors")


def test_map_location_and_model_are_not_both_taken(tmp_path):
    model = TINY_MODELS["qwen2"]()
    save_routers(PolarRouters.for_model(model, density=0.5), tmp_path / "r.safetensors")
    with pytest.raises(ValueError, match="pass model or map_location, not both"):
        load_routers(tmp_path / "r.safetensors", model, map_location="cpu")
    assert load_routers(tmp_path / "r.safetensors", map_location="cpu").attention_router(1).weight.device.type == "cpu"


def test_a_model_whose_middle_layers_differ_is_refused():
    """The first and last layers alone (weight_sample) would pass a partial fine-tune or a layer merge."""
    model = TINY_MODELS["llama-gqa"]()
    routers = PolarRouters.for_model(model, density=0.5)
    other = TINY_MODELS["llama-gqa"]()
    middle = other.model.layers[1]
    with torch.no_grad():
        middle.self_attn.q_proj.weight.copy_(TINY_MODELS["llama-gqa"](seed=5).model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(RouterMismatchError, match="layer_sample: the weights of layers \\[1\\] differ"):
        routers.check_compatible(other)
    old = dict(routers.metadata["fingerprint"])
    del old["layer_sample"]  # a file written before layer_sample: checked on weight_sample alone, as before
    routers.metadata["fingerprint"] = old
    routers.check_compatible(other)


def test_a_model_with_a_grown_vocabulary_keeps_its_routers(tmp_path):
    """Adding a pad token (resize_token_embeddings) appends embedding rows; routers read hidden states, not tokens."""
    model = TINY_MODELS["llama-gqa"]()
    save_routers(PolarRouters.for_model(model, density=0.5), tmp_path / "r.safetensors")
    model.resize_token_embeddings(model.config.vocab_size + 3)
    load_routers(tmp_path / "r.safetensors", model)
    smaller = TINY_MODELS["llama-gqa"]()
    smaller.resize_token_embeddings(smaller.config.vocab_size - 3)
    with pytest.raises(RouterMismatchError, match="vocab_size"):
        load_routers(tmp_path / "r.safetensors", smaller)


def test_random_routers_check_their_arguments():
    model = TINY_MODELS["qwen2"]()
    for kwargs, message in (
        ({"density": 0}, "density must be in \\(0, 1\\]"),
        ({"density": 5}, "density must be in \\(0, 1\\]"),
        ({"layers": [0, 7]}, "layers \\[7\\] do not exist"),
        ({"layers": [-1]}, "layers must be layer indices >= 0"),
        ({"mlp": True, "mlp_density": 2}, "mlp_density must be in"),
        ({"mlp": True, "mlp_rank": 0}, "mlp_rank must be a positive int"),
    ):
        with pytest.raises(ValueError, match=message):
            PolarRouters.for_model(TINY_MODELS["opt"]() if kwargs.get("mlp") else model, **kwargs)


def _shaped_like(model, **shape):
    """Routers whose fingerprint is ``model``'s but whose shapes are ``shape`` (hidden_size, num_groups, ...)."""
    reference = PolarRouters.for_model(model, density=0.5)
    shaped = ("num_groups", "layers", "mlp_rank")
    metadata = {key: value for key, value in reference.metadata.items() if key not in shaped}
    return PolarRouters(attention_layers=[1, 2], metadata=metadata, **shape)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (dict(hidden_size=256, num_groups=4), r"weight \(4, 256\).*2 KV groups and hidden size 256"),
        (dict(hidden_size=128, num_groups=2), r"weight \(2, 128\).*2 KV groups and hidden size 256"),
        (
            dict(hidden_size=128, num_groups=2, mlp_layers=[1], mlp_rank=8, intermediate_size=768),
            "MLP router 1: input size 128 and 768 neurons; the model has hidden size 256 and 512 MLP neurons",
        ),
    ],
)
def test_routers_of_another_shape_are_refused(tmp_path, shape, message):
    """A file whose fingerprint matches but whose routers are shaped for another group count, width or MLP is
    refused when loaded and by optimize, naming both numbers (it used to load, and decode stayed dense)."""
    import polar_compile

    model = TINY_MODELS["llama-gqa"]()  # hidden 256, 2 KV groups, MLP width 512
    routers = _shaped_like(model, **shape)
    _write(tmp_path / "r.safetensors", routers)
    with pytest.raises(RouterMismatchError, match=message):
        load_routers(tmp_path / "r.safetensors", model)
    with pytest.raises(RouterMismatchError, match=message):
        polar_compile.optimize(model, routers, polar_compile.SparsityConfig(mlp="on"))
    assert not hasattr(model, "_polar_plan")


def test_routers_with_non_finite_values_are_not_saved(tmp_path):
    """A file load_routers would refuse is not written in the first place."""
    routers = PolarRouters.for_model(TINY_MODELS["qwen2"](), density=0.5)
    with torch.no_grad():
        routers.attention_router(2).weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="router tensor attention.2.weight holds NaN or infinite values"):
        save_routers(routers, tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()


def test_a_tiny_sampled_weight_still_matches_its_fp16_cast():
    """fp16 rounds 2e-7 to a subnormal 1.8e-7 (steps of 6e-8): the same model cast to fp16 keeps its routers, and
    another model of the architecture is still refused."""

    def model_with_tiny_weights(seed=0):
        model = TINY_MODELS["llama-gqa"](seed=seed)
        with torch.no_grad():
            for layer in (0, 1):  # position 0 is sampled: layer 0 in weight_sample, layer 1 in layer_sample
                model.model.layers[layer].self_attn.q_proj.weight.view(-1)[0] = 2e-7
        return model

    routers = PolarRouters.for_model(model_with_tiny_weights(), density=0.5)
    for dtype in (torch.float16, torch.bfloat16):
        routers.check_compatible(model_with_tiny_weights().to(dtype))
    with pytest.raises(RouterMismatchError, match="weight_sample"):
        routers.check_compatible(model_with_tiny_weights(seed=1).to(torch.float16))


def test_mlp_only_routers_round_trip(tmp_path):
    """Routers with MLP routers and no attention router save and load (the hidden size comes from the MLP ones)."""
    model = TINY_MODELS["opt"]()
    fingerprint = model_fingerprint(model)
    routers = PolarRouters(hidden_size=256, num_groups=4, attention_layers=[], mlp_layers=[1], mlp_rank=8,
                           intermediate_size=512, metadata={"fingerprint": fingerprint})  # fmt: skip
    save_routers(routers, tmp_path / "r.safetensors")
    loaded = load_routers(tmp_path / "r.safetensors", model)
    assert loaded.metadata["layers"] == [] and loaded.metadata["mlp_layers"] == [1]
    for name, tensor in routers.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_random_routers_refuse_an_mlp_density_without_mlp_and_repeated_layers():
    model = TINY_MODELS["opt"]()
    with pytest.raises(ValueError, match="mlp_density .* mlp=False makes none: pass mlp=True"):
        PolarRouters.for_model(model, density=0.5, mlp_density=0.3)
    with pytest.raises(ValueError, match=r"layers \[1\] are given more than once"):
        PolarRouters.for_model(model, density=0.5, layers=[1, 1, 2])
    routers = PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=8, mlp_density=0.3)
    assert routers.mlp_k(1, 4) == round(0.3 * model.config.ffn_dim)


@pytest.mark.parametrize(
    ("map_location", "message"),
    [("meta", "'meta' keeps no values"), ("bogus", "'bogus' is not a device"), (3.5, "3.5 is not a device")]
    + ([] if torch.cuda.is_available() else [("cuda", "sees no CUDA device")]),
)
def test_a_map_location_the_routers_cannot_live_on_is_named(tmp_path, map_location, message):
    """These failed as raw torch errors (an AssertionError from CUDA's lazy init; a meta copy that failed inside
    optimize), none of them naming the routers."""
    model = TINY_MODELS["qwen2"]()
    save_routers(PolarRouters.for_model(model, density=0.5), tmp_path / "r.safetensors")
    with pytest.raises(ValueError, match=f"load_routers: map_location .*{message}"):
        load_routers(tmp_path / "r.safetensors", map_location=map_location)


def test_routers_for_another_layer_count_say_so_once():
    """The message went on about 'the weights of layers (a sample of another length)' after num_layers had said it."""
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    routers = PolarRouters.for_model(tiny_model("LlamaConfig", num_hidden_layers=3, **fields), density=0.5)
    with pytest.raises(RouterMismatchError, match="num_layers: routers 3 vs model 2") as raised:
        routers.check_compatible(tiny_model("LlamaConfig", num_hidden_layers=2, **fields))
    assert "layer_sample" not in str(raised.value), str(raised.value)
