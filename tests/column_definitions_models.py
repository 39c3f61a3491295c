"""An application's models, for tests/test_column_definitions.py: imported by
the tests, and in their own processes by the command line (``--models``,
``ENVELOPE_MODELS``, an entry point) and by Alembic's env.py."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_envelope import EncryptedType


class Base(DeclarativeBase):
    pass


class Citizen(Base):
    __tablename__ = "citizens"
    id: Mapped[int] = mapped_column(primary_key=True)
    ssn: Mapped[str] = mapped_column(EncryptedType(sa.String(11), deterministic=True))
    badge: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(11), deterministic=True, context="old_citizens.badge")
    )
    name: Mapped[str | None] = mapped_column(EncryptedType(sa.String(40)))


class Memo(Base):
    __tablename__ = "memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str | None] = mapped_column(EncryptedType(sa.String(40), bind_scope=True))
    note: Mapped[str | None] = mapped_column(EncryptedType(sa.String(40), context="old_memos.note"))


class Passport(Base):
    """A plaintext column being encrypted in place, into a deterministic one."""

    __tablename__ = "passports"
    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[str | None] = mapped_column(
        EncryptedType(sa.String(20), storage="text", deterministic=True, migrating=True)
    )
