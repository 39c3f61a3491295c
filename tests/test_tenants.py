"""Tenant key scopes: per-tenant keys chosen by session, block or statement;
scope-bound values; shredding one tenant; per-tenant rotation; many tenants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa
from conftest import Clocks
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    SCOPE_OPTION,
    DecryptionError,
    DestroyedKeyError,
    EncryptedType,
    KeyRegistry,
    ShreddedScopeError,
    StaticRootKey,
    session_scope,
    set_session_scope,
)
from sqlalchemy_envelope.crypto import format as fmt


class Base(DeclarativeBase):
    pass


class Record(Base):
    __tablename__ = "records"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(20))
    secret: Mapped[str] = mapped_column(EncryptedType(sa.String(60)))
    bound: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(60), bind_scope=True, storage="text")
    )
    erased: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(60), if_destroyed="[erased]")
    )


def _key_scopes(engine: sa.Engine, registry: KeyRegistry) -> dict[int, str]:
    """Which scope's key each row's ``secret`` was written under."""
    raw = sa.Table("records", sa.MetaData(), autoload_with=engine)
    by_id = {k.id: k.scope for scope in _scopes(engine) for k in registry.status(scope).keys}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(raw.c.id, raw.c.secret)).all()
    return {row_id: by_id[fmt.key_id_of(bytes(value))] for row_id, value in rows}


def _scopes(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT DISTINCT scope FROM data_keys")).scalars())


def _record(id_: int, tenant: str) -> Record:
    return Record(
        id=id_,
        tenant=tenant,
        secret=f"{tenant} secret {id_}",
        bound=f"{tenant} bound",
        erased=f"{tenant} erasable",
    )


def test_interleaved_sessions_write_under_their_tenant(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    # SQLite has one writer at a time: scopes met inside a write transaction
    # must exist already (PostgreSQL creates them on first use, tested below).
    registry.create_scope("tenant-a", "tenant-b", "tenant-c", "tenant-d", "tenant-e")
    factory_a = sessionmaker(engine)
    set_session_scope(factory_a, "tenant-a")
    with factory_a() as a, Session(engine) as b:
        set_session_scope(b, "tenant-b")
        for i in range(6):  # alternate units of work (SQLite has one writer at a time)
            session, tenant = (a, "tenant-a") if i % 2 == 0 else (b, "tenant-b")
            session.add(_record(i, tenant))
            session.commit()
        with session_scope(b, "tenant-c"):  # one unit of work for another tenant
            b.add(_record(100, "tenant-c"))
            b.commit()
        b.add(_record(101, "tenant-b"))
        b.commit()
    with sqlalchemy_envelope.scope("tenant-d"), Session(engine) as d:
        d.add(_record(200, "tenant-d"))
        d.commit()
    with engine.begin() as conn:  # Core, per call
        conn.execute(
            sa.insert(Record.__table__),
            {"id": 300, "tenant": "tenant-e", "secret": "tenant-e secret 300"},
            execution_options={SCOPE_OPTION: "tenant-e"},
        )
    with Session(engine) as session:  # the registry's own scope
        session.add(_record(400, "default"))
        session.commit()

    written = _key_scopes(engine, registry)
    with Session(engine) as session:
        for record in session.scalars(sa.select(Record)):
            assert written[record.id] == record.tenant
            assert record.secret == f"{record.tenant} secret {record.id}"


def test_many_threads_many_tenants(db_url: str, engine: sa.Engine, registry: KeyRegistry) -> None:
    Base.metadata.create_all(engine)
    registry.create_scope(*(f"t{n}" for n in range(8)))
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(25):
                with sqlalchemy_envelope.scope(f"t{n}"), Session(engine) as session:
                    session.add(_record(n * 1000 + i, f"t{n}"))
                    session.commit()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    written = _key_scopes(engine, registry)
    assert len(written) == 200
    assert all(scope == f"t{row_id // 1000}" for row_id, scope in written.items())


def test_scope_bound_values_cannot_move_between_tenants(
    engine: sa.Engine, registry: KeyRegistry
) -> None:
    Base.metadata.create_all(engine)
    for id_, tenant in ((1, "acme"), (2, "globex")):
        with sqlalchemy_envelope.scope(tenant), Session(engine) as session:
            session.add(_record(id_, tenant))
            session.commit()
    raw = sa.Table("records", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:  # an attacker copies acme's values into globex's row
        acme = conn.execute(sa.select(raw.c.bound).where(raw.c.id == 1)).scalar_one()
        conn.execute(raw.update().where(raw.c.id == 2).values(bound=acme))
    with (
        sqlalchemy_envelope.scope("globex"),
        Session(engine) as session,
        pytest.raises(DecryptionError, match="another scope"),
    ):
        session.scalars(sa.select(Record.bound).where(Record.id == 2)).one()
    with sqlalchemy_envelope.scope("acme"), Session(engine) as session:
        assert session.scalars(sa.select(Record.bound).where(Record.id == 1)).one() == "acme bound"


def test_shredding_one_tenant_of_three(engine: sa.Engine, registry: KeyRegistry) -> None:
    Base.metadata.create_all(engine)
    for n, tenant in enumerate(("a", "b", "c")):
        with sqlalchemy_envelope.scope(tenant), Session(engine) as session:
            session.add_all(_record(n * 10 + i, tenant) for i in range(3))
            session.commit()
    registry.rotate(scope="b")
    with sqlalchemy_envelope.scope("b"), Session(engine) as session:
        session.add(_record(19, "b"))
        session.commit()

    assert registry.shred("b") == 3  # both of b's data key versions, and its index key
    with Session(engine) as session:
        for record in session.scalars(sa.select(Record).where(Record.tenant != "b")):
            assert record.secret.startswith(record.tenant)
        with pytest.raises(DestroyedKeyError, match="scope 'b'"):
            session.scalars(sa.select(Record.secret).where(Record.tenant == "b")).all()
        erased = session.scalars(sa.select(Record.erased).where(Record.tenant == "b")).all()
        assert erased == ["[erased]"] * 4
    assert registry.status("b").keys_by_state == {"destroyed": 2}
    assert registry.status("a").keys_by_state == {"active": 1}


def test_rotating_and_reencrypting_one_tenant(engine: sa.Engine, registry: KeyRegistry) -> None:
    Base.metadata.create_all(engine)
    for n, tenant in enumerate(("a", "b")):
        with sqlalchemy_envelope.scope(tenant), Session(engine) as session:
            session.add_all(_record(n * 10 + i, tenant) for i in range(5))
            session.commit()
    raw = sa.Table("records", sa.MetaData(), autoload_with=engine)

    def stored() -> dict[int, tuple[bytes, str]]:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(raw.c.id, raw.c.secret, raw.c.bound)).all()
        return {r[0]: (bytes(r[1]), r[2]) for r in rows}

    before = stored()
    registry.rotate(scope="a")
    report = registry.reencrypt(Record, scope="a")
    assert report.rows_updated == 5 and report.values_by_version == {1: 15}
    after = stored()
    assert all(after[i] == before[i] for i in range(10, 15))  # b untouched
    assert all(after[i] != before[i] for i in range(5))
    (secret,) = [c for c in registry.census(Record.secret, scope="a")]
    assert [(k.version, k.rows) for k in secret.keys] == [(2, 5)]
    with Session(engine) as session:
        assert {r.secret for r in session.scalars(sa.select(Record))} == {
            f"{t} secret {n * 10 + i}" for n, t in enumerate("ab") for i in range(5)
        }
        with sqlalchemy_envelope.scope("a"):
            assert session.scalars(sa.select(Record.bound).where(Record.id == 0)).one() == "a bound"


def test_five_thousand_scopes_with_a_bounded_cache(db_url: str, root_key: StaticRootKey) -> None:
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, root_key, max_cached_keys=300)
    registry.init()
    scopes = [f"tenant-{n}" for n in range(5000)]
    registry.create_scope(*scopes)
    context = fmt.given_context("t.c")
    sealed = [registry.envelope.encrypt_bytes(s.encode(), context.current, s) for s in scopes]
    assert registry.status().cached_keys <= 300
    assert [registry.envelope.decrypt_bytes(c, context) for c in sealed[::97]] == [
        s.encode() for s in scopes[::97]
    ]
    assert registry.status().cached_keys <= 300
    assert len({c[: fmt.HEADER_BYTES] for c in sealed}) == 5000  # one key per tenant
    registry.close()
    engine.dispose()


def test_scopes_are_created_on_first_use_inside_a_transaction(
    pg_url: str, root_key: StaticRootKey
) -> None:
    engine = sa.create_engine(pg_url)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for n in range(3):
            with session_scope(session, f"new-{n}"):
                session.add(_record(n, f"new-{n}"))
                session.flush()
        session.commit()
    assert _key_scopes(engine, registry) == {n: f"new-{n}" for n in range(3)}
    registry.close()
    engine.dispose()


def test_a_missing_scope_inside_a_sqlite_write_transaction_is_a_clear_error(
    tmp_path: object, root_key: StaticRootKey
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/locked.db")
    registry = KeyRegistry(engine, root_key)
    registry.init()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(_record(1, "default"))
        session.flush()  # this session now holds SQLite's write lock
        with (
            session_scope(session, "late"),
            pytest.raises(sqlalchemy_envelope.ConfigurationError, match="create_scope"),
        ):
            session.add(_record(2, "late"))
            session.flush()
    registry.close()
    engine.dispose()


def _write(engine: sa.Engine, id_: int, tenant: str, how: str) -> None:
    """Write one record for ``tenant``, through a Connection or a Session."""
    if how == "connection":
        with engine.begin() as conn:
            conn.execute(
                sa.insert(Record.__table__),
                {"id": id_, "tenant": tenant, "secret": f"{tenant} secret {id_}"},
                execution_options={SCOPE_OPTION: tenant},
            )
    else:
        with Session(engine) as session, session_scope(session, tenant):
            session.add(_record(id_, tenant))
            session.commit()


def test_a_shredded_tenant_stays_shredded(
    engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey, clocks: Clocks
) -> None:
    Base.metadata.create_all(engine)
    registry.create_scope("acme", "globex")
    # Another process (another engine on the same database) has acme's key cached.
    other_engine = sa.create_engine(engine.url)
    other = KeyRegistry(
        other_engine,
        root_key,
        max_encryptions=640,  # claims blocks of 10 encryptions
        cache_max_age=60,
        clock=clocks.monotonic,
    )
    _write(other_engine, 1, "acme", "connection")
    _write(engine, 2, "acme", "session")

    assert registry.shred("acme") == 2  # its data key and its index key
    # This process refuses at once; nothing creates a new key behind its back.
    for n, how in enumerate(["connection", "session"] * 2):
        with pytest.raises(ShreddedScopeError, match="create_scope"):
            _write(engine, 10 + n, "acme", how)
    with pytest.raises(ShreddedScopeError):
        registry.rotate("acme")
    with pytest.raises(ShreddedScopeError):
        KeyRegistry(engine, root_key, scope="acme", attach=False).init()
    assert registry.status("acme").keys_by_state == {"destroyed": 1}

    # The other process finds out at its next block claim, which the shredded
    # key no longer gets: at most one block (here 10) of writes after the shred.
    written = 0
    with pytest.raises(ShreddedScopeError):
        for n in range(other.policy.block + 1):
            _write(other_engine, 100 + n, "acme", "connection")
            written += 1
    assert written < other.policy.block
    for n, how in enumerate(["connection", "session"] * 2):
        with pytest.raises(ShreddedScopeError):
            _write(other_engine, 200 + n, "acme", how)
    assert registry.status("acme").keys_by_state == {"destroyed": 1}
    with Session(other_engine) as session:  # its cache no longer decrypts acme's values
        assert session.scalars(sa.select(Record.erased).where(Record.id == 2)).one() == "[erased]"
    _write(other_engine, 300, "globex", "session")  # other tenants are untouched

    # Re-created explicitly: a new version; the old values stay unreadable.
    (info,) = registry.create_scope("acme")
    assert info.version == 2
    for n, how in enumerate(["connection", "session"] * 2):
        _write(engine if n % 2 else other_engine, 400 + n, "acme", how)
    with Session(engine) as session:
        rows = session.scalars(sa.select(Record.id).where(Record.tenant == "acme")).all()
        new = session.scalars(
            sa.select(Record.secret).where(Record.id >= 400).order_by(Record.id)
        ).all()
        with pytest.raises(DestroyedKeyError):
            session.scalars(sa.select(Record.secret).where(Record.id == 1)).one()
    assert new == [f"acme secret {400 + n}" for n in range(4)]
    assert len(rows) == 2 + written + 4
    other.close()
    other_engine.dispose()


def test_a_cached_shredded_key_expires_with_the_cache(
    engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey, clocks: Clocks
) -> None:
    Base.metadata.create_all(engine)
    registry.create_scope("acme")
    other_engine = sa.create_engine(engine.url)
    other = KeyRegistry(other_engine, root_key, cache_max_age=60, clock=clocks.monotonic)
    _write(other_engine, 1, "acme", "connection")
    registry.shred("acme")
    clocks.advance(61)  # its next write re-reads the key: no more writes under it
    for n, how in enumerate(["connection", "session"] * 2):
        with pytest.raises(ShreddedScopeError):
            _write(other_engine, 10 + n, "acme", how)
    with Session(other_engine) as session, pytest.raises(DestroyedKeyError):
        session.scalars(sa.select(Record.secret).where(Record.id == 1)).one()
    other.close()
    other_engine.dispose()


_CACHED_TENANT_WRITER = """
import json, sys
import sqlalchemy as sa
from sqlalchemy_envelope import (
    SCOPE_OPTION, EncryptedType, KeyRegistry, ShreddedScopeError, StaticRootKey,
)

url, key = sys.argv[1], bytes.fromhex(sys.argv[2])
engine = sa.create_engine(url)
registry = KeyRegistry(engine, StaticRootKey(key), max_encryptions=640)
records = sa.Table(
    "records", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant", sa.String(20)), sa.Column("secret", EncryptedType(sa.String(60))),
)

def write(i):
    with engine.begin() as conn:
        conn.execute(records.insert(), {"id": i, "tenant": "acme", "secret": "late"},
                     execution_options={SCOPE_OPTION: "acme"})

write(1000)
print("cached", flush=True)
sys.stdin.readline()
written, error = 0, None
try:
    for i in range(1, 30):
        write(1000 + i)
        written += 1
except ShreddedScopeError as e:
    error = type(e).__name__
print(json.dumps({"written": written, "error": error}), flush=True)
"""


def test_another_process_stops_writing_for_a_shredded_tenant(server_url: str) -> None:
    raw = os.urandom(32)
    engine = sa.create_engine(server_url)
    registry = KeyRegistry(engine, StaticRootKey(raw))
    registry.init()
    Base.metadata.create_all(engine)
    registry.create_scope("acme")
    writer = subprocess.Popen(
        [sys.executable, "-c", _CACHED_TENANT_WRITER, server_url, raw.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    assert writer.stdout.readline().strip() == "cached"
    registry.shred("acme")
    writer.stdin.write("go\n")
    writer.stdin.flush()
    outcome = json.loads(writer.stdout.readline())
    assert writer.wait(60) == 0
    # Its cached key's claimed block (max_encryptions // 64 = 10) was the limit.
    assert outcome["error"] == "ShreddedScopeError" and outcome["written"] < 10
    with pytest.raises(ShreddedScopeError):
        _write(engine, 1, "acme", "session")
    assert registry.status("acme").keys_by_state == {"destroyed": 1}
    registry.close()
    engine.dispose()
