"""vitscope demo: end to end on CPU (hidden --tiny size: every stage, tiny models, few images), the balanced
accuracy against numpy, the cross-model CKA against the probe's within-model CKA, run reuse, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from _helpers import gram_cka_bound
from vitscope.cli import main
from vitscope.studies import DEMO_MODELS, run_demo
from vitscope.studies.pipeline import (
    TrainRequest,
    classification_stats,
    cross_model_cka,
    evaluate_classifier,
    run_probe,
    train_spec,
)
from vitscope.studies.zoo import model_spec
from vitscope.training import load_config


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "majority-class baseline" in printed and "report:" in printed

    html = (out / "report.html").read_text()
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == set(DEMO_MODELS)
    assert res["data"]["spec"] == "elpv" and res["data"]["num_classes"] == 2
    support = res["data"]["test_support"]
    assert res["data"]["majority_accuracy"] == max(support) / sum(support)  # the same quotient of two counts
    assert res["timing_s"]["total"] > 0 and "report" in res["timing_s"]
    assert res["machine"]["cpu_count"] >= 1
    for key, m in res["models"].items():
        assert m["label"] in html
        t = m["test"]
        assert 0 <= t["accuracy"] <= 1 and 0 <= t["balanced_accuracy"] <= 1
        tr = m["training"]  # how training ended: 1 epoch with patience 3 cannot have converged
        assert tr["epochs_trained"] == tr["epoch_cap"] == 1 and tr["converged"] is False
        assert tr["early_stop_patience"] == res["settings"]["early_stop_patience"] == 3
        cfg = load_config(out / "models" / key)  # the demo's training settings reach the run
        assert {k: getattr(cfg, k) for k in res["settings"]["overrides"]} == res["settings"]["overrides"]
        assert cfg.crop_padding == 0 and cfg.early_stop_lr_fraction == 0.5
        assert sum(t["support"]) == t["n"] == res["data"]["test_examples"]
        run = out / "models" / key
        for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "results.json", "hessian.json",
                     "landscape.json", "robustness.json"):
            assert (run / name).is_file(), (key, name)
        probe = json.loads((run / "results.json").read_text())
        for measure in ("cka", "ratio_of_norms", "fourier", "feature_variance", "lesion", "localization",
                        "cka_cross"):
            assert probe[measure]["rows"], (key, measure)
        if key in ("vit", "vit_cb", "convit"):
            assert probe["attention_entropy"]["rows"] and probe["attention_distance"]["rows"]
            assert (run / "probes.jsonl").is_file()
        if key == "convit":
            assert probe["gpsa_gates"]["rows"]
        if key != "resnet":  # attention drawn on the fixed test images, shown in the report
            assert (run / "attention.npz").is_file() and '--attention_query_maps"' in html
        cross = probe["cka_cross"]
        assert len(cross["matrix"]) == len(cross["layers"]) and len(cross["matrix"][0]) == len(cross["other_layers"])
        hess = json.loads((run / "hessian.json").read_text())
        flat = [v for batch in hess["eigenvalues"] for v in batch]
        conv = [v for batch, ok in zip(hess["eigenvalues"], hess["converged"]) for v, c in zip(batch, ok) if c]
        assert hess["n_converged"] == len(conv) and hess["n_eigenvalues"] == len(flat)
        # a count over a count (exact integers, one rounded quotient each side) and a max of |values| read back
        # from JSON's exact float64: equal bit for bit
        assert hess["negative_fraction_all"] == np.mean(np.array(flat) < 0)
        if conv:  # fractions and extremes count converged eigenvalues only (HDVW's protocol)
            assert hess["negative_fraction"] == np.mean(np.array(conv) < 0)
            assert hess["max_abs_eigenvalue"] == max(abs(v) for v in conv)
        else:  # none converged in the tiny run's 2 iterations: no fraction rather than a made-up one
            assert hess["negative_fraction"] is None and hess["max_abs_eigenvalue"] is None
        rob = json.loads((run / "robustness.json").read_text())
        for k in ("calibration", "occlusion", "fgsm", "pgd", "frequency", "corruptions"):
            assert k in rob, (key, k)
        assert m["robustness"]["ece"] == rob["calibration"]["ece"]
    assert (out / "figures" / "summary.csv").is_file()


def _loader(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


class _Fixed(nn.Module):
    """Returns stored logits for the images (image i holds its index in pixel 0)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]


def test_evaluate_classifier_matches_numpy():
    g = torch.Generator().manual_seed(0)
    n, c = 53, 3
    logits = torch.randn(n, c, generator=g)
    labels = torch.tensor([0] * 30 + [1] * 15 + [2] * 8)
    x = torch.zeros(n, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n).float()
    stats = evaluate_classifier(_Fixed(logits), _loader(x, labels, [20, 7, 26]), c)  # unequal batches

    pred = logits.numpy().argmax(1)
    y = labels.numpy()
    recalls = [np.mean(pred[y == k] == k) for k in range(c)]
    # hits / n and per class hits / support: the same quotients of exact counts both sides, bit for bit; the
    # balanced accuracy a float64 mean of the C recalls in torch's order against numpy's: within 2 C u of each other
    assert stats["accuracy"] == np.mean(pred == y)
    assert abs(stats["balanced_accuracy"] - np.mean(recalls)) <= 2 * c * 2.0**-53 * np.mean(recalls)
    assert stats["majority_accuracy"] == 30 / 53
    assert stats["per_class_recall"] == recalls
    z = logits.numpy().astype(np.float64)
    nll = np.log(np.exp(z).sum(1)) - z[np.arange(n), y]  # (n,) float64 reference
    # The library takes a float64 log-softmax of the float32 logits (exact in float64) and sums it in float64. Each
    # term is within u (|z_y - max| + C + 4 + 2 log C + nll_i) of the exact value (u = 2^-53: the shift by the max,
    # C exps and their sum, the log and the final subtraction), the reference's own (unshifted) terms within
    # u (|z_y| + C + 4 + 2 log C + nll_i); the n terms >= 0 are summed in another order in the two (gamma_n each).
    u = 2.0**-53
    zy = z[np.arange(n), y]
    bound = np.mean(u * (np.abs(zy - z.max(1)) + np.abs(zy) + 2 * (c + 4 + 2 * np.log(c) + nll))) \
        + 2 * n * u / (1 - n * u) * nll.mean()
    assert abs(stats["nll"] - nll.mean()) <= bound


def test_balanced_accuracy_of_constant_prediction_is_chance():
    confusion = torch.tensor([[40, 0], [18, 0]])  # always predicts class 0
    stats = classification_stats(confusion)
    assert stats["accuracy"] == 40 / 58  # the same quotient of the counts
    assert stats["balanced_accuracy"] == 0.5  # the mean of the recalls 1 and 0, exact
    with pytest.raises(ValueError, match="no example"):
        classification_stats(torch.zeros(2, 2, dtype=torch.long))


def test_cross_model_cka_of_a_model_with_itself_equals_probe_cka():
    import vitscope

    torch.manual_seed(0)
    model = vitscope.create_model("test_vit_cifar").eval()
    x = torch.randn(23, 3, 32, 32)
    loader = _loader(x, torch.zeros(23, dtype=torch.long), [10, 8, 5])
    cross = cross_model_cka(model, model, loader, name_y="same")
    within = run_probe(model, loader, ["cka"], progress=False).to_dict()["cka"]
    assert within["layers"][0] == "stem"  # probe's layer 0; compare leaves the stem out
    within = {"layers": within["layers"][1:], "matrix": [row[1:] for row in within["matrix"][1:]]}
    assert cross["layers"] == within["layers"] == cross["other_layers"]
    # cross_model_cka keeps float64 Grams of the float32 features; probe forms them in float32 after centring over
    # the batch: each within its derived worst case of the exact CKA per side (_helpers.gram_cka_bound, linear_gram's
    # docstring; float64's uncentred products, float32's centred ones) plus the float64 HSIC's own (as on centred
    # float64 Grams): ~1e-3 here, the worst case (was atol 1e-7, the documented typical ~1e-8)
    feats: dict[str, list[np.ndarray]] = {name: [] for name in cross["layers"]}
    for xb, _ in loader:
        with torch.no_grad(), vitscope.capture(model, attention=False, residual=True, branches=False) as cap:
            model(xb)
        for rec in cap.records:
            if rec.info.name in feats:
                feats[rec.info.name].append(rec.z_out.flatten(1).double().numpy())
    own = np.array([gram_cka_bound([f - f.mean(0) for f in feats[k]], 2.0**-53, centre=False)
                    for k in cross["layers"]])
    s32 = np.array([gram_cka_bound(feats[k]) for k in cross["layers"]]) + own
    s64 = np.array([gram_cka_bound(feats[k], 2.0**-53, centre=False) for k in cross["layers"]]) + own
    bound = s32[:, None] + s32[None, :] + s64[:, None] + s64[None, :]
    assert (np.abs(np.array(cross["matrix"]) - np.array(within["matrix"])) <= bound).all()
    # a layer against itself: the same features give the same float64 HSIC bits x for xy, xx and yy, and
    # x / sqrt(x * x) rounds three times: within 3 2^-53 of 1
    np.testing.assert_allclose(np.diag(cross["matrix"]), 1.0, rtol=3 * 2.0**-53)
    assert cross["examples"] == 23

    other = vitscope.create_model("test_convit_32").eval()
    c2 = cross_model_cka(model, other, loader)
    assert np.array(c2["matrix"]).shape == (len(c2["layers"]), len(c2["other_layers"]))
    assert len(c2["rows"]) == len(c2["layers"]) * len(c2["other_layers"])


def test_train_spec_reuses_finished_runs_and_refuses_other_settings(tmp_path):
    spec = model_spec("test", "vit")
    req = TrainRequest(spec, "fake", epochs=1, batch_size=16, max_examples=32, max_val_examples=16, progress=False)
    run = train_spec(req, tmp_path)
    assert run.name == req.run_name() and (run / "model.safetensors").is_file()
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    assert train_spec(req, tmp_path) == run  # finished: reused, not retrained
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp
    other = TrainRequest(spec, "fake", epochs=2, batch_size=16, max_examples=32, max_val_examples=16,
                         progress=False)
    assert other.run_name() != req.run_name()
    with pytest.raises(ValueError, match="other settings.*epochs"):
        train_spec(other, tmp_path, run_dir=run)


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown demo size"):
        run_demo(tmp_path / "d", size="huge")
    with pytest.raises(ValueError, match="unknown demo model"):
        run_demo(tmp_path / "d", size="tiny", models=("vit", "swin"))
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", "--tiny", "--out", str(f)]) == 2
