"""Evaluate a training checkpoint on its test set (the command line is ``vitcourse evaluate CHECKPOINT``).

The command prints one strict-JSON
object: ``{"checkpoint", "data", "test_acc", "test_loss", "n", "epoch"}`` (``epoch``: the
epochs completed behind the weights). A number that is not finite (a diverged model's loss)
is printed as ``null``, with a warning on stderr. ``--out FILE`` also writes it to a file.

The checkpoint is read by :func:`vitcourse.checkpoint.load_checkpoint`, which never runs code
stored in a file and checks what the file records before a model is built:
``best.safetensors`` / ``last.safetensors`` written by training (or ``resume.pt``) load;
anything else is refused in one sentence. The data defaults to what the run was trained on; for an image
folder, the test images are the ones the run recorded in ``split.json`` (next to the
checkpoint), and a folder that changed since is refused, so that no training image is
counted as a test image. ``--data`` picks another source with the same classes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from .checkpoint import SPLIT_FILE, load_model, split_hash
from .config import TrainConfig
from .data import DataBundle, load_data
from .objectives import evaluate_model
from .utils import default_device

__all__ = ["load_trained", "evaluate_checkpoint"]


def load_trained(path: str | Path) -> tuple[nn.Module, TrainConfig, dict]:
    """The model stored in a checkpoint, in eval mode, with its config and the checkpoint's contents.

    Reads ``best.safetensors`` / ``last.safetensors`` without running any code from them
    (see :func:`vitcourse.checkpoint.load_model`).

    Returns:
        ``(model, config, info)``; the model maps ``(B, 3, S, S) -> (B, num_classes)``; ``info``
        is the dict :func:`~vitcourse.checkpoint.load_checkpoint` returns (``classes``, ``epoch``, ...).

    Raises:
        vitcourse.checkpoint.CheckpointError: not a usable checkpoint (one sentence).
    """
    return load_model(path, run_folder=False)  # a folder is named as such, with the file to pass


def evaluate_checkpoint(path: str | Path, data: str | None = None, data_root: str | None = None,
                        batch_size: int = 500, num_workers: int = 0, skip_bad_images: bool = False,
                        progress: bool = True) -> dict:
    """Test accuracy and loss of the checkpoint at ``path`` (see the module docstring for the keys).

    Non-finite values are returned as they are; :func:`main` prints them as ``null``.
    """
    model, cfg, checkpoint = load_trained(path)
    if cfg.objective == "mae":
        raise ValueError(f"{path} is a masked autoencoder: it fills in hidden patches and has no classes to test; "
                         f"fine-tune its encoder first (vitcourse train --init mae:{path}) and evaluate that run.")
    own = data is None
    name = data or _data_name(checkpoint, cfg)
    stats = (checkpoint["mean"], checkpoint["std"]) if checkpoint.get("mean") and checkpoint.get("std") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle: DataBundle = load_data(name, root=data_root or cfg.data_root, image_size=cfg.image_size,
                                       val_size=cfg.val_size, seed=cfg.seed, skip_bad_images=skip_bad_images,
                                       stats=stats, progress=progress)  # normalised as the run was
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
        if split_sha256 is not None and split_hash(bundle.split_record()) != split_sha256:
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
