"""Database fixtures: a SQLite file and a real PostgreSQL server.

The PostgreSQL server is started here, once per test session, from Debian's
``postgresql`` package (as the ``postgres`` user when running as root), unless
``ENVELOPE_TEST_POSTGRES_URL`` names one to use instead. Each test gets its own
schema on it, dropped afterwards. No test skips for want of a server: if none
can be started, the PostgreSQL tests fail.
"""

from __future__ import annotations

import glob
import os
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not candidates:
        raise RuntimeError(
            "PostgreSQL is not installed: `apt-get install postgresql` (or set "
            "ENVELOPE_TEST_POSTGRES_URL to a server to use)"
        )
    return Path(candidates[-1])


class _PostgresServer:
    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="envelope-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        os.chmod(self.root, 0o755)
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, cwd=self.root)

    def start(self) -> str:
        self._run(
            str(self.bin / "initdb"),
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
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
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
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("ENVELOPE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    server = _PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


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


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    with _postgres_schema(request.getfixturevalue("postgres_url")) as url:
        yield url


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema, for tests that need a server."""
    with _postgres_schema(postgres_url) as url:
        yield url


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
