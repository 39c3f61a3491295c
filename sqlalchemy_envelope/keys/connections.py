"""The connections a registry uses for its own statements on ``data_keys``.

They come from a pool of their own, a copy of the application's (same
creator, same connect events, same settings), so that a key lookup made while
the application holds every pooled connection (a pool of size 1 in the middle
of reading a result) never waits for itself. An in-memory SQLite database is
the exception: another connection would be another, empty database.

With an asyncio driver (asyncpg, aiosqlite) the pool lives on an event loop of
its own, in a daemon thread. A lookup made inside SQLAlchemy's greenlet (while
a statement executes) awaits it without blocking the application's loop; one
made outside it (rows of an already buffered async result being processed)
waits for it, which happens only when a key is missing from the cache.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar
from typing import Any, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.util.concurrency import await_only, greenlet_spawn, in_greenlet

__all__ = [
    "INTERNAL_OPTION",
    "KeyConnections",
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
    database = engine.url.database
    return engine.dialect.name == "sqlite" and (
        not database or database == ":memory:" or "mode=memory" in str(engine.url.query)
    )


class KeyConnections:
    """An engine for data_keys beside the application's, and how to call it."""

    def __init__(self, engine: Engine) -> None:
        self.is_async = bool(engine.dialect.is_async)
        self._own_pool = not _is_memory_sqlite(engine)
        if self._own_pool:
            engine = Engine(engine.pool.recreate(), engine.dialect, engine.url)
        self.engine = engine.execution_options(**{INTERNAL_OPTION: True})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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
        self._loop = self._thread = None

    def close(self) -> None:
        if not self._own_pool:
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
