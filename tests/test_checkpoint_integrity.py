"""Checkpoint integrity (issue 23): every file of a checkpoint is checked against the SHA-256 its manifest recorded
when it was written, on every read (``train --resume``, ``--checkpoint``, ``load_weights``); a damaged checkpoint is a
one-line error naming the file and the previous checkpoint, which ``--resume-epoch`` resumes from; a malformed
manifest is a one-line error naming the field. Real files, damaged on disk; real commands."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from _helpers import one_line_error
from vitscope.cli import main
from vitscope.io import CheckpointError, load_weights
from vitscope.io.runs import load_latest, load_run_model, sha256_file
from vitscope.training import load_run

TRAIN = ["--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake:n=64", "batch_size=16", "epochs=3",
         "img_size=16", "model_kwargs.depth=1", "deterministic=true", "progress=false"]
PROBE = ["--data", "fake:n=64", "--img-size", "16", "--measures", "attention_entropy", "--batch-size", "32",
         "--device", "cpu"]


def _flip(path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of ``path`` (its size unchanged: only a hash can tell)."""
    os.chmod(path, 0o644)  # checkpoint weights are read-only
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _weights(run, epoch: int):
    return run / "checkpoints" / f"epoch-{epoch:04d}" / "model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run of 3 epochs (it keeps the checkpoints of epochs 1 and 2)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *TRAIN, "--out", str(root / "three")]) == 0
    return root


def test_the_manifest_records_size_and_sha256_and_two_checkpoints_are_kept(trained):
    run = trained / "three"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    for ckpt in (run / "checkpoints").iterdir():
        files = json.loads((ckpt / "checkpoint.json").read_text())["files"]
        for name in ("model.safetensors", "state.pt"):
            assert files[name] == {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}


def test_identical_runs_write_byte_identical_weights(trained):
    other = trained / "three-again"
    assert main(["train", *TRAIN, "--out", str(other)]) == 0
    assert (other / "model.safetensors").read_bytes() == (trained / "three" / "model.safetensors").read_bytes()


def test_flipped_weights_are_refused_everywhere_and_resume_uses_the_previous_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "three", run)
    _flip(_weights(run, 2))  # the top-level model.safetensors is a hard link to it: damaged too
    resume = one_line_error(capsys, ["train", "--resume", str(run)], "epoch-0002/model.safetensors",
                            "does not match the SHA-256", "--resume-epoch 1")
    assert "epoch-0001 is intact" in resume
    one_line_error(capsys, ["probe", "--checkpoint", str(run), *PROBE, "--out", str(tmp_path / "p")],
                   "epoch-0002", "SHA-256", f"--checkpoint {_weights(run, 1)}")
    one_line_error(capsys, ["probe", "--checkpoint", str(run / "model.safetensors"), *PROBE, "--out",
                            str(tmp_path / "p")], "SHA-256", "epoch-0001 is intact")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_weights(run / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_run(run)
    load_run_model(_weights(run, 1))  # the previous checkpoint still reads
    assert main(["train", "--resume", str(run), "--resume-epoch", "1"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    resumed, _ = load_run(run)
    reference, _ = load_run(trained / "three")
    for (k, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k  # bit-exact: as if epoch 2 had never been damaged
    one_line_error(capsys, ["train", "--resume", str(run), "--resume-epoch", "0"], "keeps no checkpoint of epoch 0")


def test_a_damaged_state_is_named_not_blamed_on_the_loss(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "three", run)
    _flip(run / "checkpoints" / "epoch-0002" / "state.pt")
    one_line_error(capsys, ["train", "--resume", str(run)], "state.pt does not match the SHA-256",
                   "--resume-epoch 1")
    shutil.rmtree(run / "checkpoints" / "epoch-0001")  # nothing earlier to fall back on
    one_line_error(capsys, ["train", "--resume", str(run)], "state.pt", "no intact earlier checkpoint")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(files=[1]), "'files' must map model.safetensors and state.pt"),
    (lambda m: m["spec"].pop("model"), "'spec' names no 'model'"),
    (lambda m: m.update(spec="abc"), "'spec' is 'abc', not a mapping"),
    (lambda m: m.update(format="vitscope-checkpoint/9"), "'format' is"),
    (lambda m: m.update(epoch=7), "'epoch' is 7, not the epoch of its directory (2)"),
    (lambda m: m["files"]["state.pt"].update(sha256="xyz"), "not {\"bytes\": N, \"sha256\": 64 hex digits}"),
    (lambda m: m["spec"].update(img_size="16"), "'spec.img_size' is '16', not a positive integer"),
    (lambda m: m["spec"]["create_kwargs"].update(img_size=32), "contradicts 'spec.img_size'"),
    (lambda m: m.update(stopped_early="no"), "'stopped_early' is 'no'"),
])
def test_a_malformed_manifest_is_a_one_line_error_naming_the_field(trained, tmp_path, capsys, edit, message):
    run = tmp_path / "run"
    shutil.copytree(trained / "three", run)
    path = run / "checkpoints" / "epoch-0002" / "checkpoint.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    for argv in (["train", "--resume", str(run)],
                 ["probe", "--checkpoint", str(run), *PROBE, "--out", str(tmp_path / "p")]):
        one_line_error(capsys, argv, "checkpoint.json is malformed", message)


def test_weights_that_contradict_the_recorded_network_are_one_line(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "three", run)
    path = run / "checkpoints" / "epoch-0002" / "checkpoint.json"
    manifest = json.loads(path.read_text())
    manifest["spec"]["img_size"] = manifest["spec"]["create_kwargs"]["img_size"] = 32  # the weights are 16 px
    path.write_text(json.dumps(manifest))
    one_line_error(capsys, ["probe", "--checkpoint", str(run), "--data", "fake:n=64", "--measures",
                            "attention_entropy", "--device", "cpu", "--out", str(tmp_path / "p")],
                   "does not fit the network its run records", "checkpoint.json")


def test_a_run_without_hashes_still_loads_and_says_so_once(trained, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained / "three", run)
    for ckpt in (run / "checkpoints").iterdir():  # what vitscope wrote before hashes: sizes only
        path = ckpt / "checkpoint.json"
        manifest = json.loads(path.read_text())
        manifest["format"] = "vitscope-checkpoint/1"
        manifest["files"] = {name: entry["bytes"] for name, entry in manifest["files"].items()}
        path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        state, _ = load_latest(run)
        load_run(run)
        load_weights(run / "model.safetensors")
    assert state["epoch"] == 2
    assert caplog.text.count("records no SHA-256, so its files are checked by size only") == 1
