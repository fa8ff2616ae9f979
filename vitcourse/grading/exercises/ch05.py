"""Chapter 5 exercises (training): public spec.

Students write the three small pieces of the training chapter that a reader should be
able to write from the equations: the warmup-then-cosine learning-rate schedule, the
label-smoothed cross-entropy, and the confusion matrix. The expected values come from
the course's training code (:func:`vitcourse.train.learning_rates`), from PyTorch's own
``F.cross_entropy(label_smoothing=...)`` and from a direct count. Exercise 5.4 trains a
small classifier: the grader draws the data, and the check is a property of the result
(its accuracy on held-out points from the same generator), not a value to match. Exercise
5.5 derives where label smoothing leaves the logits; the expected values come from
minimising PyTorch's own smoothed cross-entropy numerically (bisection on its autograd
derivative), never from the closed form.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vitcourse.train import TrainConfig, learning_rates

from ..runtime import apply, arr, call, method
from ..spec import Case, Chapter, Check, Comparison, Exercise, allclose
from ._common import randn, t


def schedule_case(total_steps: int, warmup_steps: int, peak_lr: float):
    """``warmup_cosine(total_steps, warmup_steps, peak_lr)`` against the course's cosine schedule."""

    def build(rng: np.random.Generator) -> Case:
        # one "epoch" per step, so warmup_epochs counts steps
        cfg = TrainConfig(lr=peak_lr, warmup_epochs=warmup_steps, epochs=total_steps, schedule="cosine")
        expected = np.array(learning_rates(cfg, steps_per_epoch=1))
        return Case(call("warmup_cosine", total_steps, warmup_steps, peak_lr), expected,
                    allclose(atol=1e-12, rtol=1e-6))

    return build


def smoothing_case(batch: int, classes: int, smoothing: float, scale: float = 3.0):
    """``smoothed_cross_entropy(logits, labels, smoothing)`` against ``F.cross_entropy``."""

    def build(rng: np.random.Generator) -> Case:
        logits = randn(rng, batch, classes, scale=scale)
        labels = rng.integers(0, classes, batch).astype(np.int64)
        expected = F.cross_entropy(t(logits), t(labels), label_smoothing=smoothing, reduction="none").numpy()
        return Case(call("smoothed_cross_entropy", arr(logits), arr(labels), smoothing), expected,
                    allclose(atol=1e-5, rtol=1e-5))

    return build


def confusion_case(n: int, classes: int, skip_class: bool = False):
    """``confusion_matrix(predictions, labels, num_classes)`` against a direct count."""

    def build(rng: np.random.Generator) -> Case:
        high = classes - 1 if skip_class else classes  # optionally a class that never occurs
        labels = rng.integers(0, high, n).astype(np.int64)
        predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, high, n)).astype(np.int64)
        expected = np.zeros((classes, classes), dtype=np.int64)
        for y, p in zip(labels, predictions):
            expected[y, p] += 1
        return Case(call("confusion_matrix", arr(predictions), arr(labels), classes), expected,
                    allclose(atol=0, rtol=0))

    return build


def point_data(rng: np.random.Generator, n: int, kind: str, classes: int, dim: int,
               scale: float = 1.0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled points ``(n, dim)`` float32 and ``(n,)`` int64 that no linear classifier separates.

    ``"rings"``: class ``c`` lies on the sphere of radius ``1 + c`` (radial noise 0.15), so the
    classes are nested shells. ``"xor"``: two classes of four Gaussian clusters (std 0.3) at the
    corners ``(±1, ±1)`` of the first two coordinates, the label being the XOR of the two signs;
    further coordinates are noise. Finally ``x * scale + shift``: inputs of any scale and offset.
    """
    if kind == "rings":
        labels = rng.integers(0, classes, n)
        direction = rng.standard_normal((n, dim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        x = direction * (1.0 + labels + 0.15 * rng.standard_normal(n))[:, None]
    elif kind == "xor":
        corner = rng.integers(0, 2, (n, 2))
        labels = corner[:, 0] ^ corner[:, 1]
        x = 0.3 * rng.standard_normal((n, dim))
        x[:, :2] += 2.0 * corner - 1.0
    else:
        raise ValueError(f"unknown kind {kind!r}; use 'rings' or 'xor'.")
    return (x * scale + shift).astype(np.float32), labels.astype(np.int64)


def accuracy_at_least(threshold: float) -> Comparison:
    """The logits ``(N, K)`` of held-out points must classify at least ``threshold`` of them correctly."""

    def compare(actual, expected) -> str | None:
        labels, classes = expected
        shape = (len(labels), classes)
        if not isinstance(actual, np.ndarray) or actual.shape != shape:
            got = f"shape {tuple(actual.shape)}" if isinstance(actual, np.ndarray) else f"a {type(actual).__name__}"
            return f"expected logits of shape {shape} from the trained model, got {got}"
        if not np.isfinite(actual).all():
            return "the trained model's logits have infinite or NaN entries"
        accuracy = float(np.mean(actual.argmax(axis=1) == labels))
        if accuracy < threshold:
            return f"held-out accuracy {accuracy:.3f}, below the required {threshold:.2f}"
        return None

    return compare


TRAIN_POINTS, HELD_OUT_POINTS = 256, 512
ACCURACY_REQUIRED = 0.9
"""The model answer reaches at least 0.98 on every seed tried; a linear model at most 0.76, chance 1/K."""


def training_case(kind: str, classes: int, dim: int, steps: int, scale: float = 1.0, shift: float = 0.0):
    """``train_classifier(x, y, classes, steps)``, then its eval-mode logits on held-out points."""

    def build(rng: np.random.Generator) -> Case:
        x, y = point_data(rng, TRAIN_POINTS, kind, classes, dim, scale, shift)
        x_val, y_val = point_data(rng, HELD_OUT_POINTS, kind, classes, dim, scale, shift)
        model = method(call("train_classifier", arr(x), arr(y), classes, steps), "eval")
        return Case(apply(model, arr(x_val)), (y_val, classes), accuracy_at_least(ACCURACY_REQUIRED))

    return build


def smoothing_optimum_reference(classes: int, smoothing: float) -> tuple[float, float]:
    """``(gap, loss)`` at the minimum of the smoothed cross-entropy over logits, for 0 < smoothing < 1.

    By symmetry and convexity the minimum has every wrong class's logit equal, so it lies on the
    line ``(g, 0, ..., 0)`` with label 0. Bisection on the sign of ``d loss / d g`` (PyTorch's
    autograd through ``F.cross_entropy(label_smoothing=...)``, float64) finds ``g``.
    """

    def loss_and_slope(g: float) -> tuple[float, float]:
        gap = torch.tensor(g, dtype=torch.float64, requires_grad=True)
        logits = torch.cat([gap[None], torch.zeros(classes - 1, dtype=torch.float64)])[None]
        loss = F.cross_entropy(logits, torch.zeros(1, dtype=torch.long), label_smoothing=smoothing)
        loss.backward()
        return float(loss.detach()), float(gap.grad)

    low, high = 0.0, 200.0
    for _ in range(200):
        middle = (low + high) / 2
        if loss_and_slope(middle)[1] < 0:
            low = middle
        else:
            high = middle
    gap = (low + high) / 2
    return gap, loss_and_slope(gap)[0]


def smoothing_optimum_case(classes: int, smoothing: float):
    """``smoothing_optimum(num_classes, smoothing)``: the logit gap and the loss at the minimum."""

    def build(rng: np.random.Generator) -> Case:
        gap, loss = smoothing_optimum_reference(classes, smoothing)
        return Case(call("smoothing_optimum", classes, smoothing), [np.float64(gap), np.float64(loss)],
                    allclose(atol=1e-6, rtol=1e-6))

    return build


CHAPTER = Chapter(
    name="ch05",
    title="Training a Vision Transformer",
    sandbox_modules=(),
    # 5.4 trains six small models, public and hidden checks sharing one budget: the model answer needs
    # about 2 s of CPU, and 10 to 15 s of wall time in the sandbox on a 2-core machine at load 10; the
    # margin is for slower answers (minibatches, wider models) and busier machines.
    exercise_seconds=40.0,
    exercises=[
        Exercise(
            id="5.1", title="Warmup and cosine decay", points=3, answers=("warmup_cosine",),
            statement="Write warmup_cosine(total_steps, warmup_steps, peak_lr) returning a 1-D tensor of the learning rates "
                      "for steps 0 .. total_steps - 1: peak_lr * (t + 1) / warmup_steps while t < warmup_steps, "
                      "then peak_lr / 2 * (1 + cos(pi * (t - warmup_steps) / (total_steps - warmup_steps))).",
            public=[Check("100 steps with 10 warmup steps", schedule_case(100, 10, 1e-3))],
        ),
        Exercise(
            id="5.2", title="Label smoothing", points=3, answers=("smoothed_cross_entropy",),
            statement="Write smoothed_cross_entropy(logits, labels, smoothing): the (B,) per-example "
                      "cross-entropies between softmax(logits) (B, K) and the target that puts 1 - smoothing + "
                      "smoothing / K on the label and smoothing / K on every other class; no F.cross_entropy, "
                      "nn.CrossEntropyLoss or label_smoothing argument.",
            public=[Check("a batch of 8 over 10 classes with smoothing 0.1", smoothing_case(8, 10, 0.1))],
            forbidden=("timm", "torch.nn.functional.cross_entropy", "torch.nn.CrossEntropyLoss",
                       "torch.nn.functional.nll_loss", "torch.nn.NLLLoss"),
            forbidden_ops=("aten.nll_loss_forward", "aten.nll_loss2d_forward"),
        ),
        Exercise(
            id="5.3", title="The confusion matrix", points=2, answers=("confusion_matrix",),
            statement="Write confusion_matrix(predictions, labels, num_classes): a (K, K) integer tensor whose "
                      "entry [i, j] counts the examples of true class i predicted as class j.",
            public=[Check("200 predictions over 10 classes", confusion_case(200, 10))],
        ),
        Exercise(
            id="5.4", title="Train a classifier that generalises", points=4, answers=("train_classifier",),
            statement=f"Write train_classifier(x, y, num_classes, steps): train, with at most `steps` optimizer steps, "
                      f"and return an nn.Module mapping RAW points (B, D) (of any scale and offset) to logits "
                      f"(B, num_classes). The points come in classes no straight line separates (nested rings, "
                      f"XOR clusters). The grader calls model.eval(), then model(x_val) on {HELD_OUT_POINTS} held-out "
                      f"points of the same generator, and needs an accuracy of at least {ACCURACY_REQUIRED:.0%}.",
            public=[Check("two rings in the plane, 100 steps", training_case("rings", 2, 2, 100))],
        ),
        Exercise(
            id="5.5", title="Derive where label smoothing stops the logits", points=4,
            answers=("smoothing_optimum",),
            statement="Write smoothing_optimum(num_classes, smoothing) for 0 < smoothing < 1, returning the pair "
                      "(gap, loss): over all logit vectors, the smallest value the label-smoothed cross-entropy of "
                      "5.2 can take (loss), and at that minimum the true class's logit minus any other class's "
                      "logit (gap). Graded to 1e-6 at class counts and smoothings you do not see.",
            public=[Check("10 classes, smoothing 0.1", smoothing_optimum_case(10, 0.1))],
        ),
    ],
)
