"""The built book, opened page by page in headless Chromium (see tests/book_browser.py).

Needs a built book in ``_build/html`` (``make book``; override with $VITCOURSE_BOOK_HTML).
Without one the tests skip, except in CI (CI=true), where the book is always built first
and a missing book, browser or Playwright is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from book_browser import check_site, find_chromium, site_pages

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("VITCOURSE_BOOK_HTML") or ROOT / "_build" / "html")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    """Skip with ``reason`` on a developer's machine; fail in CI, where everything must be there."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: CI builds the book and installs the browser before the tests)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site() -> Path:
    """The built book, after checking that a browser can be driven."""
    if not (SITE / "index.html").is_file():
        _unavailable(f"no built book in {SITE}: run `make book` first")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the Python package 'playwright' is not installed (pip install -r requirements.txt)")
    if find_chromium() is None:
        _unavailable("Chromium is not installed (Debian: apt-get install chromium)")
    return SITE


def chapter_pages() -> list[str]:
    """The chapters of the book's table of contents, as built page paths, in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    (part,) = [p for p in toc["parts"] if p.get("caption") == "Chapters"]
    return [f"{entry['file']}.html" for entry in part["chapters"]]


def test_every_page_of_the_book_works_in_a_browser(site: Path) -> None:
    chapters = chapter_pages()
    notebooks = sorted(f"book/{p.stem}.html" for p in (ROOT / "book").glob("ch*.ipynb"))
    assert chapters == notebooks, f"the table of contents should list every chapter notebook in order: {chapters}"
    for chapter in chapters:
        assert (site / chapter).is_file(), f"{chapter} is in _toc.yml but was not built"

    shots = site.parent / "screenshots"
    shutil.rmtree(shots, ignore_errors=True)
    report = check_site(site, screenshot_dir=shots, screenshot_pages=chapters, search_query="attention")

    assert not report.problems, "the browser found problems:\n" + report.summary()
    assert set(report.pages) == set(site_pages(site)), "every built page is checked"
    missing = [c for c in chapters if c not in report.nav_reached]
    assert not missing, f"the sidebar navigation does not reach {missing}"
    assert report.math_pages, "no page has math: the math check did not run"
    assert report.image_count, "no page has an image: the image check did not run"
    assert "book/ch01_attention.html" in report.search_hits, (
        f"searching 'attention' should find the attention chapter; it found {report.search_hits}"
    )
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    slug = repo["url"].removeprefix("https://github.com/")
    for chapter in chapters:
        notebook = Path(chapter).with_suffix(".ipynb").as_posix()
        if not (site / "_sources" / notebook).is_file():
            continue  # a Markdown placeholder, not yet a notebook
        links = report.header_links[chapter]
        expected = {
            "Colab": f"https://colab.research.google.com/github/{slug}/blob/{repo['branch']}/{notebook}",
            "Binder": f"https://mybinder.org/v2/gh/{slug}/{repo['branch']}?urlpath=lab/tree/{notebook}",
            "download": f"_sources/{notebook}",
        }
        for name, url in expected.items():
            assert any(link.endswith(url) for link in links), f"{chapter} has no {name} button ({url})"
    solution_div = re.compile(r'<div class="(?=[^"]*\bsolution\b)(?=[^"]*\badmonition\b)')
    solutions = sum(len(solution_div.findall(p.read_text(encoding="utf-8"))) for p in site.rglob("*.html"))
    assert sum(report.solutions_opened.values()) == solutions, "every exercise solution opens on a click"
    assert sorted(p.name for p in report.screenshots) == sorted(Path(c).stem + ".png" for c in chapters)
    for shot in report.screenshots:
        assert shot.stat().st_size > 10_000, f"{shot} looks empty"


def _inject(page: Path, html: str) -> None:
    """Insert ``html`` at the start of the page's main content."""
    text = page.read_text(encoding="utf-8")
    text, n = re.subn(r"(<main[^>]*>)", lambda m: m.group(1) + html, text, count=1)
    assert n == 1, f"no <main> element in {page}"
    page.write_text(text, encoding="utf-8")


def test_the_checker_catches_a_broken_page(site: Path, tmp_path: Path) -> None:
    """Break a copy of the book in known ways; the checker must report each one where it was made."""
    broken = tmp_path / "html"
    shutil.copytree(site, broken)
    book = broken / "book"
    math_page = "book/glossary.html"  # the glossary has math of its own
    assert "class=\"math" in (broken / math_page).read_text(encoding="utf-8")

    # A missing figure; a script that fails; a link to nowhere; a request to the internet.
    _inject(book / "setup.html", '<img src="../_images/no-such-figure.png" alt="missing figure">')
    # A solution whose styling keeps it open, and one that opens normally.
    _inject(book / "intro.html", '<div class="solution admonition"><p class="admonition-title">Solution</p>'
                                 '<section><p>Opens on a click.</p></section></div>')
    _inject(book / "setup.html", '<div class="solution admonition"><p class="admonition-title">Solution</p>'
                                 '<section style="visibility: visible !important; height: auto !important"><p>Always shown.</p></section></div>')
    _inject(book / "references.html", "<script>console.error('deliberate console error');</script>"
                                      "<script>notDefinedAnywhere();</script>")
    _inject(book / "ch02_patching.html", '<a href="ch99_missing.html">gone</a><a href="intro.html#no-such-part">x</a>'
                                        '<img src="https://example.invalid/remote.png" alt="remote">')
    # TeX that MathJax cannot parse, and a copy of a math page without MathJax.
    _inject(broken / math_page, r'<span class="math notranslate nohighlight">\(x^1^2\)</span>')
    no_mathjax = book / "no_mathjax.html"
    no_mathjax.write_text(re.sub(r"<script[^>]*mathjax[^>]*></script>", "",
                                 (site / math_page).read_text(encoding="utf-8")), encoding="utf-8")
    # Chapter 7 disappears from the sidebar of every page.
    for page in broken.rglob("*.html"):
        page.write_text(page.read_text(encoding="utf-8").replace('href="ch07_jax.html"', 'href="#"'),
                        encoding="utf-8")

    pages = ["book/intro.html", "book/setup.html", "book/references.html", "book/ch02_patching.html",
             math_page, "book/no_mathjax.html"]
    report = check_site(broken, pages=pages, search_query=None)
    found = report.problems

    def has(page: str, pattern: str) -> bool:
        return any(re.search(pattern, msg) for msg in found.get(page, []))

    assert "book/intro.html" not in found, f"an untouched page was reported: {found.get('book/intro.html')}"
    assert has("book/setup.html", r"image did not load: \.\./_images/no-such-figure\.png"), found
    assert has("book/setup.html", r"HTTP 404 for _images/no-such-figure\.png"), found
    assert has("book/setup.html", r"solution 1 is shown before the reader asks for it"), found
    assert report.solutions_opened.get("book/intro.html") == 1, "the intro's well-formed solution opened"
    assert has("book/references.html", r"console error: deliberate console error"), found
    assert has("book/references.html", r"JavaScript error: .*notDefinedAnywhere"), found
    assert has("book/ch02_patching.html", r"broken link: book/ch99_missing\.html does not exist"), found
    assert has("book/ch02_patching.html", r"broken link: book/intro\.html#no-such-part has no such anchor"), found
    assert has("book/ch02_patching.html", r"request to the internet .*example\.invalid"), found
    assert has(math_page, r"math error"), found
    assert has("book/no_mathjax.html", r"math not rendered"), found
    assert "book/ch07_jax.html" not in report.nav_reached
    assert "book/ch06_ultimus.html" in report.nav_reached
