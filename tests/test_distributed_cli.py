"""``torchrun --nproc_per_node 2 -m vitscope probe|hessian|robustness|landscape`` on 2 gloo processes writes
(rank 0 alone) the same tables as one process, with ``world_size`` and ``examples_per_rank`` in the outputs.

One torchrun launch runs the three commands in turn (the process group opened by the first is reused), to
pay the start-up of two Python processes once.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch

from _helpers import assert_close_tree, merged_sum_bounds
from vitscope.cli import main

DATA = "fake:n=40,n_eval=37,classes=4,size=32"  # val: 37 examples in batches of 8: ranks get 21 and 16
COMMANDS = {
    "probe": ["probe", "--model", "test_vit_cb", "--data", DATA, "--batch-size", "8", "--measures",
              "attention_entropy,cka,feature_variance,linear_probe", "--shots", "2"],
    "hessian": ["hessian", "--model", "test_vit_cb", "--data", DATA, "--batch-size", "8", "--batches", "3",
                "--k", "2", "--max-iter", "30", "--no-progress"],
    "robustness": ["robustness", "--model", "test_vit_cb", "--data", DATA, "--split", "val", "--batch-size", "8",
                   "--suite", "calibration,occlusion,fgsm", "--eps", "2/255", "--no-plots", "--no-progress"],
    "landscape": ["landscape", "--model", "test_vit_cb", "--data", DATA, "--split", "val", "--batch-size", "8",
                  "--batches", "5", "--dims", "1", "--steps", "3", "--no-progress"],
    "compare": ["compare", "test_vit_cb", "test_resnet_cifar", "--data", DATA, "--batch-size", "8", "-j", "0",
                "--measures", "cka,linear_probe", "--shots", "2"],
}
DRIVER = """
import sys
import torch
torch.set_num_threads(1)
from vitscope.cli import main
out = sys.argv[1]
commands = {commands!r}
for name, argv in commands.items():
    rc = main(argv + ["--out", out + "/" + name])
    assert rc == 0, (name, rc)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(d, name):
    return json.loads((d / name).read_text())


def test_torchrun_two_processes_write_the_one_process_tables(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(commands=COMMANDS))
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(ddp)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == len(COMMANDS)  # rank 0 alone reports (and writes)
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float32 kernels, so a batch's Hessian is the same bits
    try:
        for name, argv in COMMANDS.items():
            assert main(argv + ["--out", str(one / name)]) == 0
    finally:
        torch.set_num_threads(threads)

    meta = _load(ddp / "probe", "meta.json")
    assert meta["world_size"] == 2 and meta["examples_per_rank"] == [21, 16] and meta["examples"] == 37
    single = _load(one / "probe", "meta.json")
    assert single["world_size"] == 1 and single["examples_per_rank"] == [37]
    assert meta["accuracy"] == single["accuracy"]  # hit counts / N: exact
    # the NLL: float64 sums of the 5 batches' NLL sums (>= 0) in another order, each within 4 u of the exact sum,
    # then one division each
    assert abs(meta["nll"] - single["nll"]) <= (2 * 4 + 2) * 2.0**-53 * single["nll"]
    probe1 = _load(one / "probe", "results.json")
    heads = max(len(r["heads"]) for r in probe1["attention_entropy"]["rows"])
    assert_close_tree(probe1, _load(ddp / "probe", "results.json"), "probe", bounds=merged_sum_bounds(5, heads))

    h1, h2 = _load(one / "hessian", "hessian.json"), _load(ddp / "hessian", "hessian.json")
    assert h2["config"]["world_size"] == 2 and h2["config"]["examples_per_rank"] == [16, 8]
    assert h1["batch_sizes"] == h2["batch_sizes"] == [8, 8, 8]
    # each batch's eigenvalues are computed whole on one rank, with the batch's own seed and the same kernels as
    # one process (one thread each): the same operations, equal bit for bit
    assert h2["groups"]["all"]["eigenvalues"] == h1["groups"]["all"]["eigenvalues"]

    r1, r2 = _load(one / "robustness", "results.json"), _load(ddp / "robustness", "results.json")
    r1 = r1.get("results", r1)
    r2 = r2.get("results", r2)
    assert r2["world_size"] == 2 and r2["examples_per_rank"] == [21, 16] and r2["n"] == 37
    skip = ("world_size", "examples_per_rank", "meta")
    assert_close_tree({k: v for k, v in r1.items() if k not in skip}, {k: v for k, v in r2.items() if k not in skip},
                      "robustness", bounds=merged_sum_bounds(5))

    l1, l2 = _load(one / "landscape", "landscape.json"), _load(ddp / "landscape", "landscape.json")
    assert l2["world_size"] == l2["run"]["world_size"] == 2 and l2["examples_per_rank"] == [21, 16]
    assert l1["examples_per_rank"] == [37] and l1["n_examples"] == l2["n_examples"] == 37
    # each batch's float32 loss is the same bits on its rank (one thread each) and loss * n is exact in float64;
    # the per-point sums of the 5 batch terms >= 0 then run in another order: each within 4 u of the exact sum
    np.testing.assert_allclose(l2["loss"], l1["loss"], rtol=2 * 5 * 2.0**-53, atol=0)
    assert l2["accuracy"] == l1["accuracy"]

    # compare: the (La x Lb) HSIC sums and the probes' correct counts add over the ranks; every rank fits the same
    # probe on the same fit examples. Each batch's HSIC terms are the same bits on either side, their float64 sums
    # over the 5 batches run in another order: merged_sum_bounds' CKA bound, s (1 + |c|) + 5 u |c|, s = 8 u
    c1, c2 = _load(one / "compare", "results.json"), _load(ddp / "compare", "results.json")
    m1, m2 = _load(one / "compare", "meta.json"), _load(ddp / "compare", "meta.json")
    assert m2["world_size"] == 2 and m1["examples"] == m2["examples"] == 37
    cka1, cka2 = np.array(c1["cka_cross"]["matrix"]), np.array(c2["cka_cross"]["matrix"])
    u = 2.0**-53
    assert (np.abs(cka2 - cka1) <= 8 * u * (1 + np.abs(cka1)) + 5 * u * np.abs(cka1)).all()
    assert [r["accuracy"] for r in c2["linear_probe"]["rows"]] == [r["accuracy"] for r in c1["linear_probe"]["rows"]]
