"""Registration of vitscope's models in timm's registry, and the names vitscope owns."""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import timm
import torch.nn as nn
from timm.models import register_model

_logger = logging.getLogger(__name__)
_VITSCOPE_MODELS: list[str] = []


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model function in timm's registry and remember it as one of vitscope's."""
    register_model(fn)
    _VITSCOPE_MODELS.append(fn.__name__)
    return fn


def list_models(pattern: str = "") -> list[str]:
    """Names of the models vitscope registers, filtered by a shell-style pattern (``"*cb*"``)."""
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = sorted(_VITSCOPE_MODELS)
    return [n for n in names if not pattern or fnmatch.fnmatch(n, pattern)]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build any vitscope or timm model by name; ``None`` kwargs are dropped (timm's convention).

    ``img_size`` is passed to the models that take one (ViTs: it sets their token grid) and dropped for the
    ones whose constructor does not (CNNs take any input size), so one call builds either from a run's record.

    Raises:
        ValueError: the name is unknown to both vitscope and timm; lists close matches.
    """
    if not timm.is_model(name):
        close = [n for n in list_models() + timm.list_models() if name.split("_")[0] in n][:10]
        raise ValueError(
            f"Unknown model {name!r}. Run `vitscope models` for vitscope's models or "
            f"`timm.list_models()` for timm's. Similar names: {close or 'none'}"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
    _logger.debug("%s takes no img_size (any input size): building it without img_size=%s", name, kwargs["img_size"])
    kwargs.pop("img_size")
    return timm.create_model(name, **kwargs)
