"""``vitcourse train --init timm:NAME``: a training run that starts from a timm checkpoint file.

The checkpoint is a randomly initialised timm ViT-Ti/16 saved as a local safetensors file (the
format ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` loads), so nothing is
downloaded. Runs are a few steps on a tiny image folder of 32-pixel images (a 2 x 2 patch grid).
"""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_errors import assert_one_sentence, vitcourse
from torch.testing import assert_close

from vitcourse import ViTConfig, pretrained
from vitcourse.checkpoint import load_checkpoint
from vitcourse.evaluate import load_trained
from vitcourse.pretrained import with_init
from vitcourse.train import BEST_FILE, CONFIGS, LAST_FILE, ConfigMismatch, build_data, build_model, fingerprint, train

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

NAME = "vit_tiny_patch16_224"
INIT = f"timm:{NAME}"


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """The weights of a randomly initialised timm ViT-Ti/16 (224 px, 1000 classes) and their safetensors file."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, pretrained=False)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("timm") / "vit_tiny.safetensors"
    safetensors_torch.save_file(weights, str(path))
    return weights, path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of 3 classes x 8 random 32-pixel images: 18 train, 3 val, 3 test."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("ants", "bees", "wasps"):
        (root / name).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")  # a local file needs no download


def config(folder, path, **changes):
    base = CONFIGS["quick"].replace(name="init", data=str(folder), allow_synthetic=False, augment="none", epochs=1,
                                    batch_size=6, warmup_epochs=0.0, max_steps=2, label_smoothing=0.0)
    return with_init(base, INIT, path).replace(**changes)


def spy_on_init(monkeypatch) -> list[dict]:
    """Record the model's weights right after ``init_from_timm`` loaded them (once per call)."""
    seen, real = [], pretrained.init_from_timm

    def spy(model, cfg):
        line = real(model, cfg)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return line

    monkeypatch.setattr(pretrained, "init_from_timm", spy)
    return seen


def assert_starts_from_file(weights: dict, file_weights: dict, num_classes: int) -> None:
    """Every body weight is the file's; positions are the file's 14 x 14 grid resized (by timm) to 2 x 2; the head is 0."""
    from timm.layers import resample_abs_pos_embed

    body = [k for k in file_weights if k != "pos_embed" and not k.startswith("head.")]
    assert sorted(weights) == sorted(file_weights)
    for key in body:
        assert_close(weights[key], file_weights[key], rtol=0, atol=0, msg=key)
    expected_pos = resample_abs_pos_embed(file_weights["pos_embed"], [2, 2], old_size=[14, 14])
    assert_close(weights["pos_embed"], expected_pos)
    assert_close(weights["head.weight"], torch.zeros(num_classes, 192), rtol=0, atol=0)
    assert_close(weights["head.bias"], torch.zeros(num_classes), rtol=0, atol=0)


def test_config_takes_the_checkpoint_architecture_at_the_data_resolution(folder, timm_file):
    _, path = timm_file
    cfg = config(folder, path)
    assert cfg.vit == ViTConfig(image_size=32, patch_size=16, num_classes=CONFIGS["quick"].vit.num_classes, dim=192,
                                depth=12, heads=3, mlp_dim=768)
    assert (cfg.init, cfg.init_file, cfg.image_size) == (INIT, str(path), 32)
    assert with_init(cfg, INIT, path, image_size=64).vit.image_size == 64
    # init and its file are part of the run's identity; a config without them hashes as before they existed
    plain = cfg.replace(init=None, init_file=None)
    assert len({fingerprint(cfg), fingerprint(plain), fingerprint(cfg.replace(init_file="other.safetensors")),
                fingerprint(cfg.replace(body_lr_scale=0.1))}) == 4
    spt = CONFIGS["quick"].replace(vit=dataclasses.replace(CONFIGS["quick"].vit, stem="spt"))
    assert fingerprint(spt) != fingerprint(CONFIGS["quick"])
    for bad, needle in ((f"{NAME}", "timm:NAME"), ("timm:", "timm:NAME"), ("timm:no_such_vit_at_all", "no model"),
                        ("timm:resnet18", "not a ViT"),
                        (f"timm:{NAME}.augreg_in21k_ft_in1kk", "no weights tagged 'augreg_in21k_ft_in1kk'")):
        with pytest.raises(ValueError, match=needle):
            with_init(CONFIGS["quick"], bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        with_init(CONFIGS["quick"], INIT, image_size=40)


def test_images_follow_the_checkpoint_statistics(folder, timm_file):
    cfg = config(folder, timm_file[1])
    renormed = build_data(cfg)  # the statistics are settled before the data is built: no second pass
    plain = build_data(cfg.replace(init=None, init_file=None))
    mean, std = pretrained.init_statistics(cfg.init)
    assert (mean, std) == (tuple(timm.models.get_pretrained_cfg(NAME).mean), tuple(timm.models.get_pretrained_cfg(NAME).std))
    assert (renormed.mean, renormed.std) == (mean, std) and renormed.split == plain.split
    assert (plain.mean, plain.std) != (mean, std)
    relative = renormed.split["test"][0]
    pixels = torch.from_numpy(np.asarray(Image.open(folder / relative).convert("RGB")).copy()).permute(2, 0, 1)
    expected = (pixels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert_close(renormed.test[0][0], expected, rtol=0, atol=1e-5)
    assert renormed.test[0][1] == plain.test[0][1]


def test_run_starts_from_the_file_trains_and_checkpoints_load(folder, timm_file, tmp_path, monkeypatch):
    file_weights, path = timm_file
    seen = spy_on_init(monkeypatch)
    cfg = config(folder, path, body_lr_scale=0.0)  # only the new head learns
    rows = train(cfg, tmp_path / "run", progress=False)
    assert len(seen) == 1 and rows[-1]["step"] == 2
    assert_starts_from_file(seen[0], file_weights, num_classes=3)

    last = load_checkpoint(tmp_path / "run" / LAST_FILE)
    assert last["mean"] == [0.5, 0.5, 0.5] and last["config"]["init"] == INIT
    for key, value in seen[0].items():  # body lr 0: the body is the file's still; the head moved
        if key.startswith("head."):
            assert not torch.equal(last["model"][key], value), key
        else:
            assert_close(last["model"][key], value, rtol=0, atol=0, msg=key)

    # the checkpoint rebuilds without timm's weights (no download, no file)
    monkeypatch.setattr(pretrained, "load_timm", lambda *a, **k: pytest.fail("load_trained must not load timm"))
    model, loaded_cfg, _ = load_trained(tmp_path / "run" / BEST_FILE)
    assert loaded_cfg == cfg and model.config == dataclasses.replace(cfg.vit, num_classes=3)
    for key, value in load_checkpoint(tmp_path / "run" / BEST_FILE)["model"].items():
        assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_body_lr_scale_sets_the_body_learning_rate(folder, timm_file):
    from vitcourse.train import build_optimizer

    cfg = config(folder, timm_file[1], body_lr_scale=0.1)
    model = build_model(cfg, 3)
    groups = build_optimizer(cfg, model).param_groups
    head = {id(p) for p in model.head.parameters()}
    for group in groups:
        is_head = {id(p) in head for p in group["params"]}
        assert len(is_head) == 1  # a group is all head or all body
        assert group["lr"] == pytest.approx(cfg.lr * (1.0 if is_head == {True} else 0.1))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    onecycle = cfg.replace(schedule="onecycle", max_lr=0.02)
    from vitcourse.train import build_scheduler

    optimizer = build_optimizer(onecycle, model)
    build_scheduler(onecycle, optimizer, total_steps=10, steps_per_epoch=10)
    assert [g["max_lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.02, 0.002, 0.002])


def test_resume_continues_without_reloading_and_matches_an_uninterrupted_run(folder, timm_file, tmp_path,
                                                                              monkeypatch):
    path = timm_file[1]
    cfg = config(folder, path, max_steps=2, body_lr_scale=0.1)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg.replace(max_steps=1), tmp_path / "stopped", progress=False)
    seen = spy_on_init(monkeypatch)
    train(cfg, tmp_path / "stopped", progress=False)  # resumes at step 1
    assert seen == []  # the pretrained weights were not loaded over the trained ones
    straight = load_checkpoint(tmp_path / "straight" / LAST_FILE)["model"]
    resumed = load_checkpoint(tmp_path / "stopped" / LAST_FILE)["model"]
    for key in straight:
        assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    with pytest.raises(ConfigMismatch, match="init"):  # another start is another run
        train(cfg.replace(init=None, init_file=None), tmp_path / "stopped", progress=False)


def test_cli_trains_from_a_local_file_and_resumes_without_it(folder, timm_file, tmp_path):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(timm_file[1].read_bytes())
    out = tmp_path / "run"
    command = ("train", "--data", folder, "--init", INIT, "--init-file", copy, "--body-lr-scale", "0.1",
               "--batch-size", "6", "--epochs", "1", "--out", out, "--no-progress")
    done = vitcourse(tmp_path, *command, "--max-steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    copy.unlink()  # resuming needs the run's checkpoint, not the pretrained file
    done = vitcourse(tmp_path, *command, "--max-steps", "2", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert log.count("init: timm:") == 1 and "resumed from" in log and "2x2 (bicubic)" in log
    assert load_checkpoint(out / LAST_FILE)["step"] == 2


@pytest.mark.parametrize("args, needles", [
    (("--init", NAME), ("timm:NAME",)),
    (("--init", "timm:no_such_vit_at_all"), ("no model named",)),
    (("--init", "timm:resnet18"), ("not a ViT",)),
    (("--init", INIT), ("VITCOURSE_OFFLINE", "--init-file")),
    (("--init", INIT, "--init-file", "missing.safetensors"), ("missing.safetensors", "does not exist")),
    (("--init-file", "x.safetensors"), ("--init timm:NAME",)),
    (("--init", INIT, "--image-size", "40"), ("multiple of 16",)),
    (("--init", INIT, "--model", "cnn"), ("--model",)),
    (("--init", INIT, "--body-lr-scale", "-1"), ("--body-lr-scale",)),
])
def test_cli_refuses_bad_init_in_one_sentence(tmp_path, capsys, args, needles):
    """In process (the same ``vitcourse.cli.main`` the command runs; the subprocess cases are below)."""
    from vitcourse.cli import main

    code = main(["train", "--out", str(tmp_path / "out"), *args])
    done = subprocess.CompletedProcess(args, code, stdout="", stderr=capsys.readouterr().err)
    assert_one_sentence(done, *needles)


def test_cli_refuses_a_file_that_is_not_the_checkpoint(folder, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    done = vitcourse(tmp_path, "train", "--data", folder, "--init", INIT, "--init-file", bad, "--max-steps", "1",
                     "--batch-size", "6", "--out", tmp_path / "out", "--no-progress")
    assert_one_sentence(done, "loading the weights failed", str(bad))


def test_unreachable_hub_is_one_sentence_that_points_to_a_local_file(folder, timm_file, monkeypatch):
    monkeypatch.delenv("VITCOURSE_OFFLINE")
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=5.0: False)
    cfg = config(folder, None)
    with pytest.raises(ValueError, match=r"cannot be reached.*--init-file PATH\.$"):
        pretrained.init_from_timm(build_model(cfg, 3), cfg)


def test_evaluate_scores_an_init_run_with_the_checkpoint_statistics(folder, timm_file, tmp_path):
    from vitcourse.evaluate import evaluate_checkpoint, evaluate_model

    cfg = config(folder, timm_file[1])
    train(cfg, tmp_path / "run", progress=False)
    model, _, checkpoint = load_trained(tmp_path / "run" / BEST_FILE)
    data = build_data(cfg.replace(init=None, init_file=None))  # the folder's own statistics
    assert tuple(data.mean) != tuple(checkpoint["mean"])  # are not timm's 0.5
    expected = evaluate_model(model, build_data(cfg).test)  # the run's: the checkpoint's statistics
    wrong = evaluate_model(model, data.test)
    assert wrong["loss"] != pytest.approx(expected["loss"])  # the normalisation changes the logits
    result = evaluate_checkpoint(tmp_path / "run" / BEST_FILE)
    assert result["test_loss"] == pytest.approx(expected["loss"]) and result["test_acc"] == expected["acc"]


def _save_original_npz(weights: dict, depth: int, heads: int, path) -> None:
    """``weights`` (a timm ViT's state dict) written in the layout of the original JAX ``.npz`` checkpoints."""
    def a(t):
        return t.detach().numpy()

    dim = weights["cls_token"].shape[-1]
    arrays = {"embedding/kernel": a(weights["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
              "embedding/bias": a(weights["patch_embed.proj.bias"]), "cls": a(weights["cls_token"]),
              "Transformer/posembed_input/pos_embedding": a(weights["pos_embed"]),
              "Transformer/encoder_norm/scale": a(weights["norm.weight"]),
              "Transformer/encoder_norm/bias": a(weights["norm.bias"]),
              "head/kernel": a(weights["head.weight"].T), "head/bias": a(weights["head.bias"])}
    for i in range(depth):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = p + "MultiHeadDotProductAttention_1/"
        for k, name in enumerate(("query", "key", "value")):
            part = weights[b + "attn.qkv.weight"][k * dim:(k + 1) * dim]  # (out, in)
            arrays[f"{mha}{name}/kernel"] = a(part.T.reshape(dim, heads, dim // heads))
            arrays[f"{mha}{name}/bias"] = a(weights[b + "attn.qkv.bias"][k * dim:(k + 1) * dim].reshape(heads, -1))
        arrays[mha + "out/kernel"] = a(weights[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).permute(1, 2, 0))
        arrays[mha + "out/bias"] = a(weights[b + "attn.proj.bias"])
        for norm, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{p}{norm}/scale"], arrays[f"{p}{norm}/bias"] = (a(weights[f"{b}{ours}.weight"]),
                                                                     a(weights[f"{b}{ours}.bias"]))
        for r in range(2):
            arrays[f"{p}MlpBlock_3/Dense_{r}/kernel"] = a(weights[f"{b}mlp.fc{r + 1}.weight"].T)
            arrays[f"{p}MlpBlock_3/Dense_{r}/bias"] = a(weights[f"{b}mlp.fc{r + 1}.bias"])
    np.savez(path, **arrays)


def test_an_original_npz_checkpoint_loads_through_timms_reader_exactly(timm_file, tmp_path, folder):
    """--init-file accepts the original ViT ``.npz`` weights: timm's own reader, every tensor equal."""
    weights, _ = timm_file
    path = tmp_path / "vit_tiny.npz"
    _save_original_npz(weights, depth=12, heads=3, path=path)
    loaded = pretrained.load_timm(NAME, file=path, fallback=False).model.state_dict()
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    done = vitcourse(tmp_path, "train", "--config", "quick", "--data", folder, "--init", INIT, "--init-file", path,
                     "--batch-size", "6", "--max-steps", "1", "--no-progress", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
