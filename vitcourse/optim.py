"""Optimizer parameter groups: the one rule the course uses for weight decay and head/body learning rates.

Weight decay applies to weight matrices and convolution kernels only (parameters with at least two
dimensions), never to biases, normalisation weights, the CLS token or the position embeddings (timm's
rule, and the ViT papers'). ``vitcourse train`` (:mod:`vitcourse.train`) and chapter 8
(:mod:`vitcourse.pretrained`) both build their optimizers with :func:`param_groups`. This module imports
nothing else of the course, so every module can import it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["HEAD_PREFIX", "NO_DECAY_NAMES", "decays", "param_groups"]

HEAD_PREFIX = "head."
"""Parameters whose name starts with this are the classifier head; every other one is the body."""

NO_DECAY_NAMES = ("cls_token", "pos_embed")
"""Parameters with at least two dimensions that are still never decayed (names end with one of these)."""


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether ``parameter`` (named ``name`` in ``model.named_parameters()``) gets weight decay.

    True for weight matrices ``(out, in)`` and kernels ``(out, in, kh, kw)``; False for anything with at most
    one dimension (biases, LayerNorm/BatchNorm weights, scalars) and for the CLS token ``(1, 1, D)`` and the
    position embeddings ``(1, 1 + N, D)``.
    """
    return parameter.ndim >= 2 and not name.endswith(NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 body_lr: float | None = None) -> list[dict]:
    """Optimizer groups of ``model``'s trainable parameters with the course's weight-decay rule (:func:`decays`).

    Args:
        model: any module; parameters with ``requires_grad=False`` are left out (a frozen body).
        weight_decay: the decay of the decayed group; the other group gets 0.
        lr: the learning rate written into every group (the head's when ``body_lr`` is given); ``None``
            writes none, so the optimizer's own ``lr`` applies.
        body_lr: when given, the parameters not named ``head.*`` learn at this rate instead.

    Returns:
        Without ``body_lr``: ``[decayed, not decayed]``. With it: ``[head decayed, head not decayed, body
        decayed, body not decayed]``, each with ``"name"`` ``"head"`` or ``"body"``. Every group has
        ``"params"`` (in ``named_parameters`` order) and ``"weight_decay"``; groups may be empty (pass them to
        ``torch.optim.AdamW`` as they are, or drop the empty ones).
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if decays(name, parameter) else no_decay).append((name, parameter))
    rate = {} if lr is None else {"lr": lr}
    if body_lr is None:
        return [{"params": [p for _, p in decay], "weight_decay": weight_decay, **rate},
                {"params": [p for _, p in no_decay], "weight_decay": 0.0, **rate}]
    groups = []
    for part, part_rate in (("head", lr), ("body", body_lr)):
        for members, decay_value in ((decay, weight_decay), (no_decay, 0.0)):
            mine = [p for name, p in members if name.startswith(HEAD_PREFIX) == (part == "head")]
            groups.append({"params": mine, "weight_decay": decay_value, "lr": part_rate, "name": part})
    return groups
