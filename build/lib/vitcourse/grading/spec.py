"""Exercise specifications: chapters, exercises, checks, and how answers are compared.

A chapter's public spec (``vitcourse/grading/exercises/chNN.py``) defines
``CHAPTER = Chapter(...)`` with its exercises and their *public* checks; its hidden
spec (``grading/hidden/chNN.py`` at the repository root, never in the installed
package) defines ``HIDDEN = {exercise_id: [Check, ...]}``. A :class:`Check` builds a :class:`Case` from a seeded random
generator: the task to send (:mod:`vitcourse.grading.runtime`), the expected value
computed here with the course's reference code, and the comparison to apply.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = [
    "Case", "Check", "Exercise", "Chapter", "allclose", "exact", "verdict",
    "load_chapter", "chapter_names", "find_exercise",
]

Comparison = Callable[..., "str | None"]
"""``compare(actual, expected, hidden=False)`` returns ``None`` when they agree, else one sentence
saying why not. With ``hidden=True`` (a hidden check) the sentence shows neither expected values
nor values the student's code chose (which could carry the hidden inputs); see :func:`verdict`."""


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, np.ndarray) else type(value).__name__


def allclose(atol: float = 1e-5, rtol: float = 1e-4) -> Comparison:
    """Compare arrays (or lists of arrays) by shape, then largest absolute error.

    Messages name the expected and actual shapes, or the largest error and the tolerance;
    they never show input or expected values. For a hidden check the largest error is
    rounded to one significant digit and differing entries are not counted.
    """

    def compare(actual, expected, where: str = "", hidden: bool = False) -> str | None:
        if isinstance(expected, (list, tuple)):
            if not isinstance(actual, list) or len(actual) != len(expected):
                got = f"a list of {len(actual)}" if isinstance(actual, list) else f"a {_describe(actual)}"
                return f"expected {len(expected)} outputs{where}, got {got}"
            for i, (a, e) in enumerate(zip(actual, expected)):
                problem = compare(a, e, f" in output {i}", hidden)
                if problem:
                    return problem
            return None
        expected = np.asarray(expected)
        if not isinstance(actual, np.ndarray):
            if isinstance(actual, (int, float)) and not isinstance(actual, bool) and expected.ndim == 0:
                actual = np.asarray(actual)
            else:
                return f"expected a tensor of shape {_shape(expected)}{where}, got a {_describe(actual)}"
        if actual.shape != expected.shape:
            return f"expected shape {_shape(expected)}{where}, got shape {_shape(actual)}"
        if expected.dtype == bool or actual.dtype == bool:
            wrong = int(np.sum(actual.astype(bool) != expected))
            if wrong and hidden:
                return f"some of the {expected.size} entries differ{where}"
            return None if wrong == 0 else f"{wrong} of {expected.size} entries differ{where}"
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        if np.isnan(a).any() and not np.isnan(e).any():
            return f"the output contains NaN{where}"
        finite = np.isfinite(e) & np.isfinite(a)
        if not np.array_equal(np.isfinite(a), np.isfinite(e)) or not np.array_equal(a[~finite], e[~finite]):
            return f"the output has infinite or NaN entries where finite values were expected{where}"
        err = np.abs(a - e)[finite]
        tol = atol + rtol * np.abs(e)[finite]
        if err.size and (err > tol).any():
            largest = f"{err.max():.1g}" if hidden else f"{err.max():.3g}"
            return f"largest absolute error {largest}{where} (tolerance {atol:g} + {rtol:g}·|expected|)"
        return None

    return compare


def exact() -> Comparison:
    """Compare integers, strings, lists and dicts exactly (for counts and shape tables).

    For a public check the message shows the expected and actual values (or the first
    entry that differs); for a hidden check only what kind of difference it is.
    """

    def compare(actual, expected, hidden: bool = False) -> str | None:
        plain = _plain(actual)
        if plain == expected:
            return None
        if isinstance(expected, dict) and isinstance(plain, dict):
            missing = sorted(set(expected) - set(plain))
            extra = sorted(set(plain) - set(expected))
            if hidden:
                return ("some entries are missing or unexpected" if missing or extra
                        else "some entries differ from the expected ones")
            if missing or extra:
                return f"missing entries {missing[:5]}, unexpected entries {extra[:5]}"
            wrong = sorted(k for k in expected if plain[k] != expected[k])
            return f"{len(wrong)} entries differ, for example {wrong[0]!r}: expected {expected[wrong[0]]}, got {plain[wrong[0]]}"
        if isinstance(expected, int) and isinstance(plain, (int, float)):
            return "the number differs from the expected one" if hidden else f"expected {expected}, got {plain}"
        return f"expected a {type(expected).__name__}, got a {_describe(actual)}"

    return compare


def _plain(value):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"tensor of shape {tuple(value.shape)}"
    if value is None:
        return "None"
    return type(value).__name__


def verdict(case: "Case", actual, hidden: bool) -> str | None:
    """Compare ``actual`` with the case's expected value; for a hidden check, safely.

    A comparison that does not take ``hidden`` (a custom one) has its hidden-check
    messages replaced by a generic sentence, since they may show values.
    """
    if "hidden" in inspect.signature(case.compare).parameters:
        return case.compare(actual, case.expected, hidden=hidden)
    problem = case.compare(actual, case.expected)
    return "the result differs from the expected one" if problem and hidden else problem


@dataclass
class Case:
    """One concrete check: the task to run, the expected plain value, and how to compare."""

    task: dict
    expected: Any
    compare: Comparison = field(default_factory=allclose)


@dataclass
class Check:
    """A check of one exercise.

    Args:
        description: what it tests, in words a student can act on (shown in feedback;
            say *what* is tested, never the inputs).
        build: ``build(rng) -> Case``; ``rng`` is a ``numpy.random.Generator`` seeded
            per check, so the inputs are the same in every run.
        weight: share of the exercise's points (relative to its other checks).
    """

    description: str
    build: Callable[[np.random.Generator], Case]
    weight: float = 1.0


@dataclass
class Exercise:
    """One graded exercise.

    Args:
        id: ``"<chapter>.<n>"``, for example ``"1.2"``.
        title: a few words.
        points: points the exercise is worth.
        answers: names the student defines (functions or classes); cells defining
            them are the answer cells.
        statement: one-paragraph task statement (also in the notebook).
        public: the checks ``check(id)`` runs in the student's notebook.
        forbidden: names the statement forbids (``"torch.softmax"``; ``".softmax"`` for any
            attribute of that name; a module such as ``"timm"`` covers everything in it). A use
            in the answer's code costs all of the exercise's points.
    """

    id: str
    title: str
    points: float
    answers: tuple[str, ...]
    statement: str
    public: list[Check] = field(default_factory=list)
    forbidden: tuple[str, ...] = ("timm",)


@dataclass
class Chapter:
    """The exercises of one chapter's exercise notebook.

    Args:
        name: ``"ch01"``; the notebooks are ``notebooks/solutions/ch01_exercises.ipynb``
            (source) and ``notebooks/ch01_exercises.ipynb`` (student version).
        title: the chapter's title.
        exercises: in notebook order.
        sandbox_modules: ``vitcourse`` core modules the grading sandbox exposes
            (the ones students may build on; never the ones they are asked to write).
        preload: modules the sandbox imports once, comma-separated.
        exercise_seconds: wall time shared by all checks of one exercise (``--time-limit`` overrides it).
    """

    name: str
    title: str
    exercises: list[Exercise]
    sandbox_modules: tuple[str, ...] = ()
    preload: str = "torch"
    exercise_seconds: float = 10.0

    @property
    def notebook(self) -> str:
        """File name of the exercise notebook."""
        return f"{self.name}_exercises.ipynb"

    def exercise(self, exercise_id: str) -> Exercise:
        """The exercise with this id; ``KeyError`` with the valid ids otherwise."""
        for ex in self.exercises:
            if ex.id == exercise_id:
                return ex
        raise KeyError(f"no exercise {exercise_id!r} in {self.name}; valid ids: {[e.id for e in self.exercises]}")


def chapter_names() -> list[str]:
    """Names of every chapter with an exercise spec (``ch01``, ``ch02``, ...), sorted."""
    from . import exercises

    return sorted(m.name for m in pkgutil.iter_modules(exercises.__path__) if m.name.startswith("ch"))


def load_chapter(name: str) -> Chapter:
    """The public spec ``CHAPTER`` of chapter ``name``."""
    if name not in chapter_names():
        raise KeyError(f"no exercises for chapter {name!r}; known chapters: {chapter_names()}")
    return importlib.import_module(f"vitcourse.grading.exercises.{name}").CHAPTER


HIDDEN_VARIABLE = "VITCOURSE_HIDDEN"
"""Environment variable naming the folder of hidden checks (like ``vitcourse grade --hidden``)."""


def hidden_folder(path=None) -> Path | None:
    """The folder of hidden checks: ``path``, else ``$VITCOURSE_HIDDEN``, else ``grading/hidden`` of a checkout."""
    candidates = [path, os.environ.get(HIDDEN_VARIABLE), Path(__file__).resolve().parents[2] / "grading" / "hidden"]
    return next((Path(p) for p in candidates if p and (Path(p) / "__init__.py").is_file()), None)


def load_hidden(name: str, folder: Path) -> dict[str, list[Check]]:
    """The hidden checks of chapter ``name`` from ``folder`` (``{}`` if it has none)."""
    path = Path(folder) / f"{name}.py"
    if not path.is_file():
        return {}
    spec = importlib.util.spec_from_file_location(f"vitcourse_hidden_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HIDDEN


def find_exercise(exercise_id: str) -> tuple[Chapter, Exercise]:
    """The chapter and exercise of an id like ``"1.2"``."""
    try:
        number = int(str(exercise_id).split(".")[0])
    except ValueError:
        raise KeyError(f"{exercise_id!r} is not an exercise id; ids look like '1.2'.") from None
    chapter = load_chapter(f"ch{number:02d}")
    return chapter, chapter.exercise(str(exercise_id))


def seed_for(chapter: str, exercise_id: str, index: int, hidden: bool, salt: str = "") -> np.random.Generator:
    """The generator of one check: fixed per (chapter, exercise, check, public/hidden).

    ``salt`` (an instructor's secret, see ``vitcourse grade --salt``) changes the inputs of
    the hidden checks only: the public ones stay those ``check()`` runs in the notebook.
    """
    key = f"{chapter}/{exercise_id}/{index}/{'hidden' if hidden else 'public'}"
    if hidden and salt:
        key += "/" + salt
    digest = hashlib.sha256(key.encode())
    return np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
