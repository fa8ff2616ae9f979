"""Chapter 5 hidden checks: no warmup, warmup only, extreme logits, no smoothing, absent classes."""

from vitcourse.grading.exercises.ch05 import confusion_case, schedule_case, smoothing_case
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
}
