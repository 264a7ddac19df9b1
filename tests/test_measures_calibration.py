"""Calibration metrics against a plain-numpy reference, streamed over unequal batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import cal_atol
from vitscope.measures import Calibration, calibration


def _reference(logits: np.ndarray, targets: np.ndarray, n_bins: int) -> dict:
    """Independent numpy implementation, bin by bin with explicit interval tests."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    hit = (pred == targets).astype(np.float64)
    n = len(targets)
    onehot = np.eye(p.shape[1])[targets]
    ece = signed = 0.0
    counts, accs, confs = [], [], []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (conf >= lo) & ((conf <= hi) if b == n_bins - 1 else (conf < hi))
        counts.append(int(m.sum()))
        if m.any():
            accs.append(hit[m].mean())
            confs.append(conf[m].mean())
            ece += m.sum() / n * abs(hit[m].mean() - conf[m].mean())
            signed += m.sum() / n * (conf[m].mean() - hit[m].mean())
        else:
            accs.append(None)
            confs.append(None)
    order = np.lexsort((hit, conf))  # by confidence, ties by correctness
    aece = sum(
        abs(h.sum() - c.sum())
        for c, h in zip(np.array_split(conf[order], n_bins), np.array_split(hit[order], n_bins))
        if len(c)
    ) / n
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, : min(5, p.shape[1])]
    return {
        "ece": ece,
        "signed_ece": signed,
        "adaptive_ece": aece,
        "brier": ((p - onehot) ** 2).sum(axis=1).mean(),
        "top1": hit.mean(),
        "top5": (top5 == targets[:, None]).any(axis=1).mean(),
        "counts": counts,
        "accs": accs,
        "confs": confs,
    }


def _data(n: int = 300, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3.0
    targets = torch.randint(0, c, (n,), generator=g)
    # Confidences exactly 1.0 (a huge margin), some right and some wrong.
    logits[:20] = torch.linspace(0.0, 0.5, c)  # distinct, so top-5 has no ties
    logits[:20, 0] = 200.0
    targets[:10] = 0
    return logits, targets


def test_calibration_matches_numpy_streamed_over_unequal_batches() -> None:
    logits, targets = _data()
    probs = torch.softmax(logits.double(), dim=1)
    assert (probs.max(dim=1).values == 1.0).sum() >= 20  # exact 1.0 confidences are present
    ref = _reference(logits.numpy(), targets.numpy(), 10)
    assert ref["counts"][0] == 0  # 10 classes: bin [0, 0.1) is empty
    metric = Calibration(n_bins=10)
    start = 0
    for size in (1, 0, 37, 100, 162):  # unequal sizes, one empty batch
        metric.update(logits[start : start + size], targets[start : start + size])
        start += size
    assert start == len(targets)
    out = metric.compute()
    for key in ("ece", "signed_ece", "adaptive_ece", "brier", "top1", "top5"):
        assert out[key] == pytest.approx(ref[key], abs=cal_atol(logits)), key
    assert out["nll"] == pytest.approx(F.cross_entropy(logits.double(), targets).item(), abs=cal_atol(logits))
    table = out["reliability"]
    assert [row["count"] for row in table] == ref["counts"]
    assert sum(row["count"] for row in table) == len(targets)  # nothing dropped, 1.0 included
    assert table[-1]["upper"] == 1.0 and table[-1]["count"] >= 20
    for row, acc, conf in zip(table, ref["accs"], ref["confs"]):
        if acc is None:
            assert row["accuracy"] is None and row["confidence"] is None
        else:
            # accuracy: a whole-number count / count on both sides (exact); confidence: a bin's mean of <= n softmax
            # maxima, each within (C + 4) u: inside cal_atol
            assert row["accuracy"] == acc and row["confidence"] == pytest.approx(conf, rel=0, abs=cal_atol(logits))
    one_shot = calibration(logits, targets)
    assert one_shot["ece"] == pytest.approx(out["ece"], abs=cal_atol(logits))
    assert one_shot["adaptive_ece"] == pytest.approx(out["adaptive_ece"], abs=cal_atol(logits))


@pytest.mark.parametrize("n_bins", [1, 3, 15])
def test_calibration_other_bin_counts_and_few_classes(n_bins: int) -> None:
    logits, targets = _data(n=90, c=3, seed=n_bins)
    ref = _reference(logits.numpy(), targets.numpy(), n_bins)
    out = calibration(logits, targets, n_bins=n_bins)
    for key in ("ece", "signed_ece", "adaptive_ece", "brier"):
        assert out[key] == pytest.approx(ref[key], abs=cal_atol(logits)), key
    assert out["top5"] == 1.0  # top-min(5, C) with 3 classes


def test_calibration_perfect_and_overconfident() -> None:
    # Confident and always right: ECE 0, Brier ~0; confident and always wrong: signed ECE ~ +1.
    logits = torch.zeros(8, 4)
    logits[:, 2] = 100.0
    # exp(-100) = 3.7e-44 vanishes against 1 in float64 (u = 1.1e-16): the softmax's sum is 1.0, its log 0, the
    # confidence 1.0 and p_true 1.0 or 3.7e-44; so ECE = |1 - 1|, signed ECE = 1 - 0 and Brier = 1 + 1 exactly
    assert calibration(logits, torch.full((8,), 2))["ece"] == 0.0
    wrong = calibration(logits, torch.zeros(8, dtype=torch.long))
    assert wrong["signed_ece"] == 1.0 and wrong["brier"] == 2.0


def test_calibration_merge_and_bounded_store() -> None:
    logits, targets = _data(n=200)
    full = Calibration(n_bins=10)
    full.update(logits, targets)
    a, b = Calibration(n_bins=10, seed=1), Calibration(n_bins=10, seed=2)
    a.update(logits[:70], targets[:70])
    b.update(logits[70:], targets[70:])
    merged = a.merge(b).compute()
    ref = full.compute()
    for key in ("ece", "nll", "brier", "top1", "adaptive_ece"):
        assert merged[key] == pytest.approx(ref[key], abs=cal_atol(logits)), key
    small = Calibration(n_bins=10, max_stored=50)
    for s in range(0, 200, 30):
        small.update(logits[s : s + 30], targets[s : s + 30])
    out = small.compute()
    assert not out["adaptive_ece"] != out["adaptive_ece"]  # not NaN
    assert out["adaptive_ece_exact"] is False and small._compact()[1].numel() == 50
    assert out["ece"] == pytest.approx(ref["ece"], abs=cal_atol(logits))  # additive sums: not the bounded store
    assert ref["adaptive_ece_exact"] is True


def test_calibration_bad_input() -> None:
    logits, targets = _data(n=10)
    with pytest.raises(ValueError, match="mismatched label count"):
        calibration(logits, targets[:9])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 9\]"):
        calibration(logits, targets + 10)
    with pytest.raises(ValueError, match="shape \\(batch, num_classes\\)"):
        calibration(logits[0], targets)
    with pytest.raises(ValueError, match="NaN"):
        calibration(logits.masked_fill(torch.eye(10, dtype=torch.bool), float("nan")), targets)
    with pytest.raises(ValueError, match="no examples"):
        Calibration().compute()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    c=st.integers(2, 12),
    n_bins=st.integers(1, 20),
    scale=st.sampled_from([0.1, 3.0, 50.0]),  # 50: many confidences of exactly 1.0
    cuts=st.lists(st.integers(0, 60), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_calibration_property_any_split(n: int, c: int, n_bins: int, scale: float, cuts: list, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, c, (n,), generator=g)
    ref = _reference(logits.numpy(), targets.numpy(), n_bins)
    metric = Calibration(n_bins=n_bins)
    bounds = [0, *sorted(min(k, n) for k in cuts), n]
    for a, b in zip(bounds, bounds[1:]):
        metric.update(logits[a:b], targets[a:b])
    out = metric.compute()
    for key in ("ece", "signed_ece", "adaptive_ece", "brier", "top1"):
        assert out[key] == pytest.approx(ref[key], abs=cal_atol(logits)), key
    assert [row["count"] for row in out["reliability"]] == ref["counts"]
