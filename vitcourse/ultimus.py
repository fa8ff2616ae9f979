"""The "Ultimus" assignment network and the small, named changes that repair it.

The assignment (chapter 6) asks for a tiny convolution-plus-attention network for CIFAR-10::

    image (B, 3, 32, 32)
      -> Conv 3x3 3->16 -> Conv 3x3 16->32 -> Conv 3x3 32->48      (padding 1: stays 32x32)
      -> global average pooling                                   X: (B, 48)
      -> 4 x ULTIMUS block                                        (B, 48) -> (B, 48)
      -> Linear(48, 10)                                           logits: (B, 10)

and one ULTIMUS block computes, for one 48-vector ``x``::

    q, k, v = Q(x), K(x), V(x)        # three Linear(48, 8): (B, 8) each
    AM = softmax(qᵀ k) / sqrt(8)      # qᵀ k is an OUTER product: (B, 8, 8)
    z  = v · AM                       # (B, 1, 8) @ (B, 8, 8) -> (B, 8)
    out = Out(z)                      # Linear(8, 48): (B, 48)

What this "attention" attends over: there is no sequence here. Each image has been reduced to
a single vector, so ``q``, ``k`` and ``v`` are three 8-vectors and ``AM[i, j] = q_i * k_j`` scores
*feature* ``i`` against *feature* ``j`` of the same image. In chapters 1-4 a row of the attention
matrix belongs to a token (a patch), ``scores = Q Kᵀ`` is an ``N x N`` matrix of dot products between
``head_dim``-vectors of different tokens, and the output of a token is a weighted average of the
other tokens' values. Here the 8x8 matrix mixes the 8 coordinates of one value vector, and its
entries are products of single numbers rather than dot products.

:class:`UltimusNet` with its default arguments is the specification exactly (25,882 parameters).
Its keyword arguments switch on one repair each; :data:`VARIANTS` names the combinations the
chapter trains, and ``vitcourse.train`` resolves model names starting with ``"ultimus"`` there.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Literal

import torch
from einops import einsum
from torch import Tensor, nn

__all__ = ["UltimusBlock", "UltimusNet", "VARIANTS", "build_ultimus", "SPEC_NUM_PARAMETERS", "average_colour_accuracy"]

#: Parameter count printed in the assignment's model summary.
SPEC_NUM_PARAMETERS = 25_882

ScalePlacement = Literal["outside", "inside", "none"]
_SCALES = ("outside", "inside", "none")


class UltimusBlock(nn.Module):
    """One ULTIMUS block: feature-wise "attention" on a single vector, ``(B, dim) -> (B, dim)``.

    Args:
        dim: width of the input and output vector (48 in the assignment).
        attn_dim: width of ``q``, ``k`` and ``v`` (8 in the assignment).
        scale: where the ``1/sqrt(attn_dim)`` goes. ``"outside"`` (the specification) divides the
            softmax *output*, ``"inside"`` divides the scores before the softmax (as in chapters 1-4),
            ``"none"`` leaves it out.
        residual: return ``x + Out(z)`` instead of ``Out(z)``.
        norm: apply a LayerNorm to ``x`` before ``Q``, ``K`` and ``V`` (pre-norm, as in chapter 3).
    """

    def __init__(
        self,
        dim: int = 48,
        attn_dim: int = 8,
        scale: ScalePlacement = "outside",
        residual: bool = False,
        norm: bool = False,
    ) -> None:
        super().__init__()
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {', '.join(_SCALES)}, got {scale!r}.")
        self.attn_dim, self.scale, self.residual = attn_dim, scale, residual
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.k = nn.Linear(dim, attn_dim)
        self.q = nn.Linear(dim, attn_dim)
        self.v = nn.Linear(dim, attn_dim)
        self.out = nn.Linear(attn_dim, dim)

    def attention_matrix(self, x: Tensor) -> Tensor:
        """The 8x8 matrix ``AM`` for each vector: ``(B, dim) -> (B, attn_dim, attn_dim)``.

        Row ``i`` is a softmax over ``j`` of ``q_i * k_j`` (with the scale placed as configured),
        so each row sums to 1, or to ``1/sqrt(attn_dim)`` when the scale sits outside.
        """
        h = self.norm(x)
        q, k = self.q(h), self.k(h)  # (B, attn_dim) each
        scores = einsum(q, k, "b i, b j -> b i j")  # (B, attn_dim, attn_dim): the outer product qᵀk
        root = math.sqrt(self.attn_dim)
        if self.scale == "inside":
            return torch.softmax(scores / root, dim=-1)
        weights = torch.softmax(scores, dim=-1)
        return weights / root if self.scale == "outside" else weights

    def forward(self, x: Tensor) -> Tensor:
        """``(B, dim) -> (B, dim)``."""
        am = self.attention_matrix(x)  # (B, attn_dim, attn_dim)
        v = self.v(self.norm(x))  # (B, attn_dim)
        z = einsum(v, am, "b i, b i j -> b j")  # (B, attn_dim): the row vector v times AM
        out = self.out(z)  # (B, dim)
        return x + out if self.residual else out


def _conv_stem(channels: tuple[int, ...], act: bool, norm: bool) -> nn.Sequential:
    """3x3 convolutions with padding 1 (spatial size kept), optionally each followed by BN and ReLU."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
        if norm:
            layers.append(nn.BatchNorm2d(c_out))
        if act:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class UltimusNet(nn.Module):
    """The Ultimus network: ``(B, 3, H, W) -> (B, num_classes)`` logits.

    With default arguments this is the assignment as written: three plain convolutions (no
    nonlinearity, no normalisation), global average pooling to ``X`` of shape ``(B, 48)``, four
    ULTIMUS blocks with the scale outside the softmax and no residual path, then ``Linear(48, 10)``;
    25,882 parameters.

    Args:
        stem_act: put a ReLU after each convolution.
        stem_norm: put a BatchNorm2d after each convolution (adds 192 parameters).
        scale: placement of ``1/sqrt(8)`` in every block, see :class:`UltimusBlock`.
        residual: add a residual path around every block.
        block_norm: pre-norm LayerNorm in every block (adds 96 parameters per block).
        num_blocks, channels, attn_dim, num_classes: sizes; the defaults are the assignment's.
    """

    def __init__(
        self,
        stem_act: bool = False,
        stem_norm: bool = False,
        scale: ScalePlacement = "outside",
        residual: bool = False,
        block_norm: bool = False,
        num_blocks: int = 4,
        channels: tuple[int, ...] = (3, 16, 32, 48),
        attn_dim: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        dim = channels[-1]
        self.stem = _conv_stem(channels, act=stem_act, norm=stem_norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.blocks = nn.ModuleList(
            UltimusBlock(dim, attn_dim, scale=scale, residual=residual, norm=block_norm) for _ in range(num_blocks)
        )
        self.head = nn.Linear(dim, num_classes)

    def features(self, images: Tensor) -> Tensor:
        """The pooled vector ``X``: ``(B, 3, H, W) -> (B, 48)``."""
        if images.ndim != 4 or images.shape[1] != self.stem[0].in_channels:
            raise ValueError(
                f"UltimusNet expects images of shape (B, {self.stem[0].in_channels}, H, W), "
                f"got {tuple(images.shape)}; add a batch dimension with images[None] if you have one image."
            )
        return self.pool(self.stem(images)).flatten(1)  # (B, 48, 1, 1) -> (B, 48)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, num_classes)`` logits."""
        x = self.features(images)  # (B, 48)
        for block in self.blocks:
            x = block(x)  # (B, 48)
        return self.head(x)  # (B, num_classes)


#: The chapter's models, each one named change (or one combination of changes) away from the spec.
VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "ultimus": UltimusNet,
    "ultimus_scale_inside": partial(UltimusNet, scale="inside"),
    "ultimus_relu": partial(UltimusNet, stem_act=True),
    "ultimus_bn_relu": partial(UltimusNet, stem_act=True, stem_norm=True),
    "ultimus_residual": partial(UltimusNet, residual=True),
    "ultimus_layernorm": partial(UltimusNet, block_norm=True),
    # two repairs together: a nonlinear stem that sees shapes, and a path around every block
    "ultimus_residual_relu": partial(UltimusNet, stem_act=True, residual=True),
    "ultimus_repaired": partial(UltimusNet, stem_act=True, stem_norm=True, residual=True),
    # everything chapters 1-4 would do: also the scale inside the softmax and pre-norm blocks
    "ultimus_modern": partial(UltimusNet, stem_act=True, stem_norm=True, residual=True, scale="inside",
                              block_norm=True),
}


def build_ultimus(name: str, **kwargs) -> nn.Module:
    """Build the variant called ``name`` (a key of :data:`VARIANTS`); ``kwargs`` override its arguments."""
    if name not in VARIANTS:
        raise ValueError(f"unknown Ultimus variant {name!r}; choose one of {', '.join(VARIANTS)}.")
    return VARIANTS[name](**kwargs)


def average_colour_accuracy(
    train_images: Tensor, train_labels: Tensor, val_images: Tensor, val_labels: Tensor, num_classes: int
) -> float:
    """How well the average colour alone predicts the class: validation accuracy of a linear classifier.

    Each image ``(3, H, W)`` is reduced to its three channel means (the most that a linear stem followed
    by global average pooling can pass on, up to the border's zero padding); a multinomial logistic
    regression on those three numbers (standardised, a small L2 penalty, L-BFGS to convergence) is fitted
    on the training images and scored on the validation images.

    Args:
        train_images, val_images: ``(N, 3, H, W)`` and ``(M, 3, H, W)``.
        train_labels, val_labels: ``(N,)`` and ``(M,)`` class indices.
        num_classes: number of classes.

    Returns:
        The fraction of validation images whose class it predicts.
    """
    if train_images.ndim != 4 or val_images.ndim != 4 or len(train_images) != len(train_labels) \
            or len(val_images) != len(val_labels) or len(train_images) == 0 or len(val_images) == 0:
        raise ValueError("average_colour_accuracy needs (N, C, H, W) images with one label each, for training "
                         "and for validation.")
    x_train, x_val = train_images.double().mean(dim=(2, 3)), val_images.double().mean(dim=(2, 3))  # (N, C), (M, C)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-12)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = nn.Linear(x_train.shape[1], num_classes).double()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x_train), train_labels) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(x_val).argmax(-1) == val_labels).double().mean().item()
