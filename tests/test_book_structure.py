"""Every chapter page has the parts a reader expects, and `hide_solutions` really hides solutions.

The first test reads the chapter notebooks and needs no build. The second rebuilds the book
with the one `_config.yml` option flipped, reusing the execution cache of `make book`, so it
takes seconds; like the browser test it skips without a built book, except in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
IN_CI = os.environ.get("CI", "").lower() == "true"
SOLUTION_DIV = re.compile(r'<div class="(?=[^"]*\bsolution\b)(?=[^"]*\badmonition\b)')
EXERCISE_DIV = re.compile(r'<div class="(?=[^"]*\bexercise\b)(?=[^"]*\badmonition\b)')


GRADED_ELSEWHERE = {"ch09": "ch05"}
"""Chapters whose graded exercises live in another chapter's notebook (chapter 9 returns to chapter 5's training)."""


def chapters() -> list[str]:
    """The chapter files of `_toc.yml` and their section pages (e.g. 5.1), in order (without suffix)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    (part,) = [p for p in toc["parts"] if p.get("caption") == "Chapters"]

    def walk(entries):
        for entry in entries:
            yield entry["file"]
            yield from walk(entry.get("sections", []))

    return list(walk(part["chapters"]))


def markdown_of(chapter: str) -> str:
    """All Markdown cells of a chapter notebook, joined."""
    nb = nbformat.read(ROOT / f"{chapter}.ipynb", as_version=4)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize("chapter", chapters())
def test_chapter_has_objectives_summary_exercises_and_references(chapter: str) -> None:
    text = markdown_of(chapter)
    assert re.search(r"```\{admonition\} Learning objectives", text), f"{chapter}: no learning objectives"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    for needed in ("Summary", "Exercises", "References"):
        assert needed in headings, f"{chapter}: no '## {needed}' section (has {headings})"
    assert headings.index("Summary") < headings.index("Exercises") < headings.index("References"), (
        f"{chapter}: the page should end with Summary, Exercises, References in that order"
    )
    labels = re.findall(r"```\{exercise\}\n:label: (\S+)", text)
    answered = re.findall(r"```\{solution\} (\S+)", text)
    assert len(labels) >= 2, f"{chapter}: at least two in-chapter exercises, found {labels}"
    assert sorted(labels) == sorted(answered), f"{chapter}: exercises {labels} but solutions for {answered}"
    number = Path(chapter).name[:4]  # "ch06"
    number = GRADED_ELSEWHERE.get(number, number)
    assert f"notebooks/{number}_exercises.ipynb" in text, f"{chapter}: does not point to its graded notebook"
    assert (ROOT / "notebooks" / f"{number}_exercises.ipynb").is_file()


def test_hide_solutions_leaves_every_solution_out(tmp_path: Path) -> None:
    cache = BUILD / ".jupyter_cache"
    if not (BUILD / "html" / "index.html").is_file() or not cache.is_dir():
        if IN_CI:
            pytest.fail("no built book with its execution cache in _build (CI runs `make book` before the tests)")
        pytest.skip("no built book in _build: run `make book` first")

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["sphinx"]["config"]["hide_solutions"] is False, "the published default shows solutions"
    config["sphinx"]["config"]["hide_solutions"] = True
    # The copy lives outside the repository, so its relative paths are made absolute.
    config["execute"]["cache"] = str(cache)
    config["sphinx"]["local_extensions"] = {
        name: str(ROOT / path) for name, path in config["sphinx"]["local_extensions"].items()
    }
    config["bibtex_bibfiles"] = [str(ROOT / path) for path in config["bibtex_bibfiles"]]
    config_file = tmp_path / "_config.yml"
    config_file.write_text(yaml.safe_dump(config))

    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jupyter_book), "build", "--all", "-W", "--keep-going", "--config", str(config_file),
         "--path-output", str(tmp_path / "out"), str(ROOT)],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, f"the build with hide_solutions failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    for chapter in chapters():
        shown = (BUILD / "html" / f"{chapter}.html").read_text(encoding="utf-8")
        hidden = (tmp_path / "out" / "_build" / "html" / f"{chapter}.html").read_text(encoding="utf-8")
        assert SOLUTION_DIV.search(shown), f"{chapter}: the default build shows no solution to hide"
        assert not SOLUTION_DIV.search(hidden), f"{chapter}: a solution is still in the page with hide_solutions"
        assert len(EXERCISE_DIV.findall(hidden)) == len(EXERCISE_DIV.findall(shown)) > 0, (
            f"{chapter}: hiding the solutions must keep every exercise"
        )
