"""The builtin layers and tensor functions of blocks, as generated code.

`compile_call` turns one builtin call of a block into an expression; a layer that owns
parameters (trained by the outer level) becomes a submodule. Choices the language leaves to
defaults: `linear` has no bias unless `bias = true`; `conv1d` is depthwise and causal with a
window of 4; `rmsnorm` and `l2norm` use eps 1e-6; `layernorm` 1e-5; `softmax_attention` rotates
queries and keys by their positions (rotary embeddings, base 10000) unless `rope = false`.
The runtime side is nestc/layers.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nestc import ast
from nestc.codegen.block import MATH, Ten, unsupported
from nestc.codegen.torch import literal
from nestc.errors import NestError
from nestc.hyper import UNKNOWN, const_eval


def compile_call(scope: Any, e: ast.ExprCall, hint: str) -> Any:
    """One builtin call -> Ten (a constant where hyperparameters pick it) for the block
    generator `scope` (nestc.codegen.block._Scope)."""
    assert isinstance(e.func, ast.ExprName)
    name = e.func.name
    kw = {k.name: scope.const(k.value) for k in e.kwargs}
    if name in MATH:
        x = scope.tensor(e.args[0], hint, fixed=True)
        return replace(x, code=f"{MATH[name]}({x.code})")
    if name == "softplus":
        x = scope.tensor(e.args[0], hint, fixed=True)
        beta = scope.number_kw(e, "beta", 1.0, "softplus's `beta`", positive=True)
        return replace(x, code=f"_layers.softplus({x.code}, {literal(beta)})")
    if name == "l2norm":
        x = scope.tensor(e.args[0], hint)
        per = scope.size_kw(e, "per", 1, "`per`")
        eps = scope.number_kw(e, "eps", 1e-6, "l2norm's `eps`", positive=True)
        if x.feat % per:
            raise NestError(f"l2norm per {per} slices of {x.feat} features", e.span,
                            kind="shape")
        return Ten(f"_layers.l2norm({x.code}, {per}, {literal(eps)})", x.feat)
    if name in ("mean", "sum"):
        x = scope.tensor(e.args[0], hint)
        _last_dim(e, kw, name)
        per = scope.size_kw(e, "per", 1, "`per`")
        if x.feat % per:
            raise NestError(f"{name} per {per} slices of {x.feat} features", e.span,
                            kind="shape")
        return Ten(f"{x.code}.unflatten(-1, ({per}, -1)).{name}(-1)", per)
    if name == "linear":
        x = scope.tensor(e.args[0], hint)
        if x.tokens:
            raise NestError("linear takes features; embed token ids first", e.args[0].span,
                            kind="type")
        out = scope.size(e.args[1], "the width of a linear layer")
        attr = scope.add(f"{hint}_linear",
                         f"nn.Linear({x.feat}, {out}, bias={bool(kw.get('bias', False))})")
        return Ten(f"self.{attr}({x.code})", out)
    if name == "conv1d":
        x = scope.tensor(e.args[0], hint)
        if not kw.get("causal", True):
            raise unsupported("a non-causal conv1d", e.span)
        window = scope.size_kw(e, "window", 4, "a conv1d window")
        attr = scope.add(f"{hint}_conv1d", f"_layers.CausalConv1d({x.feat}, {window})")
        return Ten(f"self.{attr}({x.code}, _state)", x.feat)
    if name in ("rmsnorm", "layernorm"):
        x = scope.tensor(e.args[0], hint)
        eps = scope.number_kw(e, "eps", 1e-6 if name == "rmsnorm" else 1e-5, f"{name}'s `eps`",
                              positive=True)
        code = f"nn.{'RMSNorm' if name == 'rmsnorm' else 'LayerNorm'}({x.feat}, " \
            f"eps={literal(eps)})"
        attr = scope.add(f"{hint}_{name}", code)
        return Ten(f"self.{attr}({x.code})", x.feat)
    if name == "embed":
        tokens = scope.tensor(e.args[0], hint)
        if not tokens.tokens:
            raise NestError("embed takes token ids (an `int` input)", e.args[0].span,
                            kind="type")
        vocab, dim = scope.size(e.args[1], "a vocabulary"), scope.size(e.args[2], "a width")
        attr = scope.add(f"{hint}_embed", f"nn.Embedding({vocab}, {dim})")
        return Ten(f"self.{attr}({tokens.code})", dim)
    if name == "softmax_attention":
        return _attention(scope, e, kw, hint)
    if name == "where":  # a condition of hyperparameters: that branch
        cond = const_eval(e.args[0], scope.consts)
        if cond is not UNKNOWN:
            return scope.value(e.args[1] if cond else e.args[2], hint)
    if name in ELEMENTWISE:
        return scope.elementwise(ELEMENTWISE[name], list(e.args), e.span, f"`{name}`", hint)
    if name == "clamp":
        x = scope.tensor(e.args[0], hint, fixed=True)
        bounds = {k.name: scope.number(k.value, f"clamp's `{k.name}`") for k in e.kwargs}
        if len(bounds) == 2 and bounds["lo"] > bounds["hi"]:
            raise NestError(f"clamp's `lo` {bounds['lo']} is above its `hi` {bounds['hi']}",
                            e.span, kind="value")
        args = "".join(f", {m}={literal(bounds[k])}" for k, m in (("lo", "min"), ("hi", "max"))
                       if k in bounds)
        return replace(x, code=f"torch.clamp({x.code}{args})") if args else x
    if name == "softmax":
        x = scope.tensor(e.args[0], hint)
        _last_dim(e, kw, name)
        return Ten(f"torch.softmax({x.code}, -1)", x.feat)
    if name == "concat":
        _last_dim(e, kw, name)
        xs = [scope.tensor(a, hint) for a in e.args]
        if any(x.tokens for x in xs):
            raise NestError("concat takes features, not token ids; embed them first", e.span,
                            kind="type")
        return Ten(f"torch.cat([{', '.join(x.code for x in xs)}], -1)", sum(x.feat for x in xs))
    if name == "norm":
        x = scope.tensor(e.args[0], hint, fixed=True)
        if x.tokens:
            raise NestError("norm takes features, not token ids; embed them first",
                            e.args[0].span, kind="type")
        if x.shape is not None:  # a param's tensor: its Frobenius norm, one number
            return Ten(f"torch.linalg.vector_norm({x.code})", 1, shape=())
        # a sequence: each token's features' (the last dim kept, as mean's and sum's)
        return Ten(f"torch.linalg.vector_norm({x.code}, dim=-1, keepdim=True)", 1)
    if name == "transpose":
        x = _matrix(scope, e.args[0], hint, "transpose")
        assert x.shape is not None
        return Ten(f"{x.code}.mT", x.shape[0], shape=(x.shape[1], x.shape[0]))
    if name == "outer":  # of two vectors of params: a matrix
        u, v = (_matrix(scope, a, hint, "outer", dims=1) for a in e.args)
        assert u.shape is not None and v.shape is not None
        return Ten(f"torch.outer({u.code}, {v.code})", v.shape[0],
                   shape=(u.shape[0], v.shape[0]))
    raise unsupported(f"`{name}` in a block", e.span)


def _matrix(scope: Any, e: ast.Expr, hint: str, what: str, dims: int = 2) -> Ten:
    """A param's tensor of `dims` dims (a matrix, or a vector), for transpose and outer: a
    sequence's features are a vector per token, which these are not built for."""
    x = scope.tensor(e, hint, fixed=True)
    if x.shape is None:
        raise unsupported(f"`{what}` of a sequence (it takes a param's "
                          f"{'matrix' if dims == 2 else 'vector'})", e.span)
    if len(x.shape) != dims:
        raise NestError(f"{what} takes a {'matrix' if dims == 2 else 'vector'}, got a "
                        f"param's tensor of shape {list(x.shape)}", e.span, kind="shape")
    return x


# element-wise builtins of tensors and numbers: the function generated code calls
ELEMENTWISE = {"min": "_layers.minimum", "max": "_layers.maximum", "lerp": "_layers.lerp",
               "where": "_layers.where"}


def _last_dim(e: ast.ExprCall, kw: dict[str, Any], name: str) -> None:
    """A `dim` keyword: the last (-1), the only one built."""
    dim = kw.get("dim", -1)
    if isinstance(dim, bool) or not isinstance(dim, int):
        span = next(k.value.span for k in e.kwargs if k.name == "dim")
        raise NestError(f"{name}'s `dim` is a whole number, got {dim!r}", span, kind="type")
    if dim != -1:
        raise unsupported(f"`{name}` over a dim other than the last", e.span)


def _attention(scope: Any, e: ast.ExprCall, kw: dict[str, Any], hint: str) -> Ten:
    from nestc.codegen.memories import CachePlan

    if not kw.get("causal", True):
        raise unsupported("non-causal softmax attention", e.span)
    heads, rope = scope.size_kw(e, "heads", 1, "a number of heads"), bool(kw.get("rope", True))
    q = scope.tensor(e.args[0], hint)
    if len(e.args) != 2 or not isinstance(e.args[1], ast.ExprName) or \
            not isinstance(scope.mems.get(e.args[1].name), CachePlan):
        raise unsupported("softmax_attention over anything but a `cache` memory", e.span)
    cache: CachePlan = scope.mems[e.args[1].name]
    if q.feat % heads or cache.key.feat != q.feat or cache.value.feat % heads:
        raise NestError(f"softmax_attention of {q.feat} query features in {heads} heads over "
                        f"keys of {cache.key.feat} and values of {cache.value.feat} features",
                        e.span, kind="shape",
                        hint="queries and keys have the same width; each splits into heads")
    # 0 (the default): every token so far
    window = scope.size_kw(e, "window", 0, "an attention window", minimum=0) or None
    cache.windows.append(window)
    args = f"{q.code}, {heads}, {rope}, _env" + (f", window={window}" if window else "")
    return Ten(f"self.{cache.attr}.attend({args})", cache.value.feat)
