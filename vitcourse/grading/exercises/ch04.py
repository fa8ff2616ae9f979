"""Chapter 4 exercises (the Vision Transformer): public spec.

Students write ``embed_tokens`` (CLS token and positions), assemble ``ViT`` with
timm's parameter names, count its parameters by formula, and derive the floating-point
operations of its forward pass and of a training step (``vit_flops``), graded against what PyTorch's own
``FlopCounterMode`` counts on the meta device, at sizes no machine here could run. The grading sandbox
exposes the earlier chapters' modules (attention, patches, encoder), not
:mod:`vitcourse.vit`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitcourse.vit import VisionTransformer, ViTConfig, count_parameters

from ..runtime import apply, arr, call, new, num_params, state_shapes
from ..spec import Case, Chapter, Check, Exercise, exact
from ._common import randn, randomised, run, shapes, weights

SIZES = ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth", "heads", "mlp_dim")


def tokens_case(batch: int, n: int, dim: int):
    """``embed_tokens(patch_tokens, cls_token, pos_embed)`` for random inputs."""

    def build(rng: np.random.Generator) -> Case:
        x, cls, pos = randn(rng, batch, n, dim), randn(rng, 1, 1, dim), randn(rng, 1, n + 1, dim)
        expected = np.concatenate([np.broadcast_to(cls, (batch, 1, dim)), x], axis=1) + pos
        return Case(call("embed_tokens", arr(x), arr(cls), arr(pos)), expected)

    return build


def vit_case(config: ViTConfig, batch: int = 2, what: str = "forward", name: str = "ViT",
             reference=VisionTransformer):
    """The student's ``name(**sizes)`` with the weights of ``reference(config)``."""
    sizes = {k: getattr(config, k) for k in SIZES}

    def build(rng: np.random.Generator) -> Case:
        torch.manual_seed(0)
        ref = randomised(reference(config), rng, scale=0.2)
        if what == "shapes":
            return Case(state_shapes(new(name, **sizes)), shapes(ref), exact())
        if what == "count":
            return Case(num_params(new(name, **sizes)), count_parameters(ref), exact())
        images = randn(rng, batch, config.in_channels, config.image_size, config.image_size)
        return Case(apply(new(name, **sizes, state=weights(ref)), arr(images)), run(ref, images))

    return build


def count_case(config: ViTConfig):
    """``vit_parameter_count(...)`` against the parameters of the course's model, built on the meta device
    (shapes without memory), so the count can be checked at sizes no machine could build: an answer that
    builds a model instead of deriving the formula runs out of memory or time there."""
    sizes = {k: getattr(config, k) for k in SIZES if k != "heads"}

    def build(rng: np.random.Generator) -> Case:
        with torch.device("meta"):
            model = VisionTransformer(config)
        return Case(call("vit_parameter_count", **sizes), count_parameters(model), exact())

    return build


@functools.lru_cache(maxsize=32)
def measured_flops(config: ViTConfig, training: bool = False) -> int:
    """Floating-point operations for one image through the course's ViT, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (2 per multiply-add of every matrix
    product and convolution; nothing for norms, softmax, GELU, additions or biases): the forward
    pass, or with ``training`` the forward and the backward pass of ``logits.sum()``, which
    computes every parameter's gradient and no gradient for the image. The model and the image
    live on the meta device: no memory, no arithmetic, any size."""
    with torch.device("meta"):
        model = VisionTransformer(config)
        image = torch.empty(1, config.in_channels, config.image_size, config.image_size)
        with FlopCounterMode(display=False) as counter:
            logits = model(image)
            if training:
                logits.sum().backward()
    return int(counter.get_total_flops())


def flops_case(config: ViTConfig, training: bool = False):
    """``vit_flops(..., training=training)`` against the operations PyTorch counts for the course's model."""
    sizes = {k: getattr(config, k) for k in SIZES if k != "heads"}

    def build(rng: np.random.Generator) -> Case:
        return Case(call("vit_flops", **sizes, training=training), measured_flops(config, training), exact())

    return build


SMALL = ViTConfig(image_size=8, patch_size=4, in_channels=3, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=32)
FLOPS_SMALL = ViTConfig(image_size=32, patch_size=8, in_channels=3, num_classes=10, dim=24, depth=3, heads=4,
                        mlp_dim=96)  # an MLP four times as wide as the tokens, as in every standard ViT

CHAPTER = Chapter(
    name="ch04",
    title="The Vision Transformer",
    sandbox_modules=("attention", "patches", "encoder"),
    exercises=[
        Exercise(
            id="4.1", title="CLS token and positions", points=1, answers=("embed_tokens",),
            statement="Write embed_tokens(patch_tokens, cls_token, pos_embed): put the (1, 1, D) CLS token in "
                      "front of each sequence of (B, N, D) patch tokens and add the (1, N + 1, D) positions.",
            public=[Check("a (2, 4, 8) batch of patch tokens", tokens_case(2, 4, 8))],
        ),
        Exercise(
            id="4.2", title="Assembling the ViT", points=4, answers=("ViT",),
            statement="Write the nn.Module ViT(image_size, patch_size, in_channels, num_classes, dim, depth, heads, "
                      "mlp_dim) with timm's names (patch_embed.proj, cls_token, pos_embed, blocks.i..., norm, head) "
                      "and LayerNorm eps 1e-6; forward maps images to (B, num_classes) logits from the CLS token.",
            public=[Check("the logits of a small ViT with the grader's weights", vit_case(SMALL)),
                    Check("the parameter names and shapes of a small ViT", vit_case(SMALL, what="shapes"))],
            forbidden=("timm", "vitcourse.vit", "torchvision"),
        ),
        Exercise(
            id="4.3", title="Counting parameters", points=1, answers=("vit_parameter_count",),
            statement="Write vit_parameter_count(image_size, patch_size, in_channels, num_classes, dim, depth, "
                      "mlp_dim) returning the number of parameters of that ViT, from a formula (build no model).",
            public=[Check("the count of a small ViT", count_case(SMALL))],
            forbidden=("timm", "ViT", "torch.nn", ".parameters", ".numel", ".state_dict", "vitcourse"),
        ),
        Exercise(
            id="4.4", title="Derive the cost of a forward pass and of a training step", points=6,
            answers=("vit_flops",),
            statement="Write vit_flops(image_size, patch_size, in_channels, num_classes, dim, depth, mlp_dim, "
                      "training=False): the floating-point operations for one image through your ViT, from a "
                      "formula: the forward pass, or with training=True the forward and backward pass (every "
                      "parameter's gradient, none for the image). Count as torch.utils.flop_counter.FlopCounterMode "
                      "does: 2 per multiply-add of every matrix product (linear layers, q k^T, weights v) and of "
                      "the patch convolution; nothing for norms, softmax, GELU, additions and biases. Build no "
                      "model, count nothing.",
            public=[Check("the forward pass of a small ViT (32 px, 8 px patches, 3 blocks)", flops_case(FLOPS_SMALL)),
                    Check("a training step of the same ViT", flops_case(FLOPS_SMALL, training=True))],
            forbidden=("timm", "torch", "vitcourse", "ViT", "fvcore", "thop", "ptflops"),
        ),
    ],
)
