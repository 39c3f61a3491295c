"""No key bytes, seeds or plaintext in logs, reprs or exception messages."""

from __future__ import annotations

import base64
import logging
import os
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    EncryptedType,
    EnvelopeError,
    KeyRegistry,
    PBKDF2RootKey,
    StaticRootKey,
)
from sqlalchemy_envelope.keys import keyring as keyring_module

PLAINTEXTS = ["Patient Zero Confidential", "4111-1111-1111-1111", "diagnosis: very secret"]
SEED = "seed-that-must-never-print"
SALT = "salt-that-must-never-print"


@pytest.fixture
def data_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every data key the registry generates during the test."""
    made: list[bytes] = []
    real = keyring_module.new_data_key

    def recording() -> bytes:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(keyring_module, "new_data_key", recording)
    return made


def _forms(secret: bytes) -> list[str]:
    return [secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]]


def test_nothing_secret_is_logged_repred_or_raised(
    db_url: str, caplog: pytest.LogCaptureFixture, data_keys: list[bytes]
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "sqlalchemy_envelope"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored after the test

    texts: list[str] = []
    engine = sa.create_engine(db_url, echo="debug")
    root_bytes = os.urandom(32)
    static = StaticRootKey(root_bytes)
    pbkdf2 = PBKDF2RootKey(SEED, SALT, iterations=10_000, allow_weak=True)
    registry = KeyRegistry(engine, pbkdf2)
    registry.init()
    registry.rotate()

    table = sa.Table(
        "records",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("secret", EncryptedType(sa.String(100))),
        sa.Column("unique_tag", sa.String(10), unique=True),
    )
    table.metadata.create_all(engine)
    with Session(engine) as session:
        session.execute(
            table.insert(),
            [{"id": i, "secret": p, "unique_tag": f"t{i}"} for i, p in enumerate(PLAINTEXTS)],
        )
        session.commit()
        texts.extend(map(str, session.execute(sa.select(table.c.secret)).scalars()))
        texts = []  # the values read back are plaintext by design; the rest must not be

    def failing(action: Any) -> None:
        with pytest.raises((EnvelopeError, sa.exc.SQLAlchemyError)) as info:
            action()
        texts.append(str(info.value))
        texts.append(repr(info.value))

    def duplicate() -> None:
        with engine.begin() as conn:
            conn.execute(table.insert(), {"id": 99, "secret": PLAINTEXTS[0], "unique_tag": "t0"})

    def too_long() -> None:
        with engine.begin() as conn:
            conn.execute(table.insert(), {"id": 98, "secret": PLAINTEXTS[0] * 10})

    ciphertext = registry.encrypt(PLAINTEXTS[1].encode(), "records.secret")
    failing(duplicate)
    failing(too_long)
    failing(lambda: registry.decrypt(ciphertext, "records.other"))
    failing(lambda: registry.decrypt(PLAINTEXTS[2].encode() * 2, "records.secret"))
    failing(lambda: KeyRegistry(sa.create_engine(db_url), static).init())
    failing(lambda: PBKDF2RootKey(SEED, SALT, iterations=5))

    texts += [repr(registry), repr(static), repr(pbkdf2), registry.status().to_json()]
    cache = registry.envelope.keyring.cache
    texts += [repr(key) for key in [*cache.by_header.values(), *cache.index.values()]]
    texts += [caplog.text]

    everything = "\n".join(texts)
    assert "data key version" in everything or "rotated" in everything  # the logs were captured
    secrets = [SEED, SALT, *PLAINTEXTS]
    for key in [root_bytes, *data_keys]:
        secrets += _forms(key)
    for secret in secrets:
        assert secret not in everything, f"a secret leaked: {secret[:6]}..."
    registry.close()
    engine.dispose()


def test_representative_operations_leak_nothing_anywhere(
    db_url: str, tmp_path: Any, caplog: pytest.LogCaptureFixture, data_keys: list[bytes]
) -> None:
    """Every logger at DEBUG through the whole lifecycle: a root key from a
    file, blind indexes and deterministic columns, rotation, re-encryption,
    census, maintenance, a root key rotation, a tenant shred, the async
    registry, and the command line in a subprocess."""
    import asyncio
    import subprocess
    import sys

    from conftest import async_engine_for

    from sqlalchemy_envelope import AsyncKeyRegistry, blind_index_column

    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)

    root_bytes, new_root_bytes = os.urandom(32), os.urandom(32)
    key_file = tmp_path / "root.key"
    key_file.write_text(base64.b64encode(root_bytes).decode())
    key_file.chmod(0o600)
    texts: list[str] = []

    engine = sa.create_engine(db_url, echo="debug")
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY_FILE": str(key_file)})
    registry.init()
    table = sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", EncryptedType(sa.String(100))),
        sa.Column("ssn", EncryptedType(sa.String(30), deterministic=True)),
        blind_index_column("name_index", "name"),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{"id": i, "name": p, "ssn": p, "name_index": p} for i, p in enumerate(PLAINTEXTS)],
        )
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.id).where(table.c.ssn == PLAINTEXTS[1])).all()
    registry.rotate()
    texts.append(repr(registry.reencrypt(table.c.name, table.c.ssn, progress=False)))
    texts.append(repr(registry.census(table.c.name)))
    texts.append(registry.status(census=True).to_json())
    texts.append(repr(registry.maintenance()))
    registry.create_scope("tenant-a")
    registry.envelope.encrypt_bytes(PLAINTEXTS[0].encode(), b"people.name", "tenant-a")
    texts.append(repr(registry.shred("tenant-a")))
    new_root = StaticRootKey(new_root_bytes)
    registry.rewrap(new_root)
    index_keys = registry.envelope.keyring.cache.index.values()
    derived = [key for entry in index_keys for key in entry.derived.values()]
    assert derived  # the blind index and the deterministic column derived keys
    registry.close()

    async def run_async() -> None:
        async_engine = async_engine_for(db_url, echo="debug")
        async_registry = AsyncKeyRegistry(async_engine, new_root)
        await async_registry.init()
        await async_registry.rotate()
        texts.append((await async_registry.status()).to_json())
        async with async_engine.begin() as conn:
            await conn.execute(table.insert(), {"id": 10, "name": PLAINTEXTS[2], "ssn": "x"})
        await async_registry.close()
        await async_engine.dispose()

    if engine.dialect.name != "mysql":  # the async drivers tested are aiosqlite and asyncpg
        asyncio.run(run_async())

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": db_url,
        "ENVELOPE_ROOT_KEY": base64.b64encode(new_root_bytes).decode(),
        "ENVELOPE_NEW_ROOT_KEY_FILE": str(key_file),
    }
    for args in (
        ["status", "--census"],
        ["--json", "status"],
        ["rotate"],
        ["reencrypt", "people.name", "people.ssn"],
        ["census", "people.name"],
        ["maintenance"],
        ["rewrap"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "sqlalchemy_envelope", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, (args, result.stderr[-500:])
        texts += [result.stdout, result.stderr]

    texts.append(caplog.text)
    everything = "\n".join(texts)
    assert "people" in everything and "rotated" in everything  # output was captured
    secrets = list(PLAINTEXTS)
    for key in [root_bytes, new_root_bytes, *data_keys, *derived]:
        secrets += _forms(key)
    assert len(data_keys) >= 4  # default v1, v2, the index key, the tenant key
    for secret in secrets:
        assert secret not in everything, f"a secret leaked: {secret[:6]}..."
    engine.dispose()
