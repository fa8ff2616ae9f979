"""Chapter 10's experiment (vitcourse.lowlabel) and its page.

The training loop must be chapter 9's (train_seed's result exactly), its recipe chapter 9's with augmentation on,
the teacher's disagreement with the labels counted on the student's own augmented views, the distillation loss
DeiT's hard one,
pretraining must never read a label, the cache must rerun only what a change touches, every verdict sentence
must match stats.compare, and the page must compute what its prose says.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

from vitcourse import distill, lowlabel, stats
from vitcourse.experiments import Recipe, TensorData, model_from_spec, train_seed

ROOT = Path(__file__).resolve().parents[1]
PAGE = "book/ch10_low_labels"
TINY_VIT = {"kind": "vit", "image_size": 8, "patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
TINY_RECIPE = Recipe(epochs=2, batch_size=8, warmup_epochs=1.0, crop_pad=0, flip=False, eval_points=2)
AUGMENTED = dataclasses.replace(TINY_RECIPE, crop_pad=2, flip=True)


@pytest.fixture(scope="module")
def data() -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = lambda n: torch.randn(n, 3, 8, 8, generator=g)  # noqa: E731
    y = lambda n: torch.randint(0, 4, (n,), generator=g)  # noqa: E731
    return TensorData(x(24), y(24), x(8), y(8), x(16), y(16))


def tiny_plan(**changes) -> lowlabel.Plan:
    fields = dict(size=16, seeds=(0, 1), vit=TINY_VIT, cnn={"kind": "cnn", "width": 2}, recipe=TINY_RECIPE,
                  pretrain=lowlabel.Pretrain(epochs=2, batch_size=8, warmup_epochs=1.0, decoder_dim=8,
                                             decoder_depth=1, decoder_heads=2),
                  probe=lowlabel.Probe(steps=5))
    return lowlabel.Plan(**{**fields, **changes})


# --------------------------------------------------------------------------- chapter 9's budget, chapter 9's loop


def _chapter9_settings() -> dict:
    """The literal VIT, CNN, Recipe(...) and small_images(...) of chapter 9's page."""
    nb = nbformat.read(ROOT / "book/ch09_small_data.ipynb", as_version=4)
    found = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and \
                    node.targets[0].id in ("VIT", "CNN", "ABLATION_SIZE", "SEEDS"):
                try:
                    found[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("Recipe", "small_images"):
                found[node.func.id] = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return found


def test_the_data_models_recipe_and_seeds_are_chapter_9s_with_augmentation_on():
    ch9 = _chapter9_settings()
    assert ch9["VIT"] == lowlabel.VIT and ch9["CNN"] == lowlabel.CNN
    assert (ch9["Recipe"]["crop_pad"], ch9["Recipe"]["flip"]) == (0, False)  # chapter 9: off
    assert Recipe(**{**ch9["Recipe"], "crop_pad": 2, "flip": True}) == lowlabel.RECIPE
    assert (lowlabel.RECIPE.crop_pad, lowlabel.RECIPE.flip) == (Recipe.crop_pad, Recipe.flip) == (2, True)
    assert ch9["small_images"] == lowlabel.DATA
    plan = lowlabel.Plan()
    assert plan.size == ch9["ABLATION_SIZE"] and list(plan.seeds) == ch9["SEEDS"]
    assert plan.recipe == lowlabel.RECIPE and dict(plan.vit) == lowlabel.VIT and dict(plan.cnn) == lowlabel.CNN


@pytest.mark.parametrize("recipe", [TINY_RECIPE, AUGMENTED], ids=["plain", "augmented"])
def test_fit_is_train_seed_for_a_plain_model(data, recipe):
    expected = train_seed(TINY_VIT, data, 16, recipe, seed=3)
    torch.manual_seed(3)
    model = model_from_spec(TINY_VIT, 4)
    assert lowlabel.fit(model, data, 16, recipe, seed=3) == expected


def test_teacher_disagreement_is_counted_on_the_students_own_views(data, monkeypatch):
    torch.manual_seed(0)
    teacher = model_from_spec({"kind": "cnn", "width": 2}, 4)
    with torch.no_grad():  # without augmentation: each clean image once an epoch
        clean = float((teacher.eval()(data.train_x[:16]).argmax(1) != data.train_y[:16]).float().mean())
    teacher.train()
    assert lowlabel.teacher_disagreement(teacher, data, 16, TINY_RECIPE, seed=0) == pytest.approx(clean)
    assert teacher.training  # left as it was found

    seen = []

    class Recording(distill.DistillationLoss):
        def forward(self, images, outputs, labels):
            with torch.no_grad():
                seen.append((self.teacher(images).argmax(1) != labels.argmax(1)).float())
            return super().forward(images, outputs, labels)

    monkeypatch.setattr(distill, "DistillationLoss", Recording)  # experiments.fit imports it when called
    torch.manual_seed(0)
    student = model_from_spec({**TINY_VIT, "distilled": True}, 4)
    lowlabel.fit(student, data, 16, AUGMENTED, seed=5, teacher=teacher)
    assert len(seen) == 4  # 2 epochs of 2 batches
    expected = float(torch.cat(seen).mean())
    assert lowlabel.teacher_disagreement(teacher, data, 16, AUGMENTED, seed=5) == pytest.approx(expected)


def test_distillation_is_deits_hard_loss_with_smoothed_labels_only(data, monkeypatch):
    seen = []

    class Recording(distill.DistillationLoss):
        def forward(self, images, outputs, labels):
            loss = super().forward(images, outputs, labels)
            seen.append((images, [o.detach() for o in outputs], labels, loss.detach(), self.teacher.training))
            return loss

    monkeypatch.setattr(distill, "DistillationLoss", Recording)  # experiments.fit imports it when called
    recipe = Recipe(epochs=1, batch_size=8, warmup_epochs=0.0, label_smoothing=0.2, crop_pad=0, flip=False,
                    eval_points=1)
    teacher = model_from_spec({"kind": "cnn", "width": 2}, 4)
    torch.manual_seed(0)
    student = model_from_spec({**TINY_VIT, "distilled": True}, 4)
    result = lowlabel.fit(student, data, 16, recipe, seed=0, teacher=teacher)
    assert len(seen) == 2 and 0 <= result["test_acc"] <= 1
    images, (z_cls, z_dist), targets, loss, teacher_training = seen[0]
    assert not teacher_training  # the teacher answers in eval mode
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:8]
    y = data.train_y[order]
    assert_close(targets.sum(1), torch.ones(8))
    with torch.no_grad():
        hard = teacher(images).argmax(1)
    expected = 0.5 * F.cross_entropy(z_cls, y, label_smoothing=0.2) + 0.5 * F.cross_entropy(z_dist, hard)
    assert_close(loss, expected)


def test_pretraining_never_reads_a_label(data):
    plan = tiny_plan()
    scrambled = TensorData(data.train_x, data.train_y.flip(0), data.val_x, data.val_y, data.test_x, data.test_y)
    a, record_a = lowlabel.pretrain_mae(data, 16, plan.vit, plan.pretrain, seed=1)
    b, record_b = lowlabel.pretrain_mae(scrambled, 16, plan.vit, plan.pretrain, seed=1)
    assert record_a == record_b
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert len(record_a["loss"]) == plan.pretrain.epochs and record_a["flat_loss"] > 0


def test_the_probe_leaves_the_encoder_frozen(data):
    plan = tiny_plan()
    torch.manual_seed(0)
    vit = lowlabel.build_mae(plan.vit, plan.pretrain, 4).to_vit(4)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    result = lowlabel.linear_probe(vit, data, 16, plan.probe, seed=0)
    assert result == lowlabel.linear_probe(vit, data, 16, plan.probe, seed=0)
    assert 0 <= result["test_acc"] <= 1 and 0 <= result["train_acc"] <= 1
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_reconstruct_undoes_the_normalised_target(data, monkeypatch):
    plan = tiny_plan()
    mae = lowlabel.build_mae(plan.vit, plan.pretrain, 4)
    images = data.test_x[:3]
    prediction, hidden = lowlabel.reconstruct(mae, images, 0.75, seed=0)
    assert prediction.shape == images.shape and hidden.shape == (3, 1, 8, 8)
    assert torch.all(hidden.sum((1, 2, 3)) == 3 * 16)  # 4 patches of 4 x 4 pixels, int(4 * 0.25) = 1 kept
    perfect = lambda m, x, r, s: (m.target(x), torch.ones(x.shape[0], 4))  # noqa: E731
    monkeypatch.setattr(lowlabel, "_predict", perfect)
    assert_close(lowlabel.reconstruct(mae, images, 0.75)[0], images, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- jobs and the cache


def test_run_stores_every_stage_and_reruns_only_what_a_change_touches(data, tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path))
    plan = tiny_plan()
    results = lowlabel.run(data, plan, folder="t", workers=1)
    assert list(results) == list(lowlabel.STAGES)
    assert all(len(results[s]) == 2 for s in lowlabel.STAGES)
    assert all(Path(r["weights"]).is_file() for s in ("cnn", "mae") for r in results[s])
    assert 0 <= results["cnn"][0]["train_agreement"] <= 1 and 0 <= results["cnn"][0]["view_disagreement"] <= 1
    files = list((tmp_path / "t").glob("*.json"))
    assert len(files) == 2 * len(lowlabel.STAGES) and len(list((tmp_path / "t").glob("*.pt"))) == 4

    calls = []
    real = lowlabel.run_job
    monkeypatch.setattr(lowlabel, "run_job", lambda stage, seed, *a: calls.append(stage) or real(stage, seed, *a))
    assert lowlabel.run(data, plan, folder="t", workers=1) == results  # nothing trained twice
    assert calls == []
    lowlabel.run(data, tiny_plan(probe=lowlabel.Probe(steps=6)), folder="t", workers=1)
    assert sorted(calls) == ["probe", "probe", "probe_init", "probe_init"]
    calls.clear()
    lowlabel.run(data, tiny_plan(cnn={"kind": "cnn", "width": 3}), folder="t", workers=1)
    assert sorted(calls) == ["cnn", "cnn", "distilled", "distilled"]  # the student depends on its teacher


def test_worker_processes_give_the_same_results(data, tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path))
    plan = tiny_plan(seeds=(0,))
    one, two = (lowlabel.run(data, plan, folder=f"w{w}", workers=w) for w in (1, 2))
    for stage in lowlabel.STAGES:  # one thread or several: the same numbers up to the order of float sums
        for a, b in zip(one[stage], two[stage]):
            assert a.keys() == b.keys()
            for key in set(a) - {"weights"}:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (stage, key)


# --------------------------------------------------------------------------- verdicts into sentences


def _pair(verdict: str) -> tuple[stats.Estimate, stats.Estimate]:
    base = stats.Estimate(0.50, 0.01)
    other = {"higher": stats.Estimate(0.60, 0.01), "lower": stats.Estimate(0.40, 0.01),
             "noise": stats.Estimate(0.51, 0.01)}[verdict]
    assert stats.compare(other, base) == verdict
    return other, base


@pytest.mark.parametrize("comparison", lowlabel.COMPARISONS)
@pytest.mark.parametrize("verdict", ["higher", "lower", "noise"])
def test_every_sentence_says_what_compare_decided(comparison, verdict):
    a, b = _pair(verdict)
    text = lowlabel.sentence(comparison, a, b, name="the distilled ViT")
    assert "{" not in text and not text.endswith(".") and "\n" not in text
    if verdict == "noise":
        assert "+1.0 ± 1.4 points, within the noise floor of 2.8" in text and "cannot tell" in text
    else:
        assert "10.0 ± 1.4 points, beyond the noise floor of 2.8" in text and "cannot tell" not in text
        assert ("ahead of" if verdict == "higher" else "behind") in text
    if comparison == "probe":
        assert f"({100 * a.mean:.1f}%)" in text and "chance (50.0%)" in text
    if comparison == "cnn":
        assert text.startswith("the distilled ViT, the best ViT here,")


def test_a_difference_that_rounds_to_zero_is_not_negative():
    text = lowlabel.sentence("distilled", stats.Estimate(0.49999, 0.01), stats.Estimate(0.5, 0.01))
    assert "by +0.0 ± 1.4 points" in text


def test_sentence_refuses_an_unknown_comparison():
    with pytest.raises(ValueError, match="comparison must be one of distilled, finetuned, "):
        lowlabel.sentence("mixup", stats.Estimate(0.5, 0.01), stats.Estimate(0.5, 0.01))


def test_chance_is_the_best_input_blind_answer_and_best_vit_the_highest_mean():
    balanced = lowlabel.chance_estimate(torch.arange(40) % 4, 4)
    assert balanced.mean == 0.25 and balanced.se == pytest.approx(stats.accuracy_se(0.25, 40))
    assert lowlabel.chance_estimate(torch.tensor([0, 0, 0, 1]), 4).mean == 0.75
    est = {"scratch": stats.Estimate(0.5, 0.01), "distilled": stats.Estimate(0.52, 0.01),
           "finetuned": stats.Estimate(0.4, 0.01), "cnn": stats.Estimate(0.9, 0.01)}
    assert lowlabel.best_vit(est) == "distilled"


# --------------------------------------------------------------------------- the book page


def test_page_follows_chapter_9_with_a_chapters_structure():
    import test_book_structure as structure  # the checks every chapter page passes

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    (part,) = [p for p in toc["parts"] if p.get("caption") == "Chapters"]
    files = [c["file"] for c in part["chapters"]]
    assert files.index(PAGE) == files.index("book/ch09_small_data") + 1
    structure.test_chapter_has_objectives_summary_exercises_and_references(PAGE)


def _page():
    nb = nbformat.read(ROOT / f"{PAGE}.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return nb, code_cells, prose


def test_page_computes_its_conclusions():
    nb, code_cells, prose = _page()
    code = "\n".join(c.source for c in code_cells)
    for needed in ("lowlabel.run(", "lowlabel.sentence(", "stats.seed_estimate(", "stats.noise_floor(",
                   "stats.compare(", "lowlabel.reconstruct(", "lowlabel.chance_estimate(", "tqdm", "small_images("):
        assert needed in code, f"the page does not call {needed}"
    glued = set(re.findall(r'glue\(\s*"(\w+)"', code))
    (settings_cell,) = [c.source for c in code_cells if "settings = {" in c.source]
    glued |= set(re.findall(r'"(\w+)":', settings_cell.split("settings = {")[1]))
    assert 'glue(f"{name}_sentence"' in code and 'glue(f"{stage}_acc"' in code
    glued |= {f"{c}_sentence" for c in lowlabel.COMPARISONS} | {f"{s}_acc" for s in lowlabel.STAGES}
    used = set(re.findall(r"\{glue:text\}`(\w+)", prose))
    assert used and not used - glued, f"prose uses values no cell glues: {sorted(used - glued)}"
    for conclusion in [f"{c}_sentence" for c in lowlabel.COMPARISONS] + ["teacher_agree", "view_disagree", "plateau",
                                                                         "data_name", "crop_pad"]:
        assert conclusion in used, f"the page's prose does not show the computed {conclusion}"
    for cell in code_cells:
        if "glue(" in cell.source:
            assert "remove-input" in cell.metadata.get("tags", []), f"a glue cell shows its code: {cell.source[:60]}"
        assert "elif" not in cell.source and "def sentence" not in cell.source
        assert not cell.get("outputs") and cell.get("execution_count") is None  # stored without outputs
    for key in ("touvron2021training", "he2022masked", "dosovitskiy2021image"):
        assert key in prose and f"{{{key}," in (ROOT / "book/references.bib").read_text()


def test_the_prose_no_longer_says_augmentation_is_off():
    _, code_cells, prose = _page()
    flat = " ".join(prose.split())
    for stale in ("no augmentation", "repeat chapter 9's runs", "unaugmented;", "chapter 9's own images, models and recipe"):
        assert stale not in flat, stale
    assert "view_disagreement" in "\n".join(c.source for c in code_cells)


def test_every_number_in_the_prose_is_glued():
    _, _, prose = _page()
    text = re.sub(r"^(```.*|:\w+:.*|\(ch10-low-labels\)=)$", " ", prose, flags=re.M)  # fences, options, label
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]+\$", " ", text, flags=re.S)  # mathematics
    text = re.sub(r"\{(glue:text|cite|cite:t|doc)\}`[^`]*`", " ", text)  # glued values, citations, links
    text = re.sub(r"`[^`]*`", " ", text)  # code
    text = re.sub(r"chapter 9|CIFAR-10", " ", text, flags=re.I)  # a chapter's number and a data set's name are not results
    assert not re.findall(r".{30}\d.{10}", text), "a number in the prose is not glued"
