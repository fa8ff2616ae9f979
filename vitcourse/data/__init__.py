"""Datasets for training: CIFAR-10, your own image folder, and an offline stand-in.

Every loader returns a :class:`DataBundle` of three ``torch.utils.data.Dataset`` objects
(train / validation / test) that yield ``(image, label)`` with ``image`` a normalised
``(C, H, W)`` float tensor and ``label`` an ``int``, plus the class names, the channel
statistics used for normalisation and ``source``, a short string saying which data it is
(``"cifar10"``, ``"synthetic"`` or ``"folder:<path>"``). Training logs and metrics record it.

* ``load_data("cifar10")`` - CIFAR-10 through torchvision, downloaded into a cache directory
  (argument ``root``, else ``$VITCOURSE_DATA``, else ``~/.cache/vitcourse/data``). The 50,000
  training images are split with a seeded permutation into 45,000 train / 5,000 validation.
  ``VITCOURSE_OFFLINE=1`` forbids the download (tests and offline machines set it); a download
  gives up after :data:`DOWNLOAD_TIMEOUT` seconds without an answer from the server, or after
  :data:`DOWNLOAD_DEADLINE` seconds in all. Processes sharing the cache (``torchrun``) download
  it once, under a lock file (:func:`data_lock`).
* ``load_data("path/to/folder")`` - your images in torchvision's ``ImageFolder`` layout
  (``folder/<class>/<image>``), resized to the model's image size. Every file is checked once
  before anything trains (unreadable and corrupt files are named, hidden files and folders,
  AppleDouble ``._*`` files and non-images are skipped and counted), and the split is
  stratified by class and recorded by file (``DataBundle.split_record``).
* ``load_data("synthetic")`` - :func:`make_synthetic`: ten classes of shapes and textures drawn
  at random places in random colours. It exists so every notebook runs offline; CIFAR-10 falls
  back to it only when the caller passes ``allow_synthetic=True``.

The package's modules: :mod:`~vitcourse.data.bundle` (the bundle, datasets and transforms),
:mod:`~vitcourse.data.synthetic`, :mod:`~vitcourse.data.cifar` and :mod:`~vitcourse.data.folder`
(one source each); :func:`load_data`, here, picks the source and the normalisation statistics.

Augmentation (``augment=``) is applied to the training split only: ``"basic"`` is a random
crop with padding and a horizontal flip, ``"strong"`` adds RandAugment. Mixup/CutMix act on
whole batches and live in :mod:`vitcourse.train`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from ..paths import data_root, downloads_allowed
from .bundle import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptDataError,
    DataBundle,
    DataError,
    ImageTensorDataset,
    denormalize,
    eval_transform,
    split_indices,
    train_transform,
)
from .cifar import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, DOWNLOAD_DEADLINE, cifar10_bundle
from .folder import folder_bundle
from .synthetic import SYNTHETIC_CLASSES, make_synthetic, synthetic_bundle

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "SYNTHETIC_CLASSES",
    "DataBundle",
    "DataError",
    "CorruptDataError",
    "ImageTensorDataset",
    "data_root",
    "denormalize",
    "downloads_allowed",
    "load_data",
    "make_synthetic",
    "split_indices",
    "train_transform",
    "AUGMENTATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DOWNLOAD_DEADLINE",
    "eval_transform",
]


def load_data(
    name: str = "cifar10",
    *,
    root: str | os.PathLike | None = None,
    image_size: int = 32,
    val_size: int = 5000,
    seed: int = 0,
    augment: str = "none",
    allow_synthetic: bool = False,
    subset: int | None = None,
    download: bool = True,
    skip_bad_images: bool = False,
    verified: dict[str, str] | None = None,
    stats: tuple[Sequence[float], Sequence[float]] | None = None,
    progress: bool = True,
) -> DataBundle:
    """Load a dataset as a :class:`DataBundle` of train / validation / test datasets.

    Args:
        name: ``"cifar10"``, ``"synthetic"``, or the path of an image folder (``<folder>/<class>/<image>``).
        root: CIFAR-10 cache directory (default: ``$VITCOURSE_DATA`` or ``~/.cache/vitcourse/data``).
        image_size: side of the square images the model takes (CIFAR-10 and synthetic: 32).
        val_size: images moved from the training set into the validation set (seeded).
        seed: seed of the train/validation split (and of ``subset``).
        augment: ``"none"``, ``"basic"`` or ``"strong"``, for the training split only.
        allow_synthetic: if CIFAR-10 is absent and cannot be downloaded (not if it is corrupt), warn in one sentence and use :func:`make_synthetic` data.
        subset: keep only this many (seeded, random) training images.
        download: try to download CIFAR-10 when it is absent (never when ``$VITCOURSE_OFFLINE`` is set).
        skip_bad_images: image folders only: leave out unreadable and corrupt files (counted in
            ``DataBundle.skipped``) instead of raising :class:`DataError` that names them.
        verified: image folders only: ``split_record()["files"]`` of a bundle another process loaded
            from the same folder; those files are used without being checked again (``torchrun``
            ranks other than 0 use it, so every process trains on exactly the files process 0 checked).
        stats: ``(mean, std)`` per channel to normalise every split with, decided before the data is
            built (a pretrained start passes its checkpoint's, evaluation the run's); default: the
            data's own (CIFAR-10's, the stand-in's, ImageNet's for an image folder).
        progress: image folders only: show a progress bar while checking a large folder.

    Returns:
        A :class:`DataBundle`; its ``source`` says which data was loaded.

    Raises:
        DataError: missing, corrupt or malformed data, with what to do about it.
    """
    if stats is not None and not (len(stats) == 2 and all(len(v) == 3 for v in stats) and all(s > 0 for s in stats[1])):
        raise ValueError(f"stats must be (mean, std) with three values each and std > 0, got {stats!r}.")
    common = dict(image_size=image_size, augment=augment, val_size=val_size, seed=seed, subset=subset, stats=stats)
    if name == "synthetic":
        return synthetic_bundle(**common)
    if name == "cifar10":
        try:
            return cifar10_bundle(root, download=download, **common)
        except DataError as err:
            if not allow_synthetic or isinstance(err, CorruptDataError):
                raise
            warnings.warn(f"{str(err).rstrip('.')}; using the offline synthetic stand-in instead.", stacklevel=2)
            return synthetic_bundle(**common)
    looks_like_path = os.sep in name or name.startswith(".") or Path(name).expanduser().exists()
    if not looks_like_path:
        raise DataError(f"unknown dataset {name!r}; use 'cifar10', 'synthetic' or the path of an image folder.")
    return folder_bundle(Path(name).expanduser(), skip_bad_images=skip_bad_images, verified=verified, progress=progress,
                         **common)
