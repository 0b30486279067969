"""Calibration: collect router inputs and labels from the dense model, train the routers, keep the best.

1. Collect. The dense model runs over a token stream (``model.base_model``: no LM head, it is not needed).
   Hooks record, for each sparse layer: the router input (the q projection's input, i.e. the normalised
   hidden state), the per-group attention score (L2 norm of each query head's output before the output
   projection, max over the query heads of a KV group), and for MLP routers the MLP activation (the down
   projection's input). Memory is bounded: each layer keeps a uniform reservoir sample of at most
   ``config.max_samples_per_layer`` tokens (stored in bfloat16), i.e. at most
   ``layers x max_samples x (d + groups [+ F]) x 2`` bytes whatever the token count.
2. Label. Attention: group in the top-k of the group scores (k = groups at ``config.density``). MLP: neuron
   active (activation > 0) for ReLU MLPs; for gated MLPs, neuron in the top ``mlp_label_density`` share of
   |act(gate) x up|.
3. Train. Per layer, on a held-out split: AdamW on class-weighted binary cross-entropy, keeping the epoch
   with the best held-out recall@k (attention) or recall of active neurons at the router's top-k (MLP).
4. MLP k-table. For batch-size buckets, the smallest k whose batch-union top-k (ReLU'd router scores summed
   over the batch) recalls ``mlp_recall_target`` of the true union of active neurons; ``None`` (dense) when
   that k exceeds 80% of F.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from polar_compile.config import CalibrationConfig, groups_for_density
from polar_compile.model_info import ModelInfo, describe_model
from polar_compile.routers.modules import PolarRouters, model_fingerprint

MLP_BATCH_BUCKETS = (1, 8, 16, 32, 64, 128, 256)
MLP_DENSE_FRACTION = 0.8


# --------------------------------------------------------------------------------------------------
# Token stream
# --------------------------------------------------------------------------------------------------


def token_batches(texts, tokenizer, config: CalibrationConfig) -> Iterator[torch.Tensor]:
    """(batch_size, sequence_length) LongTensors from strings (concatenated, EOS-separated) or token batches."""
    if texts is None:
        from polar_compile.assets import load_wiki_texts

        texts = load_wiki_texts("train")
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
# Collection
# --------------------------------------------------------------------------------------------------


class _Reservoir:
    """Uniform sample of at most ``capacity`` rows from a stream of (rows, ...) tensor tuples."""

    def __init__(self, capacity: int, rng: random.Random):
        self.capacity, self.rng, self.seen = capacity, rng, 0
        self.stored: tuple[torch.Tensor, ...] | None = None

    def add(self, *columns: torch.Tensor) -> None:
        """Fill first, then replace stored rows by the reservoir rule, for a whole block of rows at once."""
        n = columns[0].shape[0]
        if self.stored is None:
            self.stored = tuple(torch.empty((self.capacity, *c.shape[1:]), dtype=c.dtype) for c in columns)
        free = max(0, min(n, self.capacity - self.seen))
        if free:
            for store, column in zip(self.stored, columns):
                store[self.seen : self.seen + free] = column[:free]
        positions = torch.arange(self.seen + free + 1, self.seen + n + 1, dtype=torch.float64)
        self.seen += n
        if free == n:
            return
        generator = torch.Generator().manual_seed(self.rng.randrange(2**62))
        draws = (torch.rand(len(positions), generator=generator, dtype=torch.float64) * positions).long()
        keep = draws < self.capacity
        rows = torch.arange(free, n)[keep]
        slots = draws[keep]
        for store, column in zip(self.stored, columns):
            store[slots] = column[rows]

    def columns(self) -> tuple[torch.Tensor, ...]:
        count = min(self.seen, self.capacity)
        return tuple(store[:count] for store in self.stored)


def _mlp_label_source(layer) -> nn.Linear:
    return layer.mlp_down  # its input is the MLP activation (relu(fc1) or act(gate) * up)


@torch.no_grad()
def collect(model, batches: Iterable[torch.Tensor], info: ModelInfo, layers: list[int], mlp_layers: list[int],
            config: CalibrationConfig, progress: bool = True) -> tuple[dict[int, _Reservoir], int]:  # fmt: skip
    """Run the dense model over ``batches`` (until config.tokens); per layer, a reservoir of samples."""
    rng = random.Random(config.seed)
    reservoirs = {i: _Reservoir(config.max_samples_per_layer, rng) for i in layers}
    pending: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    device = next(model.parameters()).device
    handles = []

    def on_q_input(index):
        def hook(module, args):
            pending[index]["hidden"] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    def on_o_input(index):
        def hook(module, args):
            heads = args[0].reshape(-1, info.num_heads, info.head_dim).float().norm(dim=-1)  # (N, Hq)
            pending[index]["groups"] = heads.view(-1, info.num_groups, info.group_size).amax(-1)

        return hook

    def on_mlp_activation(index):
        def hook(module, args):
            pending[index]["mlp"] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    for layer in info.layers:
        if layer.index in reservoirs:
            handles.append(layer.q_proj.register_forward_pre_hook(on_q_input(layer.index)))
            handles.append(layer.o_proj.register_forward_pre_hook(on_o_input(layer.index)))
            if layer.index in mlp_layers:
                handles.append(_mlp_label_source(layer).register_forward_pre_hook(on_mlp_activation(layer.index)))
    tokens = 0
    bar = tqdm(total=config.tokens, desc="collect", unit="tok", disable=not progress)
    base = model.base_model
    try:
        for ids in batches:
            if tokens >= config.tokens:
                break
            ids = ids[: max(1, math.ceil((config.tokens - tokens) / ids.shape[1]))].to(device)
            base(input_ids=ids, use_cache=False)
            for index, record in pending.items():
                columns = [record["hidden"].to(torch.bfloat16).cpu(), record["groups"].to(torch.bfloat16).cpu()]
                if "mlp" in record:
                    columns.append(record["mlp"].to(torch.bfloat16).cpu())
                reservoirs[index].add(*columns)
                record.clear()
            tokens += ids.numel()
            bar.update(ids.numel())
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("calibration saw no tokens (empty texts?)")
    return reservoirs, tokens


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def topk_labels(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(-1, scores.float().topk(k, dim=-1).indices, 1.0)


def recall_at_k(router_scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean over tokens of |router top-k ∩ true positives| / min(k, #true positives)."""
    chosen = topk_labels(router_scores, k)
    hits = (chosen * labels).sum(-1)
    wanted = labels.sum(-1).clamp(max=k).clamp(min=1)
    return (hits / wanted).mean().item()


def train_router(router: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, k: int, config: CalibrationConfig,
                 description: str, progress: bool) -> float:  # fmt: skip
    """Class-weighted BCE + AdamW; keeps the parameters of the epoch with the best held-out recall@k."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(inputs.shape[0], generator=generator)
    held = max(1, int(config.validation_fraction * inputs.shape[0]))
    valid, train = order[:held], order[held:]
    x_valid, y_valid = inputs[valid].float(), labels[valid]
    positives = labels[train].mean(0).clamp(1e-4, 1 - 1e-4)
    pos_weight = (1 - positives) / positives  # class weighting: rare positives count as much as negatives
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    best = (recall_at_k(router(x_valid), y_valid, k), {n: p.detach().clone() for n, p in router.state_dict().items()})
    for _ in tqdm(range(config.epochs), desc=description, leave=False, disable=not progress):
        shuffled = train[torch.randperm(train.shape[0], generator=generator)]
        for start in range(0, shuffled.shape[0], config.train_batch_size):
            rows = shuffled[start : start + config.train_batch_size]
            logits = router(inputs[rows].float())
            loss = F.binary_cross_entropy_with_logits(logits, labels[rows], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            recall = recall_at_k(router(x_valid), y_valid, k)
        if recall > best[0]:
            best = (recall, {n: p.detach().clone() for n, p in router.state_dict().items()})
    router.load_state_dict(best[1])
    return best[0]


@torch.no_grad()
def mlp_k_table(router: nn.Module, inputs: torch.Tensor, active: torch.Tensor, target: float, seed: int):
    """{bucket: k} per batch-size bucket: smallest k reaching ``target`` union recall (None: dense)."""
    width = active.shape[1]
    generator = torch.Generator().manual_seed(seed)
    scores = router(inputs.float()).relu()
    table = {}
    for bucket in MLP_BATCH_BUCKETS:
        trials = 8
        rows = torch.randint(0, inputs.shape[0], (trials, bucket), generator=generator)
        unions = active[rows].amax(1)  # (trials, F) true union of active neurons
        summed = scores[rows].sum(1)  # (trials, F) batch-union router score
        ranked = summed.argsort(dim=-1, descending=True)
        # recall of the true union when keeping the top-k by router score, for every k at once
        hits = unions.gather(1, ranked).cumsum(1) / unions.sum(1, keepdim=True).clamp(min=1)
        reach = (hits.min(0).values >= target).nonzero()
        k = int(reach[0]) + 1 if len(reach) else width
        table[str(bucket)] = None if k > MLP_DENSE_FRACTION * width else k
    return table


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _wants_mlp(config: CalibrationConfig, info: ModelInfo) -> bool:
    return config.mlp == "on" or (config.mlp == "auto" and info.relu_mlp)


def calibrate(model, texts=None, config: CalibrationConfig | None = None, *, tokenizer=None, progress: bool = True):
    """Calibrate routers for ``model`` on ``texts`` (default: the Wikipedia train split); returns PolarRouters.

    texts: None, a list/iterable of strings (needs ``tokenizer``), or an iterable of token batches
        (LongTensor (B, T) or dicts with "input_ids").
    """
    config = config or CalibrationConfig()
    info = describe_model(model)
    layers = list(range(1, info.num_layers))
    mlp_layers = layers if _wants_mlp(config, info) else []
    was_training = model.training
    model.eval()
    reservoirs, tokens = collect(
        model, token_batches(texts, tokenizer, config), info, layers, mlp_layers, config, progress
    )
    model.train(was_training)
    k = groups_for_density(config.density, info.num_groups)
    routers = PolarRouters(
        hidden_size=info.hidden_size,
        num_groups=info.num_groups,
        attention_layers=layers,
        mlp_layers=mlp_layers,
        mlp_rank=config.mlp_rank,
        intermediate_size=info.intermediate_size,
        metadata={
            "fingerprint": model_fingerprint(model),
            "density": float(config.density),
            "k": k,
            "group_size": info.group_size,
            "calibration_tokens": int(tokens),
            "calibrated": True,
            "recall": {},
            "random_recall": k / info.num_groups,
            "mlp_recall": {},
        },
    )
    torch.manual_seed(config.seed)
    for layer in tqdm(layers, desc="train routers", disable=not progress):
        columns = reservoirs[layer].columns()
        hidden, group_scores = columns[0], columns[1]
        labels = topk_labels(group_scores, k)
        recall = train_router(routers.attention[str(layer)], hidden, labels, k, config, f"layer {layer}", progress)
        routers.metadata["recall"][str(layer)] = round(recall, 4)
        if layer in mlp_layers:
            activation = columns[2].float()
            if info.relu_mlp:
                active = (activation > 0).float()
            else:
                active = topk_labels(activation.abs(), max(1, round(config.mlp_label_density * info.intermediate_size)))
            mlp_k = max(1, round(active.sum(1).mean().item()))
            router = routers.mlp[str(layer)]
            routers.metadata["mlp_recall"][str(layer)] = round(
                train_router(router, hidden, active, mlp_k, config, f"mlp {layer}", progress), 4
            )
            table = mlp_k_table(router, hidden, active, config.mlp_recall_target, config.seed)
            routers.metadata["mlp_k_table"][str(layer)] = table
        del reservoirs[layer]
    parameter = next(model.parameters())
    return routers.to(device=parameter.device, dtype=parameter.dtype)
