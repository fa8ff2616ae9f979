"""A small Sphinx extension with fixes for the book's HTML pages (loaded from ``_config.yml``).

Sphinx 7.4 registers an inline script added by an extension after the builder
started under two spellings (filename ``None`` and ``''``), so sphinx-thebe's
configuration script, which declares ``const THEBE_JS_URL``, lands twice on
every page and the second copy throws "Identifier 'THEBE_JS_URL' has already
been declared" in the reader's console. This extension drops repeated scripts
from each page just before it is rendered.
"""

from __future__ import annotations

from typing import Any


def _script_key(script: Any) -> tuple:
    """Identity of a page script: filename (None and '' alike), priority and attributes (body included)."""
    attributes = getattr(script, "attributes", {}) or {}
    return (
        getattr(script, "filename", script) or "",
        getattr(script, "priority", 500),
        tuple(sorted((str(k), str(v)) for k, v in attributes.items())),
    )


def drop_repeated_scripts(app, pagename: str, templatename: str, context: dict, doctree) -> None:
    """``html-page-context`` handler: keep the first copy of each script in ``context['script_files']``."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app) -> dict:
    """Register the handler late, after every extension has added its scripts."""
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
