"""The data_keys table: the database enforces one active key per scope, and
only wrapped keys ever reach it."""

from __future__ import annotations

import os
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import stored_bytes

from sqlalchemy_envelope import KeyRegistry, StaticRootKey, WrongRootKeyError
from sqlalchemy_envelope.keys import keyring as keyring_module
from sqlalchemy_envelope.keys import storage


def _insert(conn: sa.Connection, table: sa.Table, **overrides: object) -> None:
    now = storage.utcnow()
    values: dict[str, object] = {
        "id": int.from_bytes(os.urandom(4), "big"),
        "scope": "default",
        "version": 99,
        "algorithm": storage.ALGORITHM,
        "wrapped_key": b"\x01" * 61,
        "root_key_fingerprint": "x",
        "root_key_description": "x",
        "state": "active",
        "active_scope": "default",
        "created_at": now,
        "state_changed_at": now,
    }
    values.update(overrides)
    conn.execute(sa.insert(table).values(**values))


def test_the_database_allows_one_active_key_per_scope(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    table = registry.table
    # MariaDB reports a failed CHECK as error 4025, which its drivers raise as
    # an OperationalError (SQLSTATE 23000, an integrity violation all the same).
    violation: Any = sa.exc.IntegrityError
    if engine.dialect.name == "mysql":
        violation = (sa.exc.IntegrityError, sa.exc.OperationalError)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        _insert(conn, table)
    with pytest.raises(violation), engine.begin() as conn:
        _insert(conn, table, version=1, state="retired", active_scope=None)
    with pytest.raises(violation), engine.begin() as conn:
        _insert(conn, table, state="active", active_scope=None)
    with pytest.raises(violation), engine.begin() as conn:
        _insert(conn, table, state="retired", active_scope="default")
    with pytest.raises(violation), engine.begin() as conn:
        _insert(conn, table, state="retired", active_scope=None, wrapped_key=None)
    with pytest.raises(violation), engine.begin() as conn:
        _insert(conn, table, state="lost", active_scope=None)
    with engine.begin() as conn:
        _insert(conn, table, scope="other", active_scope="other")
        _insert(conn, table, state="destroyed", active_scope=None, wrapped_key=None)
    with engine.connect() as conn:
        active = (
            conn.execute(
                sa.select(table.c.scope)
                .where(table.c.state == "active", ~table.c.scope.startswith("~"))
                .order_by(table.c.scope)
            )
            .scalars()
            .all()
        )
    assert active == ["default", "other"]


def test_no_key_material_reaches_the_database(
    engine: sa.Engine, root_key: StaticRootKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    generated: list[bytes] = []
    real = keyring_module.new_data_key

    def recording() -> bytes:
        key = real()
        generated.append(key)
        return key

    monkeypatch.setattr(keyring_module, "new_data_key", recording)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    for _ in range(3):
        registry.rotate()
    assert len(generated) == 5  # four data keys, and the blind-index key

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM data_keys")).all()
    dump = stored_bytes(engine, "data_keys")
    assert len(rows) == 5
    for key in generated:
        for form in (key, key.hex().encode(), key[:16], key[16:]):
            assert form not in dump
    registry.close()


def test_wrapped_keys_are_bound_to_their_row(engine: sa.Engine, registry: KeyRegistry) -> None:
    registry.rotate()
    table = registry.table
    with engine.begin() as conn:
        rows = conn.execute(
            sa.select(table.c.id, table.c.wrapped_key).where(table.c.scope == "default")
        ).all()
        (id_a, wrapped_a), (id_b, wrapped_b) = rows
        conn.execute(sa.update(table).where(table.c.id == id_a).values(wrapped_key=wrapped_b))
        conn.execute(sa.update(table).where(table.c.id == id_b).values(wrapped_key=wrapped_a))
    fresh = KeyRegistry(engine, registry.root_key, attach=False)
    with pytest.raises(WrongRootKeyError, match="altered"):
        fresh.init()


def test_scopes_differing_in_case_are_distinct_tenants(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    # MySQL/MariaDB compare strings case-insensitively by default; data_keys must not.
    upper, lower = registry.create_scope("Acme", "acme")
    assert upper.id != lower.id and (upper.scope, lower.scope) == ("Acme", "acme")
    sealed = registry.envelope.encrypt_bytes(b"x", b"t.c", "acme")
    key_id = int.from_bytes(sealed[1:6], "big")
    assert registry.envelope.keyring.scope_version(key_id) == ("acme", 1)
