"""Where things live and how files are written: the environment's settings in one place.

Every module that needs a folder or writes a file asks here, and this module imports nothing
of the course, so anything can import it without a circle:

* :func:`runs_dir` - training runs (``$VITCOURSE_RUNS``, else ``./runs``);
* :func:`data_root` - the dataset cache (``$VITCOURSE_DATA``, else ``~/.cache/vitcourse/data``);
* :func:`downloads_allowed` - ``False`` when ``$VITCOURSE_OFFLINE`` is set;
* :func:`atomic_write` - readers see the old file or the new one, never half of it;
* :func:`folder_lock` - processes sharing a folder take turns preparing it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["runs_dir", "data_root", "downloads_allowed", "env_seconds", "atomic_write", "folder_lock"]


def runs_dir() -> Path:
    """Where chapters keep training runs: ``$VITCOURSE_RUNS`` if set, else ``./runs``.

    The Makefile points it at ``_build/runs`` so the book build and the notebook
    tests share finished runs (a finished run is resumed, not retrained) and
    ``make clean`` removes them.
    """
    return Path(os.environ.get("VITCOURSE_RUNS") or "runs").expanduser()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets are cached: ``root`` if given, else ``$VITCOURSE_DATA``, else ``~/.cache/vitcourse/data``."""
    return Path(root or os.environ.get("VITCOURSE_DATA") or "~/.cache/vitcourse/data").expanduser()


def downloads_allowed() -> bool:
    """False when the environment variable ``VITCOURSE_OFFLINE`` is set (to anything but ``0`` or empty)."""
    return os.environ.get("VITCOURSE_OFFLINE", "") in ("", "0")


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name``; ``default`` if unset or not one."""
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


def atomic_write(path: str | os.PathLike, data: str | bytes, mode: int | None = None) -> None:
    """Write a file so that readers see the old content or the new, never half of it.

    The bytes go to a temporary file in the same folder, are flushed to disk, and replace
    ``path`` in one ``os.replace``; the folder is created if needed. The file gets the
    permissions ``mode`` if given, else those a new file gets under the process's umask
    (a temporary file alone would be private, ``0600``, and a shared checkpoint unreadable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fchmod(f.fileno(), _new_file_mode() if mode is None else mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """``0o666`` less the process's umask: what ``open(path, "w")`` would give a new file."""
    try:  # Linux names the umask without changing it (os.umask would, for every thread at once)
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = "vitcourse") -> Iterator[None]:
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
