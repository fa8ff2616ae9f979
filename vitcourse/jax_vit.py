"""The Vision Transformer in pure JAX: a tree of arrays and a function.

No Flax, no optax. The model is

* ``params``, a plain pytree (nested dicts and a list of arrays) with the same
  names as :class:`vitcourse.VisionTransformer`'s ``state_dict``;
* :func:`forward`, a pure function of ``(params, one image)`` with no batch
  dimension, batched with :func:`jax.vmap` in :func:`batched_forward`.

Training is :func:`jax.value_and_grad` of :func:`loss_fn`, an optimizer
written with :func:`jax.tree.map` (:func:`sgd`, :func:`adamw`, both matching
``torch.optim`` step for step), and one :func:`jax.jit`-compiled step from
:func:`make_train_step`.

The bridge to PyTorch: :func:`from_torch` (model -> params), :func:`to_torch`
(params -> model) and :func:`apply` (NCHW batch -> logits). Given the same
weights the two frameworks agree to float precision; ``tests/test_jax_vit.py``
checks logits, one SGD step and one AdamW step.

Layout differences the conversion handles:

* a linear layer's torch weight is ``(out, in)``; here ``kernel`` is ``(in, out)``
  so a token row vector is multiplied as ``x @ kernel``;
* the patch embedding is a ``Conv2d`` weight ``(D, C, P, P)`` in torch and a
  ``(P * P * C, D)`` kernel on flattened patches here (patch order ``p1 p2 c``,
  as :func:`vitcourse.patches.image_to_patches`);
* GELU is the exact (erf) one: ``jax.nn.gelu`` defaults to the tanh
  approximation, so ``approximate=False`` is passed explicitly.

This module imports JAX when it is imported; ``import vitcourse`` alone never does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch

try:
    import jax
    import jax.numpy as jnp
except ImportError as err:  # pragma: no cover - jax is in requirements.txt
    raise ImportError(
        "vitcourse.jax_vit needs JAX; install it with `pip install jax` (or `pip install 'vitcourse[jax]'`)."
    ) from err
from einops import rearrange

from .encoder import LAYER_NORM_EPS
from .vit import VisionTransformer, ViTConfig, require_plain_vit

__all__ = [
    "init_params",
    "count_params",
    "layer_norm",
    "linear",
    "self_attention",
    "encoder_block",
    "forward",
    "batched_forward",
    "apply",
    "cross_entropy",
    "loss_fn",
    "Optimizer",
    "sgd",
    "adamw",
    "decay_mask",
    "warmup_cosine",
    "clip_by_global_norm",
    "make_train_step",
    "evaluate",
    "from_torch",
    "to_torch",
]

Params = Any
"""A pytree of arrays: nested dicts (and the list ``params["blocks"]``) whose leaves are ``jax.Array``."""

PRECISION = jax.lax.Precision.HIGHEST
"""Every matmul runs in full float32. CPUs do this anyway; GPUs and TPUs would otherwise
use TF32 or bfloat16 passes and the logits would no longer match PyTorch's to 1e-5."""


# ---------------------------------------------------------------- initialisation


def _trunc_normal(key: jax.Array, shape: tuple[int, ...], std: float = 0.02) -> jax.Array:
    """Normal(0, std) cut at +-2, in absolute units, like ``torch.nn.init.trunc_normal_(std=std)``."""
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape)


def _linear_init(key: jax.Array, fan_in: int, fan_out: int) -> dict:
    """A linear layer ``{"kernel": (fan_in, fan_out), "bias": (fan_out,)}``: trunc-normal weights, zero bias."""
    return {"kernel": _trunc_normal(key, (fan_in, fan_out)), "bias": jnp.zeros(fan_out)}


def _norm_init(dim: int) -> dict:
    """A LayerNorm ``{"scale": (dim,), "bias": (dim,)}`` that starts as the identity map."""
    return {"scale": jnp.ones(dim), "bias": jnp.zeros(dim)}


def init_params(key: jax.Array, config: ViTConfig) -> Params:
    """Fresh parameters for ``config``, drawn from the same distributions as ``VisionTransformer``.

    Every random draw gets its own key, split from ``key``; the same key always
    gives the same parameters. Only the plain ViT: a config with a small-data option
    (``stem="spt"``/``"conv"``, ``lsa=True``) or a distillation token (``distilled=True``)
    is refused with a ``ValueError``.

    Args:
        key: a ``jax.random`` key (``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``).
        config: the architecture.

    Returns:
        A pytree with the shapes (``D = dim``, ``M = mlp_dim``, ``K = num_classes``)::

            patch_embed: kernel (P*P*C, D), bias (D,)
            cls_token: (D,)          pos_embed: (N + 1, D)
            blocks: list of depth dicts, each
                norm1, norm2: scale (D,), bias (D,)
                attn: qkv kernel (D, 3D), bias (3D,); proj kernel (D, D), bias (D,)
                mlp: fc1 kernel (D, M), bias (M,); fc2 kernel (M, D), bias (D,)
            norm: scale (D,), bias (D,)
            head: kernel (D, K), bias (K,)
    """
    require_plain_vit(config, "vitcourse.jax_vit")  # the JAX port: plain ViT only
    c = config
    patch_features = c.patch_size * c.patch_size * c.in_channels
    k_patch_w, k_patch_b, k_cls, k_pos, k_head, k_blocks = jax.random.split(key, 6)
    # The patch embedding is a Conv2d in torch, which keeps torch's default init:
    # uniform in +-1/sqrt(fan_in) for both weight and bias.
    bound = 1.0 / math.sqrt(patch_features)
    params = {
        "patch_embed": {
            "kernel": jax.random.uniform(k_patch_w, (patch_features, c.dim), minval=-bound, maxval=bound),
            "bias": jax.random.uniform(k_patch_b, (c.dim,), minval=-bound, maxval=bound),
        },
        "cls_token": 1e-6 * jax.random.normal(k_cls, (c.dim,)),
        "pos_embed": _trunc_normal(k_pos, (c.seq_len, c.dim)),
        "blocks": [],
        "norm": _norm_init(c.dim),
        "head": _linear_init(k_head, c.dim, c.num_classes),
    }
    for block_key in jax.random.split(k_blocks, c.depth):
        k_qkv, k_proj, k_fc1, k_fc2 = jax.random.split(block_key, 4)
        params["blocks"].append({
            "norm1": _norm_init(c.dim),
            "attn": {"qkv": _linear_init(k_qkv, c.dim, 3 * c.dim), "proj": _linear_init(k_proj, c.dim, c.dim)},
            "norm2": _norm_init(c.dim),
            "mlp": {"fc1": _linear_init(k_fc1, c.dim, c.mlp_dim), "fc2": _linear_init(k_fc2, c.mlp_dim, c.dim)},
        })
    return params


def count_params(params: Params) -> int:
    """Number of scalars in the pytree (equals ``count_parameters`` of the torch twin)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# ---------------------------------------------------------------- the model, one image at a time


def linear(p: dict, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias``: ``(..., in)`` -> ``(..., out)``."""
    return jnp.matmul(x, p["kernel"], precision=PRECISION) + p["bias"]


def layer_norm(p: dict, x: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
    """Normalise each token to zero mean and unit variance, then scale and shift: ``(..., D)`` -> ``(..., D)``."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, as torch
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _dropout(key: jax.Array | None, x: jax.Array, rate: float, shape: tuple[int, ...] | None = None) -> jax.Array:
    """Zero entries with probability ``rate`` and rescale the rest; identity without a key.

    ``shape=()`` draws one coin for the whole of ``x`` (stochastic depth for one image).
    """
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape if shape is None else shape)
    return jnp.where(mask, x / keep, 0.0)


def _keys(key: jax.Array | None, n: int) -> list:
    """``n`` independent keys split from ``key``, or ``n`` times ``None`` (no randomness: evaluation)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def self_attention(p: dict, x: jax.Array, heads: int) -> jax.Array:
    """Multi-head self-attention over the tokens of one image: ``(N, D)`` -> ``(N, D)``.

    ``p["qkv"]`` maps each token to ``3D`` features laid out as
    ``(3, heads, head_dim)``, the layout of torch's fused ``qkv`` layer.
    """
    q, k, v = rearrange(linear(p["qkv"], x), "n (three h d) -> three h n d", three=3, h=heads)  # each (h, N, hd)
    scores = jnp.einsum("hqd,hkd->hqk", q, k, precision=PRECISION) / math.sqrt(q.shape[-1])  # (h, N, N)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("hqk,hkd->hqd", weights, v, precision=PRECISION)  # (h, N, hd)
    return linear(p["proj"], rearrange(out, "h n d -> n (h d)"))  # heads side by side: (N, D)


def encoder_block(
    p: dict, x: jax.Array, heads: int, dropout: float = 0.0, drop_path: float = 0.0, key: jax.Array | None = None
) -> jax.Array:
    """One pre-norm encoder block for one image: ``(N, D)`` -> ``(N, D)``.

    ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; with a ``key``, dropout
    and stochastic depth are applied where :class:`vitcourse.encoder.EncoderBlock` applies them.
    """
    k_attn, k_mlp1, k_mlp2, k_path1, k_path2 = _keys(key, 5)
    attended = _dropout(k_attn, self_attention(p["attn"], layer_norm(p["norm1"], x), heads), dropout)
    x = x + _dropout(k_path1, attended, drop_path, shape=())
    hidden = jax.nn.gelu(linear(p["mlp"]["fc1"], layer_norm(p["norm2"], x)), approximate=False)  # exact GELU
    out = _dropout(k_mlp2, linear(p["mlp"]["fc2"], _dropout(k_mlp1, hidden, dropout)), dropout)
    return x + _dropout(k_path2, out, drop_path, shape=())


def forward(params: Params, image: jax.Array, config: ViTConfig, key: jax.Array | None = None) -> jax.Array:
    """Class scores for ONE image: ``(C, H, W)`` -> ``(num_classes,)``.

    There is no batch dimension anywhere in here; :func:`batched_forward` adds
    it with ``jax.vmap``. Pass a ``key`` to train with dropout and stochastic
    depth; without one the function is deterministic (evaluation).
    """
    require_plain_vit(config, "vitcourse.jax_vit")  # the JAX port: plain ViT only
    c = config
    k_embed, *block_keys = _keys(key, c.depth + 1)
    patches = rearrange(image, "c (h p1) (w p2) -> (h w) (p1 p2 c)", p1=c.patch_size, p2=c.patch_size)  # (N, P*P*C)
    tokens = linear(params["patch_embed"], patches)  # (N, D)
    tokens = jnp.concatenate([params["cls_token"][None], tokens], axis=0)  # (N + 1, D)
    x = _dropout(k_embed, tokens + params["pos_embed"], c.dropout)
    for i, (block, block_key) in enumerate(zip(params["blocks"], block_keys)):
        drop_path = c.drop_path * i / max(c.depth - 1, 1)  # linearly increasing, as in VisionTransformer
        x = encoder_block(block, x, c.heads, c.dropout, drop_path, block_key)
    x = layer_norm(params["norm"], x)
    return linear(params["head"], x[0])  # classify from the CLS token: (num_classes,)


def batched_forward(params: Params, images: jax.Array, config: ViTConfig, key: jax.Array | None = None) -> jax.Array:
    """:func:`forward` mapped over a batch with ``jax.vmap``: ``(B, C, H, W)`` -> ``(B, num_classes)``.

    The parameters are shared (``in_axes=None``); with a ``key`` each image gets its own dropout key.
    """
    if key is None:
        return jax.vmap(lambda image: forward(params, image, config))(images)
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda image, k: forward(params, image, config, k))(images, keys)


_batched_forward_jit = jax.jit(batched_forward, static_argnames="config")


def _as_array(x: Any) -> Any:
    """A torch tensor becomes a NumPy array (on the CPU); anything else is passed through."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def apply(params: Params, images: Any, config: ViTConfig) -> jax.Array:
    """Logits for a batch of images, like ``VisionTransformer(config).eval()(images)``.

    Args:
        params: from :func:`init_params` or :func:`from_torch`.
        images: ``(B, C, H, W)`` NumPy array, JAX array or torch tensor, float.
        config: the architecture the parameters were made for.

    Returns:
        ``(B, num_classes)`` ``jax.Array`` (jit-compiled; no dropout).
    """
    images = jnp.asarray(_as_array(images), dtype=jnp.float32)
    expected = (config.in_channels, config.image_size, config.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}; "
            "pass a batch in NCHW layout that matches the config (add a batch axis for one image)."
        )
    return _batched_forward_jit(params, images, config)


# ---------------------------------------------------------------- loss and gradients


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy of ``logits`` ``(B, K)`` against integer ``labels`` ``(B,)``: a scalar.

    With ``label_smoothing = e`` the target is ``(1 - e)`` on the true class plus
    ``e / K`` everywhere, as ``torch.nn.functional.cross_entropy(label_smoothing=e)``.
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # (B, K)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]  # (B,)
    smooth = -log_probs.mean(axis=-1)  # (B,): cross-entropy against the uniform distribution
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()


def loss_fn(
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    config: ViTConfig,
    key: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """The training loss, a scalar function of ``params`` for ``jax.grad``.

    ``images`` ``(B, C, H, W)``, ``labels`` ``(B,)`` integers; ``key`` turns dropout on.
    """
    return cross_entropy(batched_forward(params, images, config, key), labels, label_smoothing)


# ---------------------------------------------------------------- optimizers as tree maps


class Optimizer(NamedTuple):
    """A pair of pure functions.

    ``init(params) -> state`` and ``update(grads, state, params) -> (new_params, new_state)``;
    ``grads`` and ``params`` are pytrees of the same structure.
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]


Schedule = Callable[[jax.Array], jax.Array]


def _rate(lr: float | Schedule, step: jax.Array) -> jax.Array:
    """The learning rate for update number ``step`` (0 for the first update)."""
    return lr(step) if callable(lr) else lr


def sgd(lr: float | Schedule, momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """Stochastic gradient descent with heavy-ball momentum, exactly as ``torch.optim.SGD``.

    ``g <- g + weight_decay * p``; ``b <- momentum * b + g``; ``p <- p - lr * b``.
    ``lr`` may be a schedule: a function of the update count.
    """

    def init(params: Params) -> dict:
        return {"step": jnp.zeros((), jnp.int32), "momentum": jax.tree.map(jnp.zeros_like, params)}

    def update(grads: Params, state: dict, params: Params) -> tuple[Params, dict]:
        rate = _rate(lr, state["step"])
        grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        buf = jax.tree.map(lambda b, g: momentum * b + g, state["momentum"], grads)
        new_params = jax.tree.map(lambda p, b: p - rate * b, params, buf)
        return new_params, {"step": state["step"] + 1, "momentum": buf}

    return Optimizer(init, update)


def decay_mask(params: Params) -> Params:
    """``True`` for the weight matrices (kernels), ``False`` for biases, norms, CLS token and positions.

    The usual choice of which parameters get weight decay; same structure as ``params``, bool leaves.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1] == jax.tree_util.DictKey("kernel"), params)


def adamw(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Params | None = None,
) -> Optimizer:
    """Adam with decoupled weight decay, exactly as ``torch.optim.AdamW`` (defaults included).

    For each parameter, at update ``t = 1, 2, ...``::

        p <- p * (1 - lr * weight_decay)          (only where mask is True)
        m <- b1 * m + (1 - b1) * g
        v <- b2 * v + (1 - b2) * g**2
        p <- p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    Args:
        mask: optional pytree of bools like ``params`` (see :func:`decay_mask`);
            by default every parameter is decayed, as in torch with one parameter group.
    """

    def init(params: Params) -> dict:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"step": jnp.zeros((), jnp.int32), "m": zeros, "v": zeros}

    def update(grads: Params, state: dict, params: Params) -> tuple[Params, dict]:
        rate = _rate(lr, state["step"])
        t = state["step"] + 1
        decay = mask if mask is not None else jax.tree.map(lambda _: True, params)
        params = jax.tree.map(lambda p, d: p * (1.0 - rate * weight_decay) if d else p, params, decay)
        m = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state["m"], grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state["v"], grads)
        step_size = rate / (1.0 - b1**t)
        root_c2 = jnp.sqrt(1.0 - b2**t)
        new_params = jax.tree.map(lambda p, m, v: p - step_size * m / (jnp.sqrt(v) / root_c2 + eps), params, m, v)
        return new_params, {"step": t, "m": m, "v": v}

    return Optimizer(init, update)


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warmup to ``lr`` over ``warmup_steps`` updates, then cosine decay to 0 at ``total_steps``.

    The schedule of :mod:`vitcourse.train`: update ``k`` (counting from 0) uses
    ``lr * (k + 1) / warmup_steps`` during warmup, then
    ``lr * (1 + cos(pi * (k - warmup_steps) / (total_steps - warmup_steps))) / 2``.
    """

    def schedule(step: jax.Array) -> jax.Array:
        warm = (step + 1) / max(warmup_steps, 1)
        progress = jnp.minimum((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return lr * jnp.where(step < warmup_steps, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return schedule


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))``, like ``torch.nn.utils.clip_grad_norm_``.

    ``norm`` is the L2 norm of every gradient entry taken together.
    """
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads)


def make_train_step(
    config: ViTConfig,
    optimizer: Optimizer,
    label_smoothing: float = 0.0,
    clip_norm: float | None = None,
) -> Callable:
    """A ``jax.jit``-compiled training step for ``config`` and ``optimizer``.

    Returns:
        ``step(params, opt_state, images, labels, key=None) -> (params, opt_state, loss)``
        with ``images`` ``(B, C, H, W)`` and ``labels`` ``(B,)``. The first call
        traces and compiles (seconds); later calls with the same shapes reuse the
        compiled program. ``key=None`` trains without dropout.
    """

    def step(params, opt_state, images, labels, key=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, config, key, label_smoothing)
        if clip_norm is not None:
            grads = clip_by_global_norm(grads, clip_norm)
        params, opt_state = optimizer.update(grads, opt_state, params)
        return params, opt_state, loss

    return jax.jit(step)


# ---------------------------------------------------------------- evaluation


@jax.jit
def _batch_stats(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and number of correct predictions for ``logits`` ``(B, K)``, ``labels`` ``(B,)``."""
    return cross_entropy(logits, labels) * labels.shape[0], jnp.sum(jnp.argmax(logits, axis=-1) == labels)


def evaluate(params: Params, batches: Iterable, config: ViTConfig) -> dict[str, float]:
    """Mean loss and accuracy of the model over ``batches``.

    Args:
        batches: an iterable of ``(images (B, C, H, W), labels (B,))`` pairs of torch
            tensors or arrays, e.g. a ``torch.utils.data.DataLoader``.

    Returns:
        ``{"loss": float, "accuracy": float, "count": int}``.
    """
    total_loss, correct, count = 0.0, 0, 0
    for images, labels in batches:
        labels = jnp.asarray(_as_array(labels))
        loss_sum, hits = _batch_stats(apply(params, images, config), labels)
        total_loss += float(loss_sum)
        correct += int(hits)
        count += int(labels.shape[0])
    if count == 0:
        raise ValueError("evaluate() got no batches; pass a non-empty DataLoader or list of (images, labels).")
    return {"loss": total_loss / count, "accuracy": correct / count, "count": count}


# ---------------------------------------------------------------- PyTorch <-> JAX


def _linear_from_torch(sd: dict, name: str) -> dict:
    """torch ``weight (out, in)``, ``bias (out,)`` -> ``{"kernel": (in, out), "bias": (out,)}``."""
    return {"kernel": jnp.asarray(sd[f"{name}.weight"].T), "bias": jnp.asarray(sd[f"{name}.bias"])}


def _norm_from_torch(sd: dict, name: str) -> dict:
    """torch LayerNorm ``weight``, ``bias`` -> ``{"scale", "bias"}``."""
    return {"scale": jnp.asarray(sd[f"{name}.weight"]), "bias": jnp.asarray(sd[f"{name}.bias"])}


def from_torch(model: torch.nn.Module) -> Params:
    """The parameters of a :class:`vitcourse.VisionTransformer` (or a timm ViT of the same layout) as a pytree.

    The returned arrays are copies: changing them does not change the model.
    """
    if isinstance(model, VisionTransformer):
        require_plain_vit(model.config, "vitcourse.jax_vit")  # the JAX port: plain ViT only
    sd = {name: t.detach().cpu().float().numpy() for name, t in model.state_dict().items()}
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise ValueError(
            f"{type(model).__name__} has no patch_embed.proj / cls_token parameters; "
            "pass a vitcourse.VisionTransformer (or a timm ViT with the same names)."
        )
    conv = sd["patch_embed.proj.weight"]  # (D, C, P, P)
    depth = len({name.split(".")[1] for name in sd if name.startswith("blocks.")})
    return {
        "patch_embed": {
            "kernel": jnp.asarray(rearrange(conv, "d c p1 p2 -> (p1 p2 c) d")),  # (P*P*C, D)
            "bias": jnp.asarray(sd["patch_embed.proj.bias"]),
        },
        "cls_token": jnp.asarray(sd["cls_token"].reshape(-1)),  # (1, 1, D) -> (D,)
        "pos_embed": jnp.asarray(sd["pos_embed"][0]),  # (1, N + 1, D) -> (N + 1, D)
        "blocks": [
            {
                "norm1": _norm_from_torch(sd, f"blocks.{i}.norm1"),
                "attn": {
                    "qkv": _linear_from_torch(sd, f"blocks.{i}.attn.qkv"),
                    "proj": _linear_from_torch(sd, f"blocks.{i}.attn.proj"),
                },
                "norm2": _norm_from_torch(sd, f"blocks.{i}.norm2"),
                "mlp": {
                    "fc1": _linear_from_torch(sd, f"blocks.{i}.mlp.fc1"),
                    "fc2": _linear_from_torch(sd, f"blocks.{i}.mlp.fc2"),
                },
            }
            for i in range(depth)
        ],
        "norm": _norm_from_torch(sd, "norm"),
        "head": _linear_from_torch(sd, "head"),
    }


def _state_dict(params: Params, config: ViTConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_torch`: the pytree as a torch ``state_dict`` with timm's names and shapes."""
    c = config
    t = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))  # noqa: E731 - a copy, writable
    sd = {
        "cls_token": t(params["cls_token"]).reshape(1, 1, -1),
        "pos_embed": t(params["pos_embed"])[None],
        "patch_embed.proj.weight": t(
            rearrange(np.asarray(params["patch_embed"]["kernel"]), "(p1 p2 c) d -> d c p1 p2",
                      p1=c.patch_size, p2=c.patch_size)
        ),  # (D, C, P, P)
        "patch_embed.proj.bias": t(params["patch_embed"]["bias"]),
    }

    def put(name: str, p: dict) -> None:
        if "kernel" in p:
            sd[f"{name}.weight"], sd[f"{name}.bias"] = t(p["kernel"]).T.contiguous(), t(p["bias"])
        else:
            sd[f"{name}.weight"], sd[f"{name}.bias"] = t(p["scale"]), t(p["bias"])

    for i, block in enumerate(params["blocks"]):
        for name, p in [("norm1", block["norm1"]), ("attn.qkv", block["attn"]["qkv"]),
                        ("attn.proj", block["attn"]["proj"]), ("norm2", block["norm2"]),
                        ("mlp.fc1", block["mlp"]["fc1"]), ("mlp.fc2", block["mlp"]["fc2"])]:
            put(f"blocks.{i}.{name}", p)
    put("norm", params["norm"])
    put("head", params["head"])
    return sd


def to_torch(params: Params, config: ViTConfig) -> VisionTransformer:
    """A :class:`vitcourse.VisionTransformer` (in eval mode) holding a copy of ``params``.

    Raises:
        ValueError: if the parameters do not fit ``config``, naming the first mismatch.
    """
    require_plain_vit(config, "vitcourse.jax_vit")  # the JAX port: plain ViT only
    model = VisionTransformer(config)
    expected = model.state_dict()
    patch_shape = (config.patch_size**2 * config.in_channels, config.dim)
    if tuple(params["patch_embed"]["kernel"].shape) != patch_shape:
        raise ValueError(
            f"the patch embedding kernel has shape {tuple(params['patch_embed']['kernel'].shape)} but the "
            f"config needs {patch_shape}; pass the config the parameters were made for."
        )
    if len(params["blocks"]) != config.depth:
        raise ValueError(
            f"the parameters have {len(params['blocks'])} blocks but config.depth={config.depth}; "
            "pass the config the parameters were made for."
        )
    sd = _state_dict(params, config)
    for name, tensor in expected.items():
        if sd[name].shape != tensor.shape:
            raise ValueError(
                f"parameter {name} has shape {tuple(sd[name].shape)} but the config needs "
                f"{tuple(tensor.shape)}; pass the config the parameters were made for."
            )
    model.load_state_dict(sd, strict=True)
    return model.eval()
