"""lower_optimizer: a checked `optimizer` declaration -> ir.Optimizer.

Lets stay named, memories with an objective and a rule become explicit updates (gd on l2(m, t)
is m <- retain * m - lr * (m - t)), and every `if` on hyperparameters forks the statement list,
so each variant is straight-line code; `tree` records how a param group picks its variant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nestc import ast, ir
from nestc.check import Checked, qualified_name
from nestc.errors import NestError
from nestc.hyper import UNKNOWN, const_eval
from nestc.source import Span

ARITH = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow"}
UPDATE_OPS = {"+=": "add", "-=": "sub", "*=": "mul", "/=": "div"}


@dataclass(frozen=True)
class Leaf:
    variant: int


@dataclass(frozen=True)
class Branch:
    cond: ir.E
    then: Leaf | Branch
    orelse: Leaf | Branch


class _Lowerer:
    def __init__(self, checked: Checked) -> None:
        self.checked = checked
        self.decl = checked.decl
        self.hypers = checked.hypers
        self.defaults = {n: h.default for n, h in checked.hypers.items() if not h.required}
        self.param = next(s.names[0] for s in _walk(self.decl.body) if isinstance(s, ast.StmtParam))
        self.variants: list[ir.Variant] = []
        self.sums: tuple[ir.Memory, list[tuple[str, ir.E]]] | None = None
        self.numbers: dict[str, ir.E] = {}  # lets holding numbers: their expressions

    def unsupported(self, what: str, span: Span) -> NestError:
        """A limitation of this compiler, not a mistake in the spec (`check` lets it pass)."""
        err = NestError(f"{what} is not supported in an optimizer yet", span, kind="value")
        err.unsupported = True
        return err

    # expressions
    def expr(self, e: ast.Expr, names: dict[str, str]) -> ir.E:
        if isinstance(e, ast.ExprNumber):
            return ir.const(e.value)
        if isinstance(e, ast.ExprBool):
            return ir.const(e.value)
        if isinstance(e, ast.ExprString):
            return ir.const(e.value)
        if isinstance(e, ast.ExprName):
            return self.name(e.name, e.span, names)
        if isinstance(e, ast.ExprIndex):
            if isinstance(e.base, ast.ExprName) and names.get(e.base.name) == "hyper":
                idx = [const_eval(i, {}) for i in e.index]
                if len(idx) == 1 and isinstance(idx[0], int) and not isinstance(idx[0], bool):
                    value = self.defaults.get(e.base.name, UNKNOWN)
                    if isinstance(value, (tuple, list)) and not -len(value) <= idx[0] < len(value):
                        raise NestError(f"index {idx[0]} is out of range: `{e.base.name}` has "
                                        f"{len(value)} items", e.span, kind="value")
                    return ir.E("hyper", value=(e.base.name, idx[0]))
            raise self.unsupported("indexing anything but a hyperparameter tuple", e.span)
        if isinstance(e, ast.ExprBinary):
            a, b = self.expr(e.left, names), self.expr(e.right, names)
            if e.op == "%":
                if not (a.is_scalar and b.is_scalar):
                    raise self.unsupported("`%` on tensors", e.span)
                return ir.E("mod", (a, b))
            if e.op in ARITH:
                return ir.E(ARITH[e.op], (a, b))
            if e.op == "@":
                if a.is_scalar or b.is_scalar:
                    raise NestError("`@` multiplies matrices; use `*` with a number", e.span,
                                    kind="type")
                return ir.E("call", (a, b), "matmul")
            return ir.E("cmp", (a, b), e.op)
        if isinstance(e, ast.ExprUnary):
            a = self.expr(e.operand, names)
            if e.op == "-":
                return ir.E("neg", (a,))
            if e.op == "+":
                return a
            return ir.E("cmp", (a,), "not")
        if isinstance(e, ast.ExprCond):
            c = self.expr(e.cond, names)
            if not c.is_static:
                raise self.unsupported("a condition on anything but hyperparameters and shapes",
                                       e.cond.span)
            return ir.E("cond", (c, self.expr(e.then, names), self.expr(e.orelse, names)))
        if isinstance(e, ast.ExprCall):
            return self.call(e, names)
        raise self.unsupported(f"`{_text(e)}`", e.span)

    def name(self, name: str, span: Span, names: dict[str, str]) -> ir.E:
        what = names.get(name)
        if what == "hyper":
            return ir.E("hyper", value=(name,))
        if what == "param":
            return ir.E("param")
        if what == "memory":
            return ir.E("state", value=name)
        if what == "let":
            return ir.E("local", value=name)
        if what == "number":
            # the let's expression rides along, so is_static & co. see what it depends on
            return ir.E("slocal", (self.numbers[name],), name)
        raise self.unsupported(f"`{name}` as a value", span)

    def call(self, e: ast.ExprCall, names: dict[str, str]) -> ir.E:
        if not isinstance(e.func, ast.ExprName):
            raise self.unsupported("calling an expression", e.span)
        fn = e.func.name
        if fn == "grad":
            self.the_param(e.args[0], fn)
            return ir.E("grad")
        if fn == "step":
            return ir.E("step", value=None)
        if fn in ir.SHAPE_CALLS:
            self.the_param(e.args[0], fn)
            return ir.E("shape", value=fn)
        if fn == "newton_schulz":
            return self.newton_schulz(e, names)
        if fn == "sum":
            return self.chunk_sum(e, names)
        if fn == "transpose":
            x = self.expr(e.args[0], names)
            if x.is_scalar:
                raise NestError("`transpose` takes a matrix", e.args[0].span, kind="type")
            return ir.E("call", (x,), "transpose")
        if fn not in ir.ELEMENTWISE_CALLS:
            raise self.unsupported(f"`{fn}`", e.func.span)
        if fn == "clamp":
            lo = next((k.value for k in e.kwargs if k.name == "lo"), None)
            hi = next((k.value for k in e.kwargs if k.name == "hi"), None)
            bounds = (self.expr(e.args[0], names),
                      self.expr(lo, names) if lo else ir.const(float("-inf")),
                      self.expr(hi, names) if hi else ir.const(float("inf")))
            return ir.E("call", bounds, "clamp")
        if e.kwargs:
            raise self.unsupported(f"keyword `{e.kwargs[0].name}` of `{fn}`", e.kwargs[0].span)
        args = tuple(self.expr(a, names) for a in e.args)
        if fn == "debias":
            if not args[1].is_hyper_only:
                raise NestError("the rate of `debias` must be a hyperparameter expression",
                                e.args[1].span, kind="value")
            mem = args[0].value if args[0].op == "state" else None
            return ir.E("call", (args[0], args[1], ir.E("step", value=mem)), "debias")
        return ir.E("call", args, fn)

    def chunk_sum(self, e: ast.ExprCall, names: dict[str, str]) -> ir.E:
        """sum(x) in a memory updated every N steps: x added up over the N steps, kept in a
        hidden every-step memory that the slow write reads and then empties."""
        if e.kwargs:
            raise self.unsupported("`sum` with keywords", e.kwargs[0].span)
        if self.sums is None:
            raise NestError("`sum` adds a signal over the steps between two updates of a slower "
                            "memory: use it in the update of a memory `every N steps`", e.span,
                            kind="value")
        mem, sums = self.sums
        x = self.expr(e.args[0], names)
        if mem.period == ir.const(1):
            return x
        acc = f"{mem.name}_sum{len(sums)}" if sums else f"{mem.name}_sum"
        if acc in names:
            raise NestError(f"`{acc}` is taken: it names the running sum of `{mem.name}`",
                            e.span, kind="name")
        sums.append((acc, x))
        return ir.E("state", value=acc)

    def the_param(self, arg: ast.Expr, fn: str) -> None:
        if not (isinstance(arg, ast.ExprName) and arg.name == self.param):
            raise NestError(f"an optimizer's `{fn}` takes its param: `{fn}({self.param})`",
                            arg.span, kind="value")

    def newton_schulz(self, e: ast.ExprCall, names: dict[str, str]) -> ir.E:
        """newton_schulz(x, steps = 5, eps = 1e-7, coefficients = (a, b, c), dtype = "bfloat16")
        with torch.optim.Muon's defaults."""
        kw = {k.name: k.value for k in e.kwargs}
        steps = self.expr(kw["steps"], names) if "steps" in kw else ir.const(5)
        eps = self.expr(kw["eps"], names) if "eps" in kw else ir.const(1e-7)
        dtype = self.expr(kw["dtype"], names) if "dtype" in kw else ir.const("bfloat16")
        coeffs: tuple[ir.E, ...] = (ir.const(3.4445), ir.const(-4.7750), ir.const(2.0315))
        if "coefficients" in kw:
            c = kw["coefficients"]
            if isinstance(c, ast.ExprTuple) and len(c.items) == 3:
                coeffs = tuple(self.expr(i, names) for i in c.items)
            elif isinstance(c, ast.ExprName) and names.get(c.name) == "hyper":
                coeffs = tuple(ir.E("hyper", value=(c.name, i)) for i in range(3))
            else:
                raise NestError("`coefficients` is a tuple of three numbers, or a hyperparameter "
                                "holding one", c.span, kind="value")
        from nestc.ops import NS_DTYPES

        if isinstance(kw.get("coefficients"), ast.ExprName):
            default = self.defaults.get(kw["coefficients"].name)  # type: ignore[union-attr]
            if not (isinstance(default, (tuple, list)) and len(default) == 3):
                raise NestError("`coefficients` holds three numbers (a, b, c)",
                                kw["coefficients"].span, kind="value")
        given = dtype.value if dtype.op == "const" else self.defaults.get(
            dtype.value[0] if dtype.op == "hyper" else "", None)
        if given not in NS_DTYPES:
            raise NestError(f"`dtype` of `newton_schulz` is one of {', '.join(NS_DTYPES)}, got "
                            f"{given!r}", (kw.get("dtype") or e).span, kind="value")
        numbers = (steps, eps, *coeffs, dtype)
        for n, a in zip(numbers, (kw.get("steps"), kw.get("eps"), None, None, None,
                                  kw.get("dtype"))):
            if not n.is_hyper_only:
                raise NestError("the settings of `newton_schulz` are hyperparameters or numbers",
                                a.span if a is not None else e.span, kind="value")
        x = self.expr(e.args[0], names)
        if x.is_scalar:
            raise NestError("`newton_schulz` takes a matrix", e.args[0].span, kind="type")
        return ir.E("call", (x, *numbers), "newton_schulz")

    # statements
    def lower(self) -> ir.Optimizer:
        if "backend" in self.hypers:
            raise NestError("`backend` is reserved: it picks how a built optimizer runs",
                            self.hypers["backend"].span, kind="name", hint="choose another name")
        names = {n: "hyper" for n in self.hypers}
        tree = self.block(list(self.decl.body), names, [], [], ())
        hypers = [ir.HyperInfo(n, h.default, h.required) for n, h in self.hypers.items()]
        return ir.Optimizer(self.decl.name, self.decl.span.file, self.decl.span.line, self.param,
                            hypers, self.variants, tree)

    def block(self, todo: list[ast.Stmt], names: dict[str, str], mems: list[ir.Memory],
              stmts: list[ir.Stmt], conds: tuple[tuple[ir.E, bool], ...]) -> Leaf | Branch:
        names = dict(names)
        mems, stmts = list(mems), list(stmts)
        while todo:
            s = todo.pop(0)
            if isinstance(s, ast.StmtParam):
                names[s.names[0]] = "param"
            elif isinstance(s, ast.StmtLet):
                value = self.expr(s.value, names)
                stmts.append(ir.Let(s.name, value, s.span))
                names[s.name] = "number" if value.is_scalar else "let"
                if value.is_scalar:
                    self.numbers[s.name] = value
            elif isinstance(s, ast.StmtUpdate):
                stmts.append(self.update(s, names))
            elif isinstance(s, ast.StmtMemory):
                if any(m.name == s.name for m in mems):
                    raise NestError(f"`{s.name}` is taken: a memory of that name is already "
                                    "kept (a running sum `<memory>_sum` included)", s.name_span,
                                    kind="name", hint="choose another name")
                new_mems, updates = self.memory(s, names)
                mems += new_mems
                names[s.name] = "memory"
                stmts += updates
            elif isinstance(s, ast.StmtIf):
                cond = self.expr(s.cond, names)
                if not cond.is_static:
                    raise NestError("an optimizer's `if` tests hyperparameters and the param's "
                                    "shape only", s.cond.span, kind="value",
                                    hint="such as `if nesterov { ... }` or `if ndim(W) < 2 { ... }`")
                then = self.block(list(s.then) + todo, names, mems, stmts, (*conds, (cond, True)))
                orelse = self.block(list(s.orelse) + todo, names, mems, stmts,
                                    (*conds, (cond, False)))
                return Branch(cond, then, orelse)
            else:
                raise self.unsupported(f"`{type(s).__name__}`", s.span)
        _check_late_reads(stmts, mems)
        # `read before write` memories are written after everything else in the step reads them
        late: list[ir.Stmt] = [s for s in stmts if isinstance(s, ir.Assign) and s.late]
        stmts = [s for s in stmts if not (isinstance(s, ir.Assign) and s.late)] + late
        self.variants.append(ir.Variant(conds, mems, stmts))
        return Leaf(len(self.variants) - 1)

    def update(self, s: ast.StmtUpdate, names: dict[str, str]) -> ir.Assign:
        if s.index:
            raise self.unsupported("an indexed update", s.span)
        what = names.get(s.target)
        if what not in ("param", "memory"):
            raise NestError(f"`{s.target}` is not a param or memory of this optimizer",
                            s.target_span, kind="value")
        value = self.expr(s.value, names)
        if s.op != "=":
            current = ir.E("param") if what == "param" else ir.E("state", value=s.target)
            value = ir.E(UPDATE_OPS[s.op], (current, value))
        return ir.Assign(s.target, "param" if what == "param" else "state", value, s.span)

    def memory(self, s: ast.StmtMemory, names: dict[str, str]
               ) -> tuple[list[ir.Memory], list[ir.Assign]]:
        if s.structure is not None and not _is_call(s.structure, "like"):
            raise self.unsupported("a memory structure other than like(W)", s.structure.span)
        if s.name == "step":
            raise NestError("a memory cannot be called `step`: the step count is kept under "
                            "that name", s.name_span, kind="name", hint="choose another name")
        init, first = "zeros", None
        if s.init is not None:
            if _is_call(s.init, "from"):
                assert isinstance(s.init, ast.ExprCall)
                init, first = "from", self.expr(s.init.args[0], names)
            elif _is_call(s.init, "ones_like"):
                init = "ones"
            elif not (_is_call(s.init, "zeros_like") or _is_call(s.init, "zeros")
                      or _is_call(s.init, "like")):
                raise self.unsupported(f"the initial state `{_text(s.init)}`", s.init.span)
        period = ir.const(1)
        f = s.frequency
        if f is not None and f.unit == "never":
            raise self.unsupported("a `never` memory", f.span)
        if f is not None and f.every is not None:
            period = self.expr(f.every, names)
            if not period.is_hyper_only:
                raise NestError("the period of a memory is a number or a hyperparameter",
                                f.every.span, kind="frequency")
            if init == "from" and period != ir.const(1):
                raise self.unsupported("`from` with a period other than every step", f.span)
        clauses = {b.kind: b for b in s.body if isinstance(b, ast.Clause)}
        for kind, clause in clauses.items():
            if kind not in ("objective", "rule", "read"):
                raise self.unsupported(f"the `{kind}` clause", clause.span)
        deferred = "read" in clauses and clauses["read"].value == "before write"
        mem = ir.Memory(s.name, init, period, s.span, first, deferred)
        inner = dict(names)
        inner[s.name] = "memory"
        updates = [b for b in s.body if isinstance(b, ast.StmtUpdate)]
        for b in s.body:
            if not isinstance(b, (ast.StmtUpdate, ast.Clause)):
                raise self.unsupported(f"`{type(b).__name__}` in a memory body", b.span)
        if len(updates) > 1:
            raise self.unsupported("more than one update of a memory", updates[1].span)
        # sum(x) in the update of a memory every N steps adds x over the steps in between
        self.sums = (mem, [])
        update = (self.update(updates[0], inner) if updates else
                  self.objective_rule(s, clauses, inner))
        _, sums = self.sums
        self.sums = None
        mems, accumulate, reset = [mem], [], []
        for acc, x in sums:
            mems.append(ir.Memory(acc, "zeros", ir.const(1), s.span))
            accumulate.append(ir.Assign(acc, "state", ir.E("state", value=acc) + x, s.span))
            reset.append(ir.Assign(acc, "state", ir.const(0), s.span, every=period,
                                   late=deferred))
        return mems, accumulate + [replace(update, late=deferred)] + reset

    def objective_rule(self, s: ast.StmtMemory, clauses: dict[str, ast.Clause],
                       names: dict[str, str]) -> ir.Assign:
        obj, rule = clauses["objective"].value, clauses["rule"].value
        assert not isinstance(obj, str) and not isinstance(rule, str)
        if not isinstance(obj, ast.ExprCall) or not isinstance(obj.func, ast.ExprName):
            raise self.unsupported("a custom objective expression", obj.span)
        kind = obj.func.name
        if kind not in ("l2", "dot", "huber"):
            raise self.unsupported(f"the objective `{kind}`", obj.func.span)
        pred = obj.args[0]
        if not (isinstance(pred, ast.ExprName) and pred.name == s.name):
            raise NestError(f"an optimizer memory's objective compares the memory itself: "
                            f"`{kind}({s.name}, ...)`", pred.span, kind="value",
                            hint="element-wise memories predict their target directly")
        state = ir.E("state", value=s.name)
        target = self.expr(obj.args[1], names)
        if kind == "l2":
            grad = state - target
        elif kind == "dot":
            grad = -target
        else:
            delta = next((k.value for k in obj.kwargs if k.name == "delta"), None)
            d = self.expr(delta, names) if delta is not None else ir.const(1.0)
            grad = ir.E("call", (state - target, -d, d), "clamp")
        func = rule.func if isinstance(rule, ast.ExprCall) else rule
        rule_name = qualified_name(func) or _text(rule)
        kwargs = {k.name: k.value for k in rule.kwargs} if isinstance(rule, ast.ExprCall) else {}
        if rule_name != "gd":
            raise self.unsupported(f"the rule `{rule_name}` (in an optimizer's memory)", rule.span)
        lr = self.expr(kwargs["lr"], names) if "lr" in kwargs else ir.const(1.0)
        value = state - lr * grad
        if "retain" in kwargs:
            value = self.expr(kwargs["retain"], names) * state - lr * grad
        return ir.Assign(s.name, "state", value, clauses["rule"].span)


def _check_late_reads(stmts: list[ir.Stmt], mems: list[ir.Memory]) -> None:
    """A `read before write` memory is written at the end of the step; that gives the value
    its declaration means only if nothing it reads changes in between."""
    late_names = {m.name for m in mems if m.deferred}
    for i, s in enumerate(stmts):
        if not (isinstance(s, ir.Assign) and s.late):
            continue
        later = stmts[i + 1:]
        reads = list(s.value.walk())
        changed = None
        if any(n.op == "param" for n in reads) and any(
                isinstance(t, ir.Assign) and t.kind == "param" for t in later):
            changed = "the param"
        for n in reads:
            if n.op == "local" and any(isinstance(t, ir.Let) and t.name == n.value for t in later):
                changed = f"`{n.value}`"
            if n.op == "state" and n.value in late_names and n.value != s.target and any(
                    isinstance(t, ir.Assign) and t.late and t.target == n.value
                    for t in stmts[:i]):
                changed = f"`{n.value}` (written before it at the end of the step)"
        if changed:
            raise NestError(f"memory `{s.target}` reads before write, so it is written at the "
                            f"end of the step, but {changed} changes before then", s.span,
                            kind="value", hint="read a `let` copy taken before the change, or "
                            "drop `read before write`")


def _is_call(e: ast.Expr, name: str) -> bool:
    if isinstance(e, ast.ExprName):
        return e.name == name
    return isinstance(e, ast.ExprCall) and isinstance(e.func, ast.ExprName) and e.func.name == name


def _text(e: ast.Expr) -> str:
    s = e.span
    if s.line != s.end_line:
        return s.source.line(s.line)[s.col - 1:].strip() + " ..."
    return s.source.line(s.line)[s.col - 1: s.end_col - 1]


def _walk(stmts):
    for s in stmts:
        yield s
        if isinstance(s, ast.StmtIf):
            yield from _walk(s.then)
            yield from _walk(s.orelse)


def lower_optimizer(checked: Checked) -> ir.Optimizer:
    assert checked.kind == "optimizer", checked.name
    return _Lowerer(checked).lower()
