"""Key scope names: the default scope, tenants, and the scopes of index keys."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from .storage import SCOPE_CHARS

__all__ = [
    "DEFAULT_SCOPE",
    "INDEX_SCOPE_PREFIX",
    "MAX_SCOPE_CHARS",
    "check_scope",
    "index_scope",
    "is_index_scope",
]

DEFAULT_SCOPE = "default"
INDEX_SCOPE_PREFIX = "~index:"
"""Scopes of the keys behind blind indexes and deterministic columns: they
never rotate with data keys, so lookups keep working across rotations."""
MAX_SCOPE_CHARS = SCOPE_CHARS - len(INDEX_SCOPE_PREFIX)
"""A scope's index scope must fit data_keys.scope too."""


def check_scope(scope: Any) -> str:
    if not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_CHARS:
        raise ConfigurationError(
            f"a scope is a non-empty string of at most {MAX_SCOPE_CHARS} characters"
        )
    return scope


def index_scope(scope: str) -> str:
    """The scope of the non-rotating key behind ``scope``'s blind indexes and
    deterministic columns."""
    return INDEX_SCOPE_PREFIX + scope


def is_index_scope(scope: str) -> bool:
    """Whether ``scope`` holds index keys rather than data keys."""
    return scope.startswith(INDEX_SCOPE_PREFIX)
