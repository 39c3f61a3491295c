"""Ctrl-C while the command starts (Python loading SQLAlchemy and the
package, most of a second) ends as Ctrl-C during the command does: one
`interrupted:` line, exit 130, no traceback.

The SIGINT comes at a set point of the start, not after a delay: a
``sitecustomize`` module (which Python imports before the program) sends it
to the process when the import of SQLAlchemy begins."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

SITECUSTOMIZE = """
import os, signal, sys

class InterruptOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptOnImport())
"""


@pytest.mark.parametrize("module", ["sqlalchemy", "cryptography", "click"])
@pytest.mark.parametrize(
    "command",
    [[str(BIN / "sqlalchemy-envelope")], [sys.executable, "-m", "sqlalchemy_envelope"]],
    ids=["script", "python -m"],
)
def test_ctrl_c_while_the_command_starts(tmp_path: Path, module: str, command: list[str]) -> None:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(module=module))
    result = subprocess.run(
        [*command, "status"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(tmp_path),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
            "ENVELOPE_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines() == [
        "interrupted: nothing was done (the command was starting)"
    ], result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "app.db").exists()
