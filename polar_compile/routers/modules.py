"""Router networks: one attention router per sparse layer (d -> KV groups) and optional MLP routers.

All routers of one model live in one :class:`PolarRouters` module, which ``optimize`` attaches to the model
(so ``.to()`` and dtype changes move them) and which saves to one safetensors file (``routers/io.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polar_compile.model_info import describe_model, require_sparse_mlp

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


def _weight_sample(model: nn.Module) -> list[float]:
    """8 values from each of 7 weight tensors (embedding; q, o, down projections of the first and last layers).

    Compared with a relative tolerance (not hashed), so the same weights cast to bf16/fp16 still match.
    """
    info = describe_model(model)
    tensors = [model.get_input_embeddings().weight]
    for layer in (info.layers[0], info.layers[-1]):
        tensors += [layer.q_proj.weight, layer.o_proj.weight] + (
            [] if layer.mlp_down is None else [layer.mlp_down.weight]
        )
    sample = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        positions = torch.tensor([i * (flat.numel() - 1) // 7 for i in range(8)], device=flat.device)
        sample += [float(f"{v:.6g}") for v in flat[positions].float().cpu().tolist()]
    return sample


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a model for its routers: architecture, the config fields that matter, a weight checksum."""
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
        "weight_sample": _weight_sample(model),
    }


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
        mlp_rank: int = 1024,
        mlp_density: float | None = None,
        seed: int = 0,
    ) -> PolarRouters:
        """Randomly initialised routers shaped for ``model`` (uncalibrated: for speed work and tests).

        mlp_density: if given, a flat k-table keeping that fraction of neurons at every batch size.
        """
        info = describe_model(model)
        if mlp:
            require_sparse_mlp(info, "mlp=True")
        layers = list(range(1, info.num_layers)) if layers is None else list(layers)
        torch.manual_seed(seed)
        routers = cls(
            hidden_size=info.hidden_size,
            num_groups=info.num_groups,
            attention_layers=layers,
            mlp_layers=layers if mlp else [],
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
            k = max(1, round(mlp_density * info.intermediate_size))
            routers.metadata["mlp_k_table"] = {str(i): {"1": k} for i in layers}
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
        """Neurons to keep for ``batch_size`` rows: the entry of the largest bucket <= batch_size (None: dense)."""
        table = self.metadata.get("mlp_k_table", {}).get(str(layer))
        if not table or self.mlp_router(layer) is None:
            return None
        buckets = sorted(int(b) for b in table)
        eligible = [b for b in buckets if b <= batch_size] or buckets[:1]
        k = table[str(eligible[-1])]
        return None if k is None else int(k)

    def check_compatible(self, model: nn.Module) -> None:
        """Raise RouterMismatchError naming every fingerprint field that differs from ``model``'s."""
        expected = self.metadata.get("fingerprint")
        if not expected:
            raise RouterMismatchError("these routers carry no model fingerprint, so they cannot be checked")
        actual = model_fingerprint(model)
        differing = [
            f"{key}: routers {expected.get(key)!r} vs model {actual[key]!r}"
            for key in actual
            if key != "weight_sample" and expected.get(key) != actual[key]
        ]
        sample = expected.get("weight_sample") or []
        close = len(sample) == len(actual["weight_sample"]) and all(
            abs(a - b) <= SAMPLE_TOLERANCE * max(abs(a), abs(b)) + 1e-8 for a, b in zip(sample, actual["weight_sample"])
        )
        if not close:
            differing.append("weight_sample: the sampled weights differ (another checkpoint of this architecture?)")
        if differing:
            raise RouterMismatchError("router file was made for another model; " + "; ".join(differing))

    def extra_repr(self) -> str:
        return (
            f"layers={self.metadata['layers']}, groups={self.num_groups}, density={self.density:.3f}, "
            f"mlp_layers={self.metadata['mlp_layers']}"
        )
