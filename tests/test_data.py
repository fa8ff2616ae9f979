"""Tests for vitcourse.data: CIFAR-10 on a fixture in the real on-disk format, image folders, synthetic data."""

from __future__ import annotations

import hashlib
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from vitcourse.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataError,
    denormalize,
    load_data,
    make_synthetic,
    split_indices,
    train_transform,
)

PER_BATCH = 12  # images per CIFAR batch file in the fixture: 60 train, 12 test


def _write_cifar(root, seed: int = 0) -> dict:
    """Write a tiny CIFAR-10 in the real layout (pickled dicts of (N, 3072) uint8 rows, R then G then B planes).

    Returns the raw arrays and the md5 of every file, so a test can point torchvision's checksums at them.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw, md5 = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        entry = {"batch_label": name, "labels": labels, "data": rows, "filenames": [f"{name}_{i}.png" for i in range(PER_BATCH)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        raw[name] = (rows, labels)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": PER_BATCH, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    for f in folder.iterdir():
        md5[f.name] = hashlib.md5(f.read_bytes()).hexdigest()
    return {"raw": raw, "md5": md5, "folder": folder}


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """A CIFAR-10 fixture whose files torchvision's checksum test accepts (only inside this test)."""
    fixture = _write_cifar(tmp_path / "data")
    md5 = fixture["md5"]
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    fixture["root"] = tmp_path / "data"
    return fixture


def test_cifar10_fixture_loads_with_split_and_normalisation(cifar):
    bundle = load_data("cifar10", root=cifar["root"], val_size=10, seed=3, download=False)
    assert bundle.source == "cifar10"
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (50, 10, PER_BATCH)
    assert bundle.classes[3] == "cat" and bundle.mean == CIFAR10_MEAN
    # test image 5: the file's row holds the red plane, then green, then blue, each 32x32 in reading order
    rows, labels = cifar["raw"]["test_batch"]
    image, label = bundle.test[5]
    expected = torch.from_numpy(rows[5].reshape(3, 32, 32).astype(np.float32) / 255)
    torch.testing.assert_close(denormalize(image, bundle.mean, bundle.std), expected, atol=1e-5, rtol=0)
    assert label == labels[5]
    # normalisation: (x - mean) / std with CIFAR-10's statistics
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(image, (expected - mean) / std, atol=1e-5, rtol=0)


def test_cifar10_split_is_seeded_disjoint_and_complete(cifar):
    a = load_data("cifar10", root=cifar["root"], val_size=10, seed=0, download=False)
    b = load_data("cifar10", root=cifar["root"], val_size=10, seed=0, download=False)
    c = load_data("cifar10", root=cifar["root"], val_size=10, seed=1, download=False)
    assert torch.equal(a.val.indices, b.val.indices)
    assert not torch.equal(a.val.indices, c.val.indices)
    both = torch.cat([a.train.indices, a.val.indices])
    assert sorted(both.tolist()) == list(range(60))


def test_env_variable_sets_the_cache_directory(cifar, monkeypatch):
    monkeypatch.setenv("VITCOURSE_DATA", str(cifar["root"]))
    assert load_data("cifar10", val_size=10, download=False).source == "cifar10"


def test_real_checksums_reject_the_fixture(tmp_path):
    # Without the test's checksum patch, torchvision verifies the real md5s: the fixture is "corrupt".
    _write_cifar(tmp_path)
    with pytest.raises(DataError, match="corrupt"):
        load_data("cifar10", root=tmp_path, download=False)


def test_corrupt_batch_file_is_reported(cifar):
    path = cifar["folder"] / "data_batch_2"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt or incomplete.*delete"):
        load_data("cifar10", root=cifar["root"], download=False)


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_data("cifar10", root=tmp_path, download=False)


def test_missing_cifar_falls_back_to_synthetic_only_when_allowed(tmp_path, monkeypatch):
    import vitcourse.data.cifar as data_module

    calls = []

    def offline(url, dest, **kwargs):
        calls.append((url, (tmp_path / ".cifar10.lock").exists()))
        raise OSError("no network")

    monkeypatch.delenv("VITCOURSE_OFFLINE", raising=False)
    monkeypatch.setattr(data_module, "download_file", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        load_data("cifar10", root=tmp_path)
    # one download attempt, made while holding the lock file other processes wait on
    assert calls == [(data_module.CIFAR10_URL, True)]
    with pytest.warns(UserWarning, match="synthetic") as caught:
        bundle = load_data("cifar10", root=tmp_path, allow_synthetic=True, subset=50, val_size=20)
    assert bundle.source == "synthetic" and len(bundle.train) == 50
    message = str(caught[0].message)  # one sentence: where it looked, how to get it, what is used instead
    assert message.endswith("; using the offline synthetic stand-in instead.") and ". " not in message


def test_offline_variable_forbids_downloads(tmp_path, monkeypatch):
    import vitcourse.data.cifar as data_module

    def download(*args, **kwargs):
        raise AssertionError("tried to download although VITCOURSE_OFFLINE is set")

    monkeypatch.setattr(data_module, "download_file", download)
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    with pytest.raises(DataError, match="VITCOURSE_OFFLINE"):
        load_data("cifar10", root=tmp_path)
    with pytest.warns(UserWarning, match="VITCOURSE_OFFLINE"):
        assert load_data("cifar10", root=tmp_path, allow_synthetic=True, subset=50, val_size=20).source == "synthetic"


@pytest.fixture
def slow_server():
    """A local HTTP server that sends 100 bytes, one every 0.02 s: it always answers, but slowly."""
    import http.server
    import threading
    import time

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass  # the client gave up

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"
    server.shutdown()


def test_download_has_a_total_deadline_not_only_a_read_timeout(tmp_path, slow_server):
    import time

    from vitcourse.data.cifar import download_file

    start = time.monotonic()
    # every read gets a byte well within the 10 s read timeout, so only the total deadline can stop it
    with pytest.raises(TimeoutError, match="longer than"):
        download_file(slow_server, tmp_path / "file", timeout=10, deadline=0.5)
    assert time.monotonic() - start < 3
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_checks_the_checksum_and_writes_the_file_whole(tmp_path, slow_server):
    import hashlib

    from vitcourse.data.cifar import download_file

    with pytest.raises(ValueError, match="checksum"):
        download_file(slow_server, tmp_path / "file", timeout=10, deadline=30, md5="0" * 32)
    assert list(tmp_path.iterdir()) == []
    download_file(slow_server, tmp_path / "file", timeout=10, deadline=30, md5=hashlib.md5(b"x" * 100).hexdigest())
    assert (tmp_path / "file").read_bytes() == b"x" * 100


def test_subset_keeps_a_seeded_part_of_the_training_split(cifar):
    full = load_data("cifar10", root=cifar["root"], val_size=10, download=False)
    small = load_data("cifar10", root=cifar["root"], val_size=10, subset=7, download=False)
    assert len(small.train) == 7
    assert set(small.train.indices.tolist()) <= set(full.train.indices.tolist())
    assert torch.equal(small.val.indices, full.val.indices)


# --------------------------------------------------------------------------- image folders


def _image_folder(root, counts: dict[str, int], size=(40, 30)):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_image_folder_is_resized_and_split(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"cats": 20, "dogs": 20, "owls": 20})
    bundle = load_data(str(root), image_size=16, val_size=5, augment="basic")
    assert bundle.classes == ("cats", "dogs", "owls")
    assert bundle.source == f"folder:{root}"
    # stratified: per class 10% test (2) and 10% of the rest validation (1)
    assert len(bundle.test) == 6 and len(bundle.val) == 3 and len(bundle.train) == 51
    record = bundle.split_record()
    for part in ("train", "val", "test"):
        names = record[part]
        assert sorted(n.split("/")[0] for n in names) == sorted(bundle.classes[y] for y in getattr(bundle, part).labels.tolist())
    assert set(record["train"]).isdisjoint(record["test"]) and set(record["val"]).isdisjoint(record["test"])
    assert len(record["files"]) == 60 and all(len(h) == 64 for h in record["files"].values())
    image, label = bundle.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label in (0, 1, 2)
    labels = [bundle.test[i][1] for i in range(len(bundle.test))] + bundle.val.labels.tolist()
    assert set(labels) <= {0, 1, 2}


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    _image_folder(tmp_path / "ds" / "train", {"a": 6, "b": 6})
    _image_folder(tmp_path / "ds" / "test", {"a": 2, "b": 3})
    bundle = load_data(str(tmp_path / "ds"), image_size=8, val_size=2)
    assert len(bundle.test) == 5 and len(bundle.train) + len(bundle.val) == 12
    assert sorted(bundle.test[i][1] for i in range(5)) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "no class sub-folders"),
        (lambda p: (_image_folder(p, {"a": 3}), (p / "empty").mkdir(), p)[2], "holds no images"),
    ],
)
def test_image_folder_errors_are_clear(tmp_path, make, message):
    path = make(tmp_path / "folder")
    with pytest.raises(DataError, match=message):
        load_data(str(path))


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset"):
        load_data("imagenet21k")


# --------------------------------------------------------------------------- synthetic data and augmentation


def test_synthetic_is_deterministic_balanced_and_shaped():
    a, ya = make_synthetic(200, seed=7)
    b, yb = make_synthetic(200, seed=7)
    c, _ = make_synthetic(200, seed=8)
    assert a.shape == (200, 32, 32, 3) and a.dtype == np.uint8 and ya.dtype == np.int64
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)
    assert np.bincount(ya, minlength=10).tolist() == [20] * 10


def test_synthetic_classes_are_not_given_away_by_colour():
    # Nearest class mean on the average colour of each image should be close to chance (10%).
    x, y = make_synthetic(2000, seed=0)
    colour = x.reshape(len(x), -1, 3).mean(1)  # (n, 3)
    train, test = slice(0, 1500), slice(1500, None)
    centres = np.stack([colour[train][y[train] == k].mean(0) for k in range(10)])  # (10, 3)
    guess = np.linalg.norm(colour[test][:, None] - centres[None], axis=-1).argmin(1)
    assert (guess == y[test]).mean() < 0.2


def test_seeded_augmentation_is_reproducible():
    bundle = load_data("synthetic", augment="strong", subset=20, val_size=10)
    first, label = bundle.train[(3, 123)]
    again, _ = bundle.train[(3, 123)]
    other, _ = bundle.train[(3, 124)]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    state = torch.get_rng_state()
    bundle.train[(4, 5)]
    assert torch.equal(state, torch.get_rng_state()), "seeded access must not touch the global random state"


def test_augmentations_keep_shape_and_validation_is_not_augmented():
    for augment in ("none", "basic", "strong", "resized"):
        out = train_transform(augment, 32, CIFAR10_MEAN, CIFAR10_STD)(torch.zeros(3, 32, 32, dtype=torch.uint8))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    bundle = load_data("synthetic", augment="strong", subset=20, val_size=10)
    torch.testing.assert_close(bundle.val[0][0], bundle.val[0][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_transform("extreme", 32, CIFAR10_MEAN, CIFAR10_STD)


def test_split_indices_rejects_impossible_sizes():
    train, val = split_indices(10, 3, seed=0)
    assert len(train) == 7 and len(val) == 3
    with pytest.raises(ValueError, match="cannot hold out 10 of 10"):
        split_indices(10, 10, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_data("synthetic", subset=5, val_size=5)


def test_bad_image_is_named_before_any_image_is_used(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="broken.png") as caught:
        load_data(str(root), image_size=8, val_size=1)  # found at loading, not in epoch 2
    assert "--skip-bad-images" in str(caught.value) and len(str(caught.value).splitlines()) == 1
    bundle = load_data(str(root), image_size=8, val_size=1, skip_bad_images=True)
    assert bundle.skipped == {"corrupt images": 1} and "1 corrupt images" in bundle.describe()
    assert "a/broken.png" not in bundle.split_record()["files"]


def test_unreadable_image_in_a_loader_worker_is_still_one_sentence(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    bundle = load_data(str(root), image_size=8, val_size=1)
    for f in root.rglob("*.png"):  # damaged after the check (e.g. a disk failing mid-run)
        f.write_bytes(b"definitely not a png")
    # spawn, not fork: forking a test process that has imported JAX (multithreaded) can deadlock
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    message = str(caught.value)  # not PyTorch's "Caught DataError in DataLoader worker ... Original Traceback"
    assert message.startswith("cannot read image ") and str(root) in message and "delete it" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1


# --------------------------------------------------------------------------- folder checks (issue 13)


def test_hidden_appledouble_and_non_image_files_are_skipped_at_any_depth_and_counted(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"disk": 6, "square": 6})
    _image_folder(root / "square" / ".thumbs", {"deeper": 2})  # square/.thumbs/deeper/*.png: a hidden sub-folder
    _image_folder(root / "disk" / "sub", {".cache": 1})  # a hidden folder two levels down
    (root / "disk" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork, not a PNG
    (root / "disk" / ".DS_Store").write_bytes(b"junk")
    (root / "disk" / "notes.txt").write_text("not an image")
    (root / ".hidden-class").mkdir()
    (root / "README.md").write_text("loose file")
    bundle = load_data(str(root), image_size=8, val_size=2)
    assert bundle.classes == ("disk", "square")
    assert bundle.skipped == {"hidden files and folders": 4, "AppleDouble ._* files": 1, "non-image files": 1,
                              "files outside class folders": 1}
    files = bundle.split_record()["files"]
    assert len(files) == 12 and not any("thumbs" in f or "._" in f or ".cache" in f for f in files)
    line = bundle.describe()
    assert "8 train / 2 val / 2 test (skipped 4 hidden files and folders, " in line and "1 AppleDouble ._* files" in line


def test_unreadable_and_corrupt_files_are_described_differently_ten_named_then_counted(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    root = _image_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    for i in range(12):
        (root / "a" / f"bad{i:02d}.png").write_bytes(b"not a png")
    buffer = __import__("io").BytesIO()
    PILImage.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(buffer, format="JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buffer.getvalue()[:-200])  # verify() alone accepts this one
    (root / "b" / "link.png").symlink_to(tmp_path / "nowhere.png")  # unreadable: a broken link
    locked = root / "b" / "0.png"
    real_read = type(locked).read_bytes

    def read_bytes(self):  # no read permission (chmod 000 does not stop root, so simulated)
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(type(locked), "read_bytes", read_bytes)
    with pytest.raises(DataError) as caught:
        load_data(str(root), image_size=8)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.count(".png") + message.count(".jpg") == 10
    assert message.startswith(f"15 of the 22 images in {root} cannot be used: 2 unreadable (no read permission")
    assert "b/0.png" in message and "b/link.png" in message  # the unreadable ones are named first
    assert "13 corrupt (damaged, truncated or not an image: a/bad00.png" in message and "and 5 more" in message
    assert message.endswith("or pass --skip-bad-images to leave them out.")
    bundle = load_data(str(root), image_size=8, skip_bad_images=True)
    assert bundle.skipped == {"unreadable images": 2, "corrupt images": 13}
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 7


def test_checking_a_large_folder_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
    import vitcourse.data.folder as data_module

    root = _image_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    monkeypatch.setattr(data_module, "CHECK_PROGRESS_FROM", 5)
    load_data(str(root), image_size=8)
    assert "checking images" in capsys.readouterr().err
    load_data(str(root), image_size=8, progress=False)  # --no-progress: no bar, however large the folder
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(data_module, "CHECK_PROGRESS_FROM", 500)
    load_data(str(root), image_size=8)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "counts, message",
    [
        ({"cats": 10}, "has only one class folder (cats); a classifier needs at least two, so add a folder"),
        ({"cats": 1, "dogs": 1}, "cats has only 1 usable image, too few for one training, one validation and one "
                                 "test image; add at least 2 more."),
        ({"cats": 5, "dogs": 2}, "dogs has only 2 usable images, too few for one training, one validation and one "
                                 "test image; add at least 1 more."),
    ],
)
def test_too_few_classes_or_images_say_what_to_add(tmp_path, counts, message):
    root = _image_folder(tmp_path / "imgs", counts)
    with pytest.raises(DataError) as caught:
        load_data(str(root), image_size=8, val_size=5000)
    assert message in str(caught.value) and "val_size" not in str(caught.value)


def test_a_file_given_as_the_image_folder_is_named_as_a_file(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\n")
    with pytest.raises(DataError, match=r"labels.txt is a file, not a folder; pass a folder of images"):
        load_data(str(tmp_path / "labels.txt"))


def test_the_split_of_a_file_does_not_depend_on_the_other_files(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"a": 30, "b": 30})
    before = load_data(str(root), image_size=8).split_record()
    (root / "a" / "7.png").unlink()
    after = load_data(str(root), image_size=8).split_record()
    # one file less: no remaining file moves from train into test (the order is a hash of each file's own path)
    assert not (set(before["train"]) & set(after["test"]))
    assert set(after["test"]) <= set(before["test"])


def test_a_link_loop_inside_a_class_reads_each_image_once(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    (root / "a" / "again").symlink_to(root / "a", target_is_directory=True)  # a/again/again/... forever
    bundle = load_data(str(root), image_size=8)
    assert len(bundle.split_record()["files"]) == 10


def test_a_sub_folder_that_cannot_be_listed_is_reported_not_silently_missing(tmp_path, monkeypatch):
    import os

    root = _image_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    _image_folder(root / "a", {"private": 3})
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root, so the refusal is simulated
        if os.fspath(path) == str(root / "a" / "private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"1 unreadable \(no read permission or a broken link: a/private\)"):
        load_data(str(root), image_size=8)
    assert load_data(str(root), image_size=8, skip_bad_images=True).skipped == {"unreadable images": 1}


def test_files_checked_by_another_process_are_used_without_opening_them(tmp_path, monkeypatch):
    import vitcourse.data.folder as data_module

    root = _image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    first = load_data(str(root), image_size=8)
    files = first.split_record()["files"]
    _image_folder(root / "a", {"late": 2})  # appeared after process 0 checked: not used by the others either
    monkeypatch.setattr(data_module, "_check_image", lambda f: pytest.fail(f"{f} was opened again"))
    again = load_data(str(root), image_size=8, verified=files)
    assert again.split_record() == first.split_record()


def test_an_edited_stand_in_generator_never_reads_the_old_cache(monkeypatch):
    from vitcourse.data import synthetic as data_module

    before = data_module._generator_digest()
    assert before == data_module._generator_digest()  # stable for the same code

    def _draw(labels, rng, s):  # an edited generator: blank images
        return np.zeros((len(labels), s, s, 3), dtype=np.uint8)

    monkeypatch.setattr(data_module, "_draw", _draw)
    assert data_module._generator_digest() != before
