"""When a data key should be rotated: by age, and by use.

AES-GCM with random 96-bit nonces is safe for at most 2^32 encryptions under
one key (NIST SP 800-38D, 8.3). Every process claims encryptions from the
key's shared counter in ``data_keys`` in blocks before it uses them, so the
counter is an upper bound of real use across all processes, and the key is
rotated before the counter would pass ``max_encryptions``. The hot path only
compares a local counter with the end of its claimed block.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ..errors import ConfigurationError

__all__ = ["DEFAULT_MAX_ENCRYPTIONS", "RotationPolicy"]

DEFAULT_MAX_ENCRYPTIONS = 2**30
_NIST_LIMIT = 2**32
_MAX_BLOCK = 65_536


@dataclass(frozen=True)
class RotationPolicy:
    """``rotate_after``: rotate once the active key is this old (None: never by
    age). ``max_encryptions``: rotate before this many encryptions."""

    rotate_after: timedelta | None = None
    max_encryptions: int = DEFAULT_MAX_ENCRYPTIONS

    def __post_init__(self) -> None:
        after = self.rotate_after
        if after is not None and (not isinstance(after, timedelta) or after <= timedelta(0)):
            raise ConfigurationError(
                f"rotate_after must be a positive timedelta, e.g. timedelta(days=90), not {after!r}"
            )
        count = self.max_encryptions
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _NIST_LIMIT:
            raise ConfigurationError(
                f"max_encryptions must be a whole number between 1 and 2**32 (NIST's limit "
                f"for random GCM nonces); the default is {DEFAULT_MAX_ENCRYPTIONS:,}"
            )

    @property
    def block(self) -> int:
        """Encryptions a process claims at a time: small against the limit, so
        that claims left unused when a key rotates waste little of it."""
        return max(1, min(_MAX_BLOCK, self.max_encryptions // 64))

    def due_by_age(self, created_at: datetime, now: datetime) -> bool:
        return self.rotate_after is not None and now - created_at >= self.rotate_after

    def reason(self, created_at: datetime, encryptions: int, now: datetime) -> str | None:
        """Why a key with this age and use is due for rotation, or None."""
        if self.due_by_age(created_at, now):
            return f"older than {self.rotate_after}"
        if encryptions + self.block > self.max_encryptions:
            return f"{encryptions:,} of {self.max_encryptions:,} encryptions claimed"
        return None
