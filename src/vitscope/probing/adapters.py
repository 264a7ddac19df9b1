"""The probe's measure adapters: what each measure of ``PROBE_MEASURES`` reads from a capture and reports."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from vitscope import measures as M
from vitscope.capture import Capture, LayerInfo
from vitscope.measures.cka import linear_gram
from vitscope.probing._checks import _DeviceChecks, _not_finite, _same
from vitscope.probing.linear_probes import LayerProbes, capture_readouts, layer_readouts


def _normalized_depth(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 0.0


def _layer_row(info: LayerInfo, i: int, n: int) -> dict[str, Any]:
    return {"layer": info.name, "kind": info.kind, "block": info.block, "depth": i,
            "normalized_depth": round(_normalized_depth(i, n), 6)}


def _heads(values: torch.Tensor) -> dict[str, Any]:
    v = values.flatten().tolist()  # one read per layer (not one per head)
    return {"value": sum(v) / len(v), "heads": v}



_NOT_SPLIT = ("a block vitscope does not split as z + f(z) (its residual structure is not in capture's table: "
              "layer scale, parallel branches, post-norm or no skip path), so it has no ratio of norms")
_NOT_SAME_TOKENS = ("queries and keys are not the same tokens of one grid (pooled keys or MaxViT's dilated grid "
                    "windows): relative distance leaves out each token's attention to itself, which has no meaning")
_NO_POSITIONS = {
    "channel": "channel attention (XCiT's cross-covariance attention): it attends over channels, not positions",
    "pooled": "keys pooled or spatially reduced (fewer keys than queries): key positions not modelled",
    "mixed": "talking-heads attention (CaiT): maps mixed across heads after the softmax, rows are no distributions",
    "other": "attention map of a shape whose query and key positions vitscope does not know",
}


def _keep_positional(cap: Capture, skipped: dict[str, str]) -> None:
    """Keep the attention maps whose queries and keys sit at known places (``LayerInfo.has_key_positions``: a
    token grid, square windows, pooled keys or dilated windows capture can place): the attention measures
    (entropy over positions, distance, nonlocality) mean nothing on the others, which are named in ``skipped``
    with the reason."""
    keep = [i for i, info in enumerate(cap.attention_layout) if info.has_key_positions]
    for info in cap.attention_layout:
        if not info.has_key_positions:
            skipped.setdefault(info.name, _NO_POSITIONS.get(info.kind, _NO_POSITIONS["other"]))
    cap.attentions[:] = [cap.attentions[i] for i in keep]
    cap.attention_layout[:] = [cap.attention_layout[i] for i in keep]




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
    """CB's relative distance: on maps whose queries and keys are the same tokens of one grid only (it leaves out
    each token's attention to itself); pooled keys and dilated windows are named in ``skipped``."""

    measure_cls = M.RelativeDistance

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}

    def update(self, cap: Capture) -> None:
        keep = [i for i, info in enumerate(cap.attention_layout) if info.has_positions]
        for info in cap.attention_layout:
            if not info.has_positions:
                self.skipped.setdefault(info.name, _NOT_SAME_TOKENS)
        super().update(Capture([cap.attentions[i] for i in keep], [cap.attention_layout[i] for i in keep]))


class _StreamProbe(_ProbeMeasure):
    """On the residual streams: fed one sub-layer record at a time during the forward (``add``), its per-layer
    contributions added to the streaming measure once the batch is done (``end``)."""

    needs_streams = True
    needs_float64 = False  # reads the sub-layer output in float64 (converted once per record for all adapters)

    def begin(self, labels: torch.Tensor | None = None) -> None:
        """A batch starts; ``labels`` (B,) its labels when the loader gives them."""
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


class _SelectedLayersProbe(_StreamProbe):
    """A stream measure over the records ``layer_part`` accepts (the others named in ``skipped`` where a reason is
    due); ``depth`` counts every record, so rows line up with the other stream measures."""

    measure_cls: type

    def __init__(self) -> None:
        super().__init__()
        self.measure = self.measure_cls()
        self.skipped: dict[str, str] = {}

    def begin(self, labels: torch.Tensor | None = None) -> None:
        super().begin(labels)
        self.count = 0
        self.depths_now: list[int] = []

    def layer_part(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> Any:
        """This record's contribution to ``measure.update_layers``, or None to leave the record out."""
        raise NotImplementedError

    def first_batch_done(self) -> None:
        """Called once, after the first batch's records were seen (a place to refuse an empty selection)."""

    def add(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> None:
        depth = self.count
        self.count += 1
        part = self.layer_part(rec, z64, checks)
        if part is not None:
            self.infos.append(rec.info)
            self.depths_now.append(depth)
            self.parts.append(part)

    def end(self) -> None:
        if self.layout is None:
            self.first_batch_done()
            self.layout, self.depths, self.total = self.infos, self.depths_now, self.count
        if self.parts:
            self.measure.update_layers(self.parts)

    def streaming(self) -> list[M.StreamingMeasure]:
        return [self.measure]


class _MapProbe(_SelectedLayersProbe):
    """On the residual stream leaving each sub-layer (tokens read as maps, prefix tokens dropped).

    Sub-layers whose map is a single position (1 x 1, e.g. the last stage of a ResNet on tiny inputs) have
    no spatial structure and are left out of the table.
    """

    needs_float64 = True
    measure_cls: type = M.FeatureVariance

    def layer_part(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> Any:
        info = rec.info
        if info.grid is None:
            self.skipped[info.name] = ("tokens whose grid vitscope cannot tell (several token sequences, no "
                                       "patch grid of the image's aspect, or tokens not in row-major order: "
                                       "Hiera's mask units): no spatial map")
            return None
        if info.grid[0] * info.grid[1] <= 1:
            return None
        return self.measure.layer_sums(z64, info, 0, info.name, validate=False)

    def first_batch_done(self) -> None:
        if not self.parts and not self.skipped:
            raise ValueError("no sub-layer has a spatial map larger than 1x1; use a larger input size")

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


class _RatioOfNorms(_SelectedLayersProbe):
    """On the residual records only (``z_out = shortcut + branch``): the stem and blocks vitscope cannot split
    have no branch, so no ratio; ``depth`` counts every record, as in the other stream measures."""

    measure_cls = M.RatioOfNorms

    def layer_part(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> Any:
        if rec.branch is None:
            if rec.info.kind != "stem":
                self.skipped[rec.info.name] = _NOT_SPLIT
            return None
        return self.measure.layer_sums(rec.shortcut, rec.branch, rec.info, 0, f" of {rec.info.name}",
                                       validate=False, checks=checks)

    def rows(self) -> list[dict[str, Any]]:
        if not self.layout:
            return []  # no layer is z + f(z) (see the probe's meta "not_applicable")
        values = self.measure.compute()
        return [{**_layer_row(info, d, self.total), **{k: (None if v is None else float(v)) for k, v in r.items()}}
                for d, info, r in zip(self.depths, self.layout, values)]


class _LinearProbe(_StreamProbe):
    """Few-shot ridge probes of every stream layer (RAGHU Sec. 6; ``vitscope.probing.linear_probes``): fitted
    before the pass (``prepare``: the fit loader, the same layers), scored on the probe's batches."""

    needs_float64 = True  # the read-outs are float64 means of the record's output (the converted copy is shared)

    def __init__(self) -> None:
        super().__init__()
        self.probes: LayerProbes | None = None
        self.model_name = ""
        self.fit_names: list[str] = []

    def prepare(self, model: nn.Module, fit_loader: Any, num_classes: int | None, shots: Any, ridge: float,
                layers: str, names: Any, device: torch.device, progress: bool) -> None:
        if fit_loader is None or num_classes is None:
            raise ValueError("linear_probe needs fit_loader (the fit examples, e.g. the train split) and num_classes")
        self.probes, self.model_name = LayerProbes(num_classes, shots, ridge), type(model).__name__

        def reads_of(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            infos, reads = capture_readouts(model, images.to(device), layers, names)
            self.fit_names = [i.name for i in infos]
            return reads

        batches = (b if isinstance(b, (list, tuple)) else (b, None) for b in fit_loader)
        self.probes.fit(reads_of, ((b[0], b[1]) for b in batches), progress)

    def begin(self, labels: torch.Tensor | None = None) -> None:
        super().begin(labels)
        self.labels = labels

    def add(self, rec: Any, z64: torch.Tensor | None, checks: _DeviceChecks) -> None:
        self.checks = checks
        self.infos.append(rec.info)
        self.parts.append(layer_readouts(z64, rec.info))  # (B, D) float64 per read-out (finite: checked)

    def end(self) -> None:
        if self.layout is None:
            self.layout = self.infos
            if [i.name for i in self.infos] != self.fit_names:
                raise ValueError("linear_probe: the probe pass saw other layers than the fit pass")
        if self.labels is None:
            raise ValueError("linear_probe needs labels: the loader must yield (images, labels)")
        c = self.probes.num_classes
        labels = self.labels.to(self.parts[0]["gap"].device)
        self.checks.fail_if(((labels < 0) | (labels >= c)).any(),  # read with the other checks: no host sync here
                            f"batch {{b}}: linear_probe labels outside [0, {c}); pass labels of the probe's classes")
        self.probes.score(self.parts, labels.clamp(0, c - 1), validate=False)

    def streaming(self) -> list[M.StreamingMeasure]:
        return self.probes.streaming()

    def rows(self) -> list[dict[str, Any]]:
        return self.probes.rows([i.name for i in self.layout], self.model_name)


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
    "linear_probe": _LinearProbe,
}
ATTENTION_MEASURES = tuple(k for k, v in PROBE_MEASURES.items() if v.needs_attention)

