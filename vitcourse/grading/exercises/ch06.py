"""Chapter 6 exercises (the Ultimus network): public spec.

Students write the ULTIMUS block, the network of the assignment with its exact parameter count,
and the repaired network of the chapter (BatchNorm + ReLU in the stem, a residual path around
every block). Exercise 6.4 is a measurement: the largest singular value of one block's
input-output Jacobian per example, with and without the residual path, against
``torch.autograd.functional.jacobian`` on the course's block. The grading sandbox exposes no core
module: :mod:`vitcourse.ultimus` is the answer.
"""

from __future__ import annotations

import numpy as np
import torch

from vitcourse.ultimus import SPEC_NUM_PARAMETERS, VARIANTS, UltimusBlock

from ..runtime import apply, arr, call, new, num_params, state_shapes
from ..spec import Case, Chapter, Check, Exercise, allclose, exact
from ._common import randn, randomised, run, shapes, t, weights


def block_case(dim: int, attn_dim: int, batch: int, what: str = "forward", scale: float = 0.3):
    """The student's ``UltimusBlock(dim, attn_dim)`` with the weights of the reference block.

    Random weights of std ``scale`` make the softmax rows far from uniform, so a softmax over the
    wrong axis, a scale in the wrong place or ``AM v`` instead of ``v AM`` all change the output.
    """

    def build(rng: np.random.Generator) -> Case:
        ref = randomised(UltimusBlock(dim, attn_dim), rng, scale=scale)
        if what == "shapes":
            return Case(state_shapes(new("UltimusBlock", dim, attn_dim)), shapes(ref), exact())
        x = randn(rng, batch, dim, scale=2.0)
        return Case(apply(new("UltimusBlock", dim, attn_dim, state=weights(ref)), arr(x)), run(ref, x))

    return build


def net_case(name: str, variant: str, batch: int, image_size: int = 32, num_classes: int | None = None,
             what: str = "forward"):
    """The student's network ``name(...)`` against ``vitcourse.ultimus.VARIANTS[variant]``."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}

    def build(rng: np.random.Generator) -> Case:
        ref = VARIANTS[variant](**kwargs)
        if what == "params":
            return Case(num_params(new(name, **kwargs)), sum(p.numel() for p in ref.parameters()), exact())
        if what == "shapes":
            return Case(state_shapes(new(name, **kwargs)), shapes(ref), exact())
        ref = randomised(ref, rng, scale=0.2)
        x = randn(rng, batch, 3, image_size, image_size)
        return Case(apply(new(name, state=weights(ref), **kwargs), arr(x)), run(ref, x))

    return build


def gain_reference(block: torch.nn.Module, x: torch.Tensor, residual: bool) -> np.ndarray:
    """(B,): the spectral norm of d f(x_b) / d x_b, f = block or identity + block, one example at a time."""
    def f(v):  # (D,) -> (D,)
        out = block(v[None])[0]
        return v + out if residual else out

    return np.array([torch.linalg.svdvals(torch.autograd.functional.jacobian(f, v))[0].item() for v in x],
                    dtype=np.float32)


def gain_case(dim: int, attn_dim: int, batch: int, residual: bool = False, scale: float | None = None):
    """``block_gain(state, x, residual)`` for the block's initial weights (``scale=None``) or random ones."""

    def build(rng: np.random.Generator) -> Case:
        with torch.random.fork_rng():  # PyTorch's own initialisation, seeded by the check
            torch.manual_seed(int(rng.integers(2**31)))
            block = UltimusBlock(dim, attn_dim).eval()
        if scale is not None:
            block = randomised(block, rng, scale=scale)
        x = randn(rng, batch, dim, scale=2.0)
        expected = gain_reference(block, t(x), residual)
        return Case(call("block_gain", weights(block), arr(x), residual), expected, allclose(atol=1e-5, rtol=1e-3))

    return build


CHAPTER = Chapter(
    name="ch06",
    title="The Ultimus exercise",
    sandbox_modules=(),
    # torch.func (a natural way to write 6.4) imports torch._dynamo on first use, 2 to 3 s; every check runs
    # in a fresh fork of the process that preloads, so load it there once rather than in each check.
    preload="torch,torch._dynamo",
    exercises=[
        Exercise(
            id="6.1", title="The ULTIMUS block", points=4, answers=("UltimusBlock",),
            statement="Write the nn.Module UltimusBlock(dim=48, attn_dim=8) with four nn.Linear layers k, q, v "
                      "(dim -> attn_dim) and out (attn_dim -> dim). For x of shape (B, dim): q, k, v = q(x), k(x), "
                      "v(x); AM = softmax(qᵀk) / sqrt(attn_dim), the softmax over the last axis of the "
                      "(B, attn_dim, attn_dim) outer products; z = v·AM (B, attn_dim); return out(z) (B, dim).",
            public=[Check("the output for dim 48, attn_dim 8", block_case(48, 8, 4)),
                    Check("the parameter names and shapes", block_case(48, 8, 4, "shapes"))],
        ),
        Exercise(
            id="6.2", title="The network of the assignment", points=3, answers=("UltimusNet",),
            statement=f"Write the nn.Module UltimusNet(num_classes=10): stem = nn.Sequential of three 3x3 "
                      f"convolutions 3->16->32->48 with padding 1 and nothing between them, global average "
                      f"pooling to (B, 48), blocks = nn.ModuleList of four of your UltimusBlock(48, 8), "
                      f"head = nn.Linear(48, num_classes). (B, 3, H, W) -> (B, num_classes); "
                      f"{SPEC_NUM_PARAMETERS:,} parameters.",
            public=[Check("the parameter count", net_case("UltimusNet", "ultimus", 2, what="params")),
                    Check("the output for a batch of 32x32 images", net_case("UltimusNet", "ultimus", 2))],
        ),
        Exercise(
            id="6.3", title="The repaired network", points=3, answers=("RepairedUltimusNet",),
            statement="Write the nn.Module RepairedUltimusNet(num_classes=10): as UltimusNet, but the stem is "
                      "nn.Sequential(conv, BatchNorm2d, ReLU, conv, BatchNorm2d, ReLU, conv, BatchNorm2d, ReLU) "
                      "and every block adds its input to its output: x = x + block(x).",
            public=[Check("the parameter names and shapes",
                          net_case("RepairedUltimusNet", "ultimus_repaired", 2, what="shapes")),
                    Check("the output in eval mode", net_case("RepairedUltimusNet", "ultimus_repaired", 2))],
        ),
        Exercise(
            id="6.4", title="How much can a block amplify a difference?", points=4, answers=("block_gain",),
            statement="Write block_gain(state, x, residual=False): state is an UltimusBlock state_dict ('q.weight' "
                      "(attn_dim, dim), 'q.bias', 'k.*', 'v.*', 'out.weight' (dim, attn_dim), 'out.bias'), x is "
                      "(B, dim). For each example b return the largest singular value of the (dim, dim) Jacobian "
                      "of f at x[b], where f(v) = block(v), or v + block(v) when residual is True: a (B,) tensor.",
            public=[Check("four examples, the block's initial weights, no residual path", gain_case(48, 8, 4))],
        ),
    ],
)
