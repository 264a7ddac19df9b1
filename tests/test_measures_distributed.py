"""Two gloo ranks with unequal shares of the data: after ``sync()`` every streaming measure equals the
function over all the data."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitscope.measures import (
    AttentionEntropy,
    FeatureVariance,
    MinibatchCKA,
    Nonlocality,
    RatioOfNorms,
    attention_entropy,
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
    return attn, z, fz, maps


def _worker(rank: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=2)
    try:
        sl = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        attn, z, fz, maps = (t[sl] for t in data())
        ms = [AttentionEntropy(), Nonlocality(grid=3), RatioOfNorms(), FeatureVariance(), MinibatchCKA(2)]
        ms[0].update(attn)
        ms[1].update(attn)
        ms[2].update(z, fz)
        ms[3].update(maps)
        ms[4].update([z, maps])
        out = [m.sync().compute() for m in ms]
        if rank == 0:
            torch.save(out, os.path.join(path, "out.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_over_two_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ent, nl, ratio, var, cka_mat = torch.load(tmp_path / "out.pt", weights_only=True)
    attn, z, fz, maps = data()
    torch.testing.assert_close(ent, attention_entropy(attn))
    torch.testing.assert_close(nl, nonlocality(attn, 3))
    ref = ratio_of_norms(z, fz)
    torch.testing.assert_close(ratio["cls"], ref["cls"])
    torch.testing.assert_close(ratio["spatial"], ref["spatial"])
    torch.testing.assert_close(var, feature_variance(maps))
    # rank 0's batch of 3 is skipped (n <= 3), so the CKA is that of rank 1's batch alone
    single = MinibatchCKA(2)
    single.update([z[SPLIT:], maps[SPLIT:]])
    torch.testing.assert_close(cka_mat, single.compute())
