"""How an encrypted column finds its registry.

A registry serves its engine: it is attached to the engine's dialect, which
is the one object SQLAlchemy hands to a type's processors and which belongs to
exactly one engine. A Session, a sessionmaker or a single execution can name a
registry of its own for what it writes; that choice travels as the
``envelope_registry`` execution option and is picked up just before SQLAlchemy
processes the statement's parameters. Reads need no choice: the key id travels
in the ciphertext, and any registry serving the engine can resolve it.

Values are bound to the schema their table is in when the statement runs:
its ``schema_translate_map`` execution option, if any, travels with the
statement's other choices (`Writing`), for its parameters and for the rows
read while it is the thread's or task's latest statement.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import Session, SessionTransaction

from ..crypto import format as fmt
from ..errors import ConfigurationError, RegistryClosedError, UnknownKeyError, WrongRootKeyError
from ..keys.connections import INTERNAL_OPTION, set_statement_connection
from ..keys.envelope import Envelope
from ..keys.scopes import check_scope
from .redaction import redact_errors, redact_rows

__all__ = [
    "EXECUTION_OPTION",
    "SCOPE_OPTION",
    "SESSION_INFO_KEY",
    "EngineSlot",
    "Writing",
    "current_scope",
    "current_writing",
    "effective_schema",
    "scope",
    "session_scope",
    "slot_for",
]

EXECUTION_OPTION = "envelope_registry"
SCOPE_OPTION = "envelope_scope"
SESSION_INFO_KEY = "sqlalchemy_envelope.registry"
SESSION_SCOPE_KEY = "sqlalchemy_envelope.scope"


class Writing:
    """What values are written with: the registry and key scope chosen for
    the statement being executed (None: the engine's registry, the
    registry's own scope), the scope of the enclosing ``scope(...)`` block,
    and the statement's ``schema_translate_map`` (``schemas``). Immutable,
    and a new one for every execution and every block, so a processor can
    resolve its registry, scope and context once per `Writing`."""

    __slots__ = ("ambient", "schemas", "scope", "writer")

    def __init__(
        self,
        writer: Envelope | None,
        scope: str | None,
        ambient: str | None,
        schemas: Mapping[str | None, str | None] | None = None,
    ) -> None:
        self.writer = writer
        self.scope = scope
        self.ambient = ambient
        self.schemas = schemas


_NOTHING_CHOSEN = Writing(None, None, None)
_writing: ContextVar[Writing] = ContextVar("envelope_writing", default=_NOTHING_CHOSEN)

current_writing = _writing.get
"""The `Writing` in effect: one call, cheap enough per value."""


def effective_schema(writing: Writing, schema: str | None) -> str | None:
    """The schema a table named in ``schema`` is in for the statement of
    ``writing``: its ``schema_translate_map`` applied, as SQLAlchemy renders it."""
    schemas = writing.schemas
    if schemas and schema in schemas:
        return schemas[schema]
    return schema


def current_scope() -> str | None:
    """The key scope chosen for the statement being executed: its execution
    option (per call, per connection, or per Session), else the scope of the
    enclosing ``scope(...)`` block, else None (the registry's own scope)."""
    writing = _writing.get()
    return writing.scope or writing.ambient


@contextmanager
def scope(name: str) -> Iterator[None]:
    """Write under the key scope ``name`` (a tenant) inside this block, in
    this thread or asyncio task: ``with sqlalchemy_envelope.scope("acme"): ...``"""
    check_scope(name)
    outer = _writing.get().ambient
    _set_ambient(name)
    try:
        yield
    finally:
        _set_ambient(outer)


def _set_ambient(name: str | None) -> None:
    # The statement's choices stay: the block only changes the scope around them.
    writing = _writing.get()
    _writing.set(Writing(writing.writer, writing.scope, name, writing.schemas))


@contextmanager
def session_scope(session: Session, name: str) -> Iterator[Session]:
    """Make ``session`` write under the key scope ``name`` inside the block
    (one unit of work), then restore its previous scope."""
    previous = session.info.get(SESSION_SCOPE_KEY)
    set_session_scope(session, name)
    try:
        yield session
    finally:
        set_session_scope(session, previous)


def set_session_scope(target: Any, name: str | None) -> None:
    """Choose the key scope a Session, AsyncSession or sessionmaker writes under."""
    if name is not None:
        check_scope(name)
    info, session = _info_of(target, "set a key scope on")
    if name is None:
        info.pop(SESSION_SCOPE_KEY, None)
    else:
        info[SESSION_SCOPE_KEY] = name
    transaction = session.get_transaction() if session is not None else None
    if transaction is not None:  # already connected: switch the live connections too
        for connection, *_ in list(transaction._connections.values()):
            connection.execution_options(**{SCOPE_OPTION: name})


def _info_of(target: Any, what: str) -> tuple[dict[str, Any], Session | None]:
    """The ``info`` dict a Session has, or a sessionmaker gives its sessions."""
    _listen()
    sync_session = getattr(target, "sync_session", None)
    if isinstance(sync_session, Session):
        target = sync_session
    if isinstance(target, Session):
        return target.info, target
    factory_kw = getattr(target, "kw", None)
    if isinstance(factory_kw, dict):
        info = dict(factory_kw.get("info") or {})
        factory_kw["info"] = info
        return info, None
    raise ConfigurationError(
        f"cannot {what} {type(target).__name__}: pass a Session, AsyncSession, "
        "sessionmaker or async_sessionmaker"
    )


_slots: weakref.WeakKeyDictionary[Dialect, EngineSlot] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_listening = False


class EngineSlot:
    """The registries serving one engine: its own, and any that sessions on it
    brought along; and whether statements on it translate schemas."""

    __slots__ = (
        "__weakref__",
        "closed",
        "is_async",
        "readers",
        "registry",
        "sole",
        "translating",
    )

    def __init__(self, is_async: bool = False) -> None:
        self.is_async = is_async  # an AsyncEngine's: its errors name AsyncKeyRegistry
        self.registry: Envelope | None = None
        self.closed = False  # the registry that served the engine was closed
        self.readers: tuple[Envelope, ...] = ()
        # Whether a statement on the engine came with a schema_translate_map:
        # from then on, what a value is bound to depends on the statement.
        self.translating = False
        # The engine's registry when it is the only one reading and no
        # statement translates schemas: the common case, which result
        # processors serve without further checks.
        self.sole: Envelope | None = None

    def _update(self) -> None:
        registry = self.registry
        alone = registry is not None and self.readers == (registry,) and not self.translating
        self.sole = registry if alone else None

    def writer(self, writing: Writing | None = None) -> Envelope:
        """The registry to encrypt with for ``writing``, by default the
        statement being executed's."""
        registry = (writing or _writing.get()).writer
        if registry is None:
            registry = self.registry
            if registry is None:
                raise self.no_registry()
        return registry

    def writing(self, writing: Writing) -> tuple[Envelope, str | None]:
        """The registry and key scope (None: the registry's own) to encrypt with."""
        return self.writer(writing), writing.scope or writing.ambient

    def translates(self) -> None:
        """Note that a statement on the engine translates schemas."""
        with _lock:
            self.translating = True
            self._update()

    def decrypt(self, ciphertext: bytes, context: fmt.Context) -> bytes:
        registry = self.registry
        if registry is not None and len(self.readers) == 1:
            return registry.decrypt_bytes(ciphertext, context)
        return self._decrypt_with_any(ciphertext, context)

    def _decrypt_with_any(self, ciphertext: bytes, context: fmt.Context) -> bytes:
        readers = self.readers
        if not readers:
            raise self.no_registry()
        for registry in readers[:-1]:
            try:
                return registry.decrypt_bytes(ciphertext, context)
            except (UnknownKeyError, WrongRootKeyError):
                continue
        return readers[-1].decrypt_bytes(ciphertext, context)

    def decrypt_scoped(self, ciphertext: bytes, context: fmt.Context) -> bytes:
        registry = self.registry or (self.readers[0] if self.readers else None)
        if registry is None:
            raise self.no_registry()
        return registry.decrypt_scoped(ciphertext, context, current_scope())

    def decrypt_deterministic(self, ciphertext: bytes, context: fmt.Context) -> bytes:
        registry = self.registry or (self.readers[0] if self.readers else None)
        if registry is None:
            raise self.no_registry()
        return registry.decrypt_deterministic(ciphertext, context)

    def add_reader(self, registry: Envelope) -> None:
        if registry not in self.readers:
            with _lock:  # against a `detach` at the same time: a closed one stays out
                if registry not in self.readers and not registry.keyring.closed:
                    self.readers = (*self.readers, registry)
                    self._update()

    def no_registry(self) -> ConfigurationError:
        """The error for a statement on this engine that no registry serves."""
        name = "AsyncKeyRegistry" if self.is_async else "KeyRegistry"
        if self.closed:
            return RegistryClosedError(name, served_engine=True)
        return ConfigurationError(
            f"no {name} serves this engine: create one with {name}(engine, "
            f"root_key=...) (or {name}.from_env(engine)) before using encrypted columns"
        )


def slot_for(dialect: Dialect) -> EngineSlot:
    slot = _slots.get(dialect)
    if slot is None:
        # The first encrypted column or blind index on this engine: from now
        # on its errors must not list their values (even without a registry).
        redact_errors()
        with _lock:
            slot = _slots.setdefault(dialect, EngineSlot(bool(dialect.is_async)))
    return slot


def attach(engine: Engine, registry: Envelope) -> None:
    """Make ``registry`` the one that serves ``engine``."""
    _listen()
    slot = slot_for(engine.dialect)
    with _lock:
        if slot.registry is not None and slot.registry is not registry:
            raise ConfigurationError(
                "this engine is already served by another KeyRegistry: use that one, "
                "close() it first, or create this one with attach=False and bind it "
                "to sessions"
            )
        slot.registry = registry
        slot.closed = False
        if registry not in slot.readers:
            slot.readers = (*slot.readers, registry)
        slot._update()
    redact_rows(engine)


def attached(engine: Engine) -> Envelope | None:
    """The envelope serving ``engine``, if a registry is attached to it."""
    slot = _slots.get(engine.dialect)
    return None if slot is None else slot.registry


def detach(registry: Envelope) -> None:
    """Release every engine from ``registry``, which was closed."""
    with _lock:
        for slot in list(_slots.values()):
            if slot.registry is registry:
                slot.registry = None
                slot.closed = True
            slot.readers = tuple(r for r in slot.readers if r is not registry)
            slot._update()


def bind(target: Any, registry: Envelope) -> None:
    """Make ``registry`` the writer for a Session, AsyncSession or sessionmaker."""
    info, _ = _info_of(target, "bind a KeyRegistry to")
    info[SESSION_INFO_KEY] = registry


def _before_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: dict[str, Any],
) -> None:
    # Set on every execution, so a choice never outlives its statement; but
    # not by the registry's own statements on data_keys, which can run in the
    # middle of an application statement's parameters.
    if execution_options.get(INTERNAL_OPTION):
        return
    chosen = _envelope_of(execution_options.get(EXECUTION_OPTION))
    ambient = _writing.get().ambient
    name = execution_options.get(SCOPE_OPTION)
    if name is not None:
        check_scope(name)  # a tenant's slug, never one of the library's own scopes
    schemas = execution_options.get("schema_translate_map")
    _writing.set(Writing(chosen, name, ambient, schemas))
    if schemas and not (slot := slot_for(conn.dialect)).translating:
        slot.translates()
    set_statement_connection(conn)
    if chosen is not None:
        slot_for(conn.dialect).add_reader(chosen)
        redact_rows(conn.engine)


def _envelope_of(chosen: Any) -> Envelope | None:
    """The envelope of the registry an execution option or Session names."""
    if chosen is None or isinstance(chosen, Envelope):
        return chosen
    envelope = getattr(chosen, "envelope", None)
    if isinstance(envelope, Envelope):
        return envelope
    raise ConfigurationError(
        f"the {EXECUTION_OPTION!r} execution option takes a KeyRegistry or "
        f"AsyncKeyRegistry, not {type(chosen).__name__}"
    )


def _after_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: dict[str, Any],
    result: Any,
) -> None:
    if not execution_options.get(INTERNAL_OPTION):
        set_statement_connection(None)  # the connection may go back to the pool


def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    registry = session.info.get(SESSION_INFO_KEY)
    if registry is not None:
        connection.execution_options(**{EXECUTION_OPTION: registry})
    name = session.info.get(SESSION_SCOPE_KEY)
    if name is not None:
        connection.execution_options(**{SCOPE_OPTION: name})


def _listen() -> None:
    global _listening
    with _lock:
        if not _listening:
            event.listen(Engine, "before_execute", _before_execute)
            event.listen(Engine, "after_execute", _after_execute)
            event.listen(Session, "after_begin", _after_begin)
            _listening = True
