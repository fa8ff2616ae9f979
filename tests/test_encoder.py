import pytest
import torch
from torch.testing import assert_close

from vitcourse.encoder import MLP, DropPath, EncoderBlock


def test_mlp_uses_exact_gelu():
    mlp = MLP(6, 10).eval()
    x = torch.randn(4, 3, 6)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    expected = (0.5 * h * (1 + torch.erf(h / 2**0.5))) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)


def test_block_is_pre_norm_with_residuals():
    block = EncoderBlock(16, 4, 40).eval()
    x = torch.randn(2, 5, 16)
    h = x + block.attn(torch.nn.functional.layer_norm(x, (16,), block.norm1.weight, block.norm1.bias, 1e-6))
    expected = h + block.mlp(torch.nn.functional.layer_norm(h, (16,), block.norm2.weight, block.norm2.bias, 1e-6))
    assert_close(block(x), expected)
    out, weights = block(x, return_weights=True)
    assert_close(out, expected)
    assert weights.shape == (2, 4, 5, 5)


def test_block_matches_timm_block():
    from timm.models.vision_transformer import Block

    ours = EncoderBlock(24, 3, 50).eval()
    ref = Block(24, 3, mlp_ratio=50.5 / 24, qkv_bias=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 7, 24)
    assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_drop_path_keeps_expectation_and_is_identity_in_eval():
    drop = DropPath(0.25)
    x = torch.ones(20000, 3)
    drop.train()
    y = drop(x)
    per_sample = y[:, 0]
    kept = per_sample[per_sample != 0]
    assert_close(kept, torch.full_like(kept, 1 / 0.75))
    assert abs(per_sample.mean().item() - 1.0) < 0.03
    assert (y == y[:, :1]).all()  # one coin per sample, not per feature
    drop.eval()
    assert_close(drop(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)
