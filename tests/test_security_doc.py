"""SECURITY.md's threat model backs each claim with a test: every test it
names exists, so the document cannot point at a test that was renamed or
removed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECURITY_MD = ROOT / "SECURITY.md"

# `test_x.py::test_name`, or `::test_name` continuing the last file named.
_REFERENCE = re.compile(r"`(test_\w+\.py)?(?:::(test_\w+))?`")


def _references() -> list[tuple[str, str | None]]:
    """Each (file, test) SECURITY.md names, in order; test None for a whole file."""
    found: list[tuple[str, str | None]] = []
    last: str | None = None
    for match in _REFERENCE.finditer(SECURITY_MD.read_text()):
        module, test = match.groups()
        if module is None and test is None:
            continue
        module = module or last
        assert module is not None, f"`::{test}` names no file before it"
        last = module
        found.append((module, test))
    return found


def _tests_of(module: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / module).read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_security_md_names_exists() -> None:
    references = _references()
    assert len(references) >= 30  # the threat model cites its tests
    missing = [
        f"{module}::{test}" if test else module
        for module, test in references
        if not (ROOT / "tests" / module).is_file()
        or (test is not None and test not in _tests_of(module))
    ]
    assert missing == []


def test_the_threat_model_covers_each_party() -> None:
    headings = re.findall(r"^### (.+)$", SECURITY_MD.read_text(), flags=re.MULTILINE)
    assert headings[:5] == [
        "Someone who reads the database",
        "Someone who can write to the database, without the root key",
        "A tenant, and whoever names tenants",
        "An operator, or a process, with the old root key",
        "The application host",
    ]
