"""Alembic: a project made from the shipped template, driven by the real
alembic command on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import sqlalchemy as sa

from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey

ROOT = os.urandom(32)

MODELS = """
import datetime, enum, uuid
from decimal import Decimal
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_envelope import EncryptedType

class Mood(enum.Enum):
    HAPPY = "h"
    GRUMPY = "g"

class Base(DeclarativeBase):
    pass

class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    email: Mapped[str | None] = mapped_column(EncryptedType(sa.String(120), storage="text"))
    born: Mapped[datetime.date | None] = mapped_column(EncryptedType(sa.Date))
    notes: Mapped[dict | None] = mapped_column(EncryptedType(sa.JSON))
    balance: Mapped[Decimal | None] = mapped_column(
        EncryptedType(sa.Numeric(12, 2), context="patients.money"))
    mood: Mapped[Mood | None] = mapped_column(EncryptedType(Mood, storage="text"))
    token: Mapped[uuid.UUID | None] = mapped_column(EncryptedType(sa.Uuid))
    plain: Mapped[str | None] = mapped_column(sa.String(20))
"""

USE_MODELS = """
import datetime, sys
from decimal import Decimal
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy_envelope import KeyRegistry
from models import Mood, Patient

engine = sa.create_engine(sys.argv[1])
KeyRegistry.from_env(engine).init()
with Session(engine) as session:
    session.add(Patient(id=1, name="Ada", email="ada@example.com", born=datetime.date(1815, 12, 10),
                        notes={"a": 1}, balance=Decimal("1.50"), mood=Mood.HAPPY))
    session.commit()
    ada = session.get(Patient, 1)
    assert (ada.name, ada.email, ada.balance, ada.mood) == (
        "Ada", "ada@example.com", Decimal("1.50"), Mood.HAPPY), ada
print("ok")
"""


class Project:
    """A temporary project whose migrations folder comes from the template."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.env = {
            **os.environ,
            "DATABASE_URL": url,
            "ENVELOPE_ROOT_KEY": base64.b64encode(ROOT).decode(),
        }
        self.run("-m", "sqlalchemy_envelope", "alembic-init", "migrations")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, *args], cwd=self.root, env=self.env, capture_output=True, text=True
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def alembic(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "alembic", *args, check=check)

    def use_models(self, source: str) -> None:
        (self.root / "models.py").write_text(source)
        env_py = self.root / "migrations" / "env.py"
        env_py.write_text(
            env_py.read_text().replace(
                "target_metadata = None",
                "from models import Base\ntarget_metadata = Base.metadata",
            )
        )

    def migration(self, name: str, source: str) -> None:
        (self.root / "migrations" / "versions" / name).write_text(textwrap.dedent(source))

    def tables(self) -> set[str]:
        engine = sa.create_engine(self.url)
        try:
            return set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()


def test_template_autogenerate_upgrade_downgrade(db_url: str, tmp_path: Path) -> None:
    project = Project(tmp_path, db_url)
    assert (tmp_path / "migrations" / "versions" / "0001_data_keys.py").is_file()
    project.alembic("upgrade", "head")
    assert project.tables() >= {"data_keys", "alembic_version"}

    project.use_models(MODELS)
    project.alembic("revision", "--autogenerate", "-m", "patients")
    (generated,) = [
        p for p in (tmp_path / "migrations" / "versions").glob("*.py") if "patients" in p.name
    ]
    text = generated.read_text()
    assert "import sqlalchemy_envelope\n" in text
    assert "sqlalchemy_envelope.EncryptedType(sa.String(length=200))" in text
    assert "storage='text'" in text and "context='patients.money'" in text
    assert "'data_keys'" not in text  # not in the models, and never dropped

    project.alembic("upgrade", "head")
    assert "ok" in project.run("-c", USE_MODELS, project.url).stdout  # the file ran as is
    check = project.alembic("check")
    assert "No new upgrade operations detected" in check.stdout + check.stderr

    project.alembic("downgrade", "base")
    assert "patients" not in project.tables() and "data_keys" not in project.tables()
    project.alembic("upgrade", "head")
    assert {"patients", "data_keys"} <= project.tables()
    project.alembic("check")  # exits non-zero if autogenerate finds any difference


def test_encrypting_a_populated_column_and_back(db_url: str, tmp_path: Path) -> None:
    project = Project(tmp_path, db_url)
    emails = [f"user{i}@example.com" for i in range(2500)]
    rows = [{"id": i, "email": e} for i, e in enumerate(emails)]
    project.migration(
        "0002_users.py",
        f"""
        from alembic import op
        import sqlalchemy as sa

        revision = "0002_users"
        down_revision = "0001_data_keys"

        def upgrade():
            users = op.create_table(
                "users",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("email", sa.String(50)),
            )
            op.bulk_insert(users, {rows!r} + [{{"id": 9999, "email": None}}])

        def downgrade():
            op.drop_table("users")
        """,
    )
    project.migration(
        "0003_encrypt_email.py",
        """
        from alembic import op
        import sqlalchemy as sa
        import sqlalchemy_envelope

        revision = "0003_encrypt_email"
        down_revision = "0002_users"
        ENCRYPTED = sqlalchemy_envelope.EncryptedType(sa.String(50), storage="text")

        def upgrade():
            with op.batch_alter_table("users") as batch:
                batch.alter_column("email", type_=ENCRYPTED, existing_type=sa.String(50))
            op.encrypt_column("users", "email", batch_size=700)

        def downgrade():
            op.decrypt_column("users", "email", batch_size=700)
            with op.batch_alter_table("users") as batch:
                batch.alter_column("email", type_=sa.String(50), existing_type=ENCRYPTED)
        """,
    )
    project.alembic("upgrade", "head")  # one transaction: data_keys, users, encryption

    engine = sa.create_engine(db_url)
    raw = sa.Table("users", sa.MetaData(), autoload_with=engine)
    users = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(50), storage="text")),
    )
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(raw.c.id, raw.c.email)).all())
        read = dict(conn.execute(sa.select(users.c.id, users.c.email)).all())
    assert stored[9999] is None and read[9999] is None
    assert not any("@" in stored[i] for i in range(2500))
    assert [read[i] for i in range(2500)] == emails
    registry.close()
    engine.dispose()

    project.alembic("downgrade", "0002_users")
    engine = sa.create_engine(db_url)
    raw = sa.Table("users", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        plain = dict(conn.execute(sa.select(raw.c.id, raw.c.email)).all())
    assert [plain[i] for i in range(2500)] == emails
    engine.dispose()
    project.alembic("upgrade", "head")
    project.alembic("downgrade", "base")
    assert "users" not in project.tables()
