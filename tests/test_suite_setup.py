"""The test command on a machine that lacks something: `scripts/test` prints
the Debian packages to install and stops before doing anything when it may not
install them, and a database server the suite cannot start stops the run with
one message, its cause and the fix, not an error for every test needing it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    # server: (its folder variable, the program missing, the tests selected)
    "MariaDB": ("ENVELOPE_TEST_MARIADB_BINDIR", "mariadbd", "mariadb"),
    "PostgreSQL": ("ENVELOPE_TEST_POSTGRES_BINDIR", "initdb", "postgresql"),
}


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_server_that_cannot_start_is_one_message(
    server: str, workers: str, tmp_path: Path
) -> None:
    """Two modules' tests on that server, in one process and in two xdist
    workers, with its programs not found: the run stops at the first with the
    cause and the fix, once."""
    variable, program, selected = SERVERS[server]
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVELOPE_TEST_", "PYTEST_"))}
    env[variable] = str(empty)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-n",
            workers,
            "-k",
            selected,
            "tests/test_types.py",
            "tests/test_registry.py",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode not in (0, 5), out
    cause = (
        f"{server} for the tests could not be started: `{program}` is not installed "
        f"(not found in {empty})\nTo fix: run `scripts/test`"
    )
    assert cause in out
    # The first test's error, then the run stops; under xdist only the reason
    # it stopped, whichever worker failed first.
    outcome = "1 error" if workers == "0" else "no tests ran"
    summary = out.strip().splitlines()[-1].strip("= ")
    assert re.fullmatch(rf"(\d+ deselected, )?{outcome} in [\d.]+s", summary), out
    assert out.count(f"Interrupted: {cause}") == 1, out
    assert "LookupError" not in out
    assert "Traceback" not in out


@pytest.fixture
def project_copy() -> Iterator[Path]:
    """The scripts alone in a folder an unprivileged user owns: whatever
    scripts/test would do there, it could do."""
    folder = Path(tempfile.mkdtemp(prefix="envelope-scripts-"))
    shutil.copytree(ROOT / "scripts", folder / "scripts")
    folder.chmod(0o755)
    if os.geteuid() == 0:
        for path in [folder, *folder.rglob("*")]:
            shutil.chown(path, "nobody")
    yield folder
    shutil.rmtree(folder)


def test_unprivileged_it_prints_the_install_command_and_stops(project_copy: Path) -> None:
    """Missing Debian packages (names no machine has, besides bash, which every
    Debian machine has), run by a user who cannot install them: the exact
    command, on stderr, and nothing else done (no virtualenv, no pytest)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "ENVELOPE_TEST_DEBIAN_PACKAGES": "bash envelope-test-absent-one envelope-test-absent-two",
    }
    command = [str(project_copy / "scripts" / "test"), "-q"]
    if os.geteuid() == 0:
        runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin")
        assert runuser is not None
        command = [runuser, "-u", "nobody", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert (
        "    sudo apt-get update && sudo apt-get install -y "
        "envelope-test-absent-one envelope-test-absent-two"
    ) in lines, result.stderr
    assert " bash" not in result.stderr
    assert sorted(p.name for p in project_copy.iterdir()) == ["scripts"]
