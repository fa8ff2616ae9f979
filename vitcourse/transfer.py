"""Chapter 8's experiment: a linear probe, fine-tuning and training from scratch, compared fairly.

* :func:`freeze_all_but_head` and :func:`param_groups` - a linear probe, and fine-tuning with a
  learning rate for the body and one for the head (weight decay by :mod:`vitcourse.optim`'s rule);
* :func:`make_photo_folder` and :func:`fit` - an offline image folder made of random crops of
  scikit-image's photographs, and a short training loop (optionally warmup + cosine) that records its history;
* :func:`synthetic_task`, :func:`search_and_repeat`, :func:`compare_settings` and
  :func:`comparison_text` - the three settings on held-out images, each with the same schedule,
  learning-rate search and seeds, and the sentence their verdicts choose.

Loading and adapting the checkpoint itself is :mod:`vitcourse.pretrained`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import VisionTransformer

__all__ = ["freeze_all_but_head", "param_groups", "PHOTOS", "make_photo_folder", "fit", "warmup_cosine", "accuracy",
           "SETTINGS", "synthetic_task", "SettingRun", "search_and_repeat", "PAIRS", "compare_settings",
           "comparison_text"]


def freeze_all_but_head(model: VisionTransformer) -> list[str]:
    """Turn ``model`` into a linear probe: only ``head.weight`` ``(K, D)`` and ``head.bias`` ``(K,)`` learn.

    Every other parameter gets ``requires_grad=False``, so the optimizer of the remaining
    parameters trains a linear classifier on the frozen CLS features ``(B, D)``. The features stay
    fixed only if nothing random runs in training mode: use dropout and drop path 0 (as
    :func:`config_from_timm` does) or keep the model in eval mode.

    Returns:
        The names of the parameters left trainable.
    """
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("head."))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


def param_groups(model: nn.Module, body_lr: float, head_lr: float, weight_decay: float = 0.05
                 ) -> list[dict]:
    """Optimizer groups for fine-tuning: the head at ``head_lr``, everything else at ``body_lr``.

    The course's one rule (:func:`vitcourse.optim.param_groups`, which ``vitcourse train`` uses too):
    weight decay ``weight_decay`` on weight matrices and kernels only, 0 on biases, norms, the CLS
    token and the position embeddings. The head is every trainable parameter whose name starts with
    ``head.`` (for a :class:`VisionTransformer`, the ``(K, D)`` weight and ``(K,)`` bias). Frozen
    parameters are left out, and so are groups left empty (a linear probe has only the head's two).

    Returns:
        Up to four groups, in the order head decayed, head not decayed, body decayed, body not decayed;
        each has ``"name"`` (``"head"`` or ``"body"``), ``"params"``, ``"lr"`` and ``"weight_decay"``.
        Pass the list to ``torch.optim.AdamW``.
    """
    from .optim import param_groups as groups_of

    return [g for g in groups_of(model, weight_decay, lr=head_lr, body_lr=body_lr) if g["params"]]


PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
"""The scikit-image photographs :func:`vitcourse.utils.sample_image` knows, one class each here."""


def make_photo_folder(root: str | os.PathLike, per_class: int, size: int, seed: int = 0,
                      photos: tuple[str, ...] = PHOTOS) -> Path:
    """An image folder ``root/<photo>/<k>.png`` of random crops of scikit-image's photographs.

    Each crop covers 10% to 50% of its photograph's area (random aspect ratio 3/4 to 4/3),
    is flipped left-right with probability 1/2, has its brightness scaled by a factor in
    ``[0.7, 1.3]`` and is resized to ``size x size``. This is the ``<folder>/<class>/<image>``
    layout chapter 5's ``--data`` option reads; here it stands in for a reader's own images,
    offline. Two calls with the same arguments write the same pixels.

    Returns:
        ``Path(root)``.
    """
    from PIL import Image
    from torchvision.transforms import v2

    from .utils import sample_image

    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    crop = v2.RandomResizedCrop(size, scale=(0.1, 0.5), antialias=True)
    for label in photos:
        photo = sample_image(label, size=None)  # (3, H, W) in [0, 1]
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            top, left, h, w = _crop_box(crop, photo, generator)
            image = v2.functional.resized_crop(photo, top, left, h, w, [size, size], antialias=True)
            if torch.rand((), generator=generator) < 0.5:
                image = image.flip(-1)
            image = (image * (0.7 + 0.6 * torch.rand((), generator=generator))).clamp(0, 1)
            array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(array).save(root / label / f"{k:03d}.png")
    return root


def _crop_box(crop, photo: Tensor, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A random-resized-crop box (top, left, h, w) drawn with ``generator`` (torchvision draws globally)."""
    _, height, width = photo.shape
    area = height * width
    for _ in range(20):
        target = area * (crop.scale[0] + (crop.scale[1] - crop.scale[0]) * float(torch.rand((), generator=generator)))
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand((), generator=generator))
        ratio = math.exp(log_ratio)
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor] | None, steps: int, batch_size: int = 16, eval_every: int = 5, seed: int = 0,
        warmup_steps: int | None = None) -> list[dict]:
    """Train ``model`` for ``steps`` steps of cross-entropy on in-memory tensors; record the history.

    Batches are drawn without replacement from a seeded permutation of the training set (a new
    permutation each epoch). Every ``eval_every`` steps and after the last one, the model is put
    in eval mode and scored on the whole validation set.

    Args:
        train, val: ``(images (B, C, H, W), labels (B,))`` each; ``val`` may be ``None`` (no scoring).
        warmup_steps: ``None`` keeps every group's learning rate constant; a number ``w`` multiplies
            it by ``(t + 1) / w`` in the first ``w`` steps and then by a cosine from 1 down to 0 over
            the remaining steps (:func:`warmup_cosine`).

    Returns:
        One dict per evaluation: ``step``, ``train_loss`` (mean over the steps since the last
        evaluation) and, with ``val``, ``val_loss`` and ``val_acc``.
    """
    images, labels = train
    scheduler = None
    if warmup_steps is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup_steps))
    generator = torch.Generator().manual_seed(seed)
    order, cursor, history, losses = torch.randperm(len(images), generator=generator), 0, [], []
    for step in range(1, steps + 1):
        if cursor + batch_size > len(images):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor: cursor + batch_size]
        cursor += batch_size
        model.train()
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            row = {"step": step, "train_loss": sum(losses) / len(losses)}
            if val is not None:
                model.eval()
                with torch.no_grad():
                    logits = model(val[0])
                row.update(val_loss=float(F.cross_entropy(logits, val[1])),
                           val_acc=float((logits.argmax(-1) == val[1]).float().mean()))
            history.append(row)
            losses = []
    return history


def warmup_cosine(steps: int, warmup_steps: int):
    """The factor ``f(t)`` that multiplies the peak learning rate at step ``t = 0, 1, ..., steps - 1``.

    ``(t + 1) / warmup_steps`` during the warmup, then ``(1 + cos(pi * u)) / 2`` with ``u`` going from 0
    to 1 over the other steps, so the last step's rate is small but not 0 (``torch.optim.lr_scheduler.
    LambdaLR`` takes the function as it is).
    """
    if steps < 1 or not 0 <= warmup_steps <= steps:
        raise ValueError(f"need steps >= 1 and 0 <= warmup_steps <= steps, got {steps} and {warmup_steps}.")

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (t - warmup_steps + 1) / (steps - warmup_steps + 1)))

    return factor


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """The share of ``images`` ``(B, C, H, W)`` (or features ``(B, D)``) whose top class is ``labels`` ``(B,)``.

    The model is put in eval mode and run without gradients, ``batch_size`` images at a time.
    """
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start: start + batch_size])
            right += int((logits.argmax(-1) == labels[start: start + batch_size]).sum())
    return right / len(images)


# --------------------------------------------------------------------------- probe, fine-tune, scratch

SETTINGS = ("linear probe", "fine-tuning", "from scratch")
"""The three ways chapter 8 trains on a new task, in the order its tables list them."""


def synthetic_task(n_train: int, n_val: int, n_test: int, image_size: int, mean, std, seed: int = 0
                   ) -> dict[str, tuple[Tensor, Tensor]]:
    """Training, validation and test images of the synthetic stand-in (:func:`vitcourse.data.make_synthetic`).

    The three splits are independent draws (different seeds), so every validation and test image is a
    new scene: another shape of the same kind at another place, size and colour, on another background.
    Pixels are normalised per channel with ``mean, std`` (a checkpoint's statistics).

    Returns:
        ``{"train": (images (n_train, 3, S, S), labels (n_train,)), "val": ..., "test": ...}`` with
        ``S = image_size``; labels are the class indices of :data:`vitcourse.data.SYNTHETIC_CLASSES`.
    """
    from .data import make_synthetic

    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    task = {}
    for k, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        images, labels = make_synthetic(n, seed=1000 * (seed + 1) + k, image_size=image_size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S) in [0, 1]
        task[split] = ((x - mean_t) / std_t, torch.from_numpy(labels))
    return task


@dataclass
class SettingRun:
    """One training setting after its learning-rate search and its repeats (:func:`search_and_repeat`).

    Attributes:
        name: e.g. ``"fine-tuning"``.
        lrs: the learning rates searched, with ``search_val`` the validation accuracy each reached
            (first seed).
        lr: the rate picked (best validation accuracy; the smaller rate on a tie).
        seeds, val_accs, test_accs: the seeds run at ``lr`` and the accuracy of each.
        losses: per seed, the mean training loss of every ``loss_every`` steps at ``lr``.
        seconds: wall-clock time of the whole search and repeats.
    """

    name: str
    lrs: tuple[float, ...]
    search_val: tuple[float, ...]
    lr: float
    seeds: tuple[int, ...]
    val_accs: tuple[float, ...]
    test_accs: tuple[float, ...]
    losses: tuple[tuple[float, ...], ...]
    seconds: float


def search_and_repeat(name: str, build, task: dict[str, tuple[Tensor, Tensor]], lrs, seeds, *, steps: int,
                      batch_size: int, warmup_steps: int, weight_decay: float = 0.05, loss_every: int = 1
                      ) -> SettingRun:
    """Pick a learning rate on validation with the first seed, then train the other seeds at it.

    Every run is AdamW on :func:`vitcourse.optim.param_groups` (decay on matrices only) with the same
    schedule: ``steps`` steps of ``batch_size``, linear warmup for ``warmup_steps``, then cosine
    (:func:`fit`). The validation split picks the rate; the test split is scored only at the rate picked.

    Args:
        build: ``build(seed)`` returns a fresh model to train (a head on cached features, or a whole ViT);
            it is called right after ``torch.manual_seed(seed)``, so a randomly initialised model differs by seed.
        task: ``{"train" | "val" | "test": (inputs, labels)}`` as :func:`synthetic_task` returns.
        lrs: the peak learning rates to try; seeds: at least one seed, the first used for the search.

    Returns:
        A :class:`SettingRun`.
    """
    from .optim import param_groups as groups_of

    lrs, seeds = tuple(float(v) for v in lrs), tuple(int(v) for v in seeds)
    if not lrs or not seeds:
        raise ValueError("search_and_repeat needs at least one learning rate and one seed.")
    start = time.perf_counter()

    def one(lr: float, seed: int):
        torch.manual_seed(seed)
        model = build(seed)
        optimizer = torch.optim.AdamW([g for g in groups_of(model, weight_decay, lr=lr) if g["params"]])
        history = fit(model, optimizer, task["train"], None, steps=steps, batch_size=batch_size,
                      eval_every=loss_every, seed=seed, warmup_steps=warmup_steps)
        return model, tuple(h["train_loss"] for h in history), accuracy(model, *task["val"])

    search = [one(lr, seeds[0]) for lr in lrs]
    best = max(range(len(lrs)), key=lambda i: (search[i][2], -lrs[i]))
    runs = [search[best]] + [one(lrs[best], seed) for seed in seeds[1:]]
    test_accs = tuple(accuracy(model, *task["test"]) for model, _, _ in runs)
    return SettingRun(name=name, lrs=lrs, search_val=tuple(acc for _, _, acc in search), lr=lrs[best],
                      seeds=seeds, val_accs=tuple(acc for _, _, acc in runs), test_accs=test_accs,
                      losses=tuple(losses for _, losses, _ in runs), seconds=time.perf_counter() - start)


PAIRS = {"finetune_vs_scratch": ("fine-tuning", "from scratch"),
         "probe_vs_scratch": ("linear probe", "from scratch"),
         "finetune_vs_probe": ("fine-tuning", "linear probe")}
"""The comparisons chapter 8 draws, each ``(a, b)`` for :func:`vitcourse.stats.compare` ``(a, b)``."""


def compare_settings(runs: dict[str, SettingRun], test_labels: Tensor, num_classes: int) -> dict:
    """Estimates with seed-aware standard errors, verdicts and noise floors for the three settings.

    Returns:
        ``{"estimates": {setting: Estimate}, "verdicts": {pair: "higher" | "lower" | "noise"},
        "floors": {pair: smallest difference counted as real}, "chance": the chance level,
        "probe_above_chance": bool}``, with the pairs of :data:`PAIRS`.
    """
    from . import stats

    n_test = len(test_labels)
    estimates = {name: stats.seed_estimate(run.test_accs, n_test) for name, run in runs.items()}
    verdicts, floors = {}, {}
    for pair, (a, b) in PAIRS.items():
        verdicts[pair] = stats.compare(estimates[a], estimates[b])
        floors[pair] = stats.noise_floor(estimates[a], estimates[b])
    chance = stats.chance_level(test_labels.tolist(), num_classes)
    return {"estimates": estimates, "verdicts": verdicts, "floors": floors, "chance": chance,
            "probe_above_chance": estimates["linear probe"].mean > chance}


_CHANCE_TEXT = {
    (True, True): "The linear probe on the checkpoint's frozen features clears the chance level.",
    (True, False): "The linear probe on the checkpoint's frozen features does not clear the chance level.",
    (False, True): ("The linear probe on random features clears the chance level, so random features carry a "
                    "little information about these classes."),
    (False, False): ("The linear probe on random features does not clear the chance level: random features say "
                     "nothing measurable about these classes."),
}

_PAIR_TEXT = {
    (True, "finetune_vs_scratch", "higher"): (
        "Fine-tuning the checkpoint ends above training from scratch by more than the noise floor. The two differ "
        "only in their starting weights (same architecture, schedule and learning-rate search), so this gap is "
        "what the pretrained weights bought on this task and budget."),
    (True, "finetune_vs_scratch", "noise"): (
        "Fine-tuning the checkpoint and training from scratch end within the noise floor of each other: on this "
        "task and budget the pretrained weights bought nothing that three seeds can show."),
    (True, "finetune_vs_scratch", "lower"): (
        "Fine-tuning the checkpoint ends below training from scratch by more than the noise floor: on this task "
        "and budget, starting from the pretrained weights cost accuracy."),
    (True, "probe_vs_scratch", "higher"): (
        "The linear probe, which trains only a head on the frozen features, also ends above training the whole "
        "network from scratch: features learned on ImageNet separate these classes better than this short "
        "training learns to."),
    (True, "probe_vs_scratch", "noise"): (
        "The linear probe on the frozen features and training from scratch cannot be told apart."),
    (True, "probe_vs_scratch", "lower"): (
        "The linear probe ends below training from scratch: the frozen ImageNet features alone separate these "
        "classes less well than a network trained on them."),
    (True, "finetune_vs_probe", "higher"): (
        "Fine-tuning ends above the probe: training the body as well added accuracy to the frozen features."),
    (True, "finetune_vs_probe", "noise"): (
        "Fine-tuning and the probe cannot be told apart: training the body added nothing measurable to the "
        "frozen features."),
    (True, "finetune_vs_probe", "lower"): (
        "Fine-tuning ends below the probe: training the body as well cost accuracy at this budget."),
    (False, "finetune_vs_scratch", "higher"): (
        "Fine-tuning the random-weight network ends above training from scratch by more than the noise floor. "
        "Neither starts from learned features: the two runs differ only in which random weights they start "
        "from (timm's initialisation against chapter 4's), so that is what the gap measures, not pretraining."),
    (False, "finetune_vs_scratch", "noise"): (
        "Fine-tuning the random-weight network and training from scratch end within the noise floor of each "
        "other: without pretrained weights, fine-tuning buys nothing."),
    (False, "finetune_vs_scratch", "lower"): (
        "Fine-tuning the random-weight network ends below training from scratch by more than the noise floor. "
        "Neither starts from learned features: the two runs differ only in which random weights they start "
        "from (timm's initialisation against chapter 4's), so that is what the gap measures, not pretraining."),
    (False, "probe_vs_scratch", "higher"): (
        "The linear probe on random features ends above training from scratch: in this short budget, training "
        "the whole network did worse than a linear read-out of random numbers, which says nothing in favour of "
        "pretraining."),
    (False, "probe_vs_scratch", "noise"): (
        "The linear probe on random features and training from scratch cannot be told apart."),
    (False, "probe_vs_scratch", "lower"): (
        "The linear probe on random features ends below training from scratch: the trained network learned "
        "something that random features do not offer."),
    (False, "finetune_vs_probe", "higher"): (
        "Fine-tuning ends above the probe: training the random body learned something its random features "
        "did not offer."),
    (False, "finetune_vs_probe", "noise"): (
        "Fine-tuning and the probe cannot be told apart."),
    (False, "finetune_vs_probe", "lower"): (
        "Fine-tuning ends below the probe at this budget, although both start from the same random body."),
}


def comparison_text(pretrained: bool, verdicts: dict[str, str], probe_above_chance: bool) -> str:
    """The paragraph chapter 8 prints about its probe / fine-tune / scratch comparison.

    Args:
        pretrained: whether the checkpoint's real weights were loaded (False: random stand-in weights,
            and then no sentence credits learned features).
        verdicts: ``{pair: "higher" | "lower" | "noise"}`` for every pair of :data:`PAIRS`
            (from :func:`compare_settings`).
        probe_above_chance: whether the probe's mean accuracy clears the chance level.
    """
    missing = set(PAIRS) - set(verdicts)
    if missing:
        raise ValueError(f"comparison_text needs a verdict for {', '.join(sorted(missing))}.")
    parts = [_CHANCE_TEXT[(bool(pretrained), bool(probe_above_chance))]]
    parts += [_PAIR_TEXT[(bool(pretrained), pair, verdicts[pair])] for pair in PAIRS]
    return " ".join(parts)


# --------------------------------------------------------------------------- vitcourse train --init timm:NAME
