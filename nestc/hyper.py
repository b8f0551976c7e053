"""Hyperparameters: constant evaluation of defaults and their validation with pydantic."""

from __future__ import annotations

import math
from typing import Any

from nestc import ast
from nestc.errors import NestError, did_you_mean

UNKNOWN = object()  # a value that depends on data, not only on hyperparameters
MAX_INT_BITS = 64


def const_eval(expr: ast.Expr, env: dict[str, Any]) -> Any:
    """The value of an expression over hyperparameters, or UNKNOWN; NestError for a bad constant."""
    if isinstance(expr, ast.ExprNumber):
        v = expr.value
        if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
            raise NestError("integer literal is too large", expr.span, kind="value")
        if isinstance(v, float) and math.isinf(v):
            raise NestError("number is too large for a float", expr.span, kind="value")
        return v
    if isinstance(expr, ast.ExprBool):
        return expr.value
    if isinstance(expr, ast.ExprString):
        return expr.value
    if isinstance(expr, ast.ExprName):
        return env.get(expr.name, UNKNOWN)
    if isinstance(expr, (ast.ExprTuple, ast.ExprList)):
        items = [const_eval(i, env) for i in expr.items]
        if any(i is UNKNOWN for i in items):
            return UNKNOWN
        return tuple(items) if isinstance(expr, ast.ExprTuple) else list(items)
    if isinstance(expr, ast.ExprUnary):
        v = const_eval(expr.operand, env)
        if v is UNKNOWN:
            return UNKNOWN
        if expr.op == "not":
            return not v
        if not _is_num(v):
            raise NestError(f"`{expr.op}` needs a number, got {_kind(v)}", expr.span, kind="type")
        return _bounded(expr, -v if expr.op == "-" else v)
    if isinstance(expr, ast.ExprBinary):
        a, b = const_eval(expr.left, env), const_eval(expr.right, env)
        if a is UNKNOWN or b is UNKNOWN:
            return UNKNOWN
        return _bounded(expr, _binary(expr, a, b))
    if isinstance(expr, ast.ExprIndex):
        base = const_eval(expr.base, env)
        idx = [const_eval(i, env) for i in expr.index]
        if base is UNKNOWN or any(i is UNKNOWN for i in idx):
            return UNKNOWN
        if not isinstance(base, (tuple, list)):
            return UNKNOWN
        if len(idx) != 1 or not isinstance(idx[0], int) or isinstance(idx[0], bool):
            raise NestError("an index into a tuple or list is one integer", expr.span, kind="type")
        if not -len(base) <= idx[0] < len(base):
            raise NestError(f"index {idx[0]} is out of range for {len(base)} items", expr.span,
                            kind="value")
        return base[idx[0]]
    if isinstance(expr, ast.ExprCond):
        c = const_eval(expr.cond, env)
        if c is UNKNOWN:
            return UNKNOWN
        return const_eval(expr.then if c else expr.orelse, env)
    return UNKNOWN


def _bounded(expr: ast.Expr, v: Any) -> Any:
    """v, unless arithmetic left the numbers a spec can mean: a 64-bit int or a finite float.
    Bounding every result also keeps chains such as `((2 ** 64) ** 64) ** 64` instant."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
        raise NestError(f"integer is too large (more than {MAX_INT_BITS} bits)", expr.span,
                        kind="value")
    if isinstance(v, float) and not math.isfinite(v):
        raise NestError("number is too large for a float", expr.span, kind="value")
    if isinstance(v, complex):
        raise NestError("a negative number to a fractional power is not a real number", expr.span,
                        kind="value")
    return v


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", tuple: "a tuple",
            list: "a list"}.get(type(v), type(v).__name__)


def _binary(expr: ast.ExprBinary, a: Any, b: Any) -> Any:
    op = expr.op
    if op in ("and", "or"):
        return (a and b) if op == "and" else (a or b)
    if op in ("==", "!="):
        return (a == b) if op == "==" else (a != b)
    if not (_is_num(a) and _is_num(b)):
        raise NestError(f"`{op}` needs numbers, got {_kind(a)} and {_kind(b)}", expr.span,
                        kind="type")
    try:
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            q = a / b
            return int(q) if isinstance(a, int) and isinstance(b, int) and a % b == 0 else q
        if op == "%":
            return a % b
        if op == "**":
            if abs(b) > 1024 or (isinstance(a, int) and isinstance(b, int) and abs(a) > 2 and b > 64):
                raise NestError("exponent is too large", expr.span, kind="value")
            return a ** b
        if op in ("<", ">", "<=", ">="):
            return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]
    except ZeroDivisionError:
        raise NestError("division by zero", expr.span, kind="value") from None
    except OverflowError:
        raise NestError("number is too large", expr.span, kind="value") from None
    return UNKNOWN


# --- types ------------------------------------------------------------------------------------

SCALAR_TYPES = ("int", "float", "bool", "str")
# how deep a hyperparameter's type or value may nest lists and tuples (deeper ones took
# time doubling with each level, or ran out of Python's recursion in pydantic)
MAX_TYPE_DEPTH = 32


def nesting(value: Any) -> int:
    """How deep a value nests lists and tuples (0 for a number)."""
    if isinstance(value, (list, tuple)):
        return 1 + max((nesting(v) for v in value), default=0)
    return 0


def _ann_nesting(ann: ast.TypeAnn) -> int:
    return 0 if not ann.args else 1 + max(_ann_nesting(a) for a in ann.args)


def check_nesting(ann: ast.TypeAnn | None, default: Any, span: Any) -> None:
    """A NestError where a type (at its span) or a default (at `span`) nests more than
    MAX_TYPE_DEPTH deep."""
    if ann is not None and _ann_nesting(ann) > MAX_TYPE_DEPTH:
        raise NestError(f"this type nests lists or tuples more than {MAX_TYPE_DEPTH} deep",
                        ann.span, kind="type")
    if nesting(default) > MAX_TYPE_DEPTH:
        raise NestError(f"this value nests lists or tuples more than {MAX_TYPE_DEPTH} deep",
                        span, kind="value")


def python_type(ann: ast.TypeAnn) -> Any:
    """The pydantic-checkable Python type of an annotation; NestError for an unknown type."""
    from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

    # StrictFloat takes ints too (as floats), but not bools or strings such as "0.1"
    scalars = {"int": StrictInt, "float": StrictFloat, "bool": StrictBool, "str": StrictStr}
    if ann.name in scalars and not ann.args:
        return scalars[ann.name]
    if ann.name == "tuple":
        return tuple[tuple(python_type(a) for a in ann.args)]  # type: ignore[misc]
    if ann.name == "list" and len(ann.args) == 1:
        return list[python_type(ann.args[0])]  # type: ignore[misc]
    known = [*SCALAR_TYPES, "list[...]", "(a, b)"]
    raise NestError(f"unknown type `{ann}`", ann.span, kind="type",
                    hint=did_you_mean(ann.name, SCALAR_TYPES) or f"types are {', '.join(known)}")


def infer_type(value: Any) -> Any:
    """The type of a hyperparameter declared without one, from its default."""
    from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr

    if isinstance(value, bool):
        return StrictBool
    if isinstance(value, int):
        return StrictInt | StrictFloat  # an int default such as `momentum = 0` also takes floats
    if isinstance(value, float):
        return StrictFloat
    if isinstance(value, str):
        return StrictStr
    if isinstance(value, tuple):
        return tuple[tuple(infer_type(v) for v in value)]  # type: ignore[misc]
    if isinstance(value, list):
        types = [infer_type(v) for v in value]  # (once each: twice doubled with each level)
        items = {repr(t): t for t in types}
        # a list of one kind of item takes more of that kind; a mixed one takes any list
        return list[next(iter(items.values()))] if len(items) == 1 else list  # type: ignore[misc]
    return Any


def type_words(tp: Any) -> str:
    """A type as the spec writes it, with an article: `a float`, `a list of ints`,
    `a tuple (float, float)`."""
    return _type_words(tp, article=True)


def _type_words(tp: Any, article: bool) -> str:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_words(args[0], article)
    if origin in (typing.Union, types.UnionType):
        if {_type_words(a, False) for a in args} == {"int", "float"}:
            return "a number" if article else "number"
        return " or ".join(_type_words(a, article) for a in args)
    if origin is tuple:
        inner = "(" + ", ".join(_type_words(a, False) for a in args) + ")"
        return f"a tuple {inner}" if article else inner
    if origin is list:
        inner = _type_words(args[0], False)
        if not article:
            return f"list[{inner}]"
        return f"a list of {inner}s" if inner.isalpha() else f"a list[{inner}]"
    names = {int: "int", float: "float", bool: "bool", str: "string", list: "list", tuple: "tuple"}
    if tp in names:
        word = names[tp]
        return (("an " if word[0] in "aeiou" else "a ") + word) if article else word
    if tp is Any:
        return "any value" if article else "any"
    return str(tp)


def show_value(v: Any) -> str:
    """A Python value as a spec would write it: `true`, `"a"`, `(0.9, 0.99)`."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple):
        return "(" + ", ".join(map(show_value, v)) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, list):
        return "[" + ", ".join(map(show_value, v)) + "]"
    if v is None:
        return "None"
    return repr(v)


def python_expr(expr: ast.Expr, name: Any) -> str | None:
    """A Python expression computing what const_eval computes for a default (hyperparameter
    names through `name`, `/` through nestc.runtime's `nest_div`, as generated optimizers
    import it: `_rt`), or None for a form it does not write."""
    def go(e: ast.Expr) -> str | None:
        if isinstance(e, (ast.ExprNumber, ast.ExprBool, ast.ExprString)):
            return repr(e.value)
        if isinstance(e, ast.ExprName):
            return name(e.name)
        if isinstance(e, (ast.ExprTuple, ast.ExprList)):
            items = [go(i) for i in e.items]
            if any(i is None for i in items):
                return None
            inner = ", ".join(i for i in items if i is not None)
            return f"({inner}{',' if len(items) == 1 else ''})" if isinstance(e, ast.ExprTuple) \
                else f"[{inner}]"
        if isinstance(e, ast.ExprUnary):
            x = go(e.operand)
            return None if x is None else f"({e.op} {x})" if e.op == "not" else f"({e.op}{x})"
        if isinstance(e, ast.ExprBinary):
            a, b = go(e.left), go(e.right)
            if a is None or b is None or e.op == "@":
                return None
            return f"_rt.nest_div({a}, {b})" if e.op == "/" else f"({a} {e.op} {b})"
        if isinstance(e, ast.ExprIndex) and len(e.index) == 1:
            base, i = go(e.base), go(e.index[0])
            return None if base is None or i is None else f"{base}[{i}]"
        if isinstance(e, ast.ExprCond):
            c, t, f = go(e.cond), go(e.then), go(e.orelse)
            return None if None in (c, t, f) else f"({t} if {c} else {f})"
        return None

    return go(expr)
