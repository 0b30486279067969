"""Calibration on tiny random models: it learns something, and its pieces do what they claim."""

import random

import pytest
import torch

from polar_compile.config import CalibrationConfig
from polar_compile.routers.calibrate import _Reservoir, calibrate, mlp_k_table, recall_at_k, token_batches
from polar_compile.testing import TINY_MODELS


def _batches(vocab: int, count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 64), generator=generator) for _ in range(count)]


QUICK = CalibrationConfig(tokens=6144, sequence_length=64, batch_size=4, epochs=8, mlp_rank=32, learning_rate=3e-3)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "mistral", "qwen2", "opt"])
def test_trained_routers_beat_random_routers(name):
    model = TINY_MODELS[name]()
    routers = calibrate(model, _batches(model.config.vocab_size, 24), QUICK, progress=False)
    meta = routers.metadata
    assert meta["calibration_tokens"] == 6144
    assert set(meta["recall"]) == {str(i) for i in range(1, model.config.num_hidden_layers)}
    mean_recall = sum(meta["recall"].values()) / len(meta["recall"])
    # A random router's expected recall@k is k / groups; training must clearly beat it on average.
    assert mean_recall > meta["random_recall"] + 0.05, (mean_recall, meta["random_recall"])
    assert bool(routers.mlp) == (name == "opt")  # mlp="auto": ReLU MLPs only


def test_recall_at_k_counts_overlap():
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    perfect = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0]])
    half = torch.tensor([[5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 4.0, 5.0]])
    assert recall_at_k(perfect, labels, 2) == 1.0
    assert recall_at_k(half, labels, 2) == 0.75


def test_reservoir_keeps_a_uniform_bounded_sample():
    reservoir = _Reservoir(capacity=500, rng=random.Random(0))
    for start in range(0, 20_000, 1000):
        rows = torch.arange(start, start + 1000, dtype=torch.float32)[:, None]
        reservoir.add(rows, rows * 2)
    values, doubled = reservoir.columns()
    assert values.shape == (500, 1) and torch.equal(doubled, values * 2)  # columns stay aligned
    assert len(set(values[:, 0].tolist())) == 500
    assert 7_000 < values.mean().item() < 13_000  # uniform over 0..19999 (mean ~10k), not the first rows


def test_token_batches_from_strings_and_errors():
    class Tokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    config = CalibrationConfig(sequence_length=8, batch_size=2)
    batches = list(token_batches(["abcdefghij" * 3], Tokenizer(), config))
    assert all(b.shape[1] == 8 for b in batches) and sum(b.shape[0] for b in batches) == 3
    with pytest.raises(ValueError, match="tokenizer"):
        list(token_batches(["text"], None, config))
    with pytest.raises(ValueError, match="empty"):
        list(token_batches([], None, config))
    with pytest.raises(ValueError, match="integer"):
        list(token_batches([torch.ones(2, 3)], None, config))


def test_mlp_k_table_reaches_the_union_target():
    torch.manual_seed(0)
    active = (torch.rand(400, 64) < 0.1).float()
    inputs = active * 3.0  # a router that sees the labels: identity scores
    router = torch.nn.Identity()
    table = mlp_k_table(router, inputs, active, 0.99, seed=0)
    assert table["1"] is not None and table["1"] <= 12  # ~6 active neurons per token
    assert table["256"] is None  # the union of 256 tokens covers nearly every neuron: dense
