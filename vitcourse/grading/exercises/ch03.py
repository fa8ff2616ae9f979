"""Chapter 3 exercises (the encoder block): public spec.

Students write ``layer_norm`` (from scratch), the ``MLP`` and the pre-norm
``EncoderBlock``, reusing chapter 1's attention, then find and fix the three bugs of a
given block (``FixedBlock``), graded with random weights at sizes they do not see: the
grading sandbox exposes :mod:`vitcourse.attention` but not :mod:`vitcourse.encoder`.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from vitcourse.encoder import LAYER_NORM_EPS, MLP, EncoderBlock

from ..runtime import apply, arr, call, new, state_shapes
from ..spec import Case, Chapter, Check, Exercise, allclose, exact
from ._common import randn, randomised, run, shapes, t, weights


def layer_norm_case(shape: tuple[int, ...], eps: float | None = None, offset: float = 0.0):
    """``layer_norm(x, weight, bias[, eps])`` over the last dimension of a random ``x``."""

    def build(rng: np.random.Generator) -> Case:
        x = randn(rng, *shape) + np.float32(offset)
        w, b = randn(rng, shape[-1]), randn(rng, shape[-1])
        kwargs = {} if eps is None else {"eps": eps}
        expected = F.layer_norm(t(x), (shape[-1],), t(w), t(b), eps if eps is not None else LAYER_NORM_EPS)
        # float32 rounding of a large offset alone costs about 1e-5 per unit of offset / 100
        tolerance = allclose(atol=1e-5 + 1e-6 * offset, rtol=1e-4)
        return Case(call("layer_norm", arr(x), arr(w), arr(b), **kwargs), expected.numpy(), tolerance)

    return build


def module_case(name: str, reference, args: tuple, tokens: tuple[int, int], what: str = "forward"):
    """The student's module ``name(*args)`` with the weights of ``reference(*args)``."""

    def build(rng: np.random.Generator) -> Case:
        ref = randomised(reference(*args), rng)
        if what == "shapes":
            return Case(state_shapes(new(name, *args)), shapes(ref), exact())
        x = randn(rng, *tokens, args[0])
        return Case(apply(new(name, *args, state=weights(ref)), arr(x)), run(ref, x))

    return build


def block(dim: int, heads: int, mlp_dim: int) -> EncoderBlock:
    """The reference block on the explicit attention path."""
    return EncoderBlock(dim, heads, mlp_dim, fused_attention=False)


def fixed_block_case(dim: int, heads: int, mlp_dim: int, tokens: tuple[int, int], offset: float = 0.0,
                     fresh: bool = False):
    """The student's ``FixedBlock(dim, heads, mlp_dim)`` with the weights of the course's block.

    ``fresh``: a freshly built block's weights (LayerNorms at 1 and 0), under which a block that
    uses ``norm1`` twice cannot be told from a correct one; ``offset`` is added to every token.
    """

    def build(rng: np.random.Generator) -> Case:
        ref = block(dim, heads, mlp_dim)
        ref = ref.eval() if fresh else randomised(ref, rng)
        x = randn(rng, *tokens, dim) + np.float32(offset)
        return Case(apply(new("FixedBlock", dim, heads, mlp_dim, state=weights(ref)), arr(x)), run(ref, x),
                    allclose(atol=1e-4 * (1 + offset), rtol=1e-4))

    return build


CHAPTER = Chapter(
    name="ch03",
    title="The encoder block",
    sandbox_modules=("attention",),
    exercises=[
        Exercise(
            id="3.1", title="Layer normalisation", points=2, answers=("layer_norm",),
            statement="Write layer_norm(x, weight, bias, eps=1e-6): normalise the last dimension of x to mean 0 "
                      "and (biased) variance 1, then scale by weight and shift by bias; no nn.LayerNorm or "
                      "F.layer_norm.",
            public=[Check("a (2, 5, 8) batch of tokens", layer_norm_case((2, 5, 8)))],
        ),
        Exercise(
            id="3.2", title="The MLP", points=1, answers=("MLP",),
            statement="Write the nn.Module MLP(dim, hidden): fc1 = nn.Linear(dim, hidden), act = exact GELU, "
                      "fc2 = nn.Linear(hidden, dim); (..., dim) -> (..., dim).",
            public=[Check("the output for dim 8, hidden 16", module_case("MLP", MLP, (8, 16), (2, 5))),
                    Check("the parameter names and shapes", module_case("MLP", MLP, (8, 16), (2, 5), "shapes"))],
        ),
        Exercise(
            id="3.3", title="The pre-norm encoder block", points=3, answers=("EncoderBlock",),
            statement="Write the nn.Module EncoderBlock(dim, heads, mlp_dim) with norm1, attn "
                      "(multi-head self-attention with qkv and proj), norm2 and mlp (your MLP), LayerNorm eps 1e-6: "
                      "x = x + attn(norm1(x)); x = x + mlp(norm2(x)).",
            public=[Check("the output for dim 16, 4 heads, MLP 32", module_case("EncoderBlock", block, (16, 4, 32), (2, 5))),
                    Check("the parameter names and shapes",
                          module_case("EncoderBlock", block, (16, 4, 32), (2, 5), "shapes"))],
        ),
        Exercise(
            id="3.4", title="Find and fix three bugs", points=6, answers=("FixedBlock",),
            statement="The notebook's BuggyBlock(dim, heads, mlp_dim) runs and returns the right shape, but it has "
                      "three bugs. Write FixedBlock(dim, heads, mlp_dim): the same parameter names (norm1, "
                      "attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) and the pre-norm block of exercise 3.3, "
                      "x = x + attn(norm1(x)); x = x + mlp(norm2(x)). Graded with random weights at sizes you "
                      "do not see.",
            public=[Check("the output for dim 16, 4 heads, MLP 32, with the grader's weights",
                          fixed_block_case(16, 4, 32, (2, 5))),
                    Check("the parameter names and shapes",
                          module_case("FixedBlock", block, (16, 4, 32), (2, 5), "shapes"))],
        ),
    ],
)
