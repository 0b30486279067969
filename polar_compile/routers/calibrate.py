"""Calibration: collect router inputs and labels from the dense model, train the routers, keep the best.

1. Collect (``collect.py``). The dense model runs over a token stream; hooks keep, per sparse layer, a bounded
   uniform sample of router inputs, per-group attention scores and (MLP routers) the MLP's own input (the input of
   its first linear, what the decode step routes on) and active neurons. Memory bound:
   ``layers x samples x (2 d + 2 groups [+ 2 d + F / 8])`` bytes with samples = min(tokens,
   ``max_samples_per_layer``, ``max_memory_gb`` / (layers x row bytes)), whatever the token count.
2. Label. Attention: group in the top-k of the group scores (k = ``groups_for_density(density, groups)``).
   MLP: neuron active (activation > 0) for ReLU MLPs; for gated MLPs, neuron in the top ``mlp_label_density``
   share of |act(gate) x up|.
3. Train (``train.py``). Per layer: AdamW on class-weighted BCE; the epoch with the best recall@k on held-out
   sequences is kept.
4. MLP k-table. Per batch-size bucket, the smallest k whose batch-union top-k recalls ``mlp_recall_target`` of
   the true union of active neurons; ``None`` (dense) when that k is above 80% of F.
5. Dense layers (``select.py``, with ``perplexity_budget``). The most sensitive layers that must stay dense for the
   perplexity change's 95% upper bound on held-out text to stay within the budget; ``optimize`` keeps them dense.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from polar_compile.config import CalibrationConfig, groups_for_density, sparse_density_bound
from polar_compile.model_info import (
    ModelInfo,
    describe_model,
    require_sparse_mlp,
    require_static_rope,
    sparse_mlp_layers,
)
from polar_compile.routers.collect import collect, token_batches, unpack_bits
from polar_compile.routers.modules import PolarRouters, default_mlp_rank, model_fingerprint
from polar_compile.routers.select import _check_windows, select_dense_layers, selection_windows
from polar_compile.routers.train import mlp_k_table, topk_labels, train_router

__all__ = ["add_layer_selection", "calibrate"]

log = logging.getLogger("polar_compile")


def _wants_mlp(config: CalibrationConfig, info: ModelInfo) -> bool:
    if config.mlp == "on":
        require_sparse_mlp(info, "mlp='on' (use 'off' or 'auto' for attention routers only)")
    return config.mlp == "on" or (config.mlp == "auto" and info.relu_mlp)


def _new_routers(model, info: ModelInfo, layers, mlp_layers, config: CalibrationConfig, k: int, collected):
    """Untrained routers (seeded by the caller) whose metadata the training loop fills in."""
    return PolarRouters(
        hidden_size=info.hidden_size,
        num_groups=info.num_groups,
        attention_layers=layers,
        mlp_layers=mlp_layers,
        mlp_rank=default_mlp_rank(info.hidden_size) if config.mlp_rank is None else config.mlp_rank,
        intermediate_size=info.intermediate_size,
        metadata={
            "fingerprint": model_fingerprint(model),
            "density": float(config.density),
            "k": k,
            "group_size": info.group_size,
            "calibration_tokens": int(collected.tokens),
            "calibrated": True,
            "label": config.label,
            "recall": {},
            "random_recall": round(k / info.num_groups, 4),
            "untrained_recall": {},
            "mlp_recall": {},
            "training": {
                "samples_per_layer": collected.samples_per_layer,
                "epochs": config.epochs,
                "learning_rate": config.learning_rate,
                "train_batch_size": config.train_batch_size,
                "seed": config.seed,
            },
        },
    )


def calibrate(
    model: torch.nn.Module,
    texts=None,
    config: CalibrationConfig | None = None,
    *,
    tokenizer=None,
    selection_texts=None,
    progress: bool = True,
) -> PolarRouters:
    """Calibrate routers for ``model`` (any decoder ``describe_model`` understands); returns PolarRouters.

    texts: None (the Wikipedia train split, needs ``tokenizer``), a list or iterable of strings (needs
        ``tokenizer``), or an iterable of token batches (LongTensor (B, T), or dicts with "input_ids").
    config: tokens, density, MLP routers, training; default ``CalibrationConfig()``.
    Routers are trained for layers 1..L-1 (layer 0 stays dense) and returned on the model's device and dtype.
    Per-layer held-out recall is in ``routers.metadata["recall"]`` (and "mlp_recall"); a random router's
    expected recall@k is ``metadata["random_recall"]`` = k / groups.
    Memory: bounded as described in ``polar_compile.routers.collect`` (8 GB by default, ``max_memory_gb``).
    selection_texts: held-out text for the dense-layer selection (step 5): strings (needs ``tokenizer``) or a
        (windows, length) LongTensor. Default: the Wikipedia validation split when calibrating on the default
        text; with other calibration text and no selection text the step is skipped (a warning says so).
    """
    config = config or CalibrationConfig()
    info = describe_model(model)
    require_static_rope(model, info)  # optimize would refuse the model: say so before the text is read
    layers = list(range(1, info.num_layers))
    mlp_layers = sorted(set(layers) & set(sparse_mlp_layers(info))) if _wants_mlp(config, info) else []
    parameter = next(model.parameters())
    k = groups_for_density(config.density, info.num_groups)
    if k == info.num_groups:  # every group labelled active: the routers would learn nothing, decode stays dense
        if info.num_groups == 1:
            raise ValueError("the model has 1 KV group, which every density keeps: attention routers have nothing to "
                             "choose (polar_compile.mha.expand_kv_heads, or calibrate --mha, makes each query head "
                             "its own group)")  # fmt: skip
        below = sparse_density_bound(info.num_groups)
        raise ValueError(f"density {config.density:g} keeps all {info.num_groups} KV groups of this model (k = "
                         f"{k}): the routers would learn nothing; calibrate at a density below {below:g} (k < "
                         f"{info.num_groups})")  # fmt: skip
    if texts is None and tokenizer is None:
        raise ValueError("calibrating on the default Wikipedia text needs tokenizer=... (or pass token batches)")
    if mlp_layers and config.mlp_rank is not None and config.mlp_rank >= info.hidden_size:
        log.warning("polar_compile: mlp_rank %d >= the hidden size %d: the MLP router d -> r -> F is linear, so this "
                    "rank adds weights and no expressiveness (None picks %d)", config.mlp_rank, info.hidden_size,
                    default_mlp_rank(info.hidden_size))  # fmt: skip
    # The selection's windows are cut before the calibration, so a problem with that text shows before the work
    if config.perplexity_budget is not None:
        if selection_texts is None and texts is None:
            from polar_compile.assets import load_wiki_texts

            selection_texts = load_wiki_texts("validation")
        if selection_texts is not None:
            selection_texts = _selection_windows(selection_texts, tokenizer, config)

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        vocab_size = model.get_input_embeddings().weight.shape[0]
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        batches = token_batches(texts, tokenizer, config, vocab_size, positions)
        collected = collect(model, batches, info, layers, mlp_layers, config, progress)
    finally:
        model.train(was_training)
    collect_seconds = time.perf_counter() - start

    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
        torch.manual_seed(config.seed)
        routers = _new_routers(model, info, layers, mlp_layers, config, k, collected)
    routers.to(parameter.device)  # train where the model runs (fp32 weights; cast to the model's dtype at the end)
    for layer in tqdm(layers, desc="train routers", disable=not progress):
        train, valid = collected.train.pop(layer), collected.valid.pop(layer)
        result = train_router(
            routers.attention[str(layer)],
            train.hidden,
            topk_labels(train.group_scores, k),
            valid.hidden,
            topk_labels(valid.group_scores, k),
            k,
            config,
            description=f"attention {layer}",
            progress=progress,
        )
        routers.metadata["recall"][str(layer)] = round(result.recall, 4)
        routers.metadata["untrained_recall"][str(layer)] = round(result.initial_recall, 4)
        if layer in mlp_layers:
            width = info.intermediate_size
            train_active = unpack_bits(train.mlp_active, width)
            valid_active = unpack_bits(valid.mlp_active, width)
            mlp_k = max(1, round(train_active.sum(1).mean().item()))  # the mean number of active neurons
            router = routers.mlp[str(layer)]
            result = train_router(
                router, train.mlp_hidden, train_active, valid.mlp_hidden, valid_active, mlp_k, config,
                description=f"mlp {layer}", progress=progress,
            )  # fmt: skip
            routers.metadata["mlp_recall"][str(layer)] = round(result.recall, 4)
            routers.metadata["mlp_k_table"][str(layer)] = mlp_k_table(
                router, valid.mlp_hidden, valid_active, config.mlp_recall_target, config.seed
            )
    routers.metadata["seconds"] = {
        "collect": round(collect_seconds, 1),
        "train": round(time.perf_counter() - start - collect_seconds, 1),
    }
    if config.perplexity_budget is not None:
        if selection_texts is None:
            log.warning("polar_compile: no dense-layer selection (pass held-out text: selection_texts=, or calibrate "
                        "--selection-text-file): optimize "
                        "will keep layer 0 alone dense")  # fmt: skip
        else:
            add_layer_selection(model, routers, selection_texts, config, tokenizer=tokenizer, progress=progress)
    return routers.to(device=parameter.device, dtype=parameter.dtype)


def add_layer_selection(
    model,
    routers: PolarRouters,
    texts,
    config: CalibrationConfig | None = None,
    *,
    tokenizer=None,
    prefix: int = 32,
    progress: bool = True,
) -> PolarRouters:
    """Run the dense-layer selection (``select.py``) for ``routers`` on held-out ``texts`` and record it in their
    metadata (``dense_layers``, ``layer_selection``, ``seconds["select"]``); returns ``routers``.

    texts: strings (needs ``tokenizer``; cut into ``prefix`` + 96-token windows) or a (windows, length) LongTensor
    whose first ``prefix`` tokens are context. config: its ``perplexity_budget`` (default 5%; None is refused: it
    means no selection), ``selection_windows`` and ``layer_ranking``.
    """
    config = config or CalibrationConfig()
    if config.perplexity_budget is None:
        raise ValueError("add_layer_selection needs a perplexity_budget (None means no dense-layer selection)")
    windows = _selection_windows(texts, tokenizer, config, prefix)
    start = time.perf_counter()
    selection = select_dense_layers(model, routers, windows, budget=config.perplexity_budget,
                                    ranking=config.layer_ranking, prefix=prefix, progress=progress)  # fmt: skip
    routers.metadata["dense_layers"] = list(selection.dense_layers)
    routers.metadata["layer_selection"] = selection.as_metadata()
    routers.metadata.setdefault("seconds", {})["select"] = round(time.perf_counter() - start, 1)
    return routers


def _selection_windows(texts, tokenizer, config: CalibrationConfig, prefix: int = 32) -> torch.Tensor:
    """The selection's (windows, prefix + 96) token windows: ``texts`` itself if a tensor, else cut from strings."""
    if isinstance(texts, torch.Tensor):
        _check_windows(texts, 1, "selection texts")  # dtype and shape, before any calibration work
        if texts.shape[1] <= prefix:
            raise ValueError(f"selection text windows of {texts.shape[1]} tokens are too short: each needs more than "
                             f"{prefix} tokens (the first {prefix} are context, the rest are scored); pass longer "
                             f"windows, or strings to cut {prefix} + 96-token windows from")  # fmt: skip
        return texts
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"selection texts must be a list of strings (or a tensor of token windows), got one "
                         f"{type(texts).__name__}: wrap it in [...]")  # fmt: skip
    if tokenizer is None:
        raise ValueError("the dense-layer selection on strings needs tokenizer=... (or pass token windows)")
    return selection_windows(texts, tokenizer, prefix=prefix, limit=config.selection_windows)
