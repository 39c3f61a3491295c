"""Short transactions on data_keys that are safe when many processes write.

`run` retries a transaction that lost a race (a unique violation, a deadlock,
a serialization failure, SQLite's "database is locked") until it commits.
`attempt` is for writes made on behalf of the encrypt path: it must never wait
on a lock the application itself may hold (SQLite locks the whole database
for the length of a write transaction), so it gives up at once and lets the
caller carry on with the key it already has.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = ["BUSY", "Busy", "attempt", "is_contention", "run"]

T = TypeVar("T")
_ATTEMPTS = 40
_LOCKED_ATTEMPTS = 3  # SQLite already waited its busy timeout before saying "locked"
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})  # serialization, deadlock, lock


class Busy:
    """`attempt` could not get its locks at once; nothing was written."""

    def __repr__(self) -> str:
        return "BUSY"


BUSY = Busy()


def is_contention(error: sa.exc.DBAPIError) -> bool:
    """True for errors a concurrent writer causes, which a retry resolves."""
    if isinstance(error, sa.exc.IntegrityError):
        return True
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    text = str(orig).lower()
    return "database is locked" in text or "deadlock" in text or "lock wait timeout" in text


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
            locked = "database is locked" in str(error.orig).lower()
            if tries >= (_LOCKED_ATTEMPTS if locked else _ATTEMPTS) or not is_contention(error):
                raise
        time.sleep(random.uniform(0, 0.005 * tries))
    raise AssertionError("unreachable")


@contextmanager
def _no_waiting(conn: Connection) -> Iterator[None]:
    if conn.dialect.name == "sqlite":
        previous = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        conn.exec_driver_sql("PRAGMA busy_timeout = 0")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(previous or 0)}")
        return
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL lock_timeout = '250ms'")
    yield


def attempt(bind: Engine | Connection, work: Callable[[Connection], T]) -> T | Busy:
    """Run ``work`` in its own transaction if its locks are free now."""
    if isinstance(bind, Connection):
        return work(bind)
    try:
        with bind.connect() as conn, conn.begin(), _no_waiting(conn):
            return work(conn)
    except sa.exc.DBAPIError as error:
        if is_contention(error):
            return BUSY
        raise
