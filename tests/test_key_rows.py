"""Someone who can write to data_keys but has no root key: each attack on a
key row, made with plain SQL on a real database, and the library refusing
it. Also keys wrapped before version 2 of the wrap context, and values
naming keys data_keys does not hold."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    SCOPE_OPTION,
    DecryptionError,
    EncryptedType,
    KeyRegistry,
    KeyTamperedError,
    StaticRootKey,
    UnknownKeyError,
    WrongRootKeyError,
    session_scope,
)
from sqlalchemy_envelope.crypto import format as fmt
from sqlalchemy_envelope.keys.wrapper import KeyWrapper

CACHE_MAX_AGE = 60
NOTES = sa.Table(
    "notes",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("body", EncryptedType(sa.String(60))),
    sa.Column("code", EncryptedType(sa.String(60), deterministic=True)),
)
# The same table as the database holds it: what a client's bytes look like.
RAW_NOTES = sa.Table(
    "notes",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("body", sa.LargeBinary),
    sa.Column("code", sa.LargeBinary),
)


def _registry(engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks, **options: Any) -> Any:
    registry = KeyRegistry(
        engine,
        root_key,
        cache_max_age=CACHE_MAX_AGE,
        clock=clocks.monotonic,
        wall_clock=clocks.now,
        **options,
    )
    registry.init()
    NOTES.metadata.create_all(engine)
    return registry


def _write(engine: sa.Engine, how: str, ids: list[int], scope: str | None = None) -> None:
    """One INSERT per id, as the application writes (for ``scope``)."""
    for id_ in ids:
        row = {"id": id_, "body": f"note {id_}", "code": f"code {id_}"}
        if how == "connection":
            options = {} if scope is None else {SCOPE_OPTION: scope}
            with engine.begin() as conn:
                conn.execute(NOTES.insert(), row, execution_options=options)
        else:
            with Session(engine) as session:
                if scope is None:
                    session.execute(NOTES.insert(), row)
                else:
                    with session_scope(session, scope):
                        session.execute(NOTES.insert(), row)
                session.commit()


def _read(engine: sa.Engine, how: str) -> list[tuple[Any, ...]]:
    statement = sa.select(NOTES.c.id, NOTES.c.body).order_by(NOTES.c.id)
    if how == "connection":
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(statement)]
    with Session(engine) as session:
        return [tuple(row) for row in session.execute(statement)]


def _attack(engine: sa.Engine, *statements: str) -> None:
    """The attacker's plain SQL on data_keys, committed."""
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_tenants_writes_are_not_redirected_to_another_tenants_key(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks, how: str
) -> None:
    """Marking globex's key as acme's active key would make acme's new values
    encrypt under globex's key, which shredding acme leaves readable."""
    registry = _registry(engine, root_key, clocks)
    registry.create_scope("acme", "globex")
    _write(engine, how, [1, 2], "acme")
    _write(engine, how, [3, 4], "globex")
    _attack(
        engine,
        "UPDATE data_keys SET state = 'retired', active_scope = NULL WHERE active_scope = 'acme'",
        "UPDATE data_keys SET scope = 'acme', active_scope = 'acme', version = 2 "
        "WHERE active_scope = 'globex'",
    )
    clocks.advance(CACHE_MAX_AGE + 1)
    for id_ in (5, 6):
        with pytest.raises(KeyTamperedError, match=r"version 1 of scope 'globex'.*scope 'acme'"):
            _write(engine, how, [id_], "acme")
    # A process started now cannot unwrap globex's key as acme's.
    fresh = KeyRegistry(engine, root_key, attach=False)
    with pytest.raises(WrongRootKeyError, match="version 2 of scope 'acme' does not unwrap"):
        fresh.envelope.encrypt_bytes(b"x", b"notes.body", "acme")
    with engine.connect() as conn:  # nothing was written for acme under globex's key
        assert conn.execute(sa.select(RAW_NOTES.c.id)).scalars().all() == [1, 2, 3, 4]
    fresh.close()
    registry.close()


def _reactivate_version_1(
    engine: sa.Engine, how: str, registry: KeyRegistry, clocks: Clocks, also: str = ""
) -> None:
    """Notes 1 and 2 under version 1, rotated away; then the attack: version
    1 made active again with plain SQL (and ``also`` set on its row), seen
    once the cache is stale."""
    _write(engine, how, [1, 2])
    registry.rotate()
    _attack(
        engine,
        "UPDATE data_keys SET state = 'retired', active_scope = NULL "
        "WHERE active_scope = 'default'",
        f"UPDATE data_keys SET state = 'active', active_scope = 'default'{also} "
        "WHERE scope = 'default' AND version = 1",
    )
    clocks.advance(CACHE_MAX_AGE + 1)


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_retired_key_made_active_again_is_refused(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks, how: str
) -> None:
    """Version 1 was rotated away after a suspected leak: setting it back to
    active must not make anyone encrypt under it again."""
    registry = _registry(engine, root_key, clocks)
    _reactivate_version_1(engine, how, registry, clocks)
    for id_ in (3, 4):
        with pytest.raises(KeyTamperedError, match="version 2 of its scope is newer"):
            _write(engine, how, [id_])
    fresh = KeyRegistry(engine, root_key, attach=False)
    with pytest.raises(KeyTamperedError, match="version 2 of its scope is newer"):
        fresh.encrypt(b"x", "notes.body")
    assert _read(engine, how) == [(1, "note 1"), (2, "note 2")]
    fresh.close()
    registry.close()
    # A process that starts afterwards, and runs init() first as applications
    # do, refuses it too.
    started = sa.create_engine(engine.url)
    restarted = KeyRegistry(started, root_key)
    for _ in range(2):
        with pytest.raises(KeyTamperedError, match="version 2 of its scope is newer"):
            restarted.init()
        with pytest.raises(KeyTamperedError, match="version 2 of its scope is newer"):
            restarted.encrypt(b"x", "notes.body")
    restarted.close()
    started.dispose()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_renumbered_key_is_refused(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks, how: str
) -> None:
    """Renumbering the retired version 1 as version 3 would make it the
    newest, so active again: its wrapping binds its version."""
    registry = _registry(engine, root_key, clocks)
    _reactivate_version_1(engine, how, registry, clocks, ", version = 3")
    for id_ in (3, 4):
        with pytest.raises(KeyTamperedError, match="now says version 3 of scope 'default'"):
            _write(engine, how, [id_])
    fresh = KeyRegistry(engine, root_key, attach=False)
    with pytest.raises(WrongRootKeyError, match="version 3 of scope 'default' does not unwrap"):
        fresh.encrypt(b"x", "notes.body")
    fresh.close()
    # A process that has unwrapped another key with its root key knows the
    # root key is right: the row was altered.
    proven = KeyRegistry(engine, root_key, attach=False)
    proven.hash_field(b"x", "notes.body")  # unwraps the index key: the root key is right
    for _ in range(2):
        with pytest.raises(KeyTamperedError, match="does not unwrap under its id, scope"):
            proven.encrypt(b"x", "notes.body")
    proven.close()
    registry.close()


def test_a_process_that_saw_the_newer_key_refuses_an_older_one_when_it_is_deleted(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    """Deleting version 2's row makes version 1 the newest in data_keys; a
    process that has unwrapped version 2 knows better."""
    registry = _registry(engine, root_key, clocks)
    _write(engine, "connection", [1])
    registry.rotate()
    _write(engine, "session", [2])
    _attack(
        engine,
        "DELETE FROM data_keys WHERE scope = 'default' AND version = 2",
        "UPDATE data_keys SET state = 'active', active_scope = 'default' "
        "WHERE scope = 'default' AND version = 1",
    )
    clocks.advance(CACHE_MAX_AGE + 1)
    for how in ("connection", "session"):
        with pytest.raises(KeyTamperedError, match="version 2 of its scope is newer"):
            _write(engine, how, [3])
    registry.close()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_lowered_count_of_encryptions_is_refused(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks, how: str
) -> None:
    """Resetting the counter would let processes claim past max_encryptions."""
    registry = _registry(engine, root_key, clocks, max_encryptions=6400)  # blocks of 100
    _write(engine, how, [1, 2])
    clocks.advance(CACHE_MAX_AGE + 1)
    _write(engine, how, [3])  # reads the key's row again, with the block claimed
    claimed = registry.status().active_encryptions
    assert claimed is not None and claimed >= 100
    _attack(engine, "UPDATE data_keys SET encryptions = 0 WHERE active_scope = 'default'")
    clocks.advance(CACHE_MAX_AGE + 1)
    for id_ in (4, 5):
        with pytest.raises(KeyTamperedError, match=f"went down from {claimed:,} to 0"):
            _write(engine, how, [id_])
    registry.close()


@pytest.mark.parametrize("how", ["connection", "session"])
def test_a_negative_count_of_encryptions_is_refused_by_any_process(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks, how: str
) -> None:
    """A count no claim can leave (below zero) would let a process that
    starts afterwards encrypt far past max_encryptions: it is tampering for
    everyone, not only for a process that read the count before."""
    registry = _registry(engine, root_key, clocks)
    _write(engine, how, [1])
    registry.close()
    _attack(engine, "UPDATE data_keys SET encryptions = -5000000000 WHERE active_scope = 'default'")
    started = sa.create_engine(engine.url)
    restarted = KeyRegistry(started, root_key)
    for _ in range(2):
        with pytest.raises(KeyTamperedError, match="count of encryptions is < 0"):
            restarted.init()
        with pytest.raises(KeyTamperedError, match="count of encryptions is < 0"):
            restarted.encrypt(b"x", "notes.body")
    restarted.close()
    started.dispose()


def test_a_renumbered_index_key_is_refused(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    """Index key version 1 leaked and lookups moved to version 2: swapping
    the two rows' versions would make version 2's lookups use the leaked key."""
    registry = _registry(engine, root_key, clocks)
    leaked = registry.hash_field(b"ada@example.com", "users.email", version=1)
    registry.rotate(scope=registry.index_scope)
    rekeyed = registry.hash_field(b"ada@example.com", "users.email", version=2)
    assert rekeyed != leaked
    scope = registry.index_scope
    _attack(
        engine,
        f"UPDATE data_keys SET version = 99 WHERE scope = '{scope}' AND version = 1",
        f"UPDATE data_keys SET version = 1 WHERE scope = '{scope}' AND version = 2",
        f"UPDATE data_keys SET version = 2 WHERE scope = '{scope}' AND version = 99",
    )
    clocks.advance(CACHE_MAX_AGE + 1)
    for _ in range(2):
        with pytest.raises(KeyTamperedError, match=f"version 1 of scope '{scope}'"):
            registry.hash_field(b"ada@example.com", "users.email", version=2)
    fresh = KeyRegistry(engine, root_key, attach=False)
    with pytest.raises(WrongRootKeyError, match="does not unwrap"):
        fresh.hash_field(b"ada@example.com", "users.email", version=2)
    fresh.close()
    registry.close()


def _legacy_wrap(raw_root_key: bytes, data_key: bytes, key_id: int, scope: str) -> bytes:
    """A data key as releases before wrap context version 2 wrapped it."""
    context = json.dumps({"key_id": str(key_id), "scope": scope}, separators=(",", ":"))
    nonce = os.urandom(12)
    aad = b"sqlalchemy-envelope/data-key/v1\x00" + context.encode("utf-8")
    return b"\x01" + nonce + AESGCM(raw_root_key).encrypt(nonce, data_key, aad)


def _key_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        query = "SELECT id, scope, version, wrapped_key FROM data_keys ORDER BY id"
        return list(conn.execute(sa.text(query)))


@pytest.mark.parametrize("how", ["connection", "session"])
def test_keys_wrapped_before_context_version_2_keep_working_until_rewrapped(
    engine: sa.Engine, clocks: Clocks, how: str
) -> None:
    raw = os.urandom(32)
    root_key = StaticRootKey(raw)
    registry = _registry(engine, root_key, clocks)
    registry.create_scope("café-東京")
    _write(engine, how, [1, 2])
    _write(engine, how, [3, 4], "café-東京")
    registry.close()
    with engine.begin() as conn:  # the database as an earlier release left it
        for key_id, scope, version, wrapped in _key_rows(engine):
            data_key = root_key.unwrap(bytes(wrapped), KeyWrapper.context(key_id, scope, version))
            conn.execute(
                sa.text("UPDATE data_keys SET wrapped_key = :w WHERE id = :i"),
                {"w": _legacy_wrap(raw, data_key, key_id, scope), "i": key_id},
            )

    registry = _registry(engine, root_key, clocks)
    _write(engine, how, [5, 6], "café-東京")
    _write(engine, how, [7, 8])
    assert _read(engine, how) == [(i, f"note {i}") for i in range(1, 9)]

    # Bind their versions without changing the root key: a rewrap to the
    # root key in use re-wraps exactly the keys of earlier releases.
    rows = _key_rows(engine)
    assert registry.rewrap(root_key) == len(rows)
    assert registry.rewrap(root_key) == 0
    for key_id, scope, version, wrapped in _key_rows(engine):
        context = KeyWrapper.context(key_id, scope, version)
        assert len(root_key.unwrap(bytes(wrapped), context)) == 32
    assert _read(engine, how) == [(i, f"note {i}") for i in range(1, 9)]

    new_root_key = StaticRootKey(os.urandom(32))
    assert registry.rewrap(new_root_key) == len(rows)
    for key_id, scope, version, wrapped in _key_rows(engine):
        context = KeyWrapper.context(key_id, scope, version)
        assert len(new_root_key.unwrap(bytes(wrapped), context)) == 32
        with pytest.raises(DecryptionError):
            new_root_key.unwrap(bytes(wrapped), KeyWrapper.legacy_context(key_id, scope))
    registry.close()
    restarted = _registry(engine, new_root_key, clocks)
    assert _read(engine, how) == [(i, f"note {i}") for i in range(1, 9)]
    restarted.close()


@contextmanager
def _key_queries() -> Iterator[list[str]]:
    """The statements on data_keys run meanwhile, by any engine (the
    registry's own pool included)."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "data_keys" in statement:
            seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", before)


@pytest.mark.parametrize("how", ["connection", "session"])
def test_values_naming_unknown_keys_cost_one_query_per_cache_age(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks, how: str
) -> None:
    """An application that decrypts what clients send: a forged header
    naming a key data_keys does not hold is looked up once per cache_max_age,
    however often it comes back."""
    registry = _registry(engine, root_key, clocks)
    unknown, unknown_index = 0x0102030405, 0x0504030201
    forged = fmt.header(unknown) + os.urandom(40)
    forged_code = fmt.header(unknown_index, fmt.DETERMINISTIC_VERSION) + os.urandom(30)
    with engine.begin() as conn:
        conn.execute(RAW_NOTES.insert(), {"id": 1, "body": forged, "code": None})
        conn.execute(RAW_NOTES.insert(), {"id": 2, "body": None, "code": forged_code})

    def read_all() -> None:
        for column in (NOTES.c.body, NOTES.c.code):
            for _ in range(2):
                statement = sa.select(column).where(column.is_not(None))
                with pytest.raises(UnknownKeyError):
                    if how == "connection":
                        with engine.connect() as conn:
                            conn.execute(statement).all()
                    else:
                        with Session(engine) as session:
                            session.execute(statement).all()
        for _ in range(2):
            with pytest.raises(UnknownKeyError):
                registry.decrypt(forged, "notes.body")

    with _key_queries() as queries:
        read_all()
        read_all()
        assert len(queries) == 2  # one per unknown key id
        clocks.advance(CACHE_MAX_AGE + 1)
        read_all()
        assert len(queries) == 4
    registry.close()
