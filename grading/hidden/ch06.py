"""Chapter 6 hidden checks: other sizes, large activations, other class counts and image sizes;
the residual path, saturated softmax rows and a single example for the block's gain."""

from vitcourse.grading.exercises.ch06 import block_case, gain_case, net_case
from vitcourse.grading.spec import Check

HIDDEN = {
    "6.1": [
        Check("other sizes (dim 20, attn_dim 5)", block_case(20, 5, 3)),
        Check("large weights (saturated softmax rows)", block_case(48, 8, 6, scale=1.5)),
        Check("a batch of one", block_case(48, 8, 1)),
    ],
    "6.2": [
        Check("the parameter names and shapes", net_case("UltimusNet", "ultimus", 2, what="shapes")),
        Check("7 classes and 16x16 images", net_case("UltimusNet", "ultimus", 3, image_size=16, num_classes=7)),
        Check("the parameter count for 100 classes",
              net_case("UltimusNet", "ultimus", 1, num_classes=100, what="params")),
    ],
    "6.3": [
        Check("the parameter count", net_case("RepairedUltimusNet", "ultimus_repaired", 1, what="params")),
        Check("7 classes and 24x24 images",
              net_case("RepairedUltimusNet", "ultimus_repaired", 3, image_size=24, num_classes=7)),
    ],
    "6.4": [
        Check("with the residual path", gain_case(48, 8, 4, residual=True)),
        Check("other sizes (dim 20, attn_dim 5)", gain_case(20, 5, 3)),
        Check("large weights (saturated softmax rows)", gain_case(48, 8, 3, scale=1.5)),
        Check("a single example, other sizes, with the residual path", gain_case(12, 3, 1, residual=True)),
    ],
}
