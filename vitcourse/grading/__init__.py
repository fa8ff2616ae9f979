"""Graded exercises and the solution checker.

Students call :func:`check` in their notebook; instructors run ``vitcourse grade``.
Read the package in this order: :mod:`.notebook` (what is taken from a submission),
:mod:`.sandbox` (where it runs), :mod:`.inside` (what runs there), :mod:`.grader` (how
each check is judged), :mod:`.batch` (a folder in, grades out). :mod:`.spec` and
``exercises/`` define the checks; ``notebooks/README.md`` says how to add a chapter's.
"""

from __future__ import annotations

__all__ = ["check"]


def __getattr__(name: str):
    if name == "check":  # lazy: importing the package must not import the specs and torch
        from .public import check

        return check
    raise AttributeError(f"module 'vitcourse.grading' has no attribute {name!r}")
