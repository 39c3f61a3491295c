"""The sqlalchemy-envelope command, end to end in a subprocess, on SQLite and
PostgreSQL: every command, its exit codes, and no secret in its output."""

from __future__ import annotations

import base64
import json
import os
import socket
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
    def __init__(self, url: str, tmp_path: Path, cache_max_age: str = "0.5") -> None:
        self.url = url
        self.cache_max_age = cache_max_age
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": url,
            "ENVELOPE_ROOT_KEY": ROOT,
        }
        self.outputs: list[str] = []

    def __call__(self, *args: str, code: int = 0, **env: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sqlalchemy_envelope",
                "--cache-max-age",
                self.cache_max_age,
                *args,
            ],
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
                + ("BYTEA" if engine.dialect.name == "postgresql" else "BLOB")
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


def test_a_declined_confirmation_has_an_exit_code_of_its_own(db_url: str, tmp_path: Path) -> None:
    """Answering no to `shred` or `decrypt-in-place` (or not answering) does
    nothing and exits 7, not 1 ("the library refused"); yes goes ahead."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    cli("--scope", "acme", "init")
    engine = sa.create_engine(db_url)
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(40), storage="text")),
    )
    notes.metadata.create_all(engine)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": f"note {i}"} for i in range(3)])
    raw = sa.table("notes", sa.column("id"), sa.column("body"))

    def stored() -> dict[int, str]:
        with engine.connect() as conn:
            return dict(conn.execute(sa.select(raw.c.id, raw.c.body)).all())

    before = stored()

    def answering(answer: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sqlalchemy_envelope", *args],
            env=cli.env,
            input=answer,
            capture_output=True,
            text=True,
            check=False,
        )

    for args in (("shred", "acme"), ("decrypt-in-place", "notes.body", "--json")):
        for answer in ("n\n", "", "no\n"):
            result = answering(answer, *args)
            assert result.returncode == 7, (args, answer, result.stderr)
            assert result.stdout == "" and "declined: nothing was done" in result.stderr
    assert "active version 1" in cli("status", "--scope", "acme")
    assert stored() == before
    assert answering("y\n", "shred", "acme").returncode == 0
    assert answering("y\n", "decrypt-in-place", "notes.body").returncode == 0
    assert stored() == {i: f"note {i}" for i in range(3)}
    registry.close()
    engine.dispose()


def test_global_options_mean_the_same_before_and_after_the_command(
    db_url: str, tmp_path: Path
) -> None:
    """--url, --scope, --table, --cache-max-age, --models, --json and --debug
    work before the command and after it, with one meaning; the same value
    twice is fine, two different ones are a usage error that never echoes
    them (a URL holds a password)."""
    cli = Cli(db_url, tmp_path)  # which puts --cache-max-age 0.5 before the command
    assert json.loads(cli("init", "--json"))["version"] == 1
    acme = json.loads(cli("init", "--scope", "acme", "--json"))
    assert acme["scope"] == "acme" and acme["version"] == 1
    assert json.loads(cli("--scope", "acme", "--json", "rotate"))["version"] == 2
    assert json.loads(cli("--scope", "acme", "rotate", "--scope", "acme", "--json"))["version"] == 3
    status = json.loads(cli("status", "--scope", "acme", "--cache-max-age", "0.5", "--json"))
    assert status["scope"] == "acme" and status["cache_max_age_seconds"] == 0.5
    assert json.loads(cli("--json", "status"))["cache_max_age_seconds"] == 0.5

    cli("--scope", "acme", "status", "--scope", "other", code=2)
    cli("status", "--cache-max-age", "7", code=2)  # 0.5 before it
    password = "s3cret-Pa55word"
    cli("--url", f"sqlite:///{password}.db", "status", "--url", f"sqlite:///x{password}.db", code=2)
    line = cli.outputs[-1]
    assert line.startswith("usage error: Invalid value for '--url': given twice")
    assert password not in line and len(line.splitlines()) == 1

    other = f"sqlite:///{tmp_path / 'other.db'}"
    cli("init", "--url", other, "--table", "other_keys")  # --url wins over DATABASE_URL
    assert (
        json.loads(cli("--table", "other_keys", "rotate", "--json", "--url", other))["version"] == 2
    )
    engine = sa.create_engine(other)
    assert sa.inspect(engine).get_table_names() == ["other_keys", "other_keys_events"]
    engine.dispose()
    assert json.loads(cli("status", "--json"))["active_version"] == 1  # DATABASE_URL's database

    (tmp_path / "models_a.py").write_text("import os\nos.environ['SEEN_A'] = '1'\n")
    (tmp_path / "models_b.py").write_text("import os\nos.environ['SEEN_B'] = '1'\n")
    models = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlalchemy_envelope",
            "--models",
            "models_a",
            "status",
            "--models",
            "models_b",
            "--models",
            "nosuch_models_c",
            "--debug",
        ],
        env=cli.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    # Repeatable: the modules given before and after the command add up (the
    # first two import, the third given after it fails); --debug after the
    # command shows the traceback.
    assert models.returncode == 2 and "nosuch_models_c" in models.stderr.splitlines()[-1]
    assert "Traceback" in models.stderr


def test_an_unreachable_database_is_one_line() -> None:
    """No traceback: one line naming the cause, never the password, and the
    documented exit code."""
    password = "s3cret-Pa55word"
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        urls = {
            f"postgresql+psycopg://app:{password}@127.0.0.1:{port}/app": "Connection refused",
            f"mysql+pymysql://app:{password}@127.0.0.1:{port}/app": "Connection refused",
            f"postgresql+psycopg://app:{password}@no-such-host.invalid/app": "no-such-host.invalid",
        }
        for url, cause in urls.items():
            forms = [
                ("status",),
                ("--json", "--url", url, "init"),
                ("rotate", "--url", url, "--json"),
            ]
            for args in forms:
                result = subprocess.run(
                    [sys.executable, "-m", "sqlalchemy_envelope", *args],
                    env={
                        "PATH": os.environ.get("PATH", ""),
                        "DATABASE_URL": url,
                        "ENVELOPE_ROOT_KEY": ROOT,
                    },
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert result.returncode == 5, (url, result.stderr)
                assert result.stdout == ""
                (line,) = result.stderr.splitlines()
                assert line.startswith("error: cannot connect to the database: ")
                assert cause in line
                assert password not in result.stderr


def test_a_bad_database_url_is_one_line() -> None:
    password = "s3cret-Pa55word"
    for url, cause in {
        f"postgresql+nosuchdriver://app:{password}@db/app": "Can't load plugin",
        f"mysql+mysqldb://app:{password}@db/app": "No module named 'MySQLdb'",
        f"postgresql://app:{password}@db:port/app": "is not a SQLAlchemy URL",
        f"app:{password}@db": "is not a SQLAlchemy URL",
    }.items():
        result = subprocess.run(
            [sys.executable, "-m", "sqlalchemy_envelope", "status"],
            env={
                "PATH": os.environ.get("PATH", ""),
                "DATABASE_URL": url,
                "ENVELOPE_ROOT_KEY": ROOT,
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2, (url, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith("configuration error: ") and cause in line
        assert password not in result.stderr


def test_cli_census_maintenance_and_destroy_count_every_table(db_url: str, tmp_path: Path) -> None:
    cli = Cli(db_url, tmp_path)
    cli("init")
    engine = sa.create_engine(db_url)
    registry = KeyRegistry.from_env(engine, environ={"ENVELOPE_ROOT_KEY": ROOT})
    # A table no model defines, with values of two tenants and a legacy value
    # whose bytes 1-5 ("hello") read as a key id data_keys does not hold.
    big = sa.Table(
        "big",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.LargeBinary),
    )
    values = [
        registry.envelope.encrypt_bytes(b"one", b"big.v"),
        registry.envelope.encrypt_bytes(b"two", b"big.v"),
        registry.envelope.encrypt_bytes(b"three", b"big.v", scope="acme"),
        b"\x01hello legacy plaintext of forty bytes....",
    ]
    big.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(big.insert(), [{"id": i, "v": v} for i, v in enumerate(values)])
    other = None
    if engine.dialect.name == "postgresql":  # a table outside the search_path
        other = f"app_{os.urandom(4).hex()}"
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {other}")
            conn.exec_driver_sql(f"CREATE TABLE {other}.t_other_schema (v BYTEA)")
            conn.execute(
                sa.text(f"INSERT INTO {other}.t_other_schema VALUES (:v)"), {"v": values[0]}
            )
    try:
        cli("rotate")
        time.sleep(0.6)
        on_default = 3 if other else 2
        for _ in range(2):
            maintenance = cli.json("maintenance")
            assert maintenance["destroyable"] == []
            assert maintenance["still_referenced"] == {"1": on_default}
            status = cli.json("status", "--census")
            assert status["rows_by_version"] == {"1": on_default}
            assert f"rows per version: {{1: {on_default}}}" in cli("status", "--census")
            text = cli("census", "big.v")
            assert "scope 'default', version 1 (retired): 2" in text
            assert "scope 'acme', version 1 (active): 1" in text
            assert "under keys not in data_keys: 1" in text and "None" not in text
            census = cli.json("census", "big.v")["columns"][0]  # type: ignore[index]
            assert census["unknown_key_rows"] == 1 and len(census["keys"]) == 2
            cli("destroy", "1", code=3)
            if other:
                assert f"{other}.t_other_schema.v: 1" in cli.outputs[-1]
        key_id = str(int.from_bytes(b"hello", "big"))
        assert not any(key_id in out or "hello" in out for out in cli.outputs)
    finally:
        if other:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {other} CASCADE")
        registry.close()
        engine.dispose()


def test_bad_usage_is_one_line_and_exit_2(db_url: str, tmp_path: Path) -> None:
    """Async URLs, driver options the driver refuses, a column that cannot
    hold ciphertext, an index or a key version that does not exist, an
    existing migrations folder, a scope with no keys: one line, exit 2."""
    cli = Cli(db_url, tmp_path)
    cli("init")
    cli("--scope", "acme", "init")
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE p (id INTEGER PRIMARY KEY, n INTEGER)"))
        conn.execute(sa.text("INSERT INTO p (id, n) VALUES (1, 42)"))
    engine.dispose()
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "env.py").write_text("# mine\n")
    password = "s3cret-Pa55word"
    url = sa.make_url(db_url)
    async_url = url.set(
        drivername="sqlite+aiosqlite" if url.drivername == "sqlite" else "postgresql+asyncpg"
    )
    runs = [
        ("status", "--url", async_url.render_as_string(hide_password=False)),
        ("status", "--url", f"mysql+pymysql://app:{password}@127.0.0.1:1/app?charset=bogus"),
        ("status", "--url", f"mysql+pymysql://app:{password}@127.0.0.1:1/app?nosuch=1"),
        ("reencrypt", "p.n"),
        ("census", "p.n"),
        ("backfill-index", "nosuch_module:X.y"),
        ("backfill-index", "json:X.y"),
        ("alembic-init", str(tmp_path / "migrations")),
        ("shred", "nosuch", "--yes"),
        ("retire", "99"),
        ("disable", "99"),
        ("destroy", "99"),
    ]
    lines = []
    for args in runs:
        for _ in range(2):
            cli(*args, code=2)
            (line,) = cli.outputs[-1].splitlines()
            assert line.startswith("configuration error: "), (args, line)
            assert password not in line
        lines.append(line)
    assert "async driver" in lines[0] and "nosuch" in lines[8] and "p.n" in lines[3]
    assert (tmp_path / "migrations" / "env.py").read_text() == "# mine\n"

    shredded = cli.json("shred", "acme", "--yes")
    assert shredded == {"scope": "acme", "destroyed": 2}  # its data key and its index key
    assert "Warning" not in cli.outputs[-1]  # no click warning about the argument's name
    result = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_envelope", "decrypt-in-place", "p.id", "--json"],
        env=cli.env,
        input="n\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout == "" and "plaintext?" in result.stderr and result.returncode == 7
