"""Exchange weights with timm, the field's reference ViT implementation.

``vitcourse.VisionTransformer`` uses timm's parameter names and shapes, so the
conversion is a plain ``load_state_dict(strict=True)`` in either direction;
this module builds the matching timm model and does the loading.
"""

from __future__ import annotations

from torch import nn

from .vit import ViTConfig, VisionTransformer

__all__ = ["timm_vit", "to_timm", "from_timm"]


def timm_vit(config: ViTConfig) -> nn.Module:
    """A ``timm.models.vision_transformer.VisionTransformer`` with the architecture of ``config``.

    timm computes the MLP width as ``int(dim * mlp_ratio)``; the ratio passed
    here is nudged by half a unit so that this gives exactly ``mlp_dim`` even
    when ``mlp_dim / dim`` has no exact binary representation.
    """
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError as err:  # pragma: no cover - timm is in requirements.txt
        raise ImportError("timm is not installed; run `pip install timm` to compare with it.") from err
    c = config
    model = TimmViT(
        img_size=c.image_size,
        patch_size=c.patch_size,
        in_chans=c.in_channels,
        num_classes=c.num_classes,
        embed_dim=c.dim,
        depth=c.depth,
        num_heads=c.heads,
        mlp_ratio=(c.mlp_dim + 0.5) / c.dim,
        qkv_bias=True,
        drop_rate=c.dropout,
        proj_drop_rate=c.dropout,
        drop_path_rate=c.drop_path,
    )
    hidden = model.blocks[0].mlp.fc1.out_features if c.depth else c.mlp_dim
    if hidden != c.mlp_dim:  # a ValueError, not an assert: `python -O` must not skip this check
        raise ValueError(f"timm built an MLP of width {hidden} for mlp_dim={c.mlp_dim}; "
                         f"this timm version rounds mlp_ratio differently, so pass a config timm can build.")
    return model


def to_timm(model: VisionTransformer) -> nn.Module:
    """A timm ViT holding a copy of ``model``'s weights (loaded with ``strict=True``)."""
    reference = timm_vit(model.config)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference.train(model.training)


def from_timm(timm_model: nn.Module, config: ViTConfig) -> VisionTransformer:
    """A :class:`VisionTransformer` holding a copy of a timm ViT's weights (``strict=True``).

    Raises:
        ValueError: if the timm model's weights do not fit ``config``, naming the first mismatch.
    """
    model = VisionTransformer(config)
    ours = model.state_dict()
    theirs = timm_model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    if missing or extra:
        raise ValueError(
            f"the timm model does not have this architecture: missing {missing[:3]}, unexpected "
            f"{extra[:3]}; build the timm model with vitcourse.timm_compat.timm_vit(config)."
        )
    for name, tensor in ours.items():
        if theirs[name].shape != tensor.shape:
            raise ValueError(
                f"parameter {name} has shape {tuple(theirs[name].shape)} in the timm model but "
                f"{tuple(tensor.shape)} for this config; the config does not match the timm model."
            )
    model.load_state_dict(theirs, strict=True)
    return model.train(timm_model.training)
