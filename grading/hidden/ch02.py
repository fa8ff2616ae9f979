"""Chapter 2 hidden checks: rectangular images, one-pixel and whole-image patches, other sizes,
strides that leave pixels over or skip them."""

from vitcourse.grading.exercises.ch02 import embed_case, overlapping_case, to_image_case, to_patches_case
from vitcourse.grading.runtime import new, num_params
from vitcourse.grading.spec import Case, Check, exact
from vitcourse.patches import PatchEmbed
from vitcourse.vit import count_parameters

HIDDEN = {
    "2.1": [
        Check("a rectangular (2, 3, 12, 8) image, 4x4 patches", to_patches_case(2, 3, 12, 8, 4)),
        Check("1x1 patches (every pixel a token)", to_patches_case(1, 2, 3, 3, 1)),
        Check("one patch covering the whole image", to_patches_case(3, 3, 5, 5, 5)),
    ],
    "2.2": [
        Check("a rectangular image given as (H, W)", to_image_case(2, 3, 12, 8, 4)),
        Check("a grey image with 2x2 patches", to_image_case(1, 1, 6, 6, 2)),
    ],
    "2.3": [
        Check("the output for 12x12 grey images, 3x3 patches, dim 5", embed_case(12, 3, 1, 5, batch=3)),
        Check("the parameter count for 32x32 RGB images, 4x4 patches, dim 64",
              lambda rng: Case(num_params(new("PatchEmbed", 32, 4, 3, 64)),
                               count_parameters(PatchEmbed(32, 4, 3, 64)), exact())),
    ],
    "2.4": [
        Check("a rectangular image whose last rows and columns do not fill a patch",
              overlapping_case(2, 3, 10, 7, 3, 2)),
        Check("a stride of one pixel", overlapping_case(1, 3, 5, 6, 3, 1)),
        Check("a stride larger than the patch (pixels skipped)", overlapping_case(2, 1, 9, 9, 2, 3)),
        Check("one patch covering the whole image", overlapping_case(3, 2, 4, 4, 4, 3)),
    ],
}
