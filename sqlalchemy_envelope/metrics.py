"""OpenTelemetry metrics of a registry (the ``otel`` extra): what
``KeyRegistry(..., meter_provider=...)`` reports. docs/metrics.md lists them.

Without a meter provider nothing here runs and OpenTelemetry is never
imported. With one, values encrypted and decrypted are counted per key in
`itertools.count` objects (one ``next`` per value, exact across threads),
and reported by observable instruments when the provider collects; everything
else (misses, root key calls, rotations, jobs) is rare enough to be added to
synchronous instruments where it happens. The counts of a registry that is
garbage-collected are kept, added up per attribute set, so that no counter
goes down. No attribute holds a value, a key or a secret: scopes, key
versions, class names and fixed words.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

__all__ = ["Counts", "Metrics", "Tally", "counted"]

NAME = "sqlalchemy_envelope"

# Attributes (docs/metrics.md); ``error.type`` is OpenTelemetry's own.
SCOPE = "sqlalchemy_envelope.scope"
KEY_VERSION = "sqlalchemy_envelope.key.version"
ENCRYPTION = "sqlalchemy_envelope.encryption"  # randomized | deterministic
KEY_KIND = "sqlalchemy_envelope.key.kind"  # data | index
OPERATION = "sqlalchemy_envelope.root_key.operation"  # wrap | unwrap | fingerprint
ROOT_KEY_TYPE = "sqlalchemy_envelope.root_key.type"  # the provider's class name
TRIGGER = "sqlalchemy_envelope.rotation.trigger"  # manual | policy
JOB = "sqlalchemy_envelope.job.name"  # re-encrypt | decrypt | backfill
ERROR_TYPE = "error.type"

# Seconds: an in-process root key takes microseconds, a KMS milliseconds.
_DURATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

Cell = itertools.count
"""A count of values: ``next(cell)`` adds one."""


def counted(cell: itertools.count[int]) -> int:
    """How many values ``cell`` counted (its next number: it starts at 0)."""
    return int(repr(cell)[6:-1])  # "count(N)": the one way to read it without advancing it


class Tally:
    """The values of one key: ``hit``, those served while no key was read
    from data_keys (a cache hit), and ``miss``, the others."""

    __slots__ = ("hit", "miss")

    def __init__(self) -> None:
        self.hit: Cell[int] = itertools.count()
        self.miss: Cell[int] = itertools.count()

    def total(self) -> int:
        return counted(self.hit) + counted(self.miss)


Attributes = tuple[tuple[str, Any], ...]


class Counts:
    """The tallies of one registry's values, by (scope, key version,
    encryption) as attribute pairs. Held apart from `Metrics` so that they
    outlive it: what a registry counted stays counted once it is gone."""

    __slots__ = ("decrypted", "encrypted")

    def __init__(self) -> None:
        self.encrypted: dict[Attributes, Tally] = {}
        self.decrypted: dict[Attributes, Tally] = {}


_Selection = tuple[Callable[[Counts], Iterable[tuple[Attributes, Tally]]], Callable[[Tally], int]]

# What each observable counter adds up: which tallies, and what of each.
_COUNTERS: dict[str, _Selection] = {
    "encrypted.values": (lambda c: list(c.encrypted.items()), Tally.total),
    "decrypted.values": (lambda c: list(c.decrypted.items()), Tally.total),
    "key_cache.hits": (
        lambda c: [((), t) for t in (*list(c.encrypted.values()), *list(c.decrypted.values()))],
        lambda tally: counted(tally.hit),
    ),
}


class Instruments:
    """The instruments of one meter provider, shared by every registry
    reporting to it (a provider keeps the first instrument of each name).
    Observable counters add up, per attribute set, the counts of the
    registries alive and those of the registries gone (``retired``): a
    cumulative counter that went down would read as a reset."""

    def __init__(self, meter_provider: Any) -> None:
        from opentelemetry.metrics import Observation  # the otel extra

        self.observation = Observation
        self.sources: weakref.WeakSet[Metrics] = weakref.WeakSet()
        # A registry's counts move from ``live`` to ``retired`` under the
        # lock, which every collection holds: none sees them twice or not at
        # all. ``gone`` lists those to move: a finalizer only appends to it,
        # as it may run wherever the garbage collector does, a collection too.
        self.lock = threading.Lock()
        self.live: dict[int, Counts] = {}
        self.gone: list[int] = []
        self.retired: dict[str, dict[Attributes, int]] = {name: {} for name in _COUNTERS}
        try:
            version: str | None = metadata.version("sqlalchemy-envelope")
        except metadata.PackageNotFoundError:
            version = None
        meter = meter_provider.get_meter(NAME, version)
        meter.create_observable_counter(
            f"{NAME}.encrypted.values",
            callbacks=[self._observer("encrypted.values")],
            unit="{value}",
            description="Values encrypted, by scope, key version and encryption.",
        )
        meter.create_observable_counter(
            f"{NAME}.decrypted.values",
            callbacks=[self._observer("decrypted.values")],
            unit="{value}",
            description="Values decrypted, by scope, key version and encryption.",
        )
        meter.create_observable_counter(
            f"{NAME}.key_cache.hits",
            callbacks=[self._observer("key_cache.hits")],
            unit="{value}",
            description="Values encrypted or decrypted under a key found in the cache.",
        )
        meter.create_observable_up_down_counter(
            f"{NAME}.key_cache.size",
            callbacks=[self._sizes],
            unit="{key}",
            description="Keys in the cache, by kind.",
        )
        self.misses = meter.create_counter(
            f"{NAME}.key_cache.misses",
            unit="{lookup}",
            description="Keys read from data_keys because the cache held none fresh.",
        )
        self.reads = meter.create_counter(
            f"{NAME}.data_keys.reads",
            unit="{query}",
            description="Reads of the data_keys table.",
        )
        self.errors = meter.create_counter(
            f"{NAME}.decryption.errors",
            unit="{value}",
            description="Values that failed to decrypt, by error type.",
        )
        self.root_key_calls = meter.create_counter(
            f"{NAME}.root_key.operations",
            unit="{operation}",
            description="Calls to the root key (a KMS for AWSKMSRootKey).",
        )
        self.root_key_duration = meter.create_histogram(
            f"{NAME}.root_key.operation.duration",
            unit="s",
            description="How long calls to the root key took.",
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS),
        )
        self.rotations = meter.create_counter(
            f"{NAME}.key.rotations",
            unit="{rotation}",
            description="Data key rotations, by hand or by policy.",
        )
        self.job_rows = meter.create_counter(
            f"{NAME}.job.rows",
            unit="{row}",
            description="Rows a re-encrypt, decrypt or backfill job went through.",
        )
        meter.create_observable_gauge(
            f"{NAME}.job.left_behind",
            callbacks=[self._left],
            unit="{value}",
            description="Values the last run of each job left as they were.",
        )

    def _observer(self, name: str) -> Callable[[Any], Iterator[Any]]:
        """A callback adding up, per attribute set, the counter ``name`` of
        every registry, alive or gone."""
        tallies, count = _COUNTERS[name]
        retired = self.retired[name]

        def observe(options: Any) -> Iterator[Any]:
            with self.lock:
                self._retire_gone()
                totals = dict(retired)
                for counts in self.live.values():
                    for attributes, tally in tallies(counts):
                        totals[attributes] = totals.get(attributes, 0) + count(tally)
            for attributes, total in totals.items():
                yield self.observation(total, dict(attributes))

        return observe

    def add(self, counts: Counts) -> int:
        """Report ``counts`` from now on; the token `retire` takes."""
        with self.lock:
            self._retire_gone()
            token = next(_tokens)
            self.live[token] = counts
            return token

    def retire(self, token: int) -> None:
        """The counts of a registry gone: nothing counts into them any more
        (its closures are gone too). Moved to ``retired`` under the lock."""
        self.gone.append(token)

    def _retire_gone(self) -> None:
        """Fold the counts of the registries gone into ``retired``; under the lock."""
        while self.gone:
            counts = self.live.pop(self.gone.pop())
            for name, (tallies, count) in _COUNTERS.items():
                retired = self.retired[name]
                for attributes, tally in tallies(counts):
                    retired[attributes] = retired.get(attributes, 0) + count(tally)

    def _left(self, options: Any) -> Iterator[Any]:
        totals: dict[str, int] = {}
        for source in list(self.sources):
            for job, values in list(source.left.items()):
                totals[job] = totals.get(job, 0) + values
        for job, values in totals.items():
            yield self.observation(values, {JOB: job})

    def _sizes(self, options: Any) -> Iterator[Any]:
        totals = {"data": 0, "index": 0}
        for source in list(self.sources):
            for kind, size in source.cache_sizes().items():
                totals[kind] += size
        for kind, size in totals.items():
            yield self.observation(size, {KEY_KIND: kind})


_instruments: weakref.WeakKeyDictionary[Any, Instruments] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_tokens = itertools.count()


def _after_fork_in_child() -> None:
    """Locks of the child's own: a thread of the parent's (a collection)
    may have held one at the fork, and no thread of the child would release it."""
    global _lock
    _lock = threading.Lock()
    for instruments in list(_instruments.values()):
        instruments.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _instruments_of(meter_provider: Any) -> Instruments:
    with _lock:
        instruments = _instruments.get(meter_provider)
        if instruments is None:
            instruments = _instruments[meter_provider] = Instruments(meter_provider)
        return instruments


class Metrics:
    """One registry's counts, reported to ``meter_provider`` (an
    OpenTelemetry ``MeterProvider``)."""

    def __init__(self, meter_provider: Any) -> None:
        self.instruments = instruments = _instruments_of(meter_provider)
        self.counts = counts = Counts()
        self.encrypted = counts.encrypted
        self.decrypted = counts.decrypted
        self.cache_sizes: Callable[[], dict[str, int]] = dict
        self.left: dict[str, int] = {}  # by job: what its last run left behind
        self._failures: weakref.WeakSet[BaseException] = weakref.WeakSet()
        instruments.sources.add(self)
        # Its counts stay reported once it is garbage-collected (a closed
        # registry's are still its own until then).
        weakref.finalize(self, instruments.retire, instruments.add(counts)).atexit = False

    @staticmethod
    def _tally(
        tallies: dict[Attributes, Tally], scope: str, version: int, deterministic: bool
    ) -> Tally:
        attributes = (
            (SCOPE, scope),
            (KEY_VERSION, version),
            (ENCRYPTION, "deterministic" if deterministic else "randomized"),
        )
        return tallies.setdefault(attributes, Tally())

    def encrypted_tally(self, scope: str, version: int, deterministic: bool) -> Tally:
        """Where to count values encrypted under one key."""
        return self._tally(self.encrypted, scope, version, deterministic)

    def decrypted_tally(self, scope: str, version: int, deterministic: bool) -> Tally:
        """Where to count values decrypted under one key."""
        return self._tally(self.decrypted, scope, version, deterministic)

    def failed(self, error: BaseException) -> None:
        """Count a value that failed to decrypt, once however many layers
        it is raised through; by its class name (never its message)."""
        if error in self._failures:
            return
        self._failures.add(error)
        self.instruments.errors.add(1, {ERROR_TYPE: type(error).__name__})

    def missed(self, kind: str) -> None:
        self.instruments.misses.add(1, {KEY_KIND: kind})

    def read(self) -> None:
        self.instruments.reads.add(1)

    def root_key_call(
        self, operation: str, provider: str, seconds: float, error: BaseException | None
    ) -> None:
        attributes = {OPERATION: operation, ROOT_KEY_TYPE: provider}
        if error is not None:
            attributes[ERROR_TYPE] = type(error).__name__
        self.instruments.root_key_calls.add(1, attributes)
        self.instruments.root_key_duration.record(seconds, attributes)

    def rotated(self, scope: str, trigger: str) -> None:
        self.instruments.rotations.add(1, {SCOPE: scope, TRIGGER: trigger})

    def job_rows(self, job: str, rows: int) -> None:
        self.instruments.job_rows.add(rows, {JOB: job})

    def job_left(self, job: str, values: int) -> None:
        self.left[job] = values
