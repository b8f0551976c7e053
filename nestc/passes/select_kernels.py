"""select_kernels: recognize updates that torch already has a fused kernel for.

Like a compiler calling BLAS: when a variant of an optimizer computes exactly what
torch's fused Adam, AdamW or SGD computes, the variant is tagged with that kernel and the
kernel's arguments as expressions over the spec's hyperparameters.

Recognition works in two steps. Symbolic execution (sympy) of the variant gives each new
state and the new parameter as expressions; the kernel's arguments are read off them by
differentiation (beta1 = d m_new / d m, ...). Then the bound kernel is checked against the
variant with the interpreter on random points: tensors, step counts, and hyperparameters of
either sign (zero included), so that a rewrite sympy made under its positivity assumptions
(|x| = x) cannot pass. A variant is only tagged when both agree on every point where either
is defined.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

from nestc import interp, ir

TRIALS = 24
RTOL = 1e-9


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # "adam", "adamw", "sgd"
    args: tuple[tuple[str, ir.E], ...]  # kernel argument -> scalar expression over hypers
    states: tuple[tuple[str, str], ...]  # kernel state role -> memory name

    def arg(self, name: str) -> ir.E:
        return dict(self.args)[name]


class _Symbolic:
    """A variant executed over sympy symbols."""

    def __init__(self, opt: ir.Optimizer, variant: ir.Variant) -> None:
        import sympy

        self.sp = sympy
        self.W, self.G = sympy.symbols("W G", positive=True)
        self.t = sympy.Symbol("t", positive=True, integer=True)
        self.hyper: dict[str, Any] = {}
        self.to_ir: dict[Any, ir.E] = {}
        for h in opt.hypers:
            if isinstance(h.default, (tuple, list)):
                syms = tuple(sympy.Symbol(f"H_{h.name}_{i}", positive=True)
                             for i in range(len(h.default)))
                for i, s in enumerate(syms):
                    self.to_ir[s] = ir.E("hyper", value=(h.name, i))
                self.hyper[h.name] = syms
            else:
                s = sympy.Symbol(f"H_{h.name}", positive=True)
                self.to_ir[s] = ir.E("hyper", value=(h.name,))
                self.hyper[h.name] = s
        self.old = {m.name: sympy.Symbol(f"S_{m.name}", positive=True) for m in variant.memories}
        self.new_sym = {m.name: sympy.Symbol(f"N_{m.name}", positive=True)
                        for m in variant.memories}
        self.new: dict[str, Any] = {}

        def on_write(name: str, value: Any) -> Any:
            self.new[name] = value
            return self.new_sym[name]

        ns = type("SympyNS", (), {"sqrt": staticmethod(sympy.sqrt), "exp": staticmethod(sympy.exp),
                                  "log": staticmethod(sympy.log), "abs": staticmethod(sympy.Abs)})
        self.W_new, _ = interp.run(variant, self.hyper, self.W, self.G, self.old, self.t, ns=ns,
                                   on_write=on_write)
        first = {m.name: True for m in variant.memories if m.init == "from"}
        self.first_new: dict[str, Any] = {}
        if first:
            _, firsts = interp.run(variant, self.hyper, self.W, self.G, self.old, self.t, ns=ns,
                                   first=first)
            self.first_new = {n: firsts[n] for n in first}

    def scalar(self, expr: Any) -> ir.E | None:
        """A hyperparameter-only sympy expression as IR, or None if it involves anything else.

        sympy cannot cancel sqrt(1 - b) * sqrt(1 / (1 - b)) without knowing b < 1, so an
        expression that equals a single hyperparameter (or 0 or 1) on random points in (0, 1)
        is replaced by it; verification re-checks the whole kernel afterwards.
        """
        expr = self.sp.simplify(expr)
        if expr.free_symbols - set(self.to_ir):
            return None
        rng = random.Random(7)
        points = [{s: rng.uniform(0.05, 0.95) for s in self.to_ir} for _ in range(6)]
        try:
            values = [complex(expr.evalf(subs=p)) for p in points]
        except (TypeError, ValueError):
            values = []
        for leaf in [0, 1, *sorted(self.to_ir, key=str)]:
            if values and all(abs(v - p.get(leaf, leaf)) <= 1e-12 * max(1, abs(v))
                              for v, p in zip(values, points)):
                return ir.const(leaf) if leaf in (0, 1) else self.to_ir[leaf]
        return _to_ir(self.sp, expr, self.to_ir)


def _to_ir(sp: Any, e: Any, syms: dict[Any, ir.E]) -> ir.E:
    if e in syms:
        return syms[e]
    if e.is_Integer:
        return ir.const(int(e))
    if e.is_Rational:
        return ir.E("div", (ir.const(int(e.p)), ir.const(int(e.q))))
    if e.is_Number:
        return ir.const(float(e))
    if e.is_Add:
        terms = sorted(e.args, key=lambda a: (a.could_extract_minus_sign(), sp.default_sort_key(a)))
        out = _to_ir(sp, terms[0], syms)
        for a in terms[1:]:
            out = out - _to_ir(sp, -a, syms) if a.could_extract_minus_sign() else out + _to_ir(sp, a, syms)
        return out
    if e.is_Mul:
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return -_to_ir(sp, rest, syms)
        num, den = sp.fraction(e)
        if den != 1:
            return ir.E("div", (_to_ir(sp, num, syms), _to_ir(sp, den, syms)))
        factors = [_to_ir(sp, a, syms) for a in sorted(e.args, key=sp.default_sort_key)]
        out = factors[0]
        for f in factors[1:]:
            out = out * f
        return out
    if e.is_Pow:
        base, exp = e.args
        if exp == sp.Rational(1, 2):
            return ir.E("call", (_to_ir(sp, base, syms),), "sqrt")
        return ir.E("pow", (_to_ir(sp, base, syms), _to_ir(sp, exp, syms)))
    raise ValueError(f"cannot lower {e}")


# --- the kernels' definitions, on floats --------------------------------------------------------


def _adam_ref(a: dict[str, float], W: float, G: float, st: dict[str, float], t: int,
              decoupled: bool) -> tuple[float, dict[str, float]]:
    if decoupled:
        W = W * (1 - a["lr"] * a["weight_decay"])
        g = G
    else:
        g = G + a["weight_decay"] * W
    m = st["exp_avg"] + (1 - a["beta1"]) * (g - st["exp_avg"])
    v = a["beta2"] * st["exp_avg_sq"] + (1 - a["beta2"]) * g * g
    bc1, bc2 = 1 - a["beta1"] ** t, 1 - a["beta2"] ** t
    W = W - (a["lr"] / bc1) * m / (math.sqrt(v) / math.sqrt(bc2) + a["eps"])
    return W, {"exp_avg": m, "exp_avg_sq": v}


def _sgd_ref(a: dict[str, float], W: float, G: float, st: dict[str, float], first: bool,
             nesterov: bool) -> tuple[float, dict[str, float]]:
    g = G + a["weight_decay"] * W
    if "momentum_buffer" not in st:
        return W - a["lr"] * g, {}
    buf = g if first else a["momentum"] * st["momentum_buffer"] + (1 - a["dampening"]) * g
    d = g + a["momentum"] * buf if nesterov else buf
    return W - a["lr"] * d, {"momentum_buffer": buf}


# --- proposing bindings -------------------------------------------------------------------------


def _propose_adam(s: _Symbolic, m: str, v: str) -> list[KernelChoice]:
    sp = s.sp
    mN, vN = s.new[m], s.new[v]
    b1 = sp.diff(mN, s.old[m])
    gc = sp.diff(mN, s.G)
    if gc == 0:
        return []
    wd = sp.diff(mN, s.W) / gc
    b2 = sp.diff(vN, s.old[v])
    Wf = s.W_new
    probe = {s.W: 0, s.new_sym[m]: 1 - b1 ** s.t, s.t: 1}
    k0 = Wf.subs({**probe, s.new_sym[v]: 0})
    k1 = Wf.subs({**probe, s.new_sym[v]: 1 - b2 ** s.t})
    if k0 == k1 or k0 == 0:
        return []
    eps = k1 / (k0 - k1)
    lr = -k0 * eps
    wdw = (1 - sp.diff(Wf, s.W)) / lr
    out = []
    for kernel, decay in (("adam", wd), ("adamw", wdw)):
        other = wdw if kernel == "adam" else wd
        if sp.simplify(other) != 0:
            continue
        args = {"lr": lr, "beta1": b1, "beta2": b2, "eps": eps, "weight_decay": decay}
        lowered = {k: s.scalar(x) for k, x in args.items()}
        if all(x is not None for x in lowered.values()):
            out.append(KernelChoice(kernel, tuple(lowered.items()),  # type: ignore[arg-type]
                                    (("exp_avg", m), ("exp_avg_sq", v))))
    return out


def _propose_sgd(s: _Symbolic, buf: str | None) -> list[KernelChoice]:
    sp = s.sp
    Wf = s.W_new
    zero = ir.const(0)
    if buf is None:
        lr = -sp.diff(Wf, s.G)
        if lr == 0:
            return []
        wd = (1 - sp.diff(Wf, s.W)) / lr
        args = {"lr": s.scalar(lr), "weight_decay": s.scalar(wd), "momentum": zero,
                "dampening": zero, "nesterov": ir.const(False)}
        if any(x is None for x in args.values()):
            return []
        return [KernelChoice("sgd", tuple(args.items()), ())]  # type: ignore[arg-type]
    bN = s.new[buf]
    mom = sp.diff(bN, s.old[buf])
    gc = sp.diff(bN, s.G)
    if gc == 0:
        return []
    damp = 1 - gc
    wd = sp.diff(bN, s.W) / gc
    out = []
    for nesterov, lr in ((False, -sp.diff(Wf, s.new_sym[buf])), (True, -sp.diff(Wf, s.G))):
        args = {"lr": s.scalar(lr), "weight_decay": s.scalar(wd), "momentum": s.scalar(mom),
                "dampening": s.scalar(damp), "nesterov": ir.const(nesterov)}
        if all(x is not None for x in args.values()):
            out.append(KernelChoice("sgd", tuple(args.items()),  # type: ignore[arg-type]
                                    (("momentum_buffer", buf),)))
    return out


# --- verification -------------------------------------------------------------------------------


def _sample_hyper(opt: ir.Optimizer, rng: random.Random) -> dict[str, Any]:
    def number() -> float:
        return rng.choice([0.0, rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95),
                           -rng.uniform(0.05, 0.95)])

    def one(default: Any) -> Any:
        if isinstance(default, bool):
            return rng.random() < 0.5
        if isinstance(default, (tuple, list)):
            return type(default)(one(d) for d in default)
        if isinstance(default, int):
            return rng.choice([0, 1, 2, 3, number()])
        return number()  # floats, and required hyperparameters (no default to go by)

    return {h.name: one(h.default) for h in opt.hypers}


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= RTOL * max(1.0, abs(a), abs(b))


def _attempt(run: Any, *args: Any, **kwargs: Any) -> Any:
    """run(*args, **kwargs), or None where the math is undefined at this point."""
    try:
        out = run(*args, **kwargs)
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    values = [out[0], *out[1].values()]
    return out if all(isinstance(v, float | int) and math.isfinite(v) for v in values) else None


def _verify(opt: ir.Optimizer, variant: ir.Variant, choice: KernelChoice, seed: int) -> bool:
    rng = random.Random(seed)
    roles = dict(choice.states)
    hits = 0
    for _ in range(TRIALS * 20):
        hyper = _sample_hyper(opt, rng)
        ndim, rows, cols = rng.choice([0, 1, 2, 3]), rng.randint(1, 5), rng.randint(1, 5)
        shape = {"ndim": ndim, "rows": rows if ndim else 1, "cols": cols if ndim > 1 else 1}
        shape["numel"] = shape["rows"] * shape["cols"]
        env = {"hyper": hyper, "ns": interp.FloatNS, "shape": shape}
        try:
            if not all(bool(interp.evaluate(c, env)) == want for c, want in variant.conditions):
                continue
            args = {k: interp.evaluate(e, env) for k, e in choice.args}
        except (ZeroDivisionError, ValueError, OverflowError):
            continue
        W, G = rng.uniform(-2, 2), rng.uniform(-2, 2)
        t = rng.choice([1, 2, 3, 7, 50])
        old = {name: rng.uniform(0.1, 2.0) for name in roles.values()}
        first = {m.name: rng.random() < 0.3 for m in variant.memories if m.init == "from"}
        kst = {role: old[name] for role, name in roles.items()}
        spec = _attempt(interp.run, variant, hyper, W, G, old, t, first=first, shape=shape)
        if choice.kernel == "sgd":
            kern = _attempt(_sgd_ref, args, W, G, kst, any(first.values()), bool(args["nesterov"]))
        else:
            kern = _attempt(_adam_ref, args, W, G, kst, t, choice.kernel == "adamw")
        if spec is None and kern is None:
            continue  # a point where neither is defined (a square root of a negative number)
        if spec is None or kern is None:
            return False
        (W1, st1), (W2, st2) = spec, kern
        if not _close(W1, W2) or any(not _close(st1[name], st2[role])
                                     for role, name in roles.items()):
            return False
        hits += 1
        if hits >= TRIALS:
            return True
    return False


def _candidates(opt: ir.Optimizer, variant: ir.Variant) -> list[KernelChoice]:
    mems = variant.memories
    if any(m.period != ir.const(1) or m.mlp is not None for m in mems):
        return []
    if not any(isinstance(s, ir.Assign) and s.kind == "param" for s in variant.stmts):
        return []
    try:
        s = _Symbolic(opt, variant)
    except (TypeError, ValueError, AttributeError, KeyError):
        return []  # something sympy cannot run (a builtin without a symbolic form)
    out: list[KernelChoice] = []
    if len(mems) == 2 and all(m.init == "zeros" for m in mems):
        for a, b in itertools.permutations([m.name for m in mems]):
            out += _propose_adam(s, a, b)
    if len(mems) == 1 and mems[0].init == "from":
        out += _propose_sgd(s, mems[0].name)
    if not mems:
        out += _propose_sgd(s, None)
    return out


def select_kernels(opt: ir.Optimizer) -> ir.Optimizer:
    """Tag each variant with the fused kernel that computes it, where one does."""
    for i, variant in enumerate(opt.variants):
        variant.kernel = None
        if any(n.op == "shape" for st in variant.stmts for n in st.value.walk()):
            # a step that reads the param's shape (`if numel(W) > 100 then 0.5 else 1`): the
            # symbolic run sees a 0-d W, and the points verified have small shapes, so a kernel
            # recognized with that factor folded to 1 dropped it on larger params
            continue
        try:
            choices = _candidates(opt, variant)
        except (ArithmeticError, ValueError):  # sympy's form of it has no kernel argument
            continue  # (exp(lr), a division by zero, ...): the generic code runs it
        for choice in choices:
            try:
                ok = _verify(opt, variant, choice, seed=1000 + i)
            except (ArithmeticError, ValueError):
                ok = False
            if ok:
                variant.kernel = choice
                break
    return opt
