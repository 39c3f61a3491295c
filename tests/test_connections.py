"""The registry's own connections: a key lookup made while the application
holds every pooled connection does not wait for one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks, encrypted_table
from sqlalchemy.orm import Session

from sqlalchemy_envelope import KeyRegistry, StaticRootKey


def test_a_key_lookup_mid_result_on_a_pool_of_one(db_url: str) -> None:
    root = StaticRootKey(os.urandom(32))
    engine = sa.create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=3)
    registry = KeyRegistry(engine, root, cache_max_age=3600)
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"mine {i}"} for i in range(5)])

    # Another process's registry rotates and writes under a key this one has not seen.
    other_engine = sa.create_engine(db_url)
    other = KeyRegistry(other_engine, root, attach=False)
    other.rotate()
    with other_engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{"id": 5 + i, "body": f"theirs {i}"} for i in range(5)],
            execution_options={"envelope_registry": other},
        )
    other_engine.dispose()

    # The application's only connection is busy streaming the rows when the
    # registry must load the new key: it does so on a connection of its own.
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=2).execute(
            sa.select(table.c.body).order_by(table.c.id)
        )
        bodies = list(rows.scalars())
    assert bodies == [f"mine {i}" for i in range(5)] + [f"theirs {i}" for i in range(5)]
    assert engine.pool.checkedout() == 0
    registry.close()
    engine.dispose()


def test_an_in_memory_database_shares_the_application_pool() -> None:
    # Another connection to sqlite:// would be another, empty database.
    engine = sa.create_engine("sqlite://")
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    assert registry.init().version == 1
    assert registry.decrypt(registry.encrypt(b"x", "t.c"), "t.c") == b"x"
    registry.close()
    with engine.connect() as conn:  # close() left the application's database alone
        assert conn.execute(sa.text("SELECT count(*) FROM data_keys")).scalar() == 2
    engine.dispose()


def _sqlite_engine(path: Path, journal: str, begin: str) -> sa.Engine:
    """An application engine on a SQLite file that waits up to 30 s for locks.
    With ``begin="explicit"``, transactions begin with BEGIN, as SQLAlchemy's
    pysqlite documentation recommends, rather than before the first write."""
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
    with engine.connect() as conn:  # WAL is a property of the file, kept across connections
        conn.exec_driver_sql(f"PRAGMA journal_mode = {journal}")
    if begin == "explicit":

        @sa.event.listens_for(engine, "connect")
        def connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def begin_(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN")

        engine.dispose()  # connect again, with the listener
    return engine


@pytest.mark.parametrize("begin", ["driver", "explicit"])
@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_new_key_met_mid_stream_neither_waits_nor_breaks_the_write(
    tmp_path: Path, journal: str, begin: str, clocks: Clocks
) -> None:
    root = StaticRootKey(os.urandom(32))
    engine = _sqlite_engine(tmp_path / "app.db", journal, begin)
    registry = KeyRegistry(engine, root, cache_max_age=60, clock=clocks.monotonic)
    registry.init()
    table = encrypted_table("notes")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"first {i}"} for i in range(6)])
    other_engine = sa.create_engine(engine.url)
    other = KeyRegistry(other_engine, root, attach=False)
    query = sa.select(table.c.id).order_by(table.c.id)
    next_id = 100
    for how in ("connection", "session", "connection", "session"):
        # Another process rotates; this one meets the new key at its next write,
        # which must claim encryptions under it while a result is still open
        # on the very connection that writes.
        other.rotate()
        clocks.advance(61)
        start = time.monotonic()
        if how == "connection":
            with engine.connect() as conn:
                rows = conn.execution_options(stream_results=True).execute(query)
                assert len(rows.fetchmany(2)) == 2
                for _ in range(2):
                    conn.execute(table.insert(), {"id": next_id, "body": f"new {next_id}"})
                    next_id += 1
                assert len(rows.fetchall()) >= 4
                conn.commit()
        else:
            with Session(engine) as session:
                result = session.execute(query, execution_options={"yield_per": 2})
                assert len(result.fetchmany(2)) == 2
                for _ in range(2):
                    session.execute(table.insert(), {"id": next_id, "body": f"new {next_id}"})
                    next_id += 1
                assert len(result.fetchall()) >= 4
                session.commit()
        # Loosely: the busy timeout is 30 s, and nothing may wait for it.
        assert time.monotonic() - start < 15
    with engine.connect() as conn:
        bodies = conn.execute(sa.select(table.c.body).where(table.c.id >= 100)).scalars()
        assert sorted(bodies) == [f"new {i}" for i in range(100, 108)]
    # The claims were made, and count every encryption under the newest key.
    assert (registry.status().active_encryptions or 0) >= 2
    other.close()
    other_engine.dispose()
    registry.close()
    engine.dispose()
