"""docs/root-keys.md, "Writing a provider": its HashiCorp Vault example binds
the context as the page says to, canonically (RFC 8785), so that another
implementation following the page unwraps what the example wrapped.

The Vault class cannot run here (no Vault server: the page skips it); the
encoding it calls is a block of its own, which runs, and is checked here
against `canonical_json` too."""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path
from typing import Any

from sqlalchemy_envelope.keys.rootkey import canonical_json

PAGE = Path(__file__).resolve().parent.parent / "docs" / "root-keys.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def blocks() -> list[str]:
    return BLOCK.findall(PAGE.read_text())


def the_block(defining: str) -> str:
    (found,) = [b for b in blocks() if re.search(rf"^\s*(class|def) {defining}\b", b, re.M)]
    return found


def test_the_vault_context_is_canonical() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(the_block("vault_context"), str(PAGE), "exec"), namespace)
    contexts = [
        {"version": "1", "scope": "Zoë", "kind": "data", "key_id": "123"},
        {"scope": 'a "quoted"\\ \n name', "key_id": "9", "é": "ü", "\U0001f600": "x"},
    ]
    for context in contexts:
        assert base64.b64decode(namespace["vault_context"](context)) == canonical_json(context)


def test_the_vault_provider_wraps_and_unwraps_under_that_context() -> None:
    """Both calls to Vault pass ``context=vault_context(context)``, and the
    class encodes no context of its own."""
    tree = ast.parse(the_block("VaultTransitRootKey"))
    contexts = [
        keyword.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "context"
    ]
    assert len(contexts) == 2
    assert all(ast.unparse(value) == "vault_context(context)" for value in contexts)
    assert "json" not in {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
