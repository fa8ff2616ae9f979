"""Seconds each book chapter takes to execute, against the course's target of 5 minutes a page.

Usage::

    python benchmarks/chapter_timing.py                        # every book/ch*.ipynb, training included
    python benchmarks/chapter_timing.py ch01 ch04              # only these chapters (a number, a name or a path)
    python benchmarks/chapter_timing.py --cached ch05          # reuse the training runs in _build/runs

Each chapter runs alone in a fresh kernel (nbclient), with the repository on ``PYTHONPATH`` so the
notebook imports this checkout's ``vitcourse``. By default the runs folder (``VITCOURSE_RUNS``) is a
new temporary folder, so a chapter trains its models as a first build of the book would; ``--cached``
points it at ``_build/runs`` instead, as a second build would. The script prints one row a chapter:
its seconds, the target and ``ok`` or ``over``, or ``failed`` with the error's first line. It is a
measurement, so the exit status is 0 whatever the times (2 only for a bad argument). Times on a busy
machine are longer than on an idle one: say which when you quote them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
TARGET_SECONDS = 300.0
"""What one chapter page may take to execute on two CPU cores."""


def find_chapters(names: list[str]) -> list[Path]:
    """The chapter notebooks named (``ch01``, ``ch01_attention``, or a path), or all of ``book/ch*.ipynb``.

    Raises:
        ValueError: naming a chapter that matches no notebook, and the chapters there are.
    """
    every = sorted(BOOK.glob("ch*.ipynb"))
    if not names:
        return every
    chosen = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.is_file():
            chosen.append(path.resolve())
            continue
        matches = [p for p in every if p.stem == name or p.stem.startswith(f"{name}_")]
        if len(matches) != 1:
            known = ", ".join(p.stem.split("_")[0] for p in every)
            raise ValueError(f"no single chapter notebook matches {name!r}; name one of {known} or give a path.")
        chosen.append(matches[0])
    return chosen


@contextmanager
def environment(**values: str):
    """Set environment variables for the kernels started inside the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute(notebook: Path, timeout: float) -> tuple[float, str | None]:
    """Run ``notebook`` top to bottom in a fresh kernel from ``book/``; (seconds, first line of the error or None)."""
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(BOOK)}})
    start = time.perf_counter()
    try:
        client.execute()
    except Exception as err:  # a failing cell: report it in the table, keep timing the others
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return time.perf_counter() - start, lines[-1][:100]
    return time.perf_counter() - start, None


def main(argv: list[str] | None = None) -> int:
    """Time the chapters from the command line; exit status 0, or 2 for a bad argument."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="chapters to run (default: every book/ch*.ipynb)")
    parser.add_argument("--cached", action="store_true", help="reuse the training runs in _build/runs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a cell may take (default 1800)")
    args = parser.parse_args(argv)
    try:
        chapters = find_chapters(args.chapters)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("error: --timeout must be a positive number of seconds.", file=sys.stderr)
        return 2

    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitcourse-runs-") as fresh:
        runs = ROOT / "_build" / "runs" if args.cached else Path(fresh)
        with environment(PYTHONPATH=python_path, VITCOURSE_RUNS=str(runs)):
            for notebook in tqdm(chapters, desc="chapters", unit="chapter"):
                rows.append((notebook.stem, *execute(notebook, args.timeout)))

    print(f"runs folder: {'_build/runs (--cached)' if args.cached else 'a fresh temporary folder'}")
    print(f"{'chapter':<20} {'seconds':>8} {'target':>7}  verdict")
    for name, seconds, error in rows:
        verdict = f"failed: {error}" if error else ("ok" if seconds <= TARGET_SECONDS else "over")
        print(f"{name:<20} {seconds:8.1f} {TARGET_SECONDS:7.0f}  {verdict}")
    print(f"{'total':<20} {sum(seconds for _, seconds, _ in rows):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
