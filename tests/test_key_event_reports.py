"""Reading and reporting the key events, as an operator does: times in UTC
whatever the session's time zone, a recorded head checked before use, each
problem named by its kind and seq, and shipping resumed by seq."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from conftest import async_engine_for

from sqlalchemy_envelope import AsyncKeyRegistry, ConfigurationError, KeyRegistry, StaticRootKey

EVENTS = "data_key_events"


def _cli(url: str, root: bytes, *args: str, code: int = 0) -> tuple[str, str]:
    """`sqlalchemy-envelope ARGS` as an operator runs it; its stdout and stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_envelope", *args],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": url,
            "ENVELOPE_ROOT_KEY": base64.b64encode(root).decode(),
        },
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == code, (args, result.stdout, result.stderr)
    return result.stdout, result.stderr


def test_times_are_utc_whatever_the_session_time_zone(pg_url: str) -> None:
    """A PostgreSQL session in another time zone hands back its own offset."""
    url = f"{pg_url}%20-ctimezone%3DAmerica/Los_Angeles"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW TIME ZONE").scalar() == "America/Los_Angeles"
    root = os.urandom(32)
    registry = KeyRegistry(engine, StaticRootKey(root), attach=False)
    registry.init()
    registry.rotate()
    registry.retire(1)
    for _ in range(2):
        events = registry.events()
        assert [e.occurred_at.utcoffset() for e in events] == [timedelta(0)] * len(events)
        assert all(e.to_dict()["occurred_at"].endswith("+00:00") for e in events)
        keys = [registry.key_info(1), *registry.status().keys]
        times = [t for key in keys for t in (key.created_at, key.state_changed_at)]
        assert [t.utcoffset() for t in times] == [timedelta(0)] * len(times)
    registry.close()
    engine.dispose()
    listed = json.loads(_cli(url, root, "events", "--json")[0])["events"]
    assert [e["occurred_at"][-6:] for e in listed] == ["+00:00"] * len(listed)
    status = json.loads(_cli(url, root, "status", "--json")[0])
    assert len(status["keys"]) == 2
    for key in status["keys"]:
        assert key["created_at"].endswith("+00:00"), key
        assert key["state_changed_at"].endswith("+00:00"), key


ROOT = os.urandom(32)


@pytest.fixture
def chain(engine: sa.Engine) -> Iterator[KeyRegistry]:
    """A registry under ``ROOT`` with four events: anchor, init (2), rotate."""
    registry = KeyRegistry(engine, StaticRootKey(ROOT))
    registry.init()
    registry.rotate()
    assert len(registry.events()) == 4
    yield registry
    registry.close()


def test_a_malformed_expected_head_is_a_usage_error(chain: KeyRegistry, db_url: str) -> None:
    head = chain.status().events_head
    assert head is not None
    for _ in range(2):
        for malformed in ["", "  ", "nothex", head[:-2], head + "00", "g" * 64]:
            with pytest.raises(ConfigurationError, match="64 hex digits"):
                chain.verify_events(malformed)
        # As copied: in capitals, with the line's spaces.
        assert chain.verify_events(f" {head.upper()}\n").ok
    for malformed in ["", "nothex"]:
        out, err = _cli(db_url, ROOT, "events", "verify", "--expected-head", malformed, code=2)
        assert out == "" and len(err.splitlines()) == 1 and "64 hex digits" in err, err
        assert "broken" not in err
    _cli(db_url, ROOT, "events", "verify", "--expected-head", head)


def _tampered(engine: sa.Engine, statement: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)


def _problem(registry: KeyRegistry) -> tuple[int, str, str, int]:
    report = registry.verify_events()
    assert not report.ok and report.problem is not None
    return report.problem.seq, report.problem.kind, report.problem.detail, report.events


def test_an_altered_anchor_is_reported_altered(chain: KeyRegistry, engine: sa.Engine) -> None:
    _tampered(engine, f"UPDATE {EVENTS} SET actor = 'someone else' WHERE seq = 1")
    for _ in range(2):
        assert _problem(chain)[:2] + _problem(chain)[3:] == (1, "altered", 0)


def test_an_altered_re_anchor_is_reported_altered(chain: KeyRegistry, engine: sa.Engine) -> None:
    new_root = StaticRootKey(os.urandom(32))
    chain.rewrap(new_root, reason="new root key")
    after = KeyRegistry(engine, new_root, attach=False)
    after.rotate()
    anchor = [e for e in after.events() if e.operation == "anchor"][-1]
    assert anchor.seq == 6
    _tampered(engine, f"UPDATE {EVENTS} SET reason = 'nothing to see' WHERE seq = 6")
    for _ in range(2):
        assert _problem(after)[:2] + _problem(after)[3:] == (6, "altered", 5)
    after.close()


def test_an_event_inserted_before_the_anchor_is_reported_inserted(
    chain: KeyRegistry, engine: sa.Engine
) -> None:
    columns = (
        "occurred_at, operation, scope, versions, outcome, actor, root_key_fingerprint, "
        "reason, wrapped_secret, previous_secret, mac"
    )
    _tampered(
        engine,
        f"INSERT INTO {EVENTS} (seq, {columns}) SELECT 0, {columns} FROM {EVENTS} WHERE seq = 4",
    )
    for _ in range(2):
        seq, kind, detail, checked = _problem(chain)
        assert (seq, kind, checked) == (0, "inserted", 0)
        assert "numbered 0" in detail and "--" not in detail


def test_the_anchor_deleted_is_reported_as_the_first_event_deleted(
    chain: KeyRegistry, engine: sa.Engine
) -> None:
    _tampered(engine, f"DELETE FROM {EVENTS} WHERE seq = 1")
    for _ in range(2):
        seq, kind, detail, checked = _problem(chain)
        assert (seq, kind, checked) == (1, "deleted", 0)
        assert "no event numbered 1" in detail and "newest" not in detail
    _tampered(engine, f"DELETE FROM {EVENTS} WHERE seq = 2")
    assert _problem(chain)[:3] == (1, "deleted", "no event numbered 1-2")


def test_shipping_resumes_after_the_last_seq_whatever_the_clocks(db_url: str) -> None:
    """Two hosts, the second's clock 2 s behind: `since` the last time
    shipped misses its event, `after` the last seq does not."""
    now = datetime.now(UTC)
    first = KeyRegistry(sa.create_engine(db_url), StaticRootKey(ROOT), wall_clock=lambda: now)
    first.init()
    shipped = json.loads(_cli(db_url, ROOT, "events", "--json")[0])["events"]
    assert [e["seq"] for e in shipped] == [1, 2, 3]
    behind = KeyRegistry(
        sa.create_engine(db_url),
        StaticRootKey(ROOT),
        wall_clock=lambda: now - timedelta(seconds=2),
    )
    behind.rotate(reason="CHG-9")
    last = shipped[-1]
    since = json.loads(_cli(db_url, ROOT, "events", "--json", "--since", last["occurred_at"])[0])
    assert 4 not in [e["seq"] for e in since["events"]]  # why --since is not a cursor
    for _ in range(2):
        after = json.loads(_cli(db_url, ROOT, "events", "--after", str(last["seq"]), "--json")[0])
        assert [(e["seq"], e["reason"]) for e in after["events"]] == [(4, "CHG-9")]
        assert [e.seq for e in first.events(after=last["seq"])] == [4]
        assert [e.seq for e in behind.events(after=0, limit=2)] == [3, 4]
        assert behind.events(after=4) == []
    _cli(db_url, ROOT, "events", "--after", "-1", code=2)
    for wrong in [-1, "3", True]:
        with pytest.raises(ConfigurationError, match="after"):
            first.events(after=wrong)  # type: ignore[arg-type]
    for registry in (first, behind):
        registry.close()
        registry.engine.dispose()


def test_async_registry_resumes_after_a_seq(db_url: str) -> None:
    asyncio.run(_async_after(db_url))


async def _async_after(url: str) -> None:
    engine = async_engine_for(url)
    registry = AsyncKeyRegistry(engine, StaticRootKey(ROOT))
    await registry.init()
    await registry.rotate()
    for _ in range(2):
        assert [e.seq for e in await registry.events(after=2)] == [3, 4]
        assert [e.seq for e in await registry.events(after=2, limit=1)] == [4]
    await registry.close()
    await engine.dispose()
