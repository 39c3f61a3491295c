"""Every command's --help has examples, and docs/cli.md's Examples lists them
all in an order that works as one script: a real shell runs that block as
written, with the installed `sqlalchemy-envelope`, against a real database
(SQLite, PostgreSQL, MariaDB), from the state the page says it starts in.
Shell completion is produced and completes."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

from sqlalchemy_envelope import KeyRegistry, StaticRootKey
from sqlalchemy_envelope.cli import main

PROG = "sqlalchemy-envelope"
BIN = str(Path(sys.executable).parent)  # where the installed entry point lives
CLI_PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import AesEngine

from sqlalchemy_envelope import EncryptedType, blind_index

OLD_KEY = "the key the application gave sqlalchemy-utils"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(100)))


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
    lines = help_text(*command.split()).splitlines()
    return [line.strip()[2:] for line in lines if line.strip().startswith("$ ")]


def page_script() -> str:
    """docs/cli.md's Examples block, as written."""
    section = CLI_PAGE.read_text().partition("\n## Examples\n")[2]
    found = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert found, "docs/cli.md: no bash block under Examples"
    return found.group(1)


def page_commands() -> list[str]:
    """The command lines of the page's script, without their comments."""
    lines = (line.partition("  #")[0].strip() for line in page_script().splitlines())
    return [line for line in lines if PROG in line]


def test_every_command_has_examples_and_the_page_lists_them() -> None:
    subcommands = [
        f"{name} {sub}"
        for name, group in main.commands.items()
        if isinstance(group, click.Group)
        for sub in group.commands
    ]
    every = []
    for command in ["", *main.commands, *subcommands]:
        found = examples(command)
        assert found, command
        for line in found:
            assert f"{PROG} {command}".strip() in line or not command, (command, line)
        every += found
    assert set(page_commands()) == set(every)


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_the_examples_page_runs_as_written(db_url: str, tmp_path: Path) -> None:
    """docs/cli.md's Examples, one script, from the state the page says it starts in."""
    root, new_root = _key(), _key()
    for name, key in (("root.key", root), ("new-root.key", new_root)):
        (tmp_path / name).write_text(key + "\n")
        (tmp_path / name).chmod(0o600)
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "models.py").write_text(MODELS)
    spec = importlib.util.spec_from_file_location(
        f"examples_models_{os.urandom(4).hex()}", tmp_path / "myapp" / "models.py"
    )
    assert spec and spec.loader
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)

    # The application has run for a while: rows under version 1, which a
    # rotation an hour ago retired; the blind index added after the rows.
    engine = sa.create_engine(db_url)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    registry = KeyRegistry(
        engine, StaticRootKey(base64.b64decode(root)), wall_clock=lambda: an_hour_ago
    )
    registry.init()
    models.Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(models.Note(id=i, body=f"note {i}") for i in range(5))
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
    registry.rotate()
    registry.close()
    # ... with a version of the library before key events: no events table.
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE data_key_events"))

    (tmp_path / "examples.sh").write_text(page_script())
    result = subprocess.run(
        ["bash", "-e", "-x", "examples.sh"],
        cwd=tmp_path,
        env={
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "DATABASE_URL": db_url,
            "ENVELOPE_ROOT_KEY_FILE": "root.key",
        },
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

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
        scopes = {
            scope: count
            for scope, count in conn.execute(
                sa.text(
                    "SELECT scope, count(*) FROM data_keys "
                    "WHERE wrapped_key IS NOT NULL GROUP BY scope"
                )
            )
        }
    assert states == {1: "destroyed", 2: "retired", 3: "retired", 4: "active"}
    assert "acme" not in scopes and {"globex", "initech", "umbrella"} <= set(scopes)
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
