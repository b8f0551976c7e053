"""The delta rule (DeltaNet): S <- S + beta k (v - S^T k)^T, read o = S^T (scale q).

`delta_rule(q, k, v, beta)` is also reachable as `nestc.ops.delta_rule`; the layout and results
match fla-core's `chunk_delta_rule` (inputs [B, T, H, D], no normalization of q or k inside).
"""

from __future__ import annotations

import torch

from nestc.ops.delta_rule.chunk import chunk_delta_rule
from nestc.ops.delta_rule.naive import naive_recurrent_delta_rule
from nestc.ops.utils import check_delta_rule_inputs, make_callable

__all__ = ["chunk_delta_rule", "delta_rule", "naive_recurrent_delta_rule"]


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
               scale: float | None = None, initial_state: torch.Tensor | None = None,
               output_final_state: bool = True, chunk_size: int = 64,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the delta rule over a sequence, token t updating the state before it is read.

    Args:
        q, k: queries and keys, [B, T, H, K]. Used as given: normalize k (and q) beforehand if
            the model wants ||k|| = 1, as DeltaNet does.
        v: values, [B, T, H, V], same dtype as q and k.
        beta: per-token learning rates, [B, T, H].
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: the state before token 0, [B, H, K, V]; zeros when None.
        output_final_state: return the state after the last token (else None).
        chunk_size: tokens per chunk for the chunked back end; a power of two >= 16.
        backend: "chunked" (what None picks), "naive" (the token-by-token definition) or
            "triton" (fused kernels, nestc/ops/delta_rule/triton.py: CUDA tensors, or CPU ones
            with TRITON_INTERPRET=1 set before triton is imported; not yet run on a GPU, so
            None does not pick it there yet).

    Returns:
        o, [B, T, H, V] in q's dtype, and the final state, [B, H, K, V] in float32 (float64 for
        float64 inputs), or None. Sums are accumulated in float32 whatever the input dtype.

    Examples:
        >>> import torch, nestc.ops
        >>> q, k, v = torch.randn(3, 1, 5, 2, 8).unbind(0)
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> o, S = nestc.ops.delta_rule(q, k, v, torch.rand(1, 5, 2))
        >>> o.shape, S.shape
        (torch.Size([1, 5, 2, 8]), torch.Size([1, 2, 8, 8]))
    """
    check_delta_rule_inputs("delta_rule", q, k, v, beta, None, initial_state, scale, chunk_size,
                            backend)
    if backend == "naive":
        return naive_recurrent_delta_rule(q, k, v, beta, scale, initial_state,
                                          output_final_state)
    if backend == "triton":
        from nestc.ops.delta_rule.triton import triton_delta_rule

        return triton_delta_rule(q, k, v, beta, scale, initial_state, output_final_state,
                                 chunk_size)
    return chunk_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, chunk_size)


make_callable(__name__, delta_rule)
