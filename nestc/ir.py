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
#   local   value = let name
#   step    value = memory name or None: updates made so far by that memory (or the param)
#   add sub mul div pow neg                 arithmetic on args
#   call    value = builtin name, args
#   cmp     value = operator text; and/or/not for conditions
ELEMENTWISE_CALLS = ("sqrt", "abs", "exp", "log", "sign", "tanh", "sigmoid", "relu", "silu",
                     "min", "max", "lerp", "debias", "clamp")


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
        """True when the value is the same for every element: hyperparameters and constants."""
        return all(n.op in ("const", "hyper", "step", "add", "sub", "mul", "div", "pow", "neg",
                            "call", "cmp") for n in self.walk()) and not any(
            n.op in ("param", "grad", "state", "local") for n in self.walk())


def const(v: float | int) -> E:
    return E("const", value=v)


@dataclass(frozen=True)
class Memory:
    """A state tensor of the optimizer, one per parameter."""

    name: str
    init: str  # "zeros" | "ones" | "from"
    period: E  # updates when the step count is a multiple of period (a scalar expression)
    span: Span
    first: E | None = None  # the value the first write stores, for init "from"


@dataclass(frozen=True)
class Let:
    name: str
    value: E
    span: Span


@dataclass(frozen=True)
class Assign:
    """target <- value. target is the param name (kind "param") or a memory (kind "state")."""

    target: str
    kind: str
    value: E
    span: Span


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


@dataclass
class Optimizer:
    name: str
    file: str
    line: int
    param: str
    hypers: list[HyperInfo]
    variants: list[Variant]
    tree: Any = field(default=None, repr=False)  # nested dispatch: see lower_optimizer.Dispatch
