"""ir.Optimizer -> the Python source of a torch.optim.Optimizer subclass.

The generated class keeps one state dict per tensor (torch's layout: a float32 `step` plus one
tensor per memory) and, per param group, picks the variant its hyperparameters select. A
variant the lowering recognized calls torch's fused kernel; the generic path is multi-tensor
`torch._foreach_*` code, one statement of the spec after another.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass

from nestc import __version__, ir
from nestc.passes.lower_optimizer import Branch, Leaf
from nestc.passes.select_kernels import KernelChoice

RESERVED = {"torch", "math", "self", "group", "params", "grads", "states", "step", "first",
            "closure", "loss", "backend", "defaults", "super", "p", "s", "x", "i", "sel"}

FOREACH_UNARY = {"sqrt": "_foreach_sqrt", "abs": "_foreach_abs", "exp": "_foreach_exp",
                 "log": "_foreach_log", "sign": "_foreach_sign", "tanh": "_foreach_tanh",
                 "sigmoid": "_foreach_sigmoid", "neg": "_foreach_neg"}
FOREACH_BINARY = {"add": "_foreach_add", "sub": "_foreach_sub", "mul": "_foreach_mul",
                  "div": "_foreach_div", "pow": "_foreach_pow", "max": "_foreach_maximum",
                  "min": "_foreach_minimum"}
PY_OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}
CMP_OPS = {"==", "!=", "<", ">", "<=", ">=", "and", "or"}


def py_name(name: str) -> str:
    """A spec identifier as a Python local: never a keyword, builtin of ours, or dunder."""
    assert name.isidentifier(), name
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in RESERVED \
            or name.startswith("_"):
        return f"h_{name}"
    return name


def comment(text: str) -> str:
    """Spec text made safe for one Python comment line."""
    return "".join(ch if ch.isprintable() else "?" for ch in text).strip()


@dataclass(frozen=True)
class Val:
    code: str
    kind: str  # "s": one number; "ls": one number per tensor, as an expression of its step `c`;
    #            "t": a list of tensors


class _Variant:
    """Emits the generic multi-tensor code of one variant."""

    def __init__(self, opt: ir.Optimizer, variant: ir.Variant, hyper_names: dict[str, str]):
        self.opt = opt
        self.variant = variant
        self.hyper = hyper_names
        self.lines: list[str] = []
        self.tmp = 0
        self.locals: dict[str, Val] = {}
        self.mems = {m.name: m for m in variant.memories}
        self.temps: set[str] = set()  # names of freshly allocated lists, each read once

    def fresh(self) -> str:
        self.tmp += 1
        return f"t{self.tmp}"

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

    def expr(self, e: ir.E) -> Val:
        op = e.op
        if op == "const":
            return Val(repr(e.value), "s")
        if op == "hyper":
            code = self.hyper[e.value[0]] + "".join(f"[{i}]" for i in e.value[1:])
            return Val(code, "s")
        if op == "param":
            return Val("params", "t")
        if op == "grad":
            return Val("grads", "t")
        if op == "state":
            return Val(f"st_{e.value}", "t")
        if op == "local":
            return self.locals[e.value]
        if op == "step":
            mem = self.mems.get(e.value) if e.value else None
            if mem is None or mem.period == ir.const(1):
                return Val("c", "ls")
            return Val(f"(c // {self.scalar(mem.period)})", "ls")
        if op == "cmp":
            args = [self.expr(a) for a in e.args]
            assert all(a.kind == "s" for a in args), e
            if e.value == "not":
                return Val(f"(not {args[0].code})", "s")
            return Val(f"({args[0].code} {e.value} {args[1].code})", "s")
        if op == "cond":
            c, a, b = (self.expr(x) for x in e.args)
            if a.kind == b.kind == "s":
                return Val(f"({a.code} if {c.code} else {b.code})", "s")
            return Val(f"({self.as_tensors(a).code} if {c.code} else {self.as_tensors(b).code})", "t")
        if op == "neg":
            a = self.expr(e.args[0])
            return self.unary("neg", a)
        if op in PY_OPS:
            return self.binary(op, e.args[0], e.args[1])
        if op == "call":
            return self.call(e)
        raise AssertionError(f"codegen: unknown op {op}")

    def as_tensors(self, v: Val) -> Val:
        if v.kind == "t":
            return v
        if v.kind == "s":
            return Val(f"[torch.full_like(x, {v.code}) for x in params]", "t")
        return Val(f"[torch.full_like(x, {v.code}) for x, c in zip(params, step)]", "t")

    def unary(self, fn: str, a: Val) -> Val:
        if a.kind == "s":
            return Val(f"(-{a.code})" if fn == "neg" else f"math.{fn}({a.code})", "s")
        if a.kind == "ls":
            return Val(f"(-{a.code})" if fn == "neg" else f"math.{fn}({a.code})", "ls")
        if fn in FOREACH_UNARY:
            return Val(f"torch.{FOREACH_UNARY[fn]}({self.bind(a).code})", "t")
        if fn == "relu":
            return Val(f"torch._foreach_clamp_min({self.bind(a).code}, 0.0)", "t")
        return Val(f"[torch.nn.functional.{fn}(x) for x in {self.bind(a).code}]", "t")

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
        if a.kind == "t":
            return Val(f"torch.{FOREACH_BINARY[op]}({self.bind(a).code}, {self.listed(b)})", "t")
        # a number on the left of tensors
        bt = self.bind(b).code
        if a.kind == "ls":
            a = Val(self.listed(a), "ls")
        if op == "add":
            return Val(f"torch._foreach_add({bt}, {a.code})", "t")
        if op == "mul":
            return Val(f"torch._foreach_mul({bt}, {a.code})", "t")
        if op == "sub":
            return Val(f"torch._foreach_add(torch._foreach_neg({bt}), {a.code})", "t")
        if op == "div":
            return Val(f"torch._foreach_mul(torch._foreach_reciprocal({bt}), {a.code})", "t")
        if a.kind == "s":
            return Val(f"torch._foreach_pow({a.code}, {bt})", "t")
        return Val(f"[c ** x for c, x in zip({a.code}, {bt})]", "t")

    def listed(self, v: Val) -> str:
        """Code for v as a foreach argument: tensors, a number, or a list of numbers."""
        if v.kind == "ls":
            return f"[{v.code} for c in step]"
        return self.bind(v).code if v.kind == "t" else v.code

    def call(self, e: ir.E) -> Val:
        fn = e.value
        if fn == "debias":
            x, beta, step = e.args
            corr = self.binary("sub", ir.const(1), ir.E("pow", (beta, step)))
            xv = self.expr(x)
            if xv.kind == "t":
                return Val(f"torch._foreach_div({self.bind(xv).code}, {self.listed(corr)})", "t")
            return self.binary("div", x, ir.E("sub", (ir.const(1), ir.E("pow", (beta, step)))))
        if fn == "sqrt" and e.args[0].op == "call" and e.args[0].value == "debias":
            # sqrt(x / c) = sqrt(x) / sqrt(c): the correction's root is one number per tensor
            x, beta, step = e.args[0].args
            root = self.unary("sqrt", self.expr(x))
            corr = self.unary("sqrt", self.binary("sub", ir.const(1), ir.E("pow", (beta, step))))
            if root.kind == "t":
                return Val(f"torch._foreach_div({self.bind(root).code}, {self.listed(corr)})", "t")
        args = [self.expr(a) for a in e.args]
        if fn in ("min", "max"):
            a, b = args
            if a.kind == b.kind == "s":
                return Val(f"{fn}({a.code}, {b.code})", "s")
            return Val(f"torch.{FOREACH_BINARY[fn]}({self.bind(self.as_tensors(a)).code}, "
                       f"{self.bind(self.as_tensors(b)).code})", "t")
        if fn == "clamp":
            xv, lo, hi = args
            xt = self.bind(self.as_tensors(xv))
            return Val(f"torch._foreach_clamp_max(torch._foreach_clamp_min({xt.code}, {lo.code}), "
                       f"{hi.code})", "t")
        if fn == "lerp":
            a, b, w = args
            return Val(f"torch._foreach_lerp({self.bind(self.as_tensors(a)).code}, "
                       f"{self.bind(self.as_tensors(b)).code}, {w.code})", "t")
        return self.unary(fn, args[0])

    # statements
    def stmt(self, s: ir.Stmt) -> None:
        self.line(f"# {comment(_source_line(s.span))}")
        if isinstance(s, ir.Let):
            v = self.expr(s.value)
            if v.kind == "t":
                name = f"l_{s.name}"
                self.line(f"{name} = {v.code}")
                v = Val(name, "t")
            else:
                name = f"l_{s.name}"
                self.line(f"{name} = {v.code}")
                v = Val(name, v.kind)
            self.locals[s.name] = v
            return
        target = "params" if s.kind == "param" else f"st_{s.target}"
        mem = self.mems.get(s.target) if s.kind == "state" else None
        every = mem is not None and mem.period != ir.const(1)
        if mem is not None and mem.init == "from":
            assert mem.first is not None
            first = self.as_tensors(self.expr(mem.first))
            self.line("if first:")
            self.line(f"    {target} = [x.clone() for x in {first.code}]")
            self.line(f"    for s, x in zip(states, {target}):")
            self.line(f"        s[{s.target!r}] = x")
            self.line("else:")
            inner = _Variant(self.opt, self.variant, self.hyper)
            inner.locals, inner.tmp = self.locals, self.tmp
            inner.assign(s, target, every)
            self.lines += ["    " + ln for ln in inner.lines]
            self.tmp = inner.tmp
            return
        self.assign(s, target, every)

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
        sv = self.expr(ir.E("neg", (scale,)) if op == "sub" else scale)
        a = self.bind(self.as_tensors(self.expr(tn[0])))
        if td:
            b = self.bind(self.as_tensors(self.expr(td[0])))
            self.line(f"torch._foreach_addcdiv_({target}, {a.code}, {b.code}, {self.listed(sv)})")
        elif sv.kind == "s":
            self.line(f"torch._foreach_add_({target}, {a.code}, alpha={sv.code})")
        else:
            self.line(f"torch._foreach_add_({target}, torch._foreach_mul({a.code}, {self.listed(sv)}))")
        return True

    def assign(self, s: ir.Assign, target: str, every: bool) -> None:
        value = s.value
        current = ir.E("param") if s.kind == "param" else ir.E("state", value=s.target)
        if not every and value.op == "call" and value.value == "lerp" and value.args[0] == current:
            end_e, w = value.args[1], value.args[2]
            if end_e.op == "mul" and not any(a.is_scalar for a in end_e.args) and w.is_scalar:
                # lerp toward a product: scale, then multiply-add without a temporary (torch's
                # second moment: v.mul_(beta2).addcmul_(g, g, value=1 - beta2))
                fa, fb = (self.bind(self.as_tensors(self.expr(x))) for x in end_e.args)
                wv = self.scalar(w)
                self.line(f"torch._foreach_mul_({target}, 1 - {wv})")
                self.line(f"torch._foreach_addcmul_({target}, {fa.code}, {fb.code}, value={wv})")
                return
            end = self.bind(self.as_tensors(self.expr(end_e)))
            self.line(f"torch._foreach_lerp_({target}, {end.code}, {self.listed(self.expr(value.args[2]))})")
            return
        if not every and value.op == "mul" and value.args[0] == current and value.args[1].is_scalar:
            self.line(f"torch._foreach_mul_({target}, {self.listed(self.expr(value.args[1]))})")
            return
        # retain * x + rest: scale x in place, then add the rest (computed first)
        if not every and value.op in ("add", "sub") and value.args[0].op == "mul":
            a, b = value.args[0].args
            scale = b if a == current and b.is_scalar else a if b == current and a.is_scalar else None
            if scale is not None:
                weight, rest_e = _scaled(value.args[1])
                rest = self.bind(self.as_tensors(self.expr(rest_e)))
                self.line(f"torch._foreach_mul_({target}, {self.scalar(scale)})")
                fn = "_foreach_add_" if value.op == "add" else "_foreach_sub_"
                tail = f", alpha={self.scalar(weight)}" if weight is not None else ""
                self.line(f"torch.{fn}({target}, {rest.code}{tail})")
                return
        if not every and value.op in ("add", "sub") and value.args[0] == current:
            if self.scaled_update(target, value.op, value.args[1]):
                return
            factor, rhs = _scaled(value.args[1])
            r = self.bind(self.as_tensors(self.expr(rhs)))
            alpha = f", alpha={self.scalar(factor)}" if factor is not None else ""
            fn = "_foreach_add_" if value.op == "add" else "_foreach_sub_"
            self.line(f"torch.{fn}({target}, {r.code}{alpha})")
            return
        v = self.bind(self.as_tensors(self.expr(value)))
        if every:
            period = self.scalar(self.mems[s.target].period)
            self.line("for i, c in enumerate(step):")
            self.line(f"    if c % {period} == 0:")
            self.line(f"        {target}[i].copy_({v.code}[i])")
        else:
            self.line(f"torch._foreach_copy_({target}, {v.code})")


INPLACE = {"_foreach_add", "_foreach_sub", "_foreach_mul", "_foreach_div", "_foreach_pow",
           "_foreach_sqrt", "_foreach_abs", "_foreach_exp", "_foreach_log", "_foreach_sign",
           "_foreach_tanh", "_foreach_sigmoid", "_foreach_neg", "_foreach_maximum",
           "_foreach_minimum", "_foreach_lerp", "_foreach_clamp_min", "_foreach_clamp_max",
           "_foreach_reciprocal"}


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


def _source_line(span) -> str:
    text = span.source.line(span.line).strip()
    return f"{span.file}:{span.line}: {text}"


def _kernel_call(choice: KernelChoice, emit: _Variant) -> list[str]:
    args = {k: emit.scalar(e) for k, e in choice.args}
    st = dict(choice.states)
    if choice.kernel in ("adam", "adamw"):
        return [
            "_fused_adam(",
            f"    params, grads, st_{st['exp_avg']}, st_{st['exp_avg_sq']}, [], steps, None, None,",
            f"    amsgrad=False, has_complex=False, beta1={args['beta1']}, beta2={args['beta2']},",
            f"    lr={args['lr']}, weight_decay={args['weight_decay']}, eps={args['eps']},",
            "    maximize=False, capturable=False, differentiable=False,",
            f"    decoupled_weight_decay={choice.kernel == 'adamw'},",
            ")",
        ]
    assert choice.kernel == "sgd", choice.kernel
    buf = st.get("momentum_buffer")
    lines = []
    bufs = "[None] * len(params)" if buf is None else f"[s.get({buf!r}) for s in states]"
    lines.append(f"bufs = {bufs}")
    lines += [
        "_fused_sgd(",
        "    params, grads, bufs, None, None,",
        f"    weight_decay={args['weight_decay']}, momentum={args['momentum']}, lr={args['lr']},",
        f"    dampening={args['dampening']}, nesterov={args['nesterov']}, maximize=False,",
        "    has_sparse_grad=False,",
        ")",
    ]
    if buf is not None:
        lines += ["for s, b in zip(states, bufs):", f"    s[{buf!r}] = b"]
    return lines


def generate_optimizer(opt: ir.Optimizer) -> str:
    hyper = {h.name: py_name(h.name) for h in opt.hypers}
    cls = opt.name
    sig = ", ".join(f"{hyper[h.name]}={_literal(h.default)}" if not h.required else hyper[h.name]
                    for h in opt.hypers)
    out: list[str] = []
    w = out.append
    w(f"# Generated by nestc {__version__} from {comment(opt.file)}:{opt.line}, optimizer {cls}.")
    w("# Do not edit: `nestc compile` regenerates it.")
    w("import math")
    w("")
    w("import torch")
    for mod in sorted({"sgd" if v.kernel.kernel == "sgd" else "adam"
                       for v in opt.variants if v.kernel}):
        w(f"from torch.optim.{mod} import _fused_{mod}")
    w("")
    w("from nestc import runtime as _rt")
    w("")
    w("")
    w(f"class {cls}(torch.optim.Optimizer):")
    w(f'    """{cls}, compiled from {comment(opt.file)}:{opt.line}.')
    w("")
    w("    Variants (picked per param group by its hyperparameters):")
    for i, v in enumerate(opt.variants):
        k = v.kernel.kernel if v.kernel else None
        how = f"torch fused {k} kernel, else generic" if k else "generic multi-tensor code"
        w(f"      {i}: {_conditions(v, hyper) or 'always'} -> {how}")
    w('    """')
    w("")
    w(f"    HYPERPARAMETERS = {tuple(h.name for h in opt.hypers)!r}")
    w(f"    MEMORIES = {tuple(sorted({m.name for v in opt.variants for m in v.memories}))!r}")
    w("")
    w(f"    def __init__(self, params, {sig}{', ' if sig else ''}*, backend=\"auto\"):")
    w("        defaults = {" + ", ".join(f"{h.name!r}: {hyper[h.name]}" for h in opt.hypers)
      + ", 'backend': _rt.check_backend(backend)}")
    w("        super().__init__(params, defaults)")
    w("")
    w("    @torch.no_grad()")
    w("    def step(self, closure=None):")
    w("        loss = None")
    w("        if closure is not None:")
    w("            with torch.enable_grad():")
    w("                loss = closure()")
    w("        for group in self.param_groups:")
    w("            params = [p for p in group['params'] if p.grad is not None]")
    w("            if not params:")
    w("                continue")
    for h in opt.hypers:
        w(f"            {hyper[h.name]} = group[{h.name!r}]")
    args = ", ".join(hyper[h.name] for h in opt.hypers)
    for ln in _dispatch(opt.tree, hyper, args, opt):
        w("            " + ln)
    w("        return loss")
    for i, v in enumerate(opt.variants):
        out += _variant_method(opt, i, v, hyper, args)
    for i, v in enumerate(opt.variants):
        out += _OneTensor(v, hyper).function(f"_one_{i}", v, args)
    return "\n".join(out) + "\n"


def _conditions(v: ir.Variant, hyper: dict[str, str]) -> str:
    emit = _Variant(ir.Optimizer("", "", 0, "", [], []), v, hyper)
    parts = []
    for cond, truth in v.conditions:
        code = emit.scalar(cond)
        parts.append(code if truth else f"not {code}")
    return " and ".join(parts)


def _dispatch(tree: Leaf | Branch, hyper: dict[str, str], args: str, opt: ir.Optimizer) -> list[str]:
    if isinstance(tree, Leaf):
        v = opt.variants[tree.variant]
        if any(m.init == "from" for m in v.memories):
            names = [m.name for m in v.memories if m.init == "from"]
            test = " or ".join(f"{n!r} not in self.state[p]" for n in names)
            return [f"for first, ps in _rt.partition(params, lambda p: {test}):",
                    f"    self._variant_{tree.variant}(group, ps, first, {args})"]
        return [f"self._variant_{tree.variant}(group, params, False, {args})"]
    emit = _Variant(opt, opt.variants[0], hyper)
    lines = [f"if {emit.scalar(tree.cond)}:"]
    lines += ["    " + ln for ln in _dispatch(tree.then, hyper, args, opt)]
    lines.append("else:")
    lines += ["    " + ln for ln in _dispatch(tree.orelse, hyper, args, opt)]
    return lines


class _OneTensor:
    """Emits a variant as plain tensor code for one parameter (for torch.compile to fuse)."""

    def __init__(self, variant: ir.Variant, hyper: dict[str, str]) -> None:
        self.mems = {m.name: m for m in variant.memories}
        self.hyper = hyper

    def expr(self, e: ir.E) -> str:
        op = e.op
        if op == "const":
            return repr(e.value)
        if op == "hyper":
            return self.hyper[e.value[0]] + "".join(f"[{i}]" for i in e.value[1:])
        if op in ("param", "grad"):
            return "p" if op == "param" else "g"
        if op == "state":
            return f"st_{e.value}"
        if op == "local":
            return f"l_{e.value}"
        if op == "step":
            mem = self.mems.get(e.value) if e.value else None
            if mem is None or mem.period == ir.const(1):
                return "c"
            return f"(c // {self.expr(mem.period)})"
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
        if fn == "lerp":
            return f"torch.lerp({args[0]}, {args[1]}, {args[2]})"
        if fn == "clamp":
            return f"torch.clamp({args[0]}, {args[1]}, {args[2]})"
        if fn in ("min", "max"):
            return f"torch.{fn}imum(torch.as_tensor({args[0]}), torch.as_tensor({args[1]}))"
        if fn in ("silu", "relu"):
            return f"torch.nn.functional.{fn}({args[0]})"
        return f"torch.{fn}(torch.as_tensor({args[0]}))"

    def function(self, name: str, variant: ir.Variant, args: str) -> list[str]:
        mems = [m.name for m in variant.memories]
        sig = ", ".join(["p", "g", "c", *(f"st_{m}" for m in mems), "first"])
        lines = ["", "", f"def {name}({sig}, {args}):",
                 '    """One tensor\'s step, plain tensor code: torch.compile fuses it."""']
        for st in variant.stmts:
            lines.append(f"    # {comment(_source_line(st.span))}")
            if isinstance(st, ir.Let):
                lines.append(f"    l_{st.name} = {self.expr(st.value)}")
                continue
            value = self.expr(st.value)
            if st.kind == "param":
                lines.append(f"    p.copy_({value})")
                continue
            mem = self.mems[st.target]
            if mem.init == "from":
                assert mem.first is not None
                value = f"({self.expr(mem.first)} if first else {value})"
            if mem.period != ir.const(1):
                value = f"torch.where(c % {self.expr(mem.period)} == 0, {value}, st_{st.target})"
            lines.append(f"    st_{st.target}.copy_({value})")
        return lines


def _variant_method(opt: ir.Optimizer, i: int, v: ir.Variant, hyper: dict[str, str],
                    args: str) -> list[str]:
    emit = _Variant(opt, v, hyper)
    body: list[str] = []
    b = body.append
    b("grads = [p.grad for p in params]")
    b("states = [self.state[p] for p in params]")
    b("for p, s in zip(params, states):")
    b("    if 'step' not in s:")
    b("        s['step'] = torch.zeros((), dtype=torch.float32, device=p.device)")
    for m in v.memories:
        if m.init != "from":
            make = "zeros_like" if m.init == "zeros" else "ones_like"
            b(f"    if {m.name!r} not in s:")
            b(f"        s[{m.name!r}] = torch.{make}(p, memory_format=torch.preserve_format)")
    b("steps = [s['step'] for s in states]")
    for m in v.memories:
        if m.init != "from":
            b(f"st_{m.name} = [s[{m.name!r}] for s in states]")
        else:
            b(f"st_{m.name} = [s.get({m.name!r}) for s in states]")
    if v.kernel is not None:
        b("if _rt.use_fused(group, params, grads):")
        b(f"    # recognized: torch's fused {v.kernel.kernel} computes this variant exactly")
        if v.kernel.kernel == "sgd":
            b("    torch._foreach_add_(steps, 1)")
        body += ["    " + ln for ln in _kernel_call(v.kernel, emit)]
        b("    return")
    b("torch._foreach_add_(steps, 1)")
    b("if _rt.backend_of(group) == 'compiled':")
    b(f"    one = _rt.compiled(_one_{i})")
    for m in v.memories:
        if m.init == "from":
            b("    for s, p in zip(states, params):")
            b(f"        s.setdefault({m.name!r}, torch.empty_like(p, memory_format=torch.preserve_format))")
            b(f"    st_{m.name} = [s[{m.name!r}] for s in states]")
    lists = ", ".join(["params", "grads", "steps", *(f"st_{m.name}" for m in v.memories)])
    names = ", ".join(["p", "g", "c", *(f"st_{m.name}" for m in v.memories)])
    b(f"    for {names} in zip({lists}):")
    b(f"        one({names}, first, {args})")
    b("    return")
    b("step = [s.item() for s in steps]")
    for s in v.stmts:
        emit.stmt(s)
    body += emit.lines
    header = [
        "",
        f"    def _variant_{i}(self, group, params, first, {args}):",
        f'        """{_conditions(v, hyper) or "The only variant"}."""',
    ]
    return header + ["        " + ln if ln else "" for ln in body]


def _literal(v: object) -> str:
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return f"float({str(v)!r})"
    return repr(v)
