"""Readers for local copies of CIFAR-10/100, MNIST, Fashion-MNIST and ImageFolder trees.

They are torchvision's data sets, with two changes for CIFAR: the pickled batches are read with a
restricted unpickler that only rebuilds numpy arrays, lists, dicts, strings and numbers (a
malicious file cannot run code), and the files are checked for presence, not md5 (a truncated file
fails when read, with its name). Nothing is downloaded unless ``download=True``. A missing file is a
``FileNotFoundError`` naming it and how to get it.

Splits: ``train`` is the official train set, ``val`` and ``test`` the official test set (option
``val_fraction=F`` holds out a seeded stratified slice of train as ``val``, see
``vitscope.data.factory``). ImageFolder reads ``PATH/train`` and ``PATH/val``; ``test`` reads
``PATH/test`` when it exists, else ``PATH/val``. A PATH whose class folders sit directly under it (an
ImageNet validation folder) is one split, used for every split asked for. Class indices follow the sorted
folder names (timm's ImageNet-1k order for the 1000 synset folders; ``labels=imagenet`` maps a subset of
synset folders to their ImageNet-1k indices). Non-image and unreadable files are skipped with a warning, and so
are images over a pixel budget (``max_pixels``, default PIL's ``Image.MAX_IMAGE_PIXELS``: decompression bombs).
Directory symlinks under a class folder are followed once: a link back into the split folder (a loop, or a
link into another class) or to a directory already read is refused with a warning, so every example's label is
the class folder it is read under and no file is read twice through links (``docs/data.md``).
"""
from __future__ import annotations

import importlib
import io
import logging
import os
import pickle
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torchvision import datasets

_logger = logging.getLogger(__name__)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,) * 3, (0.3081,) * 3
FASHION_MEAN, FASHION_STD = (0.2860,) * 3, (0.3530,) * 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: no other global can be loaded."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles store bytes (str -> bytes, no code)
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file (only numpy arrays)")
        if module.startswith("numpy.core"):  # numpy 2 moved numpy.core to numpy._core
            try:
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _safe_unpickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read {path}: {e}; the file is corrupt or not a CIFAR batch "
                         "(delete it and fetch the data again with download=True / --download)") from e


def _require(paths: list[str], name: str, hint: str) -> None:
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{name}: missing {p}; {hint}")


class SafeCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 with a restricted unpickler and a presence check naming the missing file."""

    label_key = "labels"

    def __init__(self, root: str | Path, train: bool = True, transform: Any = None, download: bool = False,
                 coarse: bool = False) -> None:
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        if download:
            self.download()  # torchvision: fetches and md5-checks the archive
        folder = os.path.join(self.root, self.base_folder)
        files = [f for f, _ in (self.train_list if train else self.test_list)]
        meta = os.path.join(folder, self.meta["filename"])
        _require(
            [os.path.join(folder, f) for f in files] + [meta], type(self).__name__,
            f"download and extract {self.url} into {self.root} or pass download=True (--download)",
        )
        data, targets = [], []
        label_key = "coarse_labels" if coarse else self.label_key
        for f in files:
            entry = _safe_unpickle(os.path.join(folder, f))
            if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
                raise ValueError(f"{os.path.join(folder, f)} lacks the 'data'/'{label_key}' entries of a CIFAR batch")
            data.append(np.asarray(entry["data"], dtype=np.uint8))
            targets.extend(int(t) for t in entry[label_key])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # (N, 32, 32, 3) HWC
        self.targets = targets
        meta_entry = _safe_unpickle(meta)
        self.classes = list(meta_entry["coarse_label_names" if coarse else self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if len(self.targets) != len(self.data):
            raise ValueError(f"{folder}: {len(self.data)} images but {len(self.targets)} labels")


class SafeCIFAR100(SafeCIFAR10):
    """CIFAR-100 (fine labels by default; ``coarse=True`` for the 20 superclasses)."""

    base_folder = datasets.CIFAR100.base_folder
    url = datasets.CIFAR100.url
    filename = datasets.CIFAR100.filename
    tgz_md5 = datasets.CIFAR100.tgz_md5
    train_list = datasets.CIFAR100.train_list
    test_list = datasets.CIFAR100.test_list
    meta = datasets.CIFAR100.meta
    label_key = "fine_labels"


def cifar100_class_names(root: str, labels: str = "fine") -> tuple[str, ...] | None:
    """Class names from ``root/cifar-100-python/meta`` if it is there (``None`` otherwise)."""
    meta = os.path.join(root, SafeCIFAR100.base_folder, SafeCIFAR100.meta["filename"])
    if not os.path.exists(meta):
        return None
    entry = _safe_unpickle(meta)
    return tuple(entry["coarse_label_names" if labels == "coarse" else "fine_label_names"])


def make_cifar(name: str, root: str, split: str, download: bool = False, coarse: bool = False) -> SafeCIFAR10:
    cls = SafeCIFAR10 if name == "cifar10" else SafeCIFAR100
    if coarse and name != "cifar100":
        raise ValueError("option labels=coarse exists only for cifar100")
    return cls(root, train=(split == "train"), download=download, **({"coarse": True} if coarse else {}))


def make_mnist(name: str, root: str, split: str, download: bool = False) -> datasets.MNIST:
    """torchvision's MNIST / FashionMNIST reading ``root/<MNIST|FashionMNIST>/raw/*-ubyte``."""
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    train = split == "train"
    if not download:
        raw = os.path.join(root, cls.__name__, "raw")  # torchvision wants both splits present
        files = [os.path.join(raw, f"{p}-{kind}") for p in ("train", "t10k")
                 for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        _require(files, cls.__name__, f"download the idx files from {cls.mirrors[0]} and gunzip them into {raw}, "
                                      "or pass download=True (--download)")
    return cls(root, train=train, download=download)


IMAGEFOLDER_LABELS = ("folders", "imagenet")


def imagefolder_layout(root: str) -> str:
    """``"splits"`` when ``root`` holds ``train/`` or ``val/`` (or ``test/``), ``"flat"`` when its class
    folders sit directly under it (an ImageNet validation folder, say); a missing or empty root is an error."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"imagefolder: missing folder {root}; expected {root}/<class>/*.JPEG (one split) "
                                f"or {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
    if any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val", "test")):
        return "splits"
    if not any(e.is_dir() for e in os.scandir(root)):
        raise FileNotFoundError(f"imagefolder: no class folders in {root}; expected {root}/<class>/*.JPEG or "
                                f"{root}/train/<class>/... and {root}/val/<class>/...")
    return "flat"


def imagefolder_dirs(root: str) -> dict[str, str]:
    """split -> folder for an ImageFolder tree (``test`` falls back to ``val``); a flat tree (class folders
    directly under ``root``) is one split, used for every split asked for."""
    if imagefolder_layout(root) == "flat":
        return {s: root for s in ("train", "val", "test")}
    test = os.path.join(root, "test")
    return {
        "train": os.path.join(root, "train"),
        "val": os.path.join(root, "val"),
        "test": test if os.path.isdir(test) else os.path.join(root, "val"),
    }


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synsets (``n01440764``, ...) in timm's class-index order (``ImageNetInfo``)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def _check_labels(labels: str) -> None:
    if labels not in IMAGEFOLDER_LABELS:
        raise ValueError(f"imagefolder: labels must be one of {IMAGEFOLDER_LABELS}, got {labels!r} (folders: "
                         "class i = i-th folder name in sorted order; imagenet: ImageNet-1k synset folders get "
                         "their ImageNet class index)")


def _folder_classes(folder: str) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"imagefolder: no class folders in {folder}")
    return classes


def _class_to_idx(folder: str, labels: str) -> dict[str, int]:
    """Folder name -> class index: sorted order (torchvision's, and timm's ImageNet order for all 1000 synset
    folders), or with ``labels="imagenet"`` each synset's ImageNet-1k index (for a subset of its classes)."""
    _check_labels(labels)
    names = _folder_classes(folder)
    if labels == "folders":
        return {c: i for i, c in enumerate(names)}
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    unknown = [c for c in names if c not in index]
    if unknown:
        raise ValueError(f"imagefolder {folder}: labels=imagenet needs ImageNet-1k synset folder names "
                         f"(n01440764, ...), but {unknown[:3]} {'are' if len(unknown) > 1 else 'is'} not one; "
                         "use labels=folders")
    return {c: index[c] for c in names}


def imagefolder_classes(root: str, labels: str = "folders") -> list[str]:
    """Class names by index: the sorted class folders of ``root/train`` (or of ``root`` for a flat tree, or of
    ``root/val`` when there is no ``train/``), or the 1000 ImageNet-1k synsets for ``labels="imagenet"``."""
    _check_labels(labels)
    dirs = imagefolder_dirs(root)
    folder = dirs["train"] if os.path.isdir(dirs["train"]) else dirs["val"]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"imagefolder: missing folder {dirs['train']}; expected {root}/train/<class>/*.png")
    if labels == "imagenet":
        _class_to_idx(folder, labels)  # checks the folder names
        return imagenet_synsets()
    return _folder_classes(folder)


def _is_image_file(path: str) -> bool:
    return path.lower().endswith(datasets.folder.IMG_EXTENSIONS)


def default_max_pixels() -> int:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89,478,485 by default): the default budget."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 0) or 2**62


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the budget (it is skipped, never decoded)."""


def _open_checked(fp: Any, max_pixels: int) -> Any:
    """``PIL.Image.open(fp)`` with its size checked against ``max_pixels`` before any pixel is decoded.

    PIL's own bomb check (a warning past ``Image.MAX_IMAGE_PIXELS``, an error past twice that) is folded into one
    ``ImageTooLarge``, so a bomb is an unreadable file like any other, never a traceback or a stray warning.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below against max_pixels
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"over PIL's decompression-bomb limit ({e})") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, over the budget max_pixels={max_pixels}")
    return img


def load_rgb(path: str, max_pixels: int) -> Any:
    """The image at ``path`` as an RGB ``PIL.Image``; ``ImageTooLarge`` over ``max_pixels`` pixels."""
    with open(path, "rb") as f, _open_checked(f, max_pixels) as img:
        return img.convert("RGB")


class CheckedImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder that skips what it cannot read instead of failing mid-run.

    At construction, files without an image extension are counted, and every image's header is opened with
    PIL (cheap: no pixel is decoded); unreadable ones, and images over ``max_pixels`` pixels, are dropped. A file
    that passes the header check but fails to decode later (a truncated JPEG) yields ``None``, which
    ``collate_skipping_none`` drops from its batch. Each skip is logged as a warning with a running count.
    Directory symlinks are followed once, loops and links back into the folder refused (``make_dataset``).
    """

    def __init__(self, root: str, labels: str = "folders", check: bool = True, max_pixels: int | None = None,
                 **kwargs: Any) -> None:
        self.labels, self.check = labels, check
        self.max_pixels = int(max_pixels) if max_pixels is not None else default_max_pixels()
        self.skipped: list[tuple[str, str]] = []  # (path, reason), at construction
        self.refused_links: list[tuple[str, str]] = []  # (link, reason): directory links not followed
        self.non_images: list[str] = []
        self.skipped_at_load = 0
        super().__init__(root, loader=partial(load_rgb, max_pixels=self.max_pixels), **kwargs)
        if check:
            kept = []
            for path, target in self.samples:
                reason = _unreadable(path, self.max_pixels)
                if reason is None:
                    kept.append((path, target))
                else:
                    self.skipped.append((path, reason))
            self.samples = self.imgs = kept
            self.targets = [t for _, t in kept]
        others = self.non_images
        parts = ([f"{len(others)} non-image file(s) (e.g. {others[0]})"] if others else []) + \
            ([f"{len(self.skipped)} unreadable image(s); e.g. {self.skipped[0][0]}: {self.skipped[0][1]}"]
             if self.skipped else [])
        if parts:  # only what was skipped, each with an example
            _logger.warning("imagefolder %s: skipped %s", root, " and ".join(parts))
        if self.refused_links:
            link, why = self.refused_links[0]
            _logger.warning("imagefolder %s: did not follow %d directory link(s) (e.g. %s: %s); labels come from "
                            "the class folder a file is read under, and no directory is read twice",
                            root, len(self.refused_links), link, why)
        if not self.samples:
            raise FileNotFoundError(f"imagefolder: no readable image in {root}")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        mapping = _class_to_idx(directory, self.labels)
        return sorted(mapping), mapping

    def make_dataset(  # type: ignore[override]
        self, directory: str, class_to_idx: dict[str, int], extensions: Any = None, is_valid_file: Any = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """``(path, class index)`` of every image under each class folder, directory links followed once.

        A directory link is followed unless its target is inside ``directory`` (a loop such as ``b/up -> ..``, or
        a link into another class, whose files would take the link's class) or a directory already read (a cycle
        outside the folder, or a second link to one place); refused links are recorded in ``refused_links``. A
        class folder that is itself a link to a directory outside ``directory`` is read as that class.
        """
        top = os.path.realpath(directory)
        seen: set[str] = set()
        instances: list[tuple[str, int]] = []
        empty: list[str] = []
        for name in sorted(class_to_idx):
            class_dir = os.path.join(directory, name)
            real = os.path.realpath(class_dir)
            if os.path.islink(class_dir) and (_inside(real, top) or real in seen):
                self.refused_links.append((class_dir, f"a class folder linking to {real}, read elsewhere"))
                empty.append(name)
                continue
            seen.add(real)
            files: list[str] = []
            for dirpath, dirnames, fnames in os.walk(class_dir, followlinks=True):
                keep = []
                for d in sorted(dirnames):
                    sub = os.path.join(dirpath, d)
                    target = os.path.realpath(sub)
                    if os.path.islink(sub) and _inside(target, top):
                        self.refused_links.append((sub, f"a link back into the image folder ({target})"))
                    elif target in seen:
                        self.refused_links.append((sub, f"a directory already read ({target}): a loop or a "
                                                   "second link to it"))
                    else:
                        seen.add(target)
                        keep.append(d)
                dirnames[:] = keep
                for f in fnames:
                    if not f.startswith("."):
                        (files if _is_image_file(f) else self.non_images).append(os.path.join(dirpath, f))
            instances.extend((path, class_to_idx[name]) for path in sorted(files))
            if not files:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"imagefolder {directory}: no image file in the class folder(s) {empty}")
        return instances

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a truncated or corrupt image; too large
            self.skipped_at_load += 1
            _logger.warning("imagefolder: skipped unreadable image %s (%s: %s); %d skipped while loading so far in "
                            "this process", self.samples[index][0], type(e).__name__, e, self.skipped_at_load)
            return None


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _unreadable(path: str, max_pixels: int | None = None) -> str | None:
    """Why PIL cannot identify ``path`` as an image within ``max_pixels`` pixels (header only), or None."""
    from PIL import UnidentifiedImageError

    try:
        with _open_checked(path, default_max_pixels() if max_pixels is None else max_pixels):
            pass
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def collate_skipping_none(batch: list[Any]) -> Any:
    """``default_collate`` of the items that are not ``None`` (images ``CheckedImageFolder`` could not read)."""
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    if not kept:
        raise ValueError(f"every image of a batch of {len(batch)} was unreadable (see the warnings above); "
                         "check the image folder")
    return default_collate(kept)


def make_imagefolder(root: str, split: str, labels: str = "folders", check: bool = True,
                     max_pixels: int | None = None) -> CheckedImageFolder:
    """An ImageFolder on ``root/<split>`` (or on ``root`` itself when its class folders sit directly under it:
    one split, used for every split asked for); its classes must match ``imagefolder_classes(root)``.

    Class ``i`` is the ``i``-th class folder in sorted order (timm's ImageNet-1k order when the folders are all
    1000 synsets), or with ``labels="imagenet"`` each synset folder's ImageNet-1k index. Unreadable files are
    skipped with a warning, as are images over ``max_pixels`` pixels (``CheckedImageFolder``; ``check=False`` skips
    the header scan, and the budget is then enforced as each image is loaded).
    """
    dirs = imagefolder_dirs(root)
    if dirs[split] == root:
        if split == "train":
            _logger.warning("imagefolder %s has its class folders directly under it: one split, used as train, val "
                            "and test alike (add val_fraction=F to hold out a validation slice)", root)
    elif not os.path.isdir(dirs[split]):
        raise FileNotFoundError(
            f"imagefolder: missing folder {dirs[split]}; expected {root}/train/<class>/*.png and "
            f"{root}/val/<class>/*.png, or the class folders directly under {root}"
        )
    ds = CheckedImageFolder(dirs[split], labels=labels, check=check, max_pixels=max_pixels)
    if labels == "folders":
        classes = imagefolder_classes(root)
        if ds.classes != classes:
            raise ValueError(f"imagefolder: classes of {dirs[split]} {ds.classes} differ from train's {classes}")
    return ds
