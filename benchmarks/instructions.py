"""Instructions per row, counted by valgrind's callgrind: repeatable where
wall-clock times on a shared machine are not.

    python benchmarks/instructions.py [--rows 10000] [--metrics]

For a Core executemany insert and a Core select on a SQLite file, each of a
plain String column, a bare AES-GCM TypeDecorator (the floor's work and nothing
else) and EncryptedType is run under callgrind once with one repetition and
once with three; the difference, divided by two and by the row count, is the
cost of one row. The floor is the bare AES-GCM loop of bench.py, counted the
same way, and "bare" is bench.py's bare AES-GCM TypeDecorator. With
``--metrics``, a row "EncryptedType, metrics on": the same column with the
registry reporting OpenTelemetry metrics (docs/metrics.md) to an SDK
MeterProvider, whose difference from EncryptedType is their cost per value.
Needs valgrind (Debian's ``valgrind`` package), and for ``--metrics`` the
OpenTelemetry SDK (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa
from bench import CONTEXT, BareAESGCM

from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey

KINDS = ("plain", "bare", "EncryptedType")
METERED = "EncryptedType, metrics on"


def workload(kind: str, mode: str, reps: int, rows: int, folder: str) -> None:
    """What runs under callgrind; without the cyclic garbage collector, whose
    passes would land in one run and not the other."""
    gc.disable()
    values = [f"user{i}@example.com" for i in range(rows)]
    aead, header = BareAESGCM.aead, BareAESGCM.header
    if kind == "floor":
        sealed = []
        for value in values:
            nonce = os.urandom(12)
            sealed.append(header + nonce + aead.encrypt(nonce, value.encode(), header + CONTEXT))
        for _ in range(reps):
            if mode == "insert":
                for value in values:
                    nonce = os.urandom(12)
                    header + nonce + aead.encrypt(nonce, value.encode(), header + CONTEXT)
            else:
                for c in sealed:
                    aead.decrypt(c[6:18], c[18:], c[:6] + CONTEXT)
        return
    # A new database every run: creating one costs more than opening one.
    database = Path(folder) / f"{kind.replace(' ', '_')}.db"
    database.unlink(missing_ok=True)
    engine = sa.create_engine(f"sqlite:///{database}")
    # Keys cached for longer than a run under valgrind can take: a refresh
    # (a query and an unwrap, once a minute) would land in one run only.
    options = {}
    if kind == METERED:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        options["meter_provider"] = MeterProvider(metric_readers=[InMemoryMetricReader()])
    KeyRegistry(engine, StaticRootKey(bytes(range(32))), cache_max_age=3600, **options).init()
    column_type = {
        "plain": sa.String(200),
        "bare": BareAESGCM(),
        "EncryptedType": EncryptedType(sa.String(200)),
        METERED: EncryptedType(sa.String(200)),
    }[kind]
    table = sa.Table(
        "t",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", column_type),
    )
    table.metadata.create_all(engine)
    params = [{"id": i, "value": v} for i, v in enumerate(values)]
    with engine.begin() as conn:
        conn.execute(table.delete())
        conn.execute(table.insert(), params)
    for _ in range(reps):
        if mode == "insert":
            with engine.begin() as conn:
                conn.execute(table.delete())
                conn.execute(table.insert(), params)
        else:
            with engine.connect() as conn:
                conn.execute(sa.select(table.c.value)).scalars().all()


def count(kind: str, mode: str, reps: int, rows: int, folder: str) -> int:
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--run",
            kind,
            mode,
            str(reps),
            "--rows",
            str(rows),
            "--folder",
            folder,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts in every run
    )
    found = re.search(r"Collected : (\d+)", result.stderr)
    assert found, result.stderr[-500:]
    return int(found.group(1))


def per_row(kind: str, mode: str, rows: int, folder: str) -> float:
    return (count(kind, mode, 3, rows, folder) - count(kind, mode, 1, rows, folder)) / 2 / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--run", nargs=3, metavar=("KIND", "MODE", "REPS"))
    parser.add_argument("--folder")
    parser.add_argument(
        "--smoke", action="store_true", help="run each workload once, natively, for CI"
    )
    parser.add_argument(
        "--metrics", action="store_true", help="add EncryptedType with OpenTelemetry metrics on"
    )
    args = parser.parse_args()
    if args.run:
        kind, mode, reps = args.run
        workload(kind, mode, int(reps), args.rows, args.folder)
        return
    if args.smoke:
        with tempfile.TemporaryDirectory() as folder:
            for kind in ("floor", *KINDS, *((METERED,) if args.metrics else ())):
                for mode in ("insert", "select"):
                    workload(kind, mode, 1, 20, folder)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as folder:
        print(
            f"SQLite, Core, {args.rows:,} rows: instructions per row (overhead over plain, x floor)"
        )
        print()
        print("| column | insert | select |")
        print("|---|---:|---:|")
        floor = {mode: per_row("floor", mode, args.rows, folder) for mode in ("insert", "select")}
        plain = {mode: per_row("plain", mode, args.rows, folder) for mode in ("insert", "select")}
        over: dict[tuple[str, str], float] = {}
        for kind in (*KINDS, METERED) if args.metrics else KINDS:
            cells = []
            for mode in ("insert", "select"):
                n = plain[mode] if kind == "plain" else per_row(kind, mode, args.rows, folder)
                over[kind, mode] = n - plain[mode]
                cells.append(
                    f"{n:,.0f} ({over[kind, mode]:+,.0f}, {over[kind, mode] / floor[mode]:.2f}x)"
                )
            print(f"| {kind} | {' | '.join(cells)} |")
        print(
            f"| AES-GCM floor | {floor['insert']:,.0f} (encrypt) | {floor['select']:,.0f} (decrypt) |"
        )
        print()
        ratios = ", ".join(
            f"{mode} {over['EncryptedType', mode] / over['bare', mode]:.2f}x"
            for mode in ("insert", "select")
        )
        print(f"Overhead over plain column, ours vs bare: {ratios}")
        if args.metrics:
            cost = ", ".join(
                f"{mode} {over[METERED, mode] - over['EncryptedType', mode]:+,.0f}"
                for mode in ("insert", "select")
            )
            print(f"Metrics on, per value: {cost} instructions")


if __name__ == "__main__":
    main()
