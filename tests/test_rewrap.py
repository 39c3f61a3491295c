"""Root key rotation: every data key re-wrapped in one transaction, or none."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping

import pytest
import sqlalchemy as sa
from conftest import encrypted_table
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    SCOPE_OPTION,
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
    for _ in range(2):  # every key is under the root key in use, wrap context 2
        assert fresh.rewrap(new) == 0
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


def _status_cli(db_url: str, raw_root: bytes, *args: str, code: int = 0) -> str:
    """`sqlalchemy-envelope [args] status`, run as an operator would."""
    result = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_envelope", *args, "status"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": db_url,
            "ENVELOPE_ROOT_KEY": base64.b64encode(raw_root).decode(),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == code, (result.stdout, result.stderr)
    return result.stdout + result.stderr


def test_status_reports_keys_left_under_another_root_key(db_url: str, engine: sa.Engine) -> None:
    """A key left under the old root key (here: a tenant's key row restored
    from a backup taken before the rewrap) is reported by status, API and
    command line, with its count and that the old root key is still needed;
    running rewrap again with the old root key moves it, and then status
    says the old root key can go."""
    raw_old, raw_new = os.urandom(32), os.urandom(32)
    old, new = StaticRootKey(raw_old), StaticRootKey(raw_new)
    registry = KeyRegistry(engine, old)
    registry.init()
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        for i in range(2):
            conn.execute(
                notes.insert(),
                {"id": i, "body": "acme's secret"},
                execution_options={SCOPE_OPTION: "acme"},
            )
    keys = sa.Table("data_keys", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        backup = conn.execute(sa.select(keys).where(keys.c.scope == "acme")).one()
    assert registry.rewrap(new) == 4  # default's and acme's, each with its index key
    registry.close()
    with engine.begin() as conn:  # the operator restores acme's key row from the backup
        conn.execute(sa.update(keys).where(keys.c.id == backup.id).values(**backup._mapping))

    second = sa.create_engine(db_url)
    current = KeyRegistry(second, new)
    for _ in range(2):
        status = current.status()
        assert status.keys_by_root_key == {new.fingerprint: 3, old.fingerprint: 1}
        assert status.other_root_keys == {old.fingerprint: 1}
        assert status.other_root_keys_needed is True
        data = status.to_dict()
        assert data["other_root_keys"] == {old.fingerprint: 1}
        assert data["other_root_keys_needed"] is True
    for _ in range(2):
        with (
            Session(second) as session,
            pytest.raises(WrongRootKeyError, match=f"wrapped by root key {old.fingerprint}"),
        ):
            session.execute(sa.select(notes.c.body)).all()
        # Nothing is written while a key is left behind; the error says why.
        with pytest.raises(WrongRootKeyError, match=r"1 data keys .* left keys behind"):
            current.rotate()
    data = json.loads(_status_cli(db_url, raw_new, "--json"))
    assert data["keys_by_root_key"] == {new.fingerprint: 3, old.fingerprint: 1}
    assert data["other_root_keys"] == {old.fingerprint: 1}
    assert data["other_root_keys_needed"] is True
    text = _status_cli(db_url, raw_new)
    assert f"keys under OTHER root key {old.fingerprint}: 1 (still needed" in text
    assert "not needed" not in text
    # The old root key's holder sees the same, from its side.
    assert _status_cli(db_url, raw_old).count(f"OTHER root key {new.fingerprint}: 3") == 1
    # A root key that wraps none of the keys is a configuration mistake.
    assert "were wrapped by root key" in _status_cli(db_url, os.urandom(32), code=1)

    # Finish the rewrap with the old root key: only the key left behind moves.
    third = sa.create_engine(db_url)
    finishing = KeyRegistry(third, old)
    assert finishing.rewrap(new) == 1
    finishing.close()
    third.dispose()
    for _ in range(2):
        status = current.status()
        assert status.other_root_keys == {} and status.other_root_keys_needed is False
        assert status.keys_by_root_key == {new.fingerprint: 4}
    data = json.loads(_status_cli(db_url, raw_new, "--json"))
    assert (data["other_root_keys"], data["other_root_keys_needed"]) == ({}, False)
    assert "older root keys are not needed" in _status_cli(db_url, raw_new)
    for _ in range(2):
        with second.connect() as conn:
            assert conn.execute(sa.select(notes.c.body)).scalars().all() == ["acme's secret"] * 2
        with Session(second) as session:
            assert session.scalars(sa.select(notes.c.body)).all() == ["acme's secret"] * 2
    current.close()
    second.dispose()
