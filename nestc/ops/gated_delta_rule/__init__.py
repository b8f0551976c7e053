"""The gated delta rule: S <- exp(g) S, then S <- S + beta k (v - S^T k)^T, read o = S^T (scale q).

`gated_delta_rule(q, k, v, g, beta)` is also reachable as `nestc.ops.gated_delta_rule`; the
layout and results match fla-core's `chunk_gated_delta_rule` (inputs [B, T, H, D], no
normalization of q or k inside).
"""

from __future__ import annotations

import torch

from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from nestc.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from nestc.ops.utils import MIN_LOG_RETAIN, check_delta_rule_inputs, make_callable

__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "naive_recurrent_gated_delta_rule"]


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, *, scale: float | None = None,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = True,
                     chunk_size: int = 64, backend: str | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the gated delta rule over a sequence: decay the state, then a delta-rule step.

    Args:
        q, k: queries and keys, [B, T, H, K]. Used as given: normalize k (and q) beforehand if
            the model wants ||k|| = 1.
        v: values, [B, T, H, V], same dtype as q and k.
        g: per-token log retention, [B, T, H]; the state is multiplied by exp(g_t) before token
            t's update (g <= 0 forgets, g = 0 is the plain delta rule).
        beta: per-token learning rates, [B, T, H].
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: the state before token 0, [B, H, K, V]; zeros when None.
        output_final_state: return the state after the last token (else None).
        chunk_size: tokens per chunk for the chunked back end; a power of two >= 16.
        backend: "chunked" (what None picks), "naive" (the token-by-token definition) or
            "triton" (fused kernels, as for `delta_rule`).

    Returns:
        o, [B, T, H, V] in q's dtype, and the final state, [B, H, K, V] in float32 (float64 for
        float64 inputs), or None. Sums are accumulated in float32 whatever the input dtype.

    Examples:
        >>> import torch, nestc.ops
        >>> q, k, v = torch.randn(3, 1, 5, 2, 8).unbind(0)
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(1, 5, 2))
        >>> o, S = nestc.ops.gated_delta_rule(q, k, v, g, torch.rand(1, 5, 2))
        >>> o.shape, S.shape
        (torch.Size([1, 5, 2, 8]), torch.Size([1, 2, 8, 8]))
    """
    check_delta_rule_inputs("gated_delta_rule", q, k, v, beta, g, initial_state, scale,
                            chunk_size, backend)
    g = g.clamp_min(MIN_LOG_RETAIN)  # exp(g) below 1e-30 (-inf too) forgets as 0 does
    if backend == "naive":
        return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
                                                output_final_state)
    if backend == "triton":
        from nestc.ops.gated_delta_rule.triton import triton_gated_delta_rule

        return triton_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
                                       output_final_state, chunk_size)
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                  chunk_size)


make_callable(__name__, gated_delta_rule)
