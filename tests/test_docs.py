"""Every Python code block of the documentation (README.md, SECURITY.md,
FORMAT.md and the pages of docs/) runs, so the documentation cannot rot.

A page's blocks run in order in one namespace, as a reader would paste them
into a fresh interpreter: each page runs in a Python process of its own, in
a fresh directory (a page's SQLite database is a file there), without the
``ENVELOPE_*`` variables of the environment. Sybil's Markdown markers give the
context a block assumes: an ``<!-- invisible-code-block: python`` comment
runs code a reader does not see (the models an excerpt uses, checks of what a
block claims), and ``<!-- skip: next "reason" -->`` marks a block that cannot
run here, with its reason (a service that is not on this machine): those are
few (`test_blocks_not_run_are_few`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import SkipTest

import pytest
from conftest import fresh_database
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "FORMAT.md", *(ROOT / "docs").glob("*.md")]
)
SYBIL = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])

# A page naming one of these (in a block a reader does not see) gets a fresh
# database on the suite's server of that kind, by that name.
SERVERS = {"POSTGRES_URL": "postgresql", "MARIADB_URL": "mariadb"}
_GIVEN = "SQLALCHEMY_ENVELOPE_DOCS_GIVEN"
_FENCE = re.compile(r"^[ \t]*```python[ \t]*$", re.MULTILINE)
_INVISIBLE = re.compile(r"^[ \t]*<!-- invisible-code-block: python[ \t]*$", re.MULTILINE)
_SKIP = re.compile(r"<!-- skip: (?P<rest>[^>]*)-->")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def run_page(document: Path, given: dict[str, str]) -> None:
    """Run the document's Python blocks in order, with ``given`` in their
    namespace (in the process of the page, see `main`)."""
    parsed = SYBIL.parse(document)
    parsed.namespace.update(given)
    for example in parsed:
        try:
            example.evaluate()
        except SkipTest as reason:
            print(f"{_name(document)}, line {example.line}: not run: {reason}")
        except Exception as error:
            raise AssertionError(
                f"{_name(document)}, line {example.line}: this block fails"
            ) from error


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_python_block_runs(
    document: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    text = document.read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    env.pop("DATABASE_URL", None)
    with ExitStack() as stack:
        given = {
            name: stack.enter_context(fresh_database(request, kind, tmp_path))
            for name, kind in SERVERS.items()
            if name in text
        }
        env[_GIVEN] = json.dumps(given)
        page = subprocess.run(
            [sys.executable, __file__, str(document)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
    assert page.returncode == 0, page.stderr


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_every_python_block_is_found(document: Path) -> None:
    """Sybil sees each block a reader sees (a fence it did not parse would
    never run), and every block not run says why."""
    text = document.read_text()
    expected = len(_FENCE.findall(text)) + len(_INVISIBLE.findall(text))
    found = [example for example in SYBIL.parse(document) if isinstance(example.parsed, str)]
    assert len(found) == expected
    skips = [m["rest"].strip() for m in _SKIP.finditer(text)]
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


def main() -> None:
    """One page, in the process of its own that `test_every_python_block_runs` starts."""
    run_page(Path(sys.argv[1]), json.loads(os.environ[_GIVEN]))


if __name__ == "__main__":
    main()
