import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vitcourse.attention import MultiHeadSelfAttention, scaled_dot_product_attention, softmax


def test_softmax_matches_torch_and_survives_large_scores():
    x = torch.randn(4, 7, 9) * 5
    assert_close(softmax(x, dim=-1), torch.softmax(x, dim=-1))
    assert_close(softmax(x, dim=1), torch.softmax(x, dim=1))
    big = torch.tensor([[1000.0, 1001.0, 999.0]])
    out = softmax(big)
    assert torch.isfinite(out).all()
    assert_close(out, torch.softmax(big, dim=-1))


def test_scaled_dot_product_attention_matches_fused_kernel():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 4)
    out, weights = scaled_dot_product_attention(q, k, v, return_weights=True)
    assert out.shape == (2, 3, 5, 4) and weights.shape == (2, 3, 5, 6)
    assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert_close(weights.sum(-1), torch.ones(2, 3, 5))
    # the weights are the scaled, softmaxed scores, computed here independently
    assert_close(weights, torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(8), dim=-1))


def test_boolean_mask_matches_fused_kernel_and_blocks_masked_keys():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out, weights = scaled_dot_product_attention(q, k, v, mask=causal, return_weights=True)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=causal))
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert (weights[..., ~causal] == 0).all()


def test_attention_rejects_bad_inputs_with_clear_messages():
    with pytest.raises(ValueError, match="must be equal"):
        scaled_dot_product_attention(torch.randn(2, 4), torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="keys but"):
        scaled_dot_product_attention(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match="boolean"):
        scaled_dot_product_attention(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="not divisible by heads"):
        MultiHeadSelfAttention(10, 3)


@pytest.mark.parametrize("dim,heads", [(16, 4), (24, 3), (8, 1)])
def test_fused_and_explicit_paths_agree(dim, heads):
    attn = MultiHeadSelfAttention(dim, heads).eval()
    x = torch.randn(3, 7, dim)
    fused = attn(x)
    attn.fused = False
    explicit = attn(x)
    out, weights = attn(x, return_weights=True)
    assert_close(fused, explicit, atol=1e-6, rtol=1e-5)
    assert_close(out, explicit)
    assert weights.shape == (3, heads, 7, 7)


@pytest.mark.parametrize("dim,heads", [(16, 4), (12, 3)])
def test_matches_nn_multiheadattention_with_the_same_weights(dim, heads):
    ours = MultiHeadSelfAttention(dim, heads).eval()
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, 9, dim)
    expected, expected_weights = ref(x, x, x, need_weights=True, average_attn_weights=False)
    out, weights = ours(x, return_weights=True)
    assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_attention_dropout_only_in_training():
    attn = MultiHeadSelfAttention(16, 4, attn_dropout=0.5, fused=False)
    x = torch.randn(2, 5, 16)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    assert_close(attn(x), attn(x))


@pytest.mark.parametrize("values, words", [
    (torch.full((4,), float("nan")), "`nan` everywhere"),
    (torch.tensor([float("nan"), 1.0]), "a mix of `nan` and numbers"),
    (torch.zeros(3), "zeros everywhere"),
    (torch.tensor([0.0, 0.5]), "ordinary numbers"),
])
def test_describe_values_every_branch(values, words):
    from vitcourse.attention import describe_values
    assert describe_values(values) == words
