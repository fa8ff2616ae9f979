"""The review column flags dynamic access by what it is, not by a method that happens to share its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitcourse.grading.notebook import Cell, Notebook, read_notebook, rule_findings, select_statements
from vitcourse.grading.spec import chapter_names, load_chapter

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", chapter_names())
def test_no_solution_gets_a_review_flag_or_a_forbidden_call(name):
    chapter = load_chapter(name)
    nb = read_notebook(ROOT / "notebooks" / "solutions" / chapter.notebook)
    statements, _ = select_statements(nb, {a for ex in chapter.exercises for a in ex.answers})
    forbidden, review = rule_findings(statements, chapter.exercises)
    assert (forbidden, review) == ({}, []), name


def _review(code: str) -> list[str]:
    chapter = load_chapter("ch01")
    nb = Notebook(cells=[Cell(1, "code", code)])
    statements, _ = select_statements(nb, {a for ex in chapter.exercises for a in ex.answers} | {"f"})
    return rule_findings(statements, chapter.exercises)[1]


@pytest.mark.parametrize("code, flagged", [
    ("def f(model):\n    model.eval()\n    return model", False),
    ("def f(model):\n    return torch.compile(model)", False),
    ("def f(x):\n    return x.compile", False),
    ("def f(s):\n    return eval(s)", True),
    ("def f(s):\n    import builtins\n    return builtins.eval(s)", True),
    ("def f(o, n):\n    return getattr(o, n)", True),
    ("def f(o):\n    return o.__dict__", True),
    ("def f():\n    import sys\n    return sys.modules", True),
    ("def f():\n    return ().__class__.__base__.__subclasses__()", True),
])
def test_dynamic_access_is_flagged_by_what_it_is(code, flagged):
    assert bool(_review(code)) == flagged, _review(code)
