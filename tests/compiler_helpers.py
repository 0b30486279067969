"""Shared set-up for the compiler tests: tiny models, quick routers, generate() with logits."""

from __future__ import annotations

import copy
import functools

import torch

from polar_compile.routers.modules import PolarRouters
from polar_compile.testing import TINY_MODELS

ARCHITECTURES = ("llama-gqa", "llama-mha", "mistral", "qwen2", "opt")
# the whole compiled path: on the CPU Dynamo's graph with the CPU references; on CUDA inductor, CUDA graphs and
# the Triton kernels (fp32 on both: the kernels compute fp32 with ieee products)
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


@functools.cache
def quick_routers(name: str, mlp: bool = False):
    """Seeded random routers for the tiny model ``name``: the compiler's correctness does not depend on how
    good the routers are, only on computing exactly what they select (routers have their own tests)."""
    model = TINY_MODELS[name]()
    return PolarRouters.for_model(model, density=0.5, mlp=mlp, mlp_rank=32, mlp_density=0.4 if mlp else None)


def prompt_batch(vocab_size: int, batch: int = 3, length: int = 7, seed: int = 0):
    """Token ids with left padding on the first sequence (so masks matter), and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def generate(model, ids, mask, new_tokens: int = 6, **kwargs):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def max_logit_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


def logits_until_tokens_part(a, b) -> tuple[int, float]:
    """(steps compared, largest logit difference) over the steps up to and including the first one at which the
    two runs chose different tokens: in bf16 two correct implementations may part on a near-tie, after which their
    logits answer different inputs."""
    steps, largest = 0, 0.0
    new_a, new_b = (out.sequences[:, -len(out.logits) :] for out in (a, b))
    for step, (x, y) in enumerate(zip(a.logits, b.logits, strict=True)):
        steps, largest = steps + 1, max(largest, (x.float() - y.float()).abs().max().item())
        if not torch.equal(new_a[:, step], new_b[:, step]):
            break
    return steps, largest


def far_apart(routers, seed: int = 0):
    """A copy of ``routers`` whose choices hang on biases far apart. A random router's scores on a tiny model are
    often near-equal, and in bf16 such a choice flips with rounding: two correct runs would then compute different
    things (a swapped MLP neuron moved these logits by ~0.07, ten times the rounding)."""
    routers = copy.deepcopy(routers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in [*routers.attention.values(), *(mlp[1] for mlp in routers.mlp.values())]:
            router.bias.copy_(torch.randperm(router.bias.numel(), generator=generator).float() * 8)
    return routers
