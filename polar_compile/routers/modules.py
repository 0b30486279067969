"""Router networks: one attention router per sparse layer (d -> KV groups) and optional MLP routers.

All routers of one model live in one :class:`PolarRouters` module, which ``optimize`` attaches to the model
(so ``.to()`` and dtype changes move them) and which saves to one safetensors file (``routers/io.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polar_compile.model_info import ModelInfo, describe_model, require_sparse_mlp, sparse_mlp_layers

FORMAT_VERSION = 1


class RouterFileError(ValueError):
    """A router file or router set cannot be used (the subclass and message say why)."""


class RouterMismatchError(RouterFileError):
    """The routers were made for another model (the message names the differing fingerprint fields)."""


class RouterFormatError(RouterFileError):
    """The router file was written by a newer polar_compile (unknown format version)."""


class RouterFileCorruptError(RouterFileError):
    """The router file is truncated, damaged, or not a polar_compile router file."""


class MlpRouter(nn.Sequential):
    """Low-rank MLP router d -> r -> F: ``Linear(d, r, bias=False)`` then ``Linear(r, F)`` (scores per neuron)."""

    def __init__(self, hidden_size: int, rank: int, intermediate_size: int):
        super().__init__(nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, intermediate_size))


SAMPLE_TOLERANCE = 2e-2  # relative: above bf16/fp16 rounding (<0.4%), far below differences between models
# absolute, for tiny weights: fp16 stores values below 6.1e-5 as subnormals, 6e-8 apart (rounding error <= 3e-8)
SAMPLE_ABSOLUTE_TOLERANCE = 1e-7


def _sample(tensor: torch.Tensor, count: int) -> list[float]:
    """``count`` values of ``tensor`` at evenly spaced flat positions (6 significant digits)."""
    flat = tensor.detach().reshape(-1)
    positions = torch.tensor([i * (flat.numel() - 1) // (count - 1) for i in range(count)], device=flat.device)
    return [float(f"{v:.6g}") for v in flat[positions].float().cpu().tolist()]


def _weight_sample(model: nn.Module, info: ModelInfo, embedding_rows: int | None = None) -> list[float]:
    """8 values from each of 7 weight tensors (embedding; q, o, down projections of the first and last layers).

    Compared with a relative tolerance (not hashed), so the same weights cast to bf16/fp16 still match.
    embedding_rows: sample the embedding's first rows only (a router file's vocabulary, for a model whose
    embedding ``resize_token_embeddings`` grew: the rows it appended do not move the sampled positions).
    """
    embedding = model.get_input_embeddings().weight
    tensors = [embedding if embedding_rows is None else embedding[:embedding_rows]]
    for layer in (info.layers[0], info.layers[-1]):
        tensors += [layer.q_proj.weight, layer.o_proj.weight] + (
            [] if layer.mlp_down is None else [layer.mlp_down.weight]
        )
    return [value for tensor in tensors for value in _sample(tensor, 8)]


def _layer_sample(info: ModelInfo) -> list[float]:
    """2 values of every layer's q projection and 2 of its MLP down projection (or output projection): a model
    whose middle layers differ (a partial fine-tune, a layer merge) must not pass for the one routers were made for."""
    sample = []
    for layer in info.layers:
        sample += _sample(layer.q_proj.weight, 2)
        sample += _sample((layer.o_proj if layer.mlp_down is None else layer.mlp_down).weight, 2)
    return sample


def _close(expected, actual) -> bool:
    return len(expected) == len(actual) and all(
        abs(a - b) <= SAMPLE_TOLERANCE * max(abs(a), abs(b)) + SAMPLE_ABSOLUTE_TOLERANCE
        for a, b in zip(expected, actual)
    )


def model_fingerprint(model: nn.Module, *, embedding_rows: int | None = None) -> dict[str, Any]:
    """What identifies a model for its routers: architecture, the config fields that matter, weight samples.

    weight_sample: the embedding and the first and last layers; layer_sample: every layer (router files written
    before it was added carry weight_sample only, and are checked on that).
    """
    info = describe_model(model)
    config = model.config
    return {
        "architecture": info.architecture,
        "model_type": str(getattr(config, "model_type", "")),
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "intermediate_size": info.intermediate_size,
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "activation": info.activation,
        "weight_sample": _weight_sample(model, info, embedding_rows),
        "layer_sample": _layer_sample(info),
    }


def default_mlp_rank(hidden_size: int) -> int:
    """The MLP router's rank when none is given: the paper's 1024, or hidden_size / 4 for a model narrower than
    4096 (the router d -> r -> F is linear: a rank of d or more would add weights and no expressiveness)."""
    return max(1, min(1024, hidden_size // 4))


def router_parameters(
    hidden_size: int,
    num_groups: int,
    attention_layers: int,
    mlp_layers: int = 0,
    mlp_rank: int = 1024,
    intermediate_size: int = 0,
) -> int:
    """Parameters of a :class:`PolarRouters` with that many attention and MLP routers, counted without building
    them (a byte floor for an 8B model's routers must not allocate them): per attention router d * G + G, per MLP
    router d * r + r * F + F."""
    attention = attention_layers * num_groups * (hidden_size + 1)
    mlp = mlp_layers * (hidden_size * mlp_rank + mlp_rank * intermediate_size + intermediate_size)
    return attention + mlp


class PolarRouters(nn.Module):
    """The routers of one model.

    attention: ``str(layer) -> nn.Linear(hidden, num_groups)`` (bias), for the sparse layers.
    mlp: ``str(layer) -> MlpRouter`` where MLP sparsity was calibrated.
    metadata: JSON-serialisable facts: format_version, fingerprint, density, k (groups kept at that density),
        num_groups, group_size, layers, mlp_layers, mlp_rank, mlp_k_table {str(layer): {str(batch_bucket): k}},
        calibration_tokens, calibrated; after calibration also recall / untrained_recall / mlp_recall
        {str(layer): held-out recall}, random_recall (k / groups), training (settings) and seconds; after the
        dense-layer selection dense_layers (the layers ``optimize`` keeps dense by default) and layer_selection
        (what it measured).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_groups: int,
        attention_layers: list[int],
        mlp_layers: list[int] = (),
        mlp_rank: int = 1024,
        intermediate_size: int | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        if mlp_layers and intermediate_size is None:
            raise ValueError("intermediate_size is needed for MLP routers")
        self.attention = nn.ModuleDict({str(i): nn.Linear(hidden_size, num_groups) for i in attention_layers})
        self.mlp = nn.ModuleDict(
            {str(i): MlpRouter(hidden_size, mlp_rank, intermediate_size) for i in mlp_layers}  # type: ignore[arg-type]
        )
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.metadata.setdefault("format_version", FORMAT_VERSION)
        self.metadata.setdefault("num_groups", num_groups)
        self.metadata["layers"] = sorted(int(i) for i in attention_layers)
        self.metadata["mlp_layers"] = sorted(int(i) for i in mlp_layers)
        self.metadata.setdefault("mlp_rank", mlp_rank)
        self.metadata.setdefault("mlp_k_table", {})

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        density: float = 0.5,
        layers: list[int] | None = None,
        mlp: bool = False,
        mlp_rank: int | None = None,
        mlp_density: float | None = None,
        seed: int = 0,
    ) -> PolarRouters:
        """Randomly initialised routers shaped for ``model`` (uncalibrated: for speed work and tests).

        density: the attention density they are meant for, in (0, 1]; layers: the sparse layers (default 1..L-1);
        mlp_rank: the MLP routers' rank (default ``default_mlp_rank``); mlp_density: if given, a flat k-table
        keeping that fraction of neurons at every batch size.
        """
        from polar_compile.config import _check_density, _layer_index

        info = describe_model(model)
        _check_density("density", density)
        if mlp:
            require_sparse_mlp(info, "mlp=True")
        if mlp_density is not None:
            _check_density("mlp_density", mlp_density)
            if not mlp:
                raise ValueError("mlp_density sets the MLP routers' k-table, but mlp=False makes none: pass mlp=True "
                                 "too, or drop mlp_density")  # fmt: skip
        mlp_rank = default_mlp_rank(info.hidden_size) if mlp_rank is None else mlp_rank
        if isinstance(mlp_rank, bool) or not isinstance(mlp_rank, int) or mlp_rank < 1:
            raise ValueError(f"mlp_rank must be a positive int, got {mlp_rank!r}")
        layers = list(range(1, info.num_layers)) if layers is None else [_layer_index("layers", i) for i in layers]
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise ValueError(f"layers {repeated} are given more than once: name each sparse layer once")
        outside = sorted(i for i in layers if i >= info.num_layers)
        if outside:
            raise ValueError(f"layers {outside} do not exist: the model has layers 0-{info.num_layers - 1}")
        torch.manual_seed(seed)
        routers = cls(
            hidden_size=info.hidden_size,
            num_groups=info.num_groups,
            attention_layers=layers,
            mlp_layers=sorted(set(layers) & set(sparse_mlp_layers(info))) if mlp else [],
            mlp_rank=mlp_rank,
            intermediate_size=info.intermediate_size,
            metadata={
                "fingerprint": model_fingerprint(model),
                "density": float(density),
                "group_size": info.group_size,
                "calibration_tokens": 0,
                "calibrated": False,
            },
        )
        if mlp and mlp_density is not None:
            from polar_compile.routers.train import MLP_BATCH_BUCKETS

            k = max(1, round(mlp_density * info.intermediate_size))
            flat = {str(bucket): k for bucket in MLP_BATCH_BUCKETS}
            routers.metadata["mlp_k_table"] = {str(i): dict(flat) for i in routers.metadata["mlp_layers"]}
        parameter = next(model.parameters())
        return routers.to(device=parameter.device, dtype=parameter.dtype)

    # --- what the compiler asks -------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return int(self.metadata["num_groups"])

    @property
    def density(self) -> float:
        return float(self.metadata.get("density", 0.5))

    @property
    def dense_layers(self) -> tuple[int, ...] | None:
        """The layers calibration chose to keep dense (``polar_compile.routers.select``), or None if it did not."""
        layers = self.metadata.get("dense_layers")
        return None if layers is None else tuple(int(layer) for layer in layers)

    def attention_router(self, layer: int) -> nn.Linear | None:
        return self.attention[str(layer)] if str(layer) in self.attention else None  # noqa: SIM401 (ModuleDict has no .get)

    def mlp_router(self, layer: int) -> nn.Module | None:
        return self.mlp[str(layer)] if str(layer) in self.mlp else None  # noqa: SIM401 (ModuleDict has no .get)

    def mlp_k(self, layer: int, batch_size: int) -> int | None:
        """Neurons to keep for ``batch_size`` rows: the entry of the smallest bucket >= batch_size, whose k was
        fitted to a union at least as large (a smaller bucket's k would miss the recall target); None (dense) past
        the largest bucket, where no k was fitted, or where the table says dense."""
        table = self.metadata.get("mlp_k_table", {}).get(str(layer))
        if not table or self.mlp_router(layer) is None:
            return None
        eligible = [b for b in sorted(int(b) for b in table) if b >= batch_size]
        if not eligible:
            return None
        k = table[str(eligible[0])]
        return None if k is None else int(k)

    def check_compatible(self, model: nn.Module) -> None:
        """Raise RouterMismatchError naming every fingerprint field that differs from ``model``'s.

        A model whose vocabulary grew since (``resize_token_embeddings``, e.g. to add a pad token) still matches:
        routers read hidden states, not tokens, and its embedding is sampled over the rows the routers saw.
        """
        info = describe_model(model)  # first: a model that is not an HF decoder gets its own message
        expected = self.metadata.get("fingerprint")
        if not isinstance(expected, dict) or not expected:
            raise RouterMismatchError("these routers carry no model fingerprint, so they cannot be checked")
        vocab = expected.get("vocab_size")
        model_vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        grown = isinstance(vocab, int) and not isinstance(vocab, bool) and 0 < vocab < model_vocab
        actual = model_fingerprint(model, embedding_rows=vocab if grown else None)
        samples = ("weight_sample", "layer_sample")
        differing = [
            f"{key}: routers {expected.get(key)!r} vs model {actual[key]!r}"
            for key in actual
            if key not in samples and expected.get(key) != actual[key] and not (key == "vocab_size" and grown)
        ]
        if not _close(expected.get("weight_sample") or [], actual["weight_sample"]):
            differing.append("weight_sample: the sampled weights differ (another checkpoint of this architecture?)")
        layers_sampled = len(expected.get("layer_sample") or []) == len(actual["layer_sample"])
        if layers_sampled and not _close(expected["layer_sample"] or [], actual["layer_sample"]):
            differing.append(
                f"layer_sample: the weights of layers {self._differing_layers(expected['layer_sample'], actual)} "
                "differ (a fine-tune or merge of the model the routers were made for?)"
            )
        differing += self._shape_problems(info)
        if differing and expected.get("num_kv_heads") == actual["num_heads"] != actual["num_kv_heads"]:
            differing.append("the routers give each query head its own KV group (calibrate --mha): call "
                             "polar_compile.mha.expand_kv_heads(model) before loading them")  # fmt: skip
        if differing:
            raise RouterMismatchError("router file was made for another model; " + "; ".join(differing))

    def _shape_problems(self, info: ModelInfo) -> list[str]:
        """Routers whose shapes do not fit ``info`` (a file whose fingerprint matches can still carry routers for
        another group count or width: the compiler would find no router it can use and keep every layer dense)."""
        problems = []
        if int(self.metadata.get("num_groups", info.num_groups)) != info.num_groups:
            problems.append(f"num_groups: routers {self.metadata['num_groups']} vs model {info.num_groups} KV groups")
        for layer, router in self.attention.items():
            shape, expected = tuple(router.weight.shape), (info.num_groups, info.hidden_size)
            if shape != expected:
                problems.append(f"attention router {layer}: weight {shape} for (groups, hidden size); the model has "
                                f"{info.num_groups} KV groups and hidden size {info.hidden_size}")  # fmt: skip
        for layer, router in self.mlp.items():
            width, hidden = router[-1].weight.shape[0], router[0].weight.shape[1]
            if (hidden, width) != (info.hidden_size, info.intermediate_size):
                problems.append(f"MLP router {layer}: input size {hidden} and {width} neurons; the model has hidden "
                                f"size {info.hidden_size} and {info.intermediate_size} MLP neurons")  # fmt: skip
        return problems

    @staticmethod
    def _differing_layers(expected, actual) -> list[int]:
        values = actual["layer_sample"]
        return [i // 4 for i in range(0, len(values), 4) if not _close(expected[i : i + 4], values[i : i + 4])]

    def extra_repr(self) -> str:
        return (
            f"layers={self.metadata['layers']}, groups={self.num_groups}, density={self.density:.3f}, "
            f"mlp_layers={self.metadata['mlp_layers']}"
        )
