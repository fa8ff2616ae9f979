"""Chapter 7 exercises (the ViT in pure JAX): public spec.

Students write, in ``jax.numpy``, the pieces of chapter 7: layer normalisation and
self-attention for one sequence on pytree parameters, the patch-embedding kernel
ported from a ``Conv2d`` weight, a prediction and a measurement of how often ``jax.jit``
traces (exercise 7.4: the count is the number of distinct shape and dtype pairs among the
arguments), a loss written for one example and batched with ``jax.vmap``, its gradient,
and momentum SGD as a tree map. Expected values come from
PyTorch (``F.layer_norm``, :class:`vitcourse.attention.MultiHeadSelfAttention`,
``F.conv2d``, ``F.cross_entropy`` and autograd, ``torch.optim.SGD``), never from
:mod:`vitcourse.jax_vit`, which the grading sandbox does not expose. Exercise 7.6, attention over
a padded batch with a key mask, is checked against the PyTorch attention run on each sequence cut
to its true length, so the reference has no mask at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vitcourse.attention import MultiHeadSelfAttention
from vitcourse.encoder import LAYER_NORM_EPS
from vitcourse.patches import image_to_patches

from ..runtime import arr, call
from ..spec import Case, Chapter, Check, Comparison, Exercise, allclose, exact
from ._common import randn, randomised, t


def jx(x: np.ndarray) -> dict:
    """An input handed to the student as a JAX array."""
    return arr(x, as_="jax")


def tree_allclose(atol: float = 1e-5, rtol: float = 1e-4) -> Comparison:
    """:func:`allclose` for pytrees: the same nesting and dict keys, then every leaf in order."""
    leaves = allclose(atol, rtol)

    def structure(tree):
        if isinstance(tree, dict):
            return {key: structure(tree[key]) for key in sorted(tree)}
        if isinstance(tree, (list, tuple)):
            return [structure(item) for item in tree]
        return None

    def flat(tree) -> list:
        if isinstance(tree, dict):
            return [leaf for key in sorted(tree) for leaf in flat(tree[key])]
        if isinstance(tree, (list, tuple)):
            return [leaf for item in tree for leaf in flat(item)]
        return [tree]

    def compare(actual, expected) -> str | None:
        if structure(actual) != structure(expected):
            return f"expected a pytree shaped like {structure(expected)} (None = array), got {structure(actual)}"
        return leaves(flat(actual), flat(expected))

    return compare


def scalar_close(atol: float = 1e-5, rtol: float = 1e-5) -> Comparison:
    """:func:`allclose` for a scalar result, accepting it as a 0-d or a one-element array."""
    leaf = allclose(atol, rtol)

    def compare(actual, expected) -> str | None:
        if isinstance(actual, np.ndarray) and actual.size == 1 and np.ndim(expected) == 0:
            actual = actual.reshape(())
        return leaf(actual, expected)

    return compare


# ---------------------------------------------------------------- 7.1 layer norm


def layer_norm_case(shape: tuple[int, ...], offset: float = 0.0, eps: float | None = None):
    """``layer_norm({"scale", "bias"}, x[, eps])`` over the last axis, against ``F.layer_norm``."""

    def build(rng: np.random.Generator) -> Case:
        x = randn(rng, *shape) + np.float32(offset)
        scale, bias = 1.0 + randn(rng, shape[-1], scale=0.3), randn(rng, shape[-1])
        expected = F.layer_norm(t(x), (shape[-1],), t(scale), t(bias), LAYER_NORM_EPS if eps is None else eps)
        kwargs = {} if eps is None else {"eps": eps}
        task = call("layer_norm", {"scale": jx(scale), "bias": jx(bias)}, jx(x), **kwargs)
        return Case(task, expected.numpy(), allclose(atol=1e-5 + 1e-6 * offset, rtol=1e-4))

    return build


# ---------------------------------------------------------------- 7.2 self-attention


def linear_params(layer: torch.nn.Linear) -> dict:
    """A torch linear layer as ``{"kernel": (in, out), "bias": (out,)}`` JAX inputs."""
    return {"kernel": jx(layer.weight.detach().numpy().T), "bias": jx(layer.bias.detach().numpy())}


def attention_case(tokens: int, dim: int, heads: int):
    """``self_attention(p, x, heads)`` for one sequence, against the course's PyTorch attention."""

    def build(rng: np.random.Generator) -> Case:
        reference = randomised(MultiHeadSelfAttention(dim, heads, fused=False), rng)
        x = randn(rng, tokens, dim)
        with torch.no_grad():
            expected = reference(t(x)[None])[0].numpy()  # the reference wants a batch: (1, N, D)
        p = {"qkv": linear_params(reference.qkv), "proj": linear_params(reference.proj)}
        return Case(call("self_attention", p, jx(x), heads), expected, allclose(atol=1e-5, rtol=1e-4))

    return build


def padded_attention_case(batch: int, tokens: int, dim: int, heads: int, full: bool = False, garbage: float = 1.0):
    """``padded_attention(p, x, lengths, heads)`` against the PyTorch attention of each sequence cut to its length.

    The padded positions hold noise of size ``garbage`` (never seen by the reference); their outputs must be 0.
    """

    def build(rng: np.random.Generator) -> Case:
        reference = randomised(MultiHeadSelfAttention(dim, heads, fused=False), rng)
        x = randn(rng, batch, tokens, dim)
        lengths = np.full(batch, tokens) if full else rng.integers(1, tokens + 1, batch)
        if not full:  # always one full sequence and one of a single token
            lengths[:2] = tokens, 1
        lengths = lengths.astype(np.int32)
        expected = np.zeros_like(x)
        for b, length in enumerate(lengths):
            x[b, length:] = randn(rng, tokens - length, dim, scale=garbage)
            with torch.no_grad():
                expected[b, :length] = reference(t(x[b:b + 1, :length]))[0].numpy()
        p = {"qkv": linear_params(reference.qkv), "proj": linear_params(reference.proj)}
        return Case(call("padded_attention", p, jx(x), jx(lengths), heads), expected, allclose(atol=1e-5, rtol=1e-4))

    return build


# ---------------------------------------------------------------- 7.3 patch kernel


def patch_kernel_case(dim: int, channels: int, patch: int):
    """``conv_to_patch_kernel(weight)``: patches in (row, column, channel) order times the kernel == the conv."""

    def build(rng: np.random.Generator) -> Case:
        weight = randn(rng, dim, channels, patch, patch)
        expected = np.transpose(weight, (2, 3, 1, 0)).reshape(-1, dim)  # (P, P, C, D) -> (P*P*C, D)
        # The kernel is defined by what it must do: flattened patches @ kernel == Conv2d(stride = patch).
        image = t(randn(rng, 1, channels, 2 * patch, 3 * patch))
        conv = F.conv2d(image, t(weight), stride=patch).flatten(2).transpose(1, 2)[0]  # (N, D)
        torch.testing.assert_close(image_to_patches(image, patch)[0] @ t(expected), conv, atol=1e-4, rtol=1e-4)
        return Case(call("conv_to_patch_kernel", jx(weight)), expected, allclose(atol=0, rtol=0))

    return build


# ---------------------------------------------------------------- 7.4 and 7.5 the vmapped loss, grad, tree map


def classifier_inputs(rng: np.random.Generator, batch: int, shape: tuple[int, ...], classes: int, scale: float):
    """A linear classifier's parameters ``{"w": (F, K), "b": (K,)}``, images and integer labels."""
    features = int(np.prod(shape))
    w, b = randn(rng, features, classes, scale=scale), randn(rng, classes)
    images = randn(rng, batch, *shape)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    return w, b, images, labels


def loss_case(batch: int, shape: tuple[int, ...], classes: int, what: str = "loss", scale: float = 0.3):
    """``batch_loss`` (or ``batch_grad``) of a linear classifier, against ``F.cross_entropy`` and autograd."""

    def build(rng: np.random.Generator) -> Case:
        w, b, images, labels = classifier_inputs(rng, batch, shape, classes, scale)
        tw, tb = t(w).requires_grad_(), t(b).requires_grad_()
        loss = F.cross_entropy(t(images).reshape(batch, -1) @ tw + tb, t(labels).long())
        params = {"w": jx(w), "b": jx(b)}
        if what == "loss":
            return Case(call("batch_loss", params, jx(images), jx(labels)), loss.detach().numpy(), scalar_close())
        loss.backward()
        expected = {"w": tw.grad.numpy(), "b": tb.grad.numpy()}
        return Case(call("batch_grad", params, jx(images), jx(labels)), expected, tree_allclose(atol=1e-6))

    return build


# ---------------------------------------------------------------- 7.4 predict, then measure: how often jit traces

PREDICTED_TRACES = 4
"""The answer of 7.4's scenario: batches of 64 then a last batch of 40 (1,000 images), three times over,
then batches of 256 and a last one of 232: four distinct batch shapes, so four traces; repeating an
epoch adds none. An integer count, so the prediction must be exact (tolerance 0)."""


def traces_case(shapes: list[tuple[tuple[int, ...], str]]):
    """``count_traces(arrays)`` for arrays of the given shapes and dtypes (NumPy names), in this order.

    ``jax.jit`` keeps one compiled version per distinct (shape, dtype) of its argument; none of these
    arrays is weakly typed, so that is the number of traces.
    """

    def build(rng: np.random.Generator) -> Case:
        arrays = [jx((randn(rng, *shape) * 3).astype(dtype)) for shape, dtype in shapes]
        distinct = len({(tuple(shape), np.dtype(dtype).name) for shape, dtype in shapes})
        return Case(call("count_traces", arrays), distinct, exact())

    return build


def prediction_case(rng: np.random.Generator) -> Case:
    """The student's written prediction for the statement's scenario."""
    return Case(call("predicted_traces"), PREDICTED_TRACES, exact())


def _jax_tree(tree: dict) -> dict:
    """The exercise's pytree of NumPy arrays as JAX inputs."""
    return {key: _jax_tree(value) if isinstance(value, dict) else jx(value) for key, value in tree.items()}


def momentum_case(lr: float, momentum: float):
    """``sgd_momentum(params, grads, velocity, lr, momentum)`` on a nested pytree, against ``torch.optim.SGD``."""

    def build(rng: np.random.Generator) -> Case:
        shapes = {"layer": {"kernel": (3, 4), "bias": (4,)}, "scale": (2,)}
        leaves = [("layer", "kernel"), ("layer", "bias"), ("scale",)]

        def tree(fn):
            return {"layer": {"kernel": fn(shapes["layer"]["kernel"]), "bias": fn(shapes["layer"]["bias"])},
                    "scale": fn(shapes["scale"])}

        params, grads, velocity = (tree(lambda s: randn(rng, *s)) for _ in range(3))

        def get(tr, path):
            return tr[path[0]] if len(path) == 1 else tr[path[0]][path[1]]

        tensors = [t(get(params, p)).requires_grad_() for p in leaves]
        opt = torch.optim.SGD(tensors, lr=lr, momentum=momentum)
        for tensor, path in zip(tensors, leaves):
            opt.state[tensor]["momentum_buffer"] = t(get(velocity, path))  # torch resumes from this buffer
            tensor.grad = t(get(grads, path))
        opt.step()
        # torch's new parameters; the velocity by its definition (torch keeps no buffer when momentum is 0)
        new = {path: (tensor.detach().numpy(), momentum * get(velocity, path) + get(grads, path))
               for tensor, path in zip(tensors, leaves)}
        expected = [tree_of(new, 0), tree_of(new, 1)]
        task = call("sgd_momentum", _jax_tree(params), _jax_tree(grads), _jax_tree(velocity), lr, momentum)
        return Case(task, expected, tree_allclose(atol=1e-6, rtol=1e-5))

    return build


def tree_of(values: dict, index: int) -> dict:
    """Rebuild the exercise's pytree from ``{path: (param, velocity)}``."""
    return {"layer": {"kernel": values[("layer", "kernel")][index], "bias": values[("layer", "bias")][index]},
            "scale": values[("scale",)][index]}


CHAPTER = Chapter(
    name="ch07",
    title="The ViT in pure JAX",
    sandbox_modules=(),
    preload="torch,jax",
    exercise_seconds=30.0,  # eager JAX compiles each operation for each new shape; a busy machine must not cost points
    exercises=[
        Exercise(
            id="7.1", title="Layer normalisation in JAX", points=2, answers=("layer_norm",),
            statement="Write layer_norm(p, x, eps=1e-6) with jax.numpy: normalise the last axis of x to mean 0 "
                      "and (biased) variance 1, then multiply by p['scale'] and add p['bias']; (..., D) -> (..., D).",
            public=[Check("the tokens of one image, (5, 8)", layer_norm_case((5, 8)))],
        ),
        Exercise(
            id="7.2", title="Self-attention for one sequence", points=3, answers=("self_attention",),
            statement="Write self_attention(p, x, heads) with jax.numpy for x of shape (N, D) and no batch axis: "
                      "qkv = x @ p['qkv']['kernel'] + p['qkv']['bias'] laid out as (3, heads, D / heads); "
                      "softmax(q k^T / sqrt(D / heads)) v per head; heads side by side; then the 'proj' linear layer.",
            public=[Check("7 tokens, D = 16, 4 heads", attention_case(7, 16, 4))],
        ),
        Exercise(
            id="7.3", title="Porting the patch embedding", points=2, answers=("conv_to_patch_kernel",),
            statement="Write conv_to_patch_kernel(weight): turn a Conv2d weight (D, C, P, P) into the (P*P*C, D) "
                      "kernel that multiplies patches flattened in (row, column, channel) order, so that "
                      "patches @ kernel equals the convolution with stride P.",
            public=[Check("D = 6, 3 channels, patch 4", patch_kernel_case(6, 3, 4))],
        ),
        Exercise(
            id="7.4", title="Predict, then measure: how often does jit trace?", points=4,
            answers=("predicted_traces", "count_traces"),
            statement="First write predicted_traces(): a function that returns your prediction, an int, of how many "
                      "times jax.jit traces a function called on batches of 64 images then a last batch of 40 "
                      "(1,000 images), for three epochs, then on batches of 256 and a last one of 232. Then write "
                      "count_traces(arrays): jit a function that counts its own traces, call it once on each array "
                      "of the list in order, and return the count it measured. The prediction is graded once, "
                      "exactly; the measurement on lists of arrays you do not see.",
            public=[Check("three arrays, two of them the same shape",
                          traces_case([((4, 3), "float32"), ((2, 3), "float32"), ((4, 3), "float32")]))],
        ),
        Exercise(
            id="7.5", title="A vmapped loss, its gradient and a tree-map optimizer", points=3,
            answers=("example_loss", "batch_loss", "batch_grad", "sgd_momentum"),
            statement="For the linear classifier logits = image.reshape(-1) @ p['w'] + p['b'], write "
                      "example_loss(p, image, label) (the cross-entropy of ONE image and its integer label), "
                      "batch_loss(p, images, labels) (its mean over the batch, with jax.vmap), "
                      "batch_grad(p, images, labels) (the gradient of batch_loss with respect to p, a dict like p, "
                      "with jax.grad) and sgd_momentum(params, grads, velocity, lr, momentum) returning "
                      "(new_params, new_velocity) with velocity = momentum * velocity + grad and "
                      "params = params - lr * velocity for every leaf of the pytrees, with jax.tree.map.",
            public=[Check("the loss of 8 images of shape (2, 4, 4), 5 classes", loss_case(8, (2, 4, 4), 5)),
                    Check("the gradient for 8 images, 5 classes", loss_case(8, (2, 4, 4), 5, what="grad")),
                    Check("one momentum step on a nested pytree", momentum_case(0.1, 0.9))],
        ),
        Exercise(
            id="7.6", title="Attention over a padded batch", points=4, answers=("padded_attention",),
            statement="Write padded_attention(p, x, lengths, heads) for a batch x (B, N, D) of sequences padded to N "
                      "tokens, only the first lengths[b] tokens of sequence b being real (1 <= lengths[b] <= N): the "
                      "self-attention of 7.2 per sequence with the scores of padding keys masked before the softmax "
                      "(they get weight 0), batched with jax.vmap; (B, N, D), the rows of padding positions exactly 0.",
            public=[Check("3 sequences of at most 6 tokens, D = 16, 4 heads", padded_attention_case(3, 6, 16, 4))],
        ),
    ],
)
