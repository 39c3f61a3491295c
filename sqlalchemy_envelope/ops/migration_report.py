"""What a batch job reports: the counts, and each value it left as it was
with the reason, in words for people (`explain`) and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .report import Report, plain_fields

__all__ = [
    "LISTED_PER_COLUMN",
    "NOT_STORED",
    "OTHER_FORMAT",
    "UNKNOWN_DEFINITION",
    "LeftRow",
    "MigrationReport",
    "explain",
]

LISTED_PER_COLUMN = 100  # rows left behind that a report names, per column
NOT_STORED = "NotStoredExactly"  # the reason for a value the database changed on writing
UNKNOWN_DEFINITION = "UnknownDefinition"  # fails authentication, and the job has no definition
OTHER_FORMAT = "OtherFormat"  # deterministic where the definition says randomized, or the reverse
MIXED_SCOPES = "MixedScopes"  # a blind index's sources under keys of several scopes

_REASONS = {
    "plaintext": (
        "legacy plaintext in a column not being converted (encrypt_plaintext=True, "
        "--encrypt-plaintext, or migrating=True)"
    ),
    "DecryptionError": (
        "fails authentication under a data key of this registry with the column's "
        "definition: altered, or written with other options (a context, bind_scope) "
        "than the column declares now"
    ),
    UNKNOWN_DEFINITION: (
        "does not decrypt with the default options (context TABLE.COLUMN, no bind_scope), "
        "and the column's definition is unknown (no model loaded defines it): pass "
        "--models your.models (or the Column/ORM attribute to the API; in a migration, "
        "import the models in env.py)"
    ),
    OTHER_FORMAT: (
        "the value is deterministic (or randomized) but the column's definition says "
        "otherwise: check that the models are this database's, or convert the column "
        "explicitly (through a new column); a job never changes a value's format"
    ),
    "UnknownKeyError": (
        "names a data key that data_keys does not hold: another database's "
        "ciphertext, or legacy plaintext that looks like ciphertext"
    ),
    "KeyDisabledError": "its data key is disabled: enable the key, then run the job again",
    "LegacyDecryptionError": (
        "a value written by sqlalchemy-utils that does not read with the key, engine and "
        "padding of the column's migrating= type (altered, or under another key)"
    ),
    "InvalidValueError": (
        "a legacy value the column's type cannot hold (longer than its String(n), or "
        "another Python type): declare the type the values have"
    ),
    "DestroyedKeyError": "its data key was destroyed: the value is unreadable for good",
    NOT_STORED: (
        "the database stored another value than the one written (a column too narrow for "
        "it, or one that changes text, such as CHAR dropping trailing spaces): the value "
        "was put back as it was; give the column a type that holds it, then run the job again"
    ),
    MIXED_SCOPES: (
        "the blind index's sources are under keys of several scopes (tenants), so no "
        "scope's index key is the row's: write the row's sources again in one scope"
    ),
    "NotText": (
        "its plaintext is not text (not UTF-8, or holds NUL): the column holds another "
        "type than strings, which cannot be written back in place; use a new column"
    ),
}


def explain(reason: str) -> str:
    """Why a value was left behind, and what to do, for people."""
    return _REASONS.get(reason, "does not decrypt")


def _key_part(value: Any) -> Any:
    """A primary-key part as JSON: itself if JSON has its type, else its text
    (what ``--plaintext-row`` compares against)."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


@dataclass(frozen=True)
class LeftRow(Report):
    """One value left as it was: its column, its row's primary key (in key
    column order) and why (``explain(reason)`` says it in words)."""

    column: str
    primary_key: tuple[Any, ...]
    reason: str

    def key_text(self) -> str:
        """The key as ``--plaintext-row`` takes it: the value for a one-column
        key, else a JSON array."""
        if len(self.primary_key) == 1 and not str(self.primary_key[0]).startswith("["):
            return str(self.primary_key[0])
        return json.dumps([_key_part(v) for v in self.primary_key])

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "primary_key": [_key_part(v) for v in self.primary_key]}


@dataclass
class MigrationReport(Report):
    """What a batch job did: re-encrypt, decrypt in place, or backfill.

    ``values_by_version`` counts values moved off each old key version;
    ``plaintext_encrypted`` counts legacy plaintext values encrypted;
    ``values_decrypted`` values written back as plaintext; all three count
    only writes whose compare-and-swap applied. ``skipped`` counts rows the
    application changed between read and write (they are retried);
    ``left_behind`` counts values still not under the target key at the end:
    plaintext in a column not being converted, values that do not decrypt, or
    values the database stored otherwise than written (``failures`` counts
    those by error type, or ``NotStoredExactly``); ``left_rows`` names the first
    ``LISTED_PER_COLUMN`` of them per column, with the reason.
    ``other_scopes`` counts values under other scopes' keys, which a job of
    one scope leaves alone (they are other tenants' business). ``shard`` is
    the ``(K, N)`` the job covered, or None for whole tables.
    """

    columns: list[str] = field(default_factory=list)
    rows_scanned: int = 0
    rows_updated: int = 0
    values_by_version: dict[int, int] = field(default_factory=dict)
    plaintext_encrypted: int = 0
    values_decrypted: int = 0
    skipped: int = 0
    left_behind: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    left_rows: list[LeftRow] = field(default_factory=list)
    other_scopes: int = 0
    elapsed: float = 0.0
    shard: tuple[int, int] | None = None
    _listed: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _reasons: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def rows_per_second(self) -> float:
        return self.rows_scanned / self.elapsed if self.elapsed > 0 else 0.0

    def leave(self, column: str, key: tuple[Any, ...], reason: str, failure: bool) -> None:
        """Count a value left as it was, and name its row while the column
        has fewer than ``LISTED_PER_COLUMN`` named."""
        self.left_behind += 1
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        if failure:
            self.failures[reason] = self.failures.get(reason, 0) + 1
        self._name(LeftRow(column, key, reason))

    def left_by_reason(self) -> dict[str, int]:
        """Every value left behind, by reason: ``failures`` and the values
        left without failing (plaintext in a column not being converted),
        adding up to ``left_behind``."""
        return dict(sorted(self._reasons.items(), key=lambda item: item[0].casefold()))

    def _name(self, row: LeftRow) -> None:
        listed = self._listed.get(row.column, 0)
        if listed < LISTED_PER_COLUMN:
            self._listed[row.column] = listed + 1
            self.left_rows.append(row)

    def merge(self, other: MigrationReport) -> None:
        self.rows_scanned += other.rows_scanned
        self.rows_updated += other.rows_updated
        self.plaintext_encrypted += other.plaintext_encrypted
        self.values_decrypted += other.values_decrypted
        self.skipped += other.skipped
        self.left_behind += other.left_behind
        self.other_scopes += other.other_scopes
        for version, n in other.values_by_version.items():
            self.values_by_version[version] = self.values_by_version.get(version, 0) + n
        for reason, n in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        for reason, n in other.left_by_reason().items():
            self._reasons[reason] = self._reasons.get(reason, 0) + n
        for row in other.left_rows:
            self._name(row)

    def left_lines(self, limit: int | None = None) -> list[str]:
        """The rows left behind, one line each as ``table.column=KEY: reason``
        (at most ``limit``), then what each reason means."""
        rows = self.left_rows[:limit]
        lines = [f"{r.column}={r.key_text()}: {r.reason}" for r in rows]
        if len(rows) < self.left_behind:
            lines.append(f"... and {self.left_behind - len(rows):,} more")
        lines += [f"{reason}: {explain(reason)}" for reason in sorted({r.reason for r in rows})]
        return lines

    def forget_left(self) -> None:
        """A new pass examines every value still to do: what an earlier pass
        left behind is counted again by this one, not twice."""
        self.left_behind = self.other_scopes = 0
        self.failures = {}
        self.left_rows = []
        self._listed = {}
        self._reasons = {}

    def to_dict(self) -> dict[str, Any]:
        return plain_fields(
            {
                "columns": self.columns,
                "shard": None
                if self.shard is None
                else {"index": self.shard[0], "count": self.shard[1]},
                "rows_scanned": self.rows_scanned,
                "rows_updated": self.rows_updated,
                "values_by_version": self.values_by_version,
                "plaintext_encrypted": self.plaintext_encrypted,
                "values_decrypted": self.values_decrypted,
                "skipped": self.skipped,
                "left_behind": self.left_behind,
                "failures": self.failures,
                "left_rows": self.left_rows,
                "other_scopes": self.other_scopes,
                "elapsed_seconds": round(self.elapsed, 3),
                "rows_per_second": round(self.rows_per_second, 1),
            }
        )
