"""The records a submission's run writes, and how they are read: the single definition.

Inside the sandbox the runner (:mod:`.inside`) writes, to a pipe of this run alone, one JSON object per
line, each made by :func:`encode`. Outside, :meth:`.sandbox.Zygote.run` reads them with a
:class:`Reader` (bounded: :data:`MAX_OUTPUT` bytes per run, :func:`decode` per line), and the grader
(:mod:`.grader`) learns what the run did from :func:`read_run`.

A record is named by its one *kind* key, whose value is the statement or check it is about:

``{"begin": id}``
    a statement or a check starts.
``{"done": id, "ok": ...}``
    a statement finished (``ok``; else ``type``, ``error``, ``where``; a statement the setup budget
    left no time for is ``done`` without ``begin``, ``"type": "Skipped"``), or a check's child has its
    result: ``ok`` with ``value`` (:func:`.runtime.encode`) and ``ops``, the watched operators it ran;
    else ``type``, ``error``, ``where``.
``{"end": id, "status": ...}``
    a check's child is gone: ``status`` :data:`EXIT` (with ``code``), :data:`SIGNAL` (with
    ``signal``), :data:`TIMEOUT` (the runner killed it) or :data:`BUDGET` (never started: its
    exercise's time was used up).
``{"fatal": message}``
    the submission could not be isolated; no runner ran. The grader stops.

There is no other kind. (Until the grader decided the phases itself there was ``{"phase": ...}``;
that is now an unknown record like any other.) Everything read is untrusted: the submission's code
shares the runner's process and can write to the pipe. So :func:`decode` turns any line that is not
exactly one record (not JSON, not an object, nested too deeply, no kind key or more than one, an id
that is not a string) into None, which readers skip; the fields are kept as read, whatever they hold,
and the readers use them with care (:func:`read_run` believes a ``done`` or ``end`` only for what
is in progress, or not yet ended).

Imported inside the sandbox: standard library only, nothing else of ``vitcourse``.
"""

from __future__ import annotations

import json
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field

BEGIN, DONE, END, FATAL = "begin", "done", "end", "fatal"
KINDS = (BEGIN, DONE, END, FATAL)
FIELDS = {  # the fields each kind may carry besides its kind key
    BEGIN: frozenset(),
    DONE: frozenset({"ok", "value", "ops", "type", "error", "where"}),
    END: frozenset({"status", "signal", "code"}),
    FATAL: frozenset(),
}
EXIT, SIGNAL, TIMEOUT, BUDGET = "exit", "signal", "timeout", "budget"  # an end's status
STATUSES = (EXIT, SIGNAL, TIMEOUT, BUDGET)
SKIPPED, SETUP_TIMEOUT, UNSUPPORTED = "Skipped", "Timeout", "Unsupported"  # a done's type, besides exception names
MAX_OUTPUT = 64 * 2**20  # bytes one run may write, records and garbage together
MAX_INT_DIGITS = 19  # a longer integer reads as 0: converting huge ones is slow, or refused


def encode(kind: str, key: str, **fields) -> bytes:
    """One record as written: ``{kind: key, **fields}`` as a JSON line, after a newline that ends any half
    line written before it. ``key`` is the statement or check id, or for :data:`FATAL` the message."""
    if kind not in FIELDS or not isinstance(key, str) or not FIELDS[kind].issuperset(fields):
        raise ValueError(f"not a record: {kind!r} with {sorted(fields)}")
    return ("\n" + json.dumps({kind: key, **fields}) + "\n").encode()


class Record(dict):
    """One record as read: the JSON object itself, every field untrusted, with its ``kind`` and its ``id``
    (the statement or check; for :data:`FATAL`, the message)."""

    __slots__ = ("kind", "id")

    def __init__(self, data: dict, kind: str, key: str) -> None:
        super().__init__(data)
        self.kind, self.id = kind, key


def decode(line: bytes) -> Record | None:
    """The record on ``line``, or None if it is not exactly one (see the module docstring). Never raises."""
    try:
        data = json.loads(line.decode("utf-8", "replace"),
                          parse_int=lambda s: int(s) if len(s) <= MAX_INT_DIGITS else 0)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    kinds = [k for k in KINDS if k in data]
    if len(kinds) != 1 or not isinstance(data[kinds[0]], str):
        return None
    return Record(data, kinds[0], data[kinds[0]])


class Reader:
    """Splits what one run writes into records, and counts the bytes: more than ``limit`` ends the run."""

    def __init__(self, limit: int = MAX_OUTPUT) -> None:
        self.limit, self.total, self._rest = limit, 0, bytearray()

    def feed(self, chunk: bytes) -> Iterator[Record] | None:
        """The records ``chunk`` completes, decoded one by one as they are taken (lines that are not
        records skipped), or None once the run has written more than ``limit`` bytes in all."""
        self.total += len(chunk)
        self._rest += chunk
        *lines, rest = self._rest.split(b"\n")
        self._rest = bytearray(rest)
        if self.total > self.limit:
            return None
        return filter(None, map(decode, lines))


@dataclass
class CheckEnd:
    """How a check ended in a run."""

    end: Record  # its end record (status, and signal or code)
    done: Record | None  # its result, if its child wrote one while the check was in progress
    spent: float | None  # seconds from its begin to its end; None if it ended without beginning


@dataclass
class RunResult:
    """What one run's records say, as far as the grader believes them (see :func:`read_run`)."""

    fatal: str | None = None  # the first fatal record's message: nothing else was read
    failed: list = field(default_factory=list)  # done records of statements that failed, in order
    ended: dict = field(default_factory=dict)  # check id -> CheckEnd, in the order they ended
    current: str | None = None  # the statement or check in progress when the records stop
    began: float = 0.0  # when ``current`` began, if it is a check (seconds since the run's start)


def read_run(records: Iterable[tuple[Record, float]], statements: Container[str],
             checks: Container[str]) -> RunResult:
    """Read one run's ``(record, seconds since its start)``; ``statements`` and ``checks`` are the ids it ran.

    What is in progress changes with each ``begin`` of a statement, or of a check that has not ended;
    a ``done`` counts only for what is in progress (a check keeps its first); an ``end`` counts once per
    check, and charges the time since its ``begin`` only if it was in progress. A ``fatal`` counts only as
    the run's first record (the sandbox failed before any submission code ran). Anything else is ignored.
    """
    run, began, done = RunResult(), {}, {}
    for index, (record, t) in enumerate(records):
        kind, key = record.kind, record.id
        if kind == FATAL:  # only the zygote writes one, before any student code: a later one is forged
            if index == 0:
                run.fatal = key
                break
            continue
        if key in statements and kind == BEGIN:
            run.current = key
        elif key in statements and kind == DONE and key == run.current:
            run.current = None
            if not record.get("ok"):
                run.failed.append(record)
        elif key in checks and key not in run.ended and kind == BEGIN:
            run.current, began[key] = key, t
        elif key in checks and key == run.current and kind == DONE:
            done.setdefault(key, record)
        elif key in checks and key not in run.ended and kind == END:
            spent = None
            if key == run.current:
                spent, run.current = t - began[key], None
            run.ended[key] = CheckEnd(record, done.get(key), spent)
    run.began = began.get(run.current, 0.0)
    return run
