"""vitscope.training: config precedence and errors, recipes, SAM against a hand computation, the
evaluation statistics against numpy, training on ``fake`` and ``elpv``, probes, non-finite losses, CLI."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from _helpers import register_nan_model
from vitscope.cli import main as cli_main
from vitscope.data import create_dataset, create_loader
from vitscope.training import (
    SAM,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    augment_options,
    build_criterion,
    build_mixup,
    build_optimizer,
    build_scheduler,
    evaluate,
    list_recipes,
    load_config,
    load_run,
    resolve_config,
    train,
    train_one_epoch,
)
from vitscope.training.checkpoint import load_state, read_jsonl


def quick(tmp_path, name="run", **kw):
    """cpu-quick on fake with a tiny ViT; keyword arguments override."""
    args = dict(model="test_vit_cifar", data="fake", out=str(tmp_path / name), epochs=3, progress=False)
    args.update(kw)
    return resolve_config("cpu-quick", **args)


# ---------------------------------------------------------------------------------------------- config


def test_config_precedence_defaults_recipe_overrides(tmp_path):
    d = TrainConfig()
    r = resolve_config("hdvw-cifar")
    assert (r.lr, r.batch_size, r.weight_decay, r.clip_grad, r.smoothing) == (1.25e-4, 96, 0.05, 5.0, 0.1)
    assert r.seed == d.seed and r.opt == "adamw" and r.recipe == "hdvw-cifar"
    o = resolve_config("hdvw-cifar", ["lr=1e-3", "batch_size=8", "auto_augment=null", "probes.every=3"])
    assert (o.lr, o.batch_size, o.auto_augment, o.epochs) == (1e-3, 8, None, 300)  # "1e-3" coerced to float
    assert o.probes == {"every": 3, "measures": [], "num_images": 32}
    k = resolve_config("hdvw-cifar", ["lr=1e-3"], lr=2e-3, model=None)  # kwargs last; None ignored
    assert k.lr == 2e-3 and k.model == d.model
    path = tmp_path / "mine.yaml"
    path.write_text("lr: 0.5\nepochs: 2.0\nmodel_kwargs: {cb_placement: attn}\n")
    f = resolve_config(str(path), ["epochs=4"])
    assert (f.lr, f.epochs, f.model_kwargs) == (0.5, 4, {"cb_placement": "attn"})
    assert isinstance(f.epochs, int)


@pytest.mark.parametrize("call, match", [
    (lambda: resolve_config("nope"), r"Unknown recipe 'nope'.*Valid choices: cpu-quick, deit, hdvw-cifar"),
    (lambda: resolve_config(overrides=["lrr=1"]), r"Unknown config key 'lrr'. Did you mean lr\?.*batch_size"),
    (lambda: resolve_config(overrides=["lr=abc"]), r"'lr' expects float, got 'abc'"),
    (lambda: resolve_config(overrides=["epochs=2.5"]), r"'epochs' expects int"),
    (lambda: resolve_config(overrides=["lr"]), r"must look like key=value"),
    (lambda: resolve_config(overrides=["amp=fp8"]), r"'amp' is 'fp8'; valid choices: none, bf16, fp16"),
    (lambda: resolve_config(overrides=["lr.x=1"]), r"'lr' is not a mapping"),
    (lambda: resolve_config(overrides=["probes.measures=[entropy]"]),
     r"Unknown probe measure 'entropy'.*attention_entropy"),
    (lambda: resolve_config(overrides=["probes.often=1"]), r"Unknown probes key 'often'.*every, measures"),
    (lambda: train(epochs="x"), r"'epochs' expects int, got 'x'"),
    (lambda: resolve_config(overrides=["preprocess=timm"]), r"'preprocess' is 'timm'; valid choices: auto, model"),
    (lambda: resolve_config(overrides=["std=[0.2,0,0.2]"]), r"'std' must be 3 positive numbers"),
    (lambda: resolve_config(overrides=["mean=[0.5,0.5]"]), r"'mean' must be 3 numbers in \[0, 1\]"),
    (lambda: resolve_config(overrides=["crop_pct=0"]), r"'crop_pct' must be in \(0, 1\]"),
    (lambda: resolve_config(overrides=["eval_interpolation=cubic"]), r"valid choices: bilinear, bicubic"),
])
def test_config_errors_list_the_choices(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*cpu-quick"):
        resolve_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nwarmup: 3\n")
    with pytest.raises(ConfigError, match="Unknown config key 'warmup'. Did you mean warmup_"):
        resolve_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="broken.yaml' is not valid YAML"):
        resolve_config(str(broken))


# --------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_builds_optimizer_scheduler_transforms(name):
    assert set(list_recipes()) == {"cpu-quick", "deit", "hdvw-cifar"}
    cfg = resolve_config(name, num_classes=10, img_size=32)
    model = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=10)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    expected_lr = {"hdvw-cifar": 1.25e-4, "deit": 5e-4 * 1024 / 512, "cpu-quick": 1e-3}[name]
    # the recipe's lr (YAML parses the same correctly rounded double as the literal), DeiT's scaled by the same
    # multiplication and division in the same order: exact
    assert max(g["initial_lr"] if "initial_lr" in g else g["lr"] for g in opt.param_groups) == expected_lr
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.0, 0.05}  # no decay on biases / norms / pos_embed, as in DeiT
    sched, total = build_scheduler(opt, cfg, updates_per_epoch=10)
    assert total == {"hdvw-cifar": 305, "deit": 300, "cpu-quick": 5}[name]
    if name == "hdvw-cifar":  # 5 warm-up epochs from 1e-6, then the cosine starts at the peak
        # exact: warm-up 1e-6 + 0 * step; at the peak min_lr 0 + 0.5 * lr * (1 + cos 0) (products by 0.5 and 2);
        # past the last cycle min_lr itself
        for epoch, lr in ((0, 1e-6), (5, 1.25e-4), (305, 0.0)):
            sched.step(epoch)
            assert opt.param_groups[0]["lr"] == lr, epoch
    mix, crit = build_mixup(cfg), build_criterion(cfg)
    if name == "cpu-quick":
        assert mix is None and isinstance(crit, nn.CrossEntropyLoss)
    else:
        assert isinstance(mix, Mixup) and isinstance(crit, SoftTargetCrossEntropy)
        assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing) == (
            (1.0, 0.8, 0.1) if name == "hdvw-cifar" else (0.8, 1.0, 0.1))
    ds = create_dataset("fake:n=4", "train", img_size=32, augment=augment_options(cfg))
    tf = repr(ds.transform)
    assert ds[0][0].shape == (3, 32, 32)
    if name == "hdvw-cifar":
        assert "RandAugment" in tf and "n=2" in tf and "RandomCrop(size=(32, 32), padding=4)" in tf
    if name == "deit":
        assert "RandomResizedCrop" in tf and "RandAugment" in tf and "RandomErasing" in tf
    if name == "cpu-quick":
        assert "RandAugment" not in tf and "padding=4" in tf
    assert isinstance(build_criterion(resolve_config(name, mixup=0.0, cutmix=0.0, smoothing=0.1)),
                      LabelSmoothingCrossEntropy)


@pytest.mark.parametrize("name", ["hdvw-cifar", "deit"])
def test_paper_recipes_run_end_to_end(tmp_path, name):
    """Mixup/CutMix, smoothing, RandAugment, clipping, erasing, EMA and drop path in one short run."""
    cfg = resolve_config(name, model="test_vit_cifar", data="fake:n=32", out=str(tmp_path / name), epochs=1,
                         warmup_epochs=0, batch_size=16, img_size=32, progress=False)
    result = train(cfg)
    assert math.isfinite(result["train_loss"]) and result["train_steps"] == 2 and result["epochs"] == 1
    assert ("val_ema_top1" in result) == (name == "deit")


def test_repeated_augmentation_sampler_repeats_each_image_and_spreads_copies():
    """DeiT's repeated augmentation through timm's sampler: one epoch as long as a plain one, each drawn
    image three times across two processes, the order set by (seed, epoch)."""
    from vitscope.training.loaders import SeededRepeatAugSampler

    ds = list(range(600))
    ranks = [SeededRepeatAugSampler(ds, num_replicas=2, rank=r, num_repeats=3, seed=7) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    drawn = [list(s) for s in ranks]
    assert [len(d) for d in drawn] == [256, 256]  # 600 // 256 * 256 / 2 processes, as DeiT rounds
    counts = np.bincount(drawn[0] + drawn[1], minlength=600)
    assert set(counts[counts > 0]) <= {1, 2, 3} and (counts == 3).sum() >= 160
    again = SeededRepeatAugSampler(ds, num_replicas=2, rank=0, num_repeats=3, seed=7)
    again.set_epoch(1)
    assert list(again) == drawn[0]
    other = SeededRepeatAugSampler(ds, num_replicas=2, rank=0, num_repeats=3, seed=8)
    other.set_epoch(1)
    assert list(other) != drawn[0]
    with pytest.raises(ConfigError, match="repeated_aug"):
        resolve_config("cpu-quick", repeated_aug=-1)


def test_each_sample_is_augmented_by_its_place_in_the_epoch():
    """SeededSamples: the same (epoch, position) gives the same augmented tensor, another position another one (so
    DeiT's repeated copies of an image differ), and loading leaves the caller's RNG streams where they were."""
    from vitscope.training.loaders import SeededSamples

    ds = create_dataset("fake:n=8", "train", augment=augment_options(resolve_config("cpu-quick")))  # pad crop, flip
    seeded = SeededSamples(ds, seed=5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    a, b, c = seeded[(3, 1, 10)][0], seeded[(3, 1, 10)][0], seeded[(3, 1, 11)][0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, seeded[(3, 2, 10)][0])
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])


def test_results_do_not_depend_on_the_loader_worker_count(tmp_path):
    """Random crop with padding, flips, shuffling and dropout: 0 and 2 loader workers give the same losses and
    weights bit for bit (the same operations on the same tensors in the main process; only where samples are
    loaded differs), since each sample's augmentation is seeded by its place in the epoch, not by the worker."""
    runs = {}
    for workers in (0, 2):
        cfg = quick(tmp_path, name=f"w{workers}", data="fake:n=48,n_eval=16", epochs=2, batch_size=16, img_size=16,
                    num_workers=workers, drop=0.1)
        assert cfg.hflip > 0 and cfg.train_crop == "pad"  # the augmentation is random
        train(cfg)
        runs[workers] = tmp_path / f"w{workers}"
    losses = [[r["train_loss"] for r in read_jsonl(run / "metrics.jsonl")] for run in runs.values()]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    w0, w2 = (load_file(run / "model.safetensors") for run in runs.values())
    assert w0.keys() == w2.keys() and all(torch.equal(w0[k], w2[k]) for k in w0)


# ------------------------------------------------------------------------------------------------- SAM


def test_sam_step_matches_hand_computation():
    """One SAM-SGD step on least squares: w' = w - lr * grad(w + rho * g / ||g||), g = grad(w)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    w0 = model.weight.detach().numpy().ravel().copy()
    lr, rho = 0.1, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_one_epoch(model, [(x, y)], opt, nn.MSELoss(), 0, sam=SAM(model.parameters(), rho=rho))

    xn, yn = x.numpy(), y.numpy().ravel()

    def grad(w):  # d/dw mean((x w - y)^2)
        return 2.0 / len(yn) * xn.T @ (xn @ w - yn)

    g = grad(w0)
    e = rho * g / (np.linalg.norm(g) + 1e-12)  # SAM's eps offset, exact here as in the library
    expected = w0 - lr * grad(w0 + e)
    # float64 on both sides, each gradient 2/n x^T (x w - y) within gamma_12 2/n |x|^T (|x| |w| + |y|) (residuals:
    # 3-term dots and the subtraction, x^T r: 6 terms, the scale 2/n and autograd's MSE backward: a few u); the
    # ascent's direction g / ||g|| moves by 2 ||dg|| / ||g|| and its norm, division and scaling by (d + 4) u; w + e
    # rounds once (u |w + e| each side), and the gradient at it moves by |H| |dw|, H = 2/n x^T x; the step
    # w - lr g_sam rounds twice more (u |lr g_sam| and u |w'| each side)
    n, d, u = len(yn), len(w0), 2.0**-53
    gam = 12 * u / (1 - 12 * u)
    ax, ay = np.abs(xn), np.abs(yn)

    def grad_err(w):  # one side's rounding of grad(w)
        return gam * 2.0 / n * ax.T @ (ax @ np.abs(w) + ay)

    de = rho * (2 * np.linalg.norm(2 * grad_err(w0)) / np.linalg.norm(g) + (d + 4) * u)
    dw = de + 2 * u * np.abs(w0 + e)
    g_sam = grad(w0 + e)
    bound = lr * (2 * grad_err(w0 + e) + 2.0 / n * ax.T @ ax @ dw) + 2 * u * (lr * np.abs(g_sam) + np.abs(expected))
    assert (np.abs(model.weight.detach().numpy().ravel() - expected) <= bound).all(), bound
    # SAM differs from the plain step by lr (g_sam - g) = lr H e exactly (a quadratic loss), of norm at least
    # lr lambda_min(H) rho with ||e|| = rho (H = 2/n x^T x positive definite here): far above the bound
    plain = w0 - lr * g
    floor = lr * float(np.linalg.eigvalsh(2.0 / n * xn.T @ xn).min()) * rho
    assert np.linalg.norm(expected - plain) >= floor * (1 - 1e-9) and floor > 1e6 * np.linalg.norm(bound)


def test_grad_scaler_unscales_before_clipping():
    """fp16-style loss scaling (power of two, exact in float32) must not change a clipped step."""
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]

    def run(scaler):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_one_epoch(model, batches, opt, nn.CrossEntropyLoss(), 0, scaler=scaler, clip_grad=0.05)
        return model.weight.detach()

    plain = run(None)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    # every backward value is 2^10 times the plain one exactly (rounding commutes with a power of two, no overflow
    # or underflow here) and unscaling multiplies by 2^-10 exactly: the same gradients, clip and steps, bit for bit
    assert torch.equal(scaled, plain)
    torch.manual_seed(0)
    init = nn.Linear(5, 3).weight.detach()
    # clipped: 3 steps of lr * g with ||g|| <= 0.05 ||g|| / (||g|| + 1e-6) < 0.05 up to float32 rounding of the
    # clip (norm of 18 terms: 10 u, the coefficient's division and sum 2 u, the product u: 13 u) and of lr * g (u);
    # each step's w - lr g rounds by u |w| more, w within ||init|| + 3 lr 0.05; the test's subtraction and norm of
    # 15 terms (u and 9.5 u relative)
    u32 = 2.0**-24
    far = float(init.norm()) + 3 * 0.5 * 0.05
    bound = (3 * 0.5 * 0.05 * (1 + 14 * u32) + 3 * u32 * far) * (1 + 11 * u32)
    assert float((plain - init).norm()) <= bound


def test_bf16_autocast_path_runs_on_cpu():
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    model = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, batches, opt, nn.CrossEntropyLoss(), 0, amp_dtype=torch.bfloat16)
    assert math.isfinite(stats["loss"]) and all(p.dtype == torch.float32 for p in model.parameters())
    ev = evaluate(model, batches, amp_dtype=torch.bfloat16)
    assert ev["n"] == 4 and math.isfinite(ev["nll"])


def test_sam_misuse_errors():
    p = nn.Parameter(torch.ones(2))
    sam = SAM([p], rho=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        sam.ascend()
    with pytest.raises(RuntimeError, match="without ascend"):
        sam.restore()
    with pytest.raises(ValueError, match="rho"):
        SAM([p], rho=0.0)


# ------------------------------------------------------------------------------------------ evaluation


class _Lookup(nn.Module):
    """Returns a fixed row of logits per image; the image's single pixel holds the row index."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def test_evaluate_matches_numpy_on_unequal_batches():
    gen = torch.Generator().manual_seed(1)
    n, c = 23, 4
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    logits[0] = torch.tensor([800.0, 0, 0, 0])  # confidence exactly 1.0: must land in the last bin
    logits[1] = torch.tensor([0.0, 0, 0, 0])  # confidence 0.25
    targets = torch.randint(0, c, (n,), generator=gen)
    targets[0] = 0
    images = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 3, 1, 1)
    cuts = [0, 5, 17, 18, 23]
    loader = [(images[a:b], targets[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    got = evaluate(_Lookup(logits), loader)

    z = logits.numpy()
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))  # log-softmax
    p = np.exp(logp)
    t = targets.numpy()
    conf, pred = p.max(1), p.argmax(1)
    hit = (pred == t).astype(float)
    assert conf[0] == 1.0
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = (conf >= lo) & ((conf < hi) if b < 9 else (conf <= hi))
        if inside.any():
            ece += inside.sum() / n * abs(hit[inside].mean() - conf[inside].mean())
    nll = -logp[np.arange(n), t].mean()
    assert got["n"] == n
    # top1: an exact hit count / n, then * 100, on both sides: equal exactly
    assert got["top1"] == 100 * hit.mean()
    # NLL: each float64 -log softmax_t = log sum exp(z - max) - (z_t - max) on either side within u (|z_t - max| +
    # 2 nll_i) + (C + 4) u (the subtraction, C exps, their sum and the log: d log = dx / x); the mean of n terms
    # >= 0 adds (n + 1) u nll. ECE: tests/test_measures_calibration.py's cal_atol, 2 (2n + C + 8 + |z|max) u
    u = 2.0**-53
    nll_i = -logp[np.arange(n), t]
    side = (u * (np.abs(z[np.arange(n), t] - z.max(1)) + 2 * nll_i) + (c + 4) * u).mean() + (n + 1) * u * nll
    assert got["nll"] == pytest.approx(nll, rel=0, abs=2 * side)
    assert got["ece"] == pytest.approx(ece, rel=0, abs=2 * (2 * n + c + 8) * u)  # no log: no |z|max term


# ------------------------------------------------------------------------------------------- training


def test_train_fake_learns_and_writes_the_run(tmp_path):
    cfg = quick(tmp_path, epochs=4)
    result = train(cfg)
    run = tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["val_top1"] == result["val_top1"] > 35.0  # 10 classes: chance is 10%
    assert records[-1]["val_nll"] < records[0]["val_nll"] < math.log(10) + 0.1
    assert records[-1]["step"] == 4 * (256 // 32)
    saved = load_config(run)
    assert (saved.num_classes, saved.img_size, saved.model, saved.recipe) == (10, 32, "test_vit_cifar", "cpu-quick")
    state = load_state(run)
    assert state["epoch"] == 3 and state["step"] == 32 and state["config"]["lr"] == 1e-3
    assert {"optimizer", "scheduler", "rng", "sampler", "ema", "scaler"} <= set(state)
    model, loaded_cfg = load_run(run)
    assert loaded_cfg == saved and not model.training
    val = create_loader("fake", "val", batch_size=saved.eval_batch_size or saved.batch_size, img_size=32)
    again = evaluate(model, val)
    # the same weights (saved bit for bit), the run's evaluation batches and evaluate(): the same operations
    # (on CPU the run uses no autocast and no channels-last), equal exactly
    assert again["top1"] == result["val_top1"] and again["nll"] == result["val_nll"]
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(cfg)


def test_train_elpv_subset_beats_chance(tmp_path):
    """ELPV is imbalanced (about 2/3 functional cells): beat the majority class, not just 50%."""
    cfg = resolve_config("cpu-quick", model="test_vit_cifar", data="elpv", out=str(tmp_path / "elpv"), lr=2e-3,
                         epochs=6, max_examples=200, max_val_examples=200, img_size=32, progress=False)
    result = train(cfg)
    val = create_loader("elpv", "val", batch_size=200, img_size=32, max_examples=200, seed=cfg.seed)
    labels = torch.cat([t for _, t in val])
    prior = torch.bincount(labels, minlength=2).double() / len(labels)
    prior_nll = float(-(prior * prior.log()).sum())  # NLL of always predicting the class frequencies
    assert result["val_n"] == 200
    assert result["val_top1"] > 100 * float(prior.max()) + 2.0  # 73% against a 67% majority class
    assert result["val_nll"] < prior_nll


def test_sam_ema_and_probes_in_a_run(tmp_path):
    cfg = quick(tmp_path, model="test_convit_32", epochs=2, sam_rho=0.05, model_ema=True, model_ema_decay=0.9,
                data="fake:n=64", probes={"every": 1, "num_images": 8,
                                          "measures": ["attention_entropy", "nonlocality", "gpsa_gates"]})
    result = train(cfg)
    assert math.isfinite(result["train_loss"]) and "val_ema_top1" in result
    probes = read_jsonl(tmp_path / "run" / "probes.jsonl")
    assert [(p["epoch"], p["measure"]) for p in probes] == [
        (e, m) for e in (-1, 0, 1) for m in ("attention_entropy", "nonlocality", "gpsa_gates")]
    # GPSA gates: sigmoid(1) = 0.731 at ConViT's init (epoch -1), then sigmoid of the trained gating_param.
    assert probes[2]["layers"] == ["blocks.0.attn", "blocks.1.attn"]
    # float32 sigmoid (exp within 1 ulp, 2u, then a sum and a division, u each) against float64: 4 2^-24
    np.testing.assert_allclose(probes[2]["values"], np.full((2, 4), 1 / (1 + math.exp(-1))), rtol=4 * 2.0**-24)
    weights = load_file(tmp_path / "run" / "model.safetensors")
    for layer, values in zip(probes[-1]["layers"], probes[-1]["values"]):  # the same float32 sigmoid, recorded
        np.testing.assert_allclose(values, torch.sigmoid(weights[f"{layer}.gating_param"]).numpy(), rtol=0, atol=0)
    assert probes[-1]["values"] != probes[2]["values"]
    last = probes[-3]
    assert last["layers"] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    # Independent check of the last entropy probe: -sum A ln A over keys, mean over images and queries.
    import vitscope

    model, _ = load_run(tmp_path / "run")
    images = torch.stack([create_dataset("fake:n=64", "val", img_size=32)[i][0] for i in range(8)])
    with vitscope.explicit_attention(model), vitscope.capture(model, attention=True) as cap:
        model(images)
    for attn, values in zip(cap.attentions, last["values"]):
        a = attn.double().numpy()  # (B, H, N, N)
        ent = -(a * np.log(np.where(a > 0, a, 1.0))).sum(-1).mean(axis=(0, 2))  # (H,)
        # the same float32 attention (same weights, images and forward); the probe sums each row's N terms
        # A ln A >= 0 in float32 (each within 3 u32: log, product; the sum (N - 1) u32: (N + 2) u32 relative, as
        # test_measures_attention's float32 check), then the B N row entropies in float64 in another order than
        # numpy's float64 rows and mean: 2 (B N + 2) u64
        B, _, N, _ = a.shape
        np.testing.assert_allclose(values, ent, rtol=(N + 2) * 2.0**-24 + 2 * (B * N + 2) * 2.0**-53, atol=0)
    state = load_state(tmp_path / "run")
    assert state["ema"] is not None
    ema_model, _ = load_run(tmp_path / "run", ema=True)
    assert not torch.equal(ema_model.head.weight, model.head.weight)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = quick(tmp_path, model=register_nan_model(12), epochs=3)  # 8 steps per epoch: NaN at epoch 1 step 4
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 4.*last good checkpoint \(.*epoch-0000\) is kept"):
        train(cfg)
    run = tmp_path / "run"
    assert load_state(run)["epoch"] == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0]
    model, _ = load_run(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, match", [
    (["--config", "nope"], "Unknown recipe 'nope'. Valid choices: cpu-quick, deit, hdvw-cifar"),
    (["--config", "cpu-quick", "lrr=1"], "Unknown config key 'lrr'"),
    (["--config", "cpu-quick", "--model", "vit_tiny_cb_patch4"], "Unknown model.*did you mean vit_tiny_cb_patch4_32"),
    (["--config", "cpu-quick", "--data", "nodata"], "unknown data set 'nodata'.*valid names: fake, elpv"),
    (["--config", "cpu-quick", "--resume", "R"], "drop --config"),
])
def test_cli_errors(tmp_path, capsys, args, match):
    import re

    assert cli_main(["train", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "r").exists()  # nothing written on a user error


def test_cli_train_then_resume_extends(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli_main(["train", "--config", "cpu-quick", "--model", "test_vit_cb", "--data", "fake:n=64",
                     "--out", out, "epochs=1", "progress=false"]) == 0
    assert cli_main(["train", "--resume", out, "epochs=2"]) == 0
    assert [r["epoch"] for r in read_jsonl(tmp_path / "cli" / "metrics.jsonl")] == [0, 1]
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["epochs"] == 2
    capsys.readouterr()
    assert cli_main(["train", "--resume", out]) == 0  # finished: nothing to train, the last record again
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epoch"] == 1
    assert len(read_jsonl(tmp_path / "cli" / "metrics.jsonl")) == 2
    assert cli_main(["train", "--resume", out, "--model", "test_vit_cifar"]) == 2
    assert "cannot change on resume" in capsys.readouterr().err


def test_train_on_a_folder_with_a_truncated_image_skips_it_with_mixup_and_resumes(tmp_path, caplog):
    """Issue 15: one corrupt image in an image folder must not crash an epoch, nor the resumed run."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / c / f"{i}.png")
    bad = tmp_path / "imgs" / "train" / "a" / "3.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header reads, the pixels are cut off
    cfg = quick(tmp_path, data=f"imagefolder:{tmp_path / 'imgs'}", img_size=16, epochs=1, batch_size=4,
                eval_batch_size=8, mixup=0.8, cutmix=0.0)
    with caplog.at_level("WARNING"):
        first = train(cfg)
        assert "skipped unreadable image" in caplog.text and "3.png" in caplog.text
    assert math.isfinite(first["val_nll"])
    resumed = train(dataclasses.replace(cfg, epochs=2), resume=True)  # the resumed epoch meets the image again
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1]
    assert math.isfinite(resumed["val_nll"])
