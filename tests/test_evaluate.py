"""Tests for vitcourse.evaluate: test-set accuracy of a checkpoint, as JSON, with clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitcourse import ViTConfig
from vitcourse.cli.evaluate import main
from vitcourse.evaluate import evaluate_checkpoint, load_trained
from vitcourse.train import TrainConfig, build_data, train

CFG = TrainConfig(name="eval", vit=ViTConfig(dim=32, depth=1, heads=2, mlp_dim=64), data="synthetic", subset=128,
                  val_size=100, batch_size=32, epochs=1, lr=2e-3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(CFG, out, progress=False)
    torch.set_num_threads(threads)
    return out


def test_accuracy_matches_a_manual_count(run):
    result = evaluate_checkpoint(run / "best.safetensors")
    assert result["data"] == "synthetic" and result["n"] == 4000 and result["epoch"] == 1
    # independent count: forward every test image one batch at a time, compare argmax with the labels
    model, cfg, _ = load_trained(run / "best.safetensors")
    test = build_data(cfg).test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        logits = torch.cat([model(images[i : i + 1000]) for i in range(0, len(images), 1000)])
    assert result["test_acc"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_command_line_prints_json(run):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "VITCOURSE_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "vitcourse", "evaluate", str(run / "last.safetensors")], capture_output=True,
                          text=True, timeout=300, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"checkpoint", "data", "test_acc", "test_loss", "n", "epoch"}
    assert 0.0 <= result["test_acc"] <= 1.0
    assert result["epoch"] == 1


def test_errors_are_one_clear_line(tmp_path, capsys, run):
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt")]) == 2
    assert "not readable" in capsys.readouterr().err
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert main([str(tmp_path / "other.pt")]) == 2
    assert "not a vitcourse training checkpoint" in capsys.readouterr().err
    assert main([str(run / "best.safetensors"), "--data", str(tmp_path / "no-such-folder")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_corrupt_image_in_a_worker_process_is_one_line(tmp_path, run):
    from PIL import Image

    for k in range(10):  # as many classes as the synthetic run, good images, then damaged after the check
        (tmp_path / "imgs" / f"class{k}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / f"class{k}" / f"{i}.png")
    (tmp_path / "imgs" / "class3" / "0.png").write_bytes(b"not a png")
    # A fresh process: DataLoader workers are forked, and forking a test process that has
    # imported JAX (multithreaded) can deadlock.
    result = subprocess.run(
        [sys.executable, "-m", "vitcourse", "evaluate", str(run / "best.safetensors"), "--data", str(tmp_path / "imgs"),
         "--num-workers", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VITCOURSE_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr
    # found before any image is evaluated, named, with the flag that leaves it out
    assert "class3/0.png" in err and "--skip-bad-images" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- safe loading (issue 13)


class _Evil:
    """Unpickling this calls ``open(MARKER, "w")``: it is how a hostile checkpoint would run code."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path) -> dict[str, Path]:
    import pickle

    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    files = {"raw pickle": tmp_path / "evil.pkl", "torch.save zip": tmp_path / "evil.pt"}
    files["raw pickle"].write_bytes(pickle.dumps({"config": {}, "model": _Evil()}))
    torch.save({"config": {}, "model": {"w": torch.zeros(1)}, "classes": ["a"], "extra": _Evil()}, files["torch.save zip"])
    assert not marker.exists()
    return files


@pytest.mark.parametrize("kind", ["raw pickle", "torch.save zip"])
def test_a_checkpoint_that_runs_code_is_refused_and_runs_nothing(tmp_path, capsys, kind):
    path = _evil_files(tmp_path)[kind]
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "pwned").exists(), "the checkpoint's code ran"
    assert "was not loaded because it asks to run code" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", [["vitcourse", "evaluate"]])
def test_a_malicious_checkpoint_through_the_real_command_line_creates_no_file(tmp_path, command):
    path = _evil_files(tmp_path)["torch.save zip"]  # the case: python -m vitcourse.evaluate evil.pt
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", *command, str(path)], capture_output=True, text=True,
                          timeout=300, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "VITCOURSE_OFFLINE": "1"})
    assert done.returncode == 2 and not (tmp_path / "pwned").exists()
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def _copy(run, tmp_path, name="best.safetensors") -> Path:
    target = tmp_path / name
    target.write_bytes((run / name).read_bytes())
    return target


def test_damaged_or_foreign_files_are_one_sentence(tmp_path, capsys, run):
    from safetensors.torch import load_file, save_file

    cases = {}
    truncated = _copy(run, tmp_path)
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    cases["truncated"] = (truncated, "truncated or corrupt")
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray((run / "best.safetensors").read_bytes())
    for i in range(4):  # 4 corrupted bytes inside the weights: loads, but the checksum catches it
        data[-100 - 7 * i] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cases["flipped"] = (flipped, "do not match the checksum")
    timm_like = tmp_path / "timm.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, str(timm_like))
    cases["timm weights"] = (timm_like, "no vitcourse run information")
    state = torch.load(run / "resume.pt", weights_only=True)
    for name, change in {
        "unknown config key": lambda c: c["config"].update(colour="blue"),
        "no classes": lambda c: c.pop("classes"),
        "missing weight": lambda c: c["model"].pop(next(iter(c["model"]))),
    }.items():
        edited = {**state, "config": dict(state["config"]), "model": dict(state["model"])}
        edited.pop("weights_sha256")
        change(edited)
        torch.save(edited, tmp_path / f"{name}.pt")
        cases[name] = (tmp_path / f"{name}.pt", {"unknown config key": "settings this vitcourse does not know (colour)",
                                                "no classes": "has no 'classes' entry",
                                                "missing weight": "do not fit the model"}[name])
    cases["folder"] = (run, "is a folder, not a checkpoint file; pass")
    assert set(load_file(run / "best.safetensors")) == set(state["model"])
    for name, (path, message) in cases.items():
        assert main([str(path)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)


def test_non_finite_results_are_null_with_a_warning(tmp_path, capsys, run):
    from vitcourse.checkpoint import load_checkpoint, save_weights

    checkpoint = load_checkpoint(run / "best.safetensors")
    weights = {k: v.clone() for k, v in checkpoint.pop("model").items()}
    head = next(k for k in weights if k.endswith("weight") and "head" in k)
    weights[head].fill_(float("inf"))  # a diverged model: a valid file, but NaN logits
    save_weights(tmp_path / "best.safetensors", weights, {k: v for k, v in checkpoint.items() if k != "weights_sha256"})
    assert main([str(tmp_path / "best.safetensors"), "--out", str(tmp_path / "result.json")]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    assert result["test_loss"] is None and json.loads((tmp_path / "result.json").read_text()) == result
    assert "test_loss is not a finite number" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_a_changed_image_folder_is_not_evaluated_as_the_runs_test_set(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    for k, name in enumerate(("a", "b")):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (20 * i, 100 * k, 50)).save(folder / name / f"{i}.png")
    out = tmp_path / "run"
    train(CFG.replace(data=str(folder), subset=None, batch_size=4, image_size=32), out, progress=False)
    assert evaluate_checkpoint(out / "best.safetensors")["n"] == 2
    alone = tmp_path / "shared" / "best.safetensors"  # the checkpoint shared without its run folder
    alone.parent.mkdir()
    alone.write_bytes((out / "best.safetensors").read_bytes())
    assert evaluate_checkpoint(alone)["n"] == 2  # the folder is as it was: the stored split hash matches
    split = json.loads((out / "split.json").read_text())
    (folder / split["train"][0]).unlink()  # a training image less: the test images are still the run's
    assert evaluate_checkpoint(out / "best.safetensors")["n"] == 2
    (folder / split["test"][0]).unlink()  # a test image less: another image, maybe a training one, would take its place
    with pytest.raises(ValueError, match="image folder changed since training"):
        evaluate_checkpoint(out / "best.safetensors")
    # explicitly other data: evaluated as asked
    assert evaluate_checkpoint(out / "best.safetensors", data=str(folder))["n"] == 2
    # the checkpoint shared alone (no split.json beside it): the split's hash stored inside still guards it
    with pytest.raises(ValueError, match="is not split as when"):
        evaluate_checkpoint(alone)
    for name in split["train"][:1] + split["test"][:1]:  # put the folder back as it was
        Image.new("RGB", (8, 8)).save(folder / name)
    with pytest.raises(ValueError, match="is not split as when"):  # same names, other pixels: still refused
        evaluate_checkpoint(alone)


def test_out_cannot_overwrite_the_checkpoint(tmp_path, capsys, run):
    target = _copy(run, tmp_path)
    assert main([str(target), "--out", str(target)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    assert target.read_bytes() == (run / "best.safetensors").read_bytes()
