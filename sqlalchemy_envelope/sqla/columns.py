"""The encrypted columns this process has defined.

Every `EncryptedType` records the column it is attached to, so that the
registry can count rows per data key (the census behind the destroy guard)
from the application's own metadata, without being told the columns.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

__all__ = ["ColumnInfo", "defined_columns", "info_of", "remember"]


@dataclass(frozen=True)
class ColumnInfo:
    """What the census and the re-encrypt job need to know of a column's type:
    how values are stored, their context, and whether legacy plaintext may
    be encrypted in place."""

    storage: str
    context: Callable[[], bytes]
    migrating: bool
    deterministic: bool = False
    bind_scope: bool = False


_lock = threading.Lock()
# Keyed by id(): a Column's == builds SQL, so Columns cannot be dict keys
# (nor WeakKeyDictionary keys, which compare referents with ==).
_columns: dict[int, tuple[weakref.ref[sa.Column[Any]], ColumnInfo]] = {}


def remember(column: sa.Column[Any], info: ColumnInfo) -> None:
    key = id(column)

    def forget(_: object) -> None:
        with _lock:
            _columns.pop(key, None)

    with _lock:
        _columns[key] = (weakref.ref(column, forget), info)


def info_of(column: sa.Column[Any]) -> ColumnInfo | None:
    """The encrypted column's details, or None for any other column."""
    entry = _columns.get(id(column))
    if entry is None or entry[0]() is not column:
        return None
    return entry[1]


def defined_columns() -> list[tuple[sa.Column[Any], ColumnInfo]]:
    """Encrypted columns attached to a table, with their details."""
    with _lock:
        entries = list(_columns.values())
    found = []
    for ref, info in entries:
        column = ref()
        if column is not None and getattr(column, "table", None) is not None:
            found.append((column, info))
    return found
