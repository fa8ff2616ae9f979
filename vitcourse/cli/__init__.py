"""The ``vitcourse`` command (also ``python -m vitcourse``)::

    vitcourse train --config quick --out runs/quick
    vitcourse evaluate runs/quick/best.safetensors
    vitcourse grade submissions/ch01 --out grades/ch01
    vitcourse student-pack --out pack
    vitcourse notebooks --check

All argument parsing of the package is here: ``train`` and ``evaluate`` in
:mod:`vitcourse.cli.train` and :mod:`vitcourse.cli.evaluate` (imported only when used: they
import PyTorch), the shared checks in :mod:`vitcourse.cli.common`; no other module of the
package imports this one.
The other subcommands register themselves with :func:`command`; to add one, write a
function that takes the parsed arguments and returns an exit code, and decorate it::

    @command("stats", help="summarise a run", example="vitcourse stats runs/quick", args=[(("run",), {})])
    def _stats(ns) -> int:
        ...

Problems with the input are reported in one sentence on stderr with exit code 2, never
with a traceback; every path is checked before any work starts (:func:`check_out_dir`,
:func:`check_input_dir`). Nothing heavy is imported until a subcommand runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .common import Parser, UsageError, check_input_dir, check_out_dir, one_line, quiet_closed_stdout

_COMMANDS: dict[str, tuple[str, str, list, Callable]] = {}
REPO_NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
"""The notebooks folder of a source checkout (absent when vitcourse is installed from a wheel)."""


def command(name: str, help: str, args: list | None = None, example: str = "") -> Callable:
    """Register a subcommand ``name``; ``args`` is a list of ``(flags, kwargs)`` for ``add_argument``,
    ``example`` a command line shown by its ``--help``."""

    def register(fn: Callable) -> Callable:
        _COMMANDS[name] = (help, example, args or [], fn)
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
    (("--salt",), {"default": None, "help": "a secret that changes the hidden checks' inputs (default: "
                                            "$VITCOURSE_GRADING_SALT, else a random one kept in OUT/grading-salt.txt "
                                            "and reused by every run into OUT; --salt '' grades unsalted)"}),
    (("--no-progress",), {"action": "store_true", "help": "no progress bar"}),
    (("--hidden",), {"type": Path, "default": None,
                     "help": "the folder of hidden checks (default: grading/hidden of this repository, or $VITCOURSE_HIDDEN)"}),
    (("--unsafe-no-sandbox",), {"action": "store_true",
                                "help": "run student code without the sandbox (only for code you trust)"}),
], example="vitcourse grade submissions/ch01 --out grades/ch01")
def _grade(ns: argparse.Namespace) -> int:
    check_input_dir(ns.submissions, "submissions", "a folder with one <student>.ipynb per student")
    check_out_dir(ns.out, data=ns.submissions, data_flag="the submissions folder")
    if ns.hidden is not None and not ns.hidden.expanduser().exists():
        raise UsageError(f"--hidden {ns.hidden} does not exist; pass the path of the hidden checks to grade with.")
    if ns.workers is not None and ns.workers < 1:
        raise UsageError("--workers must be at least 1.")
    if ns.time_limit is not None and not ns.time_limit > 0:
        raise UsageError("--time-limit must be a positive number of seconds.")

    from vitcourse.grading.batch import GradingError, grade_folder
    from vitcourse.grading.feedback import summary_text
    from vitcourse.grading.grader import Limits
    from vitcourse.grading.spec import load_chapter

    try:
        report = grade_folder(ns.submissions, ns.out, workers=ns.workers, force=ns.force, chapter=ns.chapter,
                              students=ns.student, limits=Limits(exercise_seconds=ns.time_limit),
                              progress=not ns.no_progress, salt=ns.salt, hidden=ns.hidden,
                              unsafe_no_sandbox=ns.unsafe_no_sandbox)
    except GradingError as err:
        raise UsageError(str(err)) from None
    sys.stdout.write(summary_text(report, load_chapter(report.chapter)))
    return 0


def _notebooks_dir(given: Path | None, flag: str) -> Path:
    """The notebooks folder: ``given``, else the source checkout's, else ``./notebooks`` (an installed
    package has no checkout); one sentence if there is none."""
    if given is not None:
        return check_input_dir(given, flag, "the course's notebooks folder (with solutions/ inside)")
    for candidate in (REPO_NOTEBOOKS, Path("notebooks")):
        if (candidate / "solutions").is_dir():
            return candidate
    raise UsageError(f"no notebooks folder found (neither {REPO_NOTEBOOKS} nor ./notebooks); run this in a checkout "
                     f"of the course repository or pass {flag} PATH.")


@command("student-pack", help="write the student notebooks and what they need (no solutions, no hidden checks)",
         args=[(("--out",), {"type": Path, "required": True, "help": "folder to create"}),
               (("--notebooks",), {"type": Path, "default": None,
                                   "help": "the course's notebooks folder (default: the checkout's, else ./notebooks)"})],
         example="vitcourse student-pack --out pack")
def _student_pack(ns: argparse.Namespace) -> int:
    notebooks = _notebooks_dir(ns.notebooks, "--notebooks")
    check_out_dir(ns.out, data=notebooks, data_flag="the notebooks folder")
    from vitcourse.grading.pack import write_student_pack

    try:
        files = write_student_pack(ns.out, notebooks)
    except (FileExistsError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    print(f"Wrote the student pack to {ns.out} ({len(files)} files).")
    return 0


@command("notebooks", help="regenerate the student exercise notebooks from the solution notebooks", args=[
    (("--check",), {"action": "store_true", "help": "only report notebooks that are out of date (exit 1 if any)"}),
    (("--dir",), {"type": Path, "default": None, "help": "the notebooks folder (default: the checkout's, else ./notebooks)"}),
], example="vitcourse notebooks --check")
def _notebooks(ns: argparse.Namespace) -> int:
    ns.dir = _notebooks_dir(ns.dir, "--dir")
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


_MODULE_COMMANDS = {
    "train": ("train a model", "vitcourse.cli.train"),
    "evaluate": ("test accuracy and loss of a checkpoint, as JSON", "vitcourse.cli.evaluate"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand.

    ``train`` and ``evaluate`` get their options from their modules; those import PyTorch, so
    they are filled in only when ``argv`` asks for that subcommand (or for all, if ``argv`` is ``None``).
    """
    import importlib

    parser = Parser(prog="vitcourse", description="Tools of the course 'Vision Transformers from scratch'.",
                                     epilog="Run 'vitcourse COMMAND --help' for a command's options and an example.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, (help_text, module_name) in _MODULE_COMMANDS.items():
        if wanted is not None and wanted != name:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.DESCRIPTION, epilog=module.epilog(f"vitcourse {name}"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    for name, (help_text, example, arguments, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {example}" if example else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for flags, kwargs in arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitcourse`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser(argv).parse_args(argv)
    try:
        return ns.func(ns)
    except UsageError as err:
        print(f"vitcourse {ns.command}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up, a folder became read-only, or stdout's reader went away
        if isinstance(err, BrokenPipeError):
            quiet_closed_stdout()
        print(f"vitcourse {ns.command}: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitcourse {ns.command}: interrupted; finished results are kept, rerun to continue.", file=sys.stderr)
        return 130
