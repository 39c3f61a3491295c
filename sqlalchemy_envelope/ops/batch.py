"""The batch engine: every job that rewrites a table's rows in place
(re-encrypt, decrypt in place, the blind-index backfill) runs on it.

A job names the rows that still have work to do and decides, row by row,
what to write (`TableJob`); the engine does the rest, the same way for all:

* Keyset paging by primary key (never OFFSET), composite keys included,
  selecting only rows with work left: a job killed at any point finishes on
  the next run, redoing at most the batch whose transaction did not commit.
* One short transaction per batch, run again (a few times, after a jittered
  pause) when it loses a lock conflict: a deadlock, a lock wait timeout, a
  serialization failure, SQLite's "database is locked".
* Compare-and-swap writes, one ``executemany`` per batch (and shape of
  write): a row is written only if it still holds what was read, so a
  concurrent application write is never lost; the row counts as skipped and
  is retried by the next pass.
* Exact counts. The rowcount is trusted only when the dialect says it is
  sane for ``executemany`` and it says every write applied; otherwise the
  rows are read back, and a row is credited only if it holds what was
  written (ciphertext is unique, and a digest is guarded by the sources it
  was computed from). Writes between plaintext and ciphertext, which a
  database may store otherwise than written, go one by one and are always
  read back; a value stored otherwise is put back and named.
* A progress bar on a terminal; parallel workers (forked processes, each on
  a primary-key range) and shards, for many machines.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import (
    ConfigurationError,
    ConnectionLostError,
    EnvelopeError,
    StatementFailedError,
    database_reason,
)
from ..keys.store import KeyStore
from .migration_report import NOT_STORED, MigrationReport
from .shards import Shard

__all__ = ["PASSES", "Change", "RowWrite", "TableJob", "check_options", "run"]

PASSES = 3  # passes over rows skipped because the application wrote them meanwhile


# -- what a job gives the engine ---------------------------------------------------------


def _no_credit(report: MigrationReport) -> None:
    return None


@dataclass(frozen=True)
class Change:
    """A value to write into ``column`` (a key of the job's ``stored``) in
    place of ``old``; ``credit`` is called once the write applied, ``name``
    (``table.column``) names a value left behind. ``checked``: the database
    may store the value otherwise than written (between plaintext and
    ciphertext: longer than the column, or characters its character set
    lacks), so it is written alone and read back."""

    column: str
    value: Any
    old: Any
    name: str
    credit: Callable[[MigrationReport], None] = _no_credit
    checked: bool = False


@dataclass(frozen=True)
class RowWrite:
    """A row's compare-and-swap: its primary key, its changes, and other
    columns it must still hold as read (``guards``: column, value)."""

    key: tuple[Any, ...]
    changes: tuple[Change, ...]
    guards: tuple[tuple[str, Any], ...] = ()

    @property
    def checked(self) -> bool:
        return any(c.checked for c in self.changes)


Rewrite = Callable[[tuple[Any, ...], Sequence[Any], MigrationReport], RowWrite | None]


def _no_check(writes: Sequence[RowWrite]) -> None:
    return None


@dataclass(frozen=True)
class TableJob:
    """One table's work. ``primary_key`` and ``stored`` (by column key) are
    the columns as stored, bypassing any type processing; ``selected`` is
    what ``rewrite(key, values, report)`` gets for each ``pending`` row, and
    it returns the row's write, or None (counting what it leaves in the
    report). ``check`` may refuse a batch's writes before any is made."""

    name: str
    table: sa.TableClause
    primary_key: tuple[sa.ColumnElement[Any], ...]
    selected: tuple[sa.ColumnElement[Any], ...]
    stored: Mapping[str, sa.ColumnElement[Any]]
    pending: sa.ColumnElement[bool]
    rewrite: Rewrite
    check: Callable[[Sequence[RowWrite]], None] = _no_check


# -- the engine --------------------------------------------------------------------------


def run(
    conns: KeyStore,
    jobs: Sequence[TableJob],
    report: MigrationReport,
    *,
    batch_size: int,
    workers: int = 1,
    shard: Shard | None = None,
    progress: bool | None = None,
    label: str,
) -> bool:
    """Run ``jobs`` to the end, in up to `PASSES` passes while rows were
    skipped, counting into ``report``; the caller checked the options first
    (`check_options`). True if the last pass skipped no row (nothing is left
    to do but what the report names)."""
    report.shard = None if shard is None else (shard.index, shard.count)
    parts = [(job, _in_shard(conns, job, shard)) for job in jobs]
    bar = _progress(
        lambda: sum(_count_pending(conns, job, part) for job, part in parts), progress, label
    )
    metrics = conns.metrics

    def tick(rows: int) -> None:
        if bar is not None:
            bar.update(rows)
        if metrics is not None and rows:
            metrics.job_rows(label, rows)

    this_pass = MigrationReport()
    try:
        for _ in range(PASSES):
            this_pass = MigrationReport()
            for job, part in parts:
                if workers == 1:
                    _run_slice(conns, job, batch_size, this_pass, part, tick)
                else:
                    _run_parallel(conns, job, batch_size, workers, this_pass, part, tick)
            report.forget_left()
            report.merge(this_pass)
            if not this_pass.skipped:
                break
    finally:
        if bar is not None:
            bar.close()
    if metrics is not None:
        metrics.job_left(label, report.left_behind)
    return not this_pass.skipped


def check_options(batch_size: int, workers: int, conns: KeyStore) -> None:
    """Refuse options the engine cannot run with, before a job does anything."""
    if batch_size < 1 or workers < 1:
        raise ConfigurationError("batch_size and workers must be at least 1")
    if workers > 1 and conns.pinned:
        raise ConfigurationError("parallel workers cannot share one pinned connection")


def _in_shard(conns: KeyStore, job: TableJob, shard: Shard | None) -> sa.ColumnElement[bool] | None:
    """The shard's condition on the job's table, over the integer columns of
    its primary key (as the database declares them)."""
    if shard is None:
        return None
    table = job.table
    with conns.connect() as conn:
        declared = {
            c["name"]: c["type"]
            for c in sa.inspect(conn).get_columns(table.name, schema=table.schema)
        }
    integers = [
        c for c in job.primary_key if isinstance(declared.get(getattr(c, "name", "")), sa.Integer)
    ]
    if not integers:
        raise ConfigurationError(
            f"{job.name}: a shard takes the rows whose primary key hashes to it, from the "
            "key's integer columns, and this table's primary key has none: run the job "
            "without a shard (workers=N / --workers N parallelize it on one machine)"
        )
    return shard.condition(integers)


def _count_pending(
    conns: KeyStore, job: TableJob, condition: sa.ColumnElement[bool] | None = None
) -> int:
    """Rows of the job (and of ``condition``) that still have work to do."""
    stmt = sa.select(sa.func.count()).select_from(job.table).where(job.pending)
    if condition is not None:
        stmt = stmt.where(condition)
    with conns.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def _run_slice(
    conns: KeyStore,
    job: TableJob,
    batch_size: int,
    report: MigrationReport,
    condition: sa.ColumnElement[bool] | None,
    on_batch: Callable[[int], None],
) -> None:
    pk = job.primary_key
    width = len(pk)
    last: tuple[Any, ...] | None = None

    def one_batch(conn: Connection) -> tuple[tuple[Any, ...] | None, MigrationReport]:
        """The next batch after ``last``: its last key (None when no row is
        left) and what it did, counted apart, so that a batch run again after
        a lost lock conflict counts once."""
        done = MigrationReport()
        stmt = sa.select(*pk, *job.selected).where(job.pending)
        if condition is not None:
            stmt = stmt.where(condition)
        if last is not None:
            stmt = stmt.where(sa.tuple_(*pk) > sa.tuple_(*last))
        rows = conn.execute(stmt.order_by(*pk).limit(batch_size)).all()
        if not rows:
            return None, done
        done.rows_scanned += len(rows)
        writes = []
        for row in rows:
            write = job.rewrite(tuple(row[:width]), row[width:], done)
            if write is not None:
                writes.append(write)
        if writes:
            job.check(writes)
            _write(conn, job, writes, done)
        return tuple(rows[-1][:width]), done

    while True:
        try:
            last, done = conns.transaction(one_batch)
        except sa.exc.StatementError as error:
            raise _statement_failure(job, error) from None
        if last is None:
            return
        report.merge(done)
        on_batch(done.rows_scanned)


def _statement_failure(job: TableJob, error: sa.exc.StatementError) -> StatementFailedError:
    """A batch's failed statement, by its reason only (SQLAlchemy's text lists
    the statement's values): a lost connection, or the database's refusal."""
    reason = database_reason(error)
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return ConnectionLostError(f"{job.name}: lost the connection to the database: {reason}")
    return StatementFailedError(f"{job.name}: the database refused a statement: {reason}")


# A write's shape: the columns it changes (each with whether it replaces
# NULL), its guards (each with whether it is NULL), and whether it is checked.
_Shape = tuple[tuple[tuple[str, bool], ...], tuple[tuple[str, bool], ...], bool]


def _shape(write: RowWrite) -> _Shape:
    return (
        tuple((c.column, c.old is None) for c in write.changes),
        tuple((column, value is None) for column, value in write.guards),
        write.checked,
    )


def _holds(column: sa.ColumnElement[Any], is_null: bool, name: str) -> sa.ColumnElement[bool]:
    return column.is_(None) if is_null else column == sa.bindparam(name)


def _cas(job: TableJob, shape: _Shape) -> sa.Update:
    """The compare-and-swap UPDATE of writes of one shape."""
    changes, guards, _ = shape
    return (
        sa.update(job.table)
        .where(*(c == sa.bindparam(f"pk_{i}") for i, c in enumerate(job.primary_key)))
        .where(
            *(_holds(job.stored[col], null, f"old_{i}") for i, (col, null) in enumerate(changes))
        )
        .where(*(_holds(job.stored[col], null, f"was_{i}") for i, (col, null) in enumerate(guards)))
        .values({col: sa.bindparam(f"new_{i}") for i, (col, _) in enumerate(changes)})
    )


def _params(write: RowWrite) -> dict[str, Any]:
    params = {f"pk_{i}": v for i, v in enumerate(write.key)}
    for i, change in enumerate(write.changes):
        params[f"new_{i}"] = change.value
        if change.old is not None:
            params[f"old_{i}"] = change.old
    for i, (_, value) in enumerate(write.guards):
        if value is not None:
            params[f"was_{i}"] = value
    return params


def _write(
    conn: Connection, job: TableJob, writes: Sequence[RowWrite], report: MigrationReport
) -> None:
    """Make the batch's compare-and-swaps, crediting only those that applied."""
    groups: dict[_Shape, list[RowWrite]] = {}
    for write in writes:
        groups.setdefault(_shape(write), []).append(write)
    for shape, group in groups.items():
        stmt = _cas(job, shape)
        if shape[2]:
            _write_checked(conn, job, stmt, group, report)
            continue
        result = conn.execute(stmt, [_params(w) for w in group])
        if conn.dialect.supports_sane_multi_rowcount and result.rowcount == len(group):
            for write in group:  # every compare-and-swap applied
                _credit(write.changes, report)
        else:
            _verify(conn, job, group, report)


def _credit(changes: Iterable[Change], report: MigrationReport) -> None:
    report.rows_updated += 1
    for change in changes:
        change.credit(report)


def _verify(
    conn: Connection, job: TableJob, writes: Sequence[RowWrite], report: MigrationReport
) -> None:
    """Find out which compare-and-swaps applied: a row holding what was
    written, and still what its guards read, was written by this job. A
    row changed or deleted by the application meanwhile is skipped (and
    retried)."""
    stored = _read_back(conn, job, writes)
    for write in writes:
        row = stored.get(write.key)
        if row is not None and _as_written(row, write):
            _credit(write.changes, report)
        else:
            report.skipped += 1


def _as_written(row: Mapping[str, Any], write: RowWrite) -> bool:
    return all(_same(row[c.column], c.value) for c in write.changes) and all(
        _same(row[column], value) for column, value in write.guards
    )


def _write_checked(
    conn: Connection,
    job: TableJob,
    stmt: sa.Update,
    writes: Sequence[RowWrite],
    report: MigrationReport,
) -> None:
    """Writes the database may store otherwise than written, without an
    error when MySQL is not in strict mode: each compare-and-swap alone, so
    that its row count tells whether it applied; then read back what each
    row holds. A value stored otherwise is put back as it was (the row is
    still ours, locked by the write) and named, never counted as done."""
    applied = []
    for write in writes:
        if conn.execute(stmt, _params(write)).rowcount == 1:
            applied.append(write)
        else:
            report.skipped += 1  # the application wrote it meanwhile: retried
    if not applied:
        return
    stored = _read_back(conn, job, applied)
    for write in applied:
        row = stored[write.key]
        wrong = [c for c in write.changes if not _same(row[c.column], c.value)]
        if wrong:
            conn.execute(
                sa.update(job.table)
                .where(*(c == v for c, v in zip(job.primary_key, write.key, strict=True)))
                .values({c.column: c.old for c in wrong})
            )
            for change in wrong:
                report.leave(change.name, write.key, NOT_STORED, failure=True)
        right = [c for c in write.changes if c not in wrong]
        if right:
            _credit(right, report)


def _read_back(
    conn: Connection, job: TableJob, writes: Sequence[RowWrite]
) -> dict[tuple[Any, ...], Mapping[str, Any]]:
    """The rows of ``writes`` as stored now (their stored columns, by key),
    by primary key."""
    pk = job.primary_key
    keys = sorted(w.key for w in writes)
    columns = list(job.stored)
    labeled = [job.stored[c].label(f"c_{i}") for i, c in enumerate(columns)]
    rows = conn.execute(
        sa.select(*pk, *labeled).where(sa.tuple_(*pk) >= keys[0], sa.tuple_(*pk) <= keys[-1])
    )
    width = len(pk)
    return {tuple(row[:width]): dict(zip(columns, row[width:], strict=True)) for row in rows}


def _same(stored: Any, written: Any) -> bool:
    if isinstance(stored, memoryview):
        stored = stored.tobytes()
    if isinstance(written, memoryview):
        written = written.tobytes()
    return bool(stored == written)


# -- progress and parallel workers -------------------------------------------------------


def _progress(total: Callable[[], int], enabled: bool | None, label: str) -> Any:
    """A tqdm bar on a terminal; nothing when output is not a terminal or tqdm
    is not installed (it comes with the ``cli`` extra)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total(), desc=label, unit="row", file=sys.stderr, leave=True)


def _key_ranges(
    conns: KeyStore, job: TableJob, workers: int, condition: sa.ColumnElement[bool] | None
) -> list[sa.ColumnElement[bool] | None]:
    """Split the job's rows (of ``condition``) into ``workers`` ranges of the
    first key column; each range's condition."""
    first = job.primary_key[0]
    bucket = sa.func.ntile(workers).over(order_by=first).label("bucket")
    inner = sa.select(first.label("k"), bucket)
    if condition is not None:
        inner = inner.where(condition)
    sub = inner.subquery()
    stmt = sa.select(sa.func.max(sub.c.k)).group_by(sub.c.bucket).order_by(sa.func.max(sub.c.k))
    with conns.connect() as conn:
        bounds = list(conn.execute(stmt).scalars())
    ranges: list[sa.ColumnElement[bool] | None] = []
    low = None
    for high in [*bounds[:-1], None]:
        parts = [condition] if condition is not None else []
        if low is not None:
            parts.append(first > low)
        if high is not None:
            parts.append(first <= high)
        ranges.append(sa.and_(*parts) if parts else None)
        low = high
    return ranges


@dataclass(frozen=True)
class _Failure:
    """Why a worker stopped: an error's type name, and its text if safe."""

    kind: str
    text: str

    def error(self) -> EnvelopeError:
        for kind in (ConfigurationError, StatementFailedError, ConnectionLostError):
            if self.kind == kind.__name__:
                return kind(self.text)
        return EnvelopeError(
            f"a worker failed ({self.kind}{': ' + self.text if self.text else ''}); "
            "run the job again to finish"
        )


def _worker(
    conns: KeyStore,
    job: TableJob,
    batch_size: int,
    condition: sa.ColumnElement[bool] | None,
    done: Any,
    results: Any,
) -> None:
    conns.after_fork()
    report = MigrationReport()
    parent = os.getppid()

    def count(n: int) -> None:
        with done.get_lock():
            done.value += n
        if os.getppid() != parent:
            os._exit(1)  # the job's process died: stop after a committed batch

    try:
        _run_slice(conns, job, batch_size, report, condition, count)
    except Exception as error:
        # Reported to the parent, never printed here; only a library error's
        # text is safe to pass on (it never holds a value). sys.exit lets the
        # queue flush, and exits without a traceback.
        text = str(error) if isinstance(error, EnvelopeError) else ""
        results.put(_Failure(type(error).__name__, text))
        sys.exit(1)
    results.put(report)


def _run_parallel(
    conns: KeyStore,
    job: TableJob,
    batch_size: int,
    workers: int,
    report: MigrationReport,
    condition: sa.ColumnElement[bool] | None,
    tick: Callable[[int], None],
) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigurationError("parallel workers need the 'fork' start method (Linux, macOS)")
    ctx = multiprocessing.get_context("fork")
    done = ctx.Value("q", 0)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(conns, job, batch_size, part, done, results))
        for part in _key_ranges(conns, job, workers, condition)
    ]
    for proc in procs:
        proc.start()
    reported = 0
    collected: list[MigrationReport | _Failure] = []
    while len(collected) < len(procs):
        try:
            collected.append(results.get(timeout=0.2))
        except Exception:  # queue.Empty: keep the progress bar moving
            if all(not p.is_alive() for p in procs) and results.empty():
                break
        tick(done.value - reported)
        reported = done.value
    for proc in procs:
        proc.join()
    for part in collected:
        if isinstance(part, _Failure):
            raise part.error()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise EnvelopeError(f"{len(failed)} workers failed; run the job again to finish")
    for part in collected:
        assert isinstance(part, MigrationReport)
        report.merge(part)
