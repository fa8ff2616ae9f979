"""Chapter 5 exercises (training): public spec.

Students write the three small pieces of the training chapter that a reader should be
able to write from the equations: the warmup-then-cosine learning-rate schedule, the
label-smoothed cross-entropy, and the confusion matrix. The expected values come from
the course's training code (:func:`vitcourse.train.learning_rates`), from PyTorch's own
``F.cross_entropy(label_smoothing=...)`` and from a direct count.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from vitcourse.train import TrainConfig, learning_rates

from ..runtime import arr, call
from ..spec import Case, Chapter, Check, Exercise, allclose, exact
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


CHAPTER = Chapter(
    name="ch05",
    title="Training a Vision Transformer",
    sandbox_modules=(),
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
        ),
        Exercise(
            id="5.3", title="The confusion matrix", points=2, answers=("confusion_matrix",),
            statement="Write confusion_matrix(predictions, labels, num_classes): a (K, K) integer tensor whose "
                      "entry [i, j] counts the examples of true class i predicted as class j.",
            public=[Check("200 predictions over 10 classes", confusion_case(200, 10))],
        ),
    ],
)
