"""simplify_updates: exact algebraic clean-ups of update expressions before code generation.

Rewrites that give bit-identical floating-point results: negations moved into the operator
(a - s * (-b) = a + s * b), multiplication by one, addition of zero. One rewrite is exact only
in real arithmetic and is there to round the way torch does: decay x - s * x = x * (1 - s),
with 1 - s computed once in Python (torch's AdamW: param.mul_(1 - lr * weight_decay)), and
so is the moving average x - w * (x - t) = lerp(x, t, w) (torch's Adam: exp_avg.lerp_(g, w)).
"""

from __future__ import annotations

from dataclasses import replace

from nestc import ir

ONE, ZERO = ir.const(1), ir.const(0)


def simplify(e: ir.E) -> ir.E:
    args = tuple(simplify(a) for a in e.args)
    e = replace(e, args=args)
    op = e.op
    if op == "neg" and args[0].op == "neg":
        return args[0].args[0]
    if op == "mul":
        a, b = args
        if a in (ONE, ir.const(1.0)):
            return b
        if b in (ONE, ir.const(1.0)):
            return a
        if b.op == "neg" and a.is_scalar:  # s * (-x) = -(s * x)
            return ir.E("neg", (ir.E("mul", (a, b.args[0])),))
    if op == "sub" and args[1].op == "mul" and args[1].args[1].op == "sub":
        x, (w, (y, t)) = args[0], (args[1].args[0], args[1].args[1].args)
        if y == x and w.is_scalar and not x.is_scalar:  # x - w * (x - t) = lerp(x, t, w)
            return ir.E("call", (x, t, w), "lerp")
    if op == "sub" and args[1].op == "mul":
        x, (p, q) = args[0], args[1].args
        s = q if p == x else p if q == x else None
        if s is not None and s.is_scalar and not x.is_scalar:
            return ir.E("mul", (x, ir.E("sub", (ONE, s))))
    if op in ("add", "sub"):
        a, b = args
        if b in (ZERO, ir.const(0.0)):
            return a
        if b.op == "neg":  # a - (-x) = a + x
            return ir.E("add" if op == "sub" else "sub", (a, b.args[0]))
    return e


def simplify_updates(opt: ir.Optimizer) -> ir.Optimizer:
    for v in opt.variants:
        v.stmts = [replace(s, value=simplify(s.value)) for s in v.stmts]
        v.memories = [replace(m, first=simplify(m.first)) if m.first is not None else m
                      for m in v.memories]
    return opt
