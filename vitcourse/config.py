"""A training run's configuration: :class:`TrainConfig`, the named presets, and where a run lives.

A config travels one way: config -> data (:func:`vitcourse.train.build_data`) -> model ->
checkpoint (:mod:`vitcourse.checkpoint` stores it with the weights). Every check of a value is
here, in :meth:`TrainConfig.__post_init__`, so the Python API and the command line refuse the
same things with the same sentence (the command line only renames fields as flags).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.bundle import AUGMENTATIONS
from .paths import runs_dir
from .vit import ViTConfig

__all__ = ["TrainConfig", "CONFIGS", "TIMING_FIELDS", "RESUMABLE_FIELDS", "ConfigMismatch", "fingerprint", "run_dir"]

TIMING_FIELDS = ("images_per_sec", "epoch_time")
"""Metrics that measure wall-clock time; they are the only ones that differ between identical runs."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run. Named presets are in :data:`CONFIGS`.

    Model: ``model`` is ``"vit"`` (built from ``vit``), ``"cnn"`` (:class:`vitcourse.cnn.SmallCNN`
    of width ``cnn_width``) or a name from ``vitcourse.ultimus.VARIANTS``. The number of
    classes always comes from the data.

    Data: ``data`` is ``"cifar10"``, ``"synthetic"`` or an image-folder path (see
    :func:`vitcourse.data.load_data`); ``allow_synthetic`` lets CIFAR-10 fall back to the
    offline stand-in; ``subset`` keeps that many training images; ``augment`` is one of
    :data:`vitcourse.data.AUGMENTATIONS`; ``mixup`` / ``cutmix`` are Beta(alpha) strengths
    (0 switches them off; with both on, each batch uses one of the two).

    Optimisation: ``optimizer`` ``"adamw"`` or ``"adam"``; ``schedule`` ``"cosine"`` (linear
    warmup for ``warmup_epochs`` then cosine decay to 0), ``"onecycle"`` (``torch``'s OneCycleLR
    from ``max_lr / 10`` up to ``max_lr`` after ``pct_start`` of training), ``"multistep"`` (multiply by
    ``gamma`` at each fraction of training in ``milestones``) or ``"constant"``. Weight decay
    skips biases, norms, the CLS token and positions. ``grad_clip`` caps the global gradient
    norm (``None``: no clipping). ``amp`` uses mixed precision on CUDA only.

    Length: ``epochs`` sets the schedule; ``max_steps`` (optional) stops after that many
    optimizer steps in total without changing the schedule, so a run can be continued later
    with a larger ``max_steps``.

    Pretrained start: ``init`` ``"timm:NAME"`` starts the ViT from that timm checkpoint's weights
    (from the local file ``init_file`` if set, else downloaded), with the position grid resized
    bicubically to ``image_size`` and a new zero-initialised head; the images are normalised with
    the checkpoint's mean and std. ``vit`` must then be the checkpoint's architecture: build such a
    config with :func:`vitcourse.pretrained.with_init`. A resumed run never reloads these weights.
    ``body_lr_scale`` multiplies the learning rate of every parameter but the head's (``0.1``:
    the pretrained body learns ten times slower than the new head). ``init`` ``"mae:PATH"`` starts
    it instead from the encoder of a masked-autoencoder run of the course (same ViT, same image size).

    Objective: ``objective`` ``"classify"`` (cross-entropy with the labels) or ``"mae"`` (masked-image
    pretraining of ``vit``'s encoder, no labels: ``mask_ratio`` of the patches hidden, a decoder of
    ``mae_decoder_dim`` x ``mae_decoder_depth``, the normalised-pixel target if ``mae_norm_pix``).
    ``distill_from`` (a course checkpoint or run folder) trains a ViT with ``vit.distilled`` from that
    frozen teacher with DeiT's loss (``distill_kind`` ``"hard"`` or ``"soft"``, ``distill_alpha``,
    ``distill_tau``; :mod:`vitcourse.distill`).
    """

    name: str = "custom"
    model: str = "vit"
    vit: ViTConfig = field(default_factory=ViTConfig)
    cnn_width: int = 32
    image_size: int = 32
    data: str = "cifar10"
    data_root: str | None = None
    allow_synthetic: bool = False
    subset: int | None = None
    val_size: int = 5000
    augment: str = "basic"
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    max_lr: float = 0.01
    pct_start: float = 0.3
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    max_steps: int | None = None
    grad_clip: float | None = 1.0
    seed: int = 0
    amp: bool = True
    num_workers: int = 0
    eval_batch_size: int = 500
    checkpoint_every: int = 0
    init: str | None = None
    init_file: str | None = None
    body_lr_scale: float = 1.0
    objective: str = "classify"
    mask_ratio: float = 0.75
    mae_decoder_dim: int = 64
    mae_decoder_depth: int = 2
    mae_norm_pix: bool = True
    distill_from: str | None = None
    distill_kind: str = "hard"
    distill_alpha: float = 0.5
    distill_tau: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: a checkpoint's metadata or a script may hold anything
            value = getattr(self, f.name)
            if not _has_type(value, str(f.type)):
                raise ValueError(f"{f.name} must be {_TYPE_WORDS.get(str(f.type), str(f.type))}, got {value!r}.")
        finite = math.isfinite
        checks = [
            (self.model in ("vit", "cnn") or self.model.startswith("ultimus"),
             f"model must be 'vit', 'cnn' or an Ultimus variant, got {self.model!r}"),
            (self.model != "vit" or self.vit.image_size == self.image_size,
             f"vit.image_size={self.vit.image_size} differs from image_size={self.image_size}; make them equal"),
            (self.augment in AUGMENTATIONS, f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}"),
            (self.optimizer in ("adamw", "adam"), f"optimizer must be 'adamw' or 'adam', got {self.optimizer!r}"),
            (self.schedule in ("cosine", "onecycle", "multistep", "constant"),
             f"schedule must be 'cosine', 'onecycle', 'multistep' or 'constant', got {self.schedule!r}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}"),
            (self.image_size >= 1, f"image_size must be a positive number of pixels, got {self.image_size}"),
            (self.cnn_width >= 1, f"cnn_width must be at least 1, got {self.cnn_width}"),
            (self.subset is None or self.subset >= 1, f"subset must be a positive number of images, got {self.subset}"),
            (self.val_size >= 0, f"val_size must be 0 or more, got {self.val_size}"),
            (self.seed >= 0, f"seed must be 0 or more, got {self.seed}"),
            (self.num_workers >= 0, f"num_workers must be 0 or more, got {self.num_workers}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {self.eval_batch_size}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be 0 or more, got {self.checkpoint_every}"),
            (finite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}"),
            (finite(self.max_lr) and self.max_lr > 0, f"max_lr must be a positive number, got {self.max_lr}"),
            (finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be a number >= 0, got {self.weight_decay}"),
            (all(finite(b) and 0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}"),
            (finite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must be between 0 and epochs ({self.epochs}), got {self.warmup_epochs}"),
            (0 < self.pct_start < 1, f"pct_start must be in (0, 1), got {self.pct_start}"),
            (all(0 <= m <= 1 for m in self.milestones), f"milestones must be fractions in [0, 1], got {self.milestones}"),
            (finite(self.gamma) and self.gamma > 0, f"gamma must be a positive number, got {self.gamma}"),
            (all(finite(v) and v >= 0 for v in (self.mixup, self.cutmix)),
             f"mixup and cutmix must be numbers >= 0, got {self.mixup} and {self.cutmix}"),
            (self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be a positive number or None, got {self.grad_clip}"),
            (0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.init is None or (self.init.startswith(("timm:", "mae:")) and self.model == "vit"),
             f"init must be 'timm:NAME' or 'mae:PATH' for a ViT, got {self.init!r} with model {self.model!r}"),
            (self.init_file is None or (self.init or "").startswith("timm:"),
             "init_file needs init ('timm:NAME') to say what it holds"),
            (self.objective in ("classify", "mae"), f"objective must be 'classify' or 'mae', got {self.objective!r}"),
            (self.objective == "classify" or (self.model == "vit" and not self.vit.distilled and self.init is None
                                              and self.distill_from is None),
             "objective 'mae' pretrains a plain ViT from scratch; leave out distillation and init"),
            (0 <= self.mask_ratio < 1, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
            (self.mae_decoder_dim >= 4 and self.mae_decoder_dim % 4 == 0 and self.mae_decoder_depth >= 1,
             f"mae_decoder_dim must be a multiple of 4 (its 4 heads) and mae_decoder_depth at least 1, got "
             f"{self.mae_decoder_dim} and {self.mae_decoder_depth}"),
            ((self.distill_from is not None) == (self.model == "vit" and self.vit.distilled),
             "distill_from needs a ViT with a distillation token (vit.distilled) and such a ViT needs distill_from"),
            (self.distill_kind in ("hard", "soft"), f"distill_kind must be 'hard' or 'soft', got {self.distill_kind!r}"),
            (0 <= self.distill_alpha <= 1, f"distill_alpha must be in [0, 1], got {self.distill_alpha}"),
            (finite(self.distill_tau) and self.distill_tau > 0, f"distill_tau must be a positive number, got "
                                                                 f"{self.distill_tau}"),
            (finite(self.body_lr_scale) and self.body_lr_scale >= 0,
             f"body_lr_scale must be a number >= 0, got {self.body_lr_scale}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (the ViT config nested as a dict, tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`."""
        values = dict(values)
        values["vit"] = ViTConfig(**values["vit"])
        for name in ("betas", "milestones"):
            values[name] = tuple(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "True or False",
               "int | None": "a whole number or None", "float | None": "a number or None",
               "str | None": "a string or None", "ViTConfig": "a ViTConfig"}


def _has_type(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a field's annotation (``"int | None"``, ``"tuple[float, ...]"``, ...)."""
    if annotation.endswith(" | None"):
        return value is None or _has_type(value, annotation.removesuffix(" | None"))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return number
    if annotation.startswith("tuple["):
        n = None if annotation.endswith("...]") else annotation.count(",") + 1
        return isinstance(value, tuple) and (n is None or len(value) == n) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return isinstance(value, {"str": str, "bool": bool, "ViTConfig": ViTConfig}[annotation])


QUICK_VIT = ViTConfig(image_size=32, patch_size=4, dim=96, depth=4, heads=4, mlp_dim=192)
# The course's recipe at full size: a 9-layer, 192-wide, patch-4 ViT (2.7M parameters) trained
# as in the small-data ViT literature (Lee et al. 2021; Hassani et al. 2021; Touvron et al. 2021).
CIFAR10_VIT = ViTConfig(image_size=32, patch_size=4, dim=192, depth=9, heads=12, mlp_dim=384, drop_path=0.1)

CONFIGS: dict[str, TrainConfig] = {
    # A short CPU run: a small ViT, 5 epochs on a 4,000-image subset (chapter 5 glues the training time of its
    # own run and the hardware it ran on); falls back to the synthetic stand-in offline.
    "quick": TrainConfig(
        name="quick", vit=QUICK_VIT, data="cifar10", allow_synthetic=True, subset=4000, val_size=1000,
        augment="basic", label_smoothing=0.1, lr=2e-3, weight_decay=0.05, warmup_epochs=0.5, epochs=5,
        batch_size=64,
    ),
    # The full recipe for one GPU: target >= 90% CIFAR-10 test accuracy in 200 epochs.
    "cifar10": TrainConfig(
        name="cifar10", vit=CIFAR10_VIT, data="cifar10", augment="strong", mixup=0.8, cutmix=1.0,
        label_smoothing=0.1, lr=1e-3, weight_decay=0.05, warmup_epochs=10, epochs=200, batch_size=128,
        num_workers=4,
    ),
    # The seed blog's recipe: Adam 3e-4, x0.1 at epochs 80 and 130 of 150, random resized crops.
    "seed-blog": TrainConfig(
        name="seed-blog", vit=ViTConfig(dim=256, depth=6, heads=8, mlp_dim=512, dropout=0.2), data="cifar10",
        augment="resized", optimizer="adam", lr=3e-4, weight_decay=0.0, schedule="multistep",
        milestones=(80 / 150, 130 / 150), epochs=150, batch_size=64, grad_clip=None, num_workers=4,
    ),
    # Chapter 6's assignment: the Ultimus network, Adam with a one-cycle schedule, 24 epochs.
    "ultimus": TrainConfig(
        name="ultimus", model="ultimus", data="cifar10", augment="basic", optimizer="adam", weight_decay=0.0,
        schedule="onecycle", max_lr=0.01, epochs=24, batch_size=512, grad_clip=None, num_workers=4,
    ),
}
"""Named configurations for ``python -m vitcourse.train --config NAME``."""

RESUMABLE_FIELDS = ("max_steps", "num_workers", "checkpoint_every", "data_root", "eval_batch_size")
"""Fields that can change between a run and its resumption without changing its results."""


class ConfigMismatch(ValueError):
    """A checkpoint was written by a run with a different configuration."""


def fingerprint(cfg: TrainConfig) -> str:
    """A short hash of everything in ``cfg`` that changes results (not ``max_steps``, workers, paths).

    Chapters name their run directories ``f"{cfg.name}-{fingerprint(cfg)}"``, so a changed
    configuration trains afresh instead of meeting an old run's checkpoint.
    """
    values = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_FIELDS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def run_dir(config: TrainConfig, chapter: str, name: str | None = None) -> Path:
    """Where ``chapter`` keeps its run of ``config``: ``runs_dir() / chapter / f"{name}-{fingerprint}"``.

    The folder name ends in :func:`fingerprint` of ``config``, so a changed configuration trains
    afresh instead of resuming an old run, and rebuilding the book reuses every finished run.
    For example ``run_dir(CONFIGS["quick"], "ch05")`` is ``runs/ch05/quick-<8 hex digits>``.

    Args:
        config: the run's :class:`TrainConfig`.
        chapter: the chapter's folder inside :func:`vitcourse.paths.runs_dir`, e.g. ``"ch05"``.
        name: the start of the folder name; ``config.name`` if not given.

    Raises:
        TypeError: if ``config`` is not a ``TrainConfig``.
        ValueError: if ``chapter`` or ``name`` is empty or is not a single folder name.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"run_dir needs a vitcourse.config.TrainConfig, got {type(config).__name__}.")
    name = config.name if name is None else name
    for label, value in (("chapter", chapter), ("name", name)):
        if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
            raise ValueError(f"run_dir needs {label} to be one folder name (no '/', not '.' or '..'), got {value!r}.")
    return runs_dir() / chapter / f"{name}-{fingerprint(config)}"
