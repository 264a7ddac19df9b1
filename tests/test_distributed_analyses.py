"""The analyses on two gloo ranks: probe, the Hessian spectrum over batches, the robustness suite and the loss
landscape with ``shard=True`` equal one process on the same loader (to float round-off), every example counted
once.

37 examples in batches of 8 (8, 8, 8, 8, 5): rank 0 takes global batches 0, 2, 4 (21 examples), rank 1
takes 1, 3 (16), so the shares are unequal and the short batch sits on one rank only.
"""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from _helpers import assert_close_tree, merged_sum_bounds
from vitscope.curvature import eigenvalue_spectrum, loss_landscape
from vitscope.distributed import Batches, DistInfo, shard_batches
from vitscope.robustness import evaluate_cifar_c, evaluate_robustness

N, BATCH = 37, 8
PROBE = ["attention_entropy", "attention_distance", "cka", "ratio_of_norms", "fourier", "feature_variance"]


def _model():
    torch.manual_seed(0)
    return vitscope.create_model("test_vit_cb", num_classes=4).eval()


def _loader(shuffle=False):
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.rand(N, 3, 32, 32, generator=g), torch.randint(0, 4, (N,), generator=g))
    return DataLoader(ds, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(5))


def _cifar_c(path):
    rng = np.random.default_rng(0)
    np.save(os.path.join(path, "fog.npy"), rng.integers(0, 256, size=(5 * 7, 32, 32, 3), dtype=np.uint8))
    np.save(os.path.join(path, "labels.npy"), rng.integers(0, 4, size=5 * 7).astype(np.uint8))


def _analyses(path):
    model = _model()
    probe = vitscope.probe(model, _loader(), PROBE, progress=False, shard=True)
    spec = eigenvalue_spectrum(model, _loader(shuffle=True), k=2, max_batches=4, max_iter=30, shard=True)
    rob = evaluate_robustness(model, _loader(), ("calibration", "occlusion", "fgsm", "pgd", "frequency"),
                              mean=(0.5,) * 3, std=(0.25,) * 3, eps=(2 / 255,), pgd_steps=2, freqs=(0.0, 0.5, 1.0),
                              progress=False, shard=True)
    one_batch = evaluate_robustness(model, _loader(), ("calibration", "occlusion"), mean=(0.5,) * 3, std=(0.25,) * 3,
                                    max_batches=1, progress=False, shard=True)  # rank 1 gets no batch
    cifar_c = evaluate_cifar_c(model, path, ["fog"], (1, 3), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=3,
                               progress=False, shard=True)  # 3 batches (3, 3, 1) per severity
    land = loss_landscape(model, None, _loader(shuffle=True), dims=2, steps=3, span=0.5, weight_decay=0.01,
                          shard=True).to_dict()
    return probe, spec, rob, one_batch, cifar_c, land


def _log_amplitude_bound() -> float:
    """A bound L on |log(|DFT coefficient| + 1e-6)| over the probe's maps: at least log(1e-6), at most
    log(S max|x| + 1e-6) (a coefficient is at most the sum of the S = N tokens' |x|), from every stream the probe
    can map (all sub-layers' inputs and outputs on all N examples)."""
    model = _model()
    x = torch.cat([b[0] for b in _loader()])
    with torch.no_grad(), vitscope.capture(model) as cap:
        model(x)
    streams = [t for pair in cap.residuals for t in pair]  # (B, N, D) each
    top = max(float(t.abs().max()) for t in streams)
    tokens = max(t.shape[1] for t in streams)
    return max(-math.log(1e-6), math.log(tokens * top + 1e-6))


def _nan_on_rank_1():
    """Only global batch 1 (rank 1's) has NaN inputs: both ranks must raise, neither may hang."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 32, 32, generator=g)
    x[8:] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.randint(0, 4, (16,), generator=g)), batch_size=8)
    try:
        loss_landscape(_model(), None, loader, steps=1, shard=True)
    except ValueError as e:
        return str(e)
    return None


def _worker(rank: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=2)
    try:
        probe, spec, rob, one_batch, cifar_c, land = _analyses(path)
        nan_error = _nan_on_rank_1()
        with open(os.path.join(path, f"out{rank}.pkl"), "wb") as f:
            pickle.dump((probe.to_dict(), probe.meta, spec.to_dict(), rob, one_batch, cifar_c, land, nan_error), f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    _cifar_c(tmp_path)
    # fork: the workers inherit the imported modules (spawn would import torch, timm and vitscope twice more)
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    outs = [pickle.loads((tmp_path / f"out{r}.pkl").read_bytes()) for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe, spec, rob, one_batch, cifar_c, land = _analyses(str(tmp_path))  # no process group: one process
    finally:
        torch.set_num_threads(threads)
    assert "non-finite loss" in outs[1][-1] and "batch 1" in outs[1][-1]  # the rank that met it
    assert "another process met a non-finite loss" in outs[0][-1]
    heads = max(len(r["heads"]) for r in probe.to_dict()["attention_entropy"]["rows"])
    probe_bounds = merged_sum_bounds(5, heads, log_amplitude=_log_amplitude_bound())
    for probe_d, meta, spec_d, rob_d, one_batch_d, cifar_c_d, land_d, _ in outs:  # every rank: the merged result
        assert meta["world_size"] == 2 and meta["examples_per_rank"] == [21, 16] and meta["examples"] == N
        assert probe.meta["world_size"] == 1 and probe.meta["examples_per_rank"] == [N]
        assert_close_tree(probe.to_dict(), probe_d, "probe", bounds=probe_bounds)
        assert meta["accuracy"] == probe.meta["accuracy"]  # hit counts / N: exact
        # each batch's float64 NLL sum is the same bits (the same batch, one thread); the 5 sums (>= 0) added in
        # another order ((b0 + b2 + b4) + (b1 + b3) vs left to right), each within 4 u of the exact sum, then the
        # division by N (exact) rounds once a side
        assert meta["nll"] == pytest.approx(probe.meta["nll"], rel=(2 * 4 + 2) * 2.0**-53, abs=0)
        assert probe_d["cka"]["examples"] == N

        one = spec.to_dict()
        assert spec_d["batch_sizes"] == one["batch_sizes"] == [8, 8, 8, 8]
        assert spec_d["config"]["world_size"] == 2 and spec_d["config"]["examples_per_rank"] == [16, 16]
        assert spec_d["n_hvp"] == one["n_hvp"]
        for g in one["groups"]:
            # batch order kept: row i is global batch i, computed whole on one rank with its own seed and one
            # thread as here: the same operations, equal bit for bit
            assert spec_d["groups"][g]["eigenvalues"] == one["groups"][g]["eigenvalues"]
            # the same numpy operations on the same eigenvalues: the density equal bit for bit
            assert_close_tree(one["groups"][g]["density"], spec_d["groups"][g]["density"])

        assert rob_d["world_size"] == 2 and rob_d["examples_per_rank"] == [21, 16] and rob_d["n"] == N
        # calibration's sums over the 5 batches in another order (merged_sum_bounds); the attacks' accuracies are
        # hit counts / n: exact
        assert_close_tree({k: v for k, v in rob.items() if k not in ("world_size", "examples_per_rank")},
                          {k: v for k, v in rob_d.items() if k not in ("world_size", "examples_per_rank")},
                          "robustness", bounds=merged_sum_bounds(5))
        assert one_batch_d["examples_per_rank"] == [8, 0] and one_batch_d["n"] == one_batch["n"] == 8
        # one batch on rank 0, zero sums on rank 1: the all-reduce adds 0.0, exactly
        assert_close_tree({k: v for k, v in one_batch.items() if k not in ("world_size", "examples_per_rank")},
                          {k: v for k, v in one_batch_d.items() if k not in ("world_size", "examples_per_rank")},
                          "one batch")
        assert_close_tree(cifar_c, cifar_c_d, "cifar_c")  # hit counts / n and their mean: exact

        assert land_d["world_size"] == 2 and land_d["examples_per_rank"] == [21, 16] and land_d["n_examples"] == N
        assert land["world_size"] == 1 and land["examples_per_rank"] == [N]
        # (3, 3): each batch's float32 loss is the same bits (times its size: exact in float64); the float64 sums of
        # 5 terms >= 0 run in another order, each within 4 u of the exact sum; then the division by N and the
        # addition of the L2 term (>= 0, the same bits) round once each
        np.testing.assert_allclose(land_d["loss"], land["loss"], rtol=(2 * 4 + 2) * 2.0**-53, atol=0)
        assert land_d["accuracy"] == land["accuracy"]  # hit counts / N: exact
        skip = ("world_size", "examples_per_rank", "loss")  # the rest: hit counts / N and the settings, exact
        assert_close_tree({k: v for k, v in land.items() if k not in skip},
                          {k: v for k, v in land_d.items() if k not in skip}, "landscape")


def test_shard_batches_counts_each_batch_once():
    loader = _loader()
    seen = []
    for r in (0, 1, 2):
        got = list(shard_batches(loader, info=DistInfo(rank=r, world_size=3)))
        assert [i for i, _ in got] == list(range(r, 5, 3))
        seen += [int(x) for _, (_, y) in got for x in range(len(y))]
    assert len(seen) == N  # no padding, no drop
    limited = list(shard_batches(loader, max_batches=3, info=DistInfo(rank=1, world_size=2)))
    assert [i for i, _ in limited] == [1]
    gen = list(shard_batches(iter(list(loader)), info=DistInfo(rank=1, world_size=2)))  # a plain iterable
    assert [i for i, _ in gen] == [1, 3]
    with pytest.raises(ValueError, match="2 batch\\(es\\) for 3 processes"):
        list(shard_batches(loader, max_batches=2, info=DistInfo(rank=0, world_size=3)))


def test_batches_walks_loads_and_counts():
    """``Batches`` in one process: the raw batches with their indices, none loaded past ``max_batches``, the
    bar's total and count in ``steps`` per batch (``step`` within a batch, the rest after it)."""
    loader = _loader()
    drawn = []

    def counted():
        for b, (x, _) in enumerate(loader):
            drawn.append(b)
            yield x  # bare images, no labels

    got = list(Batches(counted(), max_batches=3))
    assert [i for i, _ in got] == [0, 1, 2] and drawn == [0, 1, 2]  # batch 3 never loaded
    assert all(torch.equal(x, xl) for (_, x), (xl, _) in zip(got, loader))
    for shard in (False, True):  # one rule with or without sharding
        with pytest.raises(ValueError, match="max_batches must be a positive"):
            list(Batches(loader, max_batches=0, shard=shard))
    walk = Batches(loader, max_batches=2, progress=True, steps=3)
    for i, _ in walk:
        if i == 0:
            walk.step(2)
    assert (walk._bar.total, walk._bar.n) == (6, 6)
