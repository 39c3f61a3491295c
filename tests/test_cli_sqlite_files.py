"""A SQLite URL naming a file that does not exist (a typo, most often) is
refused, naming the file, by every command but init, which creates the
database: no command leaves an empty database file behind."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from sqlalchemy_envelope.cli import main

ROOT = base64.b64encode(os.urandom(32)).decode()

COMMANDS = [
    ["status"],
    ["status", "--census"],
    ["census", "notes.body"],
    ["rotate"],
    ["maintenance"],
    ["retire", "1"],
    ["disable", "1"],
    ["enable", "1"],
    ["destroy", "1"],
    ["reencrypt", "notes.body"],
    ["decrypt-in-place", "notes.body", "--yes"],
    ["rewrap"],
    ["shred", "acme", "--yes"],
    ["create-scope", "acme"],
]


def run(*args: str) -> tuple[int, str, str]:
    env = {
        "DATABASE_URL": None,
        "ENVELOPE_ROOT_KEY": ROOT,
        "ENVELOPE_NEW_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    result = CliRunner().invoke(main, list(args), env=env, prog_name="sqlalchemy-envelope")
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    "given",
    ["sqlite:///{tmp}/typo.db", "sqlite:///typo.db", "sqlite:///file:typo.db?uri=true"],
)
def test_no_command_but_init_creates_a_sqlite_file(tmp_path: Path, given: str) -> None:
    url = given.format(tmp=tmp_path)
    line = (
        f"configuration error: no SQLite database at {tmp_path / 'typo.db'} (check --url or "
        "DATABASE_URL; only `sqlalchemy-envelope init` creates one)"
    )
    for command in COMMANDS:
        status, out, err = run(*command, "--url", url)
        assert (status, out, err.splitlines()) == (2, "", [line]), (command, err)
        assert list(tmp_path.iterdir()) == [], command
    status, out, err = run("init", "--url", url)
    assert status == 0 and out.startswith("active: version    1"), err
    assert (tmp_path / "typo.db").is_file()
    for command in (["status"], ["create-scope", "acme"], ["rotate"]):
        status, _, err = run(*command, "--url", url)
        assert status == 0, (command, err)


def test_a_read_only_uri_is_left_to_sqlite(tmp_path: Path) -> None:
    """mode=ro never creates the file: SQLite itself says it cannot open it."""
    status, _, err = run("status", "--url", "sqlite:///file:typo.db?mode=ro&uri=true")
    assert status == 5 and "unable to open database file" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_in_memory_database_is_no_file(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///:memory:"):
        status, _, err = run("status", "--url", url)
        assert status == 2 and "table 'data_keys' does not exist" in err, err
    assert list(tmp_path.iterdir()) == []


def test_init_in_a_missing_folder_cannot_connect(tmp_path: Path) -> None:
    """init creates the file, not its folder: the database is unreachable (exit 5)."""
    status, _, err = run("init", "--url", f"sqlite:///{tmp_path / 'missing' / 'app.db'}")
    (line,) = err.splitlines()
    assert status == 5 and line.startswith("error: cannot connect to the database: ")
    assert "unable to open database file" in line
    assert list(tmp_path.iterdir()) == []
