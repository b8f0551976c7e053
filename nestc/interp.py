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
    if op == "mlp":
        w1, w2 = (env["states"][k] for k in env["mlps"][e.value].keys)
        return mlp_read(evaluate(e.args[0], env), w1, w2, env["acts"][e.value])
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


def _act(name: str) -> Callable[..., Any]:
    import torch

    fns = {"silu": torch.nn.functional.silu, "relu": torch.relu, "tanh": torch.tanh,
           "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu}
    if name not in fns:
        raise ValueError(f"an MLP memory's act is one of {', '.join(fns)}, got {name!r}")
    return fns[name]


def mlp_read(x: Any, w1: Any, w2: Any, act: str) -> Any:
    """An MLP memory applied to the rows of x's (dim0, rest) view: x + W1 act(W2 x) per row."""
    rows = x.reshape(x.shape[0] if x.ndim else 1, w1.shape[0])  # (n, d)
    return (rows + _act(act)(rows @ w2.T) @ w1.T).reshape(x.shape)


def mlp_learn(w1: Any, w2: Any, key: Any, target: Any, lr: Any, retain: Any, objective: str,
              act: str) -> tuple[Any, Any]:
    """One gd step of an MLP memory: W <- retain * W - lr * d objective / d W for W1 and W2,
    both gradients taken at the old state, the objective summed over the rows of the key."""
    import torch

    with torch.enable_grad():
        p1, p2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
        pred = mlp_read(key, p1, p2, act)
        if objective == "l2":
            loss = 0.5 * ((pred - target) ** 2).sum()
        else:
            loss = -(pred * target).sum()
        g1, g2 = torch.autograd.grad(loss, (p1, p2))
    return retain * w1 - lr * g1, retain * w2 - lr * g2


def mlp_identity(memory: ir.Memory, W: Any, env: dict[str, Any], index: int) -> tuple[Any, Any]:
    """An MLP memory's first state for the index-th parameter of the optimizer: m(x) = x."""
    from nestc.ops.residual_mlp import identity_init

    assert memory.mlp is not None, memory.name
    hidden = evaluate(memory.mlp.hidden, env)
    seed = evaluate(memory.mlp.seed, env) + index
    return identity_init(env["shape"]["cols"], int(hidden), int(seed), W)


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
        shape: dict[str, int] | None = None, index: int = 0) -> tuple[Any, dict[str, Any]]:
    """One step for one parameter. `step` counts this step (1 on the first). Returns (W, states).

    first[name] says whether a `from X` memory is written for the first time. on_write lets
    a symbolic caller replace a freshly written state by a symbol for the reads that follow.
    index is the parameter's position in the optimizer (it seeds an MLP memory's first state).
    """
    mems = {m.name: m for m in variant.memories}
    states = dict(states)
    written: dict[str, Any] = {}

    def steps(mem: str | None) -> Any:
        if mem is None or mem not in mems:
            return step
        period = evaluate(mems[mem].period, env)
        return step // period if period != 1 else step

    mlps = {m.name: m for m in variant.memories if m.mlp is not None}
    env: dict[str, Any] = {"hyper": hyper, "W": W, "G": G, "states": states, "locals": {},
                           "steps": steps, "ns": ns, "shape": shape or shape_of(W), "mlps": mlps}
    env["acts"] = {n: evaluate(m.mlp.act, env) for n, m in mlps.items() if m.mlp is not None}
    for m in mlps.values():  # MLP memories are made on the parameter's first step
        if m.keys[0] not in states:
            states.update(zip(m.keys, mlp_identity(m, W, env, index)))
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
        if s.kind == "mlp":
            w1, w2 = (states[k] for k in mem.keys)
            key, target, lr, retain = (evaluate(a, env) for a in s.value.args)
            pair = mlp_learn(w1, w2, key, target, lr, retain, s.value.value[1],
                             env["acts"][s.target])
            written.update(zip(mem.keys, pair))
            states.update(zip(mem.keys, pair))
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
