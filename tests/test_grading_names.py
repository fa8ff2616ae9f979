"""Names and messages that could spoof: direction controls and other invisible characters are shown escaped."""

from __future__ import annotations

import csv
import unicodedata

import pytest

from vitcourse.grading.batch import csv_cell, display_name
from vitcourse.grading.notebook import clean

SPOOFERS = ["\u202e", "\u202a", "\u202b", "\u202c", "\u202d", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e",
            "\u200f", "\u061c", "\u200b", "\u2028", "\u2029", "\ufeff", "\x1b", "\x85", "\n", "\r", "\t"]


@pytest.mark.parametrize("char", SPOOFERS)
def test_every_invisible_character_is_shown_escaped(char):
    name = f"alice{char}gpj.ipynb"
    shown = display_name(name)
    assert char not in shown
    assert f"\\u{ord(char):04x}" in shown
    # Nothing left that a terminal, spreadsheet or browser would interpret instead of show.
    assert all(unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp") for c in shown)


def test_ordinary_names_are_unchanged():
    for name in ["José García", "Zoë O'Brien", "李小龍", "Ada 😀", "ana-maria_2"]:
        assert display_name(name) == name
        assert clean(name) == name


def test_a_spoofed_name_reaches_the_csv_escaped(tmp_path):
    path = tmp_path / "grades.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([csv_cell(display_name("eve\u202eexe.ipynb")), "7"])
    text = path.read_text(encoding="utf-8")
    assert "\u202e" not in text and "\\u202e" in text


def test_feedback_pages_show_direction_controls_escaped():
    from types import SimpleNamespace

    from vitcourse.grading.feedback import render_feedback
    result = SimpleNamespace(student="mallory\u202egnp", total=0.0, max_total=1.0, sandbox=True,
                             ungradable="bad \u2066name\u2069", problems=["cell 3 \u202e"], forbidden=[], scores={},
                             checks=[])
    chapter = SimpleNamespace(title="Chapter 1", exercises=[])
    page = render_feedback(result, chapter)
    assert "\u202e" not in page and "\\u202e" in page and "\u2066" not in page
