import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch

from vitcourse import viz
from vitcourse.paths import runs_dir
from vitcourse.utils import sample_image, seed_everything


def test_sample_image_is_a_real_photo_offline():
    img = sample_image("chelsea", size=64)
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.05
    assert sample_image("astronaut", size=None).shape == (3, 512, 512)
    with pytest.raises(ValueError, match="choose one of"):
        sample_image("dog")


def test_seed_everything_makes_runs_repeatable():
    seed_everything(3)
    a = torch.randn(4)
    g = seed_everything(3)
    assert torch.equal(a, torch.randn(4))
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(3)))


def test_runs_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path))
    assert runs_dir() == tmp_path
    monkeypatch.delenv("VITCOURSE_RUNS")
    assert str(runs_dir()) == "runs"


def test_plots_draw_titled_labelled_axes():
    img = sample_image(size=32)
    ax = viz.plot_patch_grid(img, 8)
    assert "16 patches" in ax.get_title() and ax.get_xlabel()
    ax = viz.plot_attention(torch.softmax(torch.randn(4, 4), -1), labels=list("abcd"))
    assert ax.get_title() and ax.get_ylabel() == "query (attending)"
    assert len(ax.texts) == 16
    weights = torch.softmax(torch.randn(3, 5, 5), -1)
    fig = viz.plot_attention_heads(weights)
    assert fig._suptitle.get_text()
    images = [im for a in fig.axes for im in a.images]
    assert len(images) == 3 and {im.get_clim() for im in images} == {(0.0, float(weights.max()))}  # one scale
    assert any(a.get_ylabel() == "attention weight" for a in fig.axes)  # the colour bar says what it shows
    fig = viz.plot_patches(img, 8)
    assert len(fig.axes) == 16
    fig = viz.plot_position_similarity(torch.randn(1, 17, 8))
    assert sum(1 for a in fig.axes if a.images) == 16  # a 4x4 grid of similarity maps
    ax = viz.overlay_attention(img, torch.rand(4, 4))
    assert len(ax.images) == 2
    plt.close("all")


def test_position_similarity_diagonal_is_one():
    pos = torch.randn(1, 10, 6)
    fig = viz.plot_position_similarity(pos)
    tile = fig.axes[4].images[0].get_array()  # patch (1, 1) of the 3x3 grid
    assert abs(tile[1, 1] - 1.0) < 1e-6
    plt.close("all")


def _chapter_runs() -> list[tuple[str, object, str | None]]:
    """(chapter, config, name) of every run chapters 5-7 keep, built as the chapters build them."""
    import dataclasses

    from vitcourse.train import CONFIGS
    from vitcourse.ultimus import VARIANTS

    quick = CONFIGS["quick"]  # chapter 5's QUICK, chapter 7's quick and recipe
    runs = [("ch05", quick, None), ("ch05", quick.replace(name="quick-cnn", model="cnn"), None)]
    runs.append(("ch05", quick.replace(
        name="quick-seed-recipe", optimizer="adam", lr=3e-4, weight_decay=0.0, schedule="multistep",
        milestones=(80 / 150, 130 / 150), warmup_epochs=0, augment="resized", label_smoothing=0.0, grad_clip=None,
        vit=dataclasses.replace(quick.vit, dropout=0.2)), None))
    budget = dict(data="synthetic", subset=2048, val_size=1000, augment="none", epochs=4, batch_size=128,
                  num_workers=0)
    base = CONFIGS["ultimus"].replace(**budget)  # chapter 6
    for model in VARIANTS:
        for max_lr in (base.max_lr, 1e-3):
            runs.append(("ch06", base.replace(name=f"ch06-{model}-lr{max_lr:g}", model=model, max_lr=max_lr), None))
    runs += [("ch07", quick, f"jax-and-torch-{source}") for source in ("cifar10", "synthetic")]
    return runs


def test_run_dir_keeps_the_folders_the_chapters_used_before(monkeypatch, tmp_path):
    from vitcourse.config import run_dir
    from vitcourse.train import CONFIGS, fingerprint

    monkeypatch.setenv("VITCOURSE_RUNS", str(tmp_path))
    for chapter, cfg, name in _chapter_runs():
        before = tmp_path / chapter / f"{name or cfg.name}-{fingerprint(cfg)}"  # the chapters' own expression
        assert run_dir(cfg, chapter, name=name) == before
    quick = CONFIGS["quick"]
    assert run_dir(quick, "ch05").name.startswith("quick-")  # chapter 7 looks for chapter 5's run by this name
    assert run_dir(quick, "ch05") != run_dir(quick.replace(epochs=quick.epochs + 1), "ch05")  # a new config, a new run


@pytest.mark.parametrize("chapter,name", [("", None), ("../ch05", None), ("ch05/x", None), ("ch05", ""),
                                          ("ch05", "a/b"), ("ch05", "..")])
def test_run_dir_refuses_paths_that_are_not_one_folder(chapter, name):
    from vitcourse.config import run_dir
    from vitcourse.train import CONFIGS

    with pytest.raises(ValueError, match="one folder name"):
        run_dir(CONFIGS["quick"], chapter, name=name)


def test_run_dir_needs_a_train_config():
    from vitcourse.config import run_dir
    from vitcourse.vit import ViTConfig

    with pytest.raises(TypeError, match="needs a vitcourse.config.TrainConfig, got ViTConfig"):
        run_dir(ViTConfig(), "ch05")


def test_show_grid_draws_each_image_denormalised_with_its_title():
    from vitcourse.data import denormalize

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = torch.randn(5, 3, 8, 8)  # normalised images
    fig = viz.show_grid(images, [f"image {i}" for i in range(5)], "Five images", cols=3, mean=mean, std=std)
    assert fig._suptitle.get_text() == "Five images"
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(drawn) == 5  # 2 rows of 3, the last place left empty
    assert [ax.get_title() for ax in drawn] == [f"image {i}" for i in range(5)]
    expected = denormalize(images[4], mean, std).permute(1, 2, 0).numpy()
    assert torch.allclose(torch.from_numpy(drawn[4].images[0].get_array().data), torch.from_numpy(expected))
    grey = viz.show_grid([torch.rand(1, 4, 4)], ["grey"], "One grey image")  # already in [0, 1]: no mean, std
    assert grey.axes[0].images[0].get_array().shape == (4, 4)
    plt.close("all")


@pytest.mark.parametrize("kwargs,message", [
    (dict(titles=["a"]), "3 images but 1 titles"),
    (dict(cols=0), "cols >= 1"),
    (dict(mean=(0.5, 0.5, 0.5)), "both mean and std"),
])
def test_show_grid_refuses_inconsistent_arguments(kwargs, message):
    arguments = {**dict(images=torch.rand(3, 3, 4, 4), titles=["a", "b", "c"], suptitle="t"), **kwargs}
    with pytest.raises(ValueError, match=message):
        viz.show_grid(**arguments)
    with pytest.raises(ValueError, match="no images"):
        viz.show_grid([], [], "nothing")


def _texts(fig) -> str:
    """Every piece of text drawn in ``fig`` (titles, labels, box captions), joined by newlines."""
    parts = [fig._suptitle.get_text()] if fig._suptitle else []
    for ax in fig.axes:
        parts += [ax.get_title(), *(t.get_text() for t in ax.texts)]
    return "\n".join(parts)


def test_vit_architecture_draws_the_blocks_with_the_config_sizes():
    from matplotlib.patches import FancyBboxPatch

    from vitcourse.vit import ViTConfig

    cfg = ViTConfig(image_size=32, patch_size=8, dim=48, depth=5, heads=4, mlp_dim=96, num_classes=7)
    fig = viz.plot_vit_architecture(cfg, image=sample_image(size=32))
    assert isinstance(fig, plt.Figure) and fig._suptitle is not None and "16 patches" in fig._suptitle.get_text()
    text = _texts(fig)
    for box in ("Linear projection", "Transformer encoder", "MLP head", "Multi-head attention", "LayerNorm",
                "MLP, GELU", "residual", "[CLS]"):
        assert box in text, f"no {box!r} in the diagram"
    # the sizes of this config, not the defaults: patches, tokens, width, depth, heads, MLP, classes, P*P*C
    for size in ("16 patches of 8\u00d78", "17 tokens of width 48", "D = 48", "L = 5", "4 heads of 12",
                 "48 \u2192 96 \u2192 48", "7 classes", "192 \u2192 D = 48", "17 \u00d7 48"):
        assert size in text, f"the label {size!r} is missing"
    assert "192 \u2192 384" not in text and "L = 6" not in text  # nothing left from ViTConfig()'s defaults
    boxes = [p for ax in fig.axes for p in ax.patches if isinstance(p, FancyBboxPatch)]
    # 4 stages of the block, the projection, the encoder and the head, and a token with its position
    # embedding for the CLS token and each of the 7 patches shown
    assert len(boxes) >= 4 + 3 + 2 * (1 + 7)
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 1 + 7  # the image and the seven patches shown before and after the ellipsis
    plt.close(fig)


def test_vit_architecture_without_config_uses_symbols_and_refuses_wrong_images():
    fig = viz.plot_vit_architecture()
    text = _texts(fig)
    assert "N patches of P\u00d7P" in text and "L blocks" in text and "(N + 1) \u00d7 D" in text
    assert fig._suptitle.get_text() and [len(ax.images) for ax in fig.axes] == [1, 0]  # a grey placeholder
    plt.close(fig)
    from vitcourse.vit import ViTConfig

    with pytest.raises(ValueError, match="config expects 32x32"):
        viz.plot_vit_architecture(ViTConfig(), image=sample_image(size=64))
    with pytest.raises(ValueError, match=r"one \(C, H, W\) image"):
        viz.plot_vit_architecture(ViTConfig(), image=sample_image(size=32)[None])
