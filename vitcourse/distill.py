"""Knowledge distillation the DeiT way: a student ViT learns from labels and from a teacher.

DeiT (Touvron et al. 2021) gives the student a second learned token, the
*distillation token* (``ViTConfig(distilled=True)``). In training the model
returns two sets of logits: the CLS token's, trained on the labels, and the
distillation token's, trained to agree with a teacher network (often a CNN,
whose inductive biases the ViT lacks on small data). The total loss mixes the two::

    loss = (1 - alpha) * CE(cls_logits, labels) + alpha * distill(dist_logits, teacher_logits)

Two choices of ``distill``:

* ``"hard"``: cross-entropy with the teacher's top class as if it were a label,
  ``CE(dist_logits, argmax(teacher_logits))``. The DeiT paper's best variant, with
  ``alpha = 0.5`` (the two terms weigh the same);
* ``"soft"``: Hinton's distillation, the KL divergence between the teacher's and the
  student's softened distributions ``softmax(logits / tau)``, scaled by ``tau ** 2`` so its
  gradients keep their size as the temperature ``tau`` grows.

The labels may be class indices or probability vectors (mixup and CutMix make the latter).
The teacher is never trained here: its logits are detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KINDS", "distillation_loss", "DistillationLoss"]

KINDS = ("hard", "soft")
"""The distillation terms :func:`distillation_loss` knows."""


def _check(cls_logits: Tensor, dist_logits: Tensor, labels: Tensor, teacher_logits: Tensor, kind: str,
           alpha: float, tau: float) -> None:
    """Raise a one-sentence ValueError for the first bad argument of :func:`distillation_loss`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha weighs the distillation term against the label term and must be in [0, 1], "
                         f"got {alpha!r}.")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"the temperature tau must be a positive number, got {tau!r}.")
    if cls_logits.ndim != 2:
        raise ValueError(f"cls_logits must have shape (B, num_classes), got {tuple(cls_logits.shape)}.")
    for name, tensor in (("dist_logits", dist_logits), ("teacher_logits", teacher_logits)):
        if tensor.shape != cls_logits.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but cls_logits has "
                             f"{tuple(cls_logits.shape)}; student and teacher must score the same classes.")
    batch, classes = cls_logits.shape
    if labels.shape == (batch,):
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError("labels of shape (B,) must be integer class indices; pass probabilities as (B, K).")
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"class indices must lie in [0, {classes - 1}], got labels from {int(labels.min())} "
                             f"to {int(labels.max())}.")
    elif labels.shape != (batch, classes) or not labels.is_floating_point():
        raise ValueError(f"labels must be class indices of shape ({batch},) or probabilities of shape "
                         f"({batch}, {classes}), got a {labels.dtype} tensor of shape {tuple(labels.shape)}.")


def distillation_loss(cls_logits: Tensor, dist_logits: Tensor, labels: Tensor, teacher_logits: Tensor,
                      kind: str = "hard", alpha: float = 0.5, tau: float = 1.0) -> Tensor:
    """DeiT's training loss for a distilled ViT: labels for the CLS head, the teacher for the other.

    Args:
        cls_logits: ``(B, K)``, the student's CLS-token head.
        dist_logits: ``(B, K)``, the student's distillation-token head.
        labels: class indices ``(B,)`` or target probabilities ``(B, K)`` (mixup, CutMix,
            label smoothing); either way the label term is the mean cross-entropy.
        teacher_logits: ``(B, K)``, the teacher's scores for the same (augmented) images; detached.
        kind: ``"hard"`` (cross-entropy with the teacher's argmax) or ``"soft"`` (temperature KL).
        alpha: weight of the distillation term; the label term gets ``1 - alpha``.
        tau: the soft variant's temperature (the hard variant ignores it).

    Returns:
        A scalar: ``(1 - alpha) * label_term + alpha * distillation_term``. The soft term is
        ``tau**2 * sum KL(teacher_tau || student_tau) / (B * K)``: summed over the batch and the
        classes, then divided by the number of logits, the normalisation of DeiT's reference code
        (it is ``1/K`` times the usual per-image KL average).

    Raises:
        ValueError: one sentence naming a shape mismatch, an unknown ``kind``, ``alpha`` outside
            ``[0, 1]`` or ``tau <= 0``.
    """
    _check(cls_logits, dist_logits, labels, teacher_logits, kind, alpha, tau)
    teacher_logits = teacher_logits.detach()
    label_term = F.cross_entropy(cls_logits, labels)  # indices or probabilities, both averaged over the batch
    if kind == "hard":
        distill_term = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    else:
        student = F.log_softmax(dist_logits / tau, dim=1)
        teacher = F.log_softmax(teacher_logits / tau, dim=1)
        # KL(teacher || student) given two log-distributions: sum of p_t * (log p_t - log p_s).
        kl = F.kl_div(student, teacher, reduction="sum", log_target=True)
        distill_term = kl * tau**2 / dist_logits.numel()
    return (1 - alpha) * label_term + alpha * distill_term


class DistillationLoss(nn.Module):
    """:func:`distillation_loss` with its teacher: ``criterion(images, outputs, labels)``.

    The teacher scores the same ``images`` the student saw, without gradients. Put it in
    eval mode yourself (``teacher.eval()``): this module never changes its mode.

    Args:
        teacher: any module mapping ``(B, C, H, W)`` to logits ``(B, K)``.
        kind, alpha, tau: as in :func:`distillation_loss`; checked here, once.
    """

    def __init__(self, teacher: nn.Module, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        probe = torch.zeros(1, 1)
        _check(probe, probe, torch.zeros(1, dtype=torch.long), probe, kind, alpha, tau)
        self.teacher, self.kind, self.alpha, self.tau = teacher, kind, alpha, tau

    def forward(self, images: Tensor, outputs: tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        """The loss for a student's ``outputs = (cls_logits, dist_logits)`` on ``images``."""
        if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
            raise ValueError("outputs must be the pair (cls_logits, dist_logits) a distilled ViT returns in training "
                             "mode; call model.train() and model.set_distilled_training(True).")
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return distillation_loss(*outputs, labels, teacher_logits, self.kind, self.alpha, self.tau)
