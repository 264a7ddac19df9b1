"""Foreign checkpoints and the hub: read any local timm checkpoint, fit it to a model, load timm's hub weights.

- ``read_state_dict``: the state dict of a local file in a format the Hugging Face hub serves for timm
  (``.safetensors``, ``.bin``, ``.pth``/``.pt``, possibly nested under ``state_dict``/``model`` and wrapped in
  DDP's ``module.``);
- ``load_checkpoint`` / ``load_model``: that state dict passed through the architecture's timm
  ``checkpoint_filter_fn`` and loaded, with one clear error when keys or shapes do not fit;
- ``load_model(name, pretrained=True)``: timm's hub weights through timm's own hub loading.

vitscope's own files (safetensors + sidecar) are ``vitscope.io.weights``; training runs ``vitscope.io.runs``.
Loading never runs code from the file: safetensors, or ``torch.load(weights_only=True)``.
Every failure (missing, truncated or foreign file, shapes that do not fit) is one ``CheckpointError``
naming the file and the fix.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models import clean_state_dict

from vitscope.models import create_model

_logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "load_checkpoint", "load_model", "read_state_dict"]

_MAX_LISTED = 10
_PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names file and fix."""


# ----------------------------------------------------------------------------------------------
# Reading files


def _short(err: BaseException) -> str:
    """First line of an exception message, trimmed (torch's pickle errors run to pages)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint file not found: {str(path)!r}. Check the path (cwd is {os.getcwd()!r})."
        )
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
        raise CheckpointError(
            f"{str(path)!r} is a directory; pass the weights file inside it"
            + (f" (found: {found})" if found else "")
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"Checkpoint file {str(path)!r} is empty (0 bytes); it was not fully written. Save it again."
        )


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then the JSON header ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little")
    return len(head) == 9 and head[8:9] == b"{" and 0 < header_len < path.stat().st_size


def _read_file(path: Path, map_location: str | torch.device) -> Any:
    """The raw object in a weights file, loaded without running any code from it."""
    _check_file(path)
    if _is_safetensors(path):
        try:
            return safetensors.torch.load_file(path, device=str(map_location))
        except Exception as err:  # SafetensorError for truncated/corrupt headers, others for bad data
            raise CheckpointError(
                f"Cannot read {str(path)!r} as safetensors: the file is truncated or corrupt "
                f"({_short(err)}). Download or save it again."
            ) from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm train checkpoints store `args`
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"Refused to load {str(path)!r}: it holds Python objects outside torch's weights-only allowlist "
                f"({', '.join(unsafe[:_MAX_LISTED])}), and unpickling them could run arbitrary code. "
                "vitscope loads plain tensors only "
                "(torch.load(weights_only=True)). Re-save just the weights, e.g. "
                "torch.save(model.state_dict(), path) or vitscope.save_weights(model, 'model.safetensors')."
            ) from None
        raise CheckpointError(_not_a_checkpoint(path, err)) from None
    except Exception as err:  # RuntimeError/OSError/EOFError/KeyError for truncated or foreign files
        raise CheckpointError(_not_a_checkpoint(path, err)) from None


def _not_a_checkpoint(path: Path, err: BaseException) -> str:
    return (
        f"Cannot read {str(path)!r} as a PyTorch checkpoint: the file is truncated, corrupt or not a "
        f"checkpoint ({_short(err)}). Expected .safetensors, or a .bin/.pth/.pt written by torch.save; "
        "download or save it again."
    )


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files cannot be scanned
        return []


_EMA_KEYS = ("state_dict_ema", "model_ema")


def _extract_state_dict(obj: Any, path: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object: timm's nesting keys, DDP/compile prefixes removed.

    ``use_ema``: the EMA weights (``state_dict_ema``, ``model_ema``), a ``CheckpointError`` when there are none;
    otherwise the raw ones (``state_dict``, ``model``), as timm's ``validate.py`` without ``--use-ema``."""
    keys = (_EMA_KEYS if use_ema else ()) + ("state_dict", "model")
    took_ema = False
    for _ in range(3):  # e.g. {'model': {'state_dict': ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((k for k in keys if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if inner is None:
            break
        if not use_ema and any(isinstance(obj.get(k), Mapping) and obj.get(k) for k in _EMA_KEYS):
            _logger.info("%s holds EMA weights too (%s); loading the raw ones (use_ema=True / --use-ema loads "
                         "the EMA ones)", path, inner)
        _logger.debug("Using %r from %s", inner, path)
        took_ema |= inner in _EMA_KEYS
        obj = obj[inner]
    if use_ema and not took_ema:
        raise CheckpointError(f"{str(path)!r} holds no EMA weights (no 'state_dict_ema' or 'model_ema' entry); "
                              "load it without use_ema / --use-ema")
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors). "
            "Save the weights with torch.save(model.state_dict(), path)."
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        listed = list(obj)[:_MAX_LISTED]
        raise CheckpointError(
            f"{str(path)!r} holds no tensors (top-level keys: {listed}); it is not a model checkpoint. "
            "Expected a state dict, possibly under 'state_dict', 'model', 'state_dict_ema' or 'model_ema'."
        )
    skipped = [k for k in obj if k not in tensors]
    if skipped:
        _logger.debug("Ignoring %d non-tensor entries of %s: %s", len(skipped), path, skipped[:_MAX_LISTED])
    return clean_state_dict(tensors)


def read_state_dict(
    path: _PathLike, map_location: str | torch.device = "cpu", use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict of a local checkpoint (.safetensors, .bin, .pth, .pt), without running code from it.

    Nested checkpoints: ``state_dict``, then ``model``; with ``use_ema`` (opt-in, as timm's ``validate.py
    --use-ema``) ``state_dict_ema`` or ``model_ema`` instead, a ``CheckpointError`` when the file has neither.
    ``module.`` and ``_orig_mod.`` prefixes are stripped.
    """
    path = Path(path)
    return _extract_state_dict(_read_file(path, map_location), path, use_ema=use_ema)


# ----------------------------------------------------------------------------------------------
# Fitting a state dict to a model


def _checkpoint_filter(model: nn.Module) -> Callable[[dict, nn.Module], dict] | None:
    """timm's ``checkpoint_filter_fn`` of the model's architecture module, if it has one."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def _apply_filter(state_dict: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict:
    fn = _checkpoint_filter(model)
    if fn is None:
        return state_dict
    try:
        out = fn(state_dict, model)
    except Exception as err:
        raise CheckpointError(
            f"timm's checkpoint filter for {type(model).__name__} ({type(model).__module__}) failed on "
            f"{str(path)!r} ({_short(err)}): the checkpoint is probably from another architecture. "
            "Pass the model name it was trained with."
        ) from None
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _model_name(model: nn.Module) -> str | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return None


def _arch(model: nn.Module) -> str:
    name = _model_name(model)
    return f"{name} ({type(model).__name__})" if name else type(model).__name__


def _classifier_keys(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    clf = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    names = [clf] if isinstance(clf, str) else list(clf or [])
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


def _listing(items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return ", ".join(shown) + more


def _fit_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, strict: bool) -> dict:
    """Check keys and shapes against the model: one CheckpointError (strict) or drop misfits (not strict)."""
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (mismatched or missing or unexpected):
        lines = [f"Checkpoint {str(path)!r} does not fit model {_arch(model)}:"]
        if mismatched:
            lines.append(f"  {len(mismatched)} tensor(s) with different shapes (checkpoint vs model):")
            lines += [f"    {k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                      for k in mismatched[:_MAX_LISTED]]
            if len(mismatched) > _MAX_LISTED:
                lines.append(f"    ... and {len(mismatched) - _MAX_LISTED} more")
        if missing:
            lines.append(f"  {len(missing)} key(s) missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) in the checkpoint: {_listing(unexpected)}")
        saved = _saved_from(path)
        if saved:
            lines.append(f"  The file was saved from {saved}; vitscope.load_weights(path) rebuilds that model.")
        lines.append("Fix: " + _fix_hint(model, state_dict, mismatched, missing, unexpected))
        raise CheckpointError("\n".join(lines))
    if mismatched:
        _logger.warning("Not loading %d tensor(s) of %s whose shapes differ: %s",
                        len(mismatched), path, _listing(mismatched))
        state_dict = {k: v for k, v in state_dict.items() if k not in mismatched}
    if missing or unexpected:
        _logger.warning("Loading %s non-strictly: %d missing key(s) (%s), %d unexpected (%s)",
                        path, len(missing), _listing(missing), len(unexpected), _listing(unexpected))
    return state_dict


def _saved_from(path: Path) -> str:
    """'name with kwargs' from the file's sidecar, or '' when it has none."""
    from vitscope.io.weights import read_sidecar  # weights builds on this module

    try:
        info = read_sidecar(path) or {}
    except CheckpointError:
        return ""
    name = info.get("model_name")
    return f"{name!r} with {info.get('model_kwargs') or {}}" if name else ""


def _fix_hint(model: nn.Module, state_dict: dict, mismatched: list, missing: list, unexpected: list) -> str:
    hints = []
    own = model.state_dict()
    head = next((k for k in _classifier_keys(model) if k.endswith(".weight") and k in mismatched), None)
    if head is not None and state_dict[head].shape[0] != own[head].shape[0]:
        n = state_dict[head].shape[0]
        hints.append(f"the checkpoint's classifier has {n} classes: pass num_classes={n} "
                     "(load_model infers it when num_classes is not given)")
    grid = [k for k in mismatched if k.endswith("pos_embed") and state_dict[k].shape[-1] == own[k].shape[-1]]
    if grid:
        hints.append("the token grid differs: pass the img_size / patch_size the checkpoint was trained with")
    widths = {k for k in mismatched if k.endswith("norm.weight") or k.endswith("norm1.weight")}
    if widths:
        hints.append("the embedding width differs: pass the model size the checkpoint was trained with "
                     "(e.g. tiny vs small)")
    own_count = len(own)
    many = max(2, own_count // 4)
    if not widths and (len(missing) + len(unexpected) > many or len(mismatched) > many):
        hints.append("many keys differ: the checkpoint is probably from another architecture, pass the "
                     "model name it was trained with")
    if not hints:
        hints.append("pass the model name and kwargs (num_classes, img_size, ...) the checkpoint was "
                     "trained with, or strict=False to load only the tensors that fit")
    return "; ".join(hints) + "."


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, strict: bool) -> nn.Module:
    state_dict = _fit_state_dict(model, state_dict, path, strict)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except Exception as err:  # e.g. dtypes that cannot be copied
        raise CheckpointError(f"Loading {str(path)!r} into {_arch(model)} failed: {_short(err)}") from None
    return model


# ----------------------------------------------------------------------------------------------
# Public loaders


def load_checkpoint(
    model: nn.Module, path: _PathLike, strict: bool = True, use_ema: bool = False
) -> nn.Module:
    """Load a local timm checkpoint (.safetensors, .bin, .pth/.pt) into ``model`` and return it.

    The state dict goes through the architecture's timm ``checkpoint_filter_fn`` (e.g. ViT's, which
    resamples ``pos_embed`` to the model's grid and converts foreign key layouts) before loading.

    Args:
        model: Model to load into (in place).
        path: Checkpoint file; ``.pth``/``.pt``/``.bin`` are read with ``torch.load(weights_only=True)``.
        strict: Require every key and shape to match. With ``strict=False``, tensors whose shapes
            differ are skipped (logged as a warning) instead of raising, as are missing/unexpected keys.
        use_ema: Load the EMA weights (``state_dict_ema``, ``model_ema``) instead of the raw ones; opt-in, as
            timm's ``validate.py --use-ema`` (timm's ``load_checkpoint`` prefers them silently). A checkpoint
            without EMA weights is then an error.

    Raises:
        CheckpointError: missing, truncated or foreign file, or keys/shapes that do not fit.
    """
    path = Path(path)
    state_dict = read_state_dict(path, use_ema=use_ema)
    return _load_into(model, _apply_filter(state_dict, model, path), path, strict)


def _checkpoint_num_classes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """The checkpoint's number of classes when it differs from the model's head; None when it fits."""
    own = model.state_dict()
    for key in _classifier_keys(model):
        if not key.endswith(".weight") or key not in own:
            continue
        if key not in state_dict:  # a headless (num_classes=0) checkpoint
            others_fit = all(k in state_dict for k in own if not k.startswith(key.rsplit(".", 1)[0] + "."))
            return 0 if others_fit else None
        n = int(state_dict[key].shape[0])
        return n if n != own[key].shape[0] else None
    return None


def load_model(
    name: str, checkpoint: _PathLike | None = None, *, pretrained: bool = False, strict: bool = True,
    use_ema: bool = False, **kwargs: Any,
) -> nn.Module:
    """Build ``name`` with ``vitscope.create_model(name, **kwargs)`` and load a local checkpoint if given.

    When ``num_classes`` is not given and the checkpoint's classifier (``pretrained_cfg['classifier']``)
    has another number of classes, the model is rebuilt with the checkpoint's, so a CIFAR-10 or ELPV
    checkpoint loads without spelling it out.

    With ``pretrained=True``, timm's own weights for ``name`` (a timm name with an optional pretrained tag,
    e.g. ``vit_base_patch16_224.augreg2_in21k_ft_in1k``; no tag: timm's default one) are loaded through
    timm's Hugging Face hub loading: downloaded into the hub cache (``HF_HUB_CACHE``, ``HF_HOME``) on first
    use, read from it afterwards, never downloaded with ``HF_HUB_OFFLINE=1``. A different ``num_classes``
    gives a freshly initialized head (timm's rule); the preprocessing the weights expect is
    ``timm.data.resolve_data_config(model=model)``.

    ``name`` may be timm's ``hf-hub:ORG/NAME`` (the repository's ``config.json`` names the architecture). Without
    ``pretrained`` or ``checkpoint`` the weights are random: a one-line ``random weights`` warning is logged.
    ``use_ema=True`` loads a checkpoint's EMA weights (``state_dict_ema``, ``model_ema``; an error when it has
    none) instead of its raw ones: opt-in, as timm's ``validate.py --use-ema`` and the command line's ``--use-ema``.
    Loading the raw weights of a checkpoint that has EMA ones too is said in an INFO log line; the commands
    record the choice as ``ema`` in every ``meta.json``.

    Raises:
        ValueError: unknown model name.
        CheckpointError: the checkpoint cannot be read or does not fit; ``pretrained=True`` for a model
            without pretrained weights, or weights neither cached nor downloadable (the message names the
            tag, the cache folder and the command that fetches them).
    """
    if pretrained:
        if checkpoint is not None:
            raise ValueError("load_model: pass pretrained=True (timm's hub weights) or checkpoint=PATH, not both")
        return _load_pretrained(name, **kwargs)
    model = create_model(name, **kwargs)
    if checkpoint is None:
        _logger.warning("random weights: %s is built without pretrained weights or a checkpoint, so what is measured "
                        "is an untrained network (pass --pretrained / pretrained=True or a checkpoint)", name)
        return model
    path = Path(checkpoint)
    raw = read_state_dict(path, use_ema=use_ema)
    state_dict = _apply_filter(raw, model, path)
    if kwargs.get("num_classes") is None:
        n = _checkpoint_num_classes(model, state_dict)
        if n is not None:
            _logger.info("%s has %d classes: building %s with num_classes=%d", path, n, name, n)
            model = create_model(name, **dict(kwargs, num_classes=n))
            state_dict = _apply_filter(raw, model, path)
    return _load_into(model, state_dict, path, strict)


def _hub_cache_dir(cache_dir: Any = None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def _load_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """``create_model(name, pretrained=True, **kwargs)`` with hub failures turned into one CheckpointError."""
    from timm.models import get_pretrained_cfg, split_model_name_tag
    from timm.models._builder import _resolve_pretrained_source

    from vitscope.models._registry import hub_repo, is_hub_name

    if is_hub_name(name):  # hf-hub:ORG/NAME: config.json and weights from that repository
        source, location = "hf-hub", hub_repo(name)
    else:
        arch, tag = split_model_name_tag(name)
        if not timm.is_model(arch):
            create_model(name)  # raises the "unknown model" ValueError with close names
        try:
            cfg = get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError:  # timm: "Invalid pretrained tag"
            cfg = None
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        source, location = _resolve_pretrained_source({**cfg.to_dict(), **overlay}) if cfg else ("", "")
    if not source:
        tags = timm.list_pretrained(f"{arch}.*")
        raise CheckpointError(
            f"timm has no pretrained weights {name!r}"
            + (f"; tags of {arch}: {', '.join(tags[:_MAX_LISTED])}" if tags else
               f"; {arch} has none (a vitscope model, or a timm model without released weights): "
               "train it, or pass a checkpoint")
        )
    hub_id = location[0] if isinstance(location, tuple) else location
    cache = _hub_cache_dir(kwargs.get("cache_dir"))
    try:
        return create_model(name, pretrained=True, **kwargs)
    except TypeError:  # a keyword the architecture does not take (e.g. img_size for a CNN): the caller's
        raise
    except Exception as err:  # hub errors: offline and not cached, no network, no such repo, truncated file
        mismatch = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[\d, ]*\])\) "
                             r"from checkpoint, the shape in current model is torch\.Size\((\[[\d, ]*\])\)", str(err))
        if mismatch and kwargs.get("img_size") is not None:  # e.g. CaiT: timm resamples no position embedding
            key, saved, built = mismatch.groups()
            raise CheckpointError(
                f"timm cannot load {name!r} at img_size {kwargs['img_size']}: its weight loader does not resize "
                f"{key} ({saved} in the weights, {built} at this size); drop --img-size (use the weights' size)"
            ) from None
        if source != "hf-hub":
            raise CheckpointError(f"Cannot load timm's pretrained weights for {name!r} from {location} "
                                  f"({_short(err)})") from None
        raise CheckpointError(_hub_failure(name, hub_id, cache, err)) from None


def _hub_failure(name: str, hub_id: str, cache: str, err: BaseException) -> str:
    """One line saying why hub weights did not load and how to get them."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_id.split("@", 1)[0]
    cached = [f for f in ("model.safetensors", "pytorch_model.bin")
              if isinstance(try_to_load_from_cache(repo, f, cache_dir=cache), str)]
    where = f"the Hugging Face cache {cache}"
    if cached:
        return (f"Pretrained weights {name!r} ({hub_id}) are in {where} but cannot be loaded ({_short(err)}); "
                f"the cached {cached[0]} is probably truncated: delete {cache}/models--{repo.replace('/', '--')} "
                f"and fetch it again with `huggingface-cli download {repo}`")
    if _hub_offline():
        return (f"Pretrained weights {name!r} ({hub_id}) are not in {where} and HF_HUB_OFFLINE=1 forbids downloading "
                f"them; fetch them once online with `huggingface-cli download {repo}` (or `hf download {repo}`) "
                "into the same HF_HOME / HF_HUB_CACHE, or run once without HF_HUB_OFFLINE=1")
    return (f"Pretrained weights {name!r} ({hub_id}) are not in {where} and downloading them failed "
            f"({_short(err)[:160]}); check the network, or fetch them on a connected machine with "
            f"`huggingface-cli download {repo}` and copy its cache (HF_HOME / HF_HUB_CACHE) here")


