"""Training runs on disk: the one way to find a run's checkpoints, read them and rebuild the trained network.

A run directory (written by ``vitscope.training.checkpoint``) holds::

    config.yaml  metrics.jsonl  probes.jsonl  model.safetensors  .lock
    checkpoints/epoch-0003/  model.safetensors  state.pt  checkpoint.json

- ``run_model_spec(path)``: what builds the trained network (name, ``create_kwargs``, classes, data,
  preprocessing) and its weights file, for a run directory or one of its weights files;
- ``load_run_model(path)``: that network with its weights (``vitscope.create_model(model, **create_kwargs)``);
- ``load_latest(run_dir)``: the latest complete checkpoint's training state and weights (``--resume``);
- ``run_finished(run_dir)``: whether the run reached its last epoch or stopped early.

Runs written before the ``checkpoints/`` layout (``model.safetensors`` + ``state.pt`` at the top level,
the network described by ``config.yaml``) still load. Nothing here runs code from a file: safetensors, or
``torch.load(weights_only=True)``; every failure is one ``CheckpointError`` or ``FileNotFoundError`` line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from safetensors import safe_open

from vitscope import models
from vitscope.io.checkpoints import CheckpointError, _load_into, read_state_dict

_logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE", "STATE_FILE", "CONFIG_FILE", "METRICS_FILE", "PROBES_FILE", "CHECKPOINTS_DIR", "MANIFEST_FILE",
    "LOCK_FILE", "CHECKPOINT_FORMAT", "epoch_dirs", "latest_checkpoint", "read_manifest", "load_latest",
    "load_state", "load_model_weights", "run_model_spec", "find_run_spec", "load_run_model", "run_finished",
    "KEPT_DIR", "BEST_FILE", "epoch_weights",
    "sha256_file", "verify_weights", "checkpoint_of_epoch",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PROBES_FILE = "probes.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "checkpoint.json"
LOCK_FILE = ".lock"
CHECKPOINT_FORMAT = "vitscope-checkpoint/2"  # files: {name: {"bytes": n, "sha256": hex}}
_OLD_FORMATS = ("vitscope-checkpoint/1",)  # files: {name: n}: sizes only
EPOCH_PREFIX = "epoch-"
KEPT_DIR = "kept"  # checkpoints/kept/epoch-NNNN.safetensors: weights of epochs kept with the keep_epochs setting
BEST_FILE = "best.safetensors"  # early stopping: the weights of the best validation epoch so far


# ----------------------------------------------------------------------------------------------
# Finding and reading checkpoints.


def epoch_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, directory)`` of every ``checkpoints/epoch-N`` directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(EPOCH_PREFIX) and path.is_dir():
            with contextlib.suppress(ValueError):
                found.append((int(path.name[len(EPOCH_PREFIX):]), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The directory of the run's latest complete checkpoint (``checkpoints/epoch-N``, or the run directory
    itself for a run of the older top-level layout), or None when no epoch has been checkpointed."""
    run_dir = Path(run_dir)
    dirs = epoch_dirs(run_dir)
    if dirs:
        return dirs[-1][1]
    if (run_dir / STATE_FILE).is_file() and (run_dir / MODEL_FILE).is_file():
        return run_dir
    return None


def _no_checkpoint(run_dir: Path) -> FileNotFoundError:
    if (run_dir / CONFIG_FILE).is_file():
        return FileNotFoundError(
            f"{run_dir} has no complete checkpoint yet (the run ended before its first epoch finished); "
            f"resume it with `vitscope train --resume {run_dir}`, which starts it from its saved config"
        )
    return FileNotFoundError(
        f"{run_dir} is not a vitscope run directory (no {CONFIG_FILE} and no {CHECKPOINTS_DIR}/); pass the "
        "--out directory of a `vitscope train` run"
    )


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _epoch_of(ckpt_dir: Path) -> int | None:
    with contextlib.suppress(ValueError):
        return int(ckpt_dir.name[len(EPOCH_PREFIX):])
    return None


def _remedy(ckpt_dir: Path, resuming: bool) -> str:
    """What to do about a damaged checkpoint: the previous complete one when the run kept it, else train anew."""
    run = ckpt_dir.parent.parent
    older = [p for e, p in epoch_dirs(run) if e < (_epoch_of(ckpt_dir) or 0)]
    for prev in reversed(older):
        try:
            read_manifest(prev, _remedy_of=False)
        except CheckpointError:
            continue
        e = _epoch_of(prev)
        if resuming:
            return (f"the previous checkpoint {prev} is intact: continue from it with `vitscope train --resume {run} "
                    f"--resume-epoch {e}` (the damaged one is then removed)")
        return f"the previous checkpoint {prev} is intact: read it with --checkpoint {prev / MODEL_FILE}"
    return "no intact earlier checkpoint is kept; train anew into another --out"


def _damaged(ckpt_dir: Path, what: str, resuming: bool = True) -> CheckpointError:
    """One line: what is wrong with a checkpoint, and the previous checkpoint to use instead (if any)."""
    if not (ckpt_dir.name.startswith(EPOCH_PREFIX) and ckpt_dir.parent.name == CHECKPOINTS_DIR):
        return CheckpointError(f"{what}; the run cannot be read from it: train anew into another --out")
    return CheckpointError(f"{what}; {_remedy(ckpt_dir, resuming)}")


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


_SHA256_DIGITS = set("0123456789abcdef")
_SPEC_FIELDS: dict[str, tuple[str, Any]] = {  # key -> (what it must be, check)
    "model": ("a model name (a non-empty string)", lambda v: isinstance(v, str) and bool(v.strip())),
    "model_kwargs": ("a mapping of create_model keywords", lambda v: isinstance(v, dict)),
    "create_kwargs": ("a mapping of create_model keywords", lambda v: isinstance(v, dict)),
    "img_size": ("a positive integer or null", lambda v: v is None or _is_int(v, 1)),
    "num_classes": ("a non-negative integer or null", lambda v: v is None or _is_int(v)),
    "data": ("a data spec string or null", lambda v: v is None or isinstance(v, str)),
    "data_options": ("a mapping", lambda v: isinstance(v, dict)),
    "pretrained": ("true or false", lambda v: isinstance(v, bool)),
    "preprocessing": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "precision": ("float32, bfloat16 or float16", lambda v: v in ("float32", "bfloat16", "float16")),
}
_INFO_FIELDS: dict[str, tuple[str, Any]] = {
    "step": ("a non-negative integer", _is_int),
    "total_epochs": ("a positive integer", lambda v: _is_int(v, 1)),
    "finished": ("true or false", lambda v: isinstance(v, bool)),
    "stopped_early": ("true or false", lambda v: isinstance(v, bool)),
    "best_epoch": ("an integer >= -1", lambda v: _is_int(v, -1)),
    "best_val_nll": ("a number or null", lambda v: v is None or (isinstance(v, (int, float))
                                                                  and not isinstance(v, bool))),
}


def _manifest_problem(manifest: Any, ckpt_dir: Path) -> str | None:
    """What is malformed in a parsed manifest (the first problem, in words), or None when it fits the schema:
    ``format``; ``epoch`` (that of its directory); ``files``: ``{name: {"bytes": n, "sha256": hex}}`` (format 2) or
    ``{name: n}`` (format 1) naming the weights and the state; ``spec`` (``_SPEC_FIELDS``); the run's info fields."""
    if not isinstance(manifest, dict):
        return f"it holds a {type(manifest).__name__}, not a JSON object"
    fmt = manifest.get("format")
    if fmt not in (CHECKPOINT_FORMAT, *_OLD_FORMATS):
        return f"'format' is {fmt!r}, not {CHECKPOINT_FORMAT!r}"
    epoch = manifest.get("epoch")
    if not _is_int(epoch) or epoch != _epoch_of(ckpt_dir):
        return f"'epoch' is {epoch!r}, not the epoch of its directory ({_epoch_of(ckpt_dir)})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not {MODEL_FILE, STATE_FILE} <= set(files):
        return f"'files' must map {MODEL_FILE} and {STATE_FILE} to their size and SHA-256, got {files!r:.80}"
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            return f"'files' names {name!r}, not a file of the checkpoint"
        if fmt in _OLD_FORMATS:
            if not _is_int(entry):
                return f"'files'[{name!r}] is {entry!r:.60}, not a size in bytes"
        elif not (isinstance(entry, dict) and _is_int(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
                  and len(entry["sha256"]) == 64 and set(entry["sha256"]) <= _SHA256_DIGITS):
            return f"'files'[{name!r}] is {entry!r:.80}, not {{\"bytes\": N, \"sha256\": 64 hex digits}}"
    spec = manifest.get("spec", {})
    if not isinstance(spec, dict):
        return f"'spec' is {spec!r:.60}, not a mapping describing the network"
    if spec:
        for key, (what, ok) in _SPEC_FIELDS.items():
            if key in spec and not ok(spec[key]):
                return f"'spec.{key}' is {spec[key]!r:.60}, not {what}"
        if "model" not in spec:
            return "'spec' names no 'model'"
        create = spec.get("create_kwargs") or {}
        for key in ("img_size", "num_classes"):
            if key in create and spec.get(key) is not None and create[key] != spec[key]:
                return (f"'spec.create_kwargs.{key}' ({create[key]!r}) contradicts 'spec.{key}' "
                        f"({spec[key]!r})")
    for key, (what, ok) in _INFO_FIELDS.items():
        if key in manifest and not ok(manifest[key]):
            return f"'{key}' is {manifest[key]!r:.60}, not {what}"
    return None


_NOTED_OLD: set[str] = set()


def read_manifest(ckpt_dir: Path, verify: tuple[str, ...] | None = None, *, resuming: bool = True,
                  _remedy_of: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint directory, validated against its schema, and the files in ``verify``
    (default: every file it lists) checked against the sizes and SHA-256 it recorded when they were written.

    The older top-level layout has no manifest (``{}``). Manifests of format 1 (vitscope before hashes) record
    sizes only: their files are checked by size, which is said once per checkpoint.

    Raises:
        CheckpointError: one line naming the malformed field or the damaged file, and the previous checkpoint
            (how to resume from it, or with ``resuming=False`` how to read it).
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir.name.startswith(EPOCH_PREFIX) and ckpt_dir.parent.name == CHECKPOINTS_DIR):
        return {}  # the older top-level layout has no manifest
    path = ckpt_dir / MANIFEST_FILE

    def damaged(what: str) -> CheckpointError:
        return _damaged(ckpt_dir, what, resuming) if _remedy_of else CheckpointError(what)

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged(f"{path} is missing or unreadable ({type(err).__name__}: {str(err)[:120]}): the checkpoint "
                      f"{ckpt_dir} is damaged") from None
    problem = _manifest_problem(manifest, ckpt_dir)
    if problem is not None:
        raise damaged(f"{path} is malformed: {problem}")
    files = manifest["files"]
    old = manifest["format"] in _OLD_FORMATS
    if old and str(ckpt_dir) not in _NOTED_OLD:
        _NOTED_OLD.add(str(ckpt_dir))
        _logger.warning("%s was written by an older vitscope: its manifest records no SHA-256, so its files are "
                        "checked by size only", ckpt_dir)
    for name in files if verify is None else verify:
        if name not in files:
            continue
        size = files[name] if old else files[name]["bytes"]
        file = ckpt_dir / name
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            raise damaged(f"{file} is truncated or missing ({actual} bytes, the manifest says {size}): the "
                          "checkpoint is damaged (disk full, or the file was changed)")
        if not old and sha256_file(file) != files[name]["sha256"]:
            raise damaged(f"{file} does not match the SHA-256 its manifest recorded when it was written: the file "
                          "was changed or damaged on disk")
    return manifest


def verify_weights(path: str | os.PathLike) -> None:
    """Check a weights file of a training run against its checkpoint's manifest (size and SHA-256).

    ``RUN/checkpoints/epoch-N/model.safetensors`` is checked against ``epoch-N``'s manifest, the top-level
    ``RUN/model.safetensors`` (the latest checkpoint's weights) against the latest one's; a file outside a
    run, or of a run of the older layout, is not checked. Raises ``CheckpointError`` (one line) on a mismatch.
    """
    path = Path(path)
    if path.parent.name.startswith(EPOCH_PREFIX) and path.parent.parent.name == CHECKPOINTS_DIR:
        read_manifest(path.parent, verify=(path.name,), resuming=False)
        return
    if path.name != MODEL_FILE or not (path.parent / CHECKPOINTS_DIR).is_dir():
        return
    ckpt_dir = latest_checkpoint(path.parent)
    if ckpt_dir is None or ckpt_dir == path.parent:
        return
    manifest = read_manifest(ckpt_dir, verify=(), resuming=False)
    entry = manifest["files"][MODEL_FILE]
    old = manifest["format"] in _OLD_FORMATS
    size = entry if old else entry["bytes"]
    if path.stat().st_size != size or (not old and sha256_file(path) != entry["sha256"]):
        raise _damaged(ckpt_dir, f"{path} does not match the weights its latest checkpoint {ckpt_dir} recorded "
                       "(size and SHA-256): the file was changed or damaged on disk", resuming=False)


def _read_state(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a ``state.pt``; every failure is one CheckpointError line."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _damaged(path.parent, (
            f"Refused to load {path}: it holds Python objects outside torch's weights-only allowlist, and "
            "unpickling them could run arbitrary code. A vitscope state.pt holds only tensors and plain "
            "containers; this file was not written by `vitscope train`")) from None
    except Exception as err:  # RuntimeError / EOFError / OSError for truncated or foreign files
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise _damaged(path.parent, f"Cannot read {path}: the file is truncated, corrupt or not a vitscope state "
                       f"({type(err).__name__}: {first})") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise _damaged(path.parent, f"{path} is not a vitscope training state (no 'epoch')")
    return state


def _weights_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise _damaged(path.parent, f"Cannot read {path} as safetensors: the file is truncated or corrupt "
                       f"({type(err).__name__}: {str(err)[:200]})") from None


def checkpoint_of_epoch(run_dir: str | os.PathLike, epoch: int) -> Path:
    """The directory ``checkpoints/epoch-N`` of ``epoch``; FileNotFoundError naming the kept ones otherwise."""
    kept = dict(epoch_dirs(Path(run_dir)))
    if epoch not in kept:
        raise FileNotFoundError(f"{run_dir} keeps no checkpoint of epoch {epoch} (it keeps: "
                                f"{sorted(kept) or 'none'}); resume from one of those")
    return kept[epoch]


def load_latest(run_dir: str | os.PathLike, epoch: int | None = None) -> tuple[dict[str, Any], Path]:
    """``(state, weights file)`` of the run's latest complete checkpoint (or of ``epoch``'s, if kept), its
    manifest validated and every file checked against the SHA-256 recorded when it was written.

    Raises:
        FileNotFoundError: no checkpoint (the message says whether ``--resume`` can start the run anew).
        CheckpointError: a damaged, truncated, foreign or unsafe checkpoint file (the message names the
            previous checkpoint when the run keeps an intact one).
    """
    run_dir = Path(run_dir)
    ckpt_dir = latest_checkpoint(run_dir) if epoch is None else checkpoint_of_epoch(run_dir, epoch)
    if ckpt_dir is None:
        raise _no_checkpoint(run_dir)
    read_manifest(ckpt_dir)
    weights = ckpt_dir / MODEL_FILE
    weights_epoch = _weights_metadata(weights).get("epoch")
    state = _read_state(ckpt_dir / STATE_FILE)
    if weights_epoch is not None and int(weights_epoch) != int(state["epoch"]):
        raise _damaged(ckpt_dir, f"{run_dir}: {MODEL_FILE} is from epoch {weights_epoch} but {STATE_FILE} from epoch "
                       f"{state['epoch']} (an older vitscope was killed between the two renames)")
    return state, weights


def load_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``state.pt`` of the run's latest complete checkpoint, loaded with ``weights_only=True``."""
    return load_latest(run_dir)[0]


def load_model_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a safetensors file into ``model`` (on the model's device)."""
    from safetensors.torch import load_file

    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    missing, unexpected = model.load_state_dict(load_file(str(path), device=str(device)), strict=strict)
    if missing or unexpected:
        _logger.warning("loading %s: missing keys %s, unexpected keys %s", path, missing, unexpected)
    return model


def _run_dir_of(path: Path) -> Path:
    """The run directory of a run directory or of one of its weights files."""
    if path.is_file() or path.suffix == ".safetensors":
        parent = path.parent
        if parent.parent.name == CHECKPOINTS_DIR:  # RUN/checkpoints/epoch-N/model.safetensors
            return parent.parent.parent
        return parent
    return path


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a dict ({} when absent); unreadable YAML is a one-line ValueError."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read {path} ({type(err).__name__}); it is not a vitscope run's config") from None
    return data if isinstance(data, dict) else {}


def run_model_spec(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What builds the network a run trained, and its latest complete weights.

    ``run_dir`` is a run directory, or a weights file of one (``RUN/model.safetensors``,
    ``RUN/checkpoints/epoch-N/model.safetensors``; that file is then the one returned). Returns
    ``{"model": str, "model_kwargs": dict, "img_size": int | None, "num_classes": int, "data": str | None,
    "data_options": dict, "create_kwargs": dict, "pretrained": bool, "weights": Path, "epoch": int | None}``
    (``pretrained``: the run started from timm's hub weights), plus ``precision`` (what it trained in: float32 when
    ``amp`` was asked for on a CPU) and ``preprocessing`` for runs that recorded them:
    the validation preprocessing in timm's data-config keys with ``source`` and ``overridden``
    (``vitscope.training.loaders.resolve_preprocessing``); ``create_kwargs``
    are the keyword arguments of ``vitscope.create_model(model, **create_kwargs)`` that build the trained
    network (``model_kwargs`` plus ``num_classes`` and ``img_size``; ``create_model`` drops ``img_size`` for the
    models that take any input size).

    Raises:
        FileNotFoundError: not a run directory, or no complete checkpoint yet.
    """
    given = Path(run_dir)
    run = _run_dir_of(given)
    if given.is_file() and given.suffix != ".safetensors":
        raise FileNotFoundError(f"{given} is not a run directory nor its model.safetensors; pass the run's --out")
    if not given.exists():
        raise FileNotFoundError(f"{given} does not exist; pass the --out directory of a `vitscope train` run")
    ckpt_dir = latest_checkpoint(run)
    if ckpt_dir is None:
        raise _no_checkpoint(run)
    manifest = read_manifest(ckpt_dir, verify=(), resuming=False)  # the weights are checked when loaded
    weights = given if given.is_file() else ckpt_dir / MODEL_FILE
    if manifest.get("spec"):
        spec = dict(manifest["spec"])
        spec.update(weights=weights, epoch=manifest.get("epoch"))
        if weights != ckpt_dir / MODEL_FILE:  # a given file: its own epoch
            with contextlib.suppress(Exception):
                spec["epoch"] = int(_weights_metadata(weights)["epoch"])
        return spec
    # The older top-level layout: the network is described by config.yaml.
    cfg = _read_config(run)
    if not cfg.get("model"):
        raise FileNotFoundError(f"{run} has weights but no readable {CONFIG_FILE} naming the model; it is not "
                                "a complete vitscope run directory")
    num_classes = cfg.get("num_classes")
    if num_classes is None:  # resolved into config.yaml by every vitscope train; read the head otherwise
        num_classes = _head_classes(weights)
    kwargs = dict(cfg.get("model_kwargs") or {})
    create = {**kwargs, "num_classes": num_classes, "img_size": cfg.get("img_size")}  # create_model drops None
    create = {k: v for k, v in create.items() if v is not None}
    epoch = _weights_metadata(weights).get("epoch")
    return {"model": cfg["model"], "model_kwargs": kwargs, "img_size": cfg.get("img_size"),
            "num_classes": num_classes, "data": cfg.get("data"), "data_options": dict(cfg.get("data_options") or {}),
            "create_kwargs": create, "pretrained": bool(cfg.get("pretrained", False)), "weights": weights,
            "epoch": int(epoch) if epoch is not None else None}


def _head_classes(weights: Path) -> int | None:
    with safe_open(str(weights), framework="pt") as f:
        for key in ("head.weight", "fc.weight", "classifier.weight", "head.fc.weight"):
            if key in f.keys():
                return int(f.get_slice(key).get_shape()[0])
    return None


def find_run_spec(path: str | os.PathLike) -> dict[str, Any] | None:
    """``run_model_spec(path)`` when ``path`` is a run directory or a weights file inside one, ``None`` for a
    file outside a run (a ``save_weights`` file or a foreign checkpoint), so callers can fall back to those.

    Raises:
        FileNotFoundError: a directory that is not a run, or a run without a complete checkpoint.
    """
    path = Path(path).expanduser()
    run = _run_dir_of(path)
    if not (run / CONFIG_FILE).is_file():
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a directory without {CONFIG_FILE}: pass a vitscope training run "
                                    "directory or a weights file (.safetensors, .bin, .pth)")
        return None
    if not path.is_dir() and path.suffix != ".safetensors":
        return None  # another file that happens to sit in a run directory
    spec = run_model_spec(path)
    if "pretrained" not in spec:
        spec["pretrained"] = bool(_read_config(run).get("pretrained", False))
    return spec


def load_run_model(path: str | os.PathLike | dict[str, Any], ema: bool = False,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(network in eval mode on device, its spec)`` of a run directory, one of its weights files, or a spec
    ``run_model_spec`` returned: ``vitscope.create_model(spec["model"], **spec["create_kwargs"])`` with the
    weights loaded strictly; ``ema=True`` takes the EMA weights of the latest checkpoint's ``state.pt``.

    Raises:
        FileNotFoundError: not a run, or no complete checkpoint yet.
        CheckpointError: weights that cannot be read or do not fit the recorded network.
        ValueError: the recorded network cannot be built (a model this vitscope / timm does not know).
    """
    spec = dict(path) if isinstance(path, dict) else run_model_spec(path)
    kwargs = spec.get("create_kwargs")
    if kwargs is None:  # a spec written without it: the same keys, from its parts
        kwargs = {**(spec.get("model_kwargs") or {}), "num_classes": spec.get("num_classes"),
                  "img_size": spec.get("img_size")}
    kwargs = dict(kwargs)
    try:
        model = models.create_model(spec["model"], **kwargs)  # (looked up on call: one builder to spy on)
    except (TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"cannot rebuild {spec['model']!r} with {kwargs} from {spec['weights']} ({first}); "
                         "load it with the vitscope / timm versions that trained it") from None
    if ema:
        run = _run_dir_of(Path(spec["weights"]))
        state = load_state(run)
        if state.get("ema") is None:
            raise ValueError(f"{run} was trained without EMA (model_ema=false); load it with ema=False")
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()})
    else:
        verify_weights(spec["weights"])
        try:  # exactly the recorded network: no timm filter (it would resample a position embedding to fit)
            _load_into(model, read_state_dict(spec["weights"]), Path(spec["weights"]), strict=True)
        except CheckpointError as err:  # the weights contradict the network the run's records describe
            first = str(err).splitlines()[0]
            raise CheckpointError(f"{spec['weights']} does not fit the network its run records ({spec['model']} "
                                  f"with {kwargs}): {first.rstrip(':')}; the run's {MANIFEST_FILE} or "
                                  f"{CONFIG_FILE} was changed, or the weights are not this run's") from None
    return model.to(device).eval(), spec


def run_finished(run_dir: str | os.PathLike) -> bool:
    """True when the run's latest complete checkpoint is of its last epoch, or it stopped early."""
    run_dir = Path(run_dir)
    ckpt_dir = latest_checkpoint(run_dir)
    if ckpt_dir is None:
        return False
    try:
        manifest = read_manifest(ckpt_dir, verify=(), resuming=False)  # schema only: no file is read here
        epoch = manifest["epoch"] if manifest else int(_weights_metadata(ckpt_dir / MODEL_FILE)["epoch"])
    except (ValueError, KeyError):
        return False
    if manifest.get("stopped_early"):
        return True
    try:
        cfg = _read_config(run_dir)
    except ValueError:  # an unreadable config.yaml
        cfg = {}
    try:
        total = int(cfg["epochs"]) + (int(cfg.get("warmup_epochs") or 0) if cfg.get("warmup_prefix") else 0)
    except (KeyError, TypeError, ValueError):
        total = manifest.get("total_epochs")
        if total is None:
            return False
    return int(epoch) >= int(total) - 1




def epoch_weights(run_dir: str | os.PathLike, epoch: int | str) -> Path:
    """The weights file of one epoch of a run: ``"last"`` (the latest checkpoint), ``"best"`` (early stopping's
    ``best.safetensors``) or an epoch number held by ``checkpoints/epoch-N``, ``checkpoints/kept/epoch-N.safetensors``
    (``keep_epochs``) or ``best.safetensors``. Used to compare a run with itself over training.

    Raises:
        FileNotFoundError: the run does not hold that epoch (the message lists the epochs it holds).
    """
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a vitscope run directory (no {CONFIG_FILE})")
    held: dict[int, Path] = {}
    kept = run / CHECKPOINTS_DIR / KEPT_DIR
    if kept.is_dir():
        for path in kept.glob(f"{EPOCH_PREFIX}*.safetensors"):
            with contextlib.suppress(ValueError):
                held[int(path.stem[len(EPOCH_PREFIX):])] = path
    best = run / BEST_FILE
    best_epoch = None
    if best.is_file():
        with contextlib.suppress(CheckpointError, KeyError, ValueError):
            best_epoch = int(_weights_metadata(best)["epoch"])
            held.setdefault(best_epoch, best)
    for e, path in epoch_dirs(run):
        held[e] = path / MODEL_FILE
    if epoch == "last":
        latest = latest_checkpoint(run)
        if latest is None:
            raise _no_checkpoint(run)
        return latest / MODEL_FILE
    if epoch == "best":
        if best_epoch is None:
            raise FileNotFoundError(f"{run} has no {BEST_FILE} (it is written by early stopping, "
                                    "early_stop_patience); use RUN@last or an epoch number")
        return best
    if int(epoch) not in held:
        raise FileNotFoundError(f"{run} does not hold the weights of epoch {epoch}; it holds epochs "
                                f"{sorted(held) or 'none'} (train with keep_epochs=N to keep every N-th epoch)")
    return held[int(epoch)]
