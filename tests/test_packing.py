"""Packing q/k/v and gate/up into one buffer: same values, same outputs, same memory; unpacking undoes it."""

import pytest
import torch
from torch import nn

from polar_compile.model_info import describe_model
from polar_compile.packing import is_packed, pack_projections, projection_groups, unpack_projections
from polar_compile.testing import TINY_MODELS


def _storages(model) -> int:
    return len({p.untyped_storage().data_ptr() for p in model.parameters()})


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "opt"])
def test_packing_keeps_values_and_outputs_and_frees_the_old_storages(name):
    model = TINY_MODELS[name]()
    info = describe_model(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    values = {key: value.clone() for key, value in model.state_dict().items()}
    storages = _storages(model)
    groups = projection_groups(info)
    gated = info.layers[0].mlp_kind == "gated"
    assert len(groups) == info.num_layers * (2 if gated else 1)

    packed, reasons = pack_projections(info)

    assert packed == len(groups) and reasons == {}
    assert all(is_packed(linears) for _, linears in groups)
    # one storage per group replaces one per weight (and per bias): nothing is duplicated
    tensors_per_group = sum(len(linears) * (2 if linears[0].bias is not None else 1) for _, linears in groups)
    buffers_per_group = sum(2 if linears[0].bias is not None else 1 for _, linears in groups)
    assert _storages(model) == storages - tensors_per_group + buffers_per_group
    assert all(torch.equal(values[key], value) for key, value in model.state_dict().items())
    assert torch.equal(model(ids).logits, before)
    first = groups[0][1][0].weight.untyped_storage().data_ptr()
    assert pack_projections(info)[0] == packed and groups[0][1][0].weight.untyped_storage().data_ptr() == first

    assert unpack_projections(info) == len(groups)
    assert _storages(model) == storages and not any(is_packed(linears) for _, linears in groups)
    assert all(torch.equal(values[key], value) for key, value in model.state_dict().items())
    assert torch.equal(model(ids).logits, before)


def test_in_place_updates_reach_the_packed_buffer():
    model = TINY_MODELS["llama-gqa"]()
    info = describe_model(model)
    pack_projections(info)
    _, (q, k, v) = projection_groups(info)[0]
    new = torch.randn_like(k.weight)
    model.load_state_dict({**model.state_dict(), f"{info.layers[0].path}.self_attn.k_proj.weight": new})
    buffer = torch.as_strided(q.weight, (q.out_features + k.out_features + v.out_features, q.in_features),
                              (q.in_features, 1), q.weight.storage_offset())  # fmt: skip
    assert torch.equal(buffer[q.out_features : q.out_features + k.out_features], new)


class _WrappedLinear(nn.Linear):
    """Stands for a quantised or otherwise special linear: never packed."""


def test_groups_that_cannot_be_packed_say_why():
    model = TINY_MODELS["llama-gqa"]()
    info = describe_model(model)
    attention = info.layers[0].attention
    wrapped = _WrappedLinear(attention.k_proj.in_features, attention.k_proj.out_features, bias=False)
    attention.k_proj = wrapped
    info.layers[1].attention.v_proj.bias = nn.Parameter(torch.zeros(info.layers[1].attention.v_proj.out_features))
    packed, reasons = pack_projections(info)
    assert packed == len(projection_groups(info)) - 2
    assert "plain nn.Linear" in reasons["layer 0 q/k/v"]
    assert "bias" in reasons["layer 1 q/k/v"]
    assert not is_packed(projection_groups(info)[0][1])
