"""Two tokenizers that help a ViT learn from small data.

A plain ViT cuts the image into non-overlapping patches and projects each one
on its own (:class:`vitcourse.patches.PatchEmbed`), so a token knows nothing
about its neighbours' pixels until attention mixes them. Both modules here
give each token a wider view of the image, and both map
``(B, C, H, W) -> (B, N, D)`` with the same token grid ``N = (H / P) ** 2``
as the patch embedding, so they drop into :class:`vitcourse.VisionTransformer`
in its place (``ViTConfig(stem="spt")`` / ``ViTConfig(stem="conv")``):

* :class:`ShiftedPatchTokenization` (Lee, Lee & Song 2021): the image and its
  four diagonal shifts by half a patch are stacked along the channels before
  patching, so every token also sees the pixels half a patch around it;
* :class:`ConvStem` (Xiao et al. 2021): a few stride-2 3x3 convolutions replace
  the single stride-``P`` "patchify" convolution.

The third small-data change of Lee et al., locality self-attention, lives in
:class:`vitcourse.attention.MultiHeadSelfAttention` (``lsa=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .encoder import LAYER_NORM_EPS
from .patches import check_image_size

__all__ = ["STEMS", "ShiftedPatchTokenization", "ConvStem", "diagonal_shifts", "conv_stem_widths"]

STEMS = ("patch", "spt", "conv")
"""The tokenizers a :class:`vitcourse.ViTConfig` can ask for (its ``stem`` field)."""


class _Tokenizer(nn.Module):
    """What every tokenizer knows about its grid: ``(B, C, H, W)`` images -> ``(H / P) x (W / P)`` tokens."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int) -> None:
        super().__init__()
        self.grid_size = check_image_size(image_size, image_size, patch_size)  # (H / P, W / P)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels

    def check(self, images: Tensor) -> None:
        """Raise one sentence unless ``images`` is ``(B, C, H, W)`` with this tokenizer's ``C, H, W``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(images.shape)}; resize the images or build the model with a matching "
                             f"image_size and in_channels.")


def diagonal_shifts(images: Tensor, shift: int) -> list[Tensor]:
    """The four diagonal shifts of ``images`` by ``shift`` pixels, zero-filled where pixels leave the frame.

    Args:
        images: ``(B, C, H, W)``.
        shift: pixels to move along each axis (half a patch in SPT).

    Returns:
        Four tensors ``(B, C, H, W)``: the content moved towards the bottom-right, bottom-left,
        top-right and top-left, in that order.
    """
    s = shift
    shifted = []
    for dy, dx in ((s, s), (s, -s), (-s, s), (-s, -s)):
        # F.pad takes (left, right, top, bottom); padding one side and cropping the other moves the content.
        padded = F.pad(images, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))  # (B, C, H + s, W + s)
        top, left = max(-dy, 0), max(-dx, 0)
        shifted.append(padded[..., top:top + images.shape[-2], left:left + images.shape[-1]])  # (B, C, H, W)
    return shifted


class ShiftedPatchTokenization(_Tokenizer):
    """Shifted Patch Tokenization (SPT): patches of the image and of its four half-patch diagonal shifts.

    The input and its four diagonal shifts by ``P // 2`` pixels (:func:`diagonal_shifts`) are
    concatenated along the channels, cut into ``P x P`` patches, flattened in the order
    ``(row in patch, column in patch, channel)``, layer-normalised and projected linearly to
    ``dim``. Each token thus sees a ``2P x 2P`` neighbourhood of its patch instead of the patch
    alone. Parameters: ``norm`` (LayerNorm over ``5 * C * P * P`` features) and ``proj``
    (``5 * C * P * P -> dim``).

    Args:
        image_size, patch_size, in_channels, dim: ``H = W``, ``P`` (dividing ``H``), ``C`` and
            ``D``, as for :class:`~vitcourse.patches.PatchEmbed`.
        norm: ``False`` drops the LayerNorm (``norm`` becomes the identity, no parameters), so an
            experiment can tell what the normalisation does from what the shifts do. ``ViTConfig``
            has no field for it: build the module directly and put it in a model's ``patch_embed``.

    Shapes:
        ``(B, C, H, W)`` -> ``(B, N, D)`` with ``N = (H / P) ** 2``.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, norm: bool = True) -> None:
        super().__init__(image_size, patch_size, in_channels)
        self.shift = patch_size // 2
        features = 5 * in_channels * patch_size * patch_size
        self.norm = nn.LayerNorm(features, eps=LAYER_NORM_EPS) if norm else nn.Identity()
        self.proj = nn.Linear(features, dim)

    def forward(self, images: Tensor) -> Tensor:
        """Tokens ``(B, N, D)`` for ``images`` ``(B, C, H, W)``."""
        self.check(images)
        x = torch.cat([images, *diagonal_shifts(images, self.shift)], dim=1)  # (B, 5C, H, W)
        p = self.patch_size
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)  # (B, N, P*P*5C)
        return self.proj(self.norm(x))  # (B, N, D); norm is the identity with norm=False


def conv_stem_widths(patch_size: int, dim: int) -> list[int]:
    """Output channels of the 3x3 stride-2 convolutions of :class:`ConvStem`.

    One convolution per halving, ``log2(patch_size)`` of them; the widths double from
    ``dim / 2**k`` up to ``dim / 2`` (at least 8 channels each), as in Xiao et al.'s stems,
    e.g. ``[24, 48]`` for patch 4 and width 96.

    Raises:
        ValueError: if ``patch_size`` is not a power of two of at least 2.
    """
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"the convolutional stem halves the image once per stride-2 convolution, so patch_size must "
                         f"be a power of two (2, 4, 8, 16, ...), got {patch_size}.")
    k = patch_size.bit_length() - 1
    return [max(8, dim >> (k - i)) for i in range(k)]


class ConvStem(_Tokenizer):
    """A convolutional stem (Xiao et al. 2021) in place of the patchify convolution.

    ``log2(P)`` blocks of a 3x3 stride-2 convolution (padding 1, no bias), BatchNorm and ReLU,
    then a 1x1 convolution (with bias) to ``dim`` channels. Each stride-2 convolution halves
    the image, so the output grid is the same ``(H / P) x (W / P)`` as patches of side ``P``
    would give, but every token is computed from overlapping receptive fields.

    Args:
        image_size: ``H = W`` of the input images.
        patch_size: ``P``; a power of two that divides ``image_size``.
        in_channels: ``C``.
        dim: embedding size ``D``.

    Shapes:
        ``(B, C, H, W)`` -> ``(B, N, D)`` with ``N = (H / P) ** 2``, e.g. ``(B, 3, 32, 32)`` ->
        ``(B, 64, D)`` for ``P = 4``.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__(image_size, patch_size, in_channels)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in conv_stem_widths(patch_size, dim):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]  # (B, c_in, S, S) -> (B, c_out, S/2, S/2)
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, dim, kernel_size=1)  # (B, c_last, H/P, W/P) -> (B, D, H/P, W/P)

    def forward(self, images: Tensor) -> Tensor:
        """Tokens ``(B, N, D)`` for ``images`` ``(B, C, H, W)``."""
        self.check(images)
        x = self.proj(self.convs(images))  # (B, D, H/P, W/P)
        return rearrange(x, "b d h w -> b (h w) d")  # (B, N, D), row-major like the patches

