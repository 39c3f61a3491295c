"""The batch engine behind reencrypt, decrypt_in_place and backfill_index:
exact counts whether or not the driver's rowcounts can be trusted, with the
application writing rows between a batch's read and its compare-and-swap;
shards that split a table the same way every time, disjoint and covering
every row; and shards run as separate processes of the command line, one
killed with SIGKILL and run again."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import async_engine_for, column_storage, type_storage
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import (
    AsyncKeyRegistry,
    ConfigurationError,
    EncryptedType,
    KeyRegistry,
    StaticRootKey,
    blind_index,
)
from sqlalchemy_envelope.ops.shards import shard_of


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(60)))
    body_index: Mapped[str | None] = blind_index("body")


MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_envelope import EncryptedType, blind_index

class Base(DeclarativeBase):
    pass

class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(60)))
    body_index: Mapped[str | None] = blind_index("body")
"""


def _ledger() -> sa.Table:
    """A table whose keys are big, negative, and stride by 3."""
    return sa.Table(
        "ledger",
        sa.MetaData(),
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("value", EncryptedType(sa.String(60))),
    )


def _notes(engine: sa.Engine, rows: int) -> dict[int, str]:
    """``rows`` notes written by the application, then their index cleared,
    as before a backfill; the bodies by id."""
    Base.metadata.create_all(engine)
    bodies = {i: f"note number {i}" for i in range(rows)}
    with Session(engine) as session:
        session.add_all(Note(id=i, body=body) for i, body in bodies.items())
        session.commit()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET body_index = NULL"))
    return bodies


def _header_ids(engine: sa.Engine, table: str, column: str, header: bytes) -> set[int]:
    """Ids of the rows whose value starts with ``header`` (a key's values)."""
    query = sa.text(f"SELECT id FROM {table} WHERE substr({column}, 1, 6) = :h")
    with engine.connect() as conn:
        return set(conn.execute(query, {"h": header}).scalars())


def _indexed_rightly(engine: sa.Engine, expected: dict[int, str]) -> bool:
    """Whether every note's index finds it, and only it, by its body."""
    with Session(engine) as session:
        stored = dict(session.execute(sa.select(Note.id, Note.body_index)).all())
        digests = {}
        for i, body in expected.items():
            found = session.execute(
                sa.select(Note.id, Note.body_index).where(Note.body_index.matches(body))
            ).all()
            if [row.id for row in found] != [i]:
                return False
            digests[i] = found[0].body_index
    return stored == digests


@contextmanager
def writes_between_read_and_write(
    engine: Any, table: str, write: Callable[[int], None]
) -> Iterator[None]:
    """Just before each batch's compare-and-swap UPDATE of ``table`` runs on
    ``engine`` (batch 0, 1, ...), the application commits ``write(batch)`` on
    connections of its own: rows the batch read, changed before it writes."""
    batches = 0

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal batches
        if statement.lstrip().upper().startswith(f"UPDATE {table.upper()} "):
            write(batches)
            batches += 1

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)


class Application:
    """Another process's writes, on its own engine and registry: two rows of
    each batch of 50 (pass one reads rows 50b..50b+49 in batch b)."""

    def __init__(self, url: str, root_key: StaticRootKey, bodies: dict[int, str]) -> None:
        self.engine = sa.create_engine(url)
        self.registry = KeyRegistry(self.engine, root_key)
        self.bodies = bodies
        self.written: list[int] = []
        self.writes = 0

    def write(self, batch: int) -> None:
        with Session(self.engine) as session:
            for i in (50 * batch + 3, 50 * batch + 20):
                if i in self.bodies:
                    self.writes += 1
                    self.bodies[i] = f"written by the application, write {self.writes}"
                    session.get_one(Note, i).body = self.bodies[i]
                    self.written.append(i)
            session.commit()

    def close(self) -> None:
        self.registry.close()
        self.engine.dispose()


@pytest.mark.parametrize("rowcounts", ["trusted", "untrusted"])
def test_counts_are_exact_when_the_application_writes_mid_batch(
    db_url: str, root_key: StaticRootKey, rowcounts: str
) -> None:
    """Rows the application changes between a batch's read and its write
    are skipped, never counted as written: with the driver's rowcounts, and
    with rowcounts the dialect does not vouch for (``executemany`` on
    asyncpg or psycopg2's batch modes), where the engine reads rows back."""
    engine = sa.create_engine(db_url)
    if rowcounts == "untrusted":
        engine.dialect.supports_sane_multi_rowcount = False
    registry = KeyRegistry(engine, root_key)
    registry.init()
    bodies = _notes(engine, 300)
    registry.rotate()
    application = Application(db_url, root_key, bodies)

    for form in ("reencrypt", "backfill"):
        application.written.clear()
        with engine.begin() as conn:  # the application's writes filled some
            conn.execute(sa.text("UPDATE notes SET body_index = NULL"))
        with writes_between_read_and_write(engine, "notes", application.write):
            if form == "reencrypt":
                report = registry.reencrypt(Note.body, batch_size=50, progress=False)
            else:
                report = registry.backfill_index(Note.body_index, batch_size=50, progress=False)
        changed = len(application.written)
        assert changed == 12  # two in each of the six batches
        assert report.rows_scanned == 300 and report.left_behind == 0
        assert report.rows_updated == 300 - changed and report.skipped == changed
        if form == "reencrypt":
            assert report.values_by_version == {1: 300 - changed}
    active = registry.envelope.active_header()
    assert _header_ids(engine, "notes", "body", active) == set(range(300))
    with Session(engine) as session:
        assert dict(session.execute(sa.select(Note.id, Note.body)).all()) == bodies
    assert _indexed_rightly(engine, bodies)
    application.close()
    registry.close()
    engine.dispose()


def test_counts_are_exact_on_asyncpg(pg_url: str, root_key: StaticRootKey) -> None:
    """asyncpg reports no trustworthy rowcount for ``executemany``: the
    counts of the async registry's jobs are still exact."""
    setup = sa.create_engine(pg_url)
    registry = KeyRegistry(setup, root_key)
    registry.init()
    bodies = _notes(setup, 150)
    registry.rotate()
    application = Application(pg_url, root_key, bodies)

    async def main() -> None:
        engine = async_engine_for(pg_url)
        assert not engine.sync_engine.dialect.supports_sane_multi_rowcount
        jobs = AsyncKeyRegistry(engine, root_key)
        await jobs.init()
        with writes_between_read_and_write(engine.sync_engine, "notes", application.write):
            moved = await jobs.reencrypt(Note.body, batch_size=50)
        assert len(application.written) == 6
        application.written.clear()
        with setup.begin() as conn:  # the application's writes filled some
            conn.execute(sa.text("UPDATE notes SET body_index = NULL"))
        with writes_between_read_and_write(engine.sync_engine, "notes", application.write):
            filled = await jobs.backfill_index(Note.body_index, batch_size=50)
        assert moved.rows_updated == 144 and moved.skipped == 6
        assert moved.values_by_version == {1: 144}
        assert len(application.written) == 6
        assert filled.rows_updated == 144 and filled.skipped == 6
        await jobs.close()
        await engine.dispose()

    asyncio.run(main())
    assert _header_ids(setup, "notes", "body", registry.envelope.active_header()) == set(range(150))
    assert _indexed_rightly(setup, bodies)
    application.close()
    registry.close()
    setup.dispose()


def test_shards_are_disjoint_cover_every_row_and_stay_put(
    db_url: str, root_key: StaticRootKey
) -> None:
    """Each shard moves exactly the rows `shard_of` gives it, every row
    belongs to one shard, keys striding by N spread over all shards, and a
    row stays in its shard while rows are inserted."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    ledger = _ledger()
    ledger.metadata.create_all(engine)
    ids = [3 * i for i in range(-300, 900)] + [2**62 + 7, -(2**62) - 5, 2**63 - 1, -(2**63)]
    with engine.begin() as conn:
        conn.execute(ledger.insert(), [{"id": i, "value": f"entry {i}"} for i in ids])

    def stored() -> dict[int, bytes]:
        with engine.connect() as conn:
            query = sa.text("SELECT id, value FROM ledger")
            return {i: bytes(v) for i, v in conn.execute(query).all()}

    def run_shard(shard: tuple[int, int], **options: Any) -> set[int]:
        """Rotate, run the shard, and return the rows it rewrote."""
        registry.rotate()
        before = stored()
        report = registry.reencrypt(ledger.c.value, shard=shard, progress=False, **options)
        after = stored()
        moved = {i for i in before if after[i] != before[i]}
        assert report.shard == shard and report.to_dict()["shard"] == {
            "index": shard[0],
            "count": shard[1],
        }
        assert report.rows_updated == report.rows_scanned == len(moved)
        return moved

    shards = [run_shard((k, 3), batch_size=97) for k in range(3)]
    for k, moved in enumerate(shards):
        assert moved == {i for i in ids if shard_of((i,), 3) == k}
        assert len(moved) > len(ids) // 5  # keys striding by 3 still spread
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert shards[0] | shards[1] | shards[2] == set(ids)

    added = [3 * i + 1 for i in range(50)]
    with engine.begin() as conn:
        conn.execute(ledger.insert(), [{"id": i, "value": f"entry {i}"} for i in added])
    again = run_shard((1, 3), batch_size=40, workers=2)
    assert again & set(ids) == shards[1]
    assert again - set(ids) == {i for i in added if shard_of((i,), 3) == 1}

    with engine.connect() as conn:
        values = dict(conn.execute(sa.select(ledger.c.id, ledger.c.value)).all())
    assert values == {i: f"entry {i}" for i in [*ids, *added]}
    assert registry.decrypt_in_place(ledger.c.value, shard=(0, 2)).rows_updated > 0
    plain = {i for i, v in stored().items() if v == f"entry {i}".encode()}
    assert plain == {i for i in [*ids, *added] if shard_of((i,), 2) == 0}
    registry.close()
    engine.dispose()


def test_a_shard_converts_the_column_to_ascii_only_when_every_shard_is_done(
    db_url: str, root_key: StaticRootKey
) -> None:
    """Encrypting a column of plaintext in any script in place, shard by
    shard: on MySQL/MariaDB it stays utf8mb4 until the last shard leaves no
    plaintext, which then makes it ASCII."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, root_key)
    registry.init()

    def migrating() -> EncryptedType:
        return EncryptedType(sa.String(50), storage="text", migrating=True)

    authors = sa.Table(
        "authors",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", migrating()),
    )
    authors.metadata.create_all(engine)
    plain = sa.table("authors", sa.column("id"), sa.column("name"))
    names = {i: f"Zoë Ångström {i}" for i in range(40)}
    with engine.begin() as conn:  # legacy plaintext, as before the column was encrypted
        conn.execute(plain.insert(), [{"id": i, "name": n} for i, n in names.items()])

    first = registry.reencrypt(authors.c.name, shard=(0, 2), batch_size=7, progress=False)
    assert first.plaintext_encrypted == len([i for i in names if shard_of((i,), 2) == 0])
    assert column_storage(engine, "authors", "name") == type_storage(engine, migrating())
    second = registry.reencrypt(authors.c.name, shard=(1, 2), batch_size=7, progress=False)
    assert first.plaintext_encrypted + second.plaintext_encrypted == len(names)
    encrypted = EncryptedType(sa.String(50), storage="text")
    assert column_storage(engine, "authors", "name") == type_storage(engine, encrypted)
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(authors.c.id, authors.c.name)).all()) == names
    registry.close()
    engine.dispose()


def test_bad_shards_are_refused(db_url: str, root_key: StaticRootKey) -> None:
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, root_key)
    registry.init()
    ledger = _ledger()
    ledger.metadata.create_all(engine)
    bad: list[Any] = [(3, 3), (-1, 3), (0, 0), (True, 2), ("0", 3), (1,), 2, (0, 2**31)]
    for shard in bad:
        with pytest.raises(ConfigurationError, match=r"0 <= K < N \(K counts from 0"):
            registry.reencrypt(ledger.c.value, shard=shard)
    largest = registry.reencrypt(ledger.c.value, shard=(2**31 - 2, 2**31 - 1))
    assert largest.shard == (2**31 - 2, 2**31 - 1)
    by_name = sa.Table(
        "by_name",
        sa.MetaData(),
        sa.Column("name", sa.String(20), primary_key=True),
        sa.Column("value", EncryptedType(sa.String(60))),
    )
    by_name.create(engine)
    with pytest.raises(ConfigurationError, match=r"by_name: .* has none"):
        registry.reencrypt(by_name.c.value, shard=(0, 2))
    registry.close()
    engine.dispose()


ROOT = base64.b64encode(os.urandom(32)).decode()


def _cli(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "sqlalchemy_envelope", "--url", url, "--json", *args]


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "ENVELOPE_ROOT_KEY": ROOT, **extra}


def test_bad_shard_options_are_usage_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    for command in (("reencrypt", "t.c"), ("decrypt-in-place", "t.c"), ("backfill-index", "m:C.a")):
        bad = ["3/3", "-1/3", "1/0", "1", "a/b", "1/2/3", " 0/4", "0/4 ", "0/4\n", "+1/+4"]
        bad += ["1_0/20", "\uff10/\uff14", "\u0660/\u0664", "0/2147483648", "0/" + "9" * 5000]
        for value in bad:
            result = subprocess.run(
                [*_cli(url, *command, "--shard", value)],
                env=_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 2, (command, value, result.stderr)
            assert "Invalid value for '--shard'" in result.stderr
            assert "0 <= K < N" in result.stderr and "at most 2147483647" in result.stderr
            assert repr(value)[:40] in result.stderr
    assert (
        "JOB_COMPLETION_INDEX"
        in subprocess.run(
            [*_cli(url, "reencrypt", "--help")],
            env=_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def _three_shards_one_killed(
    command: Callable[[int], list[str]],
    done_in: Callable[[int], int],
    sizes: list[int],
    restart: Callable[[], None],
    **popen: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Start shards 0, 1 and 2 of ``command`` as processes at once; SIGKILL
    shard 1 once it did part of its rows (``done_in(1)``), let the others
    finish, then run shard 1 again. ``restart`` puts every row back to do
    for another try, if shard 1 finished or was killed before starting. The
    reports of shard 0, 2 and the rerun of 1; and what the killed run did."""
    for at in (sizes[1] // 3, sizes[1] // 10, 5):
        restart()
        procs = {
            k: subprocess.Popen(
                command(k), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
            )
            for k in (0, 1, 2)
        }
        while procs[1].poll() is None and done_in(1) < at:
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        reports: dict[int, dict[str, Any]] = {}
        for k in (0, 2):
            out, err = procs[k].communicate(timeout=300)
            assert procs[k].returncode == 0, err
            reports[k] = json.loads(out)
        _, err = procs[1].communicate()
        assert procs[1].returncode in (0, -signal.SIGKILL), err
        killed = done_in(1)
        if procs[1].returncode == -signal.SIGKILL and 0 < killed < sizes[1]:
            break
    else:
        pytest.fail("shard 1 was never killed half way")
    assert [done_in(k) for k in (0, 2)] == [sizes[0], sizes[2]]
    rerun = subprocess.run(command(1), capture_output=True, text=True, check=False, **popen)
    assert rerun.returncode == 0, rerun.stderr
    reports[1] = json.loads(rerun.stdout)
    return [reports[k] for k in (0, 1, 2)], killed


def test_shard_processes_reencrypt_with_one_killed_and_rerun(db_url: str) -> None:
    """Three `reencrypt --shard K/3` processes at once, as three machines
    would run them; one is killed and run again: every value ends under the
    active key and reads as written, each row moved once."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    ledger = _ledger()
    ledger.metadata.create_all(engine)
    ids = list(range(3000))
    with engine.begin() as conn:
        conn.execute(ledger.insert(), [{"id": i, "value": f"entry {i}"} for i in ids])
    members = [{i for i in ids if shard_of((i,), 3) == k} for k in range(3)]
    sizes = [len(m) for m in members]

    def done_in(k: int) -> int:
        active = registry.envelope.active_header()
        return len(_header_ids(engine, "ledger", "value", active) & members[k])

    def command(k: int) -> list[str]:
        args = ["ledger.value", "--batch-size", "10", "--no-progress", "--shard", f"{k}/3"]
        return _cli(db_url, "reencrypt", *args)

    reports, killed = _three_shards_one_killed(
        command, done_in, sizes, registry.rotate, env=_env(DATABASE_URL=db_url)
    )
    for k, report in enumerate(reports):
        assert report["shard"] == {"index": k, "count": 3}
        assert report["left_behind"] == 0
    assert [r["rows_updated"] for r in reports] == [sizes[0], sizes[1] - killed, sizes[2]]
    assert _header_ids(engine, "ledger", "value", registry.envelope.active_header()) == set(ids)
    with engine.connect() as conn:
        values = dict(conn.execute(sa.select(ledger.c.id, ledger.c.value)).all())
    assert values == {i: f"entry {i}" for i in ids}
    registry.close()
    engine.dispose()


def test_shard_processes_backfill_with_one_killed_and_rerun(db_url: str, tmp_path: Path) -> None:
    """Three `backfill-index --shard K/3` processes at once, one killed and
    run again: every row's index finds it, each row filled once."""
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    registry.init()
    bodies = _notes(engine, 2400)
    members = [{i for i in bodies if shard_of((i,), 3) == k} for k in range(3)]
    sizes = [len(m) for m in members]
    (tmp_path / "shard_models.py").write_text(MODELS)

    def done_in(k: int) -> int:
        with engine.connect() as conn:
            filled = conn.execute(sa.text("SELECT id FROM notes WHERE body_index IS NOT NULL"))
            return len(set(filled.scalars()) & members[k])

    def restart() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE notes SET body_index = NULL"))

    def command(k: int) -> list[str]:
        args = ["shard_models:Note.body_index", "--batch-size", "10", "--shard", f"{k}/3"]
        return _cli(db_url, "backfill-index", *args)

    reports, killed = _three_shards_one_killed(
        command, done_in, sizes, restart, env=_env(PYTHONPATH=str(tmp_path)), cwd=tmp_path
    )
    assert [r["shard"] for r in reports] == [{"index": k, "count": 3} for k in range(3)]
    assert [r["rows_updated"] for r in reports] == [sizes[0], sizes[1] - killed, sizes[2]]
    assert _indexed_rightly(engine, bodies)
    registry.close()
    engine.dispose()
