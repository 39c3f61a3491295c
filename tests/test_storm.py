"""Many real OS processes on one database server (PostgreSQL, MariaDB):
concurrent rotate() calls, and rotation policies firing in every process
while they all write."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from sqlalchemy_envelope import KeyRegistry, StaticRootKey

WORKER = Path(__file__).with_name("storm_worker.py")
PROCESSES = 8


def _run_all(
    mode: str, url: str, root: bytes, options: dict[str, object] | None = None
) -> list[str]:
    start_at = time.time() + 3.0
    env = {**os.environ, "ENVELOPE_ROOT_KEY": base64.b64encode(root).decode()}
    args = [json.dumps(options)] if options else []
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, url, str(start_at), str(n), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(out)
    return outputs


def _keys(engine: sa.Engine) -> list[sa.RowMapping]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT * FROM data_keys WHERE scope = 'default' ORDER BY version")
            )
            .mappings()
            .all()
        )


def _setup(url: str, root: bytes) -> sa.Engine:
    engine = sa.create_engine(url)
    registry = KeyRegistry(engine, StaticRootKey(root))
    registry.init()
    sys.path.insert(0, str(WORKER.parent))
    import storm_worker

    storm_worker.table.metadata.create_all(engine)
    registry.close()
    return engine


def test_concurrent_rotate_calls(server_url: str) -> None:
    root = os.urandom(32)
    engine = _setup(server_url, root)
    outputs = _run_all("rotate", server_url, root)
    versions = sorted(v for out in outputs for v in json.loads(out))
    assert versions == list(range(2, 2 + 3 * PROCESSES))  # each call: one new key, none shared
    keys = _keys(engine)
    assert [k["version"] for k in keys] == list(range(1, 2 + 3 * PROCESSES))
    assert [k["state"] for k in keys].count("active") == 1
    assert keys[-1]["state"] == "active"
    engine.dispose()


def test_use_policy_storm_while_writing(server_url: str) -> None:
    root = os.urandom(32)
    engine = _setup(server_url, root)
    limit, block = 200, 3
    _run_all("write", server_url, root, {"max_encryptions": limit, "cache_max_age": 0.2})
    keys = _keys(engine)
    assert [k["state"] for k in keys].count("active") == 1
    assert len(keys) >= 5
    assert all(k["encryptions"] <= limit for k in keys)
    # One rotation per exhausted key: no key was retired with most of its budget left.
    assert all(k["encryptions"] > limit - PROCESSES * block for k in keys[:-1])
    readers = _run_all("read", server_url, root)
    assert all(int(out) == PROCESSES * 150 for out in readers)
    engine.dispose()


def test_age_policy_storm_while_writing(server_url: str) -> None:
    root = os.urandom(32)
    engine = _setup(server_url, root)
    rotate_after = 1.5
    _run_all(
        "write",
        server_url,
        root,
        {"rotate_after": rotate_after, "cache_max_age": 0.1, "seconds": 5.0},
    )
    keys = _keys(engine)
    assert [k["state"] for k in keys].count("active") == 1
    assert len(keys) >= 3
    created = [k["created_at"] for k in keys]
    gaps = [b - a for a, b in itertools.pairwise(created[1:])]
    # Every process saw each key come due at about the same moment; each
    # decision still produced exactly one successor, never a burst of keys.
    assert all(gap >= timedelta(seconds=rotate_after * 0.9) for gap in gaps), gaps
    readers = _run_all("read", server_url, root)
    assert len({int(out) for out in readers}) == 1 and int(readers[0]) >= PROCESSES * 150
    engine.dispose()
