"""End-to-end grader self-tests: solutions score full marks, stubs zero, the adversarial corpus
exactly its expected scores within its time caps; CSV, feedback, summary; hostile folders; resumable,
killable; what the sandbox shows and hides."""

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

from vitcourse.grading.batch import grade_folder, student_key
from vitcourse.grading.grader import HIDDEN_FAILED, Limits, build_units
from vitcourse.grading.inside import SCRATCH
from vitcourse.grading.runtime import call
from vitcourse.grading.sandbox import Zygote, build_view, bwrap_status
from vitcourse.grading.spec import chapter_names, hidden_folder, load_chapter

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "grading_corpus"
SANDBOX = bwrap_status()[0]
if os.environ.get("CI") == "true" and not SANDBOX:  # CI installs bubblewrap: grading must be tested sealed
    raise RuntimeError(f"bubblewrap is needed in CI: {bwrap_status()[1]}")
UNSAFE = not SANDBOX  # without bubblewrap the tests grade unsandboxed, as an instructor could choose to
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
LIMITS = Limits(exercise_seconds=3.0, setup_seconds=4.0)
CH01_FULL = sum(ex.points for ex in load_chapter("ch01").exercises)  # a complete ch01 answer's total


def grade(submissions: Path, out: Path, *extra: str, time_limit: str | None = "3") -> subprocess.CompletedProcess:
    """Run the CLI as an instructor would; a short ``--time-limit`` keeps infinite loops short."""
    limit = ["--time-limit", time_limit] if time_limit else []  # None: the chapter's own budget
    return subprocess.run(
        [sys.executable, "-m", "vitcourse", "grade", str(submissions), "--out", str(out), "--no-progress",
         *limit, *extra], capture_output=True, text=True, timeout=900, cwd=ROOT,
    )


def page(out: Path, student: str) -> str:
    """A student's feedback page as plain text."""
    return html.unescape(re.sub(r"<[^>]+>", " ", (out / "feedback" / f"{student_key(student + '.ipynb')}.html").read_text()))


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


@pytest.fixture(scope="module", params=["ch01", "ch04"])
def corpus_run(request, tmp_path_factory):
    chapter = request.param
    subs = tmp_path_factory.mktemp("subs")
    for nb in (CORPUS / chapter).glob("*.ipynb"):
        shutil.copy(nb, subs / nb.name)
    shutil.copy(ROOT / "notebooks" / "solutions" / f"{chapter}_exercises.ipynb", subs / "model_answer.ipynb")
    shutil.copy(ROOT / "notebooks" / f"{chapter}_exercises.ipynb", subs / "untouched_stub.ipynb")
    out = tmp_path_factory.mktemp("out")
    report = grade_folder(subs, out, workers=2, chapter=chapter, limits=LIMITS, progress=False,
                          unsafe_no_sandbox=UNSAFE)
    return chapter, subs, out, report


def test_batch_completes_with_expected_scores_within_each_cap(corpus_run):
    chapter, _, out, report = corpus_run
    results = {r.student: r for r in report.results}
    expected = {k.split("/")[1]: v for k, v in EXPECTED.items() if k.startswith(chapter + "/")}
    assert set(results) == set(expected) | {"model_answer", "untouched_stub"}
    assert results["model_answer"].total == results["model_answer"].max_total
    assert results["untouched_stub"].total == 0
    cap = LIMITS.cap(load_chapter(chapter)) + 10
    for student, want in expected.items():
        got = results[student]
        assert got.seconds <= cap, f"{student} took {got.seconds} s, more than its budgets allow"
        if want["timed"] or want["needs_sandbox"] and not SANDBOX:
            continue
        for ex in got.scores:
            assert got.scores[ex] == pytest.approx(want[ex]), (student, ex, [c.message for c in got.checks])


def test_csv_feedback_and_summary(corpus_run):
    chapter, _, out, report = corpus_run
    header = (out / "grades.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["student", "key", "total", "max"] and header[-3:] == ["status", "forbidden", "review"]
    assert (out / "totals_histogram.png").stat().st_size > 1000
    assert "Mean score per exercise" in (out / "summary.txt").read_text()
    hidden_source = (hidden_folder() / f"{chapter}.py").read_text()
    code_lines = [line.strip() for line in hidden_source.splitlines() if "case(" in line or "lambda" in line]
    for result in report.results:
        text = (out / "feedback" / f"{result.key}.html").read_text()
        assert "Total:" in text and not any(line in text for line in code_lines), result.key
        assert all(c.message in ("", HIDDEN_FAILED) for c in result.checks if c.hidden), result.key
        # No hidden task is ever shown; an attack that tried to read one shows that it got nothing.
        assert "$npy" not in text and not re.search(r"HIDDEN INPUTS: (?!nothing|&quot;)", text), result.key
        assert ("NO SANDBOX" in text) == UNSAFE
    if chapter == "ch04":
        assert "uses ViT" in page(out, "timm_vit_and_built_count")
        return
    assert "time limit" in page(out, "infinite_loop") and "SIGSEGV" in page(out, "segfault")
    assert "markdown cell, so it was not run" in page(out, "retyped_cell")
    assert "F.softmax" not in page(out, "forbidden_calls_and_timm") and "torch.nn.functional.softmax" in \
        page(out, "forbidden_calls_and_timm")
    leak = page(out, "leaks_hidden_inputs")
    assert "softmax saw" in leak and "setup saw nothing" in leak  # public checks keep the code's own messages
    units = build_units(load_chapter("ch01"), hidden_folder())
    seen = {f"{v:.6f}" for u in units if not u.hidden for v in input_values(u.case.task)}
    hidden = {f"{v:.6f}" for u in units if u.hidden for v in input_values(u.case.task)}
    assert hidden - seen and not [v for v in hidden - seen if v in leak]
    if SANDBOX:
        assert "no queue from another submission" in page(out, "sysv_b_reader")
        root = page(out, "reads_root_files")
        assert "uid 0 " not in root and "shadow unreadable" in root
        assert "ended the process" in page(out, "kills_grader_worker")  # the runner is PID 1: it ignores the signal


def test_rerun_skips_finished_students(corpus_run):
    chapter, subs, out, _ = corpus_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    again = grade_folder(subs, out, chapter=chapter, limits=LIMITS, progress=False, unsafe_no_sandbox=UNSAFE)
    assert again.graded == 0 and again.kept == len(before)
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
    assert got["solution"]["total"] == got["solution"]["max"], page(tmp_path / "out", "solution")
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
    assert all(r["total"] == f"{CH01_FULL:g}" for r in partial.values())  # complete rows only
    again = grade(subs, out, "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert f"{12 - len(finished)} graded now, {len(finished)} kept" in again.stdout
    assert len(rows(out)) == 12 and all(r["total"] == f"{CH01_FULL:g}" for r in rows(out).values())


def test_without_bubblewrap_grading_refuses_unless_told(tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copy(ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb", subs / "ada.ipynb")
    env = dict(os.environ, PATH="/nonexistent")  # no bwrap on the PATH
    command = [sys.executable, "-m", "vitcourse", "grade", str(subs), "--out", str(tmp_path / "out"), "--no-progress"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--unsafe-no-sandbox" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    report = grade_folder(subs, tmp_path / "out", chapter="ch01", progress=False, unsafe_no_sandbox=True)
    assert report.sandbox.startswith("NO SANDBOX") and report.results[0].total == CH01_FULL
    assert "NO SANDBOX" in (tmp_path / "out" / "feedback" / f"{report.results[0].key}.html").read_text()


def test_a_hostile_folder_gets_a_row_per_file_and_never_stops_the_batch(tmp_path):
    subs, out = tmp_path / "subs", tmp_path / "out"
    subs.mkdir()
    solution = ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb"
    for name in ("José García", "Jos__Garc_a-978edf99", "=HYPERLINK(1)", "@SUM(A1)", "-2+3"):
        shutil.copy(solution, subs / f"{name}.ipynb")
    shutil.copy(solution, os.path.join(os.fsencode(subs), b"caf\xe9.ipynb"))
    (subs / "copied_link.ipynb").symlink_to(solution)
    (subs / "zero.ipynb").symlink_to("/dev/zero")
    os.mkfifo(subs / "pipe.ipynb")
    (subs / "deep.ipynb").write_text('{"cells": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    started = time.monotonic()
    report = grade_folder(subs, out, workers=1, chapter="ch01", progress=False, unsafe_no_sandbox=UNSAFE)
    assert time.monotonic() - started < 120
    results = {r.student: r for r in report.results}
    assert len(results) == len(set(r.key for r in report.results)) == 10
    for name in ("José García", "Jos__Garc_a-978edf99", "=HYPERLINK(1)", "@SUM(A1)", "-2+3", "caf\\xe9"):
        assert results[name].total == CH01_FULL, name
    for name, why in (("copied_link", "symbolic link"), ("zero", "symbolic link"), ("pipe", "not a regular file"),
                      ("deep", "nested too deeply")):
        assert results[name].total == 0 and why in results[name].ungradable, name
    text = (out / "grades.csv").read_text()
    assert "'=HYPERLINK(1)" in text and "'@SUM(A1)" in text and "'-2+3" in text and "\n=" not in text
    assert len(list((out / "feedback").glob("*.html"))) == 10


def test_bad_input_is_one_sentence(tmp_path):
    result = grade(tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def run_probe(source: str) -> object:
    """Grade a one-statement notebook defining ``probe()`` in a real zygote; return what ``probe()`` returned."""
    with tempfile.TemporaryDirectory() as tmp:
        zygote = Zygote(build_view(Path(tmp) / "view", ()), "torch", slot=1, sandboxed=SANDBOX)
        job = {"statements": [{"id": "s0", "src": source, "cell": 1, "line": 1, "definition": True}],
               "setup_seconds": 10, "budgets": {"x": 20}, "memory": 2**30, "workdir": SCRATCH if SANDBOX else tmp,
               "checks": [{"id": "c0", "exercise": "x", "task": call("probe")}]}
        try:
            zygote.start()
            records, _ = zygote.run(job, time.monotonic() + 60)
        finally:
            zygote.close()
    done = next(r for r, _ in records if r.get("done") == "c0")
    assert done["ok"], done
    return done["value"]


@pytest.mark.skipif(not SANDBOX, reason="bubblewrap cannot create a sandbox on this machine")
def test_sandbox_hides_the_repository_the_specs_timm_and_the_network():
    paths = [str(ROOT / "notebooks"), str(ROOT / "tests"), str(ROOT / "grading" / "hidden"),
             str(ROOT / "vitcourse" / "attention.py"), str(Path.home() / ".bashrc"), str(CORPUS), "/etc/shadow",
             "/etc/passwd"]
    probe = f"""
def probe():
    import ctypes, os, socket, importlib.util
    seen = [os.path.exists(p) for p in {paths!r}]
    seen += [importlib.util.find_spec(m) is not None for m in ("timm", "vitcourse.attention", "vitcourse.grading.spec")]
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=1)
        seen.append(True)
    except OSError:
        seen.append(False)
    libc = ctypes.CDLL(None, use_errno=True)
    for folder in (b"/tmp", b"/scratch"):
        seen.append(libc.umount2(folder, 2) == 0 or libc.mount(b"none", folder, b"tmpfs", 0, None) == 0)
    try:  # the sandbox's /tmp is read-only: the only writable folder is the run's own scratch
        open("/tmp/x", "w").close()
        seen.append(True)
    except OSError:
        seen.append(False)
    seen.append(os.getuid() == 0)
    try:
        pid = os.fork()  # a check may start threads, never processes
    except OSError:
        pid = -1
    if pid == 0:
        os._exit(0)
    seen.append(pid > 0)
    return seen
"""
    assert run_probe(probe) == [False] * (len(paths) + 9)


def test_the_runner_gives_a_check_nothing_but_its_own_pipe():
    got = run_probe("""
def probe():
    import os
    kinds = []
    for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
        try:
            kinds.append(os.readlink(f"/proc/self/fd/{fd}").split(":")[0])
        except OSError:
            pass
    return kinds
""")
    assert got.count("pipe") == 1 and got.count("socket") == 0, got  # its records alone
