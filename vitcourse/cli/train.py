"""``vitcourse train``: the command line of :func:`vitcourse.train.train`.

Every value is checked before anything loads: the settings by building the
:class:`~vitcourse.config.TrainConfig` (its sentence, with flags for field names), the paths by
:func:`check_paths`. Problems are one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import RESUME_FILE
from ..config import CONFIGS, ConfigMismatch, TrainConfig
from ..data import DataError
from ..paths import downloads_allowed, runs_dir
from ..train import train
from .common import Parser, check_input_dir, check_out_dir, flag_words, one_line, quiet_closed_stdout

__all__ = ["DESCRIPTION", "epilog", "add_arguments", "parser", "config_from_args", "check_paths", "run", "main"]


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
            f"  {prog} --config quick --model cnn --out runs/cnn            (a teacher ...)\n"
            f"  {prog} --config quick --distill-from runs/cnn --out runs/deit   (... and a ViT distilled from it)\n"
            f"  {prog} --config quick --objective mae --out runs/mae          (pretraining without labels ...)\n"
            f"  {prog} --config quick --init mae:runs/mae --out runs/mae-ft     (... then fine-tuning)\n"
            f"Under torchrun the same command trains with DistributedDataParallel.")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``vitcourse train``."""
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
    p.add_argument("--init", metavar="timm:NAME|mae:PATH",
                   help="start a ViT from the encoder of a course MAE run (mae:PATH: its ViT, positions and "
                        "normalisation), or from this timm checkpoint (e.g. "
                        "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k): its architecture and weights, a new zero-initialised head for the data's classes, images "
                        "normalised with the checkpoint's mean/std. Training runs at the data's resolution "
                        "(--image-size), not the checkpoint's: the learned position grid is resized bicubically. "
                        "Downloads the weights unless --init-file is given; --resume never reloads them")
    p.add_argument("--init-file", metavar="PATH",
                   help="a local checkpoint file of the --init model (.safetensors, .pth or .npz, as timm loads with "
                        "pretrained_cfg_overlay=dict(file=PATH)); nothing is downloaded")
    p.add_argument("--body-lr-scale", type=float,
                   help="with --init: learning rate of every parameter but the new head, as a multiple of --lr "
                        "(e.g. 0.1; default 1)")
    p.add_argument("--objective", choices=("classify", "mae"),
                   help="classify (default): learn the labels; mae: pretrain the ViT's encoder as a masked "
                        "autoencoder, without labels (then fine-tune it with --init mae:OUT)")
    p.add_argument("--mask-ratio", type=float, help="with --objective mae: fraction of patches hidden (default 0.75)")
    p.add_argument("--distill-from", metavar="RUN_OR_CHECKPOINT",
                   help="train a ViT with a distillation token from this frozen teacher (a course run folder or "
                        "checkpoint trained on the same data, e.g. a CNN: --model cnn), with DeiT's loss")
    p.add_argument("--distill-kind", choices=("hard", "soft"),
                   help="with --distill-from: the teacher's top class (hard, default) or its distribution (soft)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--num-workers", type=int, help="data-loading worker processes")
    p.add_argument("--out", help="output directory (default: runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder whose earlier run left results but no resume.pt "
                        "(its best/last checkpoints and metrics are replaced)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable or corrupt images of an image folder out (they are counted in the log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parser(prog: str = "vitcourse train") -> argparse.ArgumentParser:
    """The parser of ``vitcourse train`` on its own (errors in one line)."""
    return add_arguments(Parser(prog=prog, description=DESCRIPTION, epilog=epilog(prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The named config with the command-line overrides applied.

    Values are checked by building the :class:`~vitcourse.config.TrainConfig`, whose sentence is
    shown with the field's flag (``max_steps`` as ``--max-steps``): one rule for Python and the shell.
    """
    if args.config not in CONFIGS:
        raise ValueError(f"unknown configuration {args.config!r}; choose one of {', '.join(CONFIGS)}.")
    cfg = CONFIGS[args.config]
    changes = {k: getattr(args, k) for k in ("data", "model", "data_root", "epochs", "max_steps", "batch_size", "subset",
                                             "seed", "num_workers") if getattr(args, k) is not None}
    if args.lr is not None:
        changes["max_lr" if cfg.schedule == "onecycle" else "lr"] = args.lr
    if args.data is not None:
        changes["allow_synthetic"] = False  # data named explicitly: no silent stand-in
    for flag, value in (("--init-file", args.init_file), ("--body-lr-scale", args.body_lr_scale)):
        if value is not None and args.init is None:
            raise ValueError(f"{flag} only applies to a pretrained start; add --init timm:NAME or leave out {flag}.")
    try:
        if args.image_size is not None:
            changes["image_size"] = args.image_size
            if (args.model or cfg.model) == "vit" and args.init is None:
                changes["vit"] = dataclasses.replace(cfg.vit, image_size=args.image_size)
        if args.init is not None:
            if (args.model or cfg.model) != "vit":
                raise ValueError(f"--init starts a ViT from a timm checkpoint, but --model is "
                                 f"{args.model or cfg.model!r}; leave out --model or pass --model vit.")
            from ..pretrained import with_init

            base = cfg.replace(**{k: v for k, v in changes.items() if k not in ("model", "image_size")})
            cfg = with_init(base, args.init, args.init_file, image_size=args.image_size)
            changes = {} if args.body_lr_scale is None else {"body_lr_scale": args.body_lr_scale}
        changes.update({k: getattr(args, k) for k in ("objective", "mask_ratio", "distill_kind")
                        if getattr(args, k) is not None})
        if args.distill_from is not None:  # the student gets DeiT's distillation token and second head
            changes["distill_from"] = str(Path(args.distill_from).expanduser())
            changes["vit"] = dataclasses.replace(changes.get("vit", cfg.vit), distilled=True)
        return cfg.replace(**changes)
    except ValueError as err:
        raise ValueError(flag_words(str(err), {"max_lr": "--lr"})) from None


def _data_folder(name: str) -> Path | None:
    """The image folder ``--data`` names, or ``None`` for ``cifar10`` / ``synthetic``."""
    return None if name in ("cifar10", "synthetic") else Path(name).expanduser()


def check_paths(cfg: TrainConfig, out: Path, resume: bool) -> None:
    """Every path of a training run, checked before anything loads: :class:`ValueError` with one sentence."""
    folder = _data_folder(cfg.data)
    if folder is not None and (folder.exists() or os.sep in cfg.data or cfg.data.startswith(".")):
        check_input_dir(folder, "--data", "a folder of images laid out as <folder>/<class>/<image>")
    if cfg.data_root is not None and Path(cfg.data_root).expanduser().is_file():
        raise ValueError(f"--data-root {cfg.data_root} is a file, not a folder; pass the folder that holds (or will "
                         f"hold) cifar-10-batches-py.")
    check_out_dir(out, data=folder if folder is not None and folder.is_dir() else None)
    if cfg.distill_from is not None and not Path(cfg.distill_from).exists():
        raise ValueError(f"--distill-from {cfg.distill_from} does not exist; pass the run folder or checkpoint of a "
                         f"trained teacher (e.g. runs/cnn or runs/cnn/best.safetensors).")
    if (cfg.init or "").startswith("timm:") and not (resume and (out / RESUME_FILE).exists()):  # weights to load
        if cfg.init_file is not None:
            _check_init_file(Path(cfg.init_file).expanduser(), cfg.init.removeprefix("timm:"))
        if cfg.init_file is None and not downloads_allowed():
            raise ValueError(f"--init {cfg.init} needs the checkpoint's weights, but VITCOURSE_OFFLINE is set so "
                             f"nothing is downloaded; pass a local checkpoint file with --init-file PATH.")
    if resume and not (out / RESUME_FILE).exists():
        raise ValueError(f"--resume: {out} holds no run to resume; leave out --resume to start a new run there.")


def run(args: argparse.Namespace) -> int:
    """Run the parsed command line of ``vitcourse train``; returns the exit code."""
    try:
        cfg = config_from_args(args)
        out = Path(args.out).expanduser() if args.out else runs_dir() / cfg.name
        check_paths(cfg, out, args.resume)
        rows = train(cfg, out, resume=args.resume, progress=not args.no_progress, verbose=True,
                     skip_bad_images=args.skip_bad_images, overwrite=args.overwrite)
    except (DataError, ConfigMismatch, FileExistsError, FileNotFoundError, ValueError, OSError) as err:
        if isinstance(err, BrokenPipeError):
            quiet_closed_stdout()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue later with the same command plus --resume.", file=sys.stderr)
        return 130
    if rows and (not dist.is_initialized() or dist.get_rank() == 0):
        last = rows[-1]
        val_acc = "n/a" if last.get("val_acc") is None else f"{last['val_acc']:.4f}"
        print(one_line(ValueError(f"done: epoch {last['epoch']}, val_acc {val_acc}, data {last['data']}; outputs in {out}")), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None, prog: str = "vitcourse train") -> int:
    """``vitcourse train`` with these arguments; returns the exit code."""
    return run(parser(prog).parse_args(argv))


def _check_init_file(path: Path, model: str) -> None:
    """``--init-file`` must be a regular, readable file of a format timm loads: one sentence otherwise."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"--init-file {path} does not exist; pass the path of a checkpoint file of {model} "
                         f"(.safetensors, .pth or .npz).") from None
    except OSError as err:
        raise ValueError(f"--init-file {path} cannot be read ({err.strerror}); check its permissions.") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"--init-file {path} is a folder; pass the path of a checkpoint file of {model} "
                         f"(.safetensors, .pth or .npz).")
    if not stat.S_ISREG(mode):
        raise ValueError(f"--init-file {path} is not a regular file (a device, pipe or socket{', through a link' if path.is_symlink() else ''}); "
                         f"pass the path of a checkpoint file of {model} (.safetensors, .pth or .npz).")
    if not os.access(path, os.R_OK):
        raise ValueError(f"--init-file {path} cannot be read (permission denied); check its permissions.")
