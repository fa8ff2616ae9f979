"""Plots the chapters share: attention heatmaps, patch grids, positional-embedding similarity.

Every function draws on a Matplotlib ``Axes`` (or makes a figure) and returns it,
with a title and labelled axes, so a notebook cell can add to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Circle, FancyBboxPatch
from torch import Tensor

from .patches import check_image_size, image_to_patches

if TYPE_CHECKING:
    from .vit import ViTConfig

__all__ = [
    "to_numpy_image",
    "plot_attention",
    "plot_attention_heads",
    "plot_patch_grid",
    "plot_patches",
    "plot_position_similarity",
    "overlay_attention",
    "show_grid",
    "plot_vit_architecture",
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


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, color: str, fontsize: float = 9) -> None:
    """A rounded box with its lower-left corner at ``(x, y)`` and ``text`` in its centre."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4,rounding_size=1.2", fc=color, ec="black", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "lw": 1.1, "color": "black"})


def plot_vit_architecture(cfg: ViTConfig | None = None, image: Tensor | None = None) -> plt.Figure:
    """The Vision Transformer as a diagram, after Figure 1 of the ViT paper.

    Left: image -> patches -> linear projection -> tokens (a CLS token and the patch tokens, each plus
    its position embedding) -> ``L`` encoder blocks -> the CLS token's output -> MLP head -> class.
    Right: one pre-norm encoder block (LayerNorm, multi-head attention, residual sum, LayerNorm,
    MLP, residual sum).

    Args:
        cfg: a :class:`vitcourse.vit.ViTConfig` whose sizes (patches, tokens, width ``D``, depth
            ``L``, heads, MLP width, classes) label the boxes; ``None`` labels them with symbols.
        image: ``(C, H, W)`` in ``[0, 1]``, drawn and cut into the patches of ``cfg`` (its side
            must be ``cfg.image_size``); ``None`` draws a grey placeholder.

    Returns:
        The figure, with a title; both panels are diagrams, so they have no data axes.

    Raises:
        ValueError: if ``image`` is not ``(C, H, W)``, does not match ``cfg``, or its side is not
            divisible into patches.
    """
    size = cfg.image_size if cfg is not None else (image.shape[-1] if image is not None else 32)
    patch = cfg.patch_size if cfg is not None else size // 4
    if image is not None:
        if image.ndim != 3:
            raise ValueError(f"plot_vit_architecture needs one (C, H, W) image, got shape {tuple(image.shape)}.")
        if cfg is not None and tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"the image is {image.shape[-2]}x{image.shape[-1]} but the config expects "
                             f"{size}x{size}; resize it or pass a config with image_size={image.shape[-1]}.")
        size = image.shape[-1]
        grid_h, grid_w = check_image_size(image.shape[-2], size, patch)
    else:
        grid_h, grid_w = check_image_size(size, size, patch)
    if cfg is None:  # symbols instead of sizes
        n, tokens, dim, depth, d_eq, l_eq = "N", "(N + 1)", "D", "L", "D", "L"
        heads, head_dim, mlp, classes, flat = "h heads", "D/h", "D \u2192 M \u2192 D", "K classes", "P\u00b7P\u00b7C"
        image_label = f"image {size}\u00d7{size}" if image is not None else "image"
        patch_label = f"{patch}\u00d7{patch}" if image is not None else "P\u00d7P"
    else:
        n, tokens, dim, depth = str(cfg.num_patches), str(cfg.seq_len), str(cfg.dim), str(cfg.depth)
        d_eq, l_eq = f"D = {cfg.dim}", f"L = {cfg.depth}"
        heads, head_dim, classes = f"{cfg.heads} heads", str(cfg.dim // cfg.heads), f"{cfg.num_classes} classes"
        mlp, flat = f"{cfg.dim} \u2192 {cfg.mlp_dim} \u2192 {cfg.dim}", str(patch * patch * cfg.in_channels)
        image_label, patch_label = f"image {size}\u00d7{size}", f"{patch}\u00d7{patch}"

    fig, (ax, ax_block) = plt.subplots(1, 2, figsize=(13, 6.4), gridspec_kw={"width_ratios": [2.4, 1]})
    for a in (ax, ax_block):
        a.set_xlim(0, 100)
        a.set_ylim(0, 100)
        a.axis("off")

    # The image and its patch grid, bottom left.
    x0, y0, side = 1, 2, 19
    shown = to_numpy_image(image) if image is not None else np.full((size, size), 0.85)
    ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=(x0, x0 + side, y0, y0 + side), aspect="auto", zorder=1)
    line = "white" if image is not None else "gray"
    for k in range(1, grid_w):
        ax.plot([x0 + side * k / grid_w] * 2, [y0, y0 + side], color=line, lw=1)
    for k in range(1, grid_h):
        ax.plot([x0, x0 + side], [y0 + side * k / grid_h] * 2, color=line, lw=1)
    ax.text(x0 + side / 2, y0 + side + 2, f"{image_label}\ncut into {n} patches of {patch_label}",
            ha="center", va="bottom", fontsize=9)

    # A row of patches (the first ones, then the last), the projection, and the tokens.
    count = grid_h * grid_w
    shown_ids = list(range(count)) if count <= 8 else [0, 1, 2, 3, 4, 5, None, count - 1]

    def number(pid: int) -> str:  # patch pid's position, 1..N (the CLS token is 0)
        return n if pid == count - 1 and not n.isdigit() else str(pid + 1)

    slot, left = 8, 28
    xs = [left + slot * (k + 1) for k in range(len(shown_ids))]  # slot 0 of the token row is the CLS token
    patches = None
    if image is not None:
        patches = image_to_patches(image[None], patch)[0].reshape(-1, patch, patch, image.shape[0])  # (N, P, P, C)
    for x, pid in zip(xs, shown_ids):
        if pid is None:
            ax.text(x + 2.5, 9, "\u2026", ha="center", va="center", fontsize=14)
            ax.text(x + 2.5, 41, "\u2026", ha="center", va="center", fontsize=14)
            continue
        if patches is not None:
            tile = patches[pid].clamp(0, 1).numpy()
            ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray", vmin=0, vmax=1,
                      extent=(x, x + 5, 6, 12), aspect="auto")
        else:
            _box(ax, x, 6, 5, 6, "", "0.85")
        ax.text(x + 2.5, 4, number(pid), ha="center", va="top", fontsize=7)
        _arrow(ax, (x + 2.5, 12.5), (x + 2.5, 23))
    _arrow(ax, (x0 + side + 1, 9), (xs[0] - 1, 9))
    ax.text((x0 + side + xs[0]) / 2, 10.5, "flatten", ha="center", va="bottom", fontsize=8)
    _box(ax, left, 24, xs[-1] + 5 - left, 6,
         f"Linear projection of flattened patches ({flat} \u2192 {d_eq})", "#f6c9a8")
    for k, x in enumerate([left, *xs]):
        if k and shown_ids[k - 1] is None:
            continue
        if k:
            _arrow(ax, (x + 2.5, 30.8), (x + 2.5, 37))
        _box(ax, x - 0.6, 37.5, 2.2, 6, "0" if k == 0 else number(shown_ids[k - 1]), "#d7b4e6", fontsize=7)  # position
        _box(ax, x + 2.2, 37.5, 3.4, 6, "*" if k == 0 else "", "#f8e08e" if k == 0 else "#f6c9a8", fontsize=9)
        _arrow(ax, (x + 2.5, 44.3), (x + 2.5, 51))
    ax.text(left - 2, 40.5, f"{tokens.strip('()')} tokens of width {dim}:\n[CLS] token * and patch\ntokens, each + its\n"
            "position embedding (purple)", ha="right", va="center", fontsize=8)
    _box(ax, left, 52, xs[-1] + 5 - left, 12,
         f"Transformer encoder: {l_eq} blocks (right), {heads}, width {d_eq}", "#cfe3f5", fontsize=10)
    _arrow(ax, (left + 2.5, 64.8), (left + 2.5, 72))
    ax.text(left + 5, 68, "output of the [CLS] token only", ha="left", va="center", fontsize=8)
    _box(ax, left - 4, 73, 13, 6, "LayerNorm +\nMLP head", "#c7e9c0")
    _arrow(ax, (left + 2.5, 79.8), (left + 2.5, 86))
    ax.text(left + 2.5, 87, f"class scores ({classes})", ha="center", va="bottom", fontsize=9)
    ax.set_title("The model: image \u2192 tokens \u2192 encoder \u2192 class")

    # One encoder block, right panel, bottom to top.
    ax_block.add_patch(FancyBboxPatch((8, 10), 84, 76, boxstyle="round,pad=0.5,rounding_size=2",
                                      fc="#eef5fb", ec="gray", lw=1, ls="--"))
    ax_block.text(4, 48, f"\u00d7 {l_eq}", ha="right", va="center", fontsize=11, rotation=90)
    ax_block.text(50, 3, f"tokens in: {tokens} \u00d7 {dim}", ha="center", va="center", fontsize=9)
    stages = [(16, "LayerNorm", "#e8e8a8"), (28, f"Multi-head attention\n({heads} of {head_dim})", "#f7b6b2"),
              (50, "LayerNorm", "#e8e8a8"), (62, f"MLP, GELU\n({mlp})", "#9fd8df")]
    for y, text, color in stages:
        _box(ax_block, 25, y, 50, 7 if "\n" in text else 5, text, color)
    for y_from, y_to in [(5.5, 15.5), (21.5, 27.5), (35.5, 41.5), (46, 49.5), (55.5, 61.5), (69.5, 75.5), (80, 91)]:
        _arrow(ax_block, (50, y_from), (50, y_to))
    for y in (43.8, 77.8):
        ax_block.add_patch(Circle((50, y), 2.2, fc="white", ec="black", lw=1))
        ax_block.text(50, y, "+", ha="center", va="center", fontsize=11)
    for y_from, y_to in [(10, 43.8), (47.5, 77.8)]:  # the residual paths
        ax_block.plot([50, 86, 86], [y_from, y_from, y_to], color="black", lw=1.1)
        _arrow(ax_block, (86, y_to), (52.4, y_to))
    ax_block.text(88, 27, "residual", rotation=90, ha="left", va="center", fontsize=8)
    ax_block.text(88, 62, "residual", rotation=90, ha="left", va="center", fontsize=8)
    ax_block.text(50, 94, f"tokens out: {tokens} \u00d7 {dim}", ha="center", va="center", fontsize=9)
    ax_block.set_title("One encoder block (pre-norm)")
    what = "a ViT" if cfg is None else f"this ViT: {n} patches, {depth} blocks of width {dim}, {heads}"
    fig.suptitle(f"Architecture of {what} (after Dosovitskiy et al., 2021, Figure 1)")
    fig.tight_layout()
    return fig
