"""Reading submitted notebooks defensively and choosing what the grader runs.

A submission may be anything: not JSON, cells deleted, duplicated or turned into
Markdown, syntax errors, IPython magics, a training loop that runs for an hour.
:func:`read_cells` never raises on bad input; it returns the code cells it could
read and a list of problems in plain words. :func:`select_statements` then keeps
only what defines the graded answers:

* in every code cell: imports, ``def``/``class`` definitions, and assignments
  whose right-hand side calls nothing (``SCALE = 0.5``, ``Tensor = torch.Tensor``);
* answer cells (nbgrader ``solution`` cells, or cells defining an answer name)
  run in full, statement by statement.

Each top-level statement is run on its own, so one failing statement costs only
itself. A cell with a syntax error is split at its top-level blocks and the
blocks that parse are kept. When an answer name is defined more than once (a
duplicated cell), definitions that still hold the generated stub (``# YOUR CODE
HERE`` then ``raise NotImplementedError()``) give way to a real one.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

MAX_NOTEBOOK_BYTES = 32 * 2**20


@dataclass
class Cell:
    """A cell of a submitted notebook (``index`` counts from 1, as students see them)."""

    index: int
    cell_type: str
    source: str
    solution: bool = False  # nbgrader "solution": true
    grade_id: str = ""


@dataclass
class Notebook:
    """What could be read from a submission."""

    cells: list[Cell] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Statement:
    """One top-level statement to execute, with where it came from."""

    id: str
    src: str
    cell: int
    line: int
    names: tuple[str, ...] = ()  # names it defines (def/class)

    @property
    def file(self) -> str:
        """Pseudo file name used in tracebacks: ``<cell N>``."""
        return f"<cell {self.cell}>"


def _source(value) -> str:
    if isinstance(value, list):
        return "".join(v for v in value if isinstance(v, str))
    return value if isinstance(value, str) else ""


def read_cells(path: Path) -> Notebook:
    """Read a notebook file without ever raising; problems are reported in ``Notebook.problems``."""
    nb = Notebook()
    try:
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            nb.problems.append(f"the file is {size / 2**20:.0f} MiB, larger than the "
                               f"{MAX_NOTEBOOK_BYTES // 2**20} MiB the grader reads; clear the outputs and resubmit")
            return nb
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        nb.problems.append("the file is not UTF-8 text, so it is not a notebook")
        return nb
    except json.JSONDecodeError as err:
        nb.problems.append(f"the file is not valid notebook JSON (line {err.lineno}, column {err.colno}: {err.msg})")
        return nb
    except OSError as err:
        nb.problems.append(f"the file could not be read ({err.strerror})")
        return nb
    if not isinstance(data, dict):
        nb.problems.append("the file is JSON but not a notebook (no cell list)")
        return nb
    raw_cells = data.get("cells")
    if raw_cells is None and isinstance(data.get("worksheets"), list) and data["worksheets"]:
        raw_cells = data["worksheets"][0].get("cells")  # nbformat 3
    if not isinstance(raw_cells, list):
        nb.problems.append("the file is JSON but not a notebook (no cell list)")
        return nb
    nb.metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    for i, raw in enumerate(raw_cells, start=1):
        if not isinstance(raw, dict):
            nb.problems.append(f"cell {i} is malformed and was skipped")
            continue
        meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        grader = meta.get("nbgrader") if isinstance(meta.get("nbgrader"), dict) else {}
        nb.cells.append(Cell(
            index=i,
            cell_type=str(raw.get("cell_type", "")),
            source=_source(raw.get("source", raw.get("input", ""))),
            solution=bool(grader.get("solution")),
            grade_id=str(grader.get("grade_id", "")),
        ))
    return nb


_MAGIC = re.compile(r"^(\s*)([%!].*|.*\?\s*)$")


def strip_ipython(source: str) -> str | None:
    """Replace IPython-only lines (``%magic``, ``!shell``, ``obj?``) by ``pass``; ``None`` for a non-Python cell magic."""
    lines = source.split("\n")
    if lines and lines[0].startswith("%%"):
        if lines[0].split()[0] not in ("%%time", "%%timeit", "%%capture"):
            return None
        lines[0] = ""
    return "\n".join(
        (m.group(1) + "pass") if (m := _MAGIC.match(line)) and not line.strip().startswith("#") else line
        for line in lines
    )


def _blocks(source: str) -> list[tuple[int, str]]:
    """Split source into top-level blocks ``(first line, text)`` at unindented lines."""
    blocks: list[tuple[int, list[str]]] = []
    continuation = ("else", "elif", "except", "finally", ")", "]", "}")
    pending_decorator = False
    for number, line in enumerate(source.split("\n"), start=1):
        starts_block = line[:1] not in ("", " ", "\t", "#") and not line.startswith(continuation)
        if starts_block and not pending_decorator or not blocks:
            blocks.append((number, [line]))
        else:
            blocks[-1][1].append(line)
        if starts_block:
            pending_decorator = line.startswith("@")
    return [(start, "\n".join(lines)) for start, lines in blocks]


def _segment(source: str, stmt: ast.stmt) -> tuple[int, str]:
    """``(first line, source)`` of a top-level statement, decorators included."""
    decorators = getattr(stmt, "decorator_list", [])
    if decorators:
        first = min(d.lineno for d in decorators)
        return first, "\n".join(source.split("\n")[first - 1 : stmt.end_lineno])
    return stmt.lineno, ast.get_source_segment(source, stmt) or ""


def parse_cell(source: str) -> tuple[list[ast.stmt], list[tuple[int, str]], list[str]]:
    """Parse a code cell into top-level statements and their source.

    Returns:
        ``(statements, sources, errors)``: each source is ``(first line in the cell, text)``.
    """
    try:
        tree = ast.parse(source)
        return tree.body, [_segment(source, s) for s in tree.body], []
    except SyntaxError:
        pass
    statements, sources, errors = [], [], []
    for start, block in _blocks(source):
        try:
            tree = ast.parse(block)
        except SyntaxError as err:
            errors.append(f"line {start + (err.lineno or 1) - 1}: SyntaxError: {err.msg}")
            continue
        for stmt in tree.body:
            line, text = _segment(block, stmt)
            sources.append((line + start - 1, text))
            statements.append(stmt)
    return statements, sources, errors


def _calls_nothing(node: ast.AST) -> bool:
    return not any(isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.comprehension))
                   for n in ast.walk(node))


_STUB = re.compile(r"^[ \t]*# YOUR CODE HERE[ \t]*\n[ \t]*raise NotImplementedError\(\)", re.M)


def _is_stub(source: str) -> bool:
    """True if a definition's source still holds the stub the student notebook was generated with.

    Only that pattern counts: a real answer may raise ``NotImplementedError`` itself
    (for an option it does not support) and must not give way to a leftover stub.
    """
    return _STUB.search(source) is not None


def _defined_names(stmt: ast.stmt) -> tuple[str, ...]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return (stmt.name,)
    return ()


def _keep(stmt: ast.stmt, answer_cell: bool) -> bool:
    if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
        return False
    if answer_cell:
        return True
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
        return _calls_nothing(stmt.value)
    return False


def select_statements(nb: Notebook, answer_names: set[str]) -> tuple[list[Statement], list[str]]:
    """Choose the statements to execute from a notebook's code cells.

    Args:
        nb: the result of :func:`read_cells`.
        answer_names: every name the chapter's exercises ask students to define.

    Returns:
        ``(statements, problems)``: statements in notebook order with ids ``s0, s1, ...``;
        problems are sentences for the feedback (syntax errors, retyped answer cells).
    """
    problems: list[str] = []
    chosen: list[tuple[Cell, ast.stmt, tuple[int, str]]] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            if cell.solution or any(re.search(rf"^\s*(def|class)\s+{re.escape(n)}\b", cell.source, re.M)
                                    for n in answer_names):
                problems.append(f"cell {cell.index} holds answer code but is a {cell.cell_type or 'non-code'} "
                                "cell, so it was not run; change it back to a code cell")
            continue
        source = strip_ipython(cell.source)
        if source is None:
            continue
        stmts, sources, errors = parse_cell(source)
        problems.extend(f"cell {cell.index}, {e}; the code in that part of the cell was not run" for e in errors)
        answer_cell = cell.solution or any(set(_defined_names(s)) & answer_names for s in stmts)
        chosen.extend((cell, s, src) for s, src in zip(stmts, sources) if _keep(s, answer_cell))
    real = {n for _, s, src in chosen for n in _defined_names(s) if not _is_stub(src[1])}
    statements = []
    for cell, stmt, src in chosen:
        names = _defined_names(stmt)
        if names and names[0] in real and _is_stub(src[1]):
            continue  # a leftover stub next to a real answer (duplicated cell)
        statements.append(Statement(f"s{len(statements)}", src[1], cell.index, src[0], names))
    return statements, problems


_CHECK_CALL = re.compile(r"check\(\s*['\"](\d+)\.\d+['\"]")


def detect_chapter(nb: Notebook, known: list[str]) -> str | None:
    """Which exercise notebook this is: notebook metadata, else nbgrader ids, else ``check("N.k")`` calls."""
    meta = nb.metadata.get("vitcourse")
    if isinstance(meta, dict) and meta.get("chapter") in known:
        return meta["chapter"]
    votes: dict[str, int] = {}
    for cell in nb.cells:
        m = re.match(r"(ch\d\d)", cell.grade_id)
        if m and m.group(1) in known:
            votes[m.group(1)] = votes.get(m.group(1), 0) + 1
        for number in _CHECK_CALL.findall(cell.source):
            name = f"ch{int(number):02d}"
            if name in known:
                votes[name] = votes.get(name, 0) + 1
    return max(votes, key=votes.get) if votes else None
