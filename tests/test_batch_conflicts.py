"""The batch engine and lock conflicts: a batch that loses one (a lock wait
timeout, a deadlock, SQLite's "database is locked") is run again and counted
once; one that keeps losing fails loudly, with the driver's reason in full
when it can hold no value; shard processes running at once on one table
finish, however their statements interleave."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from sqlalchemy_envelope import EncryptedType, KeyRegistry

ROOT = base64.b64encode(os.urandom(32)).decode()
ROWS = 40


def _short_lock_waits(engine: sa.Engine) -> None:
    """Make every connection of ``engine`` give up waiting for a lock soon
    (as a server configured so would), so that a held lock is an error."""

    @event.listens_for(engine, "connect")
    def connected(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        statement = {
            "sqlite": "PRAGMA busy_timeout = 1000",
            "postgresql": "SET lock_timeout = '100ms'",
        }.get(engine.dialect.name, "SET SESSION innodb_lock_wait_timeout = 1")
        cursor.execute(statement)
        cursor.close()


def _short_lock_waits_url(url: str) -> str:
    """The same, for the command line: in the database URL."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.update_query_dict({"timeout": "0.1"}).render_as_string(False)
    if parsed.get_backend_name() == "postgresql":
        options = f"{parsed.query.get('options', '')} -clock_timeout=100".strip()
        return parsed.update_query_dict({"options": options}).render_as_string(False)
    init = "SET SESSION innodb_lock_wait_timeout=1"
    return parsed.update_query_dict({"init_command": init}).render_as_string(False)


@contextmanager
def row_locked(url: str, table: str, row: int, until: threading.Event) -> Iterator[None]:
    """Another connection, of another process's engine, holds a lock on
    ``row`` of ``table`` (on SQLite, which locks the whole database for a
    writer, the write lock) until ``until`` is set, or the block ends."""
    holder = sa.create_engine(url)
    locked = threading.Event()

    def hold() -> None:
        with holder.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.begin()
                conn.execute(sa.text(f"SELECT id FROM {table} WHERE id = {row} FOR UPDATE"))
            locked.set()
            until.wait(timeout=300)
            conn.rollback()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        locked.wait(timeout=60)
        assert locked.is_set()
        yield
    finally:
        until.set()
        thread.join()
        holder.dispose()


def _lost_conflicts(engine: sa.Engine) -> threading.Event:
    """Set when a statement on ``engine`` loses a lock conflict."""
    lost = threading.Event()

    @event.listens_for(engine, "handle_error")
    def failed(context: Any) -> None:
        text = str(context.original_exception).lower()
        if "lock" in text or "deadlock" in text:
            lost.set()

    return lost


def _records(engine: sa.Engine) -> sa.Table:
    records = sa.Table(
        "records",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", EncryptedType(sa.String(60))),
    )
    records.create(engine)
    with engine.begin() as conn:
        conn.execute(records.insert(), [{"id": i, "value": f"record {i}"} for i in range(ROWS)])
    return records


def _read(engine: sa.Engine, table: sa.Table) -> dict[int, str]:
    """A table's values by id, through a Session and a Connection, each
    read twice."""
    stmt = sa.select(*table.columns)
    with Session(engine) as session:
        for _ in range(2):
            by_session = dict(session.execute(stmt).all())
    with engine.connect() as conn:
        for _ in range(2):
            by_connection = dict(conn.execute(stmt).all())
    assert by_session == by_connection
    return by_connection


def test_a_batch_that_loses_a_lock_conflict_is_run_again(db_url: str) -> None:
    """A row of the job's batch is locked by another connection, and the
    job's connections wait for a lock only briefly: its batch fails on the
    lock, is run again once the lock is released, and every row is counted
    once (the batch's rows written before the failure were rolled back)."""
    engine = sa.create_engine(db_url)
    _short_lock_waits(engine)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    records = _records(engine)
    lost = _lost_conflicts(engine)
    expected = {i: f"record {i}" for i in range(ROWS)}
    for job in ("reencrypt", "decrypt_in_place"):
        registry.rotate()
        lost.clear()
        with row_locked(db_url, "records", 5, until=lost):
            if job == "reencrypt":
                report = registry.reencrypt(records.c.value, batch_size=10, progress=False)
            else:
                report = registry.decrypt_in_place(records.c.value, batch_size=10, progress=False)
        assert lost.is_set()  # the job did lose the conflict, and went on
        assert report.rows_updated == report.rows_scanned == ROWS
        assert report.left_behind == 0 and report.skipped == 0
        if job == "reencrypt":
            assert report.values_by_version == {1: ROWS}
            assert _read(engine, records) == expected
    raw = sa.table("records", sa.column("id"), sa.column("value"))
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(raw.c.id, raw.c.value)).all())
    assert {i: bytes(v) for i, v in stored.items()} == {i: v.encode() for i, v in expected.items()}
    registry.close()
    engine.dispose()


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_envelope", "--url", url, *args],
        env={"PATH": os.environ.get("PATH", ""), "ENVELOPE_ROOT_KEY": ROOT},
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_batch_that_keeps_losing_fails_with_the_reason(db_url: str) -> None:
    """A lock held for the whole job: the batch is tried a few times, then
    the command fails in one line with the driver's reason, which for a lock
    conflict holds no value and reads in full; a reason that can hold one
    (a duplicate entry) stays masked."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    records = _records(engine)
    impatient = _short_lock_waits_url(db_url)
    reasons = {
        "sqlite": "OperationalError: database is locked",
        "postgresql": "LockNotAvailable: canceling statement due to lock timeout",
        "mysql": "OperationalError: (1205) Lock wait timeout exceeded; try restarting transaction",
    }
    dialect = "mysql" if engine.dialect.name in ("mysql", "mariadb") else engine.dialect.name
    for _ in range(2):
        with row_locked(db_url, "records", 5, until=threading.Event()):
            result = _cli(impatient, "decrypt-in-place", "records.value", "--yes")
        assert result.returncode == 6, result.stderr
        (line,) = result.stderr.splitlines()
        assert line == (
            "error: decrypt-in-place: records: the database refused a statement: "
            f"{reasons[dialect]}"
        )
    assert _read(engine, records) == {i: f"record {i}" for i in range(ROWS)}
    assert registry.census(records.c.value)[0].not_ciphertext == 0  # nothing decrypted

    twins = sa.Table(
        "twins",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", EncryptedType(sa.String(60), storage="text"), unique=True),
    )
    twins.create(engine)
    secret = "the same secret twice"
    with engine.begin() as conn:  # randomized: two different ciphertexts
        conn.execute(twins.insert(), [{"id": 1, "value": secret}, {"id": 2, "value": secret}])
    for _ in range(2):
        result = _cli(db_url, "decrypt-in-place", "twins.value", "--yes")
        assert result.returncode == 6, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: decrypt-in-place: twins: the database refused a statement")
        assert secret not in line and "same secret" not in line
        if dialect == "mysql":
            assert "(1062) Duplicate entry '***' for key" in line
    registry.close()
    engine.dispose()


def test_shard_processes_at_once_finish_on_a_server(server_url: str) -> None:
    """Four `decrypt-in-place --shard K/4` processes at once on one table, and
    four `reencrypt --encrypt-plaintext --shard K/4` back, five times over:
    on MariaDB their batches (and, for text storage, the ALTERs that give the
    column its character set) deadlock now and then; every process finishes,
    exit 0, and every value reads as written."""
    engine = sa.create_engine(server_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    table = sa.Table(
        "visits",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("note", EncryptedType(sa.String(60), storage="text", migrating=True)),
    )
    table.create(engine)
    expected = {i: f"visit note {i}" for i in range(1500)}
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "note": n} for i, n in expected.items()])

    def at_once(*args: str) -> None:
        env = {"PATH": os.environ.get("PATH", ""), "ENVELOPE_ROOT_KEY": ROOT}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sqlalchemy_envelope",
                    "--url",
                    server_url,
                    *args,
                    "visits.note",
                    "--batch-size",
                    "100",
                    "--no-progress",
                    "--shard",
                    f"{k}/4",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in range(4)
        ]
        failures = [p.communicate()[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, failures

    for _ in range(5):
        at_once("decrypt-in-place", "--yes")
        assert registry.census(table.c.note)[0].not_ciphertext == len(expected)
        at_once("reencrypt", "--encrypt-plaintext")
        assert registry.census(table.c.note)[0].not_ciphertext == 0
        assert _read(engine, table) == expected
    registry.close()
    engine.dispose()
