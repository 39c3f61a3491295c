"""The rules of a data key's life.

::

    active --rotate/retire--> retired --disable--> disabled --destroy--> destroyed
                                 ^                    |
                                 +------enable--------+
                              retired --destroy--> destroyed

Active keys encrypt and decrypt; retired keys only decrypt; disabled keys
refuse both until enabled again; destroyed keys have lost their wrapped key for
good and stay in data_keys as a tombstone, so their id and version are never
reused. Repeating a transition that already happened is allowed and changes
nothing, so scripts can be re-run.
"""

from __future__ import annotations

from ..errors import KeyStateError
from .storage import KeyState

__all__ = ["ACTIONS", "target_state"]

A, R, D, X = KeyState.ACTIVE, KeyState.RETIRED, KeyState.DISABLED, KeyState.DESTROYED

_ALLOWED: dict[str, dict[KeyState, KeyState]] = {
    "retire": {A: R, R: R},
    "disable": {R: D, D: D},
    "enable": {D: R, R: R},
    "destroy": {R: X, D: X, X: X},
}

_WHY: dict[tuple[str, KeyState], str] = {
    ("disable", A): "it is the active key: rotate() first, so that another key takes over",
    ("destroy", A): "it is the active key: rotate() first, then destroy it once no row needs it",
    ("enable", A): "it is the active key already",
    ("retire", D): "it is disabled, which is past retired: enable() it to make it retired",
    ("retire", X): "it was destroyed; destroyed keys cannot come back",
    ("disable", X): "it was destroyed; destroyed keys cannot come back",
    ("enable", X): "it was destroyed; destroyed keys cannot come back",
}

ACTIONS = tuple(_ALLOWED)


def target_state(action: str, state: KeyState, version: int, scope: str) -> KeyState:
    """The state ``action`` takes a key in ``state`` to, or `KeyStateError`."""
    allowed = _ALLOWED[action]
    if state not in allowed:
        reason = _WHY.get((action, state), f"a {state.value} key cannot be {action}d")
        raise KeyStateError(
            f"cannot {action} data key version {version} of scope {scope!r}: {reason}"
        )
    return allowed[state]
