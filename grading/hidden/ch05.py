"""Chapter 5 hidden checks: no warmup, warmup only, extreme logits, no smoothing, absent classes;
other data, dimensions and class counts, unnormalised inputs and a shorter budget for the trained classifier;
ImageNet-sized and two-class label smoothing, weak and strong."""

from vitcourse.grading.exercises.ch05 import (
    confusion_case,
    schedule_case,
    smoothing_case,
    smoothing_optimum_case,
    training_case,
)
from vitcourse.grading.spec import Check

HIDDEN = {
    "5.1": [
        Check("a schedule without warmup", schedule_case(50, 0, 3e-4)),
        Check("a long warmup and a larger peak", schedule_case(37, 30, 0.1)),
        Check("a single step", schedule_case(1, 0, 1.0)),
    ],
    "5.2": [
        Check("no smoothing at all", smoothing_case(6, 4, 0.0)),
        Check("very large logits (numerical stability)", smoothing_case(5, 10, 0.1, scale=300.0)),
        Check("strong smoothing over two classes", smoothing_case(16, 2, 0.5)),
    ],
    "5.3": [
        Check("a class that never occurs", confusion_case(50, 6, skip_class=True)),
        Check("a single example", confusion_case(1, 3)),
    ],
    "5.4": [
        Check("three rings in the plane", training_case("rings", 3, 2, 100)),
        Check("XOR clusters in 3-D", training_case("xor", 2, 3, 100)),
        Check("three shells in 4-D", training_case("rings", 3, 4, 100)),
        # a spread of 0.01 around 100: a model that does not normalise its inputs stays near chance
        Check("inputs with a tiny scale and a large offset", training_case("rings", 2, 2, 100, scale=0.01, shift=100.0)),
        Check("a short budget of 60 steps", training_case("rings", 3, 2, 60)),
    ],
    "5.5": [
        Check("1,000 classes, smoothing 0.1 (the ImageNet recipe)", smoothing_optimum_case(1000, 0.1)),
        Check("two classes, smoothing 0.5", smoothing_optimum_case(2, 0.5)),
        Check("21,843 classes, weak smoothing 0.01", smoothing_optimum_case(21843, 0.01)),
        Check("10 classes, strong smoothing 0.9", smoothing_optimum_case(10, 0.9)),
    ],
}
