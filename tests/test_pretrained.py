"""Chapter 8's pieces: loading a timm checkpoint file into vitcourse, resizing positions, fine-tuning helpers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vitcourse import VisionTransformer, ViTConfig
from vitcourse import pretrained
from vitcourse.pretrained import (adapt, config_from_timm, fit, freeze_all_but_head, load_timm,
                                  make_photo_folder, param_groups, resize_pos_embed)
from vitcourse.timm_compat import from_timm

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

NAME = "vit_tiny_patch16_224"
SMALL = ViTConfig(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def timm_tiny_file(tmp_path_factory):
    """A randomly initialised timm ViT-Ti/16 and its weights saved as a local safetensors file."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_local_checkpoint_file_loads_into_vitcourse_with_timms_logits(timm_tiny_file, monkeypatch):
    reference, path = timm_tiny_file
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")  # a local file needs no download, offline or not
    checkpoint = load_timm(NAME, file=path, fallback=False)
    assert checkpoint.pretrained and checkpoint.reason is None
    config = config_from_timm(checkpoint.model)
    assert config == ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3,
                               mlp_dim=768)
    ours = from_timm(checkpoint.model, config).eval()
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
        assert_close(checkpoint.model(images), expected, rtol=0, atol=0)  # the file held these weights
        assert_close(ours(images), expected, rtol=0, atol=1e-5)


def test_offline_falls_back_to_seeded_random_weights_and_says_why(monkeypatch):
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=5.0: pytest.fail("must not contact the hub"))
    first, second = load_timm(NAME, seed=3), load_timm(NAME, seed=3)
    assert not first.pretrained and "VITCOURSE_OFFLINE" in first.reason
    assert first.model.pretrained_cfg["input_size"] == (3, 224, 224)  # preprocessing is still known
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="VITCOURSE_OFFLINE"):
        load_timm(NAME, fallback=False)


def test_unreachable_hub_falls_back_without_trying_to_download(monkeypatch):
    monkeypatch.delenv("VITCOURSE_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=5.0: False)
    checkpoint = load_timm(NAME)
    assert not checkpoint.pretrained and "cannot be reached" in checkpoint.reason


def test_hub_probe_trusts_a_proxy_and_reports_a_failed_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(pretrained.socket, "create_connection", refuse)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert pretrained._hub_reachable(timeout=0.1) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert pretrained._hub_reachable(timeout=0.1) is True


def test_resize_pos_embed_is_identity_at_the_same_grid_and_keeps_cls():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_pos_embed(pos, 14, 14) is pos
    bigger = resize_pos_embed(pos, 14, (18, 20))
    assert bigger.shape == (1, 1 + 18 * 20, 8)
    assert torch.equal(bigger[:, 0], pos[:, 0])
    # a grid that is constant along the rows stays constant along the rows
    ramp = torch.arange(14.0).repeat_interleave(14).reshape(1, 196, 1)
    resized = resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), ramp], 1), 14, 7)[0, 1:, 0].reshape(7, 7)
    assert_close(resized, resized[:, :1].expand(7, 7))
    with pytest.raises(ValueError, match="not"):
        resize_pos_embed(pos, 13, 14)


@pytest.mark.parametrize("new", [7, 18, (12, 16)])
def test_resize_pos_embed_matches_timm(new):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 14 * 14, 16)
    size = [new, new] if isinstance(new, int) else list(new)
    assert_close(resize_pos_embed(pos, 14, new), resample_abs_pos_embed(pos, size, old_size=[14, 14]))


def test_adapt_changes_size_and_head_and_keeps_the_rest():
    model = VisionTransformer(SMALL).eval()
    new = adapt(model, image_size=48, num_classes=3)
    assert new.config.image_size == 48 and new.config.num_classes == 3 and new.config.dim == SMALL.dim
    assert new.pos_embed.shape == (1, 1 + 6 * 6, SMALL.dim)
    assert torch.equal(new.head.weight, torch.zeros(3, SMALL.dim)) and not new.training
    assert torch.equal(new.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    assert new(torch.rand(2, 3, 48, 48)).shape == (2, 3)
    same = adapt(model)  # nothing changed: the same logits
    images = torch.rand(2, 3, 32, 32)
    assert_close(same(images), model(images))


def test_linear_probe_and_param_groups():
    model = VisionTransformer(SMALL)
    assert param_groups(model, 1e-5, 1e-3)[0]["lr"] == 1e-5
    groups = param_groups(model, body_lr=1e-5, head_lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["body", "head"]
    assert [g["lr"] for g in groups] == [1e-5, 1e-3]
    assert [p.shape for p in groups[1]["params"]] == [(5, 32), (5,)]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert freeze_all_but_head(model) == ["head.weight", "head.bias"]
    frozen = param_groups(model, 1e-5, 1e-3)
    assert frozen[0]["params"] == [] and len(frozen[1]["params"]) == 2
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    optimizer = torch.optim.AdamW([g for g in frozen if g["params"]])
    data = (torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,)))
    history = fit(model, optimizer, data, data, steps=3, batch_size=4, eval_every=2)
    assert [h["step"] for h in history] == [2, 3]
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_photo_folder_is_an_image_folder_and_reproducible(tmp_path):
    from torchvision.datasets import ImageFolder

    a = make_photo_folder(tmp_path / "a", per_class=2, size=24, seed=1)
    b = make_photo_folder(tmp_path / "b", per_class=2, size=24, seed=1)
    dataset = ImageFolder(str(a))
    assert dataset.classes == sorted(pretrained.PHOTOS) and len(dataset) == 8
    assert dataset[0][0].size == (24, 24)
    assert (a / "rocket" / "001.png").read_bytes() == (b / "rocket" / "001.png").read_bytes()
