"""Chapter 4 hidden checks: other depths and sizes, grey images; for the cost of a forward pass and of a
training step, a narrow MLP on grey images and models far too large to run here (ViT-H/14 at 518 px, a
22-billion-parameter ViT, ViT-B/16 on 1,024 px images)."""

from vitcourse.grading.exercises.ch04 import count_case, flops_case, tokens_case, vit_case
from vitcourse.grading.spec import Check
from vitcourse.vit import ViTConfig

WIDE = ViTConfig(image_size=64, patch_size=8, in_channels=3, num_classes=100, dim=48, depth=4, heads=4, mlp_dim=96)
GREY = ViTConfig(image_size=12, patch_size=3, in_channels=1, num_classes=3, dim=12, depth=3, heads=3, mlp_dim=24)
HUGE_518 = ViTConfig(image_size=518, patch_size=14, in_channels=3, num_classes=1000, dim=1280, depth=32, heads=16,
                     mlp_dim=5120)
GIANT = ViTConfig(image_size=224, patch_size=14, in_channels=3, num_classes=1000, dim=6144, depth=48, heads=48,
                  mlp_dim=24576)
LARGE_1024 = ViTConfig(image_size=1024, patch_size=16, in_channels=3, num_classes=21843, dim=768, depth=12, heads=12,
                       mlp_dim=3072)

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
        Check("the count of ViT-H/14 at 518 px", count_case(HUGE_518)),
        Check("the count of a ViT with 22 billion parameters", count_case(GIANT)),
    ],
    "4.4": [
        Check("the forward pass of a grey 3-block ViT whose MLP is twice as wide as its tokens", flops_case(GREY)),
        Check("a training step of the same grey ViT", flops_case(GREY, training=True)),
        Check("the forward pass of ViT-H/14 at 518 px", flops_case(HUGE_518)),
        Check("a training step of a ViT with 22 billion parameters", flops_case(GIANT, training=True)),
        Check("the forward pass of ViT-B/16 on 1,024 px images (4,097 tokens)", flops_case(LARGE_1024)),
        Check("a training step of ViT-B/16 on 1,024 px images", flops_case(LARGE_1024, training=True)),
    ],
}
