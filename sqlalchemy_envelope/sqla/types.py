"""`EncryptedType`: a column type whose values the database only sees encrypted.

::

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))

Each value is bound to a context, its schema, table and column by default,
so a ciphertext copied into another column, or into the same table of
another schema, fails to decrypt. Pass ``context="old_table.old_column"`` to
keep reading old data after renaming a table or column.
"""

from __future__ import annotations

import enum
import sys
import weakref
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.type_api import to_instance
from sqlalchemy.types import TypeDecorator, TypeEngine

from ..crypto import format as fmt
from ..errors import (
    ConfigurationError,
    DestroyedKeyError,
    InvalidValueError,
    NotCiphertextError,
    UnknownKeyError,
)
from ..keys.storage import MYSQL_DIALECTS
from . import binding, columns
from .codec import codec_for
from .expressions import EnvelopeColumnType, Kind, check_written
from .mysql_text import ANY_TEXT, ASCII
from .utils_legacy import LegacyValues, legacy_values

__all__ = ["EncryptedType"]

_STORAGES = ("binary", "text")
_POSTGRESQL_VARCHAR_MAX = 10_485_760  # characters; its TEXT has no limit (and no length)


class _Raise:
    def __repr__(self) -> str:
        return "RAISE"


RAISE: Any = _Raise()
"""The default of ``if_destroyed``: reading a crypto-shredded value raises
`DestroyedKeyError`. Pass any other value to read that instead."""


class _Attachment:
    """The table column a type instance is attached to, shared with the
    per-dialect copies SQLAlchemy makes of it, so that all of them use one
    context."""

    __slots__ = ("__weakref__", "column", "contexts", "explicit", "owner")

    def __init__(self, owner: EncryptedType, explicit: str | None) -> None:
        self.owner = owner
        self.column: sa.Column[Any] | None = None
        self.explicit = explicit
        self.contexts: dict[str | None, fmt.Context] = {}  # by schema

    def schema(self) -> str | None:
        """The schema the column's table names (None: the default one)."""
        return getattr(getattr(self.column, "table", None), "schema", None)

    def context(self, schema: str | None) -> fmt.Context:
        """What values are bound to when the column's table is in ``schema``."""
        context = self.contexts.get(schema)
        if context is None:
            context = self.contexts[schema] = self._context(schema)
        return context

    def _context(self, schema: str | None) -> fmt.Context:
        if self.explicit is not None:
            return fmt.given_context(self.explicit, schema)
        table = getattr(self.column, "table", None)
        if self.column is None or table is None:
            raise ConfigurationError(
                "this EncryptedType is not attached to a table column, so it has no "
                "context: pass EncryptedType(..., context='table.column')"
            )
        return fmt.column_context(schema, table.name, self.column.name)

    def weak_context(self) -> Callable[[str | None], fmt.Context]:
        """`context`, for the registry of loaded columns: it must not keep
        the column alive (that registry forgets a column when it is gone)."""
        attachment = weakref.ref(self)

        def context(schema: str | None) -> fmt.Context:
            alive = attachment()
            if alive is None:
                raise ConfigurationError("this encrypted column is no longer loaded")
            return alive.context(schema)

        return context

    def name(self) -> str:
        """The column for error messages: ``table.column`` when attached, even
        under an explicit context, else the context."""
        table = getattr(self.column, "table", None)
        if self.column is not None and table is not None:
            return f"{table.name}.{self.column.name}"
        if self.explicit is not None:
            return f"context {self.explicit!r}"
        return "an encrypted column not attached to a table"


class EncryptedType(EnvelopeColumnType, TypeDecorator[Any]):
    """Encrypts values of ``value_type`` (String, Integer, Date, JSON, an Enum
    ...) with AES-256-GCM under the registry's active data key.

    ``storage="binary"`` stores bytes (BLOB/bytea, 34 bytes over the
    plaintext); ``storage="text"`` stores base64 text, in a ``String`` sized
    for the longest value ``value_type`` allows, or ``Text``. ``pad_to=N``
    stores strings padded to a multiple of N bytes, so that their length
    reveals less. ``migrating=`` names what the values not yet encrypted
    are, while a migration moves them: ``True``, plaintext (an in-place
    encryption); a sqlalchemy-utils ``StringEncryptedType`` or
    ``EncryptedType``, what that type wrote, read with it
    (docs/migrating-from-sqlalchemy-utils.md).
    """

    impl: TypeEngine[Any] | type[TypeEngine[Any]] = sa.LargeBinary
    cache_ok = True

    class Comparator(TypeDecorator.Comparator[Any]):
        """Refuses comparisons that could never mean anything on ciphertext:
        all of them on randomized columns, all but equality on deterministic
        ones (``IS NULL`` works on both). See expressions.py for when."""

        __slots__ = ()

        def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
            check_written(op, self.expr, other)
            return super().operate(op, *other, **kwargs)

        def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
            check_written(op, self.expr, (other,))
            return super().reverse_operate(op, other, **kwargs)

    comparator_factory = Comparator

    def __init__(
        self,
        value_type: TypeEngine[Any] | type[TypeEngine[Any]] | type[enum.Enum],
        *,
        context: str | None = None,
        storage: str = "binary",
        migrating: Any = False,
        deterministic: bool = False,
        bind_scope: bool = False,
        if_destroyed: Any = RAISE,
        pad_to: int | None = None,
    ) -> None:
        if isinstance(value_type, type) and issubclass(value_type, enum.Enum):
            value_type = sa.Enum(value_type)
        value_type = to_instance(value_type)
        if isinstance(value_type, EncryptedType):
            raise ConfigurationError("EncryptedType cannot wrap another EncryptedType")
        if storage not in _STORAGES:
            raise ConfigurationError(f"storage must be 'binary' or 'text', not {storage!r}")
        if context is not None and (not isinstance(context, str) or not context):
            raise ConfigurationError("context must be a non-empty string")
        super().__init__()
        if migrating is True and not _holds_plaintext_in_place(value_type, storage):
            raise ConfigurationError(
                "migrating=True reads legacy plaintext in place, which works for strings "
                "with storage='text' and LargeBinary with storage='binary'; convert other "
                "types through a new column (see docs/operations.md)"
            )
        self.value_type = value_type
        self.context = context
        self.storage = storage
        self.migrating = migrating
        self.deterministic = deterministic
        self.bind_scope = bind_scope
        self.if_destroyed = if_destroyed
        self.pad_to = pad_to
        if deterministic and bind_scope:
            raise ConfigurationError(
                "bind_scope applies to randomized columns, not deterministic ones"
            )
        if deterministic and pad_to is not None:
            raise ConfigurationError(
                "pad_to applies to randomized columns, not deterministic ones: a "
                "deterministic column must keep one ciphertext per value, and its "
                "equal ciphertexts show which rows share a value anyway"
            )
        self._codec = codec_for(value_type, pad_to=pad_to, fixed_width=not deterministic)
        # A sqlalchemy-utils type in place of True: the column held its values.
        self._legacy: LegacyValues | None = None
        if migrating is not False and migrating is not True:
            self._legacy = legacy_values(migrating, self._codec.encode, self._where)
        # Whether the ORM sends None rather than leave the column out of an
        # INSERT: the wrapped type's choice (JSON's unless none_as_null).
        self.should_evaluate_none = bool(value_type.should_evaluate_none)
        self._attachment = _Attachment(self, context)
        self.impl = self._storage_type()

    def _storage_type(self) -> TypeEngine[Any]:
        # MySQL/MariaDB need a size class (BLOB holds 64 KB), and text storage
        # in ASCII with a binary collation: base64 is case-sensitive. Both are
        # BLOB/TEXT types, stored off the row: a VARCHAR of base64 would count
        # a third more than the plaintext's VARCHAR against the 64 KB row
        # limit, so a schema that fits in plaintext might not fit encrypted.
        # A migrating column holds legacy plaintext too: utf8mb4 (mysql_text.py).
        charset = ANY_TEXT if self.migrating else ASCII
        # sqlalchemy-utils' values are not sized by the column's type (a
        # Float's repr, a key callable's engine): unbounded while they remain.
        max_bytes = None if self._legacy is not None else self._codec.max_bytes
        if self.storage == "binary":
            if max_bytes is None:
                return sa.LargeBinary().with_variant(mysql.LONGBLOB(), *MYSQL_DIALECTS)
            return sa.LargeBinary(max_bytes + fmt.OVERHEAD)
        if max_bytes is None:
            return sa.Text().with_variant(mysql.LONGTEXT(**charset), *MYSQL_DIALECTS)
        length = fmt.text_length(max_bytes)
        text = sa.String(length).with_variant(mysql.TEXT(length, **charset), *MYSQL_DIALECTS)
        if length > _POSTGRESQL_VARCHAR_MAX:
            # A LargeBinary(16777215) or String(10485760) plaintext fits
            # PostgreSQL, but its base64 would not fit a VARCHAR there.
            return text.with_variant(sa.Text(), "postgresql")
        return text

    @property
    def python_type(self) -> type[Any]:
        return self._codec.python_type

    @property
    def envelope_kind(self) -> Kind:
        return Kind.DETERMINISTIC if self.deterministic else Kind.RANDOMIZED

    @property
    def envelope_column(self) -> str:
        return self._attachment.name()

    @property
    def envelope_values(self) -> Hashable | None:
        try:
            context = self._attachment.context(self._attachment.schema())
        except ConfigurationError:
            return None
        return (self.envelope_kind, context, self.storage, self.bind_scope)

    def __repr__(self) -> str:
        return self.render(_render)

    def render(self, render_type: Callable[[TypeEngine[Any]], str]) -> str:
        """This type as Python source, with ``value_type`` rendered by
        ``render_type``: Alembic's autogenerate passes its own type renderer,
        which applies the migration's prefixes and adds its imports. An
        Enum class renders as the names of its members, which are what is
        stored and what the column is sized for (a migration has no class)."""
        value_type = self.value_type
        if isinstance(value_type, sa.Enum) and value_type.enum_class is not None:
            names = list(value_type.enum_class.__members__)
            value_type = sa.Enum(*names, name=value_type.name)
        args = [render_type(value_type)]
        if self.context is not None:
            args.append(f"context={self.context!r}")
        if self.storage != "binary":
            args.append(f"storage={self.storage!r}")
        if self._legacy is not None:
            # Never the sqlalchemy-utils type itself: its repr holds the key.
            args.append("migrating=...")
        elif self.migrating:
            args.append("migrating=True")
        if self.deterministic:
            args.append("deterministic=True")
        if self.bind_scope:
            args.append("bind_scope=True")
        if self.if_destroyed is not RAISE:
            args.append(f"if_destroyed={self.if_destroyed!r}")
        if self.pad_to is not None:
            args.append(f"pad_to={self.pad_to!r}")
        return f"EncryptedType({', '.join(args)})"

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        if not isinstance(parent, sa.Column):
            return
        if self._attachment.owner is not self:
            # A copy made by Column._copy() (mixins, to_metadata): its own column.
            self._attachment = _Attachment(self, self.context)
        elif self._attachment.column is not None and self._attachment.column is not parent:
            raise ConfigurationError(
                "one EncryptedType instance was given to two columns; create one "
                "EncryptedType per column"
            )
        self._attachment.column = parent
        columns.remember(
            parent,
            columns.ColumnInfo(
                self.storage,
                self._attachment.weak_context(),
                bool(self.migrating),
                self.deterministic,
                self.bind_scope,
                self.value_type,
                self._legacy,
            ),
        )

    # -- processors: the hot path -------------------------------------------

    def _where(self) -> str:
        """What errors about a value name: the column and the wrapped type."""
        return f"{self._attachment.name()} ({_label(self.value_type)})"

    def bind_processor(self, dialect: Dialect) -> Any:
        codec = self._codec
        encode = codec.encode
        self._attachment.context(self._attachment.schema())  # refuses a type with none
        where = self._where()
        # Every plaintext must fit the storage sized for it: no database ever
        # sees a longer value (MySQL in non-strict mode would cut it short).
        limit = sys.maxsize if codec.max_bytes is None else codec.max_bytes
        none_as_null = codec.none_as_null  # else None is encoded (JSON null)
        # A str the codec would encode with str.encode() is encoded here, in
        # the processor's frame, and fits: the codec's max_bytes counts four
        # bytes per character. A longer one, another type or a lone surrogate
        # take the codec, for its error.
        str_chars = -1 if codec.str_chars is None else codec.str_chars

        def plaintext_of(value: Any) -> bytes:
            try:
                plaintext = encode(value)
            except Exception as error:
                raise _refused(where, error) from None
            if len(plaintext) > limit:
                raise _overlong(where, len(plaintext), limit)
            return plaintext

        # The registry, scope and schema come from the statement being
        # executed (its execution options, its Session, the scope() block
        # around it): they are resolved into an encrypting function once per
        # `Writing`, which changes with every execution, and kept with it in
        # one tuple, replaced whole, so that threads sharing this processor
        # read a pair.
        encrypting = self._encrypting(binding.slot_for(dialect))
        current_writing = binding.current_writing
        # Starts with no Writing (so with no function to call: bytes stands in).
        encrypting_for: tuple[binding.Writing | None, Callable[[bytes], Any]] = (None, bytes)

        if self.storage == "binary" and not (self.deterministic or self.bind_scope):
            # Every Python 3 DB-API driver takes bytes for BLOB/bytea; the
            # impl's DBAPI.Binary() wrapper would only add a copy per value.
            def process_binary(value: Any) -> Any:
                nonlocal encrypting_for
                if value.__class__ is str and len(value) <= str_chars:
                    try:
                        plaintext = value.encode()
                    except UnicodeEncodeError:
                        plaintext = plaintext_of(value)
                elif value is None and none_as_null:
                    return None
                else:
                    plaintext = plaintext_of(value)
                writing = current_writing()
                pair = encrypting_for
                if pair[0] is not writing:
                    pair = encrypting_for = (writing, encrypting(writing))
                return pair[1](plaintext)

            return process_binary

        impl = None if self.storage == "binary" else self.impl_instance.bind_processor(dialect)
        to_text = fmt.to_text if self.storage == "text" else None

        def process(value: Any) -> Any:
            nonlocal encrypting_for
            if value.__class__ is str and len(value) <= str_chars:
                try:
                    plaintext = value.encode()
                except UnicodeEncodeError:
                    plaintext = plaintext_of(value)
            elif value is None and none_as_null:
                return None
            else:
                plaintext = plaintext_of(value)
            writing = current_writing()
            pair = encrypting_for
            if pair[0] is not writing:
                pair = encrypting_for = (writing, encrypting(writing))
            data = pair[1](plaintext)
            if to_text is not None:
                data = to_text(data)
            return impl(data) if impl is not None else data

        return process

    def _encrypting(
        self, slot: binding.EngineSlot
    ) -> Callable[[binding.Writing], Callable[[bytes], bytes]]:
        """How this column encrypts a plaintext for a `Writing`: under the
        chosen registry's active key for the chosen scope, or deterministically
        under that scope's index key, bound to the schema the statement puts
        the column's table in."""
        deterministic = self.deterministic
        bind_scope = self.bind_scope
        attachment = self._attachment
        written = attachment.schema()

        def encrypting(writing: binding.Writing) -> Callable[[bytes], bytes]:
            registry, scope = slot.writing(writing)
            context = attachment.context(binding.effective_schema(writing, written))
            if deterministic:
                return partial(registry.encrypt_deterministic, context=context.current, scope=scope)
            if bind_scope:
                scope = scope or registry.scope
                return registry.encryptor(fmt.scoped_context(context, scope).current, scope)
            return registry.encryptor(context.current, scope)

        return encrypting

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        decode = self._codec.decode
        padded = self._codec.padded
        attachment = self._attachment
        written = attachment.schema()
        context = attachment.context(written)
        slot = binding.slot_for(dialect)
        decrypt = slot.decrypt
        if self.deterministic:
            decrypt = slot.decrypt_deterministic
        elif self.bind_scope:
            decrypt = slot.decrypt_scoped
        if_destroyed = self.if_destroyed
        impl = self.impl_instance.result_processor(dialect, coltype)
        text = self.storage == "text"
        migrating = bool(self.migrating)
        where = self._where()
        legacy = self._legacy
        # A migrating column's legacy value: plaintext as is, or read by
        # the sqlalchemy-utils type it was written with.
        read_legacy: Callable[[Any], Any] = (
            _as_is if legacy is None else partial(legacy.read, dialect=dialect)
        )
        current_writing = binding.current_writing
        effective_schema = binding.effective_schema
        # On an engine whose statements translate schemas, the context of
        # the rows read is the latest statement's: the last one seen, with
        # its `Writing`, in one tuple replaced whole.
        seen: tuple[binding.Writing | None, fmt.Context] = (None, context)

        def translated() -> fmt.Context:
            nonlocal seen
            writing = current_writing()
            pair = seen
            if pair[0] is not writing:
                pair = seen = (writing, attachment.context(effective_schema(writing, written)))
            return pair[1]

        def process(value: Any) -> Any:
            if value is None:
                return None
            if impl is not None:
                value = impl(value)
            try:
                ciphertext = _ciphertext(value, text)
                if migrating:
                    fmt.check(ciphertext)
            except NotCiphertextError:
                if migrating:
                    return read_legacy(value)  # legacy, read as the old column would
                raise
            try:
                plaintext = decrypt(ciphertext, translated() if slot.translating else context)
            except DestroyedKeyError:
                if if_destroyed is RAISE:
                    raise
                return if_destroyed  # the value was crypto-shredded
            except UnknownKeyError:
                if migrating:
                    return read_legacy(value)  # legacy that merely looks like ciphertext
                raise
            try:
                return decode(plaintext)
            except (ValueError, KeyError, TypeError):
                return _decoded_padded(padded, plaintext, where)

        if text or migrating or self.deterministic or self.bind_scope or impl is not None:
            return process

        # A registry and its decryptor for this column; none at first.
        cached: tuple[Any, Any] = (object(), None)

        def process_common(value: Any) -> Any:
            # The common case in one frame: bytes from the driver, one
            # registry serving the engine, no schema_translate_map (the slot
            # has no sole registry then). Anything else takes the full path.
            nonlocal cached
            pair = cached
            if pair[0] is not slot.sole or value.__class__ is not bytes:
                registry = slot.sole
                if registry is None or value.__class__ is not bytes:
                    return None if value is None else process(value)
                pair = cached = (registry, registry.decryptor(context))
            try:
                plaintext = pair[1](value)
            except DestroyedKeyError:
                if if_destroyed is RAISE:
                    raise
                return if_destroyed
            try:
                return decode(plaintext)
            except (ValueError, KeyError, TypeError):
                return _decoded_padded(padded, plaintext, where)

        return process_common

    def literal_processor(self, dialect: Dialect) -> Any:
        """The value encrypted exactly as when bound, as a SQL literal, for
        statements compiled with ``literal_binds``."""
        encrypt = self.bind_processor(dialect)
        if self.storage == "text":
            quote = self.impl_instance.literal_processor(dialect)
            assert quote is not None  # every String type renders literals

            def render_text(value: Any) -> str:
                return str(quote(encrypt(value)))

            return render_text
        hex_literal = "decode('{}', 'hex')" if dialect.name == "postgresql" else "X'{}'"

        def render_binary(value: Any) -> str:
            return hex_literal.format(encrypt(value).hex())

        return render_binary

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        processed = self.bind_processor(dialect)(value)
        return processed

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        processed = self.result_processor(dialect, None)(value)
        return processed


def _as_is(value: Any) -> Any:
    return value


def _ciphertext(value: Any, text: bool) -> bytes:
    if text:
        if not isinstance(value, str):
            raise NotCiphertextError("the column holds bytes where base64 text was expected")
        return fmt.from_text(value)
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    if not isinstance(value, bytes):
        raise NotCiphertextError(
            f"the column holds {type(value).__name__}, not ciphertext bytes: it is "
            "probably plaintext written before the column was encrypted"
        )
    return value


def _render(value_type: TypeEngine[Any]) -> str:
    module = type(value_type).__module__
    if module.startswith("sqlalchemy.dialects."):
        return f"{module.split('.')[2]}.{value_type!r}"
    if module.startswith("sqlalchemy."):
        return f"sa.{value_type!r}"
    return repr(value_type)


def _holds_plaintext_in_place(value_type: TypeEngine[Any], storage: str) -> bool:
    if storage == "text":
        return isinstance(value_type, sa.String) and not isinstance(value_type, sa.Enum)
    return isinstance(value_type, sa.LargeBinary)


def _label(value_type: TypeEngine[Any]) -> str:
    """The wrapped type for messages; an Enum by its class or name, not its
    (possibly many) values."""
    if isinstance(value_type, sa.Enum):
        name = getattr(value_type.enum_class, "__name__", value_type.name)
        return f"Enum({name})" if name else "Enum"
    return repr(value_type)


def _refused(where: str, error: Exception) -> InvalidValueError:
    """The error for a value the column cannot hold, never quoting it: a
    codec's `InvalidValueError` gives its reason; any other exception (the
    value's own method failing) only its type, as its message may quote it."""
    if isinstance(error, InvalidValueError):
        return InvalidValueError(f"{where}: {error}")
    return InvalidValueError(
        f"{where}: encoding the value raised {type(error).__name__}; "
        "give a value of the column's Python type"
    )


def _overlong(where: str, size: int, limit: int) -> InvalidValueError:
    return InvalidValueError(
        f"{where}: the value encodes to {size} bytes, more than the {limit} its storage "
        "is sized for"
    )


def _decoded_padded(padded: Callable[[bytes], Any] | None, plaintext: bytes, where: str) -> Any:
    """A value the column's decoder refused, read as padded text (written
    while the column had ``pad_to``), or the error saying it cannot be read."""
    if padded is not None:
        try:
            return padded(plaintext)
        except ValueError:
            pass
    raise _undecodable(where) from None


def _undecodable(where: str) -> InvalidValueError:
    return InvalidValueError(
        f"{where}: a value decrypted but does not read as the column's type: was the "
        "column's type changed without migrating its data?"
    )


# Named by the package, which exports it: how repr() and Alembic's default
# type rendering name it (sqlalchemy_envelope.EncryptedType).
EncryptedType.__module__ = __name__.partition(".")[0]
