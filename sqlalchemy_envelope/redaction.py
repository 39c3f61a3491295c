"""Keep decrypted values out of SQLAlchemy's debug log.

With ``echo="debug"`` (or the ``sqlalchemy.engine`` logger at DEBUG) SQLAlchemy
logs every result row after type processing, which for an encrypted column is
the decrypted plaintext. On engines that a registry serves, row records are
rewritten to a placeholder; statements and parameters (which hold ciphertext)
are logged as before.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Engine
from sqlalchemy.log import InstanceLogger

__all__ = ["redact_rows"]

_lock = threading.Lock()
_done: set[str] = set()


class _Redacted:
    def __repr__(self) -> str:
        return "(row redacted by sqlalchemy-envelope: it may hold decrypted values)"


_PLACEHOLDER = _Redacted()


class _RowFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Row %r":
            record.args = (_PLACEHOLDER,)
        return True


def redact_rows(engine: Engine) -> None:
    # With an echo flag, engine.logger is SQLAlchemy's InstanceLogger wrapper.
    logger = engine.logger
    name = logger.logger.name if isinstance(logger, InstanceLogger) else logger.name
    with _lock:
        if name in _done:
            return
        logging.getLogger(name).addFilter(_RowFilter())
        _done.add(name)
