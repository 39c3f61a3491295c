"""A scope with no key, named by --scope (a typo, most often), is refused by
every command with exit 2 and one line saying how to create it, and nothing
is written: no command but init and create-scope creates a scope."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

from sqlalchemy_envelope import KeyRegistry, StaticRootKey
from sqlalchemy_envelope.cli import main

ROOT = base64.b64encode(os.urandom(32)).decode()

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_envelope import EncryptedType, blind_index


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "scoped_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(EncryptedType(sa.String(100)))


class User(Base):
    __tablename__ = "scoped_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    email_index: Mapped[str | None] = blind_index("email")
"""

# Every command that works on keys or values, as typed with a mistyped scope.
COMMANDS = [
    ["status"],
    ["status", "--census"],
    ["status", "--column", "scoped_notes.body"],
    ["census", "scoped_notes.body"],
    ["rotate"],
    ["maintenance"],
    ["retire", "1"],
    ["disable", "1"],
    ["enable", "1"],
    ["destroy", "1", "--column", "scoped_notes.body"],
    ["reencrypt", "scoped_notes.body"],
    ["decrypt-in-place", "scoped_notes.body", "--yes"],
    ["backfill-index", "cli_scopes_models:User.email_index"],
    ["rewrap"],
    ["shred", "acme", "--yes"],
]
# The commands that address values, not keys: --scope never names an index scope.
NO_INDEX_SCOPE = ("reencrypt", "decrypt-in-place", "backfill-index", "rewrap", "shred")


def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env, prog_name="sqlalchemy-envelope")
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def app(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Keys of the default scope and of tenant 'acme'; scoped_notes and scoped_users rows."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_scopes_models.py").write_text(MODELS)
    monkeypatch.delitem(sys.modules, "cli_scopes_models", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    import cli_scopes_models as models

    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(base64.b64decode(ROOT)))
    registry.init()
    registry.create_scope("acme")
    models.Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(models.Note(id=i, body=f"note {i}") for i in range(3))
        session.add_all(models.User(id=i, email=f"u{i}@example.com") for i in range(3))
        session.commit()
    registry.close()
    engine.dispose()
    return {
        "DATABASE_URL": db_url,
        "ENVELOPE_ROOT_KEY": ROOT,
        "ENVELOPE_NEW_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }


def stored(db_url: str) -> tuple[list[tuple[object, ...]], ...]:
    """Everything the commands could have written."""
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        found = tuple(
            [tuple(row) for row in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1"))]
            for table in ("data_keys", "scoped_notes", "scoped_users")
        )
    engine.dispose()
    return found


@pytest.mark.parametrize("scope", ["acme-typo", "~index:acme-typo"])
def test_every_command_refuses_a_scope_with_no_key(app: dict[str, str], scope: str) -> None:
    before = stored(app["DATABASE_URL"])
    tenant = scope.removeprefix("~index:")
    line = (
        f"configuration error: scope {scope!r} has no key (check --scope): "
        f"`sqlalchemy-envelope create-scope {tenant}` creates its keys"
    )
    for command in COMMANDS:
        for args in ([*command, "--scope", scope], ["--scope", scope, *command]):
            status, out, err = run(*args, env=app)
            if scope.startswith("~index:") and command[0] in NO_INDEX_SCOPE:
                # Bad usage for them, whatever the scope holds.
                assert status == 2 and "names starting with '~' are reserved" in err, (args, err)
                continue
            assert (status, out, err.splitlines()) == (2, "", [line]), (args, out, err)
    assert stored(app["DATABASE_URL"]) == before


def test_create_scope_makes_the_scope_the_commands_then_use(app: dict[str, str]) -> None:
    status, out, err = run("create-scope", "acme-typo", "--json", env=app)
    assert status == 0, err
    assert '"scope": "acme-typo"' in out
    for command in (["status"], ["rotate"], ["maintenance"], ["census", "scoped_notes.body"]):
        status, out, err = run(*command, "--scope", "acme-typo", env=app)
        assert status == 0, (command, err)
    status, out, _ = run("status", "--scope", "~index:acme-typo", env=app)
    assert status == 0 and "version    1  active" in out
    # Created once: again, it has what it needs and changes nothing.
    before = stored(app["DATABASE_URL"])
    assert run("create-scope", "acme-typo", env=app)[0] == 0
    assert stored(app["DATABASE_URL"]) == before


def test_the_default_scope_with_no_key_points_to_init(db_url: str) -> None:
    """A database whose keys are all tenants': the commands on the default
    scope say to run init; those that work across scopes still work."""
    engine = sa.create_engine(db_url)
    KeyRegistry(engine, StaticRootKey(base64.b64decode(ROOT)), scope="acme").init()
    engine.dispose()
    env = {
        "DATABASE_URL": db_url,
        "ENVELOPE_ROOT_KEY": ROOT,
        "ENVELOPE_NEW_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    for command in (["status"], ["rotate"], ["maintenance"], ["retire", "1"]):
        status, _, err = run(*command, env=env)
        assert (status, err.splitlines()) == (
            2,
            [
                "configuration error: scope 'default' has no key (check --scope): "
                "`sqlalchemy-envelope init` creates its keys"
            ],
        ), (command, err)
    status, out, err = run("status", "--scope", "acme", env=env)
    assert status == 0 and "scope 'acme': active version 1" in out, err
    status, out, err = run("rewrap", env=env)
    assert status == 0 and out.startswith("re-wrapped 2 data keys"), err
