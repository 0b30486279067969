"""Router tests share one calibration per tiny model (calibrating is the slow part)."""

import functools

import pytest
import torch

from polar_compile.config import CalibrationConfig
from polar_compile.testing import TINY_MODELS

# Short sequences of one "topic" each (see random_token_batches): on tiny random models this gives the routers a
# signal they can find (held-out margin over a random router >= 0.1 on every layer of every model, measured), and
# all five models calibrate in ~15 s on 2 cores.
QUICK = CalibrationConfig(
    tokens=16384, sequence_length=16, batch_size=8, epochs=8, mlp_rank=32, learning_rate=1e-2, validation_fraction=0.2
)


def random_token_batches(vocab: int, tokens: int, rows: int = 8, columns: int = 16, seed: int = 0, topics: int = 16):
    """Token batches with the structure routing feeds on: each sequence keeps to one "topic" (a random slice of
    the vocabulary), so which heads matter depends on the context, and the current token tells the topic."""
    generator = torch.Generator().manual_seed(seed)
    vocabulary = torch.randperm(vocab, generator=generator).view(topics, -1)
    batches = []
    for _ in range(tokens // (rows * columns)):
        topic = torch.randint(0, topics, (rows, 1), generator=generator)
        slot = torch.randint(0, vocabulary.shape[1], (rows, columns), generator=generator)
        batches.append(vocabulary[topic, slot])
    return batches


@functools.cache
def _calibrated(name: str):
    from polar_compile.routers.calibrate import calibrate

    model = TINY_MODELS[name]()
    routers = calibrate(model, random_token_batches(model.config.vocab_size, QUICK.tokens), QUICK, progress=False)
    return model, routers


@pytest.fixture
def calibrated():
    """calibrated(name) -> (tiny model, its calibrated routers), computed once per session."""
    return _calibrated
