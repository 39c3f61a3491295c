"""The examples run as the README says: the quickstart, and the FastAPI
service both through a test client and as a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import _free_port

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


def test_fastapi_example(tmp_path: Path) -> None:
    """The FastAPI example, through an HTTP test client, on an aiosqlite file."""
    import importlib.util

    from fastapi.testclient import TestClient

    spec = importlib.util.spec_from_file_location(
        "fastapi_app", ROOT / "examples" / "fastapi_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the models' annotations resolve in it
    spec.loader.exec_module(module)
    database = tmp_path / "api.db"
    app = module.create_app(f"sqlite+aiosqlite:///{database}")
    with TestClient(app) as client:
        ada = {"name": "Ada Lovelace", "email": "Ada@Example.com", "born": "1815-12-10"}
        created = client.post("/patients", json=ada)
        assert created.status_code == 201
        patient_id = created.json()["id"]
        assert client.get(f"/patients/{patient_id}").json() == {**ada, "id": patient_id}
        found = client.get("/patients", params={"email": "  ada@example.COM"}).json()
        assert [p["id"] for p in found] == [patient_id]
        assert client.get("/patients/999").status_code == 404
        assert client.post("/keys/rotate").json() == {"active_version": 2}
        client.post("/patients", json={**ada, "name": "Second"})
        assert client.get("/keys").json()["keys"] == {"active": 1, "retired": 1}
        assert client.get(f"/patients/{patient_id}").json()["name"] == "Ada Lovelace"
    stored = database.read_bytes()
    assert b"Ada Lovelace" not in stored and b"Example.com" not in stored.lower()


@pytest.mark.parametrize("how", ["arguments", "environment"])
def test_fastapi_example_serves_where_it_is_told(tmp_path: Path, how: str) -> None:
    """``python examples/fastapi_app.py --host H --port P`` (or HOST and PORT)
    serves on that address; the arguments win over the variables."""
    host, port = ("127.0.0.2", _free_port()) if how == "arguments" else ("127.0.0.3", _free_port())
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
        "HOST": host,
        "PORT": str(port),
    }
    args = []
    if how == "arguments":
        args = ["--host", host, "--port", str(port)]
        env |= {"HOST": "127.0.0.4", "PORT": str(_free_port())}
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "fastapi_app.py"), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/keys", timeout=5) as response:
                    keys = json.load(response)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "not serving"
                time.sleep(0.1)
        assert keys == {"active_version": 1, "keys": {"active": 1}}
    finally:
        server.terminate()
        server.wait(30)
