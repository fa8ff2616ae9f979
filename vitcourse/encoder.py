"""The Transformer encoder block: attention and an MLP, each behind a LayerNorm and a residual.

Pre-norm, as in ViT and timm::

    x = x + attn(norm1(x))
    x = x + mlp(norm2(x))

Module names (``norm1``, ``attn``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) match timm's
``Block`` so weights move between the two unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import MultiHeadSelfAttention

__all__ = ["MLP", "DropPath", "EncoderBlock", "LAYER_NORM_EPS"]

LAYER_NORM_EPS = 1e-6
"""The LayerNorm epsilon of the ViT paper's code and of timm."""


class MLP(nn.Module):
    """Two linear layers with an exact GELU between them and dropout after each.

    Args:
        dim: input and output size ``D``.
        hidden: hidden size (``mlp_dim``), usually ``2D`` to ``4D``.
        dropout: dropout probability during training.

    Shapes:
        ``(..., D)`` -> ``(..., D)``; applied to every token independently.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as in ViT; not the tanh approximation
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Transform each token ``x`` (..., D) -> (..., D)."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: during training, drop a whole residual branch per sample.

    Each sample's branch output is zeroed with probability ``p`` and scaled by
    ``1 / (1 - p)`` otherwise, so the expected value is unchanged. Identity in eval mode.

    Shapes:
        ``(B, ...)`` -> ``(B, ...)``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}.")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Drop the branch ``x`` (B, ...) for a random subset of the batch."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one coin per sample
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class EncoderBlock(nn.Module):
    """One pre-norm Transformer encoder block.

    Args:
        dim: embedding size ``D``.
        heads: attention heads (must divide ``D``).
        mlp_dim: hidden size of the MLP.
        dropout: dropout in the MLP and after the attention projection.
        drop_path: stochastic-depth probability for both residual branches.
        fused_attention: use ``F.scaled_dot_product_attention`` when no weights are asked for.
        lsa: locality self-attention (see :class:`~vitcourse.attention.MultiHeadSelfAttention`).

    Shapes:
        ``(B, N, D)`` -> ``(B, N, D)``; with ``return_weights=True`` also the
        attention weights ``(B, heads, N, N)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        fused_attention: bool = True,
        lsa: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = MultiHeadSelfAttention(dim, heads, proj_dropout=dropout, fused=fused_attention, lsa=lsa)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Apply the block to ``x`` (B, N, D)."""
        if return_weights:
            attended, weights = self.attn(self.norm1(x), return_weights=True)
        else:
            attended, weights = self.attn(self.norm1(x)), None
        x = x + self.drop_path(attended)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, weights) if return_weights else x
