"""vitscope: build, train and dissect Vision Transformers and CNNs.

Models of ViT (Dosovitskiy et al. 2021), Context Broadcasting (Hyeon-Woo et al. 2023), ConViT
(d'Ascoli et al. 2021) and AlterNet (Park & Kim 2022) registered in timm, one capture API for
attention maps and residual streams, and the measures of these papers for any timm ViT or CNN.
"""
from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly: the function `capture` must shadow the subpackage of the same name.
from vitscope.capture import capture, explicit_attention, tokens_to_map  # noqa: E402
from vitscope.models import create_model, list_models

__version__ = "0.1.0"

# Public names resolved lazily, so `import vitscope` stays fast and each subsystem loads on use.
_LAZY = {
    "Capture": "vitscope.capture",
    "LayerInfo": "vitscope.capture",
    "save_weights": "vitscope.io.weights",
    "load_weights": "vitscope.io.weights",
    "load_checkpoint": "vitscope.io.checkpoints",
    "load_model": "vitscope.io.checkpoints",
    "probe": "vitscope.probing",
    "compare": "vitscope.comparing",
    "keep_freed_memory": "vitscope.runtime",
    "attention_maps": "vitscope.probing.attention_images",
    "AttentionMaps": "vitscope.probing.attention_images",
    "load_attention_maps": "vitscope.probing.attention_images",
    "report": "vitscope.notebook",
}
_SUBMODULES = (
    "models", "layers", "io", "measures", "interventions", "probing", "curvature",
    "robustness", "data", "training", "reports", "cli",
)

__all__ = [
    "__version__", "create_model", "list_models", "capture", "explicit_attention", "tokens_to_map",
    *_LAZY, *_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"vitscope.{name}")
    raise AttributeError(f"module 'vitscope' has no attribute {name!r}")
