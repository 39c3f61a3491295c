"""MySQL/MariaDB connections without a strict sql_mode, which truncate
over-long values with only a warning, are refused unless the application
says it accepts the risk."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import async_engine_for, encrypted_table, fresh_database

from sqlalchemy_envelope import ConfigurationError, KeyRegistry, StaticRootKey

NON_STRICT = {"init_command": "SET SESSION sql_mode=''"}


@pytest.fixture
def mariadb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request, "mariadb", tmp_path) as url:
        yield url


def test_a_non_strict_connection_is_refused(mariadb: str) -> None:
    engine = sa.create_engine(mariadb, connect_args=NON_STRICT)
    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    with pytest.raises(ConfigurationError, match="sql_mode is not strict") as refused:
        registry.init()
    assert "allow_non_strict_mysql=True" in str(refused.value)
    with pytest.raises(ConfigurationError, match="STRICT_TRANS_TABLES"):
        engine.connect()
    registry.close()
    engine.dispose()
    with sa.create_engine(mariadb).connect() as conn:
        assert not sa.inspect(conn).has_table("data_keys")


def test_non_strict_mode_allowed_on_purpose_warns(
    mariadb: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(mariadb, connect_args=NON_STRICT)
    table = encrypted_table("notes")
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_envelope"):
        registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)), allow_non_strict_mysql=True)
        registry.init()
        table.metadata.create_all(engine)
        for _ in range(2):
            with engine.begin() as conn:
                conn.execute(table.insert(), {"body": "Zoë"})
    assert any("allow_non_strict_mysql=True" in r.getMessage() for r in caplog.records)
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.body)).scalars().all() == ["Zoë", "Zoë"]
    registry.close()
    engine.dispose()


def test_strict_mode_set_by_the_application_is_accepted(
    mariadb: str, caplog: pytest.LogCaptureFixture
) -> None:
    strict = {"init_command": "SET SESSION sql_mode='STRICT_ALL_TABLES'"}
    engine = sa.create_engine(mariadb, connect_args=strict)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_envelope"):
        registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
        registry.init()
    assert not caplog.records
    registry.close()
    engine.dispose()


def test_async_non_strict_connections_are_refused_too(mariadb: str) -> None:
    from sqlalchemy_envelope import AsyncKeyRegistry

    async def main() -> None:
        engine = async_engine_for(mariadb, connect_args=NON_STRICT)
        registry = AsyncKeyRegistry(engine, StaticRootKey(os.urandom(32)))
        try:
            with pytest.raises(ConfigurationError, match="sql_mode is not strict"):
                await registry.init()
        finally:
            await registry.close()
            await engine.dispose()

    asyncio.run(main())


def test_the_documented_init_command_makes_a_non_strict_server_strict(mariadb: str) -> None:
    documented = "SET SESSION sql_mode=CONCAT(@@sql_mode, ',STRICT_TRANS_TABLES')"
    engine = sa.create_engine(mariadb)

    @sa.event.listens_for(engine, "connect")
    def legacy_server_then_documented_line(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION sql_mode=''")  # as a legacy server's default would
        cursor.execute(documented)
        cursor.close()

    registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    registry.init()
    with engine.connect() as conn:
        mode = conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar_one()
    assert mode == "STRICT_TRANS_TABLES"
    registry.close()
    engine.dispose()


def test_from_env_reads_the_allowance_from_the_environment(
    mariadb: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The command line and the Alembic operations make their registries with
    from_env: ENVELOPE_ALLOW_NON_STRICT_MYSQL=1 is their allow_non_strict_mysql."""
    root = {"ENVELOPE_ROOT_KEY": base64.b64encode(os.urandom(32)).decode()}
    for refused in ({}, {"ENVELOPE_ALLOW_NON_STRICT_MYSQL": "0"}):
        engine = sa.create_engine(mariadb, connect_args=NON_STRICT)
        registry = KeyRegistry.from_env(engine, environ={**root, **refused})
        with pytest.raises(ConfigurationError, match="ENVELOPE_ALLOW_NON_STRICT_MYSQL=1"):
            registry.init()
        registry.close()
        engine.dispose()
    engine = sa.create_engine(mariadb, connect_args=NON_STRICT)
    with pytest.raises(ConfigurationError, match="ENVELOPE_ALLOW_NON_STRICT_MYSQL must be"):
        KeyRegistry.from_env(engine, environ={**root, "ENVELOPE_ALLOW_NON_STRICT_MYSQL": "maybe"})
    allowed = {**root, "ENVELOPE_ALLOW_NON_STRICT_MYSQL": "1"}
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_envelope"):
        registry = KeyRegistry.from_env(engine, environ=allowed)
        registry.init()
    assert any("allow_non_strict_mysql=True" in r.getMessage() for r in caplog.records)
    registry.close()
    engine.dispose()


def test_a_connection_opened_before_the_registry_is_checked_when_pinned(mariadb: str) -> None:
    """A migration's connection is open before the Alembic operation makes its
    registry, so the connect check never saw it: pinning checks it."""
    engine = sa.create_engine(mariadb, connect_args=NON_STRICT)
    with engine.connect() as conn:
        registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
        refused = pytest.raises(ConfigurationError, match="sql_mode is not strict")
        with refused, registry.on_connection(conn):
            registry.init()
        registry.close()
        allowed = KeyRegistry(engine, StaticRootKey(os.urandom(32)), allow_non_strict_mysql=True)
        with allowed.on_connection(conn):
            assert allowed.init().version == 1
        allowed.close()
    engine.dispose()
