"""The semantic choices about chunks and batches (docs/semantics.md): `partial chunk carry`
(the default: a chunk that a call ends inside goes on in the next call) against `partial chunk
flush` (it ends with the call), on Titans-style MLP memories and on task-loss (CMS) levels; and
`state shared` (one state for the batch) on task-loss levels and on matrix memories that learn
every token."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import close, leaves, spec  # noqa: E402

import nestc  # noqa: E402
from nestc.explain import explain  # noqa: E402

MLP = spec("""
    block Deep(dim, heads = 2, chunk = 4) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = heads)
        let v = x |> linear(dim)
        let lr = 0.5 * sigmoid(linear(x, heads))
        memory M : mlp(dim / heads, hidden = 8) per head = meta every token in chunks of chunk {
            CLAUSES
            objective l2(M(k), v); rule momentum(lr = lr, beta = 0.5)
        }
        output M(x) |> linear(dim)
    }
""")

CMS = spec("""
    from "std/optim/adam.nest" import AdamW
    block Level(dim, c = 4, lr = 0.5) {
        input x : [T, dim]
        memory f : mlp(dim, hidden = 2 * dim) = meta every c tokens {
            CLAUSES
            objective task
            rule gd(lr = lr, retain = 0.9)
        }
        output f(x)
    }
    model LM(vocab = 20, dim = 8, lr = 0.5) {
        input tokens : [T] int
        let h = embed(tokens, vocab, dim)
        h = h + Level(dim, lr = lr)(rmsnorm(h))
        output logits = h |> linear(vocab)
        train every step { objective cross_entropy(logits, next(tokens)); rule AdamW }
    }
""")


def build(text, name, clauses="", backend="chunked", **hyper):
    torch.manual_seed(0)
    return nestc.loads(text.replace("CLAUSES", clauses), "c.nest").build(
        name, backend=backend, **hyper)


def same_states(a, b):
    for u, v in zip(leaves(a), leaves(b), strict=True):
        close(u, v)


def stream(mod, x, cuts, targets=None, **kw):
    """mod fed x in pieces ending at cuts, each piece given the last one's state (and its
    targets)."""
    state, ys, a = None, [], 0
    for b in [*cuts, x.shape[1]]:
        if targets is not None:
            kw["targets"] = targets[:, a:b]
        y, state = mod(x[:, a:b], state=state, return_state=True, **kw)
        ys.append(y)
        a = b
    return torch.cat(ys, 1), state


# MLP memories ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_an_mlp_memory_carries_a_partial_chunk_into_the_next_call_by_default(backend):
    mod = build(MLP, "Deep", backend=backend, dim=8)
    x = torch.randn(2, 11, 8)
    whole, final = mod(x, return_state=True)
    pieces, state = stream(mod, x, [6])
    close(pieces, whole)
    same_states(final, state)
    assert final["M"]["offset"] == 3  # 11 tokens: two chunks of 4, three into the third


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_an_mlp_memory_that_flushes_starts_a_chunk_with_every_call(backend):
    carry = build(MLP, "Deep", backend=backend, dim=8)
    flush = build(MLP, "Deep", "partial chunk flush", backend=backend, dim=8)
    x = torch.randn(2, 11, 8)
    # one call: the same outputs and weights; the flushed state starts a chunk
    y, state = flush(x[:, :6], return_state=True)
    y_carry, state_carry = carry(x[:, :6], return_state=True)
    close(y, y_carry)
    same_states(state["M"]["M"], state_carry["M"]["M"])
    assert state["M"]["offset"] == 0 and state_carry["M"]["offset"] == 2
    # the next call takes its first gradients at the weights the last one reached, as a
    # memory does whose chunk starts there
    restart = {"M": {**state_carry["M"], "start": state_carry["M"]["M"], "offset": 0}}
    later, final = flush(x[:, 6:], state=state, return_state=True)
    close(later, carry(x[:, 6:], state=restart))
    assert (later - carry(x[:, 6:], state=state_carry)).abs().max() > 1e-4  # it matters
    # calls that end on chunk boundaries: the same as one pass
    pieces, _ = stream(flush, x, [4, 8])
    close(pieces, carry(x))


def test_an_mlp_memory_that_flushes_is_the_same_on_both_tiers():
    ref = build(MLP, "Deep", "partial chunk flush", backend="reference", dim=8)
    fast = build(MLP, "Deep", "partial chunk flush", backend="chunked", dim=8)
    x = torch.randn(2, 13, 8)
    ya, sa = stream(ref, x, [3, 9])
    yb, sb = stream(fast, x, [3, 9])
    close(ya, yb, 1e-4)
    same_states(sa, sb)


# task-loss (CMS) levels --------------------------------------------------------------------


def test_a_cms_level_that_flushes_updates_at_the_end_of_a_call():
    carry = build(CMS, "LM")
    flush = build(CMS, "LM", "partial chunk flush")
    x = torch.randint(0, 20, (2, 6))
    y_carry, carried = carry(x, return_state=True)
    y, flushed = flush(x, return_state=True)
    close(y, y_carry)  # the update lands after the call's last token: no read sees it
    # the carried state holds the gradient of the partial chunk (tokens 4 and 5), the flushed
    # state the gd step it makes: W <- 0.9 W - 0.5 g
    level = carried["Level.f"]
    assert level["offset"] == 2 and flushed["Level.f"]["offset"] == 0
    assert flushed["Level.f"]["grad"] is None
    for w, g, after in zip(level["W"], level["grad"], flushed["Level.f"]["W"]):
        close(after, 0.9 * w - 0.5 * g)
    # the next call starts a chunk: its first 4 tokens read the flushed weights
    x2 = torch.randint(0, 20, (2, 5))
    later = flush(x2, state=flushed)
    close(later, carry(x2, state={"Level.f": {**flushed["Level.f"]}}))
    assert (later - carry(x2, state=carried)).abs().max() > 1e-4
    # calls that end on chunk boundaries: the same as one pass
    x = torch.randint(0, 20, (2, 12))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    pieces, _ = stream(flush, x, [4, 8], targets=targets)
    close(pieces, carry(x))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_an_evaluation_with_a_flushing_level_returns_plain_values(mode):
    """A flushed level's chunk ends with the call, so no piece goes on: the state an
    evaluation returns holds no graph, and ordinary tensors under inference mode (the flush
    ran after both before). The old state held the graph of the rest of the model, without
    the mark that stops a call in grad mode from differentiating through it."""
    flush = build(CMS, "LM", "partial chunk flush")
    x = torch.randint(0, 20, (2, 9))
    with getattr(torch, mode)():
        _, state = flush(x[:, :6], return_state=True)
    assert not any(t.requires_grad or t.is_inference() for t in leaves(state))
    assert nestc.module.NEXT not in state  # (its last token's loss does not wait)
    close(flush(x[:, 6:], state=state), flush(x[:, 6:], state=nestc.module.detached(state)))


def test_a_cms_level_carries_by_default_and_streams_as_one_pass():
    carry = build(CMS, "LM")
    x = torch.randint(0, 20, (2, 13))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    whole, final = carry(x, return_state=True, targets=targets)
    pieces, state = stream(carry, x, [3, 6], targets=targets)
    close(pieces, whole)
    same_states(final, state)


def test_a_shared_cms_level_sums_the_batch_gradients():
    shared = build(CMS, "LM", "state shared")
    per_sample = build(CMS, "LM", lr=1.0)
    x = torch.randint(0, 20, (1, 9)).expand(2, -1)
    # two equal sequences: one shared step of lr 0.5 on their summed gradients is each
    # sequence's own step of lr 1
    y, state = shared(x, return_state=True)
    y_each, state_each = per_sample(x, return_state=True)
    close(y, y_each)
    A, B = state["Level.f"]["W"]
    assert A.shape == (8, 16) and B.shape == (16, 8)  # no batch dim
    close(A, state_each["Level.f"]["W"][0][1])
    # different sequences: every sequence reads the weights the whole batch made (tokens 4
    # to 7 read those of the first chunk's step)
    x = torch.randint(0, 20, (3, 9))
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    y, state = shared(x, return_state=True, targets=targets)
    for i in range(3):
        alone = shared(x[i:i + 1, 4:8], state={"Level.f": state_at(shared, x, 4)})
        close(y[i:i + 1, 4:8], alone)
    assert (y[:1, 4:8] - shared(x[:1])[:, 4:8]).abs().max() > 1e-4
    # a shared level streams as one pass too, and trains its initial weights
    pieces, streamed = stream(shared, x, [2, 7], targets=targets)
    close(pieces, y)
    same_states(state, streamed)
    y.sum().backward()
    assert shared.Level.f.A.grad.abs().sum() > 0


def state_at(mod, x, t):
    """A shared level's state after the first t tokens of every sequence of x (a whole
    number of chunks)."""
    targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    _, state = mod(x[:, :t], targets=targets[:, :t], return_state=True)
    return state["Level.f"]


NESTED = spec("""
    block B(dim) {
        input x : [T, dim]
        memory slow : mlp(dim, hidden = 4) = meta every 4 tokens {
            SLOW
            objective task; rule gd(lr = 0.1)
        }
        memory fast : mlp(dim, hidden = 4) = slow every 2 tokens {
            FAST
            objective task; rule gd(lr = 0.1)
        }
        output fast(x)
    }
""")


def nested(slow, fast):
    torch.manual_seed(0)
    return nestc.loads(NESTED.replace("SLOW", slow).replace("FAST", fast), "n.nest")


def test_a_shared_slow_level_can_start_per_sample_fast_levels():
    cms = nested("state shared", "").build("B", dim=8)
    x = torch.randn(2, 11, 8)
    task = lambda y, a, b: y.pow(2).sum()  # noqa: E731
    whole, final = cms(x, task=task, return_state=True)
    assert final["slow"]["W"][0].shape == (8, 4) and final["fast"]["W"][0].shape == (2, 8, 4)
    pieces, state = stream(cms, x, [3, 9], task=task)
    close(pieces, whole)
    same_states(final, state)


@pytest.mark.parametrize("slow,fast,message", [
    ("", "state shared", "shared by the batch but starts from `slow`, which is per sample"),
    ("", "partial chunk flush", "a nested level ends its calls as its parent does"),
    ("partial chunk flush", "", "`partial chunk carry` but starts from `slow`"),
])
def test_a_nested_level_shares_its_parents_choices(slow, fast, message):
    with pytest.raises(nestc.NestError, match=message) as err:
        nested(slow, fast).build("B", dim=8)
    assert err.value.span is not None and err.value.span.line == 7


def test_explain_shows_what_a_partial_chunk_does():
    prog = nestc.loads(CMS.replace("CLAUSES", "partial chunk flush"), "c.nest")
    text = explain(prog, "LM", tokens=70)
    assert "partial chunk  flush        (set)" in text
    # (a flush updates at the call's end too: 18, where it said 17)
    assert "updates        18 over 70 tokens (the last 2 update at the call's end: flush)" \
        in text
    text = explain(nestc.loads(MLP.replace("CLAUSES", ""), "m.nest"), "Deep", tokens=70,
                   dim=8)
    assert "in 18 chunks of 4 (last one partial: carry)" in text
    assert "partial chunk  carry        (default)" in text
    shared = explain(nestc.loads(CMS.replace("CLAUSES", "state shared"), "c.nest"), "LM")
    assert "one set of weights for the batch" in shared


# matrix memories that learn every token, shared by the batch -------------------------------

SHARED = spec("""
    block Mem(dim, heads = 2, chunk = 4, rate = 1.0) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = heads)
        let v = x |> linear(dim)
        let q = x |> linear(dim) |> l2norm(per = heads)
        let lr = rate * sigmoid(linear(x, heads))
        memory M : matrix(dim / heads, dim / heads) per head = INIT every token in chunks of chunk {
            CLAUSES
        }
        output M(q) |> linear(dim)
    }
""")
SHARED_MODES = {
    "gd": ("zeros", "objective l2(M(k), v); rule gd(lr = lr)"),
    "gd_retain": ("meta", "objective l2(M(k), v); rule gd(lr = lr, retain = 0.9)"),
    "dgd_literal": ("meta", "objective l2(M(k), v); rule dgd(lr = 0.5 * lr, retain = 0.9); "
                            "dgd literal"),
    "before": ("meta", "read before write; objective l2(M(k), v); "
                       "rule dgd(lr = lr, retain = 0.8)"),
    "dot": ("zeros", "objective dot(M(k), v); rule gd(lr = 0.5, retain = 0.9)"),
}


def built_mem(text, clauses, shared, backend, **hyper):
    """Block `Mem` of a template with its clauses (`state shared` first where asked), seeded."""
    text = text.replace("CLAUSES", ("state shared; " if shared else "") + clauses)
    torch.manual_seed(0)
    return nestc.loads(text, "s.nest").build("Mem", dim=16, backend=backend, **hyper)


def shared_memory(mode, backend="chunked", shared=True, **hyper):
    init, clauses = SHARED_MODES[mode]
    mod = built_mem(SHARED.replace("INIT", init), clauses, shared, backend, **hyper)
    if init == "meta":
        with torch.no_grad():
            mod.M.initial.normal_(0, 0.3)
    return mod


@pytest.mark.parametrize("mode", SHARED_MODES)
@pytest.mark.parametrize("T", [1, 11])
def test_a_shared_matrix_memory_chunked_equals_its_token_loop(mode, T):
    """The chunked ops over the batch's tokens time-major, B writes at a time at one state,
    against the token loop that sums every sequence's update at each token."""
    ref, fast = shared_memory(mode, "reference"), shared_memory(mode)
    x = torch.randn(3, T, 16)
    ya, sa = ref(x, return_state=True)
    yb, sb = fast(x, return_state=True)
    close(ya, yb)
    assert sa["M"].shape == (2, 8, 8)
    close(sa["M"], sb["M"])
    ga = torch.autograd.grad(ya.pow(2).sum(), list(ref.parameters()), allow_unused=True)
    gb = torch.autograd.grad(yb.pow(2).sum(), list(fast.parameters()), allow_unused=True)
    for u, w in zip(ga, gb, strict=True):
        # a parameter no path reaches (T = 1, read before the write) has no gradient on one
        # tier and zeros on the other
        if u is not None or w is not None:
            close(torch.zeros_like(w) if u is None else u, torch.zeros_like(u) if w is None
                  else w)


def test_a_shared_matrix_memory_is_one_state_for_the_batch():
    # B equal sequences write B times the update of one: per sample with B times the rate
    x = torch.randn(1, 9, 16).expand(4, -1, -1)
    shared = shared_memory("gd", rate=0.25)
    each = shared_memory("gd", shared=False, rate=1.0)
    close(shared(x), each(x))
    # a batch wider than a chunk's 256 tokens allow (chunks of whole time steps), streamed
    wide = torch.randn(40, 13, 16)
    ref = shared_memory("gd_retain", "reference")
    whole, final = shared_memory("gd_retain")(wide, return_state=True)
    close(ref(wide), whole)
    pieces, state = stream(shared_memory("gd_retain"), wide, [5])
    close(pieces, whole)
    close(state["M"], final["M"])


def test_a_shared_matrix_memory_takes_a_retention_that_is_a_number():
    text = SHARED.replace("INIT", "zeros").replace(
        "CLAUSES", "state shared; objective l2(M(k), v); rule gd(lr = lr, retain = lr)")
    with pytest.raises(nestc.NestError, match="a `retain` that changes with the data on a "
                                              "memory shared by the batch") as err:
        nestc.loads(text, "s.nest").build("Mem", dim=16)
    assert err.value.unsupported and err.value.span.line == 8


# MLP memories that learn every token, shared by the batch ---------------------------------

SHARED_MLP = spec("""
    block Mem(dim, heads = 2, rate = 1.0) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = heads)
        let v = x |> linear(dim)
        let lr = rate * sigmoid(linear(x, heads))
        memory M : STRUCTURE per head = meta every token in chunks of 4 {
            CLAUSES
        }
        output M(k) |> linear(dim)
    }
""")
SHARED_MLP_MODES = {
    "gd": ("mlp(dim / heads)", "key k; value v; objective l2(M(k), v); rule gd(lr = lr)"),
    "momentum": ("residual_mlp(dim / heads)",
                 "read before write; key k; value v; objective l2(M(k), v); "
                 "rule momentum(lr = lr, beta = 0.9, retain = 0.95)"),
    "generated": ("residual_mlp(dim / heads)",
                  "let t = stop_grad(M(v)); key k; value t; objective l2(M(k), t); "
                  "rule momentum(lr = lr, beta = 0.5, retain = 0.9, clip = 0.5)"),
}


def shared_mlp(mode, backend="chunked", shared=True, **hyper):
    structure, clauses = SHARED_MLP_MODES[mode]
    mod = built_mem(SHARED_MLP.replace("STRUCTURE", structure), clauses, shared, backend,
                    **hyper)
    with torch.no_grad():
        mod.M.A.normal_(0, 0.5)
        mod.M.B.normal_(0, 0.5)
    return mod


@pytest.mark.parametrize("mode", SHARED_MLP_MODES)
@pytest.mark.parametrize("T", [1, 11])
def test_a_shared_mlp_memory_chunked_equals_its_token_loop(mode, T):
    """The chunk's sums over the batch's tokens time-major, a whole time step at once,
    against the token loop that sums every sequence's update at each token: outputs, the
    one state, gradients; streamed."""
    ref, fast = shared_mlp(mode, "reference"), shared_mlp(mode)
    x = torch.randn(3, T, 16)
    ya, sa = ref(x, return_state=True)
    yb, sb = fast(x, return_state=True)
    close(ya, yb)
    assert sa["M"]["M"][0].shape == (2, 8, 8)
    same_states(sa, sb)
    params = list(ref.parameters())
    ga = torch.autograd.grad(ya.pow(2).sum(), params, allow_unused=True)
    gb = torch.autograd.grad(yb.pow(2).sum(), list(fast.parameters()), allow_unused=True)
    for u, w in zip(ga, gb, strict=True):
        # a parameter no path reaches (T = 1, read before the write) has no gradient on one
        # tier and zeros on the other
        if u is not None or w is not None:
            close(torch.zeros_like(w) if u is None else u, torch.zeros_like(u) if w is None
                  else w)
    if T > 1:
        pieces, state = stream(fast, x, [3, 6])
        close(pieces, yb)
        same_states(state, sb)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("mode", SHARED_MLP_MODES)
def test_a_shared_mlp_memory_is_one_state_for_the_batch(backend, mode):
    """B equal sequences write B times the update of one: per sample with B times the rate
    (their gradients, clipped each, at the same weights); one sequence is per sample."""
    x = torch.randn(1, 9, 16)
    shared = shared_mlp(mode, backend, rate=0.25)
    each = shared_mlp(mode, backend, shared=False, rate=1.0)
    close(shared(x.expand(4, -1, -1)), each(x.expand(4, -1, -1)))
    close(shared_mlp(mode, backend)(x), shared_mlp(mode, backend, shared=False)(x))


def test_a_shared_mlp_memory_takes_factors_that_are_numbers():
    structure, _ = SHARED_MLP_MODES["momentum"]
    text = SHARED_MLP.replace("STRUCTURE", structure).replace(
        "CLAUSES", "state shared; key k; value v; objective l2(M(k), v); "
                   "rule momentum(lr = lr, beta = lr, retain = 0.9)")
    with pytest.raises(nestc.NestError, match="a `beta` that changes with the data on a "
                                              "memory shared by the batch") as err:
        nestc.loads(text, "s.nest").build("Mem", dim=16)
    assert err.value.unsupported and err.value.span.line == 7


def switched(hyper, clauses):
    return spec(f"""
        block B(dim = 8{hyper}) {{
            input x : [T, dim]
            let k = x |> linear(dim) |> l2norm
            memory M : mlp(dim, hidden = 8) = meta every token in chunks of 4 {{
                key k; value x
                {clauses}
            }}
            output M(x)
        }}
    """)


SWITCHED = switched(", literal = false, robust = false", """
                if robust { objective huber(M(k), x, delta = 0.5) } else { objective l2(M(k), x) }
                if literal {
                    dgd literal
                    rule dgd(lr = 0.3, retain = 0.9)
                } else {
                    rule gd(lr = 0.3, retain = 0.9)
                }""")


@pytest.mark.parametrize("literal", [False, True])
@pytest.mark.parametrize("robust", [False, True])
def test_an_if_in_a_memory_body_switches_its_clauses_by_a_hyperparameter(literal, robust):
    """`if` on a hyperparameter inside a memory's body: the build takes the branch its value
    picks, and is the memory written with that branch's clauses alone."""
    objective = "huber(M(k), x, delta = 0.5)" if robust else "l2(M(k), x)"
    rule = "dgd literal; rule dgd(lr = 0.3, retain = 0.9)" if literal else \
        "rule gd(lr = 0.3, retain = 0.9)"
    plain = switched("", f"objective {objective}; {rule}")
    x = torch.randn(2, 9, 8)
    built = build(SWITCHED, "B", literal=literal, robust=robust)
    want = build(plain, "B")
    assert built.M.literal == literal and built.M.objective == ("huber" if robust else "l2")
    assert torch.equal(built(x), want(x))
    text = explain(nestc.loads(SWITCHED, "c.nest"), "B", literal=literal, robust=robust)
    assert f"objective      {objective}\n" in text
    assert ("dgd            literal" if literal else "dgd            gated        (default)") \
        in text


@pytest.mark.parametrize("body,message", [
    ("if on { rule gd(lr = 0.1) }",  # off: no rule
     "memory `M` has an objective but no rule"),
    ("rule gd(lr = 0.1); if on { rule gd(lr = 0.2) }",
     "memory `M` has two `rule` clauses"),
    ("if on { dgd literal }; rule gd(lr = 0.1)",
     "`dgd literal` says how the `dgd` rule resolves, but the rule of memory `M` is `gd`"),
    ("let big = dim > 4; if big { rule gd(lr = 0.1) } else { rule gd(lr = 0.2) }",
     "an `if` in a memory's body tests hyperparameters only; `big` is not one")])
def test_every_way_through_a_memory_bodys_ifs_is_checked(body, message):
    """The checker does not know the hyperparameters a build will give: each way through the
    `if`s must make a memory."""
    text = spec(f"""
        block B(dim = 8, on = true) {{
            input x : [T, dim]
            memory M : mlp(dim) = meta every token {{
                key x; value x; objective l2(M(x), x)
                {body}
            }}
            output M(x)
        }}
    """)
    with pytest.raises(nestc.NestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nestc.loads(text, "c.nest")


def test_ifs_in_a_memory_body_nest_and_chain():
    """else-if chains and an `if` inside a branch take the way the values pick."""
    text = switched(", a = true, b = true", """
                if a {
                    if b { rule gd(lr = 0.1) } else { rule gd(lr = 0.2, retain = 0.5) }
                } else if b { dgd literal; rule dgd(lr = 0.3) }
                else { rule dgd(lr = 0.4) }
                objective l2(M(k), x)""")
    picked = {(a, b): build(text, "B", a=a, b=b).M for a in (True, False) for b in (True, False)}
    assert [picked[True, True].literal, picked[False, True].literal] == [False, True]
    assert picked[True, False].signals == ("lr", "retain") and picked[True, True].signals == (
        "lr",)
    assert not picked[False, False].literal


def test_require_is_checked_wherever_hyperparameters_are_bound():
    """At load for the defaults (a required hyperparameter is checked once given), at build,
    at explain's --set, and where a block calls another with its arguments: at load for the
    caller's defaults (where they take the call's branch), else when the caller is bound,
    reported at the call with a note at the `require`."""
    text = spec("""
        block Heads(dim, heads = 4) {
            require dim % heads == 0, "heads divide dim"
            input x : [T, dim]
            output x
        }
        block Outer(dim = 8, inner = 4) {
            input x : [T, dim]
            output Heads(inner)(linear(x, inner))
        }
        block Switched(dim = 8, inner = 6, on = false) {
            input x : [T, dim]
            let y = x
            if on { y = Heads(inner)(linear(x, inner)) }
            output y
        }
        block Picked(dim = 8) {  # (loads: the call is in the branch its defaults do not take)
            input x : [T, dim]
            output if dim > 100 then Heads(dim, heads = 7)(x) else x
        }
    """)
    prog = nestc.loads(text, "r.nest")  # `dim` has no default: nothing to check yet
    assert prog.build("Heads", dim=8)(torch.randn(1, 2, 8)).shape == (1, 2, 8)
    for attempt in (lambda: prog.build("Heads", dim=6), lambda: explain(prog, "Heads", dim=6)):
        with pytest.raises(nestc.NestError, match=r"r.nest:2:5: error: block `Heads`: heads "
                                                  r"divide dim"):
            attempt()
    assert prog.build("Outer")(torch.randn(1, 2, 8)).shape == (1, 2, 4)
    at_call = r"r.nest:{}: error: this call of block `Heads` does not meet its requirement: " \
        r"heads divide dim(.|\n)*r.nest:2:5: note: required here(.|\n)*got dim = 6, heads = 4"
    for attempt, where in ((lambda: prog.build("Outer", inner=6), "8:12"),
                           (lambda: explain(prog, "Outer", inner=6), "8:12"),
                           (lambda: prog.graph("Outer", inner=6), "8:12"),
                           (lambda: prog.build("Switched", on=True), "13:17")):
        with pytest.raises(nestc.NestError, match=at_call.format(where)):
            attempt()
    assert prog.build("Switched")(torch.randn(1, 2, 8)).shape == (1, 2, 8)  # branch not taken
    with pytest.raises(nestc.NestError, match=at_call.format("8:12")):
        nestc.loads(text.replace("inner = 4", "inner = 6"), "r.nest")


def test_too_many_ifs_in_a_memory_body_are_an_error_not_a_hang():
    ifs = "\n".join(f"if f{i} {{ read before write }}" for i in range(7))
    text = switched("".join(f", f{i} = false" for i in range(7)),
                    ifs + "\nobjective l2(M(k), x); rule gd(lr = 0.1)")
    with pytest.raises(nestc.NestError, match="`if`s make more than 64 bodies to check"):
        nestc.loads(text, "c.nest")
