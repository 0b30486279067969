"""Dense-layer selection: which layers stay dense so that sparse decoding stays within a perplexity budget.

A router's mistakes cost more in some layers than in others, and the costs compound: on SmolLM2-135M at 2 of 3
groups, the 29 single-layer perplexity changes sum to +5.5% while all 29 layers sparse together cost +13.2%, and
keeping the few most sensitive layers dense removes most of the loss (notes/accuracy_study.md). This step makes that
choice part of calibration, measured on text the routers were not trained on and the evaluation does not score:

1. Score held-out windows (``prefix`` context tokens, then ``tokens`` scored ones) with one parallel forward per
   configuration. Positions from ``prefix - 1`` on are decode steps: there each sparse layer's attention output keeps
   only the groups its router picks for that token (the same router, k and ranking as ``polar::route_groups``), which
   is exactly what the compiled decode path computes, since every step still writes its K and V to the cache for all
   groups (``tests/routers/test_select.py`` checks it against ``polar_compile.evaluate``'s decode-path scores).
   Positions before it are the dense prefill.
2. Rank the layers with a router. ``ranking="single"``: by the perplexity change with only layer i sparse.
   ``"leave-one-out"``: by how much keeping layer i alone dense lowers the all-sparse change (it sees the
   compounding the single-layer changes miss).
3. Keep dense, besides the layers with no router, the n most sensitive layers, for the smallest n whose perplexity
   change's 95% upper bound (paired per window against dense) is within the budget. Every set looked at is measured,
   not predicted from the single-layer changes (they do not add up); n is found by bisection, which assumes the
   bound falls as layers turn dense (the n found stays within budget, but a smaller n may too if it does not).

The chosen set's change on the selection windows is optimistic for new text (the ranking and the curve are measured
on the same windows): on SmolLM2 it read +2.9% there and +3.0% / +4.6% on 128 / 48 test texts.

The result goes into the router file's metadata (``dense_layers``, and ``layer_selection`` with the measurements);
``optimize`` keeps those layers dense unless the config names its own (``SparsityConfig.dense_layers``).
Cost: 2 + layers + ~log2(layers) forwards over the windows (SmolLM2 on 2 CPU cores, 64 windows of 128 tokens:
about 5 minutes).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from polar_compile.config import LAYER_RANKINGS, groups_for_density
from polar_compile.evaluate import Estimate, paired_change, text_windows
from polar_compile.model_info import describe_model
from polar_compile.reference import group_keep_columns

__all__ = ["LayerSelection", "decode_log_likelihoods", "select_dense_layers", "selection_windows"]

log = logging.getLogger("polar_compile")

Change = tuple[float, float, float]  # perplexity change in %, 95% CI low, high


@dataclass(frozen=True)
class LayerSelection:
    """What :func:`select_dense_layers` chose and measured (perplexity changes in %, paired against dense)."""

    dense_layers: tuple[int, ...]  # the layers to keep dense, sorted (those with no router included)
    change: Change  # the chosen set's perplexity change (95% CI) on the selection windows
    budget: float  # the budget, in % perplexity, that the chosen set's upper bound is within
    k: int  # groups kept per sparse layer while measuring
    windows: int
    tokens: int  # scored tokens over all windows
    ranking: str = "leave-one-out"
    # per routed layer, the measurement it was ranked by: "single", only that layer sparse; "leave-one-out", every
    # routed layer sparse but that one
    sensitivity: dict[int, Change] = field(default_factory=dict)
    curve: dict[int, Change] = field(default_factory=dict)  # n most sensitive layers dense -> change

    def as_metadata(self) -> dict:
        rounded = lambda change: [round(x, 3) for x in change]  # noqa: E731
        return {
            "budget_percent": self.budget,
            "k": self.k,
            "windows": self.windows,
            "tokens": self.tokens,
            "change_percent": rounded(self.change),
            "ranking": self.ranking,
            "sensitivity_percent": {str(i): rounded(c) for i, c in self.sensitivity.items()},
            "curve_percent": {str(n): rounded(c) for n, c in sorted(self.curve.items())},
        }


def selection_windows(texts, tokenizer, *, prefix: int = 32, tokens: int = 96, limit: int = 64) -> torch.Tensor:
    """(windows, prefix + tokens) token ids: the first ``prefix + tokens`` tokens of each text long enough, up to
    ``limit`` texts (as ``polar_compile.evaluate.perplexity`` cuts its windows)."""
    if prefix < 1 or tokens < 1 or limit < 1:
        raise ValueError(f"prefix, tokens and limit must be >= 1, got {prefix}, {tokens}, {limit}")
    windows = text_windows(texts, tokenizer, prefix + tokens, limit)
    if not windows:
        raise ValueError(f"no selection text has the {prefix + tokens} tokens a window needs (each document must be "
                         f"at least that long; they are not joined)")  # fmt: skip
    return torch.tensor(windows, dtype=torch.long)


def _check_windows(windows: torch.Tensor, prefix: int, name: str = "windows") -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        got = (f"a {tuple(windows.shape)} {windows.dtype} tensor" if isinstance(windows, torch.Tensor)
               else f"a {type(windows).__name__}")  # fmt: skip
        remedy = ": convert it with .long()" if isinstance(windows, torch.Tensor) and windows.dim() == 2 else ""
        raise ValueError(f"{name} must be a 2-d (windows, length) torch.long tensor of token ids, got {got}{remedy}")
    if windows.shape[0] == 0:
        raise ValueError(f"no selection windows ({name} has 0 rows): dense layers cannot be chosen without text")
    if not 1 <= prefix < windows.shape[1]:
        raise ValueError(f"prefix must be in [1, {windows.shape[1] - 1}] for windows of {windows.shape[1]} tokens")


def _sparse_hooks(info, routers, sparse: dict[int, int], decode_from: int) -> list:
    """Per sparse layer: keep the router's input (the q_proj input) and zero, at decode positions, the attention
    output columns of the groups the router does not pick (as ``polar_compile.reference`` does for one token)."""
    group_width = info.group_size * info.head_dim
    handles = []
    for layer in info.layers:
        if layer.index not in sparse:
            continue
        router, k, kept = routers.attention_router(layer.index), sparse[layer.index], {}
        device = layer.o_proj.weight.device
        weight = router.weight.detach().to(device)  # a copy where the model is; the caller's routers stay put
        bias = None if router.bias is None else router.bias.detach().to(device)

        def keep_input(module, args, kept=kept):
            kept["hidden"] = args[0]

        def mask(module, args, weight=weight, bias=bias, k=k, kept=kept):
            attention = args[0]  # (B, T, Hq * D)
            keep = group_keep_columns(kept["hidden"], weight, bias, k, info.num_groups, group_width, attention.dtype)
            keep[:, :decode_from] = 1  # the prefill is dense
            return (attention * keep, *args[1:])

        handles.append(layer.q_proj.register_forward_pre_hook(keep_input))
        handles.append(layer.o_proj.register_forward_pre_hook(mask))
    return handles


@torch.no_grad()
def decode_log_likelihoods(
    model, routers, windows: torch.Tensor, sparse: dict[int, int], *, prefix: int = 32, batch: int = 16
) -> Estimate:
    """Perplexity of each window's tokens after ``prefix``, as the decode path scores them with the layers of
    ``sparse`` ({layer: k}) sparse: per window (negative log-likelihood sum, tokens), as ``evaluate.perplexity``."""
    _check_windows(windows, prefix)
    info = describe_model(model)
    device = next(model.parameters()).device
    decode_from = prefix - 1  # the prefill holds prefix - 1 tokens; the prefix's last token is the first decode step
    scored = windows.shape[1] - decode_from
    keep_logits = {"logits_to_keep": scored} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    handles = _sparse_hooks(info, routers, sparse, decode_from)
    per_window = []
    try:
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch].to(device)
            logits = model(input_ids=ids, use_cache=False, **keep_logits).logits[:, -scored:-1].float()
            targets = ids[:, prefix:]
            nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
            per_window += [(float(row.sum()), targets.shape[1]) for row in nll.double()]
    finally:
        for handle in handles:
            handle.remove()
    total = sum(c for _, c in per_window)
    mean = sum(s for s, _ in per_window) / total
    return Estimate(math.exp(mean), 0.0, 0.0, total, tuple(per_window))


def select_dense_layers(
    model,
    routers,
    windows: torch.Tensor,
    *,
    budget: float = 5.0,
    k: int | None = None,
    ranking: str = "leave-one-out",
    prefix: int = 32,
    batch: int = 16,
    progress: bool = True,
) -> LayerSelection:
    """The fewest layers to keep dense (the most sensitive first) so that the 95% upper bound of the perplexity
    change on ``windows`` is within ``budget`` percent; see the module docstring.

    routers: PolarRouters for ``model`` (checked). k: groups kept per sparse layer (default: the routers' own k).
    windows: (windows, length) token ids of held-out text (:func:`selection_windows`).
    ranking: "single" or "leave-one-out" (module docstring).
    """
    if ranking not in LAYER_RANKINGS:
        raise ValueError(f"ranking must be one of {LAYER_RANKINGS}, got {ranking!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise ValueError(f"budget must be a perplexity increase in percent >= 0, got {budget!r}")
    _check_windows(windows, prefix)
    routers.check_compatible(model)
    info = describe_model(model)
    if k is None:  # the routers' own k, else the one optimize derives from their density (halves round up)
        k = routers.metadata.get("k", groups_for_density(routers.density, info.num_groups))
    k = int(k)
    if not 1 <= k <= info.num_groups:
        raise ValueError(f"k must be in [1, {info.num_groups}] (the model's KV groups), got {k}")
    candidates = [layer.index for layer in info.layers if routers.attention_router(layer.index) is not None]
    if not candidates:
        raise ValueError("the router file has no attention routers: there is no layer to choose")
    always_dense = tuple(layer.index for layer in info.layers if layer.index not in candidates)
    was_training = model.training
    model.eval()
    bar = tqdm(total=1 + len(candidates), desc="dense-layer selection", disable=not progress)

    def measure(sparse_layers) -> Estimate:
        estimate = decode_log_likelihoods(model, routers, windows, dict.fromkeys(sparse_layers, k), prefix=prefix,
                                          batch=batch)  # fmt: skip
        bar.update(1)
        return estimate

    try:
        dense = measure([])
        curve: dict[int, Change] = {}
        if ranking == "single":
            sensitivity = {i: paired_change(measure([i]), dense) for i in candidates}
            order = sorted(candidates, key=lambda i: -sensitivity[i][0])  # most sensitive first
        else:
            curve[0] = paired_change(measure(candidates), dense)
            bar.total += 1
            sensitivity = {i: paired_change(measure([j for j in candidates if j != i]), dense) for i in candidates}
            order = sorted(candidates, key=lambda i: sensitivity[i][0])  # the largest gain from keeping it dense

        def change_with(n: int) -> Change:  # the n most sensitive layers dense as well
            if n not in curve:
                bar.total += 1
                curve[n] = paired_change(measure(order[n:]), dense) if n < len(order) else (0.0, 0.0, 0.0)
            return curve[n]

        low, high = 0, len(order)  # change_with(len(order)) is dense: within any budget >= 0
        while low < high:
            middle = (low + high) // 2
            if change_with(middle)[2] <= budget:
                high = middle
            else:
                low = middle + 1
        chosen = change_with(low)
    finally:
        bar.close()
        model.train(was_training)
    dense_layers = tuple(sorted((*always_dense, *order[:low])))
    if low == len(order):
        log.warning("polar_compile: no layer can be sparse within +%.3g%% perplexity on these windows", budget)
    return LayerSelection(
        dense_layers, chosen, float(budget), k, windows.shape[0], dense.count, ranking, sensitivity, curve
    )
