"""Linear attention with retention, chunk by chunk.

Inside a chunk, with G_t the cumulative log retention from the chunk's start,
  o_t = exp(G_t) q_t^T S_0 + sum_{s <= t} exp(G_t - G_s) beta_s (q_t . k_s) v_s
and the state handed to the next chunk is exp(G_C) S_0 + sum_s exp(G_C - G_s) beta_s k_s v_s^T.
Only the hand-off loops, over chunks.
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
def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           beta: torch.Tensor, g: torch.Tensor | None = None,
                           initial_state: torch.Tensor | None = None, chunk_size: int = 64,
                           *, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H] (g: log retention, None = 0);
    initial_state: [B, H, K, V]. Returns o [B, T, H, V] and the final state (float32).
    `group`: the tokens come `group` at a time, as in chunk_delta_rule."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, acc = q.dtype, accumulation_dtype(q)
    S = (q.new_zeros(B * H, K, V, dtype=acc) if initial_state is None
         else initial_state.to(acc).reshape(B * H, K, V))
    if T == 0 or q.numel() == 0 or v.numel() == 0:  # (B, H or V of 0: nothing to
        # compute; a copy: not the caller's initial state itself)
        return v.new_zeros(B, T, H, V), S.view(B, H, K, V).clone()
    q, k, v = (to_chunks(x, chunk_size, acc) for x in (q, k, v))  # (N, BH, C, K|V)
    beta = to_chunks(beta[..., None], chunk_size, acc)  # (N, BH, C, 1); padding: beta 0
    # (N, BH, C, 1); a factor under 1e-30 forgets as 0 does (-inf would make NaN)
    logs = torch.zeros_like(beta) if g is None else \
        to_chunks(g.clamp_min(MIN_LOG_RETAIN)[..., None], chunk_size, acc)
    G = logs.cumsum(-2)
    # exp(sum of g over s < j <= t) for s <= t, else 0 (the mask before exp keeps it finite),
    # each span's own sum (span_sums: a tiny retention's gradient keeps its digits)
    spans = span_sums(logs[..., 0])  # (N, BH, C, C)
    causal = time_masks(spans.shape[-1], group, q.device)[1]
    decay = torch.where(causal, spans, float("-inf")).exp()
    intra = ((q @ k.transpose(-1, -2)) * decay) @ (beta * v)  # (N, BH, C, V)
    last = G[..., -1:, :]  # (N, BH, 1, 1)
    kw = k * (beta * spans[..., -1, :, None].exp())  # each key's weight in the hand-off
    outs = []
    for q_n, G_n, kw_n, v_n, last_n in zip(q, G, kw, v, last):
        outs.append((q_n * G_n.exp()) @ S)  # (BH, C, V)
        S = last_n.exp() * S + kw_n.transpose(-1, -2) @ v_n
    o = torch.stack(outs) + intra
    return from_chunks(o.flatten(0, 1), B, T, H).to(dtype), S.view(B, H, K, V)
