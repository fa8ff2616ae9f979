"""Grading one submission: run it in sealed sandbox runs, then judge every check here, outside.

Two phases, decided by the grader alone (never by anything a submission writes):

1. **Public runs** get the selected statements and the public checks' tasks, and nothing
   else. Their problems, skipped statements and failure messages are what the student sees.
2. **Hidden runs** come after, and get the same statements (minus those the public runs
   skipped) and the hidden checks' tasks. Of them the grader uses one thing: pass or fail per
   hidden check. Their skips, problems, messages and timing go nowhere, so nothing computed
   after a hidden input arrived can reach what is shown.

Every record a run writes is plain JSON read with bounds, as :mod:`.protocol` defines it; a
record that is malformed or out of place is ignored (:func:`.protocol.read_run`); values are
compared here with the course's reference code.

Budgets: the setup statements share ``setup_seconds`` in each run; in each phase, all checks of
an exercise share its ``exercise_seconds``; a submission's runs together get at most
``start + 2 * (setup + the exercise budgets)`` seconds of the grader's clock (:meth:`Limits.cap`). These are enforced from
outside (:class:`_Clock`): a statement or check that outlives its share, whatever it does with
signals and timers inside, has its run killed, is blamed, and the rest runs again in a fresh run,
within the same cap. So is a statement or check that ends its run (``os._exit``, a segfault).
"""

from __future__ import annotations

import functools
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .inside import SCRATCH
from .notebook import Statement, clean, read_notebook, rule_findings, select_statements
from .protocol import BEGIN, BUDGET, DONE, END, SETUP_TIMEOUT, SIGNAL, SKIPPED, TIMEOUT, UNSUPPORTED, Record, read_run
from .runtime import decode, encode
from .spec import Case, Chapter, load_hidden, seed_for

HIDDEN_FAILED = "failed (a hidden check: it shows no details)"


@dataclass
class Limits:
    """Budgets of one submission, in seconds, and its memory in bytes."""

    exercise_seconds: float | None = None  # all checks of one exercise; None: the chapter's own
    setup_seconds: float = 30.0  # the notebook statements of one run
    start_seconds: float = 20.0  # starting a run
    memory: int = 2 * 2**30

    def cap(self, chapter: Chapter) -> float:
        """The most a submission may take, all its runs together: a start, and setup plus every exercise's
        budget once for the public phase and once for the hidden phase."""
        per_exercise = self.exercise_seconds or chapter.exercise_seconds
        return self.start_seconds + 2 * (self.setup_seconds + per_exercise * len(chapter.exercises))


@dataclass
class CheckResult:
    """One check's outcome for one student."""

    exercise: str
    description: str
    hidden: bool
    points: float
    earned: float
    message: str = ""


@dataclass
class StudentResult:
    """Everything the CSV and the feedback page show about one student."""

    student: str
    key: str
    sha256: str
    chapter: str
    version: str
    sandbox: bool
    scores: dict = field(default_factory=dict)
    maximum: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    forbidden: list = field(default_factory=list)
    review: list = field(default_factory=list)
    ungradable: str = ""
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return round(sum(self.scores.values()), 2)

    @property
    def max_total(self) -> float:
        return round(sum(self.maximum.values()), 2)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StudentResult":
        return cls(**dict(data, checks=[CheckResult(**c) for c in data["checks"]]))


@dataclass
class Unit:
    """One check made concrete: its task (encoded), the expected value, and its points."""

    id: str
    exercise: str
    description: str
    hidden: bool
    points: float
    case: Case
    ops: tuple[str, ...] = ()  # operators this check may not run (the exercise's ``forbidden_ops``)

    @functools.cached_property
    def encoded_task(self):
        return encode(self.case.task)  # once per batch, not once per submission

    def job(self) -> dict:
        return {"id": self.id, "exercise": self.exercise, "task": self.encoded_task,
                **({"ops": list(self.ops)} if self.ops else {})}


def build_units(chapter: Chapter, hidden_folder: Path | None, salt: str = "") -> list[Unit]:
    """Every check of the chapter (public, then hidden, per exercise) with its expected value."""
    hidden = load_hidden(chapter.name, hidden_folder) if hidden_folder else {}
    units: list[Unit] = []
    for ex in chapter.exercises:
        checks = [(c, False, i) for i, c in enumerate(ex.public)] + [(c, True, i) for i, c in enumerate(hidden.get(ex.id, []))]
        weight = sum(c.weight for c, _, _ in checks) or 1.0
        for chk, is_hidden, i in checks:
            case = chk.build(seed_for(chapter.name, ex.id, i, is_hidden, salt))
            units.append(Unit(f"c{len(units)}", ex.id, chk.description, is_hidden, ex.points * chk.weight / weight, case,
                              tuple(ex.forbidden_ops)))
    return units


def _signal(number) -> str:
    try:
        name = signal.Signals(int(number)).name
    except (ValueError, TypeError):
        return "a signal"
    meaning = {"SIGSEGV": "segmentation fault", "SIGKILL": "killed, usually for using too much memory",
               "SIGXCPU": "CPU time limit exceeded", "SIGXFSZ": "file size limit exceeded", "SIGABRT": "aborted"}
    return f"{name}: {meaning[name]}" if name in meaning else name


class _Clock:
    """The grader's own clock for one run, fed with the records it reads (see :meth:`.sandbox.Zygote.run`).

    ``limit`` is how many seconds after the start the run may go on: a statement gets what is left of
    the setup time (a definition, a short grace once it is used up), a check what is left of its
    exercise's budget, each plus ``SLACK`` for the runner's own timer to act first; between items the
    runner gets ``GAP``. A record claiming a phase only moves the limit within these shares, so a
    submission that forges records can waste its own time, never more.
    """

    SLACK, GAP, GRACE = 1.0, 5.0, 2.0

    def __init__(self, job: dict, statements: dict, units: dict, start_seconds: float):
        self.statements, self.units = statements, units
        self.setup_left, self.grace = float(job["setup_seconds"]), self.GRACE
        self.budgets = {k: float(v) for k, v in job["budgets"].items()}
        self.limit, self.current, self.began = start_seconds, None, 0.0

    def see(self, record: Record, t: float) -> None:
        kind, key = record.kind, record.id
        if kind == BEGIN and key in self.statements:
            self.current, self.began = key, t
            allowance = self.setup_left if self.setup_left > 0 else (
                self.grace if self.statements[key].definition else 0.0)
            self.limit = t + max(allowance, 0.0) + self.SLACK
        elif kind == BEGIN and key in self.units:
            self.current, self.began = key, t
            self.limit = t + max(self.budgets.get(self.units[key].exercise, 0.0), 0.0) + self.SLACK
        elif key == self.current and (kind == END or kind == DONE and key in self.statements):
            spent = t - self.began
            if key in self.statements:
                if self.setup_left <= 0:
                    self.grace -= spent
                self.setup_left -= spent
            else:
                exercise = self.units[key].exercise
                self.budgets[exercise] = self.budgets.get(exercise, 0.0) - spent
            self.current, self.limit = None, t + self.GAP
        elif self.current is None and kind == DONE and key in self.statements:
            self.limit = t + self.GAP  # a skipped statement: done without begin


class Grader:
    """Grades submissions of one chapter, one at a time, through one zygote (:class:`.sandbox.Zygote`)."""

    def __init__(self, chapter: Chapter, units: list[Unit], version: str, zygote, limits: Limits | None = None):
        self.chapter, self.units, self.version, self.zygote = chapter, units, version, zygote
        self.limits = limits or Limits()
        self.seconds = self.limits.exercise_seconds or chapter.exercise_seconds
        self.answers = {n for ex in chapter.exercises for n in ex.answers}

    def grade(self, path: Path, student: str, key: str, sha256: str) -> StudentResult:
        """Grade one file. Problems of the submission become its result; only a broken grader raises."""
        began = time.monotonic()
        r = StudentResult(student, key, sha256, self.chapter.name, self.version, self.zygote.sandboxed,
                          maximum={ex.id: ex.points for ex in self.chapter.exercises},
                          scores={ex.id: 0.0 for ex in self.chapter.exercises})
        nb = read_notebook(path)
        if nb.ungradable:
            r.ungradable = nb.ungradable
        statements, r.problems = select_statements(nb, self.answers)
        forbidden, r.review = rule_findings(statements, self.chapter.exercises)
        self.ran_forbidden: dict[str, set[str]] = {}
        outcomes = self._execute(statements, r) if nb.cells else {}
        for exercise, ops in sorted(self.ran_forbidden.items()):  # seen at run time, in the public checks only
            forbidden.setdefault(exercise, []).extend(
                f"a public check of exercise {exercise} ran {op}, which the exercise forbids" for op in sorted(ops))
        for unit in self.units:
            ok, value, tainted = outcomes.get(unit.id, (False, "not run: the notebook could not be read", False))
            if ok:
                try:
                    value = unit.case.compare(decode(value), unit.case.expected)
                except Exception as err:  # noqa: BLE001 - an odd value costs only this check
                    value = f"the result could not be compared ({type(err).__name__})"
                ok = value is None
            message = "" if ok else (HIDDEN_FAILED if unit.hidden or tainted else clean(value))
            if ok and unit.exercise in forbidden:
                ok, message = False, (HIDDEN_FAILED if unit.hidden else
                                      "withheld: the answer uses a call this exercise forbids (listed above)")
            earned = unit.points if ok else 0.0
            r.scores[unit.exercise] += earned
            r.checks.append(CheckResult(unit.exercise, unit.description, unit.hidden, round(unit.points, 2),
                                        round(earned, 2), message))
        r.scores = {k: round(v, 2) for k, v in r.scores.items()}
        r.forbidden = [f"{use}: its points are withheld" for uses in forbidden.values() for use in uses]
        r.seconds = round(time.monotonic() - began, 2)
        return r

    def _execute(self, statements: list[Statement], r: StudentResult) -> dict:
        """Every check's outcome ``(ok, value or reason, tainted)``: the public phase, then the hidden one."""
        outcomes: dict[str, tuple] = {}
        skipped: set[str] = set()
        cap = time.monotonic() + self.limits.cap(self.chapter)
        public = [u for u in self.units if not u.hidden]
        self._phase(public, statements, skipped, self._budgets(), outcomes, cap, r)
        for u in public:  # decided now, before any hidden input exists
            outcomes.setdefault(u.id, (False, self._not_run(cap), False))
        # From here on nothing is shown but pass or fail per hidden check: a copy of the skips, no problems.
        hidden = [u for u in self.units if u.hidden]
        self._phase(hidden, statements, set(skipped), self._budgets(), outcomes, cap, None)
        for u in hidden:
            outcomes.setdefault(u.id, (False, "not run", True))
        return outcomes

    def _budgets(self) -> dict[str, float]:
        """A phase's time per exercise: all its checks of that exercise share it."""
        return {ex.id: self.seconds for ex in self.chapter.exercises}

    @staticmethod
    def _not_run(cap: float) -> str:
        return ("not run: the submission used up its time (all its runs together)" if time.monotonic() >= cap - 1
                else "not run: the runner stopped before it")

    def _phase(self, units: list[Unit], statements: list[Statement], skipped: set[str], budgets: dict,
               outcomes: dict, cap: float, r: StudentResult | None) -> None:
        """Run ``units`` until each has an outcome; ``r`` is None for the hidden phase (it reports nothing)."""
        by_id = {s.id: s for s in statements}
        mine = {u.id: u for u in units}
        reported: set[str] = set()
        for _ in range(len(statements) + len(units) + 1):
            pending = [u for u in units if u.id not in outcomes]
            left = cap - time.monotonic()
            if not pending or left < 1:
                break
            job = {"statements": [s.job() for s in statements if s.id not in skipped],
                   "setup_seconds": min(self.limits.setup_seconds, left), "budgets": budgets,
                   "checks": [u.job() for u in pending], "memory": self.limits.memory,
                   "workdir": SCRATCH if self.zygote.sandboxed else None, "processes": 512}
            run_seconds = self.limits.start_seconds + self.limits.setup_seconds + sum(max(b, 0) for b in budgets.values())
            clock = _Clock(job, by_id, mine, self.limits.start_seconds)
            started = time.monotonic()
            records, ended = self.zygote.run(job, started + min(left, run_seconds), clock)
            run = read_run(records, by_id, {u.id for u in pending})
            if run.fatal is not None:
                raise RuntimeError(clean(run.fatal))
            for record in run.failed:
                if r is not None and record.id not in reported:
                    reported.add(record.id)
                    r.problems.append(self._statement_problem(by_id[record.id], record))
            for uid, how in run.ended.items():
                if how.spent is not None:
                    budgets[mine[uid].exercise] -= how.spent
                outcomes[uid] = (*self._outcome(mine[uid], how.end, how.done), r is None)
            current = run.current
            if current in by_id:
                skipped.add(current)
                why = {"deadline": "did not finish within the setup time", "output": "wrote more output than "
                       "the grader accepts"}.get(ended, "ended the process")
                if r is not None:
                    r.problems.append(f"{self._where(by_id[current])} {why}; it was skipped")
            elif current in mine:
                budgets[mine[current].exercise] -= time.monotonic() - started - run.began
                reason = {"deadline": f"it did not finish within the time limit of exercise "
                          f"{mine[current].exercise} ({self.seconds:g} s)",
                          "output": "it wrote more output than the grader accepts"}.get(ended, "the process running it stopped")
                outcomes[current] = (False, reason, r is None)
            else:
                break  # the run ended between units: running it again would end the same way

    def _outcome(self, unit: Unit, end: Record, done: Record | None) -> tuple[bool, object]:
        status = end.get("status")
        ran = [clean(op, 60) for op in done.get("ops", [])][:5] if done is not None and isinstance(done.get("ops"), list) else []
        if done is not None and done.get("ok") and ran:
            if not unit.hidden:  # shown with the forbidden calls, and the exercise's points withheld
                self.ran_forbidden.setdefault(unit.exercise, set()).update(ran)
            return False, f"it ran {', '.join(ran)}, which exercise {unit.exercise} forbids"
        if done is not None and done.get("ok"):
            return True, done.get("value")
        if done is not None:
            kind = done.get("type")
            if kind == "NotImplementedError":
                return False, "not answered yet (the code still raises NotImplementedError)"
            detail = "" if unit.hidden else f": {clean(done.get('error'), 300)}"
            return False, ("your code returned a value the grader cannot compare" if kind == UNSUPPORTED
                           else "your code raised an exception") + detail
        if status == BUDGET:
            return False, f"not run: the time limit of exercise {unit.exercise} ({self.seconds:g} s) was used up"
        if status == TIMEOUT:
            return False, f"it did not finish within the time limit of exercise {unit.exercise} ({self.seconds:g} s)"
        if status == SIGNAL:
            return False, f"the process running it crashed ({_signal(end.get('signal'))})"
        return False, "the code ended the process (sys.exit, os._exit or similar)"

    @staticmethod
    def _where(stmt: Statement) -> str:
        return f"cell {stmt.cell}, line {stmt.line} (`{clean(stmt.src.strip().split(chr(10))[0], 60)}`)"

    def _statement_problem(self, stmt: Statement, record: Record) -> str:
        if record.get("type") == SKIPPED:
            return f"{self._where(stmt)} was skipped: the setup time ({self.limits.setup_seconds:g} s) was used up"
        if record.get("type") == SETUP_TIMEOUT:
            return f"{self._where(stmt)} did not finish within the setup time and was stopped"
        return f"{self._where(stmt)} failed: {clean(record.get('error'), 300)}"
