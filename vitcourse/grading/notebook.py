"""Reading a submission defensively, choosing what the grader runs, and checking the statements' rules.

A submission may be anything: a symlink, a FIFO, 2 GiB of zeros, JSON nested 100,000
deep, lone surrogates, cells deleted, duplicated or retyped, syntax errors, magics, an
hour-long training loop. :func:`read_notebook` never raises: it returns the cells it could
read, or the one sentence that says why the file cannot be graded. :func:`select_statements`
keeps, in notebook order, imports, ``def``/``class``, call-free assignments, and every
top-level statement of an *answer cell* (an nbgrader solution cell, or one defining an
answer name); a leftover generated stub gives way to a real definition of the same name.
:func:`rule_findings` reads the kept code for calls an exercise forbids and for dynamic
access (``getattr``, ``eval``, ...) that an instructor may want to review.
"""

from __future__ import annotations

import ast
import json
import os
import re
import stat
from dataclasses import dataclass, field

MAX_BYTES = 32 * 2**20


def utf8(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON, not in UTF-8) replaced."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")
"""Characters that do not show as themselves: C0/C1 controls, line and paragraph separators, zero-width and
direction controls (U+202A-202E, U+2066-2069, ...), which could make a name or message read as something else."""


def _escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def visible(text: str) -> str:
    """``text`` with every character of :data:`_HIDDEN` except the newline shown escaped (``\\u202e``)."""
    return _HIDDEN.sub(lambda m: m.group() if m.group() == "\n" else _escape(m), utf8(str(text)))


def clean(text, limit: int = 400) -> str:
    """``text`` on one printable line, at most ``limit`` characters: surrogates replaced, and control, separator,
    zero-width and direction-control characters shown escaped (``\\u202e``), so nothing can reorder or hide text."""
    text = _HIDDEN.sub(_escape, utf8(str(text)))
    return text if len(text) <= limit else text[: limit - 4] + " ..."


@dataclass
class Cell:
    """A cell (``index`` counts from 1, as students see them)."""

    index: int
    kind: str
    source: str
    solution: bool = False


@dataclass
class Notebook:
    """What could be read: the cells and the chapter it names, or why it is ungradable."""

    cells: list[Cell] = field(default_factory=list)
    chapter: str = ""
    ungradable: str = ""


@dataclass
class Statement:
    """One top-level statement the runner executes."""

    id: str
    src: str
    cell: int
    line: int
    names: tuple[str, ...] = ()  # what it defines (def/class)
    definition: bool = False  # import, def, class or call-free assignment: cheap by nature

    def job(self) -> dict:
        """What the runner needs."""
        return {"id": self.id, "src": self.src, "cell": self.cell, "line": self.line, "definition": self.definition}


def _read_bytes(path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a symlink or FIFO never blocks us
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("it is not a regular file (a folder, FIFO or device); submit the notebook file itself")
        if info.st_size > MAX_BYTES:
            raise ValueError(f"it is {info.st_size / 2**20:.0f} MiB, more than the {MAX_BYTES // 2**20} MiB "
                             "the grader reads; clear the outputs and resubmit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_BYTES + 1)[:MAX_BYTES]
    finally:
        os.close(fd)


def read_notebook(path) -> Notebook:
    """Read a submission; never raises (see the module docstring)."""
    nb = Notebook()
    try:
        if os.path.islink(path):
            raise ValueError("it is a symbolic link, not a notebook file; submit the notebook itself")
        data = json.loads(_read_bytes(path).decode("utf-8"), parse_int=lambda s: int(s) if len(s) < 20 else 0)
    except ValueError as err:
        nb.ungradable = str(err) if "submit" in str(err) else "the file is not notebook JSON (UTF-8 text)"
        return nb
    except RecursionError:
        nb.ungradable = "the file's JSON is nested too deeply to be a notebook"
        return nb
    except OSError as err:
        nb.ungradable = ("it is a symbolic link, not a notebook file; submit the notebook itself" if err.errno == 40
                         else f"the file could not be read ({clean(err.strerror)})")
        return nb
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list):
        nb.ungradable = "the file is JSON but not a notebook (it has no cell list)"
        return nb
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    course = meta.get("vitcourse") if isinstance(meta.get("vitcourse"), dict) else {}
    nb.chapter = clean(course.get("chapter", ""), 10)
    for i, raw in enumerate(cells, start=1):
        if not isinstance(raw, dict):
            continue
        source = raw.get("source", "")
        source = "".join(s for s in source if isinstance(s, str)) if isinstance(source, list) else source
        grader = (raw.get("metadata") or {}).get("nbgrader") if isinstance(raw.get("metadata"), dict) else None
        nb.cells.append(Cell(i, clean(raw.get("cell_type", ""), 20),
                             utf8(source) if isinstance(source, str) else "",
                             isinstance(grader, dict) and grader.get("solution") is True))
    return nb


_MAGIC = re.compile(r"^(\s*)([%!].*|.*\?\s*)$")
_STUB = re.compile(r"^[ \t]*# YOUR CODE HERE[ \t]*\n[ \t]*raise NotImplementedError\(\)", re.M)


def strip_ipython(source: str) -> str | None:
    """IPython-only lines (``%magic``, ``!shell``, ``obj?``) become ``pass``; ``None`` for a non-Python cell magic."""
    lines = source.split("\n")
    if lines and lines[0].startswith("%%"):
        if lines[0].split()[0] not in ("%%time", "%%timeit", "%%capture"):
            return None
        lines[0] = ""
    return "\n".join(m.group(1) + "pass" if (m := _MAGIC.match(line)) and not line.strip().startswith("#") else line
                     for line in lines)


def _segment(source: str, stmt: ast.stmt) -> tuple[int, str]:
    first = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", []))])
    return first, "\n".join(source.split("\n")[first - 1 : stmt.end_lineno])


def parse_cell(source: str) -> tuple[list[tuple[ast.stmt, int, str]], list[str]]:
    """Top-level statements ``(node, first line, text)`` of a cell; a syntax error costs only its top-level block."""
    try:
        return [(s, *_segment(source, s)) for s in ast.parse(source).body], []
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        pass
    blocks: list[tuple[int, list[str]]] = []
    for number, line in enumerate(source.split("\n"), start=1):
        new_block = line[:1] not in ("", " ", "\t", "#", ")", "]", "}") and not re.match(r"(else|elif|except|finally)\b", line)
        if (new_block and not (blocks and blocks[-1][1][-1].startswith("@"))) or not blocks:
            blocks.append((number, [line]))
        else:
            blocks[-1][1].append(line)
    found, errors = [], []
    for start, lines in blocks:
        text = "\n".join(lines)
        try:
            found += [(s, line + start - 1, src) for s in ast.parse(text).body for line, src in [_segment(text, s)]]
        except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
            message = getattr(err, "msg", type(err).__name__)
            errors.append(f"line {start + (getattr(err, 'lineno', 1) or 1) - 1}: SyntaxError: {clean(message, 100)}")
    return found, errors


def _defines(stmt: ast.stmt) -> tuple[str, ...]:
    return (stmt.name,) if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ()


def _is_definition(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return not (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__")
    calls = (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.comprehension, ast.Lambda)
    return (isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None
            and not any(isinstance(n, calls) for n in ast.walk(stmt.value)))


def select_statements(nb: Notebook, answer_names: set[str]) -> tuple[list[Statement], list[str]]:
    """The statements to run, and problems to report (syntax errors, retyped answer cells)."""
    problems, chosen = [], []
    for cell in nb.cells:
        if cell.kind != "code":
            if cell.solution or any(re.search(rf"^\s*(def|class)\s+{re.escape(n)}\b", cell.source, re.M)
                                    for n in answer_names):
                problems.append(f"cell {cell.index} holds answer code but is a {cell.kind or 'non-code'} cell, "
                                "so it was not run; change it back to a code cell")
            continue
        source = strip_ipython(cell.source)
        if source is None:
            continue
        found, errors = parse_cell(source)
        problems += [f"cell {cell.index}, {e}; that part of the cell was not run" for e in errors]
        answer = cell.solution or any(set(_defines(s)) & answer_names for s, _, _ in found)
        chosen += [(cell, s, line, src) for s, line, src in found if _is_definition(s) or answer and not (
            isinstance(s, ast.ImportFrom) and s.module == "__future__")]
    real = {n for _, s, _, src in chosen for n in _defines(s) if not _STUB.search(src)}
    statements = []
    for cell, stmt, line, src in chosen:
        if _defines(stmt) and _defines(stmt)[0] in real and _STUB.search(src):
            continue  # a leftover stub next to a real answer (a duplicated cell)
        statements.append(Statement(f"s{len(statements)}", src, cell.index, line, _defines(stmt), _is_definition(stmt)))
    return statements, problems


DYNAMIC = {"getattr", "setattr", "eval", "exec", "compile", "__import__", "globals", "vars", "locals",
           "importlib", "builtins", "__builtins__", "__dict__", "sys.modules", "__subclasses__"}


def _aliases(trees) -> dict[str, str]:
    names = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                              for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return "." + parts[-1] if parts else None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def rule_findings(statements: list[Statement], exercises) -> tuple[dict[str, list[str]], list[str]]:
    """``({exercise id: forbidden uses found}, [dynamic accesses found])``, each named with its cell and line.

    For an exercise, the code read is its answer definitions, every top-level statement that
    is not a definition, and, transitively, every top-level definition they refer to by name,
    except other exercises' answer definitions.
    """
    trees = {s.id: ast.parse(s.src) for s in statements}
    for s in statements:
        ast.increment_lineno(trees[s.id], s.line - 1)
    aliases, by_name = _aliases(trees.values()), {}
    for s in statements:
        for node in trees[s.id].body:
            targets = [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
            for name in (*s.names, *targets):
                by_name.setdefault(name, []).append(s)
    forbidden_uses, dynamic = {}, []
    for ex in exercises:
        others = {n for e in exercises if e is not ex for n in e.answers}
        todo = [s for s in statements if set(s.names) & set(ex.answers) or not s.definition]
        seen: set[str] = set()
        while todo:
            s = todo.pop()
            if s.id in seen:
                continue
            seen.add(s.id)
            for node in ast.walk(trees[s.id]):
                if isinstance(node, ast.Name):
                    todo += [d for d in by_name.get(node.id, []) if not set(d.names) & others]
                name = _dotted(node, aliases) if isinstance(node, (ast.Name, ast.Attribute)) else None
                hit = name and next((f for f in ex.forbidden if name == f or name.startswith(f + ".")
                                     or (f.startswith(".") and name.endswith(f))), None)
                if hit and isinstance(getattr(node, "ctx", None), ast.Load):
                    forbidden_uses.setdefault(ex.id, []).append(
                        f"cell {s.cell}, line {node.lineno} uses {clean(name, 80)}, which exercise {ex.id} forbids")
    for s in statements:
        for node in ast.walk(trees[s.id]):
            name = _dotted(node, {}) if isinstance(node, (ast.Name, ast.Attribute)) else None
            if name and (name in DYNAMIC or name.split(".")[-1] in DYNAMIC or name.split(".")[0] in DYNAMIC):
                dynamic.append(f"cell {s.cell}, line {node.lineno}: {clean(name, 60)}")
    return {k: sorted(set(v)) for k, v in forbidden_uses.items()}, sorted(set(dynamic))
