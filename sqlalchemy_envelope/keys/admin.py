"""Changing keys on purpose: creating the table and first keys, rotating,
tenants, state changes, shredding, and re-wrapping under a new root key.
Every change is one transaction, takes the lock of `KeyWrapper.hold` and
proves the root key first, and records its events (events.py) in it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.engine import Connection

from ..errors import (
    ConfigurationError,
    DecryptionError,
    KeyInUseError,
    NoActiveKeyError,
    UnknownKeyError,
    WrongRootKeyError,
)
from . import lifecycle, storage
from .cache import DataKey
from .events import KeyEvent
from .keyring import Keyring
from .rootkey import RootKeyProvider
from .scopes import check_scope, index_scope, is_index_scope
from .storage import KeyRow, KeyState
from .wrapper import KeyWrapper

__all__ = ["KeyAdmin"]

log = logging.getLogger("sqlalchemy_envelope")


class KeyAdmin:
    """Key administration for one keyring; returns the rows it leaves behind."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self.store = keyring.store
        self.wrapper = keyring.wrapper
        self.table = keyring.table
        self.events = keyring.events

    def init(self, reason: str | None = None) -> KeyRow:
        """Create ``data_keys`` and its events table if missing, the chain's
        anchor if it has none, and the scope's first data key if none is
        active; prove the root key. Safe to call from many processes. A
        shredded scope is not brought back (`ShreddedScopeError`)."""
        keyring = self.keyring
        keyring.check_open()
        self.store.create_table(self.table)
        self.store.create_table(self.events.table)
        scope = keyring.scope

        def complete(conn: Connection) -> KeyRow | None:
            """The scope's active key, if it, its index key and the anchor exist."""
            row = storage.active_key(conn, self.table, scope)
            index = storage.key_by_version(conn, self.table, index_scope(scope), 1)
            if row is None or index is None or not self.events.started(conn):
                return None
            self.wrapper.check(conn)  # the active key's unwrapping proves the rest
            return row

        def work(conn: Connection) -> tuple[KeyRow | None, DataKey | None]:
            self.wrapper.hold(conn)
            self.events.ready(conn)
            row = storage.active_key(conn, self.table, scope)
            new = None
            if row is None:
                keyring.refuse_shredded(conn, scope)
                version = storage.next_version(conn, self.table, scope)
                new = keyring.insert_active(conn, scope, version)
                keyring.record_created(conn, "init", scope, version, reason)
            if storage.key_by_version(conn, self.table, index_scope(scope), 1) is None:
                keyring.insert_index(conn, index_scope(scope), 1)
                keyring.record_created(conn, "init", index_scope(scope), 1, reason)
            return row, new

        row: KeyRow | None = self.store.read(complete)
        new = None
        if row is None:
            row, new = self.store.write(work)
        if new is not None:
            keyring.cache.put(new)
            log.info("created data key version %d in scope %r", new.version, scope)
            return self.row(scope, new.version)
        assert row is not None
        # Read again as every use of an active key is: a retired key made
        # active again is refused here too, not only by a running process.
        checked = keyring.active_row(scope)
        if checked is None:  # shredded or disabled meanwhile
            raise NoActiveKeyError(scope)
        keyring.remember(checked[0], None, checked[1])
        return checked[0]

    def start_events(self, reason: str | None = None) -> KeyEvent:
        """Start the key events on purpose over the keys that exist (a
        database of an earlier version, once its events table exists), in
        one transaction holding the lock of key changes; refused once started."""
        self.keyring.check_open()
        self.store.create_table(self.events.table)

        def work(conn: Connection) -> KeyEvent:
            self.wrapper.hold(conn)
            return self.events.start(conn, reason)

        return self.store.write(work)

    def rotate(self, scope: str, reason: str | None = None) -> KeyRow:
        """Make a new data key active in one transaction; the old one is
        retired (still decrypts). Concurrent rotations each commit in turn."""
        self.keyring.check_open()
        operation = "rotate_index" if is_index_scope(scope) else "rotate"
        new = self.store.write(
            lambda conn: self.keyring.rotate_in(
                conn, scope, expected_id=None, operation=operation, reason=reason
            )
        )
        assert new is not None
        self.keyring.adopt(new)
        self.keyring.cache.rotated(scope, "manual")
        log.info("rotated scope %r to data key version %d", scope, new.version)
        return self.row(scope, new.version)

    def rotate_if(
        self, scope: str, expected_id: int, *, operation: str, reason: str | None = None
    ) -> KeyRow | None:
        """Rotate unless the active key is no longer ``expected_id``; a
        "rotate_by_policy" operation counts as a policy rotation in metrics."""
        new = self.store.write(
            lambda conn: self.keyring.rotate_in(
                conn, scope, expected_id=expected_id, operation=operation, reason=reason
            )
        )
        if new is None:
            return None
        self.keyring.adopt(new)
        self.keyring.cache.rotated(scope, "policy" if operation == "rotate_by_policy" else "manual")
        return self.row(scope, new.version)

    def create_scopes(self, names: list[str], reason: str | None = None) -> list[KeyRow]:
        """Give each scope what it lacks of an active data key and its index
        key, in one transaction; a shredded scope comes back with new ones."""
        names = [check_scope(s) for s in names]

        def work(conn: Connection) -> None:
            self.wrapper.hold(conn)
            for name in names:
                self.keyring.create_keys(
                    conn, name, operation="create_scope", revive=True, reason=reason
                )

        self.store.write(work)

        def active_rows(conn: Connection) -> list[KeyRow | None]:
            return [storage.active_key(conn, self.table, name) for name in names]

        return [row for row in self.store.read(active_rows) if row is not None]

    def shred(
        self, scope: str, *, including_shared_index: bool = False, reason: str | None = None
    ) -> int:
        """Destroy every key of a scope and its index keys, in one transaction;
        the number of keys destroyed. The registry's own scope, while other
        scopes live, takes ``including_shared_index`` (`_refuse_shared_index`)."""
        scope = check_scope(scope)

        def work(conn: Connection) -> int:
            self.wrapper.hold(conn)
            now = self.keyring.now()
            count = 0
            if not storage.all_keys(conn, self.table, scope):
                raise ConfigurationError(
                    f"scope {scope!r} has no keys: nothing to shred (check the scope's name)"
                )
            if not including_shared_index:
                self._refuse_shared_index(conn, scope)
            for name in (scope, index_scope(scope)):
                destroyed = []
                for row in storage.all_keys(conn, self.table, name):
                    if row.state is not KeyState.DESTROYED:
                        storage.set_state(conn, self.table, row.id, KeyState.DESTROYED, now)
                        destroyed.append(row.version)
                if destroyed:
                    self.events.append(
                        conn,
                        "shred",
                        scope=name,
                        versions=destroyed,
                        outcome="destroyed",
                        reason=reason,
                    )
                count += len(destroyed)
            return count

        count = self.store.write(work)
        self.keyring.forget_scope(scope)
        log.warning("shredded scope %r: %d keys destroyed", scope, count)
        return count

    def _refuse_shared_index(self, conn: Connection, scope: str) -> None:
        """Refuse shredding this registry's own scope while other scopes live.
        Each scope has an index key of its own now, but before it did, every
        tenant written through this registry used the index key of the
        registry's own scope: their deterministic values and blind indexes
        may still be under it until they are moved to their own (digests
        carry no key id: no count can tell)."""
        if scope != self.keyring.scope:
            return
        others = [
            name
            for name in storage.active_scopes(conn, self.table)
            if name != scope and not is_index_scope(name)
        ]
        if others:
            named = ", ".join(repr(name) for name in others[:5])
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            raise ConfigurationError(
                f"scope {scope!r} is this registry's own scope, and other scopes still have "
                f"keys ({named}{more}): its index key {index_scope(scope)!r} is also the one "
                "tenants written through this registry used before they had index keys of "
                "their own, so shredding it destroys any of their deterministic values and "
                "blind indexes not yet moved to their own (see docs/tenants.md). Pass "
                "including_shared_index=True (sqlalchemy-envelope shred "
                "--including-shared-index) to shred it anyway"
            )

    def retire(self, scope: str, version: int, reason: str | None = None) -> KeyRow:
        """Retire a key (it still decrypts). Retiring the active key rotates,
        so that a successor takes over in the same transaction."""
        row = self.row(scope, version)
        if row.state is not KeyState.ACTIVE:
            return self.transition("retire", scope, version, reason=reason)
        self.rotate_if(scope, row.id, operation="retire", reason=reason)
        return self.row(scope, version)

    def disable(
        self, scope: str, version: int, *, force: bool, reason: str | None = None
    ) -> KeyRow:
        """Disable a retired key. An index key only with ``force``: while it is
        disabled every blind index and deterministic value made with it
        fails, and no census can tell which rows those are."""
        if is_index_scope(scope) and not force:
            row = self.row(scope, version)
            if lifecycle.target_state("disable", row.state, version, scope) is not row.state:
                raise KeyInUseError(version, scope, {}, index_key=True, action="disable")
        return self.transition("disable", scope, version, reason=reason)

    def transition(
        self,
        action: str,
        scope: str,
        version: int,
        *,
        reason: str | None = None,
        operation: str | None = None,
        guard: Callable[[Connection], None] | None = None,
    ) -> KeyRow:
        """Apply a lifecycle action (retire, disable, enable, destroy) to a
        key, recorded as an event of ``operation`` (the action's name by
        default) if it changes the key's state; ``guard`` runs first in its
        transaction and takes the lock itself (the destroy guard's census,
        whose refusal of a held lock names what to wait for)."""

        def work(conn: Connection) -> KeyRow:
            if guard is not None:
                guard(conn)
            self.wrapper.hold(conn)
            row = storage.key_by_version(conn, self.table, scope, version, for_update=True)
            if row is None:
                raise UnknownKeyError(scope=scope, version=version)
            target = lifecycle.target_state(action, row.state, version, scope)
            if target is not row.state:
                storage.set_state(conn, self.table, row.id, target, self.keyring.now())
                self.events.append(
                    conn,
                    operation or action,
                    scope=scope,
                    versions=[version],
                    outcome=f"{row.state.value}->{target.value}",
                    reason=reason,
                )
            return row

        before = self.store.write(work)
        after = self.row(scope, version)
        if after.state is not before.state:
            log.info(
                "data key version %d of scope %r: %s -> %s",
                version,
                scope,
                before.state.value,
                after.state.value,
            )
        self.keyring.refresh(after)
        return after

    def rewrap(self, new_root_key: RootKeyProvider, reason: str | None = None) -> int:
        """Re-wrap every data key under ``new_root_key`` in one transaction (all
        or nothing), without touching any value; the number re-wrapped. It
        holds the lock every key insert takes (`KeyWrapper.hold`) from its
        first statement to its commit: no key can be inserted under the old
        root key meanwhile, nor go unseen. Keys already under the new root
        key stay as they are, so that a rewrap can be run again to finish one
        that left keys behind, unless they were wrapped before version 2 of
        the wrap context: every key ends under version 2. So a rewrap to the
        root key in use binds the versions of keys wrapped by earlier
        releases, and changes nothing else."""
        self.keyring.check_open()
        if not isinstance(new_root_key, RootKeyProvider):
            raise ConfigurationError("rewrap() needs a RootKeyProvider")
        new_fingerprint = new_root_key.fingerprint

        def work(conn: Connection) -> int:
            storage.lock_table(conn, self.table)
            fingerprints = (self.wrapper.fingerprint, new_fingerprint)
            counts = storage.keys_by_fingerprint(conn, self.table)
            foreign = [name for name in counts if name not in fingerprints]
            if foreign:
                raise self.wrapper.wrong_root_key(foreign[0], counts)
            count = 0
            for row in storage.all_keys(conn, self.table):
                context = self.wrapper.context(row.id, row.scope, row.version)
                wrapped = None
                if row.wrapped_key is not None and row.root_key_fingerprint == new_fingerprint:
                    plaintext = self._legacy_plaintext(new_root_key, row)
                    if plaintext is None:  # under the new root key, wrap context 2
                        continue
                    wrapped = self.wrapper.wrap_with(new_root_key, plaintext, context)
                elif row.wrapped_key is not None:
                    plaintext = self.wrapper.unwrap(row)
                    wrapped = self.wrapper.wrap_with(new_root_key, plaintext, context)
                if wrapped is not None:
                    if self.wrapper.unwrap_with(new_root_key, wrapped, context) != plaintext:
                        raise WrongRootKeyError("the new root key does not unwrap what it wrapped")
                    count += 1
                storage.rewrap(
                    conn,
                    self.table,
                    row.id,
                    wrapped_key=wrapped,
                    root_key_fingerprint=new_fingerprint,
                    root_key_description=new_root_key.description,
                )
            self.events.append(
                conn,
                "rewrap",
                scope=None,
                versions=None,
                outcome=f"re-wrapped {count} keys under root key {new_fingerprint}",
                reason=reason,
                also=new_root_key,
            )
            self.events.re_anchor(conn, new_root_key, reason)
            return count

        count = self.store.write(work)
        with self.keyring.lock:
            self.wrapper.replace(new_root_key, new_fingerprint)
        log.info("re-wrapped %d data keys under root key %s", count, new_fingerprint)
        return count

    def _legacy_plaintext(self, root_key: RootKeyProvider, row: KeyRow) -> bytes | None:
        """The key of a row already under ``root_key`` if it was wrapped before
        version 2 of the wrap context (None if it was not); a key that
        unwraps under neither refuses the root key."""
        assert row.wrapped_key is not None
        try:
            self.wrapper.unwrap_with(
                root_key, row.wrapped_key, KeyWrapper.context(row.id, row.scope, row.version)
            )
            return None
        except DecryptionError:
            pass
        try:
            return self.wrapper.unwrap_with(
                root_key, row.wrapped_key, KeyWrapper.legacy_context(row.id, row.scope)
            )
        except DecryptionError:
            pass
        raise WrongRootKeyError(
            f"a data key stored under the new root key's fingerprint "
            f"({root_key.fingerprint}) does not unwrap with it: this is another key under "
            "the same fingerprint (check the new root key's configuration). Nothing was "
            "written."
        )

    def row(self, scope: str, version: int) -> KeyRow:
        row = self.store.read(lambda conn: storage.key_by_version(conn, self.table, scope, version))
        if row is None:
            raise UnknownKeyError(scope=scope, version=version)
        return row
