"""Shared set-up for the compiler tests: tiny models, quick routers, generate() with logits."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
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


def capture_decode_graph(model, routers, config, autocast: torch.dtype | None = None):
    """(graph module, example inputs) of the decode step generate() compiles for ``model`` optimized with
    ``routers`` and ``config``, captured before the polar passes (under ``torch.autocast("cpu", autocast)`` when
    given). Skips where transformers itself cannot decode under that autocast (5.17's static cache)."""
    import polar_compile

    polar_compile.optimize(model, routers, config)
    captured = []

    def capture(gm, example_inputs, **kwargs):
        # copies taken before later steps mutate them; parameters (never mutated) are kept as they are, so the
        # packed q/k/v and gate/up stay views of one buffer (a deepcopy would give each its own storage)
        inputs = [x if isinstance(x, torch.nn.Parameter) else copy.deepcopy(x) for x in example_inputs]
        captured.append((copy.deepcopy(gm), inputs))
        return gm.forward

    model.generation_config.compile_config.backend = capture
    ids, mask = prompt_batch(model.config.vocab_size)
    context = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    try:
        with context:
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static")
    except RuntimeError as error:  # transformers 5.17's static cache cannot be filled under autocast (5.25's can)
        if autocast is None or "index_copy_" not in str(error):
            raise
        import transformers

        pytest.skip(f"transformers {transformers.__version__} fails in its own cache update under autocast: {error}")
    assert len(captured) == 1, "one graph for all decode steps"
    return captured[0]


def without_anchors(gm):
    """A copy of ``gm`` as the dense model runs it: the anchors (identities) removed, nothing rewritten."""
    from polar_compile.passes.context import ANCHOR_TARGETS, MLP_ANCHOR_TARGETS

    dense = copy.deepcopy(gm)
    for node in list(dense.graph.nodes):
        if node.op == "call_function" and (node.target in ANCHOR_TARGETS or node.target in MLP_ANCHOR_TARGETS):
            node.replace_all_uses_with(node.args[0])
            dense.graph.erase_node(node)
    dense.recompile()
    return dense
