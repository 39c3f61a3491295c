"""sqlalchemy-envelope in two minutes, on an embedded SQLite database.

    pip install -e . && python examples/quickstart.py

The root key comes from ENVELOPE_ROOT_KEY (base64 of 32 random bytes) or from
ENVELOPE_ROOT_SEED + ENVELOPE_ROOT_SALT. If neither is set, the example makes
a throwaway key for this run only: in an application, a missing root key is a
configuration error, never a default.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    born: Mapped[datetime.date] = mapped_column(EncryptedType(sa.Date))
    notes: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(sa.JSON))
    balance: Mapped[Decimal | None] = mapped_column(EncryptedType(sa.Numeric(12, 2)))


def main(database: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{database}")
    if any(name in os.environ for name in ("ENVELOPE_ROOT_KEY", "ENVELOPE_ROOT_SEED")):
        registry = KeyRegistry.from_env(engine)
    else:
        print("(no ENVELOPE_ROOT_KEY set: using a throwaway root key for this run)")
        registry = KeyRegistry(engine, StaticRootKey(os.urandom(32)))
    first_key = registry.init()
    print(f"data key version {first_key.version} is active")
    Base.metadata.create_all(engine)

    with Session(engine) as session:
        session.add(
            Patient(
                name="Ada Lovelace",
                born=datetime.date(1815, 12, 10),
                notes={"allergies": ["penicillin"], "smoker": False},
                balance=Decimal("120.50"),
            )
        )
        session.commit()

    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT name FROM patients")).scalar_one()
    print(f"what the database holds: {bytes(raw).hex()[:48]}... ({len(raw)} bytes)")

    rotated = registry.rotate()
    print(f"rotated: version {rotated.version} is active, version 1 still decrypts")

    with Session(engine) as session:
        ada = session.scalars(sa.select(Patient)).one()
        print(f"what the application reads: {ada.name}, born {ada.born}, notes {ada.notes}")
        ada.name = "Augusta Ada King"
        session.commit()

    status = registry.status()
    print(f"status: active version {status.active_version}, keys {status.keys_by_state}")
    registry.close()
    engine.dispose()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder) / "quickstart.db")
