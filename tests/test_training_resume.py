"""Exact resume: a run killed with SIGKILL in the middle of an epoch and resumed with ``--resume`` ends
with the same weights (bit for bit) and metrics as an uninterrupted run (CPU, deterministic mode)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vitscope.cli import main as cli_main
from vitscope.training.checkpoint import load_state, read_jsonl, save_checkpoint
from vitscope.training.engine import strip_timing

# Augmentation (crop + flip) and drop path draw from the RNGs, so their states must be restored too.
ARGS = ["--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake:n=128", "epochs=3", "batch_size=16",
        "deterministic=true", "progress=false", "drop_path=0.1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vitscope(*args: str, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VITSCOPE_TEST_STEP_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, "-m", "vitscope", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    proc = _vitscope(*ARGS, "--out", str(killed), sleep=0.25)  # 8 steps x 0.25 s: epochs last >= 2 s
    try:
        deadline = time.monotonic() + 120
        # Epoch 0 is checkpointed, then logged; its metrics line means epoch 1 has begun.
        while not read_jsonl(killed / "metrics.jsonl"):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never finished its first epoch"
            time.sleep(0.02)
        time.sleep(0.3)  # a few steps into epoch 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert load_state(killed)["epoch"] == 0  # killed during epoch 1: only epoch 0 is checkpointed
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == [0]

    resumed = _vitscope("--resume", str(killed))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    reference = tmp_path / "reference"  # the same run, uninterrupted (in this process)
    assert cli_main(["train", *ARGS, "--out", str(reference)]) == 0

    got, want = load_file(killed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    got_m = [strip_timing(r) for r in read_jsonl(killed / "metrics.jsonl")]
    want_m = [strip_timing(r) for r in read_jsonl(reference / "metrics.jsonl")]
    assert [r["epoch"] for r in got_m] == [0, 1, 2]
    assert got_m == want_m
    state_got, state_want = load_state(killed), load_state(reference)
    assert state_got["step"] == state_want["step"] == 24
    for a, b in zip(state_got["optimizer"]["state"].values(), state_want["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_mismatched_checkpoint_pair_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, model, {"epoch": 0, "step": 1})
    weights = (tmp_path / "model.safetensors").read_bytes()
    save_checkpoint(tmp_path, model, {"epoch": 1, "step": 2})
    (tmp_path / "model.safetensors").write_bytes(weights)  # as if killed between the two renames
    with pytest.raises(ValueError, match="model.safetensors is from epoch 0 but state.pt from epoch 1"):
        load_state(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint.*without --resume"):
        load_state(tmp_path / "nothing")
