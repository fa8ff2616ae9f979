"""What a training step minimises: classification, DeiT distillation, or masked-image reconstruction.

The loop of :mod:`vitcourse.train` is the same for all three; an objective turns a batch into a
loss (and, when there are labels, the logits that accuracy is counted on) and scores a model on
a dataset:

* :class:`Classification` - cross-entropy with the labels (label smoothing, mixup and CutMix);
* :class:`Distillation` - DeiT's loss (:func:`vitcourse.distill.distillation_loss`) for a ViT with
  a distillation token, against a frozen teacher loaded from a course checkpoint;
* :class:`MaskedAutoencoding` - the MAE loss (:class:`vitcourse.mae.MAE`); no labels at all. Its
  validation masks are drawn from a fixed seed, so the score of a model does not depend on when
  it is measured.

:func:`build_objective` picks one from a :class:`~vitcourse.config.TrainConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig

__all__ = ["Classification", "Distillation", "MaskedAutoencoding", "build_objective", "evaluate_model", "load_teacher"]


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, batch_size: int = 500, device: torch.device | str = "cpu",
                   num_workers: int = 0, return_outputs: bool = False) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on ``dataset`` (eval mode, no augmentation).

    Returns:
        ``{"loss", "acc", "n"}``; with ``return_outputs=True`` also ``"logits"`` ``(n, K)`` and ``"labels"`` ``(n,)``.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    loss_sum, correct, n, all_logits, all_labels = 0.0, 0, 0, [], []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()  # (B, K)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += len(labels)
        if return_outputs:
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    model.train(was_training)
    result = {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "n": n}
    if return_outputs:
        result["logits"], result["labels"] = torch.cat(all_logits), torch.cat(all_labels)
    return result


class Classification:
    """Cross-entropy against the labels (class indices, or probabilities after mixup/CutMix)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.label_smoothing = cfg.label_smoothing

    def loss(self, net: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = net(images)  # (B, K)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing), logits

    def evaluate(self, model: nn.Module, dataset: Dataset, cfg: TrainConfig, device) -> dict:
        return evaluate_model(model, dataset, cfg.eval_batch_size, device, cfg.num_workers)


class Distillation(Classification):
    """DeiT's loss for a ViT with a distillation token: the class token learns the labels, the
    distillation token the frozen ``teacher``'s answers (its top class, or its softened
    distribution). Accuracy is counted on the two heads' average, as the model predicts at test time."""

    def __init__(self, cfg: TrainConfig, teacher: nn.Module) -> None:
        super().__init__(cfg)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind, self.alpha, self.tau = cfg.distill_kind, cfg.distill_alpha, cfg.distill_tau

    def loss(self, net: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        from .distill import distillation_loss

        cls_logits, dist_logits = net(images)  # each (B, K): the model is in training mode
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        if targets.ndim == 1 and self.label_smoothing:  # smoothing, as F.cross_entropy would do it
            k = cls_logits.shape[-1]
            targets = F.one_hot(targets, k).float() * (1 - self.label_smoothing) + self.label_smoothing / k
        loss = distillation_loss(cls_logits.float(), dist_logits.float(), targets, teacher_logits, kind=self.kind,
                                 alpha=self.alpha, tau=self.tau)
        return loss, (cls_logits + dist_logits) / 2


class MaskedAutoencoding:
    """The MAE loss of :class:`vitcourse.mae.MAE`: labels are never looked at. ``acc`` is not defined
    (``None``); the validation loss uses masks drawn from a fixed seed."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.mask_ratio = cfg.mask_ratio

    def loss(self, net: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, None]:
        loss, _, _ = net(images, mask_ratio=self.mask_ratio)
        return loss, None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, cfg: TrainConfig, device) -> dict:
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=device).manual_seed(0)  # the same masks at every evaluation
        loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                            generator=torch.Generator())
        loss_sum, n = 0.0, 0
        for images, _ in loader:
            loss, _, _ = model(images.to(device), mask_ratio=self.mask_ratio, generator=generator)
            loss_sum += loss.item() * len(images)
            n += len(images)
        model.train(was_training)
        return {"loss": loss_sum / max(n, 1), "acc": None, "n": n}


def load_teacher(cfg: TrainConfig, data) -> tuple[nn.Module, str]:
    """The frozen teacher of a distillation run and the SHA-256 of its weights (a resumed run checks it).

    The teacher must have been trained on the same kind of images as this run: the same classes in
    the same order, the same image size and the same normalisation; :class:`ValueError` (one
    sentence) if not.
    """
    from .checkpoint import load_model

    teacher, teacher_cfg, info = load_model(cfg.distill_from)
    where = f"the teacher {cfg.distill_from}"
    if teacher_cfg.objective != "classify" or (teacher_cfg.model == "vit" and teacher_cfg.vit.distilled):
        raise ValueError(f"{where} is not a plain classifier (it is a masked autoencoder or itself distilled); "
                         f"train a CNN or ViT on the labels first and pass that run.")
    if list(info["classes"]) != list(data.classes):
        raise ValueError(f"{where} knows the classes {', '.join(info['classes'][:5])}... but the data has "
                         f"{', '.join(data.classes[:5])}...; a teacher must be trained on the same classes, in order.")
    if teacher_cfg.image_size != cfg.image_size:
        raise ValueError(f"{where} takes {teacher_cfg.image_size}-pixel images but this run {cfg.image_size}-pixel "
                         f"ones; train the teacher at --image-size {cfg.image_size}.")
    stats = (tuple(info.get("mean") or ()), tuple(info.get("std") or ()))
    if stats != (tuple(data.mean), tuple(data.std)):
        raise ValueError(f"{where} saw images normalised with mean {stats[0]} and std {stats[1]}, this run's data "
                         f"{tuple(data.mean)} and {tuple(data.std)}; train the teacher on the same data source.")
    return teacher, info["weights_sha256"]


def build_objective(cfg: TrainConfig, device: torch.device | str = "cpu", teacher: nn.Module | None = None):
    """The objective ``cfg`` asks for; a distillation run needs its ``teacher`` (see
    :func:`vitcourse.checkpoint.load_model`)."""
    if cfg.objective == "mae":
        return MaskedAutoencoding(cfg)
    if cfg.distill_from is not None:
        if teacher is None:
            raise ValueError("a distillation run needs its teacher model; load it from cfg.distill_from.")
        return Distillation(cfg, teacher.to(device))
    return Classification(cfg)
