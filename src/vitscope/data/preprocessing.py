"""The one preprocessing resolver: what a model is fed (size, interpolation, mean/std, crop) in timm's data-config keys.

``vitscope train`` (``vitscope.training.loaders.resolve_preprocessing``) and the analysis commands
(``vitscope.cli._common.resolve_preprocessing``) choose the source (their defaults differ: a run trains on the
data set's statistics unless it fine-tunes hub weights; an analysis feeds a run what it was validated with) and
call ``resolve_preprocessing`` here for the rest.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PREPROCESS_KEYS", "resolve_preprocessing"]

PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def resolve_preprocessing(source: str, *, model: Any = None, data: Mapping[str, Any] | None = None,
                          recorded: Mapping[str, Any] | None = None, img_size: int | None = None,
                          overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preprocessing of ``source``, at ``img_size``, with the user's ``overrides`` on top.

    Args:
        source: ``model`` (timm's ``resolve_data_config(model=model)``: the ``pretrained_cfg`` of hub weights),
            ``data`` (``data``: the data set's own, e.g. ``vitscope.data.factory.data_preprocessing``) or ``run``
            (``recorded``: what a run recorded it was validated with; bilinear and crop 1.0 where it says
            nothing).
        img_size: the network's input size (``model``, ``data``; ``run`` only where the record has none).
        overrides: values of the keys in ``PREPROCESS_KEYS`` given by the user (None: not given); the keys
            given are listed in ``overridden``.

    Returns:
        ``input_size`` (3, S, S), ``interpolation``, ``mean``, ``std`` (tuples), ``crop_pct``, ``crop_mode``,
        ``source`` and ``overridden``.
    """
    if source == "run":
        if not isinstance(recorded, Mapping) or "mean" not in recorded:
            raise ValueError("preprocessing source 'run' needs the run's recorded preprocessing")
        base = {k: recorded[k] for k in PREPROCESS_KEYS if k in recorded}
        base.setdefault("input_size", (3, img_size, img_size))
        base.setdefault("interpolation", "bilinear")
        base.setdefault("crop_pct", 1.0)
    elif source == "model":
        from timm.data import resolve_data_config

        base = {k: v for k, v in resolve_data_config(model=model).items() if k in PREPROCESS_KEYS}
    elif source == "data":
        if data is None:
            raise ValueError("preprocessing source 'data' needs the data set's preprocessing")
        base = dict(data)
    else:
        raise ValueError(f"preprocessing source must be 'model', 'data' or 'run', got {source!r}")
    if img_size and source != "run":
        base["input_size"] = (3, int(img_size), int(img_size))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"unknown preprocessing keys {unknown}; known: {', '.join(PREPROCESS_KEYS)}")
    base.update(given)
    return {"input_size": tuple(int(s) for s in base["input_size"]), "interpolation": str(base["interpolation"]),
            "mean": tuple(float(m) for m in base["mean"]), "std": tuple(float(s) for s in base["std"]),
            "crop_pct": float(base.get("crop_pct") or 1.0), "crop_mode": str(base.get("crop_mode") or "center"),
            "source": source, "overridden": sorted(given)}
