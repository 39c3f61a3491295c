"""Database fixtures: a SQLite file and real PostgreSQL and MariaDB servers.

The servers are started here, once per test session and worker, from Debian's
``postgresql`` and ``mariadb-server`` packages (as the ``postgres`` and
``mysql`` users when running as root), unless ``ENVELOPE_TEST_POSTGRES_URL``
or ``ENVELOPE_TEST_MARIADB_URL`` names one to use instead;
``ENVELOPE_TEST_POSTGRES_BINDIR`` and ``ENVELOPE_TEST_MARIADB_BINDIR`` name
the folder of their programs when they are installed elsewhere. Each test gets
its own schema or database on them, dropped afterwards. No test skips for want
of a server: a server that cannot start ends the whole run with one message
that says why and what to do, not an error for every test that needs it.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import KeyRegistry, StaticRootKey

DATABASES = ["sqlite", "postgresql"]


class ServerStartError(Exception):
    """Why a test server cannot start, in words for the one message that ends the run."""


class ServerMissingError(ServerStartError):
    """The server's package is not installed (a program or its user is missing)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user(name: str) -> str | None:
    """The user a server runs as: ``name`` when running as root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ServerMissingError(
            f"running as root, the server must run as the `{name}` user, and there is none "
            "(the Debian package creates it)"
        ) from None
    return name


def _program(name: str, variable: str, default_path: str) -> str:
    """The path of a server program, from the folder ``variable`` names, else ``default_path``."""
    path = os.environ.get(variable) or default_path
    found = shutil.which(name, path=path)
    if found is None:
        raise ServerMissingError(f"`{name}` is not installed (not found in {path})")
    return found


def _tail(path: Path, lines: int = 5) -> str:
    """The last lines of a server's log, to quote in the message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _pg_bin() -> str:
    """The newest of Debian's PostgreSQL versions: its programs' folder."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    return candidates[-1] if candidates else "/usr/lib/postgresql/<version>/bin"


class _PostgresServer:
    NAME = "PostgreSQL"
    PACKAGE = "postgresql"
    URL_VARIABLE = "ENVELOPE_TEST_POSTGRES_URL"
    BINDIR = "ENVELOPE_TEST_POSTGRES_BINDIR to the folder of initdb and pg_ctl"

    def __init__(self) -> None:
        self.initdb = _program("initdb", "ENVELOPE_TEST_POSTGRES_BINDIR", _pg_bin())
        self.pg_ctl = _program("pg_ctl", "ENVELOPE_TEST_POSTGRES_BINDIR", _pg_bin())
        self.user = _server_user("postgres")
        self.root = Path(tempfile.mkdtemp(prefix="envelope-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        os.chmod(self.root, 0o755)
        if self.user:
            shutil.chown(self.root, self.user, self.user)

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, cwd=self.root)

    def start(self) -> str:
        self._run(
            self.initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        try:
            self._run(
                self.pg_ctl,
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "log"),
                "-w",
                "start",
            )
        except subprocess.CalledProcessError:
            raise ServerStartError(
                f"the server did not start; its log ends:\n{_tail(self.root / 'log')}"
            ) from None
        admin = sa.create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres",
            isolation_level="AUTOCOMMIT",
        )
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE envelope_test"))
        admin.dispose()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/envelope_test"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class _MariaDBServer:
    """Debian's mariadb-server, started on loopback in a folder of its own
    (as the ``mysql`` user when running as root), without grant tables."""

    NAME = "MariaDB"
    PACKAGE = "mariadb-server"
    URL_VARIABLE = "ENVELOPE_TEST_MARIADB_URL"
    BINDIR = "ENVELOPE_TEST_MARIADB_BINDIR to the folder of mariadbd and mariadb-install-db"

    def __init__(self) -> None:
        self.server = _program(
            "mariadbd", "ENVELOPE_TEST_MARIADB_BINDIR", "/usr/sbin:/usr/bin:/usr/local/sbin"
        )
        self.install = _program(
            "mariadb-install-db", "ENVELOPE_TEST_MARIADB_BINDIR", "/usr/bin:/usr/sbin"
        )
        self.user = _server_user("mysql")
        self.root = Path(tempfile.mkdtemp(prefix="envelope-mariadb-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        os.chmod(self.root, 0o755)
        if self.user:
            shutil.chown(self.root, self.user, self.user)

    def start(self) -> str:
        user = [f"--user={self.user}"] if self.user else []
        subprocess.run(
            [
                self.install,
                "--no-defaults",
                f"--datadir={self.data}",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
                *user,
            ],
            check=True,
            capture_output=True,
            cwd=self.root,
        )
        self.proc = subprocess.Popen(
            [
                self.server,
                "--no-defaults",
                f"--datadir={self.data}",
                f"--socket={self.root / 'sock'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-doublewrite=0",
                "--innodb-buffer-pool-size=256M",
                "--max-connections=300",
                "--character-set-server=utf8mb4",  # its default collation is case-insensitive
                # The tests number rows from 0, which AUTO_INCREMENT would take as "next".
                "--sql-mode=STRICT_TRANS_TABLES,NO_ENGINE_SUBSTITUTION,NO_AUTO_VALUE_ON_ZERO",
                f"--log-error={self.root / 'log'}",
                *user,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql?charset=utf8mb4"
        admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
        deadline = time.monotonic() + 60
        while True:
            try:
                with admin.connect() as conn:
                    conn.exec_driver_sql("CREATE DATABASE envelope_test")
                break
            except sa.exc.OperationalError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise ServerStartError(
                        "the server did not start (or took 60 s); its log ends:\n"
                        + _tail(self.root / "log")
                    ) from None
                time.sleep(0.2)
        return url.replace("/mysql?", "/envelope_test?")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


def _cause(exc: Exception) -> str:
    """What went wrong, in a line or a few: a failed program's own words."""
    if isinstance(exc, ServerStartError):
        return str(exc)
    if isinstance(exc, subprocess.CalledProcessError):
        command = [str(part) for part in exc.cmd]
        if command[0] == "runuser":
            command = command[command.index("--") + 1 :]
        program = Path(command[0]).name
        said = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        return f"`{program}` failed (exit {exc.returncode}): " + "\n".join(said[-5:])
    return f"{type(exc).__name__}: {exc}"


def _fix(exc: Exception, server_class: Any) -> str:
    """What to do about it: install the package, or read the server's own words."""
    elsewhere = f"set {server_class.URL_VARIABLE} to a server to use"
    if isinstance(exc, ServerMissingError):
        return (
            f"run `scripts/test`, which installs Debian's {server_class.PACKAGE} package "
            f"(or prints the command to), or {elsewhere}, or {server_class.BINDIR}"
        )
    return f"see why above, or {elsewhere}"


def _server_url(request: pytest.FixtureRequest, server_class: Any) -> Iterator[str]:
    """The URL of the server named by its variable, else of one started here.

    A server that cannot start stops the run with one message, its cause and
    the fix: the tests that need it cannot pass, and an error for each of them
    would bury the reason."""
    url = os.environ.get(server_class.URL_VARIABLE)
    if url:
        yield url
        return
    server = None
    message = None
    try:
        server = server_class()
        url = server.start()
    except Exception as exc:
        message = (
            f"{server_class.NAME} for the tests could not be started: {_cause(exc)}\n"
            f"To fix: {_fix(exc, server_class)}."
        )
        if server is not None:
            server.stop()
    if message is not None:
        request.session.shouldstop = message
        if hasattr(request.config, "workerinput"):
            # An xdist worker: its stop reason is reported once for the whole
            # run, whichever worker fails first (a failed test would count once
            # per worker).
            pytest.exit(message, returncode=pytest.ExitCode.TESTS_FAILED)
        pytest.fail(message, pytrace=False)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mariadb_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _server_url(request, _MariaDBServer)


@contextmanager
def _mariadb_database(base: str) -> Iterator[str]:
    """A URL of a new database of its own on the MariaDB server."""
    name = f"t_{secrets.token_hex(6)}"
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name}")
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _server_url(request, _PostgresServer)


@contextmanager
def _postgres_schema(base: str) -> Iterator[str]:
    """A URL whose connections work in a new schema of their own."""
    schema = f"t_{secrets.token_hex(6)}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# Test modules whose db_url tests also run on MariaDB: the core, the key
# lifecycle, re-encryption, blind indexes, SQLAlchemy's statement forms and the
# codecs' storage sizes.
MARIADB_MODULES = frozenset(
    {
        "test_types",
        "test_registry",
        "test_registry_close",
        "test_storage",
        "test_lifecycle",
        "test_destroy_guard",
        "test_policy",
        "test_migrate",
        "test_migrate_reports",
        "test_utils_migration",
        "test_utils_migration_paddings",
        "test_reencrypt_online",
        "test_census",
        "test_blind_index",
        "test_blind_index_writes",
        "test_storm",
        "test_faults",
        "test_secrets",
        "test_redaction",
        "test_async_registry",
        "test_sqlalchemy_forms",
        "test_expressions",
        "test_alembic",
        "test_tenant_isolation",
        "test_codec",
        "test_shredding",
        "test_column_definitions",
        "test_batch",
        "test_index_scopes",
        "test_job_targets",
        "test_batch_conflicts",
        "test_rewrap",
        "test_rewrap_races",
        "test_key_rows",
        "test_contexts",
        "test_cli",
        "test_cli_help",
        "test_cli_errors",
        "test_cli_scopes",
        "test_metrics",
        "test_key_events",
        "test_key_event_reports",
    }
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_url" in metafunc.fixturenames:
        databases = list(DATABASES)
        if metafunc.module.__name__ in MARIADB_MODULES:
            databases.append("mariadb")
        metafunc.parametrize("db_url", databases, indirect=True)


@contextmanager
def fresh_database(request: pytest.FixtureRequest, kind: str, folder: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file in ``folder``, a PostgreSQL
    schema, or a MariaDB database."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'test.db'}"
    elif kind == "mariadb":
        with _mariadb_database(request.getfixturevalue("mariadb_url")) as url:
            yield url
    else:
        with _postgres_schema(request.getfixturevalue("postgres_url")) as url:
            yield url


@pytest.fixture
def non_strict_mariadb_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh MariaDB database, by a URL whose connections run with an empty
    ``sql_mode``, as on a legacy server: there a value the column cannot hold
    is cut or garbled with only a warning."""
    with fresh_database(request, "mariadb", tmp_path) as url:
        yield (
            sa.make_url(url)
            .update_query_dict({"init_command": "SET SESSION sql_mode=''"})
            .render_as_string(hide_password=False)
        )


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request, request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database on each real server, for tests of many processes."""
    with fresh_database(request, request.param, tmp_path) as url:
        yield url


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema, for tests that need a server."""
    with _postgres_schema(postgres_url) as url:
        yield url


def async_engine_for(url: str, **options: Any) -> Any:
    """An AsyncEngine on the same database as the sync ``url``: aiosqlite for
    SQLite, asyncmy for MariaDB, asyncpg for PostgreSQL (which takes the
    schema as a server setting rather than psycopg's ``options``). Dispose of
    it inside its event loop."""
    from sqlalchemy.ext.asyncio import create_async_engine

    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return create_async_engine(parsed.set(drivername="sqlite+aiosqlite"), **options)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        return create_async_engine(parsed.set(drivername="mysql+asyncmy"), **options)
    connect_args: dict[str, Any] = {}
    search_path = str(parsed.query.get("options", "")).removeprefix("-csearch_path=")
    if search_path:
        connect_args["server_settings"] = {"search_path": search_path}
    async_url = parsed.set(drivername="postgresql+asyncpg").difference_update_query(["options"])
    return create_async_engine(async_url, connect_args=connect_args, **options)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


class KMSServer:
    """moto's KMS in server mode on loopback: a real HTTP endpoint that boto3
    talks to, in a process of its own so that a test can stop it mid-run."""

    ENV: ClassVar[dict[str, str]] = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }

    def __init__(self) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.env = {**self.ENV, "AWS_ENDPOINT_URL_KMS": self.url}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port = self.url.rpartition(":")[2]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError("moto's KMS server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)

    def client(self) -> Any:
        import boto3

        return boto3.client("kms", region_name="us-east-1", endpoint_url=self.url)

    def create_key(self, policy: str | None = None) -> str:
        """A new symmetric KMS key; its ARN."""
        extra = {} if policy is None else {"Policy": policy}
        return str(self.client().create_key(**extra)["KeyMetadata"]["Arn"])


@pytest.fixture
def kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[KMSServer]:
    """A fresh KMS, with this process's AWS settings pointing at it."""
    server = KMSServer()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    server.start()
    yield server
    server.stop()


class Clocks:
    """A monotonic clock and a wall clock that a test moves by hand, for
    registries built with ``clock=clocks.monotonic, wall_clock=clocks.now``."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = datetime(2030, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.mono

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float | timedelta) -> None:
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        self.mono += delta.total_seconds()
        self.wall += delta


def kill_when(
    command: list[str], env: dict[str, str], progress: Callable[[], int], at: int, **popen: Any
) -> bool:
    """Run ``command`` and SIGKILL it once ``progress()`` reaches ``at``.
    True if it was killed while still running (not after it had finished)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 120
    while proc.poll() is None and progress() < at and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def encrypted_table(name: str, column: str = "body", length: int = 100) -> sa.Table:
    """A table of an integer id and one encrypted string column."""
    from sqlalchemy_envelope import EncryptedType

    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(column, EncryptedType(sa.String(length))),
    )


def stored_bytes(engine: sa.Engine, *tables: str) -> bytes:
    """Every non-NULL value the tables hold, as the database stores it, in
    one byte string: what a dump would show an attacker."""
    parts = []
    with engine.connect() as conn:
        for table in tables:
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                for value in row:
                    if value is not None:
                        raw = isinstance(value, bytes | memoryview)
                        parts.append(bytes(value) if raw else str(value).encode())
    return b"".join(parts)


def column_storage(engine: sa.Engine, table: str, column: str) -> tuple[Any, ...]:
    """A column's type as the database holds it (on MySQL/MariaDB with its
    character set and collation), and whether it takes NULL."""
    with engine.connect() as conn:
        if engine.dialect.name == "mysql":
            query = sa.text(
                "SELECT DATA_TYPE, CHARACTER_MAXIMUM_LENGTH, CHARACTER_SET_NAME, "
                "COLLATION_NAME, IS_NULLABLE FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t AND COLUMN_NAME = :c"
            )
            return tuple(conn.execute(query, {"t": table, "c": column}).one())
        (found,) = [c for c in sa.inspect(conn).get_columns(table) if c["name"] == column]
        return (repr(found["type"]), found["nullable"])


def type_storage(engine: sa.Engine, column_type: Any) -> tuple[Any, ...]:
    """`column_storage` of a nullable column declared as ``column_type``, in a
    scratch table of this database."""
    table = sa.Table(
        "scratch_storage",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", column_type),
    )
    table.create(engine)
    try:
        return column_storage(engine, "scratch_storage", "value")
    finally:
        table.drop(engine)


@pytest.fixture
def other_schema(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[sa.Engine, str]]:
    """An engine on ``db_url`` and the name of a second schema its
    connections can see besides their default one: a PostgreSQL schema, a
    MariaDB database, or a SQLite database attached to every connection.
    Its name starts with the test's indirect parameter, if any, else "app"."""
    name = f"{getattr(request, 'param', 'app')}_{secrets.token_hex(4)}"
    backend = sa.make_url(db_url).get_backend_name()
    engine = sa.create_engine(db_url)
    if backend == "sqlite":
        attached = str(tmp_path / f"{name}.db")

        @sa.event.listens_for(engine, "connect")
        def attach(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.execute(f"ATTACH DATABASE '{attached}' AS {name}")

    else:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE {'SCHEMA' if backend == 'postgresql' else 'DATABASE'} {name}"
            )
    try:
        yield engine, name
    finally:
        engine.dispose()
        if backend != "sqlite":
            admin = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
            with admin.begin() as conn:
                drop = "SCHEMA {} CASCADE" if backend == "postgresql" else "DATABASE {}"
                conn.exec_driver_sql("DROP " + drop.format(name))
            admin.dispose()


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def root_key() -> StaticRootKey:
    return StaticRootKey(os.urandom(32))


@pytest.fixture
def registry(engine: sa.Engine, root_key: StaticRootKey) -> Iterator[KeyRegistry]:
    reg = KeyRegistry(engine, root_key)
    reg.init()
    yield reg
    reg.close()
