"""benchmarks/gpu_check.py runs end to end on a CPU with tiny settings and writes its JSON report."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_on_cpu(gpu_check, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        report = gpu_check.main(["--tiny", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "probe / plain forward" in printed and "Hessian top-1" in printed and "training on" in printed
    for key in ("probe_over_plain", "plain_s", "probe_s"):
        assert math.isfinite(report["probe"][key]) and report["probe"][key] > 0
    h = report["hessian"]
    assert h["vitscope"]["hvps"] >= 2 and len(h["vitscope"]["eigenvalues"]) == report["settings"]["repeats"]
    if isinstance(h["pyhessian"], dict):  # same top eigenvalue from both solvers (tol 1e-3 each)
        assert h["eigenvalue_rel_diff"] < 0.05 and h["speedup_vs_pyhessian"] > 0
    t = report["training"]
    assert t["amp"] == "bf16" and t["channels_last"] and t["vitscope_images_per_s"] > 0 and t["timm_images_per_s"] > 0
    with pytest.raises(SystemExit, match="unknown check"):
        gpu_check.main(["--tiny", "--device", "cpu", "--only", "bogus", "--out", str(tmp_path / "x.json")])
