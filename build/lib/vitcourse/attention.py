"""Attention, written out.

Three pieces, each built from the one before:

* :func:`softmax` - a numerically stable softmax along one dimension;
* :func:`scaled_dot_product_attention` - ``softmax(q kᵀ / sqrt(d_k)) v``, with an
  optional boolean mask, able to hand back the attention weights;
* :class:`MultiHeadSelfAttention` - one fused ``qkv`` projection, ``heads``
  parallel attentions over slices of the embedding, and an output projection
  ``proj``. Parameter names and layout match ``timm``'s ``Attention`` module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["softmax", "scaled_dot_product_attention", "MultiHeadSelfAttention"]


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``x`` along ``dim``: ``exp(x_i) / sum_j exp(x_j)``.

    The row maximum is subtracted first; this changes nothing mathematically
    but keeps ``exp`` from overflowing for large scores. Rows that are ``-inf``
    everywhere (every key masked out) give ``nan``, exactly like
    :func:`torch.softmax`.

    Args:
        x: tensor of any shape ``(..., n, ...)``.
        dim: the dimension that sums to one in the output.

    Returns:
        A tensor of the same shape as ``x`` whose slices along ``dim`` are
        probability vectors.
    """
    shifted = x - x.amax(dim=dim, keepdim=True)
    exp = shifted.exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention written out: scores, scale, mask, softmax, weighted sum.

    Args:
        q: queries, shape ``(..., n_q, d_k)``.
        k: keys, shape ``(..., n_k, d_k)``.
        v: values, shape ``(..., n_k, d_v)``.
        mask: optional boolean tensor broadcastable to ``(..., n_q, n_k)``;
            ``True`` means "may attend", ``False`` means "masked out" (the
            convention of :func:`torch.nn.functional.scaled_dot_product_attention`).
        return_weights: also return the attention weights.

    Returns:
        The output, shape ``(..., n_q, d_v)``; with ``return_weights`` a pair
        ``(output, weights)`` where ``weights`` has shape ``(..., n_q, n_k)``
        and each row sums to one.
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"queries have size {q.shape[-1]} and keys size {k.shape[-1]} in the last "
            "dimension; they must be equal for the dot product q·k."
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"got {k.shape[-2]} keys but {v.shape[-2]} values; every key needs one value."
        )
    d_k = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., n_q, n_k)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a boolean tensor (True = may attend), got dtype {mask.dtype}."
            )
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = softmax(scores, dim=-1)  # (..., n_q, n_k)
    out = weights @ v  # (..., n_q, d_v)
    return (out, weights) if return_weights else out


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout).

    Args:
        dim: embedding size ``D``; must be divisible by ``heads``.
        heads: number of heads ``h``; each works on ``D / h`` features.
        qkv_bias: give the ``qkv`` projection a bias (the ViT default).
        attn_dropout: dropout on the attention weights during training.
        proj_dropout: dropout after the output projection during training.
        fused: run through :func:`torch.nn.functional.scaled_dot_product_attention`
            (fast, no weights returned) instead of the explicit path.

    Shapes:
        input ``(B, N, D)`` -> output ``(B, N, D)``. With ``return_weights=True``
        the explicit path also returns weights of shape ``(B, h, N, N)``.

    A query whose keys are *all* masked out has no defined attention: the
    explicit path gives ``nan`` for it (like :func:`torch.softmax`), while
    recent PyTorch versions of the fused kernel give zeros. Do not rely on
    either; make sure every query may attend to at least one key.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(
                f"dim={dim} is not divisible by heads={heads}; choose heads that divide "
                "the embedding size so every head gets dim/heads features."
            )
        self.heads = heads
        self.head_dim = dim // heads
        self.fused = fused
        # Only the two linear layers hold weights; their names are timm's, so state_dicts match.
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # D -> 3D: queries, keys, values
        self.proj = nn.Linear(dim, dim)  # heads concatenated -> D
        self.weight_dropout = nn.Dropout(attn_dropout)  # on the attention matrix
        self.output_dropout = nn.Dropout(proj_dropout)  # on the block's output

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend every token of ``x`` (B, N, D) to every other; see the class docstring."""
        # One matmul makes queries, keys and values for every head at once.
        q, k, v = rearrange(
            self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads
        )  # each (B, h, N, head_dim)
        weights = None
        if self.fused and not return_weights:
            dropout_p = self.weight_dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            _, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
            out = self.weight_dropout(weights) @ v  # (B, h, N, head_dim)
        out = rearrange(out, "b h n d -> b n (h d)")  # heads side by side again: (B, N, D)
        out = self.output_dropout(self.proj(out))
        return (out, weights) if return_weights else out
