"""Blind indexes: equality lookups on encrypted columns without decrypting.

A blind index column stores a keyed HMAC-SHA256 of the (normalized)
plaintext of one or more encrypted columns, never a bare hash: without the
key, a dictionary of emails or phone numbers tells an attacker nothing. The
key is derived with HKDF, per purpose and per index column, from the scope's
index key, which does not rotate with data keys, so rotating and re-encrypting
never invalidates an index::

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
        email_index: Mapped[str | None] = blind_index("email", normalize="casefold", unique=True)

    session.scalars(select(User).where(User.email_index.matches("Alice@Example.com")))

The index fills itself: on ORM inserts and updates of the source attribute, and
on Core and ORM bulk inserts through a column default. A Core UPDATE of the
source must set the index too: ``.values(email=x, email_index=x)`` (the index
column's type hashes whatever plaintext it is given).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapper, mapped_column
from sqlalchemy.types import TypeDecorator

from . import binding
from .errors import ConfigurationError, InvalidValueError
from .primitives import hmac_sha256

__all__ = ["NORMALIZERS", "BlindDigest", "BlindIndex", "blind_index", "blind_index_column"]

Normalizer = Callable[[str], str]

NORMALIZERS: dict[str, Normalizer] = {
    "casefold": str.casefold,
    "lower": str.lower,
    "strip": str.strip,
    "collapse_spaces": lambda s: " ".join(s.split()),
    "digits": lambda s: re.sub(r"\D", "", s),
    "alphanumeric": lambda s: re.sub(r"[\W_]", "", s),
}
"""Named normalizers; pass several to apply them in order."""

_LABEL = b"sqlalchemy-envelope/blind-index/v1\x00"


class BlindDigest(str):
    """An index value read from the database: already a digest, so writing it
    back (a merge, a copy) does not hash it a second time."""

    __slots__ = ()


def _normalizers(
    normalize: str | Normalizer | Sequence[str | Normalizer] | None,
) -> list[Normalizer]:
    if normalize is None:
        return []
    items = [normalize] if isinstance(normalize, str) or callable(normalize) else list(normalize)
    found: list[Normalizer] = []
    for item in items:
        if isinstance(item, str):
            if item not in NORMALIZERS:
                raise ConfigurationError(
                    f"unknown normalizer {item!r}; use one of {sorted(NORMALIZERS)} or a function"
                )
            found.append(NORMALIZERS[item])
        elif callable(item):
            found.append(item)
        else:
            raise ConfigurationError("a normalizer is a name or a function str -> str")
    return found


def _canonical(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if value is None:
        raise InvalidValueError("a compound blind index cannot hash a NULL part")
    return str(value).encode("utf-8")


def _unhashable(where: str, error: Exception) -> InvalidValueError:
    """The error for a value an index cannot hash, never quoting it (a
    normalizer's or encoder's own message may)."""
    if isinstance(error, InvalidValueError):
        return InvalidValueError(f"{where}: {error}")
    if isinstance(error, UnicodeEncodeError):
        return InvalidValueError(
            f"{where}: a value is not valid Unicode: it holds a lone surrogate, which "
            "UTF-8 cannot encode"
        )
    return InvalidValueError(
        f"{where}: normalizing or encoding a value raised {type(error).__name__}"
    )


class BlindIndex(TypeDecorator[str]):
    """The type of a blind index column: it stores hex digests, and hashes
    any plaintext it is given (on write, and in comparisons)."""

    impl = sa.String
    cache_ok = True

    def __init__(
        self,
        *sources: str,
        normalize: str | Normalizer | Sequence[str | Normalizer] | None = None,
        bits: int = 256,
        key_version: int = 1,
        context: str | None = None,
    ) -> None:
        if not sources:
            raise ConfigurationError("a blind index needs at least one source column")
        if not 1 <= bits <= 256:
            raise ConfigurationError("bits must be between 1 and 256")
        self.sources = tuple(sources)
        self.normalize = normalize
        self.bits = bits
        self.key_version = key_version
        self.context = context
        self._normalizers = _normalizers(normalize)
        self._bytes = (bits + 7) // 8
        super().__init__(2 * self._bytes)
        self._column: sa.Column[Any] | None = None

    def __repr__(self) -> str:
        args = [repr(s) for s in self.sources]
        if isinstance(self.normalize, str):
            args.append(f"normalize={self.normalize!r}")
        if self.bits != 256:
            args.append(f"bits={self.bits}")
        if self.key_version != 1:
            args.append(f"key_version={self.key_version}")
        if self.context is not None:
            args.append(f"context={self.context!r}")
        return f"BlindIndex({', '.join(args)})"

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        if isinstance(parent, sa.Column):
            self._column = parent

    def label(self) -> bytes:
        """What this index's key is derived for: the purpose, the index column
        (or its explicit context) and the output size."""
        if self.context is not None:
            where = self.context
        else:
            column = self._column
            table = getattr(column, "table", None)
            if column is None or table is None:
                raise ConfigurationError(
                    "this BlindIndex is not attached to a table column: pass context='table.column'"
                )
            where = f"{table.name}.{column.name}"
        return _LABEL + where.encode("utf-8") + b"\x00" + str(self.bits).encode()

    def _where(self) -> str:
        """The index for error messages: ``table.column``, else its context."""
        table = getattr(self._column, "table", None)
        if self._column is not None and table is not None:
            return f"blind index {table.name}.{self._column.name}"
        if self.context is not None:
            return f"blind index with context {self.context!r}"
        return "a blind index not attached to a column"

    def digest(self, key: bytes, value: Any) -> str:
        parts = value if isinstance(value, tuple) else (value,)
        if len(parts) != len(self.sources):
            raise InvalidValueError(
                f"{self._where()} covers {len(self.sources)} columns; give one value for each"
            )
        message = b""
        for part in parts:
            try:
                if isinstance(part, str):
                    for normalizer in self._normalizers:
                        part = normalizer(part)
                data = _canonical(part)
            except Exception as error:
                raise _unhashable(self._where(), error) from None
            message += len(data).to_bytes(4, "big") + data
        mac = bytearray(hmac_sha256(key, message)[: self._bytes])
        spare = 8 * self._bytes - self.bits
        if spare:
            mac[-1] &= 0xFF << spare & 0xFF
        return bytes(mac).hex()

    def bind_processor(self, dialect: Dialect) -> Any:
        slot = binding.slot_for(dialect)
        label = self.label()
        version = self.key_version
        digest = self.digest

        def process(value: Any) -> Any:
            if value is None or isinstance(value, BlindDigest):
                return value
            if isinstance(value, tuple) and all(part is None for part in value):
                return None
            return digest(slot.writer().derived_key(label, version), value)

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        def process(value: Any) -> Any:
            return None if value is None else BlindDigest(value)

        return process

    class Comparator(TypeDecorator.Comparator[str]):
        """Adds ``matches(*values)``: equality with the digest of the values."""

        __slots__ = ()

        def matches(self, *values: Any) -> sa.ColumnElement[bool]:
            value = values[0] if len(values) == 1 else tuple(values)
            return self.expr == sa.bindparam(None, value, type_=self.expr.type)

    comparator_factory = Comparator


def _default_for(sources: Sequence[str]) -> Callable[[Any], Any]:
    """A context-sensitive column default: the plaintext of the source
    columns in the same INSERT, which the index type then hashes."""

    def default(context: Any) -> Any:
        params = context.get_current_parameters()
        values = tuple(params.get(name) for name in sources)
        if all(v is None for v in values):
            return None
        return values[0] if len(values) == 1 else values

    return default


def blind_index(
    *sources: str,
    normalize: str | Normalizer | Sequence[str | Normalizer] | None = None,
    bits: int = 256,
    key_version: int = 1,
    context: str | None = None,
    **column_options: Any,
) -> Any:
    """A ``mapped_column`` holding the blind index of ``sources`` (attribute
    names of encrypted columns on the same class). Column options such as
    ``unique=True`` or ``index=True`` pass through."""
    column_options.setdefault("nullable", True)
    column_options.setdefault("index", not column_options.get("unique", False))
    return mapped_column(
        BlindIndex(
            *sources, normalize=normalize, bits=bits, key_version=key_version, context=context
        ),
        default=_default_for(sources),
        **column_options,
    )


def blind_index_column(name: str, *sources: str, **options: Any) -> sa.Column[str]:
    """The Core form of `blind_index`:
    ``sa.Table(..., blind_index_column("email_index", "email"))``."""
    type_options = {
        k: options.pop(k) for k in ("normalize", "bits", "key_version", "context") if k in options
    }
    options.setdefault("nullable", True)
    return sa.Column(
        name, BlindIndex(*sources, **type_options), default=_default_for(sources), **options
    )


def _source_keys(mapper: Mapper[Any], index: BlindIndex) -> list[str]:
    keys = []
    for source in index.sources:
        if source not in mapper.attrs:
            raise ConfigurationError(
                f"blind index source {source!r} is not an attribute of {mapper.class_.__name__}"
            )
        keys.append(source)
    return keys


@event.listens_for(Mapper, "mapper_configured")
def _wire_mapper(mapper: Mapper[Any], class_: type) -> None:
    """Keep every blind index of a mapped class in step with its sources on
    ORM inserts and updates (the unit of work)."""
    indexes: list[tuple[str, list[str]]] = []
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        if isinstance(column, sa.Column) and isinstance(column.type, BlindIndex):
            indexes.append((prop.key, _source_keys(mapper, column.type)))
    if not indexes:
        return

    def fill(target: Any, on_update: bool) -> None:
        state = sa.inspect(target)
        for index_key, source_keys in indexes:
            if on_update and not any(state.attrs[k].history.has_changes() for k in source_keys):
                continue
            if not on_update and state.attrs[index_key].history.has_changes():
                continue  # set explicitly
            values = tuple(getattr(target, k) for k in source_keys)
            value: Any = None
            if not all(v is None for v in values):
                value = values[0] if len(values) == 1 else values
            setattr(target, index_key, value)

    event.listen(mapper, "before_insert", lambda m, c, t: fill(t, on_update=False))
    event.listen(mapper, "before_update", lambda m, c, t: fill(t, on_update=True))


def _index_and_sources(target: Any) -> tuple[sa.Column[Any], list[sa.Column[Any]]]:
    prop = getattr(target, "property", None)
    column = prop.columns[0] if prop is not None else target
    if not isinstance(column, sa.Column) or not isinstance(column.type, BlindIndex):
        raise ConfigurationError("backfill_index takes a blind index column or ORM attribute")
    if prop is not None:
        mapper = prop.parent
        sources = [mapper.attrs[s].columns[0] for s in column.type.sources]
    else:
        sources = [column.table.c[s] for s in column.type.sources]
    return column, sources


def _raw(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """The column as stored (ciphertext), bypassing its type's processing."""
    stored = (
        sa.String() if getattr(column.type, "storage", "binary") == "text" else sa.LargeBinary()
    )
    return sa.type_coerce(column, stored)


def backfill(registry: Any, target: Any, *, batch_size: int = 1000) -> Any:
    """Fill a blind index column wherever it is NULL and its sources are not:
    keyset batches, one transaction each, compare-and-swap updates (a row the
    application changed meanwhile keeps the index its own write computed),
    resumable after a crash because done rows are never selected again."""
    from .migrate import MigrationReport

    index, sources = _index_and_sources(target)
    index_type = index.type
    assert isinstance(index_type, BlindIndex)
    table = index.table
    pk = list(table.primary_key.columns)
    key = registry.derived_key(index_type.label(), index_type.key_version)
    report = MigrationReport(columns=[f"{table.name}.{index.name}"])
    started = time.perf_counter()
    n_pk, n_src = len(pk), len(sources)
    update = (
        sa.update(table)
        .where(*(c == sa.bindparam(f"pk_{i}") for i, c in enumerate(pk)))
        .where(index.is_(None))
        .where(
            *(
                _raw(s).is_not_distinct_from(sa.bindparam(f"old_{i}", type_=_raw(s).type))
                for i, s in enumerate(sources)
            )
        )
        .values({index.key: sa.bindparam("digest")})
    )
    last: tuple[Any, ...] | None = None
    while True:
        with registry._begin() as conn:
            stmt = (
                sa.select(*pk, *sources, *(_raw(s) for s in sources))
                .where(index.is_(None))
                .where(sa.or_(*(s.is_not(None) for s in sources)))
                .order_by(*pk)
                .limit(batch_size)
            )
            if last is not None:
                stmt = stmt.where(sa.tuple_(*pk) > sa.tuple_(*last))
            rows = conn.execute(stmt).all()
            if not rows:
                break
            last = tuple(rows[-1][:n_pk])
            report.rows_scanned += len(rows)
            params = []
            for row in rows:
                plain = tuple(row[n_pk : n_pk + n_src])
                value = plain[0] if n_src == 1 else plain
                entry = {f"pk_{i}": row[i] for i in range(n_pk)}
                entry["digest"] = BlindDigest(index_type.digest(key, value))
                entry.update({f"old_{i}": row[n_pk + n_src + i] for i in range(n_src)})
                params.append(entry)
            result = conn.execute(update, params)
            applied = result.rowcount if conn.dialect.supports_sane_multi_rowcount else len(params)
            report.rows_updated += applied
            report.skipped += len(params) - applied
    report.elapsed = time.perf_counter() - started
    return report
