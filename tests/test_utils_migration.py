"""Moving columns written by sqlalchemy-utils' StringEncryptedType and
EncryptedType to EncryptedType (docs/migrating-from-sqlalchemy-utils.md):
the window in which both kinds of values read, the job, its resumption, a
concurrent writer, and a wrong key."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import utils_migration_models as models
from alembic.migration import MigrationContext
from alembic.operations import Operations
from conftest import async_engine_for, kill_when, stored_bytes
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import sqlalchemy_envelope.alembic  # noqa: F401  (registers op.migrate_from_sqlalchemy_utils)
from sqlalchemy_envelope import (
    AsyncKeyRegistry,
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    LegacyDecryptionError,
    StaticRootKey,
    ValuesLeftBehindError,
)

Row = tuple[Any, ...]
PROG = str(Path(sys.executable).parent / "sqlalchemy-envelope")

ROWS: dict[int, Row] = {
    1: ("Zoë Ångström", "tök-🦄-token", 42, True, "ça va"),
    2: ("", "", 0, False, ""),
    3: (None, None, None, None, None),
    4: ("漢字かな交じり文", "plain", -7, True, "x" * 50),
    5: ("a", None, 2**40, None, "ünïcode"),
}
SECRETS = ("Zoë Ångström", "tök-🦄-token", "漢字かな交じり文", "ünïcode", "ça va")


def _rows(count: int) -> dict[int, Row]:
    """ROWS, then ``count`` more in their image."""
    more = {
        i: (f"name {i} - ñ", f"token-{i}", i * 3, i % 2 == 0, None if i % 7 == 0 else f"n{i}")
        for i in range(10, 10 + count)
    }
    return {**ROWS, **more}


def _write_with_sqlalchemy_utils(engine: sa.Engine, rows: dict[int, Row]) -> None:
    """The table as the application wrote it before the move: through
    sqlalchemy-utils' own types."""
    old = models.table(models.utils_types())
    old.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            old.insert(),
            [{"id": k, **dict(zip(models.COLUMNS, v, strict=True))} for k, v in rows.items()],
        )


def _raw(engine: sa.Engine) -> dict[int, Row]:
    with engine.connect() as conn:
        found = conn.exec_driver_sql("SELECT id, name, token, visits, active, note FROM accounts")
        return {row[0]: tuple(_plain(v) for v in row[1:]) for row in found}


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview | bytearray) else value


def _read(engine: sa.Engine, account: type[Any]) -> dict[int, Row]:
    """Every row through the ORM (Session) and Core (Connection), each
    statement twice: all four readings must agree."""
    readings = []
    for _ in range(2):
        with Session(engine) as session:
            readings.append(
                {
                    a.id: tuple(getattr(a, c) for c in models.COLUMNS)
                    for a in session.scalars(sa.select(account))
                }
            )
        with engine.connect() as conn:
            readings.append(
                {row[0]: tuple(row[1:]) for row in conn.execute(sa.select(account.__table__))}
            )
    assert all(reading == readings[0] for reading in readings)
    return readings[0]


def _start_window(engine: sa.Engine) -> type[Any]:
    """Deploy the migration window: the columns altered to EncryptedType
    with ``migrating=`` the sqlalchemy-utils type each had."""
    models.alter(
        engine,
        models.utils_types,
        lambda: models.our_types(models.utils_types()),
    )
    return models.window_model()


def _finish(engine: sa.Engine) -> type[Any]:
    """Drop ``migrating=``: the columns altered to their final types."""
    models.alter(engine, lambda: models.our_types(models.utils_types()), models.our_types)
    return models.final_model()


def test_a_table_written_by_sqlalchemy_utils_moves_to_encrypted_type(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    rows = _rows(300)
    _write_with_sqlalchemy_utils(engine, rows)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()

    window = _start_window(engine)
    assert _read(engine, window) == rows  # sqlalchemy-utils' values read as they did
    with Session(engine) as session:  # the application writes ours meanwhile
        session.add(window(id=6, name="new Ø", token="t", visits=1, active=False, note="n"))
        session.get(window, 4).visits = 8
        session.commit()
    rows = {**rows, 6: ("new Ø", "t", 1, False, "n"), 4: (*rows[4][:2], 8, *rows[4][3:])}
    assert _read(engine, window) == rows

    report = registry.migrate_from_sqlalchemy_utils(window, batch_size=17, progress=False)
    legacy = sum(v is not None for k, row in rows.items() if k != 6 for v in row) - 1
    assert report.plaintext_encrypted == legacy  # visits of row 4 was ours already
    assert report.left_behind == 0 and report.skipped == 0
    again = registry.migrate_from_sqlalchemy_utils(window, batch_size=17, progress=False)
    assert again.rows_updated == 0  # idempotent
    assert _read(engine, window) == rows

    final = _finish(engine)
    assert _read(engine, final) == rows
    for census in registry.census(*(final.__table__.c[c] for c in models.COLUMNS)):
        assert census.not_ciphertext == 0 and census.unknown_key_rows == 0
    dump = stored_bytes(engine, "accounts")
    assert not any(secret.encode() in dump for secret in SECRETS)
    registry.close()
    engine.dispose()


def test_the_async_registry_migrates_too(db_url: str) -> None:
    """`AsyncKeyRegistry.migrate_from_sqlalchemy_utils` on the async driver
    (aiosqlite, asyncpg, asyncmy): the same job, awaited batch by batch."""
    engine = sa.create_engine(db_url)
    rows = _rows(40)
    _write_with_sqlalchemy_utils(engine, rows)
    root = StaticRootKey(os.urandom(32))
    setup = KeyRegistry(engine, root)
    setup.init()
    setup.close()
    window = _start_window(engine)

    async def migrate() -> dict[int, Row]:
        async_engine = async_engine_for(db_url)
        registry = AsyncKeyRegistry(async_engine, root)
        try:
            report = await registry.migrate_from_sqlalchemy_utils(window, batch_size=7)
            assert report.left_behind == 0 and report.plaintext_encrypted > 0
            again = await registry.migrate_from_sqlalchemy_utils(window.__table__, batch_size=7)
            assert again.rows_updated == 0
            readings = []
            for _ in range(2):
                async with AsyncSession(async_engine) as session:
                    found = await session.scalars(sa.select(window))
                    readings.append(
                        {a.id: tuple(getattr(a, c) for c in models.COLUMNS) for a in found}
                    )
            assert readings[0] == readings[1]
            await registry.close()
            return readings[0]
        finally:
            await async_engine.dispose()

    assert asyncio.run(migrate()) == rows
    registry = KeyRegistry(engine, root)
    final = _finish(engine)
    assert _read(engine, final) == rows
    for census in registry.census(*(final.__table__.c[c] for c in models.COLUMNS)):
        assert census.not_ciphertext == 0 and census.unknown_key_rows == 0
    registry.close()
    engine.dispose()


def test_the_command_line_migrates_with_the_key_of_the_models(db_url: str, tmp_path: Path) -> None:
    """``sqlalchemy-envelope migrate-from-sqlalchemy-utils TABLE.COLUMN...
    --models MODULE``: the models' window types hold the key; a wrong one
    changes nothing (exit 1), a column without ``migrating=`` is exit 2,
    and the right one moves every value (exit 0)."""
    engine = sa.create_engine(db_url)
    rows = _rows(30)
    _write_with_sqlalchemy_utils(engine, rows)
    root = base64.b64encode(os.urandom(32)).decode()
    registry = KeyRegistry(engine, StaticRootKey(base64.b64decode(root)))
    registry.init()
    _start_window(engine)
    before = _raw(engine)
    for name, declared in {
        "window_models": "m.window_model()",
        "wrong_key_models": "m.window_model(key='not the key')",
        "final_models": "m.final_model()",
    }.items():
        (tmp_path / f"{name}.py").write_text(
            f"import utils_migration_models as m\n\nAccount = {declared}\n"
        )
    columns = [f"accounts.{column}" for column in models.COLUMNS]

    def cli(module: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PROG, "migrate-from-sqlalchemy-utils", *columns, "--models", module],
            cwd=tmp_path,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "PYTHONPATH": str(Path(models.__file__).parent),
                "DATABASE_URL": db_url,
                "ENVELOPE_ROOT_KEY": root,
            },
            capture_output=True,
            text=True,
            check=False,
        )

    for module, code, expected in (
        ("wrong_key_models", 1, "do not read with the key, engine and padding"),
        ("final_models", 2, "needs the column's definition to name the type"),
    ):
        result = cli(module)
        assert result.returncode == code, result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
        assert expected in result.stderr, result.stderr
        for secret in (models.KEY, root, *SECRETS):
            assert secret not in result.stderr
        assert _raw(engine) == before
    result = cli("window_models")
    assert result.returncode == 0, result.stderr
    assert "left behind 0" in result.stdout
    assert _read(engine, _finish(engine)) == rows
    registry.close()
    engine.dispose()


def test_a_wrong_key_changes_no_row_and_names_no_value(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    _write_with_sqlalchemy_utils(engine, _rows(150))
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    _start_window(engine)
    before = _raw(engine)
    wrong = models.window_model(key="not the key")

    for column in models.COLUMNS:
        with pytest.raises(LegacyDecryptionError) as caught:
            registry.migrate_from_sqlalchemy_utils(
                wrong.__table__.c[column], batch_size=10, progress=False
            )
        _assert_names_no_value(caught.value, f"accounts.{column}")
        assert _raw(engine) == before
    with pytest.raises(LegacyDecryptionError) as caught, Session(engine) as session:
        session.get(wrong, 1)
    _assert_names_no_value(caught.value, "accounts.")
    assert _raw(engine) == before
    assert _read(engine, models.window_model()) == _rows(150)  # the right key still reads all
    registry.close()
    engine.dispose()


def _assert_names_no_value(error: BaseException, column: str) -> None:
    text = "".join(traceback.format_exception(error))
    assert column in str(error)
    assert models.KEY not in text
    assert not any(secret in text for secret in SECRETS)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_a_value_that_does_not_read_is_left_and_named(db_url: str) -> None:
    """A value under another key past the first hundred: the job moves every
    other one, leaves that row as it was and fails naming it."""
    engine = sa.create_engine(db_url)
    _write_with_sqlalchemy_utils(engine, _rows(200))
    other = models.table(models.utils_types(key="another key"))
    with engine.begin() as conn:
        conn.execute(other.update().where(other.c.id == 150).values(name="Séverine Secret"))
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    window = _start_window(engine)
    stored = _raw(engine)[150][0]

    with pytest.raises(ValuesLeftBehindError) as caught:
        registry.migrate_from_sqlalchemy_utils(window.name, batch_size=50, progress=False)
    assert "accounts.name=150: LegacyDecryptionError" in str(caught.value)
    assert "Séverine" not in str(caught.value)
    assert caught.value.report.left_behind == 1
    assert _raw(engine)[150][0] == stored
    (census,) = registry.census(window.__table__.c.name)
    assert census.not_ciphertext + census.unknown_key_rows == 1
    registry.close()
    engine.dispose()


def test_the_alembic_operation(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a migration, with the root key from the environment: the table
    declared as in the migration window, the column moved, then altered."""
    monkeypatch.setenv("ENVELOPE_ROOT_KEY", base64.b64encode(os.urandom(32)).decode())
    engine = sa.create_engine(db_url)
    _write_with_sqlalchemy_utils(engine, ROWS)
    _start_window(engine)
    accounts = models.table(models.our_types(models.utils_types()))
    with engine.begin() as conn:
        operations = Operations(MigrationContext.configure(conn))
        for column in models.COLUMNS:
            report = operations.migrate_from_sqlalchemy_utils(accounts.c[column], batch_size=2)
            assert report.left_behind == 0
    registry = KeyRegistry.from_env(engine)  # the application's, after the migration
    assert _read(engine, _finish(engine)) == ROWS
    registry.close()
    engine.dispose()


def test_a_column_without_its_sqlalchemy_utils_type_is_refused(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    account = models.final_model()
    account.metadata.create_all(engine)
    with pytest.raises(ConfigurationError, match=r"accounts\.name: a migration from sqlalchemy"):
        registry.migrate_from_sqlalchemy_utils(account.name, progress=False)
    with pytest.raises(ConfigurationError, match=r"migrating=\.\.\. stands for"):
        EncryptedType(sa.String(5), storage="text", migrating=...)
    with pytest.raises(ConfigurationError, match="migrating= takes True"):
        EncryptedType(sa.String(5), storage="text", migrating=sa.String(5))
    assert "migrating=..." in repr(models.our_types(models.utils_types())["name"])
    assert models.KEY not in repr(models.our_types(models.utils_types())["name"])
    registry.close()
    engine.dispose()


def test_a_migration_killed_midway_finishes_on_the_next_run(db_url: str) -> None:
    rows = _rows(2000)
    engine = sa.create_engine(db_url)
    if engine.dialect.name == "sqlite":  # so that watching the job never waits on it
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    _write_with_sqlalchemy_utils(engine, rows)
    root = base64.b64encode(os.urandom(32)).decode()
    registry = KeyRegistry(engine, StaticRootKey(base64.b64decode(root)))
    registry.init()
    window = _start_window(engine)
    script = Path(models.__file__)
    command = [sys.executable, str(script), db_url, "10"]
    env = {**os.environ, "ENVELOPE_ROOT_KEY": root}

    def moved() -> int:
        (census,) = registry.census(window.__table__.c.name)
        return census.rows - census.nulls - census.not_ciphertext - census.unknown_key_rows

    total = sum(row[0] is not None for row in rows.values())
    caught = [kill_when(command, env, moved, at) and 0 < moved() < total for at in (300, 1200)]
    assert any(caught), "the job was never caught half way"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    assert moved() == total
    assert _read(engine, _finish(engine)) == rows
    registry.close()
    engine.dispose()


def test_a_concurrent_writer_loses_no_update(server_url: str) -> None:
    engine = sa.create_engine(server_url, pool_size=10)
    rows = _rows(1500)
    _write_with_sqlalchemy_utils(engine, rows)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    window = _start_window(engine)
    stop = threading.Event()
    writes = 0
    expected = dict(rows)

    def writer() -> None:
        nonlocal writes
        rng = random.Random(7)
        keys = sorted(rows)
        while not stop.is_set():
            key = rng.choice(keys)
            new = (f"written meanwhile #{writes}", None, writes, True, "é")
            try:
                with Session(engine) as session:
                    account = session.get(window, key)
                    for column, value in zip(models.COLUMNS, new, strict=True):
                        setattr(account, column, value)
                    session.commit()
            except sa.exc.OperationalError:  # a deadlock with the job: the application retries
                continue
            expected[key] = new
            writes += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = registry.migrate_from_sqlalchemy_utils(window, batch_size=20, progress=False)
    finally:
        stop.set()
        thread.join()
    assert writes > 50
    assert report.left_behind == 0
    assert _read(engine, _finish(engine)) == expected
    registry.close()
    engine.dispose()


def test_the_documentation_example_runs(tmp_path: Path) -> None:
    """The page's runnable example (its blocks not marked ``notest``)."""
    page = Path(__file__).parent.parent / "docs" / "migrating-from-sqlalchemy-utils.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert blocks
    script = tmp_path / "example.py"
    script.write_text("\n".join(blocks))
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stderr
