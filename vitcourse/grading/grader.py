"""Grading one submission: run it in a worker, compare its outputs here, score every check.

The grader never trusts the student process with a comparison. It sends the
selected notebook statements and the tasks of every check; the student process
answers with plain values (or errors); the expected values are computed here from
the course's reference code and compared here. When the student process dies or
hangs in the middle of something (``os._exit``, a segfault, an infinite loop, a
memory bomb), that one statement or check is marked with the reason and the run
continues in a fresh child with the rest. A timeout uses up the exercise's time
budget, so its remaining checks fail at once with the same reason.

The hidden checks run after the public ones, in runs of their own (the public
runs never receive hidden inputs): a run holds the inputs of all its checks, and
the student's code could copy them into anything it reports (an error message, an
exit code, the name of an exception class). From a run with hidden checks the
feedback therefore keeps only what cannot carry them: error types (Python's own),
notebook locations, and fixed sentences.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import wire
from .notebook import read_cells, select_statements
from .runtime import pack_tree
from .sandbox import Worker, WorkerDied, process_limit
from .spec import Case, Chapter, load_hidden, seed_for, verdict

MEMORY_BUDGET = 2 * 2**30  # bytes a child may allocate beyond the warm server's address space
FILE_SIZE = 16 * 2**20


@dataclass
class Limits:
    """Resource limits for one submission (seconds and bytes)."""

    exercise_seconds: float | None = None  # wall time shared by all checks of one exercise; None: the chapter's
    setup_seconds: float = 30.0  # wall time for all notebook statements together
    memory: int = MEMORY_BUDGET
    file_size: int = FILE_SIZE


@dataclass
class Unit:
    """One check of one exercise, made concrete: the task, expected value, and its points."""

    id: str
    exercise: str
    description: str
    hidden: bool
    points: float
    case: Case


@dataclass
class CheckResult:
    """The outcome of one check for one student (what the feedback page shows)."""

    exercise: str
    description: str
    hidden: bool
    points: float
    earned: float
    message: str = ""


@dataclass
class StudentResult:
    """Everything the CSV and the feedback page need about one student."""

    student: str
    file: str
    sha256: str
    chapter: str
    version: str
    sandbox: bool
    scores: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Points earned over all exercises."""
        return round(sum(self.scores.values()), 2)

    @property
    def max_total(self) -> float:
        """Points available over all exercises."""
        return round(sum(self.maximum.values()), 2)

    def to_json(self) -> dict:
        """A JSON-able dict (see :meth:`from_json`)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StudentResult":
        """Inverse of :meth:`to_json`."""
        data = dict(data)
        data["checks"] = [CheckResult(**c) for c in data.get("checks", [])]
        return cls(**data)


def build_units(chapter: Chapter, salt: str = "") -> list[Unit]:
    """Every check of the chapter (public, then hidden, per exercise) with its expected value.

    ``salt`` changes the hidden checks' inputs (see :func:`~vitcourse.grading.spec.seed_for`).
    """
    hidden = load_hidden(chapter.name)
    units: list[Unit] = []
    for ex in chapter.exercises:
        checks = [(c, False, i) for i, c in enumerate(ex.public)]
        checks += [(c, True, i) for i, c in enumerate(hidden.get(ex.id, []))]
        total_weight = sum(c.weight for c, _, _ in checks) or 1.0
        for chk, is_hidden, index in checks:
            case = chk.build(seed_for(chapter.name, ex.id, index, is_hidden, salt))
            units.append(Unit(f"c{len(units)}", ex.id, chk.description, is_hidden,
                              ex.points * chk.weight / total_weight, case))
    return units


def _signal_name(number: int, tainted: bool = False) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = None
    meaning = {"SIGSEGV": "segmentation fault", "SIGKILL": "killed, usually for using too much memory",
               "SIGXCPU": "CPU time limit exceeded", "SIGXFSZ": "file size limit exceeded",
               "SIGABRT": "aborted"}.get(name)
    if meaning:
        return f"{name}: {meaning}"
    if tainted:  # the code may have picked the signal to pass on a hidden input
        return "a signal"
    return name or f"signal {number}"


def describe_end(end: dict, limits: Limits, tainted: bool = False) -> str:
    """Turn the fork server's end report into one sentence for the feedback.

    ``tainted``: the run held hidden checks, so the exit code (which the code chose) is left out.
    """
    status = end.get("status")
    if status == "timeout":
        return "it did not finish within its time limit (an infinite loop, or far too slow)"
    if status == "signal":
        return f"the process running it crashed ({_signal_name(int(end.get('signal', 0)), tainted)})"
    if status == "exit":
        code = "" if tainted else f"; exit code {end.get('code')}"
        return f"the code ended the process (sys.exit, os._exit or similar{code})"
    if status == "output":
        return f"the code {end.get('reason', 'sent too much output')}"
    return "the process running it stopped unexpectedly"


_ERROR_TYPES = {name for name, value in vars(builtins).items()
                if isinstance(value, type) and issubclass(value, BaseException)}
_WHERE = re.compile(r"cell (\d{1,4}), line (\d{1,5})")


def error_text(header: dict, tainted: bool, cells: set[int]) -> str:
    """What the feedback says about a unit that raised (``header``: the child's message).

    Untainted: ``Type: message (cell N, line L)`` as the child described it. Tainted
    (the run held hidden inputs): the type if it is one of Python's own exceptions,
    and the location if it is in one of the notebook's cells that ran, nothing else.
    """
    kind = str(header.get("error_type", ""))
    if not tainted:
        return str(header.get("error"))[:400]
    where = _WHERE.fullmatch(str(header.get("where", "")))
    located = f" (cell {where[1]}, line {where[2]})" if where and int(where[1]) in cells else ""
    return (kind if kind in _ERROR_TYPES else "an exception") + located


def _friendly(header: dict, tainted: bool, cells: set[int]) -> str:
    kind = header.get("error_type")
    if kind == "NotImplementedError":
        return "not answered yet (the code still raises NotImplementedError)"
    if kind == "Unsupported":
        return ("your code returned a value the grader cannot compare" if tainted
                else f"your code {str(header.get('error'))[:400]}")
    return f"your code raised {error_text(header, tainted, cells)}"


class SubmissionGrader:
    """Grades submissions of one chapter with one worker; reusable across submissions.

    Args:
        chapter: the chapter spec.
        units: :func:`build_units` of the chapter (computed once per batch).
        worker: a started or unstarted :class:`~vitcourse.grading.sandbox.Worker`.
        version: a hash of the specs and the grader, stored with each result.
    """

    def __init__(self, chapter: Chapter, units: list[Unit], worker: Worker, version: str,
                 limits: Limits | None = None) -> None:
        self.chapter, self.units, self.worker, self.version = chapter, units, worker, version
        self.limits = limits or Limits()
        self.exercise_seconds = self.limits.exercise_seconds or chapter.exercise_seconds
        self.blobs: dict[bool, list[bytes]] = {False: [], True: []}  # public and hidden inputs, never sent together
        self.tasks = [{"id": u.id, "group": u.exercise, "tree": pack_tree(u.case.task, self.blobs[u.hidden])}
                      for u in units]
        self.answer_names = {n for ex in chapter.exercises for n in ex.answers}

    def _ensure_worker(self) -> None:
        if not self.worker.ready():
            self.worker.close()
            self.worker.start()

    def grade(self, path: Path, student: str, sha256: str) -> StudentResult:
        """Grade one notebook file; never raises for anything the submission contains."""
        result = StudentResult(student, path.name, sha256, self.chapter.name, self.version, self.worker.sandbox)
        nb = read_cells(path)
        result.problems += nb.problems
        statements, problems = select_statements(nb, self.answer_names)
        result.problems += problems
        outcomes = self._execute(statements, result) if nb.cells else {}
        for ex in self.chapter.exercises:
            result.maximum[ex.id] = ex.points
            result.scores[ex.id] = 0.0
        for unit in self.units:
            earned, message = self._score(unit, outcomes.get(unit.id), nb.cells)
            result.scores[unit.exercise] += earned
            result.checks.append(CheckResult(unit.exercise, unit.description, unit.hidden,
                                             round(unit.points, 2), round(earned, 2), message))
        result.scores = {k: round(v, 2) for k, v in result.scores.items()}
        return result

    def _score(self, unit: Unit, outcome, has_cells: bool) -> tuple[float, str]:
        if not has_cells:
            return 0.0, "the notebook could not be read"
        if outcome is None:
            return 0.0, "the check did not run"
        ok, payload = outcome
        if not ok:
            return 0.0, payload
        try:
            problem = verdict(unit.case, payload, unit.hidden)
        except Exception as err:  # noqa: BLE001 - an odd value must not stop the batch
            problem = f"the result could not be compared ({type(err).__name__})"
        return (unit.points, "") if problem is None else (0.0, problem)

    def _execute(self, statements, result: StudentResult) -> dict[str, tuple[bool, object]]:
        """Run statements and tasks, resuming after every crash; return ``{unit id: (ok, value or reason)}``.

        The public checks run first; the hidden ones only once every public check has an
        outcome, in runs of their own with a fresh setup budget (the statements run again).
        """
        outcomes: dict[str, tuple[bool, object]] = {}
        by_id = {s.id: s for s in statements}
        skipped: set[str] = set()
        reported: set[str] = set()
        budgets = {"setup": self.limits.setup_seconds}
        budgets.update({ex.id: self.exercise_seconds for ex in self.chapter.exercises})
        groups = {u.id: u.exercise for u in self.units}
        hidden = {u.id for u in self.units if u.hidden}
        tainted = False  # True from the first run that holds hidden inputs
        worker_deaths = 0
        for _ in range(len(statements) + len(self.units) + 4):
            for u in self.units:
                if u.id not in outcomes and budgets[u.exercise] <= 0:
                    outcomes[u.id] = (False, f"the time limit of exercise {u.exercise} "
                                             f"({self.exercise_seconds:g} s) was used up by earlier checks")
            pending = [t for t in self.tasks if t["id"] not in outcomes]
            if not pending:
                break
            tasks = [t for t in pending if t["id"] not in hidden] or pending
            if not tainted and tasks[0]["id"] in hidden:
                tainted = True
                budgets["setup"] = self.limits.setup_seconds
            job_statements = [{"id": s.id, "src": s.src, "file": s.file, "line": s.line, "group": "setup"}
                              for s in statements if s.id not in skipped]
            job = {"statements": job_statements, "tasks": tasks, "budgets": budgets,
                   "limits": self._limits(budgets)}
            progress = len(outcomes) + len(skipped)
            order = [s["id"] for s in job_statements] + [t["id"] for t in tasks]
            finished: set[str] = set()
            current = None
            try:
                self._ensure_worker()
                overall = sum(max(b, 0) for b in budgets.values()) + 60
                for header, blobs in self.worker.run(job, self.blobs[tainted], overall):
                    if header.get("kind") == "end":
                        budgets = {g: min(budgets[g], float(header.get("budgets", {}).get(g, budgets[g])))
                                   for g in budgets}
                        self._blame(header.get("unit"), describe_end(header, self.limits, tainted), header,
                                    by_id, groups, outcomes, skipped, budgets, result)
                        if header.get("restart"):
                            self.worker.close()
                        break
                    unit = header.get("unit") if isinstance(header.get("unit"), str) else None
                    if header.get("event") == "crash":
                        error = error_text(header, tainted, set())
                        result.problems.append(f"the grading process failed: {error}")
                    elif header.get("event") == "begin":
                        current = unit
                    elif header.get("event") == "done" and unit is not None and unit == current:
                        finished.add(unit)
                        self._record(header, blobs, by_id, groups, outcomes, reported, result, tainted)
            except WorkerDied as err:
                worker_deaths += 1
                self.worker.close()
                # every message was acknowledged before the child went on: the unit it had
                # begun (or else the next one in order) is the one that killed the worker
                culprit = current if current not in finished else None
                culprit = culprit or next((u for u in order if u not in finished), None)
                reason = "the grading process stopped" if tainted else str(err)
                self._blame(culprit, f"{reason} while running it (the code killed the grading process)", {},
                            by_id, groups, outcomes, skipped, budgets, result)
                if worker_deaths >= 3:
                    for t in self.tasks:
                        outcomes.setdefault(t["id"], (False, "not run: the submission killed the grading "
                                                             "process three times"))
                    break
            if len(outcomes) + len(skipped) == progress:  # no progress: do not loop on a broken run
                break
        for t in self.tasks:
            outcomes.setdefault(t["id"], (False, "the check could not be run (the process kept failing)"))
        return outcomes

    def _blame(self, unit, reason, end, by_id, groups, outcomes, skipped, budgets, result) -> None:
        """Record that ``unit`` (a statement or a check) ended its run, and why."""
        if unit in by_id and unit not in skipped:
            skipped.add(unit)
            result.problems.append(f"{self._where(by_id[unit])}: {reason}; it was skipped")
        elif unit in groups and unit not in outcomes:
            outcomes[unit] = (False, reason)
            if end.get("status") == "timeout":
                budgets[groups[unit]] = 0.0

    @staticmethod
    def _where(stmt) -> str:
        first = stmt.src.strip().split("\n")[0][:60]
        return f"cell {stmt.cell}, line {stmt.line} (`{first}`)"

    def _record(self, header, blobs, by_id, groups, outcomes, reported, result, tainted) -> None:
        unit = header.get("unit")
        cells = {s.cell for s in by_id.values()}
        if unit in by_id:
            if not header.get("ok") and unit not in reported:
                reported.add(unit)
                result.problems.append(f"{self._where(by_id[unit])} failed: {error_text(header, tainted, cells)}")
        elif unit in groups and unit not in outcomes:
            if header.get("ok"):
                try:
                    outcomes[unit] = (True, wire.decode_value(header.get("value"), blobs))
                except wire.WireError as err:
                    outcomes[unit] = (False, "the result could not be read" + ("" if tainted else f" ({err})"))
            else:
                outcomes[unit] = (False, _friendly(header, tainted, cells))

    def _limits(self, budgets: dict[str, float]) -> dict:
        return {
            "cpu": int(sum(max(b, 0) for b in budgets.values()) + 10),
            "memory": self.limits.memory,
            "file_size": self.limits.file_size,
            "processes": process_limit(),
        }


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (how a rerun knows a submission did not change)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
