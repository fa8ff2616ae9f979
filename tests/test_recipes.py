"""vitcourse.recipes: training recipes in words, side by side, run, and repeated over seeds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vitcourse.config import run_dir
from vitcourse.evaluate import load_trained
from vitcourse.recipes import (
    HARDWARE_NOTE,
    RECIPE_SETTINGS,
    curve_facts,
    describe_augmentation,
    device_word,
    hardware_sentence,
    recipe_differences,
    seeded_test_accuracies,
    train_here,
    with_recipe,
)
from vitcourse.train import CONFIGS, build_data, evaluate_model

QUICK = CONFIGS["quick"]


# --------------------------------------------------------------------------- augmentation in words


def test_augmentation_descriptions_follow_the_pipelines():
    assert describe_augmentation(QUICK.replace(augment="none")) == "no augmentation (normalisation only)"
    basic = describe_augmentation(QUICK.replace(augment="basic"))
    assert basic == "a random 32×32 crop after padding by 4 px, then a horizontal flip with probability 0.5"
    strong = describe_augmentation(QUICK.replace(augment="strong"))
    assert strong.startswith(basic) and "RandAugment with 2 operations of magnitude 9" in strong
    assert strong.endswith("random erasing with probability 0.25")
    assert "random crop of 80%-100% of the area" in describe_augmentation(QUICK.replace(augment="resized"))
    full = describe_augmentation(CONFIGS["cifar10"])
    assert "mixup (Beta strength 0.8) or CutMix (Beta strength 1), one of the two per batch" in full
    assert describe_augmentation(QUICK.replace(mixup=0.2)).endswith("on whole batches mixup (Beta strength 0.2)")


# --------------------------------------------------------------------------- recipe differences


def test_recipe_differences_lists_exactly_the_changed_settings():
    table = recipe_differences(QUICK, QUICK.replace(lr=1e-4, name="other"))
    assert table == {"lr": (f"{QUICK.lr:g}", "0.0001")}
    assert recipe_differences(QUICK, QUICK) == {}
    # only the model differs from a CNN of the same recipe; its settings are summarised in one row
    cnn = recipe_differences(QUICK, QUICK.replace(name="quick-cnn", model="cnn"))
    assert list(cnn) == ["model"] and cnn["model"][1].startswith("cnn: SmallCNN of width 32")
    # a schedule's own settings appear when one side uses them, as "not used" on the other
    multistep = recipe_differences(QUICK, QUICK.replace(schedule="multistep", name="ms"))
    assert set(multistep) == {"schedule", "milestones", "gamma"}
    assert multistep["milestones"][0] == "not used" and multistep["gamma"][1] == "0.1"


def test_with_recipe_takes_every_recipe_setting_and_nothing_else():
    blog = CONFIGS["seed-blog"]
    mixed = with_recipe(QUICK, blog, "quick-seed-recipe")
    # independently: compare field by field, the ViT's fields one by one
    plain = {f.name for f in dataclasses.fields(QUICK) if f.name not in ("name", "vit")
             and getattr(QUICK, f.name) != getattr(mixed, f.name)}
    vit = {f"vit.{f.name}" for f in dataclasses.fields(QUICK.vit) if getattr(QUICK.vit, f.name) != getattr(mixed.vit, f.name)}
    changed = plain | vit
    assert plain <= set(RECIPE_SETTINGS) and vit <= {"vit.dropout", "vit.drop_path"}
    assert {"optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "augment", "label_smoothing", "grad_clip",
            "vit.dropout"} <= changed
    for name in RECIPE_SETTINGS:
        assert getattr(mixed, name) == getattr(blog, name), name
    assert (mixed.vit.dropout, mixed.vit.drop_path) == (blog.vit.dropout, blog.vit.drop_path)
    for name in ("data", "subset", "epochs", "batch_size", "seed", "model", "image_size", "val_size"):
        assert getattr(mixed, name) == getattr(QUICK, name), name
    assert dataclasses.replace(mixed.vit, dropout=0, drop_path=0) == dataclasses.replace(QUICK.vit, dropout=0, drop_path=0)
    # the table shows every changed setting, plus the multistep factor gamma and milestones, which quick's cosine
    # schedule does not use (so only one recipe applies them)
    table = recipe_differences(QUICK, mixed)
    assert set(table) == changed | {"gamma", "milestones"}
    assert {k for k, (a, _) in table.items() if a == "not used"} == {"milestones", "gamma"}


# --------------------------------------------------------------------------- where a run was trained


def test_hardware_sentences():
    assert "did not record" in hardware_sentence(None) and device_word(None) == ""
    gpu = {"cuda": True, "gpu": "Some GPU", "threads": 8, "cores": 8, "load_at_start": 0.1}
    assert hardware_sentence(gpu) == "on a GPU (Some GPU)" and device_word(gpu) == "GPU"
    cpu = {"cuda": False, "threads": 2, "cores": 2, "load_at_start": 3.5}
    assert "2 PyTorch threads" in hardware_sentence(cpu) and "overstate" in hardware_sentence(cpu)
    assert device_word(cpu) == "CPU"
    assert "nearly idle" in hardware_sentence({**cpu, "load_at_start": 0.2})
    assert "load" not in hardware_sentence({**cpu, "load_at_start": None})


@pytest.fixture()
def offline_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    return QUICK.replace(name="tiny", data="synthetic", subset=128, val_size=64, batch_size=64, epochs=1,
                         eval_batch_size=64, vit=dataclasses.replace(QUICK.vit, dim=32, depth=1, heads=2, mlp_dim=64))


def test_train_here_notes_the_hardware_of_the_session_that_trained(offline_runs):
    tiny = offline_runs
    rows, hardware = train_here(tiny)
    note = run_dir(tiny, "ch05") / HARDWARE_NOTE
    assert len(rows) == 1 and rows[0]["epoch_time"] > 0
    assert hardware == json.loads(note.read_text())
    assert hardware["threads"] == torch.get_num_threads() and hardware["cuda"] == torch.cuda.is_available()
    assert hardware["epochs_trained"] == 1
    # a finished run is reused: same rows, the note of the session that trained it, left untouched
    stamp = note.stat().st_mtime_ns
    again, hardware_again = train_here(tiny)
    assert again == rows and hardware_again == hardware and note.stat().st_mtime_ns == stamp
    # a run trained elsewhere (no note) reports that the hardware was not recorded
    note.unlink()
    assert train_here(tiny)[1] is None


def test_seeded_test_accuracies_trains_one_run_per_seed_and_scores_each_on_the_same_test_set(offline_runs):
    tiny = offline_runs
    test_set = build_data(tiny).test
    accs, histories = seeded_test_accuracies(tiny, [0, 1], test_set, chapter="seeds")
    assert len(accs) == len(histories) == 2
    for seed, acc in zip((0, 1), accs):
        folder = run_dir(tiny.replace(seed=seed), "seeds")
        model, cfg, _ = load_trained(folder / "best.safetensors")
        assert cfg.seed == seed
        assert acc == pytest.approx(evaluate_model(model, test_set)["acc"])  # independently re-scored
    assert run_dir(tiny.replace(seed=0), "seeds") != run_dir(tiny.replace(seed=1), "seeds")
    with pytest.raises(ValueError, match="at least one seed"):
        seeded_test_accuracies(tiny, [], test_set)


# --------------------------------------------------------------------------- learning curves


def _row(train_loss, val_loss, val_acc=0.5):
    return {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}


def test_curve_facts_cover_every_case():
    facts = curve_facts([_row(2.0, 2.1, 0.3), _row(1.5, 1.2, 0.6), _row(1.4, 1.1, 0.55)])
    assert facts == {"train_vs_val": "above", "fell": "both", "best_val_acc": 0.6}
    assert curve_facts([_row(2.0, 1.0), _row(1.0, 1.5)])["fell"] == "training"
    assert curve_facts([_row(1.0, 2.0), _row(1.5, 1.0)])["fell"] == "validation"
    assert curve_facts([_row(1.0, 1.0), _row(1.5, 1.5)])["fell"] == "neither"
    assert curve_facts([_row(1.0, 1.0)]) == {"train_vs_val": "below", "fell": "neither", "best_val_acc": 0.5}
    assert curve_facts([_row(1.0, 2.0), _row(0.9, 1.2)])["train_vs_val"] == "below"
    with pytest.raises(ValueError, match="at least one epoch"):
        curve_facts([])
