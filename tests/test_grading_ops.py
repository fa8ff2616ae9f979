"""Forbidden calls are enforced by what runs, not by how the call is spelled (issue 21, class 5).

Each submission is chapter 1's solution with one answer rewritten to reach a forbidden operator in a
way the name-based rules cannot see; the operator watch inside the sandbox must cost it that exercise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitcourse.grading.batch import grade_folder
from vitcourse.grading.grader import Limits
from vitcourse.grading.sandbox import bwrap_status
from vitcourse.grading.spec import load_chapter

ROOT = Path(__file__).resolve().parent.parent
LIMITS = Limits(exercise_seconds=5.0, setup_seconds=5.0)
CH01 = {ex.id: ex.points for ex in load_chapter("ch01").exercises}

SPELLINGS = {  # exercise 1.1: softmax(x, dim) through a forbidden operator, spelled so no rule sees a name
    "private_function": "def softmax(x, dim=-1):\n    import torch as t\n    return t._softmax(x, dim, False)",
    "attrgetter": "def softmax(x, dim=-1):\n    import operator, torch\n    return operator.attrgetter('soft' + 'max')(torch)(x, dim)",
    "resolve_name": "def softmax(x, dim=-1):\n    import pkgutil\n    return pkgutil.resolve_name('torch.nn.functional:soft' + 'max')(x, dim)",
}


def _solution(chapter: str) -> dict:
    return json.loads((ROOT / "notebooks" / "solutions" / f"{chapter}_exercises.ipynb").read_text())


def _set(nb: dict, cell_id: str, text: str) -> None:
    next(c for c in nb["cells"] if c.get("id") == cell_id)["source"] = text


def _answer_cell(nb: dict, name: str) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "code" and f"def {name}(" in "".join(c["source"])
                and "BEGIN SOLUTION" in "".join(c["source"]))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if not bwrap_status()[0]:
        pytest.skip("bubblewrap cannot create a sandbox on this machine")
    subs, out = tmp_path_factory.mktemp("subs"), tmp_path_factory.mktemp("out")
    (subs / "honest.ipynb").write_text(json.dumps(_solution("ch01")))
    for name, code in SPELLINGS.items():
        nb = _solution("ch01")
        _answer_cell(nb, "softmax")["source"] = code
        (subs / f"{name}.ipynb").write_text(json.dumps(nb))
    nb = _solution("ch01")  # exercise 1.4 through autograd's engine, reached without the word "autograd"
    _answer_cell(nb, "attention_backward")["source"] = (
        "def attention_backward(q, k, v, grad_out):\n"
        "    import importlib, math, torch\n"
        "    eng = importlib.import_module('torch.' + 'auto' + 'grad')\n"
        "    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))\n"
        "    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)\n"
        "    return getattr(eng, 'gr' + 'ad')(((w @ v) * grad_out).sum(), (q, k, v))")
    (subs / "engine.ipynb").write_text(json.dumps(nb))
    report = grade_folder(subs, out, chapter="ch01", limits=LIMITS, progress=False, workers=1)
    return {r.student: r for r in report.results}


def test_the_honest_solution_keeps_full_marks(graded):
    assert graded["honest"].scores == CH01, graded["honest"].checks


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_softmax_through_any_spelling_loses_exercise_1_1(graded, name):
    r = graded[name]
    assert r.scores["1.1"] == 0, r.scores
    assert any("aten._softmax" in f for f in r.forbidden), r.forbidden


def test_autograd_reached_indirectly_loses_exercise_1_4(graded):
    r = graded["engine"]
    assert r.scores["1.4"] == 0 and r.scores["1.1"] == CH01["1.1"], r.scores  # its own softmax is allowed
    assert any("autograd" in f for f in r.forbidden), r.forbidden
