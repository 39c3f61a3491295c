"""Side-by-side figures: plain columns, EncryptedType and sqlalchemy-utils.

    pip install -e ".[bench]" && python benchmarks/bench.py [--rows 100000]
        [--postgres-url postgresql+psycopg://...] [--repeat 5] [--stream-rows 1000000]

Every figure is the median of ``--repeat`` runs, and every ratio compares
figures from the same run, because these machines are noisy. ``--smoke`` runs
everything on tiny sizes so that CI can check the script still works; it
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.types import TypeDecorator

from sqlalchemy_envelope import EncryptedType, KeyRegistry, PBKDF2RootKey, StaticRootKey
from sqlalchemy_envelope.crypto import format as fmt

VALUE = "alice@example.com"
KEYS_TABLE = "envelope_bench_keys"


def fresh_registry(engine: sa.Engine, root: StaticRootKey) -> KeyRegistry:
    """A registry on its own keys table, emptied first: the database may be
    shared, and may hold keys from an earlier run under another root key."""
    registry = KeyRegistry(engine, root, table_name=KEYS_TABLE)
    registry.table.drop(engine, checkfirst=True)
    registry.init()
    return registry


CONTEXT = b"bench.value"


def value_table(name: str, column_type: Any) -> sa.Table:
    """A table of an id and one ``value`` column, in a MetaData of its own."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", column_type),
    )


def median_seconds(work: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_value(registry: KeyRegistry, n: int, repeat: int) -> list[tuple[str, float, float]]:
    """Microseconds per value: the bare AES-GCM floor, ours, sqlalchemy-utils."""
    from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine

    aead = AESGCM(os.urandom(32))
    header = b"\x01" + os.urandom(5)
    plaintext = VALUE.encode()
    urandom = os.urandom

    def bare_encrypt() -> list[bytes]:
        out = []
        for _ in range(n):
            nonce = urandom(12)
            out.append(header + nonce + aead.encrypt(nonce, plaintext, header + CONTEXT))
        return out

    sealed = bare_encrypt()

    def bare_decrypt() -> None:
        for c in sealed:
            aead.decrypt(c[6:18], c[18:], c[:6] + CONTEXT)

    context = fmt.given_context(CONTEXT.decode())  # the column's: bench.value
    ours = [registry.envelope.encrypt_bytes(plaintext, context.current) for _ in range(n)]
    encrypt = registry.envelope.encrypt_bytes
    decrypt = registry.envelope.decrypt_bytes

    utils = AesGcmEngine()
    utils._update_key("a secret key")
    utils_sealed = [utils.encrypt(VALUE) for _ in range(n)]

    rows = [
        ("bare AES-GCM floor", bare_encrypt, bare_decrypt),
        (
            "EncryptedType (registry)",
            lambda: [encrypt(plaintext, context.current) for _ in range(n)],
            lambda: [decrypt(c, context) for c in ours],
        ),
        (
            "sqlalchemy-utils AesGcmEngine",
            lambda: [utils.encrypt(VALUE) for _ in range(n)],
            lambda: [utils.decrypt(c) for c in utils_sealed],
        ),
    ]
    return [
        (
            name,
            median_seconds(enc, repeat) / n * 1e6,
            median_seconds(dec, repeat) / n * 1e6,
        )
        for name, enc, dec in rows
    ]


class BareAESGCM(TypeDecorator[str]):
    """The least any AES-GCM column type can do: the floor's work in a
    TypeDecorator, with no key lookup, no policy and no error handling. It
    shows what SQLAlchemy's per-value type processing costs by itself."""

    impl = sa.LargeBinary
    cache_ok = True
    aead = AESGCM(os.urandom(32))
    header = b"\x01" + os.urandom(5)

    def bind_processor(self, dialect: Any) -> Any:
        aead, header, urandom = self.aead, self.header, os.urandom

        def process(value: str) -> bytes:
            nonce = urandom(12)
            return header + nonce + aead.encrypt(nonce, value.encode(), header + CONTEXT)

        return process

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        aead = self.aead

        def process(value: bytes) -> str:
            return aead.decrypt(value[6:18], value[18:], value[:6] + CONTEXT).decode()

        return process


def columns(
    url: str, registry_root: StaticRootKey, n: int, repeat: int
) -> list[tuple[str, float, float, float, float]]:
    """Rows per second: Core executemany insert and select, then ORM insert
    (add_all + commit) and select of whole objects."""
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import registry as orm_registry
    from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine, StringEncryptedType

    engine = sa.create_engine(url)
    registry = fresh_registry(engine, registry_root)
    kinds: dict[str, Any] = {
        "plain String": sa.String(200),
        "bare AES-GCM TypeDecorator": BareAESGCM(),
        "EncryptedType": EncryptedType(sa.String(200)),
        "sqlalchemy-utils": StringEncryptedType(sa.String(200), "a secret key", AesGcmEngine),
    }
    results = []
    rows = [{"id": i, "value": f"user{i}@example.com"} for i in range(n)]
    for label, column_type in kinds.items():
        table = value_table(f"bench_{label.split()[0].replace('-', '_').lower()}", column_type)
        md = table.metadata
        record = type(f"Record_{table.name}", (), {})
        orm_registry().map_imperatively(record, table)
        md.drop_all(engine)
        md.create_all(engine)

        def insert(table: sa.Table = table) -> None:
            with engine.begin() as conn:
                conn.execute(table.delete())
                conn.execute(table.insert(), rows)

        def select(table: sa.Table = table) -> None:
            with engine.connect() as conn:
                got = conn.execute(sa.select(table.c.value)).scalars().all()
            assert len(got) == n

        def orm_insert(table: sa.Table = table, record: Any = record) -> None:
            with engine.begin() as conn:
                conn.execute(table.delete())
            with Session(engine) as session:
                objects = []
                for row in rows:
                    obj = record()
                    obj.id, obj.value = row["id"], row["value"]
                    objects.append(obj)
                session.add_all(objects)
                session.commit()

        def orm_select(record: Any = record) -> None:
            with Session(engine) as session:
                got = session.scalars(sa.select(record)).all()
            assert len(got) == n

        insert_s = median_seconds(insert, repeat)
        select_s = median_seconds(select, repeat)
        orm_insert_s = median_seconds(orm_insert, repeat)
        orm_select_s = median_seconds(orm_select, repeat)
        results.append((label, n / insert_s, n / select_s, n / orm_insert_s, n / orm_select_s))
        md.drop_all(engine)
    registry.close()
    engine.dispose()
    return results


def reencrypt_vs_update(url: str, root: StaticRootKey, n: int, repeat: int) -> tuple[float, float]:
    """Rows/s: re-encrypting a column after a rotation, against a plain batched
    UPDATE of the same rows (same keyset batches of 1,000, no crypto)."""
    engine = sa.create_engine(url)
    registry = fresh_registry(engine, root)
    table = value_table("bench_reencrypt", EncryptedType(sa.String(200)))
    md = table.metadata
    plain = value_table("bench_update", sa.LargeBinary).to_metadata(md)
    md.drop_all(engine)
    md.create_all(engine)
    rows = [{"id": i, "value": f"user{i}@example.com"} for i in range(n)]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
        conn.execute(plain.insert(), [{"id": i, "value": os.urandom(51)} for i in range(n)])

    def batched_update() -> None:
        last = -1
        while True:
            with engine.begin() as conn:
                batch = conn.execute(
                    sa.select(plain.c.id, plain.c.value)
                    .where(plain.c.id > last)
                    .order_by(plain.c.id)
                    .limit(1000)
                ).all()
                if not batch:
                    return
                conn.execute(
                    sa.update(plain)
                    .where(plain.c.id == sa.bindparam("pk"))
                    .values(value=sa.bindparam("v")),
                    [{"pk": i, "v": v[::-1]} for i, v in batch],
                )
                last = batch[-1][0]

    def reencrypt() -> None:
        registry.rotate()
        report = registry.reencrypt(table.c.value, batch_size=1000, progress=False)
        assert report.rows_updated == n, report

    update_s = median_seconds(batched_update, repeat)
    reencrypt_s = median_seconds(reencrypt, repeat)
    md.drop_all(engine)
    registry.close()
    engine.dispose()
    return n / update_s, n / reencrypt_s


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def streaming(url: str, root: StaticRootKey, n: int) -> tuple[float, float, float, float]:
    """Stream ``n`` encrypted values (Core ``stream_results`` + ``yield_per``,
    then ORM ``yield_per``): resident memory after the first tenth and at the
    end, for each. Flat means the second is about the first."""
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import registry as orm_registry

    engine = sa.create_engine(url)
    registry = fresh_registry(engine, root)
    table = value_table("bench_stream", EncryptedType(sa.String(200)))
    md = table.metadata
    record = type("StreamRecord", (), {})
    orm_registry().map_imperatively(record, table)
    md.drop_all(engine)
    md.create_all(engine)
    chunk = 20_000
    for start in range(0, n, chunk):
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                [
                    {"id": i, "value": f"user{i}@example.com"}
                    for i in range(start, min(n, start + chunk))
                ],
            )

    def watch(values: Any) -> tuple[float, float]:
        early = 0.0
        count = 0
        for _ in values:
            count += 1
            if count == n // 10:
                early = _resident_mb()
        assert count == n
        return early, _resident_mb()

    query = sa.select(table.c.value).order_by(table.c.id)
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
        core = watch(result.scalars())
    with Session(engine) as session:
        orm = watch(session.scalars(sa.select(record).execution_options(yield_per=1000)))
    md.drop_all(engine)
    registry.close()
    engine.dispose()
    return (*core, *orm)


def startup(url: str, root: StaticRootKey, repeat: int) -> tuple[float, float]:
    engine = sa.create_engine(url)
    fresh_registry(engine, root).close()
    engine.dispose()

    def start() -> None:
        eng = sa.create_engine(url)
        registry = KeyRegistry(eng, root, table_name=KEYS_TABLE)
        registry.init()
        registry.envelope.encrypt_bytes(b"x", CONTEXT)
        registry.close()
        eng.dispose()

    pbkdf2 = median_seconds(
        lambda: PBKDF2RootKey(secrets.token_urlsafe(32), "salt").fingerprint, max(1, repeat // 2)
    )
    return median_seconds(start, repeat) * 1000, pbkdf2 * 1000


def report(args: argparse.Namespace) -> str:
    root = StaticRootKey(os.urandom(32))
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        sqlite_url = f"sqlite:///{Path(folder) / 'bench.db'}"
        engine = sa.create_engine(sqlite_url)
        registry = fresh_registry(engine, root)
        values = per_value(registry, args.values, args.repeat)
        registry.close()
        engine.dispose()

        floor_enc, floor_dec = values[0][1], values[0][2]
        lines.append(
            f"Per value ({args.values:,} values of {len(VALUE)} bytes, median of {args.repeat})"
        )
        lines.append("")
        lines.append("| | encrypt µs | decrypt µs | encrypt x floor | decrypt x floor |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, enc, dec in values:
            lines.append(
                f"| {name} | {enc:.2f} | {dec:.2f} | {enc / floor_enc:.2f} | {dec / floor_dec:.2f} |"
            )

        databases = [("SQLite", sqlite_url)]
        if args.postgres_url:
            databases.append(("PostgreSQL", args.postgres_url))
        for db_name, url in databases:
            results = columns(url, root, args.rows, args.repeat)
            plain = results[0]
            lines.append("")
            lines.append(
                f"{db_name}, {args.rows:,} rows (rows/s; x plain; overhead µs/row for Core)"
            )
            lines.append("")
            lines.append(
                "| column | Core insert | Core select | ORM insert | ORM select | Core insert overhead µs (x floor) | Core select overhead µs (x floor) |"
            )
            lines.append("|---|---:|---:|---:|---:|---:|---:|")
            for label, *rates in results:
                cells = [
                    f"{rate:,.0f} ({rate / base:.2f}x)"
                    for rate, base in zip(rates, plain[1:], strict=False)
                ]
                insert_over, select_over = ((1 / rates[i] - 1 / plain[1 + i]) * 1e6 for i in (0, 1))
                lines.append(
                    f"| {label} | {' | '.join(cells)} | {insert_over:.2f} ({insert_over / floor_enc:.2f}x) "
                    f"| {select_over:.2f} ({select_over / floor_dec:.2f}x) |"
                )
        lines.append("")
        lines.append(f"Re-encrypt after a rotation, {args.rows:,} rows, batches of 1,000 (rows/s)")
        lines.append("")
        lines.append("| database | plain batched UPDATE | reencrypt() | ratio |")
        lines.append("|---|---:|---:|---:|")
        for db_name, url in databases:
            update_rate, reencrypt_rate = reencrypt_vs_update(url, root, args.rows, args.repeat)
            lines.append(
                f"| {db_name} | {update_rate:,.0f} | {reencrypt_rate:,.0f} | "
                f"{reencrypt_rate / update_rate:.2f} |"
            )

        lines.append("")
        lines.append(
            f"Streaming {args.stream_rows:,} encrypted values, yield_per=1000 "
            "(resident memory, MB, after the first tenth -> at the end)"
        )
        lines.append("")
        lines.append("| database | Core stream_results | ORM yield_per |")
        lines.append("|---|---:|---:|")
        for db_name, url in databases:
            core_early, core_end, orm_early, orm_end = streaming(url, root, args.stream_rows)
            lines.append(
                f"| {db_name} | {core_early:.0f} -> {core_end:.0f} | {orm_early:.0f} -> {orm_end:.0f} |"
            )

        start_ms, pbkdf2_ms = startup(sqlite_url, root, args.repeat)
        lines.append("")
        lines.append(f"Registry start-up on SQLite without PBKDF2: {start_ms:.1f} ms")
        lines.append(
            f"PBKDF2-HMAC-SHA256, 600,000 iterations, once per process: {pbkdf2_ms:.0f} ms"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--values", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stream-rows", type=int, default=1_000_000)
    parser.add_argument("--postgres-url", default=os.environ.get("ENVELOPE_BENCH_POSTGRES_URL"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.values, args.repeat, args.stream_rows = 200, 200, 1, 2000
    print(report(args))


if __name__ == "__main__":
    main()
