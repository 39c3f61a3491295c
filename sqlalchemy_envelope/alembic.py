"""Alembic integration. One line in ``env.py`` turns it on::

    import sqlalchemy_envelope.alembic  # noqa: F401

It registers, through Alembic's own extension points:

* operations that read like native ones in a migration::

      op.create_data_keys_table()          # the schema KeyRegistry.init() creates
      op.drop_data_keys_table()
      op.encrypt_column("users", "email")  # populated plaintext -> ciphertext, in batches
      op.decrypt_column("users", "email")  # and back, for downgrade()

* autogenerate support: migrations that use ``EncryptedType`` import
  ``sqlalchemy_envelope`` and render the type with its arguments, and the
  ``data_keys`` table, which is not in your models, is never proposed for
  dropping.

The column operations find the root key in the ``ENVELOPE_*`` variables (or
use the registry already attached to the migration's engine) and do all their
work on the migration's own connection and transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import comparators, renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from alembic.operations.ops import UpgradeOps
from alembic.util import DispatchPriority
from sqlalchemy.engine import Connection

from . import binding, census, columns
from .errors import ConfigurationError, ValuesLeftBehindError
from .migrate import MigrationReport
from .registry import KeyRegistry
from .storage import DEFAULT_TABLE_NAME, data_keys_schema

__all__ = [
    "PROTECTED_TABLES",
    "CreateDataKeysTableOp",
    "DecryptColumnOp",
    "DropDataKeysTableOp",
    "EncryptColumnOp",
]

PROTECTED_TABLES: set[str] = {DEFAULT_TABLE_NAME}
"""Tables autogenerate must never drop or alter; add yours if you renamed data_keys."""


@Operations.register_operation("create_data_keys_table")
class CreateDataKeysTableOp(MigrateOperation):
    """Create the data_keys table, exactly as `KeyRegistry.init` would."""

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
    """Drop the data_keys table: every value encrypted under its keys becomes
    unreadable, so only a downgrade past the first migration should do it."""

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
    batches. Widen the column first (``op.alter_column(..., type_=
    EncryptedType(...))``): the ciphertext is longer than the plaintext.
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
    """Write every value of an encrypted column back as plaintext, in batches."""

    @classmethod
    def decrypt_column(
        cls, operations: Operations, table_name: str, column_name: str, **kw: Any
    ) -> MigrationReport:
        result: MigrationReport = operations.invoke(cls(table_name, column_name, **kw))
        return result

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(self.table_name, self.column_name, **self._args())


@Operations.implementation_for(CreateDataKeysTableOp)
def _create_data_keys(operations: Operations, op: CreateDataKeysTableOp) -> None:
    operations.create_table(op.table_name, *data_keys_schema(op.table_name), schema=op.schema)


@Operations.implementation_for(DropDataKeysTableOp)
def _drop_data_keys(operations: Operations, op: DropDataKeysTableOp) -> None:
    operations.drop_table(op.table_name, schema=op.schema)


def _registry_for(connection: Connection) -> KeyRegistry:
    attached = binding.slot_for(connection.dialect).registry
    if attached is not None:
        return attached
    return KeyRegistry.from_env(connection.engine, attach=False)


def _run_column_op(operations: Operations, op: _ColumnOp, *, decrypt: bool) -> MigrationReport:
    if operations.migration_context.as_sql:
        raise ConfigurationError(
            "encrypt_column and decrypt_column need a database connection; they cannot "
            "run in offline (--sql) mode"
        )
    connection = operations.get_bind()
    registry = _registry_for(connection)
    with registry.on_connection(connection):
        registry.init()
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


def _render_table_op(name: str, op: CreateDataKeysTableOp | DropDataKeysTableOp) -> str:
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


def _uses_encryption(metadata: sa.MetaData | Sequence[sa.MetaData] | None) -> bool:
    if metadata is None:
        return False
    for md in [metadata] if isinstance(metadata, sa.MetaData) else metadata:
        for table in md.tables.values():
            if any(columns.info_of(c) is not None for c in table.columns):
                return True
    return False


@comparators.dispatch_for("autogenerate", priority=DispatchPriority.LAST)
def _after_autogenerate(autogen_context: AutogenContext, upgrade_ops: UpgradeOps) -> None:
    """Runs after Alembic's own comparisons: keep data_keys out of the diff,
    and import what rendered EncryptedType columns need."""
    upgrade_ops.ops = [
        op for op in upgrade_ops.ops if getattr(op, "table_name", None) not in PROTECTED_TABLES
    ]
    if _uses_encryption(autogen_context.metadata) and autogen_context.imports is not None:
        autogen_context.imports.add("import sqlalchemy_envelope")
