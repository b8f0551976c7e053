"""The delta rule chunk by chunk: a triangular solve inside each chunk, matmuls between chunks.

See README.md beside this file for the derivation. Every chunk is processed at once except the
state hand-off, a loop over the T / C chunks (never over tokens) of two small matmuls each.
"""

from __future__ import annotations

import torch

from nestc.ops.utils import accumulation_dtype, float32_inside, from_chunks, time_masks, to_chunks


@float32_inside
def chunk_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = True, chunk_size: int = 64, *,
                     group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments and results as `naive_recurrent_delta_rule`, plus the chunk size C.
    `group`: the tokens come `group` at a time, each group one write of all its tokens at
    the same state (a state shared by `group` sequences, ordered time-major; C a multiple of
    group); 1 is the delta rule."""
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
    kt = k.transpose(-1, -2)  # (N, BH, K, C)

    # the chunk's writes are U = u - W S (S: the state entering it), with u = M V, W = M K and
    # M = (I + strict_tril(diag(beta) K K^T))^{-1} diag(beta), the UT transform (batched
    # triangular solves cost per matrix more than per column on CPU: solve for M, then matmul)
    # token j reaches token i's write when it comes earlier (in time steps, for group > 1)
    masks = time_masks(q.shape[-2], group, q.device) if group > 1 else None
    A = ((beta * k) @ kt)  # (N, BH, C, C)
    A = A.tril_(-1) if masks is None else A * masks[0]
    eye = torch.eye(A.shape[-1], dtype=acc, device=A.device).expand_as(A)
    M = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    M = M * beta.transpose(-1, -2)  # (N, BH, C, C)
    u, w = M @ v, M @ k  # (N, BH, C, V), (N, BH, C, K)

    # the state hand-off, chunk by chunk: S <- S + K^T U (unbind, not indexing: the backward
    # of N index ops would zero N full-size gradients)
    S, states, writes = S0, [], []
    for u_n, w_n, kt_n in zip(u.unbind(0), w.unbind(0), kt.unbind(0)):
        states.append(S)
        writes.append(torch.baddbmm(u_n, w_n, S, alpha=-1))  # (BH, C, V)
        S = torch.baddbmm(S, kt_n, writes[-1])  # (BH, K, V)

    # o = scale (Q S + tril(Q K^T) U): the entering state, plus the causal part of the chunk's
    # own writes (tril keeps the diagonal: a token reads its own write); scale folded into alpha
    q, k = q.flatten(0, 1), k.flatten(0, 1)  # (N*BH, C, K)
    qk = q @ k.transpose(-1, -2)
    qk = qk.tril_() if masks is None else qk * masks[1]
    o = torch.baddbmm(q @ torch.stack(states).flatten(0, 1), qk,
                      torch.stack(writes).flatten(0, 1), beta=scale, alpha=scale)  # (N*BH, C, V)
    final = S.view(B, H, K, V) if output_final_state else None
    return from_chunks(o, B, T, H).to(dtype), final
