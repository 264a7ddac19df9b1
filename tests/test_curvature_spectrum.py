"""Curvature: HDVW's per-batch eigenvalue spectrum over a loader (l2 terms, soft targets, groups, errors,
backends, the memory budget and the hessian CLI) against dense Hessians."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitscope
from _hessian_refs import (
    assert_eigenvalues,
    dense_hessian,
    density_mass_bound,
    gamma,
    hvp_bound,
    power_bound,
    tiny_data,
    tiny_mlp,
    top_by_magnitude,
)
from vitscope.curvature import (
    HessianOperator,
    block_groups,
    eigenvalue_spectrum,
    top_eigenvalues,
)
from vitscope.curvature.spectrum import scott_bandwidth


# -------------------------------------------------------------------------- spectrum
def _loader(x, y, bs):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


def test_eigenvalue_spectrum_per_batch_and_l2_terms(mlp_case):
    m, _, _, _ = mlp_case
    x, y = tiny_data("mlp", 10, seed=7)
    loader = _loader(x, y, 4)  # batches of 4, 4, 2
    wd = 0.05
    r_sq = eigenvalue_spectrum(m, loader, k=2, weight_decay=wd, l2_style="half_sq", tol=1e-9, max_iter=160)
    r_hd = eigenvalue_spectrum(m, loader, k=2, weight_decay=wd, l2_style="hdvw", tol=1e-9, max_iter=160,
                               backend="cached")
    assert r_sq.batch_sizes == [4, 4, 2]
    for b, (xb, yb) in enumerate(loader):
        H_sq = dense_hessian(m, xb, yb) + wd * torch.eye(160, dtype=torch.float64)  # wd/2 ||p||^2 adds wd * I
        assert_eigenvalues(r_sq.eigenvalues["all"][b], top_by_magnitude(torch.linalg.eigvalsh(H_sq), 2), 1e-9, H_sq)
        H_hd = dense_hessian(m, xb, yb, extra=lambda ps: wd * sum(torch.linalg.vector_norm(p) for p in ps.values()))
        assert_eigenvalues(r_hd.eigenvalues["all"][b], top_by_magnitude(torch.linalg.eigvalsh(H_hd), 2), 1e-9, H_hd)
    vals = r_sq.eigenvalues["all"]
    assert vals.shape == (3, 2)
    assert r_sq.negative_fraction["all"] == float((vals < 0).mean())  # the same count / number: exact
    bw = scott_bandwidth(vals)  # the kernel density's bandwidth: each eigenvalue weighs 1 / n
    mass = np.trapezoid(r_sq.density["all"], r_sq.grid["all"])
    assert abs(mass - 1.0) <= density_mass_bound(r_sq.grid["all"], vals, np.full(vals.size, 1 / vals.size), bw)
    assert m.training  # mode restored


def test_eigenvalue_spectrum_stops_loading_at_max_batches(mlp_case):
    m, _, _, _ = mlp_case
    x, y = tiny_data("mlp", 12, seed=3)
    drawn = []

    def loader():  # a stream that records every batch taken from it
        for b in range(6):
            drawn.append(b)
            yield x[2 * b:2 * b + 2], y[2 * b:2 * b + 2]

    res = eigenvalue_spectrum(m, loader(), k=1, max_batches=2, tol=1e-6, max_iter=60)
    assert res.batch_sizes == [2, 2] and drawn == [0, 1]


@pytest.mark.parametrize("style", ["half_sq", "hdvw"])
def test_l2_term_hessian_closed_form(mlp_case, style):
    """The Hessian of NLL + L2 term, as the spectrum's operator applies it, column by column, equals the plain
    NLL Hessian (dense reference) plus the term's Hessian in closed form: wd * I for wd/2 * sum ||p||^2, and
    wd * (I / ||p|| - p p^T / ||p||^3) per tensor for HDVW's unsquared wd * sum ||p||."""
    from vitscope.curvature import l2_penalty

    m, x, y, H = mlp_case
    wd = 0.05
    op = HessianOperator(m, F.cross_entropy, (x, y), extra=lambda ps: l2_penalty(ps.values(), wd, style))
    eye = torch.eye(op.dim, dtype=torch.float64)
    H_op = torch.stack([op.matvec(eye[i]) for i in range(op.dim)], 1)  # (P, P): column i = H e_i
    if style == "half_sq":
        closed = wd * eye
    else:
        blocks = []
        for p in m.parameters():
            v = p.detach().reshape(-1).double()
            n = v.norm()
            blocks.append(wd * (torch.eye(len(v), dtype=torch.float64) / n - torch.outer(v, v) / n**3))
        closed = torch.block_diag(*blocks)
    H_total = H + closed
    # column i is the HVP of e_i: within 2 gamma_P || |H_total| e_i || (hvp_bound: the L2 term's Hessian product
    # sums no more terms than the NLL's)
    col_err = torch.linalg.vector_norm(H_op - H_total, dim=0)  # (P,)
    assert (col_err <= 2 * gamma(op.dim) * torch.linalg.vector_norm(H_total.abs(), dim=0)).all()
    if style == "half_sq":  # every eigenvalue shifted by wd exactly
        # Weyl: the spectra of eigvalsh's symmetric reading of H_op (its lower triangle: within sqrt(2) of the
        # Frobenius column bound above) and H + wd I differ by at most that; each eigvalsh is backward stable
        # (gamma_P ||.||_F each) and adding wd rounds once more
        frob = float(torch.linalg.matrix_norm(H_total))
        atol = (2 * math.sqrt(2) + 2) * gamma(op.dim) * frob + 2.0**-53 * (frob + wd)
        torch.testing.assert_close(torch.linalg.eigvalsh(H_op), torch.linalg.eigvalsh(H) + wd, rtol=0, atol=atol)


def test_run_hessian_records_the_l2_term(mlp_case):
    """The study's analysis states the L2 term it used, and its eigenvalues are those of NLL Hessian + wd * I."""
    from vitscope.studies.pipeline import run_hessian

    m, _, _, _ = mlp_case
    x, y = tiny_data("mlp", 8, seed=11)
    wd = 0.05
    out = run_hessian(m, _loader(x, y, 4), k=2, max_batches=2, max_iter=160, progress=False, weight_decay=wd,
                      tol=1e-9)
    assert out["loss"]["weight_decay"] == wd and out["loss"]["l2_style"] == "half_sq"
    assert out["loss"]["l2_term"] == "weight_decay / 2 * sum ||p||^2: Hessian + weight_decay * I"
    assert out["n_converged"] == out["n_eigenvalues"] == 4
    for b in range(2):
        xb, yb = x[4 * b: 4 * b + 4], y[4 * b: 4 * b + 4]
        H = dense_hessian(m, xb, yb) + wd * torch.eye(160, dtype=torch.float64)
        assert_eigenvalues(out["eigenvalues"][b], top_by_magnitude(torch.linalg.eigvalsh(H), 2), 1e-9, H)


def test_eigenvalue_spectrum_soft_target_transform(mlp_case):
    m, _, _, _ = mlp_case
    x, y = tiny_data("mlp", 6, seed=9)

    def mix(xb, yb):  # deterministic mixup: soft targets
        t = F.one_hot(yb, 4).double()
        return 0.7 * xb + 0.3 * xb.flip(0), 0.7 * t + 0.3 * t.flip(0)

    res = eigenvalue_spectrum(m, _loader(x, y, 6), k=2, transform=mix, tol=1e-9, max_iter=160)
    xm, tm = mix(x, y)
    H = dense_hessian(m, xm, tm, loss=lambda o, t: torch.sum(-t * F.log_softmax(o, -1), -1).mean())
    assert_eigenvalues(res.eigenvalues["all"][0], top_by_magnitude(torch.linalg.eigvalsh(H), 2), 1e-9, H)


def test_eigenvalue_spectrum_with_timm_mixup_runs():
    from timm.data import Mixup

    m = vitscope.create_model("test_vit_cifar", num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    res = eigenvalue_spectrum(m, _loader(x, y, 4), k=1, transform=Mixup(mixup_alpha=1.0, num_classes=10),
                              max_iter=10)
    assert res.eigenvalues["all"].shape == (2, 1) and np.isfinite(res.eigenvalues["all"]).all()
    assert res.config["transform"] == "Mixup"


def test_block_groups_match_dense_sub_blocks(vit_case):
    m, x, y, H = vit_case
    groups = block_groups(m)
    assert {"attention", "mlp", "norm"} <= set(groups)
    assert "blocks.0.attn.qkv.weight" in groups["attention"] and "blocks.0.norm1.weight" in groups["norm"]
    assert "blocks.0.mlp.fc1.weight" in groups["mlp"] and "patch_embed.proj.weight" in groups["conv"]
    res = eigenvalue_spectrum(m, _loader(x, y, 6), k=2, groups="block", tol=1e-9, max_iter=400, backend="cached")
    names = [n for n, _ in m.named_parameters()]
    offsets = np.cumsum([0] + [p.numel() for p in m.parameters()])
    for g in ("attention", "mlp"):
        idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in groups[g]])
        H_g = H[idx][:, idx]
        assert_eigenvalues(res.eigenvalues[g][0], top_by_magnitude(torch.linalg.eigvalsh(H_g), 2), 1e-9, H_g)


# ---------------------------------------------------------------------------- errors
def test_no_trainable_parameters_is_a_clear_error():
    m = tiny_mlp().requires_grad_(False)
    x, y = tiny_data("mlp", 4)
    with pytest.raises(ValueError, match="no trainable parameters"):
        top_eigenvalues(m, F.cross_entropy, (x, y))


def test_non_finite_loss_names_the_batch(mlp_case):
    m = mlp_case[0]
    x, y = tiny_data("mlp", 12)
    x[9, 0] = float("nan")  # in the third batch of 4
    for backend in ("func", "autograd"):
        with pytest.raises(ValueError, match="non-finite loss .* on batch 2"):
            eigenvalue_spectrum(m, _loader(x, y, 4), k=1, max_iter=5, backend=backend)


def test_empty_loader_is_a_clear_error(mlp_case):
    m = mlp_case[0]
    empty = _loader(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="no batches"):
        eigenvalue_spectrum(m, empty, k=1)
    with pytest.raises(ValueError, match="must yield \\(images, labels\\) pairs"):  # the loss needs labels
        eigenvalue_spectrum(m, [torch.zeros(4, 6, dtype=torch.float64)], k=1)
    with pytest.raises(ValueError, match="max_batches must be a positive integer or None, got 0"):
        eigenvalue_spectrum(m, _loader(torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 4),
                            k=1, max_batches=0)
    with pytest.raises(ValueError, match="empty"):
        top_eigenvalues(m, F.cross_entropy, [])


class _Cube(torch.autograd.Function):
    """x^3 with a differentiable backward but no forward-mode rule: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class _CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc1, self.fc2 = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()

    def forward(self, x):
        return self.fc2(_Cube.apply(self.fc1(x)))


def test_func_backend_falls_back_to_double_backward():
    m = _CubeNet()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    H = dense_hessian(m, x, y)
    op = HessianOperator(m, F.cross_entropy, (x, y), backend="func")
    v = torch.randn(op.dim, dtype=torch.float64)
    assert float(torch.linalg.vector_norm(op(v) - H @ v)) <= hvp_bound(H, v)  # backward sums: 7 x 6 < P = 57
    assert op.backend == "autograd"


# ------------------------------------------------------------------------------ memory budget
def test_memory_budget_switches_lanczos_to_power_iteration(mlp_case, caplog):
    from vitscope.curvature.eigen import solver_memory

    m, x, y, H = mlp_case  # 160 parameters, float64 work vectors
    lanczos_need = solver_memory("lanczos", 160, 2, 100)
    power_need = solver_memory("power", 160, 2, 100)
    assert lanczos_need == (104 + 3) * 160 * 8 and power_need == (2 + 3) * 160 * 8  # blocks of 8 basis rows
    with caplog.at_level("WARNING"):
        res = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, tol=1e-10, max_iter=600, memory_budget=power_need)
    assert res.method == "power" and len(res.notes) == 1 and "switched to power iteration" in res.notes[0]
    assert "fewer than 18 fit" in res.notes[0]  # k + 16 vectors: below that, Lanczos is not worth capping
    assert "fit in the memory budget" in caplog.text
    ev = torch.linalg.eigvalsh(H)
    assert ((res.eigenvalues - top_by_magnitude(ev, 2)).abs() <= power_bound(ev, 2, 1e-10)).all()
    kept = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, max_iter=100, memory_budget=lanczos_need)
    assert kept.method == "lanczos" and kept.notes == []
    capped = top_eigenvalues(m, F.cross_entropy, (x, y), k=2, tol=1e-9, max_iter=100,
                             memory_budget=solver_memory("lanczos", 160, 2, 40))  # room for 40 basis vectors
    assert capped.method == "lanczos" and "capped at 40 vectors" in capped.notes[0] and capped.n_hvp <= 40
    assert all(capped.converged)
    assert_eigenvalues(capped.eigenvalues, top_by_magnitude(ev, 2), 1e-9, H)
    with pytest.raises(MemoryError, match="over the memory budget of 6.2 KiB"):
        top_eigenvalues(m, F.cross_entropy, (x, y), k=2, memory_budget=power_need - 1)
    loader = _loader(x, y, 5)
    spec = eigenvalue_spectrum(m, loader, k=1, max_iter=50, memory_budget="5KiB")  # power needs (1+3)*160*8 = 5 KiB
    assert "switched to power iteration" in spec.config["notes"][0]
    assert spec.config["method"] == "lanczos"  # what was asked; the note says what ran


def test_parse_memory():
    from vitscope.curvature.eigen import parse_memory

    assert parse_memory("8GB") == 8 * 10 ** 9 and parse_memory("512MiB") == 512 * 2 ** 20
    assert parse_memory("1.5g") == 1_500_000_000 and parse_memory(4096) == 4096 and parse_memory("1e6") == 10 ** 6
    for bad in ("lots", "-1GB", "0", "8 GBs"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_memory(bad)


def test_k_above_parameter_count_is_refused(mlp_case):
    m, x, y, _ = mlp_case
    with pytest.raises(ValueError, match="k=161 exceeds the number of parameters \\(160\\)"):
        top_eigenvalues(m, F.cross_entropy, (x, y), k=161)
    with pytest.raises(ValueError, match="k=161 exceeds the 160 parameters of group 'all'"):
        eigenvalue_spectrum(m, _loader(x, y, 5), k=161)  # before any batch is drawn


def test_hessian_cli_memory_budget(tmp_path, capsys):
    """``vitscope hessian --memory-budget``: a budget that fits power iteration only switches (noted in
    hessian.json); one that fits nothing is a one-line error (exit 2) and writes nothing; a bad size too."""
    import json

    from vitscope.cli import main
    from vitscope.curvature.eigen import solver_memory

    torch.manual_seed(0)
    dim = sum(p.numel() for p in vitscope.create_model("test_vit_cifar", num_classes=10).parameters())
    common = ["hessian", "--model", "test_vit_cifar", "--data", "fake", "--k", "1", "--batches", "1",
              "--batch-size", "4", "--max-iter", "20", "--no-progress"]
    power = solver_memory("power", dim, 1, 20)
    assert main(common + ["--memory-budget", str(power), "--out", str(tmp_path / "ok")]) == 0
    data = json.loads((tmp_path / "ok" / "hessian.json").read_text())
    assert "switched to power iteration" in data["config"]["notes"][0]
    capsys.readouterr()
    assert main(common + ["--memory-budget", str(power - 1), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over the memory budget" in err[0] and not (tmp_path / "no").exists()
    with pytest.raises(SystemExit):
        main(common + ["--memory-budget", "lots", "--out", str(tmp_path / "bad")])
    assert "is not a size like 8GB" in capsys.readouterr().err
