"""The grader's own work on a submission's text is linear, bounded and done in a process of its own.

Hostile texts (a comment indented by 600,000 spaces, 16,000 ``_a = _a`` lines, a 1 MB line,
50,000 tiny statements, deep nesting, long assignment chains) each finish in seconds with one
sentence, and a batch grades an honest notebook fully next to them. Old nbformat 3 notebooks
are converted (or refused by name), and a lone surrogate where the runner describes an error
costs only its own check or statement.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest
from grading_corpus.make_corpus import OWN_ATTENTION  # attention with its own softmax

from vitcourse.grading import analyse
from vitcourse.grading.batch import grade_folder
from vitcourse.grading.grader import Limits
from vitcourse.grading.notebook import Cell, Notebook, read_notebook, rule_findings, select_statements, strip_ipython
from vitcourse.grading.sandbox import bwrap_status
from vitcourse.grading.spec import load_chapter

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb"
CHAPTER = load_chapter("ch01")
ANSWERS = {n for ex in CHAPTER.exercises for n in ex.answers}
FULL = {ex.id: ex.points for ex in CHAPTER.exercises}
LIMITS = Limits(exercise_seconds=3.0, setup_seconds=4.0)
BOUND = 10.0  # seconds: generous; before the fix the first two cases took minutes
SOFTMAX_CELL, ATTENTION_CELL = "ch01-03", "ch01-06"


def solution() -> dict:
    return json.loads(SOLUTION.read_text())


def with_cells(*cells: tuple[str, str]) -> dict:
    """The model answer plus extra cells ``(kind, source)`` at its end."""
    nb = solution()
    for i, (kind, text) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"extra-{i}", "metadata": {}, "source": text}
        if kind == "code":
            cell.update(outputs=[], execution_count=None)
        nb["cells"].append(cell)
    return nb


HOSTILE = {
    "indented_comment": [("code", " " * 600_000 + "# a comment\nx = 1\n")],
    "a_equals_a_16000": [("code", "_a = 1\n" + "_a = _a\n" * 16_000)],
    "a_equals_a_4_cells": [("code", "_a = _a\n" * 3_000)] * 4,
    "one_megabyte_line": [("code", "x = '" + "a" * 2**20 + "'\n")],
    "tiny_statements_50000": [("code", "a=1\n" * 50_000)],
    "statements_6000": [("code", "a=1;b=2\n" * 3_000)],
    "nested_lists": [("code", "x = " + "[" * 150 + "1" + "]" * 150 + "\n")],
    "long_attribute_chain": [("code", "x = a" + ".b" * 3_000 + "\n")],
    "assignment_chain": [("code", "a = \\\n" * 40_000 + "a\n")],
    "blank_markdown": [("markdown", "\n" * 3_000_000 + "x?")],
    "question_marks": [("code", ("x" * 9_000 + "?" + " " * 900 + "\n") * 20)],
    "many_cells": [("code", "b = 1\n" * 4_000)] * 6,
    "empty_cells_3000": [("code", "")] * 3_000,
}
WITHIN_LIMITS = {"blank_markdown", "question_marks"}  # linear and allowed: no sentence needed


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_finishes_fast_with_one_sentence(name, tmp_path):
    path = tmp_path / f"{name}.ipynb"
    path.write_text(json.dumps(with_cells(*HOSTILE[name])))
    started = time.monotonic()
    nb = read_notebook(path)
    statements, problems = select_statements(nb, ANSWERS)
    forbidden, review = rule_findings(statements, CHAPTER.exercises)
    seconds = time.monotonic() - started
    assert seconds < BOUND, f"{name} took {seconds:.1f} s"
    said = [nb.ungradable] if nb.ungradable else problems
    assert (said or name in WITHIN_LIMITS) and all(s and "\n" not in s and len(s) < 300 for s in said), (name, said)
    if not nb.ungradable:  # the extra cell is refused, the answers are still read
        assert {n for s in statements for n in s.names} >= ANSWERS and not forbidden, (name, problems)
        assert any("was not run" in p for p in problems) or name in WITHIN_LIMITS, problems


def test_the_totals_make_a_notebook_ungradable_in_one_sentence(tmp_path):
    path = tmp_path / "many.ipynb"
    path.write_text(json.dumps(with_cells(*HOSTILE["many_cells"])))
    nb = read_notebook(path)
    assert nb.cells == [] and "more than 10,000 top-level statements" in nb.ungradable


def test_magic_stripping_is_linear_and_keeps_its_meaning():
    started = time.monotonic()
    assert strip_ipython(" " * 600_000 + "# x") == " " * 600_000 + "# x"
    assert strip_ipython(("y" * 100_000 + "? \n") * 10).count("pass") == 10
    assert time.monotonic() - started < 1.0
    text = "%time x = 1\n  !ls\nmodel?\n# why?\nx = 'a?'\ny = 1"
    assert strip_ipython(text) == "pass\n  pass\npass\n# why?\nx = 'a?'\ny = 1"
    assert strip_ipython("%%bash\nls") is None and strip_ipython("%%time\nx = 1") == "\nx = 1"


def test_the_rule_walk_is_linear_in_the_statements():
    # 16,000 `_a = _a` reaching one another by name: each statement is read once per exercise
    cells = [Cell(i, "code", "_a = _a\n" * 4_000) for i in range(1, 5)]
    cells.append(Cell(5, "code", "def softmax(x, dim=-1):\n    _a\n    return x.softmax(dim)"))
    started = time.monotonic()
    statements, _ = select_statements(Notebook(cells=cells), ANSWERS)
    forbidden, _ = rule_findings(statements, CHAPTER.exercises)
    assert len(statements) == 16_001 and time.monotonic() - started < BOUND
    assert any("uses x.softmax" in f for f in forbidden["1.1"])


def test_rules_still_follow_chains_prefixes_and_aliases():
    source = {
        1: "import torch\nimport torch.nn.functional as F\nfrom torch import softmax as sm",
        2: "def softmax(x, dim=-1):\n    y = F.softmax(x, dim).sum().softmax(0)\n    return sm(y) + torch.special.softmax(y, 0)",
        3: "def attention(q, k, v, mask=None):\n    torch.softmax = None\n    return importlib.import_module('x'), sys.modules",
    }
    nb = Notebook(cells=[Cell(i, "code", text) for i, text in source.items()])
    statements, _ = select_statements(nb, ANSWERS)
    forbidden, review = rule_findings(statements, CHAPTER.exercises)
    found = " ".join(forbidden["1.1"])
    for name in ("torch.nn.functional.softmax", ".softmax", "torch.softmax", "torch.special.softmax"):
        assert f"uses {name}," in found, (name, found)
    assert "1.2" not in forbidden  # assigning torch.softmax is not a use of it
    assert review == ["cell 3, line 3: importlib", "cell 3, line 3: sys.modules"]


def test_the_text_work_runs_in_a_process_with_a_deadline(tmp_path, monkeypatch):
    path = tmp_path / "honest.ipynb"
    path.write_text(SOLUTION.read_text())
    assert not read_notebook(path).ungradable
    monkeypatch.setattr(analyse, "WALL_SECONDS", 0.001)  # the process cannot answer in time
    nb = read_notebook(path)
    assert nb.cells == [] and "could not read its code within its limits" in nb.ungradable


def v3(nb: dict) -> str:
    return nbformat.writes(nbformat.convert(nbformat.from_dict(nb), 3), 3)


def test_old_format_3_is_converted_or_refused_by_name(tmp_path):
    (tmp_path / "old.ipynb").write_text(v3(solution()))
    nb = read_notebook(tmp_path / "old.ipynb")
    assert not nb.ungradable and nb.chapter == "ch01"
    assert {n for s in select_statements(nb, ANSWERS)[0] for n in s.names} >= ANSWERS
    broken = json.loads(v3(solution()))
    broken["worksheets"] = [{"cells": [{"cell_type": "code", "input": 5}]}]
    (tmp_path / "broken.ipynb").write_text(json.dumps(broken))
    reason = read_notebook(tmp_path / "broken.ipynb").ungradable
    assert "old format 3 notebook" in reason and "\n" not in reason




def surrogate_in_traceback(where: str) -> dict:
    """Code compiled under a file name holding a lone surrogate raises: describing the error must not fail."""
    nb = solution()
    raising = 'exec(compile("raise ValueError(7)", "\\ud800", "exec"))'
    cells = {c.get("id"): c for c in nb["cells"]}
    text = "".join(cells[SOFTMAX_CELL]["source"])
    if where == "check":  # exercise 1.1 raises; attention gets its own softmax, so 1.2-1.4 do not depend on it
        text = f"def softmax(x, dim=-1):\n    {raising}\n"
        cells[ATTENTION_CELL]["source"] = OWN_ATTENTION
    else:
        text += f"\n{raising}\n"
    cells[SOFTMAX_CELL]["source"] = text
    return nb


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    subs, out = tmp_path_factory.mktemp("subs"), tmp_path_factory.mktemp("out")
    (subs / "honest.ipynb").write_text(SOLUTION.read_text())
    hostile = with_cells(*HOSTILE["indented_comment"], *HOSTILE["a_equals_a_16000"], *HOSTILE["nested_lists"])
    (subs / "hostile.ipynb").write_text(json.dumps(hostile))
    (subs / "totals.ipynb").write_text(json.dumps(with_cells(*HOSTILE["many_cells"])))
    (subs / "old_format.ipynb").write_text(v3(solution()))
    broken = json.loads(v3(solution()))
    broken["worksheets"] = "none"
    (subs / "old_broken.ipynb").write_text(json.dumps(broken))
    (subs / "surrogate_check.ipynb").write_text(json.dumps(surrogate_in_traceback("check")))
    (subs / "surrogate_setup.ipynb").write_text(json.dumps(surrogate_in_traceback("setup")))
    started = time.monotonic()
    report = grade_folder(subs, out, workers=2, chapter="ch01", limits=LIMITS, progress=False,
                          unsafe_no_sandbox=not bwrap_status()[0])
    return {r.student: r for r in report.results}, time.monotonic() - started


def test_a_batch_grades_honest_notebooks_fully_next_to_hostile_text(batch):
    results, seconds = batch
    assert results["honest"].scores == FULL and not results["honest"].problems
    hostile = results["hostile"]
    assert hostile.scores == FULL, [c.message for c in hostile.checks]  # only the hostile cells are refused
    assert sum("was not run" in p for p in hostile.problems) == 3, hostile.problems
    assert results["totals"].ungradable and results["totals"].total == 0
    assert hostile.seconds < LIMITS.cap(CHAPTER) and seconds < 600


def test_a_batch_converts_old_notebooks_and_refuses_broken_ones_by_name(batch):
    results, _ = batch
    assert results["old_format"].scores == FULL and not results["old_format"].ungradable
    assert "old format 3 notebook" in results["old_broken"].ungradable and results["old_broken"].total == 0


def test_a_surrogate_in_an_error_costs_only_its_own_check_or_statement(batch):
    # needs inside._describe to read tracebacks without linecache (see the report of issue 21, item 8)
    results, _ = batch
    check = results["surrogate_check"]
    assert {k: v for k, v in check.scores.items() if k != "1.1"} == {k: v for k, v in FULL.items() if k != "1.1"}
    shown = [c.message for c in check.checks if c.exercise == "1.1" and not c.hidden]
    assert shown and all("ValueError: 7" in m for m in shown), shown
    setup = results["surrogate_setup"]
    assert setup.scores == FULL
    assert any("failed: ValueError: 7" in p for p in setup.problems), setup.problems
