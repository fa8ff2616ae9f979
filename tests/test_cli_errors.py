"""Every bad input through the real command line: exit code 2, exactly one line on stderr, no traceback.

Each case runs ``python -m vitcourse SUBCOMMAND ...`` in a fresh process (the worktree's
``vitcourse`` first on ``PYTHONPATH``), on tiny folders and checkpoints made in ``tmp_path``.
Nothing here trains for more than a few steps.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "VITCOURSE_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "VITCOURSE_DATA": str(tmp_path / "cache"), "VITCOURSE_RUNS": str(tmp_path / "runs")}


def vitcourse(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitcourse", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=_env(tmp_path))


def assert_one_sentence(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one non-empty line on stderr, no traceback, and every ``needle`` in that line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _images(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _read_only_dir(tmp_path: Path) -> Path:
    """A place nobody can write to: /proc for root (permissions do not stop root), else a chmod 500 folder."""
    if os.geteuid() == 0:
        return Path("/proc/vitcourse-test")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real, tiny best.safetensors (an untrained ViT of the course: no training needed)."""
    from vitcourse import ViTConfig
    from vitcourse.checkpoint import save_weights
    from vitcourse.train import TrainConfig, build_model

    cfg = TrainConfig(name="tiny", vit=ViTConfig(dim=16, depth=1, heads=2, mlp_dim=32), data="synthetic")
    model = build_model(cfg, 10)
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    weights = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    save_weights(path, weights, {"config": cfg.to_dict(), "classes": [str(i) for i in range(10)],
                                 "source": "synthetic", "mean": [0.5] * 3, "std": [0.25] * 3, "model_name": "vit",
                                 "epoch": 1})
    return path


TRAIN = ("train", "--config", "quick", "--max-steps", "1", "--batch-size", "4", "--no-progress")


# --------------------------------------------------------------------------- train: paths


def test_train_out_is_an_existing_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    done = vitcourse(tmp_path, *TRAIN, "--data", "synthetic", "--out", tmp_path / "taken")
    assert_one_sentence(done, "is an existing file, not a folder")


def test_train_out_below_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    done = vitcourse(tmp_path, *TRAIN, "--data", "synthetic", "--out", tmp_path / "taken" / "run")
    assert_one_sentence(done, "is a file")


def test_train_out_in_a_read_only_place(tmp_path):
    done = vitcourse(tmp_path, *TRAIN, "--data", "synthetic", "--out", _read_only_dir(tmp_path) / "run")
    assert_one_sentence(done, "cannot be written to", "choose a folder you can write to")


def test_train_out_inside_the_data_folder(tmp_path):
    folder = _images(tmp_path / "imgs", {"a": 5, "b": 5})
    done = vitcourse(tmp_path, *TRAIN, "--data", folder, "--out", folder / "runs")
    assert_one_sentence(done, "is inside --data", "outside it")
    assert not (folder / "runs").exists()


def test_train_data_is_a_file(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\n")
    done = vitcourse(tmp_path, *TRAIN, "--data", tmp_path / "labels.txt", "--out", tmp_path / "run")
    assert_one_sentence(done, "is a file, not a folder")


def test_train_data_does_not_exist(tmp_path):
    done = vitcourse(tmp_path, *TRAIN, "--data", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_sentence(done, "does not exist")


def test_train_data_root_is_a_file(tmp_path):
    (tmp_path / "cache.txt").write_text("")
    done = vitcourse(tmp_path, *TRAIN, "--data", "cifar10", "--data-root", tmp_path / "cache.txt", "--out", tmp_path / "r")
    assert_one_sentence(done, "--data-root", "is a file, not a folder")


# --------------------------------------------------------------------------- train: folders of images


def test_train_empty_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    done = vitcourse(tmp_path, *TRAIN, "--data", tmp_path / "imgs", "--out", tmp_path / "run")
    assert_one_sentence(done, "has no class sub-folders")


def test_train_one_class_does_not_train_to_a_perfect_score(tmp_path):
    folder = _images(tmp_path / "imgs", {"square": 12})
    done = vitcourse(tmp_path, *TRAIN, "--data", folder, "--out", tmp_path / "run")
    assert_one_sentence(done, "has only one class folder (square)", "add a folder of images for another class")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_two_images_says_what_to_add_not_val_size(tmp_path):
    folder = _images(tmp_path / "imgs", {"a": 1, "b": 1})
    line = assert_one_sentence(vitcourse(tmp_path, *TRAIN, "--data", folder, "--out", tmp_path / "run"),
                               "has only 1 usable image", "add at least 2 more")
    assert "val_size" not in line


def test_train_class_folder_with_only_hidden_and_appledouble_files(tmp_path):
    folder = _images(tmp_path / "imgs", {"a": 5})
    (folder / "b" / ".thumbs").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "b" / ".thumbs" / "t.png")
    (folder / "b" / "._x.png").write_bytes(b"AppleDouble")
    done = vitcourse(tmp_path, *TRAIN, "--data", folder, "--out", tmp_path / "run")
    assert_one_sentence(done, f"{folder / 'b'} holds no images")


def test_train_corrupt_and_truncated_images_are_named_with_the_flag(tmp_path):
    folder = _images(tmp_path / "imgs", {"a": 6, "b": 6})
    (folder / "a" / "junk.png").write_bytes(b"not a png")
    data = (folder / "b" / "2.png").read_bytes()
    (folder / "b" / "2.png").write_bytes(data[: len(data) // 2])
    done = vitcourse(tmp_path, *TRAIN, "--data", folder, "--out", tmp_path / "run")
    assert_one_sentence(done, "2 corrupt", "a/junk.png", "b/2.png", "--skip-bad-images")


def test_train_unreadable_image_is_not_called_corrupt(tmp_path):
    folder = _images(tmp_path / "imgs", {"a": 6, "b": 6})
    if os.geteuid() == 0:  # root reads anything: a broken link is unreadable too
        (folder / "a" / "gone.png").symlink_to(tmp_path / "deleted.png")
        name = "a/gone.png"
    else:
        (folder / "a" / "0.png").chmod(0)
        name = "a/0.png"
    line = assert_one_sentence(vitcourse(tmp_path, *TRAIN, "--data", folder, "--out", tmp_path / "run"),
                               "1 unreadable (no read permission", name, "--skip-bad-images")
    assert "corrupt" not in line


# --------------------------------------------------------------------------- train: numbers and resume


@pytest.mark.parametrize("flag, value, needle", [
    ("--epochs", "-1", "--epochs must be at least 1"),
    ("--epochs", "0", "--epochs must be at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--max-steps", "-5", "--max-steps must be at least 1"),
    ("--num-workers", "-2", "--num-workers must be 0 or more"),
    ("--lr", "nan", "--lr must be a positive number"),
    ("--lr", "-0.1", "--lr must be a positive number"),
    ("--subset", "0", "--subset must be a positive number"),
    ("--seed", "-3", "--seed must be 0 or more"),
    ("--config", "huge", "unknown configuration 'huge'"),
    ("--model", "resnet50", "got 'resnet50'"),
])
def test_train_bad_numbers_and_names(tmp_path, flag, value, needle):
    done = vitcourse(tmp_path, "train", "--data", "synthetic", "--out", tmp_path / "run", "--no-progress", flag, value)
    assert_one_sentence(done, needle)


def test_train_batch_larger_than_the_data(tmp_path):
    folder = _images(tmp_path / "imgs", {"a": 4, "b": 4})
    done = vitcourse(tmp_path, "train", "--data", folder, "--batch-size", "64", "--out", tmp_path / "run", "--no-progress")
    assert_one_sentence(done, "smaller than one batch", "lower --batch-size")


def test_train_resume_with_no_run(tmp_path):
    done = vitcourse(tmp_path, *TRAIN, "--data", "synthetic", "--out", tmp_path / "run", "--resume")
    assert_one_sentence(done, "holds no run to resume")


def test_train_resume_after_the_folder_changed(tmp_path):
    folder = _images(tmp_path / "imgs", {"a": 10, "b": 10})
    args = ("train", "--config", "quick", "--data", folder, "--batch-size", "4", "--no-progress", "--out",
            tmp_path / "run")
    first = vitcourse(tmp_path, *args, "--max-steps", "1")
    assert first.returncode == 0, first.stderr
    (folder / "a" / "3.png").unlink()
    Image.new("RGB", (8, 8)).save(folder / "b" / "extra.png")
    done = vitcourse(tmp_path, *args, "--max-steps", "2", "--resume")
    assert_one_sentence(done, "image folder changed since this run started", "1 removed: a/3.png",
                        "1 added: b/extra.png")
    # an existing run without --resume is refused too, and says how to continue
    assert_one_sentence(vitcourse(tmp_path, *args, "--max-steps", "2"), "already holds a run", "--resume")


# --------------------------------------------------------------------------- evaluate


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_evaluate_a_malicious_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "best.pt"
    evil.write_bytes(pickle.dumps({"config": {}, "model": _Evil(str(marker))}, protocol=2))
    assert_one_sentence(vitcourse(tmp_path, "evaluate", evil), "was not loaded because it asks to run code")
    assert not marker.exists()


def test_evaluate_a_malicious_safetensors_named_pt_and_a_pt_named_safetensors(tmp_path):
    marker = tmp_path / "pwned"
    disguised = tmp_path / "best.safetensors"
    torch.save({"model": _Evil(str(marker))}, disguised)  # the extension does not decide how a file is read
    assert_one_sentence(vitcourse(tmp_path, "evaluate", disguised), "was not loaded because it asks to run code")
    assert not marker.exists()


@pytest.mark.parametrize("make, needle", [
    (lambda d, c: d / "missing.safetensors", "does not exist"),
    (lambda d, c: d, "is a folder, not a checkpoint file"),
    (lambda d, c: Path("/dev/null"), "is not a regular file"),
    (lambda d, c: _empty(d), "not readable"),
    (lambda d, c: _truncated(c, d), "truncated or corrupt"),
    (lambda d, c: _flipped(c, d), "do not match the checksum"),
    (lambda d, c: _timm_safetensors(d), "no vitcourse run information"),
    (lambda d, c: _timm_pt(d), "not a vitcourse training checkpoint"),
    (lambda d, c: _edited(c, d, "config", lambda cfg: cfg.update(colour="blue")), "does not know (colour)"),
    (lambda d, c: _edited(c, d, "classes", None), "has no 'classes' entry"),
])
def test_evaluate_files_that_are_not_course_checkpoints(tmp_path, checkpoint, make, needle):
    target = tmp_path / "case"
    target.mkdir()
    path = make(target, checkpoint)
    assert_one_sentence(vitcourse(tmp_path, "evaluate", path), needle)


def _empty(folder: Path) -> Path:
    path = folder / "best.pt"
    path.write_bytes(b"")
    return path


def _truncated(checkpoint: Path, folder: Path) -> Path:
    path = folder / "best.safetensors"
    path.write_bytes(checkpoint.read_bytes()[:-500])
    return path


def _flipped(checkpoint: Path, folder: Path) -> Path:
    data = bytearray(checkpoint.read_bytes())
    for i in range(4):
        data[-64 - 9 * i] ^= 0x5A
    path = folder / "best.safetensors"
    path.write_bytes(bytes(data))
    return path


def _timm_safetensors(folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 8), "head.weight": torch.zeros(10, 8)}, str(path))
    return path


def _timm_pt(folder: Path) -> Path:
    path = folder / "timm.pt"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "head.weight": torch.zeros(10, 8)}, path)
    return path


def _edited(checkpoint: Path, folder: Path, key: str, change) -> Path:
    from vitcourse.checkpoint import load_checkpoint

    info = load_checkpoint(checkpoint)
    info.pop("weights_sha256")
    if change is None:
        info.pop(key)
    else:
        info[key] = dict(info[key])
        change(info[key])
    path = folder / "edited.pt"
    torch.save(info, path)
    return path


def test_evaluate_data_is_a_file(tmp_path, checkpoint):
    (tmp_path / "x.txt").write_text("")
    assert_one_sentence(vitcourse(tmp_path, "evaluate", checkpoint, "--data", tmp_path / "x.txt"),
                        "is a file, not a folder")


def test_evaluate_data_with_other_classes(tmp_path, checkpoint):
    folder = _images(tmp_path / "imgs", {"a": 3, "b": 3})
    assert_one_sentence(vitcourse(tmp_path, "evaluate", checkpoint, "--data", folder), "has 2 classes",
                        "trained on 10")


def test_evaluate_bad_numbers(tmp_path, checkpoint):
    assert_one_sentence(vitcourse(tmp_path, "evaluate", checkpoint, "--batch-size", "0"), "--batch-size must be at least 1")
    assert_one_sentence(vitcourse(tmp_path, "evaluate", checkpoint, "--num-workers", "-1"), "--num-workers must be 0")


def test_evaluate_out_is_a_folder_or_read_only(tmp_path, checkpoint):
    assert_one_sentence(vitcourse(tmp_path, "evaluate", checkpoint, "--out", tmp_path), "is a folder")
    assert_one_sentence(vitcourse(tmp_path, "evaluate", checkpoint, "--out", _read_only_dir(tmp_path) / "r.json"),
                        "cannot be written to")


# --------------------------------------------------------------------------- grade, student-pack, notebooks


def test_grade_out_is_a_file(tmp_path):
    (tmp_path / "subs").mkdir()
    (tmp_path / "grades").write_text("x")
    assert_one_sentence(vitcourse(tmp_path, "grade", tmp_path / "subs", "--out", tmp_path / "grades"),
                        "vitcourse grade: --out", "is an existing file")


def test_grade_out_in_a_read_only_place(tmp_path):
    (tmp_path / "subs").mkdir()
    assert_one_sentence(vitcourse(tmp_path, "grade", tmp_path / "subs", "--out", _read_only_dir(tmp_path) / "g"),
                        "cannot be written to")


def test_grade_out_inside_the_submissions(tmp_path):
    (tmp_path / "subs").mkdir()
    assert_one_sentence(vitcourse(tmp_path, "grade", tmp_path / "subs", "--out", tmp_path / "subs" / "grades"),
                        "is inside the submissions folder")


def test_grade_submissions_is_a_file_or_missing(tmp_path):
    (tmp_path / "alice.ipynb").write_text("{}")
    assert_one_sentence(vitcourse(tmp_path, "grade", tmp_path / "alice.ipynb", "--out", tmp_path / "g"),
                        "is a file, not a folder")
    assert_one_sentence(vitcourse(tmp_path, "grade", tmp_path / "nowhere", "--out", tmp_path / "g"), "does not exist")


def test_grade_hidden_folder_must_exist(tmp_path):
    (tmp_path / "subs").mkdir()
    assert_one_sentence(vitcourse(tmp_path, "grade", tmp_path / "subs", "--out", tmp_path / "g", "--hidden",
                                  tmp_path / "nope"), "--hidden", "does not exist")


def test_student_pack_out_is_a_file_or_read_only(tmp_path):
    (tmp_path / "pack").write_text("x")
    assert_one_sentence(vitcourse(tmp_path, "student-pack", "--out", tmp_path / "pack"), "is an existing file")
    assert_one_sentence(vitcourse(tmp_path, "student-pack", "--out", _read_only_dir(tmp_path) / "pack"),
                        "cannot be written to")


def test_student_pack_and_notebooks_without_a_notebooks_folder(tmp_path):
    assert_one_sentence(vitcourse(tmp_path, "student-pack", "--out", tmp_path / "p", "--notebooks", tmp_path / "nb"),
                        "--notebooks", "does not exist")
    assert_one_sentence(vitcourse(tmp_path, "notebooks", "--check", "--dir", tmp_path / "nb"), "--dir", "does not exist")


def test_installed_package_without_a_checkout_says_where_it_looked(tmp_path):
    """As from a wheel: the package copied alone, run from a folder with no notebooks/."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(REPO / "vitcourse", site / "vitcourse", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**_env(tmp_path), "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-m", "vitcourse", "student-pack", "--out", tmp_path / "pack"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert_one_sentence(done, "no notebooks folder found", "pass --notebooks PATH")
    # train and evaluate need no checkout at all
    done = subprocess.run([sys.executable, "-m", "vitcourse", "train", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "vitcourse train --config quick" in done.stdout


# --------------------------------------------------------------------------- help shows examples


@pytest.mark.parametrize("command, example", [
    ("train", "vitcourse train --config quick --out runs/quick"),
    ("evaluate", "vitcourse evaluate runs/quick/best.safetensors"),
    ("grade", "vitcourse grade submissions/ch01 --out grades/ch01"),
    ("student-pack", "vitcourse student-pack --out pack"),
    ("notebooks", "vitcourse notebooks --check"),
])
def test_every_subcommand_help_shows_an_example(tmp_path, command, example):
    done = vitcourse(tmp_path, command, "--help")
    assert done.returncode == 0 and example in done.stdout, done.stdout


def test_python_dash_m_vitcourse_is_the_same_command(tmp_path):
    for command in ("train", "evaluate"):
        direct = subprocess.run([sys.executable, "-m", "vitcourse", command, "--help"], capture_output=True, text=True,
                                timeout=300, cwd=REPO, env=_env(tmp_path))
        via = vitcourse(tmp_path, command, "--help")
        options = [sorted(w for w in out.split() if w.startswith("--")) for out in (direct.stdout, via.stdout)]
        assert direct.returncode == via.returncode == 0 and options[0] == options[1] and "--out" in options[0]


@pytest.mark.parametrize("args, needle", [
    (("train", "--epochs", "abc"), "invalid int value: 'abc'"),
    (("train", "--no-such-option"), "unrecognized arguments: --no-such-option"),
    (("evaluate",), "required: checkpoint"),
    ((), "required: COMMAND"),
    (("fly",), "invalid choice: 'fly'"),
])
def test_argument_errors_are_one_line_too(tmp_path, args, needle):
    assert_one_sentence(vitcourse(tmp_path, *args), needle, "--help")
