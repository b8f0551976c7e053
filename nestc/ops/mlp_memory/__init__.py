"""The Titans chunk update of a 2-layer MLP memory with momentum and retention.

`mlp_memory(q, k, v, lr, retain, beta, A0, B0)` runs the memory of stdlib/memory/titans.nest
(MLPMemory's chunked tier for the l2 objective, given values, a plain MLP) over a sequence:
reference.py is the PyTorch math, triton.py the fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from nestc.ops.mlp_memory.reference import ACTS, chunk_mlp_memory

__all__ = ["chunk_mlp_memory", "mlp_memory"]

BACKENDS = (None, "chunked", "triton")
# the triton kernel's smallest clip: its square, below this one's, underflows float32 (NaN)
MIN_KERNEL_CLIP = 1e-18


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
           retain: torch.Tensor | None, beta: torch.Tensor | None, A0: torch.Tensor,
           B0: torch.Tensor, SA0: torch.Tensor | None, SB0: torch.Tensor | None, act: str,
           chunk: int, backend: str | None, v_self: torch.Tensor | None = None,
           clip: float | None = None,
           grad_at: tuple[torch.Tensor, torch.Tensor] | None = None, offset: int = 0) -> None:
    """Raise ValueError naming the argument that does not fit the layout."""
    op = "mlp_memory"
    if q.ndim != 4:
        raise ValueError(f"{op}: q must have shape [N, H, T, d], got {list(q.shape)}")
    N, H, T, d = q.shape
    if A0.ndim != 4 or tuple(A0.shape[:3]) != (N, H, d):
        raise ValueError(f"{op}: A0 must have shape [N, H, d, h] = [{N}, {H}, {d}, h], got "
                         f"{list(A0.shape)}")
    h = A0.shape[-1]
    want = {"k": (q.shape, k), "v": (q.shape, v), "v_self": (q.shape, v_self),
            "lr": ((N, H, T), lr),
            "retain": ((N, H, T), retain), "beta": ((N, H, T), beta),
            "B0": ((N, H, h, d), B0), "SA0": ((N, H, d, h), SA0), "SB0": ((N, H, h, d), SB0)}
    if grad_at is not None:
        if not isinstance(grad_at, (tuple, list)) or len(grad_at) != 2:
            raise ValueError(f"{op}: grad_at must be a pair (A, B) of weights or None")
        want |= {"grad_at[0]": ((N, H, d, h), grad_at[0]),
                 "grad_at[1]": ((N, H, h, d), grad_at[1])}
    for name, (shape, x) in want.items():
        if x is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(x.shape)}")
    if (SA0 is None) != (SB0 is None):
        raise ValueError(f"{op}: give both SA0 and SB0 or neither")
    floats = {"q": q, "k": k, "v": v, "lr": lr, "retain": retain, "beta": beta, "A0": A0,
              "B0": B0, "SA0": SA0, "SB0": SB0, "v_self": v_self}
    for name, x in floats.items():  # (an integer q came back as truncated int64 reads)
        if x is not None and not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
        if x is not None and x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device}, q on {q.device}")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not clip > 0):
        raise ValueError(f"{op}: clip must be a number above 0 or None, got {clip!r}")
    if clip is not None and backend == "triton" and clip < MIN_KERNEL_CLIP:
        raise ValueError(f"{op}: clip {clip!r} is below {MIN_KERNEL_CLIP}: its square "
                         "underflows float32 in the triton kernel")
    if act not in ACTS:
        raise ValueError(f"{op}: act must be one of {ACTS}, got {act!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{op}: chunk must be a positive int, got {chunk!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < chunk:
        raise ValueError(f"{op}: offset must be an int in [0, chunk) = [0, {chunk}), got "
                         f"{offset!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; use None, 'chunked' or 'triton'")


def mlp_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
               retain: torch.Tensor | None, beta: torch.Tensor | None, A0: torch.Tensor,
               B0: torch.Tensor, SA0: torch.Tensor | None = None,
               SB0: torch.Tensor | None = None, *, act: str = "gelu", clip: float | None = None,
               read_before: bool = False, chunk: int = 64, v_self: torch.Tensor | None = None,
               grad_at: tuple[torch.Tensor, torch.Tensor] | None = None, offset: int = 0,
               backend: str | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run a Titans MLP memory over a sequence, each chunk's gradients at its first weights.

    Args:
        q, k, v: queries, keys and values, [N, H, T, d]; the memory learns k -> v with the
            l2 objective 1/2 |act(k A) B - v|^2 and reads y_t = act(q_t A_t) B_t.
        lr: per-token learning rates, [N, H, T].
        retain: per-token retention of the weights, [N, H, T], or None (1: no forgetting).
        beta: per-token momentum decay, [N, H, T], or None (no momentum: SA, SB unchanged).
        A0, B0: the weights before token 0, [N, H, d, h] and [N, H, h, d].
        SA0, SB0: the momenta before token 0, like A0 and B0, or None (zeros).
        act: "gelu" (exact, erf form) or "silu".
        clip: scale each token's gradient (the pair dA, dB) to norm at most clip; None: no
            clipping.
        read_before: read the weights before the token's write instead of after it.
        chunk: tokens per chunk (the last may be short); 16, 32 or 64 for "triton".
        v_self: [N, H, T, d] or None: targets the memory generates itself (self-modifying
            Titans' stop_grad(M(x))): token t learns v_t + act(x_t A_c) B_c, with A_c, B_c
            the weights its chunk starts with, and no gradient flows through that term (to
            v_self, A_c or B_c).
        grad_at, offset: a sequence that starts `offset` tokens into a chunk (0 <= offset <
            chunk; its first chunk then holds chunk - offset tokens), whose first weights
            were grad_at = (A_c, B_c): that chunk's gradients (and generated values) are
            taken there, and grad_at gets gradients. This is how a model that runs in pieces
            carries a memory across a chunk that a piece boundary cuts.
        backend: "chunked" (PyTorch, what None picks) or "triton" (the fused kernel of
            triton.py: CUDA tensors, or CPU ones with TRITON_INTERPRET=1 set before triton is
            imported; not yet run on a GPU, so None does not pick it there yet).

    Returns:
        y, [N, H, T, d] in q's dtype, and the final (A, B, SA, SB) in float32 (float64 for
        float64 inputs).

    Examples:
        >>> import torch, nestc.ops.mlp_memory as mm
        >>> q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
        >>> lr, retain, beta = torch.rand(3, 1, 2, 5).unbind(0)
        >>> A0, B0 = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 16, 8)
        >>> y, (A, B, SA, SB) = mm.mlp_memory(q, k, v, lr, retain, beta, A0, B0, chunk=4)
        >>> y.shape, A.shape, SB.shape
        (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 8, 16]), torch.Size([1, 2, 16, 8]))
    """
    _check(q, k, v, lr, retain, beta, A0, B0, SA0, SB0, act, chunk, backend, v_self, clip,
           grad_at, offset)
    kw: dict[str, Any] = {"act": act, "clip": clip, "read_before": read_before, "chunk": chunk,
                          "v_self": v_self, "offset": offset,
                          "grad_at": None if grad_at is None else tuple(grad_at)}
    if backend == "triton":
        from nestc.ops.mlp_memory.triton import triton_mlp_memory

        return triton_mlp_memory(q, k, v, lr, retain, beta, A0, B0, SA0, SB0, **kw)
    return chunk_mlp_memory(q, k, v, lr, retain, beta, A0, B0, SA0, SB0, **kw)
