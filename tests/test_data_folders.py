"""Tests for vitscope.data's folder readers on files written here: MNIST's raw idx layout and ImageFolder (both
layouts, corrupt and non-image files, links, decompression bombs, timm's ImageNet class order)."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vitscope.data import (
    create_dataset,
    create_loader,
    data_info,
)


def _all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)



# ----------------------------------------------------------------------------- MNIST, ImageFolder


def _write_idx(root, folder, prefix, images, labels):
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_raw_layout_to_three_channels(tmp_path, name, folder):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path, folder, "t10k", imgs, labels)
    with pytest.raises(FileNotFoundError, match=f"{folder}/raw/train-images-idx3-ubyte"):
        create_dataset(f"{name}:{tmp_path}", split="test")
    _write_idx(tmp_path, folder, "train", imgs[::-1].copy(), labels[::-1].copy())
    x, y = _all_batches(create_loader(f"{name}:{tmp_path}", split="test", batch_size=2, normalize=False))
    assert x.shape == (5, 3, 28, 28) and y.tolist() == labels.tolist()
    for c in range(3):
        np.testing.assert_array_equal((x[:, c] * 255).round().byte().numpy(), imgs)
    assert data_info(f"{name}:{tmp_path}").img_size == 28


def _write_imagefolder(root, classes=("cat", "dog"), per_class=3, size=8):
    rng = np.random.default_rng(2)
    written = {}
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
                written[(split, c, i)] = arr
    return written


def test_imagefolder_png(tmp_path):
    written = _write_imagefolder(tmp_path)
    spec = f"imagefolder:{tmp_path},crop_pct=1.0"
    info = data_info(spec)
    assert info.class_names == ("cat", "dog") and info.num_classes == 2 and info.img_size == 224
    x, y = _all_batches(create_loader(spec, split="test", img_size=8, batch_size=4, normalize=False))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]  # test falls back to val/
    expect = np.stack([written[("val", c, i)] for c in ("cat", "dog") for i in range(3)]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal((x * 255).round().byte().numpy(), expect)
    xa, _ = next(iter(create_loader(spec, img_size=16, batch_size=6, augment=True)))
    assert xa.shape == (6, 3, 16, 16)
    (tmp_path / "val" / "cat").rename(tmp_path / "val" / "cow")
    with pytest.raises(ValueError, match="classes"):
        create_dataset(spec, split="val")
    with pytest.raises(FileNotFoundError, match="train"):
        data_info(f"imagefolder:{tmp_path / 'none'}")


def _write_flat(root, classes, per_class=2, size=8, value=None):
    """Class folders directly under ``root`` (an ImageNet val folder's layout); ``value(c)`` paints class c."""
    rng = np.random.default_rng(3)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) if value is None else \
                np.full((size, size, 3), value(c), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_flat_layout_is_one_split_for_every_split(tmp_path, caplog):
    _write_flat(tmp_path, ("zebra", "ant", "moth"))
    spec = f"imagefolder:{tmp_path},crop_pct=1.0"
    info = data_info(spec)
    assert info.class_names == ("ant", "moth", "zebra") and info.num_classes == 3  # sorted folder names
    ys = {s: _all_batches(create_loader(spec, split=s, img_size=8, batch_size=4, shuffle=False))[1].tolist()
          for s in ("train", "val", "test")}
    assert ys["val"] == ys["test"] == ys["train"] == [0, 0, 1, 1, 2, 2]
    assert "used as train, val and test alike" in caplog.text
    held = create_dataset(f"{spec},val_fraction=0.5", split="val", img_size=8)  # a seeded slice per class
    assert len(held) == 3


def test_imagefolder_skips_non_image_and_corrupt_files_with_a_count(tmp_path, caplog):
    _write_flat(tmp_path, ("a", "b"), per_class=3)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "b" / "garbage.jpg").write_bytes(os.urandom(300))
    good = (tmp_path / "b" / "0.png").read_bytes()
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "b" / "truncated.png")
    data = (tmp_path / "b" / "truncated.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    assert Image.open(tmp_path / "b" / "0.png").size == (8, 8) and good
    spec = f"imagefolder:{tmp_path},crop_pct=1.0"
    with caplog.at_level("WARNING"):
        ds = create_dataset(spec, split="val", img_size=8)
        assert len(ds) == 7  # 3 + 3 good + the truncated one, whose header reads fine
        assert "skipped 1 non-image file(s)" in caplog.text and "2 unreadable image(s)" in caplog.text
        x, y = _all_batches(create_loader(spec, split="val", img_size=8, batch_size=4))  # no crash mid-run
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert "skipped unreadable image" in caplog.text and "truncated.png" in caplog.text
    unchecked = f"{spec},check=false"  # no header scan: the bad files fail when loaded, and are dropped then
    assert len(create_dataset(unchecked, split="val", img_size=8)) == 9
    x, y = _all_batches(create_loader(unchecked, split="val", img_size=8, batch_size=5))
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="every image of a batch of 1 was unreadable"):  # nothing left to yield
        _all_batches(create_loader(unchecked, split="val", img_size=8, batch_size=1))


def test_imagefolder_directory_links_are_followed_once_loops_and_links_across_classes_refused(tmp_path, caplog):
    """12 PNGs in a/ and b/; `b/up -> ..` (a loop) and `b/alias -> ../a` (a link across classes) add nothing and
    relabel nothing; a link to a folder outside the tree is read once, as the class it sits in."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    _write_flat(root, ("a", "b"), per_class=6, value=lambda c: 40 if c == "a" else 200)
    _write_flat(outside, ("extra",), per_class=2, value=lambda c: 120)
    os.symlink("..", root / "b" / "up")  # the loop of the adversarial test: read as 492 examples before
    os.symlink("../a", root / "b" / "alias")
    os.symlink(outside / "extra", root / "a" / "more")  # a data set assembled with a link: followed
    os.symlink(outside / "extra", root / "b" / "again")  # the same folder a second time: refused
    spec = f"imagefolder:{root},crop_pct=1.0"
    with caplog.at_level("WARNING"):
        ds = create_dataset(spec, split="val", img_size=8)
    assert len(ds) == 14 and sum(1 for _, y in ds.samples if y == 0) == 8
    assert all(("/b/" in p) == (y == 1) and "/up/" not in p and "/alias/" not in p for p, y in ds.samples)
    assert "did not follow 3 directory link(s)" in caplog.text
    x, y = _all_batches(create_loader(spec, split="val", img_size=8, batch_size=5, normalize=False))
    values = (x[:, 0, 0, 0] * 255).round().long().tolist()
    assert y.tolist() == [0] * 8 + [1] * 6 and sorted(set(values[8:])) == [200]  # class b holds only b's images


def _png_claiming(path, width, height):
    """A tiny PNG (a few hundred bytes) whose header declares width x height pixels: a decompression bomb."""
    import struct
    import zlib

    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))


def test_imagefolder_skips_decompression_bombs_and_images_over_max_pixels(tmp_path, caplog):
    _write_flat(tmp_path, ("a", "b"), per_class=2, size=8)
    _png_claiming(tmp_path / "a" / "bomb.png", 60000, 60000)
    assert (tmp_path / "a" / "bomb.png").stat().st_size < 1000
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "b" / "big.png")  # 256 pixels
    spec = f"imagefolder:{tmp_path},crop_pct=1.0"
    with caplog.at_level("WARNING"):
        ds = create_dataset(spec, split="val", img_size=8)
        assert len(ds) == 5 and "1 unreadable image(s); e.g." in caplog.text and "bomb.png" in caplog.text
        assert "non-image" not in caplog.text  # only what was skipped is said
        caplog.clear()
        ds = create_dataset(f"{spec},max_pixels=100", split="val", img_size=8)  # the 16 x 16 image is over it
        assert len(ds) == 4 and "2 unreadable image(s)" in caplog.text
        assert any("max_pixels=100" in why for _, why in ds.skipped)
        caplog.clear()
        x, y = _all_batches(create_loader(f"{spec},max_pixels=100,check=false", split="val", img_size=8,
                                          batch_size=3))  # no header scan: refused when loaded, and dropped
    assert y.tolist() == [0, 0, 1, 1] and caplog.text.count("skipped unreadable image") == 2
    for bad in ("max_pixels=0", "max_pixels=1.5", "max_pixels=x"):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            create_dataset(f"{spec},{bad}", split="val", img_size=8)


def test_imagefolder_class_order_is_timms_imagenet_order(tmp_path):
    """Sorted synset folders = timm's ImageNet-1k indices (all 1000); labels=imagenet maps a subset to them, so
    a 1000-class model's top-1 on such a folder counts against the right indices."""
    from timm.data import ImageNetInfo

    from vitscope.data.local import imagenet_synsets
    from vitscope.robustness import evaluate_robustness

    synsets = list(ImageNetInfo().label_names())
    assert len(synsets) == 1000 and sorted(synsets) == synsets == imagenet_synsets()
    picked = [synsets[i] for i in (999, 1, 417, 0)]  # n15075141, n01443537, n02782093, n01440764
    _write_flat(tmp_path, picked, value=lambda c: synsets.index(c) % 256)
    folders = data_info(f"imagefolder:{tmp_path}")
    assert folders.class_names == tuple(sorted(picked)) and folders.num_classes == 4
    spec = f"imagefolder:{tmp_path},labels=imagenet,crop_pct=1.0"
    info = data_info(spec)
    assert info.num_classes == 1000 and info.class_names == tuple(synsets)
    loader = create_loader(spec, split="val", img_size=8, batch_size=3, normalize=False)
    _, y = _all_batches(loader)
    assert sorted(set(y.tolist())) == [0, 1, 417, 999]

    class ByColour(torch.nn.Module):  # an "ImageNet model" that knows each class by its colour
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            code = (x[:, 0, 0, 0] * 255).round().long()  # (B,)
            index = torch.tensor([synsets.index(c) for c in picked])
            cls = index[(index % 256)[None, :].eq(code[:, None]).float().argmax(1)]
            return torch.nn.functional.one_hot(cls, 1000).float() * 10 + self.w

    acc = evaluate_robustness(ByColour(), loader, (), mean=(0, 0, 0), std=(1, 1, 1), progress=False)["clean"]
    assert acc["accuracy"] == 1.0 and acc["n"] == 8
    plain = create_loader(f"imagefolder:{tmp_path},crop_pct=1.0", split="val", img_size=8, batch_size=3,
                          normalize=False)
    wrong = evaluate_robustness(ByColour(), plain, (), mean=(0, 0, 0), std=(1, 1, 1), progress=False)["clean"]
    assert wrong["accuracy"] == 0.5  # folder indices 0..3: only n01440764 (0) and n01443537 (1) land right
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="labels=imagenet needs ImageNet-1k synset folder names"):
        data_info(spec)
