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

Augmentation (``augment=``) is applied to the training split only: ``"basic"`` is a random
crop with padding and a horizontal flip, ``"strong"`` adds RandAugment. Mixup/CutMix act on
whole batches and live in :mod:`vitcourse.train`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
import sys
import time
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .utils import atomic_write

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
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of the CIFAR-10 training images (values in [0, 1])."""
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the CIFAR-10 training images."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SYNTHETIC_CLASSES = (
    "disk", "square", "triangle", "plus", "ring",
    "h-stripes", "v-stripes", "diag-stripes", "checker", "dots",
)
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 20_000, 4_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_URL_HINT = "https://www.cs.toronto.edu/~kriz/cifar.html"
DOWNLOAD_TIMEOUT = 60.0
"""Seconds a download waits for the server before it gives up (so the offline fallback cannot hang)."""
def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


DOWNLOAD_DEADLINE = _env_seconds("VITCOURSE_DOWNLOAD_DEADLINE", 1800.0)
"""Seconds a whole download may take (``$VITCOURSE_DOWNLOAD_DEADLINE``, default 30 minutes)."""


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


def _bundle(train_pool: ImageTensorDataset, test: ImageTensorDataset, eval_pool: ImageTensorDataset, *,
            classes, source, mean, std, val_size: int, seed: int, subset: int | None) -> DataBundle:
    """Split ``train_pool`` into train/val (val drawn from ``eval_pool``: same images, no augmentation)."""
    train_idx, val_idx = split_indices(len(train_pool), val_size, seed)
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset={subset} must be a positive number of training images.")
        train_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 1))]
        train_idx = train_idx[:subset].sort().values
    split = {"files": {}, "train": train_idx.tolist(), "val": val_idx.tolist(), "test": list(range(len(test)))}
    return DataBundle(
        train=_Subset(train_pool, train_idx), val=_Subset(eval_pool, val_idx), test=test,
        classes=tuple(classes), source=source, mean=tuple(mean), std=tuple(std), split=split,
    )


def _in_memory(images: np.ndarray, labels: Sequence[int], transform: Callable) -> ImageTensorDataset:
    """Wrap uint8 ``(N, H, W, C)`` images."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
    return ImageTensorDataset(tensor.__getitem__, labels, transform)


# --------------------------------------------------------------------------- the synthetic stand-in


def make_synthetic(n: int, *, seed: int, image_size: int = 32, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic, offline 10-class image dataset of shapes and textures.

    Each image's label names its largest object: a disk, a square, a triangle, a plus, a ring,
    horizontal / vertical / diagonal stripes, a checkerboard or a grid of dots, at a random
    position and scale (square, triangle and plus also rotated), sometimes cut by the border.
    Every colour is random, so colour says nothing about the class. To make the task hard
    enough that models differ, the object sits on a shaded background with up to two smaller
    clutter objects of any kind; some objects fade from one colour to another, some are partly
    covered by a rectangle, and every image gets pixel noise of a random level.

    Args:
        n: number of images.
        seed: the same seed always gives the same images.
        image_size: side ``S`` in pixels.
        num_classes: at most 10; the first ``num_classes`` kinds of object are used.

    Returns:
        ``(images, labels)``: uint8 ``(n, S, S, 3)`` and int64 ``(n,)`` (balanced classes).
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be between 1 and {len(SYNTHETIC_CLASSES)}, got {num_classes}.")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, n, 2048):
        stop = min(start + 2048, n)
        images[start:stop] = _draw(labels[start:stop], rng, image_size)
    return images, labels


def _draw(labels: np.ndarray, rng: np.random.Generator, s: int) -> np.ndarray:
    """Render one chunk of synthetic images: ``(b,)`` labels -> uint8 ``(b, s, s, 3)``.

    Layers, back to front: a dark two-colour gradient background; up to two small clutter objects of
    any kind; the labelled object (random scale, position, bright colour, sometimes a colour gradient,
    and a rotation for the kinds a rotation keeps); in 30% of images an occluding rectangle; noise.
    """
    b = len(labels)
    f32 = np.float32
    yy, xx = np.mgrid[0:s, 0:s].astype(f32)  # (s, s) pixel coordinates

    def colours(lo: float = 0.0, hi: float = 1.0) -> np.ndarray:  # (b, 1, 1, 3); colour says nothing of the class
        return rng.uniform(lo, hi, (b, 1, 1, 3)).astype(f32)

    def objects(kinds, lo, hi, inside, period_scale, tilt):
        """Masks (b, s, s) of objects of ``kinds`` with half-size in [lo, hi] * s, and their geometry."""
        radius = rng.uniform(lo, hi, b).astype(f32) * s
        margin = radius * inside  # inside < 1 lets an object reach past the border
        cy = rng.uniform(0, 1, b).astype(f32) * (s - 2 * margin) + margin
        cx = rng.uniform(0, 1, b).astype(f32) * (s - 2 * margin) + margin
        period = rng.uniform(0.16, 0.3, b).astype(f32) * s * period_scale  # stripe / checker / dot spacing
        phase = rng.uniform(0, 1, b).astype(f32) * period
        flip = rng.integers(0, 2, b).astype(f32) * 2 - 1  # direction of the diagonal stripes
        cos, sin = np.cos(tilt)[:, None, None], np.sin(tilt)[:, None, None]
        dy0, dx0 = yy - cy[:, None, None], xx - cx[:, None, None]  # (b, s, s) offsets from the centre
        dy, dx = cos * dy0 - sin * dx0, sin * dy0 + cos * dx0  # rotated by tilt
        mask = np.zeros((b, s, s), dtype=bool)
        for kind in np.unique(kinds):
            i = np.flatnonzero(kinds == kind)
            g = (radius[i, None, None], period[i, None, None], phase[i, None, None], flip[i, None, None])
            mask[i] = _shape_mask(int(kind), dy[i], dx[i], *g)
        return mask, radius, cy, cx, dx

    theta = rng.uniform(0, 2 * np.pi, b).astype(f32)[:, None, None]
    ramp = np.clip(((yy - s / 2) * np.sin(theta) + (xx - s / 2) * np.cos(theta)) / s + 0.5, 0, 1)[..., None]
    first = colours(0.0, 0.45)  # dark backgrounds, as before, but shaded
    image = first + (colours(0.0, 0.45) - first) * ramp  # (b, s, s, 3)

    for _ in range(2):  # clutter: small objects of random kinds, each present with probability 0.5
        kinds = rng.integers(0, len(SYNTHETIC_CLASSES), b)
        mask, *_ = objects(kinds, 0.06, 0.11, 0.5, 0.5, rng.uniform(-0.5, 0.5, b).astype(f32))
        mask &= (rng.random(b) < 0.5)[:, None, None]
        image = np.where(mask[..., None], colours(0.3, 1.0), image)

    rotatable = np.isin(labels, (1, 2, 3))  # square, triangle, plus; stripes keep their direction
    tilt = np.where(rotatable, rng.uniform(-0.6, 0.6, b), rng.uniform(-0.15, 0.15, b)).astype(f32)
    mask, radius, cy, cx, dx = objects(labels, 0.25, 0.42, 0.85, 1.0, tilt)
    near, far = colours(0.5, 1.0), colours(0.5, 1.0)  # brighter than most backgrounds, not all
    across = np.clip(dx / (2 * radius[:, None, None]) + 0.5, 0, 1)[..., None]  # 0 -> 1 across the object
    graded = (rng.random(b) < 0.3)[:, None, None, None]  # half the objects fade from one colour to another
    paint = np.where(graded, near + (far - near) * across, near)
    image = np.where(mask[..., None], paint, image)

    r = radius[:, None, None]  # occluder: a rectangle over part of the object, in 30% of images
    oy = cy[:, None, None] + rng.uniform(-0.7, 0.7, (b, 1, 1)).astype(f32) * r
    ox = cx[:, None, None] + rng.uniform(-0.7, 0.7, (b, 1, 1)).astype(f32) * r
    half_h, half_w = (rng.uniform(0.15, 0.3, (2, b, 1, 1)).astype(f32) * r)
    occluded = (np.abs(yy - oy) <= half_h) & (np.abs(xx - ox) <= half_w) & (rng.random(b) < 0.3)[:, None, None]
    image = np.where(occluded[..., None], colours(0.0, 0.6), image)

    noise = rng.standard_normal((b, s, s, 3), dtype=f32) * rng.uniform(0.02, 0.07, (b, 1, 1, 1)).astype(f32)
    return (np.clip(image + noise, 0, 1) * 255).round().astype(np.uint8)


def _shape_mask(kind: int, dy, dx, r, p, ph, flip) -> np.ndarray:
    """Boolean ``(k, s, s)`` mask of object ``kind`` given offsets ``dy, dx`` from its centre and its sizes."""
    box = (np.abs(dy) <= r) & (np.abs(dx) <= r)  # the object's square extent

    def wave(t):  # stripes along direction t, with period p and phase ph
        return np.cos(2 * np.pi * (t + ph) / p) > 0

    if kind == 0:  # disk
        return np.hypot(dy, dx) <= r
    if kind == 1:  # square
        return (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
    if kind == 2:  # triangle, apex up
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    if kind == 3:  # plus
        return box & ((np.abs(dy) <= 0.3 * r) | (np.abs(dx) <= 0.3 * r))
    if kind == 4:  # ring
        dist = np.hypot(dy, dx)
        return (dist <= r) & (dist >= 0.6 * r)
    if kind == 5:  # horizontal stripes
        return box & wave(dy)
    if kind == 6:  # vertical stripes
        return box & wave(dx)
    if kind == 7:  # diagonal stripes, either diagonal
        return box & wave((dy + flip * dx) / math.sqrt(2))
    if kind == 8:  # checkerboard
        return box & (wave(dy) ^ wave(dx))
    # a grid of dots
    return box & (np.hypot((dy + ph) % p - p / 2, (dx + ph) % p - p / 2) <= 0.22 * p)


SYNTHETIC_VERSION = 3  # bump when make_synthetic changes, so stale caches are not used


@functools.lru_cache(maxsize=2)
def _synthetic_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed synthetic train pool and test set, cached in memory and in :func:`data_root` on disk."""
    path = data_root() / f"synthetic-v{SYNTHETIC_VERSION}-{image_size}px.npz"
    with data_lock(path.parent, "synthetic"):  # processes sharing the cache generate it once
        return _synthetic_arrays_unlocked(path, image_size)


def _synthetic_arrays_unlocked(path: Path, image_size: int):
    try:
        with np.load(path) as f:
            return f["images"], f["labels"], f["test_images"], f["test_labels"]
    except (OSError, KeyError, ValueError):
        pass  # not cached yet (or unreadable): generate
    images, labels = make_synthetic(SYNTHETIC_TRAIN, seed=1234, image_size=image_size)
    test_images, test_labels = make_synthetic(SYNTHETIC_TEST, seed=4321, image_size=image_size)
    try:
        buffer = io.BytesIO()
        np.savez(buffer, images=images, labels=labels, test_images=test_images, test_labels=test_labels)
        atomic_write(path, buffer.getvalue())  # a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only cache only costs the few seconds of generating again
    return images, labels, test_images, test_labels


def _synthetic(image_size: int, augment: str, val_size: int, seed: int, subset: int | None) -> DataBundle:
    images, labels, test_images, test_labels = _synthetic_arrays(image_size)
    pixels = images[::10].reshape(-1, 3) / 255.0  # every 10th image is plenty for the statistics
    mean = tuple(round(float(v), 4) for v in pixels.mean(0))
    std = tuple(round(float(v), 4) for v in pixels.std(0))
    plain = v2.Compose(_normalize(mean, std))
    return _bundle(
        _in_memory(images, labels, train_transform(augment, image_size, mean, std)),
        _in_memory(test_images, test_labels, plain), _in_memory(images, labels, plain),
        classes=SYNTHETIC_CLASSES, source="synthetic", mean=mean, std=std,
        val_size=min(val_size, SYNTHETIC_TRAIN // 4), seed=seed, subset=subset,
    )


# --------------------------------------------------------------------------- CIFAR-10


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets are cached: ``root`` if given, else ``$VITCOURSE_DATA``, else ``~/.cache/vitcourse/data``."""
    return Path(root or os.environ.get("VITCOURSE_DATA") or "~/.cache/vitcourse/data").expanduser()


def downloads_allowed() -> bool:
    """False when the environment variable ``VITCOURSE_OFFLINE`` is set (to anything but ``0`` or empty)."""
    return os.environ.get("VITCOURSE_OFFLINE", "") in ("", "0")


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


@contextlib.contextmanager
def data_lock(folder: str | os.PathLike, name: str = "vitcourse") -> Iterator[None]:
    """Hold an exclusive lock file ``folder/.<name>.lock`` while preparing data there.

    Processes that share ``folder`` (the ranks of a ``torchrun`` job, on one machine or on a
    shared filesystem) take turns: the first downloads or generates, the others then find the
    result. A folder where no lock file can be created (read-only) is used without a lock.
    """
    from filelock import FileLock

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f".{name}.lock"))
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def download_file(url: str, dest: str | os.PathLike, *, timeout: float | None = None,
                  deadline: float | None = None, md5: str | None = None) -> None:
    """Download ``url`` to ``dest`` (atomically), giving up after ``deadline`` seconds in total.

    ``timeout`` bounds each wait for the server (default :data:`DOWNLOAD_TIMEOUT`); ``deadline``
    bounds the whole transfer (default :data:`DOWNLOAD_DEADLINE`), so a server that answers,
    but too slowly, cannot stall a run forever. ``md5``, if given, is checked at the end.

    Raises:
        TimeoutError: the deadline passed. ``OSError`` / ``ValueError``: no connection, bad checksum.
    """
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    deadline = DOWNLOAD_DEADLINE if deadline is None else deadline
    dest = Path(dest)
    start = time.monotonic()
    digest = hashlib.md5()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "vitcourse"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
            read = getattr(response, "read1", response.read)
            while True:
                if time.monotonic() - start > deadline:
                    raise TimeoutError(f"the download took longer than {deadline:.0f} s")
                chunk = read(1 << 16)  # returns what has arrived, at most 64 KiB
                if not chunk:
                    break
                f.write(chunk)
                digest.update(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError("the downloaded file fails its checksum")
        os.replace(tmp, dest)  # streamed to disk (170 MB), so not utils.atomic_write, which takes the bytes
    finally:
        tmp.unlink(missing_ok=True)


def _download_cifar(root: Path) -> None:
    """Download and unpack CIFAR-10 into ``root/cifar-10-batches-py`` (within :data:`DOWNLOAD_DEADLINE`)."""
    import tarfile

    archive = root / "cifar-10-python.tar.gz"
    if not archive.exists():
        download_file(CIFAR10_URL, archive, md5=CIFAR10_MD5)
    with tarfile.open(archive, "r:gz") as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, **safe)
    archive.unlink(missing_ok=True)


def _cifar_arrays(root: Path, download: bool) -> tuple[np.ndarray, list, np.ndarray, list]:
    """CIFAR-10's train and test arrays from ``root``, downloading when absent; :class:`DataError` otherwise."""
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    if root.exists() and not root.is_dir():
        raise DataError(f"the CIFAR-10 cache {root} is a file, not a folder; pass a folder as --data-root.")
    if not folder.exists():
        if not download or not downloads_allowed():
            why = "VITCOURSE_OFFLINE is set" if download else "downloads are off"
            raise DataError(f"CIFAR-10 is not in {folder} and {why}; put the extracted 'cifar-10-batches-py' "
                            f"folder there (from {CIFAR_URL_HINT}) or allow downloads.")
        try:
            with data_lock(root, "cifar10"):  # one process downloads; the others wait, then find it
                if not folder.exists():
                    _download_cifar(root)
        except Exception as err:  # no network, proxy, timeout, disk full ...: all mean "not available"
            raise DataError(
                f"CIFAR-10 is not in {folder} and could not be downloaded ({type(err).__name__}); connect to "
                f"the internet and run again, or put the extracted 'cifar-10-batches-py' folder there "
                f"(from {CIFAR_URL_HINT})."
            ) from None
    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except Exception:
        raise CorruptDataError(
            f"CIFAR-10 in {folder} is corrupt or incomplete (a batch file is missing or fails its "
            f"checksum); delete that folder and run again to download a fresh copy."
        ) from None
    return train.data, list(train.targets), test.data, list(test.targets)


def _cifar10(root, image_size: int, augment: str, val_size: int, seed: int, subset: int | None,
             download: bool) -> DataBundle:
    if image_size != 32:
        raise ValueError(f"CIFAR-10 images are 32x32; use image_size=32 (got {image_size}).")
    x_train, y_train, x_test, y_test = _cifar_arrays(data_root(root), download)
    plain = v2.Compose(_normalize(CIFAR10_MEAN, CIFAR10_STD))
    return _bundle(
        _in_memory(x_train, y_train, train_transform(augment, 32, CIFAR10_MEAN, CIFAR10_STD)),
        _in_memory(x_test, y_test, plain), _in_memory(x_train, y_train, plain),
        classes=CIFAR10_CLASSES, source="cifar10", mean=CIFAR10_MEAN, std=CIFAR10_STD,
        val_size=val_size, seed=seed, subset=subset,
    )


# --------------------------------------------------------------------------- image folders

CHECK_PROGRESS_FROM = 500
"""Folders with at least this many files show a progress bar while they are checked."""
_NAMED = 10  # bad files named in an error message; the rest are counted


def _check_folder_path(path: Path) -> None:
    if path.is_file():
        raise DataError(f"{path} is a file, not a folder; pass a folder of images laid out as <folder>/<class>/<image>.")
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; pass a directory laid out as <folder>/<class>/<image>.")


def _inventory(path: Path) -> tuple[list[str], dict[str, list[Path]], Counter, list[Path]]:
    """Class folders of ``path`` and the candidate image files in each, without opening any.

    Skipped, and counted in the returned ``Counter``: hidden files and folders at any depth
    (names starting with ``.``; macOS's ``._name`` AppleDouble files are counted apart), the
    ``__MACOSX`` folders zip archives carry, files that are not images (by extension), and
    files lying directly in ``path`` outside any class folder. Also returns the sub-folders that
    could not be listed (no permission): their images would otherwise be missing without a word.
    """
    _check_folder_path(path)
    skipped: Counter = Counter()
    classes = []
    try:
        entries = sorted(path.iterdir())
    except OSError as err:
        raise DataError(f"image folder {path} cannot be read ({err.strerror or err}); check its permissions.") from None
    for entry in entries:
        if entry.name.startswith(".") or entry.name == "__MACOSX":
            skipped["hidden files and folders"] += 1
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            skipped["files outside class folders"] += 1
    if not classes:
        raise DataError(f"image folder {path} has no class sub-folders; put each class's images in {path}/<class>/.")
    files: dict[str, list[Path]] = {}
    unlisted: list[Path] = []
    for name in classes:
        found, seen = [], set()
        for folder, dirs, names in os.walk(path / name, followlinks=True,
                                           onerror=lambda err: unlisted.append(Path(err.filename))):
            real = os.path.realpath(folder)
            if real in seen:  # a linked folder already read (or a link loop): its files once only
                dirs[:] = []
                continue
            seen.add(real)
            hidden = [d for d in dirs if d.startswith(".") or d == "__MACOSX"]
            skipped["hidden files and folders"] += len(hidden)
            dirs[:] = sorted(d for d in dirs if d not in hidden)  # not descended into
            for file in names:
                if file.startswith("._"):
                    skipped["AppleDouble ._* files"] += 1
                elif file.startswith("."):
                    skipped["hidden files and folders"] += 1
                elif Path(file).suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped["non-image files"] += 1
                else:
                    found.append(Path(folder) / file)
        files[name] = sorted(found)
    return classes, files, skipped, unlisted


def _check_image(file: Path) -> tuple[str | None, str]:
    """``(problem, sha256)`` of one file: problem ``None`` (a good image), ``"unreadable"`` or ``"corrupt"``.

    The file is read once; Pillow's ``verify`` checks its structure and a full decode catches
    truncated pixel data, which ``verify`` alone lets through.
    """
    from PIL import Image

    try:
        data = file.read_bytes()
    except OSError:  # no permission, a broken link, an I/O error
        return "unreadable", ""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.convert("RGB")  # what training does with it (fails for some exotic modes)
    except Exception:  # Pillow raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        return "corrupt", ""
    return None, hashlib.sha256(data).hexdigest()


def _check_images(files: list[Path]) -> list[tuple[str | None, str]]:
    """:func:`_check_image` on every file, in parallel threads, with a progress bar for large folders."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    workers = min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), desc="checking images", unit="file",
                                                   disable=len(files) < CHECK_PROGRESS_FROM, leave=False,
                                                   file=sys.stderr) as bar:
        results = []
        for result in pool.map(_check_image, files):
            results.append(result)
            bar.update(1)
    return results


def _bad_images_message(root: Path, bad: dict[str, list[Path]], total: int) -> str:
    """One sentence naming up to ten bad files (unreadable first), then how many more, and what to do."""
    named = _NAMED
    parts = []
    for kind, why in (("unreadable", "unreadable (no read permission or a broken link"),
                      ("corrupt", "corrupt (damaged, truncated or not an image")):
        paths = bad.get(kind, [])
        if not paths:
            continue
        shown = [str(p.relative_to(root)) for p in paths[:named]]
        named -= len(shown)
        more = f" and {len(paths) - len(shown)} more" if len(paths) > len(shown) else ""
        parts.append(f"{len(paths)} {why}: {', '.join(shown)}{more})")
    n = sum(len(v) for v in bad.values())
    return (f"{n} of the {total} images in {root} cannot be used: {' and '.join(parts)}; fix or delete them, "
            f"or pass --skip-bad-images to leave them out.")


def _scan(root: Path, parts: Sequence[str], skip_bad_images: bool, verified: dict[str, str] | None = None):
    """Inventory and check the image folders ``root/part`` (``part`` ``""`` for ``root`` itself).

    Returns ``(classes per part, {part: {class: [(file, sha256)]}}, skipped Counter)``; raises
    :class:`DataError` for bad files unless ``skip_bad_images`` (then they are counted as skipped).
    ``verified`` (``{relative path: sha256}``, from another process that checked the same folder)
    replaces the check: exactly those files are used, none is opened.
    """
    inventories = {part: _inventory(root / part if part else root) for part in parts}
    everything = [f for _, files, _, _ in inventories.values() for found in files.values() for f in found]
    if verified is not None:
        inventories = {part: (classes, files, counts, []) for part, (classes, files, counts, _) in inventories.items()}
        known = {f: verified.get(f.relative_to(root).as_posix()) for f in everything}
        everything = [f for f in everything if known[f] is not None]
        checked = {f: (None, known[f]) for f in everything}
        inventories = {part: (classes, {name: [f for f in found if known[f] is not None] for name, found in files.items()},
                              counts, unlisted) for part, (classes, files, counts, unlisted) in inventories.items()}
    else:
        checked = dict(zip(everything, _check_images(everything)))
    bad: dict[str, list[Path]] = {}
    for _, _, _, unlisted in inventories.values():  # folders that could not be listed count as unreadable
        bad.setdefault("unreadable", []).extend(unlisted)
    for f, (problem, _) in checked.items():
        if problem is not None:
            bad.setdefault(problem, []).append(f)
    bad = {kind: paths for kind, paths in bad.items() if paths}
    skipped: Counter = Counter()
    for _, _, counts, _ in inventories.values():
        skipped.update(counts)
    if bad and not skip_bad_images:
        raise DataError(_bad_images_message(root, bad, len(everything)))
    for kind, paths in bad.items():
        skipped[f"{kind} images"] += len(paths)
    good = {part: {name: [(f, checked[f][1]) for f in found if checked[f][0] is None] for name, found in files.items()}
            for part, (_, files, _, _) in inventories.items()}
    return {part: classes for part, (classes, _, _, _) in inventories.items()}, good, skipped


def _check_classes(folder: Path, per_class: dict[str, list], needed: int, roles: str) -> None:
    """At least two classes, each with at least ``needed`` images (one for each of ``roles``)."""
    for name, found in per_class.items():
        if not found:
            raise DataError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, "
                            f"...); add images to it or remove it.")
    if len(per_class) < 2:
        (only,) = per_class
        raise DataError(f"image folder {folder} has only one class folder ({only}); a classifier needs at least two, "
                        f"so add a folder of images for another class beside it.")
    for name, found in per_class.items():
        if len(found) < needed:
            missing = needed - len(found)
            raise DataError(f"class folder {folder / name} has only {len(found)} usable image"
                            f"{'s' if len(found) != 1 else ''}, too few for one {roles} image; add at least "
                            f"{missing} more.")


def _hash_order(items: list[tuple[Path, str]], root: Path, seed: int) -> list[tuple[Path, str]]:
    """``items`` in a seeded order that depends on each file's own path, not on the other files."""
    def key(item):
        return hashlib.sha256(f"{seed}:{item[0].relative_to(root).as_posix()}".encode()).hexdigest()

    return sorted(items, key=key)


class _ImageLoader:
    """``i -> uint8 (3, S, S)``: decode file ``i`` (with Pillow), resize its short side to ``S``, centre-crop.

    A class rather than a closure so that it pickles: DataLoader workers started with
    ``spawn`` (the default on macOS and Windows) receive the dataset by pickling.
    """

    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files = files
        self.resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])

    def __call__(self, i: int) -> Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as image:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        except Exception:
            raise DataError(f"cannot read image {self.files[i]}; it changed or became unreadable after the "
                            f"folder was checked: fix or delete it.") from None
        return self.resize(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (3, S, S)


def _folder(path: Path, image_size: int, augment: str, val_size: int, seed: int, subset: int | None,
            skip_bad_images: bool = False, verified: dict[str, str] | None = None) -> DataBundle:
    """An image folder: ``path/train`` + ``path/test`` if both exist, else one folder split three ways.

    Every file is checked once first (see :func:`_scan`). The split is stratified and seeded:
    in each class, the files are ordered by a hash of the seed and their own path; without a
    ``train``/``test`` layout the first 10% (at least one) are the test images; of the rest,
    10% (at least one) are validation images, with at most ``val_size`` in all when that still
    leaves one per class. ``split`` records the assignment by relative path, with each file's
    SHA-256, so a resumed run can tell whether the folder changed.
    """
    _check_folder_path(path)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    plain = v2.Compose(_normalize(mean, std))
    augmented = train_transform(augment, image_size, mean, std)
    layout = (path / "train").is_dir() and (path / "test").is_dir()
    parts = ("train", "test") if layout else ("",)
    classes_of, good, skipped = _scan(path, parts, skip_bad_images, verified)
    pool, test_items = {}, {}
    if layout:
        classes = classes_of["train"]
        if classes_of["test"] != classes:
            raise DataError(f"{path}/train and {path}/test have different class folders; give them the same classes.")
        _check_classes(path / "test", good["test"], 1, "test")
        _check_classes(path / "train", good["train"], 2, "training and one validation")
        pool, test_items = good["train"], good["test"]
    else:
        classes = classes_of[""]
        _check_classes(path, good[""], 3, "training, one validation and one test")
        for name, items in good[""].items():
            ordered = _hash_order(items, path, seed)
            n_test = max(len(ordered) // 10, 1)
            test_items[name], pool[name] = ordered[:n_test], ordered[n_test:]
    wanted = {name: max(len(items) // 10, 1) for name, items in pool.items()}
    if sum(wanted.values()) > val_size >= len(wanted):  # cap the validation set, keeping one per class
        wanted = {name: max(n * val_size // sum(wanted.values()), 1) for name, n in wanted.items()}
    train_items, val_items = [], []
    for label, name in enumerate(classes):
        ordered = _hash_order(pool[name], path, seed + 1)
        val_items += [(f, h, label) for f, h in ordered[: wanted[name]]]
        train_items += [(f, h, label) for f, h in ordered[wanted[name]:]]
    tests = [(f, h, classes.index(name)) for name in classes for f, h in test_items[name]]
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset={subset} must be a positive number of training images.")
        order = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(seed + 1))
        train_items = [train_items[i] for i in sorted(order[:subset].tolist())]

    def dataset(items, transform):
        return ImageTensorDataset(_ImageLoader([f for f, _, _ in items], image_size), [y for _, _, y in items],
                                  transform)

    def rel(items):
        return [f.relative_to(path).as_posix() for f, _, _ in items]

    split = {"files": {f.relative_to(path).as_posix(): h for f, h, _ in train_items + val_items + tests},
             "train": rel(train_items), "val": rel(val_items), "test": rel(tests)}
    return DataBundle(
        train=dataset(train_items, augmented), val=dataset(val_items, plain), test=dataset(tests, plain),
        classes=tuple(classes), source=f"folder:{path}", mean=mean, std=std, split=split,
        skipped={what: n for what, n in skipped.items() if n},
    )


# --------------------------------------------------------------------------- the entry point


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

    Returns:
        A :class:`DataBundle`; its ``source`` says which data was loaded.

    Raises:
        DataError: missing, corrupt or malformed data, with what to do about it.
    """
    if name == "synthetic":
        return _synthetic(image_size, augment, val_size, seed, subset)
    if name == "cifar10":
        try:
            return _cifar10(root, image_size, augment, val_size, seed, subset, download)
        except DataError as err:
            if not allow_synthetic or isinstance(err, CorruptDataError):
                raise
            warnings.warn(f"{str(err).rstrip('.')}; using the offline synthetic stand-in instead.", stacklevel=2)
            return _synthetic(image_size, augment, val_size, seed, subset)
    looks_like_path = os.sep in name or name.startswith(".") or Path(name).expanduser().exists()
    if not looks_like_path:
        raise DataError(f"unknown dataset {name!r}; use 'cifar10', 'synthetic' or the path of an image folder.")
    return _folder(Path(name).expanduser(), image_size, augment, val_size, seed, subset, skip_bad_images, verified)
