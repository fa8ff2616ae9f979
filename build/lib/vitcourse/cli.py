"""The ``vitcourse`` command (also ``python -m vitcourse``).

Subcommands register themselves with :func:`command`; to add one, write a function
that takes the parsed arguments and returns an exit code, and decorate it::

    @command("train", help="train a model", args=[(("--epochs",), {"type": int, "default": 1})])
    def _train(ns) -> int:
        ...

Problems with the input are reported in one sentence on stderr with a non-zero
exit code, never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

_COMMANDS: dict[str, tuple[str, list, Callable]] = {}
REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class UsageError(Exception):
    """Bad input to a subcommand: printed as one line, exit code 2."""


def command(name: str, help: str, args: list | None = None) -> Callable:
    """Register a subcommand ``name``; ``args`` is a list of ``(flags, kwargs)`` for ``add_argument``."""

    def register(fn: Callable) -> Callable:
        _COMMANDS[name] = (help, args or [], fn)
        return fn

    return register


@command("grade", help="grade a folder of submitted exercise notebooks", args=[
    (("submissions",), {"type": Path, "help": "folder with one <student>.ipynb per student"}),
    (("--out",), {"type": Path, "required": True, "help": "output folder (grades.csv, feedback/)"}),
    (("--workers",), {"type": int, "default": None, "help": "parallel workers (default: CPU cores)"}),
    (("--force",), {"action": "store_true", "help": "regrade students that already have a grade"}),
    (("--student",), {"action": "append", "help": "grade only this student (repeatable)"}),
    (("--chapter",), {"help": "ch01, ch02, ... (default: detected)"}),
    (("--time-limit",), {"type": float, "default": None,
                       "help": "wall-time seconds per exercise (default: the chapter's, 10 s; 30 s for chapter 7)"}),
    (("--salt",), {"default": None, "help": "a secret that changes the hidden checks' inputs "
                                            "(default: $VITCOURSE_GRADING_SALT, else none)"}),
    (("--no-progress",), {"action": "store_true", "help": "no progress bar"}),
])
def _grade(ns: argparse.Namespace) -> int:
    from vitcourse.grading.batch import GradingError, grade_folder
    from vitcourse.grading.feedback import summary_text
    from vitcourse.grading.grader import Limits
    from vitcourse.grading.spec import load_chapter

    if ns.workers is not None and ns.workers < 1:
        raise UsageError("--workers must be at least 1.")
    try:
        report = grade_folder(ns.submissions, ns.out, workers=ns.workers, force=ns.force, chapter=ns.chapter,
                              students=ns.student, limits=Limits(exercise_seconds=ns.time_limit),
                              progress=not ns.no_progress, salt=ns.salt)
    except GradingError as err:
        raise UsageError(str(err)) from None
    sys.stdout.write(summary_text(report, load_chapter(report.chapter)))
    return 0


@command("student-pack", help="write the student notebooks and what they need (no solutions, no hidden checks)",
         args=[(("--out",), {"type": Path, "required": True, "help": "folder to create"})])
def _student_pack(ns: argparse.Namespace) -> int:
    from vitcourse.grading.pack import write_student_pack

    try:
        files = write_student_pack(ns.out, REPO_NOTEBOOKS)
    except (FileExistsError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    print(f"Wrote the student pack to {ns.out} ({len(files)} files).")
    return 0


@command("notebooks", help="regenerate the student exercise notebooks from the solution notebooks", args=[
    (("--check",), {"action": "store_true", "help": "only report notebooks that are out of date (exit 1 if any)"}),
    (("--dir",), {"type": Path, "default": REPO_NOTEBOOKS, "help": "the notebooks folder"}),
])
def _notebooks(ns: argparse.Namespace) -> int:
    from vitcourse.grading.generate import regenerate
    from vitcourse.grading.spec import chapter_names, load_chapter

    changed = []
    for name in chapter_names():
        chapter = load_chapter(name)
        if not (ns.dir / "solutions" / chapter.notebook).exists():
            raise UsageError(f"{ns.dir / 'solutions' / chapter.notebook} is missing; it is the source of {name}'s exercises.")
        try:
            changed += regenerate(ns.dir, chapter, write=not ns.check)
        except ValueError as err:
            raise UsageError(f"{chapter.notebook}: {err}") from None
    verb = "out of date" if ns.check else "written"
    for path in changed:
        print(f"{verb}: {path}")
    if not changed:
        print("every exercise notebook is up to date")
    return 1 if ns.check and changed else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vitcourse", description="Tools of the course 'Vision Transformers from scratch'.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, arguments, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for flags, kwargs in arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitcourse`` command; returns the exit code."""
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except UsageError as err:
        print(f"vitcourse {ns.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitcourse {ns.command}: interrupted; finished results are kept, rerun to continue.", file=sys.stderr)
        return 130
