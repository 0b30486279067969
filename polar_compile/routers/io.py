"""Router files: one safetensors file holding every router tensor plus JSON metadata.

The metadata (key ``polar_compile``) holds format_version, the model fingerprint, densities, layer lists, the
MLP k-table, per-layer recall and the calibration token count. Loading checks, in order: the file is a
readable safetensors file written by polar_compile (else RouterFileCorruptError), its format version is one
this version reads (else RouterFormatError), its tensors match its metadata (else RouterFileCorruptError),
and, given a model, that the fingerprint matches (else RouterMismatchError naming the differing fields).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from polar_compile.routers.modules import (
    FORMAT_VERSION,
    PolarRouters,
    RouterFileCorruptError,
    RouterFileError,
    RouterFormatError,
    RouterMismatchError,
    model_fingerprint,
)

METADATA_KEY = "polar_compile"

__all__ = [
    "RouterFileCorruptError",
    "RouterFileError",
    "RouterFormatError",
    "RouterMismatchError",
    "load_routers",
    "model_fingerprint",
    "save_routers",
]


def save_routers(routers: PolarRouters, path: str | Path) -> None:
    """Write ``routers`` (tensors as float32 on the CPU, so files do not depend on the model's dtype)."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in routers.state_dict().items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():  # load_routers would refuse the file: better not to write it
            raise ValueError(f"not saving {path}: router tensor {name} holds NaN or infinite values (diverged "
                             "training, or too few calibration tokens?); recalibrate")  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(routers.metadata, sort_keys=True)})


def _layer_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _metadata_problem(metadata) -> str | None:
    """What is wrong with a router file's metadata fields (types and ranges), or None."""
    if not isinstance(metadata.get("num_groups"), int) or isinstance(metadata["num_groups"], bool):
        return f"num_groups is {metadata.get('num_groups')!r}, not an int"
    if metadata["num_groups"] < 1:
        return f"num_groups is {metadata['num_groups']}"
    for key in ("layers", "mlp_layers"):
        if key in metadata and not _layer_list(metadata[key]):
            return f"{key} is {metadata[key]!r}, not a list of layer indices"
    if metadata.get("dense_layers") is not None and not _layer_list(metadata["dense_layers"]):
        return f"dense_layers is {metadata['dense_layers']!r}, not a list of layer indices"
    density = metadata.get("density", 0.5)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        return f"density is {density!r}, not a number in (0, 1]"
    rank = metadata.get("mlp_rank", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return f"mlp_rank is {rank!r}, not a positive int"
    table = metadata.get("mlp_k_table", {})
    if not isinstance(table, dict) or not all(
        isinstance(row, dict) and all(k is None or (isinstance(k, int) and k >= 1) for k in row.values())
        for row in table.values()
    ):
        return "mlp_k_table is not {layer: {batch bucket: k or null}}"
    if "fingerprint" in metadata and not isinstance(metadata["fingerprint"], dict):
        return f"fingerprint is {metadata['fingerprint']!r}, not an object"
    return None


def load_routers(path: str | Path, model=None, *, map_location: str | torch.device | None = None) -> PolarRouters:
    """Read a router file; with ``model``, check its fingerprint and move the routers to the model's device and
    dtype; without, to ``map_location`` (default: the CPU, float32 as stored)."""
    if model is not None and map_location is not None:
        raise ValueError("pass model or map_location, not both: with a model the routers go to its device and dtype")
    device = torch.device("cpu") if map_location is None else _router_device(map_location)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no router file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise RouterFileCorruptError(
            f"{path} is not a readable safetensors file (truncated or damaged?): {error}"
        ) from error
    if raw is None:
        raise RouterFileCorruptError(f"{path} has no '{METADATA_KEY}' metadata: not a polar_compile router file")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RouterFileCorruptError(f"{path}: router metadata is not valid JSON ({error})") from error
    if not isinstance(metadata, dict):
        raise RouterFileCorruptError(f"{path}: the router metadata is a JSON {type(metadata).__name__}, not an object")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > FORMAT_VERSION:
        raise RouterFormatError(
            f"{path} has router format version {version!r}; this polar_compile reads versions <= {FORMAT_VERSION}"
            " (upgrade polar_compile, or re-calibrate)"
        )
    problem = _metadata_problem(metadata)
    if problem:
        raise RouterFileCorruptError(f"{path}: damaged router metadata: {problem}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise RouterFileCorruptError(f"{path}: tensor {name} is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise RouterFileCorruptError(f"{path}: tensor {name} holds NaN or infinite values (diverged training?)")
    layers, mlp_layers = metadata.get("layers", []), metadata.get("mlp_layers", [])
    try:
        if layers:
            hidden_size = tensors[f"attention.{layers[0]}.weight"].shape[1]
        else:  # MLP routers only (or none): their first linear is (rank, hidden)
            hidden_size = tensors[f"mlp.{mlp_layers[0]}.0.weight"].shape[1] if mlp_layers else 1
        intermediate = tensors[f"mlp.{mlp_layers[0]}.1.weight"].shape[0] if mlp_layers else None
        routers = PolarRouters(
            hidden_size=hidden_size,
            num_groups=int(metadata["num_groups"]),
            attention_layers=layers,
            mlp_layers=mlp_layers,
            mlp_rank=int(metadata.get("mlp_rank", 1024)),
            intermediate_size=intermediate,
            metadata=metadata,
        )
        routers.load_state_dict(tensors, strict=True)
    except (KeyError, IndexError, RuntimeError) as error:
        raise RouterFileCorruptError(f"{path}: tensors do not match the router metadata ({error})") from error
    if model is not None:
        routers.check_compatible(model)
        parameter = next(model.parameters())
        return routers.to(device=parameter.device, dtype=parameter.dtype)
    return routers.to(device)


def _router_device(map_location) -> torch.device:
    """``map_location`` as a device the routers can live on, or ValueError naming what is wrong with it."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"load_routers: map_location {map_location!r} is not a device ({error})") from None
    if device.type == "meta":
        raise ValueError("load_routers: map_location 'meta' keeps no values, and optimize needs the routers' weights: "
                         "load them to the CPU or a GPU")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_routers: map_location {map_location!r}, but this torch sees no CUDA device")
    return device
