"""The helpers that chapter 5's text rests on, run from the chapter notebook's own cells.

Chapter 5 decides with small functions which sentences it prints: whether a head is local,
which settings two training recipes differ in, whether two accuracies differ by more than the
test set's sampling noise, how the augmentation reads in words, where a run was trained. These
tests execute the chapter's import cell and the cells that define those functions (definitions
only, no training of the chapter's runs) and check each function against an independent
computation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "book" / "ch05_training.ipynb"


def _code_cells() -> list[str]:
    return [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


@pytest.fixture(scope="module")
def chapter() -> dict:
    """The chapter's namespace after its import cell and its definition cells (found by what they define)."""
    cells = _code_cells()
    namespace: dict = {}
    exec(compile(cells[0], "ch05 import cell", "exec"), namespace)
    threads = torch.get_num_threads()
    for name in ("describe_augmentation", "train_here", "local_heads", "recipe_differences"):
        (cell,) = [c for c in cells if f"def {name}(" in c]
        exec(compile(cell, f"ch05 cell defining {name}", "exec"), namespace)
    torch.set_num_threads(threads)  # the import cell pins 2 threads for the page
    return namespace


def _chapter_cell(chapter: dict, marker: str) -> dict:
    """Run the chapter cell containing ``marker`` in a copy of the namespace; return that copy."""
    (cell,) = [c for c in _code_cells() if marker in c]
    namespace = dict(chapter)
    exec(compile(cell, f"ch05 cell with {marker!r}", "exec"), namespace)
    return namespace


# --------------------------------------------------------------------------- local heads


def _attention(side: int, rule) -> torch.Tensor:
    """One head's attention ``(1, 1, T, T)`` on a ``side x side`` grid plus CLS: query patch i attends to the
    patches j with ``rule(distance_ij)`` equally (CLS gets nothing)."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    grid = np.stack([rows.ravel(), cols.ravel()], 1)
    distance = np.linalg.norm(grid[:, None] - grid[None], axis=-1)  # (N, N) in patches
    chosen = rule(distance).astype(float)
    weights = np.zeros((side * side + 1,) * 2)
    weights[0, :] = 1.0 / len(weights)
    weights[1:, 1:] = chosen / chosen.sum(1, keepdims=True)
    return torch.tensor(weights, dtype=torch.float32)[None, None]


def test_uniform_distance_is_the_mean_distance_between_two_patches(chapter):
    for side, patch in ((8, 4), (4, 8), (14, 16)):
        centres = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2) * patch
        expected = np.linalg.norm(centres[:, None] - centres[None], axis=-1).mean()  # every pair, self included
        torch.testing.assert_close(chapter["uniform_attention_distance"](side, patch), float(expected), rtol=1e-5,
                                   atol=1e-4)


def test_a_head_is_local_only_when_it_attends_near_its_patch(chapter):
    mean_attention_distance = chapter["mean_attention_distance"]
    uniform = chapter["uniform_attention_distance"](8, 4)
    heads = {
        "itself": (lambda d: d == 0, True),
        "its four neighbours": (lambda d: d == 1, True),
        "everything within two patches": (lambda d: d <= 2, True),
        "every patch": (lambda d: d >= 0, False),
        "only patches at least five apart": (lambda d: d >= 5, False),
    }
    for name, (rule, is_local) in heads.items():
        distance = mean_attention_distance(_attention(8, rule), patch_size=4)  # (1,)
        assert bool(chapter["local_heads"](distance, uniform)[0]) is is_local, (name, float(distance), uniform)
    # the threshold is exactly LOCAL_FRACTION of the uniform distance
    fraction = chapter["LOCAL_FRACTION"]
    just = torch.tensor([fraction * uniform - 1e-3, fraction * uniform + 1e-3])
    assert chapter["local_heads"](just, uniform).tolist() == [True, False]
    with pytest.raises(ValueError, match="between 0 and 1"):
        chapter["local_heads"](just, uniform, fraction=1.5)


# --------------------------------------------------------------------------- recipe differences


def test_recipe_differences_lists_exactly_the_changed_settings(chapter):
    differences, quick = chapter["recipe_differences"], chapter["CONFIGS"]["quick"]
    table = differences(quick, quick.replace(lr=1e-4, name="other"))
    assert list(table.index) == ["lr"] and list(table.columns) == ["quick", "other"]
    assert table.loc["lr"].tolist() == [f"{quick.lr:g}", "0.0001"]
    assert differences(quick, quick).empty
    # only the model differs from the CNN of the chapter; its settings are summarised in one row
    cnn = differences(quick, quick.replace(name="quick-cnn", model="cnn"))
    assert list(cnn.index) == ["model"] and cnn.loc["model", "quick-cnn"].startswith("cnn: SmallCNN")
    # a schedule's own settings appear when one side uses them, as "not used" on the other
    multistep = differences(quick, quick.replace(schedule="multistep", name="ms"))
    assert set(multistep.index) == {"schedule", "milestones", "gamma"}
    assert multistep.loc["milestones", "quick"] == "not used" and multistep.loc["gamma", "ms"] == "0.1"


def test_the_chapters_seed_recipe_differs_from_quick_in_every_recipe_setting_the_table_shows(chapter):
    namespace = _chapter_cell({**chapter, "QUICK": chapter["CONFIGS"]["quick"]}, "SEED_RECIPE = ")
    quick, seed, blog = namespace["QUICK"], namespace["SEED_RECIPE"], namespace["SEED_BLOG"]
    # independently: compare field by field, the ViT's fields one by one
    plain = {f.name for f in dataclasses.fields(quick) if f.name not in ("name", "vit")
             and getattr(quick, f.name) != getattr(seed, f.name)}
    vit = {f"vit.{f.name}" for f in dataclasses.fields(quick.vit) if getattr(quick.vit, f.name) != getattr(seed.vit, f.name)}
    changed = plain | vit
    assert {"optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "augment", "label_smoothing", "grad_clip",
            "vit.dropout"} <= changed
    # the table shows every changed setting, plus the seed's multistep factor gamma, which quick's cosine
    # schedule does not use (equal values, but only one recipe applies it); so do its milestones
    table = namespace["recipe_diff"]
    assert set(table.index) == changed | {"gamma"}
    assert set(table.index[table["quick"] == "not used"]) == {"milestones", "gamma"}
    # the seed recipe keeps quick's model, data and budget, and takes the recipe from the seed-blog config
    for name in ("data", "subset", "epochs", "batch_size", "seed", "model"):
        assert getattr(seed, name) == getattr(quick, name), name
    assert (seed.vit.dim, seed.vit.depth, seed.vit.heads) == (quick.vit.dim, quick.vit.depth, quick.vit.heads)
    assert (seed.optimizer, seed.lr, seed.augment, seed.vit.dropout) == (blog.optimizer, blog.lr, blog.augment,
                                                                        blog.vit.dropout)


# --------------------------------------------------------------------------- augmentation in words


def test_augmentation_descriptions_follow_the_pipelines(chapter):
    describe, quick = chapter["describe_augmentation"], chapter["CONFIGS"]["quick"]
    assert describe(quick.replace(augment="none")) == "no augmentation (normalisation only)"
    basic = describe(quick.replace(augment="basic"))
    assert basic == "a random 32×32 crop after padding by 4 px, then a horizontal flip with probability 0.5"
    strong = describe(quick.replace(augment="strong"))
    assert strong.startswith(basic) and "RandAugment with 2 operations of magnitude 9" in strong
    assert strong.endswith("random erasing with probability 0.25")
    assert "random crop of 80%-100% of the area" in describe(quick.replace(augment="resized"))
    full = describe(chapter["CONFIGS"]["cifar10"])
    assert "mixup (Beta strength 0.8) or CutMix (Beta strength 1), one of the two per batch" in full
    assert describe(quick.replace(mixup=0.2)).endswith("on whole batches mixup (Beta strength 0.2)")


# --------------------------------------------------------------------------- accuracy verdicts


def test_accuracy_verdict_uses_the_standard_error_of_the_difference(chapter):
    verdict = chapter["accuracy_verdict"]
    n = 4000
    expected_se = math.sqrt(0.8 * 0.2 / n + 0.7 * 0.3 / n)
    result, se = verdict(0.8, 0.7, n)
    assert result == 1 and se == pytest.approx(expected_se)
    assert verdict(0.7, 0.8, n)[0] == -1
    assert verdict(0.80, 0.79, n)[0] == 0  # 1 point on 4,000 images: about 1.1 standard errors
    assert verdict(0.80, 0.78, n)[0] == 1  # 2 points: about 2.3 standard errors
    assert verdict(1.0, 1.0, 10) == (0, 0.0)
    with pytest.raises(ValueError, match="accuracies"):
        verdict(80.0, 70.0, n)


# --------------------------------------------------------------------------- where a run was trained


def test_hardware_sentences(chapter):
    sentence, word = chapter["hardware_sentence"], chapter["device_word"]
    assert "did not record" in sentence(None) and word(None) == ""
    gpu = {"cuda": True, "gpu": "Some GPU", "threads": 8, "cores": 8, "load_at_start": 0.1}
    assert sentence(gpu) == "on a GPU (Some GPU)" and word(gpu) == "GPU"
    cpu = {"cuda": False, "threads": 2, "cores": 2, "load_at_start": 3.5}
    assert "2 PyTorch threads" in sentence(cpu) and "overstate" in sentence(cpu) and word(cpu) == "CPU"
    assert "nearly idle" in sentence({**cpu, "load_at_start": 0.2})
    assert "load" not in sentence({**cpu, "load_at_start": None})


def test_train_here_notes_the_hardware_of_the_session_that_trained(chapter, tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("VITCOURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    tiny = chapter["CONFIGS"]["quick"].replace(name="tiny", data="synthetic", subset=128, val_size=64, batch_size=64,
                                                epochs=1, eval_batch_size=64)
    rows, hardware = chapter["train_here"](tiny)
    note = chapter["run_dir"](tiny, "ch05") / chapter["HARDWARE_NOTE"]
    assert len(rows) == 1 and rows[0]["epoch_time"] > 0
    assert hardware == json.loads(note.read_text())
    assert hardware["threads"] == torch.get_num_threads() and hardware["cuda"] == torch.cuda.is_available()
    assert hardware["epochs_trained"] == 1
    # a finished run is reused: same rows, the note of the session that trained it, left untouched
    stamp = note.stat().st_mtime_ns
    again, hardware_again = chapter["train_here"](tiny)
    assert again == rows and hardware_again == hardware and note.stat().st_mtime_ns == stamp
    # a run trained elsewhere (no note) reports that the hardware was not recorded
    note.unlink()
    assert chapter["train_here"](tiny)[1] is None
