"""vitscope.compare: cross-model CKA of a 32 px ViT and a 24 px ResNet on the same examples (each through its own
input) against a numpy computation on features taken by plain forward hooks, split across batches with a short
last batch; block / sub-layer selection and the glob filter; the linear probe against scikit-learn."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import RidgeClassifier

import vitscope
from _helpers import gram_cka_bound, minibatch_cka_bound, ridge_trace_bound
from vitscope.comparing import CompareResult


def np_hsic1(K, L):
    """METHODS.md's unbiased HSIC_1, term by term."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    t = np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one @ K @ L @ one)
    return t / (n * (n - 3))


def np_minibatch_cka(fa, fb):
    """fa, fb: list over batches of list over layers of (n, D) float64 arrays; batches of n <= 3 skipped."""
    La, Lb = len(fa[0]), len(fb[0])
    xy, xx, yy = np.zeros((La, Lb)), np.zeros(La), np.zeros(Lb)
    for ba, bb in zip(fa, fb):
        if ba[0].shape[0] <= 3:
            continue
        Ks = [f @ f.T for f in ba]
        Ls = [f @ f.T for f in bb]
        for i in range(La):
            xx[i] += np_hsic1(Ks[i], Ks[i])
            for j in range(Lb):
                xy[i, j] += np_hsic1(Ks[i], Ls[j])
        for j in range(Lb):
            yy[j] += np_hsic1(Ls[j], Ls[j])
    return xy / np.sqrt(np.outer(xx, yy))


def diag_bound(n, batches):
    """|CKA(X, X) - 1| from MinibatchCKA.update_grams on identical Grams: xy (a matmul's dot product) and xx = yy (an
    elementwise sum) add the same n^2 squares >= 0 in other orders, each within gamma_(n^2) relative, then x 1/(n(n-3))
    and the sum over the batches (u + gamma_B each); xy / sqrt(xx xx) adds 3 u."""
    return 2 * (n * n + batches + 1) * 2.0**-53 + 3 * 2.0**-53


def hooked(model, modules, x):
    """Outputs of ``modules`` for input x by plain forward hooks (independent of vitscope.capture)."""
    out = []
    hs = [m.register_forward_hook(lambda _m, _i, o: out.append(o.detach().double().flatten(1).numpy()))
          for m in modules]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return out


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    vit = vitscope.create_model("test_vit_cifar", num_classes=3).eval()  # 32 px, 2 blocks
    cnn = vitscope.create_model("test_resnet_cifar", num_classes=3).eval()  # any size; 24 px here
    g = torch.Generator().manual_seed(1)
    images = torch.randn(23, 3, 32, 32, generator=g)
    labels = torch.arange(23) % 3
    sizes = [8, 8, 4, 3]  # the short last batch of 3 is undefined for unbiased HSIC and is skipped
    batches_a, batches_b, start = [], [], 0
    for s in sizes:
        x, y = images[start:start + s], labels[start:start + s]
        batches_a.append((x, y))
        batches_b.append((F.interpolate(x, size=24, mode="bilinear", align_corners=False), y))
        start += s
    return vit, cnn, batches_a, batches_b


def test_cross_model_cka_equals_numpy_on_different_input_sizes(pair):
    vit, cnn, ba, bb = pair
    with pytest.warns(RuntimeWarning, match="skipped a batch of n=3"):
        res = vitscope.compare(vit, cnn, (ba, bb), progress=False)
    assert res.names_a == ["blocks.0", "blocks.1"]
    assert res.names_b == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert res.cka.dtype == torch.float64 and res.cka.shape == (2, 4)
    fa = [hooked(vit, list(vit.blocks), x) for x, _ in ba]
    fb = [hooked(cnn, [cnn.layer1[0], cnn.layer2[0], cnn.layer3[0], cnn.layer4[0]], x) for x, _ in bb]
    ref = np_minibatch_cka(fa, fb)
    # float64 Grams of the same features, then HSIC_1 in two forms (U-centring vs term by term): each side within
    # minibatch_cka_bound of the exact CKA (gamma_m times HSIC's magnitude with every term positive)
    np.testing.assert_allclose(res.cka.numpy(), ref, rtol=0, atol=2 * minibatch_cka_bound(fa, fb).max())
    assert res.meta["examples"] == 23 and res.meta["cka_skipped_examples"] == 3


def test_same_model_twice_gives_symmetric_cka_with_unit_diagonal(pair):
    vit, _, ba, _ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = vitscope.compare(vit, vit, ba, layers="sublayers", progress=False)
    assert res.names_a == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    # the same features on both sides: HSIC(K_i, K_j) and HSIC(K_j, K_i) multiply the same centred entries (products
    # commute), and so do the denominators: symmetric bit for bit
    np.testing.assert_array_equal(res.cka.numpy(), res.cka.numpy().T)
    np.testing.assert_allclose(np.diag(res.cka.numpy()), 1.0, rtol=0, atol=diag_bound(8, 3))


def test_glob_filter_and_errors(pair, tmp_path):
    vit, cnn, ba, bb = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = vitscope.compare(vit, cnn, (ba, bb), names="blocks.1", names_b="layer[34].*", progress=False)
    assert res.names_a == ["blocks.1"] and res.names_b == ["layer3.0", "layer4.0"]
    out = res.save(tmp_path / "cmp")
    assert {p.name for p in out.iterdir()} == {"results.json", "meta.json", "cka_cross.csv"}
    with pytest.raises(ValueError, match="no layer of VisionTransformer matched"):
        vitscope.compare(vit, cnn, (ba, bb), names="nothing*", progress=False)
    swapped = [(x, (y + 1) % 3) for x, y in bb]
    with pytest.raises(ValueError, match="different examples"):
        vitscope.compare(vit, cnn, (ba, swapped), progress=False)
    with pytest.raises(ValueError, match="different numbers of batches"):
        vitscope.compare(vit, cnn, (ba, bb[:-1]), progress=False)
    with pytest.raises(ValueError, match="unknown measure"):
        vitscope.compare(vit, cnn, ba, measures=["nope"])
    with pytest.raises(ValueError, match="needs fit_loader"):
        vitscope.compare(vit, cnn, ba, measures=["linear_probe"])


def test_linear_probe_equals_sklearn_on_block_features(pair):
    """The probe of every block (class token and GAP) equals RidgeClassifier fitted on the same first k examples
    per class of the fit loader and scored on the held-out loader."""
    vit, cnn, _, _ = pair
    g = torch.Generator().manual_seed(5)
    fit_x, fit_y = torch.randn(30, 3, 32, 32, generator=g), torch.arange(30) % 3  # 10 per class
    test_x, test_y = torch.randn(21, 3, 32, 32, generator=g), torch.randint(0, 3, (21,), generator=g)
    fit_loader = [(fit_x[i:i + 7], fit_y[i:i + 7]) for i in range(0, 30, 7)]  # 7, 7, 7, 7, 2
    loader = [(test_x[i:i + 8], test_y[i:i + 8]) for i in range(0, 21, 8)]  # 8, 8, 5
    res = vitscope.compare(vit, cnn, loader, measures=["linear_probe"], fit_loader=fit_loader, num_classes=3,
                           shots=(2, 10), ridge=0.3, progress=False)
    assert res.cka is None
    rows = res.linear_probe
    cnn_name = type(cnn).__name__
    assert {(r["model"], r["readout"], r["shots"]) for r in rows} == {
        ("VisionTransformer", "cls", 2), ("VisionTransformer", "cls", 10), ("VisionTransformer", "gap", 2),
        ("VisionTransformer", "gap", 10), (cnn_name, "gap", 2), (cnn_name, "gap", 10)}
    with torch.no_grad():
        for model, modules, tag in ((vit, list(vit.blocks), "VisionTransformer"),
                                    (cnn, [cnn.layer1[0], cnn.layer4[0]], cnn_name)):
            outs_fit, outs_test = [], []
            for batches, outs in ((fit_loader, outs_fit), (loader, outs_test)):  # the same batches (float32 sums)
                got = [[] for _ in modules]
                hs = [m.register_forward_hook(lambda _m, _i, o, k=k, got=got: got[k].append(o.double()))
                      for k, m in enumerate(modules)]
                for xs, _ in batches:
                    model(xs)
                for h in hs:
                    h.remove()
                outs.extend(torch.cat(g) for g in got)
            names = ["blocks.0", "blocks.1"] if tag == "VisionTransformer" else ["layer1.0", "layer4.0"]
            for name, zf, zt in zip(names, outs_fit, outs_test):
                vit_side = tag == "VisionTransformer"
                for readout in (("cls", "gap") if vit_side else ("gap",)):
                    pick = (lambda z: z[:, 0]) if readout == "cls" else \
                        ((lambda z: z[:, 1:].mean(1)) if vit_side else (lambda z: z.mean((2, 3))))
                    for k in (2, 10):
                        first = torch.cat([torch.nonzero(fit_y == c).flatten()[:k] for c in range(3)]).sort().values
                        xf = pick(zf)[first].numpy()
                        row = next(r for r in rows if (r["model"], r["layer"], r["readout"], r["shots"]) ==
                                   (tag, name, readout, k))
                        xc = xf - xf.mean(0)
                        alpha = 0.3 * float((xc**2).sum()) / xf.shape[1]
                        # the same float32 forward on the same batches; a GAP is a float64 mean of M values on
                        # either side, each within (M + 1) u mean|z| of the exact one. alpha: the Chan-merged trace
                        # over the fit batches vs numpy's two-pass (ridge_trace_bound), x 0.3 / D: 2 u a side
                        sizes = [n for n in torch.bincount(first // 7).tolist() if n]
                        z = zf[first].flatten(2) if vit_side else zf[first].flatten(2).transpose(1, 2)  # (n, M, D)
                        z = z[:, 1:] if vit_side else z
                        err = (2 * (z.shape[1] + 1) * 2.0**-53 * z.abs().mean(1).numpy() if readout == "gap"
                               else np.zeros_like(xf))  # (n, D)
                        bound = 0.3 / xf.shape[1] * ridge_trace_bound(xf, sizes, err.max(0)) + 4 * 2.0**-53 * alpha
                        assert abs(row["alpha"] - alpha) <= bound
                        ref = RidgeClassifier(alpha=alpha, solver="cholesky").fit(xf, fit_y[first].numpy())
                        assert row["accuracy"] == ref.score(pick(zt).numpy(), test_y.numpy())


def test_result_round_trip_rows():
    res = CompareResult(names_a=["x0", "x1"], names_b=["y0"], cka=torch.tensor([[0.5], [0.25]], dtype=torch.float64),
                        meta={"examples": 9})
    d = res.to_dict()
    assert d["cka_cross"]["matrix"] == [[0.5], [0.25]] and d["cka_cross"]["examples"] == 9
    assert [r["value"] for r in d["cka_cross"]["rows"]] == [0.5, 0.25]
    df = res.to_pandas()
    assert df[df.statistic == "value"]["value"].tolist() == [0.5, 0.25]
    fig = res.plot()  # the report's heatmap
    assert fig.axes[0].get_images()[0].get_array().tolist() == [[0.5], [0.25]]


def test_cli_compare_vit_32px_with_resnet_176px(tmp_path, capsys):
    """Two models of different input sizes on the same fake examples: each is fed through its own preprocessing
    (32 px from the data set, 176 px from resnet10t's pretrained_cfg with --preprocess model)."""
    import json

    from vitscope.cli import main

    out = tmp_path / "cmp"
    rc = main(["compare", "test_vit_cifar", "resnet10t", "--data", "fake:n=48,classes=3", "--batch-size", "5",
               "-j", "0", "--measures", "cka,linear_probe", "--shots", "2,4", "--preprocess", "model",
               "--layer-names-b", "layer[134].*", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model_a"]["preprocessing"]["input_size"] == [3, 32, 32]
    assert meta["model_b"]["preprocessing"]["input_size"] == [3, 176, 176]
    assert res["cka_cross"]["layers"] == ["blocks.0", "blocks.1"]
    assert res["cka_cross"]["other_layers"] == ["layer1.0", "layer3.0", "layer4.0"]  # --layer-names-b
    assert len(res["cka_cross"]["matrix"]) == 2 and len(res["cka_cross"]["matrix"][0]) == 3
    assert (res["cka_cross"]["model"], res["cka_cross"]["other_model"]) == ("test_vit_cifar", "resnet10t")
    assert meta["examples"] == 12  # 12 val examples in batches of 5, 5, 2 (the last skipped by CKA)
    assert meta["cka_skipped_examples"] == 2
    assert {r["shots"] for r in res["linear_probe"]["rows"]} == {2, 4}
    assert (out / "cka_cross.csv").is_file() and (out / "linear_probe.csv").is_file()
    # the report draws the cross-model heatmap and the probe curves, each with its CSV
    html = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(html)]) == 0, capsys.readouterr().err
    files = {p.name for p in html.parent.rglob("*") if p.is_file()}
    for key in ("cka_cross", "linear_probe"):
        assert any(key in f and f.endswith(".csv") for f in files), (key, sorted(files))
        assert any(key in f and f.endswith(".png") for f in files), (key, sorted(files))
    assert "test_vit_cifar vs resnet10t" in html.read_text()


def test_cli_compare_errors(tmp_path, capsys):
    from _helpers import one_line_error

    one_line_error(capsys, ["compare", "test_vit_cifar", "no/such/run", "--data", "fake", "--out", str(tmp_path)],
                   "no such run directory")
    one_line_error(capsys, ["compare", "test_vit_cifar", "test_vit_cifar", "--data", "fake", "--measures", "x",
                            "--out", str(tmp_path)], "--measures: unknown ['x']")
    one_line_error(capsys, ["compare", "test_vit_cifar", str(tmp_path) + "@3", "--data", "fake",
                            "--out", str(tmp_path / "o")], "not a vitscope run directory")


def test_cli_compare_one_run_at_two_epochs(tmp_path, capsys):
    """keep_epochs=1 keeps each epoch's weights; RUN@0 against RUN@last compares the run over training, each side
    rebuilt from the run (16 px, its recorded preprocessing); a run against itself at one epoch gives CKA 1."""
    import json

    from vitscope.cli import main
    from vitscope.io.runs import epoch_weights

    run = tmp_path / "run"
    assert main(["train", "--config", "cpu-quick", "--model", "test_vit_cifar", "--data", "fake:n=48,classes=3",
                 "--out", str(run), "epochs=3", "batch_size=16", "img_size=16", "keep_epochs=1", "progress=false",
                 "lr=3e-3"]) == 0
    assert sorted(p.name for p in (run / "checkpoints" / "kept").iterdir()) == \
        ["epoch-0000.safetensors", "epoch-0001.safetensors", "epoch-0002.safetensors"]
    assert epoch_weights(run, "last").samefile(epoch_weights(run, 2))
    assert epoch_weights(run, 0).parent.name == "kept"  # its checkpoint is gone (the last two are kept)
    with pytest.raises(FileNotFoundError, match=r"holds epochs \[0, 1, 2\]"):
        epoch_weights(run, 7)
    out = tmp_path / "over-training"
    assert main(["compare", f"{run}@0", f"{run}@last", "--data", "fake:n=48,classes=3", "--batch-size", "6", "-j", "0",
                 "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    a, b = meta["model_a"], meta["model_b"]
    assert res["cka_cross"]["over_training"] and (a["label"], b["label"]) == ("run@0", "run@2")
    assert a["checkpoint"].endswith("epoch-0000.safetensors") and b["checkpoint"].endswith("model.safetensors")
    assert a["preprocessing"]["input_size"] == [3, 16, 16] == b["preprocessing"]["input_size"]
    html = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(html)]) == 0, capsys.readouterr().err
    assert "CKA between two checkpoints of one run" in html.read_text()
    m = np.array(res["cka_cross"]["matrix"])
    # the same weights give 1 within diag_bound (below): further off, the weights changed
    assert m.shape == (2, 2) and (np.abs(np.diag(m) - 1) > diag_bound(6, 8)).all()
    same = tmp_path / "same"
    assert main(["compare", f"{run}@2", str(run), "--data", "fake:n=48,classes=3", "--batch-size", "6", "-j", "0",
                 "--device", "cpu", "--out", str(same)]) == 0
    np.testing.assert_allclose(np.diag(json.loads((same / "results.json").read_text())["cka_cross"]["matrix"]), 1.0,
                               rtol=0, atol=diag_bound(6, 8))  # the same weights: 48 examples in batches of 6


def test_nan_in_a_layer_is_one_error_naming_it(pair):
    vit, cnn, ba, bb = pair
    h = cnn.layer3[0].register_forward_hook(lambda _m, _i, o: o * float("nan"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(ValueError, match=r"layer\(s\) \['layer3.0', 'layer4.0'\] of model B contains NaN"):
                vitscope.compare(vit, cnn, (ba, bb), progress=False)
    finally:
        h.remove()


def test_float32_grams_within_the_derived_bound():
    """gram_dtype="float32" (features centred, float32 matmul, float64 HSIC) stays within the derived worst case
    of the float64 reference (plus float64's own, same formula with u = 2^-53 on uncentred features) on features
    with a large common offset, split over batches of unequal size; a float32 Gram of the uncentred features (what
    centring avoids) breaks that bound, so the bound is a real limit, not a tolerance that anything passes."""
    from vitscope.measures import MinibatchCKA
    from vitscope.measures.cka import linear_gram

    g = torch.Generator().manual_seed(3)
    sizes = [40, 40, 25]
    x = torch.randn(105, 2000, generator=g) + 1e3  # one large offset shared by all examples
    y = torch.cat([x[:, :600] @ torch.randn(600, 300, generator=g) / 30, torch.randn(105, 700, generator=g)], 1)
    y = y + 5e2
    xs, ys = x.split(sizes), y.split(sizes)
    # the reference on features centred in float64 (HSIC_1 ignores a common offset; the term-by-term formula on
    # uncentred Grams of entries ~D 1e6 would itself cancel ~7 digits)
    centred = lambda bs: [[(b.double() - b.double().mean(0)).numpy()] for b in bs]  # noqa: E731
    ref = np_minibatch_cka(centred(xs), centred(ys))[0, 0]
    results = {}
    for how in ("centred", "uncentred"):
        m = MinibatchCKA(1, 1)
        for bx, by in zip(xs, ys):
            if how == "centred":
                gx, gy = linear_gram(bx, float32=True), linear_gram(by, float32=True)
            else:
                gx, gy = (bx @ bx.T).double(), (by @ by.T).double()
            m.update_grams([gx], [gy])
        results[how] = float(m.compute()[0, 0])
    bound = sum(gram_cka_bound([b.double().numpy() for b in bs]) for bs in (xs, ys))
    # float64's own: the reference's, and the float64 HSIC of the float32 Grams (minibatch_cka_bound on the centred
    # features; centring rounds each entry u relative, the mean's error being a common offset HSIC_1 ignores)
    bound += 2 * float(minibatch_cka_bound(centred(xs), centred(ys))[0, 0])
    assert 0.05 < ref < 0.95  # a CKA that is neither trivial value
    assert abs(results["centred"] - ref) <= bound
    assert abs(results["uncentred"] - ref) > bound


def test_compare_gram_dtype_float32(pair):
    vit, cnn, ba, bb = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped batch of 3
        r64 = vitscope.compare(vit, cnn, (ba, bb), progress=False)
        r32 = vitscope.compare(vit, cnn, (ba, bb), progress=False, gram_dtype="float32")
    assert r32.meta["gram_dtype"] == "float32" and r64.meta["gram_dtype"] == "float64"
    fa = [hooked(vit, list(vit.blocks), x) for x, _ in ba if x.shape[0] > 3]
    fb = [hooked(cnn, [cnn.layer1[0], cnn.layer2[0], cnn.layer3[0], cnn.layer4[0]], x) for x, _ in bb
          if x.shape[0] > 3]
    assert r64.names_b == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    # r32: float32 Grams of centred features (gram_cka_bound a side), float64 HSIC of them; r64: float64 throughout;
    # the float64 parts each within minibatch_cka_bound (on the centred, the uncentred features)
    own = (minibatch_cka_bound([[f - f.mean(0) for f in b] for b in fa], [[f - f.mean(0) for f in b] for b in fb])
           + minibatch_cka_bound(fa, fb))
    for i in range(len(r64.names_a)):
        for j in range(len(r64.names_b)):
            bound = gram_cka_bound([b[i] for b in fa]) + gram_cka_bound([b[j] for b in fb]) + own[i, j]
            assert abs(float(r32.cka[i, j]) - float(r64.cka[i, j])) <= bound
    with pytest.raises(ValueError, match="gram_dtype"):
        vitscope.compare(vit, cnn, (ba, bb), gram_dtype="float16")
