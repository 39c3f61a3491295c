"""The encrypted columns this process has defined.

Every `EncryptedType` records the column it is attached to, with its
definition: the one source of truth of how the column's values are sealed,
which every job uses, whether it is given the column or its name (the census,
re-encrypt and decrypt in place, the command line, the Alembic operations).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..crypto import format as fmt
from .utils_legacy import LegacyValues

__all__ = [
    "ColumnInfo",
    "defined_columns",
    "definitions_of",
    "info_of",
    "loaded_columns",
    "remember",
]


@dataclass(frozen=True)
class ColumnInfo:
    """A column's definition, as its `EncryptedType` declares it: how values
    are stored, their context (given the schema its table is in), their
    format (deterministic or randomized,
    bound to the tenant scope or not), whether legacy plaintext may be
    encrypted in place (``legacy``: read by the sqlalchemy-utils type that
    wrote it), and the type of the plaintext."""

    storage: str
    context: Callable[[str | None], fmt.Context]
    migrating: bool
    deterministic: bool = False
    bind_scope: bool = False
    value_type: sa.types.TypeEngine[Any] | None = None
    legacy: LegacyValues | None = None

    @property
    def value_kind(self) -> str | None:
        """What the wrapped type holds, as plaintext: text (strings, enums),
        binary, or other (numbers, dates... in an internal encoding that is
        no plain column's value); None when not recorded."""
        if self.value_type is None:
            return None
        if isinstance(self.value_type, sa.String):
            return "text"
        if isinstance(self.value_type, sa.types._Binary):
            return "binary"
        return "other"


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


def definitions_of(table: str, column: str) -> list[tuple[sa.Column[Any], ColumnInfo]]:
    """The loaded definitions of ``table.column``, in any schema: a job given
    a column by name finds its definition here."""
    return [
        (found, info)
        for found, info in defined_columns()
        if found.name == column and getattr(found.table, "name", None) == table
    ]


def loaded_columns(table: str, column: str) -> list[sa.Column[Any]]:
    """Every column named ``table.column`` (in any schema, of any type) in
    the tables the process has loaded: those holding an encrypted column,
    and every table of their MetaData. A job given a column by name learns
    here that the models define it as something else (a blind index, a
    plain column)."""
    tables: dict[int, sa.Table] = {}
    for found, _ in defined_columns():
        home = found.table
        if isinstance(home, sa.Table):
            for loaded in (home, *home.metadata.tables.values()):
                tables[id(loaded)] = loaded
    return [c for t in tables.values() if t.name == table for c in t.columns if c.name == column]
