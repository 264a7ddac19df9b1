"""Shared orchestration of the demo and the study recipes: train a model spec (or reuse a finished run),
evaluate it honestly on an imbalanced set, and run each analysis of vitscope on it.

Every step calls the library (``vitscope.training.train``, ``vitscope.probe``, ``vitscope.interventions``,
``vitscope.curvature``, ``vitscope.robustness``); nothing here re-implements a measure. Runs are cached by
a hash of their resolved training config, so studies that need the same model share one training run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscope.io.lock import run_lock
from vitscope.studies.zoo import ModelSpec

_logger = logging.getLogger(__name__)

__all__ = [
    "TrainRequest", "train_spec", "run_finished", "training_summary", "evaluate_classifier", "has_attention",
    "probe_measures",
    "run_probe", "run_skip_cka", "run_lesion", "run_localization", "cross_model_cka", "run_hessian", "run_landscape",
    "run_robustness", "frequency_balanced", "Timer", "val_loader",
]


# ----------------------------------------------------------------------------------------------
# Timing.


class Timer:
    """Wall-clock seconds per named stage, with a log line at each start and end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _logger.info("[%s] started", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            _logger.info("[%s] done in %.1f s", name, dt)


# ----------------------------------------------------------------------------------------------
# Training (cached by config hash).


@dataclasses.dataclass
class TrainRequest:
    """What to train: a model spec on a data spec under a recipe, with overrides of its settings."""

    spec: ModelSpec
    data: str
    recipe: str = "cpu-quick"
    seed: int = 0
    img_size: int | None = 32
    epochs: int | None = None
    batch_size: int | None = None
    data_fraction: float | None = None
    max_examples: int | None = None
    max_val_examples: int | None = None
    probes: dict[str, Any] | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "auto"
    progress: bool = True

    def config(self, out: str = "") -> Any:
        from vitscope.training import resolve_config

        return resolve_config(
            self.recipe, overrides=self.overrides, model=self.spec.model, model_kwargs=dict(self.spec.kwargs),
            data=self.data, img_size=self.img_size, epochs=self.epochs, batch_size=self.batch_size, seed=self.seed,
            data_fraction=self.data_fraction, max_examples=self.max_examples,
            max_val_examples=self.max_val_examples, probes=self.probes or None, device=self.device,
            progress=self.progress, out=out or "runs/vitscope",
        )

    def run_name(self) -> str:
        """``<key>[-f<fraction>]-s<seed>-<hash of the resolved config>``."""
        from vitscope.training.config import config_to_dict

        cfg = config_to_dict(self.config())
        for k in ("out", "progress", "device", "tensorboard"):
            cfg.pop(k, None)
        digest = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]
        frac = f"-f{self.data_fraction:g}" if self.data_fraction not in (None, 1, 1.0) else ""
        return f"{self.spec.key}{frac}-s{self.seed}-{digest}"


def run_finished(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir``'s latest complete checkpoint is of the last epoch of its config (or it stopped early)."""
    from vitscope.training.checkpoint import run_finished as checkpoint_finished

    return checkpoint_finished(run_dir)


def training_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """How a run's training ended: epochs trained of the cap, the best validation NLL and its epoch, and
    ``converged``: True when early stopping ended it (validation NLL had not improved for
    ``early_stop_patience`` epochs), False when it used every epoch of the cap (it may still have been
    improving), None when the run had no early stopping. ``weights_epoch`` is the epoch whose weights the run
    ended with (the best one when early stopping restored it), ``weights_val_top1`` that epoch's validation top-1;
    ``last_val_top1`` is the last epoch's."""
    from vitscope.training import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    recs = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, ValueError, TypeError):
                rec = json.loads(line)
                if int(rec.get("epoch", -1)) >= 0:
                    recs.append(rec)
    nll = [(float(r["val_nll"]), int(r["epoch"])) for r in recs if r.get("val_nll") is not None]
    best_nll, best_epoch = min(nll) if nll else (None, None)
    stopped = any(bool(r.get("stopped_early")) for r in recs)
    patience = getattr(cfg, "early_stop_patience", None)
    by_epoch = {int(r["epoch"]): r for r in recs}  # a resumed epoch's later line wins
    weights_epoch = None
    if recs:
        weights_epoch = int(recs[-1].get("weights_epoch", recs[-1]["epoch"]))
    return {"epochs_trained": len({int(r["epoch"]) for r in recs}), "epoch_cap": cfg.epochs,
            "early_stop_patience": patience, "best_val_nll": best_nll, "best_epoch": best_epoch,
            "last_val_top1": recs[-1].get("val_top1") if recs else None,
            "weights_epoch": weights_epoch, "weights_val_top1": by_epoch.get(weights_epoch, {}).get("val_top1"),
            "stopped_early": stopped, "converged": stopped if patience else None}


def train_spec(req: TrainRequest, runs_root: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """Train ``req`` into ``run_dir`` (default ``runs_root/<run_name>``) unless a finished run is there.

    A run killed half-way is resumed from its last checkpoint. Under an open ``torch.distributed`` group
    (``torchrun ... -m vitscope reproduce``) every rank takes part in the training (DDP, as ``vitscope train``
    under torchrun), while rank 0 alone checks the directory and holds its lock; the other ranks wait for its
    decision (train, resume or reuse) and every rank raises when rank 0's check fails. (While rank 0 waits for
    another process that trains the same run, the other ranks wait in a collective, which times out after the
    process group's timeout, 30 minutes by default.)
    """
    from vitscope.distributed import current

    run_dir = Path(run_dir) if run_dir is not None else Path(runs_root) / req.run_name()
    cfg = req.config(out=str(run_dir))
    info = current()
    if not info.distributed:
        return _train_locked(req, cfg, run_dir)
    import torch.distributed as dist

    with contextlib.ExitStack() as stack:
        decision: list[Any] = [None]  # rank 0's: "reuse", "resume", "new", or ("error", its message)
        error: Exception | None = None
        if info.is_main:
            try:
                _check_same_config(run_dir, cfg)
                stack.enter_context(_run_lock(run_dir))  # the others wait below meanwhile
                decision[0] = "reuse" if run_finished(run_dir) else \
                    "resume" if (run_dir / "config.yaml").is_file() else "new"
            except Exception as e:  # sent to every rank: none is left waiting in a collective
                error, decision[0] = e, ("error", str(e))
        dist.broadcast_object_list(decision, src=0)
        if isinstance(decision[0], tuple):
            raise error if error is not None else ValueError(decision[0][1])
        if decision[0] == "reuse":
            _logger.info("reusing the finished run %s", run_dir)
        else:
            from vitscope.training import train

            _log_training(req, cfg, run_dir)
            train(cfg, resume=decision[0] == "resume")  # every rank: DDP; rank 0 writes the run's files
        dist.barrier()  # rank 0 keeps the lock until every rank is done with the run
    return run_dir


def _log_training(req: TrainRequest, cfg: Any, run_dir: Path) -> None:
    _logger.info("training %s (%s %s) on %s, seed %d, %d epochs%s -> %s", req.spec.label, req.spec.model,
                 req.spec.kwargs or "", req.data, req.seed, cfg.epochs,
                 f", {req.data_fraction:g} of the data" if req.data_fraction else "", run_dir)


def _train_locked(req: TrainRequest, cfg: Any, run_dir: Path) -> Path:
    """One process: train (or resume) ``run_dir`` under its lock unless it is finished."""
    from vitscope.training import train

    _check_same_config(run_dir, cfg)
    with _run_lock(run_dir):
        if run_finished(run_dir):
            _logger.info("reusing the finished run %s", run_dir)
            return run_dir
        resume = (run_dir / "config.yaml").is_file()  # a checkpoint, or a run killed before its first one
        _log_training(req, cfg, run_dir)
        train(cfg, resume=resume)
    return run_dir


def _check_same_config(run_dir: Path, cfg: Any) -> None:
    """A run already in ``run_dir`` must have ``cfg``'s settings (ValueError naming those that differ)."""
    from vitscope.training import load_config
    from vitscope.training.config import config_to_dict

    if (run_dir / "config.yaml").is_file():
        ignore = ("out", "progress", "device", "tensorboard", "num_classes")
        old, new = (
            {k: v for k, v in config_to_dict(c).items() if k not in ignore} for c in (load_config(run_dir), cfg)
        )
        for k in ("preprocess", "mean", "std", "crop_pct", "eval_interpolation"):  # resolved when training
            if new.get(k) in (None, "auto"):
                old.pop(k, None)
                new.pop(k, None)
        if old != new:
            changed = sorted(k for k in new if old.get(k) != new[k])
            raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(changed)}); "
                             "choose another --out or delete that directory")


def _run_lock(run_dir: Path) -> contextlib.AbstractContextManager:
    """Only one process trains a run directory at a time (studies run side by side share runs): the one run lock
    (``vitscope.io.lock.run_lock``) on ``<run_dir>.lock`` beside it, waiting for the holder. (Beside, not inside:
    the training takes ``run_dir/.lock`` itself, and two flocks of one process on one file exclude each other.)"""
    return run_lock(run_dir.with_name(run_dir.name + ".lock"), run_dir, wait=True, poll_s=5.0, remove=True)


# ----------------------------------------------------------------------------------------------
# Evaluation.


def val_loader(data: str, img_size: int | None, batch_size: int = 64, max_examples: int | None = None,
               normalize: bool = True, split: str = "val", seed: int = 0) -> Any:
    from vitscope.data import create_loader

    return create_loader(data, split, batch_size=batch_size, img_size=img_size, normalize=normalize,
                         max_examples=max_examples, seed=seed, shuffle=False)


def evaluate_classifier(model: nn.Module, loader: Iterable, num_classes: int, shard: bool = False
                        ) -> dict[str, Any]:
    """Top-1, balanced accuracy (mean per-class recall) and the majority-class baseline on ``loader``.

    On an imbalanced set (ELPV's defect labels: 69% functional) top-1 alone flatters a model that predicts
    the majority class; balanced accuracy is 1/num_classes for any constant prediction. ``shard=True``: under
    torch.distributed rank r takes the global batches r, r + W, ... (``vitscope.distributed.shard_batches``) and
    the confusion matrix and NLL sum are summed over the ranks, so every rank returns the one-process result,
    with ``world_size`` and ``examples_per_rank``. The loop is ``vitscope.measures.evaluation.eval_loop``.
    """
    from vitscope.distributed import current
    from vitscope.measures.evaluation import eval_loop

    device = next(model.parameters()).device
    conf = eval_loop(model, loader, _Confusion(num_classes), device, shard=shard, sync=shard)
    if not shard:
        return classification_stats(conf.confusion, conf.nll)
    return {**classification_stats(conf.confusion, conf.nll), "world_size": current().world_size,
            "examples_per_rank": conf.per_rank}


class _Confusion:
    """``evaluate_classifier``'s reduction: a (true, predicted) confusion matrix and the NLL, a float64
    log-softmax of the float32 logits summed in float64 (as ``measures.Calibration`` and the probe do, so it
    equals training's ``val_nll``); ``sync`` sums both over the ranks and gathers each rank's example count."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # (true, predicted)
        self.nll = 0.0
        self.per_rank: list[int] = []

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        c = self.num_classes
        logits = outputs.float()  # (B, C)
        self.nll += F.cross_entropy(logits.double(), labels, reduction="sum").item()
        pred = logits.argmax(1)
        self.confusion += torch.bincount(labels.cpu() * c + pred.cpu(), minlength=c * c).view(c, c)

    def sync(self) -> None:
        from vitscope.distributed import all_gather_objects, all_reduce_sum, current

        self.per_rank = [int(n) for n in all_gather_objects(int(self.confusion.sum()))]
        if current().distributed:
            all_reduce_sum(self.confusion)
            self.nll = float(all_reduce_sum(torch.tensor([self.nll], dtype=torch.float64))[0])


def classification_stats(confusion: torch.Tensor, nll_sum: float | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, majority baseline and per-class recall from a (true, predicted) matrix."""
    n = int(confusion.sum())
    if n == 0:
        raise ValueError("no example was evaluated; check the data spec and max_val_examples")
    support = confusion.sum(1)  # (C,) examples per true class
    present = support > 0
    recall = confusion.diagonal().double() / support.clamp_min(1).double()  # (C,)
    out = {
        "n": n,
        "accuracy": float(confusion.diagonal().sum()) / n,
        "balanced_accuracy": float(recall[present].mean()),
        "majority_accuracy": float(support.max()) / n,
        "chance_balanced_accuracy": 1.0 / int(present.sum()),
        "per_class_recall": [float(r) if p else None for r, p in zip(recall, present)],
        "support": support.tolist(),
    }
    if nll_sum is not None:
        out["nll"] = nll_sum / n
    return out


@torch.no_grad()
def frequency_balanced(model: nn.Module, pixel_loader: Iterable, mean: Sequence[float], std: Sequence[float],
                       num_classes: int, freqs: Sequence[float], width: float = 0.2, seed: int = 0,
                       shard: bool = False) -> dict[str, Any]:
    """HDVW Fig. 2c on an imbalanced set: balanced accuracy (mean per-class recall) on [0, 1] images with band
    noise at each normalized frequency of ``freqs`` (``vitscope.robustness.frequency_noise``, the suite's noise:
    width ``width``, RMS 0.05 per value, common random numbers over frequencies), and clean. ``drop`` = clean
    minus noisy balanced accuracy: top-1 on ELPV (69% one class) moves little when a model drifts to the
    majority class. ``shard``: the confusion matrices are summed over the ranks, as ``evaluate_classifier``."""
    from vitscope.distributed import all_reduce_sum, current
    from vitscope.measures.evaluation import eval_batches, eval_mode
    from vitscope.robustness import frequency_noise
    from vitscope.robustness.attacks import pixel_model
    from vitscope.robustness.suite import default_freq_eps

    net = pixel_model(model, mean, std)
    device = next(model.parameters()).device
    conf = torch.zeros(len(freqs) + 1, num_classes, num_classes, dtype=torch.long)  # (clean + F, true, pred)
    eps = None
    with eval_mode(net):
        for i, x, y in eval_batches(pixel_loader, device, shard=shard):  # x: (B, C, H, W) in [0, 1]
            eps = default_freq_eps(x.shape) if eps is None else eps
            for j, xn in enumerate([x] + [frequency_noise(x, f, width, eps=eps, seed=seed + i) for f in freqs]):
                pred = net(xn).argmax(1).cpu()
                conf[j] += torch.bincount(y.cpu() * num_classes + pred, minlength=num_classes ** 2
                                          ).view(num_classes, num_classes)
    if shard and current().distributed:
        all_reduce_sum(conf)
    bal = [classification_stats(c)["balanced_accuracy"] for c in conf]
    return {"freqs": [float(f) for f in freqs], "clean_balanced_accuracy": bal[0], "balanced_accuracy": bal[1:],
            "drop": [bal[0] - b for b in bal[1:]], "width": float(width), "n": int(conf[0].sum())}


# ----------------------------------------------------------------------------------------------
# Analyses.


def has_attention(model: nn.Module, images: torch.Tensor) -> bool:
    """Whether ``vitscope.capture`` finds attention maps in ``model`` (on a couple of images)."""
    import vitscope

    with torch.no_grad(), vitscope.capture(model, attention=True, residual=False, branches=False) as cap:
        was = model.training
        model.eval()
        try:
            model(images[:2])
        finally:
            model.train(was)
    return bool(cap.attentions)


def probe_measures(model: nn.Module, attention: bool) -> list[str]:
    """Every forward measure of ``vitscope.probe`` that applies to ``model``."""
    from vitscope.measures import gpsa_layers

    names = ["cka", "ratio_of_norms", "fourier", "feature_variance"]
    if attention:
        names = ["attention_entropy", "attention_distance", "nonlocality", "relative_distance", *names]
    try:
        gpsa_layers(model)
        names.append("gpsa_gates")
    except ValueError:  # no GPSA layer: not a ConViT
        pass
    return names


def run_probe(model: nn.Module, loader: Iterable, measures: Sequence[str], max_batches: int | None = None,
              progress: bool = True, shard: bool = False) -> Any:
    import vitscope

    return vitscope.probe(model, loader, measures, max_batches=max_batches, progress=progress, shard=shard)


def run_skip_cka(model: nn.Module, loader: Iterable, block: int | None = None, max_batches: int | None = None,
                 progress: bool = True, shard: bool = False) -> dict[str, Any]:
    """RAGHU's skip removal, as an intervention on the trained model: the probe's CKA between every sub-layer
    output with the skip connection of one block removed (``vitscope.interventions.remove_skip``; default the
    middle block, ``n // 2`` of ``n``). RAGHU trained models without that skip; this keeps the trained weights."""
    from vitscope.interventions import remove_skip, residual_blocks

    n = len(residual_blocks(model))
    k = n // 2 if block is None else block
    with remove_skip(model, k) as blk:
        res = run_probe(model, loader, ["cka"], max_batches=max_batches, progress=progress, shard=shard)
    return {"block": blk.index, "block_name": blk.name, "n_blocks": n, "cka": res.to_dict()["cka"]}


def run_lesion(model: nn.Module, loader: Iterable, max_batches: int | None = None, progress: bool = True
               ) -> dict[str, Any]:
    """HDVW's lesion study over sub-layers (attention / MLP branches separately; a CNN block is one)."""
    from vitscope.interventions import lesion

    return lesion(model, loader, targets="sublayers", max_batches=max_batches, progress=progress).to_dict()


def run_localization(model: nn.Module, loader: Iterable, max_batches: int | None = 2, epochs: int = 30,
                     progress: bool = True) -> dict[str, Any]:
    """RAGHU's position probe at every block output."""
    from vitscope.interventions import localization_probe

    return localization_probe(model, loader, max_batches=max_batches, epochs=epochs, progress=progress).to_dict()


@torch.no_grad()
def cross_model_cka(model_x: nn.Module, model_y: nn.Module, loader: Iterable, max_batches: int | None = None,
                    name_y: str = "") -> dict[str, Any]:
    """Minibatch CKA between every sub-layer output of ``model_x`` and of ``model_y`` on the same batches
    (RAGHU Fig. 1-2; ``vitscope.compare`` with ``layers="sublayers"``); a ``cka_cross`` entry for ``results.json``."""
    from vitscope.comparing import compare

    res = compare(model_x, model_y, loader, layers="sublayers", max_batches=max_batches, progress=False)
    rows = [{"layer": a, "depth": i, "other_layer": b, "other_depth": j, "value": float(res.cka[i, j])}
            for i, a in enumerate(res.names_a) for j, b in enumerate(res.names_b)]
    return {"rows": rows, "layers": res.names_a, "other_layers": res.names_b, "matrix": res.cka.tolist(),
            "other_model": name_y, "examples": res.meta["examples"] - res.meta["cka_skipped_examples"]}


class _InOrderBatches:
    """The first ``max_batches`` batches of ``loader``, each through ``transform`` (e.g. timm's ``Mixup``), in
    order. Under torch.distributed every rank walks all of them (``shard_batches`` then skips the other ranks'),
    so the random augmentation and mixup draws of global batch i are those of one process."""

    def __init__(self, loader: Iterable, max_batches: int, transform: Any = None) -> None:
        self.loader, self.max_batches, self.transform = loader, max_batches, transform

    def __len__(self) -> int:
        return min(len(self.loader), self.max_batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(self.loader):
            if i >= self.max_batches:
                return
            yield self.transform(x, y) if self.transform is not None else (x, y)


def run_hessian(model: nn.Module, loader: Iterable, k: int = 5, max_batches: int = 2, max_iter: int = 30,
                progress: bool = True, name: str = "", shard: bool = False, **options: Any) -> dict[str, Any]:
    """HDVW's Hessian eigenvalue spectrum: top-``k`` eigenvalues (largest magnitude, Lanczos) per batch;
    ``hessian.json`` content for the report.

    ``options`` go to ``eigenvalue_spectrum``: HDVW's protocol takes the training loss, i.e. ``loss_fn`` (the
    run's criterion), ``weight_decay`` (its L2 term) and ``transform`` (its mixup / cutmix).

    The L2 term, HDVW's "NLL + L2": coefficient = the run's (optimizer's) ``weight_decay``, as HDVW's code
    takes its optimizer's weight decay as the L2 coefficient; form ``l2_style="half_sq"``, wd/2 * sum ||p||^2,
    whose Hessian is wd * I (every eigenvalue + wd, so an NLL eigenvalue counts as negative only below -wd).
    HDVW's Hessian code was never released (xxxnell/how-do-vits-work issue #12 gives PyHessian with a
    ``weight_decay`` argument, not the form of the term); the only L2 term its released code computes is
    wd * sum ||p|| unsquared (``ops/norm.py``, for the loss-landscape plots), offered as ``l2_style="hdvw"`` but
    not the default: its Hessian wd (I - p p^T / ||p||^2) / ||p|| blows up for tensors of small norm. Under
    AdamW (decoupled decay) no loss term reproduces the update; wd/2 ||p||^2 is the one whose gradient is the
    decay direction wd * p (and it is exactly SGD's coupled weight decay, HDVW's ResNet recipe). Fractions and
    extremes count only the eigenvalues that converged (``converged`` per batch and eigenvalue;
    ``n_converged`` of ``n_eigenvalues``); ``negative_fraction`` is NaN when none did. ``shard=True``: under
    torch.distributed each rank computes the spectra of the global batches r, r + W, ... (every rank still
    loads and transforms every batch in order, so a batch's augmentation is that of one process; the
    eigensolver draws from its own generators) and all ranks get every batch's eigenvalues.
    """
    import numpy as np

    from vitscope.curvature import eigenvalue_spectrum

    transform = options.get("transform")
    if shard:  # the transform is applied in _InOrderBatches, before sharding
        loader = _InOrderBatches(loader, max_batches, options.pop("transform", None))
    res = eigenvalue_spectrum(model, loader, k=k, max_batches=max_batches, max_iter=max_iter, progress=progress,
                              shard=shard, **options)
    if shard and transform is not None:
        res.config["transform"] = type(transform).__name__
    options["transform"] = transform
    eig = res.eigenvalues["all"]  # (n_batches, k)
    conv = np.asarray(res.converged["all"], dtype=bool)  # (n_batches, k)
    good = eig[conv]
    nan = float("nan")
    return {
        "model": name, "eigenvalues": eig.tolist(),
        "negative_fraction": float((good < 0).mean()) if good.size else nan,
        "negative_fraction_all": float(res.negative_fraction["all"]),
        "max_abs_eigenvalue": float(abs(good).max()) if good.size else nan,
        "max_eigenvalue": float(good.max()) if good.size else nan,
        "min_eigenvalue": float(good.min()) if good.size else nan,
        "converged": conv.tolist(), "n_converged": int(conv.sum()), "n_eigenvalues": int(conv.size),
        "loss": {"weight_decay": float(options.get("weight_decay", 0.0)),
                 "l2_style": options.get("l2_style", "half_sq"),
                 "l2_term": {"half_sq": "weight_decay / 2 * sum ||p||^2: Hessian + weight_decay * I",
                             "hdvw": "weight_decay * sum ||p|| (HDVW's landscape code)"}.get(
                                 options.get("l2_style", "half_sq"), ""),
                 "augmentation": type(options["transform"]).__name__ if options.get("transform") else None,
                 "criterion": type(options["loss_fn"]).__name__ if options.get("loss_fn") is not None else
                 "cross_entropy"},
        "density": {"grid": res.grid["all"].tolist(), "density": res.density["all"].tolist()},
        "batch_sizes": res.batch_sizes, "n_hvp": res.n_hvp, "config": res.config,
    }


def run_landscape(model: nn.Module, loader: Iterable, steps: int = 11, span: float = 1.0, max_batches: int = 2,
                  dims: int = 1, progress: bool = True, name: str = "") -> dict[str, Any]:
    """A filter-normalized random slice of the loss landscape (Li et al. 2018); ``landscape.json`` content."""
    from vitscope.curvature import loss_landscape

    res = loss_landscape(model, None, loader, dims=dims, steps=steps, span=span, max_batches=max_batches,
                         progress=progress)
    out = res.to_dict()
    if out.get("y") is None:
        out.pop("y", None)
    out["model"] = name
    return out


def run_robustness(model: nn.Module, pixel_loader: Iterable, mean: Sequence[float], std: Sequence[float],
                   options: dict[str, Any], max_batches: int | None = None, progress: bool = True,
                   name: str = "", shard: bool = False) -> dict[str, Any]:
    """Calibration and the robustness suite (``vitscope.robustness.evaluate_robustness``) on [0, 1] pixels;
    ``shard``: see ``evaluate_robustness``."""
    from vitscope.robustness import evaluate_robustness

    out = evaluate_robustness(model, pixel_loader, mean=mean, std=std, max_batches=max_batches, progress=progress,
                              shard=shard, **options)
    out["model"] = name
    return out
