"""Chapter 10 hidden checks: ViT-B/16's 196 tokens, an odd count whose kept share rounds down, nothing hidden,
a single token kept, and the properties of any random masking; other sizes, a single image and loud hidden
patches for the miniature MAE; mixup labels, other alphas, large logits and another distilled ViT; the written
prediction, normalised targets, flat patches, per-image brightness and uneven masks for the visible mean."""

from vitcourse.grading.exercises.ch10 import (
    DISTILLED_GREY,
    distillation_case,
    distilled_logits_case,
    masking_case,
    masking_properties_case,
    mini_mae_case,
    prediction_case,
    visible_mean_case,
)
from vitcourse.grading.spec import Check

HIDDEN = {
    "10.1": [
        Check("196 tokens (ViT-B/16 at 224 px), mask ratio 0.75", masking_case(3, 196, 8, 0.75)),
        Check("7 tokens at mask ratio 0.5 (N_keep = int(3.5) = 3)", masking_case(4, 7, 5, 0.5)),
        Check("mask ratio 0: every token kept, in shuffled order", masking_case(2, 9, 3, 0.0)),
        Check("a single image keeping a single token of 8", masking_case(1, 8, 6, 0.875)),
        Check("what any random masking must satisfy: the visible tokens, the mask and ids_restore agree",
              masking_properties_case(6, 12, 3, 0.5)),
    ],
    "10.2": [
        Check("196 patches of 48 pixels, D = 16, mask ratio 0.75", mini_mae_case(2, 196, 48, 16, 0.75)),
        Check("a single image, mask ratio 0.5", mini_mae_case(1, 9, 6, 4, 0.5)),
        Check("hidden patches with values 100 times larger than the visible ones",
              mini_mae_case(3, 16, 12, 8, 0.75, loud_hidden=100.0)),
        Check("mask ratio 0.9 on 25 patches (2 kept)", mini_mae_case(3, 25, 6, 8, 0.9)),
    ],
    "10.3": [
        Check("mixup labels (probability vectors)", distillation_case(6, 5, mixup=True)),
        Check("alpha 0.2, class-index labels", distillation_case(5, 7, alpha=0.2)),
        Check("alpha 1: the teacher's term alone, mixup labels", distillation_case(4, 6, alpha=1.0, mixup=True)),
        Check("large logits with mixup labels (numerical stability)",
              distillation_case(6, 8, alpha=0.3, mixup=True, scale=80.0)),
        Check("a single image", distillation_case(1, 4, alpha=0.5)),
        Check("the test-time logits of a grey 2-block distilled ViT", distilled_logits_case(3, DISTILLED_GREY)),
    ],
    "10.4": [
        Check("the prediction written for the statement's scenario", prediction_case, weight=2.5),
        Check("normalised pixel targets (norm_pix)", visible_mean_case(3, 3, 12, 4, norm_pix=True)),
        Check("norm_pix with patches of one single value (zero variance)",
              visible_mean_case(3, 3, 12, 4, norm_pix=True, flat_patches=3)),
        Check("images of very different brightness (one mean per image)", visible_mean_case(4, 3, 8, 2, offsets=True)),
        Check("a different number of hidden patches in each image",
              visible_mean_case(5, 1, 12, 3, mask_ratio=None, offsets=True)),
    ],
}
