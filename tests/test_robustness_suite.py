"""evaluate_robustness against per-measure computations by hand; the ``vitscope robustness`` CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from vitscope.cli import main
from vitscope.robustness import (
    Normalized,
    calibration,
    corrupt,
    evaluate_robustness,
    fgsm,
    occlude_center,
    pgd,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)
    ).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(21, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (21,), generator=g)
    with torch.no_grad():
        pred = Normalized(model, MEAN, STD)(x).argmax(dim=1)
    y[:12] = pred[:12]  # some right, some wrong
    return model, x, y


def test_evaluate_robustness_matches_measures_by_hand(setup) -> None:
    model, x, y = setup
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # batches 8, 8, 5
    eps = [1 / 255, 4 / 255]
    out = evaluate_robustness(
        model, loader, mean=MEAN, std=STD, eps=eps, pgd_steps=2, freqs=[0.0, 1.0], freq_eps=1.0,
        corruptions=["contrast", "gaussian_noise"], severities=[1, 5], seed=3, progress=False,
    )
    net = Normalized(model, MEAN, STD)

    def acc(xs: list[torch.Tensor]) -> float:
        with torch.no_grad():
            return float(sum((net(xb).argmax(1) == y[8 * i : 8 * i + 8]).sum() for i, xb in enumerate(xs))) / 21

    xb = [x[s : s + 8] for s in range(0, 21, 8)]
    yb = [y[s : s + 8] for s in range(0, 21, 8)]
    assert out["n"] == 21
    # accuracies: hit counts / 21 on both sides, the same batches through the same model (attacks and
    # corruptions with the same seeds), so the same integer quotient: equal exactly; alpha the same expression
    assert out["clean"]["accuracy"] == acc(xb)
    with torch.no_grad():
        logits = torch.cat([net(b) for b in xb])  # the suite's batches: the same float32 logits
    ref_cal = calibration(logits, y)
    # streamed (3 batches) vs one shot over the same logits: tests/test_measures_calibration.py's cal_atol,
    # each side a float64 mean of n terms in [0, 2] from float64 softmaxes within (2 n + C + 8 + |z|max) u
    atol = 2 * (2 * 21 + 5 + 8 + float(logits.abs().max())) * 2.0**-53
    for key in ("ece", "nll", "brier", "adaptive_ece", "top1"):
        assert out["calibration"][key] == pytest.approx(ref_cal[key], rel=0, abs=atol)
    assert out["occlusion"]["accuracy"] == acc([occlude_center(b) for b in xb])
    for j, e in enumerate(eps):
        assert out["fgsm"]["accuracy"][j] == acc([fgsm(net, b, t, e) for b, t in zip(xb, yb)])
        ref_pgd = acc([pgd(net, b, t, e, steps=2, seed=3 + i) for i, (b, t) in enumerate(zip(xb, yb))])
        assert out["pgd"]["accuracy"][j] == ref_pgd
    assert out["pgd"]["alpha"] == [2.5 * e / 2 for e in eps]
    for name in ("contrast", "gaussian_noise"):
        for j, s in enumerate([1, 5]):
            ref = acc([corrupt(b, name, s, seed=3 + i) for i, b in enumerate(xb)])
            assert out["corruptions"]["accuracy"][name][j] == ref
    assert out["frequency"]["freqs"] == [0.0, 1.0] and len(out["frequency"]["accuracy"]) == 2
    # clean - accuracy, the same float64 subtraction on the same values: exact
    np.testing.assert_array_equal(
        out["frequency"]["error_increase"], out["clean"]["accuracy"] - np.array(out["frequency"]["accuracy"])
    )


def test_evaluate_robustness_bad_input(setup) -> None:
    model, x, y = setup
    with pytest.raises(ValueError, match="unknown robustness measure.*valid: calibration"):
        evaluate_robustness(model, [(x, y)], ["calibration", "fog"], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space"):
        evaluate_robustness(model, [((x - 0.5) / 0.2, y)], ["calibration"], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="mismatched label count"):
        evaluate_robustness(model, [(x, y[:-2])], ["occlusion"], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="unknown corruption 'snow'; valid names"):
        evaluate_robustness(model, [(x, y)], ["corruptions"], mean=MEAN, std=STD, corruptions=["snow"])


def test_cli_writes_json_csv_png(tmp_path, capsys) -> None:
    out = tmp_path / "rob"
    code = main([
        "robustness", "--model", "test_vit_cifar", "--data", "fake", "--out", str(out), "--max-batches", "1",
        "--batch-size", "8", "--eps", "1/255,4/255", "--pgd-steps", "1", "--freqs", "0,1",
        "--corruptions", "contrast,jpeg", "--severities", "1,5", "--no-progress", "--device", "cpu",
    ])
    assert code == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "summary.csv", "calibration_bins.csv", "adversarial.csv", "frequency.csv",
            "corruptions.csv", "reliability.png", "frequency.png", "adversarial.png", "corruptions.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 8 and res["fgsm"]["eps"] == [1 / 255, 4 / 255]  # float(Fraction) is the rounded quotient
    assert res["meta"]["data"] == "fake" and set(res["corruptions"]["accuracy"]) == {"contrast", "jpeg_compression"}
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_cifar_c_and_errors(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "fog.npy", rng.integers(0, 256, size=(5 * 4, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.tile(np.arange(4, dtype=np.uint8), 5))
    out = tmp_path / "c"
    code = main([
        "robustness", "--model", "test_vit_cifar", "--data", "fake", "--out", str(out), "--max-batches", "1",
        "--batch-size", "4", "--suite", "corruptions", "--cifar-c", str(tmp_path), "--no-progress",
        "--device", "cpu", "--no-plots",
    ])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert list(res["corruptions"]["accuracy"]) == ["fog"] and len(res["corruptions"]["accuracy"]["fog"]) == 5
    base = ["robustness", "--model", "test_vit_cifar", "--data", "fake", "--out", str(out), "--no-progress"]
    assert main(base + ["--suite", "calibration,wind"]) == 2
    assert "unknown robustness measure" in capsys.readouterr().err
    assert main(base + ["--suite", "corruptions", "--corruptions", "fog"]) == 2
    assert "valid names: gaussian_noise" in capsys.readouterr().err
    assert main(base + ["--severities", "0,6"]) == 2
    assert main(base + ["--suite", "occlusion", "--normalization", "model", "--max-batches", "1", "--no-plots"]) == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["mean"] == [0.4914, 0.4822, 0.4465]  # test_vit_cifar's pretrained_cfg, through exact JSON


def test_cli_reads_img_size_from_training_run(tmp_path) -> None:
    from safetensors.torch import save_file

    from vitscope.cli._common import run_spec

    (tmp_path / "config.yaml").write_text("model: test_resnet\nimg_size: 32\nnum_classes: 3\n")
    save_file({"fc.weight": torch.zeros(3, 4)}, str(tmp_path / "model.safetensors"), metadata={"epoch": "0"})
    torch.save({"epoch": 0}, tmp_path / "state.pt")
    assert run_spec(str(tmp_path / "model.safetensors"))["img_size"] == 32
    assert run_spec(str(tmp_path / "sub" / "model.safetensors")) is None


def test_evaluate_cifar_c_resizes_and_counts(setup, tmp_path) -> None:
    import torch.nn.functional as F

    from vitscope.robustness import evaluate_cifar_c, load_cifar_c

    model, _, _ = setup
    rng = np.random.default_rng(1)
    np.save(tmp_path / "pixelate.npy", rng.integers(0, 256, size=(5 * 7, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", rng.integers(0, 5, size=5 * 7).astype(np.uint8))
    out = evaluate_cifar_c(model, str(tmp_path), severities=[2, 4], mean=MEAN, std=STD, batch_size=3,
                           img_size=16, clean_accuracy=0.5, progress=False)
    assert list(out["accuracy"]) == ["pixelate"]  # names default to the files present
    net = Normalized(model, MEAN, STD)
    for j, s in enumerate([2, 4]):
        ds = load_cifar_c(tmp_path, "pixelate", s)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True).clamp(0, 1)
        with torch.no_grad():
            logits = torch.cat([net(b) for b in x.split(3)])  # the library's batches of 3
        ref = int((logits.argmax(1) == y).sum()) / len(y)
        # hit counts / n, then 0.5 minus it: the same float64 operations on both sides, equal exactly
        assert out["accuracy"]["pixelate"][j] == ref
        assert out["error_increase"]["pixelate"][j] == 0.5 - ref
