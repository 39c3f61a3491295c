"""Root key rotation: every data key re-wrapped in one transaction, or none."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import (
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    PBKDF2RootKey,
    StaticRootKey,
    WrongRootKeyError,
)


class FailingRootKey:
    """A root key provider that breaks after a number of wraps."""

    def __init__(self, inner: StaticRootKey, fail_after: int) -> None:
        self.inner = inner
        self.left = fail_after

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    @property
    def description(self) -> str:
        return "failing"

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        if self.left == 0:
            raise RuntimeError("the KMS went away")
        self.left -= 1
        return self.inner.wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self.inner.unwrap(wrapped, context)


def _fingerprints(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT root_key_fingerprint FROM data_keys")).scalars())


def test_rewrap_moves_every_key_and_retires_the_old_root(db_url: str, engine: sa.Engine) -> None:
    old = PBKDF2RootKey("old seed", "old salt", iterations=10_000, allow_weak=True)
    registry = KeyRegistry(engine, old)
    registry.init()
    table = sa.Table(
        "things",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", EncryptedType(sa.String(20))),
    )
    table.metadata.create_all(engine)
    for i in range(3):
        with engine.begin() as conn:
            conn.execute(table.insert(), {"id": i, "v": f"value {i}"})
        registry.rotate()
    registry.disable(1)
    registry.destroy(2, force=True)
    raw = sa.Table("things", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        before = conn.execute(sa.select(raw.c.v).order_by(raw.c.id)).scalars().all()

    new = StaticRootKey(os.urandom(32))
    assert registry.rewrap(new) == 4  # 3 data keys and the index key; none for the destroyed
    assert _fingerprints(engine) == {new.fingerprint}
    with engine.connect() as conn:
        assert conn.execute(sa.select(raw.c.v).order_by(raw.c.id)).scalars().all() == before
    registry.enable(1)
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.v).where(table.c.id != 1)).scalars().all() == [
            "value 0",
            "value 2",
        ]
    registry.close()

    second = sa.create_engine(db_url)
    with pytest.raises(WrongRootKeyError):
        KeyRegistry(
            second, PBKDF2RootKey("old seed", "old salt", iterations=10_000, allow_weak=True)
        ).init()
    second.dispose()
    third = sa.create_engine(db_url)
    fresh = KeyRegistry(third, new)
    assert fresh.init().version == 4
    with third.connect() as conn:
        assert conn.execute(sa.select(table.c.v).where(table.c.id == 0)).scalar() == "value 0"
    with pytest.raises(ConfigurationError, match="already in use"):
        fresh.rewrap(new)
    # And raise PBKDF2's work factor by moving to a new derived root key.
    stronger = PBKDF2RootKey(secrets.token_urlsafe(32), "new salt")
    assert fresh.rewrap(stronger) == 4
    fresh.close()
    third.dispose()


def test_a_failed_rewrap_changes_nothing(db_url: str, engine: sa.Engine) -> None:
    old = StaticRootKey(os.urandom(32))
    registry = KeyRegistry(engine, old)
    registry.init()
    for _ in range(4):
        registry.rotate()
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT * FROM data_keys ORDER BY version")).all()

    with pytest.raises(RuntimeError, match="went away"):
        registry.rewrap(FailingRootKey(StaticRootKey(os.urandom(32)), fail_after=3))
    with engine.connect() as conn:
        after = conn.execute(sa.text("SELECT * FROM data_keys ORDER BY version")).all()
    assert after == before
    assert _fingerprints(engine) == {old.fingerprint}
    value = registry.encrypt(b"still works", "t.c")
    registry.close()

    other = sa.create_engine(db_url)
    again = KeyRegistry(other, old)
    assert again.init().version == 5
    assert again.decrypt(value, "t.c") == b"still works"
    again.close()
    other.dispose()
