"""Chapter 8 exercises (pretrained models): public spec.

Students write pieces of using and adapting a pretrained ViT: the top-k class
probabilities of a classifier (fixing the two bugs of a given version), resizing the learned position grid for another image size, and
training a linear probe on frozen features. The expected values come from ``torch.softmax``
and ``torch.topk``, the course's :func:`vitcourse.pretrained.resize_pos_embed`, and full-batch
gradient descent with PyTorch's autograd and ``F.cross_entropy``.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from vitcourse.pretrained import resize_pos_embed
from vitcourse.vit import VisionTransformer, ViTConfig

from ..runtime import arr, call
from ..spec import Case, Chapter, Check, Comparison, Exercise, allclose
from ._common import randn, t


def topk_case(batch: int, classes: int, k: int, scale: float = 3.0, class_zero_first: bool = False):
    """``top_k(logits, k)`` against ``torch.softmax(logits, -1).topk(k)``; ``class_zero_first``: class 0
    is every row's most probable class."""

    def build(rng: np.random.Generator) -> Case:
        logits = randn(rng, batch, classes, scale=scale)
        if class_zero_first:
            logits[:, 0] = logits.max(axis=1) + 1.0
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


def layer_of(name: str, num_layers: int) -> int:
    """The layer id of a parameter (BEiT/MAE): 0 the embeddings, i + 1 block i, num_layers + 1 the rest."""
    block = re.fullmatch(r"blocks\.(\d+)\..+", name)
    if block:
        return int(block.group(1)) + 1
    return 0 if name in ("cls_token", "pos_embed") or name.startswith("patch_embed.") else num_layers + 1


def decay_reference(shapes: dict, num_layers: int, lr: float, decay: float, weight_decay: float) -> dict:
    """``{name: (lr, weight_decay)}`` of layer-wise learning-rate decay."""
    expected = {}
    for name, shape in shapes.items():
        no_decay = len(shape) <= 1 or name in ("cls_token", "pos_embed")
        expected[name] = (lr * decay ** (num_layers + 1 - layer_of(name, num_layers)), 0.0 if no_decay else weight_decay)
    return expected


def groups_match() -> Comparison:
    """Parameter groups ``[{"params": [names], "lr", "weight_decay"}]`` against ``{name: (lr, weight_decay)}``."""

    def compare(actual, expected) -> str | None:
        if not isinstance(actual, list) or not all(
                isinstance(g, dict) and {"params", "lr", "weight_decay"} <= set(g) and isinstance(g["params"], list)
                for g in actual):
            return 'expected a list of groups {"params": [names], "lr": ..., "weight_decay": ...}'
        got: dict = {}
        for group in actual:
            for name in group["params"]:
                if name in got:
                    return f"parameter {name!r} is in more than one group"
                got[name] = (group["lr"], group["weight_decay"])
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        if missing or extra:
            return f"parameters in no group: {len(missing)}; names in a group that are not parameters: {len(extra)}"
        for what, index in (("learning rate", 0), ("weight decay", 1)):
            wrong = [n for n in expected if not isinstance(got[n][index], (int, float))
                     or not np.isclose(got[n][index], expected[n][index], rtol=1e-6, atol=0)]
            if wrong:
                return f"{len(wrong)} of {len(expected)} parameters get the wrong {what}, for example {wrong[0]!r}"
        return None

    return compare


def decay_case(depth: int, lr: float, decay: float, weight_decay: float, trainable_from: int | None = None):
    """``layer_decay_groups(shapes, depth, lr, decay, weight_decay)`` for a small ViT of ``depth`` blocks.

    ``trainable_from``: only the parameters of blocks ``trainable_from`` and later, the final norm and the
    head are passed, as when the rest is frozen.
    """

    def build(rng: np.random.Generator) -> Case:
        model = VisionTransformer(ViTConfig(dim=8, heads=2, mlp_dim=16, depth=depth, num_classes=int(rng.integers(2, 20))))
        shapes = {name: list(p.shape) for name, p in model.named_parameters()}
        if trainable_from is not None:
            shapes = {n: s for n, s in shapes.items() if layer_of(n, depth) > trainable_from}
        expected = decay_reference(shapes, depth, lr, decay, weight_decay)
        return Case(call("layer_decay_groups", shapes, depth, lr, decay, weight_decay), expected, groups_match())

    return build


CHAPTER = Chapter(
    name="ch08",
    title="From your own code to a pretrained ViT",
    sandbox_modules=(),
    exercises=[
        Exercise(
            id="8.1", title="Find and fix: top-k probabilities", points=2, answers=("top_k",),
            statement="The notebook's top_k_with_bugs(logits, k) has two bugs. Write top_k(logits, k) with them "
                      "fixed: for logits (B, K), return (probabilities (B, k), indices (B, k)): the k largest "
                      "softmax probabilities of each row (softmax over all K classes) in decreasing order and "
                      "their class indices (int64). Graded on other k and K.",
            public=[Check("the top 5 of 1,000 classes for 4 images", topk_case(4, 1000, 5))],
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
        Exercise(
            id="8.4", title="Layer-wise learning-rate decay", points=4, answers=("layer_decay_groups",),
            statement="Write layer_decay_groups(shapes, num_layers, lr, decay, weight_decay) for shapes = {name: shape} "
                      "of a ViT's parameters in timm naming: a list of groups {'params': [names], 'lr', 'weight_decay'}, "
                      "every name in exactly one. Layer 0: cls_token, pos_embed, patch_embed.*; layer i + 1: blocks.i.*; "
                      "layer num_layers + 1: the rest. Learning rate lr * decay ** (num_layers + 1 - layer); weight "
                      "decay 0 for cls_token, pos_embed and every parameter with at most one dimension, else weight_decay.",
            public=[Check("a ViT of 4 blocks, decay 0.75", decay_case(4, 1e-3, 0.75, 0.05))],
        ),
    ],
)
