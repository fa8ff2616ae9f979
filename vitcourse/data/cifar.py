"""CIFAR-10 through torchvision: downloaded once into a cache folder, under a lock and a deadline."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ..paths import data_root, downloads_allowed, env_seconds, folder_lock
from .bundle import CorruptDataError, DataBundle, DataError, array_bundle

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "DOWNLOAD_TIMEOUT", "DOWNLOAD_DEADLINE", "download_file",
           "cifar10_bundle"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of the CIFAR-10 training images (values in [0, 1])."""
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the CIFAR-10 training images."""
CIFAR_URL_HINT = "https://www.cs.toronto.edu/~kriz/cifar.html"
DOWNLOAD_TIMEOUT = 60.0
"""Seconds a download waits for the server before it gives up (so the offline fallback cannot hang)."""
DOWNLOAD_DEADLINE = env_seconds("VITCOURSE_DOWNLOAD_DEADLINE", 1800.0)
"""Seconds a whole download may take (``$VITCOURSE_DOWNLOAD_DEADLINE``, default 30 minutes)."""
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def download_file(url: str, dest: str | os.PathLike, *, timeout: float | None = None,
                  deadline: float | None = None, md5: str | None = None) -> None:
    """Download ``url`` to ``dest`` with torchvision's ``download_url``, within ``deadline`` seconds in all.

    torchvision checks the MD5 and shows the progress; this wrapper adds what it lacks: ``timeout``
    bounds each wait for the server (default :data:`DOWNLOAD_TIMEOUT`) and ``deadline`` the whole
    transfer (default :data:`DOWNLOAD_DEADLINE`), so a server that answers, but too slowly, cannot
    stall a run forever. The file is written in a private folder beside ``dest`` and moved into
    place only when complete, so ``dest`` is never half a file.

    Raises:
        TimeoutError: the deadline passed. ``OSError``: no connection. ``ValueError``: bad checksum.
    """
    from torchvision.datasets.utils import download_url

    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    deadline = DOWNLOAD_DEADLINE if deadline is None else deadline
    dest = Path(dest)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    failure: list[BaseException] = []

    def fetch() -> None:
        try:
            download_url(url, str(work), dest.name, md5=md5)
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision opens its connections without a timeout of their own
    try:
        worker = threading.Thread(target=fetch, daemon=True)
        worker.start()
        worker.join(deadline)
        if worker.is_alive():  # the thread may go on writing into `work`, which is removed below
            raise TimeoutError(f"the download took longer than {deadline:.0f} s")
        if failure:
            err = failure[0]
            if isinstance(err, RuntimeError) and "corrupted" in str(err):
                raise ValueError("the downloaded file fails its checksum") from None
            raise err
        os.replace(work / dest.name, dest)
    finally:
        socket.setdefaulttimeout(previous)
        shutil.rmtree(work, ignore_errors=True)


def _download_cifar(root: Path) -> None:
    """Download and unpack CIFAR-10 into ``root/cifar-10-batches-py`` (within :data:`DOWNLOAD_DEADLINE`)."""
    from torchvision.datasets.utils import extract_archive

    archive = root / "cifar-10-python.tar.gz"
    if not archive.exists():
        download_file(CIFAR10_URL, archive, md5=CIFAR10_MD5)
    extract_archive(str(archive), str(root), remove_finished=True)


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
            with folder_lock(root, "cifar10"):  # one process downloads; the others wait, then find it
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


def cifar10_bundle(root: str | os.PathLike | None, *, image_size: int, augment: str, val_size: int, seed: int,
                   subset: int | None, download: bool,
                   stats: tuple[Sequence[float], Sequence[float]] | None = None) -> DataBundle:
    """CIFAR-10 from the cache ``root`` (see :func:`vitcourse.paths.data_root`), 45,000/5,000 train/val by
    default, normalised with ``stats`` (default: CIFAR-10's own)."""
    if image_size != 32:
        raise ValueError(f"CIFAR-10 images are 32x32; use image_size=32 (got {image_size}).")
    x_train, y_train, x_test, y_test = _cifar_arrays(data_root(root), download)
    return array_bundle(x_train, y_train, x_test, y_test, classes=CIFAR10_CLASSES, source="cifar10",
                        stats=stats or (CIFAR10_MEAN, CIFAR10_STD), image_size=32, augment=augment,
                        val_size=val_size, seed=seed, subset=subset)
