"""Every report renders as JSON the same way: ``to_json`` is ``to_dict`` as
text, times in ISO 8601, durations in seconds, versions as keys in text."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from conftest import Clocks, encrypted_table

from sqlalchemy_envelope import KeyRegistry, StaticRootKey


def as_json(report: Any) -> Any:
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    return data


def test_every_report_renders_as_json(
    engine: sa.Engine, root_key: StaticRootKey, clocks: Clocks
) -> None:
    registry = KeyRegistry(
        engine,
        root_key,
        rotate_after=timedelta(days=30),
        clock=clocks.monotonic,
        wall_clock=clocks.now,
    )
    registry.init()
    notes = encrypted_table("notes")
    notes.metadata.create_all(engine)
    for ids in (range(3), range(3, 5)):  # the statement twice: the compiled cache
        with engine.begin() as conn:
            conn.execute(notes.insert(), [{"id": i, "body": f"note {i}"} for i in ids])

    (census,) = registry.census(notes)
    data = as_json(census)
    assert data["column"] == "notes.body" and data["rows"] == 5
    assert data["keys"] == [as_json(census.keys[0])]
    assert data["keys"][0]["version"] == 1 and data["keys"][0]["state"] == "active"

    status = registry.status(census=True)
    data = as_json(status)
    (key,) = status.keys
    assert data["keys"] == [as_json(key)]
    assert datetime.fromisoformat(data["keys"][0]["created_at"]) == key.created_at
    assert data["keys"][0]["state"] == "active"
    assert data["rotate_after_seconds"] == timedelta(days=30).total_seconds()
    assert data["cache_max_age_seconds"] == status.cache_max_age.total_seconds()
    assert data["rows_by_version"] == {"1": 5}
    assert data["columns"] == [as_json(census)]

    clocks.advance(timedelta(days=31))
    maintenance = registry.maintenance()
    data = as_json(maintenance)
    assert maintenance.rotated is not None
    assert data["rotated"] == as_json(maintenance.rotated) and data["rotated"]["version"] == 2
    assert data["still_referenced"] == {"1": 5}

    migration = registry.reencrypt(notes)
    data = as_json(migration)
    assert data["values_by_version"] == {"1": 5} and data["rows_updated"] == 5
    assert data["elapsed_seconds"] >= 0 and data["left_rows"] == []
    registry.close()
