"""A direct interpreter of one optimizer variant: the living definition of the semantics.

It runs the IR statements for one parameter over any number type that supports arithmetic:
Python floats (kernel verification), torch tensors (the reference tier in tests), or sympy
expressions (symbolic execution for instruction selection). `ns` supplies the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from nestc import ir


class FloatNS:
    """Functions over Python floats."""

    sqrt = staticmethod(math.sqrt)
    exp = staticmethod(math.exp)
    log = staticmethod(math.log)
    tanh = staticmethod(math.tanh)
    abs = staticmethod(abs)

    @staticmethod
    def sign(x: float) -> float:
        return float((x > 0) - (x < 0))

    @staticmethod
    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    @staticmethod
    def relu(x: float) -> float:
        return max(x, 0.0)

    @staticmethod
    def silu(x: float) -> float:
        return x / (1.0 + math.exp(-x))

    @staticmethod
    def clamp(x: float, lo: float, hi: float) -> float:
        return min(max(x, lo), hi)

    min = staticmethod(min)
    max = staticmethod(max)

    @staticmethod
    def lerp(a: float, b: float, w: float) -> float:
        return a + w * (b - a)


class TorchNS:
    """Functions over torch tensors (imported lazily: the front end never needs torch); on
    plain numbers (hyperparameters) they are FloatNS's."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        import torch

        def call(*args: Any) -> Any:
            if not any(isinstance(a, torch.Tensor) for a in args):
                return getattr(FloatNS, name)(*args)
            return table[name](*args)

        table: dict[str, Callable[..., Any]] = {
            "sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log, "tanh": torch.tanh,
            "abs": torch.abs, "sign": torch.sign, "sigmoid": torch.sigmoid, "relu": torch.relu,
            "silu": torch.nn.functional.silu,
            "min": lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)),
            "max": lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b)),
            "lerp": lambda a, b, w: a + w * (b - a),
            "clamp": lambda x, lo, hi: torch.clamp(x, min=lo, max=hi),
            "matmul": torch.matmul, "transpose": lambda x: x.mT,
        }
        return call


def hyper_value(hyper: dict[str, Any], key: tuple) -> Any:
    value = hyper[key[0]]
    for i in key[1:]:
        value = value[i]
    return value


def evaluate(e: ir.E, env: dict[str, Any]) -> Any:
    """Evaluate e; env holds hyper, W, G, states, locals, steps and ns."""
    op = e.op
    if op == "const":
        return e.value
    if op == "hyper":
        return hyper_value(env["hyper"], e.value)
    if op == "param":
        return env["W"]
    if op == "grad":
        return env["G"]
    if op == "state":
        return env["states"][e.value]
    if op == "slocal":
        return evaluate(e.args[0], env)
    if op == "local":
        return env["locals"][e.value]
    if op == "step":
        return env["steps"](e.value)
    if op == "shape":
        return env["shape"][e.value]
    args = [evaluate(a, env) for a in e.args]
    if op == "add":
        return args[0] + args[1]
    if op == "sub":
        return args[0] - args[1]
    if op == "mul":
        return args[0] * args[1]
    if op == "div":
        return args[0] / args[1]
    if op == "pow":
        return args[0] ** args[1]
    if op == "mod":
        return args[0] % args[1]
    if op == "neg":
        return -args[0]
    if op == "cond":
        return args[1] if args[0] else args[2]
    if op == "cmp":
        return _compare(e.value, args)
    if op == "call":
        if e.value == "debias":
            x, beta, step = args
            return x / (1 - beta ** step)
        if e.value == "newton_schulz":
            x, steps, eps, a, b, c, dtype = args
            if not hasattr(x, "ndim"):
                raise TypeError("newton_schulz runs on tensors only")
            from nestc.ops.newton_schulz import newton_schulz

            return newton_schulz(x, steps, eps, (a, b, c), dtype)
        return getattr(env["ns"], e.value)(*args)
    raise AssertionError(f"interp: unknown op {op}")


def _compare(op: str, args: list[Any]) -> Any:
    if op == "not":
        return not args[0]
    a, b = args
    return {"==": lambda: a == b, "!=": lambda: a != b, "<": lambda: a < b, ">": lambda: a > b,
            "<=": lambda: a <= b, ">=": lambda: a >= b, "and": lambda: a and b,
            "or": lambda: a or b}[op]()


def shape_of(W: Any) -> dict[str, int]:
    """ndim, rows, cols, numel of a tensor; its matrix view is (dim0, the rest)."""
    dims = tuple(getattr(W, "shape", ()))
    numel = 1
    for d in dims:
        numel *= d
    rows = dims[0] if dims else 1
    return {"ndim": len(dims), "rows": rows, "cols": numel // rows if rows else 0,
            "numel": numel}


def run(variant: ir.Variant, hyper: dict[str, Any], W: Any, G: Any, states: dict[str, Any],
        step: int | Any, *, ns: Any = FloatNS, first: dict[str, bool] | None = None,
        on_write: Callable[[str, Any], Any] | None = None,
        shape: dict[str, int] | None = None) -> tuple[Any, dict[str, Any]]:
    """One step for one parameter. `step` counts this step (1 on the first). Returns (W, states).

    first[name] says whether a `from X` memory is written for the first time. on_write lets
    a symbolic caller replace a freshly written state by a symbol for the reads that follow.
    """
    mems = {m.name: m for m in variant.memories}
    states = dict(states)
    written: dict[str, Any] = {}

    def steps(mem: str | None) -> Any:
        if mem is None or mem not in mems:
            return step
        period = evaluate(mems[mem].period, env)
        return step // period if period != 1 else step

    env: dict[str, Any] = {"hyper": hyper, "W": W, "G": G, "states": states, "locals": {},
                           "steps": steps, "ns": ns, "shape": shape or shape_of(W)}
    for m in variant.memories:  # hoisted values start as their expression of the initial state
        if m.init == "eval" and m.name not in states:
            assert m.first is not None
            states[m.name] = evaluate(m.first, env)
    for s in variant.stmts:
        if isinstance(s, ir.Let):
            env["locals"][s.name] = evaluate(s.value, env)
            continue
        if s.kind == "param":
            env["W"] = evaluate(s.value, env)
            continue
        mem = mems[s.target]
        period = evaluate(s.every if s.every is not None else mem.period, env)
        if period != 1 and step % period != 0:
            continue
        if mem.init == "from" and (first or {}).get(s.target, False):
            assert mem.first is not None
            value = evaluate(mem.first, env)
        else:
            value = evaluate(s.value, env)
        written[s.target] = value
        states[s.target] = on_write(s.target, value) if on_write else value
    out = dict(states)
    out.update(written)
    return env["W"], out
