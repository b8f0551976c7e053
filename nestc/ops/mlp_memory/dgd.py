"""Delta gradient descent (DGD, PAPER.md sec. 2) for a 2-layer MLP memory, chunk by chunk:
MLPMemory's chunked tier under `dgd literal` (docs/semantics.md, "MLP memories that learn
every token").

The paper's update W_t = W_{t-1}(alpha_t I - eta_t k_t k_t^T) - eta_t grad L, for an MLP
M(x) = act(x A) B (+ x), applies to each layer with that layer's input: for token t, with
the gradients of its chunk taken at the chunk's first weights (A0, B0), hk_t = act(k_t A0)
and g_t = (dL/dA, dL/dB) = (k_t^T delta_t, hk_t^T e_t) (reference.chunk_gradients), scaled
by f_t to norm at most `clip`:

    A_t = (r_t I - eta_t k_t^T k_t) A_{t-1} - eta_t f_t k_t^T delta_t
    B_t = (r_t I - eta_t hk_t^T hk_t) B_{t-1} - eta_t f_t hk_t^T e_t

(in x A form: the paper's M (alpha I - eta k k^T) is A^T's). With momentum (Titans' on the
gradient term) the last term is the momentum P_t = beta_t P_{t-1} - eta_t f_t g_t instead.

Each layer is a recurrence S_t = r_t S_{t-1} + k_t u_t^T (+ P_t - k_t x_t^T with momentum)
with the write u_t = x_t - eta_t S_{t-1}^T k_t, x_t the gradient's part, -eta_t f_t delta_t.
Over a chunk, with G the running sum of log r and the state S_0 that entered it, without
momentum

    u_t + sum_{s<t} eta_t e^{G_{t-1} - G_s} (k_t . k_s) u_s = x_t - eta_t e^{G_{t-1}} S_0^T k_t

is one unit lower-triangular solve, and S_t = e^{G_t} S_0 + sum_{s<=t} e^{G_t - G_s} k_s u_s^T
gives the reads q_t S_t (the memory's: q_t A_t, then act(q_t A_t) B_t) and the state at the
chunk's end. Momentum adds to S_t the momentum P_0 entering the chunk, weighted gam_t =
sum_{j<=t} e^{G_t - G_j} prod_{i<=j} beta_i, and each x_s once more for every later step its
momentum lasted, E[t, s] = sum_{s<j<=t} e^{G_t - G_j} prod_{s<i<=j} beta_i: sums of
products of decays, one matmul each; the solve's right side takes both at t - 1. This is the
gated delta rule's chunk form (nestc/ops/gated_delta_rule/chunk.py) without its beta = eta / r,
which divides by the retention: the retention's gradient then lost accuracy as r fell (3 to 4%
off at r ~ 1e-5), where here it is exact down to the floor of log r at 1e-30 (a retention of 0
forgets all).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nestc.ops.mlp_memory.reference import act_fn, chunk_gradients
from nestc.ops.utils import float32_inside, log_factors, span_sums, time_masks


def _log_decays(log_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a chunk's log retentions (N, H, m): the sums of log r_j over s < j <= t, (N, H, m,
    m) (zero where empty; span_sums), and over j <= t, (N, H, m, 1), each a sum of its own
    terms."""
    return span_sums(log_r), log_r.cumsum(-1)[..., None]


def _before(x: torch.Tensor, first: float) -> torch.Tensor:
    """Row t -> row t - 1 (the weights before token t's write), `first` in row 0."""
    return torch.cat([torch.full_like(x[..., :1, :], first), x[..., :-1, :]], -2)


class _Decays(NamedTuple):
    """A chunk's decay weights, the same for both layers (N, H, m, m) and (N, H, m, 1): what
    the state at token t keeps of token s's write, Dr[t, s] = e^{G_t - G_s}, and of the state
    entering the chunk, c_t = e^{G_t}; with momentum, what it keeps of the momentum entering
    the chunk, gam_t, and of token s's gradient part beyond Dr[t, s], E[t, s]; the momentum's
    own, Db[t, s] = prod_{s < j <= t} beta_j and b_t = prod_{j <= t} beta_j."""

    Dr: torch.Tensor
    c: torch.Tensor
    E: torch.Tensor | None
    gam: torch.Tensor | None
    Db: torch.Tensor | None
    b: torch.Tensor | None

    def before(self) -> _Decays:
        """The same at token t - 1 (row 0: the state entering the chunk, no writes)."""
        return _Decays(_before(self.Dr, 0.0), _before(self.c, 1.0),
                       None if self.E is None else _before(self.E, 0.0),
                       None if self.gam is None else _before(self.gam, 0.0), self.Db, self.b)


def _decays(log_r: torch.Tensor, log_b: torch.Tensor | None) -> _Decays:
    """The decay weights of a chunk's log retentions and log momentum factors (N, H, m)."""
    upto = time_masks(log_r.shape[-1], 1, log_r.device)[1]
    spans, ends = _log_decays(log_r)
    Dr = spans.masked_fill(~upto, float("-inf")).exp()
    if log_b is None:
        return _Decays(Dr, ends.exp(), None, None, None, None)
    spans_b, ends_b = _log_decays(log_b)
    Db = spans_b.masked_fill(~upto, float("-inf")).exp()
    b = ends_b.exp()
    # E[t, s] = sum_{s < j <= t} e^{G_t - G_j} Db[j, s]; gam_t = sum_{j <= t} e^{G_t - G_j} b_j
    E = Dr @ Db.tril(-1)
    return _Decays(Dr, ends.exp(), E, Dr @ b, Db, b)


def _layer(q: torch.Tensor | None, k: torch.Tensor, x: torch.Tensor, eta: torch.Tensor,
           S: torch.Tensor, P: torch.Tensor | None, after: _Decays, before: _Decays,
           read_before: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One layer's tokens (N, H, n, .) as one chunk: S_t = r_t S_{t-1} - eta_t k_t k_t^T
    S_{t-1} + k_t x_t^T from S (N, H, K, V), or with the momentum P (N, H, K, V), P_t =
    beta_t P_{t-1} + k_t x_t^T and S_t = r_t S_{t-1} - eta_t k_t k_t^T S_{t-1} + P_t (the
    decays `after` each token's write and `before` it, _decays). Returns the reads q_t S_t
    (q_t S_{t-1} with read_before; none without q), the state after the chunk and the
    momentum after it (None without)."""
    kt = k.transpose(-1, -2)
    kk = k @ kt
    # the writes u_t = x_t - eta_t S_{t-1}^T k_t: one unit lower-triangular solve, its
    # L[t, s] = eta_t e^{G_{t-1} - G_s} (k_t . k_s), s < t
    L = eta[..., None] * kk * before.Dr
    rhs = x - (eta[..., None] * before.c) * (k @ S)
    if P is not None:
        assert before.gam is not None and before.E is not None
        rhs = rhs - eta[..., None] * (before.gam * (k @ P) + (kk * before.E) @ x)
    U = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    S_new = after.c[..., -1:, :] * S + (k * after.Dr[..., -1, :, None]).transpose(-1, -2) @ U
    P_new = None
    if P is not None:
        assert after.gam is not None and after.E is not None and after.Db is not None and \
            after.b is not None
        S_new = S_new + after.gam[..., -1:, :] * P + \
            (k * after.E[..., -1, :, None]).transpose(-1, -2) @ x
        P_new = after.b[..., -1:, :] * P + (k * after.Db[..., -1, :, None]).transpose(-1, -2) @ x
    if q is None:
        return None, S_new, P_new
    # the weights each token reads: after its write, or before it
    w = before if read_before else after
    qk = q @ kt
    o = (q * w.c) @ S + (qk * w.Dr) @ U
    if P is not None:
        assert w.gam is not None and w.E is not None
        o = o + w.gam * (q @ P) + (qk * w.E) @ x
    return o, S_new, P_new


@float32_inside
def mlp_dgd_chunk(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                  retain: torch.Tensor | None, beta: torch.Tensor | None, A: torch.Tensor,
                  B: torch.Tensor, SA: torch.Tensor, SB: torch.Tensor, act: str,
                  clip: float | None, read_before: bool, *,
                  grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                  residual: bool = False, objective: str = "l2", huber_delta: float = 1.0
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    """One chunk of n tokens, as reference.mlp_memory_chunk (but for a state shared by the
    batch): q, k, v (N, H, n, d), lr, retain, beta (N, H, n) or None (beta None: no
    momentum), the weights A (N, H, d, h), B (N, H, h, d) and momenta SA, SB (like them)
    before its first token -> the reads (N, H, n, d), None without q, and the weights and
    momenta after its last token (the momenta as given without beta)."""
    hk, e, delta, f = chunk_gradients(k, v, (A, B) if grad_at is None else grad_at, act,
                                      clip, residual, objective, huber_delta)
    log_r = torch.zeros_like(lr) if retain is None else log_factors(retain)
    after = _decays(log_r, None if beta is None else log_factors(beta))
    before = after.before()
    step = (-lr if f is None else -lr * f)[..., None]
    moms = (None, None) if beta is None else (SA, SB)
    zq, A, PA = _layer(q, k, step * delta, lr, A, moms[0], after, before, read_before)
    y, B, PB = _layer(None if zq is None else act_fn(act, zq), hk, step * e, lr, B, moms[1],
                      after, before, read_before)
    if PA is not None and PB is not None:
        SA, SB = PA, PB
    if q is None or y is None:
        return None, A, B, SA, SB
    return (y + q if residual else y), A, B, SA, SB
