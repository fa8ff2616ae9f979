"""Fast tests of the grading pieces that need no sandbox: notebooks, generation, wire, comparisons, check()."""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitcourse.grading import check, wire
from vitcourse.grading.batch import _load_result, grader_version, version_sources
from vitcourse.grading.generate import make_student, regenerate, strip_solutions
from vitcourse.grading.grader import CheckResult, Limits, StudentResult, SubmissionGrader, error_text
from vitcourse.grading.notebook import Cell, Notebook, read_cells, select_statements
from vitcourse.grading.public import CheckFailed, NotDoneYet
from vitcourse.grading.sandbox import PACKAGE_DIR, _system_binds
from vitcourse.grading.spec import Case, allclose, chapter_names, exact, load_chapter, seed_for, verdict

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_strip_solutions_keeps_indentation_and_code_around():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert strip_solutions(src) == "def f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()\n"
    with pytest.raises(ValueError, match="never closed"):
        strip_solutions("### BEGIN SOLUTION\nx = 1\n")


@pytest.mark.parametrize("name", chapter_names())
def test_committed_student_notebooks_are_up_to_date(name):
    chapter = load_chapter(name)
    assert regenerate(NOTEBOOKS, chapter, write=False) == [], "run `vitcourse notebooks` and commit the result"
    student = json.loads((NOTEBOOKS / chapter.notebook).read_text())
    text = json.dumps(student)
    assert "BEGIN SOLUTION" not in text and "raise NotImplementedError()" in text
    checks = [c for c in student["cells"] if "check(" in "".join(c["source"]) and c["cell_type"] == "code"]
    assert len(checks) >= 3 and all("raises-exception" in c["metadata"].get("tags", []) for c in checks)


def test_make_student_tags_cells_that_use_answers():
    chapter = load_chapter("ch01")
    solution = json.loads((NOTEBOOKS / "solutions" / "ch01_exercises.ipynb").read_text())
    student = make_student(solution, chapter)
    demo = next(c for c in student["cells"] if "causal_weights" in "".join(c["source"]))
    assert "raises-exception" in demo["metadata"]["tags"]
    imports = student["cells"][1]
    assert "tags" not in imports["metadata"]


def test_read_cells_reports_invalid_json(tmp_path):
    bad = tmp_path / "x.ipynb"
    bad.write_text('{"cells": [')
    nb = read_cells(bad)
    assert nb.cells == [] and "not valid notebook JSON" in nb.problems[0]


def test_select_statements_recovers_from_syntax_errors_and_skips_top_level_work():
    src = "import torch\nX = 3\ny = torch.zeros(3)\ndef ok(x):\n    return x\ndef bad(x):\n    return x +\n"
    nb = Notebook(cells=[Cell(1, "code", src), Cell(2, "code", "for i in range(10**9):\n    pass")])
    statements, problems = select_statements(nb, {"softmax"})
    kept = [s.src.split("\n")[0] for s in statements]
    assert kept == ["import torch", "X = 3", "def ok(x):"]
    assert problems and "cell 1, line 7: SyntaxError" in problems[0]


def test_duplicated_stub_gives_way_to_the_real_answer():
    real = "def softmax(x, dim=-1):\n    return x.softmax(dim)"
    stub = strip_solutions("def softmax(x, dim=-1):\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION\n")
    statements, _ = select_statements(Notebook(cells=[Cell(1, "code", real), Cell(2, "code", stub)]), {"softmax"})
    assert [s.cell for s in statements] == [1]


def test_only_the_generated_stub_counts_as_unanswered():
    # a real answer that raises NotImplementedError for an option it does not support
    real = "def softmax(x, dim=-1):\n    if dim != -1:\n        raise NotImplementedError('dim')\n    return x.softmax(dim)"
    stub = "def softmax(x, dim=-1):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    statements, _ = select_statements(Notebook(cells=[Cell(1, "code", real), Cell(2, "code", stub)]), {"softmax"})
    assert [s.cell for s in statements] == [1]
    # without the generated stub, the later definition wins, as when running the notebook
    other = "def softmax(x, dim=-1):\n    raise NotImplementedError"
    statements, _ = select_statements(Notebook(cells=[Cell(1, "code", real), Cell(2, "code", other)]), {"softmax"})
    assert [s.cell for s in statements] == [1, 2]


def test_wire_refuses_pickles_and_object_arrays():
    payload = pickle.dumps(np.array([1, "a"], dtype=object))
    with pytest.raises(wire.WireError):
        wire.bytes_to_array(payload)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(wire.WireError):
        wire.bytes_to_array(buffer.getvalue())
    blobs: list[bytes] = []
    value = wire.encode_value([np.arange(3.0), {"n": 2}], blobs)
    header, back = wire.unpack(wire.pack({"value": value}, blobs))
    decoded = wire.decode_value(header["value"], back)
    np.testing.assert_array_equal(decoded[0], np.arange(3.0))
    assert decoded[1] == {"n": 2}


def test_comparisons_say_what_differs_without_values():
    compare = allclose()
    assert compare(np.zeros((2, 3)), np.zeros((2, 3))) is None
    assert compare(np.zeros((3, 2)), np.zeros((2, 3))) == "expected shape (2, 3), got shape (3, 2)"
    message = compare(np.full((2,), 0.5), np.zeros(2))
    assert message.startswith("largest absolute error 0.5")
    assert "expected 2 outputs" in compare([np.zeros(1)], [np.zeros(1), np.zeros(1)])
    assert exact()(np.asarray(12), 12) is None and exact()(11, 12) == "expected 12, got 11"


def _solution_namespace(name: str) -> dict:
    """Execute a solution notebook's code cells except the check calls and demos."""
    nb = json.loads((NOTEBOOKS / "solutions" / f"{name}_exercises.ipynb").read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and "### BEGIN SOLUTION" in source or source.startswith(("import", "from")):
            exec(source, namespace)  # noqa: S102 - the course's own solution code
    return namespace


def test_public_check_passes_on_solutions_and_explains_failures(capsys):
    namespace = _solution_namespace("ch01")
    check("1.2", namespace)
    assert "all 2 public checks passed" in capsys.readouterr().out
    namespace["attention"] = lambda q, k, v, mask=None: (v[..., :4], q @ k.transpose(-2, -1))  # wrong shape
    with pytest.raises(CheckFailed, match=r"1.2 check 1 of 2 .*expected shape \(2, 5, 8\) in output 0, got shape \(2, 5, 4\)"):
        check("1.2", namespace)

    def not_done(x, dim=-1):
        raise NotImplementedError()

    with pytest.raises(NotDoneYet, match="not answered yet"):
        check("1.1", {"softmax": not_done})
    with pytest.raises(CheckFailed, match="largest absolute error"):
        check("1.1", {"softmax": lambda x, dim=-1: torch.softmax(x, dim) + 0.1})


def test_wire_keeps_scalars_scalar():
    for value in (np.float32(2.5), np.array(7), np.array([[1.0, 2.0]]).T):
        back = wire.bytes_to_array(wire.array_to_bytes(value))
        assert back.shape == np.asarray(value).shape
        np.testing.assert_array_equal(back, value)


def test_hidden_checks_say_what_differs_without_any_value():
    compare = allclose()
    assert compare(np.full(2, 0.5123), np.zeros(2), hidden=True).startswith("largest absolute error 0.5 ")
    assert compare(np.zeros((3, 2)), np.zeros((2, 3)), hidden=True) == "expected shape (2, 3), got shape (3, 2)"
    assert exact()(11, 12, hidden=True) == "the number differs from the expected one"
    message = exact()({"a": 1, "secret": 2}, {"a": 1, "b": 3}, hidden=True)
    assert "secret" not in message and "'b'" not in message
    custom = Case(task={}, expected=12, compare=lambda actual, expected: f"expected {expected}, got {actual}")
    assert verdict(custom, 11, hidden=False) == "expected 12, got 11"
    assert verdict(custom, 11, hidden=True) == "the result differs from the expected one"


def test_errors_of_hidden_runs_keep_only_type_and_location():
    header = {"error": "ValueError: inputs 0.25 0.5 (cell 3, line 2)", "error_type": "ValueError",
              "where": "cell 3, line 2"}
    assert error_text(header, False, {3}) == header["error"]
    assert error_text(header, True, {3}) == "ValueError (cell 3, line 2)"
    assert error_text(header, True, {4}) == "ValueError"  # not a cell that ran: no location
    forged = {"error_type": "Leak_0_25", "where": "cell 3, line 2 and 0.25"}
    assert error_text(forged, True, {3}) == "an exception"


def test_salt_changes_only_the_hidden_inputs():
    def draw(**kwargs):
        return seed_for("ch01", "1.1", 0, **kwargs).random(3)

    np.testing.assert_array_equal(draw(hidden=False), draw(hidden=False, salt="term 2"))
    np.testing.assert_array_equal(draw(hidden=True), draw(hidden=True, salt=""))
    assert not np.array_equal(draw(hidden=True), draw(hidden=True, salt="term 2"))


def test_grader_version_covers_reference_code_and_salt():
    sources = {str(p.relative_to(PACKAGE_DIR)) for p in version_sources("ch01")}
    assert {"grading/exercises/_common.py", "grading/hidden/ch01.py", "attention.py", "vit.py"} <= sources
    assert "train.py" not in sources  # code that decides no grade
    assert grader_version("ch01") != grader_version("ch01", salt="term 2")


def test_stored_results_are_checked_before_a_rerun_trusts_them(tmp_path):
    chapter = load_chapter("ch01")
    submission = tmp_path / "ada.ipynb"
    good = StudentResult("ada", "ada.ipynb", "0" * 64, "ch01", "v", True,
                         scores={"1.1": 2.0, "1.2": 0.0, "1.3": 0.0},
                         maximum={ex.id: ex.points for ex in chapter.exercises},
                         checks=[CheckResult("1.1", "d", False, 2.0, 2.0)])
    path = tmp_path / "ada.json"
    path.write_text(json.dumps(good.to_json()))
    assert _load_result(path, submission, chapter) == good
    for change in ({"scores": {"1.1": 2.0, "1.2": 3.0, "1.3": 0.0}},  # more than its checks earned
                   {"student": "bob"}, {"maximum": {"1.1": 20}}, {"checks": [{"exercise": "1.1"}]},
                   {"extra": 1}, {"sandbox": "yes"}):
        path.write_text(json.dumps(dict(good.to_json(), **change)))
        assert _load_result(path, submission, chapter) is None, change


def test_sandbox_binds_this_python_not_all_of_opt():
    binds = _system_binds()
    sources = {binds[i + 1] for i, flag in enumerate(binds) if flag == "--ro-bind"}
    assert "/opt" not in sources
    for prefix in {sys.prefix, sys.base_prefix}:
        assert prefix in sources or prefix.startswith(("/usr/", "/etc/")), prefix


def test_exercise_time_budget_comes_from_the_chapter_unless_given():
    jax_chapter, torch_chapter = load_chapter("ch07"), load_chapter("ch01")
    assert jax_chapter.exercise_seconds > torch_chapter.exercise_seconds  # JAX checks compile first
    assert SubmissionGrader(jax_chapter, [], None, "v").exercise_seconds == jax_chapter.exercise_seconds
    assert SubmissionGrader(jax_chapter, [], None, "v", Limits(exercise_seconds=4)).exercise_seconds == 4
