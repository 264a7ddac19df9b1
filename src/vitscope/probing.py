"""``vitscope.probe``: every forward measure of the papers in one pass over a data loader.

One capture per batch feeds all requested measures (RAGHU's CKA and ratio of norms, HDVW's Fourier
log amplitude and feature variance, the attention measures of ViT/RAGHU, ConViT and CB). Every measure
keeps additive states, so memory does not grow with the number of examples and ranks merge by summing.

Cost: each sub-layer's residual-stream record is reduced as the forward produces it (scanned for NaN/Inf
once, converted to float64 once for Fourier and variance; CKA Grams of float32 activations by a float32
matmul after centring over the batch, within ~1e-8 of float64) and then dropped, so a batch's activations
are never all held; attention maps are checked once per batch and read by the four attention measures
without re-checking (``validate=False``). No value is read on the host within the pass: the checks are 0-d
device flags (``_DeviceChecks``) read every 64 batches and at the end, raising the first failure with its batch
and layer (so a bad batch is reported up to 64 batches later, not at once); on a GPU the queue does not drain
after every sub-layer. Fourier and variance stay float64 on a GPU too: their reductions are memory-bound (the
DFT is a (2F, S) matrix times the tokens, ~0.5 GFLOP per ViT-B/16 record at batch 128), so float64 costs the
bytes of one float64 copy per record (~9 GB a batch, ~2 ms at H200 bandwidth, ~2% of the forward), while float32
DFT coefficients would lose digits at high frequencies under the large offsets trained ViTs carry.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitscope import measures as M
from vitscope.capture import Capture, LayerInfo, capture
from vitscope.capture._sites import find_blocks, is_attention_module
from vitscope.distributed import all_gather_objects, all_reduce_sum, global_batch_count, shard_batches
from vitscope.distributed import current as dist_current
from vitscope.io.atomic import atomic_write_json, json_safe, write_csv
from vitscope.measures._validate import check_attention, raise_non_finite
from vitscope.measures.cka import linear_gram
from vitscope.runtime import keep_freed_memory, model_device

_logger = logging.getLogger(__name__)


def _normalized_depth(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 0.0


def _layer_row(info: LayerInfo, i: int, n: int) -> dict[str, Any]:
    return {"layer": info.name, "kind": info.kind, "block": info.block, "depth": i,
            "normalized_depth": round(_normalized_depth(i, n), 6)}


def _heads(values: torch.Tensor) -> dict[str, Any]:
    v = values.flatten().tolist()  # one read per layer (not one per head)
    return {"value": sum(v) / len(v), "heads": v}


class _DeviceChecks:
    """The probe's checks (NaN/Inf, probability rows, zero norms), kept on the model's device and read once.

    Each check is a 0-d bool tensor (True: failed) with the message it raises; ``end_batch`` folds a batch's
    checks into the first failure so far (device scalars, constant memory), and ``raise_first`` reads them with
    one device-to-host transfer for the whole pass. On a GPU a check read per tensor (``if not finite(t)``) would
    wait for the queue to drain several times per sub-layer and expose the kernel-launch latency in between;
    here no value crosses to the host within the pass. Messages hold ``{b}`` for the batch number.
    """

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.messages: list[tuple[str, str]] = []  # (kind, template): kind "non_finite" or "value"
        self.layouts: list[tuple[int, list[tuple[str, str]]]] = []  # (first batch, messages) when they change
        self.first: torch.Tensor | None = None  # (3,) int64: found, batch, index into that batch's messages
        self.warn: dict[str, torch.Tensor] = {}  # warning -> device bool (raised in any batch)

    def fail_if(self, flag: torch.Tensor, template: str, kind: str = "value") -> None:
        self.flags.append(flag)
        self.messages.append((kind, template))

    def non_finite_if(self, flag: torch.Tensor, template: str) -> None:
        self.fail_if(flag, template, "non_finite")

    def warn_if(self, flag: torch.Tensor, message: str) -> None:
        self.warn[message] = flag if message not in self.warn else self.warn[message] | flag

    def end_batch(self, b: int) -> None:
        if not self.flags:
            return
        if not self.layouts or self.layouts[-1][1] != self.messages:
            self.layouts.append((b, self.messages))
        bad = torch.stack(self.flags)  # (K,) bool
        now = torch.stack([bad.any().long(), torch.full_like(bad, b, dtype=torch.long)[0],
                           bad.to(torch.uint8).argmax().long()])  # (3,) found, batch, first index
        self.first = now if self.first is None else torch.where(self.first[0].bool(), self.first, now)
        self.flags, self.messages = [], []

    def raise_failed(self) -> None:
        """Raise the first failed check so far, if any (one host sync): called every ``_CHECK_EVERY`` batches, so
        a long pass over bad data stops early."""
        if self.first is not None:
            found, b, k = self.first.tolist()
            if found:
                self._raise(b, k)

    def _raise(self, b: int, k: int) -> None:
        kind, template = next(m for first, m in reversed(self.layouts) if first <= b)[k]
        message = template.replace("{b}", str(b))
        if kind == "non_finite":
            raise_non_finite(message)
        raise ValueError(message)

    def raise_first(self) -> None:
        """Raise the first failed check (in pass order); emit the warnings that fired. One host sync."""
        warn = list(self.warn)
        parts = [self.first.cpu()] if self.first is not None else []
        if warn:
            parts.append(torch.stack([self.warn[w] for w in warn]).long().cpu())
        if not parts:
            return
        values = torch.cat([p.flatten() for p in parts]).tolist()
        if self.first is not None:
            found, b, k = values[:3]
            values = values[3:]
            if found:
                self._raise(b, k)
        for message, fired in zip(warn, values):
            if fired:
                warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of probe


_CHECK_EVERY = 64  # batches between reads of the checks (one host sync each), so that bad data stops a long pass


def _check_attentions(cap: Capture, checks: _DeviceChecks) -> None:
    """Check every captured attention map once (finite, rows are probabilities), so the four attention
    measures can skip their own scans (``validate=False``): the checks stay on the device (``_DeviceChecks``),
    and maps are clamped at 0 in place (a no-op for softmax outputs; round-off below 0, as ``check_attention``).
    """
    for i, (attn, info) in enumerate(zip(cap.attentions, cap.attention_layout)):
        name = f"batch {{b}}: the attention map of {info.name}"
        a = check_attention(attn, name, validate=False)  # (B, H, N, N); half precision upcast
        tol = 1e-3 if a.dtype in (torch.float32, torch.float64) else 1e-2
        rows = a.sum(-1)  # (B, H, N); NaN/Inf anywhere in a row shows here
        checks.non_finite_if(~torch.isfinite(rows).all(), name)
        dev, low = (rows - 1).abs().amax(), a.amin()
        checks.fail_if((dev > tol) | (low < -tol),
                       f"{name} rows must be probabilities summing to 1 (max deviation above {tol:g} or an entry "
                       f"below {-tol:g}); pass post-softmax attention maps, not logits")
        # in place (the forward is done with the map; no new memory) unless the map is not a plain dense tensor
        cap.attentions[i] = a.clamp_min_(0) if a is not attn or a.is_contiguous() else a.clamp_min(0)


_NOT_SPLIT = ("a block vitscope does not split as z + f(z) (its residual structure is not in capture's table: "
              "layer scale, parallel branches, post-norm or no skip path), so it has no ratio of norms")
_NO_POSITIONS = {
    "channel": "channel attention (XCiT's cross-covariance attention): it attends over channels, not positions",
    "pooled": "keys pooled or spatially reduced (fewer keys than queries): key positions not modelled",
    "mixed": "talking-heads attention (CaiT): maps mixed across heads after the softmax, rows are no distributions",
    "other": "attention map of a shape whose query and key positions vitscope does not know",
}


def _keep_positional(cap: Capture, skipped: dict[str, str]) -> None:
    """Keep the attention maps whose queries and keys sit on a known grid (``LayerInfo.has_positions``): the
    attention measures (entropy over positions, distance, nonlocality) mean nothing on the others, which are
    named in ``skipped`` with the reason."""
    keep = [i for i, info in enumerate(cap.attention_layout) if info.has_positions]
    for info in cap.attention_layout:
        if not info.has_positions:
            skipped.setdefault(info.name, _NO_POSITIONS.get(info.kind, _NO_POSITIONS["other"]))
    cap.attentions[:] = [cap.attentions[i] for i in keep]
    cap.attention_layout[:] = [cap.attention_layout[i] for i in keep]


def _not_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool on t's device: whether t holds a NaN or Inf (min and max of one pass: NaN propagates, an Inf
    is the min or the max; exact, unlike a sum, which large finite values can overflow)."""
    low, high = torch.aminmax(t)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def _same(t: torch.Tensor) -> tuple:
    """What identifies a captured tensor's values (detached copies of one tensor are distinct objects)."""
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


class _RecordFeeder:
    """Called with each sub-layer record of one batch: scans its tensors once (finite values; the input is
    skipped when it is the previous record's output, already scanned), converts the output to float64 once
    for every adapter that reads it so, and hands the record to the stream adapters."""

    def __init__(self, adapters: list[Any], checks: _DeviceChecks) -> None:
        self.adapters, self.checks = adapters, checks
        self.need64 = any(a.needs_float64 for a in adapters)
        self.last: torch.Tensor | None = None  # held so that its memory cannot be reused by a later tensor

    def __call__(self, rec: Any) -> None:
        seen = {_same(self.last)} if self.last is not None else set()
        for what, t in (("input", rec.z_in), ("skip-path output", rec.shortcut), ("branch output", rec.branch),
                        ("output", rec.z_out)):
            if t is None:  # not x + f(x) (the stem, a block vitscope cannot split): no skip path or branch
                continue
            key = _same(t)
            if key in seen:
                continue
            seen.add(key)
            self.checks.non_finite_if(_not_finite(t), f"batch {{b}}: the {what} of sub-layer {rec.info.name}")
        self.last = rec.z_out
        z64 = rec.z_out.to(torch.float64) if self.need64 else None
        for a in self.adapters:
            a.add(rec, z64, self.checks)


class _ProbeMeasure:
    """Adapter from one capture to one streaming measure, and from its result to table rows."""

    needs_attention = False
    needs_streams = False
    static = False  # computed from the weights, not from forward passes

    def __init__(self) -> None:
        self.layout: list[LayerInfo] | None = None

    def update(self, cap: Capture) -> None:
        raise NotImplementedError

    def streaming(self) -> list[M.StreamingMeasure]:
        raise NotImplementedError

    def rows(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def extra(self) -> dict[str, Any]:
        return {}


class _AttentionProbe(_ProbeMeasure):
    needs_attention = True
    measure_cls: type = M.AttentionEntropy

    def __init__(self) -> None:
        super().__init__()
        self.measure = self.measure_cls()

    def update(self, cap: Capture) -> None:
        self.layout = list(cap.attention_layout)
        if self.layout:
            self.measure.update(cap.attentions, cap.attention_layout, validate=False)

    def streaming(self) -> list[M.StreamingMeasure]:
        return [self.measure]

    def rows(self) -> list[dict[str, Any]]:
        if not self.layout:
            return []  # no map with known positions (see the probe's meta "not_applicable")
        values = self.measure.compute()
        n = len(values)
        return [{**_layer_row(info, i, n), **_heads(v)} for i, (info, v) in enumerate(zip(self.layout, values))]


class _Entropy(_AttentionProbe):
    measure_cls = M.AttentionEntropy

    def __init__(self) -> None:
        super().__init__()
        self.num_tokens: list[int] = []

    def update(self, cap: Capture) -> None:
        super().update(cap)
        self.num_tokens = [int(a.shape[-1]) for a in cap.attentions]

    def rows(self) -> list[dict[str, Any]]:
        rows = super().rows()
        for row, n in zip(rows, self.num_tokens):
            row["max_entropy"] = math.log(n)  # uniform attention over N keys: ln N
        return rows


class _Distance(_AttentionProbe):
    """Mean attention distance, the literature's definition (class token dropped, rows not renormalized), with
    the mass of the spatial queries on the class token per head beside it (what the distance leaves out)."""

    measure_cls = M.AttentionDistance

    def rows(self) -> list[dict[str, Any]]:
        rows = super().rows()
        for row, mass in zip(rows, self.measure.class_token_mass() if rows else []):
            m = _heads(mass)
            row["class_token_mass"], row["class_token_mass_heads"] = m["value"], m["heads"]
            row["renormalized"] = self.measure.renormalize
        return rows


class _Nonlocality(_AttentionProbe):
    measure_cls = M.Nonlocality


class _RelativeDistance(_AttentionProbe):
    measure_cls = M.RelativeDistance


class _StreamProbe(_ProbeMeasure):
    """On the residual streams: fed one sub-layer record at a time during the forward (``add``), its per-layer
    contributions added to the streaming measure once the batch is done (``end``)."""

    needs_streams = True
    needs_float64 = False  # reads the sub-layer output in float64 (converted once per record for all adapters)

    def begin(self) -> None:
        self.parts: list[Any] = []
        self.infos: list[LayerInfo] = []

    def add(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class _CKA(_StreamProbe):

    def __init__(self) -> None:
        super().__init__()
        self.measure: M.MinibatchCKA | None = None

    def add(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> None:
        self.infos.append(rec.info)
        self.parts.append(linear_gram(rec.z_out, rec.info.name, validate=False, float32=True))  # (B, B) float64

    def end(self) -> None:
        if self.measure is None:
            self.layout = self.infos
            self.measure = M.MinibatchCKA(len(self.infos))
        self.measure.update_grams(self.parts)

    def streaming(self) -> list[M.StreamingMeasure]:
        return [self.measure]

    def _matrix(self) -> torch.Tensor:
        return self.measure.compute().cpu()  # one read (not one per pair of layers)

    def rows(self) -> list[dict[str, Any]]:
        mat = self._matrix()
        n = len(self.layout)
        return [{**_layer_row(a, i, n), "other_layer": b.name, "other_depth": j, "value": float(mat[i, j])}
                for i, a in enumerate(self.layout) for j, b in enumerate(self.layout)]

    def extra(self) -> dict[str, Any]:
        return {"layers": [i.name for i in self.layout], "matrix": self._matrix().tolist(),
                "examples": self.measure.num_examples}


class _MapProbe(_StreamProbe):
    """On the residual stream leaving each sub-layer (tokens read as maps, prefix tokens dropped).

    Sub-layers whose map is a single position (1 x 1, e.g. the last stage of a ResNet on tiny inputs) have
    no spatial structure and are left out of the table.
    """

    needs_float64 = True
    measure_cls: type = M.FeatureVariance

    def __init__(self) -> None:
        super().__init__()
        self.measure = self.measure_cls()
        self.skipped: dict[str, str] = {}

    def begin(self) -> None:
        super().begin()
        self.count = 0
        self.depths_now: list[int] = []

    def add(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> None:
        info, depth = rec.info, self.count
        self.count += 1
        if info.grid is None:
            self.skipped[info.name] = ("tokens whose grid vitscope cannot tell (several token sequences, or no "
                                       "patch grid of the image's aspect): no spatial map")
        elif info.grid[0] * info.grid[1] > 1:
            self.infos.append(info)
            self.depths_now.append(depth)
            self.parts.append(self.measure.layer_sums(z64, info, 0, info.name, validate=False))

    def end(self) -> None:
        if self.layout is None:
            if not self.parts and not self.skipped:
                raise ValueError("no sub-layer has a spatial map larger than 1x1; use a larger input size")
            self.layout, self.depths, self.total = self.infos, self.depths_now, self.count
        if self.parts:
            self.measure.update_layers(self.parts)

    def streaming(self) -> list[M.StreamingMeasure]:
        return [self.measure]

    def value(self, v: torch.Tensor) -> dict[str, Any]:
        return {"value": float(v)}

    def rows(self) -> list[dict[str, Any]]:
        if not self.layout:
            return []  # see the probe's meta "not_applicable"
        values = self.measure.compute()
        return [{**_layer_row(info, d, self.total), **self.value(v)}
                for d, info, v in zip(self.depths, self.layout, values)]


class _Fourier(_MapProbe):
    """HDVW's delta log amplitude; ``value`` is the highest frequency's, ``curve`` the whole half-diagonal."""

    measure_cls = M.FourierLogAmplitude

    def value(self, v: torch.Tensor) -> dict[str, Any]:
        curve = v.tolist()
        return {"value": curve[-1], "curve": curve}

    def rows(self) -> list[dict[str, Any]]:
        """Each row also gives its map ``grid`` and the ``frequencies`` of its curve in units of pi (2k/h), so
        maps of different sizes can be compared at one normalized frequency."""
        rows = super().rows()
        for row, info in zip(rows, self.layout):
            h, w = info.grid
            row["grid"] = [int(h), int(w)]
            row["frequencies"] = (M.fourier_frequencies(h, w) / math.pi).tolist()
        return rows


class _Variance(_MapProbe):
    measure_cls = M.FeatureVariance


class _RatioOfNorms(_StreamProbe):
    """On the residual records only (``z_out = shortcut + branch``): the stem and blocks vitscope cannot split
    have no branch, so no ratio; ``depth`` counts every record, as in the other stream measures."""

    def __init__(self) -> None:
        super().__init__()
        self.measure = M.RatioOfNorms()
        self.skipped: dict[str, str] = {}

    def begin(self) -> None:
        super().begin()
        self.count = 0
        self.depths_now: list[int] = []

    def add(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> None:
        depth = self.count
        self.count += 1
        if rec.branch is None:
            if rec.info.kind != "stem":
                self.skipped[rec.info.name] = _NOT_SPLIT
            return
        self.infos.append(rec.info)
        self.depths_now.append(depth)
        self.parts.append(self.measure.layer_sums(rec.shortcut, rec.branch, rec.info, 0, f" of {rec.info.name}",
                                                  validate=False, checks=checks))

    def end(self) -> None:
        if self.layout is None:
            self.layout, self.depths, self.total = self.infos, self.depths_now, self.count
        if self.parts:
            self.measure.update_layers(self.parts)

    def streaming(self) -> list[M.StreamingMeasure]:
        return [self.measure]

    def rows(self) -> list[dict[str, Any]]:
        if not self.layout:
            return []  # no layer is z + f(z) (see the probe's meta "not_applicable")
        values = self.measure.compute()
        return [{**_layer_row(info, d, self.total), **{k: (None if v is None else float(v)) for k, v in r.items()}}
                for d, info, r in zip(self.depths, self.layout, values)]


class _GPSAGates(_ProbeMeasure):
    """ConViT's gates sigmoid(gating_param) per head: a property of the weights, read once."""

    static = True

    def __init__(self) -> None:
        super().__init__()
        self.values: list[tuple[str, torch.Tensor]] = []

    def read(self, model: nn.Module) -> None:
        self.values = [(name, g) for (name, _), g in zip(M.gpsa_layers(model), M.gpsa_gates(model))]

    def update(self, cap: Capture) -> None:
        pass

    def streaming(self) -> list[M.StreamingMeasure]:
        return []

    def rows(self) -> list[dict[str, Any]]:
        n = len(self.values)
        return [{"layer": name, "kind": "gpsa", "block": i, "depth": i,
                 "normalized_depth": round(_normalized_depth(i, n), 6), **_heads(g)}
                for i, (name, g) in enumerate(self.values)]


PROBE_MEASURES: dict[str, type[_ProbeMeasure]] = {
    "attention_entropy": _Entropy,
    "attention_distance": _Distance,
    "nonlocality": _Nonlocality,
    "relative_distance": _RelativeDistance,
    "cka": _CKA,
    "ratio_of_norms": _RatioOfNorms,
    "fourier": _Fourier,
    "feature_variance": _Variance,
    "gpsa_gates": _GPSAGates,
}
ATTENTION_MEASURES = tuple(k for k, v in PROBE_MEASURES.items() if v.needs_attention)


@dataclass
class ProbeResult:
    """Per-layer tables of every measure, plus accuracy and NLL of the pass."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        return self.tables[name]

    def to_dict(self) -> dict[str, Any]:
        """``{measure: {"rows": [...], ...extras}}``: top-level keys are measure names.

        Non-finite values (e.g. the ratio of norms of a zero-initialised branch) become ``None``.
        """
        return json_safe({name: {"rows": rows, **self.extras.get(name, {})} for name, rows in self.tables.items()})

    def to_pandas(self) -> Any:
        """Tidy ``pandas.DataFrame``: one row per measure, layer, head (or curve index) and statistic
        (``vitscope.notebook.tidy_rows``); CKA's matrix as one row per pair of layers."""
        from vitscope.notebook import frame, tidy_rows

        return frame([r for name, content in self.to_dict().items() for r in tidy_rows(name, content["rows"])])

    def plot(self, measure: str | None = None) -> Any:
        """The report's figure of ``measure`` (default: the first the report draws) as a matplotlib ``Figure``."""
        from vitscope.notebook import report_figure

        return report_figure(str(self.meta.get("model") or "model"), measure, probe=self.to_dict())

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``results.json`` (+ ``meta.json``) and one CSV per measure into ``out_dir``, atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", self.to_dict())
        atomic_write_json(out / "meta.json", json_safe(self.meta))
        for name, content in self.to_dict().items():
            write_csv(out / f"{name}.csv", content["rows"])
        return out


def _resolve_measures(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in PROBE_MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; choose from {sorted(PROBE_MEASURES)}")
    if not names:
        raise ValueError(f"no measure requested; choose from {sorted(PROBE_MEASURES)}")
    has_attention = any(is_attention_module(m) for m in model.modules())
    for n in names:
        if PROBE_MEASURES[n].needs_attention and not has_attention:
            raise ValueError(
                f"measure {n!r} needs attention maps but {type(model).__name__} has no attention layer vitscope "
                f"can capture; drop {n!r} (attention measures: {list(ATTENTION_MEASURES)})"
            )
        if PROBE_MEASURES[n].needs_streams and not find_blocks(model):
            raise ValueError(f"measure {n!r} needs residual blocks but vitscope knows none in {type(model).__name__}")
    return names


def _add_accuracy(stats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add (correct, NLL sum, labelled examples) of one batch to ``stats`` (3,) on the device, without reading
    a value on the host: a batch whose labels fall outside [0, classes) adds nothing (labels of another label
    space)."""
    if labels.ndim != 1 or logits.ndim != 2 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
        return
    C = logits.shape[1]
    ok = ((labels.min() >= 0) & (labels.max() < C)).double()  # 0-d, 1 when every label is a class index
    safe = labels.clamp(0, C - 1)  # in range whatever ok says (no device assert on a GPU)
    correct = (logits.argmax(1) == safe).sum()
    nll = F.cross_entropy(logits.float(), safe, reduction="sum")
    count = torch.full_like(nll, labels.numel(), dtype=torch.float64)
    stats += torch.stack([correct.double(), nll.double(), count]) * ok


@torch.no_grad()
def probe(
    model: nn.Module,
    loader: Iterable,
    measures: Sequence[str] = ("attention_entropy", "attention_distance", "cka", "ratio_of_norms", "fourier",
                               "feature_variance"),
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    shard: bool = False,
    layers: str = "sublayers",
    names: str | Sequence[str] | None = None,
) -> ProbeResult:
    """Run every requested forward measure in one forward pass per batch, streaming over ``loader``.

    On a CPU it first calls ``vitscope.keep_freed_memory()`` (process-wide: glibc keeps freed blocks for
    reuse, so the activations of each batch do not page-fault fresh memory; opt out with
    ``VITSCOPE_KEEP_FREED_MEMORY=0``).

    Args:
        model: A ViT, ConViT, ResNet or vitscope model (see ``vitscope.capture``).
        loader: Yields ``(images, labels)`` or images.
        measures: Names from ``PROBE_MEASURES``.
        device: Where to run (default: the model's device).
        max_batches: Stop after this many batches.
        progress: Show a progress bar.
        shard: Under torch.distributed, give each rank its share of ``loader``'s batches (rank r takes the
            global batches r, r + W, ...; ``vitscope.distributed.shard_batches``), so each example is counted
            once and every batch keeps its one-process composition. Without it, the caller shards.
        layers: What the stream measures (CKA, Fourier, variance, ratio of norms) see, after the stem:
            ``sublayers`` (attention and MLP of each transformer block apart, HDVW) or ``blocks`` (one output
            per block named by its module path, Raghu et al.); see ``vitscope.capture``.
        names: fnmatch pattern(s) on layer names (``stem``, ``blocks.1*``, ``layers.2.*``) keeping only those
            layers (attention layers too, by their module path).

    Returns:
        A :class:`ProbeResult`; also ``accuracy`` and ``nll`` in ``meta`` when labels are given, and
        ``world_size`` and ``examples_per_rank``. Across torch.distributed ranks, states are summed, so every
        rank gets the global result.
    """
    measures = _resolve_measures(model, measures)
    device = model_device(model, device)
    if device.type == "cpu":
        keep_freed_memory()
    was_training = model.training
    model.to(device).eval()
    adapters = {n: PROBE_MEASURES[n]() for n in measures}
    for a in adapters.values():
        if a.static:
            a.read(model)
    attention_adapters = [a for a in adapters.values() if a.needs_attention]
    stream_adapters = [a for a in adapters.values() if isinstance(a, _StreamProbe)]
    need_attn, need_streams = bool(attention_adapters), bool(stream_adapters)
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, nll sum, labelled examples
    examples = seen = 0
    not_applicable: dict[str, str] = {}  # attention layers without positions -> why no attention measure
    checks = _DeviceChecks()  # read once after the pass: no host sync within it (see _DeviceChecks)
    info = dist_current()
    if shard:
        total = global_batch_count(loader, max_batches)
        total = len(range(info.rank, total, info.world_size)) if total is not None else None
        batches = shard_batches(loader, max_batches, info)
    else:
        total = global_batch_count(loader, max_batches)
        batches = ((b, batch) for b, batch in enumerate(loader) if max_batches is None or b < max_batches)
    bar = tqdm(batches, total=total, desc="probe", disable=not progress or not info.is_main, leave=False)
    try:
        for b, batch in bar:
            if max_batches is not None and b >= max_batches:
                break
            images, labels = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
            images = images.to(device)
            checks.fail_if(_not_finite(images), "batch {b} holds NaN or infinite pixels; check the data pipeline")
            feed = _RecordFeeder(stream_adapters, checks)
            for a in stream_adapters:
                a.begin()
            with capture(model, attention=need_attn, residual=need_streams, branches=need_streams,
                         on_record=feed, layers=layers, names=names) as cap:  # each sub-layer reduced as the forward produces it
                logits = model(images)
            for a in stream_adapters:
                a.end()
            if need_attn:
                _keep_positional(cap, not_applicable)
                _check_attentions(cap, checks)
                for a in attention_adapters:
                    a.update(cap)
            examples += images.shape[0]
            if labels is not None:
                _add_accuracy(stats, logits, labels.to(device))
            checks.end_batch(b)
            seen += 1
            if seen % _CHECK_EVERY == 0:  # this rank's batches (b is global under shard=True)
                checks.raise_failed()
    finally:
        model.train(was_training)
    if examples == 0:
        raise ValueError("the loader gave no batch; check the data spec, split and max_batches")
    checks.raise_first()
    stats = torch.cat([stats.cpu(), torch.tensor([float(examples)], dtype=torch.float64)])  # + examples
    per_rank = [int(n) for n in all_gather_objects(int(stats[3]))]
    if info.distributed:
        for a in adapters.values():
            for m in a.streaming():
                m.sync()
        all_reduce_sum(stats)
    result = ProbeResult(meta={"model": type(model).__name__, "examples": int(stats[3]), "measures": measures,
                               "layers": layers, "names": names,
                               "world_size": info.world_size, "examples_per_rank": per_rank})
    if not_applicable:
        _logger.warning("attention measures skip %d layer(s) without token positions: %s", len(not_applicable),
                        "; ".join(f"{k}: {v}" for k, v in list(not_applicable.items())[:3]))
        result.meta["not_applicable"] = {n: not_applicable for n in measures if PROBE_MEASURES[n].needs_attention}
    for name, a in adapters.items():  # layers a stream measure has no meaning on, and why
        if getattr(a, "skipped", None):
            result.meta.setdefault("not_applicable", {})[name] = a.skipped
    if stats[2] > 0:
        result.meta.update(accuracy=float(stats[0] / stats[2]), nll=float(stats[1] / stats[2]))
    for name, a in adapters.items():
        result.tables[name] = a.rows()
        extra = a.extra()
        if extra:
            result.extras[name] = extra
    used = {name: int(extra["examples"]) for name, extra in result.extras.items()
            if isinstance(extra, dict) and "examples" in extra and int(extra["examples"]) != result.meta["examples"]}
    if used:  # a measure that skipped batches (CKA: n <= 3) says how many examples it is computed on
        result.meta["examples_by_measure"] = used
    return result
