"""Training recipes as chapter 5 reports them: described in words, compared, run, repeated over seeds.

A chapter that trains models has to say what it trained and what came out, in sentences that
cannot drift from the code. The functions here read those facts from the objects themselves:

* :func:`describe_augmentation` - a config's augmentation in words, read from the pipeline objects;
* :func:`recipe_differences` - every setting in which two :class:`~vitcourse.config.TrainConfig` differ;
* :func:`with_recipe` - one config's model, data and budget trained with another config's recipe;
* :func:`small_comparison` - chapter 5's seeded experiment: a small ViT, a CNN of the same size, and the
  small ViT with the seed blog's recipe, all on the same data and schedule;
* :func:`train_here`, :func:`hardware_sentence`, :func:`device_word` - train (or reuse) a chapter's
  run and say where it was trained;
* :func:`seeded_test_accuracies` - one config trained with several seeds, each scored on the same
  test set (the input of :func:`vitcourse.stats.seed_estimate`);
* :func:`curve_facts` - what a run's learning curves did, as keys a page turns into sentences.

Decisions about noise are not made here: they go through :mod:`vitcourse.stats`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import torch

from .checkpoint import read_metrics
from .config import TrainConfig, run_dir
from .data import train_transform
from .paths import atomic_write
from .train import evaluate_model, train

__all__ = [
    "describe_transform",
    "describe_augmentation",
    "recipe_differences",
    "RECIPE_SETTINGS",
    "with_recipe",
    "small_comparison",
    "HARDWARE_NOTE",
    "train_here",
    "hardware_sentence",
    "device_word",
    "seeded_test_accuracies",
    "curve_facts",
]

HARDWARE_NOTE = "ch05-hardware.json"
"""Written into a run's folder by :func:`train_here` when it trains the run itself."""


# --------------------------------------------------------------------------- augmentation in words


def describe_transform(transform) -> str:
    """The steps of a torchvision ``v2`` training pipeline in words, read from the transform objects.

    Normalisation (``ToDtype``, ``Normalize``) is left out: every setting normalises.
    """
    words = {
        "RandomCrop": lambda t: f"a random {t.size[0]}×{t.size[1]} crop after padding by {t.padding[0]} px",
        "RandomHorizontalFlip": lambda t: f"a horizontal flip with probability {t.p:g}",
        "RandAugment": lambda t: f"RandAugment with {t.num_ops} operations of magnitude {t.magnitude}",
        "RandomResizedCrop": lambda t: (f"a random crop of {t.scale[0]:.0%}-{t.scale[1]:.0%} of the area and aspect "
                                        f"{t.ratio[0]:g}-{t.ratio[1]:g}, resized to {t.size[0]}×{t.size[1]}"),
        "RandomErasing": lambda t: f"random erasing with probability {t.p:g}",
    }
    steps = [words.get(type(t).__name__, lambda t: type(t).__name__)(t)
             for t in getattr(transform, "transforms", [transform]) if type(t).__name__ not in ("ToDtype", "Normalize")]
    return ", then ".join(steps) if steps else "no augmentation (normalisation only)"


def describe_augmentation(cfg: TrainConfig) -> str:
    """All the augmentation of a ``TrainConfig``: its image pipeline plus mixup / CutMix, in words."""
    text = describe_transform(train_transform(cfg.augment, cfg.image_size, (0.0,) * 3, (1.0,) * 3))
    mixers = [f"{name} (Beta strength {alpha:g})" for name, alpha in (("mixup", cfg.mixup), ("CutMix", cfg.cutmix))
              if alpha > 0]
    if mixers:
        text += "; on whole batches " + (" or ".join(mixers) + ", one of the two per batch" if len(mixers) == 2
                                         else mixers[0])
    return text


# --------------------------------------------------------------------------- two recipes side by side


def _settings(cfg: TrainConfig) -> dict:
    """Every setting of a ``TrainConfig`` in one flat dict; the ViT's settings are ``"vit.<name>"``."""
    flat = cfg.to_dict()
    return {**{k: v for k, v in flat.items() if k != "vit"}, **{f"vit.{k}": v for k, v in flat["vit"].items()}}


def _used(cfg: TrainConfig, key: str) -> bool:
    """Whether ``cfg`` uses setting ``key`` (a cosine schedule has no milestones, a CNN no ViT settings)."""
    if key.startswith("vit."):
        return cfg.model == "vit"
    needs = {"cnn_width": cfg.model == "cnn", "milestones": cfg.schedule == "multistep",
             "gamma": cfg.schedule == "multistep", "max_lr": cfg.schedule == "onecycle",
             "pct_start": cfg.schedule == "onecycle", "lr": cfg.schedule != "onecycle",
             "warmup_epochs": cfg.schedule != "onecycle"}
    return needs.get(key, True)


def _describe(cfg: TrainConfig, key: str, value) -> str:
    """One setting's value in words (the model and the augmentation are spelled out)."""
    if key == "model":
        v = cfg.vit
        return {"vit": f"vit: {v.depth} blocks, width {v.dim}, {v.heads} heads, {v.patch_size}x{v.patch_size} patches",
                "cnn": f"cnn: SmallCNN of width {cfg.cnn_width}"}.get(value, value)
    if key == "augment":
        return f"{value}: {describe_transform(train_transform(value, cfg.image_size, (0.0,) * 3, (1.0,) * 3))}"
    if isinstance(value, list):
        return ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_differences(a: TrainConfig, b: TrainConfig, ignore: Sequence[str] = ("name",)) -> dict[str, tuple[str, str]]:
    """Every setting in which ``a`` and ``b`` differ: ``{setting: (a's value, b's value)}`` in words.

    A setting one config does not use reads "not used". When the models differ, their own settings
    (``vit.*``, ``cnn_width``) are summarised in the ``model`` entry instead of listed one by one.
    The order is the order of the fields of :class:`~vitcourse.config.TrainConfig`.
    """
    values = [_settings(a), _settings(b)]
    rows = {}
    for key in values[0]:
        if key in ignore or (a.model != b.model and (key.startswith("vit.") or key == "cnn_width")):
            continue
        used = [v[key] if _used(c, key) else None for c, v in zip((a, b), values)]
        if used[0] != used[1]:
            rows[key] = tuple(_describe(c, key, u) if u is not None else "not used" for c, u in zip((a, b), used))
    return rows


RECIPE_SETTINGS = ("augment", "mixup", "cutmix", "label_smoothing", "optimizer", "lr", "weight_decay", "betas",
                   "schedule", "warmup_epochs", "max_lr", "pct_start", "milestones", "gamma", "grad_clip")
"""The settings of a :class:`~vitcourse.config.TrainConfig` that make its *recipe* (how it trains), besides the
ViT's ``dropout`` and ``drop_path``; the model, the data and the budget (``epochs``, ``batch_size``) are not among them."""


def with_recipe(base: TrainConfig, donor: TrainConfig, name: str) -> TrainConfig:
    """``base``'s model, data and budget trained with ``donor``'s recipe, named ``name``.

    Every setting of :data:`RECIPE_SETTINGS`, and the ViT's ``dropout`` and ``drop_path``, come
    from ``donor``; everything else (architecture, data, subset, epochs, batch size, seed) from ``base``.
    """
    vit = dataclasses.replace(base.vit, dropout=donor.vit.dropout, drop_path=donor.vit.drop_path)
    return base.replace(name=name, vit=vit, **{key: getattr(donor, key) for key in RECIPE_SETTINGS})


def small_comparison(base: TrainConfig, donor: TrainConfig, epochs: int = 2) -> dict[str, TrainConfig]:
    """Chapter 5's seeded comparison, small enough to train three seeds of each setting on a CPU page.

    All three settings keep ``base``'s data (the same training subset and validation images for
    the same seed) and train for ``epochs`` epochs with the same schedule, warmup taking the same
    share of training as in ``base``:

    * ``"vit"``: ``base``'s recipe on a ViT of half ``base``'s depth and two thirds of its width
      (2 blocks of width 64 for ``quick``), about 75,000 parameters;
    * ``"cnn"``: the same recipe on :class:`vitcourse.cnn.SmallCNN` of width 16 (about 73,000 parameters);
      only the model differs from ``"vit"``;
    * ``"vit-donor"``: the small ViT with ``donor``'s recipe (:func:`with_recipe`); only recipe
      settings differ from ``"vit"``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    vit = dataclasses.replace(base.vit, dim=base.vit.dim * 2 // 3, depth=max(1, base.vit.depth // 2),
                              mlp_dim=base.vit.mlp_dim * 2 // 3)
    small = base.replace(name=f"{base.name}-small-vit", vit=vit, epochs=epochs,
                         warmup_epochs=base.warmup_epochs * epochs / base.epochs)
    return {
        "vit": small,
        "cnn": small.replace(name=f"{base.name}-small-cnn", model="cnn", cnn_width=16),
        "vit-donor": with_recipe(small, donor, f"{base.name}-small-vit-{donor.name}-recipe"),
    }


# --------------------------------------------------------------------------- runs and where they ran


def train_here(cfg: TrainConfig, chapter: str = "ch05") -> tuple[list[dict], dict | None]:
    """Train ``cfg`` in ``chapter``'s run folder (:func:`vitcourse.config.run_dir`), or reuse the finished run there.

    Returns ``(rows, hardware)``: the rows of ``metrics.jsonl`` (one dict per epoch; ``epoch_time``
    is the seconds spent in that epoch's training steps, validation excluded) and the note written
    about the hardware when this function trained the run (``None`` if the run was trained
    elsewhere, e.g. from the command line). A run continued after an interruption keeps the note of
    the session that finished it.
    """


    out = run_dir(cfg, chapter)
    epochs_before = len(read_metrics(out))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    hardware = {"cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                "load_at_start": load, "torch": torch.__version__}
    if hardware["cuda"]:
        hardware["gpu"] = torch.cuda.get_device_name(0)
    rows = train(cfg, out, progress=False)
    if len(rows) > epochs_before:  # this call trained epochs: record where
        atomic_write(out / HARDWARE_NOTE, json.dumps({**hardware, "epochs_trained": len(rows) - epochs_before}))
    note = out / HARDWARE_NOTE
    return rows, (json.loads(note.read_text()) if note.exists() else None)


def hardware_sentence(hardware: dict | None) -> str:
    """Where a run was trained, in words, from the note :func:`train_here` keeps (``None``: not recorded)."""
    if hardware is None:
        return "on hardware this page did not record, because the run was trained elsewhere"
    if hardware["cuda"]:
        return f"on a GPU ({hardware.get('gpu', 'unnamed')})"
    text = f"on a CPU with {hardware['threads']} PyTorch threads and no GPU ({hardware['cores']} logical cores)"
    load = hardware.get("load_at_start")
    if load is not None:
        busy = load >= 0.5 * hardware["cores"]
        text += (f"; the 1-minute load average was {load:.1f} when training started, so other work shared the "
                 f"machine and these times overstate what an idle one needs" if busy else
                 f"; the machine was nearly idle when training started (1-minute load average {load:.1f})")
    return text


def device_word(hardware: dict | None) -> str:
    """``"CPU"``, ``"GPU"`` or ``""`` (not recorded), for phrases like "a short CPU run"."""
    return "" if hardware is None else ("GPU" if hardware["cuda"] else "CPU")


def seeded_test_accuracies(cfg: TrainConfig, seeds: Sequence[int], test_set, chapter: str = "ch05"
                           ) -> tuple[list[float], list[list[dict]]]:
    """Train ``cfg`` once per seed (or reuse the finished runs) and score each best checkpoint on ``test_set``.

    Each seed is ``cfg.replace(seed=s)``: its own initialisation, data order, augmentation and
    (through the seeded split) its own training subset and validation images. All seeds are scored
    on the same ``test_set``, as :func:`vitcourse.stats.seed_estimate` assumes.

    Returns ``(accuracies, rows)``: one test accuracy in ``[0, 1]`` per seed, and each run's metrics rows.
    """
    from .evaluate import load_trained

    if not seeds:
        raise ValueError("seeded_test_accuracies needs at least one seed.")
    accs, histories = [], []
    for seed in seeds:
        one = cfg.replace(seed=int(seed))
        rows, _ = train_here(one, chapter)
        model, _, _ = load_trained(run_dir(one, chapter) / "best.safetensors")
        accs.append(float(evaluate_model(model, test_set)["acc"]))
        histories.append(rows)
    return accs, histories


# --------------------------------------------------------------------------- learning curves in keys


def curve_facts(rows: Sequence[dict]) -> dict:
    """What a run's learning curves did, from its metrics rows (``train_loss``, ``val_loss``, ``val_acc``).

    Returns a dict with

    * ``"train_vs_val"``: ``"above"`` or ``"below"`` - where the last training loss ends against the last
      validation loss (``"below"`` when equal);
    * ``"fell"``: ``"both"``, ``"training"``, ``"validation"`` or ``"neither"`` - which losses are lower at
      the last epoch than at the first (one epoch: ``"neither"``);
    * ``"best_val_acc"``: the highest validation accuracy.
    """
    if not rows:
        raise ValueError("curve_facts needs at least one epoch of metrics.")
    first, last = rows[0], rows[-1]
    fallen = [name for name, key in (("training", "train_loss"), ("validation", "val_loss")) if last[key] < first[key]]
    return {
        "train_vs_val": "above" if last["train_loss"] > last["val_loss"] else "below",
        "fell": "both" if len(fallen) == 2 else (fallen[0] if fallen else "neither"),
        "best_val_acc": max(float(r["val_acc"]) for r in rows),
    }
