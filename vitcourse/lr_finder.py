"""The learning-rate range test (Smith 2015/2017, the "LR finder") and its plot.

Train for a few hundred steps while the learning rate grows geometrically from ``start_lr`` to
``end_lr``, record the (exponentially smoothed) loss at every step, stop once it blows up, and
put the model back as it was. A loss that falls fast marks learning rates that work; where it
turns up is too much. Two common read-outs of the curve:

* the *steepest* point: where the smoothed loss falls fastest per decade of learning rate, before
  its minimum;
* the *minimum* point divided by 10.

A flat curve that only rises at the end means no learning rate makes the loss fall: the problem
is then not the learning rate (chapter 6 meets exactly that).

The maintained package ``torch-lr-finder`` implements the same test; the course carries this short
version because that package always prints and draws a progress bar through
``tqdm.autonotebook`` (stderr output, which the book build treats as an error) and builds on
PyTorch's private ``_LRScheduler`` class.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RangeTestResult", "lr_range_test", "steepest_lr", "plot_lr_range"]

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


def _adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def steepest_lr(
    lrs: np.ndarray, losses: np.ndarray, skip_start: int | None = None, window: float = 0.5
) -> float:
    """The learning rate where ``losses`` fall fastest against ``log10(lrs)``.

    The slope at point ``i`` is a centred difference across about ``window`` decades of learning
    rate (``window / 2`` on each side, at least one point), so a single low point does not make a
    steep slope on its own. Only points strictly before the curve's minimum are candidates: at the
    minimum the loss has stopped falling, and a one-sided difference there would only repeat the
    slope of the segment that led into it (with noise, the minimum is often a point reached by one
    lucky drop, which would then always win). Points before ``skip_start`` (default: a tenth of the
    curve, where the running average still rests on a few batches) are neither candidates nor
    used in any slope.

    Args:
        lrs: ``(n,)`` increasing, positive learning rates (``n >= 3``).
        losses: ``(n,)`` smoothed losses; NaN or infinite values (a diverged end) are ignored.
        skip_start: number of leading points to leave out.
        window: width in decades of the centred difference.

    Raises:
        ValueError: in one sentence, for arrays of different shapes or fewer than 3 points, learning
            rates that are not positive and increasing, or a curve that never falls after ``skip_start``.
    """
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs.shape != losses.shape or lrs.ndim != 1 or len(lrs) < 3:
        raise ValueError(f"need two 1-D arrays of equal length >= 3, got shapes {lrs.shape} and {losses.shape}.")
    if not (np.all(np.isfinite(lrs)) and np.all(lrs > 0) and np.all(np.diff(lrs) > 0)):
        raise ValueError("the learning rates must be positive, finite and increasing.")
    if not window > 0:
        raise ValueError(f"window must be a positive number of decades, got {window}.")
    n = len(lrs)
    start = n // 10 if skip_start is None else skip_start
    start = min(max(start, 0), n - 3)
    values = np.where(np.isfinite(losses), losses, np.nan)[start:]  # (n - start,)
    if np.all(np.isnan(values)):
        raise ValueError("the loss curve has no finite value to read a slope from.")
    x = np.log10(lrs[start:])
    minimum = int(np.nanargmin(values))  # index of the lowest loss, counted from `start`
    if minimum == 0:
        raise ValueError("the loss never falls below its first value (after the skipped start), so there is "
                         "no steepest descent to read; the problem is then not the learning rate.")
    half = max(1, int(round(window / 2 / float(np.median(np.diff(x))))))  # points on each side of the centre
    candidates = np.arange(minimum)  # strictly before the minimum
    lo, hi = np.maximum(candidates - half, 0), np.minimum(candidates + half, len(x) - 1)
    slope = (values[hi] - values[lo]) / (x[hi] - x[lo])  # (minimum,) centred where the curve allows it
    if np.all(np.isnan(slope)):
        raise ValueError("the loss curve has no two finite values before its minimum to read a slope from.")
    return float(lrs[start + int(candidates[np.nanargmin(slope)])])


@dataclass
class RangeTestResult:
    """What a range test recorded, one entry per step.

    Attributes:
        lrs: the learning rate of each step.
        losses: the exponentially smoothed, bias-corrected training loss after each step.
        raw_losses: the loss of each batch as measured.
        diverged: whether the test stopped early because the loss blew up.
    """

    lrs: np.ndarray
    losses: np.ndarray
    raw_losses: np.ndarray
    diverged: bool

    @property
    def steepest(self) -> float:
        """Learning rate at the steepest descent of the smoothed loss (see :func:`steepest_lr`, which
        raises ``ValueError`` for a curve that never falls)."""
        return steepest_lr(self.lrs, self.losses)

    @property
    def min_loss_lr(self) -> float:
        """Learning rate at the lowest smoothed loss."""
        return float(self.lrs[int(np.nanargmin(self.losses))])

    @property
    def drop(self) -> float:
        """How far the smoothed loss fell below its starting value (0 if it never fell)."""
        return float(max(self.losses[0] - np.nanmin(self.losses), 0.0))


def _batches(loader: Iterable) -> Iterator:
    """Cycle through ``loader`` forever (a new pass starts when one ends)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yielded no batches; give it at least one batch.")


def lr_range_test(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: OptimizerFactory = _adam,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    smooth: float = 0.05,
    diverge_factor: float = 5.0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> RangeTestResult:
    """Run the range test; ``model`` is left exactly as it was (weights and buffers restored).

    Args:
        model: maps a batch of inputs ``(B, ...)`` to logits ``(B, K)``.
        loader: yields ``(inputs, targets)`` batches; cycled if it has fewer than ``num_iter``.
        optimizer: ``(params, lr) -> torch.optim.Optimizer``, Adam by default; a fresh one is built.
        loss_fn: ``(logits, targets) -> scalar`` loss.
        start_lr, end_lr: the first and the last learning rate of the geometric sweep.
        num_iter: number of steps (one batch each).
        smooth: weight of the newest loss in the exponential moving average (0 < smooth <= 1).
        diverge_factor: stop once the smoothed loss exceeds this multiple of the best one.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`RangeTestResult` (shorter than ``num_iter`` if the loss diverged).
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr} and end_lr={end_lr}.")
    if num_iter < 3 or not 0 < smooth <= 1:
        raise ValueError(f"need num_iter >= 3 and 0 < smooth <= 1, got num_iter={num_iter}, smooth={smooth}.")
    from tqdm.auto import tqdm

    saved = copy.deepcopy(model.state_dict())
    was_training = model.training
    opt = optimizer(model.parameters(), start_lr)
    ratio = (end_lr / start_lr) ** (1 / (num_iter - 1))  # lr of step i: start_lr * ratio**i
    lrs, raw, smoothed = [], [], []
    average, best, diverged = 0.0, math.inf, False
    batches = _batches(loader)
    model.train()
    try:
        for i in tqdm(range(num_iter), desc="LR range test", disable=not progress):
            lr = start_lr * ratio**i
            for group in opt.param_groups:
                group["lr"] = lr
            inputs, targets = next(batches)
            loss = loss_fn(model(inputs.to(device)), targets.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            average = smooth * value + (1 - smooth) * average
            current = average / (1 - (1 - smooth) ** (i + 1))  # bias-corrected, like Adam's moments
            lrs.append(lr)
            raw.append(value)
            smoothed.append(current)
            best = min(best, current)
            if not math.isfinite(current) or current > diverge_factor * best:
                diverged = True
                break
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    return RangeTestResult(np.array(lrs), np.array(smoothed), np.array(raw), diverged)


def _steepest_or_none(result: RangeTestResult) -> float | None:
    """The steepest point, or None for a curve that never falls (nothing to mark)."""
    try:
        return result.steepest
    except ValueError:
        return None


def plot_lr_range(
    result: RangeTestResult,
    ax: plt.Axes | None = None,
    label: str | None = None,
    mark: bool = True,
    title: str = "Learning-rate range test",
) -> plt.Axes:
    """Smoothed loss against learning rate (log axis), with the steepest point marked (if it falls at all).

    The loss axis stops a little above the curve's values before its minimum, so a diverging tail
    does not flatten the interesting part; called again on the same ``ax``, the ranges are merged.
    """
    prior = ax.get_ylim() if ax is not None and ax.lines else None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    (line,) = ax.plot(result.lrs, result.losses, label=label)
    before_min = result.losses[: int(np.nanargmin(result.losses)) + 1]
    low, high = float(np.nanmin(before_min)), float(np.nanmax(before_min))
    half = max(high - low, 0.25 * abs(high)) * 0.6  # at least a quarter of the loss's size in view
    centre = (low + high) / 2
    low, high = centre - half, centre + half
    if prior is not None:
        low, high = min(low, prior[0]), max(high, prior[1])
    ax.set_ylim(low, high)
    lr = _steepest_or_none(result) if mark else None
    if lr is not None:
        index = int(np.flatnonzero(result.lrs == lr)[0])
        ax.plot([lr], [result.losses[index]], "o", color=line.get_color(), label=f"steepest: {lr:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title)
    if label is not None or lr is not None:
        ax.legend()
    ax.figure.tight_layout()
    return ax
