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


def test_gates_and_centres_of_local_init():
    model = vitscope.create_model("test_convit_32", locality_strength=2.0)
    gates, centres = gpsa_gates(model), gpsa_attention_centres(model)
    assert len(gates) == len(centres) == 2  # 2 GPSA blocks, 1 MHSA block
    for g in gates:
        torch.testing.assert_close(g, torch.full((4,), 1 / (1 + math.exp(-1.0))))  # gating_param init 1
    k, ctr = 2, 0.5  # 4 heads: a 2 x 2 kernel of centres
    for c in centres:
        assert bool(c.peaked.all())
        torch.testing.assert_close(c.locality, torch.full((4,), 2.0, dtype=torch.float64))
        for h1 in range(k):
            for h2 in range(k):
                expected = torch.tensor([h2 - ctr, h1 - ctr], dtype=torch.float64)  # (dx, dy)
                torch.testing.assert_close(c.centre[h1 + k * h2], expected)
    model.blocks[1].attn.gating_param.data = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    torch.testing.assert_close(gpsa_gates(model)[1], 1 / (1 + torch.exp(-torch.tensor([-2.0, 0.0, 0.5, 3.0]))))


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
        torch.testing.assert_close(peak, res.centre[h].round())  # nearest grid point to the centre


def test_no_gpsa_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPSA"):
        gpsa_gates(vitscope.create_model("test_vit_cifar"))


# ------------------------------------------------------------------------------------------- rollout
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
    np.testing.assert_allclose(out.numpy(), ref_rollout(attns, fusion, discard, residual), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 6, dtype=torch.float64))


def test_rollout_closed_forms_and_order():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    a1, a2 = rand_attn(1, 1, 5, 1), rand_attn(1, 1, 5, 2)
    r12 = attention_rollout([a1, a2])
    m1 = 0.5 * a1[0, 0].double() + 0.5 * torch.eye(5, dtype=torch.float64)
    m2 = 0.5 * a2[0, 0].double() + 0.5 * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(r12[0], m2 @ m1)  # later layer on the left
    assert not torch.allclose(r12, attention_rollout([a2, a1]))


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
