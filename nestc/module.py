"""Blocks and models -> torch.nn.Module.

The builder walks a checked declaration once, with its hyperparameters bound: arithmetic on
hyperparameters is folded, `if` on them is decided, `repeat` and `chain` are unrolled, and
every layer call, memory and sub-block call becomes a submodule with a name that depends only on
the spec (so every back end has the same `state_dict` keys). What is left is a list of steps
over tensors, each a closure over its submodules, which `forward` runs in order.

In-context state (memory states, short-convolution windows, attention caches) travels in a
dict keyed by each stateful submodule's path: `forward(x, state=None, return_state=False)`.
Feeding a sequence in pieces, passing each piece's returned state into the next, equals
feeding it whole. docs/semantics.md defines what every memory computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nestc import ast, layers, memories
from nestc.check import Checked
from nestc.errors import NestError
from nestc.hyper import UNKNOWN, const_eval

# "triton": the delta-rule memories and Titans' MLP memory through nestc.ops' Triton kernels,
# the rest as "chunked"
BACKENDS = ("reference", "chunked", "triton")
Env = dict[str, Any]  # runtime: tensor names -> tensors, plus "__state__" (State)
Fn = Callable[[Env], torch.Tensor]


class State:
    """The in-context state of one forward: read from `given`, written to `out`."""

    def __init__(self, given: dict[str, Any] | None) -> None:
        self.given = given or {}
        self.out: dict[str, Any] = {}
        # task-loss memories read in this piece: path -> (memory, the weights it read)
        self.task: dict[str, Any] = {}


@dataclass
class Ten:
    """A tensor at build time: how to compute it and the size of its last dim."""

    fn: Fn
    feat: int
    tokens: bool = False  # token ids [B, T] (no feature dim)


class Built(nn.Module):
    """One block or model: its steps, submodules and output."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__()
        self.decl_name, self.kind = name, kind
        self.inputs: list[str] = []
        self.steps: list[Callable[[Env], None]] = []
        self.out: Fn | None = None
        self.out_feat = 0
        self.objective: Any = None  # a model's train objective: the task loss
        self.objective_span: Any = None  # where it is, when it is a form not built yet
        self.tasks: list[Any] = []  # its task-loss memories, at any depth (set once built)

    def run(self, env: Env, x: torch.Tensor) -> torch.Tensor:
        # closures find submodules through "__self__", so a deep copy runs its own weights
        env = {self.inputs[0]: x, "__state__": env["__state__"], "__self__": self}
        for step in self.steps:
            step(env)
        assert self.out is not None, self.decl_name
        return self.out(env)

    def forward(self, x: torch.Tensor, state: dict[str, Any] | None = None,
                return_state: bool = False, targets: torch.Tensor | None = None,
                task: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None) -> Any:
        """x: [B, T, dim] for a block, token ids [B, T] for a model; returns y ([B, T, dim]
        or logits), and the in-context state after the last token if return_state.

        Memories that learn from the task loss (`objective task`) need it per token: a model
        takes it from its `train` objective, with `targets` ([B, T] next tokens, -100 where
        none; default: x shifted by one, the last token without one); a block takes
        `task(y, start, stop)`, the loss summed over the tokens start..stop-1 whose outputs
        are y."""
        if x.shape[1] == 0:  # an empty piece: nothing to compute, the state goes on as it was
            y = x.new_zeros(x.shape[0], 0, self.out_feat, dtype=torch.get_default_dtype()
                            if x.dtype in (torch.int64, torch.int32) else x.dtype)
            return (y, dict(state or {})) if return_state else y
        tasks = self.tasks
        if not tasks:
            ctx = State(state)
            y = self.run({"__state__": ctx}, x)
            return (y, ctx.out) if return_state else y
        if task is None:
            task = self.task_loss(x, targets)
        return self.forward_in_chunks(x, state, return_state, task, tasks)

    def task_loss(self, x: torch.Tensor, targets: torch.Tensor | None
                  ) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
        if self.objective_span is not None:
            raise _unsupported("a task loss other than cross_entropy(<output>, next(<input>)) "
                               "for memories with `objective task`", self.objective_span)
        if self.objective is None:
            raise NestError(f"`{self.decl_name}` has memories that learn from the task loss: "
                            "build them inside a model with a `train` objective, or pass "
                            "task=fn(y, start, stop) to forward", None, kind="value")
        if targets is None:
            targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)

        def loss(y: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(
                y.flatten(0, 1), targets[:, start:stop].flatten(), ignore_index=-100,
                reduction="sum")

        return loss

    def forward_in_chunks(self, x: torch.Tensor, state: dict[str, Any] | None,
                          return_state: bool, task: Callable[..., torch.Tensor],
                          tasks: list[Any]) -> Any:
        """Run piece by piece, a piece ending wherever a task-loss memory's chunk does; after
        each, hand every such memory the gradient of the piece's task loss with respect to
        the weights as this piece used them (local: what came in from earlier pieces is held
        fixed); the memory sums them over its chunk and updates when the chunk is full
        (docs/semantics.md, "Memories that learn from the task loss"). A parent of a nested
        level is the exception: its gradient is taken once, when its chunk is full or the
        input ends, of the loss summed since the chunk began, through everything its weights
        reached (the child's reads and updates)."""
        given = dict(state or {})
        pos = int(given.get("__pos__", 0))
        outer = torch.is_grad_enabled()
        # the levels' gradients are differentiable (second order) for the outer level unless
        # every level stops backprop; also without grad mode when a parent's gradient runs
        # through a faster level's updates (CMSNested): evaluation computes what training
        # computes. Other levels' gradients are local to their piece (TaskMLP.weights), so
        # no gradient runs through another's.
        through = any(not m.stopped for m in tasks) and (outer or any(m.nested for m in tasks))
        # per memory read and not yet differentiated: [memory, weights, first piece];
        # per first piece: the task loss summed from it on
        pending: dict[str, list[Any]] = {}
        losses: dict[int, torch.Tensor] = {}
        outs, start, T = [], 0, x.shape[1]
        while start < T:
            stop = min(T, start + min(m.chunk - (pos + start) % m.chunk for m in tasks))
            ctx = State(given)
            with torch.enable_grad():
                y = self.run({"__state__": ctx}, x[:, start:stop])
                for key, (mem, _, used) in ctx.task.items():
                    entry = pending.setdefault(key, [mem, used, start])
                    assert all(a is b for a, b in zip(entry[1], used)), key
                if ctx.task:
                    loss = task(y, start, stop)
                    for first in {entry[2] for entry in pending.values()}:
                        losses[first] = losses[first] + loss if first in losses else loss
                # a level's gradient is taken every piece (local to it, see TaskMLP.weights);
                # a parent's once per chunk, or when the input ends
                due: dict[int, list[str]] = {}
                for key in ctx.task:
                    mem = pending[key][0]
                    if not mem.nested or stop == T or (pos + stop) % mem.chunk == 0:
                        due.setdefault(pending[key][2], []).append(key)
                grads: dict[str, tuple[Any, ...]] = {}
                for first, keys in due.items():
                    weights = [w for key in keys for w in pending[key][1]]
                    # the outer level's backward, or a parent's summed loss, may still need
                    # this graph: keep it
                    keep = outer or through or len(pending) > len(keys)
                    gs = torch.autograd.grad(losses[first], weights, allow_unused=True,
                                             create_graph=through, retain_graph=keep)
                    for i, key in enumerate(keys):
                        grads[key] = gs[2 * i: 2 * i + 2]
                for key, (mem, base, _) in ctx.task.items():
                    g = grads.get(key)
                    if g is not None and mem.stopped:
                        g = tuple(None if t is None else t.detach() for t in g)
                    mem.learn(ctx, base, g, stop - start)
                    if g is not None:
                        del pending[key]
            for first in [f for f in losses if all(e[2] != f for e in pending.values())]:
                del losses[first]
            given = {**given, **ctx.out}
            outs.append(y)
            start = stop
        given["__pos__"] = pos + T
        y = torch.cat(outs, 1)
        if not outer:  # what evaluation returns holds no graph
            y, given = y.detach(), detached(given)
        return (y, given) if return_state else y


def detached(tree: Any) -> Any:
    """An in-context state (dicts, tuples and lists of tensors) with every tensor detached."""
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: detached(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(detached(v) for v in tree)
    return tree


class Builder:
    def __init__(self, program: Any, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.program = program
        self.backend = backend

    # declarations ------------------------------------------------------------------------

    def decl(self, checked: Checked, hyper: dict[str, Any], in_feat: int | None = None) -> Built:
        values = checked.bind(hyper)
        mod = Built(checked.name, checked.kind)
        scope = _Scope(self, checked, mod, dict(values))
        scope.stmts(checked.decl.body, in_feat)
        memories.run_siblings_as_one(scope.writes, scope.reads)
        if mod.out is None:
            raise NestError(f"{checked.kind} `{checked.name}` has no output",
                            checked.decl.name_span, kind="value")
        return mod


class _Scope:
    """Builds one declaration's body: constants, tensors, and the module they go into."""

    def __init__(self, builder: Builder, checked: Checked, mod: Built,
                 consts: dict[str, Any]) -> None:
        self.b, self.checked, self.mod = builder, checked, mod
        self.consts = consts
        self.tens: dict[str, Ten] = {}
        self.mems: dict[str, memories.Memory] = {}
        self.prefix = ""
        # per memory: the step that writes it, and per read the step that reads it and its
        # query (memories.run_siblings_as_one)
        self.writes: dict[memories.Memory, int] = {}
        self.reads: dict[memories.Memory, list[tuple[int, Ten]]] = {}

    def add(self, hint: str, module: nn.Module) -> str:
        """Register a submodule under a spec-derived name, unique in this declaration."""
        base = (self.prefix + hint).replace(".", "_")
        name, k = base, 1
        while name in self.mod._modules:
            name, k = f"{base}_{k}", k + 1
        self.mod.add_module(name, module)
        return name

    def ref(self, name: str) -> Callable[[Env], Any]:
        """The submodule `name` of the module running now (not the one built: a copy's own)."""
        return lambda env: env["__self__"]._modules[name]

    # statements ----------------------------------------------------------------------------

    def stmts(self, body: tuple[ast.Stmt, ...], in_feat: int | None) -> None:
        for s in body:
            self.stmt(s, in_feat)

    def stmt(self, s: ast.Stmt, in_feat: int | None) -> None:
        if isinstance(s, ast.StmtInput):
            self.input(s, in_feat)
        elif isinstance(s, ast.StmtLet):
            self.bind(s.name, s.value, s.span)
        elif isinstance(s, ast.StmtUpdate):
            if s.index is not None or s.op not in ("=", "+=", "-=", "*="):
                raise _unsupported(f"`{s.target} {s.op} ...` in a block", s.span)
            value = s.value
            if s.op != "=":
                value = ast.ExprBinary(s.op[0], ast.ExprName(s.target, s.target_span), value,
                                       s.span)
            self.bind(s.target, value, s.span)
        elif isinstance(s, ast.StmtOutput):
            out = self.tensor(s.value, "out")
            self.mod.out, self.mod.out_feat = out.fn, out.feat
        elif isinstance(s, ast.StmtRepeat):
            n = self.size(s.count, "a repeat count", minimum=0)
            outer = self.prefix
            for i in range(n):
                self.prefix = f"{outer}r{i}_"
                self.stmts(s.body, in_feat)
            self.prefix = outer
        elif isinstance(s, ast.StmtChain):
            outer, saved = self.prefix, self.consts.get(s.var, UNKNOWN)
            for i, value in enumerate(self.const(s.values)):
                self.prefix = f"{outer}{s.var}{i}_"
                self.consts[s.var] = value
                self.stmts(s.body, in_feat)
            self.prefix = outer
            if saved is UNKNOWN:
                self.consts.pop(s.var, None)
            else:
                self.consts[s.var] = saved
        elif isinstance(s, ast.StmtIf):
            self.stmts(s.then if self.const(s.cond) else s.orelse, in_feat)
        elif isinstance(s, ast.StmtMemory):
            self.memory(s)
        elif isinstance(s, ast.StmtTrain):
            self.train(s)
        else:
            raise _unsupported(f"`{type(s).__name__}` in a {self.checked.kind}", s.span)

    def train(self, s: ast.StmtTrain) -> None:
        """The outer level. Its objective is the task loss of `objective task` memories:
        cross_entropy(<output>, next(<input>)) is the form built so far."""
        for c in s.body:
            if isinstance(c, ast.Clause) and c.kind == "objective":
                e = c.value
                ok = (isinstance(e, ast.ExprCall) and isinstance(e.func, ast.ExprName)
                      and e.func.name == "cross_entropy" and len(e.args) == 2
                      and isinstance(e.args[1], ast.ExprCall)
                      and isinstance(e.args[1].func, ast.ExprName)
                      and e.args[1].func.name == "next")
                self.mod.objective = e if ok else None
                self.mod.objective_span = None if ok else c.span

    def input(self, s: ast.StmtInput, in_feat: int | None) -> None:
        if self.mod.inputs:
            raise _unsupported(f"a second input (`{s.name}`)", s.span)
        self.mod.inputs.append(s.name)
        name = s.name
        if s.shape.dtype == "int":
            self.tens[name] = Ten(lambda env: env[name], 0, tokens=True)
            return
        dims = s.shape.dims
        feat = self.size(dims[-1], f"the width of `{name}`") if len(dims) > 1 else in_feat
        if feat is None:
            raise NestError(f"input `{name}` needs a feature dim: [T, dim]", s.shape.span,
                            kind="shape")
        if in_feat is not None and feat != in_feat:
            raise NestError(f"input `{name}` has {feat} features, but {in_feat} are passed in",
                            s.shape.span, kind="shape")
        self.tens[name] = Ten(lambda env: env[name], int(feat))

    def bind(self, name: str, value: ast.Expr, span: Any) -> None:
        v = self.value(value, name)
        if not isinstance(v, Ten):
            self.consts[name] = v
            return
        fn = v.fn

        def step(env: Env) -> None:
            env[name] = fn(env)

        self.mod.steps.append(step)
        self.tens[name] = Ten(lambda env: env[name], v.feat, v.tokens)

    def memory(self, s: ast.StmtMemory) -> None:
        mem = memories.build(self, s)
        self.mems[s.name] = mem
        key = self.add(s.name, mem)
        mem.env_key, mem.get = f"__mem_{key}", self.ref(key)
        write = mem.compile_write(self)

        def step(env: Env) -> None:
            env[mem.env_key] = write(env)

        self.writes[mem] = len(self.mod.steps)
        self.mod.steps.append(step)

    # expressions --------------------------------------------------------------------------

    def const(self, e: ast.Expr) -> Any:
        v = const_eval(e, self.consts)
        if v is UNKNOWN:
            raise NestError("this must be known from the hyperparameters alone", e.span,
                            kind="value")
        return v

    def size(self, e: ast.Expr, what: str, minimum: int = 1) -> int:
        """A count fixed by the hyperparameters (a width, heads, a window, a chunk): a whole
        number of at least `minimum`, else a NestError at e."""
        v = self.const(e)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or \
                v < minimum:
            shown = repr(v) if not isinstance(v, float) or v != int(v) else str(v)
            raise NestError(f"{what} must be a whole number of at least {minimum}, got {shown}",
                            e.span, kind="value")
        return int(v)

    def size_kw(self, call: ast.ExprCall, name: str, default: int, what: str,
                minimum: int = 1) -> int:
        """size() of a keyword argument of call, or its default."""
        for k in call.kwargs:
            if k.name == name:
                return self.size(k.value, what, minimum)
        return default

    def tensor(self, e: ast.Expr, hint: str) -> Ten:
        v = self.value(e, hint)
        if not isinstance(v, Ten):
            raise NestError("a tensor is needed here, not a constant", e.span, kind="type")
        return v

    def value(self, e: ast.Expr, hint: str) -> Any:
        """A constant (Python value) or a Ten."""
        c = const_eval(e, self.consts)
        if c is not UNKNOWN:
            return c
        if isinstance(e, ast.ExprName):
            if e.name in self.tens:
                return self.tens[e.name]
            raise NestError(f"`{e.name}` is not a tensor here", e.span, kind="name")
        if isinstance(e, ast.ExprBinary):
            return self.binary(e, hint)
        if isinstance(e, ast.ExprUnary):
            x = self.tensor(e.operand, hint)
            if e.op == "-":
                return Ten(lambda env: -x.fn(env), x.feat)
            if e.op != "+":
                raise _unsupported(f"`{e.op}` on a tensor", e.span)
            return x
        if isinstance(e, ast.ExprCall):
            return self.call(e, hint)
        raise _unsupported(f"this expression ({type(e).__name__}) in a block", e.span)

    def binary(self, e: ast.ExprBinary, hint: str) -> Ten:
        ops: dict[str, Callable[[Any, Any], Any]] = {
            "+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "**": torch.pow}
        if e.op not in ops:
            raise _unsupported(f"`{e.op}` on tensors", e.span)
        op = ops[e.op]
        a, b = self.value(e.left, hint), self.value(e.right, hint)
        fa = a.fn if isinstance(a, Ten) else (lambda env, a=a: a)
        fb = b.fn if isinstance(b, Ten) else (lambda env, b=b: b)
        feats = [v.feat for v in (a, b) if isinstance(v, Ten)]
        if len(feats) == 2 and feats[0] != feats[1] and 1 not in feats:
            raise NestError(f"`{e.op}` of tensors with {feats[0]} and {feats[1]} features",
                            e.span, kind="shape")
        return Ten(lambda env: op(fa(env), fb(env)), max(feats))

    def call(self, e: ast.ExprCall, hint: str) -> Any:
        if isinstance(e.func, ast.ExprCall):  # Block(hyper...)(x): a sub-block
            return self.subblock(e, hint)
        if not isinstance(e.func, ast.ExprName):
            raise _unsupported("calling this expression", e.span)
        name = e.func.name
        if name in self.mems:
            mem = self.mems[name]
            if len(e.args) != 1:
                raise NestError(f"memory `{name}` is read with one argument", e.span,
                                kind="value")
            q = self.tensor(e.args[0], hint)
            # read in the step being compiled (the output: after every step)
            self.reads.setdefault(mem, []).append((len(self.mod.steps), q))
            return mem.compile_read(self, q, e.span)
        decl = self.checked.scope.get(name)
        if decl is not None and decl.kind == "block":
            raise NestError(f"block `{name}` is called as {name}(hyperparameters)(x)", e.span,
                            kind="value")
        return layers.compile_call(self, e, hint)

    def subblock(self, e: ast.ExprCall, hint: str) -> Ten:
        assert isinstance(e.func, ast.ExprCall)
        head = e.func
        if not isinstance(head.func, ast.ExprName):
            raise _unsupported("calling this expression", e.span)
        decl = self.checked.scope.get(head.func.name)
        if decl is None or decl.kind != "block":
            raise NestError(f"`{head.func.name}` is not a block", head.func.span, kind="name")
        checked = self.b.program.lookup(decl)
        names = list(checked.hypers)
        if len(head.args) > len(names):
            raise NestError(f"block `{decl.name}` takes {len(names)} hyperparameters",
                            head.span, kind="value")
        hyper = {names[i]: self.const(a) for i, a in enumerate(head.args)}
        hyper.update({k.name: self.const(k.value) for k in head.kwargs})
        if len(e.args) != 1 or e.kwargs:
            raise NestError(f"block `{decl.name}` takes one input", e.span, kind="value")
        x = self.tensor(e.args[0], hint)
        sub = self.b.decl(checked, hyper, in_feat=x.feat)
        get = self.ref(self.add(decl.name, sub))
        return Ten(lambda env: get(env).run(env, x.fn(env)), sub.out_feat)


def _unsupported(what: str, span: Any) -> NestError:
    err = NestError(f"{what} is not supported by the block compiler yet", span, kind="value")
    err.unsupported = True
    return err


def build_module(program: Any, checked: Checked, backend: str = "chunked",
                 check_finite: bool = False, **hyper: Any) -> Built:
    """A block or model declaration -> nn.Module (see the module docstring). check_finite:
    every memory update checks its state for NaN and inf (a device sync each: for debugging)."""
    mod = Builder(program, backend).decl(checked, hyper)
    for sub in mod.modules():
        if isinstance(sub, memories.Memory):
            sub.check_finite = check_finite
    # found once, not on every forward (a deep copy maps the list onto its own memories)
    mod.tasks = [m for m in mod.modules() if isinstance(m, memories.TaskMLP)]
    # every stateful submodule learns its path: the key of its in-context state
    for path, sub in mod.named_modules():
        if isinstance(sub, layers.Stateful):
            sub.state_key = path
    return mod
