"""Exact resume after a SIGKILL at any moment: before the first checkpoint, in the middle of an epoch, and
between the files of a checkpoint; a second writer is refused while a run trains. A run resumed with
``--resume`` ends with the same weights (bit for bit), metrics and probe lines as an uninterrupted run
(CPU, deterministic mode)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from _helpers import one_line_error
from vitscope.cli import main as cli_main
from vitscope.training import load_run, resolve_config, train
from vitscope.training.checkpoint import (
    latest_checkpoint,
    load_state,
    read_jsonl,
    run_finished,
    run_model_spec,
    save_checkpoint,
)
from vitscope.training.config import save_config
from vitscope.training.engine import strip_timing

# Augmentation (crop + flip) and drop path draw from the RNGs, so their states must be restored too.
ARGS = ["--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake:n=128", "epochs=3", "batch_size=16",
        "deterministic=true", "progress=false", "drop_path=0.1", "probes.measures=[attention_entropy]",
        "probes.num_images=4"]

# Runs `vitscope train ARGS` and SIGKILLs itself right after writing the state.pt of epoch 1's checkpoint
# (its weights are written too; the manifest and the rename that publishes the checkpoint are not).
KILL_INSIDE_CHECKPOINT = """
import os, signal, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if isinstance(obj, dict) and obj.get("epoch") == 1 and "optimizer" in obj:
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
from vitscope.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _vitscope(*args: str, sleep: float = 0.0, script: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VITSCOPE_TEST_STEP_SLEEP": str(sleep)}
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "vitscope", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigkills_before_and_inside_a_checkpoint_then_resume_matches_uninterrupted(tmp_path, capsys):
    run = tmp_path / "killed"
    # 1. A run killed before its first checkpoint; while it trains, a second writer is refused.
    first = _vitscope(*ARGS, "--out", str(run), sleep=5.0)  # 5 s a step: epoch 0 lasts 40 s
    try:
        _wait_for(lambda: (run / "config.yaml").is_file(), first, "the first run to start")
        # The second writer is this test process: refused while the first holds the run's lock.
        one_line_error(capsys, ["train", "--resume", str(run)], f"{run} is being trained by process {first.pid}")
        assert first.poll() is None and latest_checkpoint(run) is None
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert latest_checkpoint(run) is None and not read_jsonl(run / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint yet.*--resume"):
        run_model_spec(run)

    # 2. --resume starts it from its saved config; killed between the files of epoch 1's checkpoint.
    inside = _vitscope("--resume", str(run), script=KILL_INSIDE_CHECKPOINT)
    out, err = inside.communicate(timeout=300)
    assert inside.returncode == -signal.SIGKILL, err
    assert load_state(run)["epoch"] == 0 and run_model_spec(run)["epoch"] == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]  # written before the checkpoint
    assert [p.name.startswith(".tmp-epoch-0001-") for p in (run / "checkpoints").iterdir()].count(True) == 1
    assert not run_finished(run)

    # 3. --resume continues from epoch 0's checkpoint and removes what the kill left behind.
    assert cli_main(["train", "--resume", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]  # the last two
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")] and run_finished(run)

    reference = tmp_path / "reference"  # the same run, uninterrupted (in this process)
    assert cli_main(["train", *ARGS, "--out", str(reference)]) == 0
    got, want = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    got_m = [strip_timing(r) for r in read_jsonl(run / "metrics.jsonl")]
    want_m = [strip_timing(r) for r in read_jsonl(reference / "metrics.jsonl")]
    assert [r["epoch"] for r in got_m] == [0, 1, 2]
    assert got_m == want_m
    got_p, want_p = read_jsonl(run / "probes.jsonl"), read_jsonl(reference / "probes.jsonl")
    assert [p["epoch"] for p in got_p] == [-1, 0, 1, 2] and got_p == want_p
    state_got, state_want = load_state(run), load_state(reference)
    assert state_got["step"] == state_want["step"] == 24
    for a, b in zip(state_got["optimizer"]["state"].values(), state_want["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    spec = run_model_spec(run)
    assert spec["weights"] == run / "checkpoints" / "epoch-0002" / "model.safetensors" and spec["epoch"] == 2
    assert os.path.samefile(spec["weights"], run / "model.safetensors")  # the top-level file is a hard link


# ---------------------------------------------------------------------------------------- in-process


def quick(tmp_path, name="run", **kw):
    args = dict(model="test_vit_cifar", data="fake:n=64", out=str(tmp_path / name), epochs=2, batch_size=16,
                progress=False, img_size=16)
    args.update(kw)
    return resolve_config("cpu-quick", **args)


def test_run_of_the_older_top_level_layout_loads_and_resumes(tmp_path):
    cfg = quick(tmp_path, epochs=1)
    train(cfg)
    run = tmp_path / "run"
    reference, _ = load_run(run)
    ckpt_dir = latest_checkpoint(run)
    os.replace(ckpt_dir / "state.pt", run / "state.pt")  # what vitscope wrote before checkpoint directories
    os.replace(ckpt_dir / "model.safetensors", run / "model.safetensors")
    for p in ckpt_dir.iterdir():
        p.unlink()
    ckpt_dir.rmdir()
    assert latest_checkpoint(run) == run and load_state(run)["epoch"] == 0 and run_finished(run)
    spec = run_model_spec(run)
    assert (spec["model"], spec["num_classes"], spec["img_size"], spec["epoch"]) == ("test_vit_cifar", 10, 16, 0)
    assert spec["weights"] == run / "model.safetensors"
    assert spec["create_kwargs"] == {"num_classes": 10, "img_size": 16}
    model, _ = load_run(run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert cli_main(["train", "--resume", str(run), "epochs=2"]) == 0  # extend it by one epoch
    assert not (run / "state.pt").exists() and latest_checkpoint(run).name == "epoch-0001"
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1] and run_finished(run)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_damaged_or_unsafe_checkpoints_are_one_line_errors(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = quick(tmp_path)
    save_config(cfg, run / "config.yaml")
    model = torch.nn.Linear(2, 2)
    ckpt_dir = save_checkpoint(run, model, {"epoch": 0, "step": 4})
    resume = ["train", "--resume", str(run)]
    state = ckpt_dir / "state.pt"
    good = state.read_bytes()

    state.write_bytes(good[: len(good) // 2])  # truncated: caught by the manifest's sizes
    one_line_error(capsys, resume, "state.pt is truncated or missing", "another --out")
    manifest = json.loads((ckpt_dir / "checkpoint.json").read_text())

    def with_size(data: bytes) -> None:  # a file of the recorded size and hash, so torch.load itself reads it
        state.write_bytes(data)
        manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ckpt_dir / "checkpoint.json").write_text(json.dumps(manifest))

    with_size(good[: len(good) // 2])
    one_line_error(capsys, resume, "Cannot read", "truncated, corrupt or not a vitscope state")
    marker = tmp_path / "payload-ran"
    payload = _Payload()
    payload.marker = marker
    with_size(pickle.dumps({"epoch": 0, "x": payload}))
    one_line_error(capsys, resume, "Refused to load", "weights-only allowlist")
    torch.save({"epoch": 0, "x": payload}, state)  # the same in torch's zip format
    with_size(state.read_bytes())
    one_line_error(capsys, resume, "Refused to load")
    assert not marker.exists()  # the payload never ran

    with_size(good)
    weights = ckpt_dir / "model.safetensors"
    weights_good = weights.read_bytes()
    weights.write_bytes(weights_good[:100])
    manifest["files"]["model.safetensors"] = {"bytes": 100, "sha256": hashlib.sha256(weights_good[:100]).hexdigest()}
    (ckpt_dir / "checkpoint.json").write_text(json.dumps(manifest))
    one_line_error(capsys, resume, "model.safetensors as safetensors", "truncated or corrupt")
    (ckpt_dir / "checkpoint.json").write_text("{")
    one_line_error(capsys, resume, "checkpoint.json is missing or unreadable")
    one_line_error(capsys, ["train", "--resume", str(tmp_path / "nothing")], "not a vitscope run directory")
