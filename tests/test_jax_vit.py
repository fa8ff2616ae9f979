"""The pure-JAX ViT against its PyTorch twin: same weights -> same logits, gradients and optimizer steps.

The reference is always ``vitcourse.VisionTransformer`` with ``torch.optim``;
the JAX side gets the torch weights through ``from_torch``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

jax = pytest.importorskip("jax")
jnp = jax.numpy

from vitcourse import VisionTransformer, ViTConfig  # noqa: E402
from vitcourse import jax_vit as jv  # noqa: E402

# Eager JAX compiles every operation separately; jit compiles each function once.
forward_jit = jax.jit(jv.forward, static_argnames="config")
batched_forward_jit = jax.jit(jv.batched_forward, static_argnames="config")

CONFIGS = {
    "rgb-32": ViTConfig(image_size=32, patch_size=4, dim=48, depth=2, heads=4, mlp_dim=96),
    # one channel, sizes that are not powers of two, mlp_dim not a multiple of dim, odd head count
    "grey-30": ViTConfig(image_size=30, patch_size=5, in_channels=1, num_classes=7, dim=36, depth=3, heads=3,
                         mlp_dim=50),
    "patch-7": ViTConfig(image_size=21, patch_size=7, in_channels=2, num_classes=5, dim=20, depth=1, heads=5,
                         mlp_dim=33),
}
# Dropout and drop path are off in eval mode; the logits must still agree.
EVAL_ONLY = {
    "dropout": ViTConfig(image_size=24, patch_size=6, num_classes=4, dim=30, depth=2, heads=2, mlp_dim=70,
                         dropout=0.2, drop_path=0.1),
}


def _model(config: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A torch ViT with every parameter randomised well away from its initial values.

    The default initialisation leaves LayerNorms at identity, biases at zero and
    the CLS token near zero, which would hide layout mistakes in those tensors.
    """
    torch.manual_seed(seed)
    model = VisionTransformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0  # LayerNorm scales around 1
            p.copy_(base + 0.3 * torch.randn_like(p))
    return model


def _batch(config: ViTConfig, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images ``(n, C, H, W)`` and labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, config.in_channels, config.image_size, config.image_size, generator=g)
    labels = torch.randint(0, config.num_classes, (n,), generator=g)
    return images, labels


def _assert_params_equal(params, model: torch.nn.Module, skip_key_bias: bool = False, **tol) -> None:
    """Compare a JAX pytree with a torch model, tensor by tensor, in torch's layout and names.

    ``skip_key_bias`` leaves out the key third of each ``qkv`` bias. Its true gradient is
    exactly zero (adding one vector to every key adds a constant to each row of scores,
    which the softmax ignores), so both frameworks compute rounding noise there, and Adam
    divides that noise by its own size into steps of +-lr in random directions. Those
    entries cannot change any output, which the AdamW test checks on the logits.
    """
    expected = model.state_dict()
    actual = jv.to_torch(params, model.config).state_dict()
    assert actual.keys() == expected.keys()
    dim = model.config.dim
    for name in expected:
        a, e = actual[name], expected[name]
        if skip_key_bias and name.endswith("attn.qkv.bias"):
            a, e = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([e[:dim], e[2 * dim:]])
        torch.testing.assert_close(a, e, msg=lambda m, n=name: f"{n}: {m}", **tol)


@pytest.mark.parametrize("name", list(CONFIGS) + list(EVAL_ONLY))
def test_logits_match_torch(name):
    config = {**CONFIGS, **EVAL_ONLY}[name]
    model = _model(config).eval()
    images, _ = _batch(config)
    with torch.no_grad():
        expected = model(images)
    params = jv.from_torch(model)
    for batch in (images, images.numpy(), jnp.asarray(images.numpy())):  # torch, NumPy and JAX inputs
        logits = torch.from_numpy(np.array(jv.apply(params, batch, config)))
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)  # |difference| <= 1e-5, no relative slack
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero numbers


def test_forward_is_one_image_and_vmap_adds_the_batch():
    config = CONFIGS["rgb-32"]
    params = jv.from_torch(_model(config))
    images, _ = _batch(config, n=3)
    one = forward_jit(params, jnp.asarray(images[1].numpy()), config=config)
    assert one.shape == (config.num_classes,)
    batched = batched_forward_jit(params, jnp.asarray(images.numpy()), config=config)
    # a batched matmul may sum in another order than a single one: float32 rounding, not a bug
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(one), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_reproduces_the_model(name):
    config = CONFIGS[name]
    model = _model(config, seed=3).eval()
    back = jv.to_torch(jv.from_torch(model), config)
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    images, _ = _batch(config)
    with torch.no_grad():
        torch.testing.assert_close(back(images), model(images), atol=0, rtol=0)


def test_from_torch_accepts_timm():
    pytest.importorskip("timm")
    from vitcourse.timm_compat import to_timm

    config = CONFIGS["rgb-32"]
    model = _model(config).eval()
    images, _ = _batch(config)
    with torch.no_grad():
        expected = to_timm(model).eval()(images)
    logits = torch.from_numpy(np.array(jv.apply(jv.from_torch(to_timm(model)), images, config)))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_init_params_has_the_torch_shapes_and_scales():
    config = ViTConfig(image_size=32, patch_size=4, dim=64, depth=2, heads=4, mlp_dim=128)
    params = jv.init_params(jax.random.key(0), config)
    torch_model = VisionTransformer(config)
    assert jv.count_params(params) == sum(p.numel() for p in torch_model.parameters())
    jv.to_torch(params, config)  # every shape fits, or this raises
    same = jv.init_params(jax.random.key(0), config)
    other = jv.init_params(jax.random.key(1), config)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))
    assert not np.array_equal(params["pos_embed"], other["pos_embed"])
    kernel = np.asarray(params["blocks"][0]["mlp"]["fc1"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002  # trunc_normal_(std=0.02), as torch
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["head"]["bias"], 0.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
    g = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    actual = jv.cross_entropy(jnp.asarray(logits.numpy()), jnp.asarray(labels.numpy()), smoothing)
    torch.testing.assert_close(torch.tensor(float(actual)), expected)


def test_gradients_match_torch():
    config = CONFIGS["grey-30"]
    model = _model(config).train()
    images, labels = _batch(config)
    F.cross_entropy(model(images), labels).backward()
    params = jv.from_torch(model)
    grads = jax.grad(jv.loss_fn)(params, jnp.asarray(images.numpy()), jnp.asarray(labels.numpy()), config)
    expected = {name: p.grad for name, p in model.named_parameters()}
    actual = jv._state_dict(grads, config)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _torch_steps(model, optimizer, images, labels, steps, clip=None):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


def _jax_steps(params, optimizer, config, images, labels, steps, clip=None):
    step = jv.make_train_step(config, optimizer, clip_norm=clip)
    state = optimizer.init(params)
    x, y = jnp.asarray(images.numpy()), jnp.asarray(labels.numpy())
    for _ in range(steps):
        params, state, _ = step(params, state, x, y)
    return params


def test_sgd_steps_match_torch():
    """Two momentum-SGD steps (the second uses the momentum buffer) from the same weights and batch."""
    config = CONFIGS["rgb-32"]
    model = _model(config).train()
    params = jv.from_torch(model)
    images, labels = _batch(config)
    _torch_steps(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
                 images, labels, steps=2)
    updated = _jax_steps(params, jv.sgd(0.05, momentum=0.9, weight_decay=1e-3), config, images, labels, steps=2)
    _assert_params_equal(updated, model, atol=1e-5, rtol=1e-5)
    moved = jv.from_torch(model)["head"]["kernel"] - params["head"]["kernel"]
    assert float(jnp.abs(moved).max()) > 1e-3  # the step really changed the weights


def test_adamw_steps_match_torch():
    """Three AdamW steps with decay only on weight matrices and gradient clipping, against torch.optim.AdamW."""
    config = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=40)
    model = _model(config).train()
    params = jv.from_torch(model)
    images, labels = _batch(config, n=8)
    is_matrix = {name: name.endswith(".weight") and p.ndim >= 2 for name, p in model.named_parameters()}
    decay = [p for name, p in model.named_parameters() if is_matrix[name]]  # linear and conv weights
    no_decay = [p for name, p in model.named_parameters() if not is_matrix[name]]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    _torch_steps(model, torch.optim.AdamW(groups, lr=1e-3), images, labels, steps=3, clip=1.0)
    optimizer = jv.adamw(1e-3, weight_decay=0.05, mask=jv.decay_mask(params))
    updated = _jax_steps(params, optimizer, config, images, labels, steps=3, clip=1.0)
    _assert_params_equal(updated, model, skip_key_bias=True, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        expected = model.eval()(images)
    logits = torch.from_numpy(np.array(jv.apply(updated, images, config)))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_learning_rate_schedule_is_called_with_the_step_count():
    seen = []
    optimizer = jv.sgd(lambda step: seen.append(int(step)) or 0.1)
    params = {"w": jnp.ones(3)}
    state = optimizer.init(params)
    for _ in range(3):
        params, state = optimizer.update({"w": jnp.ones(3)}, state, params)
    assert seen == [0, 1, 2]
    np.testing.assert_allclose(params["w"], 1.0 - 3 * 0.1, rtol=1e-6)


def test_warmup_cosine_matches_torch_schedulers():
    warmup, total, lr = 5, 23, 0.1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    reference = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup),
    ], milestones=[warmup])
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    schedule = jv.warmup_cosine(lr, warmup, total)
    actual = [float(schedule(jnp.asarray(k))) for k in range(total)]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_dropout_needs_a_key_and_follows_it():
    config = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=40, dropout=0.3, drop_path=0.2)
    params = jv.from_torch(_model(config))
    images = jnp.asarray(_batch(config)[0].numpy())
    plain = batched_forward_jit(params, images, config=config)
    np.testing.assert_allclose(plain, jv.apply(params, images, config), atol=1e-6)  # no key: eval mode
    first = batched_forward_jit(params, images, config=config, key=jax.random.key(5))
    again = batched_forward_jit(params, images, config=config, key=jax.random.key(5))
    other = batched_forward_jit(params, images, config=config, key=jax.random.key(6))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, plain) and not np.allclose(first, other)


def test_evaluate_matches_torch_accuracy():
    config = CONFIGS["patch-7"]
    model = _model(config).eval()
    batches = [_batch(config, n=7, seed=s) for s in range(3)]
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        loss = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in batches)
    result = jv.evaluate(jv.from_torch(model), batches, config)
    assert result["count"] == 21
    assert result["accuracy"] == pytest.approx(hits / 21)
    assert result["loss"] == pytest.approx(loss / 21, rel=1e-5)


def test_bad_inputs_say_what_is_wrong():
    config = CONFIGS["rgb-32"]
    params = jv.from_torch(_model(config))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\)"):
        jv.apply(params, np.zeros((3, 32, 32), np.float32), config)
    with pytest.raises(ValueError, match="pass the config the parameters were made for"):
        jv.to_torch(params, CONFIGS["grey-30"])
    with pytest.raises(ValueError, match="config.depth"):
        jv.to_torch(params, ViTConfig(image_size=32, patch_size=4, dim=48, depth=3, heads=4, mlp_dim=96))
    with pytest.raises(ValueError, match="no batches"):
        jv.evaluate(params, [], config)


def test_import_vitcourse_does_not_import_jax():
    code = "import sys, vitcourse, vitcourse.vit; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_other_module_works_without_jax():
    """With jax made unimportable, every module but ``jax_vit`` imports, and ``jax_vit`` says what to install."""
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['jax'] = None\n"
        "import vitcourse\n"
        "names = [m.name for m in pkgutil.walk_packages(vitcourse.__path__, 'vitcourse.')]\n"
        "for name in names:\n"
        "    if name not in ('vitcourse.jax_vit', 'vitcourse.__main__'):\n"
        "        importlib.import_module(name)\n"
        "try:\n"
        "    import vitcourse.jax_vit\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    message, count = out.stdout.strip().splitlines()
    assert "jax" in message and "install" in message.lower(), message
    assert int(count) > 10


def test_the_speed_benchmark_lives_in_benchmarks_and_times_both_frameworks():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "jax_vs_torch.py"
    spec = importlib.util.spec_from_file_location("jax_vs_torch", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert not hasattr(jv, "benchmark_train_steps")  # timing is not part of the package
    config = ViTConfig(image_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16)
    result = bench.benchmark_train_steps(config, batch_size=4, rounds=2, steps=1)
    assert len(result["torch"]) == len(result["jax"]) == len(result["ratios"]) == 2
    assert all(t > 0 for t in result["torch"] + result["jax"]) and result["compile_seconds"] > 0
    assert result["median_ratio"] == pytest.approx(float(np.median(result["ratios"])))
