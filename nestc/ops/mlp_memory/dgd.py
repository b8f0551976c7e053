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

import torch

from nestc.ops.mlp_memory.reference import act_fn, chunk_gradients
from nestc.ops.utils import float32_inside, time_masks


def _log_decays(log_r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For a chunk's log retentions (N, H, m): the sums of log r_j over s < j <= t and over
    s < j < t, (N, H, m, m) (zero where empty), and over j <= t and j < t, (N, H, m, 1).
    Each is a sum of its own terms, not a difference of running sums, whose gradient cancels
    terms of size 1: that left the retention's gradient with float32's rounding of them (18%
    of it at retentions near 3e-6, where it is itself that small)."""
    i = torch.arange(log_r.shape[-1], device=log_r.device)
    t, s, j = i[:, None, None], i[None, :, None], i[None, None, :]

    def pairs(mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tsj,nhj->nhts", mask.to(log_r.dtype), log_r)

    def ends(mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tj,nhj->nht", mask.to(log_r.dtype), log_r)[..., None]

    return (pairs((s < j) & (j <= t)), pairs((s < j) & (j < t)), ends(i[None] <= i[:, None]),
            ends(i[None] < i[:, None]))


def _layer(q: torch.Tensor | None, k: torch.Tensor, x: torch.Tensor, log_r: torch.Tensor,
           eta: torch.Tensor, S: torch.Tensor, read_before: bool,
           momentum: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One layer's tokens (N, H, n, .) as one chunk: S_t = r_t S_{t-1} - eta_t k_t k_t^T
    S_{t-1} + k_t x_t^T from S (N, H, K, V), or with `momentum` = (log beta (N, H, n), P the
    momentum (N, H, K, V)), P_t = beta_t P_{t-1} + k_t x_t^T and S_t = r_t S_{t-1} - eta_t
    k_t k_t^T S_{t-1} + P_t. Returns the reads q_t S_t (q_t S_{t-1} with read_before; none
    without q), the state after the chunk and the momentum after it (None without)."""
    earlier, upto = time_masks(k.shape[2], 1, k.device)
    # G_t - G_s, G_{t-1} - G_s, G_t and G_{t-1}, G the running sum of log r
    span, span_before, G, G_before = _log_decays(log_r)
    Dr = span.masked_fill(~upto, float("-inf")).exp()  # e^{G_t - G_s}, s <= t
    Dr_b = span_before.masked_fill(~earlier, float("-inf")).exp()  # e^{G_{t-1} - G_s}, s < t
    kt = k.transpose(-1, -2)
    kk = k @ kt
    # the solve's L[t, s] = eta_t e^{G_{t-1} - G_s} (k_t . k_s), s < t
    L = eta[..., None] * kk * Dr_b
    rhs = x - (eta[..., None] * G_before.exp()) * (k @ S)
    if momentum is not None:
        log_b, P = momentum
        span_b, _, G_b, _ = _log_decays(log_b)
        Db = span_b.masked_fill(~upto, float("-inf")).exp()  # prod_{s < j <= t} beta_j
        Db_strict = Db.masked_fill(~earlier, 0.0)
        b = G_b.exp()  # prod_{j <= t} beta_j, (N, H, n, 1)
        # x_s's share in S_t beyond e^{G_t - G_s}: E[t, s] = sum_{s < j <= t} e^{G_t - G_j}
        # Db[j, s]; P's share gam_t = sum_{j <= t} e^{G_t - G_j} b_j; and both at t - 1
        E, E_b = Dr @ Db_strict, Dr_b @ Db_strict
        gam, gam_b = Dr @ b, Dr_b @ b
        rhs = rhs - eta[..., None] * (gam_b * (k @ P) + (kk * E_b) @ x)
    U = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # the writes
    S_new = G[..., -1:, :].exp() * S + (k * Dr[..., -1, :, None]).transpose(-1, -2) @ U
    P_new = None
    if momentum is not None:
        S_new = S_new + gam[..., -1:, :] * P + (k * E[..., -1, :, None]).transpose(-1, -2) @ x
        P_new = b[..., -1:, :] * P + (k * Db[..., -1, :, None]).transpose(-1, -2) @ x
    if q is None:
        return None, S_new, P_new
    # the weights each token reads: after its write (row t), or before it (row t - 1)
    decay, c = (Dr_b, G_before) if read_before else (Dr, G)
    qk = q @ kt
    o = (q * c.exp()) @ S + (qk * decay) @ U
    if momentum is not None:
        e, g = (E_b, gam_b) if read_before else (E, gam)
        o = o + g * (q @ P) + (qk * e) @ x
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
    log_r = torch.zeros_like(lr) if retain is None else retain.clamp_min(1e-30).log()
    log_b = None if beta is None else beta.clamp_min(1e-30).log()
    step = (-lr if f is None else -lr * f)[..., None]
    zq, A, PA = _layer(q, k, step * delta, log_r, lr, A, read_before,
                       None if log_b is None else (log_b, SA))
    y, B, PB = _layer(None if zq is None else act_fn(act, zq), hk, step * e, log_r, lr, B,
                      read_before, None if log_b is None else (log_b, SB))
    if PA is not None and PB is not None:
        SA, SB = PA, PB
    if q is None or y is None:
        return None, A, B, SA, SB
    return (y + q if residual else y), A, B, SA, SB
