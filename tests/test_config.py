import math

import pytest

from polar_compile.config import CalibrationConfig, SparsityConfig, groups_for_density, sparse_density_bound


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
        ({"mlp_dense_threshold": 0.0}, "mlp_dense_threshold"),
        ({"max_decode_graphs": 0}, "max_decode_graphs"),
        ({"max_decode_graphs": True}, "max_decode_graphs"),
        ({"max_decode_graphs": 8.0}, "max_decode_graphs"),
        ({"dense_layers": {0: 1.0}}, "dense_layers must be a tuple of layer indices, got a mapping"),
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
        ({"density": 1.0}, "density must be below 1 to calibrate"),
        ({"seed": "abc"}, "seed must be an int"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"max_samples_per_layer": 100.5}, "max_samples_per_layer must be an int"),
        ({"max_samples_per_layer": "x"}, "max_samples_per_layer must be an int"),
        ({"max_memory_gb": math.inf}, "max_memory_gb must be a finite number"),
        ({"max_memory_gb": "8"}, "max_memory_gb must be a finite number"),
        ({"learning_rate": math.inf}, "learning_rate must be a finite number"),
        ({"learning_rate": "0.01"}, "learning_rate must be a finite number"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"validation_fraction": "0.1"}, "validation_fraction"),
        ({"mlp_rank": 0}, "mlp_rank"),
        ({"mlp_label_density": 1.0}, "mlp_label_density must be below 1"),
    ],
)
def test_calibration_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**kwargs)


@pytest.mark.parametrize(
    ("density", "groups", "expected"),
    [(0.5, 8, 4), (0.625, 8, 5), (2 / 3, 3, 2), (0.5, 32, 16), (0.3, 72, 22), (0.01, 8, 1), (1.0, 3, 3),
     (0.625, 4, 3), (0.375, 4, 2), (0.875, 4, 4), (0.7, 10, 7), (0.3, 10, 3), (0.5, 5, 3), (0.5, 3, 2)],
)  # fmt: skip
def test_groups_for_density(density, groups, expected):
    """Round to the nearest count, halves up (Python's round would send 0.625 of 4 and 0.375 of 4 both to 2)."""
    assert groups_for_density(density, groups) == expected


def test_numpy_numbers_are_accepted_as_the_python_ones():
    numpy = pytest.importorskip("numpy")
    config = SparsityConfig(
        attention_density=numpy.float32(0.5),
        layer_density={numpy.int64(3): numpy.float64(0.25)},
        dense_layers=numpy.array([0, 1]),
    )
    assert config.dense_layers == (0, 1) and all(type(i) is int for i in config.dense_layers)
    assert dict(config.layer_density) == {3: 0.25} and type(next(iter(config.layer_density))) is int
    assert config.key() == SparsityConfig(attention_density=0.5, layer_density={3: 0.25}, dense_layers=(0, 1)).key()
    counts = (
        SparsityConfig(max_decode_graphs=numpy.int64(4)),
        CalibrationConfig(tokens=numpy.int32(4096), seed=numpy.int64(0)),
    )
    assert [type(value) for value in (counts[0].max_decode_graphs, counts[1].tokens, counts[1].seed)] == [int] * 3
    assert counts[1] == CalibrationConfig(tokens=4096, seed=0)
    with pytest.raises(ValueError, match="dense_layers must be layer indices >= 0, got -1"):
        SparsityConfig(dense_layers=numpy.array([0, -1]))
    with pytest.raises(ValueError, match="layer indices \\(ints >= 0\\), got 1.5"):
        SparsityConfig(layer_density={1.5: 0.5})


def test_dense_layers_in_any_order_or_repeated_are_one_config():
    """The same dense layers make the same key, so the two configs share compiled graphs."""
    config = SparsityConfig(dense_layers=[3, 0, 3])
    assert config.dense_layers == (0, 3) and config == SparsityConfig(dense_layers=(0, 3))
    assert config.key() == SparsityConfig(dense_layers=(0, 3)).key()


def test_configs_hash_like_their_values():
    one = SparsityConfig(attention_density=0.5, layer_density={3: 0.25})
    same = SparsityConfig(attention_density=0.5, layer_density={3: 0.25})
    assert one == same and hash(one) == hash(same) and len({one, same, SparsityConfig()}) == 2


def test_sparse_density_bound_is_where_every_group_is_kept():
    for groups in (2, 3, 4, 8, 9, 32):
        bound = sparse_density_bound(groups)
        assert groups_for_density(bound, groups) == groups
        assert groups_for_density(bound - 1e-6, groups) == groups - 1
