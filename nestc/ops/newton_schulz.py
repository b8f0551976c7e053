"""Muon's quintic Newton-Schulz orthogonalization (PAPER.md sec. 3), as torch.optim.Muon does it.

X0 = G / max(||G||_F, eps) in `dtype`, transposed when rows > cols, then `steps` times
X <- a X + (b A + c A^2) X with A = X X^T. A tensor with more than two dims is orthogonalized
as its (dim0, rest) matrix view and returned in its own shape and dtype.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16}


def newton_schulz(g: torch.Tensor, steps: int, eps: float,
                  coefficients: tuple[float, float, float], dtype: str = "bfloat16") -> torch.Tensor:
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got a tensor of shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.reshape(g.shape[0], -1).to(DTYPES[dtype])  # (rows, cols)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(int(steps)):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    if tall:
        x = x.T
    return x.reshape(g.shape).to(g.dtype)
