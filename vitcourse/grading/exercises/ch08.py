"""Chapter 8 exercises (pretrained models): public spec.

Students write three pieces of using and adapting a pretrained ViT: the top-k class
probabilities of a classifier, resizing the learned position grid for another image size, and
training a linear probe on frozen features. The expected values come from ``torch.softmax``
and ``torch.topk``, the course's :func:`vitcourse.pretrained.resize_pos_embed`, and full-batch
gradient descent with PyTorch's autograd and ``F.cross_entropy``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vitcourse.pretrained import resize_pos_embed

from ..runtime import arr, call
from ..spec import Case, Chapter, Check, Exercise, allclose
from ._common import randn, t


def topk_case(batch: int, classes: int, k: int, scale: float = 3.0):
    """``top_k(logits, k)`` against ``torch.softmax(logits, -1).topk(k)``."""

    def build(rng: np.random.Generator) -> Case:
        logits = randn(rng, batch, classes, scale=scale)
        values, indices = torch.softmax(t(logits), dim=-1).topk(k, dim=-1)
        return Case(call("top_k", arr(logits), k), (values.numpy(), indices.numpy()),
                    allclose(atol=1e-6, rtol=1e-5))

    return build


def resize_case(old: int, new: int, dim: int):
    """``resize_pos_embed(pos_embed (1, 1 + old**2, dim), old, new)`` against the course's function."""

    def build(rng: np.random.Generator) -> Case:
        pos = randn(rng, 1, 1 + old * old, dim)
        expected = resize_pos_embed(t(pos), old, new).numpy()
        return Case(call("resize_pos_embed", arr(pos), old, new), expected, allclose(atol=1e-5, rtol=1e-4))

    return build


def probe_reference(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, lr: float):
    """Zero-initialised ``(K, D)`` weight and ``(K,)`` bias after ``steps`` full-batch gradient steps."""
    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
        with torch.no_grad():
            weight -= lr * grad_w
            bias -= lr * grad_b
    return weight.detach().numpy(), bias.detach().numpy()


def probe_case(batch: int, dim: int, classes: int, steps: int, lr: float):
    """``linear_probe(features, labels, num_classes, steps, lr)`` against autograd gradient descent."""

    def build(rng: np.random.Generator) -> Case:
        features = randn(rng, batch, dim)
        labels = rng.integers(0, classes, batch).astype(np.int64)
        expected = probe_reference(t(features), t(labels), classes, steps, lr)
        return Case(call("linear_probe", arr(features), arr(labels), classes, steps, lr), expected,
                    allclose(atol=1e-5, rtol=1e-4))

    return build


CHAPTER = Chapter(
    name="ch08",
    title="From your own code to a pretrained ViT",
    sandbox_modules=(),
    exercises=[
        Exercise(
            id="8.1", title="Top-k probabilities", points=2, answers=("top_k",),
            statement="Write top_k(logits, k): for logits (B, K), return (probabilities (B, k), indices (B, k)): "
                      "the k largest softmax probabilities of each row in decreasing order and their class indices "
                      "(int64); no torch.topk, torch.sort or torch.argsort.",
            public=[Check("the top 5 of 1,000 classes for 4 images", topk_case(4, 1000, 5))],
            forbidden=("timm", ".topk", ".sort", ".argsort"),
        ),
        Exercise(
            id="8.2", title="Resizing the position grid", points=3, answers=("resize_pos_embed",),
            statement="Write resize_pos_embed(pos_embed, old_grid, new_grid): for pos_embed (1, 1 + g*g, D) with the "
                      "CLS position first, return (1, 1 + g'*g', D): the CLS position unchanged, followed by the "
                      "g x g patch positions resized as a D-channel image to g' x g' with F.interpolate("
                      "mode='bicubic', antialias=True, align_corners=False), in reading order.",
            public=[Check("a 14 x 14 grid of 8-dimensional positions resized to 10 x 10", resize_case(14, 10, 8))],
            forbidden=("timm", ".resample_abs_pos_embed"),
        ),
        Exercise(
            id="8.3", title="A linear probe", points=3, answers=("linear_probe",),
            statement="Write linear_probe(features, labels, num_classes, steps, lr): starting from a zero weight "
                      "(K, D) and a zero bias (K,), take `steps` full-batch gradient-descent steps of size lr on the "
                      "mean cross-entropy of the logits features @ weight.T + bias (features (B, D), integer "
                      "labels (B,)); return (weight, bias).",
            public=[Check("20 steps on 32 features of size 6 over 3 classes", probe_case(32, 6, 3, 20, 0.5))],
        ),
    ],
)
