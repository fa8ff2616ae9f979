"""``check("1.2")``: the public checks a student runs in their own notebook.

The checks evaluate the same tasks the grader sends (:mod:`vitcourse.grading.runtime`)
against the notebook's own definitions and compare with the course's reference
code. A failure raises :class:`CheckFailed` with one message: which check, what it
tests, and what differed (expected and actual shape, or the largest error). The
public checks are also part of the grade; the grader adds hidden checks on other
inputs and edge cases, run outside the student's kernel.
"""

from __future__ import annotations

import inspect

from . import runtime
from .spec import find_exercise, seed_for


class CheckFailed(AssertionError):
    """A public check failed; the message says which and why (shown without a traceback in Jupyter)."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"CheckFailed: {self}"]


class NotDoneYet(NotImplementedError):
    """The exercise's code still raises ``NotImplementedError``."""

    def _render_traceback_(self) -> list[str]:
        return [f"NotDoneYet: {self}"]


def check(exercise_id: str, namespace: dict | None = None) -> None:
    """Run the public checks of one exercise on the caller's definitions.

    Args:
        exercise_id: ``"1.2"`` and so on, as written above the exercise.
        namespace: where the answers are defined (default: the caller's globals,
            i.e. the notebook).

    Raises:
        NotDoneYet: if the answer still raises ``NotImplementedError``.
        CheckFailed: naming the first check that failed and why.
    """
    if namespace is None:
        namespace = inspect.currentframe().f_back.f_globals
    chapter, exercise = find_exercise(exercise_id)
    total = len(exercise.public)
    for index, chk in enumerate(exercise.public):
        case = chk.build(seed_for(chapter.name, exercise.id, index, hidden=False))
        label = f"{exercise.id} check {index + 1} of {total} ({chk.description})"
        runtime.seed_all(0)
        try:
            actual = runtime.to_plain(runtime.evaluate(case.task, namespace))
        except NotImplementedError:
            raise NotDoneYet(
                f"{exercise.id} is not answered yet: replace `raise NotImplementedError()` in "
                f"{' / '.join(exercise.answers)} with your code, run that cell, then this one."
            ) from None
        except runtime.Unsupported as err:
            raise CheckFailed(f"{label} failed: your code returned {err}.") from None
        except Exception as err:  # noqa: BLE001 - report the student's error in one line
            raise CheckFailed(f"{label} failed: your code raised {type(err).__name__}: {err}") from None
        problem = case.compare(actual, case.expected)
        if problem:
            raise CheckFailed(f"{label} failed: {problem}.")
    print(f"{exercise.id} {exercise.title}: all {total} public checks passed. "
          "Grading also runs hidden checks on other inputs.")
