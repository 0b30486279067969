"""Graphs the attention pass must leave dense, with the reason, instead of rewriting them by guess: q/k/v of mixed
dtypes (torch.autocast), a layer whose attention is not an SDPA (its search must not reach the next layer's SDPA),
a tiled repeat of the KV heads, is_causal=True next to a mask, K/V broadcast over the batch, and K/V that are not
the static cache (a DynamicCache's torch.cat)."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import polar_compile
import polar_compile.ops.router_anchor  # registers torch.ops.polar.router_anchor
from polar_compile.backend import compile_reports
from polar_compile.config import SparsityConfig
from polar_compile.passes import run_passes
from polar_compile.passes.context import ANCHOR_TARGETS, SDPA_TARGETS
from polar_compile.testing import TINY_MODELS
from tests.compiler_helpers import capture_decode_graph, prompt_batch, quick_routers, without_anchors


def _largest_difference(dense, gm, inputs, autocast: torch.dtype | None = None) -> float:
    """Largest difference between the floating-point outputs of the two graphs (each on its own copy of the
    inputs: the step writes the static cache in place)."""
    context = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        want = torch.utils._pytree.tree_leaves(dense(*copy.deepcopy(inputs)))
        got = torch.utils._pytree.tree_leaves(gm(*copy.deepcopy(inputs)))
    pairs = [(a, b) for a, b in zip(want, got, strict=True) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    assert pairs
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


def _attention_rows(ctx):
    return {row.layer: row for row in ctx.layers if row.component == "attention"}


def _targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def test_autocast_mixed_qkv_dtypes_stay_dense_and_run():
    """An fp32 Llama decoded under autocast(bf16): rotary leaves q and k fp32 while v is bf16 (so is its cache), and
    SDPA casts them itself. The rewrite handed polar::selective_attention an fp32 query and a bf16 value cache:
    TypeError at the first step."""
    model = TINY_MODELS["llama-gqa"]()
    gm, inputs = capture_decode_graph(
        model, quick_routers("llama-gqa"), SparsityConfig(attention_density=1.0), torch.bfloat16
    )
    dense = without_anchors(gm)
    ctx = run_passes(gm)
    rows = _attention_rows(ctx)
    assert sorted(rows) == [0, 1, 2]
    assert all(not row.rewritten and "differ in dtype" in row.detail for row in rows.values()), rows
    assert torch.ops.polar.selective_attention.default not in _targets(gm)
    assert _largest_difference(dense, gm, inputs, torch.bfloat16) == 0.0


def _mixed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """SDPA for every layer but layer 1, which computes its attention with matmul and softmax."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if module.layer_idx != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
        )
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif query.shape[2] > 1:
        scores = scores + torch.full(scores.shape[-2:], float("-inf")).triu(1)
    return (torch.softmax(scores, -1) @ value).transpose(1, 2).contiguous(), None


def _repeat_tiled(x, repeats):
    batch, groups, length, head_dim = x.shape  # query head j * G + g reads KV group g (HF's reads h // R)
    return x[:, None].expand(batch, repeats, groups, length, head_dim).reshape(batch, repeats * groups, length, -1)


def _repeat_unsqueezed(x, repeats):
    batch, groups, length, head_dim = x.shape  # HF's interleaved order, spelt with unsqueeze(2)
    return x.unsqueeze(2).expand(batch, groups, repeats, length, head_dim).reshape(batch, groups * repeats, length, -1)


def _sdpa_with(repeat):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        repeats = module.num_key_value_groups
        causal = query.shape[2] > 1 and attention_mask is None
        out = F.scaled_dot_product_attention(
            query, repeat(key, repeats), repeat(value, repeats), attn_mask=attention_mask, scale=scaling,
            is_causal=causal,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    return attention


_ATTENTIONS = {
    "polar_test_mixed": _mixed_attention,
    "polar_test_tiled": _sdpa_with(_repeat_tiled),
    "polar_test_unsqueezed": _sdpa_with(_repeat_unsqueezed),
}


def _tiny_llama_with_attention(name: str):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, _ATTENTIONS[name])
    AttentionMaskInterface.register(name, sdpa_mask)
    model = TINY_MODELS["llama-gqa"]()
    model.config._attn_implementation = name
    model.model.config._attn_implementation = name
    return model


def test_a_layer_without_sdpa_does_not_take_the_next_layers_sdpa():
    """Layer 1's attention is matmul/softmax and layer 2 (dense, on SDPA) has no anchor: the search from layer 1's
    anchor went on through o_proj and layer 2's q projection to layer 2's SDPA and rewrote it with layer 1's router
    (logits off by 0.8)."""
    model = _tiny_llama_with_attention("polar_test_mixed")
    config = SparsityConfig(attention_density=0.5, dense_layers=(2,), dense_attention="sdpa")
    gm, inputs = capture_decode_graph(model, quick_routers("llama-gqa"), config)
    assert sum(target in ANCHOR_TARGETS for target in _targets(gm)) == 1  # layer 1's only
    dense = without_anchors(gm)
    ctx = run_passes(gm)
    rows = _attention_rows(ctx)
    assert list(rows) == [1] and not rows[1].rewritten, rows
    assert "not an SDPA" in rows[1].detail
    assert ctx.counters["attention"] == 0 and torch.ops.polar.selective_attention.default not in _targets(gm)
    assert sum(target in SDPA_TARGETS for target in _targets(gm)) == 2  # layers 0 and 2, untouched
    assert _largest_difference(dense, gm, inputs) == 0.0


@pytest.mark.parametrize(("name", "rewritten"), [("polar_test_tiled", False), ("polar_test_unsqueezed", True)])
def test_only_hf_interleaved_repeat_kv_is_traced_to_the_cache(name, rewritten):
    """A tiled repeat (head h reads KV group h % G) was taken for HF's interleaved one (h // R): density 1.0 was off
    the dense logits by 1.25. The interleaved order spelt with unsqueeze(2) is still HF's and is rewritten."""
    model = _tiny_llama_with_attention(name)
    gm, inputs = capture_decode_graph(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=1.0))
    dense = without_anchors(gm)
    ctx = run_passes(gm)
    rows = _attention_rows(ctx)
    assert sorted(rows) == [0, 1, 2]
    if rewritten:
        assert all(row.groups == (2, 2) for row in rows.values()), rows
        assert _targets(gm).count(torch.ops.polar.selective_attention.default) == 3
        assert _largest_difference(dense, gm, inputs) < 1e-5
    else:
        assert all(row.groups is None and "repeat_kv" in row.detail for row in rows.values()), rows
        assert torch.ops.polar.selective_attention.default not in _targets(gm)
        assert _largest_difference(dense, gm, inputs) == 0.0


class _OneLayer(torch.nn.Module):
    """router_anchor -> q linear -> ``attend(q, key, value, mask)``: a hand-made decode layer over given K/V."""

    def __init__(self, attend, groups: int = 2, heads: int = 4, head_dim: int = 16, width: int = 64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.q = torch.nn.Linear(width, heads * head_dim, bias=False)
        self.router = torch.nn.Linear(width, groups)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        self.attend, self.heads, self.head_dim, self.groups = attend, heads, head_dim, groups

    def forward(self, x, key, value, mask):
        hidden = torch.ops.polar.router_anchor(x, self.router.weight, self.router.bias, 1, self.groups)
        query = self.q(hidden).view(x.shape[0], 1, self.heads, self.head_dim).transpose(1, 2)
        return self.attend(query, key, value, mask)


def _repeat_kv(x, repeats=2):
    batch, groups, length, head_dim = x.shape
    return x[:, :, None].expand(batch, groups, repeats, length, head_dim).reshape(batch, groups * repeats, length, -1)


def _compiled_layer(layer, *inputs):
    """(eager output, compiled output, the report's one attention row) of ``layer`` through backend="polar"."""
    expected = layer(*inputs)
    compiled = torch.compile(layer, backend="polar", options={"polar.inductor": False}, fullgraph=True)
    got = compiled(*inputs)
    (row,) = [row for row in compile_reports[-1].layers if row.component == "attention"]
    return expected, got, row


def _layer_inputs(batch=3, kv_batch=3, groups=2, length=8, head_dim=16):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 64, generator=generator)
    key = torch.randn(kv_batch, groups, length, head_dim, generator=generator)
    value = torch.randn(kv_batch, groups, length, head_dim, generator=generator)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :3] = False
    return x, key, value, mask


def test_is_causal_with_a_mask_stays_dense():
    """SDPA(mask, is_causal=True) for one query token attends to key 0 only; the rewrite ignored is_causal and
    attended to the whole mask (off by 2.0)."""
    layer = _OneLayer(
        lambda q, k, v, m: F.scaled_dot_product_attention(q, _repeat_kv(k), _repeat_kv(v), attn_mask=m, is_causal=True)
    )
    expected, got, row = _compiled_layer(layer, *_layer_inputs())
    assert not row.rewritten and "is_causal=True" in row.detail, row
    assert torch.equal(expected, got)


def test_kv_broadcast_over_the_batch_stays_dense():
    """A batch-1 K/V (a prefix shared by the batch) under a query batch of 3, through enable_gqa: rewritten, then
    polar::selective_attention refused it at run time (batch mismatch)."""
    layer = _OneLayer(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True))
    expected, got, row = _compiled_layer(layer, *_layer_inputs(kv_batch=1))
    assert not row.rewritten and "batch 1 is not the query's batch 3" in row.detail, row
    assert torch.equal(expected, got)


def test_the_hand_made_layer_is_rewritten_when_everything_matches():
    """The guards' control: the same layer with HF's repeat_kv, a mask and no is_causal goes on the polar kernel."""
    layer = _OneLayer(lambda q, k, v, m: F.scaled_dot_product_attention(q, _repeat_kv(k), _repeat_kv(v), attn_mask=m))
    expected, got, row = _compiled_layer(layer, *_layer_inputs())
    assert row.rewritten and row.groups == (2, 2), row
    assert torch.allclose(expected, got, atol=1e-5)


def test_kv_of_a_dynamic_cache_are_not_static_cache_tensors():
    """torch.compile(model, backend="polar") over a DynamicCache decode step: K/V are the step's torch.cat of the
    cache and the new token, not graph inputs; they were rewritten as if they were a static cache."""
    import inspect

    from transformers import DynamicCache

    model = TINY_MODELS["llama-gqa"]()
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids, mask = prompt_batch(model.config.vocab_size)
    polar_compile.optimize(model, quick_routers("llama-gqa"), SparsityConfig(attention_density=1.0))
    compiled = torch.compile(model, backend="polar", options={"polar.inductor": False}, dynamic=False)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        token = model(ids, attention_mask=mask, **{name: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        step_mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position = torch.tensor([ids.shape[1]])
        reference_cache = copy.deepcopy(cache)
        expected = model(token, attention_mask=step_mask, **{name: reference_cache}, cache_position=position)
        got = compiled(token, attention_mask=step_mask, **{name: cache}, cache_position=position)
    rows = [row for row in compile_reports[-1].layers if row.component == "attention"]
    assert [row.layer for row in rows] == [0, 1, 2]
    assert all(not row.rewritten and row.groups is None for row in rows), rows
    assert all("K/V are not static-cache tensors" in row.detail for row in rows)
    assert torch.allclose(expected.logits, got.logits, atol=1e-5)
