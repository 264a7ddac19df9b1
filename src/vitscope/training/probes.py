"""Measures taken during training on a fixed evaluation batch, saved as time series (``probes.jsonl``).

A probe is ``fn(model, images) -> (layer_names, values)``: one value (a number or a per-head list)
per layer. The built-in probes wrap ``vitscope.measures`` fed by ``vitscope.capture``:

- ``attention_entropy`` (CB, Hyeon-Woo et al. 2023): mean entropy of the attention rows, per layer;
- ``attention_distance`` (Raghu et al. 2021; ViT Fig. 7): mean attention distance in pixels;
- ``nonlocality`` (ConViT, d'Ascoli et al. 2021): attention-weighted patch distance;
- ``gpsa_gates`` (ConViT): ``sigmoid(gating_param)`` per head of each GPSA block (falls in training).

Each line of ``probes.jsonl`` is ``{"epoch", "measure", "layers", "values"}``; epoch -1 holds the
initial weights.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from vitscope.measures.evaluation import eval_mode

_logger = logging.getLogger(__name__)

__all__ = ["register_probe", "list_probes", "get_probe", "run_probes", "ProbeFn"]

ProbeFn = Callable[[nn.Module, torch.Tensor], tuple[list[str], list[Any]]]
_PROBES: dict[str, ProbeFn] = {}


def register_probe(name: str, fn: ProbeFn | None = None) -> Any:
    """Register ``fn(model, images) -> (layer_names, values)`` under ``name`` (usable as a decorator)."""
    if fn is None:
        return lambda f: register_probe(name, f)
    _PROBES[name] = fn
    return fn


def list_probes() -> list[str]:
    return sorted(_PROBES)


def get_probe(name: str) -> ProbeFn:
    if name not in _PROBES:
        raise ValueError(f"Unknown probe measure {name!r}; valid choices: {', '.join(list_probes())}")
    return _PROBES[name]


def _to_py(value: Any) -> Any:
    """Tensors / arrays / numbers -> JSON-ready floats or nested lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach().double().cpu()
        return value.item() if value.ndim == 0 else value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _to_py(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_py(v) for v in value]
    return float(value)


def _captured_attention(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], list[Any]]:
    import vitscope

    with vitscope.explicit_attention(model), vitscope.capture(
        model, attention=True, residual=False, branches=False
    ) as cap:
        model(images)
    if not cap.attentions:
        raise ValueError(f"{type(model).__name__} has no attention layers to probe; drop the attention measures")
    return cap.attentions, cap.attention_layout


def _attention_measure(compute: Callable[[torch.Tensor, Any], Any]) -> ProbeFn:
    def probe(model: nn.Module, images: torch.Tensor) -> tuple[list[str], list[Any]]:
        attentions, layout = _captured_attention(model, images)
        return [info.name for info in layout], [_to_py(compute(a, info)) for a, info in zip(attentions, layout)]

    return probe


@register_probe("attention_entropy")
def _attention_entropy(model: nn.Module, images: torch.Tensor) -> tuple[list[str], list[Any]]:
    from vitscope.measures import attention_entropy

    return _attention_measure(lambda a, info: attention_entropy(a))(model, images)  # a: (B, H, N, N)


@register_probe("attention_distance")
def _attention_distance(model: nn.Module, images: torch.Tensor) -> tuple[list[str], list[Any]]:
    from vitscope.measures import attention_distance

    return _attention_measure(
        lambda a, info: attention_distance(a, info.grid, info.patch_size, info.num_prefix_tokens)
    )(model, images)


@register_probe("nonlocality")
def _nonlocality(model: nn.Module, images: torch.Tensor) -> tuple[list[str], list[Any]]:
    from vitscope.measures import nonlocality

    return _attention_measure(lambda a, info: nonlocality(a, info.grid, info.num_prefix_tokens))(model, images)


@register_probe("gpsa_gates")
def _gpsa_gates(model: nn.Module, images: torch.Tensor) -> tuple[list[str], list[Any]]:
    from vitscope.measures import gpsa_gates, gpsa_layers

    names = [name for name, _ in gpsa_layers(model)]
    return names, [_to_py(g) for g in gpsa_gates(model)]  # per layer: (H,) sigmoid(gating_param)


@torch.no_grad()
def run_probes(model: nn.Module, images: torch.Tensor, measures: list[str], epoch: int) -> list[dict[str, Any]]:
    """Evaluate each probe on ``images`` with the model in eval mode; one record per measure."""
    records = []
    with eval_mode(model):
        for name in measures:
            try:
                layers, values = get_probe(name)(model, images)
            except ImportError as e:
                raise ValueError(f"probe {name!r} is not available in this vitscope ({e}); "
                                 "drop it from probes.measures") from None
            records.append({"epoch": epoch, "measure": name, "layers": layers, "values": values})
    return records
