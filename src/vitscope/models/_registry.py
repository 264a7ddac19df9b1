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


HUB_PREFIX = "hf-hub:"  # timm's name for a model on the Hugging Face hub: hf-hub:ORG/NAME (its config.json)


def is_hub_name(name: str) -> bool:
    """``hf-hub:ORG/NAME``: timm builds the architecture its ``config.json`` names (weights with pretrained)."""
    return name.startswith(HUB_PREFIX)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build any vitscope or timm model by name; ``None`` kwargs are dropped (timm's convention).

    ``hf-hub:ORG/NAME`` (timm's hub names, e.g. a community fine-tune) reads the architecture and its
    ``pretrained_cfg`` from the repository's ``config.json`` in the Hugging Face cache (downloaded on first use).

    ``img_size`` is passed to the models that take one (ViTs: it sets their token grid) and dropped for the
    ones whose constructor does not (CNNs take any input size), so one call builds either from a run's record.

    Raises:
        ValueError: the name is unknown to both vitscope and timm (lists close matches), or a hub name whose
            config cannot be read.
    """
    if is_hub_name(name):
        return _create_from_hub(name, {k: v for k, v in kwargs.items() if v is not None})
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


def hub_repo(name: str) -> str:
    """``ORG/NAME`` of ``hf-hub:ORG/NAME``; ValueError for a name that is not one."""
    repo = name[len(HUB_PREFIX):] if is_hub_name(name) else ""
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r} is not a hub name: write hf-hub:ORG/NAME (e.g. hf-hub:timm/vit_small_patch16_224."
                         "augreg_in21k_ft_in1k)")
    return repo


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model("hf-hub:ORG/NAME", **kwargs)``; a config that cannot be read is one ValueError."""
    repo = hub_repo(name)
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
        kwargs.pop("img_size")
        return timm.create_model(name, **kwargs)
    except Exception as err:  # the hub: offline and not cached, no network, no such repository, no config.json
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"cannot build {name!r}: its config.json is not in the Hugging Face cache and could not be "
                         f"fetched ({type(err).__name__}: {first}); fetch it with `huggingface-cli download {repo}`"
                         ) from None
