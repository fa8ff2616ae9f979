"""The offline stand-in for CIFAR-10: ten classes of shapes and textures, drawn at random.

It exists so every notebook runs without a download; the class of an image is its largest
object's shape or texture, never its colour. The fixed pools are cached on disk in
:func:`vitcourse.paths.data_root` under a name that changes whenever the drawing code does.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..paths import atomic_write, data_root, folder_lock
from .bundle import DataBundle, array_bundle

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_VERSION", "make_synthetic", "synthetic_bundle"]

SYNTHETIC_CLASSES = (
    "disk", "square", "triangle", "plus", "ring",
    "h-stripes", "v-stripes", "diag-stripes", "checker", "dots",
)
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 20_000, 4_000



def make_synthetic(n: int, *, seed: int, image_size: int = 32, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic, offline 10-class image dataset of shapes and textures.

    Each image's label names its largest object: a disk, a square, a triangle, a plus, a ring,
    horizontal / vertical / diagonal stripes, a checkerboard or a grid of dots, at a random
    position and scale (square, triangle and plus also rotated), sometimes cut by the border.
    Every colour is random, so colour says nothing about the class. To make the task hard
    enough that models differ, the object sits on a shaded background with up to three smaller
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

    Layers, back to front: a darkish two-colour gradient background; up to three small clutter objects of
    any kind; the labelled object (random scale, position, bright colour, sometimes a colour gradient,
    and a rotation for the kinds a rotation keeps); in 40% of images an occluding rectangle; noise.
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
    first = colours(0.0, 0.6)  # darkish backgrounds, shaded
    image = first + (colours(0.0, 0.6) - first) * ramp  # (b, s, s, 3)

    for _ in range(3):  # clutter: small objects of random kinds, each present with probability 0.6
        kinds = rng.integers(0, len(SYNTHETIC_CLASSES), b)
        mask, *_ = objects(kinds, 0.07, 0.13, 0.5, 0.6, rng.uniform(-0.5, 0.5, b).astype(f32))
        mask &= (rng.random(b) < 0.6)[:, None, None]
        image = np.where(mask[..., None], colours(0.2, 1.0), image)

    rotatable = np.isin(labels, (1, 2, 3))  # square, triangle, plus; stripes keep their direction
    tilt = np.where(rotatable, rng.uniform(-0.6, 0.6, b), rng.uniform(-0.15, 0.15, b)).astype(f32)
    mask, radius, cy, cx, dx = objects(labels, 0.2, 0.4, 0.8, 1.0, tilt)
    near, far = colours(0.35, 1.0), colours(0.35, 1.0)  # brighter than most backgrounds, not all
    across = np.clip(dx / (2 * radius[:, None, None]) + 0.5, 0, 1)[..., None]  # 0 -> 1 across the object
    graded = (rng.random(b) < 0.4)[:, None, None, None]  # half the objects fade from one colour to another
    paint = np.where(graded, near + (far - near) * across, near)
    image = np.where(mask[..., None], paint, image)

    r = radius[:, None, None]  # occluder: a rectangle over part of the object, in 40% of images
    oy = cy[:, None, None] + rng.uniform(-0.7, 0.7, (b, 1, 1)).astype(f32) * r
    ox = cx[:, None, None] + rng.uniform(-0.7, 0.7, (b, 1, 1)).astype(f32) * r
    half_h, half_w = (rng.uniform(0.2, 0.35, (2, b, 1, 1)).astype(f32) * r)
    occluded = (np.abs(yy - oy) <= half_h) & (np.abs(xx - ox) <= half_w) & (rng.random(b) < 0.4)[:, None, None]
    image = np.where(occluded[..., None], colours(0.0, 0.6), image)

    noise = rng.standard_normal((b, s, s, 3), dtype=f32) * rng.uniform(0.03, 0.09, (b, 1, 1, 1)).astype(f32)
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


SYNTHETIC_VERSION = 3  # the stand-in's edition, named on the pages that use it


def _generator_digest() -> str:
    """A short hash of the code that draws the stand-in: an edited generator never reads an old cache."""
    import inspect

    code = "".join(inspect.getsource(f) for f in (make_synthetic, _draw, _shape_mask))
    return hashlib.sha256(f"{code}{SYNTHETIC_TRAIN}{SYNTHETIC_TEST}".encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=2)
def _synthetic_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed synthetic train pool and test set, cached in memory and in :func:`data_root` on disk."""
    path = data_root() / f"synthetic-v{SYNTHETIC_VERSION}-{_generator_digest()}-{image_size}px.npz"
    with folder_lock(path.parent, "synthetic"):  # processes sharing the cache generate it once
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


def synthetic_bundle(*, image_size: int, augment: str, val_size: int, seed: int, subset: int | None,
                     stats: tuple[Sequence[float], Sequence[float]] | None = None) -> DataBundle:
    """The stand-in's fixed pools as a bundle, normalised with ``stats`` (default: the pool's own)."""
    images, labels, test_images, test_labels = _synthetic_arrays(image_size)
    if stats is None:
        pixels = images[::10].reshape(-1, 3) / 255.0  # every 10th image is plenty for the statistics
        stats = (tuple(round(float(v), 4) for v in pixels.mean(0)), tuple(round(float(v), 4) for v in pixels.std(0)))
    return array_bundle(images, labels, test_images, test_labels, classes=SYNTHETIC_CLASSES, source="synthetic",
                        stats=stats, image_size=image_size, augment=augment,
                        val_size=min(val_size, SYNTHETIC_TRAIN // 4), seed=seed, subset=subset)
