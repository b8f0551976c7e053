"""Reads above a memory's declaration: the memory as it was when the chunk began.

A block whose signals read memories declared further down (self-modifying Titans' projection
memories, which learn from their own reads) runs in pieces within one chunk each. These tests
hold both tiers to a token loop written here from docs/semantics.md alone, check streaming,
the front end (graph, explain, errors) and memories that nothing reads after their writes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import close, leaves, spec  # noqa: E402

import nestc  # noqa: E402
from nestc.explain import explain  # noqa: E402

AHEAD = nestc.loads(spec("""
    block Ahead(dim = 8, heads = 2, chunk = 4) {
        input x : [T, dim]
        let k = M(x) |> l2norm(per = heads)
        let eta = 0.5 * sigmoid(mean(N(x), per = heads))
        let v = x |> linear(dim)
        memory M : residual_mlp(dim / heads) per head = meta every token in chunks of chunk {
            key k; value v
            objective l2(M(k), v)
            rule gd(lr = eta)
        }
        memory N : mlp(dim / heads) per head = meta every token in chunks of chunk {
            read before write
            key k; value v
            objective l2(N(k), v)
            rule gd(lr = eta, retain = 0.9)
        }
        output M(x) + N(x)
    }
"""), "ahead.nest")


def token_loop(mod, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple]]:
    """The definition, token by token: at each chunk's first token every memory's weights are
    noted; k and eta read M and N at those; each token's gradient is taken at them too; M is
    read after its write, N before."""
    H, C = 2, 4
    B, T, dim = x.shape
    d = dim // H
    M, N = mod.M, mod.N

    def mlp(mem, W, z):  # z [B, H, d] at W = (A [B, H, d, h], B [B, H, h, d])
        y = mem.act(torch.einsum("bhd,bhdk->bhk", z, W[0]))
        y = torch.einsum("bhk,bhkd->bhd", y, W[1])
        return y + z if mem.residual else y

    Wm = tuple(p.expand(B, *p.shape) for p in (M.A, M.B))
    Wn = tuple(p.expand(B, *p.shape) for p in (N.A, N.B))
    v_all = mod.v_linear(x).view(B, T, H, d)
    ys = []
    for t in range(T):
        if t % C == 0:
            Wm0, Wn0 = Wm, Wn
        xt = x[:, t].view(B, H, d)
        k = torch.nn.functional.normalize(mlp(M, Wm0, xt), dim=-1, eps=1e-6)
        eta = 0.5 * torch.sigmoid(mlp(N, Wn0, xt).mean(-1))[..., None, None]  # [B, H, 1, 1]
        v = v_all[:, t]
        # gradients at the chunk's first weights, differentiable in them, k and v (the
        # outer level differentiates through them)
        gm, gn = _at(M, Wm0, k, v, mlp), _at(N, Wn0, k, v, mlp)
        read_n = mlp(N, Wn, xt)
        Wm = tuple(w - eta * g for w, g in zip(Wm, gm))
        Wn = tuple(0.9 * w - eta * g for w, g in zip(Wn, gn))
        ys.append((mlp(M, Wm, xt) + read_n).reshape(B, dim))
    return torch.stack(ys, 1), {"M": Wm, "N": Wn}


def _at(mem, W, k, v, mlp):
    """The l2 gradient at W as a differentiable function of W, k and v."""
    def loss(A, Bw):
        return 0.5 * (mlp(mem, (A, Bw), k) - v).pow(2).sum()
    return torch.func.grad(loss, argnums=(0, 1))(*W)


def built(prog, name: str, backend: str):
    """The module, its weights moved away from their initialization (seed 0)."""
    torch.manual_seed(0)
    mod = prog.build(name, backend=backend)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mod


def same_gradients(mod, x, y, want) -> None:
    """The input's and every weight's gradients of one loss of y and of want: the outer
    level's gradients run through every chunk's first state."""
    g = torch.randn_like(y)
    params = [x, *mod.parameters()]
    for a, b in zip(torch.autograd.grad((y * g).sum(), params),
                    torch.autograd.grad((want * g).sum(), params), strict=True):
        close(a, b)


def streams_as_one(mod, x, whole, end, cuts=(3, 9)) -> None:
    """x fed in calls cut at `cuts` gives the outputs `whole` and final state `end` of one
    pass."""
    state, pieces = None, []
    for a, b in zip((0, *cuts), (*cuts, x.shape[1])):
        y, state = mod(x[:, a:b], state=state, return_state=True)
        pieces.append(y)
    close(torch.cat(pieces, 1), whole)
    for a, b in zip(leaves(state), leaves(end), strict=True):
        close(a, b)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("T", [3, 4, 11])
def test_reads_above_a_declaration_equal_the_token_loop(backend, T):
    mod = built(AHEAD, "Ahead", backend)
    x = torch.randn(2, T, 8, requires_grad=True)
    y, state = mod(x, return_state=True)
    want, weights = token_loop(mod, x)
    close(y, want)
    for name in ("M", "N"):
        for a, b in zip(state[name]["M"], weights[name]):
            close(a, b)
    same_gradients(mod, x, y, want)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_reads_above_a_declaration_stream(backend):
    mod = built(AHEAD, "Ahead", backend)
    x = torch.randn(2, 13, 8)
    whole, end = mod(x, return_state=True)
    streams_as_one(mod, x, whole, end, (3, 9, 10))  # cuts inside chunks, and on a boundary


def test_the_graph_and_explain_show_a_read_at_the_chunks_start():
    g = AHEAD.graph("Ahead")
    assert g.nodes["M"]["start_reads"] and g.nodes["N"]["start_reads"]
    labels = {(u, v): d.get("label") for u, v, d in g.edges(data=True)}
    assert labels["M", "k"] == "at chunk start" and labels["N", "eta"] == "at chunk start"
    # the output reads both after their writes: no label
    assert labels["M", "output"] is None
    text = explain(AHEAD, "Ahead")
    assert "k       signal  <- M (at chunk start), x" in text
    assert "read early     above its declaration, at the start of each chunk, by k" in text
    assert "read above its declaration at each chunk's first weights" in text


def test_a_block_of_the_memories_runs_in_pieces_that_end_at_their_chunks():
    mod = built(AHEAD, "Ahead", "chunked")
    seen = []
    original = mod.run

    def run(env, x):
        seen.append(x.shape[1])
        return original(env, x)

    mod.run = run
    mod(torch.randn(1, 11, 8))
    assert seen == [4, 4, 3]
    _, state = mod(torch.randn(1, 6, 8), return_state=True)
    seen.clear()
    mod(torch.randn(1, 7, 8), state=state)  # 6 tokens in: the chunk ends after 2 more
    assert seen == [2, 4, 1]


WRITE_ONLY = spec("""
    block W(dim = 8) {
        input x : [T, dim]
        let v = x |> linear(dim)
        memory M : STRUCTURE = meta every token in chunks of 4 {
            key x; value v; objective l2(M(x), v); rule gd(lr = 0.5)
        }
        output READ
    }
""")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("structure", ["mlp(dim)", "matrix(dim, dim)"])
def test_a_memory_that_nothing_reads_still_learns(structure, backend):
    """Its returned state is the one a read would have left (it used to be missing); an MLP
    memory computes no read for it (settle)."""
    def build(read):
        text = WRITE_ONLY.replace("STRUCTURE", structure).replace("READ", read)
        torch.manual_seed(0)
        return nestc.loads(text, "w.nest").build("W", backend=backend)

    silent, reading = build("v"), build("v + 0 * M(x)")
    silent.load_state_dict(reading.state_dict())
    x = torch.randn(2, 6, 8)
    _, a = silent(x, return_state=True)
    _, b = reading(x, return_state=True)
    assert a.keys() == b.keys() == {"M"}
    for p, q in zip(leaves(a), leaves(b), strict=True):
        close(p, q)
    source = nestc.loads(WRITE_ONLY.replace("STRUCTURE", structure).replace("READ", "v"),
                         "w.nest").source("W")
    assert ("self.M.settle(_env)" in source) == structure.startswith("mlp")


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("read_before", [False, True])
@pytest.mark.parametrize("rule", ["gd", "retain", "momentum", "clip"])
def test_an_mlp_memory_chunk_without_a_query_leaves_the_state_of_one_with(rule, read_before,
                                                                          group):
    """nestc.ops' chunk step with q=None (a memory nothing reads after its writes) computes
    no read, and the same weights and momenta, with the same gradients."""
    from nestc.ops.mlp_memory.reference import mlp_memory_chunk

    torch.manual_seed(0)
    N, H, n, d, h = 2 if group == 1 else 1, 2, 6, 4, 8
    steps = n // group
    q, k, v = (torch.randn(N, H, n, d) for _ in range(3))
    lr = torch.rand(N, H, n)
    retain = 0.8 + 0.2 * torch.rand(N, H, steps) if rule in ("retain", "momentum") else None
    beta = 0.9 * torch.rand(N, H, steps) if rule == "momentum" else None
    A, B = torch.randn(N, H, d, h), torch.randn(N, H, h, d)
    SA, SB = torch.randn_like(A), torch.randn_like(B)
    ins = [t.requires_grad_() for t in (k, v, lr, A, B, SA, SB)]
    clip = 0.5 if rule == "clip" else None

    def run(query):
        return mlp_memory_chunk(query, k, v, lr, retain, beta, A, B, SA, SB, "gelu", clip,
                                read_before, residual=True, group=group)

    y, *state = run(q)
    none, *alone = run(None)
    assert y is not None and none is None
    w = [torch.randn_like(t) for t in state]
    for a, b in zip(state, alone, strict=True):
        close(a, b)
    for a, b in zip(torch.autograd.grad(sum((s * u).sum() for s, u in zip(state, w)), ins),
                    torch.autograd.grad(sum((s * u).sum() for s, u in zip(alone, w)), ins),
                    strict=True):
        close(a, b)


def test_reads_above_a_declaration_are_refused_where_not_built(error_of):
    cache = spec("""
        block B(dim = 8) {
            input x : [T, dim]
            let k = C(x)
            memory C : cache every token { key x; value x }
            output softmax_attention(k, C)
        }
    """)
    with pytest.raises(nestc.NestError) as info:
        nestc.loads(cache, "m.nest").build("B")
    err = str(info.value)
    assert "m.nest:3:13" in err and "above its declaration" in err and \
        "built for memories with weights" in err
    bare = error_of("""
        block B(dim = 8) {
            input x : [T, dim]
            let k = M
            memory M : mlp(dim) = meta every token { key x; value x;
                objective l2(M(x), x); rule gd(lr = 0.5) }
            output k
        }
    """)
    assert "t.nest:3:13" in bare and "declared further down" in bare and "`M(x)`" in bare
    assert "t.nest:4:12: note: declared here" in bare
    cache_bare = error_of("""
        block B(dim = 8) {
            input x : [T, dim]
            let y = softmax_attention(x, C)
            memory C : cache every token { key x; value x }
            output y
        }
    """)
    assert "t.nest:3:34" in cache_bare and "a cache cannot be used above its declaration" in \
        cache_bare
    inner = error_of("""
        block B(dim = 8, on = true) {
            input x : [T, dim]
            let k = M(x)
            if on {
                memory M : mlp(dim) = meta every token { key x; value x;
                    objective l2(M(x), x); rule gd(lr = 0.5) }
            }
            output k
        }
    """)
    assert "t.nest:3:13" in inner and "unknown name `M`" in inner
    wide = spec("""
        block B(dim = 8) {
            input x : [T, dim]
            let k = M(x) |> linear(4)
            memory M : mlp(4) per head = meta every token { key k; value k;
                objective l2(M(k), k); rule gd(lr = 0.5) }
            output M(x |> linear(8))
        }
    """)
    with pytest.raises(nestc.NestError, match="w.nest:3:13.*8 features, but its keys have 4"):
        nestc.loads(wide, "w.nest").build("B")


def test_pictures_draw_reads_at_a_chunks_start_dashed():
    from nestc.viz import START_DASH, render, view

    g = AHEAD.graph("Ahead")
    levels = view(g, "levels")
    starts = {(u, v) for u, v, d in levels.edges(data=True) if d.get("start")}
    assert ("M", "N") in starts and ("N", "M") in starts  # k and eta, read at chunk starts
    svg = render(g, "svg", "levels")
    assert f'stroke-dasharray="{START_DASH}"' in svg
    assert "read at the start of each chunk" in svg
    dot = render(g, "dot", "full")
    assert '"M" -> "k" [color="#4d4d4d", style=dashed' in dot
    assert '"M" -> "output" [color="#4d4d4d", style=solid' in dot
    titans = render(nestc.load("std/memory/titans.nest").graph("Titans", dim=8), "svg", "levels")
    assert "read at the start of each chunk" not in titans


MATRIX = spec("""
    block Mat(dim = 8, heads = 2, chunk = 4) {
        input x : [T, dim]
        let k = M(x) |> l2norm(per = heads)
        let beta = sigmoid(mean(M(x), per = heads))
        memory M : matrix(dim / heads, dim / heads) per head = INIT every token in chunks of chunk {
            STATE
            key k; value x
            objective l2(M(k), x)
            rule gd(lr = beta)
        }
        output M(x) + k
    }
""")


def matrix_loop(mod, x: torch.Tensor, shared: bool, momentum: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule token by token, its key and rate read at each chunk's first state:
    S_t = S_{t-1} - beta_t k_t^T (k_t S_{t-1} - x_t), summed over the batch when shared;
    with `momentum` m, that term goes through P_t = m P_{t-1} - (it), S_t = S_{t-1} + P_t."""
    H, C = 2, 4
    B, T, dim = x.shape
    d = dim // H
    init = getattr(mod.M, "initial", None)
    S = torch.zeros(H, d, d) if init is None else init
    if not shared:
        S = S.expand(B, H, d, d)
    read = "bhk,hkv->bhv" if shared else "bhk,bhkv->bhv"
    P = torch.zeros_like(S)
    ys = []
    for t in range(T):
        if t % C == 0:
            S0 = S
        xt = x[:, t].view(B, H, d)
        at_start = torch.einsum(read, xt, S0)
        k = torch.nn.functional.normalize(at_start, dim=-1, eps=1e-6)
        beta = torch.sigmoid(at_start.mean(-1))[..., None, None]  # [B, H, 1, 1]
        err = torch.einsum(read, k, S) - xt
        step = beta * k[..., :, None] * err[..., None, :]
        step = step.sum(0) if shared else step
        if momentum is not None:
            P = momentum * P - step
            S = S + P
        else:
            S = S - step
        ys.append((torch.einsum(read, xt, S) + k).reshape(B, dim))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("init", ["zeros", "meta"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_a_matrix_memory_read_above_its_declaration_equals_the_token_loop(backend, init,
                                                                           shared, momentum):
    text = MATRIX.replace("INIT", init).replace("STATE", "state shared" if shared else "")
    if momentum is not None:  # Titans' momentum: the token loop on every tier
        text = text.replace("rule gd(lr = beta)", f"rule momentum(lr = beta, beta = {momentum})")
    mod = built(nestc.loads(text, "mat.nest"), "Mat", backend)
    x = torch.randn(2, 11, 8, requires_grad=True)
    y, state = mod(x, return_state=True)
    want, S = matrix_loop(mod, x, shared, momentum)
    close(y, want)
    close(state["M"]["S"], S)
    assert state["M"]["offset"] == 3
    assert ("momentum" in state["M"]) == (momentum is not None)
    same_gradients(mod, x, y, want)
    streams_as_one(mod, x, y, state)


def test_a_matrix_memory_read_above_its_declaration_needs_its_chunk_written():
    text = MATRIX.replace("INIT", "zeros").replace("STATE", "").replace(
        " in chunks of chunk", "")
    with pytest.raises(nestc.NestError, match=r"mat.nest:3:13.*has no chunk size"):
        nestc.loads(text, "mat.nest").build("Mat")


PERIODIC = spec("""
    block Slow(dim = 8, heads = 2, period = 4) {
        input x : [T, dim]
        let k = M(x) |> l2norm(per = heads)
        let beta = sigmoid(mean(M(x), per = heads))
        memory M : matrix(dim / heads, dim / heads) per head = meta every period tokens {
            key k; value x
            objective l2(M(k), x)
            rule gd(lr = beta)
        }
        output M(x) + k
    }
""")


def periodic_loop(mod, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights frozen for a period of 4; k and beta read them; the period's gradients summed
    at them and applied at its last token, which reads the update (read after write)."""
    H, P = 2, 4
    B, T, dim = x.shape
    d = dim // H
    W = mod.M.initial.expand(B, H, d, d)
    g = torch.zeros_like(W)
    ys = []
    for t in range(T):
        xt = x[:, t].view(B, H, d)
        at_start = torch.einsum("bhk,bhkv->bhv", xt, W)
        k = torch.nn.functional.normalize(at_start, dim=-1, eps=1e-6)
        beta = torch.sigmoid(at_start.mean(-1))[..., None, None]
        err = torch.einsum("bhk,bhkv->bhv", k, W) - xt
        g = g + beta * k[..., :, None] * err[..., None, :]
        if (t + 1) % P == 0:
            W, g = W - g, torch.zeros_like(g)
        ys.append((torch.einsum("bhk,bhkv->bhv", xt, W) + k).reshape(B, dim))
    return torch.stack(ys, 1), W


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_a_periodic_memory_read_above_its_declaration_equals_the_token_loop(backend):
    mod = built(nestc.loads(PERIODIC, "slow.nest"), "Slow", backend)
    x = torch.randn(2, 11, 8, requires_grad=True)
    y, state = mod(x, return_state=True)
    want, W = periodic_loop(mod, x)
    close(y, want)
    close(state["M"]["W"][0], W)
    same_gradients(mod, x, y, want)
    streams_as_one(mod, x, y, state)


def test_memories_whose_weights_hold_for_a_chunk_read_above_as_below():
    """A memory that never learns in context, or a CMS level (its weights change only at its
    chunk's end), reads above its declaration what it reads below it."""
    below = spec("""
        model L(vocab = 16, dim = 8) {
            input tokens : [T] int
            let h = embed(tokens, vocab, dim)
            memory S : mlp(dim) = meta never
            memory F : mlp(dim) = meta every 4 tokens { objective task; rule gd(lr = 0.1) }
            let y = S(h) + F(h)
            output logits = y |> linear(vocab)
            train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
        }
    """)
    lines = below.splitlines()
    above = "\n".join([*lines[:3], lines[5], *lines[3:5], *lines[6:]])
    assert "let y" in above.splitlines()[3]
    tokens = torch.randint(0, 16, (2, 11))
    outs = []
    for text in (below, above):
        torch.manual_seed(0)
        outs.append(nestc.loads(text, "l.nest").build("L")(tokens))
    close(outs[0], outs[1])


# the scope of a read above: bodies, passes of repeat and chain, the declaration's values ---

REPEATED = spec("""
    block B(dim = 8, chunk = 4) {
        input x : [T, dim]
        let h = x
        repeat 2 {
            let k = M(h)
            memory M : mlp(dim) = meta every token in chunks of chunk {
                key k; value h
                objective l2(M(k), h); rule gd(lr = 0.1)
            }
            h = h + M(h)
        }
        output h
    }
""")
UNROLLED = spec("""
    block B(dim = 8, chunk = 4) {
        input x : [T, dim]
        let h = x
        let k = M0(h)
        memory M0 : mlp(dim) = meta every token in chunks of chunk {
            key k; value h
            objective l2(M0(k), h); rule gd(lr = 0.1)
        }
        h = h + M0(h)
        let k2 = M1(h)
        memory M1 : mlp(dim) = meta every token in chunks of chunk {
            key k2; value h
            objective l2(M1(k2), h); rule gd(lr = 0.1)
        }
        h = h + M1(h)
        output h
    }
""")


def test_each_pass_of_a_repeat_reads_its_own_memory_at_its_chunks_start():
    """The second pass's read above is of the second pass's memory (it once read the first
    pass's, after its writes)."""
    torch.manual_seed(0)
    repeated = nestc.loads(REPEATED, "r.nest").build("B")
    unrolled = nestc.loads(UNROLLED, "u.nest").build("B")
    assert [m.name for m in repeated.starts] == ["M", "M"]
    unrolled.load_state_dict(dict(zip(unrolled.state_dict(), repeated.state_dict().values())))
    x = torch.randn(2, 11, 8)
    close(repeated(x), unrolled(x))


def test_a_read_above_reads_the_memory_the_checker_means():
    """A memory of the name declared in an earlier branch is not the one read above the
    outer declaration; a builtin of the name stays the builtin."""
    shadowed = nestc.loads(spec("""
        block B(dim = 8, on = true) {
            input x : [T, dim]
            if on {
                memory M : mlp(dim) = meta every token in chunks of 4 { key x; value x
                    objective l2(M(x), x); rule gd(lr = 0.1) }
                let z = M(x)
            }
            let k = M(x)
            memory M : mlp(dim) = meta every token in chunks of 4 { key k; value x
                objective l2(M(k), x); rule gd(lr = 0.1) }
            output M(x) + k
        }
    """), "s.nest")
    source = shadowed.source("B")
    assert "z = self.M.read(x, _env)" in source and "k = self.M_1.read_start(x, _env)" in source
    builtin = nestc.loads(spec("""
        block B(dim = 8) {
            input x : [T, dim]
            let y = sigmoid(x)
            memory sigmoid : mlp(dim) = meta every token in chunks of 4 { key x; value x
                objective l2(sigmoid(x), x); rule gd(lr = 0.1) }
            output y + sigmoid(x)
        }
    """), "b.nest")
    assert "y = torch.sigmoid(x)" in builtin.source("B")


def test_a_memory_read_above_is_built_from_its_declarations_values():
    rebound = nestc.loads(spec("""
        block B(dim = 8) {
            input x : [T, dim]
            let c = 2
            let w = 8
            let k = M(x)
            c = 4
            chain w in [2, 4] { let u = M(x) }
            memory M : mlp(dim, hidden = w) = meta every token in chunks of c {
                key k; value x
                objective l2(M(k), x); rule gd(lr = 0.1)
            }
            output M(x)
        }
    """), "r.nest").build("B")
    assert (rebound.M.chunk, rebound.M.hidden) == (4, 8)
    # a nested CMS level read above, its parent declared between the read and it
    nested = nestc.loads(spec("""
        block B(dim = 8) {
            input x : [T, dim]
            let y = F(x)
            memory S : mlp(dim) = meta every 8 tokens { objective task; rule gd(lr = 0.1) }
            memory F : mlp(dim) = S every 4 tokens { objective task; rule gd(lr = 0.1) }
            output y + F(x)
        }
    """), "n.nest").build("B")
    x = torch.randn(2, 10, 8)
    assert nested(x, task=lambda y, a, b: y.pow(2).sum()).shape == x.shape


def test_a_matrix_memory_read_above_flushes_its_chunk_at_a_calls_end():
    text = MATRIX.replace("INIT", "meta").replace("STATE", "partial chunk flush")
    mod = built(nestc.loads(text, "mat.nest"), "Mat", "chunked")
    assert mod.flushing == [mod.M]
    _, state = mod(torch.randn(1, 3, 8), return_state=True)
    assert state["M"]["offset"] == 0 and state["M"]["start"] is None


def test_memories_read_at_their_chunks_starts_leave_cms_levels_as_they_were():
    """Their chunks cut the input into more pieces, but a CMS level's gradient stays that of
    its own piece: `0 * P(h)` with P in chunks of 2 equals `0 * h`."""
    text = spec("""
        model L(vocab = 16, dim = 8) {
            input tokens : [T] int
            let h = embed(tokens, vocab, dim) * 0.3
            let z = ZERO
            memory F : mlp(dim) = meta every 8 tokens { objective task; rule gd(lr = 0.5) }
            let y = h + F(h) + z
            memory N : mlp(dim) = meta every token in chunks of 8 {
                key y; value y
                objective l2(N(y), y); rule gd(lr = 0.2)
            }
            memory P : mlp(dim) = meta every token in chunks of 2 {
                key h; value h
                objective l2(P(h), h); rule gd(lr = 0.05)
            }
            output logits = (y + N(y)) |> linear(vocab)
            train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
        }
    """)
    plain, cut = (nestc.loads(text.replace("ZERO", z), "l.nest").build("L")
                  for z in ("0 * h", "0 * P(h)"))
    cut.load_state_dict(plain.state_dict())
    assert cut.starts == [cut.P]
    tokens = torch.randint(0, 16, (2, 16))
    (ya, sa), (yb, sb) = plain(tokens, return_state=True), cut(tokens, return_state=True)
    close(ya, yb)
    for a, b in zip(sa["F"]["W"], sb["F"]["W"], strict=True):
        close(a, b)
