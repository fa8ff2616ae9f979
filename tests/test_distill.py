"""DeiT distillation: the distillation token in the course's ViT, the timm exchange, the losses.

The default (``distilled=False``) must leave the plain ViT exactly as it was: the same keys,
the same random draws under a seed, the same logits. With ``distilled=True`` the model must be
timm's ``VisionTransformerDistilled``, weight for weight and logit for logit in both modes.
The losses are checked against the formulas written out by hand, element by element.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import vitcourse.small_data
from vitcourse import VisionTransformer, ViTConfig, count_parameters
from vitcourse.distill import DistillationLoss, distillation_loss
from vitcourse.timm_compat import check_timm_model, from_timm, timm_vit, to_timm
from vitcourse.vit import expected_num_parameters, require_plain_vit

timm = pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402

SMALL = dict(image_size=16, patch_size=4, dim=24, depth=2, heads=3, mlp_dim=48, num_classes=4)
DISTILLED = ViTConfig(**SMALL, distilled=True)
X = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)


def _perturb(module: nn.Module) -> nn.Module:
    """Move every parameter off its initial value, so zero biases and unit norms cannot hide an error."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _one_sentence(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text.endswith(".")
    return text


# --------------------------------------------------------------------------- distilled=False changes nothing

PLAIN_KEYS = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + [
    f"blocks.{i}.{name}" for i in range(2) for name in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
] + ["norm.weight", "norm.bias", "head.weight", "head.bias"]
"""The state_dict keys of ``VisionTransformer(ViTConfig(**SMALL))``, in order, before ``distilled`` existed."""

SEED0_ABS_SUMS = {
    "cls_token": 2.168520061e-05, "pos_embed": 6.771051234, "patch_embed.proj.weight": 84.35970189,
    "patch_embed.proj.bias": 1.762064772, "blocks.0.attn.qkv.weight": 28.07193091,
    "blocks.0.attn.proj.weight": 9.362891304, "blocks.0.mlp.fc1.weight": 18.16255473,
    "blocks.0.mlp.fc2.weight": 18.18261863, "blocks.1.attn.qkv.weight": 27.08285627,
    "blocks.1.attn.proj.weight": 9.229205542, "blocks.1.mlp.fc1.weight": 18.33503696,
    "blocks.1.mlp.fc2.weight": 17.77555692, "head.weight": 1.614470243,
}
"""``sum(|p|)`` of each random parameter after ``torch.manual_seed(0)``, measured before ``distilled`` existed."""

SEED0_NEXT_DRAW = [-1.1945991516113281, 0.42335933446884155, 1.262365698814392]
"""``torch.randn(3)`` right after building that model: the construction made no extra random draw."""

SEED0_LOGITS = [[-0.15240639, -0.04039652, -0.05041531, -0.06867011],
                [-0.12417731, 0.00445435, -0.18068489, 0.03245538]]
"""Its eval logits on ``X`` (the same numbers tests/test_small_data.py pins)."""


@pytest.mark.parametrize("config", [ViTConfig(**SMALL), ViTConfig(**SMALL, distilled=False)],
                         ids=["without the field", "distilled=False"])
def test_the_default_keeps_keys_random_init_and_logits(config):
    torch.manual_seed(0)
    model = VisionTransformer(config)
    assert_close(torch.randn(3), torch.tensor(SEED0_NEXT_DRAW), rtol=0, atol=1e-7)
    state = model.state_dict()
    assert list(state) == PLAIN_KEYS
    assert model.dist_token is None and model.head_dist is None
    for name, expected in SEED0_ABS_SUMS.items():
        assert float(state[name].double().abs().sum()) == pytest.approx(expected, rel=1e-6), name
    with torch.no_grad():
        assert_close(model.eval()(X), torch.tensor(SEED0_LOGITS), atol=1e-6, rtol=1e-5)
    assert count_parameters(model) == expected_num_parameters(config)


def test_a_config_without_the_field_builds_the_same_bytes_as_distilled_false():
    torch.manual_seed(3)
    implicit = VisionTransformer(ViTConfig(**SMALL)).state_dict()
    torch.manual_seed(3)
    explicit = VisionTransformer(ViTConfig(**SMALL, distilled=False)).state_dict()
    assert list(implicit) == list(explicit)
    for name in implicit:
        assert torch.equal(implicit[name], explicit[name]), name


# --------------------------------------------------------------------------- the distilled model


def test_distilled_model_adds_a_token_a_position_and_a_head():
    model = VisionTransformer(DISTILLED)
    keys = list(model.state_dict())
    assert keys[:3] == ["cls_token", "dist_token", "pos_embed"]
    assert keys[-2:] == ["head_dist.weight", "head_dist.bias"]
    assert set(keys) == set(PLAIN_KEYS) | {"dist_token", "head_dist.weight", "head_dist.bias"}
    assert model.dist_token.shape == (1, 1, 24) and model.pos_embed.shape == (1, 16 + 2, 24)
    assert DISTILLED.seq_len == 18 and DISTILLED.num_prefix_tokens == 2
    assert 0.001 < float(model.dist_token.detach().std()) < 0.05  # truncated normal, std 0.02, as timm
    assert count_parameters(model) == expected_num_parameters(DISTILLED)
    assert count_parameters(model) == sum(p.numel() for p in timm_vit(DISTILLED).parameters())
    plain = count_parameters(VisionTransformer(ViTConfig(**SMALL)))
    assert count_parameters(model) - plain == 24 + 24 + (24 * 4 + 4)  # token, its position, second head


def test_token_order_is_cls_dist_patches():
    model = _perturb(VisionTransformer(DISTILLED)).eval()
    tokens = model.embed(X)
    patches = model.patch_embed(X)
    assert tokens.shape == (2, 18, 24)
    assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, 0]).expand(2, -1, -1)[:, 0])
    assert_close(tokens[:, 1], (model.dist_token + model.pos_embed[:, 1]).expand(2, -1, -1)[:, 0])
    assert_close(tokens[:, 2:], patches + model.pos_embed[:, 2:])
    assert [m.shape for m in model.attention_maps(X)] == [(2, 3, 18, 18)] * 2


def test_forward_returns_both_heads_in_training_and_their_average_otherwise():
    model = _perturb(VisionTransformer(DISTILLED))
    assert model.distilled_training  # built to be trained with a teacher
    features = model.eval().forward_features(X)
    cls_logits, dist_logits = model.head(features[:, 0]), model.head_dist(features[:, 1])
    assert_close(model(X), (cls_logits + dist_logits) / 2)
    out = model.train()(X)  # no dropout: training mode computes the same numbers
    assert isinstance(out, tuple) and len(out) == 2
    assert_close(out[0], cls_logits) and assert_close(out[1], dist_logits)
    model.set_distilled_training(False)  # fine-tuning without a teacher: the average, as timm
    assert_close(model(X), (cls_logits + dist_logits) / 2)
    with pytest.raises(ValueError, match="no distillation token") as err:
        VisionTransformer(ViTConfig(**SMALL)).set_distilled_training(True)
    _one_sentence(err)


@pytest.mark.parametrize("options", [dict(stem="spt"), dict(stem="conv", lsa=True)])
def test_distillation_combines_with_the_small_data_options(options):
    cfg = ViTConfig(**SMALL, **options, distilled=True)
    model = VisionTransformer(cfg)
    cls_logits, dist_logits = model(X)
    assert cls_logits.shape == dist_logits.shape == (2, 4)
    assert model.eval()(X).shape == (2, 4)
    assert count_parameters(model) == expected_num_parameters(cfg)


def test_config_refuses_a_non_boolean_distilled():
    with pytest.raises(ValueError, match="ViTConfig.distilled must be True or False, got 'yes'.") as err:
        ViTConfig(**SMALL, distilled="yes")
    _one_sentence(err)


# --------------------------------------------------------------------------- require_plain_vit


def test_require_plain_vit_lives_in_vit_and_covers_distillation():
    assert not hasattr(vitcourse.small_data, "require_plain_vit")
    assert "require_plain_vit" not in vitcourse.small_data.__all__
    require_plain_vit(ViTConfig(**SMALL), "anything")  # the plain ViT passes
    require_plain_vit(DISTILLED, "timm", distilled_ok=True)
    with pytest.raises(ValueError, match="consumer has no .*distillation token, so it cannot take a ViTConfig with "
                                         "distilled=True; use stem='patch', lsa=False and distilled=False.") as err:
        require_plain_vit(DISTILLED, "consumer")
    _one_sentence(err)
    with pytest.raises(ValueError, match="timm has no .* locality self-attention, so .* lsa=True; use") as err:
        require_plain_vit(ViTConfig(**SMALL, lsa=True, distilled=True), "timm", distilled_ok=True)
    assert "distill" not in _one_sentence(err)


def test_jax_port_refuses_a_distilled_config():
    jax = pytest.importorskip("jax")
    from vitcourse import jax_vit

    plain = jax_vit.init_params(jax.random.key(0), ViTConfig(**SMALL))
    calls = [lambda: jax_vit.init_params(jax.random.key(0), DISTILLED),
             lambda: jax_vit.from_torch(VisionTransformer(DISTILLED)), lambda: jax_vit.to_torch(plain, DISTILLED),
             lambda: jax_vit.apply(plain, torch.zeros(1, 3, 16, 16), DISTILLED)]
    for call in calls:
        with pytest.raises(ValueError, match="vitcourse.jax_vit has no .*distillation token.*distilled=True") as err:
            call()
        _one_sentence(err)


# --------------------------------------------------------------------------- the timm exchange

TIMM_MODELS = {
    # name: (how to build the timm model, the ViTConfig it corresponds to)
    "deit_tiny_distilled_patch16_224": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False),
        ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3, mlp_dim=768,
                  distilled=True)),
    "create_model at another size": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                  num_classes=7, depth=3),
        ViTConfig(image_size=32, patch_size=8, num_classes=7, dim=192, depth=3, heads=3, mlp_dim=768, distilled=True)),
    "built directly": (
        lambda: VisionTransformerDistilled(img_size=21, patch_size=7, in_chans=1, num_classes=3, embed_dim=30,
                                           depth=2, num_heads=5, mlp_ratio=2.0),
        ViTConfig(image_size=21, patch_size=7, in_channels=1, num_classes=3, dim=30, depth=2, heads=5, mlp_dim=60,
                  distilled=True)),
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_distilled_models_load_with_equal_logits_in_both_modes(name):
    build, cfg = TIMM_MODELS[name]
    torch.manual_seed(1)
    theirs = _perturb(build()).eval()
    ours = from_timm(theirs, cfg)
    assert not ours.training and ours.distilled_training is False  # timm's flag came along
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)  # eval: the average of the two heads
        theirs.train().set_distilled_training(True)
        ours.train().set_distilled_training(True)
        (cls_ours, dist_ours), (cls_theirs, dist_theirs) = ours(x), theirs(x)
    assert_close(cls_ours, cls_theirs, atol=1e-5, rtol=1e-5)
    assert_close(dist_ours, dist_theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cls_ours, dist_ours)  # two different heads on two different tokens


@pytest.mark.parametrize("distilled_training", [True, False])
def test_course_distilled_model_goes_to_timm_with_equal_logits(distilled_training):
    torch.manual_seed(2)
    ours = _perturb(VisionTransformer(DISTILLED))
    ours.set_distilled_training(distilled_training)
    theirs = to_timm(ours.train())
    assert type(theirs) is VisionTransformerDistilled and theirs.training
    assert theirs.distilled_training is distilled_training
    with torch.no_grad():
        train_ours, train_theirs = ours(X), theirs(X)
        if distilled_training:
            assert_close(train_ours[0], train_theirs[0], atol=1e-5, rtol=1e-5)
            assert_close(train_ours[1], train_theirs[1], atol=1e-5, rtol=1e-5)
        else:
            assert_close(train_ours, train_theirs, atol=1e-5, rtol=1e-5)
        assert_close(ours.eval()(X), theirs.eval()(X), atol=1e-5, rtol=1e-5)
    back = from_timm(theirs, DISTILLED)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    check_timm_model(timm_vit(DISTILLED), DISTILLED)  # what timm_vit builds, the check accepts


def test_plain_and_distilled_are_never_exchanged_for_each_other():
    plain = ViTConfig(**SMALL)
    cases = [
        (lambda: from_timm(timm_vit(DISTILLED), plain), "is a VisionTransformerDistilled.*pass distilled=True"),
        (lambda: check_timm_model(timm_vit(DISTILLED), plain), "pass distilled=True"),
        (lambda: from_timm(timm_vit(plain), DISTILLED), "plain VisionTransformer without a distillation token.*"
                                                        "pass distilled=False"),
        (lambda: check_timm_model(timm_vit(plain), DISTILLED), "without a distillation token"),
        (lambda: from_timm(VisionTransformer(DISTILLED), DISTILLED), "needs a timm.models.deit."
                                                                     "VisionTransformerDistilled"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        _one_sentence(err)
    assert type(timm_vit(plain)) is not VisionTransformerDistilled  # a plain config stays plain


@pytest.mark.parametrize("settings, named", [
    (dict(no_embed_class=True), "no_embed_class=True"),  # DeiT III's layout
    (dict(drop_rate=0.1), "before the head (drop_rate)"),  # timm drops both tokens' features before the heads
    (dict(num_heads=2), "2 attention heads"),
])
def test_distilled_timm_settings_vitcourse_does_not_compute_are_refused(settings, named):
    size = dict(img_size=16, patch_size=4, num_classes=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0)
    theirs = VisionTransformerDistilled(**{**size, **settings})
    with pytest.raises(ValueError) as err:
        from_timm(theirs, DISTILLED)
    assert named in _one_sentence(err)


def test_a_distilled_timm_model_without_a_linear_second_head_is_refused():
    theirs = timm_vit(DISTILLED)
    theirs.head_dist = nn.Identity()
    with pytest.raises(ValueError, match="head_dist") as err:
        check_timm_model(theirs, DISTILLED)
    _one_sentence(err)


# --------------------------------------------------------------------------- the losses, by hand


def _log_softmax_by_hand(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_total for v in row]


def _cross_entropy_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of ``-sum_k q_k log p_k``; ``targets`` are indices or probability rows."""
    total = 0.0
    for i, row in enumerate(logits.tolist()):
        log_p = _log_softmax_by_hand(row)
        if targets.ndim == 1:
            total += -log_p[int(targets[i])]
        else:
            total += -sum(q * lp for q, lp in zip(targets[i].tolist(), log_p))
    return total / logits.shape[0]


def _soft_term_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    """``tau**2 / (B*K) * sum_i sum_k p_t (log p_t - log p_s)`` with both softmaxes at temperature tau."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        log_s = _log_softmax_by_hand([v / tau for v in s_row])
        log_t = _log_softmax_by_hand([v / tau for v in t_row])
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t))
    return total * tau**2 / student.numel()


def _logits(seed: int, shape=(5, 4)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cls_logits, dist_logits, teacher = (3 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    labels = torch.randint(0, shape[1], (shape[0],), generator=g)
    return cls_logits, dist_logits, teacher, labels


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_hard_distillation_equals_the_hand_computation(alpha):
    cls_logits, dist_logits, teacher, labels = _logits(0)
    teacher_top = torch.tensor([max(range(4), key=lambda k: row[k]) for row in teacher.tolist()])
    expected = (1 - alpha) * _cross_entropy_by_hand(cls_logits, labels) + alpha * _cross_entropy_by_hand(
        dist_logits, teacher_top)
    got = distillation_loss(cls_logits, dist_logits, labels, teacher, kind="hard", alpha=alpha, tau=7.0)
    assert float(got) == pytest.approx(expected, rel=1e-10)  # tau does not enter the hard variant


def test_hard_distillation_with_the_default_weights_is_half_and_half():
    cls_logits, dist_logits, teacher, labels = _logits(1)
    half = 0.5 * _cross_entropy_by_hand(cls_logits, labels) + 0.5 * _cross_entropy_by_hand(
        dist_logits, teacher.argmax(dim=1))
    assert float(distillation_loss(cls_logits, dist_logits, labels, teacher)) == pytest.approx(half, rel=1e-10)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_soft_distillation_equals_the_hand_computation(tau, alpha):
    cls_logits, dist_logits, teacher, labels = _logits(2)
    expected = (1 - alpha) * _cross_entropy_by_hand(cls_logits, labels) + alpha * _soft_term_by_hand(
        dist_logits, teacher, tau)
    got = distillation_loss(cls_logits, dist_logits, labels, teacher, kind="soft", alpha=alpha, tau=tau)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_soft_term_vanishes_when_student_matches_teacher():
    cls_logits, _, teacher, labels = _logits(3)
    got = distillation_loss(cls_logits, teacher.clone(), labels, teacher, kind="soft", alpha=1.0, tau=2.0)
    assert float(got) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_probability_labels_from_mixup_are_accepted(kind):
    cls_logits, dist_logits, teacher, labels = _logits(4)
    g = torch.Generator().manual_seed(5)
    other = torch.randint(0, 4, (5,), generator=g)
    lam = 0.7
    mixed = lam * nn.functional.one_hot(labels, 4).double() + (1 - lam) * nn.functional.one_hot(other, 4).double()
    distill = (_cross_entropy_by_hand(dist_logits, teacher.argmax(dim=1)) if kind == "hard"
               else _soft_term_by_hand(dist_logits, teacher, 2.0))
    expected = 0.5 * _cross_entropy_by_hand(cls_logits, mixed) + 0.5 * distill
    got = distillation_loss(cls_logits, dist_logits, mixed, teacher, kind=kind, tau=2.0)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    one_hot = nn.functional.one_hot(labels, 4).double()  # a one-hot row is the same as its index
    assert_close(distillation_loss(cls_logits, dist_logits, one_hot, teacher, kind=kind),
                 distillation_loss(cls_logits, dist_logits, labels, teacher, kind=kind))


def test_the_teacher_gets_no_gradient_and_alpha_routes_the_heads():
    cls_logits, dist_logits, teacher, labels = (t.requires_grad_(t.is_floating_point()) for t in _logits(6))
    distillation_loss(cls_logits, dist_logits, labels, teacher, kind="soft", alpha=1.0).backward()
    assert teacher.grad is None
    assert cls_logits.grad is None or not cls_logits.grad.any()  # alpha = 1: the labels do not count
    assert dist_logits.grad.abs().sum() > 0


BAD_INPUTS = [
    (dict(kind="medium"), "kind must be one of 'hard', 'soft', got 'medium'."),
    (dict(alpha=1.5), "alpha weighs the distillation term against the label term and must be in [0, 1], got 1.5."),
    (dict(alpha=-0.1), "must be in [0, 1], got -0.1."),
    (dict(tau=0.0), "the temperature tau must be a positive number, got 0.0."),
    (dict(tau=-1.0), "the temperature tau must be a positive number"),
    (dict(tau=float("inf")), "the temperature tau must be a positive number"),
    (dict(dist_logits=torch.zeros(5, 3)), "dist_logits has shape (5, 3) but cls_logits has (5, 4)"),
    (dict(teacher_logits=torch.zeros(4, 4)), "teacher_logits has shape (4, 4) but cls_logits has (5, 4)"),
    (dict(cls_logits=torch.zeros(5, 4, 1)), "cls_logits must have shape (B, num_classes), got (5, 4, 1)."),
    (dict(labels=torch.zeros(4, dtype=torch.long)), "labels must be class indices of shape (5,) or probabilities"),
    (dict(labels=torch.zeros(5)), "labels of shape (B,) must be integer class indices"),
    (dict(labels=torch.full((5,), 4)), "class indices must lie in [0, 3], got labels from 4 to 4."),
    (dict(labels=torch.zeros(5, 3)), "probabilities of shape (5, 4), got a torch.float32 tensor of shape (5, 3)."),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_inputs_are_refused_in_one_sentence(change, message):
    args = dict(cls_logits=torch.zeros(5, 4), dist_logits=torch.zeros(5, 4), labels=torch.zeros(5, dtype=torch.long),
                teacher_logits=torch.zeros(5, 4))
    args.update(change)
    with pytest.raises(ValueError) as err:
        distillation_loss(**args)
    assert message in _one_sentence(err)


def test_distillation_loss_module_asks_the_teacher_and_trains_a_distilled_vit():
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    student = VisionTransformer(DISTILLED).train()
    criterion = DistillationLoss(teacher, kind="soft", alpha=0.5, tau=2.0)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    outputs = student(images)
    with torch.no_grad():
        expected = distillation_loss(*outputs, labels, teacher(images), kind="soft", alpha=0.5, tau=2.0)
    loss = criterion(images, outputs, labels)
    assert_close(loss, expected)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    first = float(loss.detach())
    for _ in range(15):
        loss = criterion(images, student(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < first
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never learns
    with pytest.raises(ValueError, match="pair \\(cls_logits, dist_logits\\)") as err:
        criterion(images, student.eval()(images), labels)
    _one_sentence(err)
    with pytest.raises(ValueError, match="kind must be one of"):
        DistillationLoss(teacher, kind="none")
