"""Claims chapter 5's text makes about its own experiments, checked against the package it imports.

The chapter's helpers live in :mod:`vitcourse.recipes` and :mod:`vitcourse.analysis` (tested in
``test_recipes.py`` and ``test_analysis.py``); the tests here check what the page's prose says
about its configurations: which parameters weight decay applies to, and that its seeded
comparison changes only what the text says it changes.
"""

from __future__ import annotations

import dataclasses

from vitcourse import count_parameters
from vitcourse.recipes import RECIPE_SETTINGS, recipe_differences, small_comparison
from vitcourse.train import CONFIGS, build_model, build_optimizer

QUICK = CONFIGS["quick"]
SMALL = small_comparison(QUICK, CONFIGS["seed-blog"])


def test_weight_decay_applies_to_the_parameters_the_chapter_names():
    # The text: decay on every parameter with at least two dimensions (the weight matrices of the linear layers
    # and the patch-embedding kernel), none on biases, LayerNorm gains and shifts, the CLS token or the positions.
    for cfg in (QUICK, SMALL["vit"], CONFIGS["cifar10"]):
        model = build_model(cfg, 10)
        decayed = {id(p) for g in build_optimizer(cfg, model).param_groups if g["weight_decay"] > 0 for p in g["params"]}
        for name, p in model.named_parameters():
            exempt = p.ndim < 2 or name.endswith(("cls_token", "pos_embed"))
            assert (id(p) in decayed) is not exempt, name
            if "norm" in name or name.endswith("bias"):
                assert id(p) not in decayed, name  # the kinds the text lists by name
        assert any(name.endswith("patch_embed.proj.weight") and id(p) in decayed for name, p in model.named_parameters())


def test_the_vit_and_the_cnn_of_the_seeded_comparison_differ_only_in_the_model():
    vit, cnn = SMALL["vit"], SMALL["cnn"]
    assert list(recipe_differences(vit, cnn)) == ["model"]
    for name in ("data", "subset", "val_size", "epochs", "batch_size", "schedule", "warmup_epochs", "lr", "seed"):
        assert getattr(vit, name) == getattr(cnn, name), name
    # "about the same number of parameters": within 5% of each other
    n_vit, n_cnn = count_parameters(build_model(vit, 10)), count_parameters(build_model(cnn, 10))
    assert abs(n_vit - n_cnn) < 0.05 * n_vit, (n_vit, n_cnn)
    # smaller than the worked example, with the same patches and data
    assert (vit.vit.patch_size, vit.subset, vit.image_size) == (QUICK.vit.patch_size, QUICK.subset, QUICK.image_size)
    assert vit.epochs < QUICK.epochs and vit.vit.depth < QUICK.vit.depth and vit.vit.dim < QUICK.vit.dim
    # warmup takes the same share of training as in quick
    assert vit.warmup_epochs / vit.epochs == QUICK.warmup_epochs / QUICK.epochs


def test_the_recipe_comparison_changes_only_recipe_settings():
    vit, donor = SMALL["vit"], SMALL["vit-donor"]
    table = recipe_differences(vit, donor)
    assert set(table) <= set(RECIPE_SETTINGS) | {"vit.dropout", "vit.drop_path"}
    for name in ("data", "subset", "val_size", "epochs", "batch_size", "seed", "model"):
        assert getattr(vit, name) == getattr(donor, name), name
    assert dataclasses.replace(donor.vit, dropout=0.0, drop_path=0.0) == dataclasses.replace(vit.vit, dropout=0.0,
                                                                                               drop_path=0.0)
    assert len(table) >= 8  # "many settings at once": the page glues the exact number
