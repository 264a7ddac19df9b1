"""Tests for vitscope.data: spec parsing, the fake and CIFAR readers on files written here, loader options, elpv,
subsampling (the folder readers: test_data_folders.py)."""
from __future__ import annotations

import os
import pickle
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from vitscope.data import (
    create_dataset,
    create_loader,
    data_info,
    dataset_targets,
    list_datasets,
    parse_spec,
    steps_constant_epochs,
    subsample_per_class,
)
from vitscope.data import elpv as elpv_mod
from vitscope.data.local import CIFAR10_MEAN, CIFAR10_STD


def _all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- specs


def test_parse_spec_options_and_path():
    s = parse_spec("fake:n=32,classes=3,noise=0.5,name=abc,flag=true")
    assert s.name == "fake" and s.path is None
    assert s.options == {"n": 32, "classes": 3, "noise": 0.5, "name": "abc", "flag": True}
    s = parse_spec("cifar10:/data/c10,val_fraction=0.1", split_seed=3)
    assert s.path == "/data/c10" and s.options == {"val_fraction": 0.1, "split_seed": 3}
    assert parse_spec("fake:n=4", n=8).options == {"n": 8}  # keyword overrides the string
    assert parse_spec("Fashion-MNIST:~/x").name == "fashion_mnist"
    assert parse_spec("mnist:~/x").path == os.path.expanduser("~/x")


def test_unknown_spec_lists_valid_names():
    with pytest.raises(ValueError) as e:
        create_loader("imagenet21k:/x")
    for name in list_datasets():
        assert name in str(e.value)
    assert {"fake", "elpv", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder"} <= set(list_datasets())


@pytest.mark.parametrize("spec, match", [
    ("cifar10", "cifar10:PATH"),
    ("fake:/some/path", "takes no path"),
    ("cifar10:/a,/b", "two paths"),
    ("fake:n=4,n=5", "twice"),
    ("fake:bogus=1", "valid options"),
    ("", "non-empty"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        data_info(spec)


# ----------------------------------------------------------------------------- fake


def test_fake_is_deterministic_balanced_and_shaped():
    a = create_dataset("fake:n=40,classes=4,size=16", split="train")
    b = create_dataset("fake:n=40,classes=4,size=16", split="train")
    np.testing.assert_array_equal(a.data, b.data)
    assert a.targets == b.targets and np.bincount(a.targets).tolist() == [10] * 4
    v = create_dataset("fake:n=40,classes=4,size=16", split="val")
    assert len(v) == 10 and not np.array_equal(v.data, a.data[:10])  # other noise per split
    x, y = a[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    info = data_info("fake:n=40,classes=4,size=16")
    assert (info.num_classes, info.img_size, info.in_chans) == (4, 16, 3)
    # against the exact rational mean/variance of the uint8 train pixels / 255, per channel: numpy's float64
    # mean over non-contiguous axes adds the n pixel values (each x / 255 rounded, >= 0) one by one, within
    # (n + 2) u relative; its std (two passes) within (n + 4) u / 2 + 2 u (a second-order term from the mean's
    # error, sum d = 0, is far below u here)
    n = a.data.size // 3
    u = 2.0**-53
    for c in range(3):
        px = a.data[..., c].astype(np.int64)
        total, total_sq = int(px.sum()), int((px * px).sum())  # exact integers
        mean = Fraction(total, n * 255)
        var = Fraction(total_sq * n - total * total, n * n * 255 * 255)
        assert abs(Fraction(info.mean[c]) / mean - 1) <= (n + 2) * u
        assert abs(Fraction(info.std[c]) ** 2 / var - 1) <= 2 * ((n + 4) * u / 2 + 2 * u) + 1e-30
    xs, _ = _all_batches(create_loader("fake:n=40,classes=4,size=16", batch_size=64, shuffle=False))
    flat = xs.permute(1, 0, 2, 3).reshape(3, -1).double()  # normalised with the train stats: mean 0, std 1
    # each float32 value (x / 255 - m) / s, with x / 255, m and s rounded to float32 and a subtraction and a
    # division, is within u32 (4 |z| + 2 m / s) (+ second order: 5 for 4) of the exact z = (x - m) / s; so the
    # float64 mean within the mean of those and the population std within their largest (Minkowski)
    m_s = torch.tensor(info.mean, dtype=torch.float64) / torch.tensor(info.std, dtype=torch.float64)  # (3,)
    e = 2.0**-24 * (5 * flat.abs() + 2 * m_s[:, None])  # (3, n)
    assert (flat.mean(1).abs() <= e.mean(1) + 1e-15).all()
    assert ((flat.std(1, unbiased=False) - 1).abs() <= e.max(1).values + 1e-15).all()


def test_fake_is_learnable():
    torch.manual_seed(0)
    spec = "fake:n=200,classes=10,size=16"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in create_loader(spec, batch_size=50, seed=1):  # 4 steps
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = _all_batches(create_loader(spec, split="val", batch_size=64))
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.5, acc  # chance is 0.1


# ----------------------------------------------------------------------------- CIFAR


class _Py2Array:
    """Pickles an array the way Python 2 numpy did (raw data as a str, read back with latin1)."""

    def __init__(self, a):
        self.a = a

    def __reduce__(self):
        a = self.a
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), "b"),
                (1, a.shape, a.dtype, False, a.tobytes().decode("latin1")))


def _write_cifar(root, name="cifar10", per_batch=2, n_test=3):
    """Tiny copies in the real layout: pickled dicts with 'data' (n, 3072) uint8 and labels."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": n_test}
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch})
    else:
        folder = root / "cifar-100-python"
        files = {"train": 5 * per_batch, "test": n_test}
        meta = ("meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"k{i}" for i in range(20)]})
    folder.mkdir(parents=True)
    written = {}
    for fname, n in files.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        entry = {"batch_label": f"{fname} of 5", "data": data, "filenames": [f"img{i}.png" for i in range(n)]}
        if name == "cifar10":
            labels = rng.integers(0, 10, size=n).tolist()
            entry["labels"] = labels
        else:
            labels = rng.integers(0, 100, size=n).tolist()
            entry["fine_labels"] = labels
            entry["coarse_labels"] = [lab // 5 for lab in labels]
        if fname == "test_batch":  # as the real files, written by Python 2: numpy.core, str data
            entry["data"] = _Py2Array(data)
            (folder / fname).write_bytes(
                pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        else:
            with open(folder / fname, "wb") as f:
                pickle.dump(entry, f, protocol=2)
        written[fname] = (data, labels)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f, protocol=2)
    return folder, written


def test_cifar10_reads_the_real_layout(tmp_path):
    _, written = _write_cifar(tmp_path)
    spec = f"cifar10:{tmp_path}"
    train = create_dataset(spec, split="train", normalize=False)
    expect = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])  # (10, 3072)
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(train) == 10 and train.classes == [f"c{i}" for i in range(10)]
    x, y = _all_batches(create_loader(spec, batch_size=4, normalize=False, shuffle=False))
    assert x.shape == (10, 3, 32, 32) and y.dtype == torch.int64 and y.tolist() == labels
    # CIFAR rows are 1024 R, then 1024 G, then 1024 B values, row-major
    np.testing.assert_array_equal((x * 255).round().to(torch.uint8).numpy(), expect.reshape(10, 3, 32, 32))
    xn, _ = _all_batches(create_loader(spec, batch_size=4, shuffle=False))
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(xn, (x - mean) / std, rtol=0, atol=0)  # Normalize's own sub and div: one rounding each
    for split in ("val", "test"):  # both are the official test set
        xt, yt = _all_batches(create_loader(spec, split=split, batch_size=2, normalize=False))
        assert yt.tolist() == written["test_batch"][1]
        np.testing.assert_array_equal((xt * 255).round().byte().numpy(),
                                      written["test_batch"][0].reshape(3, 3, 32, 32))
    info = data_info(spec)
    assert (info.num_classes, info.img_size, info.mean, info.std) == (10, 32, CIFAR10_MEAN, CIFAR10_STD)
    up = create_loader(spec, img_size=48, batch_size=3, augment=True)
    assert next(iter(up))[0].shape == (3, 3, 48, 48)


def test_cifar100_fine_and_coarse(tmp_path):
    _, written = _write_cifar(tmp_path, "cifar100")
    _, y = _all_batches(create_loader(f"cifar100:{tmp_path}", batch_size=4, shuffle=False))
    assert y.tolist() == written["train"][1]
    _, yc = _all_batches(create_loader(f"cifar100:{tmp_path},labels=coarse", split="test", batch_size=4))
    assert yc.tolist() == [lab // 5 for lab in written["test"][1]]
    assert data_info(f"cifar100:{tmp_path}").num_classes == 100
    assert data_info(f"cifar100:{tmp_path},labels=coarse").num_classes == 20
    assert data_info(f"cifar100:{tmp_path},labels=coarse").class_names == tuple(f"k{i}" for i in range(20))
    assert data_info(f"cifar100:{tmp_path / 'elsewhere'}").class_names is None  # no files needed


def test_missing_cifar_file_is_named(tmp_path):
    folder, _ = _write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as e:
        create_loader(f"cifar10:{tmp_path}")
    assert os.path.join("cifar-10-batches-py", "data_batch_3") in str(e.value)
    assert "cifar-10-python.tar.gz" in str(e.value) and "download" in str(e.value)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        create_loader(f"cifar100:{tmp_path / 'nothing'}", split="test")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder, _ = _write_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": [0]}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        create_dataset(f"cifar10:{tmp_path}", split="test")


def test_val_fraction_holds_out_a_stratified_slice(tmp_path):
    _write_cifar(tmp_path, per_batch=20)  # 100 train images
    spec = f"cifar10:{tmp_path},val_fraction=0.2"
    train, val = create_dataset(spec, split="train"), create_dataset(spec, split="val")
    assert set(train.indices).isdisjoint(val.indices) and len(train) + len(val) == 100
    labels = np.array(dataset_targets(train.dataset))
    np.testing.assert_array_equal(np.sort(val.indices), subsample_per_class(labels, 0.2, seed=0))
    assert len(create_dataset(spec, split="test")) == 3


# ----------------------------------------------------------------------------- loader options


def test_loader_options():
    spec = "fake:n=60,classes=3,size=8"
    a = [y for _, y in create_loader(spec, batch_size=16, seed=5)]
    b = [y for _, y in create_loader(spec, batch_size=16, seed=5)]
    c = [y for _, y in create_loader(spec, batch_size=16, seed=6)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not all(torch.equal(u, v) for u, v in zip(a, c))
    assert [len(y) for y in a] == [16, 16, 16, 12]
    assert [len(y) for _, y in create_loader(spec, batch_size=16, drop_last=True)] == [16, 16, 16]
    ev = create_loader(spec, split="test", batch_size=100)
    assert torch.equal(next(iter(ev))[1], torch.tensor(create_dataset(spec, split="test").targets))
    assert len(create_loader(spec, batch_size=8, max_examples=10).dataset) == 10
    sub = create_loader(spec, batch_size=8, fraction=0.5, seed=1).dataset
    assert np.bincount(dataset_targets(sub)).tolist() == [10, 10, 10]
    x, _ = next(iter(create_loader(spec, batch_size=8, augment=True, normalize=False)))
    assert x.min() >= 0 and x.max() <= 1
    x, _ = next(iter(create_loader(spec, batch_size=8, img_size=12,
                                   augment={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5})))
    assert x.shape == (8, 3, 12, 12) and torch.isfinite(x).all()
    # RandAugment 'inc1' at magnitude 10 posterizes to 0 bits, which Pillow >= 11 rejects: must not raise
    x, _ = _all_batches(create_loader(spec, batch_size=30, augment={"auto_augment": "rand-m10-n6-inc1"}))
    assert x.shape == (60, 3, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="valid"):
        create_loader(spec, augment={"mixup": 0.8})
    with pytest.raises(ValueError, match="augment"):
        create_loader(spec, augment={"auto_augment": "no-such-policy"})
    with pytest.raises(ValueError, match="split"):
        create_loader(spec, split="training")


def test_default_augment_is_pad4_crop_and_flip():
    """HDVW's CIFAR augmentation: every image is its original shifted by at most 4 px (zero fill), maybe mirrored."""
    spec = "fake:n=12,classes=3,size=16"
    orig = torch.from_numpy(create_dataset(spec).data).permute(0, 3, 1, 2).float() / 255  # (12, 3, 16, 16)
    torch.manual_seed(0)
    aug, _ = _all_batches(create_loader(spec, batch_size=12, augment=True, normalize=False, shuffle=False))
    padded = torch.nn.functional.pad(orig, (4, 4, 4, 4))  # (12, 3, 24, 24)
    moved = 0
    for i in range(12):
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                if torch.equal(aug[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 16, dx:dx + 16]))]
        assert hits, f"image {i} is not a padded crop of its original"
        moved += (4, 4, False) not in hits
    assert moved >= 6  # the crops really move (a chance of about 1 / 162 per image to stay put)


def test_distributed_sampler(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = create_loader("fake:n=20,classes=2,size=8", batch_size=4, distributed=True, seed=3)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert loader.sampler.seed == 3 and loader.sampler.shuffle
        assert sum(len(y) for _, y in loader) == 20
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- subsampling


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_subsample_per_class_keeps_fractions(fraction):
    labels = np.repeat(np.arange(5), [40, 80, 20, 100, 7])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    idx = subsample_per_class(labels, fraction, seed=3)
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    counts = np.bincount(labels[idx], minlength=5)
    expect = {0.1: [4, 8, 2, 10, 1], 0.25: [10, 20, 5, 25, 1], 0.5: [20, 40, 10, 50, 3], 1.0: [40, 80, 20, 100, 7]}
    assert counts.tolist() == expect[fraction]  # floor(fraction * n_c), at least 1
    np.testing.assert_array_equal(idx, subsample_per_class(labels, fraction, seed=3))
    if fraction < 1:
        assert not np.array_equal(idx, subsample_per_class(labels, fraction, seed=4))
        assert set(idx.tolist()) < set(subsample_per_class(labels, min(1.0, 2 * fraction), seed=3).tolist())
    assert subsample_per_class(np.repeat([0, 1], 10), 0.3).size == 6  # 0.3 * 10 is not floored to 2
    with pytest.raises(ValueError):
        subsample_per_class(labels, 0.0)


def test_steps_constant_epochs():
    assert steps_constant_epochs(300, 0.1) == 3000
    assert steps_constant_epochs(300, 1.0) == 300
    assert steps_constant_epochs(100, 0.3) == 334
    n, batch = 50000, 100
    for f in (0.05, 0.1, 0.25, 0.5):  # optimisation steps match the full-data run within one epoch's worth
        steps = steps_constant_epochs(300, f) * (round(n * f) // batch)
        assert abs(steps - 300 * n // batch) <= round(n * f) // batch
    with pytest.raises(ValueError):
        steps_constant_epochs(300, 1.5)


# ----------------------------------------------------------------------------- elpv


def _elpv_labels_csv():
    """Probabilities and types read independently of vitscope from the package's labels.csv."""
    import elpv_dataset

    path = os.path.join(os.path.dirname(elpv_dataset.__file__), "data", "labels.csv")
    rows = [line.split() for line in open(path) if line.strip()]
    return np.array([float(r[1]) for r in rows]), np.array([r[2] for r in rows])


def test_elpv_split_is_stratified_disjoint_complete_and_fixed():
    probs, types = _elpv_labels_csv()
    assert len(probs) == 2624
    split = elpv_mod.elpv_split_indices(probs, types)
    assert [len(split[s]) for s in ("train", "val", "test")] == [1836, 394, 394]
    allidx = np.concatenate(list(split.values()))
    assert len(allidx) == 2624 and set(allidx.tolist()) == set(range(2624))  # disjoint and complete
    again = elpv_mod.elpv_split_indices(probs, types)
    assert all(np.array_equal(split[s], again[s]) for s in split)
    other = elpv_mod.elpv_split_indices(probs, types, split_seed=1)
    assert not np.array_equal(split["val"], other["val"])
    levels = np.rint(probs * 3).astype(int)
    for s, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        for lev in range(4):
            for t in ("mono", "poly"):
                n_stratum = np.sum((levels == lev) & (types == t))
                n_here = np.sum((levels[split[s]] == lev) & (types[split[s]] == t))
                assert abs(n_here - frac * n_stratum) <= 1, (s, lev, t)


def test_elpv_missing_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    with pytest.raises(ImportError, match=r'pip install "vitscope\[elpv\]"'):
        elpv_mod.cache_path(16)


@pytest.fixture(scope="module")
def elpv_cache(tmp_path_factory):
    """Decode the real package once into a temporary cache at 16 px (measured: ~13 s on 2 cores)."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("vitscope_cache")
    mp.setenv("VITSCOPE_CACHE", str(cache))
    elpv_mod._MEMO.clear()
    t0 = time.perf_counter()
    arrays = elpv_mod.load_elpv_arrays(16)
    yield cache, arrays, time.perf_counter() - t0
    elpv_mod._MEMO.clear()
    mp.undo()


def test_elpv_loads_real_images_and_reuses_the_cache(elpv_cache, monkeypatch):
    cache, (images, probs, types), _ = elpv_cache
    path = elpv_mod.cache_path(16)
    assert path.parent.parent == cache and path.exists()
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]  # atomic: no leftovers
    assert images.shape == (2624, 16, 16) and images.dtype == np.uint8
    ref_probs, ref_types = _elpv_labels_csv()
    np.testing.assert_array_equal(probs, ref_probs)
    np.testing.assert_array_equal(types, ref_types)
    # first image, resized independently with PIL's antialiased bilinear filter: close to ours
    import elpv_dataset

    first = os.path.join(os.path.dirname(elpv_dataset.__file__), "data", "images", "cell0001.png")
    ref = np.asarray(Image.open(first).resize((16, 16), Image.BILINEAR), dtype=np.float64)
    assert np.abs(images[0] - ref).mean() < 3.0

    # the cache is reused: no decoding at all (the loader would raise) and the file is untouched
    mtime = path.stat().st_mtime_ns
    elpv_mod._MEMO.clear()

    def _no_decode(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr("elpv_dataset.utils.load_dataset", _no_decode)
    images2, _, _ = elpv_mod.load_elpv_arrays(16)
    np.testing.assert_array_equal(images2, images)
    assert path.stat().st_mtime_ns == mtime

    split = elpv_mod.elpv_split_indices(ref_probs, ref_types)
    for s in ("train", "val", "test"):
        x, y = _all_batches(create_loader("elpv", split=s, img_size=16, batch_size=1024, normalize=False,
                                         shuffle=False))
        assert x.shape == (len(split[s]), 3, 16, 16)
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray repeated
        np.testing.assert_array_equal((x[:, 0] * 255).round().byte().numpy(), images[split[s]])
        assert y.tolist() == (ref_probs[split[s]] >= 0.5).astype(int).tolist()
    _, yl = _all_batches(create_loader("elpv:labels=levels", split="val", img_size=16, batch_size=1024))
    assert set(yl.tolist()) == {0, 1, 2, 3}
    assert yl.tolist() == np.rint(ref_probs[split["val"]] * 3).astype(int).tolist()
    info = data_info("elpv", img_size=16)
    train_pix = images[split["train"]].astype(np.float64) / 255
    assert info.num_classes == 2 and info.img_size == 16 and info.class_names == ("functional", "defective")
    # elpv's stats come from exact integer sums: the mean is total / n / 255 (two roundings, 2 u of the exact
    # rational), the std sqrt((exact integer) / n^2) / 255 (three roundings and a square root: 3 u, so its
    # square within 2 (3 u) + second order); numpy's float64 route is the independent check on the value
    px = images[split["train"]].astype(np.int64)
    n, total, total_sq = px.size, int(px.sum()), int((px * px).sum())
    u = 2.0**-53
    for c in range(3):
        assert abs(Fraction(info.mean[c]) / Fraction(total, n * 255) - 1) <= 2 * u
        var = Fraction(total_sq * n - total * total, n * n * 255 * 255)
        assert abs(Fraction(info.std[c]) ** 2 / var - 1) <= 7 * u
    # numpy's pairwise float64 sums, blocked: within n u relative even summed one by one
    np.testing.assert_allclose(info.mean, (train_pix.mean(),) * 3, rtol=(n + 4) * u, atol=0)
    assert data_info("elpv:labels=levels", img_size=16).num_classes == 4
    mono = create_dataset("elpv:types=mono", split="test", img_size=16)
    assert len(mono) == int(np.sum(ref_types[split["test"]] == "mono"))


def test_elpv_corrupt_cache_is_rebuilt(elpv_cache, monkeypatch):
    _, (images, probs, types), _ = elpv_cache
    monkeypatch.setattr("elpv_dataset.utils.load_dataset", lambda: (np.repeat(images, 2, 1).repeat(2, 2), probs, types))
    path = elpv_mod.cache_path(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a zip file")  # e.g. a truncated write by another tool
    elpv_mod._MEMO.clear()
    small, _, _ = elpv_mod.load_elpv_arrays(8)
    assert small.shape == (2624, 8, 8)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["images"], small)


def test_a_parsed_spec_is_taken_as_it_is_and_written_back(tmp_path):
    """Parse once at the edge: every data function takes the DataSpec, and gives what the string gives."""
    from vitscope.data import DataSpec, parse_spec

    spec = parse_spec("fake:n=40,classes=4,size=8")
    assert isinstance(spec, DataSpec) and parse_spec(spec) is spec and str(spec) == "fake:n=40,classes=4,size=8"
    assert parse_spec(str(spec)) == spec and parse_spec(spec, n=20).options["n"] == 20
    assert data_info(spec) == data_info("fake:n=40,classes=4,size=8")
    x, y = _all_batches(create_loader(spec, split="val", batch_size=7))
    x2, y2 = _all_batches(create_loader(str(spec), split="val", batch_size=7))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_one_preprocessing_resolver():
    """data.preprocessing.resolve_preprocessing: a run's record (bilinear, crop 1.0 where it says nothing; its
    own size kept), the model's pretrained_cfg at the network's size, the data set's; overrides on top, listed."""
    import timm

    from vitscope.data.preprocessing import resolve_preprocessing

    run = resolve_preprocessing("run", recorded={"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 48, 48]},
                                img_size=32)
    assert run == {"input_size": (3, 48, 48), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3,
                   "crop_pct": 1.0, "crop_mode": "center", "source": "run", "overridden": []}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    cfg = model.pretrained_cfg
    pre = resolve_preprocessing("model", model=model, img_size=64, overrides={"std": (1.0, 1.0, 1.0), "mean": None})
    assert pre["input_size"] == (3, 64, 64) and pre["mean"] == tuple(cfg["mean"]) and pre["std"] == (1.0,) * 3
    assert pre["crop_pct"] == cfg["crop_pct"] and pre["interpolation"] == cfg["interpolation"]
    assert pre["overridden"] == ["std"] and pre["source"] == "model"
    data = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3), "std": (1, 2, 3),
            "crop_pct": 0.875, "crop_mode": "center"}
    assert resolve_preprocessing("data", data=data)["std"] == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        resolve_preprocessing("data", data=data, overrides={"resize": 3})
    with pytest.raises(ValueError, match="must be 'model', 'data' or 'run'"):
        resolve_preprocessing("auto")
