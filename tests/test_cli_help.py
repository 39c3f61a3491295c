"""Every command's --help has examples, and each example works as typed: a
real shell runs it, with the installed `sqlalchemy-envelope`, against a real
database (SQLite, PostgreSQL, MariaDB). Shell completion is produced and
completes."""

from __future__ import annotations

import base64
import importlib.util
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey
from sqlalchemy_envelope.cli import main

PROG = "sqlalchemy-envelope"
BIN = str(Path(sys.executable).parent)  # where the installed entry point lives

# The order the examples run in: each leaves the state the next ones need.
# "" is the group's own --help.
ORDER = [
    "init",
    "",
    "status",
    "census",
    "reencrypt",
    "destroy",
    "disable",
    "enable",
    "retire",
    "rotate",
    "maintenance",
    "migrate-from-sqlalchemy-utils",
    "backfill-index",
    "shred",
    "rewrap",
    "decrypt-in-place",
    "alembic-init",
]

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import AesEngine

from sqlalchemy_envelope import EncryptedType, blind_index

OLD_KEY = "the key the application gave sqlalchemy-utils"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    email_index: Mapped[str | None] = blind_index("email", normalize=["strip", "casefold"])


def sqlalchemy_utils_name():  # the column as sqlalchemy-utils declared it
    return StringEncryptedType(sa.Unicode(50), OLD_KEY, AesEngine, "pkcs5", length=255)


class Account(Base):  # in its migration window
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(
        EncryptedType(sa.Unicode(50), storage="text", migrating=sqlalchemy_utils_name())
    )
"""


def help_text(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], prog_name=PROG)
    assert result.exit_code == 0, result.output
    return result.output


def examples(command: str) -> list[str]:
    lines = help_text(*([command] if command else [])).splitlines()
    return [line.strip()[2:] for line in lines if line.strip().startswith("$ ")]


def test_every_command_has_examples() -> None:
    assert sorted(ORDER) == sorted(["", *main.commands])  # a new command gets one too
    for command in ORDER:
        found = examples(command)
        assert found, command
        for line in found:
            assert f"{PROG} {command}".strip() in line or not command, (command, line)


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_the_examples_of_every_help_work(db_url: str, tmp_path: Path) -> None:
    root, new_root = _key(), _key()
    (tmp_path / "new-root.key").write_text(new_root + "\n")
    (tmp_path / "new-root.key").chmod(0o600)
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "models.py").write_text(MODELS)
    spec = importlib.util.spec_from_file_location(
        f"examples_models_{os.urandom(4).hex()}", tmp_path / "myapp" / "models.py"
    )
    assert spec and spec.loader
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)

    # What an application has done before: keys rotated an hour ago (so that
    # `destroy` need not wait), rows under version 1, a blind index to fill (under version 3).
    engine = sa.create_engine(db_url)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(root)), wall_clock=lambda: an_hour_ago
    )
    registry.init()
    notes = sa.Table(
        "notes",
        models.Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(100))),
    )
    models.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": f"note {i}"} for i in range(5)])
    registry.rotate()
    registry.rotate()
    with Session(engine) as session:
        session.add_all(models.User(id=i, email=f"u{i}@example.com") for i in range(3))
        session.commit()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET email_index = NULL"))
        # Accounts as sqlalchemy-utils wrote them.
        written = sa.Table(
            "accounts",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", models.sqlalchemy_utils_name()),
        )
        conn.execute(written.insert(), [{"id": i, "name": f"account {i}"} for i in range(3)])
    registry.close()

    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "DATABASE_URL": db_url,
        "ENVELOPE_ROOT_KEY": root,
    }
    ran = []
    for command in ORDER:
        for line in examples(command):
            result = subprocess.run(
                ["bash", "-c", line],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr
            ran.append(line)
            if command == "rewrap":  # the application switches to the new root key
                env["ENVELOPE_ROOT_KEY"] = new_root
    assert len(ran) >= len(ORDER)

    # What the examples did, seen from the database.
    with engine.connect() as conn:
        stored = {i: v for i, v in conn.execute(sa.text("SELECT id, body FROM notes"))}
        assert {
            i: bytes(v).decode() if not isinstance(v, str) else v for i, v in stored.items()
        } == {i: f"note {i}" for i in range(5)}  # decrypted in place
        assert (
            conn.execute(sa.text("SELECT count(*) FROM users WHERE email_index IS NULL")).scalar()
            == 0
        )
        states = dict(
            conn.execute(
                sa.text("SELECT version, state FROM data_keys WHERE scope = 'default'")
            ).all()
        )
        shredded = conn.execute(
            sa.text(
                "SELECT count(*) FROM data_keys WHERE scope = 'acme' AND wrapped_key IS NOT NULL"
            )
        ).scalar()
    assert states[1] == "destroyed" and states[2] == "retired" and max(states) == 5
    assert shredded == 0
    assert (tmp_path / "migrations" / "versions" / "0001_data_keys.py").is_file()
    engine.dispose()

    # The accounts moved off sqlalchemy-utils, under the root key of the end.
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(base64.b64decode(new_root)))
    (census,) = registry.census(models.Account.name)
    assert census.rows == 3 and census.not_ciphertext == 0 and census.unknown_key_rows == 0
    with Session(engine) as session:
        names = session.scalars(sa.select(models.Account.name).order_by(models.Account.id))
        assert list(names) == [f"account {i}" for i in range(3)]
    registry.close()
    engine.dispose()


def _complete(*words: str) -> list[str]:
    """What bash offers for ``words`` (the last one being typed), through the
    script the documented command produces."""
    script = subprocess.run(
        [PROG],
        env={
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "_SQLALCHEMY_ENVELOPE_COMPLETE": "bash_source",
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "complete -o nosort -F _sqlalchemy_envelope_completion sqlalchemy-envelope" in script
    quoted = " ".join(f"'{w}'" for w in words)
    result = subprocess.run(
        [
            "bash",
            "-c",
            f"{script}\nCOMP_WORDS=({PROG} {quoted}); COMP_CWORD={len(words)}; "
            f'_sqlalchemy_envelope_completion {PROG}; printf "%s\\n" "${{COMPREPLY[@]}}"',
        ],
        env={"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def test_shell_completion() -> None:
    assert _complete("re") == ["reencrypt", "retire", "rewrap"]
    assert _complete("decrypt") == ["decrypt-in-place"]
    assert _complete("status", "--ur") == ["--url"]  # global options after the command too
    assert _complete("--sc") == ["--scope"]
    assert set(_complete("")) == set(main.commands)
