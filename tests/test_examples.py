"""The README's first command: the quickstart runs as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path / "q.db")],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "what the application reads: Ada Lovelace" in result.stdout
    assert "active version 2" in result.stdout
    assert b"Ada Lovelace" not in (tmp_path / "q.db").read_bytes()
