"""Reading what a ViT learned: its attention, its positional embedding, its patch filters.

The attention functions work on the list returned by :meth:`vitcourse.VisionTransformer.attention_maps`
(one ``(B, heads, T, T)`` tensor per block, ``T = N + 1`` with the CLS token first):
CLS attention, attention rollout, mean attention distance and which heads are local.
:func:`position_code` measures what a learned positional embedding encodes about the patch grid,
and :func:`filter_components` gives the principal components of the patch-embedding filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "cls_attention",
    "attention_rollout",
    "mean_attention_distance",
    "uniform_attention_distance",
    "LOCAL_FRACTION",
    "local_heads",
    "attention_gain",
    "filter_components",
    "grid_score",
    "centre_score",
    "POSITION_Z",
    "PositionCode",
    "position_code",
    "position_code_kind",
]


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


def uniform_attention_distance(side: int, patch_size: int) -> float:
    """Mean attention distance, in pixels, of a head attending equally to all ``side x side`` patches (and CLS).

    It is the mean distance between the centres of two patches drawn independently and uniformly
    from the grid (a patch paired with itself included).
    """
    tokens = side * side + 1
    uniform = torch.full((1, 1, tokens, tokens), 1.0 / tokens)  # (B=1, heads=1, T, T)
    return float(mean_attention_distance(uniform, patch_size=patch_size)[0])


LOCAL_FRACTION = 0.5
"""A head is *local* when its mean attention distance is below this fraction of the uniform distance."""


def local_heads(distances, uniform: float, fraction: float = LOCAL_FRACTION) -> Tensor:
    """Which heads are local: ``distances`` (any shape, pixels) below ``fraction * uniform`` -> bool, same shape."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1 (a share of the uniform distance), got {fraction}.")
    return torch.as_tensor(distances) < fraction * uniform


def attention_gain(gain: float) -> str:
    """How much more concentrated trained attention is than untrained, from the ratio ``gain`` of their peaks.

    ``gain`` is the largest weight after training divided by the largest weight before. Returns
    ``"few patches"`` (``gain >= 3``: the peak is at least three times higher), ``"more concentrated"``
    (``1.5 <= gain < 3``) or ``"hardly"`` (below 1.5).
    """
    if not math.isfinite(gain) or gain <= 0:
        raise ValueError(f"gain must be a positive ratio of two attention weights, got {gain}.")
    return "few patches" if gain >= 3 else "more concentrated" if gain >= 1.5 else "hardly"


def filter_components(weight: Tensor, count: int = 24) -> Tensor:
    """Leading principal components of patch filters ``(D, C, P, P) -> (count, C, P, P)``, each scaled to [0, 1].

    The ``D`` filters are centred (their mean filter subtracted) before the SVD, as in a PCA; each
    component is then shifted and scaled to span [0, 1] so it can be shown as an image.
    """
    flat = weight.flatten(1)  # (D, C*P*P)
    flat = flat - flat.mean(0)
    _, _, components = torch.linalg.svd(flat, full_matrices=False)  # rows: principal directions
    pcs = components[:count].reshape(-1, *weight.shape[1:])
    low = pcs.amin(dim=(1, 2, 3), keepdim=True)
    high = pcs.amax(dim=(1, 2, 3), keepdim=True)
    return (pcs - low) / (high - low).clamp_min(1e-12)


# --------------------------------------------------------------------------- what the positions encode


def _positions(pos_embed: Tensor) -> Tensor:
    """``(1, N + 1, D)``, ``(N + 1, D)`` (CLS first) or ``(N, D)`` with square ``N`` -> ``(N, D)`` float64."""
    p = pos_embed.detach().cpu().double().reshape(-1, pos_embed.shape[-1])
    if math.isqrt(p.shape[0]) ** 2 != p.shape[0]:
        p = p[1:]  # drop the CLS position
    _grid_side(p.shape[0])
    return p


def _pair_layout(side: int) -> dict[str, np.ndarray]:
    """For every pair ``i < j`` of the ``side x side`` grid: what :func:`grid_score` and :func:`centre_score` group by.

    ``distance``: grid distance in patches; ``offset``: its square (an integer, equal for equally long
    offsets); ``centre_gap``: how much the two positions' distances from the grid centre differ;
    ``placement``: an id shared by pairs whose two positions lie on the same two orbits of the square's
    eight symmetries (rotations and reflections about the centre), that is pairs placed alike
    relative to the centre.
    """
    rows, cols = np.divmod(np.arange(side * side), side)
    a, b = np.abs(2 * rows - (side - 1)), np.abs(2 * cols - (side - 1))  # twice the offsets from the centre
    orbit = np.minimum(a, b) * (side + 1) + np.maximum(a, b)  # the same for the 8 symmetric images of a position
    radius = np.hypot(a, b) / 2
    i, j = np.triu_indices(side * side, k=1)
    offset = (rows[i] - rows[j]) ** 2 + (cols[i] - cols[j]) ** 2
    lo, hi = np.minimum(orbit[i], orbit[j]), np.maximum(orbit[i], orbit[j])
    return {"i": i, "j": j, "distance": np.sqrt(offset), "offset": offset,
            "centre_gap": np.abs(radius[i] - radius[j]), "placement": lo * (orbit.max() + 1) + hi}


def _partial_correlation(y: np.ndarray, x: np.ndarray, groups: np.ndarray) -> float:
    """Pearson correlation of ``y`` and ``x`` after removing each group's mean from both (0 if either is constant)."""
    _, g = np.unique(groups, return_inverse=True)
    counts = np.bincount(g)

    def residual(v):
        return v - (np.bincount(g, weights=v) / counts)[g]

    ry, rx = residual(y), residual(x)
    denominator = math.sqrt(float(ry @ ry) * float(rx @ rx))
    return float(ry @ rx) / denominator if denominator > 1e-12 * len(y) else 0.0


def _similarities(p: Tensor) -> np.ndarray:
    unit = torch.nn.functional.normalize(p, dim=-1)
    return (unit @ unit.T).numpy()  # (N, N) cosine similarities


def grid_score(pos_embed: Tensor) -> float:
    """Does a positional embedding know which positions are near each other on the grid?

    Among pairs of positions placed alike relative to the centre (see :func:`_pair_layout`), minus the
    correlation between the pair's cosine similarity and its grid distance: positive when nearer pairs
    are more alike. A code that only says how a position sits relative to the centre (a
    centre-versus-border code) scores 0, because within such a group all its similarities are equal;
    a code of rows and columns scores high.

    Args:
        pos_embed: ``(1, N + 1, D)`` or ``(N + 1, D)`` with the CLS position first, or ``(N, D)``.

    Returns:
        A number in ``[-1, 1]``.
    """
    p = _positions(pos_embed)
    pairs = _pair_layout(math.isqrt(p.shape[0]))
    sim = _similarities(p)[pairs["i"], pairs["j"]]
    return -_partial_correlation(sim, pairs["distance"], pairs["placement"])


def centre_score(pos_embed: Tensor) -> float:
    """Does a positional embedding encode how far a position lies from the centre of the grid?

    Among pairs of positions the same distance apart on the grid, minus the correlation between the
    pair's cosine similarity and the difference of the two positions' distances from the centre:
    positive when positions about as far from the centre are more alike than equally distant
    positions that are not. A code that depends only on the offset between two positions (a
    translation-invariant grid code) scores about 0.

    Args and returns as :func:`grid_score`.
    """
    p = _positions(pos_embed)
    pairs = _pair_layout(math.isqrt(p.shape[0]))
    sim = _similarities(p)[pairs["i"], pairs["j"]]
    return -_partial_correlation(sim, pairs["centre_gap"], pairs["offset"])


@dataclass(frozen=True)
class PositionCode:
    """:func:`grid_score` and :func:`centre_score` of an embedding, each against the same embedding shuffled.

    ``*_null`` holds the mean and standard deviation of the score over random shuffles of which
    position gets which embedding vector; ``*_verdict`` is :func:`vitcourse.stats.compare` of the
    score with that shuffled distribution (``"higher"``: beyond what a random arrangement gives).
    """

    grid: float
    grid_null: tuple[float, float]
    grid_verdict: str
    centre: float
    centre_null: tuple[float, float]
    centre_verdict: str

    @property
    def kind(self) -> str:
        """:func:`position_code_kind` of the two verdicts."""
        return position_code_kind(self.grid_verdict, self.centre_verdict)


POSITION_Z = 3.0
"""Shuffled standard deviations a score of :func:`position_code` must clear. Stricter than
:data:`vitcourse.stats.Z` because every embedding gets two tests and a page reads several
embeddings: if the shuffled scores are normal, a random embedding clears 3 by chance in about one
test in 740, and 2 in about one test in 44."""


def position_code(pos_embed: Tensor, shuffles: int = 200, seed: int = 0, z: float = POSITION_Z) -> PositionCode:
    """Both scores of a positional embedding and whether each is beyond a random arrangement.

    The same vectors assigned to the positions in ``shuffles`` random orders give each score's noise:
    a score counts (verdict ``"higher"``) when :func:`vitcourse.stats.compare` finds it at least ``z``
    shuffled standard deviations above the shuffled mean (``"lower"``: as far below).
    """
    from .stats import Estimate, compare

    if shuffles < 2:
        raise ValueError(f"position_code needs at least 2 shuffles to measure their spread, got {shuffles}.")
    p = _positions(pos_embed)
    pairs = _pair_layout(math.isqrt(p.shape[0]))
    sim = _similarities(p)
    rng = np.random.default_rng(seed)

    def scores(s: np.ndarray) -> tuple[float, float]:
        values = s[pairs["i"], pairs["j"]]
        return (-_partial_correlation(values, pairs["distance"], pairs["placement"]),
                -_partial_correlation(values, pairs["centre_gap"], pairs["offset"]))

    observed = scores(sim)
    null = np.array([scores(sim[np.ix_(order, order)]) for order in (rng.permutation(len(p)) for _ in range(shuffles))])
    results = []
    for k in range(2):
        mean, sd = float(null[:, k].mean()), float(null[:, k].std(ddof=1))
        results += [observed[k], (mean, sd), compare(Estimate(observed[k], 0.0), Estimate(mean, sd), z=z)]
    return PositionCode(*results)


def position_code_kind(grid_verdict: str, centre_verdict: str) -> str:
    """What a positional embedding encodes, from the verdicts of :func:`position_code`.

    Returns ``"grid"`` (only the grid score is beyond shuffling), ``"centre"`` (only the centre score),
    ``"both"``, ``"neither"`` (both within shuffling noise), or ``"reversed"`` when either score is
    below what shuffling gives (nearer or more centred pairs *less* alike).
    """
    verdicts = (grid_verdict, centre_verdict)
    for v in verdicts:
        if v not in ("higher", "lower", "noise"):
            raise ValueError(f"verdicts are 'higher', 'lower' or 'noise', got {v!r}.")
    if "lower" in verdicts:
        return "reversed"
    return {(True, True): "both", (True, False): "grid", (False, True): "centre",
            (False, False): "neither"}[grid_verdict == "higher", centre_verdict == "higher"]
