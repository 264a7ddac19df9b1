"""The command line says what it measures and speaks timm's dialect: random weights are said on stderr and
recorded in every output, ``--data`` has no silent default, and timm's spellings (``-b``, ``-j``,
``--input-size C H W``, ``--amp-dtype``, ``--use-ema``, ``--device auto``) mean what they mean in timm."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import vitscope
from vitscope.cli import main

TINY = ["--model", "test_vit_cifar", "--data", "fake:n=8,n_eval=8", "-j", "0"]


def _meta(out, command):
    """The metadata block each command writes."""
    if command == "probe":
        return json.loads((out / "meta.json").read_text())
    if command == "robustness":
        return json.loads((out / "results.json").read_text())["meta"]
    if command == "attention":
        return json.loads((out / "attention_meta.json").read_text())
    return json.loads((out / f"{command}.json").read_text())["run"]


def test_random_weights_are_said_once_on_stderr_and_recorded(tmp_path):
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-m", "vitscope", "probe", *TINY, "--measures", "attention_entropy",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "random weights" in line]
    assert len(said) == 1 and said[0].startswith("WARNING") and "test_vit_cifar" in said[0]
    meta = _meta(out, "probe")
    assert meta["weights"] == "random" and meta["seed"] == 0 and meta["ema"] is False


@pytest.mark.parametrize("command, extra", [
    ("hessian", ["--k", "1", "--batches", "1", "-b", "4", "--no-progress"]),
    ("landscape", ["--steps", "2", "--batches", "1", "-b", "4", "--no-progress"]),
    ("robustness", ["--suite", "calibration", "-b", "4", "--max-batches", "1", "--no-plots", "--no-progress"]),
    ("attention", ["--num-images", "1"]),
])
def test_every_command_records_random_weights(tmp_path, caplog, command, extra):
    out = tmp_path / command
    with caplog.at_level(logging.WARNING):
        assert main([command, *TINY, *extra, "--out", str(out)]) == 0
    assert sum("random weights" in r.getMessage() for r in caplog.records) == 1
    assert _meta(out, command)["weights"] == "random"


def test_data_has_no_default(tmp_path, capsys):
    for command in ("probe", "robustness", "hessian", "landscape"):
        with pytest.raises(SystemExit) as err:
            main([command, "--model", "test_vit_cifar", "--out", str(tmp_path / command)])
        assert err.value.code == 2 and "--data" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_timm_spellings_equal_the_long_options(tmp_path, capsys):
    base = ["probe", "--model", "test_vit_cifar", "--data", "fake:n=8,n_eval=8", "--measures", "attention_entropy"]
    assert main(base + ["--batch-size", "4", "--workers", "0", "--img-size", "32", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["-b", "4", "-j", "0", "--input-size", "3", "32", "32", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a == b
    ma, mb = _meta(tmp_path / "a", "probe"), _meta(tmp_path / "b", "probe")
    assert ma["preprocessing"] == mb["preprocessing"] and mb["preprocessing"]["input_size"] == [3, 32, 32]
    assert mb["device"] == "cpu" and mb["workers"] == 0  # --device auto: cuda only where there is one
    capsys.readouterr()
    for bad, msg in ((["--input-size", "3", "32", "16"], "square RGB"),
                     (["--input-size", "3", "32", "32", "--img-size", "16"], "contradicts --img-size")):
        assert main(base + bad + ["--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
    assert main(base + ["-b", "4", "-j", "0", "--amp-dtype", "bfloat16", "--out", str(tmp_path / "d")]) == 0
    assert _meta(tmp_path / "d", "probe")["amp"] == "bf16"
    assert main(base + ["-b", "4", "-j", "0", "--amp", "--out", str(tmp_path / "e")]) == 0
    assert _meta(tmp_path / "e", "probe")["amp"] == "bf16"
    assert main(base + ["-b", "4", "--out", str(tmp_path / "f")]) == 0
    assert _meta(tmp_path / "f", "probe")["workers"] == min(4, len(__import__("os").sched_getaffinity(0)))


def test_use_ema_is_opt_in_and_recorded(tmp_path, capsys):
    """A timm checkpoint with both weights: the raw ones unless --use-ema (timm's validate.py), each equal to a
    checkpoint holding only that set."""
    torch.manual_seed(1)
    plain = vitscope.create_model("test_vit_cifar", num_classes=10).state_dict()
    torch.manual_seed(2)
    ema = vitscope.create_model("test_vit_cifar", num_classes=10).state_dict()
    torch.save({"state_dict": plain, "state_dict_ema": ema}, tmp_path / "both.pth")
    torch.save({"state_dict": plain}, tmp_path / "plain.pth")
    torch.save({"state_dict": ema}, tmp_path / "ema.pth")
    base = ["probe", *TINY, "--measures", "attention_entropy", "-b", "4"]
    nll = {}
    for name, ckpt, flag in (("raw", "both", []), ("ema", "both", ["--use-ema"]), ("plain", "plain", []),
                             ("only_ema", "ema", [])):
        out = tmp_path / name
        assert main(base + ["--checkpoint", str(tmp_path / f"{ckpt}.pth"), *flag, "--out", str(out)]) == 0
        meta = _meta(out, "probe")
        assert meta["weights"] == "checkpoint" and meta["ema"] is bool(flag)
        nll[name] = meta["nll"]
    assert nll["raw"] == nll["plain"] and nll["ema"] == nll["only_ema"] and nll["raw"] != nll["ema"]
    capsys.readouterr()
    assert main(base + ["--use-ema", "--out", str(tmp_path / "x")]) == 2
    assert "--use-ema chooses among a --checkpoint's weights" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(tmp_path / "plain.pth"), "--use-ema", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # no silent fallback to the raw weights (timm's)
    assert len(err) == 1 and "holds no EMA weights" in err[0] and not (tmp_path / "x").exists()


def test_train_takes_timm_spellings(tmp_path, capsys):
    import argparse

    from vitscope.cli.train import _flag_overrides, add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    args = p.parse_args(["train", "-b", "8", "-j", "2", "--input-size", "3", "16", "16", "--amp", "--amp-dtype",
                         "bfloat16", "--device", "cpu", "lr=1e-3"])
    assert _flag_overrides(args) == ["batch_size=8", "num_workers=2", "img_size=16", "amp=bf16", "device=cpu"]
    args = p.parse_args(["train", "-b", "8", "batch_size=16"])
    from vitscope.cli import CLIError

    with pytest.raises(CLIError, match="batch_size given both"):
        _flag_overrides(args)
    assert main(["train", "--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake:n=16,n_eval=8",
                 "-b", "8", "--input-size", "3", "16", "16", "--out", str(tmp_path / "run"), "epochs=1",
                 "progress=false"]) == 0
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch_size: 8" in text and "img_size: 16" in text
    assert f"num_workers: {min(4, len(__import__('os').sched_getaffinity(0)))}" in text  # -j's default, as timm


def test_train_workers_default_is_timms_unless_the_config_sets_it(tmp_path, monkeypatch):
    """-j defaults to min(4, CPUs) (timm's 4) below the recipe: a config file's num_workers and -j / num_workers=N
    win; the Python API's TrainConfig keeps 0 (the studies' run configs, hashed into their directories)."""
    import os

    import vitscope.training as training
    from vitscope.training import TrainConfig

    seen = []
    monkeypatch.setattr(training, "train", lambda cfg, **kw: seen.append(cfg.num_workers) or {})
    (tmp_path / "own.yaml").write_text("num_workers: 0\nepochs: 1\n")
    base = ["train", "--model", "test_vit_cifar", "--data", "fake", "--out", str(tmp_path / "r")]
    for extra in ([], ["--config", "cpu-quick"], ["--config", str(tmp_path / "own.yaml")], ["-j", "3"],
                  ["num_workers=1"]):
        assert main(base + extra) == 0
    cpus = min(4, len(os.sched_getaffinity(0)))
    assert seen == [cpus, cpus, 0, 3, 1] and TrainConfig().num_workers == 0
