"""Reading a ViT's attention: CLS attention, attention rollout, mean attention distance.

These work on the list returned by :meth:`vitcourse.VisionTransformer.attention_maps`
(one ``(B, heads, T, T)`` tensor per block, ``T = N + 1`` with the CLS token first).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cls_attention", "attention_rollout", "mean_attention_distance"]


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid; expected a square image.")
    return side


def cls_attention(weights: Tensor) -> Tensor:
    """How much the CLS token attends to each patch, as an image-shaped grid.

    Args:
        weights: one block's attention, ``(B, heads, T, T)``.

    Returns:
        ``(B, heads, g, g)`` with ``g * g = T - 1``: row 0 of each head without
        the CLS column, laid out like the patches.
    """
    b, h, t, _ = weights.shape
    side = _grid_side(t - 1)
    return weights[:, :, 0, 1:].reshape(b, h, side, side)  # (B, heads, g, g)


def attention_rollout(maps: list[Tensor], residual_weight: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): attention propagated through all blocks.

    Each block's heads are averaged, the residual path is accounted for by
    mixing in the identity (``A' = (1 - r) A + r I``), rows are renormalised,
    and the per-block matrices are multiplied from the first block to the last.

    Args:
        maps: ``depth`` tensors of shape ``(B, heads, T, T)``.
        residual_weight: ``r``, the share given to the residual path.

    Returns:
        ``(B, T, T)``: row ``i`` says how much each input token flows into output token ``i``.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one block's attention weights.")
    rollout = None
    for weights in maps:
        a = weights.mean(dim=1)  # (B, T, T): average over heads
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = (1 - residual_weight) * a + residual_weight * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def mean_attention_distance(weights: Tensor, patch_size: int = 1) -> Tensor:
    """Mean distance, in pixels, between a query patch and the patches it attends to.

    The ViT paper's "attention distance" (its Figure 7, right): for every head,
    the attention-weighted average of the distance between patch centres,
    averaged over query patches and the batch. The CLS token is left out.

    Args:
        weights: one block's attention, ``(B, heads, T, T)``.
        patch_size: pixels per patch side (distances are in pixels).

    Returns:
        ``(heads,)`` mean distance per head.
    """
    b, h, t, _ = weights.shape
    side = _grid_side(t - 1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=-1).to(weights) * patch_size  # (N, 2)
    distance = torch.cdist(centres, centres)  # (N, N)
    patch_weights = weights[:, :, 1:, 1:]  # (B, heads, N, N)
    patch_weights = patch_weights / patch_weights.sum(dim=-1, keepdim=True)
    return (patch_weights * distance).sum(dim=-1).mean(dim=(0, 2))  # (heads,)
