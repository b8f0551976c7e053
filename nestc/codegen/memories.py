"""The memories of blocks, as generated code: what a `memory` declaration becomes.

A plan reads the declaration (structure, clauses, rule), checks it with its spans, and renders
three pieces of code: the runtime memory's constructor (nestc.memories, plain values only),
its write (the per-token signals, computed where the memory is declared) and its reads.
nestc/memories.py says what each runtime memory computes; docs/semantics.md defines it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nestc import ast
from nestc.check import CHOICES, body_paths
from nestc.codegen.block import ACTS, MATH, Ten, fold_numbers, operand, unsupported
from nestc.codegen.torch import literal
from nestc.errors import NestError
from nestc.hyper import UNKNOWN, const_eval


def plan(scope: Any, s: ast.StmtMemory) -> Any:
    """The plan of memory s, its body's `if`s resolved at the hyperparameters."""
    (body,) = body_paths(s.body, lambda cond: bool(scope.const(cond)))
    s = dataclasses.replace(s, body=body)
    structure = _call(s.structure)
    kind = structure[0] if structure else None
    if kind == "cache":
        return CachePlan(scope, s)
    every = s.frequency is not None and s.frequency.unit == "token" and \
        s.frequency.every is not None
    if kind in ("matrix", "mlp", "residual_mlp") and every and not _is_task(s):
        return PeriodicPlan(scope, s)
    if kind == "matrix":
        return LinearPlan(scope, s)
    if kind in ("mlp", "residual_mlp") and s.frequency is not None and \
            s.frequency.unit == "never":
        return StaticPlan(scope, s)
    if kind in ("mlp", "residual_mlp") and s.frequency is not None and \
            s.frequency.unit == "token" and _is_task(s):
        return TaskPlan(scope, s)
    if kind in ("mlp", "residual_mlp") and s.frequency is not None and \
            s.frequency.unit == "token" and s.frequency.every is None:
        return MLPPlan(scope, s)
    raise unsupported(f"a `{kind or 'plain'}` memory updated "
                      f"{'every ' + s.frequency.unit if s.frequency else 'so'}", s.span)


class Plan:
    """A memory of a block, as the generator sees it."""

    runtime = ""  # the nestc.memories class
    attr = ""  # its submodule's name (set by the generator)
    rule_kw: dict[str, ast.Expr]
    heads: int

    def __init__(self, s: ast.StmtMemory) -> None:
        self.name, self.span = s.name, s.span
        self.config: dict[str, Any] = {}  # the runtime constructor's keyword arguments
        self.backend = False  # whether the constructor takes the back end

    def describe(self) -> str:
        """What the memory compiles to, in words (nestc explain)."""
        raise NotImplementedError

    def construct(self) -> tuple[str, list[str]]:
        """The runtime memory's constructor and its arguments, as code."""
        args = [f"{self.name!r}", f"{str(self.span)!r}"]
        args += [f"{k}={literal(v)}" for k, v in self.config.items()]
        if self.backend:
            args.append("backend=backend")
        return f"_mem.{self.runtime}", args

    def write(self, scope: Any) -> tuple[str, list[str]] | None:
        """The memory's write (its value lands in the env), a call and its arguments as code;
        None for a memory that is not written."""
        return None

    def read(self, scope: Any, q: Ten, span: Any) -> Ten:
        raise unsupported(f"reading memory `{self.name}` like a function", span)

    def read_start(self, scope: Any, q: Ten, span: Any) -> Ten:
        """A read above the declaration: the memory at the start of the chunk."""
        raise unsupported_read_start(self.name, span)

    def settle(self, scope: Any, keys: Ten) -> str:
        """The code that runs a memory nothing reads after its writes, for its state: a read of
        its keys, discarded."""
        return self.read(scope, keys, self.span).code

    def reader(self, q: Ten, span: Any, width: int, out: int) -> Ten:
        """The Ten of a read M(q): this memory's `read` of q, which has `width` features."""
        if q.feat != width:
            raise NestError(f"memory `{self.name}` reads {width} features, got {q.feat}",
                            span, kind="shape")
        return Ten(f"self.{self.attr}.read({q.code}, _env)", out)

    def signal(self, scope: Any, name: str, default: Any) -> str | None:
        """A rule's lr, retain or beta as code: a constant, or a tensor of one value per token
        or per head (the runtime expands either to [B, T, H])."""
        e = self.rule_kw.get(name)
        if e is None and default is None:
            return None
        value = default if e is None else scope.value(e, self.name)
        heads = self.heads
        if not isinstance(value, Ten):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                assert e is not None
                raise NestError(f"`{name}` of memory `{self.name}` is a number or a tensor, "
                                f"got {value!r}", e.span, kind="type")
            c = float(value)
            low = c >= 0 if name == "beta" else c > 0  # beta 0: no momentum
            if name in ("retain", "beta") and not (low and c <= 1):
                where = "[0, 1]" if name == "beta" else "(0, 1]"
                raise NestError(f"`{name}` of memory `{self.name}` is in {where}, got {c}",
                                e.span if e is not None else self.span, kind="value")
            return literal(c)
        if value.feat not in (1, heads):
            raise NestError(f"`{name}` of memory `{self.name}` has {value.feat} features; it "
                            f"is one per head ({heads}) or one per token",
                            e.span if e is not None else self.span, kind="shape")
        return value.code


def unsupported_read_start(name: str, span: Any) -> NestError:
    return unsupported(f"reading memory `{name}` above its declaration (built for memories "
                       "with weights: they read the state of the chunk's start)", span)


def _note_start_read(plan: Any, q: Ten, span: Any, width: int) -> None:
    """A read above plan's declaration, of `width` features per head: its heads are not
    known before its keys, so every such read must agree, and the keys with them."""
    if q.feat % width or (not plan.per_head and q.feat != width):
        raise NestError(f"memory `{plan.name}` reads {width} features"
                        f"{' per head' if plan.per_head else ''}, got {q.feat}", span,
                        kind="shape")
    if plan.start_read is None:
        plan.start_read = (q.feat, span)
    elif plan.start_read[0] != q.feat:
        raise NestError(f"memory `{plan.name}` is read with {q.feat} features here and "
                        f"{plan.start_read[0]} above", span, kind="shape")
    plan.config["starts"] = True


def _check_start_width(plan: Any, k: Ten) -> None:
    """At the write: the keys' width against that of the reads above the declaration."""
    if plan.start_read is not None and plan.start_read[0] != k.feat:
        raise NestError(f"memory `{plan.name}` is read above its declaration with "
                        f"{plan.start_read[0]} features, but its keys have {k.feat}",
                        plan.start_read[1], kind="shape")


def _constant(scope: Any, e: ast.Expr) -> float | None:
    """e's value when the hyperparameters fix it, else None."""
    value = const_eval(fold_numbers(e, scope.consts, scope.shadowing()), scope.consts)
    return None if value is UNKNOWN or isinstance(value, bool) or \
        not isinstance(value, (int, float)) else float(value)


def _clauses(s: ast.StmtMemory, lets: dict[str, ast.Expr] | None = None
             ) -> tuple[dict[str, ast.Expr], dict[str, str]]:
    """The memory's clauses and choices; its `let`s go into `lets` where one is given."""
    exprs: dict[str, ast.Expr] = {}
    choices = {k: d for k, (d, _) in CHOICES.items()}
    for c in s.body:
        if isinstance(c, ast.StmtLet) and lets is not None:
            lets[c.name] = c.value
            continue
        if not isinstance(c, ast.Clause):
            raise unsupported("statements inside this kind of memory", c.span)
        if isinstance(c.value, str):
            choices[c.kind] = c.value
        else:
            exprs[c.kind] = c.value
    return exprs, choices


def _call(e: ast.Expr | None) -> tuple[str, ast.ExprCall] | None:
    if isinstance(e, ast.ExprCall) and isinstance(e.func, ast.ExprName):
        return e.func.name, e
    if isinstance(e, ast.ExprName):
        return e.name, ast.ExprCall(e, (), (), e.span)
    return None


def _mlp_structure(scope: Any, s: ast.StmtMemory, two_layers: str = ""
                   ) -> tuple[int, int, bool, str, int]:
    """(d, hidden, residual, act, depth) of `mlp(d, hidden = d, depth = 2, act = "gelu")` or
    `residual_mlp(d, hidden = d, act = "silu")`; `two_layers` names what must have depth 2."""
    structure = _call(s.structure)
    assert structure is not None
    kind, call = structure
    d = scope.size(call.args[0], "an MLP's width")
    hidden = scope.size_kw(call, "hidden", d, "an MLP's hidden width")
    residual = kind == "residual_mlp"
    act = {k.name: scope.const(k.value) for k in call.kwargs}.get(
        "act", "silu" if residual else "gelu")
    if act not in ACTS:
        raise NestError(f"activation {act!r} is not one of {', '.join(ACTS)}", call.span,
                        kind="value")
    depth = 2 if residual else scope.size_kw(call, "depth", 2, "an MLP's depth")
    if two_layers and depth != 2:
        raise unsupported(f"{two_layers} of depth other than 2", call.span)
    return d, hidden, residual, act, depth


def _objective(s: ast.StmtMemory, exprs: dict[str, ast.Expr], what: str,
               allowed: tuple[str, ...] = ("l2", "dot")) -> tuple[str, ast.Expr, ast.Expr]:
    """(l2 | dot | huber, key, value) of `objective l2(M(key), value)`, `dot(...)` or
    `huber(...)` (those in `allowed`)."""
    objective = _call(exprs.get("objective"))
    if objective is None or objective[0] not in allowed:
        names = " or ".join(f"{a}(...)" for a in allowed)
        raise unsupported(f"{what} whose objective is not {names}", s.span)
    pred, target = objective[1].args
    read = _call(pred)
    if read is None or read[0] != s.name or len(read[1].args) != 1:
        raise NestError(f"the objective of `{s.name}` compares {s.name}(key) with a value",
                        pred.span, kind="value")
    return objective[0], read[1].args[0], target


def _huber_delta(scope: Any, s: ast.StmtMemory, exprs: dict[str, ast.Expr]) -> float:
    """The `delta` of a huber objective (1 where it names none): a positive number."""
    call = _call(exprs["objective"])
    assert call is not None
    e = {k.name: k.value for k in call[1].kwargs}.get("delta")
    delta = 1.0 if e is None else scope.number(e, "the huber `delta`")
    if not delta > 0:
        raise NestError(f"the huber `delta` of memory `{s.name}` must be positive, got {delta}",
                        e.span if e is not None else s.span, kind="value")
    return delta


def _clip(scope: Any, plan: Any) -> float | None:
    """The `clip` of a memory's rule (None where it names none): a positive number."""
    e = plan.rule_kw.get("clip")
    if e is None:
        return None
    clip = scope.number(e, f"`clip` of memory `{plan.name}`")
    if not clip > 0:
        raise NestError(f"`clip` of memory `{plan.name}` must be positive, got {clip}", e.span,
                        kind="value")
    return clip


def _is_task(s: ast.StmtMemory) -> bool:
    objective = _call(_clauses(s, {})[0].get("objective"))
    return objective is not None and objective[0] == "task"


class CachePlan(Plan):
    """Softmax attention's memory: every token's key and value, kept (PAPER.md sec. 2)."""

    runtime = "CacheMemory"

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__(s)
        exprs, choices = _clauses(s)
        freq = s.frequency
        if freq is not None and (freq.unit != "token" or freq.every is not None
                                 or freq.chunk is not None):
            raise unsupported("a cache written other than `every token`", freq.span)
        if any(choices[k] != default for k, (default, _) in CHOICES.items()):
            raise unsupported("choices on a cache (it is read before nothing, per sample)",
                              s.span)
        if "key" not in exprs or "value" not in exprs:
            raise NestError(f"cache `{s.name}` needs `key` and `value` clauses", s.span,
                            kind="value")
        self.key = scope.tensor(exprs["key"], s.name)
        self.value = scope.tensor(exprs["value"], s.name)
        self.backend = True
        self.windows: list[int | None] = []  # of the attention that reads it

    def keep(self) -> int | None:
        """The keys a later call needs: the last window - 1, when every read has a window."""
        if not self.windows or None in self.windows:
            return None
        return max(w for w in self.windows if w) - 1

    def construct(self) -> tuple[str, list[str]]:
        self.config["keep"] = self.keep()
        return super().construct()

    def write(self, scope: Any) -> tuple[str, list[str]] | None:
        return "", [self.key.code, self.value.code]  # a tuple

    def describe(self) -> str:
        text = "softmax attention's key/value cache, read by scaled_dot_product_attention"
        windows = sorted({w for w in self.windows if w})
        if windows:
            reach = [f"the last {w} tokens" for w in windows]
            if None in self.windows:
                reach.insert(0, "every token so far")
            text += f" over {' and over '.join(reach)}"
        keep = self.keep()
        if keep is not None:
            text += f"; keeps the last {keep} keys for the next call"
        return text


class StaticPlan(Plan):
    """An MLP memory that never updates in context: its weights are the outer level's."""

    runtime = "StaticMLP"

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__(s)
        d, hidden, residual, act, depth = _mlp_structure(scope, s)
        if s.per_head:
            raise unsupported("a per-head MLP that never updates", s.span)
        init = _call(s.init)
        if init is not None and init[0] != "meta":
            raise unsupported("an initial state other than `meta` for a static MLP", s.span)
        self.config = {"d": d, "hidden": hidden, "residual": residual, "act": act,
                       "depth": depth}
        self.feat = d

    def read(self, scope: Any, q: Ten, span: Any) -> Ten:
        return self.reader(q, span, self.feat, self.feat)

    def read_start(self, scope: Any, q: Ten, span: Any) -> Ten:
        """A read above the declaration is its read: the weights it never changes in context."""
        return self.read(scope, q, span)

    def describe(self) -> str:
        c = self.config
        return (f"{'residual ' if c['residual'] else ''}MLP {_widths(c)} of depth {c['depth']}"
                ", trained by the outer level only")


def _widths(c: dict[str, Any]) -> str:
    return f"{c['d']} -> {c['hidden']} -> {c['d']}"


RECURRENCES = {"delta_rule": "the delta rule", "gated_delta_rule": "the gated delta rule",
               "linear_attention": "linear attention"}


class LinearPlan(Plan):
    """A matrix memory per head, S: [B, H, a, b], read as M(x) = x S (x: [.., a])."""

    runtime = "LinearMemory"

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__(s)
        self.backend = True
        structure = _call(s.structure)
        assert structure is not None
        _, call = structure
        self.a, self.b = (scope.size(x, "a matrix memory's size") for x in call.args)
        exprs, choices = _clauses(s)
        freq = s.frequency
        if _is_task(s):  # (plan() sends those that learn every N tokens on their own here)
            raise unsupported("a matrix memory that learns from the task loss (`objective "
                              "task`: built for MLP memories)", s.span)
        if freq is None or freq.unit != "token" or freq.every is not None:
            raise unsupported("a matrix memory that never learns in context (`never`)", s.span)
        chunk = scope.size(freq.chunk, "a chunk") if freq.chunk is not None else 64
        objective, self.key_expr, self.value_expr = _objective(
            s, exprs, "a matrix memory", ("l2", "dot", "huber"))
        delta = _huber_delta(scope, s, exprs)
        rule = _call(exprs.get("rule"))
        if rule is None or rule[0] not in ("gd", "dgd", "momentum"):
            raise unsupported("a matrix memory whose rule is not gd, dgd or momentum", s.span)
        self.rule_kw = {k.name: k.value for k in rule[1].kwargs}
        # Titans' momentum on the gradient term: `momentum`, or `dgd` with `beta` (a constant
        # beta of 0 is none: `momentum` is then `gd`)
        momentum = rule[0] == "momentum" or "beta" in self.rule_kw
        if rule[0] == "momentum" and "beta" not in self.rule_kw:
            raise NestError(f"the momentum rule of `{s.name}` needs `beta`", rule[1].span,
                            kind="value")
        if momentum and _constant(scope, self.rule_kw["beta"]) == 0:
            momentum = False
        clip = _clip(scope, self)
        literal_dgd = rule[0] == "dgd" and choices["dgd"] == "literal"
        if literal_dgd and objective == "dot":
            raise unsupported("literal DGD with a dot objective", s.span)
        init = _call(s.init)
        init_name = init[0] if init else "zeros"
        if init_name not in ("zeros", "meta"):
            raise unsupported(f"initial state `{init_name}` for a matrix memory", s.span)
        shared = choices["state"] == "shared"
        for name in ("retain", "beta") if shared else ():
            e = self.rule_kw.get(name)
            if e is not None and _constant(scope, e) is None:
                raise unsupported(f"a `{name}` that changes with the data on a memory shared "
                                  "by the batch (its one state takes one per token)", e.span)
        self.config = {"a": self.a, "b": self.b, "heads": 0, "chunk": chunk,
                       "objective": objective, "delta": delta, "clip": clip,
                       "rule": "gd" if rule[0] == "momentum" and not momentum else rule[0],
                       "gated": rule[0] == "dgd" and not literal_dgd, "recurrence": "",
                       "read_before": choices["read"] == "before write",
                       "stopped": choices["backprop"] == "stopped", "init": init_name,
                       "shared": shared, "starts": False,
                       "flush": choices["partial"] == "flush", "momentum": momentum}
        self.per_head, self.explicit_chunk = s.per_head, freq.chunk is not None
        self.start_read: tuple[int, Any] | None = None  # (width, where) of reads above it

    def write(self, scope: Any) -> tuple[str, list[str]] | None:
        k = scope.tensor(self.key_expr, self.name)
        v = scope.tensor(self.value_expr, self.name)
        if k.feat % self.a or v.feat % self.b or k.feat // self.a != v.feat // self.b:
            raise NestError(f"memory `{self.name}` is matrix({self.a}, {self.b}) per head, but "
                            f"its keys have {k.feat} features and its values {v.feat}",
                            self.span, kind="shape")
        self.heads = self.config["heads"] = k.feat // self.a
        self.keys = k  # (a read with them runs the memory when nothing else reads it)
        _check_start_width(self, k)
        args = [k.code, v.code, f"lr={self.signal(scope, 'lr', 1.0)}"]
        retain = self.signal(scope, "retain", None)
        if retain is not None:
            args.append(f"retain={retain}")
        c = self.config
        if c["momentum"]:
            args.append(f"beta={self.signal(scope, 'beta', None)}")
        c["recurrence"] = recurrence(c["objective"], c["rule"], c["gated"], retain is not None,
                                     c["clip"] is not None, c["momentum"])
        return f"self.{self.attr}.write", args

    def read(self, scope: Any, q: Ten, span: Any) -> Ten:
        return self.reader(q, span, self.heads * self.a, self.heads * self.b)

    def read_start(self, scope: Any, q: Ten, span: Any) -> Ten:
        """q S at the state of the chunk's start (its heads come with its keys: checked at
        the write). The chunk is then part of what it computes, so it must be written."""
        if not self.explicit_chunk:
            raise NestError(f"memory `{self.name}` is read above its declaration, at the start "
                            "of its chunk, but has no chunk size", span, kind="frequency",
                            hint="write `every token in chunks of C`: C tokens read one state")
        _note_start_read(self, q, span, self.a)
        return Ten(f"self.{self.attr}.read_start({q.code}, _env)", q.feat // self.a * self.b)

    def describe(self) -> str:
        c = self.config
        rec = c["recurrence"]
        kernels = "" if rec == "linear_attention" or c["shared"] else \
            "; Triton kernels with backend='triton'"
        shared = "; one state for the batch, written by every sequence's token at once" \
            if c["shared"] else ""
        starts = ("; read above its declaration at each chunk's first state (the block runs "
                  "in pieces that end at its chunks)") if c["starts"] else ""
        if rec == "token_loop":
            why = "momentum" if c["momentum"] else "huber" if c["objective"] == "huber" \
                else "clip on l2"
            return (f"the token loop on every tier ({why}: no chunk-parallel form), "
                    f"{c['heads']} heads of {c['a']} x {c['b']}{shared}{starts}")
        shared += " (the chunked op, B tokens a step)" if c["shared"] else ""
        # literal DGD runs the gated delta rule's op with its lr and values rescaled
        literal_dgd = " for literal dgd (lr and values rescaled)" \
            if c["rule"] == "dgd" and not c["gated"] else ""
        return (f"{RECURRENCES[rec]} (nestc.ops.{rec}){literal_dgd}, {c['heads']} heads of "
                f"{c['a']} x {c['b']}, in chunks of {c['chunk']}{kernels}{shared}{starts}")


def recurrence(objective: str, rule: str, gated: bool, retain: bool, clip: bool = False,
               momentum: bool = False) -> str:
    """Instruction selection for a matrix memory: the recurrence (an op of nestc.ops) that
    its objective and rule amount to, token for token (docs/semantics.md, "Chunks"). `dot`
    is linear attention (retention its decay); `l2` with `gd` and no retention, or with gated
    `dgd` and none, the delta rule; any other `l2` memory the gated delta rule (the runtime
    rescales lr and values for `gd` with retention and for literal `dgd`). A `huber`
    objective, or a `clip` on `l2`, makes each token's update a non-linear function of the
    state, which no chunk-parallel form computes exactly: the token loop (the reference
    tier's). (With `dot` a gradient -k v^T does not depend on the state: clip scales lr.)
    Momentum makes the state a pair, which no op here computes: the token loop too."""
    if momentum or objective == "huber" or (clip and objective != "dot"):
        return "token_loop"
    if objective == "dot":
        return "linear_attention"
    if not retain and (rule == "gd" or gated):
        return "delta_rule"
    return "gated_delta_rule"


FUSED_CHUNKS = (16, 32, 64)  # nestc.ops.mlp_memory.triton.CHUNKS (without importing triton)
MIN_KERNEL_CLIP = 1e-18  # nestc.ops.mlp_memory.MIN_KERNEL_CLIP (without importing torch)


class MLPPlan(Plan):
    """A 2-layer MLP per head learning in context (Titans), its values given or generated by
    the memory itself (a self-generated target)."""

    runtime = "MLPMemory"

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__(s)
        self.backend = True
        self.d, hidden, residual, act, _ = _mlp_structure(scope, s,
                                                          "an in-context MLP memory")
        self.lets: dict[str, ast.Expr] = {}
        exprs, choices = _clauses(s, self.lets)
        assert s.frequency is not None
        chunk = scope.size(s.frequency.chunk, "a chunk") if s.frequency.chunk else 1
        objective, self.key_expr, self.value_expr = _objective(
            s, exprs, "an MLP memory", ("l2", "dot", "huber"))
        delta = _huber_delta(scope, s, exprs)
        rule = _call(exprs.get("rule"))
        if rule is None or rule[0] not in ("gd", "dgd", "momentum"):
            raise unsupported("an MLP memory whose rule is not gd, dgd or momentum", s.span)
        self.rule_kw = {k.name: k.value for k in rule[1].kwargs}
        self.rule = rule[0]
        shared = choices["state"] == "shared"
        literal = rule[0] == "dgd" and choices["dgd"] == "literal"
        if literal and shared:
            raise unsupported("literal DGD for an MLP memory shared by the batch", s.span)
        for name in ("retain", "beta"):
            e = self.rule_kw.get(name)
            if shared and e is not None and _constant(scope, e) is None:
                raise unsupported(f"a `{name}` that changes with the data on a memory shared "
                                  "by the batch (its one state takes one per token)", e.span)
        init = _call(s.init)
        if init is None or init[0] != "meta":
            raise unsupported("an in-context MLP memory whose initial state is not `meta`",
                              s.span)
        self.per_head = s.per_head
        self.value_key: Any = None  # equal for values generated alike; None: given values
        self.group: list[str] = []  # the memories it runs as one with (run_siblings_as_one)
        self.config = {"d": self.d, "hidden": hidden, "heads": 0, "residual": residual,
                       "act": act, "read_before": choices["read"] == "before write",
                       "stopped": choices["backprop"] == "stopped", "chunk": chunk,
                       "objective": objective, "delta": delta,
                       # dgd(beta = ...): Titans' momentum on the gradient term
                       "momentum": rule[0] == "momentum" or "beta" in self.rule_kw,
                       "literal": literal, "clip": None,
                       "signals": (),
                       "generated": False, "has_source": False,
                       "flush": choices["partial"] == "flush", "starts": False,
                       "shared": shared}
        self.start_read: tuple[int, Any] | None = None  # (width, where) of reads above it

    def write(self, scope: Any) -> tuple[str, list[str]] | None:
        if self._reads_self(self.key_expr):
            raise unsupported(f"a key that reads memory `{self.name}` itself",
                              self.key_expr.span)
        if self._reads_self(self.key_expr, lets=True):  # names the memory's own `let`s
            code, feat, _ = _SelfExpr(self, scope, whole=True).compile(self.key_expr)
            k = Ten(code, feat)
        else:
            k = scope.tensor(self.key_expr, self.name)
        self.heads = k.feat // self.d
        # a value that reads this memory (a self-generated target) is computed per chunk, at
        # the chunk's first weights; any other value once, from the whole sequence
        # (and one that names the memory's own `let`s, which only _SelfExpr resolves)
        generated = self._reads_self(self.value_expr, lets=True)
        if generated:
            self_expr = _SelfExpr(self, scope, whole=False)
            code, feat, self.value_key = self_expr.compile(self.value_expr)
            v = Ten(code, feat)
        else:
            v = scope.tensor(self.value_expr, self.name)
        if k.feat % self.d or v.feat != k.feat or (not self.per_head and k.feat != self.d):
            raise NestError(f"memory `{self.name}` maps {self.d} features"
                            f"{' per head' if self.per_head else ''}, but its keys have "
                            f"{k.feat} and its values {v.feat}", self.span, kind="shape")
        H, d, c = self.heads, self.d, self.config
        c["heads"] = H
        self.keys = k  # (a read with them runs the memory when nothing else reads it)
        _check_start_width(self, k)
        signals = {n: self.signal(scope, n, default)
                   for n, default in (("lr", 1.0), ("retain", None), ("beta", None))}
        c["clip"] = _clip(scope, self)
        if c["momentum"] and signals["beta"] is None:
            raise NestError(f"the momentum rule of `{self.name}` needs `beta`", self.span,
                            kind="value")
        if c["momentum"] and _constant(scope, self.rule_kw["beta"]) == 0:
            c["momentum"], signals["beta"] = False, None  # S_t = u_t: no momentum
        c["signals"] = tuple(n for n, f in signals.items() if f is not None)
        args = [k.code]
        if generated:
            # the values of tokens _a.._b-1 with the memory read by `_read`; `_tile`
            # evaluates them for `_tile` memories at once (nestc.memories._Siblings)
            fn = scope.fresh(f"{self.attr}_value")
            scope.emit(f"def {fn}(_read, _a, _b, _tile=1):")
            scope.emit(f"    return {v.code}")
            args.append(f"value={fn}")
            c["generated"] = True
            # stop_grad(M(x)) of a block tensor x as wide as the memory: the triton tier's
            # kernel generates those values itself from x
            if self_expr.source is not None and self_expr.source.feat == H * d:
                args.append(f"vs={self_expr.source.code}")
                c["has_source"] = True
        else:
            args.append(f"v={v.code}")
        args += [f"{n}={f}" for n, f in signals.items() if f is not None]
        return f"self.{self.attr}.write", args

    def read(self, scope: Any, q: Ten, span: Any) -> Ten:
        return self.reader(q, span, self.heads * self.d, self.heads * self.d)

    def read_start(self, scope: Any, q: Ten, span: Any) -> Ten:
        """M(q) at the weights of the chunk's start: its heads are not known yet (its keys
        give them), so the width is checked against its keys at the write."""
        _note_start_read(self, q, span, self.d)
        return Ten(f"self.{self.attr}.read_start({q.code}, _env)", q.feat)

    def settle(self, scope: Any, keys: Ten) -> str:
        return f"self.{self.attr}.settle(_env)"  # the state alone, no read computed

    def describe(self) -> str:
        c = self.config
        rule = "momentum with beta 0 (gd)" if self.rule == "momentum" and not c["momentum"] \
            else "literal dgd" if c["literal"] else self.rule
        if self.rule == "dgd" and c["momentum"]:
            rule += " with momentum"
        # what MLPMemory._fusable asks of the memory itself (dtypes aside)
        fused = c["objective"] == "l2" and c["act"] in ("gelu", "silu") and not c["literal"] \
            and not c["shared"] and c["chunk"] in FUSED_CHUNKS \
            and (c["clip"] is None or c["clip"] >= MIN_KERNEL_CLIP)
        kernel = "; a fused Triton kernel with backend='triton' (where its sizes fit the " \
            "GPU)" if fused else ""
        op = "nestc.ops.mlp_memory.dgd: a triangular solve per chunk and layer" \
            if c["literal"] else "nestc.ops.mlp_memory"
        text = (f"{'residual ' if c['residual'] else ''}MLP {_widths(c)} per head "
                f"({c['heads']} heads) learning by {rule} on {c['objective']}, every gradient "
                f"of a chunk of {c['chunk']} at its first weights ({op}{kernel})")
        if c["generated"]:
            text += "; values it generates itself"
        if c["starts"]:
            text += "; read above its declaration at each chunk's first weights (the block " \
                "runs in pieces that end at its chunks)"
        if c["shared"]:
            text += "; one set of weights for the batch, written by every sequence's token " \
                "at once"
        if self.group:
            text += f"; runs as one with {', '.join(self.group)} (heads stacked)"
        return text

    def sibling_key(self) -> tuple[Any, ...]:
        """What memories must share to run as one: all but their weights, state and the
        tensors they are written and read with (the runtime checks its own key again)."""
        return tuple(v for k, v in self.config.items() if k != "has_source")

    def _reads_self(self, e: ast.Expr, lets: bool = False) -> bool:
        """Whether `e` reads this memory (or, with `lets`, names one of its `let`s)."""
        if isinstance(e, ast.ExprName) and e.name in self.lets:
            return lets or self._reads_self(self.lets[e.name])
        if isinstance(e, ast.ExprCall):
            if isinstance(e.func, ast.ExprName) and e.func.name == self.name:
                return True
            return any(self._reads_self(a, lets) for a in e.args)
        if isinstance(e, ast.ExprBinary):
            return self._reads_self(e.left, lets) or self._reads_self(e.right, lets)
        if isinstance(e, ast.ExprUnary):
            return self._reads_self(e.operand, lets)
        return False


class _SelfExpr:
    """The code of a memory's `let`s and value: the block's tensors (with `whole` off, sliced
    to the tokens _a.._b-1 and tiled `_tile` times along the features), reads of the memory
    itself through `_read`, element-wise math and arithmetic. Each expression also gets a key,
    equal for expressions that compute the same from the same tensors, whichever memory
    reads; and `source` is x when the expression is stop_grad(M(x)) of a block tensor x."""

    def __init__(self, mem: MLPPlan, scope: Any, whole: bool) -> None:
        self.mem, self.scope, self.whole = mem, scope, whole
        self.source: Ten | None = None

    def compile(self, e: ast.Expr) -> tuple[str, int, Any]:
        self.source = self._source(e)
        return self._compile(e)

    def _source(self, e: ast.Expr) -> Ten | None:
        def arg(call: ast.Expr, name: str) -> ast.Expr | None:
            while isinstance(call, ast.ExprName) and call.name in self.mem.lets:
                call = self.mem.lets[call.name]
            ok = isinstance(call, ast.ExprCall) and isinstance(call.func, ast.ExprName) and \
                call.func.name == name and len(call.args) == 1 and not call.kwargs
            return call.args[0] if ok else None  # type: ignore[union-attr]

        read = arg(e, "stop_grad")
        x = None if read is None else arg(read, self.mem.name)
        while isinstance(x, ast.ExprName) and x.name in self.mem.lets:
            x = self.mem.lets[x.name]
        return self.scope.tens.get(x.name) if isinstance(x, ast.ExprName) else None

    def _compile(self, e: ast.Expr) -> tuple[str, int, Any]:
        mem, scope = self.mem, self.scope
        if isinstance(e, ast.ExprName) and e.name in mem.lets:
            return self._compile(mem.lets[e.name])
        if isinstance(e, ast.ExprName) and e.name in scope.tens:
            t = scope.tens[e.name]
            if self.whole:
                return t.code, t.feat, ("tensor", id(t))
            # one feature that is not the memory's whole width broadcasts: not tiled
            tiled = t.feat != 1 or mem.heads * mem.d == 1
            code = f"{t.code}[:, _a:_b]"
            return (f"_mem.tiled({code}, _tile)" if tiled else code), t.feat, ("tensor", id(t))
        if isinstance(e, ast.ExprCall) and isinstance(e.func, ast.ExprName):
            if len(e.args) != 1 or e.kwargs:
                raise unsupported(f"`{e.func.name}(...)` inside a memory", e.span)
            code, feat, key = self._compile(e.args[0])
            if e.func.name == mem.name:
                return f"_read({code})", feat, ("read", key)
            fn = MATH.get(e.func.name)
            if fn is None:
                raise unsupported(f"`{e.func.name}` inside a memory", e.span)
            return f"{fn}({code})", feat, (e.func.name, key)
        if isinstance(e, ast.ExprBinary) and e.op in "+-*/":
            sides, feats, keys = [], [], []
            for x in (e.left, e.right):
                c = const_eval(x, scope.consts)
                if c is not UNKNOWN:
                    sides.append(operand(c))
                    keys.append(("constant", c))
                    continue
                code, feat, key = self._compile(x)
                sides.append(code)
                feats.append(feat)
                keys.append(key)
            if not feats:
                raise unsupported("arithmetic of constants alone inside a memory (compute it "
                                  "outside, in the block)", e.span)
            return f"({sides[0]} {e.op} {sides[1]})", max(feats), (e.op, *keys)
        raise unsupported("this expression inside a memory", e.span)


class TaskPlan(Plan):
    """A CMS level: an MLP updated every C tokens by gd on the task loss (PAPER.md sec. 4)."""

    runtime = "TaskMLP"

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__(s)
        assert s.frequency is not None
        d, hidden, residual, act, _ = _mlp_structure(
            scope, s, "an MLP memory learning from the task loss")
        if s.per_head:
            raise unsupported("a per-head MLP memory learning from the task loss", s.span)
        chunk = scope.size(s.frequency.every, "a period") if s.frequency.every is not None \
            else 1
        if s.frequency.chunk is not None:
            raise unsupported("`in chunks of` on a memory updated every N tokens", s.span)
        exprs, choices = _clauses(s)
        rule = _call(exprs.get("rule"))
        if rule is None or rule[0] != "gd":
            raise unsupported("a task-loss memory whose rule is not gd", s.span)
        kwr = {k.name: k.value for k in rule[1].kwargs}
        if "clip" in kwr:
            raise unsupported("`clip` on a memory learning from the task loss", s.span)
        rates = {n: scope.number(kwr[n], f"`{n}` of memory `{s.name}`") if n in kwr else 1.0
                 for n in ("lr", "retain")}
        self.structure = (d, hidden, residual, act)
        self.chunk = chunk
        self.config = {"d": d, "hidden": hidden, "residual": residual, "act": act,
                       "chunk": chunk, "stopped": choices["backprop"] == "stopped",
                       "lr": rates["lr"], "retain": rates["retain"],
                       "shared": choices["state"] == "shared",
                       "flush": choices["partial"] == "flush", "parent": None, "nested": False}
        self.feat = d
        self.parent: TaskPlan | None = None
        # `= meta`, or `= f` for another task-loss memory f (the nested CMS): this memory
        # starts each of f's chunks from f's weights, so f learns its initial state
        init = _call(s.init)
        if s.init is not None and init is not None and init[0] != "meta":
            where = s.init.span
            parent = scope.mems.get(init[0])
            if not isinstance(parent, TaskPlan) or init[1].args or init[1].kwargs:
                raise unsupported("a task-loss memory whose initial state is not `meta` or "
                                  "another task-loss memory", where)
            if parent.structure != self.structure:
                raise NestError(f"memory `{self.name}` starts from `{parent.name}`, which has "
                                "another structure: both must be the same MLP", where,
                                kind="shape")
            if self.config["shared"] and not parent.config["shared"]:
                raise NestError(f"memory `{self.name}` is shared by the batch but starts from "
                                f"`{parent.name}`, which is per sample", where, kind="shape",
                                hint=f"add `state shared` to `{parent.name}`, or remove it "
                                f"from `{self.name}`")
            if self.config["flush"] != parent.config["flush"]:
                word = "flush" if self.config["flush"] else "carry"
                raise NestError(f"memory `{self.name}` has `partial chunk {word}` but starts "
                                f"from `{parent.name}`, which does not: a nested level ends its "
                                "calls as its parent does", where, kind="frequency",
                                hint=f"write `partial chunk {word}` in both")
            if parent.chunk % self.chunk:
                raise NestError(f"memory `{self.name}` is reset to `{parent.name}` every "
                                f"{parent.chunk} tokens, which is not a whole number of its "
                                f"chunks of {self.chunk}", where, kind="frequency",
                                hint=f"make {parent.chunk} a multiple of {self.chunk}")
            self.parent = parent
            parent.config["nested"] = True

    def construct(self) -> tuple[str, list[str]]:
        if self.parent is not None:  # its name is known once both are added
            self.config["parent"] = self.parent.attr
        return super().construct()

    def read(self, scope: Any, q: Ten, span: Any) -> Ten:
        return self.reader(q, span, self.feat, self.feat)

    def read_start(self, scope: Any, q: Ten, span: Any) -> Ten:
        """A read above the declaration is its read: the weights of its chunk, which change
        only at the chunk's end."""
        return self.read(scope, q, span)

    def describe(self) -> str:
        c = self.config
        text = (f"{'residual ' if c['residual'] else ''}MLP {_widths(c)} learning from the "
                f"task loss: gd every {c['chunk']} tokens, run chunk by chunk by the module's "
                "forward")
        if c["shared"]:
            text += "; one set of weights for the batch"
        if self.parent is not None:
            text += f"; starts each of {self.parent.attr}'s chunks from its weights"
        return text


class PeriodicPlan(Plan):
    """A matrix or MLP memory with its own objective that learns once every N tokens: the
    gradients of a period's tokens summed at its weights, the rule applied at its end."""

    runtime = "PeriodicMemory"

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__(s)
        self.backend = True
        assert s.frequency is not None and s.frequency.every is not None
        kind, call = _call(s.structure) or ("", None)
        assert call is not None
        what = "a memory updated every N tokens"
        if kind == "matrix":
            self.a, self.b = (scope.size(x, "a matrix memory's size") for x in call.args)
            hidden, act = 0, "gelu"
        else:
            self.a, hidden, _, act, _ = _mlp_structure(scope, s, f"an MLP as {what}")
            self.b = self.a
        self.kind, self.per_head = kind, s.per_head or kind == "matrix"
        period = scope.size(s.frequency.every, "a period")
        if s.frequency.chunk is not None:
            raise unsupported(f"`in chunks of` on {what} (it runs period by period)", s.span)
        exprs, choices = _clauses(s)
        objective, self.key_expr, self.value_expr = _objective(
            s, exprs, what, ("l2", "dot", "huber"))
        delta = _huber_delta(scope, s, exprs)
        rule = _call(exprs.get("rule"))
        if rule is None or rule[0] not in ("gd", "momentum"):
            raise unsupported(f"{what} whose rule is not gd or momentum", s.span)
        self.rule = rule[0]
        self.rule_kw = {k.name: k.value for k in rule[1].kwargs}
        if self.rule == "momentum" and "beta" not in self.rule_kw:
            raise NestError(f"the momentum rule of `{self.name}` needs `beta`", s.span,
                            kind="value")
        for n in ("retain", "beta"):
            e = self.rule_kw.get(n)
            if choices["state"] == "shared" and e is not None and _constant(scope, e) is None:
                raise unsupported(f"a `{n}` that changes with the data on a memory shared by "
                                  "the batch (its one state takes one per token)", e.span)
        init = _call(s.init)
        init_name = init[0] if init else "zeros"
        if init_name not in (("zeros", "meta") if kind == "matrix" else ("meta",)):
            raise unsupported(f"initial state `{init_name}` for {what}", s.span)
        self.config = {"kind": kind, "a": self.a, "b": self.b, "hidden": hidden, "heads": 0,
                       "act": act, "period": period, "objective": objective, "delta": delta,
                       "clip": _clip(scope, self), "momentum": self.rule == "momentum",
                       "read_before": choices["read"] == "before write",
                       "stopped": choices["backprop"] == "stopped",
                       "shared": choices["state"] == "shared",
                       "flush": choices["partial"] == "flush", "init": init_name,
                       "starts": False}
        self.start_read: tuple[int, Any] | None = None  # (width, where) of reads above it

    def write(self, scope: Any) -> tuple[str, list[str]] | None:
        k = scope.tensor(self.key_expr, self.name)
        v = scope.tensor(self.value_expr, self.name)
        heads = k.feat // self.a if k.feat % self.a == 0 else 0
        if not heads or v.feat != heads * self.b or (not self.per_head and heads != 1):
            raise NestError(f"memory `{self.name}` maps {self.a} features to {self.b}"
                            f"{' per head' if self.per_head else ''}, but its keys have "
                            f"{k.feat} and its values {v.feat}", self.span, kind="shape")
        self.heads = self.config["heads"] = heads
        self.keys = k  # (a read with them runs the memory when nothing else reads it)
        _check_start_width(self, k)
        signals = {n: self.signal(scope, n, default) for n, default in
                   (("lr", 1.0), ("retain", None), ("beta", None))}
        if not self.config["momentum"]:
            signals["beta"] = None
        return f"self.{self.attr}.write", [k.code, v.code] + [
            f"{n}={code}" for n, code in signals.items() if code is not None]

    def read(self, scope: Any, q: Ten, span: Any) -> Ten:
        return self.reader(q, span, self.heads * self.a, self.heads * self.b)

    def read_start(self, scope: Any, q: Ten, span: Any) -> Ten:
        """M(q) at the weights of the period (they change only at its end)."""
        _note_start_read(self, q, span, self.a)
        return Ten(f"self.{self.attr}.read_start({q.code}, _env)", q.feat // self.a * self.b)

    def describe(self) -> str:
        c = self.config
        structure = (f"matrix {c['a']} x {c['b']}" if c["kind"] == "matrix" else
                     f"{'residual ' if c['kind'] == 'residual_mlp' else ''}MLP {c['a']} -> "
                     f"{c['hidden']} -> {c['a']}")
        heads = f" per head ({c['heads']} heads)" if self.per_head and c["heads"] > 1 else ""
        text = (f"{structure}{heads} learning by {self.rule} on "
                f"{c['objective']} once every {c['period']} tokens: the period's gradients "
                "summed at the weights its tokens read")
        if c["clip"] is not None:
            text += f", each token's scaled to norm at most {c['clip']:g}"
        if c["shared"]:
            text += "; one set of weights for the batch"
        return text
