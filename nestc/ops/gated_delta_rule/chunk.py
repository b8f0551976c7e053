"""The gated delta rule chunk by chunk (see ../delta_rule/README.md for the derivation).

With G the running sum of g inside a chunk, the decay from token s to token t (s <= t) is
exp(G_t - G_s); it weights the intra-chunk key products, and exp(G_t) scales what token t reads
from the state that entered the chunk. Nothing is divided by a decay, so long chunks with
strong forgetting underflow to the right limit (zero) instead of overflowing.
"""

from __future__ import annotations

import torch

from nestc.ops.utils import (
    MIN_LOG_RETAIN,
    accumulation_dtype,
    float32_inside,
    from_chunks,
    span_sums,
    time_masks,
    to_chunks,
)


@float32_inside
def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, scale: float | None = None,
                           initial_state: torch.Tensor | None = None,
                           output_final_state: bool = True, chunk_size: int = 64, *,
                           group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments and results as `naive_recurrent_gated_delta_rule`, plus the chunk size.
    `group`: the tokens come `group` at a time, each group one write of all its tokens at the
    same state (chunk_delta_rule; g is then nonzero only at a group's first token)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, acc = q.dtype, accumulation_dtype(q)
    scale = K ** -0.5 if scale is None else scale
    S0 = (q.new_zeros(B * H, K, V, dtype=acc) if initial_state is None
          else initial_state.to(acc).reshape(B * H, K, V))
    if T == 0 or q.numel() == 0 or v.numel() == 0:  # (B, H or V of 0: nothing to
        # compute; a copy: not the caller's initial state itself)
        return v.new_zeros(B, T, H, V), (S0.view(B, H, K, V).clone() if output_final_state
                                         else None)
    q, k, v = (to_chunks(x, chunk_size, acc) for x in (q, k, v))  # (N, BH, C, K|V)
    beta = to_chunks(beta[..., None], chunk_size, acc)  # (N, BH, C, 1)
    # (a factor under 1e-30 forgets as 0 does; -inf would make NaN of the spans' sums)
    logs = to_chunks(g.clamp_min(MIN_LOG_RETAIN)[..., None], chunk_size, acc)  # (N, BH, C, 1)
    G = logs.cumsum(-2)
    eG = G.exp()  # decay from the chunk's start to each token
    C = q.shape[-2]
    earlier, upto = time_masks(C, group, q.device)
    future = ~upto
    # decay[t, s] = exp(sum of g over s < j <= t) for s <= t, 0 above the diagonal: each
    # span's own sum (span_sums), so that g's gradient at a tiny retention keeps its digits
    spans = span_sums(logs[..., 0])  # (N, BH, C, C)
    decay = spans.masked_fill(future, float("-inf")).exp()
    kt = k.transpose(-1, -2)  # (N, BH, K, C)

    # the chunk's writes are U = u - W S (S: the state entering it), with u = M V,
    # W = M diag(e^G) K and M = (I + strict_tril(diag(beta) (K K^T * decay)))^{-1} diag(beta)
    A = ((beta * k) @ kt * decay)  # (N, BH, C, C)
    A = A.tril_(-1) if group == 1 else A * earlier
    eye = torch.eye(A.shape[-1], dtype=acc, device=A.device).expand_as(A)
    M = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    M = M * beta.transpose(-1, -2)  # (N, BH, C, C)
    u, w = M @ v, M @ (k * eG)  # (N, BH, C, V), (N, BH, C, K)

    # the state hand-off: S <- e^{G_C} S + K_d^T U, K_d the keys decayed to the chunk's end
    G_end = G[:, :, -1:]  # (N, BH, 1, 1)
    kdt = (k * spans[..., -1, :, None].exp()).transpose(-1, -2)  # (N, BH, K, C): to the end
    S, states, writes = S0, [], []
    for u_n, w_n, kdt_n, end_n in zip(u.unbind(0), w.unbind(0), kdt.unbind(0),
                                      G_end.exp().unbind(0)):
        states.append(S)
        writes.append(torch.baddbmm(u_n, w_n, S, alpha=-1))  # (BH, C, V)
        S = torch.baddbmm(S * end_n, kdt_n, writes[-1])  # (BH, K, V)

    # o = scale (diag(e^G) Q S + (Q K^T * decay) U): the decayed entering state, plus the
    # causal part of the chunk's own writes; scale folded into alpha and beta
    qd, q, k = (q * eG).flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1)  # (N*BH, C, K)
    o = torch.baddbmm(qd @ torch.stack(states).flatten(0, 1),
                      (q @ k.transpose(-1, -2)) * decay.flatten(0, 1),
                      torch.stack(writes).flatten(0, 1), beta=scale, alpha=scale)  # (N*BH, C, V)
    final = S.view(B, H, K, V) if output_final_state else None
    return from_chunks(o, B, T, H).to(dtype), final
