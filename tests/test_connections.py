"""The registry's own connections: a key lookup made while the application
holds every pooled connection does not wait for one."""

from __future__ import annotations

import os

import sqlalchemy as sa
from conftest import encrypted_table

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
