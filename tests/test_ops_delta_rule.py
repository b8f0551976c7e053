"""nestc.ops.delta_rule and gated_delta_rule against fla-core's naive recurrences.

Outputs, final states and every gradient are compared with a normalized error
(rms(ours - ref) / rms(ref), as fla's assert_close) in float32.
fla-core's naive files are loaded by path, so `fla` and its Triton kernels are never imported.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
from fla_reference import fla_naive, run_fla

torch = pytest.importorskip("torch")
F = torch.nn.functional

import nestc.ops  # noqa: E402

B, H, K, V = 2, 2, 16, 32
LENGTHS = (1, 5, 63, 64, 100, 130)
OPS = ("delta_rule", "gated_delta_rule")
TOL = 1e-4


def err_ratio(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.detach().double() - ref.detach().double()).square().mean().sqrt()
            / (ref.detach().double().square().mean().sqrt() + 1e-8)).item()


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    """The normalized error under tol, or every entry within 1e-6 (for all-zero references,
    such as dg when no state has been decayed yet)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if (ours.detach().double() - ref.detach().double()).abs().max().item() <= 1e-6:
        return
    ratio = err_ratio(ours, ref)
    assert ratio < tol, f"{name}: normalized error {ratio:.2e} >= {tol:.0e}"


def make_inputs(op: str, T: int, with_state: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaf tensors in the [B, T, H, D] layout; keys unit-norm as DeltaNet feeds them."""
    gen = torch.Generator().manual_seed(seed * 1000 + T)
    x = {"q": torch.randn(B, T, H, K, generator=gen),
         "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
         "v": torch.randn(B, T, H, V, generator=gen),
         "beta": torch.rand(B, T, H, generator=gen)}
    if op == "gated_delta_rule":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, generator=gen))
    if with_state:
        x["initial_state"] = torch.randn(B, H, K, V, generator=gen)
    return {name: t.requires_grad_() for name, t in x.items()}


def cotangents(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7 + T)
    return torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)


def run_ours(op: str, x: dict[str, torch.Tensor], **kw):
    fn = getattr(nestc.ops, op)
    if op == "delta_rule":
        return fn(x["q"], x["k"], x["v"], x["beta"], initial_state=x.get("initial_state"), **kw)
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x.get("initial_state"),
              **kw)


def results(o: torch.Tensor, S: torch.Tensor, x: dict[str, torch.Tensor], T: int
            ) -> dict[str, torch.Tensor]:
    """o, S and the gradient of every input for the loss <o, do> + <S, dS>."""
    do, dS = cotangents(T)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(x.values()))
    return {"o": o.detach(), "final_state": S.detach(),
            **{f"d{name}": g for name, g in zip(x, grads)}}


@functools.cache
def reference(op: str, T: int, with_state: bool) -> dict[str, torch.Tensor]:
    x = make_inputs(op, T, with_state)
    return results(*run_fla(op, x), x, T)


def check_against_reference(op: str, T: int, with_state: bool, **kw) -> None:
    x = make_inputs(op, T, with_state)
    ours = results(*run_ours(op, x, **kw), x, T)
    ref = reference(op, T, with_state)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(f"{op} {name}", ours[name], ref[name])


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("op", OPS)
def test_chunked_matches_fla(op: str, T: int, chunk_size: int, with_state: bool) -> None:
    check_against_reference(op, T, with_state, chunk_size=chunk_size, backend="chunked")


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("op", OPS)
def test_naive_matches_fla(op: str, T: int, with_state: bool) -> None:
    check_against_reference(op, T, with_state, backend="naive")


def test_default_backend_is_chunked() -> None:
    x = make_inputs("gated_delta_rule", 100, True)
    o, S = run_ours("gated_delta_rule", x)
    o_chunked, S_chunked = run_ours("gated_delta_rule", x, backend="chunked")
    assert torch.equal(o, o_chunked) and torch.equal(S, S_chunked)


def test_scale_matches_fla() -> None:
    x = make_inputs("gated_delta_rule", 70, True)
    fla = fla_naive("ops/gated_delta_rule/naive.py")
    o_ref, S_ref = fla.naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["beta"], x["g"], scale=0.3, initial_state=x["initial_state"],
        output_final_state=True)
    for backend in ("chunked", "naive"):
        o, S = run_ours("gated_delta_rule", x, scale=0.3, chunk_size=32, backend=backend)
        assert_close(f"{backend} o", o, o_ref)
        assert_close(f"{backend} final_state", S, S_ref)
        # with g = 0 the gated rule is the plain one, scale included
        x0 = {**x, "g": torch.zeros_like(x["g"])}
        o_gated, S_gated = run_ours("gated_delta_rule", x0, scale=0.3, backend=backend)
        o_plain, S_plain = run_ours("delta_rule", x0, scale=0.3, backend=backend)
        assert_close(f"{backend} g=0 o", o_plain, o_gated, 1e-6)
        assert_close(f"{backend} g=0 final_state", S_plain, S_gated, 1e-6)


@pytest.mark.parametrize("backend", ["chunked", "naive"])
@pytest.mark.parametrize("op", OPS)
def test_no_final_state(op: str, backend: str) -> None:
    x = make_inputs(op, 40, True)
    o, S = run_ours(op, x, output_final_state=False, backend=backend)
    o_full, _ = run_ours(op, x, backend=backend)
    assert S is None
    assert torch.equal(o, o_full)


@pytest.mark.parametrize("op", OPS)
def test_streaming_equals_one_pass(op: str) -> None:
    x = make_inputs(op, 130, True)
    o, S = run_ours(op, x, chunk_size=32)
    per_token = [n for n in x if n != "initial_state"]
    first = {n: x[n][:, :45] for n in per_token} | {"initial_state": x["initial_state"]}
    o1, S1 = run_ours(op, first, chunk_size=32)
    rest = {n: x[n][:, 45:] for n in per_token} | {"initial_state": S1}
    o2, S2 = run_ours(op, rest, chunk_size=32)
    assert_close("o", torch.cat([o1, o2], 1), o, 1e-5)
    assert_close("final_state", S2, S, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_half_inputs_close_to_float32(op: str, dtype: torch.dtype) -> None:
    x = {n: t.detach().to(dtype) for n, t in make_inputs(op, 100, True).items()}
    x32 = {n: t.float() for n, t in x.items()}
    o, S = run_ours(op, x, chunk_size=32)
    o32, S32 = run_ours(op, x32, chunk_size=32)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_close("o", o, o32, 2e-2)
    assert_close("final_state", S, S32, 2e-2)
    x = {n: t.requires_grad_() for n, t in x.items()}
    o, _ = run_ours(op, x)
    o.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all()
               for t in x.values())


@pytest.mark.parametrize("backend", ["chunked", "naive"])
@pytest.mark.parametrize("op", OPS)
def test_autocast_leaves_the_recurrence_in_float32(op: str, backend: str) -> None:
    """Under torch.autocast the ops compute as without it (float32 sums; on the CPU autocast
    would otherwise reach a triangular solve with no bfloat16 kernel)."""
    x = {n: t.detach().to(torch.bfloat16) for n, t in make_inputs(op, 40, True).items()}
    plain = run_ours(op, x, backend=backend, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run_ours(op, x, backend=backend, chunk_size=16)
    for a, b in zip(plain, cast, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_float64_gradcheck(op: str) -> None:
    """The chunked form's autograd against finite differences, at a tiny size (two chunks)."""
    def tiny(name: str, t: torch.Tensor) -> torch.Tensor:  # B = H = 1, K = V = 3
        t = t.detach().double()
        if name == "initial_state":
            return t[:1, :1, :3, :3]
        return t[:1, :, :1, :3] if t.ndim == 4 else t[:1, :, :1]

    x = {n: tiny(n, t) for n, t in make_inputs(op, 20, True).items()}
    x["k"] = F.normalize(x["k"], dim=-1)
    x = {n: t.requires_grad_() for n, t in x.items()}

    def fn(*args):
        return run_ours(op, dict(zip(x, args)), chunk_size=16)

    assert torch.autograd.gradcheck(fn, tuple(x.values()))


@pytest.mark.parametrize("op", OPS)
def test_empty_sequence(op: str) -> None:
    x = {n: (t[:, :0] if n != "initial_state" else t) for n, t in make_inputs(op, 5, True).items()}
    for backend in ("chunked", "naive"):
        o, S = run_ours(op, x, backend=backend)
        assert o.shape == (B, 0, H, V)
        assert torch.equal(S, x["initial_state"])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dims", [(0, 5, H, K, V), (B, 5, 0, K, V), (B, 5, H, K, 0)],
                         ids=["B0", "H0", "V0"])
def test_empty_batch_heads_or_values(op: str, dims: tuple[int, ...]) -> None:
    """B, H or V of 0 gave the naive tier's empty results and crashed the chunked one (a
    reshape of 0 elements into [-1, 0, ...])."""
    b, T, h, k, v = dims
    x = {"q": torch.randn(b, T, h, k), "k": torch.randn(b, T, h, k),
         "v": torch.randn(b, T, h, v), "beta": torch.rand(b, T, h),
         "g": -torch.rand(b, T, h), "initial_state": torch.randn(b, h, k, v)}
    if op == "delta_rule":
        del x["g"]
    for backend in ("chunked", "naive"):
        o, S = run_ours(op, x, backend=backend)
        assert o.shape == (b, T, h, v) and S.shape == (b, h, k, v)


def test_a_log_retention_of_minus_infinity_forgets_on_every_tier() -> None:
    """exp(-inf) = 0 forgets the state; the chunked tier's differences of running sums made
    -inf - -inf = NaN of it. A log retention below log(1e-30) is taken as that on every tier
    (a factor under 1e-30 forgets as 0 does)."""
    from nestc.ops.linear_attention import chunk_linear_attention

    x = {n: t.detach() for n, t in make_inputs("gated_delta_rule", 40, True).items()}
    x["g"][:, 7] = float("-inf")
    x["g"][:, 30, 0] = -1e4
    naive, chunked = (run_ours("gated_delta_rule", x, backend=b, chunk_size=16)
                      for b in ("naive", "chunked"))
    for a, b in zip(naive, chunked, strict=True):
        assert torch.isfinite(b).all()
        assert_close("g = -inf", b, a)
    # the state forgets at token 7: what comes after does not depend on what came before
    y = {**x, "v": x["v"].clone()}
    y["v"][:, :7] += 1
    after = run_ours("gated_delta_rule", y, backend="chunked", chunk_size=16)[0]
    assert torch.allclose(after[:, 7:], chunked[0][:, 7:], atol=1e-6)
    o, S = chunk_linear_attention(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                  x["initial_state"], 16)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()


@pytest.mark.parametrize("op", ["gated_delta_rule", "linear_attention"])
def test_the_gradient_of_a_tiny_or_zero_retention_keeps_its_digits(op: str) -> None:
    """The chunked forms took each decay as exp(G_t - G_s) of running sums: the gradient at a
    retention of 1e-8 came out +11.9 where it is -0.95 (float32), and a retention of 0 (its log
    clamped) had none. They now sum each span's own logs, and a clamped log passes its
    gradient (nestc.memories takes retentions so)."""
    from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
    from nestc.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from nestc.ops.linear_attention import chunk_linear_attention
    from nestc.ops.utils import log_factors

    gen = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(1, 40, 2, 8, generator=gen), dim=-1) for _ in "qk")
    v, beta = torch.randn(1, 40, 2, 8, generator=gen), torch.rand(1, 40, 2, generator=gen)
    r0 = 0.5 + 0.5 * torch.rand(1, 40, 2, generator=gen)
    r0[0, 5, 0], r0[0, 20, 1], r0[0, 21, 0] = 1e-8, 0.0, 1e-5
    dy = torch.randn(1, 40, 2, 8, generator=gen)

    def grad(dtype: torch.dtype, chunked: bool) -> torch.Tensor:
        r = r0.to(dtype).requires_grad_()
        x = [t.to(dtype) for t in (q, k, v)]
        if op == "linear_attention":
            if chunked:
                o, S = chunk_linear_attention(*x, beta.to(dtype), log_factors(r), None, 16)
            else:  # the recurrence token by token: S_t = r_t S_{t-1} + beta_t k_t v_t^T
                S, outs = torch.zeros(1, 2, 8, 8, dtype=dtype), []
                for t in range(40):
                    S = r[:, t, :, None, None] * S + beta.to(dtype)[:, t, :, None, None] * \
                        x[1][:, t, :, :, None] * x[2][:, t, :, None, :]
                    outs.append(torch.einsum("bhk,bhkv->bhv", x[0][:, t], S))
                o = torch.stack(outs, 1)
        elif chunked:
            o, S = chunk_gated_delta_rule(*x, log_factors(r), beta.to(dtype), 1.0, None, True, 16)
        else:
            o, S = naive_recurrent_gated_delta_rule(*x, log_factors(r), beta.to(dtype), 1.0, None, True)
        (g,) = torch.autograd.grad((o.double() * dy).sum() + S.double().sum(), r)
        return g.double()

    got, want = grad(torch.float32, True), grad(torch.float64, False)
    for t, h in ((5, 0), (20, 1), (21, 0)):
        assert abs(got[0, t, h] - want[0, t, h]) <= 1e-4 * abs(want[0, t, h]), (t, got, want)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def bad(name: str, value) -> dict:
    return {name: value}


ERRORS = [
    (bad("q", torch.randn(B, 8, H)), "q must have shape [B, T, H, K] (4 dims), got [2, 8, 2]"),
    (bad("k", torch.randn(B, 8, H, K + 1)), "q and k must have the same shape [B, T, H, K], "
                                            "got q [2, 8, 2, 16] and k [2, 8, 2, 17]"),
    (bad("v", torch.randn(B, 9, H, V)), "v must have shape [B, T, H, V] = [2, 8, 2, V] like q, "
                                        "got [2, 9, 2, 32]"),
    (bad("beta", torch.rand(B, 8)), "beta must have shape [B, T, H] (3 dims), got [2, 8]"),
    (bad("beta", torch.rand(B, 8, H + 1)), "beta must have shape [B, T, H] = [2, 8, 2], "
                                           "got [2, 8, 3]"),
    (bad("g", torch.rand(1, 8, H)), "g must have shape [B, T, H] = [2, 8, 2], got [1, 8, 2]"),
    (bad("initial_state", torch.randn(B, H, V, K)), "initial_state must have shape [B, H, K, V] "
                                                    "= [2, 2, 16, 32], got [2, 2, 32, 16]"),
    (bad("v", torch.randn(B, 8, H, V, dtype=torch.float64)),
     "q, k and v must share one dtype, got torch.float32, torch.float32 and torch.float64"),
    (bad("beta", torch.ones(B, 8, H, dtype=torch.int64)),
     "beta must be float32, bfloat16, float16 or float64, got torch.int64"),
    (bad("q", [[0.0]]), "q must be a torch.Tensor, got list"),
    ({"chunk_size": 24}, "chunk_size must be a power of two >= 16 (16, 32, 64, ...), got 24"),
    ({"chunk_size": 8}, "chunk_size must be a power of two >= 16 (16, 32, 64, ...), got 8"),
    ({"chunk_size": 64.0}, "chunk_size must be a power of two >= 16 (16, 32, 64, ...), got 64.0"),
    ({"backend": "cuda"}, "unknown backend 'cuda'; use None, 'chunked', 'naive' or 'triton'"),
    ({"scale": "1"}, "scale must be a number or None, got str"),
    ({"q": torch.randn(B, 8, H, 0), "k": torch.randn(B, 8, H, 0),
      "initial_state": torch.randn(B, H, 0, V)},
     "q and k need at least one feature (K >= 1), got K = 0"),
]


@pytest.mark.parametrize(("op", "change", "message"),
                         [(op, change, message) for op in OPS for change, message in ERRORS
                          if op == "gated_delta_rule" or "g" not in change])
def test_bad_inputs(op: str, change: dict, message: str) -> None:
    x = {n: t.detach() for n, t in make_inputs("gated_delta_rule", 8, True).items()}
    x.update({n: val for n, val in change.items() if n in x})
    kw = {n: val for n, val in change.items() if n not in x}
    if op == "delta_rule":
        del x["g"]
    with pytest.raises(ValueError) as info:
        run_ours(op, x, **kw)
    assert str(info.value) == f"{op}: {message}"


def test_ops_import_is_lazy_and_callable_either_way() -> None:
    """`import nestc.ops` leaves torch unimported; the op packages, imported first, are
    callable with the functions' signature too."""
    code = """
import sys
import nestc.ops
assert "torch" not in sys.modules, "nestc.ops imported torch"
from nestc.ops.gated_delta_rule import chunk  # binds nestc.ops.gated_delta_rule to the package
import torch
q = k = torch.nn.functional.normalize(torch.randn(1, 20, 2, 16), dim=-1)
v, beta, g = torch.randn(1, 20, 2, 16), torch.rand(1, 20, 2), -torch.rand(1, 20, 2)
o1, _ = nestc.ops.gated_delta_rule(q, k, v, g, beta)
o2, _ = chunk.chunk_gated_delta_rule(q, k, v, g, beta)
assert torch.equal(o1, o2)
f = nestc.ops.delta_rule
assert callable(f) and f.__name__ == "delta_rule", f
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_an_empty_sequence_returns_a_copy_of_the_state_not_the_callers_tensor():
    """At T = 0 the chunked tiers handed back the initial state itself (an in-place change of
    the result changed the caller's input), where the triton tier returned a copy."""
    from nestc.ops.linear_attention import chunk_linear_attention
    from nestc.ops.mlp_memory import mlp_memory

    q = torch.randn(1, 0, 1, 4)
    v, beta, h0 = torch.randn(1, 0, 1, 4), torch.rand(1, 0, 1), torch.randn(1, 1, 4, 4)
    states = [nestc.ops.delta_rule(q, q, v, beta, initial_state=h0)[1],
              nestc.ops.gated_delta_rule(q, q, v, beta.log(), beta, initial_state=h0)[1],
              chunk_linear_attention(q, q, v, beta, initial_state=h0)[1]]
    for state in states:
        torch.testing.assert_close(state, h0)
        assert state.data_ptr() != h0.data_ptr()
    x, A0, B0 = torch.randn(1, 1, 0, 4), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 8, 4)
    _, (A, B, SA, SB) = mlp_memory(x, x, x, torch.rand(1, 1, 0), None, None, A0, B0,
                                   A0.clone(), B0.clone(), chunk=4)
    assert A.data_ptr() != A0.data_ptr() and B.data_ptr() != B0.data_ptr()
