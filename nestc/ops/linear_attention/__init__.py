"""Linear attention with retention: S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t.

The memory of objective -<M k, v> trained by gradient descent with learning rate beta and
retention exp(g) (PAPER.md sec. 2). Same layout as the delta rules: [B, T, H, D] inputs,
state [B, H, K, V], the token's own write read (o_t uses S_t).
"""

from nestc.ops.linear_attention.chunk import chunk_linear_attention

__all__ = ["chunk_linear_attention"]
