"""The memories of blocks at run time: what generated code constructs and calls.

nestc/codegen/memories.py reads a `memory` declaration, checks it and emits the constructor
call, with plain values, of one of these classes, the call of its `write` (the per-token
signals, where the memory is declared) and of its reads (`read(q, env)`; a cache's `attend`).

- `LinearMemory`: `matrix(a, b)` per head with objective l2 or dot and rule gd or dgd. The
  reference tier is the token loop that takes the objective's gradient with torch.func at each
  token (the definition); the chunked tier runs the recurrence it equals, which the compiler
  selects: the delta rule, the gated delta rule or linear attention, run chunk-parallel by
  `nestc.ops`.
- `CacheMemory`: softmax attention's key/value cache (`cache`), read by `softmax_attention`.
- `MLPMemory`: an `mlp`/`residual_mlp` per head that learns every token (Titans): gd, dgd or
  momentum on l2/dot, all gradients of a chunk taken at the chunk's starting state. The
  chunked tier writes each token's gradient as outer products and reads through decay-weighted
  sums of them, never forming per-token weights.
- `TaskMLP`: an `mlp`/`residual_mlp` updated every C tokens by gd on the task loss (a CMS
  level, PAPER.md sec. 4); the module's forward runs the sequence chunk by chunk and hands
  each chunk's task-loss gradients to it (`nestc.module.Built.forward`).
- `StaticMLP`: an `mlp`/`residual_mlp` that never updates in context (a Transformer's MLP).

The env of a run (`nestc.module.Built.run`) holds each memory's write under its submodule's
name (`env_key`, set by Built.finish), the in-context state ("__state__") and the running
module ("__self__").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from nestc.layers import Stateful
from nestc.ops.mlp_memory import MIN_KERNEL_CLIP
from nestc.ops.mlp_memory.dgd import mlp_dgd_chunk
from nestc.ops.mlp_memory.reference import ACT_FNS, chunk_gradients, mlp_memory_chunk
from nestc.ops.utils import clipped, float32_inside, log_factors, upto

ACTS = ACT_FNS  # the activations an MLP memory takes, by name


class Memory(Stateful):
    """A memory of a block, named `name` in the spec at `where` (file:line:col).
    `check_finite` (build(..., check_finite=True)) makes every update check its new state and
    raise FloatingPointError naming the memory and its line."""

    check_finite = False
    env_key = ""  # where its write sits in the env of a run: its submodule's name
    flush = False  # `partial chunk flush`: a call's last partial chunk ends with the call

    def flushed(self, state: Any) -> Any:
        """Its in-context state at the end of a call that ends inside a chunk, under
        `partial chunk flush`: the chunk ended (a memory whose chunk changes its result)."""
        return state

    def __init__(self, name: str, where: str) -> None:
        super().__init__()
        self.name, self.where = name, where

    def guard(self, *states: Any) -> None:
        """Raise if a new state holds NaN or inf (only when check_finite is on: it syncs)."""
        if not self.check_finite:
            return
        for x in states:
            if isinstance(x, torch.Tensor) and not bool(torch.isfinite(x).all()):
                raise FloatingPointError(
                    f"{self.where}: memory `{self.name}` has NaN or inf in its state after an "
                    "update; lower its learning rate, normalize its keys, or check its inputs")


def signal(x: Any, like: torch.Tensor, heads: int) -> torch.Tensor:
    """A rule's lr, retain or beta as [B, T, heads], like's first two dims: x is a number, or
    a tensor of one value per token ([B, T, 1]) or per head ([B, T, heads])."""
    if isinstance(x, torch.Tensor):
        return x.expand(*like.shape[:2], heads)
    return like.new_full((*like.shape[:2], heads), float(x))


def tiled(x: torch.Tensor, n: int) -> torch.Tensor:
    """x repeated n times along its last dim (a generated value evaluated for n memories)."""
    return x if n == 1 else x.repeat(*[1] * (x.dim() - 1), n)


def _mlp(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, act: Callable[..., torch.Tensor],
         residual: bool) -> torch.Tensor:
    """act(x A) B, plus x for a residual MLP; batch dims of x and the weights broadcast."""
    y = act(x @ A) @ B
    return y + x if residual else y


def objective_loss(y: torch.Tensor, v: torch.Tensor, objective: str, delta: float = 1.0
                   ) -> torch.Tensor:
    """Each token's loss of reading y against value v, summed over the features (the last
    dim): l2 is 1/2 |y - v|^2, dot -<y, v>, huber 1/2 x^2 within delta of v and
    delta (|x| - delta / 2) beyond."""
    if objective == "l2":
        return 0.5 * (y - v).pow(2).sum(-1)
    if objective == "dot":
        return -(y * v).sum(-1)
    return F.huber_loss(y, v, reduction="none", delta=delta).sum(-1)


def _mlp_weights(*batch: int, d: int, hidden: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Meta-learned initial weights A (d, hidden) and B (hidden, d), at nn.Linear's scale."""
    return (nn.Parameter(torch.empty(*batch, d, hidden).uniform_(-d ** -0.5, d ** -0.5)),
            nn.Parameter(torch.empty(*batch, hidden, d).uniform_(-hidden ** -0.5,
                                                                  hidden ** -0.5)))


class _Act(nn.Module):
    """An activation by name, as a module (for nn.Sequential)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTS[self.name](x)


class CacheMemory(Memory):
    """Softmax attention's memory: every token's key and value, kept (PAPER.md sec. 2). Its
    write is the pair (keys, values). `keep`: how many of the last keys a later call needs,
    when every read of it has a window (None: all of them)."""

    def __init__(self, name: str, where: str, *, keep: int | None = None,
                 backend: str = "chunked") -> None:
        super().__init__(name, where)
        self.keep, self.backend = keep, backend

    def attend(self, q: torch.Tensor, heads: int, rope: bool, env: dict[str, Any],
               window: int | None = None) -> torch.Tensor:
        """Causal attention of q over every key so far (those of earlier calls first), or
        over the last `window` of them (the query's own included), in `heads` heads. With
        rope, queries and keys are rotated by their positions in the whole stream. The state
        is the keys and values as written ([B, L, features]: each read splits and rotates
        them its own way), and for a cache that keeps only its last keys the count of tokens
        seen: (keys, values) or (keys, values, tokens)."""
        k, v = env[self.env_key]
        state = env["__state__"]
        past = state.given.get(self.state_key)
        kept = 0 if past is None else past[0].shape[1]
        start = past[2] if past is not None and len(past) == 3 else kept  # the stream's
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        if self.keep is None:
            state.out[self.state_key] = (k, v)
        else:
            first = k.shape[1] - min(self.keep, k.shape[1])  # (copies, not views of all keys)
            state.out[self.state_key] = (k[:, first:].clone(), v[:, first:].clone(),
                                         start + q.shape[1])
        B, T, _ = q.shape
        split = lambda x: x.view(B, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)  # (B, heads, T or L, d)
        if rope:  # the kept keys sit at positions start - kept .. start - 1
            q, k = rotary(q, start), rotary(k, start - kept)
        o = causal_attention(q, k, v, window, blocked=self.backend != "reference")
        return o.transpose(1, 2).reshape(B, T, -1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                     blocked: bool = True, block: int = 256) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, d), the last T of the positions of k and
    v (B, H, L, d), each query over the keys at its position and before, or the last
    `window` of them. blocked: queries `block` (at least window) at a time, each block over
    the keys its window reaches, which costs T * (block + window) scores instead of T * L
    (the reference tier takes one masked product)."""
    T, L = q.shape[2], k.shape[2]
    if window is None or window >= L:  # every query reaches back to the first key
        if T == L:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril_(L - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    block = max(block, window)
    if not blocked or block >= T:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_band(T, L, L - T, window, q))
    outs = []
    for a in range(0, T, block):
        b = upto(a + block, T)
        lo, hi = max(0, L - T + a - window + 1), L - T + b  # the keys the block's queries see
        outs.append(F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi],
            attn_mask=_band(b - a, hi - lo, L - T + a - lo, window, q)))
    return torch.cat(outs, 2)


def _band(n: int, m: int, first: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """(n, m) bool: query i, at key position first + i, sees keys first + i - window + 1 ..
    first + i."""
    pos = torch.arange(n, device=like.device)[:, None] + first
    key = torch.arange(m, device=like.device)[None]
    return (key <= pos) & (key > pos - window)


def rotary(x: torch.Tensor, start: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (B, heads, T, d) at positions start .. start + T - 1:
    pairs (x_i, x_{i + d/2}) rotated by pos * base ** (-2i / d), as in Llama."""
    d = x.shape[-1]
    half = d // 2
    acc = torch.promote_types(x.dtype, torch.float32)  # (float64 angles for float64 x)
    freq = base ** (-torch.arange(half, device=x.device, dtype=acc) * 2 / d)
    pos = torch.arange(start, start + x.shape[-2], device=x.device, dtype=acc)
    angle = pos[:, None] * freq  # (T, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:2 * half]
    rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    return torch.cat([rotated, x[..., 2 * half:]], -1)


class StaticMLP(Memory):
    """An MLP memory that never updates in context: its weights are the outer level's.
    mlp(d, hidden, depth = 2, act = "gelu"): Linear(d, hidden), act, ..., Linear(hidden, d).
    residual_mlp(d, hidden = d, act = "silu"): x + W1 act(W2 x)."""

    def __init__(self, name: str, where: str, *, d: int, hidden: int, residual: bool,
                 act: str, depth: int) -> None:
        super().__init__(name, where)
        self.residual = residual
        widths = [d] + [hidden] * (depth - 1) + [d]
        parts: list[nn.Module] = []
        for i in range(depth):
            parts.append(nn.Linear(widths[i], widths[i + 1], bias=False))
            if i < depth - 1:
                parts.append(_Act(act))
        self.net = nn.Sequential(*parts)

    def read(self, x: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        y = self.net(x)
        return y + x if self.residual else y

    read_start = read  # above its declaration: the same weights


class LinearMemory(Memory):
    """A matrix memory per head, S: [B, H, a, b], read as M(x) = x S (x: [.., a])."""

    def __init__(self, name: str, where: str, *, a: int, b: int, heads: int, chunk: int,
                 objective: str, rule: str, gated: bool, recurrence: str, read_before: bool,
                 stopped: bool, init: str, shared: bool = False, starts: bool = False,
                 flush: bool = False, delta: float = 1.0, clip: float | None = None,
                 momentum: bool = False, backend: str = "chunked") -> None:
        super().__init__(name, where)
        self.a, self.b, self.heads, self.chunk = a, b, heads, chunk
        # Titans' momentum on the gradient term (`momentum`, `dgd` with `beta`): the state is
        # then {"S": the state, "momentum": P}, P_t = beta_t P_{t-1} - eta_t grad (the token
        # loop on every tier)
        self.momentum = momentum
        # read above its declaration (read_start): its state is then {"S": the state,
        # "start": the state its chunk started with (None at a chunk's start), "offset":
        # tokens into the chunk}, and the module runs in pieces that end at its chunks
        # `partial chunk flush`: a call's last partial chunk ends with it (it matters only
        # for the reads at its chunks' starts: the recurrence itself has no chunks)
        self.starts, self.flush = starts, flush
        self.objective, self.rule, self.gated = objective, rule, gated
        # huber's delta; clip: each token's gradient (each sequence's) scaled to norm at most it
        self.delta, self.clip = delta, clip
        # what the chunked and triton tiers run: "delta_rule", "gated_delta_rule",
        # "linear_attention", or (huber, clip on l2, momentum) "token_loop", the reference
        # tier's, as the compiler selected it (nestc.codegen.memories.recurrence)
        self.recurrence = recurrence
        self.read_before, self.stopped, self.init = read_before, stopped, init
        # `state shared`: one state [H, a, b] for the batch, written by every sequence's token
        # t at once (their updates at the same state, summed)
        self.shared, self.backend = shared, backend
        if init == "meta":
            self.initial = nn.Parameter(torch.zeros(heads, a, b))

    def write(self, k: torch.Tensor, v: torch.Tensor, lr: Any = 1.0, retain: Any = None,
              beta: Any = None) -> dict[str, Any]:
        """The per-token signals: keys and values by head, lr, retain and beta [B, T, H]."""
        B, T, _ = k.shape
        out = {"k": k.view(B, T, self.heads, self.a), "v": v.view(B, T, self.heads, self.b),
               "lr": signal(lr, k, self.heads),
               "retain": None if retain is None else signal(retain, k, self.heads),
               "beta": None if beta is None else signal(beta, k, self.heads)}
        if self.stopped:
            out = {n: None if x is None else x.detach() for n, x in out.items()}
        return out

    def _given(self, env: dict[str, Any], batch: int) -> Any:
        """The state before this piece (None: zeros), its momentum (None: zeros), the state of
        its chunk's start, and the piece's offset into its chunk (0 unless read above its
        declaration)."""
        S0 = env["__state__"].given.get(self.state_key)
        P0, start, offset = None, None, 0
        if isinstance(S0, dict):  # (read above its declaration, or with momentum)
            P0 = S0.get("momentum")
            S0, start, offset = S0["S"], S0.get("start"), S0.get("offset", 0)
        if S0 is None and self.init == "meta":
            S0 = self.initial if self.shared else self.initial.expand(batch, -1, -1, -1)
        return S0, P0, S0 if start is None else start, offset

    @float32_inside
    def read(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        w = env[self.env_key]
        state = env["__state__"]
        B, T, _ = q.shape
        q = q.view(B, T, self.heads, self.a)
        S0, P0, start, offset = self._given(env, B)
        run = self._reference if self.backend == "reference" else self._chunked
        o, S, P = run(q, w, S0, P0)
        self.guard(S, P)
        out: Any = S
        if self.starts:  # a piece of the driver's, within one chunk
            offset += T
            assert offset <= self.chunk, (self.name, offset)
            if start is None:  # the zero state
                start = torch.zeros_like(S)
            out = {"S": S, "start": None if offset == self.chunk else start,
                   "offset": offset % self.chunk}
        if self.momentum:
            out = {**out, "momentum": P} if isinstance(out, dict) else {"S": S, "momentum": P}
        state.out[self.state_key] = out
        return o.reshape(B, T, self.heads * self.b)

    @float32_inside
    def read_start(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """q S at the state its chunk started with, for every token of this piece (a read
        above the memory's declaration: the module runs pieces within one chunk each)."""
        B, T, _ = q.shape
        _, _, start, _ = self._given(env, B)
        if start is None:  # zeros
            return q.new_zeros(B, T, self.heads * self.b)
        acc = torch.promote_types(q.dtype, torch.float32)
        qh = q.view(B, T, self.heads, self.a).to(acc)
        o = torch.einsum("bthk,hkv->bthv" if self.shared else "bthk,bhkv->bthv", qh,
                         start.to(acc))
        return o.reshape(B, T, self.heads * self.b).to(q.dtype)

    def flushed(self, state: Any) -> Any:
        """The next call starts a chunk (a memory read at its chunks' starts)."""
        return {**state, "start": None, "offset": 0} if self.starts else state

    def _reference(self, q: torch.Tensor, w: dict[str, Any], S0: Any, P0: Any = None) -> Any:
        """The definition: token by token, the rule applied to the objective's gradient (each
        sequence's, clipped to norm at most `clip` per head where the rule says so, scaled by
        its lr; a shared state takes their sum, and its retention and beta, numbers, once).
        With momentum the gradient term goes through P_t = beta_t P_{t-1} - (that term):
        (o, S, P), P None without it."""
        k, v, lr, retain, beta = w["k"], w["v"], w["lr"], w["retain"], w.get("beta")
        B, T, H, _ = k.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        shape = (H, self.a, self.b) if self.shared else (B, H, self.a, self.b)
        S = q.new_zeros(shape, dtype=acc) if S0 is None else S0.to(acc)
        P = None
        if self.momentum:
            P = q.new_zeros(shape, dtype=acc) if P0 is None else P0.to(acc)
        state = "hav" if self.shared else "nhav"
        read = lambda x, S: torch.einsum(f"nha,{state}->nhv", x, S)  # noqa: E731

        def loss(P: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
            # every sequence's token's loss at its own state P [B, H, a, b]
            return objective_loss(torch.einsum("nha,nhav->nhv", kt, P), vt, self.objective,
                                  self.delta).sum()

        each = torch.func.grad(loss)

        def grad(S: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, eta: torch.Tensor
                 ) -> torch.Tensor:
            g = each(S.expand(B, *S.shape) if self.shared else S, kt, vt)
            if self.clip is not None:
                eta = eta * clipped(g.pow(2).sum((-2, -1)), self.clip)
            g = eta[..., None, None] * g
            return g.sum(0) if self.shared else g

        outs = []
        for t in range(T):
            kt, vt = k[:, t].to(acc), v[:, t].to(acc)
            eta = lr[:, t].to(acc)  # (B, H)
            r = None if retain is None else retain[:, t].to(acc)[..., None, None]
            if r is not None and self.shared:
                r = r[0]  # one number (the compiler checks it)
            if self.read_before:
                outs.append(read(q[:, t].to(acc), S))
            # the gradient term at the state it is taken at, and the state it is added to
            if self.gated:  # DGD, gated: retention first, then the gradient at that state
                S = S if r is None else r * S
                g = grad(S, kt, vt, eta)
            elif self.rule == "dgd":  # literal: S (r I - eta k k^T) - eta grad, in x S form
                kk = torch.einsum(f"nha,nhc,nh->{state[:-1]}c", kt, kt, eta)
                g = grad(S, kt, vt, eta)
                S = (1.0 if r is None else r) * S - kk @ S
            else:  # gd, momentum: the gradient at the state before retention
                g = grad(S, kt, vt, eta)
                S = S if r is None else r * S
            if P is not None:  # Titans' momentum: P_t = beta_t P_{t-1} - g_t, S_t = ... + P_t
                assert beta is not None, f"{self.where}: momentum without beta"
                b = beta[:, t].to(acc)[..., None, None]
                P = (b[0] if self.shared else b) * P - g
                S = S + P
            else:
                S = S - g
            if not self.read_before:
                outs.append(read(q[:, t].to(acc), S))
        o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, self.b, dtype=acc)
        return o.to(q.dtype), S, P

    def _chunked(self, q: torch.Tensor, w: dict[str, Any], S0: Any, P0: Any = None) -> Any:
        """The recurrence the objective and rule amount to (`recurrence`), chunk-parallel
        (docs/semantics.md): (o, S, P) as _reference's."""
        from nestc.ops.delta_rule.chunk import chunk_delta_rule
        from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
        from nestc.ops.linear_attention.chunk import chunk_linear_attention

        if self.recurrence == "token_loop":  # no chunk-parallel form (huber, clip on l2,
            return self._reference(q, w, S0, P0)  # momentum)
        k, v, lr, retain = w["k"], w["v"], w["lr"], w["retain"]
        if self.clip is not None:  # dot: a gradient -k v^T of norm |k| |v|, whatever the state
            lr = lr * clipped(k.pow(2).sum(-1) * v.pow(2).sum(-1), self.clip)
        if self.read_before:  # the state before token t = the state after a shifted write
            k, v, lr = (F.pad(x, (0, 0) * (x.ndim - 2) + (1, 0)) for x in (k, v, lr))
            retain = None if retain is None else F.pad(retain, (0, 0, 1, 0), value=1.0)
            q = F.pad(q, (0, 0, 0, 0, 0, 1))
        T = q.shape[1]
        C = min(self.chunk, max(T, 1))  # exact for any chunk: a short piece needs no padding
        delta: Callable[..., Any] = chunk_delta_rule
        gated: Callable[..., Any] = chunk_gated_delta_rule
        linear: Callable[..., Any] = chunk_linear_attention
        Cd = C
        if self.shared:  # the chunked ops over the batch's tokens time-major, B at a time
            delta, gated, linear, C, Cd = _shared(q.shape[0], C)
        elif self.backend == "triton" and q.dtype != torch.float64:  # float32 inside
            from nestc.ops.delta_rule.triton import MAX_K, triton_delta_rule
            from nestc.ops.gated_delta_rule.triton import triton_gated_delta_rule

            if q.shape[-1] <= MAX_K:  # wider keys: the chunked tier
                # their chunk is at most 64 (the result does not depend on it)
                delta, gated, Cd = triton_delta_rule, triton_gated_delta_rule, 64
        o: torch.Tensor
        S: torch.Tensor | None
        if self.recurrence == "linear_attention":
            g = None if retain is None else log_factors(retain)
            o, S = linear(q, k, v, lr, g, S0, C)
        elif self.recurrence == "delta_rule":
            assert retain is None, f"{self.where}: the delta rule has no retention"
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
            o, S = gated(q, k, vv, log_factors(r), beta, 1.0, S0, True, Cd)
        if self.read_before:
            o = o[:, : T - 1]
        return o, S, None


def _shared(batch: int, chunk: int) -> tuple[Any, Any, Any, int, int]:
    """The chunked ops for a state shared by `batch` sequences: each call's [B, T, ...]
    inputs laid out as one sequence of T * B tokens, time-major, that write B at a time
    (`group`): keys, values and rates as they are, the log retention only at a time step's
    first token (a shared state decays once per step), the state [H, a, b] as one sequence's;
    the output laid back. Chunks of `chunk` time steps, at most 256 tokens (whole steps)."""
    from nestc.ops.delta_rule.chunk import chunk_delta_rule
    from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
    from nestc.ops.linear_attention.chunk import chunk_linear_attention

    size = max(1, min(chunk, 256 // batch)) * batch

    def flat(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return x.transpose(0, 1).reshape(1, -1, *x.shape[2:])

    def once(g: Any) -> Any:  # [B, T, H] -> only the first sequence's, the rest 0
        return None if g is None else g * (torch.arange(batch, device=g.device) == 0).to(
            g.dtype)[:, None, None]

    def wrap(op: Callable[..., Any], g_at: int | None, state_at: int) -> Callable[..., Any]:
        """op taking (q, k, v, ..., the log retention at g_at, ..., the initial state at
        state_at, ..., the chunk size last), as LinearMemory._chunked calls it."""
        def run(*args: Any) -> Any:
            B, T = args[0].shape[:2]
            laid = [flat(once(a) if i == g_at else a) for i, a in enumerate(args[:state_at])]
            S0 = args[state_at]
            o, S = op(*laid, None if S0 is None else S0[None], *args[state_at + 1:-1], size,
                      group=batch)
            return o.view(T, B, *o.shape[2:]).transpose(0, 1), S[0]
        return run

    return (wrap(chunk_delta_rule, None, 5), wrap(chunk_gated_delta_rule, 3, 6),
            wrap(chunk_linear_attention, 4, 5), size, size)


class MLPMemory(Memory):
    """A 2-layer MLP per head learning in context, with weights A (d, h) and B (h, d):
    M(x) = act(x A) B for `mlp`, x + act(x A) B for `residual_mlp` (docs/semantics.md).
    `signals`: which of lr, retain and beta its writes give; `generated`: whether its values
    are generated by the memory itself (a self-generated target); `has_source`: whether those
    are stop_grad(M(x)) of a block tensor x, which the triton tier's kernel generates itself."""

    def __init__(self, name: str, where: str, *, d: int, hidden: int, heads: int,
                 residual: bool, act: str, read_before: bool, stopped: bool, chunk: int,
                 objective: str, delta: float, momentum: bool, clip: float | None,
                 signals: tuple[str, ...], generated: bool, has_source: bool,
                 flush: bool = False, starts: bool = False, shared: bool = False,
                 literal: bool = False, backend: str = "chunked") -> None:
        super().__init__(name, where)
        self.d, self.hidden, self.heads, self.residual = d, hidden, heads, residual
        # `dgd literal`: each layer's weights also lose lr x its input's outer product with
        # itself, every token (nestc/ops/mlp_memory/dgd.py)
        self.literal = literal
        self.act, self.act_name = ACTS[act], act
        self.read_before, self.stopped, self.chunk = read_before, stopped, chunk
        self.objective, self.delta, self.momentum, self.clip = objective, delta, momentum, clip
        self.signals, self.generated, self.backend = signals, generated, backend
        self.flush = flush  # `partial chunk flush`: every call ends its chunk
        # read above its declaration (read_start): the module runs in pieces that end where
        # its chunks do (nestc.module.Built.forward)
        self.starts = starts
        # `state shared`: one set of weights (H, d, h) for the batch, written by every
        # sequence's token t at once (their updates at the same weights, summed; retention
        # and momentum factors are numbers, applied once a step)
        self.shared = shared
        self.value_source = has_source and backend == "triton"
        self.A, self.B = _mlp_weights(heads, d=d, hidden=hidden)
        self.siblings: tuple[_Siblings, int] | None = None  # set by run_as_one

    def write(self, k: torch.Tensor, v: torch.Tensor | None = None,
              value: Callable[..., torch.Tensor] | None = None, vs: torch.Tensor | None = None,
              lr: Any = 1.0, retain: Any = None, beta: Any = None) -> dict[str, Any]:
        """The per-token signals: keys by head, and given values `v` or a function `value`
        (read, a, b, tile) of the values of tokens a..b-1 with the memory read by `read`; `vs`:
        x of values stop_grad(M(x)); lr, retain and beta (those in `signals`) as [B, T, H]."""
        B, T, _ = k.shape
        H, d = self.heads, self.d
        out: dict[str, Any] = {"k": k.view(B, T, H, d)}
        if value is not None:
            # (function, heads, tile): one per memory run, or one tiled for all (_Siblings)
            out["value"] = [(value, H, 1)]
            if vs is not None and self.value_source:
                out["vs"] = vs.view(B, T, H, d).detach()
        else:
            assert v is not None, self.name
            out["v"] = v.view(B, T, H, d)
        given = {"lr": lr, "retain": retain, "beta": beta}
        out.update({n: signal(given[n], k, H) if n in self.signals else None for n in given})
        if self.stopped:
            out = {n: x.detach() if isinstance(x, torch.Tensor) else x
                   for n, x in out.items()}
        return out

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
        return objective_loss(_mlp(k, A, B, self.act, self.residual), v, self.objective,
                              self.delta).sum()

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
            y = group.read(i, q, env)
            assert y is not None
            return y
        return self._read_alone(q, env)

    @float32_inside
    def read_start(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """M(q) at the weights the chunk began with, for every token of this piece (a read
        above the memory's declaration: the module runs pieces within one chunk each)."""
        given = env["__state__"].given.get(self.state_key)
        Bn, T, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        if given is None:
            A, B = self.A.to(acc), self.B.to(acc)
        else:
            assert given["offset"] + T <= self.chunk, (self.name, given["offset"], T)
            A, B = given["M"] if given["offset"] == 0 else given["start"]
        A, B = self._batched((A, B), Bn)
        return self._read_all(A, B, q.to(acc)).to(q.dtype)

    @staticmethod
    def _batched(weights: tuple[torch.Tensor, torch.Tensor], batch: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B with a batch dim (shared ones, or the meta-learned, expanded to it)."""
        A, B = (w.expand(batch, *w.shape) if w.dim() == 3 else w for w in weights)
        return A, B

    def settle(self, env: dict[str, Any]) -> None:
        """Learn from this run's writes without a read (nothing reads the memory after them,
        only above its declaration): the state after them, no read computed."""
        if self.siblings is not None and not torch.compiler.is_compiling():
            group, i = self.siblings
            group.read(i, None, env)
        else:
            self._settle_alone(env)

    def _settle_alone(self, env: dict[str, Any]) -> None:
        _, w, given = self._inputs(None, env)
        self._store(env, self._run(None, w, given)[1])

    def _read_alone(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        qh, w, given = self._inputs(q, env)
        y, out = self._run(qh, w, given)
        self._store(env, out)
        assert y is not None
        return y.transpose(1, 2).reshape(*q.shape[:2], -1).to(q.dtype)

    def _inputs(self, q: torch.Tensor | None, env: dict[str, Any]
                ) -> tuple[torch.Tensor | None, dict[str, Any], dict[str, Any]]:
        """A read's query (N, H, T, d) (None without one), write signals (N, H, T, ...) and
        the state before it, in float32 at least."""
        Bn, T = env[self.env_key]["k"].shape[:2]
        acc = torch.promote_types(env[self.env_key]["k"].dtype if q is None else q.dtype,
                                  torch.float32)
        given = env["__state__"].given.get(self.state_key)
        if given is None:
            A, B = (p.to(acc) if self.shared else p.to(acc).expand(Bn, *p.shape)
                    for p in (self.A, self.B))
            given = {"M": (A, B), "S": (torch.zeros_like(A), torch.zeros_like(B)),
                     "start": (A, B), "offset": 0}
        qh = None if q is None else \
            q.view(Bn, T, self.heads, self.d).transpose(1, 2).to(acc)  # (N, H, T, d)
        w = {n: x.transpose(1, 2).to(acc) if isinstance(x, torch.Tensor) else x
             for n, x in env[self.env_key].items()}
        return qh, w, given

    @float32_inside
    def _run(self, q: torch.Tensor | None, w: dict[str, Any], given: dict[str, Any]
             ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The reads of q (None: none, the state only) and the state after them."""
        # (the kernel reads: without a query it reads the keys, and drops that)
        query: torch.Tensor = w["k"] if q is None else q
        if self.backend != "reference" and self._fusable(query, w, given):
            y, out = self._fused(query, w, given)
            return (None if q is None else y), out
        run = self._reference if self.backend == "reference" else self._chunked
        return run(q, w, given)

    def _store(self, env: dict[str, Any], out: dict[str, Any]) -> None:
        self.guard(*out["M"], *out["S"])
        env["__state__"].out[self.state_key] = out

    def flushed(self, state: dict[str, Any]) -> dict[str, Any]:
        """The next call starts a chunk, its gradients taken at the weights reached."""
        return {**state, "start": state["M"], "offset": 0}

    def sibling_key(self) -> tuple[Any, ...]:
        """What memories must share to run as one (_Siblings): all but their weights, state
        and the tensors they are written and read with."""
        return (self.d, self.hidden, self.heads, self.residual, self.act_name,
                self.read_before, self.stopped, self.chunk, self.objective, self.delta,
                self.momentum, self.clip, self.backend, self.signals, self.generated,
                self.value_source, self.starts, self.shared, self.literal)

    def _fusable(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> bool:
        """Whether the triton tier runs this read through nestc.ops.mlp_memory's kernel (_fused):
        an MLP or residual MLP (gelu or silu) learning by l2 given values or its own reading of
        a block tensor under stop_grad, in float32 or a 16-bit type, in chunks of 16, 32 or 64,
        at sizes whose kernels fit in a GPU's shared memory (`mlp_kernel_fits`); not shared
        by the batch; with no clip or one the kernel can square in float32."""
        if self.backend != "triton" or self.objective != "l2" or self.shared or \
                self.literal or not ("v" in w or "vs" in w) or \
                self.act_name not in ("gelu", "silu") or \
                (self.clip is not None and self.clip < MIN_KERNEL_CLIP):
            return False
        from nestc.ops.mlp_memory.triton import CHUNKS, mlp_kernel_fits

        return (q.dtype != torch.float64 and self.chunk in CHUNKS
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
            end = upto(t + (first if t == 0 else self.chunk), T)
            bounds.append((t, end))
            t = end
        return bounds

    def _factors(self, w: dict[str, Any], a: int, b: int) -> tuple[Any, Any, Any]:
        """lr, retain and momentum factors of tokens a..b-1, each (N, H, n) or None."""
        def cut(x: Any) -> Any:
            return None if x is None else x[:, :, a:b]
        return cut(w["lr"]), cut(w["retain"]), cut(w["beta"])

    def _reference(self, q: torch.Tensor | None, w: dict[str, Any], given: dict[str, Any]
                   ) -> Any:
        """The definition: token by token; every gradient of a chunk at its starting state."""
        (A, B), (SA, SB), (A0, B0) = given["M"], given["S"], given["start"]
        offset, T = given["offset"], w["k"].shape[2]
        outs = []
        for t in range(T):
            if (offset + t) % self.chunk == 0:
                A0, B0 = A, B
            lr = w["lr"][:, :, t, None, None]  # (N, H, 1, 1), like each weight's batch dims
            retain, beta = (None if x is None else x[:, :, t, None, None]
                            for x in (w["retain"], w["beta"]))
            if self.shared:  # one number a step (the compiler checks it)
                retain, beta = (None if x is None else x[0] for x in (retain, beta))
            at = self._batched((A0, B0), w["k"].shape[0])
            gA, gB = self._grads(*at, w["k"][:, :, t:t + 1], self._values(w, at, t, t + 1))
            gA, gB = gA[:, :, 0], gB[:, :, 0]
            eta = lr
            if self.clip is not None:  # the gradient's norm, at most clip
                lr = lr * clipped(gA.pow(2).sum((-2, -1)) + gB.pow(2).sum((-2, -1)),
                                  self.clip)[..., None, None]
            uA, uB = -lr * gA, -lr * gB
            if self.shared:  # every sequence's update, at the same weights
                uA, uB = uA.sum(0), uB.sum(0)
            if self.read_before and q is not None:
                outs.append(self._read_one(A, B, q[:, :, t]))
            if self.momentum:
                SA, SB = beta * SA + uA, beta * SB + uB
                uA, uB = SA, SB
            r = 1.0 if retain is None else retain
            if self.literal:  # DGD: (r I - lr x x^T) W, x each layer's input (at the chunk's
                # first weights, as the gradients), minus lr times the gradient
                kt = w["k"][:, :, t]
                hk = self.act(kt[..., None, :] @ at[0])[..., 0, :]
                A = r * A - eta * (kt[..., :, None] * kt[..., None, :]) @ A + uA
                B = r * B - eta * (hk[..., :, None] * hk[..., None, :]) @ B + uB
            else:
                A, B = r * A + uA, r * B + uB
            if not self.read_before and q is not None:
                outs.append(self._read_one(A, B, q[:, :, t]))
        y = None if q is None else torch.stack(outs, 2) if outs else q.new_zeros(q.shape)
        return y, {"M": (A, B), "S": (SA, SB), "start": (A0, B0),
                   "offset": (offset + T) % self.chunk}

    def _read_one(self, A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (N, H, d) read at weights (N, H, d, h) and (N, H, h, d)."""
        return _mlp(x[..., None, :], A, B, self.act, self.residual)[..., 0, :]

    def _chunked(self, q: torch.Tensor | None, w: dict[str, Any], given: dict[str, Any]
                 ) -> Any:
        """Chunk by chunk, without forming any token's weights (docs/semantics.md).

        For one token, the gradient of an l2, dot or huber objective of M(k) = act(k A) B (+ k) is a
        pair of outer products: dL/dA = k^T delta and dL/dB = act(z)^T e, with z = k A,
        e = dL/dM(k) and delta = (e B^T) * act'(z). Every weight a token sees is then the
        chunk's base weights (and momentum) scaled, plus a decay-weighted sum of those outer
        products, W[t, s] = (the retention and momentum products from s to t) * -lr_s. A read
        x A_t is thus c_t x A + m_t x S_A + sum_s W[t, s] (x . k_s) delta_s: attention-like
        products over the chunk's tokens, and likewise for B."""
        (A, B), (SA, SB), (A0, B0) = given["M"], given["S"], given["start"]
        offset, (N, H, T, _) = given["offset"], w["k"].shape
        if self.shared:  # one sequence of N tokens a step, time-major (mlp_memory_chunk)
            A, B, SA, SB, A0, B0 = (x[None] for x in (A, B, SA, SB, A0, B0))

        def lay(x: Any) -> Any:
            """(N, H, n, ...) -> (1, H, n * N, ...), token t of sequence b at t * N + b."""
            if x is None or not self.shared:
                return x
            return x.movedim(0, 2).reshape(1, H, -1, *x.shape[3:])

        def step(x: Any) -> Any:  # a retention or momentum factor: one a step when shared
            return x[:1] if x is not None and self.shared else x

        outs = []
        for i, (a, b) in enumerate(self._segments(T, offset)):
            if i > 0 or offset == 0:
                A0, B0 = A, B
            lr, retain, beta = self._factors(w, a, b)
            values = self._values(w, self._batched((A0[0], B0[0]), N) if self.shared else
                                  (A0, B0), a, b)
            if self.literal:  # (not shared: the compiler checks)
                y, A, B, SA, SB = mlp_dgd_chunk(
                    None if q is None else q[:, :, a:b], w["k"][:, :, a:b], values, lr, retain,
                    beta if self.momentum else None, A, B, SA, SB, self.act_name, self.clip,
                    self.read_before, grad_at=(A0, B0), residual=self.residual,
                    objective=self.objective, huber_delta=self.delta)
                if y is not None:
                    outs.append(y)
                continue
            y, A, B, SA, SB = mlp_memory_chunk(
                None if q is None else lay(q[:, :, a:b]), lay(w["k"][:, :, a:b]), lay(values),
                lay(lr), step(retain), step(beta) if self.momentum else None, A, B, SA, SB,
                self.act_name, self.clip, self.read_before, grad_at=(A0, B0), residual=self.residual,
                objective=self.objective, huber_delta=self.delta, group=N if self.shared else 1)
            if y is not None:
                outs.append(y.view(H, b - a, N, -1).movedim(2, 0) if self.shared else y)
        y = None if q is None else torch.cat(outs, 2) if outs else q.new_zeros(q.shape)
        if self.shared:
            A, B, SA, SB, A0, B0 = (x[0] for x in (A, B, SA, SB, A0, B0))
        return y, {"M": (A, B), "S": (SA, SB), "start": (A0, B0),
                   "offset": (offset + T) % self.chunk}


class _Siblings:
    """MLP memories of one declaration that run as one: the same structure (sibling_key), one
    read each, all of the same query, after all of them are written (the projection memories
    of self-modifying Titans). Their heads are stacked into one chunked computation, which
    computes for each head what it computes alone; every memory keeps its own weights and
    in-context state. The first read runs them all and leaves the others' outputs in the env.
    """

    def __init__(self, names: list[str], key: str, same_values: bool) -> None:
        self.names, self.key = names, key  # the memories' submodule names
        self.same_values = same_values  # self-generated, by one expression of one tensor

    def read(self, i: int, q: torch.Tensor | None, env: dict[str, Any]) -> torch.Tensor | None:
        """Memory i's read of q, or None without a query (MLPMemory.settle: the states only)."""
        ys = env.get(self.key)
        if ys is None:
            ys = env[self.key] = self._run(q, env)
        return ys[i]

    def _run(self, q: torch.Tensor | None, env: dict[str, Any]) -> list[Any]:
        mems: list[MLPMemory] = [env["__self__"]._modules[n] for n in self.names]
        parts = [m._inputs(q, env) for m in mems]
        if len({given["offset"] for _, _, given in parts}) > 1:  # states not run together
            if q is None:
                for m in mems:
                    m._settle_alone(env)
                return [None] * len(mems)
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
        queries = [qh for qh, _, _ in parts if qh is not None]
        y, out = mems[0]._run(None if q is None else stack(queries, "read"), w, given)
        if y is None:  # no reads: _Split's are empty
            A = out["M"][0]
            y = A.new_zeros(A.shape[0], A.shape[1], 0, mems[0].d)
        names = [(n, j) for n in ("M", "S", "start") for j in range(2)]
        pieces = _Split.apply(record, len(mems), y if q is None else y.to(q.dtype),
                              *(out[n][j] for n, j in names))
        ys = list(pieces[:len(mems)]) if q is not None else [None] * len(mems)
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


def run_as_one(module: nn.Module, names: list[str], same_values: bool) -> None:
    """Run the MLP memories `names` of module (a generated block: nestc.codegen.block found
    that they can) as one (_Siblings), unless they run on the reference tier, which stays the
    definition; those that differ in what only their construction fixes (whether the triton
    tier's kernel generates their values) form groups of their own. same_values: their
    values are self-generated by one expression of one tensor."""
    mems: list[MLPMemory] = []
    for n in names:
        m = module._modules[n]
        assert isinstance(m, MLPMemory), n
        mems.append(m)
    if mems[0].backend == "reference" or mems[0].shared:  # (shared weights have no batch dim)
        return
    parts: dict[Any, list[int]] = {}
    for i, m in enumerate(mems):
        parts.setdefault(m.sibling_key(), []).append(i)
    for part in parts.values():
        if len(part) < 2:
            continue
        group = _Siblings([names[i] for i in part], f"__siblings_{names[part[0]]}",
                          same_values)
        for j, i in enumerate(part):
            mems[i].siblings = (group, j)


def run_each_alone(module: nn.Module) -> nn.Module:
    """module, its memories ungrouped (_Siblings): each runs alone, as on the reference tier;
    what tests and benchmarks/siblings.py compare a group with."""
    for m in module.modules():
        if isinstance(m, MLPMemory):
            m.siblings = None
    return module


class TaskMLP(Memory):
    """A CMS level: an MLP whose weights (per sample) change once every C tokens, by gd on the
    task loss summed over the chunk's tokens, all taken at the chunk's weights; in-context
    state {"W": (A, B), "grad": (dA, dB) so far this chunk, "offset": tokens into it}.
    M(x) = act(x A) B for `mlp`, x + act(x A) B for `residual_mlp` (docs/semantics.md).
    `shared`: one set of weights for the batch (`state shared`), which sums the gradients of
    every sequence's tokens; `flush`: a call's last partial chunk updates at its end.
    `parent`: the submodule name of another task-loss memory (the nested CMS) whose weights
    this one starts each of the parent's chunks from; `nested`: another starts from this one."""

    def __init__(self, name: str, where: str, *, d: int, hidden: int, residual: bool,
                 act: str, chunk: int, stopped: bool, lr: float, retain: float,
                 shared: bool = False, flush: bool = False, parent: str | None = None,
                 nested: bool = False) -> None:
        super().__init__(name, where)
        self.d, self.hidden, self.residual, self.act = d, hidden, residual, ACTS[act]
        self.chunk, self.stopped, self.lr, self.retain = chunk, stopped, lr, retain
        self.shared, self.flush = shared, flush
        self.parent, self.nested = parent, nested
        if parent is None:  # meta-learned initial weights (a nested level has its parent's)
            self.A, self.B = _mlp_weights(d=d, hidden=hidden)

    def weights(self, env: dict[str, Any], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This piece's weights, registered once per piece with the driver, which hands back
        the task loss's gradient with respect to them: carried in the state, else the
        meta-learned ones. A memory that starts from a parent's weights is reset to them
        whenever the parent's chunk starts, and registers the parent too.

        The gradient is local to the piece: the driver differentiates a view of the weights
        made for this piece, so what reaches the piece's loss through earlier pieces (a
        sequence memory's state, a faster level's updates) is held fixed. A piece that a call
        ended inside goes on with the same view (the state's "piece"), so feeding a sequence
        in calls cut anywhere computes what one pass does (given the state as returned: a
        state the caller detached holds no graph to go on with). The exception is a
        parent (`nested`): it is differentiated through everything its weights reach over its
        whole chunk, the faster level's updates included, which is how it learns that
        level's initial state."""
        state = env["__state__"]
        if self.state_key in state.task:  # read again in this piece: the same weights
            return state.task[self.state_key][2]
        given = state.given.get(self.state_key)
        if self.parent is not None:
            parent = env["__self__"]._modules[self.parent]
            start = parent.weights(env, batch)
            if (state.given.get(parent.state_key) or {}).get("offset", 0) == 0:
                given = {"W": start}  # the parent's chunk starts here: reset
        base = given["W"] if given is not None else (self.A, self.B)
        if not self.shared and base[0].dim() == 2:  # per sample, from shared weights
            base = tuple(w.expand(batch, -1, -1) for w in base)
        if given is None:
            # a copy, not the parameters (or a view of them): the state keeps it past this
            # block's forward, after which FSDP frees the unsharded parameters' storage
            base = tuple(w.clone() for w in base)
        # without the outer level's graph (evaluation, or a state passed in), the task loss is
        # still differentiated with respect to them: they become leaves, kept for the chunk
        base = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in base)
        used = base if self.nested else tuple(w.view_as(w) for w in base)
        piece = (given or {}).get("piece")  # a piece that the last call ended inside
        if piece is not None and not self.nested and all(w.requires_grad for w in piece):
            used = piece
        state.task[self.state_key] = (self, base, used)
        return used  # type: ignore[return-value]

    def read(self, x: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        A, B = self.weights(env, x.shape[0])
        return _mlp(x, A, B, self.act, self.residual)

    read_start = read  # above its declaration: its chunk's weights, as below it

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
            weights, grads, offset = self._update(weights, grads), None, 0
        self.guard(*weights)
        state.out[self.state_key] = {"W": weights, "grad": grads, "offset": offset}

    @property
    def defers(self) -> bool:
        """Whether a call's last token's loss waits for the next call (nestc.module.NEXT):
        not for levels whose chunks a call ends (`partial chunk flush`) or nested ones (a
        parent differentiates within a call; its child is reset to it)."""
        return not (self.flush or self.nested or self.parent is not None)

    def learn_late(self, state: Any, grads: tuple[Any, ...]) -> None:
        """The gradient of the token before this call (its target, this call's first token,
        came late), taken at the weights it read: added to its chunk's gradient so far, or,
        where that token ended its chunk (offset 0: the update has landed), to the update,
        which is linear in it: W <- r W - lr (G + g) = (r W - lr G) - lr g."""
        given = state.given[self.state_key]
        grads = tuple(torch.zeros_like(w) if g is None else g for g, w in zip(grads, given["W"]))
        if given["offset"] == 0:
            weights = tuple(w - self.lr * g for w, g in zip(given["W"], grads))
            self.guard(*weights)
            state.out[self.state_key] = {**given, "W": weights}
        else:
            pending = given.get("grad")
            if pending is not None:
                grads = tuple(p + g for p, g in zip(pending, grads))
            state.out[self.state_key] = {**given, "grad": grads}

    def _update(self, weights: tuple[torch.Tensor, ...], grads: Any) -> tuple[torch.Tensor, ...]:
        assert grads is not None, self.state_key
        return tuple(self.retain * w - self.lr * g for w, g in zip(weights, grads))

    def flushed(self, state: dict[str, Any]) -> dict[str, Any]:
        """A partial chunk updates now (the driver has taken its gradients by the end of a
        call), and the next call starts a chunk."""
        if state["offset"] == 0:
            return state
        weights = self._update(state["W"], state["grad"])
        self.guard(*weights)
        return {"W": weights, "grad": None, "offset": 0}


class PeriodicMemory(Memory):
    """A memory with its own objective that learns once every `period` tokens, counted from
    the start of the stream (a level slower than the tokens, PAPER.md sec. 4, with the level's
    own objective instead of the task loss). Its weights W are frozen inside each period; at
    the period's last token

        g = sum over the period's tokens t of lr_t * grad L(W; k_t, v_t)   (all at W)
        gd: W <- R W - g        momentum: S <- Bt S - g, W <- R W + S

    with R and Bt the products of the period's retentions r_t and momentum factors beta_t
    (what the per-token rule would apply to W and S over those tokens). `kind` "matrix": per
    head, M(x) = x W (W: a x b); "mlp" / "residual_mlp": per head, M(x) = act(x A) B (+ x). A
    read at the period's last token sees the update (`read after write`) or not (`read before
    write`); every other read sees the period's weights. `shared`: one set of weights for the
    batch, whose gradients sum over its sequences (its retentions and momentum factors are
    numbers). In-context state {"W": weights, "S":
    momentum or None, "grad": the period's g so far or None, "R", "Bt": the period's
    products so far or None, "offset": tokens into the period}."""

    def __init__(self, name: str, where: str, *, kind: str, a: int, b: int, hidden: int,
                 heads: int, act: str, period: int, objective: str, delta: float,
                 momentum: bool, read_before: bool, stopped: bool, shared: bool, flush: bool,
                 init: str, starts: bool = False, clip: float | None = None,
                 backend: str = "chunked") -> None:
        super().__init__(name, where)
        self.kind, self.a, self.b, self.heads, self.period = kind, a, b, heads, period
        # read above its declaration (read_start): the module's pieces end at its periods
        self.starts, self.chunk = starts, period
        self.act, self.act_name = ACTS[act], act
        # each token's gradient (each sequence's, when shared) scaled to norm at most clip
        # before it joins the period's sum
        self.clip = clip
        self.objective, self.delta, self.momentum = objective, delta, momentum
        self.read_before, self.stopped, self.shared, self.flush = read_before, stopped, \
            shared, flush
        self.backend = backend
        if kind != "matrix":
            self.A, self.B = _mlp_weights(heads, d=a, hidden=hidden)
        elif init == "meta":
            self.initial = nn.Parameter(torch.zeros(heads, a, b))
        self.init = init

    def write(self, k: torch.Tensor, v: torch.Tensor, lr: Any = 1.0, retain: Any = None,
              beta: Any = None) -> dict[str, Any]:
        """The per-token signals: keys and values by head, lr, retain and beta [B, T, H]
        (retain and beta None where the rule has none)."""
        B, T, _ = k.shape
        out = {"k": k.view(B, T, self.heads, self.a), "v": v.view(B, T, self.heads, self.b),
               "lr": signal(lr, k, self.heads),
               "retain": None if retain is None else signal(retain, k, self.heads),
               "beta": None if beta is None else signal(beta, k, self.heads)}
        if self.stopped:
            out = {n: None if x is None else x.detach() for n, x in out.items()}
        return out

    # the memory as a function of its weights ----------------------------------------------

    def _map(self, W: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """x (N, H, n, a) read at weights W (batch dims (N, H), or (H,) when shared)."""
        if self.kind == "matrix":
            return x @ W[0]
        return _mlp(x, W[0], W[1], self.act, self.kind == "residual_mlp")

    def _loss(self, W: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor,
              lr: torch.Tensor) -> torch.Tensor:
        """sum over the tokens of lr_t L(W; k_t, v_t); k, v (N, H, n, .), lr (N, H, n)."""
        return (lr * objective_loss(self._map(W, k), v, self.objective, self.delta)).sum()

    def _grad(self, W: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor,
              lr: torch.Tensor, closed: bool = False) -> tuple[torch.Tensor, ...]:
        """The lr-weighted sum of the tokens' gradients at W, differentiable by the outer
        level: by torch.func.grad of the objective (the definition; it also runs without
        grad mode), or, `closed` (the chunked tier), for a matrix as k^T (lr e), e the
        objective's gradient at the reading k W."""
        if self.clip is not None and not closed:
            return self._clipped_grad(W, k, v, lr)
        if closed and self.kind == "matrix":
            if self.objective == "dot":
                e = -v
            else:
                e = k @ W[0] - v
                if self.objective == "huber":
                    e = e.clamp(-self.delta, self.delta)
            if self.clip is not None:  # |k^T e| = |k| |e|
                lr = lr * clipped(k.pow(2).sum(-1) * e.pow(2).sum(-1), self.clip)
            g = (k * lr[..., None]).transpose(-1, -2) @ e  # (N, H, a, b)
            return (g.sum(0) if self.shared else g,)
        if self.clip is not None:  # an MLP's: the pair of outer products' (chunk_gradients)
            f = chunk_gradients(k, v, (W[0], W[1]), self.act_name, self.clip,
                                self.kind == "residual_mlp", self.objective, self.delta)[3]
            assert f is not None
            lr = lr * f
        n = len(W)
        return torch.func.grad(lambda *w: self._loss(w, k, v, lr),
                               argnums=tuple(range(n)))(*W)

    def _clipped_grad(self, W: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor,
                      lr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The reference tier's, one token: its gradient at W (each sequence's, W expanded
        over them when shared) by torch.func.grad, scaled to norm at most clip, times lr."""
        assert k.shape[2] == 1 and self.clip is not None, "one token at a time, with a clip"
        N = k.shape[0]
        Wx = tuple(w.expand(N, *w.shape) for w in W) if self.shared else W
        g = torch.func.grad(lambda *w: self._loss(w, k, v, torch.ones_like(lr)),
                            argnums=tuple(range(len(W))))(*Wx)
        f = clipped(sum(gi.pow(2).sum((-2, -1)) for gi in g), self.clip) * lr[..., 0]
        g = tuple(gi * f[..., None, None] for gi in g)
        return tuple(gi.sum(0) for gi in g) if self.shared else g

    def _factor(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A period's product of retentions or momentum factors (N, H, n) -> (N, H), or (H,)
        when the weights are shared (a number then: every sequence has the same)."""
        if x is None:
            return None
        prod = x.prod(-1)
        return prod[0] if self.shared else prod

    def _update(self, state: dict[str, Any]) -> dict[str, Any]:
        """The period's step, from its gradients and products so far; a period starts."""
        W, S, g, R, Bt = state["W"], state["S"], state["grad"], state["R"], state["Bt"]
        assert g is not None
        def scale(f: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
            return w if f is None else f[..., None, None] * w  # over each weight matrix

        if self.momentum:
            S = tuple(-gi if s is None else scale(Bt, s) - gi
                      for s, gi in zip(S or (None,) * len(g), g))
            W = tuple(scale(R, w) + s for w, s in zip(W, S))
        else:
            W = tuple(scale(R, w) - gi for w, gi in zip(W, g))
        return {"W": W, "S": S, "grad": None, "R": None, "Bt": None, "offset": 0}

    def _add(self, state: dict[str, Any], w: dict[str, Any], a: int, b: int,
             closed: bool) -> dict[str, Any]:
        """state with tokens a..b-1 of the signals w added to its period."""
        gt = self._grad(state["W"], w["k"][:, :, a:b], w["v"][:, :, a:b], w["lr"][:, :, a:b],
                        closed)
        g = state["grad"]

        def times(old: Any, name: str) -> Any:
            f = self._factor(None if w[name] is None else w[name][:, :, a:b])
            return f if old is None else old if f is None else old * f

        return {**state, "grad": gt if g is None else tuple(x + z for x, z in zip(g, gt)),
                "R": times(state["R"], "retain"), "Bt": times(state["Bt"], "beta"),
                "offset": state["offset"] + b - a}

    # runs ---------------------------------------------------------------------------------

    @float32_inside
    def read(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        w = env[self.env_key]
        state = env["__state__"]
        B, T, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        given = state.given.get(self.state_key) or self._initial(B, acc, q.device)
        qh = q.view(B, T, self.heads, self.a).transpose(1, 2).to(acc)  # (N, H, T, a)
        w = {n: None if x is None else x.transpose(1, 2).to(acc) for n, x in w.items()}
        run = self._reference if self.backend == "reference" else self._chunked
        y, out = run(qh, w, given)
        self.guard(*out["W"])
        state.out[self.state_key] = out
        return y.transpose(1, 2).reshape(B, T, self.heads * self.b).to(q.dtype)

    @float32_inside
    def read_start(self, q: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """M(q) at the period's weights, for every token of this piece (a read above the
        declaration; the module runs pieces within one period each)."""
        B, T, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        given = env["__state__"].given.get(self.state_key) or self._initial(B, acc, q.device)
        qh = q.view(B, T, self.heads, self.a).transpose(1, 2).to(acc)  # (N, H, T, a)
        y = self._map(tuple(w.to(acc) for w in given["W"]), qh)
        return y.transpose(1, 2).reshape(B, T, self.heads * self.b).to(q.dtype)

    def _initial(self, batch: int, dtype: torch.dtype, device: torch.device
                 ) -> dict[str, Any]:
        if self.kind != "matrix":
            W: tuple[torch.Tensor, ...] = (self.A, self.B)
        elif self.init == "meta":
            W = (self.initial,)
        else:
            W = (torch.zeros(self.heads, self.a, self.b, dtype=dtype, device=device),)
        W = tuple(w.to(dtype) if self.shared else w.to(dtype).expand(batch, *w.shape)
                  for w in W)
        return {"W": W, "S": None, "grad": None, "R": None, "Bt": None, "offset": 0}

    def _reference(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> Any:
        """The definition: token by token, each token's gradient at the period's weights
        added to the period's sum, the rule applied at its last token."""
        state, outs = given, []
        for t in range(q.shape[2]):
            if self.read_before:
                outs.append(self._map(state["W"], q[:, :, t:t + 1]))
            state = self._add(state, w, t, t + 1, closed=False)
            if state["offset"] == self.period:
                state = self._update(state)
            if not self.read_before:
                outs.append(self._map(state["W"], q[:, :, t:t + 1]))
        y = torch.cat(outs, 2) if outs else q.new_zeros(*q.shape[:-1], self.b)
        return y, state

    def _chunked(self, q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> Any:
        """Period by period: the reads of a period's tokens at its weights in one product,
        its gradients as one gradient of their summed, lr-weighted loss."""
        state, T, outs, a = given, q.shape[2], [], 0
        while a < T:
            b = upto(a + self.period - state["offset"], T)
            y = self._map(state["W"], q[:, :, a:b])
            state = self._add(state, w, a, b, closed=True)
            if state["offset"] == self.period:
                state = self._update(state)
                if not self.read_before:  # the last token reads the update
                    y = torch.cat([y[:, :, :-1], self._map(state["W"], q[:, :, b - 1:b])], 2)
            outs.append(y)
            a = b
        y = torch.cat(outs, 2) if outs else q.new_zeros(*q.shape[:-1], self.b)
        return y, state

    def flushed(self, state: dict[str, Any]) -> dict[str, Any]:
        """A partial period updates now, and the next call starts a period."""
        if state["offset"] == 0:
            return state
        out = self._update(state)
        self.guard(*out["W"])
        return out
