"""Common corruptions: shape/dtype/range, monotone severity, references (scipy, matplotlib, PIL); CIFAR-C files."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from vitscope.robustness import CORRUPTIONS, corrupt, corruption_params, load_cifar_c

U = 2.0**-53
U32 = 2.0**-24


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=32, mode="bilinear")
    x = 0.6 * smooth + 0.3 * torch.rand(4, 3, 32, 32, generator=g) + 0.05  # structure + texture in [0.05, 0.95]
    x[0, :, :4, :4] = 0.0  # a black corner (brightness' V = 0 case)
    return x


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_shape_range_and_monotone_severity(images: torch.Tensor, name: str, table: str) -> None:
    x = images if table == "cifar" else torch.nn.functional.interpolate(images[:1], size=224, mode="bilinear")
    dists = []
    for severity in range(1, 6):
        out = corrupt(x, name, severity, seed=0, table=table)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
        dists.append((out - x).abs().mean().item())
    assert dists[0] > 0
    # (On pixel-scale texture ImageNet-C's pixelate can break this from severity 4 to 5: scale 0.25 gives
    # aligned 4x4 BOX blocks, 0.3 misaligned ones; PIL behaves the same. Smooth images like these keep it.)
    steps = list(zip(dists, dists[1:]))
    assert all(b > a for a, b in steps), dists


def test_seeded_and_batch_independent_for_deterministic_ones(images: torch.Tensor) -> None:
    a = corrupt(images, "gaussian_noise", 3, seed=1)
    assert torch.equal(a, corrupt(images, "gaussian_noise", 3, seed=1))
    assert not torch.equal(a, corrupt(images, "gaussian_noise", 3, seed=2))
    for name in ("gaussian_blur", "defocus_blur", "contrast", "brightness", "pixelate", "jpeg_compression"):
        # per-image operations (depthwise convolutions, per-image matmuls and means, per-pixel maps, one JPEG per
        # image): the same arithmetic for an image in any batch, bit for bit
        assert torch.equal(corrupt(images, name, 4)[1:3], corrupt(images[1:3], name, 4)), name


def test_noise_statistics(images: torch.Tensor) -> None:
    # n = 24576 draws each (fixed seed, so deterministic); every check within 4 standard errors of its estimate (a
    # std 2%, a mean 0.6%, a variance 6% or a rate 10% off fails; float32's ~1e-7 is far below them). Were rel 3%,
    # abs 0.005, rel 5%, abs 0.006: 6.6, 7.8, 5.5 and 3.7 SEs
    mid = torch.full((8, 3, 32, 32), 0.5)
    n = mid.numel()
    diff = corrupt(mid, "gaussian_noise", 5, table="cifar") - mid  # std 0.10, no clipping at 0.5 +- 5 sigma
    assert abs(diff.std().item() - 0.10) <= 4 * 0.10 / math.sqrt(2 * (n - 1))  # SE of a normal sample's std
    shot = corrupt(mid, "shot_noise", 5, table="cifar")  # Poisson(0.5 * 50) / 50: mean 0.5, var 0.5 / 50
    assert abs(shot.mean().item() - 0.5) <= 4 * math.sqrt(0.01 / n)
    # the sample variance's SE: var sqrt(2 / (n - 1) + kappa / n), kappa = 1 / 25 Poisson(25)'s excess kurtosis
    assert abs(shot.var().item() - 0.01) <= 4 * 0.01 * math.sqrt(2 / (n - 1) + 1 / 25 / n)
    imp = corrupt(mid, "impulse_noise", 5, table="cifar")  # 7% of values set to 0 or 1
    flipped = imp != mid
    assert abs(flipped.float().mean().item() - 0.07) <= 4 * math.sqrt(0.07 * 0.93 / n)  # binomial SE
    assert set(imp[flipped].unique().tolist()) == {0.0, 1.0}


def test_blurs_match_scipy(images: torch.Tensor) -> None:
    x = images.double()
    for severity in (1, 5):
        sigma = corruption_params("gaussian_blur", severity, "imagenet")
        ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        out = corrupt(x, "gaussian_blur", severity, table="imagenet")
        # two passes of K = 2 r + 1 weights >= 0 summing to 1 on pixels in [0, 1], in float64: each weight within
        # (3 E + K + 2) u (the exponent E <= 8 at 4 sigma, exp, the K-term sum, the division), each pass's dot
        # product within K u of max|x| (gamma_K), passes do not amplify (weights sum to 1): per side
        # 2 (K + 26 + K + 2) u, twice (scipy's order and weights differ); clipping only shrinks differences
        k = 2 * int(4.0 * sigma + 0.5) + 1
        assert np.abs(out.numpy() - np.clip(ref, 0, 1)).max() <= 2 * 2 * (2 * k + 28) * U
    for table, severity in (("cifar", 1), ("cifar", 5), ("imagenet", 2), ("imagenet", 5)):
        radius, alias = corruption_params("defocus_blur", severity, table)
        # ImageNet-C's disk(): aliased disk on a fixed grid, cv2.GaussianBlur (reflect-101), cv2.filter2D.
        grid = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
        ksize = 3 if radius <= 8 else 5
        xx, yy = np.meshgrid(grid, grid)
        disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
        disk /= disk.sum()
        t = np.arange(ksize) - ksize // 2
        g = np.exp(-(t**2) / (2 * alias**2))
        g /= g.sum()
        disk = ndimage.correlate1d(ndimage.correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
        ref = np.stack([[ndimage.correlate(ch, disk, mode="mirror") for ch in img] for img in x.numpy()])
        out = corrupt(x, "defocus_blur", severity, table=table)
        # the disk / its count is the same quotient both sides; the k-tap Gaussian's weights within (3 E + k + 2) u
        # (E <= (k // 2)^2 / (2 alias^2) its largest exponent), two k-tap passes over the kernel (weights summing to
        # 1, each within k u): its entries (summing to 1) within 2 (3 E + 2 k + 2) u in l1; then an L x L
        # correlation of pixels in [0, 1] with weights >= 0 within L^2 u: per side (L^2 + 2 (3 E + 2 k + 2)) u, twice
        e = (ksize // 2) ** 2 / (2 * alias**2)
        assert np.abs(out.numpy() - np.clip(ref, 0, 1)).max() <= 2 * (len(grid) ** 2 + 2 * (3 * e + 2 * ksize + 2)) * U


def test_brightness_contrast_match_references(images: torch.Tensor) -> None:
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    x = images.double()
    for severity in (1, 5):
        shift = corruption_params("brightness", severity, "cifar")
        hsv = rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        ref = hsv_to_rgb(hsv).transpose(0, 3, 1, 2)
        # HSV is homogeneous in V: both scale a pixel by V' / V (V' = clip(V + shift) the same float both sides, V the
        # channel max, exact). Ours: two roundings, 2 u x'. matplotlib's hsv_to_rgb returns V' for the max channel,
        # V' (1 - S) for the min (S = delta / V: 3 u V'), V' (1 - S f) for the middle, f = frac(6 H) carrying H's
        # roundings ((g - b) / delta, + k, / 6: ~2 u in 6 H) and its own (6 H up to 6: 6 u), so within 12 u V'
        # with the products: within 14 u of each other (V' <= 1); black pixels (V = 0) are V' exactly both sides
        assert np.abs(corrupt(x, "brightness", severity).numpy() - ref).max() <= 14 * U
        c = corruption_params("contrast", severity, "cifar")
        xn = x.numpy()
        means = xn.mean(axis=(2, 3), keepdims=True)
        # the per-image means of m = 1024 pixels in [0, 1] in torch's and numpy's orders: each within m u of the
        # exact one (gamma_m); (x - mean) c + mean moves by |1 - c| times that, plus each side's three roundings
        # (u |x - mean|, u |x - mean| c, u |out|, all <= 1 + c)
        dm = 2 * 1024 * U * means.max()
        bound = dm * abs(1 - c) + 2 * 3 * U * (1 + c)
        assert np.abs(corrupt(x, "contrast", severity).numpy() - np.clip((xn - means) * c + means, 0, 1)).max() <= bound


def test_pixelate_and_jpeg_match_pil(images: torch.Tensor) -> None:
    from PIL import Image

    u8 = (images * 255).round().to(torch.uint8)
    x = u8.float() / 255
    for severity in (1, 3, 5):
        scale = corruption_params("pixelate", severity, "cifar")
        quality = corruption_params("jpeg_compression", severity, "cifar")
        pix, jpg = [], []
        for img in u8.permute(0, 2, 3, 1).numpy():
            pil = Image.fromarray(img)
            small = int(32 * scale)
            pix.append(np.array(pil.resize((small, small), Image.BOX).resize((32, 32), Image.BOX)))
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=quality)
            jpg.append(np.array(Image.open(buf)))
        pix_ref = torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).float() / 255
        # PIL rounds its small image and its result to uint8 (0.5 grey level each; the upsampling's weights sum to 1,
        # so the first carries through at most 0.5) after sums with 22-bit fixed-point weights (each within 2^-23 of
        # its own: m 2^-23 per pass, m <= ceil(32 / small) + 1 taps); ours sums in float32 with weights 1 / m
        # rounded (u32 / 2 each, m terms: (m + 1) u32 per matmul, four matmuls), and each side's / 255 rounds (u32 / 2)
        m = math.ceil(32 / int(32 * scale)) + 1
        bound = 1 / 255 + 2 * m * 2.0**-23 + (4 * (m + 1) + 1) * U32
        assert (corrupt(x, "pixelate", severity) - pix_ref).abs().max() <= bound
        # both libjpeg-turbo at the same quality (standard tables, 4:2:0, the integer DCT): the same grey levels
        jpg_ref = torch.from_numpy(np.stack(jpg)).permute(0, 3, 1, 2)
        assert torch.equal((corrupt(x, "jpeg", severity) * 255).round().to(torch.uint8), jpg_ref)


def test_bad_input(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown corruption 'fog'; valid names: gaussian_noise, shot_noise"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
        corrupt(images, "contrast", 6)
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space"):
        corrupt(images * 255, "contrast", 1)
    with pytest.raises(ValueError, match="table must be one of"):
        corrupt(images, "contrast", 1, table="tiny")


def test_load_cifar_c(tmp_path) -> None:
    rng = np.random.default_rng(0)
    block = 6
    data = rng.integers(0, 256, size=(5 * block, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(rng.integers(0, 10, size=block), 5).astype(np.uint8)  # as released: uint8, repeated
    np.save(tmp_path / "gaussian_noise.npy", data)
    np.save(tmp_path / "labels.npy", labels)
    ds = load_cifar_c(tmp_path, "gaussian_noise", 3)
    assert len(ds) == block
    for i in range(block):
        img, label = ds[i]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        np.testing.assert_array_equal((img * 255).round().byte().permute(1, 2, 0).numpy(), data[2 * block + i])
        assert label == labels[2 * block + i]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64
    with pytest.raises(ValueError, match="unknown CIFAR-C corruption 'gauss'.*present in"):
        load_cifar_c(tmp_path, "gauss", 1)
    with pytest.raises(FileNotFoundError, match="fog.npy not found"):
        load_cifar_c(tmp_path, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        load_cifar_c(tmp_path, "gaussian_noise", 0)
    np.save(tmp_path / "shot_noise.npy", np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain .npy array"):  # never unpickled
        load_cifar_c(tmp_path, "shot_noise", 1)
    np.save(tmp_path / "contrast.npy", data[:, :, :, :1])
    with pytest.raises(ValueError, match=r"should be \(5 N, H, W, 3\) uint8"):
        load_cifar_c(tmp_path, "contrast", 1)
