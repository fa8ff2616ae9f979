"""``vitcourse evaluate``: the command line of :func:`vitcourse.evaluate.evaluate_checkpoint`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import strict_json
from ..data import DataError
from ..evaluate import evaluate_checkpoint
from ..paths import atomic_write
from .common import Parser, check_input_dir, check_out_dir, one_line, quiet_closed_stdout

__all__ = ["DESCRIPTION", "epilog", "add_arguments", "run", "main"]


DESCRIPTION = ("Evaluate a checkpoint (best.safetensors or last.safetensors) on the test set and print the result "
               "as JSON. Checkpoints are read without running any code from them.")


def epilog(prog: str) -> str:
    """The examples shown by ``--help``."""
    return (f"examples:\n"
            f"  {prog} runs/quick/best.safetensors\n"
            f"  {prog} runs/mine/best.safetensors --data more_images --out results.json")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``vitcourse evaluate``."""
    p.add_argument("checkpoint", help="a best.safetensors or last.safetensors file written by training")
    p.add_argument("--data", help="cifar10, synthetic or an image folder (default: the data of the run)")
    p.add_argument("--data-root", help="CIFAR-10 cache directory")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable or corrupt images out")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (checking a large image folder)")
    return p


def _check_args(args: argparse.Namespace) -> None:
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
                                     args.skip_bad_images, progress=not args.no_progress)
        clean, replaced = strict_json(result)
        text = json.dumps(clean, allow_nan=False)
        if args.out is not None:
            atomic_write(args.out, text + "\n")
    except (DataError, FileNotFoundError, ValueError, OSError) as err:
        if isinstance(err, BrokenPipeError):
            quiet_closed_stdout()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if replaced:
        print(f"warning: {', '.join(replaced)} is not a finite number (the model's outputs overflowed or are NaN); "
              f"printed as null.", file=sys.stderr)
    print(text, flush=True)  # a closed pipe fails here, inside the command, not at exit
    return 0


def main(argv: list[str] | None = None, prog: str = "vitcourse evaluate") -> int:
    """``vitcourse evaluate`` with these arguments; returns the exit code."""
    parser = Parser(prog=prog, description=DESCRIPTION, epilog=epilog(prog),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))
