"""Issue 20, item 6: the claims the papers make that the studies check with their own metrics (RAGHU's skip
removal, CB's relative distance and CBS scale, HDVW's landscape study), each metric against an independent
reference; and the verdict of a claim of no change (``expect: equal``) and of one seed of two models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from _helpers import exact_t_tail, gram_cka_bound, ref_hsic1, t_tail_bound
from vitscope.studies import load_study
from vitscope.studies.metrics import compute_metric
from vitscope.studies.pipeline import run_skip_cka
from vitscope.studies.runner import _needs, _paired, _threshold
from vitscope.studies.verdict import INCONCLUSIVE, NOT_HELD, Verdict, decide, holm_adjust, paired_test, to_markdown


def ref_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of one batch from unbiased HSIC, features flattened per example (tokens x channels)."""
    X, Y = x.flatten(1).double().numpy(), y.flatten(1).double().numpy()
    K, L = X @ X.T, Y @ Y.T
    return ref_hsic1(K, L) / math.sqrt(ref_hsic1(K, K) * ref_hsic1(L, L))


def _block_outputs(model: torch.nn.Module, x: torch.Tensor, no_skip: int | None) -> list[torch.Tensor]:
    """The residual stream after each block, composed by hand from the model's public modules: block
    ``no_skip`` computes ``x = ls1(attn(norm1(x))); x = ls2(mlp(norm2(x)))`` (RAGHU: the skip dropped)."""
    stem: list[torch.Tensor] = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: stem.append(args[0]))
    with torch.no_grad():
        model(x)
        hook.remove()
        z, outs = stem[0], []
        for i, blk in enumerate(model.blocks):
            if i == no_skip:
                z = blk.ls1(blk.attn(blk.norm1(z)))  # (B, N, C)
                z = blk.ls2(blk.mlp(blk.norm2(z)))
            else:
                z = blk(z)
            outs.append(z)
    return outs


def test_cka_across_removed_skip_equals_a_hand_composed_forward():
    torch.manual_seed(0)
    model = vitscope.create_model("test_vit_cifar", depth=4).eval()
    with torch.no_grad():  # weights far from init, so the CKA of distinct block pairs differ
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(16, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=16)  # one batch: CKA
    a = {"probe": vitscope.probe(model, loader, ["cka"], progress=False).to_dict(),
         "skip_removal": run_skip_cka(model, loader, progress=False)}
    assert (a["skip_removal"]["block"], a["skip_removal"]["n_blocks"]) == (2, 4)  # the middle block, n // 2
    bounds = {}
    for which, no_skip in (("intact", None), ("removed", 2)):
        outs = _block_outputs(model, x, no_skip)
        expected = np.mean([ref_cka(outs[i], outs[j]) for i in (0, 1) for j in (2, 3)])
        # the probe's float32-product Grams of the same float32 features (linear_gram(float32=True)): each CKA within
        # the derived worst case per side (_helpers.gram_cka_bound, linear_gram's docstring) plus the float64
        # reference's own; their mean within the mean of those (and 4 u for the two means of four values <= 1):
        # ~9e-4 here, the worst case (observed ~3e-8; the old 1e-5 was a margin, not a bound)
        feats = [o.flatten(1).double().numpy() for o in outs]
        per_pair = [sum(gram_cka_bound([feats[k]], u) for k in (i, j) for u in (2.0**-24, 2.0**-53))
                    for i in (0, 1) for j in (2, 3)]
        bounds[which] = float(np.mean(per_pair)) + 4 * 2.0**-53
        assert abs(compute_metric(f"cka_across_skip:{which}", a) - expected) <= bounds[which], which
    # the skip matters by more than both values' worst-case float error (~1.3e-3 here)
    gap = compute_metric("cka_across_skip:removed", a) - compute_metric("cka_across_skip:intact", a)
    assert abs(gap) > bounds["intact"] + bounds["removed"]
    assert torch.equal(model(x), model(x))  # remove_skip restored the block: the same forward, bit for bit
    with pytest.raises(ValueError, match="intact or removed"):
        compute_metric("cka_across_skip:both", a)
    with pytest.raises(ValueError, match="no skip_removal"):
        compute_metric("cka_across_skip:removed", {"probe": a["probe"]})


def test_relative_distance_metric_averages_the_probe_rows():
    rows = [{"layer": f"blocks.{i}.attn", "kind": "msa", "depth": i, "normalized_depth": i / 3, "value": v}
            for i, v in enumerate([0.1, 0.3, 0.4, 0.6])]
    a = {"probe": {"relative_distance": {"rows": rows}}}
    # float64 means of decimal literals against the decimal mean: each literal within u/2 of its decimal, k - 1
    # sums within u of their partial sums, the division by k (2, 4: exact): within k u mean|v|, u = 2^-53; a wrong
    # selection of rows moves the mean by >= 0.05
    u = 2.0**-53
    assert abs(compute_metric("relative_distance", a) - 0.35) <= 4 * u * 0.35
    assert abs(compute_metric("relative_distance:early", a) - 0.2) <= 2 * u * 0.2  # depth 0, 1/3 < 0.5
    assert abs(compute_metric("relative_distance:late", a) - 0.5) <= 2 * u * 0.5
    with pytest.raises(ValueError, match="relative_distance takes"):
        compute_metric("relative_distance:first", a)


def test_relative_distance_through_the_probe_equals_the_measure_on_captured_maps():
    torch.manual_seed(1)
    model = vitscope.create_model("test_vit_cb", depth=2).eval()
    x = torch.randn(6, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=6)
    a = {"probe": vitscope.probe(model, loader, ["relative_distance"], progress=False).to_dict()}
    with torch.no_grad(), vitscope.capture(model, attention=True, residual=False, branches=False) as cap:
        model(x)
    grid = model.patch_embed.grid_size
    per_layer = [float(vitscope.measures.relative_distance(att.double(), grid, 1).mean()) for att in cap.attentions]
    # the measure is tested against a numpy loop (test_measures_attention); here the probe's per-layer rows and the
    # metric's average against the same measure on the float64 maps. The probe sums each query's weighted distances
    # and its mass over the S keys in the maps' float32 (terms >= 0: (S + 1) u32 each, so their ratio within
    # 2 (S + 1) u32), then float64 sums over the B S queries and the H heads and the means over layers (terms >= 0
    # in another order: 2 (B S + H + 6) u): a relative bound, all terms being >= 0
    b, h, s = cap.attentions[0].shape[0], cap.attentions[0].shape[1], grid[0] * grid[1]
    rel = 2 * (s + 1) * 2.0**-24 + 2 * (b * s + h + 6) * 2.0**-53
    expected = float(np.mean(per_layer))
    assert abs(compute_metric("relative_distance", a) - expected) <= rel * expected


def test_cbs_scales_and_metric_read_the_weights_in_depth_order():
    from vitscope.layers import cbs_scales

    model = vitscope.create_model("test_vit_cbs", depth=4)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.mlp.cb.scale.copy_(torch.linspace(0.0, 1.0, blk.mlp.cb.scale.numel()) + i)  # mean i + 0.5
    scales = cbs_scales(model)
    # float32 scales k / (C - 1) + i, each within u32 (i + 1) of the exact value (the quotient, the sum), whose mean
    # is i + 0.5 exactly; float32 means of C terms >= 0 within (C + 1) u32 (i + 1) more; a wrong block order moves a
    # mean by 1
    c, u32, u = scales[0].numel(), 2.0**-24, 2.0**-53
    for i, s in enumerate(scales):
        assert abs(float(s.mean()) - (i + 0.5)) <= (c + 2) * u32 * (i + 1)
    a = {"cbs_scale": [s.tolist() for s in scales]}
    # the metric's float64 mean of the 2C (or 4C) float32 values: their u32 (i + 1) each, and (2C + 1) u of the mean
    for half, exact, top in (("early", 1.0, 2), ("late", 3.0, 4), ("", 2.0, 4)):
        k = c * (2 if half else 4)
        assert abs(compute_metric(f"cbs_scale:{half}" if half else "cbs_scale", a) - exact) <= (
            u32 * top + (k + 1) * u * exact), half
    with pytest.raises(ValueError, match="no learned Context Broadcasting scale"):
        cbs_scales(vitscope.create_model("test_vit_cb"))


def test_new_claims_need_what_they_measure():
    needs = _needs(load_study("raghu-cka-distance"))
    assert {"skip_removal", "probe:cka"} <= needs[("vit_heads", "full")]
    needs = _needs(load_study("cb-entropy"))
    assert "cbs_scale" in needs[("vit_cbs", "full")] and "probe:relative_distance" in needs[("vit_cb", "full")]
    needs = _needs(load_study("hdvw-landscape"))
    assert {k for k, v in needs.items() if "hessian" in v} == {
        ("alternet", "small"), ("preact_resnet", "small"), ("vit_heads", "full"), ("vit", "full"),
        ("resnet_smooth", "full"), ("resnet", "full")}
    # seeds pair within a model (skip removed vs intact, CBS late vs early), not between architectures
    assert [_paired(c) for c in load_study("hdvw-landscape")["claims"]] == [False] * 4
    assert [_paired(c) for c in load_study("cb-entropy")["claims"]][-2:] == [False, True]
    skip = [c for c in load_study("raghu-cka-distance")["claims"] if "cka_across_skip" in str(c["a"])]
    assert len(skip) == 1 and _paired(skip[0])


def test_a_claim_of_no_change_is_two_sided_and_never_held():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 0.1, 5), rng.normal(1.0, 0.12, 5)
    v = Verdict.build("s", 8, "unchanged", "a", "b", "equal", a.tolist(), b.tolist(), paired=False)
    # two-sided Welch (test_verdict checks t and df against scipy's): the exact p at the same t and df, within twice
    # the derived bound on tdist's tail and u (1 - tail's rounding)
    test = paired_test(a.tolist(), b.tolist(), paired=False)
    t = abs(test.effect) / test.se
    assert abs(v.p - 2 * float(exact_t_tail(t, test.df))) <= 2 * t_tail_bound(t, test.df) + 2.0**-53
    assert v.verdict == INCONCLUSIVE and "no difference detected" in v.reason and "bounds" in v.reason
    assert v.seeds_needed is None and v.direction == "two-sided"
    far = b + 1.0
    assert decide(a.tolist(), far.tolist(), "equal", paired=False)[0] == NOT_HELD
    assert decide(far.tolist(), a.tolist(), "equal", paired=False)[0] == NOT_HELD  # either side
    w = holm_adjust([v, Verdict.build("s", 8, "x", "a", "b", "greater", [1.0, 1.2, 1.1], [0.0])])[0]
    assert w.verdict == INCONCLUSIVE and w.seeds_needed is None and "a = b?" in to_markdown([w])


def test_one_seed_of_two_models_is_not_called_one_sample():
    """A one-seed run of a two-model claim has one value per side, like a threshold: the label follows what the
    claim compares (the runner says whether a side is a fixed value)."""
    assert paired_test([0.9], [0.1]).method == "paired t"
    assert paired_test([0.9], [0.1], paired=False).method == "Welch t"
    assert paired_test([0.9], [0.1], threshold=True).method == "one-sample t"
    assert paired_test([0.9, 0.8], [0.1]).method == "one-sample t"  # one value against several: a threshold
    v = Verdict.build("s", 1, "c", "a", "b", "greater", [0.9], [0.1], paired=False, threshold=False)
    assert v.method == "Welch t" and "one seed" in v.reason
    assert holm_adjust([v])[0].method == "Welch t" and "one seed" in v.reason
    t = Verdict.build("s", 1, "c", "a", "0", "greater", [0.9], [0.0], threshold=True)
    assert t.method == "one-sample t" and t.threshold
    assert _threshold({"a": {"model": "vit", "metric": "m"}, "b": {"value": 0}})
    assert not _threshold({"a": {"model": "vit", "metric": "m"}, "b": {"model": "resnet", "metric": "m"}})
    assert not _threshold({"a": {"diff": [{"model": "vit", "metric": "m"}, {"model": "vit", "metric": "n"}]},
                           "b": {"diff": [{"model": "vit", "metric": "m"}, {"model": "vit", "metric": "n"}]}})
