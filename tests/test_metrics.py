"""OpenTelemetry metrics (docs/metrics.md), read with the SDK's in-memory
reader from a real MeterProvider: exact counts for a known workload on every
database, root key calls against a real (moto) KMS, no value or secret in
any attribute, and nothing imported or paid without a meter provider."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clocks, KMSServer, async_engine_for
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sqlalchemy_envelope import (
    SCOPE_OPTION,
    AsyncKeyRegistry,
    AWSKMSRootKey,
    DecryptionError,
    EncryptedType,
    KeyRegistry,
    StaticRootKey,
    session_scope,
)
from sqlalchemy_envelope.crypto import format as fmt
from sqlalchemy_envelope.keys.envelope import Envelope
from sqlalchemy_envelope.keys.wrapper import KeyWrapper

P = "sqlalchemy_envelope."
SCOPE, VERSION, ENCRYPTION = P + "scope", P + "key.version", P + "encryption"

Points = dict[frozenset[tuple[str, Any]], Any]


def collect(reader: InMemoryMetricReader) -> dict[str, Points]:
    """Every metric's points by attribute set: a counter's or gauge's value,
    a histogram's (count, sum)."""
    found: dict[str, Points] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = found.setdefault(metric.name, {})
                for point in metric.data.data_points:
                    value = (
                        (point.count, point.sum)
                        if isinstance(point, HistogramDataPoint)
                        else point.value
                    )
                    points[frozenset((point.attributes or {}).items())] = value
    return found


def by(points: Points, *names: str) -> dict[tuple[Any, ...], Any]:
    """``points`` keyed by the values of the attributes ``names``."""
    return {tuple(dict(attrs).get(n) for n in names): v for attrs, v in points.items()}


def values(points: Points) -> dict[tuple[str, int, str], int]:
    return by(points, SCOPE, VERSION, ENCRYPTION)


def notes_table() -> sa.Table:
    return sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", EncryptedType(sa.String(100))),
        sa.Column("email", EncryptedType(sa.String(100), deterministic=True)),
    )


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> MeterProvider:
    return MeterProvider(metric_readers=[reader])


def test_a_known_workload_is_counted_exactly(
    engine: sa.Engine,
    root_key: StaticRootKey,
    clocks: Clocks,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
) -> None:
    # A clock that only the test moves: no cache entry goes stale meanwhile.
    registry = KeyRegistry(engine, root_key, meter_provider=provider, clock=clocks.monotonic)
    registry.init()  # the default scope's data key and index key
    registry.create_scope("a", "b")  # ahead of the transactions that use them (SQLite)
    table = notes_table()
    table.metadata.create_all(engine)
    insert = table.insert()

    # Scope a: 5 rows through a Connection, the same statement twice.
    with engine.begin() as conn:
        for ids in (range(1, 3), range(3, 6)):
            conn.execute(
                insert,
                [{"id": i, "body": f"note {i}", "email": f"u{i}@a.example"} for i in ids],
                execution_options={SCOPE_OPTION: "a"},
            )
    # Scope b: 3 rows through a Session, the same statement twice.
    with Session(engine) as session, session_scope(session, "b"):
        for ids in (range(6, 7), range(7, 9)):
            session.execute(
                insert, [{"id": i, "body": f"note {i}", "email": f"u{i}@b.example"} for i in ids]
            )
        session.commit()
    registry.rotate("a")
    with engine.begin() as conn:
        conn.execute(
            insert,
            {"id": 9, "body": "note 9", "email": "u9@a.example"},
            execution_options={SCOPE_OPTION: "a"},
        )

    # Read all 9 rows back twice through a Connection and twice through a Session.
    select = sa.select(table.c.body, table.c.email).order_by(table.c.id)
    expected = [
        (f"note {i}", f"u{i}@{'b' if i in (6, 7, 8) else 'a'}.example") for i in range(1, 10)
    ]
    with engine.connect() as conn:
        for _ in range(2):
            assert [tuple(r) for r in conn.execute(select)] == expected
    with Session(engine) as session:
        for _ in range(2):
            assert [tuple(r) for r in session.execute(select)] == expected

    # One value altered in the database: it fails to decrypt, once per read.
    with engine.begin() as conn:
        raw = conn.execute(sa.text("SELECT body FROM notes WHERE id = 2")).scalar_one()
        altered = bytes(raw)[:-1] + bytes([bytes(raw)[-1] ^ 1])
        conn.execute(sa.text("UPDATE notes SET body = :b WHERE id = 2"), {"b": altered})
    with engine.connect() as conn, pytest.raises(DecryptionError):
        conn.execute(sa.select(table.c.body).where(table.c.id == 2)).all()

    metrics = collect(reader)
    r, d = "randomized", "deterministic"
    assert values(metrics[P + "encrypted.values"]) == {
        ("a", 1, r): 5,
        ("a", 2, r): 1,
        ("b", 1, r): 3,
        ("a", 1, d): 6,  # index keys do not rotate with data keys
        ("b", 1, d): 3,
    }
    assert values(metrics[P + "decrypted.values"]) == {
        ("a", 1, r): 4 * 5,
        ("a", 2, r): 4 * 1,
        ("b", 1, r): 4 * 3,
        ("a", 1, d): 4 * 6,
        ("b", 1, d): 4 * 3,
    }
    assert by(metrics[P + "decryption.errors"], "error.type") == {("DecryptionError",): 1}
    assert by(metrics[P + "key.rotations"], SCOPE, P + "rotation.trigger") == {("a", "manual"): 1}
    # init and rotate cache the data keys they make; create_scope caches
    # none: the first value of scopes a and b in each column read its key (4
    # misses), and every other value, 86 of the 90 encrypted or decrypted,
    # found its key in the cache.
    misses = by(metrics[P + "key_cache.misses"], P + "key.kind")
    assert misses == {("data",): 2, ("index",): 2}
    assert by(metrics[P + "key_cache.hits"]) == {(): 18 + 72 - 4}
    # Cached: every data key but none of the default scope's index key, unused.
    assert by(metrics[P + "key_cache.size"], P + "key.kind") == {("data",): 4, ("index",): 2}
    # Eight keys wrapped (default, a, b: a data and an index key each, a's
    # version 2, and the key events' chain secret at init); five unwrapped:
    # one stored key to prove the root key before the first insert after
    # init, and the four keys of a and b read on first use (the misses); the
    # fingerprint computed once.
    calls = by(metrics[P + "root_key.operations"], P + "root_key.operation", P + "root_key.type")
    assert calls == {
        ("fingerprint", "StaticRootKey"): 1,
        ("wrap", "StaticRootKey"): 8,
        ("unwrap", "StaticRootKey"): 5,
    }
    durations = by(
        metrics[P + "root_key.operation.duration"], P + "root_key.operation", P + "root_key.type"
    )
    assert {k: count for k, (count, _) in durations.items()} == calls
    assert all(total >= 0 for _, total in durations.values())

    # Re-encrypting scope a moves its five version-1 values but the altered one.
    report = registry.reencrypt(table.c.body, scope="a")
    assert report.left_behind == 1 and report.failures == {"DecryptionError": 1}
    after = collect(reader)
    assert by(after[P + "job.rows"], P + "job.name") == {("re-encrypt",): report.rows_scanned}
    assert by(after[P + "job.left_behind"], P + "job.name") == {("re-encrypt",): 1}
    assert by(after[P + "decryption.errors"], "error.type") == {("DecryptionError",): 2}
    assert values(after[P + "encrypted.values"])["a", 2, r] == 1 + 4
    registry.close()


def test_rotation_by_policy_is_counted_apart(
    engine: sa.Engine,
    root_key: StaticRootKey,
    clocks: Clocks,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
) -> None:
    registry = KeyRegistry(
        engine,
        root_key,
        meter_provider=provider,
        rotate_after=timedelta(days=30),
        clock=clocks.monotonic,
        wall_clock=clocks.now,
    )
    registry.init()
    table = notes_table()
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "body": "before", "email": "x"})
    clocks.advance(timedelta(days=31))  # the key is due, and its cache entry stale
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 2, "body": "after", "email": "y"})
    registry.rotate()
    clocks.advance(timedelta(days=31))
    assert registry.maintenance().rotated is not None  # due by policy again
    metrics = collect(reader)
    assert by(metrics[P + "key.rotations"], SCOPE, P + "rotation.trigger") == {
        ("default", "policy"): 2,
        ("default", "manual"): 1,
    }
    assert values(metrics[P + "encrypted.values"])["default", 2, "randomized"] == 1
    # init cached its data key, not its index key: the first row's email
    # read it (a miss). The second row's keys were both stale: read again
    # (two misses). One value of four found its key in the cache.
    assert by(metrics[P + "key_cache.misses"], P + "key.kind") == {("data",): 1, ("index",): 2}
    assert by(metrics[P + "key_cache.hits"]) == {(): 1}
    registry.close()


def test_kms_calls_are_counted_and_timed(kms: KMSServer, engine: sa.Engine) -> None:
    arn = kms.create_key()
    root_key = AWSKMSRootKey(arn)
    calls: Counter[str] = Counter()
    root_key._client.meta.events.register(
        "before-call.kms", lambda model, **_: calls.update([model.name])
    )
    reader = InMemoryMetricReader()
    registry = KeyRegistry(engine, root_key, meter_provider=MeterProvider(metric_readers=[reader]))
    registry.init()
    registry.rotate()
    # A second registry (another process) loads the keys through Decrypt.
    other_key = AWSKMSRootKey(arn)
    other_reader = InMemoryMetricReader()
    other = KeyRegistry(
        sa.create_engine(engine.url),
        other_key,
        attach=False,
        meter_provider=MeterProvider(metric_readers=[other_reader]),
    )
    plaintext = other.decrypt(registry.encrypt(b"hello", "ctx"), "ctx")
    assert plaintext == b"hello"

    # Each wrap is one KMS Encrypt and each unwrap one Decrypt, as KMS saw them.
    ops = P + "root_key.operation"
    mine = by(collect(reader)[P + "root_key.operations"], ops, P + "root_key.type")
    assert mine == {
        ("wrap", "AWSKMSRootKey"): calls["Encrypt"],
        ("unwrap", "AWSKMSRootKey"): calls["Decrypt"],
        ("fingerprint", "AWSKMSRootKey"): 1,  # from the ARN: no call
    }
    assert calls == {"Encrypt": 4, "Decrypt": 1}  # three data keys, the chain secret
    theirs = collect(other_reader)
    assert by(theirs[P + "root_key.operations"], ops) == {("fingerprint",): 1, ("unwrap",): 1}
    count, seconds = by(theirs[P + "root_key.operation.duration"], ops)["unwrap",]
    assert count == 1 and seconds > 0  # a round trip to the KMS server
    other.close()
    other.engine.dispose()
    registry.close()


def test_an_async_registry_reports_the_same(
    db_url: str, root_key: StaticRootKey, reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    table = notes_table()

    async def main() -> None:
        engine = async_engine_for(db_url)
        registry = AsyncKeyRegistry(engine, root_key, meter_provider=provider)
        try:
            await registry.init()
            async with engine.begin() as conn:
                await conn.run_sync(table.metadata.create_all)
                for ids in (range(2), range(2, 5)):
                    rows = [{"id": i, "body": "b", "email": "e"} for i in ids]
                    await conn.execute(table.insert(), rows)
            async with AsyncSession(engine) as session:
                for _ in range(2):
                    assert (await session.scalars(sa.select(table.c.body))).all() == ["b"] * 5
        finally:
            await registry.close()
            await engine.dispose()

    asyncio.run(main())
    metrics = collect(reader)
    r, d = "randomized", "deterministic"
    assert values(metrics[P + "encrypted.values"]) == {("default", 1, r): 5, ("default", 1, d): 5}
    assert values(metrics[P + "decrypted.values"]) == {("default", 1, r): 10}


def test_the_metered_path_decrypts_and_refuses_as_the_unmetered_one(
    engine: sa.Engine,
    root_key: StaticRootKey,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
) -> None:
    # max_encryptions=64: the values cross claims, and rotations at the limit.
    registry = KeyRegistry(engine, root_key, meter_provider=provider, max_encryptions=64)
    registry.init()
    context = fmt.given_context("notes.body")
    encrypt = registry.envelope.encryptor(context.current)  # what a column calls per value
    sealed = [encrypt(f"value {i}".encode()) for i in range(200)]
    with engine.connect() as conn:
        versions = dict(conn.execute(sa.text("SELECT id, version FROM data_keys")).all())
    per_version = Counter(versions[fmt.key_id_of(c)] for c in sealed)
    assert len(per_version) > 2

    active = registry.envelope.keyring.active("default")
    assert active.aead is not None
    legacy_header = bytes([fmt.LEGACY_VERSION]) + active.header[1:]
    nonce = os.urandom(12)
    legacy = (
        legacy_header + nonce + active.aead.encrypt(nonce, b"old", legacy_header + context.legacy)
    )
    cases = [
        *sealed,
        legacy,  # format 1: read under the legacy context
        sealed[0][:-1] + bytes([sealed[0][-1] ^ 1]),  # altered
        sealed[0][: fmt.HEADER_BYTES + 3],  # cut short after a known header
        fmt.header(12345) + sealed[0][fmt.HEADER_BYTES :],  # a key data_keys does not hold
        b"\x07" + sealed[0][1:],  # no format at all
    ]
    unmetered = Envelope(registry.envelope.keyring).decryptor(context)
    metered = registry.envelope.decryptor(context)

    def outcome(decrypt: Any, ciphertext: bytes) -> Any:
        try:
            return decrypt(ciphertext)
        except Exception as error:
            return type(error).__name__

    outcomes = [outcome(metered, c) for c in cases]
    assert outcomes == [outcome(unmetered, c) for c in cases]
    assert outcomes[:201] == [f"value {i}".encode() for i in range(200)] + [b"old"]
    assert outcomes[201:] == [
        "DecryptionError",
        "NotCiphertextError",
        "UnknownKeyError",
        "NotCiphertextError",
    ]

    metrics = collect(reader)
    encrypted = values(metrics[P + "encrypted.values"])
    assert encrypted == {("default", v, "randomized"): n for v, n in per_version.items()}
    decrypted = Counter(per_version)
    decrypted[versions[fmt.key_id_of(legacy)]] += 1
    assert values(metrics[P + "decrypted.values"]) == {
        ("default", v, "randomized"): n for v, n in decrypted.items()
    }
    assert by(metrics[P + "decryption.errors"], "error.type") == {
        ("DecryptionError",): 1,
        ("UnknownKeyError",): 1,
        ("NotCiphertextError",): 2,
    }
    rotations = by(metrics[P + "key.rotations"], P + "rotation.trigger")
    assert rotations == {("policy",): len(per_version) - 1}
    registry.close()


def test_counts_are_exact_across_threads(
    engine: sa.Engine,
    root_key: StaticRootKey,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
) -> None:
    registry = KeyRegistry(engine, root_key, meter_provider=provider)
    registry.init()
    encrypt = registry.envelope.encryptor(b"ctx")  # what a column's processor calls
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        for _ in range(2000):
            encrypt(b"value")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrics = collect(reader)
    assert values(metrics[P + "encrypted.values"]) == {("default", 1, "randomized"): 8000}
    registry.close()


def test_no_value_key_or_secret_in_any_attribute(
    engine: sa.Engine, reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    secret = os.urandom(32)
    registry = KeyRegistry(engine, StaticRootKey(secret), meter_provider=provider)
    registry.init()
    registry.create_scope("tenant-1")
    table = notes_table()
    table.metadata.create_all(engine)
    plaintexts = ["Zebulon Quartermain", "zq@hidden.example"]
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            {"id": 1, "body": plaintexts[0], "email": plaintexts[1]},
            execution_options={SCOPE_OPTION: "tenant-1"},
        )
        rows = conn.execute(sa.text("SELECT id, scope, version, wrapped_key FROM data_keys")).all()
        conn.execute(sa.text("UPDATE notes SET body = :b"), {"b": b"\x03" + os.urandom(40)})
    with engine.connect() as conn, pytest.raises(Exception) as raised:
        conn.execute(sa.select(table.c.body)).all()
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.email)).scalar_one() == plaintexts[1]
    keys = [
        registry.root_key.unwrap(bytes(wrapped), KeyWrapper.context(key_id, scope, version))
        for key_id, scope, version, wrapped in rows
    ]
    metrics = collect(reader)
    allowed = {
        SCOPE,
        VERSION,
        ENCRYPTION,
        "error.type",
        P + "key.kind",
        P + "root_key.operation",
        P + "root_key.type",
        P + "rotation.trigger",
        P + "job.name",
    }
    seen: set[Any] = set()
    for points in metrics.values():
        for attributes in points:
            assert {name for name, _ in attributes} <= allowed
            seen |= {value for _, value in attributes}
    assert all(isinstance(v, str | int) for v in seen)
    text = repr(sorted(map(str, seen)))
    forbidden = [*plaintexts, secret.hex(), str(raised.value)]
    forbidden += [k.hex() for k in keys] + [bytes(row.wrapped_key).hex() for row in rows]
    assert not [f for f in forbidden if f in text]
    assert seen >= {"tenant-1", type(raised.value).__name__}
    registry.close()


def test_without_a_meter_provider_opentelemetry_is_not_imported(tmp_path: Any) -> None:
    """A registry without a meter provider, writing and reading, imports no
    OpenTelemetry module and runs the unmetered per-value path; one with a
    provider imports the API."""
    script = f"""
import sys
import sqlalchemy as sa
from sqlalchemy_envelope import EncryptedType, KeyRegistry, StaticRootKey
from sqlalchemy_envelope.keys.envelope import Envelope

engine = sa.create_engine("sqlite:///{tmp_path / "off.db"}")
registry = KeyRegistry(engine, StaticRootKey(bytes(32)))
registry.init()
table = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("v", EncryptedType(sa.String(20))))
table.metadata.create_all(engine)
with engine.begin() as conn:
    conn.execute(table.insert(), {{"id": 1, "v": "x"}})
with engine.connect() as conn:
    assert conn.execute(sa.select(table.c.v)).scalar_one() == "x"
assert type(registry.envelope) is Envelope
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""
    off = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "[]"
    on = subprocess.run(
        [
            sys.executable,
            "-c",
            script.replace(
                "StaticRootKey(bytes(32)))",
                "StaticRootKey(bytes(32)), meter_provider=__import__("
                "'opentelemetry.sdk.metrics').sdk.metrics.MeterProvider())",
            )
            .replace("assert type(registry.envelope) is Envelope", "")
            .replace("off.db", "on.db"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "opentelemetry.metrics" in on.stdout


COUNTERS = ("encrypted.values", "decrypted.values", "key_cache.hits")


class Series:
    """The observable counters, collected again and again: every series of
    each must stay (a cumulative series that vanishes or goes down reads as
    a counter reset to Prometheus and OTLP consumers)."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.reader = reader
        self.last: dict[str, Points] = {name: {} for name in COUNTERS}

    def collect(self) -> dict[str, Points]:
        metrics = collect(self.reader)
        for name in COUNTERS:
            points = metrics.get(P + name, {})
            for attributes, before in self.last[name].items():
                assert points.get(attributes, -1) >= before, (name, dict(attributes))
            self.last[name] = points
        return metrics


def write_and_read(engine: sa.Engine, table: sa.Table, rows: list[tuple[int, str]]) -> None:
    """Insert ``rows`` (id, scope), one statement per scope run twice over
    a Connection, then read them all back twice through a Session."""
    insert = table.insert()
    with engine.begin() as conn:
        for i, scope in rows:
            conn.execute(
                insert,
                {"id": i, "body": f"note {i}", "email": f"u{i}@{scope}.example"},
                execution_options={SCOPE_OPTION: scope},
            )
    select = sa.select(table.c.body, table.c.email).where(table.c.id.in_([i for i, _ in rows]))
    expected = sorted((f"note {i}", f"u{i}@{scope}.example") for i, scope in rows)
    with Session(engine) as session:
        for _ in range(2):
            assert sorted(tuple(r) for r in session.execute(select)) == expected


def test_a_registry_gone_keeps_its_counts(
    db_url: str, tmp_path: Any, reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    """Two registries report to one provider; one is closed and
    garbage-collected, with its engine: what it counted stays counted."""
    series = Series(reader)
    engines = [sa.create_engine(db_url), sa.create_engine(f"sqlite:///{tmp_path}/other.db")]
    registries = [
        KeyRegistry(e, StaticRootKey(os.urandom(32)), meter_provider=provider) for e in engines
    ]
    table = notes_table()
    for i in range(2):
        registries[i].init()
        table.metadata.create_all(engines[i])
    write_and_read(engines[1], table, [(1, "default")])
    write_and_read(engines[0], table, [(1, "default"), (2, "default"), (3, "default")])
    r, d = "randomized", "deterministic"
    counted = {("default", 1, r): 4, ("default", 1, d): 4}
    read = {("default", 1, r): 8, ("default", 1, d): 8}
    metrics = series.collect()
    assert values(metrics[P + "encrypted.values"]) == counted
    assert values(metrics[P + "decrypted.values"]) == read

    registries[1].close()
    engines[1].dispose()
    del registries[1], engines[1]
    gc.collect()
    for _ in range(2):
        metrics = series.collect()
        assert values(metrics[P + "encrypted.values"]) == counted
        assert values(metrics[P + "decrypted.values"]) == read

    write_and_read(engines[0], table, [(4, "default")])
    metrics = series.collect()
    assert values(metrics[P + "encrypted.values"]) == {("default", 1, r): 5, ("default", 1, d): 5}
    assert values(metrics[P + "decrypted.values"]) == {("default", 1, r): 10, ("default", 1, d): 10}
    registries[0].close()


def test_counts_survive_eviction_rotation_refresh_and_the_registry(
    db_url: str,
    root_key: StaticRootKey,
    clocks: Clocks,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
) -> None:
    """Keys evicted from a one-key cache, rotated and refreshed after
    ``cache_max_age``: each series only grows, to exact totals, which stay
    once the registry is closed and garbage-collected."""
    series = Series(reader)
    engine = sa.create_engine(db_url)
    registry = KeyRegistry(
        engine,
        root_key,
        meter_provider=provider,
        clock=clocks.monotonic,
        cache_max_age=60,
        max_cached_keys=1,
    )
    registry.init()
    registry.create_scope("a", "b")
    table = notes_table()
    table.metadata.create_all(engine)

    # Scopes a and b in turn: each value's keys evict the other scope's.
    write_and_read(engine, table, [(1, "a"), (2, "b"), (3, "a"), (4, "b")])
    series.collect()
    registry.rotate("a")
    write_and_read(engine, table, [(5, "a"), (6, "b")])
    series.collect()
    clocks.advance(61)  # every cached key is stale: read again from data_keys
    write_and_read(engine, table, [(7, "a"), (8, "b")])
    metrics = series.collect()
    r, d = "randomized", "deterministic"
    encrypted = {("a", 1, r): 2, ("a", 2, r): 2, ("b", 1, r): 4, ("a", 1, d): 4, ("b", 1, d): 4}
    decrypted = {k: 2 * n for k, n in encrypted.items()}
    assert values(metrics[P + "encrypted.values"]) == encrypted
    assert values(metrics[P + "decrypted.values"]) == decrypted
    hits = by(metrics[P + "key_cache.hits"])[()]

    registry.close()
    engine.dispose()
    del registry, engine
    gc.collect()
    for _ in range(2):
        metrics = series.collect()
        assert values(metrics[P + "encrypted.values"]) == encrypted
        assert values(metrics[P + "decrypted.values"]) == decrypted
        assert by(metrics[P + "key_cache.hits"]) == {(): hits}


def test_a_forked_child_has_a_free_instruments_lock(
    engine: sa.Engine, root_key: StaticRootKey, provider: MeterProvider
) -> None:
    """A fork while a collection holds the instruments' lock (here, this
    thread): the child has a lock of its own, free, to collect and to
    report a new registry with."""
    registry = KeyRegistry(engine, root_key, meter_provider=provider)
    registry.init()
    registry.encrypt(b"x", "t.c")
    instruments = registry.envelope.metrics.instruments
    with instruments.lock:
        pid = os.fork()
        if pid == 0:  # the child: no pytest, an exit status only
            os._exit(1 if instruments.lock.locked() else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    registry.close()
