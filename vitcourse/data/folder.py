"""Your own images, in torchvision's ``ImageFolder`` layout (``<folder>/<class>/<image>``).

Every file is checked once before anything trains: unreadable and corrupt files are named,
hidden files and folders, AppleDouble ``._*`` files and non-images are skipped and counted;
the split is stratified by class and recorded by file, with each file's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from .bundle import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    DataError,
    ImageTensorDataset,
    eval_transform,
    train_transform,
)
from .images import ImageError, decode_rgb8, display_name, open_rgb8

__all__ = ["IMAGE_EXTENSIONS", "CHECK_PROGRESS_FROM", "check_folder_path", "folder_bundle"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

CHECK_PROGRESS_FROM = 500
"""Folders with at least this many files show a progress bar while they are checked."""
_NAMED = 10  # bad files named in an error message; the rest are counted


def check_folder_path(path: Path) -> None:
    if path.is_file():
        raise DataError(f"{display_name(path)} is a file, not a folder; pass a folder of images laid out as <folder>/<class>/<image>.")
    if not path.is_dir():
        raise DataError(f"image folder {display_name(path)} does not exist; pass a directory laid out as <folder>/<class>/<image>.")


def _inventory(path: Path) -> tuple[list[str], dict[str, list[Path]], Counter, list[Path]]:
    """Class folders of ``path`` and the candidate image files in each, without opening any.

    Skipped, and counted in the returned ``Counter``: hidden files and folders at any depth
    (names starting with ``.``; macOS's ``._name`` AppleDouble files are counted apart), the
    ``__MACOSX`` folders zip archives carry, files that are not images (by extension), and
    files lying directly in ``path`` outside any class folder. Also returns the sub-folders that
    could not be listed (no permission): their images would otherwise be missing without a word.
    """
    check_folder_path(path)
    skipped: Counter = Counter()
    classes = []
    try:
        entries = sorted(path.iterdir())
    except OSError as err:
        raise DataError(f"image folder {display_name(path)} cannot be read ({err.strerror or err}); check its permissions.") from None
    for entry in entries:
        if entry.name.startswith(".") or entry.name == "__MACOSX":
            skipped["hidden files and folders"] += 1
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            skipped["files outside class folders"] += 1
    if not classes:
        raise DataError(f"image folder {display_name(path)} has no class sub-folders; put each class's images in {display_name(path)}/<class>/.")
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
    """``(problem, sha256)`` of one file: problem ``None`` (a good image) or an :class:`ImageError`'s kind
    (``"unreadable"``, ``"corrupt"``, ``"too large"``, ``"unsupported"``).

    The file is read once; Pillow's ``verify`` checks its structure and a full decode by
    :func:`~vitcourse.data.images.decode_rgb8`, the one training uses, catches truncated pixel data
    (which ``verify`` alone lets through), decompression bombs and pixel formats without an 8-bit rule.
    """
    from PIL import Image

    try:
        data = file.read_bytes()
    except OSError:  # no permission, a broken link, an I/O error
        return "unreadable", ""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Image.DecompressionBombError:
        return "too large", ""
    except Exception:  # Pillow raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        return "corrupt", ""
    try:
        decode_rgb8(data, file)
    except ImageError as err:
        return err.kind, ""
    return None, hashlib.sha256(data).hexdigest()


def _check_images(files: list[Path], progress: bool = True) -> list[tuple[str | None, str]]:
    """:func:`_check_image` on every file, in parallel threads, with a progress bar for large folders."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    workers = min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), desc="checking images", unit="file",
                                                   disable=not progress or len(files) < CHECK_PROGRESS_FROM, leave=False,
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
                      ("corrupt", "corrupt (damaged, truncated or not an image"),
                      ("too large", f"too large to decode safely (more than {_pixel_limit()} pixels, a possible "
                                    f"decompression bomb"),
                      ("unsupported", "in a pixel format with no 8-bit RGB rule (such as 32-bit float")):
        paths = bad.get(kind, [])
        if not paths:
            continue
        shown = [display_name(p.relative_to(root)) for p in paths[:named]]
        named -= len(shown)
        more = f" and {len(paths) - len(shown)} more" if len(paths) > len(shown) else ""
        parts.append(f"{len(paths)} {why}: {', '.join(shown)}{more})")
    n = sum(len(v) for v in bad.values())
    return (f"{n} of the {total} images in {display_name(root)} cannot be used: {' and '.join(parts)}; fix or delete "
            f"them, or pass --skip-bad-images to leave them out.")


def _pixel_limit() -> str:
    from PIL import Image

    return f"{Image.MAX_IMAGE_PIXELS:,}" if Image.MAX_IMAGE_PIXELS else "Pillow's limit of"


def _scan(root: Path, parts: Sequence[str], skip_bad_images: bool, verified: dict[str, str] | None = None,
          progress: bool = True):
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
        checked = dict(zip(everything, _check_images(everything, progress)))
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
            raise DataError(f"class folder {display_name(folder / name)} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, "
                            f"...); add images to it or remove it.")
    if len(per_class) < 2:
        (only,) = per_class
        raise DataError(f"image folder {display_name(folder)} has only one class folder ({display_name(only)}); a classifier needs at least two, "
                        f"so add a folder of images for another class beside it.")
    for name, found in per_class.items():
        if len(found) < needed:
            missing = needed - len(found)
            raise DataError(f"class folder {display_name(folder / name)} has only {len(found)} usable image"
                            f"{'s' if len(found) != 1 else ''}, too few for one {roles} image; add at least "
                            f"{missing} more.")


def _hash_order(items: list[tuple[Path, str]], root: Path, seed: int) -> list[tuple[Path, str]]:
    """``items`` in a seeded order that depends on each file's own path, not on the other files."""
    def key(item):
        return hashlib.sha256(f"{seed}:{item[0].relative_to(root).as_posix()}".encode("utf-8", "surrogateescape")).hexdigest()

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
        try:
            pixels = np.asarray(open_rgb8(self.files[i]))  # (H, W, 3) uint8, by the rules the check used
        except ImageError as err:
            raise DataError(f"cannot read image {display_name(self.files[i])}: it became {err.kind} after the folder "
                            f"was checked; fix or delete it.") from None
        return self.resize(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (3, S, S)


def folder_bundle(path: Path, *, image_size: int, augment: str, val_size: int, seed: int, subset: int | None,
                  skip_bad_images: bool = False, verified: dict[str, str] | None = None,
                  stats: tuple[Sequence[float], Sequence[float]] | None = None, progress: bool = True) -> DataBundle:
    """An image folder: ``path/train`` + ``path/test`` if both exist, else one folder split three ways.

    Every file is checked once first (see :func:`_scan`). The split is stratified and seeded:
    in each class, the files are ordered by a hash of the seed and their own path; without a
    ``train``/``test`` layout the first 10% (at least one) are the test images; of the rest,
    10% (at least one) are validation images, with at most ``val_size`` in all when that still
    leaves one per class. ``split`` records the assignment by relative path, with each file's
    SHA-256, so a resumed run can tell whether the folder changed.
    """
    check_folder_path(path)
    mean, std = stats or (IMAGENET_MEAN, IMAGENET_STD)
    plain = eval_transform(mean, std)
    augmented = train_transform(augment, image_size, mean, std)
    layout = (path / "train").is_dir() and (path / "test").is_dir()
    parts = ("train", "test") if layout else ("",)
    classes_of, good, skipped = _scan(path, parts, skip_bad_images, verified, progress)
    pool, test_items = {}, {}
    if layout:
        classes = classes_of["train"]
        if classes_of["test"] != classes:
            raise DataError(f"{display_name(path)}/train and {display_name(path)}/test have different class folders; give them the same classes.")
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


