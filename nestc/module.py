"""Blocks and models at run time: the base class of their generated modules.

nestc/codegen/block.py generates, for a block or model at its hyperparameters, a subclass of
`Built` whose `__init__` constructs its submodules (layers, memories, sub-blocks; names that
depend only on the spec, so every back end has the same `state_dict` keys) and whose `run`
is straight-line code over tensors. `build_module` generates that source, runs it and
instantiates the class: `Program.build` and `nestc compile` share one generator.

In-context state (memory states, short-convolution windows, attention caches) travels in a
dict keyed by each stateful submodule's path: `forward(x, state=None, return_state=False)`.
Feeding a sequence in pieces, passing each piece's returned state into the next, equals
feeding it whole. docs/semantics.md defines what every memory computes.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nestc import layers, memories
from nestc.check import Checked
from nestc.errors import NestError
from nestc.ops.utils import upto

# the in-context state's entry for a call's last output whose target, the next token, the next
# call brings (not a submodule's path: those have no spaces)
NEXT = "next token"

# "triton": the delta-rule memories and Titans' MLP memory through nestc.ops' Triton kernels,
# the rest as "chunked"
BACKENDS = ("reference", "chunked", "triton")
Env = dict[str, Any]  # a run's: memory writes by submodule name, "__state__", "__self__"


class State:
    """The in-context state of one forward: read from `given`, written to `out`."""

    def __init__(self, given: dict[str, Any] | None) -> None:
        self.given = given or {}
        self.out: dict[str, Any] = {}
        # task-loss memories read in this piece: path -> (memory, the weights it read)
        self.task: dict[str, Any] = {}


class Built(nn.Module):
    """One block or model. A generated subclass constructs its submodules in `__init__`
    (then calls `finish`) and computes its output from its input in `run(env, x)`."""

    in_feat: int | None = None  # the input's width, 0 for token ids (None: not checked)
    out_feat = 0  # the width of the output (the vocabulary of a model's logits)
    # a model's task loss, for its memories that learn from it: "next_token" is
    # cross_entropy(<output>, next(<input>)), the form built so far; where its objective is
    # written when it is another (forward then needs task=)
    objective: str | None = None
    objective_where: str | None = None

    def __init__(self, name: str, kind: str, backend: str = "chunked") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.decl_name, self.kind, self.backend = name, kind, backend
        self.tasks: list[Any] = []  # its task-loss memories, at any depth (set by finish)
        # its memories read above their declarations, at chunk starts, at any depth (finish)
        self.starts: list[Any] = []
        self.flushing: list[Any] = []  # its memories under `partial chunk flush` (finish)
        self.stateful: dict[str, Any] = {}  # its stateful submodules by state key (finish)

    def finish(self) -> None:
        """Once the submodules are constructed: every memory learns where its writes sit in
        a run's env (its name), every stateful submodule its path (the key of its in-context
        state: a parent's finish, which runs last, gives the full path), and the task-loss
        memories are found once, not on every forward (a deep copy maps the list onto its own
        memories)."""
        for name, sub in self.named_children():
            if isinstance(sub, memories.Memory):
                sub.env_key = name
        for path, sub in self.named_modules():
            if isinstance(sub, layers.Stateful):
                sub.state_key = path
        self.tasks = [m for m in self.modules() if isinstance(m, memories.TaskMLP)]
        self.starts = [m for m in self.modules() if isinstance(m, memories.Memory)
                       and getattr(m, "starts", False)]
        self.flushing = [m for m in self.modules() if isinstance(m, memories.Memory) and m.flush]
        # every in-context state this module and its sub-blocks keep, by its key (the full
        # path from this module: a sub-block's own finish ran first, with shorter paths)
        for sub in self.modules():
            if isinstance(sub, Built):
                sub.stateful = {m.state_key: m for m in sub.modules()
                                if isinstance(m, layers.Stateful)}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every generated class gets its own copy of `forward` (the same code in a code
        object of its own): torch.compile keeps its compiled graphs per code object, at most
        8 (torch._dynamo.config.recompile_limit), and guards each on the module's class, so
        with one shared `forward` every model compiled in a process took one of those 8
        entries and the ninth ran eagerly, with only a log line to say so."""
        super().__init_subclass__(**kwargs)
        if "forward" not in vars(cls):
            shared = Built.forward
            own = types.FunctionType(shared.__code__.replace(), shared.__globals__,
                                     shared.__name__, shared.__defaults__, shared.__closure__)
            own.__kwdefaults__ = shared.__kwdefaults__
            own.__doc__, own.__qualname__ = shared.__doc__, f"{cls.__qualname__}.forward"
            cls.forward = own  # type: ignore[method-assign]

    def run(self, env: Env, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("generated by nestc.codegen.block")

    def forward(self, x: torch.Tensor, state: dict[str, Any] | None = None,
                return_state: bool = False, targets: torch.Tensor | None = None,
                task: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None, *,
                _env: Env | None = None) -> Any:
        """x: [B, T, dim] for a block, token ids [B, T] for a model; returns y ([B, T, dim]
        or logits), and the in-context state after the last token if return_state.

        Memories that learn from the task loss (`objective task`) need it per token: a model
        takes it from its `train` objective, with `targets` ([B, T] next tokens, -100 where
        none; default: x shifted by one, the last token without one); a block takes
        `task(y, start, stop)`, the loss summed over the tokens start..stop-1 whose outputs
        are y. `_env`: the run of an enclosing module, when it calls this one as a sub-block
        (its generated code does, through __call__, so hooks on sub-blocks run)."""
        if _env is not None:
            if self.tasks and torch.compiler.is_compiling():  # (see _eager_in_chunks)
                return _eager_run(self, _env, x)
            return self.run(_env, x)
        self._check_input(x)
        if state:
            self._check_state(state, x.shape[0])
        if targets is not None and targets.shape != x.shape[:2]:
            raise ValueError(f"`{self.decl_name}`: targets must have the tokens' shape "
                             f"{list(x.shape[:2])}, got {list(targets.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:  # an empty piece or batch: nothing to
            # compute, the state goes on as it was (no sequence writes a shared one)
            y = x.new_zeros(*x.shape[:2], self.out_feat, dtype=torch.get_default_dtype()
                            if x.dtype in (torch.int64, torch.int32) else x.dtype)
            return (y, dict(state or {})) if return_state else y
        tasks = self.tasks
        # the last token's task loss waits for its target, the next call's first token (a
        # model's next-token loss with the targets it implies; TaskMLP.defers)
        defer = task is None and targets is None and any(m.defers for m in tasks)
        if tasks and _sharded(self):
            raise NestError(f"`{self.decl_name}` has memories that learn from the task loss, "
                            "whose gradients are taken inside its forward; FSDP's fully_shard "
                            "reshards the parameters when such a backward ends, so sharding "
                            "this model is not supported yet", None, kind="value",
                            hint="train it data parallel with DDP (nestc train under torchrun)",
                            unsupported=True)
        if not tasks and not self.starts:
            ctx = State(state)
            y, out = self.run({"__state__": ctx}, x), self.flushed(ctx.out)
        else:
            if tasks and torch.is_inference_mode_enabled():
                # the levels' gradients need autograd, which inference mode switches off even
                # inside enable_grad: run outside it, as evaluation, on ordinary copies of
                # inference tensors
                with torch.inference_mode(False), torch.no_grad():
                    x, targets, state = (_ordinary(t) for t in (x, targets, state))
                    if task is None:
                        task = self.task_loss(x, targets)
                    y, out = self.forward_in_chunks(x, state, task, tasks, defer)
            else:
                if task is None and tasks:
                    task = self.task_loss(x, targets)
                run = _eager_in_chunks if tasks and torch.compiler.is_compiling() else \
                    Built.forward_in_chunks
                y, out = run(self, x, state, task, tasks, defer)
        return (y, out) if return_state else y

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, state: dict[str, Any] | None = None,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A model's continuation of `prompt` ([B, P] token ids): `tokens` more, each drawn
        from its logits / temperature (the top_k largest, if given; temperature 0: the
        largest), fed back one at a time with the in-context state. Its levels learn in
        context from the prompt and from what it writes, as one pass over the whole would
        (docs/semantics.md). `state`: the in-context state before the prompt. Returns
        ([B, P + tokens] ids, the state after them; the last token is not fed)."""
        if self.kind != "model" or prompt.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"generate: `{self.decl_name}` is a {self.kind}; generate takes a "
                             "model and token ids")
        if prompt.ndim != 2:
            raise ValueError(f"generate: the prompt is [B, P] token ids, got shape "
                             f"{list(prompt.shape)}")
        if prompt.shape[1] == 0 or tokens < 1:
            raise ValueError("generate: the prompt needs at least one token, and it writes at "
                             f"least one (got {prompt.shape[1]} and {tokens})")
        if not temperature >= 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"generate: temperature is at least 0 and top_k at least 1 (or "
                             f"None), got {temperature} and {top_k}")
        out, x = [prompt], prompt
        for _ in range(tokens):
            logits, state = self(x, state=state, return_state=True)
            last = logits[:, -1].float()
            if temperature == 0:
                x = last.argmax(-1, keepdim=True)
            else:
                # from the largest down (a tiny temperature made inf - inf = NaN of the rest)
                last = (last - last.max(-1, keepdim=True).values) / temperature
                if top_k is not None:
                    kth = last.topk(min(top_k, last.shape[-1]), -1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                x = torch.multinomial(last.softmax(-1), 1, generator=generator)
            x = x.to(prompt.dtype)
            out.append(x)
        return torch.cat(out, 1), dict(state or {})

    def flushed(self, out: dict[str, Any]) -> dict[str, Any]:
        """The state a call returns: every memory under `partial chunk flush` ends the chunk
        the call ends inside (a flushed chunk never goes on: its "piece" goes too)."""
        for m in self.flushing:
            if m.state_key in out:
                out[m.state_key] = m.flushed(out[m.state_key])
        return out

    def task_loss(self, x: torch.Tensor, targets: torch.Tensor | None
                  ) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
        if self.objective_where is not None:
            raise NestError("a task loss other than cross_entropy(<output>, next(<input>)) for "
                            "memories with `objective task` is not supported by the block "
                            "compiler yet", None, kind="value", file=self.objective_where,
                            hint="pass task=fn(y, start, stop) to forward", unsupported=True)
        if self.objective is None:
            raise NestError(f"`{self.decl_name}` has memories that learn from the task loss: "
                            "build them inside a model with a `train` objective, or pass "
                            "task=fn(y, start, stop) to forward", None, kind="value")
        if targets is None:
            targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)

        def loss(y: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            return _next_token_loss(y, targets[:, start:stop])

        return loss

    def _check_input(self, x: Any) -> None:
        """ValueError (TypeError for what is not a tensor) naming what the module takes, where
        torch's own error about the first matmul or embedding said it less clearly."""
        name = f"`{self.decl_name}`"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} takes a tensor, got {type(x).__name__}")
        if self.in_feat == 0:
            if x.ndim != 2 or x.dtype.is_floating_point or x.dtype.is_complex or \
                    x.dtype == torch.bool:
                raise ValueError(f"{name} takes token ids [B, T] (an integer tensor), got "
                                 f"{x.dtype} of shape {list(x.shape)}")
        elif self.in_feat is not None:
            if x.ndim != 3 or x.shape[-1] != self.in_feat or not x.dtype.is_floating_point:
                raise ValueError(f"{name} takes [B, T, {self.in_feat}] floats, got {x.dtype} "
                                 f"of shape {list(x.shape)}")
            weight = next((p for p in self.parameters() if p.is_floating_point()), None)
            if weight is not None and weight.dtype != x.dtype and \
                    not torch.is_autocast_enabled(x.device.type):
                raise ValueError(f"{name} has {weight.dtype} weights and got {x.dtype} input: "
                                 "convert one to the other's dtype, or run it under "
                                 "torch.autocast")

    def forward_in_chunks(self, x: torch.Tensor, state: dict[str, Any] | None,
                          task: Callable[..., torch.Tensor] | None, tasks: list[Any],
                          defer: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run piece by piece, a piece ending wherever a task-loss memory's chunk does, or
        that of a memory read above its declaration (which reads the chunk's first state); after
        each, hand every such memory the gradient of the piece's task loss with respect to
        the weights as this piece used them (local: what came in from earlier pieces is held
        fixed); the memory sums them over its chunk and updates when the chunk is full
        (docs/semantics.md, "Memories that learn from the task loss"). A parent of a nested
        level is the exception: its gradient is taken once, when its chunk is full or the
        input ends, of the loss summed since the chunk began, through everything its weights
        reached (the child's reads and updates)."""
        given = dict(state or {})
        outer = torch.is_grad_enabled()
        marks = [entry["evaluation"] for entry in given.values()
                 if isinstance(entry, dict) and "evaluation" in entry]
        if marks and (outer or any(mark != self._versions() for mark in marks)):
            # a piece begun without grad mode: the outer level does not differentiate
            # through the evaluation's graph, nor can anything once the parameters it saved
            # changed in place (an optimizer step): the piece starts again here, from the
            # values (the waiting token's loss goes without a gradient)
            given = {key: {k: v for k, v in entry.items() if k not in ("piece", "evaluation")}
                     if isinstance(entry, dict) else entry
                     for key, entry in detached(given).items()}
        # the levels' gradients are differentiable (second order) for the outer level unless
        # every level stops backprop; also without grad mode when a parent's gradient runs
        # through a faster level's updates (CMSNested): evaluation computes what training
        # computes. Other levels' gradients are local to their piece (TaskMLP.weights), so
        # no gradient runs through another's.
        through = any(not m.stopped for m in tasks) and (outer or any(m.nested for m in tasks))
        # a graph that came in with the state (a piece going on, a waiting loss): the call
        # that goes on from it may not be the only one
        inherited = bool(_going_on(given))
        waiting = given.pop(NEXT, None)
        if waiting is not None:  # the last call's last token, now that its target is here
            given = self._score_waiting(waiting, x[:, 0], given, through)
        # per memory read and not yet differentiated: [memory, weights, first piece];
        # per first piece: the task loss summed from it on
        pending: dict[str, list[Any]] = {}
        losses: dict[int, torch.Tensor] = {}
        outs, start, T = [], 0, x.shape[1]
        while start < T:
            if not outer and (start == 0 or not through) and not any(
                    isinstance(entry, dict) and "piece" in entry for entry in given.values()):
                # evaluation, a piece starting: what came in is held fixed (the gradients
                # are local to their piece; a parent's runs back no further than the call),
                # so no graph need reach behind it
                given = detached(given)
            # each level's tokens into its chunk (chunks count from the stream's start, or
            # from the call's under `partial chunk flush`)
            into = {m.state_key: (given.get(m.state_key) or {}).get("offset", 0)
                    for m in (*tasks, *self.starts)}
            stop = upto(start + min(m.chunk - into[m.state_key]
                                    for m in (*tasks, *self.starts)), T)
            # where the task-loss levels' piece ends: a piece cut before it (by the call's
            # end, or by a memory read at its chunks' starts) goes on in the next one
            # (no min(..., default=): torch.compile breaks its graph there)
            cut = bool(tasks) and stop < start + min([m.chunk - into[m.state_key]
                                                      for m in tasks] or [0])
            ctx = State(given)
            # grad mode for the levels' gradients (none without task-loss memories)
            with torch.set_grad_enabled(outer or bool(tasks)):
                y = self.run({"__state__": ctx}, x[:, start:stop])
                for key, (mem, _, used) in ctx.task.items():
                    entry = pending.setdefault(key, [mem, used, start])
                    assert all(a is b for a, b in zip(entry[1], used)), key
                if ctx.task:
                    assert task is not None
                    loss = task(y, start, stop)
                    for first in {entry[2] for entry in pending.values()}:
                        losses[first] = losses[first] + loss if first in losses else loss
                # a level's gradient is taken every piece (local to it, see TaskMLP.weights);
                # a parent's once per chunk, or when the input ends
                due: dict[int, list[str]] = {}
                for key in ctx.task:
                    mem = pending[key][0]
                    if not mem.nested or stop == T or into[key] + stop - start == mem.chunk:
                        due.setdefault(pending[key][2], []).append(key)
                grads: dict[str, tuple[Any, ...]] = {}
                for first, keys in due.items():
                    weights = [w for key in keys for w in pending[key][1]]
                    # the outer level's backward, a parent's summed loss, the levels' piece
                    # going on, the last token's waiting loss, or another call given the same
                    # state may still need this graph: keep it
                    keep = outer or through or len(pending) > len(keys) or cut or \
                        (defer and stop == T) or (start == 0 and inherited)
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
            if cut:
                # the levels' piece goes on (in this call, or the next) with the weights this
                # part used (the same tensors), so that its gradient reaches what this part
                # wrote (a sequence memory's state) as if the piece were one
                for key, (mem, _, used) in ctx.task.items():
                    if key in ctx.out and not mem.nested:
                        ctx.out[key] = {**ctx.out[key], "piece": used}
            given = {**given, **ctx.out}
            outs.append(y if outer else y.detach())  # (evaluation holds no graph it need not)
            start = stop
        given = self.flushed(given)
        if defer:  # the last token's loss, with the weights each level read for it
            with torch.enable_grad():  # (a view made without grad mode has no graph; a
                # clone holds no more of the piece's outputs than that token's)
                given[NEXT] = {"y": y[:, -1:].clone(),
                               "used": {key: used for key, (mem, _, used) in ctx.task.items()
                                        if mem.defers}}
        y = torch.cat(outs, 1)
        if not outer:  # what evaluation returns holds no graph...
            y = y.detach()
            going_on = _going_on(given)
            if going_on:
                # ...but for the levels' piece that the call ended inside: the next call goes
                # on with it through what this part wrote, as one pass would (the graph
                # reaches back to the piece's start: at most a chunk of the fastest level)
                for key in going_on:
                    given[key] = {**given[key], "evaluation": self._versions()}
            else:
                given = detached(given)
        return y, given

    def _check_state(self, state: dict[str, Any], batch: int) -> None:
        """A state passed in is this module's (another module's entries were ignored), for a
        batch of this size (else an error about targets the caller never gave, or a shape
        deep inside a memory): a ValueError that says which."""
        unknown = [key for key in state if key not in self.stateful and key != NEXT]
        if unknown:
            raise ValueError(f"`{self.decl_name}`: the state has entries for submodules it does "
                             f"not have ({', '.join(map(repr, unknown[:3]))}"
                             f"{', ...' if len(unknown) > 3 else ''}); its own are "
                             f"{', '.join(map(repr, list(self.stateful)[:3]))}"
                             f"{', ...' if len(self.stateful) > 3 else ''}")
        for key, entry in state.items():
            if getattr(self.stateful.get(key), "shared", False):
                continue  # one state for the batch: no batch dim
            first = next(iter(_tensors(entry)), None)
            if first is not None and first.dim() > 0 and first.shape[0] != batch:
                raise ValueError(f"`{self.decl_name}`: the state is of a batch of "
                                 f"{first.shape[0]} sequences ({key!r}), the input of {batch}")

    def _versions(self) -> int:
        """The parameters' version counters summed: it grows whenever one changes in place."""
        return sum(p._version for p in self.parameters())

    def _score_waiting(self, waiting: dict[str, Any], target: torch.Tensor,
                       given: dict[str, Any], through: bool) -> dict[str, Any]:
        """The last call's last output scored against its target, this call's first token:
        each level it read gets that loss's gradient with respect to the weights it read then
        (TaskMLP.learn_late). Without its graph (a state the caller detached, or one from an
        evaluation given to a call in grad mode) the loss cannot be differentiated: its
        chunk goes without it."""
        tasks = {m.state_key: m for m in self.tasks}
        used = {key: ws for key, ws in waiting["used"].items() if key in tasks}
        ctx = State(given)
        with torch.set_grad_enabled(True):
            weights = [w for ws in used.values() for w in ws]
            if waiting["y"].requires_grad and all(w.requires_grad for w in weights):
                loss = _next_token_loss(waiting["y"], target[:, None])
                gs = iter(torch.autograd.grad(loss, weights, allow_unused=True,
                                              create_graph=through, retain_graph=True))
            else:
                gs = iter(torch.zeros_like(w) for w in weights)
            for key, ws in used.items():
                g = tuple(next(gs) for _ in ws)
                if tasks[key].stopped:
                    g = tuple(None if t is None else t.detach() for t in g)
                tasks[key].learn_late(ctx, g)
        return {**given, **ctx.out}


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of an in-context state entry, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree \
        if isinstance(tree, (tuple, list)) else ()
    return [t for item in items for t in _tensors(item)]


def _going_on(state: dict[str, Any]) -> list[str]:
    """The entries of a state that hold a graph the next call goes on with: a levels' piece
    that the call ended inside, and the last token's waiting loss."""
    return [key for key, entry in state.items()
            if isinstance(entry, dict) and ("piece" in entry or key == NEXT)]


def _next_token_loss(y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A model's task loss (cross_entropy(<output>, next(<input>))) summed over tokens whose
    targets are not -100."""
    return torch.nn.functional.cross_entropy(y.flatten(0, 1), targets.flatten().long(),
                                             ignore_index=-100, reduction="sum")


@torch.compiler.disable
def _eager_in_chunks(module: Built, x: torch.Tensor, state: dict[str, Any] | None,
                     task: Callable[..., torch.Tensor] | None, tasks: list[Any],
                     defer: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """forward_in_chunks outside torch.compile's graphs, for a module with task-loss memories:
    their gradients (torch.autograd.grad of each piece's loss with respect to weights the piece
    makes) would find no path through a compiled graph, which takes those weights in as
    intermediates, and come back as zeros (the levels would not learn); and the outer level's
    backward through them is a double backward, which compiled graphs do not take."""
    _warn_eager(module.decl_name)
    return module.forward_in_chunks(x, state, task, tasks, defer)


@torch.compiler.disable
def _eager_run(module: Built, env: Env, x: torch.Tensor) -> torch.Tensor:
    """A sub-block with task-loss memories, compiled on its own, runs eagerly: the weights its
    memories read are made inside its run, so the enclosing driver's gradients with respect
    to them would find no path through a compiled graph (_eager_in_chunks)."""
    _warn_eager(module.decl_name)
    return module.run(env, x)


_warned_eager: set[str] = set()


def _warn_eager(name: str) -> None:
    if name not in _warned_eager:
        _warned_eager.add(name)
        warnings.warn(f"nestc: torch.compile runs `{name}` eagerly: its memories that learn from "
                      "the task loss take gradients inside its forward, which a compiled graph "
                      "cannot give them (docs/semantics.md)", stacklevel=3)


def _sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (fully_shard) sharded any of module's parameters (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def _ordinary(tree: Any) -> Any:
    """A tensor, or an in-context state, with every inference tensor (made under
    torch.inference_mode, which autograd refuses) copied into an ordinary one."""
    if isinstance(tree, torch.Tensor):
        return tree.clone() if tree.is_inference() else tree
    if isinstance(tree, dict):
        return {k: _ordinary(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_ordinary(v) for v in tree)
    return tree


def detached(tree: Any) -> Any:
    """An in-context state (dicts, tuples and lists of tensors) with every tensor detached,
    without a waiting token (NEXT: its loss needs the graph; without it that token's share
    is left out, as it would be anyway)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: detached(v) for k, v in tree.items() if k != NEXT}
    if isinstance(tree, (tuple, list)):
        return type(tree)(detached(v) for v in tree)
    return tree


def build_module(program: Any, checked: Checked, backend: str = "chunked",
                 check_finite: bool = False, **hyper: Any) -> Built:
    """A block or model declaration -> nn.Module: its generated class (nestc.compile), built
    for `backend`. check_finite: every memory update checks its state for NaN and inf (a
    device sync each: for debugging)."""
    from nestc.compile import generate_module
    from nestc.runtime import _exec

    source, name = generate_module(program, checked, hyper)
    mod = _exec(source, name)(backend)
    for sub in mod.modules():
        if isinstance(sub, memories.Memory):
            sub.check_finite = check_finite
    return mod
