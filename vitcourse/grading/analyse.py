"""Everything the grader does with a submission's text, run in a short-lived process of its own.

``python -I -S vitcourse/grading/analyse.py PATH`` reads one notebook file and prints, as JSON,
what :mod:`.notebook` needs: the chapter it names, its cells, and for every code cell its
top-level statements, each summarised once (the names it defines, assigns and reads, the
dotted names it uses, its imports, whether it is a definition). :func:`analyse_file` starts
that process under a CPU-time and memory limit and a wall-clock timeout, so no submission's
text can hold the grader's interpreter lock, and whatever it costs, it costs only that
submission: past a limit it gets one sentence, and the batch goes on.

Every step is linear in the text, and the text is bounded (:data:`LIMITS`): a line longer
than ``line`` characters, a cell longer than ``cell`` characters, with more than ``statements``
top-level statements, more than ``nodes`` syntax-tree nodes or nesting deeper than ``depth``
is not run (the student is told which cell and why); a notebook past the totals is
ungradable. No regular expression here can backtrack on a long line: the only patterns
applied to submitted text are anchored, with one unbounded repetition of a single character
class followed by a literal that class cannot match.

The module imports nothing outside the standard library (it starts in about 20 ms with
``-S``); nbformat is imported only to convert an old format 3 notebook.
"""

from __future__ import annotations

import ast
import json
import os
import re
import stat
import subprocess
import sys

MAX_BYTES = 32 * 2**20

LIMITS = {
    "line": 10_000,  # characters in one line of code
    "cell": 200_000,  # characters in one code cell
    "lines": 10_000,  # lines of one code cell (checked before parsing, which bounds its cost)
    "statements": 5_000,  # top-level statements of one code cell
    "nodes": 200_000,  # syntax-tree nodes of one code cell
    "depth": 100,  # nesting of one statement's syntax tree
    "cells": 2_000,  # cells in the whole notebook
    "code": 2_000_000,  # characters of code in the whole notebook
    "total_statements": 10_000,  # top-level statements in the whole notebook
    "total_nodes": 1_000_000,  # syntax-tree nodes in the whole notebook
}
"""Bounds on what the grader reads. An honest chapter notebook is far inside every one of them (its longest
line is under 200 characters, its largest cell a few thousand, the whole notebook a few hundred statements)."""

CPU_SECONDS = 10
MEMORY = 1536 * 2**20
WALL_SECONDS = 40.0
MAX_PROBLEMS = 30


def utf8(text: str) -> str:
    """``text`` with each lone surrogate (valid in JSON, not in UTF-8) replaced by one U+FFFD; pairs are joined."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")
"""Characters that do not show as themselves: C0/C1 controls, line and paragraph separators, zero-width and
direction controls (U+202A-202E, U+2066-2069, ...), which could make a name or message read as something else."""


def _escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def clean(text, limit: int = 400) -> str:
    """``text`` on one printable line, at most ``limit`` characters: surrogates replaced, and control, separator,
    zero-width and direction-control characters shown escaped (``\\u202e``), so nothing can reorder or hide text."""
    text = str(text)
    if len(text) > 4 * limit + 8:  # escaping grows a character to at most 6: cut first, so cleaning is bounded
        text = text[: 4 * limit + 8]
    text = _HIDDEN.sub(_escape, utf8(text))
    return text if len(text) <= limit else text[: limit - 4] + " ..."


# ---------------------------------------------------------------------------------------------- reading the file


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


def load_json(path) -> tuple[dict | None, str]:
    """``(notebook JSON, "")`` or ``(None, why it cannot be graded)``; never raises."""
    try:
        if os.path.islink(path):
            raise ValueError("it is a symbolic link, not a notebook file; submit the notebook itself")
        data = json.loads(_read_bytes(path).decode("utf-8"), parse_int=lambda s: int(s) if len(s) < 20 else 0)
    except ValueError as err:
        return None, str(err) if "submit" in str(err) else "the file is not notebook JSON (UTF-8 text)"
    except RecursionError:
        return None, "the file's JSON is nested too deeply to be a notebook"
    except MemoryError:
        return None, "the file's JSON needs more memory than the grader gives a notebook"
    except OSError as err:
        return None, ("it is a symbolic link, not a notebook file; submit the notebook itself" if err.errno == 40
                      else f"the file could not be read ({clean(err.strerror)})")
    if not isinstance(data, dict):
        return None, "the file is JSON but not a notebook (it has no cell list)"
    if data.get("nbformat") == 3 or (not isinstance(data.get("cells"), list) and "worksheets" in data):
        return _from_v3(data)
    return data, ""


def _from_v3(data: dict) -> tuple[dict | None, str]:
    """An nbformat 3 notebook converted to format 4 by nbformat, or the sentence saying it could not be."""
    refused = ("it is an old format 3 notebook that could not be converted to the current format {}; open it in "
               "Jupyter, save it (which converts it) and resubmit")
    try:
        if "nbformat" not in sys.modules and not any(p.endswith("site-packages") for p in sys.path):
            import site  # started with -S: nbformat lives in site-packages

            site.main()
        import nbformat

        converted = nbformat.convert(nbformat.from_dict(data), 4)
        cells = converted.get("cells")
        if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
            return None, refused.format("(its worksheets hold no cell list)")
        return json.loads(json.dumps(converted)), ""
    except ImportError:
        return None, refused.format("(nbformat is not installed where the grader runs)")
    except Exception as err:  # noqa: BLE001 - any malformed old notebook: one sentence
        return None, refused.format(f"({clean(type(err).__name__, 40)})")


def read_cells(path) -> dict:
    """``{"ungradable", "chapter", "cells": [{"index", "kind", "source", "solution"}]}`` of a file; never raises."""
    data, why = load_json(path)
    found = {"ungradable": why, "chapter": "", "cells": []}
    if data is None:
        return found
    cells = data.get("cells")
    if not isinstance(cells, list):
        found["ungradable"] = "the file is JSON but not a notebook (it has no cell list)"
        return found
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    course = meta.get("vitcourse") if isinstance(meta.get("vitcourse"), dict) else {}
    found["chapter"] = clean(course.get("chapter", ""), 10)
    for i, raw in enumerate(cells, start=1):
        if not isinstance(raw, dict):
            continue
        source = raw.get("source", "")
        source = "".join(s for s in source if isinstance(s, str)) if isinstance(source, list) else source
        grader = (raw.get("metadata") or {}).get("nbgrader") if isinstance(raw.get("metadata"), dict) else None
        found["cells"].append({"index": i, "kind": clean(raw.get("cell_type", ""), 20),
                               "source": utf8(source) if isinstance(source, str) else "",
                               "solution": isinstance(grader, dict) and grader.get("solution") is True})
    return found


# ---------------------------------------------------------------------------------------------- one code cell

_STUB = re.compile(r"^[ \t]*# YOUR CODE HERE[ \t]*\n[ \t]*raise NotImplementedError\(\)", re.M)
_DEFINES = re.compile(r"^[ \t]*(?:def|class)[ \t]+(\w+)", re.M)
_CONTINUATION = re.compile(r"(?:else|elif|except|finally)\b")


def defined_in_text(source: str) -> list[str]:
    """Names after ``def``/``class`` at the start of a line of any text (a markdown cell holding answer code)."""
    return sorted(set(_DEFINES.findall(source)))


def _is_magic(line: str) -> bool:
    body = line.lstrip()
    if not body or body[0] == "#":
        return False
    return body[0] in "%!" or body.rstrip().endswith("?")


def strip_ipython(source: str) -> str | None:
    """IPython-only lines (``%magic``, ``!shell``, ``obj?``) become ``pass``; ``None`` for a non-Python cell magic.

    Linear: each line is looked at once, with ``lstrip``/``rstrip`` and no regular expression."""
    lines = source.split("\n")
    if lines and lines[0].startswith("%%"):
        if lines[0].split()[0] not in ("%%time", "%%timeit", "%%capture"):
            return None
        lines[0] = ""
    return "\n".join(line[: len(line) - len(line.lstrip())] + "pass" if _is_magic(line) else line for line in lines)


def _segments(lines: list[str], stmts: list[ast.stmt], offset: int = 0) -> list[tuple[ast.stmt, int, str]]:
    """``(node, first line, text)`` of each statement, slicing the cell's lines once (no re-split per statement)."""
    found = []
    for stmt in stmts:
        first = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", []))])
        found.append((stmt, first + offset, "\n".join(lines[first - 1: stmt.end_lineno])))
    return found


_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)


def parse_cell(source: str) -> tuple[list[tuple[ast.stmt, int, str]], list[str]]:
    """Top-level statements ``(node, first line, text)`` of a cell; a syntax error costs only its top-level block."""
    lines = source.split("\n")
    try:
        return _segments(lines, ast.parse(source).body), []
    except _PARSE_ERRORS:
        pass
    blocks: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines, start=1):
        new_block = line[:1] not in ("", " ", "\t", "#", ")", "]", "}") and not _CONTINUATION.match(line)
        if (new_block and not (blocks and blocks[-1][1][-1].startswith("@"))) or not blocks:
            blocks.append((number, [line]))
        else:
            blocks[-1][1].append(line)
    found, errors = [], []
    for start, block in blocks:
        try:
            found += _segments(block, ast.parse("\n".join(block)).body, start - 1)
        except _PARSE_ERRORS as err:
            message = getattr(err, "msg", type(err).__name__)
            errors.append(f"line {start + (getattr(err, 'lineno', 1) or 1) - 1}: SyntaxError: {clean(message, 100)}")
    return found, errors


_CALLS = (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.comprehension, ast.Lambda)
_DEF = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _chain(node: ast.AST) -> tuple[str, list[str]]:
    """``(root name or "", [attribute, ...])`` of an attribute chain, innermost first (iterative)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.reverse()
    return (node.id if isinstance(node, ast.Name) else ""), parts


def summarise(stmt: ast.stmt, line: int, src: str, limits: dict = LIMITS) -> dict:
    """One walk over a top-level statement: what selection and the rules need, or ``"error"`` past a limit.

    ``refs`` holds each maximal name or attribute chain once (``[root, [attrs], line, loaded]``; ``loaded``
    is whether its outermost node is read rather than assigned), so a chain of k attributes costs k, not k²."""
    offset = line - min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", []))])
    names = [stmt.name] if isinstance(stmt, _DEF) else []
    definition = isinstance(stmt, (ast.Import, ast.ImportFrom, *_DEF))
    future = isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"
    if future:
        definition = False
    value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
    targets = [t.id for t in getattr(stmt, "targets", [getattr(stmt, "target", None)]) if isinstance(t, ast.Name)]
    imports = {}
    loads, refs, calls_in_value, count = set(), [], False, 0
    stack = [(stmt, 1, False, False)]  # node, depth, inside the assigned value, is the value of an attribute
    while stack:
        node, depth, in_value, inner = stack.pop()
        count += 1
        if count > limits["nodes"]:
            return {"error": f"it has more than {limits['nodes']:,} syntax-tree nodes"}
        if depth > limits["depth"]:
            return {"error": f"it nests expressions more than {limits['depth']} deep"}
        in_value = in_value or node is value
        if in_value and isinstance(node, _CALLS):
            calls_in_value = True
        if isinstance(node, ast.Name):
            loads.add(node.id)
        elif isinstance(node, ast.Import):  # anywhere in the statement, as in a function's body
            imports.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                            for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            imports.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        if isinstance(node, (ast.Name, ast.Attribute)) and not inner:
            root, attrs = _chain(node)
            refs.append([root, attrs, getattr(node, "lineno", 0) + offset, isinstance(node.ctx, ast.Load)])
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + 1, in_value, isinstance(node, ast.Attribute) and child is node.value))
    if value is not None and not calls_in_value:
        definition = True
    return {"src": src, "line": line, "names": names, "targets": targets, "definition": definition,
            "future": future, "stub": bool(names) and bool(_STUB.search(src)), "imports": imports,
            "loads": sorted(loads), "refs": refs, "nodes": count}


def analyse_cell(source: str, limits: dict = LIMITS) -> dict:
    """``{"statements": [summary, ...], "errors": [...], "skipped": ""}``; ``skipped`` says why a cell is not run."""
    result = {"statements": [], "errors": [], "skipped": "", "nodes": 0}
    if len(source) > limits["cell"]:
        result["skipped"] = f"it has {len(source):,} characters, more than the {limits['cell']:,} the grader reads"
        return result
    lines = source.split("\n")
    if len(lines) > limits["lines"]:
        result["skipped"] = f"it has {len(lines):,} lines, more than the {limits['lines']:,} the grader reads"
        return result
    longest = max(map(len, lines), default=0)
    if longest > limits["line"]:
        result["skipped"] = (f"it has a line of {longest:,} characters, more than the {limits['line']:,} "
                             "the grader reads")
        return result
    stripped = strip_ipython(source)
    if stripped is None:
        return result
    found, errors = parse_cell(stripped)
    if len(errors) > 5:
        errors = errors[:5] + [f"and {len(errors) - 5} more syntax errors"]
    result["errors"] = errors
    if len(found) > limits["statements"]:
        result["skipped"] = f"it has {len(found):,} top-level statements, more than the {limits['statements']:,} allowed"
        return result
    for stmt, line, src in found:
        summary = summarise(stmt, line, src, limits)
        if "error" in summary:
            result.update(statements=[], skipped=f"line {line}: {summary['error']}")
            return result
        result["nodes"] += summary["nodes"]
        if result["nodes"] > limits["nodes"]:
            result.update(statements=[], skipped=f"it has more than {limits['nodes']:,} syntax-tree nodes")
            return result
        result["statements"].append(summary)
    return result


def analyse_notebook(found: dict, limits: dict = LIMITS) -> dict:
    """:func:`read_cells`'s result with each code cell analysed (in place), or made ungradable past a total."""
    if len(found["cells"]) > limits["cells"]:
        found.update(cells=[], ungradable=f"it has {len(found['cells']):,} cells, more than the {limits['cells']:,} "
                                          "the grader reads")
        return found
    code = sum(len(c["source"]) for c in found["cells"] if c["kind"] == "code")
    if code > limits["code"]:
        found.update(cells=[], ungradable=f"its code cells hold {code:,} characters, more than the "
                                          f"{limits['code']:,} the grader reads")
        return found
    statements = nodes = 0
    for cell in found["cells"]:
        if cell["kind"] == "code":
            cell["analysis"] = analyse_cell(cell["source"], limits)
            statements += len(cell["analysis"]["statements"])
            nodes += cell["analysis"]["nodes"]
        else:
            cell["defines"] = defined_in_text(cell["source"])
            cell["source"] = cell["source"][:2000]  # not run: only its first lines may be shown
        if statements > limits["total_statements"] or nodes > limits["total_nodes"]:
            what = (f"more than {limits['total_statements']:,} top-level statements"
                    if statements > limits["total_statements"] else f"more than {limits['total_nodes']:,} syntax-tree nodes")
            found.update(cells=[], ungradable=f"its code cells hold {what}, more than the grader reads")
            return found
    return found


# ---------------------------------------------------------------------------------------------- the process


def _limit_self() -> None:
    import resource

    for kind, value in ((resource.RLIMIT_CPU, CPU_SECONDS), (resource.RLIMIT_AS, MEMORY), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass


def main(argv: list[str]) -> int:
    _limit_self()
    sys.setrecursionlimit(2000)
    try:
        result = analyse_notebook(read_cells(os.fsencode(argv[0])))
    except MemoryError:
        result = {"ungradable": "reading it needed more memory than the grader gives a notebook", "chapter": "",
                  "cells": []}
    sys.stdout.buffer.write(json.dumps(result).encode())
    return 0


def analyse_file(path) -> dict:
    """:func:`analyse_notebook` of a file, computed in a fresh process under limits; never raises.

    Called from a worker thread, it waits on a pipe (without holding the interpreter lock), so other
    workers go on while it runs. Past the CPU, memory or wall-clock limit the notebook is ungradable,
    with one sentence."""
    command = [sys.executable, "-I", "-S", os.path.abspath(__file__), os.fsencode(os.fspath(path))]
    sentence = ("the grader could not read its code within its limits ({}); the notebook is too large or too "
                "deeply nested to grade")
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=WALL_SECONDS,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"})
    except subprocess.TimeoutExpired:
        return {"ungradable": sentence.format(f"{WALL_SECONDS:g} s"), "chapter": "", "cells": []}
    if done.returncode != 0:
        why = ("CPU time" if done.returncode in (-24, -9) else "memory" if b"MemoryError" in done.stderr[-2000:]
               else f"the reading process crashed with signal {-done.returncode}" if done.returncode < 0
               else f"the reading process failed with exit status {done.returncode}")
        return {"ungradable": sentence.format(why), "chapter": "", "cells": []}
    try:
        result = json.loads(done.stdout)
    except ValueError:
        return {"ungradable": sentence.format("unreadable answer"), "chapter": "", "cells": []}
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
