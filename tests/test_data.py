"""Tests for vitcourse.data: CIFAR-10 on a fixture in the real on-disk format, image folders, synthetic data."""

from __future__ import annotations

import hashlib
import pickle
import socket
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from vitcourse.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DOWNLOAD_TIMEOUT,
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
    timeouts = []

    def offline(self):
        timeouts.append(socket.getdefaulttimeout())
        raise OSError("no network")

    monkeypatch.delenv("VITCOURSE_OFFLINE", raising=False)
    monkeypatch.setattr(CIFAR10, "download", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError, match="could not be downloaded"):
        load_data("cifar10", root=tmp_path)
    # the download ran with a socket timeout (so no network cannot hang it), restored afterwards
    assert timeouts == [DOWNLOAD_TIMEOUT] and socket.getdefaulttimeout() == before
    with pytest.warns(UserWarning, match="synthetic") as caught:
        bundle = load_data("cifar10", root=tmp_path, allow_synthetic=True, subset=50, val_size=20)
    assert bundle.source == "synthetic" and len(bundle.train) == 50
    message = str(caught[0].message)  # one sentence: where it looked, how to get it, what is used instead
    assert message.endswith("; using the offline synthetic stand-in instead.") and ". " not in message


def test_offline_variable_forbids_downloads(tmp_path, monkeypatch):
    def download(self):
        raise AssertionError("tried to download although VITCOURSE_OFFLINE is set")

    monkeypatch.setattr(CIFAR10, "download", download)
    monkeypatch.setenv("VITCOURSE_OFFLINE", "1")
    with pytest.raises(DataError, match="VITCOURSE_OFFLINE"):
        load_data("cifar10", root=tmp_path)
    with pytest.warns(UserWarning, match="VITCOURSE_OFFLINE"):
        assert load_data("cifar10", root=tmp_path, allow_synthetic=True, subset=50, val_size=20).source == "synthetic"


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
    assert len(bundle.test) == 6 and len(bundle.val) == 5 and len(bundle.train) == 49
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
    with pytest.raises(ValueError, match="val_size"):
        split_indices(10, 10, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_data("synthetic", subset=5, val_size=5)


def test_unreadable_image_is_named(tmp_path):
    root = _image_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"definitely not a png")
    bundle = load_data(str(root), image_size=8, val_size=1)
    with pytest.raises(DataError, match="broken.png"):
        for dataset in (bundle.train, bundle.val, bundle.test):
            for i in range(len(dataset)):
                dataset[i]


def test_unreadable_image_in_a_loader_worker_is_still_one_sentence(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            (root / name / f"junk{i}.png").write_bytes(b"definitely not a png")
    bundle = load_data(str(root), image_size=8, val_size=1)
    # spawn, not fork: forking a test process that has imported JAX (multithreaded) can deadlock
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    message = str(caught.value)  # not PyTorch's "Caught DataError in DataLoader worker ... Original Traceback"
    assert message.startswith("cannot read image ") and "junk" in message and "delete it" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
