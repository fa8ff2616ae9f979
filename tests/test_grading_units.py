"""Fast tests of the grading pieces that need no sandbox: reading submissions, rules, values, comparisons, check()."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vitcourse
from vitcourse.grading import check
from vitcourse.grading.batch import _stored, csv_cell, display_name, grader_version, student_key
from vitcourse.grading.generate import make_student, regenerate, strip_solutions
from vitcourse.grading.grader import CheckResult, Limits, StudentResult
from vitcourse.grading.notebook import Cell, Notebook, clean, read_notebook, rule_findings, select_statements
from vitcourse.grading.public import CheckFailed, NotDoneYet
from vitcourse.grading.runtime import decode, encode
from vitcourse.grading.sandbox import parse_record
from vitcourse.grading.spec import allclose, chapter_names, exact, hidden_folder, load_chapter, seed_for

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


def test_read_notebook_reports_invalid_json(tmp_path):
    bad = tmp_path / "x.ipynb"
    bad.write_text('{"cells": [')
    nb = read_notebook(bad)
    assert nb.cells == [] and "not notebook JSON" in nb.ungradable


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


def test_values_travel_as_json_without_pickles_and_within_bounds():
    value = [np.arange(3.0), {"n": 2, "m": np.array(7)}, np.array([[1.0, 2.0]]).T]
    back = decode(json.loads(json.dumps(encode(value))))
    np.testing.assert_array_equal(back[0], np.arange(3.0))
    assert back[1]["n"] == 2 and back[1]["m"].shape == () and back[2].shape == (2, 1)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    lying = io.BytesIO()
    np.save(lying, np.zeros(4))
    for bad in ({"$npy": base64.b64encode(buffer.getvalue()).decode()},  # a pickle inside
                {"$npy": base64.b64encode(pickle.dumps([1]))},  # not .npy at all
                {"$npy": base64.b64encode(lying.getvalue()[:-8]).decode()},  # shorter than its header says
                functools.reduce(lambda v, _: [v], range(100), 1)):  # nested too deeply
        with pytest.raises((ValueError, TypeError)):
            decode(bad)


def test_records_are_parsed_with_bounds_and_never_raise():
    assert parse_record(b'{"done": "c1", "ok": true}') == {"done": "c1", "ok": True}
    for line in (b"[" * 100_000 + b"]" * 100_000, b'{"v": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"[1]",
                 b'{"a": "\\ud800"}'):
        record = parse_record(line)
        assert record is None or isinstance(record, dict)
    text = clean("a\ud800b\x00c")
    assert text.encode("utf-8") and text[0] == "a" and text[-1] == "c" and "\x00" not in text


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


def test_salt_changes_only_the_hidden_inputs():
    def draw(**kwargs):
        return seed_for("ch01", "1.1", 0, **kwargs).random(3)

    np.testing.assert_array_equal(draw(hidden=False), draw(hidden=False, salt="term 2"))
    np.testing.assert_array_equal(draw(hidden=True), draw(hidden=True, salt=""))
    assert not np.array_equal(draw(hidden=True), draw(hidden=True, salt="term 2"))


def test_grader_version_covers_the_package_the_hidden_checks_and_the_salt(tmp_path):
    hidden = tmp_path / "hidden"
    shutil.copytree(hidden_folder(), hidden)
    before = grader_version(hidden, "")
    assert grader_version(hidden, "term 2") != before
    (hidden / "ch01.py").write_text((hidden / "ch01.py").read_text() + "\n# changed\n")
    assert grader_version(hidden, "") != before


def test_stored_results_are_checked_before_a_rerun_trusts_them(tmp_path):
    points = {ex.id: ex.points for ex in load_chapter("ch01").exercises}
    scores = {ex_id: 2.0 if ex_id == "1.1" else 0.0 for ex_id in points}
    good = StudentResult("ada", "ada-1", "0" * 64, "ch01", "v", True, scores=scores,
                         maximum=points, checks=[CheckResult("1.1", "d", False, 2.0, 2.0)])
    path = tmp_path / "ada.json"
    path.write_text(json.dumps(good.to_json()))
    assert _stored(path, "ada-1", "0" * 64, "v", True, points) == good
    assert _stored(path, "ada-1", "1" * 64, "v", True, points) is None  # the notebook changed
    assert _stored(path, "ada-1", "0" * 64, "v", False, points) is None  # graded with another sandbox setting
    for change in ({"scores": {"1.1": 20.0, "1.2": 3.0, "1.3": 0.0}}, {"key": "bob-2"}, {"maximum": {"1.1": 20}},
                   {"checks": [{"exercise": "1.1"}]}, {"extra": 1}, {"scores": "all"}):
        path.write_text(json.dumps(dict(good.to_json(), **change)))
        assert _stored(path, "ada-1", "0" * 64, "v", True, points) is None, change
    path.write_text("[" * 100_000)
    assert _stored(path, "ada-1", "0" * 64, "v", True, points) is None


def test_unreadable_submissions_are_one_sentence_each(tmp_path):
    solution = NOTEBOOKS / "solutions" / "ch01_exercises.ipynb"
    (tmp_path / "link.ipynb").symlink_to(solution)
    (tmp_path / "zero.ipynb").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.ipynb")
    (tmp_path / "folder.ipynb").mkdir()
    with open(tmp_path / "big.ipynb", "wb") as f:
        f.truncate(40 * 2**20)
    (tmp_path / "deep.ipynb").write_text('{"cells": [], "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp_path / "list.ipynb").write_text("[1, 2]")
    (tmp_path / "latin1.ipynb").write_bytes(b'{"cells": "\xe9"}')
    started = time.monotonic()
    reasons = {p.name: read_notebook(p).ungradable for p in tmp_path.iterdir()}
    assert time.monotonic() - started < 5  # the FIFO and /dev/zero do not block
    assert "symbolic link" in reasons["link.ipynb"] and "symbolic link" in reasons["zero.ipynb"]
    assert "not a regular file" in reasons["fifo.ipynb"] and "not a regular file" in reasons["folder.ipynb"]
    assert "MiB" in reasons["big.ipynb"] and "nested too deeply" in reasons["deep.ipynb"]
    assert all(reason and "\n" not in reason for reason in reasons.values()), reasons
    huge = json.loads(solution.read_text())
    huge["metadata"]["n"] = 0
    text = json.dumps(huge).replace('"n": 0', '"n": ' + "7" * 5000).replace("torch.exp", "torch.exp  # \\ud800")
    (tmp_path / "huge_int.ipynb").write_text(text)
    nb = read_notebook(tmp_path / "huge_int.ipynb")
    assert not nb.ungradable and nb.chapter == "ch01" and "\ufffd" in nb.cells[3].source


def test_file_names_map_to_unique_keys_and_safe_csv_cells():
    names = ["José García.ipynb", "Jos__Garc_a-978edf99.ipynb", "Jos__Garc_a.ipynb", os.fsdecode(b"caf\xe9.ipynb"),
             "../../etc.ipynb", "a\nb.ipynb"]
    keys = [student_key(n) for n in names]
    assert len(set(keys)) == len(keys) and all(re.fullmatch(r"[A-Za-z0-9_.-]+", k) for k in keys)
    assert student_key(names[0]) == student_key("José García.ipynb")  # stable across reruns
    assert display_name(os.fsdecode(b"caf\xe9")) == "caf\\xe9" and "\n" not in display_name("a\nb")
    assert [csv_cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "ada")] == ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "ada"]


def test_forbidden_calls_are_found_through_aliases_methods_and_helpers():
    chapter = load_chapter("ch01")
    source = {
        1: "import torch\nimport torch.nn.functional as F\nfrom torch import softmax as sm",
        2: "def softmax(x, dim=-1):\n    return helper(x, dim)\n\n\nf = getattr(torch, 'soft' + 'max')",
        3: "def helper(x, dim):\n    return x.softmax(dim) + sm(x, dim)",
        4: "def attention(q, k, v, mask=None):\n    w = F.softmax(q @ k.mT, -1)\n    return w @ v, w",  # allowed in 1.2
        5: "def unused(x):\n    return torch.softmax(x, 0)",  # a test helper nothing uses
        6: "g = getattr(torch, 'exp')",  # not an answer cell: never run, not flagged
    }
    nb = Notebook(cells=[Cell(i, "code", text) for i, text in source.items()])
    statements, _ = select_statements(nb, {"softmax", "attention", "MultiHeadSelfAttention"})
    forbidden, review = rule_findings(statements, chapter.exercises)
    assert set(forbidden) == {"1.1"}
    assert any("cell 3, line 2 uses x.softmax" in f for f in forbidden["1.1"])
    assert any("uses torch.softmax" in f and "cell 3" in f for f in forbidden["1.1"])  # `sm` is torch.softmax
    assert not any("cell 5" in f for f in forbidden["1.1"]) and review == ["cell 2, line 5: getattr"]


def test_hidden_checks_are_not_in_the_package():
    package = Path(vitcourse.__file__).resolve().parent
    assert not list(package.rglob("hidden")) and hidden_folder() is not None
    assert not any(re.search(r"^HIDDEN\s*=", p.read_text(), re.M) for p in package.rglob("*.py"))


def test_the_built_wheel_holds_no_hidden_check(tmp_path):
    root = Path(vitcourse.__file__).resolve().parent.parent
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".*", "_build", "build", "*.egg-info", "__pycache__",
                                                                 "book", "tests", "runs"))
    assert (source / "grading" / "hidden" / "ch01.py").is_file()
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("vitcourse-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert any(n.endswith("grading/exercises/ch01.py") for n in names)
        assert not any("hidden" in n for n in names)
        assert not any(re.search(rb"^HIDDEN\s*=", z.read(n), re.M) for n in names if n.endswith(".py"))


def test_exercise_time_budget_comes_from_the_chapter_unless_given():
    jax_chapter, torch_chapter = load_chapter("ch07"), load_chapter("ch01")
    assert jax_chapter.exercise_seconds > torch_chapter.exercise_seconds  # JAX checks compile first
    # a start, then setup and every exercise's budget once per phase (public, hidden)
    assert Limits().cap(torch_chapter) == 20 + 2 * (30 + len(torch_chapter.exercises) * torch_chapter.exercise_seconds)
    assert Limits(exercise_seconds=4).cap(jax_chapter) == 20 + 2 * (30 + 4 * len(jax_chapter.exercises))


def _failed_checks(chapter: str, exercise_id: str, namespace: dict) -> tuple[list[str], list[str]]:
    """The public and the hidden checks of one exercise that ``namespace``'s answers fail (no sandbox)."""
    from vitcourse.grading.runtime import evaluate, seed_all, to_plain
    from vitcourse.grading.spec import load_hidden

    exercise = load_chapter(chapter).exercise(exercise_id)
    failed: tuple[list[str], list[str]] = ([], [])
    for hidden, checks in enumerate((exercise.public, load_hidden(chapter, hidden_folder()).get(exercise_id, []))):
        for index, chk in enumerate(checks):
            case = chk.build(seed_for(chapter, exercise_id, index, hidden=bool(hidden)))
            seed_all(0)
            try:
                message = case.compare(to_plain(evaluate(case.task, namespace)), case.expected)
            except Exception as err:  # noqa: BLE001 - a crash fails the check, as in the grader
                message = f"{type(err).__name__}: {err}"
            if message is not None:
                failed[hidden].append(chk.description)
    return failed


def _replace(source: str, old: str, new: str) -> str:
    assert old in source, old
    return source.replace(old, new)


def _variant(chapter: str, name: str, *edits: tuple[str, str]) -> dict:
    """The solution namespace with the answer ``name`` redefined from its solution source after ``edits``."""
    namespace = _solution_namespace(chapter)
    nb = json.loads((NOTEBOOKS / "solutions" / f"{chapter}_exercises.ipynb").read_text())
    source = next("".join(c["source"]) for c in nb["cells"]
                  if c["cell_type"] == "code" and re.search(rf"^(def|class) {name}\b", "".join(c["source"]), re.M))
    for old, new in edits:
        source = _replace(source, old, new)
    exec(source, namespace)  # noqa: S102 - the course's own solution code, edited
    return namespace


# Exercises whose answers the chapters do not print: (chapter, id, answer, [(half-right edits, what fails)]).
# "public": a public check already catches the mistake; "hidden": only a hidden check does.
THINKING = [
    ("ch01", "1.4", "attention_backward", [
        ([("(dweights - (dweights * weights).sum(dim=-1, keepdim=True))", "dweights")], "public"),  # diag(w) only
        ([("dq = dscores @ k * scale", "dq = dscores @ k")], "public"),  # the 1/sqrt(d_k) forgotten in dq
        ([("transpose(-2, -1)", "transpose(1, 2)")], "hidden"),  # right for 3-d inputs only
    ]),
    ("ch02", "2.4", "image_to_overlapping_patches", [
        ([("permute(0, 2, 3, 4, 5, 1)", "permute(0, 2, 3, 1, 4, 5)")], "public"),  # (channel, row, column)
        ([("images.unfold(2, p, stride).unfold(3, p, stride)",  # as many rows as columns: square images only
           "images.unfold(2, p, stride).unfold(3, p, stride)[:, :, :(images.shape[3] - p) // stride + 1]")],
         "hidden"),
    ]),
    # Find and fix: each half-right answer leaves one of the given code's bugs in place.
    ("ch01", "1.2", "attention", [
        ([("scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])", "scores = q @ k.transpose(-2, -1)"),
          ("weights = softmax(scores, dim=-1)", "weights = softmax(scores, dim=-1) / math.sqrt(q.shape[-1])")],
         "public"),  # scaled after the softmax
        ([("        scores = scores.masked_fill(mask.logical_not(), float(\"-inf\"))\n    weights = softmax(scores, dim=-1)",
           "        pass\n    weights = softmax(scores, dim=-1)\n    if mask is not None:\n"
           "        weights = weights.masked_fill(mask.logical_not(), 0.0)")], "public"),  # masked after the softmax
        ([("k.transpose(-2, -1)", "k.transpose(1, 2)")], "hidden"),  # right for one leading dimension only
    ]),
    ("ch02", "2.3", "PatchEmbed", [
        ([("features.flatten(2).transpose(1, 2)", "features.transpose(2, 3).flatten(2).transpose(1, 2)")],
         "public"),  # patches numbered column by column
        ([("features.flatten(2).transpose(1, 2)", "features.reshape(len(images), -1, features.shape[1])")],
         "public"),  # channels mixed into positions
    ]),
    ("ch03", "3.4", "FixedBlock", [
        ([("reshape(b, n, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)",
           "reshape(b, n, self.heads, 3, head_dim).permute(3, 0, 2, 1, 4)")], "public"),  # the head split left
        ([("x = x + self.attn(self.norm1(x))", "x = self.norm1(x)\n        x = x + self.attn(x)")],
         "public"),  # the residual stream normalised
        ([("self.mlp(self.norm2(x))", "self.mlp(self.norm1(x))")], "public"),  # norm1 twice
        ([("reshape(b, n, 3, self.heads, head_dim)", "reshape(b, n, 3, 4, dim // 4)")], "hidden"),  # 4 heads only
    ]),
    # Derive: a formula right for one regime only.
    ("ch04", "4.4", "vit_flops", [
        ([("tokens = patches + 1", "tokens = patches")], "public"),  # the CLS token forgotten
        ([("scores_and_mix = 2 * tokens * tokens * dim", "scores_and_mix = 0")], "public"),  # no q kᵀ, no weights v
        ([("return 2 * (embed", "return (embed")], "public"),  # multiply-adds, not operations
        ([("return 2 * (2 * embed + 3 * rest)", "return 3 * 2 * (embed + rest)")],
         "public"),  # a training step as three forward passes: the image's gradient counted
        ([("return 2 * (2 * embed + 3 * rest)", "return 2 * (2 * embed + 2 * rest)")],
         "public"),  # the backward pass as one product per forward product
        ([("mlp = 2 * tokens * dim * mlp_dim", "mlp = 2 * tokens * dim * 4 * dim")], "hidden"),  # a 4x MLP assumed
        ([("(patch_size * patch_size * in_channels)", "(patch_size * patch_size * 3)")], "hidden"),  # RGB only
    ]),
    ("ch05", "5.5", "smoothing_optimum", [
        ([("true, other = 1 - eps + eps / k, eps / k", "true, other = 1 - eps, eps / k")],
         "public"),  # the true class's share of the spread mass forgotten
        ([("- (k - 1) * other", "- k * other")], "public"),  # K wrong classes in the entropy
        ([("true, other = 1 - eps + eps / k, eps / k", "true, other = 1 - eps, eps / (k - 1)")],
         "public"),  # the other convention: the spread only over the wrong classes
    ]),
    # Predict, then measure: a measurement blind to dtypes, and the two likeliest wrong predictions.
    ("ch07", "7.4", "count_traces", [
        ([("    jitted = jax.jit(step)\n    for x in arrays:\n        jitted(x)\n    return traces",
           "    return len({x.shape for x in arrays})")], "hidden"),  # shapes counted, dtypes ignored
        ([("    return 4\n", "    return 2\n")], "hidden"),  # the evaluation batches forgotten
        ([("    return 4\n", "    return 1\n")], "hidden"),  # compiled once and for all
    ]),
    ("ch08", "8.1", "top_k", [
        ([("probs.topk(k, dim=-1)", "probs[:, 1:].topk(k, dim=-1)")], "public"),  # class 0 still dropped
        ([("    probs = torch.softmax(logits, dim=-1)  # (B, K)\n    values, indices = probs.topk(k, dim=-1)",
           "    values, indices = logits.topk(k, dim=-1)"), ("return values,", "return values.softmax(dim=-1),")],
         "public"),  # softmax over the k kept logits
        ([("probs.topk(k, dim=-1)", "probs[:, 1:].topk(k, dim=-1)"), ("indices.to(torch.int64)",
                                                                       "(indices + 1).to(torch.int64)")],
         "hidden"),  # indices shifted back, class 0 still never returned
    ]),
]


@pytest.mark.parametrize(("chapter", "exercise_id", "name", "mistakes"), THINKING, ids=[t[1] for t in THINKING])
def test_new_exercises_pass_on_solutions_and_catch_half_right_answers(chapter, exercise_id, name, mistakes):
    assert _failed_checks(chapter, exercise_id, _solution_namespace(chapter)) == ([], [])
    for edits, caught_by in mistakes:
        public, hidden = _failed_checks(chapter, exercise_id, _variant(chapter, name, *edits))
        if caught_by == "public":
            assert public, (exercise_id, edits)
        else:  # the public checks pass, so only the hidden ones stand between this answer and full marks
            assert not public and hidden, (exercise_id, edits, public, hidden)


def test_hand_written_gradients_may_not_call_autograd():
    chapter = load_chapter("ch01")
    source = {
        1: "import torch\nfrom torch.autograd import grad as g",
        2: "def attention_backward(q, k, v, grad_out):\n    q.requires_grad_()\n"
           "    out, _ = attention(q, k, v)\n    (out * grad_out).sum().backward()\n    return q.grad, g(out, k), None",
    }
    nb = Notebook(cells=[Cell(i, "code", text) for i, text in source.items()])
    statements, _ = select_statements(nb, {"attention_backward"})
    forbidden, _ = rule_findings(statements, chapter.exercises)
    assert set(forbidden) == {"1.4"}
    found = " ".join(forbidden["1.4"])
    assert ".backward" in found and "q.grad" in found and "torch.autograd.grad" in found


def test_overlapping_patches_may_not_call_unfold_but_may_use_the_tensor_method():
    chapter = load_chapter("ch02")
    source = {
        1: "import torch\nimport torch.nn.functional as F",
        2: "def image_to_overlapping_patches(images, patch_size, stride):\n"
           "    return F.unfold(images, patch_size, stride=stride).mT",
        3: "def image_to_patches(images, patch_size):\n    return images.unfold(2, patch_size, patch_size)",
    }
    nb = Notebook(cells=[Cell(i, "code", text) for i, text in source.items()])
    statements, _ = select_statements(nb, {"image_to_overlapping_patches", "image_to_patches"})
    forbidden, _ = rule_findings(statements, chapter.exercises)
    assert set(forbidden) == {"2.4"} and "torch.nn.functional.unfold" in forbidden["2.4"][0]


def test_overlapping_patches_reference_agrees_with_the_course_when_they_do_not_overlap():
    from vitcourse.grading.exercises.ch02 import overlapping_case
    from vitcourse.patches import image_to_patches

    case = overlapping_case(2, 3, 12, 8, 4, 4)(np.random.default_rng(0))
    images = torch.from_numpy(case.task["args"][0]["$arr"])
    torch.testing.assert_close(torch.from_numpy(case.expected), image_to_patches(images, 4))


# ---------------------------------------------------------------- what the exercises ask (book/instructors.md)

KINDS = {"rebuild", "specification", "extend", "find and fix", "predict and measure", "derive", "design"}
GUIDE = Path(__file__).resolve().parent.parent / "book" / "instructors.md"


def _guide_table() -> dict[str, tuple[float, dict[str, tuple[float, str]]]]:
    """``{chapter: (seconds per exercise, {id: (points, kind)})}`` from the instructor's guide."""
    rows = {}
    for line in GUIDE.read_text().splitlines():
        row = re.fullmatch(r"\| (\d+) \| (\d+(?:\.\d+)?) \| (.+) \|", line)
        if row:
            items = [re.fullmatch(r"(\d+\.\d+): (\d+(?:\.\d+)?), ([a-z ]+)", item.strip())
                     for item in row.group(3).split(";")]
            assert all(items), line
            rows[f"ch{int(row.group(1)):02d}"] = (float(row.group(2)),
                                                  {m.group(1): (float(m.group(2)), m.group(3)) for m in items})
    return rows


def test_the_guide_states_every_exercise_points_and_budget_as_the_specs_do():
    table = _guide_table()
    assert sorted(table) == chapter_names()
    for name, (seconds, exercises) in table.items():
        chapter = load_chapter(name)
        assert seconds == chapter.exercise_seconds, name
        assert {ex.id: float(ex.points) for ex in chapter.exercises} == {k: v[0] for k, v in exercises.items()}, name


def test_at_most_half_of_each_chapters_points_rebuild_what_the_chapter_prints():
    for name, (_, exercises) in _guide_table().items():
        assert {kind for _, kind in exercises.values()} <= KINDS, name
        total = sum(points for points, _ in exercises.values())
        rebuilt = sum(points for points, kind in exercises.values() if kind == "rebuild")
        assert rebuilt <= total / 2, (name, rebuilt, total)


def test_every_exercise_that_asks_for_thinking_has_half_right_answers_that_fail():
    tested = {exercise_id: mistakes for _, exercise_id, _, mistakes in THINKING}
    tested_elsewhere = {"5.4", "6.4", "7.6", "8.4",  # tests/test_grading_new_ch58.py
                        "10.2", "10.4"}  # tests/test_grading_ch10.py
    for _, (_, exercises) in _guide_table().items():
        for exercise_id, (_, kind) in exercises.items():
            if kind in {"find and fix", "predict and measure", "derive", "extend", "design"}:
                assert exercise_id in tested_elsewhere or len(tested.get(exercise_id, [])) >= 2, exercise_id


# The broken code each find-and-fix exercise hands out: (chapter, cell defining it, its name, the answer's name).
GIVEN_BUGS = [
    ("ch01", "attention_with_bugs", "attention"),
    ("ch02", "BuggyPatchEmbed", "PatchEmbed"),
    ("ch03", "BuggyBlock", "FixedBlock"),
    ("ch08", "top_k_with_bugs", "top_k"),
]


@pytest.mark.parametrize(("chapter", "given", "answer"), GIVEN_BUGS, ids=[g[1] for g in GIVEN_BUGS])
def test_the_broken_code_handed_out_fails_its_public_checks(chapter, given, answer):
    namespace = _solution_namespace(chapter)
    nb = json.loads((NOTEBOOKS / "solutions" / f"{chapter}_exercises.ipynb").read_text())
    source = next("".join(c["source"]) for c in nb["cells"]
                  if c["cell_type"] == "code" and re.search(rf"^(def|class) {given}\b", "".join(c["source"]), re.M))
    assert "### BEGIN SOLUTION" not in source  # students see it whole
    exec(source, namespace)  # noqa: S102 - the course's own (deliberately broken) code
    namespace[answer] = namespace[given]
    exercise_id = next(ex.id for ex in load_chapter(chapter).exercises if answer in ex.answers)
    public, hidden = _failed_checks(chapter, exercise_id, namespace)
    output_checks = [c.description for c in load_chapter(chapter).exercise(exercise_id).public
                     if "names and shapes" not in c.description]
    assert set(output_checks) <= set(public), (public, output_checks)
