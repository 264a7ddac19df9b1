"""Attention rollout on the table's transformer families (EVA, DINOv3 with register tokens, BEiT) against a numpy
rollout, and named as not applicable where tokens mix outside attention (PVTv2)."""
import numpy as np
import pytest
import timm
import torch

import vitscope


def _numpy_rollout(maps: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema: per layer A' = (mean_heads A + I) / row sums, R = A'_L ... A'_1. maps (B, H, N, N)."""
    B, _, N, _ = maps[0].shape
    R = np.broadcast_to(np.eye(N), (B, N, N))
    for a in maps:
        f = a.mean(1) + np.eye(N)
        R = (f / f.sum(-1, keepdims=True)) @ R
    return R


CASES = {  # name: (model, image side)
    "eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", embed_dim=32, depth=2, num_heads=2, img_size=28),
              28),
    "dinov3": (lambda: timm.create_model("vit_small_patch16_dinov3", embed_dim=32, depth=2, num_heads=2,
                                         img_size=32), 32),
    "beit": (lambda: timm.create_model("beit_base_patch16_224", embed_dim=32, depth=2, num_heads=2, img_size=32,
                                       global_pool=""), 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_on_table_transformers_equals_numpy(case):
    build, side = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, side, side)
    maps = vitscope.attention_maps(model, x, embeddings=False)
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(x)
    info = cap.attention_layout[0]
    p, (h, w) = info.num_prefix_tokens, info.grid
    R = _numpy_rollout([a.double().numpy() for a in cap.attentions])  # (B, N, N)
    pooled = getattr(model, "global_pool", "token") not in ("token", "")
    want = R[:, p:, p:].mean(1) if pooled else R[:, 0, p:]  # pooled output: mean over patch queries
    assert maps.rollout_source == ("mean over patch queries" if pooled else "class token")
    if case == "dinov3":
        assert p == model.num_prefix_tokens > 1  # class + register tokens are prefix tokens, left out of the row
    # the same float32 maps rolled out in float64 on both sides, every quantity >= 0 so relative errors add: per
    # layer and side the head mean (H u), the residual (u), the row normalisation (2 theta + N u), the product
    # (N u); the pooled read-out's mean of N terms (N + 1) u; then attention_maps stores the row in float32 (u32)
    L, (_, H, N, _) = len(cap.attentions), cap.attentions[0].shape
    rtol = 2.0**-24 + 2 * L * (2 * H + 2 + 2 * N) * 2.0**-53 + (N + 1) * 2.0**-53
    np.testing.assert_allclose(maps.rollout, want.reshape(2, h, w), rtol=rtol, atol=0)


def test_rollout_names_why_not_where_tokens_mix_outside_attention():
    torch.manual_seed(0)
    pvt = timm.create_model("pvt_v2_b0", embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                            num_heads=(1, 1, 1, 1)).eval()
    maps = vitscope.attention_maps(pvt, torch.randn(1, 3, 64, 64), embeddings=False)
    assert maps.rollout is None and "mix tokens outside their attention" in maps.rollout_source
