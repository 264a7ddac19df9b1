"""DistributedDataParallel on CPU (gloo): ``torchrun --nproc_per_node 2 -m vitscope train`` with the global
batch split over 2 processes matches one process with the same global batch.

DDP averages the gradients of the ranks; with a mean loss over per-rank batches of B/2 that equals
the single-process mean over B, and the shared DistributedSampler order (seed + epoch) gives both
runs the same global batches. No augmentation, dropout or BatchNorm, so the runs differ only by
floating-point summation order.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitscope.training import build_model, resolve_config, train
from vitscope.training.checkpoint import load_state, read_jsonl
from vitscope.training.engine import strip_timing

# SAM, EMA and probes on ConViT too: a probe forward resizes GPSA's rel_indices buffer, which DDP broadcasts.
OVERRIDES = ["epochs=2", "batch_size=32", "lr=0.01", "warmup_epochs=0", "augment=false", "deterministic=true",
             "progress=false", "seed=3", "sam_rho=0.05", "model_ema=true", "model_ema_decay=0.5",
             "probes={every: 1, measures: [gpsa_gates, attention_entropy], num_images: 4}"]
DATA = "fake:n=128,n_eval=33"  # 33 validation images: shards of 17 and 16, every image counted once
COMMON = ["--config", "cpu-quick", "--model", "test_convit_32", "--data", DATA]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vitscope", "train", *COMMON, "--out", str(ddp_dir), *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single_dir = tmp_path / "single"
    cfg = resolve_config("cpu-quick", OVERRIDES, model="test_convit_32", data=DATA, out=str(single_dir))
    train(cfg)

    ddp_m, single_m = read_jsonl(ddp_dir / "metrics.jsonl"), read_jsonl(single_dir / "metrics.jsonl")
    assert [r["epoch"] for r in ddp_m] == [0, 1]  # rank 0 alone wrote: one line per epoch
    for d, s in zip(ddp_m, single_m):
        d, s = strip_timing(d), strip_timing(s)
        assert d.keys() == s.keys()
        assert d["val_n"] == s["val_n"] == 33 and d["train_images"] == s["train_images"] == 128
        for key in d:
            assert d[key] == pytest.approx(s[key], rel=1e-4, abs=1e-5), key
    got, want = load_file(ddp_dir / "model.safetensors"), load_file(single_dir / "model.safetensors")
    # GPSA's pos_proj bias shifts every positional logit of a row equally, so softmax makes its gradient
    # exactly zero: its float gradient is rounding noise, which Adam rescales to full steps. Skip it.
    compared = [k for k in want if not k.endswith("pos_proj.bias")]
    assert len(compared) == len(want) - 2
    for key in compared:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    torch.manual_seed(3)  # the engine's initial weights: the updates are large next to the tolerance
    init = build_model(dataclasses.replace(cfg, num_classes=10)).state_dict()
    assert max((want[k] - init[k]).abs().max().item() for k in want) > 1e-2
    state = load_state(ddp_dir)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG state is kept
    assert sorted(p.name for p in ddp_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl",
                                                          "model.safetensors", "probes.jsonl"]
    assert [p.name for p in (ddp_dir / "checkpoints").iterdir()] == ["epoch-0001"]  # the previous one removed
    ddp_p, single_p = read_jsonl(ddp_dir / "probes.jsonl"), read_jsonl(single_dir / "probes.jsonl")
    assert [(p["epoch"], p["measure"]) for p in ddp_p] == [(p["epoch"], p["measure"]) for p in single_p]
    assert len(ddp_p) == 6
    for d, s in zip(ddp_p, single_p):
        np.testing.assert_allclose(d["values"], s["values"], rtol=1e-4, atol=1e-6)
