"""Tests for vitcourse.train: schedules, exact resume after SIGKILL, budgets, DDP, the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from vitcourse import ViTConfig
from vitcourse.train import (
    CONFIGS,
    TIMING_FIELDS,
    ConfigMismatch,
    EpochBatches,
    TrainConfig,
    build_model,
    build_scheduler,
    learning_rates,
    read_metrics,
    train,
)

TINY = TrainConfig(
    name="tiny", vit=ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64), data="synthetic", subset=256, val_size=200,
    batch_size=32, epochs=3, warmup_epochs=1, lr=2e-3, augment="basic", label_smoothing=0.1, seed=0,
)
TINY_SRC = (
    "from vitcourse import ViTConfig\nfrom vitcourse.train import TrainConfig\n"
    "TINY = TrainConfig(name='tiny', vit=ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64), data='synthetic', "
    "subset=256, val_size=200, batch_size=32, epochs=3, warmup_epochs=1, lr=2e-3, augment='basic', label_smoothing=0.1, seed=0)\n"
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(tmp_path_factory, monkeypatch):
    """One thread (identical numerics in and out of subprocesses), a shared synthetic-data cache, no downloads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("VITCOURSE_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")  # CIFAR-10 is never there: the same results with or without internet
    yield
    torch.set_num_threads(threads)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "VITCOURSE_OFFLINE": "1"}


def _run_script(tmp_path: Path, body: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + TINY_SRC + textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _weights(path: Path) -> dict:
    """The tensors of a checkpoint, read without pickle (safetensors) or with weights_only=True (resume.pt)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)["model"]


def _resume_state(run: Path) -> dict:
    return torch.load(run / "resume.pt", weights_only=True)  # plain values and tensors only


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=f"parameter {k} differs")


# --------------------------------------------------------------------------- pieces


def test_cosine_schedule_warms_up_then_decays():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    cfg = TINY.replace(lr=0.1, warmup_epochs=2)
    sched = build_scheduler(cfg, opt, total_steps=100, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # independent reference: linear warmup over 20 steps, then half a cosine over the remaining 80
    expected = [0.1 * (s + 1) / 20 if s < 20 else 0.05 * (1 + math.cos(math.pi * (s - 20) / 80)) for s in range(100)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert max(lrs) == pytest.approx(0.1)


def test_onecycle_and_multistep_schedules():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1.0)
    sched = build_scheduler(TINY.replace(schedule="onecycle", max_lr=0.02, pct_start=0.25), opt, 40, 10)
    lrs = [opt.param_groups[0]["lr"]] + [(opt.step(), sched.step(), opt.param_groups[0]["lr"])[2] for _ in range(39)]
    # torch's OneCycleLR peaks after pct_start * total - 1 steps
    assert max(lrs) == pytest.approx(0.02) and lrs.index(max(lrs)) == 9 and lrs[-1] < 1e-5
    assert lrs[0] == pytest.approx(0.002)  # starts at a tenth of the peak, as the Ultimus assignment did
    opt = torch.optim.Adam([param], lr=1.0)
    sched = build_scheduler(TINY.replace(schedule="multistep", milestones=(0.5, 0.75), gamma=0.1, lr=1.0), opt, 40, 10)
    lrs = [opt.param_groups[0]["lr"]] + [(opt.step(), sched.step(), opt.param_groups[0]["lr"])[2] for _ in range(39)]
    assert lrs[19] == 1.0 and lrs[20] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)


def test_epoch_batches_cover_the_data_and_split_across_processes():
    whole = [b for b in EpochBatches(100, 20, seed=1, epoch=2)]
    assert len(whole) == 5 and sorted(i for b in whole for i, _ in b) == list(range(100))
    again = [b for b in EpochBatches(100, 20, seed=1, epoch=2)]
    assert whole == again and whole != list(EpochBatches(100, 20, seed=1, epoch=3))
    assert list(EpochBatches(100, 20, seed=1, epoch=2, start=3)) == whole[3:]
    rank0 = list(EpochBatches(100, 20, seed=1, epoch=2, rank=0, world=2))
    rank1 = list(EpochBatches(100, 20, seed=1, epoch=2, rank=1, world=2))
    assert [a + b for a, b in zip(rank0, rank1)] == whole


def test_models_by_name():
    x = torch.randn(2, 3, 32, 32)
    assert build_model(TINY, 7)(x).shape == (2, 7)
    assert build_model(TINY.replace(model="cnn"), 5)(x).shape == (2, 5)
    from vitcourse import ultimus  # the project's own module: a broken import must fail, not skip
    assert build_model(TINY.replace(model="ultimus"), 10)(x).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        build_model(TINY.replace(model="ultimus_nope"), 10)
    assert "ultimus" in ultimus.VARIANTS


def test_named_configs_are_valid():
    assert {"quick", "cifar10", "ultimus"} <= set(CONFIGS)
    from vitcourse.vit import count_parameters

    assert count_parameters(build_model(CONFIGS["cifar10"], 10)) <= 4_000_000
    u = CONFIGS["ultimus"]
    assert (u.model, u.optimizer, u.schedule, u.epochs, u.batch_size) == ("ultimus", "adam", "onecycle", 24, 512)
    with pytest.raises(ValueError, match="optimizer"):
        TINY.replace(optimizer="sgd")
    assert TrainConfig.from_dict(CONFIGS["cifar10"].to_dict()) == CONFIGS["cifar10"]


# --------------------------------------------------------------------------- runs


def test_training_learns_and_writes_outputs(tmp_path):
    cfg = TINY.replace(epochs=4, subset=1024, val_size=400)  # the stand-in is hard: 32 steps stay at chance
    rows = train(cfg, tmp_path / "run", resume=False, progress=False)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows == read_metrics(tmp_path / "run")
    assert {"epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_sec", "data"} <= rows[0].keys()
    assert all(r["data"] == "synthetic" for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # above chance (10%, +-1.5% on 400 images) and below the initial loss ln(10) = 2.30 after 128 tiny steps
    assert rows[-1]["val_acc"] > 0.15 and rows[-1]["val_loss"] < 2.25
    for name in ("last.safetensors", "best.safetensors", "resume.pt", "split.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["resume.pt"]  # no best.pt / last.pt
    # the shareable files carry the run's information as JSON in the safetensors metadata
    from safetensors import safe_open

    from vitcourse.checkpoint import load_checkpoint

    with safe_open(str(tmp_path / "run" / "best.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["vitcourse"])
    best = max(rows, key=lambda r: r["val_acc"])
    assert info["config"] == cfg.to_dict() and info["classes"][0] == "disk"
    assert info["epoch"] == best["epoch"] and info["metrics"] == best and info["source"] == "synthetic"
    last = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert last["metrics"] == rows[-1] and last["epoch"] == 4 and last["finished"]
    _assert_same_weights(tmp_path / "run" / "last.safetensors", tmp_path / "run" / "resume.pt")
    assert "data synthetic" in (tmp_path / "run" / "train.log").read_text()
    # lr is the rate of each epoch's last step (1024 / 32 = 32 steps an epoch), not the next step's
    assert [r["step"] for r in rows] == [32, 64, 96, 128]
    rates = learning_rates(cfg, steps_per_epoch=32)
    assert [r["lr"] for r in rows] == [rates[32 * e - 1] for e in (1, 2, 3, 4)]


def test_finished_run_returns_stored_metrics_and_other_configs_are_refused(tmp_path):
    rows = train(TINY.replace(epochs=1), tmp_path / "run", progress=False)
    stamp = (tmp_path / "run" / "resume.pt").stat().st_mtime_ns
    again = train(TINY.replace(epochs=1), tmp_path / "run", progress=False)
    assert again == rows and (tmp_path / "run" / "resume.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigMismatch, match="lr"):
        train(TINY.replace(epochs=1, lr=5e-4), tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(TINY.replace(epochs=1), tmp_path / "run", resume=False, progress=False)
    # killed after its last checkpoint, before metrics.jsonl was complete: the finished run repairs the file
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert train(TINY.replace(epochs=1), tmp_path / "run", progress=False) == rows == read_metrics(tmp_path / "run")


def test_a_run_continues_only_on_the_data_it_started_with(tmp_path, monkeypatch):
    import vitcourse.train as train_module

    # 'cifar10' with the synthetic fallback, offline: the run trains on synthetic data
    cfg = TINY.replace(data="cifar10", allow_synthetic=True, data_root=str(tmp_path / "no-cifar"), max_steps=2)
    assert train(cfg, tmp_path / "run", progress=False)[-1]["data"] == "synthetic"
    assert _resume_state(tmp_path / "run")["source"] == "synthetic"
    # later CIFAR-10 is there: neither return the synthetic run as finished nor continue it on CIFAR-10
    real = train_module.build_data
    monkeypatch.setattr(train_module, "build_data", lambda c, **kw: dataclasses.replace(real(c, **kw), source="cifar10"))
    for max_steps in (2, 4):
        with pytest.raises(ConfigMismatch, match="data source: 'synthetic' there, 'cifar10' now"):
            train(cfg.replace(max_steps=max_steps), tmp_path / "run", progress=False)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, monkeypatch):
    import vitcourse.train as train_module

    train(TINY.replace(max_steps=2), tmp_path / "run", progress=False)
    # as process 1 of 2 (the checkpoint holds one process's random state): a clear error, not an IndexError
    monkeypatch.setattr(train_module, "_init_distributed", lambda: train_module._Dist(rank=1, world=2))
    with pytest.raises(ConfigMismatch, match="processes: 1 there, 2 now"):
        train(TINY.replace(max_steps=4), tmp_path / "run", progress=False)


def test_max_steps_then_continue_equals_one_longer_run(tmp_path):
    direct = train(TINY.replace(max_steps=12), tmp_path / "direct", progress=False)
    first = train(TINY.replace(max_steps=4), tmp_path / "split", progress=False)
    assert first[-1]["step"] == 4 and first[-1]["partial_epoch"]
    second = train(TINY.replace(max_steps=12), tmp_path / "split", progress=False)
    assert _without_timing(second) == _without_timing(direct)
    assert [r["step"] for r in direct] == [8, 12]
    _assert_same_weights(tmp_path / "direct" / "last.safetensors", tmp_path / "split" / "last.safetensors")


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    cfg = TINY.replace(checkpoint_every=3, augment="strong", mixup=0.8, cutmix=1.0, vit=TINY.vit.__class__(
        dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.1, drop_path=0.1))
    reference = train(cfg, tmp_path / "reference", progress=False)
    # The child trains the same config, slowed down (sleeps do not change the numbers) so the kill lands mid-run.
    child = _run_script(tmp_path, f"""
        import time
        from vitcourse.train import train
        slow = torch.optim.AdamW.step
        def step(self, *a, **k):
            time.sleep(0.15)
            return slow(self, *a, **k)
        torch.optim.AdamW.step = step
        cfg = TINY.replace(checkpoint_every=3, augment="strong", mixup=0.8, cutmix=1.0,
                           vit=ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.1, drop_path=0.1))
        train(cfg, {str(tmp_path / 'killed')!r}, progress=False)
    """)
    last = tmp_path / "killed" / "resume.pt"
    deadline = time.time() + 120
    while not (last.exists() and len(read_metrics(tmp_path / "killed")) >= 1) and time.time() < deadline:
        assert child.poll() is None, child.communicate()[1]
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere inside the second epoch
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    state = torch.load(last, weights_only=True)
    assert not state["finished"], "the child finished before it was killed; the test did not test resume"
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    assert _without_timing(resumed) == _without_timing(reference)
    _assert_same_weights(tmp_path / "reference" / "resume.pt", last)
    _assert_same_weights(tmp_path / "reference" / "last.safetensors", tmp_path / "killed" / "last.safetensors")
    _assert_same_weights(tmp_path / "reference" / "best.safetensors", tmp_path / "killed" / "best.safetensors")
    # the resume state holds the optimizer's moments too: bit-identical as well
    ref_opt, got_opt = _resume_state(tmp_path / "reference")["optimizer"], torch.load(last, weights_only=True)["optimizer"]
    for key, value in ref_opt["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(tensor, got_opt["state"][key][name], rtol=0, atol=0)
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    cfg = TINY.replace(epochs=2)
    single = train(cfg, tmp_path / "single", progress=False)
    script = tmp_path / "ddp.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + TINY_SRC + textwrap.dedent(f"""
        from vitcourse.train import train
        train(TINY.replace(epochs=2), {str(tmp_path / 'ddp')!r}, progress=False)
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp")
    assert len(ddp) == len(single) == 2
    for a, b in zip(ddp, single):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    wa = _resume_state(tmp_path / "ddp")
    assert len(wa["rng"]) == 2  # both processes' random states are kept for resume


def test_torchrun_command_line_with_two_gloo_processes(tmp_path, capsys):
    out = tmp_path / "ddp"
    args = ["--config", "quick", "--data", "synthetic", "--subset", "256", "--max-steps", "3", "--out", str(out),
            "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vitcourse", "train", *args], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["step"] == 3 and rows[0]["data"] == "synthetic"
    assert 0.0 <= rows[0]["val_acc"] <= 1.0 and rows[0]["train_loss"] > 0
    assert done.stdout.count("done:") == 1  # process 0 reports, process 1 is quiet
    assert len(_resume_state(out)["rng"]) == 2
    # continued by one process: a clear error, not a run with the random state of only one of the two
    from vitcourse.cli.train import main

    assert main([*args, "--max-steps", "6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "processes: 2 there, 1 now" in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitcourse", "train", *args], env=_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_cli_quick_run_then_errors(tmp_path, capsys):
    out = tmp_path / "quick"
    done = _cli("--config", "quick", "--out", str(out), "--max-steps", "2", "--subset", "256", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert (out / "metrics.jsonl").exists() and (out / "last.safetensors").exists() and (out / "best.safetensors").exists()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 2 and row["data"] == "synthetic"  # VITCOURSE_OFFLINE=1: no download, even online
    assert "synthetic" in done.stdout

    from vitcourse.cli.train import main

    # the same directory with other settings: a checkpoint from a different configuration
    common = ["--config", "quick", "--out", str(out), "--max-steps", "2", "--subset", "256", "--no-progress"]
    assert main([*common, "--seed", "5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and len(err.strip().splitlines()) == 1

    # the finished run resumed with the same settings returns at once, without training
    stamp = (out / "resume.pt").stat().st_mtime_ns
    assert main([*common, "--resume"]) == 0
    assert (out / "resume.pt").stat().st_mtime_ns == stamp


def test_cli_unknown_config_is_one_line_without_traceback(tmp_path):
    done = _cli("--config", "huge", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "unknown configuration" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/images"], "does not exist"),
        (["--data", "EMPTY"], "holds no images"),
        (["--data", "cifar10", "--data-root", "CORRUPT"], "corrupt"),
        (["--data", "cifar10", "--data-root", "MISSING", "--config", "ultimus"], "MISSING"),
        (["--data", "synthetic", "--model", "resnet50"], "got 'resnet50'"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, args, message, capsys):
    from vitcourse.cli.train import main

    (tmp_path / "imgs" / "empty").mkdir(parents=True)
    folder = tmp_path / "corrupt" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    names = {"EMPTY": tmp_path / "imgs", "CORRUPT": tmp_path / "corrupt", "MISSING": tmp_path / "missing"}
    args = [str(names.get(a, a)) for a in args]
    message = str(names.get(message, message))
    assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_corrupt_image_in_a_worker_process_is_one_line(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "imgs" / name / f"{i}.png").write_bytes(b"not a png")
    done = _cli("--config", "quick", "--data", str(tmp_path / "imgs"), "--num-workers", "1", "--max-steps", "1",
                "--batch-size", "4", "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # found before training starts, all of them, with the flag that leaves them out
    assert "16 of the 16 images" in done.stderr and "16 corrupt" in done.stderr and "--skip-bad-images" in done.stderr


def test_cli_help(capsys):
    from vitcourse.cli.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-steps" in out and "--resume" in out and "--data" in out


def test_fingerprint_ignores_budget_but_not_recipe():
    from vitcourse.train import fingerprint

    assert fingerprint(TINY) == fingerprint(TINY.replace(max_steps=5, num_workers=2))
    assert fingerprint(TINY) != fingerprint(TINY.replace(lr=1e-4))


def test_cli_model_option_picks_the_network():
    from vitcourse.cli.train import config_from_args
    from vitcourse.cli.train import parser as _parser
    from vitcourse.train import build_model
    from vitcourse.ultimus import SPEC_NUM_PARAMETERS

    def size(model):
        return sum(p.numel() for p in model.parameters())

    cfg = config_from_args(_parser().parse_args(["--config", "ultimus", "--model", "ultimus_repaired"]))
    assert cfg.model == "ultimus_repaired" and cfg.schedule == "onecycle"
    assert size(build_model(cfg.replace(model="ultimus"), 10)) == SPEC_NUM_PARAMETERS
    assert size(build_model(cfg, 10)) > SPEC_NUM_PARAMETERS  # the repair adds BatchNorm to the stem


# --------------------------------------------------------------------------- the split is part of the run (issue 13)


def _folder(root: Path, counts: dict[str, int]) -> Path:
    from PIL import Image

    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (12, 12), (10 * i % 256, 120 * k % 256, 60)).save(root / name / f"{i}.png")
    return root


FOLDER_CFG = TINY.replace(subset=None, batch_size=8, epochs=2, augment="none")


def test_resume_refuses_a_folder_whose_files_changed_and_never_moves_a_test_image(tmp_path):
    folder = _folder(tmp_path / "imgs", {"disk": 20, "square": 20})
    cfg = FOLDER_CFG.replace(data=str(folder), max_steps=2)
    train(cfg, tmp_path / "run", progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["files"]) == 40 and len(split["test"]) == 4
    assert set(split["train"]).isdisjoint(split["test"]) and set(split["val"]).isdisjoint(split["test"])
    # the case: a file deleted (as an error message once said), then --resume
    (folder / split["train"][0]).unlink()
    with pytest.raises(ConfigMismatch, match=r"image folder changed since this run started \(1 removed: "
                                             + split["train"][0].replace(".", r"\.")):
        train(cfg.replace(max_steps=4), tmp_path / "run", progress=False)
    _folder(folder, {"disk": 20})  # restored: resuming continues on the recorded split
    assert train(cfg.replace(max_steps=4), tmp_path / "run", progress=False)[-1]["step"] == 4
    # a changed file (same name, other pixels) and an added one are refused too
    from PIL import Image

    Image.new("RGB", (12, 12), (1, 2, 3)).save(folder / split["test"][0])
    Image.new("RGB", (12, 12), (3, 2, 1)).save(folder / "square" / "new.png")
    with pytest.raises(ConfigMismatch, match="1 added: square/new.png; 1 changed: " + split["test"][0]):
        train(cfg.replace(max_steps=6), tmp_path / "run", progress=False)


def test_a_resumed_run_never_starts_without_its_split_record(tmp_path):
    train(TINY.replace(max_steps=2), tmp_path / "run", progress=False)
    (tmp_path / "run" / "split.json").unlink()
    with pytest.raises(ConfigMismatch, match="split.json is missing or damaged"):
        train(TINY.replace(max_steps=4), tmp_path / "run", progress=False)


def test_cli_resume_without_a_run_and_old_format_runs_are_errors(tmp_path, capsys):
    from vitcourse.cli.train import main

    common = ["--config", "quick", "--data", "synthetic", "--subset", "256", "--max-steps", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no run to resume; leave out --resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nothing").exists()  # nothing was started


def test_bad_images_stop_training_before_the_first_step_unless_skipped(tmp_path, capsys):
    from vitcourse.cli.train import main

    folder = _folder(tmp_path / "imgs", {"disk": 10, "square": 10})
    data = (folder / "disk" / "3.png").read_bytes()
    (folder / "disk" / "3.png").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "square" / "._1.png").write_bytes(b"AppleDouble")  # skipped: never an error
    args = ["--config", "quick", "--data", str(folder), "--epochs", "1", "--batch-size", "4", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "disk/3.png" in err and "--skip-bad-images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a" / "resume.pt").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--skip-bad-images"]) == 0
    log = (tmp_path / "b" / "train.log").read_text()
    assert "skipped 1 AppleDouble ._* files, 1 corrupt images" in log
    assert "disk/3.png" not in json.loads((tmp_path / "b" / "split.json").read_text())["files"]


def test_non_finite_metrics_are_written_as_null_with_a_warning(tmp_path, monkeypatch):
    import vitcourse.objectives as objectives

    real = objectives.Classification.evaluate
    monkeypatch.setattr(objectives.Classification, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": float("nan")})
    rows = train(TINY.replace(epochs=1), tmp_path / "run", progress=False)
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))["val_loss"] is None
    assert rows[0]["val_loss"] is None
    assert "warning: val_loss of epoch 1 is not a finite number" in (tmp_path / "run" / "train.log").read_text()


def test_only_process_zero_prepares_the_data_and_the_others_wait(tmp_path, monkeypatch):
    """The order under torchrun, with the collectives replaced by a recording stand-in."""
    import vitcourse.train as train_module

    events = []
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: True)
    groups = []
    monkeypatch.setattr(train_module.dist, "new_group", lambda **kw: groups.append(kw) or "long-timeout group")
    monkeypatch.setattr(train_module.dist, "barrier", lambda group: events.append(("barrier", group)) or None)
    checked = {"a/0.png": "sha of a/0.png"}
    sent = []

    def broadcast(objs, src, group, device):  # process 0 sends its list; the stand-in plays both ends
        events.append(("broadcast", group))
        if sent:
            objs[:] = sent[-1]
        else:
            sent.append(list(objs))

    monkeypatch.setattr(train_module.dist, "broadcast_object_list", broadcast)
    data = types.SimpleNamespace(split={"files": checked})
    monkeypatch.setattr(train_module, "build_data", lambda cfg, **kw: events.append(("load", kw)) or data)
    assert train_module._load_data(TINY, train_module._Dist(rank=0, world=2), False, False) is data
    waits = [("barrier", "long-timeout group"), ("broadcast", "long-timeout group")]
    assert events == [("load", {"skip_bad_images": False, "progress": False}), *waits]
    assert sent == [[None, checked]]  # no failure, and the files process 0 checked
    events.clear()
    assert train_module._load_data(TINY, train_module._Dist(rank=1, world=2), False, False) is data
    assert events == [*waits, ("load", {"skip_bad_images": False, "verified": checked, "progress": False})]
    # the waiting group outlasts a whole download (a healthy slow download must not time the others out)
    from vitcourse.data.cifar import DOWNLOAD_DEADLINE

    assert groups[0]["backend"] == "gloo" and groups[0]["timeout"].total_seconds() > DOWNLOAD_DEADLINE

    # a failure on process 0 reaches the others as the same one-sentence error (none waits forever)
    def fail(cfg, **kw):
        raise train_module.DataError("CIFAR-10 is not in /x; allow downloads.")

    monkeypatch.setattr(train_module, "build_data", fail)
    with pytest.raises(train_module.DataError, match="CIFAR-10 is not in /x"):
        train_module._load_data(TINY, train_module._Dist(rank=0, world=2), False, False)

    def told(objs, src, group, device):
        objs[0] = (True, "CIFAR-10 is not in /x; allow downloads.")
        objs[1] = None

    monkeypatch.setattr(train_module.dist, "broadcast_object_list", told)
    monkeypatch.setattr(train_module, "build_data", lambda cfg, **kw: pytest.fail("rank 1 loaded after rank 0 failed"))
    with pytest.raises(train_module.DataError, match="CIFAR-10 is not in /x"):
        train_module._load_data(TINY, train_module._Dist(rank=1, world=2), False, False)


def test_torchrun_a_data_error_on_process_zero_stops_every_process(tmp_path):
    """Two gloo processes, an image folder with a corrupt file: both stop with the sentence, none waits forever."""
    folder = _folder(tmp_path / "imgs", {"disk": 6, "square": 6})
    (folder / "disk" / "bad.png").write_bytes(b"not a png")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "vitcourse", "train", "--config", "quick", "--data", str(folder), "--batch-size", "4", "--max-steps", "2",
               "--out", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    # torchrun stops the other process once one has failed, so one or two copies of the sentence, and no hang
    assert 1 <= len(errors) <= 2, done.stderr[-3000:]
    assert all("disk/bad.png" in e and "--skip-bad-images" in e for e in errors), done.stderr[-3000:]
    assert not (tmp_path / "run" / "resume.pt").exists()
    # skipped: both processes train on the files process 0 checked (process 1 does not open them again)
    done = subprocess.run([*command, "--skip-bad-images"], env=_env(), capture_output=True, text=True, timeout=240,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 2 and len(_resume_state(tmp_path / "run")["rng"]) == 2
    assert "disk/bad.png" not in json.loads((tmp_path / "run" / "split.json").read_text())["files"]
    assert "1 corrupt images" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("model", ["vit", "cnn"])
def test_optimizer_decays_matrices_and_kernels_only(model):
    """vitcourse train's optimizer uses the course's one rule (vitcourse.optim): weight decay on the weights of
    Linear and Conv layers, enumerated here by module type, and on nothing else."""
    from vitcourse.train import build_optimizer

    cfg = TINY.replace(model=model, weight_decay=0.07)
    net = build_model(cfg, 10)
    expected = {f"{m}.weight" for m, module in net.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    names = {id(p): n for n, p in net.named_parameters()}
    groups = build_optimizer(cfg, net).param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.07 for p in g["params"]}
    rest = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == expected and rest == set(names.values()) - expected
    assert len(groups) == 2 and all(g["lr"] == cfg.lr for g in groups)
