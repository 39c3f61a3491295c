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
from sqlalchemy_envelope import registry as registry_module

PLAINTEXTS = ["Patient Zero Confidential", "4111-1111-1111-1111", "diagnosis: very secret"]
SEED = "seed-that-must-never-print"
SALT = "salt-that-must-never-print"


def _forms(secret: bytes) -> list[str]:
    return [secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]]


def test_nothing_secret_is_logged_repred_or_raised(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_keys: list[bytes] = []
    real = registry_module.new_data_key

    def recording() -> bytes:
        data_keys.append(real())
        return data_keys[-1]

    monkeypatch.setattr(registry_module, "new_data_key", recording)
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "sqlalchemy_envelope"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored after the test

    texts: list[str] = []
    engine = sa.create_engine(db_url, echo="debug")
    root_bytes = os.urandom(32)
    static = StaticRootKey(root_bytes)
    pbkdf2 = PBKDF2RootKey(SEED, SALT, iterations=10_000)
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
    texts += [repr(key) for key in registry._cache.by_header.values()]
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
