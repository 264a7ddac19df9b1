"""Results in a notebook: every result object's ``to_pandas()`` holds exactly its values, one per row, and its
``plot()`` is the figure ``vitscope report`` draws from the same result written to disk (the same PNG bytes)."""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch

import vitscope
from vitscope.curvature import eigenvalue_spectrum, loss_landscape
from vitscope.data import create_loader
from vitscope.reports import load_run
from vitscope.reports.sections import run_section
from vitscope.robustness import evaluate_robustness

DATA = "fake:n=8,n_eval=8"


@pytest.fixture(scope="module")
def model_and_loader():
    torch.manual_seed(0)
    model = vitscope.create_model("test_vit_cifar", num_classes=10).eval()
    return model, create_loader(DATA, "val", batch_size=4, img_size=32)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    return buf.getvalue()


def _report_figure(directory, key):
    """The figure ``key`` of the report's section for ``directory``, as ``vitscope report`` builds it."""
    items = {it.key: it.figure for it in run_section(load_run(directory)).items}
    return items[key]


def test_probe_result_tidy_and_the_reports_figure(model_and_loader, tmp_path):
    model, loader = model_and_loader
    res = vitscope.probe(model, loader, measures=["attention_entropy", "cka", "fourier"], progress=False)
    df = res.to_pandas()
    d = res.to_dict()
    # every value of the result once: a layer value, each head, each curve point, each other number
    expected = 0
    for rows in (c["rows"] for c in d.values()):
        for r in rows:
            for k, v in r.items():
                expected += len(v) if isinstance(v, list) else isinstance(v, (int, float)) and k not in (
                    "block", "depth", "normalized_depth", "other_depth")
    assert len(df) == expected
    ent = d["attention_entropy"]["rows"][1]
    got = df[(df.measure == "attention_entropy") & (df.layer == ent["layer"]) & (df.statistic == "value")]
    assert got["head"].isna().sum() == 1 and got[got["head"].isna()].value.item() == ent["value"]
    assert got.dropna(subset=["head"]).sort_values("head")["value"].tolist() == ent["heads"]
    cka = df[df.measure == "cka"]
    n_layers = len(d["cka"]["layers"])
    assert len(cka) == n_layers ** 2 and set(cka.statistic) == {"value"}
    res.save(tmp_path / "p")
    for key in ("attention_entropy", "cka"):
        assert _png(res.plot(key)) == _png(_report_figure(tmp_path / "p", key))
    with pytest.raises(ValueError, match="no figure 'nonlocality'.*attention_entropy"):
        res.plot("nonlocality")


def test_spectrum_and_landscape(model_and_loader, tmp_path):
    model, loader = model_and_loader
    spec = eigenvalue_spectrum(model, loader, k=2, max_batches=2, progress=False)
    df = spec.to_pandas()
    assert len(df) == spec.eigenvalues["all"].size == 4
    assert np.array_equal(df.eigenvalue.to_numpy().reshape(2, 2), spec.eigenvalues["all"])
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "hessian.json").write_text(json.dumps(spec.to_dict()))
    assert _png(spec.plot("h")) == _png(_report_figure(tmp_path / "h", "hessian"))  # the report names it by its dir
    land = loss_landscape(model, None, loader, dims=2, steps=3, max_batches=1, progress=False)
    df = land.to_pandas()
    assert len(df) == 9 and df.loss.tolist() == [land.loss[j, i] for j in range(3) for i in range(3)]
    assert df.y.tolist() == [land.y[j] for j in range(3) for i in range(3)]
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "landscape.json").write_text(json.dumps(land.to_dict()))
    assert _png(land.plot("l")) == _png(_report_figure(tmp_path / "l", "landscape"))


def test_robustness_and_attention_maps(model_and_loader, tmp_path):
    model, _ = model_and_loader
    pixels = create_loader(DATA, "val", batch_size=4, img_size=32, normalize=False)
    rob = evaluate_robustness(model, pixels, ("calibration", "fgsm"), eps=(1 / 255, 2 / 255), mean=(0.5,) * 3,
                              std=(0.25,) * 3, progress=False)
    assert isinstance(rob, dict) and json.loads(json.dumps(rob)) == json.loads(json.dumps(dict(rob)))
    assert type(pickle.loads(pickle.dumps(rob))) is type(rob)  # results cross process boundaries (torchrun, fork)
    df = rob.to_pandas()
    assert df[df.figure == "clean"].accuracy.item() == rob["clean"]["accuracy"]
    eps = df[df.figure == "robustness_eps"]
    assert eps.accuracy.tolist() == rob["fgsm"]["accuracy"] and eps.eps.tolist() == rob["fgsm"]["eps"]
    assert len(df[df.figure == "reliability"]) == len(rob["calibration"]["reliability"])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "robustness.json").write_text(json.dumps(rob))
    assert _png(rob.plot("robustness_eps", title="r")) == _png(_report_figure(tmp_path / "r", "robustness_eps"))

    x, _ = next(iter(create_loader(DATA, "val", batch_size=2, img_size=32)))
    maps = vitscope.attention_maps(model, x, (1, 2))
    maps.meta["model_name"] = "tiny"
    df = maps.to_pandas()
    q = df[df.figure == "attention_query_maps"]
    assert len(q) == sum(m.size for m in maps.query_maps)
    first = q[(q.layer == maps.layers[0]) & (q.image == 1) & (q["head"] == 2)]
    assert first.value.to_numpy().reshape(maps.query_maps[0].shape[2:]).tolist() == \
        maps.query_maps[0][1, 2].astype(float).tolist()
    (tmp_path / "a").mkdir()
    maps.save(tmp_path / "a" / "attention.npz")
    (tmp_path / "a" / "meta.json").write_text(json.dumps({"model_name": "tiny"}))
    assert _png(maps.plot("attention_rollout")) == _png(_report_figure(tmp_path / "a", "attention_rollout"))


def test_report_from_python(model_and_loader, tmp_path):
    model, loader = model_and_loader
    vitscope.probe(model, loader, measures=["attention_entropy"], progress=False).save(tmp_path / "p")
    out = vitscope.report(tmp_path / "p", out=tmp_path / "r.html", workers=1)
    assert out == tmp_path / "r.html" and "attention entropy" in out.read_text()
    with pytest.raises(ValueError, match="at least one output directory"):
        vitscope.report(out=tmp_path / "x.html")
