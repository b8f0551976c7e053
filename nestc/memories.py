"""The memories of blocks: what a `memory` declaration becomes in a module.

- `LinearMemory`: `matrix(a, b)` per head with objective l2 or dot and rule gd or dgd. The
  reference tier is the token loop that takes the objective's gradient with torch.func at each
  token (the definition); the chunked tier selects the recurrence it equals: the delta rule,
  the gated delta rule or linear attention, run chunk-parallel by `nestc.ops`.
- `CacheMemory`: softmax attention's key/value cache (`cache`), read by `softmax_attention`.
- `MLPMemory`: an `mlp`/`residual_mlp` per head that learns every token (Titans): gd, dgd or
  momentum on l2/dot, all gradients of a chunk taken at the chunk's starting state. The
  chunked tier writes each token's gradient as outer products and reads through decay-weighted
  sums of them, never forming per-token weights.
- `TaskMLP`: an `mlp`/`residual_mlp` updated every C tokens by gd on the task loss (a CMS
  level, PAPER.md sec. 4); the module's forward runs the sequence chunk by chunk and hands
  each chunk's task-loss gradients to it (`nestc.module.Built.forward`).
- `StaticMLP`: an `mlp`/`residual_mlp` that never updates in context (a Transformer's MLP).
Everything else is reported as not supported yet, with the memory's span.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from nestc import ast
from nestc.check import CHOICES
from nestc.errors import NestError
from nestc.hyper import UNKNOWN, const_eval
from nestc.layers import Stateful
from nestc.ops.mlp_memory.reference import ACT_FNS, mlp_memory_chunk


def _unsupported(what: str, span: Any) -> NestError:
    from nestc.module import _unsupported as unsupported

    return unsupported(what, span)


class Memory(Stateful):
    """A memory of a block. `check_finite` (build(..., check_finite=True)) makes every update
    check its new state and raise FloatingPointError naming the memory and its line."""

    check_finite = False
    name = ""
    env_key = ""  # where its write signals sit in the runtime env
    get: Callable[[dict[str, Any]], Any]  # the running module's instance of this memory
    rule_kw: dict[str, ast.Expr]
    span: Any
    heads: int

    def compile_write(self, scope: Any) -> Callable[[dict[str, Any]], Any]:
        return lambda env: None

    def guard(self, *states: Any) -> None:
        """Raise if a new state holds NaN or inf (only when check_finite is on: it syncs)."""
        if not self.check_finite:
            return
        for x in states:
            if isinstance(x, torch.Tensor) and not bool(torch.isfinite(x).all()):
                raise FloatingPointError(
                    f"{self.span}: memory `{self.name}` has NaN or inf in its state after an "
                    "update; lower its learning rate, normalize its keys, or check its inputs")

    def compile_read(self, scope: Any, q: Any, span: Any) -> Any:
        raise _unsupported(f"reading memory `{self.name}` like a function", span)

    def reader(self, q: Any, span: Any, width: int, out: int) -> Any:
        """The Ten of a read M(q): this memory's `read` of q, which has `width` features."""
        from nestc.module import Ten

        if q.feat != width:
            raise NestError(f"memory `{self.name}` reads {width} features, got {q.feat}",
                            span, kind="shape")
        get = self.get
        return Ten(lambda env: get(env).read(q.fn(env), env), out)

    def _signal(self, scope: Any, name: str, default: Any) -> Any:
        """A rule's lr or retain as [B, T, H]: a constant, one value per token, or per head."""
        e = self.rule_kw.get(name)
        if e is None and default is None:
            return None
        value = default if e is None else scope.value(e, self.name)
        heads = self.heads
        if not hasattr(value, "fn"):
            c = float(value)
            low = c >= 0 if name == "beta" else c > 0  # beta 0: no momentum
            if name in ("retain", "beta") and not (low and c <= 1):
                where = "[0, 1]" if name == "beta" else "(0, 1]"
                raise NestError(f"`{name}` of memory `{self.name}` is in {where}, got {c}",
                                e.span if e is not None else self.span, kind="value")
            return lambda env, like: like.new_full((*like.shape[:2], heads), c)
        if value.feat not in (1, heads):
            raise NestError(f"`{name}` of memory `{self.name}` has {value.feat} features; it "
                            f"is one per head ({heads}) or one per token",
                            e.span if e is not None else self.span, kind="shape")
        fn = value.fn
        return lambda env, like: fn(env).expand(*like.shape[:2], heads)


def _constant(scope: Any, e: ast.Expr) -> float | None:
    """e's value when the hyperparameters fix it, else None."""
    value = const_eval(e, scope.consts)
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
            raise _unsupported("statements inside this kind of memory", c.span)
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


ACTS = ACT_FNS  # the activations an MLP memory takes, by name


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
        raise _unsupported(f"{two_layers} of depth other than 2", call.span)
    return d, hidden, residual, act, depth


def _mlp(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, act: Callable[..., torch.Tensor],
         residual: bool) -> torch.Tensor:
    """act(x A) B, plus x for a residual MLP; batch dims of x and the weights broadcast."""
    y = act(x @ A) @ B
    return y + x if residual else y


def _mlp_weights(*batch: int, d: int, hidden: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Meta-learned initial weights A (d, hidden) and B (hidden, d), at nn.Linear's scale."""
    return (nn.Parameter(torch.empty(*batch, d, hidden).uniform_(-d ** -0.5, d ** -0.5)),
            nn.Parameter(torch.empty(*batch, hidden, d).uniform_(-hidden ** -0.5,
                                                                  hidden ** -0.5)))


def _objective(s: ast.StmtMemory, exprs: dict[str, ast.Expr], what: str,
               allowed: tuple[str, ...] = ("l2", "dot")) -> tuple[str, ast.Expr, ast.Expr]:
    """(l2 | dot | huber, key, value) of `objective l2(M(key), value)`, `dot(...)` or
    `huber(...)` (those in `allowed`)."""
    objective = _call(exprs.get("objective"))
    if objective is None or objective[0] not in allowed:
        names = " or ".join(f"{a}(...)" for a in allowed)
        raise _unsupported(f"{what} whose objective is not {names}", s.span)
    pred, target = objective[1].args
    read = _call(pred)
    if read is None or read[0] != s.name or len(read[1].args) != 1:
        raise NestError(f"the objective of `{s.name}` compares {s.name}(key) with a value",
                        pred.span, kind="value")
    return objective[0], read[1].args[0], target


class _Act(nn.Module):
    """An activation by name, as a module (for nn.Sequential)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTS[self.name](x)


def build(scope: Any, s: ast.StmtMemory) -> Memory:
    structure = _call(s.structure)
    kind = structure[0] if structure else None
    if kind == "cache":
        return CacheMemory(scope, s)
    if kind == "matrix":
        return LinearMemory(scope, s)
    if kind in ("mlp", "residual_mlp") and s.frequency is not None and \
            s.frequency.unit == "never":
        return StaticMLP(scope, s)
    if kind in ("mlp", "residual_mlp") and s.frequency is not None and \
            s.frequency.unit == "token" and _is_task(s):
        return TaskMLP(scope, s)
    if kind in ("mlp", "residual_mlp") and s.frequency is not None and \
            s.frequency.unit == "token" and s.frequency.every is None:
        return MLPMemory(scope, s)
    raise _unsupported(f"a `{kind or 'plain'}` memory updated "
                       f"{'every ' + s.frequency.unit if s.frequency else 'so'}", s.span)


class CacheMemory(Memory):
    """Softmax attention's memory: every token's key and value, kept (PAPER.md sec. 2)."""

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__()
        self.name = s.name
        exprs, choices = _clauses(s)
        freq = s.frequency
        if freq is not None and (freq.unit != "token" or freq.every is not None
                                 or freq.chunk is not None):
            raise _unsupported("a cache written other than `every token`", freq.span)
        if any(choices[k] != default for k, (default, _) in CHOICES.items()):
            raise _unsupported("choices on a cache (it is read before nothing, per sample)",
                               s.span)
        if "key" not in exprs or "value" not in exprs:
            raise NestError(f"cache `{s.name}` needs `key` and `value` clauses", s.span,
                            kind="value")
        self.key = scope.tensor(exprs["key"], s.name)
        self.value = scope.tensor(exprs["value"], s.name)
        self.value_feat = self.value.feat

    def compile_write(self, scope: Any) -> Callable[[dict[str, Any]], Any]:
        k, v = self.key.fn, self.value.fn
        return lambda env: (k(env), v(env))

    def attend(self, q: torch.Tensor, heads: int, rope: bool, env: dict[str, Any]
               ) -> torch.Tensor:
        """Causal attention of q over every key so far (those of earlier pieces first). With
        rope, queries and keys are rotated by their positions in the whole stream."""
        k, v = env[self.env_key]
        state = env["__state__"]
        B, T, _ = q.shape
        split = lambda x: x.view(B, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)  # (B, heads, T, d)
        past = state.given.get(self.state_key)
        start = 0 if past is None else past[0].shape[2]
        if rope:
            q, k = rotary(q, start), rotary(k, start)
        if past is not None:  # the cache holds keys as attention saw them (rotated)
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        state.out[self.state_key] = (k, v)
        if start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i sits at position start + i and sees every key up to there
            mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril_(start)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, T, -1)


def rotary(x: torch.Tensor, start: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (B, heads, T, d) at positions start .. start + T - 1:
    pairs (x_i, x_{i + d/2}) rotated by pos * base ** (-2i / d), as in Llama."""
    d = x.shape[-1]
    half = d // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / d)
    pos = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)
    angle = pos[:, None] * freq  # (T, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:2 * half]
    rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    return torch.cat([rotated, x[..., 2 * half:]], -1)


class StaticMLP(Memory):
    """An MLP memory that never updates in context: its weights are the outer level's.
    mlp(d, hidden, depth = 2, act = "gelu"): Linear(d, hidden), act, ..., Linear(hidden, d).
    residual_mlp(d, hidden = d, act = "silu"): x + W1 act(W2 x)."""

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__()
        self.name = s.name
        d, hidden, self.residual, act, depth = _mlp_structure(scope, s)
        if s.per_head:
            raise _unsupported("a per-head MLP that never updates", s.span)
        init = _call(s.init)
        if init is not None and init[0] != "meta":
            raise _unsupported("an initial state other than `meta` for a static MLP", s.span)
        widths = [d] + [hidden] * (depth - 1) + [d]
        parts: list[nn.Module] = []
        for i in range(depth):
            parts.append(nn.Linear(widths[i], widths[i + 1], bias=False))
            if i < depth - 1:
                parts.append(_Act(act))
        self.net = nn.Sequential(*parts)
        self.feat = d

    def compile_read(self, scope: Any, q: Any, span: Any) -> Any:
        return self.reader(q, span, self.feat, self.feat)

    def read(self, x: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        y = self.net(x)
        return y + x if self.residual else y


class LinearMemory(Memory):
    """A matrix memory per head, S: [B, H, a, b], read as M(x) = x S (x: [.., a])."""

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__()
        self.name = s.name
        self.backend = scope.b.backend
        structure = _call(s.structure)
        assert structure is not None
        _, call = structure
        self.a, self.b = (scope.size(x, "a matrix memory's size") for x in call.args)
        exprs, choices = _clauses(s)
        if choices["state"] != "per sample":
            raise _unsupported("a memory shared across the batch", s.span)
        self.read_before = choices["read"] == "before write"
        self.stopped = choices["backprop"] == "stopped"
        freq = s.frequency
        if freq is None or freq.unit != "token" or freq.every is not None:
            raise _unsupported("a matrix memory updated other than `every token`", s.span)
        self.chunk = scope.size(freq.chunk, "a chunk") if freq.chunk is not None else 64
        self.objective, self.rule, self.gated = self._resolve(scope, s, exprs, choices)
        init = _call(s.init)
        self.init = init[0] if init else "zeros"
        if self.init not in ("zeros", "meta"):
            raise _unsupported(f"initial state `{self.init}` for a matrix memory", s.span)
        self.span = s.span

    def _resolve(self, scope: Any, s: ast.StmtMemory, exprs: dict[str, ast.Expr],
                 choices: dict[str, str]) -> tuple[str, str, bool]:
        objective, self.key_expr, self.value_expr = _objective(s, exprs, "a matrix memory")
        rule = _call(exprs.get("rule"))
        if rule is None or rule[0] not in ("gd", "dgd"):
            raise _unsupported("a matrix memory whose rule is not gd or dgd", s.span)
        self.rule_kw = {k.name: k.value for k in rule[1].kwargs}
        if "clip" in self.rule_kw:
            raise _unsupported("`clip` on a matrix memory", self.rule_kw["clip"].span)
        literal = rule[0] == "dgd" and choices["dgd"] == "literal"
        if literal and objective == "dot":
            raise _unsupported("literal DGD with a dot objective", s.span)
        return objective, rule[0], rule[0] == "dgd" and not literal

    # writes: the per-token signals, computed where the memory is declared ---------------------

    def compile_write(self, scope: Any) -> Callable[[dict[str, Any]], Any]:
        k = scope.tensor(self.key_expr, self.name)
        v = scope.tensor(self.value_expr, self.name)
        if k.feat % self.a or v.feat % self.b or k.feat // self.a != v.feat // self.b:
            raise NestError(f"memory `{self.name}` is matrix({self.a}, {self.b}) per head, but "
                            f"its keys have {k.feat} features and its values {v.feat}",
                            self.span, kind="shape")
        self.heads = k.feat // self.a
        if self.init == "meta":
            self.initial = nn.Parameter(torch.zeros(self.heads, self.a, self.b))
        lr = self._signal(scope, "lr", 1.0)
        retain = self._signal(scope, "retain", None)
        stop = self.stopped

        def write(env: dict[str, Any]) -> dict[str, Any]:
            kk, vv = k.fn(env), v.fn(env)
            B, T, _ = kk.shape
            out = {"k": kk.view(B, T, self.heads, self.a), "v": vv.view(B, T, self.heads, self.b),
                   "lr": lr(env, kk), "retain": None if retain is None else retain(env, kk)}
            if stop:
                out = {n: None if x is None else x.detach() for n, x in out.items()}
            return out

        return write

    # reads --------------------------------------------------------------------------------

    def compile_read(self, scope: Any, q: Any, span: Any) -> Any:
        return self.reader(q, span, self.heads * self.a, self.heads * self.b)

    def read(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        w = env[self.env_key]
        state = env["__state__"]
        B, T, _ = q.shape
        q = q.view(B, T, self.heads, self.a)
        S0 = state.given.get(self.state_key)
        if S0 is None and self.init == "meta":
            S0 = self.initial.expand(B, -1, -1, -1)
        run = self._reference if self.backend == "reference" else self._chunked
        o, S = run(q, w, S0)
        self.guard(S)
        state.out[self.state_key] = S
        return o.reshape(B, T, self.heads * self.b)

    def _reference(self, q: torch.Tensor, w: dict[str, Any], S0: Any) -> Any:
        """The definition: token by token, the rule applied to the objective's gradient."""
        k, v, lr, retain = w["k"], w["v"], w["lr"], w["retain"]
        B, T, H, _ = k.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        S = (q.new_zeros(B, H, self.a, self.b, dtype=acc) if S0 is None else S0.to(acc))

        def loss(S: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
            pred = torch.einsum("nha,nhav->nhv", kt, S)
            if self.objective == "l2":
                return 0.5 * ((pred - vt) ** 2).sum()
            return -(pred * vt).sum()

        grad = torch.func.grad(loss)
        outs = []
        for t in range(T):
            kt, vt = k[:, t].to(acc), v[:, t].to(acc)
            eta = lr[:, t].to(acc)[..., None, None]  # (B, H, 1, 1)
            r = None if retain is None else retain[:, t].to(acc)[..., None, None]
            if self.read_before:
                outs.append(torch.einsum("nha,nhav->nhv", q[:, t].to(acc), S))
            if self.gated:  # DGD, gated: retention first, then the gradient at that state
                S = S if r is None else r * S
                S = S - eta * grad(S, kt, vt)
            elif self.rule == "dgd":  # literal: S (r I - eta k k^T) - eta grad, in x S form
                kk = torch.einsum("nha,nhc->nhac", kt, kt)
                decay = (1.0 if r is None else r) * S - eta * (kk @ S)
                S = decay - eta * grad(S, kt, vt)
            else:  # gd: the gradient at the state before retention
                S = (S if r is None else r * S) - eta * grad(S, kt, vt)
            if not self.read_before:
                outs.append(torch.einsum("nha,nhav->nhv", q[:, t].to(acc), S))
        o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, self.b, dtype=acc)
        return o.to(q.dtype), S

    def _chunked(self, q: torch.Tensor, w: dict[str, Any], S0: Any) -> Any:
        """The recurrence the objective and rule amount to, chunk-parallel (docs/semantics.md)."""
        from nestc.ops.delta_rule.chunk import chunk_delta_rule
        from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
        from nestc.ops.linear_attention.chunk import chunk_linear_attention

        k, v, lr, retain = w["k"], w["v"], w["lr"], w["retain"]
        if self.read_before:  # the state before token t = the state after a shifted write
            k, v, lr = (F.pad(x, (0, 0) * (x.ndim - 2) + (1, 0)) for x in (k, v, lr))
            retain = None if retain is None else F.pad(retain, (0, 0, 1, 0), value=1.0)
            q = F.pad(q, (0, 0, 0, 0, 0, 1))
        T = q.shape[1]
        C = min(self.chunk, max(T, 1))  # exact for any chunk: a short piece needs no padding
        delta, gated, Cd = chunk_delta_rule, chunk_gated_delta_rule, C
        if self.backend == "triton" and q.dtype != torch.float64:  # the kernels: float32 inside
            from nestc.ops.delta_rule.triton import MAX_K, triton_delta_rule
            from nestc.ops.gated_delta_rule.triton import triton_gated_delta_rule

            if q.shape[-1] <= MAX_K:  # wider keys: the chunked tier
                # their chunk is at most 64 (the result does not depend on it)
                delta, gated, Cd = triton_delta_rule, triton_gated_delta_rule, 64
        o: torch.Tensor
        S: torch.Tensor | None
        if self.objective == "dot":
            g = None if retain is None else _log(retain)
            o, S = chunk_linear_attention(q, k, v, lr, g, S0, C)
        elif retain is None and (self.rule == "gd" or self.gated):
            o, S = delta(q, k, v, lr, 1.0, S0, True, Cd)
        else:
            r = torch.ones_like(lr) if retain is None else retain
            if not self.gated:  # these divide by r: below 1e-6 it is taken as 1e-6
                r = r.clamp_min(1e-6)
            if self.gated:
                beta, vv = lr, v
            elif self.rule == "gd":  # r S - lr (S^T k - v) k^T: gated with beta = lr / r
                beta, vv = lr / r, v * r[..., None]
            else:  # literal: S (r I - 2 lr k k^T) + lr v k^T
                beta, vv = 2 * lr / r, v * (r[..., None] / 2)
            o, S = gated(q, k, vv, _log(r), beta, 1.0, S0, True, Cd)
        if self.read_before:
            o = o[:, : T - 1]
        return o, S



def _log(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(1e-30).log()  # a factor of 0 forgets all: exp(-69) per token is 0 here


class MLPMemory(Memory):
    """A 2-layer MLP per head learning in context, with weights A (d, h) and B (h, d):
    M(x) = act(x A) B for `mlp`, x + act(x A) B for `residual_mlp` (docs/semantics.md)."""

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__()
        self.name, self.span = s.name, s.span
        self.backend = scope.b.backend
        self.d, self.hidden, self.residual, act, _ = _mlp_structure(
            scope, s, "an in-context MLP memory")
        self.act, self.act_name = ACTS[act], act
        self.lets: dict[str, ast.Expr] = {}
        exprs, choices = _clauses(s, self.lets)
        if choices["state"] != "per sample":
            raise _unsupported("a memory shared across the batch", s.span)
        if choices["partial"] != "flush":
            raise _unsupported("`partial carry`", s.span)
        self.read_before = choices["read"] == "before write"
        self.stopped = choices["backprop"] == "stopped"
        assert s.frequency is not None
        self.chunk = scope.size(s.frequency.chunk, "a chunk") if s.frequency.chunk else 1
        self.objective, self.key_expr, self.value_expr = _objective(
            s, exprs, "an MLP memory", ("l2", "dot", "huber"))
        objective = _call(exprs["objective"])
        assert objective is not None
        delta = {k.name: k.value for k in objective[1].kwargs}.get("delta")
        self.delta = 1.0 if delta is None else float(scope.const(delta))
        if not self.delta > 0:
            raise NestError(f"the huber `delta` of memory `{self.name}` must be positive, got "
                            f"{self.delta}", delta.span if delta is not None else s.span,
                            kind="value")
        rule = _call(exprs.get("rule"))
        if rule is None or rule[0] not in ("gd", "dgd", "momentum"):
            raise _unsupported("an MLP memory whose rule is not gd, dgd or momentum", s.span)
        if rule[0] == "dgd" and choices["dgd"] == "literal":
            raise _unsupported("literal DGD for an MLP memory", s.span)
        self.momentum = rule[0] == "momentum"
        self.rule_kw = {k.name: k.value for k in rule[1].kwargs}
        init = _call(s.init)
        if init is None or init[0] != "meta":
            raise _unsupported("an in-context MLP memory whose initial state is not `meta`",
                               s.span)
        self.per_head = s.per_head
        self.siblings: tuple[_Siblings, int] | None = None  # set by run_siblings_as_one

    def compile_write(self, scope: Any) -> Callable[[dict[str, Any]], Any]:
        if self._reads_self(self.key_expr):
            raise _unsupported(f"a key that reads memory `{self.name}` itself",
                               self.key_expr.span)
        if self._reads_self(self.key_expr, lets=True):  # names the memory's own `let`s
            from nestc.module import Ten
            key = _SelfExpr(self, scope).compile(self.key_expr)
            k = Ten(lambda env: key.node(env, None, 0, None, 1), key.feat)
        else:
            k = scope.tensor(self.key_expr, self.name)
        self.heads = k.feat // self.d
        # a value that reads this memory (a self-generated target) is computed per chunk, at
        # the chunk's first weights; any other value once, from the whole sequence
        # (and one that names the memory's own `let`s, which only _SelfExpr resolves)
        v = _SelfExpr(self, scope).compile(self.value_expr) if self._reads_self(
            self.value_expr, lets=True) else scope.tensor(self.value_expr, self.name)
        if k.feat % self.d or v.feat != k.feat or (not self.per_head and k.feat != self.d):
            raise NestError(f"memory `{self.name}` maps {self.d} features"
                            f"{' per head' if self.per_head else ''}, but its keys have "
                            f"{k.feat} and its values {v.feat}", self.span, kind="shape")
        H, d = self.heads, self.d
        self.A, self.B = _mlp_weights(H, d=d, hidden=self.hidden)
        signals = {n: self._signal(scope, n, default)
                   for n, default in (("lr", 1.0), ("retain", None), ("beta", None))}
        clip = self.rule_kw.get("clip")
        self.clip: float | None = None
        if clip is not None:
            self.clip = float(scope.const(clip))
            if not self.clip > 0:
                raise NestError(f"`clip` of memory `{self.name}` must be positive, got "
                                f"{self.clip}", clip.span, kind="value")
        if self.momentum and signals["beta"] is None:
            raise NestError(f"the momentum rule of `{self.name}` needs `beta`", self.span,
                            kind="value")
        if self.momentum and _constant(scope, self.rule_kw["beta"]) == 0:
            self.momentum, signals["beta"] = False, None  # S_t = u_t: plain gd
        self.signals = tuple(n for n, f in signals.items() if f is not None)
        self.value_key = v.key if isinstance(v, _SelfTen) else None  # None: given values
        # stop_grad(M(x)) of a block tensor x as wide as the memory: the triton tier's kernel
        # generates those values itself from x (_fused)
        source = v.source if isinstance(v, _SelfTen) and self.backend == "triton" else None
        if source is not None and source.feat != H * d:
            source = None
        self.value_source = source is not None
        stop = self.stopped

        def write(env: dict[str, Any]) -> dict[str, Any]:
            kk = k.fn(env)
            B, T, _ = kk.shape
            out: dict[str, Any] = {"k": kk.view(B, T, H, d)}
            if isinstance(v, _SelfTen):
                # a snapshot of env, not env: env is about to hold this dict, and a closure
                # over env would make a cycle that keeps every activation alive
                # (node, heads, tile): one per memory run, or one tiled for all (_Siblings)
                out["value"] = [(v.bind(dict(env)), H, 1)]
                if source is not None:
                    out["vs"] = source.fn(env).view(B, T, H, d).detach()
            else:
                out["v"] = v.fn(env).view(B, T, H, d)
            out.update({n: None if f is None else f(env, kk) for n, f in signals.items()})
            if stop:
                out = {n: x.detach() if isinstance(x, torch.Tensor) else x
                       for n, x in out.items()}
            return out

        return write

    def compile_read(self, scope: Any, q: Any, span: Any) -> Any:
        return self.reader(q, span, self.heads * self.d, self.heads * self.d)

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

    def _values(self, w: dict[str, Any], weights: tuple[torch.Tensor, torch.Tensor], a: int,
                b: int) -> torch.Tensor:
        """Values of tokens a..b-1, (N, H, n, d): given, or generated at `weights`, each
        memory's (w["value"]: one node per memory that runs, _Siblings) at its own heads."""
        if "v" in w:
            return w["v"][:, :, a:b]
        A, B = weights
        vs, first = [], 0
        for node, heads, tile in w["value"]:
            Ai, Bi = A[:, first:first + heads], B[:, first:first + heads]
            v = node(lambda x, Ai=Ai, Bi=Bi: self._read_all(Ai, Bi, x), a, b, tile)
            vs.append(v.unflatten(-1, (heads, self.d)).transpose(1, 2))
            first += heads
        return (vs[0] if len(vs) == 1 else w["stack"](vs)).to(A.dtype)

    def _read_all(self, A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """M(x) at one set of weights per sequence and head: x (N, n, H * d) -> the same."""
        xh = x.unflatten(-1, (A.shape[1], self.d)).transpose(1, 2).to(A.dtype)  # (N, H, n, d)
        return _mlp(xh, A, B, self.act, self.residual).transpose(1, 2).flatten(2)

    # the function of one token, for torch.func -------------------------------------------

    def _loss(self, A: torch.Tensor, B: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
        y = _mlp(k, A, B, self.act, self.residual)
        if self.objective == "huber":  # 1/2 x^2 within delta, delta (|x| - delta / 2) beyond
            return F.huber_loss(y, v, reduction="sum", delta=self.delta)
        return 0.5 * ((y - v) ** 2).sum() if self.objective == "l2" else -(y * v).sum()

    def _grads(self, A: torch.Tensor, B: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token gradients at one state: A, B (N, H, ...), k, v (N, H, C, d) ->
        (N, H, C, d, h) and (N, H, C, h, d)."""
        g = torch.func.grad(self._loss, argnums=(0, 1))
        per_token = torch.func.vmap(g, in_dims=(None, None, 0, 0))
        return torch.func.vmap(torch.func.vmap(per_token))(A, B, k, v)

    # reads -------------------------------------------------------------------------------

    def read(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        # traced by torch.compile, alone: _Split's note to _Stack would break the graph
        if self.siblings is not None and not torch.compiler.is_compiling():
            group, i = self.siblings
            return group.read(i, q, env)
        return self._read_alone(q, env)

    def _read_alone(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        qh, w, given = self._inputs(q, env)
        y, out = self._run(qh, w, given)
        self._store(env, out)
        return y.transpose(1, 2).reshape(*q.shape[:2], -1).to(q.dtype)

    def _inputs(self, q: torch.Tensor, env: dict[str, Any]
                ) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        """A read's query (N, H, T, d), write signals (N, H, T, ...) and the state before it,
        in float32 at least."""
        Bn, T, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        given = env["__state__"].given.get(self.state_key)
        if given is None:
            A, B = (p.to(acc).expand(Bn, *p.shape) for p in (self.A, self.B))
            given = {"M": (A, B), "S": (torch.zeros_like(A), torch.zeros_like(B)),
                     "start": (A, B), "offset": 0}
        qh = q.view(Bn, T, self.heads, self.d).transpose(1, 2).to(acc)  # (N, H, T, d)
        w = {n: x.transpose(1, 2).to(acc) if isinstance(x, torch.Tensor) else x
             for n, x in env[self.env_key].items()}
        return qh, w, given

    def _run(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, Any]]:
        run = self._reference if self.backend == "reference" else \
            self._fused if self._fusable(q, w, given) else self._chunked
        return run(q, w, given)

    def _store(self, env: dict[str, Any], out: dict[str, Any]) -> None:
        self.guard(*out["M"], *out["S"])
        env["__state__"].out[self.state_key] = out

    def sibling_key(self) -> tuple[Any, ...]:
        """What memories must share to run as one (_Siblings): all but their weights, state
        and the tensors they are written and read with."""
        return (self.d, self.hidden, self.heads, self.residual, self.act_name,
                self.read_before, self.stopped, self.chunk, self.objective, self.delta,
                self.momentum, self.clip, self.backend, self.signals,
                self.value_key is None, self.value_source)

    def _fusable(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> bool:
        """Whether the triton tier runs this read through nestc.ops.mlp_memory's kernel (_fused):
        an MLP or residual MLP (gelu or silu) learning by l2 given values or its own reading of
        a block tensor under stop_grad, in float32 or a 16-bit type, at sizes whose kernels
        fit in a GPU's shared memory (`mlp_kernel_fits`)."""
        if self.backend != "triton" or self.objective != "l2" or \
                not ("v" in w or "vs" in w) or self.act_name not in ("gelu", "silu"):
            return False
        from nestc.ops.mlp_memory.triton import mlp_kernel_fits

        return (q.dtype != torch.float64
                and mlp_kernel_fits(self.d, self.hidden, self.chunk, q.dtype)
                and q.shape[2] > 0)

    def _fused(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> Any:
        """The chunked tier's computation as one Triton kernel (nestc/ops/mlp_memory) up to
        the piece's last chunk boundary, the rest (a partial last chunk) on the chunked tier;
        a piece within one chunk runs on the kernel whole. A piece that starts inside a chunk
        hands the kernel the chunk's first weights (given["start"]: its first gradients are
        taken there) and how far in it starts. The kernel's MLP is act(x A) B: a residual
        memory, x + act(x A) B, learns v as that MLP learns v - k, and reads q plus that
        MLP's reading of q. Self-generated values (w["vs"]: x of stop_grad(M(x))) are the
        kernel's v_self."""
        from nestc.ops.mlp_memory.triton import triton_mlp_memory

        (A, B), (SA, SB) = given["M"], given["S"]
        T, C, offset = q.shape[2], self.chunk, given["offset"]
        n = T if offset + T <= C else T - (offset + T) % C
        cut = {name: x[:, :, :n] if isinstance(x, torch.Tensor) else x for name, x in w.items()}
        vs = cut.get("vs")
        v = cut["v"] if vs is None else vs if self.residual else torch.zeros_like(vs)
        if self.residual:
            v = v - cut["k"]
        y, (A, B, SA, SB) = triton_mlp_memory(
            q[:, :, :n], cut["k"], v, cut["lr"], cut["retain"],
            cut["beta"] if self.momentum else None, A, B, SA, SB, act=self.act_name,
            clip=self.clip, read_before=self.read_before, chunk=C, v_self=vs,
            grad_at=given["start"] if offset else None, offset=offset)
        if self.residual:
            y = y + q[:, :, :n]
        end = (offset + n) % C
        # the next chunk's first weights: these, where the kernel ended on a boundary, else
        # the first weights of the chunk it ended in
        start = (A, B) if end == 0 else given["start"] if offset else given["M"]
        out = {"M": (A, B), "S": (SA, SB), "start": start, "offset": end}
        if n == T:
            return y, out
        rest = {name: x[:, :, n:] if isinstance(x, torch.Tensor) else x for name, x in w.items()}
        if "value" in w:  # generated values take the tokens' places in the whole piece
            rest["value"] = [(lambda read, a, b, tile, node=node: node(read, a + n, b + n, tile),
                              heads, tile) for node, heads, tile in w["value"]]
        y_rest, out = self._chunked(q[:, :, n:], rest, out)
        return torch.cat([y, y_rest], 2), out

    def _segments(self, T: int, offset: int) -> list[tuple[int, int]]:
        """[start, end) of each chunk of this piece: the first ends where the chunk that an
        earlier piece began ends."""
        bounds, t = [], 0
        first = (self.chunk - offset) % self.chunk or self.chunk
        while t < T:
            end = min(T, t + (first if t == 0 else self.chunk))
            bounds.append((t, end))
            t = end
        return bounds

    def _factors(self, w: dict[str, Any], a: int, b: int) -> tuple[Any, Any, Any]:
        """lr, retain and momentum factors of tokens a..b-1, each (N, H, n) or None."""
        def cut(x: Any) -> Any:
            return None if x is None else x[:, :, a:b]
        return cut(w["lr"]), cut(w["retain"]), cut(w["beta"])

    def _reference(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> Any:
        """The definition: token by token; every gradient of a chunk at its starting state."""
        (A, B), (SA, SB), (A0, B0) = given["M"], given["S"], given["start"]
        offset, T = given["offset"], q.shape[2]
        outs = []
        for t in range(T):
            if (offset + t) % self.chunk == 0:
                A0, B0 = A, B
            lr = w["lr"][:, :, t, None, None]  # (N, H, 1, 1), like each weight's batch dims
            retain, beta = (None if x is None else x[:, :, t, None, None]
                            for x in (w["retain"], w["beta"]))
            gA, gB = self._grads(A0, B0, w["k"][:, :, t:t + 1], self._values(w, (A0, B0), t, t + 1))
            gA, gB = gA[:, :, 0], gB[:, :, 0]
            if self.clip is not None:  # the gradient's norm, at most clip
                lr = lr * self._clipped(gA.pow(2).sum((-2, -1)) + gB.pow(2).sum((-2, -1))
                                        )[..., None, None]
            uA, uB = -lr * gA, -lr * gB
            if self.read_before:
                outs.append(self._read_one(A, B, q[:, :, t]))
            if self.momentum:
                SA, SB = beta * SA + uA, beta * SB + uB
                uA, uB = SA, SB
            r = 1.0 if retain is None else retain
            A, B = r * A + uA, r * B + uB
            if not self.read_before:
                outs.append(self._read_one(A, B, q[:, :, t]))
        y = torch.stack(outs, 2) if outs else q.new_zeros(q.shape)
        return y, {"M": (A, B), "S": (SA, SB), "start": (A0, B0),
                   "offset": (offset + T) % self.chunk}

    def _read_one(self, A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (N, H, d) read at weights (N, H, d, h) and (N, H, h, d)."""
        return _mlp(x[..., None, :], A, B, self.act, self.residual)[..., 0, :]

    def _chunked(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> Any:
        """Chunk by chunk, without forming any token's weights (docs/semantics.md).

        For one token, the gradient of an l2, dot or huber objective of M(k) = act(k A) B (+ k) is a
        pair of outer products: dL/dA = k^T delta and dL/dB = act(z)^T e, with z = k A,
        e = dL/dM(k) and delta = (e B^T) * act'(z). Every weight a token sees is then the
        chunk's base weights (and momentum) scaled, plus a decay-weighted sum of those outer
        products, W[t, s] = (the retention and momentum products from s to t) * -lr_s. A read
        x A_t is thus c_t x A + m_t x S_A + sum_s W[t, s] (x . k_s) delta_s: attention-like
        products over the chunk's tokens, and likewise for B."""
        (A, B), (SA, SB), (A0, B0) = given["M"], given["S"], given["start"]
        offset, T = given["offset"], q.shape[2]
        outs = []
        for i, (a, b) in enumerate(self._segments(T, offset)):
            if i > 0 or offset == 0:
                A0, B0 = A, B
            lr, retain, beta = self._factors(w, a, b)
            y, A, B, SA, SB = mlp_memory_chunk(
                q[:, :, a:b], w["k"][:, :, a:b], self._values(w, (A0, B0), a, b), lr, retain,
                beta if self.momentum else None, A, B, SA, SB, self.act_name, self.clip,
                self.read_before, grad_at=(A0, B0), residual=self.residual,
                objective=self.objective, huber_delta=self.delta)
            outs.append(y)
        y = torch.cat(outs, 2) if outs else q.new_zeros(q.shape)
        return y, {"M": (A, B), "S": (SA, SB), "start": (A0, B0),
                   "offset": (offset + T) % self.chunk}

    def _clipped(self, sq: torch.Tensor) -> torch.Tensor:
        """The factor that scales a gradient of squared norm sq to norm at most clip:
        clip / max(norm, clip), with no square root at 0."""
        assert self.clip is not None
        return self.clip * torch.rsqrt(sq.clamp_min(self.clip ** 2))


class _Siblings:
    """MLP memories of one declaration that run as one: the same structure (sibling_key), one
    read each, all of the same query, after all of them are written (the projection memories
    of self-modifying Titans). Their heads are stacked into one chunked computation, which
    computes for each head what it computes alone; every memory keeps its own weights and
    in-context state. The first read runs them all and leaves the others' outputs in the env.
    """

    def __init__(self, gets: list[Callable[[dict[str, Any]], Any]], key: str,
                 same_values: bool) -> None:
        self.gets, self.key = gets, key
        self.same_values = same_values  # self-generated, by one expression of one tensor

    def read(self, i: int, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        ys = env.get(self.key)
        if ys is None:
            ys = env[self.key] = self._run(q, env)
        return ys[i]

    def _run(self, q: torch.Tensor, env: dict[str, Any]) -> list[torch.Tensor]:
        mems: list[MLPMemory] = [get(env) for get in self.gets]
        parts = [m._inputs(q, env) for m in mems]
        if len({given["offset"] for _, _, given in parts}) > 1:  # states not run together
            return [m._read_alone(q, env) for m in mems]
        record = _Record(len(mems))

        def stack(xs: list[torch.Tensor], kind: str = "any") -> torch.Tensor:
            return _Stack.apply(record, kind, *xs)

        ws, givens = [w for _, w, _ in parts], [given for _, _, given in parts]
        w: dict[str, Any] = {"stack": stack}
        for name, x in ws[0].items():
            if isinstance(x, torch.Tensor):
                w[name] = stack([wi[name] for wi in ws])
            elif x is None or not self.same_values:
                w[name] = None if x is None else [node for wi in ws for node in wi[name]]
            else:  # the same self-generated values: one node for all, tiled
                node, heads, _ = x[0]
                w[name] = [(node, heads * len(mems), len(mems))]
        given: dict[str, Any] = {n: tuple(stack(list(ts)) for ts in zip(*(g[n] for g in givens)))
                                 for n in ("M", "S")}
        offset = givens[0]["offset"]
        # a piece that starts a chunk takes no gradient at a chunk's first weights
        given["start"] = given["M"] if offset == 0 else \
            tuple(stack(list(ts)) for ts in zip(*(g["start"] for g in givens)))
        given["offset"] = offset
        y, out = mems[0]._run(stack([qh for qh, _, _ in parts], "read"), w, given)
        names = [(n, j) for n in ("M", "S", "start") for j in range(2)]
        pieces = _Split.apply(record, len(mems), y.to(q.dtype),
                              *(out[n][j] for n, j in names))
        ys = list(pieces[:len(mems)])
        for i, m in enumerate(mems):
            got = {(n, j): pieces[(k + 1) * len(mems) + i] for k, (n, j) in enumerate(names)}
            m._store(env, {"M": (got["M", 0], got["M", 1]), "S": (got["S", 0], got["S", 1]),
                           "start": (got["start", 0], got["start", 1]),
                           "offset": out["offset"]})
        return ys


# the backward pass running now (a private torch API; without it every note is trusted)
_graph_task: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: 0)


class _Record:
    """Which memories of one run of _Siblings got a gradient in a backward pass: for their
    reads ("read") and for any output ("any"). _Split notes it; the run's _Stacks read it later
    in the same pass (every _Stack's output is consumed by the computation whose outputs
    _Split takes, so the engine runs _Split first). A pass that reaches a _Stack without
    _Split (only through a graph a create_graph backward built from the stacked tensors) finds
    no note of its own and gives every memory its gradient: zeros, not None."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.task: int | None = None  # the pass that noted `got`
        self.got: dict[str, list[bool]] = {}

    def note(self, reads: list[bool], any_output: list[bool]) -> None:
        self.task, self.got = _graph_task(), {"read": reads, "any": any_output}

    def got_for(self, kind: str) -> list[bool]:
        return self.got[kind] if self.task is not None and self.task == _graph_task() \
            else [True] * self.n


class _Stack(torch.autograd.Function):
    """torch.cat(xs, 1) of one tensor per memory of a _Siblings run, whose backward gives a
    memory none of the gradient (None) when nothing reached its outputs (_Split; `kind`
    "read": the query, which only its read depends on; "any": everything else): what it gets
    when it runs alone, so an optimizer skips a weight as it would then."""

    @staticmethod
    def forward(ctx: Any, record: _Record, kind: str, *xs: torch.Tensor) -> torch.Tensor:
        ctx.record, ctx.kind, ctx.sizes = record, kind, [x.shape[1] for x in xs]
        return torch.cat(xs, 1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        parts = g.split(ctx.sizes, 1)
        got = ctx.record.got_for(ctx.kind)
        return (None, None, *(p if got_i else None for p, got_i in zip(parts, got)))


class _Split(torch.autograd.Function):
    """The stacked reads y (N, n H, T, d) and states (N, n H, ...) of a _Siblings run -> each
    memory's read (N, T, H d) and states, fresh contiguous tensors as when it runs alone
    (views would forbid in-place use), noting in the record which memories a gradient
    reached."""

    @staticmethod
    def forward(ctx: Any, record: _Record, n: int, y: torch.Tensor, *states: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        N, GH, T, d = y.shape
        H = GH // n
        ctx.record, ctx.n, ctx.H = record, n, H
        ctx.like = [((N, H, T, d), y.dtype, y.device)] + \
            [((x.shape[0], H, *x.shape[2:]), x.dtype, x.device) for x in states]
        reads = []
        for i in range(n):
            read = y.new_empty(N, T, H * d)
            read.view(N, T, H, d).copy_(y[:, i * H:(i + 1) * H].transpose(1, 2))
            reads.append(read)
        return (*reads, *(x[:, i * H:(i + 1) * H].clone(memory_format=torch.contiguous_format)
                          for x in states for i in range(n)))

    @staticmethod
    def backward(ctx: Any, *gs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        n, H = ctx.n, ctx.H
        rows = [list(gs[j * n:(j + 1) * n]) for j in range(len(ctx.like))]
        rows[0] = [None if g is None else g.unflatten(-1, (H, -1)).transpose(1, 2)
                   for g in rows[0]]
        ctx.record.note([g is not None for g in rows[0]],
                        [any(row[i] is not None for row in rows) for i in range(n)])
        grads: list[torch.Tensor | None] = []
        for row, (shape, dtype, device) in zip(rows, ctx.like):
            grads.append(None if all(g is None for g in row) else torch.cat(
                [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                 for g in row], 1))
        return (None, None, *grads)


def run_siblings_as_one(writes: dict[Memory, int],
                        reads: dict[Memory, list[tuple[int, Any]]]) -> None:
    """Group a declaration's MLP memories that can run as one (_Siblings), given the step
    that writes each memory (in the order they are declared) and, per read, the step that
    reads it and its query (a Ten: one object is one tensor). Not on the reference tier,
    which stays the definition."""
    groups: dict[Any, list[MLPMemory]] = {}
    for mem in writes:
        if isinstance(mem, MLPMemory) and mem.backend != "reference" and \
                len(reads.get(mem, [])) == 1:
            q = reads[mem][0][1]
            groups.setdefault((mem.sibling_key(), id(q)), []).append(mem)
    for members in groups.values():
        if len(members) < 2 or max(writes[m] for m in members) >= \
                min(reads[m][0][0] for m in members):
            continue
        keys = {m.value_key for m in members}
        group = _Siblings([m.get for m in members], f"__siblings_{members[0].env_key}",
                          same_values=len(keys) == 1 and None not in keys)
        for i, m in enumerate(members):
            m.siblings = (group, i)


def run_each_alone(module: nn.Module) -> nn.Module:
    """module, its memories ungrouped (_Siblings): each runs alone, as on the reference tier;
    what tests and benchmarks/siblings.py compare a group with."""
    for m in module.modules():
        if isinstance(m, MLPMemory):
            m.siblings = None
    return module


def _is_task(s: ast.StmtMemory) -> bool:
    objective = _call(_clauses(s, {})[0].get("objective"))
    return objective is not None and objective[0] == "task"


class TaskMLP(Memory):
    """A CMS level: an MLP whose weights (per sample) change once every C tokens, by gd on the
    task loss summed over the chunk's tokens, all taken at the chunk's weights; in-context
    state {"W": (A, B), "grad": (dA, dB) so far this chunk, "offset": tokens into it}.
    M(x) = act(x A) B for `mlp`, x + act(x A) B for `residual_mlp` (docs/semantics.md)."""

    def __init__(self, scope: Any, s: ast.StmtMemory) -> None:
        super().__init__()
        self.name, self.span = s.name, s.span
        assert s.frequency is not None
        self.d, self.hidden, self.residual, act, _ = _mlp_structure(
            scope, s, "an MLP memory learning from the task loss")
        self.act = ACTS[act]
        if s.per_head:
            raise _unsupported("a per-head MLP memory learning from the task loss", s.span)
        self.chunk = scope.size(s.frequency.every, "a period") if s.frequency.every is not None \
            else 1
        if s.frequency.chunk is not None:
            raise _unsupported("`in chunks of` on a memory updated every N tokens", s.span)
        exprs, choices = _clauses(s)
        if choices["state"] != "per sample":
            raise _unsupported("a memory shared across the batch", s.span)
        self.stopped = choices["backprop"] == "stopped"
        rule = _call(exprs.get("rule"))
        if rule is None or rule[0] != "gd":
            raise _unsupported("a task-loss memory whose rule is not gd", s.span)
        kwr = {k.name: scope.const(k.value) for k in rule[1].kwargs}
        if "clip" in kwr:
            raise _unsupported("`clip` on a memory learning from the task loss", s.span)
        self.lr, self.retain = float(kwr.get("lr", 1.0)), float(kwr.get("retain", 1.0))
        # `= meta`, or `= f` for another task-loss memory f (the nested CMS): this memory
        # starts each of f's chunks from f's weights, so f learns its initial state
        self.parent: Callable[[dict[str, Any]], TaskMLP] | None = None
        self.nested = False  # another task-loss memory starts from this one's weights
        init = _call(s.init)
        if s.init is not None and init is not None and init[0] != "meta":
            where = s.init.span
            parent = scope.mems.get(init[0])
            if not isinstance(parent, TaskMLP) or init[1].args or init[1].kwargs:
                raise _unsupported("a task-loss memory whose initial state is not `meta` or "
                                   "another task-loss memory", where)
            if (parent.d, parent.hidden, parent.residual, parent.act) != \
                    (self.d, self.hidden, self.residual, self.act):
                raise NestError(f"memory `{self.name}` starts from `{parent.name}`, which has "
                                "another structure: both must be the same MLP", where,
                                kind="shape")
            if parent.chunk % self.chunk:
                raise NestError(f"memory `{self.name}` is reset to `{parent.name}` every "
                                f"{parent.chunk} tokens, which is not a whole number of its "
                                f"chunks of {self.chunk}", where, kind="frequency",
                                hint=f"make {parent.chunk} a multiple of {self.chunk}")
            self.parent = parent.get
            parent.nested = True
        else:  # meta-learned initial weights (a nested level has its parent's instead)
            self.A, self.B = _mlp_weights(d=self.d, hidden=self.hidden)

    def compile_read(self, scope: Any, q: Any, span: Any) -> Any:
        return self.reader(q, span, self.d, self.d)

    def weights(self, env: dict[str, Any], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This piece's weights, registered once per piece with the driver, which hands back
        the task loss's gradient with respect to them: carried in the state, else the
        meta-learned ones. A memory that starts from a parent's weights is reset to them
        whenever the parent's chunk starts, and registers the parent too.

        The gradient is local to the piece: the driver differentiates a view of the weights
        made for this piece, so what reaches the piece's loss through earlier pieces (a
        sequence memory's state, a faster level's updates) is held fixed. The exception is a
        parent (`nested`): it is differentiated through everything its weights reach over its
        whole chunk, the faster level's updates included, which is how it learns that
        level's initial state."""
        state = env["__state__"]
        if self.state_key in state.task:  # read again in this piece: the same weights
            return state.task[self.state_key][2]
        given = state.given.get(self.state_key)
        if self.parent is not None:
            parent = self.parent(env)
            start = parent.weights(env, batch)
            if (state.given.get(parent.state_key) or {}).get("offset", 0) == 0:
                given = {"W": start}  # the parent's chunk starts here: reset
        base = given["W"] if given is not None else \
            (self.A.expand(batch, -1, -1), self.B.expand(batch, -1, -1))
        # without the outer level's graph (evaluation, or a state passed in), the task loss is
        # still differentiated with respect to them: they become leaves, kept for the chunk
        base = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in base)
        used = base if self.nested else tuple(w.view_as(w) for w in base)
        state.task[self.state_key] = (self, base, used)
        return used  # type: ignore[return-value]

    def read(self, x: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        A, B = self.weights(env, x.shape[0])
        return _mlp(x, A, B, self.act, self.residual)

    def learn(self, state: Any, weights: tuple[torch.Tensor, ...], grads: Any,
              tokens: int) -> None:
        """After `tokens` more tokens with these weights: the state for what follows. `grads`
        is the task-loss gradient of the tokens read since it was last given, or None when
        the driver has not taken it yet (mid-chunk); the update lands when the chunk is
        full, and the driver always gives the gradient by then."""
        given = state.given.get(self.state_key) or {}
        pending = given.get("grad")
        if grads is not None:
            grads = tuple(torch.zeros_like(w) if g is None else g
                          for g, w in zip(grads, weights))
            if pending is not None:
                grads = tuple(p + g for p, g in zip(pending, grads))
        else:
            grads = pending
        offset = given.get("offset", 0) + tokens
        if offset == self.chunk:
            assert grads is not None, self.state_key
            weights = tuple(self.retain * w - self.lr * g for w, g in zip(weights, grads))
            grads, offset = None, 0
        self.guard(*weights)
        state.out[self.state_key] = {"W": weights, "grad": grads, "offset": offset}


class _SelfTen:
    """A memory's value that reads the memory itself (a self-generated target): computed for
    tokens a..b-1 with the memory read at the weights the caller gives. `tile` n evaluates it
    for n memories at once: the block's tensors repeated n times along the features, the read
    at n memories' stacked weights (every operation is element-wise or a read). `key` is equal
    for expressions that compute the same from the same tensors, whichever memory reads."""

    def __init__(self, node: Callable[..., Any], feat: int, key: Any) -> None:
        self.node: Callable[..., Any] = node
        self.feat, self.key = feat, key
        # x, when this is stop_grad(M(x)) of a block tensor x: the form the MLP kernel
        # generates itself (nestc.ops.mlp_memory's v_self)
        self.source: Any = None

    def bind(self, env: dict[str, Any]) -> Callable[..., Any]:
        return lambda read, a, b, tile=1: self.node(env, read, a, b, tile)


def _tiled(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat(*[1] * (x.dim() - 1), n)


class _SelfExpr:
    """Compiles the expressions of a memory's `let`s and value: the block's tensors (sliced to
    the tokens asked for), reads of the memory itself, element-wise math and arithmetic."""

    def __init__(self, mem: MLPMemory, scope: Any) -> None:
        self.mem, self.scope = mem, scope

    def compile(self, e: ast.Expr) -> _SelfTen:
        if isinstance(e, ast.ExprName) and e.name in self.mem.lets:
            return self.compile(self.mem.lets[e.name])
        out = self._compile(e)
        out.source = self._source(e)
        return out

    def _source(self, e: ast.Expr) -> Any:
        """The block tensor x when e is stop_grad(M(x)), M this memory; else None."""
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

    def _compile(self, e: ast.Expr) -> _SelfTen:
        from nestc.layers import MATH
        from nestc.module import _unsupported as unsupported

        mem, scope = self.mem, self.scope
        if isinstance(e, ast.ExprName) and e.name in scope.tens:
            t = scope.tens[e.name]

            def leaf(env: Any, read: Any, a: int, b: int, tile: int) -> torch.Tensor:
                # one feature that is not the memory's whole width broadcasts: not tiled
                whole = t.feat != 1 or mem.heads * mem.d == 1
                return _tiled(t.fn(env)[:, a:b], tile if whole else 1)

            return _SelfTen(leaf, t.feat, ("tensor", id(t)))
        if isinstance(e, ast.ExprCall) and isinstance(e.func, ast.ExprName):
            if len(e.args) != 1 or e.kwargs:
                raise unsupported(f"`{e.func.name}(...)` inside a memory", e.span)
            x = self.compile(e.args[0])
            if e.func.name == mem.name:
                return _SelfTen(lambda env, read, a, b, tile: read(x.node(env, read, a, b, tile)),
                                x.feat, ("read", x.key))
            fn = MATH.get(e.func.name)
            if fn is None:
                raise unsupported(f"`{e.func.name}` inside a memory", e.span)
            return _SelfTen(lambda env, read, a, b, tile: fn(x.node(env, read, a, b, tile)),
                            x.feat, (e.func.name, x.key))
        if isinstance(e, ast.ExprBinary) and e.op in "+-*/":
            ops: dict[str, Callable[..., Any]] = {"+": torch.add, "-": torch.sub,
                                                  "*": torch.mul, "/": torch.div}
            op = ops[e.op]
            sides = [self.constant(x) for x in (e.left, e.right)]
            left, right = (c if c is not None else self.compile(x)
                           for c, x in zip(sides, (e.left, e.right)))
            feat = max(x.feat for x in (left, right) if isinstance(x, _SelfTen))
            return _SelfTen(lambda env, read, a, b, tile: op(
                left.node(env, read, a, b, tile) if isinstance(left, _SelfTen) else left,
                right.node(env, read, a, b, tile) if isinstance(right, _SelfTen) else right),
                feat, (e.op, *(x.key if isinstance(x, _SelfTen) else ("constant", x)
                               for x in (left, right))))
        raise unsupported("this expression inside a memory", e.span)

    def constant(self, e: ast.Expr) -> Any:
        from nestc.hyper import UNKNOWN, const_eval

        v = const_eval(e, self.scope.consts)
        return None if v is UNKNOWN else v
