"""Evaluate a training checkpoint on its test set: ``python -m vitcourse.evaluate CHECKPOINT``.

Prints one JSON object: ``{"checkpoint", "data", "test_acc", "test_loss", "n", "epoch"}``
(``epoch``: the epoch ``best.pt`` was saved at, or the epochs completed behind ``last.pt``).
The data defaults to what the run was trained on (``--data`` picks another source with the
same classes, e.g. an image folder laid out like the training one).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .data import DataBundle, DataError, load_data
from .train import TrainConfig, build_model, evaluate_model, load_checkpoint

__all__ = ["load_trained", "evaluate_checkpoint", "main"]


def load_trained(path: str | Path) -> tuple[nn.Module, TrainConfig, dict]:
    """The model stored in a checkpoint, in eval mode, with its config and the raw checkpoint.

    Returns:
        ``(model, config, checkpoint)``; the model maps ``(B, 3, S, S) -> (B, num_classes)``.
    """
    checkpoint = load_checkpoint(path)
    cfg = TrainConfig.from_dict(checkpoint["config"])
    model = build_model(cfg, len(checkpoint["classes"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise ValueError(f"the weights in {path} do not fit the model its config describes; the file is damaged.") from None
    return model.eval(), cfg, checkpoint


def evaluate_checkpoint(path: str | Path, data: str | None = None, data_root: str | None = None,
                        batch_size: int = 500, num_workers: int = 0) -> dict:
    """Test accuracy and loss of the checkpoint at ``path`` (see the module docstring for the keys)."""
    model, cfg, checkpoint = load_trained(path)
    name = data or _data_name(checkpoint, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle: DataBundle = load_data(name, root=data_root or cfg.data_root, image_size=cfg.image_size,
                                       val_size=cfg.val_size, seed=cfg.seed)
    if len(bundle.classes) != len(checkpoint["classes"]):
        raise ValueError(f"{name} has {len(bundle.classes)} classes but the checkpoint was trained on "
                         f"{len(checkpoint['classes'])}; evaluate it on data with the same classes.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate_model(model.to(device), bundle.test, batch_size, device, num_workers)
    epoch = checkpoint["epoch"] if "epoch" in checkpoint else checkpoint["state"]["epoch"]  # best.pt / last.pt
    return {"checkpoint": str(path), "data": bundle.source, "test_acc": result["acc"],
            "test_loss": result["loss"], "n": result["n"], "epoch": epoch}


def _data_name(checkpoint: dict, cfg: TrainConfig) -> str:
    """The data a run actually used ("synthetic" if CIFAR-10 fell back to it)."""
    source = checkpoint.get("source", cfg.data)
    return source.removeprefix("folder:")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vitcourse.evaluate``; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m vitcourse.evaluate",
                                description="Evaluate a checkpoint (best.pt or last.pt) on the test set; prints JSON.")
    p.add_argument("checkpoint", help="path of a .pt file written by python -m vitcourse.train")
    p.add_argument("--data", help="cifar10, synthetic or an image folder (default: the data of the run)")
    p.add_argument("--data-root", help="CIFAR-10 cache directory")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    args = p.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, args.batch_size, args.num_workers)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
