"""Chapter 3 exercises (the encoder block): public spec.

Students write ``layer_norm`` (from scratch), the ``MLP``, the pre-norm
``EncoderBlock`` and its LayerScale variant ``LayerScaleBlock``, reusing chapter 1's
attention: the grading sandbox exposes :mod:`vitcourse.attention` but not
:mod:`vitcourse.encoder`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


class _Scale(nn.Module):
    """Multiply the last dimension by a learned vector ``gamma`` (D,)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScaleReference(nn.Module):
    """The course's pre-norm block with each residual branch scaled per channel (timm's ``ls1``, ``ls2``)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        inner = block(dim, heads, mlp_dim)
        self.norm1, self.attn, self.norm2, self.mlp = inner.norm1, inner.attn, inner.norm2, inner.mlp
        self.ls1, self.ls2 = _Scale(dim, init_values), _Scale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


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
            id="3.2", title="The MLP", points=2, answers=("MLP",),
            statement="Write the nn.Module MLP(dim, hidden): fc1 = nn.Linear(dim, hidden), act = exact GELU, "
                      "fc2 = nn.Linear(hidden, dim); (..., dim) -> (..., dim).",
            public=[Check("the output for dim 8, hidden 16", module_case("MLP", MLP, (8, 16), (2, 5))),
                    Check("the parameter names and shapes", module_case("MLP", MLP, (8, 16), (2, 5), "shapes"))],
        ),
        Exercise(
            id="3.3", title="The pre-norm encoder block", points=4, answers=("EncoderBlock",),
            statement="Write the nn.Module EncoderBlock(dim, heads, mlp_dim) with norm1, attn "
                      "(multi-head self-attention with qkv and proj), norm2 and mlp (your MLP), LayerNorm eps 1e-6: "
                      "x = x + attn(norm1(x)); x = x + mlp(norm2(x)).",
            public=[Check("the output for dim 16, 4 heads, MLP 32", module_case("EncoderBlock", block, (16, 4, 32), (2, 5))),
                    Check("the parameter names and shapes",
                          module_case("EncoderBlock", block, (16, 4, 32), (2, 5), "shapes"))],
        ),
        Exercise(
            id="3.4", title="LayerScale", points=3, answers=("LayerScaleBlock",),
            statement="Write the nn.Module LayerScaleBlock(dim, heads, mlp_dim, init_values=1e-5): your pre-norm block "
                      "with each residual branch multiplied feature by feature by a learned vector before it is "
                      "added: x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))), where ls1 and ls2 are "
                      "modules holding one parameter gamma of shape (dim,), filled with init_values, and "
                      "lsi(y) = y * gamma. Other names as in exercise 3.3.",
            public=[Check("the output for dim 16, 4 heads, MLP 32, with the grader's weights and gammas",
                          module_case("LayerScaleBlock", LayerScaleReference, (16, 4, 32), (2, 5))),
                    Check("the parameter names and shapes",
                          module_case("LayerScaleBlock", LayerScaleReference, (16, 4, 32), (2, 5), "shapes"))],
        ),
    ],
)
