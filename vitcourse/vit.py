"""The Vision Transformer: patches in, class scores out.

``VisionTransformer`` assembles the pieces of the earlier chapters::

    images (B, C, H, W)
      -> PatchEmbed (or SPT, or conv stem) (B, N, D)
      -> prepend CLS token                (B, N + 1, D)
      -> + learned positional embedding   (B, N + 1, D)
      -> dropout, depth x EncoderBlock    (B, N + 1, D)
      -> LayerNorm, take the CLS token    (B, D)
      -> linear head                      (B, num_classes)

Its ``state_dict`` has exactly timm's names and shapes, so the weights load
into ``timm.models.vision_transformer.VisionTransformer`` and back (see
:mod:`vitcourse.timm_compat`). The small-data options of ``ViTConfig``
(``stem="spt"`` or ``"conv"``, ``lsa=True``; see :mod:`vitcourse.small_data`)
add parameters timm does not have; with their defaults the model is the plain ViT.

``ViTConfig(distilled=True)`` adds DeiT's distillation token (Touvron et al. 2021):
a second learned token after the CLS token, read by a second head that learns
from a teacher's predictions (see :mod:`vitcourse.distill`). That model has
the names and shapes of timm's ``VisionTransformerDistilled``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .encoder import LAYER_NORM_EPS, EncoderBlock
from .patches import PatchEmbed, check_image_size
from .small_data import STEMS, ConvStem, ShiftedPatchTokenization, conv_stem_widths

__all__ = ["ViTConfig", "VisionTransformer", "count_parameters", "expected_num_parameters", "PRESETS",
           "require_plain_vit"]


@dataclass(frozen=True)
class ViTConfig:
    """Every hyperparameter of a :class:`VisionTransformer`.

    Attributes:
        image_size: side of the square input images, in pixels.
        patch_size: side of the square patches; must divide ``image_size``.
        in_channels: colour channels of the input (3 for RGB, 1 for grey).
        num_classes: number of output classes.
        dim: embedding size ``D`` of every token.
        depth: number of encoder blocks.
        heads: attention heads per block; must divide ``dim``.
        mlp_dim: hidden size of each block's MLP.
        dropout: dropout after the positional embedding and inside the blocks.
        drop_path: stochastic-depth rate of the last block (linearly increasing from 0).
        stem: how images become tokens: ``"patch"`` (the ViT's linear patch embedding),
            ``"spt"`` (shifted patch tokenization) or ``"conv"`` (a convolutional stem; needs a
            power-of-two ``patch_size``). See :mod:`vitcourse.small_data`.
        lsa: locality self-attention in every block (learned temperature, no self-attention
            on the diagonal); see :class:`vitcourse.attention.MultiHeadSelfAttention`.
        distilled: DeiT's distillation token and second head (token order ``[cls, dist, patches]``);
            see :class:`VisionTransformer` for what ``forward`` returns then. It combines with
            every other option: the extra token is one more row for the tokenizer's output to meet.
    """

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_dim: int = 384
    dropout: float = 0.0
    drop_path: float = 0.0
    stem: str = "patch"
    lsa: bool = False
    distilled: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth", "heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}.")
        check_image_size(self.image_size, self.image_size, self.patch_size)
        if self.dim % self.heads:
            raise ValueError(
                f"ViTConfig.dim={self.dim} is not divisible by heads={self.heads}; pick a number of "
                "heads that divides dim."
            )
        for name in ("dropout", "drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {value!r}.")
        if self.stem not in STEMS:
            raise ValueError(f"ViTConfig.stem must be one of {', '.join(map(repr, STEMS))}, got {self.stem!r}.")
        if self.stem == "conv":
            conv_stem_widths(self.patch_size, self.dim)  # raises unless patch_size is a power of two
        if not isinstance(self.lsa, bool):
            raise ValueError(f"ViTConfig.lsa must be True or False, got {self.lsa!r}.")
        if not isinstance(self.distilled, bool):
            raise ValueError(f"ViTConfig.distilled must be True or False, got {self.distilled!r}.")

    @property
    def num_patches(self) -> int:
        """Number of patches ``N = (image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Learned tokens in front of the patches: the CLS token, and the distillation token if ``distilled``."""
        return 2 if self.distilled else 1

    @property
    def seq_len(self) -> int:
        """Tokens seen by the encoder: ``N`` patches plus the CLS (and distillation) token."""
        return self.num_patches + self.num_prefix_tokens

    def to_dict(self) -> dict:
        """The configuration as a plain dict (for checkpoints and JSON)."""
        return asdict(self)


PRESETS: dict[str, ViTConfig] = {
    # The from-scratch CIFAR-10 model of the course's first seed blog post.
    "seed-blog": ViTConfig(image_size=32, patch_size=4, dim=256, depth=6, heads=8, mlp_dim=512, dropout=0.2),
    # The standard sizes of the DeiT/ViT papers at 224 px, patch 16.
    "vit-tiny": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3, mlp_dim=768),
    "vit-small": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536),
    "vit-base": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12, mlp_dim=3072),
}
"""Named configurations used in the chapters."""


class VisionTransformer(nn.Module):
    """A ViT classifier with timm-compatible parameter names.

    With ``config.distilled`` the model is DeiT's distilled ViT: a ``dist_token`` ``(1, 1, D)``
    enters after the CLS token, positions cover ``N + 2`` tokens, and ``head_dist`` reads the
    distillation token's features as ``head`` reads the CLS token's. What ``forward`` returns
    then follows timm's ``VisionTransformerDistilled``:

    * training mode with ``distilled_training`` on: the pair ``(cls_logits, dist_logits)``, one
      for the labels and one for the teacher (:func:`vitcourse.distill.distillation_loss`);
    * otherwise (eval mode, or training without a teacher): ``(cls_logits + dist_logits) / 2``,
      the average DeiT reports its accuracy with.

    ``distilled_training`` is an attribute, not a config field, as in timm; it starts ``True``
    here because a distilled model is built to be trained with a teacher. timm starts it at
    ``False``; :mod:`vitcourse.timm_compat` carries it across in both directions.

    Args:
        config: a :class:`ViTConfig`.

    Shapes:
        ``forward``: ``(B, C, H, W)`` -> ``(B, num_classes)``, or a pair of them (see above).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        stem = {"patch": PatchEmbed, "spt": ShiftedPatchTokenization, "conv": ConvStem}[c.stem]
        self.patch_embed = stem(c.image_size, c.patch_size, c.in_channels, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        # Without distillation nothing is created here: same parameters, same random draws as before the option.
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.seq_len, c.dim))
        self.pos_drop = nn.Dropout(c.dropout)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            EncoderBlock(c.dim, c.heads, c.mlp_dim, c.dropout, drop_path=r, lsa=c.lsa) for r in rates
        )
        self.norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.head_dist = nn.Linear(c.dim, c.num_classes) if c.distilled else None
        self.distilled_training = c.distilled
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's and DeiT's initialisation: truncated normal (std 0.02) for linears and positions, zero biases.

        The original ViT code used Xavier-uniform linear weights instead; chapter 3 compares them.
        Convolutions (the patch projection, a convolutional stem) keep PyTorch's default
        initialisation, and an LSA temperature keeps its ``sqrt(head_dim)``. A distillation
        token starts like the positions (truncated normal, std 0.02), as in timm.
        """
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_distilled_training(self, enable: bool = True) -> None:
        """Whether training mode returns both heads' logits (``True``) or their average; as timm's method."""
        if self.head_dist is None:
            raise ValueError("this model has no distillation token; build it with ViTConfig(distilled=True).")
        self.distilled_training = bool(enable)

    def embed(self, images: Tensor) -> Tensor:
        """Tokens entering the first block: ``(B, C, H, W)`` -> ``(B, N + 1, D)`` (``N + 2`` if distilled)."""
        x = self.patch_embed(images)  # (B, N, D)
        prefix = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)  # (B, prefix + N, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, images: Tensor) -> Tensor:
        """Normalised token features after the last block: ``(B, C, H, W)`` -> ``(B, seq_len, D)``."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Class scores (logits) ``(B, num_classes)`` for ``images`` ``(B, C, H, W)``.

        A distilled model returns ``(cls_logits, dist_logits)`` in training mode with
        ``distilled_training`` on, and their average otherwise.
        """
        x = self.forward_features(images)
        logits = self.head(x[:, 0])  # classify from the CLS token
        if self.head_dist is None:
            return logits
        dist_logits = self.head_dist(x[:, 1])  # ... and from the distillation token
        if self.training and self.distilled_training:
            return logits, dist_logits
        return (logits + dist_logits) / 2

    def attention_maps(self, images: Tensor) -> list[Tensor]:
        """Every block's attention weights for a batch, through the explicit attention path.

        Call it in eval mode (``model.eval()``) to see the weights without dropout.

        Args:
            images: ``(B, C, H, W)``.

        Returns:
            A list of ``depth`` tensors of shape ``(B, heads, seq_len, seq_len)``;
            token 0 is the CLS token (token 1 the distillation token if ``distilled``), and
            row ``i`` is what token ``i`` attends to.
        """
        maps = []
        x = self.embed(images)
        for block in self.blocks:
            x, weights = block(x, return_weights=True)
            maps.append(weights)
        return maps


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def expected_num_parameters(config: ViTConfig) -> int:
    """The parameter count of ``VisionTransformer(config)`` from the formula, term by term.

    Patch embedding ``P*P*C*D + D``; CLS token ``D``; positions ``(N + 1) * D``;
    per block two LayerNorms ``4D``, ``qkv`` ``3D*D + 3D``, ``proj`` ``D*D + D``,
    MLP ``2*D*M + M + D``; final LayerNorm ``2D``; head ``D*K + K``.

    The small-data options change two terms: shifted patch tokenization has a LayerNorm and a
    linear layer on ``F = 5*P*P*C`` features, ``2F + F*D + D``; the convolutional stem has, per
    3x3 convolution ``c_in -> c_out``, ``9*c_in*c_out`` weights and ``2*c_out`` BatchNorm
    parameters, then a 1x1 convolution ``c_last*D + D``; LSA adds one temperature per block.
    Distillation adds a token ``D``, its position ``D`` and a second head ``D*K + K``.
    """
    c = config
    d, m = c.dim, c.mlp_dim
    if c.stem == "spt":
        f = 5 * c.patch_size**2 * c.in_channels
        patch = 2 * f + f * d + d
    elif c.stem == "conv":
        widths = [c.in_channels, *conv_stem_widths(c.patch_size, d)]
        patch = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:])) + widths[-1] * d + d
    else:
        patch = c.patch_size**2 * c.in_channels * d + d
    tokens = c.num_prefix_tokens * d + c.seq_len * d  # CLS (and distillation) token, positions
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * m + m + d) + int(c.lsa)
    heads = (1 + int(c.distilled)) * (d * c.num_classes + c.num_classes)
    return patch + tokens + c.depth * block + 2 * d + heads


def require_plain_vit(config: ViTConfig, what: str, *, distilled_ok: bool = False) -> None:
    """Refuse, in one sentence, a :class:`ViTConfig` that uses an option ``what`` does not compute.

    ``what`` names the consumer that only knows the plain ViT (e.g. ``"timm"``): one linear patch
    embedding, standard attention and a single CLS token. ``distilled_ok=True`` lets a
    distillation token through, for consumers that know DeiT's distilled ViT as well.

    Raises:
        ValueError: if ``config.stem != "patch"``, ``config.lsa`` is on, or ``config.distilled``
            is on without ``distilled_ok``.
    """
    used = ([f"stem={config.stem!r}"] if config.stem != "patch" else []) + (["lsa=True"] if config.lsa else [])
    lacks = "shifted patch tokenization, convolutional stem or locality self-attention"
    fix = "stem='patch' and lsa=False"
    if not distilled_ok:
        used += ["distilled=True"] if config.distilled else []
        lacks = "shifted patch tokenization, convolutional stem, locality self-attention or distillation token"
        fix = "stem='patch', lsa=False and distilled=False"
    if used:
        raise ValueError(f"{what} has no {lacks}, so it cannot take a ViTConfig with {' and '.join(used)}; use {fix}.")
