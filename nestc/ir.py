"""The optimizer IR: what one step does to one parameter, as a few straight-line statements.

Expressions are small frozen trees (`E`). A lowered optimizer is a set of variants, one per
combination of hyperparameter conditions (`if nesterov { ... }`), each a list of statements
run in order for every tensor of a param group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nestc.source import Span

# op -> meaning of args / value:
#   const   value = number
#   hyper   value = (name, index...)  a hyperparameter of the param group
#   param   the parameter W (its value at this point of the step)
#   grad    grad(W)
#   state   value = memory name (its value at this point of the step)
#   local   value = let name (slocal: a let holding a number, not a tensor)
#   step    value = memory name or None: updates made so far by that memory (or the param)
#   shape   value = "ndim" | "rows" | "cols" | "numel": of the param (matrix view: dim0 x rest)
#   add sub mul div pow mod neg             arithmetic on args
#   call    value = builtin name, args
#   cmp     value = operator text; and/or/not for conditions
#   mlp     value = memory name, args (x,): an MLP memory applied to the rows of x
#   learn   value = (memory name, "l2" | "dot"), args (key, target, lr, retain): the MLP
#           memory after one gd step on objective(memory(key), target), summed over rows
ELEMENTWISE_CALLS = ("sqrt", "abs", "exp", "log", "sign", "tanh", "sigmoid", "relu", "silu",
                     "min", "max", "lerp", "debias", "clamp")
SHAPE_CALLS = ("ndim", "rows", "cols", "numel")
# calls on whole tensors (not element-wise): args are (x, numbers...), run tensor by tensor
MATRIX_CALLS = ("newton_schulz", "matmul", "transpose")
# activations of an MLP memory (nestc/ops/residual_mlp.py defines them and their derivatives)
MLP_ACTS = ("silu", "relu", "tanh", "sigmoid", "gelu")


@dataclass(frozen=True)
class E:
    op: str
    args: tuple[E, ...] = ()
    value: Any = None

    def __add__(self, other: E) -> E:
        return E("add", (self, other))

    def __sub__(self, other: E) -> E:
        return E("sub", (self, other))

    def __mul__(self, other: E) -> E:
        return E("mul", (self, other))

    def __neg__(self) -> E:
        return E("neg", (self,))

    def walk(self):
        yield self
        for a in self.args:
            yield from a.walk()

    @property
    def is_scalar(self) -> bool:
        """True when the value is one number for a whole tensor: hyperparameters, constants,
        step counts and shapes (a `local` let holds tensors; an `slocal` one carries its
        number's expression as its argument, so these properties see through it)."""
        return not any(n.op in ("param", "grad", "state", "local") for n in self.walk())

    @property
    def is_hyper_only(self) -> bool:
        """True when the value depends on hyperparameters only (not on steps or shapes)."""
        return self.is_scalar and not any(n.op in ("step", "shape") for n in self.walk())

    @property
    def is_static(self) -> bool:
        """True when the value is fixed for a tensor across steps: hyperparameters and shape."""
        return self.is_scalar and not any(n.op == "step" for n in self.walk())


def const(v: float | int | str) -> E:
    return E("const", value=v)


@dataclass(frozen=True)
class MLP:
    """A residual MLP memory m(x) = x + W1 act(W2 x) on the rows x of the (rows, cols) view of
    what it reads, with d = cols(W): W1 is (d, hidden), W2 (hidden, d)."""

    hidden: E  # a number per tensor: hyperparameters and shapes
    act: E  # its name: a constant or a hyperparameter
    seed: E  # W2's draw: hyperparameters and constants


@dataclass(frozen=True)
class Memory:
    """A state of the optimizer, one per parameter: a tensor shaped like it, or an MLP."""

    name: str
    init: str  # "zeros" | "ones" | "from" | "eval" (computed from `first` when made) | "identity"
    period: E  # updates when the step count is a multiple of period (a scalar expression)
    span: Span
    first: E | None = None  # "from": what the first write stores; "eval": the initial value
    deferred: bool = False  # `read before write`: written at the end of the step
    mlp: MLP | None = None  # an MLP memory: two tensors, `keys`, instead of one

    @property
    def keys(self) -> tuple[str, ...]:
        """Its tensors' names in the optimizer's state (no spec name contains a dot)."""
        return (f"{self.name}.W1", f"{self.name}.W2") if self.mlp else (self.name,)


@dataclass(frozen=True)
class Let:
    name: str
    value: E
    span: Span


@dataclass(frozen=True)
class Assign:
    """target <- value. target is the param name (kind "param") or a memory (kind "state"; kind
    "mlp" for an MLP memory, whose value is a `learn` expression)."""

    target: str
    kind: str
    value: E
    span: Span
    every: E | None = None  # write only when the step count is a multiple of this
    late: bool = False  # a `read before write` memory's write: after the rest of the step


Stmt = Let | Assign


@dataclass
class Variant:
    """One straight-line program, selected when every condition has the given truth value."""

    conditions: tuple[tuple[E, bool], ...]
    memories: list[Memory]
    stmts: list[Stmt]
    kernel: Any = None  # set by select_kernels: a KernelChoice or None


@dataclass(frozen=True)
class HyperInfo:
    name: str
    default: Any
    required: bool
    formula: Any = None  # a default that reads earlier hyperparameters: its ast.Expr


@dataclass
class Optimizer:
    name: str
    file: str
    line: int
    param: str
    hypers: list[HyperInfo]
    variants: list[Variant]
    tree: Any = field(default=None, repr=False)  # which variant runs: lower_optimizer.Leaf/Branch


_PREC = {"add": 1, "sub": 1, "mul": 2, "div": 2, "pow": 4}
_SYM = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}


def text(e: E, param: str = "W", prec: int = 0) -> str:
    """An expression in the language's own notation (for explain and error messages)."""
    op = e.op
    if op == "const":
        return repr(e.value).lower() if isinstance(e.value, bool) else repr(e.value)
    if op == "hyper":
        return e.value[0] + "".join(f"[{i}]" for i in e.value[1:])
    if op == "param":
        return param
    if op == "grad":
        return f"grad({param})"
    if op in ("state", "local", "slocal"):
        return e.value
    if op == "step":
        return "step()"
    if op == "shape":
        return f"{e.value}({param})"
    if op in _PREC:
        p = _PREC[op]
        left = text(e.args[0], param, p)
        right = text(e.args[1], param, p + (op in ("sub", "div", "pow")))
        out = f"{left} {_SYM[op]} {right}"
        return f"({out})" if p < prec else out
    if op == "neg":
        out = "-" + text(e.args[0], param, 3)
        return f"({out})" if prec > 2 else out
    if op == "cmp":
        if e.value == "not":
            return f"not {text(e.args[0], param, 3)}"
        out = f"{text(e.args[0], param, 1)} {e.value} {text(e.args[1], param, 1)}"
        return f"({out})" if prec > 0 else out
    if op == "cond":
        c, a, b = (text(x, param) for x in e.args)
        return f"(if {c} then {a} else {b})"
    if op == "mlp":
        return f"{e.value}({text(e.args[0], param)})"
    if op == "learn":
        (mem, objective), (key, target, lr, retain) = e.value, e.args
        return (f"gd({objective}({mem}({text(key, param)}), {text(target, param)}), "
                f"lr = {text(lr, param)}, retain = {text(retain, param)})")
    args = e.args[:2] if e.value == "debias" else e.args
    return f"{e.value}({', '.join(text(a, param) for a in args)})"
