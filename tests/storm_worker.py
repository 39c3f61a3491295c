"""One process of the multi-process tests in test_storm.py.

    python storm_worker.py MODE URL START_AT PROCESS [OPTIONS_JSON]

MODE is "rotate" (call rotate() three times), "write" (insert rows under a
rotation policy) or "read" (read every row back and check it). The root key
comes from ENVELOPE_ROOT_KEY. Exits non-zero on any failure.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

import sqlalchemy as sa

from sqlalchemy_envelope import EncryptedType, KeyRegistry

ROWS_PER_WRITER = 150

table = sa.Table(
    "storm",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("value", EncryptedType(sa.String(50))),
)


def expected(row_id: int) -> str:
    return f"row {row_id} written by process {row_id // 1000}"


def main() -> None:
    mode, url, start_at, process = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    seconds = options.pop("seconds", None)
    if "rotate_after" in options:
        options["rotate_after"] = timedelta(seconds=options["rotate_after"])
    engine = sa.create_engine(url)
    registry = KeyRegistry.from_env(engine, **options)
    registry.init()
    time.sleep(max(0.0, start_at - time.time()))

    if mode == "rotate":
        print(json.dumps([registry.rotate().version for _ in range(3)]))
    elif mode == "write":
        deadline = time.time() + (seconds or 0)
        i = 0
        while i < ROWS_PER_WRITER or time.time() < deadline:
            row_id = process * 1000 + i
            with engine.begin() as conn:
                conn.execute(table.insert(), {"id": row_id, "value": expected(row_id)})
            i += 1
            if seconds:
                time.sleep(0.005)
    elif mode == "read":
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.id, table.c.value)).all()
        bad = [row_id for row_id, value in rows if value != expected(row_id)]
        if bad or not rows:
            sys.exit(f"{len(bad)} rows read back wrong")
        print(len(rows))
    registry.close()
    engine.dispose()


if __name__ == "__main__":
    main()
