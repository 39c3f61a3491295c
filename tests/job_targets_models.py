"""An application's models, for tests/test_job_targets.py: imported by the
tests, and in their own processes by the command line (``--models``)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_envelope import EncryptedType, blind_index


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "clinic_patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(100), storage="text"))
    email_index: Mapped[str | None] = blind_index("email", normalize="casefold")


class Record(Base):
    __tablename__ = "clinic_records"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(50))
    note: Mapped[str | None] = mapped_column(EncryptedType(sa.String(100)))


class Room(Base):
    """No encrypted column: known through its MetaData."""

    __tablename__ = "clinic_rooms"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(20))


class Code(Base):
    """``code`` is randomized and ``tag`` deterministic, as these models
    declare them; the database may hold the other format (another version of
    the models wrote it)."""

    __tablename__ = "clinic_codes"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str | None] = mapped_column(EncryptedType(sa.String(20)))
    tag: Mapped[str | None] = mapped_column(EncryptedType(sa.String(20), deterministic=True))
