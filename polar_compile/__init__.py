"""polar_compile: Polar Sparsity for Hugging Face decoders, through torch.compile.

Public API (imported lazily, so ``import polar_compile`` stays light and needs no triton):

    optimize, explain, restore              -- make a model decode sparsely; per-layer report; undo optimize
    calibrate, PolarRouters                 -- train the routers
    add_layer_selection                     -- choose the layers kept dense (within a perplexity budget)
    save_routers, load_routers              -- one safetensors file with metadata
    SparsityConfig, CalibrationConfig       -- frozen, validated configs
    load_smollm2, load_wiki_texts           -- offline model and text
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    # compiler
    "optimize": "polar_compile.compiler",
    "explain": "polar_compile.compiler",
    "restore": "polar_compile.compiler",
    # routers
    "calibrate": "polar_compile.routers.calibrate",
    "add_layer_selection": "polar_compile.routers.calibrate",
    "PolarRouters": "polar_compile.routers.modules",
    "save_routers": "polar_compile.routers.io",
    "load_routers": "polar_compile.routers.io",
    # configs
    "SparsityConfig": "polar_compile.config",
    "CalibrationConfig": "polar_compile.config",
    # assets
    "load_smollm2": "polar_compile.assets",
    "load_wiki_texts": "polar_compile.assets",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'polar_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
