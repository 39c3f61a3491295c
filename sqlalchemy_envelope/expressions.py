"""What SQL can mean on encrypted columns, and where the rest is refused.

Randomized ciphertext equals nothing, deterministic ciphertext equals only the
same value, and a blind index holds keyed digests of whole normalized values;
none of them has an order or patterns. The types' comparators refuse what
cannot mean anything as it is written, except ``==`` and ``!=`` between two
SQL expressions: SQLAlchemy itself compares columns that way to find them in
its lists and dicts, without ever compiling the result. Those comparisons, and
ORDER BY (which has no operator), are refused when a statement is compiled:
once per statement, as the compiled cache keeps the result. Literal values are
rendered as ciphertext or digests by the types; this module only keeps
SQLAlchemy from wrapping a failure to render one in an error that quotes the
plaintext.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import exc
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import elements, operators
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.selectable import CompoundSelect, Select

from .errors import EncryptedComparisonError, EnvelopeError

__all__ = [
    "EnvelopeColumnType",
    "Kind",
    "check_comparison",
    "check_written",
    "envelope_type",
    "is_value",
]


class Kind(enum.Enum):
    """What a column's stored values are, which decides what SQL can do with them."""

    RANDOMIZED = "randomized"
    DETERMINISTIC = "deterministic"
    BLIND_INDEX = "blind index"


_COMPARISONS = frozenset(
    {
        operators.eq,
        operators.ne,
        operators.lt,
        operators.le,
        operators.gt,
        operators.ge,
        operators.in_op,
        operators.not_in_op,
        operators.between_op,
        operators.not_between_op,
        operators.like_op,
        operators.not_like_op,
        operators.ilike_op,
        operators.not_ilike_op,
        operators.contains_op,
        operators.not_contains_op,
        operators.startswith_op,
        operators.not_startswith_op,
        operators.endswith_op,
        operators.not_endswith_op,
        operators.is_distinct_from,
        operators.is_not_distinct_from,
        operators.match_op,
        operators.not_match_op,
        operators.regexp_match_op,
        operators.not_regexp_match_op,
    }
)

_EQUALITY = frozenset(
    {
        operators.eq,
        operators.ne,
        operators.in_op,
        operators.not_in_op,
        operators.is_distinct_from,
        operators.is_not_distinct_from,
    }
)

_LOOKUPS = frozenset({operators.eq, operators.ne})

_SYMBOLS = {
    operators.eq: "=",
    operators.ne: "!=",
    operators.lt: "<",
    operators.le: "<=",
    operators.gt: ">",
    operators.ge: ">=",
}

_WHY = {
    Kind.RANDOMIZED: (
        "each value is encrypted with a fresh nonce, so no comparison could ever "
        "match. Use a blind index or EncryptedType(..., deterministic=True) for "
        "equality lookups"
    ),
    Kind.DETERMINISTIC: (
        "the order and patterns of deterministic ciphertext say nothing about the "
        "plaintext; only equality works (==, !=, IN, IS [NOT] DISTINCT FROM)"
    ),
    Kind.BLIND_INDEX: (
        "a blind index holds keyed digests of whole normalized values; only equality "
        "of whole values works (.matches(), ==, !=, IN)"
    ),
}

_ORDER_WHY = {
    Kind.RANDOMIZED: "each value is encrypted with a fresh nonce, so the order would be random",
    Kind.DETERMINISTIC: "the order of deterministic ciphertext says nothing about the plaintext",
    Kind.BLIND_INDEX: "the order of keyed digests says nothing about the plaintext",
}

_ORDER_MODIFIERS = frozenset(
    {operators.asc_op, operators.desc_op, operators.nulls_first_op, operators.nulls_last_op}
)
_WRAPPERS = (elements.Label, elements._label_reference, elements.Grouping)


class EnvelopeColumnType:
    """What the library's column types (EncryptedType, BlindIndex) tell this module."""

    @property
    def envelope_kind(self) -> Kind:
        """What the column's stored values are."""
        raise NotImplementedError

    @property
    def envelope_column(self) -> str:
        """The column, as "table.column", for error messages."""
        raise NotImplementedError


def envelope_type(element: Any) -> EnvelopeColumnType | None:
    """The EncryptedType or BlindIndex of a SQL expression; None for any other type."""
    type_ = getattr(element, "type", None)
    return type_ if isinstance(type_, EnvelopeColumnType) else None


def is_value(operand: Any) -> bool:
    """Whether a comparison's operand is a Python value (not NULL), rather
    than a SQL expression: only the user's code compares a column with one."""
    return not (
        operand is None
        or isinstance(operand, ClauseElement)
        or hasattr(operand, "__clause_element__")
    )


def check_written(op: Any, expr: Any, other: tuple[Any, ...]) -> None:
    """What a comparator refuses as it is written: every comparison that
    cannot mean anything, except ``==`` and ``!=`` between two SQL
    expressions, which SQLAlchemy itself uses to find columns in its lists
    and dicts; those are refused when compiled."""
    operand = other[0] if other else None
    if operand is None or (op in _LOOKUPS and not is_value(operand)):
        return
    check_comparison(op, expr)


def check_comparison(op: Any, *operands: Any) -> None:
    """Refuse comparing ``operands`` with ``op`` unless it can mean something
    for the kind of values each of them holds."""
    if op not in _COMPARISONS:
        return
    for operand in operands:
        type_ = envelope_type(operand)
        if type_ is None:
            continue
        kind = type_.envelope_kind
        if kind is Kind.RANDOMIZED or op not in _EQUALITY:
            what = _SYMBOLS.get(op) or op.__name__.removesuffix("_op").replace("_", " ").upper()
            raise EncryptedComparisonError(
                f"{type_.envelope_column} cannot be compared with {what} in SQL: "
                f"{_WHY[kind]}; IS NULL and IS NOT NULL work"
            )


def _ordered_element(clause: Any, statement: Any) -> Any:
    """What an ORDER BY item orders by: the element inside ASC/DESC, NULLS
    FIRST/LAST and labels; a name given as a string is looked up among the
    statement's columns and the tables they come from."""
    while True:
        if isinstance(clause, _WRAPPERS) or (
            isinstance(clause, elements.UnaryExpression) and clause.modifier in _ORDER_MODIFIERS
        ):
            clause = clause.element
        elif isinstance(clause, elements._textual_label_reference):
            clause = _column_named(statement, clause.element)
        else:
            return clause


def _column_named(statement: Any, name: str) -> Any:
    columns = list(getattr(statement, "selected_columns", ()))
    for source in getattr(statement, "columns_clause_froms", ()):
        columns.extend(source.columns)
    for column in columns:
        if name in (column.key, getattr(column, "name", None)):
            return column
    return None


def _refuse_ordering(clauses: Iterable[Any], statement: Any = None) -> None:
    for clause in clauses:
        type_ = envelope_type(_ordered_element(clause, statement))
        if type_ is not None:
            raise EncryptedComparisonError(
                f"{type_.envelope_column} cannot be used in ORDER BY: "
                f"{_ORDER_WHY[type_.envelope_kind]}. "
                "Order by a plain column, or sort the decrypted values in Python"
            )


Compile = Callable[..., str]


def _original(element: Any, compiler: SQLCompiler, **kw: Any) -> str:
    return element._original_compiler_dispatch(compiler, **kw)  # type: ignore[no-any-return]


def _extend(class_: type[Any], extension: Callable[..., str]) -> None:
    """Compile ``class_`` through ``extension(before, element, compiler, **kw)``,
    where ``before`` is how it compiled until now: SQLAlchemy's own
    compilation, or one another library registered."""
    dispatcher = class_.__dict__.get("_compiler_dispatcher")
    before: Compile = (
        _original if dispatcher is None else dispatcher.specs.get("default", _original)
    )

    def compile_element(element: Any, compiler: SQLCompiler, **kw: Any) -> str:
        return extension(before, element, compiler, **kw)

    compiles(class_)(compile_element)


def _checked(check: Callable[[Any], None]) -> Callable[..., str]:
    def extension(before: Compile, element: Any, compiler: SQLCompiler, **kw: Any) -> str:
        check(element)
        return before(element, compiler, **kw)

    return extension


def _check_binary(binary: Any) -> None:
    check_comparison(binary.operator, binary.left, binary.right)


def _check_statement(statement: Any) -> None:
    _refuse_ordering(statement._order_by_clauses, statement)


def _check_ordered(element: Any) -> None:
    order_by = element.order_by
    if order_by is not None:
        _refuse_ordering(
            order_by.clauses if isinstance(order_by, elements.ClauseList) else [order_by]
        )


def _unquoted_literal(before: Compile, element: Any, compiler: SQLCompiler, **kw: Any) -> str:
    """SQLAlchemy reports a literal value that failed to render with the
    value's repr; for an encrypted column that is the plaintext. The error
    from the type's literal processor is raised instead, without the wrapper."""
    try:
        return before(element, compiler, **kw)
    except exc.CompileError as error:
        cause = error.__cause__
        if cause is None or not (isinstance(cause, EnvelopeError) or envelope_type(element)):
            raise
    raise cause


_WITH_ORDER_BY: list[type[Any]] = [elements.Over, elements.WithinGroup, aggregate_order_by]
if hasattr(elements, "AggregateOrderBy"):  # SQLAlchemy 2.1
    _WITH_ORDER_BY.append(elements.AggregateOrderBy)

_extend(elements.BinaryExpression, _checked(_check_binary))
_extend(Select, _checked(_check_statement))
_extend(CompoundSelect, _checked(_check_statement))
for _class in _WITH_ORDER_BY:
    _extend(_class, _checked(_check_ordered))
_extend(elements.BindParameter, _unquoted_literal)
