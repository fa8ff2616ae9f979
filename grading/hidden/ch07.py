"""Chapter 7 hidden checks: other sizes, large offsets, one head; the written trace prediction and trace
counts over other arrays (other dtypes, ranks, repeats); a single example, large logits, no momentum;
no padding, large values in the padding and one head for the padded batch."""

from vitcourse.grading.exercises.ch07 import (
    attention_case,
    layer_norm_case,
    loss_case,
    momentum_case,
    padded_attention_case,
    patch_kernel_case,
    prediction_case,
    traces_case,
)
from vitcourse.grading.spec import Check

HIDDEN = {
    "7.1": [
        Check("a large common offset (mean subtraction)", layer_norm_case((4, 6), offset=300.0)),
        Check("an explicit eps argument", layer_norm_case((3, 5), eps=0.5)),
        Check("a 3-d input", layer_norm_case((2, 3, 7))),
    ],
    "7.2": [
        # Few, similar shapes: eager JAX compiles every operation once per new shape, and all
        # checks of an exercise share one wall-time budget.
        Check("a single head", attention_case(7, 16, 1)),
        Check("a single token", attention_case(1, 16, 4)),
    ],
    "7.3": [
        Check("one channel, patch 5", patch_kernel_case(4, 1, 5)),
        Check("2 channels, patch 2, D = 9", patch_kernel_case(9, 2, 2)),
    ],
    "7.4": [
        Check("the prediction written for the statement's scenario", prediction_case, weight=2.0),
        Check("the same shape in two dtypes", traces_case([((5,), "float32"), ((5,), "int32"), ((5,), "float32")])),
        Check("a long list with few distinct shapes",
              traces_case([((3, 2), "float32")] * 6 + [((1, 2), "float32")] + [((3, 2), "float32")] * 3)),
        Check("the same number of elements in different shapes",
              traces_case([((6,), "float32"), ((2, 3), "float32"), ((3, 2), "float32"), ((6,), "float32")])),
    ],
    "7.5": [
        Check("the loss of a single image", loss_case(1, (3, 2, 2), 4)),
        Check("the loss for large logits (numerical stability)", loss_case(6, (1, 4, 4), 3, scale=80.0)),
        Check("the gradient for one-channel images and 2 classes", loss_case(5, (1, 3, 3), 2, what="grad")),
        Check("a step without momentum", momentum_case(0.5, 0.0)),
        Check("a small learning rate, momentum 0.5", momentum_case(1e-3, 0.5)),
    ],
    "7.6": [
        Check("no padding at all", padded_attention_case(3, 6, 16, 4, full=True)),
        # scores of padding keys near 1e6: masking after the softmax, or not at all, gives a wrong result
        Check("large values in the padding", padded_attention_case(3, 6, 16, 4, garbage=1000.0)),
        Check("a single head", padded_attention_case(3, 6, 16, 1)),
    ],
}
