"""Tenant key scopes: per-tenant keys chosen by session, block or statement;
scope-bound values; shredding one tenant; per-tenant rotation; many tenants."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    SCOPE_OPTION,
    DecryptionError,
    DestroyedKeyError,
    EncryptedType,
    KeyRegistry,
    StaticRootKey,
    session_scope,
    set_session_scope,
)
from sqlalchemy_envelope import format as fmt


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

    assert registry.shred("b") == 2  # both of b's key versions
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
    sealed = [registry.encrypt_bytes(s.encode(), b"t.c", s) for s in scopes]
    assert len(registry._by_header) <= 300
    assert [registry.decrypt_bytes(c, b"t.c") for c in sealed[::97]] == [
        s.encode() for s in scopes[::97]
    ]
    assert len(registry._by_header) <= 300
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
