"""Checkpoints: what a run writes, and every check a file passes before anything trusts it.

A run folder holds (see :mod:`vitcourse.train`):

* ``best.safetensors`` / ``last.safetensors`` - weights plus the run's information as JSON
  (config, classes, data statistics, metrics) and a SHA-256 of the weights: the files to share;
* ``resume.pt`` - everything exact resume needs (weights, optimizer, scheduler, :class:`RunState`,
  random states), tensors and plain values only, read with ``torch.load(weights_only=True)``;
* ``split.json`` - which examples are train, validation and test;
* ``metrics.jsonl`` - one strict-JSON row per epoch; ``.run.lock`` - held while a run writes.

:func:`load_checkpoint` reads any of them without running code inside, and checks the recorded
configuration (types, ranges, agreement with the tensors' shapes) before a model is built, so a
1 KB file that claims a million layers is refused in one sentence instead of allocating memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import RESUMABLE_FIELDS, ConfigMismatch, TrainConfig
from .paths import atomic_write

__all__ = ["BEST_FILE", "LAST_FILE", "RESUME_FILE", "SPLIT_FILE", "LOCK_FILE", "CheckpointError", "RunState",
           "load_checkpoint", "load_resume", "save_weights", "save_resume", "strict_json", "write_metrics",
           "read_metrics", "split_hash", "load_model", "check_same_run", "check_same_split", "check_resume_fits", "repair_last",
           "rng_state", "set_rng_state", "plain_weights"]

LAST_FILE = "last.safetensors"
"""The weights at the run's last checkpoint, with the run's information (safetensors, shareable)."""
BEST_FILE = "best.safetensors"
"""The weights of the epoch with the best validation accuracy, with the run's information."""
RESUME_FILE = "resume.pt"
"""Everything exact resume needs; only tensors and plain Python values, read with ``weights_only=True``."""
SPLIT_FILE = "split.json"
"""Which examples (for an image folder: which files, with their SHA-256) are train, val and test."""
LOCK_FILE = ".run.lock"
"""Held by the training process writing into a run folder, for as long as it runs."""
FORMAT = "vitcourse-checkpoint-1"
INFO_KEYS = ("config", "classes", "source", "mean", "std", "model_name")
MAX_CLASSES = 100_000


class CheckpointError(ValueError):
    """A file is not a readable vitcourse checkpoint; the message says what it is and what to do."""


@dataclass
class RunState:
    """Where a run is: what ``resume.pt`` records besides weights, optimizer and random states.

    ``epoch`` full epochs are done, and ``batch`` batches of the next; ``step`` optimizer steps in all;
    ``best_score`` is the best validation accuracy so far (minus the loss, for a run without labels);
    ``partial`` sums the unfinished epoch's loss, correct answers, images and seconds; ``rows`` are the
    finished epochs' rows of ``metrics.jsonl``.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_score: float = -math.inf
    rows: list = field(default_factory=list)
    partial: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0})

    def new_epoch(self) -> None:
        """Count the epoch in progress as done."""
        self.epoch, self.batch = self.epoch + 1, 0
        self.partial = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}


def rng_state() -> dict:
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


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights_hash(weights: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: it detects damaged weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plain_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as independent CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(path: str | os.PathLike, weights: dict[str, Tensor], info: dict) -> None:
    """Write ``weights`` and the run's ``info`` (JSON) as one safetensors file, atomically.

    ``info`` holds at least ``config``, ``classes``, ``source``, ``mean``, ``std`` and
    ``model_name``; a SHA-256 of the weights is added so that damage is detected on loading.
    The file is readable by others as the umask allows: it is meant to be shared.
    """
    from safetensors.torch import save

    info = {**info, "format": FORMAT, "weights_sha256": _weights_hash(weights)}
    clean, _ = strict_json(info)
    atomic_write(path, save(weights, metadata={"vitcourse": json.dumps(clean, allow_nan=False)}))


def save_resume(obj: dict, path: Path) -> None:
    """``torch.save`` of tensors and plain values only (so ``weights_only=True`` reads it), atomically,
    with a SHA-256 of the weights in ``obj["model"]`` so that damage is detected on loading."""
    buffer = io.BytesIO()
    torch.save({**obj, "weights_sha256": _weights_hash(obj["model"])}, buffer)
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


def write_metrics(out: Path, rows: list[dict]) -> list[str]:
    """Replace ``out/metrics.jsonl`` by ``rows`` (strict JSON, one object per line) atomically; returns
    the entries that were not finite and were written as ``null``."""
    clean, replaced = strict_json(rows)
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in clean))
    return replaced


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``OUT/metrics.jsonl`` (one dict per epoch); empty if there are none."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _load_pt(path: Path) -> dict:
    """A ``.pt`` file through ``torch.load(weights_only=True)``: tensors and plain values only, no code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            with open(path, "rb") as f:  # a file object: the format is read from the bytes, not the file's name
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only reader refused it: it names the function when it reads one
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        with open(path, "rb") as f:
            head = f.read(2)
        pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head == b"PK"
        if named is None and not pickled:
            raise CheckpointError(f"{path} is not readable: it is corrupt or not a checkpoint file; copy it again or "
                                  f"pick another checkpoint.") from None
        code = f" ({named.group(1)})" if named else ""
        raise CheckpointError(
            f"{path} was not loaded because it asks to run code{code} or build objects other than tensors and plain "
            f"values; it is not a vitcourse checkpoint, so do not use it."
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
    """Read a checkpoint safely: no code inside it ever runs, and nothing in it is trusted unchecked.

    Accepts ``best.safetensors`` / ``last.safetensors`` (weights plus the run's information as
    JSON) and ``resume.pt`` (read with ``torch.load(weights_only=True)``).

    Returns:
        A dict with ``model`` (the state dict: name -> tensor), ``config`` (a :class:`TrainConfig`
        as a dict), ``classes``, ``source``, ``mean``, ``std``, ``model_name`` and, where known,
        ``epoch`` (epochs behind the weights), ``step``, ``val_acc`` and ``metrics`` (that epoch's
        row of ``metrics.jsonl``); ``resume.pt`` also holds ``optimizer``, ``scheduler``,
        ``scaler``, ``state`` and ``rng``.

    Raises:
        CheckpointError: (a ``ValueError``) missing, a folder, unreadable, damaged, containing code,
            not a vitcourse checkpoint, or describing a model its weights do not fit; the message is
            one sentence saying what to do.
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
    if "classes" not in checkpoint:
        raise CheckpointError(f"{path} is not a complete vitcourse checkpoint: it has no 'classes' entry; "
                              f"use the file training wrote, unedited.")
    weights = checkpoint["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()):
        raise CheckpointError(f"{path} is not a vitcourse checkpoint: its 'model' entry is not a set of tensors.")
    classes = checkpoint["classes"]
    if (not isinstance(classes, (list, tuple)) or not 1 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path} has a damaged 'classes' entry (not a list of class names); use the file "
                              f"training wrote, unedited.")
    cfg = _recorded_config(checkpoint["config"], path)
    for key in ("mean", "std"):
        value = checkpoint.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                and (key == "mean" or all(v > 0 for v in value))):
            raise CheckpointError(f"{path} has a damaged '{key}' entry (it must be three finite numbers, one per "
                                  f"colour channel{', above 0' if key == 'std' else ''}); use the file training "
                                  f"wrote, unedited.")
    expected = checkpoint.get("weights_sha256")
    if expected is not None and _weights_hash(weights) != expected:
        raise CheckpointError(f"{path} is damaged: its weights do not match the checksum stored with them; "
                              f"copy it again or retrain.")
    _check_weights_fit(cfg, len(classes), weights, path)
    checkpoint.setdefault("source", checkpoint["config"].get("data"))
    checkpoint.setdefault("model_name", checkpoint["config"].get("model"))
    if "epoch" not in checkpoint and isinstance(checkpoint.get("state"), dict):  # resume.pt
        checkpoint["epoch"] = checkpoint["state"].get("epoch")
        checkpoint["step"] = checkpoint["state"].get("step")
    return checkpoint


def _recorded_config(config: Any, path: Path) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint records, every field's type and range checked."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(config, dict) or not isinstance(config.get("vit"), dict):
        raise CheckpointError(f"{path} has a damaged configuration (not a settings object); use the file training "
                              f"wrote, unedited.")
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(f"{path} has settings this vitcourse does not know ({', '.join(unknown)}); it was "
                              f"written by another vitcourse version or edited, so use a checkpoint from this version.")
    try:
        return TrainConfig.from_dict(config)
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        reason = " ".join(str(err).split()).rstrip(".")
        raise CheckpointError(f"{path} has an invalid configuration ({reason}); it was written by another vitcourse "
                              f"version or edited, so use a checkpoint from this version.") from None


def _check_weights_fit(cfg: TrainConfig, num_classes: int, weights: dict[str, Tensor], path: Path) -> None:
    """The weights must be exactly those of the model ``cfg`` describes: checked on the meta device (no memory)."""
    from .models import build_model

    if cfg.model == "vit":  # a recorded depth is believed only as far as the weights show blocks
        blocks = {int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))}
        if cfg.vit.depth != len(blocks):
            raise CheckpointError(f"{path} records a ViT of depth {cfg.vit.depth} but holds weights for {len(blocks)} "
                                  f"blocks; it was edited or damaged, so use the file training wrote.")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(cfg, num_classes).state_dict().items()}
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path} records a model that cannot be built ({' '.join(str(err).split())}); "
                              f"use the file training wrote, unedited.") from None
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        what = (f"{wrong[0]} is {found[wrong[0]]} where the recorded settings give {expected[wrong[0]]}" if wrong else
                f"{missing[0]} is missing" if missing else f"{extra[0]} does not belong to the recorded model")
        raise CheckpointError(f"{path} holds weights that do not fit the model its own settings describe ({what}); "
                              f"it was edited or damaged, so use the file training wrote.")


def load_model(path: str | os.PathLike, run_folder: bool = True) -> tuple[nn.Module, TrainConfig, dict]:
    """The model stored in a checkpoint (a file, or with ``run_folder`` a run folder: its ``best.safetensors``),
    in eval mode, with its config and what :func:`load_checkpoint` returns; nothing in the file runs or is
    trusted unchecked."""
    from .models import build_model

    path = Path(path).expanduser()
    if run_folder and path.is_dir() and (path / BEST_FILE).is_file():
        path = path / BEST_FILE
    checkpoint = load_checkpoint(path)
    cfg = TrainConfig.from_dict(checkpoint["config"])
    model = build_model(cfg, len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["model"])  # the shapes were checked by load_checkpoint
    return model.eval(), cfg, checkpoint


def load_resume(path: Path) -> dict:
    """``resume.pt`` through :func:`load_checkpoint`, with the entries exact resume needs."""
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("optimizer", "scheduler", "scaler", "state", "rng") if k not in checkpoint]
    if missing or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vitcourse resume state (no {missing[0] if missing else 'format'} "
                              f"entry); train into another --out folder.")
    state = checkpoint["state"]
    fields = {f.name for f in dataclasses.fields(RunState)}
    if not isinstance(state, dict) or set(state) != fields:
        raise CheckpointError(f"{path} has a damaged run state; resume is impossible, so train into another --out "
                              f"folder.")
    try:
        checkpoint["state"] = RunState(**state)
    except TypeError:
        raise CheckpointError(f"{path} has a damaged run state; train into another --out folder.") from None
    return checkpoint


def check_resume_fits(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The optimizer state in ``resume.pt`` must match ``model``'s parameters, tensor by tensor.

    ``load_state_dict`` checks the number of parameter groups but not the shapes of Adam's moments,
    so a damaged file would fail only at the first step, deep in the optimizer.
    """
    saved = checkpoint["optimizer"]
    ours = optimizer.state_dict()
    try:
        groups = [len(g["params"]) for g in saved["param_groups"]]
        state = saved["state"]
        ok = groups == [len(g["params"]) for g in ours["param_groups"]] and isinstance(state, dict)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path} holds optimizer state for other parameters than this model's; it is damaged, "
                              f"so train into another --out folder.")
    shapes = [tuple(p.shape) for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        if not isinstance(index, int) or not 0 <= index < len(shapes) or not isinstance(entry, dict):
            raise CheckpointError(f"{path} holds optimizer state for a parameter this model does not have; it is "
                                  f"damaged, so train into another --out folder.")
        for name, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[index]:
                raise CheckpointError(f"{path} holds optimizer state of shape {tuple(value.shape)} for a parameter "
                                      f"of shape {shapes[index]} ({name}); it is damaged, so train into another "
                                      f"--out folder.")


def split_hash(record: dict) -> str:
    """SHA-256 of a split record (``split.json``): checkpoints carry it, evaluation compares it."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def check_same_split(path: Path, record: dict) -> None:
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


def repair_last(out: Path, checkpoint: dict) -> None:
    """Rewrite ``last.safetensors`` from ``resume.pt`` if a kill left it missing or a checkpoint behind."""
    try:
        current = load_checkpoint(out / LAST_FILE)
        if current.get("step") == checkpoint["state"].step:
            return
    except CheckpointError:
        pass
    info = {k: checkpoint[k] for k in (*INFO_KEYS, "split_sha256") if k in checkpoint}
    state = checkpoint["state"]
    save_weights(out / LAST_FILE, checkpoint["model"], {**info, "kind": "last", "epoch": state.epoch,
                                                        "step": state.step, "finished": True})


def check_same_run(checkpoint: dict, cfg: TrainConfig, source: str, world: int, path: Path) -> None:
    """:class:`ConfigMismatch` unless ``checkpoint`` was written by this run: same config (but for
    :data:`~vitcourse.config.RESUMABLE_FIELDS`), same data actually loaded (``cifar10`` may have fallen
    back to ``synthetic``) and the same number of processes (each one's random state is in the checkpoint)."""
    ours = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_FIELDS}
    theirs = {k: v for k, v in checkpoint["config"].items() if k not in RESUMABLE_FIELDS}
    ours.update({"data source": source, "processes": world})
    theirs.update({"data source": checkpoint["source"], "processes": len(checkpoint["rng"])})
    diffs = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if diffs:
        k = diffs[0]
        raise ConfigMismatch(
            f"{path} was written by a run with a different configuration ({k}: {theirs.get(k)!r} there, "
            f"{ours.get(k)!r} now); use another output directory or the same settings."
        )
