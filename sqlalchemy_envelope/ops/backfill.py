"""Filling a blind index column for existing rows, on the batch engine.

The index is filled wherever it is NULL and a source is not. Each write is a
compare-and-swap guarded by the index still being NULL and every source still
holding the ciphertext the digest was computed from, so a row the
application wrote meanwhile keeps the index its own write computed (it is
counted as skipped); done rows are never selected again, so a killed
backfill finishes on the next run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..keys.envelope import Envelope
from ..sqla.blind_index import BlindDigest, BlindIndex, as_stored, index_and_sources
from . import batch, census
from .migration_report import MigrationReport
from .shards import Shard

__all__ = ["run"]


def run(
    envelope: Envelope,
    target: Any,
    *,
    batch_size: int = 1000,
    progress: bool | None = None,
    shard: tuple[int, int] | None = None,
) -> MigrationReport:
    conns = envelope.keyring.store
    batch.check_options(batch_size, 1, conns)
    part = Shard.of(shard)
    started = time.perf_counter()
    index, sources = index_and_sources(target)
    index_type = index.type
    assert isinstance(index_type, BlindIndex)
    table = index.table
    assert isinstance(table, sa.Table)
    name = f"{table.name}.{index.name}"
    with conns.connect() as conn:
        census.refuse_keys_table(conn, envelope.keyring.table, table.schema, table.name, name)
    key = envelope.derived_key(index_type.label(), index_type.key_version)
    stored = [as_stored(s) for s in sources]
    count = len(sources)

    def rewrite(
        row_key: tuple[Any, ...], row: Sequence[Any], report: MigrationReport
    ) -> batch.RowWrite:
        plain = tuple(row[:count])
        digest = BlindDigest(index_type.digest(key, plain[0] if count == 1 else plain))
        guards = tuple((s.key, row[count + i]) for i, s in enumerate(sources))
        return batch.RowWrite(row_key, (batch.Change(index.key, digest, None, name),), guards)

    job = batch.TableJob(
        name=table.name,
        table=table,
        primary_key=tuple(table.primary_key.columns),
        selected=(*sources, *stored),
        stored={
            index.key: sa.type_coerce(index, sa.String()),
            **{s.key: raw for s, raw in zip(sources, stored, strict=True)},
        },
        pending=sa.and_(index.is_(None), sa.or_(*(s.is_not(None) for s in sources))),
        rewrite=rewrite,
    )
    report = MigrationReport(columns=[name])
    batch.run(
        conns, [job], report, batch_size=batch_size, shard=part, progress=progress, label="backfill"
    )
    report.elapsed = time.perf_counter() - started
    return report
