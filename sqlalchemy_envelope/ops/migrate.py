"""Moving rows between keys, and between plaintext and ciphertext, online.

Each table is a job of the batch engine (batch.py), which pages, writes by
compare-and-swap, verifies, counts, shows progress and splits tables into
workers' ranges and shards; this module decides what each value becomes.

The report is exact: a value is counted as moved only once its write applied
(and, between plaintext and ciphertext, once it reads back as written), and
every value left as it was is counted with its reason and its row named, so
that a conversion from plaintext never ends with plaintext left unsaid.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql import visitors

from ..crypto import format as fmt
from ..errors import (
    ConfigurationError,
    DecryptionError,
    InvalidValueError,
    LegacyDecryptionError,
    NotCiphertextError,
    UnknownKeyError,
    ValuesLeftBehindError,
)
from ..keys.envelope import Envelope
from ..keys.scopes import index_scope, is_index_scope
from ..keys.storage import MYSQL_DIALECTS
from ..keys.store import KeyStore
from ..sqla import mysql_text
from ..sqla.codec import unpadded
from . import batch, census
from .census import EncryptedColumnRef, Target
from .migration_report import OTHER_FORMAT, UNKNOWN_DEFINITION, LeftRow, MigrationReport, explain
from .shards import Shard

__all__ = ["LeftRow", "MigrationReport", "explain", "from_sqlalchemy_utils", "run"]


def _key_form(key: Any) -> tuple[str, ...]:
    """A primary key as compared when rows are named by key: the text of each
    part, so a key read back from a report (JSON, or the command line)
    matches the database's own values."""
    parts = key if isinstance(key, tuple | list) else (key,)
    return tuple(str(part) for part in parts)


@dataclass(frozen=True)
class _Change:
    """A value's new form, and what to credit once its write applied:
    ``kind`` "moved" off key ``version`` (of the data or index key the old
    value named), or "plaintext"/"decrypted"."""

    value: Any
    kind: str
    version: int | None = None

    @property
    def checked(self) -> bool:
        """Whether to read the value back: one between plaintext and
        ciphertext may be longer than the column, or hold characters its
        character set lacks; a re-encrypted one has the old one's length and
        alphabet."""
        return self.kind != "moved"

    def credit(self, report: MigrationReport) -> None:
        if self.kind == "moved":
            assert self.version is not None  # a moved value's key is in data_keys
            report.values_by_version[self.version] = (
                report.values_by_version.get(self.version, 0) + 1
            )
        elif self.kind == "plaintext":
            report.plaintext_encrypted += 1
        else:
            report.values_decrypted += 1


Rewrite = Callable[[EncryptedColumnRef, Any, tuple[Any, ...], MigrationReport], _Change | None]


@dataclass(frozen=True)
class _Table:
    """One table's columns to process, and its primary key."""

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


def _tables(conn: Connection, refs: Sequence[EncryptedColumnRef]) -> list[_Table]:
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
        jobs.append(_Table(schema, name, pk, tuple(table_refs), _limits(conn, table_refs)))
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
    value when the target is None: decrypting, or no such key). The prefix
    comparison is NULL-safe: SQLite's substr of an empty BLOB is NULL, and an
    empty value has work to do like any other."""
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


def _left_reason(ref: EncryptedColumnRef, error: DecryptionError) -> str:
    """Why a value that does not decrypt is left: its error's type, but a
    failed authentication in a column known only by name may be the job's
    ignorance of its context or bind_scope rather than tampering."""
    if type(error) is DecryptionError and not ref.defined:
        return UNKNOWN_DEFINITION
    return type(error).__name__


def _ciphertext_of(ref: EncryptedColumnRef, stored: Any) -> bytes | None:
    """The stored value as ciphertext, or None if it is plaintext."""
    try:
        ciphertext = fmt.from_text(stored) if ref.storage == "text" else bytes(stored)
        fmt.check(ciphertext)
    except (NotCiphertextError, TypeError):
        return None
    return ciphertext


def _decrypt(registry: Envelope, ref: EncryptedColumnRef, ciphertext: bytes) -> bytes:
    if ciphertext[0] in fmt.DETERMINISTIC_VERSIONS:
        return registry.decrypt_deterministic(ciphertext, ref.context)
    if ref.bind_scope:
        return registry.decrypt_scoped(ciphertext, ref.context, None)
    return registry.decrypt_bytes(ciphertext, ref.context)


def _stored(ref: EncryptedColumnRef, ciphertext: bytes) -> Any:
    return fmt.to_text(ciphertext) if ref.storage == "text" else ciphertext


def _legacy(old: Any) -> bytes:
    return old.encode("utf-8") if isinstance(old, str) else bytes(old)


def _legacy_plaintext(
    ref: EncryptedColumnRef,
    old: Any,
    dialect: Dialect,
    key: tuple[Any, ...],
    report: MigrationReport,
) -> bytes | None:
    """A legacy value's plaintext in the column's encoding: the value itself,
    or what the sqlalchemy-utils type that wrote it reads (None, counted as
    left, when it does not read or the column's type cannot hold it)."""
    if ref.legacy is None:
        return _legacy(old)
    try:
        return ref.legacy.plaintext(old, dialect)
    except (LegacyDecryptionError, InvalidValueError) as error:
        report.leave(ref.name, key, type(error).__name__, failure=True)
        return None


def _reencrypt_rewrite(
    registry: Envelope,
    target: HeaderFor,
    encrypt_plaintext: bool,
    scope: str,
    plaintext_rows: frozenset[tuple[str, tuple[str, ...]]],
    filtered: bool,
    dialect: Dialect,
) -> Rewrite:
    keys: dict[int, tuple[str, int] | None] = {}  # key id -> (scope, version), None: unknown
    own_index = index_scope(scope)  # where the job seals deterministic values
    # Before each scope had an index key of its own, every tenant's
    # deterministic values were sealed under the registry's own scope's: in
    # the rows a filter says are the tenant's, the job moves those to its own.
    shared = index_scope(registry.scope) if filtered and scope != registry.scope else None

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

    def seal(ref: EncryptedColumnRef, plaintext: bytes, deterministic: bool) -> bytes:
        """``plaintext`` sealed for the column, deterministic or randomized."""
        if deterministic:
            return registry.encrypt_deterministic(plaintext, ref.context.current, scope=scope)
        context = fmt.scoped_context(ref.context, scope) if ref.bind_scope else ref.context
        return registry.encrypt_bytes(plaintext, context.current, scope)

    def as_plaintext(
        ref: EncryptedColumnRef, old: Any, key: tuple[Any, ...], report: MigrationReport
    ) -> _Change | None:
        """A legacy value sealed in the format of the column's definition
        (randomized by name, as the default options say)."""
        plaintext = _legacy_plaintext(ref, old, dialect, key, report)
        if plaintext is None:
            return None
        return _Change(_stored(ref, seal(ref, plaintext, ref.deterministic)), "plaintext")

    def rewrite(
        ref: EncryptedColumnRef, old: Any, key: tuple[Any, ...], report: MigrationReport
    ) -> _Change | None:
        listed = bool(plaintext_rows) and (ref.name, _key_form(key)) in plaintext_rows
        ciphertext = _ciphertext_of(ref, old)
        if ciphertext is None:
            if encrypt_plaintext or ref.migrating or listed:
                return as_plaintext(ref, old, key, report)
            report.leave(ref.name, key, "plaintext", failure=False)
            return None
        header = ciphertext[: fmt.HEADER_BYTES]
        if header == target(ref):
            return None  # done: the row was selected for another column
        found = known(header)
        if found is None:
            if listed or ref.legacy is not None:
                # The user says it is plaintext (or the column held
                # sqlalchemy-utils values), and it cannot be ours: a value
                # under a key of data_keys (any state, any scope) never is.
                return as_plaintext(ref, old, key, report)
            report.leave(ref.name, key, UnknownKeyError.__name__, failure=True)
            return None
        owner, version = found
        deterministic = ciphertext[0] in fmt.DETERMINISTIC_VERSIONS
        own = own_index if deterministic else scope
        if owner != own and owner != shared and is_index_scope(owner) == deterministic:
            # Another tenant's value, or a deterministic value under another
            # index scope's key: not this job's, and never moved between
            # index scopes but from the shared one, in rows the job's filter
            # names. (A value whose format does not match its key's kind was
            # altered: decrypting says so.)
            report.other_scopes += 1
            return None
        if ref.defined and deterministic != ref.deterministic:
            # A job never turns a value into another format: one the
            # definition does not expect says the models and the data differ.
            report.leave(ref.name, key, OTHER_FORMAT, failure=True)
            return None
        try:
            plaintext = _decrypt(registry, ref, ciphertext)
        except DecryptionError as error:
            report.leave(ref.name, key, _left_reason(ref, error), failure=True)
            return None
        new = seal(ref, plaintext, deterministic)  # in the format the value has
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
        if ref.storage == "text" or ref.value_kind == "text":
            plaintext = unpadded(plaintext)  # text's padding, where 0xff can be nothing else
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


def _target(registry: Envelope, decrypt: bool, scope: str) -> HeaderFor:
    """The header each column's values should carry when the job is done:
    None when decrypting, and for a deterministic column when the scope's
    index scope has no key yet (a tenant of earlier versions): then no value
    is under it, each is looked at, and the job needs the key only if it has
    a value to seal."""

    @functools.cache
    def deterministic() -> bytes | None:
        return registry.deterministic_header(scope=scope)

    def target(ref: EncryptedColumnRef) -> bytes | None:
        if decrypt:
            return None
        if ref.deterministic:
            return deterministic()
        return registry.active_header(scope)

    return target


def _named_rows(
    jobs: Sequence[_Table], plaintext_rows: Mapping[str, Iterable[Any]]
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


def _table_job(
    table: _Table, rewrite: Rewrite, target: HeaderFor, where: Any = None
) -> batch.TableJob:
    """The batch engine's job for one table: each value's new form, from
    ``rewrite``, in the rows ``where`` selects (all without)."""
    clause = table.table()
    pending = _pending(clause, table.refs, target)
    if where is not None:
        pending = sa.and_(pending, _on_clause(where, table))
    values = tuple(clause.c[ref.column] for ref in table.refs)

    def row_write(
        key: tuple[Any, ...], row: Sequence[Any], report: MigrationReport
    ) -> batch.RowWrite | None:
        changes = []
        for ref, old in zip(table.refs, row, strict=True):
            if old is None:
                continue
            change = rewrite(ref, old, key, report)
            if change is not None:
                changes.append(
                    batch.Change(
                        ref.column, change.value, old, ref.name, change.credit, change.checked
                    )
                )
        return batch.RowWrite(key, tuple(changes)) if changes else None

    return batch.TableJob(
        name=table.name,
        table=clause,
        primary_key=tuple(clause.c[c] for c in table.primary_key),
        selected=values,
        stored={ref.column: clause.c[ref.column] for ref in table.refs},
        pending=pending,
        rewrite=row_write,
        check=functools.partial(_check_fit, table),
    )


def _on_clause(where: Any, table: _Table) -> sa.ColumnElement[bool]:
    """A row filter on the job's table, as the models or a Table declare it
    (or SQL text), on the table the job selects from: the job's own columns
    stand for the table's, by name."""

    def by_name(element: Any, **kw: Any) -> Any:
        of = getattr(element, "table", None)
        if (
            isinstance(element, sa.ColumnClause)
            and isinstance(of, sa.TableClause)
            and (of.name, of.schema) == (table.name, table.schema)
        ):
            return sa.column(element.name, element.type)
        return None

    condition = sa.and_(sa.true(), where)
    return visitors.replacement_traverse(condition, {}, by_name)


def _check_fit(table: _Table, writes: Sequence[batch.RowWrite]) -> None:
    """Refuse a batch holding a value longer than its column, before any write."""
    for column, length, type_name in table.limits:
        for write in writes:
            for change in write.changes:
                if change.column == column and len(change.value) > length:
                    raise ConfigurationError(
                        f"{table.name}.{column}: the values to write do not fit its type "
                        f"{type_name}: widen the column first (see 'Encrypting an existing "
                        "plaintext column' in docs/operations.md), then run the job again"
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
    shard: tuple[int, int] | None = None,
    where: Any = None,
    from_utils: bool = False,
) -> MigrationReport:
    conns = registry.keyring.store
    batch.check_options(batch_size, workers, conns)
    part = Shard.of(shard)
    started = time.perf_counter()
    with conns.connect() as conn:
        refs = census.resolve(conn, targets, registry.keyring.table)
        if not refs:
            raise ConfigurationError("no encrypted columns to process")
        tables = _tables(conn, refs)
        dialect = conn.dialect
    if from_utils:
        _check_from_utils(refs)
    if where is not None and (decrypt or len(tables) > 1):
        raise ConfigurationError(
            "where= filters the rows of one table's re-encryption: run one job per table"
        )
    report = MigrationReport(columns=[r.name for r in refs])
    scope = scope or registry.scope
    target = _target(registry, decrypt, scope)
    if decrypt:
        if plaintext_rows:
            raise ConfigurationError("plaintext_rows is for encrypting, not decrypt_in_place")
        _check_decryptable(refs)
        rewrite = _decrypt_rewrite(registry)
    else:
        named = _named_rows(tables, plaintext_rows or {})
        rewrite = _reencrypt_rewrite(
            registry, target, encrypt_plaintext, scope, named, where is not None, dialect
        )
        _check_legacy_key(registry, conns, tables, target, dialect)
    if decrypt:  # plaintext in any script must fit before the first is written
        _give_charset(conns, [r for r in refs if r.storage == "text"], mysql_text.ANY_TEXT)
    settled = batch.run(
        conns,
        [_table_job(table, rewrite, target, where) for table in tables],
        report,
        batch_size=batch_size,
        workers=workers,
        shard=part,
        progress=progress,
        label="decrypt" if decrypt else "re-encrypt",
    )
    if not decrypt and settled:
        left = {row.column for row in report.left_rows}
        converted = [
            ref
            for ref in refs
            if ref.storage == "text"
            and (encrypt_plaintext or ref.migrating)
            and ref.name not in left
        ]
        if part is not None:  # other shards' rows may still be plaintext
            converted = _only_ciphertext(conns, converted)
        _give_charset(conns, converted, mysql_text.ASCII)
    report.elapsed = time.perf_counter() - started
    return report


def from_sqlalchemy_utils(
    registry: Envelope,
    targets: Iterable[Target],
    *,
    batch_size: int = 1000,
    workers: int = 1,
    progress: bool | None = None,
    shard: tuple[int, int] | None = None,
) -> MigrationReport:
    """The re-encrypt job over columns that held sqlalchemy-utils values,
    failing with `ValuesLeftBehindError` unless every value was moved. Rows
    the application wrote while a batch held them are retried by a pass of
    their own (the job selects only what is left): a run that still skipped
    some is followed by another, a few times, and then the job says so."""
    report = MigrationReport()
    for _ in range(UTILS_RUNS):
        done = run(
            registry,
            targets,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            shard=shard,
            from_utils=True,
        )
        report.forget_left()  # each run counts again what is left
        report.merge(done)
        report.columns, report.shard, report.elapsed = done.columns, done.shard, done.elapsed
        if not done.skipped:
            break
    else:
        raise ValuesLeftBehindError(
            f"{', '.join(report.columns)}: the application kept writing rows the job was "
            f"moving ({done.skipped:,} skipped in the last of {UTILS_RUNS} runs): run the "
            "migration again",
            report,
        )
    if report.left_behind:
        lines = "\n  ".join(report.left_lines(limit=20))
        raise ValuesLeftBehindError(
            f"{', '.join(report.columns)}: {report.left_behind:,} values left as they were:"
            f"\n  {lines}\nfix or clear those rows, then run the migration again",
            report,
        )
    return report


UTILS_RUNS = 4  # runs of the job while rows were skipped


def _check_from_utils(refs: Sequence[EncryptedColumnRef]) -> None:
    for ref in refs:
        if ref.legacy is None:
            raise ConfigurationError(
                f"{ref.name}: a migration from sqlalchemy-utils needs the column's "
                "definition to name the type it had: declare it EncryptedType(..., "
                "migrating=StringEncryptedType(...)) and pass that Column or ORM attribute"
            )


LEGACY_SAMPLE = 100  # sqlalchemy-utils values read before a job writes anything


def _check_legacy_key(
    registry: Envelope,
    conns: KeyStore,
    tables: Sequence[_Table],
    target: HeaderFor,
    dialect: Dialect,
) -> None:
    """Refuse, before anything is written, a job whose sqlalchemy-utils
    values do not all read: AesEngine's CBC has no authentication, so under
    a wrong key a value now and then unpads and parses as garbage, which the
    job would seal for good. Every one of the first `LEGACY_SAMPLE` legacy
    values (by primary key, of the rows left to do) of each such column
    must read; under a wrong key hardly any does, under a wrong padding none
    that it would change (utils_legacy.py), and the error names the padding
    they read with."""
    for table in tables:
        clause = table.table()
        pk = [clause.c[c] for c in table.primary_key]
        for ref in table.refs:
            if ref.legacy is None:
                continue
            value = clause.c[ref.column]
            stmt = sa.select(*pk, value).where(_pending(clause, [ref], target)).order_by(*pk)
            with conns.connect() as conn:
                rows = conn.execute(stmt.limit(LEGACY_SAMPLE)).all()
            failed = []
            for row in rows:
                ciphertext = _ciphertext_of(ref, row[-1])
                if ciphertext is not None and _names_known_key(registry, ciphertext):
                    continue  # ours (a write of the migration window)
                try:
                    ref.legacy.read(row[-1], dialect)
                except LegacyDecryptionError:
                    failed.append(row)
            if failed:
                keys = ", ".join(repr(k[0] if len(k) == 2 else tuple(k[:-1])) for k in failed[:5])
                padding = ref.legacy.padding_that_reads((row[-1] for row in failed), dialect)
                check = (
                    f"they read with AesEngine padding {padding!r}: declare that padding"
                    if padding is not None
                    else "check the key (a key callable must return the key every row was "
                    "written with), engine and padding, or fix or clear those rows"
                )
                raise LegacyDecryptionError(
                    f"{ref.name}: {len(failed)} of the first {len(rows)} values written by "
                    f"sqlalchemy-utils do not read with the key, engine and padding of its "
                    f"migrating= type (rows {keys}{', ...' if len(failed) > 5 else ''}); "
                    f"nothing was written: {check}, then run the job again"
                )


def _names_known_key(registry: Envelope, ciphertext: bytes) -> bool:
    try:
        registry.keyring.scope_version(fmt.key_id_of(ciphertext[: fmt.HEADER_BYTES]))
    except UnknownKeyError:
        return False
    return True


def _only_ciphertext(
    conns: KeyStore, refs: Sequence[EncryptedColumnRef]
) -> list[EncryptedColumnRef]:
    """The MySQL/MariaDB columns of ``refs`` that hold nothing but ciphertext
    in any row: a shard converts a column to ASCII only then, so the last
    shard to finish does it."""
    if not refs:
        return []
    with conns.connect() as conn:
        if conn.dialect.name not in MYSQL_DIALECTS:
            return []
        return [ref for ref in refs if census.count(conn, ref, {}).not_ciphertext == 0]


def _give_charset(
    conns: KeyStore, refs: Sequence[EncryptedColumnRef], charset: Mapping[str, str]
) -> None:
    """On MySQL/MariaDB, give text columns the character set of what they
    are to hold: any text before plaintext is written back, ASCII once a
    conversion left nothing but ciphertext (see mysql_text.py)."""
    if not refs:
        return

    def give(conn: Connection) -> None:
        for ref in refs:
            mysql_text.give_charset(conn, ref.schema, ref.table, ref.column, charset)

    conns.transaction(give)  # shards running at once may deadlock on the ALTER
