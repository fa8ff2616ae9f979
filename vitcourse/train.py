"""Training, readable in one sitting: config -> data -> model -> optimizer -> loop -> checkpoints.

Run it from the command line (parsed in :mod:`vitcourse.cli.train`)::

    vitcourse train --config quick --out runs/quick                    # a small ViT for a CPU (time: see chapter 5)
    python -m vitcourse train --config cifar10 --out runs/cifar10      # the full recipe, for a GPU
    torchrun --nproc_per_node 4 -m vitcourse train --config cifar10    # several GPUs (or CPU processes)

or from Python with :func:`train`. The config is :class:`vitcourse.config.TrainConfig`; the files
below are written and checked by :mod:`vitcourse.checkpoint`. A run writes into its output directory:

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
* ``train.log`` - the same lines the command line prints;
* ``.run.lock`` - held for as long as a run writes into the folder: a second run into the same
  folder is refused, and so is a new run over a finished one without ``overwrite``.

Exact resume: the training data order and every image's augmentation are functions of
``(seed, epoch, index)`` alone, the global random state (dropout, mixup) is saved in the
checkpoint, and checkpoints are written to a temporary file and renamed, so a run killed
at any moment (even with SIGKILL) and resumed ends bit-identical to one never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import (
    BEST_FILE,
    FORMAT,
    LAST_FILE,
    LOCK_FILE,
    RESUME_FILE,
    SPLIT_FILE,
    RunState,
    check_resume_fits,
    check_same_run,
    check_same_split,
    load_resume,
    plain_weights,
    read_metrics,
    repair_last,
    rng_state,
    save_resume,
    save_weights,
    set_rng_state,
    split_hash,
    write_metrics,
)
from .config import CONFIGS, TIMING_FIELDS, ConfigMismatch, TrainConfig, fingerprint
from .data import DataBundle, DataError, load_data
from .data.order import EpochBatches
from .models import build_model
from .objectives import build_objective, evaluate_model
from .optim import param_groups
from .paths import atomic_write, runs_dir

__all__ = ["train", "build_data", "build_model", "learning_rates", "evaluate_model", "EpochBatches", "RunBusy",
           "TrainConfig", "CONFIGS", "TIMING_FIELDS", "ConfigMismatch", "fingerprint", "read_metrics"]


class RunBusy(FileExistsError):
    """The run folder is in use by another training, or holds a finished run that would be overwritten."""


# --------------------------------------------------------------------------- data, optimizer, schedule


def build_data(cfg: TrainConfig, *, skip_bad_images: bool = False, verified: dict | None = None,
               progress: bool = True) -> DataBundle:
    """The :class:`~vitcourse.data.DataBundle` a config asks for (see :func:`vitcourse.data.load_data`).

    The normalisation statistics are settled first: a pretrained start (``cfg.init``) uses its
    checkpoint's mean and std, everything else the data's own.
    """
    stats = None
    if cfg.init is not None:
        from .pretrained import init_statistics

        stats = init_statistics(cfg.init)
    return load_data(
        cfg.data, root=cfg.data_root, image_size=cfg.image_size, val_size=cfg.val_size, seed=cfg.seed,
        augment=cfg.augment, allow_synthetic=cfg.allow_synthetic, subset=cfg.subset, skip_bad_images=skip_bad_images,
        verified=verified, stats=stats, progress=progress,
    )


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or Adam) over :func:`vitcourse.optim.param_groups`: decay on weights only; with
    ``body_lr_scale`` the head and the body in groups at their own rates."""
    peak = cfg.max_lr if cfg.schedule == "onecycle" else cfg.lr
    split = cfg.body_lr_scale != 1.0
    groups = param_groups(model, cfg.weight_decay, peak if split else None,
                          peak * cfg.body_lr_scale if split else None)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)  # Adam: weight decay added to the gradient


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int, steps_per_epoch: int):
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
    scheduler = build_scheduler(cfg, optimizer, total, steps_per_epoch)
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


def _load_data(cfg: TrainConfig, ctx: "_Dist", skip_bad_images: bool, progress: bool) -> DataBundle:
    """:func:`build_data`, process 0 first under ``torchrun``: it downloads or generates the data (under a
    file lock, see :func:`vitcourse.paths.folder_lock`) while the others wait at a barrier, then they load
    the prepared copy. An error on process 0 is raised on every process, so none waits forever. For an
    image folder, process 0 also sends the files it checked (with their SHA-256): the others use exactly
    those, without opening every image again, so all processes split the same files.

    The barrier runs in a separate gloo group whose timeout outlasts the download's own deadline
    (:data:`vitcourse.data.cifar.DOWNLOAD_DEADLINE`): the default group's timeout (10 minutes for NCCL)
    would end a slow but healthy download with an unexplained collective timeout.
    """
    if ctx.world == 1 or not dist.is_initialized():
        return build_data(cfg, skip_bad_images=skip_bad_images, progress=progress)
    from datetime import timedelta

    from .data import DOWNLOAD_DEADLINE

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=DOWNLOAD_DEADLINE + 600))
    shared: list = [None, None]  # [(is DataError, message) of a failure, the checked files of an image folder]
    data = None
    if ctx.main:
        try:
            data = build_data(cfg, skip_bad_images=skip_bad_images, progress=progress)
            shared[1] = data.split.get("files") or None
        except (DataError, ValueError) as err:
            shared[0] = (isinstance(err, DataError), str(err))
    dist.barrier(group=group)  # the others start loading only once process 0 has prepared the data
    dist.broadcast_object_list(shared, src=0, group=group, device=torch.device("cpu"))
    if shared[0] is not None:
        is_data_error, message = shared[0]
        raise (DataError if is_data_error else ValueError)(message)
    return data if data is not None else build_data(cfg, skip_bad_images=skip_bad_images, verified=shared[1], progress=progress)


# --------------------------------------------------------------------------- the run folder


class _RunFolder:
    """The lock a run holds on its output folder, for as long as it writes there."""

    def __init__(self, out: Path, active: bool) -> None:
        self.out, self.lock = out, None
        if active:
            from filelock import FileLock, Timeout

            out.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(out / LOCK_FILE))
            try:
                self.lock.acquire(timeout=0)
            except Timeout:
                raise RunBusy(f"another training run is writing into {out} right now (it holds {out / LOCK_FILE}); "
                              f"wait for it to finish or choose another --out folder.") from None

    def __enter__(self) -> "_RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def _check_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start where a run already is, unless resuming it (or, for a finished run, ``overwrite``)."""
    if (out / RESUME_FILE).exists():
        if not resume:
            raise RunBusy(f"{out} already holds a run; resume it (--resume) or choose another output directory.")
        return
    kept = [name for name in (BEST_FILE, LAST_FILE, "metrics.jsonl") if (out / name).exists()]
    if kept and not overwrite:
        raise RunBusy(f"{out} holds the results of an earlier run ({', '.join(kept)}) without its {RESUME_FILE}, so it "
                      f"cannot be resumed; choose another --out folder, or pass --overwrite to replace them.")


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig | str, out_dir: str | os.PathLike | None = None, *, resume: bool = True,
          progress: bool = True, verbose: bool = False, skip_bad_images: bool = False,
          overwrite: bool = False) -> list[dict]:
    """Train ``cfg`` (a :class:`TrainConfig` or the name of one) and return the per-epoch metrics.

    Args:
        cfg: the run's configuration.
        out_dir: where metrics and checkpoints go (default ``runs_dir() / cfg.name``).
        resume: continue from ``out_dir/resume.pt`` if it exists (a finished run returns its
            stored metrics at once). With ``resume=False`` an existing run is an error.
        progress: show tqdm progress bars (training, and checking a large image folder).
        verbose: also print one line per epoch (the command line does).
        skip_bad_images: leave unreadable or corrupt files of an image folder out instead of stopping.
        overwrite: start afresh in a folder whose earlier run left results but no ``resume.pt``.

    Returns:
        The rows of ``metrics.jsonl``: dicts with ``epoch``, ``step``, ``train_loss``, ``train_acc``,
        ``val_loss``, ``val_acc``, ``lr`` (the learning rate of the epoch's last optimizer step),
        ``images_per_sec``, ``epoch_time``, ``data`` (the data actually used, e.g. ``"synthetic"``).

    Raises:
        ConfigMismatch: ``out_dir`` holds a run with another configuration, other data, another
            split (the image folder changed) or another number of processes.
        RunBusy: another training is writing into ``out_dir``, or it holds results that would be lost.
        vitcourse.checkpoint.CheckpointError: ``resume.pt`` is damaged.
        vitcourse.data.DataError: the data is missing or malformed.
    """
    cfg = CONFIGS[cfg] if isinstance(cfg, str) else cfg
    out = Path(out_dir) if out_dir is not None else runs_dir() / cfg.name
    ctx = _init_distributed()
    _check_folder(out, resume, overwrite)
    with warnings.catch_warnings(record=True) as caught:  # e.g. "CIFAR-10 not found, using synthetic": to the log
        warnings.simplefilter("always")
        data = _load_data(cfg, ctx, skip_bad_images, progress)
    with _RunFolder(out, ctx.main):
        _check_folder(out, resume, overwrite)  # again, now that no other run can write here
        if ctx.main and overwrite and not (out / RESUME_FILE).exists():
            for name in (BEST_FILE, LAST_FILE, "metrics.jsonl"):  # the earlier run's results, replaced as asked
                (out / name).unlink(missing_ok=True)
        return _run(cfg, out, ctx, data, [str(w.message) for w in caught], progress, verbose)


def _run(cfg: TrainConfig, out: Path, ctx: _Dist, data: DataBundle, notes: list[str], progress: bool,
         verbose: bool) -> list[dict]:
    """The training run itself, in a folder this process holds (see :func:`train`)."""
    record, resume_path = data.split_record(), out / RESUME_FILE
    checkpoint = load_resume(resume_path) if resume_path.exists() else None
    if checkpoint is not None:  # an earlier run in `out` must be this run; it may be finished
        check_same_run(checkpoint, cfg, data.source, ctx.world, resume_path)
        check_same_split(out / SPLIT_FILE, record)
        if _finished(checkpoint["state"], cfg):
            if ctx.main:
                write_metrics(out, checkpoint["state"].rows)  # metrics.jsonl is always the checkpoint's rows
                repair_last(out, checkpoint)
            return checkpoint["state"].rows
    elif ctx.main:
        atomic_write(out / SPLIT_FILE, json.dumps(record, indent=1))  # before any checkpoint refers to it

    def log(line: str) -> None:
        line = line.encode("utf-8", "backslashreplace").decode("utf-8")  # a file name that is not UTF-8 prints too
        if ctx.main:
            with open(out / "train.log", "a") as f:
                f.write(line + "\n")
            if verbose:
                _write(line, progress)

    for note in notes:
        log(f"note: {note}")
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
        from .pretrained import init_weights

        log(init_weights(model, cfg))
    teacher, teacher_sha256 = None, None
    if cfg.distill_from is not None:
        from .objectives import load_teacher

        teacher, teacher_sha256 = load_teacher(cfg, data)
        if checkpoint is not None and checkpoint.get("teacher_sha256") != teacher_sha256:
            raise ConfigMismatch(f"the teacher {cfg.distill_from} changed since this run started (its weights differ); "
                                 f"restore it, or train into another --out folder.")
    objective = build_objective(cfg, ctx.device, teacher)
    model.to(ctx.device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    use_amp = cfg.amp and ctx.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    mixer = _batch_mixer(cfg, data.num_classes) if cfg.objective == "classify" else None

    # ---- the state of the run, restored from the checkpoint if there is one
    state = RunState()
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout and mixup differ between processes
    if checkpoint is not None:
        check_resume_fits(checkpoint, model, optimizer, resume_path)  # shapes too, before any step
        model.load_state_dict(checkpoint["model"])
        model.to(ctx.device)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = checkpoint["state"]
        state.rows = [r for r in state.rows if not r.get("partial_epoch")]
        set_rng_state(checkpoint["rng"][ctx.rank])
        log(f"resumed from {resume_path} at step {state.step}")
    if ctx.main:
        write_metrics(out, state.rows)  # drops rows written after the checkpoint we resume from
    info = {"config": cfg.to_dict(), "classes": list(data.classes), "source": data.source, "mean": list(data.mean),
            "std": list(data.std), "model_name": cfg.model, "split_sha256": split_hash(record)}
    if teacher_sha256 is not None:
        info["teacher_sha256"] = teacher_sha256

    def save(finished: bool) -> None:
        """Write resume.pt, then last.safetensors (all processes' RNG states gathered on process 0)."""
        rng = [rng_state()]
        if ctx.world > 1:
            rng = [None] * ctx.world
            dist.all_gather_object(rng, rng_state())
        if ctx.main:
            weights = plain_weights(model)
            save_resume({**info, "format": FORMAT, "model": weights, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "state": asdict(state),
                         "rng": rng, "finished": finished}, resume_path)
            save_weights(out / LAST_FILE, weights, {**info, "kind": "last", "epoch": state.epoch, "step": state.step,
                                                    "finished": finished,
                                                    "metrics": state.rows[-1] if state.rows else None})

    budget = min(total_steps, cfg.max_steps or total_steps)
    bar = _progress_bar(progress and ctx.main, total=budget, initial=state.step, desc=cfg.name)
    stop = state.step >= budget
    while state.epoch < cfg.epochs and not stop:
        epoch, part = state.epoch, state.partial
        batches = EpochBatches(len(data.train), cfg.batch_size, cfg.seed, epoch, state.batch, ctx.rank, ctx.world)
        net.train()
        tick = time.perf_counter()
        for images, labels in _loader(data.train, cfg, batch_sampler=batches):
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            targets = labels if mixer is None else mixer(images, labels)
            if mixer is not None:
                images, targets = targets
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=use_amp):
                loss, logits = objective.loss(net, images, targets)  # logits (B, K), or None without labels
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() sets the next one
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            right = 0 if logits is None else (logits.argmax(-1) == labels).sum().item()
            loss_sum, correct, seen = _all_sum([loss.item() * len(labels), right, len(labels)], ctx)
            part["loss"] += loss_sum
            part["correct"] += correct
            part["seen"] += seen
            state.batch += 1
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{part['loss'] / part['seen']:.3f}", epoch=epoch + 1)
            stop = state.step >= budget
            if stop:
                break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                part["time"] += time.perf_counter() - tick
                tick = time.perf_counter()
                save(finished=False)
        part["time"] += time.perf_counter() - tick

        # ---- end of the epoch (or of the step budget): validate, record, checkpoint
        partial_epoch = state.batch < steps_per_epoch
        val = objective.evaluate(model, data.val, cfg, ctx.device)
        row = {
            "epoch": epoch + 1, "step": state.step,
            "train_loss": part["loss"] / part["seen"],
            "train_acc": None if val["acc"] is None else part["correct"] / part["seen"],
            "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr,
            "images_per_sec": part["seen"] / max(part["time"], 1e-9), "epoch_time": part["time"],
            "data": data.source,
        }
        if partial_epoch:
            row["partial_epoch"] = True  # stopped by max_steps; replaced if the run is continued
        else:
            state.new_epoch()
        state.rows.append(row)
        # best: the best full epoch so far (a budget stop mid-epoch only writes one if there is none yet)
        score = -val["loss"] if val["acc"] is None else val["acc"]  # without labels: the lowest loss is best
        improved = score > state.best_score and not partial_epoch
        if improved or (partial_epoch and not (out / BEST_FILE).exists()):
            state.best_score = score if improved else state.best_score
            if ctx.main:
                save_weights(out / BEST_FILE, plain_weights(model), {
                    **info, "kind": "best", "epoch": epoch + 1, "step": state.step, "val_acc": val["acc"],
                    "metrics": row})
        # metrics.jsonl first: a kill between the two leaves an extra row that resuming rewrites away
        if ctx.main:
            for entry in write_metrics(out, state.rows):
                if entry.startswith(f"[{len(state.rows) - 1}]"):  # this epoch's row
                    log(f"warning: {entry.split('.', 1)[1]} of epoch {epoch + 1} is not a finite number; "
                        f"metrics.jsonl holds null there")
        save(finished=stop or state.epoch == cfg.epochs)
        log(f"epoch {epoch + 1}/{cfg.epochs} step {state.step}: train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f}" + ("" if val["acc"] is None else f" val_acc {row['val_acc']:.4f}")
            + f" last lr {row['lr']:.2e} "
            f"{row['images_per_sec']:.0f} img/s [data: {data.source}]")
        if partial_epoch:
            # restore the partial-epoch counters so a later, longer run continues this epoch exactly
            state.rows.pop()
            break
    bar.close()
    if ctx.world > 1:
        dist.barrier()
    return read_metrics(out) if ctx.main else state.rows


def _finished(state: RunState, cfg: TrainConfig) -> bool:
    """Whether the checkpointed run has nothing left to do under ``cfg``."""
    return state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.step >= cfg.max_steps)


def _progress_bar(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, unit="step", dynamic_ncols=True, **kwargs)


def _write(line: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)
