"""vitscope.measures.evaluation: the one evaluation loop (batches, eval mode, no_grad, autocast, the reduction)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from vitscope.measures.evaluation import eval_batches, eval_loop


class _Keep:
    """A reduction that keeps what it is fed (and counts its syncs)."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.grad: list[bool] = []
        self.syncs = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.outputs.append(outputs)
        self.targets.append(targets)
        self.grad.append(torch.is_grad_enabled())

    def sync(self) -> None:
        self.syncs += 1


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    net[1].train()  # mixed flags: dropout training, the rest in eval mode
    net[0].eval()
    return net


def _data(n: int = 23) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g))


def test_eval_loop_feeds_the_first_batches_in_eval_mode_and_restores_each_flag():
    net, ds = _net(), _data()
    flags = [m.training for m in net.modules()]
    loader = DataLoader(ds, batch_size=5)  # 5 batches, the last of 3
    got = eval_loop(net, loader, _Keep(), torch.device("cpu"), max_batches=4)
    assert [m.training for m in net.modules()] == flags
    assert got.syncs == 0 and not any(got.grad)
    x, y = ds.tensors
    net.eval()
    with torch.no_grad():  # by hand: the same batches of 5 through the model, dropout off: the same kernels
        ref = torch.cat([net(x[i:i + 5]) for i in range(0, 20, 5)])
    assert torch.equal(torch.cat(got.targets), y[:20])
    assert torch.equal(torch.cat(got.outputs), ref)


def test_eval_loop_autocast_channels_last_and_sync():
    net, ds = _net(), _data(8)
    got = eval_loop(net, DataLoader(ds, batch_size=4), _Keep(), torch.device("cpu"), amp_dtype=torch.bfloat16,
                    channels_last=True, sync=True)
    assert got.syncs == 1
    assert all(o.dtype == torch.bfloat16 for o in got.outputs)  # the model ran under autocast


def test_eval_batches_indices_prepare_and_errors():
    ds = _data(10)
    seen = list(eval_batches(DataLoader(ds, batch_size=3), torch.device("cpu"), shard=True,
                             prepare=lambda x, y, d: (x.double(), y)))
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]  # one process: every batch, global indices
    assert all(x.dtype == torch.float64 for _, x, _ in seen)
    with pytest.raises(ValueError, match=r"must yield \(images, labels\) pairs"):
        list(eval_batches([torch.zeros(2, 3, 6, 6)], torch.device("cpu")))
    with pytest.raises(ValueError, match="max_batches must be a positive integer"):
        list(eval_batches(DataLoader(ds), torch.device("cpu"), 0))
