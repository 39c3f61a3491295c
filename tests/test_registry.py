"""KeyRegistry: init, the root-key check, rotation, the cache, registries
across engines and sessions, and concurrency."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks
from sqlalchemy.orm import Session, sessionmaker

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    EXECUTION_OPTION,
    SCOPE_OPTION,
    ConfigurationError,
    DecryptionError,
    EncryptedType,
    InvalidValueError,
    KeyRegistry,
    KeyState,
    NoActiveKeyError,
    NotCiphertextError,
    PBKDF2RootKey,
    StaticRootKey,
    UnknownKeyError,
    WrongRootKeyError,
    session_scope,
)
from sqlalchemy_envelope.crypto import format as fmt


def _secrets_table() -> sa.Table:
    return sa.Table(
        "secrets",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", EncryptedType(sa.String(100))),
    )


def _key_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT * FROM data_keys WHERE scope = 'default' ORDER BY version")
            ).all()
        )


@pytest.fixture
def second_engine(db_url: str) -> Iterator[sa.Engine]:
    """Another engine on the same database, as another process would have."""
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


def test_init_is_idempotent(engine: sa.Engine, root_key: StaticRootKey) -> None:
    registry = KeyRegistry(engine, root_key)
    first = registry.init()
    second = registry.init()
    assert first.id == second.id and first.version == 1 and first.state is KeyState.ACTIVE
    assert len(_key_rows(engine)) == 1
    registry.close()


def test_concurrent_init_creates_exactly_one_key(db_url: str, root_key: StaticRootKey) -> None:
    engines = [sa.create_engine(db_url) for _ in range(8)]
    registries = [KeyRegistry(e, root_key) for e in engines]
    barrier = threading.Barrier(len(registries))
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(registry: KeyRegistry) -> None:
        barrier.wait()
        try:
            results.append(registry.init())
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({info.id for info in results}) == 1
    assert len(_key_rows(engines[0])) == 1
    for r, e in zip(registries, engines, strict=True):
        r.close()
        e.dispose()


def test_wrong_root_key_is_refused_and_writes_nothing(
    engine: sa.Engine, second_engine: sa.Engine, registry: KeyRegistry
) -> None:
    table = _secrets_table()
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "value": "top secret"})
    before = _key_rows(engine)

    intruder = KeyRegistry(second_engine, StaticRootKey(os.urandom(32)))
    with pytest.raises(WrongRootKeyError, match="Nothing was written"):
        intruder.init()
    with pytest.raises(WrongRootKeyError):
        intruder.rotate()
    with pytest.raises(WrongRootKeyError):
        KeyRegistry(second_engine, intruder.root_key, scope="elsewhere", attach=False).init()
    with second_engine.connect() as conn, pytest.raises(WrongRootKeyError):
        conn.execute(sa.select(table.c.value)).scalar_one()
    assert _key_rows(engine) == before
    intruder.close()


class NamedRootKey:
    """A provider whose fingerprint is a name, not derived from the key (as
    with a Vault Transit key name): two such keys can share a fingerprint."""

    description = "named static key"

    def __init__(self, key: bytes) -> None:
        self._key = StaticRootKey(key)
        self.fingerprint = "named:app"

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> bytes:
        return self._key.wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self._key.unwrap(wrapped, context)


def _all_key_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT * FROM data_keys ORDER BY id")).all())


@pytest.mark.parametrize("provider", [StaticRootKey, NamedRootKey])
def test_a_wrong_root_key_changes_no_key_state(
    engine: sa.Engine, second_engine: sa.Engine, provider: Callable[[bytes], Any]
) -> None:
    """Disabling, destroying or shredding keys is refused to a root key that
    cannot read them, as writing is (SECURITY.md: refused before anything is
    written)."""
    right = KeyRegistry(engine, provider(os.urandom(32)), cache_max_age=0.001)
    right.init()
    right.create_scope("acme")
    right.rotate()  # version 1 retired
    before = _all_key_rows(engine)
    wrong = KeyRegistry(second_engine, provider(os.urandom(32)), cache_max_age=0.001)
    for call in (
        lambda: wrong.disable(1),
        lambda: wrong.retire(2),
        lambda: wrong.destroy(1, force=True),
        lambda: wrong.shred("acme"),
        lambda: wrong.shred("default"),
    ):
        for _ in range(2):
            with pytest.raises(WrongRootKeyError):
                call()
    assert _all_key_rows(engine) == before
    right.disable(1)
    right.enable(1)
    assert right.shred("acme") == 2  # its data key and its index key
    wrong.close()
    right.close()


@pytest.mark.parametrize("provider", [StaticRootKey, NamedRootKey])
def test_a_wrong_root_key_writes_nothing_on_any_path(
    engine: sa.Engine, second_engine: sa.Engine, provider: Callable[[bytes], Any]
) -> None:
    # With NamedRootKey the fingerprints match and only the key material differs.
    right = KeyRegistry(engine, provider(os.urandom(32)))
    right.init()
    table = _secrets_table()
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "value": "kept"})
    before = _all_key_rows(engine)

    # A misconfigured process whose first write goes to a tenant with no key yet.
    wrong = KeyRegistry(second_engine, provider(os.urandom(32)))
    for attempt in range(2):
        with second_engine.connect() as conn, pytest.raises(WrongRootKeyError):
            conn.execute(
                table.insert(),
                {"id": 10 + attempt, "value": "lost"},
                execution_options={SCOPE_OPTION: "new-tenant"},
            )
        with (
            Session(second_engine) as session,
            session_scope(session, "new-tenant"),
            pytest.raises(WrongRootKeyError),
        ):
            session.execute(table.insert(), {"id": 20 + attempt, "value": "lost"})
            session.commit()
    for call in (
        wrong.init,
        wrong.rotate,
        lambda: wrong.rotate("new-tenant"),
        lambda: wrong.create_scope("new-tenant"),
        lambda: wrong.envelope.encrypt_bytes(b"x", b"t.c", "other-tenant"),
        lambda: KeyRegistry(second_engine, wrong.root_key, scope="new", attach=False).init(),
    ):
        with pytest.raises(WrongRootKeyError):
            call()
    assert _all_key_rows(engine) == before
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 1

    # The correctly configured application is not locked out.
    assert right.init().version == 1
    assert right.rotate().version == 2
    assert right.status().active_version == 2
    for attempt in range(2):
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                {"id": 30 + attempt, "value": "tenant"},
                execution_options={SCOPE_OPTION: "new-tenant"},
            )
        with Session(engine) as session:
            session.execute(table.insert(), {"id": 40 + attempt, "value": "default"})
            session.commit()
    with engine.connect() as conn:
        values = conn.execute(sa.select(table.c.value).order_by(table.c.id)).scalars().all()
    assert values == ["kept", "tenant", "tenant", "default", "default"]
    assert right.status("new-tenant").active_version == 1
    wrong.close()
    right.close()


def test_wrong_pbkdf2_parameters_are_a_wrong_root_key(
    engine: sa.Engine, second_engine: sa.Engine
) -> None:
    right = KeyRegistry(engine, PBKDF2RootKey("seed", "salt", iterations=10_000, allow_weak=True))
    right.init()
    wrong = KeyRegistry(
        second_engine, PBKDF2RootKey("seed", "salt", iterations=20_000, allow_weak=True)
    )
    with pytest.raises(WrongRootKeyError, match="ENVELOPE_PBKDF2_ITERATIONS") as info:
        wrong.init()
    assert "iterations=20000" in str(info.value)
    same = KeyRegistry(
        second_engine,
        PBKDF2RootKey(b"seed", b"salt", iterations=10_000, allow_weak=True),
        attach=False,
    )
    assert same.init().id == right.status().active_key_id
    right.close()
    wrong.close()


def test_rotation_keeps_old_values_readable(engine: sa.Engine, registry: KeyRegistry) -> None:
    table = _secrets_table()
    table.metadata.create_all(engine)
    versions = []
    for i in range(1, 5):
        with engine.begin() as conn:
            conn.execute(table.insert(), {"id": i, "value": f"written under version {i}"})
        versions.append(registry.rotate().version)
    assert versions == [2, 3, 4, 5]
    with engine.connect() as conn:
        values = conn.execute(sa.select(table.c.value).order_by(table.c.id)).scalars().all()
    assert values == [f"written under version {i}" for i in range(1, 5)]

    status = registry.status()
    assert status.active_version == 5
    assert status.keys_by_state == {"active": 1, "retired": 4}
    assert [k.version for k in status.keys] == [1, 2, 3, 4, 5]

    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 9, "value": "new"})
    raw = sa.Table("secrets", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(raw.c.value).where(raw.c.id == 9)).scalar_one()
    assert fmt.key_id_of(bytes(stored)) == status.active_key_id


def test_registries_on_two_engines_read_each_other_across_rotation(
    engine: sa.Engine, second_engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    a = KeyRegistry(engine, root_key, clock=clocks.monotonic, cache_max_age=30)
    b = KeyRegistry(second_engine, root_key, clock=clocks.monotonic, cache_max_age=30)
    a.init()
    b.init()
    table = _secrets_table()
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "value": "from a, v1"})
    with second_engine.begin() as conn:
        conn.execute(table.insert(), {"id": 2, "value": "from b, v1"})
    new = a.rotate()
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 3, "value": "from a, v2"})
    with second_engine.begin() as conn:
        # b has not seen the rotation yet: it still writes under version 1.
        conn.execute(table.insert(), {"id": 4, "value": "from b, before refresh"})
        assert conn.execute(sa.select(table.c.value).order_by(table.c.id)).scalars().all() == [
            "from a, v1",
            "from b, v1",
            "from a, v2",
            "from b, before refresh",
        ]
    clocks.advance(31)
    with second_engine.begin() as conn:
        conn.execute(table.insert(), {"id": 5, "value": "from b, after refresh"})
    raw = sa.Table("secrets", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(raw.c.id, raw.c.value)).all())
        values = conn.execute(sa.select(table.c.value).order_by(table.c.id)).scalars().all()
    assert fmt.key_id_of(bytes(stored[4])) != new.id
    assert fmt.key_id_of(bytes(stored[5])) == new.id
    assert values[-1] == "from b, after refresh"
    a.close()
    b.close()


def test_flipping_any_byte_is_detected(engine: sa.Engine, registry: KeyRegistry) -> None:
    ciphertext = registry.encrypt(b"a value worth protecting", "t.c")
    for i in range(len(ciphertext)):
        for flip in (0x01, 0x80):
            altered = bytearray(ciphertext)
            altered[i] ^= flip
            with pytest.raises(DecryptionError):
                registry.decrypt(bytes(altered), "t.c")
    with pytest.raises(DecryptionError):
        registry.decrypt(ciphertext[:-1], "t.c")
    with pytest.raises(DecryptionError):
        registry.decrypt(ciphertext + b"\x00", "t.c")
    with pytest.raises(DecryptionError, match="another"):
        registry.decrypt(ciphertext, "t.other")
    assert registry.decrypt(ciphertext, "t.c") == b"a value worth protecting"


def test_a_deterministic_value_naming_another_key_is_a_decryption_error(
    engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey
) -> None:
    table = sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ssn", EncryptedType(sa.String(11), deterministic=True)),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "ssn": "111-11-1111"}])
    registry.rotate()  # data key version 2 of the registry's scope
    other = KeyRegistry(engine, root_key, scope="acme", attach=False)
    other.init()  # another scope's blind-index key
    with engine.connect() as conn:
        stored = bytes(conn.execute(sa.text("SELECT ssn FROM people")).scalar_one())
    # The header names a data key of the scope, or another scope's index key.
    names = [
        registry.status().active_key_id,
        registry.status().keys[0].id,
        other.status(other.index_scope).active_key_id,
    ]
    assert all(key_id is not None for key_id in names)
    for n, key_id in enumerate(names, start=2):
        forged = fmt.header(key_id, fmt.DETERMINISTIC_VERSION) + stored[fmt.HEADER_BYTES :]
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO people (id, ssn) VALUES (:n, :v)"), {"n": n, "v": forged}
            )
    query = sa.select(table.c.ssn).where(table.c.id == sa.bindparam("n"))
    for n in (2, 3, 4):
        for _ in range(2):
            with engine.connect() as conn, pytest.raises(DecryptionError, match=r"people\.ssn"):
                conn.execute(query, {"n": n}).scalar_one()
            with Session(engine) as session, pytest.raises(DecryptionError, match=r"people\.ssn"):
                session.execute(query, {"n": n}).scalar_one()
    with engine.connect() as conn:
        assert conn.execute(query, {"n": 1}).scalar_one() == "111-11-1111"
    other.close()


def test_unknown_key_and_non_ciphertext(engine: sa.Engine, registry: KeyRegistry) -> None:
    ciphertext = registry.encrypt(b"x", "t.c")
    forged = fmt.header(fmt.key_id_of(ciphertext) ^ 0x5A5A) + ciphertext[fmt.HEADER_BYTES :]
    with pytest.raises(UnknownKeyError, match="not in the data_keys table"):
        registry.decrypt(forged, "t.c")
    with pytest.raises(NotCiphertextError):
        registry.decrypt(b"hello", "t.c")


def test_batch_operations(registry: KeyRegistry) -> None:
    values = [os.urandom(n) for n in range(50)]
    sealed = registry.encrypt_many(values, "batch.values")
    assert len(set(sealed)) == 50
    assert registry.decrypt_many(sealed, "batch.values") == values
    with pytest.raises(DecryptionError):
        registry.decrypt_many(sealed, "batch.other")


def test_values_that_are_not_bytes_are_refused_without_quoting_them(
    registry: KeyRegistry,
) -> None:
    secret = "SECRET-" + "\ud800"
    for call in (
        lambda: registry.encrypt(secret, "t.c"),  # type: ignore[arg-type]
        lambda: registry.encrypt_many([b"fine", secret], "t.c"),  # type: ignore[list-item]
        lambda: registry.hash_field(secret, "t.c"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidValueError, match="as bytes, got str") as info:
            call()
        text = "".join(traceback.format_exception(info.value))
        assert "SECRET" not in text


def test_an_engine_without_registry_is_a_clear_error(engine: sa.Engine) -> None:
    table = _secrets_table()
    table.metadata.create_all(engine)
    with engine.begin() as conn, pytest.raises(ConfigurationError, match="no KeyRegistry"):
        conn.execute(table.insert(), {"id": 1, "value": "x"})


def test_operations_before_init_are_clear_errors(
    engine: sa.Engine, root_key: StaticRootKey
) -> None:
    registry = KeyRegistry(engine, root_key)
    with pytest.raises(ConfigurationError, match="init"):
        registry.rotate()
    with pytest.raises(ConfigurationError, match="init"):
        registry.status()
    with pytest.raises(ConfigurationError, match="init"):
        registry.encrypt(b"x", "t.c")
    registry.init()
    other_scope = KeyRegistry(engine, root_key, scope="empty", attach=False)
    with pytest.raises(NoActiveKeyError, match="'empty'"):
        other_scope.encrypt(b"x", "t.c")
    registry.close()


def test_one_registry_per_engine_and_closing(engine: sa.Engine, root_key: StaticRootKey) -> None:
    registry = KeyRegistry(engine, root_key)
    with pytest.raises(ConfigurationError, match="already served"):
        KeyRegistry(engine, root_key)
    registry.init()
    registry.close()
    with pytest.raises(ConfigurationError, match="closed"):
        registry.encrypt(b"x", "t.c")
    replacement = KeyRegistry(engine, root_key)
    assert replacement.init().version == 1
    replacement.close()


def test_session_and_sessionmaker_registries_win_for_writes(
    engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey
) -> None:
    tenant = KeyRegistry(engine, root_key, scope="tenant-a", attach=False)
    tenant_key = tenant.init()
    table = _secrets_table()
    table.metadata.create_all(engine)

    with Session(engine) as session:
        tenant.bind(session)
        session.execute(table.insert(), {"id": 1, "value": "tenant via session"})
        session.commit()
    factory = tenant.bind(sessionmaker(engine))
    with factory() as session:
        session.execute(table.insert(), {"id": 2, "value": "tenant via sessionmaker"})
        session.commit()
    with Session(engine) as session:
        session.execute(table.insert(), {"id": 3, "value": "engine default"})
        session.commit()
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            {"id": 4, "value": "per call"},
            execution_options={EXECUTION_OPTION: tenant},
        )

    raw = sa.Table("secrets", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(raw.c.id, raw.c.value)).all())
        values = conn.execute(sa.select(table.c.value).order_by(table.c.id)).scalars().all()
    default_id = registry.status().active_key_id
    assert [fmt.key_id_of(bytes(stored[i])) for i in (1, 2, 3, 4)] == [
        tenant_key.id,
        tenant_key.id,
        default_id,
        tenant_key.id,
    ]
    assert values == ["tenant via session", "tenant via sessionmaker", "engine default", "per call"]
    tenant.close()


def test_a_session_registry_with_its_own_root_key_reads_its_values(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    other = KeyRegistry(
        engine, StaticRootKey(os.urandom(32)), table_name="other_keys", attach=False
    )
    other.init()
    table = _secrets_table()
    table.metadata.create_all(engine)
    with Session(engine) as session:
        other.bind(session)
        session.execute(table.insert(), [{"id": 1, "value": "other root"}])
        session.commit()
        assert session.execute(sa.select(table.c.value)).scalar_one() == "other root"
    other.close()


def test_concurrent_threads_encrypt_decrypt_and_rotate(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(n: int) -> None:
        try:
            for i in range(300):
                value = f"thread {n} value {i}".encode()
                assert registry.decrypt(registry.encrypt(value, "t.c"), "t.c") == value
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def rotator() -> None:
        while not stop.is_set():
            registry.rotate()
            stop.wait(0.01)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    spinner = threading.Thread(target=rotator)
    spinner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    spinner.join()
    assert errors == []
    status = registry.status()
    assert status.keys_by_state["active"] == 1
    assert len({k.version for k in status.keys}) == len(status.keys) >= 2


def test_from_env(engine: sa.Engine) -> None:
    import base64

    key = os.urandom(32)
    registry = KeyRegistry.from_env(
        engine, environ={"ENVELOPE_ROOT_KEY": base64.b64encode(key).decode()}
    )
    assert registry.root_key.fingerprint == StaticRootKey(key).fingerprint
    registry.init()
    registry.close()
    with pytest.raises(ConfigurationError, match="ENVELOPE_ROOT_KEY"):
        KeyRegistry.from_env(engine, environ={})


def test_the_longest_scope_fits_data_keys_with_its_index_scope(
    engine: sa.Engine, root_key: StaticRootKey
) -> None:
    longest, too_long = "s" * 248, "t" * 249
    registry = KeyRegistry(engine, root_key, scope=longest)
    registry.init()
    table = _secrets_table()
    table.metadata.create_all(engine)
    tenant = "é" * 248  # characters, not bytes
    for _ in range(2):
        with sqlalchemy_envelope.scope(tenant), engine.begin() as conn:
            conn.execute(table.insert(), {"value": "fits"})
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.value)).scalars().all() == ["fits", "fits"]
    assert registry.status(tenant).active_version == 1

    with pytest.raises(ConfigurationError, match="at most 248 characters"):
        KeyRegistry(engine, root_key, scope=too_long, attach=False)
    with pytest.raises(ConfigurationError, match="at most 248 characters"):
        registry.create_scope(too_long)
    with (
        pytest.raises(ConfigurationError, match="at most 248 characters"),
        sqlalchemy_envelope.scope(too_long),
        engine.begin() as conn,
    ):
        conn.execute(table.insert(), {"value": "refused"})
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 2
        scopes = conn.execute(sa.text("SELECT DISTINCT scope FROM data_keys")).scalars().all()
    assert too_long not in scopes
    registry.close()
