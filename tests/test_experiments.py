"""vitcourse.experiments: the multi-seed trainer, its cache, and the sentences chosen from verdicts.

Each piece is checked against an independent computation: the augmentation against a brute-force
search of crops, the pooling against block means, the schedule against its formula, training
against a task a CNN must solve, the cache by counting trainings, and every sentence branch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vitcourse import count_parameters, experiments
from vitcourse.experiments import (
    Recipe,
    TensorData,
    augment_batch,
    cache_key,
    compare_sentence,
    downsample,
    gap_sentence,
    layernorm_sentence,
    model_from_spec,
    plateau_sentence,
    run_experiments,
    train_seed,
    trend_sentence,
)
from vitcourse.stats import compare, seed_estimate, trend

VIT = {"kind": "vit", "image_size": 8, "patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}


def _colour_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes a CNN must learn quickly: the image's mean red value above or below zero, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, 8, 8, generator=g)
    x[:, 0] += torch.where(y == 1, 1.0, -1.0)[:, None, None]
    return x, y


def _data(n_train: int = 64) -> TensorData:
    tx, ty = _colour_task(n_train, 0)
    vx, vy = _colour_task(32, 1)
    sx, sy = _colour_task(100, 2)
    return TensorData(tx, ty, vx, vy, sx, sy)


# --------------------------------------------------------------------------- data helpers


def test_downsample_is_the_mean_of_each_block():
    x = torch.randn(2, 3, 8, 8)
    expected = x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    assert_close(downsample(x, 2), expected)
    assert downsample(x, 1) is x
    with pytest.raises(ValueError, match="divides the image size") as err:
        downsample(x, 3)
    assert "\n" not in str(err.value)


def test_augment_batch_is_a_padded_crop_and_maybe_a_flip_of_each_image():
    x = torch.randn(16, 2, 6, 6)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    flips = 0
    for image, result in zip(padded, out):
        windows = [image[:, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(result, w) for w in windows)
        flipped = any(torch.equal(result, w.flip(-1)) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < 16  # both outcomes occur
    assert torch.equal(augment_batch(x, torch.Generator(), pad=0, flip=False), x)


def test_tensor_data_digest_sees_every_byte():
    data = _data()
    changed = TensorData(data.train_x, data.train_y, data.val_x, data.val_y, data.test_x.clone(), data.test_y)
    assert data.digest() == changed.digest()
    changed.test_x[0, 0, 0, 0] += 1e-3
    assert data.digest() != changed.digest()


# --------------------------------------------------------------------------- models and recipe


def test_model_from_spec_builds_the_named_models():
    from vitcourse.cnn import SmallCNN
    from vitcourse.small_data import ShiftedPatchTokenization
    from vitcourse.vit import ViTConfig, expected_num_parameters

    cnn = model_from_spec({"kind": "cnn", "width": 8}, 5)
    assert isinstance(cnn, SmallCNN) and count_parameters(cnn) == count_parameters(SmallCNN(5, width=8))
    spt = model_from_spec({**VIT, "stem": "spt"}, 5)
    bare = model_from_spec({**VIT, "stem": "spt", "spt_norm": False}, 5)
    features = 5 * 4 * 4 * 3
    assert count_parameters(spt) == expected_num_parameters(ViTConfig(**{k: v for k, v in VIT.items() if k != "kind"},
                                                                     stem="spt", num_classes=5))
    assert count_parameters(spt) - count_parameters(bare) == 2 * features  # the LayerNorm's weight and bias
    assert isinstance(bare.patch_embed, ShiftedPatchTokenization) and isinstance(bare.patch_embed.norm, torch.nn.Identity)
    assert float(bare.patch_embed.proj.weight.std()) < 0.03  # re-initialised like every linear (std 0.02)
    assert bare(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    for spec, message in (({"kind": "mlp"}, "kind must be 'vit' or 'cnn'"), ({**VIT, "spt_norm": False}, "needs stem='spt'")):
        with pytest.raises(ValueError, match=message):
            model_from_spec(spec, 5)


def test_recipe_schedule_is_linear_warmup_then_cosine():
    recipe = Recipe(epochs=5, warmup_epochs=1, lr=0.01)
    rates = recipe.learning_rates(steps_per_epoch=4)
    assert len(rates) == 20
    expected = [0.01 * (s + 1) / 4 for s in range(4)]
    expected += [0.01 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(4, 20)]
    assert rates == pytest.approx(expected)
    assert Recipe(epochs=24, eval_points=6).eval_epochs() == [4, 8, 12, 16, 20, 24]
    assert Recipe(epochs=3, eval_points=8).eval_epochs() == [1, 2, 3]
    with pytest.raises(ValueError, match="a Recipe needs"):
        Recipe(epochs=0)


def test_train_seed_learns_a_solvable_task_and_is_reproducible():
    torch.set_num_threads(1)
    data = _data()
    recipe = Recipe(epochs=6, batch_size=16, lr=3e-3, warmup_epochs=1, eval_points=3)
    run = train_seed({"kind": "cnn", "width": 8}, data, 64, recipe, seed=0)
    assert run["test_acc"] >= 0.9  # chance is 0.5
    assert len(run["train_acc"]) == 6 and run["val_epochs"] == [2, 4, 6] and len(run["val_acc"]) == 3
    assert train_seed({"kind": "cnn", "width": 8}, data, 64, recipe, seed=0) == run
    other = train_seed({"kind": "cnn", "width": 8}, data, 64, recipe, seed=1)
    assert other["train_acc"] != run["train_acc"]
    with pytest.raises(ValueError, match="size must be between 1 and the 64 training images"):
        train_seed({"kind": "cnn", "width": 8}, data, 65, recipe, seed=0)


# --------------------------------------------------------------------------- cache


def test_cache_key_changes_with_every_setting():
    recipe = Recipe(epochs=3)
    base = cache_key(VIT, 100, recipe, [0, 1, 2], "abc")
    assert cache_key(dict(reversed(list(VIT.items()))), 100, recipe, [0, 1, 2], "abc") == base  # order-free
    variants = [
        cache_key({**VIT, "lsa": True}, 100, recipe, [0, 1, 2], "abc"),
        cache_key(VIT, 200, recipe, [0, 1, 2], "abc"),
        cache_key(VIT, 100, Recipe(epochs=4), [0, 1, 2], "abc"),
        cache_key(VIT, 100, Recipe(epochs=3, lr=1e-3), [0, 1, 2], "abc"),
        cache_key(VIT, 100, recipe, [0, 1], "abc"),
        cache_key(VIT, 100, recipe, [0, 1, 2], "abd"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_run_experiments_trains_once_then_reads_the_cache(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path))
    calls = []
    real = experiments.train_seed

    def counting(*args, **kwargs):
        calls.append(args[2:])
        return real(*args, **kwargs)

    monkeypatch.setattr(experiments, "train_seed", counting)
    data, recipe = _data(), Recipe(epochs=2, batch_size=16, eval_points=1)
    settings = {"cnn 32": ({"kind": "cnn", "width": 4}, 32), "cnn 64": ({"kind": "cnn", "width": 4}, 64)}
    first = run_experiments(settings, data, recipe, [0, 1], "exp", workers=1)
    assert list(first) == list(settings) and [len(r) for r in first.values()] == [2, 2]
    assert len(calls) == 4
    files = sorted((tmp_path / "exp").glob("*.json"))
    assert len(files) == 2 and all(json.loads(f.read_text())["runs"] for f in files)
    again = run_experiments(settings, data, recipe, [0, 1], "exp", workers=1)
    assert again == first and len(calls) == 4  # nothing trained twice
    run_experiments({"cnn 32": settings["cnn 32"]}, data, Recipe(epochs=3, batch_size=16, eval_points=1), [0, 1],
                    "exp", workers=1)
    assert len(calls) == 6  # a changed recipe trains afresh


def test_worker_processes_give_the_same_results(tmp_path, monkeypatch):
    torch.set_num_threads(1)  # the workers train with one thread each
    data, recipe = _data(), Recipe(epochs=2, batch_size=16, eval_points=1)
    settings = {"a": ({"kind": "cnn", "width": 4}, 48), "b": ({**VIT}, 48)}
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path / "one"))
    one = run_experiments(settings, data, recipe, [0, 1], "exp", workers=1)
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path / "two"))
    two = run_experiments(settings, data, recipe, [0, 1], "exp", workers=2)
    assert one == two


# --------------------------------------------------------------------------- sentences, one test per branch


def _est(values, n=1000):
    return seed_estimate(values, n)


def test_trend_sentence_every_branch_follows_stats_trend():
    sizes = [100, 200, 400, 800]
    closing = [_est([g, g + 0.002, g - 0.002], 10_000) for g in (-0.30, -0.20, -0.10, 0.0)]
    widening = [_est([g, g + 0.002, g - 0.002], 10_000) for g in (-0.10, -0.20, -0.30, -0.40)]
    flat = [_est([g, g + 0.05, g - 0.05], 500) for g in (-0.10, -0.11, -0.09, -0.10)]
    for gaps, verdict, words in ((closing, "agrees", "closes the gap"), (widening, "contradicts", "widens"),
                                 (flat, "inconclusive", "cannot tell")):
        t = trend(sizes, gaps, expected=+1)
        assert t.verdict == verdict
        text = trend_sentence(t.verdict, 100 * t.slope, 100 * t.se)
        assert words in text and f"{100 * t.slope:+.1f}" in text
    with pytest.raises(ValueError, match="verdict must be one of"):
        trend_sentence("maybe", 1.0, 1.0)


def test_compare_sentence_every_branch():
    low, high, near = _est([0.50, 0.51, 0.49]), _est([0.70, 0.71, 0.69]), _est([0.505, 0.5, 0.51])
    assert compare(high, low) == "higher" and compare(low, high) == "lower" and compare(near, low) == "noise"
    text = compare_sentence("SPT", "the baseline", high, low, "higher")
    assert text.startswith("SPT is ahead of the baseline by 20.0 ±") and "beyond the noise floor" in text
    assert compare_sentence("SPT", "the baseline", low, high, "lower").startswith("SPT is behind the baseline by 20.0")
    assert "within the noise floor" in compare_sentence("SPT", "the baseline", near, low, "noise")
    with pytest.raises(ValueError):
        compare_sentence("a", "b", low, high, "same")


def test_gap_sentence_every_branch():
    sizes = [125, 250, 500, 1000]
    assert gap_sentence(sizes, ["lower"] * 4) == "the CNN is ahead beyond noise at every size"
    assert gap_sentence(sizes, ["higher"] * 4) == "the ViT is ahead beyond noise at every size"
    assert gap_sentence(sizes, ["noise"] * 4) == "the two are within noise of each other at every size"
    mixed = gap_sentence(sizes, ["lower", "lower", "noise", "higher"])
    assert mixed == ("the ViT is ahead beyond noise at 1,000 images; the CNN is ahead beyond noise at 125 and 250 "
                     "images; the two are within noise of each other at 500 images")
    with pytest.raises(ValueError):
        gap_sentence(sizes, ["lower"])


def test_plateau_and_layernorm_sentences_every_branch():
    done = plateau_sentence([], 0.4, "CNN on 125 images")
    assert "no setting" in done and "+0.4 points, CNN on 125 images" in done
    rising = plateau_sentence(["ViT on 1,000 images", "ViT on 500 images"], 3.2, "ViT on 1,000 images")
    assert "ViT on 1,000 images and ViT on 500 images still rose" in rising and "longer training" in rising
    assert "costs SPT accuracy" in layernorm_sentence("higher")
    assert "helps SPT" in layernorm_sentence("lower")
    assert "no effect of the LayerNorm" in layernorm_sentence("noise")
    with pytest.raises(ValueError):
        layernorm_sentence("up")
