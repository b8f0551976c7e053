"""The gated delta rule as Triton kernels: the delta rule's kernels with the log decay g.

See ../delta_rule/triton.py for the kernels and ../delta_rule/README.md for the derivation.
"""

from __future__ import annotations

import torch

from nestc.ops.delta_rule.triton import delta_rule_with_triton


def triton_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            beta: torch.Tensor, scale: float | None = None,
                            initial_state: torch.Tensor | None = None,
                            output_final_state: bool = True, chunk_size: int = 64,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments and results as `chunk_gated_delta_rule` (float32, bfloat16 or float16
    inputs, K <= 128, chunk_size <= 64), on CUDA tensors, or on CPU ones under
    TRITON_INTERPRET=1."""
    return delta_rule_with_triton("triton_gated_delta_rule", q, k, v, g, beta, scale,
                                  initial_state, output_final_state, chunk_size)
