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
from vitcourse.evaluate import evaluate_checkpoint, load_trained, main
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
    result = evaluate_checkpoint(run / "best.pt")
    assert result["data"] == "synthetic" and result["n"] == 4000 and result["epoch"] == 1
    # independent count: forward every test image one batch at a time, compare argmax with the labels
    model, cfg, _ = load_trained(run / "best.pt")
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
    done = subprocess.run([sys.executable, "-m", "vitcourse.evaluate", str(run / "last.pt")], capture_output=True,
                          text=True, timeout=300, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"checkpoint", "data", "test_acc", "test_loss", "n", "epoch"}
    assert 0.0 <= result["test_acc"] <= 1.0
    assert result["epoch"] == 1  # last.pt keeps it in the run's state, best.pt at the top


def test_errors_are_one_clear_line(tmp_path, capsys, run):
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt")]) == 2
    assert "not readable" in capsys.readouterr().err
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert main([str(tmp_path / "other.pt")]) == 2
    assert "not a vitcourse training checkpoint" in capsys.readouterr().err
    assert main([str(run / "best.pt"), "--data", str(tmp_path / "no-such-folder")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_corrupt_image_in_a_worker_process_is_one_line(tmp_path, run):
    for k in range(10):  # as many classes as the synthetic run, one unreadable image each
        (tmp_path / "imgs" / f"class{k}").mkdir(parents=True)
        (tmp_path / "imgs" / f"class{k}" / "0.png").write_bytes(b"not a png")
    # A fresh process: DataLoader workers are forked, and forking a test process that has
    # imported JAX (multithreaded) can deadlock.
    result = subprocess.run(
        [sys.executable, "-m", "vitcourse.evaluate", str(run / "best.pt"), "--data", str(tmp_path / "imgs"),
         "--num-workers", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VITCOURSE_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "cannot read image" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
