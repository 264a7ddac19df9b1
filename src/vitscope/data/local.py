"""Readers for local copies of CIFAR-10/100, MNIST, Fashion-MNIST and ImageFolder trees.

They are torchvision's data sets, with two changes for CIFAR: the pickled batches are read with a
restricted unpickler that only rebuilds numpy arrays, lists, dicts, strings and numbers (a
malicious file cannot run code), and the files are checked for presence, not md5 (a truncated file
fails when read, with its name). Nothing is downloaded unless ``download=True``. A missing file is a
``FileNotFoundError`` naming it and how to get it.

Splits: ``train`` is the official train set, ``val`` and ``test`` the official test set (option
``val_fraction=F`` holds out a seeded stratified slice of train as ``val``, see
``vitscope.data.factory``). ImageFolder reads ``PATH/train`` and ``PATH/val``; ``test`` reads
``PATH/test`` when it exists, else ``PATH/val``.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torchvision import datasets

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


def imagefolder_dirs(root: str) -> dict[str, str]:
    """split -> folder for an ImageFolder tree (``test`` falls back to ``val``)."""
    test = os.path.join(root, "test")
    return {
        "train": os.path.join(root, "train"),
        "val": os.path.join(root, "val"),
        "test": test if os.path.isdir(test) else os.path.join(root, "val"),
    }


def make_imagefolder(root: str, split: str) -> datasets.ImageFolder:
    """torchvision's ImageFolder on ``root/<split>``; the classes must match ``root/train``'s."""
    dirs = imagefolder_dirs(root)
    for s in ("train", split):
        if not os.path.isdir(dirs[s]):
            raise FileNotFoundError(
                f"imagefolder: missing folder {dirs[s]}; expected {root}/train/<class>/*.png and "
                f"{root}/val/<class>/*.png"
            )
    ds = datasets.ImageFolder(dirs[split])
    train_classes = imagefolder_classes(root)
    if ds.classes != train_classes:
        raise ValueError(f"imagefolder: classes of {dirs[split]} {ds.classes} differ from train's {train_classes}")
    return ds


def imagefolder_classes(root: str) -> list[str]:
    """Class folder names of ``root/train`` (sorted, as ImageFolder indexes them)."""
    train = imagefolder_dirs(root)["train"]
    if not os.path.isdir(train):
        raise FileNotFoundError(f"imagefolder: missing folder {train}; expected {root}/train/<class>/*.png")
    classes = sorted(e.name for e in os.scandir(train) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"imagefolder: no class folders in {train}")
    return classes
