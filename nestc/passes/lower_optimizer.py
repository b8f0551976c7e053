"""lower_optimizer: a checked `optimizer` declaration -> ir.Optimizer.

Lets stay named, memories with an objective and a rule become explicit updates (gd on l2(m, t)
is m <- retain * m - lr * (m - t)), and every `if` on hyperparameters forks the statement list,
so each variant is straight-line code; `tree` records how a param group picks its variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

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
        self.fresh = 0  # lets renamed in a branch (scoped)
        self.numbers: dict[str, ir.E] = {}  # lets holding numbers: their expressions
        self.tensors: dict[str, ir.E] = {}  # lets holding tensors: their expressions

    def unsupported(self, what: str, span: Span) -> NestError:
        """A limitation of this compiler, not a mistake in the spec (`check` lets it pass)."""
        return NestError(f"{what} is not supported in an optimizer yet", span, kind="value",
                         unsupported=True)

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
        if what == "mlp":
            raise NestError(f"`{name}` is an MLP memory: read it by applying it, `{name}(x)`",
                            span, kind="type")
        raise self.unsupported(f"`{name}` as a value", span)

    def call(self, e: ast.ExprCall, names: dict[str, str]) -> ir.E:
        if not isinstance(e.func, ast.ExprName):
            raise self.unsupported("calling an expression", e.span)
        fn = e.func.name
        if names.get(fn) == "mlp":
            return self.mlp_read(e, names)
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
        for acc, y in sums:  # the same sum twice (a key and its objective) is kept once
            if y == x:
                return ir.E("state", value=acc)
        acc = f"{mem.name}_sum{len(sums)}" if sums else f"{mem.name}_sum"
        if acc in names:
            raise NestError(f"`{acc}` is taken: it names the running sum of `{mem.name}`",
                            e.span, kind="name")
        sums.append((acc, x))
        return ir.E("state", value=acc)

    def mlp_read(self, e: ast.ExprCall, names: dict[str, str]) -> ir.E:
        """m(x): the MLP memory applied to the rows of x's (rows, cols) view."""
        assert isinstance(e.func, ast.ExprName), e.span
        if len(e.args) != 1 or e.kwargs:
            raise NestError(f"an MLP memory reads one tensor: `{e.func.name}(x)`", e.span,
                            kind="type")
        return ir.E("mlp", (self.like_param(e.args[0], names, "what it is applied to"),),
                    e.func.name)

    def like_param(self, arg: ast.Expr, names: dict[str, str], what: str) -> ir.E:
        """An MLP memory's input or target: a tensor shaped like the param, whose rows have
        cols(W) numbers, as its W1 and W2 do."""
        x = self.expr(arg, names)
        if _view_shape(x, self.tensors) != ("rows", "cols"):
            raise NestError(f"an MLP memory in an optimizer reads the rows of "
                            f"`{self.param}`'s matrix view: {what} is shaped like `{self.param}`",
                            arg.span, kind="shape", hint=f"such as `grad({self.param})` or an "
                            "element-wise expression of it")
        return x

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
        hypers = [ir.HyperInfo(p.name, self.hypers[p.name].default, self.hypers[p.name].required,
                               _formula(p.default))
                  for p in self.decl.params]
        return ir.Optimizer(self.decl.name, self.decl.span.file, self.decl.span.line, self.param,
                            hypers, self.variants, tree)

    def block(self, todo: list[ast.Stmt], names: dict[str, str], mems: list[ir.Memory],
              stmts: list[ir.Stmt], conds: tuple[tuple[ir.E, bool], ...]) -> Leaf | Branch:
        names = dict(names)
        mems, stmts = list(mems), list(stmts)
        while todo:
            s = todo.pop(0)
            if isinstance(s, ast.StmtRequire):
                continue  # met: Checked.bind checked it against the hyperparameters
            if isinstance(s, ast.StmtParam):
                names[s.names[0]] = "param"
            elif isinstance(s, ast.StmtLet):
                self.let(s.name, s.value, s.span, names, stmts)
            elif isinstance(s, ast.StmtUpdate) and names.get(s.target) in ("number", "let"):
                # a let's update (`g = ...`, `g *= ...`): the name bound again, from here on
                if s.index:
                    raise self.unsupported("an indexed update", s.span)
                value = s.value if s.op == "=" else ast.ExprBinary(
                    s.op[0], ast.ExprName(s.target, s.target_span), s.value, s.span)
                self.let(s.target, value, s.span, names, stmts)
            elif isinstance(s, ast.StmtUpdate):
                stmts.append(self.update(s, names))
            elif isinstance(s, ast.StmtMemory):
                if any(m.name == s.name for m in mems):
                    raise NestError(f"`{s.name}` is taken: a memory of that name is already "
                                    "kept (a running sum `<memory>_sum` included)", s.name_span,
                                    kind="name", hint="choose another name")
                new_mems, updates = self.memory(s, names)
                mems += new_mems
                names[s.name] = "mlp" if new_mems[0].mlp else "memory"
                stmts += updates
            elif isinstance(s, ast.StmtIf):
                cond = self.expr(s.cond, names)
                if not cond.is_static:
                    raise NestError("an optimizer's `if` tests hyperparameters and the param's "
                                    "shape only", s.cond.span, kind="value",
                                    hint="such as `if nesterov { ... }` or `if ndim(W) < 2 { ... }`")
                # the else branch sees the lets as they were here, not as the then branch left them
                lets = dict(self.numbers), dict(self.tensors)
                then = self.block(self.scoped(s.then, names) + todo, names, mems, stmts,
                                  (*conds, (cond, True)))
                self.numbers, self.tensors = lets
                orelse = self.block(self.scoped(s.orelse, names) + todo, names, mems, stmts,
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

    def scoped(self, body: tuple[ast.Stmt, ...], names: dict[str, str]) -> list[ast.Stmt]:
        """A branch's statements with each `let` of a name from outside renamed, from it to
        the branch's end: the branch runs on into the statements after the `if`, which see
        the outer name (it used to stay rebound, so a step read the branch's value)."""
        out: list[ast.Stmt] = []
        renames: dict[str, str] = {}
        for st in body:
            st = _renamed(st, renames)
            if isinstance(st, ast.StmtLet) and st.name in names:
                self.fresh += 1
                renames[st.name] = f"{st.name}__{self.fresh}"
                st = dataclasses.replace(st, name=renames[st.name])
            out.append(st)
        return out

    def let(self, name: str, e: ast.Expr, span: Span, names: dict[str, str],
            stmts: list[ir.Stmt]) -> None:
        value = self.expr(e, names)
        stmts.append(ir.Let(name, value, span))
        names[name] = "number" if value.is_scalar else "let"
        (self.numbers if value.is_scalar else self.tensors)[name] = value

    def update(self, s: ast.StmtUpdate, names: dict[str, str]) -> ir.Assign:
        if s.index:
            raise self.unsupported("an indexed update", s.span)
        what = names.get(s.target)
        if what not in ("param", "memory"):
            raise NestError(f"`{s.target}` is not a param, memory or let of this optimizer",
                            s.target_span, kind="value")
        value = self.expr(s.value, names)
        if s.op != "=":
            current = ir.E("param") if what == "param" else ir.E("state", value=s.target)
            value = ir.E(UPDATE_OPS[s.op], (current, value))
        return ir.Assign(s.target, "param" if what == "param" else "state", value, s.span)

    def memory(self, s: ast.StmtMemory, names: dict[str, str]
               ) -> tuple[list[ir.Memory], list[ir.Assign]]:
        mlp = None
        if s.structure is not None and _is_call(s.structure, "residual_mlp"):
            mlp = self.mlp_structure(s, names)
        elif s.structure is not None and not _is_call(s.structure, "like"):
            raise self.unsupported("a memory structure other than like(W) and residual_mlp",
                                   s.structure.span)
        if s.name == "step":
            raise NestError("a memory cannot be called `step`: the step count is kept under "
                            "that name", s.name_span, kind="name", hint="choose another name")
        init, first = "zeros", None
        if mlp is not None:
            init = "identity"
        elif s.init is not None:
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
        allowed = ("objective", "rule", "read") + (("key", "value") if mlp else ())
        for kind, clause in clauses.items():
            if kind not in allowed:
                raise self.unsupported(f"the `{kind}` clause", clause.span)
        deferred = "read" in clauses and clauses["read"].value == "before write"
        mem = ir.Memory(s.name, init, period, s.span, first, deferred, mlp)
        inner = dict(names)
        inner[s.name] = "mlp" if mlp else "memory"
        updates = [b for b in s.body if isinstance(b, ast.StmtUpdate)]
        for b in s.body:
            if not isinstance(b, (ast.StmtUpdate, ast.Clause)):
                what = {ast.StmtIf: "an `if`", ast.StmtLet: "a `let`",
                        ast.StmtMemory: "a memory"}.get(type(b), "this statement")
                raise self.unsupported(f"{what} in a memory body", b.span)
        if len(updates) > 1:
            raise self.unsupported("more than one update of a memory", updates[1].span)
        if mlp and updates:
            raise NestError(f"MLP memory `{s.name}` learns by its objective and rule; it has no "
                            "explicit update", updates[0].span, kind="value",
                            hint=f"such as `objective l2({s.name}(grad({self.param})), "
                            f"grad({self.param})); rule gd(lr = 0.1)`")
        # sum(x) in the update of a memory every N steps adds x over the steps in between
        self.sums = (mem, [])
        if mlp:
            update = self.mlp_objective_rule(s, clauses, inner)
        elif updates:
            update = self.update(updates[0], inner)
        else:
            update = self.objective_rule(s, clauses, inner)
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
        lr, retain = self.gd_rule(rule, names)
        value = state - lr * grad if retain is None else retain * state - lr * grad
        return ir.Assign(s.name, "state", value, clauses["rule"].span)

    def gd_rule(self, rule: ast.Expr, names: dict[str, str]) -> tuple[ir.E, ir.E | None]:
        """`gd(lr = a, retain = r)`: (a, r), with lr 1 and retain None when left out."""
        func = rule.func if isinstance(rule, ast.ExprCall) else rule
        rule_name = qualified_name(func) or _text(rule)
        kwargs = {k.name: k.value for k in rule.kwargs} if isinstance(rule, ast.ExprCall) else {}
        if rule_name != "gd":
            raise self.unsupported(f"the rule `{rule_name}` (in an optimizer's memory)", rule.span)
        if "clip" in kwargs:
            raise self.unsupported("`clip` in an optimizer's memory", kwargs["clip"].span)
        lr = self.expr(kwargs["lr"], names) if "lr" in kwargs else ir.const(1.0)
        retain = self.expr(kwargs["retain"], names) if "retain" in kwargs else None
        return lr, retain

    # MLP memories (deep momentum)
    def mlp_structure(self, s: ast.StmtMemory, names: dict[str, str]) -> ir.MLP:
        """`residual_mlp(cols(W), hidden = h, act = "silu")` and its init, `identity` or
        `identity(seed = k)` (the default)."""
        st = s.structure
        assert st is not None, s.name
        if not isinstance(st, ast.ExprCall) or len(st.args) != 1:
            raise NestError(f"`residual_mlp` takes its dim: `residual_mlp(cols({self.param}), "
                            "hidden = h)`", st.span, kind="type")
        dim = self.expr(st.args[0], names)
        if _strip(dim) != ir.E("shape", value="cols"):
            raise NestError(f"an MLP memory in an optimizer reads the rows of `{self.param}`'s "
                            f"matrix view: its dim is `cols({self.param})`", st.args[0].span,
                            kind="shape", hint=f"write `residual_mlp(cols({self.param}), "
                            "hidden = ...)`")
        kw = {k.name: k for k in st.kwargs}
        if "hidden" not in kw:
            raise NestError("an MLP memory in an optimizer needs its width: `hidden = ...`",
                            st.span, kind="value", hint=f"such as `residual_mlp(cols({self.param}), "
                            "hidden = 16)`")
        hidden = self.expr(kw["hidden"].value, names)
        width = self.known(hidden)
        if not hidden.is_static or width is not None and (
                isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise NestError("the width of an MLP memory is a whole number of hyperparameters "
                            "and shapes", kw["hidden"].value.span, kind="value")
        act = self.expr(kw["act"].value, names) if "act" in kw else ir.const("silu")
        name = self.known(act)
        if act.op not in ("const", "hyper") or name is not None and name not in ir.MLP_ACTS:
            raise NestError(f"`act` of an MLP memory is one of {', '.join(ir.MLP_ACTS)}",
                            kw["act"].value.span, kind="value")
        return ir.MLP(hidden, act, self.identity_seed(s.init, names))

    def known(self, e: ir.E) -> object:
        """The value of a constant, or of a hyperparameter by its default; else None."""
        if e.op == "const":
            return e.value
        if e.op == "hyper" and len(e.value) == 1:
            return self.defaults.get(e.value[0])
        return None

    def identity_seed(self, init: ast.Expr | None, names: dict[str, str]) -> ir.E:
        if init is None or isinstance(init, ast.ExprName) and init.name == "identity":
            return ir.const(0)
        if not _is_call(init, "identity"):
            raise NestError("an MLP memory starts as `identity`: W1 = 0, so that m(x) = x, and "
                            "W2 random, so that its gradients are not zero", init.span,
                            kind="value", hint="write `= identity` or `= identity(seed = k)`")
        assert isinstance(init, ast.ExprCall)
        seed = next((k.value for k in init.kwargs if k.name == "seed"), None)
        value = self.expr(seed, names) if seed is not None else ir.const(0)
        if not value.is_hyper_only:
            raise NestError("the seed of `identity` is a number or a hyperparameter",
                            seed.span if seed is not None else init.span, kind="value")
        return value

    def mlp_objective_rule(self, s: ast.StmtMemory, clauses: dict[str, ast.Clause],
                           names: dict[str, str]) -> ir.Assign:
        """objective l2(m(k), v) or dot(m(k), v), rule gd(lr = a, retain = r): one gd step on
        the objective summed over the rows of k (key k and value v, when given, must agree)."""
        named: dict[str, tuple[ast.Expr, ir.E]] = {}
        for c in ("key", "value"):
            if c in clauses:
                given = clauses[c].value
                assert not isinstance(given, str), c
                named[c] = given, self.like_param(given, names, f"its {c}")
        obj, rule = clauses["objective"].value, clauses["rule"].value
        assert not isinstance(obj, str) and not isinstance(rule, str)
        kind = obj.func.name if isinstance(obj, ast.ExprCall) and isinstance(
            obj.func, ast.ExprName) else None
        if kind not in ("l2", "dot"):
            raise self.unsupported("an MLP memory's objective other than l2 and dot", obj.span)
        assert isinstance(obj, ast.ExprCall)
        pred = obj.args[0]
        if not (isinstance(pred, ast.ExprCall) and isinstance(pred.func, ast.ExprName)
                and pred.func.name == s.name):
            raise NestError(f"an MLP memory's objective compares its reading with a target: "
                            f"`{kind}({s.name}(k), v)`", pred.span, kind="value")
        key = self.mlp_read(pred, names).args[0]
        target = self.like_param(obj.args[1], names, "the target")
        for clause, got, arg in (("key", key, pred.args[0]), ("value", target, obj.args[1])):
            if clause in named and named[clause][1] != got:
                raise NestError(f"the objective of `{s.name}` reads `{_text(arg)}` where its "
                                f"{clause} is `{_text(named[clause][0])}`", arg.span,
                                kind="value", hint=f"write `{kind}({s.name}(key), value)` with "
                                "the key and value it names")
        lr, retain = self.gd_rule(rule, names)
        retain = retain if retain is not None else ir.const(1.0)
        for what, rate in (("lr", lr), ("retain", retain)):
            if not rate.is_scalar:
                raise NestError(f"the `{what}` of an MLP memory's rule is a number", rule.span,
                                kind="value")
        value = ir.E("learn", (key, target, lr, retain), (s.name, kind))
        return ir.Assign(s.name, "mlp", value, clauses["rule"].span)


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
            if n.op in ("state", "mlp") and n.value in late_names and n.value != s.target and any(
                    isinstance(t, ir.Assign) and t.late and t.target == n.value
                    for t in stmts[:i]):
                changed = f"`{n.value}` (written before it at the end of the step)"
        if changed:
            raise NestError(f"memory `{s.target}` reads before write, so it is written at the "
                            f"end of the step, but {changed} changes before then", s.span,
                            kind="value", hint="read a `let` copy taken before the change, or "
                            "drop `read before write`")


def _strip(e: ir.E) -> ir.E:
    """e with number lets replaced by their expressions."""
    if e.op == "slocal":
        return _strip(e.args[0])
    return ir.E(e.op, tuple(_strip(a) for a in e.args), e.value)


def _view_shape(e: ir.E, lets: dict[str, ir.E]) -> tuple[str, ...] | None:
    """e's shape in terms of the param's matrix view: () for a number, ("rows", "cols") for a
    tensor shaped like W, ("cols", "rows") for its transpose, ... None where dims disagree."""
    if e.is_scalar:
        return ()
    if e.op in ("param", "grad", "state"):
        return ("rows", "cols")
    if e.op == "local":
        return _view_shape(lets[e.value], lets)
    parts = [_view_shape(a, lets) for a in e.args]
    if e.op == "call" and e.value == "transpose":
        return parts[0][::-1] if parts[0] is not None else None
    if e.op == "call" and e.value == "matmul":
        a, b = parts
        return (a[0], b[1]) if a is not None and b is not None and a[1] == b[0] else None
    if e.op == "mlp" or e.op == "call" and e.value == "newton_schulz":
        return parts[0]
    if e.op == "cond":
        parts = parts[1:]
    # element-wise: every tensor operand has the same shape
    shapes = {p for p in parts if p != ()}
    return shapes.pop() if len(shapes) == 1 else None


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


def _formula(default: ast.Expr | None) -> ast.Expr | None:
    """A default that reads earlier hyperparameters (`hidden = 4 * heads`), which a generated
    optimizer computes from the values it is given; None for a constant one."""
    return default if default is not None and const_eval(default, {}) is UNKNOWN else None


def _renamed(node: Any, renames: dict[str, str]) -> Any:
    """An AST node with the names in `renames` read (and updated) under their new names,
    every nested expression and body included; in a body, a `let` of one of those names
    ends its renaming there (past it the name is that let's)."""
    if not renames:
        return node
    if isinstance(node, ast.ExprName):
        return dataclasses.replace(node, name=renames.get(node.name, node.name))
    if isinstance(node, tuple):
        out = []
        for x in node:
            out.append(_renamed(x, renames))
            if isinstance(x, ast.StmtLet) and x.name in renames:
                renames = {k: v for k, v in renames.items() if k != x.name}
        return tuple(out)
    if not dataclasses.is_dataclass(node) or isinstance(node, (type, Span)):
        return node
    changes = {f.name: _renamed(getattr(node, f.name), renames)
               for f in dataclasses.fields(node) if f.name not in ("span", "name_span")}
    if isinstance(node, ast.StmtUpdate):
        changes["target"] = renames.get(node.target, node.target)
    return dataclasses.replace(node, **changes)  # (a let's own name: the caller renames it)
