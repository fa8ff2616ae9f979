"""Chapter 10 exercises (training a ViT without millions of labels): public spec.

Students write MAE's random masking with the reference semantics (exercise 10.1), repair a
miniature masked autoencoder whose encoder sees hidden patches and whose loss counts every
patch (10.2), write DeiT's hard-distillation loss and the distilled model's test-time logits
(10.3), and predict, then measure, the MAE loss of a decoder that has learned nothing but the
average of what it was shown (10.4). Expected values come from :func:`vitcourse.mae.random_masking`,
:class:`vitcourse.mae.MAE`'s targets and loss, :func:`vitcourse.distill.distillation_loss` and a
distilled :class:`vitcourse.VisionTransformer` in eval mode; the prediction of 10.4 from its
definition (an expectation over standard normal pixels). The grading sandbox exposes chapter 2's
``vitcourse.patches`` only; the modules the exercises rebuild are forbidden in the answers.

Masks are drawn by a ``torch.Generator``, which a task cannot carry: the notebook defines
``seeded(seed)`` (a generator started from ``seed``), and a task names it, so the student's
code and the reference draw the same noise from the same seed.
"""

from __future__ import annotations

import numpy as np
import torch

from vitcourse.distill import distillation_loss
from vitcourse.mae import MAE, random_masking
from vitcourse.vit import VisionTransformer, ViTConfig

from ..runtime import arr, call
from ..spec import Case, Chapter, Check, Comparison, Exercise, allclose
from ._common import randn, randomised, t

FORBIDDEN = ("timm", "vitcourse.mae", "vitcourse.distill")
"""The modules whose functions the exercises ask for: using them costs the exercise's points."""


def generator(seed: int) -> torch.Generator:
    """The generator the notebook's ``seeded(seed)`` returns."""
    return torch.Generator().manual_seed(seed)


def draw_seed(rng: np.random.Generator, batch: int, tokens: int) -> int:
    """A seed whose noise ``torch.rand(batch, tokens)`` has no tie in any row.

    With a tie, stable and unstable sorts may order the tied tokens differently; both are right,
    so no check may depend on it.
    """
    while True:
        seed = int(rng.integers(0, 2**31 - 1))
        noise = torch.rand(batch, tokens, generator=generator(seed))
        if all(len(torch.unique(row)) == tokens for row in noise):
            return seed


def kept(tokens: int, mask_ratio: float) -> int:
    """``int(N * (1 - mask_ratio))``: how many tokens the reference keeps."""
    return int(tokens * (1 - mask_ratio))


# ---------------------------------------------------------------- 10.1 random masking


def masking_case(batch: int, tokens: int, dim: int, mask_ratio: float):
    """``random_masking(tokens, mask_ratio, seeded(seed))`` against the course's, with the same seed."""

    def build(rng: np.random.Generator) -> Case:
        x = randn(rng, batch, tokens, dim)
        seed = draw_seed(rng, batch, tokens)
        expected = [v.numpy() for v in random_masking(t(x), mask_ratio, generator(seed))]
        return Case(call("random_masking", arr(x), mask_ratio, call("seeded", seed)), expected,
                    allclose(atol=0, rtol=0))

    return build


def masking_properties(tokens: np.ndarray, keep: int) -> Comparison:
    """What any random masking must satisfy, whatever noise it draws: ``ids_restore`` a permutation of
    each row, the visible tokens the first ``keep`` of the order it undoes, the mask 0 exactly there,
    and not one mask for the whole batch."""
    b, n, d = tokens.shape

    def compare(actual, expected) -> str | None:
        if not (isinstance(actual, list) and len(actual) == 3 and all(isinstance(a, np.ndarray) for a in actual)):
            return "expected three tensors (visible, mask, ids_restore)"
        visible, mask, ids_restore = actual
        if visible.shape != (b, keep, d) or mask.shape != (b, n) or ids_restore.shape != (b, n):
            return (f"expected shapes {(b, keep, d)}, {(b, n)} and {(b, n)}, got {visible.shape}, {mask.shape} "
                    f"and {ids_restore.shape}")
        if not np.array_equal(np.sort(ids_restore, axis=1), np.broadcast_to(np.arange(n), (b, n))):
            return "ids_restore is not a permutation of the token positions in every image"
        shuffle = np.argsort(ids_restore.astype(np.int64), axis=1)  # the shuffle that ids_restore undoes
        first = shuffle[:, :keep]
        if not np.array_equal(visible, np.take_along_axis(tokens, first[..., None], axis=1)):
            return ("the visible tokens are not the first N_keep tokens of the shuffled order that ids_restore "
                    "undoes, in that order")
        want = np.ones((b, n))
        np.put_along_axis(want, first, 0.0, axis=1)
        if not np.array_equal(mask.astype(np.float64), want):
            return "the mask is not 0 exactly at the visible tokens' positions and 1 elsewhere"
        if b > 1 and all(np.array_equal(mask[0], m) for m in mask[1:]):
            return "every image got the same mask"
        return None

    return compare


def masking_properties_case(batch: int, tokens: int, dim: int, mask_ratio: float):
    """``random_masking`` judged by the properties of any random masking, not by the noise it draws."""

    def build(rng: np.random.Generator) -> Case:
        x = randn(rng, batch, tokens, dim)
        seed = draw_seed(rng, batch, tokens)
        return Case(call("random_masking", arr(x), mask_ratio, call("seeded", seed)), None,
                    masking_properties(x, kept(tokens, mask_ratio)))

    return build


# ---------------------------------------------------------------- 10.2 find and fix: a miniature MAE


def mix(tokens: torch.Tensor) -> torch.Tensor:
    """The notebook's stand-in for transformer blocks: ``(B, M, D) -> (B, M, D)``, self-attention without
    learned weights, plus the residual."""
    scores = tokens @ tokens.transpose(1, 2) / tokens.shape[-1] ** 0.5  # (B, M, M)
    return tokens + torch.softmax(scores, dim=-1) @ tokens


def mini_mae(patches: torch.Tensor, params: dict, mask_ratio: float, gen: torch.Generator):
    """The miniature MAE of exercise 10.2, right: ``(loss, pred (B, N, P), mask (B, N))``.

    Embed and position every patch, keep the visible ones with the course's masking, encode them
    alone, append one mask token per hidden patch, unshuffle, position again, decode every patch;
    the loss is the per-patch mean squared error averaged over the hidden patches only.
    """
    x = patches @ params["embed"] + params["pos_embed"]  # (B, N, D)
    b, n, d = x.shape
    visible, mask, ids_restore = random_masking(x, mask_ratio, gen)  # (B, N_keep, D)
    latent = mix(visible)  # the encoder sees the visible tokens and nothing else
    hidden = params["mask_token"].expand(b, n - latent.shape[1], d)
    full = torch.cat([latent, hidden], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, d))
    pred = mix(full + params["pos_embed"]) @ params["decoder"]  # (B, N, P)
    per_patch = ((pred - patches) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


def mini_mae_case(batch: int, patches: int, pixels: int, dim: int, mask_ratio: float, loud_hidden: float = 1.0):
    """``mae_loss(patches, params, mask_ratio, seeded(seed))`` against :func:`mini_mae`.

    ``loud_hidden``: the hidden patches' values are multiplied by it, so an encoder that sees any of
    them is thrown far off.
    """

    def build(rng: np.random.Generator) -> Case:
        seed = draw_seed(rng, batch, patches)
        x = randn(rng, batch, patches, pixels)
        # which patches the reference hides: the masking depends on the seed only, not on the values
        _, mask, _ = random_masking(torch.zeros(batch, patches, 1), mask_ratio, generator(seed))
        x = np.where(mask.numpy()[..., None] > 0, x * np.float32(loud_hidden), x).astype(np.float32)
        params = {"embed": randn(rng, pixels, dim, scale=pixels ** -0.5), "pos_embed": randn(rng, 1, patches, dim),
                  "mask_token": randn(rng, 1, 1, dim), "decoder": randn(rng, dim, pixels, scale=dim ** -0.5)}
        with torch.no_grad():
            loss, pred, mask = mini_mae(t(x), {k: t(v) for k, v in params.items()}, mask_ratio, generator(seed))
        task = call("mae_loss", arr(x), {k: arr(v) for k, v in params.items()}, mask_ratio, call("seeded", seed))
        return Case(task, [loss.numpy(), pred.numpy(), mask.numpy()], allclose(atol=1e-5, rtol=1e-4))

    return build


# ---------------------------------------------------------------- 10.3 DeiT's hard distillation


def distillation_case(batch: int, classes: int, alpha: float = 0.5, mixup: bool = False, scale: float = 3.0):
    """``hard_distillation_loss(cls_logits, dist_logits, labels, teacher_logits, alpha=alpha)`` against
    :func:`vitcourse.distill.distillation_loss` (``kind="hard"``); ``mixup``: the labels are the
    probability vectors mixup makes (two classes mixed in a random proportion)."""

    def build(rng: np.random.Generator) -> Case:
        cls, dist, teacher = (randn(rng, batch, classes, scale=scale) for _ in range(3))
        first = rng.integers(0, classes, batch)
        if mixup:
            second, lam = rng.integers(0, classes, batch), rng.uniform(0.2, 0.8, batch)
            labels = np.zeros((batch, classes), np.float32)
            labels[np.arange(batch), first] += lam
            labels[np.arange(batch), second] += 1 - lam
        else:
            labels = first.astype(np.int64)
        expected = distillation_loss(t(cls), t(dist), t(labels), t(teacher), kind="hard", alpha=alpha)
        task = call("hard_distillation_loss", arr(cls), arr(dist), arr(labels), arr(teacher), alpha=alpha)
        return Case(task, expected.numpy(), allclose(atol=1e-5, rtol=1e-5))

    return build


def distilled_logits_case(batch: int, config: ViTConfig):
    """``distilled_logits(cls_logits, dist_logits)`` against what a distilled ViT returns in eval mode, for
    the two heads' logits it returns in training mode."""

    def build(rng: np.random.Generator) -> Case:
        torch.manual_seed(0)
        model = randomised(VisionTransformer(config), rng, scale=0.3)
        images = t(randn(rng, batch, config.in_channels, config.image_size, config.image_size))
        with torch.no_grad():
            cls, dist = model.train()(images)  # no dropout: the same features as in eval mode
            expected = model.eval()(images)
        return Case(call("distilled_logits", arr(cls), arr(dist)), expected.numpy(), allclose(atol=1e-6, rtol=1e-5))

    return build


DISTILLED = ViTConfig(image_size=8, patch_size=4, num_classes=6, dim=16, depth=1, heads=2, mlp_dim=32, distilled=True)
DISTILLED_GREY = ViTConfig(image_size=12, patch_size=4, in_channels=1, num_classes=3, dim=12, depth=2, heads=3,
                           mlp_dim=24, distilled=True)

# ---------------------------------------------------------------- 10.4 predict, then measure: a baseline decoder

PREDICTION_RATIOS = (0.5, 0.75, 0.9)
"""The mask ratios of 10.4's prediction, for 3 x 224 x 224 images cut into 16 x 16 patches (196 of them)."""


def predicted_losses() -> list[float]:
    """The answer of 10.4's prediction: ``1 + 1 / N_keep`` at each ratio, ``N_keep = int(196 * (1 - r))``.

    Pixels are independent standard normal numbers. A hidden pixel x and the mean m of the same pixel
    over the N_keep visible patches are independent, E[x] = E[m] = 0, Var x = 1 and Var m = 1 / N_keep,
    so E[(x - m)^2] = 1 + 1 / N_keep for every hidden pixel, whatever the patch size: 1 + 1/98, 1 + 1/49,
    1 + 1/19 (int(196 * 0.1) is 19, not 20: 1 - 0.9 is a hair below 0.1 in floating point).
    """
    return [1 + 1 / kept(196, r) for r in PREDICTION_RATIOS]


PREDICTION_TOLERANCE = 1e-3
"""Separates the answer from the likeliest wrong ones: 1 (the mean's own noise forgotten) differs by 0.01
and more, 1 + 1/20 at ratio 0.9 (N_keep rounded, not cut) by 0.0026, 1 + 1/N_hidden at 0.75 by 0.014.
A measurement is not a prediction: over 64 such images it scatters by about 5e-4 around the expectation
(up to 1.4e-3 at ratio 0.9), so the numbers must come from the derivation, which the measurement then confirms."""


def prediction_case(rng: np.random.Generator) -> Case:
    """The student's written prediction for the statement's scenario."""
    return Case(call("predicted_visible_mean_loss"), predicted_losses(),
                allclose(atol=PREDICTION_TOLERANCE, rtol=0))


def random_mask(rng: np.random.Generator, batch: int, patches: int, mask_ratio: float | None) -> np.ndarray:
    """A ``(B, N)`` float mask, 1 = hidden: ``N - int(N (1 - r))`` hidden patches in each image, or with
    ``mask_ratio=None`` a different number in each (at least one hidden, at least one visible)."""
    mask = np.zeros((batch, patches), np.float32)
    for row in mask:
        hidden = patches - kept(patches, mask_ratio) if mask_ratio is not None else int(rng.integers(1, patches))
        row[rng.permutation(patches)[:hidden]] = 1.0
    return mask


def visible_mean_reference(images: torch.Tensor, patch_size: int, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MAE's loss (its targets, its average over hidden patches) for a decoder that predicts, for every
    patch, the mean of the image's visible patches' targets."""
    config = ViTConfig(image_size=images.shape[-1], patch_size=patch_size, in_channels=images.shape[1], dim=4,
                       depth=1, heads=1, mlp_dim=4)
    model = MAE(config, decoder_dim=4, decoder_depth=0, decoder_heads=1, norm_pix_loss=norm_pix)
    target = model.target(images)  # (B, N, P*P*C)
    visible = (1 - mask)[..., None]  # (B, N, 1)
    mean = (target * visible).sum(dim=1, keepdim=True) / visible.sum(dim=1, keepdim=True)  # (B, 1, P*P*C)
    return model.reconstruction_loss(images, mean.expand_as(target), mask)


def visible_mean_case(batch: int, channels: int, side: int, patch_size: int, mask_ratio: float | None = 0.75,
                      norm_pix: bool = False, offsets: bool = False, flat_patches: int = 0):
    """``visible_mean_loss(images, patch_size, mask, norm_pix=norm_pix)`` against MAE's targets and loss.

    ``offsets``: each image gets its own brightness, far from the others'; ``flat_patches``: that many
    patches of each image are one single value (their pixel variance is 0).
    """

    def build(rng: np.random.Generator) -> Case:
        images = randn(rng, batch, channels, side, side)
        if offsets:
            images += (rng.uniform(-20, 20, (batch, 1, 1, 1))).astype(np.float32)
        grid = side // patch_size
        for b in range(batch):
            for index in rng.permutation(grid * grid)[:flat_patches]:
                r, c = divmod(int(index), grid)
                images[b, :, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = rng.normal()
        mask = random_mask(rng, batch, grid * grid, mask_ratio)
        with torch.no_grad():
            expected = visible_mean_reference(t(images), patch_size, t(mask), norm_pix)
        task = call("visible_mean_loss", arr(images), patch_size, arr(mask), norm_pix=norm_pix)
        return Case(task, expected.numpy(), allclose(atol=1e-5, rtol=1e-4))

    return build


CHAPTER = Chapter(
    name="ch10",
    title="Training a ViT without millions of labels",
    sandbox_modules=("patches",),
    exercises=[
        Exercise(
            id="10.1", title="Random masking", points=3, answers=("random_masking",),
            statement="Write random_masking(tokens, mask_ratio, generator) with MAE's reference semantics: for tokens "
                      "(B, N, D), noise = torch.rand(B, N, generator=generator) (one draw, a row per image); "
                      "ids_shuffle = noise.argsort(dim=1); ids_restore = ids_shuffle.argsort(dim=1); keep the first "
                      "int(N * (1 - mask_ratio)) tokens of the shuffled order. Return (visible (B, N_keep, D) in "
                      "shuffled order, mask (B, N): 1 hidden, 0 kept, in the original order, ids_restore (B, N)). "
                      "vitcourse.mae is forbidden.",
            public=[Check("8 images of 16 tokens, mask ratio 0.75, the notebook's seeded generator",
                          masking_case(8, 16, 4, 0.75))],
            forbidden=FORBIDDEN,
        ),
        Exercise(
            id="10.2", title="Find and fix: a masked autoencoder that peeks", points=4, answers=("mae_loss",),
            statement="The notebook's mae_loss_with_bugs(patches, params, mask_ratio, generator) has two bugs. Write "
                      "mae_loss(patches, params, mask_ratio, generator) with them fixed, returning (loss, "
                      "pred (B, N, P), mask (B, N)): the encoder (mix) sees only the visible tokens chosen with "
                      "10.1's semantics, the decoder every position, and the loss is the per-patch mean squared "
                      "error averaged over the hidden patches only. Graded on other sizes, ratios and patches.",
            public=[Check("4 images of 16 patches of 12 pixels, D = 8, mask ratio 0.75",
                          mini_mae_case(4, 16, 12, 8, 0.75))],
            forbidden=FORBIDDEN,
        ),
        Exercise(
            id="10.3", title="DeiT's hard distillation", points=3,
            answers=("hard_distillation_loss", "distilled_logits"),
            statement="Write hard_distillation_loss(cls_logits, dist_logits, labels, teacher_logits, alpha=0.5): "
                      "(1 - alpha) * CE(cls_logits, labels) + alpha * CE(dist_logits, argmax of teacher_logits), each "
                      "cross-entropy averaged over the batch, labels being class indices (B,) or probabilities (B, K) "
                      "(mixup); and distilled_logits(cls_logits, dist_logits): the logits a distilled ViT returns at "
                      "test time. vitcourse.distill is forbidden.",
            public=[Check("8 images, 10 classes, class-index labels, alpha 0.5", distillation_case(8, 10)),
                    Check("the test-time logits of a small distilled ViT", distilled_logits_case(4, DISTILLED))],
            forbidden=FORBIDDEN,
        ),
        Exercise(
            id="10.4", title="Predict, then measure: the loss of a decoder that learned nothing", points=4,
            answers=("predicted_visible_mean_loss", "visible_mean_loss"),
            statement="First write predicted_visible_mean_loss(): your prediction, a list of three floats, of the "
                      "expected MAE loss (plain pixel targets) at mask ratios 0.5, 0.75 and 0.9 of a decoder that "
                      "predicts every patch as the mean of the image's visible patches, for 3 x 224 x 224 images of "
                      "independent standard normal pixels in 16 x 16 patches, masked as in 10.1. Then write "
                      "visible_mean_loss(images, patch_size, mask, norm_pix=False): that decoder's MAE loss for the "
                      "given images and mask (B, N), 1 = hidden. The prediction is graded once, to within 0.001.",
            public=[Check("4 images of 3 x 16 x 16, patch 4, mask ratio 0.75", visible_mean_case(4, 3, 16, 4))],
            forbidden=FORBIDDEN,
        ),
    ],
)
