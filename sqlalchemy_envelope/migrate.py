"""Moving rows between keys, and between plaintext and ciphertext, online.

The job walks each table by primary key with keyset pagination (never
OFFSET), composite keys included, selecting only rows that still have work to
do; each batch is its own short transaction. Every update is a
compare-and-swap: a row is written only if its stored value is still the one
that was read, so a concurrent application write is never lost (the row is
simply picked up again). Because done rows are never selected again, a job
killed at any point finishes on the next run, redoing at most the one batch
whose transaction did not commit.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import census
from . import format as fmt
from .census import EncryptedColumnRef, Target
from .errors import ConfigurationError, DecryptionError, NotCiphertextError, UnknownKeyError

if TYPE_CHECKING:
    from .registry import KeyRegistry


__all__ = ["MigrationReport", "run"]

_PASSES = 3  # passes over rows skipped because the application wrote them meanwhile


@dataclass
class MigrationReport:
    """What a re-encrypt (or decrypt) job did.

    ``values_by_version`` counts values moved off each old key version;
    ``plaintext_encrypted`` counts legacy plaintext values encrypted;
    ``skipped`` counts rows the application changed between read and write
    (they are retried); ``left_behind`` counts values still not under the
    active key at the end: plaintext in a column not marked ``migrating``, or
    values that failed to decrypt (``failures`` says why).
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
    elapsed: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_scanned / self.elapsed if self.elapsed > 0 else 0.0

    def merge(self, other: MigrationReport) -> None:
        self.rows_scanned += other.rows_scanned
        self.rows_updated += other.rows_updated
        self.plaintext_encrypted += other.plaintext_encrypted
        self.values_decrypted += other.values_decrypted
        self.skipped += other.skipped
        self.left_behind += other.left_behind
        for version, n in other.values_by_version.items():
            self.values_by_version[version] = self.values_by_version.get(version, 0) + n
        for reason, n in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "rows_scanned": self.rows_scanned,
            "rows_updated": self.rows_updated,
            "values_by_version": {str(v): n for v, n in sorted(self.values_by_version.items())},
            "plaintext_encrypted": self.plaintext_encrypted,
            "values_decrypted": self.values_decrypted,
            "skipped": self.skipped,
            "left_behind": self.left_behind,
            "failures": dict(self.failures),
            "elapsed_seconds": round(self.elapsed, 3),
            "rows_per_second": round(self.rows_per_second, 1),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


Rewrite = Callable[[EncryptedColumnRef, Any, MigrationReport], Any]
_UNCHANGED = object()


@dataclass(frozen=True)
class _TableJob:
    """One table's columns to process, and how to page through it."""

    schema: str | None
    name: str
    primary_key: tuple[str, ...]
    refs: tuple[EncryptedColumnRef, ...]

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([*self.primary_key, *(r.column for r in self.refs)]))

    def table(self) -> sa.TableClause:
        return sa.table(self.name, *(sa.column(n) for n in self.columns), schema=self.schema)


def _jobs(conn: Connection, refs: Sequence[EncryptedColumnRef]) -> list[_TableJob]:
    by_table: dict[tuple[str | None, str], list[EncryptedColumnRef]] = {}
    for ref in refs:
        by_table.setdefault((ref.schema, ref.table), []).append(ref)
    inspector = sa.inspect(conn)
    jobs = []
    for (schema, name), table_refs in by_table.items():
        pk = tuple(inspector.get_pk_constraint(name, schema=schema)["constrained_columns"] or ())
        if not pk:
            raise ConfigurationError(
                f"table {name!r} has no primary key: the re-encrypt job pages by primary key"
            )
        jobs.append(_TableJob(schema, name, pk, tuple(table_refs)))
    return jobs


HeaderFor = Callable[[EncryptedColumnRef], bytes | None]


def _pending(
    table: sa.TableClause, refs: Sequence[EncryptedColumnRef], target: HeaderFor
) -> sa.ColumnElement[bool]:
    """Rows with a value not under its column's target key (any non-NULL
    value when the target is None, for decryption)."""
    conditions: list[sa.ColumnElement[bool]] = []
    for ref in refs:
        value = table.c[ref.column]
        header = target(ref)
        if header is None:
            conditions.append(value.is_not(None))
            continue
        if ref.storage == "text":
            prefix: Any = fmt.to_text(header)
            length = fmt.TEXT_HEADER_CHARS
        else:
            prefix, length = header, fmt.HEADER_BYTES
        conditions.append(
            sa.and_(
                value.is_not(None),
                sa.func.substr(value, 1, length) != sa.literal(prefix),
            )
        )
    return sa.or_(*conditions)


def _run_table(
    registry: KeyRegistry,
    job: _TableJob,
    rewrite: Rewrite,
    target: HeaderFor,
    batch_size: int,
    report: MigrationReport,
    key_range: tuple[Any, Any] | None,
    on_batch: Callable[[int], None],
) -> None:
    table = job.table()
    pk = [table.c[c] for c in job.primary_key]
    last: tuple[Any, ...] | None = None
    while True:
        with registry._begin() as conn:
            stmt = sa.select(table).where(_pending(table, job.refs, target))
            if key_range is not None:
                low, high = key_range
                if low is not None:
                    stmt = stmt.where(pk[0] > low)
                if high is not None:
                    stmt = stmt.where(pk[0] <= high)
            if last is not None:
                stmt = stmt.where(sa.tuple_(*pk) > sa.tuple_(*last))
            rows = conn.execute(stmt.order_by(*pk).limit(batch_size)).all()
            if not rows:
                return
            last = tuple(rows[-1][: len(pk)])
            report.rows_scanned += len(rows)
            _apply(conn, table, job, rows, rewrite, report)
        on_batch(len(rows))


def _apply(
    conn: Connection,
    table: sa.TableClause,
    job: _TableJob,
    rows: Sequence[sa.Row[Any]],
    rewrite: Rewrite,
    report: MigrationReport,
) -> None:
    """Compute new values, then write them with compare-and-swap updates."""
    position = {name: i for i, name in enumerate(job.columns)}
    keys = [(f"pk_{c}", position[c]) for c in job.primary_key]
    slots = [
        (ref, position[ref.column], f"old_{ref.column}", f"new_{ref.column}") for ref in job.refs
    ]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        params: dict[str, Any] | None = None
        changed: list[str] = []
        for ref, index, old_name, new_name in slots:
            old = row[index]
            if old is None:
                continue
            new = rewrite(ref, old, report)
            if new is _UNCHANGED:
                continue
            if params is None:
                params = {name: row[i] for name, i in keys}
            params[old_name] = old
            params[new_name] = new
            changed.append(ref.column)
        if params is not None:
            groups.setdefault(tuple(changed), []).append(params)

    sane_rowcount = conn.dialect.supports_sane_multi_rowcount
    for columns, batch in groups.items():
        stmt = (
            sa.update(table)
            .where(*(table.c[c] == sa.bindparam(f"pk_{c}") for c in job.primary_key))
            .where(*(table.c[c] == sa.bindparam(f"old_{c}") for c in columns))
            .values({c: sa.bindparam(f"new_{c}") for c in columns})
        )
        result = conn.execute(stmt, batch)
        if sane_rowcount and result.rowcount == len(batch):
            report.rows_updated += len(batch)  # every compare-and-swap applied
        else:
            written = {
                tuple(p[name] for name, _ in keys): {c: p[f"new_{c}"] for c in columns}
                for p in batch
            }
            _verify(conn, table, job, written, report)


def _verify(
    conn: Connection,
    table: sa.TableClause,
    job: _TableJob,
    written: dict[tuple[Any, ...], dict[str, Any]],
    report: MigrationReport,
) -> None:
    """Find out which compare-and-swaps applied: a fresh ciphertext is unique,
    so a row holds what we wrote exactly when our update won."""
    pk = sa.tuple_(*(table.c[c] for c in job.primary_key))
    keys = sorted(written)
    rows = conn.execute(sa.select(table).where(pk >= keys[0], pk <= keys[-1]))
    for row in rows.mappings():
        key = tuple(row[c] for c in job.primary_key)
        expected = written.get(key)
        if expected is None:
            continue
        if all(_same(row[c], v) for c, v in expected.items()):
            report.rows_updated += 1
        else:
            report.skipped += 1


def _same(stored: Any, written: Any) -> bool:
    if isinstance(stored, memoryview):
        stored = stored.tobytes()
    return bool(stored == written)


def _ciphertext_of(ref: EncryptedColumnRef, stored: Any) -> bytes | None:
    """The stored value as ciphertext, or None if it is plaintext."""
    try:
        ciphertext = fmt.from_text(stored) if ref.storage == "text" else bytes(stored)
        fmt.check(ciphertext)
    except (NotCiphertextError, TypeError):
        return None
    return ciphertext


def _decrypted(
    registry: KeyRegistry,
    ref: EncryptedColumnRef,
    ciphertext: bytes,
    report: MigrationReport,
    key_scope: str = "",
) -> bytes | None:
    """The plaintext, or None (counted in the report) if it does not decrypt:
    such a value is left exactly as it is."""
    try:
        if ciphertext[0] == fmt.DETERMINISTIC_VERSION:
            return registry.decrypt_deterministic(ciphertext, ref.context)
        if ref.bind_scope:
            return registry.decrypt_scoped(ciphertext, ref.context, None)
        return registry.decrypt_bytes(ciphertext, ref.context)
    except DecryptionError as error:
        report.left_behind += 1
        reason = type(error).__name__
        report.failures[reason] = report.failures.get(reason, 0) + 1
        return None


def _stored(ref: EncryptedColumnRef, ciphertext: bytes) -> Any:
    return fmt.to_text(ciphertext) if ref.storage == "text" else ciphertext


def _reencrypt_rewrite(registry: KeyRegistry, encrypt_plaintext: bool, scope: str) -> Rewrite:
    keys: dict[bytes, tuple[str, int]] = {}  # header -> (scope, version), as keys are met

    def seal(ref: EncryptedColumnRef, plaintext: bytes) -> bytes:
        if ref.deterministic:
            return registry.encrypt_deterministic(plaintext, ref.context)
        context = fmt.scoped_context(ref.context, scope) if ref.bind_scope else ref.context
        return registry.encrypt_bytes(plaintext, context, scope)

    def rewrite(ref: EncryptedColumnRef, old: Any, report: MigrationReport) -> Any:
        ciphertext = _ciphertext_of(ref, old)
        if ciphertext is None:
            if not (encrypt_plaintext or ref.migrating):
                report.left_behind += 1
                return _UNCHANGED
            legacy = old.encode("utf-8") if isinstance(old, str) else bytes(old)
            report.plaintext_encrypted += 1
            return _stored(ref, seal(ref, legacy))
        deterministic = ciphertext[0] == fmt.DETERMINISTIC_VERSION
        if deterministic and ref.deterministic:
            return _UNCHANGED  # deterministic keys do not rotate with data keys
        header = ciphertext[: fmt.HEADER_BYTES]
        if not deterministic:
            if header not in keys:
                try:
                    keys[header] = registry.key_scope_version(fmt.key_id_of(header))
                except UnknownKeyError:
                    keys[header] = ("", 0)
            if keys[header][0] != scope:
                return _UNCHANGED  # another scope's (tenant's) value: not this job's
        plaintext = _decrypted(registry, ref, ciphertext, report, keys.get(header, ("", 0))[0])
        if plaintext is None:
            return _UNCHANGED
        new = seal(ref, plaintext)
        if new[: fmt.HEADER_BYTES] == header:
            return _UNCHANGED  # already under the active key (this process's view)
        version = keys.get(header, ("", 0))[1]
        report.values_by_version[version] = report.values_by_version.get(version, 0) + 1
        return _stored(ref, new)

    return rewrite


def _decrypt_rewrite(registry: KeyRegistry) -> Rewrite:
    def rewrite(ref: EncryptedColumnRef, old: Any, report: MigrationReport) -> Any:
        ciphertext = _ciphertext_of(ref, old)
        if ciphertext is None:
            return _UNCHANGED  # plaintext already
        plaintext = _decrypted(registry, ref, ciphertext, report)
        if plaintext is None:
            return _UNCHANGED
        report.values_decrypted += 1
        return plaintext.decode("utf-8") if ref.storage == "text" else plaintext

    return rewrite


def _key_ranges(registry: KeyRegistry, job: _TableJob, workers: int) -> list[tuple[Any, Any]]:
    """Split the table into ``workers`` ranges of its first key column."""
    table = job.table()
    first = table.c[job.primary_key[0]]
    bucket = sa.func.ntile(workers).over(order_by=first).label("bucket")
    inner = sa.select(first.label("k"), bucket).subquery()
    stmt = (
        sa.select(sa.func.max(inner.c.k)).group_by(inner.c.bucket).order_by(sa.func.max(inner.c.k))
    )
    with registry._connect() as conn:
        bounds = list(conn.execute(stmt).scalars())
    ranges = []
    low = None
    for high in bounds[:-1]:
        ranges.append((low, high))
        low = high
    ranges.append((low, None))
    return ranges


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


def _count_pending(registry: KeyRegistry, jobs: Sequence[_TableJob], target: HeaderFor) -> int:
    total = 0
    with registry._connect() as conn:
        for job in jobs:
            table = job.table()
            stmt = sa.select(sa.func.count()).select_from(table)
            total += int(conn.execute(stmt.where(_pending(table, job.refs, target))).scalar_one())
    return total


def _target(registry: KeyRegistry, decrypt: bool, scope: str) -> HeaderFor:
    """The header each column's values should carry when the job is done."""

    def target(ref: EncryptedColumnRef) -> bytes | None:
        if decrypt:
            return None
        if ref.deterministic:
            return registry.deterministic_header(ref.context)
        return registry.active_header(scope)

    return target


def _rewrite_for(
    registry: KeyRegistry, decrypt: bool, encrypt_plaintext: bool, scope: str
) -> Rewrite:
    if decrypt:
        return _decrypt_rewrite(registry)
    return _reencrypt_rewrite(registry, encrypt_plaintext, scope)


def _worker(
    registry: KeyRegistry,
    job: _TableJob,
    rewrite: Rewrite,
    target: HeaderFor,
    batch_size: int,
    key_range: tuple[Any, Any],
    done: Any,
    results: Any,
) -> None:
    registry.engine.dispose(close=False)  # a forked child opens its own connections
    registry._keys.after_fork()
    report = MigrationReport()

    def count(n: int) -> None:
        with done.get_lock():
            done.value += n

    _run_table(registry, job, rewrite, target, batch_size, report, key_range, count)
    results.put(report)


def run(
    registry: KeyRegistry,
    targets: Iterable[Target],
    *,
    decrypt: bool = False,
    encrypt_plaintext: bool = False,
    batch_size: int = 1000,
    workers: int = 1,
    progress: bool | None = None,
    scope: str | None = None,
) -> MigrationReport:
    if batch_size < 1 or workers < 1:
        raise ConfigurationError("batch_size and workers must be at least 1")
    if workers > 1 and registry._pinned.get() is not None:
        raise ConfigurationError("parallel workers cannot share one pinned connection")
    started = time.perf_counter()
    with registry._connect() as conn:
        refs = census.resolve(conn, targets)
        if not refs:
            raise ConfigurationError("no encrypted columns to process")
        jobs = _jobs(conn, refs)
    report = MigrationReport(columns=[r.name for r in refs])
    scope = scope or registry.scope
    target = _target(registry, decrypt, scope)
    rewrite = _rewrite_for(registry, decrypt, encrypt_plaintext, scope)
    bar = _progress(
        lambda: _count_pending(registry, jobs, target),
        progress,
        "decrypt" if decrypt else "re-encrypt",
    )
    tick = (lambda n: bar.update(n)) if bar is not None else (lambda n: None)
    try:
        for _ in range(_PASSES):
            skipped_before = report.skipped
            for job in jobs:
                if workers == 1:
                    _run_table(registry, job, rewrite, target, batch_size, report, None, tick)
                else:
                    _run_parallel(registry, job, rewrite, target, batch_size, workers, report, tick)
            if report.skipped == skipped_before:
                break
    finally:
        if bar is not None:
            bar.close()
    report.elapsed = time.perf_counter() - started
    return report


def _run_parallel(
    registry: KeyRegistry,
    job: _TableJob,
    rewrite: Rewrite,
    target: HeaderFor,
    batch_size: int,
    workers: int,
    report: MigrationReport,
    tick: Callable[[int], None],
) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigurationError("parallel workers need the 'fork' start method (Linux, macOS)")
    ctx = multiprocessing.get_context("fork")
    done = ctx.Value("q", 0)
    results = ctx.Queue()
    ranges = _key_ranges(registry, job, workers)
    procs = [
        ctx.Process(
            target=_worker,
            args=(registry, job, rewrite, target, batch_size, key_range, done, results),
        )
        for key_range in ranges
    ]
    for proc in procs:
        proc.start()
    reported = 0
    collected: list[MigrationReport] = []
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
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} re-encrypt workers failed; run the job again to finish")
    for part in collected:
        report.merge(part)
