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

(in x A form: the paper's M (alpha I - eta k k^T) is A^T's). Each is the gated delta rule
S_t = r_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with beta_t = eta_t / r_t and
values -r_t f_t delta_t (and -r_t f_t e_t), so each chunk of each layer is one chunk of
nestc.ops' chunked gated delta rule (its `chunk_writes`); its reads are the memory's: q_t A_t,
then act(q_t A_t) B_t. As there, a retention below 1e-6 is taken as 1e-6 (it divides by r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from nestc.ops.gated_delta_rule.chunk import chunk_writes
from nestc.ops.mlp_memory.reference import act_fn, chunk_gradients
from nestc.ops.utils import float32_inside


def _layer(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, log_r: torch.Tensor,
           beta: torch.Tensor, S: torch.Tensor, read_before: bool
           ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One layer's tokens (N, H, n, .) as one chunk of the gated delta rule: S_t =
    r_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T from S (N, H, K, V), and the reads
    q_t S_t (q_t S_{t-1} with read_before: the writes shifted one token later, a write of
    nothing first; none without q)."""
    n = k.shape[2]
    if read_before:
        k, v = (F.pad(x, (0, 0, 1, 0)) for x in (k, v))
        log_r, beta = (F.pad(x, (1, 0)) for x in (log_r, beta))
        q = None if q is None else F.pad(q, (0, 0, 0, 1))
    G = log_r.cumsum(-1)[..., None]  # (N, H, n, 1)
    eG, decay, u, w = chunk_writes(k, v, G, beta[..., None])
    U = u - w @ S  # the chunk's writes
    S_new = eG[..., -1:, :] * S + (k * (G[..., -1:, :] - G).exp()).transpose(-1, -2) @ U
    if q is None:
        return None, S_new
    o = (q * eG) @ S + ((q @ k.transpose(-1, -2)) * decay) @ U
    return (o[:, :, :n] if read_before else o), S_new


@float32_inside
def mlp_dgd_chunk(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                  retain: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, act: str,
                  clip: float | None, read_before: bool, *,
                  grad_at: tuple[torch.Tensor, torch.Tensor] | None = None,
                  residual: bool = False, objective: str = "l2", huber_delta: float = 1.0,
                  v_self: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One chunk of n tokens, as reference.mlp_memory_chunk without momentum (nor a state
    shared by the batch): q, k, v (N, H, n, d), lr, retain (N, H, n) or None, the weights A
    (N, H, d, h), B (N, H, h, d) before its first token -> the reads (N, H, n, d), None
    without q, and the weights after its last token."""
    hk, e, delta, f = chunk_gradients(k, v, (A, B) if grad_at is None else grad_at, act,
                                      clip, residual, objective, huber_delta, v_self)
    r = torch.ones_like(lr) if retain is None else retain.clamp_min(1e-6)
    beta, log_r = lr / r, r.log()
    scale = (-r if f is None else -r * f)[..., None]
    zq, A = _layer(q, k, scale * delta, log_r, beta, A, read_before)
    y, B = _layer(None if zq is None else act_fn(act, zq), hk, scale * e, log_r, beta, B,
                  read_before)
    if q is None or y is None:
        return None, A, B
    return (y + q if residual else y), A, B
