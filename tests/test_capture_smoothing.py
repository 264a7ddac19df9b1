"""Spatial-smoothing layers in ``vitscope.capture`` ("Blurs Behave Like Ensembles", HDVW's companion): captured in
forward order with kind ``smoothing``, and the HDVW metrics' smoothing group against a numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from timm.models.resnet import BasicBlock

import vitscope
from _helpers import fourier_bound, variance_bound
from vitscope.layers.blur import SpatialSmoothing
from vitscope.studies.metrics import _changes, compute_metric


def _model(layers=(2, 1, 2, 1)):
    torch.manual_seed(0)
    return timm.create_model("test_resnet_smooth", layers=layers).eval()


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _hook_order(model, x):
    """(name, input, output) of every residual block and smoothing layer, in the order forward hooks fire."""
    fired, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, (BasicBlock, SpatialSmoothing)):
            handles.append(m.register_forward_hook(
                lambda _m, args, out, name=name: fired.append((name, args[0].clone(), out.clone()))))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return fired, out


def test_capture_order_is_forward_order_with_smoothing_kind():
    model = _model()
    x = _images(3, 0)
    fired, ref_out = _hook_order(model, x)
    with torch.no_grad(), vitscope.capture(model) as cap:
        out = model(x)
    # capture only reads tensors (and records copies): the same forward, equal bit for bit; so are the records
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # capturing changes nothing
    stem, *records = cap.records
    assert stem.info.kind == "stem" and stem.branch is None and records == cap.residual_records
    torch.testing.assert_close(stem.z_out, fired[0][1], rtol=0, atol=0)  # the stem's output is the first block's input
    names = [r.info.name for r in records]
    assert names == [n for n, _, _ in fired]  # the order the layers actually ran in
    assert names == ["layer1.0", "layer1.1", "smooth1", "layer2.0", "smooth2", "layer3.0", "layer3.1", "smooth3",
                     "layer4.0", "smooth4"]
    assert [r.info.block for r in records] == list(range(len(names)))
    kinds = dict(zip(names, (r.info.kind for r in records)))
    assert kinds == {"layer1.0": "conv", "layer1.1": "conv", "smooth1": "smoothing", "layer2.0": "downsample",
                     "smooth2": "smoothing", "layer3.0": "downsample", "layer3.1": "conv", "smooth3": "smoothing",
                     "layer4.0": "downsample", "smooth4": "smoothing"}
    for rec, (_name, z_in, z_out) in zip(records, fired):
        torch.testing.assert_close(rec.z_out, z_out, rtol=0, atol=0)
        if rec.info.kind == "smoothing":
            torch.testing.assert_close(rec.z_in, z_in, rtol=0, atol=0)
            # z_out = z_in + (blur(z_in) - z_in): the float32 branch z_out - z_in and the sum round once each
            err = (rec.shortcut + rec.branch - rec.z_out).abs()
            assert (err <= 2.0**-24 * ((rec.z_out - rec.z_in).abs() + rec.z_out.abs())).all()
            assert rec.info.grid == tuple(z_out.shape[-2:])
    for prev, cur in zip(cap.records, records):
        # each sub-layer's input is the previous one's output
        torch.testing.assert_close(cur.z_in, prev.z_out, rtol=0, atol=0)


def test_smoothing_registration_keeps_weights_and_forward():
    smooth, plain = _model(), timm.create_model("test_resnet_cifar", layers=(2, 1, 2, 1))
    assert list(smooth.state_dict()) == list(plain.state_dict())  # same keys, same order
    plain.load_state_dict(smooth.state_dict())
    children = [n for n, _ in smooth.named_children()]
    assert children.index("smooth1") == children.index("layer1") + 1
    assert children.index("smooth4") == children.index("layer4") + 1 < children.index("global_pool")
    with vitscope.capture(smooth, names="smooth*") as cap, torch.no_grad():
        smooth(_images(2, 1))
    assert [r.info.name for r in cap.records] == ["smooth1", "smooth2", "smooth3", "smooth4"]


def _np_log_amplitude_at(z, f=0.75):
    """HDVW's delta log amplitude of maps z (B, C, h, w) at normalized frequency f (x pi; the half-diagonal's
    k-th entry is at 2k/h), numpy FFT, linearly interpolated; None when the map cannot represent f."""
    z = z.astype(np.float64)
    amp = np.log(np.abs(np.fft.fft2(z)) + 1e-6)
    amp = np.fft.fftshift(amp, axes=(-2, -1)).mean((0, 1))  # (h, w)
    h, w = amp.shape
    n = min(h - h // 2, w - w // 2)
    diag = np.array([amp[h // 2 + k, w // 2 + k] for k in range(n)])
    freqs = 2 * np.arange(n) / h
    return None if f > freqs[-1] + 1e-9 else float(np.interp(f, freqs, diag - diag[0]))


def _np_variance(z):
    return z.astype(np.float64).reshape(*z.shape[:2], -1).var(-1, ddof=1).mean()


def test_metrics_smoothing_group_equals_numpy_reference():
    model = _model()
    batches = [_images(3, 2), _images(2, 3)]  # unequal batches
    res = vitscope.probe(model, batches, ["fourier", "feature_variance"], progress=False)
    analysis = {"probe": res.to_dict()}
    ins: dict[str, list[np.ndarray]] = {}
    outs: dict[str, list[np.ndarray]] = {}
    for x in batches:
        with torch.no_grad(), vitscope.capture(model, attention=False) as cap:
            model(x)
        for r in cap.records:
            if r.info.kind == "smoothing":
                ins.setdefault(r.info.name, []).append(r.z_in.numpy())
                outs.setdefault(r.info.name, []).append(r.z_out.numpy())
    assert list(ins) == ["smooth1", "smooth2", "smooth3", "smooth4"]
    # Bounds, per smoothing row: each map's curve entry within fourier_bound (vitscope's DFT vs numpy's FFT, 2
    # batches) of the reference's, and linear interpolation at f moves that to the interpolated bound, plus its own
    # roundings and the frequency grid's (2 k / h, within a few u on either side): 32 u max|curve|; each variance
    # within variance_bound relative (the one pass vs numpy's two), so its log ratio within their sum + 2 u (1 + |log|)
    u = 2.0**-53
    f_ref, v_ref, f_err, v_err = [], [], [], []
    for name in ins:
        z_in, z_out = np.concatenate(ins[name]), np.concatenate(outs[name])
        f_in, f_out = _np_log_amplitude_at(z_in), _np_log_amplitude_at(z_out)
        if f_in is not None and f_out is not None:  # the metric compares maps at 0.75 pi (studies.metrics)
            f_ref.append(f_out - f_in)
            f_err.append(sum(float(np.interp(0.75, 2 * np.arange(len(e)) / z.shape[-2], e)) + 32 * u * max(1.0, abs(v))
                             for z, e, v in ((z, fourier_bound(z, 2), fz) for z, fz in ((z_in, f_in), (z_out, f_out)))))
        v_ref.append(math.log(_np_variance(z_out) / _np_variance(z_in)))
        v_err.append(variance_bound(z_out, 1, 2) + variance_bound(z_in, 1, 2) + 2 * u * (1 + abs(v_ref[-1])))
    rows = analysis["probe"]["feature_variance"]["rows"]
    assert [r["layer"] for r in rows if r["kind"] == "smoothing"] == list(ins)
    assert len(_changes(rows, "smoothing", log=True)) == 4  # every smoothing row counted
    # the means of <= 4 changes: the mean bound plus 4 u of the mean's own roundings
    f_bound = np.mean(f_err) + 4 * u * np.abs(f_ref).max()
    v_bound = np.mean(v_err) + 4 * u * np.abs(v_ref).max()
    assert compute_metric("fourier_change:smoothing", analysis) == pytest.approx(np.mean(f_ref), rel=0, abs=f_bound)
    assert compute_metric("variance_change:smoothing", analysis) == pytest.approx(np.mean(v_ref), rel=0, abs=v_bound)
    assert np.mean(v_ref) < 0  # the blur lowers variance (it averages neighbours), as the paper says
    # early / late halves split the same four rows
    early = compute_metric("variance_change:smoothing_early", analysis)
    late = compute_metric("variance_change:smoothing_late", analysis)
    depth = {r["layer"]: r["normalized_depth"] for r in rows}
    n_early = sum(depth[n] < 0.5 for n in ins)
    # the two means recombined: each mean's and this sum's roundings, 8 u max|change|, beyond v_bound
    assert (early * n_early + late * (4 - n_early)) / 4 == pytest.approx(np.mean(v_ref), rel=0,
                                                                         abs=v_bound + 8 * u * np.abs(v_ref).max())


def test_changes_never_drop_a_row_silently():
    rows = [{"layer": f"l{i}", "kind": k, "depth": i, "normalized_depth": i / 3, "value": v}
            for i, (k, v) in enumerate([("conv", 2.0), ("smoothing", 1.0), ("downsample", 3.0), ("smoothing", 0.0)])]
    with pytest.raises(ValueError, match="'l3' has value 0.0"):
        compute_metric("variance_change:smoothing", {"probe": {"feature_variance": {"rows": rows}}})
    rows[3]["value"] = None
    with pytest.raises(ValueError, match="'l3' has value None"):
        compute_metric("fourier_change:smoothing", {"probe": {"fourier": {"rows": rows}}})
    rows[3]["value"] = 1.5
    # 1 / 2 and 1.5 / 3 are both exactly 0.5: the mean of two equal logs is that log, exactly
    assert compute_metric("variance_change:smoothing", {"probe": {"feature_variance": {"rows": rows}}}) == \
        (math.log(0.5) + math.log(0.5)) / 2
