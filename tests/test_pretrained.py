"""Chapter 8's pieces: loading a timm checkpoint file into vitcourse, resizing positions, fine-tuning helpers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vitcourse import VisionTransformer, ViTConfig, pretrained, transfer
from vitcourse.pretrained import adapt, config_from_timm, load_timm, resize_pos_embed
from vitcourse.timm_compat import from_timm
from vitcourse.transfer import fit, freeze_all_but_head, make_photo_folder, param_groups

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

NAME = "vit_tiny_patch16_224"
SMALL = ViTConfig(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def timm_tiny_file(tmp_path_factory):
    """A randomly initialised timm ViT-Ti/16 and its weights saved as a local safetensors file."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_local_checkpoint_file_loads_into_vitcourse_with_timms_logits(timm_tiny_file, monkeypatch):
    reference, path = timm_tiny_file
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")  # a local file needs no download, offline or not
    checkpoint = load_timm(NAME, file=path, fallback=False)
    assert checkpoint.pretrained and checkpoint.reason is None
    config = config_from_timm(checkpoint.model)
    assert config == ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3,
                               mlp_dim=768)
    ours = from_timm(checkpoint.model, config).eval()
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
        assert_close(checkpoint.model(images), expected, rtol=0, atol=0)  # the file held these weights
        assert_close(ours(images), expected, rtol=0, atol=1e-5)


def test_offline_falls_back_to_seeded_random_weights_and_says_why(monkeypatch):
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=5.0: pytest.fail("must not contact the hub"))
    first, second = load_timm(NAME, seed=3), load_timm(NAME, seed=3)
    assert not first.pretrained and "VITCOURSE_OFFLINE" in first.reason
    assert first.model.pretrained_cfg["input_size"] == (3, 224, 224)  # preprocessing is still known
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="VITCOURSE_OFFLINE"):
        load_timm(NAME, fallback=False)


def test_unreachable_hub_falls_back_without_trying_to_download(monkeypatch):
    monkeypatch.delenv("VITCOURSE_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=5.0: False)
    checkpoint = load_timm(NAME)
    assert not checkpoint.pretrained and "cannot be reached" in checkpoint.reason


def test_hub_probe_trusts_a_proxy_and_reports_a_failed_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(pretrained.socket, "create_connection", refuse)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert pretrained._hub_reachable(timeout=0.1) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert pretrained._hub_reachable(timeout=0.1) is True


def test_resize_pos_embed_is_identity_at_the_same_grid_and_keeps_cls():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_pos_embed(pos, 14, 14) is pos
    bigger = resize_pos_embed(pos, 14, (18, 20))
    assert bigger.shape == (1, 1 + 18 * 20, 8)
    assert torch.equal(bigger[:, 0], pos[:, 0])
    # a grid that is constant along the rows stays constant along the rows
    ramp = torch.arange(14.0).repeat_interleave(14).reshape(1, 196, 1)
    resized = resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), ramp], 1), 14, 7)[0, 1:, 0].reshape(7, 7)
    assert_close(resized, resized[:, :1].expand(7, 7))
    with pytest.raises(ValueError, match="not"):
        resize_pos_embed(pos, 13, 14)


@pytest.mark.parametrize("new", [7, 18, (12, 16)])
def test_resize_pos_embed_matches_timm(new):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 14 * 14, 16)
    size = [new, new] if isinstance(new, int) else list(new)
    assert_close(resize_pos_embed(pos, 14, new), resample_abs_pos_embed(pos, size, old_size=[14, 14]))


def test_adapt_changes_size_and_head_and_keeps_the_rest():
    model = VisionTransformer(SMALL).eval()
    new = adapt(model, image_size=48, num_classes=3)
    assert new.config.image_size == 48 and new.config.num_classes == 3 and new.config.dim == SMALL.dim
    assert new.pos_embed.shape == (1, 1 + 6 * 6, SMALL.dim)
    assert torch.equal(new.head.weight, torch.zeros(3, SMALL.dim)) and not new.training
    assert torch.equal(new.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    assert new(torch.rand(2, 3, 48, 48)).shape == (2, 3)
    same = adapt(model)  # nothing changed: the same logits
    images = torch.rand(2, 3, 32, 32)
    assert_close(same(images), model(images))


def _decayed_by_module_type(model) -> set[str]:
    """An independent enumeration of what weight decay should touch: the weights of Linear and Conv layers."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def _names(model, params) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("build", [lambda: VisionTransformer(SMALL),
                                   lambda: __import__("vitcourse.cnn", fromlist=["SmallCNN"]).SmallCNN(5, width=8)])
def test_one_weight_decay_rule_matrices_and_kernels_only(build):
    from vitcourse import optim

    model = build()
    decay, no_decay = optim.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and "lr" not in decay
    expected = _decayed_by_module_type(model)
    assert _names(model, decay["params"]) == expected
    assert _names(model, no_decay["params"]) == {n for n, _ in model.named_parameters()} - expected
    if isinstance(model, VisionTransformer):  # never the CLS token, positions, norms or biases
        assert {"cls_token", "pos_embed", "norm.weight", "head.bias"} <= _names(model, no_decay["params"])


def test_head_and_body_groups_and_the_chapter_8_wrapper():
    from vitcourse import optim

    model = VisionTransformer(SMALL)
    groups = optim.param_groups(model, 0.1, lr=1e-3, body_lr=1e-5)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("head", 1e-3, 0.1), ("head", 1e-3, 0.0), ("body", 1e-5, 0.1), ("body", 1e-5, 0.0)]
    assert _names(model, groups[0]["params"]) == {"head.weight"}
    assert _names(model, groups[1]["params"]) == {"head.bias"}
    assert _names(model, groups[2]["params"]) == _decayed_by_module_type(model) - {"head.weight"}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())

    wrapped = param_groups(model, body_lr=1e-5, head_lr=1e-3, weight_decay=0.1)  # pretrained.param_groups
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in wrapped] == [
        (g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups]
    assert freeze_all_but_head(model) == ["head.weight", "head.bias"]
    frozen = param_groups(model, 1e-5, 1e-3)  # the body's groups are empty and left out
    assert [(g["name"], _names(model, g["params"])) for g in frozen] == [("head", {"head.weight"}),
                                                                          ("head", {"head.bias"})]
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    optimizer = torch.optim.AdamW(frozen)
    data = (torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,)))
    history = fit(model, optimizer, data, data, steps=3, batch_size=4, eval_every=2)
    assert [h["step"] for h in history] == [2, 3]
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_zero_head_step_moves_only_decayed_body_tensors():
    """The chapter's exercise: no gradient reaches the body, but AdamW's decoupled decay still shrinks its matrices."""
    model = adapt(VisionTransformer(SMALL), num_classes=3).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 1e-2, 0.1
    optimizer = torch.optim.AdamW(param_groups(model, body_lr=lr, head_lr=lr, weight_decay=wd))
    torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    matrices = _decayed_by_module_type(model)
    for name, p in model.named_parameters():
        if name.startswith("head."):
            continue
        assert torch.equal(p.grad, torch.zeros_like(p))
        if name in matrices:
            assert_close(p.detach(), before[name] * (1 - lr * wd), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_warmup_cosine_schedule_and_fit_follow_it():
    factor = transfer.warmup_cosine(10, 3)
    values = [factor(t) for t in range(10)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    expected = [0.5 * (1 + torch.cos(torch.tensor(torch.pi * k / 8)).item()) for k in range(1, 8)]
    assert values[3:] == pytest.approx(expected, abs=1e-6)
    assert all(a >= b for a, b in zip(values[2:], values[3:])) and 0 < values[-1] < 0.1
    assert [transfer.warmup_cosine(4, 0)(t) for t in range(4)][0] < 1.0
    with pytest.raises(ValueError):
        transfer.warmup_cosine(5, 6)

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    history = fit(model, optimizer, data, None, steps=10, batch_size=4, eval_every=5, warmup_steps=3)
    assert [set(h) for h in history] == [{"step", "train_loss"}] * 2  # no validation asked for
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * factor(10))  # the scheduler stepped 10 times


def test_accuracy_counts_top_classes_in_batches():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x  # the inputs are the logits

    logits = torch.randn(37, 4)
    labels = torch.randint(0, 4, (37,))
    expected = sum(int(logits[i].argmax()) == int(labels[i]) for i in range(37)) / 37
    assert transfer.accuracy(Fixed(), logits, labels, batch_size=5) == pytest.approx(expected)


def test_synthetic_task_draws_independent_normalised_splits():
    from vitcourse.data import make_synthetic

    task = transfer.synthetic_task(20, 10, 12, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), seed=0)
    assert {k: (tuple(x.shape), tuple(y.shape)) for k, (x, y) in task.items()} == {
        "train": ((20, 3, 32, 32), (20,)), "val": ((10, 3, 32, 32), (10,)), "test": ((12, 3, 32, 32), (12,))}
    images, labels = make_synthetic(20, seed=1000, image_size=32)  # the training split, by hand
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert_close(task["train"][0] * torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
                 + torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), pixels, rtol=0, atol=1e-5)
    assert torch.equal(task["train"][1], torch.from_numpy(labels))
    flat = {k: x.flatten(1) for k, (x, _) in task.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):  # no image is in two splits
        assert torch.cdist(flat[a], flat[b]).min() > 0
    again = transfer.synthetic_task(20, 10, 12, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), seed=0)
    assert all(torch.equal(task[k][0], again[k][0]) for k in task)


def _separable_task(seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=generator) * 3

    def draw(n):
        y = torch.arange(n) % 3
        return centres[y] + torch.randn(n, 8, generator=generator), y

    return {"train": draw(60), "val": draw(30), "test": draw(30)}


def _zero_linear(seed):
    layer = torch.nn.Linear(8, 3)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    return layer


def test_search_picks_the_rate_that_learns_and_repeats_the_seeds():
    task = _separable_task()
    run = transfer.search_and_repeat("probe", _zero_linear, task, (0.0, 1e-1), (0, 1, 2), steps=20,
                                       batch_size=10, warmup_steps=2)
    assert run.lr == 1e-1 and run.lrs == (0.0, 1e-1) and len(run.search_val) == 2
    assert run.search_val[1] > 0.9 and run.search_val[0] == pytest.approx(1 / 3)  # zero head: one class for all
    assert run.seeds == (0, 1, 2) and len(run.test_accs) == 3 and all(a > 0.9 for a in run.test_accs)
    assert [len(losses) for losses in run.losses] == [20, 20, 20] and run.val_accs[0] == run.search_val[1]
    tie = transfer.search_and_repeat("probe", _zero_linear, task, (0.2, 0.1), (0,), steps=20, batch_size=10,
                                       warmup_steps=2)
    assert tie.search_val == (1.0, 1.0) and tie.lr == 0.1  # equal validation accuracy: the smaller rate
    with pytest.raises(ValueError):
        transfer.search_and_repeat("probe", _zero_linear, task, (), (0,), steps=5, batch_size=10, warmup_steps=1)


def _run(name, accs):
    return transfer.SettingRun(name, (1e-3,), (0.5,), 1e-3, tuple(range(len(accs))), tuple(accs), tuple(accs),
                                 ((1.0,),) * len(accs), 0.0)


def test_compare_settings_uses_the_seed_aware_rule():
    from vitcourse import stats

    labels = torch.arange(400) % 10
    runs = {"linear probe": _run("linear probe", [0.12, 0.13, 0.11]),
            "fine-tuning": _run("fine-tuning", [0.60, 0.62, 0.58]),
            "from scratch": _run("from scratch", [0.59, 0.63, 0.57])}
    result = transfer.compare_settings(runs, labels, 10)
    probe = stats.seed_estimate([0.12, 0.13, 0.11], 400)
    finetune = stats.seed_estimate([0.60, 0.62, 0.58], 400)
    scratch = stats.seed_estimate([0.59, 0.63, 0.57], 400)
    assert result["verdicts"] == {"finetune_vs_scratch": stats.compare(finetune, scratch),
                                  "probe_vs_scratch": stats.compare(probe, scratch),
                                  "finetune_vs_probe": stats.compare(finetune, probe)}
    assert result["verdicts"] == {"finetune_vs_scratch": "noise", "probe_vs_scratch": "lower",
                                  "finetune_vs_probe": "higher"}
    assert result["floors"]["finetune_vs_scratch"] == pytest.approx(stats.noise_floor(finetune, scratch))
    assert result["chance"] == pytest.approx(stats.chance_level(labels.tolist(), 10))
    assert result["probe_above_chance"] is (probe.mean > result["chance"])
    runs["linear probe"] = _run("linear probe", [0.30, 0.31, 0.29])
    assert transfer.compare_settings(runs, labels, 10)["probe_above_chance"] is True


VERDICTS = ("higher", "noise", "lower")


@pytest.mark.parametrize("pretrained_weights", [True, False])
@pytest.mark.parametrize("pair", list(transfer.PAIRS))
@pytest.mark.parametrize("verdict", VERDICTS)
@pytest.mark.parametrize("above", [True, False])
def test_comparison_text_every_branch(pretrained_weights, pair, verdict, above):
    verdicts = {p: "noise" for p in transfer.PAIRS}
    verdicts[pair] = verdict
    text = transfer.comparison_text(pretrained_weights, verdicts, above)
    assert transfer._PAIR_TEXT[(pretrained_weights, pair, verdict)] in text
    assert transfer._CHANCE_TEXT[(pretrained_weights, above)] in text
    if not pretrained_weights:  # random weights: nothing is credited to learned or ImageNet features
        assert "ImageNet" not in text and "pretrained weights bought" not in text and "random" in text
    if pair == "finetune_vs_scratch" and verdict == "noise" and not pretrained_weights:
        assert "without pretrained weights, fine-tuning buys nothing" in text
    if pair == "finetune_vs_scratch" and verdict == "higher":
        assert ("what the pretrained weights bought" in text) == pretrained_weights
    word = {"higher": "above", "lower": "below"}.get(verdict)
    if word:
        assert word in transfer._PAIR_TEXT[(pretrained_weights, pair, verdict)]


def test_comparison_text_needs_every_verdict():
    with pytest.raises(ValueError, match="finetune_vs_probe"):
        transfer.comparison_text(False, {"finetune_vs_scratch": "noise", "probe_vs_scratch": "noise"}, True)


def test_photo_folder_is_an_image_folder_and_reproducible(tmp_path):
    from torchvision.datasets import ImageFolder

    a = make_photo_folder(tmp_path / "a", per_class=2, size=24, seed=1)
    b = make_photo_folder(tmp_path / "b", per_class=2, size=24, seed=1)
    dataset = ImageFolder(str(a))
    assert dataset.classes == sorted(transfer.PHOTOS) and len(dataset) == 8
    assert dataset[0][0].size == (24, 24)
    assert (a / "rocket" / "001.png").read_bytes() == (b / "rocket" / "001.png").read_bytes()
