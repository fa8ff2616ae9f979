"""Evaluate a training checkpoint on its test set: ``vitcourse evaluate CHECKPOINT``.

(``python -m vitcourse.evaluate CHECKPOINT`` is the same command.) Prints one strict-JSON
object: ``{"checkpoint", "data", "test_acc", "test_loss", "n", "epoch"}`` (``epoch``: the
epochs completed behind the weights). A number that is not finite (a diverged model's loss)
is printed as ``null``, with a warning on stderr. ``--out FILE`` also writes it to a file.

The checkpoint is read by :func:`vitcourse.train.load_checkpoint`, which never runs code
stored in a file: ``best.safetensors`` / ``last.safetensors`` written by training (or
``resume.pt``, or an older version's ``best.pt`` / ``last.pt``) load; anything else is
refused in one sentence. The data defaults to what the run was trained on; for an image
folder, the test images are the ones the run recorded in ``split.json`` (next to the
checkpoint), and a folder that changed since is refused, so that no training image is
counted as a test image. ``--data`` picks another source with the same classes.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from torch import nn

from .data import DataBundle, DataError, load_data
from .train import (
    SPLIT_FILE,
    CheckpointError,
    _split_hash,
    TrainConfig,
    build_model,
    evaluate_model,
    load_checkpoint,
    one_line,
    strict_json,
)
from .utils import atomic_write, default_device

__all__ = ["load_trained", "evaluate_checkpoint", "main", "add_arguments", "run"]


def load_trained(path: str | Path) -> tuple[nn.Module, TrainConfig, dict]:
    """The model stored in a checkpoint, in eval mode, with its config and the checkpoint's contents.

    Reads ``best.safetensors`` / ``last.safetensors`` (and the older ``.pt`` files) without
    running any code from them (see :func:`vitcourse.train.load_checkpoint`).

    Returns:
        ``(model, config, info)``; the model maps ``(B, 3, S, S) -> (B, num_classes)``; ``info``
        is the dict :func:`~vitcourse.train.load_checkpoint` returns (``classes``, ``epoch``, ...).

    Raises:
        vitcourse.train.CheckpointError: not a usable checkpoint (one sentence).
    """
    checkpoint = load_checkpoint(path)
    cfg = TrainConfig.from_dict(checkpoint["config"])
    try:
        model = build_model(cfg, len(checkpoint["classes"]))
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, ValueError) as err:
        missing = getattr(err, "args", [""])[0].split("\n")[0] if isinstance(err, RuntimeError) else str(err)
        raise CheckpointError(f"the weights in {path} do not fit the model its config describes ({missing.strip()[:120]}); "
                              f"the file is damaged or was edited.") from None
    return model.eval(), cfg, checkpoint


def evaluate_checkpoint(path: str | Path, data: str | None = None, data_root: str | None = None,
                        batch_size: int = 500, num_workers: int = 0, skip_bad_images: bool = False) -> dict:
    """Test accuracy and loss of the checkpoint at ``path`` (see the module docstring for the keys).

    Non-finite values are returned as they are; :func:`main` prints them as ``null``.
    """
    model, cfg, checkpoint = load_trained(path)
    own = data is None
    name = data or _data_name(checkpoint, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle: DataBundle = load_data(name, root=data_root or cfg.data_root, image_size=cfg.image_size,
                                       val_size=cfg.val_size, seed=cfg.seed, skip_bad_images=skip_bad_images)
    if checkpoint.get("mean") and checkpoint.get("std"):  # e.g. an --init run normalises as its timm checkpoint did
        from .pretrained import renormalize

        bundle = renormalize(bundle, checkpoint["mean"], checkpoint["std"])
    if len(bundle.classes) != len(checkpoint["classes"]):
        raise ValueError(f"{name} has {len(bundle.classes)} classes but the checkpoint was trained on "
                         f"{len(checkpoint['classes'])}; evaluate it on data with the same classes.")
    if own:
        _check_test_split(Path(path), bundle, checkpoint.get("split_sha256"))
    device = default_device()
    result = evaluate_model(model.to(device), bundle.test, batch_size, device, num_workers)
    return {"checkpoint": str(path), "data": bundle.source, "test_acc": result["acc"],
            "test_loss": result["loss"], "n": result["n"], "epoch": checkpoint.get("epoch")}


def _check_test_split(path: Path, bundle: DataBundle, split_sha256: str | None) -> None:
    """For an image folder: the test files must be the ones the run recorded in ``split.json`` (or, for
    a checkpoint without its run folder, the whole split must hash to the one stored in the checkpoint)."""
    record_path = path.parent / SPLIT_FILE
    if not bundle.split.get("files"):
        return
    if not record_path.is_file():
        if split_sha256 is not None and _split_hash(bundle.split_record()) != split_sha256:
            raise ValueError(f"the image folder {bundle.source.removeprefix('folder:')} is not split as when {path} was "
                             f"trained (files were added, removed or changed), so its test images may include training "
                             f"images; pass --data to evaluate on a folder of your choice.")
        return
    try:
        recorded = json.loads(record_path.read_text())
    except ValueError:
        raise ValueError(f"{record_path} is damaged, so the run's test images are unknown; evaluate with --data on a "
                         f"folder of test images.") from None
    if recorded.get("source") != bundle.source:
        return
    files = recorded.get("files", {})
    old = {f: files.get(f) for f in recorded.get("test", [])}
    new = {f: bundle.split["files"].get(f) for f in bundle.split.get("test", [])}
    if old != new:
        changed = sorted(set(old) ^ set(new)) + sorted(f for f in set(old) & set(new) if old[f] != new[f])
        raise ValueError(f"the image folder changed since training, so its test images are no longer the run's "
                         f"({len(changed)} differ, e.g. {changed[0]}) and some may have been training images; "
                         f"restore the folder, or evaluate with --data on a folder of new images.")


def _data_name(checkpoint: dict, cfg: TrainConfig) -> str:
    """The data a run actually used ("synthetic" if CIFAR-10 fell back to it)."""
    source = checkpoint.get("source") or cfg.data
    return source.removeprefix("folder:")


DESCRIPTION = ("Evaluate a checkpoint (best.safetensors or last.safetensors) on the test set and print the result "
               "as JSON. Checkpoints are read without running any code from them.")


def epilog(prog: str) -> str:
    """The examples shown by ``--help``."""
    return (f"examples:\n"
            f"  {prog} runs/quick/best.safetensors\n"
            f"  {prog} runs/mine/best.safetensors --data more_images --out results.json")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``vitcourse evaluate`` / ``python -m vitcourse.evaluate`` (one definition for both)."""
    p.add_argument("checkpoint", help="a best.safetensors or last.safetensors file written by training")
    p.add_argument("--data", help="cifar10, synthetic or an image folder (default: the data of the run)")
    p.add_argument("--data-root", help="CIFAR-10 cache directory")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable or corrupt images out")
    p.add_argument("--out", help="also write the JSON result to this file")
    return p


def _check_args(args: argparse.Namespace) -> None:
    from .cli import check_input_dir, check_out_dir

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {args.num_workers}.")
    folder = None
    if args.data is not None and args.data not in ("cifar10", "synthetic"):
        folder = check_input_dir(args.data, "--data", "a folder of images laid out as <folder>/<class>/<image>")
    if args.data_root is not None and Path(args.data_root).expanduser().is_file():
        raise ValueError(f"--data-root {args.data_root} is a file, not a folder; pass the folder that holds "
                         f"cifar-10-batches-py.")
    if args.out is not None:
        out = Path(args.out).expanduser()
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; pass the path of a file to write the JSON result to.")
        if out.exists() and out.resolve() == Path(args.checkpoint).expanduser().resolve():
            raise ValueError(f"--out {out} is the checkpoint itself; writing the result there would destroy it, so "
                             f"choose another file.")
        check_out_dir(out.parent if str(out.parent) else Path("."), flag="--out", data=folder)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command line of ``vitcourse evaluate``; returns the exit code."""
    try:
        _check_args(args)
        result = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, args.batch_size, args.num_workers,
                                     args.skip_bad_images)
        clean, replaced = strict_json(result)
        text = json.dumps(clean, allow_nan=False)
        if args.out is not None:
            atomic_write(args.out, text + "\n")
    except (DataError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if replaced:
        print(f"warning: {', '.join(replaced)} is not a finite number (the model's outputs overflowed or are NaN); "
              f"printed as null.", file=sys.stderr)
    print(text)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m vitcourse.evaluate") -> int:
    """Entry point of ``python -m vitcourse.evaluate`` (and ``vitcourse evaluate``); returns the exit code."""
    from .cli import Parser  # errors in one line

    parser = Parser(prog=prog, description=DESCRIPTION, epilog=epilog(prog),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
