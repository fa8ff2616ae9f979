"""Chapter 10's graded exercises (10.1 random masking, 10.2 find and fix: an MAE that peeks, 10.3 DeiT's hard
distillation, 10.4 predict, then measure: the loss of a decoder that learned nothing).

The model answers pass every public and hidden check whatever the instructor's salt; the broken code handed
out fails its public check, and so does each of its bugs left alone; for every exercise, half-right answers
(each the solution's source with one mistake written in) fail the checks meant to catch them; the rules
forbid the course's own MAE and distillation code. Most tests run the checks in-process, as ``check()``
does; the last grades the solution and one half-right notebook per exercise through the real grader, in
the sandbox when bubblewrap works.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import pytest
import torch
from test_grading_new_ch58 import failed, outcomes  # one way to run every public and hidden check

from vitcourse.grading.notebook import Cell, Notebook, rule_findings, select_statements
from vitcourse.grading.sandbox import bwrap_status
from vitcourse.grading.spec import find_exercise, hidden_folder, load_chapter, load_hidden

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "notebooks" / "solutions" / "ch10_exercises.ipynb"
SALTS = ("", "term 2", "resit")


@functools.cache
def code_cells() -> tuple[str, ...]:
    nb = json.loads(SOLUTION.read_text())
    return tuple("".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code")


def cell_defining(name: str) -> str:
    return next(s for s in code_cells() if re.search(rf"^def {name}\b", s, re.M))


def solution_namespace() -> dict:
    """What grading runs of the solution: imports and definitions (the answer cells among them)."""
    namespace: dict = {}
    for source in code_cells():
        if source.startswith(("import", "from", "def")):
            exec(source, namespace)  # noqa: S102 - the course's own solution code
    return namespace


def variant(answer: str, *edits: tuple[str, str]) -> dict:
    """The solution namespace with the cell defining ``answer`` run again after ``edits`` (old, new)."""
    namespace = solution_namespace()
    source = cell_defining(answer)
    for old, new in edits:
        assert old in source, old
        source = source.replace(old, new)
    exec(source, namespace)  # noqa: S102 - the course's own solution code, edited
    return namespace


def public_of(exercise_id: str) -> set[str]:
    return {c.description for c in find_exercise(exercise_id)[1].public}


@pytest.fixture(autouse=True)
def one_thread():
    """As in the sandbox: one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- the model answers


@pytest.mark.parametrize("exercise_id", ["10.1", "10.2", "10.3", "10.4"])
def test_the_model_answer_passes_every_check_whatever_the_salt(exercise_id):
    namespace = solution_namespace()
    for salt in SALTS:
        found = outcomes(exercise_id, namespace, salt)
        assert len(found) >= 5 and not failed(found), (salt, found)


def test_every_exercise_has_hidden_checks_and_the_prediction_is_a_third_of_10_4():
    hidden = load_hidden("ch10", hidden_folder())
    assert sorted(hidden) == [ex.id for ex in load_chapter("ch10").exercises]
    weights = {c.description: c.weight for c in find_exercise("10.4")[1].public + hidden["10.4"]}
    assert weights["the prediction written for the statement's scenario"] == pytest.approx(sum(weights.values()) / 3)


def test_the_prediction_is_what_the_definition_gives():
    """1 + 1 / N_keep, and the measurement of the notebook's own scenario agrees with it."""
    from vitcourse.grading.exercises.ch10 import predicted_losses

    assert predicted_losses() == pytest.approx([1 + 1 / 98, 1 + 1 / 49, 1 + 1 / 19], abs=1e-12)
    ns = solution_namespace()
    images = torch.randn(64, 3, 224, 224, generator=ns["seeded"](0))
    for ratio, predicted in zip([0.5, 0.75, 0.9], predicted_losses()):
        _, mask, _ = ns["random_masking"](torch.zeros(64, 196, 1), ratio, ns["seeded"](1))
        assert float(ns["visible_mean_loss"](images, 16, mask)) == pytest.approx(predicted, abs=2e-3)


# ---------------------------------------------------------------- 10.1 random masking

PUBLIC_10_1 = "8 images of 16 tokens, mask ratio 0.75, the notebook's seeded generator"
PROPERTIES = "what any random masking must satisfy: the visible tokens, the mask and ids_restore agree"
ROUNDED = "7 tokens at mask ratio 0.5 (N_keep = int(3.5) = 3)"

HALF_RIGHT_10_1 = {  # name: (edits to the solution, checks that must fail, checks that must pass)
    "the last N_keep of the shuffle kept (the decoder's unshuffle puts them where hidden tokens were)": (
        [("ids_shuffle[:, :keep]", "ids_shuffle[:, n - keep:]"), ("mask[:, :keep] = 0", "mask[:, n - keep:] = 0")],
        {PUBLIC_10_1, PROPERTIES}, set()),
    "another random source (torch.randperm per image)": (
        [("noise = torch.rand(b, n, generator=generator)",
          "noise = torch.stack([torch.randperm(n, generator=generator) for _ in range(b)]).float()")],
        {PUBLIC_10_1}, {PROPERTIES}),
    "the mask left in shuffled order": (
        [("mask = mask.gather(1, ids_restore)", "pass")], {PUBLIC_10_1, PROPERTIES}, set()),
    "one noise row for the whole batch": (
        [("torch.rand(b, n, generator=generator)", "torch.rand(1, n, generator=generator).expand(b, n)")],
        {PUBLIC_10_1, PROPERTIES}, set()),
    "the visible tokens in their original order": (
        [("ids_keep = ids_shuffle[:, :keep]", "ids_keep = ids_shuffle[:, :keep].sort(dim=1).values")],
        {PUBLIC_10_1, PROPERTIES}, set()),
    "N_keep rounded instead of cut": (
        [("keep = int(n * (1 - mask_ratio))", "keep = round(n * (1 - mask_ratio))")], {ROUNDED}, {PUBLIC_10_1}),
    "N_keep as N minus the hidden count": (
        [("keep = int(n * (1 - mask_ratio))", "keep = n - int(n * mask_ratio)")], {ROUNDED}, {PUBLIC_10_1}),
}


# ---------------------------------------------------------------- 10.2 find and fix: a masked autoencoder that peeks

PUBLIC_10_2 = "4 images of 16 patches of 12 pixels, D = 8, mask ratio 0.75"
LEAK = ("ids_keep = ids_shuffle[:, :keep]", "ids_keep = ids_restore[:, :keep]")
LOSS = ("loss = (per_patch * mask).sum() / mask.sum()", "loss = per_patch.mean()")
ALL_10_2 = {PUBLIC_10_2, "196 patches of 48 pixels, D = 16, mask ratio 0.75", "a single image, mask ratio 0.5",
            "hidden patches with values 100 times larger than the visible ones",
            "mask ratio 0.9 on 25 patches (2 kept)"}

HALF_RIGHT_10_2 = {
    "only the loss fixed (the encoder still sees hidden patches)": ([LEAK], ALL_10_2, set()),
    "only the leak fixed (the loss still counts every patch)": ([LOSS], ALL_10_2, set()),
    "the loss normalised by every patch, not the hidden ones": (
        [("loss = (per_patch * mask).sum() / mask.sum()", "loss = (per_patch * mask).mean()")], ALL_10_2, set()),
    "the last N_keep of the shuffle encoded": (
        [("ids_keep = ids_shuffle[:, :keep]", "ids_keep = ids_shuffle[:, n - keep:]")], ALL_10_2, set()),
    "every token encoded, then the visible rows kept": (
        [("latent = mix(visible)", "latent = mix(x).gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))")],
        ALL_10_2, set()),
}


def test_the_code_handed_out_and_each_of_its_bugs_fail_the_public_check():
    given = cell_defining("mae_loss_with_bugs")
    assert "### BEGIN SOLUTION" not in given  # students see it whole
    namespace = solution_namespace()
    namespace["mae_loss"] = namespace["mae_loss_with_bugs"]
    assert failed(outcomes("10.2", namespace)) == ALL_10_2
    # the given code is the answer with exactly these two lines broken
    answer = re.sub(r"\n *#[^\n]*", "", cell_defining("mae_loss").split("### BEGIN SOLUTION\n")[1].split("    ###")[0])
    body = given.split("Two bugs.\"\n")[1]
    assert answer.replace(*LEAK).replace(*LOSS).strip() == body.strip()


# ---------------------------------------------------------------- 10.3 DeiT's hard distillation

PUBLIC_LOSS = "8 images, 10 classes, class-index labels, alpha 0.5"
PUBLIC_LOGITS = "the test-time logits of a small distilled ViT"
MIXUP = {"mixup labels (probability vectors)", "large logits with mixup labels (numerical stability)"}
ALPHAS = {"alpha 0.2, class-index labels", "alpha 1: the teacher's term alone, mixup labels",
          "large logits with mixup labels (numerical stability)"}
LOG_OF_SOFTMAX = '''    p_cls = torch.softmax(cls_logits, dim=-1)
    if labels.ndim == 1:
        label_term = -p_cls.gather(1, labels[:, None]).log().mean()
    else:
        label_term = -(labels * p_cls.log()).sum(dim=-1).mean()'''

HALF_RIGHT_10_3 = {
    "alpha weighing the label term": (
        [("(1 - alpha) * label_term + alpha * distill_term", "alpha * label_term + (1 - alpha) * distill_term")],
        ALPHAS, {PUBLIC_LOSS}),
    "mixup labels reduced to their top class": (
        [("F.cross_entropy(cls_logits, labels)",
          "F.cross_entropy(cls_logits, labels if labels.ndim == 1 else labels.argmax(dim=-1))")], MIXUP, {PUBLIC_LOSS}),
    "the log of the softmax (overflows with large logits)": (
        [("    label_term = F.cross_entropy(cls_logits, labels)", LOG_OF_SOFTMAX)],
        {"large logits with mixup labels (numerical stability)"}, {PUBLIC_LOSS, "mixup labels (probability vectors)"}),
    "the teacher's soft probabilities instead of its top class": (
        [("F.cross_entropy(dist_logits, teacher_labels)",
          "F.cross_entropy(dist_logits, torch.softmax(teacher_logits, dim=-1))")], {PUBLIC_LOSS}, set()),
    "test time: the average of the two heads' probabilities": (
        [("return (cls_logits + dist_logits) / 2",
          "return (torch.softmax(cls_logits, -1) + torch.softmax(dist_logits, -1)) / 2")],
        {PUBLIC_LOGITS, "the test-time logits of a grey 2-block distilled ViT"}, {PUBLIC_LOSS}),
    "test time: the CLS head alone": (
        [("return (cls_logits + dist_logits) / 2", "return cls_logits")], {PUBLIC_LOGITS}, {PUBLIC_LOSS}),
}


# ---------------------------------------------------------------- 10.4 predict, then measure

PREDICTION = "the prediction written for the statement's scenario"
PUBLIC_10_4 = "4 images of 3 x 16 x 16, patch 4, mask ratio 0.75"
NORM = "normalised pixel targets (norm_pix)"
FLAT = "norm_pix with patches of one single value (zero variance)"
BRIGHT = "images of very different brightness (one mean per image)"
UNEVEN = "a different number of hidden patches in each image"
MEASUREMENTS = {PUBLIC_10_4, NORM, FLAT, BRIGHT, UNEVEN}
PREDICTED = "return [1 + 1 / 98, 1 + 1 / 49, 1 + 1 / 19]"

HALF_RIGHT_10_4 = {
    "predicted 1 everywhere (the visible mean's own noise forgotten)": (
        [(PREDICTED, "return [1.0, 1.0, 1.0]")], {PREDICTION}, MEASUREMENTS),
    "predicted with N_keep rounded (20 at ratio 0.9)": (
        [(PREDICTED, "return [1 + 1 / 98, 1 + 1 / 49, 1 + 1 / 20]")], {PREDICTION}, MEASUREMENTS),
    "predicted with the hidden count instead of the visible one": (
        [(PREDICTED, "return [1 + 1 / 98, 1 + 1 / 147, 1 + 1 / 177]")], {PREDICTION}, MEASUREMENTS),
    "the mean over every patch, hidden ones included": (
        [("pred = (patches * visible).sum(dim=1, keepdim=True) / visible.sum(dim=1, keepdim=True)",
          "pred = patches.mean(dim=1, keepdim=True)")], MEASUREMENTS, {PREDICTION}),
    "one mean for the whole batch": (
        [("pred = (patches * visible).sum(dim=1, keepdim=True) / visible.sum(dim=1, keepdim=True)",
          "pred = (patches * visible).sum(dim=(0, 1), keepdim=True) / visible.sum(dim=(0, 1), keepdim=True)")],
        {BRIGHT, UNEVEN}, {PREDICTION}),
    "each image's average, then the average over images": (
        [("return (per_patch * mask).sum() / mask.sum()", "return ((per_patch * mask).sum(1) / mask.sum(1)).mean()")],
        {UNEVEN}, {PUBLIC_10_4, NORM, FLAT, BRIGHT, PREDICTION}),
    "the biased variance for norm_pix": (
        [("patches.var(dim=-1, keepdim=True)", "patches.var(dim=-1, keepdim=True, unbiased=False)")],
        {NORM, FLAT}, {PUBLIC_10_4, BRIGHT, UNEVEN}),
    "norm_pix without the epsilon": (
        [("(var + 1e-6).sqrt()", "var.sqrt()")], {FLAT}, {PUBLIC_10_4, NORM, BRIGHT, UNEVEN}),
    "patches numbered column by column": (
        [("permute(0, 2, 4, 3, 5, 1)", "permute(0, 4, 2, 3, 5, 1)")], {PUBLIC_10_4}, {PREDICTION}),
}

HALF_RIGHT = {"10.1": ("random_masking", HALF_RIGHT_10_1), "10.2": ("mae_loss", HALF_RIGHT_10_2),
              "10.3": ("hard_distillation_loss", HALF_RIGHT_10_3), "10.4": ("visible_mean_loss", HALF_RIGHT_10_4)}


def test_every_exercise_has_several_half_right_answers():
    assert all(2 <= len(cases) for _, cases in HALF_RIGHT.values())


@pytest.mark.parametrize("exercise_id, name", [(ex, name) for ex, (_, cases) in HALF_RIGHT.items() for name in cases])
def test_half_right_answers_fail_the_checks_meant_for_them(exercise_id, name):
    answer, cases = HALF_RIGHT[exercise_id]
    edits, must_fail, must_pass = cases[name]
    found = outcomes(exercise_id, variant(answer, *edits))
    assert must_fail <= failed(found), found
    assert not must_pass & failed(found), found


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize("exercise_id, source", [
    ("10.1", "from vitcourse.mae import random_masking as reference\n\n"
             "def random_masking(tokens, mask_ratio, generator):\n    return reference(tokens, mask_ratio, generator)"),
    ("10.2", "import vitcourse.mae\n\ndef mae_loss(patches, params, mask_ratio, generator):\n"
             "    return vitcourse.mae.random_masking(patches, mask_ratio, generator)"),
    ("10.3", "from vitcourse import distill\n\ndef hard_distillation_loss(c, d, y, t, alpha=0.5):\n"
             "    return distill.distillation_loss(c, d, y, t, 'hard', alpha)"),
    ("10.4", "from vitcourse.mae import MAE\n\ndef visible_mean_loss(images, patch_size, mask, norm_pix=False):\n"
             "    return MAE"),
])
def test_the_course_code_the_exercises_rebuild_is_forbidden(exercise_id, source):
    chapter = load_chapter("ch10")
    cells = [Cell(1, "code", "import torch"), *(Cell(i + 2, "code", s) for i, s in enumerate(source.split("\n\n")))]
    statements, _ = select_statements(Notebook(cells=cells), {a for ex in chapter.exercises for a in ex.answers})
    forbidden, _ = rule_findings(statements, chapter.exercises)
    assert set(forbidden) == {exercise_id}, forbidden


def test_the_solution_uses_nothing_forbidden_and_the_patches_module_is_allowed():
    chapter = load_chapter("ch10")
    assert chapter.sandbox_modules == ("patches",)
    cells = [Cell(1, "code", "from vitcourse.patches import image_to_patches"),
             Cell(2, "code", "def visible_mean_loss(images, patch_size, mask, norm_pix=False):\n"
                             "    return image_to_patches(images, patch_size)")]
    statements, _ = select_statements(Notebook(cells=cells), {"visible_mean_loss"})
    assert rule_findings(statements, chapter.exercises) == ({}, [])


# ---------------------------------------------------------------- through the real grader


def _half_right_notebook(answer: str, edits: list[tuple[str, str]]) -> dict:
    nb = json.loads(SOLUTION.read_text())
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and re.search(rf"^def {answer}\b", source, re.M):
            for old, new in edits:
                source = source.replace(old, new)
            cell["source"] = source
    return nb


def test_the_grader_gives_the_solution_full_marks_and_half_right_answers_less(tmp_path):
    """The real grading path (``grade_folder``: the sandbox when bubblewrap works, the chapter's budgets)."""
    from vitcourse.grading.batch import grade_folder

    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "solution.ipynb").write_text(SOLUTION.read_text())
    (subs / "stub.ipynb").write_text((ROOT / "notebooks" / "ch10_exercises.ipynb").read_text())
    picks = {"10.1": "one noise row for the whole batch",
             "10.2": "only the loss fixed (the encoder still sees hidden patches)",
             "10.3": "alpha weighing the label term",
             "10.4": "predicted 1 everywhere (the visible mean's own noise forgotten)"}
    for exercise_id, name in picks.items():
        answer, cases = HALF_RIGHT[exercise_id]
        nb = _half_right_notebook(answer, cases[name][0])
        (subs / f"half_{exercise_id.replace('.', '_')}.ipynb").write_text(json.dumps(nb))
    sandboxed = bwrap_status()[0]
    report = grade_folder(subs, tmp_path / "out", workers=2, chapter="ch10", progress=False, salt="a test salt",
                          unsafe_no_sandbox=not sandboxed)
    results = {r.student: r for r in report.results}
    points = {ex.id: ex.points for ex in load_chapter("ch10").exercises}
    assert results["solution"].total == results["solution"].max_total == sum(points.values()), \
        [(c.description, c.message) for c in results["solution"].checks if c.points < c.max_points]
    assert results["stub"].total == 0
    for exercise_id in picks:
        got = results[f"half_{exercise_id.replace('.', '_')}"].scores
        assert got[exercise_id] < points[exercise_id], (exercise_id, got)
        assert all(got[other] == points[other] for other in points if other != exercise_id), (exercise_id, got)
    # only the prediction is wrong: exactly its third of 10.4's points is lost
    assert results["half_10_4"].scores["10.4"] == pytest.approx(points["10.4"] * 2 / 3, abs=0.01)  # scores: 2 decimals
