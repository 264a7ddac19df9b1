"""The analysis commands (probe, hessian, landscape, robustness) on what a user passes them: a training run
rebuilt exactly, contradicting flags, class-count mismatches, bad inputs refused before any work (exit 2, one
line), outputs that appear complete or not at all, and ``--amp bf16`` on the CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vitscope.cli import main

DATA = "fake:n=48,classes=3"  # 12 val examples


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A CB run trained with non-default model_kwargs at a non-default input size (the issue-15 case)."""
    out = tmp_path_factory.mktemp("runs") / "cb"
    rc = main(["train", "--config", "cpu-quick", "--model", "test_vit_cb", "--data", DATA, "--out", str(out),
               "epochs=1", "batch_size=16", "img_size=16", "model_kwargs={cb_placement: attn, cb_from_block: 1}",
               "progress=false", "lr=3e-3"])
    assert rc == 0
    return out


def _metrics(run: Path) -> dict:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def test_checkpoint_builds_exactly_the_trained_network(run_dir, tmp_path):
    """probe --checkpoint RUN scores the val split exactly as training did (same kwargs, same 16 px input)."""
    m = _metrics(run_dir)
    for given in (run_dir, run_dir / "model.safetensors"):
        out = tmp_path / given.name
        assert main(["probe", "--checkpoint", str(given), "--data", DATA, "--measures", "attention_entropy",
                     "--out", str(out), "--device", "cpu"]) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert meta["model_name"] == "test_vit_cb" and meta["img_size"] == 16 and meta["num_classes"] == 3
        assert meta["model_kwargs"] == {"cb_placement": "attn", "cb_from_block": 1}
        assert meta["preprocessing"]["input_size"] == [3, 16, 16] and meta["preprocessing"]["source"] == "run"
        assert meta["examples"] == m["val_n"] == 12
        assert 100 * meta["accuracy"] == pytest.approx(m["val_top1"], abs=1e-9)
        assert meta["nll"] == pytest.approx(m["val_nll"], rel=1e-5)
    # the other analyses build the same network
    assert main(["robustness", "--checkpoint", str(run_dir), "--data", DATA, "--split", "val", "--suite",
                 "calibration", "--no-plots", "--no-progress", "--out", str(tmp_path / "rob")]) == 0
    res = json.loads((tmp_path / "rob" / "results.json").read_text())
    assert 100 * res["clean"]["accuracy"] == pytest.approx(m["val_top1"], abs=1e-9)
    assert res["meta"]["img_size"] == 16 and res["meta"]["model_kwargs"]["cb_placement"] == "attn"


def test_checkpoint_contradictions_and_class_counts(run_dir, tmp_path, capsys):
    base = ["probe", "--checkpoint", str(run_dir), "--measures", "attention_entropy", "--out", str(tmp_path / "o")]
    cases = [
        (["--data", DATA, "--model", "test_vit_cifar"], "--model test_vit_cifar contradicts"),
        (["--data", DATA, "--img-size", "32"], "--img-size 32 contradicts"),
        (["--data", DATA, "--model", "test_vit_cb", "--pretrained"], "pass only one"),
        (["--data", "fake:n=48,classes=5"], "has 3 classes but --data fake:n=48,classes=5 has 5"),
        (["--data", DATA, "--checkpoint", str(tmp_path / "nothing")], "no such file or run directory"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "o").exists()
    assert main(["probe", "--checkpoint", str(run_dir), "--model", "test_vit_cb", "--img-size", "16", "--data",
                 "fake:n=48,classes=2", "--measures", "attention_entropy", "--out", str(tmp_path / "o")]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())  # a legit-looking superset: loud, recorded
    assert "3 classes" in meta["class_mismatch"] and meta["data_classes"] == 2


def test_bad_inputs_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import vitscope.cli._common as common

    def no_model(*a, **kw):
        raise AssertionError("built a model before checking the options")

    afile = tmp_path / "file.txt"
    afile.write_text("x")
    dirs = tmp_path / "d.safetensors"
    dirs.write_bytes(b"not a safetensors file at all")
    commands = {
        "probe": ["--measures", "attention_entropy"], "hessian": ["--k", "1"], "landscape": ["--steps", "2"],
        "robustness": ["--suite", "calibration"],
    }
    cases = [(cmd, extra + ["--out", str(out)], msg) for cmd, extra in commands.items()
             for out, msg in ((afile, "is an existing file"), (afile / "sub", "is a file, so no directory"))]
    cases += [
        ("probe", ["--measures", ",", "--out", str(tmp_path / "o")], "names no measure"),
        ("landscape", ["--directions", str(dirs), "--out", str(tmp_path / "o")], "is not a directions file"),
        ("landscape", ["--directions", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")],
         "no such file"),
        ("hessian", ["--batches", "0", "--out", str(tmp_path / "o")], "--batches must be a positive integer"),
        ("probe", ["--device", "cuda:7", "--out", str(tmp_path / "o")], "--device cuda:7"),
        ("probe", ["--device", "gpu", "--out", str(tmp_path / "o")], "is not a device"),
        ("probe", ["--crop-pct", "1.5", "--out", str(tmp_path / "o")], "--crop-pct"),
        ("robustness", ["--std", "0.2,0,0.2", "--out", str(tmp_path / "o")], "--std must be positive"),
        ("hessian", ["--img-size", "0", "--out", str(tmp_path / "o")], "--img-size must be a positive"),
    ]
    monkeypatch.setattr(common, "build_model", no_model)
    for cmd, extra, msg in cases:
        rc = main([cmd, "--model", "test_vit_cifar", "--data", "fake", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], (cmd, extra, err)
    assert not (tmp_path / "o").exists() and afile.read_text() == "x"


def test_checkpoint_written_by_save_weights_needs_no_model_name(tmp_path):
    import vitscope

    torch.manual_seed(0)
    net = vitscope.create_model("test_vit_cifar", num_classes=3, img_size=16)
    vitscope.save_weights(net, tmp_path / "w.safetensors", model_kwargs={"num_classes": 3, "img_size": 16})
    out = tmp_path / "p"
    assert main(["probe", "--checkpoint", str(tmp_path / "w.safetensors"), "--data", DATA, "--measures",
                 "attention_entropy", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model_name"] == "test_vit_cifar" and meta["img_size"] == 16 and meta["num_classes"] == 3
    assert meta["preprocessing"]["input_size"] == [3, 16, 16]


def test_hessian_k_above_the_parameter_count_and_landscape_direction_dims(tmp_path, capsys):
    # a model of 2 x 3 x 3 conv weights? use the smallest vitscope net and a k over its parameter count
    rc = main(["hessian", "--model", "test_vit_cifar", "--data", "fake", "--k", "10000000", "--batches", "1",
               "--batch-size", "4", "--out", str(tmp_path / "h"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "exceeds the model's" in err[0] and not (tmp_path / "h").exists()
    common = ["landscape", "--model", "test_vit_cifar", "--data", "fake", "--steps", "2", "--batches", "1",
              "--batch-size", "4", "--no-progress"]
    assert main(common + ["--dims", "1", "--out", str(tmp_path / "l1")]) == 0
    rc = main(common + ["--dims", "2", "--directions", str(tmp_path / "l1" / "directions.safetensors"),
                        "--out", str(tmp_path / "l2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "holds 1 direction(s) but --dims is 2" in err[-1] and not (tmp_path / "l2").exists()


def test_staged_output_is_all_or_nothing(tmp_path):
    from vitscope.io.atomic import INCOMPLETE_MARKER, atomic_write_text, staged_output

    out = tmp_path / "res"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            atomic_write_text(stage / "a.json", "{}")
            raise RuntimeError("killed half way")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing, not even the staging folder
    with staged_output(out) as stage:
        atomic_write_text(stage / "a.json", "1")
        atomic_write_text(stage / "b.png", "2")
        assert not out.exists()  # invisible until complete
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.png"]
    atomic_write_text(out / "keep.txt", "user file")
    with staged_output(out) as stage:  # into a directory that holds files: replaced per file, others kept
        atomic_write_text(stage / "a.json", "new")
    assert (out / "a.json").read_text() == "new" and (out / "keep.txt").read_text() == "user file"
    assert not (out / INCOMPLETE_MARKER).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["res"]
    dead = tmp_path / ".res.partial-999999999-abc"  # what a killed process leaves (no such pid)
    dead.mkdir()
    (dead / "a.json").write_text("half")
    mine = tmp_path / f".res.partial-{os.getpid()}-live"  # a live process's staging folder is left alone
    mine.mkdir()
    with staged_output(out):
        pass
    assert not dead.exists() and mine.exists()


def test_report_refuses_a_directory_cut_short(tmp_path, capsys):
    from vitscope.io.atomic import INCOMPLETE_MARKER

    out = tmp_path / "p"
    assert main(["probe", "--model", "test_vit_cifar", "--data", "fake", "--measures", "attention_entropy",
                 "--batch-size", "8", "--max-batches", "1", "--out", str(out)]) == 0
    (out / INCOMPLETE_MARKER).write_text("")
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_amp_bf16_on_the_cpu_is_close_to_float32(tmp_path):
    """``--amp bf16`` runs the forward passes under CPU autocast; measures stay within bf16 round-off."""
    base = ["probe", "--model", "test_vit_cifar", "--data", "fake", "--measures", "attention_entropy,ratio_of_norms",
            "--batch-size", "16", "--max-batches", "2", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "f32")]) == 0
    assert main(base + ["--amp", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("f32", "bf16"))
    for measure in ("attention_entropy", "ratio_of_norms"):
        for ra, rb in zip(a[measure]["rows"], b[measure]["rows"], strict=True):
            va = np.array([v for k, v in ra.items() if isinstance(v, float)])
            vb = np.array([v for k, v in rb.items() if isinstance(v, float)])
            np.testing.assert_allclose(vb, va, rtol=3e-2, err_msg=measure)
            assert not np.array_equal(va, vb) or measure == "ratio_of_norms"  # bf16 did run
    meta = json.loads((tmp_path / "bf16" / "meta.json").read_text())
    assert meta["amp"] == "bf16"
    rob = ["robustness", "--model", "test_vit_cifar", "--data", "fake", "--suite", "calibration,fgsm", "--eps",
           "1/255", "--batch-size", "16", "--max-batches", "2", "--no-plots", "--no-progress", "--device", "cpu"]
    assert main(rob + ["--out", str(tmp_path / "r32")]) == 0
    assert main(rob + ["--amp", "bf16", "--out", str(tmp_path / "r16")]) == 0
    r32, r16 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("r32", "r16"))
    assert r16["meta"]["amp"] == "bf16" and r16["n"] == r32["n"] == 32
    assert abs(r16["clean"]["accuracy"] - r32["clean"]["accuracy"]) <= 2 / 32
    assert r16["calibration"]["nll"] == pytest.approx(r32["calibration"]["nll"], rel=3e-2)


def test_sigkill_while_writing_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    """A real SIGKILL inside the staged block: ``--out`` never appears; the next run removes the staging folder."""
    import subprocess
    import sys

    import vitscope.io.atomic as atomic

    out = tmp_path / "res"
    script = (
        "import importlib.util, os, signal, sys\n"
        f"spec = importlib.util.spec_from_file_location('atomic', {atomic.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"with m.staged_output({str(out)!r}) as stage:\n"
        "    m.atomic_write_text(stage / 'results.json', '{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert not out.exists() and len(left) == 1 and left[0].startswith(".res.partial-")
    with atomic.staged_output(out) as stage:
        atomic.atomic_write_text(stage / "results.json", "[]")
    assert [p.name for p in tmp_path.iterdir()] == ["res"] and (out / "results.json").read_text() == "[]"
