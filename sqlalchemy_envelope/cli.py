"""The ``sqlalchemy-envelope`` command (also ``python -m sqlalchemy_envelope``).

The database URL comes from ``--url`` or ``DATABASE_URL``; the root key from
the ``ENVELOPE_*`` variables (``ENVELOPE_NEW_*`` for ``rewrap``). It works by
reflection; ``--models`` (``ENVELOPE_MODELS``, or the ``sqlalchemy_envelope.models``
entry points) imports the application's models, which give the columns named
TABLE.COLUMN their definitions (context, deterministic, bind_scope...). Output
is for people by default and JSON with ``--json``; nothing secret is ever
printed. The global options go before or after the command, with one meaning:
given twice with different values, they are a usage error.

Every failure is one line on stderr saying what to do, and an exit code of its
class (``EXIT_CODES``, docs/cli.md); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import io
import json
import logging
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, quote_plus, unquote

try:
    import click
    from click.core import ParameterSource
except ImportError:  # pragma: no cover - exercised only without the extra
    sys.exit(
        "the sqlalchemy-envelope command needs its extra: pip install 'sqlalchemy-envelope[cli]'"
    )

import sqlalchemy as sa

from .errors import (
    ConfigurationError,
    ConnectionLostError,
    EnvelopeError,
    KeyInUseError,
    KeyStateError,
    RootKeyUnavailableError,
    StatementFailedError,
    UnknownKeyError,
    ValuesLeftBehindError,
    database_reason,
)
from .keys import storage
from .keys.events import KeyEvent
from .keys.rootkey import root_key_from_env
from .keys.scopes import check_key_scope, is_index_scope, scope_of_index
from .ops.census import ColumnCensus
from .ops.migrate import MigrationReport
from .ops.shards import Shard
from .ops.status import KeyInfo, RegistryStatus
from .registry import DEFAULT_SCOPE, KeyRegistry

__all__ = ["EXIT_CODES", "main"]

EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_LEFT_BEHIND, EXIT_UNREACHABLE = 1, 2, 3, 4, 5
EXIT_DATABASE, EXIT_DECLINED, EXIT_ROOT_KEY_UNAVAILABLE = 6, 7, 8
EXIT_INTERNAL, EXIT_INTERRUPTED = 70, 130

# The exit codes, one per class of outcome (docs/cli.md details them); stable:
# scripts test them.
EXIT_CODES: dict[int, str] = {
    0: "done",
    EXIT_ERROR: "the library refused (wrong root key, tampered key row, undecryptable value)",
    EXIT_USAGE: "bad usage or configuration (options, URL, driver, names, versions, files)",
    EXIT_REFUSED: "refused by a safety guard (illegal key transition, key still in use)",
    EXIT_LEFT_BEHIND: "a job finished with values left behind (its report says which, why)",
    EXIT_UNREACHABLE: "the database could not be reached, or the connection was lost",
    EXIT_DATABASE: "the database refused a statement (constraint, trigger, lock conflict)",
    EXIT_DECLINED: "a confirmation was declined or not answered: nothing was done",
    EXIT_ROOT_KEY_UNAVAILABLE: "the root key's service (KMS) is unavailable: retry later",
    EXIT_INTERNAL: "an unexpected error (a bug): run again with --debug and report it",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class _Unreachable(Exception):
    """The database refused or failed the connection; the text names the
    driver's cause, without the URL's password."""


def _fail(line: str, exit_code: int, cause: BaseException | None = None) -> NoReturn:
    """End the command as every failure does: one line on stderr and the exit
    code of its class; with ``--debug`` (``cause`` given), the traceback first."""
    if cause is not None:
        traceback.print_exception(cause, file=sys.stderr)
    click.echo(line, err=True)
    raise click.exceptions.Exit(exit_code)


MODELS_ENTRY_POINTS = "sqlalchemy_envelope.models"


@dataclass(frozen=True)
class _Global:
    """An option every command takes, before or after its name."""

    name: str
    help: str
    type: type[str] | type[float] = str
    repeatable: bool = False
    flag: bool = False
    metavar: str | None = None

    @property
    def opt(self) -> str:
        return "--" + self.name.replace("_", "-")

    def option(self) -> click.Option:
        """The option, for the group and for each command: it records the
        values given on the command line (``_given``) rather than passing them."""
        settings: dict[str, Any] = (
            {"is_flag": True} if self.flag else {"multiple": True, "type": self.type}
        )
        return click.Option(
            [self.opt, self.name],
            help=self.help,
            expose_value=False,
            callback=_record,
            metavar=self.metavar,
            **settings,
        )


_GLOBALS = [
    _Global("url", "SQLAlchemy database URL [env: DATABASE_URL]"),
    _Global("scope", f"key scope [default: {DEFAULT_SCOPE}]"),
    _Global("table", "keys table [default: data_keys]"),
    _Global(
        "cache_max_age",
        "seconds; the longest cache_max_age of your applications (destroy refuses a key "
        "that changed state more recently) [default: 60]",
        type=float,
    ),
    _Global(
        "models",
        "a module of the application's models to import, so that TABLE.COLUMN gets its "
        "column's definition (repeatable) [env: ENVELOPE_MODELS, comma-separated]",
        repeatable=True,
        metavar="MODULE",
    ),
    _Global("json", "machine-readable output", flag=True),
    _Global("debug", "on an error, also print its traceback", flag=True),
]
_GLOBAL_BY_NAME = {option.name: option for option in _GLOBALS}
_GIVEN = "sqlalchemy_envelope.given"


def _record(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Collect a global option given on the command line, before or after the
    command (``ctx.meta`` is shared by the group's and the command's
    contexts). A repeatable one adds up; another takes one value, and a
    second, different one is a usage error (never echoed: it may be a URL
    with its password)."""
    name = str(param.name)
    if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
        return
    given: dict[str, tuple[Any, ...]] = ctx.meta.setdefault(_GIVEN, {})
    values = (*given.get(name, ()), *(value if isinstance(value, tuple) else (value,)))
    distinct = tuple(dict.fromkeys(values))
    if len(distinct) > 1 and not _GLOBAL_BY_NAME[name].repeatable:
        raise click.BadParameter(
            "given twice with different values: give it once (before or after the command)",
            ctx=ctx,
            param=param,
        )
    given[name] = distinct


class Context:
    """The global options of one run, from the command line or their defaults."""

    def __init__(self, given: dict[str, tuple[Any, ...]]) -> None:
        def one(name: str, default: Any) -> Any:
            return given[name][0] if name in given else default

        self.url: str | None = one("url", os.environ.get("DATABASE_URL"))
        self.scope: str = one("scope", DEFAULT_SCOPE)
        self.scope_given = "scope" in given
        self.table: str = one("table", "data_keys")
        self.cache_max_age: float = one("cache_max_age", 60.0)
        self.models: tuple[str, ...] = given.get("models", ())
        self.as_json: bool = one("json", False)
        self.debug: bool = one("debug", False)

    @property
    def scope_filter(self) -> str | None:
        return None if self.scope == DEFAULT_SCOPE else self.scope

    def registry(
        self,
        *,
        keys: bool = False,
        new_scope: bool = False,
        new_database: bool = False,
        across_scopes: bool = False,
    ) -> KeyRegistry:
        """A registry of ``--scope``, closed with its engine when the command
        ends. With ``keys`` (a command that addresses keys: status, census,
        rotate, retire, enable, disable, destroy, maintenance), ``--scope``
        may name an index scope (``~index:<scope>``): the registry is then of
        that scope, and the command passes ``--scope`` on to address the
        index keys.

        A scope with no key is refused (`_require_keys`) unless the command
        creates it (``new_scope``: init, create-scope): a mistyped
        ``--scope`` would otherwise report an empty scope, or create a
        tenant. A command that works ``across_scopes`` (rewrap,
        decrypt-in-place, shred) checks ``--scope`` only when it is given.
        Only a command that creates ``data_keys`` (``new_database``: init)
        may create a SQLite database file."""
        scope = self.scope
        if keys and is_index_scope(check_key_scope(scope)):
            scope = scope_of_index(scope)
        self.load_models()
        engine = self._engine(creating=new_database)
        context = click.get_current_context()
        context.call_on_close(engine.dispose)
        registry = KeyRegistry.from_env(
            engine, scope=scope, table_name=self.table, cache_max_age=self.cache_max_age
        )
        context.call_on_close(registry.close)
        if not new_scope and (self.scope_given or not across_scopes):
            _require_keys(registry, self.scope)
        return registry

    def _engine(self, *, creating: bool = False) -> sa.Engine:
        """An engine on ``url`` that has connected once, so that an unreachable
        database is reported as such before any work starts. Connecting to
        a SQLite file creates it: only a ``creating`` command (init) may."""
        if not self.url:
            raise ConfigurationError("no database: pass --url or set DATABASE_URL")
        try:
            url = sa.make_url(self.url)
        except (sa.exc.ArgumentError, ValueError):
            raise ConfigurationError(
                "the database URL (--url or DATABASE_URL) is not a SQLAlchemy URL"
            ) from None
        try:
            # hide_parameters: no SQLAlchemy error text ever carries a value.
            engine = sa.create_engine(url, hide_parameters=True)
        except (sa.exc.ArgumentError, ImportError, TypeError, AttributeError) as error:
            raise ConfigurationError(
                f"cannot use the database URL: {_without(url.password, error)}"
            ) from None
        missing = None if creating else _missing_sqlite_file(url)
        if missing is not None:
            raise ConfigurationError(
                f"no SQLite database at {missing} (check --url or DATABASE_URL; "
                "only `sqlalchemy-envelope init` creates one)"
            )
        if engine.dialect.is_async:
            raise ConfigurationError(
                f"the database URL names an async driver ({url.drivername}): the command "
                f"needs a synchronous one, e.g. {_SYNC.get(url.get_backend_name(), 'its default')}"
            )
        try:
            engine.connect().close()
        except sa.exc.DBAPIError as error:
            engine.dispose()
            raise _Unreachable(_without(url.password, error.orig)) from None
        except (TypeError, AttributeError, LookupError, ValueError) as error:
            # The driver choked on a query argument of the URL (?charset=...).
            engine.dispose()
            raise ConfigurationError(
                f"cannot use the database URL's options: {_without(url.password, error)}"
            ) from None
        return engine

    def load_models(self) -> None:
        """Import the application's models (``--models``, else
        ``ENVELOPE_MODELS``, and the ``sqlalchemy_envelope.models`` entry
        points): their encrypted columns are the definitions a job by
        TABLE.COLUMN uses."""
        given = self.models or (os.environ.get("ENVELOPE_MODELS", ""),)
        for name in (n.strip() for value in given for n in value.split(",")):
            if name:
                _import(name, f"the models module {name!r} (--models, ENVELOPE_MODELS)")
        for entry in importlib.metadata.entry_points(group=MODELS_ENTRY_POINTS):
            try:
                entry.load()
            except Exception as error:
                raise ConfigurationError(
                    f"cannot load the {MODELS_ENTRY_POINTS} entry point {entry.name!r} "
                    f"({entry.value}): {_import_failure(error)}"
                ) from None

    def emit(self, data: dict[str, Any], text: str) -> None:
        click.echo(json.dumps(data, indent=2) if self.as_json else text)


def _missing_sqlite_file(url: sa.URL) -> str | None:
    """The absolute path of the SQLite file ``url`` names, if it does not
    exist; None for another database, an in-memory one, or a URI whose
    ``mode`` (ro, rw, memory) keeps SQLite from creating it."""
    if url.get_backend_name() != "sqlite":
        return None
    path = url.database or ""
    if str(url.query.get("uri", "")).lower() in ("true", "1", "yes", "on"):
        if url.query.get("mode") in ("ro", "rw", "memory"):
            return None
        path = unquote(path.removeprefix("file:").partition("?")[0].partition("#")[0])
    if path in ("", ":memory:") or os.path.exists(path):
        return None
    return os.path.abspath(path)


def _require_keys(registry: KeyRegistry, scope: str) -> None:
    """Refuse a scope that has no key, saying how it gets one. Only data_keys
    is read, not the root key, which some commands (census) do not need;
    without data_keys, the command itself says to create it."""
    table = registry.table
    with registry.engine.connect() as conn:
        if not sa.inspect(conn).has_table(table.name, schema=table.schema):
            return
        if storage.all_keys(conn, table, scope):
            return
    tenant = scope_of_index(scope) if is_index_scope(scope) else scope
    create = (
        "sqlalchemy-envelope init"
        if tenant == DEFAULT_SCOPE
        else f"sqlalchemy-envelope create-scope {shlex.quote(tenant)}"
    )
    raise ConfigurationError(
        f"scope {scope!r} has no key (check --scope): `{create}` creates its keys"
    )


_SYNC = {"postgresql": "postgresql+psycopg://", "sqlite": "sqlite://", "mysql": "mysql+pymysql://"}


def _import(name: str, what: str) -> Any:
    """Import a module of the application, from the working directory too (as
    ``python -m`` would): a failure is a configuration error naming it."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise ConfigurationError(f"cannot import {what}: {_import_failure(error)}") from None


def _import_failure(error: Exception) -> str:
    """Why an import failed: an ImportError's text (a module's name); of any
    other error raised by the module's own code only its type, as its text
    may hold anything (a setting, a secret)."""
    if isinstance(error, ImportError):
        return str(error)
    return f"it raised {type(error).__name__} (import it in Python to see why)"


def _without(password: str | None, error: BaseException | None) -> str:
    """The first line of an error's text, any form of the password masked."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if password:
        for form in {password, quote(password, safe=""), quote_plus(password)}:
            text = text.replace(form, "***")
    return text


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _usage(error: click.UsageError) -> NoReturn:
    """Click's usage error as one line, pointing at the help of the command."""
    where = error.ctx.command_path if error.ctx else "sqlalchemy-envelope"
    message = _one_line(error.format_message()).rstrip(".")
    _fail(f"usage error: {message}; see '{where} --help'", EXIT_USAGE)


_INTERRUPTED = (
    "interrupted: what was committed stays (each key change is one transaction); "
    "run the command again to go on (reencrypt, decrypt-in-place and backfill-index resume)"
)


def _failure(error: Exception, command: str) -> tuple[str, int]:
    """An error's line and exit code. Only texts known to be free of values
    and secrets are printed: the library's own, and the driver's reason with
    quoted literals masked (``database_reason``); of anything else its type."""
    if isinstance(error, _Unreachable):
        return (
            f"error: cannot connect to the database: {error} (check --url or "
            "DATABASE_URL, and that the server accepts connections)",
            EXIT_UNREACHABLE,
        )
    if isinstance(error, ConnectionLostError):
        return (
            f"error: {command}: {error} (run the command again once the database is back: "
            "it goes on from the batches committed)",
            EXIT_UNREACHABLE,
        )
    if isinstance(error, StatementFailedError):
        return f"error: {command}: {error}", EXIT_DATABASE
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return (
            f"error: {command}: lost the connection to the database: {database_reason(error)} "
            "(run the command again once it is back)",
            EXIT_UNREACHABLE,
        )
    if isinstance(error, sa.exc.StatementError):
        return (
            f"error: {command}: the database refused a statement: {database_reason(error)} "
            "(fix its cause, then run the command again)",
            EXIT_DATABASE,
        )
    if isinstance(error, KeyStateError | KeyInUseError):
        return f"refused: {error}", EXIT_REFUSED
    if isinstance(error, ConfigurationError):
        return f"configuration error: {error}", EXIT_USAGE
    if isinstance(error, RootKeyUnavailableError):
        return f"error: the root key is unavailable: {error}", EXIT_ROOT_KEY_UNAVAILABLE
    if isinstance(error, EnvelopeError):
        return f"error: {error}", EXIT_ERROR
    if isinstance(error, sa.exc.NoSuchTableError):
        return (
            f"configuration error: {command}: no table {database_reason(error).partition(': ')[2]}"
            " in the database (check the name, --url and --table)",
            EXIT_USAGE,
        )
    if isinstance(error, sa.exc.SQLAlchemyError):
        return f"configuration error: {command}: {database_reason(error)}", EXIT_USAGE
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return (
            f"configuration error: {command}: {error.strerror or type(error).__name__}{where} "
            "(check the path and its permissions)",
            EXIT_USAGE,
        )
    return (
        f"error: {command} failed unexpectedly ({type(error).__name__}): run it again with "
        "--debug to see the traceback, and report it",
        EXIT_INTERNAL,
    )


class _Cli(click.Group):
    """The command group: every command takes the global options too, and
    every error becomes one line and its exit code (`_failure`)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(option.option() for option in _GLOBALS)
        super().add_command(cmd, name)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as error:
            _usage(error)
        except KeyboardInterrupt:
            _fail(_INTERRUPTED, EXIT_INTERRUPTED)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.NoArgsIsHelpError):
            raise
        except click.UsageError as error:
            _usage(error)
        except click.ClickException as error:
            _fail(f"error: {_one_line(error.format_message())}", error.exit_code)
        except (KeyboardInterrupt, click.Abort) as error:
            _fail(_INTERRUPTED, EXIT_INTERRUPTED, _debug(ctx, error))
        except Exception as error:
            line, code = _failure(error, ctx.invoked_subcommand or str(ctx.info_name))
            _fail(line, code, _debug(ctx, error))


def _debug(ctx: click.Context, error: BaseException) -> BaseException | None:
    """The error whose traceback to print: only with ``--debug``."""
    return error if ctx.meta.get(_GIVEN, {}).get("debug") else None


R = TypeVar("R")


def pass_context(command: Callable[..., R]) -> Callable[..., R]:
    """Pass the run's `Context` (the global options, wherever they were given)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        ctx = click.get_current_context().find_root()
        if not isinstance(ctx.obj, Context):
            ctx.obj = Context(ctx.meta.get(_GIVEN, {}))
        return command(ctx.obj, *args, **kwargs)

    return wrapper


def _confirm(yes: bool, question: str) -> None:
    """Ask ``question`` on stderr (stdout is the report) unless ``yes``; any
    answer but yes (also none: end of input, Ctrl-C) exits with its own code,
    having done nothing."""
    if yes:
        return
    try:
        agreed = click.confirm(question, err=True)
    except click.Abort:
        agreed = False
    if not agreed:
        _fail("declined: nothing was done", EXIT_DECLINED)


def _left_behind(report: MigrationReport) -> None:
    """A job that left values behind exits with its own code, its report printed."""
    if report.left_behind:
        click.get_current_context().exit(EXIT_LEFT_BEHIND)


def _key_line(key: KeyInfo) -> str:
    return (
        f"version {key.version:>4}  {key.state.value:<9}  id {key.id:#012x}  "
        f"encryptions {key.encryptions:,}  created {key.created_at:%Y-%m-%d %H:%M:%S}"
    )


def _reason_option(command: Callable[..., Any]) -> Callable[..., Any]:
    option = click.option(
        "--reason",
        default=None,
        metavar="TEXT",
        help="why: recorded with the key events of this change (one line; never a secret)",
    )
    return option(command)


def _event_line(event: KeyEvent) -> str:
    reason = f"  reason: {event.reason}" if event.reason is not None else ""
    return (
        f"{event.seq:>6}  {event.occurred_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z  "
        f"{event.operation:<19}  {event.scope or '-'}  {event.versions or '-'}  "
        f"{event.outcome}  by {event.actor}  root key {event.root_key_fingerprint}{reason}"
    )


def _since(value: str | None) -> datetime | None:
    """``--since``: an ISO 8601 time (UTC unless it says otherwise), or a date."""
    if value is None:
        return None
    try:
        since = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(
            f"--since takes an ISO 8601 time such as 2030-01-31 or 2030-01-31T12:00:00Z, "
            f"not {value!r}"
        ) from None
    return since if since.tzinfo is not None else since.replace(tzinfo=UTC)


def _status_text(status: RegistryStatus) -> str:
    lines = [
        f"scope {status.scope!r}: active version {status.active_version}",
        f"root key {status.root_key_fingerprint} ({status.root_key_description})",
        *(
            [
                f"root key UNAVAILABLE ({status.cached_keys} cached data keys still work): "
                f"{status.root_key_problem}"
            ]
            if status.root_key_problem
            else []
        ),
        f"rotation due: {status.rotation_due or 'no'}",
        *(_key_line(k) for k in status.keys),
        *(
            f"keys under OTHER root key {name}: {count:,} (still needed until rewrap moves them)"
            for name, count in status.other_root_keys.items()
        ),
    ]
    if not status.other_root_keys:
        lines.append("every stored key is under this root key: older root keys are not needed")
    if status.rows_by_version is not None:
        for version, rows in sorted(status.rows_by_version.items()):
            lines.append(f"rows under version {version}: {rows:,}")
    lines.append(
        f"key events: {status.events:,}, chain head {status.events_head or 'none'} "
        "(record it; `events verify --expected-head` checks it later)"
    )
    return "\n".join(lines)


class _ShardType(click.ParamType[Shard]):
    """``--shard K/N``: a bad value is a usage error saying what is expected."""

    name = "K/N"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Shard:
        if isinstance(value, Shard):
            return value
        try:
            return Shard.parse(str(value))
        except ConfigurationError as error:
            self.fail(str(error), param, ctx)


def _shard_option(command: Callable[..., Any]) -> Callable[..., Any]:
    option = click.option(
        "--shard",
        type=_ShardType(),
        default=None,
        help="do only shard K of N of each table, 0 <= K < N (e.g. "
        "$JOB_COMPLETION_INDEX/N): one per machine, each resumable (docs/sharding.md)",
    )
    return option(command)


def _shard(shard: Shard | None) -> tuple[int, int] | None:
    return None if shard is None else (shard.index, shard.count)


def _reasons(report: MigrationReport) -> str:
    """The values left behind by reason, adding up to their number."""
    reasons = report.left_by_reason()
    return f" ({', '.join(f'{r}: {n:,}' for r, n in reasons.items())})" if reasons else ""


def _report_text(report: MigrationReport) -> str:
    moved = ", ".join(f"v{v}: {n:,}" for v, n in sorted(report.values_by_version.items()))
    lines = [
        f"columns: {', '.join(report.columns)}",
        *([f"shard {report.shard[0]}/{report.shard[1]} of each table"] if report.shard else []),
        f"rows scanned {report.rows_scanned:,}, updated {report.rows_updated:,}, "
        f"skipped (written meanwhile, retried) {report.skipped:,}",
        f"values moved off: {moved or 'none'}",
        f"plaintext encrypted {report.plaintext_encrypted:,}, "
        f"decrypted {report.values_decrypted:,}",
        f"left behind {report.left_behind:,}{_reasons(report)}",
        *(f"  {line}" for line in report.left_lines()),
        *(
            [f"values of other scopes left alone {report.other_scopes:,}"]
            if report.other_scopes
            else []
        ),
        f"{report.elapsed:.1f}s, {report.rows_per_second:,.0f} rows/s",
    ]
    return "\n".join(lines)


# The one reason a plaintext value can give: a value under a key of this
# registry is its ciphertext, never plaintext, whatever --plaintext-row says.
_LOOKALIKE = "UnknownKeyError"


def _plaintext_rows(named: tuple[str, ...]) -> dict[str, list[Any]]:
    """``TABLE.COLUMN=KEY`` options, as a report prints them: KEY is the value
    of a one-column primary key, or a JSON array for a composite one."""
    rows: dict[str, list[Any]] = {}
    for item in named:
        column, equals, key = item.partition("=")
        if not equals or not column or not key:
            raise ConfigurationError(f"--plaintext-row takes TABLE.COLUMN=KEY, not {item!r}")
        parsed: Any = key
        if key.startswith("["):
            try:
                parsed = tuple(json.loads(key))
            except (ValueError, TypeError):
                raise ConfigurationError(
                    f"--plaintext-row {column}: a key starting with '[' must be a JSON array"
                ) from None
        rows.setdefault(column, []).append(parsed)
    return rows


def _examples(*lines: str) -> str:
    """A command's help epilog: example command lines, kept as written by
    click's no-rewrap marker. docs/cli.md's Examples lists all of them in an
    order that runs as one script, which tests/test_cli_help.py runs."""
    return "Examples:\n\n\b\n" + "\n".join(f"$ {line}" for line in lines)


_MAIN_EPILOG = (
    _examples(
        "sqlalchemy-envelope init",
        "sqlalchemy-envelope status --scope acme --json",
        "sqlalchemy-envelope --scope acme --json status",
    )
    + "\n\nGlobal options go before or after the command. Exit codes:\n\n\b\n"
    + "\n".join(f"{code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())
    + "\n\nShell completion (bash; also zsh_source, fish_source):\n\n\b\n"
    + 'eval "$(_SQLALCHEMY_ENVELOPE_COMPLETE=bash_source sqlalchemy-envelope)"'
    + "\n\nReference: docs/cli.md"
)


@click.group(
    cls=_Cli,
    params=[option.option() for option in _GLOBALS],
    epilog=_MAIN_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def main() -> None:
    """Manage envelope-encryption keys and encrypted columns."""
    # psycopg logs its own warning beside the error the command reports (an
    # aborted pipeline): the error is reported once, in one line.
    logging.getLogger("psycopg").setLevel(logging.ERROR)


@main.command(
    epilog=_examples(
        "sqlalchemy-envelope init",
        "sqlalchemy-envelope init --scope acme --reason 'tenant onboarding, ticket 42'",
    )
)
@_reason_option
@pass_context
def init(c: Context, reason: str | None) -> None:
    """Create data_keys, its key events and the first data key (idempotent)."""
    key = c.registry(new_scope=True, new_database=True).init(reason=reason)
    c.emit(key.to_dict(), f"active: {_key_line(key)}")


@main.command(
    "create-scope",
    epilog=_examples(
        "sqlalchemy-envelope create-scope globex",
        "sqlalchemy-envelope create-scope initech umbrella --json",
    ),
)
@click.argument("scopes", metavar="SCOPE...", nargs=-1, required=True)
@_reason_option
@pass_context
def create_scope(c: Context, scopes: tuple[str, ...], reason: str | None) -> None:
    """Create tenant SCOPEs: each gets what it lacks of an active data key and
    an index key (a shredded scope comes back, with new keys; its old values
    stay unreadable)."""
    keys = c.registry(new_scope=True).create_scope(*scopes, reason=reason)
    c.emit(
        {"keys": [key.to_dict() for key in keys]},
        "\n".join(f"scope {key.scope!r}: {_key_line(key)}" for key in keys),
    )


@main.command(
    epilog=_examples(
        "sqlalchemy-envelope status",
        "sqlalchemy-envelope status --column notes.body --json",
        "sqlalchemy-envelope status --census --scope '~index:default'",
    )
)
@click.option("--census", "with_census", is_flag=True, help="also count rows per version")
@click.option("--column", "columns", multiple=True, help="TABLE.COLUMN to count (repeatable)")
@pass_context
def status(c: Context, with_census: bool, columns: tuple[str, ...]) -> None:
    """Keys, their states and use, and whether rotation is due."""
    registry = c.registry(keys=True)
    everywhere = with_census and not columns
    result = registry.status(c.scope, census=everywhere)
    data = result.to_dict()
    text = _status_text(result)
    counts = registry.census(*columns) if columns else list(result.columns or ())
    if columns:
        data["columns"] = [col.to_dict() for col in counts]
    if everywhere:
        text += f"\nrows per version: {result.rows_by_version}"
    text += "".join(f"\n{_census_text(col)}" for col in counts)
    c.emit(data, text)


@main.command(epilog=_examples("sqlalchemy-envelope rotate"))
@_reason_option
@pass_context
def rotate(c: Context, reason: str | None) -> None:
    """Make a new data key active; the old one keeps decrypting."""
    key = c.registry(keys=True).rotate(c.scope, reason=reason)
    c.emit(key.to_dict(), f"active: {_key_line(key)}")


@main.command(
    epilog=_examples(
        "sqlalchemy-envelope census notes.body",
        "sqlalchemy-envelope census notes.body --scope acme --json",
    )
)
@click.argument("columns", nargs=-1, required=True)
@pass_context
def census(c: Context, columns: tuple[str, ...]) -> None:
    """Rows per key version, NULLs and plaintext in TABLE.COLUMN..."""
    counts = c.registry(keys=True).census(*columns, scope=c.scope_filter)
    text = "\n".join(_census_text(col) for col in counts)
    c.emit({"columns": [col.to_dict() for col in counts]}, text)


def _census_text(col: ColumnCensus) -> str:
    """One column's census: a line per scope and version, and one for the rows
    under keys data_keys does not hold (their ids are never printed: for a
    legacy plaintext value they are five bytes of it)."""
    lines = [
        f"{col.column}: rows {col.rows:,}, NULL {col.nulls:,}, "
        f"not ciphertext {col.not_ciphertext:,}",
        *(f"  scope {k.scope!r}, version {k.version} ({k.state}): {k.rows:,}" for k in col.keys),
    ]
    if col.unknown_key_rows:
        lines.append(f"  under keys not in data_keys: {col.unknown_key_rows:,}")
    return "\n".join(lines)


@main.command(
    epilog=_examples(
        "sqlalchemy-envelope reencrypt notes.body users.email",
        "sqlalchemy-envelope reencrypt notes.body --batch-size 500 --shard 0/2 --json",
    )
)
@click.argument("columns", nargs=-1, required=True)
@click.option("--batch-size", default=1000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="parallel processes")
@click.option("--encrypt-plaintext", is_flag=True, help="also encrypt legacy plaintext values")
@click.option(
    "--plaintext-row",
    "plaintext_rows",
    multiple=True,
    metavar="TABLE.COLUMN=KEY",
    help="a row left behind whose value is legacy plaintext that looks like ciphertext: "
    "encrypt it as plaintext (repeatable; KEY as the report prints it)",
)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@_shard_option
@pass_context
def reencrypt(
    c: Context,
    columns: tuple[str, ...],
    batch_size: int,
    workers: int,
    encrypt_plaintext: bool,
    plaintext_rows: tuple[str, ...],
    progress: bool | None,
    shard: Shard | None,
) -> None:
    """Move every value of TABLE.COLUMN... onto the active key (resumable)."""
    report = c.registry().reencrypt(
        *columns,
        scope=c.scope,
        batch_size=batch_size,
        workers=workers,
        encrypt_plaintext=encrypt_plaintext,
        progress=progress,
        plaintext_rows=_plaintext_rows(plaintext_rows),
        shard=_shard(shard),
    )
    text = _report_text(report)
    if any(r.reason == _LOOKALIKE for r in report.left_rows):
        text += (
            "\nif a row listed holds legacy plaintext that looks like ciphertext, run "
            "again with --plaintext-row TABLE.COLUMN=KEY to encrypt it as plaintext"
        )
    c.emit(report.to_dict(), text)
    _left_behind(report)


@main.command(
    "migrate-from-sqlalchemy-utils",
    epilog=_examples(
        "sqlalchemy-envelope migrate-from-sqlalchemy-utils accounts.name --models myapp.models",
        "sqlalchemy-envelope migrate-from-sqlalchemy-utils accounts.name --batch-size 500 "
        "--models myapp.models --json",
    ),
)
@click.argument("columns", nargs=-1, required=True)
@click.option("--batch-size", default=1000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="parallel processes")
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@_shard_option
@pass_context
def migrate_from_sqlalchemy_utils(
    c: Context,
    columns: tuple[str, ...],
    batch_size: int,
    workers: int,
    progress: bool | None,
    shard: Shard | None,
) -> None:
    """Seal the values sqlalchemy-utils wrote in TABLE.COLUMN... under the
    registry's keys (resumable). The models (--models) declare each column
    EncryptedType(..., migrating=StringEncryptedType(...)): the type that
    reads the old values, with their key, which the command line never takes."""
    try:
        report = c.registry().migrate_from_sqlalchemy_utils(
            *columns, batch_size=batch_size, workers=workers, progress=progress, shard=_shard(shard)
        )
    except ValuesLeftBehindError as error:
        # Values left, or rows the application kept writing (skipped): the
        # report says which; the command is run again once they are fixed.
        c.emit(error.report.to_dict(), _report_text(error.report))
        click.get_current_context().exit(EXIT_LEFT_BEHIND)
    c.emit(report.to_dict(), _report_text(report))


@main.command(
    "decrypt-in-place", epilog=_examples("sqlalchemy-envelope decrypt-in-place notes.body --yes")
)
@click.argument("columns", nargs=-1, required=True)
@click.option("--batch-size", default=1000, show_default=True)
@click.option("--progress/--no-progress", default=None)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@_shard_option
@pass_context
def decrypt_in_place(
    c: Context,
    columns: tuple[str, ...],
    batch_size: int,
    progress: bool | None,
    yes: bool,
    shard: Shard | None,
) -> None:
    """Write TABLE.COLUMN... back as plaintext (undoes an in-place encryption)."""
    _confirm(yes, "Write these columns back as plaintext?")
    report = c.registry(across_scopes=True).decrypt_in_place(
        *columns, batch_size=batch_size, progress=progress, shard=_shard(shard)
    )
    c.emit(report.to_dict(), _report_text(report))
    _left_behind(report)


@contextmanager
def _known_version(version: int) -> Iterator[None]:
    """A version the scope has no key of is bad usage (exit 2), not a
    decryption failure."""
    try:
        yield
    except UnknownKeyError as error:
        raise ConfigurationError(f"{error} (no key version {version} in this scope)") from None


def _transition(name: str, help_text: str, *examples: str) -> None:
    @main.command(name, help=help_text, epilog=_examples(*examples))
    @click.argument("version", type=int)
    @_reason_option
    @pass_context
    def command(c: Context, version: int, reason: str | None) -> None:
        with _known_version(version):
            key = getattr(c.registry(keys=True), name)(version, c.scope, reason=reason)
        c.emit(key.to_dict(), _key_line(key))


_transition(
    "retire",
    "Retire VERSION (decrypt only); retiring the active key rotates.",
    "sqlalchemy-envelope retire 3",
)
_transition(
    "enable", "Bring a disabled VERSION back to retired.", "sqlalchemy-envelope enable 2 --json"
)


@main.command(epilog=_examples("sqlalchemy-envelope disable 2"))
@click.argument("version", type=int)
@click.option("--force", is_flag=True, help="also an index key (scope ~index:...)")
@_reason_option
@pass_context
def disable(c: Context, version: int, force: bool, reason: str | None) -> None:
    """Refuse decryption under VERSION, reversibly; an index key only with --force."""
    with _known_version(version):
        key = c.registry(keys=True).disable(version, c.scope, force=force, reason=reason)
    c.emit(key.to_dict(), _key_line(key))


@main.command(
    epilog=_examples("sqlalchemy-envelope destroy 1 --column notes.body --column users.email")
)
@click.argument("version", type=int)
@click.option("--column", "columns", multiple=True, help="TABLE.COLUMN to check (default: all)")
@click.option("--force", is_flag=True, help="destroy even if rows still need it (crypto-shred)")
@_reason_option
@pass_context
def destroy(
    c: Context, version: int, columns: tuple[str, ...], force: bool, reason: str | None
) -> None:
    """Erase VERSION's key for good, once no row needs it."""
    with _known_version(version):
        key = c.registry(keys=True).destroy(
            version, c.scope, force=force, columns=columns, reason=reason
        )
    c.emit(key.to_dict(), _key_line(key))


@main.command(
    epilog=_examples("ENVELOPE_NEW_ROOT_KEY_FILE=new-root.key sqlalchemy-envelope rewrap")
)
@_reason_option
@pass_context
def rewrap(c: Context, reason: str | None) -> None:
    """Re-wrap every data key under the root key in ENVELOPE_NEW_* (all or
    nothing); the key events are re-anchored under it."""
    new_root = root_key_from_env(prefix="ENVELOPE_NEW_")
    count = c.registry(across_scopes=True).rewrap(new_root, reason=reason)
    c.emit(
        {"rewrapped": count, "root_key_fingerprint": new_root.fingerprint},
        f"re-wrapped {count} data keys under root key {new_root.fingerprint}; "
        "switch ENVELOPE_* to the new root key now",
    )


@main.command(
    epilog=_examples("sqlalchemy-envelope shred acme --yes --reason 'contract ended, ticket 7'")
)
@click.argument("tenant", metavar="SCOPE")
@click.option(
    "--including-shared-index",
    is_flag=True,
    help="also when SCOPE is --scope's own scope while other scopes have keys: tenants' "
    "deterministic values and blind indexes written before they had index keys of their "
    "own, and not moved to them, become unusable",
)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@_reason_option
@pass_context
def shred(
    c: Context, tenant: str, including_shared_index: bool, yes: bool, reason: str | None
) -> None:
    """Crypto-shred SCOPE (a tenant): destroy all its keys, its index keys included;
    other scopes' keys are untouched."""
    prompt = "Destroy every key of this scope? Its data becomes unreadable"
    if including_shared_index:
        prompt = (
            "Destroy every key of this scope, and its index key, which tenants used "
            "before they had their own? Its data becomes unreadable, and so do the "
            "deterministic values, blind-index lookups and hash_field digests of tenants "
            "not yet moved to their own index keys"
        )
    _confirm(yes, prompt)
    count = c.registry(across_scopes=True).shred(
        tenant, including_shared_index=including_shared_index, reason=reason
    )
    c.emit({"scope": tenant, "destroyed": count}, f"destroyed {count} keys of scope {tenant!r}")


@main.group(
    cls=_Cli,
    invoke_without_command=True,
    epilog=_examples(
        "sqlalchemy-envelope events",
        "sqlalchemy-envelope events --scope acme --since 2020-01-01 --limit 20 --json",
        "sqlalchemy-envelope events --after 41 --json",
    )
    + "\n\nEvery change to the keys, oldest first; `events verify` checks the chain."
    + " Reference: docs/audit.md",
)
@click.option("--since", metavar="TIME", help="only events at or after TIME (ISO 8601; UTC)")
@click.option(
    "--after",
    metavar="SEQ",
    type=click.IntRange(min=0),
    help="only events numbered after SEQ (the last one shipped: resume from it, not --since)",
)
@click.option("--limit", type=click.IntRange(min=1), help="only the newest N events")
def events(since: str | None, after: int | None, limit: int | None) -> None:
    """The recorded changes to the keys (of --scope and its index scope, if given)."""
    # With `verify` after it, the global options that follow are not parsed yet.
    if click.get_current_context().invoked_subcommand is None:
        _list_events(since, after, limit)


@pass_context
def _list_events(c: Context, since: str | None, after: int | None, limit: int | None) -> None:
    found = c.registry(keys=True).events(
        c.scope if c.scope_given else None, since=_since(since), after=after, limit=limit
    )
    c.emit(
        {"events": [event.to_dict() for event in found]},
        "\n".join(_event_line(event) for event in found) or "no events",
    )


@events.command(
    "verify",
    epilog=_examples(
        "sqlalchemy-envelope events verify",
        "sqlalchemy-envelope events verify --json",
    ),
)
@click.option(
    "--expected-head",
    metavar="HEX",
    help="a chain head recorded earlier (status, a previous verify): detects the newest "
    "events deleted since",
)
@pass_context
def verify(c: Context, expected_head: str | None) -> None:
    """Walk the chain of key events with the root key; exit 1 at the first
    altered, inserted, reordered or deleted event."""
    report = c.registry().verify_events(expected_head)
    if report.ok:
        start = "" if report.start is None else f"\nstarted: {_event_line(report.start)}"
        c.emit(
            report.to_dict(),
            f"key events verify: {report.events:,} events, chain head {report.head or 'none'}"
            + start,
        )
        return
    assert report.problem is not None
    if c.as_json:
        c.emit(report.to_dict(), "")
    _fail(
        f"error: the key events chain is broken at seq {report.problem.seq}: "
        f"{report.problem.kind} ({report.problem.detail}); the {report.events:,} events "
        "before it verify",
        EXIT_ERROR,
    )


@events.command(
    "start",
    epilog=_examples(
        "sqlalchemy-envelope events start --reason 'upgrade to key events, CHG-1234'",
    ),
)
@_reason_option
@pass_context
def start(c: Context, reason: str | None) -> None:
    """Start the chain of key events over the keys a database of an earlier
    version holds (creates the events table if missing); once."""
    anchor = c.registry().start_events(reason=reason)
    c.emit(anchor.to_dict(), f"key events started: {_event_line(anchor)}")


@main.command(
    epilog=_examples("sqlalchemy-envelope maintenance", "sqlalchemy-envelope maintenance --json")
)
@pass_context
def maintenance(c: Context) -> None:
    """Rotate if the policy says so; report which old keys can go."""
    report = c.registry(keys=True).maintenance(c.scope)
    c.emit(
        report.to_dict(),
        f"rotated: {report.rotated.version if report.rotated else 'no'}\n"
        f"destroyable versions: {list(report.destroyable)}\n"
        f"versions still holding rows: {report.still_referenced}",
    )


@main.command(
    "backfill-index",
    epilog=_examples(
        "sqlalchemy-envelope backfill-index myapp.models:User.email_index",
        "sqlalchemy-envelope backfill-index myapp.models:User.email_index --recompute --json",
    ),
)
@click.argument("target")
@click.option("--batch-size", default=1000, show_default=True)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@click.option(
    "--recompute",
    is_flag=True,
    help="also rewrite digests already set that differ (under each row's scope's index key)",
)
@_shard_option
@pass_context
def backfill_index(
    c: Context,
    target: str,
    batch_size: int,
    progress: bool | None,
    recompute: bool,
    shard: Shard | None,
) -> None:
    """Fill a blind index for existing rows, each under its scope's index key;
    TARGET is module:Class.attribute (the models define the index's sources and
    normalizers)."""
    module_name, _, path = target.partition(":")
    if not module_name or not path:
        raise ConfigurationError("name the index as module:Class.attribute")
    found: Any = _import(module_name, f"the index {target!r}")
    try:
        for part in path.split("."):
            found = getattr(found, part)
    except AttributeError as error:
        raise ConfigurationError(f"cannot find the index {target!r}: {error}") from None
    report = c.registry().backfill_index(
        found,
        batch_size=batch_size,
        progress=progress,
        shard=_shard(shard),
        recompute=recompute,
    )
    c.emit(report.to_dict(), _report_text(report))


def _templates() -> Path:
    """The shipped Alembic templates: beside the package in a source checkout
    or an editable install, inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "alembic_templates", here.parent / "alembic_templates"):
        if (candidate / "envelope" / "env.py").is_file():
            return candidate
    raise ConfigurationError("the alembic_templates folder is missing from this installation")


def _check_new_paths(directory: Path, config: Path) -> None:
    """Refuse, before anything is written, the paths Alembic would fail on
    halfway (leaving a folder that makes the next run fail) or skip while
    reporting success (a config path that is a folder)."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigurationError(
            f"{existing} is a file: name a new or empty folder for the migrations"
        )
    if directory.is_dir() and any(directory.iterdir()):
        raise ConfigurationError(
            f"{directory} is not empty: name a new or empty folder for the migrations"
        )
    if config.is_dir():
        raise ConfigurationError(
            f"--config {config} is a folder: name the file to write, e.g. "
            f"--config {config / 'alembic.ini'}"
        )
    if not config.parent.is_dir():
        raise ConfigurationError(
            f"--config {config}: the folder {config.parent} does not exist: create it, "
            "or name a file in an existing folder"
        )


@main.command("alembic-init", epilog=_examples("sqlalchemy-envelope alembic-init migrations"))
@click.argument("directory")
@click.option("--config", "config_file", default="alembic.ini", show_default=True)
@pass_context
def alembic_init(c: Context, directory: str, config_file: str) -> None:
    """Start an Alembic migrations DIRECTORY wired for sqlalchemy-envelope,
    whose first migration creates data_keys."""
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    templates = _templates()
    _check_new_paths(Path(directory), Path(config_file))
    progress = io.StringIO()
    try:
        with redirect_stdout(progress):
            command.init(Config(config_file), directory, template=str(templates / "envelope"))
    except CommandError as error:
        raise ConfigurationError(str(error)) from None
    # Alembic's progress goes to stderr (stdout is the report, --json), and
    # only once it succeeded: a failure is the one line of its error.
    click.echo(progress.getvalue(), err=True, nl=False)
    first = Path(directory) / "versions" / "0001_data_keys.py"
    shutil.copyfile(templates / "data_keys_migration.py", first)
    env = Path(directory) / "env.py"
    c.emit(
        {"migration": str(first), "env": str(env)},
        f"wrote {first}; set target_metadata in {env}",
    )
