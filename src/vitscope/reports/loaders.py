"""Read vitscope output directories into plain data (dicts and lists) for the report.

A directory may hold any mix of:

- ``results.json`` (+ ``meta.json``): ``vitscope probe`` / ``ProbeResult.save``; top-level keys are measure
  names, each ``{"rows": [...], ...extras}`` (``cka`` adds ``layers`` and ``matrix``; a ``cka_cross`` entry
  with ``layers``, ``other_layers``, ``matrix`` and ``other_model`` is shown as a cross-model heatmap).
  ``vitscope robustness`` also writes ``results.json`` (``{"meta", "n", "clean", "calibration", ...}``), and a
  ``results.json`` holding ``eigenvalues``/``density`` or ``x``/``loss`` is read as a Hessian or landscape
  output: the content decides;
- ``metrics.jsonl``, ``probes.jsonl``, ``config.yaml``: a ``vitscope train`` run;
- ``hessian.json``: ``vitscope hessian`` (eigenvalues per batch and/or a spectral density);
- ``landscape.json``: ``vitscope landscape`` (a 1-D curve or a 2-D grid of losses);
- ``robustness.json``: ``vitscope robustness`` (the dict of ``evaluate_robustness``);
- ``attention.npz``: ``vitscope attention`` (attention on images and the embedding figures' arrays, read
  with ``allow_pickle=False``).

Loaders are tolerant of missing optional fields and strict (``ValueError`` naming the file and the field)
about the fields a figure needs. Nothing is executed: JSON, JSON lines and ``yaml.safe_load`` only.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_logger = logging.getLogger(__name__)

__all__ = ["RunData", "load_run", "load_runs", "EXPECTED_FILES", "ReportInputError"]

PROBE_FILE = "results.json"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
PROBES_FILE = "probes.jsonl"
CONFIG_FILE = "config.yaml"
HESSIAN_FILE = "hessian.json"
LANDSCAPE_FILE = "landscape.json"
ROBUSTNESS_FILE = "robustness.json"
ATTENTION_FILE = "attention.npz"

EXPECTED_FILES = {
    PROBE_FILE: "vitscope probe or vitscope robustness output",
    METRICS_FILE: "vitscope train run (with probes.jsonl, config.yaml)",
    PROBES_FILE: "probes over training (vitscope train)",
    HESSIAN_FILE: "vitscope hessian output",
    LANDSCAPE_FILE: "vitscope landscape output",
    ROBUSTNESS_FILE: "vitscope robustness output",
    ATTENTION_FILE: "vitscope attention output (attention on images)",
}

# Per-layer measures of results.json and the row fields each needs.
LAYER_MEASURES: dict[str, tuple[str, ...]] = {
    "attention_entropy": ("block", "value"),
    "attention_distance": ("block", "value"),
    "nonlocality": ("block", "value"),
    "relative_distance": ("block", "value"),
    "gpsa_gates": ("block", "value"),
    "ratio_of_norms": ("block", "kind"),
    "fourier": ("normalized_depth", "kind", "value"),
    "feature_variance": ("normalized_depth", "kind", "value"),
    "lesion": ("name", "kind", "accuracy_drop"),
    "localization": ("name", "block", "accuracy"),
    "cka": (),
    "cka_cross": (),
    "linear_probe": ("model", "layer", "normalized_depth", "readout", "shots", "accuracy"),
}


NUMERIC_FIELDS = ("block", "normalized_depth", "value", "heads", "curve", "cls", "spatial", "max_entropy", "accuracy",
                  "accuracy_drop", "chance", "train_accuracy")


class ReportInputError(ValueError):
    """An output directory or file the report cannot use; the message names it and the fix."""


@dataclass
class RunData:
    """Everything the report found in one output directory, as plain data."""

    path: Path
    name: str
    meta: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, dict[str, Any]] = field(default_factory=dict)  # measure -> {"rows": [...], extras}
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records
    train_probes: list[dict[str, Any]] = field(default_factory=list)  # probes.jsonl records
    config: dict[str, Any] = field(default_factory=dict)
    hessian: dict[str, Any] | None = None
    landscape: dict[str, Any] | None = None
    robustness: dict[str, Any] | None = None
    attention: Any = None  # vitscope.probing.attention_images.AttentionMaps of attention.npz
    files: list[str] = field(default_factory=list)  # recognized files, for the report
    sources: list[tuple[Path, list[str]]] = field(default_factory=list)  # (directory, its files), merged runs
    origin: dict[str, Path] = field(default_factory=dict)  # data field -> the directory it came from

    def identity(self) -> str | None:
        """The weights this output describes (a training run's model.safetensors or the --checkpoint given to
        probe/robustness/hessian/landscape), or None when unknown."""
        if self.metrics or self.train_probes or self.config:
            return str((self.path / "model.safetensors").resolve())
        for d in (self.meta, self.hessian or {}, self.landscape or {}, self.robustness or {}):
            ck = d.get("checkpoint")
            if isinstance(ck, str) and ck:
                p = Path(ck)
                if p.parent.parent.name == "checkpoints" and p.parent.name.startswith("epoch-"):
                    p = p.parent.parent.parent  # RUN/checkpoints/epoch-N/model.safetensors: the run's weights
                return str((p / "model.safetensors" if p.is_dir() else p).resolve())
        return None


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ReportInputError(f"{path} is not valid JSON ({e}); re-create it with the vitscope command") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON-object lines; a torn last line (a run killed while writing) is skipped with a warning."""
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                _logger.warning("skipping a torn last line in %s", path)
                continue
            raise ReportInputError(f"{path} line {i + 1} is not valid JSON; re-create the file") from None
        if not isinstance(rec, dict):
            raise ReportInputError(f"{path} line {i + 1} is not a JSON object")
        records.append(rec)
    return records


def _need(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ReportInputError(f"{where} lacks field(s) {missing}; re-create it with a current vitscope")


def _numbers(values: Any, where: str) -> list[float | None]:
    """A flat list of floats (None kept for missing / non-finite values)."""
    if not isinstance(values, (list, tuple)):
        raise ReportInputError(f"{where} must be a list of numbers, got {type(values).__name__}")
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v) if math.isfinite(v) else None)
        else:
            raise ReportInputError(f"{where} must hold numbers, found {v!r}")
    return out


def _load_probe(path: Path, data: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise ReportInputError(f"{path} must be a JSON object of measure names (vitscope probe output)")
    out = {}
    for name, content in data.items():
        where = f"{path} [{name!r}]"
        if not isinstance(content, dict) or not isinstance(content.get("rows"), list):
            raise ReportInputError(f"{where} must be an object with a 'rows' list (vitscope probe output)")
        if name not in LAYER_MEASURES:
            _logger.warning("%s: measure %r has no figure in this report; skipped", path, name)
            continue
        for i, row in enumerate(content["rows"]):
            if not isinstance(row, dict):
                raise ReportInputError(f"{where} row {i} is not an object")
            _need(row, LAYER_MEASURES[name], f"{where} row {i}")
            for key in NUMERIC_FIELDS:
                if key in row:
                    v = row[key]
                    _numbers(v if isinstance(v, list) else [v], f"{where} row {i} field {key!r}")
        if name in ("cka", "cka_cross"):
            keys = ("layers", "matrix") + (("other_layers",) if name == "cka_cross" else ())
            _need(content, keys, where)
            rows_n = len(content["layers"])
            cols_n = len(content.get("other_layers", content["layers"]))
            mat = content["matrix"]
            if not isinstance(mat, list) or len(mat) != rows_n or any(
                    not isinstance(r, list) or len(r) != cols_n for r in mat):
                raise ReportInputError(f"{where} 'matrix' must be {rows_n} x {cols_n} (layers x other layers)")
            content = {**content, "matrix": [_numbers(r, f"{where} matrix") for r in mat]}
        out[name] = content
    return out


def _hessian_group(d: dict[str, Any], where: str) -> dict[str, Any]:
    """One spectrum: ``eigenvalues`` (flat or per batch) and/or a density (``density: {"grid", "density"}``
    with optional SLQ ``nodes``/``weights``, or top-level ``grid`` and ``density`` lists)."""
    out: dict[str, Any] = {}
    eig = d.get("eigenvalues")
    if eig is None and isinstance(d.get("batches"), list):
        eig = [b.get("eigenvalues", []) for b in d["batches"] if isinstance(b, dict)]
    if eig is not None:
        if not isinstance(eig, list):
            raise ReportInputError(f"{where} 'eigenvalues' must be a list (per batch) of numbers")
        flat = [x for e in eig for x in (e if isinstance(e, list) else [e])]
        vals = [v for v in _numbers(flat, f"{where} 'eigenvalues'") if v is not None]
        if not vals:
            raise ReportInputError(f"{where} has an empty 'eigenvalues' list; re-run vitscope hessian")
        out["eigenvalues"] = vals
    dens = d.get("density")
    if isinstance(dens, list) and isinstance(d.get("grid"), list):
        dens = {"grid": d["grid"], "density": dens}
    if isinstance(dens, dict):
        grid = dens.get("grid", dens.get("x"))
        y = dens.get("density", dens.get("y"))
        if not isinstance(grid, list) or not isinstance(y, list) or len(grid) != len(y):
            raise ReportInputError(f"{where} 'density' needs equal-length 'grid' and 'density' lists")
        out["density"] = {"grid": _numbers(grid, f"{where} density grid"), "density": _numbers(y, f"{where} density")}
        nodes, weights = dens.get("nodes"), dens.get("weights")
        if isinstance(nodes, list) and isinstance(weights, list) and len(nodes) == len(weights) and all(
                isinstance(t, list) and isinstance(w, list) and len(t) == len(w) for t, w in zip(nodes, weights)):
            out["density"]["nodes"] = [_numbers(t, f"{where} density nodes") for t in nodes]
            out["density"]["weights"] = [_numbers(w, f"{where} density weights") for w in weights]
    if not out:
        raise ReportInputError(f"{where} has neither 'eigenvalues' nor 'density'; re-run vitscope hessian")
    return out


def _load_hessian(path: Path, data: Any) -> dict[str, Any]:
    """``vitscope hessian`` output: ``groups: {name: {"eigenvalues": [[per batch]], "grid", "density"}}`` plus
    ``run`` (model, checkpoint ...); or one spectrum at the top level (see ``_hessian_group``).

    Returns ``{"groups": {name: spectrum}, "model", "checkpoint"}``."""
    if not isinstance(data, dict):
        raise ReportInputError(f"{path} must be a JSON object (vitscope hessian output)")
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    if isinstance(data.get("groups"), dict) and data["groups"]:
        groups = {str(g): _hessian_group(d if isinstance(d, dict) else {}, f"{path} group {g!r}")
                  for g, d in data["groups"].items()}
    else:
        groups = {"all": _hessian_group(data, str(path))}
    out = {"groups": groups}
    for key in ("model", "checkpoint"):
        if isinstance(run.get(key) or data.get(key), str):
            out[key] = run.get(key) or data.get(key)
    return out


def _load_landscape(path: Path, data: Any) -> dict[str, Any]:
    """``x`` (alias ``alphas``/``coords``), optional ``y`` (``betas``), ``loss`` (1-D over x or 2-D [y][x])."""
    if not isinstance(data, dict):
        raise ReportInputError(f"{path} must be a JSON object (vitscope landscape output)")
    x = next((data[k] for k in ("x", "alphas", "coords") if k in data), None)
    y = next((data[k] for k in ("y", "betas") if k in data), None)
    loss = data.get("loss", data.get("losses"))
    if x is None or loss is None:
        raise ReportInputError(f"{path} needs 'x' (or 'alphas') and 'loss'; re-run vitscope landscape")
    out = {k: v for k, v in data.items() if k not in ("x", "y", "alphas", "betas", "coords", "loss", "losses")}
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    for key in ("model", "checkpoint"):
        if isinstance(run.get(key) or data.get(key), str):
            out[key] = run.get(key) or data.get(key)
    out["x"] = _numbers(x, f"{path} 'x'")
    if y is None or (isinstance(loss, list) and loss and not isinstance(loss[0], list)):
        out["loss"] = _numbers(loss, f"{path} 'loss'")
        if len(out["loss"]) != len(out["x"]):
            raise ReportInputError(f"{path}: 'loss' has {len(out['loss'])} values for {len(out['x'])} x values")
    else:
        out["y"] = _numbers(y, f"{path} 'y'")
        if not isinstance(loss, list) or len(loss) != len(out["y"]) or any(
                not isinstance(r, list) or len(r) != len(out["x"]) for r in loss):
            raise ReportInputError(f"{path}: 'loss' must be a {len(out['y'])} x {len(out['x'])} grid "
                                   "(y rows, x columns)")
        out["loss"] = [_numbers(r, f"{path} 'loss'") for r in loss]
    return out


def _load_robustness(path: Path, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ReportInputError(f"{path} must be a JSON object (vitscope robustness output)")
    known = ("clean", "calibration", "occlusion", "fgsm", "pgd", "frequency", "corruptions")
    if not any(k in data for k in known):
        raise ReportInputError(f"{path} holds none of {list(known)}; re-run vitscope robustness")
    if "calibration" in data:
        _need(data["calibration"], ("reliability", "ece"), f"{path} ['calibration']")
        for i, b in enumerate(data["calibration"]["reliability"]):
            _need(b, ("lower", "upper", "count", "accuracy", "confidence"), f"{path} reliability bin {i}")
    for k in ("fgsm", "pgd"):
        if k in data:
            _need(data[k], ("eps", "accuracy"), f"{path} [{k!r}]")
    if "frequency" in data:
        _need(data["frequency"], ("freqs", "accuracy"), f"{path} ['frequency']")
    if "corruptions" in data:
        _need(data["corruptions"], ("severities", "accuracy"), f"{path} ['corruptions']")
    return data


def _results_kind(data: Any) -> str:
    """Which command wrote a ``results.json``: probe (measure tables), robustness, hessian or landscape."""
    if not isinstance(data, dict):
        return "probe"
    if isinstance(data.get("clean"), dict):
        return "robustness"
    if any(isinstance(v, dict) and "rows" in v for v in data.values()):
        return "probe"
    if any(k in data for k in ("eigenvalues", "density", "batches", "groups")):
        return "hessian"
    if ("loss" in data or "losses" in data) and any(k in data for k in ("x", "alphas", "coords")):
        return "landscape"
    return "probe"


def _model_name(meta: dict[str, Any], config: dict[str, Any], extra: list[dict[str, Any] | None], path: Path) -> str:
    """The model's name: CLI name in meta.json, then config.yaml's model, then any output's ``model``."""
    for src in (meta.get("model_name"), config.get("model"), *(d.get("model") for d in extra if d),
                meta.get("model")):
        if isinstance(src, str) and src:
            return src
    return path.resolve().name


def _nearby_runs(path: Path) -> list[str]:
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []:
        if any((sub / f).is_file() for f in EXPECTED_FILES):
            found.append(str(sub))
    return found


def load_run(path: str | os.PathLike) -> RunData:
    """Read every recognized vitscope output in directory ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ReportInputError: nothing recognizable in it (the message lists the expected files), or a file
            lacks a field the report needs.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass vitscope output directories (probe, train, "
                                "hessian, landscape or robustness --out)")
    from vitscope.io.atomic import INCOMPLETE_MARKER

    if (path / INCOMPLETE_MARKER).exists():
        raise ReportInputError(f"{path} is incomplete: a vitscope command was stopped while moving its files in "
                               f"({INCOMPLETE_MARKER} is there); run that command again")
    present = [f for f in EXPECTED_FILES if (path / f).is_file()]
    if not present:
        hint = _nearby_runs(path)
        listing = ", ".join(f"{f} ({what})" for f, what in EXPECTED_FILES.items())
        more = f"; its subdirectories {hint} do: pass those instead" if hint else ""
        raise ReportInputError(f"{path} holds no vitscope output; expected at least one of: {listing}{more}")
    meta = _read_json(path / META_FILE) if (path / META_FILE).is_file() else {}
    config: dict[str, Any] = {}
    if (path / CONFIG_FILE).is_file():
        with open(path / CONFIG_FILE) as f:
            try:
                config = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ReportInputError(f"{path / CONFIG_FILE} is not valid YAML ({e})") from None
        if not isinstance(config, dict):
            raise ReportInputError(f"{path / CONFIG_FILE} must be a YAML mapping of config keys")
    run = RunData(path=path, name="", meta=meta if isinstance(meta, dict) else {}, config=config,
                  files=[f for f in (*EXPECTED_FILES, META_FILE, CONFIG_FILE) if (path / f).is_file()])
    if PROBE_FILE in present:
        data = _read_json(path / PROBE_FILE)
        kind = _results_kind(data)
        if kind == "robustness":
            run.robustness = _load_robustness(path / PROBE_FILE, data)
            if isinstance(data.get("meta"), dict):
                run.meta = {**data["meta"], **run.meta}
        elif kind == "hessian":
            run.hessian = _load_hessian(path / PROBE_FILE, data)
        elif kind == "landscape":
            run.landscape = _load_landscape(path / PROBE_FILE, data)
        else:
            run.probe = _load_probe(path / PROBE_FILE, data)
    if METRICS_FILE in present:
        run.metrics = [r for r in _read_jsonl(path / METRICS_FILE) if "epoch" in r]
    if PROBES_FILE in present:
        run.train_probes = _read_jsonl(path / PROBES_FILE)
        for i, rec in enumerate(run.train_probes):
            where = f"{path / PROBES_FILE} line {i + 1}"
            _need(rec, ("epoch", "measure", "layers", "values"), where)
            if not isinstance(rec["layers"], list) or not isinstance(rec["values"], list) or \
                    len(rec["layers"]) != len(rec["values"]):
                raise ReportInputError(f"{where}: 'layers' and 'values' must be lists of equal length")
            for v in rec["values"]:
                _numbers(v if isinstance(v, list) else [v], f"{where} 'values'")
    if HESSIAN_FILE in present:
        run.hessian = _load_hessian(path / HESSIAN_FILE, _read_json(path / HESSIAN_FILE))
    if LANDSCAPE_FILE in present:
        run.landscape = _load_landscape(path / LANDSCAPE_FILE, _read_json(path / LANDSCAPE_FILE))
    if ROBUSTNESS_FILE in present:
        run.robustness = _load_robustness(path / ROBUSTNESS_FILE, _read_json(path / ROBUSTNESS_FILE))
    if ATTENTION_FILE in present:
        from vitscope.probing.attention_images import load_attention_maps

        try:
            run.attention = load_attention_maps(path / ATTENTION_FILE)
        except ValueError as e:
            raise ReportInputError(str(e)) from None
        if not run.meta:  # an attention-only directory: its model and checkpoint name the section
            run.meta = {k: run.attention.meta[k] for k in ("model_name", "model", "checkpoint")
                        if k in run.attention.meta}
    if not (run.probe or run.metrics or run.train_probes or run.hessian or run.landscape or run.robustness
            or run.attention):
        raise ReportInputError(f"{path} has {present} but no data in them (empty files?); re-run the vitscope command")
    run.name = _model_name(run.meta, run.config, [run.hessian, run.landscape, run.robustness], path)
    run.sources = [(path, list(run.files))]
    run.origin = {k: path for k in DATA_FIELDS if getattr(run, k)}
    return run


DATA_FIELDS = ("probe", "metrics", "train_probes", "hessian", "landscape", "robustness", "attention")


def merge_runs(runs: list[RunData]) -> list[RunData]:
    """Merge directories that describe the same weights (same model name and checkpoint, e.g. a training run
    and the probe / robustness outputs of its ``model.safetensors``) into one, when their data do not overlap."""
    out: list[RunData] = []
    for run in runs:
        key = run.identity()
        target = next((o for o in out if key is not None and o.name == run.name and o.identity() == key
                       and not any(getattr(o, f) and getattr(run, f) for f in DATA_FIELDS)), None)
        if target is None:
            out.append(run)
            continue
        for f in DATA_FIELDS:
            if getattr(run, f):
                setattr(target, f, getattr(run, f))
                target.origin[f] = run.path
        target.meta = {**run.meta, **target.meta}
        target.config = target.config or run.config
        target.sources += run.sources
        target.files += [f for f in run.files if f not in target.files]
        _logger.info("%s: merged %s into the section of %s (same model and checkpoint)", run.name, run.path,
                     target.path)
    return out


def load_runs(paths: list[str | os.PathLike]) -> list[RunData]:
    """``load_run`` for each path, merged per model and checkpoint (``merge_runs``); different models with the
    same name get the directory name appended."""
    if not paths:
        raise ReportInputError("no output directory given; pass one or more vitscope output directories")
    runs = merge_runs([load_run(p) for p in paths])
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.resolve().name})"
    seen: dict[str, int] = {}
    for r in runs:  # still equal (same model, same directory name): number them
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} #{seen[r.name]}"
    return runs
