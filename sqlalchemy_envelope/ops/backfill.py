"""Filling a blind index column for existing rows, on the batch engine.

The index is filled wherever it is NULL and a source is not (``recompute``:
wherever a source is not NULL, rewriting the digests that differ). Each
row's digest is computed under the index key of the scope its sources'
keys belong to (a tenant's rows under the tenant's index key), so that the
tenant's own lookups find it. Each write is a compare-and-swap guarded by
the index still holding what was read and every source still holding the
ciphertext the digest was computed from, so a row the application wrote
meanwhile keeps the index its own write computed (it is counted as
skipped); done rows are never selected again, so a killed backfill
finishes on the next run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..crypto import format as fmt
from ..errors import NotCiphertextError, UnknownKeyError
from ..keys.envelope import Envelope
from ..keys.scopes import is_index_scope, scope_of_index
from ..sqla.blind_index import BlindDigest, BlindIndex, as_stored, index_and_sources
from . import batch, census
from .migration_report import MIXED_SCOPES, MigrationReport
from .shards import Shard

__all__ = ["run"]


def run(
    envelope: Envelope,
    target: Any,
    *,
    batch_size: int = 1000,
    progress: bool | None = None,
    shard: tuple[int, int] | None = None,
    recompute: bool = False,
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
    label, version = index_type.label(), index_type.key_version
    envelope.derived_key(label, version)  # the registry's own index key, checked up front
    stored = [as_stored(s) for s in sources]
    stored_index = sa.type_coerce(index, sa.String())
    row_scope = _row_scopes(envelope, [getattr(s.type, "storage", "binary") for s in sources])
    count = len(sources)

    def rewrite(
        row_key: tuple[Any, ...], row: Sequence[Any], report: MigrationReport
    ) -> batch.RowWrite | None:
        plain = tuple(row[:count])
        raws = row[count : 2 * count]
        current = row[2 * count]
        scope = row_scope(raws)
        if scope is None:
            report.leave(name, row_key, MIXED_SCOPES, failure=True)
            return None
        key = envelope.derived_key(label, version, scope=scope)
        digest = BlindDigest(index_type.digest(key, plain[0] if count == 1 else plain))
        if digest == current:
            return None
        guards = tuple((s.key, raw) for s, raw in zip(sources, raws, strict=True))
        return batch.RowWrite(row_key, (batch.Change(index.key, digest, current, name),), guards)

    some_source = sa.or_(*(s.is_not(None) for s in sources))
    job = batch.TableJob(
        name=table.name,
        table=table,
        primary_key=tuple(table.primary_key.columns),
        selected=(*sources, *stored, stored_index),
        stored={
            index.key: stored_index,
            **{s.key: raw for s, raw in zip(sources, stored, strict=True)},
        },
        pending=some_source if recompute else sa.and_(index.is_(None), some_source),
        rewrite=rewrite,
    )
    report = MigrationReport(columns=[name])
    batch.run(
        conns, [job], report, batch_size=batch_size, shard=part, progress=progress, label="backfill"
    )
    report.elapsed = time.perf_counter() - started
    return report


def _row_scopes(envelope: Envelope, storages: Sequence[str]) -> Any:
    """A function of a row's stored source values to the scope whose index
    key its digest is computed under: the scope of its sources' keys (of a
    deterministic value's index key, the scope it belongs to), the
    registry's own when no source names a key of data_keys (plaintext), and
    None when its sources name keys of several scopes."""
    owners: dict[int, str | None] = {}

    def owner(key_id: int) -> str | None:
        if key_id not in owners:
            try:
                scope, _ = envelope.keyring.scope_version(key_id)
            except UnknownKeyError:
                owners[key_id] = None
            else:
                owners[key_id] = scope_of_index(scope) if is_index_scope(scope) else scope
        return owners[key_id]

    def row_scope(raws: Sequence[Any]) -> str | None:
        found = set()
        for raw, storage in zip(raws, storages, strict=True):
            if raw is None:
                continue
            try:
                ciphertext = fmt.from_text(raw) if storage == "text" else bytes(raw)
                fmt.check(ciphertext)
            except (NotCiphertextError, TypeError, AttributeError):
                continue  # legacy plaintext
            found.add(owner(fmt.key_id_of(ciphertext)))
        found.discard(None)
        if len(found) > 1:
            return None
        return found.pop() if found else envelope.scope

    return row_scope
