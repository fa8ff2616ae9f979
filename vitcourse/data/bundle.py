"""What every loader returns: a :class:`DataBundle` of datasets, and the transforms that make its tensors.

A bundle holds three ``torch.utils.data.Dataset`` objects (train / validation / test) that yield
``(image, label)`` with ``image`` a normalised ``(C, H, W)`` float tensor, plus the class names,
the channel statistics used for normalisation and ``source`` (``"cifar10"``, ``"synthetic"`` or
``"folder:<path>"``). The statistics are chosen before a bundle is built (see
:func:`vitcourse.data.load_data`) and every transform of the bundle uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = ["DataBundle", "DataError", "CorruptDataError", "ImageTensorDataset", "AUGMENTATIONS", "train_transform",
           "eval_transform", "denormalize", "split_indices", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet, used for image folders (and by most pretrained checkpoints)."""
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A dataset is missing, corrupt or malformed; the message says what to do.

    Raised inside a ``DataLoader`` worker process, the error reaches the main process
    re-created by PyTorch with the message ``"Caught DataError in DataLoader worker process 0.
    Original Traceback ... vitcourse.data.DataError: <message>"``; the constructor keeps only
    ``<message>``, so the command line still prints one sentence instead of a traceback.
    """

    def __init__(self, message: str = "") -> None:
        marker = f"{type(self).__name__}: "  # the last line of the worker's traceback
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class CorruptDataError(DataError):
    """The dataset is there but damaged; never silently replaced by the synthetic stand-in."""


@dataclass
class DataBundle:
    """Train, validation and test datasets plus what describes them.

    Attributes:
        train, val, test: datasets yielding ``(image (C, H, W) float, label int)``.
        classes: class names, index = label.
        source: which data this is: ``"cifar10"``, ``"synthetic"`` or ``"folder:<path>"``.
        mean, std: the per-channel statistics the images were normalised with.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    classes: tuple[str, ...]
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def describe(self) -> str:
        """One line: source, split sizes and skipped files, e.g. ``synthetic: 15000 train / 5000 val / 4000 test``."""
        line = f"{self.source}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test"
        if self.skipped:
            line += " (skipped " + ", ".join(f"{n} {what}" for what, n in self.skipped.items()) + ")"
        return line

    def split_record(self) -> dict:
        """What :mod:`vitcourse.train` stores as ``split.json``: which examples are train, val and test.

        For an image folder: ``{"source", "classes", "files": {relative path: sha256 of its bytes},
        "train" / "val" / "test": [relative paths]}``. For CIFAR-10 and synthetic data, the
        three lists hold example indices instead and ``files`` is empty.
        """
        return {"source": self.source, "classes": list(self.classes), **self.split}



# --------------------------------------------------------------------------- datasets and transforms


class ImageTensorDataset(Dataset):
    """Images held (or loaded) as ``uint8 (C, H, W)`` tensors, transformed on access.

    Args:
        get_image: ``i -> uint8 tensor (C, H, W)``.
        labels: ``(N,)`` integer labels.
        transform: applied to the uint8 image; must end with a float, normalised tensor.

    Indexing with an ``int`` uses PyTorch's global random state for the augmentation.
    Indexing with a pair ``(i, seed)`` draws the augmentation from ``seed`` alone, so the
    image is the same in any process and after any restart: :mod:`vitcourse.train` uses
    this for exact resume.
    """

    def __init__(self, get_image: Callable[[int], Tensor], labels: Sequence[int], transform: Callable) -> None:
        self.get_image = get_image
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU generator only, restored afterwards
                image = self.transform(self.get_image(int(index)))
        else:
            index = key
            image = self.transform(self.get_image(int(index)))
        return image, int(self.labels[index])


class _Subset(Dataset):
    """``dataset`` restricted to ``indices``; keeps ``(i, seed)`` keys working."""

    def __init__(self, dataset: ImageTensorDataset, indices: Tensor) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        if isinstance(key, tuple):
            return self.dataset[(int(self.indices[key[0]]), key[1])]
        return self.dataset[int(self.indices[key])]

    @property
    def labels(self) -> Tensor:
        """Labels of the subset, ``(len(self),)``."""
        return self.dataset.labels[self.indices]


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The evaluation pipeline: uint8 ``(C, S, S)`` -> float, normalised with ``mean`` and ``std``."""
    return v2.Compose(_normalize(mean, std))


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


AUGMENTATIONS = ("none", "basic", "strong", "resized")


def train_transform(augment: str, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The training-time pipeline for uint8 ``(C, S, S)`` images -> normalised float ``(C, S, S)``.

    * ``"none"``: only normalisation.
    * ``"basic"``: random crop after padding by ``S/8`` pixels, horizontal flip (the classic CIFAR recipe).
    * ``"strong"``: ``"basic"`` plus RandAugment (2 operations, magnitude 9) and random erasing
      (p = 0.25), as in the small-data ViT recipes.
    * ``"resized"``: random resized crop (scale 0.8-1, aspect 0.9-1.1) and a flip: the seed blog's recipe.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}.")
    steps: list = []
    if augment in ("basic", "strong"):
        steps += [v2.RandomCrop(image_size, padding=max(image_size // 8, 1)), v2.RandomHorizontalFlip()]
    if augment == "strong":
        steps += [v2.RandAugment(num_ops=2, magnitude=9)]
    if augment == "resized":
        steps += [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                  v2.RandomHorizontalFlip()]
    steps += _normalize(mean, std)
    if augment == "strong":
        steps += [v2.RandomErasing(p=0.25)]
    return v2.Compose(steps)


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo the normalisation for display: ``(..., C, H, W)`` -> same shape, clipped to ``[0, 1]``."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(n)`` into ``(train_indices, val_indices)`` with ``val_size`` for validation."""
    if not 0 <= val_size < n:
        raise ValueError(f"cannot hold out {val_size} of {n} training images for validation; "
                         f"use fewer validation images or more data.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def array_bundle(images: np.ndarray, labels: Sequence[int], test_images: np.ndarray, test_labels: Sequence[int], *,
                 classes: Sequence[str], source: str, stats: tuple[Sequence[float], Sequence[float]],
                 image_size: int, augment: str, val_size: int, seed: int, subset: int | None) -> DataBundle:
    """A bundle of uint8 ``(N, H, W, C)`` arrays: ``images`` split into train and validation (seeded,
    validation without augmentation), ``test_images`` as the test set, all normalised with ``stats``."""
    mean, std = stats
    pool = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
    test = torch.from_numpy(np.ascontiguousarray(test_images)).permute(0, 3, 1, 2)
    plain = eval_transform(mean, std)
    train_idx, val_idx = split_indices(len(pool), val_size, seed)
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset={subset} must be a positive number of training images.")
        train_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 1))]
        train_idx = train_idx[:subset].sort().values
    split = {"files": {}, "train": train_idx.tolist(), "val": val_idx.tolist(), "test": list(range(len(test)))}
    return DataBundle(
        train=_Subset(ImageTensorDataset(pool.__getitem__, labels, train_transform(augment, image_size, mean, std)),
                      train_idx),
        val=_Subset(ImageTensorDataset(pool.__getitem__, labels, plain), val_idx),
        test=ImageTensorDataset(test.__getitem__, test_labels, plain),
        classes=tuple(classes), source=source, mean=tuple(mean), std=tuple(std), split=split,
    )
