"""Grading throughput, and the time hostile submissions can take.

Usage::

    python benchmarks/grading_throughput.py [--submissions N] [--workers W] [FOLDER]
    python benchmarks/grading_throughput.py --hostile

Without FOLDER it builds N submissions from the chapter 1 solution, the student stub and a
few partly wrong variants from the test corpus, grades them into a temporary folder and
reports submissions per second, zygote start-up included. Target on the course's 2-core
machine: at least 2 per second (each submission in fresh namespaces inside bubblewrap: about 4
on an idle machine, about 2.2 with other jobs using both cores).

``--hostile`` grades the corpus's attacks on the grader's time (``timed`` in
``tests/grading_corpus/expected.json``) with the chapter's real budgets and prints, for each,
the seconds it took against its cap: the sum of its budgets plus 10 s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from vitcourse.grading.batch import grade_folder
from vitcourse.grading.grader import Limits
from vitcourse.grading.spec import load_chapter

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
    parser.add_argument("--hostile", action="store_true", help="time the attacks on the grader's time instead")
    args = parser.parse_args()
    if args.hostile:
        hostile(args.workers)
        return
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


def hostile(workers: int) -> None:
    """Grade the timed attacks of the corpus with real budgets; print seconds against each cap."""
    import json

    expected = json.loads((ROOT / "tests" / "grading_corpus" / "expected.json").read_text())
    folder = Path(tempfile.mkdtemp(prefix="vitcourse-bench-"))
    for name, want in expected.items():
        if want.get("timed") and name.startswith("ch01/"):
            shutil.copy(ROOT / "tests" / "grading_corpus" / f"{name}.ipynb", folder)
    out = Path(tempfile.mkdtemp(prefix="vitcourse-bench-out-"))
    report = grade_folder(folder, out, workers=workers, chapter="ch01", progress=False)
    cap = Limits().cap(load_chapter("ch01")) + 10
    for r in report.results:
        print(f"{r.student:40s} {r.seconds:6.1f} s of at most {cap:g} s ({r.seconds / cap:.0%}), score {r.total:g}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
