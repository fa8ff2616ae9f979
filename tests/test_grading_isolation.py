"""Issue 21, classes 1-3: phases the submission cannot steer, nothing outliving a result, outside timeouts.

Each test grades a chapter 1 solution with one hostile statement added, through the real batch
(`grade_folder`), inside bubblewrap.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vitcourse.grading.batch import grade_folder
from vitcourse.grading.grader import HIDDEN_FAILED, Limits
from vitcourse.grading.sandbox import bwrap_status
from vitcourse.grading.spec import load_chapter

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb"
SOFTMAX_CELL = "ch01-03"
LIMITS = Limits(exercise_seconds=3.0, setup_seconds=4.0)
FULL = {ex.id: ex.points for ex in load_chapter("ch01").exercises}
SANDBOX = bwrap_status()[0]
pytestmark = pytest.mark.skipif(not SANDBOX, reason="bubblewrap cannot create a sandbox on this machine")


def with_statement(code: str) -> dict:
    """The solution notebook with ``code`` appended to the softmax answer cell (top-level statements)."""
    nb = json.loads(SOLUTION.read_text())
    cell = next(c for c in nb["cells"] if c.get("id") == SOFTMAX_CELL)
    cell["source"] = "".join(cell["source"]) + "\n\n" + code.strip("\n") + "\n"
    return nb


def grade_one(tmp_path: Path, nb: dict):
    subs, out = tmp_path / "subs", tmp_path / "out"
    subs.mkdir()
    (subs / "student.ipynb").write_text(json.dumps(nb))
    report = grade_folder(subs, out, chapter="ch01", limits=LIMITS, progress=False, workers=1)
    (result,) = report.results
    return result


MARK = "31.41592"  # an argument no other process on the machine uses


def _sleepers() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if MARK.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_no_process_of_a_submission_outlives_its_result(tmp_path):
    # A statement that leaves a daemon behind: its own session, no parent-death signal; and the runner itself
    # leaves its session and clears its own parent-death signal too.
    nb = with_statement(f"""
import ctypes, os
_libc = ctypes.CDLL(None)
if os.fork() == 0:
    os.setsid()
    _libc.prctl(1, 0, 0, 0, 0)
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["sleep", "{MARK}"])
    os._exit(0)
try:
    os.setsid()
except OSError:
    pass
_libc.prctl(1, 0, 0, 0, 0)
if not os.path.exists(os.path.expanduser("~/hung-once")):  # hang the first run, so the grader must kill it
    open(os.path.expanduser("~/hung-once"), "w").close()
    import signal
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.setitimer = lambda *args, **kwargs: None
    while True:
        pass
""")
    result = grade_one(tmp_path, nb)
    assert result.scores == FULL, result.checks
    assert _sleepers() == [], "a process the submission started is still running after its result was written"


def test_a_statement_that_ignores_the_alarm_costs_only_its_own_setup_time(tmp_path):
    nb = with_statement("""
import signal
signal.signal(signal.SIGALRM, signal.SIG_IGN)
signal.setitimer = lambda *args, **kwargs: None
while True:
    pass
""")
    began = time.monotonic()
    result = grade_one(tmp_path, nb)
    took = time.monotonic() - began
    assert result.scores == FULL, [c.message for c in result.checks]
    assert any("did not finish within the setup time" in p for p in result.problems), result.problems
    # Before: the hung statement held the run for the whole run deadline and the honest rest scored 0.
    assert took < LIMITS.cap(load_chapter("ch01")), took


def test_forged_phase_records_change_nothing_shown(tmp_path):
    # Writes records claiming the public checks are done and that a statement began, into every pipe it has.
    nb = with_statement("""
import os
for _fd in range(3, 64):
    try:
        if os.readlink(f"/proc/self/fd/{_fd}").startswith("pipe:"):
            os.write(_fd, b'\\n{"phase": "public-done"}\\n{"begin": "s0"}\\n')
    except OSError:
        pass
""")
    result = grade_one(tmp_path, nb)
    assert result.scores == FULL, [c.message for c in result.checks]
    assert all(c.message in ("", HIDDEN_FAILED) for c in result.checks if c.hidden)


def test_a_forged_fatal_record_cannot_stop_the_students_own_grading(tmp_path):
    # "fatal" is what the sandbox writes when it cannot isolate a submission, before any of its code runs.
    nb = with_statement("""
import os
for _fd in range(3, 64):
    try:
        if os.readlink(f"/proc/self/fd/{_fd}").startswith("pipe:"):
            os.write(_fd, b'\\n{"fatal": "forged"}\\n')
    except OSError:
        pass
""")
    result = grade_one(tmp_path, nb)
    assert result.scores == FULL, [c.message for c in result.checks]
