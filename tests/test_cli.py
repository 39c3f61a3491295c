"""The sqlalchemy-envelope command, end to end in a subprocess, on SQLite and
PostgreSQL: every command, its exit codes, and no secret in its output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from sqlalchemy_envelope import EncryptedType, KeyRegistry

ROOT = base64.b64encode(os.urandom(32)).decode()
NEW_ROOT = base64.b64encode(os.urandom(32)).decode()
SECRET_VALUE = "very secret note"


class Cli:
    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": url,
            "ENVELOPE_ROOT_KEY": ROOT,
        }
        self.outputs: list[str] = []

    def __call__(self, *args: str, code: int = 0, **env: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "sqlalchemy_envelope", "--cache-max-age", "0.5", *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            input="",
            check=False,
        )
        self.outputs += [result.stdout, result.stderr]
        assert result.returncode == code, (args, result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str, code: int = 0, **env: str) -> dict[str, object]:
        data: dict[str, object] = json.loads(self("--json", *args, code=code, **env))
        return data


def test_cli_end_to_end(db_url: str, tmp_path: Path) -> None:
    cli = Cli(db_url, tmp_path)
    assert cli.json("init")["version"] == 1
    assert cli.json("init")["version"] == 1

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE notes (id INTEGER PRIMARY KEY, body "
                + ("BLOB" if engine.dialect.name == "sqlite" else "BYTEA")
                + ")"
            )
        )
    # Write rows through the library, as an application would.
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.Text)),
    )
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": f"{SECRET_VALUE} {i}"} for i in range(30)])

    assert cli.json("rotate")["version"] == 2
    status = cli.json("status", "--census", "--column", "notes.body")
    assert status["active_version"] == 2
    census = cli.json("census", "notes.body")["columns"]
    assert census[0]["keys"][0]["version"] == 1 and census[0]["rows"] == 30  # type: ignore[index]
    assert "version 1 (retired): 30" in cli("census", "notes.body")

    cli("disable", "2", code=3)
    assert "active key" in cli.outputs[-1]
    cli("destroy", "1", code=3)  # rows still need it
    report = cli.json("reencrypt", "notes.body", "--batch-size", "7")
    assert report["rows_updated"] == 30 and report["values_by_version"] == {"1": 30}
    assert cli.json("disable", "1")["state"] == "disabled"
    assert cli.json("enable", "1")["state"] == "retired"
    time.sleep(0.6)
    assert cli.json("destroy", "1")["state"] == "destroyed"
    assert cli.json("retire", "2")["state"] == "retired"  # rotates
    maintenance = cli.json("maintenance")
    assert maintenance["rotated"] is None

    rewrap = cli.json("rewrap", ENVELOPE_NEW_ROOT_KEY=NEW_ROOT)
    assert rewrap["rewrapped"] == 3  # two data keys and the blind-index key
    cli("status", code=1)  # the old root key is refused now
    assert cli.json("status", ENVELOPE_ROOT_KEY=NEW_ROOT)["active_version"] == 3

    cli("status", code=2, ENVELOPE_ROOT_KEY="not base64")
    cli("reencrypt", code=2)  # no column named: click usage error
    cli("census", "notes.missing", code=2)
    registry.close()
    engine.dispose()
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": NEW_ROOT})
    with engine.connect() as conn:
        values = conn.execute(sa.select(notes.c.body).order_by(notes.c.id)).scalars().all()
    assert values == [f"{SECRET_VALUE} {i}" for i in range(30)]
    registry.close()
    engine.dispose()

    everything = "\n".join(cli.outputs)
    for secret in (ROOT, NEW_ROOT, SECRET_VALUE):
        assert secret not in everything
