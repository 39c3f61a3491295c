"""A closed registry holds no key material and serves nothing: every path
(columns through statements SQLAlchemy already compiled and cached, the
registry's own methods, blind indexes, deterministic columns, hash_field)
raises `RegistryClosedError`, nothing reachable from the engine or the
registry holds a key any more, and the engine can take a new registry."""

from __future__ import annotations

import asyncio
import gc
import sys
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import async_engine_for
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    AsyncKeyRegistry,
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    RegistryClosedError,
    StaticRootKey,
    blind_index,
)
from sqlalchemy_envelope.sqla.binding import slot_for


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "closing_members"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(sa.String(100)))
    note: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100), storage="text"))
    name_index: Mapped[str | None] = blind_index("name", normalize="casefold")
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))


INSERT = sa.insert(Member)
SELECT = sa.select(Member.id, Member.name, Member.note, Member.ssn).order_by(Member.id)
BY_INDEX = sa.select(Member.id).where(Member.name_index == sa.bindparam("wanted"))
BY_SSN = sa.select(Member.id).where(Member.ssn == sa.bindparam("ssn"))
ROWS = [
    {"id": 1, "name": "Ada", "note": "first", "ssn": "111-11-1111"},
    {"id": 2, "name": "Grace", "note": None, "ssn": "222-22-2222"},
]


def _use_every_path(engine: sa.Engine, first_id: int) -> None:
    """Write and read through every kind of column, in Core and the ORM,
    each statement twice, so that SQLAlchemy compiles and caches them all."""
    with engine.begin() as conn:
        for row in ROWS:
            conn.execute(INSERT, {**row, "id": row["id"] + first_id})
    with Session(engine) as session:
        session.add(Member(id=first_id + 3, name="Alan", ssn="333-33-3333"))
        session.commit()
    for _ in range(2):
        with engine.connect() as conn:
            assert [r.name for r in conn.execute(SELECT)][-3:] == ["Ada", "Grace", "Alan"]
            assert conn.execute(BY_INDEX, {"wanted": "ada"}).scalars().all()
            assert conn.execute(BY_SSN, {"ssn": "222-22-2222"}).scalars().all()
        with Session(engine) as session:
            assert session.get(Member, first_id + 3, populate_existing=True) is not None
            assert session.scalars(sa.select(Member).where(Member.ssn == "111-11-1111")).all()


def _column_paths(engine: sa.Engine) -> dict[str, Callable[[], object]]:
    """Every way a column reaches a key, as the application runs it."""

    def core(statement: Any, params: Any = None) -> Callable[[], object]:
        def run() -> object:
            with engine.begin() as conn:
                result = conn.execute(statement, params)
                return result.all() if result.returns_rows else None

        return run

    def orm_write() -> None:
        with Session(engine) as session:
            session.add(Member(id=99, name="Edsger"))
            session.commit()

    def orm_read() -> object:
        with Session(engine) as session:
            return session.scalars(sa.select(Member)).all()

    return {
        "insert (randomized, deterministic, blind index)": core(
            INSERT, {"id": 98, "name": "Barbara", "ssn": "444-44-4444"}
        ),
        "select (randomized, deterministic)": core(SELECT),
        "blind index lookup": core(BY_INDEX, {"wanted": "ada"}),
        "deterministic lookup": core(BY_SSN, {"ssn": "111-11-1111"}),
        "session write": orm_write,
        "session read": orm_read,
    }


def _registry_paths(registry: KeyRegistry, sealed: bytes) -> dict[str, Callable[[], object]]:
    envelope = registry.envelope
    deterministic = envelope.encrypt_deterministic
    return {
        "encrypt": lambda: registry.encrypt(b"x", "closing_members.name"),
        "decrypt": lambda: registry.decrypt(sealed, "closing_members.name"),
        "encrypt_many": lambda: registry.encrypt_many([b"x"], "closing_members.name"),
        "decrypt_many": lambda: registry.decrypt_many([sealed], "closing_members.name"),
        "hash_field": lambda: registry.hash_field(b"x", "users.email"),
        "derived_key": lambda: envelope.derived_key(b"purpose"),
        "encrypt_deterministic": lambda: deterministic(b"x", b"closing_members.ssn"),
        "backfill_index": lambda: registry.backfill_index(Member.name_index),
        "status": lambda: registry.status(),
        "rotate": lambda: registry.rotate(),
    }


def _refused_everywhere(paths: dict[str, Callable[[], object]], registry: str) -> None:
    for name, path in paths.items():
        for _ in range(2):  # the compiled cache changes code paths
            with pytest.raises(RegistryClosedError, match=f"{registry} .*closed") as info:
                path()
            assert isinstance(info.value, ConfigurationError), name
            assert f"create a new {registry}" in str(info.value) or (
                f"{registry}(engine, root_key=...)" in str(info.value)
            ), name


def _key_material(registry: KeyRegistry) -> tuple[list[bytes], list[object]]:
    """The index keys' secrets and the keys derived from them so far; the
    cipher objects of the data keys and deterministic columns."""
    cache = registry.envelope.keyring.cache
    secrets: list[bytes] = []
    ciphers: list[object] = [key.aead for key in cache.by_header.values()]
    for key in cache.index.values():
        assert key.secret is not None
        secrets.append(key.secret)
        secrets.extend(key.derived.values())
        ciphers.extend(key.sivs.values())
    assert secrets and ciphers
    return secrets, ciphers


def _reachable(roots: Iterable[object]) -> list[object]:
    """Everything reachable from ``roots`` by the references the garbage
    collector sees, except through modules, classes and functions' globals
    (shared by all code: they lead everywhere)."""
    shared = {id(vars(m)) for m in list(sys.modules.values()) if hasattr(m, "__dict__")}
    seen: set[int] = set()
    found: list[object] = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in shared or isinstance(obj, types.ModuleType | type):
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, types.FunctionType):
            refs: Iterable[Any] = (*(obj.__closure__ or ()), obj.__defaults__, obj.__kwdefaults__)
        else:
            refs = gc.get_referents(obj)
        stack.extend(ref for ref in refs if ref is not None)
    return found


def _keys_reachable(
    roots: Iterable[object], secrets: list[bytes], ciphers: list[object] | None = None
) -> list[str]:
    """The key bytes in ``secrets`` reachable from ``roots``, and the cipher
    objects in ``ciphers`` (by default, any AES-GCM or AES-SIV object)."""
    wanted = set(secrets)
    mine = {id(cipher) for cipher in ciphers or ()}
    return [
        type(obj).__name__
        for obj in _reachable(roots)
        if (isinstance(obj, AESGCM | AESSIV) and (ciphers is None or id(obj) in mine))
        or (isinstance(obj, bytes) and obj in wanted)
    ]


def test_a_closed_registry_serves_nothing_and_holds_no_key(
    engine: sa.Engine, root_key: StaticRootKey
) -> None:
    registry = KeyRegistry(engine, root_key)
    registry.init()
    Base.metadata.create_all(engine)
    _use_every_path(engine, 0)
    sealed = registry.encrypt(b"outside columns", "closing_members.name")
    assert registry.hash_field(b"x", "users.email")
    registry.envelope.derived_key(b"purpose")
    secrets, _ = _key_material(registry)
    slot = slot_for(engine.dialect)
    # The traversal does find keys: before close(), from the engine alone.
    assert "AESGCM" in _keys_reachable([engine, slot], secrets)
    assert "AESSIV" in _keys_reachable([engine, slot], secrets)
    assert "bytes" in _keys_reachable([engine, slot], secrets)

    registry.close()
    registry.close()  # again: nothing happens

    assert _keys_reachable([engine, slot, registry], secrets) == []
    _refused_everywhere(_column_paths(engine), "KeyRegistry")
    _refused_everywhere(_registry_paths(registry, sealed), "KeyRegistry")
    assert _keys_reachable([engine, slot, registry], secrets) == []
    assert KeyRegistry.serving(engine) is None

    # The engine was released: a new registry serves it, through the same
    # cached statements, and reads what the closed one wrote.
    successor = KeyRegistry(engine, root_key)
    try:
        assert KeyRegistry.serving(engine) is successor
        _use_every_path(engine, 10)
        with engine.connect() as conn:
            assert [r.name for r in conn.execute(SELECT)] == ["Ada", "Grace", "Alan"] * 2
            assert conn.execute(BY_INDEX, {"wanted": "ADA"}).scalars().all() == [1, 11]
        assert successor.decrypt(sealed, "closing_members.name") == b"outside columns"
        _refused_everywhere(_registry_paths(registry, sealed), "KeyRegistry")
        # Nothing the engine keeps holds the closed registry either.
        closed = weakref.ref(registry)
        del registry
        gc.collect()
        assert closed() is None
    finally:
        successor.close()


def test_a_closed_session_registry_serves_nothing(
    engine: sa.Engine, registry: KeyRegistry, root_key: StaticRootKey
) -> None:
    """A registry bound to sessions (attach=False) refuses their writes once
    closed; reads go on through the engine's own registry."""
    Base.metadata.create_all(engine)
    tenant = KeyRegistry(engine, root_key, scope="tenant-a", attach=False)
    tenant.init()
    for id_ in (1, 2):
        with Session(engine) as session:
            tenant.bind(session)
            session.add(Member(id=id_, name="x", ssn=f"{id_}"))
            session.commit()
    secrets, ciphers = _key_material(tenant)
    tenant.close()
    # The engine's own registry is still open (with the same root key).
    assert _keys_reachable([engine, slot_for(engine.dialect), tenant], secrets, ciphers) == []
    for id_ in (3, 4):
        with Session(engine) as session:
            tenant.bind(session)
            session.add(Member(id=id_, name="y"))
            with pytest.raises(RegistryClosedError, match="KeyRegistry was closed"):
                session.commit()
    with engine.connect() as conn, conn.execution_options(envelope_registry=tenant) as bound:
        for _ in range(2):
            with pytest.raises(RegistryClosedError):
                bound.execute(INSERT, {"id": 5, "name": "z"})
    with Session(engine) as session:
        for _ in range(2):
            names = session.scalars(sa.select(Member.name).order_by(Member.id)).all()
            assert names == ["x", "x"]


def test_a_closed_async_registry_serves_nothing_and_holds_no_key(
    db_url: str, root_key: StaticRootKey
) -> None:
    async def body(engine: AsyncEngine) -> None:
        registry = AsyncKeyRegistry(engine, root_key)
        await registry.init()
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        for _ in range(2):
            async with engine.begin() as conn:
                await conn.execute(sa.delete(Member))
                await conn.execute(INSERT, ROWS)
            async with AsyncSession(engine) as session:
                assert (await session.scalars(BY_INDEX, {"wanted": "grace"})).all() == [2]
                assert (await session.scalars(BY_SSN, {"ssn": "111-11-1111"})).all() == [1]
                assert [r.name for r in await session.execute(SELECT)] == ["Ada", "Grace"]
        sealed = registry.encrypt(b"v", "closing_members.name")
        registry.hash_field(b"x", "users.email")
        secrets, _ = _key_material(registry.sync_registry)
        await registry.close()
        roots = [engine.sync_engine, slot_for(engine.sync_engine.dialect), registry]
        assert _keys_reachable(roots, secrets) == []
        for _ in range(2):
            async with engine.begin() as conn:
                with pytest.raises(RegistryClosedError, match=r"AsyncKeyRegistry\(engine"):
                    await conn.execute(INSERT, {"id": 3, "name": "Alan"})
            async with AsyncSession(engine) as session:
                with pytest.raises(RegistryClosedError, match="AsyncKeyRegistry"):
                    await session.execute(SELECT)
                with pytest.raises(RegistryClosedError, match="AsyncKeyRegistry"):
                    await session.scalars(BY_INDEX, {"wanted": "grace"})
                with pytest.raises(RegistryClosedError, match="AsyncKeyRegistry"):
                    await session.scalars(BY_SSN, {"ssn": "111-11-1111"})
            with pytest.raises(RegistryClosedError, match="AsyncKeyRegistry was closed"):
                registry.decrypt(sealed, "closing_members.name")
            with pytest.raises(RegistryClosedError, match="AsyncKeyRegistry was closed"):
                registry.hash_field(b"x", "users.email")
            with pytest.raises(RegistryClosedError, match="AsyncKeyRegistry was closed"):
                await registry.status()
        assert _keys_reachable(roots, secrets) == []

        successor = AsyncKeyRegistry(engine, root_key)
        async with AsyncSession(engine) as session:
            assert [r.name for r in await session.execute(SELECT)] == ["Ada", "Grace"]
            assert (await session.scalars(BY_INDEX, {"wanted": "GRACE"})).all() == [2]
        assert successor.decrypt(sealed, "closing_members.name") == b"v"
        await successor.close()

    async def main() -> None:
        engine = async_engine_for(db_url)
        try:
            await body(engine)
        finally:
            await engine.dispose()

    asyncio.run(main())
