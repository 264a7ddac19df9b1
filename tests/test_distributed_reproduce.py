"""``vitscope reproduce`` on two gloo ranks (the process group opened from the torchrun environment, as
``torchrun --nproc_per_node 2 -m vitscope reproduce`` does): every rank trains each run with DDP, rank 0 alone
locks and writes it, the analyses are sharded, and rank 0 alone writes the analyses and verdicts.

What is compared: DDP training on 2 ranks is not bit-equal to one process (each rank draws its own
augmentation stream), so the one-process check re-runs the study on the *same* trained runs (its
``runs/`` is the 2-rank one; finished runs are reused, not retrained) and its analyses and verdict table
must equal the 2-rank ones to float round-off. The study covers every sharded analysis: the test-split
evaluation, the probe, the Hessian spectrum on training batches with the run's augmentation and mixup (HDVW's
protocol: random draws per batch) and the band-noise robustness.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import assert_close_tree, merged_sum_bounds

STUDY = """
name: mini
title: every sharded analysis of a study
claims:
  - {finding: 8, claim: "deep-layer attention entropy below 10 nats", a: {model: vit, metric: "entropy:late"},
     b: {value: 10}, expect: less}
  - {finding: 3, claim: "largest Hessian eigenvalue magnitude above 0", a: {model: vit, metric: hessian_max_abs},
     b: {value: 0}, expect: greater}
  - {finding: 2, claim: "band noise lowers accuracy", a: {model: vit, metric: "high_freq_drop:0.8"}, b: {value: 0},
     expect: greater}
  - {finding: 5, claim: "sub-layer outputs are similar", a: {model: vit, metric: cka_offdiag}, b: {value: 0},
     expect: greater}
  - {finding: 9, claim: "balanced accuracy above chance", a: {model: vit, metric: balanced_accuracy},
     b: {value: 0.25}, expect: greater}
scales:
  quick: {zoo: test, data: "fake:n=48,n_eval=37,classes=4", recipe: cpu-quick, img_size: 32, seeds: 2,
          eval_examples: 37, eval_batch_size: 8, hessian: {k: 2, max_batches: 3, max_iter: 30, batch_size: 8},
          frequency: {freqs: [0.0, 0.8, 1.0]}, overrides: {mixup: 0.8}}
"""
# 37 test examples in batches of 8: rank 0 takes global batches 0, 2, 4 (21 examples), rank 1 takes 1, 3 (16)
ARGS = ["--epochs", "1", "--batch-size", "8"]  # per-rank training batch 4 under 2 ranks


U = 2.0**-53
S = 2 * (5 - 1) * U  # 37 test examples in batches of 8: two float64 sums of 5 batch terms in other orders


def _metric_bound(finding: int, a: dict) -> float:
    """How far one run's claim metric may move between the two sides: 0 where it is exact (Hessian eigenvalues,
    hit counts); a mean of K probe values within merged_sum_bounds each, plus the K-term mean's rounding on either
    side (2 K u |metric|): attention entropy's late rows (K <= all rows), CKA's L (L - 1) off-diagonal entries
    (each within 2 s + 5 u, |c| <= 1)."""
    probe = a["probe"]
    if finding == 8:  # entropy:late
        rows = probe["attention_entropy"]["rows"]
        heads = max(len(r["heads"]) for r in rows)
        top = max(abs(r["value"]) for r in rows)
        return (S + 2 * U + 2 * heads * U) * top + 2 * len(rows) * U * top
    if finding == 5:  # cka_offdiag
        n = len(probe["cka"]["matrix"])
        return 2 * S + 5 * U + 2 * (n * (n - 1) + 1) * U
    return 0.0


def _verdict_bounds(rows: list[dict], analyses: list[dict]) -> list[dict]:
    """Per claim, the bounds of its verdict row's statistics, propagated from its metric's (``_metric_bound``) through
    ``vitscope.studies.verdict``'s one-sample t test (the claims here compare with a fixed value: d = a - b exact
    for b = 0): the mean of n within max delta + 2 n u |mean|; the SD within ||delta||_2 / sqrt(n - 1) (the SD is
    that Lipschitz) plus each side's rounding (n + 3) u sd, and the shift of the rounded mean, n (n u m)^2 /
    (2 (n - 1) sd); se = sd / sqrt(n) 1.5 u more; t = |mean| / se; p = 2 tail(t) moves by 2 f(t_low) dt (f the t
    density, falling in |t|) plus each side's tail error (_helpers.t_tail_bound, the doubling's u); the interval
    mean -+ q se (the same quantile q both sides) by dmean + q dse and two roundings; Holm's adjusted p by m max dp
    (m claims) and a product's rounding. A claim whose metric is exact has every field exact (bound 0)."""
    from scipy import stats

    from _helpers import t_tail_bound
    from vitscope.studies.tdist import t_ppf

    out, dps = [], []
    for row in rows:
        deltas = [_metric_bound(row["finding"], a) for a in analyses]
        vals = row["a_values"]
        n = len(vals)
        if not any(deltas) or n < 2:
            out.append({}), dps.append(0.0)
            continue
        mean, sd = row["a_mean"], row["a_std"]
        d_mean = max(deltas) + 2 * n * U * abs(mean)
        d_sd = math.sqrt(sum(d * d for d in deltas) / (n - 1))
        d_sd += 2 * ((n + 3) * U * sd + n * (n * U * mean) ** 2 / (2 * (n - 1) * sd))
        se = sd / math.sqrt(n)
        d_se = d_sd / math.sqrt(n) + 3 * U * se
        t = abs(mean) / se
        d_t = (d_mean + t * d_se) / (se - d_se) + 2 * U * t
        df = n - 1
        d_p = 2 * float(stats.t.pdf(t - d_t, df)) * d_t + 2 * (2 * t_tail_bound(t, df) + U)
        q = t_ppf(1 - (1 - row["ci_level"]) / 2, df)
        d_ci = d_mean + q * d_se + 2 * U * (q * se + abs(mean) + q * se)
        d_a = max(deltas)
        out.append({r"\.a_values\[\d+\]$": lambda v, d=d_a: d, r"\.(a_mean|effect)$": lambda v, d=d_mean: d,
                    r"\.a_std$": lambda v, d=d_sd: d, r"\.ci_(low|high)$": lambda v, d=d_ci: d,
                    r"\.(p|p_t|p_value)$": lambda v, d=d_p: d})
        dps.append(d_p)
    holm = len(rows) * max(dps)
    for b in out:
        if holm:
            b[r"\.p_holm(_value)?$"] = lambda v: holm + 2 * U * abs(v)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, path: str, port: int) -> None:
    """One torchrun rank: the CLI opens the group from the environment; writes are counted per rank."""
    import vitscope.studies.runner as runner
    from vitscope.cli import main
    from vitscope.studies.pipeline import TrainRequest, train_spec
    from vitscope.studies.zoo import model_spec

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    writes: list[str] = []
    for name in ("atomic_write_json", "atomic_write_text"):
        real = getattr(runner, name)
        setattr(runner, name, lambda p, obj, real=real: (writes.append(os.path.basename(p)), real(p, obj))[1])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["reproduce", f"{path}/mini.yaml", "--out", f"{path}/ddp", *ARGS])
    # rank 0's check of a run directory fails (another run's settings there): every rank raises, none hangs
    req = TrainRequest(model_spec("test", "vit"), "fake:n=48,n_eval=37,classes=4", epochs=1, batch_size=8)
    error = None
    try:
        train_spec(req, f"{path}/ddp/runs", run_dir=f"{path}/ddp/runs/{os.listdir(f'{path}/ddp/runs')[0]}")
    except ValueError as e:
        error = str(e)
    dist.destroy_process_group()
    with open(os.path.join(path, f"out{rank}.pkl"), "wb") as f:
        pickle.dump((rc, stdout.getvalue(), writes, error), f)


def _run_two_ranks(path, timeout_s: float = 180.0):
    ctx = mp.start_processes(_worker, args=(str(path), _free_port()), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:  # a deadlock: fail instead of hanging the suite
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-rank reproduce did not finish in {timeout_s:.0f} s")
    return [pickle.loads((path / f"out{r}.pkl").read_bytes()) for r in (0, 1)]


def _json(p):
    return json.loads(p.read_text())


def _strip(d, keys=("world_size", "examples_per_rank", "batches_per_rank", "timing_s")):
    if isinstance(d, dict):
        return {k: _strip(v, keys) for k, v in d.items() if k not in keys}
    if isinstance(d, list):
        return [_strip(v, keys) for v in d]
    return d


def test_reproduce_on_two_ranks_equals_one_process_on_the_same_runs(tmp_path, capsys):
    from vitscope.cli import main

    (tmp_path / "mini.yaml").write_text(STUDY)
    (rc0, out0, writes0, err0), (rc1, out1, writes1, err1) = _run_two_ranks(tmp_path)
    assert rc0 == rc1 == 0
    assert "| 8 | deep-layer attention entropy" in out0 and out1 == ""  # rank 0 alone prints
    runs = sorted((tmp_path / "ddp" / "runs").glob("vit-s*[!k]"))
    assert [r.name[:6] for r in runs] == ["vit-s0", "vit-s1"]
    assert sorted(writes0) == sorted([f"{r.name}.json" for r in runs] + ["verdicts.json", "verdicts.csv",
                                                                        "verdicts.md"]) and writes1 == []
    assert not list((tmp_path / "ddp" / "runs").glob("*.lock"))  # rank 0 released every run lock
    for r in runs:  # trained once, by 2 DDP ranks: one line for the one epoch, not one per rank
        assert [json.loads(line)["epoch"] for line in (r / "metrics.jsonl").read_text().splitlines()] == [0]
    assert err0 == err1 and "holds a run with other settings" in err0

    one = tmp_path / "one"
    one.mkdir()
    (one / "runs").symlink_to(tmp_path / "ddp" / "runs")  # the same trained runs, reused by one process
    mtimes = [(r / "metrics.jsonl").stat().st_mtime_ns for r in runs]
    assert main(["reproduce", str(tmp_path / "mini.yaml"), "--out", str(one), *ARGS]) == 0
    capsys.readouterr()
    assert [(r / "metrics.jsonl").stat().st_mtime_ns for r in runs] == mtimes  # not retrained

    v2, v1 = _json(tmp_path / "ddp" / "mini" / "verdicts.json"), _json(one / "mini" / "verdicts.json")
    assert v2["world_size"] == 2 and v1["world_size"] == 1
    analyses = [_json(one / "mini" / "analysis" / f"{r.name}.json") for r in runs]  # seed order
    bounds = _verdict_bounds(v1["verdicts"], analyses)
    for i, (row1, row2) in enumerate(zip(v1["table"], v2["table"])):
        assert_close_tree(_strip(row1), _strip(row2), f"table[{i}]", bounds=bounds[i])
    for i, (row1, row2) in enumerate(zip(v1["verdicts"], v2["verdicts"])):
        assert_close_tree(_strip(row1), _strip(row2), f"verdicts[{i}]", bounds=bounds[i])
    for r in runs:
        a2, a1 = (_json(d / "mini" / "analysis" / f"{r.name}.json") for d in (tmp_path / "ddp", one))
        assert a2["world_size"] == 2 and a2["examples_per_rank"] == [21, 16] and a2["eval"]["n"] == 37
        assert a1["world_size"] == 1 and a1["examples_per_rank"] == [37]
        assert a2["hessian"]["config"]["examples_per_rank"] == [16, 8]  # batches 0, 2 | 1
        assert a2["hessian"]["loss"]["augmentation"] == a2["hessian"]["config"]["transform"] == "Mixup"
        assert a2["robustness"]["examples_per_rank"] == [21, 16]
        assert a1.pop("run_dir") == str(one / "runs" / r.name) and a2.pop("run_dir") == str(r)
        # the probe's and the evaluation's float64 sums over the 5 test batches run in another order
        # (merged_sum_bounds); the Hessian (each batch whole on one rank), the hit counts and the training record
        # are exact
        heads = max(len(row["heads"]) for row in a1["probe"]["attention_entropy"]["rows"])
        b = {**merged_sum_bounds(5, heads), r"^[^.]+\.eval\.nll$": lambda v: (S + 2 * U) * abs(v)}
        assert_close_tree(_strip(a1), _strip(a2), r.name, bounds=b)  # eval, probe, hessian, robustness, training
