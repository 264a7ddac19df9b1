"""Run checkpoints: one directory per epoch, made visible by one rename, plus the run's lock.

A run directory holds::

    config.yaml  metrics.jsonl  probes.jsonl  model.safetensors  .lock
    checkpoints/epoch-0003/  model.safetensors  state.pt  checkpoint.json

``checkpoints/epoch-N`` is written as ``checkpoints/.tmp-epoch-N-<pid>`` (weights, then ``state.pt``, then
the manifest ``checkpoint.json``, each fsynced) and renamed into place, so a checkpoint is either complete
or invisible; the previous one is deleted only after that. The top-level ``model.safetensors`` is a hard
link to (or copy of) the latest checkpoint's weights, replaced atomically, for tools that take a weights
file; the weights files are read-only (replace them, never write into them). Its safetensors header
carries the network's sidecar (``vitscope.io.read_sidecar``), so ``vitscope.load_weights`` rebuilds the
trained network from the file alone.

``state.pt`` holds the optimizer, scheduler, gradient scaler and EMA state, every RNG state (python,
numpy, torch CPU, CUDA), the epoch, the global step, the early-stopping state and the resolved config;
it contains only tensors and plain Python containers, so it is read back with
``torch.load(weights_only=True)`` and loading a run never executes code from the file.

Runs written before this layout (``model.safetensors`` + ``state.pt`` at the top level) still load and
resume; their first new checkpoint moves them to the new layout.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pickle
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from vitscope.io.atomic import atomic_write_text, json_safe

_logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE", "STATE_FILE", "CONFIG_FILE", "METRICS_FILE", "PROBES_FILE", "CHECKPOINTS_DIR", "MANIFEST_FILE",
    "LOCK_FILE", "RunLockedError", "save_checkpoint", "load_state", "load_latest", "load_model_weights",
    "latest_checkpoint", "run_model_spec", "run_finished", "lock_run", "remove_stale_files",
    "get_rng_state", "set_rng_state", "read_jsonl", "truncate_jsonl", "append_jsonl", "unwrap_model",
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
_EPOCH_PREFIX = "epoch-"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (one short write, flushed and fsynced)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete JSON lines of ``path`` ([] if it does not exist); a torn last line is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                _logger.warning("skipping an unreadable line in %s (a run killed while writing?)", path)
    return records


def truncate_jsonl(path: str | os.PathLike, before_epoch: int) -> None:
    """Keep only the records with ``epoch < before_epoch`` (used when resuming), atomically."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_jsonl(path) if r.get("epoch", -1) < before_epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def get_rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain containers (``weights_only``-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"], "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint.


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _epoch_dir_name(epoch: int) -> str:
    return f"{_EPOCH_PREFIX}{epoch:04d}"


def _sidecar(spec: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """What ``vitscope.io.weights.read_sidecar`` / ``load_weights`` need to rebuild the network."""
    import timm

    import vitscope

    return {
        "format": "vitscope-weights/1", "model_name": spec["model"], "model_kwargs": spec["create_kwargs"],
        "num_params": sum(p.numel() for p in model.parameters()), "vitscope_version": vitscope.__version__,
        "timm_version": timm.__version__, "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _publish_weights(run_dir: Path, weights: Path) -> None:
    """Make ``run_dir/model.safetensors`` the file ``weights`` (a hard link, else a copy), atomically."""
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{MODEL_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(weights, tmp)
        except OSError:  # no hard links on this file system: copy
            shutil.copyfile(weights, tmp)
            _fsync_file(Path(tmp))
        os.replace(tmp, run_dir / MODEL_FILE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed out of the ``epoch-*`` names first, so a kill half-way through
    the removal never leaves a partial directory that looks like a checkpoint."""
    hidden = path.with_name(f"{_OLD_PREFIX}{path.name}-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, state: dict[str, Any],
                    spec: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``state["epoch"]`` as ``run_dir/checkpoints/epoch-N`` (one rename) and return it.

    ``state`` must contain ``epoch`` (the last completed epoch) and only tensors / plain containers.
    ``spec`` describes the network (``model``, ``model_kwargs``, ``img_size``, ``num_classes``, ``data``,
    ``create_kwargs``: what ``vitscope.create_model`` takes); ``info`` is copied into the manifest (e.g.
    ``finished``, ``stopped_early``, ``best_epoch``). Earlier checkpoints are removed once this one is in
    place, and the top-level ``model.safetensors`` then points at its weights.
    """
    run_dir = Path(run_dir)
    model = unwrap_model(model)
    epoch = int(state["epoch"])
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{_epoch_dir_name(epoch)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses tensors that share memory; clone (CPU copies) keeps the file self-contained.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "epoch": str(epoch), "step": str(state.get("step", 0))}
    if spec is not None:
        meta["vitscope"] = json.dumps(_sidecar(spec, model))
    try:
        save_file(tensors, tmp / MODEL_FILE, metadata=meta)
        _fsync_file(tmp / MODEL_FILE)
        os.chmod(tmp / MODEL_FILE, 0o444 & ~_umask())  # read-only: the top-level file is a hard link of it
        torch.save(state, tmp / STATE_FILE)
        _fsync_file(tmp / STATE_FILE)
        manifest = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": int(state.get("step", 0)),
            "spec": {k: v for k, v in (spec or {}).items()}, **(info or {}),
            "files": {name: (tmp / name).stat().st_size for name in (MODEL_FILE, STATE_FILE)},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(json_safe(manifest), indent=1, allow_nan=False), encoding="utf-8")
        _fsync_file(tmp / MANIFEST_FILE)
        _fsync_dir(tmp)
        final = root / _epoch_dir_name(epoch)
        if final.exists():  # a damaged checkpoint of this epoch (the complete ones are all older)
            _discard(final)
        os.rename(tmp, final)  # the checkpoint becomes visible, complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _publish_weights(run_dir, final / MODEL_FILE)
    for e, path in _epoch_dirs(run_dir):
        if e != epoch:
            _discard(path)
    with contextlib.suppress(FileNotFoundError):  # a pre-directory-layout run: its pair is superseded
        os.unlink(run_dir / STATE_FILE)
    return final


def remove_stale_files(run_dir: str | os.PathLike) -> list[str]:
    """Tidy up after a killed writer: delete temp files (``.model.safetensors.*.tmp``, ...), partial or
    discarded checkpoint directories and checkpoints older than the latest, and point the top-level
    ``model.safetensors`` at the latest weights again. Call it only while holding the run's lock. Returns
    the names removed."""
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed.append(path.name)
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(f"{CHECKPOINTS_DIR}/{path.name}")
    dirs = _epoch_dirs(run_dir)
    for _, path in dirs[:-1]:  # killed after publishing a checkpoint, before removing the previous one
        _discard(path)
        removed.append(f"{CHECKPOINTS_DIR}/{path.name}")
    if dirs:
        latest, top = dirs[-1][1] / MODEL_FILE, run_dir / MODEL_FILE
        if latest.is_file() and not (top.is_file() and os.path.samefile(latest, top)):
            _publish_weights(run_dir, latest)  # killed between the rename and the link (or a copying file system)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(run_dir / STATE_FILE)
    if removed:
        _logger.info("removed what an interrupted run left in %s: %s", run_dir, ", ".join(sorted(removed)))
    return removed


# ----------------------------------------------------------------------------------------------
# Finding and reading checkpoints.


def _epoch_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, directory)`` of every ``checkpoints/epoch-N`` directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(_EPOCH_PREFIX) and path.is_dir():
            with contextlib.suppress(ValueError):
                found.append((int(path.name[len(_EPOCH_PREFIX):]), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The directory of the run's latest complete checkpoint (``checkpoints/epoch-N``, or the run directory
    itself for a run of the older top-level layout), or None when no epoch has been checkpointed."""
    run_dir = Path(run_dir)
    dirs = _epoch_dirs(run_dir)
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


def _read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory, its files checked against the sizes it records."""
    path = ckpt_dir / MANIFEST_FILE
    if not (ckpt_dir.name.startswith(_EPOCH_PREFIX) and ckpt_dir.parent.name == CHECKPOINTS_DIR):
        return {}  # the older top-level layout has no manifest
    from vitscope.io.weights import CheckpointError

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
    from vitscope.io.weights import CheckpointError

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
    from vitscope.io.weights import CheckpointError

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
        vitscope.io.weights.CheckpointError: a damaged, truncated, foreign or unsafe checkpoint file.
    """
    from vitscope.io.weights import CheckpointError

    run_dir = Path(run_dir)
    ckpt_dir = latest_checkpoint(run_dir)
    if ckpt_dir is None:
        raise _no_checkpoint(run_dir)
    _read_manifest(ckpt_dir)
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
    from vitscope.training.config import read_yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    data = read_yaml(path)
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
    network (``model_kwargs`` plus ``num_classes``, and ``img_size`` when the model takes one).

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
    manifest = _read_manifest(ckpt_dir)
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
    create = {**kwargs, "num_classes": num_classes}
    if cfg.get("img_size") is not None and _takes_img_size(cfg["model"]):
        create["img_size"] = cfg["img_size"]
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


def _takes_img_size(model_name: str) -> bool:
    """Whether ``vitscope.create_model(model_name, img_size=...)`` is accepted (ViTs yes, CNNs no)."""
    from vitscope.models import create_model

    try:
        with torch.device("meta"):
            create_model(model_name, img_size=224)
    except TypeError as e:
        return "img_size" not in str(e)
    except Exception:
        return True
    return True


def run_finished(run_dir: str | os.PathLike) -> bool:
    """True when the run's latest complete checkpoint is of its last epoch, or it stopped early."""
    run_dir = Path(run_dir)
    ckpt_dir = latest_checkpoint(run_dir)
    if ckpt_dir is None:
        return False
    try:
        manifest = _read_manifest(ckpt_dir)
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


# ----------------------------------------------------------------------------------------------
# The run's lock.


class RunLockedError(ValueError):
    """Another process is training into this run directory."""


@contextlib.contextmanager
def lock_run(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``run_dir/.lock`` while training into ``run_dir``.

    The lock dies with its process (no stale locks after a kill); a second writer gets
    :class:`RunLockedError` naming the holder's pid. Without ``fcntl`` (Windows) nothing is locked.
    """
    run_dir = Path(run_dir)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        _logger.warning("no fcntl on this platform: %s is not locked against a second writer", run_dir)
        yield
        return
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(f"cannot create the run directory's lock {path} ({type(err).__name__}: {err.strerror}); "
                         "choose a writable --out that is not under a file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = os.pread(fd, 32, 0).decode().strip()
        os.close(fd)
        who = f"process {holder}" if holder else "another process"
        raise RunLockedError(
            f"{run_dir} is being trained by {who} (it holds {path}); wait for it to finish or stop it "
            f"(kill {holder or 'PID'}), or train into another --out"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking a flock file races with new lockers)
