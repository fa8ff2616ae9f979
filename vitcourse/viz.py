"""Plots the chapters share: attention heatmaps, patch grids, positional-embedding similarity.

Every function draws on a Matplotlib ``Axes`` (or makes a figure) and returns it,
with a title and labelled axes, so a notebook cell can add to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .patches import check_image_size, image_to_patches

__all__ = [
    "to_numpy_image",
    "plot_attention",
    "plot_attention_heads",
    "plot_patch_grid",
    "plot_patches",
    "plot_position_similarity",
    "overlay_attention",
    "show_grid",
]


def to_numpy_image(image: Tensor) -> np.ndarray:
    """``(C, H, W)`` tensor in ``[0, 1]`` -> ``(H, W, C)`` NumPy array for ``imshow`` (grey stays 2-D)."""
    array = image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def plot_attention(
    weights: Tensor,
    ax: plt.Axes | None = None,
    labels: list[str] | None = None,
    title: str = "Attention weights",
    annotate: bool | None = None,
) -> plt.Axes:
    """Heatmap of one attention matrix.

    Args:
        weights: ``(n_q, n_k)``; row ``i`` is what query ``i`` attends to.
        labels: optional token names for both axes.
        annotate: write the values in the cells (default: only for matrices up to 10x10).
    """
    ax = ax or plt.subplots(figsize=(4, 3.5))[1]
    w = weights.detach().cpu().float().numpy()
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-8))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="weight")
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
    if annotate if annotate is not None else max(w.shape) <= 10:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if w[i, j] < 0.6 * w.max() else "black")
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title)
    return ax


def plot_attention_heads(weights: Tensor, title: str = "Attention per head", cols: int = 4,
                         shared_scale: bool = True) -> plt.Figure:
    """One heatmap per head for a ``(heads, n_q, n_k)`` tensor, with a colour bar; returns the figure.

    With ``shared_scale`` every head uses one colour range, from 0 to the largest
    weight of any head, so a nearly uniform head looks uniform instead of being
    stretched to the full colour range.
    """
    heads = weights.shape[0]
    cols = min(cols, heads)
    rows = math.ceil(heads / cols)
    maps = weights.detach().cpu().float().numpy()
    vmax = float(maps.max()) if shared_scale else None
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.0 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h < heads:
            im = ax.imshow(maps[h], cmap="viridis", vmin=0.0 if shared_scale else None, vmax=vmax)
            ax.set_title(f"head {h}")
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            if not shared_scale:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="weight")
        else:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    if shared_scale:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="attention weight")
    return fig


def plot_patch_grid(image: Tensor, patch_size: int, ax: plt.Axes | None = None,
                    title: str | None = None, number: bool = True) -> plt.Axes:
    """The image with the patch boundaries drawn on it and each patch numbered in reading order.

    Args:
        image: ``(C, H, W)`` in ``[0, 1]``.
        patch_size: ``P``; must divide ``H`` and ``W``.
    """
    _, h, w = image.shape
    gh, gw = check_image_size(h, w, patch_size)
    ax = ax or plt.subplots(figsize=(4.5, 4.5))[1]
    ax.imshow(to_numpy_image(image), cmap="gray")
    for k in range(1, gw):
        ax.axvline(k * patch_size - 0.5, color="white", lw=1)
    for k in range(1, gh):
        ax.axhline(k * patch_size - 0.5, color="white", lw=1)
    if number and gh * gw <= 64:
        for i in range(gh):
            for j in range(gw):
                ax.text(j * patch_size + 2, i * patch_size + 2, str(i * gw + j), color="yellow",
                        fontsize=7, va="top", ha="left")
    ax.set_title(title or f"{gh} x {gw} = {gh * gw} patches of {patch_size} x {patch_size} px")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    return ax


def plot_patches(image: Tensor, patch_size: int, title: str | None = None) -> plt.Figure:
    """Each patch of ``image`` (C, H, W) as its own small picture, in sequence order."""
    c, h, w = image.shape
    gh, gw = check_image_size(h, w, patch_size)
    patches = image_to_patches(image[None], patch_size)[0]  # (N, P*P*C)
    patches = patches.reshape(-1, patch_size, patch_size, c).permute(0, 3, 1, 2)  # (N, C, P, P)
    fig, axes = plt.subplots(gh, gw, figsize=(0.6 * gw + 1, 0.6 * gh + 1), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.imshow(to_numpy_image(patches[k]), cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"The image as a sequence of {gh * gw} patches (reading order)")
    return fig


def plot_position_similarity(pos_embed: Tensor, title: str = "Positional embedding similarity") -> plt.Figure:
    """Cosine similarity of each patch's position embedding with all others (ViT paper, Figure 7).

    Args:
        pos_embed: ``(1, N + 1, D)`` or ``(N + 1, D)`` with the CLS position first, or ``(N, D)``
            without it when ``N`` is a perfect square.

    Returns:
        A figure with a ``g x g`` grid of small ``g x g`` maps: tile ``(i, j)`` shows how
        similar the embedding of patch ``(i, j)`` is to that of every other patch.
    """
    p = pos_embed.detach().cpu().float().reshape(-1, pos_embed.shape[-1])
    if math.isqrt(p.shape[0]) ** 2 != p.shape[0]:
        p = p[1:]  # drop the CLS position
    side = math.isqrt(p.shape[0])
    if side * side != p.shape[0]:
        raise ValueError(f"{p.shape[0]} positions do not form a square grid of patches.")
    unit = torch.nn.functional.normalize(p, dim=-1)
    sim = (unit @ unit.T).reshape(side, side, side, side).numpy()  # (gi, gj, gi', gj')
    fig, axes = plt.subplots(side, side, figsize=(min(1.0 * side, 9), min(1.0 * side, 9)))
    axes = np.atleast_2d(axes)
    for i in range(side):
        for j in range(side):
            ax = axes[i, j]
            im = ax.imshow(sim[i, j], vmin=-1, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(i + 1), rotation=0, labelpad=8)
            if i == side - 1:
                ax.set_xlabel(str(j + 1))
    fig.supxlabel("input patch column")
    fig.supylabel("input patch row")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="cosine similarity")
    fig.suptitle(title)
    return fig


def overlay_attention(image: Tensor, grid: Tensor, ax: plt.Axes | None = None,
                      title: str = "Attention over the image", alpha: float = 0.6) -> plt.Axes:
    """Draw a patch-level map ``grid`` (g, g) over ``image`` (C, H, W), upsampled to the image size."""
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    _, h, w = image.shape
    heat = torch.nn.functional.interpolate(grid[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    ax.imshow(to_numpy_image(image), cmap="gray")
    ax.imshow(heat.cpu().numpy(), cmap="inferno", alpha=alpha)
    ax.set_title(title)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    return ax


def show_grid(images: Sequence[Tensor] | Tensor, titles: Sequence[str], suptitle: str, cols: int = 10,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> plt.Figure:
    """Draw ``B`` images in rows of ``cols``, each with its own title, under one figure title.

    Args:
        images: ``B`` images of shape ``(C, H, W)``, as a list or a ``(B, C, H, W)`` tensor.
        titles: one title per image (a label, a prediction, ...).
        suptitle: the figure's title, saying what the images are.
        cols: images per row.
        mean, std: the per-channel statistics the images were normalised with (a dataset's
            ``mean`` and ``std``), to show them in their true colours; leave both out for
            images already in ``[0, 1]``.

    Returns:
        The figure; the image axes carry no ticks, since pixel coordinates say nothing here.

    Raises:
        ValueError: if there are no images, the titles do not match them one to one,
            ``cols`` is not positive, or only one of ``mean`` and ``std`` is given.
    """
    if len(images) == 0:
        raise ValueError("show_grid got no images; pass at least one (C, H, W) image.")
    if len(titles) != len(images):
        raise ValueError(f"show_grid got {len(images)} images but {len(titles)} titles; pass one title per image.")
    if cols < 1:
        raise ValueError(f"show_grid needs cols >= 1 images per row, got {cols}.")
    if (mean is None) != (std is None):
        raise ValueError("show_grid needs both mean and std to undo a normalisation, or neither.")
    if mean is not None:
        from .data import denormalize  # imported here: vitcourse.data pulls in torchvision

        images = [denormalize(image, mean, std) for image in images]
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(to_numpy_image(image), cmap="gray")
        ax.set_title(title, fontsize=7)
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
