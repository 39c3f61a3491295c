"""Crypto-shredding reaches every kind of key: after a shred or a destroy, no
process reads, compares, hashes or writes under a destroyed key, whether it is
a data key or the index key behind deterministic columns, blind indexes and
``hash_field``; this process at once, any other within ``cache_max_age``."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    SCOPE_OPTION,
    DestroyedKeyError,
    EncryptedType,
    KeyRegistry,
    ShreddedScopeError,
    StaticRootKey,
    blind_index,
    session_scope,
    set_session_scope,
)
from sqlalchemy_envelope.keys.wrapper import KeyWrapper

CACHE_MAX_AGE = 60
BYSTANDER = "globex"

EMAIL = "ada.lovelace@analytical.example"
SSN = "123-45-6789"
NOTE = "diagnosis: confidential"
EMAIL_2 = "charles.babbage@difference.example"
SSN_2 = "987-65-4321"
BYSTANDER_EMAIL = "grace.hopper@compiler.example"
BYSTANDER_SSN = "555-12-3434"
BYSTANDER_NOTE = "globex: confidential too"
FIELD = b"newsletter subscriber 4242"
FIELD_CONTEXT = "newsletter.email"
PLAINTEXTS = [
    EMAIL,
    SSN,
    NOTE,
    EMAIL_2,
    SSN_2,
    BYSTANDER_EMAIL,
    BYSTANDER_SSN,
    BYSTANDER_NOTE,
    FIELD.decode(),
]

# A refusal of what needs a shredded scope's keys: the value's key was
# destroyed, or the scope was shredded.
REFUSED: tuple[type[Exception], ...] = (DestroyedKeyError, ShreddedScopeError)
DESTROYED: tuple[type[Exception], ...] = (DestroyedKeyError,)


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "people"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(20))
    email: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100)))
    email_index: Mapped[str | None] = blind_index("email", normalize=["strip", "casefold"])
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))
    note: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(100), bind_scope=True, storage="text")
    )


class Contact(Base):
    """Blind indexes under two versions of the index key (a re-keyed index)."""

    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100)))
    email_index: Mapped[str | None] = blind_index("email", normalize="casefold")
    email_index_v2: Mapped[str | None] = blind_index("email", normalize="casefold", key_version=2)
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))


_new_ids = itertools.count(1000)


class _Process:
    """A process of the application: an engine of its own on the database,
    served by a registry of ``scope`` that reads the test's monotonic clock."""

    def __init__(self, url: str, root_key: StaticRootKey, clocks: Clocks, scope: str) -> None:
        self.engine = sa.create_engine(url)
        self.registry = KeyRegistry(
            self.engine,
            root_key,
            scope=scope,
            cache_max_age=CACHE_MAX_AGE,
            clock=clocks.monotonic,
        )
        self.registry.init()

    def close(self) -> None:
        self.registry.close()
        self.engine.dispose()


@contextmanager
def _processes(
    url: str, root_key: StaticRootKey, clocks: Clocks, *scopes: str
) -> Iterator[list[_Process]]:
    with ExitStack() as stack:
        processes = []
        for scope in scopes:
            process = _Process(url, root_key, clocks, scope)
            stack.callback(process.close)
            processes.append(process)
        Base.metadata.create_all(processes[0].engine)
        yield processes


FORMS = ("connection", "session")


def _scalars(engine: sa.Engine, form: str, stmt: sa.Select[Any]) -> list[Any]:
    if form == "connection":
        with engine.connect() as conn:
            return list(conn.execute(stmt).scalars())
    with Session(engine) as session:
        return list(session.scalars(stmt))


def _insert(
    engine: sa.Engine,
    form: str,
    model: type[Base],
    row: dict[str, Any],
    scope: str | None = None,
) -> None:
    """Insert one row through a Connection (Core) or a Session (unit of
    work), for ``scope`` (a tenant) if given."""
    if form == "connection":
        options = {} if scope is None else {SCOPE_OPTION: scope}
        with engine.begin() as conn:
            conn.execute(sa.insert(model.__table__), [row], execution_options=options)
        return
    with Session(engine) as session:
        if scope is not None:
            set_session_scope(session, scope)
        session.add(model(**row))
        session.commit()


def _forms(secret: bytes) -> list[str]:
    return [secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]]


def _secrets(engine: sa.Engine, raw_root_key: bytes, *scopes: str) -> list[str]:
    """The plaintexts, the root key and the unwrapped keys of ``scopes``, in
    the forms an error could show them."""
    data_keys = sa.Table("data_keys", sa.MetaData(), autoload_with=engine)
    root_key = StaticRootKey(raw_root_key)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                data_keys.c.id, data_keys.c.scope, data_keys.c.version, data_keys.c.wrapped_key
            ).where(data_keys.c.scope.in_(scopes), data_keys.c.wrapped_key.is_not(None))
        ).all()
    keys = [
        root_key.unwrap(bytes(wrapped), KeyWrapper.context(key_id, scope, version))
        for key_id, scope, version, wrapped in rows
    ]
    assert len(keys) >= len(scopes)
    return [*PLAINTEXTS, *_forms(raw_root_key), *(form for key in keys for form in _forms(key))]


def _assert_nothing_secret(error: BaseException, secrets: Sequence[str]) -> None:
    texts = ["".join(traceback.format_exception(error))]
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        texts += [str(link), repr(link), *map(str, link.args)]
        link = link.__cause__ or link.__context__
    leaked = [n for n, secret in enumerate(secrets) if any(secret in text for text in texts)]
    assert leaked == [], f"{type(error).__name__} shows secrets number {leaked}"


Check = tuple[tuple[type[Exception], ...], Callable[[str], Any]]


def _outcome(check: Check, form: str, secrets: Sequence[str]) -> str:
    """Whether the check was refused with its error (which must show no
    secret), served, or failed with another error."""
    refusals, action = check
    refusal: BaseException | None = None
    try:
        action(form)
    except refusals as error:
        refusal = error
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    if refusal is None:
        return "served"
    _assert_nothing_secret(refusal, secrets)
    return "refused"


def _assert_refused(checks: dict[str, Check], secrets: Sequence[str]) -> None:
    """Each check, run twice through a Connection and twice through a
    Session, is refused every time with its error, which shows no secret."""
    wrong: dict[str, Any] = {}
    for name, check in checks.items():
        runs = [f"{form}: {_outcome(check, form, secrets)}" for form in FORMS for _ in range(2)]
        outcomes = {run.partition(": ")[2] for run in runs}
        if outcomes != {"refused"}:
            wrong[name] = outcomes.pop() if len(outcomes) == 1 else runs
    assert not wrong, "not refused: " + json.dumps(wrong, indent=1)


def _scope_checks(process: _Process, tenant: str) -> dict[str, Check]:
    """Everything that needs the keys of the process's own scope, whose rows
    are ``tenant``'s: reading, equality lookups, hash_field and writes."""
    engine = process.engine
    mine = Person.tenant == tenant

    def read(column: Any) -> Check:
        return DESTROYED, lambda form: _scalars(engine, form, sa.select(column).where(mine))

    def lookup(where: Any) -> Check:
        query = sa.select(Person.id).where(where).order_by(Person.id)
        return REFUSED, lambda form: _scalars(engine, form, query)

    def insert(row: dict[str, Any], scope: str | None = None) -> Check:
        return REFUSED, lambda form: _insert(
            engine, form, Person, {"id": next(_new_ids), "tenant": "late", **row}, scope
        )

    return {
        "read ssn (deterministic)": read(Person.ssn),
        "read email (randomized)": read(Person.email),
        "read note (bind_scope)": read(Person.note),
        "ssn == value": lookup(Person.ssn == SSN),
        "ssn IN values": lookup(Person.ssn.in_([SSN, "000-00-0000"])),
        "email_index.matches(value)": lookup(Person.email_index.matches(f" {EMAIL.upper()} ")),
        "email_index == value": lookup(Person.email_index == EMAIL),
        "hash_field": (REFUSED, lambda form: process.registry.hash_field(FIELD, FIELD_CONTEXT)),
        "insert ssn": insert({"ssn": SSN_2}),
    }


def _fill(process: _Process, tenant: str, email: str, ssn: str, note: str, ids: range) -> None:
    for n, form in zip(ids, itertools.cycle(FORMS), strict=False):
        row = {"id": n, "tenant": tenant, "email": email, "ssn": ssn, "note": note}
        _insert(process.engine, form, Person, row)


def _assert_served(checks: dict[str, Check], expected: dict[str, Any]) -> None:
    """Run each check twice through a Connection and twice through a
    Session: each works, with the ``expected`` result where one is given."""
    for name, (_, action) in checks.items():
        for form in FORMS:
            for _ in range(2):
                result = action(form)
                if name in expected:
                    assert result == expected[name], (name, form)


def _use(process: _Process, tenant: str) -> str:
    """Use every check of ``_scope_checks`` while the keys are alive, so that
    this process caches them; the hash_field digest."""
    digest = process.registry.hash_field(FIELD, FIELD_CONTEXT)
    expected = {
        "read ssn (deterministic)": [SSN, SSN],
        "read email (randomized)": [EMAIL, EMAIL],
        "read note (bind_scope)": [NOTE, NOTE],
        "ssn == value": [1, 2],
        "ssn IN values": [1, 2],
        "email_index.matches(value)": [1, 2],
        "email_index == value": [1, 2],
        "hash_field": digest,
    }
    _assert_served(_scope_checks(process, tenant), expected)
    return digest


def _assert_bystander_served(bystander: _Process, digest: str) -> None:
    """The other tenant's registry reads, finds, hashes and writes as before."""
    engine = bystander.engine
    row = sa.select(Person.email, Person.ssn, Person.note).where(Person.tenant == BYSTANDER)
    for form in FORMS:
        for _ in range(2):
            assert _rows(engine, form, row) == [(BYSTANDER_EMAIL, BYSTANDER_SSN, BYSTANDER_NOTE)]
            found = sa.select(Person.id).where(Person.ssn == BYSTANDER_SSN)
            assert _scalars(engine, form, found) == [100]
            found = sa.select(Person.id).where(Person.email_index.matches(BYSTANDER_EMAIL))
            assert _scalars(engine, form, found) == [100]
            assert bystander.registry.hash_field(FIELD, FIELD_CONTEXT) == digest
            n = next(_new_ids)
            values = {"id": n, "tenant": "late", "email": EMAIL_2, "ssn": SSN_2, "note": NOTE}
            _insert(engine, form, Person, values)
            written = sa.select(Person.email, Person.ssn, Person.note).where(Person.id == n)
            assert _rows(engine, form, written) == [(EMAIL_2, SSN_2, NOTE)]


@contextmanager
def _shredding_world(
    db_url: str, clocks: Clocks, scope: str
) -> Iterator[tuple[_Process, _Process, _Process, list[str], str]]:
    """This process and another one, each with its own registry of ``scope``,
    and a bystander tenant's; rows of both tenants, every key in use in both
    processes. Yields the processes, the secrets, and the bystander's
    hash_field digest."""
    raw = os.urandom(32)
    root_key = StaticRootKey(raw)
    with _processes(db_url, root_key, clocks, scope, scope, BYSTANDER) as processes:
        app, other, bystander = processes
        _fill(app, scope, EMAIL, SSN, NOTE, range(1, 3))
        _fill(bystander, BYSTANDER, BYSTANDER_EMAIL, BYSTANDER_SSN, BYSTANDER_NOTE, range(100, 101))
        digest = _use(app, scope)
        assert _use(other, scope) == digest
        bystander_digest = bystander.registry.hash_field(FIELD, FIELD_CONTEXT)
        assert bystander_digest != digest  # its own index key
        secrets = _secrets(app.engine, raw, scope, app.registry.index_scope)
        yield app, other, bystander, secrets, bystander_digest


SCOPES = pytest.mark.parametrize("scope", ["default", "acme"])


@SCOPES
def test_after_a_shred_this_process_serves_nothing_of_the_scope(
    db_url: str, clocks: Clocks, scope: str
) -> None:
    """The registry's own scope, "default" or a tenant's registry: its data
    keys and its index key go at once in the process that shreds (the
    bystander, whose registry has an index key of its own, still has keys:
    destroying the shredding registry's index key is said on purpose)."""
    with _shredding_world(db_url, clocks, scope) as world:
        app, _, bystander, secrets, bystander_digest = world
        app.registry.shred(scope, including_shared_index=True)
        checks = _scope_checks(app, scope)
        _assert_refused(checks, secrets)
        _assert_bystander_served(bystander, bystander_digest)


@SCOPES
def test_after_a_shred_another_process_stops_serving_the_scope_past_cache_max_age(
    db_url: str, clocks: Clocks, scope: str
) -> None:
    """A process that used every key of the scope before the shred may go on
    within cache_max_age, and no longer."""
    with _shredding_world(db_url, clocks, scope) as world:
        app, other, bystander, secrets, bystander_digest = world
        app.registry.shred(scope, including_shared_index=True)
        clocks.advance(CACHE_MAX_AGE + 1)
        checks = _scope_checks(other, scope)
        _assert_refused(checks, secrets)
        _assert_bystander_served(bystander, bystander_digest)


def test_shredding_a_tenant_leaves_the_other_tenants_and_the_registry_s_own_scope(
    db_url: str, clocks: Clocks
) -> None:
    """Tenants chosen per block or per session, under one registry: each
    has its own index key, behind its deterministic columns and blind
    indexes. Shredding one tenant makes its values unreadable and its
    lookups refused, and leaves the other tenant and the registry's own
    scope (its hash_field) as they were."""
    raw = os.urandom(32)
    with _processes(db_url, StaticRootKey(raw), clocks, "default", "default") as (app, other):
        app.registry.create_scope("acme", BYSTANDER)
        with sqlalchemy_envelope.scope("acme"):
            _insert(app.engine, "session", Person, _tenant_row(1, "acme"))
        with Session(app.engine) as session, session_scope(session, BYSTANDER):
            session.add(Person(**_tenant_row(2, BYSTANDER)))
            session.commit()
        digest = app.registry.hash_field(FIELD, FIELD_CONTEXT)
        secrets = _secrets(app.engine, raw, "acme")
        for process in (app, other):
            assert _read_tenant(process, "acme") == (EMAIL, NOTE)
            _assert_tenant_served(process, digest)

        app.registry.shred("acme")
        _assert_acme_refused(app, secrets)
        _assert_tenant_served(app, digest)
        clocks.advance(CACHE_MAX_AGE + 1)
        for process in (other, app):
            _assert_acme_refused(process, secrets)
            _assert_tenant_served(process, digest)


def _tenant_row(id_: int, tenant: str) -> dict[str, Any]:
    values = (
        (EMAIL, SSN, NOTE) if tenant == "acme" else (BYSTANDER_EMAIL, BYSTANDER_SSN, BYSTANDER_NOTE)
    )
    return {"id": id_, "tenant": tenant, **dict(zip(("email", "ssn", "note"), values, strict=True))}


def _read_tenant(process: _Process, tenant: str, form: str = "session") -> tuple[Any, ...]:
    query = sa.select(Person.email, Person.note).where(Person.tenant == tenant)
    with sqlalchemy_envelope.scope(tenant):
        (row,) = _rows(process.engine, form, query)
    return row


def _rows(engine: sa.Engine, form: str, query: sa.Select[Any]) -> list[Any]:
    if form == "connection":
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]
    with Session(engine) as session:
        return [tuple(row) for row in session.execute(query)]


def _assert_acme_refused(process: _Process, secrets: Sequence[str]) -> None:
    def write(form: str) -> None:
        row = {"id": next(_new_ids), "tenant": "acme", "email": EMAIL_2, "note": NOTE}
        _insert(process.engine, form, Person, row, "acme")

    def lookup(form: str) -> list[Any]:
        with sqlalchemy_envelope.scope("acme"):
            return _scalars(process.engine, form, sa.select(Person.id).where(Person.ssn == SSN))

    checks: dict[str, Check] = {
        "read acme": (DESTROYED, lambda form: _read_tenant(process, "acme", form)),
        "write for acme": ((ShreddedScopeError,), write),
        "find acme's rows": (REFUSED, lookup),
    }
    _assert_refused(checks, secrets)


def _assert_tenant_served(process: _Process, digest: str) -> None:
    engine = process.engine
    for form in FORMS:
        for _ in range(2):
            assert _read_tenant(process, BYSTANDER, form) == (BYSTANDER_EMAIL, BYSTANDER_NOTE)
            with sqlalchemy_envelope.scope(BYSTANDER):
                found = sa.select(Person.id).where(Person.ssn == BYSTANDER_SSN)
                assert _scalars(engine, form, found) == [2]
                found = sa.select(Person.id).where(Person.email_index.matches(BYSTANDER_EMAIL))
                assert _scalars(engine, form, found) == [2]
            assert process.registry.hash_field(FIELD, FIELD_CONTEXT) == digest
            n = next(_new_ids)
            row = {"id": n, "tenant": "late", "email": EMAIL_2, "ssn": SSN_2, "note": NOTE}
            _insert(engine, form, Person, row, BYSTANDER)
            query = sa.select(Person.email, Person.ssn, Person.note).where(Person.id == n)
            with sqlalchemy_envelope.scope(BYSTANDER), Session(engine) as session:
                assert session.execute(query).one() == (EMAIL_2, SSN_2, NOTE)


def test_a_destroyed_data_key_is_unreadable_here_at_once_and_elsewhere_past_cache_max_age(
    db_url: str, clocks: Clocks
) -> None:
    """Retire the active key (which rotates), destroy it with force: the
    values under it are gone, everything else works."""
    raw = os.urandom(32)
    with _processes(db_url, StaticRootKey(raw), clocks, "default", "default") as (app, other):
        _fill(app, "v1", EMAIL, SSN, NOTE, range(1, 3))
        secrets = _secrets(app.engine, raw, "default")
        app.registry.retire(1)  # rotates: version 2 is active
        _fill(app, "v2", EMAIL_2, SSN_2, NOTE, range(3, 5))
        for process in (app, other):
            _assert_served(_v1_reads(process), {"read email": [EMAIL] * 2, "read note": [NOTE] * 2})

        app.registry.destroy(1, force=True)
        _assert_refused(_v1_reads(app), secrets)
        clocks.advance(CACHE_MAX_AGE + 1)
        for process in (other, app):
            _assert_refused(_v1_reads(process), secrets)
            _assert_version_2_served(process)


def _v1_reads(process: _Process) -> dict[str, Check]:
    """Reading the values written under data key version 1."""
    v1 = Person.tenant == "v1"
    email = sa.select(Person.email).where(v1).order_by(Person.id)
    note = sa.select(Person.note).where(v1).order_by(Person.id)
    return {
        "read email": (DESTROYED, lambda form: _scalars(process.engine, form, email)),
        "read note": (DESTROYED, lambda form: _scalars(process.engine, form, note)),
    }


def _assert_version_2_served(process: _Process) -> None:
    """Values under the active key, deterministic columns and blind indexes
    (under the index key, which no data key's destruction touches) work."""
    engine = process.engine
    for form in FORMS:
        for _ in range(2):
            query = sa.select(Person.email).where(Person.tenant == "v2")
            assert _scalars(engine, form, query) == [EMAIL_2] * 2
            found = sa.select(Person.id).where(Person.ssn == SSN).order_by(Person.id)
            assert _scalars(engine, form, found) == [1, 2]
            found = sa.select(Person.id).where(Person.email_index.matches(EMAIL_2))
            assert _scalars(engine, form, found.order_by(Person.id)) == [3, 4]
            n = next(_new_ids)
            _insert(engine, form, Person, {"id": n, "tenant": "late", "email": EMAIL, "note": NOTE})
            written = sa.select(Person.email, Person.note).where(Person.id == n)
            assert _rows(engine, form, written) == [(EMAIL, NOTE)]


def test_a_destroyed_index_key_is_unusable_here_at_once_and_elsewhere_past_cache_max_age(
    db_url: str, clocks: Clocks
) -> None:
    """Re-keying an index (README): rotate the index scope, move lookups to
    an index of ``key_version=2``, destroy version 1. What needs version 1
    (deterministic columns, the first index, hash_field) is refused; what
    needs version 2 works."""
    raw = os.urandom(32)
    with _processes(db_url, StaticRootKey(raw), clocks, "default", "default") as (app, other):
        app.registry.rotate(scope="~index:default")
        for n, form in ((1, "connection"), (2, "session")):
            _insert(app.engine, form, Contact, {"id": n, "email": EMAIL, "ssn": SSN})
        secrets = _secrets(app.engine, raw, "default", "~index:default")
        digests = {v: app.registry.hash_field(FIELD, FIELD_CONTEXT, version=v) for v in (1, 2)}
        expected = {
            "read ssn": [SSN, SSN],
            "ssn == value": [1, 2],
            "email_index.matches(value)": [1, 2],
            "hash_field version 1": digests[1],
        }
        for process in (app, other):
            _assert_served(_index_v1_checks(process), expected)

        app.registry.destroy(1, scope="~index:default", force=True)
        checks = _index_v1_checks(app)
        _assert_refused(checks, secrets)
        _assert_index_v2_served(app, digests[2])
        clocks.advance(CACHE_MAX_AGE + 1)
        for process in (other, app):
            checks = _index_v1_checks(process)
            _assert_refused(checks, secrets)
            _assert_index_v2_served(process, digests[2])


def _index_v1_checks(process: _Process) -> dict[str, Check]:
    """Everything that needs version 1 of the index key."""
    engine = process.engine

    def query(stmt: sa.Select[Any]) -> Check:
        stmt = stmt.where(Contact.id.in_([1, 2])).order_by(Contact.id)
        return DESTROYED, lambda form: _scalars(engine, form, stmt)

    def insert(row: dict[str, Any]) -> Check:
        return DESTROYED, lambda form: _insert(engine, form, Contact, {"id": next(_new_ids), **row})

    return {
        "read ssn": query(sa.select(Contact.ssn)),
        "ssn == value": query(sa.select(Contact.id).where(Contact.ssn == SSN)),
        "email_index.matches(value)": query(
            sa.select(Contact.id).where(Contact.email_index.matches(EMAIL.upper()))
        ),
        "hash_field version 1": (
            DESTROYED,
            lambda form: process.registry.hash_field(FIELD, FIELD_CONTEXT, version=1),
        ),
        "insert ssn": insert({"ssn": SSN_2}),
        "insert email (indexed by version 1)": insert({"email": EMAIL_2}),
    }


def _assert_index_v2_served(process: _Process, digest: str) -> None:
    engine = process.engine
    for form in FORMS:
        for _ in range(2):
            found = sa.select(Contact.id).where(Contact.email_index_v2.matches(EMAIL.upper()))
            assert _scalars(engine, form, found.order_by(Contact.id)) == [1, 2]
            query = sa.select(Contact.email).where(Contact.id.in_([1, 2]))
            assert _scalars(engine, form, query) == [EMAIL, EMAIL]
            assert process.registry.hash_field(FIELD, FIELD_CONTEXT, version=2) == digest


_OTHER_PROCESS = """
import json, sys
import sqlalchemy as sa
from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey, blind_index_column

url, key, max_age = sys.argv[1], bytes.fromhex(sys.argv[2]), float(sys.argv[5])
now = [1000.0]  # its monotonic clock, moved by the test through stdin
engine = sa.create_engine(url)
registry = KeyRegistry(engine, StaticRootKey(key), cache_max_age=max_age, clock=lambda: now[0])
people = sa.Table(
    "people", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant", sa.String(20)),
    sa.Column("email", EncryptedType(sa.String(100))),
    blind_index_column("email_index", "email", normalize=["strip", "casefold"]),
    sa.Column("ssn", EncryptedType(sa.String(11), deterministic=True)),
)
ids = iter(range(5000, 6000))

def query(stmt):
    with engine.connect() as conn:
        return conn.execute(stmt).scalars().all()

def insert(row):
    with engine.begin() as conn:
        conn.execute(people.insert(), [{"id": next(ids), "tenant": "late", **row}])

CHECKS = {
    "read ssn": lambda: query(sa.select(people.c.ssn).where(people.c.tenant == "default")),
    "ssn == value": lambda: query(sa.select(people.c.id).where(people.c.ssn == sys.argv[3])),
    "email_index.matches(value)": lambda: query(
        sa.select(people.c.id).where(people.c.email_index.matches(sys.argv[4]))
    ),
    "hash_field": lambda: registry.hash_field(b"field", "newsletter.email"),
    "insert ssn": lambda: insert({"ssn": sys.argv[3]}),
}

def run():
    outcomes = {}
    for name, check in CHECKS.items():
        seen = set()
        for _ in range(2):
            try:
                check()
                seen.add("served")
            except Exception as error:
                seen.add(type(error).__name__)
        outcomes[name] = " / ".join(sorted(seen))
    return outcomes

print(json.dumps(run()), flush=True)
for line in sys.stdin:
    now[0] += float(line)
    print(json.dumps(run()), flush=True)
"""


def test_after_a_shred_another_os_process_stops_serving_past_cache_max_age(
    db_url: str, clocks: Clocks
) -> None:
    """The same in a real second process, whose clock the test moves through
    its stdin rather than by waiting."""
    raw = os.urandom(32)
    with _processes(db_url, StaticRootKey(raw), clocks, "default") as (app,):
        _fill(app, "default", EMAIL, SSN, NOTE, range(1, 3))
        other = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _OTHER_PROCESS,
                db_url,
                raw.hex(),
                SSN,
                EMAIL,
                str(CACHE_MAX_AGE),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert other.stdin is not None and other.stdout is not None
        try:
            before = json.loads(other.stdout.readline())
            assert before == dict.fromkeys(before, "served") and len(before) == 5
            app.registry.shred("default")
            other.stdin.write(f"{CACHE_MAX_AGE + 1}\n")  # its clock moves past cache_max_age
            other.stdin.flush()
            after = json.loads(other.stdout.readline())
        finally:
            other.stdin.close()
            assert other.wait(60) == 0
    assert set(after) == set(before)
    refused = {"DestroyedKeyError", "ShreddedScopeError"}
    wrong = {
        name: outcome
        for name, outcome in after.items()
        if outcome not in ({"DestroyedKeyError"} if name == "read ssn" else refused)
    }
    assert not wrong, "not refused: " + json.dumps(wrong, indent=1)
