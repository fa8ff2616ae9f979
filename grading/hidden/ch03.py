"""Chapter 3 hidden checks: the epsilon, large offsets, other sizes, the parameter count."""

from vitcourse.encoder import MLP
from vitcourse.vit import count_parameters

from vitcourse.grading.exercises.ch03 import block, layer_norm_case, module_case
from vitcourse.grading.runtime import new, num_params
from vitcourse.grading.spec import Case, Check, exact

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
}
