"""Two gloo ranks with unequal shares of the data: after ``sync()`` every streaming measure equals the
function over all the data."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import attention_sum_rtol, cal_atol, ratio_bound, variance_bound
from vitscope.measures import (
    AttentionEntropy,
    Calibration,
    FeatureVariance,
    MinibatchCKA,
    Nonlocality,
    RatioOfNorms,
    attention_entropy,
    calibration,
    feature_variance,
    nonlocality,
    ratio_of_norms,
)

SPLIT = 3  # rank 0 gets examples [0, 3), rank 1 gets [3, 11)


def data():
    g = torch.Generator().manual_seed(0)
    attn = (torch.randn(11, 2, 9, 9, generator=g) * 2).softmax(-1)
    z, fz = torch.randn(11, 5, 4, generator=g), torch.randn(11, 5, 4, generator=g)
    maps = torch.randn(11, 3, 4, 4, generator=g)
    logits, targets = torch.randn(11, 4, generator=g) * 3, torch.randint(0, 4, (11,), generator=g)
    return attn, z, fz, maps, logits, targets


def _worker(rank: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=2)
    try:
        sl = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        attn, z, fz, maps, logits, targets = (t[sl] for t in data())
        ms = [AttentionEntropy(), Nonlocality(grid=3), RatioOfNorms(), FeatureVariance(), MinibatchCKA(2),
              Calibration(n_bins=5, seed=rank), Calibration(n_bins=5, max_stored=2, seed=rank), Calibration(5, 0)]
        ms[0].update(attn)
        ms[1].update(attn)
        ms[2].update(z, fz)
        ms[3].update(maps)
        ms[4].update([z, maps])
        for m in ms[5:7]:
            m.update(logits, targets)
        if rank == 1:  # rank 0 saw no batch: it takes part in the sync with zeros
            ms[7].update(logits, targets)
        out = [m.sync().compute() for m in ms]
        if rank == 0:
            torch.save(out, os.path.join(path, "out.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_over_two_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ent, nl, ratio, var, cka_mat, cal, cal_small, cal_one = torch.load(tmp_path / "out.pt", weights_only=True)
    attn, z, fz, maps, logits, targets = data()
    # the same per-example terms (row-wise float64 operations on the same float32 values), summed over the two
    # ranks' shares instead of in one pass: each within the library-vs-numpy bounds of test_measures_attention /
    # test_measures_norms_spectral (which hold for any summation order)
    a64 = attn.double()
    torch.testing.assert_close(ent, attention_entropy(attn), rtol=attention_sum_rtol(a64), atol=0)
    # nonlocality sums the float32 maps over the batch in float32 (the measure's design): terms >= 0, each side's
    # batch sums (3 + 8 vs 11 maps) within gamma_10 of u32 = 2^-24 relative, then the same float64 weighting
    torch.testing.assert_close(nl, nonlocality(attn, 3), rtol=attention_sum_rtol(a64) + 2 * 10 * 2.0**-24, atol=0)
    ref = ratio_of_norms(z, fz)
    torch.testing.assert_close(ratio["cls"], ref["cls"], rtol=ratio_bound(z), atol=0)
    torch.testing.assert_close(ratio["spatial"], ref["spatial"], rtol=ratio_bound(z), atol=0)
    torch.testing.assert_close(var, feature_variance(maps), rtol=2 * variance_bound(maps.numpy(), 1, 2), atol=0)
    # rank 0's batch of 3 is skipped (n <= 3), so the CKA is that of rank 1's batch alone: rank 0 adds zeros
    single = MinibatchCKA(2)
    single.update([z[SPLIT:], maps[SPLIT:]])
    torch.testing.assert_close(cka_mat, single.compute(), rtol=0, atol=0)
    # calibration: sums all-reduced, adaptive-ECE stores gathered (all 11 kept; 2 of 11 when bounded); counts
    # exact, float sums in another order within cal_atol
    ref = calibration(logits, targets, n_bins=5)
    for key in ("n", "top1", "top5"):
        assert cal[key] == ref[key], key
    for key in ("nll", "brier", "ece", "signed_ece", "adaptive_ece"):
        assert cal[key] == pytest.approx(ref[key], rel=0, abs=cal_atol(logits)), key
    assert cal["reliability"] == ref["reliability"] and cal["adaptive_ece_exact"] is True
    assert cal_small["ece"] == pytest.approx(ref["ece"], rel=0, abs=cal_atol(logits))
    assert cal_small["adaptive_ece_exact"] is False
    # rank 0 saw no batch: its zero sums leave rank 1's unchanged (x + 0 = x), the same update as the one-shot
    part = calibration(logits[SPLIT:], targets[SPLIT:], n_bins=5)
    for key in ("n", "nll", "ece", "brier"):
        assert cal_one[key] == part[key], key
    assert cal_one["adaptive_ece"] is None
