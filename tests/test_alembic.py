"""Alembic: projects made from the shipped template and from Alembic's own,
driven by the real alembic command on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from conftest import column_storage, type_storage
from sqlalchemy.orm import Session

from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey, blind_index_column

OPERATIONS_MD = Path(__file__).resolve().parent.parent / "docs" / "operations.md"

ROOT = os.urandom(32)

MODELS = """
import datetime, enum, uuid
from decimal import Decimal
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_envelope import EncryptedType, blind_index, blind_index_column

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
    level: Mapped[Mood | None] = mapped_column(EncryptedType(
        sa.Enum(Mood, values_callable=lambda e: [m.value for m in e]), storage="text"))
    token: Mapped[uuid.UUID | None] = mapped_column(EncryptedType(sa.Uuid))
    plain: Mapped[str | None] = mapped_column(sa.String(20))
    email_index: Mapped[str | None] = blind_index("email", normalize=["strip", "casefold"],
                                                  unique=True)
    ssn: Mapped[str | None] = mapped_column(EncryptedType(sa.String(11), deterministic=True))

visits = sa.Table(
    "visits",
    Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("reason", EncryptedType(sa.String(100))),
    blind_index_column("reason_index", "reason", normalize="casefold", bits=32),
)
"""

USE_MODELS = """
import datetime, sys
from decimal import Decimal
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy_envelope import KeyRegistry
from models import Mood, Patient, visits

engine = sa.create_engine(sys.argv[1])
KeyRegistry.from_env(engine).init()
with Session(engine) as session:
    session.add(Patient(id=1, name="Ada", email="ada@example.com", born=datetime.date(1815, 12, 10),
                        notes={"a": 1}, balance=Decimal("1.50"), mood=Mood.HAPPY, ssn="123",
                        level=Mood.GRUMPY))
    session.commit()
    ada = session.get(Patient, 1)
    assert (ada.name, ada.email, ada.balance, ada.mood, ada.level) == (
        "Ada", "ada@example.com", Decimal("1.50"), Mood.HAPPY, Mood.GRUMPY), ada
    for _ in range(2):
        found = session.scalars(sa.select(Patient.id).where(
            Patient.email_index.matches(" ADA@example.com"), Patient.ssn == "123")).all()
        assert found == [1], found
with engine.begin() as conn:
    conn.execute(visits.insert(), {"id": 1, "reason": "Checkup"})
    for _ in range(2):
        found = conn.scalars(sa.select(visits.c.reason).where(
            visits.c.reason_index.matches("checkup"))).all()
        assert found == ["Checkup"], found
print("ok")
"""


class Project:
    """A temporary project whose migrations folder comes from our template,
    or from Alembic's own ``generic`` one plus the one line the documentation asks
    for in env.py."""

    def __init__(self, root: Path, url: str, *, template: str = "envelope") -> None:
        self.root = root
        self.url = url
        self.env = {
            **os.environ,
            "DATABASE_URL": url,
            "ENVELOPE_ROOT_KEY": base64.b64encode(ROOT).decode(),
        }
        if template == "envelope":
            self.run("-m", "sqlalchemy_envelope", "alembic-init", "migrations")
            return
        ini = root / "alembic.ini"
        command.init(Config(str(ini)), str(root / "migrations"), template=template)
        ini.write_text(
            ini.read_text().replace("driver://user:pass@localhost/dbname", url.replace("%", "%%"))
        )
        env_py = root / "migrations" / "env.py"
        env_py.write_text(
            env_py.read_text().replace(
                "from alembic import context\n",
                "from alembic import context\nimport sqlalchemy_envelope.alembic  # noqa: F401\n",
            )
        )

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

    def check_stable(self) -> None:
        """Autogenerate finds nothing left to do (``alembic check`` exits non-zero
        otherwise): our columns compare equal to what the database reflects."""
        check = self.alembic("check")
        assert "No new upgrade operations detected" in check.stdout + check.stderr

    def generated(self, slug: str) -> str:
        """The text of the one migration autogenerate wrote for ``slug``."""
        versions = self.root / "migrations" / "versions"
        (path,) = [p for p in versions.glob("*.py") if slug in p.name]
        return path.read_text()

    def migration(self, name: str, source: str) -> None:
        (self.root / "migrations" / "versions" / name).write_text(textwrap.dedent(source))

    def tables(self) -> set[str]:
        engine = sa.create_engine(self.url)
        try:
            return set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()


def check_generated(text: str) -> None:
    """An autogenerated migration for MODELS: our types, by their package."""
    assert "\nimport sqlalchemy_envelope\n" in text
    assert "sqlalchemy_envelope.EncryptedType(sa.String(length=200))" in text
    assert "storage='text'" in text and "context='patients.money'" in text
    assert "sqlalchemy_envelope.EncryptedType(sa.String(length=11), deterministic=True)" in text
    assert "sqlalchemy_envelope.BlindIndex('email', normalize=['strip', 'casefold'])" in text
    assert "sqlalchemy_envelope.BlindIndex('reason', normalize='casefold', bits=32)" in text
    for module in ("blind_index", "sqla.", "keys.", "crypto.", "ops."):
        assert f"sqlalchemy_envelope.{module}" not in text  # the package, not its modules
    assert "'data_keys'" not in text  # not in the models, and never dropped
    assert "'data_key_events'" not in text


def test_template_autogenerate_upgrade_downgrade(db_url: str, tmp_path: Path) -> None:
    project = Project(tmp_path, db_url)
    assert (tmp_path / "migrations" / "versions" / "0001_data_keys.py").is_file()
    project.alembic("upgrade", "head")
    assert project.tables() >= {"data_keys", "data_key_events", "alembic_version"}

    project.use_models(MODELS)
    project.alembic("revision", "--autogenerate", "-m", "patients")
    check_generated(project.generated("patients"))

    project.alembic("upgrade", "head")
    assert "ok" in project.run("-c", USE_MODELS, project.url).stdout  # the file ran as is
    project.check_stable()

    project.alembic("downgrade", "base")
    assert not {"patients", "data_keys", "data_key_events"} & project.tables()
    project.alembic("upgrade", "head")
    assert {"patients", "data_keys"} <= project.tables()
    project.check_stable()


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


def documented_example(marker: str) -> str:
    """The Python example of docs/operations.md that contains ``marker``, as written."""
    blocks = [b.split("```")[0] for b in OPERATIONS_MD.read_text().split("```python\n")[1:]]
    (block,) = [b for b in blocks if marker in b]
    return textwrap.dedent(block)


NAMES = {
    1: "Zoë Ångström",
    2: "emoji 🦄🎉 too",
    3: "漢字かな交じり文",
    4: "plain ASCII",
    5: "Ωmega, then a space ",
    6: None,
}

USERS = """
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
    op.bulk_insert(users, [{"id": k, "email": v} for k, v in NAMES.items()])

def downgrade():
    op.drop_table("users")
"""

ENCRYPT_EMAIL = """
from alembic import op
import sqlalchemy as sa
import sqlalchemy_envelope

revision = "0003_encrypt_email"
down_revision = "0002_users"
"""


def _documented_migration_in_any_script(url: str, tmp_path: Path, allow: dict[str, str]) -> None:
    project = Project(tmp_path, url)
    project.migration("0002_users.py", f"NAMES = {NAMES!r}\n{USERS}")
    example = documented_example('op.encrypt_column("users", "email")')
    project.migration("0003_encrypt_email.py", ENCRYPT_EMAIL + example)
    if allow:  # refused until the environment accepts the risk; then it resumes
        refused = project.alembic("upgrade", "head", check=False)
        assert refused.returncode != 0
        assert "ENVELOPE_ALLOW_NON_STRICT_MYSQL=1" in refused.stderr
        project.env.update(allow)
    project.alembic("upgrade", "head")

    engine = sa.create_engine(url)
    registry = KeyRegistry(engine, StaticRootKey(ROOT), allow_non_strict_mysql=bool(allow))
    users = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(50), storage="text")),
    )
    raw = sa.Table("users", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(raw.c.id, raw.c.email)).all())
        for _ in range(2):
            read = conn.execute(sa.select(users.c.id, users.c.email))
            assert dict(read.all()) == NAMES
    with Session(engine) as session:
        for _ in range(2):
            read = session.execute(sa.select(users.c.id, users.c.email))
            assert dict(read.all()) == NAMES
    assert stored[6] is None
    assert all(stored[k].isascii() and NAMES[k] not in stored[k] for k in range(1, 6))
    assert column_storage(engine, "users", "email") == type_storage(
        engine, EncryptedType(sa.String(50), storage="text")
    )
    registry.close()
    engine.dispose()

    project.alembic("downgrade", "0002_users")
    engine = sa.create_engine(url)
    raw = sa.Table("users", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        for _ in range(2):
            assert dict(conn.execute(sa.select(raw.c.id, raw.c.email)).all()) == NAMES
    assert column_storage(engine, "users", "email") == type_storage(engine, sa.String(50))
    engine.dispose()
    project.alembic("upgrade", "head")
    project.alembic("downgrade", "base")
    assert "users" not in project.tables()


def test_the_documented_migration_keeps_text_in_any_script(db_url: str, tmp_path: Path) -> None:
    """The documented migration (docs/operations.md), as written, encrypts a populated column of
    text in any script in place and back, exactly, ending in the encrypted
    type's storage (ASCII text on MySQL/MariaDB), then in the plain type's."""
    _documented_migration_in_any_script(db_url, tmp_path, {})


def test_the_documented_migration_without_strict_mode(
    non_strict_mariadb_url: str, tmp_path: Path
) -> None:
    _documented_migration_in_any_script(
        non_strict_mariadb_url, tmp_path, {"ENVELOPE_ALLOW_NON_STRICT_MYSQL": "1"}
    )


def test_alembics_own_template_with_the_documented_line(db_url: str, tmp_path: Path) -> None:
    """A project made with ``alembic init`` and the one line of env.py the
    documentation asks for: its autogenerated migration imports what it uses and runs."""
    project = Project(tmp_path, db_url, template="generic")
    project.use_models(MODELS)
    project.alembic("revision", "--autogenerate", "-m", "patients")
    check_generated(project.generated("patients"))

    project.alembic("upgrade", "head")
    assert "ok" in project.run("-c", USE_MODELS, project.url).stdout
    project.check_stable()  # data_keys, made by init(), is not proposed for dropping
    project.alembic("downgrade", "base")
    assert not {"patients", "visits"} & project.tables()


def test_a_projects_own_render_item_still_applies(db_url: str, tmp_path: Path) -> None:
    """Our types render through a ``render_item`` chained after the project's,
    which still renders what it chooses, inside an EncryptedType too."""
    project = Project(tmp_path, db_url, template="generic")
    project.use_models(MODELS)
    env_py = tmp_path / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text()
        .replace(
            "def run_migrations_offline",
            "def render_item(kind, obj, autogen_context):\n"
            "    if kind == 'type' and type(obj) is sqlalchemy.Date:\n"
            "        return 'sa.types.Date()'\n"
            "    return False\n\n\n"
            "def run_migrations_offline",
        )
        .replace(
            "connection=connection, target_metadata=target_metadata\n",
            "connection=connection, target_metadata=target_metadata, render_item=render_item\n",
        )
        .replace(
            "from alembic import context\n", "from alembic import context\nimport sqlalchemy\n"
        )
    )
    project.alembic("revision", "--autogenerate", "-m", "patients")
    text = project.generated("patients")
    assert "sqlalchemy_envelope.EncryptedType(sa.types.Date())" in text
    check_generated(text)
    project.alembic("upgrade", "head")
    assert "ok" in project.run("-c", USE_MODELS, project.url).stdout


MEMOS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_envelope import EncryptedType

class Base(DeclarativeBase):
    pass

class Memo(Base):
    __tablename__ = "memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(LENGTH), storage="text"))
"""


def memos_table(length: int) -> sa.Table:
    return sa.Table(
        "memos",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(length), storage="text")),
    )


def test_widening_an_encrypted_column_runs_as_generated(db_url: str, tmp_path: Path) -> None:
    """Our template renders batch operations on SQLite, which cannot ALTER a
    column: the migration that widens an encrypted column runs as generated
    (on MariaDB too, where the storage grows from TINYTEXT to TEXT)."""
    project = Project(tmp_path, db_url)
    project.alembic("upgrade", "head")
    project.use_models(MEMOS.replace("LENGTH", "30"))
    project.alembic("revision", "--autogenerate", "-m", "memos")
    project.alembic("upgrade", "head")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    registry.init()
    with engine.begin() as conn:
        conn.execute(memos_table(30).insert(), {"id": 1, "body": "x" * 30})
    registry.close()
    engine.dispose()

    (tmp_path / "models.py").write_text(MEMOS.replace("LENGTH", "100"))
    project.alembic("revision", "--autogenerate", "-m", "wider")
    text = project.generated("wider")
    assert "sqlalchemy_envelope.EncryptedType(sa.String(length=100), storage='text')" in text
    project.alembic("upgrade", "head")
    project.check_stable()

    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    memos = memos_table(100)
    with engine.begin() as conn:
        conn.execute(memos.insert(), {"id": 2, "body": "y" * 100})
    with engine.connect() as conn:
        for _ in range(2):
            rows = conn.execute(sa.select(memos.c.body).order_by(memos.c.id)).scalars().all()
            assert rows == ["x" * 30, "y" * 100]
    registry.close()
    engine.dispose()


def test_autogenerate_compares_binary_storage_as_the_database_created_it(
    db_url: str, tmp_path: Path
) -> None:
    """MySQL/MariaDB create ``BLOB(n)`` as the smallest BLOB type holding n
    bytes: a wider value type is a change exactly when that type changes."""
    project = Project(tmp_path, db_url)
    project.alembic("upgrade", "head")
    binary = MEMOS.replace(', storage="text"', "")
    project.use_models(binary.replace("LENGTH", "50"))  # 234 bytes: TINYBLOB on MariaDB
    project.alembic("revision", "--autogenerate", "-m", "memos")
    project.alembic("upgrade", "head")
    project.check_stable()

    (tmp_path / "models.py").write_text(binary.replace("LENGTH", "55"))  # 254: still TINYBLOB
    project.check_stable()

    (tmp_path / "models.py").write_text(binary.replace("LENGTH", "100"))  # 434: BLOB
    mysql = sa.make_url(db_url).get_backend_name() == "mysql"
    check = project.alembic("check", check=False)
    assert (check.returncode != 0) == mysql  # elsewhere the storage has no size
    if mysql:
        project.alembic("revision", "--autogenerate", "-m", "wider")
        assert "existing_type=mysql.TINYBLOB()" in project.generated("wider")
        project.alembic("upgrade", "head")
        project.check_stable()


HUGE_TEXTS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_envelope import EncryptedType

class Base(DeclarativeBase):
    pass

class Scan(Base):
    __tablename__ = "scans"
    id: Mapped[int] = mapped_column(primary_key=True)
    image: Mapped[bytes] = mapped_column(EncryptedType(sa.LargeBinary(16777215), storage="text"))
    notes: Mapped[str] = mapped_column(EncryptedType(sa.Text, storage="text"))
"""


def test_autogenerate_settles_on_text_storage_beyond_a_varchar(db_url: str, tmp_path: Path) -> None:
    """Text storage of an unbounded type, or too long for a PostgreSQL
    VARCHAR, is created as TEXT there (LONGTEXT on MySQL/MariaDB): the
    migration runs, and a second autogenerate finds nothing to change."""
    project = Project(tmp_path, db_url)
    project.alembic("upgrade", "head")
    project.use_models(HUGE_TEXTS)
    project.alembic("revision", "--autogenerate", "-m", "scans")
    text = project.generated("scans")
    assert "EncryptedType(sa.LargeBinary(length=16777215), storage='text')" in text
    assert "EncryptedType(sa.Text(), storage='text')" in text
    project.alembic("upgrade", "head")
    project.check_stable()


EMAIL_INDEX_MIGRATION = """
from alembic import op
import sqlalchemy as sa
import sqlalchemy_envelope

revision = "0003_email_index"
down_revision = "0002_users"

# The columns the backfill reads, declared as the models declare them.
users = sa.Table(
    "users",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sqlalchemy_envelope.EncryptedType(sa.String(200))),
    sqlalchemy_envelope.blind_index_column("email_index", "email", normalize=["strip", "casefold"]),
)

def upgrade():
    op.add_column("users", sa.Column(
        "email_index",
        sqlalchemy_envelope.BlindIndex("email", normalize=["strip", "casefold"]),
        nullable=True,
    ))
    op.backfill_index(users.c.email_index, batch_size=700)
    op.create_index("ix_users_email_index", "users", ["email_index"], unique=True)

def downgrade():
    op.drop_index("ix_users_email_index", table_name="users")
    op.drop_column("users", "email_index")
"""


def test_a_migration_adds_and_fills_a_blind_index(db_url: str, tmp_path: Path) -> None:
    """op.backfill_index fills a blind index column in the same upgrade that
    adds it, on the migration's connection, as docs/operations.md shows."""
    project = Project(tmp_path, db_url)
    project.migration(
        "0002_users.py",
        """
        from alembic import op
        import sqlalchemy as sa
        import sqlalchemy_envelope

        revision = "0002_users"
        down_revision = "0001_data_keys"

        def upgrade():
            op.create_table(
                "users",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("email", sqlalchemy_envelope.EncryptedType(sa.String(200))),
            )

        def downgrade():
            op.drop_table("users")
        """,
    )
    project.alembic("upgrade", "head")
    before = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(200))),
    )
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    registry.init()
    emails = [f"User{i}@Example.com" for i in range(1500)]
    with engine.begin() as conn:
        conn.execute(before.insert(), [{"id": i, "email": e} for i, e in enumerate(emails)])
        conn.execute(before.insert(), {"id": 9999, "email": None})
    registry.close()
    engine.dispose()

    project.migration("0003_email_index.py", EMAIL_INDEX_MIGRATION)
    project.alembic("upgrade", "head")

    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    users = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", EncryptedType(sa.String(200))),
        blind_index_column("email_index", "email", normalize=["strip", "casefold"]),
    )
    with engine.connect() as conn:
        for i in (0, 777, 1499, 0):
            found = conn.execute(
                sa.select(users.c.id).where(users.c.email_index.matches(f" user{i}@example.COM"))
            ).scalars()
            assert list(found) == [i]
        nulls = conn.execute(sa.select(users.c.id).where(users.c.email_index.is_(None)))
        assert list(nulls.scalars()) == [9999]
    with Session(engine) as session:
        for _ in range(2):
            email = session.execute(
                sa.select(users.c.email).where(users.c.email_index.matches("user5@example.com"))
            ).scalar_one()
            assert email == "User5@Example.com"
    registry.close()
    engine.dispose()

    project.alembic("downgrade", "0002_users")
    engine = sa.create_engine(db_url)
    assert "email_index" not in {c["name"] for c in sa.inspect(engine).get_columns("users")}
    engine.dispose()


def test_alembics_default_rendering_names_our_types_by_the_package() -> None:
    """Without our render_item (Alembic's render_python_code API), Alembic
    names a type by its class's module: the package, which exports it."""
    from alembic.autogenerate import render_python_code
    from alembic.operations import ops

    upgrade = ops.UpgradeOps(
        [
            ops.AddColumnOp("users", blind_index_column("email_index", "email", bits=64)),
            ops.AddColumnOp("users", sa.Column("email", EncryptedType(sa.String(200)))),
        ]
    )
    text = render_python_code(upgrade)
    assert "sqlalchemy_envelope.BlindIndex('email', bits=64)" in text
    assert "sqlalchemy_envelope.EncryptedType(sa.String(length=200))" in text
