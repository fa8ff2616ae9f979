"""Chapter 2 exercises (patching): public spec.

Students write ``image_to_patches``, its inverse ``patches_to_image``, fix the two bugs
of a given convolutional ``PatchEmbed``, and write ``image_to_overlapping_patches`` (patches every
``stride`` pixels, which the reshape trick cannot cut). Patches are flattened in ``(row, column, channel)``
order, as in :mod:`vitcourse.patches`. No core module is visible while grading.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from vitcourse.patches import PatchEmbed, image_to_patches, patches_to_image

from ..runtime import apply, arr, call, new, state_shapes
from ..spec import Case, Chapter, Check, Exercise, exact
from ._common import randn, randomised, run, shapes, t, weights


def to_patches_case(batch: int, channels: int, height: int, width: int, patch: int):
    """``image_to_patches`` of random images ``(batch, channels, height, width)``."""

    def build(rng: np.random.Generator) -> Case:
        images = randn(rng, batch, channels, height, width)
        return Case(call("image_to_patches", arr(images), patch), image_to_patches(t(images), patch).numpy())

    return build


def to_image_case(batch: int, channels: int, height: int, width: int, patch: int):
    """``patches_to_image`` of the patches of random images; ``image_size`` is an int when square."""

    def build(rng: np.random.Generator) -> Case:
        images = randn(rng, batch, channels, height, width)
        patches = image_to_patches(t(images), patch).numpy()
        size = height if height == width else (height, width)
        expected = patches_to_image(t(patches), patch, size, channels).numpy()
        return Case(call("patches_to_image", arr(patches), patch, size, channels), expected)

    return build


def embed_case(image: int, patch: int, channels: int, dim: int, batch: int = 2, what: str = "forward"):
    """The student's ``PatchEmbed(image, patch, channels, dim)`` with grader weights."""

    def build(rng: np.random.Generator) -> Case:
        ref = randomised(PatchEmbed(image, patch, channels, dim), rng)
        if what == "shapes":
            return Case(state_shapes(new("PatchEmbed", image, patch, channels, dim)), shapes(ref), exact())
        images = randn(rng, batch, channels, image, image)
        return Case(apply(new("PatchEmbed", image, patch, channels, dim, state=weights(ref)), arr(images)),
                    run(ref, images))

    return build


def overlapping_case(batch: int, channels: int, height: int, width: int, patch: int, stride: int):
    """``image_to_overlapping_patches`` of random images, against ``F.unfold`` put in (row, column, channel) order."""

    def build(rng: np.random.Generator) -> Case:
        images = randn(rng, batch, channels, height, width)
        columns = F.unfold(t(images), kernel_size=patch, stride=stride)  # (B, C*P*P, N): (channel, row, column)
        per_patch = columns.reshape(batch, channels, patch, patch, -1).permute(0, 4, 2, 3, 1)  # (B, N, P, P, C)
        expected = per_patch.reshape(batch, -1, patch * patch * channels)
        return Case(call("image_to_overlapping_patches", arr(images), patch, stride), expected.numpy())

    return build


CHAPTER = Chapter(
    name="ch02",
    title="Patching",
    sandbox_modules=(),
    exercises=[
        Exercise(
            id="2.1", title="Images to patches", points=3, answers=("image_to_patches",),
            statement="Write image_to_patches(images, patch_size): (B, C, H, W) -> (B, N, P*P*C), patches in "
                      "row-major order over the image, each flattened as (row, column, channel).",
            public=[Check("a (2, 3, 8, 8) batch cut into 4x4 patches", to_patches_case(2, 3, 8, 8, 4)),
                    Check("a grey (1, 1, 6, 6) image cut into 2x2 patches", to_patches_case(1, 1, 6, 6, 2))],
        ),
        Exercise(
            id="2.2", title="Patches back to images", points=2, answers=("patches_to_image",),
            statement="Write patches_to_image(patches, patch_size, image_size, channels), the exact inverse of "
                      "image_to_patches; image_size is an int (square) or a pair (H, W).",
            public=[Check("patches of a (2, 3, 8, 8) batch, 4x4 patches", to_image_case(2, 3, 8, 8, 4))],
        ),
        Exercise(
            id="2.3", title="Find and fix: the patch embedding", points=3, answers=("PatchEmbed",),
            statement="The notebook's BuggyPatchEmbed returns tokens of the right shape holding the wrong numbers. "
                      "Write PatchEmbed(image_size, patch_size, in_channels, dim) with its bugs fixed: one nn.Conv2d "
                      "named proj (kernel = stride = patch size); forward maps (B, C, H, W) to (B, N, dim), token n "
                      "being patch n in row-major order and holding that patch's dim features.",
            public=[Check("the output for 8x8 RGB images, 4x4 patches, dim 6", embed_case(8, 4, 3, 6)),
                    Check("the parameter names and shapes", embed_case(8, 4, 3, 6, what="shapes"))],
        ),
        Exercise(
            id="2.4", title="Overlapping patches", points=3, answers=("image_to_overlapping_patches",),
            statement="Write image_to_overlapping_patches(images, patch_size, stride): (B, C, H, W) -> "
                      "(B, N, P*P*C) with a P x P patch starting every stride pixels, down and across; "
                      "N = ((H - P) // stride + 1) * ((W - P) // stride + 1), pixels past the last whole patch are "
                      "dropped, patches in row-major order, each flattened as (row, column, channel); "
                      "no F.unfold or nn.Unfold.",
            public=[Check("a (2, 3, 8, 8) batch, 4x4 patches every 2 pixels", overlapping_case(2, 3, 8, 8, 4, 2)),
                    Check("stride equal to the patch size (no overlap)", overlapping_case(1, 2, 6, 6, 2, 2))],
            forbidden=("timm", "torch.nn.functional.unfold", "torch.nn.Unfold"),
            forbidden_ops=("aten.im2col",),  # nn.Unfold and F.unfold, however reached; Tensor.unfold is allowed
        ),
    ],
)
