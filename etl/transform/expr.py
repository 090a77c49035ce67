"""A small, safe expression language over DataFrame columns, for ``filter`` and ``derive``.

In: the expression text from the job file and, at evaluation, a pandas DataFrame.
Out: ``compile_expr(text)`` gives an ``Expr`` (or raises ``ValueError`` naming the
expression, the column and the rule); ``Expr.evaluate(df)`` gives a pyarrow-backed
``pd.Series`` aligned on ``df.index`` (or a plain Python value when the expression uses
no column); ``Expr.mask(df)`` gives a numpy boolean mask with nulls as False.

The text is parsed with Python's ``ast`` and only the nodes below are accepted; nothing
is ever passed to ``eval``. Evaluation runs on Arrow arrays with ``pyarrow.compute``, so
every column is first viewed as an Arrow array (numpy NaN, ``pd.NA`` and Arrow nulls all
become nulls; categories become their values) and every result is an ``ArrowDtype``.

Grammar::

    fare_amount                       a column, by bare name
    `trip distance`                   a column whose name is not an identifier (or a keyword)
    12  3.5  "card"  True  None       literals
    + - * / // % **   -x              arithmetic (``+`` also joins two strings)
    ==  !=  <  <=  >  >=              comparisons, chained too: ``0 < x <= 5``
    and  or  not                      three-valued, like SQL: null and False is False
    payment in ("card", "cash")       membership in a literal list or tuple (also ``not in``)
    pickup >= "2026-01-01"            a string literal compared with a timestamp/date is parsed

Nulls: arithmetic and comparisons with a null give null; a filter keeps only rows whose
result is true, so rows where it is null are dropped (keep them with ``isnull(x) or ...``).
``/`` always gives float64 (x/0 is inf, 0/0 is NaN); ``//`` and ``%`` on integers give
null where the divisor is 0 and floor like Python (``-7 // 2 == -4``, ``-7 % 2 == 1``).

Functions (the only ones; each with an example):

    minutes(dropoff - pickup)         a time difference in minutes (float64)
    seconds(x)  hours(x)  days(x)     the same in seconds, hours, days
    strftime(pickup, "%Y-%m")         format a timestamp/date: "2026-01" (a month key)
    year(ts)  month(ts)  day(ts)      calendar fields (int64)
    hour(ts)                          hour of a timestamp (int64)
    weekday(ts)                       Monday=0 ... Sunday=6 (int64)
    date(ts)                          the date part (date32)
    isnull(tip)  notnull(tip)         true where null (NaN counts as null) / not null
    lower(s)  upper(s)  strip(s)      string case and surrounding whitespace
    len(s)                            string length in characters (int64)
    contains(s, "air")                literal substring test
    startswith(s, "JFK")  endswith(s, ".csv")
    abs(x)  floor(x)  ceil(x)         absolute value, rounding down / up
    round(x, 2)                       half-to-even rounding to n digits (n defaults to 0)
    where(tip > 0, tip, 0)            per row: a where the condition is true, else b (null cond -> b)
    coalesce(tip, extra, 0)           first non-null argument per row
    clip(x, 0, 100)                   limit to [lo, hi]; None leaves a side open: clip(x, 0, None)
    int(x)  float(x)  str(x)          conversions (int truncates toward zero; strings are trimmed)
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from etl.transform.functions import (
    FUNCTIONS,
    Value,
    _boolean,
    _coerce_literal,
    _is_string,
    _OpError,
)

Node = Callable[["_Frame"], Value]

_CACHE_SIZE = 512  # compiled expressions kept; a job has a few dozen at most
MAX_DEPTH = 100  # operators nested inside each other: each level costs ~3 Python frames when evaluated (limit 1000)
MAX_LENGTH = 10_000  # characters of one expression: the parser recurses once per operator, not per character
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # integer literals must fit Arrow's int64


class ExprError(ValueError):
    """An expression cannot be compiled or evaluated; the message names it."""


# ----------------------------------------------------------------------------- public


@dataclass(frozen=True, eq=False)
class Expr:
    """A compiled expression. Picklable: it pickles as its text and compiles again."""

    text: str
    columns: frozenset[str]
    _root: Node = field(repr=False)

    def evaluate(self, df: pd.DataFrame) -> pd.Series | Any:
        """Evaluate on ``df``: an ArrowDtype Series on ``df.index``, or a Python scalar."""
        value = self._root(_Frame(df, self.text))
        if isinstance(value, pa.ChunkedArray):
            return pd.Series(pd.arrays.ArrowExtensionArray(value), index=df.index, copy=False)
        return value.as_py()

    def mask(self, df: pd.DataFrame) -> np.ndarray:
        """Evaluate as a row filter: a numpy bool array, null counted as False."""
        value = self._root(_Frame(df, self.text))
        if not pa.types.is_boolean(value.type) and not pa.types.is_null(value.type):
            raise ExprError(f"a filter must give true/false, but {self.text!r} gives {value.type}")
        if isinstance(value, pa.Scalar):
            return np.full(len(df), value.as_py() is True)
        filled = pc.fill_null(value.cast(pa.bool_()), False)
        return cast(np.ndarray, filled.to_numpy(zero_copy_only=False).astype(bool, copy=False))

    def __reduce__(self) -> tuple[Any, ...]:
        return (compile_expr, (self.text,))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def compile_expr(text: str) -> Expr:
    """Parse and check ``text``; raises ``ExprError`` (a ``ValueError``) naming the problem."""
    source, names, offsets = _replace_backticks(text)
    stripped = source.lstrip()  # ast rejects leading blanks as an indent
    lead = len(source) - len(stripped)

    def locate(char_pos: int) -> int:
        """1-based column in the user's text of a 0-based position in ``stripped``."""
        pos = char_pos + lead
        new, old = max((o for o in offsets if o[0] <= pos), default=(0, 0))
        return old + (pos - new) + 1

    if len(text) > MAX_LENGTH:
        raise ExprError(f"the expression is {len(text)} characters long; at most {MAX_LENGTH} are allowed")
    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError as e:
        raise ExprError(f"syntax error at column {locate((e.offset or 1) - 1)} in {text!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise ExprError(f"{_short(text)} nests too deeply to parse; at most {MAX_DEPTH} levels are allowed") from None
    _check_size(tree.body, text)
    compiler = _Compiler(text, stripped, names, locate)
    root = compiler.node(tree.body)
    return Expr(text=text, columns=frozenset(compiler.columns), _root=root)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"


def _check_size(root: ast.AST, text: str) -> None:
    """Reject nesting deeper than ``MAX_DEPTH`` and integers beyond int64 (walked without
    recursion, so a deep tree cannot exhaust the stack here)."""
    stack: list[tuple[ast.AST, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ExprError(
                f"{_short(text)} nests operators more than {MAX_DEPTH} levels deep; split it into derive steps"
            )
        if isinstance(node, ast.Constant) and type(node.value) is int and not INT64_MIN <= node.value <= INT64_MAX:
            shown = str(node.value) if node.value.bit_length() < 200 else f"a {len(str(node.value))}-digit number"
            raise ExprError(
                f"integer literal {shown} in {_short(text)} does not fit a 64-bit integer "
                f"({INT64_MIN} to {INT64_MAX}); write it as a float (1e30) if that is meant"
            )
        stack.extend((c, depth + 1) for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr))


def check_expr(text: str) -> Expr:
    """Start-up validation: compile ``text`` or raise ``ValueError``; returns the Expr."""
    return compile_expr(text)


# -------------------------------------------------------------------------- backticks


def _replace_backticks(text: str) -> tuple[str, dict[str, str], list[tuple[int, int]]]:
    """Turn `` `a b` `` into placeholder identifiers, and line breaks into spaces, outside
    string literals (a job file may spread an expression over lines).

    Returns the new text, placeholder -> column name, and (new_pos, old_pos) points where
    the two texts shift, so that error columns can be reported in the user's text.
    """
    out: list[str] = []
    names: dict[str, str] = {}
    offsets: list[tuple[int, int]] = [(0, 0)]
    size = 0  # len("".join(out)), kept as we go
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "`" and not quote:
            end = text.find("`", i + 1)
            if end < 0:
                raise ExprError(f"unterminated backtick at column {i + 1} in {text!r}")
            if end == i + 1:
                raise ExprError(f"empty column name `` at column {i + 1} in {text!r}")
            placeholder = f"__col{len(names)}__"
            names[placeholder] = text[i + 1 : end]
            offsets.append((size, i))
            out.append(placeholder)
            size += len(placeholder)
            offsets.append((size, end + 1))
            i = end + 1
            continue
        if quote and ch == "\\":
            ch = text[i : i + 2]  # keep an escaped quote inside the literal
        elif quote and ch == quote:
            quote = ""
        elif not quote and ch in "'\"":
            quote = ch
        elif not quote and ch in "\r\n\t":
            ch = " "
        out.append(ch)
        size += len(ch)
        i += len(ch)
    return "".join(out), names, offsets


# --------------------------------------------------------------------------- compiling

_BIN_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
_CMP_OPS = {
    ast.Eq: "equal",
    ast.NotEq: "not_equal",
    ast.Lt: "less",
    ast.LtE: "less_equal",
    ast.Gt: "greater",
    ast.GtE: "greater_equal",
}
_SYNTAX_NAMES = {
    "Attribute": "attribute access",
    "Subscript": "indexing",
    "Lambda": "a lambda",
    "IfExp": "a conditional",
    "Dict": "a dict",
    "Set": "a set",
    "List": "a list outside 'in'",
    "Tuple": "a tuple outside 'in'",
    "NamedExpr": "':='",
    "ListComp": "a comprehension",
    "GeneratorExp": "a comprehension",
    "SetComp": "a comprehension",
    "DictComp": "a comprehension",
    "JoinedStr": "an f-string",
    "Starred": "'*'",
}
_ALLOWED = "column names, literals, + - * / // % **, comparisons, and/or/not, in (...), function calls"


class _Compiler:
    def __init__(self, text: str, source: str, names: dict[str, str], locate: Callable[[int], int]) -> None:
        self.text, self.source, self.names, self.locate = text, source, names, locate
        self.columns: set[str] = set()

    def fail(self, node: ast.AST, what: str, hint: str = "") -> ExprError:
        byte_pos = getattr(node, "col_offset", 0)  # ast counts UTF-8 bytes
        char_pos = len(self.source.encode()[:byte_pos].decode(errors="ignore"))
        where = f"{what} at column {self.locate(char_pos)} in {self.text!r}"
        return ExprError(f"{where}; {hint}" if hint else where)

    def show(self, node: ast.AST) -> str:
        shown = ast.unparse(node)
        for placeholder, name in self.names.items():
            shown = shown.replace(placeholder, f"`{name}`")
        return shown

    def node(self, node: ast.AST) -> Node:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            kind = _SYNTAX_NAMES.get(type(node).__name__, "this syntax")
            hint = "use where(cond, a, b)" if isinstance(node, ast.IfExp) else f"allowed: {_ALLOWED}"
            raise self.fail(node, f"{kind} ({self.show(node)!r}) is not allowed", hint)
        inner: Node = method(node)
        if isinstance(node, (ast.Name, ast.Constant)):
            return inner
        return self.wrap(node, inner)

    def wrap(self, node: ast.AST, inner: Node) -> Node:
        shown = self.show(node)

        def run(frame: _Frame) -> Value:
            try:
                return inner(frame)
            except (_OpError, pa.ArrowException, TypeError) as e:
                raise ExprError(f"cannot evaluate {shown!r} in {frame.text!r}: {_explain(e)}") from e

        return run

    def _Name(self, node: ast.Name) -> Node:
        name = self.names.get(node.id, node.id)
        self.columns.add(name)
        return lambda frame: frame.column(name)

    def _Constant(self, node: ast.Constant) -> Node:
        value = node.value
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise self.fail(node, f"literal {value!r} is not allowed (numbers, strings, True/False, None)")
        scalar = pa.scalar(value)
        return lambda frame: scalar

    def _UnaryOp(self, node: ast.UnaryOp) -> Node:
        operand = self.node(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda f: pc.invert(_boolean(operand(f), "not"))
        if isinstance(node.op, ast.USub):
            return lambda f: pc.negate(operand(f))
        return operand  # unary plus

    def _BinOp(self, node: ast.BinOp) -> Node:
        op = _BIN_OPS.get(type(node.op))
        if op is None:
            raise self.fail(node, f"the operator in {self.show(node)!r} is not allowed", f"allowed: {_ALLOWED}")
        left, right, fn = self.node(node.left), self.node(node.right), _ARITH[op]
        return lambda f: fn(left(f), right(f))

    def _BoolOp(self, node: ast.BoolOp) -> Node:
        parts = [self.node(v) for v in node.values]
        name, fn = ("and", pc.and_kleene) if isinstance(node.op, ast.And) else ("or", pc.or_kleene)
        return lambda f: functools.reduce(fn, (_boolean(p(f), name) for p in parts))

    def _Compare(self, node: ast.Compare) -> Node:
        if len(node.ops) > 1 and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            raise self.fail(node, f"'in' cannot be chained in {self.show(node)!r}; use 'and'")
        self.refuse_none(node)
        operands = [self.node(node.left)]
        steps: list[Callable[[Value, Value], Value]] = []
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                steps.append(_membership(self.literal_list(right), negate=isinstance(op, ast.NotIn)))
                operands.append(lambda f: pa.scalar(None))  # the list is baked into the step
            elif type(op) in _CMP_OPS:
                steps.append(functools.partial(_compare, _CMP_OPS[type(op)]))
                operands.append(self.node(right))
            else:
                raise self.fail(node, f"comparison {self.show(node)!r} is not allowed (use == or !=)")

        def run(f: _Frame) -> Value:
            values = [o(f) for o in operands]
            results = [step(values[i], values[i + 1]) for i, step in enumerate(steps)]
            return functools.reduce(pc.and_kleene, results)

        return run

    def refuse_none(self, node: ast.Compare) -> None:
        """``x == None`` is null on every row (a filter keeps nothing, silently): refuse it,
        and ``x is None`` too, pointing at ``isnull(x)`` / ``notnull(x)``."""
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            is_none = [isinstance(n, ast.Constant) and n.value is None for n in (left, right)]
            if any(is_none) and isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)):
                other = self.show(right if is_none[0] else left)
                fn = "isnull" if isinstance(op, (ast.Eq, ast.Is)) else "notnull"
                why = (
                    "is not allowed"
                    if isinstance(op, (ast.Is, ast.IsNot))
                    else "is null on every row (a comparison with None is never true or false)"
                )
                raise self.fail(node, f"comparison {self.show(node)!r} {why}", f"use {fn}({other})")
            left = right

    def literal_list(self, node: ast.AST) -> list[Any]:
        if not isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            raise self.fail(
                node,
                f'the right side of \'in\' must be a literal list like ("a", "b"), got {self.show(node)!r}',
            )
        return [self.literal(e) for e in node.elts]

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = self.literal(node.operand)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return -value
        elif isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float, str, type(None))):
            return node.value
        raise self.fail(node, f"expected a literal (number, string, True/False, None), got {self.show(node)!r}")

    def _Call(self, node: ast.Call) -> Node:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, f"only plain function calls are allowed, got {self.show(node.func)!r}")
        name = node.func.id
        spec = FUNCTIONS.get(name)
        if spec is None:
            raise self.fail(node, f"unknown function {name!r}", f"known: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, f"{name}() takes positional arguments only")
        if not spec.min_args <= len(node.args) <= spec.max_args:
            want = spec.min_args if spec.min_args == spec.max_args else f"{spec.min_args} to {spec.max_args}"
            raise self.fail(node, f"{name}() takes {want} argument(s), got {len(node.args)}")
        args: list[Any] = []
        for i, arg in enumerate(node.args):
            if i in spec.literals:
                value = self.literal(arg)
                if not isinstance(value, spec.literals[i]) or isinstance(value, bool):
                    kind = spec.literals[i].__name__
                    raise self.fail(
                        arg, f"argument {i + 1} of {name}() must be a {kind} literal, got {self.show(arg)!r}"
                    )
                args.append(value)
            else:
                args.append(self.node(arg))
        impl = spec.impl
        return lambda f: impl(*(a(f) if callable(a) else a for a in args))


# ------------------------------------------------------------------------- evaluation


class _Frame:
    """The DataFrame being evaluated, with its columns converted to Arrow once each."""

    def __init__(self, df: pd.DataFrame, text: str) -> None:
        self.df, self.text = df, text
        self.cache: dict[str, pa.ChunkedArray] = {}

    def column(self, name: str) -> pa.ChunkedArray:
        if name not in self.cache:
            if name not in self.df.columns:
                available = ", ".join(map(str, self.df.columns))
                raise ExprError(f"unknown column {name!r} in {self.text!r}; available columns: {available}")
            self.cache[name] = to_arrow(self.df[name])
        return self.cache[name]


def to_arrow(series: pd.Series) -> pa.ChunkedArray:
    """A column as Arrow: nulls for NaN/NA, dictionaries decoded, large strings as strings."""
    if isinstance(series.dtype, pd.ArrowDtype):
        arr = series.array.__arrow_array__()
    else:
        arr = pa.chunked_array([pa.array(series, from_pandas=True)])
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())  # one string type keeps kernels' type matching simple
    return arr


def _explain(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, pa.ArrowNotImplementedError) and "no kernel matching" in text:
        types = text.split("input types", 1)[-1].strip()
        return f"not defined for types {types}; convert the column first (a cast step)"
    return text


def _compare(kernel: str, a: Value, b: Value) -> Value:
    a, b = _coerce_literal(a, b)
    return getattr(pc, kernel)(a, b)


def _membership(values: list[Any], *, negate: bool) -> Callable[[Value, Value], Value]:
    def run(x: Value, _unused: Value) -> Value:
        if isinstance(x, pa.Scalar):
            return run(pa.chunked_array([pa.array([x.as_py()], x.type)]), _unused)[0]
        try:
            value_set = pa.array(values).cast(x.type) if values else pa.array([], x.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise _OpError(f"cannot compare {x.type} values with the list {values!r}") from None
        found = pc.is_in(x, value_set=value_set)
        found = pc.if_else(pc.is_null(x), pa.scalar(None, pa.bool_()), found)  # null in (...) is null
        return pc.invert(found) if negate else found

    return run


def _is_int(v: Value) -> bool:
    return cast(bool, pa.types.is_integer(v.type))


def _to_float(v: Value) -> Value:
    return v.cast(pa.float64()) if _is_int(v) or pa.types.is_null(v.type) else v


def _add(a: Value, b: Value) -> Value:
    a, b = _coerce_literal(a, b)
    if _is_string(a.type) and _is_string(b.type):
        return pc.binary_join_element_wise(a.cast(pa.string()), b.cast(pa.string()), "")
    return pc.add(a, b)


def _true_divide(a: Value, b: Value) -> Value:
    return pc.divide(_to_float(a), _to_float(b))  # float division: x/0 is ±inf, 0/0 NaN


def _floor_divide(a: Value, b: Value) -> Value:
    if _is_int(a) and _is_int(b):
        safe_b = pc.if_else(pc.equal(b, 0), pa.scalar(None, b.type), b)  # x // 0 is null
        q = pc.divide(a, safe_b)  # Arrow truncates toward zero; Python floors
        r = pc.subtract(a, pc.multiply(q, safe_b))
        off = pc.and_(pc.not_equal(r, 0), pc.not_equal(pc.less(r, 0), pc.less(safe_b, 0)))
        return pc.subtract(q, off.cast(q.type))
    return pc.floor(_true_divide(a, b))


def _modulo(a: Value, b: Value) -> Value:
    if _is_int(a) and _is_int(b):
        return pc.subtract(a, pc.multiply(_floor_divide(a, b), b))
    a, b = _to_float(a), _to_float(b)
    return pc.subtract(a, pc.multiply(pc.floor(pc.divide(a, b)), b))


def _power(a: Value, b: Value) -> Value:
    if _is_int(a) and _is_int(b) and not (isinstance(b, pa.Scalar) and (b.as_py() or 0) >= 0):
        a, b = _to_float(a), _to_float(b)  # a negative integer exponent needs floats
    return pc.power(a, b)


def _arith(kernel: str) -> Callable[[Value, Value], Value]:
    def run(a: Value, b: Value) -> Value:
        a, b = _coerce_literal(a, b)
        return getattr(pc, kernel)(a, b)

    return run


_ARITH: dict[str, Callable[[Value, Value], Value]] = {
    "+": _add,
    "-": _arith("subtract"),
    "*": _arith("multiply"),
    "/": _true_divide,
    "//": _floor_divide,
    "%": _modulo,
    "**": _power,
}
