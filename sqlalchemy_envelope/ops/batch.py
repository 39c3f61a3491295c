"""The batch engine: every job that rewrites a table's rows in place
(re-encrypt, decrypt in place, the blind-index backfill) runs on it.

A job names the rows that still have work to do and decides, row by row,
what to write (`TableJob`); the engine does the rest, the same way for all:

* Keyset paging by primary key (never OFFSET), composite keys included,
  selecting only rows with work left: a job killed at any point finishes on
  the next run, redoing at most the batch whose transaction did not commit.
* One short transaction per batch.
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

Shards. ``shard=(K, N)`` (``--shard K/N``) takes the rows whose primary key
hashes to K, counting from 0 as Kubernetes' ``JOB_COMPLETION_INDEX`` does.
The hash is a function of the key alone: over the key's integer columns k1,
k2..., ``h = 0``, then ``h = ((h + k mod P) * 1327217884) mod P`` for each,
with ``P = 2**31 - 1``; the shard is ``h mod N`` (`shard_of`). So every machine
splits a table the same way whenever it starts, also while the application
inserts rows, and a rerun of shard K finds exactly the rows it left. Ranges
of the key would need its current bounds, which move as rows are inserted
(two shards starting at different moments would overlap or leave a gap),
and a plain ``k mod N`` puts every row in one shard when keys stride by N
(``auto_increment_increment``). The price: each shard walks the whole
primary key, skipping other shards' rows; it writes only its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ConfigurationError, EnvelopeError, StatementFailedError, database_reason
from ..keys.store import KeyStore

__all__ = [
    "Change",
    "LeftRow",
    "MigrationReport",
    "RowWrite",
    "Shard",
    "TableJob",
    "check_options",
    "explain",
    "run",
    "shard_of",
]

PASSES = 3  # passes over rows skipped because the application wrote them meanwhile
LISTED_PER_COLUMN = 100  # rows left behind that a report names, per column
NOT_STORED = "NotStoredExactly"  # the reason for a value the database changed on writing
UNKNOWN_DEFINITION = "UnknownDefinition"  # fails authentication, and the job has no definition

_REASONS = {
    "plaintext": (
        "legacy plaintext in a column not being converted (encrypt_plaintext=True, "
        "--encrypt-plaintext, or migrating=True)"
    ),
    "DecryptionError": (
        "fails authentication under a data key of this registry with the column's "
        "definition: altered, or written with other options (a context, bind_scope) "
        "than the column declares now"
    ),
    UNKNOWN_DEFINITION: (
        "does not decrypt with the default options (context TABLE.COLUMN, no bind_scope), "
        "and the column's definition is unknown (no model loaded defines it): pass "
        "--models your.models (or the Column/ORM attribute to the API; in a migration, "
        "import the models in env.py)"
    ),
    "UnknownKeyError": (
        "names a data key that data_keys does not hold: another database's "
        "ciphertext, or legacy plaintext that looks like ciphertext"
    ),
    "KeyDisabledError": "its data key is disabled: enable the key, then run the job again",
    "DestroyedKeyError": "its data key was destroyed: the value is unreadable for good",
    NOT_STORED: (
        "the database stored another value than the one written (a column too narrow for "
        "it, or one that changes text, such as CHAR dropping trailing spaces): the value "
        "was put back as it was; give the column a type that holds it, then run the job again"
    ),
    "NotText": (
        "its plaintext is not text (not UTF-8, or holds NUL): the column holds another "
        "type than strings, which cannot be written back in place; use a new column"
    ),
}


def explain(reason: str) -> str:
    """Why a value was left behind, and what to do, for people."""
    return _REASONS.get(reason, "does not decrypt")


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


# -- shards ----------------------------------------------------------------------------

_P = 2_147_483_647  # 2**31 - 1, prime: (h + k mod P) * _A stays below 2**63
_A = 1_327_217_884  # about P / 1.618 (Knuth's multiplicative hashing): spreads keys in
# any arithmetic progression over the shards, where a small multiplier leaves
# small keys striding by N in one shard


def shard_of(key: Sequence[int], count: int) -> int:
    """The shard of ``count`` that holds the row whose primary key has the
    integer columns ``key`` (in key order): what the database computes."""
    h = 0
    for part in key:
        h = (h + part % _P) * _A % _P
    return h % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count): the rows whose
    primary key hashes to ``index`` (see the module's docstring)."""

    index: int
    count: int

    @classmethod
    def of(cls, value: tuple[int, int] | Shard | None) -> Shard | None:
        """A shard from ``(K, N)``, checked; None for the whole table."""
        if value is None or isinstance(value, Shard):
            return value
        parts = tuple(value) if isinstance(value, tuple | list) else ()
        if len(parts) == 2 and all(type(p) is int for p in parts) and 0 <= parts[0] < parts[1]:
            return cls(parts[0], parts[1])
        raise ConfigurationError(f"shard=(K, N) takes {_SHARD_RULE}, not {value!r}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/N``, as ``--shard`` takes it."""
        index, slash, count = text.strip().partition("/")
        try:
            if slash:
                return cls._checked(int(index), int(count))
        except ValueError:
            pass
        raise ConfigurationError(f"a shard is K/N, {_SHARD_RULE}, not {text!r}")

    @classmethod
    def _checked(cls, index: int, count: int) -> Shard:
        if not 0 <= index < count:
            raise ValueError
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def condition(self, key: Sequence[sa.ColumnElement[Any]]) -> sa.ColumnElement[bool]:
        """Rows of this shard, given the primary key's integer columns."""
        prime: sa.ColumnElement[Any] = sa.literal_column(str(_P))
        multiplier: sa.ColumnElement[Any] = sa.literal_column(str(_A))
        h: sa.ColumnElement[Any] | None = None
        for column in key:
            part = (sa.cast(column, sa.BigInteger) % prime + prime) % prime  # SQL's % keeps sign
            h = (part if h is None else h + part) * multiplier % prime
        assert h is not None
        return h % sa.literal_column(str(self.count)) == sa.literal_column(str(self.index))


_SHARD_RULE = (
    "K and N whole numbers with 0 <= K < N (K counts from 0, like Kubernetes' JOB_COMPLETION_INDEX)"
)


# -- the report ------------------------------------------------------------------------


@dataclass(frozen=True)
class LeftRow:
    """One value left as it was: its column, its row's primary key (in key
    column order) and why (``explain(reason)`` says it in words)."""

    column: str
    primary_key: tuple[Any, ...]
    reason: str

    def key_text(self) -> str:
        """The key as ``--plaintext-row`` takes it: the value for a one-column
        key, else a JSON array."""
        if len(self.primary_key) == 1 and not str(self.primary_key[0]).startswith("["):
            return str(self.primary_key[0])
        return json.dumps([_jsonable(v) for v in self.primary_key])

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "primary_key": [_jsonable(v) for v in self.primary_key],
            "reason": self.reason,
        }


@dataclass
class MigrationReport:
    """What a batch job did: re-encrypt, decrypt in place, or backfill.

    ``values_by_version`` counts values moved off each old key version;
    ``plaintext_encrypted`` counts legacy plaintext values encrypted;
    ``values_decrypted`` values written back as plaintext; all three count
    only writes whose compare-and-swap applied. ``skipped`` counts rows the
    application changed between read and write (they are retried);
    ``left_behind`` counts values still not under the target key at the end:
    plaintext in a column not being converted, values that do not decrypt, or
    values the database stored otherwise than written (``failures`` counts
    those by error type, or ``NotStoredExactly``); ``left_rows`` names the first
    ``LISTED_PER_COLUMN`` of them per column, with the reason.
    ``other_scopes`` counts values under other scopes' keys, which a job of
    one scope leaves alone (they are other tenants' business). ``shard`` is
    the ``(K, N)`` the job covered, or None for whole tables.
    """

    columns: list[str] = field(default_factory=list)
    rows_scanned: int = 0
    rows_updated: int = 0
    values_by_version: dict[int, int] = field(default_factory=dict)
    plaintext_encrypted: int = 0
    values_decrypted: int = 0
    skipped: int = 0
    left_behind: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    left_rows: list[LeftRow] = field(default_factory=list)
    other_scopes: int = 0
    elapsed: float = 0.0
    shard: tuple[int, int] | None = None
    _listed: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def rows_per_second(self) -> float:
        return self.rows_scanned / self.elapsed if self.elapsed > 0 else 0.0

    def leave(self, column: str, key: tuple[Any, ...], reason: str, failure: bool) -> None:
        """Count a value left as it was, and name its row while the column
        has fewer than ``LISTED_PER_COLUMN`` named."""
        self.left_behind += 1
        if failure:
            self.failures[reason] = self.failures.get(reason, 0) + 1
        self._name(LeftRow(column, key, reason))

    def _name(self, row: LeftRow) -> None:
        listed = self._listed.get(row.column, 0)
        if listed < LISTED_PER_COLUMN:
            self._listed[row.column] = listed + 1
            self.left_rows.append(row)

    def merge(self, other: MigrationReport) -> None:
        self.rows_scanned += other.rows_scanned
        self.rows_updated += other.rows_updated
        self.plaintext_encrypted += other.plaintext_encrypted
        self.values_decrypted += other.values_decrypted
        self.skipped += other.skipped
        self.left_behind += other.left_behind
        self.other_scopes += other.other_scopes
        for version, n in other.values_by_version.items():
            self.values_by_version[version] = self.values_by_version.get(version, 0) + n
        for reason, n in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        for row in other.left_rows:
            self._name(row)

    def left_lines(self, limit: int | None = None) -> list[str]:
        """The rows left behind, one line each as ``table.column=KEY: reason``
        (at most ``limit``), then what each reason means."""
        rows = self.left_rows[:limit]
        lines = [f"{r.column}={r.key_text()}: {r.reason}" for r in rows]
        if len(rows) < self.left_behind:
            lines.append(f"... and {self.left_behind - len(rows):,} more")
        lines += [f"{reason}: {explain(reason)}" for reason in sorted({r.reason for r in rows})]
        return lines

    def _forget_left(self) -> None:
        """A new pass examines every value still to do: what an earlier pass
        left behind is counted again by this one, not twice."""
        self.left_behind = self.other_scopes = 0
        self.failures = {}
        self.left_rows = []
        self._listed = {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "shard": None
            if self.shard is None
            else {"index": self.shard[0], "count": self.shard[1]},
            "rows_scanned": self.rows_scanned,
            "rows_updated": self.rows_updated,
            "values_by_version": {str(v): n for v, n in sorted(self.values_by_version.items())},
            "plaintext_encrypted": self.plaintext_encrypted,
            "values_decrypted": self.values_decrypted,
            "skipped": self.skipped,
            "left_behind": self.left_behind,
            "failures": dict(self.failures),
            "left_rows": [r.to_dict() for r in self.left_rows],
            "other_scopes": self.other_scopes,
            "elapsed_seconds": round(self.elapsed, 3),
            "rows_per_second": round(self.rows_per_second, 1),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


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
    tick = (lambda n: bar.update(n)) if bar is not None else (lambda n: None)
    this_pass = MigrationReport()
    try:
        for _ in range(PASSES):
            this_pass = MigrationReport()
            for job, part in parts:
                if workers == 1:
                    _run_slice(conns, job, batch_size, this_pass, part, tick)
                else:
                    _run_parallel(conns, job, batch_size, workers, this_pass, part, tick)
            report._forget_left()
            report.merge(this_pass)
            if not this_pass.skipped:
                break
    finally:
        if bar is not None:
            bar.close()
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
    while True:
        try:
            with conns.begin() as conn:
                stmt = sa.select(*pk, *job.selected).where(job.pending)
                if condition is not None:
                    stmt = stmt.where(condition)
                if last is not None:
                    stmt = stmt.where(sa.tuple_(*pk) > sa.tuple_(*last))
                rows = conn.execute(stmt.order_by(*pk).limit(batch_size)).all()
                if not rows:
                    return
                last = tuple(rows[-1][:width])
                report.rows_scanned += len(rows)
                writes = []
                for row in rows:
                    write = job.rewrite(tuple(row[:width]), row[width:], report)
                    if write is not None:
                        writes.append(write)
                if writes:
                    job.check(writes)
                    _write(conn, job, writes, report)
        except sa.exc.StatementError as error:
            # SQLAlchemy's text lists the statement's values: name the reason only.
            raise StatementFailedError(
                f"{job.name}: the database refused a statement: {database_reason(error)}"
            ) from None
        on_batch(len(rows))


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
        if self.kind == ConfigurationError.__name__:
            return ConfigurationError(self.text)
        if self.kind == StatementFailedError.__name__:
            return StatementFailedError(self.text)
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
