"""From a config to a network: the one place that knows which model a :class:`~vitcourse.config.TrainConfig` names."""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import TrainConfig
from .vit import VisionTransformer

__all__ = ["build_model"]


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The network named by ``cfg.model``, with ``num_classes`` outputs: ``(B, 3, S, S) -> (B, num_classes)``.

    With ``cfg.objective == "mae"`` it is the masked autoencoder of ``cfg.vit`` instead (no classes).
    """
    if cfg.objective == "mae":
        from .mae import MAE

        return MAE(cfg.vit, decoder_dim=cfg.mae_decoder_dim, decoder_depth=cfg.mae_decoder_depth,
                   norm_pix_loss=cfg.mae_norm_pix)
    if cfg.model == "vit":
        return VisionTransformer(dataclasses.replace(cfg.vit, num_classes=num_classes))
    if cfg.model == "cnn":
        from .cnn import SmallCNN

        return SmallCNN(num_classes, width=cfg.cnn_width)
    from .ultimus import VARIANTS  # imported lazily: chapter 6's module

    if cfg.model not in VARIANTS:
        raise ValueError(f"unknown model {cfg.model!r}; choose 'vit', 'cnn' or one of {', '.join(VARIANTS)}.")
    return VARIANTS[cfg.model](num_classes=num_classes)
