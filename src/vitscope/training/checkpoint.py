"""Run checkpoints: ``model.safetensors`` (weights) + ``state.pt`` (everything else), written atomically.

``state.pt`` holds the optimizer, scheduler, gradient scaler and EMA state, every RNG state (python,
numpy, torch CPU, CUDA), the epoch, the global step and the resolved config; it contains only
tensors and plain Python containers, so it is read back with ``torch.load(weights_only=True)``
and loading a run never executes code from the file.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from vitscope.io.atomic import atomic_write, atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE", "STATE_FILE", "CONFIG_FILE", "METRICS_FILE", "PROBES_FILE",
    "save_checkpoint", "load_state", "load_model_weights",
    "get_rng_state", "set_rng_state", "read_jsonl", "truncate_jsonl", "append_jsonl", "unwrap_model",
]


MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PROBES_FILE = "probes.jsonl"


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


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, state: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``state.pt`` atomically; both carry ``epoch`` for a consistency check.

    ``state`` must contain ``epoch`` (the last completed epoch) and only tensors / plain containers.
    """
    run_dir = Path(run_dir)
    model = unwrap_model(model)
    # safetensors refuses tensors that share memory; clone (CPU copies) keeps the file self-contained.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"epoch": str(state["epoch"]), "step": str(state.get("step", 0)), "format": "vitscope-run"}
    atomic_write(run_dir / MODEL_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(run_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``state.pt`` of a run, loaded with ``weights_only=True``, checked against ``model.safetensors``."""
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not path.is_file() or not (run_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint ({MODEL_FILE} + {STATE_FILE}); the run ended before its first "
            "epoch finished, or this is not a vitscope run directory. Start it again without --resume."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    with safe_open(str(run_dir / MODEL_FILE), framework="pt") as f:
        weights_epoch = (f.metadata() or {}).get("epoch")
    if weights_epoch is not None and int(weights_epoch) != int(state["epoch"]):
        raise ValueError(
            f"{run_dir}: {MODEL_FILE} is from epoch {weights_epoch} but {STATE_FILE} from epoch "
            f"{state['epoch']} (the run was killed between the two renames); delete the run directory "
            "or train from scratch."
        )
    return state


def load_model_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a safetensors file into ``model`` (on the model's device)."""
    from safetensors.torch import load_file

    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    missing, unexpected = model.load_state_dict(load_file(str(path), device=str(device)), strict=strict)
    if missing or unexpected:
        _logger.warning("loading %s: missing keys %s, unexpected keys %s", path, missing, unexpected)
    return model
