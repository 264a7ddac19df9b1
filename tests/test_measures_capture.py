"""The streaming measures fed straight from ``vitscope.capture`` on tiny models, checked against timm's
ConViT nonlocality on the layers' real inputs and against the functions called by hand."""
from __future__ import annotations

import torch

import vitscope
from _helpers import attention_sum_rtol, fourier_bound, ratio_bound
from vitscope.measures import (
    AttentionDistance,
    FourierLogAmplitude,
    Nonlocality,
    RatioOfNorms,
    attention_distance,
    fourier_log_amplitude,
    ratio_of_norms,
)


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_convit_nonlocality_from_capture_matches_timm():
    torch.manual_seed(0)
    model = vitscope.create_model("test_convit_32").eval().double()  # float64: the check is of the formula
    for blk in model.blocks[:2]:  # move off the local init so heads differ
        blk.attn.pos_proj.weight.data += 0.3 * torch.randn_like(blk.attn.pos_proj.weight)
    measure = Nonlocality()
    expected = [torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    total = 0
    for n, seed in ((5, 1), (2, 2)):  # unequal batches
        with torch.no_grad(), vitscope.capture(model) as cap:
            model(images(n, seed))
        measure.update(cap.attentions, cap.attention_layout)
        ins = {info.name: z_in for info, (z_in, _) in zip(cap.layout, cap.residuals)}
        for k in range(2):  # GPSA layers: timm's own measure on the real input of the attention
            blk = model.blocks[k]
            with torch.no_grad():
                expected[k] += n * blk.attn.get_attention_map(blk.norm1(ins[f"blocks.{k}.attn"]))
        total += n
    out = measure.compute()
    assert len(out) == 3  # 2 GPSA + 1 MHSA (class token dropped via the layout)
    # the same maps (GPSA.get_attention on the same input); terms >= 0 throughout: timm's batch mean (n u), sqrt,
    # product, einsum over S^2 (S^2 - 1) u, / S; here n x, the sum of 2, / total (3 u); ours the batch sums
    # (n - 1) u, cdist, products, the S^2 sum, / S, the batches' sum and / total: 2 (S^2 + 2 n + 8) u, n = 5
    S = cap.attention_layout[0].grid[0] * cap.attention_layout[0].grid[1]
    for k in range(2):
        torch.testing.assert_close(out[k], expected[k] / total, rtol=2 * (S * S + 2 * 5 + 8) * 2.0**-53, atol=0)


def test_vit_measures_from_capture_match_functions():
    torch.manual_seed(0)
    model = vitscope.create_model("test_vit_cifar").eval().double()  # float64 maps: float64 sums both sides
    dist, ratio, four = AttentionDistance(), RatioOfNorms(), FourierLogAmplitude()
    attns, zs, fzs, outs = [], [], [], []
    for n, seed in ((4, 3), (3, 4)):
        with torch.no_grad(), vitscope.capture(model) as cap:
            model(images(n, seed))
        dist.update(cap.attentions, cap.attention_layout)
        ratio.update(cap.residuals, cap.branches, cap.layout)
        four.update(cap.residuals, cap.layout)
        attns.append(cap.attentions[1])
        zs.append(cap.residuals[2][0])
        fzs.append(cap.branches[2])
        outs.append(cap.residuals[2][1])
    # the same per-example float64 terms, streamed over batches of 4 + 3 vs one call on the 7: within the
    # library-vs-reference bounds (each holds for any summation order)
    a = torch.cat(attns)
    torch.testing.assert_close(dist.compute()[1], attention_distance(a, (4, 4), 8, 1), rtol=attention_sum_rtol(a),
                               atol=0)
    r = ratio.compute()[2]
    z = torch.cat(zs)
    ref = ratio_of_norms(z, torch.cat(fzs), 1)
    torch.testing.assert_close(r["cls"], ref["cls"], rtol=ratio_bound(z), atol=0)
    torch.testing.assert_close(r["spatial"], ref["spatial"], rtol=ratio_bound(z), atol=0)
    fmap = vitscope.tokens_to_map(torch.cat(outs), (4, 4), 1)
    bound = torch.from_numpy(fourier_bound(fmap.numpy(), batches=2))
    assert ((four.compute()[2] - fourier_log_amplitude(fmap)).abs() <= bound).all()
