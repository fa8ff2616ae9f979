"""Chapter 10: a ViT from a small labelled set, by distillation from a CNN and by masked-image pretraining.

On chapter 9's data and models, with its recipe but augmentation on (random crops after padding by 2 pixels and
horizontal flips, the defaults of :class:`~vitcourse.experiments.Recipe` that chapter 9's small-data runs switch
off), at one training-set size, every *stage* runs once per seed:

* ``"cnn"`` - chapter 9's SmallCNN, also the teacher of the distilled ViT of its seed; its result also holds
  how often its top class differs from the label on the augmented training views that student trains on
  (:func:`teacher_disagreement`): without augmentation a teacher that fits its training images only repeats
  the labels, and hard distillation could show no effect;
* ``"scratch"`` - chapter 9's ViT from random weights;
* ``"distilled"`` - that ViT with ``distilled=True``, trained on DeiT's hard-label loss (Touvron et al. 2021)
  ``1/2 CE(z_cls, y) + 1/2 CE(z_dist, argmax z_teacher)`` (:mod:`vitcourse.distill`);
* ``"mae"`` - a masked autoencoder with that ViT as encoder (He et al. 2022), pretrained on the training
  images without their labels; ``"finetuned"`` - its encoder fine-tuned with the recipe of ``"scratch"``;
* ``"probe"`` - a linear classifier on the frozen MAE encoder's CLS features;
* ``"finetuned_init"`` and ``"probe_init"`` - the same two on the MAE's weights *before* pretraining: the
  controls that separate what pretraining added from what MAE's initialisation and positions change.

Every ViT trains in :func:`fit`, :func:`vitcourse.experiments.train_seed`'s loop given a model (and
optionally a teacher); on the plain ViT it gives train_seed's result exactly. Each result is stored in
``runs_dir() / folder`` as JSON (weights the later stages start from as ``.pt``) under a hash of everything
that decides it, so rebuilding the book trains nothing twice. :func:`sentence` turns the verdicts of
:func:`vitcourse.stats.compare` into the page's prose.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import io
import json
import math
import multiprocessing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experiments import (  # _accuracy: eval mode
    Recipe,
    TensorData,
    _accuracy,
    _epoch,
    _num_classes,
    fit,
    model_from_spec,
)
from .mae import MAE, NORM_PIX_EPS, patchify, unpatchify
from .optim import param_groups
from .paths import atomic_write, runs_dir
from .stats import Estimate, Z, accuracy_se, compare
from .vit import VisionTransformer, ViTConfig

__all__ = ["DATA", "VIT", "CNN", "RECIPE", "Pretrain", "Probe", "Plan", "STAGES", "NEEDS", "fit", "pretrain_mae",
           "build_mae", "linear_probe", "reconstruct", "run_job", "run", "load_mae", "chance_estimate", "VIT_NAMES",
           "best_vit", "COMPARISONS", "sentence", "FORMAT", "teacher_disagreement"]

FORMAT = 2
"""The version of the result files; raising it makes every cached result stale."""

# Chapter 9's small-data experiment: its small_images call, its ViT and CNN, its recipe but with augmentation on
# (chapter 9 switches it off; Recipe's defaults crop_pad=2, flip=True), so that a teacher's top class for the view a
# student sees can differ from the label.
DATA = {"train_size": 1000, "val_size": 500, "test_size": 4000, "factor": 2}
VIT = {"kind": "vit", "image_size": 16, "patch_size": 4, "dim": 64, "depth": 4, "heads": 4, "mlp_dim": 128}
CNN = {"kind": "cnn", "width": 22}
RECIPE = Recipe(epochs=24, batch_size=32, lr=2e-3, weight_decay=0.05, warmup_epochs=2.0, label_smoothing=0.1,
                crop_pad=2, flip=True, eval_points=6)


@dataclass(frozen=True)
class Pretrain:
    """MAE pretraining: AdamW with the MAE paper's betas (0.9, 0.95), linear warmup then cosine decay,
    ``mask_ratio`` of the patches hidden, a narrow shallow decoder, the normalised-pixel target."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 3.0
    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True


@dataclass(frozen=True)
class Probe:
    """A linear probe: standardised features, a linear layer trained full-batch with AdamW for ``steps``."""

    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-3


@dataclass(frozen=True)
class Plan:
    """Everything that decides the chapter's runs besides the data."""

    size: int = 500
    seeds: tuple[int, ...] = (0, 1, 2)
    vit: Mapping = field(default_factory=lambda: dict(VIT))
    cnn: Mapping = field(default_factory=lambda: dict(CNN))
    recipe: Recipe = RECIPE
    pretrain: Pretrain = Pretrain()
    probe: Probe = Probe()


STAGES = ("cnn", "mae", "scratch", "distilled", "finetuned", "probe", "finetuned_init", "probe_init")
"""The jobs of one seed, in the order they are started (those others wait for first)."""
NEEDS = {"distilled": "cnn", "finetuned": "mae", "probe": "mae"}
"""The stage whose weights (of the same seed) a stage starts from; ``*_init`` start from the MAE's initial ones."""


# --------------------------------------------------------------------------- training


@torch.no_grad()
def teacher_disagreement(teacher: nn.Module, data: TensorData, size: int, recipe: Recipe, seed: int) -> float:
    """The share of the augmented training views a student trained by :func:`fit` with ``seed`` sees, over all
    its epochs, on which ``teacher``'s top class (in eval mode) is not the label: where hard distillation tells
    the student something the labels do not. It replays fit's draws, so the views are exactly the student's."""
    x, y = data.train_x[:size], data.train_y[:size]
    was_training = teacher.training
    teacher.eval()
    generator = torch.Generator().manual_seed(seed)
    differ = seen = 0
    for _ in range(recipe.epochs):
        for idx, images in _epoch(x, size, recipe, generator):
            differ += int((teacher(images).argmax(-1) != y[idx]).sum())
            seen += len(idx)
    teacher.train(was_training)
    return differ / seen


def build_mae(spec: Mapping, pretrain: Pretrain, num_classes: int) -> MAE:
    """An :class:`~vitcourse.mae.MAE` whose encoder is the ViT of ``spec`` (``{"kind": "vit", ...}``)."""
    config = ViTConfig(**{**{k: v for k, v in spec.items() if k != "kind"}, "num_classes": num_classes})
    return MAE(config, decoder_dim=pretrain.decoder_dim, decoder_depth=pretrain.decoder_depth,
               decoder_heads=pretrain.decoder_heads, norm_pix_loss=pretrain.norm_pix_loss)


@torch.no_grad()
def _predict(mae: MAE, images: Tensor, mask_ratio: float, seed: int) -> tuple[Tensor, Tensor]:
    """The eval-mode decoder output ``(B, N, P*P*C)`` and mask ``(B, N)`` with masks drawn from ``seed``."""
    latent, mask, ids_restore = mae.eval().forward_encoder(images, mask_ratio, torch.Generator().manual_seed(seed))
    return mae.forward_decoder(latent, ids_restore), mask


def _masked_loss(mae: MAE, images: Tensor, mask_ratio: float, seed: int, flat: bool = False) -> float:
    """The reconstruction loss on ``images``; ``flat``: of predicting 0 for every pixel (with the normalised
    target, each hidden patch's own mean: what a decoder that learned nothing would do)."""
    pred, mask = _predict(mae, images, mask_ratio, seed)
    return float(mae.reconstruction_loss(images, torch.zeros_like(pred) if flat else pred, mask))


def pretrain_mae(data: TensorData, size: int, spec: Mapping, pretrain: Pretrain, seed: int) -> tuple[MAE, dict]:
    """Pretrain an MAE on the first ``size`` training images; their labels are never read.

    Returns:
        ``(mae in eval mode, {"loss": [mean training loss per epoch], "val_loss": float, "flat_loss": float})``,
        the last two on the validation images with fixed masks: the trained decoder's loss and that of a
        decoder predicting a flat patch.
    """
    torch.manual_seed(seed)
    mae = build_mae(spec, pretrain, _num_classes(data))
    x = data.train_x[:size]  # (N, C, H, W); no labels
    bs = pretrain.batch_size
    schedule = Recipe(epochs=pretrain.epochs, batch_size=bs, lr=pretrain.lr, warmup_epochs=pretrain.warmup_epochs)
    rates = schedule.learning_rates(math.ceil(size / bs))  # linear warmup, cosine decay
    optimizer = torch.optim.AdamW(param_groups(mae, pretrain.weight_decay), lr=pretrain.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    losses, step = [], 0
    mae.train()
    for _ in range(pretrain.epochs):
        order, total = torch.randperm(size, generator=generator), 0.0
        for start in range(0, size, bs):
            images = x[order[start:start + bs]]
            for group in optimizer.param_groups:
                group["lr"] = rates[step]
            loss, _, _ = mae(images, pretrain.mask_ratio, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(images)
            step += 1
        losses.append(total / size)
    record = {"loss": losses, "val_loss": _masked_loss(mae, data.val_x, pretrain.mask_ratio, seed),
              "flat_loss": _masked_loss(mae, data.val_x, pretrain.mask_ratio, seed, flat=True)}
    return mae.eval(), record


@torch.no_grad()
def _cls_features(vit: VisionTransformer, images: Tensor, batch_size: int = 1000) -> Tensor:
    """The CLS token after the final LayerNorm: ``(N, C, H, W) -> (N, D)``."""
    vit.eval()
    return torch.cat([vit.forward_features(images[i:i + batch_size])[:, 0] for i in range(0, len(images), batch_size)])


def linear_probe(vit: VisionTransformer, data: TensorData, size: int, probe: Probe, seed: int) -> dict:
    """Train a linear classifier on the frozen ``vit``'s CLS features of the first ``size`` training images,
    each feature standardised by its training mean and deviation. Returns ``{"test_acc", "train_acc"}``."""
    train, test = _cls_features(vit, data.train_x[:size]), _cls_features(vit, data.test_x)  # (N, D)
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    y = data.train_y[:size]
    torch.manual_seed(seed)
    head = nn.Linear(train.shape[1], _num_classes(data))
    optimizer = torch.optim.AdamW(head.parameters(), lr=probe.lr, weight_decay=probe.weight_decay)
    for _ in range(probe.steps):
        loss = F.cross_entropy(head(train), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return {"test_acc": float((head(test).argmax(-1) == data.test_y).float().mean()),
                "train_acc": float((head(train).argmax(-1) == y).float().mean())}


@torch.no_grad()
def reconstruct(mae: MAE, images: Tensor, mask_ratio: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """What a trained MAE paints into the patches it did not see.

    Returns:
        ``(prediction (B, C, H, W), mask (B, 1, H, W))``: the decoder's output for every patch, in the
        images' (normalised) pixel space, and 1 on hidden pixels. With ``norm_pix_loss`` the decoder predicts
        each patch's pixels normalised by the patch's own mean and deviation; they are undone with the
        *true* patch's statistics, as in the MAE authors' visualisation.
    """
    pred, mask = _predict(mae, images, mask_ratio, seed)  # (B, N, P*P*C), (B, N)
    p, c = mae.config.patch_size, mae.config.in_channels
    if mae.norm_pix_loss:
        raw = patchify(images, p)  # (B, N, P*P*C), as the target before its normalisation
        pred = pred * (raw.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt() + raw.mean(-1, keepdim=True)
    mask_image = unpatchify(mask[..., None].expand(-1, -1, p * p * c).contiguous(), p, c)[:, :1]
    return unpatchify(pred, p, c), mask_image


# --------------------------------------------------------------------------- jobs, cache and workers


def _settings(stage: str, plan: Plan, digest: str) -> dict:
    """Everything that decides one stage's result but the seed, the stage it starts from included."""
    recipe, vit, pretrain = asdict(plan.recipe), dict(plan.vit), asdict(plan.pretrain)
    own = {"cnn": {"spec": dict(plan.cnn), "recipe": recipe}, "scratch": {"spec": vit, "recipe": recipe},
           "distilled": {"spec": {**vit, "distilled": True}, "recipe": recipe, "loss": "hard", "alpha": 0.5},
           "mae": {"spec": vit, "pretrain": pretrain}, "finetuned": {"recipe": recipe},
           "probe": {"probe": asdict(plan.probe)}}[stage.removesuffix("_init")]
    if stage in NEEDS:
        own["from"] = _settings(NEEDS[stage], plan, digest)
    elif stage.endswith("_init"):  # the MAE of the seed before pretraining
        own["from"] = {"spec": vit, "pretrain": pretrain}
    return {"stage": stage, "size": plan.size, "data": digest, "format": FORMAT, **own}


def run_job(stage: str, seed: int, plan: Plan, data: TensorData, source: str | None = None
            ) -> tuple[dict, dict | None]:
    """One seed of one stage: ``(result, weights to keep or None)``; ``source`` is the ``.pt`` file of the
    stage it starts from (:data:`NEEDS`: the teacher CNN, or the pretrained MAE)."""
    classes = _num_classes(data)
    if stage == "mae":
        mae, record = pretrain_mae(data, plan.size, plan.vit, plan.pretrain, seed)
        return record, mae.state_dict()
    if stage in ("cnn", "scratch", "distilled"):
        torch.manual_seed(seed)
        spec = {"cnn": plan.cnn, "scratch": plan.vit, "distilled": {**plan.vit, "distilled": True}}[stage]
        model, teacher = model_from_spec(spec, classes), None
        if stage == "distilled":
            teacher = model_from_spec(plan.cnn, classes)
            teacher.load_state_dict(torch.load(source, weights_only=True))
        result = fit(model, data, plan.size, plan.recipe, seed, teacher)
        if stage == "cnn":  # where the teacher's top class is not the label, it says what the labels do not
            result["train_agreement"] = _accuracy(model, data.train_x[:plan.size], data.train_y[:plan.size])
            result["view_disagreement"] = teacher_disagreement(model, data, plan.size, plan.recipe, seed)
        return result, model.state_dict() if stage == "cnn" else None
    torch.manual_seed(seed)  # for "*_init": the MAE of this seed before pretraining, as pretrain_mae draws it
    mae = (build_mae(plan.vit, plan.pretrain, classes).eval() if stage.endswith("_init")
           else load_mae(source, plan, classes))
    torch.manual_seed(seed)
    vit = mae.to_vit(classes)  # a fresh head, drawn from this seed
    if stage.startswith("finetuned"):
        return fit(vit, data, plan.size, plan.recipe, seed), None
    return linear_probe(vit, data, plan.size, plan.probe, seed), None


def load_mae(path: str | Path, plan: Plan, num_classes: int) -> MAE:
    """The MAE of ``plan`` with the weights stored at ``path``, in eval mode."""
    mae = build_mae(plan.vit, plan.pretrain, num_classes)
    mae.load_state_dict(torch.load(path, weights_only=True))
    return mae.eval()


def run(data: TensorData, plan: Plan = Plan(), folder: str = "ch10", workers: int = 2,
        progress: Callable[[Iterable, int], Iterable] | None = None) -> dict[str, list[dict]]:
    """Run every stage of ``plan`` with every seed, or read its stored result.

    A job starts as soon as the stage it needs (:data:`NEEDS`) is done for its seed; its result goes to
    ``runs_dir() / folder / "<stage>-<hash>.json"``, with weights in ``.pt`` for the stages others start from.
    ``progress(finished_jobs, how_many)`` may wrap the jobs as they finish (e.g. tqdm). Returns ``{stage: [one
    result per seed]}``; the ``"cnn"`` and ``"mae"`` results also hold ``"weights"``, their ``.pt`` file's path.
    """
    digest, out = data.digest(), runs_dir() / folder
    def name(stage, seed):  # "<stage>-<hash of its settings and seed>"
        text = json.dumps({**_settings(stage, plan, digest), "seed": int(seed)}, sort_keys=True)
        return out / f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    files = {(stage, seed): name(stage, seed) for stage in STAGES for seed in plan.seeds}
    done: dict[tuple[str, int], dict] = {}
    for job, path in files.items():
        try:
            stored = json.loads(path.with_suffix(".json").read_text())
            if stored.get("format") == FORMAT and (job[0] not in NEEDS.values() or path.with_suffix(".pt").is_file()):
                done[job] = stored["result"]
        except (OSError, ValueError, KeyError):
            pass  # not stored yet, or unreadable: run it
    todo = [job for job in files if job not in done]  # in STAGES order: the stages others wait for first

    def source(job):
        need = NEEDS.get(job[0])
        return None if need is None else str(files[need, job[1]].with_suffix(".pt"))

    def ready():
        jobs = [job for job in todo if NEEDS.get(job[0]) is None or (NEEDS[job[0]], job[1]) in done]
        todo[:] = [job for job in todo if job not in jobs]
        return jobs

    def finish(job, result, weights):
        if weights is not None:
            buffer = io.BytesIO()
            torch.save(weights, buffer)
            atomic_write(files[job].with_suffix(".pt"), buffer.getvalue())
        record = {"format": FORMAT, "settings": _settings(job[0], plan, digest), "seed": job[1], "result": result}
        atomic_write(files[job].with_suffix(".json"), json.dumps(record))
        done[job] = result

    def finished():
        pool = futures.ThreadPoolExecutor(1) if workers <= 1 else futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),  # a fresh interpreter: no forked thread pools
            initializer=torch.set_num_threads, initargs=(1,))  # one core per process
        with pool:  # the data (a few MB) travels with each job
            running = {pool.submit(run_job, *job, plan, data, source(job)): job for job in ready()}
            while running:
                ended, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in ended:
                    job = running.pop(future)
                    finish(job, *future.result())
                    yield job
                running.update({pool.submit(run_job, *job, plan, data, source(job)): job for job in ready()})

    for _ in (progress(finished(), len(todo)) if progress and todo else finished()):
        pass
    results = {stage: [dict(done[stage, seed]) for seed in plan.seeds] for stage in STAGES}
    for stage in NEEDS.values():
        for seed, result in zip(plan.seeds, results[stage]):
            result["weights"] = str(files[stage, seed].with_suffix(".pt"))
    return results


# --------------------------------------------------------------------------- verdicts into sentences


def chance_estimate(test_labels: Tensor, num_classes: int) -> Estimate:
    """What a classifier that ignores its input scores: the larger of ``1 / num_classes`` and the most frequent
    class's share of ``test_labels``, with the test set's binomial standard error."""
    share = max(1 / num_classes, float(torch.bincount(test_labels, minlength=num_classes).max()) / len(test_labels))
    return Estimate(share, accuracy_se(share, len(test_labels)))


VIT_NAMES = {"scratch": "the ViT from scratch", "distilled": "the distilled ViT", "finetuned": "the MAE-pretrained ViT"}


def best_vit(estimates: Mapping[str, Estimate]) -> str:
    """The stage of :data:`VIT_NAMES` with the highest mean accuracy."""
    return max(VIT_NAMES, key=lambda stage: estimates[stage].mean)


_SAY = {"higher": "{a} is ahead of {b} by {size:.1f} ± {se:.1f} points, beyond the noise floor of {floor:.1f}: ",
        "lower": "{a} is behind {b} by {size:.1f} ± {se:.1f} points, beyond the noise floor of {floor:.1f}: ",
        "noise": "{a} differs from {b} by {delta:+.1f} ± {se:.1f} points, within the noise floor of {floor:.1f}: "}
_MEANING = {  # comparison: (a, b, what each verdict means)
    "distilled": ("the distilled ViT", "the ViT from scratch", {
        "higher": "the teacher's labels helped", "lower": "here the teacher's labels cost accuracy",
        "noise": "this budget cannot tell whether distillation helps"}),
    "finetuned": ("the MAE-pretrained ViT", "the ViT from scratch", {
        "higher": "pretraining without labels helped the fine-tune", "lower": "here the pretraining cost accuracy",
        "noise": "this budget cannot tell whether MAE pretraining helps"}),
    "probe": ("a linear probe on the frozen MAE encoder ({pa:.1f}%)", "chance ({pb:.1f}%)", {
        "higher": "the frozen encoder's features carry class information a linear classifier can read",
        "lower": "a classifier worse than ignoring its input points to a fault, not to a weak encoder",
        "noise": "this budget cannot tell whether the features carry class information"}),
    "finetuned_init": ("the MAE-pretrained ViT", "the same fine-tune from the MAE's weights before pretraining", {
        "higher": "the pretraining itself helped", "lower": "the pretraining itself cost accuracy",
        "noise": "this budget cannot tell whether the pretraining itself changed anything"}),
    "probe_init": ("the probe on the pretrained encoder", "the same probe on its weights before pretraining", {
        "higher": "the pretraining, not the architecture alone, made the classes readable",
        "lower": "at this budget pretraining left the CLS features less readable than random ones",
        "noise": "this budget cannot tell whether pretraining made the features more readable than random ones"}),
    "cnn": ("{name}, the best ViT here,", "the CNN", {
        "higher": "at this budget it closes chapter 9's gap",
        "lower": "neither method closes chapter 9's gap at this budget",
        "noise": "this budget cannot tell which of the two is better"}),
}
COMPARISONS = tuple(_MEANING)
"""What :func:`sentence` compares, ``a`` against ``b``: distilled and MAE-finetuned vs scratch, the MAE fine-tune and
probe vs the same before pretraining, the probe vs chance, the best ViT vs the CNN."""


def sentence(comparison: str, a: Estimate, b: Estimate, name: str = "", z: float = Z) -> str:
    """One clause (no final full stop) on ``a`` against ``b``, for a comparison of :data:`COMPARISONS`: the
    verdict of :func:`vitcourse.stats.compare`, the difference in points with its standard error, and the
    noise floor; within noise it says the budget cannot tell. ``name`` names the best ViT (``"cnn"``)."""
    if comparison not in _MEANING:
        raise ValueError(f"comparison must be one of {', '.join(COMPARISONS)}, got {comparison!r}.")
    verdict = compare(a, b, z)
    se, delta = 100 * math.hypot(a.se, b.se), round(100 * (a.mean - b.mean), 1) + 0.0  # + 0.0: never "-0.0"
    first, second, meaning = _MEANING[comparison]
    numbers = dict(name=name, pa=100 * a.mean, pb=100 * b.mean)
    return (_SAY[verdict] + meaning[verdict]).format(a=first.format(**numbers), b=second.format(**numbers),
                                                      delta=delta, size=abs(delta), se=se, floor=z * se)
