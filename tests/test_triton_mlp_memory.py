"""The Titans MLP memory op (nestc/ops/mlp_memory): the PyTorch reference against the real
MLPMemory (its chunked tier and its token-by-token definition), then the Triton tier against
the reference on outputs, final states and the gradient of every input, with a relative error
(norm of the difference / norm of the reference), at tiny shapes; and the fused backward kernel
against the PyTorch per-chunk vjp that it replaces, on every gradient.

Triton reads TRITON_INTERPRET when it is imported, so on CPU the kernel checks run in one
subprocess under the interpreter (started once for this module, running the selected cases);
on a CUDA device they run here. Every buffer the kernel writes is NaN-filled first, so a
missed store fails the comparison.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from typing import Any

import interpreted
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
# under `-n 2 --dist loadgroup` (Makefile) one worker holds this module, so its kernel cases
# run in one subprocess, not in one per worker
pytestmark = pytest.mark.xdist_group("triton_mlp_memory")
F = torch.nn.functional

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
SEQ = ("q", "k", "v", "lr", "retain", "beta")
STATE = ("A", "B", "SA", "SB")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.detach().double() - ref.detach().double()).norm()
    return (diff / ref.detach().double().norm()).item()


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    """Relative error under tol; an all-zero reference needs exact zeros."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if ref.abs().max().item() == 0:  # the momenta of a memory without momentum or given ones
        assert ours.abs().max().item() == 0, f"{name}: {ours.abs().max().item():.2e} != 0"
        return
    err = rel_err(ours, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def make_inputs(N: int = 1, H: int = 2, T: int = 37, d: int = 8, h: int = 16,
                retain: bool = True, beta: bool = True, state: bool = True, seed: int = 0
                ) -> dict[str, torch.Tensor | None]:
    """Leaf tensors on DEVICE: unit-norm q and k (Titans' l2norm), lr in (0, 1), retain near 1
    with spread, beta in (0, 1), weights at the usual init scale, small momenta."""
    gen = torch.Generator().manual_seed(seed * 1000 + T)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)
    x: dict[str, torch.Tensor | None] = {
        "q": F.normalize(rand(N, H, T, d), dim=-1), "k": F.normalize(rand(N, H, T, d), dim=-1),
        "v": rand(N, H, T, d), "lr": torch.sigmoid(rand(N, H, T)),
        "retain": 1 - 0.3 * torch.sigmoid(rand(N, H, T)) if retain else None,
        "beta": torch.sigmoid(rand(N, H, T)) if beta else None,
        "A0": rand(N, H, d, h) * d ** -0.5, "B0": rand(N, H, h, d) * h ** -0.5,
        "SA0": 0.1 * rand(N, H, d, h) if state else None,
        "SB0": 0.1 * rand(N, H, h, d) if state else None}
    return {n: None if t is None else t.to(DEVICE).requires_grad_() for n, t in x.items()}


def run(backend: str, x: dict[str, torch.Tensor | None], **kw: Any
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    from nestc.ops.mlp_memory import mlp_memory

    return mlp_memory(*x.values(), backend=backend, **kw)


def results(y: torch.Tensor, state: tuple[torch.Tensor, ...],
            x: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """y, the final state and the gradient of every given input of <y, dy> + <state, dstate>."""
    gen = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=gen).to(DEVICE)).sum()
    out = {"y": y.detach()}
    for name, s in zip(STATE, state):
        loss = loss + (s * torch.randn(s.shape, generator=gen).to(DEVICE)).sum()
        out[name] = s.detach()
    leaves = {n: t for n, t in x.items() if t is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out | {f"d{n}": g for n, g in zip(leaves, grads)}


def compare(x: dict[str, torch.Tensor | None], tol: float = TOL, **kw: Any
            ) -> dict[str, torch.Tensor]:
    """The Triton tier against the chunked reference: y, states, every gradient, dtypes
    included; returns the Triton tier's results."""
    ours = results(*run("triton", x, **kw), x)
    ref = results(*run("chunked", x, **kw), x)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype, (name, ours[name].dtype, ref[name].dtype)
        assert_close(name, ours[name], ref[name], tol)
    return ours


# The reference against nestc's MLPMemory (in this process: no kernel runs) -------------------

def titans() -> tuple[Any, Any]:
    """The stdlib Titans block (dim 32, 2 heads of d = 16, h = 32, chunks of 16) and its
    MLPMemory."""
    import nestc
    from nestc.memories import MLPMemory

    torch.manual_seed(0)
    block = nestc.load("std/memory/titans.nest").build("Titans", dim=32, heads=2, chunk=16)
    mems = [m for m in block.modules() if isinstance(m, MLPMemory)]
    assert len(mems) == 1
    return block, mems[0]


def test_reference_equals_the_titans_block() -> None:
    """The memory of the built Titans block, its inputs captured in a forward pass (lr = eta,
    retain = 1 - alpha, beta = theta, clip = 1): the reference gives its reads and final state
    exactly, and the token-by-token definition within float32 rounding."""
    from nestc.ops.mlp_memory.reference import chunk_mlp_memory

    block, mem = titans()
    seen: dict[str, Any] = {}
    chunked = mem._chunked

    def spy(q: torch.Tensor, w: dict[str, Any], given: dict[str, Any]) -> Any:
        seen.update(q=q, w=w, given=given, out=chunked(q, w, given))
        return seen["out"]
    mem._chunked = spy
    block(torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(3)))
    q, w, given = seen["q"], seen["w"], seen["given"]
    assert given["offset"] == 0 and mem.momentum and mem.clip == 1.0
    y, state = chunk_mlp_memory(q, w["k"], w["v"], w["lr"], w["retain"], w["beta"],
                                *given["M"], *given["S"], act="gelu", clip=mem.clip,
                                chunk=mem.chunk)
    y_mem, out = seen["out"]
    for name, ours, ref in zip(("y", *STATE), (y, *state), (y_mem, *out["M"], *out["S"])):
        assert torch.equal(ours, ref), name
    y_def, out_def = mem._reference(q, w, given)
    for name, ours, ref in zip(("y", *STATE), (y, *state), (y_def, *out_def["M"], *out_def["S"])):
        assert rel_err(ours, ref) < 1e-5, name


MEMORY_CASES = {  # act, retain, beta, clip, read_before
    "gelu-retain-momentum-clip": ("gelu", True, True, 0.05, False),
    "silu-momentum-read_before": ("silu", False, True, None, True),
    "gelu-retain-gd-read_before-clip": ("gelu", True, False, 0.05, True),
    "silu-plain-gd": ("silu", False, False, None, False),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_reference_equals_mlp_memory_methods(case: str) -> None:
    """MLPMemory's own chunked tier and token-by-token definition (the Titans block's memory,
    its rule switched by attribute), on random inputs with nonzero momenta and a short last
    chunk: the reference equals the first exactly (reads, states and every input's gradient;
    the chunked tier runs the reference's chunk function, so this checks how MLPMemory cuts
    and feeds it) and the second within float32 rounding, its gradients included."""
    from nestc.memories import ACTS
    from nestc.ops.mlp_memory.reference import chunk_mlp_memory

    act, retain, beta, clip, read_before = MEMORY_CASES[case]
    mem = copy.copy(titans()[1])
    mem.act, mem.act_name, mem.momentum, mem.clip, mem.read_before, mem.chunk = \
        ACTS[act], act, beta, clip, read_before, 8
    x = make_inputs(N=2, T=21, d=16, h=32, retain=retain, beta=beta)
    w = {"k": x["k"], "v": x["v"], "lr": x["lr"], "retain": x["retain"], "beta": x["beta"]}
    given = {"M": (x["A0"], x["B0"]), "S": (x["SA0"], x["SB0"]), "start": (x["A0"], x["B0"]),
             "offset": 0}
    kw = {"act": act, "read_before": read_before, "chunk": 8}
    ours = results(*chunk_mlp_memory(*x.values(), clip=clip, **kw), x)
    y_mem, out = mem._chunked(x["q"], w, given)
    chunked = results(y_mem, (*out["M"], *out["S"]), x)
    y_def, out_def = mem._reference(x["q"], w, given)
    exact = results(y_def, (*out_def["M"], *out_def["S"]), x)
    for name in exact:
        assert torch.equal(ours[name], chunked[name]), name
        assert rel_err(ours[name], exact[name]) < (1e-5 if name in ("y", *STATE) else 1e-4), name
    if clip is not None:  # the clip bites on these inputs
        y_free, _ = chunk_mlp_memory(*x.values(), clip=None, **kw)
        assert rel_err(ours["y"], y_free) > 1e-2


def block_results(block: Any, x0: torch.Tensor, cuts: tuple[int, ...] = ()
                  ) -> dict[str, torch.Tensor]:
    """A block's output, its memories' final states and the gradients of its input and
    parameters for a loss of all of them; run in pieces cut at `cuts`, the state carried."""
    x = x0.clone().requires_grad_()
    ys, state = [], None
    bounds = (0, *cuts, x.shape[1])
    for a, b in zip(bounds, bounds[1:]):
        y, state = block(x[:, a:b], state=state, return_state=True)
        ys.append(y)
    y = torch.cat(ys, 1)
    finals = [t for s in state.values() if isinstance(s, dict) and "M" in s
              for t in (*s["M"], *s["S"])]
    loss = (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum() + \
        sum(t.pow(2).sum() for t in finals)
    grads = torch.autograd.grad(loss, [x, *block.parameters()], allow_unused=True)
    names = ["x", *(n for n, _ in block.named_parameters())]
    return {"y": y.detach(), **{f"state{i}": t.detach() for i, t in enumerate(finals)},
            **{f"d{n}": g for n, g in zip(names, grads) if g is not None}}


def test_self_modifying_titans_maps_onto_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """How the triton tier hands self-modifying Titans' memories to the op (MLPMemory._fused):
    the four projection memories are residual MLPs learning their own readings of v under
    stop_grad (v_self; a residual memory learns v - k and reads q plus the MLP), run as one
    group; the main memory learns given values. With the op's PyTorch reference in the
    kernel's place (so no kernel runs here), the block equals the chunked tier and the
    token-by-token definition. The block runs in pieces that end at the projection memories'
    chunks of 32 (they are read at each chunk's start) and where the calls are cut; the main
    memory learns in chunks of 16, so a piece may start inside one of its chunks (the op gets
    that chunk's first weights and the offset) and run past its end (the op stops there, the
    rest runs on the chunked tier). T = 37 ends in a partial chunk; the cuts give pieces of
    one token, pieces ending at a chunk's end and starting at its start, and pieces that start
    inside a chunk of the main memory and run past it (12..20, 10..29, 17..32)."""
    import nestc
    from nestc.ops.mlp_memory import triton as kernels
    from nestc.ops.mlp_memory.reference import chunk_mlp_memory

    calls: list[tuple[bool, int]] = []

    def op(*args: Any, v_self: torch.Tensor | None = None, offset: int = 0, **kw: Any) -> Any:
        calls.append((v_self is not None, offset))
        return chunk_mlp_memory(*args, v_self=v_self, offset=offset, **kw)
    monkeypatch.setattr(kernels, "triton_mlp_memory", op)
    prog = nestc.load("std/memory/self_modifying_titans.nest")
    T = 37
    x0 = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(3))
    for cuts in ((), (10, 29), (3, 12, 20), (1, 2, 16, 17, 33)):
        ends = sorted({*cuts, *range(32, T, 32), T})
        # per piece: the main memory (chunks of 16) and the group (32), at their offsets
        want = [(group, a % (32 if group else 16)) for a in [0, *ends[:-1]]
                for group in (False, True)]
        got = {}
        calls.clear()
        for backend in ("triton", "chunked", "reference"):
            torch.manual_seed(0)
            block = prog.build("SelfModifyingTitans", dim=32, heads=2, chunk=32,
                               memory_chunk=16, backend=backend)
            got[backend] = block_results(block, x0, cuts)
        assert sorted(calls) == sorted(want), calls
        assert got["triton"].keys() == got["chunked"].keys() == got["reference"].keys()
        for name, ref in got["chunked"].items():
            assert_close(f"triton tier {cuts} {name}", got["triton"][name], ref, 1e-5)
            assert_close(f"reference tier {cuts} {name}", got["reference"][name], ref)


@pytest.mark.parametrize("offset", [5, 13])
def test_reference_inside_a_chunk_equals_mlp_memory_methods(offset: int) -> None:
    """A piece that starts `offset` tokens into a chunk of 16 (its state given["M"] and the
    chunk's first weights given["start"], where its first gradients are taken): the reference
    with grad_at and offset equals MLPMemory's chunked tier exactly and its token-by-token
    definition within float32 rounding, gradients of the first weights included. The piece
    ends inside its first chunk (T = 16 - offset - 1) or runs on past it (T = 30)."""
    from nestc.ops.mlp_memory.reference import chunk_mlp_memory

    mem = copy.copy(titans()[1])
    mem.chunk = 16
    for T in (16 - offset - 1, 30):
        x = make_inputs(N=2, T=T, d=16, h=32)
        gen = torch.Generator().manual_seed(T)
        G = {n: (x[n].detach() + 0.3 * torch.randn(x[n].shape, generator=gen))
             .requires_grad_() for n in ("A0", "B0")}
        w = {"k": x["k"], "v": x["v"], "lr": x["lr"], "retain": x["retain"], "beta": x["beta"]}
        given = {"M": (x["A0"], x["B0"]), "S": (x["SA0"], x["SB0"]),
                 "start": (G["A0"], G["B0"]), "offset": offset}
        leaves = {**x, "GA": G["A0"], "GB": G["B0"]}
        ours = results(*chunk_mlp_memory(*x.values(), clip=1.0, chunk=16,
                                         grad_at=(G["A0"], G["B0"]), offset=offset), leaves)
        y_mem, out = mem._chunked(x["q"], w, given)
        chunked = results(y_mem, (*out["M"], *out["S"]), leaves)
        y_def, out_def = mem._reference(x["q"], w, given)
        exact = results(y_def, (*out_def["M"], *out_def["S"]), leaves)
        for name in exact:
            assert torch.equal(ours[name], chunked[name]), (T, name)
            assert rel_err(ours[name], exact[name]) < 1e-4, (T, name)


# The Triton tier (where the kernel runs: see the module docstring) ---------------------------

def check_matches_reference(T: int, chunk: int, act: str, retain: bool, beta: bool,
                            state: bool, clip: float | None, read_before: bool, N: int = 1,
                            d: int = 8, h: int = 16) -> None:
    x = make_inputs(N=N, T=T, d=d, h=h, retain=retain, beta=beta, state=state)
    compare(x, act=act, clip=clip, read_before=read_before, chunk=chunk)


GRADS = ("dq", "dk", "dv", "dlr", "dretain", "dbeta", "dA0", "dB0", "dSA0", "dSB0")


def check_fused_backward_matches_vjp(T: int, chunk: int, act: str, retain: bool, beta: bool,
                                     state: bool, clip: float | None, read_before: bool,
                                     N: int = 1, d: int = 8, h: int = 16,
                                     self_values: bool = False, offset: int = 0) -> None:
    """The fused backward kernel (`_backward`) against the PyTorch per-chunk vjp
    (`_backward_reference`) from the same stored starts and random gradients of y and of the
    final state: every gradient, NaN-filled buffers. The gradients of retain, beta and the
    momenta exist only with retain, beta; the clip bites on these inputs. With self_values,
    the memory also generates values from v_self; with an offset, the piece starts that far
    into a chunk whose first weights are others (and get gradients, dGA and dGB)."""
    from nestc.ops.mlp_memory import triton as kernels
    from nestc.ops.mlp_memory.reference import chunk_mlp_memory

    x = {n: None if t is None else t.detach()
         for n, t in make_inputs(N=N, T=T, d=d, h=h, retain=retain, beta=beta,
                                 state=state).items()}
    vs = self_inputs(x).detach() if self_values else None
    gen = torch.Generator().manual_seed(11)
    G = None if offset == 0 else \
        tuple(x[n] + 0.3 * torch.randn(x[n].shape, generator=gen).to(DEVICE) for n in ("A0", "B0"))
    out = kernels._forward(*x.values(), act, clip, read_before, chunk, True, vs, G, offset)
    dout = [torch.randn(o.shape, generator=gen).to(DEVICE) for o in out[:5]]
    args = (*(x[n] for n in SEQ), *out[5:], act, clip, read_before, chunk, *dout, vs, G,
            offset)
    ours = kernels._backward(*args)
    ref = kernels._backward_reference(*args)
    assert len(ours) == len(ref) == len(GRADS) + 2
    assert (ours[-1] is None) == (ref[-1] is None) == (G is None)
    for name, got, want in zip((*GRADS, "dGA", "dGB"), ours, ref):
        if name in ("dretain", "dbeta"):
            assert (got is None) == (want is None) == (x[name[1:]] is None), name
        if want is not None:
            assert got is not None and got.dtype == torch.float32, name
            assert_close(f"fused backward {name}", got, want)
    if clip is not None:
        y_free, _ = chunk_mlp_memory(*x.values(), act=act, read_before=read_before,
                                     chunk=chunk, v_self=vs, grad_at=G, offset=offset)
        assert rel_err(out[0], y_free) > 1e-3


def self_inputs(x: dict[str, torch.Tensor | None], seed: int = 5) -> torch.Tensor:
    """Unit-norm inputs for the memory to read its own values from (v_self), needing a
    gradient, so that a gradient that leaks into them shows."""
    N, H, T, d = x["q"].shape
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(N, H, T, d, generator=gen), dim=-1).to(DEVICE) \
        .requires_grad_()


def check_small_and_zero_factors() -> None:
    """retain and beta of 1e-6, 1e-8 and 0 at some tokens: the fused backward's gradients of
    them in float32 against the chunked tier in float64 (the kernel summed rows minus columns
    of the decays' gradient, which cancelled terms of size 1: 31% off at 1e-5, 930 times at
    1e-8; and gave 0 at 0)."""
    x = make_inputs(T=37, d=8, h=16)
    with torch.no_grad():
        for name, t, value in (("retain", 3, 1e-6), ("retain", 20, 0.0), ("beta", 2, 1e-8),
                               ("beta", 21, 0.0)):
            x[name][..., t] = value  # type: ignore[index]
    ours = results(*run("triton", x, chunk=16, clip=2.0), x)
    x64 = {n: None if t is None else t.detach().double().requires_grad_() for n, t in x.items()}
    ref = results(*run("chunked", x64, chunk=16, clip=2.0), x64)
    for name in ("dretain", "dbeta"):
        got, want = ours[name].double(), ref[name]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
        for t in (2, 3, 20, 21):
            assert (got[..., t] - want[..., t]).abs().max() <= \
                1e-3 * want[..., t].abs().max(), (name, t)


def check_self_generated_values(T: int, chunk: int, act: str, clip: float | None,
                                read_before: bool) -> None:
    """v_self (self-modifying Titans' stop_grad(M(x))): the Triton tier equals the chunked
    one on y, states and every gradient; neither sends a gradient to v_self; and the values
    the memory generates change what it reads."""
    x = make_inputs(T=T)
    vs = self_inputs(x)
    kw = {"act": act, "clip": clip, "read_before": read_before, "chunk": chunk}
    compare(x, v_self=vs, **kw)
    for backend in ("triton", "chunked"):
        y, state = run(backend, x, v_self=vs, **kw)
        loss = y.pow(2).sum() + sum(s.pow(2).sum() for s in state)
        dvs, = torch.autograd.grad(loss, vs, allow_unused=True)
        assert dvs is None or dvs.abs().max() == 0, backend
    y_given, _ = run("triton", x, **kw)
    assert rel_err(y_given, run("triton", x, v_self=vs, **kw)[0]) > 1e-2


def check_inside_a_chunk(T: int, chunk: int, offset: int, act: str, clip: float | None,
                         read_before: bool, beta: bool, self_values: bool) -> None:
    """A piece that starts `offset` tokens into a chunk, its first gradients taken at other
    weights (grad_at, needing gradients too): the Triton tier equals the chunked one on y,
    states and every gradient, those of grad_at included."""
    x = make_inputs(T=T, beta=beta, state=beta)
    gen = torch.Generator().manual_seed(9)
    G = tuple((x[n].detach() + 0.3 * torch.randn(x[n].shape, generator=gen).to(DEVICE))
              .requires_grad_() for n in ("A0", "B0"))
    kw = {"act": act, "clip": clip, "read_before": read_before, "chunk": chunk,
          "grad_at": G, "offset": offset,
          "v_self": self_inputs(x).detach() if self_values else None}
    leaves = {**x, "GA": G[0], "GB": G[1]}
    ours = results(*run("triton", x, **kw), leaves)
    ref = results(*run("chunked", x, **kw), leaves)
    for name in ref:
        assert_close(name, ours[name], ref[name])
    # the grad point and the offset matter: every case reads after an update inside its
    # piece (a read_before piece of one token reads only the given weights, the same either way)
    y_start, _ = run("triton", x, **{**kw, "grad_at": None, "offset": 0})
    assert rel_err(y_start, ours["y"]) > 1e-3


def check_bfloat16_inputs() -> None:
    """bf16 q, k, v (the public op takes 16-bit inputs; MLPMemory hands the kernel float32):
    y and dq, dk, dv in bf16, the state and the other gradients in float32, close to the
    chunked tier on the same inputs (1e-2: the kernel's products are TF32 for 16-bit inputs,
    2e-3 to 3.5e-3 on these, with the GPU's rounding emulated)."""
    x = {n: None if t is None else
         (t.detach().to(torch.bfloat16) if n in ("q", "k", "v") else t.detach()).requires_grad_()
         for n, t in make_inputs(T=37).items()}
    ours = compare(x, tol=1e-2, chunk=16, clip=0.05)
    assert all(ours[n].dtype == torch.bfloat16 for n in ("y", "dq", "dk", "dv"))
    assert ours["A"].dtype == torch.float32


def check_empty_sequence() -> None:
    x = {n: None if t is None else (t[:, :, :0] if n in SEQ else t)
         for n, t in make_inputs(T=5).items()}
    y, state = run("triton", x, chunk=16)
    assert y.shape == (1, 2, 0, 8)
    for s, s0 in zip(state, (x["A0"], x["B0"], x["SA0"], x["SB0"])):
        assert torch.equal(s, s0)


def check_refusals() -> None:
    from nestc.ops.mlp_memory import mlp_memory

    x = make_inputs(T=5)
    plain = {n: None if t is None else t.detach() for n, t in x.items()}
    args = (plain["q"], plain["k"], plain["v"], plain["lr"], plain["retain"], plain["beta"],
            plain["A0"], plain["B0"])
    for clip, backend in ((0.0, "chunked"), (-1.0, "chunked"), (1e-30, "triton")):
        # (0 or 1e-30 made NaN on the kernel's padding rows, -1 an ascent on both tiers)
        with pytest.raises(ValueError, match="clip"):
            mlp_memory(*args, clip=clip, chunk=16, backend=backend)
    with pytest.raises(ValueError, match="q must be a floating-point tensor, got torch.int64"):
        mlp_memory(args[0].long(), *args[1:], chunk=16)  # (read back as truncated int64)
    with pytest.raises(ValueError, match="chunk must be one of"):
        run("triton", x, chunk=8)
    with pytest.raises(ValueError, match="float32; use the chunked back end"):
        run("triton", {n: None if t is None else t.detach().double() for n, t in x.items()})
    with pytest.raises(ValueError, match="at most 128, got d = 8, h = 129"):
        run("triton", make_inputs(T=5, h=129))


def check_refused_without_retention_retries_with_ones(beta: bool) -> None:
    """Launches without retention refused, both kernels run again with a retention of ones:
    no warning, no gradient for the retention, and the values of the kernels without it."""
    from nestc.ops.mlp_memory import triton as kernels

    x = make_inputs(T=37, retain=False, beta=beta)
    kw = {"act": "gelu", "clip": 0.5, "chunk": 16}
    want = results(*kernels.triton_mlp_memory(*x.values(), **kw), x)
    # a GPU whose shared memory holds the kernels only with retention (Triton 3.6 at d 32,
    # h 64, chunk 64, float32)
    fwd, bwd = (interpreted.Cramped(k, refuse=lambda kw: not kw["USE_R"])
                for k in (kernels.mlp_memory_fwd_kernel, kernels.mlp_memory_bwd_kernel))
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("error")
        patch.setattr(kernels, "mlp_memory_fwd_kernel", fwd)
        patch.setattr(kernels, "mlp_memory_bwd_kernel", bwd)
        got = results(*kernels.triton_mlp_memory(*x.values(), **kw), x)
    assert [kw["USE_R"] for kw in fwd.launches] == [False, True]
    assert [kw["USE_R"] for kw in bwd.launches] == [False, True]
    assert got.keys() == want.keys() and "dretain" not in got
    for name in want:
        assert_close(name, got[name], want[name], 1e-6)


def check_custom_op_registration() -> None:
    """torch.library.opcheck: the schema, the fake implementation and the autograd
    registration agree with the op."""
    from nestc.ops.mlp_memory import triton as kernels

    x = make_inputs(T=19)
    torch.library.opcheck(kernels.mlp_memory_fwd, (*x.values(), "gelu", 0.5, False, 16))
    # with self-generated values, inside a chunk whose first weights get gradients
    G = [(t.detach() * 0.9).requires_grad_() for t in (x["A0"], x["B0"])]
    torch.library.opcheck(kernels.mlp_memory_fwd, (*x.values(), "silu", None, True, 16,
                                                   self_inputs(x).detach(), *G, 5))
    # a bug hunt's: the backward without grad_at (its fake gave one tensor for both absent
    # gradients: aliases), and a non-contiguous q (the fakes kept its strides; the op's
    # outputs are contiguous)
    plain = [t.detach() if t is not None else None for t in x.values()]
    *_, sA, sB, sSA, sSB = kernels.mlp_memory_fwd(*plain, "gelu", None, False, 16)
    q, k, v = plain[:3]
    grads = [torch.randn_like(t) for t in (q, sA[..., 0, :, :], sB[..., 0, :, :],
                                           sA[..., 0, :, :], sB[..., 0, :, :])]
    torch.library.opcheck(kernels.mlp_memory_bwd, (*plain[:6], sA, sB, sSA, sSB, "gelu", None,
                                                   False, 16, *grads))
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.library.opcheck(kernels.mlp_memory_fwd, (strided, *plain[1:], "gelu", None, False,
                                                   16))


def check_torch_compile_matches_eager() -> None:
    """torch.compile traces around the custom ops in one graph and equals eager."""
    import torch._dynamo

    x = make_inputs(T=21)

    def fn(*args: Any) -> Any:
        from nestc.ops.mlp_memory.triton import triton_mlp_memory

        return triton_mlp_memory(*args, clip=0.5, chunk=16)
    want = results(*fn(*x.values()), x)
    torch._dynamo.reset()
    got = results(*torch.compile(fn, backend="aot_eager", fullgraph=True)(*x.values()), x)
    for name in want:
        assert_close(f"compiled {name}", got[name], want[name], 1e-6)


def check_titans_block_on_the_triton_backend(T: int, chunk: int = 16) -> None:
    """build(..., backend="triton") runs the Titans block's memory through the kernel: whole
    chunks (T = 32, chunks of 16), or whole chunks then a partial one on the chunked tier
    (T = 37; T = 70 in the block's default chunks of 64), or less than a chunk, on the
    kernel too (T = 11): the same outputs, state and gradients as the chunked tier."""
    import nestc
    from nestc.ops.mlp_memory import triton as kernels

    blocks = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        blocks.append(nestc.load("std/memory/titans.nest").build(
            "Titans", dim=32, heads=2, chunk=chunk, backend=backend).to(DEVICE))
    x0 = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got: list[dict[str, torch.Tensor]] = []
    with interpreted.counting(kernels, "mlp_memory_fwd") as calls:
        for block in blocks:
            x = x0.clone().requires_grad_()
            y, state = block(x, return_state=True)
            mem = next(s for s in state.values() if isinstance(s, dict) and "M" in s)
            (A, B), (SA, SB) = mem["M"], mem["S"]
            loss = (y * torch.linspace(-1, 1, 32, device=DEVICE)).sum() + A.sum() + \
                B.pow(2).sum() + SA.sum() + SB.sum()
            grads = torch.autograd.grad(loss, [x, *block.parameters()])
            got.append({"y": y.detach(), "A": A.detach(), "SB": SB.detach(),
                        **{f"d{i}": g for i, g in enumerate(grads)}})
            if block is blocks[0]:
                assert len(calls) == 1, calls
    for name in got[1]:
        assert_close(f"Titans T={T} {name}", got[0][name], got[1][name])


def check_double_backward() -> None:
    """A backward that is itself differentiated (autograd.grad with create_graph, as a model
    takes the gradients of its task-loss memories through the memories above them): the op's
    backward recomputes on the chunked tier as a graph, and the second-order gradients equal
    the chunked tier's; a plain backward still runs the backward kernel."""
    from nestc.ops.mlp_memory import triton as kernels

    kw = {"act": "silu", "clip": 0.5, "chunk": 16, "read_before": True}
    got = []
    for backend in ("triton", "chunked"):
        x = make_inputs(T=21)
        leaves = [t for t in x.values() if t is not None]
        y, state = run(backend, x, **kw)
        first = (y * torch.linspace(-1, 1, y.shape[-1], device=DEVICE)).sum() + \
            sum(s.pow(2).sum() for s in state)
        with interpreted.counting(kernels, "mlp_memory_bwd") as calls:
            grads = torch.autograd.grad(first, leaves, create_graph=True)
        assert calls == [], calls
        # the second pass runs the op's first-order backward too (the incoming gradient of
        # the state depends on the state): the kernel
        second = sum((g * g.detach().sign()).sum() for g in grads)
        with interpreted.counting(kernels, "mlp_memory_bwd") as calls:
            got.append(torch.autograd.grad(second, leaves))
        assert len(calls) == (backend == "triton"), calls
    for name, ours, ref in zip([n for n, t in x.items() if t is not None], *got):
        assert_close(f"second-order d{name}", ours, ref)


CMS_BELOW_TITANS = """
import "std/memory/titans.nest"
import "std/memory/cms.nest"
from "std/optim/adam.nest" import AdamW
model TL(vocab = 32, dim = 32) {
    input tokens : [T] int
    let h = embed(tokens, vocab, dim)
    h = h + CMS(dim, chunks = [16])(h)
    h = h + Titans(dim, heads = 2, chunk = 16)(h)
    output logits = h |> linear(vocab)
    train every step { objective cross_entropy(logits, next(tokens)); rule AdamW(lr = 1e-3) }
}
"""


def check_task_memory_below_the_kernel() -> None:
    """A CMS level below Titans: the level's gradient of each 16-token piece runs back through
    the memory's kernel, and the outer level differentiates that gradient again. The triton
    back end trains it as the chunked one does (the kernel runs in every piece)."""
    import nestc
    from nestc.ops.mlp_memory import triton as kernels

    prog = nestc.loads(CMS_BELOW_TITANS, "tl.nest")
    x = torch.randint(0, 32, (2, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    got = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        model = prog.build("TL", backend=backend).to(DEVICE)
        with interpreted.counting(kernels, "mlp_memory_fwd") as calls:
            logits = model(x)
        assert len(calls) == (2 if backend == "triton" else 0), calls
        F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        got.append({"logits": logits.detach(),
                    **{n: p.grad for n, p in model.named_parameters()}})
    for name in got[1]:
        assert_close(f"CMS below Titans {name}", got[0][name], got[1][name])


TWO_MEMORIES = """
block Two(dim, heads = 2, chunk = 16) {
    input x : [T, dim]
    let q = x |> linear(dim) |> l2norm(per = heads)
    let k = x |> linear(dim) |> l2norm(per = heads)
    let v = x |> linear(dim)
    let eta = x |> linear(heads) |> sigmoid
    let theta = x |> linear(heads) |> sigmoid
    memory M1 : mlp(dim / heads, hidden = 2 * dim / heads) per head = meta
                every token in chunks of chunk {
        key k; value v
        objective l2(M1(k), v)
        rule momentum(lr = eta, beta = theta, retain = 0.9, clip = 1.0)
    }
    memory M2 : mlp(dim / heads, hidden = 2 * dim / heads) per head = meta
                every token in chunks of chunk {
        key k; value 2 * v
        objective l2(M2(k), 2 * v)
        rule momentum(lr = 0.5 * eta, beta = theta, retain = 0.95, clip = 1.0)
    }
    output M1(q) + M2(q)
}
"""


def check_two_memories_run_as_one_kernel() -> None:
    """Two memories of one structure read with one query run as one (nestc.memories
    ._Siblings): their heads stacked into one kernel launch, equal to each run alone on the
    chunked tier (T = 37: two whole chunks through the kernel, then a partial one)."""
    import nestc
    from nestc.memories import run_each_alone
    from nestc.ops.mlp_memory import triton as kernels

    prog = nestc.loads(TWO_MEMORIES, "two.nest")
    blocks = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        blocks.append(prog.build("Two", dim=32, backend=backend).to(DEVICE))
    run_each_alone(blocks[1])
    assert blocks[0].M1.siblings is not None and blocks[0].M2.siblings is not None
    x0 = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got: list[dict[str, torch.Tensor]] = []
    with interpreted.counting(kernels, "mlp_memory_fwd") as calls:
        for block in blocks:
            x = x0.clone().requires_grad_()
            y, state = block(x, return_state=True)
            finals = [t for s in state.values() if isinstance(s, dict) and "M" in s
                      for t in (*s["M"], *s["S"])]
            loss = (y * torch.linspace(-1, 1, 32, device=DEVICE)).sum() + \
                sum(t.pow(2).sum() for t in finals)
            grads = torch.autograd.grad(loss, [x, *block.parameters()])
            got.append({"y": y.detach(), **{f"state{i}": t.detach() for i, t in
                                            enumerate(finals)},
                        **{f"d{i}": g for i, g in enumerate(grads)}})
            if block is blocks[0]:
                assert len(calls) == 1, calls
    for name in got[1]:
        assert_close(f"two memories {name}", got[0][name], got[1][name])


def check_self_modifying_titans(T: int, launches: int) -> None:
    """build(..., backend="triton") runs self-modifying Titans' memories through the kernel:
    its four projection memories (residual MLPs learning their own readings of v) as one
    launch, its main memory as another (chunks of 16 here), in each piece of 16 tokens (the
    block runs chunk by chunk: it reads the projection memories at each chunk's start); T = 37
    ends in a partial chunk, T = 11 is one. Outputs, states and gradients equal the chunked
    tier's."""
    import nestc
    from nestc.ops.mlp_memory import triton as kernels

    prog = nestc.load("std/memory/self_modifying_titans.nest")
    x0 = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        block = prog.build("SelfModifyingTitans", dim=32, heads=2, memory_chunk=16,
                           backend=backend).to(DEVICE)
        with interpreted.counting(kernels, "mlp_memory_fwd") as calls:
            got.append(block_results(block, x0))
        assert len(calls) == (launches if backend == "triton" else 0), calls
    for name in got[1]:
        assert_close(f"SelfModifyingTitans T={T} {name}", got[0][name], got[1][name])


def check_self_modifying_titans_second_order() -> None:
    """The gradient of self-modifying Titans' input taken as a graph (create_graph, as a CMS
    level below it takes its task gradient), then differentiated: the first-order gradient
    (the op's backward recomputed on the chunked tier, where the residual memories' v - k is
    computed from k) and the second-order gradients of the input and every parameter equal
    the chunked tier's."""
    import nestc

    prog = nestc.load("std/memory/self_modifying_titans.nest")
    x0 = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        block = prog.build("SelfModifyingTitans", dim=32, heads=2, memory_chunk=16,
                           backend=backend).to(DEVICE)
        x = x0.clone().requires_grad_()
        y = block(x)
        dx, = torch.autograd.grad((y * torch.linspace(-1, 1, 32, device=DEVICE)).sum(), x,
                                  create_graph=True)
        names = ["x", *(n for n, _ in block.named_parameters())]
        second = torch.autograd.grad((dx * torch.cos(x0)).sum(), [x, *block.parameters()],
                                     allow_unused=True)
        got.append({"dx": dx.detach(),
                    **{f"d2 {n}": g for n, g in zip(names, second) if g is not None}})
    assert got[0].keys() == got[1].keys()
    for name in got[1]:
        assert_close(f"SelfModifyingTitans {name}", got[0][name], got[1][name])


def check_hope_lm() -> None:
    """A 2-layer HopeLM trains on the triton back end as on the chunked one: its CMS levels
    cut the sequence into 16-token pieces, in each of which the kernel runs the projection
    memories of self-modifying Titans (one launch) and its main memory (another: a quarter of
    one of its chunks of 64, the piece's first gradients taken at that chunk's first
    weights), and a level's gradient through a later layer's memories is differentiated
    again by the outer level. Logits and every parameter's gradient equal the chunked
    tier's."""
    import nestc
    from nestc.ops.mlp_memory import triton as kernels

    prog = nestc.load("std/models/hope.nest")
    x = torch.randint(0, 32, (2, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    got = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        model = prog.build("HopeLM", vocab=32, dim=32, depth=2, heads=2,
                           backend=backend).to(DEVICE)
        with interpreted.counting(kernels, "mlp_memory_fwd") as calls:
            logits = model(x)
        # 2 layers x 2 pieces x 2 launches
        assert len(calls) == (8 if backend == "triton" else 0), calls
        F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        got.append({"logits": logits.detach(),
                    **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}})
    assert got[0].keys() == got[1].keys()
    for name in got[1]:
        assert_close(f"HopeLM {name}", got[0][name], got[1][name])


def check_kernel_matches_the_device() -> None:
    """Interpreted on CPU (the subprocess), compiled on CUDA."""
    from nestc.ops.mlp_memory import triton as kernels

    assert kernels.INTERPRETED is (DEVICE == "cpu")


CASES: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {
    # T, chunk, act, retain, beta, state, clip, read_before
    "T37-C16-gelu-retain-momentum-state": (
        check_matches_reference, (37, 16, "gelu", True, True, True, None, False)),
    "T37-C32-gelu-retain-momentum-state-clip-read_before": (
        check_matches_reference, (37, 32, "gelu", True, True, True, 0.05, True)),
    "T40-C16-silu-retain-gd": (
        check_matches_reference, (40, 16, "silu", True, False, False, None, False)),
    "T23-C16-silu-momentum-state-clip": (
        check_matches_reference, (23, 16, "silu", False, True, True, 0.05, False)),
    "T5-C64-gelu-plain-gd-read_before": (
        check_matches_reference, (5, 64, "gelu", False, False, False, None, True)),
    "T33-C64-silu-retain-momentum-state-clip-read_before": (
        check_matches_reference, (33, 64, "silu", True, True, True, 0.05, True)),
    "T1-C16-gelu-retain-momentum-state": (
        check_matches_reference, (1, 16, "gelu", True, True, True, None, False)),
    "N2-d12-h20-T29-C16-gelu-retain-momentum-clip": (
        check_matches_reference, (29, 16, "gelu", True, True, False, 0.05, False, 2, 12, 20)),
    # the fused backward against the per-chunk vjp (clip 2 bites on some tokens, 0.05 on all)
    "bwd-T37-C16-gelu-retain-momentum-state": (
        check_fused_backward_matches_vjp, (37, 16, "gelu", True, True, True, None, False)),
    "bwd-T37-C32-gelu-retain-momentum-state-clip-read_before": (
        check_fused_backward_matches_vjp, (37, 32, "gelu", True, True, True, 2.0, True)),
    "bwd-T40-C16-silu-retain-gd-read_before": (
        check_fused_backward_matches_vjp, (40, 16, "silu", True, False, False, None, True)),
    "bwd-T23-C16-silu-momentum-state-clip": (
        check_fused_backward_matches_vjp, (23, 16, "silu", False, True, True, 2.0, False)),
    "bwd-T21-C16-gelu-plain-gd-clip": (
        check_fused_backward_matches_vjp, (21, 16, "gelu", False, False, False, 0.05, False)),
    "bwd-N2-d12-h20-T29-C16-silu-retain-momentum-clip-read_before": (
        check_fused_backward_matches_vjp,
        (29, 16, "silu", True, True, False, 0.05, True, 2, 12, 20)),
    "bwd-d5-h24-T9-C64-gelu-retain-gd-clip": (
        check_fused_backward_matches_vjp, (9, 64, "gelu", True, False, True, 2.0, False, 1, 5,
                                            24)),
    # self-generated values (v_self): the op, then the fused backward
    "self-T37-C16-gelu-clip": (check_self_generated_values, (37, 16, "gelu", 0.05, False)),
    "self-T40-C32-silu-read_before": (check_self_generated_values, (40, 32, "silu", None, True)),
    "bwd-self-T37-C16-silu-retain-momentum-state-clip-read_before": (
        check_fused_backward_matches_vjp,
        (37, 16, "silu", True, True, True, 2.0, True, 1, 8, 16, True)),
    "bwd-self-T21-C16-gelu-retain-gd": (
        check_fused_backward_matches_vjp,
        (21, 16, "gelu", True, False, False, None, False, 1, 8, 16, True)),
    # pieces that start inside a chunk: T, chunk, offset, act, clip, read_before, beta, v_self
    "inside-T37-C16-off5-gelu-clip-momentum": (
        check_inside_a_chunk, (37, 16, 5, "gelu", 0.05, False, True, False)),
    "inside-T9-C16-off3-silu-read_before-self": (
        check_inside_a_chunk, (9, 16, 3, "silu", None, True, False, True)),
    "inside-T16-C64-off48-gelu-read_before-momentum": (
        check_inside_a_chunk, (16, 64, 48, "gelu", None, True, True, False)),
    "inside-T40-C32-off31-silu-clip-self-momentum": (
        check_inside_a_chunk, (40, 32, 31, "silu", 0.05, False, True, True)),
    "inside-T37-C16-off9-gelu-clip-read_before-self-momentum": (
        check_inside_a_chunk, (37, 16, 9, "gelu", 0.05, True, True, True)),
    "bwd-inside-T37-C16-off5-gelu-retain-momentum-state-clip": (
        check_fused_backward_matches_vjp,
        (37, 16, "gelu", True, True, True, 2.0, False, 1, 8, 16, False, 5)),
    "bwd-inside-T10-C16-off6-silu-retain-momentum-read_before-self": (
        check_fused_backward_matches_vjp,
        (10, 16, "silu", True, True, True, None, True, 1, 8, 16, True, 6)),
    "small_and_zero_factors": (check_small_and_zero_factors, ()),
    "empty": (check_empty_sequence, ()),
    "bfloat16": (check_bfloat16_inputs, ()),
    "refusals": (check_refusals, ()),
    "refused_without_retention-momentum": (
        check_refused_without_retention_retries_with_ones, (True,)),
    "refused_without_retention-gd": (check_refused_without_retention_retries_with_ones, (False,)),
    "opcheck": (check_custom_op_registration, ()),
    "compile": (check_torch_compile_matches_eager, ()),
    "interpreted_on_cpu": (check_kernel_matches_the_device, ()),
    "titans_block_fused": (check_titans_block_on_the_triton_backend, (32,)),
    "titans_block_and_a_partial_chunk": (check_titans_block_on_the_triton_backend, (37,)),
    "titans_block_under_a_chunk": (check_titans_block_on_the_triton_backend, (11,)),
    "titans_block_default_chunk": (check_titans_block_on_the_triton_backend, (70, 64)),
    "two_memories_one_kernel": (check_two_memories_run_as_one_kernel, ()),
    "self_modifying_titans_fused": (check_self_modifying_titans, (32, 4)),
    "self_modifying_titans_and_a_partial_chunk": (check_self_modifying_titans, (37, 6)),
    "self_modifying_titans_under_a_chunk": (check_self_modifying_titans, (11, 2)),
    "self_modifying_titans_second_order": (check_self_modifying_titans_second_order, ()),
    "hope_lm": (check_hope_lm, ()),
    "double_backward": (check_double_backward, ()),
    "task_memory_below_the_kernel": (check_task_memory_below_the_kernel, ()),
}


def run_selected(names: list[str]) -> dict[str, dict[str, Any]]:
    from nestc.ops.mlp_memory import triton as kernels

    return interpreted.run_cases(CASES, names, [kernels])


outcomes = interpreted.outcomes_fixture(__file__, "run_selected")


@pytest.mark.parametrize("case", list(CASES))
def test_triton_mlp_memory(case: str, outcomes: dict[str, dict[str, Any]]) -> None:
    interpreted.report(case, outcomes)


@pytest.mark.skipif(DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the kernel can run here")
def test_the_triton_backend_on_cpu_without_the_interpreter_says_how_to_run_it() -> None:
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu; set TRITON_INTERPRET=1"):
        run("triton", make_inputs(T=5))


@pytest.mark.parametrize("beta", [True, False])
def test_a_kernel_too_big_for_the_gpu_falls_back_to_pytorch(
        monkeypatch: pytest.MonkeyPatch, beta: bool) -> None:
    """A launch refused with OutOfResources (raised before anything runs) computes the same
    forward and backward in PyTorch, with a warning: the chunked tier's results."""
    from nestc.ops.mlp_memory import triton as kernels

    monkeypatch.setattr(kernels, "INTERPRETED", True)  # let CPU tensors through the check
    monkeypatch.setattr(kernels, "mlp_memory_fwd_kernel", interpreted.Cramped())
    monkeypatch.setattr(kernels, "mlp_memory_bwd_kernel", interpreted.Cramped())
    x = make_inputs(T=37, beta=beta)
    kw = {"act": "silu", "clip": 0.5, "chunk": 16}
    with pytest.warns(RuntimeWarning, match="forward kernel needs more of this GPU") as caught:
        ours = results(*kernels.triton_mlp_memory(*x.values(), **kw), x)
    assert any("backward kernel" in str(w.message) for w in caught)
    ref = results(*run("chunked", x, **kw), x)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(name, ours[name], ref[name], 1e-6)


def test_an_mlp_memory_in_chunks_the_kernel_does_not_take_runs_on_the_chunked_tier() -> None:
    """Chunks of 4 (the kernel takes 16, 32 or 64): backend="triton" builds and runs the
    chunked tier's computation, no kernel launched (it raised a bare ValueError before)."""
    import nestc

    text = ("block B(dim = 8) {\n    input x : [T, dim]\n"
            "    memory M : mlp(dim) = meta every token in chunks of 4 {\n"
            "        key x; value x; objective l2(M(x), x); rule gd(lr = 0.5) }\n"
            "    output M(x)\n}\n")
    x = torch.randn(2, 11, 8)
    outs = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        outs.append(nestc.loads(text, "b.nest").build("B", backend=backend)(x))
    assert torch.equal(outs[0], outs[1])


def test_a_clip_too_small_for_the_kernel_runs_on_the_chunked_tier() -> None:
    """A spec's clip below 1e-18 (its square underflows float32 in the kernel: NaN on a
    partial chunk's padding rows) runs the chunked tier's computation on backend="triton",
    no kernel launched, and explain does not promise the kernel; the op refuses it."""
    import nestc
    from nestc.codegen import memories as plans
    from nestc.explain import explain
    from nestc.ops import mlp_memory as op
    from nestc.ops.mlp_memory import triton as kernels

    assert plans.MIN_KERNEL_CLIP == op.MIN_KERNEL_CLIP
    titans = nestc.load("std/memory/titans.nest")
    x = torch.randn(2, 21, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    outs = []
    for backend in ("triton", "chunked"):
        torch.manual_seed(0)
        block = titans.build("Titans", dim=16, heads=2, chunk=16, clip=1e-20,
                             backend=backend).to(DEVICE)
        with interpreted.counting(kernels, "mlp_memory_fwd") as calls:
            outs.append(block(x))
        assert calls == [], calls
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
    assert "a fused Triton kernel" in explain(titans, "Titans", dim=16, chunk=16)
    assert "a fused Triton kernel" not in explain(titans, "Titans", dim=16, chunk=16,
                                                  clip=1e-20)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="clip 1e-20 is below 1e-18"):
        op.mlp_memory(q, q, q, q[..., 0], None, None, torch.zeros(1, 1, 8, 16),
                      torch.zeros(1, 1, 16, 8), clip=1e-20, backend="triton")


def test_the_compiler_picks_the_kernel_only_where_it_fits() -> None:
    """mlp_kernel_fits against what benchmarks/triton_resources.py measured on sm_90: the
    stdlib TitansLM's memory (d 32, h 64, chunk 16) fits; so does the Titans block's default
    chunk 64 in float32 (164 KB), not in bfloat16 (254 KB), nor d = h = 64 at chunk 64
    (229 KB of 227 KiB in float32: too tight to count on)."""
    from nestc.ops.mlp_memory.triton import mlp_kernel_fits

    bf16 = torch.bfloat16
    assert mlp_kernel_fits(32, 64, 16) and mlp_kernel_fits(32, 64, 16, bf16)
    assert mlp_kernel_fits(32, 64, 64) and not mlp_kernel_fits(32, 64, 64, bf16)
    assert mlp_kernel_fits(64, 128, 16, bf16) and not mlp_kernel_fits(64, 64, 64)
    assert not mlp_kernel_fits(128, 128, 16) and not mlp_kernel_fits(16, 256, 16)


def test_the_fusion_benchmark_counts_what_the_kernels_take() -> None:
    """benchmarks/fusion.py --quick (kernels interpreted): each stdlib language model runs in
    fewer PyTorch operations on the triton back end, the kernels among them: HopeLM in three
    pieces (its CMS levels' chunks of 16 in 40 tokens), each with a forward and a backward for
    self-modifying Titans' four projection memories (one group) and for its main memory, but
    for the last piece's projection memories, whose states reach no loss (they are read at
    the next chunk's start): no backward; TitansLM and DeltaNetLM one forward and one
    backward."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "fusion.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r[0], r[1]): (int(r[2].replace(",", "")), int(r[3])) for r in
            ([c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines()
             if line.startswith("| ") and not line.startswith(("| model", "| ---")))}
    for model, kernels in (("HopeLM", 11), ("TitansLM", 2), ("DeltaNetLM", 2)):
        assert rows[(model, "chunked")][1] == 0, run.stdout
        assert rows[(model, "triton")][1] == kernels, run.stdout
        assert rows[(model, "triton")][0] < rows[(model, "chunked")][0], run.stdout
