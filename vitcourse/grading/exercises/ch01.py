"""Chapter 1 exercises (attention): public spec.

Students write ``softmax``, fix the three bugs of a given masked scaled dot-product
``attention`` (which also returns the weights), write ``MultiHeadSelfAttention`` (fused ``qkv``, timm names) and
``attention_backward``, the gradients of attention derived by hand (no autograd).
The grading sandbox exposes no core module: every piece is the students' own.
"""

from __future__ import annotations

import numpy as np
import torch

from vitcourse.attention import MultiHeadSelfAttention, scaled_dot_product_attention, softmax

from ..runtime import apply, arr, call, new, state_shapes
from ..spec import Case, Chapter, Check, Exercise, allclose, exact
from ._common import randn, randomised, run, shapes, t, weights


def softmax_case(shape: tuple[int, ...], dim: int = -1, scale: float = 1.0, masked: bool = False):
    """Softmax of a random tensor of ``shape`` along ``dim``; ``masked`` puts some ``-inf`` in each row."""

    def build(rng: np.random.Generator) -> Case:
        x = randn(rng, *shape, scale=scale)
        if masked:
            hole = rng.random(shape) < 0.3
            first = [slice(None)] * len(shape)
            first[dim] = 0
            hole[tuple(first)] = False  # keep one finite entry in every slice
            x[hole] = -np.inf
        return Case(call("softmax", arr(x), dim=dim), softmax(t(x), dim=dim).numpy())

    return build


def attention_case(batch: tuple[int, ...], n_q: int, n_k: int, d_k: int, d_v: int, mask: str | None = None,
                   scale: float = 1.0):
    """``attention(q, k, v, mask)`` for random inputs; ``mask`` is None, ``"causal"`` or ``"padding"``."""

    def build(rng: np.random.Generator) -> Case:
        q, k = randn(rng, *batch, n_q, d_k, scale=scale), randn(rng, *batch, n_k, d_k, scale=scale)
        v = randn(rng, *batch, n_k, d_v)
        m = None
        if mask == "causal":
            m = np.tril(np.ones((n_q, n_k), dtype=bool))
        elif mask == "padding":  # (B, 1, ..., 1, n_k): some keys of each sequence are padding
            lengths = rng.integers(1, n_k + 1, size=batch[0])
            m = (np.arange(n_k)[None, :] < lengths[:, None]).reshape(batch[0], *[1] * len(batch), n_k)
        out, w = scaled_dot_product_attention(t(q), t(k), t(v), None if m is None else t(m), return_weights=True)
        task = call("attention", arr(q), arr(k), arr(v), mask=None if m is None else arr(m))
        return Case(task, [out.numpy(), w.numpy()])

    return build


def mhsa_case(dim: int, heads: int, batch: int = 2, tokens: int = 5, what: str = "forward"):
    """The student's ``MultiHeadSelfAttention(dim, heads)`` with grader weights: forward or shapes."""

    def build(rng: np.random.Generator) -> Case:
        ref = randomised(MultiHeadSelfAttention(dim, heads, fused=False), rng)
        if what == "shapes":
            return Case(state_shapes(new("MultiHeadSelfAttention", dim, heads)), shapes(ref), exact())
        x = randn(rng, batch, tokens, dim)
        module = new("MultiHeadSelfAttention", dim, heads, state=weights(ref))
        return Case(apply(module, arr(x)), run(ref, x))

    return build


def backward_case(batch: tuple[int, ...], n_q: int, n_k: int, d_k: int, d_v: int, scale: float = 1.0):
    """``attention_backward(q, k, v, grad_out)`` against autograd through the course's attention."""

    def build(rng: np.random.Generator) -> Case:
        q, k = randn(rng, *batch, n_q, d_k, scale=scale), randn(rng, *batch, n_k, d_k, scale=scale)
        v, grad_out = randn(rng, *batch, n_k, d_v), randn(rng, *batch, n_q, d_v)
        leaves = [t(x).double().requires_grad_() for x in (q, k, v)]
        out = scaled_dot_product_attention(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_outputs=t(grad_out).double())
        task = call("attention_backward", arr(q), arr(k), arr(v), arr(grad_out))
        # float32 answers against a float64 reference; a wrong formula is off by O(1)
        return Case(task, [g.float().numpy() for g in grads], allclose(atol=1e-4, rtol=1e-3))

    return build


SDPA_OPS = ("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_attention_math",
            "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention",
            "aten._native_multi_head_attention")
"""The fused attention kernels, whichever way they are reached."""


CHAPTER = Chapter(
    name="ch01",
    title="Attention",
    sandbox_modules=(),
    exercises=[
        Exercise(
            id="1.1", title="A numerically stable softmax", points=2, answers=("softmax",),
            statement="Write softmax(x, dim=-1) for a tensor of any shape, without torch.softmax. "
                      "It must not overflow for large scores and must accept -inf entries.",
            public=[Check("a (4, 7) tensor along the last dimension", softmax_case((4, 7))),
                    Check("a (2, 3, 5) tensor along dimension 1", softmax_case((2, 3, 5), dim=1))],
            forbidden=("timm", "torch.softmax", "torch.nn.functional.softmax", "torch.special.softmax", ".softmax",
                       "torch.nn.Softmax", "torch.log_softmax", "torch.nn.functional.log_softmax", ".log_softmax"),
            forbidden_ops=("aten._softmax", "aten._log_softmax", "aten._safe_softmax"),
        ),
        Exercise(
            id="1.2", title="Find and fix: masked scaled dot-product attention", points=3, answers=("attention",),
            statement="The notebook's attention_with_bugs(q, k, v, mask=None) has three bugs. Write attention(q, k, v, "
                      "mask=None) with them fixed, returning (output, weights): softmax(q kᵀ / sqrt(d_k)) v, where "
                      "mask is a boolean tensor broadcastable to (..., n_q, n_k) and False means 'may not attend'. "
                      "Graded on shapes and masks you do not see.",
            public=[Check("self-attention on a (2, 5, 8) batch, no mask", attention_case((2,), 5, 5, 8, 8)),
                    Check("a causal mask", attention_case((2,), 6, 6, 4, 4, mask="causal"))],
            forbidden=("timm", "torch.nn.functional.scaled_dot_product_attention", "torch.nn.MultiheadAttention"),
            forbidden_ops=SDPA_OPS,
        ),
        Exercise(
            id="1.3", title="Multi-head self-attention", points=4, answers=("MultiHeadSelfAttention",),
            statement="Write the nn.Module MultiHeadSelfAttention(dim, heads) with a fused nn.Linear "
                      "qkv (dim -> 3*dim, with bias) and an output nn.Linear proj, so its state_dict "
                      "matches timm's; forward(x) maps (B, N, dim) to (B, N, dim).",
            public=[Check("the output for dim 16, 4 heads, with the grader's weights", mhsa_case(16, 4)),
                    Check("the parameter names and shapes for dim 16, 4 heads", mhsa_case(16, 4, what="shapes"))],
            forbidden=("timm", "torch.nn.functional.scaled_dot_product_attention", "torch.nn.MultiheadAttention",
                       "torch.nn.functional.multi_head_attention_forward"),
            forbidden_ops=SDPA_OPS,
        ),
        Exercise(
            id="1.4", title="The gradients of attention, by hand", points=4, answers=("attention_backward",),
            statement="Write attention_backward(q, k, v, grad_out) for out = softmax(q kᵀ / sqrt(d_k)) v without a "
                      "mask, q (..., n_q, d_k), k (..., n_k, d_k), v (..., n_k, d_v), grad_out (..., n_q, d_v): "
                      "return (dq, dk, dv), the gradients of sum(out * grad_out) with respect to q, k and v, with "
                      "the shapes of q, k and v. Derive them; autograd is forbidden.",
            public=[Check("self-attention on a (2, 5, 8) batch", backward_case((2,), 5, 5, 8, 8)),
                    Check("cross-attention: 4 queries, 6 keys, values of width 5", backward_case((3,), 4, 6, 4, 5))],
            forbidden=("timm", ".backward", ".grad", "torch.autograd", "torch.func", "functorch"),
            forbidden_ops=("autograd", "aten._softmax_backward_data"),
        ),
    ],
)
