"""Chapter 3 hidden checks: the epsilon, large offsets, other sizes, the parameter count; for the block
with three bugs, other sizes, a single head, tokens far from zero and a freshly built block's weights."""

from vitcourse.encoder import MLP
from vitcourse.grading.exercises.ch03 import block, fixed_block_case, layer_norm_case, module_case
from vitcourse.grading.runtime import new, num_params
from vitcourse.grading.spec import Case, Check, exact
from vitcourse.vit import count_parameters

HIDDEN = {
    "3.1": [
        Check("a large common offset (mean subtraction)", layer_norm_case((3, 7), offset=300.0)),
        Check("an explicit eps argument", layer_norm_case((4, 6), eps=0.5)),
        Check("a 4-d input", layer_norm_case((2, 2, 3, 5))),
    ],
    "3.2": [
        Check("the output for dim 12, hidden 48 on 3-d tokens", module_case("MLP", MLP, (12, 48), (3, 7))),
        Check("the parameter count for dim 64, hidden 256",
              lambda rng: Case(num_params(new("MLP", 64, 256)), count_parameters(MLP(64, 256)), exact())),
    ],
    "3.3": [
        Check("the output for dim 24, 3 heads, MLP 48", module_case("EncoderBlock", block, (24, 3, 48), (3, 9))),
        Check("a single head", module_case("EncoderBlock", block, (8, 1, 8), (2, 4))),
    ],
    "3.4": [
        Check("the output for dim 24, 3 heads, MLP 48", fixed_block_case(24, 3, 48, (3, 9))),
        Check("a single head", fixed_block_case(8, 1, 16, (2, 4))),
        Check("tokens far from zero", fixed_block_case(12, 2, 24, (2, 6), offset=20.0)),
        Check("a freshly built block's weights, 6 heads", fixed_block_case(24, 6, 48, (2, 5), fresh=True)),
    ],
}
