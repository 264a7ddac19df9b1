"""A decompression bomb in an image folder under torchrun (issue 23): every rank skips it and counts it with the
unreadable files, the job finishes and measures each good image once (it used to die with a traceback)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

from test_data_folders import _png_claiming


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_skips_a_decompression_bomb_and_the_job_finishes(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    _png_claiming(tmp_path / "imgs" / "a" / "bomb.png", 60000, 60000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vitscope", "probe", "--model", "test_vit_cifar",
           "--data", f"imagefolder:{tmp_path / 'imgs'}", "--measures", "attention_entropy", "-b", "2", "-j", "0",
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DecompressionBomb" not in proc.stderr.replace("decompression-bomb", "")
    assert proc.stderr.count("1 unreadable image(s); e.g.") == 2  # said by each rank, which scans the folder itself
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["examples"] == 8 and sum(meta["examples_per_rank"]) == 8
