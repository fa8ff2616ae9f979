"""Exercise specifications: chapters, exercises, checks, and how an answer is compared.

``vitcourse/grading/exercises/chNN.py`` defines ``CHAPTER = Chapter(...)`` with the public
checks; ``grading/hidden/chNN.py`` at the repository's root (never in the installed
package) defines ``HIDDEN = {exercise_id: [Check, ...]}``. A :class:`Check` builds a
:class:`Case` from a seeded generator: the task (:mod:`.runtime`), the expected value from
the course's reference code, and a comparison returning ``None`` or one sentence. The
sentence is shown only for public checks; it names shapes and errors, never inputs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

Comparison = Callable[[Any, Any], "str | None"]


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"tensor of shape {tuple(value.shape)}"
    return "None" if value is None else type(value).__name__


def allclose(atol: float = 1e-5, rtol: float = 1e-4) -> Comparison:
    """Compare arrays (or lists of arrays) by shape, then by largest absolute error."""

    def compare(actual, expected, where: str = "") -> str | None:
        if isinstance(expected, (list, tuple)):
            if not isinstance(actual, list) or len(actual) != len(expected):
                got = f"a list of {len(actual)}" if isinstance(actual, list) else f"a {_describe(actual)}"
                return f"expected {len(expected)} outputs{where}, got {got}"
            return next(filter(None, (compare(a, e, f" in output {i}") for i, (a, e) in enumerate(zip(actual, expected)))), None)
        expected = np.asarray(expected)
        if isinstance(actual, (int, float)) and not isinstance(actual, bool) and expected.ndim == 0:
            actual = np.asarray(actual)
        if not isinstance(actual, np.ndarray):
            return f"expected a tensor of shape {tuple(expected.shape)}{where}, got a {_describe(actual)}"
        if actual.shape != expected.shape:
            return f"expected shape {tuple(expected.shape)}{where}, got shape {tuple(actual.shape)}"
        if expected.dtype == bool or actual.dtype == bool:
            wrong = int(np.sum(actual.astype(bool) != expected))
            return f"{wrong} of {expected.size} entries differ{where}" if wrong else None
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        finite = np.isfinite(e) & np.isfinite(a)
        if not np.array_equal(np.isfinite(a), np.isfinite(e)) or not np.array_equal(a[~finite], e[~finite]):
            return f"the output has infinite or NaN entries where finite values were expected{where}"
        err = np.abs(a - e)[finite]
        if err.size and (err > atol + rtol * np.abs(e)[finite]).any():
            return f"largest absolute error {err.max():.3g}{where} (tolerance {atol:g} + {rtol:g}·|expected|)"
        return None

    return compare


def _plain(value):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, (list, dict)):
        return [_plain(v) for v in value] if isinstance(value, list) else {k: _plain(v) for k, v in value.items()}
    return value


def exact() -> Comparison:
    """Compare integers, strings, lists and dicts exactly (counts, tables of shapes)."""

    def compare(actual, expected) -> str | None:
        plain = _plain(actual)
        if plain == expected:
            return None
        if isinstance(expected, dict) and isinstance(plain, dict):
            missing, extra = sorted(set(expected) - set(plain)), sorted(set(plain) - set(expected))
            if missing or extra:
                return f"missing entries {missing[:5]}, unexpected entries {extra[:5]}"
            wrong = sorted(k for k in expected if plain[k] != expected[k])
            return f"{len(wrong)} entries differ, for example {wrong[0]!r}: expected {expected[wrong[0]]}, got {plain[wrong[0]]}"
        if isinstance(expected, int) and isinstance(plain, (int, float)):
            return f"expected {expected}, got {plain}"
        return f"expected a {type(expected).__name__}, got a {_describe(actual)}"

    return compare


@dataclass
class Case:
    """One concrete check: the task to run, the expected plain value, and how to compare."""

    task: dict
    expected: Any
    compare: Comparison = field(default_factory=allclose)


@dataclass
class Check:
    """A check: its description (shown in feedback: what it tests, never the inputs),
    ``build(rng) -> Case`` and its share (``weight``) of the exercise's points."""

    description: str
    build: Callable[[np.random.Generator], Case]
    weight: float = 1.0


@dataclass
class Exercise:
    """A graded exercise. ``answers``: the names the student defines (their cells are the answer
    cells). ``forbidden``: what the statement forbids (``"torch.softmax"``; ``".softmax"`` for any
    attribute of that name; a module covers everything in it): a use costs all the points.
    ``forbidden_ops``: the same rule by meaning, checked on the operators that actually run."""

    id: str
    title: str
    points: float
    answers: tuple[str, ...]
    statement: str
    public: list[Check] = field(default_factory=list)
    forbidden: tuple[str, ...] = ("timm",)
    forbidden_ops: tuple[str, ...] = ()
    """Operators the checks may not run, however they are reached (``"aten._softmax"``; ``"autograd"``:
    anything autograd's engine runs): watched at run time inside the sandbox."""


@dataclass
class Chapter:
    """A chapter's exercise notebook. ``sandbox_modules``: ``vitcourse`` modules students may
    build on; ``preload``: what the sandbox imports once; ``exercise_seconds``: each exercise's budget."""

    name: str
    title: str
    exercises: list[Exercise]
    sandbox_modules: tuple[str, ...] = ()
    preload: str = "torch"
    exercise_seconds: float = 10.0

    @property
    def notebook(self) -> str:
        return f"{self.name}_exercises.ipynb"

    def exercise(self, exercise_id: str) -> Exercise:
        for ex in self.exercises:
            if ex.id == exercise_id:
                return ex
        raise KeyError(f"no exercise {exercise_id!r} in {self.name}; valid ids: {[e.id for e in self.exercises]}")


def chapter_names() -> list[str]:
    """``ch01``, ``ch02``, ...: every chapter with an exercise spec."""
    from . import exercises

    return sorted(m.name for m in pkgutil.iter_modules(exercises.__path__) if m.name.startswith("ch"))


def load_chapter(name: str) -> Chapter:
    if name not in chapter_names():
        raise KeyError(f"no exercises for chapter {name!r}; known chapters: {chapter_names()}")
    return importlib.import_module(f"vitcourse.grading.exercises.{name}").CHAPTER


def find_exercise(exercise_id: str) -> tuple[Chapter, Exercise]:
    """The chapter and exercise of an id like ``"1.2"``."""
    try:
        chapter = load_chapter(f"ch{int(str(exercise_id).split('.')[0]):02d}")
    except ValueError:
        raise KeyError(f"{exercise_id!r} is not an exercise id; ids look like '1.2'.") from None
    return chapter, chapter.exercise(str(exercise_id))


def hidden_folder(path=None) -> Path | None:
    """The hidden checks: ``path``, else ``$VITCOURSE_HIDDEN``, else ``grading/hidden`` of a source checkout."""
    candidates = [path, os.environ.get("VITCOURSE_HIDDEN"), Path(__file__).resolve().parents[2] / "grading" / "hidden"]
    return next((Path(p) for p in candidates if p and (Path(p) / "__init__.py").is_file()), None)


def load_hidden(name: str, folder: Path) -> dict[str, list[Check]]:
    """``HIDDEN`` of ``folder/<name>.py`` (``{}`` if there is none)."""
    path = Path(folder) / f"{name}.py"
    if not path.is_file():
        return {}
    spec = importlib.util.spec_from_file_location(f"vitcourse_hidden_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HIDDEN


def seed_for(chapter: str, exercise_id: str, index: int, hidden: bool, salt: str = "") -> np.random.Generator:
    """The generator of one check. ``salt`` (the instructor's secret) changes the hidden checks' inputs only."""
    key = f"{chapter}/{exercise_id}/{index}/{'hidden' if hidden else 'public'}" + (f"/{salt}" if hidden and salt else "")
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
