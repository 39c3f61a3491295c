"""What a value is bound to: its schema, table and column (and tenant, with
``bind_scope``), encoded without ambiguity. A value copied into another
tenant's schema (``schema_translate_map``), into a column whose
``table.column`` reads the same, or into a column whose context ends like a
scope-bound one, fails to decrypt. Values written before (formats 1 and 2)
keep reading, and re-encrypting moves them to formats 3 and 4."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks
from sqlalchemy.orm import Session

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    DecryptionError,
    EncryptedType,
    KeyInUseError,
    KeyRegistry,
    StaticRootKey,
)
from sqlalchemy_envelope.crypto import format as fmt
from sqlalchemy_envelope.crypto.primitives import AESSIV, new_nonce

_ids = itertools.count(1)


def _accounts(metadata: sa.MetaData, name: str = "accounts") -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ssn", EncryptedType(sa.String(40))),
        sa.Column("code", EncryptedType(sa.String(40), deterministic=True)),
        sa.Column("note", EncryptedType(sa.String(40), storage="text")),
    )


def _raw(name: str, schema: str | None, *columns: str) -> sa.TableClause:
    """The table as the database holds it: ciphertext, never decrypted."""
    return sa.table(name, *(sa.column(c) for c in ("id", *columns)), schema=schema)


def _copy(conn: sa.Connection, source: sa.TableClause, target: sa.TableClause, row: int) -> None:
    """Copy a row's stored values as they are, as someone who can write to
    the database but holds no key would."""
    values = conn.execute(sa.select(source).where(source.c.id == row)).one()._asdict()
    conn.execute(sa.insert(target), values)


Reader = Callable[[Callable[[Any], Any]], Any]


@contextmanager
def _connection(engine: sa.Engine) -> Iterator[Any]:
    with engine.begin() as conn:
        yield conn


@contextmanager
def _session(engine: sa.Engine) -> Iterator[Any]:
    with Session(engine) as session, session.begin():
        yield session


FORMS = {"connection": _connection, "session": _session}


@pytest.mark.parametrize("form", FORMS)
def test_a_value_copied_into_another_tenants_schema_does_not_decrypt(
    other_schema: tuple[sa.Engine, str], root_key: StaticRootKey, form: str
) -> None:
    """Schema per tenant with one set of models and ``schema_translate_map``:
    values written in tenant B's schema read back there (equality lookups on
    the deterministic column too), but copied into tenant A's table they
    fail to decrypt, and equal values look unrelated in the two schemas."""
    engine, other = other_schema
    registry = KeyRegistry(engine, root_key)
    registry.init()
    accounts = _accounts(sa.MetaData())
    tenant_a = engine
    tenant_b = engine.execution_options(schema_translate_map={None: other})
    accounts.metadata.create_all(tenant_a)
    accounts.metadata.create_all(tenant_b)
    columns = ("ssn", "code", "note")
    use = FORMS[form]
    for _ in range(2):  # the second run takes the compiled cache's paths
        row = next(_ids)
        values = {"ssn": f"ssn-{row}", "code": f"code-{row}", "note": f"note-{row}"}
        with use(tenant_b) as conn:
            conn.execute(sa.insert(accounts), {"id": row, **values})
        with use(tenant_a) as conn:
            conn.execute(sa.insert(accounts), {"id": row + 1000, **values})
        with use(tenant_b) as conn:
            got = conn.execute(sa.select(accounts).where(accounts.c.id == row)).one()
            assert got._asdict() == {"id": row, **values}
            found = conn.execute(sa.select(accounts.c.id).where(accounts.c.code == values["code"]))
            assert found.scalars().all() == [row]
        with engine.begin() as conn:
            raw_a, raw_b = _raw("accounts", None, *columns), _raw("accounts", other, *columns)
            stored_a = conn.execute(sa.select(raw_a).where(raw_a.c.id == row + 1000)).one()
            stored_b = conn.execute(sa.select(raw_b).where(raw_b.c.id == row)).one()
            assert stored_a.code != stored_b.code  # equal values, unrelated ciphertexts
            _copy(conn, raw_b, raw_a, row)
        for column in columns:
            with (
                pytest.raises(DecryptionError, match="failed authentication"),
                use(tenant_a) as conn,
            ):
                conn.execute(sa.select(accounts.c[column]).where(accounts.c.id == row)).all()
        with use(tenant_a) as conn:
            lookup = sa.select(accounts.c.id).where(accounts.c.code == values["code"])
            assert conn.execute(lookup).scalars().all() == [row + 1000]
    registry.rotate()  # a job names the tenant's table as its statements put it
    report = registry.reencrypt(f"{other}.accounts.ssn", f"{other}.accounts.note")
    assert report.values_by_version == {1: 4} and report.left_behind == 0
    with use(tenant_b) as conn:
        assert len(conn.execute(sa.select(accounts)).all()) == 2
    registry.close()


def test_names_with_dots_do_not_share_a_context(engine: sa.Engine, registry: KeyRegistry) -> None:
    """Table ``a`` with column ``b.c`` and table ``a.b`` with column ``c``
    both read ``a.b.c``: a value of one does not decrypt in the other."""
    metadata = sa.MetaData()
    first = sa.Table(
        "a",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("b.c", EncryptedType(sa.String(40))),
    )
    second = sa.Table(
        "a.b",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("c", EncryptedType(sa.String(40))),
    )
    metadata.create_all(engine)
    for _ in range(2):
        row = next(_ids)
        with engine.begin() as conn:
            conn.execute(sa.insert(first), {"id": row, "b.c": "secret"})
            stored = conn.execute(sa.select(_raw("a", None, "b.c")).where(sa.column("id") == row))
            conn.execute(sa.insert(_raw("a.b", None, "c")), {"id": row, "c": stored.one()[1]})
        with pytest.raises(DecryptionError, match="failed authentication"), engine.connect() as c:
            c.execute(sa.select(second.c.c).where(second.c.id == row)).all()
        with engine.connect() as conn:
            assert conn.execute(sa.select(first.c["b.c"])).scalars().all()[-1] == "secret"


def test_a_context_ending_like_a_scope_is_not_that_scope(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """A scope-bound column's value written for tenant ``acme`` does not
    decrypt in a column whose context is the scope-bound one's followed by
    what formats 1 and 2 appended for the scope."""
    vault = sa.Table(
        "vault",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("secret", EncryptedType(sa.String(40), bind_scope=True)),
        sa.Column("other", EncryptedType(sa.String(40), context="vault.secret\x00scope=acme")),
    )
    vault.metadata.create_all(engine)
    for _ in range(2):
        row = next(_ids)
        with sqlalchemy_envelope.scope("acme"), engine.begin() as conn:
            conn.execute(sa.insert(vault), {"id": row, "secret": "for acme"})
        with engine.begin() as conn:
            raw = _raw("vault", None, "secret", "other")
            stored = conn.execute(sa.select(raw.c.secret).where(raw.c.id == row)).scalar()
            conn.execute(sa.update(raw).where(raw.c.id == row).values(other=stored))
        with pytest.raises(DecryptionError, match="failed authentication"), engine.connect() as c:
            c.execute(sa.select(vault.c.other).where(vault.c.id == row)).all()


# -- values written before: formats 1 and 2 ------------------------------------------


def _legacy_randomized(registry: KeyRegistry, plaintext: bytes, context: bytes) -> bytes:
    """A format 1 value, sealed as earlier versions did: the header of the
    registry's active key (format byte 0x01) and the context as it was."""
    key_id = fmt.key_id_of(registry.envelope.active_header())
    header = fmt.header(key_id, fmt.LEGACY_VERSION)
    key = registry.envelope.keyring.active(registry.scope)
    assert key.aead is not None
    nonce = new_nonce()
    return header + nonce + key.aead.encrypt(nonce, plaintext, header + context)


def _legacy_deterministic(registry: KeyRegistry, plaintext: bytes, context: bytes) -> bytes:
    """A format 2 value, sealed as earlier versions did."""
    current = registry.envelope.deterministic_header()
    if current is None:  # the index key is created on first use
        registry.envelope.encrypt_deterministic(b"", b"")
        current = registry.envelope.deterministic_header()
    assert current is not None
    header = fmt.header(fmt.key_id_of(current), fmt.LEGACY_DETERMINISTIC_VERSION)
    purpose = b"sqlalchemy-envelope/deterministic/v1\x00" + context
    siv = AESSIV(registry.envelope.derived_key(purpose, 1, 64))
    return header + siv.encrypt(plaintext, [header, context])


def test_values_written_before_keep_reading_and_reencrypt_moves_them(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """Formats 1 and 2, as every earlier version wrote them (the context
    ``table.column``, or the one given, and the scope appended for
    ``bind_scope``), read as before; ``reencrypt`` rewrites them in formats
    3 and 4, which read the same, and then finds nothing left to do."""
    metadata = sa.MetaData()
    old = sa.Table(
        "old",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ssn", EncryptedType(sa.String(40))),
        sa.Column("code", EncryptedType(sa.String(40), deterministic=True)),
        sa.Column("note", EncryptedType(sa.String(40), storage="text", context="renamed.note")),
        sa.Column("bound", EncryptedType(sa.String(40), bind_scope=True)),
    )
    metadata.create_all(engine)
    scoped = fmt.scoped_context(fmt.given_context("old.bound"), registry.scope).legacy
    stored = {
        "id": 1,
        "ssn": _legacy_randomized(registry, b"ssn", b"old.ssn"),
        "code": _legacy_deterministic(registry, b"code", b"old.code"),
        "note": fmt.to_text(_legacy_randomized(registry, b"note", b"renamed.note")),
        "bound": _legacy_randomized(registry, b"bound", scoped),
    }
    raw = _raw("old", None, "ssn", "code", "note", "bound")
    with engine.begin() as conn:
        conn.execute(sa.insert(raw), stored)
    expected = {"id": 1, "ssn": "ssn", "code": "code", "note": "note", "bound": "bound"}
    for _ in range(2):
        with engine.connect() as conn:
            assert conn.execute(sa.select(old)).one()._asdict() == expected
        with Session(engine) as session:
            assert session.execute(sa.select(old)).one()._asdict() == expected
    report = registry.reencrypt(old.c.ssn, old.c.code, old.c.note, old.c.bound)
    assert sum(report.values_by_version.values()) == 4 and report.left_behind == 0
    with engine.connect() as conn:
        moved = conn.execute(sa.select(raw)).one()
        assert conn.execute(sa.select(old)).one()._asdict() == expected
    versions = {
        "ssn": moved.ssn[0],
        "code": moved.code[0],
        "note": fmt.from_text(moved.note)[0],
        "bound": moved.bound[0],
    }
    assert versions == {"ssn": 3, "code": 4, "note": 3, "bound": 3}
    again = registry.reencrypt(old.c.ssn, old.c.code, old.c.note, old.c.bound)
    assert again.rows_scanned == 0 and not again.values_by_version


def test_a_renamed_column_reads_with_its_old_name_as_context(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    """``context="old_table.old_column"`` after a rename reads the values the
    column wrote under its old name, in the current format too."""
    before = sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", EncryptedType(sa.String(40))),
    )
    before.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(before), {"id": 1, "name": "Ada"})
        conn.exec_driver_sql("ALTER TABLE people RENAME TO persons")
    after = sa.Table(
        "persons",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", EncryptedType(sa.String(40), context="people.name")),
    )
    for _ in range(2):
        with engine.connect() as conn:
            assert conn.execute(sa.select(after.c.name)).scalar() == "Ada"


def test_the_census_and_the_destroy_guard_count_every_format(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    """A key with values of format 1 and format 3 under it: the census counts
    both, and the key cannot be destroyed until neither is left."""
    registry = KeyRegistry(
        engine, root_key, cache_max_age=1, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("body", EncryptedType(sa.String(40))),
    )
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(notes), {"id": 1, "body": "current"})
        legacy = _legacy_randomized(registry, b"legacy", b"notes.body")
        conn.execute(sa.insert(_raw("notes", None, "body")), {"id": 2, "body": legacy})
    registry.rotate()
    clocks.advance(2)
    for remaining in (2, 1):
        assert registry.status(census=True).rows_by_version == {1: remaining}
        with pytest.raises(KeyInUseError) as in_use:
            registry.destroy(1)
        assert in_use.value.rows == {"notes.body": remaining}
        with engine.begin() as conn:
            conn.execute(sa.delete(notes).where(notes.c.id == 3 - remaining))
    assert registry.destroy(1).version == 1
    registry.close()
