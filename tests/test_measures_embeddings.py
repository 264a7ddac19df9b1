"""ViT Fig. 7 embeddings: patch-embedding PCA and position-embedding similarity against numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import vitscope
from vitscope.measures import patch_embedding_components, position_embedding_grid, position_embedding_similarity


def _randomize(model, seed=0):
    """Give the embeddings distinct random values (timm zero-inits some of them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=g))
        w = model.patch_embed.proj.weight
        w.copy_(torch.randn(w.shape, generator=g) + 0.3)  # a non-zero mean filter, removed by the centring
    return model


def _np_cosine(p):
    """Cosine similarity as a centred-free np.corrcoef: normalise rows by their own norms, with numpy."""
    p = np.asarray(p, dtype=np.float64)
    u = p / np.sqrt((p * p).sum(1, keepdims=True))
    return np.einsum("id,jd->ij", u, u)


MODELS = [
    ("test_vit_cb", {}, 1),  # class token with a pos embedding: first entry dropped
    ("test_convit_32", {}, 0),  # ConViT: pos_embed covers patches only; the class token joins later
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                  no_embed_class=True, reg_tokens=2), 0),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, reg_tokens=2), 3),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, class_token=False,
                                  global_pool="avg"), 0),
    ("vit_tiny_patch16_224", dict(img_size=(32, 48), patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                  dynamic_img_size=True), 1),
]


def _make(name, kwargs):
    torch.manual_seed(0)
    return vitscope.create_model(name) if name.startswith("test_") else timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name,kwargs,prefix", MODELS)
def test_position_similarity_matches_numpy(name, kwargs, prefix):
    model = _randomize(_make(name, kwargs))
    h, w = position_embedding_grid(model)
    pos = model.pos_embed.detach()[0].numpy()
    assert pos.shape[0] == h * w + prefix  # the layout the test expects, independent of the code under test
    ref = _np_cosine(pos[prefix:])
    sim = position_embedding_similarity(model)
    assert sim.shape == (h * w, h * w) and sim.dtype == torch.float64
    # float64 cosines of D-dim vectors: x.y within gamma_D |x||y| <= gamma_D ||x|| ||y||, each norm within
    # (D/2 + 1) u, the division u: each side within (2D + 4) u of the exact cosine, the two within twice that
    atol = 2 * (2 * pos.shape[1] + 4) * 2.0**-53
    np.testing.assert_allclose(sim.numpy(), ref, rtol=0, atol=atol)
    np.testing.assert_allclose(np.diag(sim.numpy()), 1.0, rtol=0, atol=atol)
    if kwargs.get("img_size") == (32, 48):
        assert (h, w) == (4, 6)


def test_position_similarity_row_major_grid():
    """Embeddings that are a function of (row, col) give maps peaked at their own cell, read row-major."""
    model = _make("test_convit_32", {})
    h, w = position_embedding_grid(model)
    D = model.pos_embed.shape[-1]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    centres = np.linspace(0, max(h, w), D)
    feats = np.exp(-(rows.reshape(-1, 1) - centres) ** 2) + np.exp(-(cols.reshape(-1, 1) - centres[::-1]) ** 2)
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(feats).float()[None])
    sim = position_embedding_similarity(model).numpy()
    i = 2 * w + 5  # row 2, col 5
    assert np.unravel_index(sim[i].argmax(), (h, w)) == (2, 5)


@pytest.mark.parametrize("name,kwargs", [(m[0], m[1]) for m in MODELS[:3]])
def test_patch_components_match_numpy_svd(name, kwargs):
    model = _randomize(_make(name, kwargs), seed=1)
    W = model.patch_embed.proj.weight.detach().double().numpy()  # (D, C, P, P)
    D, C, P, _ = W.shape
    X = W.reshape(D, -1)
    Xc = X - X.mean(0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    k = min(28, D - 1, vt.shape[0])  # the centred filters have rank <= D - 1
    out = patch_embedding_components(model)
    assert out.components.shape == (k, C, P, P)
    comps = out.components.reshape(k, -1).numpy()
    # Bounds from LAPACK's backward-stable SVD (Demmel, Applied NLA 3.4/5.4): each route's U S V^T is exact for
    # Xc + E with ||E||_2 <= p u s_0, p = max(D, CPP) taken for LAPACK's "modest function of m, n"; so each
    # singular value is within p u s_0 of the true one (Weyl), each right vector within p u s_0 / gap_i of it
    # (Wedin: gap_i to the neighbouring singular values), and V's rows orthonormal within p u.
    u = 2.0**-53
    n = X.shape[1]
    pu = max(D, n) * u * s[0]
    np.testing.assert_allclose(comps @ comps.T, np.eye(k), rtol=0, atol=(max(D, n) + n) * u)  # + gamma_n of the dots
    signs = np.sign((comps * vt[:k]).sum(1))  # SVD signs are arbitrary: align, then compare
    gap = np.minimum(np.r_[np.inf, s[:-1] - s[1:]][:k], (s[:k] - s[1:k + 1]))  # to the neighbours
    assert (np.abs(comps - vt[:k] * signs[:, None]) <= (2 * pu / gap)[:, None] + 2 * n * u).all()
    # ratio s_i^2 / sum s_j^2: each s_j moves <= pu on either route (2 pu between them), then the squares, the
    # sum of n terms and the quotient round: relative 2 (2 pu / s_i) + 2 (2 pu sum s_j / sum s_j^2) + (n + 3) u
    ratio = (s**2 / (s**2).sum())[:k]
    rel = 4 * pu / s[:k] + 4 * pu * s.sum() / (s**2).sum() + 2 * (len(s) + 3) * u
    assert (np.abs(out.explained_variance_ratio.numpy() - ratio) <= rel * ratio).all()
    assert (np.diff(out.explained_variance_ratio.numpy()) <= 0).all()  # ordered by variance (s_i sorted, exact)
    # mean filter: D terms of either sign summed in another order by each side, then / D: 2 gamma_(D+1) mean|x|
    assert (np.abs(out.mean.numpy().ravel() - X.mean(0)) <= 2 * (D + 1) * u * np.abs(X).mean(0)).all()
    # the ratio equals the variance of the filters' projections, an independent numpy route: numpy's v_i is an
    # exact singular vector of Xc + E, so ||Xc v_i|| is within 2 pu of s_i (||E v_i|| and Weyl) whatever the gap;
    # the float64 projections Xc v_i (n-term dots, |v| <= 1) add n u max_r sum|Xc_r|; squares, var's sums of D
    # terms and the quotients add (2 D + n + 6) u relative on each side
    proj_var = (Xc @ vt[:k].T).var(0)
    pv = 2 * (2 * pu + n * u * np.abs(Xc).sum(1).max()) / s[:k]
    rel = pv + 4 * pu * s.sum() / (s**2).sum() + 2 * (2 * D + n + 6) * u
    ratio_np = proj_var / Xc.var(0).sum()
    assert (np.abs(out.explained_variance_ratio.numpy() - ratio_np) <= rel * ratio_np).all()


def test_patch_components_k_clipped_and_checked():
    model = _make("vit_tiny_patch16_224", dict(img_size=8, patch_size=2, embed_dim=24, depth=1, num_heads=2))
    assert patch_embedding_components(model).components.shape == (12, 3, 2, 2)  # C*P*P = 12 < 28
    assert patch_embedding_components(model, k=5).components.shape == (5, 3, 2, 2)
    with pytest.raises(ValueError, match="k must be"):
        patch_embedding_components(model, k=0)


@pytest.mark.parametrize("name", ["test_resnet_cifar", "test_alternet"])
def test_clear_errors_for_cnns(name):
    model = vitscope.create_model(name)
    with pytest.raises(ValueError, match="no learned position embedding"):
        position_embedding_similarity(model)
    with pytest.raises(ValueError, match="no patch embedding"):
        patch_embedding_components(model)


def test_clear_errors_for_hybrid_stem_and_missing_pos_embed():
    from timm.layers import HybridEmbed

    model = _make("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                               pos_embed="none"))
    with pytest.raises(ValueError, match="no learned position embedding"):
        position_embedding_similarity(model)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1))
    backbone.num_features = 8
    model.patch_embed = HybridEmbed(backbone, img_size=32, patch_size=1, feature_size=8, embed_dim=24)
    with pytest.raises(ValueError, match="convolutional stem"):
        patch_embedding_components(model)
