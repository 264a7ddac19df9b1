"""An in-memory uint8 image data set (used by ``elpv`` and ``fake``).

Images are kept as uint8 arrays and handed to the transform as PIL images, so that the in-memory
sets go through exactly the same timm/torchvision transforms as CIFAR or an ImageFolder.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """``images`` uint8 (N, H, W) grayscale or (N, H, W, 3) RGB; ``targets`` int (N,).

    ``__getitem__`` returns ``(transform(PIL RGB image), int label)``.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N, H, W[, 3]), got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.data = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[index])  # 'L' for (H, W), 'RGB' for (H, W, 3)
        if img.mode != "RGB":
            img = img.convert("RGB")  # grayscale repeated to 3 channels
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
