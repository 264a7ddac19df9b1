"""Common corruptions in the style of ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich 2019), in torch.

``corrupt(images, name, severity)`` works on a batch (B, C, H, W) in [0, 1], on any device, seeded.
Parameters are the published tables of ``make_cifar_c.py`` (``table="cifar"``) and ``make_imagenet_c.py``
(``table="imagenet"``); by default the CIFAR table is used for images up to 64 px, ImageNet's above:

================  =======================================  ==========================================
name              CIFAR-10-C (severity 1..5)               ImageNet-C (severity 1..5)
================  =======================================  ==========================================
gaussian_noise    std .04 .06 .08 .09 .10                  .08 .12 .18 .26 .38
shot_noise        photons/unit 500 250 100 75 50           60 25 12 5 3
impulse_noise     s&p fraction .01 .02 .03 .05 .07         .03 .06 .09 .17 .27
gaussian_blur     sigma .4 .6 .7 .8 1                      1 2 3 4 6
defocus_blur      (disk radius, alias sigma) (.3,.4)       (3,.1) (4,.5) (6,.5) (8,.5) (10,.5)
                  (.4,.5) (.5,.6) (1,.2) (1.5,.1)
contrast          factor .75 .5 .4 .3 .15                  .4 .3 .2 .1 .05
brightness        HSV value + .05 .1 .15 .2 .3             .1 .2 .3 .4 .5
pixelate          scale .95 .9 .85 .75 .65                 .6 .5 .4 .3 .25
jpeg_compression  quality 80 65 58 50 40                   25 18 15 10 7
================  =======================================  ==========================================

Differences from the reference scripts: they work on uint8 PIL images one at a time with numpy's
global RNG; here images stay float (only JPEG quantizes to uint8), noise comes from a CPU
``torch.Generator`` seeded by ``seed``, blur sigmas and disk radii are in pixels whatever the
resolution (as in the references), and pixelate reproduces PIL's BOX resampling weights in float.
Brightness adds to the HSV value with hue and saturation fixed, which is exactly ``x * V' / V`` per
pixel (gray ``V'`` where ``V = 0``). Note: on pixel-scale texture, ImageNet-C's pixelate changes images
slightly less at severity 5 (scale 0.25: aligned 4x4 blocks) than at 4 (0.3: misaligned), in PIL too.
The other ImageNet-C types (glass, motion, zoom blur, snow, frost, fog, elastic) need ImageMagick or
image assets and are not reimplemented: use ``load_cifar_c`` with the released files for the full
benchmark.

``load_cifar_c(path, name, severity)`` reads the released CIFAR-10-C / CIFAR-100-C ``.npy`` files
(``PATH/<name>.npy``: (50000, 32, 32, 3) uint8, severities 1..5 stacked in blocks of 10,000;
``PATH/labels.npy``) without unpickling anything.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vitscope.robustness._checks import check_images

_logger = logging.getLogger(__name__)

__all__ = ["CORRUPTIONS", "CIFAR_C_NAMES", "corrupt", "corruption_params", "load_cifar_c", "CIFARCDataset"]

_TABLES: dict[str, dict[str, list]] = {
    "cifar": {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "jpeg_compression": [80, 65, 58, 50, 40],
    },
    "imagenet": {
        "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
        "shot_noise": [60, 25, 12, 5, 3],
        "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
        "gaussian_blur": [1, 2, 3, 4, 6],
        "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
        "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
        "jpeg_compression": [25, 18, 15, 10, 7],
    },
}

CORRUPTIONS: tuple[str, ...] = tuple(_TABLES["cifar"])
_ALIASES = {"gaussian": "gaussian_noise", "shot": "shot_noise", "impulse": "impulse_noise", "jpeg": "jpeg_compression"}

CIFAR_C_NAMES: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)


def _canonical(name: str) -> str:
    key = _ALIASES.get(name, name)
    if key not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    return key


def _check_severity(severity: int) -> int:
    if int(severity) != severity or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def corruption_params(name: str, severity: int, table: str = "cifar") -> float | tuple:
    """The parameter of corruption ``name`` at ``severity`` (1..5) in ``table`` ('cifar' or 'imagenet')."""
    if table not in _TABLES:
        raise ValueError(f"table must be one of {sorted(_TABLES)}, got {table!r}")
    return _TABLES[table][_canonical(name)][_check_severity(severity) - 1]


# ---------------------------------------------------------------- the corruptions, (B, C, H, W) -> same


def _gaussian_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen).to(x)
    return x + std * noise


def _shot_noise(x: torch.Tensor, photons: float, gen: torch.Generator) -> torch.Tensor:
    counts = torch.poisson(x.detach().cpu().double() * photons, generator=gen)  # (B, C, H, W)
    return (counts / photons).to(x)


def _impulse_noise(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    # skimage.util.random_noise(mode="s&p", salt_vs_pepper=0.5): each value flipped w.p. amount,
    # to 1 or 0 with equal chance.
    flipped = (torch.rand(x.shape, generator=gen) <= amount).to(x.device)
    salted = (torch.rand(x.shape, generator=gen) <= 0.5).to(x.device)
    out = torch.where(flipped & salted, torch.ones_like(x), x)
    return torch.where(flipped & ~salted, torch.zeros_like(x), out)


def _conv_depthwise(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel with the odd-sized 2-D ``kernel`` (kh, kw) under ``mode`` padding."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    if mode == "reflect" and (ph >= x.shape[-2] or pw >= x.shape[-1]):
        mode = "replicate"  # reflect padding needs pad < size (tiny images only)
    c = x.shape[1]
    xp = F.pad(x, (pw, pw, ph, ph), mode=mode)  # (B, C, H + 2ph, W + 2pw)
    weight = kernel.to(x).expand(c, 1, kh, kw)  # (C, 1, kh, kw)
    return F.conv2d(xp, weight, groups=c)


def _gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()  # (2 radius + 1,)


def _gaussian_blur(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    # skimage.filters.gaussian -> scipy.ndimage.gaussian_filter: truncate 4, mode 'nearest'.
    k = _gaussian_kernel1d(sigma, int(4.0 * sigma + 0.5))
    x = _conv_depthwise(x, k[:, None], "replicate")
    return _conv_depthwise(x, k[None, :], "replicate")


def _disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """ImageNet-C's anti-aliased disk: a normalized disk, then cv2.GaussianBlur (3x3 or 5x5)."""
    if radius <= 8:
        grid, ksize = torch.arange(-8, 9, dtype=torch.float64), 3
    else:
        grid, ksize = torch.arange(-radius, radius + 1, dtype=torch.float64), 5
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).double()
    disk = disk / disk.sum()  # (L, L)
    g = _gaussian_kernel1d(alias_blur, ksize // 2)  # cv2.getGaussianKernel for sigma > 0
    disk = _conv_depthwise(disk[None, None], g[:, None], "reflect")  # cv2 BORDER_REFLECT_101
    disk = _conv_depthwise(disk, g[None, :], "reflect")[0, 0]
    # Crop all-zero outer rings (symmetrically, so the centre stays the anchor).
    centre = disk.shape[0] // 2
    nz = torch.nonzero(disk > 0)
    r = int((nz - centre).abs().max()) if nz.numel() else 0
    return disk[centre - r : centre + r + 1, centre - r : centre + r + 1]


def _defocus_blur(x: torch.Tensor, param: tuple, gen: torch.Generator) -> torch.Tensor:
    radius, alias_blur = param
    return _conv_depthwise(x, _disk_kernel(radius, alias_blur), "reflect")  # cv2.filter2D, REFLECT_101


def _contrast(x: torch.Tensor, factor: float, gen: torch.Generator) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1), per image and channel
    return (x - means) * factor + means


def _brightness(x: torch.Tensor, shift: float, gen: torch.Generator) -> torch.Tensor:
    value = x.amax(dim=1, keepdim=True)  # (B, 1, H, W): HSV value
    new_value = (value + shift).clamp(0.0, 1.0)
    scaled = x * (new_value / value.clamp(min=1e-12))
    return torch.where(value > 0, scaled, new_value.expand_as(x))


def _pil_box_weights(in_size: int, out_size: int) -> torch.Tensor:
    """PIL's BOX resampling matrix (out_size, in_size), as in ImagingResample's precompute_coeffs."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # (out,)
    t = (torch.arange(in_size, dtype=torch.float64)[None, :] - centre[:, None] + 0.5) / filterscale  # (out, in)
    w = ((t > -0.5) & (t <= 0.5)).double()  # box_filter; implies PIL's [xmin, xmax) window
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)


def _resize_box(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    wh = _pil_box_weights(x.shape[-2], out_h).to(x)  # (out_h, H)
    ww = _pil_box_weights(x.shape[-1], out_w).to(x)  # (out_w, W)
    return wh @ x @ ww.T  # (B, C, out_h, out_w)


def _pixelate(x: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = _resize_box(x, max(int(h * scale), 1), max(int(w * scale), 1))
    return _resize_box(small, h, w)


def _jpeg(x: torch.Tensor, quality: int, gen: torch.Generator) -> torch.Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    if x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg_compression needs 1 or 3 channels, got {x.shape[1]}")
    u8 = (x.detach().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)  # (B, C, H, W)
    decoded = decode_jpeg(encode_jpeg(list(u8), quality=int(quality)))
    return (torch.stack(decoded).float() / 255.0).to(x)


_FUNCS: dict[str, Callable[[torch.Tensor, object, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg,
}


def corrupt(
    images: torch.Tensor, name: str, severity: int, seed: int = 0, table: str | None = None
) -> torch.Tensor:
    """Corrupt images (B, C, H, W) in [0, 1] with corruption ``name`` at ``severity`` 1..5.

    Args:
        name: one of ``CORRUPTIONS`` (aliases: gaussian, shot, impulse, jpeg).
        seed: seed of the CPU generator for the random corruptions (noises).
        table: 'cifar' or 'imagenet' parameters; default 'cifar' up to 64 px, else 'imagenet'.

    Returns:
        corrupted images, same shape, dtype and device, in [0, 1].
    """
    images = check_images(images)
    key = _canonical(name)
    if table is None:
        table = "cifar" if max(images.shape[-2:]) <= 64 else "imagenet"
    param = corruption_params(key, severity, table)
    gen = torch.Generator().manual_seed(seed)
    out = _FUNCS[key](images, param, gen)
    return out.clamp(0.0, 1.0).to(images.dtype)


# ---------------------------------------------------------------- CIFAR-10-C / CIFAR-100-C files


class CIFARCDataset(Dataset):
    """One (corruption, severity) block of CIFAR-C: items are (image (3, 32, 32) float in [0, 1], label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images  # (N, H, W, 3) uint8, possibly memory-mapped
        self.labels = labels  # (N,)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.images[i], dtype=np.uint8))  # (H, W, 3)
        return img.permute(2, 0, 1).float() / 255.0, int(self.labels[i])


def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found; CIFAR-10-C / CIFAR-100-C come from https://zenodo.org/record/2535967 and "
            "https://zenodo.org/record/3555552 (unpack them and pass the folder holding <name>.npy)"
        )
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path} is not a plain .npy array ({e})") from None


def load_cifar_c(path: str | os.PathLike, name: str, severity: int) -> CIFARCDataset:
    """The test images of CIFAR-10-C / CIFAR-100-C for one corruption and severity (1..5).

    Reads ``path/<name>.npy`` ((5 N, 32, 32, 3) uint8, severity s in rows ``(s-1) N : s N``) and
    ``path/labels.npy`` (5 N labels, or N), memory-mapped, never unpickling.
    """
    severity = _check_severity(severity)
    name = _ALIASES.get(name, name)
    path = os.fspath(path)
    if name not in CIFAR_C_NAMES:
        present = sorted(f[:-4] for f in os.listdir(path) if f.endswith(".npy")) if os.path.isdir(path) else []
        raise ValueError(
            f"unknown CIFAR-C corruption {name!r}; valid names: {', '.join(CIFAR_C_NAMES)}"
            + (f" (present in {path}: {', '.join(n for n in present if n != 'labels')})" if present else "")
        )
    images = _load_npy(os.path.join(path, f"{name}.npy"))
    labels = _load_npy(os.path.join(path, "labels.npy"))
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[0] % 5:
        raise ValueError(
            f"{name}.npy should be (5 N, H, W, 3) uint8 with the 5 severities stacked, got "
            f"{images.shape} {images.dtype}"
        )
    block = images.shape[0] // 5
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) not in (block, 5 * block):
        raise ValueError(
            f"labels.npy should hold {5 * block} (or {block}) integer labels for {name}.npy, got "
            f"{labels.shape} {labels.dtype}"
        )
    rows = slice((severity - 1) * block, severity * block)
    return CIFARCDataset(images[rows], labels[rows] if len(labels) == 5 * block else labels)

