"""The one owner of the connections a registry uses.

Statements on ``data_keys`` run on the registry's own pool (see
connections.py), or, while a block runs `pinned` to the application's
connection (an Alembic migration's), on that connection inside its
transaction. Jobs on the application's tables (re-encryption, census) use the
application's engine, or that same pinned connection.

On an in-memory SQLite database the registry shares the application's
connection: while the application has a transaction open there, reads run
inside it, and a write that would have to commit on its own is refused as on
a SQLite file locked by that transaction (`try_write` is BUSY, the others
raise ConfigurationError), rather than commit or roll back the application's
work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.util.concurrency import in_greenlet

from ..errors import ConfigurationError, RegistryClosedError
from ..metrics import Metrics
from . import transactions
from .connections import (
    KeyConnections,
    in_database_transaction,
    internally,
    statement_connection,
)

__all__ = ["KeyStore"]

T = TypeVar("T")


class KeyStore:
    """Named ways to reach the database: `read`, `write`, `try_write`
    (without waiting for locks), `try_write_in_statement` (on the connection of
    the application statement being executed), and `connect`/`begin`/
    `transaction` (retried on lock conflicts) for work on the application's
    own tables."""

    def __init__(self, engine: Engine, table: sa.Table, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.table = table
        self.metrics = metrics
        self._keys = KeyConnections(engine)
        self._pinned: ContextVar[Connection | None] = ContextVar("envelope_pinned", default=None)
        self._closed = False

    @property
    def registry(self) -> str:
        """The class name of the registry this store serves, for messages."""
        return "AsyncKeyRegistry" if self.engine.dialect.is_async else "KeyRegistry"

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosedError(self.registry)

    @property
    def pinned(self) -> bool:
        """Whether this thread or task works on a pinned application connection."""
        return self._pinned.get() is not None

    @contextmanager
    def pin(self, connection: Connection) -> Iterator[None]:
        """Do all database work on ``connection``, inside its transaction,
        while the block runs."""
        token = self._pinned.set(connection)
        try:
            yield
        finally:
            self._pinned.reset(token)

    def _call(self, work: Callable[[Engine | Connection], T], *, writes: bool = True) -> T:
        self._check_open()
        pinned = self._pinned.get()
        if pinned is not None:
            return work(pinned)
        shared = self._keys.application_transaction()
        if shared is not None and not writes:

            def inside(conn: Connection) -> T:
                with internally(conn):
                    return work(conn)

            return self._keys.call(lambda: inside(shared))
        if shared is not None and in_database_transaction(shared):
            raise self._shared_write_refused("a change to data_keys")
        engine = self._keys.engine
        return self._keys.call(lambda: work(engine))

    def _application_writing(self) -> bool:
        """In-memory SQLite, outside a pinned block: whether the application
        has a transaction open on the one connection it shares with the
        registry, which nothing else may commit or roll back."""
        if self._pinned.get() is not None:
            return False
        shared = self._keys.application_transaction()
        return shared is not None and in_database_transaction(shared)

    def _shared_write_refused(self, what: str) -> ConfigurationError:
        return ConfigurationError(
            f"{what} cannot be committed now: the in-memory SQLite database has one "
            "connection, which the application shares with the registry, and the "
            "application has a write transaction open on it; do it before that "
            f"transaction begins or after it ends (create scopes ahead with "
            f"{self.registry}.create_scope())"
        )

    def read(self, query: Callable[[Connection], T]) -> T:
        """Run a read of data_keys."""
        if self.metrics is not None:
            self.metrics.read()

        def read(bind: Engine | Connection) -> T:
            if isinstance(bind, Connection):
                return query(bind)
            with bind.connect() as conn:
                return query(conn)

        return self._explained(lambda: self._call(read, writes=False))

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction of its own (retried on contention),
        or in the pinned connection's."""
        return self._explained(lambda: self._call(lambda bind: transactions.run(bind, work)))

    def try_write(self, work: Callable[[Connection], T]) -> T | transactions.Busy:
        """`write`, unless it would wait for a lock: then `transactions.BUSY`."""
        if self._application_writing():
            return transactions.BUSY
        return self._call(lambda bind: transactions.attempt(bind, work))

    def try_write_in_statement(
        self, statement: sa.Update, undo: Callable[[], None]
    ) -> int | transactions.Busy | None:
        """On SQLite, run ``statement`` on the connection of the application
        statement being executed, inside its transaction if one is open
        (``undo`` runs if that is rolled back); None when there is no such
        connection to use. Rowcount, or `transactions.BUSY`."""
        self._check_open()
        conn = self._statement_connection()
        if conn is None:
            return None
        return transactions.attempt_within(conn, statement, undo)

    def _statement_connection(self) -> Connection | None:
        if self.engine.dialect.name != "sqlite" or self._pinned.get() is not None:
            return None
        conn = statement_connection()
        if conn is None or conn.closed or conn.invalidated or conn.engine.url != self.engine.url:
            return None
        if conn.dialect.is_async and not in_greenlet():
            return None
        return conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection to the application's database, for reading its tables."""
        self._check_open()
        pinned = self._pinned.get() or self._keys.application_transaction()
        if pinned is not None:
            yield pinned
            return
        with self.engine.connect() as conn:
            yield conn

    def transaction(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction on the application's database, again
        when it loses a lock conflict (a deadlock, a lock wait timeout: see
        `transactions.run_retrying_conflicts`); once, in the pinned
        connection's transaction, while one is pinned."""
        self._check_open()
        if self._application_writing():
            raise self._shared_write_refused("a job's transaction")
        pinned = self._pinned.get()
        bind: Engine | Connection = self.engine if pinned is None else pinned
        return transactions.run_retrying_conflicts(bind, work)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on the application's database, for writing its tables."""
        self._check_open()
        if self._application_writing():
            raise self._shared_write_refused("a job's transaction")
        pinned = self._pinned.get()
        if pinned is not None:
            yield pinned
            return
        with self.engine.begin() as conn:
            yield conn

    def create_table(self, table: sa.Table) -> None:
        """Create ``table`` (data_keys, its events) unless it exists."""
        try:
            self._call(lambda bind: table.create(bind, checkfirst=True))
        except sa.exc.DBAPIError:
            # Another process created it between our check and our CREATE.
            if not self._call(
                lambda bind: sa.inspect(bind).has_table(table.name, schema=table.schema),
                writes=False,
            ):
                raise

    def _explained(self, statement: Callable[[], T]) -> T:
        """Run ``statement``; if it fails because data_keys is missing, say so."""
        try:
            return statement()
        except sa.exc.DBAPIError as error:
            if self._pinned.get() is not None:
                raise  # a failed statement aborted the pinned transaction
            if self._call(lambda bind: sa.inspect(bind).has_table(self.table.name), writes=False):
                raise
            raise ConfigurationError(
                f"table {self.table.name!r} does not exist: call {self.registry}.init() "
                "(or run `sqlalchemy-envelope init`, or the Alembic migration) first"
            ) from error

    def after_fork(self) -> None:
        """In a forked child: open connections of its own."""
        self.engine.dispose(close=False)
        self.forget_key_connections()

    def forget_key_connections(self) -> None:
        """In a forked child: the registry's own connections to data_keys
        are the parent's (called at every fork; the application's engine is
        the application's to dispose of)."""
        self._keys.after_fork()

    def close(self) -> None:
        """Release the registry's own connections, and refuse every use from now on."""
        self._closed = True
        self._keys.close()
