"""Moving rows between keys, and between plaintext and ciphertext, online.

The job walks each table by primary key with keyset pagination (never
OFFSET), composite keys included, selecting only rows that still have work to
do; each batch is its own short transaction. Every update is a
compare-and-swap: a row is written only if its stored value is still the one
that was read, so a concurrent application write is never lost (the row is
simply picked up again). Because done rows are never selected again, a job
killed at any point finishes on the next run, redoing at most the one batch
whose transaction did not commit.

The report is exact: a value is counted as moved only once its write applied
(and, between plaintext and ciphertext, once it reads back as written), and
every value left as it was is counted with its reason and its row named, so
that a conversion from plaintext never ends with plaintext left unsaid.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..crypto import format as fmt
from ..errors import (
    ConfigurationError,
    DecryptionError,
    EnvelopeError,
    NotCiphertextError,
    StatementFailedError,
    UnknownKeyError,
    database_reason,
)
from ..keys.envelope import Envelope
from ..sqla import mysql_text
from . import census
from .census import EncryptedColumnRef, Target
from .report import Report, plain_fields

__all__ = ["LeftRow", "MigrationReport", "explain", "run"]

_PASSES = 3  # passes over rows skipped because the application wrote them meanwhile
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


def _key_part(value: Any) -> Any:
    """A part of a primary key as JSON holds it: itself if JSON has its type,
    else its text (as `_key_form` compares it, so a report's key matches)."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _key_form(key: Any) -> tuple[str, ...]:
    """A primary key as compared when rows are named by key: the text of each
    part, so a key read back from a report (JSON, or the command line)
    matches the database's own values."""
    parts = key if isinstance(key, tuple | list) else (key,)
    return tuple(str(part) for part in parts)


@dataclass(frozen=True)
class LeftRow(Report):
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
        return json.dumps([_key_part(v) for v in self.primary_key])

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "primary_key": [_key_part(v) for v in self.primary_key]}


@dataclass
class MigrationReport(Report):
    """What a re-encrypt (or decrypt) job did.

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
    one scope leaves alone (they are other tenants' business).
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
        return plain_fields(
            {
                "columns": self.columns,
                "rows_scanned": self.rows_scanned,
                "rows_updated": self.rows_updated,
                "values_by_version": self.values_by_version,
                "plaintext_encrypted": self.plaintext_encrypted,
                "values_decrypted": self.values_decrypted,
                "skipped": self.skipped,
                "left_behind": self.left_behind,
                "failures": self.failures,
                "left_rows": self.left_rows,
                "other_scopes": self.other_scopes,
                "elapsed_seconds": round(self.elapsed, 3),
                "rows_per_second": round(self.rows_per_second, 1),
            }
        )


@dataclass(frozen=True)
class _Change:
    """A value's new form, and what to credit once its write applied:
    ``version`` moved off a key version, or ``kind`` "plaintext"/"decrypted"."""

    value: Any
    kind: str
    version: int = 0

    @property
    def checked(self) -> bool:
        """Whether to read the value back: one between plaintext and
        ciphertext may be longer than the column, or hold characters its
        character set lacks; a re-encrypted one has the old one's length and
        alphabet."""
        return self.kind != "moved"

    def credit(self, report: MigrationReport) -> None:
        if self.kind == "moved":
            report.values_by_version[self.version] = (
                report.values_by_version.get(self.version, 0) + 1
            )
        elif self.kind == "plaintext":
            report.plaintext_encrypted += 1
        else:
            report.values_decrypted += 1


Rewrite = Callable[[EncryptedColumnRef, Any, tuple[Any, ...], MigrationReport], _Change | None]


@dataclass(frozen=True)
class _TableJob:
    """One table's columns to process, and how to page through it."""

    schema: str | None
    name: str
    primary_key: tuple[str, ...]
    refs: tuple[EncryptedColumnRef, ...]
    limits: tuple[tuple[str, int, str], ...] = ()  # (column, length, type) the database enforces

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
        jobs.append(_TableJob(schema, name, pk, tuple(table_refs), _limits(conn, table_refs)))
    return jobs


def _limits(
    conn: Connection, refs: Sequence[EncryptedColumnRef]
) -> tuple[tuple[str, int, str], ...]:
    """The reflected lengths of the job's columns, where the database enforces
    them (SQLite does not): a value longer than its column is refused before
    it is written, with what to do, not as a driver error."""
    if conn.dialect.name == "sqlite":
        return ()
    schema, table = refs[0].schema, refs[0].table
    reflected = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns(table, schema=schema)}
    limits = []
    for ref in refs:
        column_type = reflected.get(ref.column)
        length = getattr(column_type, "length", None)
        if isinstance(length, int):
            limits.append((ref.column, length, str(column_type)))
    return tuple(limits)


HeaderFor = Callable[[EncryptedColumnRef], bytes | None]


def _pending(
    table: sa.TableClause, refs: Sequence[EncryptedColumnRef], target: HeaderFor
) -> sa.ColumnElement[bool]:
    """Rows with a value not under its column's target key (any non-NULL
    value when the target is None, for decryption). The prefix comparison is
    NULL-safe: SQLite's substr of an empty BLOB is NULL, and an empty value
    has work to do like any other."""
    conditions: list[sa.ColumnElement[bool]] = []
    for ref in refs:
        value = table.c[ref.column]
        header = target(ref)
        if header is None:
            conditions.append(value.is_not(None))
            continue
        conditions.append(
            sa.and_(
                value.is_not(None),
                census.prefix(value, ref.storage).is_distinct_from(
                    census.prefix_literal(header, ref.storage)
                ),
            )
        )
    return sa.or_(*conditions)


def _run_table(
    registry: Envelope,
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
        try:
            with registry.keyring.store.begin() as conn:
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
        except sa.exc.StatementError as error:
            # SQLAlchemy's text lists the statement's values: name the reason only.
            raise StatementFailedError(
                f"{job.name}: the database refused a statement: {database_reason(error)}"
            ) from None
        on_batch(len(rows))


@dataclass(frozen=True)
class _Write:
    """A value to write in place of ``old``, and what to credit once the
    compare-and-swap applied."""

    old: Any
    change: _Change


Written = dict[tuple[Any, ...], dict[str, _Write]]  # primary key -> column -> write


def _apply(
    conn: Connection,
    table: sa.TableClause,
    job: _TableJob,
    rows: Sequence[sa.Row[Any]],
    rewrite: Rewrite,
    report: MigrationReport,
) -> None:
    """Compute new values, then write them with compare-and-swap updates;
    the report is credited only for the writes that applied."""
    position = {name: i for i, name in enumerate(job.columns)}
    key_positions = [position[c] for c in job.primary_key]
    slots = [(ref, position[ref.column]) for ref in job.refs]
    groups: dict[tuple[tuple[str, ...], bool], Written] = {}
    for row in rows:
        key = tuple(row[i] for i in key_positions)
        writes: dict[str, _Write] = {}
        for ref, index in slots:
            old = row[index]
            if old is None:
                continue
            change = rewrite(ref, old, key, report)
            if change is not None:
                writes[ref.column] = _Write(old, change)
        if writes:
            checked = any(w.change.checked for w in writes.values())
            groups.setdefault((tuple(writes), checked), {})[key] = writes

    _check_fit(job, groups)
    sane_rowcount = conn.dialect.supports_sane_multi_rowcount
    for (columns, checked), written in groups.items():
        stmt = (
            sa.update(table)
            .where(*(table.c[c] == sa.bindparam(f"pk_{c}") for c in job.primary_key))
            .where(*(table.c[c] == sa.bindparam(f"old_{c}") for c in columns))
            .values({c: sa.bindparam(f"new_{c}") for c in columns})
        )
        if checked:
            _write_checked(conn, table, job, stmt, written, report)
            continue
        params = [_params(job, key, writes) for key, writes in written.items()]
        result = conn.execute(stmt, params)
        if sane_rowcount and result.rowcount == len(params):
            for writes in written.values():  # every compare-and-swap applied
                _credit(writes, report)
        else:
            _verify(conn, table, job, written, report)


def _params(job: _TableJob, key: tuple[Any, ...], writes: dict[str, _Write]) -> dict[str, Any]:
    entry = {f"pk_{c}": v for c, v in zip(job.primary_key, key, strict=True)}
    for c, write in writes.items():
        entry[f"old_{c}"] = write.old
        entry[f"new_{c}"] = write.change.value
    return entry


def _write_checked(
    conn: Connection,
    table: sa.TableClause,
    job: _TableJob,
    stmt: sa.Update,
    written: Written,
    report: MigrationReport,
) -> None:
    """Write values between plaintext and ciphertext, which the database may
    store otherwise than written, without an error when MySQL is not in
    strict mode: each compare-and-swap alone, so that its row count tells
    whether it applied; then read back what each row holds. A value stored
    otherwise is put back as it was (the row is still ours, locked by the
    write) and named, never counted as done."""
    applied: Written = {}
    for key, writes in written.items():
        if conn.execute(stmt, _params(job, key, writes)).rowcount == 1:
            applied[key] = writes
        else:
            report.skipped += 1  # the application wrote it meanwhile: retried
    if not applied:
        return
    stored = _read_back(conn, table, job, applied)
    names = {ref.column: ref.name for ref in job.refs}
    for key, writes in applied.items():
        row = stored[key]
        wrong = {c: w for c, w in writes.items() if not _same(row[c], w.change.value)}
        if wrong:
            conn.execute(
                sa.update(table)
                .where(*(table.c[c] == v for c, v in zip(job.primary_key, key, strict=True)))
                .values({c: w.old for c, w in wrong.items()})
            )
            for c in wrong:
                report.leave(names[c], key, NOT_STORED, failure=True)
        right = {c: w for c, w in writes.items() if c not in wrong}
        if right:
            _credit(right, report)


def _read_back(
    conn: Connection, table: sa.TableClause, job: _TableJob, written: Written
) -> dict[tuple[Any, ...], sa.RowMapping]:
    """The rows of ``written`` as stored now, by primary key."""
    pk = sa.tuple_(*(table.c[c] for c in job.primary_key))
    keys = sorted(written)
    rows = conn.execute(sa.select(table).where(pk >= keys[0], pk <= keys[-1]))
    return {tuple(row[c] for c in job.primary_key): row for row in rows.mappings()}


def _check_fit(job: _TableJob, groups: Mapping[Any, Written]) -> None:
    """Refuse a batch holding a value longer than its column, before any write."""
    for column, length, type_name in job.limits:
        for written in groups.values():
            for writes in written.values():
                write = writes.get(column)
                if write is not None and len(write.change.value) > length:
                    raise ConfigurationError(
                        f"{job.name}.{column}: the values to write do not fit its type "
                        f"{type_name}: widen the column first (see 'Encrypting an existing "
                        "plaintext column' in the README), then run the job again"
                    )


def _credit(writes: dict[str, _Write], report: MigrationReport) -> None:
    report.rows_updated += 1
    for write in writes.values():
        write.change.credit(report)


def _verify(
    conn: Connection,
    table: sa.TableClause,
    job: _TableJob,
    written: Written,
    report: MigrationReport,
) -> None:
    """Find out which compare-and-swaps applied: a fresh ciphertext is unique,
    so a row holds what we wrote exactly when our update won. A row changed
    or deleted by the application meanwhile is skipped (and retried)."""
    stored = _read_back(conn, table, job, written)
    for key, writes in written.items():
        row = stored.get(key)
        if row is not None and all(_same(row[c], w.change.value) for c, w in writes.items()):
            _credit(writes, report)
        else:
            report.skipped += 1


def _same(stored: Any, written: Any) -> bool:
    if isinstance(stored, memoryview):
        stored = stored.tobytes()
    return bool(stored == written)


def _left_reason(ref: EncryptedColumnRef, error: DecryptionError) -> str:
    """Why a value that does not decrypt is left: its error's type, but a
    failed authentication in a column known only by name may be the job's
    ignorance of its context or bind_scope rather than tampering."""
    if type(error) is DecryptionError and not ref.defined:
        return UNKNOWN_DEFINITION
    return type(error).__name__


def _seals_deterministic(ref: EncryptedColumnRef, ciphertext: bytes | None) -> bool:
    """The format a value is (re)sealed in: the column's definition's, or,
    for a column known only by name, the format the value already has: a job
    never turns a value into another format on a guess (a deterministic
    value resealed randomized would no longer read, nor match a lookup).
    Plaintext by name is sealed with the default options (randomized)."""
    if ref.defined or ciphertext is None:
        return ref.deterministic
    return ciphertext[0] == fmt.DETERMINISTIC_VERSION


def _ciphertext_of(ref: EncryptedColumnRef, stored: Any) -> bytes | None:
    """The stored value as ciphertext, or None if it is plaintext."""
    try:
        ciphertext = fmt.from_text(stored) if ref.storage == "text" else bytes(stored)
        fmt.check(ciphertext)
    except (NotCiphertextError, TypeError):
        return None
    return ciphertext


def _decrypt(registry: Envelope, ref: EncryptedColumnRef, ciphertext: bytes) -> bytes:
    if ciphertext[0] == fmt.DETERMINISTIC_VERSION:
        return registry.decrypt_deterministic(ciphertext, ref.context)
    if ref.bind_scope:
        return registry.decrypt_scoped(ciphertext, ref.context, None)
    return registry.decrypt_bytes(ciphertext, ref.context)


def _stored(ref: EncryptedColumnRef, ciphertext: bytes) -> Any:
    return fmt.to_text(ciphertext) if ref.storage == "text" else ciphertext


def _legacy(old: Any) -> bytes:
    return old.encode("utf-8") if isinstance(old, str) else bytes(old)


def _reencrypt_rewrite(
    registry: Envelope,
    target: HeaderFor,
    encrypt_plaintext: bool,
    scope: str,
    plaintext_rows: frozenset[tuple[str, tuple[str, ...]]],
) -> Rewrite:
    keys: dict[int, tuple[str, int] | None] = {}  # key id -> (scope, version), None: unknown

    def known(header: bytes) -> tuple[str, int] | None:
        """The scope and version of the data key a header names, of any state
        and scope, or None when data_keys does not hold it."""
        key_id = fmt.key_id_of(header)
        if key_id not in keys:
            try:
                keys[key_id] = registry.keyring.scope_version(key_id)
            except UnknownKeyError:
                keys[key_id] = None
        return keys[key_id]

    def seal(ref: EncryptedColumnRef, plaintext: bytes, ciphertext: bytes | None) -> bytes:
        """``plaintext`` sealed for the column, in place of ``ciphertext``
        (None: of legacy plaintext)."""
        if _seals_deterministic(ref, ciphertext):
            return registry.encrypt_deterministic(plaintext, ref.context)
        context = fmt.scoped_context(ref.context, scope) if ref.bind_scope else ref.context
        return registry.encrypt_bytes(plaintext, context, scope)

    def key_of(header: bytes) -> tuple[str, int]:
        found = known(header)
        if found is None:
            raise UnknownKeyError(fmt.key_id_of(header))
        return found

    def as_plaintext(ref: EncryptedColumnRef, old: Any) -> _Change:
        return _Change(_stored(ref, seal(ref, _legacy(old), None)), "plaintext")

    def rewrite(
        ref: EncryptedColumnRef, old: Any, key: tuple[Any, ...], report: MigrationReport
    ) -> _Change | None:
        listed = bool(plaintext_rows) and (ref.name, _key_form(key)) in plaintext_rows
        ciphertext = _ciphertext_of(ref, old)
        if ciphertext is None:
            if encrypt_plaintext or ref.migrating or listed:
                return as_plaintext(ref, old)
            report.leave(ref.name, key, "plaintext", failure=False)
            return None
        header = ciphertext[: fmt.HEADER_BYTES]
        if header == target(ref):
            return None  # done: the row was selected for another column
        version = 0
        try:
            if ciphertext[0] == fmt.FORMAT_VERSION:
                owner, version = key_of(header)
                if owner != scope:
                    report.other_scopes += 1  # another tenant's value: not this job's
                    return None
            plaintext = _decrypt(registry, ref, ciphertext)
        except DecryptionError as error:
            if listed and known(header) is None:
                # The user says it is plaintext, and it cannot be ours: a value
                # under a key of data_keys (any state, any scope) never is.
                return as_plaintext(ref, old)
            report.leave(ref.name, key, _left_reason(ref, error), failure=True)
            return None
        new = seal(ref, plaintext, ciphertext)
        if new[: fmt.HEADER_BYTES] == header:
            return None  # already under the active key (it changed during the job)
        return _Change(_stored(ref, new), "moved", version)

    return rewrite


def _check_decryptable(refs: Sequence[EncryptedColumnRef]) -> None:
    """Decrypting in place writes strings to text storage and bytes to binary
    storage: a column whose known type holds anything else is refused."""
    for ref in refs:
        if ref.value_kind is None or ref.value_kind == "text":
            continue
        if ref.value_kind == "binary" and ref.storage == "binary":
            continue
        raise ConfigurationError(
            f"{ref.name}: decrypt in place writes strings to text storage and bytes to "
            "binary storage; this column's type holds neither, so its values would be "
            "written in an internal encoding: move it to a new plain column instead"
        )


def _decrypt_rewrite(registry: Envelope) -> Rewrite:
    def rewrite(
        ref: EncryptedColumnRef, old: Any, key: tuple[Any, ...], report: MigrationReport
    ) -> _Change | None:
        ciphertext = _ciphertext_of(ref, old)
        if ciphertext is None:
            return None  # plaintext already
        try:
            plaintext = _decrypt(registry, ref, ciphertext)
        except DecryptionError as error:
            report.leave(ref.name, key, _left_reason(ref, error), failure=True)
            return None
        if ref.storage == "binary":
            return _Change(plaintext, "decrypted")
        try:
            text = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            text = "\x00"
        if "\x00" in text:  # another type's encoding (by name, the type is unknown)
            report.leave(ref.name, key, "NotText", failure=True)
            return None
        return _Change(text, "decrypted")

    return rewrite


def _key_ranges(registry: Envelope, job: _TableJob, workers: int) -> list[tuple[Any, Any]]:
    """Split the table into ``workers`` ranges of its first key column."""
    table = job.table()
    first = table.c[job.primary_key[0]]
    bucket = sa.func.ntile(workers).over(order_by=first).label("bucket")
    inner = sa.select(first.label("k"), bucket).subquery()
    stmt = (
        sa.select(sa.func.max(inner.c.k)).group_by(inner.c.bucket).order_by(sa.func.max(inner.c.k))
    )
    with registry.keyring.store.connect() as conn:
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


def _count_pending(registry: Envelope, jobs: Sequence[_TableJob], target: HeaderFor) -> int:
    total = 0
    with registry.keyring.store.connect() as conn:
        for job in jobs:
            table = job.table()
            stmt = sa.select(sa.func.count()).select_from(table)
            total += int(conn.execute(stmt.where(_pending(table, job.refs, target))).scalar_one())
    return total


def _target(registry: Envelope, decrypt: bool, scope: str) -> HeaderFor:
    """The header each column's values should carry when the job is done."""

    def target(ref: EncryptedColumnRef) -> bytes | None:
        if decrypt:
            return None
        if ref.deterministic:
            return registry.deterministic_header(ref.context)
        return registry.active_header(scope)

    return target


def _named_rows(
    jobs: Sequence[_TableJob], plaintext_rows: Mapping[str, Iterable[Any]]
) -> frozenset[tuple[str, tuple[str, ...]]]:
    """The rows the user names as holding plaintext, as (column, key form),
    checked against the job's columns and their primary keys."""
    widths = {ref.name: len(job.primary_key) for job in jobs for ref in job.refs}
    named = set()
    for column, keys in plaintext_rows.items():
        if column not in widths:
            raise ConfigurationError(
                f"plaintext_rows names {column!r}, which is not a column of this job "
                f"({', '.join(sorted(widths))})"
            )
        for key in keys:
            form = _key_form(key)
            if len(form) != widths[column]:
                raise ConfigurationError(
                    f"plaintext_rows for {column}: a primary key of {widths[column]} "
                    f"column(s) is needed, got {len(form)} value(s)"
                )
            named.add((column, form))
    return frozenset(named)


def _worker(
    registry: Envelope,
    job: _TableJob,
    rewrite: Rewrite,
    target: HeaderFor,
    batch_size: int,
    key_range: tuple[Any, Any],
    done: Any,
    results: Any,
) -> None:
    registry.keyring.store.after_fork()  # a forked child opens its own connections
    report = MigrationReport()
    parent = os.getppid()

    def count(n: int) -> None:
        with done.get_lock():
            done.value += n
        if os.getppid() != parent:
            os._exit(1)  # the job's process died: stop after a committed batch

    try:
        _run_table(registry, job, rewrite, target, batch_size, report, key_range, count)
    except Exception as error:
        # Reported to the parent, never printed here; only a library error's
        # text is safe to pass on (it never holds a value). sys.exit lets the
        # queue flush, and exits without a traceback.
        text = str(error) if isinstance(error, EnvelopeError) else ""
        results.put(_Failure(type(error).__name__, text))
        sys.exit(1)
    results.put(report)


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
            f"a re-encrypt worker failed ({self.kind}{': ' + self.text if self.text else ''}); "
            "run the job again to finish"
        )


def run(
    registry: Envelope,
    targets: Iterable[Target],
    *,
    decrypt: bool = False,
    encrypt_plaintext: bool = False,
    batch_size: int = 1000,
    workers: int = 1,
    progress: bool | None = None,
    scope: str | None = None,
    plaintext_rows: Mapping[str, Iterable[Any]] | None = None,
) -> MigrationReport:
    if batch_size < 1 or workers < 1:
        raise ConfigurationError("batch_size and workers must be at least 1")
    if workers > 1 and registry.keyring.store.pinned:
        raise ConfigurationError("parallel workers cannot share one pinned connection")
    started = time.perf_counter()
    with registry.keyring.store.connect() as conn:
        refs = census.resolve(conn, targets)
        if not refs:
            raise ConfigurationError("no encrypted columns to process")
        jobs = _jobs(conn, refs)
    report = MigrationReport(columns=[r.name for r in refs])
    scope = scope or registry.scope
    target = _target(registry, decrypt, scope)
    if decrypt:
        if plaintext_rows:
            raise ConfigurationError("plaintext_rows is for encrypting, not decrypt_in_place")
        _check_decryptable(refs)
        rewrite = _decrypt_rewrite(registry)
    else:
        named = _named_rows(jobs, plaintext_rows or {})
        rewrite = _reencrypt_rewrite(registry, target, encrypt_plaintext, scope, named)
    if decrypt:  # plaintext in any script must fit before the first is written
        _give_charset(registry, [r for r in refs if r.storage == "text"], mysql_text.ANY_TEXT)
    bar = _progress(
        lambda: _count_pending(registry, jobs, target),
        progress,
        "decrypt" if decrypt else "re-encrypt",
    )
    tick = (lambda n: bar.update(n)) if bar is not None else (lambda n: None)
    this_pass = MigrationReport()
    try:
        for _ in range(_PASSES):
            this_pass = MigrationReport()
            for job in jobs:
                if workers == 1:
                    _run_table(registry, job, rewrite, target, batch_size, this_pass, None, tick)
                else:
                    _run_parallel(
                        registry, job, rewrite, target, batch_size, workers, this_pass, tick
                    )
            report._forget_left()
            report.merge(this_pass)
            if not this_pass.skipped:
                break
    finally:
        if bar is not None:
            bar.close()
    if not decrypt and not this_pass.skipped:
        left = {row.column for row in report.left_rows}
        converted = [
            ref
            for ref in refs
            if ref.storage == "text"
            and (encrypt_plaintext or ref.migrating)
            and ref.name not in left
        ]
        _give_charset(registry, converted, mysql_text.ASCII)
    report.elapsed = time.perf_counter() - started
    return report


def _give_charset(
    registry: Envelope, refs: Sequence[EncryptedColumnRef], charset: Mapping[str, str]
) -> None:
    """On MySQL/MariaDB, give text columns the character set of what they
    are to hold: any text before plaintext is written back, ASCII once a
    conversion left nothing but ciphertext (see mysql_text.py)."""
    if not refs:
        return
    with registry.keyring.store.begin() as conn:
        for ref in refs:
            mysql_text.give_charset(conn, ref.schema, ref.table, ref.column, charset)


def _run_parallel(
    registry: Envelope,
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
        raise EnvelopeError(f"{len(failed)} re-encrypt workers failed; run the job again to finish")
    for part in collected:
        assert isinstance(part, MigrationReport)
        report.merge(part)
