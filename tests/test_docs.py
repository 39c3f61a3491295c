"""Every Python code block of the documentation (README.md, SECURITY.md,
FORMAT.md and the pages of docs/) runs, so the documentation cannot rot.

A page's blocks run in order in one namespace, as a reader would paste them,
in a fresh directory (a page's SQLite database is a file there) and without
the ``ENVELOPE_*`` variables of the environment. Sybil's Markdown markers
give the context a block assumes: an ``<!-- invisible-code-block: python``
comment runs code a reader does not see (the models an excerpt uses, checks
of what a block claims), and ``<!-- skip: next "reason" -->`` marks a block
that cannot run here, with its reason (a service that is not on this
machine): those are few, and listed by `test_blocks_not_run_are_few`."""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from unittest import SkipTest

import pytest
import sqlalchemy as sa
from conftest import fresh_database
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

from sqlalchemy_envelope import KeyRegistry

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "FORMAT.md", *(ROOT / "docs").glob("*.md")]
)
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])

SERVERS = {"POSTGRES_URL": "postgresql", "MARIADB_URL": "mariadb"}
_FENCE = re.compile(r"^[ \t]*```python[ \t]*$", re.MULTILINE)
_INVISIBLE = re.compile(r"^[ \t]*<!-- invisible-code-block: python[ \t]*$", re.MULTILINE)
_SKIP = re.compile(r"<!-- skip: (?P<rest>[^>]*)-->")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _run(document: Path, given: dict[str, str]) -> list[str]:
    """Run the document's Python blocks in order, with ``given`` in their
    namespace; the reasons of those not run."""
    parsed = SYBIL.parse(document)
    parsed.namespace.update(given)
    not_run = []
    try:
        for example in parsed:
            try:
                example.evaluate()
            except SkipTest as reason:
                not_run.append(f"{_name(document)}, line {example.line}: {reason}")
            except Exception as error:
                raise AssertionError(
                    f"{_name(document)}, line {example.line}: this block fails"
                ) from error
    finally:
        for value in parsed.namespace.values():
            if isinstance(value, KeyRegistry):
                value.close()
            elif isinstance(value, sa.Engine):
                value.dispose()
        # Its models go too: a by-name job refuses two loaded definitions of
        # one column that disagree, and another page may define it otherwise.
        parsed.namespace.clear()
        gc.collect()
    return not_run


@pytest.fixture
def page_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory to run a page in, and no root key from the environment."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("ENVELOPE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    environment = dict(os.environ)
    yield tmp_path
    # What a page exported (its root key) goes with it.
    os.environ.clear()
    os.environ.update(environment)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_python_block_runs(
    document: Path, page_directory: Path, request: pytest.FixtureRequest
) -> None:
    """A page that names ``POSTGRES_URL`` or ``MARIADB_URL`` (in a block a
    reader does not see) runs with a fresh database on the suite's server."""
    text = document.read_text()
    with ExitStack() as stack:
        given = {
            name: stack.enter_context(fresh_database(request, kind, page_directory))
            for name, kind in SERVERS.items()
            if name in text
        }
        _run(document, given)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_python_block_is_found(document: Path) -> None:
    """Sybil sees each block a reader sees (a fence it did not parse would
    never run), and every block not run says why."""
    text = document.read_text()
    expected = len(_FENCE.findall(text)) + len(_INVISIBLE.findall(text))
    found = [example for example in SYBIL.parse(document) if isinstance(example.parsed, str)]
    skips = [m["rest"].strip() for m in _SKIP.finditer(text)]
    assert len(found) == expected
    assert [rest for rest in skips if not re.fullmatch(r'next "[^"]+"', rest)] == []


def test_blocks_not_run_are_few() -> None:
    """At most one block in ten is marked as not runnable."""
    reasons = [
        (_name(document), m.group(1))
        for document in DOCUMENTS
        for m in re.finditer(r'<!-- skip: next "([^"]+)" -->', document.read_text())
    ]
    blocks = sum(len(_FENCE.findall(document.read_text())) for document in DOCUMENTS)
    assert len(reasons) * 10 <= blocks, reasons
