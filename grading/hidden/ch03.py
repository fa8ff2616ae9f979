"""Chapter 3 hidden checks: the epsilon, large offsets, other sizes, the parameter count, LayerScale's
initial value."""

from vitcourse.encoder import MLP
from vitcourse.vit import count_parameters

from vitcourse.grading.exercises._common import randn
from vitcourse.grading.exercises.ch03 import LayerScaleReference, block, layer_norm_case, module_case
from vitcourse.grading.runtime import apply, arr, method, new, num_params
from vitcourse.grading.spec import Case, Check, allclose, exact


def identity_case(rng):
    """With init_values = 0 the block starts as the identity, whatever its other (untrained) weights."""
    x = randn(rng, 2, 6, 8)
    return Case(apply(new("LayerScaleBlock", 8, 2, 16, init_values=0.0), arr(x)), x)


def default_gamma_case(rng):
    """ls2.gamma of a block built with the default init_values."""
    return Case(method(new("LayerScaleBlock", 12, 3, 24), "get_parameter", "ls2.gamma"),
                LayerScaleReference(12, 3, 24).ls2.gamma.detach().numpy(),
                allclose(atol=1e-9, rtol=1e-3))  # the default 1e-5 is below allclose's usual atol


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
        Check("the output for dim 24, 3 heads, MLP 48",
              module_case("LayerScaleBlock", LayerScaleReference, (24, 3, 48), (3, 9))),
        Check("init_values = 0 makes a new block the identity", identity_case),
        Check("gamma starts at the default init_values", default_gamma_case),
        Check("the parameter count for dim 64, 4 heads, MLP 256",
              lambda rng: Case(num_params(new("LayerScaleBlock", 64, 4, 256)),
                               count_parameters(LayerScaleReference(64, 4, 256)), exact())),
    ],
}
