"""The residual MLP memory of an optimizer: deep momentum (DMGD, PAPER.md sec. 3).

m(x) = x + W1 act(W2 x) on each row x in R^d of a tensor's (dim0, rest) view, with W1: (d, h)
and W2: (h, d). For rows X (n, d):

    Z = X W2^T  (n, h),   A = act(Z)  (n, h),   Y = X + A W1^T  (n, d)

For an objective summed over the rows, with dY = dL/dY (n, d):

    dW1 = dY^T A  (d, h),   dZ = (dY W1) * act'(Z)  (n, h),   dW2 = dZ^T X  (h, d)

where dY = Y - T for l2 (1/2 ||Y - T||^2) and dY = -T for dot (-<Y, T>). One gd step with rate
lr and retention r is W <- r W - lr dW for both matrices, from the gradients at the old state.
nestc/interp.py defines the same step with autograd; the tests compare the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _sigmoid_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    # the exact (erf) GELU, torch's default: Phi(z) + z phi(z)
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(
        2 * math.pi)


Act = Callable[[torch.Tensor], torch.Tensor]
# name -> (act, act'): the names are ir.MLP_ACTS
ACTS: dict[str, tuple[Act, Act]] = {
    "silu": (torch.nn.functional.silu, _silu_grad),
    "relu": (torch.relu, lambda z: (z > 0).to(z.dtype)),
    "tanh": (torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),
    "sigmoid": (torch.sigmoid, _sigmoid_grad),
    "gelu": (torch.nn.functional.gelu, _gelu_grad),
}


def as_rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """x's (dim0, rest) view: (n, d) rows of d numbers (a scalar is one row)."""
    return x.reshape(x.shape[0] if x.ndim else 1, d)


def identity_init(d: int, hidden: int, seed: int, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) with m(x) = x: W1 = 0, W2 ~ N(0, 1/d) drawn in float32 on the CPU from a
    generator seeded with `seed`, then moved to `like`'s device and dtype. W2 = 0 would make
    every gradient zero forever (A = act(0) = 0 and dY W1 = 0)."""
    gen = torch.Generator().manual_seed(seed)
    w2 = torch.randn(hidden, d, generator=gen) / math.sqrt(d)  # (h, d)
    return torch.zeros(d, hidden).to(like), w2.to(like)


def read(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, act: str) -> torch.Tensor:
    """m(x), in x's shape."""
    X = as_rows(x, w1.shape[0])  # (n, d)
    return (X + ACTS[act][0](X @ w2.T) @ w1.T).reshape(x.shape)


def learn(w1: torch.Tensor, w2: torch.Tensor, key: torch.Tensor, target: torch.Tensor,
          lr: float | torch.Tensor, retain: float | torch.Tensor, objective: str, act: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) after one gd step on objective(m(key), target), summed over the rows."""
    f, df = ACTS[act]
    X, T = as_rows(key, w1.shape[0]), as_rows(target, w1.shape[0])  # (n, d)
    Z = X @ w2.T  # (n, h)
    A = f(Z)
    dY = X + A @ w1.T - T if objective == "l2" else -T  # (n, d)
    dw1 = dY.T @ A  # (d, h)
    dw2 = ((dY @ w1) * df(Z)).T @ X  # (h, d)
    return retain * w1 - lr * dw1, retain * w2 - lr * dw2
