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
from vitscope.io.checkpoints import CheckpointError, load_checkpoint

_logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE", "STATE_FILE", "CONFIG_FILE", "METRICS_FILE", "PROBES_FILE", "CHECKPOINTS_DIR", "MANIFEST_FILE",
    "LOCK_FILE", "CHECKPOINT_FORMAT", "epoch_dirs", "latest_checkpoint", "read_manifest", "load_latest",
    "load_state", "load_model_weights", "run_model_spec", "find_run_spec", "load_run_model", "run_finished",
    "KEPT_DIR", "BEST_FILE", "epoch_weights",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PROBES_FILE = "probes.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "checkpoint.json"
LOCK_FILE = ".lock"
CHECKPOINT_FORMAT = "vitscope-checkpoint/1"
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


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory, its files checked against the sizes it records."""
    path = ckpt_dir / MANIFEST_FILE
    if not (ckpt_dir.name.startswith(EPOCH_PREFIX) and ckpt_dir.parent.name == CHECKPOINTS_DIR):
        return {}  # the older top-level layout has no manifest
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} manifest")
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is missing or unreadable ({type(err).__name__}: {str(err)[:200]}); the checkpoint "
            f"{ckpt_dir} is damaged. Delete that directory to fall back to no checkpoint, or train anew "
            "into another --out"
        ) from None
    for name, size in (manifest.get("files") or {}).items():
        actual = (ckpt_dir / name).stat().st_size if (ckpt_dir / name).is_file() else None
        if actual != size:
            raise CheckpointError(
                f"{ckpt_dir / name} is truncated or missing ({actual} bytes, the manifest says {size}); the "
                "checkpoint is damaged (disk full, or the file was changed). Train anew into another --out"
            )
    return manifest


def _read_state(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a ``state.pt``; every failure is one CheckpointError line."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"Refused to load {path}: it holds Python objects outside torch's weights-only allowlist, and "
            "unpickling them could run arbitrary code. A vitscope state.pt holds only tensors and plain "
            "containers; this file was not written by `vitscope train`. Train anew into another --out"
        ) from None
    except Exception as err:  # RuntimeError / EOFError / OSError for truncated or foreign files
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"Cannot read {path}: the file is truncated, corrupt or not a vitscope state "
            f"({type(err).__name__}: {first}). The run cannot resume from it; train anew into another --out"
        ) from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"{path} is not a vitscope training state (no 'epoch'); train anew into another --out")
    return state


def _weights_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise CheckpointError(
            f"Cannot read {path} as safetensors: the file is truncated or corrupt ({type(err).__name__}: "
            f"{str(err)[:200]}). The run cannot resume from it; train anew into another --out"
        ) from None


def load_latest(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """``(state, weights file)`` of the run's latest complete checkpoint.

    Raises:
        FileNotFoundError: no checkpoint (the message says whether ``--resume`` can start the run anew).
        CheckpointError: a damaged, truncated, foreign or unsafe checkpoint file.
    """
    run_dir = Path(run_dir)
    ckpt_dir = latest_checkpoint(run_dir)
    if ckpt_dir is None:
        raise _no_checkpoint(run_dir)
    read_manifest(ckpt_dir)
    weights = ckpt_dir / MODEL_FILE
    weights_epoch = _weights_metadata(weights).get("epoch")
    state = _read_state(ckpt_dir / STATE_FILE)
    if weights_epoch is not None and int(weights_epoch) != int(state["epoch"]):
        raise CheckpointError(
            f"{run_dir}: {MODEL_FILE} is from epoch {weights_epoch} but {STATE_FILE} from epoch "
            f"{state['epoch']} (an older vitscope was killed between the two renames); the run "
            "cannot resume. Train anew into another --out"
        )
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
    (``pretrained``: the run started from timm's hub weights), plus ``preprocessing`` for runs that recorded it:
    the validation preprocessing in timm's data-config keys with ``source`` and ``overridden``
    (``vitscope.training.engine.resolve_preprocessing``); ``create_kwargs``
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
    manifest = read_manifest(ckpt_dir)
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
        load_checkpoint(model, spec["weights"], strict=True)
    return model.to(device).eval(), spec


def run_finished(run_dir: str | os.PathLike) -> bool:
    """True when the run's latest complete checkpoint is of its last epoch, or it stopped early."""
    run_dir = Path(run_dir)
    ckpt_dir = latest_checkpoint(run_dir)
    if ckpt_dir is None:
        return False
    try:
        manifest = read_manifest(ckpt_dir)
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
