"""What SQL can mean on encrypted columns, and where the rest is refused.

Randomized ciphertext equals nothing, deterministic ciphertext equals only the
same value, and a blind index holds keyed digests of whole normalized values;
none of them has an order, patterns or arithmetic. The types' comparators
refuse what cannot mean anything as it is written, except ``==`` and ``!=``
between two SQL expressions: SQLAlchemy itself compares columns that way to
find them in its lists and dicts, without ever compiling the result. Those
comparisons, ORDER BY (which has no operator) and the values INSERT and
UPDATE write are checked when a statement is compiled: once per statement, as
the compiled cache keeps the result.

Wherever SQL puts a value among a column's values (compared with it, written
to it, a branch of a CASE or COALESCE of its values), a bound parameter or
literal is processed by the column's type, whatever type it was created
with, so that it is encrypted or hashed; anything else there must be NULL or
hold the same encrypted values (the column itself, or one with the same
context and storage). Literal values are rendered as ciphertext or digests by
the types; this module keeps SQLAlchemy from wrapping a failure to render one
in an error that quotes the plaintext.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import exc
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import elements, functions, operators
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.elements import (
    BindParameter,
    Case,
    Cast,
    ClauseElement,
    ClauseList,
    ColumnClause,
    Null,
    Tuple,
    TypeCoerce,
)
from sqlalchemy.sql.selectable import CompoundSelect, ScalarSelect, Select, SelectBase

from ..errors import EncryptedComparisonError, EncryptedExpressionError, EnvelopeError

__all__ = [
    "EnvelopeColumnType",
    "Kind",
    "check_written",
    "envelope_type",
    "is_value",
    "same_values",
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
_NULL_TESTS = frozenset({operators.is_, operators.is_not})
_IN = frozenset({operators.in_op, operators.not_in_op})
# Custom operators (``column.op("=")``) that mean equality.
_EQUAL_OPSTRINGS = frozenset({"=", "!=", "<>", "IS DISTINCT FROM", "IS NOT DISTINCT FROM"})

_SYMBOLS = {
    operators.eq: "=",
    operators.ne: "!=",
    operators.lt: "<",
    operators.le: "<=",
    operators.gt: ">",
    operators.ge: ">=",
    operators.is_: "IS",
    operators.is_not: "IS NOT",
    operators.add: "+",
    operators.sub: "-",
    operators.mul: "*",
    operators.truediv: "/",
    operators.mod: "%",
    operators.concat_op: "||",
    operators.getitem: "[]",
}

_WHY = {
    Kind.RANDOMIZED: (
        "each value is encrypted with a fresh nonce, so no comparison could ever "
        "match. Use a blind index or EncryptedType(..., deterministic=True) for "
        "equality lookups"
    ),
    Kind.DETERMINISTIC: (
        "the order, patterns and arithmetic of deterministic ciphertext say nothing "
        "about the plaintext; only equality works (==, !=, IN, IS [NOT] DISTINCT FROM)"
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
_TRANSPARENT = (elements.Label, elements.Grouping)

# SQL functions whose result is one of their arguments' values.
_ONE_OF_ARGUMENTS: tuple[type[Any], ...] = (functions.coalesce, functions.max, functions.min)


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

    @property
    def envelope_values(self) -> Hashable | None:
        """What the stored values are encrypted or hashed for: two columns
        hold interchangeable values exactly when theirs are equal; None when
        unknown (a type not attached to a column)."""
        raise NotImplementedError


def envelope_type(element: Any) -> EnvelopeColumnType | None:
    """The EncryptedType or BlindIndex of a SQL expression; None for any other type."""
    type_ = getattr(element, "type", None)
    return type_ if isinstance(type_, EnvelopeColumnType) else None


def same_values(a: EnvelopeColumnType, b: EnvelopeColumnType) -> bool:
    """Whether a value stored by one type reads (and compares) as the same
    value in the other: same kind, context and storage."""
    if a is b:
        return True
    values = a.envelope_values
    return values is not None and values == b.envelope_values


def is_value(operand: Any) -> bool:
    """Whether a comparison's operand is a Python value (not NULL), rather
    than a SQL expression: only the user's code compares a column with one."""
    return not (
        operand is None
        or isinstance(operand, ClauseElement)
        or hasattr(operand, "__clause_element__")
    )


def _is_equality(op: Any) -> bool:
    if isinstance(op, operators.custom_op):
        return " ".join(op.opstring.split()).upper() in _EQUAL_OPSTRINGS
    return op in _EQUALITY


def check_written(op: Any, expr: Any, other: tuple[Any, ...]) -> None:
    """What a comparator refuses as it is written: every operator that
    cannot mean anything on the column's values, except ``==`` and ``!=``
    between two SQL expressions, which SQLAlchemy itself uses to find columns
    in its lists and dicts; those are checked when compiled."""
    type_ = envelope_type(expr)
    if type_ is None or not other:  # unary: ASC, DESC, DISTINCT...
        return
    operand = other[0]
    if operand is None or (op in _NULL_TESTS and isinstance(operand, Null)):
        return
    lookup = op in _LOOKUPS or (isinstance(op, operators.custom_op) and _is_equality(op))
    if lookup and not is_value(operand):
        return
    _refuse_operator(op, type_)


def _refuse_operator(op: Any, type_: EnvelopeColumnType) -> None:
    """Refuse ``op`` on ``type_``'s values unless it can mean something for
    them: equality on deterministic ciphertext and blind indexes."""
    kind = type_.envelope_kind
    if kind is not Kind.RANDOMIZED and _is_equality(op):
        return
    if isinstance(op, operators.custom_op):
        what, verb = op.opstring, "compared with"
    else:
        what = _SYMBOLS.get(op) or op.__name__.removesuffix("_op").replace("_", " ").upper()
        verb = "compared with" if op in _COMPARISONS or op in _NULL_TESTS else "used with"
    raise EncryptedComparisonError(
        f"{type_.envelope_column} cannot be {verb} {what} in SQL: "
        f"{_WHY[kind]}; IS NULL and IS NOT NULL work"
    )


# -- Values among a column's values --------------------------------------------

_RETYPED = "_envelope_retyped"


def _retype(compiler: SQLCompiler, bind: BindParameter[Any], type_: Any) -> None:
    """Have ``bind`` compiled with ``type_``, as SQLAlchemy does itself for a
    parameter created without a type: see `_compile_bind`."""
    found = envelope_type(bind)
    if bind.type is type_ or (found is not None and same_values(found, type_)):
        return
    vars(compiler).setdefault(_RETYPED, {})[bind] = type_


def _describe(element: Any) -> str:
    """A SQL expression for an error message, by its kind and type: never
    its text, which may hold a value."""
    if isinstance(element, functions.FunctionElement):
        return f"the SQL function {getattr(element, 'name', '')}()"
    type_ = getattr(element, "type", None)
    kind = "a CAST" if isinstance(element, Cast) else "a SQL expression"
    if type_ is None or type_._isnull:
        return kind
    return f"{kind} of type {type(type_).__name__}"


def _foreign(compiler: SQLCompiler, type_: EnvelopeColumnType, element: Any) -> str | None:
    """What in ``element``, where SQL puts it among ``type_``'s values, holds
    other values (None if nothing does). A bound parameter or literal there
    is made to take ``type_``, so that it is encrypted or hashed."""
    while isinstance(element, _TRANSPARENT):
        element = element.element
    if element is None or isinstance(element, Null):
        return None
    if isinstance(element, BindParameter):
        _retype(compiler, element, type_)
        return None
    if isinstance(element, ScalarSelect):
        element = element.element
    if isinstance(element, SelectBase):
        columns = list(element.selected_columns)
        if len(columns) != 1:
            return "a SELECT of several columns"
        return _foreign(compiler, type_, columns[0])
    found = envelope_type(element)
    if found is None:
        return _describe(element)
    if not same_values(found, type_):
        return f"the values of {found.envelope_column}, which are encrypted for another column"
    # A column holds the values as they are, type_coerce() and CAST say so; a
    # CASE or COALESCE of them checks its own parts when it is compiled.
    if isinstance(element, (ColumnClause, TypeCoerce, Case, Cast, *_ONE_OF_ARGUMENTS)):
        return None
    return _describe(element)


def _check_part(compiler: SQLCompiler, type_: EnvelopeColumnType, part: Any) -> None:
    what = _foreign(compiler, type_, part)
    if what is not None:
        raise EncryptedExpressionError(
            f"a CASE, COALESCE, MIN or MAX of the values of {type_.envelope_column} also holds "
            f"{what}, which the database would mix with them as it is: give Python values, "
            "NULL or the column's own values"
        )


def _check_compared(compiler: SQLCompiler, op: Any, left: Any, right: Any) -> None:
    """Refuse comparing ``left`` with ``right`` by ``op`` unless it can mean
    something for the values each holds; make bound parameters and literals
    compared with a column take its type."""
    while isinstance(left, _TRANSPARENT):
        left = left.element
    while isinstance(right, _TRANSPARENT):
        right = right.element
    if op in _IN and isinstance(right, ClauseList) and not isinstance(right, Tuple):
        for item in right.clauses:  # IN (a, b, ...)
            _check_compared(compiler, op, left, item)
    elif isinstance(left, Tuple):
        _check_tuple(compiler, op, left, right)
    elif isinstance(right, Tuple):
        _check_tuple(compiler, op, right, left)
    else:
        sides = ((left, right), (right, left))
        for side, other in sides:
            type_ = envelope_type(side)
            if type_ is not None and not (op in _NULL_TESTS and isinstance(other, Null)):
                _refuse_operator(op, type_)
        for side, other in sides:
            _check_side(compiler, op, side, other)


def _check_side(compiler: SQLCompiler, op: Any, side: Any, other: Any) -> None:
    """Check what a comparison by ``op`` compares ``side``'s values with, if
    it holds encrypted values."""
    type_ = envelope_type(side)
    if type_ is None or (op in _NULL_TESTS and isinstance(other, Null)):
        return
    _refuse_operator(op, type_)
    what = _foreign(compiler, type_, side) or _foreign(compiler, type_, other)
    if what is not None:
        raise EncryptedComparisonError(
            f"{type_.envelope_column} can only be compared with Python values, NULL or its "
            f"own values (a column with the same context and storage), not with {what}: the "
            "database would compare its values with it as it is"
        )


def _check_tuple(compiler: SQLCompiler, op: Any, tuple_: Any, other: Any) -> None:
    """A tuple comparison compares elements pairwise; a parameter holding
    whole tuples takes the tuple's types, as SQLAlchemy gives them to one
    created without a type."""
    if isinstance(other, ScalarSelect):
        other = other.element
    if isinstance(other, Tuple | SelectBase):
        others = other.clauses if isinstance(other, Tuple) else other.selected_columns
        for element, item in zip(tuple_.clauses, others, strict=False):
            _check_compared(compiler, op, element, item)
        return
    encrypted = [e for e in tuple_.clauses if envelope_type(e) is not None]
    if not encrypted:
        return
    if not isinstance(other, BindParameter):
        _check_side(compiler, op, encrypted[0], other)
        return
    for element in encrypted:
        _check_side(compiler, op, element, None)
    _retype(compiler, other, tuple_.type)


def _assignments(statement: Any) -> Iterator[tuple[Any, Any, bool]]:
    """Each column an INSERT or UPDATE writes, the SQL it gives it, and
    whether that is a column of INSERT ... FROM SELECT: its VALUES or SET,
    each row of a multi-row VALUES, the SELECT's columns, an upsert's SET."""
    table = statement.table
    columns = getattr(table, "c", None)
    pairs: list[tuple[Any, Any]] = list((statement._values or {}).items())
    pairs.extend(getattr(statement, "_ordered_values", None) or ())  # SQLAlchemy 2.0
    for rows in statement._multi_values:
        for row in rows:
            pairs.extend(
                row.items() if isinstance(row, Mapping) else zip(table.c, row, strict=False)
            )
    clause = getattr(statement, "_post_values_clause", None)
    for attribute in ("update_values_to_set", "update"):  # ON CONFLICT, ON DUPLICATE KEY
        sets = getattr(clause, attribute, None)
        if isinstance(sets, Mapping):
            pairs.extend(sets.items())
        elif isinstance(sets, list):
            pairs.extend(sets)
    select = getattr(statement, "select", None)
    selected = (
        []
        if select is None
        else zip(statement._select_names, select.selected_columns, strict=False)
    )
    for is_selected, items in ((False, pairs), (True, selected)):
        for key, value in items:
            if isinstance(key, str):
                key = columns.get(key) if columns is not None else None
            elif hasattr(key, "__clause_element__"):  # an ORM attribute
                key = key.__clause_element__()
            yield key, value, is_selected


# -- ORDER BY -------------------------------------------------------------------


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


# -- Compile hooks ----------------------------------------------------------------

Compile = Callable[..., str]


def _original(element: Any, compiler: SQLCompiler, **kw: Any) -> str:
    return element._original_compiler_dispatch(compiler, **kw)  # type: ignore[no-any-return]


def extend_compilation(class_: type[Any], extension: Callable[..., str]) -> None:
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


def _checked(check: Callable[[SQLCompiler, Any], None]) -> Callable[..., str]:
    def extension(before: Compile, element: Any, compiler: SQLCompiler, **kw: Any) -> str:
        check(compiler, element)
        return before(element, compiler, **kw)

    return extension


def _check_binary(compiler: SQLCompiler, binary: Any) -> None:
    _check_compared(compiler, binary.operator, binary.left, binary.right)


def _check_writes(compiler: SQLCompiler, statement: Any) -> None:
    for column, value, selected in _assignments(statement):
        type_ = envelope_type(column)
        if type_ is None or not isinstance(value, ClauseElement):
            continue  # a plain column, or a Python value, which takes the column's type
        if selected and isinstance(value, ColumnClause) and envelope_type(value) is None:
            # INSERT ... FROM SELECT moves stored values as they are: that is
            # how Alembic copies a table whose columns it read from the database.
            continue
        what = _foreign(compiler, type_, value)
        if what is not None:
            raise EncryptedExpressionError(
                f"{type_.envelope_column} cannot be set to {what}: the database would store "
                "it as it is. Set it to a Python value (which the column encrypts or hashes), "
                "NULL, or its own values (the column itself, or one with the same context and "
                "storage)"
            )


def _check_case(compiler: SQLCompiler, case: Any) -> None:
    if envelope_type(case.value) is not None:  # CASE value WHEN ...: equality
        for when, _ in case.whens:
            _check_compared(compiler, operators.eq, case.value, when)
    type_ = envelope_type(case)
    if type_ is not None:
        for part in [then for _, then in case.whens] + [case.else_]:
            _check_part(compiler, type_, part)


def _check_cast(compiler: SQLCompiler, cast: Any) -> None:
    """CAST(x AS an encrypted type) says that x holds its values, as
    type_coerce() does; a literal cast so is encrypted, as a Python value is."""
    clause = cast.clause
    while isinstance(clause, _TRANSPARENT):
        clause = clause.element
    if envelope_type(cast) is not None and isinstance(clause, BindParameter):
        _retype(compiler, clause, cast.type)


def _check_arguments(compiler: SQLCompiler, function: Any) -> None:
    type_ = envelope_type(function)
    if type_ is not None:
        for argument in function.clauses.clauses:
            _check_part(compiler, type_, argument)


def _check_statement(compiler: SQLCompiler, statement: Any) -> None:
    _refuse_ordering(statement._order_by_clauses, statement)


def _check_ordered(compiler: SQLCompiler, element: Any) -> None:
    order_by = element.order_by
    if order_by is not None:
        _refuse_ordering(
            order_by.clauses if isinstance(order_by, elements.ClauseList) else [order_by]
        )


def _retyped(compiler: SQLCompiler, bind: BindParameter[Any]) -> Any:
    """The type a check gave ``bind`` (None if none did); SQLAlchemy may
    compile a copy of it (an upsert's SET)."""
    retyped = vars(compiler).get(_RETYPED)
    if not retyped:
        return None
    for original in bind._cloned_set:
        type_ = retyped.get(original)
        if type_ is not None:
            return type_
    return None


def _compile_bind(before: Compile, bind: Any, compiler: SQLCompiler, **kw: Any) -> str:
    """A bound parameter, with the type a check gave it. One parameter name
    stands for one value, processed by one type: a name used both for an
    encrypted column and for other values is refused."""
    type_ = _retyped(compiler, bind)
    if type_ is not None and bind.type is not type_:
        bind = bind._with_binary_element_type(type_)
    existing = compiler.binds.get(bind.key)
    if existing is not None and existing is not bind:
        _refuse_shared_name(existing, bind)
    return _unquoted_literal(before, bind, compiler, **kw)


def _refuse_shared_name(a: BindParameter[Any], b: BindParameter[Any]) -> None:
    type_a, type_b = envelope_type(a), envelope_type(b)
    if (type_a is None and type_b is None) or a.type._isnull or b.type._isnull:
        return
    if type_a is not None and type_b is not None and same_values(type_a, type_b):
        return
    column = (type_a or type_b).envelope_column  # type: ignore[union-attr]
    raise EncryptedExpressionError(
        f"the bound parameter {b.key!r} stands both for a value of {column} and for a value "
        "of another type in one statement, so its one value would be encrypted for one use "
        "and wrong for the other: give each use its own name"
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

extend_compilation(elements.BinaryExpression, _checked(_check_binary))
extend_compilation(Select, _checked(_check_statement))
extend_compilation(CompoundSelect, _checked(_check_statement))
for _class in _WITH_ORDER_BY:
    extend_compilation(_class, _checked(_check_ordered))
extend_compilation(Insert, _checked(_check_writes))
extend_compilation(Update, _checked(_check_writes))
extend_compilation(Case, _checked(_check_case))
extend_compilation(Cast, _checked(_check_cast))
for _class in _ONE_OF_ARGUMENTS:
    extend_compilation(_class, _checked(_check_arguments))
extend_compilation(elements.BindParameter, _compile_bind)
