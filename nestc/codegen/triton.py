"""ir.Optimizer -> Triton kernels: each element-wise variant as one multi-tensor kernel.

One launch updates every tensor of a param group that shares the same numbers. The kernel
loads W, grad(W) and the memories once, runs the variant's statements in registers
(float32), and stores W and the memories. Each program finds its tensor and block in a block
map and reads the tensor's addresses from an address table (`runtime.launch_multi_tensor`
builds and caches both). Every number in the update (hyperparameter arithmetic, bias
corrections, shapes, "is this a slow step") is computed on the host in Python, as the generic
path does, and passed in as a scalar argument, so the kernel holds only tensor arithmetic. A
variant with a matrix routine (newton_schulz, @) has no kernel. Kernels are named
`<optimizer>_fwd_kernel_<variant>`.
"""

from __future__ import annotations

from nestc import ir
from nestc.codegen.torch import _period, _Variant, comment, literal, py_name

NAN = "propagate_nan=tl.PropagateNan.ALL"  # like torch: a NaN gradient stays visible
TL_UNARY = {"sqrt": "tl.sqrt({})", "exp": "tl.exp({})", "log": "tl.log({})",
            "abs": "tl.abs({})", "sigmoid": "tl.sigmoid({})",
            "relu": f"tl.maximum({{}}, 0.0, {NAN})", "silu": "({0} * tl.sigmoid({0}))",
            "sign": "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))"}
# tensor ** k that the kernel computes exactly as torch does
POWERS = (0, 1, 2, 3, 4, 0.5)
BIN = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def fusable(variant: ir.Variant) -> bool:
    """Whether every statement is element-wise arithmetic the kernel computes like torch
    (not: matrix routines, MLP memories, tanh (no accurate Triton form on every target), other
    powers)."""
    if any(m.mlp is not None for m in variant.memories):
        return False
    for s in variant.stmts:
        for n in s.value.walk():
            if n.op == "call" and (n.value in ir.MATRIX_CALLS or n.value == "tanh"):
                return False
            if n.op == "pow" and not n.is_scalar and not (
                    n.args[1].op == "const" and n.args[1].value in POWERS):
                return False
    return True


class _Kernel:
    def __init__(self, variant: ir.Variant, hyper: dict[str, str]) -> None:
        self.variant = variant
        self.host = _Variant(variant, hyper)  # prints the numbers, as the generic path does
        self.numbers: list[str] = []  # host code of each scalar argument s0, s1, ...

    def number(self, code: str) -> str:
        if code not in self.numbers:
            self.numbers.append(code)
        return f"s{self.numbers.index(code)}"

    def expr(self, e: ir.E) -> str:
        if e.is_scalar:
            if e.op == "const":
                return literal(float(e.value))
            return self.number(self.host.expr(e).code)
        op = e.op
        if op in ("param", "grad"):
            return "p" if op == "param" else "g"
        if op == "state":
            return f"st_{e.value}"
        if op == "local":
            return f"l_{e.value}"
        if op == "call" and e.value == "debias":
            x, beta, step = e.args
            corr = ir.E("sub", (ir.const(1), ir.E("pow", (beta, step))))
            return f"({self.expr(x)} / {self.expr(corr)})"
        a = [self.expr(x) for x in e.args]
        if op in BIN:
            return f"({a[0]} {BIN[op]} {a[1]})"
        if op == "neg":
            return f"(-{a[0]})"
        if op == "pow":  # fusable() admits only exponents in POWERS
            k = e.args[1].value
            if k == 0.5:
                return f"tl.sqrt({a[0]})"
            return "(" + " * ".join([a[0]] * int(k)) + ")" if k else f"({a[0]} * 0.0 + 1.0)"
        if op == "cond":
            return f"tl.where({a[0]} != 0, {a[1]}, {a[2]})"
        fn = e.value
        if fn in ("min", "max"):
            return f"tl.{fn}imum({a[0]}, {a[1]}, {NAN})"
        if fn == "clamp":
            return f"tl.minimum(tl.maximum({a[0]}, {a[1]}, {NAN}), {a[2]}, {NAN})"
        if fn == "lerp":
            return f"({a[0]} + {a[2]} * ({a[1]} - {a[0]}))"
        return TL_UNARY[fn].format(a[0])

    def kernel(self, name: str) -> list[str]:
        mems = [m.name for m in self.variant.memories]
        body: list[str] = []
        for s in self.variant.stmts:
            body.append(f"    # {comment(f'{s.span.file}:{s.span.line}: ' + s.span.source.line(s.span.line).strip())}")
            if isinstance(s, ir.Let):
                if not s.value.is_scalar:
                    body.append(f"    l_{s.name} = {self.expr(s.value)}")
                continue
            value = self.expr(s.value)
            target = "p" if s.kind == "param" else f"st_{s.target}"
            mem = next((m for m in self.variant.memories if m.name == s.target), None)
            if mem is not None and mem.init == "from":
                assert mem.first is not None
                first = self.number(f"float(_first[{mem.name!r}])")
                value = f"tl.where({first} != 0, {self.expr(mem.first)}, {value})"
            period = _period(s, mem) if s.kind == "state" else ir.const(1)
            if period != ir.const(1):
                due = self.number(f"float(_c % {self.host.scalar(period)} == 0)")
                value = f"tl.where({due} != 0, {value}, {target})"
            body.append(f"    {target} = {value}")
        scalars = ", ".join(f"s{k}" for k in range(len(self.numbers)))
        # address table rows: numel, W, grad(W), then the memories; one column per tensor
        rows = ["P", "G", *(f"S_{m}" for m in mems)]
        types = ["PT", "GT", *(f"ST_{m}" for m in mems)]  # element types, as constexprs
        consts = ", ".join(f"{ty}: tl.constexpr" for ty in types)
        head = [
            "", "", "@_triton.jit",
            f"def {name}(ADDR, T, MAP, {scalars + ', ' if scalars else ''}BLOCK: tl.constexpr, "
            f"{consts}):",
            "    pid = tl.program_id(0)",
            "    t = tl.load(MAP + pid)  # which tensor",
            "    i = tl.load(MAP + tl.num_programs(0) + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
            "    mask = i < tl.load(ADDR + t)",
            *(f"    {r} = tl.load(ADDR + {k + 1} * T + t).to(tl.pointer_type({ty}))"
              for k, (r, ty) in enumerate(zip(rows, types))),
            "    p = tl.load(P + i, mask=mask).to(tl.float32)",
            "    g = tl.load(G + i, mask=mask).to(tl.float32)",
            *(f"    st_{m} = tl.load(S_{m} + i, mask=mask).to(tl.float32)" for m in mems),
        ]
        tail = ["    tl.store(P + i, p.to(PT), mask=mask)",
                *(f"    tl.store(S_{m} + i, st_{m}.to(ST_{m}), mask=mask)" for m in mems)]
        return head + body + tail


def triton_source(opt: ir.Optimizer) -> str:
    """A module of one kernel and one host launcher per fusable variant (others: none)."""
    hyper = {h.name: py_name(h.name) for h in opt.hypers}
    args = ", ".join(hyper[h.name] for h in opt.hypers)
    out = [f"# Triton kernels generated by nestc from {comment(opt.file)}:{opt.line}, "
           f"optimizer {opt.name}.", "import triton as _triton", "import triton.language as tl",
           "", "from nestc.interp import FloatNS as _S",
           "from nestc.runtime import launch_multi_tensor as _launch"]
    for i, v in enumerate(opt.variants):
        if not fusable(v):
            continue
        k = _Kernel(v, hyper)
        name = f"{opt.name}_fwd_kernel_{i}"
        kernel = k.kernel(name)
        mems = [f"_st_{m.name}" for m in v.memories]
        lists = ", ".join(["_params", "_grads", "_step", *mems])
        numbers = "".join(f"float({code}), " for code in k.numbers)
        out += kernel + [
            "", "",
            f"def launch_{i}({lists}, _first{', ' if args else ''}{args}):",
            "    # the kernel's scalar arguments for each tensor; equal ones share a launch",
            f"    _numbers = [({numbers}) for _c, _p in zip(_step, _params)]",
            f"    _launch({name}, [{', '.join(['_params', '_grads', *mems])}], _numbers)",
        ]
    return "\n".join(out) + "\n"
