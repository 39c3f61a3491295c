"""Tenants share no key: each scope has its own index key, behind its
deterministic columns, blind indexes and ``hash_field``, so equal values of
two tenants look unrelated and shredding a tenant erases everything it
wrote; the library's own scopes (``~index:...``) and unprintable names are
never accepted as a tenant's, and an index key is never used as a data key
(nor the reverse)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from test_cli import Cli

import sqlalchemy_envelope
from sqlalchemy_envelope import (
    SCOPE_OPTION,
    ConfigurationError,
    DecryptionError,
    DestroyedKeyError,
    EncryptedType,
    KeyRegistry,
    ShreddedScopeError,
    StaticRootKey,
    blind_index,
    session_scope,
    set_session_scope,
)
from sqlalchemy_envelope.crypto import format as fmt
from sqlalchemy_envelope.crypto.primitives import AESGCM
from sqlalchemy_envelope.keys.wrapper import KeyWrapper

EMAIL = "ada.lovelace@analytical.example"
SSN = "123-45-6789"
BADGE = "B-1815"
ERASED = "[erased]"
FIELD = b"newsletter subscriber 4242"
FIELD_CONTEXT = "newsletter.email"
FORMS = ("connection", "session")
# What refuses a shredded tenant's keys: its index key is destroyed, or the
# scope was shredded (when nothing of it is cached).
REFUSED = (DestroyedKeyError, ShreddedScopeError)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "isolation_patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(20))
    email: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100)))
    email_index: Mapped[str | None] = blind_index("email", normalize="casefold")
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))
    badge: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(20), deterministic=True, if_destroyed=ERASED)
    )


PATIENTS = Patient.__table__
RAW = sa.Table(
    "isolation_patients",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant", sa.String(20)),
    sa.Column("email", sa.LargeBinary),
    sa.Column("email_index", sa.String(64)),
    sa.Column("ssn", sa.LargeBinary),
)
DATA_KEYS = sa.Table(
    "data_keys",
    sa.MetaData(),
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("scope", sa.String(255)),
    sa.Column("version", sa.Integer),
    sa.Column("state", sa.String(20)),
    sa.Column("wrapped_key", sa.LargeBinary),
)


@pytest.fixture
def patients(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _scalars(engine: sa.Engine, form: str, stmt: Any, scope: str | None = None) -> list[Any]:
    """Run a query through a Connection (the scope as an execution option)
    or a Session (the scope set on it)."""
    if form == "connection":
        options = {} if scope is None else {SCOPE_OPTION: scope}
        with engine.connect() as conn:
            return list(conn.execute(stmt, execution_options=options).scalars())
    with Session(engine) as session:
        if scope is not None:
            set_session_scope(session, scope)
        return list(session.scalars(stmt))


def _insert(engine: sa.Engine, form: str, row: dict[str, Any], scope: str | None) -> None:
    if form == "connection":
        options = {} if scope is None else {SCOPE_OPTION: scope}
        with engine.begin() as conn:
            conn.execute(PATIENTS.insert(), [row], execution_options=options)
        return
    with Session(engine) as session:
        if scope is None:
            session.add(Patient(**row))
        else:
            with session_scope(session, scope):
                session.add(Patient(**row))
                session.flush()
        session.commit()


def _fill(engine: sa.Engine, ids: Iterator[int], *tenants: str) -> dict[str, list[int]]:
    """Two rows per tenant and form (each statement executed twice), all
    holding the same values; the ids of each tenant's rows. Tenant "" is
    the registry's own scope."""
    written: dict[str, list[int]] = {}
    for tenant in tenants:
        for form in FORMS:
            for _ in range(2):
                n = next(ids)
                row = {"id": n, "tenant": tenant, "email": EMAIL, "ssn": SSN, "badge": BADGE}
                _insert(engine, form, row, tenant or None)
                written.setdefault(tenant, []).append(n)
    return written


def _raw(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(RAW).order_by(RAW.c.id)))


def _keys(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(DATA_KEYS).order_by(DATA_KEYS.c.id))]


LOOKUPS = {
    "ssn == value": Patient.ssn == SSN,
    "ssn IN values": Patient.ssn.in_([SSN, "000-00-0000"]),
    "badge == value": Patient.badge == BADGE,
    "email_index.matches(value)": Patient.email_index.matches(EMAIL.upper()),
    "email_index == value": Patient.email_index == EMAIL,
}


def _found(engine: sa.Engine, scope: str | None) -> dict[str, list[list[int]]]:
    """The rows each lookup finds under ``scope``, each run twice through a
    Connection and twice through a Session."""
    return {
        name: [
            _scalars(engine, form, sa.select(Patient.id).where(where).order_by(Patient.id), scope)
            for form in FORMS
            for _ in range(2)
        ]
        for name, where in LOOKUPS.items()
    }


# -- item 1: a tenant's own index key ---------------------------------------------


def test_equal_values_of_two_tenants_look_unrelated(
    patients: sa.Engine, root_key: StaticRootKey
) -> None:
    """Two tenants write the same values: their deterministic ciphertexts and
    blind-index digests differ (a dump links nothing), each tenant's lookup
    finds only its own rows, and hash_field differs per tenant."""
    app = KeyRegistry(patients, root_key)
    app.init()
    app.create_scope("acme", "globex")
    rows = _fill(patients, itertools.count(1), "acme", "globex")

    stored: dict[str, set[tuple[bytes, str]]] = {"acme": set(), "globex": set()}
    for row in _raw(patients):
        stored[row.tenant].add((bytes(row.ssn), row.email_index))
    assert len(stored["acme"]) == len(stored["globex"]) == 1  # deterministic within a tenant
    (acme_ssn, acme_digest), (globex_ssn, globex_digest) = (
        stored["acme"].pop(),
        stored["globex"].pop(),
    )
    assert acme_ssn != globex_ssn and acme_ssn[fmt.HEADER_BYTES :] != globex_ssn[fmt.HEADER_BYTES :]
    assert acme_digest != globex_digest

    for tenant in ("acme", "globex"):
        for name, runs in _found(patients, tenant).items():
            assert runs == [rows[tenant]] * 4, (tenant, name)
    for name, runs in _found(patients, None).items():
        assert runs == [[]] * 4, name  # the registry's own scope holds none of them

    digests = set()
    for tenant in ("acme", "globex"):
        with sqlalchemy_envelope.scope(tenant):
            digests.add(app.hash_field(FIELD, FIELD_CONTEXT))
        assert app.hash_field(FIELD, FIELD_CONTEXT, scope=tenant) in digests
    digests.add(app.hash_field(FIELD, FIELD_CONTEXT))
    assert len(digests) == 3
    app.close()


def test_a_shredded_tenant_leaves_nothing_readable_or_findable(
    patients: sa.Engine, db_url: str, root_key: StaticRootKey
) -> None:
    """After shred("acme"), a new process (a new engine and registry, nothing
    cached) reads none of acme's deterministic values (DestroyedKeyError, or
    the column's if_destroyed), finds none of its rows by any lookup under
    any scope, and hashes nothing for it; the other tenant is untouched."""
    app = KeyRegistry(patients, root_key)
    app.init()
    app.create_scope("acme", "globex")
    rows = _fill(patients, itertools.count(1), "acme", "globex")
    destroyed = app.shred("acme")
    app.close()

    fresh = sa.create_engine(db_url)
    reader = KeyRegistry(fresh, root_key)
    of = {tenant: Patient.tenant == tenant for tenant in rows}
    for form in FORMS:
        for _ in range(2):
            for column in (Patient.ssn, Patient.email):
                with pytest.raises(DestroyedKeyError):
                    _scalars(fresh, form, sa.select(column).where(of["acme"]))
            assert _scalars(fresh, form, sa.select(Patient.badge).where(of["acme"])) == [ERASED] * 4
            assert _scalars(fresh, form, sa.select(Patient.ssn).where(of["globex"])) == [SSN] * 4
    for where in LOOKUPS.values():
        for form in FORMS:
            for _ in range(2):
                with pytest.raises(REFUSED):
                    _scalars(fresh, form, sa.select(Patient.id).where(where), "acme")
    for scope in (None, "globex"):
        for name, runs in _found(fresh, scope).items():
            assert runs == [rows.get(scope or "", [])] * 4, (scope, name)
    for _ in range(2):
        with sqlalchemy_envelope.scope("acme"), pytest.raises(REFUSED):
            reader.hash_field(FIELD, FIELD_CONTEXT)
        with pytest.raises(REFUSED):
            reader.hash_field(FIELD, FIELD_CONTEXT, scope="acme")
    assert destroyed == 2  # its data key and its index key
    reader.close()
    fresh.dispose()


def test_a_tenant_brought_back_gets_a_new_index_key(
    patients: sa.Engine, root_key: StaticRootKey
) -> None:
    """create_scope() brings a shredded tenant back with a new data key and a
    new index key (version 1 again, its destroyed ones kept as tombstones
    below it): lookups and deterministic writes work, old values stay gone."""
    app = KeyRegistry(patients, root_key)
    app.init()
    app.create_scope("acme")
    old = _fill(patients, itertools.count(1), "acme")["acme"]
    app.shred("acme")
    app.create_scope("acme")
    new = _fill(patients, itertools.count(100), "acme")["acme"]
    for name, runs in _found(patients, "acme").items():
        assert runs == [new] * 4, name
    for form in FORMS:
        badges = _scalars(patients, form, sa.select(Patient.badge).order_by(Patient.id))
        assert badges == [ERASED] * len(old) + [BADGE] * len(new)
        with pytest.raises(DestroyedKeyError):
            _scalars(patients, form, sa.select(Patient.ssn).where(Patient.id == old[0]))
    index = app.status("~index:acme")
    assert [(k.version, k.state.value) for k in index.keys] == [(-1, "destroyed"), (1, "active")]
    app.shred("acme")
    app.create_scope("acme")
    index = app.status("~index:acme")
    versions = [(k.version, k.state.value) for k in index.keys]
    assert versions == [(-2, "destroyed"), (-1, "destroyed"), (1, "active")]
    app.close()


def test_a_tenant_s_index_key_is_rotated_and_rewrapped_with_it(
    patients: sa.Engine, root_key: StaticRootKey
) -> None:
    """A tenant's index key is created with its first data key (on first
    use too), rotated when asked (a second version for a re-keyed index),
    and re-wrapped with every other key."""
    app = KeyRegistry(patients, root_key)
    app.init()
    _insert(patients, "session", {"id": 1, "tenant": "initech", "ssn": SSN}, "initech")
    assert [k.version for k in app.status("~index:initech").keys] == [1]
    assert app.rotate(scope="~index:initech").version == 2
    new_root = StaticRootKey(os.urandom(32))
    rewrapped = app.rewrap(new_root)
    assert rewrapped == 5  # default: data and index key; initech: data key, two index keys
    reader = KeyRegistry(sa.create_engine(patients.url), new_root)
    for form in FORMS:
        assert _scalars(reader.engine, form, sa.select(Patient.ssn)) == [SSN]
        found = sa.select(Patient.id).where(Patient.ssn == SSN)
        assert _scalars(reader.engine, form, found, "initech") == [1]
    reader.close()
    reader.engine.dispose()
    app.close()


# -- moving values written before tenants had index keys of their own --------------


def _legacy_rows(engine: sa.Engine, ids: Iterator[int], tenant: str) -> list[int]:
    """Rows of ``tenant`` as earlier versions wrote them: the randomized
    value under the tenant's data key, the deterministic value and the blind
    index under the registry's own scope's index key, which every tenant
    shared."""
    written = []
    for form in FORMS:
        n, shared = next(ids), 10**6
        _insert(engine, form, {"id": n, "tenant": tenant, "email": EMAIL}, tenant)
        _insert(engine, form, {"id": shared, "tenant": "", "email": EMAIL, "ssn": SSN}, None)
        with engine.begin() as conn:
            ssn, digest = conn.execute(
                sa.select(RAW.c.ssn, RAW.c.email_index).where(RAW.c.id == shared)
            ).one()
            conn.execute(RAW.update().where(RAW.c.id == n).values(ssn=ssn, email_index=digest))
            conn.execute(RAW.delete().where(RAW.c.id == shared))
        written.append(n)
    return written


def test_values_written_under_the_shared_index_key_read_and_move_to_the_tenant_s(
    patients: sa.Engine, db_url: str, root_key: StaticRootKey
) -> None:
    """Values written before tenants had index keys of their own stay
    readable; the tenant's lookups do not find them until they are moved:
    deterministic columns by a tenant's reencrypt with a row filter, blind
    indexes by recomputing each row's digest under its own scope. Then a
    shred erases them too."""
    app = KeyRegistry(patients, root_key)
    app.init()
    app.create_scope("acme", "globex")
    ids = itertools.count(1)
    acme, globex = _legacy_rows(patients, ids, "acme"), _legacy_rows(patients, ids, "globex")
    mine = _fill(patients, ids, "")[""]  # the registry's own scope's rows, under its index key

    for form in FORMS:
        for _ in range(2):
            assert (
                _scalars(patients, form, sa.select(Patient.ssn).order_by(Patient.id)) == [SSN] * 8
            )
    assert _found(patients, "acme")["ssn == value"] == [[]] * 4  # not moved yet

    for _ in range(2):
        report = app.reencrypt(Patient.ssn, scope="acme", where=Patient.tenant == "acme")
        assert report.left_behind == 0
    assert report.values_by_version == {}  # the second run found nothing left to move
    for _ in range(2):
        report = app.backfill_index(Patient.email_index, recompute=True)
        assert report.left_behind == 0
    assert _found(patients, "acme") == {
        "ssn == value": [acme] * 4,
        "ssn IN values": [acme] * 4,
        "badge == value": [[]] * 4,
        "email_index.matches(value)": [acme] * 4,
        "email_index == value": [acme] * 4,
    }
    globex_found = _found(patients, "globex")
    assert globex_found["email_index == value"] == [globex] * 4  # every row's own scope
    assert globex_found["ssn == value"] == [[]] * 4  # globex's turn has not come
    own = _found(patients, None)
    assert own["ssn == value"] == [globex + mine] * 4
    assert own["email_index == value"] == [mine] * 4

    app.shred("acme")
    app.close()
    fresh = sa.create_engine(db_url)
    reader = KeyRegistry(fresh, root_key)
    for form in FORMS:
        for _ in range(2):
            with pytest.raises(DestroyedKeyError):
                _scalars(fresh, form, sa.select(Patient.ssn).where(Patient.id == acme[0]))
    for name, runs in _found(fresh, None).items():
        assert not set(acme) & {n for run in runs for n in run}, name
    reader.close()
    fresh.dispose()


# -- item 2: reserved and unprintable scope names -----------------------------------

BAD_NAMES = [
    "~index:default",
    "~index:acme",
    "~acme",
    "ac\x00me",
    "ac\tme",
    "ac\x7fme",
    "acme\u200b",  # zero-width space: a format character
    "ac\u3164me",  # Hangul filler: a letter that prints as nothing
    "acme\ufe0f",  # variation selector: a mark that prints as nothing
    "\u2800",  # braille pattern blank
    " ",
    "acme ",  # would look like "acme"
    "cafe\u0301",  # "café" in normal form D: two spellings of one name
    "",
    "x" * 249,
]


def test_a_tenant_named_like_an_index_scope_gets_no_key(
    patients: sa.Engine, root_key: StaticRootKey
) -> None:
    """The attack: a tenant slug ``~index:default`` would make its values
    encrypt with the index key as an AES-GCM data key, and shredding it
    would destroy the index key of the registry's own scope. Both are
    refused, and nothing changes."""
    app = KeyRegistry(patients, root_key)
    app.init()
    before = _keys(patients)
    ids = itertools.count(1)
    for form in FORMS:
        for _ in range(2):
            row = {"id": next(ids), "tenant": "evil", "email": EMAIL}
            with pytest.raises(ConfigurationError, match="reserved"):
                _insert(patients, form, row, "~index:default")
            with (
                pytest.raises(ConfigurationError, match="reserved"),
                sqlalchemy_envelope.scope("~index:default"),
            ):
                _insert(patients, form, {**row, "id": next(ids)}, None)
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="reserved"):
            app.shred("~index:default", including_shared_index=True)
    assert _keys(patients) == before
    _insert(patients, "session", {"id": 1, "tenant": "", "ssn": SSN}, None)
    assert _scalars(patients, "connection", sa.select(Patient.id).where(Patient.ssn == SSN)) == [1]
    app.close()


def test_reserved_and_unprintable_scope_names_are_refused(
    patients: sa.Engine, root_key: StaticRootKey
) -> None:
    """A tenant named ``~index:default`` would write under the index key
    as a data key and shred every tenant's index; names in the reserved
    ``~`` namespace, with control or invisible characters, empty or too long
    are refused wherever a user names a scope, before anything is written."""
    app = KeyRegistry(patients, root_key)
    app.init()
    app.create_scope("acme")
    before = _keys(patients)
    ids = itertools.count(1)

    def core_per_call(name: str) -> None:
        with patients.begin() as conn:
            conn.execute(
                PATIENTS.insert(),
                [{"id": next(ids), "tenant": "x", "email": EMAIL}],
                execution_options={SCOPE_OPTION: name},
            )

    def core_per_connection(name: str) -> None:
        with patients.connect() as conn:
            conn = conn.execution_options(envelope_scope=name)
            conn.execute(PATIENTS.insert(), [{"id": next(ids), "tenant": "x", "ssn": SSN}])
            conn.commit()

    def session_add(name: str) -> None:
        with Session(patients) as session:
            set_session_scope(session, name)
            session.add(Patient(id=next(ids), tenant="x", email=EMAIL))
            session.commit()

    def unit_of_work(name: str) -> None:
        with Session(patients) as session, session_scope(session, name):
            session.add(Patient(id=next(ids), tenant="x", email=EMAIL))
            session.commit()

    def block(name: str) -> None:
        with sqlalchemy_envelope.scope(name), Session(patients) as session:
            session.add(Patient(id=next(ids), tenant="x", ssn=SSN))
            session.commit()

    def lookup(name: str) -> None:
        _scalars(patients, "session", sa.select(Patient.id).where(Patient.ssn == SSN), name)

    calls = {
        "create_scope": lambda name: app.create_scope(name),
        "shred": lambda name: app.shred(name, including_shared_index=True),
        "reencrypt": lambda name: app.reencrypt(Patient.email, scope=name),
        "hash_field": lambda name: app.hash_field(FIELD, FIELD_CONTEXT, scope=name),
        "KeyRegistry": lambda name: KeyRegistry(patients, root_key, scope=name, attach=False),
        "Core, per call": core_per_call,
        "Core, per connection": core_per_connection,
        "Session": session_add,
        "session_scope": unit_of_work,
        "scope() block": block,
        "lookup": lookup,
    }
    accepted = []
    for name in BAD_NAMES:
        for what, call in calls.items():
            for _ in range(2):
                try:
                    call(name)
                except ConfigurationError:
                    continue
                accepted.append((what, name))
        if not name.startswith("~index:"):  # an index scope is a key scope: see below
            for _ in range(2):
                with pytest.raises(ConfigurationError):
                    app.rotate(scope=name)
    assert accepted == []
    with pytest.raises(ConfigurationError):
        app.rotate(scope="~index:~index:default")
    assert _keys(patients) == before
    with patients.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(PATIENTS)).scalar() == 0
    app.close()


def test_an_index_key_is_never_a_data_key_nor_the_reverse(
    patients: sa.Engine, db_url: str, root_key: StaticRootKey
) -> None:
    """A randomized value whose header names an index key (as a tenant named
    ``~index:default`` once wrote) is refused, even when it authenticates
    under that key as AES-GCM; a deterministic value whose header names a
    data key is refused too. In this process and a fresh one, through a
    Connection and a Session, and by registry.decrypt()."""
    app = KeyRegistry(patients, root_key)
    app.init()
    _insert(patients, "session", {"id": 1, "tenant": "", "email": EMAIL, "ssn": SSN}, None)
    with patients.connect() as conn:
        rows = {
            scope: (key_id, bytes(wrapped))
            for key_id, scope, wrapped in conn.execute(
                sa.select(DATA_KEYS.c.id, DATA_KEYS.c.scope, DATA_KEYS.c.wrapped_key)
            )
        }
    index_id, wrapped = rows["~index:default"]
    secret = root_key.unwrap(wrapped, KeyWrapper.context(index_id, "~index:default", 1))
    header = fmt.header(index_id)
    nonce = os.urandom(12)
    context = b"isolation_patients.email"
    forged = header + nonce + AESGCM(secret).encrypt(nonce, EMAIL.encode(), header + context)
    (ssn,) = [bytes(r.ssn) for r in _raw(patients)]
    data_id, _ = rows["default"]
    data_headed = fmt.header(data_id, fmt.DETERMINISTIC_VERSION) + ssn[fmt.HEADER_BYTES :]
    with patients.begin() as conn:
        conn.execute(RAW.update().values(email=forged, ssn=data_headed))

    fresh = sa.create_engine(db_url)
    reader = KeyRegistry(fresh, root_key, attach=True)
    for engine, registry in ((patients, app), (fresh, reader)):
        for form in FORMS:
            for _ in range(2):
                for column in (Patient.email, Patient.ssn):
                    with pytest.raises(DecryptionError) as refused:
                        _scalars(engine, form, sa.select(column))
                    assert EMAIL not in str(refused.value) and SSN not in str(refused.value)
        for _ in range(2):
            with pytest.raises(DecryptionError):
                registry.decrypt(forged, context.decode())
    reader.close()
    fresh.dispose()
    app.close()


def test_the_registry_s_own_scope_is_no_new_tenant(
    patients: sa.Engine, root_key: StaticRootKey
) -> None:
    """create_scope() of the registry's own scope creates nothing new: it
    already has its keys. Shredding it while tenants have keys is refused
    unless asked for, since tenants' values written before they had index
    keys of their own may still be under its index key."""
    app = KeyRegistry(patients, root_key)
    app.init()
    before = _keys(patients)
    (info,) = app.create_scope("default")
    assert (info.scope, info.version) == ("default", 1)
    assert _keys(patients) == before
    app.create_scope("acme")
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="registry's own scope") as refused:
            app.shred("default")
        assert "including_shared_index=True" in str(refused.value)
    assert app.shred("acme") == 2
    assert app.shred("default", including_shared_index=True) == 2
    app.close()


def test_scope_names_on_the_command_line(db_url: str, tmp_path: Path) -> None:
    """--scope and shred's SCOPE refuse reserved and unprintable names (exit
    2); an index scope is accepted where a key is addressed."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    for name in ("~acme", "~index:default", "ac\x01me"):
        for _ in range(2):
            cli("shred", name, "--yes", code=2)
        cli("--scope", name, "init", code=2)
    cli("--scope", "~acme", "status", code=2)
    assert cli.json("--scope", "~index:default", "rotate")["version"] == 2
    assert cli.json("--scope", "~index:default", "status")["active_version"] == 2
    cli("--scope", "acme", "init")
    assert cli.json("--scope", "~index:acme", "status")["active_version"] == 1
    assert cli.json("shred", "acme", "--yes") == {"scope": "acme", "destroyed": 2}
