"""MySQL and MariaDB must run in strict mode under encrypted columns.

Without ``STRICT_TRANS_TABLES`` or ``STRICT_ALL_TABLES`` in the session's
``sql_mode``, the server cuts a value that is too long for its column down to
size with only a warning: a ciphertext cut short can never be decrypted, and a
scope name cut short names another tenant. The registry therefore checks every
connection its engine opens, and refuses non-strict ones unless told that the
application accepts the risk.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigurationError
from ..keys.storage import MYSQL_DIALECTS

__all__ = ["ALLOW_VARIABLE", "allowed_by", "check_connection", "require_strict_mode"]

log = logging.getLogger("sqlalchemy_envelope")

_STRICT = frozenset({"STRICT_TRANS_TABLES", "STRICT_ALL_TABLES"})

ALLOW_VARIABLE = "ENVELOPE_ALLOW_NON_STRICT_MYSQL"
"""``allow_non_strict_mysql`` for registries made from the environment: the
command line's and the Alembic operations'."""


def _is_strict(dbapi_connection: Any) -> bool:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT @@SESSION.sql_mode")
        row = cursor.fetchone()
    finally:
        cursor.close()
    modes = {mode.strip().upper() for mode in str(row[0] if row else "").split(",")}
    return bool(modes & _STRICT)


def _refuse(dbapi_connection: Any, record: Any) -> None:
    if not _is_strict(dbapi_connection):
        raise ConfigurationError(
            "this MySQL/MariaDB connection's sql_mode is not strict (no STRICT_TRANS_TABLES "
            "or STRICT_ALL_TABLES): the server would truncate an over-long value with only "
            "a warning, and a truncated ciphertext is lost for good. Add STRICT_TRANS_TABLES "
            "to the server's sql_mode or to the connection's (create_engine(..., "
            "connect_args={'init_command': \"SET SESSION sql_mode=CONCAT(@@sql_mode, "
            "',STRICT_TRANS_TABLES')\"})), or pass allow_non_strict_mysql=True to the "
            f"registry ({ALLOW_VARIABLE}=1 for the command line and the Alembic operations) "
            "to accept the risk"
        )


def _warn(dbapi_connection: Any, record: Any) -> None:
    if not _is_strict(dbapi_connection):
        log.warning(
            "MySQL/MariaDB connection without a strict sql_mode (allowed by "
            "allow_non_strict_mysql=True): over-long values are truncated with only a warning"
        )


def require_strict_mode(engine: Engine, *, allow: bool) -> None:
    """Check every new connection of ``engine`` (and of pools recreated from
    it, such as the registry's own) for a strict ``sql_mode``: refuse it, or
    with ``allow`` log a warning. Nothing to do on other databases."""
    if engine.dialect.name not in MYSQL_DIALECTS:
        return
    check = _warn if allow else _refuse
    other = _refuse if allow else _warn
    if event.contains(engine.pool, "connect", other):
        event.remove(engine.pool, "connect", other)
    if not event.contains(engine.pool, "connect", check):
        event.listen(engine.pool, "connect", check)


def check_connection(connection: Connection, *, allow: bool) -> None:
    """Check a connection opened before the registry existed, which the
    connect event never saw: one a registry is pinned to, such as a
    migration's."""
    if connection.dialect.name in MYSQL_DIALECTS:
        check = _warn if allow else _refuse
        check(connection.connection.dbapi_connection, None)


def allowed_by(environ: Mapping[str, str]) -> bool:
    """``allow_non_strict_mysql`` as the environment sets it."""
    text = environ.get(ALLOW_VARIABLE, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"{ALLOW_VARIABLE} must be 1 or 0, not {text!r}")
