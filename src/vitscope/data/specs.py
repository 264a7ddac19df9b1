"""Data set spec strings: ``name``, ``name:PATH`` or ``name:PATH,key=value,key=value``.

The part before the first ``:`` is the data set name. After it come comma-separated items; an item
with ``=`` is an option, the one item without ``=`` is the path (path sets only). Values are parsed
as bool (``true``/``false``), int, float, or left as a string. Examples::

    fake:n=256,classes=10,size=32
    elpv:labels=levels
    cifar10:~/data/cifar,val_fraction=0.1
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

# name -> whether the spec needs a PATH. The builders live in vitscope.data.factory.
DATASET_NAMES: dict[str, bool] = {
    "fake": False,
    "elpv": False,
    "cifar10": True,
    "cifar100": True,
    "mnist": True,
    "fashion_mnist": True,
    "imagefolder": True,
}


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: ``name``, optional ``path`` and the ``options`` dict.

    Parse a spec string once where it enters (``parse_spec``) and pass the ``DataSpec`` on: every function of
    ``vitscope.data`` takes either. ``str(spec)`` writes it back as a spec string.
    """

    name: str
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def with_options(self, **overrides: Any) -> DataSpec:
        """This spec with ``overrides`` replacing its options (``path=`` replaces the path)."""
        if not overrides:
            return self
        overrides = dict(overrides)
        path = overrides.pop("path", self.path)
        path = os.path.expanduser(str(path)) if path is not None else None
        return DataSpec(name=self.name, path=path, options={**self.options, **overrides})

    def __str__(self) -> str:
        items = ([self.path] if self.path is not None else []) + [f"{k}={v}" for k, v in self.options.items()]
        return f"{self.name}:{','.join(items)}" if items else self.name


def list_datasets() -> list[str]:
    """Names accepted as the first part of a data spec."""
    return list(DATASET_NAMES)


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def _usage(name: str) -> str:
    return f"'{name}:PATH'" if DATASET_NAMES[name] else f"'{name}' or '{name}:key=value,...'"


def parse_spec(spec: str | DataSpec, **overrides: Any) -> DataSpec:
    """Parse ``spec`` (a ``DataSpec`` is taken as parsed); keyword ``overrides`` replace options given in it.

    Raises:
        ValueError: unknown name (the message lists the valid ones), a path-less path set, a path
            given to a set that takes none, or a malformed option.
    """
    if isinstance(spec, DataSpec):
        return spec.with_options(**overrides)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec must be a non-empty string like 'cifar10:PATH' or 'elpv', got {spec!r}")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in DATASET_NAMES:
        raise ValueError(
            f"unknown data set {name!r} in spec {spec!r}; valid names: {', '.join(DATASET_NAMES)} "
            "(path sets are written 'cifar10:PATH')"
        )
    path: str | None = None
    options: dict[str, Any] = {}
    for item in rest.split(",") if sep and rest.strip() else []:
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if not key.isidentifier():
                raise ValueError(f"bad option {item!r} in data spec {spec!r}: expected key=value")
            if key in options:
                raise ValueError(f"option {key!r} given twice in data spec {spec!r}")
            options[key] = _parse_value(value)
            if isinstance(options[key], float) and not math.isfinite(options[key]):
                raise ValueError(f"option {key}={value.strip()} in data spec {spec!r} must be a finite number")
        elif path is None:
            path = item
        else:
            raise ValueError(f"data spec {spec!r} has two paths ({path!r}, {item!r}); options are key=value")
    if "path" in overrides:  # a path passed as keyword (e.g. from a CLI flag)
        kw_path = overrides.pop("path")
        path = str(kw_path) if kw_path is not None else path
    options.update(overrides)
    needs_path = DATASET_NAMES[name]
    if needs_path and path is None:
        raise ValueError(
            f"data set {name!r} reads a local copy: write the spec as {_usage(name)} "
            f"(the folder with the files; add download=True or --download to fetch them)"
        )
    if not needs_path and path is not None:
        raise ValueError(f"data set {name!r} takes no path but got {path!r}; use {_usage(name)}")
    if path is not None:
        path = os.path.expanduser(path)
    return DataSpec(name=name, path=path, options=options)


def check_options(name: str, options: dict[str, Any], valid: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults from ``valid`` (option -> default) and reject unknown options by name."""
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for data set {name!r}; valid options: {sorted(valid) or 'none'}"
        )
    return {**valid, **options}
