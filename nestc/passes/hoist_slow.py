"""hoist_slow: compute what depends only on a slow level at that level's frequency.

`W -= lr * newton_schulz(M2)` with M2 updated every 10 steps would orthogonalize M2 on every
step; the value only changes when M2 does. Each maximal subexpression of an every-step
statement that reads only memories of one slower period (plus constants, shapes, and
hyperparameters as a matrix routine's settings: an LR scheduler must still reach `lr`), and
that is worth keeping (it contains a matrix routine), becomes a hidden memory: written right
after the last write of what it reads, every that many steps, and computed from the initial
states when the tensor's state is made (init "eval"). M3's O2 = NS(M2) is this case.
"""

from __future__ import annotations

from dataclasses import replace

from nestc import ir


def _slow_refs(e: ir.E, slow: dict[str, ir.Memory]) -> set[str] | None:
    """The slow memories e reads, or None if e reads anything that may change between two
    slow writes: tensors of every step, step counts, and hyperparameters (an LR scheduler
    changes lr every step), except the settings of a matrix routine (its steps, dtype)."""
    names: set[str] = set()

    def visit(n: ir.E, setting: bool) -> bool:
        # an MLP memory's read or write is never hoisted: its state is two tensors, not one
        if n.op in ("param", "grad", "local", "step", "mlp", "learn") or (
                n.op == "hyper" and not setting):
            return False
        if n.op == "state":
            if n.value not in slow:
                return False
            names.add(n.value)
        if n.op == "call" and n.value in ir.MATRIX_CALLS and n.value != "matmul":
            return visit(n.args[0], setting) and all(visit(a, True) for a in n.args[1:])
        return all(visit(a, setting) for a in n.args)

    return names if visit(e, False) else None


def _worth(e: ir.E) -> bool:
    return any(n.op == "call" and n.value in ir.MATRIX_CALLS for n in e.walk())


class _Hoister:
    def __init__(self, variant: ir.Variant) -> None:
        self.variant = variant
        self.slow = {m.name: m for m in variant.memories if m.period != ir.const(1)}
        self.taken = {m.name for m in variant.memories}
        self.caches: list[tuple[ir.Memory, ir.Assign, set[str]]] = []

    def rewrite(self, e: ir.E) -> ir.E:
        refs = _slow_refs(e, self.slow)
        if refs and e.op != "state" and _worth(e):
            mems = [self.slow[r] for r in sorted(refs)]
            if all(m.period == mems[0].period and m.deferred == mems[0].deferred for m in mems):
                return ir.E("state", value=self.cache(e, mems, refs))
        if not e.args:
            return e
        return replace(e, args=tuple(self.rewrite(a) for a in e.args))

    def cache(self, e: ir.E, mems: list[ir.Memory], refs: set[str]) -> str:
        for mem, assign, _ in self.caches:
            if assign.value == e:
                return mem.name
        fn = next(n.value for n in e.walk() if n.op == "call" and n.value in ir.MATRIX_CALLS)
        name, k = f"{mems[0].name}_{fn}", 1
        while name in self.taken:
            k += 1
            name = f"{mems[0].name}_{fn}{k}"
        self.taken.add(name)
        period, late = mems[0].period, mems[0].deferred
        mem = ir.Memory(name, "eval", period, mems[0].span, first=e, deferred=late)
        write = ir.Assign(name, "state", e, mems[0].span, every=period, late=late)
        self.caches.append((mem, write, refs))
        return name

    def run(self) -> ir.Variant:
        every_step = [s for s in self.variant.stmts
                      if isinstance(s, ir.Let) or (s.kind == "param" or (
                          s.every is None and s.target not in self.slow))]
        stmts = [replace(s, value=self.rewrite(s.value)) if s in every_step else s
                 for s in self.variant.stmts]
        for _, write, refs in self.caches:
            last = max(i for i, s in enumerate(stmts)
                       if isinstance(s, ir.Assign) and s.kind == "state" and s.target in refs)
            stmts.insert(last + 1, write)
        mems = self.variant.memories + [mem for mem, _, _ in self.caches]
        return ir.Variant(self.variant.conditions, mems, stmts, self.variant.kernel)


def hoist_slow(opt: ir.Optimizer) -> ir.Optimizer:
    opt.variants = [_Hoister(v).run() for v in opt.variants]
    return opt
