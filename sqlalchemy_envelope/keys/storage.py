"""The ``data_keys`` table: its one schema definition and the statements on it.

Only wrapped keys are stored. The database itself guarantees at most one
active key per scope: ``active_scope`` equals ``scope`` exactly while a key is
active and is NULL otherwise, and it is UNIQUE. A unique column that allows
many NULLs works on SQLite, PostgreSQL and MySQL/MariaDB alike, where a partial
index would not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

from ..errors import KeyTamperedError

__all__ = [
    "DEFAULT_TABLE_NAME",
    "KeyRow",
    "KeyState",
    "data_keys_table",
]

DEFAULT_TABLE_NAME = "data_keys"
ALGORITHM = "aes-256-gcm"


class KeyState(enum.StrEnum):
    """The life of a data key: active -> retired -> disabled -> destroyed."""

    ACTIVE = "active"
    RETIRED = "retired"
    DISABLED = "disabled"
    DESTROYED = "destroyed"


def data_keys_table(metadata: sa.MetaData, name: str = DEFAULT_TABLE_NAME) -> sa.Table:
    """Define the data_keys table in ``metadata``."""
    return sa.Table(name, metadata, *data_keys_schema(name))


# The dialect names under which MySQL and MariaDB column variants are registered.
MYSQL_DIALECTS = ("mysql", "mariadb")


SCOPE_CHARS = 255
"""The width of data_keys.scope, in characters."""


def scope_type() -> sa.types.TypeEngine[str]:
    # MySQL/MariaDB compare strings case-insensitively by default: "Acme" and
    # "acme" must stay two tenants with two keys.
    return sa.String(SCOPE_CHARS).with_variant(
        mysql.VARCHAR(SCOPE_CHARS, collation="utf8mb4_bin"), *MYSQL_DIALECTS
    )


def time_type() -> sa.types.TypeEngine[datetime]:
    # MySQL/MariaDB keep whole seconds unless asked for microseconds.
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), *MYSQL_DIALECTS)


def data_keys_schema(name: str = DEFAULT_TABLE_NAME) -> list[sa.schema.SchemaItem]:
    """The columns and constraints of data_keys, new objects on every call:
    the one definition behind `KeyRegistry.init` and the Alembic operation."""
    states = ", ".join(f"'{s.value}'" for s in KeyState)
    return [
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("scope", scope_type(), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("root_key_fingerprint", sa.String(64), nullable=False),
        sa.Column("root_key_description", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active_scope", scope_type(), nullable=True),
        # Encryptions claimed under this key by all processes: an upper bound
        # of its real use, checked against the rotation policy.
        sa.Column("encryptions", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", time_type(), nullable=False),
        sa.Column("state_changed_at", time_type(), nullable=False),
        sa.UniqueConstraint("scope", "version", name=f"uq_{name}_scope_version"),
        sa.UniqueConstraint("active_scope", name=f"uq_{name}_one_active"),
        sa.CheckConstraint(f"state IN ({states})", name=f"ck_{name}_state"),
        sa.CheckConstraint(
            # IS NOT NULL first: a NULL comparison would let the CHECK pass.
            "(state = 'active' AND active_scope IS NOT NULL AND active_scope = scope) "
            "OR (state <> 'active' AND active_scope IS NULL)",
            name=f"ck_{name}_active_scope",
        ),
        sa.CheckConstraint(
            "wrapped_key IS NOT NULL OR state = 'destroyed'",
            name=f"ck_{name}_wrapped_key",
        ),
    ]


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """A stored time in UTC: SQLite hands back naive datetimes, PostgreSQL
    ones in the session's time zone; everything stored is UTC."""
    return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class KeyRow:
    """One row of data_keys, as read; ``wrapped_key`` is None once destroyed."""

    id: int
    scope: str
    version: int
    algorithm: str
    wrapped_key: bytes | None
    root_key_fingerprint: str
    root_key_description: str
    state: KeyState
    encryptions: int
    created_at: datetime
    state_changed_at: datetime

    def __repr__(self) -> str:
        return (
            f"KeyRow(id={self.id:#012x}, scope={self.scope!r}, version={self.version}, "
            f"state={self.state.value!r})"
        )

    @classmethod
    def from_mapping(cls, row: sa.RowMapping) -> KeyRow:
        """The row as read; a state or count the library never writes (the
        table's CHECK constraints bypassed) is tampering."""
        wrapped = row["wrapped_key"]
        if row["state"] not in _STATES:
            raise KeyTamperedError(row["version"], row["scope"], "its state is none of the four")
        if int(row["encryptions"]) < 0:
            raise KeyTamperedError(row["version"], row["scope"], "its count of encryptions is < 0")
        return cls(
            id=row["id"],
            scope=row["scope"],
            version=row["version"],
            algorithm=row["algorithm"],
            wrapped_key=bytes(wrapped) if wrapped is not None else None,
            root_key_fingerprint=row["root_key_fingerprint"],
            root_key_description=row["root_key_description"],
            state=KeyState(row["state"]),
            encryptions=int(row["encryptions"]),
            created_at=aware(row["created_at"]),
            state_changed_at=aware(row["state_changed_at"]),
        )


_STATES = frozenset(state.value for state in KeyState)


def _one(conn: Connection, stmt: sa.Select[tuple[object, ...]]) -> KeyRow | None:
    row = conn.execute(stmt).mappings().first()
    return KeyRow.from_mapping(row) if row is not None else None


def active_key(conn: Connection, table: sa.Table, scope: str) -> KeyRow | None:
    return _one(conn, sa.select(table).where(table.c.active_scope == scope))


def active_key_and_newest(
    conn: Connection, table: sa.Table, scope: str
) -> tuple[KeyRow, int] | None:
    """The scope's active key and the highest version of the scope, in one
    statement, so from one snapshot: a rotation committed meanwhile cannot
    make the active key look older than the newest."""
    newer = table.alias("newer")
    newest = sa.select(sa.func.max(newer.c.version)).where(newer.c.scope == scope)
    stmt = sa.select(table, newest.scalar_subquery().label("newest_version")).where(
        table.c.active_scope == scope
    )
    row = conn.execute(stmt).mappings().first()
    return None if row is None else (KeyRow.from_mapping(row), int(row["newest_version"]))


def key_by_id(conn: Connection, table: sa.Table, key_id: int) -> KeyRow | None:
    return _one(conn, sa.select(table).where(table.c.id == key_id))


def all_keys(conn: Connection, table: sa.Table, scope: str | None = None) -> list[KeyRow]:
    stmt = sa.select(table).order_by(table.c.scope, table.c.version)
    if scope is not None:
        stmt = stmt.where(table.c.scope == scope)
    return [KeyRow.from_mapping(r) for r in conn.execute(stmt).mappings()]


def foreign_fingerprints(
    conn: Connection, table: sa.Table, fingerprint: str, *, latest: bool = False
) -> list[str]:
    """Fingerprints of root keys, other than ``fingerprint``, that still wrap
    keys. With ``latest``, as last committed even inside a MySQL/MariaDB
    REPEATABLE READ snapshot taken earlier in the transaction (a locking read
    there; a statement taken under `lock_table` sees them elsewhere)."""
    stmt = (
        sa.select(table.c.root_key_fingerprint)
        .where(table.c.root_key_fingerprint != fingerprint)
        .where(table.c.wrapped_key.is_not(None))
    )
    if latest and conn.dialect.name in MYSQL_DIALECTS:
        return sorted(set(conn.execute(stmt.with_for_update()).scalars()))
    return list(conn.execute(stmt.distinct()).scalars())


def keys_by_fingerprint(conn: Connection, table: sa.Table) -> dict[str, int]:
    """How many stored keys (of every scope; destroyed ones hold none) each
    root key wraps, by fingerprint."""
    fingerprint = table.c.root_key_fingerprint
    stmt = (
        sa.select(fingerprint, sa.func.count())
        .where(table.c.wrapped_key.is_not(None))
        .group_by(fingerprint)
        .order_by(fingerprint)
    )
    return {str(name): int(count) for name, count in conn.execute(stmt).all()}


def sample_key(conn: Connection, table: sa.Table) -> KeyRow | None:
    """One key that still has its wrapped key, if any: what a registry unwraps
    to prove that it holds the root key."""
    stmt = sa.select(table).where(table.c.wrapped_key.is_not(None)).order_by(table.c.id).limit(1)
    return _one(conn, stmt)


def active_scopes(conn: Connection, table: sa.Table) -> list[str]:
    """Every scope that has an active key (every scope but shredded ones)."""
    stmt = sa.select(table.c.active_scope).where(table.c.active_scope.is_not(None))
    return sorted(conn.execute(stmt.order_by(table.c.active_scope)).scalars())


def is_shredded(conn: Connection, table: sa.Table, scope: str) -> bool:
    """True if the scope has keys and all of them were destroyed."""
    stmt = sa.select(table.c.state).where(table.c.scope == scope).distinct()
    return set(conn.execute(stmt).scalars()) == {KeyState.DESTROYED.value}


def key_by_version(
    conn: Connection, table: sa.Table, scope: str, version: int, *, for_update: bool = False
) -> KeyRow | None:
    stmt = sa.select(table).where(table.c.scope == scope, table.c.version == version)
    return _one(conn, stmt.with_for_update() if for_update else stmt)


def next_version(conn: Connection, table: sa.Table, scope: str) -> int:
    stmt = sa.select(sa.func.max(table.c.version)).where(table.c.scope == scope)
    current = conn.execute(stmt).scalar()
    return 1 if current is None else int(current) + 1


def retire_active(
    conn: Connection, table: sa.Table, scope: str, now: datetime, expected_id: int | None
) -> int:
    """Demote the scope's active key; with ``expected_id``, only if it is still
    that key (compare-and-swap). Returns the number of rows changed."""
    stmt = (
        sa.update(table)
        .where(table.c.active_scope == scope)
        .values(state=KeyState.RETIRED.value, active_scope=None, state_changed_at=now)
    )
    if expected_id is not None:
        stmt = stmt.where(table.c.id == expected_id)
    return conn.execute(stmt).rowcount


def insert_active(
    conn: Connection,
    table: sa.Table,
    *,
    key_id: int,
    scope: str,
    version: int,
    wrapped_key: bytes,
    root_key_fingerprint: str,
    root_key_description: str,
    now: datetime,
) -> None:
    conn.execute(
        sa.insert(table).values(
            id=key_id,
            scope=scope,
            version=version,
            algorithm=ALGORITHM,
            wrapped_key=wrapped_key,
            root_key_fingerprint=root_key_fingerprint,
            root_key_description=root_key_description,
            state=KeyState.ACTIVE.value,
            active_scope=scope,
            encryptions=0,
            created_at=now,
            state_changed_at=now,
        )
    )


def claim_statement(table: sa.Table, key_id: int, count: int, limit: int) -> sa.Update:
    """Reserve ``count`` more encryptions under an active key, unless that would
    take it past ``limit``. One statement, so concurrent claims cannot both
    squeeze under the limit; it changes one row if granted."""
    return (
        sa.update(table)
        .where(
            table.c.id == key_id,
            table.c.state == KeyState.ACTIVE.value,
            table.c.encryptions + count <= limit,
        )
        .values(encryptions=table.c.encryptions + count)
    )


def claim(conn: Connection, table: sa.Table, key_id: int, count: int, limit: int) -> bool:
    return conn.execute(claim_statement(table, key_id, count, limit)).rowcount == 1


def set_state(
    conn: Connection, table: sa.Table, key_id: int, state: KeyState, now: datetime
) -> None:
    values: dict[str, object] = {"state": state.value, "state_changed_at": now}
    if state is not KeyState.ACTIVE:
        values["active_scope"] = None
    if state is KeyState.DESTROYED:
        values["wrapped_key"] = None  # the tombstone keeps id and version
    conn.execute(sa.update(table).where(table.c.id == key_id).values(**values))


def renumber_destroyed(conn: Connection, table: sa.Table, scope: str) -> None:
    """Move the destroyed keys of a scope out of the versions from 1 up, below
    every version the scope ever had: their rows stay, as tombstones, and a
    scope brought back after a shred can number its keys from 1 again."""
    lowest = conn.execute(
        sa.select(sa.func.min(table.c.version)).where(table.c.scope == scope)
    ).scalar()
    offset = max(0, -int(lowest or 0))
    conn.execute(
        sa.update(table)
        .where(
            table.c.scope == scope,
            table.c.state == KeyState.DESTROYED.value,
            table.c.version > 0,
        )
        .values(version=-table.c.version - offset)
    )


def rewrap(
    conn: Connection,
    table: sa.Table,
    key_id: int,
    wrapped_key: bytes | None,
    root_key_fingerprint: str,
    root_key_description: str,
) -> None:
    conn.execute(
        sa.update(table)
        .where(table.c.id == key_id)
        .values(
            wrapped_key=wrapped_key,
            root_key_fingerprint=root_key_fingerprint,
            root_key_description=root_key_description,
        )
    )


def lock_table(conn: Connection, table: sa.Table) -> None:
    """Take the lock that every transaction inserting a key takes first, and
    `rewrap` for its whole run: it conflicts with itself and with every write
    to data_keys, not with reads. Whoever holds it sees the root key that
    wraps every stored key stay as it is until commit.

    PostgreSQL: SHARE ROW EXCLUSIVE (row locks do not stop an INSERT).
    SQLite: the database's write lock, as BEGIN IMMEDIATE takes it, by a write
    that changes nothing (which works in a transaction already begun too).
    MySQL/MariaDB: every row FOR UPDATE (InnoDB's next-key locks keep INSERTs
    out too)."""
    if conn.dialect.name == "postgresql":
        name = conn.dialect.identifier_preparer.format_table(table)
        conn.exec_driver_sql(f"LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE")
    elif conn.dialect.name == "sqlite":
        conn.execute(sa.update(table).where(sa.false()).values(id=table.c.id))
    else:
        conn.execute(sa.select(table.c.id).with_for_update()).all()
