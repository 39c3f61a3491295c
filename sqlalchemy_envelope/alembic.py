"""Alembic integration. One line in ``env.py`` turns it on::

    import sqlalchemy_envelope.alembic  # noqa: F401

It registers, through Alembic's own extension points:

* operations that read like native ones in a migration::

      op.create_data_keys_table()          # the schema KeyRegistry.init() creates
      op.drop_data_keys_table()            # (both with data_key_events, the key events)
      op.create_data_key_events_table()    # for a database of a version without them
      op.drop_data_key_events_table()
      op.encrypt_column("users", "email")  # populated plaintext -> ciphertext, in batches
      op.decrypt_column("users", "email")  # and back, for downgrade()
      op.backfill_index(users.c.email_index)  # fill a new blind index column

* autogenerate support: ``EncryptedType`` and ``BlindIndex`` columns render
  with their arguments and the migration imports ``sqlalchemy_envelope``
  (a ``render_item`` chained after the project's own, if any), and the
  ``data_keys`` and ``data_key_events`` tables, which are not in your models,
  are never proposed for dropping.

The data operations find the root key in the ``ENVELOPE_*`` variables (or
use the registry already attached to the migration's engine) and do all their
work on the migration's own connection and transaction. ``encrypt_column`` and
``decrypt_column`` name the column: its options (context, deterministic,
bind_scope) come from the models env.py imports, else the defaults are
assumed, and values that do not decrypt with them are left (UnknownDefinition).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import sqlalchemy as sa
from alembic.autogenerate import comparators, render, renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from alembic.operations.ops import AlterColumnOp, UpgradeOps
from alembic.util import DispatchPriority, PriorityDispatchResult
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeEngine

from .errors import ConfigurationError, ValuesLeftBehindError
from .keys.events import events_schema, events_table_name
from .keys.storage import DEFAULT_TABLE_NAME, MYSQL_DIALECTS, data_keys_schema
from .ops import census
from .ops.migrate import MigrationReport
from .registry import KeyRegistry
from .sqla.blind_index import BlindIndex
from .sqla.types import EncryptedType

__all__ = [
    "PROTECTED_TABLES",
    "BackfillIndexOp",
    "CreateDataKeyEventsTableOp",
    "CreateDataKeysTableOp",
    "DecryptColumnOp",
    "DropDataKeyEventsTableOp",
    "DropDataKeysTableOp",
    "EncryptColumnOp",
    "MigrateFromSqlalchemyUtilsOp",
]

PROTECTED_TABLES: set[str] = {DEFAULT_TABLE_NAME}
"""Tables autogenerate must never drop or alter, each with its events table;
add yours if you renamed data_keys."""


@Operations.register_operation("create_data_keys_table")
class CreateDataKeysTableOp(MigrateOperation):
    """Create the data_keys table and its events table, exactly as
    `KeyRegistry.init` would (the events' anchor comes with the first
    change, or with `init`)."""

    def __init__(self, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def create_data_keys_table(
        cls, operations: Operations, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None
    ) -> None:
        operations.invoke(cls(table_name, schema))

    def reverse(self) -> DropDataKeysTableOp:
        return DropDataKeysTableOp(self.table_name, self.schema)


@Operations.register_operation("drop_data_keys_table")
class DropDataKeysTableOp(MigrateOperation):
    """Drop the data_keys table and its events table (if there): every value
    encrypted under its keys becomes unreadable, so only a downgrade past
    the first migration should do it."""

    def __init__(self, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def drop_data_keys_table(
        cls, operations: Operations, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None
    ) -> None:
        operations.invoke(cls(table_name, schema))

    def reverse(self) -> CreateDataKeysTableOp:
        return CreateDataKeysTableOp(self.table_name, self.schema)


@Operations.register_operation("create_data_key_events_table")
class CreateDataKeyEventsTableOp(MigrateOperation):
    """Create the key events table of an existing data_keys table (made by a
    version without key events). Then start its chain, with the root key
    (which a migration does not hold): ``sqlalchemy-envelope events start
    --reason ...`` (`KeyRegistry.start_events`); until then, key changes are
    refused, as an empty table beside keys may be one whose events were
    deleted."""

    def __init__(self, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def create_data_key_events_table(
        cls, operations: Operations, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None
    ) -> None:
        operations.invoke(cls(table_name, schema))

    def reverse(self) -> DropDataKeyEventsTableOp:
        return DropDataKeyEventsTableOp(self.table_name, self.schema)


@Operations.register_operation("drop_data_key_events_table")
class DropDataKeyEventsTableOp(MigrateOperation):
    """Drop the key events table of a data_keys table: the record of every
    change to the keys goes with it."""

    def __init__(self, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> None:
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def drop_data_key_events_table(
        cls, operations: Operations, table_name: str = DEFAULT_TABLE_NAME, schema: str | None = None
    ) -> None:
        operations.invoke(cls(table_name, schema))

    def reverse(self) -> CreateDataKeyEventsTableOp:
        return CreateDataKeyEventsTableOp(self.table_name, self.schema)


class _ColumnOp(MigrateOperation):
    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        schema: str | None = None,
        context: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.table_name = table_name
        self.column_name = column_name
        self.schema = schema
        self.context = context
        self.batch_size = batch_size

    def _args(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "context": self.context,
            "batch_size": self.batch_size,
        }


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(_ColumnOp):
    """Encrypt every plaintext value of a populated column in place, in
    batches. Widen the column first to the encrypted type declared with
    ``migrating=True`` (``op.alter_column(..., type_=EncryptedType(...,
    migrating=True))``): the ciphertext is longer than the plaintext, and on
    MySQL/MariaDB that type holds text in any script (utf8mb4); once every
    value is ciphertext the column gets the encrypted type's ASCII storage.
    Fails with `ValuesLeftBehindError`, naming the rows, if any value is
    left unencrypted; ``plaintext_rows`` lists primary keys (tuples for a
    composite key) whose values are legacy plaintext that merely looks like
    ciphertext, to encrypt them as plaintext."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        plaintext_rows: Sequence[Any] = (),
        **kw: Any,
    ) -> None:
        super().__init__(table_name, column_name, **kw)
        self.plaintext_rows = list(plaintext_rows)

    @classmethod
    def encrypt_column(
        cls, operations: Operations, table_name: str, column_name: str, **kw: Any
    ) -> MigrationReport:
        result: MigrationReport = operations.invoke(cls(table_name, column_name, **kw))
        return result

    def reverse(self) -> DecryptColumnOp:
        return DecryptColumnOp(self.table_name, self.column_name, **self._args())


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(_ColumnOp):
    """Write every value of an encrypted column back as plaintext, in
    batches; on MySQL/MariaDB the column first gets the ``migrating=True``
    type's storage (utf8mb4), which holds text in any script."""

    @classmethod
    def decrypt_column(
        cls, operations: Operations, table_name: str, column_name: str, **kw: Any
    ) -> MigrationReport:
        result: MigrationReport = operations.invoke(cls(table_name, column_name, **kw))
        return result

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(self.table_name, self.column_name, **self._args())


@Operations.register_operation("backfill_index")
class BackfillIndexOp(MigrateOperation):
    """Fill a blind index column wherever it is NULL, e.g. right after
    ``op.add_column`` added it. A migration has no models, so ``target`` is
    the index column of an ``sa.Table`` the migration declares as the models
    do: its primary key, the encrypted source columns and the index column
    (``blind_index_column``), which carry the sources' types and contexts and
    the index's normalizers."""

    def __init__(self, target: Any, *, batch_size: int = 1000) -> None:
        self.target = target
        self.batch_size = batch_size

    @classmethod
    def backfill_index(
        cls, operations: Operations, target: Any, *, batch_size: int = 1000
    ) -> MigrationReport:
        result: MigrationReport = operations.invoke(cls(target, batch_size=batch_size))
        return result


@Operations.register_operation("migrate_from_sqlalchemy_utils")
class MigrateFromSqlalchemyUtilsOp(MigrateOperation):
    """Seal the values sqlalchemy-utils wrote in a column under the
    registry's keys, in batches (`KeyRegistry.migrate_from_sqlalchemy_utils`).
    A migration has no models, so ``target`` is the column of an ``sa.Table``
    the migration declares with its primary key and the column as
    ``EncryptedType(..., migrating=StringEncryptedType(...))``, the
    sqlalchemy-utils type (key, engine, padding) the column had."""

    def __init__(self, target: Any, *, batch_size: int = 1000) -> None:
        self.target = target
        self.batch_size = batch_size

    @classmethod
    def migrate_from_sqlalchemy_utils(
        cls, operations: Operations, target: Any, *, batch_size: int = 1000
    ) -> MigrationReport:
        result: MigrationReport = operations.invoke(cls(target, batch_size=batch_size))
        return result


@Operations.implementation_for(CreateDataKeysTableOp)
def _create_data_keys(operations: Operations, op: CreateDataKeysTableOp) -> None:
    operations.create_table(op.table_name, *data_keys_schema(op.table_name), schema=op.schema)
    _create_events(operations, CreateDataKeyEventsTableOp(op.table_name, op.schema))


@Operations.implementation_for(DropDataKeysTableOp)
def _drop_data_keys(operations: Operations, op: DropDataKeysTableOp) -> None:
    # Created by this operation, or by create_data_key_events_table (and
    # maybe dropped already by its own downgrade).
    name = events_table_name(op.table_name)
    operations.drop_table(name, schema=op.schema, if_exists=True)
    operations.drop_table(op.table_name, schema=op.schema)


@Operations.implementation_for(CreateDataKeyEventsTableOp)
def _create_events(operations: Operations, op: CreateDataKeyEventsTableOp) -> None:
    name = events_table_name(op.table_name)
    operations.create_table(name, *events_schema(name), schema=op.schema)


@Operations.implementation_for(DropDataKeyEventsTableOp)
def _drop_events(operations: Operations, op: DropDataKeyEventsTableOp) -> None:
    operations.drop_table(events_table_name(op.table_name), schema=op.schema)


@contextmanager
def _migration_registry(operations: Operations, name: str) -> Iterator[KeyRegistry]:
    """The registry serving the migration's engine, else one from the
    ``ENVELOPE_*`` variables that serves it while the operation runs (so the
    operation's typed columns read and write through it); either way pinned
    to the migration's connection and transaction."""
    if operations.migration_context.as_sql:
        raise ConfigurationError(
            f"{name} needs a database connection; it cannot run in offline (--sql) mode"
        )
    connection: Connection = operations.get_bind()
    registry = KeyRegistry.serving(connection.engine)
    own = registry is None
    if registry is None:
        registry = KeyRegistry.from_env(connection.engine)
    try:
        with registry.on_connection(connection):
            registry.init()
            yield registry
    finally:
        if own:
            registry.close()


def _run_column_op(operations: Operations, op: _ColumnOp, *, decrypt: bool) -> MigrationReport:
    connection = operations.get_bind()
    with _migration_registry(operations, "encrypt_column and decrypt_column") as registry:
        name = ".".join(p for p in (op.schema, op.table_name, op.column_name) if p)
        (ref,) = census.resolve(connection, [name])
        if op.context is not None:
            ref = census.with_context(ref, op.context)
        if decrypt:
            report = registry.decrypt_in_place(ref, batch_size=op.batch_size, progress=False)
            hint = "make them decrypt (enable a disabled key) or clear them"
        else:
            named = op.plaintext_rows if isinstance(op, EncryptColumnOp) else []
            report = registry.reencrypt(
                ref,
                batch_size=op.batch_size,
                encrypt_plaintext=True,
                progress=False,
                plaintext_rows={ref.name: named} if named else None,
            )
            hint = (
                "if a value is legacy plaintext that looks like ciphertext, list its primary "
                "key in op.encrypt_column(..., plaintext_rows=[...]) to encrypt it as "
                "plaintext; fix or clear any other"
            )
    if report.left_behind:
        lines = "\n  ".join(report.left_lines(limit=20))
        raise ValuesLeftBehindError(
            f"{ref.name}: {report.left_behind:,} values left behind:\n  {lines}\n"
            f"{hint}, then run the migration again",
            report,
        )
    return report


@Operations.implementation_for(EncryptColumnOp)
def _encrypt_column(operations: Operations, op: EncryptColumnOp) -> MigrationReport:
    return _run_column_op(operations, op, decrypt=False)


@Operations.implementation_for(DecryptColumnOp)
def _decrypt_column(operations: Operations, op: DecryptColumnOp) -> MigrationReport:
    return _run_column_op(operations, op, decrypt=True)


@Operations.implementation_for(BackfillIndexOp)
def _backfill_index(operations: Operations, op: BackfillIndexOp) -> MigrationReport:
    with _migration_registry(operations, "backfill_index") as registry:
        return registry.backfill_index(op.target, batch_size=op.batch_size, progress=False)


@Operations.implementation_for(MigrateFromSqlalchemyUtilsOp)
def _migrate_from_sqlalchemy_utils(
    operations: Operations, op: MigrateFromSqlalchemyUtilsOp
) -> MigrationReport:
    with _migration_registry(operations, "migrate_from_sqlalchemy_utils") as registry:
        return registry.migrate_from_sqlalchemy_utils(
            op.target, batch_size=op.batch_size, progress=False
        )


def _render_table_op(
    name: str,
    op: CreateDataKeysTableOp
    | DropDataKeysTableOp
    | CreateDataKeyEventsTableOp
    | DropDataKeyEventsTableOp,
) -> str:
    args = [] if op.table_name == DEFAULT_TABLE_NAME else [repr(op.table_name)]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    return f"op.{name}({', '.join(args)})"


@renderers.dispatch_for(CreateDataKeysTableOp)
def _render_create(autogen_context: AutogenContext, op: CreateDataKeysTableOp) -> str:
    return _render_table_op("create_data_keys_table", op)


@renderers.dispatch_for(DropDataKeysTableOp)
def _render_drop(autogen_context: AutogenContext, op: DropDataKeysTableOp) -> str:
    return _render_table_op("drop_data_keys_table", op)


@renderers.dispatch_for(CreateDataKeyEventsTableOp)
def _render_create_events(autogen_context: AutogenContext, op: CreateDataKeyEventsTableOp) -> str:
    return _render_table_op("create_data_key_events_table", op)


@renderers.dispatch_for(DropDataKeyEventsTableOp)
def _render_drop_events(autogen_context: AutogenContext, op: DropDataKeyEventsTableOp) -> str:
    return _render_table_op("drop_data_key_events_table", op)


def _render_column_op(name: str, op: _ColumnOp) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in op._args().items() if v not in (None, 1000))
    return f"op.{name}({op.table_name!r}, {op.column_name!r}{extra})"


@renderers.dispatch_for(EncryptColumnOp)
def _render_encrypt(autogen_context: AutogenContext, op: EncryptColumnOp) -> str:
    rendered = _render_column_op("encrypt_column", op)
    if not op.plaintext_rows:
        return rendered
    return f"{rendered[:-1]}, plaintext_rows={op.plaintext_rows!r})"


@renderers.dispatch_for(DecryptColumnOp)
def _render_decrypt(autogen_context: AutogenContext, op: DecryptColumnOp) -> str:
    return _render_column_op("decrypt_column", op)


def _render_type(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Our column types as the migration needs them: prefixed with the
    package, whose import it adds, and EncryptedType's value type rendered by
    Alembic itself (its prefixes, its dialect imports)."""
    if kind != "type" or not isinstance(obj, EncryptedType | BlindIndex):
        return False
    autogen_context.imports.add("import sqlalchemy_envelope")
    if isinstance(obj, EncryptedType):
        return "sqlalchemy_envelope." + obj.render(
            lambda value_type: render._repr_type(value_type, autogen_context)
        )
    return f"sqlalchemy_envelope.{obj!r}"


def _render_with_ours(autogen_context: AutogenContext) -> None:
    """Chain `_render_type` after the project's own ``render_item``. Alembic
    renders the migration after comparing, with this same context, and
    resets its ``imports`` in between: only what rendering adds reaches the
    file."""
    own = autogen_context.opts.get("render_item")

    def render_item(kind: str, obj: Any, context: AutogenContext) -> str | Literal[False]:
        rendered: str | Literal[False] = own(kind, obj, context) if own else False
        return rendered if rendered is not False else _render_type(kind, obj, context)

    autogen_context.opts = {**autogen_context.opts, "render_item": render_item}


_MYSQL_SIZE_CLASSES = (
    (2**8, mysql.TINYBLOB, mysql.TINYTEXT),
    (2**16, mysql.BLOB, mysql.TEXT),
    (2**24, mysql.MEDIUMBLOB, mysql.MEDIUMTEXT),
)


def _as_created(column_type: EncryptedType | BlindIndex, dialect: Dialect) -> TypeEngine[Any]:
    """The storage type the database creates for one of our columns: the
    dialect's variant, as DDL renders it (not the driver's adaptation of it,
    which may compile otherwise: psycopg's adaptation of TEXT is a VARCHAR).
    MySQL and MariaDB turn ``BLOB(n)`` and ``TEXT(n)`` into the smallest BLOB
    or TEXT type that holds n bytes, or n characters of the charset, and
    reflect that."""
    storage = column_type.load_dialect_impl(dialect)
    storage = storage._variant_mapping.get(dialect.name, storage)
    length = getattr(storage, "length", None)
    if dialect.name not in MYSQL_DIALECTS or not length:
        return storage
    if type(storage) is sa.LargeBinary:
        for limit, blob, _ in _MYSQL_SIZE_CLASSES:
            if length < limit:
                return blob()
        return mysql.LONGBLOB()
    if type(storage) is mysql.TEXT:
        charset, collation = storage.charset, storage.collation
        size = length * (4 if charset == "utf8mb4" else 1)  # the class holds bytes
        for limit, _, text in _MYSQL_SIZE_CLASSES:
            if size < limit:
                return text(charset=charset, collation=collation)
        return mysql.LONGTEXT(charset=charset, collation=collation)
    return storage


@comparators.dispatch_for("column", subgroup="types")
def _compare_our_type(
    autogen_context: AutogenContext,
    alter_column_op: AlterColumnOp,
    schema: str | None,
    table_name: str,
    column_name: str,
    conn_col: sa.Column[Any],
    metadata_col: sa.Column[Any],
) -> PriorityDispatchResult:
    """Compare our columns by the storage the database created for them, so
    that a second autogenerate finds nothing. Runs after a project's own
    ``compare_type`` (which wins) and before Alembic's comparison of types."""
    column_type = metadata_col.type
    if not isinstance(column_type, EncryptedType | BlindIndex):
        return PriorityDispatchResult.CONTINUE
    context = autogen_context.migration_context
    assert context is not None
    created = sa.Column(column_name, _as_created(column_type, context.dialect))
    alter_column_op.existing_type = conn_col.type
    if context.impl.compare_type(conn_col, created):
        alter_column_op.modify_type = column_type
    return PriorityDispatchResult.STOP


@comparators.dispatch_for("autogenerate", priority=DispatchPriority.LAST)
def _after_autogenerate(autogen_context: AutogenContext, upgrade_ops: UpgradeOps) -> None:
    """Runs after Alembic's own comparisons: keep data_keys out of the diff,
    and render our column types."""
    protected = PROTECTED_TABLES | {events_table_name(name) for name in PROTECTED_TABLES}
    upgrade_ops.ops = [
        op for op in upgrade_ops.ops if getattr(op, "table_name", None) not in protected
    ]
    _render_with_ours(autogen_context)
