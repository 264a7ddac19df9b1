"""``vitscope hessian`` and ``vitscope landscape`` end to end on the fake data set (tiny ViT)."""
from __future__ import annotations

import json

import numpy as np
from safetensors.torch import load_file

from vitscope.cli import main


def test_hessian_cli_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "h"
    rc = main(["hessian", "--model", "test_vit_cifar", "--data", "fake", "--k", "2", "--batches", "2",
               "--batch-size", "6", "--mixup", "0.8", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "hessian.json").read_text())
    vals = np.array(data["groups"]["all"]["eigenvalues"])
    assert vals.shape == (2, 2) and np.isfinite(vals).all()
    # the count of negative eigenvalues / their number (JSON round-trips float64 exactly): the same quotient
    assert data["groups"]["all"]["negative_fraction"] == float((vals < 0).mean())
    assert data["config"]["transform"] == "Mixup" and data["batch_sizes"] == [6, 6]
    assert (out / "hessian.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["hessian.json", "hessian.png"]  # no temp files
    assert "negative" in capsys.readouterr().out


def test_hessian_cli_start_and_backend_options_agree(tmp_path, monkeypatch):
    """Gradient start with the retained graph (defaults) and random start with torch.func products find the
    same eigenvalues on the same batches: each within its derived bound of the float64 eigenvalues."""
    import copy

    import torch

    import vitscope.curvature.spectrum as spectrum
    from vitscope.curvature import HessianOperator, top_eigenvalues
    from vitscope.curvature.hvp import cross_entropy

    ops = []  # the CLI's float32 operators (model and batch)

    class Recorded(HessianOperator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ops.append(self)

    monkeypatch.setattr(spectrum, "HessianOperator", Recorded)
    common = ["hessian", "--model", "test_vit_cifar", "--data", "fake", "--k", "2", "--batches", "1",
              "--batch-size", "6", "--tol", "1e-7", "--max-iter", "300", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--start", "random", "--backend", "func", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "hessian.json").read_text()) for d in "ab")
    assert (a["config"]["start"], b["config"]["start"]) == ("gradient", "random")
    assert [(op.backend, op.cache_graph) for op in ops] == [("autograd", True), ("func", False)]
    (x, y), (xb, yb) = ops[0].batches[0], ops[1].batches[0]
    assert torch.equal(x, xb) and torch.equal(y, yb) and x.dtype == torch.float32
    # reference: the float64 copy of the model on the same batch, eigenpairs (lambda_i, v_i) to the residual rule
    # 1e-10 |lambda|. A float32 operator Op has an eigenvalue within r_i = ||Op v_i - lambda_i v_i|| of lambda_i
    # (the residual theorem, Parlett Thm 4.5.1: r_i holds the float32 rounding of the product at v_i and the
    # reference's residual; Op's own asymmetry is rounding of that size, first order), the i-th one as the gap
    # (~77 here) is far wider; the CLI's Ritz value is within the eigenvalue rule's tol |theta| of it (1 + 2 tol)
    model64 = copy.deepcopy(ops[0].model).double()
    ref = top_eigenvalues(model64, cross_entropy, (x.double(), y), k=2, tol=1e-10, max_iter=300, return_vectors=True)
    assert all(ref.converged)
    tol = 1e-7
    for op, got in zip(ops, (a, b)):
        theta = torch.tensor(got["groups"]["all"]["eigenvalues"][0], dtype=torch.float64)  # (k,)
        r = torch.stack([torch.linalg.vector_norm(op(v) - lam * v)
                         for lam, v in zip(ref.eigenvalues, ref.eigenvectors)])  # (k,)
        bound = (1 + 2 * tol) * tol * theta.abs() + r
        assert ((theta - ref.eigenvalues).abs() <= bound).all(), (op.backend, theta, ref.eigenvalues, bound)


def test_landscape_cli_writes_json_png_directions_and_reuses_them(tmp_path):
    out = tmp_path / "l"
    args = ["landscape", "--model", "test_vit_cifar", "--data", "fake", "--dims", "2", "--steps", "3",
            "--batches", "2", "--batch-size", "5", "--no-progress"]
    assert main(args + ["--out", str(out)]) == 0
    data = json.loads((out / "landscape.json").read_text())
    loss = np.array(data["loss"])
    assert loss.shape == (3, 3) and data["x"] == [-1.0, 0.0, 1.0] and data["n_examples"] == 10
    assert data["policy"]["normalization"] == "filter" and data["policy"]["ignore"] == "biasbn"
    assert (out / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    dirs = load_file(str(out / "directions.safetensors"))
    assert any(k.startswith("d1/") for k in dirs)
    again = tmp_path / "l2"
    assert main(args + ["--out", str(again), "--directions", str(out / "directions.safetensors")]) == 0
    np.testing.assert_array_equal(np.array(json.loads((again / "landscape.json").read_text())["loss"]), loss)


def test_cli_bad_input_one_line_error(tmp_path, capsys):
    rc = main(["landscape", "--model", "test_vit_cifar", "--data", "fake", "--steps", "0", "--out", str(tmp_path)])
    assert rc == 2 and "--steps" in capsys.readouterr().err
    rc = main(["hessian", "--model", "no_such_model", "--data", "fake", "--out", str(tmp_path)])
    assert rc == 2 and "no_such_model" in capsys.readouterr().err
    rc = main(["hessian", "--model", "test_vit_cifar", "--data", "fake", "--k", "0", "--out", str(tmp_path)])
    assert rc == 2 and "--k" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
