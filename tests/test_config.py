import math

import pytest

from polar_compile.config import CalibrationConfig, SparsityConfig, groups_for_density


def test_defaults_are_valid_and_frozen():
    config = SparsityConfig()
    assert config.dense_layers is None  # the router file's calibrated choice, resolved by optimize
    resolved = config.resolve_dense_layers(None)  # no router file choice: layer 0 alone
    assert resolved.density_for(0) is None and resolved.density_for(5) == 0.5
    assert resolved.resolve_dense_layers(None) is resolved
    with pytest.raises(AttributeError):
        config.attention_density = 0.3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.layer_density[3] = 0.2  # type: ignore[index]


def test_layer_override_and_key():
    config = SparsityConfig(attention_density=0.5, layer_density={3: 0.25}, dense_layers=(0, 1))
    assert [config.density_for(i) for i in range(5)] == [None, None, 0.5, 0.25, 0.5]
    assert config.key() != SparsityConfig(attention_density=0.5).key()
    assert config.key() == SparsityConfig(attention_density=0.5, layer_density={3: 0.25}, dense_layers=(0, 1)).key()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, math.nan, "0.5", True])
def test_density_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="attention_density"):
        SparsityConfig(attention_density=bad)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layer_density": {2: 1.5}}, "layer_density\\[2\\]"),
        ({"layer_density": {-1: 0.5}}, "layer_density keys"),
        ({"dense_layers": (0, -2)}, "dense_layers"),
        ({"dense_attention": "flash"}, "dense_attention"),
        ({"mlp": "yes"}, "mlp"),
        ({"mlp_recall_target": 0.0}, "mlp_recall_target"),
        ({"max_decode_graphs": 0}, "max_decode_graphs"),
        ({"max_decode_graphs": True}, "max_decode_graphs"),
        ({"max_decode_graphs": 8.0}, "max_decode_graphs"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SparsityConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tokens": 0}, "tokens"),
        ({"density": 2.0}, "density"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"layer_ranking": "pairwise"}, "layer_ranking"),
    ],
)
def test_calibration_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**kwargs)


@pytest.mark.parametrize(
    ("density", "groups", "expected"),
    [(0.5, 8, 4), (0.625, 8, 5), (2 / 3, 3, 2), (0.5, 32, 16), (0.3, 72, 22), (0.01, 8, 1), (1.0, 3, 3)],
)
def test_groups_for_density(density, groups, expected):
    assert groups_for_density(density, groups) == expected
