"""GPSA gates/centres against timm's GPSA (local init and the positional attention it produces), and
attention rollout against a numpy loop reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm.models.convit as tc
import torch

import vitscope
from vitscope.measures import attention_rollout, gpsa_attention_centres, gpsa_gates

U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64


def test_gates_and_centres_of_local_init():
    model = vitscope.create_model("test_convit_32", locality_strength=2.0)
    gates, centres = gpsa_gates(model), gpsa_attention_centres(model)
    assert len(gates) == len(centres) == 2  # 2 GPSA blocks, 1 MHSA block
    # float32 sigmoid of an exact parameter: exp (1 ulp, 2 u), the sum and the division (u each), against the
    # float64 value rounded to float32 (u): 5 u32 relative
    for g in gates:
        torch.testing.assert_close(g, torch.full((4,), 1 / (1 + math.exp(-1.0))), rtol=5 * U32, atol=0)  # init 1
    k, ctr = 2, 0.5  # 4 heads: a 2 x 2 kernel of centres
    for c in centres:
        assert bool(c.peaked.all())
        # local_init's weights are +-4 and -2 (small multiples of powers of 2): -w2 and -w / (2 w2) are exact
        torch.testing.assert_close(c.locality, torch.full((4,), 2.0, dtype=torch.float64), rtol=0, atol=0)
        for h1 in range(k):
            for h2 in range(k):
                expected = torch.tensor([h2 - ctr, h1 - ctr], dtype=torch.float64)  # (dx, dy)
                torch.testing.assert_close(c.centre[h1 + k * h2], expected, rtol=0, atol=0)
    model.blocks[1].attn.gating_param.data = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    # two float32 evaluations of the sigmoid (torch.sigmoid vs 1 / (1 + exp(-x))), each within 4 u32
    torch.testing.assert_close(gpsa_gates(model)[1], 1 / (1 + torch.exp(-torch.tensor([-2.0, 0.0, 0.5, 3.0]))),
                               rtol=8 * U32, atol=0)


def test_centres_match_where_positional_attention_peaks():
    torch.manual_seed(0)
    gpsa = tc.GPSA(dim=18, num_heads=9)
    gpsa.local_init()  # k = 3: integer centres in {-1, 0, 1}^2
    w = gpsa.pos_proj.weight.data
    w[4:, :2] = torch.rand(5, 2) * 8 - 4  # random centres for heads 4..8
    w[4:, 2] = -(torch.rand(5) * 1.5 + 0.5)
    model = torch.nn.Sequential(gpsa)
    (res,) = gpsa_attention_centres(model)
    side = 11
    rel = gpsa.get_rel_indices(side * side)  # timm's own [dx, dy, d^2] convention
    with torch.no_grad():
        pos = gpsa.pos_proj(rel)[0].softmax(1)  # (N, N, H): key axis softmax per query
    q_row = q_col = side // 2
    q = q_row * side + q_col
    for h in range(9):
        j = int(pos[q, :, h].argmax())
        peak = torch.tensor([j % side - q_col, j // side - q_row], dtype=torch.float64)  # (dx, dy)
        # nearest grid point to the centre: whole numbers on both sides
        torch.testing.assert_close(peak, res.centre[h].round(), rtol=0, atol=0)


def test_no_gpsa_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPSA"):
        gpsa_gates(vitscope.create_model("test_vit_cifar"))


# ------------------------------------------------------------------------------------------- rollout
def rollout_rtol(L, H, N) -> float:
    """Every quantity in a rollout is >= 0, so relative errors add: per layer the head mean (H u) and the residual
    (u) give theta, a row's normalisation 2 theta + N u (its sum of N terms, the division), the product with the
    previous rollout gamma_N (the first, with I, exact): L (2 H + 2 + 2 N) u a side."""
    return L * (2 * H + 2 + 2 * N) * U64


def rand_attn(B, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, N, generator=g) * 2).softmax(-1)


def ref_rollout(attns, fusion, discard, residual):
    attns = [np.asarray(a, dtype=np.float64) for a in attns]
    B, _, N, _ = attns[0].shape
    out = np.zeros((B, N, N))
    for b in range(B):
        R = np.eye(N)
        for a in attns:
            f = {"mean": a[b].mean(0), "max": a[b].max(0), "min": a[b].min(0)}[fusion].copy()
            k = int(N * N * discard)
            if k:
                order = np.argsort(f, axis=None)[:k]
                f.flat[order] = 0.0
            if residual:
                f = f + np.eye(N)
            for i in range(N):
                f[i] = f[i] / f[i].sum()
            R = f @ R
        out[b] = R
    return out


@pytest.mark.parametrize("fusion,discard,residual", [
    ("mean", 0.0, True), ("max", 0.0, True), ("min", 0.3, True), ("mean", 0.5, False), ("max", 0.0, False)])
def test_rollout_matches_numpy(fusion, discard, residual):
    attns = [rand_attn(3, 4, 6, s) for s in range(3)]
    out = attention_rollout(attns, fusion, discard, residual)
    # both sides discard the same entries (exact zeros; no ties among the random maps' values) and are within
    # rollout_rtol of the exact rollout (max / min fusion exact, under the mean's bound)
    ref = ref_rollout(attns, fusion, discard, residual)
    np.testing.assert_allclose(out.numpy(), ref, rtol=2 * rollout_rtol(3, 4, 6), atol=0)
    # the exact rollout's rows sum to 1 (products of row-stochastic matrices); the computed ones within rollout_rtol
    # plus their own sum of N terms
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 6, dtype=torch.float64), rtol=0,
                               atol=rollout_rtol(3, 4, 6) + 6 * U64)


def test_rollout_closed_forms_and_order():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    # (3 I) / 3 + I = 2 I, halved, times I: exact
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(5, dtype=torch.float64).expand(2, 5, 5),
                               rtol=0, atol=0)
    a1, a2 = rand_attn(1, 1, 5, 1), rand_attn(1, 1, 5, 2)
    r12 = attention_rollout([a1, a2])
    m1 = 0.5 * a1[0, 0].double() + 0.5 * torch.eye(5, dtype=torch.float64)
    m2 = 0.5 * a2[0, 0].double() + 0.5 * torch.eye(5, dtype=torch.float64)
    # the rollout divides by the rows' actual sums 1 + sum(a), the reference by 2: float32 softmax rows sum to 1 only
    # within their rounding, max |s - 2| / s per layer; plus rollout_rtol and the reference's own 3 u per entry and
    # gamma_5 product (terms >= 0)
    dev = sum(float(((a[0, 0].double().sum(-1) - 1).abs() / (1 + a[0, 0].double().sum(-1))).max()) for a in (a1, a2))
    rtol = dev + rollout_rtol(2, 1, 5) + (2 * 3 + 5) * U64
    torch.testing.assert_close(r12[0], m2 @ m1, rtol=rtol, atol=0)  # later layer on the left
    # the other order is another product, further from this one than either's error
    assert (r12 - attention_rollout([a2, a1])).abs().max() > 2 * rtol


def test_rollout_bad_inputs():
    a = rand_attn(2, 3, 5, 0)
    with pytest.raises(ValueError, match="same tokens"):
        attention_rollout([a, rand_attn(2, 3, 6, 1)])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([a], head_fusion="sum")
    with pytest.raises(ValueError, match="list"):
        attention_rollout(a)
    with pytest.raises(ValueError, match="sum"):
        attention_rollout([a * 3])
