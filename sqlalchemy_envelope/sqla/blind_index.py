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

The index fills itself on every INSERT and UPDATE that sets its sources,
whatever builds the statement (the unit of work, ORM bulk operations, Core,
upserts): one engine hook completes the statement with the index, also from
a source's constant or argument-free default or onupdate. A value given for
the index in the same statement is kept, unless it is a `BlindDigest` of
other values than the sources written with it. Writes whose index cannot be
computed (a source set to a SQL expression, or by INSERT ... FROM SELECT, or
only some sources of a compound index) raise `BlindIndexError`. Raw SQL
(``text()``, a lightweight ``sa.table()``) is not seen: set the index
yourself there.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import Mapper, configure_mappers, mapped_column, object_session
from sqlalchemy.orm.attributes import flag_modified
from sqlalchemy.schema import ColumnDefault
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import Null
from sqlalchemy.sql.lambdas import PyWrapper
from sqlalchemy.sql.selectable import Alias
from sqlalchemy.types import TypeDecorator
from sqlalchemy.util import immutabledict

from ..crypto.primitives import hmac_sha256
from ..errors import (
    BlindIndexError,
    ConfigurationError,
    EncryptedComparisonError,
    InvalidValueError,
)
from . import binding
from .expressions import EnvelopeColumnType, Kind, check_written, extend_compilation, is_value

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


class _Checked:
    """An index value given as a `BlindDigest` by a statement that also sets
    the index's sources: kept if it is their digest, refused if it is not (a
    digest read before the sources changed, which would leave it stale)."""

    __slots__ = ("digest", "name", "plaintext")

    def __init__(self, digest: BlindDigest, plaintext: Any, name: str) -> None:
        self.digest = digest
        self.plaintext = plaintext
        self.name = name

    def verify(self, hashed: Callable[[Any], str]) -> BlindDigest:
        plaintext = self.plaintext
        parts = plaintext if isinstance(plaintext, tuple) else (plaintext,)
        expected = None if all(p is None for p in parts) else hashed(plaintext)
        if expected != self.digest:
            raise BlindIndexError(
                f"the statement sets the sources of the blind index {self.name} and gives "
                "the index a BlindDigest that is not their digest (one read before they "
                f"changed): leave {self.name} out of the statement to have it computed, "
                "or give it None"
            )
        return self.digest


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


_NULL_PART = b"\xff\xff\xff\xff"
"""A NULL part of a compound index, in place of a length and bytes: values
are shorter than 2**32 - 1 bytes, so it is distinct from every value."""


def _canonical(value: Any) -> bytes:
    """One part of the message: its length (4 bytes, big-endian) and bytes."""
    if value is None:
        raise InvalidValueError("a normalizer returned None")
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
    else:
        data = str(value).encode("utf-8")
    if len(data) >= 0xFFFFFFFF:
        raise InvalidValueError("a value of 4 GiB or more cannot be hashed")
    return len(data).to_bytes(4, "big") + data


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


class BlindIndex(EnvelopeColumnType, TypeDecorator[str]):
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
        """The constructor call, for Alembic's autogenerate. A normalizer
        given as a function has no source form; the column's DDL does not
        depend on it."""
        args = [repr(s) for s in self.sources]
        named = [self.normalize] if isinstance(self.normalize, str) else self.normalize
        if isinstance(named, Sequence) and named and all(isinstance(n, str) for n in named):
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
            event.listen(parent, "after_parent_attach", _register)

    @property
    def envelope_kind(self) -> Kind:
        return Kind.BLIND_INDEX

    @property
    def envelope_column(self) -> str:
        table = getattr(self._column, "table", None)
        if self._column is not None and table is not None:
            return f"{table.name}.{self._column.name}"
        return self.context or "a blind index"

    @property
    def envelope_values(self) -> Hashable | None:
        try:
            return (Kind.BLIND_INDEX, self.label(), self.key_version)
        except ConfigurationError:
            return None

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
            if part is None:
                message += _NULL_PART
                continue
            try:
                if isinstance(part, str):
                    for normalizer in self._normalizers:
                        part = normalizer(part)
                message += _canonical(part)
            except Exception as error:
                raise _unhashable(self._where(), error) from None
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
        current_writing = binding.current_writing

        def keyed(writing: binding.Writing) -> Callable[[], bytes]:
            # The index key of the scope written or looked up in: each
            # tenant's digests are its own.
            registry, scope = slot.writing(writing)
            return functools.partial(registry.derived_key, label, version, scope=scope)

        # The key function for the last `Writing`, replaced whole, as in
        # EncryptedType.bind_processor; none at first.
        keyed_for: tuple[binding.Writing | None, Callable[[], bytes]] = (None, bytes)

        def key() -> bytes:
            nonlocal keyed_for
            writing = current_writing()
            pair = keyed_for
            if pair[0] is not writing:
                pair = keyed_for = (writing, keyed(writing))
            return pair[1]()

        def hashed(value: Any) -> str:
            return digest(key(), value)

        def process(value: Any) -> Any:
            if value is None or isinstance(value, BlindDigest):
                return value
            if isinstance(value, tuple) and all(part is None for part in value):
                return None
            if isinstance(value, _Checked):
                return value.verify(hashed)
            return digest(key(), value)

        return process

    def literal_processor(self, dialect: Dialect) -> Any:
        """The digest, as a SQL literal, for statements compiled with ``literal_binds``."""
        hash_value = self.bind_processor(dialect)
        quote = self.impl_instance.literal_processor(dialect)
        assert quote is not None  # every String type renders literals

        def process(value: Any) -> str:
            return str(quote(hash_value(value)))

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        def process(value: Any) -> Any:
            return None if value is None else BlindDigest(value)

        return process

    class Comparator(TypeDecorator.Comparator[str]):
        """Adds ``matches(*values)``: equality with the digest of the values.
        Refuses all but equality, as `EncryptedType.Comparator` does."""

        __slots__ = ()

        def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
            check_written(op, self.expr, other)
            if other and isinstance(other[0], PyWrapper):
                # A variable of a lambda statement: the bound parameter that the
                # lambda tracks and gives each call's value, typed as this index.
                literal = other[0]._sa__py_wrapper_literal(expr=self.expr, operator=op)
                other = (literal, *other[1:])
            operand = other[0] if other else None
            if (
                op in _HASHED
                and (is_value(operand) or isinstance(operand, sa.BindParameter))
                and not isinstance(self.expr, sa.TypeCoerce)
            ):
                # The ORM evaluates an update's or delete's WHERE in Python
                # (synchronize_session="evaluate"/"auto"), where it would compare
                # a digest with a plaintext. It cannot evaluate a type coercion,
                # which renders as the bare column: "auto" fetches the rows instead.
                return op(sa.type_coerce(self.expr, self.type), *other, **kwargs)
            return super().operate(op, *other, **kwargs)

        def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
            check_written(op, self.expr, (other,))
            return super().reverse_operate(op, other, **kwargs)

        def matches(self, *values: Any) -> sa.ColumnElement[bool]:
            if len(values) == 1 and isinstance(values[0], PyWrapper):
                return self.expr == values[0]
            if any(isinstance(value, PyWrapper) for value in values):
                index = self.type
                where = index._where() if isinstance(index, BlindIndex) else "a blind index"
                raise EncryptedComparisonError(
                    f"{where}: in a lambda statement, give matches() the values of a "
                    "compound index as one tuple variable: parts = (first, last), then "
                    "lambda: select(...).where(Model.index.matches(parts))"
                )
            value = values[0] if len(values) == 1 else tuple(values)
            return self.expr == sa.bindparam(None, value, type_=self.expr.type)

    comparator_factory = Comparator


_HASHED = frozenset({operators.eq, operators.ne, operators.in_op, operators.not_in_op})


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
    # A SQL default, so that the ORM leaves an unset index out of its INSERT
    # (for the write hook to fill) instead of sending an explicit NULL.
    column_options.setdefault("insert_default", sa.null())
    return mapped_column(
        BlindIndex(
            *sources, normalize=normalize, bits=bits, key_version=key_version, context=context
        ),
        **column_options,
    )


def blind_index_column(name: str, *sources: str, **options: Any) -> sa.Column[str]:
    """The Core form of `blind_index`:
    ``sa.Table(..., blind_index_column("email_index", "email"))``."""
    type_options = {
        k: options.pop(k) for k in ("normalize", "bits", "key_version", "context") if k in options
    }
    options.setdefault("nullable", True)
    options.setdefault("default", sa.null())
    return sa.Column(name, BlindIndex(*sources, **type_options), **options)


# -- Keeping every index in step with its sources, whatever writes them -------
#
# One hook sees every INSERT and UPDATE executed on a table with blind indexes,
# whoever built it (the ORM unit of work, ORM bulk operations, Core), and
# completes it: where the statement sets an index's sources and not the index,
# it adds the index, its value being the sources' plaintext in a parameter of
# each row, which the index type hashes. What it cannot follow (a source set
# to a SQL expression, a compound index only partly set) it refuses.


class _Index:
    """One blind index of a table, resolved for the write hook."""

    __slots__ = ("column", "key", "name", "param", "set_param", "set_value", "sources", "value")

    def __init__(self, column: sa.Column[Any], sources: tuple[Any, ...]) -> None:
        self.column = column
        self.key = column.key
        self.sources = sources
        self.name = _name(column)
        # The value rides in a bind parameter of each row; type_coerce makes it
        # an expression, so SQLAlchemy counts the column as computed by the
        # statement and the ORM expires (or fetches) the attribute instead of
        # keeping a stale digest.
        self.param = f"{column.key}__blind"
        self.set_param = f"{column.key}__blind_set"
        self.value = sa.type_coerce(sa.bindparam(self.param, type_=column.type), column.type)
        self.set_value = sa.type_coerce(
            sa.bindparam(self.set_param, type_=column.type), column.type
        )


class _TableIndexes:
    """The blind index columns of one table; resolved on first use, once the
    table (and any mapper naming its sources) is complete."""

    __slots__ = ("columns", "resolved")

    def __init__(self) -> None:
        self.columns: list[sa.Column[Any]] = []
        self.resolved: tuple[_Index, ...] | None = None

    def indexes(self) -> tuple[_Index, ...]:
        resolved = self.resolved
        if resolved is None:
            resolved = self.resolved = tuple(_resolve(c) for c in self.columns)
        return resolved


_tables: dict[Any, _TableIndexes] = {}
_orm_sources: dict[sa.Column[Any], tuple[Any, ...]] = {}
_lock = threading.Lock()
_listening = False


def _name(column: Any) -> str:
    table = getattr(column, "table", None)
    return f"{table.name}.{column.name}" if table is not None else column.name


def _register(column: sa.Column[Any], table: Any) -> None:
    """A blind index column joined a table: route the table's writes through
    the hook."""
    global _listening
    with _lock:
        entry = _tables.setdefault(table, _TableIndexes())
        if not any(c is column for c in entry.columns):
            entry.columns.append(column)
            entry.resolved = None
        if not _listening:
            event.listen(Engine, "before_execute", _complete, retval=True)
            _listening = True


def _resolve(column: sa.Column[Any]) -> _Index:
    assert isinstance(column.type, BlindIndex)
    names = column.type.sources
    sources = _orm_sources.get(column)
    if sources is None and not all(n in column.table.c for n in names):
        configure_mappers()  # sources named by ORM attribute
        sources = _orm_sources.get(column)
    if sources is None:
        missing = [n for n in names if n not in column.table.c]
        if missing:
            raise ConfigurationError(
                f"blind index {_name(column)}: {missing[0]!r} is not a column of "
                f"{column.table.name}; name columns of the same table"
            )
        sources = tuple(column.table.c[n] for n in names)
    _check_sources(column, sources)
    return _Index(column, sources)


def _same_table(a: Any, b: Any) -> bool:
    # An ORM statement's table is an annotated copy, which hashes as the table.
    return a is b or (a is not None and b is not None and hash(a) == hash(b))


def _key(key: Any) -> str:
    return key if isinstance(key, str) else str(key.key)


def _assigned(values: Any, table: Any) -> dict[str, Any]:
    """A statement's column -> value mapping, keyed by column key; columns of
    other tables (a multi-table UPDATE) left out."""
    found: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(key, str):
            found[key] = value
        elif _same_table(getattr(key, "table", None), table):
            found[key.key] = value
    return found


# What a statement gives for one source: ("const", value), ("param", name of
# the row parameter), ("inserted", the upsert's alias of the inserted row),
# ("expression", None), ("selected", None: by INSERT ... FROM SELECT),
# ("call", a function of no argument: a Python default or onupdate, which the
# hook calls itself), ("default", None: a default computed when the INSERT
# runs), or ("missing", None).
_Part = tuple[str, Any]
_MISSING: _Part = ("missing", None)
_SELECTED = object()
_ABSENT = object()
_COMPUTABLE = frozenset({"const", "param", "call"})


def _part(element: Any, crud_name: str | None, row: Mapping[str, Any]) -> _Part:
    """The value of a source set to ``element`` in a VALUES / SET clause."""
    if element is _SELECTED:
        return ("selected", None)
    if not isinstance(element, sa.ClauseElement):
        return ("const", element)  # a multi-row VALUES holds plain values
    if isinstance(element, sa.BindParameter):
        # A literal's anonymous parameter is rendered under the column key, so a
        # row parameter of that name overrides it; a named one under its name.
        name = crud_name if element.unique else element.key
        if name is not None and name in row:
            return ("param", name)
        return ("const", element.effective_value)
    if isinstance(element, Null):
        return ("const", None)
    return ("expression", None)


# SQLAlchemy wraps a default function that takes no argument in a function of
# the execution context that ignores it: these are the codes of its wrappers.
_NO_ARGUMENT = frozenset(
    getattr(ColumnDefault(function).arg, "__code__", None)
    for function in (lambda: None, functools.partial(str))
)


def _no_argument_function(generator: Any) -> Callable[[], Any] | None:
    """The function of a Python-side default or onupdate, if it takes no
    argument; None for a function of the execution context."""
    arg = generator.arg
    if generator.is_callable and getattr(arg, "__code__", None) in _NO_ARGUMENT:
        return lambda: arg(None)
    return None


def _unset_part(column: sa.Column[Any], is_insert: bool) -> _Part:
    """The value a statement that leaves ``column`` out stores in it: its
    default in an INSERT, its onupdate in an UPDATE (_MISSING: unchanged)."""
    if is_insert and column.server_default is not None:
        return ("default", None)
    generator = column.default if is_insert else column.onupdate
    if generator is None:
        return ("const", None) if is_insert else _MISSING
    if generator.is_scalar:
        return ("const", getattr(generator, "arg", None))
    function = _no_argument_function(generator)
    return ("default", None) if function is None else ("call", function)


def _check_sources(column: sa.Column[Any], sources: Sequence[Any]) -> None:
    """Refuse sources whose every UPDATE that leaves them out changes them to
    a value the hook cannot know: a SQL expression, a function of the execution
    context, or the database's own (``server_onupdate``)."""
    for source in sources:
        onupdate = getattr(source, "onupdate", None)
        if getattr(source, "server_onupdate", None) is not None:
            how = "the database changes it on UPDATE (server_onupdate)"
        elif onupdate is not None and not onupdate.is_scalar:
            if _no_argument_function(onupdate) is not None:
                continue
            how = "its onupdate is a SQL expression or a function of the execution context"
        else:
            continue
        raise ConfigurationError(
            f"blind index {_name(column)} covers {_name(source)}, but {how}, so the index "
            "cannot follow it: give it a constant onupdate or a function without "
            f"arguments, or drop the onupdate and set {_name(source)} in your UPDATEs"
        )


def _refusal(
    index: _Index, parts: Sequence[_Part], what: str, unset: frozenset[str] | set[str] = frozenset()
) -> BlindIndexError | None:
    """Why ``parts`` give no index value, or None if they do; ``unset`` are
    the keys of the sources the statement leaves to their onupdate."""
    kinds = [kind for kind, _ in parts]
    if _COMPUTABLE.issuperset(kinds):
        return None
    sources = index.sources
    fix = f"or set {index.name} explicitly in the same statement"
    for kind, source in zip(kinds, sources, strict=True):
        if kind == "expression":
            return BlindIndexError(
                f"{what} sets {_name(source)} to a SQL expression, so the blind index "
                f"{index.name} cannot be computed: set {_name(source)} to a Python value, "
                f"{fix} (to NULL, then fill it with registry.backfill_index)"
            )
        if kind == "selected":
            return BlindIndexError(
                f"{what} takes {_name(source)} from its SELECT, so the blind index "
                f"{index.name} cannot be computed: select {index.name} too (NULL, then "
                "fill it with registry.backfill_index), or insert Python values"
            )
        if kind == "default":
            return BlindIndexError(
                f"{what} leaves {_name(source)} to a default computed by the database, "
                "by SQL or by a function of the execution context, so the blind index "
                f"{index.name} cannot be computed: give {_name(source)} a value (or a "
                f"default that is a constant or a function without arguments), {fix}"
            )
    every = ", ".join(_name(s) for s in sources)
    if "missing" in kinds:
        given = ", ".join(_name(s) for k, s in zip(kinds, sources, strict=True) if k != "missing")
        onupdate = [
            s for k, s in zip(kinds, sources, strict=True) if k != "missing" and s.key in unset
        ]
        by = f" ({', '.join(_name(s) for s in onupdate)} by its onupdate)" if onupdate else ""
        return BlindIndexError(
            f"{what} sets {given}{by} but not all of {every}, which the blind index "
            f"{index.name} covers, so it cannot be computed: set all of them in the same "
            f"statement, {fix}"
        )
    if "inserted" in kinds and len(set(kinds)) > 1:
        return BlindIndexError(
            f"{what} sets some of {every} from the inserted row and others not, so the "
            f"blind index {index.name} cannot be computed: set all of them from the "
            f"inserted row, or all from Python values, {fix}"
        )
    return None


def _fetch(part: _Part) -> Callable[[Mapping[str, Any]], Any]:
    kind, arg = part
    if kind == "param":
        return lambda row: row.get(arg)
    if kind == "call":
        return lambda row: arg()
    return lambda row: arg


def _row_value(parts: Sequence[_Part]) -> Callable[[Mapping[str, Any]], Any]:
    """The index's plaintext for one row of parameters."""
    if len(parts) == 1:
        return _fetch(parts[0])
    fetch = [_fetch(part) for part in parts]
    return lambda row: tuple(f(row) for f in fetch)


def _checked(
    index: _Index, given: _Part, parts: Sequence[_Part]
) -> Callable[[Mapping[str, Any]], Any]:
    """The explicit index value of a row whose sources the statement also
    sets: a `BlindDigest` is checked against them when hashed (`_Checked`)."""
    kind, arg = given
    plaintext = _row_value(parts)

    def checked(row: Mapping[str, Any]) -> Any:
        digest = row.get(arg, _ABSENT) if kind == "param" else arg
        if isinstance(digest, BlindDigest):
            return _Checked(digest, plaintext(row), index.name)
        return digest

    return checked


def _written_table(statement: Any) -> Any:
    """The table an INSERT or UPDATE writes. An ORM bulk statement on a
    subclass of joined-table inheritance names the subclass's table, and is
    executed once per table of the hierarchy, annotated with that table."""
    table = getattr(statement, "table", None)
    annotations = getattr(statement, "_annotations", None)
    if annotations:
        return annotations.get("_emit_insert_table", annotations.get("_emit_update_table", table))
    return table


def _complete(
    conn: Connection,
    statement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
) -> tuple[Any, Any, Any]:
    table = _written_table(statement)
    entry = _tables.get(table)
    if entry is None or not (statement.is_insert or statement.is_update):
        return statement, multiparams, params
    return _completed(entry.indexes(), table, statement, multiparams, params)


def _generated(
    index: _Index,
    parts: Sequence[_Part],
    added: dict[Any, Any],
    fills: list[tuple[str, Callable[[Mapping[str, Any]], Any]]],
) -> list[_Part]:
    """``parts``, a source's default or onupdate function replaced by a row
    parameter, which ``fills`` computes once per row for the source (added to
    the statement) and every index of it."""
    resolved = list(parts)
    for i, part in enumerate(parts):
        if part[0] == "call":
            source = index.sources[i]
            name = f"{source.key}__blind_source"
            if not any(column is source for column in added):
                added[source] = sa.type_coerce(sa.bindparam(name, type_=source.type), source.type)
                fills.append((name, _fetch(part)))
            resolved[i] = ("param", name)
    return resolved


def _completed(
    indexes: tuple[_Index, ...], table: Any, statement: Any, multiparams: Any, params: Any
) -> tuple[Any, Any, Any]:
    """The statement and parameters, with every index of ``table`` (which it
    writes) whose sources it sets."""
    rows = multiparams or [params]
    first = rows[0]
    is_insert = statement.is_insert
    if is_insert and statement._multi_values:
        return _completed_multi_values(indexes, table, statement), multiparams, params
    what = "INSERT" if is_insert else "UPDATE"
    from_select = statement.select is not None if is_insert else False
    assigned = _assigned(statement._values or {}, table)
    if from_select:
        what = "INSERT ... FROM SELECT"
        assigned = dict.fromkeys(statement._select_names, _SELECTED)
    added: dict[Any, Any] = {}
    fills: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = []
    generated: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = []
    for index in indexes:
        parts: list[_Part] = []
        for source in index.sources:
            key = source.key
            if key in assigned:
                parts.append(_part(assigned[key], key, first))
            elif key in first:
                parts.append(("param", key))
            else:
                parts.append(_MISSING)
        unset = {s.key for p, s in zip(parts, index.sources, strict=True) if p is _MISSING}
        parts = [
            _unset_part(s, is_insert) if p is _MISSING else p
            for p, s in zip(parts, index.sources, strict=True)
        ]
        if from_select:
            parts = [("default", None) if kind == "call" else (kind, a) for kind, a in parts]
        if index.key in assigned or index.key in first:  # given explicitly
            if _COMPUTABLE.issuperset(kind for kind, _ in parts):
                parts = _generated(index, parts, added, generated)
                given = (
                    _part(assigned[index.key], index.key, first)
                    if index.key in assigned
                    else ("param", index.key)
                )
                if given[0] == "param":
                    fills.append((given[1], _checked(index, given, parts)))
                elif isinstance(given[1], BlindDigest):
                    added[index.column] = index.value
                    fills.append((index.param, _checked(index, given, parts)))
            continue
        if len(unset) == len(parts) and all(
            p == ("const", None) if is_insert else p is _MISSING for p in parts
        ):
            continue  # left as it is, or NULL with its sources
        refusal = _refusal(index, parts, what, set() if is_insert else unset)
        if refusal is not None:
            raise refusal
        added[index.column] = index.value
        fills.append((index.param, _row_value(_generated(index, parts, added, generated))))
    fills[:0] = generated  # the sources' values first, which the indexes hash
    conflict = statement._post_values_clause if is_insert else None
    if conflict is not None:
        conflict, set_fills = _completed_upsert(indexes, table, conflict, first)
        fills.extend(set_fills)
    if not fills and conflict is None:
        return statement, multiparams, params
    if added or conflict is not None:
        statement = statement._generate()  # a copy, without the memoized cache key
    if added:
        # Columns and expressions already, so past values()'s coercions; an
        # entry replaces the one for the same column, whatever its key.
        replaced = {column.key for column in added}
        kept = {k: v for k, v in (statement._values or {}).items() if _key(k) not in replaced}
        statement._values = immutabledict({**kept, **added})
    if conflict is not None:
        statement._post_values_clause = conflict
    completed = []
    for row in rows:
        row = dict(row)
        for name, value in fills:
            computed = value(row)
            if computed is not _ABSENT:  # a row without the parameter stays without
                row[name] = computed
        completed.append(row)
    if multiparams:
        return statement, completed, {}
    return statement, [], completed[0]


def _is_inserted_row(from_: Any, table: Any, inserted: Any) -> bool:
    """Whether ``from_`` is an upsert's alias of the row proposed for
    insertion: ``excluded`` (PostgreSQL, SQLite) or ``inserted`` (MySQL)."""
    if from_ is inserted:
        return True
    return (
        isinstance(from_, Alias)
        and from_.name in ("excluded", "inserted")
        and _same_table(from_.element, table)
    )


def _completed_upsert(
    indexes: tuple[_Index, ...], table: Any, clause: Any, first: Mapping[str, Any]
) -> tuple[Any, list[tuple[str, Callable[[Mapping[str, Any]], Any]]]]:
    """The upsert's UPDATE part with its indexes (None if unchanged): set from
    the inserted row's index where the sources are set from the inserted row."""
    attribute = "update_values_to_set"  # PostgreSQL, SQLite
    what = "ON CONFLICT DO UPDATE"
    sets = getattr(clause, attribute, None)
    if sets is None:
        attribute, what = "update", "ON DUPLICATE KEY UPDATE"  # MySQL, MariaDB
        sets = getattr(clause, attribute, None)
    if not isinstance(sets, Mapping):
        return None, []  # DO NOTHING
    inserted = getattr(clause, "inserted_alias", None)
    assigned = _assigned(sets, table)
    added: dict[Any, Any] = {}
    fills: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = []
    for index in indexes:
        if index.key in assigned:
            continue
        parts: list[_Part] = []
        for source in index.sources:
            element = assigned.get(source.key, _MISSING)
            if element is _MISSING:
                parts.append(_MISSING)
            elif (
                isinstance(element, sa.ColumnClause)
                and element.key == source.key
                and _is_inserted_row(element.table, table, inserted)
            ):
                parts.append(("inserted", inserted if inserted is not None else element.table))
            else:
                parts.append(_part(element, None, first))
        if all(p is _MISSING for p in parts):
            continue
        refusal = _refusal(index, parts, what)
        if refusal is not None:
            raise refusal
        kind, row = parts[0]
        if kind == "inserted":
            added[index.column] = row.c[index.key]
        else:
            added[index.column] = index.set_value
            fills.append((index.set_param, _row_value(parts)))
    if not added:
        return None, []
    clause = clause._clone()
    setattr(clause, attribute, {**sets, **added})
    return clause, fills


def _completed_multi_values(indexes: tuple[_Index, ...], table: Any, statement: Any) -> Any:
    """A multi-row ``insert().values([...])`` with the indexes in each row."""
    groups = []
    changed = False
    for group in statement._multi_values:
        rows = []
        for row in group:
            if not isinstance(row, Mapping):  # positional, in the table's column order
                row = {column.key: value for column, value in zip(table.c, row, strict=False)}
            assigned = _assigned(row, table)
            added: dict[str, Any] = {}
            for index in indexes:
                if index.key in assigned:
                    given = assigned[index.key]
                    if isinstance(given, BlindDigest) and all(
                        s.key in assigned for s in index.sources
                    ):
                        parts = [_part(assigned[s.key], None, {}) for s in index.sources]
                        added[index.key] = _checked(index, ("const", given), parts)({})
                    continue
                if not any(s.key in assigned for s in index.sources) and all(
                    _unset_part(s, True) == ("const", None) for s in index.sources
                ):
                    continue
                parts = [
                    _part(assigned[s.key], None, {}) if s.key in assigned else _unset_part(s, True)
                    for s in index.sources
                ]
                refusal = _refusal(index, parts, "INSERT")
                if refusal is not None:
                    raise refusal
                for i, (kind, function) in enumerate(parts):
                    if kind == "call":  # the row's value, for the source and its indexes
                        key = index.sources[i].key
                        if key not in added:
                            added[key] = function()
                        parts[i] = ("const", added[key])
                added[index.key] = _row_value(parts)({})
            if added:
                row = {**assigned, **added}
                changed = True
            rows.append(row)
        groups.append(rows)
    if not changed:
        return statement
    statement = statement._generate()
    statement._multi_values = tuple(groups)
    return statement


def _check_other_tables(update: Any) -> None:
    """Refuse a multi-table UPDATE (MySQL, MariaDB) that sets sources of a
    blind index in a table other than the one it names, without the index:
    the write hook completes the named table only. Checked when compiled, so
    the statements of tables without blind indexes cost nothing more."""
    values = update._values
    if not values:
        return
    table = _written_table(update)
    for key in values:
        other = getattr(key, "table", None)
        entry = None if other is None or _same_table(other, table) else _tables.get(other)
        if entry is None:
            continue
        keys = {k.key for k in values if _same_table(getattr(k, "table", None), other)}
        for index in entry.indexes():
            sources = [s for s in index.sources if s.key in keys]
            if sources and index.key not in keys:
                name = index.column.table.name
                raise BlindIndexError(
                    f"a multi-table UPDATE sets {_name(sources[0])}, whose blind index "
                    f"{index.name} is computed only by an UPDATE of {name} itself: "
                    f"update {name} in a statement of its own (its WHERE can select "
                    "the rows with a subquery)"
                )


def _compile_update(before: Callable[..., str], update: Any, compiler: Any, **kw: Any) -> str:
    _check_other_tables(update)
    return before(update, compiler, **kw)


extend_compilation(Update, _compile_update)


def _source_keys(mapper: Mapper[Any], index: BlindIndex) -> list[str]:
    keys = []
    for source in index.sources:
        if source not in mapper.column_attrs:
            raise ConfigurationError(
                f"blind index source {source!r} is not a column attribute of "
                f"{mapper.class_.__name__}"
            )
        keys.append(source)
    return keys


@event.listens_for(Mapper, "mapper_configured")
def _wire_mapper(mapper: Mapper[Any], class_: type) -> None:
    """Resolve a mapped class's index sources (attribute names) to columns,
    and keep its objects' index attributes in step with their sources."""
    indexes: list[tuple[str, list[str]]] = []
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        if not (isinstance(column, sa.Column) and isinstance(column.type, BlindIndex)):
            continue
        keys = _source_keys(mapper, column.type)
        sources = tuple(mapper.column_attrs[k].columns[0] for k in keys)
        for source in sources:
            if not _same_table(getattr(source, "table", None), column.table):
                raise ConfigurationError(
                    f"blind index {_name(column)} covers {_name(source)}, of another "
                    "table: put the index in the table of its sources"
                )
        _check_sources(column, sources)
        with _lock:
            _orm_sources[column] = sources
            entry = _tables.get(column.table)
            if entry is not None:
                entry.resolved = None
        indexes.append((prop.key, keys))
    if not indexes:
        return
    compound = [_Compound(mapper, key, sources) for key, sources in indexes if len(sources) > 1]
    if compound:
        event.listen(
            mapper, "before_update", lambda m, c, target: _complete_sources(target, compound)
        )
    event.listen(
        mapper,
        "refresh",
        lambda target, context, attrs: _expire_index(target, context, attrs, indexes),
    )


class _Compound:
    """A compound index of a mapped class, for the unit of work: its
    attribute, its sources', those of its sources that have an onupdate, and
    the attributes of its table (an UPDATE of which applies the onupdates)."""

    __slots__ = ("key", "onupdate", "sources", "table")

    def __init__(self, mapper: Mapper[Any], key: str, sources: Sequence[str]) -> None:
        table = mapper.column_attrs[key].columns[0].table
        self.key = key
        self.sources = sources
        self.onupdate = {k for k in sources if mapper.column_attrs[k].columns[0].onupdate}
        self.table = [p.key for p in mapper.column_attrs if _same_table(p.columns[0].table, table)]


def _complete_sources(target: Any, compound: Sequence[_Compound]) -> None:
    """A unit-of-work UPDATE carries only the attributes that changed; where
    some sources of a compound index change (set, or by their onupdate), make
    it carry all of them, loading those not loaded, so that the write hook can
    compute the index."""
    state = sa.inspect(target)
    attrs = state.attrs
    for index in compound:
        if attrs[index.key].history.has_changes():
            continue
        changed = [attrs[k].history.has_changes() for k in index.sources]
        if index.onupdate and any(attrs[k].history.has_changes() for k in index.table):
            changed = [
                c or k in index.onupdate for c, k in zip(changed, index.sources, strict=True)
            ]
        if any(changed) and not all(changed):
            for key, was_changed in zip(index.sources, changed, strict=True):
                if not was_changed:
                    if key in state.unloaded:  # expired, deferred, or not loaded at all
                        state.session.refresh(target, [key])
                    flag_modified(target, key)


def _expire_index(
    target: Any, context: Any, attrs: Any, indexes: Sequence[tuple[str, Sequence[str]]]
) -> None:
    """An object's source attributes were given new values without its index
    (the ORM copies a bulk UPDATE's new values into the objects it holds, but
    not the index the write hook added): expire the index, to be loaded
    afresh. Attributes loaded from the database (a context) are left alone:
    the index in memory was read from the same rows, and loading expired
    attributes forgets what is expired meanwhile."""
    if attrs is None or context is not None:
        return
    names = set(attrs)
    stale = [key for key, sources in indexes if key not in names and not names.isdisjoint(sources)]
    session = object_session(target)
    if stale and session is not None:
        session.expire(target, stale)


def index_and_sources(target: Any) -> tuple[sa.Column[Any], list[sa.Column[Any]]]:
    """A blind index column (given as a Column or ORM attribute) and its
    source columns, as the backfill reads them."""
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


def as_stored(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """The column as stored (ciphertext), bypassing its type's processing."""
    stored = (
        sa.String() if getattr(column.type, "storage", "binary") == "text" else sa.LargeBinary()
    )
    return sa.type_coerce(column, stored)


# Named by the package, which exports it (sqlalchemy_envelope.blind_index is
# the function): how repr() and Alembic's default type rendering name it.
BlindIndex.__module__ = __name__.partition(".")[0]
