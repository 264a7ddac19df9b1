"""vitscope reproduce: every study recipe loads and runs at a reduced size (fake data, tiny models, 1 epoch,
2 seeds, training runs shared between studies) and ends with a verdict table of the right claims; the
verdict rule, the metrics against hand computations, and the errors."""
from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from vitscope.cli import main
from vitscope.studies import list_studies, load_study, run_study
from vitscope.studies.metrics import compute_metric
from vitscope.studies.runner import StudyError
from vitscope.studies.verdict import HELD, INCONCLUSIVE, NOT_HELD, Verdict, decide, holm_adjust, summarize

FINDINGS = {
    "cb-entropy": {8, 9},
    "convit-sample-efficiency": {10, 11},
    "hdvw-fourier-variance": {1, 2, 4},
    "hdvw-hessian": {3},
    "hdvw-landscape": {3},
    "raghu-cka-distance": {5, 6, 7},
    "raghu-localization": {7},
    "alternet-small-data": {12},
}
U = 2.0**-53


def _mean_sd_bounds(vals: list[float]) -> tuple[float, float]:
    """How far summarize's float64 mean and sample SD may lie from statistics' (exact rational arithmetic, rounded
    once): the mean's n - 1 sums and division within n u mean|v| (and u/2 for statistics' rounding); the SD's n
    centred squares within 3 u each and their sum within (n - 1) u (terms >= 0), the division, sqrt's halving and
    rounding: relatively within (n + 2) u / 2 + 2 u, plus the mean's error: the SD is the norm of the centred
    values over sqrt(n - 1), which a mean off by dm moves by at most sqrt(n / (n - 1)) dm (triangle inequality;
    values all equal included, where the exact SD is 0)."""
    n, mean = len(vals), statistics.mean(vals)
    dm = n * U * statistics.mean(abs(v) for v in vals) + 0.5 * U * abs(mean)
    return dm, ((n + 2) * U / 2 + 2 * U) * statistics.stdev(vals) + math.sqrt(n / (n - 1)) * dm


def test_shipped_studies_and_their_findings():
    assert list_studies() == sorted(FINDINGS)
    for name, findings in FINDINGS.items():
        study = load_study(name)
        assert study["name"] == name
        assert {c["finding"] for c in study["claims"]} == findings
        assert {"quick", "paper"} <= set(study["scales"])
        assert study["scales"]["quick"]["data"] == "elpv"


LIGHT = {"eval_examples": 32, "hessian": {"k": 1, "max_batches": 1, "max_iter": 40, "batch_size": 8},
         "localization": {"max_batches": 2, "epochs": 5},
         "frequency": {"freqs": [0.2, 0.8, 1.0]}}  # a low and two high bands (freq_drop_balanced)


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("reproduce")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FINDINGS))
def test_study_runs_at_reduced_size(name, shared_out):
    res = run_study(name, data="fake", out=shared_out, seeds=2, epochs=1, max_examples=48, zoo="test",
                    batch_size=16, progress=False, settings=LIGHT)
    study = load_study(name)
    assert [v.claim for v in res.verdicts] == [c["claim"] for c in study["claims"]]
    assert [v.finding for v in res.verdicts] == [c["finding"] for c in study["claims"]]
    again = holm_adjust([Verdict.build(v.study, v.finding, v.claim, v.a_label, v.b_label, v.expect, v.a_values,
                                       v.b_values, paired=v.paired) for v in res.verdicts])  # recomputed, not stored
    for v, w in zip(res.verdicts, again):
        assert v.verdict in (HELD, NOT_HELD, INCONCLUSIVE)
        assert len(v.a_values) == 2 and all(math.isfinite(x) for x in v.a_values + v.b_values)
        assert abs(v.a_mean - statistics.mean(v.a_values)) <= _mean_sd_bounds(v.a_values)[0]
        assert (v.verdict, v.reason) == (w.verdict, w.reason)
    payload = json.loads(res.files["json"].read_text())
    assert payload["study"] == name and payload["seeds"] == [0, 1]
    assert len(payload["verdicts"]) == len(study["claims"])
    rows = list(csv.DictReader(res.files["csv"].open()))
    assert [r["verdict"] for r in rows] == [v.verdict for v in res.verdicts]
    md = res.files["md"].read_text()
    table, training = md.split("\n| model | condition |")
    assert table.count("\n| ") == len(study["claims"]) + 1  # header + one row per claim
    assert "p (Holm)" in table and "effect a − b [Holm-adjusted CI]" in table
    assert training.count("\n| ") == len({(e["model"], e["condition"]) for e in payload["evaluations"]})
    for v in res.verdicts:
        assert v.claim in md


def test_summarize_matches_statistics():
    vals = [0.3, 0.5, 0.9, 0.4]
    (mean, sd), (dm, dsd) = summarize(vals), _mean_sd_bounds(vals)
    assert abs(mean - statistics.mean(vals)) <= dm and abs(sd - statistics.stdev(vals)) <= dsd
    assert summarize([2.0]) == (2.0, 0.0)
    same = [0.1, 0.1, 0.1]  # equal values (two seeds that agree): the exact SD is 0
    (mean, sd), (dm, dsd) = summarize(same), _mean_sd_bounds(same)
    assert abs(mean - 0.1) <= dm and sd <= dsd
    assert all(math.isnan(x) for x in summarize([1.0, float("nan")]))


def test_verdict_rule():
    assert decide([0.9, 0.92, 0.91], [0.7, 0.71, 0.69], "greater")[0] == HELD
    assert decide([0.9, 0.92, 0.91], [0.7, 0.71, 0.69], "less")[0] == NOT_HELD
    assert decide([0.8, 0.9], [0.85, 0.86], "greater")[0] == INCONCLUSIVE  # paired t: p = 0.94
    assert decide([0.2, 0.3, 0.25], [0.0], "greater")[0] == HELD  # against a fixed threshold
    assert decide([0.9], [0.1], "greater")[0] == INCONCLUSIVE  # one seed: no test
    assert decide([float("nan"), 1.0], [0.0, 0.1], "greater")[0] == INCONCLUSIVE
    with pytest.raises(ValueError, match="expect"):
        decide([1.0], [0.0], "bigger")
    # issue 20: equal differences ([2.0, 2.2] gave -1, -1) have no spread and the exact test decides (0.5); so
    # the differences vary here
    v = Verdict.build("s", 8, "claim", "a", "b", "less", [1.0, 1.2], [2.0, 2.25])
    assert v.verdict == HELD and abs(v.a_std - statistics.stdev([1.0, 1.2])) <= _mean_sd_bounds([1.0, 1.2])[1]


def _rows(kinds_values: list[tuple[str, float]]) -> list[dict]:
    n = len(kinds_values)
    return [{"layer": f"l{i}", "kind": k, "depth": i, "normalized_depth": i / (n - 1), "value": v}
            for i, (k, v) in enumerate(kinds_values)]


def test_metrics_by_hand():
    fourier = _rows([("msa", -1.0), ("mlp", -0.5), ("msa", -0.9), ("mlp", -0.2), ("msa", -0.6)])
    variance = _rows([("conv", 1.0), ("conv", 2.0), ("msa", 0.5), ("conv", 1.5)])
    a = {"probe": {"fourier": {"rows": fourier}, "feature_variance": {"rows": variance},
                   "attention_entropy": {"rows": [{**r, "max_entropy": 2.0} for r in _rows([("msa", 1.5),
                                                                                            ("msa", 1.0)])]},
                   "cka": {"matrix": [[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]]}},
         "robustness": {"frequency": {"freqs": [0.0, 0.5, 0.7, 1.0], "error_increase": [0.0, 0.1, 0.2, 0.4]}},
         "train_probes": [{"epoch": -1, "measure": "gpsa_gates", "values": [[0.7, 0.7], [0.7, 0.7]]},
                          {"epoch": 3, "measure": "gpsa_gates", "values": [[0.6, 0.2], [0.4, 0.4]]}],
         "eval": {"accuracy": 0.8, "balanced_accuracy": 0.6}}
    # Each metric is a few float64 operations (means, differences, a log) on hand-written decimals, against the
    # closed form written out: the two agree to a few ulps (~1e-15), so pytest.approx's rel 1e-6 cannot fail on a
    # correct machine, while a wrong selection of rows, pairing or formula moves every value here by >= 0.1
    # (>= 6% of it: e.g. the entropy halves 0.5 apart, CKA with its diagonal 0.58 for 0.37, frequency 0.7 read at a
    # neighbour 0.2 or 0.4 for 0.3).
    # MSA at depths 2 and 4 (depth 0 has no recorded input): (-0.9 - -0.5) and (-0.6 - -0.2).
    assert compute_metric("fourier_change:msa", a) == pytest.approx(-0.4)
    assert compute_metric("fourier_change:mlp", a) == pytest.approx(((-0.5 + 1.0) + (-0.2 + 0.9)) / 2)
    assert compute_metric("variance_change:conv", a) == pytest.approx((math.log(2.0) + math.log(3.0)) / 2)
    assert compute_metric("variance_change:msa", a) == pytest.approx(math.log(0.25))
    assert compute_metric("entropy:early", a) == pytest.approx(1.5)
    assert compute_metric("entropy:late", a) == pytest.approx(1.0)
    assert compute_metric("entropy_rel", a) == pytest.approx(1.25 / 2)
    assert compute_metric("cka_offdiag", a) == pytest.approx((0.5 + 0.2 + 0.4) * 2 / 6)
    assert compute_metric("high_freq_drop:0.7", a) == pytest.approx(0.3)
    assert compute_metric("gpsa_gates:init", a) == pytest.approx(0.7)
    assert compute_metric("gpsa_gates:final", a) == pytest.approx(0.4)
    assert compute_metric("balanced_accuracy", a) == 0.6
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("nonsense", a)
    with pytest.raises(ValueError, match="no finite value"):
        compute_metric("fourier_change:conv", a)


def test_bad_study_name_is_a_clear_cli_error(capsys):
    assert main(["reproduce", "cb-entropi"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'cb-entropi'" in err and "Did you mean cb-entropy" in err
    for name in FINDINGS:
        assert name in err
    with pytest.raises(StudyError, match="Valid studies"):
        load_study("nope")


def test_paper_scale_needs_data_and_bad_options_fail(tmp_path, capsys):
    assert main(["reproduce", "cb-entropy", "--scale", "paper", "--out", str(tmp_path)]) == 2
    assert "--data cifar100:PATH" in capsys.readouterr().err
    with pytest.raises(StudyError, match="seeds"):
        run_study("cb-entropy", data="fake", seeds=0, out=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nclaims: [{finding: 8, claim: c, a: {model: swin, metric: accuracy}, b: {value: 0}, "
                   "expect: greater}]\nscales: {quick: {data: fake}}\n")
    with pytest.raises(StudyError, match="unknown model 'swin'"):
        load_study(str(bad))


def test_more_processes_than_test_batches_is_refused_before_training():
    """Under torchrun DDP splits the training batch and the probe needs a test batch per rank (2 ranks run in
    tests/test_distributed_reproduce.py)."""
    from vitscope.studies.runner import _check_processes

    study = load_study("cb-entropy")
    s = {"data": "fake:n=16,n_eval=12,classes=4", "img_size": 32, "eval_batch_size": 8, "zoo": "test",
         "recipe": "cpu-quick", "batch_size": 6}  # 2 test batches
    _check_processes(study, s, 2)
    with pytest.raises(StudyError, match="2 batch\\(es\\) of 8 for 3 processes.*--nproc_per_node 2 or fewer"):
        _check_processes(study, s, 3)
    _check_processes(load_study("hdvw-hessian"), s, 3)  # no probe: a rank may get no batch
    with pytest.raises(StudyError, match="training batch \\(6\\) .* 4 processes.*multiple of 4"):
        _check_processes(study, s, 4)
    with pytest.raises(StudyError, match="training batch \\(32\\)"):  # the recipe's batch size
        _check_processes(study, {**s, "batch_size": None}, 3)


def test_training_summary_reports_the_epoch_whose_weights_the_run_kept(tmp_path):
    import json

    from vitscope.studies.pipeline import training_summary
    from vitscope.training.config import resolve_config, save_config

    cfg = resolve_config(overrides={"epochs": 8, "early_stop_patience": 2})
    save_config(cfg, tmp_path / "config.yaml")
    nll = [0.9, 0.6, 0.5, 0.7, 0.8]
    lines = [{"epoch": e, "val_nll": v, "val_top1": 50.0 + e} for e, v in enumerate(nll)]
    lines[-1].update(stopped_early=True, weights_epoch=2)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = training_summary(tmp_path)
    assert (s["best_epoch"], s["best_val_nll"], s["epochs_trained"], s["epoch_cap"]) == (2, 0.5, 5, 8)
    assert (s["weights_epoch"], s["weights_val_top1"], s["last_val_top1"]) == (2, 52.0, 54.0)
    assert s["converged"] is True


def test_seeds_pair_only_within_a_model():
    """Issue 20: seed i pairs one model's runs (its layers, its subset and full-data runs); between independent
    architectures on the same split it pairs nothing, so those claims are Welch's."""
    from vitscope.studies.runner import _paired

    def paired(name: str) -> list[bool]:
        return [_paired(c) for c in load_study(name)["claims"]]

    assert paired("convit-sample-efficiency")[:2] == [False, True]  # ConViT vs ViT; the lead vs the lead
    assert not any(paired("alternet-small-data"))
    assert paired("hdvw-hessian")[1:] == [True, False]  # ViT full vs ViT small; ViT vs ResNet
    assert _paired({"a": {"model": "vit", "metric": "accuracy"}, "b": {"model": "resnet", "metric": "accuracy"},
                    "paired": True})


def test_issue20_metrics_by_hand():
    """Fourier changes at one normalized frequency across map sizes; CKA over K blocks at equal normalized depth;
    the class-token ratio without the first block; gates at the evaluated epoch and per half; nonlocality
    without GPSA layer 0; balanced-accuracy drops under band noise."""
    # a 16 x 16 map (frequencies 0, 1/8, ..., 7/8 pi) feeding an 8 x 8 map (0, 1/4, 1/2, 3/4 pi): at 0.75 pi the
    # first is read at k = 6, the second at k = 3; a 4 x 4 map (0, 0.5 pi) cannot represent 0.75 pi
    f16, f8, f4 = [k / 8 for k in range(8)], [k / 4 for k in range(4)], [0.0, 0.5]
    rows = [{"layer": "stem", "kind": "stem", "depth": 0, "normalized_depth": 0.0, "frequencies": f16,
             "curve": [0.1 * k for k in range(8)], "value": 0.7},
            {"layer": "b1", "kind": "conv", "depth": 1, "normalized_depth": 0.25, "frequencies": f16,
             "curve": [0.2 * k for k in range(8)], "value": 1.4},
            {"layer": "b2", "kind": "downsample", "depth": 2, "normalized_depth": 0.5, "frequencies": f8,
             "curve": [0.0, -0.1, -0.2, -0.5], "value": -0.5},
            {"layer": "b3", "kind": "conv", "depth": 3, "normalized_depth": 0.75, "frequencies": f8,
             "curve": [0.0, 0.1, 0.2, 0.3], "value": 0.3},
            {"layer": "b4", "kind": "downsample", "depth": 4, "normalized_depth": 1.0, "frequencies": f4,
             "curve": [0.0, 9.0], "value": 9.0}]
    a = {"probe": {"fourier": {"rows": rows}}}
    # As in test_metrics_by_hand: a few float64 operations on decimals against the closed form (~1e-15 apart;
    # pytest.approx's 1e-6 cannot fail on a correct machine); each wrong choice moves a value by >= 5% of it (the
    # smallest: localization's chance 1/64 on 0.3; the next map's frequency, the wrong epoch or half, the first
    # block's ratio or GPSA layer 0 all move values by 10% to 100x).
    assert compute_metric("fourier_change:conv", a) == pytest.approx(((1.2 - 0.6) + (0.3 - -0.5)) / 2)
    assert compute_metric("fourier_change:downsample", a) == pytest.approx(-0.5 - 1.2)  # b4 (4 x 4) not counted
    assert compute_metric("fourier_change:conv@0.5", a) == pytest.approx(((0.8 - 0.4) + (0.2 - -0.2)) / 2)
    assert compute_metric("fourier_change:downsample@0.5", a) == pytest.approx(((-0.2 - 0.8) + (9.0 - 0.2)) / 2)
    # CKA: a ViT with 4 block outputs and a CNN with 7; blocks4 takes CNN blocks 0, 2, 4, 6
    kinds = ["msa", "mlp"] * 4
    vit = {"probe": {"cka": {"rows": [{"depth": i, "kind": k} for i, k in enumerate(kinds)],
                             "matrix": [[1.0 if i == j else 0.5 for j in range(8)] for i in range(8)]}}}
    assert compute_metric("cka_offdiag:blocks4", vit) == pytest.approx(0.5)
    mat = [[1.0 if i == j else (0.9 if {i, j} <= {1, 3, 5, 7} else 0.1) for j in range(8)] for i in range(8)]
    cnn = {"probe": {"cka": {"rows": [{"depth": 0, "kind": "stem"}] + [{"depth": i, "kind": "conv"}
                                                                       for i in range(1, 8)], "matrix": mat}}}
    assert compute_metric("cka_offdiag:blocks4", cnn) == pytest.approx(0.9)  # depths 1, 3, 5, 7
    with pytest.raises(ValueError, match="K must be"):
        compute_metric("cka_offdiag:blocks9", cnn)
    # ratio of norms: the first block's sub-layers left out of cls_early_from1
    ron = [{"layer": f"l{i}", "kind": k, "block": i // 2, "depth": i, "normalized_depth": i / 7, "cls": c,
            "spatial": 1.0} for i, (k, c) in enumerate(zip(kinds, [0.01, 0.02, 3.0, 5.0, 1.0, 1.0, 1.0, 1.0]))]
    b = {"probe": {"ratio_of_norms": {"rows": ron}}}
    assert compute_metric("ratio_of_norms:cls_early", b) == pytest.approx((0.01 + 0.02 + 3.0 + 5.0) / 4)
    assert compute_metric("ratio_of_norms:cls_early_from1", b) == pytest.approx(4.0)
    # gates: the evaluated (best) epoch, not the last; halves of the GPSA stack
    g = {"train_probes": [{"epoch": -1, "measure": "gpsa_gates", "values": [[0.7], [0.7], [0.7]]},
                          {"epoch": 2, "measure": "gpsa_gates", "values": [[0.9], [0.5], [0.1]]},
                          {"epoch": 5, "measure": "gpsa_gates", "values": [[0.3], [0.3], [0.3]]}],
         "training": {"weights_epoch": 2}}
    assert compute_metric("gpsa_gates:best", g) == pytest.approx(0.5)
    assert compute_metric("gpsa_gates:final", g) == pytest.approx(0.3)
    assert (compute_metric("gpsa_gates:best_early", g), compute_metric("gpsa_gates:best_late", g)) == \
        pytest.approx((0.9, 0.1))
    with pytest.raises(ValueError, match="evaluated epoch"):
        compute_metric("gpsa_gates:best", {**g, "training": {"weights_epoch": 4}})
    # nonlocality: GPSA layer 0 out, then halves (layers 1-2 vs 3-4)
    nl = {"probe": {"nonlocality": {"rows": [{"depth": d, "kind": "gpsa", "value": v}
                                             for d, v in enumerate([9.0, 1.0, 2.0, 3.0, 4.0])]}}}
    assert (compute_metric("nonlocality:early", nl), compute_metric("nonlocality:late", nl)) == \
        pytest.approx((1.5, 3.5))
    loc = {"localization": {"rows": [{"block": b, "depth": b / 3, "accuracy": acc, "chance": 1 / 64}
                                     for b, acc in enumerate([0.9, 0.8, 0.5, 0.3])]}}
    assert compute_metric("localization:last", loc) == pytest.approx(0.3 - 1 / 64)
    assert compute_metric("localization:late", loc) == pytest.approx(0.4 - 1 / 64)
    assert compute_metric("localization:early", loc) == pytest.approx(0.85 - 1 / 64)
    fb = {"frequency_balanced": {"freqs": [0.1, 0.3, 0.5, 0.7, 1.0], "drop": [0.01, 0.03, 0.2, 0.1, 0.3]}}
    assert compute_metric("freq_drop_balanced:high", fb) == pytest.approx(0.2)
    assert compute_metric("freq_drop_balanced:low", fb) == pytest.approx(0.02)
    assert compute_metric("freq_drop_balanced:selectivity", fb) == pytest.approx(0.18)


def test_frequency_balanced_equals_a_direct_computation():
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from vitscope.robustness import frequency_noise
    from vitscope.robustness.suite import default_freq_eps
    from vitscope.studies.pipeline import frequency_balanced

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    xs = [torch.rand(5, 3, 8, 8), torch.rand(4, 3, 8, 8)]
    ys = [torch.tensor([0, 1, 2, 0, 0]), torch.tensor([1, 1, 0, 2])]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    res = frequency_balanced(model, list(zip(xs, ys)), mean, std, 3, [0.2, 0.9])
    norm = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    eps = default_freq_eps(xs[0].shape)
    y = torch.cat(ys).numpy()

    def bal(fn):
        pred = torch.cat([model((fn(x, i) - norm[0]) / norm[1]).argmax(1) for i, x in enumerate(xs)]).numpy()
        return balanced_accuracy_score(y, pred)

    clean = bal(lambda x, i: x)
    # the same predictions, so the same per-class quotients hits / support; the mean of C = 3 of them in float64
    # (torch's against numpy's order) within C u of the exact mean each, so 2 C u apart; a drop's two balanced
    # accuracies so, and the subtraction's rounding
    assert abs(res["clean_balanced_accuracy"] - clean) <= 6 * U * clean
    for f, drop in zip([0.2, 0.9], res["drop"]):
        noisy = bal(lambda x, i, f=f: frequency_noise(x, f, 0.2, eps=eps, seed=i))
        assert abs(drop - (clean - noisy)) <= 6 * U * (clean + noisy) + 2 * U * abs(clean - noisy)
    assert res["n"] == 9
