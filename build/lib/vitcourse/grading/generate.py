"""Student notebooks from solution notebooks (the solution notebook is the only source).

In ``notebooks/solutions/chNN_exercises.ipynb`` every answer sits between
``### BEGIN SOLUTION`` and ``### END SOLUTION`` lines, nbgrader's markers. The
student version replaces each region by ``# YOUR CODE HERE`` and
``raise NotImplementedError()`` at the marker's indentation, clears outputs, and
tags every cell that will raise until the student has answered (``check`` calls
and cells using the answers) with ``raises-exception``, so nbval accepts it.

:func:`annotate` gives the solution notebook's cells nbgrader metadata (solution
cells, and the ``check`` cells as autograded tests worth the exercise's points),
so instructors who use nbgrader can take the notebooks as they are.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

from .spec import Chapter

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
RAISES = "raises-exception"
_CHECK = re.compile(r"\bcheck\(\s*['\"]([\d.]+)['\"]")


def strip_solutions(source: str) -> str:
    """Replace every ``BEGIN``/``END SOLUTION`` region by a stub, keeping indentation.

    Raises:
        ValueError: if a region is not closed or an ``END`` has no ``BEGIN``.
    """
    out, inside = [], False
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ValueError(f"line {number}: '{BEGIN}' inside another solution region")
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
            inside = True
        elif marker == END:
            if not inside:
                raise ValueError(f"line {number}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"a '{BEGIN}' region is never closed with '{END}'")
    return "\n".join(out)


def _grade_id(chapter: Chapter, text: str) -> str:
    return f"{chapter.name}-" + re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _answer_of(chapter: Chapter, source: str) -> str | None:
    for ex in chapter.exercises:
        if any(re.search(rf"^\s*(def|class)\s+{re.escape(n)}\b", source, re.M) for n in ex.answers):
            return ex.id
    return None


def annotate(nb: dict, chapter: Chapter) -> dict:
    """Return a copy of a solution notebook with nbgrader and course metadata filled in."""
    nb = copy.deepcopy(nb)
    nb.setdefault("metadata", {})["vitcourse"] = {"chapter": chapter.name}
    for cell in nb["cells"]:
        source = _source(cell)
        meta = cell.setdefault("metadata", {})
        if cell["cell_type"] != "code":
            continue
        if BEGIN in source:
            ex_id = _answer_of(chapter, source) or "answer"
            meta["nbgrader"] = {"grade": False, "grade_id": _grade_id(chapter, f"answer-{ex_id}"),
                                "locked": False, "schema_version": 3, "solution": True, "task": False}
        elif (m := _CHECK.search(source)):
            ex = chapter.exercise(m.group(1))
            meta["nbgrader"] = {"grade": True, "grade_id": _grade_id(chapter, f"check-{ex.id}"),
                                "locked": True, "points": ex.points, "schema_version": 3,
                                "solution": False, "task": False}
    return nb


def _names_used(source: str) -> set[str]:
    try:
        return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    except SyntaxError:
        return set()


def _names_assigned(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def make_student(solution: dict, chapter: Chapter) -> dict:
    """The student notebook for a (solution) notebook dict: stubs, no outputs, tags for nbval."""
    nb = annotate(solution, chapter)
    tainted = {n for ex in chapter.exercises for n in ex.answers}  # names that raise until answered
    for cell in nb["cells"]:
        source = _source(cell)
        meta = cell["metadata"]
        if cell["cell_type"] != "code":
            continue
        cell["outputs"], cell["execution_count"] = [], None
        tags = [t for t in meta.get("tags", []) if t != RAISES]
        if BEGIN in source:
            cell["source"] = strip_solutions(source)
        elif _CHECK.search(source) or _names_used(source) & tainted:
            tags.append(RAISES)
            tainted |= _names_assigned(source)
        if tags:
            meta["tags"] = tags
        else:
            meta.pop("tags", None)
    nb["metadata"]["vitcourse"]["generated_from"] = f"solutions/{chapter.notebook}"
    return nb


def dumps(nb: dict) -> str:
    """Serialise a notebook the way Jupyter does (1-space indent, sorted keys, final newline)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def regenerate(notebooks_dir: Path, chapter: Chapter, write: bool = True) -> list[Path]:
    """Annotate ``solutions/<notebook>`` and write the student version; return the files that changed.

    With ``write=False`` nothing is written: the result lists the files that are out of date.
    """
    solution_path = notebooks_dir / "solutions" / chapter.notebook
    student_path = notebooks_dir / chapter.notebook
    solution = json.loads(solution_path.read_text())
    changed = []
    for path, nb in ((solution_path, annotate(solution, chapter)), (student_path, make_student(solution, chapter))):
        text = dumps(nb)
        if not path.exists() or path.read_text() != text:
            changed.append(path)
            if write:
                path.write_text(text)
    return changed
