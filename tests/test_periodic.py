"""Memories with their own objective that learn once every N tokens (nestc.memories.
PeriodicMemory, docs/semantics.md): the chunked tier against the token loop, a period of one
against the per-token memories, an update by hand, streaming with carry and flush, weights
shared by the batch, and the errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import close, leaves, run_benchmark, spec  # noqa: E402

import nestc  # noqa: E402
from nestc.explain import explain  # noqa: E402

TEMPLATE = spec("""
    block B(dim, heads = 2, p = 4) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = heads)
        let v = x |> linear(dim)
        let lr = 0.5 * sigmoid(linear(x, heads))
        let keep = sigmoid(linear(x, heads) + 2)
        memory M : STRUCTURE per head = INIT every FREQUENCY {
            CLAUSES
            key k; value v
            objective OBJECTIVE; rule RULE
        }
        output M(x) |> linear(dim)
    }
""")
MATRIX, MLP = "matrix(dim / heads, dim / heads)", "mlp(dim / heads, hidden = 8, act = \"tanh\")"
CASES = {
    "matrix_gd": (MATRIX, "meta", "l2(M(k), v)", "gd(lr = lr)", ""),
    "matrix_dot_retain": (MATRIX, "zeros", "dot(M(k), v)", "gd(lr = lr, retain = 0.9)", ""),
    "matrix_huber_momentum": (MATRIX, "meta", "huber(M(k), v, delta = 0.2)",
                              "momentum(lr = lr, beta = 0.5, retain = 0.95)", ""),
    "mlp_gd_before": (MLP, "meta", "l2(M(k), v)", "gd(lr = lr, retain = 0.9)",
                      "read before write"),
    "residual_momentum": ("residual_mlp(dim / heads, hidden = 8)", "meta", "l2(M(k), v)",
                          "momentum(lr = lr, beta = 0.5)", ""),
    "mlp_shared_stopped": (MLP, "meta", "huber(M(k), v)", "gd(lr = 0.1)",
                           "state shared; backprop stopped"),
    # retentions and momentum factors that change per token and head: a period takes their
    # products
    "matrix_retain_signal": (MATRIX, "meta", "l2(M(k), v)", "gd(lr = lr, retain = keep)", ""),
    "mlp_momentum_signals": (MLP, "meta", "l2(M(k), v)",
                             "momentum(lr = lr, beta = keep, retain = keep)", ""),
    "shared_momentum": (MATRIX, "meta", "dot(M(k), v)",
                        "momentum(lr = lr, beta = 0.5, retain = 0.9)", "state shared"),
    # each token's gradient scaled to norm at most clip (small enough to act here): the
    # reference tier takes its norm from autograd's gradient, the chunked tier in closed form
    "matrix_clip": (MATRIX, "meta", "l2(M(k), v)", "gd(lr = lr, retain = keep, clip = 0.05)",
                    ""),
    "matrix_huber_clip_shared": (MATRIX, "meta", "huber(M(k), v, delta = 0.2)",
                                 "momentum(lr = lr, beta = 0.5, clip = 0.05)", "state shared"),
    "mlp_clip_before": (MLP, "meta", "l2(M(k), v)",
                        "momentum(lr = lr, beta = keep, clip = 0.05)", "read before write"),
    "residual_clip_shared": ("residual_mlp(dim / heads, hidden = 8)", "meta", "dot(M(k), v)",
                             "gd(lr = 0.1, clip = 0.05)", "state shared"),
}


def source(case, frequency="p tokens", rule=None, clauses=None):
    structure, init, objective, case_rule, case_clauses = CASES[case]
    rule = case_rule if rule is None else rule
    clauses = case_clauses if clauses is None else clauses
    return (TEMPLATE.replace("STRUCTURE", structure).replace("INIT", init)
            .replace("OBJECTIVE", objective).replace("RULE", rule)
            .replace("CLAUSES", clauses).replace("FREQUENCY", frequency))


def build(case, backend="chunked", frequency="p tokens", rule=None, clauses=None, **hyper):
    torch.manual_seed(0)
    mod = nestc.loads(source(case, frequency, rule, clauses), "p.nest").build(
        "B", dim=8, backend=backend, **hyper)
    with torch.no_grad():  # a meta-learned matrix starts at zero: set it away from there
        if hasattr(mod.M, "initial"):
            mod.M.initial.normal_(0, 0.3)
    return mod


def same_run(a, b, x, weights=lambda state: state):
    """Equal outputs, states (those of b as `weights` finds them in its state) and parameter
    gradients."""
    ya, sa = a(x, return_state=True)
    yb, sb = b(x, return_state=True)
    close(ya, yb)
    for u, w in zip(leaves(sa), leaves(weights(sb)), strict=True):
        close(u, w)
    ga = torch.autograd.grad(ya.pow(2).sum(), list(a.parameters()), allow_unused=True)
    gb = torch.autograd.grad(yb.pow(2).sum(), list(b.parameters()), allow_unused=True)
    for u, w in zip(ga, gb, strict=True):
        assert (u is None) == (w is None)
        if u is not None:
            close(u, w)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [1, 4, 11])
def test_the_chunked_tier_equals_the_token_loop(case, T):
    same_run(build(case, "reference"), build(case), torch.randn(2, T, 8))


@pytest.mark.parametrize("case", ["matrix_gd", "matrix_dot_retain", "residual_momentum",
                                  "mlp_gd_before", "matrix_retain_signal",
                                  "mlp_momentum_signals"])
def test_a_period_of_one_token_is_the_memory_that_learns_every_token(case):
    """`every 1 tokens` against `every token`: the delta rule, linear attention and Titans'
    MLP memories, each built by its own code."""
    every = build(case, p=1)
    torch.manual_seed(0)
    tokens = nestc.loads(source(case, "token"), "p.nest").build("B", dim=8)
    tokens.load_state_dict(every.state_dict())
    # the same weights, where each keeps them (and the same momentum)
    same_run(every, tokens, torch.randn(2, 9, 8), lambda state: {"M": {
        "W": state["M"] if case.startswith("matrix") else state["M"]["M"], "grad": None,
        "R": None, "Bt": None, "offset": 0,
        "S": state["M"]["S"] if "momentum" in case else None}})


@pytest.mark.parametrize("case", ["matrix_clip", "mlp_clip_before"])
def test_clip_scales_each_tokens_gradient_before_the_period_sums_them(case):
    """A period of one token with clip is the memory that learns every token with that clip
    (its own code); a loose clip changes nothing."""
    every = build(case, p=1)
    torch.manual_seed(0)
    tokens = nestc.loads(source(case, "token"), "p.nest").build("B", dim=8)
    tokens.load_state_dict(every.state_dict())
    x = torch.randn(2, 9, 8)
    close(every(x), tokens(x))
    loose = build(case, rule=CASES[case][3].replace("clip = 0.05", "clip = 1e6"))
    none = build(case, rule=CASES[case][3].replace(", clip = 0.05", ""))
    close(loose(x), none(x))
    assert (build(case)(x) - none(x)).abs().max() > 1e-3  # (it acts here)


def test_a_period_updates_once_by_its_summed_gradients():
    mod = build("matrix_gd")
    x = torch.randn(1, 6, 8)
    y, state = mod(x, return_state=True)
    H, d = 2, 4
    heads = lambda t: t.view(1, 6, H, d).transpose(1, 2)  # noqa: E731
    k = heads(torch.nn.functional.normalize(heads(mod.k_linear(x)).transpose(1, 2).reshape(
        1, 6, 8).view(1, 6, H, d), dim=-1).reshape(1, 6, 8))
    v, q = heads(mod.v_linear(x)), heads(x)
    lr = (0.5 * torch.sigmoid(mod.lr_linear(x))).transpose(1, 2)  # (1, H, 6)
    W0 = mod.M.initial.expand(1, -1, -1, -1)
    # tokens 0..2 read W0; at token 3 the period's gradients, all at W0, make W1
    g = torch.einsum("nht,nhta,nhtb->nhab", lr[..., :4], k[:, :, :4],
                     k[:, :, :4] @ W0 - v[:, :, :4])
    W1 = W0 - g
    reads = torch.cat([q[:, :, :3] @ W0, q[:, :, 3:] @ W1], 2)
    close(mod.out_linear(reads.transpose(1, 2).reshape(1, 6, 8)), y)
    close(state["M"]["W"][0], W1)
    assert state["M"]["offset"] == 2


@pytest.mark.parametrize("case", ["matrix_huber_momentum", "mlp_gd_before"])
def test_streaming_carries_a_period_into_the_next_call(case):
    mod = build(case)
    x = torch.randn(2, 13, 8)
    whole, final = mod(x, return_state=True)
    state, pieces = None, []
    for a, b in [(0, 3), (3, 6), (6, 13)]:
        y, state = mod(x[:, a:b], state=state, return_state=True)
        pieces.append(y)
    close(torch.cat(pieces, 1), whole)
    for u, w in zip(leaves(final), leaves(state), strict=True):
        close(u, w)


def test_flush_applies_a_partial_period_at_the_end_of_a_call():
    carry, flush = build("matrix_gd"), build("matrix_gd", clauses="partial chunk flush")
    x = torch.randn(2, 6, 8)
    y, flushed = flush(x, return_state=True)
    y_carry, carried = carry(x, return_state=True)
    close(y, y_carry)
    assert carried["M"]["offset"] == 2 and flushed["M"]["offset"] == 0
    close(flushed["M"]["W"][0], carried["M"]["W"][0] - carried["M"]["grad"][0])
    later = flush(x[:, :5], state=flushed)
    close(later, carry(x[:, :5], state=flushed))
    assert (later - carry(x[:, :5], state=carried)).abs().max() > 1e-4


def test_shared_weights_sum_the_batch_gradients():
    shared = build("mlp_shared_stopped")
    x = torch.randn(1, 9, 8).expand(2, -1, -1)
    _, state = shared(x, return_state=True)
    each = build("mlp_shared_stopped", rule="gd(lr = 0.2)", clauses="backprop stopped")
    y_each, state_each = each(x, return_state=True)
    close(shared(x), y_each)  # two equal sequences: a shared step is each one's, doubled
    assert state["M"]["W"][0].shape == (2, 4, 8)
    close(state["M"]["W"][0], state_each["M"]["W"][0][0])


def test_a_period_decays_by_the_product_of_its_retentions():
    mod = build("matrix_retain_signal")
    x = torch.randn(1, 4, 8)
    _, state = mod(x, return_state=True)
    H = 2
    heads = lambda t: t.view(1, 4, H, -1).transpose(1, 2)  # noqa: E731
    k = torch.nn.functional.normalize(heads(mod.k_linear(x)), dim=-1)
    v = heads(mod.v_linear(x))
    lr = heads(0.5 * torch.sigmoid(mod.lr_linear(x)))[..., 0]  # (1, H, 4)
    keep = heads(torch.sigmoid(mod.keep_linear(x) + 2))[..., 0]
    W0 = mod.M.initial.expand(1, -1, -1, -1)
    g = torch.einsum("nht,nhta,nhtb->nhab", lr, k, k @ W0 - v)
    close(state["M"]["W"][0], keep.prod(-1)[..., None, None] * W0 - g)
    # three tokens in: the products so far are in the state, and the fourth completes them
    _, carried = mod(x[:, :3], return_state=True)
    close(carried["M"]["R"], keep[..., :3].prod(-1))
    _, later = mod(x[:, 3:], state=carried, return_state=True)
    close(later["M"]["W"][0], state["M"]["W"][0])


@pytest.mark.parametrize("change,message", [
    ("dgd(lr = lr)", "whose rule is not gd or momentum"),
    ("gd(lr = lr, retain = keep); state shared",
     "a `retain` that changes with the data on a memory shared by the batch"),
])
def test_what_a_periodic_memory_does_not_take(change, message):
    text = source("matrix_gd").replace("gd(lr = lr)", change)
    with pytest.raises(nestc.NestError, match=message) as err:
        nestc.loads(text, "p.nest").build("B", dim=8)
    assert err.value.unsupported and err.value.span.line in (7, 10)  # the memory or its rule
    chunks = source("matrix_gd").replace("every p tokens", "every p tokens in chunks of 8")
    with pytest.raises(nestc.NestError, match="`in chunks of` on a memory updated every N"):
        nestc.loads(chunks, "p.nest").build("B", dim=8)


def test_explain_says_how_often_it_learns():
    text = explain(nestc.loads(source("matrix_huber_momentum"), "p.nest"), "B", dim=8)
    text = text.replace("\n      ", " ")
    assert ("matrix 4 x 4 per head (2 heads) learning by momentum on huber once every 4 "
            "tokens: the period's gradients summed at the weights its tokens read") in text


def test_a_module_with_one_moves_between_dtypes():
    mod = build("residual_momentum").double()
    y, state = mod(torch.randn(2, 7, 8, dtype=torch.float64), return_state=True)
    assert y.dtype == torch.float64 and state["M"]["W"][0].dtype == torch.float64


def test_torch_compile_runs_a_periodic_memory_and_windowed_attention():
    prog = nestc.loads(spec("""
        block C(dim) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = meta every 3 tokens {
                key x; value x; objective l2(M(x), x); rule momentum(lr = 0.1, beta = 0.5)
            }
            memory A : cache every token { key x; value x }
            output M(x) + softmax_attention(x, A, window = 4)
        }
    """), "c.nest")
    torch.manual_seed(0)
    mod = prog.build("C", dim=8)
    with torch.no_grad():
        mod.M.initial.normal_()
    x = torch.randn(2, 10, 8)
    eager = mod(x)
    compiled = torch.compile(mod)(x)
    close(eager, compiled)
    g_eager = torch.autograd.grad(eager.sum(), mod.M.initial)[0]
    g_compiled = torch.autograd.grad(compiled.sum(), mod.M.initial)[0]
    close(g_eager, g_compiled)


def test_the_benchmark_runs():
    """benchmarks/levels.py at tiny sizes: a row per frequency."""
    out = run_benchmark("levels.py", "--T", "32", "--periods", "4", "--reps", "1",
                        "--threads", "1")
    rows = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| every")]
    assert rows == ["every token", "every 4 tokens"], out
