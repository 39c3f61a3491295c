"""A table as sqlalchemy-utils wrote it, and the same table during and after
its move to EncryptedType, for test_utils_migration.py.

Run as a script (``python utils_migration_models.py URL BATCH``, the root key
in ENVELOPE_ROOT_KEY), it migrates the table: the job a test kills midway.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_utils import EncryptedType as UtilsEncryptedType
from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import AesEngine, AesGcmEngine

from sqlalchemy_envelope import EncryptedType, KeyRegistry

KEY = "the sqlalchemy-utils key of the application"
COLUMNS = ("name", "token", "visits", "active", "note")


def utils_types(key: str = KEY) -> dict[str, Any]:
    """The columns as sqlalchemy-utils declared them: both engines, four
    paddings' worth of options, a static key and a key callable, strings and
    typed values, their String storage and their older EncryptedType's
    LargeBinary."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # their EncryptedType warns
        note = UtilsEncryptedType(sa.String(50), key, AesEngine, "oneandzeroes")
    return {
        "name": StringEncryptedType(sa.Unicode(50), key, AesEngine, "pkcs5", length=255),
        "token": StringEncryptedType(sa.String(80), lambda: key, AesGcmEngine, length=255),
        "visits": StringEncryptedType(sa.Integer, key, AesEngine, "zeroes", length=255),
        "active": StringEncryptedType(sa.Boolean, lambda: key, AesGcmEngine, length=255),
        "note": note,
    }


def our_types(legacy: dict[str, Any] | None = None) -> dict[str, EncryptedType]:
    """The columns as EncryptedType: final, or (given the sqlalchemy-utils
    types) for the migration window. ``token`` and ``note`` move to binary
    storage, the others keep text."""
    old: dict[str, Any] = legacy or {}

    def window(column: str) -> dict[str, Any]:
        return {"migrating": old[column]} if column in old else {}

    return {
        "name": EncryptedType(sa.Unicode(50), storage="text", **window("name")),
        "token": EncryptedType(sa.String(80), **window("token")),
        "visits": EncryptedType(sa.Integer, storage="text", **window("visits")),
        "active": EncryptedType(sa.Boolean, storage="text", **window("active")),
        "note": EncryptedType(sa.String(50), **window("note")),
    }


def table(types: dict[str, Any]) -> sa.Table:
    return sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        *(sa.Column(column, types[column]) for column in COLUMNS),
    )


def model(types: dict[str, Any]) -> type[Any]:
    """A mapped class of the table with ``types`` (each call its own)."""

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str | None] = mapped_column(types["name"])
        token: Mapped[str | None] = mapped_column(types["token"])
        visits: Mapped[int | None] = mapped_column(types["visits"])
        active: Mapped[bool | None] = mapped_column(types["active"])
        note: Mapped[str | None] = mapped_column(types["note"])

    return Account


def window_model(key: str = KEY) -> type[Any]:
    return model(our_types(utils_types(key)))


def final_model() -> type[Any]:
    return model(our_types())


def alter(
    engine: sa.Engine, old: Callable[[], dict[str, Any]], new: Callable[[], dict[str, Any]]
) -> None:
    """Change the columns' types as a migration does (on SQLite by copying
    the table), text storage to binary with PostgreSQL's conversion."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    before, after = old(), new()
    with engine.begin() as conn:
        operations = Operations(MigrationContext.configure(conn))
        with operations.batch_alter_table("accounts") as batch:
            for column in COLUMNS:
                options = {}
                if _binary(after[column]) and not _binary(before[column]):
                    options["postgresql_using"] = f"convert_to({column}, 'UTF8')"
                batch.alter_column(
                    column, type_=after[column], existing_type=before[column], **options
                )


def _binary(column_type: Any) -> bool:
    storage = getattr(column_type, "storage", None)
    if storage is not None:
        return bool(storage == "binary")
    return isinstance(column_type.impl_instance, sa.LargeBinary)


if __name__ == "__main__":
    url, batch_size = sys.argv[1], int(sys.argv[2])
    engine = sa.create_engine(url)
    registry = KeyRegistry.from_env(engine)
    registry.migrate_from_sqlalchemy_utils(
        window_model().__table__, batch_size=batch_size, progress=False
    )
