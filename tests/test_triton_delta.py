"""The Triton delta rule and gated delta rule against the chunked tier and fla-core's naive
recurrences: outputs, final states and the gradient of every input, with a relative error
(norm of the difference / norm of the reference), at tiny shapes.

Triton reads TRITON_INTERPRET when it is imported, so on CPU the checks run in one subprocess
under the interpreter (started once for this module, running the selected cases); on a CUDA
device they run here, on the compiled kernels. Every buffer a kernel writes is NaN-filled
first, so a missed store fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import interpreted
import pytest
from fla_reference import run_fla

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
# under `-n 2 --dist loadgroup` (Makefile) one worker holds this module, so its kernel cases
# run in one subprocess, not in one per worker
pytestmark = pytest.mark.xdist_group("triton_delta")
F = torch.nn.functional

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, K, V = 2, 2, 16, 32
OPS = ("delta_rule", "gated_delta_rule")
TOL = 1e-4


def ops() -> dict[str, dict[str, Callable[..., Any]]]:
    """The tiers by op; imported on first use, so that the subprocess imports triton itself."""
    from nestc.ops.delta_rule.chunk import chunk_delta_rule
    from nestc.ops.delta_rule.triton import triton_delta_rule
    from nestc.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
    from nestc.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from nestc.ops.gated_delta_rule.triton import triton_gated_delta_rule

    return {"triton": {"delta_rule": triton_delta_rule,
                       "gated_delta_rule": triton_gated_delta_rule},
            "chunked": {"delta_rule": chunk_delta_rule,
                        "gated_delta_rule": chunk_gated_delta_rule},
            "naive": {"gated_delta_rule": naive_recurrent_gated_delta_rule}}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.detach().double() - ref.detach().double()).norm()
    return (diff / ref.detach().double().norm()).item()


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    """Relative error under tol; an all-zero reference (dg of a first token that decays a zero
    state) needs every entry within 1e-6."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if ref.abs().max().item() == 0:
        assert ours.abs().max().item() <= 1e-6, f"{name}: {ours.abs().max().item():.2e} != 0"
        return
    err = rel_err(ours, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def make_inputs(op: str, T: int, with_state: bool, k_dim: int = K, v_dim: int = V,
                decay: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaf tensors on DEVICE in the [B, T, H, D] layout; unit-norm keys as DeltaNet feeds."""
    gen = torch.Generator().manual_seed(seed * 1000 + T)
    x = {"q": torch.randn(B, T, H, k_dim, generator=gen),
         "k": F.normalize(torch.randn(B, T, H, k_dim, generator=gen), dim=-1),
         "v": torch.randn(B, T, H, v_dim, generator=gen),
         "beta": torch.rand(B, T, H, generator=gen)}
    if op == "gated_delta_rule":
        x["g"] = decay * F.logsigmoid(torch.randn(B, T, H, generator=gen))
    if with_state:
        x["initial_state"] = torch.randn(B, H, k_dim, v_dim, generator=gen)
    return {name: t.to(DEVICE).requires_grad_() for name, t in x.items()}


def call(tier: str, op: str, x: dict[str, torch.Tensor], **kw: Any) -> Any:
    fn = ops()[tier][op]
    if op == "delta_rule":
        return fn(x["q"], x["k"], x["v"], x["beta"], initial_state=x.get("initial_state"), **kw)
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x.get("initial_state"),
              **kw)


def results(o: torch.Tensor, S: torch.Tensor | None, x: dict[str, torch.Tensor]
            ) -> dict[str, torch.Tensor]:
    """o, the final state and the gradient of every input for <o, do> + <S, dS>."""
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEVICE)
    loss = (o.float() * do).sum()
    out = {"o": o.detach()}
    if S is not None:
        dS = torch.randn(S.shape, generator=gen).to(DEVICE)
        loss = loss + (S * dS).sum()
        out["final_state"] = S.detach()
    grads = torch.autograd.grad(loss, list(x.values()))
    return out | {f"d{name}": g for name, g in zip(x, grads)}


def compare(op: str, x: dict[str, torch.Tensor], tol: float = TOL, **kw: Any
            ) -> dict[str, torch.Tensor]:
    """The Triton tier against the chunked tier on the same inputs, dtypes included; returns
    the Triton tier's results."""
    ours = results(*call("triton", op, x, **kw), x)
    ref = results(*call("chunked", op, x, **kw), x)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype, (name, ours[name].dtype, ref[name].dtype)
        assert_close(f"{op} {name}", ours[name], ref[name], tol)
    return ours


# The checks, by case name; each runs where the kernels can (see the module docstring).

def check_matches_chunked_tier(op: str, T: int, chunk_size: int, with_state: bool) -> None:
    compare(op, make_inputs(op, T, with_state), chunk_size=chunk_size)


def check_matches_fla_naive(op: str, with_state: bool) -> None:
    x = make_inputs(op, 33, with_state, seed=1)
    ref = results(*run_fla(op, x), x)
    ours = results(*call("triton", op, x, chunk_size=16), x)
    for name in ref:
        assert_close(f"{op} {name}", ours[name], ref[name])


def check_key_and_value_widths_off_the_blocks(op: str) -> None:
    """K = 20 masks a 32-wide key block; V = 80 takes two 64-wide value tiles, one partial."""
    compare(op, make_inputs(op, 37, True, k_dim=20, v_dim=80), chunk_size=16)


def check_scale_without_final_state(op: str) -> None:
    ours = compare(op, make_inputs(op, 33, True), scale=0.3, output_final_state=False,
                   chunk_size=32)
    assert "final_state" not in ours  # the state came back as None


def check_strong_decay_stays_finite() -> None:
    """g around -40 a token: exp(G) underflows within a chunk; nothing may overflow, and the
    padding past T (G = 0 there) must not meet the decayed tokens in an exponent. dg, once
    bound by float32 cancellation in both tiers (differences of running sums: 9e-5 for the
    chunked tier on this draw, 3e-3 on others), is held to 1e-4 of a float64 recurrence."""
    op = "gated_delta_rule"
    x = make_inputs(op, 40, True, decay=40.0)
    ours = results(*call("triton", op, x, chunk_size=16), x)
    ref = results(*call("chunked", op, x, chunk_size=16), x)
    for name in ref:
        assert_close(name, ours[name], ref[name])
    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    exact = results(*call("naive", op, x64), x64)
    assert_close("dg", ours["dg"], exact["dg"])
    assert_close("dg", ref["dg"], exact["dg"])


def check_tiny_and_zero_retentions() -> None:
    """Retentions of 1e-8, 0 and 1e-5 at some tokens (log retentions down to log 1e-30, which
    nestc.memories passes with the log's gradient there): dg at those tokens, divided back by
    the retention, must keep its digits. The kernel summed every exp(G) factor at its running
    sum, and dg was the difference of their reverse running sums: the gradient of a retention
    of 1e-8 was ten times its value, of 0 about 1e24."""
    import nestc.ops
    from nestc.ops.utils import log_factors

    op = "gated_delta_rule"
    x = make_inputs(op, 40, True)
    r = torch.exp(x["g"].detach())
    r[0, 5, 0], r[1, 20, 1], r[0, 21, 0] = 1e-8, 0.0, 1e-5
    want = None
    for dtype, backend in ((torch.float64, "naive"), (torch.float32, "triton")):
        y = {n: t.detach().to(dtype) for n, t in x.items() if n != "g"}
        rr = r.to(dtype).requires_grad_()
        kw = {} if backend == "naive" else {"chunk_size": 16}
        o, S = nestc.ops.gated_delta_rule(y["q"], y["k"], y["v"], log_factors(rr), y["beta"],
                                          initial_state=y["initial_state"],
                                          output_final_state=True, backend=backend, **kw)
        gen = torch.Generator().manual_seed(3)
        loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() \
            + S.double().sum()
        (dr,) = torch.autograd.grad(loss, rr)
        if want is None:
            want = dr.double()
            continue
        for t, b, h in ((5, 0, 0), (20, 1, 1), (21, 0, 0)):
            assert abs(dr[b, t, h] - want[b, t, h]) <= 1e-3 * abs(want[b, t, h]), (t, dr, want)
        assert_close("dretain", dr.double(), want)


def check_correlated_keys_stay_accurate() -> None:
    """Keys that nearly repeat (one direction plus 3% noise) and beta near 1 make I + A in
    each chunk far from the identity: the inverse's blocks and their merge (a product of four
    terms) must not lose more than the chunked tier's float32 does: both against the
    chunked tier in float64, on o, the final state and every gradient, at chunk 64."""
    op = "delta_rule"
    x = make_inputs(op, 100, True, k_dim=64)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(B, 1, H, 64, generator=gen)
    noise = torch.randn(B, 100, H, 64, generator=gen)
    x["k"] = F.normalize(base + 0.03 * noise, dim=-1).to(DEVICE).requires_grad_()
    x["beta"] = (0.5 + 0.5 * torch.rand(B, 100, H, generator=gen)).to(DEVICE).requires_grad_()
    ours = results(*call("triton", op, x, chunk_size=64), x)
    chunked = results(*call("chunked", op, x, chunk_size=64), x)
    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    exact = results(*call("chunked", op, x64, chunk_size=64), x64)
    for name in exact:
        err, err_chunked = rel_err(ours[name], exact[name]), rel_err(chunked[name], exact[name])
        assert err <= 2 * err_chunked + 1e-7, (name, err, err_chunked)


def check_bfloat16_inputs(op: str) -> None:
    """bf16 in, float32 inside: o and the gradients in bf16, the state in float32, close to the
    chunked tier, which rounds float32 values to bf16 as the kernels do (5e-3: each side
    rounds once, and the kernels' float32 values differ by their TF32 products; under the
    interpreter the casts round to nearest even, as on a GPU, interpreted.gpu_rounding)."""
    x = {n: t.detach().to(torch.bfloat16).requires_grad_()
         for n, t in make_inputs(op, 33, True).items()}
    ours = compare(op, x, tol=5e-3, chunk_size=16)
    assert ours["o"].dtype == torch.bfloat16 and ours["final_state"].dtype == torch.float32
    assert all(ours[f"d{n}"].dtype == torch.bfloat16 for n in x)


def check_empty_sequence(op: str) -> None:
    x = {n: (t[:, :0] if n != "initial_state" else t)
         for n, t in make_inputs(op, 5, True).items()}
    o, S = call("triton", op, x)
    assert o.shape == (B, 0, H, V)
    assert torch.equal(S, x["initial_state"])


def check_refusals() -> None:
    x64 = {n: t.detach().double() for n, t in make_inputs("delta_rule", 5, False).items()}
    with pytest.raises(ValueError, match="float32; use the chunked back end for float64"):
        call("triton", "delta_rule", x64)
    with pytest.raises(ValueError, match="K must be at most 128, got 129"):
        call("triton", "delta_rule", make_inputs("delta_rule", 5, False, k_dim=129))
    # larger tiles than an H100's shared memory holds (benchmarks/triton_resources.py)
    with pytest.raises(ValueError, match="chunk_size up to 64, got 128"):
        call("triton", "gated_delta_rule", make_inputs("gated_delta_rule", 5, False),
             chunk_size=128)


def check_public_op_takes_the_triton_backend(op: str) -> None:
    """nestc.ops.<op>(..., backend="triton") runs these kernels (once), and equals the default
    tier."""
    from nestc.ops.delta_rule import triton as kernels

    with interpreted.counting(kernels, "delta_rule_fwd") as calls:
        check_public_op_runs(op)
    assert len(calls) == 1


def check_public_op_runs(op: str) -> None:
    import nestc.ops

    x = make_inputs(op, 21, True)
    fn = getattr(nestc.ops, op)
    args = [x[n] for n in (("q", "k", "v", "beta") if op == "delta_rule"
                           else ("q", "k", "v", "g", "beta"))]
    ours = results(*fn(*args, initial_state=x["initial_state"], chunk_size=16,
                       backend="triton"), x)
    ref = results(*fn(*args, initial_state=x["initial_state"], chunk_size=16), x)
    for name in ref:
        assert_close(f"{op} {name}", ours[name], ref[name])


def built_blocks(name: str, T: int = 37, dim: int = 32) -> tuple[Any, Any, torch.Tensor]:
    """The stdlib block `name` (2 heads) built with the triton and the chunked back ends from
    one seed, and an input."""
    import nestc

    prog = nestc.load("std/memory/deltanet.nest")
    models = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        models.append(prog.build(name, dim=dim, heads=2, chunk=16, backend=backend).to(DEVICE))
    x = torch.randn(2, T, dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return models[0], models[1], x


def outputs_and_grads(model: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().requires_grad_()
    y, state = model(x, return_state=True)
    loss = (y * torch.linspace(-1, 1, y.shape[-1], device=DEVICE)).sum() + \
        sum(s.sum() for s in state.values() if isinstance(s, torch.Tensor))
    names = [n.removeprefix("_orig_mod.") for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return {"y": y.detach(), "dx": grads[0], **{f"d{n}": g for n, g in zip(names, grads[1:])}}


def check_compiler_selects_the_kernels(name: str) -> None:
    """prog.build(..., backend="triton") runs the delta-rule memory through the kernels: the
    same outputs, state and gradients as the chunked tier."""
    from nestc.ops.delta_rule import triton as kernels

    ours, ref, x = built_blocks(name)
    with interpreted.counting(kernels, "delta_rule_fwd") as calls:
        got = outputs_and_grads(ours, x)
    assert calls, "the kernels did not run"
    want = outputs_and_grads(ref, x)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(f"{name} {key}", got[key], want[key])


def check_wide_keys_take_the_chunked_tier() -> None:
    """Heads wider than MAX_K keys: the triton back end runs the chunked tier (the kernels'
    tiles would outgrow a GPU's shared memory) and gives its results."""
    from nestc.ops.delta_rule import triton as kernels

    ours, ref, x = built_blocks("GatedDeltaNet", T=9, dim=2 * (kernels.MAX_K + 8))
    with interpreted.counting(kernels, "delta_rule_fwd") as calls:
        got = outputs_and_grads(ours, x)
    assert not calls, "the kernels ran on keys wider than MAX_K"
    want = outputs_and_grads(ref, x)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def check_refused_late_falls_back(op: str) -> None:
    """The backward's last kernel refused with OutOfResources after the others ran: the
    chunked tier's gradients, with a warning."""
    from nestc.ops.delta_rule import triton as kernels

    x = make_inputs(op, 21, True)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(kernels, "delta_rule_bwd_kernel_dqkvbg", interpreted.Cramped())
        ours = results(*call("triton", op, x, chunk_size=16), x)
    assert [w for w in caught if "backward kernel needs more" in str(w.message)], caught
    ref = results(*call("chunked", op, x, chunk_size=16), x)
    for name in ref:
        assert_close(f"{op} {name}", ours[name], ref[name])


def check_refused_pipelining_retries_with_one_stage(op: str) -> None:
    """A GPU that refuses dhu's launch for its shared memory but fits it with one stage (an
    A100 and the gated rule's dhu at K = 128, float32; Triton 3.6 and dqkvbg at K = 128,
    bfloat16, on an H100): the kernel runs again with one stage, no fallback and no warning,
    and gives the chunked tier's results. A second call of the same sizes goes to one stage
    at once; one in another dtype tries two stages first again."""
    from nestc.ops.delta_rule import triton as kernels

    x = make_inputs(op, 21, True)
    stand_in = interpreted.Cramped(kernels.delta_rule_bwd_kernel_dhu, max_stages=1)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("error")
        patch.setattr(kernels, "delta_rule_bwd_kernel_dhu", stand_in)
        ours = results(*call("triton", op, x, chunk_size=16), x)
        assert stand_in.stages == [2, 1], stand_in.stages
        again = results(*call("triton", op, x, chunk_size=16), x)
        assert stand_in.stages == [2, 1, 1], stand_in.stages
        half = {n: t if n == "initial_state" else t.detach().bfloat16().requires_grad_()
                for n, t in x.items()}
        call("triton", op, half, chunk_size=16)[0].float().sum().backward()
        assert stand_in.stages == [2, 1, 1, 2, 1], stand_in.stages
    ref = results(*call("chunked", op, x, chunk_size=16), x)
    for name in ref:
        assert_close(f"{op} {name}", ours[name], ref[name])
        assert torch.equal(again[name], ours[name]), name


def check_torch_compile_matches_eager(name: str) -> None:
    """torch.compile traces around the custom ops (their fake implementations and registered
    backward) in one graph, and equals eager."""
    import torch._dynamo

    ours, _, x = built_blocks(name)
    want = outputs_and_grads(ours, x)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    got = outputs_and_grads(compiled, x)
    for key in want:
        assert_close(f"compiled {name} {key}", got[key], want[key], 1e-6)


def check_custom_op_registration(op: str) -> None:
    """torch.library.opcheck: the schema, the fake implementation and the autograd
    registration agree with the op."""
    from nestc.ops.delta_rule import triton as kernels

    x = make_inputs(op, 19, True)
    g = x.get("g")
    torch.library.opcheck(kernels.delta_rule_fwd,
                          (x["q"], x["k"], x["v"], g, x["beta"], 0.25, x["initial_state"],
                           True, 16))
    # the backward with a non-contiguous q (its fake kept q's strides; the op's gradients are
    # contiguous: a bug hunt's)
    plain = {n: None if t is None else t.detach() for n, t in x.items()}
    q = plain["q"].transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(kernels.delta_rule_bwd,
                          (q, plain["k"], plain["v"], plain.get("g"), plain["beta"], 0.25,
                           plain["initial_state"], 16, torch.randn_like(plain["v"]), None))


def check_double_backward(op: str) -> None:
    """A backward that is itself differentiated (autograd.grad with create_graph, as a model
    takes the gradients of its task-loss memories through the memories above them): the op's
    backward recomputes on the chunked tier as a graph, no backward kernel runs in it, and the
    second-order gradients equal the chunked tier's."""
    from nestc.ops.delta_rule import triton as kernels

    got = []
    for tier in ("triton", "chunked"):
        x = make_inputs(op, 21, True)
        o, S = call(tier, op, x, chunk_size=16)
        first = (o * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum() + S.pow(2).sum()
        with interpreted.counting(kernels, "delta_rule_bwd") as calls:
            grads = torch.autograd.grad(first, list(x.values()), create_graph=True)
        assert calls == [], calls
        second = sum((g * g.detach().sign()).sum() for g in grads)
        got.append(torch.autograd.grad(second, list(x.values())))
    for name, ours, ref in zip(x, *got):
        assert_close(f"{op} second-order d{name}", ours, ref)


def check_differentiated_backward_of_tied_inputs(op: str) -> None:
    """q and k one tensor and v computed from it (as a model may feed them): the op's
    recomputed backward (create_graph) returns the gradient of each argument alone, not the
    total derivative through the others computed from its tensor, which autograd would add a
    second time. First- and second-order gradients of the leaves equal the chunked tier's."""
    got = []
    for tier in ("triton", "chunked"):
        leaves = {n: t for n, t in make_inputs(op, 21, True).items() if n not in ("q", "v")}
        x = dict(leaves, q=leaves["k"], v=torch.cat([leaves["k"], -leaves["k"]], -1).exp())
        o, S = call(tier, op, x, chunk_size=16)
        first = (o * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum() + S.pow(2).sum()
        grads = torch.autograd.grad(first, list(leaves.values()), create_graph=True)
        second = sum((g * g.detach().sign()).sum() for g in grads)
        got.append([*grads, *torch.autograd.grad(second, list(leaves.values()))])
    names = [f"{order} d{n}" for order in ("first-order", "second-order") for n in leaves]
    for name, ours, ref in zip(names, *got):
        assert_close(f"{op} tied inputs {name}", ours, ref)


def check_kernels_match_the_device() -> None:
    """Interpreted on CPU (the subprocess), compiled on CUDA."""
    from nestc.ops.delta_rule import triton as kernels

    assert kernels.INTERPRETED is (DEVICE == "cpu")


CASES: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {}
for _op in OPS:
    for _T in (1, 17, 33):
        for _C in (16, 32):
            for _state in (False, True):
                CASES[f"chunked-{_op}-T{_T}-C{_C}-{'state' if _state else 'zero'}"] = (
                    check_matches_chunked_tier, (_op, _T, _C, _state))
    # chunk 64: the inverse's four diagonal blocks and every term of its merge (a full chunk,
    # then 36 tokens: three blocks)
    CASES[f"chunked-{_op}-T100-C64-state"] = (check_matches_chunked_tier, (_op, 100, 64, True))
    for _state in (False, True):
        CASES[f"fla_naive-{_op}-{'state' if _state else 'zero'}"] = (
            check_matches_fla_naive, (_op, _state))
    CASES[f"widths-{_op}"] = (check_key_and_value_widths_off_the_blocks, (_op,))
    CASES[f"scale_no_final_state-{_op}"] = (check_scale_without_final_state, (_op,))
    CASES[f"bfloat16-{_op}"] = (check_bfloat16_inputs, (_op,))
    CASES[f"empty-{_op}"] = (check_empty_sequence, (_op,))
    CASES[f"public_op-{_op}"] = (check_public_op_takes_the_triton_backend, (_op,))
    CASES[f"opcheck-{_op}"] = (check_custom_op_registration, (_op,))
    CASES[f"refused_late-{_op}"] = (check_refused_late_falls_back, (_op,))
    CASES[f"one_stage-{_op}"] = (check_refused_pipelining_retries_with_one_stage, (_op,))
    CASES[f"double_backward-{_op}"] = (check_double_backward, (_op,))
    CASES[f"double_backward_tied-{_op}"] = (check_differentiated_backward_of_tied_inputs, (_op,))
for _block in ("DeltaNet", "GatedDeltaNet"):
    CASES[f"build-{_block}"] = (check_compiler_selects_the_kernels, (_block,))
    CASES[f"compile-{_block}"] = (check_torch_compile_matches_eager, (_block,))
CASES["strong_decay"] = (check_strong_decay_stays_finite, ())
CASES["tiny_and_zero_retentions"] = (check_tiny_and_zero_retentions, ())
CASES["correlated_keys"] = (check_correlated_keys_stay_accurate, ())
CASES["refusals"] = (check_refusals, ())
CASES["build-wide-keys"] = (check_wide_keys_take_the_chunked_tier, ())
CASES["interpreted_on_cpu"] = (check_kernels_match_the_device, ())


def run_selected(names: list[str]) -> dict[str, dict[str, Any]]:
    from nestc.ops.delta_rule import triton as kernels

    return interpreted.run_cases(CASES, names, [kernels])


outcomes = interpreted.outcomes_fixture(__file__, "run_selected")


@pytest.mark.parametrize("case", list(CASES))
def test_triton_delta(case: str, outcomes: dict[str, dict[str, Any]]) -> None:
    interpreted.report(case, outcomes)


@pytest.mark.skipif(DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the kernels can run here")
def test_the_triton_backend_on_cpu_without_the_interpreter_says_how_to_run_it() -> None:
    import nestc.ops

    x = make_inputs("delta_rule", 5, False)
    with pytest.raises(ValueError, match="need CUDA tensors, got cpu; set TRITON_INTERPRET=1"):
        nestc.ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], backend="triton")


def test_the_gpu_benchmark_runs_dry_on_a_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_memory.py --dry: tiny shapes under the interpreter, the whole table,
    and the Triton tier's agreement with the chunked tier under 1e-4, with --tiles taken
    (at D = 16 every value tile is 16 wide anyway)."""
    out = tmp_path / "gpu_memory.md"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_memory.py"
    run = subprocess.run([sys.executable, str(script), "--dry", "--T", "20", "--lm",
                          "--tiles", "dqkvbg=16,4,1", "state=16,4,1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = out.read_text().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| delta_rule") or
            line.startswith("| gated_delta_rule")]
    assert [(r[0], r[2]) for r in rows] == [("| delta_rule", "20"), ("| gated_delta_rule", "20")]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    agree = [float(line.rsplit("triton ", 1)[1]) for line in lines if "largest difference" in line]
    assert len(agree) == 2 and max(agree) < 1e-4
    mlp = [line.split(" | ") for line in lines if line.startswith("| 16 | 32 | 16 | 20 |")]
    assert len(mlp) == 1 and all(float(x) > 0 for x in mlp[0][4:6])
    models = [cells[0] for cells in (line.split(" | ") for line in lines)
              if cells[0].startswith("| ") and cells[0].endswith("LM")]
    assert models == ["| TransformerLM", "| TitansLM", "| DeltaNetLM", "| HopeLM"]
    assert "backend triton" in out.read_text()


@pytest.mark.parametrize("op", OPS)
def test_a_kernel_too_big_for_the_gpu_falls_back_to_the_chunked_tier(
        monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """A launch refused with OutOfResources (here the first kernel, in the forward and in the
    backward) computes the same on the chunked tier, with a warning. (The backward's last
    kernel refused after the others ran: the case refused_late.)"""
    from nestc.ops.delta_rule import triton as kernels

    monkeypatch.setattr(kernels, "INTERPRETED", True)  # let CPU tensors through the check
    monkeypatch.setattr(kernels, "delta_rule_fwd_kernel_prepare", interpreted.Cramped())
    x = make_inputs(op, 21, True)
    with pytest.warns(RuntimeWarning, match="forward kernel needs more of this GPU") as caught:
        ours = results(*call("triton", op, x, chunk_size=16), x)
    assert any("backward kernel" in str(w.message) for w in caught)
    ref = results(*call("chunked", op, x, chunk_size=16), x)
    for name in ref:
        assert_close(f"{op} {name}", ours[name], ref[name], 1e-6)


MENDED = """
import torch, triton, triton.language as tl
from triton.runtime import interpreter
import nestc.ops.delta_rule.triton
from nestc.ops.utils import mend_interpreter
mended = interpreter._patch_lang_tensor
assert getattr(mended, "mended", False), "importing the kernels under the interpreter mends it"
mend_interpreter()
assert interpreter._patch_lang_tensor is mended, "a second call wraps nothing twice"

@triton.jit
def total(x, out, n):
    acc = tl.zeros((1,), dtype=tl.float32)
    for i in range(n):
        acc += tl.load(x + i + tl.arange(0, 1))
    tl.store(out + tl.arange(0, 1), acc)

x, out = torch.arange(1.0, 8.0), torch.zeros(1)
total[(1,)](x, out, 7)
assert out.item() == 28.0, out
"""


def test_the_interpreter_takes_a_kernel_argument_as_a_loop_bound() -> None:
    """nestc.ops.utils.mend_interpreter: a runtime loop bound, with NumPy's deprecation of
    int(array) an error (Triton 3.6's interpreter trips on it: every kernel failed there)."""
    run = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", MENDED],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
