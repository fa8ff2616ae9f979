"""Small helpers the chapters share: seeding, devices and an offline sample photograph.

(Where runs and data are kept is :mod:`vitcourse.paths`; a chapter's run folder is
:func:`vitcourse.config.run_dir`.)"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

__all__ = ["seed_everything", "default_device", "sample_image"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a ``torch.Generator`` seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """``cuda`` when a GPU is available, otherwise ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def sample_image(name: str = "chelsea", size: int | None = 224) -> Tensor:
    """A real photograph shipped inside scikit-image, so it works offline.

    Args:
        name: one of ``"chelsea"`` (a cat), ``"astronaut"``, ``"coffee"``, ``"rocket"``.
        size: centre-crop to a square and resize to ``size x size``; ``None`` keeps the original.

    Returns:
        ``(3, H, W)`` float tensor with values in ``[0, 1]``.
    """
    if name not in _PHOTOS:
        raise ValueError(f"unknown sample image {name!r}; choose one of {', '.join(_PHOTOS)}.")
    from skimage import data

    image = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1)  # (3, H, W)
    image = image.float() / 255.0
    if size is None:
        return image
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top : top + side, left : left + side]
    resized = torch.nn.functional.interpolate(
        square[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].clamp(0, 1)
