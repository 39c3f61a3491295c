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
_columns: weakref.WeakKeyDictionary[sa.Column[Any], str] = weakref.WeakKeyDictionary()


def remember(column: sa.Column[Any], storage: str) -> None:
    with _lock:
        _columns[column] = storage


def storage_of(column: sa.Column[Any]) -> str | None:
    """ "binary" or "text" for an encrypted column, None for any other."""
    return _columns.get(column)


def defined_columns() -> list[tuple[sa.Column[Any], str]]:
    """Encrypted columns attached to a table, with their storage."""
    with _lock:
        items = list(_columns.items())
    return [(c, s) for c, s in items if getattr(c, "table", None) is not None]
