"""Attention measures against plain-numpy loop references, closed forms and timm's ConViT code."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _helpers import attention_sum_rtol
from vitscope.measures import (
    AttentionDistance,
    AttentionEntropy,
    Nonlocality,
    RelativeDistance,
    attention_distance,
    attention_entropy,
    class_token_mass,
    nonlocality,
    relative_distance,
)


def random_attention(B, H, N, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, N, N, generator=g) * sharp
    logits[0, 0, 0] = -1e4  # one row with (numerically) exact zeros
    logits[0, 0, 0, 0] = 0.0
    return logits.softmax(-1).double()


def ref_entropy(a):
    a = np.asarray(a)
    B, H, N, _ = a.shape
    out = np.zeros(H)
    for h in range(H):
        tot = 0.0
        for b in range(B):
            for i in range(N):
                tot -= sum(p * math.log(p) for p in a[b, h, i] if p > 0)
        out[h] = tot / (B * N)
    return out


def pos(k, w):
    return divmod(k, w)  # (row, col)


def ref_distance(a, hw, ps, p, renorm):
    a = np.asarray(a)
    h, w = hw
    B, H, N, _ = a.shape
    S = h * w
    out = np.zeros(H)
    for hd in range(H):
        tot = 0.0
        for b in range(B):
            for i in range(S):
                row = a[b, hd, p + i, p:].copy()
                if renorm:
                    row = row / row.sum()
                ri, ci = pos(i, w)
                for j in range(S):
                    rj, cj = pos(j, w)
                    tot += row[j] * math.hypot(ri - rj, ci - cj) * ps
        out[hd] = tot / (B * S)
    return out


def ref_nonlocality(a, hw, p):
    a = np.asarray(a)
    h, w = hw
    abar = a.mean(0)[:, p:, p:]
    H, S, _ = abar.shape
    out = np.zeros(H)
    for hd in range(H):
        for i in range(S):
            for j in range(S):
                ri, ci = pos(i, w)
                rj, cj = pos(j, w)
                out[hd] += abar[hd, i, j] * math.hypot(ri - rj, ci - cj)
        out[hd] /= S
    return out


def ref_relative(a, hw, p, renorm):
    a = np.asarray(a)
    h, w = hw
    B, H, N, _ = a.shape
    S = h * w
    out = np.zeros(H)
    for hd in range(H):
        tot = 0.0
        for b in range(B):
            for i in range(S):
                row = a[b, hd, p + i, p:].copy()
                row[i] = 0.0
                if renorm and row.sum() > 0:  # a row with nothing left contributes 0 (documented)
                    row = row / row.sum()
                ri, ci = pos(i, w)
                for j in range(S):
                    rj, cj = pos(j, w)
                    tot += row[j] * math.hypot((ri - rj) / (h - 1), (ci - cj) / (w - 1))
        out[hd] = tot / (B * S)
    return out


def ref_prefix_mass(a, p):
    a = np.asarray(a)
    B, H, N, _ = a.shape
    return np.array([sum(a[b, hd, i, :p].sum() for b in range(B) for i in range(p, N)) / (B * (N - p))
                     for hd in range(H)])


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("hw,p", [((4, 4), 1), ((3, 5), 0), ((2, 3), 2)])
def test_functions_match_numpy(hw, p):
    N = hw[0] * hw[1] + p
    a = random_attention(4, 3, N, seed=N)
    np.testing.assert_allclose(attention_entropy(a).numpy(), ref_entropy(a), rtol=attention_sum_rtol(a))
    for renorm in (False, True):
        np.testing.assert_allclose(
            attention_distance(a, hw, 8, p, renormalize=renorm).numpy(), ref_distance(a, hw, 8, p, renorm),
            rtol=attention_sum_rtol(a))
        np.testing.assert_allclose(
            relative_distance(a, hw, p, renormalize=renorm).numpy(), ref_relative(a, hw, p, renorm),
            rtol=attention_sum_rtol(a))
    np.testing.assert_allclose(nonlocality(a, hw, p).numpy(), ref_nonlocality(a, hw, p), rtol=attention_sum_rtol(a))


def test_float32_input_close_to_float64():
    """Float32 maps: rounding A to float32 (u = 2^-24 relative) moves the entropy by <= u sum A |ln A + 1| <= u (H + 1);
    the float32 row sums of N terms A ln A >= 0 (each within 3u: log, product) add (N + 2) u H. The distance sums A
    over the batch in float32 (B - 1 roundings) after the input rounding, then in float64: (B + 1) u relative."""
    B, N, u = 2, 17, 2.0**-24
    a = random_attention(B, 3, N)
    ent = attention_entropy(a)
    assert ((attention_entropy(a.float()) - ent).abs() <= (N + 2) * u * ent + u * (ent + 1)).all()
    dist = attention_distance(a, 4, 4)
    assert ((attention_distance(a.float(), 4, 4) - dist).abs() <= (B + 1) * u * dist).all()


def test_closed_forms():
    N, B, u = 17, 2, 2.0**-53
    uniform = torch.full((B, 3, N, N), 1.0 / N, dtype=torch.float64)
    # float64: 1/N rounded moves H by <= u (H + 1) (test_float32_input_close_to_float64's argument), each row's N
    # terms A ln A (3 u each) and their sum (N + 2) u H, the mean over B N rows B N u H, the reference's log u H
    H = math.log(N)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((3,), H, dtype=torch.float64), rtol=0,
                               atol=(N + 2 + B * N + 1) * u * H + u * (H + 1))
    # one-hot rows: 1 ln 1 = 0 ln 0 = 0 and every weight off the query sits at distance 0 or is 0: exact zeros
    eye = torch.eye(N).expand(2, 3, N, N)
    zeros = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(attention_entropy(eye), zeros, rtol=0, atol=0)
    torch.testing.assert_close(attention_distance(eye, (4, 4), 16), zeros, rtol=0, atol=0)
    torch.testing.assert_close(nonlocality(eye[..., 1:, 1:], 4), zeros, rtol=0, atol=0)
    # identity attention: nothing left after removing self -> 0 interaction
    torch.testing.assert_close(relative_distance(eye, 4), zeros, rtol=0, atol=0)
    # a 1 x 2 grid where each token attends only to the other: distance 1 patch = patch_size pixels
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(1, 1, 2, 2)
    assert float(attention_distance(swap, (1, 2), 16, num_prefix_tokens=0)) == 16.0
    assert float(relative_distance(swap, (1, 2), num_prefix_tokens=0)) == 1.0
    # corner-to-corner attention on a 3x3 grid reaches the largest normalized distance sqrt(2)
    a = torch.zeros(1, 1, 9, 9)
    a[0, 0, 0, 8] = a[0, 0, 8, 0] = 1.0
    a[0, 0, [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]] = 1.0
    # cdist's sqrt(1 + 1) within u, two equal terms added exactly, the division by 9 u; the reference's 2 u
    assert float(relative_distance(a, 3, 0, renormalize=False)) == pytest.approx(2 * math.sqrt(2) / 9,
                                                                                 rel=4 * 2.0**-53, abs=0)


def test_nonlocality_matches_timm_gpsa():
    import timm.models.convit as tc

    torch.manual_seed(0)
    gpsa = tc.GPSA(dim=16, num_heads=4, locality_strength=1.0)
    gpsa.local_init()
    gpsa.double()  # timm's code in float64, so the check is of the formula, not of float32 sums (tested above)
    B, S = 5, 36
    x = torch.randn(B, S, 16, dtype=torch.float64)
    gpsa.rel_indices = gpsa.get_rel_indices(S)  # (1, S, S, 3) in the module's float64: exact integer offsets
    with torch.no_grad():
        ref = gpsa.get_attention_map(x)  # timm's (official) ConViT nonlocality, batch-averaged map
        attn = gpsa.get_attention(x)  # the same maps (the same call inside get_attention_map)
    # terms >= 0 on both sides: timm's batch mean (B u), sqrt (u), products (u), einsum over S^2 (S^2 - 1) u,
    # / S (u); ours the batch sum, cdist, products, the sum over S^2, / S, / B: 2 (S^2 + B + 3) u relative
    torch.testing.assert_close(nonlocality(attn, (6, 6)), ref, rtol=2 * (S * S + B + 3) * 2.0**-53, atol=0)


def split(x, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(x[start:start + s])
        start += s
    return out


def test_streaming_unequal_batches_lists_and_layout():
    a1 = random_attention(9, 3, 17, seed=1)  # layer 0: 4x4 grid + class token
    a2 = random_attention(9, 2, 9, seed=2)  # layer 1: 3x3 grid, no prefix, 2 heads
    layout = [SimpleNamespace(grid=(4, 4), num_prefix_tokens=1, patch_size=8),
              SimpleNamespace(grid=(3, 3), num_prefix_tokens=0, patch_size=4)]
    # issue 20: the default is the literature's (not renormalized); renormalization is the option
    measures = [AttentionEntropy(), AttentionDistance(), Nonlocality(), RelativeDistance(),
                AttentionDistance(renormalize=True)]
    for b1, b2 in zip(split(a1, [1, 5, 3]), split(a2, [1, 5, 3])):
        for m in measures:
            m.update([b1, b2], layout=layout)
    ent, dist, nl, rel, dist_r = (m.compute() for m in measures)
    for layer, (a, hw, p, ps) in enumerate([(a1, (4, 4), 1, 8), (a2, (3, 3), 0, 4)]):
        tol = attention_sum_rtol(a)
        np.testing.assert_allclose(ent[layer].numpy(), ref_entropy(a), rtol=tol)
        np.testing.assert_allclose(dist[layer].numpy(), ref_distance(a, hw, ps, p, False), rtol=tol)
        np.testing.assert_allclose(dist_r[layer].numpy(), ref_distance(a, hw, ps, p, True), rtol=tol)
        np.testing.assert_allclose(nl[layer].numpy(), ref_nonlocality(a, hw, p), rtol=tol)
        np.testing.assert_allclose(rel[layer].numpy(), ref_relative(a, hw, p, True), rtol=tol)
        np.testing.assert_allclose(measures[1].class_token_mass()[layer].numpy(), ref_prefix_mass(a, p), rtol=tol)


def test_streaming_merge_state_dict_and_sync_single_rank(tmp_path):
    import torch.distributed as dist

    a = random_attention(7, 3, 17, seed=3)
    whole = AttentionDistance(grid=4, patch_size=16)
    whole.update(a)
    left, right = AttentionDistance(grid=4, patch_size=16), AttentionDistance(grid=4, patch_size=16)
    left.update(a[:2])
    right.update(a[2:])
    merged = AttentionDistance(grid=4, patch_size=16).merge(left).merge(right.state_dict())
    # the same float64 terms summed in another order (2 + 5 vs 7 maps): inside attention_sum_rtol
    torch.testing.assert_close(merged.compute(), whole.compute(), rtol=attention_sum_rtol(a), atol=0)
    torch.testing.assert_close(merged.compute(), attention_distance(a, 4, 16), rtol=attention_sum_rtol(a), atol=0)
    with pytest.raises(ValueError, match="same arguments"):
        merged.merge(AttentionDistance(grid=4, patch_size=8))
    merged.reset()
    with pytest.raises(ValueError, match="before any update"):
        merged.compute()
    assert left.sync() is left  # not initialized: no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        left.sync()  # one rank: the all-reduce returns its own sums; the function runs the same update and mean
        torch.testing.assert_close(left.compute(), attention_distance(a[:2], 4, 16), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="twice"):
            left.sync()
    finally:
        dist.destroy_process_group()


def test_bad_inputs():
    a = random_attention(2, 3, 17)
    with pytest.raises(ValueError, match="4-D"):
        attention_entropy(a[0])
    with pytest.raises(ValueError, match="sum"):
        attention_entropy(a * 2)
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        attention_entropy(bad)
    with pytest.raises(ValueError, match="grid"):
        attention_distance(a, (3, 3), 16)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        nonlocality(a, 4)  # 17 tokens, default no prefix
    with pytest.raises(ValueError, match="patch_size"):
        attention_distance(a, 4, None)
    with pytest.raises(ValueError, match="grid"):
        AttentionDistance(patch_size=16).update(a)
    m = AttentionEntropy()
    m.update([a, a])
    with pytest.raises(ValueError, match="same layers"):
        m.update(a)
    with pytest.raises(ValueError, match="layout"):
        RelativeDistance().update([a, a], layout=[SimpleNamespace(grid=(4, 4), num_prefix_tokens=1)])


def test_validate_false_same_values_shapes_still_checked():
    """``update(..., validate=False)`` (vitscope.probe checks each map once for all four measures) skips the
    row and NaN scans only."""
    a = random_attention(5, 3, 17, seed=4)
    layout = [SimpleNamespace(grid=(4, 4), num_prefix_tokens=1, patch_size=8)]
    for cls in (AttentionEntropy, AttentionDistance, Nonlocality, RelativeDistance):
        checked, trusted = cls(), cls()
        checked.update([a], layout)
        trusted.update([a], layout, validate=False)
        torch.testing.assert_close(trusted.compute(), checked.compute(), rtol=0, atol=0)
        with pytest.raises(ValueError, match="sum"):
            cls().update([a * 2], layout)
        cls().update([a * 2], layout, validate=False)  # the caller vouched for the values
        with pytest.raises(ValueError, match="4-D"):
            cls().update([a[0]], layout, validate=False)


def test_distance_default_is_the_literatures_and_class_token_mass_beside_it():
    """Issue 20: class-token rows and columns dropped WITHOUT renormalizing (probing-vits' / Kornblith's code, the
    ViT paper's Fig. 7); with a mass c on the class token in every row the distance is (1 - c) times the
    renormalized one (36% -> the renormalized number is 1 / 0.64 = 1.56 times it)."""
    a = random_attention(3, 2, 17, seed=7)
    torch.testing.assert_close(attention_distance(a, 4, 16), attention_distance(a, 4, 16, renormalize=False), rtol=0,
                               atol=0)  # the default: the same call
    np.testing.assert_allclose(class_token_mass(a).numpy(), ref_prefix_mass(a, 1), rtol=attention_sum_rtol(a))
    np.testing.assert_allclose(class_token_mass(a, 2).numpy(), ref_prefix_mass(a, 2), rtol=attention_sum_rtol(a))
    spatial = random_attention(3, 2, 16, seed=8)  # (B, H, 16, 16) rows summing to 1
    c = 0.36
    mixed = torch.zeros(3, 2, 17, 17, dtype=torch.float64)
    mixed[..., 1:, 0] = c
    mixed[..., 1:, 1:] = (1 - c) * spatial
    mixed[..., 0, :] = 1.0 / 17
    tol = attention_sum_rtol(mixed)  # means of terms >= 0 (the mass c, A d), either side
    torch.testing.assert_close(class_token_mass(mixed), torch.full((2,), c, dtype=torch.float64), rtol=tol, atol=0)
    # (1 - c) A rounds each entry u; the reference's product with (1 - c) u
    torch.testing.assert_close(attention_distance(mixed, 4, 16), (1 - c) * attention_distance(spatial, 4, 16, 0),
                               rtol=tol + 2 * 2.0**-53, atol=0)
    # renormalised rows are A / sum(A): spatial's float32 softmax rows sum to 1 only within their own rounding, so
    # the two differ by up to max |1 / s - 1| (s the rows' float64 sums, within N u of exact) and the division's u
    s = spatial.sum(-1)  # (B, H, 16)
    dev = float((1 / s - 1).abs().max()) + 16 * 2.0**-53
    torch.testing.assert_close(attention_distance(mixed, 4, 16, renormalize=True),
                               attention_distance(spatial, 4, 16, 0), rtol=tol + dev + 2 * 2.0**-53, atol=0)
