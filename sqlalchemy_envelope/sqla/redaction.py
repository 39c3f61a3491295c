"""Keep plaintext out of SQLAlchemy's logs and error messages.

Rows: with ``echo="debug"`` (or the ``sqlalchemy.engine`` logger at DEBUG)
SQLAlchemy logs every result row after type processing, which for an
encrypted column is the decrypted plaintext. On engines that a registry
serves, row records are rewritten to a placeholder. Statements and their
parameters are logged as sent to the database: ciphertext and digests.

Errors: SQLAlchemy's error for a statement (a ``StatementError``, or a
``DBAPIError`` such as ``IntegrityError``) lists the statement's parameters.
When it fails before reaching the database (another column's type refusing
its value, a missing parameter), those are the values as given: plaintext for
an encrypted column, and for a blind index, whose parameter carries its
sources' values to be hashed. A ``handle_error`` hook on every engine
replaces the values of parameters bound to an encrypted column or blind index
with a marker, in every such error. The compiled statement says which those
are: the others, plain columns' values, stay visible for debugging. A
parameter it cannot place, or a statement it cannot recompile, is redacted.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Dialect, Engine, ExceptionContext
from sqlalchemy.log import InstanceLogger
from sqlalchemy.sql.compiler import Compiled, SQLCompiler
from sqlalchemy.types import TypeDecorator, TypeEngine

from ..keys.connections import INTERNAL_OPTION
from .expressions import EnvelopeColumnType

__all__ = ["redact_errors", "redact_rows"]

_lock = threading.Lock()
_done: set[str] = set()
_watching = False


class _Marker:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_ROW = _Marker("(row redacted by sqlalchemy-envelope: it may hold decrypted values)")
_PARAMETER = _Marker("(redacted by sqlalchemy-envelope)")


class _RowFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # "Row %r", or "[token] Row %r" on a connection with a logging_token.
        if isinstance(record.msg, str) and record.msg.endswith("Row %r"):
            record.args = (_ROW,)
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


# -- parameters in errors ----------------------------------------------------------

# The statement a Connection is executing, as given to it: when its
# parameters fail to process, the error has no compiled statement to read.
_executing: ContextVar[tuple[Connection, Any] | None] = ContextVar(
    "envelope_executing", default=None
)

# Names SQLAlchemy derives from a bind's: an insertmanyvalues batch's rows
# (name__1), an expanding IN's values (name_1, or name_1_2 for tuples).
_BATCHED = re.compile(r"(.+)__\d+")
_EXPANDED = re.compile(r"(.+?)_\d+")


def redact_errors() -> None:
    """Redact parameters of encrypted columns and blind indexes in the errors
    of every engine (idempotent)."""
    global _watching
    with _lock:
        if not _watching:
            event.listen(Engine, "before_execute", _before_execute)
            event.listen(Engine, "after_execute", _after_execute)
            event.listen(Engine, "handle_error", _handle_error)
            _watching = True


def _before_execute(
    conn: Connection, clauseelement: Any, multiparams: Any, params: Any, options: Any
) -> None:
    if not options.get(INTERNAL_OPTION):  # the registry's own, on connections of its own
        _executing.set((conn, clauseelement))


def _after_execute(
    conn: Connection, clauseelement: Any, multiparams: Any, params: Any, options: Any, result: Any
) -> None:
    if not options.get(INTERNAL_OPTION):
        _executing.set(None)


def _handle_error(context: ExceptionContext) -> None:
    error = context.sqlalchemy_exception
    if not isinstance(error, exc.StatementError) or not error.params or error.hide_parameters:
        return
    secret = _secret_names(context, error.params)
    if secret is not None:
        error.params = _redacted(error.params, secret)


def _secret_names(context: ExceptionContext, params: Any) -> Callable[[str], bool] | None:
    """Which parameter names to redact, or None if the statement binds no
    encrypted column or blind index."""
    execution = context.execution_context
    if execution is not None:
        compiled = execution.compiled  # None for driver SQL, which no type processes
    else:  # the statement failed as its parameters were processed
        executing = _executing.get()
        if executing is None or executing[0] is not context.connection:
            return _everything
        statement = executing[1]
        if isinstance(statement, str):
            return None  # driver SQL
        try:
            compiled = _compiled(statement, context.dialect, params)
        except Exception:  # it compiled for the execution; if it does not now, redact all
            return _everything
    if not isinstance(compiled, SQLCompiler):
        return None  # DDL: no parameters
    return _secret_binds(compiled)


def _compiled(statement: Any, dialect: Dialect, params: Any) -> Compiled:
    """The statement compiled as for its execution, for its binds' types: with
    the same parameter names, so with the same INSERT or UPDATE columns."""
    if isinstance(statement, Compiled):
        return statement
    rows = params if isinstance(params, list) else [params]
    keys = sorted(rows[0]) if rows and isinstance(rows[0], Mapping) else []
    compiled: Compiled = statement.compile(
        dialect=dialect, column_keys=keys, for_executemany=len(rows) > 1
    )
    return compiled


def _secret_binds(compiled: SQLCompiler) -> Callable[[str], bool] | None:
    names: dict[str, bool] = {}
    expanding: dict[str, bool] = {}
    escaped = compiled.escaped_bind_names
    for bind, name in compiled.bind_names.items():
        held = _holds_envelope(bind.type)
        for key in (bind.key, name, escaped.get(name, name)):
            names[key] = names.get(key, False) or held
            if bind.expanding:
                expanding[key] = expanding.get(key, False) or held
    if not any(names.values()):
        return None

    def secret(key: str) -> bool:
        if not isinstance(key, str):  # not a name SQLAlchemy bound
            return True
        found = names.get(key)
        if found is None and (batched := _BATCHED.fullmatch(key)):
            found = names.get(batched.group(1))
        while found is None and (expanded := _EXPANDED.fullmatch(key)):
            key = expanded.group(1)  # name_1_2, then name_1
            found = expanding.get(key)
        return True if found is None else found

    return secret


def _holds_envelope(type_: TypeEngine[Any]) -> bool:
    """Whether values of this type are an encrypted column's or a blind
    index's, also inside a tuple, an array, or a type decorating one."""
    if isinstance(type_, EnvelopeColumnType):
        return True
    inner: list[Any] = list(getattr(type_, "types", ()))
    item_type = getattr(type_, "item_type", None)
    if item_type is not None:
        inner.append(item_type)
    if isinstance(type_, TypeDecorator):
        inner.append(type_.impl_instance)
    inner.extend(type_._variant_mapping.values())  # with_variant(): per dialect
    return any(isinstance(t, TypeEngine) and _holds_envelope(t) for t in inner)


def _everything(key: str) -> bool:
    return True


def _redacted(params: Any, secret: Callable[[str], bool]) -> Any:
    """A copy of the parameters with the secret ones' values replaced. Sets of
    positional values are the DBAPI's, as sent: ciphertext and digests."""
    if isinstance(params, Mapping):
        return {key: _PARAMETER if secret(key) else value for key, value in params.items()}
    if isinstance(params, list) and all(isinstance(row, Mapping) for row in params):
        return [_redacted(row, secret) for row in params]
    return params
