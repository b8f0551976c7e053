"""The nest graph: a declaration's levels and signals, typed edges, and the paper's level order.

`build_graph` walks a checked declaration with its hyperparameters bound and returns a
`networkx.MultiDiGraph`:

- graph attributes: name, kind (optimizer/block/model), hyper (bound values), file.
- nodes: `kind` is "param", "memory" or "train" for levels, "input" or "signal" for data.
  Levels carry frequency, unit, period, chunk, level, parallel, after, span, label, objective,
  rule, init, structure, choices (memories), explicit (choices written in the spec), repeat.
- edges: `kind` is "flow", "read", "init", "generation" or "backprop", with an optional `label`.

Level order (PAPER.md sec. 1): token levels are faster than step levels; `never` memories are
trained by the outer level only, so they sit with the step levels; within a unit a smaller period
is faster. At equal frequency, B is slower than A when B's update at time t reads A's state at
time t (A was written earlier in the body and is read after its write); otherwise they are
parallel and share a level index.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from nestc import ast
from nestc.builtins import BUILTINS
from nestc.check import CHOICES, Checked, body_paths, bound_defaults, qualified_name
from nestc.hyper import UNKNOWN, const_eval
from nestc.source import Span, span_text

LEVEL_KINDS = ("param", "memory", "train")
DATA_KINDS = ("input", "signal")
EDGE_KINDS = ("flow", "read", "init", "generation", "backprop")
UNIT_RANK = {"token": 0, "step": 1, "never": 1}  # `never` memories learn only in the outer level
ATTENTION = "softmax_attention"
INIT_BUILTINS = {"zeros", "zeros_like", "ones_like", "meta", "identity"}


def frequency_text(unit: str, period: int | None) -> str:
    """`every token`, `every 16 tokens`, `every step`, `every 10 steps` or `never`."""
    if unit == "never":
        return "never"
    if period == 1:
        return f"every {unit}"
    return f"every {period if period is not None else '?'} {unit}s"


def frequency_key(attrs: dict[str, Any]) -> tuple[int, float]:
    """Sort key of a level's frequency class: fastest first."""
    if attrs["unit"] == "never":
        return (UNIT_RANK["never"], 1)
    period = attrs.get("period")
    return (UNIT_RANK[attrs["unit"]], period if period is not None else float("inf"))


def levels(graph: nx.MultiDiGraph) -> list[str]:
    """The level nodes of a nest graph, fastest first (by level index, then creation order)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = [n for n, d in graph.nodes(data=True) if d["kind"] in LEVEL_KINDS]
    return sorted(nodes, key=lambda n: (graph.nodes[n]["level"], order[n]))


# --- values: what an expression reads ---------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """The nodes an expression reads, each with the edge kind that carries it, and the levels
    whose state of this same time step it carries (a reader of it is slower than they are)."""

    refs: frozenset[tuple[str, str]] = frozenset()
    deps: frozenset[str] = frozenset()
    module: tuple[ast.Decl, ast.ExprCall, Frame] | None = None  # `Hope(dim)` before it is applied
    starts: frozenset[str] = frozenset()  # memories read above their declarations: at chunk start

    def __or__(self, other: Value) -> Value:
        return Value(self.refs | other.refs, self.deps | other.deps, self.module or other.module,
                     self.starts | other.starts)

    def as_kind(self, kind: str) -> Value:
        return replace(self, refs=frozenset((n, kind) for n, _ in self.refs))


NOTHING = Value()


def _union(values: list[Value]) -> Value:
    out = NOTHING
    for v in values:
        out = out | v
    return out


@dataclass
class Frame:
    """One declaration being walked: its hyperparameters, names, and where its nodes go."""

    decl: ast.Decl
    env: dict[str, Any]
    scope: ChainMap  # name -> ("node", id) | ("value", Value)
    decls: dict[str, ast.Decl]
    prefix: str = ""
    suffix: str = ""
    repeat: int | None = 1
    transparent: bool = False  # lets bind values instead of making nodes (an optimizer as a rule)
    inputs: list[Value] = field(default_factory=list)
    output: Value = NOTHING
    alias: str | None = None  # the level an optimizer-as-rule's `param` stands for
    # memories declared further down the bodies being walked, with the frame declaring them
    ahead: dict[str, tuple[ast.StmtMemory, Frame]] = field(default_factory=dict)

    def child(self, **changes: Any) -> Frame:
        return replace(self, scope=self.scope.new_child(), **changes)


# --- the walker -------------------------------------------------------------------------------


class _Builder:
    def __init__(self, program: Any, checked: Checked, hyper: dict[str, Any]) -> None:
        self.program = program
        self.top = checked
        self.values = checked.bind(hyper)
        requires = [" ".join(span_text(s.cond.span).split()) for s in checked.decl.body
                    if isinstance(s, ast.StmtRequire)]
        self.g = nx.MultiDiGraph(name=checked.name, kind=checked.kind, hyper=dict(self.values),
                                 requires=requires, file=checked.decl.span.file)
        self.written: set[str] = set()  # levels whose update at this time step already happened
        self.sig_deps: dict[str, frozenset[str]] = {}
        self.deps: dict[str, set[str]] = {}
        self.updates: dict[str, list[str]] = {}  # level -> its explicit update statements
        self.prefixes: set[str] = set()
        self.train: str | None = None
        self.rule_levels: set[str] = set()  # levels of an optimizer expanded as a rule
        self.keyless: set[str] = set()  # memories without a key: they learn from their inputs
        self.early: dict[int, str] = {}  # memories read above their declarations: their nodes

    # nodes and edges
    def node(self, nid: str, kind: str, frame: Frame, span: Span | None, **attrs: Any) -> str:
        if nid in self.g:
            return nid
        self.g.add_node(nid, kind=kind, label=nid, span=span, repeat=frame.repeat, **attrs)
        if kind in LEVEL_KINDS:
            self.deps[nid] = set()
        return nid

    def level(self, nid: str, kind: str, frame: Frame, span: Span | None, unit: str,
              period: int | None, chunk: int | None, **attrs: Any) -> str:
        attrs.setdefault("objective", None)
        attrs.setdefault("rule", None)
        attrs.setdefault("init", None)
        return self.node(nid, kind, frame, span, unit=unit, period=period, chunk=chunk,
                         frequency=frequency_text(unit, period), **attrs)

    def edge(self, u: str, v: str, kind: str, label: str | None = None) -> None:
        if u == v:
            return
        if kind == "generation":
            label = "gradient"
        for d in (self.g.get_edge_data(u, v) or {}).values():
            if d["kind"] == kind:
                if label and label not in (d.get("label") or "").split(", "):
                    d["label"] = f"{d['label']}, {label}" if d.get("label") else label
                return
        self.g.add_edge(u, v, kind=kind, label=label)

    def connect(self, value: Value, target: str, label: str | None = None) -> None:
        """Edges from what value reads into target; a level target records same-time deps."""
        for src, kind in sorted(value.refs):
            at = "at chunk start" if src in value.starts else None
            self.edge(src, target, kind, ", ".join(x for x in (label, at) if x) or None)
        if target in self.deps:
            self.deps[target] |= value.deps - {target}
        elif target in self.sig_deps:
            self.sig_deps[target] = self.sig_deps[target] | value.deps

    def is_level(self, nid: str) -> bool:
        return self.g.nodes[nid]["kind"] in LEVEL_KINDS

    def reference(self, nid: str) -> Value:
        attrs = self.g.nodes[nid]
        if attrs["kind"] in LEVEL_KINDS:
            before = (attrs.get("choices") or {}).get("read") == "before write"
            now = nid in self.written and not before
            return Value(frozenset({(nid, "read")}), frozenset({nid}) if now else frozenset())
        return Value(frozenset({(nid, "flow")}), self.sig_deps.get(nid, frozenset()))

    def fresh_prefix(self, base: str) -> str:
        """A call's prefix: the block's name, then `_1`, `_2`, ... as the generated module
        names its submodules (nestc.codegen.block._Scope.add), so that levels and state keys
        say the same."""
        name, n = base, 0
        while name in self.prefixes:
            n += 1
            name = f"{base}_{n}"
        self.prefixes.add(name)
        return name

    def fresh_id(self, base: str) -> str:
        nid, n = base, 1
        while nid in self.g:
            n += 1
            nid = f"{base}{n}"
        return nid

    # entry
    def build(self) -> nx.MultiDiGraph:
        d = self.top.decl
        frame = Frame(d, dict(self.values), ChainMap(), self.top.scope)
        self.body(d.body, frame)
        self.finish(frame)
        return self.g

    def body(self, stmts: tuple[ast.Stmt, ...], frame: Frame) -> None:
        later = {s.name: (s, frame) for s in stmts if isinstance(s, ast.StmtMemory)}
        if later:
            frame.ahead = {**frame.ahead, **later}
        for s in stmts:
            self.stmt(s, frame)
            if isinstance(s, ast.StmtMemory) and s.name in later:
                frame.ahead = {k: v for k, v in frame.ahead.items() if k != s.name}

    def stmt(self, s: ast.Stmt, frame: Frame) -> None:
        if isinstance(s, ast.StmtParam):
            self.param(s, frame)
        elif isinstance(s, ast.StmtInput):
            arg = frame.inputs.pop(0) if frame.inputs else NOTHING
            if frame.transparent:
                frame.scope[s.name] = ("value", arg)
            elif frame.prefix:
                # a called block's input is a signal fed by its caller's argument
                nid = self.node(self.fresh_id(self.node_id(s.name, frame)), "signal", frame,
                                s.span)
                self.sig_deps[nid] = frozenset()
                self.connect(arg, nid)
                frame.scope[s.name] = ("node", nid)
            else:
                frame.scope[s.name] = ("node", self.node(s.name, "input", frame, s.span,
                                                         shape=span_text(s.shape.span)))
        elif isinstance(s, ast.StmtLet):
            self.let(s.name, s.value, s.name_span, frame)
        elif isinstance(s, ast.StmtUpdate):
            self.update(s, frame)
        elif isinstance(s, ast.StmtOutput):
            value = self.expr(s.value, frame, s.name or "output")
            if frame.prefix or frame.transparent:
                frame.output = frame.output | value
                if s.name:
                    frame.scope[s.name] = ("value", value)
            else:
                nid = self.node(self.fresh_id(s.name or "output"), "signal", frame, s.span,
                                output=True)
                self.sig_deps[nid] = frozenset()
                self.connect(value, nid)
                if s.name:
                    frame.scope[s.name] = ("node", nid)
        elif isinstance(s, ast.StmtRepeat):
            count = const_eval(s.count, frame.env)
            if count == 0:  # no copy is built
                return
            times = frame.repeat * count if isinstance(count, int) and frame.repeat is not None \
                else None
            inner = frame.child(repeat=times)
            self.body(s.body, inner)
            frame.output = frame.output | inner.output
        elif isinstance(s, ast.StmtChain):
            values = const_eval(s.values, frame.env)
            for v in values if isinstance(values, (list, tuple)) else [UNKNOWN]:
                shown = s.var if v is UNKNOWN else v
                inner = frame.child(env={**frame.env, s.var: v},
                                    suffix=f"{frame.suffix}[{shown}]")
                inner.scope[s.var] = ("value", NOTHING)
                self.body(s.body, inner)
                frame.output = frame.output | inner.output
        elif isinstance(s, ast.StmtIf):
            cond = const_eval(s.cond, frame.env)
            branches = [s.then, s.orelse] if cond is UNKNOWN else [s.then if cond else s.orelse]
            before, ways = self.updates, []
            for b in branches:
                self.updates = {}
                inner = frame.child()
                self.body(b, inner)
                frame.output = frame.output | inner.output
                ways.append(self.updates)
            # a level's updates in the branches are one or the other: "a or b" ("a or
            # nothing" where a branch does not update it)
            self.updates = before
            for nid in dict.fromkeys(n for way in ways for n in way):
                texts = ["; ".join(way[nid]) if nid in way else "nothing" for way in ways]
                self.updates.setdefault(nid, []).append(
                    " or ".join(f"({t})" if "; " in t and len(texts) > 1 else t for t in texts))
        elif isinstance(s, ast.StmtTrain):
            if not frame.prefix and not frame.transparent:
                self.train_level(s, frame)
        elif isinstance(s, ast.StmtMemory):
            self.memory(s, frame)
        # a `require` is no level nor signal; a clause outside a memory or train body was
        # rejected by the checker

    def param(self, s: ast.StmtParam, frame: Frame) -> None:
        for name in s.names:
            if frame.alias is not None:
                # an optimizer used as a rule: its `param` is the level it trains
                frame.scope[name] = ("node", frame.alias)
                continue
            # (beside a signal of its name, a let outside the body it is declared in, a node of
            # its own: it was merged into that signal and drawn as none)
            nid = self.fresh_id(self.node_id(name, frame))
            optimizer = frame.decl.kind == "optimizer"
            self.level(nid, "param", frame, s.span, "step", 1, None,
                       objective="task" if not optimizer else None,
                       rule=None if optimizer else "the outer level's rule",
                       init=span_text(s.init.span) if s.init is not None else None,
                       structure=span_text(s.shape.span) if s.shape is not None else None)
            frame.scope[name] = ("node", nid)

    def node_id(self, name: str, frame: Frame) -> str:
        return f"{frame.prefix}{name}{frame.suffix}"

    def let(self, name: str, expr: ast.Expr, span: Span, frame: Frame) -> None:
        value = self.expr(expr, frame, name)
        if frame.transparent or value.module is not None:
            frame.scope[name] = ("value", value)
            return
        # a name let again (or a let in an inner body of an outer one's name) is a new signal:
        # a version of it, as an assignment makes (h, h'), or a fresh name beside another node
        nid = self.node_id(name, frame)
        if nid in self.g and self.g.nodes[nid]["kind"] == "signal":
            while nid in self.g:
                nid += "'"
        nid = self.node(self.fresh_id(nid), "signal", frame, span)
        self.sig_deps[nid] = frozenset()
        self.connect(value, nid)
        frame.scope[name] = ("node", nid)

    def update(self, s: ast.StmtUpdate, frame: Frame) -> None:
        bound = frame.scope.get(s.target)
        value = self.expr(s.value, frame, s.target)
        for i in s.index or ():
            value = value | self.expr(i, frame, s.target)
        if bound is None:
            frame.scope[s.target] = ("value", value)
            return
        if bound[0] == "value":
            _rebind(frame.scope, s.target, ("value", bound[1] | value))
            return
        nid = bound[1]
        if self.is_level(nid):
            self.connect(value, nid, "update")
            if frame.alias is None:
                self.updates.setdefault(nid, []).append(span_text(s.span))
            self.written.add(nid)
            return
        if s.op != "=":  # `g *= 2` reads g
            value = value | self.expr(ast.ExprName(s.target, s.target_span), frame, s.target)
        # a signal assigned again is a new version of it (h, h', ...; o, o[16], o[256] in a chain)
        base = self.node_id(s.target, frame) if frame.suffix else nid
        new = base
        while new in self.g:
            new += "'"
        self.node(new, "signal", frame, s.span)
        self.sig_deps[new] = frozenset()
        self.connect(value, new)
        _rebind(frame.scope, s.target, ("node", new))

    def memory(self, s: ast.StmtMemory, frame: Frame) -> None:
        nid = self.early.pop(id(s), None) or self.memory_node(s, frame)
        frame.scope[s.name] = ("node", nid)
        self.init_edges(s.init, nid, frame)
        self.level_body(s.body, nid, frame, s.name)
        if nid in self.updates:
            self.g.nodes[nid]["rule"] = "; ".join(self.updates.pop(nid))
        if self.g.nodes[nid]["unit"] != "never":  # only the outer level writes a `never`
            self.written.add(nid)                  # memory, between steps

    def read_ahead(self, s: ast.StmtMemory, frame: Frame) -> Value:
        """A read of memory s above its declaration: its state at the start of the chunk,
        written before this time step (no same-time dependency)."""
        nid = self.early.get(id(s))
        if nid is None:
            nid = self.early[id(s)] = self.memory_node(s, frame)
        self.g.nodes[nid]["start_reads"] = True
        return Value(frozenset({(nid, "read")}), starts=frozenset({nid}))

    def memory_node(self, s: ast.StmtMemory, frame: Frame) -> str:
        """The level node of memory s (its clauses' edges come with its declaration)."""
        nid = self.node_id(s.name, frame)
        f = s.frequency
        unit, period, chunk = self.frequency(f, frame)
        # the body as its `if`s go at these hyperparameters (each way, where one is unknown)
        bodies = body_paths(s.body, lambda cond: _known(const_eval(cond, frame.env)))
        explicit: list[str] = []
        said: dict[str, list[str]] = {}
        for body in bodies:
            for b in body:
                if isinstance(b, ast.Clause) and isinstance(b.value, str):
                    said.setdefault(b.kind, []).append(b.value)
                    explicit.append(b.kind)
        choices = {k: " or ".join(dict.fromkeys(said[k])) if k in said else default
                   for k, (default, _) in CHOICES.items()}
        structure = span_text(s.structure.span) if s.structure is not None else None
        if structure in ("cache", "cache()"):
            rule_text: str | None = "append (key, value) to the cache"
        else:
            rule_text = _texts(bodies, "rule")
        nid = self.level(self.fresh_id(nid), "memory", frame, s.span, unit, period, chunk,
                         objective=_texts(bodies, "objective"), rule=rule_text,
                         init=self.init_text(s.init),
                         structure=structure, per_head=s.per_head, choices=choices,
                         explicit=tuple(dict.fromkeys(explicit)))
        if not any(isinstance(b, ast.Clause) and b.kind == "key" for body in bodies
                   for b in body) and structure not in ("cache", "cache()"):
            self.keyless.add(nid)
        return nid

    def frequency(self, f: ast.Frequency | None, frame: Frame) -> tuple[str, int | None, int | None]:
        if f is None:
            # the checker's defaults: an optimizer's levels step, a block's learn per token
            unit = "step" if frame.decl.kind == "optimizer" or frame.alias else "token"
            return unit, 1, None
        if f.unit == "never":
            return "never", None, None
        period = 1 if f.every is None else const_eval(f.every, frame.env)
        chunk = None if f.chunk is None else const_eval(f.chunk, frame.env)
        period = period if isinstance(period, int) else None
        chunk = chunk if isinstance(chunk, int) else None
        if f.unit == "step" and frame.alias is not None:
            # an optimizer as a memory's rule (or the train level's) steps whenever that
            # memory (the train level) updates
            host = self.g.nodes[frame.alias]
            scale = host["period"] if period is not None else None
            return host["unit"], scale * period if scale is not None else None, host["chunk"]
        return f.unit, period, chunk

    def init_text(self, init: ast.Expr | None) -> str | None:
        if init is None:
            return None
        if _call_name(init) == "from" and isinstance(init, ast.ExprCall):
            return "from " + span_text(init.args[0].span)
        return span_text(init.span)

    def init_edges(self, init: ast.Expr | None, nid: str, frame: Frame) -> None:
        if init is None:
            return
        name = _call_name(init)
        if name == "meta":
            self.g.nodes[nid]["meta"] = True
            return
        if name in INIT_BUILTINS:
            return  # a shape, not a state: zeros_like(W) reads nothing of W
        source = init.args[0] if name == "from" and isinstance(init, ast.ExprCall) else init
        self.connect(self.expr(source, frame, nid).as_kind("init"), nid, "from")

    def rule(self, e: ast.Expr, level: str, frame: Frame) -> None:
        """A memory's or the train level's rule: a builtin's arguments condition the level; an
        optimizer expands into its own levels, which learn from the level's gradient."""
        name = _call_name(e)
        decl = frame.decls.get(name) if name else None
        if decl is not None and decl.kind == "optimizer" and isinstance(e, (ast.ExprCall,
                                                                            ast.ExprName)):
            call = e if isinstance(e, ast.ExprCall) else ast.ExprCall(e, (), (), e.span)
            self.expand(decl, call, frame, [], alias=level)
            return
        if isinstance(e, ast.ExprCall):
            for a in e.args:
                self.connect(self.expr(a, frame, level), level, "rule")
            for kw in e.kwargs:
                self.connect(self.expr(kw.value, frame, level), level, kw.name)

    def train_level(self, s: ast.StmtTrain, frame: Frame) -> None:
        unit, period, _ = self.frequency(s.frequency, frame)
        # (a model's memory may be named `train`: its own node)
        nid = self.level(self.fresh_id("train"), "train", frame, s.span, unit, period, None,
                         objective=_clause_text(s.body, "objective"),
                         rule=_clause_text(s.body, "rule"))
        self.g.nodes[nid]["label"] = "train"
        self.train = nid
        self.level_body(s.body, nid, frame, None)
        self.written.add(nid)

    def level_body(self, stmts: tuple[ast.Stmt, ...], nid: str, frame: Frame,
                   ctx: str | None) -> None:
        """A memory's (ctx: its name) or the train level's (None) body: clauses become edges
        into the level."""
        inner = frame.child()
        for b in stmts:
            if isinstance(b, ast.StmtIf):  # (in a memory's body: clauses, at a hyperparameter)
                way = _known(const_eval(b.cond, inner.env))
                for branch in [b.then, b.orelse] if way is None else [b.then if way else b.orelse]:
                    self.level_body(branch, nid, inner, ctx)
            elif not isinstance(b, ast.Clause):
                self.stmt(b, inner)
            elif b.kind == "rule" and not isinstance(b.value, str):
                self.rule(b.value, nid, inner)
            elif not isinstance(b.value, str):
                name = "train" if ctx is None else f"{ctx}.{b.kind}"
                self.connect(self.expr(b.value, inner, name), nid, b.kind)

    # calls to other declarations
    def expand(self, decl: ast.Decl, call: ast.ExprCall, frame: Frame, inputs: list[Value],
               alias: str | None = None) -> Value:
        """Walk a called declaration once, its nodes named `Decl.name`; returns its output."""
        args = list(call.args)
        if call.piped and alias is None:
            inputs = [self.expr(args.pop(0), frame, decl.name), *inputs]
        values: dict[str, Any] = {}
        for p, a in zip(decl.params, args):
            values[p.name] = const_eval(a, frame.env)
        for kw in call.kwargs:
            values[kw.name] = const_eval(kw.value, frame.env)
        values = {k: v for k, v in values.items() if v is not UNKNOWN}
        checked = self.checked_of(decl)
        env = checked.bind(values, call.span) if checked is not None else \
            _defaults(decl, values)
        base = f"{frame.prefix}{decl.name}" if alias is None or alias == self.train else \
            f"{alias}.{decl.name}"
        prefix = self.fresh_prefix(base) + "."
        scope = checked.scope if checked is not None else frame.decls
        inner = Frame(decl, env, ChainMap(), scope, prefix=prefix, suffix=frame.suffix,
                      repeat=frame.repeat, transparent=alias is not None, inputs=list(inputs),
                      alias=alias)
        before = set(self.g.nodes)
        self.body(decl.body, inner)
        if alias is not None:
            self.rule_levels |= {n for n in self.g.nodes if n not in before and self.is_level(n)}
        return inner.output

    def checked_of(self, decl: ast.Decl) -> Checked | None:
        try:
            return self.program.lookup(decl)
        except (AttributeError, KeyError):
            return None

    # expressions
    def expr(self, e: ast.Expr, frame: Frame, ctx: str) -> Value:
        """What e reads; layer builtins in e make their weights (named after ctx)."""
        if isinstance(e, ast.ExprName):
            bound = frame.scope.get(e.name)
            if bound is None:
                decl = frame.decls.get(e.name)
                if decl is not None and decl.kind != "optimizer":
                    return Value(module=(decl, ast.ExprCall(e, (), (), e.span), frame))
                return NOTHING
            return self.reference(bound[1]) if bound[0] == "node" else bound[1]
        if isinstance(e, ast.ExprCall):
            return self.call(e, frame, ctx)
        if isinstance(e, ast.ExprIndex):
            return _union([self.expr(e.base, frame, ctx), *(self.expr(i, frame, ctx)
                                                            for i in e.index)])
        if isinstance(e, ast.ExprAttr):
            return self.expr(e.base, frame, ctx)
        if isinstance(e, ast.ExprBinary):
            value = self.expr(e.left, frame, ctx) | self.expr(e.right, frame, ctx)
            if e.op == "*" and 0 in (const_eval(e.left, frame.env), const_eval(e.right, frame.env)):
                # a zero coefficient (weight_decay = 0) reads nothing; the layers and blocks
                # of the other factor are still there (walked above), as build makes them
                return NOTHING
            return value
        if isinstance(e, ast.ExprUnary):
            return self.expr(e.operand, frame, ctx)
        if isinstance(e, ast.ExprCond):
            cond = const_eval(e.cond, frame.env)
            if cond is not UNKNOWN:
                return self.expr(e.then if cond else e.orelse, frame, ctx)
            return _union([self.expr(x, frame, ctx) for x in (e.cond, e.then, e.orelse)])
        if isinstance(e, (ast.ExprTuple, ast.ExprList)):
            return _union([self.expr(i, frame, ctx) for i in e.items])
        return NOTHING

    def call(self, e: ast.ExprCall, frame: Frame, ctx: str) -> Value:
        name = qualified_name(e.func)
        bound = frame.scope.get(name) if name else None
        if name is not None and bound is None and name in frame.ahead and \
                name not in BUILTINS and name not in frame.decls:
            return self.read_ahead(*frame.ahead[name]) | \
                _union([self.expr(a, frame, ctx) for a in e.args])
        if name is not None and bound is None:
            decl = frame.decls.get(name)
            if decl is not None and decl.kind != "optimizer":
                if e.piped:
                    return self.expand(decl, e, frame, [])
                return Value(module=(decl, e, frame))
            if name == "grad" and len(e.args) == 1:
                return self.grad(e.args[0], frame)
            b = BUILTINS.get(name)
            if b is not None and name == ATTENTION:
                return self.attention(e, frame, ctx)
            if b is not None and b.category == "layer":
                return self.layer(e, frame, ctx)
        func = self.expr(e.func, frame, ctx)
        args = [self.expr(a, frame, ctx) for a in e.args]
        kwargs = [self.expr(kw.value, frame, ctx) for kw in e.kwargs]
        if func.module is not None:
            decl, made, _ = func.module
            return self.expand(decl, made, frame, args) | _union(kwargs)
        if bound is not None and bound[0] == "node" and bound[1] in self.keyless:
            self.connect(_union(args), bound[1], "input")
        return _union([replace(func, module=None), *args, *kwargs])

    def grad(self, target: ast.Expr, frame: Frame) -> Value:
        """grad(W): the task gradient the architecture generates at W's state."""
        if not isinstance(target, ast.ExprName) or frame.scope.get(target.name) is None:
            return self.expr(target, frame, "grad")
        bound = frame.scope[target.name]
        if bound[0] != "node":
            return bound[1]
        src = bound[1]
        if frame.transparent:
            return Value(frozenset({(src, "generation")}))
        nid = f"grad({src})"
        if nid not in self.g:
            self.node(nid, "signal", frame, target.span)
            self.sig_deps[nid] = frozenset()
            self.edge(src, nid, "generation")
        return self.reference(nid)

    def layer(self, e: ast.ExprCall, frame: Frame, ctx: str) -> Value:
        """linear/conv1d/embed/rmsnorm/layernorm: weights the outer level trains every step."""
        name = e.func.name  # type: ignore[union-attr]
        inp = self.expr(e.args[0], frame, ctx) if e.args else NOTHING
        shown = [_shown(a, frame.env) for a in e.args[1:]]
        shown += [f"{kw.name} = {_shown(kw.value, frame.env)}" for kw in e.kwargs]
        base = f"{frame.prefix}{ctx}.{name}{frame.suffix}"
        nid = self.level(self.fresh_id(base), "param", frame, e.span, "step", 1, None,
                         objective="task", rule="the outer level's rule",
                         structure=f"{name}({', '.join(shown)})",
                         block=frame.prefix.removesuffix("."))
        return inp | self.reference(nid)

    def attention(self, e: ast.ExprCall, frame: Frame, ctx: str) -> Value:
        """softmax_attention(q, k, v): a non-parametric memory over its cache, every token.

        Given a declared cache (`softmax_attention(q, C)`), it is a read of that memory.
        """
        for a in e.args:
            bound = frame.scope.get(a.name) if isinstance(a, ast.ExprName) else None
            if bound and bound[0] == "node" and self.g.nodes[bound[1]]["kind"] == "memory":
                return _union([self.expr(x, frame, ctx) for x in (*e.args,
                                                                 *(k.value for k in e.kwargs))])
        nid = self.level(self.fresh_id(f"{frame.prefix}{ctx}.attention{frame.suffix}"),
                         "memory", frame, e.span, "token", 1, None,
                         rule="append (key, value) to the cache", init="empty cache",
                         structure="cache",
                         choices={k: d for k, (d, _) in CHOICES.items()}, explicit=())
        for label, a in zip(("query", "key", "value"), e.args):
            self.connect(self.expr(a, frame, ctx), nid, label)
        for kw in e.kwargs:
            self.connect(self.expr(kw.value, frame, ctx), nid, kw.name)
        self.written.add(nid)
        return self.reference(nid)

    # ordering
    def finish(self, frame: Frame) -> None:
        g = self.g
        train = self.train
        for nid, attrs in g.nodes(data=True):
            if attrs["kind"] == "param" and attrs["rule"] is None and nid in self.updates:
                attrs["rule"] = "; ".join(self.updates[nid])
        if train is not None:
            t = g.nodes[train]
            for nid, attrs in list(g.nodes(data=True)):
                if nid == train or nid in self.rule_levels:
                    continue
                if attrs.get("meta"):
                    self.edge(train, nid, "init", "meta")
                elif attrs["kind"] == "param" or attrs.get("unit") == "never":
                    self.edge(train, nid, "backprop", "task gradient")
                    if attrs["kind"] == "param":  # (changed when the train level steps)
                        attrs["objective"], attrs["rule"] = t["objective"], t["rule"]
                        attrs.update({k: t[k] for k in ("unit", "period", "frequency")})
        self.order()

    def order(self) -> None:
        g = self.g
        nodes = [n for n, d in g.nodes(data=True) if d["kind"] in LEVEL_KINDS]
        classes: dict[tuple[int, float], list[str]] = {}
        for n in nodes:
            classes.setdefault(frequency_key(g.nodes[n]), []).append(n)
        offset = 0
        for key in sorted(classes):
            members = classes[key]
            depth: dict[str, int] = {}
            for n in members:
                _layer(n, self.deps, set(members), depth, frozenset())
            for n in members:
                g.nodes[n]["level"] = offset + depth[n]
                g.nodes[n]["after"] = sorted(d for d in self.deps[n] if d in members)
            offset += max(depth.values()) + 1
        for n in nodes:
            g.nodes[n]["parallel"] = [m for m in nodes if m != n
                                      and g.nodes[m]["level"] == g.nodes[n]["level"]]


def _known(value: Any) -> bool | None:
    """A condition's value, None where it is not known."""
    return None if value is UNKNOWN else bool(value)


def _texts(bodies: list[tuple[ast.Stmt, ...]], kind: str) -> str | None:
    """The source text of the bodies' `kind` clauses, "a or b" where they differ."""
    texts = [t for t in (_clause_text(body, kind) for body in bodies) if t is not None]
    return " or ".join(dict.fromkeys(texts)) or None


def _clause_text(body: tuple[ast.Stmt, ...], kind: str) -> str | None:
    """The source text of a body's `kind` clause (objective, rule, ...), if it has one."""
    for b in body:
        if isinstance(b, ast.Clause) and b.kind == kind and not isinstance(b.value, str):
            return span_text(b.value.span)
    return None


def _rebind(scope: ChainMap, name: str, binding: tuple[str, Any]) -> None:
    """Rebind name in the scope that defines it, so the enclosing body sees the new binding."""
    for m in scope.maps:
        if name in m:
            m[name] = binding
            return
    scope[name] = binding


def _layer(n: str, deps: dict[str, set[str]], members: set[str], depth: dict[str, int],
           seen: frozenset[str]) -> int:
    """Longest chain of same-time dependencies below n within its frequency class."""
    if n not in depth:
        below = [d for d in deps[n] if d in members and d not in seen]
        depth[n] = 1 + max((_layer(d, deps, members, depth, seen | {n}) for d in below),
                           default=-1)
    return depth[n]


def _call_name(e: ast.Expr) -> str | None:
    """The name a call or a bare rule refers to, qualified (`A.AdamW`) for `import ... as A`."""
    return qualified_name(e.func if isinstance(e, ast.ExprCall) else e)


def _shown(e: ast.Expr, env: dict[str, Any]) -> str:
    v = const_eval(e, env)
    return span_text(e.span) if v is UNKNOWN else repr(v)


def _defaults(decl: ast.Decl, values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameter values of a declaration the checker has not seen (defaults + values)."""
    return bound_defaults(decl, values)


def build_graph(program: Any, checked: Checked, hyper: dict[str, Any]) -> nx.MultiDiGraph:
    """The nest graph of a checked declaration with hyperparameters `hyper` (see the module doc)."""
    return _Builder(program, checked, dict(hyper)).build()
