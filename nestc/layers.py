"""The builtin layers and tensor functions of blocks that generated code calls beside torch's
(nestc/codegen/layers.py says which call becomes what, and the defaults the language leaves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Stateful(nn.Module):
    """A submodule with in-context state, keyed by its path (set once the module is built)."""

    state_key = ""


class CausalConv1d(Stateful):
    """Depthwise causal convolution over time; its state is the last window - 1 inputs."""

    def __init__(self, feat: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.conv = nn.Conv1d(feat, feat, window, groups=feat, bias=False)

    def forward(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        B, T, D = x.shape
        past = state.given.get(self.state_key)
        if past is None:
            past = x.new_zeros(B, self.window - 1, D)
        full = torch.cat([past.to(x.dtype), x], 1)  # (B, W - 1 + T, D)
        # a copy: a view would keep the whole [B, W - 1 + T, D] alive in the state (and in
        # checkpoints, 30 times the state's size at T = 256)
        state.out[self.state_key] = full[:, full.shape[1] - (self.window - 1):].clone()
        # y_t = sum_j w_j * full_{t + j}: a window of shifted products, much faster on the CPU
        # than Conv1d's grouped path for short windows (the weight stays the Conv1d's)
        w = self.conv.weight[:, 0].to(x.dtype)  # (D, W)
        y = full[:, :T] * w[:, 0]
        for j in range(1, self.window):
            y = y + full[:, j:j + T] * w[:, j]
        return y


def l2norm(x: torch.Tensor, per: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Divide each of `per` equal slices of the last dim by its L2 norm."""
    shape = x.shape
    y = x.reshape(*shape[:-1], per, shape[-1] // per)
    return (y * torch.rsqrt((y * y).sum(-1, keepdim=True) + eps)).reshape(shape)


def softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    """log(1 + exp(beta x)) / beta, as logaddexp: torch.compile's backward of F.softplus
    followed by a transpose fails at run time in torch 2.13 ("view size is not compatible"),
    which made a compiled self-modifying Titans fail in backward. Equal to F.softplus within
    float32 rounding (it returns x above beta x = 20; log(1 + exp(-20)) = 2e-9)."""
    y = torch.logaddexp(x * beta if beta != 1.0 else x, x.new_zeros(()))
    return y / beta if beta != 1.0 else y


def param(shape: tuple[int, ...], init: str | float) -> nn.Parameter:
    """A block's `param` of this shape: "zeros", "identity", a number for every entry, or
    "default": uniform in +-1/sqrt(shape[0]) (the fan-in of `x @ W`, nn.Linear's weights'
    bound; 0 for a scalar)."""
    if init == "identity":
        return nn.Parameter(torch.eye(shape[0]))
    if init == "default":
        bound = 1 / shape[0] ** 0.5 if shape else 0.0
        return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
    if init == "zeros":
        return nn.Parameter(torch.zeros(shape))
    assert isinstance(init, float), init
    return nn.Parameter(torch.full(shape, init))


def minimum(a: Any, b: Any) -> torch.Tensor:
    """min(a, b), element-wise: tensors or numbers (at least one a tensor)."""
    return torch.minimum(*_tensors(a, b))


def maximum(a: Any, b: Any) -> torch.Tensor:
    """max(a, b), element-wise: tensors or numbers (at least one a tensor)."""
    return torch.maximum(*_tensors(a, b))


def where(cond: Any, a: Any, b: Any) -> torch.Tensor:
    """a where cond is not 0, else b, element-wise; numbers take the dtype of the tensors (the
    first one's): torch.where made an int64 of two ints, a float32 of two floats."""
    cond, a, b = _tensors(cond, a, b)
    return torch.where(cond != 0, a, b)


def lerp(a: Any, b: Any, w: Any) -> Any:
    """a + w (b - a): tensors or numbers."""
    return a + w * (b - a)


# comparisons, element-wise: 1 where it holds, else 0, in the operands' dtype (a bool tensor
# would add as `or` and refuse `-`)
def lt(a: Any, b: Any) -> torch.Tensor:
    return _compare(torch.lt, a, b)


def le(a: Any, b: Any) -> torch.Tensor:
    return _compare(torch.le, a, b)


def gt(a: Any, b: Any) -> torch.Tensor:
    return _compare(torch.gt, a, b)


def ge(a: Any, b: Any) -> torch.Tensor:
    return _compare(torch.ge, a, b)


def eq(a: Any, b: Any) -> torch.Tensor:
    return _compare(torch.eq, a, b)


def ne(a: Any, b: Any) -> torch.Tensor:
    return _compare(torch.ne, a, b)


def _compare(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Any,
             b: Any) -> torch.Tensor:
    a, b = _tensors(a, b)
    return op(a, b).to(torch.promote_types(a.dtype, b.dtype))


def and_(a: Any, b: Any) -> torch.Tensor:
    """a and b, element-wise: 1 where neither is 0, else 0 (in the operands' dtype)."""
    a, b = _tensors(a, b)
    return ne(a, 0) * ne(b, 0)


def or_(a: Any, b: Any) -> torch.Tensor:
    """a or b, element-wise: 1 where either is not 0, else 0 (in the operands' dtype)."""
    a, b = _tensors(a, b)
    return maximum(ne(a, 0), ne(b, 0))


def _tensors(*xs: Any) -> list[torch.Tensor]:
    """Numbers as tensors of the first tensor's dtype and device."""
    t = next(x for x in xs if isinstance(x, torch.Tensor))
    return [x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=t.dtype, device=t.device)
            for x in xs]
