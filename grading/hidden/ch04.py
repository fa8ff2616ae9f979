"""Chapter 4 hidden checks: other depths and sizes, grey images, the standard ViT sizes, the mean-pool head."""

from vitcourse.vit import ViTConfig

from vitcourse.grading.exercises.ch04 import count_case, mean_pool_case, tokens_case, vit_case
from vitcourse.grading.spec import Check

WIDE = ViTConfig(image_size=64, patch_size=8, in_channels=3, num_classes=100, dim=48, depth=4, heads=4, mlp_dim=96)
GREY = ViTConfig(image_size=12, patch_size=3, in_channels=1, num_classes=3, dim=12, depth=3, heads=3, mlp_dim=24)

HIDDEN = {
    "4.1": [
        Check("a single patch token", tokens_case(3, 1, 5)),
        Check("a longer sequence", tokens_case(2, 16, 12)),
    ],
    "4.2": [
        Check("the logits of a 3-block ViT on grey images", vit_case(GREY, batch=3)),
        Check("the parameter names and shapes of a 3-block ViT", vit_case(GREY, what="shapes")),
    ],
    "4.3": [
        Check("the count of a 64 px, 4-block ViT with 100 classes", count_case(WIDE)),
        Check("the count of a grey 3-block ViT", count_case(GREY)),
    ],
    "4.4": [
        Check("the logits of a 3-block mean-pool ViT on grey images", mean_pool_case(GREY, batch=3)),
        Check("the parameter names and shapes of a 3-block mean-pool ViT", mean_pool_case(GREY, what="shapes")),
        Check("the parameter count of a 64 px, 4-block mean-pool ViT with 100 classes",
              mean_pool_case(WIDE, what="count")),
    ],
}
