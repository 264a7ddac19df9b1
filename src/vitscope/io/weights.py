"""vitscope's weights files: ``model.safetensors`` plus a JSON sidecar (``model.json``).

- ``save_weights``: the state dict and the sidecar (model name, kwargs, versions), written atomically;
- ``load_weights(path)``: rebuilds the model from the file alone (the sidecar, else the copy in the
  safetensors header); a file of a training run is checked against its checkpoint's manifest first.

Foreign timm checkpoints and the hub are ``vitscope.io.checkpoints``; training runs ``vitscope.io.runs``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn as nn

import vitscope
from vitscope.io.atomic import remove_quietly, write_temp
from vitscope.io.checkpoints import (
    CheckpointError,
    _check_file,
    _checkpoint_num_classes,
    _is_safetensors,
    _load_into,
    _model_name,
    _short,
    load_checkpoint,
    load_model,
    read_state_dict,
)
from vitscope.io.runs import verify_weights
from vitscope.models import create_model

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError", "save_weights", "load_weights", "load_checkpoint", "load_model", "read_state_dict",
    "read_sidecar", "sidecar_path", "sort_safetensors_header",
]

SIDECAR_FORMAT = "vitscope-weights/1"
_METADATA_KEY = "vitscope"  # the sidecar's JSON is also stored in the safetensors header under this key
_PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# Saving


def _tensors_for_safetensors(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no two sharing storage (safetensors refuses shared or strided ones).

    Tied weights (two names, one storage) are stored twice, so any loader finds every key.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; safetensors stores "
                "tensors only. Remove the module's extra state before saving."
            )
        t = value.detach().cpu()
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        shared = ident[0] != 0 and ident in seen
        if shared or not t.is_contiguous() or storage.nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(ident)
        out[key] = t
    return out


def sort_safetensors_header(path: _PathLike) -> None:
    """Rewrite a safetensors file's JSON header in place with its keys sorted, so equal tensors and metadata give
    equal bytes (safetensors writes its metadata map in a random order: two saves of one model differ).

    The header keeps its length (the same JSON, reordered; padded with the spaces the format allows), so no
    tensor byte moves. A header whose sorted form would not fit is left as it is.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def sidecar_path(path: _PathLike) -> Path:
    """The JSON sidecar of a weights file: ``model.safetensors`` -> ``model.json``."""
    return Path(path).with_suffix(".json")


def save_weights(
    model: nn.Module,
    path: _PathLike,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model``'s state dict to ``path`` (``.safetensors``) and a JSON sidecar next to it.

    The sidecar holds what ``load_weights`` needs to rebuild the model: the registered model name
    (default: ``model.pretrained_cfg['architecture']``), the ``create_model`` kwargs, the number of
    parameters and the vitscope / timm / torch versions. Both files are written to temp files in the
    destination directory and moved into place with ``os.replace``, so a failure never leaves a
    half-written file. Tied (shared) tensors are stored under each of their names.

    Args:
        model: The model to save.
        path: Destination, ending in ``.safetensors``; parent directories are created.
        model_name: Name for ``vitscope.create_model``; inferred from the model's pretrained_cfg if None.
        model_kwargs: JSON-serializable kwargs the model was built with (e.g. ``{"num_classes": 7}``).

    Returns:
        The path of the weights file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_weights writes safetensors: name the file '*.safetensors', got {str(path)!r}")
    name = model_name or _model_name(model)
    if name is None:
        _logger.warning("No model name for %s: load_weights(%s) needs model=...", type(model).__name__, path)
    kwargs = dict(model_kwargs or {})
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as err:
        bad = [k for k, v in kwargs.items() if not _is_jsonable(v)]
        raise ValueError(
            f"model_kwargs must be JSON-serializable to go in the sidecar; not: {bad} ({err}). "
            "Pass only plain values (numbers, strings, lists)."
        ) from None
    info = {
        "format": SIDECAR_FORMAT,
        "model_name": name,
        "model_kwargs": kwargs,
        "num_params": sum(p.numel() for p in model.parameters()),  # tied parameters counted once
        "vitscope_version": vitscope.__version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }  # no timestamp: saving the same weights twice writes the same bytes
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    tensors = _tensors_for_safetensors(model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar_path(path)

    def write_weights(tmp: str) -> None:
        safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt", _METADATA_KEY: json.dumps(info)})
        sort_safetensors_header(tmp)

    def write_sidecar(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    tmp_weights = write_temp(path, write_weights)
    try:
        tmp_side = write_temp(side, write_sidecar)
    except BaseException:
        remove_quietly(tmp_weights)
        raise
    try:
        os.replace(tmp_weights, path)
        os.replace(tmp_side, side)
    finally:
        remove_quietly(tmp_weights)
        remove_quietly(tmp_side)
    _logger.info("Saved %s (%d tensors) and %s", path, len(tensors), side.name)
    return path


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def read_sidecar(path: _PathLike) -> dict[str, Any] | None:
    """A weights file's sidecar (the ``.json`` next to it, else the safetensors header's copy), or None."""
    path = Path(path)
    side = sidecar_path(path)
    if side.is_file() and side != path:
        try:
            info = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"Cannot read the sidecar {str(side)!r} of {str(path)!r} ({_short(err)}); "
                                  "fix or delete it, or pass model=...") from None
        if not isinstance(info, dict):
            raise CheckpointError(
                f"Sidecar {str(side)!r} is not a JSON object; fix or delete it, or pass model=..."
            )
        return info
    if path.is_file() and _is_safetensors(path):
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            return json.loads(meta[_METADATA_KEY]) if _METADATA_KEY in meta else None
        except Exception:  # a corrupt file is reported by the loader itself
            return None
    return None


def load_weights(
    path: _PathLike,
    model: nn.Module | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load weights written by ``save_weights``; without ``model``, rebuild it from the sidecar.

    Args:
        path: The ``.safetensors`` file (any checkpoint format works when ``model`` is given).
        model: Model to load into; if None, ``vitscope.create_model(name, **kwargs)`` from the sidecar,
            moved to ``map_location``.
        strict: Require every key and shape to match (see ``load_checkpoint``).
        map_location: Device the tensors are read to.

    Raises:
        CheckpointError: no sidecar to rebuild from, unreadable file, or weights that do not fit.
    """
    path = Path(path)
    _check_file(path)
    verify_weights(path)  # a training run's file: its size and SHA-256 as its checkpoint recorded them
    if model is None:
        info = read_sidecar(path)
        if not info or not info.get("model_name"):
            raise CheckpointError(
                f"No model name for {str(path)!r}: its sidecar {str(sidecar_path(path))!r} is missing or "
                "has none. Pass model=vitscope.create_model(NAME, ...), or use "
                "vitscope.io.load_model(NAME, checkpoint=path)."
            )
        name, kwargs = info["model_name"], dict(info.get("model_kwargs") or {})
        try:
            model = create_model(name, **kwargs)
        except Exception as err:
            raise CheckpointError(
                f"Cannot rebuild {name!r} with {kwargs} from the sidecar of {str(path)!r} ({_short(err)}); "
                f"written by vitscope {info.get('vitscope_version')}, timm {info.get('timm_version')}. "
                "Pass model=... built yourself."
            ) from None
        state_dict = read_state_dict(path, map_location=map_location)
        if "num_classes" not in kwargs:  # a model saved without its kwargs: take the head from the weights
            n = _checkpoint_num_classes(model, state_dict)
            if n is not None:
                model = create_model(name, **dict(kwargs, num_classes=n))
        model = _load_into(model, state_dict, path, strict)
        return model.to(map_location)
    return _load_into(model, read_state_dict(path, map_location=map_location), path, strict)
