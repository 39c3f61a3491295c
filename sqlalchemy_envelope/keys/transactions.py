"""Short transactions on data_keys that are safe when many processes write.

`run` retries a transaction that lost a race (a unique violation, a deadlock,
a serialization failure, SQLite's "database is locked") until it commits.
`run_retrying_conflicts` retries the longer transactions of jobs on the
application's tables (a batch) a few times when they lose a lock conflict.
`attempt` is for writes made on behalf of the encrypt path: it must never wait
on a lock the application itself may hold (SQLite locks the whole database
for the length of a write transaction), so it gives up at once and lets the
caller carry on with the key it already has. `attempt_within` writes on the
application's own SQLite connection instead, for the block claims of the
encrypt path (see `KeyRegistry._claim_block`).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.util.concurrency import await_only, in_greenlet

__all__ = [
    "BUSY",
    "Busy",
    "attempt",
    "attempt_within",
    "is_contention",
    "is_lock_conflict",
    "pause",
    "run",
    "run_retrying_conflicts",
]

T = TypeVar("T")
_ATTEMPTS = 40
_LOCKED_ATTEMPTS = 3  # SQLite already waited its busy timeout before saying "locked"
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})  # serialization, deadlock, lock
_CONFLICT_ATTEMPTS = 8  # a batch's tries when it loses a lock conflict
_FIRST_PAUSE, _LONGEST_PAUSE = 0.05, 2.0  # seconds; the pause doubles, jittered


class Busy:
    """`attempt` could not get its locks at once; nothing was written."""

    def __repr__(self) -> str:
        return "BUSY"


BUSY = Busy()


def is_contention(error: sa.exc.DBAPIError) -> bool:
    """True for errors a concurrent writer causes, which a retry resolves:
    on data_keys, a unique violation is a race lost too."""
    return isinstance(error, sa.exc.IntegrityError) or is_lock_conflict(error)


def is_lock_conflict(error: sa.exc.DBAPIError) -> bool:
    """True for a lock conflict lost to another transaction: a deadlock, a
    lock wait that timed out, a serialization failure, SQLite's "database is
    locked". The database rolled the work back (or refused it); running the
    whole transaction again resolves it."""
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    text = str(orig).lower()
    return _locked(orig) or "deadlock" in text or "lock wait timeout" in text


def _locked(error: object) -> bool:
    """SQLite's answer when another connection holds the lock: SQLITE_BUSY,
    or SQLITE_LOCKED from a connection sharing an in-memory database's cache
    (``cache=shared``), which holds locks per table and never waits."""
    text = str(error).lower()
    return "database is locked" in text or "database table is locked" in text


def run(bind: Engine | Connection, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in its own transaction, retrying lost races. On a
    Connection (a registry pinned to a migration's connection) ``work`` runs
    inside that connection's transaction, once."""
    if isinstance(bind, Connection):
        return work(bind)
    engine = bind
    for tries in range(1, _ATTEMPTS + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except sa.exc.DBAPIError as error:
            locked = _locked(error.orig)
            if tries >= (_LOCKED_ATTEMPTS if locked else _ATTEMPTS) or not is_contention(error):
                raise
        time.sleep(random.uniform(0, 0.005 * tries))
    raise AssertionError("unreachable")


def run_retrying_conflicts(
    bind: Engine | Connection,
    work: Callable[[Connection], T],
    attempts: int = _CONFLICT_ATTEMPTS,
) -> T:
    """Run ``work`` in a transaction of its own, again after a jittered,
    doubling pause each time it loses a lock conflict (`is_lock_conflict`),
    ``attempts`` times in all; then the last error is raised. SQLite waited
    its busy timeout before saying "locked", so it gets fewer tries. On a
    Connection (a registry pinned to a migration's), ``work`` runs once inside
    its transaction, which a failed statement may have aborted: only its
    owner can run it again."""
    if isinstance(bind, Connection):
        return work(bind)
    for tries in range(1, attempts + 1):
        try:
            with bind.begin() as conn:
                return work(conn)
        except sa.exc.DBAPIError as error:
            last = tries >= (min(attempts, _LOCKED_ATTEMPTS) if _locked(error.orig) else attempts)
            if last or not is_lock_conflict(error):
                raise
        pause(random.uniform(0, min(_LONGEST_PAUSE, _FIRST_PAUSE * 2**tries)))
    raise AssertionError("unreachable")


def pause(seconds: float) -> None:
    """Sleep without blocking an event loop: under AsyncKeyRegistry the job
    runs in SQLAlchemy's greenlet, where the loop's sleep is awaited."""
    if in_greenlet():
        await_only(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


@contextmanager
def _no_busy_wait(conn: Connection) -> Iterator[None]:
    """On SQLite, fail at once rather than wait for a lock while the block
    runs, its COMMIT included: in rollback-journal mode COMMIT is what waits,
    for every reader to finish. Set on the DBAPI connection, so that it
    neither begins a transaction nor fires the application's statement events."""
    if conn.dialect.name != "sqlite":
        yield
        return
    cursor = conn.connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout")
        row = cursor.fetchone()
        previous = int(row[0]) if row else 0
        cursor.execute("PRAGMA busy_timeout = 0")
        try:
            yield
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {previous}")
    finally:
        cursor.close()


def attempt(bind: Engine | Connection, work: Callable[[Connection], T]) -> T | Busy:
    """Run ``work`` in its own transaction if its locks are free now."""
    if isinstance(bind, Connection):
        return work(bind)
    try:
        with bind.connect() as conn, _no_busy_wait(conn), conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL lock_timeout = '250ms'")
            return work(conn)
    except sa.exc.DBAPIError as error:
        if is_contention(error):
            return BUSY
        raise


def attempt_within(
    conn: Connection, statement: sa.ClauseElement, undo: Callable[[], None]
) -> int | Busy:
    """Run one write ``statement`` on the application's own SQLite connection
    ``conn``, in the middle of its statement, without waiting for a lock;
    return the number of rows it changed. With no transaction open there, it
    is a transaction of its own, committed at once. Inside the application's
    transaction it joins it, and ``undo`` is called if that transaction (or a
    savepoint) is rolled back. Run on the DBAPI connection: it must not begin
    SQLAlchemy's transaction nor fire statement events (a ``begin`` listener
    may emit BEGIN; the application's statement in progress has its own)."""
    dbapi = conn.connection
    driver: Any = dbapi.driver_connection  # sqlite3's, or aiosqlite's
    sql = str(statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    joined = bool(driver.in_transaction)
    cursor = dbapi.cursor()
    try:
        with _no_busy_wait(conn):
            try:
                cursor.execute(sql)
                changed = int(cursor.rowcount)
                if not joined and driver.in_transaction:
                    dbapi.commit()
            except conn.dialect.loaded_dbapi.Error as error:
                if not joined and driver.in_transaction:
                    dbapi.rollback()
                if _locked(error):
                    return BUSY
                raise
    finally:
        cursor.close()
    if joined:
        _undo_on_rollback(conn, undo)
    return changed


_undos: weakref.WeakKeyDictionary[Connection, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)
_undos_lock = threading.Lock()


def _undo_on_rollback(conn: Connection, undo: Callable[[], None]) -> None:
    """Call ``undo`` if the transaction of ``conn`` is rolled back, or rolled
    back to a savepoint (the write may have been after it: undoing too much
    only claims again); forget it once the transaction commits. SQLAlchemy
    says so just before its COMMIT: a COMMIT that then fails loses the undo."""
    with _undos_lock:
        undos = _undos.get(conn)
        if undos is None:
            undos = _undos[conn] = []

            def rolled_back(*_: object) -> None:
                pending = list(undos)
                undos.clear()
                for call in pending:
                    call()

            event.listen(conn, "commit", lambda _: undos.clear())
            event.listen(conn, "rollback", rolled_back)
            event.listen(conn, "rollback_savepoint", rolled_back)
    undos.append(undo)
