"""Transactions that may still commit rows under a key: what the destroy
guard waits for besides the rows it counts (key_reports.py).

A process encrypts under a key until its cache refreshes, at most
``cache_max_age`` after the key left the active state; a transaction that
encrypted a value before then and commits later lands a row no census taken
meanwhile could see. So the guard looks for other transactions that started
before every cache had refreshed and have written (or are running a
statement), by the database's own clock: ``older_than`` is how long ago, in
seconds, that moment was, so the application's and the database's clocks
need not agree. SQLite needs none of this: the guard holds the database's
write lock while it counts and destroys, which no other writer can hold.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..keys import transactions
from ..keys.storage import MYSQL_DIALECTS

__all__ = ["OpenWriter", "StaleError", "UnreadableError", "open_writers"]

# MySQL/MariaDB's "Access denied; you need the PROCESS privilege".
_ER_SPECIFIC_ACCESS_DENIED = 1227


@dataclass(frozen=True)
class OpenWriter:
    """Another transaction that may still commit rows under the key:
    ``started`` by the database's clock (None when this account cannot see
    it), ``backend`` its process or connection id, ``table`` the table it
    writes to when the database says (PostgreSQL)."""

    started: datetime | None
    backend: int | None
    table: str | None = None


class UnreadableError(Exception):
    """The database does not show this account the transactions of others;
    ``grant`` says what to grant."""

    def __init__(self, grant: str) -> None:
        super().__init__(grant)
        self.grant = grant


# Other backends' transactions holding a write lock (or waiting for one) on
# the tables counted, started before the moment given: writers of rows there.
_POSTGRESQL = sa.text(
    """
    SELECT DISTINCT l.pid, a.xact_start, l.relation::regclass::text AS name
    FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'relation'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.relation IN (SELECT to_regclass(n) FROM unnest(CAST(:tables AS text[])) AS n)
      AND l.mode NOT IN ('AccessShareLock', 'RowShareLock')
      AND l.pid IS DISTINCT FROM pg_backend_pid()
      AND (a.xact_start IS NULL
           OR a.xact_start < clock_timestamp() - make_interval(secs => :older_than))
    ORDER BY a.xact_start NULLS FIRST
    """
)

# Every InnoDB transaction with its session's database, ours included. The
# server refreshes this list only when it was last read more than 0.1 s ago:
# the statement is marked, and the list is fresh when it shows our own
# transaction running it.
_MYSQL = """
    SELECT t.trx_mysql_thread_id, t.trx_started, t.trx_rows_modified, t.trx_query,
           p.db, DATABASE(), CONNECTION_ID(), NOW(6) - INTERVAL :older_than MICROSECOND
    FROM information_schema.innodb_trx AS t
    LEFT JOIN information_schema.processlist AS p ON p.id = t.trx_mysql_thread_id
    ORDER BY t.trx_started /* {mark} */
"""
_FRESH_TRIES = 20  # reads of the MySQL/MariaDB list, 0.11 s apart, before giving up


def open_writers(
    conn: Connection,
    keys_table: sa.Table,
    tables: Iterable[tuple[str | None, str]],
    older_than: float,
) -> list[OpenWriter]:
    """Other transactions, started more than ``older_than`` seconds ago, that
    have written (on PostgreSQL: to one of ``tables``, as schema and name) and
    are still open, oldest first; `UnreadableError` when the database hides
    them from this account, `StaleError` when it does not show them as they
    are now. SQLite: none (see the module's docstring)."""
    name = conn.dialect.name
    if name == "postgresql":
        preparer = conn.dialect.identifier_preparer
        names = sorted({preparer.format_table(sa.table(t, schema=s)) for s, t in tables})
        if not names:
            return []
        rows = conn.execute(_POSTGRESQL, {"tables": names, "older_than": older_than}).all()
        # A NULL start with a backend: another role's, hidden from this one
        # (with no backend, a prepared transaction's lock).
        if any(pid is not None and started is None for pid, started, _ in rows):
            raise UnreadableError("GRANT pg_read_all_stats TO <the role>")
        return [OpenWriter(started, pid, table) for pid, started, table in rows]
    if name in MYSQL_DIALECTS:
        return _mysql(conn, keys_table, older_than)
    return []


def _mysql(conn: Connection, keys_table: sa.Table, older_than: float) -> list[OpenWriter]:
    """Other sessions on this database (or on none) whose transaction has
    changed rows or is running a statement, started before the moment given
    (trx_started has whole seconds: it reads earlier than it was)."""
    conn.execute(sa.select(keys_table.c.id).limit(1)).all()  # our own InnoDB transaction
    for _ in range(_FRESH_TRIES):
        mark = f"envelope destroy guard {secrets.token_hex(8)}"
        statement = sa.text(_MYSQL.format(mark=mark))
        try:
            rows = conn.execute(statement, {"older_than": round(older_than * 1e6)}).all()
        except sa.exc.DBAPIError as error:
            args = getattr(error.orig, "args", ())
            if args and args[0] == _ER_SPECIFIC_ACCESS_DENIED:
                raise UnreadableError("GRANT PROCESS ON *.* TO <the user>") from None
            raise
        if any(row[0] == row[6] and mark in (row[3] or "") for row in rows):
            return [
                OpenWriter(started, thread)
                for thread, started, modified, query, db, ours, me, before in rows
                if thread != me
                and (db is None or db == ours)
                and (modified > 0 or query is not None)
                and started < before
            ]
        transactions.pause(0.11)
    raise StaleError


class StaleError(Exception):
    """MySQL/MariaDB did not refresh its list of transactions (something else
    reads it more often than every 0.1 s)."""
