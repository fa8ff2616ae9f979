import pytest
import torch
from einops import rearrange
from torch.testing import assert_close

from vitcourse.patches import PatchEmbed, check_image_size, image_to_patches, patches_to_image


@pytest.mark.parametrize("c,h,w,p", [(3, 32, 32, 4), (1, 28, 28, 7), (3, 30, 45, 15), (2, 12, 8, 4)])
def test_patches_equal_einops_and_round_trip(c, h, w, p):
    images = torch.randn(2, c, h, w)
    patches = image_to_patches(images, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * c)
    assert_close(patches, rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p), rtol=0, atol=0)
    assert_close(patches_to_image(patches, p, (h, w), c), images, rtol=0, atol=0)


def test_first_patch_is_the_top_left_corner():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = image_to_patches(images, 4)
    corner = images[1, :, :4, :4].permute(1, 2, 0).reshape(-1)  # (p1 p2 c)
    assert_close(patches[1, 0], corner)
    second = images[1, :, :4, 4:8].permute(1, 2, 0).reshape(-1)
    assert_close(patches[1, 1], second)


@pytest.mark.parametrize("c,size,p,dim", [(3, 32, 4, 16), (1, 21, 7, 10)])
def test_patch_embed_is_a_linear_layer_on_flattened_patches(c, size, p, dim):
    embed = PatchEmbed(size, p, c, dim)
    images = torch.randn(3, c, size, size)
    # the conv kernel (D, C, P, P) read in (P, P, C) order is the weight of a linear layer on patches
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(dim, -1)
    expected = image_to_patches(images, p) @ weight.T + embed.proj.bias
    assert_close(embed(images), expected, atol=1e-5, rtol=1e-5)
    assert embed.num_patches == (size // p) ** 2


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"32x32 is not divisible by patch size 5"):
        image_to_patches(torch.randn(1, 3, 32, 32), 5)
    with pytest.raises(ValueError, match=r"not divisible by patch size 5"):
        PatchEmbed(32, 5, 3, 8)
    with pytest.raises(ValueError, match=r"built for 3 channel"):
        PatchEmbed(32, 4, 3, 8)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected 32x32 images, got 16x16"):
        PatchEmbed(32, 4, 3, 8)(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        image_to_patches(torch.randn(3, 32, 32), 4)
    with pytest.raises(ValueError, match="do not fit"):
        patches_to_image(torch.randn(1, 10, 48), 4, 32, 3)
    with pytest.raises(ValueError, match="positive"):
        check_image_size(8, 8, 0)
    assert check_image_size(30, 45, 15) == (2, 3)
