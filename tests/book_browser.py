"""Open every page of the built book in headless Chromium and report what a reader would find broken.

The checker serves a built Jupyter Book (``_build/html``) on localhost, drives the
system's Chromium through Playwright, and for each page collects:

- console errors and uncaught JavaScript exceptions;
- requests for files of the site that failed or answered with an HTTP error;
- requests that left the machine (blocked: the book must work offline);
- math that MathJax did not render, or rendered as an error;
- images that did not load (``naturalWidth == 0``);
- links to pages or anchors of the site that do not exist;
- exercise solutions that are not closed at first, or do not open on a click.

It also follows the sidebar from the front page to find every page the
navigation reaches, runs a query on the search page, and can save a full-page
screenshot of chosen pages.

Run it by hand on a built book::

    .venv/bin/python tests/book_browser.py _build/html

The tests in ``tests/test_book_browser.py`` use it on the real book and on a
deliberately broken copy.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
]

# Wait for MathJax's first typesetting pass, when the page loaded MathJax at all.
_WAIT_FOR_MATHJAX = """async () => {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
        await MathJax.startup.promise;
    }
}"""

# Per page: math elements Sphinx wrote, how many MathJax rendered, how many are TeX errors.
_MATH_STATUS = """() => {
    const math = Array.from(document.querySelectorAll('.math'));
    return {
        total: math.length,
        rendered: math.filter(el => el.querySelector('mjx-container')).length,
        errors: Array.from(document.querySelectorAll('mjx-merror'))
            .map(el => el.getAttribute('data-mjx-error') || el.textContent).slice(0, 3),
    };
}"""

# Load every image now (lazy ones included) and report those that did not load.
_BROKEN_IMAGES = """async () => {
    const images = Array.from(document.images);
    images.forEach(img => { img.loading = 'eager'; });
    await Promise.all(images.map(img => img.complete ? null :
        new Promise(done => { img.onload = img.onerror = done; setTimeout(done, 5000); })));
    return images.filter(img => !(img.complete && img.naturalWidth > 0))
                 .map(img => img.getAttribute('src'));
}"""

_META_REFRESH = re.compile(r"<meta[^>]+http-equiv=[\"']?refresh", re.IGNORECASE)
_SIDEBAR_LINKS = """() => Array.from(document.querySelectorAll('nav.bd-docs-nav a[href]'), a => a.href)"""
_HEADER_LINKS = """() => Array.from(document.querySelectorAll('.bd-header-article a[href]'), a => a.href)"""
_ALL_LINKS = """() => Array.from(document.querySelectorAll('a[href]'), a => a.href)"""


@dataclass
class SiteReport:
    """What the browser found: problems per page (site-relative path -> messages), and more."""

    problems: dict[str, list[str]] = field(default_factory=dict)
    pages: list[str] = field(default_factory=list)
    nav_reached: set[str] = field(default_factory=set)
    search_hits: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)
    math_pages: list[str] = field(default_factory=list)
    image_count: int = 0
    solutions_opened: dict[str, int] = field(default_factory=dict)  # page -> solutions opened by a click
    header_links: dict[str, list[str]] = field(default_factory=dict)  # page -> links of its top bar

    def add(self, page: str, message: str) -> None:
        """Record one problem on ``page``."""
        self.problems.setdefault(page, []).append(message)

    def summary(self) -> str:
        """The problems as readable lines, one page per block ("" when there are none)."""
        return "\n".join(
            f"{page}:\n" + "\n".join(f"  - {msg}" for msg in msgs)
            for page, msgs in sorted(self.problems.items())
        )


def site_pages(site: Path) -> list[str]:
    """Every HTML page of a built book, as sorted site-relative POSIX paths (assets excluded)."""
    skip = ("_static/", "_sources/", "_images/", "_downloads/", "_panels_static/")
    return sorted(
        rel
        for rel in (p.relative_to(site).as_posix() for p in site.rglob("*.html"))
        if not rel.startswith(skip)
    )


class _IdCollector(HTMLParser):
    """Collect every ``id`` (and old-style ``<a name>``) in an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and (key == "id" or (tag == "a" and key == "name")):
                self.ids.add(value)


@functools.lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    parser = _IdCollector()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` over HTTP on 127.0.0.1 at a free port, in a thread; yield the base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def find_chromium() -> str | None:
    """Path of the system Chromium: ``$CHROMIUM`` if set, else ``chromium`` on PATH or /usr/bin/chromium."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class BookChecker:
    """One headless Chromium page that visits the pages of a served book and records problems.

    Use as a context manager: ``with BookChecker(site) as checker: report = checker.check()``.
    """

    def __init__(self, site: Path, *, chromium: str | None = None, timeout_ms: int = 20_000) -> None:
        self.site = Path(site).resolve()
        self.chromium = chromium or find_chromium()
        if self.chromium is None:
            raise FileNotFoundError(
                "Chromium was not found at /usr/bin/chromium or on PATH; install Debian's "
                "'chromium' package or set CHROMIUM to the browser's path."
            )
        self.timeout_ms = timeout_ms
        self._stack = contextlib.ExitStack()
        self._current = ""
        self._report = SiteReport()
        self._sidebar: dict[str, list[str]] = {}  # page -> site pages its sidebar links to
        self._landed: dict[str, str] = {}  # page -> page shown after redirects

    # -- setup -------------------------------------------------------------------------
    def __enter__(self) -> BookChecker:
        from playwright.sync_api import sync_playwright

        self.base = self._stack.enter_context(serve(self.site))
        playwright = self._stack.enter_context(sync_playwright())
        self._browser = playwright.chromium.launch(
            executable_path=self.chromium, headless=True, args=CHROMIUM_ARGS
        )
        self._stack.callback(self._browser.close)
        context = self._browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(self.timeout_ms)
        # Nothing may leave the machine: the book must read fully offline.
        context.route(re.compile(r"^(?!" + re.escape(self.base) + r"|data:|blob:|about:)"), self._block)
        self.page = context.new_page()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self._report.add(self._current, f"JavaScript error: {exc}"))
        self.page.on("requestfailed", self._on_request_failed)
        self.page.on("response", self._on_response)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # -- event handlers ----------------------------------------------------------------
    def _local(self, url: str) -> str | None:
        """Site-relative path of ``url`` if it is on the served site, else None."""
        return unquote(urlsplit(url).path.lstrip("/")) if url.startswith(self.base) else None

    def _block(self, route) -> None:
        self._report.add(self._current, f"request to the internet (blocked; the book must work offline): {route.request.url}")
        route.abort()

    def _on_console(self, msg) -> None:
        if msg.type != "error":
            return
        where = msg.location.get("url", "") if msg.location else ""
        if self._local(where or self.base) is None and "Failed to load resource" in msg.text:
            return  # an internet request we blocked; already reported by _block
        self._report.add(self._current, f"console error: {msg.text} ({where})")

    def _on_request_failed(self, request) -> None:
        path = self._local(request.url)
        if path is not None:
            self._report.add(self._current, f"request failed: {path} ({request.failure})")

    def _on_response(self, response) -> None:
        path = self._local(response.url)
        if path is not None and response.status >= 400:
            self._report.add(self._current, f"HTTP {response.status} for {path}")

    # -- checks ------------------------------------------------------------------------
    def _open(self, rel: str) -> str:
        """Go to a page of the site, wait until it has settled (following a meta refresh); return where it landed."""
        url = self.base + rel
        self.page.goto(url, wait_until="load")
        if _META_REFRESH.search((self.site / rel).read_text(encoding="utf-8", errors="replace")[:2000]):
            self.page.wait_for_url(lambda now: now != url)
            self.page.wait_for_load_state("load")
        self.page.wait_for_load_state("networkidle")
        self.page.evaluate(_WAIT_FOR_MATHJAX)
        return self._local(self.page.url) or self.page.url

    def _record_page(self, rel: str, landed: str) -> None:
        """Remember where ``rel`` landed and the site pages its sidebar links to."""
        self._landed[rel] = landed
        links = (self._local(urldefrag(url)[0]) for url in self.page.evaluate(_SIDEBAR_LINKS))
        self._sidebar[rel] = list(dict.fromkeys(link for link in links if link))

    def check_page(self, rel: str, *, screenshot: Path | None = None) -> None:
        """Open one page and record every problem found on it."""
        report, page = self._report, self.page
        self._current = rel
        self._record_page(rel, self._open(rel))

        math = page.evaluate(_MATH_STATUS)
        if math["total"]:
            report.math_pages.append(rel)
            if math["rendered"] < math["total"]:
                report.add(rel, f"math not rendered: {math['total'] - math['rendered']} of {math['total']} formulas")
            for err in math["errors"]:
                report.add(rel, f"math error: {err}")

        broken = page.evaluate(_BROKEN_IMAGES)
        report.image_count += page.evaluate("() => document.images.length")
        for src in broken:
            report.add(rel, f"image did not load: {src}")

        report.header_links[rel] = page.evaluate(_HEADER_LINKS)
        for url in sorted(set(page.evaluate(_ALL_LINKS))):
            problem = self._link_problem(url)
            if problem:
                report.add(rel, problem)

        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            report.screenshots.append(screenshot)

        self._check_solutions(rel)

    def _check_solutions(self, rel: str) -> None:
        """Every exercise solution must start closed and open when its toggle is clicked."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        solutions = self.page.locator(".admonition.solution")
        for i in range(solutions.count()):
            solution = solutions.nth(i)
            body = solution.locator(":scope > :not(.admonition-title)").first
            if body.is_visible():
                self._report.add(rel, f"solution {i + 1} is shown before the reader asks for it")
                continue
            toggle = solution.locator("button.toggle-button")
            if toggle.count() == 0:
                self._report.add(rel, f"solution {i + 1} has no button to open it")
                continue
            toggle.first.click()
            try:
                body.wait_for(state="visible", timeout=3000)
                self._report.solutions_opened[rel] = self._report.solutions_opened.get(rel, 0) + 1
            except PlaywrightTimeout:
                self._report.add(rel, f"solution {i + 1} does not open when its button is clicked")

    def _link_problem(self, url: str) -> str | None:
        """Why a link to the site is broken (missing file or anchor), or None if it is fine."""
        target, fragment = urldefrag(url)
        path = self._local(target)
        if path is None:
            return None  # external links are checked by `make linkcheck`, where the internet is reachable
        file = self.site / path
        if file.is_dir():
            file = file / "index.html"
        if not file.is_file():
            return f"broken link: {path} does not exist"
        if fragment and file.suffix == ".html" and unquote(fragment) not in _anchors(file):
            return f"broken link: {path}#{fragment} has no such anchor"
        return None

    def navigation(self, start: str = "index.html") -> set[str]:
        """Pages reached by following the sidebar, breadth first, from ``start``.

        Uses the sidebar links recorded while checking pages; opens only pages not checked yet.
        """
        seen: set[str] = set()
        queue = [start]
        while queue:
            rel = queue.pop(0)
            if rel not in self._sidebar:
                self._current = f"navigation to {rel}"
                self._record_page(rel, self._open(rel))
            here = self._landed[rel]
            if here in seen:
                continue
            seen.add(here)
            queue.extend(link for link in self._sidebar[rel] if link not in seen and link not in queue)
        return seen

    def search(self, query: str) -> list[str]:
        """Run ``query`` on the book's search page; return the site-relative pages it lists."""
        self._current = "search.html"
        self.page.goto(f"{self.base}search.html?q={query}", wait_until="load")
        self.page.wait_for_function(
            "() => { const s = document.querySelector('#search-results .search-summary');"
            " return s && /finished|found|match/i.test(s.textContent); }"
        )
        urls = self.page.evaluate(
            "() => Array.from(document.querySelectorAll('#search-results ul.search li a'), a => a.href)"
        )
        return sorted({self._local(urldefrag(u)[0]) or u for u in urls})

    def check(
        self,
        pages: Iterable[str] | None = None,
        *,
        screenshot_dir: Path | None = None,
        screenshot_pages: Iterable[str] = (),
        search_query: str | None = "attention",
        navigate: bool = True,
    ) -> SiteReport:
        """Check ``pages`` (default: every page of the site); return the report."""
        report = self._report
        report.pages = list(pages) if pages is not None else site_pages(self.site)
        shots = set(screenshot_pages)
        from playwright.sync_api import Error as PlaywrightError

        for rel in report.pages:
            shot = None
            if screenshot_dir is not None and rel in shots:
                shot = screenshot_dir / (Path(rel).stem + ".png")
            try:
                self.check_page(rel, screenshot=shot)
            except PlaywrightError as exc:  # a page that hangs or crashes must not hide the others
                report.add(rel, f"page could not be checked: {exc.message.splitlines()[0]}")
        if navigate:
            report.nav_reached = self.navigation()
        if search_query:
            report.search_hits = self.search(search_query)
        return report


def check_site(site: Path, **kwargs) -> SiteReport:
    """Check a built book in one browser session; keyword arguments go to :meth:`BookChecker.check`."""
    with BookChecker(site) as checker:
        return checker.check(**kwargs)


def main(argv: list[str]) -> int:
    """Command line: check the book built in ``argv[0]`` (default ``_build/html``); exit 1 on any problem."""
    site = Path(argv[0] if argv else "_build/html")
    if not (site / "index.html").is_file():
        print(f"No built book in {site}: run `make book` first.", file=sys.stderr)
        return 2
    report = check_site(site)
    print(f"{len(report.pages)} pages, {report.image_count} images, math on {len(report.math_pages)} pages; "
          f"navigation reaches {len(report.nav_reached)} pages; "
          f"search 'attention' finds {len(report.search_hits)}; {sum(report.solutions_opened.values())} solutions opened.")
    if report.problems:
        print(report.summary())
        return 1
    print("No problems found.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
