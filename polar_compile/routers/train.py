"""Labels, recall and training for the routers; the MLP k-table.

Both router kinds are affine maps of the router input (the attention router is one linear layer, the MLP router
two linear layers with no activation between them), so training runs on standardised inputs (zero mean, unit
variance per feature: the normalised hidden state of a real model has outlier features ~100x the others, which
slows plain AdamW down by as much) and the standardisation is folded back into the weights at the end: the
saved router takes the raw hidden state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from polar_compile.config import CalibrationConfig

MLP_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MLP_DENSE_FRACTION = 0.8  # above this share of F the dense MLP is as fast (the paper's rule)


def topk_labels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, G) scores -> (N, G) float 0/1, 1 for the k largest of each row."""
    chosen = scores.float().topk(k, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.float32, device=scores.device).scatter_(-1, chosen, 1.0)


def recall_at_k(router_scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean over rows of |router top-k ∩ true positives| / min(k, #true positives) (rows with none count 1)."""
    chosen = topk_labels(router_scores, k)
    hits = (chosen * labels).sum(-1)
    wanted = labels.sum(-1).clamp(max=k)
    return torch.where(wanted > 0, hits / wanted.clamp(min=1), 1.0).mean().item()


@dataclass
class TrainResult:
    recall: float  # held-out recall@k of the kept checkpoint
    initial_recall: float  # held-out recall@k before training (the random initialisation)
    epoch: int  # epoch of the kept checkpoint (0: the initialisation)


def _affine_ends(router: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    linears = [m for m in router.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError("routers are affine stacks of nn.Linear ending with a bias")
    return linears[0], linears[-1]


@torch.no_grad()
def _fold_standardisation(router: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Turn a router of standardised inputs z = (x - mean) / std into the same function of x."""
    first, last = _affine_ends(router)
    first.weight.div_(std)
    zero = torch.zeros_like(mean)[None]
    shift = router(mean[None]) - router(zero)  # = A mean / std, as the router is affine
    last.bias.sub_(shift[0])


def _standardised(inputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N, d) any float dtype -> (N, d) float32 (x - mean) / std, a chunk at a time (peak: one fp32 copy)."""
    out = torch.empty(inputs.shape, dtype=torch.float32, device=mean.device)
    for i in range(0, len(inputs), chunk):
        out[i : i + chunk] = (inputs[i : i + chunk].to(mean.device, torch.float32) - mean) / std
    return out


def train_router(
    router: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    valid_inputs: torch.Tensor,
    valid_labels: torch.Tensor,
    k: int,
    config: CalibrationConfig,
    *,
    description: str = "train",
    progress: bool = False,
) -> TrainResult:
    """Fit ``router`` (in place, on its device) to 0/1 labels; keep the epoch with the best held-out recall@k.

    Loss: class-weighted binary cross-entropy (positives weighted by all negatives / all positives, so the rare
    class counts as much as the common one); AdamW with a cosine learning-rate decay over ``config.epochs``
    epochs of ``config.train_batch_size`` rows.
    """
    device = next(router.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    sample = train_inputs[torch.randperm(len(train_inputs), generator=generator)[:65536]].to(device).float()
    mean = sample.mean(0)
    std = sample.std(0).clamp(min=1e-6 * float(sample.std(0).max()) + 1e-12)
    # Standardised once, in float32, so a step is a row gather and a matmul (no per-batch cast and standardise).
    # The copy costs 2x the layer's bf16 samples, one layer at a time.
    train_inputs, valid_inputs = _standardised(train_inputs, mean, std), _standardised(valid_inputs, mean, std)
    train_labels, valid_labels = train_labels.to(device, torch.float32), valid_labels.to(device, torch.float32)
    # One weight for the positive class, shared by all outputs: per-output weights (negatives / positives of
    # each group) would shift each group's logit by its own log-weight and so reorder groups in the top-k;
    # measured on SmolLM2 (MHA layout, 4 of 9 heads): held-out recall 0.818 with per-group weights, 0.878 shared.
    positives = train_labels.float().mean().clamp(1e-4, 1 - 1e-4)
    pos_weight = ((1 - positives) / positives).expand(train_labels.shape[1])

    def snapshot():
        return {name: tensor.detach().clone() for name, tensor in router.state_dict().items()}

    def held_out_recall() -> float:
        with torch.no_grad():
            return recall_at_k(router(valid_inputs), valid_labels, k)

    steps_per_epoch = math.ceil(len(train_inputs) / config.train_batch_size)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / (config.epochs * steps_per_epoch))))
    )
    initial = held_out_recall()
    best = (initial, 0, snapshot())
    epochs = tqdm(range(1, config.epochs + 1), desc=description, leave=False, disable=not progress)
    for epoch in epochs:
        order = torch.randperm(len(train_inputs), generator=generator).to(device)
        for rows in order.split(config.train_batch_size):
            logits = router(train_inputs[rows])
            loss = F.binary_cross_entropy_with_logits(logits, train_labels[rows], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        recall = held_out_recall()
        epochs.set_postfix(recall=f"{recall:.3f}")
        if recall > best[0]:
            best = (recall, epoch, snapshot())
    router.load_state_dict(best[2])
    _fold_standardisation(router, mean, std)
    return TrainResult(recall=best[0], initial_recall=initial, epoch=best[1])


@torch.no_grad()
def mlp_k_table(
    router: nn.Module, inputs: torch.Tensor, active: torch.Tensor, target: float, seed: int, trials: int = 8
) -> dict[str, int | None]:
    """{batch bucket: k}: the smallest k whose batch-union top-k recalls ``target`` of the true union.

    For each bucket size B, ``trials`` random batches of B held-out rows: the router's scores are ReLU'd and
    summed over the batch (what the compiled decode step does), ranked, and k is the smallest prefix that holds
    ``target`` of the neurons active for any row of the batch, in every trial (the worst trial decides; a batch
    with no active neuron is recalled whole). The table never shrinks with the batch: each bucket keeps at least
    the k of the bucket below (the union only grows with the batch; trials drawn per bucket could say otherwise),
    and once a bucket is dense every larger one is. None (run the dense MLP) when that k is above
    ``MLP_DENSE_FRACTION`` of F.
    inputs: (N, d) router inputs; active: (N, F) 0/1 true active neurons.
    """
    width = active.shape[1]
    generator = torch.Generator().manual_seed(seed)
    device = next(router.parameters()).device if any(True for _ in router.parameters()) else inputs.device
    table: dict[str, int | None] = {}
    previous, dense = 1, False
    for bucket in MLP_BATCH_BUCKETS:
        rows = torch.randint(0, inputs.shape[0], (trials, bucket), generator=generator)
        flat = rows.reshape(-1)
        scores = router(inputs[flat].to(device).float()).relu().view(trials, bucket, width)
        union = active[flat].to(device).float().view(trials, bucket, width).amax(1)  # (trials, F)
        ranked = scores.sum(1).argsort(dim=-1, descending=True)
        # recall of the true union when keeping the top-k by router score, for every k at once
        total = union.sum(1, keepdim=True)
        found = torch.where(total > 0, union.gather(1, ranked).cumsum(1) / total.clamp(min=1), 1.0)
        reach = (found.min(0).values >= target).nonzero()
        k = max(int(reach[0]) + 1 if len(reach) else width, previous)
        dense = dense or k > MLP_DENSE_FRACTION * width
        table[str(bucket)] = None if dense else k
        previous = k
    return table
