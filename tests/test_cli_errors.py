"""Every failure of the command is one line on stderr, with the exit code of
its class (docs/cli.md), no traceback unless --debug, and never a secret:
not the root key, a seed, a URL's password or a value."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey
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
