"""Small comparative experiments: several seeds of several models, trained on tensors, cached by what decides them.

Chapter 9 (the small-data chapter) compares a ViT with a CNN at several training-set sizes and
ablates three changes to the ViT. Every point is a few seeds of a small model trained on small
images held in memory, so the whole experiment fits in a few CPU minutes. This module holds what
that needs and nothing chapter-specific:

* :class:`Recipe` - the one schedule every compared setting gets (AdamW, linear warmup then
  cosine decay from :func:`vitcourse.train.learning_rates`, label smoothing, crop-and-flip
  augmentation, equal epochs);
* :func:`model_from_spec` - a model from a small JSON-able description (``{"kind": "vit", ...}``
  or ``{"kind": "cnn", "width": ...}``), so the description can name a cached result;
* :func:`train_seed` - one seed of one model: ``(spec, data, recipe, seed) -> test accuracy and
  per-epoch curves``;
* :func:`run_experiments` - many ``(spec, seeds)`` settings at once, spread over worker processes,
  each setting's result stored as JSON in ``runs_dir() / folder`` under a hash of everything that
  determines it (:func:`cache_key`), so a rebuild of the book trains nothing twice;
* sentence pickers (:func:`trend_sentence`, :func:`compare_sentence`, ...) that turn the verdicts of
  :mod:`vitcourse.stats` into the page's prose through small dictionaries.

Why processes and not ``torch.vmap`` over stacked copies of a model: on two CPU cores these
models are so small that one process per core, one thread each, trains about twice as many
images per second as one process; stacking three seeds with ``torch.func.stack_module_state`` and
``vmap`` measured no faster than training them one after the other at batch 64 (and BatchNorm's
running statistics do not go through ``vmap``).
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import math
import multiprocessing
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .paths import atomic_write, runs_dir
from .stats import Estimate, TrendVerdict, Verdict

__all__ = [
    "Recipe", "TensorData", "small_images", "tensors_of", "downsample", "augment_batch", "model_from_spec", "train_seed", "fit",
    "cache_key", "run_experiments", "trend_sentence", "compare_sentence", "gap_sentence", "plateau_sentence",
    "layernorm_sentence",
    "FORMAT",
]

FORMAT = 1
"""The version of the result files; raising it makes every cached result stale."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TensorData:
    """Images and labels held in memory.

    Attributes:
        train_x, train_y: ``(N, C, H, W)`` float (normalised) and ``(N,)`` int64; the largest
            training set; a run on ``n`` images uses the first ``n``.
        val_x, val_y: images never trained on, scored during training for the learning curves.
        test_x, test_y: the images the reported accuracy is measured on.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def digest(self) -> str:
        """A SHA-256 of every tensor's bytes (shapes included): the data's part of a cache key."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            t = t.contiguous()
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def tensors_of(dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack the first ``limit`` (default all) items of a dataset of ``(image (C, H, W), label)``.

    Returns:
        ``(images (N, C, H, W), labels (N,) int64)``.
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.int64)


def downsample(images: Tensor, factor: int) -> Tensor:
    """Average-pool ``(N, C, H, W)`` images by ``factor`` (each output pixel is the mean of a
    ``factor x factor`` block): ``(N, C, H / factor, W / factor)``."""
    if factor < 1 or images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"downsample needs a factor >= 1 that divides the image size {tuple(images.shape[-2:])}, "
                         f"got {factor}.")
    return F.avg_pool2d(images, factor) if factor > 1 else images


def augment_batch(images: Tensor, generator: torch.Generator, pad: int, flip: bool = True) -> Tensor:
    """Random crop after zero padding by ``pad`` pixels (none for 0), and with ``flip`` a horizontal flip
    with probability 1/2, drawn independently for every image: ``(B, C, H, W) -> (B, C, H, W)``.

    Zero is the data's mean after normalisation, so the padding is the mean colour.
    """
    b, _, h, w = images.shape
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
        images = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if not flip:
        return images
    flipped = torch.rand(b, generator=generator) < 0.5
    return torch.where(flipped[:, None, None, None], images.flip(-1), images)


def small_images(train_size: int, val_size: int, test_size: int, factor: int = 2, seed: int = 0) -> tuple[TensorData, object]:
    """CIFAR-10 if it is on disk (else the offline stand-in, with the usual one-line warning), without
    augmentation, average-pooled by ``factor``.

    The ``train_size`` training images are the seeded random subset of
    :func:`vitcourse.train.build_data` (``CONFIGS["quick"]`` with ``subset=train_size``), so the first
    ``n`` of them are a random subset too, and every smaller training set is part of the larger ones;
    ``val_size`` further images of the training pool are held out; the test images are the first
    ``test_size`` of the test set.

    Returns:
        ``(TensorData, DataBundle)``: the tensors ``(N, C, S / factor, S / factor)`` and the bundle they
        came from (for its ``source``, ``classes``, ``mean`` and ``std``).
    """
    from .config import CONFIGS
    from .train import build_data

    bundle = build_data(CONFIGS["quick"].replace(subset=train_size, val_size=val_size, augment="none", seed=seed))
    (tx, ty), (vx, vy), (sx, sy) = tensors_of(bundle.train), tensors_of(bundle.val), tensors_of(bundle.test, test_size)
    order = torch.randperm(len(ty), generator=torch.Generator().manual_seed(seed))  # the split keeps index order
    tx, ty = tx[order], ty[order]
    return TensorData(downsample(tx, factor), ty, downsample(vx, factor), vy, downsample(sx, factor), sy), bundle


# --------------------------------------------------------------------------- models and the recipe


def model_from_spec(spec: Mapping, num_classes: int) -> nn.Module:
    """A model from a JSON-able description.

    * ``{"kind": "vit", **fields}``: :class:`vitcourse.VisionTransformer` of ``ViTConfig(**fields)``;
      the extra field ``"spt_norm": False`` (with ``"stem": "spt"``) swaps in a
      :class:`~vitcourse.small_data.ShiftedPatchTokenization` without its LayerNorm.
    * ``{"kind": "cnn", "width": w}``: :class:`vitcourse.cnn.SmallCNN` of width ``w``.

    The model is initialised from the global random state (seed it first).

    Raises:
        ValueError: an unknown kind, or ``spt_norm`` without ``stem="spt"``.
    """
    from .cnn import SmallCNN
    from .small_data import ShiftedPatchTokenization
    from .vit import VisionTransformer, ViTConfig

    fields = dict(spec)
    kind = fields.pop("kind", None)
    if kind == "cnn":
        return SmallCNN(num_classes, width=int(fields.get("width", 32)), in_channels=int(fields.get("in_channels", 3)))
    if kind != "vit":
        raise ValueError(f"a model spec's kind must be 'vit' or 'cnn', got {kind!r}.")
    spt_norm = fields.pop("spt_norm", True)
    config = ViTConfig(**{**fields, "num_classes": num_classes})
    if spt_norm is False and config.stem != "spt":
        raise ValueError(f"spt_norm=False needs stem='spt', got stem={config.stem!r}.")
    model = VisionTransformer(config)
    if spt_norm is False:
        model.patch_embed = ShiftedPatchTokenization(config.image_size, config.patch_size, config.in_channels,
                                                     config.dim, norm=False)
        model.reset_parameters()  # the new projection gets the same initialisation as every other linear
    return model


@dataclass(frozen=True)
class Recipe:
    """The training schedule every compared setting gets.

    AdamW (weight decay by the course's one rule, :func:`vitcourse.optim.param_groups`), a
    linear warmup over ``warmup_epochs`` then cosine decay to 0 over ``epochs`` (the same schedule
    as ``vitcourse.train``'s ``"cosine"``), cross-entropy with ``label_smoothing``, gradient norm
    clipped at ``grad_clip``, and each training batch augmented by :func:`augment_batch` with
    ``crop_pad`` (0 with ``flip=False`` switches augmentation off). The last incomplete batch of
    an epoch is kept, so a training set smaller than a batch still trains.
    ``eval_points`` evenly spaced epochs (the last always among them) score the validation images.
    """

    epochs: int
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    crop_pad: int = 2
    flip: bool = True
    eval_points: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1 and self.batch_size >= 1 and self.eval_points >= 1
                and self.lr > 0 and 0 <= self.warmup_epochs <= self.epochs):
            raise ValueError(f"a Recipe needs epochs, batch_size and eval_points >= 1, lr > 0 and "
                             f"0 <= warmup_epochs <= epochs; got {self}.")

    def eval_epochs(self) -> list[int]:
        """The (1-based) epochs after which the validation images are scored, the last one included."""
        return sorted({max(1, round(self.epochs * (i + 1) / self.eval_points)) for i in range(self.eval_points)})

    def learning_rates(self, steps_per_epoch: int) -> list[float]:
        """The learning rate of every optimizer step (``epochs * steps_per_epoch`` values)."""
        from .config import TrainConfig
        from .train import learning_rates

        cfg = TrainConfig(lr=self.lr, schedule="cosine", warmup_epochs=self.warmup_epochs, epochs=self.epochs)
        return learning_rates(cfg, steps_per_epoch)


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    model.train()
    return correct / len(labels)


def train_seed(spec: Mapping, data: TensorData, size: int, recipe: Recipe, seed: int) -> dict:
    """Train one model of ``spec`` on the first ``size`` training images with ``recipe``, from ``seed``.

    The seed fixes the initial weights, the order of the batches and every augmentation.

    Returns:
        ``{"test_acc": float, "train_acc": [per epoch], "val_epochs": [...], "val_acc": [...]}``;
        ``train_acc`` is the accuracy on the epoch's augmented training batches, measured while training.
    """
    if not 1 <= size <= len(data.train_y):
        raise ValueError(f"size must be between 1 and the {len(data.train_y)} training images, got {size}.")
    torch.manual_seed(seed)
    return fit(model_from_spec(spec, _num_classes(data)), data, size, recipe, seed)


def _num_classes(data: TensorData) -> int:
    return int(max(data.train_y.max(), data.test_y.max())) + 1


def _epoch(x: Tensor, size: int, recipe: Recipe, generator: torch.Generator) -> Iterable[tuple[Tensor, Tensor]]:
    """One epoch of train_seed's batches, ``(indices, augmented images)``, drawn from ``generator``."""
    order = torch.randperm(size, generator=generator)
    for start in range(0, size, recipe.batch_size):
        idx = order[start:start + recipe.batch_size]
        images = x[idx]
        if recipe.crop_pad or recipe.flip:
            images = augment_batch(images, generator, recipe.crop_pad, recipe.flip)
        yield idx, images


def fit(model: nn.Module, data: TensorData, size: int, recipe: Recipe, seed: int,
        teacher: nn.Module | None = None) -> dict:
    """Train ``model`` in place on the first ``size`` training images (the same optimizer,
    schedule, batches and augmentation for a given ``seed``); returns :func:`train_seed`'s ``{"test_acc", "train_acc",
    "val_epochs", "val_acc"}``.

    With a ``teacher`` (in eval mode, scoring each batch as the student sees it) the model must be a distilled
    ViT, trained on DeiT's hard-label loss ``1/2 CE(z_cls, y_smooth) + 1/2 CE(z_dist, argmax z_teacher)``:
    the labels carry the recipe's label smoothing, the teacher's classes do not.
    """
    from .distill import DistillationLoss
    from .optim import param_groups

    x, y = data.train_x[:size], data.train_y[:size]
    classes = _num_classes(data)
    criterion = None if teacher is None else DistillationLoss(teacher.eval(), kind="hard", alpha=0.5)
    rates = recipe.learning_rates(math.ceil(size / recipe.batch_size))
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr)
    generator = torch.Generator().manual_seed(seed)
    evaluate_at = set(recipe.eval_epochs())
    result: dict = {"train_acc": [], "val_epochs": [], "val_acc": []}
    step = 0
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        correct = 0
        for idx, images in _epoch(x, size, recipe, generator):
            for group in optimizer.param_groups:
                group["lr"] = rates[step]
            outputs = model(images)  # (B, K), or the pair (cls, dist) of a distilled ViT
            if criterion is None:
                logits = outputs
                loss = F.cross_entropy(logits, y[idx], label_smoothing=recipe.label_smoothing)
            else:
                eps = recipe.label_smoothing  # CE with these targets is CE with label_smoothing=eps
                targets = F.one_hot(y[idx], classes).float() * (1 - eps) + eps / classes  # (B, K)
                loss = criterion(images, outputs, targets)
                logits = (outputs[0] + outputs[1]) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            correct += int((logits.detach().argmax(-1) == y[idx]).sum())
            step += 1
        result["train_acc"].append(correct / size)
        if epoch in evaluate_at:
            result["val_epochs"].append(epoch)
            result["val_acc"].append(_accuracy(model, data.val_x, data.val_y))
    result["test_acc"] = _accuracy(model, data.test_x, data.test_y)
    return result


# --------------------------------------------------------------------------- caching and running many settings


def cache_key(spec: Mapping, size: int, recipe: Recipe, seeds: Sequence[int], data_digest: str) -> str:
    """A hex digest of everything that decides a setting's result: the model description, the
    training-set size, the recipe, the seeds, the data's bytes (:meth:`TensorData.digest`) and
    :data:`FORMAT`. Any change to one of them gives another key, hence another cache file."""
    settings = {"spec": dict(sorted(spec.items())), "size": int(size), "recipe": asdict(recipe),
                "seeds": [int(s) for s in seeds], "data": data_digest, "format": FORMAT}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


_WORKER_DATA: TensorData | None = None


def _init_worker(data: TensorData) -> None:
    global _WORKER_DATA
    torch.set_num_threads(1)  # one core per process
    _WORKER_DATA = data


def _job(spec: Mapping, size: int, recipe: Recipe, seed: int) -> dict:
    assert _WORKER_DATA is not None
    return train_seed(spec, _WORKER_DATA, size, recipe, seed)


def run_experiments(settings: Mapping[str, tuple[Mapping, int]], data: TensorData, recipe: Recipe,
                    seeds: Sequence[int], folder: str, workers: int = 2,
                    progress: Callable[[Iterable, int], Iterable] | None = None) -> dict[str, list[dict]]:
    """Train every setting with every seed, or read its cached result.

    Args:
        settings: ``{label: (spec, size)}``: a model description (:func:`model_from_spec`) and a
            training-set size.
        data: the images; every setting uses the same validation and test images.
        recipe: the schedule, the same for every setting.
        seeds: the seeds each setting is trained with.
        folder: the folder under :func:`vitcourse.paths.runs_dir` holding the result files.
        workers: processes training in parallel (1: train in this process).
        progress: called as ``progress(finished_runs, how_many)`` to wrap the iterable of runs as they finish,
            e.g. ``lambda runs, n: tqdm(runs, total=n)`` (optional).

    Returns:
        ``{label: [one result of train_seed per seed]}``. Each setting's results are stored in
        ``runs_dir() / folder / f"{cache_key(...)}.json"`` as soon as its last seed is done, and
        read from there on the next call.
    """
    if not seeds:
        raise ValueError("run_experiments needs at least one seed.")
    digest = data.digest()
    out_dir = runs_dir() / folder
    results: dict[str, list[dict]] = {}
    paths, todo = {}, []
    for label, (spec, size) in settings.items():
        path = out_dir / f"{cache_key(spec, size, recipe, seeds, digest)}.json"
        paths[label] = path
        try:
            stored = json.loads(path.read_text())
            if stored.get("format") == FORMAT and len(stored.get("runs", [])) == len(seeds):
                results[label] = stored["runs"]
                continue
        except (OSError, ValueError):
            pass  # not cached yet, or unreadable: train
        todo += [(label, spec, size, seed) for seed in seeds]
    done: dict[str, dict[int, dict]] = {}

    def finish(label: str, seed: int, run: dict) -> None:
        done.setdefault(label, {})[seed] = run
        if len(done[label]) == len(seeds):
            spec, size = settings[label]
            results[label] = [done[label][s] for s in seeds]
            record = {"format": FORMAT, "label": label, "spec": dict(spec), "size": size, "recipe": asdict(recipe),
                      "seeds": list(seeds), "data": digest, "runs": results[label]}
            atomic_write(paths[label], json.dumps(record))

    todo.sort(key=lambda job: -job[2])  # the largest training sets first: the workers finish together
    def wrap(iterable):
        return progress(iterable, len(todo)) if progress else iterable

    if workers <= 1 or len(todo) <= 1:
        for label, spec, size, seed in wrap(todo):
            finish(label, seed, train_seed(spec, data, size, recipe, seed))
    elif todo:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
        with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                         initargs=(data,)) as pool:
            jobs = {pool.submit(_job, spec, size, recipe, seed): (label, seed) for label, spec, size, seed in todo}
            for job in wrap(futures.as_completed(jobs)):
                label, seed = jobs[job]
                finish(label, seed, job.result())
    return {label: results[label] for label in settings}


# --------------------------------------------------------------------------- verdicts into sentences

_TREND = {
    "agrees": ("the ViT closes the gap as the training set grows, by {slope:+.1f} points per tenfold more images "
               "(± {se:.1f}): the direction the ViT paper's argument predicts"),
    "contradicts": ("the gap widens as the training set grows, by {slope:+.1f} points per tenfold more images "
                    "(± {se:.1f}): in this range more data helps the CNN more than the ViT, the opposite of the "
                    "direction the ViT paper's argument predicts"),
    "inconclusive": ("the gap's change with the training-set size, {slope:+.1f} points per tenfold more images "
                     "(± {se:.1f}), is within its noise: this range cannot tell whether the ViT gains on the CNN"),
}


def trend_sentence(verdict: TrendVerdict, slope_points: float, se_points: float) -> str:
    """The sentence (no final full stop) for a :func:`vitcourse.stats.trend` verdict on the ViT-minus-CNN
    gap, with the slope and its standard error in points per tenfold (decade) of training images."""
    if verdict not in _TREND:
        raise ValueError(f"verdict must be one of {', '.join(_TREND)}, got {verdict!r}.")
    return _TREND[verdict].format(slope=slope_points, se=se_points)


_COMPARE = {
    "higher": "{name} is ahead of {other} by {size:.1f} ± {se:.1f} points, beyond the noise floor of {floor:.1f}",
    "lower": "{name} is behind {other} by {size:.1f} ± {se:.1f} points, beyond the noise floor of {floor:.1f}",
    "noise": ("{name} differs from {other} by {delta:+.1f} ± {se:.1f} points, within the noise floor of {floor:.1f}, "
              "so no difference is shown"),
}


def compare_sentence(name: str, other: str, a: Estimate, b: Estimate, verdict: Verdict, z: float = 2.0) -> str:
    """One clause on ``a`` (called ``name``) against ``b`` (``other``): the difference in points with its
    standard error, and whether it clears the noise floor, as decided by :func:`vitcourse.stats.compare`."""
    if verdict not in _COMPARE:
        raise ValueError(f"verdict must be one of {', '.join(_COMPARE)}, got {verdict!r}.")
    se = math.hypot(a.se, b.se)
    delta = 100 * (a.mean - b.mean)
    return _COMPARE[verdict].format(name=name, other=other, delta=delta, size=abs(delta), se=100 * se,
                                    floor=100 * z * se)


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def gap_sentence(sizes: Sequence[int], verdicts: Sequence[Verdict]) -> str:
    """Where the ViT is ahead of the CNN, behind it, or within noise, from per-size :func:`~vitcourse.stats.compare`
    verdicts of ViT against CNN (no final full stop), e.g. "the CNN is ahead beyond noise at every size"."""
    if len(sizes) != len(verdicts) or not sizes:
        raise ValueError("gap_sentence needs one verdict per size.")
    groups = {v: [f"{s:,}" for s, w in zip(sizes, verdicts) if w == v] for v in ("higher", "lower", "noise")}
    who = {"higher": "the ViT is ahead beyond noise", "lower": "the CNN is ahead beyond noise",
           "noise": "the two are within noise of each other"}
    for v, members in groups.items():
        if len(members) == len(sizes):
            return f"{who[v]} at every size"
    parts = [f"{who[v]} at {_listing(members)} images" for v, members in groups.items() if members]
    return "; ".join(parts)


_PLATEAU = {
    True: ("over the last {share} of the epochs no setting's mean validation accuracy rose beyond its noise "
           "(the largest change was {change:+.1f} points, {label}), so every setting had stopped improving"),
    False: ("over the last {share} of the epochs the mean validation accuracy of {rising} still rose beyond its "
            "noise (the largest change was {change:+.1f} points, {label}), so longer training could change the "
            "comparison"),
}


def plateau_sentence(rising: Sequence[str], largest_change_points: float, label: str, share: str = "third") -> str:
    """Whether training had levelled off (no final full stop).

    Args:
        rising: the settings whose mean validation accuracy at the end is ``"higher"`` than at the start of
            the last ``share`` of training (:func:`vitcourse.stats.compare`); empty if none.
        largest_change_points: the largest change of mean validation accuracy over that stretch, in points.
        label: the setting it belongs to.
    """
    return _PLATEAU[not rising].format(share=share, change=largest_change_points, label=label,
                                       rising=_listing(list(rising)) if rising else "")


_LAYERNORM = {
    "higher": ("Without its LayerNorm, SPT scored higher beyond noise: on these images, normalising each token's "
               "raw pixels costs SPT accuracy"),
    "lower": ("Without its LayerNorm, SPT scored lower beyond noise: on these images the normalisation helps SPT, "
              "so it does not explain a loss"),
    "noise": ("Without its LayerNorm, SPT scored within noise of SPT with it: these runs show no effect of the "
              "LayerNorm, so they give no support to blaming it for what SPT does here"),
}


def layernorm_sentence(verdict: Verdict) -> str:
    """What the SPT-without-LayerNorm run shows, from ``compare(spt_without_norm, spt_with_norm)`` (no full stop)."""
    if verdict not in _LAYERNORM:
        raise ValueError(f"verdict must be one of {', '.join(_LAYERNORM)}, got {verdict!r}.")
    return _LAYERNORM[verdict]
