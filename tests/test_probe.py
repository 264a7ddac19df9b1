"""vitscope.probe: one pass feeds every measure; results equal the measures on the whole data set."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from _helpers import count_host_reads, gram_cka_bound
from vitscope import measures as M


def _data(n=13, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))


def _whole(model, ds, batch_size=None):
    """Capture on the whole data set: the reference the streamed probe must equal. With ``batch_size`` the forwards
    run batch by batch (as the probe's) and the captures are concatenated: the probe's float32 tensors bit for bit,
    so only the measures' own reductions can differ (float32 batch-shape rounding has no a-priori bound)."""
    x, y = ds.tensors
    caps, logits = [], []
    for part in x.split(batch_size or len(x)):
        with torch.no_grad(), vitscope.capture(model) as cap:
            logits.append(model(part))
        caps.append(cap)
    cap = caps[0]
    cap.attentions = [torch.cat(maps) for maps in zip(*(c.attentions for c in caps))]
    cap.records = [dataclasses.replace(rs[0], **{f: torch.cat([getattr(r, f) for r in rs])
                                                 for f in ("z_in", "branch", "shortcut", "z_out")
                                                 if getattr(rs[0], f) is not None})
                   for rs in zip(*(c.records for c in caps))]
    return cap, torch.cat(logits), y


U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64


@pytest.mark.parametrize("name", ["test_vit_cb", "test_convit_32"])
def test_probe_streams_to_whole_set_values(name):
    """Each bound below counts the roundings where the streamed probe and the reference differ; a float sum of m
    terms of one sign is within (m - 1) u relative of the exact one."""
    model = vitscope.create_model(name).eval()
    ds = _data()
    names = ["attention_entropy", "attention_distance", "nonlocality", "relative_distance", "ratio_of_norms",
             "fourier", "feature_variance"]
    result = vitscope.probe(model, DataLoader(ds, batch_size=5), names, progress=False)  # batches 5, 5, 3
    cap, logits, y = _whole(model, ds, batch_size=5)
    n = 13
    assert result.meta["examples"] == n
    assert result.meta["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=0)
    # float64 log-softmax of the same logits per batch, n terms >= 0 summed in some order, one division each
    nll = sum(F.cross_entropy(lb.double(), yb, reduction="sum").item() for lb, yb in zip(logits.split(5), y.split(5)))
    assert result.meta["nll"] == pytest.approx(nll / n, rel=2 * n * U64, abs=0)
    for i, (attn, info) in enumerate(zip(cap.attentions, cap.attention_layout)):
        row = result["attention_entropy"][i]
        a = attn.double().numpy()
        ent = -(np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0)).sum(-1).mean((0, 2))  # numpy reference
        # the probe: each term A ln A in float32 (log within 1 ulp, 2u, and the product, u), the N terms >= 0 of
        # a row summed in float32, (N - 1) u; the rows summed in float64 (negligible: one more u)
        N = attn.shape[-1]
        np.testing.assert_allclose(row["heads"], ent, rtol=(N + 3) * U32, atol=0)
        assert row["max_entropy"] == pytest.approx(math.log(N), rel=U64)
        assert row["layer"] == info.name and row["kind"] == info.kind
        dist = M.attention_distance(attn, info.grid, info.patch_size, info.num_prefix_tokens)
        # both sum A >= 0 over the batch in float32 before float64: batches of <= 5 (4u) against all 13 (12u),
        # then float64 sums over N^2 entries (N^2 2^-53 < u)
        np.testing.assert_allclose(result["attention_distance"][i]["heads"], dist.numpy(),
                                   rtol=(4 + 12 + 1) * U32, atol=0)
        cls_mass = a[:, :, info.num_prefix_tokens:, :info.num_prefix_tokens].sum(-1).mean((0, 2))  # numpy
        # float64 sums of the same float32 entries >= 0 in two orders (m of them each) and one division each
        m = a[:, 0, info.num_prefix_tokens:, :info.num_prefix_tokens].size
        np.testing.assert_allclose(result["attention_distance"][i]["class_token_mass_heads"], cls_mass,
                                   rtol=2 * (m + 1) * U64, atol=0)
        assert result["attention_distance"][i]["renormalized"] is False  # the literature's definition
    assert cap.records[0].info.kind == "stem" and len(result["ratio_of_norms"]) == len(cap.records) - 1
    for i, (rec, row) in enumerate(zip(cap.records[1:], result["ratio_of_norms"]), start=1):  # no ratio: stem
        ref = M.ratio_of_norms(rec.z_in, rec.branch, rec.info.num_prefix_tokens)
        # float64 throughout from the same float32 tokens: each norm of D entries within (D + 1) u64 (two per
        # ratio, one division), the B N ratios >= 0 summed in two orders
        B, N, D = rec.z_in.shape
        assert row["spatial"] == pytest.approx(float(ref["spatial"]), rel=(2 * B * N + 4 * (D + 2)) * U64, abs=0)
        # normalized_depth is i / (L - 1) rounded to 6 decimals (the documented table): the same two operations
        assert row["depth"] == i and row["normalized_depth"] == round(i / (len(cap.records) - 1), 6)
    assert len(result["fourier"]) == len(cap.records) and result["fourier"][0]["layer"] == "stem"
    for rec, f_row, v_row in zip(cap.records, result["fourier"], result["feature_variance"]):
        fmap = vitscope.tokens_to_map(rec.z_out, rec.info.grid, rec.info.num_prefix_tokens)
        x = fmap.double().numpy()  # (B, C, h, w): the same float32 values, exact in float64
        B, C, h, w = x.shape
        S = h * w
        k = np.arange(len(f_row["curve"]))
        amp = np.abs(np.fft.fft2(x)[..., k, k])  # (B, C, F) the half-diagonal DFT coefficients
        # Both compute each coefficient as a float64 sum of S products: absolute error <= S u64 sum|x| each, so
        # ln|X| moves by <= S u64 sum|x| / |X| (two computations, the curve minus its first entry: x 4), plus the
        # float64 means over B C maps (of |ln|X|| values, (B C) u64 each).
        per_map = (4 * S * U64 * np.abs(x).sum((-1, -2))[..., None] / amp).max()
        means = 4 * B * C * U64 * np.abs(np.log(amp)).max()
        np.testing.assert_allclose(f_row["curve"], M.fourier_log_amplitude(fmap).numpy(), rtol=0,
                                   atol=per_map + means)
        # One pass in float64 (sum x^2 - (sum x)^2 / S): sums of S terms, cancellation amplifying by 1 + mean^2/var
        # (METHODS, feature variance), then the mean over B C maps; the two computations' bounds added.
        mean, var = x.mean((-1, -2)), x.var((-1, -2), ddof=1)
        kappa = float((1 + mean**2 / var).max())
        assert v_row["value"] == pytest.approx(float(M.feature_variance(fmap)), rel=4 * (S + B * C) * U64 * kappa,
                                               abs=0)


def test_probe_cka_single_batch_equals_cka():
    model = vitscope.create_model("test_vit_cifar").eval()
    ds = _data(n=12)
    result = vitscope.probe(model, DataLoader(ds, batch_size=12), ["cka"], progress=False)
    cap, _, _ = _whole(model, ds)
    feats = cap.outputs  # the stem's output first
    mat = np.array(result.extras["cka"]["matrix"])
    # probe's Grams of the float32 features are centred float32 matmuls, within gram_cka_bound
    # (linear_gram's worst case: ~1e-3 here; typically ~1e-8) per side; cka's float64 Grams of the uncentred
    # features within the same formula at u = 2^-53
    flat = [f.reshape(len(f), -1).double().numpy() for f in feats]
    side = [gram_cka_bound([f]) + gram_cka_bound([f], 2.0**-53, centre=False) for f in flat]
    for i in range(len(feats)):
        for j in range(len(feats)):
            assert mat[i, j] == pytest.approx(float(M.cka(feats[i], feats[j])), rel=0, abs=side[i] + side[j])
    np.testing.assert_allclose(np.diag(mat), 1.0, rtol=0, atol=3 * 2.0**-53)  # x / sqrt(x x) of the same bits


def test_probe_on_cnn_and_clear_errors():
    model = vitscope.create_model("resnet18", num_classes=10)
    loader = DataLoader(_data(n=8), batch_size=4)
    result = vitscope.probe(model, loader, ["cka", "ratio_of_norms", "fourier", "feature_variance"], progress=False)
    assert len(result["cka"]) == 9 * 9 and {r["kind"] for r in result["fourier"]} == {"stem", "conv", "downsample"}
    with pytest.raises(ValueError, match="'attention_entropy' needs attention maps but ResNet"):
        vitscope.probe(model, loader, ["attention_entropy"])
    with pytest.raises(ValueError, match="unknown measure"):
        vitscope.probe(model, loader, ["entropy_of_everything"])
    with pytest.raises(ValueError, match="no GPSA layer"):
        vitscope.probe(model, loader, ["gpsa_gates"])
    bad = TensorDataset(torch.full((4, 3, 32, 32), float("nan")), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        vitscope.probe(model, DataLoader(bad, batch_size=4), ["cka"])
    with pytest.raises(ValueError, match="max_batches must be a positive integer or None, got 0"):
        vitscope.probe(model, DataLoader(_data(n=4), batch_size=4), ["cka"], max_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        vitscope.probe(model, [], ["cka"])


def test_gpsa_gates_table():
    model = vitscope.create_model("test_convit_32")
    with torch.no_grad():
        model.blocks[1].attn.gating_param.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    result = vitscope.probe(model, DataLoader(_data(n=4), batch_size=4), ["gpsa_gates"], progress=False)
    rows = result["gpsa_gates"]
    assert [r["layer"] for r in rows] == ["blocks.0.attn", "blocks.1.attn"]
    # float32 sigmoid of exact parameters: exp (1 ulp, 2u), the sum and the division (u each) against float64
    np.testing.assert_allclose(rows[1]["heads"], 1 / (1 + np.exp(-np.array([0.0, 1.0, -1.0, 2.0]))),
                               rtol=4 * 2.0**-24)


def test_cli_probe_writes_json_and_csv(tmp_path, capsys):
    from vitscope.cli import main

    out = tmp_path / "probe"
    code = main(["probe", "--model", "test_vit_cb", "--data", "fake", "--measures",
                 "attention_entropy,cka,fourier,ratio_of_norms", "--batch-size", "16", "--max-batches", "2",
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"attention_entropy", "cka", "fourier", "ratio_of_norms"}
    for name in results:
        assert (out / f"{name}.csv").read_text().startswith("layer,kind,block,depth,normalized_depth")
    assert json.loads((out / "meta.json").read_text())["examples"] == 32
    assert main(["probe", "--model", "test_vit_cb", "--data", "fake", "--measures", "cka", "--batch-size", "8",
                 "--max-batches", "1", "--layers", "blocks", "--layer-names", "stem, blocks.1", "--out",
                 str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["cka"]["layers"] == ["stem", "blocks.1"]
    assert main(["probe", "--model", "test_vit_cb", "--data", "fake", "--measures", "bogus", "--out",
                 str(out)]) == 2
    assert "unknown measure" in capsys.readouterr().err


def test_probe_scans_each_captured_tensor_once_and_names_the_layer():
    """The measures skip their own value scans inside probe; probe's single scan still stops a non-finite
    sub-layer with a message naming it (the images themselves are finite)."""
    model = vitscope.create_model("test_vit_cifar").eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"batch 0: the .* of sub-layer blocks\.1\.mlp contains NaN or Inf"):
        vitscope.probe(model, DataLoader(_data(n=4), batch_size=4), ["feature_variance"], progress=False)


def test_probe_cka_over_unequal_batches_equals_minibatch_cka():
    """probe reduces each sub-layer as the forward produces it (Grams built layer by layer): over batches of
    5, 5 and 4 it equals MinibatchCKA.update_grams fed each batch's float32-product Grams of the captured outputs
    bit for bit, and the other stream measures equal their classes fed the same captures."""
    model = vitscope.create_model("test_vit_cb").eval()
    ds = _data(n=14)
    result = vitscope.probe(model, DataLoader(ds, batch_size=5), ["cka", "ratio_of_norms", "fourier"], progress=False)
    from vitscope.measures.cka import linear_gram

    ref, ratio, four = None, M.RatioOfNorms(), M.FourierLogAmplitude()
    for x, _ in DataLoader(ds, batch_size=5):
        with torch.no_grad(), vitscope.capture(model, attention=False) as cap:  # as probe: no attention measure
            model(x)
        ref = ref or M.MinibatchCKA(len(cap.outputs))
        ref.update_grams([linear_gram(o, float32=True) for o in cap.outputs])  # the stem's output, sub-layers
        ratio.update(cap.residuals, cap.branches, cap.layout)  # residual sub-layers only
        four.update(cap.outputs, cap.output_layout)
    # probe forms each batch's Grams with linear_gram(float32=True) and feeds them to MinibatchCKA as here: the
    # same operations on the same captures, equal bit for bit (that Gram's accuracy against float64 is
    # tests/test_compare.py's derived bound, _helpers.gram_cka_bound)
    np.testing.assert_array_equal(np.array(result.extras["cka"]["matrix"]), ref.compute().numpy())
    assert result.extras["cka"]["examples"] == 14
    # the same measures fed the same captured float32 tensors batch by batch: equal bit for bit
    for row, r in zip(result["ratio_of_norms"], ratio.compute()):
        assert row["spatial"] == float(r["spatial"]) and row["cls"] == float(r["cls"])
    for row, f in zip(result["fourier"], four.compute()):
        assert row["curve"] == f.tolist()


_MEMORY_SCRIPT = """
import json, sys, torch
import vitscope
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
torch.manual_seed(0)
model = vitscope.create_model("test_vit_cb").eval()
g = torch.Generator().manual_seed(0)
ds = TensorDataset(torch.randn(20 * 64, 3, 32, 32, generator=g), torch.randint(0, 10, (20 * 64,), generator=g))
loader = DataLoader(ds, batch_size=64)
def peak():  # VmHWM: this process image's peak RSS (ru_maxrss would keep the parent's peak across fork + exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
vitscope.probe(model, loader, max_batches=2, progress=False)
after2 = peak()
vitscope.probe(model, loader, max_batches=20, progress=False)
after20 = peak()
held = []  # control: a probe that leaks every module's output of every batch, measured the same way
for m in model.modules():
    m.register_forward_hook(lambda m, i, o: held.append(o.clone()) if torch.is_tensor(o) else None)
vitscope.probe(model, loader, max_batches=20, progress=False)
leaked = sum(t.numel() * t.element_size() for t in held)
json.dump({"after2": after2, "after20": after20, "leaked": leaked, "control": peak() - after20}, sys.stdout)
"""


def test_probe_peak_memory_does_not_grow_with_batches():
    """Peak RSS (VmHWM, sees torch's allocations) after 20 batches equals that after 2 within noise; the
    control (the same probe leaking every module's output, ~7 MB a batch) shows that such a leak is seen."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    noise = 4 * 2 ** 20
    assert r["leaked"] > 4 * noise and r["control"] > 2 * noise, r  # the measurement sees a per-batch leak
    assert r["after20"] - r["after2"] < noise, r


_SCALAR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def _count_scalar_reads(monkeypatch, fn):
    """Calls of the Tensor methods that read a value on the host (on a GPU each waits for the queue to drain)."""
    calls = count_host_reads(monkeypatch, _SCALAR_READS)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return calls


@pytest.mark.parametrize("model_name", ["test_vit_cb", "test_convit_32"])
def test_probe_host_syncs_do_not_grow_with_batches(monkeypatch, model_name):
    """Within the pass no value is read on the host (checks stay on the device, read once at the end): the
    number of host scalar reads is the same over 2 and 6 batches, and the control (the same counter around a
    per-batch ``.item()``) shows that per-batch reads are seen."""
    model = vitscope.create_model(model_name).eval()
    measures = [n for n, c in vitscope.probing.PROBE_MEASURES.items() if not c.static]
    counts = {}
    fit = DataLoader(_data(n=12), batch_size=4)  # linear_probe's fit pass: the same for both (not per batch)
    for n in (2, 6):
        loader = DataLoader(_data(n=4 * n), batch_size=4)
        counts[n] = _count_scalar_reads(monkeypatch, lambda loader=loader: vitscope.probe(
            model, loader, measures, progress=False, fit_loader=fit, num_classes=10, shots=(1,)))
    assert len(counts[2]) == len(counts[6]), (len(counts[2]), len(counts[6]))
    control = _count_scalar_reads(monkeypatch, lambda: [x.sum().item() for x, _ in DataLoader(_data(8), 4)])
    assert len(control) >= 2


def test_probe_deferred_checks_name_the_batch_and_layer_and_warn_once():
    """The device-side checks still raise the first failure in pass order with its batch and layer (a NaN
    pixel in batch 1, batch 0 clean; the first failed check of the first failed batch), and warnings fire
    once each after the pass."""
    model = vitscope.create_model("test_vit_cb").eval()
    x, y = _data(n=8).tensors
    x = x.clone()
    x[5, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^batch 1 holds NaN or infinite pixels"):
        vitscope.probe(model, DataLoader(TensorDataset(x, y), batch_size=4), ["cka"], progress=False)
    from vitscope.probing import _DeviceChecks
    checks = _DeviceChecks()
    checks.fail_if(torch.tensor(False), "batch {b}: fine")
    checks.end_batch(0)
    checks.fail_if(torch.tensor(False), "batch {b}: fine")
    checks.fail_if(torch.tensor(True), "batch {b}: the map of blocks.3.attn is bad")
    checks.end_batch(1)
    checks.fail_if(torch.tensor(True), "batch {b}: later")
    checks.end_batch(2)
    checks.warn_if(torch.tensor(True), "a zero branch")
    with pytest.raises(ValueError, match=r"^batch 1: the map of blocks\.3\.attn is bad$"):
        checks.raise_first()
    only_warn = _DeviceChecks()
    only_warn.fail_if(torch.tensor(False), "batch {b}: fine")
    only_warn.end_batch(0)
    only_warn.warn_if(torch.tensor(False), "never")
    only_warn.warn_if(torch.tensor(True), "a zero branch")
    with pytest.warns(RuntimeWarning, match="a zero branch") as rec:
        only_warn.raise_first()
    assert [str(w.message) for w in rec] == ["a zero branch"]


def test_probe_reads_its_checks_every_few_batches(monkeypatch):
    """A long pass over bad data stops at the next periodic read of the checks, not at the end of the loader."""
    monkeypatch.setattr(vitscope.probing.probe_pass, "_CHECK_EVERY", 2)
    model = vitscope.create_model("test_vit_cb").eval()
    taken = []

    def loader():
        for b in range(10):
            taken.append(b)
            x = torch.randn(4, 3, 32, 32)
            if b == 0:
                x[0, 0, 0, 0] = float("inf")
            yield x

    with pytest.raises(ValueError, match=r"^batch 0 holds NaN or infinite pixels"):
        vitscope.probe(model, loader(), ["attention_entropy"], progress=False)
    assert taken == [0, 1]


def test_probe_block_layers_and_name_filter():
    """layers="blocks" gives one CKA layer per block (Raghu et al.'s granularity), ``names`` keeps the layers a
    glob matches (attention layers too); both equal capture's own records."""
    model = vitscope.create_model("test_vit_cb").eval()
    ds = _data(n=6)
    result = vitscope.probe(model, DataLoader(ds, batch_size=6), ["cka", "attention_entropy"], progress=False,
                            layers="blocks", names=["stem", "blocks.1*"])
    assert result.extras["cka"]["layers"] == ["stem", "blocks.1"]
    assert [r["layer"] for r in result["attention_entropy"]] == ["blocks.1.attn"]
    assert result.meta["layers"] == "blocks"
    with torch.no_grad(), vitscope.capture(model, attention=False, layers="blocks") as cap:
        model(ds.tensors[0])
    mat = np.array(result.extras["cka"]["matrix"])
    # one batch of 6 (this capture's features need not be probe's bits: probe also captures attention): probe's
    # float32-product Grams vs cka's float64 ones within gram_cka_bound per side, as above
    a, b = (cap.outputs[k].reshape(6, -1).double().numpy() for k in (0, 2))
    bound = sum(gram_cka_bound([f]) + gram_cka_bound([f], 2.0**-53, centre=False) for f in (a, b))
    assert mat[0, 1] == pytest.approx(float(M.cka(cap.outputs[0], cap.outputs[2])), rel=0, abs=bound)


def test_probe_compare_and_attention_images_restore_each_modules_training_flag():
    """The probe, compare and attention images run in eval mode and leave every module's own flag as it was
    (measures.evaluation.eval_mode), not the top-level flag copied onto all modules."""
    def mixed(seed):
        torch.manual_seed(seed)
        m = vitscope.create_model("test_vit").train()
        m.blocks[0].eval()  # a frozen block inside a model in training mode
        return m

    def flags(m):
        return [x.training for x in m.modules()]

    images = torch.randn(4, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 0, 1])), batch_size=4)
    model = mixed(0)
    before = flags(model)
    assert not all(before) and any(before)
    vitscope.probe(model, loader, measures=["cka"], progress=False)
    assert flags(model) == before
    other = mixed(1)
    vitscope.compare(model, other, loader, progress=False)
    assert flags(model) == before and flags(other) == before
    from vitscope.probing.attention_images import attention_maps
    attention_maps(model, images[:1])
    assert flags(model) == before
