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

(in x A form: the paper's M (alpha I - eta k k^T) is A^T's). Each layer is a recurrence
S_t = r_t S_{t-1} + k_t u_t^T with the write u_t = x_t - eta_t S_{t-1}^T k_t (x_t the
gradient's part, -eta_t f_t delta_t): over a chunk, with G the running sum of log r and the
state S_0 that entered it,

    u_t + sum_{s<t} eta_t e^{G_{t-1} - G_s} (k_t . k_s) u_s = x_t - eta_t e^{G_{t-1}} S_0^T k_t

is one unit lower-triangular solve, and S_t = e^{G_t} S_0 + sum_{s<=t} e^{G_t - G_s} k_s u_s^T
gives the reads q_t S_t (the memory's: q_t A_t, then act(q_t A_t) B_t) and the state at the
chunk's end. This is the gated delta rule's chunk form (nestc/ops/gated_delta_rule/chunk.py)
without its beta = eta / r, which divides by the retention: the retention's gradient then
lost accuracy as r fell (3 to 4% off at r ~ 1e-5), where here it is exact down to the floor
of log r at 1e-30 (a retention of 0 forgets all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

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
           eta: torch.Tensor, S: torch.Tensor, read_before: bool
           ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One layer's tokens (N, H, n, .) as one chunk: S_t = r_t S_{t-1} - eta_t k_t k_t^T
    S_{t-1} + k_t x_t^T from S (N, H, K, V), and the reads q_t S_t (q_t S_{t-1} with
    read_before: the writes shifted one token later, a write of nothing first; none
    without q)."""
    n = k.shape[2]
    if read_before:
        k, x = (F.pad(t, (0, 0, 1, 0)) for t in (k, x))
        log_r, eta = (F.pad(t, (1, 0)) for t in (log_r, eta))
        q = None if q is None else F.pad(q, (0, 0, 0, 1))
    earlier, upto = time_masks(k.shape[2], 1, k.device)
    # G_t - G_s, G_{t-1} - G_s, G_t and G_{t-1}, G the running sum of log r
    span, span_before, G, G_before = _log_decays(log_r)
    kt = k.transpose(-1, -2)
    # L[t, s] = eta_t e^{G_{t-1} - G_s} (k_t . k_s), s < t (masked before exp)
    L = eta[..., None] * (k @ kt) * span_before.masked_fill(~earlier, float("-inf")).exp()
    rhs = x - (eta[..., None] * G_before.exp()) * (k @ S)
    U = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # the writes
    to_end = span[..., -1, :, None].exp()  # e^{G_m - G_s}
    S_new = G[..., -1:, :].exp() * S + (k * to_end).transpose(-1, -2) @ U
    if q is None:
        return None, S_new
    decay = span.masked_fill(~upto, float("-inf")).exp()
    o = (q * G.exp()) @ S + ((q @ kt) * decay) @ U
    return (o[:, :, :n] if read_before else o), S_new


@float32_inside
def mlp_dgd_chunk(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                  retain: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, act: str,
                  clip: float | None, read_before: bool, *,
                  grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                  residual: bool = False, objective: str = "l2", huber_delta: float = 1.0
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One chunk of n tokens, as reference.mlp_memory_chunk without momentum (nor a state
    shared by the batch): q, k, v (N, H, n, d), lr, retain (N, H, n) or None, the weights A
    (N, H, d, h), B (N, H, h, d) before its first token -> the reads (N, H, n, d), None
    without q, and the weights after its last token."""
    hk, e, delta, f = chunk_gradients(k, v, (A, B) if grad_at is None else grad_at, act,
                                      clip, residual, objective, huber_delta)
    log_r = torch.zeros_like(lr) if retain is None else retain.clamp_min(1e-30).log()
    step = (-lr if f is None else -lr * f)[..., None]
    zq, A = _layer(q, k, step * delta, log_r, lr, A, read_before)
    y, B = _layer(None if zq is None else act_fn(act, zq), hk, step * e, log_r, lr, B,
                  read_before)
    if q is None or y is None:
        return None, A, B
    return (y + q if residual else y), A, B
