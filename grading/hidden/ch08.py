"""Chapter 8 hidden checks: k = 1 and k = K, large logits; upsampling, the same grid, one channel;
no steps, two classes, a large step."""

from vitcourse.grading.exercises.ch08 import probe_case, resize_case, topk_case
from vitcourse.grading.spec import Check

HIDDEN = {
    "8.1": [
        Check("k = 1 (the top-1 class)", topk_case(3, 10, 1)),
        Check("k equal to the number of classes", topk_case(2, 6, 6)),
        Check("large logits (numerical stability)", topk_case(5, 10, 2, scale=50.0)),
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
}
