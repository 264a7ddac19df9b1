"""One-line errors for bad training settings (checked before any work), the run lock, early stopping,
stale temp files, the checkpoint's network spec, NaN at epoch 0, --pretrained without hub weights."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from _helpers import one_line_error
from vitscope.cli import main as cli_main
from vitscope.io.weights import load_weights, read_sidecar
from vitscope.training import NonFiniteLossError, load_run, resolve_config, train
from vitscope.training.checkpoint import (
    RunLockedError,
    latest_checkpoint,
    load_state,
    lock_run,
    read_jsonl,
    remove_stale_files,
    run_finished,
    run_model_spec,
    save_checkpoint,
)
from vitscope.training.early_stop import EarlyStop


def quick(tmp_path, name="run", **kw):
    args = dict(model="test_vit_cifar", data="fake:n=64", out=str(tmp_path / name), epochs=2, batch_size=16,
                progress=False, img_size=16)
    args.update(kw)
    return resolve_config("cpu-quick", **args)


# ------------------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize("override, expected", [
    ("drop_path=3", "'drop_path' must be in [0, 1) (stochastic depth rate"),
    ("drop=-0.1", "'drop' must be in [0, 1)"),
    ("smoothing=1.5", "'smoothing' must be in [0, 1) (label smoothing"),
    ("scale=[a, b]", "'scale' must be 2 numbers in [0, 1], e.g. scale=[0.08,1.0], got ['a', 'b']"),
    ("scale=[0.9, 0.1]", "'scale' must be [min, max] with 0 < min <= max <= 1"),
    ("scale=[0.1]", "'scale' must be 2 numbers"),
    ("opt_betas=[0.9]", "'opt_betas' must be 2 numbers in [0, 0.999999], e.g. opt_betas=[0.9,0.999], got [0.9]"),
    ("opt_betas=[0.9, 1.5]", "'opt_betas' must be 2 numbers"),
    ("probes.num_images=0", "probes.num_images must be an integer >= 1, got 0; e.g. probes.num_images=32"),
    ("probes.every=x", "probes.every must be an integer >= 1, got 'x'"),
    ("warmup_epochs=-3", "'warmup_epochs' must be >= 0 (0 disables the warm-up), got -3"),
    ("weight_decay=-1", "'weight_decay' must be >= 0"),
    ("eval_batch_size=0", "'eval_batch_size' must be >= 1"),
    ("data_fraction=2", "'data_fraction' must be in (0, 1] (fraction of every class kept"),
    ("data_fraction=0", "'data_fraction' must be in (0, 1]"),
    ("lr=nan", "'lr' must be > 0"),
    ("mixup_prob=2", "'mixup_prob' must be in [0, 1]"),
    ("model_ema_decay=1", "'model_ema_decay' must be in (0, 1)"),
    ("early_stop_patience=0", "'early_stop_patience' must be >= 1"),
    ("early_stop_min_delta=-1", "'early_stop_min_delta' must be >= 0"),
    ("early_stop_lr_fraction=0", "'early_stop_lr_fraction' must be in (0, 1]"),
    ("early_stop_lr_fraction=1.5", "'early_stop_lr_fraction' must be in (0, 1]"),
    ("num_workers=-1", "'num_workers' must be >= 0"),
])
def test_bad_setting_is_one_line_before_any_work(tmp_path, capsys, override, expected):
    out = tmp_path / "run"
    argv = ["train", "--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake", "--out", str(out)]
    one_line_error(capsys, [*argv, override], expected)
    assert not out.exists()  # nothing was written


def test_good_settings_still_resolve():
    cfg = resolve_config("cpu-quick", ["scale=[0.5, 1]", "opt_betas=[0.9, 0.99]", "probes.measures=attention_entropy",
                                       "data_fraction=1", "eval_batch_size=null", "early_stop_patience=3"])
    assert cfg.scale == [0.5, 1.0] and cfg.opt_betas == [0.9, 0.99] and cfg.early_stop_patience == 3
    assert cfg.probes == {"every": 1, "measures": ["attention_entropy"], "num_images": 32}


def test_zero_std_data_names_the_spec(tmp_path, monkeypatch):
    import vitscope.data

    real = vitscope.data.data_info

    def constant(spec, **kw):
        import dataclasses

        return dataclasses.replace(real(spec, **kw), std=(0.0, 0.1, 0.1))

    monkeypatch.setattr(vitscope.data, "data_info", constant)
    with pytest.raises(ValueError, match=r"data 'fake:n=64' has per-channel std \(0.0, 0.1, 0.1\).*divides by zero"):
        train(quick(tmp_path))


def test_pretrained_without_hub_weights_is_one_line(tmp_path, capsys):
    argv = ["train", "--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake:n=64", "--pretrained",
            "--out", str(tmp_path / "run"), "img_size=16"]
    one_line_error(capsys, argv, "Cannot load timm's pretrained weights of 'test_vit_cifar'",
                    "No pretrained weights exist", "drop pretrained=true")
    one_line_error(capsys, ["train", "--resume", str(tmp_path / "run"), "--pretrained"], "--pretrained applies")


def _nan_model(**kwargs):
    class NanAtOnce(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, kwargs.get("num_classes", 10))
            self.pretrained_cfg = {"input_size": (3, 32, 32)}

        def forward(self, x):
            return self.head(x.mean((2, 3))) * float("nan")  # (B, C)

    return NanAtOnce()


def test_nan_at_epoch_0_does_not_claim_a_checkpoint(tmp_path):
    if not timm.is_model("_vitscope_test_nan_at_once"):
        _nan_model.__name__ = "_vitscope_test_nan_at_once"
        timm.models.register_model(_nan_model)
    with pytest.raises(NonFiniteLossError, match="epoch 0, step 0.*No checkpoint was written") as err:
        train(quick(tmp_path, model="_vitscope_test_nan_at_once"))
    assert "last good checkpoint" not in str(err.value)
    assert latest_checkpoint(tmp_path / "run") is None


# ---------------------------------------------------------------------------------------- lock, files


def test_second_writer_is_refused_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    cfg = quick(tmp_path, epochs=1)
    run = tmp_path / "run"
    with lock_run(run):  # a separate open file description: flock excludes it like another process
        with pytest.raises(RunLockedError, match=f"{run} is being trained by process {os.getpid()}"):
            train(cfg)
        with pytest.raises(RunLockedError):
            with lock_run(run):
                pass
    assert latest_checkpoint(run) is None
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"half a file")  # left by a killed writer
    (run / "checkpoints" / ".tmp-epoch-0000-999").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-epoch-0000-999" / "model.safetensors").write_bytes(b"x")
    train(cfg)  # released: the run starts, and removes what the killed writer left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0000"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_kill_between_publishing_a_checkpoint_and_tidying_up_is_repaired(tmp_path):
    run = tmp_path / "run"
    model = nn.Linear(2, 2)
    save_checkpoint(run, model, {"epoch": 0, "step": 1})
    shutil.copytree(run / "checkpoints" / "epoch-0000", tmp_path / "kept")
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(run, model, {"epoch": 1, "step": 2})
    save_checkpoint(run, model, {"epoch": 2, "step": 3})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]  # the last two
    # As if killed right after the rename of epoch-0002: epoch-0000 still there, the top-level file its weights.
    shutil.copytree(tmp_path / "kept", run / "checkpoints" / "epoch-0000")
    os.unlink(run / "model.safetensors")  # (a hard link of epoch-0002's weights: never write into it)
    os.link(run / "checkpoints" / "epoch-0000" / "model.safetensors", run / "model.safetensors")
    assert latest_checkpoint(run).name == "epoch-0002" and load_state(run)["epoch"] == 2
    assert remove_stale_files(run) == ["checkpoints/epoch-0000"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert os.path.samefile(run / "model.safetensors", run / "checkpoints" / "epoch-0002" / "model.safetensors")
    assert torch.equal(load_file(run / "model.safetensors")["weight"], model.weight.detach())


def test_checkpoint_spec_rebuilds_the_trained_network(tmp_path):
    cfg = quick(tmp_path, epochs=1, model_kwargs={"depth": 1}, drop_path=0.1)
    train(cfg)
    run = tmp_path / "run"
    spec = run_model_spec(run)
    assert spec["model"] == "test_vit_cifar" and spec["model_kwargs"] == {"depth": 1}
    assert (spec["img_size"], spec["num_classes"], spec["data"]) == (16, 10, "fake:n=64")
    assert spec["create_kwargs"] == {"depth": 1, "num_classes": 10, "img_size": 16}  # no drop rates: eval only
    assert spec["weights"] == run / "checkpoints" / "epoch-0000" / "model.safetensors"
    assert run_model_spec(run / "model.safetensors")["weights"] == run / "model.safetensors"
    assert run_model_spec(spec["weights"])["epoch"] == 0
    sidecar = read_sidecar(run / "model.safetensors")
    assert (sidecar["model_name"], sidecar["model_kwargs"]) == ("test_vit_cifar", spec["create_kwargs"])
    rebuilt = load_weights(run / "model.safetensors").eval()  # from the file alone
    trained, _ = load_run(run)
    assert len(rebuilt.blocks) == 1 and rebuilt.patch_embed.img_size == (16, 16)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt(x), trained(x))
    for bad, message in ((tmp_path / "missing", "does not exist"), (tmp_path, "not a vitscope run directory")):
        with pytest.raises(FileNotFoundError, match=message):
            run_model_spec(bad)


# --------------------------------------------------------------------------------------- early stopping


def test_early_stop_counts_epochs_without_an_improvement_larger_than_min_delta():
    es = EarlyStop(patience=2, min_delta=0.1)
    stops = []
    for epoch, loss in enumerate([1.0, 0.95, 0.85, 0.9, 0.8, 0.7]):
        es.update(epoch, loss)
        stops.append(es.stop)
    # 0.95 is not 0.1 below 1.0; 0.85 is; 0.9 and 0.8 are not 0.1 below 0.85 -> two epochs without: stop;
    # 0.7 is more than 0.1 below 0.85: an improvement again (the engine stops at the first True).
    assert stops == [False, False, False, False, True, False]
    assert (es.best, es.best_epoch) == (0.7, 5)
    assert not EarlyStop(patience=None).stop


def test_early_stop_counts_stalls_only_after_warmup_once_the_lr_has_decayed():
    es = EarlyStop(patience=2, lr_fraction=0.5, warmup_epochs=1)
    # (val_nll, lr / peak): epoch 0 is warm-up, epochs 1-3 run at a high lr, so their stalls do not count.
    history = [(1.0, 0.1), (1.1, 1.0), (1.2, 0.9), (0.9, 0.7), (0.95, 0.5), (0.92, 0.3), (0.8, 0.2), (0.85, 0.1),
               (0.9, 0.05)]
    stops, waits = [], []
    for epoch, (loss, ratio) in enumerate(history):
        es.update(epoch, loss, ratio)
        stops.append(es.stop)
        waits.append(es.wait)
    assert waits == [0, 0, 0, 0, 1, 2, 0, 1, 2]
    assert stops == [False] * 5 + [True, False, False, True]  # the engine stops at the first True (epoch 5)
    assert (es.best, es.best_epoch, es.counting_from) == (0.8, 6, 4)
    # The old rule (lr_fraction=None) stops the same history after epoch 2, at the peak learning rate.
    old = EarlyStop(patience=2)
    first_stop = next(e for e, (loss, ratio) in enumerate(history) if (old.update(e, loss, ratio), old.stop)[1])
    assert first_stop == 2 and old.counting_from == 0


def test_early_stop_rule_from_config_and_old_checkpoint_state():
    cfg = resolve_config("cpu-quick", early_stop_patience=3)
    es = EarlyStop.from_config(cfg)
    assert (es.patience, es.lr_fraction, es.warmup_epochs) == (3, 0.5, 1)  # the default fraction
    # A schedule that never decays to the fraction counts from the end of the warm-up instead of never.
    assert EarlyStop.from_config(resolve_config("cpu-quick", sched="constant")).lr_fraction == 1.0
    assert EarlyStop.from_config(resolve_config("cpu-quick", lr=1e-3, min_lr=6e-4)).lr_fraction == 1.0
    assert EarlyStop.from_config(resolve_config("cpu-quick", ["early_stop_lr_fraction=null"])).lr_fraction is None
    # A checkpoint written before the gate existed ({best, best_epoch, wait}) restores; counting_from unknown.
    old = EarlyStop.restore(cfg, {"best": 0.5, "best_epoch": 2, "wait": 1}, [])
    assert (old.best, old.best_epoch, old.wait, old.counting_from) == (0.5, 2, 1, -1)
    # No saved state: the metrics lines are replayed, each epoch's recorded lr against the peak (cfg.lr).
    records = [{"epoch": e, "val_nll": v, "train_lr": lr} for e, (v, lr) in
               enumerate([(0.6, 1e-4), (0.7, 1e-3), (0.7, 6e-4), (0.7, 5e-4), (0.7, 4e-4)])]
    replayed = EarlyStop.restore(cfg, None, records)
    assert (replayed.best_epoch, replayed.wait, replayed.counting_from) == (0, 2, 3)


def test_early_stopping_waits_for_the_lr_to_decay_in_a_run(tmp_path):
    # min_delta 100: only epoch 0 improves; stalls count from the first epoch past the warm-up whose last
    # update's lr is at most half the peak, so the run ends `patience` counted epochs after that one.
    result = train(quick(tmp_path, epochs=8, early_stop_patience=2, early_stop_min_delta=100.0))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    counted = [r["epoch"] for r in records if r["epoch"] >= 1 and r["train_lr"] <= 0.5 * 1e-3]
    assert result["stopped_early"] and counted[0] >= 3  # cosine over 8 epochs: lr > 0.5 peak until epoch 3
    assert result["epoch"] == counted[1] == records[-1]["epoch"] and result["early_stop_counting_from"] == counted[0]
    assert [r["early_stop_wait"] for r in records] == [0] * (counted[0]) + [1, 2]
    # The run ends with epoch 0's weights (the best); without restoring, with the last epoch's.
    assert records[-1]["weights_epoch"] == 0 and "weights_epoch" not in records[-2]
    last = train(quick(tmp_path, "last", epochs=8, early_stop_patience=2, early_stop_min_delta=100.0,
                       early_stop_restore_best=False))
    assert last["epoch"] == result["epoch"]
    assert "weights_epoch" not in read_jsonl(tmp_path / "last" / "metrics.jsonl")[-1]
    assert not (tmp_path / "last" / "best.safetensors").exists()
    best0, kept, last_w = (load_file(tmp_path / name / f) for name, f in (
        ("run", "best.safetensors"), ("run", "model.safetensors"), ("last", "model.safetensors")))
    with safe_open(str(tmp_path / "run" / "best.safetensors"), framework="pt") as f:
        assert f.metadata()["epoch"] == "0"
    assert all(torch.equal(best0[k], kept[k]) for k in best0)
    assert not all(torch.equal(kept[k], last_w[k]) for k in kept)


def test_early_stopping_ends_the_run_and_survives_resume(tmp_path):
    # min_delta 100: no epoch after the first improves enough, so the run stops after `patience` more.
    run = tmp_path / "run"
    result = train(quick(tmp_path, epochs=2, early_stop_patience=2, early_stop_min_delta=100.0))
    assert not result["stopped_early"] and result["best_epoch"] == 0 and run_finished(run)
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["epoch"], r["best_epoch"]) for r in records] == [(0, 0), (1, 0)]
    assert records[1]["best_val_nll"] == records[0]["val_nll"] and "stopped_early" not in records[1]
    # Extended by 3 epochs: the wait of epoch 1 is kept across the restart, so epoch 2 ends the run.
    assert cli_main(["train", "--resume", str(run), "epochs=5"]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[-1]["stopped_early"] is True
    assert records[1]["weights_epoch"] == records[2]["weights_epoch"] == 0  # best.safetensors outlived the restart
    assert run_finished(run) and latest_checkpoint(run).name == "epoch-0002"
    again = train(resolve_config(base=quick(tmp_path, epochs=5, early_stop_patience=2, early_stop_min_delta=100.0)),
                  resume=True)  # requeued: nothing left to do
    assert again["stopped_early"] and again["epoch"] == 2 and len(read_jsonl(run / "metrics.jsonl")) == 3
    assert math.isfinite(again["best_val_nll"])


def test_auto_resume_starts_a_run_then_continues_it_with_the_same_command(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake:n=64", "--out", str(run),
            "--auto-resume", "epochs=1", "batch_size=16", "img_size=16", "progress=false"]
    assert cli_main(argv) == 0  # nothing there: starts the run
    first = read_jsonl(run / "metrics.jsonl")
    assert cli_main([*argv, "progress=true"]) == 0  # requeued (a runtime setting may differ): nothing to do
    assert read_jsonl(run / "metrics.jsonl") == first and latest_checkpoint(run).name == "epoch-0000"
    one_line_error(capsys, [*argv, "lr=0.5"], "--auto-resume:", "other settings (lr: 0.001 -> 0.5)")
    one_line_error(capsys, [*argv, "--resume", str(run)], "drop --resume")
