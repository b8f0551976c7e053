"""The typed AST: frozen nodes, one class per grammar construct, each with a span. No logic."""

from __future__ import annotations

from dataclasses import dataclass

from nestc.source import Span

# --- expressions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExprNumber:
    value: float | int
    text: str
    span: Span


@dataclass(frozen=True)
class ExprString:
    value: str
    span: Span


@dataclass(frozen=True)
class ExprBool:
    value: bool
    span: Span


@dataclass(frozen=True)
class ExprName:
    name: str
    span: Span


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class ExprCall:
    """`func(args, kw = value)`; `x |> f(a)` is parsed as `f(x, a)` with piped=True."""

    func: Expr
    args: tuple[Expr, ...]
    kwargs: tuple[Kwarg, ...]
    span: Span
    piped: bool = False


@dataclass(frozen=True)
class ExprIndex:
    base: Expr
    index: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class ExprAttr:
    base: Expr
    name: str
    span: Span


@dataclass(frozen=True)
class ExprBinary:
    """Arithmetic, comparison and boolean operators: op is the operator text (`+`, `and`, ...)."""

    op: str
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True)
class ExprUnary:
    op: str  # "-", "+", "not"
    operand: Expr
    span: Span


@dataclass(frozen=True)
class ExprCond:
    cond: Expr
    then: Expr
    orelse: Expr
    span: Span


@dataclass(frozen=True)
class ExprTuple:
    items: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class ExprList:
    items: tuple[Expr, ...]
    span: Span


Expr = (ExprNumber | ExprString | ExprBool | ExprName | ExprCall | ExprIndex | ExprAttr
        | ExprBinary | ExprUnary | ExprCond | ExprTuple | ExprList)


# --- statements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """`[T, dim] int`: dimensions and an optional element type."""

    dims: tuple[Expr, ...]
    dtype: str | None
    span: Span


@dataclass(frozen=True)
class Frequency:
    """`every token`, `every N tokens in chunks of C`, `every step`, `every N steps`, `never`.

    unit is "token", "step" or "never"; every is None for one update per unit.
    """

    unit: str
    every: Expr | None
    chunk: Expr | None
    span: Span


@dataclass(frozen=True)
class StmtParam:
    """`param W` (an optimizer's parameter) or `param W : [a, b] = init` (a block's weight)."""

    names: tuple[str, ...]
    shape: Shape | None
    init: Expr | None
    span: Span


@dataclass(frozen=True)
class StmtInput:
    name: str
    shape: Shape
    span: Span


@dataclass(frozen=True)
class StmtLet:
    name: str
    value: Expr
    span: Span
    name_span: Span


@dataclass(frozen=True)
class StmtUpdate:
    """`target op value` with op one of = += -= *= /=; index is set for `x[i] op value`."""

    target: str
    index: tuple[Expr, ...] | None
    op: str
    value: Expr
    span: Span
    target_span: Span


@dataclass(frozen=True)
class StmtOutput:
    name: str | None
    value: Expr
    span: Span


@dataclass(frozen=True)
class StmtRepeat:
    count: Expr
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class StmtChain:
    var: str
    values: Expr
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class StmtIf:
    cond: Expr
    then: tuple[Stmt, ...]
    orelse: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class StmtRequire:
    """A condition on a declaration's hyperparameters, checked wherever they are bound, with
    the message its error says (None: the condition's text)."""

    cond: Expr
    message: str | None
    span: Span


@dataclass(frozen=True)
class StmtTrain:
    """The outer training level of a model: its frequency and clauses."""

    frequency: Frequency
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class StmtMemory:
    name: str
    structure: Expr | None
    per_head: bool
    init: Expr | None
    frequency: Frequency | None
    body: tuple[Stmt, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Clause:
    """A memory clause: key/value/query/objective/rule take an expression, choices take a word.

    kind is one of key, value, query, objective, rule (value: Expr) or read, backprop, state,
    partial, dgd (value: str).
    """

    kind: str
    value: Expr | str
    span: Span


Stmt = (StmtParam | StmtInput | StmtLet | StmtUpdate | StmtOutput | StmtRepeat | StmtChain
        | StmtIf | StmtTrain | StmtMemory | StmtRequire | Clause)


# --- declarations and files --------------------------------------------------------------------


@dataclass(frozen=True)
class TypeAnn:
    """`float`, `list[int]`, `(float, float)`: name is "tuple" for the parenthesized form."""

    name: str
    args: tuple[TypeAnn, ...]
    span: Span

    def __str__(self) -> str:
        if self.name == "tuple":
            return "(" + ", ".join(map(str, self.args)) + ")"
        if self.args:
            return f"{self.name}[{', '.join(map(str, self.args))}]"
        return self.name


@dataclass(frozen=True)
class Param:
    name: str
    type: TypeAnn | None
    default: Expr | None
    span: Span


@dataclass(frozen=True)
class Decl:
    kind: str  # "optimizer", "block", "model"
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Import:
    """`import "path" [as alias]` or `from "path" import A, B`."""

    path: str
    alias: str | None
    names: tuple[str, ...] | None
    span: Span
    path_span: Span


@dataclass(frozen=True)
class Module:
    file: str
    imports: tuple[Import, ...]
    decls: tuple[Decl, ...]
    span: Span
