"""``vitscope.compare``: two models layer by layer on the same examples (RAGHU Fig. 2, "ViT against ResNet";
checkpoint against checkpoint over training), and per-layer few-shot linear probes (RAGHU Sec. 6).

Each batch runs through model A and then model B under ``vitscope.capture``; each selected layer's output is
turned into its (n, n) float64 Gram as the forward produces it and dropped, so a batch's activations are never
held whole, and the (La, Lb) minibatch unbiased CKA accumulates in ``MinibatchCKA`` (float64 sums, merged over
torchrun ranks by summation). The two models may take different inputs: pass ``(loader_a, loader_b)`` yielding
the same examples in the same order, each through its model's own preprocessing (``vitscope compare`` builds them
with the analysis commands' resolver), and the labels of every batch are checked to agree.

Layers (``vitscope.capture``'s ``layers=``): block outputs by default, named by the block's module path (``blocks.3``,
``layer2.1``); ``layers="sublayers"`` keeps every sub-layer (``blocks.3.attn`` and ``blocks.3.mlp``: the
attention/MLP split). ``names`` is a glob (or list of globs) on those names; the stem's output (``stem``) is
compared only when ``names`` selects it.

``linear_probe``: per model, per layer, per read-out (class token when the model has one, global average pool),
a closed-form ridge probe (``vitscope.measures.linear_probe``) fitted on the first ``shots`` examples per class
of ``fit_loader`` (one short pass that stops once every class has its examples; run whole on every rank, so
every rank fits the same probe) and scored on the compared examples (held out: another split).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vitscope.capture import LayerInfo, capture
from vitscope.capture.sites import find_blocks
from vitscope.distributed import Batches, all_reduce_sum
from vitscope.distributed import current as dist_current
from vitscope.io.atomic import atomic_write_json, json_safe, write_csv
from vitscope.measures._validate import raise_non_finite
from vitscope.measures.cka import MinibatchCKA, linear_gram
from vitscope.measures.evaluation import eval_mode
from vitscope.probing.linear_probes import DEFAULT_SHOTS, LayerProbes, layer_readouts
from vitscope.runtime import keep_freed_memory, model_device

_logger = logging.getLogger(__name__)

__all__ = ["compare", "CompareResult", "COMPARE_MEASURES", "LAYER_SELECTIONS"]

COMPARE_MEASURES = ("cka", "linear_probe")
LAYER_SELECTIONS = ("blocks", "sublayers")  # vitscope.capture's layers=


# ----------------------------------------------------------------------------------------------
# Result


@dataclass
class CompareResult:
    """``cka`` (La, Lb) float64 between ``names_a`` and ``names_b``; ``linear_probe`` rows (model, layer,
    readout, shots, accuracy, alpha); ``meta`` with ``model_a`` / ``model_b`` descriptions; ``label_a`` /
    ``label_b`` name the two models in tables and figures."""

    names_a: list[str] = field(default_factory=list)
    names_b: list[str] = field(default_factory=list)
    cka: torch.Tensor | None = None
    linear_probe: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    label_a: str = "A"
    label_b: str = "B"
    over_training: bool = False  # A and B are one run at two epochs (the report's checkpoint-to-checkpoint matrix)

    def cka_rows(self) -> list[dict[str, Any]]:
        if self.cka is None:
            return []
        la, lb = len(self.names_a), len(self.names_b)
        return [{"model": self.label_a, "layer": a, "depth": i, "normalized_depth": round(i / max(la - 1, 1), 6),
                 "other_model": self.label_b, "other_layer": b, "other_depth": j,
                 "other_normalized_depth": round(j / max(lb - 1, 1), 6), "value": float(self.cka[i, j])}
                for i, a in enumerate(self.names_a) for j, b in enumerate(self.names_b)]

    def to_dict(self) -> dict[str, Any]:
        """``results.json``: ``{"cka_cross": {"rows", "layers", "other_layers", "matrix", "model", "other_model",
        "examples", "over_training"}, "linear_probe": {"rows"}}`` (what ``vitscope report`` reads)."""
        out: dict[str, Any] = {}
        if self.cka is not None:
            out["cka_cross"] = {"rows": self.cka_rows(), "layers": self.names_a, "other_layers": self.names_b,
                                "matrix": self.cka.tolist(), "model": self.label_a, "other_model": self.label_b,
                                "examples": self.meta.get("examples"), "over_training": self.over_training}
        if self.linear_probe:
            out["linear_probe"] = {"rows": self.linear_probe}
        return json_safe(out)

    def to_pandas(self) -> Any:
        """Tidy ``pandas.DataFrame``: one row per measure, pair of layers (CKA) or layer, read-out and k (probes)
        and statistic (``vitscope.notebook.tidy_rows``)."""
        from vitscope.notebook import frame, tidy_rows

        return frame([r for name, content in self.to_dict().items() for r in tidy_rows(name, content["rows"])])

    def plot(self, measure: str | None = None) -> Any:
        """The report's figure (``cka_cross``, ``cka_checkpoints`` or ``linear_probe``; default the first) as a
        matplotlib ``Figure``."""
        from vitscope.notebook import report_figure

        return report_figure(f"{self.label_a} vs {self.label_b}", measure, probe=self.to_dict())

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``results.json``, ``meta.json`` and one CSV per measure into ``out_dir`` (each file atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        content = self.to_dict()
        atomic_write_json(out / "results.json", content)
        atomic_write_json(out / "meta.json", json_safe(self.meta))
        for name, part in content.items():
            write_csv(out / f"{name}.csv", part["rows"])
        return out


# ----------------------------------------------------------------------------------------------
# The pass


def _pairs(loader: Any, max_batches: int | None, shard: bool, progress: bool = False) -> Iterable:
    """``(index, (images_a, images_b), labels)`` per batch from one loader (both models see the same tensor) or a
    pair of loaders over the same examples in lockstep; this rank's share of them when ``shard``, with the first
    loader's progress bar."""
    pair = isinstance(loader, (tuple, list)) and len(loader) == 2 and not isinstance(loader[0], torch.Tensor)
    loaders = list(loader) if pair else [loader]
    streams = [Batches(ld, max_batches, shard=shard, desc="compare", progress=progress and i == 0)
               for i, ld in enumerate(loaders)]

    def split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)

    def gen() -> Iterable:
        if not pair:
            for b, batch in streams[0]:
                x, y = split(batch)
                yield b, (x, x), y
            return
        ends = object()
        it_a, it_b = iter(streams[0]), iter(streams[1])
        while True:
            a, b_ = next(it_a, ends), next(it_b, ends)
            if a is ends or b_ is ends:
                if a is not b_:
                    raise ValueError("the two loaders gave different numbers of batches; pass loaders over the "
                                     "same examples (same data, split, order and batch size)")
                return
            (b, batch_a), (_, batch_b) = a, b_
            (xa, ya), (xb, yb) = split(batch_a), split(batch_b)
            if xa.shape[0] != xb.shape[0] or (ya is not None and yb is not None and not torch.equal(ya, yb)):
                raise ValueError(f"batch {b}: the two loaders gave different examples (sizes {xa.shape[0]} and "
                                 f"{xb.shape[0]}, or other labels); pass loaders over the same examples in the same "
                                 "order (shuffle off)")
            yield b, (xa, xb), ya

    return gen()


class _ModelSide:
    """One model's per-batch work: the Grams of its selected layers and, for probes, their read-outs. The layers
    are ``vitscope.capture``'s (``layers="blocks"``: one record per block, named by its module path;
    ``"sublayers"``: attention / MLP split), the stem's output left out unless ``names`` asks for it."""

    def __init__(self, model: nn.Module, layers: str, names: Any, want_probe: bool, device: torch.device,
                 gram32: bool = False) -> None:
        if layers not in LAYER_SELECTIONS:
            raise ValueError(f"layers must be one of {LAYER_SELECTIONS}, got {layers!r}")
        self.model, self.device, self.want_probe, self.gram32 = model, device, want_probe, gram32
        self.layers, self.patterns = layers, names
        self.names: list[str] | None = None
        self.infos: list[LayerInfo] = []

    def run(self, images: torch.Tensor, grams: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        out_grams: list[torch.Tensor] = []
        reads: list[dict[str, torch.Tensor]] = []
        names: list[str] = []
        infos: list[LayerInfo] = []

        def on_record(rec: Any) -> None:  # each layer reduced as the forward produces it, then dropped
            info = rec.info
            if info.kind == "stem" and self.patterns is None:
                return
            names.append(info.name)
            infos.append(info)
            if grams:
                out_grams.append(linear_gram(rec.z_out, info.name, validate=False, float32=self.gram32))  # (n, n) f64
            if self.want_probe:
                reads.append(layer_readouts(rec.z_out, info))  # (n, D) float64 per read-out

        with capture(self.model, attention=False, residual=True, branches=False, names=self.patterns,
                     on_record=on_record, layers=self.layers):
            self.model(images.to(self.device))
        if not names:
            raise ValueError(f"no layer of {type(self.model).__name__} matched the layer selection; check --layers "
                             "and the name filter (block names look like blocks.3 or layer2.1)")
        if self.names is None:
            self.names, self.infos = names, infos
        elif names != self.names:
            raise ValueError(f"{type(self.model).__name__} gave layers {names[:3]}... in this batch but "
                             f"{self.names[:3]}... before; the layers must not change between batches")
        return out_grams, reads


def _check_finite(measure: MinibatchCKA, names_a: list[str], names_b: list[str]) -> None:
    """NaN/Inf in any layer output reaches that layer's float64 HSIC sums: one check after the pass (not one host
    read per layer and batch), naming the layers."""
    state = measure.state_dict()["layers"][0]
    for key, names, which in (("hsic_xx", names_a, "A"), ("hsic_yy", names_b, "B")):
        bad = (~torch.isfinite(state[key])).nonzero().flatten().tolist()
        if bad:
            raise_non_finite(f"the output of layer(s) {[names[i] for i in bad][:5]} of model {which}")


@torch.no_grad()
def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Any,
    measures: Sequence[str] = ("cka",),
    layers: str = "blocks",
    names: str | Sequence[str] | None = None,
    names_b: str | Sequence[str] | None = None,
    fit_loader: Any = None,
    num_classes: int | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    ridge: float = 1.0,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    shard: bool = False,
    label_a: str | None = None,
    label_b: str | None = None,
    gram_dtype: str | torch.dtype = "float64",
) -> CompareResult:
    """Compare two models layer by layer on the same examples (RAGHU Fig. 2), in one pass over ``loader``.

    Args:
        model_a, model_b: Any models ``vitscope.capture`` knows (timm ViT/DeiT, ConViT, ResNet, vitscope's); may be
            two checkpoints of one architecture.
        loader: Yields ``(images, labels)`` given to both models, or a pair ``(loader_a, loader_b)`` over the same
            examples in the same order, each preprocessed for its model (input size, mean/std, crop).
        measures: ``"cka"`` (La x Lb minibatch unbiased linear CKA, float64) and/or ``"linear_probe"``.
        layers: ``"blocks"`` (block outputs, named by module path) or ``"sublayers"`` (attention / MLP split).
        names: Glob(s) on the layer names of model A (and of B unless ``names_b`` is given).
        fit_loader: For ``linear_probe``: the fit examples (e.g. the train split), one loader or a pair like
            ``loader``; the first ``max(shots)`` examples of each class are used.
        num_classes: Classes of the probe's labels (needed for ``linear_probe``).
        shots: Fit examples per class, one probe each (RAGHU: 10 and 25).
        ridge: Ridge strength relative to the mean eigenvalue of each layer's centred scatter.
        device: Where to run both models (default: model A's device).
        max_batches: Stop after this many batches of ``loader``.
        progress: Show a progress bar.
        shard: Under torch.distributed, each rank takes its share of the batches (``vitscope.distributed``); the
            CKA sums and probe counts are then summed over the ranks, so every rank gets the global result.
        label_a, label_b: The models' names in tables and figures (default: their class names, with A/B added when
            they are equal).
        gram_dtype: ``"float64"`` (default: each Gram of the features in float64, CKA to ~1e-12) or, opt-in,
            ``"float32"``: the features centred over the batch and multiplied in float32 (a float32 matmul in place
            of float64's), HSIC still accumulated in float64; off by at most asin(eps rho_K) + asin(eps rho_L),
            eps = (D+2) 2^-24 (``vitscope.measures.cka.linear_gram``), ~1e-8 in practice.

    Returns:
        A :class:`CompareResult`.
    """
    measures = list(dict.fromkeys(measures))
    unknown = [m for m in measures if m not in COMPARE_MEASURES]
    if unknown or not measures:
        raise ValueError(f"unknown measure(s) {unknown}; choose from {list(COMPARE_MEASURES)}" if unknown else
                         f"no measure requested; choose from {list(COMPARE_MEASURES)}")
    want_cka, want_probe = "cka" in measures, "linear_probe" in measures
    gram32 = {"float64": False, torch.float64: False, "float32": True, torch.float32: True}.get(gram_dtype)
    if gram32 is None:
        raise ValueError(f"gram_dtype must be 'float64' (default, exact) or 'float32', got {gram_dtype!r}")
    if want_probe:
        if fit_loader is None or num_classes is None:
            raise ValueError("linear_probe needs fit_loader (the fit examples, e.g. the train split) and num_classes")
        shots = sorted({int(k) for k in shots})
        LayerProbes(num_classes, shots, ridge)  # checks the options before any model runs
    for m, which in ((model_a, "model_a"), (model_b, "model_b")):
        if not find_blocks(m):
            raise ValueError(f"{which} ({type(m).__name__}) has no residual block vitscope knows; compare needs "
                             "timm ViT/DeiT, ConViT, ResNet or vitscope models")
    device = model_device(model_a, device)
    if device.type == "cpu":
        keep_freed_memory()
    model_a.to(device)
    model_b.to(device)
    sides = [_ModelSide(model_a, layers, names, want_probe, device, gram32),
             _ModelSide(model_b, layers, names if names_b is None else names_b, want_probe, device, gram32)]
    info = dist_current()
    measure: MinibatchCKA | None = None
    probes: list[LayerProbes] = []
    examples = 0
    with eval_mode(model_a), eval_mode(model_b):  # each module's own training flag restored after
        for i, side in enumerate(sides if want_probe else []):  # the whole fit pass on every rank: same probes
            probes.append(LayerProbes(num_classes, shots, ridge))
            probes[i].fit(lambda images, side=side: side.run(images, grams=False)[1],
                          ((images[i], labels) for _, images, labels in _pairs(fit_loader, None, shard=False)),
                          progress and info.is_main)
        for _, images, labels in _pairs(loader, max_batches, shard, progress):
            ga, ra = sides[0].run(images[0], want_cka)
            gb, rb = sides[1].run(images[1], want_cka)
            if want_cka:
                if measure is None:
                    measure = MinibatchCKA(len(ga), len(gb))
                measure.update_grams(ga, gb)
            for p, reads in zip(probes, (ra, rb)):
                p.score(reads, labels)
            examples += int(images[0].shape[0])
    if examples == 0:
        raise ValueError("the loader gave no batch; check the data spec, split and max_batches")
    count = torch.tensor([float(examples)], dtype=torch.float64)
    if info.distributed:
        for m in ([measure] if measure is not None else []) + [a for p in probes for a in p.streaming()]:
            m.sync()
        all_reduce_sum(count)
    label_a = label_a or type(model_a).__name__
    label_b = label_b or type(model_b).__name__
    if label_a == label_b:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    result = CompareResult(names_a=list(sides[0].names or []), names_b=list(sides[1].names or []),
                           label_a=label_a, label_b=label_b)
    if measure is not None:
        _check_finite(measure, result.names_a, result.names_b)
        result.cka = measure.compute().cpu()  # (La, Lb) float64
    for side, p, label in zip(sides, probes, (label_a, label_b)):
        result.linear_probe += p.rows(side.names or [], label)
    result.meta = {
        "examples": int(count[0]), "measures": measures, "layers": layers, "names": names,
        "gram_dtype": "float32" if gram32 else "float64",
        "names_b": names_b, "world_size": info.world_size,
        "model_a": {"class": type(model_a).__name__, "label": label_a, "layers": result.names_a},
        "model_b": {"class": type(model_b).__name__, "label": label_b, "layers": result.names_b},
    }
    if measure is not None:
        result.meta["cka_skipped_examples"] = int(measure.state_dict()["layers"][0]["skipped"])
    if want_probe:
        result.meta.update(shots=list(shots), ridge=ridge, num_classes=num_classes,
                           ridge_note="alpha = ridge x tr(Xc'Xc) / D per layer (RAGHU/ViT few-shot ridge)")
    return result
