"""Calibration on tiny random models: it learns something, and its pieces do what they claim."""

import random

import pytest
import torch

from polar_compile.config import CalibrationConfig
from polar_compile.routers.calibrate import calibrate
from polar_compile.routers.collect import Reservoir, held_out_rows, pack_bits, samples_per_layer, unpack_bits
from polar_compile.routers.collect import token_batches as make_token_batches
from polar_compile.testing import TINY_MODELS
from tests.routers.conftest import QUICK, random_token_batches

ALL_MODELS = ["llama-gqa", "llama-mha", "mistral", "qwen2", "opt"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_trained_routers_beat_random_routers(calibrated, name):
    model, routers = calibrated(name)
    meta = routers.metadata
    layers = [str(i) for i in range(1, model.config.num_hidden_layers)]
    assert meta["calibration_tokens"] == QUICK.tokens and meta["calibrated"]
    assert list(meta["recall"]) == layers and routers.attention_router(0) is None
    # Held-out recall@k of every trained router beats both the untrained (random) router it started from
    # and a random choice of k groups (k / groups), by a clear margin.
    for layer in layers:
        assert meta["recall"][layer] >= meta["untrained_recall"][layer] + 0.05, (layer, meta)
        assert meta["recall"][layer] >= meta["random_recall"] + 0.05, (layer, meta)
    assert bool(routers.mlp) == (name == "opt")  # mlp="auto": ReLU MLPs only
    parameter = next(model.parameters())
    assert routers.attention_router(1).weight.dtype == parameter.dtype


def test_relu_mlp_routers_and_k_table(calibrated):
    model, routers = calibrated("opt")
    meta = routers.metadata
    assert set(meta["mlp_recall"]) == {"1", "2"} and set(meta["mlp_k_table"]) == {"1", "2"}
    width = model.config.ffn_dim
    for layer in (1, 2):
        assert meta["mlp_recall"][str(layer)] > 0.5
        ks = [routers.mlp_k(layer, batch) for batch in (1, 2, 4, 8, 16, 64, 256)]
        assert all(k is None or 1 <= k <= 0.8 * width for k in ks)
        known = [k for k in ks if k is not None]
        assert known == sorted(known)  # a bigger batch never needs fewer neurons (its union is bigger)
    assert routers.mlp_router(1)(torch.zeros(1, model.config.hidden_size)).shape == (1, width)


def test_gated_mlp_routers_on_request():
    model = TINY_MODELS["qwen2"]()
    config = CalibrationConfig(
        tokens=2048, sequence_length=16, batch_size=8, epochs=2, mlp="on", mlp_rank=16, mlp_label_density=0.25
    )
    routers = calibrate(model, random_token_batches(model.config.vocab_size, 2048), config, progress=False)
    assert set(routers.mlp) == {"1", "2"}
    assert routers.mlp_router(2)[0].out_features == 16  # rank 16
    assert set(routers.metadata["mlp_k_table"]["1"]) == {"1", "2", "4", "8", "16", "32", "64", "128", "256"}


def test_calibration_is_deterministic():
    model = TINY_MODELS["qwen2"]()
    config = CalibrationConfig(tokens=2048, sequence_length=16, batch_size=8, epochs=2, max_samples_per_layer=512)
    first, second = (
        calibrate(model, random_token_batches(model.config.vocab_size, 2048), config, progress=False) for _ in range(2)
    )
    assert first.metadata["recall"] == second.metadata["recall"]
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_memory_stays_bounded():
    model = TINY_MODELS["llama-gqa"]()
    config = CalibrationConfig(tokens=4096, sequence_length=16, batch_size=8, epochs=1, max_samples_per_layer=300)
    routers = calibrate(model, random_token_batches(model.config.vocab_size, 4096), config, progress=False)
    assert routers.metadata["calibration_tokens"] == 4096
    assert routers.metadata["training"]["samples_per_layer"] <= 300
    # The memory budget lowers the samples per layer: 1 MiB over 2 layers of 2 x 256 + 2 x 2 bytes a row.
    from polar_compile.model_info import describe_model

    small = CalibrationConfig(max_memory_gb=2**-10)
    assert samples_per_layer(describe_model(model), 2, False, small) == 2**20 // (2 * 516)


def test_recall_at_k_counts_overlap():
    from polar_compile.routers.train import recall_at_k

    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    perfect = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0]])
    half = torch.tensor([[5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 4.0, 5.0]])
    assert recall_at_k(perfect, labels, 2) == 1.0
    assert recall_at_k(half, labels, 2) == 0.75


def test_recall_at_k_wants_at_most_k_positives():
    # A row with more true positives than k is fully recalled by k of them (min(k, #positives) in the denominator),
    # and a row with none counts 1.
    from polar_compile.routers.train import recall_at_k

    labels = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([[5.0, 4.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    assert recall_at_k(scores, labels, 2) == 1.0
    assert recall_at_k(scores[:1], labels[:1], 3) == pytest.approx(2 / 3)


def test_standardisation_folds_into_the_router():
    from polar_compile.routers.modules import MlpRouter
    from polar_compile.routers.train import _fold_standardisation

    torch.manual_seed(0)
    x = torch.randn(32, 16, dtype=torch.float64) * torch.logspace(-2, 2, 16, dtype=torch.float64) + 3.0
    mean, std = x.mean(0), x.std(0)
    for router in (torch.nn.Linear(16, 5).double(), MlpRouter(16, 4, 7).double()):
        expected = router((x - mean) / std)
        _fold_standardisation(router, mean, std)
        torch.testing.assert_close(router(x), expected)


def test_reservoir_keeps_a_uniform_bounded_sample():
    reservoir = Reservoir(capacity=500, rng=random.Random(0))
    for start in range(0, 20_000, 1000):
        rows = torch.arange(start, start + 1000, dtype=torch.float32)[:, None].expand(1000, 64)
        reservoir.add(rows, rows[:, :1] * 2)
    values, doubled = reservoir.columns()
    assert values.shape == (500, 64) and torch.equal(doubled, values[:, :1] * 2)  # columns stay aligned
    # Every kept row is one whole stream row (blocks draw repeated slots: the later row must win, not a mix).
    assert torch.equal(values, values[:, :1].expand(500, 64))
    assert len(set(values[:, 0].tolist())) == 500
    assert 7_000 < values.mean().item() < 13_000  # uniform over 0..19999 (mean ~10k), not the first rows


def test_held_out_sequences_are_an_even_share():
    held = torch.cat([held_out_rows(start, 8, 0.1) for start in range(0, 800, 8)])
    assert held.sum().item() == 80 and held[0] and not held[1]
    assert held_out_rows(0, 2, 0.1).tolist() == [True, False]  # two sequences are enough for both splits


@pytest.mark.parametrize("width", [1, 8, 13, 64])
def test_bits_round_trip(width):
    mask = torch.rand(5, width, generator=torch.Generator().manual_seed(width)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (width + 7) // 8)
    assert torch.equal(unpack_bits(packed, width), mask.float())


def test_token_batches_from_strings_dicts_and_errors():
    class Tokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    config = CalibrationConfig(sequence_length=8, batch_size=2)
    batches = list(make_token_batches(["abcdefghij" * 3], Tokenizer(), config))
    assert all(b.shape[1] == 8 for b in batches) and sum(b.shape[0] for b in batches) == 3
    rows = list(make_token_batches([{"input_ids": [1, 2, 3]}, torch.ones(2, 3, dtype=torch.int32)], None, config))
    assert [tuple(b.shape) for b in rows] == [(1, 3), (2, 3)] and rows[1].dtype == torch.long
    with pytest.raises(ValueError, match="tokenizer"):
        list(make_token_batches(["text"], None, config))
    with pytest.raises(ValueError, match="empty"):
        list(make_token_batches([], None, config))
    with pytest.raises(ValueError, match="integer"):
        list(make_token_batches([torch.ones(2, 3)], None, config))
    for one in ("abcdefghij" * 3, b"abc"):  # iterating one string would calibrate on its characters, in silence
        with pytest.raises(ValueError, match="got one (str|bytes): wrap it in"):
            list(make_token_batches(one, Tokenizer(), config))


def test_text_problems_are_named_before_the_calibration_runs(monkeypatch):
    """A bare string as selection text, or texts shorter than one sequence, each get a message that says so; the
    selection text is cut into windows before the calibration's work, not after it."""

    class Tokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(c) % 50 for c in text]}

    model = TINY_MODELS["qwen2"]()
    with pytest.raises(ValueError, match="shorter than one sequence of 512 tokens"):
        calibrate(model, ["short text"] * 3, CalibrationConfig(tokens=1000), tokenizer=Tokenizer(), progress=False)
    import polar_compile.routers.calibrate as module

    monkeypatch.setattr(module, "collect", lambda *_, **__: pytest.fail("the calibration ran before the check"))
    for selection, message in (("one string", "got one str"), (["too short"], "tokens a window needs")):
        with pytest.raises(ValueError, match=message):
            calibrate(model, ["x" * 3000], CalibrationConfig(tokens=1024), tokenizer=Tokenizer(),
                      selection_texts=selection, progress=False)  # fmt: skip


def test_one_sequence_is_not_enough():
    model = TINY_MODELS["qwen2"]()
    with pytest.raises(ValueError, match="at least 2 sequences"):
        calibrate(model, [torch.zeros(1, 16, dtype=torch.long)], QUICK, progress=False)


def test_mlp_k_table_reaches_the_union_target():
    from polar_compile.routers.train import mlp_k_table

    torch.manual_seed(0)
    active = (torch.rand(400, 64) < 0.1).float()
    table = mlp_k_table(torch.nn.Identity(), active * 3.0, active, 0.99, seed=0)  # a router that sees the labels
    assert table["1"] is not None and table["1"] <= 12  # ~6 active neurons per token
    assert table["256"] is None  # the union of 256 tokens covers nearly every neuron: dense


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_memory_gb": 0.0}, "max_memory_gb"), ({"weight_decay": -1.0}, "weight_decay"), ({"epochs": 0}, "epochs")],
)
def test_new_calibration_fields_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**kwargs)


def test_post_label_scores_each_group_by_its_contribution_after_o_proj():
    from polar_compile.model_info import describe_model
    from polar_compile.routers.collect import collect

    model = TINY_MODELS["llama-gqa"]()
    info = describe_model(model)
    layer = info.layers[1]
    width = info.group_size * info.head_dim

    def scores(label: str):
        config = CalibrationConfig(tokens=512, sequence_length=16, batch_size=8, max_samples_per_layer=256, label=label)
        batches = random_token_batches(model.config.vocab_size, 512)
        return collect(model, batches, info, [1], [], config, progress=False).train[1].group_scores.float()

    with torch.no_grad():
        layer.o_proj.weight.copy_(torch.eye(layer.o_proj.weight.shape[0]))
    pre, post = scores("pre"), scores("post")
    # with an identity o_proj a group's contribution is its heads' outputs side by side: between the largest head
    # norm (the pre label) and sqrt(group size) times it
    assert (post >= pre * (1 - 2**-7)).all() and (post <= pre * info.group_size**0.5 * (1 + 2**-7)).all()
    assert (post > pre * (1 + 2**-6)).any()
    with torch.no_grad():
        layer.o_proj.weight[:, :width] *= 4  # group 0's columns: its contribution, not its heads, is 4x larger
    assert torch.equal(scores("pre"), pre)
    scaled = scores("post")
    assert torch.equal(scaled[:, 0], 4 * post[:, 0]) and torch.equal(scaled[:, 1:], post[:, 1:])
    with pytest.raises(ValueError, match="label"):
        CalibrationConfig(label="norm")


def test_pre_label_scores_each_group_by_its_largest_head_norm():
    """A GQA group's pre label is the largest output norm of its query heads (not their mean, which a group with
    one strong head would rank low); every sampled row is one the model produced."""
    from polar_compile.model_info import describe_model
    from polar_compile.routers.collect import collect

    model = TINY_MODELS["llama-gqa"]()
    info = describe_model(model)
    assert info.group_size > 1
    layer = info.layers[1]
    seen = []
    handle = layer.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    config = CalibrationConfig(tokens=512, sequence_length=16, batch_size=8, max_samples_per_layer=256, label="pre")
    try:
        got = collect(model, random_token_batches(model.config.vocab_size, 512), info, [1], [], config, progress=False)
    finally:
        handle.remove()
    heads = torch.cat(seen).reshape(-1, info.num_heads, info.head_dim).float().norm(dim=-1)
    expected = heads.view(-1, info.num_groups, info.group_size).amax(-1).to(torch.bfloat16)
    scores = torch.cat([got.train[1].group_scores, got.valid[1].group_scores])
    assert (scores[:, None, :] == expected[None, :, :]).all(-1).any(-1).all()


def test_a_batch_takes_the_k_of_the_smallest_bucket_that_holds_it():
    """The lookup took the largest bucket <= the batch: a batch of 3 got the k fitted for 2 rows, whose union is
    smaller, and missed the recall target (0.91 at B=3, 0.78 at B=7 on synthetic data, target 0.95)."""
    from polar_compile.routers.modules import PolarRouters

    model = TINY_MODELS["opt"]()
    routers = PolarRouters.for_model(model, density=0.5, mlp=True, mlp_rank=8, mlp_density=0.3)
    routers.metadata["mlp_k_table"]["1"] = {"1": 10, "2": 20, "4": 40, "8": None}
    assert [routers.mlp_k(1, batch) for batch in (1, 2, 3, 4, 5, 8, 9)] == [10, 20, 40, 40, None, None, None]
    flat = routers.metadata["mlp_k_table"]["2"]  # for_model's flat table covers every bucket
    assert routers.mlp_k(2, 200) == flat["256"] and routers.mlp_k(2, 257) is None  # past the buckets: dense


def test_the_k_table_never_shrinks_with_the_batch_and_an_empty_batch_is_recalled_whole():
    from polar_compile.routers.train import MLP_BATCH_BUCKETS, mlp_k_table

    torch.manual_seed(0)
    width = 64
    router = torch.nn.Linear(8, width)
    inputs = torch.randn(500, 8)
    for seed in range(6):
        active = (torch.rand(500, width) < 0.02).float()
        table = mlp_k_table(router, inputs, active, 0.9, seed)
        ks = [table[str(b)] for b in MLP_BATCH_BUCKETS]
        known = [k for k in ks if k is not None]
        assert known == sorted(known), table  # per-bucket trials used to alternate (e.g. 118, None, 199)
        first_dense = next((i for i, k in enumerate(ks) if k is None), len(ks))
        assert all(k is None for k in ks[first_dense:]), table
    silent = mlp_k_table(router, inputs, torch.zeros(500, width), 0.9, 0)
    assert silent["1"] == 1  # no active neuron: nothing to recall (it counted as recall 0 and went dense)


def test_mlp_routers_train_on_the_input_the_decode_step_feeds_them():
    """The MLP router's samples are the input of fc1 (the MLP's first linear, which the compiler's MLP hook reads),
    not the attention router's q_proj input (they differ: one is before attention, one after)."""
    from polar_compile.model_info import describe_model
    from polar_compile.routers.collect import collect

    model = TINY_MODELS["opt"]()
    info = describe_model(model)
    config = CalibrationConfig(tokens=512, sequence_length=16, batch_size=8, validation_fraction=0.25)
    batches = random_token_batches(model.config.vocab_size, 512)
    collected = collect(model, batches, info, [1, 2], [1, 2], config, progress=False)
    seen = {}
    handles = [
        layer.mlp_up.register_forward_pre_hook(lambda m, a, i=layer.index: seen.setdefault(i, []).append(a[0]))
        for layer in info.layers
    ]
    with torch.no_grad():
        for ids in batches:
            model.model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    held_out = held_out_rows(0, 4 * 8, 0.25)[:, None].expand(32, 16).reshape(-1)
    for index in (1, 2):
        fc1_input = torch.cat(seen[index]).reshape(-1, info.hidden_size).to(torch.bfloat16)
        assert torch.equal(collected.train[index].mlp_hidden, fc1_input[~held_out])
        assert torch.equal(collected.valid[index].mlp_hidden, fc1_input[held_out])
        assert not torch.equal(collected.train[index].hidden, collected.train[index].mlp_hidden)


def test_mlp_recall_is_what_the_router_reaches_on_its_decode_input(calibrated):
    """The stored MLP recall holds on fresh text fed as the decode step feeds it (the fc1 input)."""
    from polar_compile.model_info import describe_model
    from polar_compile.routers.train import recall_at_k

    model, routers = calibrated("opt")
    info = describe_model(model)
    seen, handles = {}, []
    for layer in info.layers:
        keep = lambda i, name: lambda m, a: seen.__setitem__((name, i), a[0].reshape(-1, a[0].shape[-1]))  # noqa: E731
        handles.append(layer.mlp_up.register_forward_pre_hook(keep(layer.index, "input")))
        handles.append(layer.mlp_down.register_forward_pre_hook(keep(layer.index, "activation")))
    ids = torch.cat(random_token_batches(model.config.vocab_size, 2048, seed=7))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    for index in (1, 2):
        active = (seen[("activation", index)] > 0).float()
        k = max(1, round(active.sum(1).mean().item()))
        with torch.no_grad():
            recall = recall_at_k(routers.mlp_router(index)(seen[("input", index)]), active, k)
        assert abs(recall - routers.metadata["mlp_recall"][str(index)]) < 0.03, (index, recall, routers.metadata)


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (torch.randint(0, 100, (4, 40)).int(), r"\(4, 40\) torch.int32 tensor: convert it with .long\(\)"),
        (torch.randint(0, 100, (40,)), r"\(40,\) torch.int64"),
        (torch.randint(0, 100, (4, 20)), "windows of 20 tokens are too short: each needs more than 32 tokens"),
        (torch.zeros(0, 40, dtype=torch.long), "0 rows"),
    ],
)
def test_selection_windows_are_checked_before_the_calibration_runs(monkeypatch, windows, message):
    import polar_compile.routers.calibrate as module

    monkeypatch.setattr(module, "collect", lambda *_, **__: pytest.fail("the calibration ran before the check"))
    model = TINY_MODELS["qwen2"]()
    batches = random_token_batches(model.config.vocab_size, 512)
    with pytest.raises(ValueError, match=message):
        calibrate(model, batches, CalibrationConfig(tokens=512, sequence_length=16), selection_texts=windows,
                  progress=False)  # fmt: skip


def test_a_density_that_keeps_every_group_is_refused_before_the_calibration_runs(monkeypatch):
    """At 0.75 of 2 groups k rounds up to 2: every group would be labelled active and decode would stay dense."""
    import polar_compile.routers.calibrate as module
    from polar_compile.testing import tiny_model

    monkeypatch.setattr(module, "collect", lambda *_, **__: pytest.fail("the calibration ran before the check"))
    model = TINY_MODELS["llama-gqa"]()  # 2 KV groups
    batches = random_token_batches(model.config.vocab_size, 512)
    with pytest.raises(ValueError, match=r"density 0.75 keeps all 2 KV groups .* below 0.75 \(k < 2\)"):
        calibrate(model, batches, CalibrationConfig(tokens=512, sequence_length=16, density=0.75), progress=False)
    one_group = tiny_model("LlamaConfig", vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="1 KV group.*expand_kv_heads"):
        calibrate(one_group, batches, CalibrationConfig(tokens=512, sequence_length=16, density=0.4), progress=False)


@pytest.mark.parametrize(
    ("batches", "fraction", "message"),
    [
        # 2 sequences of one token: one held out, one token left to train on (its std is NaN: NaN routers)
        ([torch.randint(0, 100, (2, 1))], 0.1, "the training split got 1 of the 2 tokens .* at least 2"),
        # a validation fraction over 0.5 holds out both sequences of a short stream
        ([torch.randint(0, 100, (2, 16))], 0.6, "the training split got 0 of the 32 tokens.*lower validation_fraction"),
    ],
)
def test_too_few_tokens_for_a_split_are_named(batches, fraction, message):
    model = TINY_MODELS["llama-gqa"]()
    config = CalibrationConfig(tokens=32, sequence_length=16, epochs=1, validation_fraction=fraction,
                               perplexity_budget=None)  # fmt: skip
    with pytest.raises(ValueError, match=f"too few calibration tokens: {message}"):
        calibrate(model, batches, config, progress=False)


def test_both_splits_from_two_sequences_up_to_half_held_out():
    """What held_out_rows promises: sequence 0 held out, sequence 1 trained on, for any fraction <= 0.5."""
    for fraction in (0.01, 0.1, 0.25, 0.5):
        assert held_out_rows(0, 2, fraction).tolist() == [True, False], fraction
    assert held_out_rows(0, 2, 0.6).tolist() == [True, True]  # which collect names (test above)


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([torch.randint(256, 266, (8, 16))] * 3, r"token batch 0 holds ids from 2\d\d to 2\d\d, outside .*\[0, 256\)"),
        ([torch.randint(0, 256, (8, 16)), torch.full((8, 16), -1)], "token batch 1 holds ids from -1 to -1"),
        ([torch.zeros(8, 0, dtype=torch.long)] + [torch.randint(0, 256, (8, 16))] * 3, r"empty \(shape \(8, 0\)\)"),
        ([torch.zeros(0, 16, dtype=torch.long)] * 3, r"token batch 0 is empty \(shape \(0, 16\)\)"),
    ],
)
def test_token_ids_outside_the_vocabulary_and_empty_batches_are_named(batches, message):
    model = TINY_MODELS["llama-gqa"]()  # vocabulary of 256
    config = CalibrationConfig(tokens=256, sequence_length=16, epochs=1, perplexity_budget=None)
    with pytest.raises(ValueError, match=message):
        calibrate(model, batches, config, progress=False)


def test_rows_longer_than_the_model_positions_are_named_before_a_forward():
    """OPT's learned position table has 512 rows here: 1,024-token sequences used to end in an IndexError from inside
    the embedding; now the first batch is refused with both numbers and the setting to change."""

    class Tokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(c) % 50 for c in text]}

    model = TINY_MODELS["opt"]()
    assert model.config.max_position_embeddings == 512
    forwards = []
    model.model.decoder.register_forward_pre_hook(lambda *_: forwards.append(1))
    config = CalibrationConfig(tokens=4096, sequence_length=1024, epochs=1, perplexity_budget=None)
    message = "rows of 1024 tokens are longer than the model's 512 positions .*sequence_length .* at most 512"
    with pytest.raises(ValueError, match=message):
        calibrate(model, ["x" * 9000], config, tokenizer=Tokenizer(), progress=False)
    with pytest.raises(ValueError, match="rows of 600 tokens are longer than the model's 512 positions"):
        calibrate(model, [torch.zeros(2, 600, dtype=torch.long)] * 4, config, progress=False)
    assert forwards == []
