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
    lo, hi = t["ratio_ci95"]
    assert lo <= t["ratio_geomean"] <= hi and t["goal_verdict"] in ("met", "not met", "inconclusive")
    with pytest.raises(SystemExit, match="unknown check"):
        gpu_check.main(["--tiny", "--device", "cpu", "--only", "bogus", "--out", str(tmp_path / "x.json")])


def test_ratio_interval_and_goal_verdict(gpu_check):
    from fractions import Fraction

    import mpmath as mp
    from scipy import stats

    ratios = [1.02, 0.98, 1.04, 1.01, 0.99]
    got = gpu_check._ratio_interval(ratios)
    logs = [math.log(r) for r in ratios]  # the same doubles as the script's
    # reference to 40 digits from the exact rational mean and variance of those doubles; the t quantile is scipy's
    # at the same probability on both sides (scipy's own accuracy is not what is tested here)
    n, u = len(logs), 2.0**-53
    mean_q = sum(Fraction(v) for v in logs) / n
    var_q = sum((Fraction(v) - mean_q) ** 2 for v in logs) / (n - 1)
    q = stats.t.ppf(0.5 + 0.95 / 2, n - 1)
    with mp.workdps(40):
        mean = mp.mpf(mean_q.numerator) / mean_q.denominator
        half = mp.mpf(q) * mp.sqrt(mp.mpf(var_q.numerator) / var_q.denominator) / mp.sqrt(n)
        want = [float(mp.exp(mean - half)), float(mp.exp(mean + half)), float(mp.exp(mean))]
    # the script: fmean = fsum / n (2 u |mean|), stdev correctly rounded from the exact variance (u; 2 u taken for
    # older Pythons), / sqrt(n) and * q (u/2 + 2 u): half within 5 u; exp within 1 ulp (2 u, glibc) of exp of its
    # rounded argument (mean -+ half rounds once more), which moves it by expm1 of the argument's absolute error;
    # the reference's own rounding u
    mean_err, half_err = 2 * u * abs(float(mean)), 5 * u * float(half)
    ends = mean_err + half_err + u * (abs(float(mean)) + float(half))
    for value, ref, arg_err in zip([*got["ratio_ci95"], got["ratio_geomean"]], want, (ends, ends, mean_err)):
        assert abs(value - ref) <= (math.expm1(arg_err) + 3 * u) * ref, (value, ref)
    assert gpu_check._goal_verdict(got["ratio_ci95"], 1.05) == "met"  # upper bound ~1.03
    assert gpu_check._goal_verdict([1.06, 1.10], 1.05) == "not met"
    assert gpu_check._goal_verdict([0.89, 1.14], 1.05) == "inconclusive"  # the first H200 run's spread
    assert gpu_check._goal_verdict(gpu_check._ratio_interval([1.0])["ratio_ci95"], 1.05) == "inconclusive"
