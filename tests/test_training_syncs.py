"""train_one_epoch never makes the host wait for the device between the non-finite checks.

A host sync (``.item()``, ``bool(tensor)``, ``.tolist()``, ...) stops the CPU from queueing the next
step's kernels; the loop keeps its losses on the device and syncs only every ``nonfinite_check_every``
steps. On the CPU a sync is counted by wrapping torch.Tensor's host-reading methods; the NaN step and
the epoch's mean loss are checked against independent references, also with 2 gloo processes.
"""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from _helpers import count_host_reads, register_nan_model
from vitscope.distributed import DistInfo
from vitscope.training import NonFiniteLossError, resolve_config, train, train_one_epoch
from vitscope.training.checkpoint import latest_checkpoint, read_jsonl
from vitscope.training.loop import NONFINITE_CHECK_EVERY

# Tensor methods that copy device data to the host (each a sync on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every call of a host-reading Tensor method (from any code: torch, timm, vitscope)."""
    return count_host_reads(monkeypatch, HOST_READS)


def _batches(n: int, batch: int = 4, last: int | None = None, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [batch] * n if last is None else [batch] * (n - 1) + [last]
    return [(torch.randn(b, 5, generator=gen), torch.randint(0, 3, (b,), generator=gen)) for b in sizes]


class NanAt(nn.Module):
    """A linear classifier whose training forward number ``nan_at`` (0-based) and later ones return NaN."""

    def __init__(self, nan_at: int | None = None, rank_only: int | None = None):
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, x):
        out = self.head(x)  # (B, 3)
        if self.training:
            if self.nan_at is not None and self.calls >= self.nan_at:
                out = out * float("nan")
            self.calls += 1
        return out


@pytest.mark.parametrize("steps, every", [(53, NONFINITE_CHECK_EVERY), (10, 4), (10, 1)])
def test_an_epoch_reads_the_device_once_per_check(host_reads, steps, every):
    """SGD + momentum, a per-update cosine schedule, EMA and gradient clipping: the default loop's pieces."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=2, warmup_epochs=1, step_on_epochs=False,
                                   updates_per_epoch=steps)
    ema = ModelEmaV3(model, decay=0.9)
    host_reads.clear()  # only the epoch counts
    stats = train_one_epoch(model, _batches(steps), opt, nn.CrossEntropyLoss(), 0, scheduler=sched, ema=ema,
                            clip_grad=1.0, nonfinite_check_every=every)
    assert stats["steps"] == steps and math.isfinite(stats["loss"])
    assert len(host_reads) == math.ceil(steps / every), host_reads  # one .tolist() per check, nothing per step


def test_the_progress_bar_reads_the_loss_only_at_the_checks(host_reads):
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    host_reads.clear()
    train_one_epoch(model, _batches(12), opt, nn.CrossEntropyLoss(), 0, progress=True, nonfinite_check_every=5)
    assert len(host_reads) == 3, host_reads


def test_epoch_loss_is_the_mean_over_all_images():
    """lr 0 keeps the weights fixed: the epoch loss is the plain per-image cross-entropy mean (a short last
    batch weighs less), whatever the check interval."""
    batches = _batches(7, batch=4, last=3, seed=1)
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    batches = [(x.double(), y) for x, y in batches]
    with torch.no_grad():  # each image's loss from the loop's own per-batch forward: the same float64 logits
        terms = torch.cat([F.cross_entropy(model(xb), yb, reduction="none") for xb, yb in batches])  # (27,)
    want = math.fsum(terms.tolist()) / len(terms)  # the exact sum rounded once, the division once
    for every in (1, 3, 25):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        stats = train_one_epoch(model, batches, opt, nn.CrossEntropyLoss(), 0, nonfinite_check_every=every)
        assert stats["images"] == 27
        # the same per-image values (terms >= 0) summed otherwise: each batch's mean of B <= 4 (B u), times B (u),
        # a window's fsum (u), the epoch's W = ceil(7 / every) window adds ((W - 1) u) and the division (u); the
        # reference 2 u: (B + W + 4) u relative
        windows = math.ceil(len(batches) / every)
        assert abs(stats["loss"] - want) <= (4 + windows + 4) * 2.0**-53 * want


@pytest.mark.parametrize("every", [1, 2, 4, 25])
def test_nan_at_step_3_of_10_is_named_and_stops_at_the_next_check(every):
    model = NanAt(nan_at=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"Non-finite training loss \(nan\) at epoch 2, step 3;"):
        train_one_epoch(model, _batches(10), opt, nn.CrossEntropyLoss(), 2, step_offset=20,
                        nonfinite_check_every=every)
    assert model.calls == min(math.ceil(4 / every) * every, 10)  # no step past the first check that saw it


def test_bad_check_interval_is_refused():
    with pytest.raises(ValueError, match="nonfinite_check_every must be >= 1"):
        train_one_epoch(nn.Linear(5, 3), _batches(1), torch.optim.SGD(nn.Linear(5, 3).parameters(), lr=0.1),
                        nn.CrossEntropyLoss(), 0, nonfinite_check_every=0)


def test_train_reports_nan_at_step_3_and_saves_nothing(tmp_path):
    """fake:n=320 at batch 32: 10 steps per epoch; the NaN at step 3 is found at the end-of-epoch check."""
    cfg = resolve_config("cpu-quick", model=register_nan_model(3), data="fake:n=320,n_eval=8",
                         out=str(tmp_path / "run"), epochs=2, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 3;.*No checkpoint was written"):
        train(cfg)
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    assert read_jsonl(run / "metrics.jsonl") == []
    assert not (run / "model.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, results) -> None:  # noqa: ANN001
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        info = DistInfo(rank, 2)
        torch.manual_seed(0)
        model = NanAt()  # finite: the epoch loss over both processes' images (rank 1's last batch is short)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        batches = _batches(5, last=2 if rank else None, seed=rank)
        stats = train_one_epoch(model, batches, opt, nn.CrossEntropyLoss(), 0, dist_info=info,
                                nonfinite_check_every=2)
        with torch.no_grad():  # each image's float32 loss from the loop's per-batch forward, summed in float64
            terms = torch.cat([F.cross_entropy(model(xb), yb, reduction="none") for xb, yb in batches]).double()
        both = torch.stack([terms.sum(), torch.tensor(float(len(terms)), dtype=torch.float64)])
        torch.distributed.all_reduce(both)
        model = NanAt(nan_at=3 if rank == 1 else None)  # NaN on rank 1 only, from step 3 on
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            train_one_epoch(model, _batches(10, seed=rank), opt, nn.CrossEntropyLoss(), 4, dist_info=info,
                            nonfinite_check_every=4)
            error = ""
        except NonFiniteLossError as e:
            error = str(e)
        results.put((rank, stats["loss"], stats["images"], (both[0] / both[1]).item(), both[1].item(), error,
                     model.calls))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_sum_the_loss_and_stop_together_at_the_first_nan():
    ctx = mp.get_context("fork")  # no CUDA here; fork skips re-importing torch (spawn takes ~15 s more)
    results = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(_free_port(), results), nprocs=2, start_method="fork")
    got = sorted(results.get() for _ in range(2))
    for rank, loss, images, want_loss, want_images, error, calls in got:
        assert images == want_images == 38, rank  # 5 x 4 + 4 x 4 + 2
        # the same float32 per-image losses (>= 0); the loop means each batch of B <= 4 in float32 (B u32 relative),
        # the rest in float64 on both sides (38 terms, the rows' all-reduce, windows, divisions: < 50 u64)
        assert abs(loss - want_loss) <= (4 * 2.0**-24 + 50 * 2.0**-53) * want_loss, rank
        assert "at epoch 4, step 3;" in error, (rank, error)  # both ranks raise, naming rank 1's step
        assert calls == 4, rank  # both stopped at the same check (after step 3)
