"""Small-data ViT options (vitcourse.small_data, LSA in vitcourse.attention) and the page that measures them.

Each option is checked against an independent computation; the defaults must leave the plain ViT
exactly as it was (keys, outputs, the timm exchange); checkpoints must round-trip a model that uses
them; timm and the JAX port must refuse them in one sentence.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange
from torch.testing import assert_close

from vitcourse import VisionTransformer, ViTConfig, count_parameters
from vitcourse.attention import MultiHeadSelfAttention
from vitcourse.small_data import ConvStem, ShiftedPatchTokenization, conv_stem_widths
from vitcourse.timm_compat import check_timm_model, from_timm, timm_vit, to_timm
from vitcourse.vit import expected_num_parameters

ROOT = Path(__file__).resolve().parents[1]
PAGE = "book/ch09_small_data"
SMALL = dict(image_size=16, patch_size=4, dim=24, depth=2, heads=3, mlp_dim=48, num_classes=4)


def _perturb(module: torch.nn.Module) -> None:
    """Move every parameter away from its initial value, so zero biases and unit norms cannot hide an error."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


# --------------------------------------------------------------------------- shifted patch tokenization


def _shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``images`` moved down by ``dy`` and right by ``dx`` pixels (negative: up / left), zeros coming in."""
    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = images[..., max(-dy, 0):h - max(dy, 0),
                                                                            max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.mark.parametrize("patch, channels", [(4, 3), (2, 1), (8, 2)])
def test_spt_equals_shifts_patchify_layernorm_linear(patch, channels):
    spt = ShiftedPatchTokenization(image_size=16, patch_size=patch, in_channels=channels, dim=20)
    _perturb(spt)
    x = torch.randn(2, channels, 16, 16)
    s = patch // 2
    stacked = torch.cat([x] + [_shift(x, dy, dx) for dy, dx in ((s, s), (s, -s), (-s, s), (-s, -s))], dim=1)
    patches = rearrange(stacked, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
    normed = F.layer_norm(patches, patches.shape[-1:], spt.norm.weight, spt.norm.bias, spt.norm.eps)
    expected = F.linear(normed, spt.proj.weight, spt.proj.bias)
    assert expected.shape == (2, (16 // patch) ** 2, 20)
    assert_close(spt(x), expected)


def test_spt_without_norm_is_shifts_patchify_linear():
    spt = ShiftedPatchTokenization(image_size=16, patch_size=4, in_channels=3, dim=20, norm=False)
    _perturb(spt)
    assert isinstance(spt.norm, torch.nn.Identity)
    assert count_parameters(spt) == count_parameters(ShiftedPatchTokenization(16, 4, 3, 20)) - 2 * 5 * 4 * 4 * 3
    x = torch.randn(2, 3, 16, 16)
    stacked = torch.cat([x] + [_shift(x, dy, dx) for dy, dx in ((2, 2), (2, -2), (-2, 2), (-2, -2))], dim=1)
    patches = rearrange(stacked, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=4)
    assert_close(spt(x), F.linear(patches, spt.proj.weight, spt.proj.bias))


def test_spt_shift_moves_a_pixel_half_a_patch_diagonally():
    from vitcourse.small_data import diagonal_shifts

    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 4] = 1.0
    moved = [tuple(int(i) for i in m[0, 0].nonzero()[0]) for m in diagonal_shifts(x, 2)]
    assert moved == [(5, 6), (5, 2), (1, 6), (1, 2)]
    corner = torch.ones(1, 1, 8, 8)
    assert float(diagonal_shifts(corner, 2)[0].sum()) == 6 * 6  # two rows and two columns of zeros came in


# --------------------------------------------------------------------------- locality self-attention


@pytest.mark.parametrize("fused", [True, False])
def test_lsa_equals_sdpa_with_diagonal_mask_and_learned_scale(fused):
    dim, heads, n = 24, 3, 7
    attn = MultiHeadSelfAttention(dim, heads, lsa=True, fused=fused).eval()
    assert_close(attn.temperature.detach(), torch.tensor(math.sqrt(dim // heads)))
    _perturb(attn)
    with torch.no_grad():
        attn.temperature.fill_(1.7)  # not the default, so a fixed sqrt(d) scale would fail
    x = torch.randn(2, n, dim)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(2, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    allowed = ~torch.eye(n, dtype=torch.bool)  # True = may attend: everything but itself
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1 / 1.7)  # (B, h, N, d)
    expected = F.linear(out.transpose(1, 2).reshape(2, n, dim), attn.proj.weight, attn.proj.bias)
    assert_close(attn(x), expected)

    got, weights = attn(x, return_weights=True)
    assert_close(got, expected)
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    assert_close(weights.sum(-1), torch.ones(2, heads, n))


def test_lsa_combines_with_a_user_mask():
    attn = MultiHeadSelfAttention(8, 2, lsa=True).eval()
    x = torch.randn(1, 4, 8)
    mask = torch.tensor([True, True, False, True]).expand(4, 4)  # nobody attends to token 2
    _, weights = attn(x, mask=mask, return_weights=True)
    assert torch.all(weights[..., 2] == 0) and torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    assert_close(attn(x, mask=mask), attn(x, mask=mask, return_weights=True)[0])


@pytest.mark.parametrize("fused", [True, False])
def test_lsa_temperature_is_learned(fused):
    model = VisionTransformer(ViTConfig(**SMALL, lsa=True))
    for block in model.blocks:
        block.attn.fused = fused
    model(torch.randn(2, 3, 16, 16)).logsumexp(-1).sum().backward()
    grads = [block.attn.temperature.grad for block in model.blocks]
    assert all(g is not None and g.shape == () and float(g.abs()) > 0 for g in grads)
    assert count_parameters(model) == expected_num_parameters(model.config)


# --------------------------------------------------------------------------- convolutional stem


@pytest.mark.parametrize("image, patch, dim, widths", [(32, 4, 96, [24, 48]), (32, 8, 64, [8, 16, 32]),
                                                       (224, 16, 192, [12, 24, 48, 96]), (8, 2, 16, [8])])
def test_conv_stem_gives_the_patch_grid(image, patch, dim, widths):
    stem = ConvStem(image, patch, 3, dim)
    assert conv_stem_widths(patch, dim) == widths
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((3, 3), (2, 2), w) for w in widths]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem.convs) == len(widths)
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == dim
    assert stem(torch.randn(2, 3, image, image)).shape == (2, (image // patch) ** 2, dim)


def test_conv_stem_tokens_are_row_major_positions():
    stem = ConvStem(16, 4, 1, 8).eval()
    x = torch.randn(1, 1, 16, 16)
    grid = stem.proj(stem.convs(x))  # (1, 8, 4, 4)
    tokens = stem(x)
    assert_close(tokens[0, 4 * 2 + 3], grid[0, :, 2, 3])  # token of row 2, column 3


@pytest.mark.parametrize("options", [dict(stem="spt"), dict(stem="conv"), dict(stem="conv", lsa=True)])
def test_models_with_options_run_and_count_their_parameters(options):
    model = VisionTransformer(ViTConfig(**SMALL, **options))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert [m.shape for m in model.attention_maps(torch.randn(1, 3, 16, 16))] == [(1, 3, 17, 17)] * 2
    assert count_parameters(model) == expected_num_parameters(model.config)


# --------------------------------------------------------------------------- the defaults change nothing


def test_defaults_give_the_plain_vit_unchanged():
    cfg = ViTConfig(**SMALL)
    assert (cfg.stem, cfg.lsa) == ("patch", False)
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    x = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    # Logits of the same seed, config and input, computed with vitcourse before the small-data options existed.
    before = torch.tensor([[-0.15240639, -0.04039652, -0.05041531, -0.06867011],
                           [-0.12417731, 0.00445435, -0.18068489, 0.03245538]])
    with torch.no_grad():
        assert_close(model(x), before, atol=1e-6, rtol=1e-5)
    reference = timm_vit(cfg).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    _perturb(model)
    with torch.no_grad():
        assert_close(to_timm(model).eval()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stem="shifted"), "ViTConfig.stem must be one of 'patch', 'spt', 'conv', got 'shifted'."),
    (dict(stem="conv", image_size=36, patch_size=6), "patch_size must be a power of two"),
    (dict(lsa="yes"), "ViTConfig.lsa must be True or False, got 'yes'."),
    (dict(lsa=1), "ViTConfig.lsa must be True or False"),
])
def test_invalid_options_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        ViTConfig(**{**SMALL, **kwargs})
    text = str(err.value)
    assert "\n" not in text and text.endswith(".")


# --------------------------------------------------------------------------- checkpoints, timm, JAX


@pytest.mark.parametrize("options", [dict(stem="spt", lsa=True), dict(stem="conv")])
def test_checkpoints_round_trip_the_options(tmp_path, monkeypatch, options):
    from vitcourse.checkpoint import load_checkpoint
    from vitcourse.evaluate import evaluate_checkpoint, load_trained
    from vitcourse.train import TrainConfig, train

    monkeypatch.setenv("VITCOURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    cfg = TrainConfig(name="tiny-small-data", vit=ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, **options),
                      data="synthetic", subset=96, val_size=64, batch_size=32, epochs=1, seed=0)
    train(cfg, tmp_path / "run", progress=False)
    model, loaded_cfg, _ = load_trained(tmp_path / "run" / "last.safetensors")
    assert loaded_cfg == cfg and loaded_cfg.vit.stem == options["stem"]
    stored = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["model"]  # the run's own weights
    assert model.state_dict().keys() == stored.keys()
    for name, tensor in model.state_dict().items():
        assert_close(tensor, stored[name], rtol=0, atol=0, msg=f"{name} differs after the round trip")
    if options.get("lsa"):
        assert float(model.blocks[0].attn.temperature.detach()) != math.sqrt(16)  # trained, then stored and restored
    assert load_checkpoint(tmp_path / "run" / "best.safetensors")["config"]["vit"]["stem"] == options["stem"]
    assert 0.0 <= evaluate_checkpoint(tmp_path / "run" / "best.safetensors")["test_acc"] <= 1.0


@pytest.mark.parametrize("options, named", [(dict(stem="spt"), "stem='spt'"), (dict(stem="conv"), "stem='conv'"),
                                            (dict(lsa=True), "lsa=True")])
def test_timm_refuses_the_options_in_one_sentence(options, named):
    cfg = ViTConfig(**SMALL, **options)
    plain = ViTConfig(**SMALL)
    calls = [lambda: timm_vit(cfg), lambda: to_timm(VisionTransformer(cfg)),
             lambda: from_timm(timm_vit(plain), cfg), lambda: check_timm_model(timm_vit(plain), cfg)]
    for call in calls:
        with pytest.raises(ValueError, match=f"timm has no shifted patch tokenization.*{named}") as err:
            call()
        assert "\n" not in str(err.value)


def test_jax_port_refuses_the_options_in_one_sentence():
    jax = pytest.importorskip("jax")
    from vitcourse import jax_vit

    cfg = ViTConfig(**SMALL, stem="spt", lsa=True)
    plain_params = jax_vit.init_params(jax.random.key(0), ViTConfig(**SMALL))
    calls = [lambda: jax_vit.init_params(jax.random.key(0), cfg), lambda: jax_vit.from_torch(VisionTransformer(cfg)),
             lambda: jax_vit.to_torch(plain_params, cfg), lambda: jax_vit.apply(plain_params, torch.zeros(1, 3, 16, 16), cfg)]
    for call in calls:
        with pytest.raises(ValueError, match="vitcourse.jax_vit has no shifted patch .* stem='spt' and lsa=True"):
            call()


# --------------------------------------------------------------------------- the book page


def test_page_is_chapter_nine_with_a_chapters_structure():
    import test_book_structure as structure  # the checks every chapter page passes

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    (part,) = [p for p in toc["parts"] if p.get("caption") == "Chapters"]
    files = [c["file"] for c in part["chapters"]]
    assert files.index(PAGE) == 8 and files == sorted(files)  # chapter 9: chapters 1-8 keep their numbers
    assert not any(c.get("sections") for c in part["chapters"])  # no page numbered after a chapter's References
    structure.test_chapter_has_objectives_summary_exercises_and_references(PAGE)


def test_page_computes_its_conclusions():
    import nbformat

    nb = nbformat.read(ROOT / f"{PAGE}.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    code = "\n".join(c.source for c in code_cells)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for needed in ("run_experiments(", '"ch05-small"', "stats.trend(", "stats.compare(", "stats.seed_estimate(",
                   "trend_sentence(", "layernorm_sentence(", "plateau_sentence(", '"spt_norm": False', "tqdm"):
        assert needed in code, f"the page does not call {needed}"
    assert "SEEDS = [0, 1, 2]" in code  # at least three seeds for every point
    glued = set(re.findall(r'glue\(\s*"(\w+)"', code)) | set(re.findall(r'glue\(f"\{name\}_(\w+)"', code))
    used = set(re.findall(r"\{glue:text\}`(\w+)", prose))
    unglued = {u for u in used if u not in glued and not any(u == f"{n}_{s}" for n in ("vit", "cnn", "gap")
                                                             for s in ("small", "large"))}
    assert used and not unglued, f"prose uses values no cell glues: {sorted(unglued)}"
    for conclusion in ("curve_verdict", "curve_trend", "curve_gaps", "ablation_effects", "spt_norm_sentence", "plateau"):
        assert conclusion in used, f"the page's prose does not show the computed {conclusion}"
    for cell in code_cells:  # cells that only glue hide their input; no visible cell builds sentences
        if "glue(" in cell.source:
            assert "remove-input" in cell.metadata.get("tags", []), f"a glue cell shows its code: {cell.source[:60]}"
        assert "elif" not in cell.source, "sentences are picked in vitcourse.experiments, not by if/elif in the page"
    assert "dosovitskiy2021image" in prose and "xiao2021early" in prose and "lee2021vision" in prose
    assert "ImageNet-21k" in prose and "JFT-300M" in prose  # the scale the paper's claim is about


def test_the_pages_worked_parameter_counts_are_the_models():
    """The SPT exercise's solution works out the token sizes and parameter counts by hand; the models agree."""
    import dataclasses

    import nbformat

    from vitcourse.train import CONFIGS

    quick = CONFIGS["quick"].vit
    plain = count_parameters(VisionTransformer(quick).patch_embed)
    spt = count_parameters(VisionTransformer(dataclasses.replace(quick, stem="spt")).patch_embed)
    patch = quick.patch_size ** 2 * quick.in_channels
    assert (patch, 5 * patch, plain, spt, spt - plain) == (48, 240, 4_704, 23_616, 18_912)
    prose = "\n".join(c.source for c in nbformat.read(ROOT / f"{PAGE}.ipynb", as_version=4).cells
                      if c.cell_type == "markdown")
    for shown in (f"{plain:,}", f"{spt:,}", f"{spt - plain:,}"):  # as the page writes them
        assert shown.replace(",", "{,}") in prose or shown in prose, f"the solution no longer shows {shown}"
