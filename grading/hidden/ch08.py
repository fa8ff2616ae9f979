"""Chapter 8 hidden checks: k = 1 and k = K, large logits, class 0 on top; upsampling, the same grid, one channel;
no steps, two classes, a large step; twelve blocks, no decay, one block, a partly frozen model."""

from vitcourse.grading.exercises.ch08 import decay_case, probe_case, resize_case, topk_case
from vitcourse.grading.spec import Check

HIDDEN = {
    "8.1": [
        Check("k = 1 (the top-1 class)", topk_case(3, 10, 1)),
        Check("k equal to the number of classes", topk_case(2, 6, 6)),
        Check("large logits (numerical stability)", topk_case(5, 10, 2, scale=50.0)),
        Check("class 0 the most probable class of every row", topk_case(4, 50, 3, class_zero_first=True)),
    ],
    "8.2": [
        Check("a 4 x 4 grid upsampled to 7 x 7", resize_case(4, 7, 5)),
        Check("the same grid (nothing changes)", resize_case(6, 6, 3)),
        Check("a single channel, 3 x 3 to 5 x 5", resize_case(3, 5, 1)),
    ],
    "8.3": [
        Check("zero steps (the zero initialisation)", probe_case(10, 4, 5, 0, 0.1)),
        Check("two classes and a single example per step", probe_case(1, 3, 2, 5, 0.2)),
        Check("a large step size", probe_case(20, 8, 4, 10, 5.0)),
    ],
    "8.4": [
        Check("12 blocks (two-digit block numbers), decay 0.65", decay_case(12, 5e-4, 0.65, 0.05)),
        Check("decay 1 (one learning rate) and no weight decay", decay_case(3, 1e-3, 1.0, 0.0)),
        Check("a single block, decay 0.5", decay_case(1, 2e-3, 0.5, 0.1)),
        Check("only blocks 2 to 5, the final norm and the head trainable", decay_case(6, 1e-3, 0.8, 0.05, 2)),
    ],
}
