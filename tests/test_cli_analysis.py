"""The analysis commands (probe, hessian, landscape, robustness) on what a user passes them: a training run
rebuilt exactly, contradicting flags, class-count mismatches, bad inputs refused before any work (exit 2, one
line), outputs that appear complete or not at all, and ``--amp bf16`` on the CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vitscope.cli import main
from vitscope.data import create_dataset

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
    """probe --checkpoint RUN scores the val split exactly as training did (same kwargs, same 16 px input).

    The NLL bound: a residual-stream measure leaves the forward as training ran it (an attention measure switches
    to the explicit attention path, whose float32 rounding differs), and one batch of the 12 val images is training's
    eval batch (batch_size 16), so the float32 logits are training's bit for bit. Both take float64 log-softmax of
    them (the same per-example terms) and sum 12 terms >= 0 in some order: each sum is within (n - 1) 2^-53
    relative of the exact one, plus one rounding each for the mean: |difference| <= 2n 2^-53 relative."""
    m = _metrics(run_dir)
    for given in (run_dir, run_dir / "model.safetensors"):
        out = tmp_path / given.name
        assert main(["probe", "--checkpoint", str(given), "--data", DATA, "--measures", "ratio_of_norms",
                     "--batch-size", "16", "--out", str(out), "--device", "cpu"]) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert meta["model_name"] == "test_vit_cb" and meta["img_size"] == 16 and meta["num_classes"] == 3
        assert meta["model_kwargs"] == {"cb_placement": "attn", "cb_from_block": 1}
        assert meta["preprocessing"]["input_size"] == [3, 16, 16] and meta["preprocessing"]["source"] == "run"
        assert meta["examples"] == m["val_n"] == 12
        assert 100 * meta["accuracy"] == m["val_top1"]  # 100 (hits / n) both sides, the same float64 operations
        assert meta["nll"] == pytest.approx(m["val_nll"], rel=2 * 12 * 2.0**-53, abs=0)
    # the other analyses build the same network
    assert main(["robustness", "--checkpoint", str(run_dir), "--data", DATA, "--split", "val", "--suite",
                 "calibration", "--no-plots", "--no-progress", "--out", str(tmp_path / "rob")]) == 0
    res = json.loads((tmp_path / "rob" / "results.json").read_text())
    assert 100 * res["clean"]["accuracy"] == m["val_top1"]  # 100 (hits / n) both sides
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


def _fp16_autocasts_on_the_cpu() -> bool:
    with torch.autocast("cpu", dtype=torch.float16):  # older torch warns and stays in float32
        return torch.mm(torch.ones(1, 1), torch.ones(1, 1)).dtype == torch.float16


def test_amp_on_the_cpu_is_the_probe_under_autocast(tmp_path, monkeypatch, capsys):
    """``--amp bf16`` / ``--amp-dtype float16`` run the forward passes under CPU autocast and record it.

    The reference does the same roundings: the public ``vitscope.probe`` inside ``torch.autocast(cpu, dtype)`` on
    the network the command built and the batches it fed. The same operations on tensors of the same shapes give
    the same bits, so the rows must be equal exactly: no tolerance is needed, and none would say anything (a bf16
    forward moves attention entropies by ~1e-2 relative: unit roundoff 2^-8 per rounding, compounded over the
    layers, no a-priori bound). That the reduced precision ran is checked by the rows differing from float32's."""
    from _helpers import spy_models
    from vitscope.probing import probe

    measures = ["attention_entropy", "ratio_of_norms"]
    base = ["probe", "--model", "test_vit_cifar", "--data", "fake", "--measures", ",".join(measures),
            "--batch-size", "16", "--max-batches", "2", "--device", "cpu", "-j", "0"]
    assert main(base + ["--out", str(tmp_path / "f32")]) == 0
    f32 = json.loads((tmp_path / "f32" / "results.json").read_text())
    amps = [("bf16", ["--amp", "bf16"], torch.bfloat16)]
    if _fp16_autocasts_on_the_cpu():
        amps.append(("fp16", ["--amp-dtype", "float16"], torch.float16))
    else:  # one line, before any work
        capsys.readouterr()
        assert main(base + ["--amp", "fp16", "--out", str(tmp_path / "no")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot autocast to float16 on cpu" in err[0] and not (tmp_path / "no").exists()
    for amp, flag, dtype in amps:
        built = spy_models(monkeypatch)
        assert main(base + flag + ["--out", str(tmp_path / amp)]) == 0
        got = json.loads((tmp_path / amp / "results.json").read_text())
        meta = json.loads((tmp_path / amp / "meta.json").read_text())
        assert meta["amp"] == amp and meta["precision"] == str(dtype).removeprefix("torch.")
        (model, seen), = built
        batches = [x for _, x in seen]
        assert len(batches) == 2
        with torch.autocast("cpu", dtype=dtype):
            ref = json.loads(json.dumps(probe(model, batches, measures, device="cpu").to_dict()))
        for m in measures:
            assert got[m]["rows"] == ref[m]["rows"], (amp, m)
        moved = [ra != rb for ra, rb in zip(f32["attention_entropy"]["rows"], got["attention_entropy"]["rows"],
                                            strict=True)]
        assert any(moved), amp  # the reduced precision did run
    assert json.loads((tmp_path / "f32" / "meta.json").read_text())["precision"] == "float32"


def test_a_precision_torch_cannot_autocast_to_is_refused(tmp_path, monkeypatch, capsys):
    """Where ``torch.autocast`` would warn and stay in float32 (CPU float16 before torch ~2.3), the command stops
    with one line before any work instead of recording a precision it did not use; contradicting flags too."""
    import contextlib

    import vitscope.runtime as runtime

    base = ["probe", "--model", "test_vit_cifar", "--data", "fake", "--measures", "attention_entropy", "--device",
            "cpu", "--out", str(tmp_path / "o")]
    assert main(base + ["--amp", "bf16", "--amp-dtype", "float16"]) == 2
    assert "--amp bf16 contradicts --amp-dtype float16" in capsys.readouterr().err
    monkeypatch.setattr(runtime.torch, "autocast", lambda *a, **kw: contextlib.nullcontext())  # autocast disabled
    with pytest.raises(ValueError, match="cannot autocast to float16 on cpu"):
        runtime.check_autocast("cpu", torch.float16)
    assert main(base + ["--amp-dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--amp fp16: torch" in err[0] and not (tmp_path / "o").exists()


def test_amp_on_the_cpu_in_robustness(tmp_path, monkeypatch, capsys):
    """``robustness --amp bf16``: the attacks run under autocast, the clean NLL is the mean float64 NLL of the bf16
    logits the network gives on the command's batches; ``--amp fp16`` with an attack is refused (its input
    gradients underflow without loss scaling)."""
    from _helpers import spy_models

    rob = ["robustness", "--model", "test_vit_cifar", "--data", "fake", "--suite", "calibration,fgsm", "--eps",
           "1/255", "--batch-size", "16", "--max-batches", "2", "--no-plots", "--no-progress", "--device", "cpu",
           "-j", "0"]
    assert main(rob + ["--out", str(tmp_path / "r32")]) == 0
    built = spy_models(monkeypatch)
    assert main(rob + ["--amp", "bf16", "--out", str(tmp_path / "r16")]) == 0
    r32, r16 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("r32", "r16"))
    assert r16["meta"]["amp"] == "bf16" and r16["meta"]["precision"] == "bfloat16" and r16["n"] == r32["n"] == 32
    assert r16["fgsm"]["accuracy"] and r16["calibration"]["nll"] != r32["calibration"]["nll"]
    (model, seen), = built
    assert len(seen) == 2 * 3
    clean = [x for _, x in seen[::3]]  # per batch: the clean forward, then FGSM's gradient and scoring forwards
    data = create_dataset("fake", split="test")
    labels = torch.tensor([int(data[i][1]) for i in range(32)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.cat([model(x) for x in clean])  # (32, C) bf16: the same roundings as the command's
    assert logits.dtype == torch.bfloat16
    nll = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    # Both take float64 log-softmax of the same bf16 logits (exact in float64) and average 32 terms >= 0 in some
    # order: each float64 sum of n terms >= 0 is within (n - 1) 2^-53 relative, plus one division each.
    assert r16["calibration"]["nll"] == pytest.approx(nll, rel=2 * 32 * 2.0**-53, abs=0)
    capsys.readouterr()
    assert main(rob + ["--amp-dtype", "float16", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--amp fp16 with fgsm" in err[0] and not (tmp_path / "no").exists()


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


def test_probe_position_grid_reaches_the_localization_rows(tmp_path):
    """``vitscope probe --measures localization --position-grid 2``: each block's position classes are the 2 x 2
    cells of its 4 x 4 token grid (chance 1/4), recorded in the rows; without the flag, one class per position."""
    rows = {}
    for flag in ([], ["--position-grid", "2"]):
        out = tmp_path / f"p{len(flag)}"
        assert main(["probe", "--model", "test_vit_cifar", "--data", DATA, "--measures", "localization",
                     "--out", str(out), *flag]) == 0
        rows[len(flag)] = json.loads((out / "results.json").read_text())["localization"]["rows"]
    assert {(r["grid_h"], r["cells_h"], r["cells_w"], r["chance"]) for r in rows[0]} == {(4, 4, 4, 1 / 16)}
    assert {(r["grid_h"], r["cells_h"], r["cells_w"], r["chance"]) for r in rows[2]} == {(4, 2, 2, 1 / 4)}
