"""Index keys and tenants: a deterministic value reads back whichever
registry on the engine wrote it, a tenant's job leaves values under another
index scope's key alone, an index key is destroyed or disabled only on
purpose, and the registry's own scope, whose index key tenants used before
they had their own, is not shredded by accident."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from column_definitions_models import Base as CitizenBase
from column_definitions_models import Citizen
from conftest import Clocks
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_cli import ROOT, Cli

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    EXECUTION_OPTION,
    ConfigurationError,
    DecryptionError,
    DestroyedKeyError,
    EncryptedType,
    KeyDisabledError,
    KeyInUseError,
    KeyRegistry,
    KeyState,
    ShreddedScopeError,
    StaticRootKey,
    blind_index,
    set_session_scope,
)
from sqlalchemy_envelope.crypto import format as fmt

SSN = "123-45-6789"
SSN_2 = "987-65-4321"
EMAIL = "ada@analytical.example"
TESTS = str(Path(__file__).parent)
MODELS = "column_definitions_models"
INDEX = "~index:default"


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "index_scope_people"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(20), default="")
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))
    email: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100)))
    email_index: Mapped[str | None] = blind_index("email", normalize="casefold")


PEOPLE = Person.__table__
RAW = sa.Table(
    "index_scope_people",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("ssn", sa.LargeBinary),
)

Read = Callable[[sa.Select[Any]], list[Any]]


def _readers(engine: sa.Engine, *bound: sessionmaker[Session]) -> dict[str, Read]:
    """A Connection and a Session on ``engine``, and sessions of ``bound``
    sessionmakers (bound to a registry of their own)."""

    def connection(stmt: sa.Select[Any]) -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def session_of(factory: Callable[[], Session]) -> Read:
        def read(stmt: sa.Select[Any]) -> list[Any]:
            with factory() as session:
                return list(session.scalars(stmt))

        return read

    readers = {"connection": connection, "session": session_of(lambda: Session(engine))}
    for n, factory in enumerate(bound):
        readers[f"bound session {n}"] = session_of(factory)
    return readers


def _raw(engine: sa.Engine) -> dict[int, bytes]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(RAW.c.id, RAW.c.ssn)).all()
    return {key: bytes(value) for key, value in rows if value is not None}


def _write_raw(engine: sa.Engine, key: int, value: bytes) -> None:
    with engine.begin() as conn:
        conn.execute(RAW.update().where(RAW.c.id == key).values(ssn=value))


@pytest.fixture
def people(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


# -- deterministic values written through a tenant's registry ---------------


def test_deterministic_values_of_a_tenant_registry_read_back_everywhere(
    people: sa.Engine, db_url: str, root_key: StaticRootKey
) -> None:
    """README: reading needs no choice, the key id travels in the
    ciphertext. A value a tenant's registry wrote under its own index key
    reads back through that registry's sessions, the engine's registry, and
    a fresh registry in another process; a header naming another key than
    the value's own index key is refused as altered."""
    default = KeyRegistry(people, root_key)
    default.init()
    acme = KeyRegistry(people, root_key, scope="acme", attach=False)
    acme.init()
    AcmeSession = sessionmaker(people)
    acme.bind(AcmeSession)
    with AcmeSession() as session:
        session.add(Person(id=1, ssn=SSN))
        session.commit()
    with people.begin() as conn:
        conn.execute(
            PEOPLE.insert(), [{"id": 2, "ssn": SSN}], execution_options={EXECUTION_OPTION: acme}
        )
    (census,) = default.census(Person.ssn)
    assert {k.scope for k in census.keys} == {"~index:acme"}

    everything = sa.select(Person.ssn).order_by(Person.id)
    for name, read in _readers(people, AcmeSession).items():
        for _ in range(2):
            assert read(everything) == [SSN, SSN], name
    with AcmeSession() as session:
        for _ in range(2):
            found = session.scalars(
                sa.select(Person.id).where(Person.ssn == SSN).order_by(Person.id)
            )
            assert found.all() == [1, 2]

    fresh = sa.create_engine(db_url)  # another process: nothing cached, acme never bound
    reader = KeyRegistry(fresh, root_key)
    for name, read in _readers(fresh).items():
        for _ in range(2):
            assert read(everything) == [SSN, SSN], name

    stored = _raw(people)[1]
    body = stored[fmt.HEADER_BYTES :]
    acme_data_key = default.status("acme").active_key_id
    default_index_key = default.status(INDEX).active_key_id
    assert acme_data_key is not None and default_index_key is not None
    for other_key in (acme_data_key, default_index_key):
        _write_raw(people, 1, fmt.header(other_key, fmt.DETERMINISTIC_VERSION) + body)
        for engine in (people, fresh):
            for name, read in _readers(engine).items():
                for _ in range(2):
                    with pytest.raises(DecryptionError, match="altered") as altered:
                        read(sa.select(Person.ssn).where(Person.id == 1))
                    assert SSN not in str(altered.value), name
    reader.close()
    fresh.dispose()
    acme.close()
    default.close()


# -- a tenant's jobs and deterministic values of other index scopes -----------


def test_a_tenant_job_moves_only_the_tenant_s_values(
    people: sa.Engine, db_url: str, root_key: StaticRootKey
) -> None:
    """A job for one tenant (what ``--scope acme`` runs: a registry of scope
    "acme"; or the application's registry with scope="acme") re-encrypts the
    tenant's randomized values and leaves its deterministic values, under
    its own index key, as they are; every other scope's values, deterministic
    ones under their own scope's index key included, are counted as other
    scopes' and never moved between index scopes."""
    app = KeyRegistry(people, root_key)
    app.init()
    app.create_scope("acme", "globex")
    for n, tenant in ((1, "acme"), (2, "acme"), (3, "acme"), (4, "globex"), (5, "")):
        with Session(people) as session:
            if tenant:
                set_session_scope(session, tenant)
            session.add(Person(id=n, tenant=tenant, ssn=SSN, email=EMAIL))
            session.commit()
    shared = _raw(people)
    assert len(set(shared.values())) == 3  # one deterministic ciphertext per scope
    job_engine = sa.create_engine(db_url)
    job = KeyRegistry(job_engine, root_key, scope="acme")
    job.rotate()

    def reencrypt(registry: KeyRegistry, scope: str | None = "acme") -> tuple[Any, ...]:
        report = registry.reencrypt(Person.ssn, Person.email, scope=scope)
        return report.left_behind, report.other_scopes, report.values_by_version

    assert reencrypt(job) == (0, 4, {1: 3})
    for _ in range(2):
        assert reencrypt(job) == (0, 4, {})
        assert reencrypt(app) == (0, 4, {})
        assert reencrypt(app, None) == (0, 8, {})
    assert _raw(people) == shared

    found = sa.select(Person.id).where(Person.ssn == SSN).order_by(Person.id)
    for name, read in _readers(people).items():
        for _ in range(2):
            assert read(sa.select(Person.email).order_by(Person.id)) == [EMAIL] * 5, name
            assert read(found) == [5], name
            for tenant, rows in (("acme", [1, 2, 3]), ("globex", [4])):
                with sqlalchemy_envelope.scope(tenant):
                    assert read(found) == rows, (name, tenant)
    job.close()
    job_engine.dispose()
    app.close()


def test_a_tenant_job_on_the_command_line(db_url: str, tmp_path: Path) -> None:
    """``--scope acme reencrypt`` on a table with deterministic columns,
    before and after ``--scope acme init``: done, nothing left behind, the
    deterministic values of the tenant's rows (under its own index key) and
    every value of the registry's own scope's row untouched."""
    cli = Cli(db_url, tmp_path)
    engine = sa.create_engine(db_url)
    app = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    app.init()
    app.create_scope("acme")
    CitizenBase.metadata.create_all(engine, tables=[Citizen.__table__])
    with sqlalchemy_envelope.scope("acme"), Session(engine) as session:
        session.add_all(
            Citizen(id=i, ssn=f"000-00-000{i}", badge=f"B-{i}", name=f"citizen {i}")
            for i in range(3)
        )
        session.commit()
    with Session(engine) as session:  # the registry's own scope
        session.add(Citizen(id=9, ssn="000-00-0009", badge="B-9", name="citizen 9"))
        session.commit()
    deterministic = sa.select(Citizen.__table__.c.ssn, Citizen.__table__.c.badge)
    with engine.connect() as conn:
        before = conn.execute(deterministic.order_by(Citizen.id)).all()
    job = ("--models", MODELS, "--scope", "acme", "reencrypt")
    columns = ("citizens.ssn", "citizens.badge", "citizens.name")

    cli("--scope", "acme", "rotate")
    moved = {"1": 3}
    for _ in range(2):
        report = cli.json(*job, *columns, PYTHONPATH=TESTS)
        assert (report["left_behind"], report["other_scopes"]) == (0, 3)
        assert report["values_by_version"] == moved
        moved = {}
    cli("--scope", "acme", "init")
    for _ in range(2):
        report = cli.json(*job, *columns, PYTHONPATH=TESTS)
        assert (report["left_behind"], report["other_scopes"]) == (0, 3)
    assert "values of other scopes left alone 3" in cli(*job, *columns, PYTHONPATH=TESTS)
    with engine.connect() as conn:
        assert conn.execute(deterministic.order_by(Citizen.id)).all() == before
    with sqlalchemy_envelope.scope("acme"), Session(engine) as session:
        for _ in range(2):
            found = session.scalars(sa.select(Citizen.name).where(Citizen.ssn == "000-00-0001"))
            assert found.all() == ["citizen 1"]
    app.close()
    engine.dispose()


# -- the destroy guard and index keys -----------------------------------------


def test_an_index_key_is_destroyed_or_disabled_only_on_purpose(
    people: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    """Blind-index digests carry no key id, so no census can show that an
    index key is no longer needed: destroying or disabling one takes
    force=True, with advice that can be followed. Disabled on purpose, it
    refuses what needs it until it is enabled again."""
    registry = KeyRegistry(
        people, root_key, cache_max_age=60, clock=clocks.monotonic, wall_clock=clocks.now
    )
    registry.init()
    with Session(people) as session:
        session.add(Person(id=1, email=EMAIL))
        session.commit()
    registry.rotate(scope=INDEX)  # version 2: what a re-keyed index would use
    clocks.advance(61)
    lookup = sa.select(Person.id).where(Person.email_index.matches(EMAIL.upper()))
    readers = _readers(people)

    def served() -> None:
        for read in readers.values():
            for _ in range(2):
                assert read(lookup) == [1]

    for columns in ((), (Person.email,)):
        for _ in range(2):
            with pytest.raises(KeyInUseError) as refused:
                registry.destroy(1, scope=INDEX, columns=columns)
            message = str(refused.value)
            assert "no census can tell" in message and "key_version=N" in message
            assert "re-encrypt" not in message and refused.value.rows == {}
    assert registry.maintenance(INDEX).destroyable == ()
    served()

    with Session(people) as session:
        session.add(Person(id=2, ssn=SSN))
        session.commit()
    with pytest.raises(KeyInUseError) as refused:
        registry.destroy(1, scope=INDEX)
    assert refused.value.rows == {"index_scope_people.ssn": 1}
    message = str(refused.value)
    assert "always use version 1" in message and "decrypt them in place" in message
    assert "re-encrypt them under the active key" not in message
    assert registry.maintenance(INDEX).still_referenced == {1: 1}

    for _ in range(2):
        with pytest.raises(KeyInUseError, match="cannot disable index key version 1"):
            registry.disable(1, scope=INDEX)
    served()
    assert registry.disable(1, scope=INDEX, force=True).state is KeyState.DISABLED
    assert registry.disable(1, scope=INDEX).state is KeyState.DISABLED  # repeated: allowed
    for read in readers.values():
        for stmt in (lookup, sa.select(Person.ssn).where(Person.id == 2)):
            for _ in range(2):
                with pytest.raises(KeyDisabledError):
                    read(stmt)
    with pytest.raises(KeyDisabledError), Session(people) as session:
        session.add(Person(id=3, email=EMAIL))
        session.commit()
    registry.enable(1, scope=INDEX)
    served()

    assert registry.destroy(1, scope=INDEX, force=True).state is KeyState.DESTROYED
    for read in readers.values():
        with pytest.raises(DestroyedKeyError):
            read(lookup)
    registry.close()


def test_index_keys_on_the_command_line(db_url: str, tmp_path: Path) -> None:
    cli = Cli(db_url, tmp_path, cache_max_age="1")
    cli("init")
    cli("--scope", INDEX, "rotate")
    for command in ("destroy", "disable"):
        for _ in range(2):
            cli("--scope", INDEX, command, "1", code=3)
            assert "digests carry no key id" in cli.outputs[-1]
    status = cli.json("--scope", INDEX, "status")
    assert [k["state"] for k in status["keys"]] == ["retired", "active"]  # type: ignore[index]
    assert cli.json("--scope", INDEX, "disable", "1", "--force")["state"] == "disabled"
    assert cli.json("--scope", INDEX, "destroy", "1", "--force")["state"] == "destroyed"


# -- shredding the registry's own scope ------------------------------------------


def test_shredding_the_registry_s_own_scope_while_tenants_live_is_asked_for(
    people: sa.Engine, root_key: StaticRootKey
) -> None:
    """Tenants written through one registry used its scope's index key
    before they had their own, and may still have values under it:
    shredding that scope while they live is refused, unless asked for. Then
    the tenants' own index keys, and their lookups, are untouched; the
    registry's own scope's are gone. An index scope is never shredded as a
    scope."""
    registry = KeyRegistry(people, root_key)
    registry.init()
    registry.create_scope("acme", "globex")
    for n, tenant in enumerate(("acme", "globex"), 1):
        with sqlalchemy_envelope.scope(tenant), Session(people) as session:
            session.add(Person(id=n, tenant=tenant, ssn=SSN, email=EMAIL))
            session.commit()
    with Session(people) as session:
        session.add(Person(id=3, tenant="", ssn=SSN, email=EMAIL))
        session.commit()
    readers = _readers(people)
    lookups = [
        sa.select(Person.id).where(Person.ssn == SSN),
        sa.select(Person.id).where(Person.email_index.matches(EMAIL)),
    ]

    def tenants_served() -> None:
        for read in readers.values():
            for n, tenant in enumerate(("acme", "globex"), 1):
                with sqlalchemy_envelope.scope(tenant):
                    for stmt in lookups:
                        for _ in range(2):
                            assert read(stmt) == [n]
            assert read(sa.select(Person.email).where(Person.tenant == "globex")) == [EMAIL]

    def keys() -> list[tuple[Any, ...]]:
        with people.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT * FROM data_keys ORDER BY id"))]

    before = keys()
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="including_shared_index=True") as refused:
            registry.shred("default")
        assert "'acme'" in str(refused.value) and "'globex'" in str(refused.value)
        with pytest.raises(ConfigurationError, match="reserved"):
            registry.shred(INDEX, including_shared_index=True)
    assert keys() == before
    tenants_served()
    for read in readers.values():
        for stmt in lookups:
            assert read(stmt) == [3]

    assert registry.shred("default", including_shared_index=True) == 2
    tenants_served()
    for read in readers.values():
        for stmt in lookups:
            with pytest.raises((DestroyedKeyError, ShreddedScopeError)):
                read(stmt)
    registry.close()


def test_a_tenant_then_the_registry_s_own_scope_alone_are_shredded(
    people: sa.Engine, root_key: StaticRootKey
) -> None:
    registry = KeyRegistry(people, root_key)
    registry.init()
    registry.create_scope("acme")
    assert registry.shred("acme") == 2  # a tenant: its data key and its index key
    assert registry.shred("default") == 2  # alone now: its data key and index key
    registry.close()


def test_shredding_the_registry_s_own_scope_on_the_command_line(
    db_url: str, tmp_path: Path
) -> None:
    cli = Cli(db_url, tmp_path)
    cli("init")
    cli("create-scope", "acme")
    for _ in range(2):
        cli("shred", "default", "--yes", code=2)
        assert "--including-shared-index" in cli.outputs[-1]
    command = [sys.executable, "-m", "sqlalchemy_envelope", "shred", "default"]
    result = subprocess.run(
        [*command, "--including-shared-index"],
        env=cli.env,
        input="n\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 7, result.stderr  # declined: nothing was done
    assert "of tenants not yet moved to their own index keys" in result.stderr
    assert cli.json("status")["active_version"] == 1
    shredded = cli.json("shred", "default", "--including-shared-index", "--yes")
    assert shredded == {"scope": "default", "destroyed": 2}
