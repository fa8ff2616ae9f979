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

The work on the text itself (parsing JSON, stripping magics, parsing cells, walking syntax
trees) happens in :mod:`.analyse`, in a short-lived process under limits; what comes back is
one summary per statement, and everything here is linear in those summaries.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .analyse import (  # noqa: F401
    _HIDDEN,
    LIMITS,
    MAX_BYTES,
    MAX_PROBLEMS,
    _escape,
    _read_bytes,
    analyse_cell,
    analyse_file,
    clean,
    defined_in_text,
    load_json,
    parse_cell,
    strip_ipython,
    summarise,
    utf8,
)


def visible(text: str) -> str:
    """``text`` with every character of :data:`_HIDDEN` except the newline shown escaped (``\\u202e``)."""
    return _HIDDEN.sub(lambda m: m.group() if m.group() == "\n" else _escape(m), utf8(str(text)))


@dataclass
class Cell:
    """A cell (``index`` counts from 1, as students see them)."""

    index: int
    kind: str
    source: str
    solution: bool = False
    analysis: dict | None = field(default=None, repr=False)  # computed by :mod:`.analyse` (else here, in-process)
    defines: list | None = field(default=None, repr=False)  # of a non-code cell: names after def/class


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
    summary: dict = field(default_factory=dict, repr=False)  # what :func:`.analyse.summarise` found

    def job(self) -> dict:
        """What the runner needs."""
        return {"id": self.id, "src": self.src, "cell": self.cell, "line": self.line, "definition": self.definition}


def notebook_chapter(path) -> str:
    """The chapter a notebook's metadata names ("" if none), read here (only to choose the batch's chapter)."""
    data, _ = load_json(path)
    meta = data.get("metadata") if isinstance(data, dict) and isinstance(data.get("metadata"), dict) else {}
    course = meta.get("vitcourse") if isinstance(meta.get("vitcourse"), dict) else {}
    return clean(course.get("chapter", ""), 10)


def read_notebook(path) -> Notebook:
    """Read and analyse a submission in a process of its own (:func:`.analyse.analyse_file`); never raises."""
    found = analyse_file(path)
    nb = Notebook(chapter=clean(found.get("chapter", ""), 10), ungradable=str(found.get("ungradable", "")))
    for c in found.get("cells", []):
        nb.cells.append(Cell(c["index"], c["kind"], c["source"], c["solution"], c.get("analysis"), c.get("defines")))
    return nb


def select_statements(nb: Notebook, answer_names: set[str]) -> tuple[list[Statement], list[str]]:
    """The statements to run, and problems to report (syntax errors, retyped answer cells, cells past a limit)."""
    problems, chosen = [], []
    for cell in nb.cells:
        if cell.kind != "code":
            defines = cell.defines if cell.defines is not None else defined_in_text(cell.source)
            if cell.solution or set(defines) & set(answer_names):
                problems.append(f"cell {cell.index} holds answer code but is a {cell.kind or 'non-code'} cell, "
                                "so it was not run; change it back to a code cell")
            continue
        found = cell.analysis if cell.analysis is not None else analyse_cell(cell.source)
        if found["skipped"]:
            problems.append(f"cell {cell.index} was not run: {found['skipped']}")
        problems += [f"cell {cell.index}, {e}; that part of the cell was not run" for e in found["errors"]]
        summaries = found["statements"]
        answer = cell.solution or any(set(s["names"]) & answer_names for s in summaries)
        chosen += [(cell, s) for s in summaries if s["definition"] or answer and not s["future"]]
    real = {n for _, s in chosen for n in s["names"] if not s["stub"]}
    statements = []
    for cell, s in chosen:
        if s["names"] and s["names"][0] in real and s["stub"]:
            continue  # a leftover stub next to a real answer (a duplicated cell)
        statements.append(Statement(f"s{len(statements)}", s["src"], cell.index, s["line"], tuple(s["names"]),
                                    s["definition"], s))
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"and {len(problems) - MAX_PROBLEMS} more problems of the same kinds"]
    return statements, problems


DYNAMIC = {"getattr", "setattr", "eval", "exec", "compile", "__import__", "globals", "vars", "locals",
           "importlib", "builtins", "__builtins__", "__dict__", "sys.modules", "__subclasses__"}
"""Names of dynamic access an instructor may want to review (``sys.modules`` as a pair)."""
_DYNAMIC_ATTRIBUTES = {"__dict__", "__subclasses__", "__builtins__", "__globals__", "__code__", "_C", "_python_dispatch"}
"""Flagged wherever they appear; the other names only as a name of their own (``eval(...)``,
``builtins.eval``), not as a method of some object (``model.eval()``, ``torch.compile``)."""


def _dynamic_at(parts: list[str], rooted: bool) -> int | None:
    """Where in a reference ``parts`` (``a.b.c`` as ``[a, b, c]``) dynamic access starts, or None."""
    if parts[:2] == ["sys", "modules"]:
        return 1
    for i, part in enumerate(parts):
        if part in _DYNAMIC_ATTRIBUTES:
            return i
        if part in DYNAMIC and rooted and (i == 0 or i == 1 and parts[0] in ("builtins", "__builtins__")):
            return i
    return None


def _summary(s: Statement) -> dict:
    if s.summary:
        return s.summary
    try:  # a Statement made elsewhere: summarise it here
        stmt = ast.parse(s.src).body[0]
        ast.increment_lineno(stmt, s.line - 1)
        s.summary = summarise(stmt, s.line, s.src)
    except (SyntaxError, ValueError, RecursionError, MemoryError, IndexError):
        s.summary = {}
    if "error" in s.summary or not s.summary:
        s.summary = {"names": list(s.names), "targets": [], "loads": [], "refs": [], "imports": {}}
    return s.summary


def _forbidden_in(root: str, attrs: list[str], loaded: bool, aliases: dict[str, str], forbidden) -> list[str]:
    """What ``forbidden`` matches in one name or attribute chain and its prefixes, in one pass over the chain.

    A dotted rule (``torch.softmax``, or a module) matches when the chain, its root resolved through the
    imports, starts with it; ``.name`` matches that attribute anywhere after the first component."""
    if not loaded:  # the outermost node is assigned to: only what it reads from counts
        if not attrs:
            return []
        attrs = attrs[:-1]
    parts = [*(aliases.get(root, root).split(".") if root else [""]), *attrs]
    if parts == [""]:
        return []
    full = ".".join(parts)
    found = []
    for f in forbidden:
        if f.startswith("."):
            want = f[1:].split(".")
            n = len(want)
            end = next((e for e in range(n + 1, len(parts) + 1) if parts[e - n: e] == want), None)
            if end is not None:
                found.append(".".join(parts[:end]))
        elif full == f or full.startswith(f + "."):
            found.append(full)
    return found


def rule_findings(statements: list[Statement], exercises) -> tuple[dict[str, list[str]], list[str]]:
    """``({exercise id: forbidden uses found}, [dynamic accesses found])``, each named with its cell and line.

    For an exercise, the code read is its answer definitions, every top-level statement that
    is not a definition, and, transitively, every top-level definition they refer to by name,
    except other exercises' answer definitions. Linear: each statement is read once per
    exercise and each name followed once (the summaries come from :func:`.analyse.summarise`).
    """
    summaries = {s.id: _summary(s) for s in statements}
    aliases, by_name = {}, {}
    for s in statements:
        aliases.update(summaries[s.id]["imports"])
        for name in dict.fromkeys((*s.names, *summaries[s.id]["targets"])):
            by_name.setdefault(name, []).append(s)
    forbidden_uses, dynamic = {}, []
    for ex in exercises:
        others = {n for e in exercises if e is not ex for n in e.answers}
        todo = [s for s in statements if set(s.names) & set(ex.answers) or not s.definition]
        seen: set[str] = set()
        followed: set[str] = set()
        while todo:
            s = todo.pop()
            if s.id in seen:
                continue
            seen.add(s.id)
            summary = summaries[s.id]
            for name in summary["loads"]:
                if name not in followed:
                    followed.add(name)
                    todo += [d for d in by_name.get(name, []) if d.id not in seen and not set(d.names) & others]
            for root, attrs, line, loaded in summary["refs"]:
                for name in _forbidden_in(root, attrs, loaded, aliases, ex.forbidden):
                    forbidden_uses.setdefault(ex.id, []).append(
                        f"cell {s.cell}, line {line} uses {clean(name, 80)}, which exercise {ex.id} forbids")
    for s in statements:
        for root, attrs, line, _ in summaries[s.id]["refs"]:
            parts = [root, *attrs] if root else attrs
            hit = _dynamic_at(parts, bool(root))
            if hit is not None:
                name = ".".join(parts[: hit + 1])
                dynamic.append(f"cell {s.cell}, line {line}: {clean(name if root else '.' + name, 60)}")
    return {k: sorted(set(v)) for k, v in forbidden_uses.items()}, sorted(set(dynamic))
