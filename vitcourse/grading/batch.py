"""``vitcourse grade``: a folder of submissions in; ``grades.csv``, feedback pages and a summary out.

The folder is input, not trusted: only regular ``.ipynb`` files are read (a symlink, FIFO
or device becomes that student's "ungradable" row), every file name maps to a unique key
for its result and feedback files, and CSV cells cannot start a formula. Every
submission gets a row: whatever goes wrong with one becomes its result, never the
batch's end. Results are stored per student, so a rerun grades only what is missing or
changed (the file, the grading code, the hidden checks or the salt). The hidden checks' inputs
are salted with a secret by default (:func:`batch_salt`): generated on the first run into an
output folder, kept there, reused by every later run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import queue
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..paths import atomic_write
from .feedback import BatchReport, write_feedback, write_summary
from .grader import Grader, Limits, StudentResult, build_units
from .notebook import _read_bytes, clean, notebook_chapter
from .sandbox import Zygote, build_view, bwrap_status
from .spec import chapter_names, hidden_folder, load_chapter

SALT_VARIABLE = "VITCOURSE_GRADING_SALT"
"""Environment variable holding the instructor's secret salt for hidden-check inputs."""

SALT_FILE = "grading-salt.txt"
"""In the output folder: the secret salt generated on the first run there (readable by its owner only), reused
by every later run, so stored results stay valid. It is not a feedback file; never hand it out."""


class GradingError(Exception):
    """A problem with the grader's input (not with a submission): one sentence, no traceback."""


def display_name(name: str) -> str:
    """A file name as text: invalid UTF-8 bytes as ``\\xNN``, control characters replaced."""
    return clean(os.fsencode(name).decode("utf-8", "backslashreplace"), 200)


def student_key(name: str) -> str:
    """A unique, file-system-safe key for a file name (the readable part plus a hash of the exact bytes)."""
    stem = name[:-6] if name.endswith(".ipynb") else name
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", display_name(stem))[:60].strip(".") or "student"
    return f"{safe}-{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"


def csv_cell(value) -> str:
    """A CSV cell that a spreadsheet shows as text, never as a formula (OWASP's advice)."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def grader_version(hidden: Path | None, salt: str) -> str:
    """A hash of the package's code, the hidden checks and the salt: when it changes, stored results are regraded."""
    digest = hashlib.sha256(hashlib.sha256(salt.encode()).digest())
    package = Path(__file__).resolve().parent.parent
    for path in sorted(package.rglob("*.py")) + (sorted(hidden.glob("*.py")) if hidden else []):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def batch_salt(out: Path, given: str | None = None) -> tuple[str, str]:
    """``(salt, where it comes from)``: ``given`` (``--salt``, even empty), else ``$VITCOURSE_GRADING_SALT``,
    else the secret kept in ``out/grading-salt.txt``, generated there with :mod:`secrets` on the first run."""
    if given is not None:
        return given, "--salt"
    if os.environ.get(SALT_VARIABLE):
        return os.environ[SALT_VARIABLE], f"${SALT_VARIABLE}"
    path = Path(out) / SALT_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError("not a regular file")
                salt = f.read(1001).decode("ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise GradingError(f"cannot read the grading salt {path} ({getattr(err, 'strerror', None) or err}); "
                               "restore it, or pass --salt to choose one.") from None
        if not 16 <= len(salt) <= 1000:
            raise GradingError(f"the grading salt {path} is empty or damaged; restore it, or pass --salt to choose one.")
        return salt, str(path)
    except OSError as err:
        raise GradingError(f"cannot create the grading salt {path} ({err.strerror}); pass --salt to choose one.") from None
    salt = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    return salt, f"{path} (new)"


def find_submissions(folder: Path) -> list[Path]:
    """Every ``*.ipynb`` entry of the folder (not hidden ones), sorted by name; what they are is checked later."""
    if not folder.is_dir():
        raise GradingError(f"{folder} is not a folder; give the folder that holds one notebook per student.")
    found = sorted(Path(e.path) for e in os.scandir(folder) if e.name.endswith(".ipynb") and not e.name.startswith("."))
    if not found:
        raise GradingError(f"{folder} holds no .ipynb files; put one notebook per student there, named after the student.")
    return found


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(_read_bytes(path)).hexdigest()
    except (OSError, ValueError) as err:
        return "unreadable:" + type(err).__name__


def _stored(path: Path, key: str, sha: str, version: str, sandbox: bool, points: dict) -> StudentResult | None:
    """The stored result if it is well formed and still valid for this file and grader; else None."""
    try:
        if path.stat().st_size > 4 * 2**20:
            return None
        r = StudentResult.from_json(json.loads(path.read_text()))
        ok = (r.key == key and r.sha256 == sha and r.version == version and r.sandbox == sandbox
              and r.maximum == points and set(r.scores) == set(points)
              and all(isinstance(v, (int, float)) and 0 <= v <= points[k] for k, v in r.scores.items()))
        return r if ok else None
    except Exception:  # noqa: BLE001 - anything odd: grade again
        return None


def write_csv(out: Path, results: list[StudentResult], exercise_ids: list[str]) -> None:
    """``grades.csv``: one row per student, one column per exercise, then what to review."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", "key", "total", "max", *exercise_ids, "status", "forbidden", "review"])
    for r in sorted(results, key=lambda r: r.key):
        writer.writerow([csv_cell(x) for x in (r.student, r.key, f"{r.total:g}", f"{r.max_total:g}",
                         *(f"{r.scores.get(e, 0):g}" for e in exercise_ids),
                         f"ungradable: {r.ungradable}" if r.ungradable else "graded",
                         "; ".join(r.forbidden), "; ".join(r.review))])
    atomic_write(out / "grades.csv", buffer.getvalue())


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GradingError(f"--out {out} is a file; give a folder for the grades.")
    try:
        (out / "results").mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise GradingError(f"cannot write to {out} ({err.strerror}); give a folder you can write to.") from None


def choose_chapter(files: list[Path], chapter: str | None) -> str:
    """The chapter given, else the one the notebooks' metadata names most often."""
    known = chapter_names()
    if chapter:
        if chapter not in known:
            raise GradingError(f"unknown chapter {chapter!r}; choose one of {', '.join(known)}.")
        return chapter
    votes: dict[str, int] = {}
    for f in files[:50]:
        name = notebook_chapter(f)
        if name in known:
            votes[name] = votes.get(name, 0) + 1
    if not votes:
        raise GradingError("could not tell which exercise notebook these are; pass --chapter (for example ch01).")
    return max(votes, key=votes.get)


def grade_folder(submissions, out, workers: int | None = None, force: bool = False, chapter: str | None = None,
                 students: list[str] | None = None, limits: Limits | None = None, progress: bool = True,
                 salt: str | None = None, hidden=None, unsafe_no_sandbox: bool = False) -> BatchReport:
    """Grade every notebook in ``submissions`` into ``out`` (see the module docstring and ``vitcourse grade --help``)."""
    start = time.monotonic()
    out, files = Path(out), find_submissions(Path(submissions))
    if students:
        files = [f for f in files if f.stem in set(students)]
        missing = set(students) - {f.stem for f in files}
        if missing:
            raise GradingError(f"no submission for {', '.join(sorted(missing))} in {submissions}.")
    name = choose_chapter(files, chapter)
    spec = load_chapter(name)
    folder = hidden_folder(hidden)
    if folder is None:
        raise GradingError("the hidden checks were not found; pass --hidden PATH (the grading/hidden folder of "
                           "the course's repository) or set VITCOURSE_HIDDEN.")
    usable, description = bwrap_status()
    if not usable and not unsafe_no_sandbox:
        raise GradingError(f"no sandbox: {description}; install bubblewrap (for example `apt install bubblewrap`), "
                           "or pass --unsafe-no-sandbox to run student code unisolated, as you.")
    sandboxed = usable and not unsafe_no_sandbox
    if not sandboxed:
        sys.stderr.write("NO SANDBOX: student code will run as you, with resource limits only; "
                         "it can read and change your files.\n")
    _check_out(out)
    salt, salt_source = batch_salt(out, salt)
    if salt_source.endswith("(new)"):
        sys.stderr.write(f"A new secret salt for the hidden checks' inputs is kept in {out / SALT_FILE}: "
                         "keep it with the grades, never hand it out.\n")
    version = grader_version(folder, salt)
    points = {ex.id: ex.points for ex in spec.exercises}
    results, pending = {}, []
    for f in find_submissions(Path(submissions)):  # every student stays in the CSV
        key, sha = student_key(f.name), _sha256(f)
        old = None if force and f in files else _stored(out / "results" / f"{key}.json", key, sha, version,
                                                        sandboxed, points)
        if old is not None:
            results[key] = old
        elif f in files:
            pending.append((f, key, sha))
    exercise_ids, lock = list(points), threading.Lock()
    units = build_units(spec, folder, salt) if pending else []
    jobs: queue.Queue = queue.Queue()
    for item in pending:
        jobs.put(item)
    bar = None
    if progress and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), desc=f"grading {name}", unit="notebook")
    failures: list[str] = []

    def work(slot: int) -> None:
        with tempfile.TemporaryDirectory(prefix="vitcourse-view-") as tmp:
            zygote = Zygote(build_view(Path(tmp) / "view", spec.sandbox_modules), spec.preload, slot, sandboxed)
            grader = Grader(spec, units, version, zygote, limits)
            try:
                while True:
                    try:
                        path, key, sha = jobs.get_nowait()
                    except queue.Empty:
                        return

                    def failed(what: str) -> StudentResult:  # not stored: a rerun tries again
                        failures.append(key)
                        return StudentResult(display_name(path.name[:-6]), key, sha, name, version, sandboxed,
                                             scores=dict.fromkeys(points, 0.0), maximum=dict(points),
                                             ungradable=f"the grader failed {what}; rerun to try again")

                    try:
                        if not zygote.alive():
                            zygote.close()
                            zygote.start()
                        result = grader.grade(path, display_name(path.name[:-6]), key, sha)
                    except Exception as err:  # noqa: BLE001 - this student's row says so; the batch goes on
                        result = failed(f"on this file ({type(err).__name__})")
                        zygote.close()
                    try:
                        write_feedback(out / "feedback" / f"{key}.html", result, spec)
                        if key not in failures:
                            atomic_write(out / "results" / f"{key}.json", json.dumps(result.to_json(), indent=1))
                    except Exception as err:  # noqa: BLE001
                        result = failed(f"to write this file's result ({type(err).__name__})")
                    with lock:
                        results[key] = result
                        write_csv(out, list(results.values()), exercise_ids)
                        if bar is not None:
                            bar.update(1)
            finally:
                zygote.close()

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n_workers if pending else 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if bar is not None:
        bar.close()
    write_csv(out, list(results.values()), exercise_ids)
    line = (f"Sandbox: {description}." if sandboxed else
            "NO SANDBOX: student code ran as this user, with resource limits only; it could read and change its files.")
    report = BatchReport(line, name, len(pending), len(results) - len(pending), time.monotonic() - start,
                         sorted(results.values(), key=lambda r: r.key), out)
    write_summary(out, report, spec)
    return report
