"""Writing a run: checkpoints, one directory per epoch made visible by one rename, and the run's lock.

A run directory holds::

    config.yaml  metrics.jsonl  probes.jsonl  model.safetensors  .lock
    checkpoints/epoch-0002/  checkpoints/epoch-0003/  (each: model.safetensors  state.pt  checkpoint.json)

``checkpoints/epoch-N`` is written as ``checkpoints/.tmp-epoch-N-<pid>`` (weights, then ``state.pt``, then
the manifest ``checkpoint.json`` with each file's size and SHA-256, each fsynced) and renamed into place, so a
checkpoint is either complete or invisible. The last two complete checkpoints are kept (the one before is
deleted only after the new one is in place), so a damaged newest checkpoint can be replaced by the previous
one (``train --resume RUN --resume-epoch N``, ``rewind``). The top-level ``model.safetensors`` is a hard
link to (or copy of) the latest checkpoint's weights, replaced atomically, for tools that take a weights
file; the weights files are read-only (replace them, never write into them). Its safetensors header
carries the network's sidecar (``vitscope.io.read_sidecar``), so ``vitscope.load_weights`` rebuilds the
trained network from the file alone.

``state.pt`` holds the optimizer, scheduler, gradient scaler and EMA state, every RNG state (python,
numpy, torch CPU, CUDA), the epoch, the global step, the early-stopping state and the resolved config;
it contains only tensors and plain Python containers, so it is read back with
``torch.load(weights_only=True)`` and loading a run never executes code from the file.

Runs written before this layout (``model.safetensors`` + ``state.pt`` at the top level) still load and
resume; their first new checkpoint moves them to the new layout. Reading a run (finding, checking and
loading checkpoints, rebuilding the network) is ``vitscope.io.runs``; its names are re-exported here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from vitscope.io.atomic import atomic_link, atomic_write_text, file_mode, fsync_dir, fsync_file, json_safe
from vitscope.io.lock import RunLockedError, run_lock
from vitscope.io.runs import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EPOCH_PREFIX,
    KEPT_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PROBES_FILE,
    STATE_FILE,
    checkpoint_of_epoch,
    epoch_dirs,
    latest_checkpoint,
    load_latest,
    load_model_weights,
    load_state,
    read_manifest,
    run_finished,
    run_model_spec,
    sha256_file,
)
from vitscope.io.weights import sort_safetensors_header

_logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE", "STATE_FILE", "CONFIG_FILE", "METRICS_FILE", "PROBES_FILE", "CHECKPOINTS_DIR", "MANIFEST_FILE",
    "LOCK_FILE", "RunLockedError", "save_checkpoint", "load_state", "load_latest", "load_model_weights",
    "latest_checkpoint", "run_model_spec", "run_finished", "lock_run", "remove_stale_files", "rewind",
    "get_rng_state", "set_rng_state", "read_jsonl", "truncate_jsonl", "append_jsonl", "unwrap_model",
]


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


def _epoch_dir_name(epoch: int) -> str:
    return f"{EPOCH_PREFIX}{epoch:04d}"


def _sidecar(spec: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """What ``vitscope.io.weights.read_sidecar`` / ``load_weights`` need to rebuild the network."""
    import timm

    import vitscope

    return {
        "format": "vitscope-weights/1", "model_name": spec["model"], "model_kwargs": spec["create_kwargs"],
        "num_params": sum(p.numel() for p in model.parameters()), "vitscope_version": vitscope.__version__,
        "timm_version": timm.__version__, "torch_version": torch.__version__,
    }  # no timestamp: identical runs write byte-identical weights files


def _publish_weights(run_dir: Path, weights: Path) -> None:
    """Make ``run_dir/model.safetensors`` the file ``weights`` (a hard link, else a copy), atomically."""
    atomic_link(weights, run_dir / MODEL_FILE)


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed out of the ``epoch-*`` names first, so a kill half-way through
    the removal never leaves a partial directory that looks like a checkpoint."""
    hidden = path.with_name(f"{_OLD_PREFIX}{path.name}-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, state: dict[str, Any],
                    spec: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                    keep: bool = False) -> Path:
    """Write the checkpoint of ``state["epoch"]`` as ``run_dir/checkpoints/epoch-N`` (one rename) and return it.

    ``state`` must contain ``epoch`` (the last completed epoch) and only tensors / plain containers.
    ``spec`` describes the network (``model``, ``model_kwargs``, ``img_size``, ``num_classes``, ``data``,
    ``create_kwargs``: what ``vitscope.create_model`` takes); ``info`` is copied into the manifest (e.g.
    ``finished``, ``stopped_early``, ``best_epoch``). The manifest records each file's size and SHA-256, taken
    from the files as written (``vitscope.io.runs.read_manifest`` checks them on every read). Once this checkpoint
    is in place the top-level ``model.safetensors`` points at its weights, and every checkpoint but this one and
    the previous one is removed, so a damaged newest checkpoint is not the end of a run.
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
        sort_safetensors_header(tmp / MODEL_FILE)  # identical runs write identical bytes
        fsync_file(tmp / MODEL_FILE)
        os.chmod(tmp / MODEL_FILE, file_mode(0o444))  # read-only: the top-level file is a hard link of it
        torch.save(state, tmp / STATE_FILE)
        fsync_file(tmp / STATE_FILE)
        manifest = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": int(state.get("step", 0)),
            "spec": {k: v for k, v in (spec or {}).items()}, **(info or {}),
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                      for name in (MODEL_FILE, STATE_FILE)},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(json_safe(manifest), indent=1, allow_nan=False), encoding="utf-8")
        fsync_file(tmp / MANIFEST_FILE)
        fsync_dir(tmp)
        final = root / _epoch_dir_name(epoch)
        if final.exists():  # a damaged checkpoint of this epoch (the complete ones are all older)
            _discard(final)
        os.rename(tmp, final)  # the checkpoint becomes visible, complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    if keep:  # keep_epochs: these weights outlive the checkpoint (vitscope compare RUN@N)
        _keep_weights(root, final / MODEL_FILE, epoch)
    _publish_weights(run_dir, final / MODEL_FILE)
    older = [e for e, _ in epoch_dirs(run_dir) if e < epoch]
    for e, path in epoch_dirs(run_dir):
        if e != epoch and e != max(older, default=None):  # keep this checkpoint and the previous one
            _discard(path)
    with contextlib.suppress(FileNotFoundError):  # a pre-directory-layout run: its pair is superseded
        os.unlink(run_dir / STATE_FILE)
    return final


def _keep_weights(root: Path, weights: Path, epoch: int) -> None:
    """``root/kept/epoch-N.safetensors``: a hard link to (or a copy of) ``weights``, made visible by one rename."""
    kept = root / KEPT_DIR
    kept.mkdir(exist_ok=True)
    atomic_link(weights, kept / f"{_epoch_dir_name(epoch)}.safetensors")
    fsync_dir(kept)


def rewind(run_dir: str | os.PathLike, epoch: int) -> Path:
    """Make the kept checkpoint of ``epoch`` the run's latest: every newer checkpoint is removed (a damaged
    newest one, say) and the top-level ``model.safetensors`` points at its weights. Its files are checked
    first (``vitscope.io.runs.read_manifest``), so nothing is removed for a checkpoint that cannot be resumed.
    Call it only while holding the run's lock. Returns the checkpoint's directory."""
    run_dir = Path(run_dir)
    target = checkpoint_of_epoch(run_dir, epoch)
    read_manifest(target)
    newer = [path for e, path in epoch_dirs(run_dir) if e > epoch]
    for path in newer:
        _discard(path)
    for path in (run_dir / CHECKPOINTS_DIR / KEPT_DIR).glob(f"{EPOCH_PREFIX}*.safetensors"):  # keep_epochs
        with contextlib.suppress(ValueError):
            if int(path.stem[len(EPOCH_PREFIX):]) > epoch:  # weights of the abandoned epochs
                path.unlink()
    if newer:
        _logger.warning("resuming %s from epoch %d: removed the newer checkpoint(s) %s", run_dir, epoch,
                        ", ".join(p.name for p in newer))
    _publish_weights(run_dir, target / MODEL_FILE)
    return target


def remove_stale_files(run_dir: str | os.PathLike) -> list[str]:
    """Tidy up after a killed writer: delete temp files (``.model.safetensors.*.tmp``, ...), partial or
    discarded checkpoint directories and checkpoints older than the latest two, and point the top-level
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
    dirs = epoch_dirs(run_dir)
    for _, path in dirs[:-2]:  # killed after publishing a checkpoint, before removing the one before the previous
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
# The run's lock.


def lock_run(run_dir: str | os.PathLike) -> contextlib.AbstractContextManager:
    """The run lock (``vitscope.io.lock.run_lock``) on ``run_dir/.lock`` while training into ``run_dir``: a second
    writer gets :class:`RunLockedError` naming the holder's pid."""
    return run_lock(Path(run_dir) / LOCK_FILE, run_dir)
