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
        return -v if expr.op == "-" else v
    if isinstance(expr, ast.ExprBinary):
        a, b = const_eval(expr.left, env), const_eval(expr.right, env)
        if a is UNKNOWN or b is UNKNOWN:
            return UNKNOWN
        return _binary(expr, a, b)
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


def python_type(ann: ast.TypeAnn) -> Any:
    """The pydantic-checkable Python type of an annotation; NestError for an unknown type."""
    from pydantic import StrictBool, StrictInt, StrictStr

    scalars = {"int": StrictInt, "float": float, "bool": StrictBool, "str": StrictStr}
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
    from pydantic import StrictBool, StrictInt, StrictStr

    if isinstance(value, bool):
        return StrictBool
    if isinstance(value, int):
        return float | StrictInt  # an int default such as `momentum = 0` also takes floats
    if isinstance(value, float):
        return float
    if isinstance(value, str):
        return StrictStr
    if isinstance(value, tuple):
        return tuple[tuple(infer_type(v) for v in value)]  # type: ignore[misc]
    if isinstance(value, list):
        return list[infer_type(value[0])] if value else list  # type: ignore[misc]
    return Any


def type_words(tp: Any) -> str:
    text = getattr(tp, "__name__", None) or str(tp)
    return (str(tp).replace("pydantic.types.", "").replace("Strict", "").replace("typing.", "")
            if text == str(tp) or "[" in str(tp) else text.replace("Strict", "").lower())
