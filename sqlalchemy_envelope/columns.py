"""The encrypted columns this process has defined.

Every `EncryptedType` records the column it is attached to, so that the
registry can count rows per data key (the census behind the destroy guard)
from the application's own metadata, without being told the columns.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import sqlalchemy as sa

__all__ = ["defined_columns", "remember", "storage_of"]

_lock = threading.Lock()
# Keyed by id(): a Column's == builds SQL, so Columns cannot be dict keys
# (nor WeakKeyDictionary keys, which compare referents with ==).
_columns: dict[int, tuple[weakref.ref[sa.Column[Any]], str]] = {}


def remember(column: sa.Column[Any], storage: str) -> None:
    key = id(column)

    def forget(_: object) -> None:
        with _lock:
            _columns.pop(key, None)

    with _lock:
        _columns[key] = (weakref.ref(column, forget), storage)


def storage_of(column: sa.Column[Any]) -> str | None:
    """ "binary" or "text" for an encrypted column, None for any other."""
    entry = _columns.get(id(column))
    if entry is None or entry[0]() is not column:
        return None
    return entry[1]


def defined_columns() -> list[tuple[sa.Column[Any], str]]:
    """Encrypted columns attached to a table, with their storage."""
    with _lock:
        entries = list(_columns.values())
    found = []
    for ref, storage in entries:
        column = ref()
        if column is not None and getattr(column, "table", None) is not None:
            found.append((column, storage))
    return found
