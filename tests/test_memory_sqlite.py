"""In-memory SQLite, where the registry shares the application's connection:
nothing the registry does while the application has a transaction open there
commits, rolls back or loses the application's work. A key write that would
have to commit on its own is refused as on a SQLite file that transaction
locks; reads run inside it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks, encrypted_table
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from sqlalchemy_envelope import (
    AsyncKeyRegistry,
    ConfigurationError,
    KeyRegistry,
    StaticRootKey,
    scope,
)

TABLE = encrypted_table("notes")

# The URLs and pools of an in-memory database: each connection its own
# database (SingletonThreadPool by default, StaticPool as in tests across
# threads), and a database that every connection of the process shares.
DATABASES = {
    "default": ("sqlite://", {}),
    "memory-name": ("sqlite:///:memory:", {}),
    "static-pool": (
        "sqlite://",
        {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}},
    ),
    "uri-mode": ("sqlite:///file:{name}?mode=memory&uri=true", {}),
    "shared-cache": ("sqlite:///file:{name}?mode=memory&cache=shared&uri=true", {}),
}


@pytest.fixture(params=sorted(DATABASES))
def memory_engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    url, options = DATABASES[request.param]
    engine = sa.create_engine(
        url.format(name=f"envelope-{uuid.uuid4().hex}"),
        **({"poolclass": sa.pool.SingletonThreadPool} | options),
    )
    yield engine
    engine.dispose()


def _registry(engine: sa.Engine, **options: Any) -> KeyRegistry:
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)), **options)
    registry.init()
    TABLE.metadata.create_all(engine)
    return registry


@contextmanager
def _transaction(engine: sa.Engine, how: str) -> Iterator[Any]:
    """A transaction of the application's, as a Connection or a Session;
    both execute Core statements."""
    if how == "connection":
        with engine.begin() as conn:
            yield conn
    else:
        with Session(engine) as session, session.begin():
            yield session


def _insert(conn: Any, *ids: int) -> None:
    for id_ in ids:  # one statement each: each is executed again
        conn.execute(TABLE.insert(), {"id": id_, "body": f"note {id_}"})


def _bodies(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(TABLE.c.id, TABLE.c.body)).all())


def _notes(*ids: int) -> dict[int, str]:
    return {id_: f"note {id_}" for id_ in ids}


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_new_scope_mid_transaction_loses_nothing(memory_engine: sa.Engine, how: str) -> None:
    registry = _registry(memory_engine)
    with (
        pytest.raises(ConfigurationError, match="create_scope"),
        _transaction(memory_engine, how) as conn,
    ):
        _insert(conn, 1, 2)
        with scope("newtenant"):
            _insert(conn, 3, 4)
    assert _bodies(memory_engine) == {}  # the whole transaction rolled back

    registry.create_scope("newtenant")
    with _transaction(memory_engine, how) as conn:
        _insert(conn, 1, 2)
        with scope("newtenant"):
            _insert(conn, 3, 4)
    assert _bodies(memory_engine) == _notes(1, 2, 3, 4)
    registry.close()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_keys_read_again_mid_transaction_keep_its_rows(
    memory_engine: sa.Engine, how: str, clocks: Clocks
) -> None:
    registry = _registry(memory_engine, cache_max_age=60, clock=clocks.monotonic)
    with _transaction(memory_engine, how) as conn:
        _insert(conn, 1)
    with _transaction(memory_engine, how) as conn:
        _insert(conn, 2, 3)
        for _ in range(2):
            clocks.advance(61)  # every cached key is read again at its next use
            read = conn.execute(sa.select(TABLE.c.id, TABLE.c.body).order_by(TABLE.c.id))
            assert dict(read.all()) == _notes(1, 2, 3)
        clocks.advance(61)
        _insert(conn, 4, 5)
    assert _bodies(memory_engine) == _notes(1, 2, 3, 4, 5)

    # A rollback undoes all of it, and only it.
    with pytest.raises(LookupError), _transaction(memory_engine, how) as conn:
        _insert(conn, 6)
        clocks.advance(61)
        assert len(conn.execute(sa.select(TABLE.c.body)).all()) == 6
        raise LookupError
    assert _bodies(memory_engine) == _notes(1, 2, 3, 4, 5)
    registry.close()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_policy_rotation_due_mid_transaction_waits_for_its_end(
    memory_engine: sa.Engine, how: str, clocks: Clocks
) -> None:
    registry = _registry(
        memory_engine,
        rotate_after=timedelta(days=1),
        clock=clocks.monotonic,
        wall_clock=clocks.now,
    )
    for outcome in ("rolled back", "committed"):
        rolled_back = outcome == "rolled back"
        with (
            pytest.raises(LookupError) if rolled_back else nullcontext(),
            _transaction(memory_engine, how) as conn,
        ):
            _insert(conn, 1)
            clocks.advance(timedelta(days=2))  # due, and the cached key is stale
            _insert(conn, 2, 3)  # the rotation is postponed: nothing commits
            if rolled_back:
                raise LookupError
        assert _bodies(memory_engine) == ({} if outcome == "rolled back" else _notes(1, 2, 3))
        assert registry.status().active_version == 1

    clocks.advance(timedelta(days=2))
    with _transaction(memory_engine, how) as conn:
        _insert(conn, 4, 5)  # the first write of a transaction rotates
    assert registry.status().active_version == 2
    assert _bodies(memory_engine) == _notes(1, 2, 3, 4, 5)
    registry.close()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_key_administration_mid_transaction_is_refused(memory_engine: sa.Engine, how: str) -> None:
    registry = _registry(memory_engine)
    with _transaction(memory_engine, how) as conn:
        _insert(conn, 1, 2)
        for _ in range(2):
            with pytest.raises(ConfigurationError, match="write transaction open"):
                registry.rotate()
            with pytest.raises(ConfigurationError, match="write transaction open"):
                registry.create_scope("other")
        assert registry.status().active_version == 1  # reads are fine
    assert _bodies(memory_engine) == _notes(1, 2)
    assert registry.rotate().version == 2  # and after the transaction, it is done
    assert [key.version for key in registry.create_scope("other")] == [1]
    registry.close()


def test_async_in_memory_database(clocks: Clocks) -> None:
    async def main() -> None:
        engine = create_async_engine("sqlite+aiosqlite://")
        registry = AsyncKeyRegistry(
            engine, StaticRootKey(os.urandom(32)), cache_max_age=60, clock=clocks.monotonic
        )
        await registry.init()
        async with engine.begin() as conn:
            await conn.run_sync(TABLE.metadata.create_all)

        async def insert(conn: AsyncConnection, *ids: int) -> None:
            for id_ in ids:
                await conn.execute(TABLE.insert(), {"id": id_, "body": f"note {id_}"})

        async def bodies() -> dict[int, str]:
            async with engine.connect() as conn:
                rows = await conn.execute(sa.select(TABLE.c.id, TABLE.c.body))
                return dict(rows.all())

        with pytest.raises(ConfigurationError, match="create_scope"):
            async with engine.begin() as conn:
                await insert(conn, 1, 2)
                with scope("newtenant"):
                    await insert(conn, 3, 4)
        assert await bodies() == {}

        await registry.create_scope("newtenant")
        async with engine.begin() as conn:
            await insert(conn, 1, 2)
            with scope("newtenant"):
                await insert(conn, 3, 4)
            with pytest.raises(ConfigurationError, match="write transaction open"):
                await registry.rotate()
        assert await bodies() == _notes(1, 2, 3, 4)

        async with engine.begin() as conn:
            await insert(conn, 5, 6)
            for _ in range(2):
                clocks.advance(61)  # every cached key is read again at its next use
                rows = await conn.execute(sa.select(TABLE.c.id, TABLE.c.body))
                assert dict(rows.all()) == _notes(1, 2, 3, 4, 5, 6)
            clocks.advance(61)
            with scope("newtenant"):
                await insert(conn, 7)
        assert await bodies() == _notes(1, 2, 3, 4, 5, 6, 7)
        await registry.close()
        await engine.dispose()

    asyncio.run(main())
