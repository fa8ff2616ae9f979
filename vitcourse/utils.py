"""Small helpers the chapters share: seeding, devices, where runs are kept, and an offline sample photograph."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["seed_everything", "default_device", "sample_image", "runs_dir", "run_dir", "atomic_write"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a ``torch.Generator`` seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """``cuda`` when a GPU is available, otherwise ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never half of it.

    The bytes go to a temporary file in the same folder, are flushed to disk, and replace
    ``path`` in one ``os.replace``; the folder is created if needed.
    """
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def runs_dir() -> Path:
    """Where chapters keep training runs: ``$VITCOURSE_RUNS`` if set, else ``./runs``.

    The Makefile points it at ``_build/runs`` so the book build and the notebook
    tests share finished runs (a finished run is resumed, not retrained) and
    ``make clean`` removes them.
    """
    return Path(os.environ.get("VITCOURSE_RUNS") or "runs").expanduser()


def run_dir(config: TrainConfig, chapter: str, name: str | None = None) -> Path:
    """Where ``chapter`` keeps its run of ``config``: ``runs_dir() / chapter / f"{name}-{fingerprint}"``.

    The folder name ends in :func:`vitcourse.train.fingerprint` of ``config``, so a changed
    configuration trains afresh instead of resuming an old run, and rebuilding the book
    reuses every finished run. For example ``run_dir(CONFIGS["quick"], "ch05")`` is
    ``runs/ch05/quick-<8 hex digits>``.

    Args:
        config: the run's :class:`vitcourse.train.TrainConfig`.
        chapter: the chapter's folder inside :func:`runs_dir`, e.g. ``"ch05"``.
        name: the start of the folder name; ``config.name`` if not given.

    Raises:
        TypeError: if ``config`` is not a ``TrainConfig``.
        ValueError: if ``chapter`` or ``name`` is empty or is not a single folder name.
    """
    from .train import TrainConfig, fingerprint  # imported here: train imports this module

    if not isinstance(config, TrainConfig):
        raise TypeError(f"run_dir needs a vitcourse.train.TrainConfig, got {type(config).__name__}.")
    name = config.name if name is None else name
    for label, value in (("chapter", chapter), ("name", name)):
        if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
            raise ValueError(f"run_dir needs {label} to be one folder name (no '/', not '.' or '..'), got {value!r}.")
    return runs_dir() / chapter / f"{name}-{fingerprint(config)}"


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
