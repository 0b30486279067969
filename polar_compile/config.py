"""Frozen, validated configuration objects.

Every config checks itself in ``__post_init__`` and raises ``ValueError`` naming the bad field, so a
mistake surfaces where it is made rather than deep inside a compiled graph.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

MlpMode = Literal["auto", "on", "off"]


def _check_density(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real: numpy scalars too
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (0.0 < float(value) <= 1.0) or math.isnan(float(value)):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _layer_index(name: str, value) -> int:
    """``value`` as a layer index (a Python or numpy int >= 0), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be layer indices (ints >= 0), got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be layer indices >= 0, got {int(value)}")
    return int(value)


def _count(owner, name: str, minimum: int) -> None:
    """Field ``name`` of the frozen ``owner`` as a Python int >= ``minimum`` (numpy ints are converted), else
    ValueError naming the field."""
    value = getattr(owner, name)
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {int(value)}")
    object.__setattr__(owner, name, int(value))


def _check_finite(name: str, value, *, minimum: float, inclusive: bool) -> None:
    """``value`` is a real number, finite, and > minimum (>= with inclusive), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not (float(value) >= minimum if inclusive else float(value) > minimum):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {minimum:g}, got {value!r}")


def groups_for_density(density: float, num_groups: int) -> int:
    """Number of KV groups kept at ``density``: ``round(density * num_groups)`` clamped to [1, num_groups].

    Rounding (not flooring) keeps the paper's settings exact: 0.625 of 8 groups is 5, 0.5 of 32 is 16,
    and 2/3 of 3 groups is 2. Halves round up (0.625 of 4 groups is 3, 0.375 of 4 is 2), not to the even
    neighbour as Python's ``round`` would; ``explain`` reports the k each layer got.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    _check_density("density", density)
    # 1e-9 absorbs the float error of products such as 0.7 * 10 = 7.000000000000001 or 0.3 * 10 = 2.9999999999999996
    return max(1, min(num_groups, math.floor(float(density) * num_groups + 0.5 + 1e-9)))


def sparse_density_bound(num_groups: int) -> float:
    """The density below which ``groups_for_density`` keeps fewer than all ``num_groups`` groups (at it, halves
    round up to every group)."""
    return (num_groups - 0.5) / num_groups


@dataclass(frozen=True)
class SparsityConfig:
    """How sparse each decode step is.

    attention_density: fraction of KV groups (heads for MHA) each sequence attends with, in (0, 1].
    layer_density: per-layer overrides of ``attention_density`` ({layer index: density}).
    dense_layers: layers that stay fully dense (stored sorted, without repeats). None (the default): the layers the
        router file's calibration chose (``polar_compile.routers.select``: the most sensitive layers, kept dense to
        stay within a perplexity budget), or layer 0 alone (as in the paper) for a router file without that choice.
        ``optimize`` resolves it.
    mlp: "off" (the default) never rewrites an MLP; "auto" rewrites ReLU MLPs (where activation sparsity is real)
        with the selective GEMM where the router file has MLP routers; "on" any MLP with routers. Off by default
        because at every point measured it decoded slower than attention sparsity alone (OPT-6.7B, 30% of
        neurons: H200 B=64 x 1920 13.0 ms against 12.1, B=16 x 1024 7.7 ms against 6.7 and dense's 7.4; H100
        B=16 x 1024 8.7 against 8.4 ms; benchmarks/results/decode.csv): the batch-union top-k and the MLP routers
        cost what the skipped weight reads save at batch >= 16 (notes/selective_gemm.md).
    mlp_dense_threshold: run the dense MLP when the calibrated k exceeds this fraction of the MLP width.
    dense_attention: how the decode step of a dense layer attends: "polar" (default) through
        ``polar::selective_attention`` with every KV group and no router (it reads each group's K and V once for
        all its query heads, where SDPA over HF's repeat_kv first copies them once per query head), or "sdpa"
        (the model's own attention, untouched).
    fuse_projections: pack each layer's q/k/v weights (and gate/up) into one buffer, in place and at no
        memory cost, so the compiled step runs each group as one GEMM (faster at decode batch sizes; see
        ``polar_compile/packing.py``). ``restore`` unpacks them.
    defer_stop_check: let ``generate`` on CUDA read its stop flag one step late (transformers' own
        ``DeferredStopCheck``, which it enables only on "mps"), so the host queues each step while the previous
        one runs instead of idling the GPU; the returned tokens are the same, a streamer gets each token one step
        later (``polar_compile/generation.py``).
    max_decode_graphs: how many decode graphs a model may compile, one per batch size and cache length (with
        ``dynamic=False`` each is a whole-model compile). Once its steps have compiled graphs at this many shapes,
        the steps at a new shape run the model's eager, dense forward, with a warning naming the shape. Dynamo
        also counts the graphs of all instances of a model class together (their forward is one code object):
        past its own ``recompile_limit`` (8), a new shape compiles under this limit instead of failing the
        fullgraph compile.
    """

    attention_density: float = 0.5
    layer_density: Mapping[int, float] = field(default_factory=dict)
    dense_layers: tuple[int, ...] | None = None
    mlp: MlpMode = "off"
    mlp_dense_threshold: float = 0.8
    dense_attention: Literal["polar", "sdpa"] = "polar"
    fuse_projections: bool = True
    defer_stop_check: bool = True
    max_decode_graphs: int = 64

    def __post_init__(self) -> None:
        _check_density("attention_density", self.attention_density)
        if not isinstance(self.layer_density, Mapping):
            raise ValueError(f"layer_density must be a mapping {{layer: density}}, got {self.layer_density!r}")
        layer_density = {}
        for layer, density in self.layer_density.items():
            layer = _layer_index("layer_density keys", layer)
            _check_density(f"layer_density[{layer}]", density)
            layer_density[layer] = float(density)
        # Freeze the mapping so the dataclass is really immutable (hashed through key(), see __hash__).
        object.__setattr__(self, "layer_density", MappingProxyType(layer_density))
        if self.dense_layers is not None:
            if isinstance(self.dense_layers, Mapping):
                raise ValueError(f"dense_layers must be a tuple of layer indices, got a mapping {self.dense_layers!r} "
                                 "(per-layer densities go in layer_density)")  # fmt: skip
            if isinstance(self.dense_layers, (str, bytes)) or not hasattr(self.dense_layers, "__iter__"):
                raise ValueError(f"dense_layers must be a tuple of layer indices or None, got {self.dense_layers!r}")
            # Sorted and without repeats, so that (1, 0, 0) and (0, 1) are one config (one key, shared graphs).
            dense = tuple(sorted({_layer_index("dense_layers", layer) for layer in self.dense_layers}))
            object.__setattr__(self, "dense_layers", dense)
        if self.mlp not in ("auto", "on", "off"):
            raise ValueError(f"mlp must be 'auto', 'on' or 'off', got {self.mlp!r}")
        _check_density("mlp_dense_threshold", self.mlp_dense_threshold)
        if self.dense_attention not in ("polar", "sdpa"):
            raise ValueError(f"dense_attention must be 'polar' or 'sdpa', got {self.dense_attention!r}")
        if not isinstance(self.fuse_projections, bool):
            raise ValueError(f"fuse_projections must be True or False, got {self.fuse_projections!r}")
        if not isinstance(self.defer_stop_check, bool):
            raise ValueError(f"defer_stop_check must be True or False, got {self.defer_stop_check!r}")
        _count(self, "max_decode_graphs", 1)

    def __hash__(self) -> int:  # the generated hash would fail on the mapping proxy
        return hash((*self.key(), self.defer_stop_check, self.max_decode_graphs))

    def density_for(self, layer: int) -> float | None:
        """Attention density of ``layer``, or None when the layer stays dense."""
        if self.dense_layers is None:
            raise ValueError("dense_layers=None is resolved against a router file first (resolve_dense_layers)")
        if layer in self.dense_layers:
            return None
        return float(self.layer_density.get(layer, self.attention_density))

    def resolve_dense_layers(self, routers) -> SparsityConfig:
        """This config with ``dense_layers=None`` replaced by the router file's calibrated choice (or layer 0)."""
        if self.dense_layers is not None:
            return self
        chosen = getattr(routers, "dense_layers", None)
        return dataclasses.replace(self, dense_layers=(0,) if chosen is None else tuple(chosen))

    def key(self) -> tuple:
        """A hashable summary, used to keep compiled graphs of different configs apart."""
        return (
            float(self.attention_density),
            tuple(sorted((int(k), float(v)) for k, v in self.layer_density.items())),
            self.dense_layers,
            self.mlp,
            float(self.mlp_dense_threshold),
            self.dense_attention,
            self.fuse_projections,
        )


LAYER_RANKINGS = ("single", "leave-one-out")  # how dense-layer selection ranks layers (polar_compile.routers.select)


@dataclass(frozen=True)
class CalibrationConfig:
    """How routers are calibrated (see ``polar_compile.calibrate``).

    tokens: calibration tokens drawn from the text stream (the paper used ~400k).
    density: attention density the routers are trained for (label = group in the top-k at this density).
    mlp: train MLP routers ("auto": only for ReLU MLPs).
    mlp_rank: rank r of the low-rank MLP router d -> r -> F; None (default): 1024 as in the paper, or d / 4 for a
        model narrower than 4096 (the router is linear, so a rank of d or more would add weights and nothing else).
    mlp_recall_target: union recall the MLP k-table must reach per batch-size bucket.
    mlp_label_density: for gated MLPs, the share of neurons labelled active (top |act(gate) x up|).
    sequence_length / batch_size: shape of the token batches run through the dense model.
    validation_fraction: share of collected tokens held out to report recall and pick the checkpoint.
    epochs, learning_rate, weight_decay, train_batch_size: router training (AdamW on class-weighted BCE).
    max_samples_per_layer: bound on stored router inputs per layer (reservoir-subsampled beyond it).
    max_memory_gb: bound on all stored samples together (lowers the samples per layer for large models).
    seed: makes collection subsampling and training reproducible.
    label: what ranks the groups for the attention label. "post" (default): the L2 norm of the group's
        contribution after the output projection, ``|| W_o[:, cols] @ attn[cols] ||``. "pre": the L2 norm of each
        query head's attention output before the output projection, max over the group's heads (the paper's
        label). On SmolLM2-135M at 2 of 3 groups, post-label routers cost +15.9% perplexity where pre-label ones
        cost +28.7% (same 4,608 tokens; notes/accuracy_study.md, benchmarks/results/accuracy.csv).
    perplexity_budget: after training, keep dense the fewest of the most sensitive layers for which the perplexity
        change's 95% upper bound on held-out text stays within this many percent (``polar_compile.routers.select``;
        stored in the router file as ``dense_layers``, which ``optimize`` then keeps dense); None: no selection
        (layer 0 alone stays dense).
    selection_windows: held-out windows (32 context + 96 scored tokens each) that selection measures on.
    layer_ranking: how the selection ranks layers, "leave-one-out" (default: on SmolLM2 it reached the budget with
        one dense layer fewer than "single"; notes/accuracy_study.md) or "single" (``polar_compile.routers.select``).
    """

    tokens: int = 200_000
    density: float = 0.5
    mlp: MlpMode = "auto"
    mlp_rank: int | None = None
    mlp_recall_target: float = 0.99
    mlp_label_density: float = 0.1
    sequence_length: int = 512
    batch_size: int = 8
    validation_fraction: float = 0.1
    epochs: int = 8
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    train_batch_size: int = 1024
    max_samples_per_layer: int = 200_000
    max_memory_gb: float = 8.0
    seed: int = 0
    label: str = "post"
    perplexity_budget: float | None = 5.0
    selection_windows: int = 64
    layer_ranking: str = "leave-one-out"

    def __post_init__(self) -> None:
        if self.label not in ("pre", "post"):
            raise ValueError(f"label must be 'pre' or 'post', got {self.label!r}")
        budget = self.perplexity_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0):
            raise ValueError(f"perplexity_budget must be a percentage >= 0 or None, got {budget!r}")
        if self.layer_ranking not in LAYER_RANKINGS:
            raise ValueError(f"layer_ranking must be one of {LAYER_RANKINGS}, got {self.layer_ranking!r}")
        names = ("tokens", "sequence_length", "batch_size", "epochs", "train_batch_size", "selection_windows")
        for name in (*names, *(("mlp_rank",) if self.mlp_rank is not None else ())):
            _count(self, name, 1)
        _count(self, "max_samples_per_layer", 16)
        _count(self, "seed", 0)
        _check_density("density", self.density)
        if self.density == 1:
            raise ValueError("density must be below 1 to calibrate: at 1.0 every group is labelled active and the "
                             "routers learn nothing (calibrate at the density you will decode at)")  # fmt: skip
        _check_density("mlp_recall_target", self.mlp_recall_target)
        _check_density("mlp_label_density", self.mlp_label_density)
        if self.mlp_label_density == 1:
            raise ValueError("mlp_label_density must be below 1: at 1.0 every neuron is labelled active and the MLP "
                             "routers learn nothing")  # fmt: skip
        if self.mlp not in ("auto", "on", "off"):
            raise ValueError(f"mlp must be 'auto', 'on' or 'off', got {self.mlp!r}")
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (0.0 < fraction < 1.0):
            raise ValueError(f"validation_fraction must be in (0, 1), got {fraction!r}")
        _check_finite("max_memory_gb", self.max_memory_gb, minimum=0.0, inclusive=False)
        _check_finite("learning_rate", self.learning_rate, minimum=0.0, inclusive=False)
        _check_finite("weight_decay", self.weight_decay, minimum=0.0, inclusive=True)
