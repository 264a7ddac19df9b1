"""``vitscope reproduce STUDY``: study recipes shipped as YAML (``vitscope/studies/*.yaml``), each training
what its claims need over several seeds, measuring them, and ending with a verdict table.

A study YAML holds ``name``, ``title``, ``paper``, ``conditions`` (data regimes, e.g. ``small:
{data_fraction: 0.25, steps_constant: true}``), ``claims`` and ``scales``. A claim cites a finding of
METHODS.md ("Findings to reproduce") and compares two sides ``a`` and ``b``, each a term:
``{model, metric, condition}``, ``{diff: [term, term]}`` (first minus second) or ``{value: number}``,
with ``expect: greater|less|equal`` (``equal``: a claim of no change, tested two-sided; it can fail, never
hold, since no paper gives an equivalence margin). The models to train and the analyses to run follow from the terms.
Verdicts follow ``vitscope.studies.verdict`` (paired t where the seeds pair, i.e. both sides measure the same
models, Welch's t between independent architectures, or a claim's own ``paired: true|false``; Holm-corrected
over the study's claims). A claim may state its data ``regime``: ``large`` (the paper measured it on ImageNet),
``jft`` (ImageNet / JFT pretraining, RAGHU), ``imagenet224`` (ImageNet at 224 px: HDVW's Fourier and variance
plots) or ``small`` (a claim about small data); a claim of a large-data regime judged on a small data set is
still measured, and the table says that the regime differs.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vitscope.io.atomic import atomic_write_json, atomic_write_text, json_safe
from vitscope.studies.metrics import compute_metric, metric_needs, parse_metric
from vitscope.studies.pipeline import (
    Timer,
    TrainRequest,
    evaluate_classifier,
    frequency_balanced,
    run_hessian,
    run_localization,
    run_probe,
    run_robustness,
    run_skip_cka,
    train_spec,
    training_summary,
    val_loader,
)
from vitscope.studies.verdict import ALPHA, EXPECT, Verdict, holm_adjust, to_csv, to_markdown, verdict_rows
from vitscope.studies.zoo import ZOOS, model_spec

_logger = logging.getLogger(__name__)

__all__ = ["list_studies", "load_study", "run_study", "StudyResult", "SCALES", "StudyError"]

SCALES = ("quick", "paper")
_SCALE_KEYS = {"zoo", "data", "data_hint", "recipe", "img_size", "epochs", "batch_size", "seeds", "max_examples",
               "max_val_examples", "eval_examples", "eval_batch_size", "hessian", "frequency", "localization",
               "overrides"}
REGIMES = {"large": "ImageNet", "jft": "ImageNet / JFT", "imagenet224": "ImageNet, 224 px", "small": "small data",
           "any": "any data"}
_LARGE_REGIMES = ("large", "jft", "imagenet224")
_LARGE_DATA = ("imagenet", "imagefolder", "jft")
_TOP_KEYS = {"name", "title", "paper", "description", "conditions", "claims", "scales", "train_probes"}


class StudyError(ValueError):
    """A bad study name, recipe or option; the message names the fix."""


def _study_dir() -> Path:
    return Path(str(resources.files("vitscope") / "studies"))


def list_studies() -> list[str]:
    """Names of the study recipes shipped with vitscope."""
    return sorted(p.stem for p in _study_dir().glob("*.yaml"))


def load_study(name_or_path: str) -> dict[str, Any]:
    """A shipped study (by name) or a study YAML file (by path), validated."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and os.sep not in name_or_path:
        if name_or_path not in list_studies():
            close = difflib.get_close_matches(name_or_path, list_studies(), n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise StudyError(f"unknown study {name_or_path!r}.{hint} Valid studies: {', '.join(list_studies())}")
        path = _study_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist; valid studies: {', '.join(list_studies())}")
    with open(path) as f:
        study = yaml.safe_load(f)
    _validate(study, str(path))
    return study


def _terms(term: Any) -> list[dict[str, Any]]:
    """The leaf ``{model, metric, condition}`` terms of a side."""
    if isinstance(term, dict) and "diff" in term:
        return [t for sub in term["diff"] for t in _terms(sub)]
    if isinstance(term, dict) and "model" in term:
        return [term]
    return []


def _validate(study: Any, where: str) -> None:
    def bad(msg: str) -> StudyError:
        return StudyError(f"{where}: {msg}")

    if not isinstance(study, dict):
        raise bad("a study must be a YAML mapping")
    unknown = set(study) - _TOP_KEYS
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    for key in ("name", "claims", "scales"):
        if key not in study:
            raise bad(f"missing {key!r}")
    conditions = study.setdefault("conditions", {"full": {}})
    for cname, cond in conditions.items():
        if not isinstance(cond, dict) or set(cond) - {"data_fraction", "steps_constant"}:
            raise bad(f"condition {cname!r} may set only data_fraction and steps_constant")
    for scale, opts in study["scales"].items():
        if scale not in SCALES:
            raise bad(f"unknown scale {scale!r}; valid: {SCALES}")
        extra = set(opts) - _SCALE_KEYS
        if extra:
            raise bad(f"scale {scale!r} has unknown keys {sorted(extra)}; valid: {sorted(_SCALE_KEYS)}")
    if not isinstance(study["claims"], list) or not study["claims"]:
        raise bad("claims must be a non-empty list")
    zoo_keys = set(ZOOS["quick"])
    for i, claim in enumerate(study["claims"]):
        for key in ("finding", "claim", "a", "b", "expect"):
            if key not in claim:
                raise bad(f"claim {i} lacks {key!r}")
        if claim["expect"] not in EXPECT:
            raise bad(f"claim {i}: expect must be one of {list(EXPECT)}")
        if claim.get("regime", "any") not in REGIMES:
            raise bad(f"claim {i}: regime must be one of {list(REGIMES)}")
        if not isinstance(claim.get("paired", True), bool):
            raise bad(f"claim {i}: paired must be true or false")
        if not 1 <= int(claim["finding"]) <= 12:
            raise bad(f"claim {i}: finding must be a number 1-12 of METHODS.md's findings")
        for side in ("a", "b"):
            term = claim[side]
            if not (_terms(term) or (isinstance(term, dict) and "value" in term)):
                raise bad(f"claim {i} side {side}: give {{model, metric}}, {{diff: [..]}} or {{value: x}}")
            for t in _terms(term):
                if t["model"] not in zoo_keys:
                    raise bad(f"claim {i}: unknown model {t['model']!r}; valid: {sorted(zoo_keys)}")
                parse_metric(t["metric"])
                if t.get("condition", "full") not in conditions:
                    raise bad(f"claim {i}: unknown condition {t.get('condition')!r}; define it under conditions")


@dataclasses.dataclass
class StudyResult:
    name: str
    verdicts: list[Verdict]
    out_dir: Path
    files: dict[str, Path]
    markdown: str


def _label(term: Any) -> str:
    if isinstance(term, dict) and "diff" in term:
        a, b = term["diff"]
        return f"({_label(a)} - {_label(b)})"
    if isinstance(term, dict) and "value" in term:
        return f"{term['value']:g}"
    cond = term.get("condition", "full")
    return f"{term['metric']}[{term['model']}{'' if cond == 'full' else ', ' + cond}]"


def _paired(claim: dict[str, Any]) -> bool:
    """Whether the seeds pair the two sides: yes when both sides measure the same models (one model's layers or
    its runs on a subset and on all of the data, where seed i fixes the same initial weights), no between
    independent architectures (Welch), unless the claim says ``paired``."""
    if "paired" in claim:
        return bool(claim["paired"])
    models = [{t["model"] for t in _terms(claim[side])} for side in ("a", "b")]
    return not all(models) or models[0] == models[1]


def _threshold(claim: dict[str, Any]) -> bool:
    """Whether one side is a fixed value (a one-sample test), so one seed of two models is not mistaken for it."""
    return any(isinstance(claim[side], dict) and "value" in claim[side] for side in ("a", "b"))


def _regime(claim: dict[str, Any], data: str) -> tuple[str, str]:
    """The claim's data regime and, for a large-data claim measured on a small data set, a note saying so."""
    regime = claim.get("regime", "any")
    large_here = str(data).split(":", 1)[0].lower() in _LARGE_DATA
    note = f"regime differs: measured on {data}" if regime in _LARGE_REGIMES and not large_here else ""
    return REGIMES[regime], note


def _evaluate(term: Any, analyses: dict[tuple[str, str, int], dict[str, Any]], seeds: list[int]) -> list[float]:
    if isinstance(term, dict) and "value" in term:
        return [float(term["value"])]
    if "diff" in term:
        a, b = (_evaluate(t, analyses, seeds) for t in term["diff"])
        if len(b) == 1:
            b = b * len(a)
        return [x - y for x, y in zip(a, b)]
    cond = term.get("condition", "full")
    return [compute_metric(term["metric"], analyses[(term["model"], cond, s)]) for s in seeds]


def _settings(study: dict[str, Any], scale: str, data: str | None, seeds: int | None, epochs: int | None,
              max_examples: int | None, zoo: str | None, batch_size: int | None = None) -> dict[str, Any]:
    if scale not in SCALES:
        raise StudyError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    if scale not in study["scales"]:
        raise StudyError(f"study {study['name']!r} has no {scale!r} scale; it has {list(study['scales'])}")
    s = dict(study["scales"][scale])
    if data:
        s["data"] = data
    if not s.get("data"):
        raise StudyError(f"the {scale} scale of {study['name']!r} needs a data set: pass --data "
                         f"{s.get('data_hint', 'cifar100:PATH')}")
    if seeds is not None:
        if seeds < 1:
            raise StudyError(f"--seeds must be >= 1, got {seeds}")
        s["seeds"] = seeds
    if epochs is not None:
        if epochs < 1:
            raise StudyError(f"--epochs must be >= 1, got {epochs}")
        s["epochs"] = epochs
    if max_examples is not None:
        s["max_examples"] = max_examples
    if batch_size is not None:
        if batch_size < 1:
            raise StudyError(f"--batch-size must be >= 1, got {batch_size}")
        s["batch_size"] = batch_size
    if zoo is not None:
        s["zoo"] = zoo
    s.setdefault("zoo", scale)
    s.setdefault("seeds", 3)
    s.setdefault("recipe", "cpu-quick")
    return s


def _needs(study: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(model, condition) -> what to compute on it."""
    runs: dict[tuple[str, str], set[str]] = {}
    for claim in study["claims"]:
        for side in ("a", "b"):
            for t in _terms(claim[side]):
                key = (t["model"], t.get("condition", "full"))
                runs.setdefault(key, {"eval"}).update(metric_needs(t["metric"]))
    return runs


def _analyze(run_dir: Path, needs: set[str], s: dict[str, Any], progress: bool, device: str = "auto"
             ) -> dict[str, Any]:
    """Every analysis of ``needs`` on the test split (the Hessian on training batches). Each one runs sharded
    (``shard=True``): under torch.distributed rank r takes the global batches r, r + W, ..., the states are
    merged, every example counts once and every rank returns the one-process result."""
    import random

    import numpy as np
    import torch

    from vitscope.data import create_loader, data_info
    from vitscope.distributed import current, rank_device
    from vitscope.training import augment_options, load_run

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_run(run_dir, device=rank_device(torch.device(device), current()))
    eval_bs = s.get("eval_batch_size", 64)
    loader = val_loader(cfg.data, cfg.img_size, eval_bs, s.get("eval_examples"), split="test", seed=cfg.seed)
    out: dict[str, Any] = {"run_dir": str(run_dir), "model": cfg.model}
    out["eval"] = evaluate_classifier(model, loader, cfg.num_classes, shard=True)
    out["world_size"] = out["eval"].pop("world_size")
    out["examples_per_rank"] = out["eval"].pop("examples_per_rank")
    measures = sorted(n.split(":", 1)[1] for n in needs if n.startswith("probe:"))
    if measures:
        out["probe"] = run_probe(model, loader, measures, progress=progress, shard=True).to_dict()
    if "skip_removal" in needs:  # RAGHU: the probe's CKA with the skip of the middle block removed
        out["skip_removal"] = run_skip_cka(model, loader, progress=progress, shard=True)
    if "cbs_scale" in needs:  # CB: the learned CBS scale per block, from the weights
        from vitscope.layers import cbs_scales

        out["cbs_scale"] = [v.tolist() for v in cbs_scales(model)]
    if "train_probes" in needs:
        path = run_dir / "probes.jsonl"
        out["train_probes"] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.is_file() else []
    if "hessian" in needs:
        h = dict(s.get("hessian") or {})
        train = create_loader(cfg.data, "train", batch_size=h.pop("batch_size", 64), img_size=cfg.img_size,
                              augment=augment_options(cfg), seed=cfg.seed, shuffle=True,
                              fraction=cfg.data_fraction, max_examples=cfg.max_examples)
        # HDVW's protocol: the training loss (the run's criterion + its L2 term) on augmented batches (the run's
        # mixup / cutmix), model in eval mode; only converged eigenvalues count (run_hessian)
        from vitscope.training import build_criterion, build_mixup

        h.setdefault("weight_decay", cfg.weight_decay)
        # the augmentation (torch, Python random) and timm's Mixup (numpy) draw from the global generators: seed
        # all three, so the batches do not depend on what ran before (training, rank) and every rank draws alike
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        out["hessian"] = run_hessian(model, train, progress=progress, name=cfg.model, loss_fn=build_criterion(cfg),
                                     transform=build_mixup(cfg), shard=True, **h)
    if "localization" in needs:  # RAGHU's position probe on the first test batches (not sharded: every rank fits it)
        loc = dict(s.get("localization") or {})
        out["localization"] = run_localization(model, loader, max_batches=loc.get("max_batches", 4),
                                               epochs=loc.get("epochs", 30), progress=progress)
    if "frequency" in needs:
        info = data_info(cfg.data, img_size=cfg.img_size)
        pix = val_loader(cfg.data, cfg.img_size, eval_bs, s.get("eval_examples"), normalize=False, split="test",
                         seed=cfg.seed)
        out["robustness"] = run_robustness(model, pix, info.mean, info.std, {"suite": ["frequency"],
                                           **(s.get("frequency") or {})}, progress=progress, name=cfg.model,
                                           shard=True)
        freqs = (s.get("frequency") or {}).get("freqs", [i / 10 for i in range(11)])
        out["frequency_balanced"] = frequency_balanced(model, pix, info.mean, info.std, cfg.num_classes, freqs,
                                                       shard=True)
    return out


def _training_table(evals: list[dict[str, Any]]) -> str:
    """Per model and condition: seeds whose training converged (early stopping on validation NLL) of all."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in evals:
        groups.setdefault((e["model"], e["condition"]), []).append(e["training"])
    lines = ["", "| model | condition | converged (val NLL stopped improving) | epochs trained (best) | best val NLL |",
             "|---|---|---|---|---|"]
    for (model, cond), ts in groups.items():
        conv = [t["converged"] for t in ts]
        conv_txt = "no early stopping" if all(c is None for c in conv) else f"{sum(bool(c) for c in conv)} of {len(ts)}"
        epochs = ", ".join(f"{t['epochs_trained']}/{t['epoch_cap']}"
                           + ("" if t.get("best_epoch") is None else f" ({t['best_epoch'] + 1})") for t in ts)
        nll = ", ".join("n/a" if t["best_val_nll"] is None else f"{t['best_val_nll']:.3g}" for t in ts)
        lines.append(f"| {model} | {cond} | {conv_txt} | {epochs} | {nll} |")
    if any(t.get("early_stop_patience") for ts in groups.values() for t in ts):
        lines.append("\nEpochs count from 1; best: the epoch of the lowest validation NLL, whose weights early "
                     "stopping restores (early_stop_restore_best). Patience counts only after the warm-up, once the "
                     "learning rate has decayed to early_stop_lr_fraction of its peak.")
    return "\n".join(lines) + "\n"


def run_study(
    name: str,
    data: str | None = None,
    scale: str = "quick",
    out: str | os.PathLike = "runs/reproduce",
    seeds: int | None = None,
    epochs: int | None = None,
    max_examples: int | None = None,
    zoo: str | None = None,
    progress: bool = True,
    device: str = "auto",
    batch_size: int | None = None,
    settings: dict[str, Any] | None = None,
) -> StudyResult:
    """Train and measure what study ``name`` needs over ``seeds`` seeds and write its verdict table.

    Training runs go to ``out/runs/`` (shared by studies: a finished run with the same config is reused);
    the study's analyses and ``verdicts.{json,csv,md}`` go to ``out/<study>/``. ``settings`` overrides keys
    of the scale (``eval_examples``, ``hessian``, ``frequency``, ...).

    Under an open torch.distributed group (``torchrun ... -m vitscope reproduce``; every rank calls this):
    every rank trains each run with DDP while rank 0 alone holds its lock and writes it (``train_spec``),
    every analysis is sharded over the ranks (``_analyze``: each example counted once, the one-process
    numbers to float round-off) and rank 0 alone writes the analyses and verdicts (every rank returns them).
    ``verdicts.json`` records ``world_size``.
    """
    from vitscope.distributed import current

    study = load_study(name)
    s = _settings(study, scale, data, seeds, epochs, max_examples, zoo, batch_size)
    for key, value in (settings or {}).items():  # e.g. smaller analyses for smoke tests
        if key not in _SCALE_KEYS:
            raise StudyError(f"unknown study setting {key!r}; valid: {sorted(_SCALE_KEYS)}")
        s[key] = value
    info = current()
    if info.distributed:
        _check_processes(study, s, info.world_size)
    out = Path(out)
    study_dir = out / study["name"]
    timer = Timer()
    seed_list = list(range(int(s["seeds"])))
    needs = _needs(study)
    analyses: dict[tuple[str, str, int], dict[str, Any]] = {}
    evals = []
    _logger.info("study %s (%s scale): %d model/condition pairs x %d seeds on %s", study["name"], scale,
                 len(needs), len(seed_list), s["data"])
    from vitscope.data import steps_constant_epochs

    for seed in seed_list:
        for (key, cond), need in needs.items():
            c = study["conditions"][cond]
            fraction = c.get("data_fraction")
            req = TrainRequest(model_spec(s["zoo"], key), s["data"], recipe=s["recipe"], seed=seed,
                               img_size=s.get("img_size"), epochs=s.get("epochs"), batch_size=s.get("batch_size"),
                               data_fraction=fraction, max_examples=s.get("max_examples"),
                               max_val_examples=s.get("max_val_examples"), overrides=dict(s.get("overrides") or {}),
                               device=device, progress=progress)
            if fraction and c.get("steps_constant", True):
                base = req.config().epochs
                req.epochs = steps_constant_epochs(base, fraction)  # ConViT: same number of steps as full data
            probes = (study.get("train_probes") or {}).get(key)
            if probes:
                req.probes = {"every": 1, "measures": list(probes), "num_images": 32}
            with timer.stage(f"train {key}/{cond}/seed {seed}"):
                run_dir = train_spec(req, out / "runs")
            with timer.stage(f"analyze {key}/{cond}/seed {seed}"):
                a = _analyze(run_dir, need, s, progress, device)
            a["training"] = training_summary(run_dir)
            if info.is_main:
                atomic_write_json(study_dir / "analysis" / f"{run_dir.name}.json", json_safe(a))
            analyses[(key, cond, seed)] = a
            evals.append({"model": key, "condition": cond, "seed": seed, "run_dir": str(run_dir), **a["eval"],
                          "training": a["training"]})

    verdicts = []
    for claim in study["claims"]:
        a_vals = _evaluate(claim["a"], analyses, seed_list)
        b_vals = _evaluate(claim["b"], analyses, seed_list)
        regime, note = _regime(claim, s["data"])
        verdicts.append(Verdict.build(study["name"], int(claim["finding"]), claim["claim"], _label(claim["a"]),
                                      _label(claim["b"]), claim["expect"], a_vals, b_vals, regime, note,
                                      paired=_paired(claim), threshold=_threshold(claim)))
    holm_adjust(verdicts)
    title = f"{study['name']}: {study.get('title', '')} ({study.get('paper', '')}; {scale} scale, {s['data']})"
    md = to_markdown(verdicts, title) + _training_table(evals)
    payload = {
        "study": study["name"], "title": study.get("title"), "paper": study.get("paper"), "scale": scale,
        "settings": s, "seeds": seed_list, "world_size": info.world_size, "verdicts": [v.to_dict() for v in verdicts],
        "table": verdict_rows(verdicts), "evaluations": evals, "timing_s": timer.seconds,
        "verdict_rule": f"paired t test of a - b over seeds where the seeds pair (one model; one-sample against a "
                        f"fixed value), Welch's t between independent architectures; the exact sign-flip / "
                        f"permutation p beside it, deciding alone when the values have no spread; two-sided, "
                        f"Holm-corrected over the study's claims at alpha = {ALPHA}: held / did not hold when "
                        "significant in / against the paper's direction, else inconclusive (with the interval at "
                        "the level Holm tested the claim at, the direction of the measured effect and the seeds an "
                        "effect of that size would need at Holm's strictest level); a claim of no change (expect "
                        "equal) is two-sided: did not hold when significant, else inconclusive, never held",
    }
    files = {k: study_dir / f"verdicts.{k}" for k in ("json", "csv", "md")}
    if info.is_main:  # torchrun: every rank holds the same verdicts; rank 0 alone writes them
        atomic_write_json(files["json"], json_safe(payload))
        atomic_write_text(files["csv"], to_csv(verdicts))
        atomic_write_text(files["md"], md)
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()  # the files exist when any rank returns
    return StudyResult(study["name"], verdicts, study_dir, files, md)


def _check_processes(study: dict[str, Any], s: dict[str, Any], world_size: int) -> None:
    """Under torchrun, before any run is trained: the training batch must split evenly over the ranks (DDP) and
    the probe needs a test batch per rank."""
    model = next(iter(_needs(study)))[0]
    bs = TrainRequest(model_spec(s["zoo"], model), s["data"], recipe=s["recipe"], batch_size=s.get("batch_size"),
                      overrides=dict(s.get("overrides") or {})).config().batch_size
    if bs % world_size:
        raise StudyError(f"the training batch ({bs}) is split over the {world_size} processes: pass a --batch-size "
                         f"that is a multiple of {world_size}")
    if not any(n.startswith("probe:") for need in _needs(study).values() for n in need):
        return
    eval_bs = s.get("eval_batch_size", 64)
    n = len(val_loader(s["data"], s.get("img_size"), eval_bs, s.get("eval_examples"), split="test"))
    if n < world_size:
        raise StudyError(f"the test split gives {n} batch(es) of {eval_bs} for {world_size} processes; the probe "
                         f"needs one per process: use --nproc_per_node {n} or fewer")
