"""Chapter 1 hidden checks: other shapes, extreme values, masks that broadcast, other head counts,
gradients through saturated and degenerate softmaxes."""

from vitcourse.attention import MultiHeadSelfAttention
from vitcourse.grading.exercises.ch01 import attention_case, backward_case, mhsa_case, softmax_case
from vitcourse.grading.runtime import new, num_params
from vitcourse.grading.spec import Case, Check, exact
from vitcourse.vit import count_parameters

HIDDEN = {
    "1.1": [
        Check("scores in the thousands (overflow without the max trick)", softmax_case((3, 6), scale=3000.0)),
        Check("softmax along dimension 0 of a 3-d tensor", softmax_case((4, 2, 3), dim=0)),
        Check("rows containing -inf (masked) entries", softmax_case((5, 8), masked=True)),
    ],
    "1.2": [
        Check("cross-attention: 3 queries, 7 keys, values of another width", attention_case((2,), 3, 7, 4, 6)),
        Check("a padding mask broadcast over heads, (batch, heads) leading dims",
              attention_case((2, 3), 5, 5, 8, 8, mask="padding")),
        Check("the 1/sqrt(d_k) scaling with d_k = 64", attention_case((1,), 4, 4, 64, 8, scale=2.0)),
    ],
    "1.3": [
        Check("the output for dim 24, 3 heads", mhsa_case(24, 3, batch=3, tokens=7)),
        Check("a single head", mhsa_case(8, 1)),
        Check("the parameter count for dim 32, 8 heads",
              lambda rng: Case(num_params(new("MultiHeadSelfAttention", 32, 8)),
                               count_parameters(MultiHeadSelfAttention(32, 8)), exact())),
    ],
    "1.4": [
        Check("a (batch, heads) pair of leading dimensions, 3 queries, 7 keys", backward_case((2, 3), 3, 7, 6, 4)),
        Check("a nearly one-hot softmax (large scores)", backward_case((2,), 5, 5, 4, 4, scale=4.0)),
        Check("a single key (constant softmax: dq and dk vanish)", backward_case((2,), 4, 1, 8, 3)),
    ],
}
