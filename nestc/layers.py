"""The builtin layers and tensor functions of blocks, as torch code the block builder calls.

`compile_call` turns one builtin call of a block into a closure over its submodule (a layer
owns parameters trained by the outer level). Choices the language leaves to defaults:
`linear` has no bias unless `bias = true`; `conv1d` is depthwise and causal with a window of 4;
`rmsnorm` and `l2norm` use eps 1e-6; `layernorm` 1e-5; `softmax_attention` rotates queries and
keys by their positions (rotary embeddings, base 10000) unless `rope = false`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from nestc import ast
from nestc.errors import NestError


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
        state.out[self.state_key] = full[:, full.shape[1] - (self.window - 1):]
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


MATH: dict[str, Any] = {
    "sqrt": torch.sqrt, "abs": torch.abs, "exp": torch.exp, "log": torch.log,
    "sign": torch.sign, "tanh": torch.tanh, "silu": F.silu, "gelu": F.gelu, "relu": F.relu,
    "sigmoid": torch.sigmoid, "stop_grad": torch.detach,
}


def _softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    """log(1 + exp(beta x)) / beta, as logaddexp: torch.compile's backward of F.softplus
    followed by a transpose fails at run time in torch 2.13 ("view size is not compatible"),
    which made a compiled self-modifying Titans fail in backward. Equal to F.softplus within
    float32 rounding (it returns x above beta x = 20; log(1 + exp(-20)) = 2e-9)."""
    y = torch.logaddexp(x * beta if beta != 1.0 else x, x.new_zeros(()))
    return y / beta if beta != 1.0 else y


def compile_call(scope: Any, e: ast.ExprCall, hint: str) -> Any:
    """One builtin call -> Ten (tensor) for the block builder `scope` (nestc.module._Scope)."""
    from nestc.module import Ten, _unsupported

    assert isinstance(e.func, ast.ExprName)
    name = e.func.name
    kw = {k.name: scope.const(k.value) for k in e.kwargs}
    if name in MATH:
        x = scope.tensor(e.args[0], hint)
        fn = MATH[name]
        return Ten(lambda env: fn(x.fn(env)), x.feat)
    if name == "softplus":
        x = scope.tensor(e.args[0], hint)
        beta = float(kw.get("beta", 1.0))
        return Ten(lambda env: _softplus(x.fn(env), beta), x.feat)
    if name == "l2norm":
        x = scope.tensor(e.args[0], hint)
        per, eps = scope.size_kw(e, "per", 1, "`per`"), float(kw.get("eps", 1e-6))
        if x.feat % per:
            raise NestError(f"l2norm per {per} slices of {x.feat} features", e.span,
                            kind="shape")
        return Ten(lambda env: l2norm(x.fn(env), per, eps), x.feat)
    if name in ("mean", "sum"):
        x = scope.tensor(e.args[0], hint)
        if int(kw.get("dim", -1)) != -1:
            raise _unsupported(f"`{name}` over a dim other than the last", e.span)
        per = scope.size_kw(e, "per", 1, "`per`")
        if x.feat % per:
            raise NestError(f"{name} per {per} slices of {x.feat} features", e.span,
                            kind="shape")
        red = torch.mean if name == "mean" else torch.sum
        return Ten(lambda env: red(x.fn(env).unflatten(-1, (per, -1)), -1), per)
    if name == "linear":
        x = scope.tensor(e.args[0], hint)
        if x.tokens:
            raise NestError("linear takes features; embed token ids first", e.args[0].span,
                            kind="type")
        out = scope.size(e.args[1], "the width of a linear layer")
        get = scope.ref(scope.add(f"{hint}_linear",
                                  nn.Linear(x.feat, out, bias=bool(kw.get("bias", False)))))
        return Ten(lambda env: get(env)(x.fn(env)), out)
    if name == "conv1d":
        x = scope.tensor(e.args[0], hint)
        if not kw.get("causal", True):
            raise _unsupported("a non-causal conv1d", e.span)
        get = scope.ref(scope.add(f"{hint}_conv1d",
                                  CausalConv1d(x.feat, scope.size_kw(e, "window", 4,
                                                                     "a conv1d window"))))
        return Ten(lambda env: get(env)(x.fn(env), env["__state__"]), x.feat)
    if name in ("rmsnorm", "layernorm"):
        x = scope.tensor(e.args[0], hint)
        norm: nn.Module = (nn.RMSNorm(x.feat, eps=float(kw.get("eps", 1e-6)))
                           if name == "rmsnorm" else
                           nn.LayerNorm(x.feat, eps=float(kw.get("eps", 1e-5))))
        get = scope.ref(scope.add(f"{hint}_{name}", norm))
        return Ten(lambda env: get(env)(x.fn(env)), x.feat)
    if name == "embed":
        tokens = scope.tensor(e.args[0], hint)
        if not tokens.tokens:
            raise NestError("embed takes token ids (an `int` input)", e.args[0].span,
                            kind="type")
        vocab, dim = scope.size(e.args[1], "a vocabulary"), scope.size(e.args[2], "a width")
        get = scope.ref(scope.add(f"{hint}_embed", nn.Embedding(vocab, dim)))
        return Ten(lambda env: get(env)(tokens.fn(env)), dim)
    if name == "softmax_attention":
        return _attention(scope, e, kw, hint)
    raise _unsupported(f"`{name}` in a block", e.span)


def _attention(scope: Any, e: ast.ExprCall, kw: dict[str, Any], hint: str) -> Any:
    from nestc.memories import CacheMemory
    from nestc.module import Ten, _unsupported

    if kw.get("window") is not None:
        raise _unsupported("windowed softmax attention", e.span)
    if not kw.get("causal", True):
        raise _unsupported("non-causal softmax attention", e.span)
    heads, rope = scope.size_kw(e, "heads", 1, "a number of heads"), bool(kw.get("rope", True))
    q = scope.tensor(e.args[0], hint)
    if len(e.args) != 2 or not isinstance(e.args[1], ast.ExprName) or \
            not isinstance(scope.mems.get(e.args[1].name), CacheMemory):
        raise _unsupported("softmax_attention over anything but a `cache` memory", e.span)
    cache: CacheMemory = scope.mems[e.args[1].name]
    if q.feat % heads or cache.key.feat != q.feat or cache.value_feat % heads:
        raise NestError(f"softmax_attention of {q.feat} query features in {heads} heads over "
                        f"keys of {cache.key.feat} and values of {cache.value_feat} features",
                        e.span, kind="shape",
                        hint="queries and keys have the same width; each splits into heads")
    get = cache.get
    return Ten(lambda env: get(env).attend(q.fn(env), heads, rope, env), cache.value_feat)
