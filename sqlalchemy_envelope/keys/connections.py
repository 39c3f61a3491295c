"""The connections a registry uses for its own statements on ``data_keys``.

They come from a pool of their own, a copy of the application's (same
creator, same connect events, same settings), so that a key lookup made while
the application holds every pooled connection (a pool of size 1 in the middle
of reading a result) never waits for itself. An in-memory SQLite database is
the exception: another connection would be another, empty database (or,
with ``cache=shared``, could not read what the application's transaction
wrote). There the registry shares the application's pool, and so its DBAPI
connection (this thread's with SingletonThreadPool, the only one with
StaticPool): while the application has a transaction open on it, a
Connection of the registry's own would end that transaction when it commits,
rolls back or is returned to the pool. `application_transaction` names the
application's Connection then, for the registry to read inside its
transaction and write nothing that would have to commit on its own.

With an asyncio driver (asyncpg, aiosqlite) the pool lives on an event loop of
its own, in a daemon thread. A lookup made inside SQLAlchemy's greenlet (while
a statement executes) awaits it without blocking the application's loop; one
made outside it (rows of an already buffered async result being processed)
waits for it, which happens only when a key is missing from the cache.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.util.concurrency import await_only, greenlet_spawn, in_greenlet

__all__ = [
    "INTERNAL_OPTION",
    "KeyConnections",
    "in_database_transaction",
    "internally",
    "set_statement_connection",
    "statement_connection",
]

T = TypeVar("T")

# Marks the registry's own executions, which binding's per-statement hooks skip.
INTERNAL_OPTION = "envelope_internal"

_statement: ContextVar[Connection | None] = ContextVar("envelope_connection", default=None)


def statement_connection() -> Connection | None:
    """The application's Connection executing the statement whose parameters
    are being processed (set from before to after its execution), if any."""
    return _statement.get()


def set_statement_connection(conn: Connection | None) -> None:
    _statement.set(conn)


def _is_memory_sqlite(engine: Engine) -> bool:
    """An in-memory SQLite database: another connection is another, empty
    database, or with ``cache=shared`` one that cannot read a table the
    application's open transaction wrote (locks are per table, and never
    waited for)."""
    url = engine.url
    database = url.database or ""
    memory = (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    )
    return engine.dialect.name == "sqlite" and memory


def in_database_transaction(conn: Connection) -> bool:
    """Whether the DBAPI connection under ``conn`` has a transaction open
    (sqlite3's and aiosqlite's own account: a write, or an explicit BEGIN)."""
    return bool(conn.connection.driver_connection.in_transaction)  # type: ignore[union-attr]


@contextmanager
def internally(conn: Connection) -> Iterator[Connection]:
    """Mark the application's ``conn`` as running the registry's own
    statements while the block runs: binding's per-statement hooks skip them,
    so that the application statement in progress keeps its scope and
    connection."""
    before = conn.get_execution_options().get(INTERNAL_OPTION, False)
    conn.execution_options(**{INTERNAL_OPTION: True})
    try:
        yield conn
    finally:
        conn.execution_options(**{INTERNAL_OPTION: before})


class KeyConnections:
    """An engine for data_keys beside the application's, and how to call it."""

    def __init__(self, engine: Engine) -> None:
        self.is_async = bool(engine.dialect.is_async)
        self._own_pool = not _is_memory_sqlite(engine)
        self._application = engine
        # The application's Connections on a shared pool, and their threads:
        # this thread's share the registry's DBAPI connection, and with
        # StaticPool every thread's do.
        self._opened: weakref.WeakKeyDictionary[Connection, int] = weakref.WeakKeyDictionary()
        self._one_connection = isinstance(engine.pool, StaticPool)
        if self._own_pool:
            engine = Engine(engine.pool.recreate(), engine.dialect, engine.url)
        else:
            event.listen(self._application, "engine_connect", self._track)
        self.engine = engine.execution_options(**{INTERNAL_OPTION: True})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _track(self, conn: Connection) -> None:
        if not conn.get_execution_options().get(INTERNAL_OPTION):
            with self._lock:
                self._opened[conn] = threading.get_ident()

    def application_transaction(self) -> Connection | None:
        """On a pool shared with the application: its Connection with a
        transaction open on the DBAPI connection the registry would use (the
        one executing a statement now, if it is that), if any."""
        if self._own_pool:
            return None
        current = statement_connection()
        with self._lock:
            opened = list(self._opened.items())
        thread = threading.get_ident()
        candidates = [current] + [
            conn for conn, ident in opened if ident == thread or self._one_connection
        ]
        for conn in candidates:
            if (
                conn is not None
                and conn.engine.pool is self._application.pool
                and not conn.closed
                and not conn.invalidated
                and conn.in_transaction()
            ):
                return conn
        return None

    def call(self, work: Callable[[], T]) -> T:
        """Run ``work``, which uses `engine`, where its I/O can run."""
        if not self.is_async or threading.current_thread() is self._thread:
            return work()
        future: Future[T] = asyncio.run_coroutine_threadsafe(
            greenlet_spawn(work), self._running_loop()
        )
        if in_greenlet():
            result: T = await_only(asyncio.wrap_future(future))
            return result
        return future.result()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="sqlalchemy-envelope keys", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections and loop thread."""
        if self._own_pool:
            self.engine.dispose(close=False)
        self._opened = weakref.WeakKeyDictionary()
        self._loop = self._thread = None

    def close(self) -> None:
        if not self._own_pool:
            if event.contains(self._application, "engine_connect", self._track):
                event.remove(self._application, "engine_connect", self._track)
            return
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            if not self.is_async:
                self.engine.dispose()
            return
        dispose: Any = greenlet_spawn(self.engine.dispose)
        asyncio.run_coroutine_threadsafe(dispose, loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None
