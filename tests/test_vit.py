import pytest
import torch
from torch.testing import assert_close

import vitcourse
from vitcourse import PRESETS, VisionTransformer, ViTConfig, count_parameters
from vitcourse.timm_compat import from_timm, timm_vit, to_timm
from vitcourse.vit import expected_num_parameters

CONFIGS = {
    "cifar-like": ViTConfig(image_size=32, patch_size=4, dim=32, depth=2, heads=4, mlp_dim=64),
    "grey-odd-sizes": ViTConfig(image_size=21, patch_size=7, in_channels=1, num_classes=3, dim=30, depth=3,
                                heads=5, mlp_dim=77),
    "non-multiple-mlp": ViTConfig(image_size=30, patch_size=5, in_channels=3, num_classes=7, dim=36, depth=2,
                                  heads=6, mlp_dim=100),
    "one-patch": ViTConfig(image_size=8, patch_size=8, in_channels=2, num_classes=2, dim=12, depth=1, heads=2,
                           mlp_dim=13),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_timm_in_both_directions(name):
    cfg = CONFIGS[name]
    ours = VisionTransformer(cfg).eval()
    with torch.no_grad():  # make every parameter non-trivial (biases and LayerNorms start at 0/1)
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    ref = to_timm(ours).eval()
    assert_close(ref(x), ours(x), atol=1e-5, rtol=1e-5)

    fresh_timm = timm_vit(cfg).eval()
    with torch.no_grad():  # the same for timm's own initialisation, so zero biases cannot hide a layout error
        for p in fresh_timm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    back = from_timm(fresh_timm, cfg).eval()
    assert_close(back(x), fresh_timm(x), atol=1e-5, rtol=1e-5)
    assert set(back.state_dict()) == set(fresh_timm.state_dict())


def test_state_dict_uses_timm_names():
    names = set(VisionTransformer(CONFIGS["cifar-like"]).state_dict())
    for expected in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.norm1.weight",
                     "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight", "blocks.0.norm2.bias",
                     "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "head.bias"]:
        assert expected in names


def test_from_timm_rejects_a_different_architecture():
    with pytest.raises(ValueError, match="shape"):
        from_timm(timm_vit(CONFIGS["cifar-like"]), ViTConfig(image_size=32, patch_size=4, dim=32, depth=2,
                                                            heads=4, mlp_dim=48))
    with pytest.raises(ValueError, match="does not have this architecture"):
        from_timm(timm_vit(CONFIGS["cifar-like"]), ViTConfig(image_size=32, patch_size=4, dim=32, depth=3,
                                                            heads=4, mlp_dim=64))


@pytest.mark.parametrize("name", list(CONFIGS) + list(PRESETS))
def test_parameter_count_matches_formula_and_timm(name):
    cfg = CONFIGS.get(name) or PRESETS[name]
    model = VisionTransformer(cfg)
    assert count_parameters(model) == expected_num_parameters(cfg)
    if name in CONFIGS or name == "seed-blog":
        assert count_parameters(model) == sum(p.numel() for p in timm_vit(cfg).parameters())


def test_known_sizes():
    # ViT-B/16 at 224 px with 1000 classes has 86,567,656 parameters (timm's vit_base_patch16_224).
    assert expected_num_parameters(PRESETS["vit-base"]) == 86_567_656
    assert expected_num_parameters(PRESETS["vit-tiny"]) == 5_717_416
    assert expected_num_parameters(PRESETS["vit-small"]) == 22_050_664


def test_forward_shapes_and_attention_maps():
    cfg = CONFIGS["cifar-like"]
    model = VisionTransformer(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 65, 32)
    maps = model.attention_maps(x)
    assert len(maps) == cfg.depth
    for m in maps:
        assert m.shape == (2, cfg.heads, cfg.seq_len, cfg.seq_len)
        assert_close(m.sum(-1), torch.ones(2, cfg.heads, cfg.seq_len))
    # the maps are those of the fused forward pass: recompute block 0 by hand
    tokens = model.embed(x)
    block = model.blocks[0]
    q, k, _ = block.attn.qkv(block.norm1(tokens)).reshape(2, 65, 3, 4, 8).permute(2, 0, 3, 1, 4)
    assert_close(maps[0], torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1))


def test_dropout_and_drop_path_are_active_only_in_training():
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32,
                                        dropout=0.3, drop_path=0.3))
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert_close(model(x), model(x))


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=32, patch_size=5), "not divisible by patch size 5"),
    (dict(dim=30, heads=4), "not divisible by heads=4"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(dropout=1.5), "dropout must be in"),
])
def test_config_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_package_exports():
    assert vitcourse.ViTConfig is ViTConfig
    assert vitcourse.VisionTransformer is VisionTransformer
    assert ViTConfig().to_dict()["dim"] == 192
    assert ViTConfig().seq_len == 65
