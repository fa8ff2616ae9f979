"""Training, readable in one sitting: config -> data -> model -> optimizer -> loop -> checkpoints.

Run it from the command line::

    vitcourse train --config quick --out runs/quick                    # a small ViT for a CPU (time: see chapter 5)
    python -m vitcourse.train --config quick --out runs/quick          # the same
    python -m vitcourse.train --config cifar10 --out runs/cifar10      # the full recipe, for a GPU
    torchrun --nproc_per_node 4 -m vitcourse.train --config cifar10    # several GPUs (or CPU processes)

or from Python with :func:`train`. A run writes into its output directory:

* ``metrics.jsonl`` - one strict-JSON object per epoch (losses, accuracy, the learning rate of the
  epoch's last step, images/s, data source; a non-finite number is ``null``), always the rows
  of ``resume.pt``;
* ``best.safetensors`` - the weights with the best validation accuracy so far, and
  ``last.safetensors`` - the weights at the last checkpoint; both carry the run's config,
  classes, data statistics and metrics as JSON in the safetensors metadata, plus a checksum
  of the weights. These are the files to share: :func:`load_checkpoint` (and
  :func:`vitcourse.evaluate.load_trained`) read them without running any code;
* ``resume.pt`` - everything needed to resume exactly (weights, optimizer, scheduler, random
  states, data position), tensors and plain Python values only, read with
  ``torch.load(weights_only=True)``;
* ``split.json`` - which examples are train, validation and test (for an image folder: the
  files by path, with their SHA-256). ``--resume`` refuses a folder whose files changed;
* ``train.log`` - the same lines the command line prints.

Exact resume: the training data order and every image's augmentation are functions of
``(seed, epoch, index)`` alone, the global random state (dropout, mixup) is saved in the
checkpoint, and checkpoints are written to a temporary file and renamed, so a run killed
at any moment (even with SIGKILL) and resumed ends bit-identical to one never interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import AUGMENTATIONS, DataBundle, DataError, load_data
from .optim import param_groups
from .utils import atomic_write, runs_dir
from .vit import ViTConfig, VisionTransformer

__all__ = [
    "TrainConfig",
    "CONFIGS",
    "TIMING_FIELDS",
    "ConfigMismatch",
    "train",
    "build_model",
    "build_data",
    "learning_rates",
    "evaluate_model",
    "load_checkpoint",
    "save_weights",
    "convert_checkpoint",
    "strict_json",
    "CheckpointError",
    "BEST_FILE",
    "LAST_FILE",
    "RESUME_FILE",
    "SPLIT_FILE",
    "read_metrics",
    "fingerprint",
    "main",
]

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
    the pretrained body learns ten times slower than the new head).
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

    def __post_init__(self) -> None:
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
            (0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.init is None or (self.init.startswith("timm:") and self.model == "vit"),
             f"init must be 'timm:NAME' for a ViT, got {self.init!r} with model {self.model!r}"),
            (self.init_file is None or self.init is not None, "init_file needs init ('timm:NAME') to say what it holds"),
            (math.isfinite(self.body_lr_scale) and self.body_lr_scale >= 0,
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

# Fields that can change between a run and its resumption without changing its results.
_RESUMABLE_FIELDS = ("max_steps", "num_workers", "checkpoint_every", "data_root", "eval_batch_size")
# Fields added after runs were cached: left out of fingerprint() at these defaults, so those runs keep their folders.
_LATER_FIELDS = {"init": None, "init_file": None, "body_lr_scale": 1.0}
_LATER_VIT_FIELDS = {"stem": "patch", "lsa": False}  # the same, inside the ViT's config


def _with_later_defaults(config: dict) -> dict:
    """A stored config dict with the fields added since it was written filled in with their defaults."""
    config = {**_LATER_FIELDS, **config}
    if isinstance(config.get("vit"), dict):
        config["vit"] = {**_LATER_VIT_FIELDS, **config["vit"]}
    return config


class ConfigMismatch(ValueError):
    """A checkpoint was written by a run with a different configuration."""


# --------------------------------------------------------------------------- data, model, optimizer


def build_data(cfg: TrainConfig, *, skip_bad_images: bool = False, verified: dict | None = None) -> DataBundle:
    """The :class:`~vitcourse.data.DataBundle` a config asks for (see :func:`vitcourse.data.load_data`)."""
    return load_data(
        cfg.data, root=cfg.data_root, image_size=cfg.image_size, val_size=cfg.val_size, seed=cfg.seed,
        augment=cfg.augment, allow_synthetic=cfg.allow_synthetic, subset=cfg.subset, skip_bad_images=skip_bad_images,
        verified=verified,
    )


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The network named by ``cfg.model``, with ``num_classes`` outputs: ``(B, 3, S, S) -> (B, num_classes)``."""
    if cfg.model == "vit":
        return VisionTransformer(dataclasses.replace(cfg.vit, num_classes=num_classes))
    if cfg.model == "cnn":
        from .cnn import SmallCNN

        return SmallCNN(num_classes, width=cfg.cnn_width)
    from .ultimus import VARIANTS  # imported lazily: chapter 6's module

    if cfg.model not in VARIANTS:
        raise ValueError(f"unknown model {cfg.model!r}; choose 'vit', 'cnn' or one of {', '.join(VARIANTS)}.")
    return VARIANTS[cfg.model](num_classes=num_classes)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    peak = cfg.max_lr if cfg.schedule == "onecycle" else cfg.lr
    # weight decay on matrices and kernels only; with --body-lr-scale, head and body groups at their own rates
    split = cfg.body_lr_scale != 1.0
    groups = param_groups(model, cfg.weight_decay, peak if split else None,
                          peak * cfg.body_lr_scale if split else None)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)  # Adam: weight decay added to the gradient


def _scheduler(cfg: TrainConfig, optimizer, total_steps: int, steps_per_epoch: int):
    """A per-step learning-rate schedule over ``total_steps`` optimizer steps."""
    if cfg.schedule == "onecycle":
        peaks = [cfg.max_lr * (cfg.body_lr_scale if g.get("name") == "body" else 1.0) for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total_steps, pct_start=cfg.pct_start,
            div_factor=10.0,  # start at max_lr / 10, as the Ultimus assignment did (torch's default is 25)
        )
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    marks = [round(m * total_steps) for m in cfg.milestones]

    def factor(step: int) -> float:  # multiplies cfg.lr
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(total_steps - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "multistep":
            return cfg.gamma ** sum(step >= m for m in marks)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def learning_rates(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate at every optimizer step of ``cfg``'s schedule (``epochs * steps_per_epoch`` values)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    scheduler = _scheduler(cfg, optimizer, total, steps_per_epoch)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _batch_mixer(cfg: TrainConfig, num_classes: int):
    """Mixup and/or CutMix on a batch ``(images (B, C, H, W), labels (B,))``; ``None`` if both are off."""
    from torchvision.transforms import v2

    mixers = []
    if cfg.mixup > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


# --------------------------------------------------------------------------- the order of the data


class EpochBatches(Sampler):
    """The training run's distributed batch sampler: batches of one epoch, in an order fixed by
    ``(seed, epoch)``, from batch ``start`` on, sharded over ``world`` processes by ``rank``.

    Yields lists of ``(index, sample_seed)`` keys (see :class:`vitcourse.data.ImageTensorDataset`):
    the permutation and every image's augmentation seed come from ``seed`` and ``epoch`` alone.
    With ``world > 1`` each global batch of ``batch_size`` images is cut into ``world`` equal
    parts and process ``rank`` gets its part. Incomplete final batches are dropped.

    It does the job of ``torch.utils.data.DistributedSampler(shuffle=True, drop_last=True)``
    with ``set_epoch(epoch)`` inside a ``BatchSampler``: every process sees a disjoint
    ``1/world`` of each epoch's shuffled data. It is written out instead for exact resume:
    it can start at batch ``start`` of an epoch (where a killed run stopped), it carries each
    image's augmentation seed, and it shards each *global* batch rather than the whole epoch,
    so the images of step ``k`` are the same for any number of processes and a DDP run
    matches a one-process run.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.start = n, batch_size, start
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed * 100_003 + epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.generator.initial_seed())
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        part = self.batch_size // self.world
        for b in range(self.start, self.n // self.batch_size):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank * part : (self.rank + 1) * part]
            yield [(int(i), int(seeds[i])) for i in chunk]


def _loader(dataset: Dataset, cfg: TrainConfig, **kwargs) -> DataLoader:
    # An explicit generator keeps DataLoader from drawing on the global random state.
    return DataLoader(dataset, num_workers=cfg.num_workers, generator=torch.Generator(),
                      persistent_workers=False, pin_memory=torch.cuda.is_available(), **kwargs)


# --------------------------------------------------------------------------- distributed helpers


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return _Dist(rank, world, torch.device("cuda", local))
    return _Dist(rank, world, torch.device("cpu"))


def _all_sum(values: list[float], ctx: _Dist) -> list[float]:
    """Sum a few numbers over all processes (identity without distributed training)."""
    if ctx.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- checkpoints


LAST_FILE = "last.safetensors"
"""The weights at the run's last checkpoint, with the run's information (safetensors, shareable)."""
BEST_FILE = "best.safetensors"
"""The weights of the epoch with the best validation accuracy, with the run's information."""
RESUME_FILE = "resume.pt"
"""Everything exact resume needs; only tensors and plain Python values, read with ``weights_only=True``."""
SPLIT_FILE = "split.json"
"""Which examples (for an image folder: which files, with their SHA-256) are train, val and test."""
FORMAT = "vitcourse-checkpoint-1"
_INFO_KEYS = ("config", "classes", "source", "mean", "std", "model_name")


class CheckpointError(ValueError):
    """A file is not a readable vitcourse checkpoint; the message says what it is and what to do."""


def _rng_state() -> dict:
    """This process's random states as tensors and plain values (no NumPy objects: see :data:`RESUME_FILE`)."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, None)
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights_hash(weights: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: it detects damaged weights."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as independent CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(path: str | os.PathLike, weights: dict[str, Tensor], info: dict) -> None:
    """Write ``weights`` and the run's ``info`` (JSON) as one safetensors file, atomically.

    ``info`` holds at least ``config``, ``classes``, ``source``, ``mean``, ``std`` and
    ``model_name``; a SHA-256 of the weights is added so that damage is detected on loading.
    """
    from safetensors.torch import save

    info = {**info, "format": FORMAT, "weights_sha256": _weights_hash(weights)}
    clean, _ = strict_json(info)
    atomic_write(path, save(weights, metadata={"vitcourse": json.dumps(clean, allow_nan=False)}))


def _save_resume(obj: dict, path: Path) -> None:
    """``torch.save`` of tensors and plain values only (so ``weights_only=True`` reads it), atomically."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def strict_json(value: Any) -> tuple[Any, list[str]]:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, and where they were.

    JSON has no NaN or infinity; ``json.dumps(strict_json(v)[0], allow_nan=False)`` is valid
    for any strict parser. The second element names the replaced entries (``"test_loss"``).
    """
    replaced: list[str] = []

    def clean(v, where):
        if isinstance(v, float) and not math.isfinite(v):
            replaced.append(where or "value")
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    return clean(value, ""), replaced


def _write_metrics(out: Path, rows: list[dict]) -> list[str]:
    """Replace ``out/metrics.jsonl`` by ``rows`` (strict JSON, one object per line) atomically; returns
    the entries that were not finite and were written as ``null``."""
    clean, replaced = strict_json(rows)
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in clean))
    return replaced


# Objects an old (before safetensors) last.pt holds besides tensors and plain values: NumPy's random
# state. Allow-listed by name for weights_only loading; nothing else is ever unpickled.
def _numpy_globals() -> list:
    core = np._core if hasattr(np, "_core") else np.core
    reconstruct = core.multiarray._reconstruct
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
               (reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct")]
    return allowed


def _unsafe_name(path: Path, err: Exception) -> str | None:
    """The first function or class a refused pickle names that is not a tensor or container
    (``"builtins.open"``), read from the pickle's opcodes without executing any; ``None`` if none."""
    import pickletools
    import re
    import zipfile

    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:
        pass  # a damaged stream: keep what was found before the damage
    plain = ("torch.", "collections.OrderedDict", "numpy.core.multiarray._reconstruct",
             "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "_codecs.encode")
    unsafe = [g for g in found if not g.startswith(plain)]
    if unsafe:
        return unsafe[0]
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return named.group(1) if named else None


def _load_pt(path: Path) -> dict:
    """A ``.pt`` file through ``torch.load(weights_only=True)``: tensors and plain values only, no code."""
    import pickle

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            with open(path, "rb") as f:  # a file object: the format is read from the bytes, not the file's name
                return torch.load(f, map_location="cpu", weights_only=True)

    try:
        try:
            return load()
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_numpy_globals()):  # an old last.pt with NumPy random state
                return load()
    except pickle.UnpicklingError as err:
        code = _unsafe_name(path, err)
        if code is None:
            raise CheckpointError(f"{path} is not readable: it is corrupt or not a checkpoint file; copy it again or "
                                  f"pick another checkpoint.") from None
        raise CheckpointError(
            f"{path} was not loaded because it asks to run code ({code}) or build objects other than tensors and "
            f"plain values; it is not a vitcourse checkpoint, so do not use it."
        ) from None
    except Exception:
        raise CheckpointError(f"{path} is not readable: it is truncated, corrupt or not a PyTorch file; "
                              f"copy it again or pick another checkpoint.") from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        raise CheckpointError(f"{path} is not readable: it is truncated or corrupt (not a complete safetensors "
                              f"file); copy it again or pick another checkpoint.") from None
    if "vitcourse" not in metadata:
        raise CheckpointError(f"{path} holds weights but no vitcourse run information (config, classes); it is not "
                              f"a vitcourse checkpoint (timm weights load with vitcourse.timm_compat).")
    try:
        info = json.loads(metadata["vitcourse"])
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} has damaged run information (not a JSON object); copy it again or retrain.")
    return {**info, "model": weights}


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely: no code inside it ever runs.

    Accepts ``best.safetensors`` / ``last.safetensors`` (weights plus the run's information as
    JSON), ``resume.pt`` and the ``best.pt`` / ``last.pt`` files of older vitcourse versions
    (read with ``torch.load(weights_only=True)``; an old ``last.pt``'s NumPy random state is
    allow-listed by name).

    Returns:
        A dict with ``model`` (the state dict: name -> tensor), ``config`` (a :class:`TrainConfig`
        as a dict), ``classes``, ``source``, ``mean``, ``std``, ``model_name`` and, where known,
        ``epoch`` (epochs behind the weights), ``step``, ``val_acc`` and ``metrics`` (that epoch's
        row of ``metrics.jsonl``); ``resume.pt`` (and an
        old ``last.pt``) also hold ``optimizer``, ``scheduler``, ``scaler``, ``state`` and ``rng``.

    Raises:
        CheckpointError: (a ``ValueError``) missing, a folder, unreadable, damaged, containing code,
            or not a vitcourse checkpoint; the message is one sentence saying what to do.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        hint = f"; pass {path / BEST_FILE}" if (path / BEST_FILE).exists() else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint or '; pass the path of a ' + BEST_FILE + ' file'}.")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a {BEST_FILE} file written by training.")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a device, pipe or socket); pass the path of a "
                              f"{BEST_FILE} file written by training.")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be opened ({err.strerror}); check its permissions.") from None
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        checkpoint = _load_safetensors(path)
    else:
        checkpoint = _load_pt(path)
    return _validated(checkpoint, path)


def _validated(checkpoint: Any, path: Path) -> dict:
    """Check that a loaded checkpoint has what evaluation and resume need; :class:`CheckpointError` if not."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a vitcourse training checkpoint (no config and weights inside); "
                              f"pass a {BEST_FILE} written by training.")
    missing = [k for k in ("classes",) if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a complete vitcourse checkpoint: it has no {missing[0]!r} entry; "
                              f"use the file training wrote, unedited.")
    weights = checkpoint["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} is not a vitcourse checkpoint: its 'model' entry is not a set of tensors.")
    classes = checkpoint["classes"]
    if not isinstance(classes, (list, tuple)) or len(classes) < 1 or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path} has a damaged 'classes' entry (not a list of class names); use the file "
                              f"training wrote, unedited.")
    try:
        TrainConfig.from_dict(checkpoint["config"])
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        config = checkpoint["config"] if isinstance(checkpoint["config"], dict) else {}
        unknown = sorted(set(config) - known)
        what = f"settings this vitcourse does not know ({', '.join(unknown)})" if unknown else f"an invalid configuration ({err})"
        raise CheckpointError(f"{path} has {what}; it was written by another vitcourse version or edited, so "
                              f"use a checkpoint from this version.".replace("\n", " ")) from None
    expected = checkpoint.get("weights_sha256")
    if expected is not None and _weights_hash(weights) != expected:
        raise CheckpointError(f"{path} is damaged: its weights do not match the checksum stored with them; "
                              f"copy it again or retrain.")
    checkpoint.setdefault("source", checkpoint["config"].get("data"))
    checkpoint.setdefault("model_name", checkpoint["config"].get("model"))
    if "epoch" not in checkpoint and isinstance(checkpoint.get("state"), dict):  # resume.pt, old last.pt
        checkpoint["epoch"] = checkpoint["state"].get("epoch")
        checkpoint["step"] = checkpoint["state"].get("step")
    return checkpoint


def convert_checkpoint(old: str | os.PathLike, new: str | os.PathLike) -> Path:
    """Rewrite a checkpoint (e.g. an old ``best.pt``) as a safetensors file ``new``; returns ``new``.

    The old file is read by :func:`load_checkpoint`, so nothing in it runs.
    """
    checkpoint = load_checkpoint(old)
    info = {k: checkpoint[k] for k in (*_INFO_KEYS, "epoch", "step", "val_acc") if k in checkpoint}
    save_weights(new, {k: v.contiguous().clone() for k, v in checkpoint["model"].items()}, info)
    return Path(new)


def _load_resume(path: Path) -> dict:
    """``resume.pt`` through :func:`load_checkpoint`, with the entries exact resume needs."""
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("optimizer", "scheduler", "scaler", "state", "rng") if k not in checkpoint]
    if missing or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vitcourse resume state (no {missing[0] if missing else 'format'} "
                              f"entry); train into another --out folder.")
    return checkpoint


def _split_hash(record: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _check_same_split(path: Path, record: dict) -> None:
    """:class:`ConfigMismatch` unless the data now splits exactly as recorded in ``split.json`` at the run's start.

    For an image folder the files are compared by path and SHA-256: a resumed run never moves an
    image between train, validation and test, so its test accuracy stays a test accuracy.
    """
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigMismatch(f"{path} is missing or damaged, so the run's train/val/test split is unknown and it "
                             f"cannot be resumed safely; train into another --out folder.") from None
    if recorded == json.loads(json.dumps(record)):
        return
    old, new = recorded.get("files") or {}, record.get("files") or {}
    if old or new:
        changes = [("removed", sorted(set(old) - set(new))), ("added", sorted(set(new) - set(old))),
                   ("changed", sorted(k for k in set(old) & set(new) if old[k] != new[k]))]
        named, parts = 10, []
        for what, names in changes:
            if names:
                shown = names[:named]
                named -= len(shown)
                more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
                parts.append(f"{len(names)} {what}" + (f": {', '.join(shown)}{more}" if shown else ""))
        detail = "; ".join(parts) or "its files are split differently"
        raise ConfigMismatch(f"the image folder changed since this run started ({detail}), and resuming would move "
                             f"images between train and test; restore the folder as it was, or train into another "
                             f"--out folder.")
    raise ConfigMismatch(f"the data splits differently from when this run started ({path}); resume with the same "
                         f"data and settings, or train into another --out folder.")


def _repair_last(out: Path, checkpoint: dict) -> None:
    """Rewrite ``last.safetensors`` from ``resume.pt`` if a kill left it missing or a checkpoint behind."""
    try:
        current = load_checkpoint(out / LAST_FILE)
        if current.get("step") == checkpoint["state"]["step"]:
            return
    except CheckpointError:
        pass
    info = {k: checkpoint[k] for k in (*_INFO_KEYS, "split_sha256") if k in checkpoint}
    save_weights(out / LAST_FILE, checkpoint["model"], {**info, "kind": "last", "epoch": checkpoint["state"]["epoch"],
                                                        "step": checkpoint["state"]["step"], "finished": True})


def _load_data(cfg: TrainConfig, ctx: "_Dist", skip_bad_images: bool) -> DataBundle:
    """:func:`build_data`, process 0 first under ``torchrun``: it downloads or generates the data (under a
    file lock, see :func:`vitcourse.data.data_lock`) while the others wait at a barrier, then they load
    the prepared copy. An error on process 0 is raised on every process, so none waits forever. For an
    image folder, process 0 also sends the files it checked (with their SHA-256): the others use exactly
    those, without opening every image again, so all processes split the same files.

    The barrier runs in a separate gloo group whose timeout outlasts the download's own deadline
    (:data:`vitcourse.data.DOWNLOAD_DEADLINE`): the default group's timeout (10 minutes for NCCL)
    would end a slow but healthy download with an unexplained collective timeout.
    """
    if ctx.world == 1 or not dist.is_initialized():
        return build_data(cfg, skip_bad_images=skip_bad_images)
    from datetime import timedelta

    from .data import DOWNLOAD_DEADLINE

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=DOWNLOAD_DEADLINE + 600))
    shared: list = [None, None]  # [(is DataError, message) of a failure, the checked files of an image folder]
    data = None
    if ctx.main:
        try:
            data = build_data(cfg, skip_bad_images=skip_bad_images)
            shared[1] = data.split.get("files") or None
        except (DataError, ValueError) as err:
            shared[0] = (isinstance(err, DataError), str(err))
    dist.barrier(group=group)  # the others start loading only once process 0 has prepared the data
    dist.broadcast_object_list(shared, src=0, group=group, device=torch.device("cpu"))
    if shared[0] is not None:
        is_data_error, message = shared[0]
        raise (DataError if is_data_error else ValueError)(message)
    return data if data is not None else build_data(cfg, skip_bad_images=skip_bad_images, verified=shared[1])


def _check_same_run(checkpoint: dict, cfg: TrainConfig, source: str, world: int, path: Path) -> None:
    """:class:`ConfigMismatch` unless ``checkpoint`` was written by this run: same config (but for
    :data:`_RESUMABLE_FIELDS`), same data actually loaded (``cifar10`` may have fallen back to
    ``synthetic``) and the same number of processes (each one's random state is in the checkpoint)."""
    ours = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE_FIELDS}
    written = _with_later_defaults(checkpoint["config"])  # a run from before a field existed had its default
    theirs = {k: v for k, v in written.items() if k not in _RESUMABLE_FIELDS}
    ours.update({"data source": source, "processes": world})
    theirs.update({"data source": checkpoint["source"], "processes": len(checkpoint["rng"])})
    diffs = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if diffs:
        k = diffs[0]
        raise ConfigMismatch(
            f"{path} was written by a run with a different configuration ({k}: {theirs.get(k)!r} there, "
            f"{ours.get(k)!r} now); use another output directory or the same settings."
        )


def fingerprint(cfg: TrainConfig) -> str:
    """A short hash of everything in ``cfg`` that changes results (not ``max_steps``, workers, paths).

    Chapters name their run directories ``f"{cfg.name}-{fingerprint(cfg)}"``, so a changed
    configuration trains afresh instead of meeting an old run's checkpoint.
    """
    import hashlib

    values = {k: v for k, v in cfg.to_dict().items()
              if k not in _RESUMABLE_FIELDS and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    if isinstance(values.get("vit"), dict):
        values["vit"] = {k: v for k, v in values["vit"].items() if _LATER_VIT_FIELDS.get(k, object()) != v}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``OUT/metrics.jsonl`` (one dict per epoch); empty if there are none."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- evaluation


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


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig | str, out_dir: str | os.PathLike | None = None, *, resume: bool = True,
          progress: bool = True, verbose: bool = False, skip_bad_images: bool = False) -> list[dict]:
    """Train ``cfg`` (a :class:`TrainConfig` or the name of one) and return the per-epoch metrics.

    Args:
        cfg: the run's configuration.
        out_dir: where metrics and checkpoints go (default ``runs_dir() / cfg.name``).
        resume: continue from ``out_dir/resume.pt`` if it exists (a finished run returns its
            stored metrics at once). With ``resume=False`` an existing run is an error.
        progress: show a tqdm progress bar.
        verbose: also print one line per epoch (the command line does).
        skip_bad_images: leave unreadable or corrupt files of an image folder out instead of stopping.

    Returns:
        The rows of ``metrics.jsonl``: dicts with ``epoch``, ``step``, ``train_loss``, ``train_acc``,
        ``val_loss``, ``val_acc``, ``lr`` (the learning rate of the epoch's last optimizer step),
        ``images_per_sec``, ``epoch_time``, ``data`` (the data actually used, e.g. ``"synthetic"``).

    Raises:
        ConfigMismatch: ``out_dir`` holds a run with another configuration, other data, another
            split (the image folder changed) or another number of processes, or a run of an older
            vitcourse version.
        vitcourse.data.DataError: the data is missing or malformed.
    """
    cfg = CONFIGS[cfg] if isinstance(cfg, str) else cfg
    out = Path(out_dir) if out_dir is not None else runs_dir() / cfg.name
    ctx = _init_distributed()
    resume_path = out / RESUME_FILE
    if resume_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; resume it (--resume) or choose another output directory.")
    if not resume_path.exists() and (out / "last.pt").exists():
        raise ConfigMismatch(f"{out} holds a run of an older vitcourse (last.pt, before safetensors checkpoints) that "
                             f"cannot be continued; train into another --out folder (its best.pt still evaluates).")

    # ---- data (process 0 first): warnings (e.g. "CIFAR-10 not found, using synthetic") go to the log
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _load_data(cfg, ctx, skip_bad_images)
    if cfg.init is not None:  # a pretrained start sees the statistics its checkpoint was trained with
        from .pretrained import init_statistics, renormalize

        data = renormalize(data, *init_statistics(cfg.init))
    record = data.split_record()

    # ---- an earlier run in `out` must be this run (same config, data, split and processes); it may be finished
    checkpoint = _load_resume(resume_path) if resume_path.exists() else None
    if checkpoint is not None:
        _check_same_run(checkpoint, cfg, data.source, ctx.world, resume_path)
        _check_same_split(out / SPLIT_FILE, record)
        if _finished(checkpoint, cfg):
            rows = checkpoint["state"]["rows"]
            if ctx.main:
                _write_metrics(out, rows)  # metrics.jsonl is always the checkpoint's rows
                _repair_last(out, checkpoint)
            return rows
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            atomic_write(out / SPLIT_FILE, json.dumps(record, indent=1))  # before any checkpoint refers to it

    def log(line: str) -> None:
        if ctx.main:
            with open(out / "train.log", "a") as f:
                f.write(line + "\n")
            if verbose:
                _write(line, progress)

    for w in caught:
        log(f"note: {w.message}")
    if cfg.batch_size % ctx.world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {ctx.world} processes; change one.")
    steps_per_epoch = len(data.train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(data.train)} images) is smaller than one batch of "
                         f"{cfg.batch_size}; lower --batch-size.")
    total_steps = steps_per_epoch * cfg.epochs
    log(f"run {cfg.name}: data {data.describe()}, model {cfg.model}, {total_steps} steps planned"
        + (f", stopping at {cfg.max_steps}" if cfg.max_steps else ""))

    # ---- model, optimizer, schedule: identical on every process (same seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes)
    if cfg.init is not None and checkpoint is None:  # only a new run: a resumed one has trained weights
        from .pretrained import init_from_timm

        log(init_from_timm(model, cfg))
    model.to(ctx.device)
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    use_amp = cfg.amp and ctx.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    mixer = _batch_mixer(cfg, data.num_classes)

    # ---- state of the run, restored from the checkpoint if there is one
    state = {"epoch": 0, "batch": 0, "step": 0, "best_val_acc": -1.0, "rows": [],
             "partial": {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}}
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout and mixup differ between processes
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        model.to(ctx.device)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = checkpoint["state"]
        state["rows"] = [r for r in state["rows"] if not r.get("partial_epoch")]
        _set_rng_state(checkpoint["rng"][ctx.rank])
        log(f"resumed from {resume_path} at step {state['step']}")
    if ctx.main:
        _write_metrics(out, state["rows"])  # drops rows written after the checkpoint we resume from
    info = {"config": cfg.to_dict(), "classes": list(data.classes), "source": data.source, "mean": list(data.mean),
            "std": list(data.std), "model_name": cfg.model, "split_sha256": _split_hash(record)}

    def save(finished: bool) -> None:
        """Write resume.pt, then last.safetensors (all processes' RNG states gathered on process 0)."""
        rng = [_rng_state()]
        if ctx.world > 1:
            rng = [None] * ctx.world
            dist.all_gather_object(rng, _rng_state())
        if ctx.main:
            weights = _plain_weights(model)
            _save_resume({
                **info, "format": FORMAT, "model": weights, "weights_sha256": _weights_hash(weights),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "state": state, "rng": rng, "finished": finished,
            }, resume_path)
            save_weights(out / LAST_FILE, weights, {**info, "kind": "last", "epoch": state["epoch"],
                                                    "step": state["step"], "finished": finished,
                                                    "metrics": state["rows"][-1] if state["rows"] else None})

    budget = min(total_steps, cfg.max_steps or total_steps)
    bar = _progress_bar(progress and ctx.main, total=budget, initial=state["step"], desc=cfg.name)
    stop = state["step"] >= budget
    while state["epoch"] < cfg.epochs and not stop:
        epoch, part = state["epoch"], state["partial"]
        batches = EpochBatches(len(data.train), cfg.batch_size, cfg.seed, epoch, state["batch"], ctx.rank, ctx.world)
        net.train()
        tick = time.perf_counter()
        for images, labels in _loader(data.train, cfg, batch_sampler=batches):
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            targets = labels if mixer is None else mixer(images, labels)
            if mixer is not None:
                images, targets = targets
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=use_amp):
                logits = net(images)  # (B, K)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() sets the next one
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            loss_sum, correct, seen = _all_sum(
                [loss.item() * len(labels), (logits.argmax(-1) == labels).sum().item(), len(labels)], ctx)
            part["loss"] += loss_sum
            part["correct"] += correct
            part["seen"] += seen
            state["batch"] += 1
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{part['loss'] / part['seen']:.3f}", epoch=epoch + 1)
            stop = state["step"] >= budget
            if stop:
                break
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                part["time"] += time.perf_counter() - tick
                tick = time.perf_counter()
                save(finished=False)
        part["time"] += time.perf_counter() - tick

        # ---- end of the epoch (or of the step budget): validate, record, checkpoint
        partial_epoch = state["batch"] < steps_per_epoch
        val = evaluate_model(model, data.val, cfg.eval_batch_size, ctx.device, cfg.num_workers)
        row = {
            "epoch": epoch + 1, "step": state["step"],
            "train_loss": part["loss"] / part["seen"], "train_acc": part["correct"] / part["seen"],
            "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr,
            "images_per_sec": part["seen"] / max(part["time"], 1e-9), "epoch_time": part["time"],
            "data": data.source,
        }
        if partial_epoch:
            row["partial_epoch"] = True  # stopped by max_steps; replaced if the run is continued
        else:
            state["epoch"], state["batch"] = epoch + 1, 0
            state["partial"] = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}
        state["rows"].append(row)
        # best: the best full epoch so far (a budget stop mid-epoch only writes one if there is none yet)
        improved = val["acc"] > state["best_val_acc"] and not partial_epoch
        if improved or (partial_epoch and not (out / BEST_FILE).exists()):
            state["best_val_acc"] = val["acc"] if improved else state["best_val_acc"]
            if ctx.main:
                save_weights(out / BEST_FILE, _plain_weights(model), {
                    **info, "kind": "best", "epoch": epoch + 1, "step": state["step"], "val_acc": val["acc"],
                    "metrics": row})
        # metrics.jsonl first: a kill between the two leaves an extra row that resuming rewrites away
        if ctx.main:
            for entry in _write_metrics(out, state["rows"]):
                if entry.startswith(f"[{len(state['rows']) - 1}]"):  # this epoch's row
                    log(f"warning: {entry.split('.', 1)[1]} of epoch {epoch + 1} is not a finite number; "
                        f"metrics.jsonl holds null there")
        save(finished=stop or state["epoch"] == cfg.epochs)
        log(f"epoch {epoch + 1}/{cfg.epochs} step {state['step']}: train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} last lr {row['lr']:.2e} "
            f"{row['images_per_sec']:.0f} img/s [data: {data.source}]")
        if partial_epoch:
            # restore the partial-epoch counters so a later, longer run continues this epoch exactly
            state["rows"].pop()
            break
    bar.close()
    if ctx.world > 1:
        dist.barrier()
    return read_metrics(out) if ctx.main else state["rows"]


def _finished(checkpoint: dict, cfg: TrainConfig) -> bool:
    """Whether the checkpointed run has nothing left to do under ``cfg``."""
    s = checkpoint["state"]
    return s["epoch"] >= cfg.epochs or (cfg.max_steps is not None and s["step"] >= cfg.max_steps)


def _progress_bar(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, unit="step", dynamic_ncols=True, **kwargs)


def _write(line: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)


# --------------------------------------------------------------------------- command line

DESCRIPTION = ("Train a model of the course. Writes OUT/metrics.jsonl, OUT/best.safetensors, OUT/last.safetensors, "
               "OUT/resume.pt, OUT/split.json and OUT/train.log.")


def epilog(prog: str) -> str:
    """The examples shown by ``--help`` (``prog``: how the command is called)."""
    return (f"examples:\n"
            f"  {prog} --config quick --out runs/quick\n"
            f"  {prog} --config quick --data my_images --out runs/mine --skip-bad-images\n"
            f"  {prog} --config quick --out runs/quick --resume\n"
            f"  {prog} --config quick --data my_images --image-size 96 --init timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k "
            f"--body-lr-scale 0.1 --out runs/ft\n"
            f"  {prog} ... --init timm:vit_tiny_patch16_224 --init-file vit_tiny.safetensors   (offline: a local file)\n"
            f"Under torchrun the same command trains with DistributedDataParallel.")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``vitcourse train`` / ``python -m vitcourse.train`` (one definition for both)."""
    p.add_argument("--config", default="quick", help=f"named configuration: {', '.join(CONFIGS)} (default: quick)")
    p.add_argument("--data", help="cifar10, synthetic, or the path of an image folder (<folder>/<class>/<image>)")
    p.add_argument("--model", help="network: vit, cnn, or an Ultimus variant of chapter 6 (default: the config's)")
    p.add_argument("--data-root", help="CIFAR-10 cache directory (default: $VITCOURSE_DATA or ~/.cache/vitcourse/data)")
    p.add_argument("--epochs", type=int, help="epochs (sets the learning-rate schedule)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="peak learning rate (max_lr for one-cycle)")
    p.add_argument("--subset", type=int, help="train on this many images only")
    p.add_argument("--image-size", type=int, help="side of the square images in pixels (default: the config's, 32; "
                                                  "CIFAR-10 is 32 only, image folders are resized to it)")
    p.add_argument("--init", metavar="timm:NAME",
                   help="start a ViT from this timm checkpoint (e.g. timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k): "
                        "its architecture and weights, a new zero-initialised head for the data's classes, images "
                        "normalised with the checkpoint's mean/std. Training runs at the data's resolution "
                        "(--image-size), not the checkpoint's: the learned position grid is resized bicubically. "
                        "Downloads the weights unless --init-file is given; --resume never reloads them")
    p.add_argument("--init-file", metavar="PATH",
                   help="a local checkpoint file of the --init model (.safetensors, .pth or .npz, as timm loads with "
                        "pretrained_cfg_overlay=dict(file=PATH)); nothing is downloaded")
    p.add_argument("--body-lr-scale", type=float,
                   help="with --init: learning rate of every parameter but the new head, as a multiple of --lr "
                        "(e.g. 0.1; default 1)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--num-workers", type=int, help="data-loading worker processes")
    p.add_argument("--out", help="output directory (default: runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable or corrupt images of an image folder out (they are counted in the log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parser(prog: str = "python -m vitcourse.train") -> argparse.ArgumentParser:
    from .cli import Parser  # errors in one line

    return add_arguments(Parser(prog=prog, description=DESCRIPTION, epilog=epilog(prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The named config with the command-line overrides applied."""
    if args.config not in CONFIGS:
        raise ValueError(f"unknown configuration {args.config!r}; choose one of {', '.join(CONFIGS)}.")
    checks = [
        ("num_workers", lambda v: v >= 0, "--num-workers must be 0 or more"),
        ("seed", lambda v: v >= 0, "--seed must be 0 or more"),
        ("subset", lambda v: v >= 1, "--subset must be a positive number of images"),
        ("lr", lambda v: math.isfinite(v) and v > 0, "--lr must be a positive number"),
        ("body_lr_scale", lambda v: math.isfinite(v) and v >= 0, "--body-lr-scale must be a number >= 0"),
        ("image_size", lambda v: v >= 1, "--image-size must be a positive number of pixels"),
    ]
    for name, ok, message in checks:
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise ValueError(f"{message}, got {value}.")
    for name in ("epochs", "max_steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    cfg = CONFIGS[args.config]
    changes = {k: getattr(args, k) for k in ("data", "model", "data_root", "epochs", "max_steps", "batch_size", "subset",
                                             "seed", "num_workers") if getattr(args, k) is not None}
    if args.lr is not None:
        changes["max_lr" if cfg.schedule == "onecycle" else "lr"] = args.lr
    if args.data is not None:
        changes["allow_synthetic"] = False  # data named explicitly: no silent stand-in
    if args.image_size is not None:
        changes["image_size"] = args.image_size
        if (args.model or cfg.model) == "vit" and args.init is None:
            changes["vit"] = dataclasses.replace(cfg.vit, image_size=args.image_size)
    for flag, value in (("--init-file", args.init_file), ("--body-lr-scale", args.body_lr_scale)):
        if value is not None and args.init is None:
            raise ValueError(f"{flag} only applies to a pretrained start; add --init timm:NAME or leave out {flag}.")
    if args.init is not None:
        if (args.model or cfg.model) != "vit":
            raise ValueError(f"--init starts a ViT from a timm checkpoint, but --model is {args.model or cfg.model!r}; "
                             f"leave out --model or pass --model vit.")
        from .pretrained import with_init

        base = cfg.replace(**{k: v for k, v in changes.items() if k not in ("model", "image_size")})
        cfg = with_init(base, args.init, args.init_file, image_size=args.image_size)
        changes = {} if args.body_lr_scale is None else {"body_lr_scale": args.body_lr_scale}
    return cfg.replace(**changes)


def _data_folder(name: str) -> Path | None:
    """The image folder ``--data`` names, or ``None`` for ``cifar10`` / ``synthetic``."""
    return None if name in ("cifar10", "synthetic") else Path(name).expanduser()


def check_paths(cfg: TrainConfig, out: Path, resume: bool) -> None:
    """Every path of a training run, checked before anything loads: :class:`ValueError` with one sentence."""
    from .cli import check_input_dir, check_out_dir

    folder = _data_folder(cfg.data)
    if folder is not None and (folder.exists() or os.sep in cfg.data or cfg.data.startswith(".")):
        check_input_dir(folder, "--data", "a folder of images laid out as <folder>/<class>/<image>")
    if cfg.data_root is not None and Path(cfg.data_root).expanduser().is_file():
        raise ValueError(f"--data-root {cfg.data_root} is a file, not a folder; pass the folder that holds (or will "
                         f"hold) cifar-10-batches-py.")
    check_out_dir(out, data=folder if folder is not None and folder.is_dir() else None)
    if cfg.init is not None and not (resume and (out / RESUME_FILE).exists()):  # a new run loads the weights
        from .data import downloads_allowed

        if cfg.init_file is not None and not Path(cfg.init_file).expanduser().is_file():
            state = "is a folder" if Path(cfg.init_file).expanduser().is_dir() else "does not exist"
            raise ValueError(f"--init-file {cfg.init_file} {state}; pass the path of a checkpoint file of "
                             f"{cfg.init.removeprefix('timm:')} (.safetensors, .pth or .npz).")
        if cfg.init_file is None and not downloads_allowed():
            raise ValueError(f"--init {cfg.init} needs the checkpoint's weights, but VITCOURSE_OFFLINE is set so "
                             f"nothing is downloaded; pass a local checkpoint file with --init-file PATH.")
    if resume and not (out / RESUME_FILE).exists():
        if (out / "last.pt").exists():
            raise ConfigMismatch(f"{out} holds a run of an older vitcourse (last.pt, before safetensors checkpoints) "
                                 f"that cannot be continued; train into another --out folder.")
        raise ValueError(f"--resume: {out} holds no run to resume; leave out --resume to start a new run there.")


def one_line(err: BaseException) -> str:
    """An exception's message on one line (the command line prints exactly one)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        text = f"could not use a file ({text}); check the path, its permissions and the free disk space."
    return text


def run(args: argparse.Namespace) -> int:
    """Run the parsed command line of ``vitcourse train``; returns the exit code."""
    try:
        cfg = config_from_args(args)
        out = Path(args.out).expanduser() if args.out else runs_dir() / cfg.name
        check_paths(cfg, out, args.resume)
        rows = train(cfg, out, resume=args.resume, progress=not args.no_progress, verbose=True,
                     skip_bad_images=args.skip_bad_images)
    except (DataError, ConfigMismatch, FileExistsError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue later with the same command plus --resume.", file=sys.stderr)
        return 130
    if rows and (not dist.is_initialized() or dist.get_rank() == 0):
        last = rows[-1]
        val_acc = "n/a" if last.get("val_acc") is None else f"{last['val_acc']:.4f}"
        print(f"done: epoch {last['epoch']}, val_acc {val_acc}, data {last['data']}; outputs in {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m vitcourse.train") -> int:
    """Entry point of ``python -m vitcourse.train`` (and ``vitcourse train``); returns the exit code."""
    return run(_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
