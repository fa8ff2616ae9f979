import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vitcourse.ultimus import SPEC_NUM_PARAMETERS, VARIANTS, UltimusBlock, UltimusNet, build_ultimus


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_spec_has_the_assignments_parameter_count_and_shapes():
    # Count from the specification's layer sizes, written out independently of the module.
    convs = sum(c_in * c_out * 9 + c_out for c_in, c_out in [(3, 16), (16, 32), (32, 48)])
    block = 3 * (48 * 8 + 8) + (8 * 48 + 48)
    head = 48 * 10 + 10
    assert convs + 4 * block + head == SPEC_NUM_PARAMETERS == 25_882
    model = UltimusNet()
    assert _count(model) == 25_882
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert model.features(torch.randn(3, 3, 32, 32)).shape == (3, 48)


def test_spec_has_no_nonlinearity_or_normalisation_in_the_stem():
    kinds = {type(m) for m in UltimusNet().stem}
    assert kinds == {torch.nn.Conv2d}


def test_block_matches_a_per_image_reference():
    block = UltimusBlock(48, 8)
    x = torch.randn(5, 48)
    rows = []
    for xi in x:  # one image at a time, as in the assignment: row vectors and an 8x8 matrix
        q, k, v = block.q(xi)[None], block.k(xi)[None], block.v(xi)[None]  # (1, 8)
        am = torch.softmax(q.T @ k, dim=-1) / math.sqrt(8)  # (8, 8)
        rows.append(block.out(v @ am)[0])  # (1, 8) @ (8, 8) -> (1, 8) -> (48,)
    assert_close(block(x), torch.stack(rows))


@pytest.mark.parametrize("scale, row_sum", [("outside", 1 / math.sqrt(8)), ("inside", 1.0), ("none", 1.0)])
def test_scale_placement(scale, row_sum):
    block = UltimusBlock(48, 8, scale=scale)
    x = torch.randn(4, 48) * 3
    am = block.attention_matrix(x)
    assert am.shape == (4, 8, 8)
    assert_close(am.sum(-1), torch.full((4, 8), row_sum))
    q, k = block.q(x), block.k(x)
    scores = q[:, :, None] * k[:, None, :]
    expected = {"outside": F.softmax(scores, -1) / math.sqrt(8), "inside": F.softmax(scores / math.sqrt(8), -1),
                "none": F.softmax(scores, -1)}[scale]
    assert_close(am, expected)


def test_residual_and_layernorm_blocks():
    block = UltimusBlock(48, 8, residual=True, norm=True)
    x = torch.randn(3, 48)
    plain = UltimusBlock(48, 8)
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("norm.")})
    h = F.layer_norm(x, (48,), block.norm.weight, block.norm.bias)
    assert_close(block(x), x + plain(h))


def test_spec_stem_and_pooling_are_affine_in_the_image():
    """Without a nonlinearity, conv-conv-conv-GAP is an affine map: X(a x1 + b x2) = a X(x1) + b X(x2) + (1-a-b) X(0)."""
    model = UltimusNet().double()
    x1, x2, zero = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64), \
        torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    a, b = 0.3, -1.7
    f = model.features
    assert_close(f(a * x1 + b * x2), a * f(x1) + b * f(x2) + (1 - a - b) * f(zero))
    relu = UltimusNet(stem_act=True).double()
    g = relu.features
    assert (g(a * x1 + b * x2) - (a * g(x1) + b * g(x2) + (1 - a - b) * g(zero))).abs().max() > 1e-3


def test_signal_vanishes_through_the_spec_blocks_but_not_with_residuals():
    """The chapter's diagnosis: at initialisation the spec's logits barely depend on the image."""
    x = torch.randn(64, 3, 32, 32)
    spread = {}
    for name in ("ultimus", "ultimus_residual"):
        torch.manual_seed(0)
        with torch.no_grad():
            spread[name] = VARIANTS[name]()(x).std(0).mean().item()  # between-image spread of the logits
    assert spread["ultimus"] < 1e-6
    assert spread["ultimus_residual"] > 1e3 * spread["ultimus"]


def test_every_variant_builds_and_train_resolves_it():
    from vitcourse.train import CONFIGS, build_model

    x = torch.randn(2, 3, 32, 32)
    for name in VARIANTS:
        model = build_ultimus(name, num_classes=7)
        assert model(x).shape == (2, 7)
        assert build_model(CONFIGS["ultimus"].replace(model=name), 10)(x).shape == (2, 10)
    assert _count(build_ultimus("ultimus_bn_relu")) == 25_882 + 2 * (16 + 32 + 48)


def test_bad_input_gives_one_clear_sentence():
    with pytest.raises(ValueError, match="expects images of shape"):
        UltimusNet()(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="unknown Ultimus variant"):
        build_ultimus("ultimus_nope")
    with pytest.raises(ValueError, match="scale must be one of"):
        UltimusBlock(scale="middle")


def test_average_colour_accuracy_finds_colour_coded_classes_and_not_random_ones():
    from vitcourse.stats import guessing_bound
    from vitcourse.ultimus import average_colour_accuracy

    g = torch.Generator().manual_seed(0)

    def images(labels, coded):
        n = len(labels)
        tint = (labels.double() / 10)[:, None] if coded else torch.rand(n, 1, generator=g, dtype=torch.float64)
        colour = torch.cat([tint, 1 - tint, torch.rand(n, 1, generator=g, dtype=torch.float64)], 1)  # (n, 3)
        return colour[:, :, None, None] + 0.02 * torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)

    train_labels, val_labels = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    # the class is the red level: ten steps of 0.1 with noise of about 0.0025 in the mean -> almost always right
    coded = average_colour_accuracy(images(train_labels, True), train_labels, images(val_labels, True), val_labels, 10)
    assert coded > 0.95
    # colours independent of the class: no better than guessing can reach by luck
    random = average_colour_accuracy(images(train_labels, False), train_labels, images(val_labels, False),
                                     val_labels, 10)
    assert random <= guessing_bound(1000, 10)
    with pytest.raises(ValueError, match="one label each"):
        average_colour_accuracy(torch.zeros(4, 3, 8, 8), torch.zeros(3, dtype=torch.long), torch.zeros(2, 3, 8, 8),
                                torch.zeros(2, dtype=torch.long), 10)
