"""Grading throughput: chapter 1 submissions per second with a warm worker pool.

Usage::

    python benchmarks/grading_throughput.py [--submissions N] [--workers W] [FOLDER]

Without FOLDER it builds N submissions from the chapter 1 solution, the student stub and a
few partly wrong variants from the test corpus, grades them into a temporary folder and
reports submissions per second, worker start-up included. Target on the course's 2-core
machine: at least 2 per second (measured with 40 submissions and 2 workers, inside bubblewrap: about 12
on an idle machine before the hidden checks got runs of their own, which cost about 30%; about 5 since,
with another job running on the machine).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from vitcourse.grading.batch import grade_folder

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [
    ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb",
    ROOT / "notebooks" / "ch01_exercises.ipynb",
    ROOT / "tests" / "grading_corpus" / "ch01" / "naive_softmax.ipynb",
    ROOT / "tests" / "grading_corpus" / "ch01" / "duplicated_cells.ipynb",
    ROOT / "tests" / "grading_corpus" / "ch01" / "missing_cell.ipynb",
]


def make_folder(n: int) -> Path:
    """A folder of ``n`` chapter 1 submissions cycling through a few realistic variants."""
    folder = Path(tempfile.mkdtemp(prefix="vitcourse-bench-"))
    for i in range(n):
        shutil.copy(VARIANTS[i % len(VARIANTS)], folder / f"student{i:04d}.ipynb")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="chapter 1 submissions (default: generated)")
    parser.add_argument("--submissions", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = args.folder or make_folder(args.submissions)
    n = len(list(folder.glob("*.ipynb")))
    out = Path(tempfile.mkdtemp(prefix="vitcourse-bench-out-"))
    start = time.monotonic()
    report = grade_folder(folder, out, workers=args.workers, chapter="ch01", progress=False)
    total = time.monotonic() - start
    print(report.sandbox)
    print(f"{n} chapter 1 submissions, {args.workers} workers: {total:.1f} s, "
          f"{n / total:.2f} submissions/s including worker start-up (target: at least 2/s on 2 cores)")
    shutil.rmtree(out, ignore_errors=True)
    if args.folder is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
