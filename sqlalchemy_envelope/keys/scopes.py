"""Key scope names: the default scope, tenants, and the scopes of index keys.

A user names scopes (tenants, a registry's own); the library keeps its own
scopes (index keys, ``~index:<scope>``) under ``~``, a prefix no user scope
may have, so that no tenant slug can name a key it must never get.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from ..errors import ConfigurationError
from .storage import SCOPE_CHARS

__all__ = [
    "DEFAULT_SCOPE",
    "INDEX_SCOPE_PREFIX",
    "MAX_SCOPE_CHARS",
    "RESERVED_PREFIX",
    "check_key_scope",
    "check_scope",
    "index_scope",
    "is_index_scope",
    "scope_of_index",
]

DEFAULT_SCOPE = "default"
RESERVED_PREFIX = "~"
"""What the library's own scopes start with, and no user scope may."""
INDEX_SCOPE_PREFIX = RESERVED_PREFIX + "index:"
"""Scopes of the keys behind blind indexes and deterministic columns: one per
scope (a tenant's, a registry's own), created, re-wrapped and shredded with
it; they never rotate with data keys, so lookups keep working across
rotations."""
MAX_SCOPE_CHARS = SCOPE_CHARS - len(INDEX_SCOPE_PREFIX)
"""A scope's index scope must fit data_keys.scope too."""


# Unicode's default-ignorable code points (DerivedCoreProperties.txt): they
# print as nothing, so "ac\u3164me" would look like "acme". str.isprintable
# refuses most of them (format characters), not those of other categories.
_INVISIBLE = frozenset(
    (
        *(0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFEFF, 0xFFA0),
        *range(0x180B, 0x1810),
        *range(0x200B, 0x2010),
        *range(0x202A, 0x202F),
        *range(0x2060, 0x2070),
        *range(0xFE00, 0xFE10),
        *range(0xFFF0, 0xFFF9),
        *range(0x1BCA0, 0x1BCA4),
        *range(0x1D173, 0x1D17B),
        *range(0xE0000, 0xE1000),
    )
)
_BLANK = frozenset("\u2800")  # braille pattern blank: prints as a space, is no space


def check_scope(scope: Any) -> str:
    """A scope a user names (a tenant, a registry's own): refused if empty,
    too long, in the library's reserved namespace (``~...``), or holding a
    character that does not print (controls, NUL, format and private-use
    characters, separators other than the space)."""
    if not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_CHARS:
        raise ConfigurationError(
            f"a scope is a non-empty string of at most {MAX_SCOPE_CHARS} characters"
        )
    if scope.startswith(RESERVED_PREFIX):
        raise ConfigurationError(
            f"scope {scope!r}: names starting with {RESERVED_PREFIX!r} are reserved for the "
            f"library's own keys (a scope's index key is {INDEX_SCOPE_PREFIX}<scope>); "
            "choose another name for the tenant"
        )
    if not scope.isprintable() or any(ord(c) in _INVISIBLE or c in _BLANK for c in scope):
        raise ConfigurationError(
            f"scope {scope!r} holds a control, format or invisible character: a scope "
            "name may hold only printable characters and the space"
        )
    if scope.strip() != scope:
        raise ConfigurationError(
            f"scope {scope!r} starts or ends with a space: a scope name cannot, so that "
            "two names never look the same"
        )
    if unicodedata.normalize("NFC", scope) != scope:
        raise ConfigurationError(
            f"scope {scope!r} is not in Unicode normal form C: normalize it "
            "(unicodedata.normalize('NFC', name)), so that a name has one spelling"
        )
    return scope


def check_key_scope(scope: Any) -> str:
    """A scope whose keys an operator addresses (rotate, retire, disable,
    enable, destroy, status, census): a user scope, or a user scope's index
    scope. Only these calls take an index scope; nothing writes under one."""
    if isinstance(scope, str) and is_index_scope(scope):
        check_scope(scope_of_index(scope))
        return scope
    return check_scope(scope)


def index_scope(scope: str) -> str:
    """The scope of the non-rotating key behind ``scope``'s blind indexes and
    deterministic columns."""
    return INDEX_SCOPE_PREFIX + scope


def is_index_scope(scope: str) -> bool:
    """Whether ``scope`` holds index keys rather than data keys."""
    return scope.startswith(INDEX_SCOPE_PREFIX)


def scope_of_index(scope: str) -> str:
    """The user scope an index scope belongs to."""
    return scope[len(INDEX_SCOPE_PREFIX) :]
