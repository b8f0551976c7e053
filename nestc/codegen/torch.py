"""ir.Optimizer -> the Python source of a torch.optim.Optimizer subclass.

The generated class keeps one state dict per tensor (torch's layout: a float32 `step` plus one
tensor per memory) and, per param group, picks the variant its hyperparameters select. A
variant the lowering recognized calls torch's fused kernel. Otherwise it runs the generic
multi-tensor `torch._foreach_*` code, one statement of the spec after another, or, with
backend="compiled", a per-tensor function of plain tensor code that torch.compile fuses.

Every name the generator makes starts with `_`; spec identifiers never do once py_name has
mapped them, so the two can never collide.
"""

from __future__ import annotations

import builtins
import io
import keyword
import re
import textwrap
import tokenize
from dataclasses import dataclass

from nestc import __version__, ir
from nestc.errors import NestError
from nestc.hyper import python_expr
from nestc.passes.lower_optimizer import Branch, Leaf
from nestc.passes.select_kernels import KernelChoice

# names a spec identifier must not take in generated code: keywords and builtins come on top
RESERVED = {"torch", "math", "self", "group", "closure", "loss", "defaults", "params", "backend",
            "F", "nn"}

FOREACH_UNARY = {"sqrt": "_foreach_sqrt", "abs": "_foreach_abs", "exp": "_foreach_exp",
                 "log": "_foreach_log", "sign": "_foreach_sign", "tanh": "_foreach_tanh",
                 "sigmoid": "_foreach_sigmoid", "neg": "_foreach_neg"}
FOREACH_BINARY = {"add": "_foreach_add", "sub": "_foreach_sub", "mul": "_foreach_mul",
                  "div": "_foreach_div", "pow": "_foreach_pow", "max": "_foreach_maximum",
                  "min": "_foreach_minimum"}
SHAPE_CODE = {"ndim": "_p.ndim", "rows": "_rt.rows(_p)", "cols": "_rt.cols(_p)",
              "numel": "_p.numel()"}
PY_OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "mod": "%"}
INPLACE = {"_foreach_add", "_foreach_sub", "_foreach_mul", "_foreach_div", "_foreach_pow",
           "_foreach_sqrt", "_foreach_abs", "_foreach_exp", "_foreach_log", "_foreach_sign",
           "_foreach_tanh", "_foreach_sigmoid", "_foreach_neg", "_foreach_maximum",
           "_foreach_minimum", "_foreach_lerp", "_foreach_clamp_min", "_foreach_clamp_max",
           "_foreach_reciprocal"}


def py_name(name: str) -> str:
    """A spec identifier as a Python local: never a keyword, a builtin, ours, or `_`-led."""
    assert name.isidentifier(), name
    if (keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in RESERVED
            or hasattr(builtins, name) or name.startswith("_")):
        return f"h_{name}"
    return name


def class_name(name: str) -> str:
    """The generated class's name: the declaration's, unless that would shadow a module."""
    return f"Nest_{name}" if py_name(name) != name else name


def comment(text: str) -> str:
    """Spec text made safe for one Python comment line."""
    return "".join(ch if ch.isprintable() else "?" for ch in text).strip()


@dataclass(frozen=True)
class Val:
    code: str
    kind: str  # "s": one number; "ls": one number per tensor, an expression of its step `_c`;
    #            "t": a list of tensors


def _reads(e: ir.E, node: ir.E) -> bool:
    return any(n == node for n in e.walk())


def uses_numbers(variant: ir.Variant) -> bool:
    """Whether the variant reads per-tensor numbers (steps, shapes, periods; an MLP memory's
    write loops over them): else the step counts need not be read off their tensors."""
    exprs = [s.value for s in variant.stmts] + [m.period for m in variant.memories]
    every = [s.every for s in variant.stmts if isinstance(s, ir.Assign) and s.every is not None]
    return any(n.op in ("step", "shape") for e in exprs for n in e.walk()) or any(
        m.period != ir.const(1) or m.mlp is not None for m in variant.memories) or bool(every)


def _mlp(m: ir.Memory) -> ir.MLP:
    assert m.mlp is not None, f"memory {m.name} is not an MLP"
    return m.mlp


def state_lists(m: ir.Memory) -> list[str]:
    """The names of a memory's per-tensor lists in generated code: one per state tensor."""
    return [f"_w1_{m.name}", f"_w2_{m.name}"] if m.mlp else [f"_st_{m.name}"]


class _Variant:
    """Emits the generic multi-tensor code of one variant."""

    def __init__(self, variant: ir.Variant, hyper_names: dict[str, str]):
        self.hyper = hyper_names
        self.lines: list[str] = []
        self.tmp = 0
        self.locals: dict[str, Val] = {}
        self.mems = {m.name: m for m in variant.memories}
        self.temps: set[str] = set()  # names of freshly allocated lists, each read once
        self.where = ""
        self.snapshots = _snapshots(variant)

    def fresh(self) -> str:
        self.tmp += 1
        return f"_t{self.tmp}"

    def line(self, text: str) -> None:
        self.lines.append(text)

    def bind(self, v: Val) -> Val:
        """Name a tensor-list value so it is computed once.

        A foreach call whose first argument is a temporary (made here, read once) runs in
        place on it instead of allocating another list of tensors.
        """
        if v.kind != "t" or v.code.isidentifier():
            return v
        call = _single_call(v.code)
        if call is not None and call[1] in self.temps and call[0] in INPLACE:
            fn, first, rest = call
            self.line(f"torch.{fn}_({first}{rest})")
            return Val(first, "t")
        name = self.fresh()
        self.line(f"{name} = {v.code}")
        if call is not None or v.code.startswith("[torch.full_like") or ".clone()" in v.code:
            self.temps.add(name)
        return Val(name, "t")

    def scalar(self, e: ir.E) -> str:
        v = self.expr(e)
        assert v.kind == "s", e
        return v.code

    def number(self, e: ir.E) -> Val | None:
        """e as a foreach scalar argument (one number or one per tensor), if it is one."""
        v = self.expr(e)
        return v if v.kind in ("s", "ls") else None

    def expr(self, e: ir.E) -> Val:
        op = e.op
        if op == "const":
            return Val(literal(e.value), "s")
        if op == "hyper":
            code = self.hyper[e.value[0]] + "".join(f"[{i}]" for i in e.value[1:])
            return Val(code, "s")
        if op == "param":
            return Val("_params", "t")
        if op == "grad":
            return Val("_grads", "t")
        if op == "state":
            return Val(f"_st_{e.value}", "t")
        if op == "slocal":  # a number let: its name once bound, else (dispatch) its expression
            return self.locals.get(e.value) or self.expr(e.args[0])
        if op == "local":
            return self.locals[e.value]
        if op == "step":
            mem = self.mems.get(e.value) if e.value else None
            if mem is None or mem.period == ir.const(1):
                return Val("_c", "ls")
            return Val(f"(_c // {self.scalar(mem.period)})", "ls")
        if op == "shape":
            return Val(SHAPE_CODE[e.value], "ls")
        if op == "mlp":
            xs = self.bind(self.as_tensors(self.expr(e.args[0])))
            w1, w2 = state_lists(self.mems[e.value])
            act = self.scalar(_mlp(self.mems[e.value]).act)
            return Val(f"[_rt.mlp_read(_x, _a, _b, {act}, {self.where!r}) for _x, _a, _b in "
                       f"zip({xs.code}, {w1}, {w2})]", "t")
        if op == "cmp":
            args = [self.expr(a) for a in e.args]
            assert all(a.kind != "t" for a in args), e
            kind = "s" if all(a.kind == "s" for a in args) else "ls"
            if e.value == "not":
                return Val(f"(not {args[0].code})", kind)
            return Val(f"({args[0].code} {e.value} {args[1].code})", kind)
        if op == "cond":
            c, a, b = (self.expr(x) for x in e.args)
            if a.kind != "t" and b.kind != "t":
                kind = "s" if a.kind == b.kind == c.kind == "s" else "ls"
                return Val(f"({a.code} if {c.code} else {b.code})", kind)
            if c.kind != "s":  # a condition on the shape: chosen tensor by tensor
                at, bt = self.bind(self.as_tensors(a)), self.bind(self.as_tensors(b))
                return Val(f"[_a if {c.code} else _b for _a, _b, _c, _p in "
                           f"zip({at.code}, {bt.code}, _step, _params)]", "t")
            return Val(f"({self.as_tensors(a).code} if {c.code} else {self.as_tensors(b).code})",
                       "t")
        if op == "neg":
            return self.unary("neg", self.expr(e.args[0]))
        if op in PY_OPS:
            return self.binary(op, e.args[0], e.args[1])
        if op == "call":
            return self.call(e)
        raise AssertionError(f"codegen: unknown op {op}")

    def as_tensors(self, v: Val) -> Val:
        if v.kind == "t":
            return v
        if v.kind == "s":
            return Val(f"[torch.full_like(_x, {v.code}) for _x in _params]", "t")
        return Val(f"[torch.full_like(_p, {v.code}) for _c, _p in zip(_step, _params)]", "t")

    def unary(self, fn: str, a: Val) -> Val:
        if a.kind != "t":
            return Val(f"(-{a.code})" if fn == "neg" else f"_S.{fn}({a.code})", a.kind)
        if fn in FOREACH_UNARY:
            return Val(f"torch.{FOREACH_UNARY[fn]}({self.bind(a).code})", "t")
        if fn == "relu":
            return Val(f"torch._foreach_clamp_min({self.bind(a).code}, 0.0)", "t")
        return Val(f"[torch.nn.functional.{fn}(_x) for _x in {self.bind(a).code}]", "t")

    def binary(self, op: str, left: ir.E, right: ir.E) -> Val:
        # a + s * b and a - s * b are one foreach call with alpha
        if op in ("add", "sub") and right.op == "mul":
            s, t = right.args
            if not s.is_scalar and t.is_scalar:
                s, t = t, s
            if s.is_scalar and not t.is_scalar:
                a, sv, tv = self.expr(left), self.expr(s), self.expr(t)
                if a.kind == "t" and tv.kind == "t" and sv.kind == "s":
                    a, tv = self.bind(a), self.bind(tv)
                    call = f"torch.{FOREACH_BINARY[op]}({a.code}, {tv.code}, alpha={sv.code})"
                    if s.op == "const" or a.code in self.temps:
                        return Val(call, "t")
                    # like torch, skip the pass when the factor is zero (weight_decay = 0)
                    name = self.fresh()
                    self.line(f"{name} = {a.code} if {sv.code} == 0 else {call}")
                    return Val(name, "t")
        a, b = self.expr(left), self.expr(right)
        if a.kind != "t" and b.kind != "t":
            kind = "s" if a.kind == b.kind == "s" else "ls"
            return Val(f"({a.code} {PY_OPS[op]} {b.code})", kind)
        assert op != "mod", "lowering keeps % to numbers"
        if a.kind == "t":
            return Val(f"torch.{FOREACH_BINARY[op]}({self.bind(a).code}, {self.listed(b)})", "t")
        # a number on the left of tensors
        bt = self.bind(b).code
        num = self.listed(a)
        if op == "add":
            return Val(f"torch._foreach_add({bt}, {num})", "t")
        if op == "mul":
            return Val(f"torch._foreach_mul({bt}, {num})", "t")
        if op == "sub":
            return Val(f"torch._foreach_add(torch._foreach_neg({bt}), {num})", "t")
        if op == "div":
            return Val(f"torch._foreach_mul(torch._foreach_reciprocal({bt}), {num})", "t")
        if a.kind == "s":
            return Val(f"torch._foreach_pow({a.code}, {bt})", "t")
        return Val(f"[_n ** _x for _n, _x in zip({num}, {bt})]", "t")

    def listed(self, v: Val) -> str:
        """Code for v as a foreach argument: tensors, a number, or a list of numbers."""
        if v.kind == "ls":
            if re.search(r"\b_p\b", v.code):
                return f"[{v.code} for _c, _p in zip(_step, _params)]"
            return f"[{v.code} for _c in _step]"
        return self.bind(v).code if v.kind == "t" else v.code

    def call(self, e: ir.E) -> Val:
        fn = e.value
        if fn == "debias":
            x, beta, step = e.args
            xv = self.expr(x)
            corr = self.binary("sub", ir.const(1), ir.E("pow", (beta, step)))
            if xv.kind == "t":
                return Val(f"torch._foreach_div({self.bind(xv).code}, {self.listed(corr)})", "t")
            return Val(f"({xv.code} / {corr.code})", "ls")
        if fn == "sqrt" and e.args[0].op == "call" and e.args[0].value == "debias":
            # sqrt(x / c) = sqrt(x) / sqrt(c): the correction's root is one number per tensor
            x, beta, step = e.args[0].args
            root = self.unary("sqrt", self.expr(x))
            corr = self.unary("sqrt", self.binary("sub", ir.const(1), ir.E("pow", (beta, step))))
            if root.kind == "t":
                return Val(f"torch._foreach_div({self.bind(root).code}, {self.listed(corr)})", "t")
        args = [self.expr(a) for a in e.args]
        if fn in ("matmul", "transpose"):
            ts = [self.bind(self.as_tensors(a)).code for a in args]
            names = ", ".join(f"_a{k}" for k in range(len(ts)))
            loop = f"zip({', '.join(ts)})" if len(ts) > 1 else ts[0]
            return Val(f"[_rt.{fn}({names}, {self.where!r}) for {names} in {loop}]", "t")
        if fn == "newton_schulz":
            xs = self.bind(self.as_tensors(args[0]))
            assert all(a.kind == "s" for a in args[1:]), e
            steps, eps, ca, cb, cc, dtype = (a.code for a in args[1:])
            return Val(f"[_rt.newton_schulz(_x, {steps}, {eps}, ({ca}, {cb}, {cc}), {dtype}, "
                       f"{self.where!r}) for _x in {xs.code}]", "t")
        if all(a.kind != "t" for a in args):
            kind = "s" if all(a.kind == "s" for a in args) else "ls"
            return Val(f"_S.{fn}({', '.join(a.code for a in args)})", kind)
        if fn in ("min", "max"):
            a, b = args
            return Val(f"torch.{FOREACH_BINARY[fn]}({self.bind(self.as_tensors(a)).code}, "
                       f"{self.bind(self.as_tensors(b)).code})", "t")
        if fn == "clamp":
            xv, lo, hi = args
            xt = self.bind(self.as_tensors(xv))
            return Val(f"torch._foreach_clamp_max(torch._foreach_clamp_min({xt.code}, "
                       f"{self.listed(lo)}), {self.listed(hi)})", "t")
        if fn == "lerp":
            a, b, w = args
            return Val(f"torch._foreach_lerp({self.bind(self.as_tensors(a)).code}, "
                       f"{self.bind(self.as_tensors(b)).code}, {self.listed(w)})", "t")
        return self.unary(fn, args[0])

    # statements
    def stmt(self, s: ir.Stmt) -> None:
        self.line(spec_comment(s.span))
        self.where = f"{s.span}"  # named by errors the runtime raises for this statement
        if isinstance(s, ir.Let):
            v = self.expr(s.value)
            name = f"_l_{s.name}"
            if v.kind == "ls":
                # one number per tensor: it stays an expression of _c and _p, used in place
                self.locals[s.name] = Val(f"({v.code})", "ls")
                return
            if s.name in self.snapshots:
                # a snapshot: the param or memory it names is updated in place before a read
                self.line(f"{name} = [_x.clone() for _x in {v.code}]")
            else:
                self.line(f"{name} = {v.code}")
            self.locals[s.name] = Val(name, v.kind)
            return
        if s.kind == "mlp":
            self.learn(s)
            return
        target = "_params" if s.kind == "param" else f"_st_{s.target}"
        mem = self.mems.get(s.target) if s.kind == "state" else None
        if mem is not None and mem.init == "from":
            assert mem.first is not None and mem.period == ir.const(1), "lowering checks it"
            first = self.as_tensors(self.expr(mem.first))
            self.line(f"if _first[{s.target!r}]:")
            self.line(f"    {target} = [_x.clone() for _x in {first.code}]")
            self.line(f"    for _s, _x in zip(_states, {target}):")
            self.line(f"        _s[{s.target!r}] = _x")
            self.line("else:")
            self.indented(lambda: self.assign(s, target, every=False))
            return
        self.assign(s, target, every=_period(s, mem) != ir.const(1))

    def learn(self, s: ir.Assign) -> None:
        """An MLP memory's gd step, tensor by tensor, in place on its W1 and W2."""
        mem = self.mems[s.target]
        (_, objective), (key, target, lr, retain) = s.value.value, s.value.args
        ks = self.bind(self.as_tensors(self.expr(key))).code
        vs = self.bind(self.as_tensors(self.expr(target))).code
        # the rates are numbers, one per tensor at most: expressions of _c and _p
        rates = f"{self.expr(lr).code}, {self.expr(retain).code}"
        w1, w2 = state_lists(mem)
        self.line(f"for _p, _c, _k, _v, _a, _b in zip(_params, _step, {ks}, {vs}, {w1}, {w2}):")
        indent = "    "
        period = _period(s, mem)
        if period != ir.const(1):
            self.line(f"    if _c % {self.scalar(period)} == 0:")
            indent += "    "
        self.line(f"{indent}_rt.mlp_learn_(_a, _b, _k, _v, {rates}, {objective!r}, "
                  f"{self.scalar(_mlp(mem).act)}, {self.where!r})")

    def scaled_update(self, target: str, op: str, e: ir.E) -> bool:
        """target +/-= (numbers) * a [/ b] as one foreach call, the numbers folded in Python.

        This is how torch writes Adam (addcdiv with step size lr / bias_correction1), so
        the generic code also rounds like torch.
        """
        num: list[ir.E] = []
        den: list[ir.E] = []
        _factors(e, num, den)
        tn = [f for f in num if not f.is_scalar]
        td = [f for f in den if not f.is_scalar]
        sn = [f for f in num if f.is_scalar]
        sd = [f for f in den if f.is_scalar]
        if len(tn) != 1 or len(td) > 1 or not (sn or sd):
            return False
        scale = sn[0] if sn else ir.const(1)
        for f in sn[1:]:
            scale = scale * f
        for f in sd:
            scale = ir.E("div", (scale, f))
        sv = self.number(ir.E("neg", (scale,)) if op == "sub" else scale)
        if sv is None:
            return False
        a = self.bind(self.as_tensors(self.expr(tn[0])))
        if td:
            b = self.bind(self.as_tensors(self.expr(td[0])))
            self.line(f"torch._foreach_addcdiv_({target}, {a.code}, {b.code}, {self.listed(sv)})")
        elif sv.kind == "s":
            self.line(f"torch._foreach_add_({target}, {a.code}, alpha={sv.code})")
        else:
            self.line(f"torch._foreach_add_({target}, torch._foreach_mul({a.code}, "
                      f"{self.listed(sv)}))")
        return True

    def assign(self, s: ir.Assign, target: str, every: bool) -> None:
        if every:
            # a slower level costs nothing between its updates: the tensors of a group step
            # together, so on most steps none of them is due and nothing is computed
            period = self.scalar(_period(s, self.mems[s.target]))
            self.line(f"if all(_c % {period} == 0 for _c in _step):")
            self.indented(lambda: self.assign(s, target, every=False))
            self.line(f"elif any(_c % {period} == 0 for _c in _step):")
            self.indented(lambda: self.masked_assign(s, target, period))
            return
        current = ir.E("param") if s.kind == "param" else ir.E("state", value=s.target)
        if self.in_place(s.value, current, target):
            return
        v = self.bind(self.as_tensors(self.expr(s.value)))
        self.line(f"torch._foreach_copy_({target}, {v.code})")

    def masked_assign(self, s: ir.Assign, target: str, period: str) -> None:
        """Only some tensors of the group are due (they joined it later): write those."""
        v = self.bind(self.as_tensors(self.expr(s.value)))
        self.line("for _i, _c in enumerate(_step):")
        self.line(f"    if _c % {period} == 0:")
        self.line(f"        {target}[_i].copy_({v.code}[_i])")

    def indented(self, emit) -> None:
        outer, self.lines = self.lines, []
        emit()
        self.lines = outer + ["    " + ln for ln in self.lines]

    def term(self, e: ir.E) -> tuple[str, str]:
        """e as the second argument of one foreach add/sub: (tensors, ", alpha=..." or "")."""
        factor, rest = _scaled(e)
        fv = self.number(factor) if factor is not None else None
        r = self.bind(self.as_tensors(self.expr(rest if fv is not None else e)))
        if fv is not None and fv.kind == "ls":
            return f"torch._foreach_mul({r.code}, {self.listed(fv)})", ""
        return r.code, (f", alpha={fv.code}" if fv is not None else "")

    def in_place(self, value: ir.E, current: ir.E, target: str) -> bool:
        """Emit `target <- value` as in-place foreach calls where that is exact; else False.

        A multi-call form may only read the target in its first call: the later calls would
        see the target already changed.
        """
        fn_of = {"add": "_foreach_add_", "sub": "_foreach_sub_"}
        if value in (ir.const(0), ir.const(0.0)):
            self.line(f"torch._foreach_zero_({target})")
            return True
        if value.op == "call" and value.value == "lerp" and value.args[0] == current:
            end_e, w = value.args[1], value.args[2]
            wv = self.number(w)
            if wv is None:
                return False
            if (end_e.op == "mul" and not any(a.is_scalar for a in end_e.args)
                    and not _reads(end_e, current)):
                # lerp toward a product: scale, then multiply-add without a temporary (torch's
                # second moment: v.mul_(beta2).addcmul_(g, g, value=1 - beta2))
                fa, fb = (self.bind(self.as_tensors(self.expr(x))) for x in end_e.args)
                keep = self.expr(ir.E("sub", (ir.const(1), w)))
                self.line(f"torch._foreach_mul_({target}, {self.listed(keep)})")
                value_arg = f"value={wv.code}" if wv.kind == "s" else self.listed(wv)
                self.line(f"torch._foreach_addcmul_({target}, {fa.code}, {fb.code}, {value_arg})")
                return True
            end = self.bind(self.as_tensors(self.expr(end_e)))
            self.line(f"torch._foreach_lerp_({target}, {end.code}, {self.listed(wv)})")
            return True
        if value.op == "mul" and value.args[0] == current:
            sv = self.number(value.args[1])
            if sv is not None:
                self.line(f"torch._foreach_mul_({target}, {self.listed(sv)})")
                return True
        # retain * x + rest: scale x in place, then add the rest (computed first)
        if value.op in fn_of and value.args[0].op == "mul":
            a, b = value.args[0].args
            scale = b if a == current and b.is_scalar else a if b == current and a.is_scalar else None
            sv = self.number(scale) if scale is not None else None
            if sv is not None and not _reads(value.args[1], current):
                code, alpha = self.term(value.args[1])
                self.line(f"torch._foreach_mul_({target}, {self.listed(sv)})")
                self.line(f"torch.{fn_of[value.op]}({target}, {code}{alpha})")
                return True
        if value.op in fn_of and value.args[0] == current:
            factor, rest = _scaled(value.args[1])
            fv = self.number(factor) if factor is not None else None
            if fv is not None and fv.kind == "ls":
                # a different factor per tensor (a shape-dependent lr): torch's add_ with alpha
                r = self.bind(self.as_tensors(self.expr(rest)))
                sign = "" if value.op == "add" else "-"
                self.line(f"for _x, _y, _a in zip({target}, {r.code}, {self.listed(fv)}):")
                self.line(f"    _x.add_(_y, alpha={sign}_a)")
            elif not self.scaled_update(target, value.op, value.args[1]):
                code, alpha = self.term(value.args[1])
                self.line(f"torch.{fn_of[value.op]}({target}, {code}{alpha})")
            return True
        return False


def _snapshots(variant: ir.Variant) -> set[str]:
    """Lets naming the param or a memory that is written while the let is still read."""
    out = set()
    stmts = variant.stmts
    for i, s in enumerate(stmts):
        if not isinstance(s, ir.Let) or s.value.op not in ("param", "state"):
            continue
        target = ("param", None) if s.value.op == "param" else ("state", s.value.value)
        local = ir.E("local", value=s.name)
        for j in range(i + 1, len(stmts)):
            w = stmts[j]
            if isinstance(w, ir.Assign) and (w.kind, w.target if w.kind == "state" else None) \
                    == target and any(_reads(r.value, local) for r in stmts[j + 1:]):
                out.add(s.name)
    return out


def _period(s: ir.Assign, mem: ir.Memory | None) -> ir.E:
    """Every how many steps a write happens: its own `every`, else its memory's period."""
    if s.every is not None:
        return s.every
    return mem.period if mem is not None else ir.const(1)


def _single_call(code: str) -> tuple[str, str, str] | None:
    """`torch._foreach_f(first, rest...)` as (f, first, ', rest...'), when code is one call."""
    if not code.startswith("torch._foreach_") or "(" not in code:
        return None
    head, _, args = code.partition("(")
    depth = 1
    for i, ch in enumerate(args):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            if i != len(args) - 1:
                return None
            break
    first, sep, rest = args[:-1].partition(",")
    if not first.isidentifier():
        return None
    return head[len("torch."):], first, (sep + rest)


def _factors(e: ir.E, num: list[ir.E], den: list[ir.E]) -> None:
    """Split a product/quotient tree into numerator and denominator factors."""
    if e.op == "mul":
        _factors(e.args[0], num, den)
        _factors(e.args[1], num, den)
    elif e.op == "div":
        _factors(e.args[0], num, den)
        _factors(e.args[1], den, num)
    elif e.op == "call" and e.value == "debias":
        x, beta, step = e.args
        _factors(x, num, den)
        den.append(ir.E("sub", (ir.const(1), ir.E("pow", (beta, step)))))
    else:
        num.append(e)


def _scaled(e: ir.E) -> tuple[ir.E | None, ir.E]:
    """s * x or x * s with s a scalar -> (s, x); anything else -> (None, e)."""
    if e.op == "mul":
        a, b = e.args
        if a.is_scalar and not b.is_scalar:
            return a, b
        if b.is_scalar and not a.is_scalar:
            return b, a
    return None, e


def source_line(span, lines: int = 4) -> str:
    """`file:line: text` of the statement at span: all its lines (at most `lines`, then
    `...`), each but the last without its comment; a memory's up to the `{` of its body."""
    memory = span.source.line(span.line).lstrip().startswith("memory ")
    text: list[str] = []
    for n in range(span.line, span.end_line + 1):
        if len(text) == lines:
            text.append("...")
            break
        line = span.source.line(n).strip()
        if n < span.end_line:
            line = _code_of(line)
            if memory and "{" in line:
                text.append(line[:line.index("{") + 1])
                break
        text.append(line)
    return f"{span.file}:{span.line}: {' '.join(t for t in text if t)}"


def _code_of(line: str) -> str:
    """A spec line without its comment (a # outside a string)."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i].rstrip()
    return line


def fitted(line: str, width: int = 99) -> list[str]:
    """A generated line as lines of at most `width` columns where it can: a comment continued
    on comment lines, a statement broken inside its brackets (after a comma, or before a
    binary operator) and continued 4 columns further in; a line that cannot break stays."""
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()))
    text = line.strip()
    if text.startswith("#"):
        # a spec line's comment: its place on a line of its own, then the line
        where = re.match(r"# (\S+:\d+:) ", text)
        head = [f"{indent}# {where[1]}"] if where else []
        body = text[where.end():] if where else text[1:].strip()
        return head + textwrap.wrap(body, width, initial_indent=f"{indent}#{'    ' * bool(where)} ",
                                    subsequent_indent=f"{indent}#     ",
                                    break_long_words=False, break_on_hyphens=False)
    try:
        breaks = _breaks(text)
    except (tokenize.TokenError, SyntaxError):  # part of a statement (already wrapped)
        return [line]
    more = " " * (8 if text.startswith("def ") else 4)  # a def's arguments, past its body
    pieces: list[str] = []
    start = 0
    while True:
        room = width - len(indent) - (len(more) if pieces else 0)
        if len(text) - start <= room:
            break
        later = [b for b in breaks if b[0] > start]
        if not later:
            break
        # the outermost break that fits, the last of those; else the first there is
        fits = [b for b in later if b[0] - start <= room]
        cut, resume, _ = max(fits, key=lambda b: (-b[2], b[0])) if fits else later[0]
        pieces.append(text[start:cut].rstrip())
        start = resume
    pieces.append(text[start:])
    return [indent + pieces[0]] + [f"{indent}{more}{p}" for p in pieces[1:]]


_BINARY = {"+", "-", "*", "/", "@", "%", "//"}


def _breaks(code: str) -> list[tuple[int, int, int]]:
    """(end of a line, start of the next, bracket depth) where one statement of Python may
    continue on a new line: inside brackets, after a comma or before a binary operator."""
    depth, out = 0, []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
              if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    for i, t in enumerate(tokens):
        if t.type != tokenize.OP:
            continue
        if t.string in "([{":
            depth += 1
        elif t.string in ")]}":
            depth -= 1
        elif depth > 0 and t.string == "," and i + 1 < len(tokens):
            out.append((t.end[1], tokens[i + 1].start[1], depth))
        elif depth > 0 and t.string in _BINARY and i and (
                tokens[i - 1].type in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING)
                or tokens[i - 1].string in ")]}"):  # binary, not unary
            out.append((tokens[i - 1].end[1], t.start[1], depth))
    return out


def spec_comment(span) -> str:
    """`# file:line: <the spec's line>`, the spacing before its own comment made two spaces
    (the line is wrapped as a comment when it is long)."""
    return "# " + re.sub(r"\s{2,}#", "  #", comment(source_line(span)))


def _kernel_call(choice: KernelChoice, emit: _Variant) -> list[str]:
    args = {k: emit.scalar(e) for k, e in choice.args}
    st = dict(choice.states)
    if choice.kernel in ("adam", "adamw"):
        return [
            "_fused_adam(",
            f"    _params, _grads, _st_{st['exp_avg']}, _st_{st['exp_avg_sq']}, [], _steps, "
            "None, None,",
            f"    amsgrad=False, has_complex=False, beta1={args['beta1']}, beta2={args['beta2']},",
            f"    lr={args['lr']}, weight_decay={args['weight_decay']}, eps={args['eps']},",
            "    maximize=False, capturable=False, differentiable=False,",
            f"    decoupled_weight_decay={choice.kernel == 'adamw'},",
            ")",
        ]
    assert choice.kernel == "sgd", choice.kernel
    buf = st.get("momentum_buffer")
    # torch's fused SGD makes the buffers on its first step (all None) and fills them in
    bufs = "[None] * len(_params)" if buf is None else f"_st_{buf}"
    lines = [
        "_fused_sgd(",
        f"    _params, _grads, {bufs}, None, None,",
        f"    weight_decay={args['weight_decay']}, momentum={args['momentum']}, lr={args['lr']},",
        f"    dampening={args['dampening']}, nesterov={args['nesterov']}, maximize=False,",
        "    has_sparse_grad=False,",
        ")",
    ]
    if buf is not None:
        lines += [f"for _s, _b in zip(_states, _st_{buf}):", f"    _s[{buf!r}] = _b"]
    return lines


def _torch_names(opt: ir.Optimizer) -> tuple[dict[str, str], dict[str, object]]:
    """torch.optim's names of the memories that the variants' recognized kernels keep
    (`exp_avg` -> `m`), where every variant agrees, and the options of torch.optim that those
    kernels compute (Adam's `decoupled_weight_decay`)."""
    names: dict[str, str] = {}
    options: dict[str, object] = {}
    clash: set[str] = set()
    for v in opt.variants:
        if v.kernel is None:
            continue
        for theirs, ours in v.kernel.states:
            if names.setdefault(theirs, ours) != ours:
                clash.add(theirs)
        if v.kernel.kernel in ("adam", "adamw"):
            options["decoupled_weight_decay"] = v.kernel.kernel == "adamw"
    return {k: n for k, n in names.items() if k not in clash}, options


def generate_optimizer(opt: ir.Optimizer) -> str:
    hyper = {h.name: py_name(h.name) for h in opt.hypers}
    cls = class_name(opt.name)
    # a default that reads earlier hyperparameters (`hidden = 4 * heads`) is computed from
    # the values given: None in the signature, its formula in __init__
    sig = ", ".join(hyper[h.name] if h.required else f"{hyper[h.name]}=None" if h.formula
                    else f"{hyper[h.name]}={literal(h.default)}" for h in opt.hypers)
    out: list[str] = []
    w = out.append
    w(f"# Generated by nestc {__version__} from {comment(opt.file)}:{opt.line}, optimizer "
      f"{opt.name}.")
    w("# Do not edit: `nestc compile` regenerates it.")
    w("import torch")
    for mod in sorted({"sgd" if v.kernel.kernel == "sgd" else "adam"
                       for v in opt.variants if v.kernel}):
        w(f"from torch.optim.{mod} import _fused_{mod}")
    w("")
    w("from nestc import runtime as _rt")
    w("from nestc.interp import FloatNS as _S")  # dropped below where no code uses it
    w("")
    w("")
    w(f"class {cls}(torch.optim.Optimizer):")
    w(f'    """{opt.name}, compiled from {comment(opt.file)}:{opt.line}.')
    w("")
    w("    Variants (picked by the group's hyperparameters and each tensor's shape):")
    for i, v in enumerate(opt.variants):
        k = v.kernel.kernel if v.kernel else None
        how = f"torch fused {k} kernel, else generic" if k else "generic multi-tensor code"
        if any(m.mlp is not None for m in v.memories):
            how = "generic code, its MLP memories tensor by tensor"
        out += textwrap.wrap(f"{i}: {_conditions(v, hyper) or 'always'} -> {how}", 99,
                             initial_indent=" " * 6, subsequent_indent=" " * 9,
                             break_long_words=False, break_on_hyphens=False)
    w('    """')
    w("")
    w(f"    HYPERPARAMETERS = {tuple(h.name for h in opt.hypers)!r}")
    w(f"    MEMORIES = {tuple(sorted({m.name for v in opt.variants for m in v.memories}))!r}")
    torch_state, torch_options = _torch_names(opt)
    if torch_state:
        w("    # torch.optim's names of the states its recognized kernel keeps (load_state_dict")
        w("    # takes a torch.optim checkpoint), and its options that mean this optimizer")
        w(f"    TORCH_STATE = {torch_state!r}")
        w(f"    TORCH_OPTIONS = {torch_options!r}")
    w("")
    w(f"    def __init__(self, params, {sig}{', ' if sig else ''}*, backend=\"auto\"):")
    for h in opt.hypers:
        if h.formula:
            code = python_expr(h.formula, py_name)
            if code is None:
                raise NestError("a generated optimizer cannot compute a default of this form; "
                                "give it as a constant", h.formula.span, kind="value")
            w(f"        if {hyper[h.name]} is None:")
            w(f"            {hyper[h.name]} = {code}")
    w("        defaults = {" + ", ".join(f"{h.name!r}: {hyper[h.name]}" for h in opt.hypers)
      + (", " if opt.hypers else "") + "'backend': _rt.check_backend(backend)}")
    w("        super().__init__(params, defaults)")
    w("")
    w("    def add_param_group(self, param_group):")
    w("        super().add_param_group(_rt.param_group(self, param_group))")
    w("")
    w("    def load_state_dict(self, state_dict):")
    w("        super().load_state_dict(_rt.from_torch(self, state_dict))")
    w("        _rt.match_layouts(self)")
    w("")
    w("    @torch.no_grad()")
    w("    def step(self, closure=None):")
    w("        loss = None")
    w("        if closure is not None:")
    w("            with torch.enable_grad():")
    w("                loss = closure()")
    w("        try:")
    w("            for group in self.param_groups:")
    w("                _params = [_p for _p in group['params'] if _p.grad is not None]")
    w("                if not _params:")
    w("                    continue")
    for h in opt.hypers:
        w(f"                {hyper[h.name]} = group[{h.name!r}]")
    args = ", ".join(hyper[h.name] for h in opt.hypers)
    for ln in _dispatch(opt.tree, hyper, args, opt):
        w("                " + ln)
    w("        except ZeroDivisionError as _err:  # a number's divisor, of step() or a shape, is 0")
    w(f"            raise _rt.division_error(_err, {opt.name!r}) from None")
    w("        return loss")
    from nestc.codegen.triton import fusable, triton_source

    for i, v in enumerate(opt.variants):
        out += _variant_method(i, v, hyper, args, fused_by_triton=fusable(v))
    for i, v in enumerate(opt.variants):
        one = _OneTensor(v, hyper)
        out += one.function(f"_one_{i}", args) + one.loop(f"_all_{i}", f"_one_{i}", args)
    if any(fusable(v) for v in opt.variants):
        # the kernels' own module, loaded when a group runs on Triton (it imports triton)
        out += ["", "", f"_TRITON = {triton_source(opt)!r}"]
    if not any("_S." in line for line in out):
        out.remove("from nestc.interp import FloatNS as _S")
    return "\n".join(fit for ln in out for fit in fitted(ln)) + "\n"


def _conditions(v: ir.Variant, hyper: dict[str, str]) -> str:
    emit = _Variant(v, hyper)
    codes = [emit.expr(c).code for c, _ in v.conditions]
    return " and ".join(code if truth else f"not {code}"
                        for code, (_, truth) in zip(codes, v.conditions))


def _from_memories(v: ir.Variant) -> list[str]:
    return [m.name for m in v.memories if m.init == "from"]


def _dispatch(tree: Leaf | Branch, hyper: dict[str, str], args: str,
              opt: ir.Optimizer) -> list[str]:
    if isinstance(tree, Leaf):
        v = opt.variants[tree.variant]
        call = f"self._variant_{tree.variant}(group, _ps, _first, {args})" if args else \
            f"self._variant_{tree.variant}(group, _ps, _first)"
        names = _from_memories(v)
        if names:
            # tensors whose `from` memories are not written yet take their first write
            return [f"for _first, _ps in _rt.partition_first(self.state, _params, {names!r}):",
                    f"    {call}"]
        return ["_ps, _first = _params, {}", call]
    cond = _Variant(opt.variants[0], hyper).expr(tree.cond)
    then = ["    " + ln for ln in _dispatch(tree.then, hyper, args, opt)]
    orelse = ["    " + ln for ln in _dispatch(tree.orelse, hyper, args, opt)]
    if cond.kind == "s":
        return [f"if {cond.code}:", *then, "else:", *orelse]
    # a condition on the param's shape: the group splits tensor by tensor
    return [f"for _params, _on in _rt.split(_params, lambda _p: {cond.code}):",
            "    if _on:", *("    " + ln for ln in then), "    else:",
            *("    " + ln for ln in orelse)]


class _OneTensor:
    """Emits a variant as plain tensor code for one parameter (for torch.compile to fuse)."""

    def __init__(self, variant: ir.Variant, hyper: dict[str, str]) -> None:
        self.variant = variant
        self.mems = {m.name: m for m in variant.memories}
        self.hyper = hyper
        self.snapshots = _snapshots(variant)
        self.where = ""  # the spec position runtime errors name

    def expr(self, e: ir.E) -> str:
        op = e.op
        if op == "const":
            return literal(e.value)
        if op == "hyper":
            return self.hyper[e.value[0]] + "".join(f"[{i}]" for i in e.value[1:])
        if op in ("param", "grad"):
            return "_p" if op == "param" else "_g"
        if op == "state":
            return f"_st_{e.value}"
        if op == "slocal":  # a number: its expression, so it needs no earlier statement
            return self.expr(e.args[0])
        if op == "local":
            return f"_l_{e.value}"
        if op == "step":
            mem = self.mems.get(e.value) if e.value else None
            if mem is None or mem.period == ir.const(1):
                return "_c"
            return f"(_c // {self.expr(mem.period)})"
        if op == "shape":
            return SHAPE_CODE[e.value]
        if op == "mlp":
            w1, w2 = state_lists(self.mems[e.value])  # here one tensor each, not lists
            act = self.expr(_mlp(self.mems[e.value]).act)
            return f"_rt.mlp_read({self.expr(e.args[0])}, {w1}, {w2}, {act}, {self.where!r})"
        args = [self.expr(a) for a in e.args]
        if op in PY_OPS:
            return f"({args[0]} {PY_OPS[op]} {args[1]})"
        if op == "neg":
            return f"(-{args[0]})"
        if op == "cmp":
            return f"(not {args[0]})" if e.value == "not" else f"({args[0]} {e.value} {args[1]})"
        if op == "cond":
            return f"({args[1]} if {args[0]} else {args[2]})"
        fn = e.value
        if fn == "debias":
            return f"({args[0]} / (1 - {args[1]} ** {args[2]}))"
        if fn == "newton_schulz":
            x, steps, eps, ca, cb, cc, dtype = args
            return (f"_rt.newton_schulz({x}, {steps}, {eps}, ({ca}, {cb}, {cc}), {dtype}, "
                    f"{self.where!r})")
        if fn in ("matmul", "transpose"):
            return f"_rt.{fn}({', '.join(args)}, {self.where!r})"
        if fn in ("lerp", "clamp"):
            return f"torch.{fn}({', '.join(args)})"
        if fn in ("min", "max"):
            return f"torch.{fn}imum(torch.as_tensor({args[0]}), torch.as_tensor({args[1]}))"
        if fn in ("silu", "relu"):
            return f"torch.nn.functional.{fn}({args[0]})"
        return f"torch.{fn}(torch.as_tensor({args[0]}))"

    def loop(self, name: str, one: str, args: str) -> list[str]:
        """The whole param group in one function: torch.compile makes one graph of it."""
        mems = [n for m in self.variant.memories for n in state_lists(m)]
        lists = ", ".join(["_params", "_grads", "_steps", *mems])
        names = ", ".join(["_p", "_g", "_c", *(f"_m{k}" for k in range(len(mems)))])
        tail = f", {args}" if args else ""
        return ["", "", f"def {name}({lists}, _first{tail}):",
                f"    for {names} in zip({lists}):",
                f"        {one}({names}, _first{tail})"]

    def function(self, name: str, args: str) -> list[str]:
        mems = [n for m in self.variant.memories for n in state_lists(m)]
        sig = ", ".join(["_p", "_g", "_c", *mems, "_first"])
        lines: list[str] = []
        for st in self.variant.stmts:
            lines.append(f"    {spec_comment(st.span)}")
            self.where = f"{st.span}"
            if isinstance(st, ir.Let):
                value = self.expr(st.value)
                snapshot = st.name in self.snapshots
                lines.append(f"    _l_{st.name} = {value}{'.clone()' if snapshot else ''}")
                continue
            if st.kind == "mlp":
                lines += self.learn(st)
                continue
            value = self.expr(st.value)
            if st.kind == "param":
                lines.append(f"    _rt.assign(_p, {value})")
                continue
            mem = self.mems[st.target]
            if mem.init == "from":
                assert mem.first is not None
                value = f"({self.expr(mem.first)} if _first[{st.target!r}] else {value})"
            period = _period(st, mem)
            if period != ir.const(1):
                value = f"torch.where(_c % {self.expr(period)} == 0, {value}, _st_{st.target})"
            lines.append(f"    _rt.assign(_st_{st.target}, {value})")
        head = ["", "", f"def {name}({sig}{', ' if args else ''}{args}):",
                '    """One tensor\'s step in plain tensor code, for torch.compile to fuse."""']
        if any(re.search(r"\b_c\b", line) for line in lines):
            # the step count in the param's float64 (it is a float32 tensor, torch's layout:
            # 1 - beta ** _c lost float64's digits), else as it is (exact to 2 ** 24)
            head.append("    _c = _c.double() if _p.dtype == torch.float64 else _c")
        return head + lines

    def learn(self, st: ir.Assign) -> list[str]:
        """An MLP memory's gd step for one tensor: new W1 and W2, copied in (where due)."""
        mem = self.mems[st.target]
        (_, objective), args = st.value.value, st.value.args
        w1, w2 = state_lists(mem)
        lines = [f"    _nw1, _nw2 = _rt.mlp_learn({w1}, {w2}, "
                 f"{', '.join(self.expr(a) for a in args)}, {objective!r}, "
                 f"{self.expr(_mlp(mem).act)}, {self.where!r})"]
        period = _period(st, mem)
        for new, old in (("_nw1", w1), ("_nw2", w2)):
            if period != ir.const(1):
                new = f"torch.where(_c % {self.expr(period)} == 0, {new}, {old})"
            lines.append(f"    _rt.assign({old}, {new})")
        return lines


def _variant_method(i: int, v: ir.Variant, hyper: dict[str, str], args: str,
                    fused_by_triton: bool = False) -> list[str]:
    emit = _Variant(v, hyper)
    body: list[str] = []
    b = body.append
    b("_grads = [_p.grad for _p in _params]")
    b("_states = [self.state[_p] for _p in _params]")
    if v.kernel is not None:
        b("_fused = _rt.use_fused(group, _params, _grads)")
    b(f"_steps = _rt.steps(group, _states, _params, {'_fused' if v.kernel else 'False'})")
    init: list[str] = []
    for m in v.memories:
        if m.init in ("zeros", "ones"):
            make = "zeros_like" if m.init == "zeros" else "ones_like"
            init.append(f"    if {m.name!r} not in _s:")
            init.append(f"        _s[{m.name!r}] = torch.{make}(_p, memory_format=torch.preserve_format)")
    one = _OneTensor(v, hyper)
    for m in v.memories:
        if m.mlp is not None:  # m(x) = x, W2 drawn with the seed and the tensor's index
            one.where = f"{m.span}"
            w1, w2 = m.keys
            init.append(f"    if {w1!r} not in _s:")
            init.append(f"        _s[{w1!r}], _s[{w2!r}] = _rt.mlp_identity(self, _p, "
                        f"{one.expr(m.mlp.hidden)}, {one.expr(m.mlp.seed)}, {one.where!r})")
    for m in v.memories:
        if m.init == "eval":  # a hoisted value starts as its expression of the initial state
            assert m.first is not None
            one.where = f"{m.span}"
            init.append(f"    if {m.name!r} not in _s:")
            for r in sorted({n.value for n in m.first.walk() if n.op == "state"}):
                init.append(f"        _st_{r} = _s[{r!r}]")
            init.append(f"        _s[{m.name!r}] = {one.expr(m.first)}")
    if init:
        b("for _p, _s in zip(_params, _states):")
        body += init
    for m in v.memories:
        if m.period.op != "const":  # a hyperparameter: checked where a group sets it
            b(f"_rt.check_period({emit.scalar(m.period)}, {m.name!r}, {str(m.span)!r})")
    for m in v.memories:
        for key, name in zip(m.keys, state_lists(m)):
            get = f"_s[{key!r}]" if m.init != "from" else f"_s.get({key!r})"
            b(f"{name} = [{get} for _s in _states]")
    if v.kernel is not None:
        b("if _fused:")
        b(f"    # recognized: torch's fused {v.kernel.kernel} computes this variant exactly")
        if v.kernel.kernel == "sgd":
            b("    torch._foreach_add_(_steps, 1)")
        body += ["    " + ln for ln in _kernel_call(v.kernel, emit)]
        b("    return")
    else:
        b("_rt.no_kernel(group)")
    b("torch._foreach_add_(_steps, 1)")
    if fused_by_triton:
        b("if _rt.use_triton(group, _params, _grads):")
        for name in _from_memories(v):
            b("    for _s, _p in zip(_states, _params):")
            b(f"        _s.setdefault({name!r}, torch.empty_like(_p, memory_format=torch.preserve_format))")
            b(f"    _st_{name} = [_s[{name!r}] for _s in _states]")
        b("    _step = [_s.item() for _s in _steps]")
        lists = ", ".join(["_params", "_grads", "_step", *(f"_st_{m.name}" for m in v.memories)])
        b(f"    _rt.triton_module(_TRITON).launch_{i}({lists}, _first{', ' if args else ''}{args})")
        b("    return")
    b("if _rt.use_compiled(group, _grads):")
    for name in _from_memories(v):
        b("    for _s, _p in zip(_states, _params):")
        b(f"        _s.setdefault({name!r}, torch.empty_like(_p, memory_format=torch.preserve_format))")
        b(f"    _st_{name} = [_s[{name!r}] for _s in _states]")
    lists = ", ".join(["_params", "_grads", "_steps",
                       *(n for m in v.memories for n in state_lists(m))])
    b(f"    _rt.compiled(_all_{i}, len(_params))({lists}, _first{', ' if args else ''}{args})")
    b("    return")
    if uses_numbers(v):
        b("_step = [_s.item() for _s in _steps]")
    for s in v.stmts:
        emit.stmt(s)
    body += emit.lines
    header = [
        "",
        f"    def _variant_{i}(self, group, _params, _first{', ' if args else ''}{args}):",
        f'        """{_conditions(v, hyper) or "The only variant"}."""',
    ]
    return header + ["        " + ln if ln else "" for ln in body]


def literal(v: object) -> str:
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return f"float({str(v)!r})"
    return repr(v)
