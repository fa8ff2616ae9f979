"""Bad inputs and faults of the training wing, through the real command lines.

Each one is answered before training starts, in one sentence on stderr with exit code 2 and
no traceback, and no finished run is lost. The classes: checkpoint metadata that lies about
the model, damaged resume state, run folders in use or holding a finished run, images that
decode wrongly (16-bit, odd modes, names that are not UTF-8, decompression bombs), and
sentences that used to mislead (a misspelt weights tag, a device as --init-file, a closed pipe).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_errors import assert_one_sentence, vitcourse

from vitcourse.checkpoint import BEST_FILE, LAST_FILE, LOCK_FILE, RESUME_FILE, load_checkpoint, save_weights
from vitcourse.data import load_data

REPO = Path(__file__).resolve().parents[1]
COMMON = ("--config", "quick", "--batch-size", "4", "--max-steps", "1", "--no-progress")


def _folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished one-step run on a small image folder."""
    tmp = tmp_path_factory.mktemp("run")
    folder = _folder(tmp / "imgs")
    done = vitcourse(tmp, "train", *COMMON, "--data", str(folder), "--image-size", "16", "--out", str(tmp / "run"))
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def _edited(run: Path, tmp_path: Path, change) -> Path:
    """``best.safetensors`` rewritten with its recorded information changed by ``change(info)``."""
    checkpoint = load_checkpoint(run / BEST_FILE)
    weights = checkpoint.pop("model")
    info = {k: v for k, v in checkpoint.items() if k not in ("weights_sha256", "format")}
    change(info)
    path = tmp_path / "edited.safetensors"
    save_weights(path, weights, info)
    return path


# --------------------------------------------------------------------------- checkpoint metadata


@pytest.mark.parametrize("change, needle", [
    (lambda i: i["config"]["vit"].update(depth=1_000_000), "depth 1000000 but holds weights for"),
    (lambda i: i["config"]["vit"].update(dim="wide"), "dim must be a positive integer"),
    (lambda i: i["config"].update(epochs="3"), "epochs must be a whole number"),
    (lambda i: i.update(mean=[0.5, 0.5]), "'mean' entry"),
    (lambda i: i.update(std=[0.2, 0.0, 0.2]), "'std' entry"),
    (lambda i: i["config"]["vit"].update(mlp_dim=4096), "do not fit the model"),
    (lambda i: i["config"].update(model="cnn"), "do not fit the model"),
    (lambda i: i.update(classes=["only one"] * 3), "do not fit the model"),
    (lambda i: i["config"].update(vit=[1, 2]), "damaged configuration"),
])
def test_evaluate_checks_what_a_checkpoint_records_before_building_it(run, tmp_path, change, needle):
    path = _edited(run, tmp_path, change)
    done = vitcourse(tmp_path, "evaluate", str(path))
    assert_one_sentence(done, needle)


def test_a_small_file_claiming_a_huge_model_is_refused_without_allocating(run, tmp_path):
    path = _edited(run, tmp_path, lambda i: i["config"]["vit"].update(depth=1_000_000, dim=65_536, mlp_dim=262_144))
    assert path.stat().st_size < 2_000_000
    done = subprocess.run([sys.executable, "-c", (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
        "from vitcourse.cli import main; sys.exit(main(sys.argv[1:]))"), "evaluate", str(path)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "Traceback" not in done.stderr and "MemoryError" not in done.stderr, done.stderr
    assert "holds weights for" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- damaged resume state


def _damage_resume(out: Path, change) -> None:
    state = torch.load(out / RESUME_FILE, weights_only=True)
    change(state)
    state.pop("weights_sha256", None)  # an edit that keeps the file self-consistent: only the shapes are wrong
    torch.save(state, out / RESUME_FILE)


@pytest.mark.parametrize("what, change, needle", [
    ("weights", lambda s: s["model"].update(cls_token=torch.zeros(1, 1, 7)), "do not fit the model"),
    ("optimizer", lambda s: next(iter(s["optimizer"]["state"].values())).update(exp_avg=torch.zeros(3)),
     "optimizer state of shape (3,)"),
    ("optimizer groups", lambda s: s["optimizer"]["param_groups"].pop(), "optimizer state for other parameters"),
    ("run state", lambda s: s["state"].update(surprise=1), "damaged run state"),
])
def test_a_damaged_resume_state_is_one_sentence_before_training(tmp_path, what, change, needle):
    folder = _folder(tmp_path / "imgs")
    args = (*COMMON, "--data", str(folder), "--image-size", "16", "--out", str(tmp_path / "run"))
    assert vitcourse(tmp_path, "train", *args).returncode == 0
    _damage_resume(tmp_path / "run", change)
    done = vitcourse(tmp_path, "train", *args[:-4], "--max-steps", "3", *args[-4:], "--resume")
    assert_one_sentence(done, needle)
    assert "epoch 1/" not in done.stdout  # nothing trained


# --------------------------------------------------------------------------- run folders


def test_a_folder_in_use_by_another_training_is_refused(tmp_path):
    from filelock import FileLock

    folder = _folder(tmp_path / "imgs")
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(str(out / LOCK_FILE)):  # another training holds the folder
        done = vitcourse(tmp_path, "train", *COMMON, "--data", str(folder), "--image-size", "16", "--out", str(out))
    assert_one_sentence(done, "another training run is writing into", "choose another --out")
    assert not (out / "split.json").exists()


def test_two_trainings_started_together_never_mix_their_files(tmp_path):
    folder = _folder(tmp_path / "imgs", per_class=20)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "vitcourse", "train", "--config", "quick", "--batch-size", "4", "--epochs", "2",
               "--no-progress", "--data", str(folder), "--image-size", "16", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VITCOURSE_OFFLINE": "1"}
    first = subprocess.Popen([*command, "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO, env=env)
    second = subprocess.Popen([*command, "--seed", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=env)
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results  # one trains; the other is refused (busy, or the finished run is kept)
    loser = next(err for code, _, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser
    seed = load_checkpoint(out / LAST_FILE)["config"]["seed"]
    assert load_checkpoint(out / BEST_FILE)["config"]["seed"] == seed
    assert load_checkpoint(out / RESUME_FILE)["config"]["seed"] == seed


def test_a_finished_run_without_resume_state_is_not_overwritten(tmp_path):
    folder = _folder(tmp_path / "imgs")
    args = (*COMMON, "--data", str(folder), "--image-size", "16", "--out", str(tmp_path / "run"))
    assert vitcourse(tmp_path, "train", *args).returncode == 0
    (tmp_path / "run" / RESUME_FILE).unlink()
    before = (tmp_path / "run" / BEST_FILE).read_bytes()
    done = vitcourse(tmp_path, "train", *args, "--seed", "5")
    assert_one_sentence(done, "holds the results of an earlier run", "--overwrite")
    assert (tmp_path / "run" / BEST_FILE).read_bytes() == before
    assert vitcourse(tmp_path, "train", *args, "--seed", "5", "--overwrite").returncode == 0
    assert load_checkpoint(tmp_path / "run" / BEST_FILE)["config"]["seed"] == 5


def test_shared_checkpoints_are_readable_by_others_under_the_usual_umask(run):
    for name in (BEST_FILE, LAST_FILE):
        assert (run / name).stat().st_mode & 0o044 == 0o044, oct((run / name).stat().st_mode)


# --------------------------------------------------------------------------- images


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit grayscale PNG written byte by byte (Pillow cannot write every 16-bit layout)."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16_bit_png_trains_on_its_real_pixels_not_on_white(tmp_path):
    folder = _folder(tmp_path / "imgs")
    values = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    for i in range(6):
        _png16(folder / "ants" / f"deep{i}.png", values)
    bundle = load_data(str(folder), image_size=16, stats=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    files = bundle.split_record()
    index = next(i for i, f in enumerate(files["train"]) if "deep" in f)
    pixels = bundle.train.get_image(index)  # uint8 (3, S, S): the decoded file, before augmentation
    assert torch.equal(pixels[0], torch.from_numpy((values >> 8).astype(np.uint8)))  # the high byte, not 255


def test_a_file_name_that_is_not_utf8_trains_and_is_named_when_bad(tmp_path):
    folder = _folder(tmp_path / "imgs")
    good = os.path.join(os.fsencode(folder / "ants"), b"caf\xe9.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(open(good, "wb"), format="PNG")
    args = (*COMMON, "--data", str(folder), "--image-size", "16")
    done = vitcourse(tmp_path, "train", *args, "--out", str(tmp_path / "a"))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    with open(os.path.join(os.fsencode(folder / "bees"), b"bad\xff.png"), "wb") as f:
        f.write(b"not an image")
    done = vitcourse(tmp_path, "train", *args, "--out", str(tmp_path / "b"))
    assert_one_sentence(done, "bad\\xff.png", "--skip-bad-images")


def test_a_decompression_bomb_is_called_too_large_not_corrupt(tmp_path):
    folder = _folder(tmp_path / "imgs")
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a valid PNG that claims 100,000 x 100,000 pixels: a few hundred bytes that would decode to 30 GB
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (folder / "ants" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                               + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    done = vitcourse(tmp_path, "train", *COMMON, "--data", str(folder), "--image-size", "16", "--out",
                     str(tmp_path / "run"))
    message = assert_one_sentence(done, "too large to decode safely", "bomb.png")
    assert "corrupt" not in message


def test_no_progress_means_no_bar_even_for_a_large_folder(tmp_path, monkeypatch, capsys):
    import vitcourse.data.folder as folder_module
    from vitcourse.cli import main

    folder = _folder(tmp_path / "imgs")
    monkeypatch.setattr(folder_module, "CHECK_PROGRESS_FROM", 2)  # every folder is "large"
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    assert main(["train", *COMMON, "--data", str(folder), "--image-size", "16", "--out", str(tmp_path / "run")]) == 0
    assert "checking images" not in capsys.readouterr().err


# --------------------------------------------------------------------------- sentences that used to mislead


def test_a_misspelt_weights_tag_is_one_sentence(tmp_path):
    folder = _folder(tmp_path / "imgs")
    done = vitcourse(tmp_path, "train", *COMMON, "--data", str(folder), "--init",
                     "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1kk", "--out", str(tmp_path / "run"))
    assert_one_sentence(done, "no weights tagged 'augreg_in21k_ft_in1kk'", "augreg_in21k")


@pytest.mark.parametrize("target, needle", [("/dev/zero", "not a regular file (a device, pipe or socket, through a link)"),
                                            (None, "does not exist")])
def test_an_init_file_is_described_as_what_it_is(tmp_path, target, needle):
    folder = _folder(tmp_path / "imgs")
    link = tmp_path / "weights.safetensors"
    if target is not None:
        link.symlink_to(target)
    done = vitcourse(tmp_path, "train", *COMMON, "--data", str(folder), "--init", "timm:vit_tiny_patch16_224",
                     "--init-file", str(link), "--out", str(tmp_path / "run"))
    assert_one_sentence(done, needle)


def test_a_closed_output_pipe_is_not_called_a_file_problem(run, tmp_path):
    reader, writer = os.pipe()
    os.close(reader)  # nobody will read what evaluate prints
    done = subprocess.run([sys.executable, "-m", "vitcourse", "evaluate", str(run / BEST_FILE)], stdout=writer,
                          stderr=subprocess.PIPE, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "VITCOURSE_OFFLINE": "1"})
    os.close(writer)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "output was closed" in done.stderr and "could not use a file" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_command_line_values_are_checked_by_the_config_in_flag_words(tmp_path):
    folder = _folder(tmp_path / "imgs")
    for flag, value, needle in (("--epochs", "0", "--epochs must be at least 1"),
                                ("--lr", "-1", "--lr must be a positive number"),
                                ("--seed", "-3", "--seed must be 0 or more"),
                                ("--image-size", "0", "--image-size must be")):
        done = vitcourse(tmp_path, "train", *COMMON, "--data", str(folder), flag, value, "--out", str(tmp_path / "r"))
        assert_one_sentence(done, needle)
