"""``probe``: one streamed pass over a loader feeding every requested measure (see the package docstring)."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscope import measures as M
from vitscope.capture import capture
from vitscope.capture.sites import find_blocks, is_attention_module
from vitscope.distributed import Batches, all_gather_objects, all_reduce_sum
from vitscope.distributed import current as dist_current
from vitscope.measures.evaluation import eval_mode
from vitscope.probing._checks import _check_attentions, _DeviceChecks, _not_finite
from vitscope.probing.adapters import ATTENTION_MEASURES, PROBE_MEASURES, _keep_positional, _RecordFeeder, _StreamProbe
from vitscope.probing.linear_probes import DEFAULT_SHOTS
from vitscope.probing.result import ProbeResult
from vitscope.runtime import keep_freed_memory, model_device

_logger = logging.getLogger(__name__)


_CHECK_EVERY = 64  # batches between reads of the checks (one host sync each), so that bad data stops a long pass


def not_applicable(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The forward measures of ``names`` that have no meaning on ``model``, each with the reason in one line:
    attention measures on a model without attention layers capture can see (a CNN), stream measures on one
    without blocks capture knows, ConViT's GPSA gates on a model without GPSA layers."""
    has_attention = any(is_attention_module(m) for m in model.modules())
    out: dict[str, str] = {}
    for n in names:
        cls = PROBE_MEASURES[n]
        if cls.needs_attention and not has_attention:
            out[n] = f"needs attention maps but {type(model).__name__} has no attention layer vitscope can capture"
        elif cls.needs_streams and not find_blocks(model):
            out[n] = f"needs residual blocks but vitscope knows none in {type(model).__name__}"
        elif n == "gpsa_gates":
            try:
                M.gpsa_layers(model)
            except ValueError:
                out[n] = f"needs ConViT's gated positional self-attention but {type(model).__name__} has no GPSA layer"
    return out


def _resolve_measures(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in PROBE_MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; choose from {sorted(PROBE_MEASURES)}")
    if not names:
        raise ValueError(f"no measure requested; choose from {sorted(PROBE_MEASURES)}")
    for n, why in not_applicable(model, [n for n in names if n != "gpsa_gates"]).items():
        hint = f"attention measures: {list(ATTENTION_MEASURES)}" if PROBE_MEASURES[n].needs_attention else ""
        raise ValueError(f"measure {n!r} {why}" + (f"; drop {n!r} ({hint})" if hint else ""))
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
    nll = F.cross_entropy(logits.double(), safe, reduction="sum")  # float64 log-softmax, as Calibration (training)
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
    fit_loader: Iterable | None = None,
    num_classes: int | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    ridge: float = 1.0,
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
        fit_loader: For ``linear_probe``: the fit examples (e.g. the train split, labelled, fixed order); the
            first ``max(shots)`` of each class are read (one short pass before the probe's, whole on every rank).
            The probes are scored on ``loader`` (held out).
        num_classes: For ``linear_probe``: the classes of the labels.
        shots: For ``linear_probe``: fit examples per class, one probe each (RAGHU: 10 and 25).
        ridge: For ``linear_probe``: ridge strength relative to each layer's mean eigenvalue of Xc'Xc.

    Returns:
        A :class:`ProbeResult`; also ``accuracy`` and ``nll`` in ``meta`` when labels are given (a model
        without a classifier head, timm's ``num_classes=0``, has none: ``meta["not_applicable"]["accuracy"]``), and
        ``world_size`` and ``examples_per_rank``. Across torch.distributed ranks, states are summed, so every
        rank gets the global result.
    """
    measures = _resolve_measures(model, measures)
    if "linear_probe" in measures and (fit_loader is None or num_classes is None):
        raise ValueError("linear_probe needs fit_loader (the fit examples, e.g. the train split) and num_classes")
    device = model_device(model, device)
    if device.type == "cpu":
        keep_freed_memory()
    model.to(device)
    adapters = {n: PROBE_MEASURES[n]() for n in measures}
    for a in adapters.values():
        if a.static:
            a.read(model)
    attention_adapters = [a for a in adapters.values() if a.needs_attention]
    stream_adapters = [a for a in adapters.values() if isinstance(a, _StreamProbe)]
    need_attn, need_streams = bool(attention_adapters), bool(stream_adapters)
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, nll sum, labelled examples
    headed = getattr(model, "num_classes", None) != 0  # timm's num_classes=0: pooled features, no logits
    examples = seen = 0
    not_applicable: dict[str, str] = {}  # attention layers without positions -> why no attention measure
    checks = _DeviceChecks()  # read once after the pass: no host sync within it (see _DeviceChecks)
    info = dist_current()
    with eval_mode(model):  # each module's own training flag restored after
        if "linear_probe" in adapters:  # the fit pass first (stops once every class has its examples)
            adapters["linear_probe"].prepare(model, fit_loader, num_classes, shots, ridge, layers, names, device,
                                             progress and info.is_main)
        for b, batch in Batches(loader, max_batches, shard=shard, desc="probe", progress=progress):
            images, labels = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
            images = images.to(device)
            checks.fail_if(_not_finite(images), "batch {b} holds NaN or infinite pixels; check the data pipeline")
            feed = _RecordFeeder(stream_adapters, checks)
            for a in stream_adapters:
                a.begin(labels)
            with capture(model, attention=need_attn, residual=need_streams, branches=need_streams,
                         on_record=feed, layers=layers, names=names) as cap:  # each record reduced as it is produced
                logits = model(images)
            for a in stream_adapters:
                a.end()
            if need_attn:
                _keep_positional(cap, not_applicable)
                _check_attentions(cap, checks)
                for a in attention_adapters:
                    a.update(cap)
            examples += images.shape[0]
            if labels is not None and headed:
                _add_accuracy(stats, logits, labels.to(device))
            checks.end_batch(b)
            seen += 1
            if seen % _CHECK_EVERY == 0:  # this rank's batches (b is global under shard=True)
                checks.raise_failed()
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
        if getattr(a, "skipped", None):  # added to the attention measures' shared reasons, if any
            na = result.meta.setdefault("not_applicable", {})
            na[name] = {**na.get(name, {}), **a.skipped}
    if stats[2] > 0:
        result.meta.update(accuracy=float(stats[0] / stats[2]), nll=float(stats[1] / stats[2]))
    elif not headed:
        result.meta.setdefault("not_applicable", {})["accuracy"] = (
            f"{type(model).__name__} has no classifier head (num_classes 0: it outputs features, not logits)")
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
