"""The timm exchange refuses every timm ViT setting vitcourse does not compute, and is exact otherwise."""

from functools import partial

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vitcourse import VisionTransformer, ViTConfig
from vitcourse.timm_compat import check_timm_model, from_timm, timm_vit, to_timm

timm_vt = pytest.importorskip("timm.models.vision_transformer")
from timm.layers import GluMlp  # noqa: E402

CONFIG = ViTConfig(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64)
"""The tiny architecture every timm model below is built around."""


def tiny_timm(**settings) -> nn.Module:
    """A timm ViT of ``CONFIG``'s size, with ``settings`` passed to timm's constructor."""
    size = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    return timm_vt.VisionTransformer(**{**size, **settings})


def perturbed(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter moved off its initial value (zero biases hide nothing)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def without_patch_bias() -> nn.Module:
    """timm's constructor only drops the patch bias together with pre_norm, so remove it by hand."""
    model = tiny_timm()
    model.patch_embed.proj.register_parameter("bias", None)
    return model


def with_final_norm_eps(eps: float) -> nn.Module:
    """Only the final norm differs: the blocks' norms stay at eps 1e-6."""
    model = tiny_timm()
    model.norm.eps = eps
    return model


MISMATCHES = {
    # kind: (the timm model, a piece of the message naming the setting)
    "activation QuickGELU": (lambda: tiny_timm(act_layer="quick_gelu"), "activation QuickGELU"),
    "activation ReLU": (lambda: tiny_timm(act_layer=nn.ReLU), "activation ReLU"),
    "activation GELU tanh (timm)": (lambda: tiny_timm(act_layer="gelu_tanh"), "activation GELUTanh"),
    "activation GELU tanh (torch)": (lambda: tiny_timm(act_layer=partial(nn.GELU, approximate="tanh")),
                                     "GELU(approximate='tanh')"),
    "block norm eps 1e-5": (lambda: tiny_timm(norm_layer=partial(nn.LayerNorm, eps=1e-5)),
                            "LayerNorm eps=1e-05 in blocks.0.norm1"),
    "final norm eps 1e-5": (lambda: with_final_norm_eps(1e-5), "LayerNorm eps=1e-05 in norm;"),
    "norm layer RmsNorm": (lambda: tiny_timm(norm_layer="rmsnorm"), "RmsNorm as blocks.0.norm1"),
    "no final norm": (lambda: tiny_timm(final_norm=False), "final_norm=False"),
    "fc_norm": (lambda: tiny_timm(fc_norm=True), "fc_norm"),
    "average pooling": (lambda: tiny_timm(global_pool="avg"), "global_pool='avg'"),
    "attention pooling": (lambda: tiny_timm(global_pool="map"), "global_pool='map'"),
    "no class token": (lambda: tiny_timm(class_token=False, global_pool="avg"), "no class token"),
    "register tokens": (lambda: tiny_timm(reg_tokens=2), "2 register tokens"),
    "qk-norm": (lambda: tiny_timm(qk_norm=True), "qk_norm=True"),
    "attention output norm": (lambda: tiny_timm(scale_attn_norm=True), "scale_attn_norm=True"),
    "MLP norm": (lambda: tiny_timm(scale_mlp_norm=True), "scale_mlp_norm=True"),
    "layer scale": (lambda: tiny_timm(init_values=1e-5), "layer scale"),
    "no qkv bias": (lambda: tiny_timm(qkv_bias=False), "qkv_bias=False"),
    "no proj and MLP bias": (lambda: tiny_timm(proj_bias=False), "proj_bias=False"),
    "pre-norm": (lambda: tiny_timm(pre_norm=True), "pre_norm=True"),
    "no patch-embed bias": (without_patch_bias, "embeds patches without a bias"),
    "patch-embed norm": (lambda: tiny_timm(embed_norm_layer="layernorm"), "embed_norm_layer"),
    "positions for patches only": (lambda: tiny_timm(no_embed_class=True), "no_embed_class=True"),
    "no positions": (lambda: tiny_timm(pos_embed="none"), "pos_embed='none'"),
    "dynamic image size": (lambda: tiny_timm(dynamic_img_size=True), "dynamic_img_size=True"),
    "dynamic image padding": (lambda: tiny_timm(dynamic_img_pad=True), "dynamic_img_pad"),
    "head dropout": (lambda: tiny_timm(drop_rate=0.1), "before the head (drop_rate)"),
    "attention-weight dropout": (lambda: tiny_timm(attn_drop_rate=0.1), "attn_drop_rate"),
    "patch dropout": (lambda: tiny_timm(patch_drop_rate=0.1), "patch_drop_rate"),
    "post-norm block": (lambda: tiny_timm(block_fn=timm_vt.ResPostBlock), "ResPostBlock"),
    "gated MLP": (lambda: tiny_timm(mlp_layer=GluMlp), "GluMlp"),
    "no head": (lambda: tiny_timm(num_classes=0), "num_classes=0"),
    # settings the config gives and the weights do not show
    "more heads than the config": (lambda: tiny_timm(num_heads=4), "4 attention heads"),
    "dropout the config lacks": (lambda: tiny_timm(proj_drop_rate=0.1), "config.dropout is 0"),
    "drop path the config lacks": (lambda: tiny_timm(drop_path_rate=0.1), "drop-path rate in blocks.1 is 0.1"),
    # not a timm ViT at all, though its state_dict matches
    "vitcourse's own model": (lambda: VisionTransformer(CONFIG), "needs a timm.models.vision_transformer"),
}


@pytest.mark.parametrize("kind", MISMATCHES)
def test_from_timm_refuses_each_setting_it_does_not_reproduce(kind):
    build, named = MISMATCHES[kind]
    with pytest.raises(ValueError) as error:
        from_timm(build(), CONFIG)
    message = str(error.value)
    assert named in message
    assert "\n" not in message and message.endswith(".")  # one sentence
    with pytest.raises(ValueError) as again:
        check_timm_model(build(), CONFIG)
    assert str(again.value) == message  # the public check says the same


@pytest.mark.parametrize("settings", [dict(act_layer="quick_gelu"), dict(act_layer=nn.ReLU),
                                      dict(norm_layer=partial(nn.LayerNorm, eps=1e-5)), dict(num_heads=4)])
def test_the_refused_settings_load_strictly_but_change_the_logits(settings):
    # why names and shapes are not enough: these models fit load_state_dict(strict=True) and compute otherwise
    torch.manual_seed(0)
    theirs = perturbed(tiny_timm(**settings))
    ours = VisionTransformer(CONFIG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() > 1e-4


@pytest.mark.parametrize("settings", [
    dict(),  # timm's defaults
    dict(act_layer="gelu", norm_layer=partial(nn.LayerNorm, eps=1e-6)),  # the same, spelled out
    dict(act_layer=nn.GELU, norm_layer="layernorm", global_pool="token", class_token=True),
])
def test_accepted_timm_models_give_equal_logits(settings):
    torch.manual_seed(1)
    theirs = perturbed(tiny_timm(**settings))
    ours = from_timm(theirs, CONFIG)
    assert not ours.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_dropout_and_drop_path_sit_where_vitcourse_has_them():
    cfg = ViTConfig(image_size=32, patch_size=8, num_classes=5, dim=32, depth=3, heads=2, mlp_dim=64,
                    dropout=0.2, drop_path=0.3)
    ours = perturbed(VisionTransformer(cfg)).train()
    theirs = to_timm(ours)
    assert theirs.training and theirs.head_drop.p == 0 and theirs.pos_drop.p == 0.2
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    expected = theirs(x)
    torch.manual_seed(0)  # the same random masks, drawn in the same order
    assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    # a timm model built with the same rates directly is accepted for this config, and refused for another
    direct = tiny_timm(depth=3, pos_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.3)
    assert from_timm(direct, cfg).blocks[2].drop_path.p == pytest.approx(0.3)
    with pytest.raises(ValueError, match="drop_path_rate as drop_path"):
        from_timm(direct, ViTConfig(**{**cfg.to_dict(), "drop_path": 0.1}))
    with pytest.raises(ValueError, match="pass dropout=0.2 in the ViTConfig"):
        from_timm(direct, ViTConfig(**{**cfg.to_dict(), "dropout": 0.0}))


def test_timm_vit_builds_only_models_the_check_accepts():
    for cfg in [CONFIG, ViTConfig(image_size=21, patch_size=7, in_channels=1, num_classes=3, dim=30, depth=3,
                                  heads=5, mlp_dim=77, dropout=0.1, drop_path=0.2)]:
        check_timm_model(timm_vit(cfg), cfg)  # raises if this timm version built something else
