"""vitscope.probe's ``linear_probe`` measure: few-shot ridge probes of every layer equal scikit-learn's
RidgeClassifier on the same features (taken by plain forward hooks), with the fit and held-out examples split
across uneven batches; the table in results.json / CSV / to_pandas / plot and the report, end to end from the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier

import vitscope
from _helpers import ridge_trace_bound


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vitscope.create_model("test_vit_cifar", num_classes=3).eval()  # timm ViT, 32 px, 2 blocks


def _hooked(model, batches):
    """Outputs of the stem (timm's norm_pre: patch embedding + class token + positions) and of every block, by
    plain forward hooks over ``batches``, concatenated in float64."""
    modules = [model.norm_pre, *model.blocks]
    got = [[] for _ in modules]
    hs = [m.register_forward_hook(lambda _m, _i, o, k=k: got[k].append(o.double())) for k, m in enumerate(modules)]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hs:
        h.remove()
    return [torch.cat(g) for g in got]


def test_probe_linear_probe_equals_sklearn(model):
    g = torch.Generator().manual_seed(5)
    fit_x, fit_y = torch.randn(36, 3, 32, 32, generator=g), torch.arange(36) % 3  # 12 per class
    test_x, test_y = torch.randn(21, 3, 32, 32, generator=g), torch.randint(0, 3, (21,), generator=g)
    fit_loader = [(fit_x[i:i + 7], fit_y[i:i + 7]) for i in range(0, 36, 7)]  # 7, 7, 7, 7, 7, 1
    loader = [(test_x[i:i + 8], test_y[i:i + 8]) for i in range(0, 21, 8)]  # 8, 8, 5
    res = vitscope.probe(model, loader, ["linear_probe", "cka"], layers="blocks", fit_loader=fit_loader,
                         num_classes=3, shots=(2, 10), ridge=0.3, progress=False)
    rows = res["linear_probe"]
    names = ["stem", "blocks.0", "blocks.1"]
    # the stem's class token is the same for every example (learned token + position): no probe on it
    assert {(r["layer"], r["readout"]) for r in rows} == {(n, ro) for n in names for ro in ("cls", "gap")} - {
        ("stem", "cls")}
    assert {r["shots"] for r in rows} == {2, 10} and {r["model"] for r in rows} == {"VisionTransformer"}
    assert res.extras["cka"]["layers"] == names  # rows line up with the other stream measures' depth
    fit_feats, test_feats = _hooked(model, fit_loader), _hooked(model, loader)
    for depth, (name, zf, zt) in enumerate(zip(names, fit_feats, test_feats)):
        for readout, pick in (("cls", lambda z: z[:, 0]), ("gap", lambda z: z[:, 1:].mean(1))):
            if (name, readout) == ("stem", "cls"):
                continue
            for k in (2, 10):
                first = torch.cat([torch.nonzero(fit_y == c).flatten()[:k] for c in range(3)]).sort().values
                xf = pick(zf)[first].numpy()
                row = next(r for r in rows if (r["layer"], r["readout"], r["shots"]) == (name, readout, k))
                assert row["depth"] == depth
                xc = xf - xf.mean(0)
                alpha = 0.3 * float((xc**2).sum()) / xf.shape[1]
                # the same float32 forward on the same batches: the same outputs; a GAP is a float64 mean of M
                # tokens on either side, each within (M + 1) u mean|z| of the exact one. alpha: the Chan-merged
                # trace fed as the probe's fit batches vs numpy's two-pass (ridge_trace_bound), x 0.3 / D: 2 u a side
                sizes = [n for n in torch.bincount(first // 7).tolist() if n]
                z = zf[first].numpy()
                err = (2 * (z.shape[1] * 2.0**-53) * np.abs(z[:, 1:]).mean(1) if readout == "gap"
                       else np.zeros_like(xf))  # (n, D)
                bound = 0.3 / xf.shape[1] * ridge_trace_bound(xf, sizes, err.max(0)) + 4 * 2.0**-53 * alpha
                assert abs(row["alpha"] - alpha) <= bound
                ref = RidgeClassifier(alpha=alpha, solver="cholesky").fit(xf, fit_y[first].numpy())
                assert row["accuracy"] == ref.score(pick(zt).numpy(), test_y.numpy())


def test_probe_linear_probe_table_frame_and_errors(model):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(18, 3, 32, 32, generator=g), torch.arange(18) % 3
    loader = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 18, 6)]
    res = vitscope.probe(model, loader, ["linear_probe"], layers="blocks", names="blocks.*", fit_loader=loader,
                         num_classes=3, shots=(3,), progress=False)
    assert [r["layer"] for r in res["linear_probe"]] == ["blocks.0", "blocks.1"] * 2  # cls rows, then gap rows
    df = res.to_pandas()
    acc = df[(df.measure == "linear_probe") & (df.statistic == "accuracy")]
    assert len(acc) == 4 and set(acc.shots) == {3} and set(acc.readout) == {"cls", "gap"}
    fig = res.plot("linear_probe")  # the report's curves: one line per read-out and k
    assert len(fig.axes[0].get_lines()) >= 2
    with pytest.raises(ValueError, match="fit_loader"):
        vitscope.probe(model, loader, ["linear_probe"], progress=False)
    bad = [(x[:6], torch.full((6,), 5))]  # labels of another label space: one error after the pass, no host read
    with pytest.raises(ValueError, match=r"linear_probe labels outside \[0, 3\)"):
        vitscope.probe(model, bad, ["linear_probe"], fit_loader=loader, num_classes=3, shots=(3,), progress=False)
    with pytest.raises(ValueError, match="shots must be positive"):
        vitscope.probe(model, loader, ["linear_probe"], fit_loader=loader, num_classes=3, shots=(0,), progress=False)


def test_cli_probe_linear_probe_and_report(tmp_path, capsys):
    from vitscope.cli import main

    out = tmp_path / "probe"
    rc = main(["probe", "--model", "test_vit_cifar", "--data", "fake:n=48,classes=3", "--measures",
               "cka,linear_probe", "--layers", "blocks", "--shots", "2,4", "--batch-size", "5", "-j", "0",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res, meta = json.loads((out / "results.json").read_text()), json.loads((out / "meta.json").read_text())
    rows = res["linear_probe"]["rows"]
    assert {r["shots"] for r in rows} == {2, 4} and {r["readout"] for r in rows} == {"cls", "gap"}
    assert {r["layer"] for r in rows} == {"stem", "blocks.0", "blocks.1"}
    assert all(0 <= r["accuracy"] <= 1 and r["alpha"] > 0 for r in rows)
    assert (meta["fit_split"], meta["shots"]) == ("train", [2, 4])
    assert (out / "linear_probe.csv").read_text().startswith("model,layer,depth,normalized_depth,readout,shots")
    html = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(html)]) == 0, capsys.readouterr().err
    files = {p.name for p in html.parent.rglob("*") if p.is_file()}
    assert any("linear_probe" in f and f.endswith(".png") for f in files), sorted(files)
    assert any("linear_probe" in f and f.endswith(".csv") for f in files), sorted(files)
    assert main(["probe", "--model", "test_vit_cifar", "--data", "fake:n=48,classes=3", "--measures",
                 "linear_probe", "--shots", "x", "--out", str(out)]) == 2
    assert "--shots must be" in capsys.readouterr().err
