"""Shards: one job split over many machines, each doing the rows of its shard.

``shard=(K, N)`` (``--shard K/N``) takes the rows whose primary key
hashes to K, counting from 0 as Kubernetes' ``JOB_COMPLETION_INDEX`` does.
The hash is a function of the key alone: over the key's integer columns k1,
k2..., ``h = 0``, then ``h = ((h + k mod P) * 1327217884) mod P`` for each,
with ``P = 2**31 - 1``; the shard is ``h mod N`` (`shard_of`). So every machine
splits a table the same way whenever it starts, also while the application
inserts rows, and a rerun of shard K finds exactly the rows it left. Ranges
of the key would need its current bounds, which move as rows are inserted
(two shards starting at different moments would overlap or leave a gap),
and a plain ``k mod N`` puts every row in one shard when keys stride by N
(``auto_increment_increment``). The price: each shard walks the whole
primary key, skipping other shards' rows; it writes only its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..errors import ConfigurationError

__all__ = ["MAX_SHARDS", "Shard", "shard_of"]

_P = 2_147_483_647  # 2**31 - 1, prime: (h + k mod P) * _A stays below 2**63
_A = 1_327_217_884  # about P / 1.618 (Knuth's multiplicative hashing): spreads keys in
# any arithmetic progression over the shards, where a small multiplier leaves
# small keys striding by N in one shard
MAX_SHARDS = _P  # the hash is below P: a larger N would only add empty shards
_TEXT = re.compile(r"([0-9]+)/([0-9]+)")  # ASCII digits only, nothing around them


def shard_of(key: Sequence[int], count: int) -> int:
    """The shard of ``count`` that holds the row whose primary key has the
    integer columns ``key`` (in key order): what the database computes."""
    h = 0
    for part in key:
        h = (h + part % _P) * _A % _P
    return h % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count <= `MAX_SHARDS`):
    the rows whose primary key hashes to ``index`` (see the module's
    docstring)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        parts = (self.index, self.count)
        if not (all(type(p) is int for p in parts) and 0 <= self.index < self.count <= MAX_SHARDS):
            raise ConfigurationError(f"shard=(K, N) takes {_SHARD_RULE}, not {parts!r}")

    @classmethod
    def of(cls, value: tuple[int, int] | Shard | None) -> Shard | None:
        """A shard from ``(K, N)``, checked; None for the whole table."""
        if value is None or isinstance(value, Shard):
            return value
        if isinstance(value, tuple | list) and len(value) == 2:
            return cls(value[0], value[1])
        raise ConfigurationError(f"shard=(K, N) takes {_SHARD_RULE}, not {value!r}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/N`` in ASCII digits, as ``--shard`` takes it: no sign, space,
        underscore or other script's digits, which int() would accept."""
        found = _TEXT.fullmatch(text)
        if found is not None and len(text) <= 2 * len(str(MAX_SHARDS)) + 1:
            index, count = int(found[1]), int(found[2])
            if index < count <= MAX_SHARDS:
                return cls(index, count)
        raise ConfigurationError(f"a shard is K/N, {_SHARD_RULE}, not {text!r}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def condition(self, key: Sequence[sa.ColumnElement[Any]]) -> sa.ColumnElement[bool]:
        """Rows of this shard, given the primary key's integer columns."""
        prime: sa.ColumnElement[Any] = sa.literal_column(str(_P))
        multiplier: sa.ColumnElement[Any] = sa.literal_column(str(_A))
        h: sa.ColumnElement[Any] | None = None
        for column in key:
            part = (sa.cast(column, sa.BigInteger) % prime + prime) % prime  # SQL's % keeps sign
            h = (part if h is None else h + part) * multiplier % prime
        assert h is not None
        return h % sa.literal_column(str(self.count)) == sa.literal_column(str(self.index))


_SHARD_RULE = (
    "K and N whole numbers with 0 <= K < N (K counts from 0, like Kubernetes' "
    f"JOB_COMPLETION_INDEX), N at most {MAX_SHARDS} (2**31 - 1)"
)
