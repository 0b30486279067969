"""Collection: run the dense model over a token stream and keep, per layer, a bounded sample of what routers learn.

Per sparse layer and per token, hooks record:
- the router input: the input of ``q_proj`` (the normalised hidden state: ``input_layernorm`` for Llama-style
  models, ``self_attn_layer_norm`` for OPT), found through a forward pre-hook, so no per-model code;
- the group scores: the L2 norm of each query head's attention output (the input of the output projection,
  (N, Hq x D) -> (N, Hq)), max over the query heads of each KV group -> (N, groups); or, with
  ``config.label == "post"``, the L2 norm of each group's contribution to the output projection's output,
  ``|| W_o[:, cols of the group] @ attn[cols of the group] ||`` -> (N, groups);
- for MLP routers, their own input: the input of the MLP's first linear (``fc1`` / ``up_proj`` of a plain MLP, the
  gate (or fused gate/up) projection of a gated one: the normalised hidden state after attention,
  ``post_attention_layernorm`` / ``final_layer_norm``), the tensor the compiled decode step feeds the MLP router;
- for MLP routers, the active neurons: the down projection's input is the MLP activation (relu(fc1) or
  act(gate) x up); active = > 0 for ReLU MLPs, the top ``mlp_label_density`` share of |activation| for gated
  MLPs; stored as packed bits (F / 8 bytes per token).

Memory is bounded whatever the token count: every layer keeps a uniform reservoir sample of at most
``samples_per_layer`` tokens (hidden state and scores in bfloat16), allocated up front, so the peak is known
before the first batch: ``layers x samples x (2 d + 2 groups [+ 2 d + F / 8])`` bytes, for the training and the
held-out reservoirs together. Whole sequences go to the held-out reservoir (every ``1 / validation_fraction``-th
sequence of the stream), so held-out recall is measured on text the routers never trained on.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from polar_compile.config import CalibrationConfig
from polar_compile.model_info import ModelInfo

log = logging.getLogger("polar_compile")

# Tokens each split needs at the least: training standardises its inputs by their per-feature standard deviation,
# which one row does not have (NaN routers), and the held-out split picks the checkpoint.
MIN_SPLIT_TOKENS = 2

# --------------------------------------------------------------------------------------------------
# Token stream
# --------------------------------------------------------------------------------------------------


def token_batches(
    texts, tokenizer, config: CalibrationConfig, vocab_size: int | None = None, positions: int | None = None
) -> Iterator[torch.Tensor]:
    """(rows, columns) LongTensors from ``texts``.

    texts: None (the Wikipedia train split), strings (tokenised, EOS-separated and packed into
        ``config.batch_size x config.sequence_length`` batches; needs ``tokenizer``), or token batches:
        LongTensors (B, T) or (T,), or dicts with "input_ids" (e.g. rows of a ``datasets`` dataset).
    vocab_size: if given, every id must be in [0, vocab_size) (the model's embedding rows), else ValueError.
    positions: if given, no row may be longer (the model's ``max_position_embeddings``), else ValueError.
    """
    for number, ids in enumerate(_token_batches(texts, tokenizer, config)):
        if ids.numel() == 0:
            raise ValueError(f"token batch {number} is empty (shape {tuple(ids.shape)}): every batch needs at least "
                             "one row of at least one token")  # fmt: skip
        if positions is not None and ids.shape[1] > positions:
            raise ValueError(f"calibration rows of {ids.shape[1]} tokens are longer than the model's {positions} "
                             f"positions (config.max_position_embeddings): for text, set CalibrationConfig."
                             f"sequence_length (calibrate --sequence-length) to at most {positions}; token batches, "
                             f"cut their rows")  # fmt: skip
        if vocab_size is not None:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"token batch {number} holds ids from {low} to {high}, outside the model's vocabulary "
                                 f"[0, {vocab_size}): were they made by another model's tokenizer?")  # fmt: skip
        yield ids


def _token_batches(texts, tokenizer, config: CalibrationConfig) -> Iterator[torch.Tensor]:
    if texts is None:
        from polar_compile.assets import load_wiki_texts

        texts = load_wiki_texts("train")
    if isinstance(texts, (str, bytes)):  # iterating it would calibrate on single characters
        raise ValueError(f"texts must be a list (or iterable) of strings, got one {type(texts).__name__}: "
                         "wrap it in [...]")  # fmt: skip
    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        raise ValueError("calibration needs at least one text or token batch, got an empty iterable")
    if isinstance(first, str):
        if tokenizer is None:
            raise ValueError("calibrating on strings needs tokenizer=... (or pass token-id batches)")
        yield from _pack_strings(_chain(first, texts), tokenizer, config)
        return
    for batch in _chain(first, texts):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token batches must be (B, T) integer tensors, got {tuple(ids.shape)} {ids.dtype}")
        yield ids.long()


def _chain(first, rest):
    yield first
    yield from rest


def _pack_strings(texts, tokenizer, config: CalibrationConfig) -> Iterator[torch.Tensor]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, buffer, size = [], [], config.sequence_length
    for text in texts:
        buffer += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        while len(buffer) >= size:
            rows.append(buffer[:size])
            buffer = buffer[size:]
            if len(rows) == config.batch_size:
                yield torch.tensor(rows)
                rows = []
    if rows:
        yield torch.tensor(rows)


# --------------------------------------------------------------------------------------------------
# Bounded storage
# --------------------------------------------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(N, F) bool -> (N, ceil(F / 8)) uint8, 8 neurons a byte (little-endian bit order)."""
    rows, width = mask.shape
    padded = torch.zeros(rows, math.ceil(width / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :width] = mask
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (N, ceil(F / 8)) uint8 -> (N, F) float32 of 0 / 1."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] & weights) != 0
    return bits.reshape(packed.shape[0], -1)[:, :width].float()


class Reservoir:
    """Uniform sample of at most ``capacity`` rows from a stream of row blocks (columns kept aligned)."""

    def __init__(self, capacity: int, rng: random.Random):
        self.capacity, self.rng, self.seen = capacity, rng, 0
        self.stored: tuple[torch.Tensor, ...] | None = None

    def add(self, *columns: torch.Tensor) -> None:
        """Fill first, then replace stored rows by the reservoir rule (Algorithm R), a whole block at once."""
        n = columns[0].shape[0]
        if self.stored is None:
            self.stored = tuple(torch.empty((self.capacity, *c.shape[1:]), dtype=c.dtype) for c in columns)
        free = max(0, min(n, self.capacity - self.seen))
        if free:
            for store, column in zip(self.stored, columns):
                store[self.seen : self.seen + free] = column[:free]
        # row j of the stream (1-based) replaces a random slot with probability capacity / j
        positions = torch.arange(self.seen + free + 1, self.seen + n + 1, dtype=torch.float64)
        self.seen += n
        if free == n:
            return
        generator = torch.Generator().manual_seed(self.rng.randrange(2**62))
        draws = (torch.rand(len(positions), generator=generator, dtype=torch.float64) * positions).long()
        keep = draws < self.capacity
        rows = torch.arange(free, n)[keep]
        slots = draws[keep]
        # Two rows of one block can draw the same slot: the later one wins, as when adding row by row (and an
        # index_put with repeated indices would pick either, or mix them).
        last = torch.full((self.capacity,), -1, dtype=torch.long)
        last.scatter_reduce_(0, slots, torch.arange(len(slots)), reduce="amax")
        slots = (last >= 0).nonzero().flatten()
        rows = rows[last[slots]]
        for store, column in zip(self.stored, columns):
            store[slots] = column[rows]

    def columns(self) -> tuple[torch.Tensor, ...]:
        if self.stored is None:
            return ()
        count = min(self.seen, self.capacity)
        return tuple(store[:count] for store in self.stored)


@dataclass
class LayerSamples:
    """What one layer's routers train on: attention router inputs (N, d) bf16, group scores (N, groups) bf16; for
    MLP routers their inputs (N, d) bf16 (the MLP's first linear's input) and active-neuron bits, else None."""

    hidden: torch.Tensor
    group_scores: torch.Tensor
    mlp_active: torch.Tensor | None  # (N, ceil(F / 8)) uint8, see pack_bits
    mlp_hidden: torch.Tensor | None = None  # (N, d) bf16: the input of the MLP's up (plain) or gate (gated) linear


@dataclass
class Collected:
    train: dict[int, LayerSamples]
    valid: dict[int, LayerSamples]
    tokens: int
    samples_per_layer: int  # capacity of the training reservoir


def _row_bytes(info: ModelInfo, with_mlp: bool) -> int:
    mlp = 2 * info.hidden_size + math.ceil(info.intermediate_size / 8) if with_mlp else 0
    return 2 * info.hidden_size + 2 * info.num_groups + mlp


def samples_per_layer(info: ModelInfo, num_layers: int, with_mlp: bool, config: CalibrationConfig) -> int:
    """Rows each layer keeps (train + held-out): min(tokens, max_samples_per_layer, memory budget / layers)."""
    budget_rows = int(config.max_memory_gb * 2**30) // max(1, num_layers * _row_bytes(info, with_mlp))
    return max(16, min(config.tokens, config.max_samples_per_layer, budget_rows))


def held_out_rows(first_sequence: int, rows: int, fraction: float) -> torch.Tensor:
    """Which of ``rows`` sequences (numbered from ``first_sequence`` in the stream) are held out: a ``fraction``
    of all sequences, spread evenly (sequences 0, 1/f, 2/f, ...). Sequence 0 is always held out and, for a fraction
    <= 0.5, sequence 1 never is, so any stream of >= 2 sequences has both splits; a larger fraction can hold out
    every sequence of a short stream (``collect`` then says so).
    Strings are packed across sequences, so a document cut at a sequence boundary can have tokens on both sides:
    no token is in both splits, but held-out recall is measured on text that is not wholly unseen."""
    index = torch.arange(first_sequence, first_sequence + rows, dtype=torch.float64)
    return torch.ceil((index + 1) * fraction) > torch.ceil(index * fraction)


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    info: ModelInfo,
    layers: list[int],
    mlp_layers: list[int],
    config: CalibrationConfig,
    progress: bool = True,
) -> Collected:
    """Run ``model`` (its base model: no LM head) over ``batches`` until ``config.tokens``; per layer, samples."""
    rng = random.Random(config.seed)
    capacity = samples_per_layer(info, len(layers), bool(mlp_layers), config)
    valid_capacity = max(8, math.ceil(capacity * config.validation_fraction))
    train_capacity = max(8, capacity - valid_capacity)
    reservoirs = {
        "train": {i: Reservoir(train_capacity, rng) for i in layers},
        "valid": {i: Reservoir(valid_capacity, rng) for i in layers},
    }
    pending: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    gated_keep = max(1, round(config.mlp_label_density * info.intermediate_size)) if mlp_layers else 0
    device = next(model.parameters()).device
    handles = []

    def on_q_input(index):
        def hook(module, args):
            pending[index]["hidden"] = args[0].reshape(-1, args[0].shape[-1]).to(torch.bfloat16)

        return hook

    def on_o_input(index):
        def hook(module, args):
            if config.label == "post":
                width = info.group_size * info.head_dim  # a group's columns of the o_proj input are contiguous
                attention = args[0].reshape(-1, info.num_groups, width).float()
                weight = module.weight.float().view(module.weight.shape[0], info.num_groups, width)
                groups = torch.einsum("ngc,dgc->ngd", attention, weight).norm(dim=-1)  # (N, groups)
            else:
                heads = args[0].reshape(-1, info.num_heads, info.head_dim).float().norm(dim=-1)  # (N, Hq)
                groups = heads.view(-1, info.num_groups, info.group_size).amax(-1)  # (N, groups)
            pending[index]["groups"] = groups.to(torch.bfloat16)

        return hook

    def on_mlp_input(index):
        def hook(module, args):
            pending[index]["mlp_hidden"] = args[0].reshape(-1, args[0].shape[-1]).to(torch.bfloat16)

        return hook

    def on_mlp_activation(index):
        def hook(module, args):
            activation = args[0].reshape(-1, args[0].shape[-1])
            if info.relu_mlp:
                active = activation > 0
            else:
                top = activation.float().abs().topk(gated_keep, dim=-1).indices
                active = torch.zeros_like(activation, dtype=torch.bool).scatter_(-1, top, True)
            pending[index]["mlp"] = pack_bits(active)

        return hook

    for layer in info.layers:
        if layer.index in pending:
            handles.append(layer.q_proj.register_forward_pre_hook(on_q_input(layer.index)))
            handles.append(layer.o_proj.register_forward_pre_hook(on_o_input(layer.index)))
            if layer.index in mlp_layers:
                # the module the compiler's MLP hook reads its router input from (compiler._plan_mlp)
                first = layer.mlp_gate if layer.mlp_kind == "gated" else layer.mlp_up
                handles.append(first.register_forward_pre_hook(on_mlp_input(layer.index)))
                handles.append(layer.mlp_down.register_forward_pre_hook(on_mlp_activation(layer.index)))
    tokens = sequences = held_out_tokens = 0
    bar = tqdm(total=config.tokens, desc="collect", unit="tok", disable=not progress)
    base = getattr(model, "base_model", model)
    try:
        for ids in batches:
            if tokens >= config.tokens:
                break
            ids = ids[: max(1, math.ceil((config.tokens - tokens) / ids.shape[1]))].to(device)
            base(input_ids=ids, use_cache=False)
            held_out = held_out_rows(sequences, ids.shape[0], config.validation_fraction)
            held_out = held_out[:, None].expand(ids.shape).reshape(-1)  # per token, as the hooks flatten (B, T)
            for index, record in pending.items():
                columns = [record["hidden"].cpu(), record["groups"].cpu()]
                if "mlp" in record:
                    columns += [record["mlp"].cpu(), record["mlp_hidden"].cpu()]
                for split, rows in (("valid", held_out), ("train", ~held_out)):
                    if rows.any():
                        reservoirs[split][index].add(*(column[rows] for column in columns))
                record.clear()
            tokens += ids.numel()
            held_out_tokens += int(held_out.sum())
            sequences += ids.shape[0]
            bar.update(ids.numel())
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError(f"calibration saw no tokens: the texts are empty or, together, shorter than one sequence of "
                         f"{config.sequence_length} tokens (CalibrationConfig.sequence_length)")  # fmt: skip
    if sequences < 2:
        raise ValueError(f"calibration needs at least 2 sequences (one is held out to measure recall), got "
                         f"{sequences}: give more text or more tokens (strings are packed into sequences of "
                         f"{config.sequence_length})")  # fmt: skip
    for split, count in (("training", tokens - held_out_tokens), ("held-out", held_out_tokens)):
        if count < MIN_SPLIT_TOKENS:
            fraction = config.validation_fraction
            remedy = "give more text or tokens" + (", or lower validation_fraction (at most 0.5 leaves a sequence to "
                                                   "train on)" if fraction > 0.5 else "")  # fmt: skip
            raise ValueError(f"too few calibration tokens: the {split} split got {count} of the {tokens} tokens "
                             f"({sequences} sequences, validation_fraction {fraction:g}) and needs at least "
                             f"{MIN_SPLIT_TOKENS}: {remedy}")  # fmt: skip
    if tokens < config.tokens:
        log.warning("polar_compile: the calibration text gave %d tokens of the %d asked for", tokens, config.tokens)

    def samples(split: str) -> dict[int, LayerSamples]:
        out = {}
        for index, reservoir in reservoirs[split].items():
            columns = reservoir.columns()
            mlp = columns[2:] if len(columns) > 2 else (None, None)
            out[index] = LayerSamples(columns[0], columns[1], *mlp)
        return out

    return Collected(samples("train"), samples("valid"), tokens, train_capacity)
