"""Masked autoencoders (He et al. 2022): pretrain a ViT encoder without a single label.

Hide most of an image's patches, show the encoder the rest, and ask a small
decoder to paint the hidden ones back. The task needs no labels, and with 75%
of the patches hidden it cannot be solved by copying neighbours: the encoder has
to learn what images look like. Afterwards the decoder is thrown away and the
encoder starts a classifier (:meth:`MAE.to_vit`)::

    images (B, C, H, W)
      -> PatchEmbed, + positions          (B, N, D)
      -> random_masking: keep N_keep      (B, N_keep, D)     mask (B, N), ids_restore (B, N)
      -> prepend CLS, encoder blocks, norm (B, 1 + N_keep, D)
      -> decoder_embed                    (B, 1 + N_keep, D_dec)
      -> append N - N_keep mask tokens, unshuffle with ids_restore, + positions
      -> decoder blocks, norm, linear     (B, N, P*P*C)      one row of pixels per patch
      -> mean squared error on the masked patches only

The encoder sees only the kept quarter of the patches, which is what makes MAE
cheap: attention costs grow with the square of the token count.

Positions are the fixed 2D sine-cosine embedding of the MAE paper, for the encoder
and the decoder: nothing to learn, and every patch, kept or masked, has one.
The CLS token's position is zero. The encoder reuses the course's
:class:`~vitcourse.patches.PatchEmbed` and :class:`~vitcourse.encoder.EncoderBlock`
with the names of :class:`~vitcourse.VisionTransformer`, so its weights load into one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from .encoder import LAYER_NORM_EPS, EncoderBlock
from .patches import PatchEmbed, image_to_patches, patches_to_image
from .vit import VisionTransformer, ViTConfig, require_plain_vit

__all__ = ["random_masking", "patchify", "unpatchify", "sincos_pos_embed", "MAE", "ENCODER_PREFIXES"]

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
"""The ``state_dict`` names an :class:`MAE` shares with a :class:`~vitcourse.VisionTransformer`."""

NORM_PIX_EPS = 1e-6
"""Added to each patch's pixel variance before dividing by its square root (``norm_pix_loss``)."""


def random_masking(tokens: Tensor, mask_ratio: float, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of each image's tokens, a different one per image.

    Each token draws a uniform number; sorting them shuffles the tokens, and the first
    ``int(N * (1 - mask_ratio))`` of the shuffled order are kept.

    Args:
        tokens: ``(B, N, D)``.
        mask_ratio: the fraction of tokens to hide, in ``[0, 1)``.
        generator: a ``torch.Generator`` for reproducible masks (the global one otherwise).

    Returns:
        ``visible`` ``(B, N_keep, D)``, the kept tokens in shuffled order; ``mask`` ``(B, N)``,
        1 for a hidden token and 0 for a kept one, in the original token order; ``ids_restore``
        ``(B, N)``, the inverse permutation: ``shuffled[:, ids_restore]`` is the original order.

    Raises:
        ValueError: if ``tokens`` is not 3-D, ``mask_ratio`` is outside ``[0, 1)`` or keeps no token.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (B, N, D), got {tuple(tokens.shape)}.")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio is the fraction of patches to hide and must be in [0, 1), got {mask_ratio!r}.")
    b, n, d = tokens.shape
    keep = int(n * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps int({n} * (1 - {mask_ratio})) = int({n * (1 - mask_ratio)!r}) "
                         f"= 0 of {n} patches; lower it so at least one patch stays visible.")
    noise = torch.rand(b, n, generator=generator, device=tokens.device)
    ids_shuffle = noise.argsort(dim=1)  # a random permutation per image
    ids_restore = ids_shuffle.argsort(dim=1)  # its inverse
    ids_keep = ids_shuffle[:, :keep]
    visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, N_keep, D)
    mask = torch.ones(b, n, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0  # in shuffled order: the first N_keep are kept ...
    return visible, mask.gather(1, ids_restore), ids_restore  # ... then put back in the original order


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """The reconstruction targets: ``(B, C, H, W)`` -> ``(B, N, P*P*C)`` in PatchEmbed's token order."""
    return image_to_patches(images, patch_size)


def unpatchify(patches: Tensor, patch_size: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify` for square images: ``(B, N, P*P*C)`` -> ``(B, C, H, W)``."""
    side = math.isqrt(patches.shape[1]) if patches.ndim == 3 else 0
    if patches.ndim != 3 or side * side != patches.shape[1]:
        raise ValueError(f"patches must have shape (B, N, P*P*C) with N a square number of patches, got "
                         f"{tuple(patches.shape)}.")
    return patches_to_image(patches, patch_size, side * patch_size, channels)


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2D sine-cosine positions for a ``grid x grid`` patch grid, CLS first: ``(1, 1 + grid**2, dim)``.

    The first half of the channels encodes the patch's row, the second half its column. Each
    half holds ``sin`` and ``cos`` of the coordinate at ``dim / 4`` frequencies falling
    geometrically from 1 to 1/10000, as in the Transformer's 1D embedding. The CLS row is zero.
    """
    if dim % 4:
        raise ValueError(f"the 2D sine-cosine embedding splits dim into 4 equal parts, so dim must be a multiple "
                         f"of 4, got {dim}.")
    freqs = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = coords.repeat_interleave(grid), coords.repeat(grid)  # row-major, like the patches

    def encode(x: Tensor) -> Tensor:  # (N,) -> (N, dim/2)
        angles = x[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1)  # (N, dim)
    return torch.cat([torch.zeros(1, dim, dtype=table.dtype), table]).float().unsqueeze(0)


def _blocks(dim: int, depth: int, heads: int, mlp_dim: int, dropout: float = 0.0, drop_path: float = 0.0
            ) -> nn.ModuleList:
    """``depth`` course encoder blocks with stochastic depth rising linearly to ``drop_path``."""
    return nn.ModuleList(EncoderBlock(dim, heads, mlp_dim, dropout, drop_path * i / max(depth - 1, 1))
                         for i in range(depth))


class MAE(nn.Module):
    """A masked autoencoder whose encoder is the course's ViT (without its head).

    Args:
        config: the encoder's :class:`~vitcourse.ViTConfig`; plain ViT only (no SPT, conv stem,
            LSA or distillation token), and ``dim`` a multiple of 4 for the positions.
            ``num_classes`` is unused until :meth:`to_vit`.
        decoder_dim, decoder_depth, decoder_heads: the decoder's width, blocks and heads. The
            paper's decoder is narrow and shallow next to the encoder; so are these defaults.
        norm_pix_loss: predict each patch's pixels normalised by the patch's own mean and
            standard deviation (the paper's better-performing target).

    Shapes:
        ``forward``: ``(B, C, H, W)`` -> ``(loss, pred (B, N, P*P*C), mask (B, N))``.
    """

    def __init__(self, config: ViTConfig, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
                 norm_pix_loss: bool = False) -> None:
        super().__init__()
        require_plain_vit(config, "vitcourse.mae.MAE")
        for name, value, low in (("decoder_dim", decoder_dim, 1), ("decoder_depth", decoder_depth, 0),
                                 ("decoder_heads", decoder_heads, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}.")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim={decoder_dim} is not divisible by decoder_heads={decoder_heads}.")
        patch_pixels = config.patch_size**2 * config.in_channels
        if norm_pix_loss and patch_pixels < 2:
            raise ValueError("norm_pix_loss needs at least two pixel values per patch to take their variance.")
        c = self.config = config
        self.norm_pix_loss = norm_pix_loss
        grid = c.image_size // c.patch_size
        # Encoder: the VisionTransformer's modules under the same names.
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_channels, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.register_buffer("pos_embed", sincos_pos_embed(c.dim, grid))  # (1, N + 1, D), fixed
        self.pos_drop = nn.Dropout(c.dropout)
        self.blocks = _blocks(c.dim, c.depth, c.heads, c.mlp_dim, c.dropout, c.drop_path)
        self.norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        # Decoder: sees every position, knows the kept ones' features and a shared mask token for the rest.
        self.decoder_embed = nn.Linear(c.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid))  # (1, N + 1, D_dec)
        self.decoder_blocks = _blocks(decoder_dim, decoder_depth, decoder_heads, 4 * decoder_dim)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_dim, patch_pixels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's initialisation: Xavier-uniform linears (the patch projection seen as one), zero biases,
        unit LayerNorms, and the CLS and mask tokens drawn from N(0, 0.02**2)."""
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.config.dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_encoder(self, images: Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches: ``latent`` ``(B, 1 + N_keep, D)`` (CLS first), ``mask``, ``ids_restore``.

        The patch tokens of ``latent`` come in the shuffled order of :func:`random_masking`;
        ``latent[:, 1:].gather(1, ...ids_restore)`` puts them back when ``mask_ratio=0``.
        """
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # (B, N, D): positions before shuffling
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)  # (B, N_keep, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1))  # (B, 1 + N_keep, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch's pixels ``(B, N, P*P*C)`` from the encoded visible ones."""
        x = self.decoder_embed(latent)  # (B, 1 + N_keep, D_dec)
        b, n = ids_restore.shape
        hidden = self.mask_token.expand(b, n + 1 - x.shape[1], -1)  # one shared token per hidden patch
        patches = torch.cat([x[:, 1:], hidden], dim=1)  # (B, N, D_dec), still in shuffled order
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # original order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # (B, N + 1, D_dec)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop the CLS row

    def target(self, images: Tensor) -> Tensor:
        """What the decoder should output: the patches' pixels ``(B, N, P*P*C)``, each patch normalised
        to zero mean and unit variance (``var + 1e-6``, unbiased variance) if ``norm_pix_loss``."""
        target = patchify(images, self.config.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
        return target

    def reconstruction_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over the hidden patches only (``mask == 1``).

        Kept patches do not count: copying what the encoder saw teaches nothing.
        """
        target = self.target(images)
        if pred.shape != target.shape or mask.shape != target.shape[:2]:
            raise ValueError(f"pred must have shape {tuple(target.shape)} and mask {tuple(target.shape[:2])}, got "
                             f"{tuple(pred.shape)} and {tuple(mask.shape)}.")
        if not mask.any():
            raise ValueError("no patch is masked, so there is nothing to reconstruct; use a mask_ratio above 0.")
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Mask, encode, decode and score: ``(loss, pred (B, N, P*P*C), mask (B, N))``."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.reconstruction_loss(images, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights under :class:`~vitcourse.VisionTransformer`'s names (every one but the head)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)}

    def to_vit(self, num_classes: int | None = None) -> VisionTransformer:
        """A :class:`~vitcourse.VisionTransformer` of this config starting from the pretrained encoder.

        Patch embedding, CLS token, positions (now a learned parameter starting at the sine-cosine
        values), blocks and final norm are copied; the head is freshly initialised with
        ``num_classes`` outputs (``config.num_classes`` by default), ready for a fine-tune or a
        linear probe on the CLS token's features.
        """
        config = self.config if num_classes is None else dataclasses.replace(self.config, num_classes=num_classes)
        vit = VisionTransformer(config)
        missing, unexpected = vit.load_state_dict(self.encoder_state_dict(), strict=False)
        if set(missing) != {"head.weight", "head.bias"} or unexpected:  # a ValueError: `python -O` keeps it
            raise ValueError(f"the encoder did not fit the ViT: missing {missing}, unexpected {unexpected}.")
        return vit.train(self.training)
