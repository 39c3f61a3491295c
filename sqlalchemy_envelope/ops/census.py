"""Counting rows per data key, in SQL, from the ciphertext header.

No row is decrypted: the database groups values by their first six bytes
(binary storage) or eight base64 characters (text storage), which hold the
format version and the data key id. Values too short to be ciphertext, or
with another first byte, are counted as not ciphertext (typically plaintext
from before a column was encrypted).
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..crypto import format as fmt
from ..errors import ConfigurationError
from ..keys.storage import MYSQL_DIALECTS, KeyRow
from ..sqla import columns
from ..sqla.blind_index import BlindIndex
from ..sqla.utils_legacy import LegacyValues
from .report import Report

__all__ = [
    "ColumnCensus",
    "KeyRows",
    "Target",
    "count",
    "discover",
    "refuse_keys_table",
    "resolve",
    "rows_under",
]

Target = Any  # "table.column", a Column, an ORM attribute, a mapped class or a Table


@dataclass(frozen=True)
class EncryptedColumnRef:
    """Where an encrypted column lives, how it stores values, and the context
    its values are bound to. ``defined``: taken from the column's definition
    (its `EncryptedType`); else found by reflection, with the default options
    assumed, which a job must not trust to change a value's format."""

    schema: str | None
    table: str
    column: str
    storage: str
    context: fmt.Context
    migrating: bool = False
    deterministic: bool = False
    bind_scope: bool = False
    value_kind: str | None = None  # "text", "binary" or "other"; None: unknown (by name)
    defined: bool = False
    # How legacy values are read, for a column moving from sqlalchemy-utils;
    # not compared: two loaded definitions each hold their own.
    legacy: LegacyValues | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"

    @property
    def qualified_name(self) -> str:
        """The name reports use: ``schema.table.column`` outside the
        connection's default schema."""
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class KeyRows(Report):
    """Rows of one column under one data key."""

    key_id: int
    rows: int
    scope: str | None = None
    version: int | None = None
    state: str | None = None


@dataclass(frozen=True)
class ColumnCensus(Report):
    """One encrypted column: rows per data key, NULLs, and values that are not
    ciphertext. ``unknown_key_rows`` counts values whose header names a key
    data_keys does not hold; those key ids are not kept (for a legacy
    plaintext value they would be five bytes of its plaintext)."""

    column: str
    rows: int
    nulls: int
    not_ciphertext: int
    keys: tuple[KeyRows, ...] = field(default_factory=tuple)
    unknown_key_rows: int = 0

    def rows_under(self, key_id: int) -> int:
        return sum(k.rows for k in self.keys if k.key_id == key_id)


def with_context(ref: EncryptedColumnRef, context: str) -> EncryptedColumnRef:
    return replace(ref, context=fmt.given_context(context, ref.schema))


def _ref(column: sa.Column[Any], info: columns.ColumnInfo) -> EncryptedColumnRef:
    table = column.table
    assert isinstance(table, sa.Table)
    return EncryptedColumnRef(
        table.schema,
        table.name,
        column.name,
        info.storage,
        info.context(table.schema),
        info.migrating,
        info.deterministic,
        info.bind_scope,
        info.value_kind,
        defined=True,
        legacy=info.legacy,
    )


def _encrypted(column: sa.Column[Any]) -> EncryptedColumnRef | None:
    info = columns.info_of(column)
    return None if info is None else _ref(column, info)


def _by_name(conn: Connection, name: str, keys_table: sa.Table | None) -> EncryptedColumnRef:
    parts = name.split(".")
    if len(parts) not in (2, 3):
        raise ConfigurationError(
            f"name a column as TABLE.COLUMN or SCHEMA.TABLE.COLUMN, not {name!r}"
        )
    schema = parts[0] if len(parts) == 3 else None
    table, column = parts[-2], parts[-1]
    refuse_keys_table(conn, keys_table, schema, table, name)
    inspector = sa.inspect(conn)
    if not inspector.has_table(table, schema=schema):
        raise ConfigurationError(f"table {table!r} does not exist")
    reflected = {c["name"]: c for c in inspector.get_columns(table, schema=schema)}
    if column not in reflected:
        raise ConfigurationError(f"table {table!r} has no column {column!r}")
    defined = _defined(inspector, schema, table, column)
    kind = _python_type(reflected[column]["type"])
    if kind not in (bytes, str):
        raise ConfigurationError(
            f"{table}.{column} is {reflected[column]['type']}, neither a text nor a binary "
            "column: it cannot hold ciphertext"
        )
    storage = "binary" if kind is bytes else "text"
    if defined is None:
        return EncryptedColumnRef(
            schema, table, column, storage, fmt.column_context(schema, table, column)
        )
    if defined.storage != storage:
        raise ConfigurationError(
            f"{name}: the loaded models define it with storage={defined.storage!r}, but the "
            f"database column is {reflected[column]['type']}: are these the models of "
            "this database?"
        )
    return defined


def _defined(
    inspector: sa.Inspector, schema: str | None, table: str, column: str
) -> EncryptedColumnRef | None:
    """The definition of ``schema.table.column`` among the loaded models
    (the connection's default schema matching a table without one), or None
    if no model defines it. Two that disagree are refused: a job cannot
    tell which one the column's values were written with; so is a column
    the models define as anything but an encrypted column."""
    default = inspector.default_schema_name

    def home(name: str | None) -> str | None:
        return None if name == default else name

    name = ".".join(p for p in (home(schema), table, column) if p)
    loaded = [
        c for c in columns.loaded_columns(table, column) if home(c.table.schema) == home(schema)
    ]
    others = [c for c in loaded if columns.info_of(c) is None]
    refs = {
        replace(_ref(found, info), schema=home(found.table.schema))
        for found, info in columns.definitions_of(table, column)
        if home(found.table.schema) == home(schema)
    }
    if others and not refs:
        raise _not_encrypted(others[0], name, " in your models")
    if len(refs) + bool(others) > 1:
        differ = sorted(
            f.name
            for f in fields(EncryptedColumnRef)
            if f.compare and len({getattr(r, f.name) for r in refs}) > 1
        )
        if others:
            differ.append("not encrypted in some")
        raise ConfigurationError(
            f"{name} has {len(refs) + len(others)} loaded definitions that disagree "
            f"({', '.join(differ)}): a job cannot tell which one its values were written "
            "with; pass the Column or ORM attribute instead, or load only this database's "
            "models"
        )
    return refs.pop() if refs else None


def _not_encrypted(column: sa.Column[Any], name: str, where: str) -> ConfigurationError:
    """The refusal of a column that is not an encrypted one: a job would
    write ciphertext over its values (a blind index's digests, which every
    lookup would then miss, or a plain column the application reads as is)."""
    if isinstance(column.type, BlindIndex):
        return ConfigurationError(
            f"{name} is a blind index column{where}, not an encrypted column: its values "
            "are digests, which jobs never rewrite (fill a blind index with "
            "backfill_index, or `sqlalchemy-envelope backfill-index`)"
        )
    return ConfigurationError(
        f"{name} is a plain column{where} ({column.type}), not an encrypted column: to "
        "encrypt it in place, declare it EncryptedType(..., migrating=True) first (see "
        "'Encrypting an existing plaintext column' in docs/operations.md)"
    )


def _python_type(column_type: sa.types.TypeEngine[Any]) -> type | None:
    try:
        return column_type.python_type
    except NotImplementedError:
        return None


# Schemas that hold the server's own catalog, never application rows, by
# dialect. Only these exact names: an application's schema may be called
# anything else ("temporary", "sys_audit"). PostgreSQL's pg_* schemas, which
# SQLAlchemy never lists, and SQLite's "temp" are per-connection or catalogs.
_SYSTEM_SCHEMAS = {
    "postgresql": frozenset({"information_schema"}),
    "mysql": frozenset({"information_schema", "mysql", "performance_schema", "sys"}),
    "mariadb": frozenset({"information_schema", "mysql", "performance_schema", "sys"}),
}


def schemas(conn: Connection) -> list[str | None]:
    """Every schema the connection can see that may hold application tables,
    the default one as None (so that it is read once, under its short name):
    PostgreSQL's schemas but its catalogs, MySQL/MariaDB's databases but the
    server's own, SQLite's attached databases."""
    inspector = sa.inspect(conn)
    default = inspector.default_schema_name
    system = _SYSTEM_SCHEMAS.get(conn.dialect.name, frozenset({"information_schema"}))
    others = [
        name
        for name in inspector.get_schema_names()
        if name != default and name.lower() not in system
    ]
    return [None, *sorted(others)]


def discover(
    conn: Connection, skip_tables: Iterable[tuple[str | None, str]]
) -> list[EncryptedColumnRef]:
    """Every column of every table in every schema (but ``skip_tables``, as
    schema and name) that could hold ciphertext: all binary and text columns.
    For the destroy guard and maintenance, which must find every row under a
    key even when no model is loaded. Enum columns hold only their labels,
    never ciphertext (and PostgreSQL has no substr of an enum)."""
    inspector = sa.inspect(conn)
    default = inspector.default_schema_name
    skipped = {(None if schema == default else schema, name) for schema, name in skip_tables}
    refs = []
    for schema in schemas(conn):
        for table in inspector.get_table_names(schema=schema):
            if (schema, table) in skipped:
                continue
            for column in inspector.get_columns(table, schema=schema):
                kind = _python_type(column["type"])
                if kind in (bytes, str) and not isinstance(column["type"], sa.Enum):
                    storage = "binary" if kind is bytes else "text"
                    context = fmt.column_context(schema, table, column["name"])
                    refs.append(EncryptedColumnRef(schema, table, column["name"], storage, context))
    return refs


def shortest(version: int, storage: str) -> int:
    """The length of the shortest ciphertext of a format version, in bytes or
    (text storage) base64 characters: shorter values are not ciphertext."""
    size = fmt.OVERHEAD if version in fmt.RANDOMIZED_VERSIONS else fmt.DETERMINISTIC_OVERHEAD
    return 4 * -(-size // 3) if storage == "text" else size


def prefix(value: sa.ColumnElement[Any], storage: str) -> sa.ColumnElement[Any]:
    """The part of a stored value that holds the ciphertext header: six bytes,
    or eight base64 characters. NULL for an empty value on SQLite (substr of
    an empty BLOB), so compare it NULL-safely."""
    length = fmt.TEXT_HEADER_CHARS if storage == "text" else fmt.HEADER_BYTES
    return sa.func.substr(value, 1, length)


def prefix_literal(header: bytes, storage: str) -> sa.ColumnElement[Any]:
    """``header`` as `prefix` reads it from a column of this storage."""
    return sa.literal(fmt.to_text(header) if storage == "text" else header)


def rows_under(conn: Connection, ref: EncryptedColumnRef, header: bytes) -> int:
    """Rows of the column whose value starts with ``header`` and is long
    enough to be ciphertext of its format version (as `count` counts them):
    one index-free scan with no grouping, cheap enough to run over a whole
    database."""
    table = sa.table(ref.table, sa.column(ref.column), schema=ref.schema)
    value = table.c[ref.column]
    stmt = (
        sa.select(sa.func.count())
        .select_from(table)
        .where(
            prefix(value, ref.storage) == prefix_literal(header, ref.storage),
            sa.func.length(value) >= shortest(header[0], ref.storage),
        )
    )
    return int(conn.execute(stmt).scalar_one())


def _is_keys_table(conn: Connection, keys_table: sa.Table, schema: str | None, table: str) -> bool:
    """Whether ``schema.table`` names the registry's keys table: the
    connection's default schema stands for no schema; SQLite, MySQL and
    MariaDB may take a name in any case for the same table."""
    default = sa.inspect(conn).default_schema_name

    def where(schema: str | None, table: str) -> tuple[str | None, str]:
        found = (None if schema == default else schema, table)
        if conn.dialect.name == "sqlite" or conn.dialect.name in MYSQL_DIALECTS:
            return (found[0] and found[0].casefold(), found[1].casefold())
        return found

    return where(schema, table) == where(keys_table.schema, keys_table.name)


def refuse_keys_table(
    conn: Connection, keys_table: sa.Table | None, schema: str | None, table: str, what: str
) -> None:
    """Refuse ``what`` (a column or table of ``schema.table``) if it is in the
    registry's keys table: its values are wrapped keys and their metadata,
    not encrypted values, and a job rewriting one loses every value under
    that key."""
    if keys_table is not None and _is_keys_table(conn, keys_table, schema, table):
        raise ConfigurationError(
            f"{what} is in {keys_table.name}, the registry's keys table, which no job "
            "(re-encrypt, decrypt in place, backfill) may rewrite: a changed key row "
            "loses every value under its key; name your application's encrypted columns"
        )


def resolve(
    conn: Connection, targets: Iterable[Target], keys_table: sa.Table | None = None
) -> list[EncryptedColumnRef]:
    """The encrypted columns that ``targets`` name, or, with no targets, every
    encrypted column the process has defined whose table is in this database.
    A column named "table.column" gets its definition from the loaded models
    when one defines it, else its storage by reflection (``defined`` False).
    A target in ``keys_table`` (the registry's ``data_keys``) is refused, and
    never listed."""
    found: list[EncryptedColumnRef] = []
    targets = list(targets)
    if not targets:
        inspector = sa.inspect(conn)
        names = {(c.table.schema, c.table.name, c.name) for c, _ in columns.defined_columns()}
        for schema, table, column in sorted(names, key=lambda n: (n[0] or "", n[1], n[2])):
            if keys_table is not None and _is_keys_table(conn, keys_table, schema, table):
                continue
            if inspector.has_table(table, schema=schema) and column in {
                c["name"] for c in inspector.get_columns(table, schema=schema)
            }:
                ref = _defined(inspector, schema, table, column)
                if ref is not None:  # None: its model was garbage-collected meanwhile
                    found.append(ref)
    for target in targets:
        found.extend(_resolve_one(conn, target, keys_table))
    unique: dict[tuple[str | None, str, str], EncryptedColumnRef] = {}
    for ref in found:
        unique.setdefault((ref.schema, ref.table, ref.column), ref)
    return sorted(unique.values(), key=lambda r: (r.schema or "", r.table, r.column))


def _resolve_one(
    conn: Connection, target: Target, keys_table: sa.Table | None
) -> list[EncryptedColumnRef]:
    if isinstance(target, EncryptedColumnRef):
        refuse_keys_table(conn, keys_table, target.schema, target.table, target.qualified_name)
        return [target]
    if isinstance(target, str):
        return [_by_name(conn, target, keys_table)]
    if isinstance(target, sa.Table):
        refuse_keys_table(conn, keys_table, target.schema, target.name, target.fullname)
        refs = [_encrypted(c) for c in target.columns]
        return [r for r in refs if r is not None]
    column = getattr(getattr(target, "property", None), "columns", [None])[0]
    if column is None and isinstance(target, sa.Column):
        column = target
    if isinstance(column, sa.Column):
        table = column.table
        if isinstance(table, sa.Table):
            what = f"{table.fullname}.{column.name}"
            refuse_keys_table(conn, keys_table, table.schema, table.name, what)
        ref = _encrypted(column)
        if ref is None:
            raise _not_encrypted(column, f"{column.table}.{column.name}", "")
        return [ref]
    mapper = sa.inspect(target, raiseerr=False)
    local_table = getattr(mapper, "local_table", None)
    if isinstance(local_table, sa.Table):
        what = local_table.fullname
        refuse_keys_table(conn, keys_table, local_table.schema, local_table.name, what)
        refs = [_encrypted(c) for c in getattr(mapper, "columns", [])]
        return [r for r in refs if r is not None]
    raise ConfigurationError(
        f"cannot take a census of {target!r}: pass 'table.column', a Column, an ORM "
        "attribute, a mapped class or a Table"
    )


def _header(raw: Any, storage: str) -> bytes | None:
    """The 6-byte header a grouped prefix stands for, or None if not ciphertext."""
    if raw is None:
        return None
    if storage == "text":
        try:
            prefix = binascii.a2b_base64(str(raw).encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            return None
    else:
        prefix = bytes(raw)
    if len(prefix) != fmt.HEADER_BYTES or prefix[0] not in fmt.VERSIONS:
        return None
    return prefix


def count(conn: Connection, ref: EncryptedColumnRef, keys: Mapping[int, KeyRow]) -> ColumnCensus:
    table = sa.table(ref.table, sa.column(ref.column), schema=ref.schema)
    value = table.c[ref.column]
    # Grouped by the header of values long enough for the shortest format
    # version, and by whether they are long enough for the longer one: the
    # first byte then says which minimum applies.
    length = sa.func.length(value)
    header = sa.case(
        (length >= shortest(fmt.DETERMINISTIC_VERSION, ref.storage), prefix(value, ref.storage)),
        else_=None,
    ).label("header")
    randomized = sa.case((length >= shortest(fmt.FORMAT_VERSION, ref.storage), 1), else_=0).label(
        "randomized"
    )
    grouped = conn.execute(
        sa.select(header, randomized, sa.func.count())
        .where(value.is_not(None))
        .group_by(header, randomized)
    ).all()
    nulls = conn.execute(sa.select(sa.func.count()).select_from(table).where(value.is_(None)))
    by_key: dict[int, int] = {}
    not_ciphertext = unknown = 0
    for raw, long_enough, rows in grouped:
        parsed = _header(raw, ref.storage)
        if parsed is None or (parsed[0] in fmt.RANDOMIZED_VERSIONS and not long_enough):
            not_ciphertext += rows
        elif fmt.key_id_of(parsed) in keys:
            key_id = fmt.key_id_of(parsed)
            by_key[key_id] = by_key.get(key_id, 0) + rows
        else:
            unknown += rows
    key_rows = [
        KeyRows(key_id, rows, keys[key_id].scope, keys[key_id].version, keys[key_id].state.value)
        for key_id, rows in by_key.items()
    ]
    key_rows.sort(key=lambda k: (k.scope or "", k.version or 0, k.key_id))
    null_count = int(nulls.scalar_one())
    return ColumnCensus(
        column=ref.qualified_name,
        rows=null_count + sum(int(r) for _, _, r in grouped),
        nulls=null_count,
        not_ciphertext=not_ciphertext,
        keys=tuple(key_rows),
        unknown_key_rows=unknown,
    )
