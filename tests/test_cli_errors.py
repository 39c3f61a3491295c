"""Every failure of the command is one line on stderr, with the exit code of
its class (docs/cli.md), no traceback unless --debug, and never a secret:
not the root key, a seed, a URL's password or a value."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import KMSServer, encrypted_table

from sqlalchemy_envelope import AWSKMSRootKey, EncryptedType, KeyRegistry, StaticRootKey
from sqlalchemy_envelope.cli import EXIT_CODES, main

ROOT = base64.b64encode(os.urandom(32)).decode()
SEED = f"seed-{os.urandom(6).hex()}-words"
PASSWORD = f"Pw-{os.urandom(6).hex()}"
VALUE = f"plaintext-{os.urandom(6).hex()}"
SECRETS = (ROOT, SEED, PASSWORD, VALUE)

MODULES = {
    "interrupting": "raise KeyboardInterrupt\n",
    # A bug: an error the command does not expect, whose text holds a secret.
    "buggy": (
        "from sqlalchemy_envelope import KeyRegistry\n"
        "def status(self, *args, **kwargs):\n"
        f"    raise RuntimeError({VALUE!r})\n"
        "KeyRegistry.status = status\n"
    ),
}


def run(*args: str, env: dict[str, str | None], input: str = "") -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main, list(args), env=env, input=input, prog_name="sqlalchemy-envelope"
    )
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def app(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """A database with keys and an encrypted table; the environment of the command."""
    monkeypatch.chdir(tmp_path)
    # The buggy module patches KeyRegistry in this process: undone after the test.
    monkeypatch.setattr(KeyRegistry, "status", KeyRegistry.status)
    for name, source in MODULES.items():
        (tmp_path / f"cli_errors_{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, f"cli_errors_{name}", raising=False)
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(engine, StaticRootKey(base64.b64decode(ROOT)))
    registry.init()
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(100))),
    )
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": 1, "body": VALUE}])
    registry.close()
    engine.dispose()
    return {"DATABASE_URL": db_url, "ENVELOPE_ROOT_KEY": ROOT}


def test_every_failure_is_one_line_with_its_exit_code(
    app: dict[str, str | None], tmp_path: Path
) -> None:
    other_key = base64.b64encode(os.urandom(32)).decode()
    seeded: dict[str, str | None] = {"ENVELOPE_ROOT_KEY": None, "ENVELOPE_ROOT_SEED": SEED}
    with_password = f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1:1/app"
    other_password = f"postgresql+psycopg://app:{PASSWORD}x@127.0.0.1:1/app"
    (tmp_path / "fresh.db").touch()  # an empty database (a missing one: test_cli_sqlite_files)
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    cases: list[tuple[tuple[str, ...], dict[str, str | None], int, str]] = [
        (("--bogus", "status"), {}, 2, "usage error: No such option '--bogus'"),
        (("status", "--bogus"), {}, 2, "see 'sqlalchemy-envelope status --help'"),
        (("nosuch",), {}, 2, "No such command 'nosuch'"),
        (("census",), {}, 2, "Missing argument 'COLUMNS...'"),
        (("--cache-max-age", "soon", "status"), {}, 2, "'soon' is not a valid float"),
        (("--scope", "a", "status", "--scope", "b"), {}, 2, "'--scope': given twice"),
        (
            ("--url", with_password, "status", "--url", other_password),
            {},
            2,
            "'--url': given twice",
        ),
        (("status",), {"DATABASE_URL": None}, 2, "no database: pass --url or set DATABASE_URL"),
        (("status", "--url", fresh), {}, 2, "table 'data_keys' does not exist"),
        (("census", "nosuch.body"), {}, 2, "nosuch"),
        (("census", "notes.nosuch"), {}, 2, "nosuch"),
        (("retire", "9"), {}, 2, "no key version 9"),
        (("status",), seeded, 2, "configuration error: "),
        (("status",), {"ENVELOPE_ROOT_KEY": other_key}, 1, "error: "),
        (
            ("status",),
            {**seeded, "ENVELOPE_ROOT_SALT": "c2FsdHNhbHRzYWx0c2FsdA=="},
            2,
            "configuration",
        ),
        (("disable", "1"), {}, 3, "refused: "),
        (("shred", "default"), {}, 7, "declined: nothing was done"),
        (("decrypt-in-place", "notes.body"), {}, 7, "declined: nothing was done"),
        (("--models", "cli_errors_interrupting", "status"), {}, 130, "interrupted: "),
        (("status", "--models", "cli_errors_buggy"), {}, 70, "failed unexpectedly (RuntimeError)"),
    ]
    assert {code for *_, code, _ in cases} | {0, 4, 5, 6, 8} == set(EXIT_CODES)
    for args, env, code, expected in cases:
        for debug in ((), ("--debug",)):
            status, out, err = run(*args, *debug, env={**app, **env})
            assert status == code, (args, env, out, err)
            assert expected in err.splitlines()[-1], (args, err)
            assert "declined" in err or out == ""  # a confirmation asks on stderr
            if debug and code in (1, 2, 3, 70, 130) and not args[-1].startswith("--"):
                # The traceback, for the errors raised while running the command.
                assert "Traceback" in err or "usage error" in err, (args, err)
            if not debug:
                assert "Traceback" not in err
                assert len(err.splitlines()) == 1 or "declined" in err, (args, err)
            if code != 70 or not debug:  # --debug shows the bug's own text, on purpose
                for secret in SECRETS:
                    assert secret not in out + err, (args, secret)
        assert PASSWORD not in err and SEED not in err


def test_a_bug_shows_its_traceback_only_with_debug(app: dict[str, str | None]) -> None:
    status, _, err = run("--models", "cli_errors_buggy", "status", env=app)
    assert status == 70 and "Traceback" not in err and VALUE not in err
    assert "run it again with --debug" in err
    status, _, err = run("--models", "cli_errors_buggy", "status", "--debug", env=app)
    assert status == 70 and "Traceback" in err and f"RuntimeError: {VALUE}" in err
    assert err.splitlines()[-1].startswith("error: status failed unexpectedly")


def test_an_interrupted_command_did_nothing_more(app: dict[str, str | None]) -> None:
    """Ctrl-C (here while the models are imported, before any work) exits 130
    with one line; without it the same command goes on and works."""
    status, out, err = run("rotate", "--models", "cli_errors_interrupting", env=app)
    assert (status, out) == (130, "") and err.startswith("interrupted: ")
    assert "Aborted" not in err and len(err.splitlines()) == 1
    status, out, _ = run("--json", "rotate", env=app)
    assert status == 0 and '"version": 2' in out


# -- as a user runs it: the installed command, in a process of its own --------------------

PROG = str(Path(sys.executable).parent / "sqlalchemy-envelope")


def command(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``sqlalchemy-envelope ARGS`` started in the background."""
    return subprocess.Popen(
        [PROG, *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def assert_one_line(code: int, out: str, err: str, expected_code: int, expected: str) -> None:
    """The outcome of every failure: its exit code, one line on stderr saying
    what to do, nothing on stdout, no traceback and no secret."""
    assert code == expected_code, (out, err)
    assert len(err.splitlines()) == 1 and expected in err, err
    assert out == "" and "Traceback" not in err
    for secret in SECRETS:
        assert secret not in err, secret


def _waiting_on(watcher: sa.Connection, holder: int) -> list[int]:
    """The server's ids of the sessions waiting for a lock the session
    ``holder`` holds (on MariaDB, of every session now waiting for a lock:
    the server is this test's alone, and information_schema.innodb_trx may
    leave a waiting transaction out, where InnoDB's list of transactions
    never does; its section on the last deadlock names older sessions)."""
    if watcher.dialect.name == "postgresql":
        query = "SELECT pid FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))"
        return list(watcher.execute(sa.text(query), {"holder": holder}).scalars())
    status = watcher.exec_driver_sql("SHOW ENGINE INNODB STATUS").one()[2]
    now = status.partition("LIST OF TRANSACTIONS FOR EACH SESSION:")[2].partition("\n--------\n")
    return [
        int(found.group(1))
        for transaction in now[0].split("---TRANSACTION ")
        if "LOCK WAIT" in transaction
        and (found := re.search(r"MariaDB thread id (\d+)", transaction)) is not None
        and int(found.group(1)) != holder
    ]


def _session_id(conn: sa.Connection) -> int:
    function = "pg_backend_pid()" if conn.dialect.name == "postgresql" else "CONNECTION_ID()"
    return int(conn.execute(sa.text(f"SELECT {function}")).scalar_one())


def _terminate(watcher: sa.Connection, session: int) -> None:
    """End another session's connection, as an administrator does."""
    if watcher.dialect.name == "postgresql":
        watcher.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
    else:
        watcher.exec_driver_sql(f"KILL CONNECTION {session}")


ROW_1, ROW_3 = (f"SELECT id FROM notes WHERE id = {i} FOR UPDATE" for i in (1, 3))


@pytest.mark.parametrize(
    ("args", "lock"),
    [
        # The keys table, as every key insert locks it.
        (
            ("rotate",),
            {
                "postgresql": "LOCK TABLE data_keys IN EXCLUSIVE MODE",
                "mysql": "SELECT id FROM data_keys FOR UPDATE",
            },
        ),
        # A row the job is to write: in its second batch, in one of its workers' first.
        (("reencrypt", "notes.body", "--batch-size", "2"), {"postgresql": ROW_3, "mysql": ROW_3}),
        (("reencrypt", "notes.body", "--workers", "2"), {"postgresql": ROW_1, "mysql": ROW_1}),
    ],
)
def test_a_connection_lost_mid_command_exits_5(
    server_url: str, args: tuple[str, ...], lock: dict[str, str]
) -> None:
    """The command's connection is ended by the server's administrator
    (pg_terminate_backend, KILL) while the command waits for a lock held
    here: one line, exit 5, and the command works once run again."""
    engine = sa.create_engine(server_url, poolclass=sa.pool.NullPool)
    registry = KeyRegistry(engine, StaticRootKey(base64.b64decode(ROOT)))
    registry.init()
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(100))),
    )
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": VALUE} for i in range(1, 5)])
    registry.rotate()  # the rows are under version 1: reencrypt has work to do
    registry.close()
    env = {"DATABASE_URL": server_url, "ENVELOPE_ROOT_KEY": ROOT}
    with engine.connect() as holder, engine.connect() as watcher:
        watcher.execution_options(isolation_level="AUTOCOMMIT")
        with holder.begin():
            holder.execute(sa.text(lock[engine.dialect.name])).close()
            proc = command(*args, env=env)
            waiting: list[int] = []
            holding = _session_id(holder)
            while not waiting and proc.poll() is None:
                waiting = _waiting_on(watcher, holding)
            assert waiting, finished(proc)
            _terminate(watcher, waiting[0])
        # The lock goes with this transaction: nothing else of the command
        # (another worker, the parent) waits on it while it reports.
        code, out, err = finished(proc)
    assert_one_line(code, out, err, 5, "lost the connection to the database")
    assert "run the command again" in err
    code, out, err = finished(command(*args, env=env))
    assert code == 0, err
    if args[0] == "reencrypt":  # from where it stopped: the batches committed stay
        assert "rows scanned 2," in out, out
    engine.dispose()


def _closed_port() -> tuple[socket.socket, str]:
    """A loopback address that refuses connections (bound, never listening)
    for as long as its socket is held."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


AWS_SECRET = f"aws-secret-{os.urandom(6).hex()}"
UNAVAILABLE = "error: the root key is unavailable: KMS "


def test_a_kms_root_key_behind_a_closed_port_exits_8(tmp_path: Path) -> None:
    """The root key in AWS KMS, whose endpoint refuses connections: every
    command that needs it says so in one line and exits 8 (retry later)."""
    sock, endpoint = _closed_port()
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    env = {
        **KMSServer.ENV,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_ENDPOINT_URL_KMS": endpoint,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
    }
    with sock:
        assert finished(command("init", env={**env, "ENVELOPE_ROOT_KEY": ROOT}))[0] == 0
        cases = [
            # A first key to wrap.
            (
                "init",
                {"ENVELOPE_AWS_KMS_KEY_ID": arn, "DATABASE_URL": f"sqlite:///{tmp_path}/n.db"},
            ),
            # A rewrap whose new root key is unreachable.
            ("rewrap", {"ENVELOPE_ROOT_KEY": ROOT, "ENVELOPE_NEW_AWS_KMS_KEY_ID": arn}),
        ]
        for name, root in cases:
            code, out, err = finished(command(name, env={**env, **root}))
            assert_one_line(code, out, err, 8, UNAVAILABLE)
            assert "could not reach KMS" in err and "retry later" in err
            assert AWS_SECRET not in err


def test_a_kms_stopped_mid_life_exits_8(kms: KMSServer, tmp_path: Path) -> None:
    """Keys wrapped by a KMS that then stops: the commands that need it
    (a new key, a data key to unwrap) exit 8; those that need it not work."""
    arn = kms.create_key()
    env = {
        **kms.env,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
        "ENVELOPE_AWS_KMS_KEY_ID": arn,
    }
    assert finished(command("init", env=env))[0] == 0
    engine = sa.create_engine(env["DATABASE_URL"])
    registry = KeyRegistry(engine, AWSKMSRootKey(arn))
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "body": VALUE} for i in range(1, 5)])
    registry.close()
    engine.dispose()
    assert finished(command("rotate", env=env))[0] == 0  # reencrypt has work to do
    kms.stop()
    for args in (
        ("rotate",),
        ("reencrypt", "notes.body"),
        ("reencrypt", "notes.body", "--workers", "2"),
    ):
        code, out, err = finished(command(*args, env=env))
        assert_one_line(code, out, err, 8, UNAVAILABLE)
        assert AWS_SECRET not in err
    # status reports the outage rather than failing on it.
    code, out, err = finished(command("status", env=env))
    assert code == 0 and "root key UNAVAILABLE" in out, (out, err)


def test_a_root_key_file_that_holds_no_usable_key_exits_2(tmp_path: Path) -> None:
    """ENVELOPE_ROOT_KEY_FILE (and ENVELOPE_NEW_ROOT_KEY_FILE) naming
    something that cannot be a key file: one line naming the file and what
    to do, exit 2, never the file's content. (Cases that hold as root too.)"""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}"}
    assert finished(command("init", env={**env, "ENVELOPE_ROOT_KEY": ROOT}))[0] == 0
    good = tmp_path / "root.key"
    good.write_text(ROOT + "\n")
    good.chmod(0o600)
    (tmp_path / "folder.key").mkdir()
    (tmp_path / "large.key").write_bytes(b"A" * 100_000)
    (tmp_path / "password.key").write_text(SEED + "\n")  # a password is not a key
    (tmp_path / "shared.key").write_text(ROOT + "\n")
    (tmp_path / "shared.key").chmod(0o644)
    (tmp_path / "linked.key").symlink_to(good)
    for name in ("large.key", "password.key"):
        (tmp_path / name).chmod(0o600)
    cases = {
        "missing.key": "No such file or directory: name the file that holds the key",
        "no-folder/root.key": "No such file or directory: name the file that holds the key",
        "folder.key": "is not a regular file: name the file that holds the key",
        "large.key": "is too large to hold a root key: name the file that holds the key",
        "password.key": "is not the base64 of 32 bytes (a password is not a key): generate one",
        "shared.key": "is accessible to other users (mode 0644): run `chmod 600",
        "linked.key": "is a symbolic link, refused whatever it points to: name the file itself",
    }
    code, out, err = finished(command("status", env={**env, "ENVELOPE_ROOT_KEY_FILE": str(good)}))
    assert code == 0 and "active version 1" in out, err
    for name, expected in cases.items():
        path = str(tmp_path / name)
        for args, root in (
            (("status",), {"ENVELOPE_ROOT_KEY_FILE": path}),
            (("rewrap",), {"ENVELOPE_ROOT_KEY": ROOT, "ENVELOPE_NEW_ROOT_KEY_FILE": path}),
        ):
            code, out, err = finished(command(*args, env={**env, **root}))
            assert_one_line(code, out, err, 2, f"root key file {path}")
            assert err.startswith("configuration error: ") and expected in err, err


def test_alembic_init_refuses_paths_it_cannot_write_before_writing(tmp_path: Path) -> None:
    """alembic-init's folder and --config file: a path that cannot be
    written is one line and exit 2, with nothing written (a half-made folder
    would make the next run fail as not empty); never a success that
    skipped the config."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("")
    (tmp_path / "a-folder").mkdir()
    cases = [
        (("a-file",), "a-file is a file: name a new or empty folder"),
        (("full",), "full is not empty: name a new or empty folder"),
        (("a-file/migrations",), "a-file is a file: name a new or empty folder"),
        # A folder even root cannot create.
        (("/sys/envelope-migrations",), "(/sys/envelope-migrations) (check the path and its"),
        (("migrations", "--config", "a-folder"), "--config a-folder is a folder: name the file"),
        (
            ("migrations", "--config", "no-folder/alembic.ini"),
            "the folder no-folder does not exist: create it",
        ),
    ]
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}", "ENVELOPE_ROOT_KEY": ROOT}
    for args, expected in cases:
        proc = subprocess.run(
            [PROG, "alembic-init", *args],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert_one_line(proc.returncode, proc.stdout, proc.stderr, 2, expected)
        assert proc.stderr.startswith("configuration error: ")
        assert not (tmp_path / "migrations").exists() and not (tmp_path / "alembic.ini").exists()
        assert sorted(p.name for p in (tmp_path / "a-folder").iterdir()) == []
    proc = subprocess.run(
        [PROG, "alembic-init", "migrations", "--config", "a-folder/alembic.ini"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a-folder" / "alembic.ini").is_file()
    assert (tmp_path / "migrations" / "versions" / "0001_data_keys.py").is_file()
