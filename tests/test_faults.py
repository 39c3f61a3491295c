"""The database connection dies in the middle of init, rotate, rewrap and a
re-encrypt batch: the server ends the session (pg_terminate_backend on
PostgreSQL, KILL on MariaDB) just before a chosen statement. No partial state
is left behind, and doing it again succeeds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import encrypted_table
from sqlalchemy import event

from sqlalchemy_envelope import ConnectionLostError, KeyRegistry, StaticRootKey


def _backend_id(dbapi_connection: Any, dialect: str) -> int:
    if dialect == "postgresql":
        return int(dbapi_connection.info.backend_pid)
    return int(dbapi_connection.thread_id())


@contextmanager
def killed_before(url: str, statement: str, occurrence: int = 1) -> Iterator[list[int]]:
    """Have the server end the session about to run the ``occurrence``-th
    statement starting with ``statement``; yields the list of killed ids."""
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    seen = 0
    killed: list[int] = []

    def before(conn: Any, cursor: Any, text: str, *args: Any) -> None:
        nonlocal seen
        if not text.lstrip().upper().startswith(statement.upper()) or killed:
            return
        seen += 1
        if seen < occurrence:
            return
        name = conn.dialect.name
        victim = _backend_id(conn.connection.dbapi_connection, name)
        with admin.connect() as control:
            if name == "postgresql":
                control.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": victim})
            else:
                control.exec_driver_sql(f"KILL {victim}")
        killed.append(victim)

    event.listen(sa.engine.Engine, "before_cursor_execute", before)
    try:
        yield killed
    finally:
        event.remove(sa.engine.Engine, "before_cursor_execute", before)
        admin.dispose()


def _keys(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.text(
                    "SELECT id, scope, version, state, root_key_fingerprint, wrapped_key "
                    "FROM data_keys ORDER BY id"
                )
            )
        ]


def test_init_and_rotate_survive_a_dropped_connection(server_url: str) -> None:
    engine = sa.create_engine(server_url, pool_pre_ping=True)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    with (
        killed_before(server_url, "INSERT INTO data_keys") as killed,
        pytest.raises(sa.exc.DBAPIError),
    ):
        registry.init()
    assert killed
    assert _keys(engine) == []  # the table may exist; no key was half-created
    first = registry.init()
    assert first.version == 1 and len(_keys(engine)) == 2  # the data key and the index key

    before = _keys(engine)
    with (
        killed_before(server_url, "INSERT INTO data_keys") as killed,
        pytest.raises(sa.exc.DBAPIError),
    ):
        registry.rotate()
    assert killed
    assert _keys(engine) == before  # the old key is still the active one, unretired
    assert registry.status().active_version == 1
    assert registry.rotate().version == 2
    states = sorted((row[2], row[3]) for row in _keys(engine) if row[1] == "default")
    assert states == [(1, "retired"), (2, "active")]
    registry.close()
    engine.dispose()


def test_rewrap_survives_a_dropped_connection(server_url: str) -> None:
    engine = sa.create_engine(server_url, pool_pre_ping=True)
    old = StaticRootKey(os.urandom(32))
    registry = KeyRegistry(engine, old)
    registry.init()
    registry.rotate()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(5)])
    before = _keys(engine)

    new = StaticRootKey(os.urandom(32))
    with (
        killed_before(server_url, "UPDATE data_keys", occurrence=2) as killed,
        pytest.raises(sa.exc.DBAPIError),
    ):
        registry.rewrap(new)
    assert killed
    assert _keys(engine) == before  # all or nothing: every key still under the old root
    assert registry.root_key is old
    assert registry.rewrap(new) == 3
    assert {row[4] for row in _keys(engine)} == {new.fingerprint}
    fresh = KeyRegistry(sa.create_engine(server_url), new, attach=False)
    with fresh.engine.connect() as conn:
        bodies = conn.execute(
            sa.select(table.c.body).order_by(table.c.id),
            execution_options={"envelope_registry": fresh},
        ).scalars()
        assert list(bodies) == [f"note {i}" for i in range(5)]
    fresh.engine.dispose()
    registry.close()
    engine.dispose()


def test_reencrypt_survives_a_dropped_connection_mid_batch(server_url: str) -> None:
    engine = sa.create_engine(server_url, pool_pre_ping=True)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    table = encrypted_table("records", "value")
    table.metadata.create_all(engine)
    rows = [{"id": i, "value": f"record {i}"} for i in range(1000)]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    registry.rotate()

    with (
        killed_before(server_url, "UPDATE records", occurrence=3) as killed,
        pytest.raises(ConnectionLostError, match="records: lost the connection to the database"),
    ):
        registry.reencrypt(table.c.value, batch_size=100)
    assert killed
    census = registry.census(table.c.value)[0]
    moved = {k.version: k.rows for k in census.keys}
    # Whole batches only: the two committed ones moved, the killed one did not.
    assert moved == {1: 800, 2: 200} and census.not_ciphertext == 0
    with engine.connect() as conn:
        assert [dict(r._mapping) for r in conn.execute(table.select().order_by(table.c.id))] == rows

    report = registry.reencrypt(table.c.value, batch_size=100)
    assert report.rows_updated == 800 and report.left_behind == 0
    assert {k.version: k.rows for k in registry.census(table.c.value)[0].keys} == {2: 1000}
    with engine.connect() as conn:
        assert [dict(r._mapping) for r in conn.execute(table.select().order_by(table.c.id))] == rows
    registry.close()
    engine.dispose()
