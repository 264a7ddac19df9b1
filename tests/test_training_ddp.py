"""DistributedDataParallel on CPU (gloo): ``torchrun --nproc_per_node 2 -m vitscope train`` with the global
batch split over 2 processes equals, bit for bit, one process that computes the same half-batch gradients.

Why bit for bit, and why a tolerance would not do: each rank computes the gradient of its mean loss over
B/2 images; DDP divides it by the world size and all-reduces (sums) it. The one-process reference below
computes the same two half-batch gradients with the same operations on tensors of the same shapes, with one
thread as the ranks (``OMP_NUM_THREADS=1``), so each is bitwise the ranks' own; dividing by 2 is exact and
a sum of two floats does not depend on their order, so the averaged gradient, and every update built from it
(SAM's ascent, AdamW, the schedule), is the ranks' bit for bit. One process that takes the gradient of the
mean over all B images instead sums the same terms in another order: with AdamW and SAM, which rescale
gradients elementwise, that rounding noise grows into differences no float tolerance bounds (7e-5 after
8 steps on one 2-core machine, 1e-6 on another), so the test compares with the reduction order made equal.
A single-process ``train()`` run checks that DDP writes the same records and files.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import socket
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from vitscope.data import create_loader
from vitscope.training import SAM, build_model, resolve_config, train
from vitscope.training.builders import augment_options, build_criterion, build_optimizer, build_scheduler
from vitscope.training.checkpoint import load_state, read_jsonl
from vitscope.training.engine import strip_timing
from vitscope.training.loaders import preprocess_mode, resolve_preprocessing
from vitscope.training.probes import run_probes

# SAM, EMA and probes on ConViT too: a probe forward resizes GPSA's rel_indices buffer, which DDP broadcasts.
OVERRIDES = ["epochs=2", "batch_size=32", "lr=0.01", "warmup_epochs=0", "augment=false", "deterministic=true",
             "progress=false", "seed=3", "sam_rho=0.05", "model_ema=true", "model_ema_decay=0.5",
             "probes={every: 1, measures: [gpsa_gates, attention_entropy], num_images: 4}"]
DATA = "fake:n=128,n_eval=33"  # 33 validation images: shards of 17 and 16, every image counted once
COMMON = ["--config", "cpu-quick", "--model", "test_convit_32", "--data", DATA]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(cfg) -> tuple[torch.nn.Module, list[float], list[dict]]:
    """The run in one process with the ranks' reduction order: weights, each epoch's mean training loss, probes.

    Every update takes, for each of the two shards of the global batch (``DistributedSampler``, as the
    engine), the gradient of the shard's mean loss, divides it by the world size and adds the two: DDP's
    all-reduce. Initial weights, data, optimizer, schedule, SAM and probes come from the engine's builders.
    """
    cfg = dataclasses.replace(cfg, num_classes=10, preprocess=preprocess_mode(cfg))
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)  # the engine's initial weights
    model = build_model(cfg)
    preprocessing = resolve_preprocessing(cfg, model)
    common = dict(img_size=cfg.img_size, seed=cfg.seed, preprocessing=preprocessing)
    train_ds = create_loader(cfg.data, "train", batch_size=1, augment=augment_options(cfg), **common).dataset
    val_ds = create_loader(cfg.data, "val", batch_size=1, augment=False, **common).dataset
    probe_images = torch.stack([val_ds[i][0] for i in range(cfg.probes["num_images"])])  # (4, 3, 32, 32)
    samplers = [DistributedSampler(train_ds, num_replicas=WORLD, rank=r, shuffle=True, seed=cfg.seed,
                                   drop_last=True) for r in range(WORLD)]
    loaders = [DataLoader(train_ds, batch_size=cfg.batch_size // WORLD, sampler=s, drop_last=True) for s in samplers]
    optimizer = build_optimizer(model, cfg)
    scheduler, epochs = build_scheduler(optimizer, cfg, len(loaders[0]))
    sam, criterion = SAM(model.parameters(), rho=cfg.sam_rho), build_criterion(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    probes = run_probes(model, probe_images, cfg.probes["measures"], -1)

    def all_reduced_grad(shards: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        grads, losses = [], []
        for images, targets in shards:  # (16, 3, 32, 32), (16,)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(images), targets)
            loss.backward()
            grads.append([p.grad / WORLD for p in params])
            losses.append(loss.item())
        for p, *g in zip(params, *grads):
            p.grad = g[0] + g[1]
        return losses

    step, epoch_losses = 0, []
    model.train()
    for epoch in range(epochs):
        for s in samplers:
            s.set_epoch(epoch)
        weighted = []
        for shards in zip(*loaders):
            weighted += [loss * len(t) for loss, (_, t) in zip(all_reduced_grad(list(shards)), shards)]
            sam.ascend()
            all_reduced_grad(list(shards))
            sam.restore()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
        epoch_losses.append(math.fsum(weighted) / (len(weighted) * cfg.batch_size // WORLD))
        probes += run_probes(model, probe_images, cfg.probes["measures"], epoch)
        model.train()
    return model, epoch_losses, probes


def test_two_process_gloo_matches_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "vitscope", "train", *COMMON, "--out", str(ddp_dir),
           *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = resolve_config("cpu-quick", OVERRIDES, model="test_convit_32", data=DATA, out=str(tmp_path / "single"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: the same kernels, so the same bits
    try:
        model, want_loss, want_probes = _reference(cfg)
    finally:
        torch.set_num_threads(threads)

    got, want = load_file(ddp_dir / "model.safetensors"), model.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # every tensor, GPSA's pos_proj.bias too (its gradient is pure rounding noise)
        assert torch.equal(got[key], want[key]), (key, (got[key] - want[key]).abs().max().item())
    torch.manual_seed(3)  # the engine's initial weights: the run moved them, so equality is not trivial
    init = build_model(dataclasses.replace(cfg, num_classes=10)).state_dict()
    assert sum(not torch.equal(want[k], init[k]) for k in want) > len(want) // 2  # most tensors trained (exact)

    ddp_m = read_jsonl(ddp_dir / "metrics.jsonl")
    assert [r["epoch"] for r in ddp_m] == [0, 1]  # rank 0 alone wrote: one line per epoch
    for record, loss in zip(ddp_m, want_loss):
        # The same float32 losses, each times 16 exactly in float64; the all-reduce adds two such values (24-bit
        # significands within a few binades: the sum is exact in float64), the window's fsum and the reference's
        # round the same exact sum once, and both divide by 128 (exact): equal bit for bit
        assert record["train_loss"] == loss
    ddp_p = read_jsonl(ddp_dir / "probes.jsonl")
    assert len(ddp_p) == 6
    assert [(p["epoch"], p["measure"]) for p in ddp_p] == [(p["epoch"], p["measure"]) for p in want_probes]
    for d, s in zip(ddp_p, want_probes):  # rank 0's probes of the same weights on the same images
        np.testing.assert_array_equal(d["values"], s["values"])

    train(cfg)  # one process, gradient of the mean over all 32 images: the same records and files
    single_dir = tmp_path / "single"
    single_m = read_jsonl(single_dir / "metrics.jsonl")
    for d, s in zip(ddp_m, single_m):
        d, s = strip_timing(d), strip_timing(s)
        assert d.keys() == s.keys()
        assert d["val_n"] == s["val_n"] == 33 and d["train_images"] == s["train_images"] == 128
    state = load_state(ddp_dir)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG state is kept
    assert sorted(p.name for p in ddp_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl",
                                                          "model.safetensors", "probes.jsonl"]
    assert sorted(p.name for p in single_dir.iterdir()) == sorted(p.name for p in ddp_dir.iterdir())
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["epoch-0000", "epoch-0001"]  # last two
    single_p = read_jsonl(single_dir / "probes.jsonl")
    assert [(p["epoch"], p["measure"]) for p in ddp_p] == [(p["epoch"], p["measure"]) for p in single_p]
