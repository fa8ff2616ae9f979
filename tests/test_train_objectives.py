"""``vitcourse train`` beyond classification: DeiT distillation from a course teacher, masked-image
pretraining (``--objective mae``) and fine-tuning from it (``--init mae:PATH``), with the guarantees of
every run: checked inputs, exact resume, safetensors checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_cli_errors import assert_one_sentence, vitcourse
from torch.testing import assert_close

from vitcourse import ViTConfig
from vitcourse.checkpoint import BEST_FILE, LAST_FILE, load_checkpoint, load_model
from vitcourse.config import ConfigMismatch, TrainConfig
from vitcourse.train import train

VIT = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64)
BASE = TrainConfig(name="t", vit=VIT, data="synthetic", subset=96, val_size=64, batch_size=16, epochs=2, lr=2e-3,
                   augment="basic", seed=0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "cnn"
    train(BASE.replace(model="cnn", cnn_width=8), out, progress=False)
    return out


def _weights(out):
    return load_checkpoint(out / LAST_FILE)["model"]


def _resumes_exactly(cfg, tmp_path):
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(cfg.replace(max_steps=5), tmp_path / "cut", progress=False)  # stopped mid-epoch
    again = train(cfg, tmp_path / "cut", progress=False)
    for key, value in _weights(tmp_path / "whole").items():
        assert torch.equal(value, _weights(tmp_path / "cut")[key]), key
    assert [r["val_loss"] for r in whole] == [r["val_loss"] for r in again]
    return whole


def test_distillation_trains_the_second_head_and_resumes_exactly(teacher, tmp_path):
    cfg = BASE.replace(vit=ViTConfig(**{**VIT.__dict__, "distilled": True}), distill_from=str(teacher))
    rows = _resumes_exactly(cfg, tmp_path)
    assert rows[-1]["val_acc"] is not None
    model, _, info = load_model(tmp_path / "whole" / BEST_FILE)
    assert model.config.distilled and "head_dist.weight" in info["model"]
    assert info["teacher_sha256"] == load_checkpoint(teacher / BEST_FILE)["weights_sha256"]


def test_a_changed_teacher_stops_the_resume(teacher, tmp_path):
    other = tmp_path / "other-teacher"
    train(BASE.replace(model="cnn", cnn_width=8, seed=3), other, progress=False)
    cfg = BASE.replace(vit=ViTConfig(**{**VIT.__dict__, "distilled": True}), distill_from=str(other), max_steps=2)
    train(cfg, tmp_path / "run", progress=False)
    (other / "resume.pt").unlink()  # the teacher is retrained in place: other weights, same path
    train(BASE.replace(model="cnn", cnn_width=8, seed=4), other, progress=False, overwrite=True)
    with pytest.raises(ConfigMismatch, match="teacher .* changed"):
        train(cfg.replace(max_steps=4), tmp_path / "run", progress=False)


def test_mae_pretraining_resumes_exactly_and_fine_tuning_starts_from_its_encoder(tmp_path):
    from vitcourse.pretrained import init_weights, with_init

    mae = BASE.replace(objective="mae", mask_ratio=0.5, mae_decoder_dim=16, mae_decoder_depth=1)
    rows = _resumes_exactly(mae, tmp_path)
    assert rows[-1]["val_acc"] is None and rows[-1]["train_acc"] is None and rows[-1]["val_loss"] > 0
    cfg = with_init(BASE, f"mae:{tmp_path / 'whole'}")
    assert cfg.vit == VIT.__class__(**{**VIT.__dict__, "num_classes": BASE.vit.num_classes})
    from vitcourse.models import build_model

    student = build_model(cfg, 10)
    init_weights(student, cfg)
    encoder, _, _ = load_model(tmp_path / "whole" / BEST_FILE)
    for key, value in encoder.encoder_state_dict().items():
        assert_close(student.state_dict()[key], value, rtol=0, atol=0)
    finetuned = train(cfg, tmp_path / "ft", progress=False)
    assert finetuned[-1]["val_acc"] is not None


@pytest.mark.parametrize("args, needle", [
    (("--distill-from", "nowhere"), "--distill-from nowhere does not exist"),
    (("--objective", "mae", "--mask-ratio", "1"), "--mask-ratio must be in [0, 1)"),
    (("--objective", "mae", "--model", "cnn"), "objective 'mae' pretrains a plain ViT"),
    (("--init", "mae:nowhere"), "does not exist"),
])
def test_bad_objective_flags_are_one_sentence(tmp_path, args, needle):
    done = vitcourse(tmp_path, "train", "--config", "quick", "--data", "synthetic", "--max-steps", "1",
                     "--no-progress", "--out", str(tmp_path / "run"), *args)
    assert_one_sentence(done, needle)


def test_a_teacher_for_other_data_or_an_mae_is_refused(teacher, tmp_path):
    mae_run = tmp_path / "mae"
    train(BASE.replace(objective="mae", mae_decoder_dim=16, mae_decoder_depth=1, max_steps=1), mae_run, progress=False)
    for bad, needle in ((mae_run, "not a plain classifier"), (teacher, "takes 32-pixel images")):
        size = 16 if bad == teacher else 32
        vit = ViTConfig(**{**VIT.__dict__, "distilled": True, "image_size": size, "patch_size": 8})
        with pytest.raises(ValueError, match=needle):
            train(BASE.replace(vit=vit, image_size=size, distill_from=str(bad), max_steps=1), tmp_path / f"s{size}",
                  progress=False)
    done = vitcourse(tmp_path, "evaluate", str(mae_run / BEST_FILE))
    assert_one_sentence(done, "is a masked autoencoder", "--init mae:")
