"""Attention, written out.

Three pieces, each built from the one before:

* :func:`softmax` - a numerically stable softmax along one dimension;
* :func:`scaled_dot_product_attention` - ``softmax(q kᵀ / sqrt(d_k)) v``, with an
  optional boolean mask, able to hand back the attention weights;
* :class:`MultiHeadSelfAttention` - one fused ``qkv`` projection, ``heads``
  parallel attentions over slices of the embedding, and an output projection
  ``proj``. Parameter names and layout match ``timm``'s ``Attention`` module.
  With ``lsa=True`` it becomes the *locality self-attention* of Lee, Lee & Song
  (2021): a learned temperature instead of ``sqrt(d_k)`` and no attention from a
  token to itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["softmax", "scaled_dot_product_attention", "MultiHeadSelfAttention", "describe_values"]


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


def describe_values(values: Tensor) -> str:
    """A few words for what a tensor holds, for prose about outputs that differ between versions:
    ``"nan everywhere"``, ``"zeros everywhere"``, ``"a mix of nan and numbers"`` or ``"ordinary numbers"``.

    Chapter 1 uses it for what a fused kernel returns when a query may attend to no key at all.
    """
    nan = torch.isnan(values)
    if bool(nan.all()):
        return "`nan` everywhere"
    if bool(nan.any()):
        return "a mix of `nan` and numbers"
    if bool((values == 0).all()):
        return "zeros everywhere"
    return "ordinary numbers"


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    return_weights: bool = False,
    scale: float | Tensor | None = None,
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
        scale: multiplies the scores ``q kᵀ``; ``None`` means ``1 / sqrt(d_k)``. A scalar
            tensor (a learned inverse temperature) keeps its gradient.

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
    scores = q @ k.transpose(-2, -1)  # (..., n_q, n_k)
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
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
        lsa: locality self-attention (Lee, Lee & Song 2021): the scores are divided by a
            learnable ``temperature`` (one scalar, initialised to ``sqrt(head_dim)``, so training
            starts exactly at the standard scale) instead of the fixed ``sqrt(head_dim)``, and
            the diagonal is masked out, so each token's weights go to the *other* tokens and the
            softmax can sharpen. Off by default: then there is no extra parameter.

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
        lsa: bool = False,
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
        self.lsa = lsa
        if lsa:  # scores / temperature; starts at the usual sqrt(d_k)
            self.temperature = nn.Parameter(torch.tensor(math.sqrt(self.head_dim)))

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend every token of ``x`` (B, N, D) to every other; see the class docstring."""
        # One matmul makes queries, keys and values for every head at once.
        q, k, v = rearrange(
            self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads
        )  # each (B, h, N, head_dim)
        weights, scale = None, None
        if self.lsa:
            n = x.shape[1]
            off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)  # (N, N): no token attends to itself
            mask = off_diagonal if mask is None else mask & off_diagonal
            scale = 1.0 / self.temperature  # a tensor, so the temperature is learned
        if self.fused and not return_weights:
            dropout_p = self.weight_dropout.p if self.training else 0.0
            if scale is not None:  # the fused kernel takes a float scale only: scale the queries instead
                q, scale = q * scale, 1.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        else:
            _, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True, scale=scale)
            out = self.weight_dropout(weights) @ v  # (B, h, N, head_dim)
        out = rearrange(out, "b h n d -> b n (h d)")  # heads side by side again: (B, N, D)
        out = self.output_dropout(self.proj(out))
        return (out, weights) if return_weights else out
