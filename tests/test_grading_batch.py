"""End-to-end grader self-tests: solutions score full marks, stubs zero, the adversarial corpus
exactly its expected scores; CSV, feedback, summary; parallel, resumable, killable; sandbox isolation."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from vitcourse.grading.batch import grade_folder
from vitcourse.grading.grader import build_units
from vitcourse.grading.runtime import call
from vitcourse.grading.sandbox import Worker, build_view, bwrap_status
from vitcourse.grading.spec import chapter_names, load_chapter

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "grading_corpus"
SANDBOX = bwrap_status()[0]


def grade(submissions: Path, out: Path, *extra: str, time_limit: str | None = "3") -> subprocess.CompletedProcess:
    """Run the CLI as an instructor would; a short ``--time-limit`` keeps the corpus's infinite loops short."""
    limit = ["--time-limit", time_limit] if time_limit else []  # None: the chapter's own budget
    return subprocess.run(
        [sys.executable, "-m", "vitcourse", "grade", str(submissions), "--out", str(out), "--no-progress",
         *limit, *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )


def lost_points(out: Path, student: str) -> str:
    """The lines of a student's feedback page that explain lost points (for assertion messages)."""
    page = html.unescape(re.sub(r"<[^>]+>", " ", (out / "feedback" / f"{student}.html").read_text()))
    return "\n".join(" ".join(line.split()) for line in page.splitlines() if "lost:" in line)


def input_values(tree) -> list[float]:
    """The first three finite values of every input array in a task tree."""
    if isinstance(tree, dict):
        found = [float(v) for v in np.asarray(tree["$arr"]).ravel()[:3] if np.isfinite(v)] if "$arr" in tree else []
        return found + [v for key, value in tree.items() if key != "$arr" for v in input_values(value)]
    if isinstance(tree, list):
        return [v for item in tree for v in input_values(item)]
    return []


def rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "grades.csv", newline="") as f:
        return {r["student"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    subs = tmp_path_factory.mktemp("subs")
    for nb in (CORPUS / "ch01").glob("*.ipynb"):
        shutil.copy(nb, subs / nb.name)
    shutil.copy(ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb", subs / "model_answer.ipynb")
    shutil.copy(ROOT / "notebooks" / "ch01_exercises.ipynb", subs / "untouched_stub.ipynb")
    out = tmp_path_factory.mktemp("out")
    started = time.monotonic()
    result = grade(subs, out, "--workers", "2")
    return subs, out, result, time.monotonic() - started


def test_batch_completes_with_expected_scores(corpus_run):
    _, out, result, _ = corpus_run
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("Sandbox: bubblewrap" if SANDBOX else "NO SANDBOX")
    got = rows(out)
    expected = json.loads((CORPUS / "expected.json").read_text())
    assert set(got) == set(expected) | {"model_answer", "untouched_stub"}
    assert got["model_answer"]["total"] == got["model_answer"]["max"] == "9"
    assert got["untouched_stub"]["total"] == "0"
    for student, want in expected.items():
        if want["needs_sandbox"] and not SANDBOX:
            continue
        for ex in ("1.1", "1.2", "1.3"):
            assert float(got[student][ex]) == pytest.approx(want[ex]), f"{student} {ex}"


def test_csv_feedback_and_summary(corpus_run):
    _, out, result, _ = corpus_run
    header = (out / "grades.csv").read_text().splitlines()[0]
    assert header == "student,total,max,1.1,1.2,1.3"
    assert (out / "totals_histogram.png").stat().st_size > 1000
    assert "Mean score per exercise" in result.stdout and "1.2 Masked" in result.stdout
    hidden_source = (ROOT / "vitcourse" / "grading" / "hidden" / "ch01.py").read_text()
    code_lines = [line.strip() for line in hidden_source.splitlines() if "case(" in line or "lambda" in line]
    for page in (out / "feedback").glob("*.html"):
        text = page.read_text()
        assert "Total:" in text
        assert not any(line in text for line in code_lines), page.name
    infinite = (out / "feedback" / "infinite_loop.html").read_text()
    assert "time limit" in infinite
    segfault = (out / "feedback" / "segfault.html").read_text()
    assert "SIGSEGV" in segfault
    missing = (out / "feedback" / "retyped_cell.html").read_text()
    assert "markdown cell, so it was not run" in missing
    leak = (out / "feedback" / "leaks_hidden_inputs.html").read_text()
    assert "softmax saw" in leak and "setup saw" in leak  # public checks keep the code's own messages
    seen = {f"{v:.6f}" for u in build_units(load_chapter("ch01")) if not u.hidden for v in input_values(u.case.task)}
    hidden = {f"{v:.6f}" for u in build_units(load_chapter("ch01")) if u.hidden for v in input_values(u.case.task)}
    assert hidden - seen and not [v for v in hidden - seen if v in leak]
    killer = (out / "feedback" / "kills_grader_worker.html").read_text()
    assert ("ended the process" if SANDBOX else "killed the grading process") in killer  # PID 1 ignores it


def test_rerun_skips_finished_students(corpus_run):
    subs, out, _, _ = corpus_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    again = grade(subs, out)
    assert again.returncode == 0, again.stderr
    assert "0 graded now" in again.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}


@pytest.mark.parametrize("name", chapter_names())
def test_solution_full_marks_and_stub_zero(name, tmp_path):
    chapter = load_chapter(name)
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copy(ROOT / "notebooks" / "solutions" / chapter.notebook, subs / "solution.ipynb")
    shutil.copy(ROOT / "notebooks" / chapter.notebook, subs / "stub.ipynb")
    result = grade(subs, tmp_path / "out", "--workers", "1", time_limit=None)  # the budget instructors get
    assert result.returncode == 0, result.stderr
    got = rows(tmp_path / "out")
    assert got["solution"]["total"] == got["solution"]["max"], lost_points(tmp_path / "out", "solution")
    assert float(got["stub"]["total"]) == 0.0


def test_kill_and_resume_loses_nothing(tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    for i in range(12):
        shutil.copy(ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb", subs / f"student{i:02d}.ipynb")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitcourse", "grade", str(subs), "--out", str(out), "--workers", "1", "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "results").glob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in (out / "results").glob("*.json")}
    assert 3 <= len(finished) < 12
    for p in (out / "results").glob("*.json"):
        json.loads(p.read_text())  # never half-written
    partial = rows(out)
    assert all(r["total"] == "9" for r in partial.values())  # complete rows only
    again = grade(subs, out, "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert f"{12 - len(finished)} graded now, {len(finished)} kept" in again.stdout
    assert len(rows(out)) == 12 and all(r["total"] == "9" for r in rows(out).values())


def test_no_sandbox_is_said_before_grading_and_its_results_are_regraded_in_one(tmp_path, capfd):
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "ada.ipynb").write_text("{")  # nothing to run: no worker needed
    report = grade_folder(subs, tmp_path / "out", sandbox=False, chapter="ch01", progress=False)
    assert capfd.readouterr().err.startswith("NO SANDBOX")
    assert report.sandbox.startswith("NO SANDBOX") and report.graded == 1
    again = grade_folder(subs, tmp_path / "out", chapter="ch01", progress=False)
    assert again.graded == (1 if SANDBOX else 0)  # a sandbox now: what ran without one is regraded


def test_bad_input_is_one_sentence(tmp_path):
    result = grade(tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "is not a folder" in result.stderr


def run_probe(source: str, sandbox: bool, setup: str = "pass"):
    """Define ``probe()`` by running ``setup`` then ``source`` in a worker's child; return what it returns."""
    root = Path(tempfile.mkdtemp())
    build_view(root, ())
    worker = Worker(root, sandbox=sandbox)
    job = {"statements": [{"id": "s0", "src": setup, "file": "<cell 1>", "line": 1, "group": "setup"},
                          {"id": "s1", "src": source, "file": "<cell 2>", "line": 1, "group": "setup"}],
           "tasks": [{"id": "c0", "group": "x", "tree": call("probe")}],
           "budgets": {"setup": 10, "x": 10},
           "limits": {"cpu": 30, "memory": 2**30, "file_size": 2**20, "processes": 10_000}}
    try:
        worker.start()
        messages = [h for h, _ in worker.run(job, [], 60)]
    finally:
        worker.close()
        shutil.rmtree(root, ignore_errors=True)
    done = next(h for h in messages if h.get("unit") == "c0" and h.get("event") == "done")
    assert done["ok"], done
    return done["value"]


@pytest.mark.skipif(not SANDBOX, reason="bubblewrap cannot create a sandbox on this machine")
def test_sandbox_hides_repository_specs_and_network():
    probe = '''
def probe():
    import os, socket, importlib.util
    seen = [os.path.exists(p) for p in PATHS]
    seen.append(importlib.util.find_spec("vitcourse.grading.hidden") is not None)
    seen.append(importlib.util.find_spec("vitcourse.attention") is not None)
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=1)
        seen.append(True)
    except OSError:
        seen.append(False)
    return seen
'''
    paths = [str(ROOT / "notebooks"), str(ROOT / "tests"), str(ROOT / "vitcourse" / "grading" / "hidden"),
             str(ROOT / "vitcourse" / "attention.py"), str(Path.home() / ".bashrc"), str(CORPUS)]
    assert run_probe(probe, True, f"PATHS = {paths!r}") == [False] * (len(paths) + 3)


CHILD_PROBE = '''
def probe():
    import os, sys
    frame = sys._getframe()
    while frame.f_code.co_name != "_child":
        frame = frame.f_back
    own = [frame.f_locals["out_fd"], frame.f_locals["ack_fd"]]
    listed = [int(fd) for fd in os.listdir("/proc/self/fd")]
    open_fds = []
    for fd in listed:
        try:
            os.fstat(fd)
            open_fds.append(fd)
        except OSError:  # the descriptor listdir used
            pass
    with open("/proc/self/status") as f:
        caps = next(line.split()[1] for line in f if line.startswith("CapEff"))
    reachable = []
    for path in (f"/proc/{os.getppid()}/mem", f"/proc/{os.getppid()}/fd/1", "/proc/1/mem", "/proc/1/fd/1"):
        try:
            os.close(os.open(path, os.O_RDONLY))
            reachable.append(path)
        except OSError:
            pass
    return {"open": sorted(open_fds), "own": sorted(own), "caps": caps, "reachable": reachable}
'''


@pytest.mark.parametrize("sandbox", [True, False] if SANDBOX else [False])
def test_child_inherits_nothing_of_the_server(sandbox):
    got = run_probe(CHILD_PROBE, sandbox)
    assert got["open"] == [0, 1, 2, *got["own"]], got  # not the server's pipes to the grader
    if sandbox:
        assert int(got["caps"], 16) == 0, got  # no capabilities, even when the grader runs as root
        assert got["reachable"] == [], got  # the server cannot be reached through /proc


def test_forged_messages_cannot_reach_the_next_student(tmp_path):
    """A submission that writes made-up grader messages everywhere it can, graded just before a
    stub on the same worker: the stub still scores zero, the attacker only its honest answers."""
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copy(CORPUS / "ch01" / "forged_messages.ipynb", subs / "a_attacker.ipynb")
    shutil.copy(ROOT / "notebooks" / "ch01_exercises.ipynb", subs / "b_victim.ipynb")
    result = grade(subs, tmp_path / "out", "--workers", "1")
    assert result.returncode == 0, result.stderr
    got = rows(tmp_path / "out")
    assert got["b_victim"]["total"] == "0", got
    victim = (tmp_path / "out" / "feedback" / "b_victim.html").read_text()
    assert "grading process" not in victim  # nothing of the attacker's run is blamed on the victim
    if SANDBOX:  # without one, code running as root can still reach the server through /proc
        honest = json.loads((CORPUS / "expected.json").read_text())["forged_messages"]
        assert {ex: float(got["a_attacker"][ex]) for ex in ("1.1", "1.2", "1.3")} == \
            {ex: honest[ex] for ex in ("1.1", "1.2", "1.3")}
