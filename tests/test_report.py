"""vitscope report: every figure section from real producer outputs (probe, interventions, training probes,
robustness suite) plus hand-written hessian/landscape files; CSVs equal the inputs; errors are clear."""
from __future__ import annotations

import base64
import csv
import json
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from vitscope.cli import main as cli_main
from vitscope.reports import ReportInputError, build_report, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ATTN = ["attention_entropy", "attention_distance", "nonlocality", "relative_distance"]
STREAMS = ["cka", "ratio_of_norms", "fourier", "feature_variance"]


def _loader(n=11, seed=0, batch_size=6):  # batches of 6 and 5
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size)


def _probe_dir(path: Path, model_name: str, measures: list[str], interventions: bool = False) -> Path:
    """What ``vitscope probe`` writes: ProbeResult.save + model_name in meta (+ lesion/localization rows)."""
    torch.manual_seed(0)
    model = vitscope.create_model(model_name).eval()
    loader = _loader()
    result = vitscope.probe(model, loader, measures, progress=False)
    result.meta.update(model_name=model_name)
    result.save(path)
    if interventions:
        from vitscope.interventions import lesion, localization_probe

        data = json.loads((path / "results.json").read_text())
        data["lesion"] = {"rows": lesion(model, loader, progress=False).to_rows()}
        data["localization"] = {"rows": localization_probe(model, loader, epochs=5).to_rows()}
        (path / "results.json").write_text(json.dumps(data))
    return path


def _train_dir(path: Path) -> Path:
    """A training run directory: real probe records (``run_probes``) on a ConViT, metrics lines as the engine
    writes them, config.yaml."""
    from vitscope.training.probes import run_probes

    path.mkdir()
    model = vitscope.create_model("test_convit_32")
    images = next(iter(_loader()))[0]
    lines = []
    for epoch in (-1, 0, 1):
        if epoch >= 0:
            with torch.no_grad():
                for m in model.modules():
                    if hasattr(m, "gating_param"):
                        m.gating_param -= 0.5  # gates fall, as in training
        lines += run_probes(model, images, ["gpsa_gates", "nonlocality", "attention_entropy"], epoch)
    (path / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    metrics = [{"epoch": e, "step": 4 * (e + 1), "train_loss": 2.3 - 0.2 * e, "train_lr": 1e-3,
                "val_top1": 20.0 + 5 * e, "val_nll": 2.2 - 0.1 * e, "val_ece": 0.1 + 0.01 * e,
                "val_brier": 0.9 - 0.02 * e, "val_n": 16}
               for e in range(2)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (path / "config.yaml").write_text(yaml.safe_dump({"model": "test_convit_32", "data": "fake", "epochs": 2}))
    return path


def _curvature_robustness_dir(path: Path) -> Path:
    """Robustness from the real suite and its CLI writer; hessian/landscape hand-written in the documented formats."""
    from vitscope.robustness import evaluate_robustness
    from vitscope.robustness.report import save_results

    path.mkdir()
    torch.manual_seed(1)
    model = vitscope.create_model("test_vit_cb")
    rob = evaluate_robustness(model, _loader(n=8), ("calibration", "occlusion", "fgsm", "pgd", "frequency",
                                                    "corruptions"), eps=(1 / 255, 4 / 255), pgd_steps=2,
                              freqs=(0.0, 0.5, 1.0), corruptions=("gaussian_noise", "contrast"), severities=(1, 3, 5),
                              mean=(0.5,) * 3, std=(0.5,) * 3, progress=False)
    save_results(rob, path, {"model": "test_vit_cb", "data": "fake"}, plots=False)  # what vitscope robustness writes
    rng = np.random.default_rng(0)
    eig = rng.normal(0.5, 2.0, (4, 5))  # 4 batches x top-5, as vitscope hessian writes them
    grid = np.linspace(eig.min() - 1, eig.max() + 1, 50)
    kde = np.exp(-0.5 * ((grid[:, None] - eig.ravel()) / 0.5) ** 2).sum(1) / (eig.size * 0.5 * np.sqrt(2 * np.pi))
    run = {"model": "test_vit_cb", "checkpoint": None, "data": "fake", "split": "train", "batch_size": 8}
    (path / "hessian.json").write_text(json.dumps({
        "config": {"k": 5}, "batch_sizes": [8] * 4, "n_hvp": 80, "run": run,
        "groups": {"all": {"eigenvalues": eig.tolist(), "converged": [[True] * 5] * 4,
                           "negative_fraction": float(np.mean(eig < 0)), "grid": grid.tolist(),
                           "density": kde.tolist()}}}))
    x = list(np.linspace(-1, 1, 7))
    loss = [[float(2 + a * a + 2 * b * b) for a in x] for b in x[:5]]
    (path / "landscape.json").write_text(json.dumps({"x": x, "y": x[:5], "loss": loss, "accuracy": None,
                                                     "policy": {}, "n_examples": 8, "run": run}))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    return {
        "vit": _probe_dir(root / "vit", "test_vit_cb", ATTN + STREAMS, interventions=True),
        "convit": _probe_dir(root / "convit", "test_convit_32", ["attention_entropy", "gpsa_gates", "fourier"]),
        "train": _train_dir(root / "train"),
        "curv": _curvature_robustness_dir(root / "curv"),
    }


@pytest.fixture(scope="module")
def report(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    path = build_report([dirs["vit"], dirs["convit"], dirs["train"], dirs["curv"]], out, svg=True)
    return path, path.read_text()


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(s: str) -> float | None:
    return None if s == "" else float(s)


EXPECTED = {
    "test-vit-cb-vit": ["cka", "attention_distance", "attention_entropy", "nonlocality", "relative_distance",
                        "ratio_of_norms", "fourier", "fourier_curves", "feature_variance", "lesion", "localization"],
    "test-convit-32-convit": ["attention_entropy", "gpsa_gates", "fourier", "fourier_curves"],
    "test-convit-32-train": ["training_curves", "train_gpsa_gates", "train_nonlocality", "train_attention_entropy"],
    "test-vit-cb-curv": ["hessian", "landscape", "reliability", "robustness_frequency", "robustness_eps",
                         "robustness_corruptions"],
    "comparison": ["compare_attention_entropy", "compare_fourier"],
}


def test_report_has_every_figure_embedded_and_saved(report):
    path, page = report
    fig_dir = path.parent / "figures"
    for section, keys in EXPECTED.items():
        assert f'id="{section}"' in page, section
        for key in keys:
            assert f'id="{section}--{key}"' in page, (section, key)
            for ext in (".png", ".svg", ".csv"):
                assert (fig_dir / section / (key + ext)).stat().st_size > 0, (section, key, ext)
            assert (fig_dir / section / f"{key}.svg").read_text().lstrip().startswith("<?xml")
            assert (fig_dir / section / f"{key}.png").read_bytes()[:8] == PNG_MAGIC
    # no figure for data that is absent: the probe-only ViT has no training or robustness figure
    assert not (fig_dir / "test-vit-cb-vit" / "training_curves.png").exists()
    assert not (fig_dir / "test-vit-cb-vit" / "hessian.png").exists()
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]*)"', page)
    assert len(imgs) == page.count("<img") == sum(len(v) for v in EXPECTED.values())
    for b64 in imgs:
        assert base64.b64decode(b64, validate=True)[:8] == PNG_MAGIC
    # self-contained: no external resource of any kind
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page and "@import" not in page
    assert 'href="figures/test-vit-cb-vit/cka.csv"' in page
    # every caption carries the definition and the paper's finding
    assert page.count("<em>Paper:</em>") == len(imgs) + 1  # + the summary table
    assert "ln N" in page and "HDVW Fig. 2" in page and "RAGHU" in page and "CONVIT" in page
    assert not list(path.parent.rglob("*.tmp"))


def test_report_csv_equals_the_inputs(report, dirs):
    path, _ = report
    fig = path.parent / "figures"
    res = json.loads((dirs["vit"] / "results.json").read_text())
    rows = _csv(fig / "test-vit-cb-vit" / "attention_distance.csv")
    expect = [(r["layer"], h, v) for r in res["attention_distance"]["rows"] for h, v in enumerate(r["heads"])]
    assert [(r["layer"], int(r["head"]), float(r["value"])) for r in rows] == expect
    rows = _csv(fig / "test-vit-cb-vit" / "attention_entropy.csv")
    assert [float(r["ln_n"]) for r in rows] == [math.log(17)] * len(rows)  # 4x4 patches + class token
    cka = _csv(fig / "test-vit-cb-vit" / "cka.csv")
    n = len(res["cka"]["layers"])
    assert np.array([float(r["value"]) for r in cka]).reshape(n, n).tolist() == res["cka"]["matrix"]
    four = _csv(fig / "test-vit-cb-vit" / "fourier.csv")
    assert [(float(r["normalized_depth"]), float(r["value"])) for r in four] == [
        (r["normalized_depth"], r["value"]) for r in res["fourier"]["rows"]]
    ratio = _csv(fig / "test-vit-cb-vit" / "ratio_of_norms.csv")
    cls = {(r["layer"]): float(r["value"]) for r in ratio if r["token"] == "cls"}
    assert cls == {r["layer"]: r["cls"] for r in res["ratio_of_norms"]["rows"]}
    lesion = _csv(fig / "test-vit-cb-vit" / "lesion.csv")
    assert [float(r["accuracy_drop"]) for r in lesion] == [r["accuracy_drop"] for r in res["lesion"]["rows"]]
    # training probes: one CSV row per (epoch, layer, head) of probes.jsonl
    recs = [json.loads(s) for s in (dirs["train"] / "probes.jsonl").read_text().splitlines()]
    gates = _csv(fig / "test-convit-32-train" / "train_gpsa_gates.csv")
    expect = sorted((r["epoch"], lay, h, v) for r in recs if r["measure"] == "gpsa_gates"
                    for lay, vals in zip(r["layers"], r["values"]) for h, v in enumerate(vals))
    assert sorted((int(g["epoch"]), g["layer"], int(g["head"]), float(g["value"])) for g in gates) == expect
    # ConViT init: sigmoid(1) = 0.731 in float32 (exp within 1 ulp, the sum, the reciprocal, the rounding to float32:
    # within 4 u32 of it, u32 = 2^-24), against float64's (a few u)
    assert abs(expect[0][3] - 1 / (1 + math.exp(-1.0))) <= 4 * 2.0**-24 * 0.75
    # robustness, hessian, landscape
    rob = json.loads((dirs["curv"] / "results.json").read_text())
    freq = _csv(fig / "test-vit-cb-curv" / "robustness_frequency.csv")
    assert [float(r["accuracy"]) for r in freq] == rob["frequency"]["accuracy"]
    rel = _csv(fig / "test-vit-cb-curv" / "reliability.csv")
    assert [int(r["count"]) for r in rel] == [b["count"] for b in rob["calibration"]["reliability"]]
    assert [_num(r["accuracy"]) for r in rel] == [b["accuracy"] for b in rob["calibration"]["reliability"]]
    corr = _csv(fig / "test-vit-cb-curv" / "robustness_corruptions.csv")
    assert [float(r["accuracy"]) for r in corr if r["corruption"] == "contrast"] == rob["corruptions"]["accuracy"][
        "contrast"]
    hess = json.loads((dirs["curv"] / "hessian.json").read_text())["groups"]["all"]
    rows = _csv(fig / "test-vit-cb-curv" / "hessian.csv")
    assert [float(r["eigenvalue"]) for r in rows if r["eigenvalue"]] == [v for b in hess["eigenvalues"] for v in b]
    assert [float(r["density"]) for r in rows if r["density"]] == hess["density"]
    land = json.loads((dirs["curv"] / "landscape.json").read_text())
    grid = _csv(fig / "test-vit-cb-curv" / "landscape.csv")
    assert np.array([float(r["loss"]) for r in grid]).reshape(5, 7).tolist() == land["loss"]


def test_report_summary_and_notes(report, dirs):
    path, page = report
    # what each kind of sub-layer does (HDVW): mean change from the previous sub-layer, by hand
    res = json.loads((dirs["vit"] / "results.json").read_text())
    rows = res["fourier"]["rows"]
    msa = [b["value"] - a["value"] for a, b in zip(rows, rows[1:]) if b["kind"] == "msa"]
    mlp = [b["value"] - a["value"] for a, b in zip(rows, rows[1:]) if b["kind"] == "mlp"]
    assert rows[0]["kind"] == "stem" and len(msa) == len(mlp) == 2  # the first MSA has an input: the stem
    assert (f"Observed mean change per sub-layer kind: msa {np.mean(msa):+.3g} ({len(msa)} sub-layers), "
            f"mlp {np.mean(mlp):+.3g} ({len(mlp)} sub-layers)") in page
    rows = res["feature_variance"]["rows"]
    msa = [np.log(b["value"] / a["value"]) for a, b in zip(rows, rows[1:]) if b["kind"] == "msa"]
    assert f"msa {np.mean(msa):+.3g} ({len(msa)} sub-layers)" in page
    ent = res["attention_entropy"]["rows"]
    frac = np.mean([r["value"] / r["max_entropy"] for r in ent])
    assert f"Observed: entropy is on average {100 * frac:.0f}% of ln N" in page
    summary = _csv(path.parent / "figures" / "summary.csv")
    meta = json.loads((dirs["vit"] / "meta.json").read_text())
    vit = next(r for r in summary if r["source"] == "probe pass" and r["directory"] == str(dirs["vit"]))
    assert float(vit["accuracy"]) == meta["accuracy"] and float(vit["nll"]) == meta["nll"]
    train = next(r for r in summary if r["source"].startswith("training"))
    # the last epoch's val_top1 / 100 and val_ece as the fixture wrote them (JSON and CSV carry float64 exactly)
    assert float(train["accuracy"]) == (20.0 + 5 * 1) / 100 and float(train["ece"]) == 0.1 + 0.01 * 1
    rob = json.loads((dirs["curv"] / "results.json").read_text())
    r = next(r for r in summary if r["source"] == "robustness pass")
    assert float(r["ece"]) == rob["calibration"]["ece"]
    assert float(r["occlusion_accuracy"]) == rob["occlusion"]["accuracy"]
    # negative fraction computed independently from the eigenvalues
    eig = np.concatenate(json.loads((dirs["curv"] / "hessian.json").read_text())["groups"]["all"]["eigenvalues"])
    assert f"20 eigenvalues, negative fraction {np.mean(eig < 0):.3f}" in page
    # the same model twice gets the directory appended; names come from meta.json / config.yaml
    assert ">test_convit_32 (train)<" in page and ">test_convit_32 (convit)<" in page
    assert ">test_vit_cb (vit)<" in page and ">test_vit_cb (curv)<" in page


def test_probe_only_dir_and_1d_landscape(dirs, tmp_path):
    out = build_report([dirs["convit"]], tmp_path / "r" / "one.html")
    page = out.read_text()
    assert page.count("<img") == 4 and "comparison" not in page  # gpsa gates, entropy, fourier, fourier curves
    files = [p for p in (out.parent / "figures").rglob("*") if p.is_file()]  # SVG only on request
    assert {p.suffix for p in files} == {".png", ".csv"} and ".svg" not in page
    d = tmp_path / "land"
    d.mkdir()
    (d / "landscape.json").write_text(json.dumps({"alphas": [-1, 0, 1], "loss": [3.0, 1.0, 2.5], "model": "m"}))
    page = build_report([d], tmp_path / "land.html").read_text()
    assert page.count("<img") == 1 and 'id="m--landscape"' in page
    assert _csv(tmp_path / "figures" / "m" / "landscape.csv") == [
        {"x": "-1.0", "loss": "3.0"}, {"x": "0.0", "loss": "1.0"}, {"x": "1.0", "loss": "2.5"}]


def test_errors_name_the_directory_and_expected_files(tmp_path, dirs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportInputError, match=r"empty holds no vitscope output.*results\.json.*metrics\.jsonl"):
        load_run(empty)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ReportInputError, match="hessian.json"):
        build_report([empty], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()
    parent = tmp_path / "parent"
    (parent / "run1").mkdir(parents=True)
    (parent / "run1" / "hessian.json").write_text(json.dumps({"eigenvalues": [1.0]}))
    with pytest.raises(ReportInputError, match="run1.*pass those instead"):
        load_run(parent)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_run(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"attention_entropy": {"rows": [{"layer": "a", "block": 0}]}}))
    with pytest.raises(ReportInputError, match=r"attention_entropy.*row 0 lacks field\(s\) \['value'\]"):
        load_run(bad)
    (bad / "results.json").write_text(json.dumps({"fourier": {"rows": [
        {"normalized_depth": 0.0, "kind": "msa", "value": "high"}]}}))
    with pytest.raises(ReportInputError, match=r"fourier.*row 0 field 'value' must hold numbers"):
        load_run(bad)
    (bad / "results.json").write_text("{not json")
    with pytest.raises(ReportInputError, match="not valid JSON"):
        load_run(bad)
    (bad / "results.json").unlink()
    (bad / "landscape.json").write_text(json.dumps({"x": [0, 1], "y": [0, 1, 2], "loss": [[1, 2], [3, 4]]}))
    with pytest.raises(ReportInputError, match="3 x 2 grid"):
        load_run(bad)
    (bad / "landscape.json").unlink()
    (bad / "probes.jsonl").write_text(json.dumps({"epoch": 0, "measure": "nonlocality", "layers": ["a", "b"],
                                                  "values": [1.0]}) + "\n")
    with pytest.raises(ReportInputError, match="probes.jsonl line 1: 'layers' and 'values' must be lists of equal"):
        load_run(bad)
    with pytest.raises(ValueError, match="is a directory"):
        build_report([dirs["convit"]], tmp_path)
    assert cli_main(["report", str(empty), "--out", str(tmp_path / "c.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vitscope report: error:" in err and "empty holds no vitscope output" in err


def test_cli_writes_the_report(tmp_path, capsys):
    d = tmp_path / "hess"
    d.mkdir()
    (d / "hessian.json").write_text(json.dumps({"density": {"grid": [-1, 0, 1, 2], "density": [0.1, 0.5, 0.3, 0.1]}}))
    assert cli_main(["report", str(d), "--out", str(tmp_path / "cli.html"), "--title", "T", "--svg"]) == 0
    assert (tmp_path / "figures" / "hess" / "hessian.svg").read_text().lstrip().startswith("<?xml")
    assert "wrote" in capsys.readouterr().out
    page = (tmp_path / "cli.html").read_text()
    assert "<title>T</title>" in page and page.count("<img") == 1
    # negative fraction of a density: trapezoid integral over eigenvalues <= 0 / total = 0.3 / 0.9
    assert "negative fraction 0.333" in page and 'id="hess--hessian"' in page


def test_other_layouts_robustness_json_and_slq_density(tmp_path):
    rob = tmp_path / "rob"
    rob.mkdir()
    (rob / "robustness.json").write_text(json.dumps({
        "n": 10, "clean": {"accuracy": 0.8, "n": 10},
        "fgsm": {"eps": [1 / 255, 8 / 255], "accuracy": [0.5, 0.1]},
        "frequency": {"freqs": [0.0, 1.0], "accuracy": [0.7, 0.4], "eps": 2.0}}))
    hess = tmp_path / "hess"
    hess.mkdir()  # a Hessian output written as results.json, SLQ nodes/weights per probe
    (hess / "results.json").write_text(json.dumps({"model": "cnn", "density": {
        "grid": [-2, -1, 0, 1, 2], "density": [0.1, 0.2, 0.3, 0.2, 0.1],
        "nodes": [[-1.0, 0.5, 2.0], [-0.5, -0.1, 1.0]], "weights": [[0.2, 0.5, 0.3], [0.1, 0.3, 0.6]]}}))
    groups = tmp_path / "groups"
    groups.mkdir()  # vitscope hessian --groups block: one spectrum per parameter group
    (groups / "hessian.json").write_text(json.dumps({"run": {"model": "vit", "checkpoint": None}, "groups": {
        "attention": {"eigenvalues": [[-1.0, 2.0], [3.0, 4.0]], "grid": [0, 1], "density": [0.5, 0.5]},
        "mlp": {"eigenvalues": [[-1.0, -2.0], [3.0, 4.0]]}}}))
    page = build_report([rob, hess, groups], tmp_path / "o.html").read_text()
    assert "attention: 4 eigenvalues, negative fraction 0.250; mlp: 4 eigenvalues, negative fraction 0.500" in page
    assert page.count("<img") == 5  # eps, frequency, 2 hessians, hessian comparison; no reliability
    assert 'id="rob--robustness_eps"' in page and 'id="cnn--hessian"' in page
    assert "negative fraction 0.300" in page  # mean over probes of the weight on negative nodes: (0.2 + 0.4) / 2
    eps = _csv(tmp_path / "figures" / "rob" / "robustness_eps.csv")
    assert [(r["attack"], float(r["eps"]), float(r["accuracy"])) for r in eps] == [
        ("fgsm", 1 / 255, 0.5), ("fgsm", 8 / 255, 0.1)]


def test_outputs_of_the_same_weights_share_one_section(tmp_path):
    """A training run plus the probe and robustness outputs of its checkpoint: one section; another checkpoint
    of the same architecture: its own section."""
    run, probe, rob, other = (tmp_path / n for n in ("run", "probe", "rob", "other"))
    for d in (run, probe, rob, other):
        d.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "m"}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_top1": 50.0, "val_nll": 1.0}) + "\n")
    gates = {"gpsa_gates": {"rows": [{"layer": "blocks.0.attn", "block": 0, "value": 0.6, "heads": [0.5, 0.7]}]}}
    for d, ck in ((probe, run / "model.safetensors"), (other, tmp_path / "elsewhere.safetensors")):
        (d / "results.json").write_text(json.dumps(gates))
        (d / "meta.json").write_text(json.dumps({"model_name": "m", "checkpoint": str(ck), "accuracy": 0.5}))
    (rob / "results.json").write_text(json.dumps({"meta": {"model": "m", "checkpoint": str(run)}, "n": 4,
                                                  "clean": {"accuracy": 0.5, "n": 4},
                                                  "fgsm": {"eps": [0.01], "accuracy": [0.25]}}))
    cross = {"rows": [], "layers": ["a", "b"], "other_layers": ["x", "y", "z"], "other_model": "resnet",
             "matrix": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]}  # RAGHU's cross-model CKA, when a producer gives it
    (other / "results.json").write_text(json.dumps({**gates, "cka_cross": cross}))
    page = build_report([run, probe, rob, other], tmp_path / "r.html").read_text()
    for key in ("training_curves", "gpsa_gates", "robustness_eps"):
        assert f'id="m-run--{key}"' in page
    assert 'id="m-other--gpsa_gates"' in page and 'id="m-other--cka_cross"' in page and page.count("<img") == 5
    rows = _csv(tmp_path / "figures" / "m-other" / "cka_cross.csv")
    assert [(r["layer"], r["other_layer"], float(r["value"])) for r in rows] == [
        (a, b, cross["matrix"][i][j]) for i, a in enumerate("ab") for j, b in enumerate("xyz")]
    summary = _csv(tmp_path / "figures" / "summary.csv")
    assert [(r["model"], r["source"], r["directory"]) for r in summary] == [
        ("m (run)", "probe pass", str(probe)), ("m (run)", "training, epoch 0", str(run)),
        ("m (run)", "robustness pass", str(rob)), ("m (other)", "probe pass", str(other))]


def test_negative_fraction_of_a_density_crossing_zero():
    """Exact integral of the piecewise-linear density left of 0 / total, against a fine numeric trapezoid."""
    from vitscope.reports.sections import negative_fraction

    g = np.linspace(-1.3, 2.2, 8)  # no grid point at 0: one segment crosses it
    d = np.exp(-g ** 2)
    # a fine grid holding the knots and 0, so its trapezoid integrates the piecewise-linear density exactly (no
    # kink or cut inside a segment; was a plain fine grid, off by up to h max(d) / 2 = 9e-6, with abs 1e-5): the
    # reference is then off only by roundings: the interpolated values (3 u each), the two sums of up to 2e5
    # terms >= 0 (gamma_n), the quotient; the library's few operations per segment within 8 u each
    fine = np.unique(np.concatenate([np.linspace(-1.3, 2.2, 200_001), g, [0.0]]))
    fd = np.interp(fine, g, d)
    left = fine <= 0
    ref = np.trapezoid(fd[left], fine[left]) / np.trapezoid(fd, fine)
    bound = 2 * (len(fine) + 3 + 8 * len(g)) * 2.0**-53 * ref
    assert abs(negative_fraction({"density": {"grid": g.tolist(), "density": d.tolist()}}) - ref) <= bound
    assert negative_fraction({"eigenvalues": [-1.0, 2.0, 3.0, -0.5]}) == 0.5
    slq = {"density": {"grid": [0, 1], "density": [1, 1], "nodes": [[-1, 1], [2, 3]],
                       "weights": [[0.25, 0.75], [0, 0]]}}
    assert negative_fraction(slq) == 0.25  # the probe with zero total weight is skipped, not a division by zero


def _svg_norm(text: str) -> str:
    """An SVG with matplotlib's random element ids (clip paths, markers, images) numbered in order of use."""
    ids: dict[str, str] = {}
    return re.sub(r"\b(p|m|image|h)[0-9a-f]{10}\b", lambda m: ids.setdefault(m.group(0), f"id{len(ids)}"), text)


def test_parallel_build_writes_the_same_files_as_a_serial_one(dirs, tmp_path):
    """Sections drawn in worker processes (build_report's default) give the files one process gives, byte for
    byte (SVG included: its element ids are hashes of what it draws, render.py), and the same page."""
    pages = {}
    for workers in (1, 3):
        out = build_report([dirs["convit"], dirs["train"]], tmp_path / f"w{workers}" / "report.html",
                           workers=workers, svg=True)
        pages[workers] = re.sub(r"generated [^<]*", "", out.read_text())
    a, b = tmp_path / "w1" / "figures", tmp_path / "w3" / "figures"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    n = 4 + 4  # ConViT probe, training run; no comparison: no probe measure in common (a task that yields None)
    assert {p.suffix for p in files} == {".png", ".svg", ".csv"} and len(files) == 3 * n + 1
    for p in files:
        assert (a / p).read_bytes() == (b / p).read_bytes(), p
    assert pages[1] == pages[3] and pages[1].count("<img") == n


def test_render_gives_savefig_bytes():
    """R.render (layout once, each format drawn once) against plain savefig calls on an identical figure: with a
    colour bar and without, the same PNG bytes and the same SVG as savefig on a figure laid out by matplotlib's
    own engine (axes within 2 px of savefig's layout), titles and ticks pinned where the layout left them.
    Figures with a wrapped title and a y-axis offset text (1e-7 scale, next to which matplotlib may move the
    title)."""
    from vitscope.reports import figures as F
    from vitscope.reports import render as R

    def make(kind):
        if kind == "heatmap":
            return F.heatmap([[0.1, 0.5], [0.9, 0.3]], ["a", "b"], ["c", "dddddddddddddddddddddd"], "CKA " * 20)
        if kind == "bars":  # rotated tick labels, legend
            return F.bars([f"blocks.{i}.attn" for i in range(9)], [0.1 * i for i in range(9)], "drop " * 15,
                          "accuracy drop", kinds=["msa", "mlp"] * 4 + ["msa"])
        return F.lines({"tiny": ([0, 1, 2], [1e-7, 3e-7, 2e-7]), "tinier": ([0, 1, 2], [2e-7, 1e-7, None])},
                       "a long title that matplotlib wraps over two lines " * 2, "step", "value", logy=False)

    for kind in ("heatmap", "lines", "bars"):
        fig = make(kind)
        png = R.to_bytes(fig, "png")  # savefig runs matplotlib's own (two-pass) layout engine
        assert fig.get_layout_engine() is not None
        if kind != "heatmap":
            two = np.array([ax.get_position().bounds for ax in fig.axes])
            fig = make(kind)
            R.lay_out(fig, 130)  # engine run once, then removed
            assert fig.get_layout_engine() is None
            one = np.array([ax.get_position().bounds for ax in fig.axes])
            assert np.abs(one - two).max() * 130 * 4.8 < 2.0
            png = R.to_bytes(fig, "png")
        fig.set_layout_engine("none")
        svg = R.to_bytes(fig, "svg")
        png2, svg2 = R.render(make(kind))
        assert png2 == png and svg2 == svg, kind
        assert "<text" in svg2.decode() and "<text" in svg.decode()  # svg.fonttype none: text stays text
    assert R.render(make("bars"), svg=False)[1] is None


def test_report_figures_stay_on_the_canvas(dirs):
    """After R.render's layout (matplotlib's engine, run once), every figure of a report has its titles, tick
    labels, colour bars and legends inside the canvas."""
    from vitscope.reports import render as R
    from vitscope.reports.loaders import load_runs
    from vitscope.reports.sections import comparison_section, run_section

    runs = load_runs([dirs["vit"], dirs["convit"], dirs["train"], dirs["curv"]])
    items = [it for sec in [comparison_section(runs)] + [run_section(r) for r in runs] if sec for it in sec.items]
    assert len(items) > 20
    for it in items:
        fig = it.figure
        R.lay_out(fig, 130)
        fig.set_dpi(130)
        box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
        w, h = fig.get_size_inches()
        assert box.x0 > -0.01 and box.y0 > -0.01 and box.x1 < w + 0.01 and box.y1 < h + 0.01, (it.key, box)


def test_worker_errors_reach_the_caller(dirs, tmp_path, monkeypatch):
    import vitscope.reports.build as B

    def broken(run):
        raise RuntimeError(f"cannot draw {run.name}")

    monkeypatch.setattr(B, "run_section", broken)  # forked workers inherit the patched module
    with pytest.raises(RuntimeError, match="cannot draw"):
        build_report([dirs["convit"], dirs["curv"]], tmp_path / "r.html", workers=2)
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        build_report([dirs["convit"]], tmp_path / "r.html", workers=0)


def test_a_worker_killed_mid_build_fails_the_build_instead_of_hanging(dirs, tmp_path, monkeypatch):
    """multiprocessing.Pool waits forever for a task whose worker died; the build must raise instead."""
    import os
    import signal

    import vitscope.reports.build as B

    def killed(run):
        os.kill(os.getpid(), signal.SIGKILL)  # a real death of the forked worker, as the OOM killer would do

    monkeypatch.setattr(B, "run_section", killed)  # forked workers inherit the patched module
    with pytest.raises(RuntimeError, match="report worker process died"):
        build_report([dirs["convit"], dirs["curv"]], tmp_path / "r.html", workers=2)
    assert not (tmp_path / "r.html").exists()


def test_png_decodes_to_the_pixels_drawn():
    """R.to_bytes' PNG (matplotlib's writer at zlib level 1) against the RGBA matplotlib draws: the same pixels
    (alpha included) and dpi when decoded by PIL (which checks every chunk's CRC); other formats are refused."""
    import io

    from PIL import Image

    from vitscope.reports import figures as F
    from vitscope.reports import render as R

    fig = F.lines({"a": ([0, 1, 2], [1.0, 3.0, 2.0])}, "t", "x", "y")
    R.lay_out(fig, 130)
    fig.savefig(io.BytesIO(), format="raw", dpi=130)
    drawn = np.asarray(fig.canvas.buffer_rgba()).copy()
    data = R.to_bytes(fig, "png")
    assert data.startswith(PNG_MAGIC)
    ours = Image.open(io.BytesIO(data))
    # PNG stores whole pixels per metre: 130 dpi comes back within half a pixel per metre, 0.5 * 0.0254 dpi
    assert ours.mode == "RGBA" and ours.info["dpi"] == pytest.approx((130, 130), abs=0.5 * 0.0254)
    assert np.array_equal(np.asarray(ours), drawn)
    with pytest.raises(ValueError, match="png or svg"):
        R.to_bytes(fig, "jpg")


def test_figure_templates_draw_the_same_bytes(dirs):
    """The report's figures (rotated tick labels, log axes, colour bars, legends, a mathtext label) drawn one
    after another from figure templates give the PNG and SVG that freshly built figures give."""
    from vitscope.reports import figures as F
    from vitscope.reports import render as R
    from vitscope.reports.loaders import load_runs
    from vitscope.reports.sections import run_section

    def figures():
        out = [it.figure for it in run_section(load_runs([dirs["curv"]])[0]).items]
        out += [F.heatmap([[0.1, 0.5], [0.9, 0.3]], ["a", "b"], ["c", "d" * 22], "CKA"),
                F.bars([f"blocks.{i}.attn" for i in range(9)], [0.1 * i for i in range(9)], "drop", "accuracy drop",
                       kinds=["msa", "mlp"] * 4 + ["msa"]),
                F.lines({"a": ([1, 2, 3], [1e-3, 1.0, 30.0]), "b": ([1, 2, 3], [2.0, 0.5, 1.0])}, "log", "x", "y")]
        out[0].axes[0].set_xlabel(r"$\lambda_{\max}$ / $10^{-3}$")
        out[0].axes[0].set_title("rotated", rotation=7)
        return out

    # No svg.hashsalt here: render.py makes the SVG element ids hashes of what is drawn (test_svg_bytes_...)
    plain = [R.render(f) for f in figures()]
    R._TEMPLATES.clear()
    with R.figure_templates():
        with R.figure_templates():  # nested: harmless
            cached = [R.render(f) for f in figures()]
    assert len(R._TEMPLATES) >= 2  # blank figures by size: later figures are copies
    assert not R._TEMPLATES_ON
    assert len(plain) == len(cached) == 9
    for (png, svg), (png2, svg2) in zip(plain, cached):
        assert png == png2 and svg == svg2



def test_svg_bytes_are_reproducible():
    """The same figure gives the same SVG bytes in every run and process: matplotlib's element ids are random
    (uuid4) without an svg.hashsalt, and its clip-path ids hash the clip rectangle at full float64 precision while
    the file prints 6 decimals (an axes placed an ulp differently: the same pixels and printed coordinates, other
    ids; what made test_figure_templates_draw_the_same_bytes fail now and then)."""
    from vitscope.reports import figures as F
    from vitscope.reports import render as R

    def make(nudge: list[int]):
        fig = F.lines({"a": ([1, 2, 3], [1e-3, 1.0, 30.0]), "b": ([1, 2, 3], [2.0, 0.5, 1.0])}, "log", "x", "y")
        R.lay_out(fig, 130)
        x0, y0, w, h = fig.axes[0].get_position().bounds
        twin = fig.add_axes((x0, y0, w, h))  # a second axes on the first: its own grid lines, the same clip box
        twin.plot([1, 2, 3], [3.0, 1.0, 2.0])
        for k, ax in zip(nudge, fig.axes):  # move by k ulps: far below the 6 printed decimals and the pixels
            ax.set_position((x0 + k * np.spacing(x0), y0, w, h))
        return R.to_bytes(fig, "png"), R.to_bytes(fig, "svg")

    assert matplotlib.rcParams["svg.hashsalt"] is None  # matplotlib's default: a uuid per id
    png, svg = make([0, 0])
    assert svg.decode().count("<clipPath") == 1  # one clip box for both axes
    for nudge in ([0, 0], [1, 0], [1, 2]):  # the same figure again; then one, then both axes an ulp or two off
        png2, svg2 = make(nudge)
        assert png2 == png and svg2 == svg, nudge
    with matplotlib.rc_context({"svg.hashsalt": "mine"}):  # a user's salt is kept: other ids, the same drawing
        mine = make([0, 0])[1]
    assert mine != svg and _svg_norm(mine.decode()) == _svg_norm(svg.decode())

def test_no_private_matplotlib_api():
    """The package draws through matplotlib's public API only (no private module, attribute or pyplot)."""
    src = Path(vitscope.__file__).parent
    private = re.compile(r"matplotlib\._|\._(autotitlepos|suptitle|lastKey|get_layout|colorbar|compress|autopos)\b"
                         r"|_get_text_metrics|_get_renderer\(|import matplotlib\.pyplot|from matplotlib import pyplot")
    hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if private.search(line)]
    assert hits == []
