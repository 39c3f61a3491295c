"""MkDocs hook: a page whose Markdown is a line ``<!-- include: NAME.md -->``
gets the text of the repository's root document NAME.md there, so README.md,
SECURITY.md and FORMAT.md stay single files at the root (where GitHub shows
them) and are pages of the site too.

Their links are written relative to the repository root; here they are made
relative to the page: ``docs/x.md`` becomes ``x.md``, and a root document
included by some page becomes that page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

INCLUDE = re.compile(r"^<!-- include: (?P<name>[\w.-]+\.md) -->$", re.MULTILINE)
# An inline Markdown link's target: [text](target) or [text](target#anchor).
LINK = re.compile(r"(?P<text>\]\()(?P<target>[^)#\s]+)(?P<rest>[^)]*\))")


def _root(config: Any) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def _pages_of_root_documents(config: Any) -> dict[str, str]:
    """Which page includes each root document: {"FORMAT.md": "format.md", ...}."""
    pages = {}
    docs = Path(config["docs_dir"])
    for page in sorted(docs.glob("*.md")):
        for match in INCLUDE.finditer(page.read_text(encoding="utf-8")):
            pages[match["name"]] = page.name
    return pages


def _relink(text: str, pages: dict[str, str]) -> str:
    def relink(match: re.Match[str]) -> str:
        target = match["target"]
        if target.startswith("docs/"):
            target = target.removeprefix("docs/")
        elif target in pages:
            target = pages[target]
        return f"{match['text']}{target}{match['rest']}"

    return LINK.sub(relink, text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    pages = _pages_of_root_documents(config)

    def include(match: re.Match[str]) -> str:
        text = (_root(config) / match["name"]).read_text(encoding="utf-8")
        return _relink(text, pages)

    return INCLUDE.sub(include, markdown)
