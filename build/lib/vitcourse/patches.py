"""From images to sequences of patches, and back.

A ViT reads an image as a sentence of ``(H / P) * (W / P)`` square patches.
:func:`image_to_patches` cuts with ``reshape``/``permute`` (the raw tensor
operations, spelled out once), :func:`patches_to_image` is its exact inverse,
and :class:`PatchEmbed` does "cut, flatten, linear layer" in one ``Conv2d``
whose kernel and stride are the patch size.

Flattened patches use the order ``(row in patch, column in patch, channel)``,
the same as ``einops.rearrange(x, 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["check_image_size", "image_to_patches", "patches_to_image", "PatchEmbed"]


def check_image_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Return the patch grid ``(H / P, W / P)``, or raise if ``P`` does not divide the image.

    Raises:
        ValueError: naming the sizes given and what is allowed.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}.")
    if height % patch_size or width % patch_size:
        allowed = _divisors(height, width)
        hint = f" (for example one of {allowed})" if allowed else " (these sides have no common divisor above 1)"
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch size {patch_size}; "
            f"use a patch size that divides both sides{hint} or resize the image."
        )
    return height // patch_size, width // patch_size


def _divisors(height: int, width: int) -> list[int]:
    """Common divisors of ``height`` and ``width`` greater than one."""
    return [p for p in range(2, min(height, width) + 1) if height % p == 0 and width % p == 0]


def image_to_patches(images: Tensor, patch_size: int) -> Tensor:
    """Cut a batch of images into flattened, non-overlapping patches.

    Args:
        images: ``(B, C, H, W)``.
        patch_size: side ``P`` of the square patches; must divide ``H`` and ``W``.

    Returns:
        ``(B, N, P * P * C)`` with ``N = (H / P) * (W / P)``, patches in
        row-major order over the image.
    """
    if images.ndim != 4:
        raise ValueError(
            f"expected a batch of images of shape (B, C, H, W), got shape {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0) for a single image."
        )
    b, c, h, w = images.shape
    gh, gw = check_image_size(h, w, patch_size)
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)  # (B, C, gh, P, gw, P)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, P, P, C)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)  # (B, N, P*P*C)


def patches_to_image(
    patches: Tensor, patch_size: int, image_size: int | tuple[int, int], channels: int
) -> Tensor:
    """Inverse of :func:`image_to_patches`.

    Args:
        patches: ``(B, N, P * P * C)``.
        patch_size: ``P``.
        image_size: ``H`` (square) or ``(H, W)``.
        channels: ``C``.

    Returns:
        ``(B, C, H, W)``, equal to the images the patches were cut from.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    gh, gw = check_image_size(h, w, patch_size)
    b, n, f = patches.shape
    if n != gh * gw or f != patch_size * patch_size * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {channels}x{h}x{w} image "
            f"cut into {patch_size}x{patch_size} patches; expected (B, {gh * gw}, "
            f"{patch_size * patch_size * channels})."
        )
    x = patches.reshape(b, gh, gw, patch_size, patch_size, channels)  # (B, gh, gw, P, P, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, P, gw, P)
    return x.reshape(b, channels, h, w)


class PatchEmbed(nn.Module):
    """Cut an image into patches and project each to ``dim`` features, with one ``Conv2d``.

    A convolution with kernel size = stride = ``P`` sees each patch exactly
    once, and its weight ``(dim, C, P, P)`` is a linear layer on the flattened
    patch. Names match ``timm``'s ``PatchEmbed`` (``proj``).

    Args:
        image_size: ``H = W`` of the input images.
        patch_size: ``P``; must divide ``image_size``.
        in_channels: ``C``.
        dim: embedding size ``D``.

    Shapes:
        ``(B, C, H, W)`` -> ``(B, N, D)`` with ``N = (H / P) ** 2``.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        gh, gw = check_image_size(image_size, image_size, patch_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = (gh, gw)
        self.num_patches = gh * gw
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """Embed ``images`` (B, C, H, W) as a sequence (B, N, D)."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}), got {tuple(images.shape)}; the model was built for "
                f"{self.in_channels} channel(s)."
            )
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got "
                f"{images.shape[-2]}x{images.shape[-1]}; resize the images or build the model "
                "with a matching image_size."
            )
        x = self.proj(images)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
