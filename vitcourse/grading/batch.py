"""``vitcourse grade``: a folder of submissions in, grades.csv and feedback pages out.

Parallel (one warm sandboxed worker per thread), resumable (one result file per
student, written atomically; a rerun skips students whose notebook and grader are
unchanged unless ``force``), and robust: nothing a submission contains stops the
batch.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import queue
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from .feedback import write_feedback, write_summary
from .grader import CheckResult, Limits, StudentResult, SubmissionGrader, build_units, file_sha256
from .notebook import detect_chapter, read_cells
from .sandbox import Worker, build_view, bwrap_status
from .spec import Chapter, chapter_names, load_chapter


class GradingError(Exception):
    """A problem with the grader's input (not with a submission): one sentence, no traceback."""


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def student_key(name: str) -> str:
    """A file-system-safe, unique key for a student name (used for result and feedback files)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] or "student"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


SALT_VARIABLE = "VITCOURSE_GRADING_SALT"
"""Environment variable holding the instructor's secret salt for hidden-check inputs."""


def _imported_sources(path: Path, found: set[Path]) -> None:
    """Add ``path`` and every module of the ``vitcourse`` package it imports, transitively, to ``found``."""
    if path in found or not path.is_file():
        return
    found.add(path)
    root = Path(__file__).resolve().parent.parent.parent  # holds the vitcourse package
    package = path.relative_to(root).parent.parts  # ("vitcourse", "grading", "exercises")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            names = [module] + [module + [alias.name] for alias in node.names]  # a module or a name in it
        else:
            continue
        for parts in names:
            if parts[:1] == ["vitcourse"]:
                _imported_sources(root.joinpath(*parts).with_suffix(".py"), found)
                for depth in range(1, len(parts) + 1):  # the packages on the way run too
                    _imported_sources(root.joinpath(*parts[:depth], "__init__.py"), found)


def version_sources(chapter: str) -> list[Path]:
    """The files that decide a grade: the grading code, the chapter's specs and hidden checks,
    and every module they import (``exercises/_common.py``, the reference modules that compute
    the expected values, ...)."""
    here = Path(__file__).resolve().parent
    found: set[Path] = set()
    for path in [*here.glob("*.py"), here / "exercises" / f"{chapter}.py", here / "hidden" / "__init__.py",
                 here / "hidden" / f"{chapter}.py"]:
        _imported_sources(path, found)
    return sorted(found)


def grader_version(chapter: str, salt: str = "") -> str:
    """Hash of :func:`version_sources` and of the salt of the hidden inputs: a change means results are regraded."""
    digest = hashlib.sha256(hashlib.sha256(salt.encode()).digest())
    for path in version_sources(chapter):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class BatchReport:
    """What a batch did (the CLI prints it)."""

    sandbox: str
    chapter: str
    graded: int
    skipped: int
    seconds: float
    results: list[StudentResult]
    out: Path


def find_submissions(folder: Path) -> list[Path]:
    """The ``.ipynb`` files of a submissions folder, sorted by name."""
    if not folder.is_dir():
        raise GradingError(f"{folder} is not a folder; give the folder that holds one notebook per student.")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".ipynb" and not p.name.startswith("."))
    if not files:
        raise GradingError(f"{folder} holds no .ipynb files; put one notebook per student there, named after the student.")
    return files


def choose_chapter(files: list[Path], chapter: str | None) -> str:
    """The chapter given, else the one most submissions look like."""
    known = chapter_names()
    if chapter:
        if chapter not in known:
            raise GradingError(f"unknown chapter {chapter!r}; choose one of {', '.join(known)}.")
        return chapter
    votes: dict[str, int] = {}
    for f in files:
        found = detect_chapter(read_cells(f), known)
        if found:
            votes[found] = votes.get(found, 0) + 1
    if not votes:
        raise GradingError("could not tell which exercise notebook these are; pass --chapter (for example ch01).")
    return max(votes, key=votes.get)


def _number(value, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _well_formed(r: StudentResult, submission: Path, spec: Chapter) -> bool:
    """Whether a stored result is exactly what this grader writes for this submission and chapter."""
    points = {ex.id: ex.points for ex in spec.exercises}
    earned = dict.fromkeys(points, 0.0)
    for c in r.checks:
        if not (isinstance(c, CheckResult) and c.exercise in points and isinstance(c.description, str)
                and isinstance(c.hidden, bool) and isinstance(c.message, str)
                and _number(c.points, 0, points[c.exercise]) and _number(c.earned, 0, c.points)):
            return False
        earned[c.exercise] += c.earned
    return (r.student == submission.stem and r.file == submission.name and r.chapter == spec.name
            and isinstance(r.sha256, str) and isinstance(r.version, str) and isinstance(r.sandbox, bool)
            and r.maximum == points and isinstance(r.scores, dict) and set(r.scores) == set(points)
            and all(_number(r.scores[e], 0, points[e]) and abs(r.scores[e] - earned[e]) <= 0.01 * (len(r.checks) + 1)
                    for e in points)
            and isinstance(r.problems, list) and all(isinstance(p, str) for p in r.problems))


def _load_result(path: Path, submission: Path, spec: Chapter) -> StudentResult | None:
    """The stored result of ``submission``, or None if it is missing or not well formed (then it is regraded)."""
    try:
        data = json.loads(path.read_text())
        result = StudentResult.from_json(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if set(data) != {f.name for f in fields(StudentResult)}:
        return None
    return result if _well_formed(result, submission, spec) else None


def write_csv(out: Path, results: list[StudentResult], exercise_ids: list[str]) -> None:
    """``grades.csv``: student, total, max, then one column per exercise (atomically)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", "total", "max", *exercise_ids])
    for r in sorted(results, key=lambda r: r.student):
        writer.writerow([r.student, f"{r.total:g}", f"{r.max_total:g}", *(f"{r.scores.get(e, 0):g}" for e in exercise_ids)])
    atomic_write(out / "grades.csv", buffer.getvalue())


def grade_folder(
    submissions: Path, out: Path, workers: int | None = None, force: bool = False,
    chapter: str | None = None, students: list[str] | None = None, limits: Limits | None = None,
    sandbox: bool | None = None, progress: bool = True, salt: str | None = None,
) -> BatchReport:
    """Grade every notebook in ``submissions`` into ``out``; see the module docstring.

    Args:
        submissions: folder with one ``<student>.ipynb`` per student.
        out: output folder (``grades.csv``, ``feedback/``, ``results/``, summary files).
        workers: parallel workers (default: the number of CPU cores).
        force: regrade students that already have a result.
        chapter: ``ch01`` ...; default: detected from the notebooks.
        students: grade only these students (file names without ``.ipynb``).
        limits: resource limits per submission.
        sandbox: use bubblewrap (``None``: whenever it works).
        salt: a secret that changes the hidden checks' inputs (``None``: the environment
            variable ``VITCOURSE_GRADING_SALT``, else none).
    """
    start = time.monotonic()
    files = find_submissions(Path(submissions))
    if students:
        wanted = set(students)
        files = [f for f in files if f.stem in wanted]
        missing = wanted - {f.stem for f in files}
        if missing:
            raise GradingError(f"no submission for {', '.join(sorted(missing))} in {submissions}.")
    name = choose_chapter(files, chapter)
    spec = load_chapter(name)
    salt = os.environ.get(SALT_VARIABLE, "") if salt is None else salt
    version = grader_version(name, salt)
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    usable, description = bwrap_status()
    use_sandbox = usable if sandbox is None else sandbox and usable
    why = description if not usable else "disabled"
    sandbox_line = (f"Sandbox: {description}; student code ran isolated, without network." if use_sandbox else
                    f"NO SANDBOX: {why}; student code ran with resource limits only, as this user: "
                    "it could read and change this machine's files.")
    if not use_sandbox:  # said before grading starts too, not only in the report
        sys.stderr.write(f"NO SANDBOX: {why}; student code will run with resource limits only, as this user: "
                         "it can read and change this machine's files.\n")

    results: dict[str, StudentResult] = {}
    pending: list[tuple[Path, str]] = []
    for f in find_submissions(Path(submissions)):  # every student stays in the CSV
        key = student_key(f.stem)
        old = _load_result(out / "results" / f"{key}.json", f, spec)
        if f in files:
            sha = file_sha256(f)
            unsafe = old is not None and use_sandbox and not old.sandbox  # graded without one before
            if force or old is None or unsafe or old.sha256 != sha or old.version != version:
                pending.append((f, sha))
                continue
        if old is not None:
            results[f.stem] = old
    exercise_ids = [e.id for e in spec.exercises]
    lock = threading.Lock()
    write_csv(out, list(results.values()), exercise_ids)

    units = build_units(spec, salt) if pending else []
    jobs: queue.Queue = queue.Queue()
    for item in pending:
        jobs.put(item)
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
    bar = None
    if progress and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), desc=f"grading {name}", unit="notebook")
    errors: list[BaseException] = []

    def work() -> None:
        view_root = Path(tempfile.mkdtemp(prefix="vitcourse-view-"))
        build_view(view_root, spec.sandbox_modules)
        worker = Worker(view_root, spec.preload, sandbox=use_sandbox)
        grader = SubmissionGrader(spec, units, worker, version, limits)
        try:
            while True:
                try:
                    path, sha = jobs.get_nowait()
                except queue.Empty:
                    return
                result = grader.grade(path, path.stem, sha)
                key = student_key(path.stem)
                write_feedback(out / "feedback" / f"{key}.html", result, spec)
                atomic_write(out / "results" / f"{key}.json", json.dumps(result.to_json(), indent=1))
                with lock:
                    results[path.stem] = result
                    write_csv(out, list(results.values()), exercise_ids)
                    if bar is not None:
                        bar.update(1)
        except BaseException as err:  # noqa: BLE001 - surfaced by the main thread
            errors.append(err)
        finally:
            worker.close()
            import shutil

            shutil.rmtree(view_root, ignore_errors=True)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(n_workers if pending else 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if bar is not None:
        bar.close()
    if errors:
        raise GradingError(f"the grader itself failed: {type(errors[0]).__name__}: {errors[0]}")
    ordered = sorted(results.values(), key=lambda r: r.student)
    report = BatchReport(sandbox_line, name, len(pending), len(results) - len(pending),
                         time.monotonic() - start, ordered, out)
    write_summary(out, report, spec)
    return report
