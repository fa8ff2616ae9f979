"""The hidden checks' inputs are secret by default: a salt generated on the first run, kept with the
grades, reused by every later run into the same folder; an explicit salt (option or variable) wins."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from vitcourse.grading.batch import SALT_FILE, SALT_VARIABLE, GradingError, batch_salt, grade_folder, grader_version
from vitcourse.grading.grader import Limits, build_units
from vitcourse.grading.sandbox import bwrap_status
from vitcourse.grading.spec import hidden_folder, load_chapter

ROOT = Path(__file__).resolve().parent.parent
LIMITS = Limits(exercise_seconds=3.0, setup_seconds=4.0)


@pytest.fixture(autouse=True)
def no_salt_variable(monkeypatch):
    monkeypatch.delenv(SALT_VARIABLE, raising=False)


def arrays(tree) -> list[np.ndarray]:
    """Every input array of a task tree."""
    if isinstance(tree, dict):
        return ([np.asarray(tree["$arr"])] if "$arr" in tree else []) + [
            a for key, value in tree.items() if key != "$arr" for a in arrays(value)]
    return [a for item in tree for a in arrays(item)] if isinstance(tree, list) else []


def hidden_inputs(salt: str) -> list[np.ndarray]:
    return [a for u in build_units(load_chapter("ch01"), hidden_folder(), salt) if u.hidden for a in arrays(u.case.task)]


def test_a_secret_salt_is_generated_once_private_and_reused(tmp_path):
    salt, source = batch_salt(tmp_path)
    path = tmp_path / SALT_FILE
    assert source.endswith("(new)") and len(salt) == 64 and int(salt, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert batch_salt(tmp_path) == (salt, str(path))  # a rerun uses the same one
    (tmp_path / "other").mkdir()
    assert batch_salt(tmp_path / "other")[0] != salt  # another output folder: its own secret


def test_an_explicit_salt_wins_and_nothing_is_written(tmp_path, monkeypatch):
    assert batch_salt(tmp_path, "term 2") == ("term 2", "--salt")
    assert batch_salt(tmp_path, "") == ("", "--salt")  # unsalted, on purpose
    monkeypatch.setenv(SALT_VARIABLE, "from the environment")
    assert batch_salt(tmp_path) == ("from the environment", f"${SALT_VARIABLE}")
    assert batch_salt(tmp_path, "term 2")[0] == "term 2"
    assert not (tmp_path / SALT_FILE).exists()


def test_a_damaged_salt_is_refused_in_one_sentence(tmp_path):
    (tmp_path / SALT_FILE).write_text("short\n")
    with pytest.raises(GradingError, match="empty or damaged"):
        batch_salt(tmp_path)
    (tmp_path / SALT_FILE).unlink()
    os.symlink("/etc/passwd", tmp_path / SALT_FILE)
    with pytest.raises(GradingError, match="cannot read the grading salt"):
        batch_salt(tmp_path)


def test_the_default_salt_changes_the_hidden_inputs_from_the_public_repository(tmp_path):
    salt, _ = batch_salt(tmp_path)
    computable, secret = hidden_inputs(""), hidden_inputs(salt)
    assert computable and len(computable) == len(secret)
    assert not any(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(computable, secret))
    assert grader_version(hidden_folder(), salt) != grader_version(hidden_folder(), "")


def test_a_rerun_keeps_results_graded_with_the_kept_salt(tmp_path):
    subs, out = tmp_path / "subs", tmp_path / "out"
    subs.mkdir()
    (subs / "ada.ipynb").write_text((ROOT / "notebooks" / "solutions" / "ch01_exercises.ipynb").read_text())
    kwargs = dict(workers=1, chapter="ch01", limits=LIMITS, progress=False, unsafe_no_sandbox=not bwrap_status()[0])
    first = grade_folder(subs, out, **kwargs)
    salt = (out / SALT_FILE).read_text()
    assert first.graded == 1 and first.results[0].total == first.results[0].max_total
    assert salt not in (out / "grades.csv").read_text() + "".join(p.read_text() for p in (out / "feedback").iterdir())
    second = grade_folder(subs, out, **kwargs)
    assert (second.graded, second.kept) == (0, 1) and (out / SALT_FILE).read_text() == salt
    stored = json.loads(next((out / "results").iterdir()).read_text())
    assert stored["version"] == grader_version(hidden_folder(), salt.strip())
