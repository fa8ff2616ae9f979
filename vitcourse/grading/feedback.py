"""Feedback pages for students and the batch summary for instructors.

A page lists every exercise with its score and every check with what it tests; a lost
public check says why (shapes, largest error, the error raised, the time limit); a lost
hidden check says only that it failed. Problems found in the notebook and uses of
forbidden calls are listed too. Everything is HTML-escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..paths import atomic_write
from .notebook import visible
from .spec import Chapter

if TYPE_CHECKING:  # pragma: no cover
    from .grader import StudentResult


@dataclass
class BatchReport:
    """What a batch did (the CLI prints it; :func:`write_summary` writes it)."""

    sandbox: str
    chapter: str
    graded: int
    kept: int
    seconds: float
    results: list
    out: Path


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }
table { border-collapse: collapse; width: 100%; margin-bottom: 1.5rem; }
td, th { border-bottom: 1px solid #ddd; padding: .35rem .5rem; text-align: left; vertical-align: top; }
.ok { color: #176f2c; } .lost { color: #a4161a; } .kind { color: #666; font-size: .9em; }
"""


def render_feedback(result: "StudentResult", chapter: Chapter) -> str:
    """The HTML feedback page of one student (everything escaped)."""
    def e(text) -> str:  # escaped for HTML, and no character that reorders or hides text (U+202E, ...)
        return html.escape(visible(text))

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Feedback: {e(result.student)}, {e(chapter.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(chapter.title)} exercises: {e(result.student)}</h1>",
        f"<p><strong>Total: {result.total:g} / {result.max_total:g} points.</strong> "
        "Public checks are the ones <code>check()</code> runs in your notebook; hidden checks test "
        "other inputs and edge cases and show no details.</p>",
    ]
    if not result.sandbox:
        parts.append("<p><strong>NO SANDBOX: this notebook was graded without isolation.</strong></p>")
    if result.ungradable:
        parts.append(f"<p class='lost'><strong>Not graded: {e(result.ungradable)}.</strong></p>")
    for title, items in (("Problems found in the notebook", result.problems),
                         ("Calls the exercises forbid", result.forbidden)):
        if items:
            parts.append(f"<h2>{title}</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in items) + "</ul>")
    for ex in chapter.exercises:
        score = result.scores.get(ex.id, 0.0)
        parts.append(f"<h2>Exercise {e(ex.id)}: {e(ex.title)} ({score:g} / {ex.points:g})</h2>")
        parts.append("<table><tr><th>Check</th><th>Points</th><th>Result</th></tr>")
        for c in (c for c in result.checks if c.exercise == ex.id):
            kind = "hidden" if c.hidden else "public"
            verdict = ("<span class='ok'>passed</span>" if c.earned >= c.points
                       else f"<span class='lost'>lost: {e(c.message)}</span>")
            parts.append(f"<tr><td>{e(c.description)} <span class='kind'>({kind})</span></td>"
                         f"<td>{c.earned:g} / {c.points:g}</td><td>{verdict}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_feedback(path: Path, result: "StudentResult", chapter: Chapter) -> None:
    """Write one student's feedback page atomically."""
    atomic_write(path, render_feedback(result, chapter))


def summary_text(report: BatchReport, chapter: Chapter) -> str:
    """The report printed at the end of a batch; its first line says whether a sandbox was used."""
    results = report.results
    lines = [report.sandbox,
             f"Chapter {chapter.name} ({chapter.title}): {len(results)} students, {report.graded} graded now, "
             f"{report.kept} kept from an earlier run, in {report.seconds:.1f} s."]
    if results:
        lines.append("Mean score per exercise:")
        for ex in chapter.exercises:
            mean = sum(r.scores.get(ex.id, 0.0) for r in results) / len(results)
            lines.append(f"  {ex.id} {ex.title}: {mean:.2f} / {ex.points:g}")
        mean_total = sum(r.total for r in results) / len(results)
        lines.append(f"  total: {mean_total:.2f} / {results[0].max_total:g}")
        ungradable = sum(bool(r.ungradable) for r in results)
        if ungradable:
            lines.append(f"{ungradable} file(s) could not be graded: see the status column of grades.csv.")
    lines.append(f"Grades: {report.out / 'grades.csv'}; feedback pages: {report.out / 'feedback'}; "
                 f"histogram: {report.out / 'totals_histogram.png'}")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, report: BatchReport, chapter: Chapter) -> None:
    """Write ``summary.txt`` and the histogram of totals ``totals_histogram.png`` next to the CSV."""
    atomic_write(out / "summary.txt", summary_text(report, chapter))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maximum = sum(ex.points for ex in chapter.exercises)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([r.total for r in report.results], bins=min(20, max(int(maximum), 1)), range=(0, maximum),
            color="#3b6ea8", edgecolor="white")
    ax.set_title(f"{chapter.name} exercises: totals of {len(report.results)} students")
    ax.set_xlabel(f"total points (out of {maximum:g})")
    ax.set_ylabel("students")
    fig.tight_layout()
    fig.savefig(out / "totals_histogram.png", dpi=100)
    plt.close(fig)
