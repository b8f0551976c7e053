"""The checker: hyperparameters (pydantic), names, builtins, statements per declaration kind,
frequencies and shapes where the hyperparameters fix them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nestc import ast
from nestc.builtins import BUILTINS
from nestc.errors import NestError, did_you_mean
from nestc.hyper import (
    UNKNOWN,
    check_nesting,
    const_eval,
    infer_type,
    python_type,
    show_value,
    type_words,
)
from nestc.source import Span, span_text

MAX_CHAIN_CHECKS = 16
MAX_BODY_PATHS = 64  # ways through a memory body's `if`s that the checker checks
TRAIN = "<train>"  # the owner of a model's train clauses (no spec name: a memory may be `train`)
CLAUSE_EXPR = ("key", "value", "query", "objective", "rule")
CHOICES = {  # clause -> (default, allowed values)
    "read": ("after write", ("before write", "after write")),
    "backprop": ("through", ("through", "stopped")),
    "state": ("per sample", ("per sample", "shared")),
    "partial": ("carry", ("carry", "flush")),
    "dgd": ("gated", ("gated", "literal")),
}


@dataclass(frozen=True)
class Hyper:
    name: str
    type: Any
    default: Any  # UNKNOWN when required
    span: Span

    @property
    def required(self) -> bool:
        return self.default is UNKNOWN


@dataclass
class Checked:
    """A declaration that passed the checker, with its hyperparameters."""

    decl: ast.Decl
    hypers: dict[str, Hyper]
    scope: dict[str, ast.Decl]
    model: Any = field(repr=False, default=None)  # the pydantic model validating overrides
    calls: tuple[tuple[ast.Decl, Span], ...] = ()  # declarations its body calls, with where

    @property
    def name(self) -> str:
        return self.decl.name

    @property
    def kind(self) -> str:
        return self.decl.kind

    def bind(self, overrides: dict[str, Any], call: Span | None = None) -> dict[str, Any]:
        """Defaults updated by overrides, validated; NestError names the bad hyperparameter
        (an unmet `require` is reported at `call`, when the values are a call's)."""
        from pydantic import ValidationError

        unknown = [k for k in overrides if k not in self.hypers]
        if unknown:
            raise NestError(f"{self.kind} `{self.name}` has no hyperparameter `{unknown[0]}`",
                            self.decl.name_span, kind="name",
                            hint=did_you_mean(unknown[0], self.hypers)
                            or f"its hyperparameters are {', '.join(self.hypers) or 'none'}")
        values = bound_defaults(self.decl, overrides)
        missing = [n for n in self.hypers if n not in values]
        if missing:
            h = self.hypers[missing[0]]
            raise NestError(f"{self.kind} `{self.name}` needs a value for `{h.name}`", h.span,
                            kind="value", hint=f"pass {h.name}=... (it has no default)")
        try:
            validated = self.model.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            name = str(first["loc"][0])
            h = self.hypers[name]
            raise NestError(f"`{name}` of `{self.name}` must be {type_words(h.type)}, "
                            f"got {show_value(values[name])}", h.span, kind="type") from None
        bound = {n: getattr(validated, f"h{i}") for i, n in enumerate(self.hypers)}
        nan = next((n for n, v in bound.items() if isinstance(v, float) and v != v), None)
        if nan is not None:  # (a NaN meets no require and fails none: it went through)
            raise NestError(f"`{nan}` of `{self.name}` is NaN", self.hypers[nan].span,
                            kind="value")
        for s in self.decl.body:
            if isinstance(s, ast.StmtRequire):
                unmet(self.decl, s, bound, call)
        counts(self.decl.body, dict(bound))
        return bound


def bound_defaults(decl: ast.Decl, values: dict[str, Any]) -> dict[str, Any]:
    """`values` and the defaults of the other hyperparameters, each computed from the values
    of the earlier ones as bound (`hidden = 4 * heads` follows a given `heads`; UNKNOWN
    where they are). One that cannot be computed from them (a given value of the wrong type,
    which validation then names) is the declared default."""
    out: dict[str, Any] = {}
    declared = {n: h.default for n, h in hypers_of(decl).items() if not h.required}
    for p in decl.params:
        if p.name in values:
            out[p.name] = values[p.name]
        elif p.name in declared and p.default is not None:
            try:
                out[p.name] = const_eval(p.default, out)  # (UNKNOWN from an unknown value)
            except NestError:
                out[p.name] = declared[p.name]
    out.update(values)
    return out


def hypers_of(decl: ast.Decl) -> dict[str, Hyper]:
    hypers: dict[str, Hyper] = {}
    env: dict[str, Any] = {}
    for p in decl.params:
        if p.name in hypers:
            raise NestError(f"hyperparameter `{p.name}` is declared twice", p.span, kind="name")
        default = UNKNOWN if p.default is None else const_eval(p.default, env)
        check_nesting(p.type, default, p.default.span if p.default is not None else p.span)
        if p.default is not None and default is UNKNOWN:
            raise NestError(f"the default of `{p.name}` must be a constant", p.default.span,
                            kind="value", hint="defaults are numbers, bools, strings, tuples, "
                            "lists, or arithmetic on earlier hyperparameters")
        if p.type is not None:
            tp = python_type(p.type)
        elif default is UNKNOWN:
            tp = Any
        else:
            tp = infer_type(default)
        hypers[p.name] = Hyper(p.name, tp, default, p.span)
        if default is not UNKNOWN:
            env[p.name] = default
    return hypers


def pydantic_model(decl: ast.Decl, hypers: dict[str, Hyper]) -> Any:
    from pydantic import ConfigDict, Field, ValidationError, create_model

    # fields are named by position and aliased to the spec's names, so that a hyperparameter
    # called `json`, `copy` or `__class__` cannot collide with pydantic's own attributes
    fields = {f"h{i}": (h.type, Field(..., alias=n)) for i, (n, h) in enumerate(hypers.items())}
    model = create_model(f"{decl.name}Hyperparameters", __config__=ConfigDict(extra="forbid"),
                         **fields)  # type: ignore[call-overload]
    for i, (n, h) in enumerate(hypers.items()):
        if h.required:
            continue
        try:
            model.__pydantic_validator__.validate_assignment(
                model.model_construct(), f"h{i}", h.default)
        except ValidationError:
            p = next(p for p in decl.params if p.name == n)
            span = p.default.span if p.default is not None else p.span
            raise NestError(f"the default of `{n}` must be {type_words(h.type)}, got "
                            f"{show_value(h.default)}", span, kind="type") from None
    return model


# --- the body checker -------------------------------------------------------------------------


class _Scope:
    def __init__(self, parent: _Scope | None = None) -> None:
        self.parent = parent
        self.names: dict[str, str] = {}  # name -> what it is: hyper, param, input, let, memory, ...
        # memories declared further down this body: a read M(x) above the declaration sees
        # M at the start of its chunk (docs/semantics.md, "Reads above a declaration")
        self.ahead: dict[str, ast.StmtMemory] = {}

    def later_memory(self, name: str) -> ast.StmtMemory | None:
        """The memory `name` declared further down this body or an enclosing one, if any."""
        s: _Scope | None = self
        while s is not None:
            if name in s.names:
                return None
            if name in s.ahead:
                return s.ahead[name]
            s = s.parent
        return None

    def lookup(self, name: str) -> str | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None

    def all(self) -> set[str]:
        out: set[str] = set()
        s: _Scope | None = self
        while s is not None:
            out |= set(s.names)
            s = s.parent
        return out


class BodyChecker:
    def __init__(self, decl: ast.Decl, hypers: dict[str, Hyper], decls: dict[str, ast.Decl]):
        self.decl = decl
        self.decls = decls
        self.env = {n: h.default for n, h in hypers.items() if not h.required}
        self.root = _Scope()
        for n in hypers:
            self.root.names[n] = "hyper"
        self.param_names: list[str] = []
        self.updated_params: set[str] = set()
        self.owner: list[str] = []  # enclosing memory, or TRAIN
        self.calls: list[tuple[ast.Decl, Span]] = []  # declarations called, for cycle checks
        # the `if`s around the statement or expression being checked, (condition, branch):
        # a call's `require`s are checked at the defaults only where those take its branch
        self.conds: list[tuple[ast.Expr, bool]] = []
        self.copies = 1  # the copies the enclosing `repeat`s and chains make (known counts)

    # errors
    def unknown_name(self, name: str, span: Span, scope: _Scope) -> NestError:
        known = scope.all() | set(self.decls) | set(BUILTINS)
        hint = did_you_mean(name, known)
        return NestError(f"unknown name `{name}`", span, kind="name", hint=hint)

    def run(self) -> None:
        self.block(self.decl.body, self.root)
        kind = self.decl.kind
        if kind == "optimizer":
            if not self.param_names:
                raise NestError(f"optimizer `{self.decl.name}` has no `param`", self.decl.name_span,
                                kind="value", hint="declare the tensor it updates: `param W`")
            for p in self.param_names:
                if p not in self.updated_params:
                    raise NestError(f"optimizer `{self.decl.name}` never updates `{p}`",
                                    self.decl.name_span, kind="value",
                                    hint=f"add an update such as `{p} -= lr * grad({p})`")
        if kind in ("block", "model") and not any(isinstance(s, ast.StmtOutput)
                                                   for s in _walk(self.decl.body)):
            raise NestError(f"{kind} `{self.decl.name}` has no `output`", self.decl.name_span,
                            kind="value", hint="say what it returns: `output expr`")
        outputs = _outputs_on_a_path(self.decl.body)
        if len(outputs) > 1:  # (the compiled module returned the last one only)
            raise NestError(f"{kind} `{self.decl.name}` has a second `output`", outputs[1].span,
                            kind="value", notes=(("the first", outputs[0].span),),
                            hint="a block or model has one output: combine them into one "
                            "expression (one in each branch of an `if` is fine)")
        if kind == "model" and not any(isinstance(s, ast.StmtTrain) for s in self.decl.body):
            raise NestError(f"model `{self.decl.name}` has no `train` level", self.decl.name_span,
                            kind="value", hint="add `train every step { objective ...; rule ... }`,"
                            " or declare it as a `block`")

    def block(self, stmts: tuple[ast.Stmt, ...], scope: _Scope) -> None:
        if self.decl.kind != "optimizer":
            scope.ahead = {s.name: s for s in stmts if isinstance(s, ast.StmtMemory)}
        for s in stmts:
            self.stmt(s, scope)
            if isinstance(s, ast.StmtMemory):
                scope.ahead.pop(s.name, None)

    def define(self, scope: _Scope, name: str, what: str, span: Span) -> None:
        prev = scope.lookup(name)
        if prev == "hyper":
            raise NestError(f"`{name}` is a hyperparameter and cannot be redefined", span,
                            kind="name", hint="choose another name")
        if prev is not None and name in scope.names and what in ("memory", "param", "input"):
            raise NestError(f"`{name}` is already defined", span, kind="name")
        scope.names[name] = what

    def stmt(self, s: ast.Stmt, scope: _Scope) -> None:
        kind = self.decl.kind
        if isinstance(s, ast.StmtParam):
            if kind == "optimizer":
                if s.shape is not None or s.init is not None:
                    raise NestError("an optimizer's `param` takes no shape or init: it stands for "
                                    "each tensor the optimizer updates", s.span, kind="value")
                if self.param_names or len(s.names) > 1:
                    raise NestError("an optimizer declares one `param`", s.span, kind="value",
                                    hint="it is applied to every tensor in the param groups")
            elif s.shape is None:
                raise NestError(f"`param {s.names[0]}` needs a shape: `param W : [a, b]`", s.span,
                                kind="shape")
            if s.shape is not None:
                self.shape(s.shape, scope)
            if s.init is not None:
                self.expr(s.init, scope)
            for n in s.names:
                self.define(scope, n, "param", s.span)
                self.param_names.append(n)
        elif isinstance(s, ast.StmtInput):
            if kind == "optimizer":
                raise NestError("an optimizer has no `input`: it sees `grad(W)`", s.span,
                                kind="value")
            self.shape(s.shape, scope)
            self.define(scope, s.name, "input", s.span)
        elif isinstance(s, ast.StmtLet):
            self.expr(s.value, scope)
            self.define(scope, s.name, "let", s.name_span)
        elif isinstance(s, ast.StmtUpdate):
            self.update(s, scope)
        elif isinstance(s, ast.StmtOutput):
            if kind == "optimizer":
                raise NestError("an optimizer has no `output`: it updates its `param`", s.span,
                                kind="value")
            self.expr(s.value, scope)
            if s.name:
                self.define(scope, s.name, "let", s.span)
        elif isinstance(s, ast.StmtRepeat):
            n = self.expr(s.count, scope)
            if n is not UNKNOWN and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                raise NestError(f"`repeat` needs a whole number of times, got {show_value(n)}",
                                s.count.span, kind="value")
            check_copies(n, s.count.span, self.copies)
            self.conds.append((ast.ExprBinary(">", s.count, ast.ExprNumber(0, "0", s.span),
                                              s.span), True))  # (taken when it repeats)
            outer = self.copies
            self.copies *= n if isinstance(n, int) and n > 0 else 1
            self.block(s.body, _Scope(scope))
            self.copies = outer
            self.conds.pop()
        elif isinstance(s, ast.StmtChain):
            values = self.expr(s.values, scope)
            if values is not UNKNOWN and not isinstance(values, (list, tuple)):
                raise NestError("`chain` runs over a list, such as [16, 256, 2048]", s.values.span,
                                kind="type")
            if scope.lookup(s.var) == "hyper":  # (as a let of its name)
                raise NestError(f"`{s.var}` is a hyperparameter and cannot be redefined",
                                s.span, kind="name", hint="choose another name for the chain's "
                                "variable")
            saved, outer = self.env.get(s.var, UNKNOWN), self.copies
            if isinstance(values, (list, tuple)):
                self.copies *= max(len(values), 1)
            for v in _chain_values(values):
                inner = _Scope(scope)  # each value builds its own levels
                inner.names[s.var] = "chain"
                self.env[s.var] = v
                self.block(s.body, inner)
            self.env[s.var], self.copies = saved, outer
        elif isinstance(s, ast.StmtIf):
            self.expr(s.cond, scope)
            for branch, way in ((s.then, True), (s.orelse, False)):
                self.conds.append((s.cond, way))
                self.block(branch, _Scope(scope))
                self.conds.pop()
        elif isinstance(s, ast.StmtTrain):
            if kind != "model":
                raise NestError(f"`train` belongs in a model; `{self.decl.name}` is {_a(kind)}",
                                s.span, kind="value", hint="declare it as `model`")
            # one outermost level: explain took the last one, `nestc train` the first
            if not any(s is t for t in self.decl.body):
                raise NestError("`train` is the model's outermost level: it goes at the top "
                                "of the model's body, not inside another statement", s.span,
                                kind="value")
            first = next(t for t in self.decl.body if isinstance(t, ast.StmtTrain))
            if first is not s:
                raise NestError(f"model `{self.decl.name}` has a second `train` level", s.span,
                                kind="value", notes=(("the first", first.span),),
                                hint="a model trains on one objective with one rule")
            self.frequency(s.frequency, TRAIN, scope)
            self.owner.append(TRAIN)
            self.block(s.body, _Scope(scope))
            self.owner.pop()
            self.clauses(s.body, "the train level", s.span, need_rule=True)
        elif isinstance(s, ast.StmtMemory):
            self.memory(s, scope)
        elif isinstance(s, ast.StmtRequire):
            self.require(s, scope)
        elif isinstance(s, ast.Clause):
            if not self.owner:
                raise NestError(f"`{s.kind}` belongs inside a memory or train body", s.span,
                                kind="value")
            if self.owner[-1] == TRAIN and s.kind not in ("objective", "rule"):
                raise NestError(f"`{s.kind}` is a memory clause: the train level has only an "
                                "objective and a rule", s.span, kind="value")
            if isinstance(s.value, str):
                return
            if s.kind == "rule":
                self.rule(s.value, scope)
            else:
                self.expr(s.value, scope)
        else:  # pragma: no cover - the parser makes no other statements
            raise AssertionError(f"unchecked statement {type(s).__name__}")

    def require(self, s: ast.StmtRequire, scope: _Scope) -> None:
        """A condition on the hyperparameters alone, at the top of the body; the defaults must
        meet it (every binding is checked against it: Checked.bind)."""
        if scope is not self.root or self.owner:
            raise NestError("`require` belongs at the top of a declaration's body", s.span,
                            kind="value", hint="it states what the hyperparameters must meet")
        self.expr(s.cond, scope)
        self.of_hypers(s.cond, "a `require`")
        unmet(self.decl, s, self.env)

    def update(self, s: ast.StmtUpdate, scope: _Scope) -> None:
        what = scope.lookup(s.target)
        if what is None:
            if s.op == "=" and s.index is None:
                raise self.unknown_name(s.target, s.target_span, scope) if self.owner else \
                    NestError(f"`{s.target}` is not defined", s.target_span, kind="name",
                              hint=f"define it first: `let {s.target} = ...`")
            raise self.unknown_name(s.target, s.target_span, scope)
        if what == "hyper":
            raise NestError(f"`{s.target}` is a hyperparameter: it cannot be updated",
                            s.target_span, kind="value",
                            hint=f"bind a new name instead: `let {s.target}2 = ...`")
        if what in ("input", "chain"):
            raise NestError(f"`{s.target}` is {'an input' if what == 'input' else 'a chain variable'}"
                            ": it cannot be updated", s.target_span, kind="value")
        if what == "memory" and (not self.owner or self.owner[-1] != s.target):
            where = f"inside the body of `{self.owner[-1]}`" if self.owner else "outside its body"
            raise NestError(f"memory `{s.target}` is updated {where}", s.target_span,
                            kind="value", hint=f"a memory's update goes in its own body: "
                            f"`memory {s.target} ... {{ {s.target} = ... }}`")
        if s.index:
            for i in s.index:
                self.expr(i, scope)
        value = self.expr(s.value, scope)
        if s.op in ("/=", "%=") and value == 0 and not isinstance(value, bool) and \
                self.taken():  # (as `h = h / 0` is)
            raise NestError("division by zero", s.value.span, kind="value")
        if what == "param":
            self.updated_params.add(s.target)

    def memory(self, s: ast.StmtMemory, scope: _Scope) -> None:
        if s.frequency is None and self.decl.kind != "optimizer":
            raise NestError(f"memory `{s.name}` needs a frequency", s.name_span, kind="frequency",
                            hint="add `every token`, `every N tokens` (optionally `in chunks of "
                            "C`) or `never`")
        if s.structure is not None:
            self.structure(s.structure, scope)
        if s.init is not None:
            self.init(s.init, scope)
        if s.frequency is not None:
            self.frequency(s.frequency, s.name, scope)
        self.define(scope, s.name, "memory", s.name_span)
        self.owner.append(s.name)
        inner = _Scope(scope)
        self.block(s.body, inner)
        self.owner.pop()
        # every way the body's `if`s can go (their conditions, hyperparameters, may be set
        # at build) must make a memory
        self.hyper_only(s.body, "an `if` in a memory's body")
        paths = body_paths(s.body, lambda cond: None)
        if len(paths) > MAX_BODY_PATHS:
            raise NestError(f"memory `{s.name}`'s `if`s make more than {MAX_BODY_PATHS} "
                            "bodies to check", s.name_span, kind="value",
                            hint="declare the memory in each branch of one `if` instead")
        for body in paths:
            self.memory_body(s, body)

    def hyper_only(self, body: tuple[ast.Stmt, ...], what: str) -> None:
        """The conditions of the `if`s in body read hyperparameters only (what the build
        decides, and explain shows, by their values)."""
        for b in body:
            if isinstance(b, ast.StmtIf):
                self.of_hypers(b.cond, what)
                self.hyper_only(b.then + b.orelse, what)

    def of_hypers(self, e: ast.Expr, what: str) -> None:
        for name in _names_in(e):
            if self.root.names.get(name.name) != "hyper":
                raise NestError(f"{what} tests hyperparameters only; `{name.name}` is not one",
                                name.span, kind="value")

    def memory_body(self, s: ast.StmtMemory, body: tuple[ast.Stmt, ...]) -> None:
        """One way through memory s's body (its `if`s resolved): a learning rule, or an
        explicit update, or neither for a cache or a memory that never learns."""
        never = s.frequency is not None and s.frequency.unit == "never"
        explicit = any(isinstance(b, ast.StmtUpdate) and b.target == s.name for b in body)
        has_rule = any(isinstance(b, ast.Clause) and b.kind in ("rule", "objective") for b in body)
        is_cache = isinstance(s.structure, ast.ExprName) and s.structure.name == "cache" or (
            isinstance(s.structure, ast.ExprCall) and isinstance(s.structure.func, ast.ExprName)
            and s.structure.func.name == "cache")
        if never and (explicit or has_rule):
            assert s.frequency is not None
            raise NestError(f"memory `{s.name}` never updates but has a learning rule",
                            s.frequency.span,
                            kind="frequency", hint="remove `never`, or its objective and rule")
        if is_cache:  # (clauses besides key and value, and an initial state, were ignored)
            extra = next((b for b in body if isinstance(b, ast.Clause)  # (choices aside)
                          and b.kind not in ("key", "value") and not isinstance(b.value, str)),
                         None)
            if extra is not None or explicit:
                where = extra.span if extra is not None else s.name_span
                what = f"`{extra.kind}`" if extra is not None else "an update"
                raise NestError(f"cache `{s.name}` takes only `key` and `value`, not {what}: it "
                                "keeps every token's key and value, which attention reads", where,
                                kind="value", hint="remove the rest, or make the memory "
                                "learn: matrix(...) or mlp(...)")
            if s.init is not None and not (isinstance(s.init, ast.ExprName)
                                           and s.init.name == "zeros"):
                raise NestError(f"cache `{s.name}` starts empty: it takes no initial state",
                                s.init.span, kind="value", hint="remove `= ...`")
        if not never and not explicit and not is_cache:
            self.clauses(body, f"memory `{s.name}`", s.name_span, need_rule=True)
        elif has_rule:
            self.clauses(body, f"memory `{s.name}`", s.name_span, need_rule=False)
        if explicit and has_rule:
            raise NestError(f"memory `{s.name}` has both an objective/rule and an explicit update",
                            s.name_span, kind="value", hint="keep one of the two forms")
        if self.decl.kind != "optimizer":  # (an optimizer's lowering says more: its own)
            _clauses_agree(s, body)

    def clauses(self, body: tuple[ast.Stmt, ...], what: str, span: Span, need_rule: bool) -> None:
        seen: dict[str, ast.Clause] = {}
        for b in body:
            if isinstance(b, ast.Clause):
                if b.kind in seen:
                    raise NestError(f"{what} has two `{b.kind}` clauses", b.span, kind="value",
                                    notes=(("the first one", seen[b.kind].span),))
                seen[b.kind] = b
        if need_rule or seen:
            if "objective" not in seen and "rule" in seen:
                raise NestError(f"{what} has a rule but no objective", seen["rule"].span,
                                kind="value", hint="add `objective l2(M(k), v)` or another")
            if "rule" not in seen and "objective" in seen:
                raise NestError(f"{what} has an objective but no rule", seen["objective"].span,
                                kind="value", hint="add `rule gd(lr = ...)` or another")
            if need_rule and "rule" not in seen:
                raise NestError(f"{what} has no learning rule", span, kind="value",
                                hint="add `objective ...; rule ...`, an update such as "
                                "`m = beta * m + g`, or `never`")
        rule = seen.get("rule")
        if "dgd" in seen and rule is not None:
            func = rule.value.func if isinstance(rule.value, ast.ExprCall) else rule.value
            name = qualified_name(func) if isinstance(func, ast.Expr) else None
            if name != "dgd":  # (the choice would say nothing: it was ignored)
                raise NestError(f"`dgd {seen['dgd'].value}` says how the `dgd` rule resolves, "
                                f"but the rule of {what} is `{name}`", seen["dgd"].span,
                                kind="value", hint="write `rule dgd(lr = ..., retain = ...)`, "
                                "or remove the choice", notes=(("the rule", rule.span),))

    def frequency(self, f: ast.Frequency, owner: str, scope: _Scope) -> None:
        kind = self.decl.kind
        if f.unit == "token" and (kind == "optimizer" or owner == TRAIN):
            where = "an optimizer's levels update" if kind == "optimizer" else \
                "the train level updates"
            raise NestError(f"{where} in steps, not tokens", f.span, kind="frequency",
                            hint="write `every step` or `every N steps`")
        if f.unit == "step" and kind != "optimizer" and owner != TRAIN:
            raise NestError("a memory in a block learns in context, in tokens", f.span,
                            kind="frequency", hint="write `every N tokens`; use `never` for a "
                            "memory that only the outer training level changes")
        every = self.positive(f.every, "the update period", scope) if f.every is not None else 1
        if f.chunk is not None:
            _lined_up(every, self.positive(f.chunk, "the chunk size", scope), f.chunk.span)

    def positive(self, e: ast.Expr, what: str, scope: _Scope) -> Any:
        # in the enclosing scope: `chain c in [...] { memory ... every c tokens }` is a constant
        v = self.expr(e, scope)
        if v is UNKNOWN or not self.taken():  # (`if p > 0 { ... every p tokens }`, p = 0)
            return UNKNOWN
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise NestError(f"{what} must be a positive whole number, got {show_value(v)}",
                            e.span, kind="frequency")
        return v

    def init(self, e: ast.Expr, scope: _Scope) -> None:
        if isinstance(e, ast.ExprName) and e.name == "meta" and self.decl.kind == "optimizer":
            raise NestError("`meta` needs an outer level to learn the initial state; an optimizer "
                            "has none", e.span, kind="value", hint="use `zeros_like(W)`")
        self.expr(e, scope)

    def structure(self, e: ast.Expr, scope: _Scope) -> None:
        if isinstance(e, ast.ExprCall) and isinstance(e.func, ast.ExprName) and e.func.name == "matrix":
            dims = [self.expr(a, scope) for a in e.args]
            self.call(e, scope)
            for d, a in zip(dims, e.args):
                if d is not UNKNOWN and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
                    raise NestError(f"a matrix dimension must be a positive whole number, got "
                                    f"{show_value(d)}", a.span, kind="shape")
            return
        self.expr(e, scope)

    def rule(self, e: ast.Expr, scope: _Scope) -> None:
        func = e.func if isinstance(e, ast.ExprCall) else e
        name = qualified_name(func)
        if name is not None and (isinstance(func, ast.ExprName) or name in self.decls):
            b = BUILTINS.get(name)
            d = self.decls.get(name)
            if d is not None and d.kind != "optimizer":
                raise NestError(f"`{name}` is a {d.kind}, not a learning rule", func.span,
                                kind="type", hint="a rule is gd, dgd, momentum, or an optimizer")
            if b is not None and b.category != "rule":
                raise NestError(f"`{name}` is not a learning rule", func.span, kind="type",
                                hint="a rule is gd, dgd, momentum, or an optimizer")
            if b is None and d is None:
                rules = [n for n, x in BUILTINS.items() if x.category == "rule"]
                opts = [n for n, x in self.decls.items() if x.kind == "optimizer"]
                raise NestError(f"unknown learning rule `{name}`", func.span, kind="name",
                                hint=did_you_mean(name, rules + opts)
                                or f"rules are {', '.join(rules + opts)}")
        self.expr(e, scope)

    def shape(self, shape: ast.Shape, scope: _Scope) -> None:
        for d in shape.dims:
            if isinstance(d, ast.ExprName) and scope.lookup(d.name) is None:
                continue  # a free dimension such as T
            v = self.expr(d, scope)
            if v is not UNKNOWN and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise NestError(f"a dimension must be a positive whole number, got "
                                f"{show_value(v)}", d.span, kind="shape")
        # the grammar admits only int, float and bool after `]`
        assert shape.dtype in (None, "int", "float", "bool"), shape.dtype

    def expr(self, e: ast.Expr, scope: _Scope) -> Any:
        """Check names and calls in e; return its constant value or UNKNOWN."""
        if isinstance(e, ast.ExprName):
            if scope.lookup(e.name) is None and e.name not in BUILTINS and e.name not in self.decls:
                later = scope.later_memory(e.name)
                if later is not None:
                    cache = later.structure is not None and \
                        span_text(later.structure.span).startswith("cache")
                    raise NestError(f"memory `{e.name}` is declared further down: " + (
                        "a cache cannot be used above its declaration" if cache else
                        f"above its declaration it can only be read, as `{e.name}(x)`"),
                        e.span, kind="name", notes=(("declared here", later.name_span),))
                raise self.unknown_name(e.name, e.span, scope)
        elif isinstance(e, ast.ExprCall):
            self.call(e, scope)
        elif isinstance(e, ast.ExprIndex):
            self.expr(e.base, scope)
            for i in e.index:
                self.expr(i, scope)
        elif isinstance(e, ast.ExprAttr):
            # `A.Name` names a declaration of a file imported `as A`; nothing else has fields
            # (`x.foo`, `gd.fast` passed the checker and then were "not supported" or worse)
            if not self.imported(e, scope):
                self.expr(e.base, scope)
                raise NestError(f"`.{e.name}` names a declaration of a file imported with "
                                f"`as`; `{span_text(e.base.span)}` is not such a file", e.span,
                                kind="name", hint="`transpose(x)` swaps the last two dims"
                                if e.name in ("T", "mT") else "import a file as a name: "
                                "`import \"file.nest\" as t`, then `t.Block`")
        elif isinstance(e, ast.ExprBinary):
            sides = (self.expr(e.left, scope), self.expr(e.right, scope))
            if e.op in ("/", "%") and sides[0] is UNKNOWN and sides[1] == 0 and \
                    not isinstance(sides[1], bool) and self.taken():
                # (two constants: const_eval says it; in a branch the defaults do not take,
                # such as `if t != 0 { h = h / t }`, it is not an error)
                raise NestError("division by zero", e.right.span, kind="value")
            if e.op not in ("and", "or", "==", "!=") and UNKNOWN in sides:
                # a tensor with a constant that is not a number (const_eval checks two
                # constants): it passed the checker and failed in the compiled code
                odd = next((v for v in sides if v is not UNKNOWN and
                            (isinstance(v, (str, list, tuple)) or v is None)), UNKNOWN)
                if odd is not UNKNOWN:
                    raise NestError(f"`{e.op}` needs numbers or tensors, got "
                                    f"{show_value(odd)}", e.span, kind="type")
        elif isinstance(e, ast.ExprUnary):
            self.expr(e.operand, scope)
        elif isinstance(e, ast.ExprCond):
            self.expr(e.cond, scope)
            for branch, way in ((e.then, True), (e.orelse, False)):
                self.conds.append((e.cond, way))
                self.expr(branch, scope)
                self.conds.pop()
        elif isinstance(e, (ast.ExprTuple, ast.ExprList)):
            for i in e.items:
                self.expr(i, scope)
        return const_eval(e, self.env)

    def call(self, e: ast.ExprCall, scope: _Scope) -> None:
        for a in e.args:
            self.expr(a, scope)
        for kw in e.kwargs:
            self.expr(kw.value, scope)
        seen: set[str] = set()
        for kw in e.kwargs:
            if kw.name in seen:
                raise NestError(f"keyword `{kw.name}` is given twice", kw.span, kind="value")
            seen.add(kw.name)
        if isinstance(e.func, ast.ExprAttr) and self.imported(e.func, scope):
            self.decl_call(e, self.decls[str(qualified_name(e.func))])
            return
        if not isinstance(e.func, ast.ExprName):
            self.expr(e.func, scope)
            return
        name = e.func.name
        local = scope.lookup(name)
        if local is not None:
            if local in ("hyper", "input", "chain", "let", "param"):
                # (a `let` of a builtin's name was passed over: the builtin was called)
                what = {"hyper": "a hyperparameter", "input": "an input", "chain": "a chain "
                        "variable", "let": "a `let`", "param": "a parameter"}[local]
                raise NestError(f"`{name}` is {what} here, not a function", e.func.span,
                                kind="type", hint=f"`{name}` is a builtin: name the {local} "
                                "otherwise" if name in BUILTINS else None)
            return  # reading a memory M(k)
        if scope.later_memory(name) is not None and name not in BUILTINS and \
                name not in self.decls:
            # a read at the start of M's chunk (a builtin or declaration of the name is called,
            # as it was before the memory was declared)
            if len(e.args) != 1 or e.kwargs:
                raise NestError(f"memory `{name}` is read with one argument", e.span,
                                kind="value")
            return
        if name in self.decls:
            self.decl_call(e, self.decls[name])
            return
        b = BUILTINS.get(name)
        if b is None:
            raise self.unknown_name(name, e.func.span, scope)
        n = len(e.args)
        if n < b.min_args or (b.max_args is not None and n > b.max_args):
            want = (str(b.min_args) if b.min_args == b.max_args else
                    f"{b.min_args} or more" if b.max_args is None else f"{b.min_args} to {b.max_args}")
            extra = " (the value before `|>` counts as the first)" if e.piped else ""
            raise NestError(f"`{name}` takes {want} positional argument{'s' * (want != '1')}, "
                            f"got {n}{extra}", e.span, kind="type", hint=b.doc)
        for kw in e.kwargs:
            if kw.name not in b.kwargs:
                allowed = ", ".join(b.kwargs) if b.kwargs else "no keywords"
                raise NestError(f"`{name}` has no keyword `{kw.name}`", kw.span, kind="type",
                                hint=did_you_mean(kw.name, b.kwargs) or f"it takes {allowed}")

    def imported(self, e: ast.ExprAttr, scope: _Scope) -> bool:
        """Whether e is `A.Name` for a declaration imported with `import "..." as A`; NestError
        for a name that file does not declare."""
        name = qualified_name(e)
        if name is None or scope.lookup(name.split(".")[0]) is not None:
            return False
        if name in self.decls:
            return True
        alias = name.rsplit(".", 1)[0]
        members = [n for n in self.decls if n.startswith(alias + ".")]
        if not members:
            return False
        raise NestError(f"the file imported as `{alias}` declares no `{e.name}`", e.span,
                        kind="name", hint=did_you_mean(name, members)
                        or f"it declares {', '.join(sorted(members))}")

    def decl_call(self, e: ast.ExprCall, d: ast.Decl) -> None:
        self.calls.append((d, e.span))
        names = [p.name for p in d.params]
        # `x |> Block(h)` feeds x to the block's input: only h binds a hyperparameter
        args = e.args[1:] if e.piped else e.args
        if len(args) > len(names):
            raise NestError(f"`{d.name}` takes at most {_count(len(names), 'positional argument')}"
                            f", got {len(args)}", e.span, kind="type",
                            hint=f"its hyperparameters are {', '.join(names)}" if names else None)
        given = set(names[: len(args)])
        for kw in e.kwargs:
            if kw.name not in names:
                raise NestError(f"`{d.name}` has no hyperparameter `{kw.name}`", kw.span,
                                kind="name", hint=did_you_mean(kw.name, names)
                                or f"its hyperparameters are {', '.join(names) or 'none'}")
            if kw.name in given:
                raise NestError(f"`{kw.name}` is given twice", kw.span, kind="value")
            given.add(kw.name)
        for p in d.params:
            if p.default is None and p.name not in given:
                raise NestError(f"`{d.name}` needs a value for `{p.name}`", e.span, kind="value",
                                hint=f"pass `{p.name} = ...`: it has no default")
        self.call_requires(e, d, args)

    def taken(self) -> bool:
        """Whether this declaration's defaults take every branch around the statement or
        expression being checked (a `repeat` of 0 takes none)."""
        for cond, way in self.conds:
            value = const_eval(cond, self.env)
            if value is UNKNOWN or bool(value) != way:
                return False
        return True

    def call_requires(self, e: ast.ExprCall, d: ast.Decl, args: tuple[ast.Expr, ...]) -> None:
        """The callee's `require`s, met by the arguments at this declaration's defaults (where
        those are known and take the call's branches); else an error at the call."""
        if not any(isinstance(s, ast.StmtRequire) for s in d.body) or not self.taken():
            return
        given = {p.name: const_eval(a, self.env) for p, a in zip(d.params, args)}
        given |= {kw.name: const_eval(kw.value, self.env) for kw in e.kwargs}
        values = bound_defaults(d, given)
        for s in d.body:
            if isinstance(s, ast.StmtRequire):
                unmet(d, s, values, call=e.span)


MAX_REPEAT = 1024  # copies a `repeat` makes (each is built: a huge count hung the build)


def counts(body: tuple[ast.Stmt, ...], env: dict[str, Any], copies: int = 1) -> None:
    """The update periods, chunk sizes and `repeat` counts of a body, at bound values: a
    positive whole number each (NestError at it), a repeat at most MAX_REPEAT copies with
    those of the repeats and chains around it (`copies`). The checker sees the defaults' at
    load; a build, a call or `--set` (a period of 0 divided by zero in explain, a negative one
    printed "every -2 tokens") binds others."""
    def whole(e: ast.Expr | None, what: str, low: int = 1) -> Any:
        if e is None:
            return None
        v = const_eval(e, env)
        if v is not UNKNOWN and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            kind = "positive whole number" if low else "whole number of at least 0"
            raise NestError(f"{what} must be a {kind}, got {show_value(v)}", e.span,
                            kind="frequency" if low else "value")
        return v

    for s in body:
        freq = getattr(s, "frequency", None)
        if isinstance(freq, ast.Frequency):
            every = whole(freq.every, "the update period")
            chunk = whole(freq.chunk, "the chunk size")
            if freq.chunk is not None:
                _lined_up(1 if freq.every is None else every, chunk, freq.chunk.span)
        if isinstance(s, ast.StmtRepeat):
            n = whole(s.count, "`repeat`'s count", low=0)
            check_copies(n, s.count.span, copies)
            counts(s.body, env, copies * (n if isinstance(n, int) and n > 0 else 1))
        elif isinstance(s, ast.StmtChain):
            values = const_eval(s.values, env)
            for v in values if isinstance(values, (list, tuple)) else ():
                counts(s.body, {**env, s.var: v}, copies * len(values))
        elif isinstance(s, ast.StmtIf):
            way = const_eval(s.cond, env)
            counts(s.then + s.orelse if way is UNKNOWN else s.then if way else s.orelse, env,
                   copies)
        elif isinstance(s, (ast.StmtMemory, ast.StmtTrain)):
            counts(s.body, env, copies)


def check_copies(n: Any, span: Span, outer: int = 1) -> None:
    """NestError for a `repeat` count above MAX_REPEAT, with the `outer` copies of the
    repeats around it (at load and at every binding)."""
    if isinstance(n, int) and n * outer > MAX_REPEAT:
        inside = f" inside {outer} copies ({n * outer} in all)" if outer > 1 else ""
        raise NestError(f"`repeat` {n} times{inside} is more than nestc builds (at most "
                        f"{MAX_REPEAT} copies)", span, kind="value")


def _lined_up(every: Any, chunk: Any, span: Span) -> None:
    """NestError for chunks that are not a multiple of the update period (at load and at
    every binding: a `--set` of either was not checked)."""
    if isinstance(every, int) and isinstance(chunk, int) and chunk % every:
        raise NestError(f"chunks of {chunk} tokens never line up with an update every {every} "
                        "tokens", span, kind="frequency", hint=f"make the chunk a multiple of "
                        f"{every}")


def next_token_objective(decl: ast.Decl, e: Any) -> bool:
    """Whether e is cross_entropy(<the output>, next(<the input>)) of the model decl: the one
    task objective built (other outputs and targets were taken as these, silently)."""
    # the output's name, or the name it returns (`let logits = ...; output logits`)
    outputs = [s.name if s.name else s.value.name if isinstance(s.value, ast.ExprName) else None
               for s in _walk(decl.body) if isinstance(s, ast.StmtOutput)]
    inputs = [s.name for s in decl.body if isinstance(s, ast.StmtInput)]

    def named(x: Any, names: list[Any]) -> bool:
        return isinstance(x, ast.ExprName) and x.name in names

    return (isinstance(e, ast.ExprCall) and named(e.func, ["cross_entropy"])
            and len(e.args) == 2 and not e.kwargs and named(e.args[0], outputs)
            and isinstance(e.args[1], ast.ExprCall) and named(e.args[1].func, ["next"])
            and len(e.args[1].args) == 1 and named(e.args[1].args[0], inputs))


def unmet(decl: ast.Decl, s: ast.StmtRequire, values: dict[str, Any],
          call: Span | None = None) -> None:
    """A NestError at `require` s when the hyperparameters `values` do not meet it (nothing
    where its value is not known: a required hyperparameter not yet given); at `call`, with
    a note at the `require`, for the values a call gives."""
    ok = const_eval(s.cond, values)
    if ok is UNKNOWN or ok:
        return
    names = dict.fromkeys(e.name for e in _names_in(s.cond))
    given = ", ".join(f"{n} = {show_value(values[n])}" for n in names if n in values)
    said = s.message or f"it requires {span_text(s.cond.span)}"
    hint = f"got {given}" if given else None
    if call is not None:
        raise NestError(f"this call of {decl.kind} `{decl.name}` does not meet its requirement: "
                        f"{said}", call, kind="value", hint=hint,
                        notes=(("required here", s.span),))
    raise NestError(f"{decl.kind} `{decl.name}`: {said}", s.span, kind="value", hint=hint)


def _names_in(e: ast.Expr) -> list[ast.ExprName]:
    """The names an expression reads (a call's function aside)."""
    if isinstance(e, ast.ExprName):
        return [e]
    if isinstance(e, ast.ExprCall):
        parts: list[Any] = [*e.args, *(k.value for k in e.kwargs)]
    else:
        parts = [getattr(e, f) for f in getattr(e, "__dataclass_fields__", ())]
    out: list[ast.ExprName] = []
    for p in parts:
        for x in p if isinstance(p, tuple) else (p,):
            if isinstance(x, (ast.ExprName, ast.ExprCall, ast.ExprBinary, ast.ExprUnary,
                              ast.ExprIndex, ast.ExprCond, ast.ExprTuple, ast.ExprList)):
                out += _names_in(x)
    return out


def body_paths(body: tuple[ast.Stmt, ...], decide: Callable[[ast.Expr], bool | None]
               ) -> list[tuple[ast.Stmt, ...]]:
    """The statements of a memory's body along each way its `if`s can go: decide(condition)
    is True or False where its value is known, None where it is not (both ways). At most
    MAX_BODY_PATHS + 1 of them (more: too many to check)."""
    paths: list[tuple[ast.Stmt, ...]] = [()]
    for b in body:
        if not isinstance(b, ast.StmtIf):
            paths = [p + (b,) for p in paths]
            continue
        way = decide(b.cond)
        branches = [b.then, b.orelse] if way is None else [b.then if way else b.orelse]
        ways = [q for branch in branches for q in body_paths(branch, decide)]
        paths = [p + q for p in paths for q in ways][:MAX_BODY_PATHS + 1]
    return paths


def _clauses_agree(s: ast.StmtMemory, body: tuple[ast.Stmt, ...]) -> None:
    """A memory learns what its objective says, `l2(M(k), v)`: k -> v. Its `key` and `value`
    clauses, where it has them, must say the same (spaces aside); another was ignored."""
    clauses = {b.kind: b.value for b in body if isinstance(b, ast.Clause)}
    objective = clauses.get("objective")
    if not (isinstance(objective, ast.ExprCall) and isinstance(objective.func, ast.ExprName)
            and objective.func.name in ("l2", "dot", "huber") and len(objective.args) == 2):
        return
    read, target = objective.args
    if not (isinstance(read, ast.ExprCall) and isinstance(read.func, ast.ExprName)
            and read.func.name == s.name and len(read.args) == 1):
        return
    key = read.args[0]
    for kind, said in (("key", key), ("value", target)):
        given = clauses.get(kind)
        if isinstance(given, ast.Expr) and \
                "".join(span_text(given.span).split()) != "".join(span_text(said.span).split()):
            how = "reads" if kind == "key" else "compares"
            tail = "" if kind == "key" else f" with `{span_text(target.span)}`"
            raise NestError(f"the `{kind}` of memory `{s.name}` is `{span_text(given.span)}`, "
                            f"but its objective {how} `{s.name}({span_text(key.span)})`{tail}",
                            given.span, kind="value",
                            hint="make them the same expression (the objective's is learned)")


def _chain_values(values: Any) -> list[Any]:
    """The values a chain body is checked with: each distinct one, or UNKNOWN once for an unknown,
    empty or very long list (nested chains multiply, and the check must stay instant)."""
    if values is UNKNOWN:
        return [UNKNOWN]
    distinct = list({repr(v): v for v in values}.values())
    return distinct if 0 < len(distinct) <= MAX_CHAIN_CHECKS else [UNKNOWN]


def qualified_name(e: ast.Expr) -> str | None:
    """`Adam` -> "Adam"; `A.Adam` -> "A.Adam" (a declaration imported `as A`); else None."""
    parts: list[str] = []
    while isinstance(e, ast.ExprAttr):
        parts.append(e.name)
        e = e.base
    if not isinstance(e, ast.ExprName):
        return None
    parts.append(e.name)
    return ".".join(reversed(parts))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def check_decl(decl: ast.Decl, scope: dict[str, ast.Decl]) -> Checked:
    hypers = hypers_of(decl)
    model = pydantic_model(decl, hypers)
    checker = BodyChecker(decl, hypers, scope)
    checker.run()
    return Checked(decl, hypers, scope, model, tuple(checker.calls))


def check_calls(checked: list[Checked]) -> None:
    """Reject declarations that call themselves, directly or through others (they never end)."""
    by_decl = {id(c.decl): c for c in checked}
    done: set[int] = set()

    def visit(c: Checked, path: list[tuple[Checked, Span]]) -> None:
        if id(c.decl) in done:
            return
        for d, span in c.calls:
            names = [p.name for p, _ in path] + [c.name, d.name]
            if d is c.decl or any(p.decl is d for p, _ in path):
                start = names.index(d.name)
                raise NestError(f"`{d.name}` calls itself: {' -> '.join(names[start:])}", span,
                                kind="value", hint="a block cannot contain itself; use `repeat` "
                                "to stack copies")
            if id(d) in by_decl:
                visit(by_decl[id(d)], [*path, (c, span)])
        done.add(id(c.decl))

    for c in checked:
        visit(c, [])


def _outputs_on_a_path(stmts: tuple[ast.Stmt, ...]) -> list[ast.StmtOutput]:
    """The outputs of the way through a body that has the most: one in each branch of an
    `if` is one way each; one in a `repeat` or `chain` body counts twice (it repeats)."""
    out: list[ast.StmtOutput] = []
    for s in stmts:
        if isinstance(s, ast.StmtOutput):
            out.append(s)
        elif isinstance(s, ast.StmtIf):
            ways = _outputs_on_a_path(s.then), _outputs_on_a_path(s.orelse)
            out += ways[0] if len(ways[0]) >= len(ways[1]) else ways[1]
        elif isinstance(s, (ast.StmtRepeat, ast.StmtChain)):
            inner = _outputs_on_a_path(s.body)
            out += inner * 2 if inner else []
    return out


def _walk(stmts: tuple[ast.Stmt, ...]):
    """Every statement, nested bodies included."""
    for s in stmts:
        yield s
        for child in ("body", "then", "orelse"):
            yield from _walk(getattr(s, child, ()) or ())
