"""The Titans chunk update of a 2-layer MLP memory in PyTorch: MLPMemory._chunked's math for
the l2 objective, given values and a plain (non-residual) MLP, as a function of tensors.

Per sequence and head the memory has weights A (d, h), B (h, d) and momenta SA, SB, and reads
M(x) = act(x A) B. Tokens come in chunks of C; every gradient of a chunk is taken at the
chunk's first weights. For token t (lr, retain, beta per token):

    g_t = grad of 1/2 |M(k_t) - v_t|^2, scaled to norm at most `clip` (when given)
    S_t = beta_t S_{t-1} - lr_t g_t          (S_t = -lr_t g_t without momentum)
    W_t = retain_t W_{t-1} + S_t              (retain_t = 1 without retention)
    y_t = M_{W_t}(q_t)                        (M_{W_{t-1}}(q_t) with read_before)

With `v_self`, the memory also generates its targets: v_t + M_{W_c}(x_t) under stop-gradient,
W_c the weights of t's chunk's first token (self-modifying Titans' stop_grad(M(x))).

No token's weights are formed: within a chunk a read is the chunk's base weights and momentum,
scaled, plus attention-like sums over the chunk's tokens (docs/semantics.md, "MLP memories that
learn every token"). `mlp_memory_chunk` is one chunk; its vjp is the Triton tier's backward
reference (`triton._backward_reference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from nestc.ops.utils import clipped, float32_inside, log_factors, span_sums, upto

ACTS = ("gelu", "silu")  # the op's (and the Triton kernel's); the chunk function takes ACT_FNS
ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def act_fn(act: str, z: torch.Tensor) -> torch.Tensor:
    """act(z), for the names of ACT_FNS (gelu in its exact, erf form)."""
    return ACT_FNS[act](z)


def act_grad(act: str, z: torch.Tensor) -> torch.Tensor:
    """act'(z), element-wise, for the names of ACT_FNS."""
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) * \
            (2 * math.pi) ** -0.5
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "tanh":
        return 1 - torch.tanh(z) ** 2
    assert act == "sigmoid", act
    s = torch.sigmoid(z)
    return s * (1 - s)


def _decays(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token factors (..., n) -> their running products (..., n) and the matrix
    D[t, s] = prod_{s < j <= t} factor_j for s <= t, else 0 (..., n, n); a factor of 0
    forgets all (log_factors)."""
    logs = log_factors(factors)
    i = torch.arange(logs.shape[-1], device=logs.device)
    D = torch.where(i[:, None] >= i[None, :], span_sums(logs), float("-inf")).exp()
    return logs.cumsum(-1).exp(), D


def _base(xM: torch.Tensor, xS: torch.Tensor | None, c: torch.Tensor | None,
          m: torch.Tensor | None) -> torch.Tensor:
    """c_t x M0 + m_t x S0: a token's read of the chunk's base weights and momentum."""
    y = xM if c is None else c * xM
    return y if xS is None or m is None else y + m * xS


def chunk_gradients(k: torch.Tensor, v: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor],
                    act: str, clip: float | None, residual: bool = False,
                    objective: str = "l2", huber_delta: float = 1.0,
                    v_self: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every token's gradient of a chunk, at the weights `at` = (A0, B0) (its first), as the
    outer products they are: dL/dA = k^T delta, dL/dB = hk^T e. Returns hk = act(k A0) and
    e = dL/dM(k), (N, H, n, d), delta = (e B0^T) * act'(k A0) (N, H, n, h), and the factors
    (N, H, n) that scale each token's gradient to norm at most `clip` (None without one).
    `v_self`: inputs whose readings at `at`, under stop-gradient, add to the values."""
    A0, B0 = at
    if v_self is not None:  # stop-gradient: nothing flows back to v_self, A0 or B0
        v = v + (act_fn(act, v_self @ A0) @ B0 + (v_self if residual else 0)).detach()
    z = k @ A0  # (N, H, n, h)
    hk = act_fn(act, z)
    if objective == "dot":  # dL/dM(k)
        e = -v
    else:
        yk = hk @ B0 + k if residual else hk @ B0
        e = yk - v if objective == "l2" else (yk - v).clamp(-huber_delta, huber_delta)
    delta = (e @ B0.transpose(-1, -2)) * act_grad(act, z)  # (N, H, n, h)
    if clip is None:
        return hk, e, delta, None
    # |dA|^2 = |k|^2 |delta|^2, |dB|^2 = |h|^2 |e|^2
    sq = k.pow(2).sum(-1) * delta.pow(2).sum(-1) + hk.pow(2).sum(-1) * e.pow(2).sum(-1)
    return hk, e, delta, clipped(sq, clip)


@float32_inside
def mlp_memory_chunk(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                     retain: torch.Tensor | None, beta: torch.Tensor | None, A: torch.Tensor,
                     B: torch.Tensor, SA: torch.Tensor, SB: torch.Tensor, act: str,
                     clip: float | None, read_before: bool, *,
                     grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                     residual: bool = False, objective: str = "l2", huber_delta: float = 1.0,
                     v_self: torch.Tensor | None = None, group: int = 1
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    """One chunk of n tokens: q, k, v (N, H, n, d), lr, retain, beta (N, H, n) or None, the
    weights A (N, H, d, h), B (N, H, h, d) and momenta SA, SB (like them) before its first
    token -> the reads y (N, H, n, d) and the weights and momenta after its last token. q None:
    no reads (y None), only the state (a memory that nothing reads after its writes).

    This is MLPMemory's chunked tier (nestc/memories.py), which also passes: `grad_at`, the
    weights the gradients are taken at when the piece starts inside a chunk (the chunk's
    first weights; default A, B); `residual` for M(x) = x + act(x A) B; the objective "l2",
    "dot" (-M(k) . v) or "huber" (with huber_delta); `v_self` (N, H, n, d), inputs the memory
    reads at those weights, under stop-gradient, to add to the values (a self-generated
    target).

    `group` > 1: one state shared by `group` sequences (`state shared`). The tokens come
    time-major, `group` per time step (n = steps * group), all writing at once: a token reads
    the writes of every token of its step and the steps before (or before its own step, with
    read_before), and retain and beta, (N, H, steps), apply once per step."""
    n = k.shape[-2]
    hk, e, delta, f = chunk_gradients(k, v, (A, B) if grad_at is None else grad_at, act,
                                      clip, residual, objective, huber_delta, v_self)
    if f is not None:
        lr = lr * f
    steps = n // group
    ones = torch.ones(steps, steps, dtype=k.dtype, device=k.device).tril_()
    run_r, D_r = _decays(retain) if retain is not None else (None, ones)
    if beta is not None:  # S_t = beta_t S_{t-1} + u_t, W_t = r_t W_{t-1} + S_t
        run_b, D_b = _decays(beta)
        mix, m = D_r @ D_b, D_r @ run_b[..., None]  # (N, H, n, n), (N, H, n, 1)
    else:  # W_t = r_t W_{t-1} + u_t
        mix, m = D_r, None
    c = run_r[..., None] if run_r is not None else None  # (N, H, steps, 1)

    def pad(x: torch.Tensor, first: float) -> torch.Tensor:
        """Row t -> row t - 1: the weights before a step's write."""
        return torch.cat([torch.full_like(x[..., :1, :], first), x[..., :-1, :]], -2)

    def tokens(x: torch.Tensor, cols: bool = False) -> torch.Tensor:
        """A step's rows (and columns) for each of its tokens."""
        if group == 1:
            return x
        x = x.repeat_interleave(group, -2)
        return x.repeat_interleave(group, -1) if cols else x

    def each(x: torch.Tensor | None, first: float | None = None) -> torch.Tensor | None:
        """tokens() of a factor that may be absent, padded first when `first` is given."""
        return None if x is None else tokens(x if first is None else pad(x, first))

    # the weights each token reads: after its step's write (row t), or before it (row t - 1)
    scale = -lr[..., None, :]
    y = None
    if q is not None:
        mix_r, c_r, m_r = (tokens(pad(mix, 0.0), True) * scale, each(c, 1.0), each(m, 0.0)) \
            if read_before else (tokens(mix, True) * scale, each(c), each(m))
        zq = _base(q @ A, q @ SA if m_r is not None else None, c_r, m_r) + \
            (mix_r * (q @ k.transpose(-1, -2))) @ delta
        hq = act_fn(act, zq)
        y = _base(hq @ B, hq @ SB if m_r is not None else None, c_r, m_r) + \
            (mix_r * (hq @ hk.transpose(-1, -2))) @ e
        if residual:
            y = y + q
    # the state after the chunk's last token: its row of the same sums (the last step's
    # tokens, each weighted as in that row)
    last = (tokens(mix[..., -1:, :], True) * scale)[..., -1, :, None]  # (N, H, n, 1)
    A_new = (k * last).transpose(-1, -2) @ delta
    B_new = (hk * last).transpose(-1, -2) @ e
    if c is not None:
        A_new, B_new = A_new + c[..., -1:, :] * A, B_new + c[..., -1:, :] * B
    else:
        A_new, B_new = A_new + A, B_new + B
    if beta is not None:
        assert m is not None
        A_new, B_new = A_new + m[..., -1:, :] * SA, B_new + m[..., -1:, :] * SB
        if group > 1:
            D_b, run_b = tokens(D_b[..., -1:, :], True), run_b.repeat_interleave(group, -1)
        keep = run_b[..., -1, None, None]
        last_b = (D_b[..., -1, :] * -lr)[..., None]
        SA = keep * SA + (k * last_b).transpose(-1, -2) @ delta
        SB = keep * SB + (hk * last_b).transpose(-1, -2) @ e
    return y, A_new, B_new, SA, SB


def chunk_mlp_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                     retain: torch.Tensor | None, beta: torch.Tensor | None, A0: torch.Tensor,
                     B0: torch.Tensor, SA0: torch.Tensor | None = None,
                     SB0: torch.Tensor | None = None, *, act: str = "gelu",
                     clip: float | None = None, read_before: bool = False, chunk: int = 64,
                     v_self: torch.Tensor | None = None,
                     grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                     offset: int = 0, starts: list[tuple[torch.Tensor, ...]] | None = None
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The memory over a whole sequence, chunk by chunk (the first and the last may be short).

    Args and results as `nestc.ops.mlp_memory.mlp_memory`; everything is computed in float32
    (float64 for float64 inputs), y comes back in q's dtype. `starts`, when given, gets the
    state (A, B, SA, SB) entering each chunk appended.
    """
    dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v, lr, A, B = (x.to(acc) for x in (q, k, v, lr, A0, B0))
    retain, beta, v_self = (None if x is None else x.to(acc) for x in (retain, beta, v_self))
    SA = torch.zeros_like(A) if SA0 is None else SA0.to(acc)
    SB = torch.zeros_like(B) if SB0 is None else SB0.to(acc)
    T = q.shape[2]
    ys = []
    # the first chunk holds chunk - offset tokens, its gradients at grad_at
    firsts = range(0, T, chunk) if offset == 0 or T == 0 else \
        [0, *range(chunk - offset, T, chunk)]
    for a in firsts:
        b = upto(a + chunk - (offset if a == 0 else 0), T)
        cut = [None if x is None else x[:, :, a:b] for x in (retain, beta, v_self)]
        if starts is not None:
            starts.append((A, B, SA, SB))
        point = None if a > 0 or grad_at is None else \
            (grad_at[0].to(acc), grad_at[1].to(acc))
        y, A, B, SA, SB = mlp_memory_chunk(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                           lr[:, :, a:b], cut[0], cut[1], A, B, SA, SB, act,
                                           clip, read_before, v_self=cut[2],
                                           grad_at=point)
        assert y is not None  # (a query is given)
        ys.append(y)
    y = torch.cat(ys, 2) if ys else q.new_zeros(q.shape)
    # a state no token changed (T = 0, or momenta without beta) is a copy, as the triton
    # tier's: not the caller's tensor itself
    return y.to(dtype), tuple(s.clone() if s is s0 else s
                              for s, s0 in zip((A, B, SA, SB), (A0, B0, SA0, SB0)))
