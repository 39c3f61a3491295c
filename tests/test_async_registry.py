"""Encrypted columns and the registry under SQLAlchemy's asyncio extension, on
aiosqlite, and on asyncpg and asyncmy against the real PostgreSQL and MariaDB
servers. Each test runs its own event loop with asyncio.run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks, async_engine_for
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload
from test_types import CASES, _rows, _same, _table

from sqlalchemy_envelope import (
    AsyncKeyRegistry,
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    LeftRow,
    StaticRootKey,
)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(sa.String(100)))
    visits: Mapped[list[Visit]] = relationship(back_populates="patient", order_by="Visit.id")


class Visit(Base):
    __tablename__ = "visits"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patients.id"))
    notes: Mapped[str] = mapped_column(EncryptedType(sa.Text()))
    patient: Mapped[Patient] = relationship(back_populates="visits")


ONE_CONNECTION = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 5}


def _run(
    db_url: str,
    body: Callable[[AsyncEngine], Awaitable[None]],
    **engine_options: Any,
) -> None:
    async def main() -> None:
        engine = async_engine_for(db_url, **engine_options)
        try:
            await body(engine)
        finally:
            await engine.dispose()

    asyncio.run(main())


async def _setup(engine: AsyncEngine, root_key: StaticRootKey, **options: Any) -> AsyncKeyRegistry:
    registry = AsyncKeyRegistry(engine, root_key, **options)
    await registry.init()
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    return registry


@pytest.mark.parametrize("storage", ["binary", "text"])
def test_every_type_round_trips(db_url: str, root_key: StaticRootKey, storage: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        registry = AsyncKeyRegistry(engine, root_key)
        await registry.init()
        table = _table(storage)
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
            await conn.execute(table.insert(), _rows())
        async with engine.connect() as conn:
            got = (await conn.execute(table.select().order_by(table.c.id))).mappings().all()
            streamed = [row async for row in await conn.stream(table.select().order_by(table.c.id))]
        assert len(got) == len(_rows()) == len(streamed)
        for want, have, again in zip(_rows(), got, streamed, strict=True):
            for name in CASES:
                if want[name] is None:
                    assert have[name] is None
                else:
                    _same(want[name], have[name])
                    _same(want[name], again._mapping[name])
        await registry.close()

    _run(db_url, body)


def test_orm_insert_update_stream_and_selectinload(db_url: str, root_key: StaticRootKey) -> None:
    async def body(engine: AsyncEngine) -> None:
        registry = await _setup(engine, root_key)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as session:
            for i in range(20):
                session.add(
                    Patient(id=i, name=f"patient {i}", visits=[Visit(notes=f"visit of {i}")])
                )
            await session.commit()
        async with sessions() as session:
            ada = await session.get(Patient, 3)
            assert ada is not None and ada.name == "patient 3"
            ada.name = "Ada"
            await session.commit()
        async with sessions() as session:
            query = sa.select(Patient).options(selectinload(Patient.visits)).order_by(Patient.id)
            patients = (await session.scalars(query)).all()
            assert [p.name for p in patients[:4]] == ["patient 0", "patient 1", "patient 2", "Ada"]
            assert [v.notes for p in patients for v in p.visits] == [
                f"visit of {i}" for i in range(20)
            ]
            streamed = await session.stream_scalars(
                sa.select(Patient.name).order_by(Patient.id).execution_options(yield_per=5)
            )
            assert [name async for name in streamed][3:5] == ["Ada", "patient 4"]
        async with engine.connect() as conn:
            raw = await conn.execute(sa.text("SELECT name FROM patients"))
            assert all(b"patient" not in bytes(value) for (value,) in raw)
        await registry.close()

    _run(db_url, body)


def _rotate_elsewhere(db_url: str, root_key_hex: str, first_id: int) -> None:
    """Another OS process, with the synchronous driver, rotates the key and
    writes rows under the new one, which this process has never seen."""
    script = (
        "import sys, sqlalchemy as sa\n"
        "from sqlalchemy_envelope import KeyRegistry, StaticRootKey\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_async_registry import Patient\n"
        "engine = sa.create_engine(sys.argv[1])\n"
        "registry = KeyRegistry(engine, StaticRootKey(bytes.fromhex(sys.argv[2])))\n"
        "registry.rotate()\n"
        "first = int(sys.argv[3])\n"
        "rows = [{'id': first + i, 'name': f'rotated {first + i}'} for i in range(10)]\n"
        "with engine.begin() as conn:\n"
        "    conn.execute(sa.insert(Patient), rows)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, db_url, root_key_hex, str(first_id)],
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_keys_rotated_elsewhere_resolve_mid_stream_on_one_connection(
    db_url: str, clocks: Clocks
) -> None:
    raw = os.urandom(32)
    # SQLite and MySQL cannot run another statement on a connection while it
    # streams a result; PostgreSQL can.
    writes_mid_stream = db_url.startswith("postgresql")

    async def body(engine: AsyncEngine) -> None:
        registry = await _setup(
            engine,
            StaticRootKey(raw),
            cache_max_age=3600,
            clock=clocks.monotonic,
            wall_clock=clocks.now,
        )
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as session:
            session.add_all(Patient(id=i, name=f"mine {i}") for i in range(10))
            await session.commit()
        await asyncio.to_thread(_rotate_elsewhere, db_url, raw.hex(), 100)

        # A buffered result: its rows are processed outside SQLAlchemy's greenlet.
        async with sessions() as session:
            names = (await session.scalars(sa.select(Patient.name).order_by(Patient.id))).all()
        assert names == [f"mine {i}" for i in range(10)] + [f"rotated {i}" for i in range(100, 110)]

        await asyncio.to_thread(_rotate_elsewhere, db_url, raw.hex(), 200)
        # A streamed result holding the pool's only connection meets the unknown
        # key; on PostgreSQL a write in the same session, once the cache has
        # expired, finds the newest key mid-stream (elsewhere it writes afterwards).
        async with sessions() as session:
            stream = await session.stream_scalars(
                sa.select(Patient.name).order_by(Patient.id).execution_options(yield_per=4)
            )
            seen = []
            async for name in stream:
                seen.append(name)
                if len(seen) == 6 and writes_mid_stream:
                    clocks.advance(7200)
                    session.add(Patient(id=1000, name="written mid-stream"))
                    await session.flush()
            await session.commit()
        assert len(seen) == 30 and seen[-10:] == [f"rotated {i}" for i in range(200, 210)]
        if not writes_mid_stream:
            clocks.advance(7200)
            async with sessions() as session:
                session.add(Patient(id=1000, name="written after"))
                await session.commit()
        status = await registry.status(census=True)
        assert status.active_version == 3
        assert status.rows_by_version == {1: 10, 2: 10, 3: 11}
        await registry.close()

    _run(db_url, body, **ONE_CONNECTION)


def test_many_concurrent_tasks_with_rotations(db_url: str, root_key: StaticRootKey) -> None:
    async def body(engine: AsyncEngine) -> None:
        # On SQLite most claims meet another task's write transaction and
        # cannot be written then: at 64 encryptions per key (blocks of 1) the
        # one block a process may use unrecorded meanwhile runs out at once
        # (EncryptionLimitError); blocks of 100 leave room.
        limit = 64 if engine.dialect.name == "postgresql" else 6400
        registry = await _setup(engine, root_key, max_encryptions=limit)
        sessions = async_sessionmaker(engine)

        async def task(n: int) -> list[str]:
            async with sessions() as session:
                for i in range(10):
                    session.add(Patient(id=n * 100 + i, name=f"task {n} row {i}"))
                    await session.flush()
                await session.commit()
            async with sessions() as session:
                query = sa.select(Patient.name).where(Patient.id.between(n * 100, n * 100 + 99))
                return sorted((await session.scalars(query.order_by(Patient.id))).all())

        results = await asyncio.gather(*(task(n) for n in range(16)))
        for n, names in enumerate(results):
            assert names == sorted(f"task {n} row {i}" for i in range(10))
        status = await registry.status(census=True)
        assert all(key.encryptions <= limit for key in status.keys)
        if engine.dialect.name == "postgresql":
            # 160 encryptions at 64 per key: the policy rotated. (SQLite postpones
            # rotation while other connections hold write transactions.)
            assert status.active_version is not None and status.active_version >= 3
        assert sum((status.rows_by_version or {}).values()) == 160
        await registry.close()

    options: dict[str, Any] = {"pool_size": 4, "max_overflow": 0}
    if db_url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    _run(db_url, body, **options)


def test_async_administration_yields_to_the_event_loop(
    db_url: str, root_key: StaticRootKey, clocks: Clocks
) -> None:
    async def body(engine: AsyncEngine) -> None:
        registry = await _setup(engine, root_key, clock=clocks.monotonic, wall_clock=clocks.now)
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(Patient), [{"id": i, "name": f"p{i}"} for i in range(3000)]
            )
        sealed = registry.encrypt(b"outside a column", "notes.extra")
        assert registry.decrypt(sealed, "notes.extra") == b"outside a column"
        assert registry.hash_field(b"x", "c") == registry.sync_registry.hash_field(b"x", "c")
        rotated = await registry.rotate()
        assert rotated.version == 2
        census = await registry.census(Patient.name)
        assert {k.version: k.rows for k in census[0].keys} == {1: 3000}

        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        running = asyncio.create_task(ticker())
        before = ticks
        report = await registry.reencrypt(Patient.name, batch_size=200)
        during = ticks - before
        stop.set()
        await running
        assert report.rows_updated == 3000
        assert during > 15  # the loop ran other tasks between the job's statements
        assert {k.version: k.rows for k in (await registry.census(Patient.name))[0].keys} == {
            2: 3000
        }
        clocks.advance(registry.sync_registry.cache_max_age * 2)
        report_m = await registry.maintenance()
        assert report_m.destroyable == (1,)
        destroyed = await registry.destroy(1, columns=[Patient.name])
        assert destroyed.state.value == "destroyed"
        status = await registry.status()
        assert status.keys_by_state == {"active": 1, "destroyed": 1}
        async with engine.connect() as conn:
            assert (await conn.scalar(sa.select(Patient.name).where(Patient.id == 7))) == "p7"
        await registry.close()

    _run(db_url, body)


def test_a_session_scoped_registry_for_async_sessions(db_url: str, root_key: StaticRootKey) -> None:
    async def body(engine: AsyncEngine) -> None:
        main = await _setup(engine, root_key)
        other = AsyncKeyRegistry(
            engine, StaticRootKey(os.urandom(32)), table_name="other_keys", attach=False
        )
        await other.init()
        other_ids = {k.id for k in (await other.status()).keys}

        maker = other.bind(async_sessionmaker(engine))
        async with maker() as session:
            session.add(Patient(id=1, name="through the sessionmaker"))
            await session.commit()
        session = other.bind(AsyncSession(engine))
        async with session:
            session.add(Patient(id=2, name="through the session"))
            await session.commit()
        async with AsyncSession(engine) as plain:
            plain.add(Patient(id=3, name="through the engine's registry"))
            await plain.commit()

        headers = {}
        async with engine.connect() as conn:
            for pid, value in await conn.execute(sa.text("SELECT id, name FROM patients")):
                headers[pid] = int.from_bytes(bytes(value)[1:6], "big")
        assert headers[1] in other_ids and headers[2] in other_ids
        assert headers[3] not in other_ids
        async with maker() as session:
            names = (await session.scalars(sa.select(Patient.name).order_by(Patient.id))).all()
        assert names == [
            "through the sessionmaker",
            "through the session",
            "through the engine's registry",
        ]
        await other.close()
        await main.close()

    _run(db_url, body)


def test_async_misuse_is_a_clear_error(db_url: str, root_key: StaticRootKey) -> None:
    async def body(engine: AsyncEngine) -> None:
        with pytest.raises(ConfigurationError, match="AsyncKeyRegistry"):
            KeyRegistry(engine, root_key)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="needs an AsyncEngine"):
            AsyncKeyRegistry(sa.create_engine(db_url), root_key)  # type: ignore[arg-type]

    _run(db_url, body)


def test_policy_rotation_from_async_writes(
    db_url: str, root_key: StaticRootKey, clocks: Clocks
) -> None:
    async def body(engine: AsyncEngine) -> None:
        registry = await _setup(
            engine,
            root_key,
            rotate_after=timedelta(days=1),
            clock=clocks.monotonic,
            wall_clock=clocks.now,
        )
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            session.add(Patient(id=1, name="day one"))
            await session.commit()
        clocks.advance(timedelta(days=2))
        async with sessions() as session:
            session.add(Patient(id=2, name="day three"))
            await session.commit()
        assert (await registry.status()).active_version == 2
        await registry.close()

    _run(db_url, body, **ONE_CONNECTION)


def test_async_reencrypt_names_rows_left_behind_and_takes_them_as_plaintext(
    db_url: str, root_key: StaticRootKey
) -> None:
    lookalike = b"\x01legacy text that starts with byte 1"

    async def body(engine: AsyncEngine) -> None:
        registry = await _setup(engine, root_key)
        raw = sa.table("patients", sa.column("id"), sa.column("name", sa.LargeBinary))
        async with engine.begin() as conn:
            await conn.execute(sa.insert(Patient), [{"id": i, "name": f"p{i}"} for i in range(3)])
            await conn.execute(sa.update(raw).where(raw.c.id == 2).values(name=lookalike))
        await registry.rotate()
        report = await registry.reencrypt(Patient.name)
        assert report.values_by_version == {1: 2} and report.left_behind == 1
        assert report.left_rows == [LeftRow("patients.name", (2,), "UnknownKeyError")]
        named = await registry.reencrypt(Patient.name, plaintext_rows={"patients.name": [2]})
        assert named.plaintext_encrypted == 1 and named.left_behind == 0
        async with AsyncSession(engine) as session:
            for _ in range(2):
                names = (await session.execute(sa.select(Patient.id, Patient.name))).all()
                assert dict(names) == {0: "p0", 1: "p1", 2: lookalike.decode()}
        await registry.close()

    _run(db_url, body)


def test_a_closed_registry_names_the_async_class(db_url: str, root_key: StaticRootKey) -> None:
    """After close(), the errors tell an async user to create an
    AsyncKeyRegistry, never a KeyRegistry (which refuses an AsyncEngine)."""

    async def body(engine: AsyncEngine) -> None:
        registry = AsyncKeyRegistry(engine, root_key)
        with pytest.raises(ConfigurationError, match=r"call AsyncKeyRegistry\.init\(\)"):
            await registry.status()  # no data_keys table yet
        await registry.close()
        registry = await _setup(engine, root_key)
        await registry.close()
        for _ in range(2):
            with pytest.raises(ConfigurationError, match="create a new AsyncKeyRegistry") as info:
                await registry.rotate()
            assert "KeyRegistry(" not in str(info.value)
        with pytest.raises(ConfigurationError, match="AsyncKeyRegistry was closed"):
            registry.encrypt(b"x", "patients.name")
        async with AsyncSession(engine) as session:
            session.add(Patient(name="Ada"))
            with pytest.raises(ConfigurationError) as info:
                await session.commit()
        assert "AsyncKeyRegistry(engine" in str(info.value)
        assert " KeyRegistry(" not in str(info.value)

    _run(db_url, body)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_new_key_met_mid_stream_on_aiosqlite_neither_waits_nor_breaks_the_write(
    tmp_path: Path, journal: str, clocks: Clocks
) -> None:
    raw = os.urandom(32)
    url = f"sqlite:///{tmp_path / 'app.db'}"
    other_engine = sa.create_engine(url)  # another process's
    with other_engine.connect() as conn:
        conn.exec_driver_sql(f"PRAGMA journal_mode = {journal}")
    other = KeyRegistry(other_engine, StaticRootKey(raw), attach=False)

    async def body(engine: AsyncEngine) -> None:
        registry = await _setup(
            engine, StaticRootKey(raw), cache_max_age=60, clock=clocks.monotonic
        )
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            session.add_all(Patient(id=i, name=f"first {i}") for i in range(6))
            await session.commit()
        query = sa.select(Patient.id).order_by(Patient.id)
        next_id = 100
        for how in ("connection", "session", "connection", "session"):
            # Another process rotates; the next write here meets the new key
            # while a streamed result is open on the connection that writes.
            await asyncio.to_thread(other.rotate)
            clocks.advance(61)
            start = time.monotonic()
            if how == "connection":
                async with engine.connect() as conn:
                    result = await conn.stream(query)
                    assert len(await result.fetchmany(2)) == 2
                    for _ in range(2):
                        await conn.execute(
                            sa.insert(Patient), {"id": next_id, "name": f"new {next_id}"}
                        )
                        next_id += 1
                    assert len(await result.fetchall()) >= 4
                    await conn.commit()
            else:
                async with sessions() as session:
                    stream = await session.stream(query)
                    assert len(await stream.fetchmany(2)) == 2
                    for _ in range(2):
                        session.add(Patient(id=next_id, name=f"new {next_id}"))
                        await session.flush()
                        next_id += 1
                    assert len(await stream.fetchall()) >= 4
                    await session.commit()
            # Loosely: the busy timeout is 30 s, and nothing may wait for it.
            assert time.monotonic() - start < 15
        async with sessions() as session:
            names = await session.scalars(sa.select(Patient.name).where(Patient.id >= 100))
            assert sorted(names) == [f"new {i}" for i in range(100, 108)]
        assert ((await registry.status()).active_encryptions or 0) >= 2
        await registry.close()

    _run(url, body, connect_args={"timeout": 30})
    other.close()
    other_engine.dispose()
