"""The delta rule token by token: the definition the chunked form is tested against.

For each token t, with the state S (K x V) read as a key -> value map:
    u_t = beta_t (v_t - S^T k_t)          the correction that makes S map k_t closer to v_t
    S   <- S + k_t u_t^T
    o_t = S^T (scale q_t)                 read after the update
q and k are used as given (callers normalize them if they want to), as fla-core does.
"""

from __future__ import annotations

import torch

from nestc.ops.utils import accumulation_dtype, float32_inside


@float32_inside
def naive_recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               beta: torch.Tensor, scale: float | None = None,
                               initial_state: torch.Tensor | None = None,
                               output_final_state: bool = True,
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V].

    Returns o [B, T, H, V] in q's dtype and the final state [B, H, K, V] (float32, or float64
    for float64 inputs), or None when output_final_state is False.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, acc = q.dtype, accumulation_dtype(q)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    out = []
    # unbind, not indexing: the backward of T index ops would zero T full-size gradients
    for q_t, k_t, v_t, beta_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1)):
        u_t = beta_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))  # (B, H, V)
        S = S + k_t[..., :, None] * u_t[..., None, :]  # (B, H, K, V)
        out.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, V)  # (B, T, H, V)
    return o.to(dtype), (S if output_final_state else None)
