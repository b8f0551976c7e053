"""Blocks and models built as nn.Modules: the chunked tier against the reference tier (outputs,
final states, parameter gradients), streaming, state_dict keys, copies, and errors."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from conftest import close, leaves, run_benchmark, spec  # noqa: E402

import nestc  # noqa: E402
from nestc.memories import MLPMemory  # noqa: E402

DELTANET = nestc.load("std/memory/deltanet.nest")
LINEAR = nestc.load("std/memory/linear_attention.nest")
TRANSFORMER = nestc.load("std/models/transformer.nest")
TITANS = nestc.load("std/memory/titans.nest")

# a memory for each resolution of objective and rule, small enough for the token loop
TEMPLATE = spec("""
    block Mem(dim, heads = 2, chunk = 16) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = heads)
        let v = x |> linear(dim)
        let q = x |> linear(dim) |> conv1d(window = 3) |> l2norm(per = heads)
        let lr = x |> linear(heads) |> sigmoid
        let keep = x |> linear(heads) |> sigmoid
        memory M : matrix(dim / heads, dim / heads) per head = INIT every token in chunks of chunk {
            CLAUSES
        }
        output M(q) |> linear(dim)
    }
""")
CLAUSES = {
    "gd": ("zeros", "objective l2(M(k), v); rule gd(lr = lr)"),
    "gd_retain": ("zeros", "objective l2(M(k), v); rule gd(lr = lr, retain = keep)"),
    "dgd_literal": ("meta", "objective l2(M(k), v); rule dgd(lr = 0.5 * lr, retain = keep); "
                    "dgd literal"),
    "before": ("meta", "read before write; objective l2(M(k), v); "
               "rule dgd(lr = lr, retain = keep)"),
    "dot_retain": ("zeros", "objective dot(M(k), v); rule gd(lr = 0.5, retain = keep)"),
    "stopped": ("zeros", "backprop stopped; objective l2(M(k), v); rule gd(lr = lr)"),
}


def variant(mode):
    init, clauses = CLAUSES[mode]
    return nestc.loads(TEMPLATE.replace("INIT", init).replace("CLAUSES", clauses), "v.nest")


MODES = list(CLAUSES)


def pair(prog, name, **hyper):
    """The same module built on both tiers, with equal weights (set away from zero)."""
    torch.manual_seed(0)
    ref = prog.build(name, backend="reference", **hyper)
    fast = prog.build(name, backend="chunked", **hyper)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def compare(ref, fast, x):
    ya, sa = ref(x, return_state=True)
    yb, sb = fast(x, return_state=True)
    close(ya, yb)
    assert sa.keys() == sb.keys()
    for a, b in zip(leaves(sa), leaves(sb), strict=True):
        close(a.float(), b.float())
    (ya ** 2).mean().backward()
    (yb ** 2).mean().backward()
    for p, q in zip(ref.parameters(), fast.parameters()):
        # a parameter no path reaches has no gradient on one tier and zeros on the other
        zero = torch.zeros_like(p)
        close(zero if p.grad is None else p.grad, zero if q.grad is None else q.grad)


def streams_as_one(mod, x, cuts, targets=None):
    """mod fed x whole, and in pieces that end at `cuts`, each given the state the one before
    returned (and its share of the targets): equal outputs and final states. Returns the
    pieces' outputs joined."""
    given = {} if targets is None else {"targets": targets}
    whole, final = mod(x, return_state=True, **given)
    state, pieces = None, []
    for a, b in zip((0, *cuts), (*cuts, x.shape[1])):
        given = {} if targets is None else {"targets": targets[:, a:b]}
        y, state = mod(x[:, a:b], state=state, return_state=True, **given)
        pieces.append(y)
    streamed = torch.cat(pieces, 1)
    close(streamed, whole)
    for u, v in zip(leaves(final), leaves(state), strict=True):
        close(u, v)
    return streamed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 16, 37])
def test_linear_memories_chunked_equal_reference(mode, T):
    ref, fast = pair(variant(mode), "Mem", dim=16)
    compare(ref, fast, torch.randn(2, T, 16))


# a huber objective or a clip makes each token's update a non-linear function of the state:
# every tier runs the token loop (docs/semantics.md, matrix memories)
NONLINEAR = {
    "huber": ("zeros", "objective huber(M(k), v, delta = 0.05); rule gd(lr = lr, retain = keep)"),
    "huber_before": ("meta", "read before write; objective huber(M(k), v, delta = 0.05); "
                     "rule dgd(lr = lr, retain = keep)"),
    "clip_literal": ("meta", "dgd literal; objective l2(M(k), v); "
                     "rule dgd(lr = 0.5 * lr, retain = keep, clip = 0.05)"),
    "clip_dot": ("zeros", "objective dot(M(k), v); rule gd(lr = 0.5, clip = 0.05)"),
    "shared": ("zeros", "state shared; objective huber(M(k), v, delta = 0.05); "
               "rule gd(lr = lr, retain = 0.9, clip = 0.05)"),
}


def nonlinear(case, init=None, clauses=None):
    init, clauses = NONLINEAR[case] if clauses is None else (init, clauses)
    return nestc.loads(TEMPLATE.replace("INIT", init).replace("CLAUSES", clauses), "n.nest")


def token_loop(mem, q, w, S, P=None):
    """The matrix memory's update written out by hand (no torch.func): for token t, the
    read y = S^T k, e = dL/dy (y - v, -v, or y - v clamped to [-delta, delta]), each
    sequence's gradient k e^T of norm |k| |e| scaled by clip / max(norm, clip), times lr;
    a shared state takes their sum (and its retention once). With momentum (P given) that
    term U goes through P <- beta P - U, and P is added where -U would be: (o, S, P)."""
    B, T = q.shape[:2]
    outs = []
    for t in range(T):
        kt, vt, eta = w["k"][:, t], w["v"][:, t], w["lr"][:, t]
        r = 1.0 if w["retain"] is None else w["retain"][:, t, :, None, None]
        if mem.shared and w["retain"] is not None:
            r = r[0]
        if P is not None:
            b = w["beta"][:, t, :, None, None]
            b = b[0] if mem.shared else b
        if mem.read_before:
            outs.append(torch.einsum("nha,nhab->nhb", q[:, t], S.expand(B, *S.shape[-3:])))
        old = S
        if mem.gated:  # the gradient at the retained state
            S = old = r * S
        y = torch.einsum("nha,nhab->nhb", kt, old.expand(B, *old.shape[-3:]))
        e = {"l2": y - vt, "dot": -vt,
             "huber": (y - vt).clamp(-mem.delta, mem.delta)}[mem.objective]
        scale = eta
        if mem.clip is not None:
            norm = kt.norm(dim=-1) * e.norm(dim=-1)
            scale = eta * mem.clip / norm.clamp_min(mem.clip)
        U = scale[..., None, None] * kt[..., :, None] * e[..., None, :]
        if mem.shared:
            U = U.sum(0)
        if P is not None:
            P = b * P - U
            U = -P
        if mem.gated:
            S = S - U
        elif mem.rule == "dgd":  # literal: (r I - lr k k^T) S - lr grad
            kk = torch.einsum("nha,nhc,nh->nhac", kt, kt, eta)
            S = r * S - (kk.sum(0) if mem.shared else kk) @ S - U
        else:
            S = r * S - U
        if not mem.read_before:
            outs.append(torch.einsum("nha,nhab->nhb", q[:, t], S.expand(B, *S.shape[-3:])))
    return (torch.stack(outs, 1), S) + (() if P is None else (P,))


@pytest.mark.parametrize("case", NONLINEAR)
@pytest.mark.parametrize("tier", ["_reference", "_chunked"])
def test_huber_and_clip_matrix_memories_equal_a_token_loop_by_hand(case, tier):
    mem = nonlinear(case).build("Mem", dim=16).M
    assert mem.recurrence == ("linear_attention" if case == "clip_dot" else "token_loop")
    torch.manual_seed(1)
    B, T, H = 3, 9, 2
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, 8), dim=-1) for _ in "qk")
    v, lr = torch.randn(B, T, H, 8), torch.rand(B, T, H)
    retain = None if "retain" not in NONLINEAR[case][1] else \
        torch.full((B, T, H), 0.9) if mem.shared else 0.5 + 0.5 * torch.rand(B, T, H)
    S0 = torch.randn(H, 8, 8) if mem.shared else torch.randn(B, H, 8, 8)
    inputs = [x.requires_grad_() for x in (q, k, v, lr, S0)]
    w = {"k": k, "v": v, "lr": lr, "retain": retain}
    got = getattr(mem, tier)(q, w, S0)[:2]
    want = token_loop(mem, q, w, S0)
    for a, b in zip(got, want, strict=True):
        close(a, b)
    for a, b in zip(torch.autograd.grad(sum((x * x.detach().sin()).sum() for x in got), inputs),
                    torch.autograd.grad(sum((x * x.detach().sin()).sum() for x in want), inputs),
                    strict=True):
        close(a, b)
    # what huber and clip change matters here: without them the state is another
    plain = nonlinear(case).build("Mem", dim=16).M
    plain.objective = "l2" if plain.objective == "huber" else plain.objective
    plain.clip = None
    assert (token_loop(plain, q, w, S0)[1] - want[1]).abs().max() > 0.1


@pytest.mark.parametrize("case", NONLINEAR)
def test_huber_and_clip_matrix_memories_agree_on_every_tier_and_stream(case):
    ref, fast = pair(nonlinear(case), "Mem", dim=16)
    compare(ref, fast, torch.randn(2, 13, 16))
    torch.manual_seed(0)
    mod = nonlinear(case).build("Mem", backend="triton", dim=16)  # the token loop too
    streams_as_one(mod, torch.randn(2, 13, 16), (5, 6))


# Titans' momentum on a matrix memory that learns every token: the state is a pair, and every
# tier runs the token loop (docs/semantics.md, matrix memories)
MOMENTUM = {
    "momentum": ("zeros", "objective l2(M(k), v); rule momentum(lr = lr, beta = keep, "
                 "retain = 0.9)"),
    "dgd_beta": ("meta", "objective l2(M(k), v); rule dgd(lr = lr, retain = keep, beta = 0.7)"),
    "dgd_literal_beta": ("meta", "dgd literal; read before write; objective l2(M(k), v); "
                         "rule dgd(lr = 0.5 * lr, retain = keep, beta = keep)"),
    "huber_clip": ("zeros", "objective huber(M(k), v, delta = 0.05); "
                   "rule momentum(lr = lr, beta = keep, clip = 0.05)"),
    "dot": ("zeros", "objective dot(M(k), v); rule momentum(lr = 0.5, beta = keep)"),
    "shared": ("meta", "state shared; objective l2(M(k), v); "
               "rule momentum(lr = lr, beta = 0.8, retain = 0.9)"),
}


@pytest.mark.parametrize("case", MOMENTUM)
@pytest.mark.parametrize("tier", ["_reference", "_chunked"])
def test_matrix_memories_with_momentum_equal_a_token_loop_by_hand(case, tier):
    mem = nonlinear(None, *MOMENTUM[case]).build("Mem", dim=16).M
    assert mem.momentum and mem.recurrence == "token_loop"
    torch.manual_seed(1)
    B, T, H = 3, 9, 2
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, 8), dim=-1) for _ in "qk")
    v, lr = torch.randn(B, T, H, 8), torch.rand(B, T, H)
    clauses = MOMENTUM[case][1]
    retain = None if "retain" not in clauses else \
        torch.full((B, T, H), 0.9) if mem.shared else 0.5 + 0.5 * torch.rand(B, T, H)
    beta = torch.full((B, T, H), 0.8) if mem.shared else torch.rand(B, T, H)
    shape = (H, 8, 8) if mem.shared else (B, H, 8, 8)
    S0, P0 = torch.randn(shape), 0.3 * torch.randn(shape)
    inputs = [x.requires_grad_() for x in (q, k, v, lr, beta, S0, P0)]
    w = {"k": k, "v": v, "lr": lr, "retain": retain, "beta": beta}
    got = getattr(mem, tier)(q, w, S0, P0)
    want = token_loop(mem, q, w, S0, P0)
    for a, b in zip(got, want, strict=True):
        close(a, b)
    for a, b in zip(torch.autograd.grad(sum((x * x.detach().sin()).sum() for x in got), inputs),
                    torch.autograd.grad(sum((x * x.detach().sin()).sum() for x in want), inputs),
                    strict=True):
        close(a, b)
    # the momentum matters: without it (P kept at zero, beta 0) the state is another
    w0 = {**w, "beta": torch.zeros_like(beta)}
    assert (token_loop(mem, q, w0, S0, torch.zeros_like(P0))[1] - want[1]).abs().max() > 0.1


@pytest.mark.parametrize("case", MOMENTUM)
def test_matrix_memories_with_momentum_agree_on_every_tier_and_stream(case):
    ref, fast = pair(nonlinear(None, *MOMENTUM[case]), "Mem", dim=16)
    compare(ref, fast, torch.randn(2, 13, 16))
    torch.manual_seed(0)
    mod = nonlinear(None, *MOMENTUM[case]).build("Mem", backend="triton", dim=16)
    x = torch.randn(2, 13, 16)
    streams_as_one(mod, x, (5, 6))
    _, state = mod(x, return_state=True)
    assert set(state["M"]) == {"S", "momentum"}


def test_momentum_with_beta_0_is_gd_and_needs_beta():
    """momentum(beta = 0) is gd, built as the chunked op; `momentum` without beta is an error
    at the rule."""
    zero = nonlinear(None, "zeros", "objective l2(M(k), v); "
                     "rule momentum(lr = lr, beta = 0, retain = keep)").build("Mem", dim=16)
    gd = variant("gd_retain").build("Mem", dim=16)
    assert not zero.M.momentum and zero.M.recurrence == "gated_delta_rule"
    gd.load_state_dict(zero.state_dict())
    compare(zero, gd, torch.randn(2, 11, 16))
    with pytest.raises(nestc.NestError, match="momentum rule of `M` needs `beta`") as err:
        nonlinear(None, "zeros", "objective l2(M(k), v); rule momentum(lr = lr)").build(
            "Mem", dim=16)
    assert err.value.span.line == 9  # the rule


def test_huber_with_a_wide_delta_and_a_loose_clip_are_the_delta_rule():
    """Huber is l2 within delta, and a clip above every gradient's norm does nothing: the
    token loop then equals the gated delta rule's chunked op."""
    ref, fast = pair(nonlinear(None, "zeros", "objective huber(M(k), v, delta = 1e6); "
                                     "rule gd(lr = lr, retain = keep, clip = 1e6)"), "Mem",
                     dim=16)
    plain = variant("gd_retain").build("Mem", dim=16)
    plain.load_state_dict(fast.state_dict())
    assert fast.M.recurrence == "token_loop" and plain.M.recurrence == "gated_delta_rule"
    compare(fast, plain, torch.randn(2, 21, 16))


@pytest.mark.parametrize("prog,name", [(DELTANET, "DeltaNet"), (DELTANET, "GatedDeltaNet"),
                                       (LINEAR, "LinearAttention"), (TRANSFORMER, "Attention"),
                                       (TRANSFORMER, "MLP"), (TITANS, "Titans")])
def test_stdlib_blocks_chunked_equal_reference(prog, name):
    hyper = {"dim": 32, "chunk": 16} if name == "Titans" else {"dim": 32}
    ref, fast = pair(prog, name, **hyper)
    compare(ref, fast, torch.randn(2, 70 if name != "Titans" else 37, 32))


MLP_TEMPLATE = spec("""
    block Deep(dim, heads = 2, chunk = 4) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = heads)
        let v = x |> linear(dim)
        let lr = 0.5 * sigmoid(linear(x, heads))
        let keep = x |> linear(1) |> sigmoid
        memory M : STRUCTURE per head = meta every token in chunks of chunk {
            CLAUSES
        }
        output M(x) |> linear(dim)
    }
""")
MLP_CASES = {
    "gd": ("mlp(dim / heads, hidden = 8, act = \"tanh\")",
           "objective l2(M(k), v); rule gd(lr = lr)"),
    "dgd_retain_before": ("residual_mlp(dim / heads, hidden = 8)",
                          "read before write; objective l2(M(k), v); "
                          "rule dgd(lr = lr, retain = keep)"),
    "momentum_dot": ("mlp(dim / heads, hidden = 8)",
                     "objective dot(M(k), v); rule momentum(lr = 0.1 * lr, beta = keep, "
                     "retain = 0.9)"),
    # the chunked tier's closed-form gradients, one case per activation and update shape
    "relu_momentum_before": ("mlp(dim / heads, hidden = 8, act = \"relu\")",
                             "read before write; objective l2(M(k), v); "
                             "rule momentum(lr = 0.1 * lr, beta = keep)"),
    "sigmoid_retain": ("mlp(dim / heads, hidden = 8, act = \"sigmoid\")",
                       "objective l2(M(k), v); rule gd(lr = lr, retain = keep)"),
    "gelu_momentum_retain_before": ("residual_mlp(dim / heads, hidden = 8, act = \"gelu\")",
                                    "read before write; objective l2(M(k), v); "
                                    "rule momentum(lr = lr, beta = keep, retain = keep)"),
    "silu_dot_before": ("residual_mlp(dim / heads, hidden = 8)",
                        "read before write; objective dot(M(k), v); rule gd(lr = 0.1 * lr)"),
    "huber": ("residual_mlp(dim / heads, hidden = 8)",
              "read before write; objective huber(M(k), v, delta = 0.3); "
              "rule gd(lr = lr, retain = keep)"),
    # every token's gradient scaled to norm at most clip (small enough to act here)
    "clip_gd": ("mlp(dim / heads, hidden = 8, act = \"tanh\")",
                "objective l2(M(k), v); rule gd(lr = lr, clip = 0.05)"),
    "clip_momentum_before": ("residual_mlp(dim / heads, hidden = 8)",
                             "read before write; objective l2(M(k), v); "
                             "rule momentum(lr = lr, beta = keep, retain = keep, clip = 0.1)"),
    # the paper's DGD: each layer's weights also lose lr x its input's outer product
    "dgd_literal": ("residual_mlp(dim / heads, hidden = 8)",
                    "dgd literal; objective l2(M(k), v); rule dgd(lr = lr, retain = keep)"),
    "dgd_literal_huber_clip_before": ("mlp(dim / heads, hidden = 8, act = \"tanh\")",
                                      "dgd literal; read before write; "
                                      "objective huber(M(k), v, delta = 0.3); "
                                      "rule dgd(lr = lr, clip = 0.1)"),
    # with Titans' momentum on the gradient term: P <- beta P - lr g, W <- DGD's factor W + P
    "dgd_literal_momentum": ("residual_mlp(dim / heads, hidden = 8)",
                             "dgd literal; objective l2(M(k), v); "
                             "rule dgd(lr = lr, retain = keep, beta = 0.5 + 0.4 * keep)"),
    "dgd_literal_momentum_clip_before": ("mlp(dim / heads, hidden = 8, act = \"tanh\")",
                                         "dgd literal; read before write; "
                                         "objective l2(M(k), v); "
                                         "rule dgd(lr = lr, beta = keep, clip = 0.1)"),
}


def mlp_variant(case):
    structure, clauses = MLP_CASES[case]
    return nestc.loads(MLP_TEMPLATE.replace("STRUCTURE", structure)
                       .replace("CLAUSES", clauses), "m.nest")


@pytest.mark.parametrize("case", MLP_CASES)
@pytest.mark.parametrize("T", [1, 4, 11])
def test_mlp_memories_chunked_equal_reference(case, T):
    ref, fast = pair(mlp_variant(case), "Deep", dim=16)
    compare(ref, fast, torch.randn(2, T, 16))


@pytest.mark.parametrize("case", MLP_CASES)
def test_mlp_memories_stream_in_pieces_that_end_inside_chunks(case):
    torch.manual_seed(0)
    mod = mlp_variant(case).build("Deep", backend="chunked", dim=16)
    streams_as_one(mod, torch.randn(2, 19, 16), (3, 10))


@pytest.mark.parametrize("case", ["clip_momentum_before", "dgd_literal_momentum"])
def test_mlp_memories_keep_the_gradient_of_small_and_zero_factors(case):
    """The gradients of retain and beta at a token where they are 1e-6, 1e-8 or 0, in float32,
    against the reference tier (the token loop) in float64: the chunked tier formed its decays
    from differences of running sums of logs, whose gradient cancelled terms of size 1 up to
    float32's rounding (70% of it at 1e-5, the wrong sign at 1e-8), and clamped a factor of 0
    to 1e-30 with no gradient at all (the literal DGD's solve too)."""
    mem = mlp_variant(case).build("Deep", dim=16).M
    torch.manual_seed(1)
    N, H, T, d, h = 1, 2, 11, 8, 8
    q, k = (torch.nn.functional.normalize(torch.randn(N, H, T, d), dim=-1) for _ in "qk")
    v, lr = torch.randn(N, H, T, d), 0.5 * torch.rand(N, H, T)
    retain, beta = 0.5 + 0.5 * torch.rand(N, H, T), 0.5 + 0.5 * torch.rand(N, H, T)
    retain[..., 3], retain[..., 5], beta[..., 2], beta[..., 6] = 1e-6, 0.0, 1e-8, 0.0
    A, B = 0.5 * torch.randn(N, H, d, h), 0.5 * torch.randn(N, H, h, d)
    S = (0.1 * torch.randn(N, H, d, h), 0.1 * torch.randn(N, H, h, d))
    dy = torch.randn(N, H, T, d)
    grads = {}
    for tier, dtype in (("_reference", torch.float64), ("_chunked", torch.float32)):
        r, b = (x.to(dtype).requires_grad_() for x in (retain, beta))
        w = {"k": k.to(dtype), "v": v.to(dtype), "lr": lr.to(dtype),
             "retain": r if "retain" in MLP_CASES[case][1] else None, "beta": b}
        A0, B0 = A.to(dtype), B.to(dtype)
        given = {"M": (A0, B0), "S": tuple(x.to(dtype) for x in S), "start": (A0, B0),
                 "offset": 0}
        y, out = getattr(mem, tier)(q.to(dtype), w, given)
        loss = (y.double() * dy).sum() + sum(x.double().sum() for x in out["M"])
        grads[tier] = torch.autograd.grad(loss, [r, b] if w["retain"] is not None else [b])
    for want, got in zip(grads["_reference"], grads["_chunked"], strict=True):
        for t in (2, 3, 5, 6):
            a, b = got[..., t].double(), want[..., t]
            assert (a - b).abs().max() <= 1e-3 * b.abs().max(), (t, a, b)


@pytest.mark.parametrize("case", ["dgd_literal", "dgd_literal_huber_clip_before",
                                  "dgd_literal_momentum", "dgd_literal_momentum_clip_before"])
@pytest.mark.parametrize("tier", ["_reference", "_chunked"])
def test_literal_dgd_mlp_memory_is_the_papers_update_per_layer(case, tier):
    """`dgd literal` on an MLP memory, written out by hand from docs/semantics.md: token t
    of a chunk that began at weights (A0, B0) does A <- (r I - lr k k^T) A - lr gA and
    B <- (r I - lr h h^T) B - lr gB, with h = act(k A0) and (gA, gB) the objective's
    gradient at (A0, B0) (autograd here), scaled to norm at most clip. With momentum
    (`beta`), the momenta P <- beta P - lr g take the place of - lr g."""
    mem = mlp_variant(case).build("Deep", dim=16).M
    torch.manual_seed(1)
    N, H, T, d, h = 2, 2, 7, 8, 8
    q, k = (torch.nn.functional.normalize(torch.randn(N, H, T, d), dim=-1) for _ in "qk")
    v, lr = torch.randn(N, H, T, d), 0.5 * torch.rand(N, H, T)
    keep = 0.8 + 0.2 * torch.rand(N, H, T)
    A, B = 0.5 * torch.randn(N, H, d, h), 0.5 * torch.randn(N, H, h, d)
    retain = keep if "retain" in MLP_CASES[case][1] else None
    beta = torch.rand(N, H, T) if mem.momentum else None
    S = [0.1 * torch.randn(N, H, d, h), 0.1 * torch.randn(N, H, h, d)] if mem.momentum else \
        [torch.zeros(N, H, d, h), torch.zeros(N, H, h, d)]
    w = {"k": k, "v": v, "lr": lr, "retain": retain, "beta": beta}
    given = {"M": (A, B), "S": tuple(S), "start": (A, B), "offset": 0}
    y, out = getattr(mem, tier)(q, w, given)

    def read(x, A, B):  # one token's x (N, H, d)
        return (mem.act(x[..., None, :] @ A) @ B)[..., 0, :] + (x if mem.residual else 0)

    outs, (Ai, Bi) = [], (A, B)
    for t in range(T):
        if t % mem.chunk == 0:
            A0, B0 = Ai, Bi
        if mem.read_before:
            outs.append(read(q[:, :, t], Ai, Bi))
        P, Q = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        e = read(k[:, :, t], P, Q) - v[:, :, t]
        loss = 0.5 * e.pow(2) if mem.objective == "l2" else \
            torch.nn.functional.huber_loss(e, torch.zeros_like(e), reduction="none",
                                           delta=mem.delta)
        gA, gB = torch.autograd.grad(loss.sum(), (P, Q))
        f = torch.ones(N, H) if mem.clip is None else \
            (mem.clip / (gA.pow(2).sum((-2, -1)) + gB.pow(2).sum((-2, -1))).sqrt()).clamp(max=1)
        eta = lr[:, :, t, None, None]
        r = 1.0 if retain is None else retain[:, :, t, None, None]
        kt = k[:, :, t]
        ht = mem.act(kt[..., None, :] @ A0)[..., 0, :]
        f = f[..., None, None]
        if beta is None:
            step = (-eta * f * gA, -eta * f * gB)
        else:
            S = [beta[:, :, t, None, None] * m - eta * f * g for m, g in zip(S, (gA, gB))]
            step = (S[0], S[1])
        Ai = r * Ai - eta * (kt[..., :, None] * kt[..., None, :]) @ Ai + step[0]
        Bi = r * Bi - eta * (ht[..., :, None] * ht[..., None, :]) @ Bi + step[1]
        if not mem.read_before:
            outs.append(read(q[:, :, t], Ai, Bi))
    close(y, torch.stack(outs, 2))
    close(out["M"][0], Ai)
    close(out["M"][1], Bi)
    if beta is not None:
        close(out["S"][0], S[0])
        close(out["S"][1], S[1])
    assert out["offset"] == T % mem.chunk


@pytest.mark.parametrize("scale", ["1e-2", "1e-5", "3e-6"])
@pytest.mark.parametrize("case", ["dgd_literal", "dgd_literal_momentum_clip_before"])
def test_literal_dgd_retention_gradient_is_float32_accurate_when_it_is_small(case, scale):
    """The retention's gradient of a forgetful DGD memory (retain ~ 1e-5) is itself tiny:
    taken through differences of running sums of log r, float32 rounding of terms of size 1
    left it 3 to 27% off the reference (exact in float64); as sums of their own terms the
    chunked tier is as close to float64 as the reference tier is. Likewise a momentum that
    forgets almost all (beta ~ 1e-5)."""
    structure, clauses = MLP_CASES[case]
    text = MLP_TEMPLATE.replace("STRUCTURE", structure).replace("CLAUSES", clauses).replace(
        "let keep = x |> linear(1) |> sigmoid", f"let keep = {scale} * sigmoid(linear(x, 1))")
    prog = nestc.loads(text, "m.nest")
    ref, fast = pair(prog, "Deep", dim=16)
    x = torch.randn(2, 21, 16)
    want = copy.deepcopy(ref).double()
    grads = []
    for m, xs in ((want, x.double()), (fast, x)):
        y = m(xs)
        (y * y.detach().sin()).sum().backward()
        grads.append(m.keep_linear.weight.grad)
    close(grads[1].double(), grads[0], tol=1e-5, atol=0)


def test_paper_dgd_switches_hopes_projection_memories_and_its_benchmark_runs():
    """HopeLM's `paper_dgd` (an `if` in each projection memory's body) puts self-modifying
    Titans' four projection memories, and only those, under `dgd literal`; the default keeps
    them on gd with retention. benchmarks/smt_dgd.py times them (and DGD with momentum) at
    tiny sizes."""
    hope = nestc.load("std/models/hope.nest")
    for on in (False, True):
        model = hope.build("HopeLM", vocab=20, dim=16, depth=1, heads=2, paper_dgd=on)
        literal = sorted(name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, MLPMemory) and m.literal)
        assert literal == (["M_alpha", "M_eta", "M_k", "M_v"] if on else [])
    out = run_benchmark("smt_dgd.py", "--dim", "16", "--batch", "2", "--T", "8", "--reps", "1",
                        "--warmup", "0", "--threads", "1")
    rows = [ln.split("|")[1].strip() for ln in out.splitlines()
            if ln.startswith("| ") and not ln.startswith("| ---")]
    assert rows == ["projection memories' rule", "gd with retention (default)",
                    "dgd literal (paper_dgd)", "dgd literal with momentum 0.9 (momentum_beta)"], \
        out


def test_stopped_backprop_keeps_gradients_off_the_writes():
    _, fast = pair(variant("stopped"), "Mem", dim=16)
    fast(torch.randn(1, 9, 16)).sum().backward()
    # k and lr feed only the memory's writes: with backprop stopped they learn nothing
    assert fast.k_linear.weight.grad is None and fast.lr_linear.weight.grad is None
    assert fast.q_linear.weight.grad is not None


def test_meta_initial_state_is_learned():
    _, fast = pair(variant("before"), "Mem", dim=16)
    fast(torch.randn(1, 5, 16)).sum().backward()
    assert fast.M.initial.grad is not None and fast.M.initial.grad.abs().sum() > 0


@pytest.mark.parametrize("prog,name,hyper", [
    (DELTANET, "GatedDeltaNet", {"dim": 16}),
    (variant("before"), "Mem", {"dim": 16}),
    (TRANSFORMER, "TransformerLM", {"dim": 16, "depth": 2, "vocab": 11}),
    (TITANS, "Titans", {"dim": 16, "chunk": 4}),  # pieces end inside chunks
    (mlp_variant("dgd_retain_before"), "Deep", {"dim": 16}),
])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_streaming_in_pieces_equals_one_pass(prog, name, hyper, backend):
    torch.manual_seed(0)
    mod = prog.build(name, backend=backend, **hyper)
    x = (torch.randint(0, 11, (2, 29)) if name == "TransformerLM" else torch.randn(2, 29, 16))
    streams_as_one(mod, x, (5, 6, 23))


def test_state_dict_keys_are_the_same_on_every_backend_and_copies_are_independent():
    ref = TRANSFORMER.build("TransformerLM", backend="reference", dim=16, depth=2, vocab=11)
    fast = TRANSFORMER.build("TransformerLM", backend="chunked", dim=16, depth=2, vocab=11)
    assert list(ref.state_dict()) == list(fast.state_dict())
    twin = copy.deepcopy(fast)
    x = torch.randint(0, 11, (1, 7))
    before = fast(x)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert torch.equal(fast(x), before)  # the copy runs its own weights
    assert not torch.equal(twin(x), before)


def test_transformer_lm_learns_to_copy():
    torch.manual_seed(0)
    model = TRANSFORMER.build("TransformerLM", vocab=12, dim=32, depth=2, heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):  # second half of each sequence repeats the first half
        half = torch.randint(2, 12, (16, 8))
        tokens = torch.cat([half, half], 1)
        logits = model(tokens)[:, 7:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 12),
                                                 tokens[:, 8:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (logits.argmax(-1) == tokens[:, 8:]).float().mean().item()
    assert acc > 0.9, (loss.item(), acc)


def test_unsupported_memories_and_shape_errors_name_the_spec():
    literal_dot = nestc.loads(TEMPLATE.replace("INIT", "zeros").replace(
        "CLAUSES", "dgd literal; objective dot(M(k), v); rule dgd(lr = lr)"), "m.nest")
    with pytest.raises(nestc.NestError, match="literal DGD with a dot objective") as info:
        literal_dot.build("Mem", dim=16)
    assert info.value.unsupported and "m.nest:8:5" in str(info.value)
    shared_beta = nestc.loads(TEMPLATE.replace("INIT", "zeros").replace(
        "CLAUSES", "state shared; objective l2(M(k), v); rule dgd(lr = lr, beta = keep)"),
        "m.nest")
    with pytest.raises(nestc.NestError, match="`beta` that changes with the data") as info:
        shared_beta.build("Mem", dim=16)
    assert info.value.unsupported and "m.nest:9:" in str(info.value)
    bad = nestc.loads(spec("""
        block B(dim) {
            input x : [T, dim]
            let k = x |> linear(dim)
            memory M : matrix(3, 3) per head = zeros every token {
                objective l2(M(k), k); rule gd(lr = 1)
            }
            output M(k)
        }
    """), "bad.nest")
    with pytest.raises(nestc.NestError) as info:
        bad.build("B", dim=16)
    assert "bad.nest:4:5" in str(info.value) and "matrix(3, 3)" in str(info.value)
    with pytest.raises(ValueError, match="backend"):
        DELTANET.build("DeltaNet", dim=16, backend="fast")


CMS_LM = spec("""
    import "std/memory/cms.nest"
    from "std/optim/adam.nest" import AdamW
    model CMSLM(vocab = 20, dim = 16, chunks = [4, 8], lr = 0.1) {
        input tokens : [T] int
        let h = embed(tokens, vocab, dim)
        h = h + CMS(dim, chunks = chunks, lr = lr)(rmsnorm(h))
        output logits = h |> rmsnorm |> linear(vocab)
        train every step {
            objective cross_entropy(logits, next(tokens))
            rule AdamW(lr = 1e-3)
        }
    }
""")


def cms_lm(tmp_path, **hyper):
    (tmp_path / "cmslm.nest").write_text(CMS_LM)
    torch.manual_seed(0)
    return nestc.load(tmp_path / "cmslm.nest").build("CMSLM", **hyper)


def test_cms_level_updates_by_gd_on_the_task_loss_of_its_chunk(tmp_path):
    model = cms_lm(tmp_path, chunks=[4], lr=0.5)
    level = model.CMS.c0_f
    x = torch.randint(0, 20, (2, 8))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    y = model(x)
    # by hand: the first chunk runs with the meta-learned weights; their gradient of the summed
    # cross-entropy of its 4 tokens (per sample) makes the weights of the second chunk
    A, B = (w.expand(2, -1, -1) for w in (level.A, level.B))
    state = {"CMS.c0_f": {"W": (A, B), "grad": None, "offset": 0}}
    first = model(x[:, :4], state=state, targets=targets[:, :4])
    loss = torch.nn.functional.cross_entropy(first.flatten(0, 1), targets[:, :4].flatten(),
                                             reduction="sum")
    gA, gB = torch.autograd.grad(loss, (A, B))
    state = {"CMS.c0_f": {"W": (A - 0.5 * gA, B - 0.5 * gB), "grad": None, "offset": 0}}
    second = model(x[:, 4:], state=state, targets=targets[:, 4:])
    close(y[:, :4], first)
    close(y[:, 4:], second)
    assert (y[:, 4:] - model(x[:, 4:], state={"CMS.c0_f": {"W": (A, B), "grad": None,
                                                          "offset": 0}})).abs().max() > 1e-4


def test_cms_streaming_with_targets_equals_one_pass_and_learns_through_updates(tmp_path):
    model = cms_lm(tmp_path)
    x = torch.randint(0, 20, (2, 19))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    streams_as_one(model, x, (3, 9), targets)
    whole = model(x, targets=targets)
    twin = copy.deepcopy(model)  # a copy learns in context with its own levels
    assert [id(m) for m in twin.tasks] == [id(twin.CMS.c0_f), id(twin.CMS.c1_f)]
    whole.sum().backward()  # the outer level trains the initial weights through the updates
    assert model.CMS.c1_f.A.grad is not None and model.CMS.c1_f.A.grad.abs().sum() > 0


def test_task_memories_need_a_task(tmp_path):
    cms = nestc.load("std/memory/cms.nest").build("CMS", dim=8)
    with pytest.raises(nestc.NestError, match="task"):
        cms(torch.randn(1, 5, 8))
    y = cms(torch.randn(1, 5, 8), task=lambda y, a, b: y.pow(2).sum())
    assert y.shape == (1, 5, 8)


SMT = nestc.load("std/memory/self_modifying_titans.nest")
HOPE = nestc.load("std/models/hope.nest")


@pytest.mark.parametrize("T", [1, 7, 21])
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("paper", [False, True])
def test_self_modifying_titans_chunked_equals_reference(T, beta, paper):
    # two chunk sizes, pieces of neither: self-generated targets at each chunk's first state;
    # with and without the momentum of the paper's ablation; Titans' main memory or the paper's
    ref, fast = pair(SMT, "SelfModifyingTitans", dim=16, heads=2, chunk=4, memory_chunk=8,
                     momentum_beta=beta, paper_memory=paper)
    compare(ref, fast, torch.randn(2, T, 16))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_self_modifying_titans_streams(backend):
    torch.manual_seed(0)
    mod = SMT.build("SelfModifyingTitans", backend=backend, dim=16, heads=2, chunk=4,
                    memory_chunk=8)
    x = torch.randn(2, 19, 16)
    whole = mod(x)
    state, pieces = None, []
    for a, b in [(0, 3), (3, 10), (10, 19)]:
        y, state = mod(x[:, a:b], state=state, return_state=True)
        pieces.append(y)
    close(torch.cat(pieces, 1), whole)


def test_a_memory_value_or_key_named_by_its_own_let_equals_it_written_out():
    body = """
        block B(dim) {
            input x : [T, dim]
            let v = x |> linear(dim)
            memory M : residual_mlp(dim / 2) per head = meta every token in chunks of 4 {
                LET
                key x; value VALUE
                objective l2(M(x), VALUE)
                rule gd(lr = 0.5)
            }
            output M(x)
        }
    """
    direct = nestc.loads(spec(body.replace("LET", "").replace("VALUE", "2 * v")), "a.nest")
    named = nestc.loads(spec(body.replace("LET", "let target = 2 * v").replace(
        "VALUE", "target")), "b.nest")
    # a key may name a let too
    key = nestc.loads(spec(body.replace("LET", "let kk = x + 0").replace("key x", "key kk")
                           .replace("M(x), VALUE", "M(kk), VALUE").replace("VALUE", "2 * v")),
                      "c.nest")
    x = torch.randn(2, 9, 8)
    for backend in ("reference", "chunked"):
        torch.manual_seed(0)
        a = direct.build("B", dim=8, backend=backend)
        for other in (named, key):
            b = other.build("B", dim=8, backend=backend)
            b.load_state_dict(a.state_dict())
            close(b(x), a(x))
    selfkey = nestc.loads(spec(body.replace("LET", "let kk = M(x)").replace("key x", "key kk")
                               .replace("M(x), VALUE", "M(kk), VALUE").replace("VALUE", "v")),
                          "d.nest")
    with pytest.raises(nestc.NestError, match="key that reads memory `M` itself"):
        selfkey.build("B", dim=8)


def test_hope_lm_builds_and_trains_its_initial_states_through_cms_updates():
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 11))
    logits = model(x)
    assert logits.shape == (2, 11, 20)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # every weight reaches the loss (the projection memories' targets are under stop_grad,
    # but k, v, eta and alpha, which they learn from, are their own reads)
    untrained = sorted(n for n, g in grads.items() if g is None)
    assert not untrained, untrained
    assert all(grads[n].abs().sum() > 0 for n in grads if "CMS" in n)


def test_the_papers_main_memory_learns_toward_its_own_reading_of_v():
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, paper_memory=True)
    assert "theta_linear.weight" not in dict(smt.named_parameters())
    smt(torch.randn(2, 9, 16)).pow(2).sum().backward()
    # v reaches the output only through the memories' targets, which are under stop_grad:
    # the value memory and v's convolution get no outer gradient (docs/semantics.md says so)
    untrained = {n for n, p in smt.named_parameters() if p.grad is None}
    assert untrained == {"M_v.A", "M_v.B", "v_conv1d.conv.weight"}, untrained


def test_check_finite_names_the_memory_whose_update_blew_up():
    blowup = nestc.loads(TEMPLATE.replace("INIT", "zeros").replace(
        "CLAUSES", "objective l2(M(k), v); rule gd(lr = 1e30)"), "boom.nest")
    x = torch.randn(1, 6, 16)
    assert not blowup.build("Mem", dim=16)(x).isfinite().all()  # off by default: no check
    with pytest.raises(FloatingPointError, match=r"boom.nest:8:5: memory `M` has NaN or inf"):
        blowup.build("Mem", dim=16, check_finite=True)(x)


@pytest.mark.parametrize("clauses", [
    "objective l2(M(k), v); rule dgd(lr = lr, retain = 0.0 * keep)",
    "objective dot(M(k), v); rule gd(lr = lr, retain = 0.0 * keep)",
    "objective l2(M(k), v); rule gd(lr = lr, retain = 0.0 * keep)",
])
def test_zero_retention_forgets_on_both_tiers(clauses):
    prog = nestc.loads(TEMPLATE.replace("INIT", "zeros").replace("CLAUSES", clauses), "z.nest")
    ref, fast = pair(prog, "Mem", dim=16)
    x = torch.randn(2, 21, 16)
    a, b = ref(x), fast(x)
    assert b.isfinite().all()
    close(a, b, tol=1e-3)  # gd divides by the retention, taken as at least 1e-6 there


def test_empty_pieces_pass_the_state_through():
    for prog, name, hyper, x in [
            (TRANSFORMER, "TransformerLM", {"dim": 16, "depth": 1, "vocab": 11, "window": 3},
             torch.randint(0, 11, (2, 5))),
            (TITANS, "Titans", {"dim": 16, "chunk": 4}, torch.randn(2, 5, 16)),
            (DELTANET, "GatedDeltaNet", {"dim": 16}, torch.randn(2, 5, 16))]:
        mod = prog.build(name, **hyper)
        y, state = mod(x, return_state=True)
        empty, same = mod(x[:, :0], state=state, return_state=True)
        assert empty.shape[:2] == (2, 0) and same.keys() == state.keys()
        # no state tensor is a view keeping a larger activation alive (conv1d's window and a
        # windowed cache kept their whole input, 30 times the state in a checkpoint)
        for t in leaves(state):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), t.shape
        # an empty batch too (every stateful model crashed in a reshape of 0 elements)
        none, kept = mod(x[:0], return_state=True)
        assert none.shape == (0, 5, y.shape[-1]) and kept == {}


@pytest.mark.parametrize("text,message", [
    ("block B(dim, heads = 5) {\n    input x : [T, dim]\n    let q = x |> linear(dim)\n"
     "    memory M : matrix(dim / heads, dim / heads) per head = zeros every token {\n"
     "        objective l2(M(q), q); rule gd(lr = 1)\n    }\n    output M(q)\n}\n",
     "b.nest:4:23: error: a matrix memory's size must be a whole number of at least 1, got 2.4"),
    ("block B(dim) {\n    input x : [T, dim]\n    output outer(x, x)\n}\n",
     "b.nest:3:18: error: `outer` of a sequence (it takes a param's vector) is not supported"),
    ("block B(dim) {\n    input x : [T, dim]\n    input y : [T, dim]\n    output x\n}\n",
     "b.nest:3:5: error: a second input (`y`) is not supported"),
    ("block B(dim) {\n    input x : [T, dim]\n    output conv1d(x, window = 0)\n}\n",
     "b.nest:3:31: error: a conv1d window must be a whole number of at least 1, got 0"),
    ("block B(dim) {\n    input x : [T, dim]\n    output embed(x, 10, dim)\n}\n",
     "b.nest:3:18: error: embed takes token ids"),
    ("block B(dim) {\n    input x : [T, dim]\n    let k = x |> linear(dim)\n"
     "    memory C : cache every 2 tokens { key k; value k }\n"
     "    output softmax_attention(k, C)\n}\n",
     "b.nest:4:22: error: a cache written other than `every token` is not supported"),
    ("block B(dim) {\n    input x : [T, dim]\n    let k = x |> linear(dim)\n"
     "    memory M : matrix(dim, dim) = zeros every token {\n"
     "        objective l2(M(k), k); rule gd(lr = 1, retain = 1.5)\n    }\n    output M(k)\n}\n",
     "b.nest:5:57: error: `retain` of memory `M` is in (0, 1], got 1.5"),
])
def test_block_errors_have_spans(text, message):
    with pytest.raises(nestc.NestError) as info:
        nestc.loads(text, "b.nest").build("B", dim=12)
    assert str(info.value).startswith(message), str(info.value)


def test_a_cms_level_read_twice_learns_from_both_reads(tmp_path):
    (tmp_path / "twice.nest").write_text(spec("""
        from "std/optim/adam.nest" import AdamW
        model Twice(vocab = 20, dim = 16) {
            input tokens : [T] int
            let h = embed(tokens, vocab, dim)
            memory f : mlp(dim, hidden = 32) = meta every 4 tokens {
                objective task; rule gd(lr = 0.5)
            }
            h = h + f(h)
            h = h + f(h)
            output logits = h |> linear(vocab)
            train every step { objective cross_entropy(logits, next(tokens)); rule AdamW() }
        }
    """))
    torch.manual_seed(0)
    model = nestc.load(tmp_path / "twice.nest").build("Twice")
    x = torch.randint(0, 20, (2, 8))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    y = model(x)
    A, B = (w.expand(2, -1, -1) for w in (model.f.A, model.f.B))
    first = model(x[:, :4], state={"f": {"W": (A, B), "grad": None, "offset": 0}},
                  targets=targets[:, :4])
    loss = torch.nn.functional.cross_entropy(first.flatten(0, 1), targets[:, :4].flatten(),
                                             reduction="sum")
    gA, gB = torch.autograd.grad(loss, (A, B))
    second = model(x[:, 4:], state={"f": {"W": (A - 0.5 * gA, B - 0.5 * gB), "grad": None,
                                          "offset": 0}}, targets=targets[:, 4:])
    close(y[:, 4:], second)


def test_a_task_loss_of_another_form_is_reported_where_it_is_written(tmp_path):
    (tmp_path / "mse.nest").write_text(CMS_LM.replace(
        "objective cross_entropy(logits, next(tokens))", "objective l2(logits, logits)"))
    model = nestc.load(tmp_path / "mse.nest").build("CMSLM")
    x = torch.randint(0, 20, (1, 6))
    with pytest.raises(nestc.NestError) as info:
        model(x)
    assert info.value.unsupported and "mse.nest:9:9:" in str(info.value)
    # the caller's task loss is the way around it
    assert model(x, task=lambda y, start, stop: y.pow(2).sum()).shape == (1, 6, 20)


CMS_PROG = nestc.load("std/memory/cms.nest")


@pytest.mark.parametrize("prog,name", [(HOPE, "Hope"), (HOPE, "HopeAttention"),
                                       (CMS_PROG, "CMS"), (CMS_PROG, "CMSIndependent"),
                                       (CMS_PROG, "CMSNested")])
def test_hope_and_cms_blocks_chunked_equal_reference_with_a_task(prog, name):
    hyper = {"dim": 16, "chunks": [4, 8]}
    if name == "Hope":
        hyper["heads"] = 2
    ref, fast = pair(prog, name, **hyper)
    x = torch.randn(2, 11, 16)
    task = lambda y, a, b: (y - x[:, a:b]).pow(2).sum()  # noqa: E731 - a stand-in task loss
    ya, yb = ref(x, task=task), fast(x, task=task)
    close(ya, yb)
    ya.pow(2).mean().backward()
    yb.pow(2).mean().backward()
    for p, q in zip(ref.parameters(), fast.parameters()):
        zero = torch.zeros_like(p)
        close(zero if p.grad is None else p.grad, zero if q.grad is None else q.grad)


def test_causal_conv1d_equals_torch_conv1d_with_left_padding():
    from nestc.layers import CausalConv1d
    from nestc.module import State

    torch.manual_seed(0)
    conv = CausalConv1d(6, 4)
    x = torch.randn(2, 9, 6)
    want = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)),
                                      conv.conv.weight, groups=6).transpose(1, 2)
    close(conv(x, State(None)), want)


def nested_task(x):
    return lambda y, a, b: (y - x[:, a:b]).pow(2).sum()  # a stand-in task loss


def test_nested_cms_slow_level_learns_the_fast_levels_start_through_its_updates():
    torch.manual_seed(0)
    cms = CMS_PROG.build("CMSNested", dim=8, chunks=[2, 4], lr=0.1)
    x = torch.randn(2, 8, 8)
    task = nested_task(x)
    y, state = cms(x[:, :4], task=task, return_state=True)
    # by hand: the fast level starts from the slow level's weights and takes a gd step on its
    # first chunk; the slow level's step is the gradient of the loss of its whole chunk through
    # those reads and that update (second order)
    A, B = (w.expand(2, -1, -1) for w in (cms.slow.A, cms.slow.B))
    mlp = lambda h, a, b: torch.nn.functional.gelu(h @ a) @ b  # noqa: E731
    first = mlp(x[:, :2], A, B)
    gA, gB = torch.autograd.grad(task(first, 0, 2), (A, B), create_graph=True)
    second = mlp(x[:, 2:4], A - 0.1 * gA, B - 0.1 * gB)
    close(y, torch.cat([first, second], 1))
    sA, sB = torch.autograd.grad(task(first, 0, 2) + task(second, 2, 4), (A, B))
    close(state["slow"]["W"][0], A - 0.1 * sA)
    close(state["slow"]["W"][1], B - 0.1 * sB)
    # at the slow level's next chunk the fast level restarts from the slow level's new weights,
    # whatever it had learned
    later = cms(x[:, 4:6], task=task, state=state)
    close(later, mlp(x[:, 4:6], *state["slow"]["W"]))
    forgot = {**state, "fast": {**state["fast"], "W": tuple(torch.zeros_like(w) for w in
                                                            state["fast"]["W"])}}
    close(cms(x[:, 4:6], task=task, state=forgot), later)


def test_nested_cms_streams_and_trains_its_meta_weights():
    torch.manual_seed(0)
    cms = CMS_PROG.build("CMSNested", dim=8, chunks=[2, 4], lr=0.01)
    x = torch.randn(2, 11, 8)
    whole, final = cms(x, task=nested_task(x), return_state=True)
    state, pieces = None, []
    for a, b in [(0, 3), (3, 9), (9, 11)]:
        piece = x[:, a:b]
        y, state = cms(piece, state=state, return_state=True,
                       task=lambda y, s, e, a=a: nested_task(x)(y, s + a, e + a))
        pieces.append(y)
    close(torch.cat(pieces, 1), whole)
    for u, v in zip(leaves(final), leaves(state), strict=True):
        close(u, v)
    with torch.no_grad():  # evaluation: the slow level's gradient still runs through the fast's
        close(cms(x, task=nested_task(x)), whole)
    whole.pow(2).sum().backward()
    assert cms.slow.A.grad is not None and cms.slow.A.grad.abs().sum() > 0
    assert [name for name, _ in cms.named_parameters()] == ["slow.A", "slow.B"]


@pytest.mark.parametrize("init,chunk,message", [
    ("slow", "3", "not a whole number of its chunks"),
    ("other", "2", "another structure"),
    ("x", "2", "not `meta` or another task-loss memory"),
])
def test_nested_cms_errors(init, chunk, message):
    prog = nestc.loads(f"""
    block B(dim) {{
        input x : [T, dim]
        memory slow : mlp(dim, hidden = 4) = meta every 4 tokens {{ objective task; rule gd }}
        memory other : mlp(dim, hidden = 8) = meta every 4 tokens {{ objective task; rule gd }}
        memory fast : mlp(dim, hidden = 4) = {init} every {chunk} tokens {{
            objective task; rule gd
        }}
        output fast(x) + other(x) + slow(x)
    }}
    """, "n.nest")
    with pytest.raises(nestc.NestError, match=message) as err:
        prog.build("B", dim=8)
    assert err.value.span is not None and err.value.span.line == 6


def test_task_memories_learn_in_context_without_grad_mode(tmp_path):
    model = cms_lm(tmp_path, chunks=[2, 4], lr=0.5)
    x = torch.randint(0, 20, (2, 9))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        y, state = model(x, return_state=True)
        # pieces that end where the slowest level's chunk does (see docs/semantics.md)
        _, first = model(x[:, :4], return_state=True, targets=targets[:, :4])
        again = model(x[:, 4:], state=first, targets=targets[:, 4:])
    close(y, model(x).detach())
    close(again, y[:, 4:])
    assert not y.requires_grad and state["CMS.c0_f"]["offset"] == 1


def test_a_levels_state_is_its_own_not_a_view_of_its_parameters(tmp_path):
    """A chunk not yet full keeps the weights it started from: a copy of the meta-learned
    ones, not a view that an optimizer step (or FSDP freeing the storage) would change."""
    model = cms_lm(tmp_path, chunks=[4], lr=0.5)
    _, state = model(torch.randint(0, 20, (2, 3)), return_state=True)
    A = state["CMS.c0_f"]["W"][0]
    before = A.detach().clone()
    with torch.no_grad():
        model.CMS.c0_f.A.add_(1.0)
    close(A, before)


def test_a_slow_levels_gradient_is_local_to_each_piece(tmp_path):
    # the slow level (chunk 4) sums, over the two pieces of its chunk, each piece's gradient
    # with what came in from earlier pieces (here the fast level's updated weights) held fixed
    model = cms_lm(tmp_path, chunks=[2, 4], lr=0.5)
    x = torch.randint(0, 20, (2, 4))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    _, state = model(x, return_state=True)
    fast, slow = model.CMS.c0_f, model.CMS.c1_f

    def leaf(*ws):
        return tuple(w.detach().clone().requires_grad_() for w in ws)

    def piece(a, b, W0, W1):
        given = {"CMS.c0_f": {"W": W0, "grad": None, "offset": 0},
                 "CMS.c1_f": {"W": W1, "grad": None, "offset": a % 4}}
        y = model(x[:, a:b], state=given, targets=targets[:, a:b])
        return torch.nn.functional.cross_entropy(y.flatten(0, 1), targets[:, a:b].flatten(),
                                                 ignore_index=-100, reduction="sum")

    expand = lambda m: (m.A.expand(2, -1, -1), m.B.expand(2, -1, -1))  # noqa: E731
    W0, W1 = leaf(*expand(fast)), leaf(*expand(slow))
    g0 = torch.autograd.grad(piece(0, 2, W0, W1), W0 + W1)
    W0b = tuple(w - 0.5 * g for w, g in zip(W0, g0[:2]))
    W1b = leaf(*W1)
    g1 = torch.autograd.grad(piece(2, 4, leaf(*W0b), W1b), W1b)
    for w, a, b, got in zip(W1, g0[2:], g1, state["CMS.c1_f"]["W"]):
        close(got, w - 0.5 * (a + b))


def test_clip_bounds_each_tokens_update():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    outs = []
    for clip in ("", ", clip = 1e-3"):
        prog = nestc.loads(MLP_TEMPLATE.replace("STRUCTURE", "mlp(dim / heads, hidden = 8)")
                           .replace("CLAUSES", f"objective l2(M(k), v); rule gd(lr = lr{clip})"),
                           "m.nest")
        torch.manual_seed(1)
        mod = prog.build("Deep", dim=16)
        y, state = mod(x, return_state=True)
        outs.append((y, state["M"]["M"], mod.M.A))
    (y0, _, _), (y1, (A, _), A0) = outs
    assert (y0 - y1).abs().max() > 1e-4
    # 6 updates of norm at most lr * clip (lr < 0.5): the weights moved by at most 3e-3
    assert (A - A0).flatten(2).norm(dim=-1).max() <= 6 * 0.5 * 1e-3 + 1e-6


def test_clip_must_be_positive_and_memories_every_n_tokens_take_it():
    text = """
    block B(dim) {
        input x : [T, dim]
        memory M : matrix(dim, dim) = zeros EVERY {
            key x; value x; objective l2(M(x), x); rule gd(lr = 0.1, clip = CLIP)
        }
        output M(x)
    }
    """
    periodic = nestc.loads(text.replace("EVERY", "every 4 tokens").replace("CLIP", "1.0"),
                           "c.nest")
    assert periodic.build("B", dim=4).M.clip == 1.0
    zero = nestc.loads(text.replace("EVERY", "every token").replace("CLIP", "0"), "c.nest")
    with pytest.raises(nestc.NestError, match=r"c.nest:5:77: error: `clip` of memory `M` must be "
                                              r"positive, got 0"):
        zero.build("B", dim=4)


def test_a_level_with_backprop_stopped_trains_first_order():
    prog = nestc.loads("""
    from "std/optim/adam.nest" import AdamW
    model M(vocab = 20, dim = 8) {
        input tokens : [T] int
        let h = embed(tokens, vocab, dim)
        memory f : mlp(dim, hidden = 16) = meta every 2 tokens {
            objective task; rule gd(lr = 0.5); backprop stopped
        }
        output logits = (h + f(h)) |> linear(vocab)
        train every step { objective cross_entropy(logits, next(tokens)); rule AdamW }
    }
    """, "s.nest")
    torch.manual_seed(0)
    model = prog.build("M")
    model(torch.randint(0, 20, (2, 7))).sum().backward()  # the graph outlives the updates
    assert model.f.A.grad is not None and model.f.A.grad.abs().sum() > 0


def test_a_momentum_rule_with_beta_zero_is_plain_gd():
    x = torch.randn(2, 9, 16)
    outs = []
    for rule in ("momentum(lr = lr, beta = 0.0, retain = keep)", "gd(lr = lr, retain = keep)"):
        prog = nestc.loads(MLP_TEMPLATE.replace("STRUCTURE", "mlp(dim / heads, hidden = 8)")
                           .replace("CLAUSES", f"objective l2(M(k), v); rule {rule}"), "m.nest")
        torch.manual_seed(0)
        mod = prog.build("Deep", dim=16)
        assert not mod.M.momentum
        outs.append(mod(x))
    close(outs[0], outs[1])


@pytest.mark.parametrize("clauses,message", [
    ("objective l2(M(k), v); rule gd(lr = lr, clip = 0.0)", "`clip` of memory `M` must be"),
    ("objective huber(M(k), v, delta = -1); rule gd(lr = lr)", "huber `delta` of memory `M`"),
])
def test_clip_and_huber_delta_must_be_positive(clauses, message):
    prog = nestc.loads(MLP_TEMPLATE.replace("STRUCTURE", "mlp(dim / heads, hidden = 8)")
                       .replace("CLAUSES", clauses), "m.nest")
    with pytest.raises(nestc.NestError, match=message) as err:
        prog.build("Deep", dim=16)
    assert err.value.span is not None


@pytest.mark.parametrize("path,name", [
    ("std/models/hope.nest", "HopeLM"), ("std/models/titans.nest", "TitansLM"),
    ("std/models/deltanet.nest", "DeltaNetLM"), ("std/models/transformer.nest", "TransformerLM"),
    ("examples/slow_fast.nest", "SlowFastLM"), ("examples/self_ref.nest", "SelfRefLM")])
def test_models_train_under_autocast_with_memories_in_float32(path, name):
    """torch.autocast (bfloat16 on the CPU): the layers compute in bfloat16, the memories'
    recurrences in float32 as without it; forward and backward run and stay finite."""
    from conftest import ROOT

    torch.manual_seed(0)
    model = nestc.load(ROOT / path if path.startswith("examples") else path).build(
        name, vocab=16, dim=16, depth=1, heads=2)
    tokens = torch.randint(0, 16, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(tokens, return_state=True)
    assert logits.dtype == torch.bfloat16
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    from nestc.memories import LinearMemory, PeriodicMemory

    memory_states = [t for path, sub in model.named_modules()
                     if isinstance(sub, (LinearMemory, MLPMemory, PeriodicMemory))
                     for t in leaves(state[path]) if t.dim() > 1]
    assert all(t.dtype == torch.float32 for t in memory_states)
    assert memory_states or name == "TransformerLM"  # its cache holds the layers' bfloat16
    close(logits.float(), model(tokens), tol=0.05)


@pytest.mark.parametrize("path,name", [("std/models/titans.nest", "TitansLM"),
                                       ("examples/slow_fast.nest", "SlowFastLM"),
                                       ("examples/self_ref.nest", "SelfRefLM")])
def test_blocks_take_activation_checkpointing(path, name):
    """torch's composable checkpoint on each block (hooks on a sub-block run, as it is
    called as a module): the same outputs and gradients, recomputed in the backward."""
    from conftest import ROOT
    from torch.distributed._composable import checkpoint

    prog = nestc.load(ROOT / path if path.startswith("examples") else path)
    torch.manual_seed(0)
    plain = prog.build(name, vocab=16, dim=16, depth=2, heads=2)
    saved = prog.build(name, vocab=16, dim=16, depth=2, heads=2)
    saved.load_state_dict(plain.state_dict())
    for child in saved.children():
        if isinstance(child, nestc.module.Built):
            checkpoint(child)
    tokens = torch.randint(0, 16, (2, 20))
    a, b = plain(tokens), saved(tokens)
    close(a, b)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    for p, q in zip(plain.parameters(), saved.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            close(p.grad, q.grad)


def same_outer_gradients(model, whole, streamed):
    """The outer level's gradients of one weighted sum of both outputs are the same."""
    w = torch.randn_like(whole)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad((whole * w).sum(), params),
                    torch.autograd.grad((streamed * w).sum(), params), strict=True):
        close(a, b)


def values_of(state):
    """A state's values: detached, with no piece going on and no evaluation's mark."""
    return {key: {k: v for k, v in entry.items() if k not in ("piece", "evaluation")}
            if isinstance(entry, dict) else entry
            for key, entry in nestc.module.detached(state).items()}


@pytest.mark.parametrize("cuts", [(5, 17), (1, 2, 3, 11)])
def test_hope_lm_fed_in_calls_cut_inside_its_levels_chunks_equals_one_pass(cuts):
    """A CMS level's gradient is local to its piece (docs/semantics.md), and a piece that a
    call ends inside goes on in the next call with the weights it used, so a second layer's
    memories, written by the first part of the piece, carry the level's gradient as in one
    pass: outputs, states and the outer level's gradients."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 23))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    whole = model(x, targets=targets)
    streamed = streams_as_one(model, x, cuts, targets)
    same_outer_gradients(model, whole, streamed)


@pytest.mark.parametrize("mode", ["enable_grad", "no_grad"])
@pytest.mark.parametrize("cuts", [(4, 8, 16), (5, 17), tuple(range(1, 23))])
def test_hope_lm_fed_in_calls_without_targets_equals_one_pass(mode, cuts):
    """Without targets a model's levels learn from next(tokens): a call's last token has its
    target in the next call, so its loss waits there (the state's "next token"), and its
    gradient joins its chunk's, or the update that chunk already made: fed in calls cut
    anywhere, token by token too (generation), the levels learn what one pass learns.
    Before, every call's last token went without a loss: token by token, none had one."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 23))
    with getattr(torch, mode)():
        whole, final = model(x, return_state=True)
        state, pieces, lost = None, [], None
        for a, b in zip((0, *cuts), (*cuts, 23)):
            if lost is None and a >= 4:  # a stream that drops the waiting loss, from here
                lost = model(x[:, a:], state={k: v for k, v in state.items()
                                              if k != nestc.module.NEXT})
            y, state = model(x[:, a:b], state=state, return_state=True)
            pieces.append(y)
    streamed = torch.cat(pieces, 1)
    close(streamed, whole)
    assert nestc.module.NEXT in state and nestc.module.NEXT in final
    waiting = state[nestc.module.NEXT]["y"]  # that token's logits alone, not its piece's
    assert waiting.untyped_storage().nbytes() == waiting.numel() * waiting.element_size()
    # a detached state (what nestc.train keeps and checkpoints) has no use for it
    assert nestc.module.NEXT not in nestc.module.detached(state)
    for a, b in zip(leaves(final), leaves(state), strict=True):
        close(a, b)
    assert (lost - whole[:, -lost.shape[1]:]).abs().max() > 1e-4
    if mode == "enable_grad":
        same_outer_gradients(model, whole, streamed)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("cuts", [(5, 17), tuple(range(1, 23))])
def test_hope_lm_evaluated_in_calls_cut_inside_its_levels_chunks_equals_one_pass(mode, cuts):
    """Without grad mode (and under inference mode, which autograd refuses outright: the
    levels' gradients run outside it) a call that ends inside the levels' piece returns a
    state that goes on with the piece's graph, so generating token by token computes what one
    pass does; a call that ends where the piece does returns no graph."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 23))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    with getattr(torch, mode)():
        whole, final = model(x, return_state=True, targets=targets)
        state, pieces = None, []
        for a, b in zip((0, *cuts), (*cuts, 23)):
            y, state = model(x[:, a:b], state=state, return_state=True, targets=targets[:, a:b])
            pieces.append(y)
        _, ended = model(x[:, :8], return_state=True, targets=targets[:, :8])
    assert not whole.requires_grad
    close(torch.cat(pieces, 1), whole)
    for a, b in zip(leaves(final), leaves(state), strict=True):
        close(a, b)
    assert not any(t.requires_grad for t in leaves(ended))


def test_an_evaluated_states_graph_reaches_back_no_further_than_its_piece():
    """Calls that all end inside the levels' pieces (1 token, then 4 at a time, chunks of 4):
    the graph the state carries stays that of one piece, not of the stream so far."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 41))

    def nodes(state):
        seen, todo = set(), [t.grad_fn for t in leaves(state) if t.grad_fn is not None]
        while todo:
            f = todo.pop()
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(g for g, _ in f.next_functions)
        return len(seen)

    sizes, state = [], None
    with torch.no_grad():
        for a, b in zip((0, *range(1, 41, 4)), range(1, 42, 4)):
            _, state = model(x[:, a:b], state=state, return_state=True)
            sizes.append(nodes(state))
    assert 0 < max(sizes[1:]) <= 1.1 * min(sizes[1:]), sizes


def test_an_evaluated_state_inside_a_piece_continues_more_than_once():
    """Sampling several continuations of one prompt: each call given the same evaluated state
    (its piece's graph, its last token's waiting loss) computes the same."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 11))
    with torch.no_grad():
        _, state = model(x[:, :6], return_state=True)
        first = model(x[:, 6:], state=state)
        other = model(x[:, 6:].flip(1), state=state)
        again = model(x[:, 6:], state=state)
        whole = model(x)
    close(first, again)
    close(first, whole[:, 6:])
    assert (other - first).abs().max() > 1e-3


def test_generate_writes_what_one_pass_over_its_text_predicts():
    """Greedy generation, one token a call with the state: each token is the largest logit of
    one pass over the text before it (the levels learning from the prompt and from what the
    model wrote, as that pass does); sampling is seeded; a block is refused."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    prompt = torch.randint(0, 20, (2, 5))
    text, state = model.generate(prompt, 11, temperature=0)
    assert text.shape == (2, 16) and (text[:, :5] == prompt).all()
    with torch.no_grad():
        logits = model(text[:, :-1])[:, 4:]
    chosen = logits.gather(-1, text[:, 5:, None])[..., 0]
    assert (chosen >= logits.max(-1).values - 1e-5).all()
    # the state is the one a pass over the text but its last token leaves
    with torch.no_grad():
        _, want = model(text[:, :-1], return_state=True)
    for a, b in zip(leaves(want), leaves(state), strict=True):
        close(a, b)
    draw = [model.generate(prompt, 4, top_k=3, generator=torch.Generator().manual_seed(1))[0]
            for _ in range(2)]
    assert (draw[0] == draw[1]).all()
    with pytest.raises(ValueError, match="takes a model"):
        nestc.load("std/memory/cms.nest").build("CMS", dim=8).generate(prompt, 1)
    with pytest.raises(ValueError, match="at least one"):
        model.generate(prompt, 0)
    close(model.generate(prompt.int(), 3, temperature=0)[0].long(), text[:, :8])
    # a tiny temperature is greedy (logits / 1e-39 overflowed float32: NaN probabilities)
    assert (model.generate(prompt, 3, temperature=1e-39)[0] == text[:, :8]).all()


def test_an_evaluated_state_goes_on_after_an_optimizer_step_from_its_values():
    """Online learning: evaluate, train a step, go on from the evaluated state. The graph it
    kept saved the parameters the step changed in place, so the call starts from its
    values, as from a detached state (before, autograd raised)."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 12))
    with torch.no_grad():
        _, state = model(x[:, :6], return_state=True)
    plain = values_of(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        close(model(x[:, 6:], state=state), model(x[:, 6:], state=plain))


def test_training_from_a_state_evaluated_inside_a_piece_does_not_reach_the_evaluation():
    """The graph an evaluation's state carries for its piece is not the outer level's: a call
    in grad mode starts from its values, so its gradients are those of the detached state."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 13))
    with torch.no_grad():
        _, state = model(x[:, :6], return_state=True)
    assert any(t.requires_grad for t in leaves(state))
    plain = values_of(state)
    params = list(model.parameters())
    grads = [torch.autograd.grad(model(x[:, 6:], state=s).pow(2).sum(), params,
                                 allow_unused=True) for s in (state, plain)]
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b)


@pytest.mark.parametrize("whole", [True, False])
def test_torch_compile_runs_task_loss_levels_eagerly_and_right(whole):
    """Task-loss levels take gradients inside the forward with respect to weights their run
    makes: through a compiled graph those came back as zeros, so the levels silently did not
    learn (a 1-layer HopeLM's logits 0.014 off). torch.compile of the model, or of its blocks
    one by one, now runs them eagerly, with a warning, and equals eager."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=1, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 13))
    want = model(x)
    torch._dynamo.reset()
    nestc.module._warned_eager.clear()
    with pytest.warns(UserWarning, match="torch.compile runs `(HopeLM|Hope)` eagerly"):
        if whole:
            got = torch.compile(model, backend="aot_eager")(x)
        else:
            for block in model.children():
                if isinstance(block, nestc.module.Built):
                    block.compile(backend="aot_eager")
            got = model(x)
    close(got, want)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(want.pow(2).sum(), params),
                    torch.autograd.grad(got.pow(2).sum(), params), strict=True):
        close(a, b)


@pytest.mark.parametrize("clauses,message", [
    ("key x * 2.0; value x; objective l2(M(x), x)",
     r"b.nest:4:13: error: the `key` of memory `M` is `x \* 2.0`, but its objective reads `M\(x\)`"),
    ("key x; value 2 * x; objective l2(M(x), x)",
     r"b.nest:4:22: error: the `value` of memory `M` is `2 \* x`, but its objective compares "
     r"`M\(x\)` with `x`")])
def test_key_and_value_clauses_must_say_what_the_objective_learns(clauses, message):
    """The objective's key and value are what the memory learns; a clause that says another
    was silently ignored."""
    text = spec(f"""
        block B(dim = 8) {{
            input x : [T, dim]
            memory M : mlp(dim) = meta every token in chunks of 4 {{
                {clauses}; rule gd(lr = 0.1)
            }}
            output M(x)
        }}
    """)
    with pytest.raises(nestc.NestError, match=message):
        nestc.loads(text, "b.nest").build("B")
    same = text.replace("x * 2.0", "x").replace("2 * x", "x")
    assert nestc.loads(same, "b.nest").build("B")(torch.randn(1, 3, 8)).shape == (1, 3, 8)


def test_torch_compile_keeps_each_model_apart():
    """Each generated class has a `forward` of its own (the same code): torch.compile keeps
    at most recompile_limit graphs per code object, so with one shared `forward` the ninth
    model compiled in a process ran eagerly. With a limit of 1, two models compile."""
    torch._dynamo.reset()
    titans = nestc.load("std/models/titans.nest")
    models = [titans.build("TitansLM", vocab=20, dim=dim, depth=1, heads=2) for dim in (8, 16)]
    assert type(models[0]).forward.__code__ is not type(models[1]).forward.__code__
    assert type(models[0]).forward.__doc__ == nestc.module.Built.forward.__doc__
    x = torch.randint(0, 20, (1, 3))
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for model in models:
            close(torch.compile(model, backend="eager")(x), model(x))


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="inductor needs g++")
def test_torch_compile_takes_a_second_length():
    """Inductor (torch.compile's default) compiles a second length with a symbolic T: chunk
    bounds written min(T, t + C) made shapes of Min(T, ...), and inductor failed on them
    ("Exponent must be non-negative") for every MLP memory (Titans, TitansLM, self-modifying
    Titans). The bounds are now a number or T (nestc.ops.utils.upto). Streaming too."""
    torch.manual_seed(0)
    titans = TITANS.build("Titans", dim=8, heads=2, chunk=4)
    compiled = torch.compile(titans)
    for T in (10, 7):
        x = torch.randn(2, T, 8)
        close(compiled(x), titans(x))
    x = torch.randn(2, 9, 8)
    y, state = compiled(x[:, :3], return_state=True)
    close(torch.cat([y, compiled(x[:, 3:], state=state)], 1), titans(x))


def test_a_state_or_targets_that_do_not_fit_the_call_are_value_errors():
    """Another module's state was ignored without a word; a state of another batch size, or
    targets of another shape, failed deep inside (an error about targets the caller never
    gave, "batch_size (0)")."""
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=11, dim=8, depth=1, heads=2, chunks=[2, 4])
    x = torch.randint(0, 11, (2, 5))
    _, state = model(x, return_state=True)
    with pytest.raises(ValueError, match=r"the state is of a batch of 2 sequences .*, the input "
                                         r"of 3"):
        model(torch.randint(0, 11, (3, 5)), state=state)
    with pytest.raises(ValueError, match=r"targets must have the tokens' shape \[2, 5\], got "
                                         r"\[2, 4\]"):
        model(x, targets=x[:, :4])
    with pytest.raises(ValueError, match="the state has entries for submodules it does not "
                                         "have \\('M'\\)"):
        model(x, state={"M": torch.zeros(2, 2, 4, 4)})
    model(x, state=state)  # its own state, of its batch
    # a sub-block called alone goes on from the state it returned (its keys are full paths)
    block, h = model.r0_Hope.SelfModifyingTitans, torch.randn(2, 5, 8)
    _, state = block(h, return_state=True)
    block(h, state=state)
    # a memory shared by the batch has no batch dim to check
    shared = nestc.loads(spec("""
        block S(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every token {
                state shared; key x; value x; objective l2(M(x), x); rule gd(lr = 0.1)
            }
            output M(x)
        }
    """), "s.nest").build("S")
    _, state = shared(torch.randn(2, 3, 8), return_state=True)  # [1, 8, 8]: no batch dim
    shared(torch.randn(4, 3, 8), state=state)
