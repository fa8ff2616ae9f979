"""The student pack: what instructors hand out (student notebooks, the course package, no answers).

The pack holds the generated student notebooks, the ``vitcourse`` package (which holds
no hidden check: those live in ``grading/hidden/`` of the repository), install files, and a README.
It never holds the solution notebooks. The course package itself is the book's
reference code (students read it in the chapters anyway), and it answers some
exercises (``vitcourse.attention`` holds chapter 1's softmax and attention); it
stays in the pack because the notebooks of later chapters import it and the public
checks compute their expected values with it. Grading hides it from the student
process, but nothing stops a student from copying it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .spec import chapter_names, load_chapter

README = """# Exercise notebooks: {title}

1. Install the course package (Python 3.10 or newer), from this folder:

       python -m venv .venv && . .venv/bin/activate
       pip install -e .

2. Open a notebook in `notebooks/` with Jupyter, replace every
   `raise NotImplementedError()` with your code, and run `check("N.k")` under each
   exercise: it tells you which check failed and why.

3. Hand in your notebook, named after you (for example `ada_lovelace.ipynb`).
   Grading runs the same public checks plus hidden ones on other inputs.
   Only imports, functions, classes and the answer cells are run when grading.
"""


def write_student_pack(out: Path, notebooks_dir: Path) -> list[Path]:
    """Write the pack into the new folder ``out``; return the files written.

    Raises:
        FileExistsError: if ``out`` exists and is not empty.
        FileNotFoundError: if a student notebook is missing (run ``vitcourse notebooks``).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new folder.")
    package = Path(__file__).resolve().parent.parent
    written: list[Path] = []
    for name in chapter_names():
        src = notebooks_dir / load_chapter(name).notebook
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing; run `vitcourse notebooks` to generate it.")
        dest = out / "notebooks" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        written.append(dest)
    for path in sorted(package.rglob("*.py")):  # the hidden checks are not in the package
        if "__pycache__" in path.parts:
            continue
        dest = out / "vitcourse" / path.relative_to(package)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        written.append(dest)
    for extra in ("pyproject.toml", "requirements.txt", "LICENSE"):
        if (package.parent / extra).exists():
            shutil.copy2(package.parent / extra, out / extra)
            written.append(out / extra)
    (out / "README.md").write_text(README.format(title="Vision Transformers from scratch"))
    written.append(out / "README.md")
    return written
