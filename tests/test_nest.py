"""The nest graph: levels, frequencies, level order and typed edges."""

from __future__ import annotations

import subprocess
import sys

import networkx as nx
import pytest

import nestc
from nestc.check import CHOICES
from nestc.nest import EDGE_KINDS, LEVEL_KINDS, levels

# The BRIEF's sketches (DeltaNet, HopeLM as in /tmp/t1.nest) plus a minimal Hope block: a
# self-modifying memory (its key memory Mk generates the keys of M) and a CMS chain.
HOPE_SPEC = """\
from "std/optim/adam.nest" import AdamW

block DeltaNet(dim, heads = 4, chunk = 64) {
    input x : [T, dim]
    let q = x |> linear(dim) |> silu |> l2norm(per = heads)
    let k = x |> linear(dim) |> silu |> l2norm(per = heads)
    let v = x |> linear(dim) |> silu
    let beta = x |> linear(heads) |> sigmoid
    memory M : matrix(dim / heads, dim / heads) per head = zeros every token in chunks of chunk {
        key k; value v; objective l2(M(k), v); rule gd(lr = beta)
    }
    output M(q) |> linear(dim)
}

block Hope(dim, chunks = [16, 256], chunk = 16) {
    input x : [T, dim]
    let q = x |> linear(dim) |> l2norm
    memory Mk : residual_mlp(dim) = meta every token in chunks of chunk {
        key x; value Mk(x); objective l2(Mk(x), Mk(x)); rule dgd(lr = 0.01, retain = 0.99)
    }
    let k = Mk(x) |> l2norm
    let v = x |> linear(dim)
    let eta = x |> linear(1) |> softplus
    let alpha = x |> linear(1) |> sigmoid
    memory M : residual_mlp(dim) = meta every token in chunks of chunk {
        key k; value M(v); objective l2(M(k), M(v)); rule dgd(lr = eta, retain = alpha)
        read before write
    }
    let o = M(q)
    chain c in chunks {
        memory C : residual_mlp(dim) = meta every c tokens {
            objective task; rule gd(lr = 1e-3)
        }
        o = C(o)
    }
    output o
}

model HopeLM(vocab = 256, dim = 128, depth = 4, chunks = [16, 256]) {
    input tokens : [T] int
    let h = embed(tokens, vocab, dim)
    repeat depth { h = h + Hope(dim, chunks = chunks)(rmsnorm(h)) }
    output logits = h |> rmsnorm |> linear(vocab)
    train every step {
        objective cross_entropy(logits, next(tokens))
        rule AdamW(lr = 4e-4, weight_decay = 0.1)
    }
}
"""


def load_sketch(text: str = HOPE_SPEC) -> nestc.Program:
    return nestc.loads(text, filename="sketch.nest")


def edge_kinds(g: nx.MultiDiGraph, u: str, v: str) -> set[str]:
    return {d["kind"] for d in (g.get_edge_data(u, v) or {}).values()}


def edge_label(g: nx.MultiDiGraph, u: str, v: str, kind: str) -> str | None:
    return next(d.get("label") for d in g.get_edge_data(u, v).values() if d["kind"] == kind)


@pytest.fixture(scope="module")
def sketch() -> nestc.Program:
    return load_sketch()


@pytest.fixture(scope="module")
def hope(sketch: nestc.Program) -> nx.MultiDiGraph:
    return sketch.graph("HopeLM")


# --- optimizers -------------------------------------------------------------------------------


def test_adam_levels() -> None:
    g = nestc.load("std/optim/adam.nest").graph("Adam")
    assert isinstance(g, nx.MultiDiGraph)
    assert g.graph["name"] == "Adam" and g.graph["kind"] == "optimizer"
    assert g.graph["hyper"] == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                "weight_decay": 0.0}
    assert levels(g) == ["m", "v", "W"]
    m, v, w = (g.nodes[n] for n in ("m", "v", "W"))
    assert (m["kind"], v["kind"], w["kind"]) == ("memory", "memory", "param")
    assert (m["level"], v["level"], w["level"]) == (0, 0, 1)
    assert m["parallel"] == ["v"] and v["parallel"] == ["m"] and w["parallel"] == []
    assert w["after"] == ["m", "v"]
    for a in (m, v, w):
        assert (a["frequency"], a["unit"], a["period"], a["chunk"]) == ("every step", "step", 1,
                                                                          None)
        assert a["repeat"] == 1
    assert m["objective"] == "l2(m, g)"
    assert m["rule"] == "gd(lr = 1 - betas[0])"
    assert m["init"] == "zeros_like(W)"
    assert m["choices"] == {k: d for k, (d, _) in CHOICES.items()}
    assert m["explicit"] == ()
    assert w["rule"] == "W -= lr * debias(m, betas[0]) / (sqrt(debias(v, betas[1])) + eps)"
    assert w["objective"] is None
    assert m["span"].line == 17 and m["span"].file == "std/optim/adam.nest"


def test_adam_edges() -> None:
    g = nestc.load("std/optim/adam.nest").graph("Adam")
    assert {n: a["kind"] for n, a in g.nodes(data=True) if a["kind"] not in LEVEL_KINDS} == {
        "grad(W)": "signal", "g": "signal"}
    assert edge_kinds(g, "W", "grad(W)") == {"generation"}
    assert edge_kinds(g, "grad(W)", "g") == {"flow"}
    assert edge_kinds(g, "g", "m") == {"flow"} and edge_label(g, "g", "m", "flow") == "objective"
    assert edge_kinds(g, "g", "v") == {"flow"}
    assert edge_kinds(g, "m", "W") == {"read"} and edge_kinds(g, "v", "W") == {"read"}
    # weight_decay = 0 multiplies W away; a nonzero decay reads W into the gradient
    assert not g.has_edge("W", "g")
    decayed = nestc.load("std/optim/adam.nest").graph("Adam", weight_decay=0.1)
    assert edge_kinds(decayed, "W", "g") == {"read"}
    assert decayed.graph["hyper"]["weight_decay"] == 0.1
    assert all(d["kind"] in EDGE_KINDS for _, _, d in g.edges(data=True))


def test_adamw_levels() -> None:
    g = nestc.load("std/optim/adam.nest").graph("AdamW")
    assert [(n, g.nodes[n]["level"]) for n in levels(g)] == [("m", 0), ("v", 0), ("W", 1)]
    assert g.nodes["W"]["rule"].count(";") == 1  # both updates of W, in order
    assert g.nodes["W"]["rule"].startswith("W -= lr * weight_decay * W;")


def test_sgd_momentum_buffer_below_the_weights() -> None:
    prog = nestc.load("std/optim/sgd.nest")
    g = prog.graph("SGD", momentum=0.9)
    assert levels(g) == ["buf", "W"]
    assert g.nodes["buf"]["level"] == 0 and g.nodes["W"]["level"] == 1
    assert g.nodes["W"]["after"] == ["buf"]
    assert g.nodes["buf"]["init"] == "from g"
    assert edge_kinds(g, "g", "buf") == {"init", "flow"}
    assert edge_label(g, "g", "buf", "init") == "from"
    assert edge_kinds(g, "buf", "W") == {"read"}
    assert g.nodes["W"]["rule"] == "W -= lr * buf"
    nesterov = prog.graph("SGD", momentum=0.9, nesterov=True)
    assert nesterov.nodes["W"]["rule"] == "W -= lr * (g + momentum * buf)"
    assert edge_kinds(nesterov, "g", "W") == {"flow"}


def test_sgd_without_momentum_has_one_level() -> None:
    g = nestc.load("std/optim/sgd.nest").graph("SGD")
    assert levels(g) == ["W"]
    assert g.nodes["W"]["level"] == 0 and g.nodes["W"]["rule"] == "W -= lr * g"


def test_slow_momentum_sits_above_the_step_levels() -> None:
    prog = nestc.loads("""
optimizer Slow(lr = 0.1, f = 10) {
    param W
    let g = grad(W)
    memory m = zeros_like(W) every step { objective l2(m, g); rule gd(lr = 0.1) }
    memory s = zeros_like(W) every f steps { objective l2(s, m); rule gd(lr = 0.5) }
    W -= lr * (m + s)
}
""")
    g = prog.graph("Slow")
    assert [(n, g.nodes[n]["level"]) for n in levels(g)] == [("m", 0), ("W", 1), ("s", 2)]
    assert g.nodes["s"]["frequency"] == "every 10 steps" and g.nodes["s"]["period"] == 10
    assert prog.graph("Slow", f=1).nodes["s"]["frequency"] == "every step"


def test_unknown_hyperparameter_is_a_nest_error() -> None:
    with pytest.raises(nestc.NestError, match="has no hyperparameter `lrr`"):
        nestc.load("std/optim/adam.nest").graph("Adam", lrr=0.1)


# --- blocks -----------------------------------------------------------------------------------


def test_deltanet(sketch: nestc.Program) -> None:
    g = sketch.graph("DeltaNet", dim=64)
    assert g.graph["kind"] == "block" and g.graph["hyper"] == {"dim": 64, "heads": 4, "chunk": 64}
    m = g.nodes["M"]
    assert (m["kind"], m["frequency"], m["unit"], m["period"], m["chunk"], m["level"]) == (
        "memory", "every token", "token", 1, 64, 0)
    assert m["per_head"] and m["structure"] == "matrix(dim / heads, dim / heads)"
    assert g.nodes["x"]["kind"] == "input"
    params = [n for n in levels(g) if g.nodes[n]["kind"] == "param"]
    assert params == ["q.linear", "k.linear", "v.linear", "beta.linear", "output.linear"]
    assert all(g.nodes[p]["level"] == 1 and g.nodes[p]["frequency"] == "every step"
               for p in params)
    assert g.nodes["beta.linear"]["structure"] == "linear(4)"
    assert edge_label(g, "k", "M", "flow") == "key, objective"
    assert edge_label(g, "v", "M", "flow") == "value, objective"
    assert edge_label(g, "beta", "M", "flow") == "lr"
    assert edge_kinds(g, "q.linear", "q") == {"read"}
    assert edge_kinds(g, "M", "output") == {"read"}
    assert g.nodes["output"]["kind"] == "signal" and g.nodes["output"]["output"]


def test_chunk_override(sketch: nestc.Program) -> None:
    assert sketch.graph("DeltaNet", dim=64, chunk=32).nodes["M"]["chunk"] == 32


def test_read_before_write_makes_memories_parallel() -> None:
    text = """
block Two(dim = 8) {
    input x : [T, dim]
    memory A : matrix(dim, dim) = zeros every token { key x; value x; objective l2(A(x), x); rule gd(lr = 0.5) }
    let y = A(x)
    memory B : matrix(dim, dim) = zeros every token { key y; value x; objective l2(B(y), x); rule gd(lr = 0.5) }
    output B(x)
}
"""
    g = nestc.loads(text).graph("Two")
    assert (g.nodes["A"]["level"], g.nodes["B"]["level"]) == (0, 1)
    assert g.nodes["B"]["after"] == ["A"]
    before = text.replace("rule gd(lr = 0.5) }\n    let y", "rule gd(lr = 0.5); read before write }\n    let y")
    g = nestc.loads(before).graph("Two")
    assert (g.nodes["A"]["level"], g.nodes["B"]["level"]) == (0, 0)
    assert g.nodes["A"]["parallel"] == ["B"]
    assert g.nodes["A"]["choices"]["read"] == "before write"
    assert g.nodes["A"]["explicit"] == ("read",)


def test_never_memory_sits_with_the_step_levels() -> None:
    g = nestc.loads("""
model Mlp(dim = 8) {
    input x : [T, dim]
    memory P : mlp(dim) = meta never
    memory F : matrix(dim, dim) = zeros every 4 tokens { key x; value x; objective l2(F(x), x); rule gd(lr = 0.1) }
    output y = P(x) + F(x) |> linear(dim)
    train every step { objective l2(y, x); rule gd(lr = 0.1) }
}
""").graph("Mlp")
    p, f, w = g.nodes["P"], g.nodes["F"], g.nodes["y.linear"]
    assert (p["unit"], p["frequency"]) == ("never", "never")
    assert f["level"] == 0 and p["level"] == w["level"] == 1 and g.nodes["train"]["level"] == 1
    assert edge_kinds(g, "train", "P") == {"init"}
    assert edge_kinds(g, "train", "y.linear") == {"backprop"}
    assert edge_kinds(g, "x", "F") == {"flow"}


# --- the HopeLM sketch ------------------------------------------------------------------------


def test_hope_levels_fastest_first(hope: nx.MultiDiGraph) -> None:
    assert hope.graph == {"name": "HopeLM", "kind": "model", "file": "sketch.nest",
                          "hyper": {"vocab": 256, "dim": 128, "depth": 4, "chunks": [16, 256]},
                          "requires": []}
    memories = [n for n in levels(hope) if hope.nodes[n]["kind"] == "memory"]
    assert memories == ["Hope.Mk", "Hope.M", "Hope.C[16]", "Hope.C[256]", "AdamW.m", "AdamW.v"]
    level = {n: hope.nodes[n]["level"] for n in levels(hope)}
    assert [level[n] for n in memories[:4]] == [0, 1, 2, 3]
    # Mk writes the keys M reads at the same token: Mk is the faster of the two
    assert hope.nodes["Hope.M"]["after"] == ["Hope.Mk"]
    assert hope.nodes["Hope.M"]["choices"]["read"] == "before write"
    params = [n for n in levels(hope) if hope.nodes[n]["kind"] == "param"]
    assert {level[p] for p in params} == {4}
    assert level["AdamW.m"] == level["AdamW.v"] == 4
    assert levels(hope)[-1] == "train" and level["train"] == 5
    assert hope.nodes["train"]["after"] == ["AdamW.m", "AdamW.v"]


def test_hope_cms_levels_ordered_by_chunk(hope: nx.MultiDiGraph, sketch: nestc.Program) -> None:
    c16, c256 = hope.nodes["Hope.C[16]"], hope.nodes["Hope.C[256]"]
    assert (c16["frequency"], c16["period"], c16["unit"]) == ("every 16 tokens", 16, "token")
    assert (c256["frequency"], c256["period"]) == ("every 256 tokens", 256)
    assert c16["objective"] == "task" and c16["init"] == "meta"
    assert edge_label(hope, "Hope.o", "Hope.C[16]", "flow") == "input"
    assert edge_label(hope, "Hope.o[16]", "Hope.C[256]", "flow") == "input"
    three = sketch.graph("HopeLM", chunks=[512, 8, 64])
    cms = [n for n in levels(three) if n.startswith("Hope.C[")]
    assert cms == ["Hope.C[8]", "Hope.C[64]", "Hope.C[512]"]
    assert [three.nodes[n]["level"] for n in cms] == [2, 3, 4]


def test_hope_repeat_is_expanded_once(hope: nx.MultiDiGraph) -> None:
    assert sum(1 for n in hope.nodes if n.endswith(".Mk")) == 1
    for n in ("Hope.Mk", "Hope.M", "Hope.C[16]", "Hope.q.linear", "h.rmsnorm", "h'"):
        assert hope.nodes[n]["repeat"] == 4, n
    for n in ("h.embed", "logits.linear", "train", "AdamW.m", "tokens"):
        assert hope.nodes[n]["repeat"] == 1, n


def test_hope_optimizer_states_and_transfer_edges(hope: nx.MultiDiGraph) -> None:
    m = hope.nodes["AdamW.m"]
    assert (m["kind"], m["frequency"], m["objective"]) == ("memory", "every step", "l2(m, g)")
    assert edge_kinds(hope, "train", "AdamW.m") == {"generation"}
    assert edge_kinds(hope, "AdamW.m", "train") == {"read"}
    for n in ("Hope.Mk", "Hope.M", "Hope.C[16]", "Hope.C[256]"):
        assert edge_kinds(hope, "train", n) == {"init"}
        assert edge_label(hope, "train", n, "init") == "meta"
    params = [n for n, a in hope.nodes(data=True) if a["kind"] == "param"]
    assert sorted(params) == sorted(["h.embed", "h.rmsnorm", "Hope.q.linear", "Hope.v.linear",
                                     "Hope.eta.linear", "Hope.alpha.linear", "logits.rmsnorm",
                                     "logits.linear"])
    for p in params:
        assert edge_kinds(hope, "train", p) == {"backprop"}
        assert hope.nodes[p]["rule"] == "AdamW(lr = 4e-4, weight_decay = 0.1)"
    t = hope.nodes["train"]
    assert (t["kind"], t["frequency"], t["objective"]) == (
        "train", "every step", "cross_entropy(logits, next(tokens))")
    assert edge_label(hope, "logits", "train", "flow") == "objective"
    assert edge_label(hope, "tokens", "train", "flow") == "objective"


def test_hope_context_flow(hope: nx.MultiDiGraph) -> None:
    assert hope.nodes["tokens"]["kind"] == "input"
    assert edge_kinds(hope, "h", "Hope.x") == {"flow"}
    assert edge_kinds(hope, "h.rmsnorm", "Hope.x") == {"read"}
    assert edge_label(hope, "Hope.x", "Hope.Mk", "flow") == "key, value, objective"
    assert edge_kinds(hope, "Hope.Mk", "Hope.k") == {"read"}
    assert edge_label(hope, "Hope.eta", "Hope.M", "flow") == "lr"
    assert edge_label(hope, "Hope.alpha", "Hope.M", "flow") == "retain"
    # `o = C(o)` in the chain makes a new version of o per level; the last one feeds h'
    assert edge_kinds(hope, "Hope.C[256]", "Hope.o[256]") == {"read"}
    assert edge_kinds(hope, "Hope.o[256]", "h'") == {"flow"}
    assert edge_kinds(hope, "h'", "logits") == {"flow"}


def test_graph_of_an_imported_optimizer(sketch: nestc.Program) -> None:
    g = sketch.graph("AdamW", lr=4e-4)
    assert levels(g) == ["m", "v", "W"] and g.graph["hyper"]["lr"] == 4e-4


def test_graph_does_not_import_torch() -> None:
    code = ("import sys, nestc\n"
            "g = nestc.load('std/optim/adam.nest').graph('Adam')\n"
            "assert g.number_of_nodes() == 5\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_optimizer_imported_under_an_alias_expands_into_levels() -> None:
    prog = nestc.loads(
        'import "std/optim/adam.nest" as A\n'
        "model M(dim = 4) {\n    input x : [T, dim]\n    output y = x |> linear(dim)\n"
        "    train every step { objective l2(y, x); rule A.AdamW(lr = 0.1) }\n}\n", "q.nest")
    g = prog.graph("M")
    assert {"AdamW.m", "AdamW.v", "train"} <= set(g.nodes)
    assert g.nodes["train"]["level"] > g.nodes["AdamW.m"]["level"]


INNER = """block Inner(dim) {
    input x : [T, dim]
    memory M : matrix(dim, dim) = zeros every token {
        key x; value x; objective l2(M(x), x); rule gd(lr = 0.1) }
    output M(x)
}
"""


def test_a_name_let_again_is_a_new_signal_not_the_old_one() -> None:
    """A second `let h` (and a `let h` in a repeat's body) was merged into the first h's node:
    B, keyed by the first h = x, was drawn learning from A's reading, and the repeat's output
    from its memory although the output is the outer h."""
    g = nestc.loads("""block R(dim = 8) {
    input x : [T, dim]
    let k = x |> linear(dim)
    memory A : matrix(dim, dim) = zeros every token {
        key k; value x; objective l2(A(k), x); rule gd(lr = 0.1) }
    let h = x
    memory B : matrix(dim, dim) = zeros every token {
        key h; value x; objective l2(B(h), x); rule gd(lr = 0.1) }
    let h = A(k)
    repeat 2 {
        memory M : matrix(dim, dim) = zeros every token {
            key x; value x; objective l2(M(x), x); rule gd(lr = 0.1) }
        let h = M(x)
    }
    output B(x) + h
}
""", "r.nest").graph("R")
    assert set(g.predecessors("h")) == {"x"} and set(g.predecessors("h'")) == {"A", "k"}
    assert set(g.predecessors("B")) == {"h", "x"}
    assert set(g.predecessors("output")) == {"B", "x", "h'"}  # B read at x
    assert g.nodes["A"]["level"] == g.nodes["B"]["level"]


def test_a_zero_coefficient_reads_nothing_but_its_layers_and_blocks_are_there() -> None:
    """`w * Inner(dim)(x)` with w = 0 (and `0 * linear(x, dim)`) dropped Inner's memory and the
    linear weight from the graph, which build makes; the product still feeds nothing."""
    g = nestc.loads(INNER + """block Z(dim = 8, w = 0.0) {
    input x : [T, dim]
    output x + w * Inner(dim)(x) + 0 * linear(x, dim)
}
""", "z.nest").graph("Z")
    assert g.nodes["Inner.M"]["kind"] == "memory"
    assert g.nodes["output.linear"]["kind"] == "param"
    assert set(g.predecessors("output")) == {"x"}


def test_a_repeat_of_zero_copies_draws_nothing_of_its_body() -> None:
    """`repeat 0` drew its body's levels ("x0", 4096 updates each) and a repeat inside it lost
    its count (0 is falsy): TitansLM at depth 0 showed 22 levels where build makes none."""
    g = nestc.load("std/models/titans.nest").graph("TitansLM", depth=0)
    assert not any(d["kind"] == "memory" and not d["label"].startswith("AdamW")
                   for _, d in g.nodes(data=True))
    g = nestc.loads(INNER + """block N(dim = 8, n = 0) {
    input x : [T, dim]
    let h = x
    repeat n { repeat 2 { h = h + Inner(dim)(h) } }
    output h
}
""", "n.nest").graph("N")
    assert [n for n, d in g.nodes(data=True) if d["kind"] == "memory"] == []
    assert set(g.predecessors("output")) == {"h"}


def test_blocks_called_again_are_named_as_the_module_names_them() -> None:
    """The graph named a block's second call Inner2, the module Inner_1: explain's levels and
    the state keys said different things."""
    prog = nestc.loads(INNER + """block Z(dim = 8) {
    input x : [T, dim]
    output Inner(dim)(x) + Inner(dim)(x) + Inner(dim)(Inner(dim)(x))
}
""", "z.nest")
    g = prog.graph("Z")
    memories = sorted(n for n, d in g.nodes(data=True) if d["kind"] == "memory")
    assert memories == ["Inner.M", "Inner_1.M", "Inner_2.M", "Inner_3.M"]
    assert set(g.predecessors("Inner_3.x")) == {"Inner_2.M", "Inner_2.x"}
    pytest.importorskip("torch")  # (the graph needs none; the build does)
    modules = {n for n, m in prog.build("Z").named_modules() if n.endswith(".M")}
    assert modules == set(memories)


def test_updates_in_the_branches_of_an_if_are_one_or_the_other() -> None:
    """A param's updates in both branches of a shape `if` were joined with `;`, as if both
    ran: Muon's read `W -= ...; W -= ...; W -= ...; W -= ...`."""
    g = nestc.loads("""optimizer S(lr: float = 0.1) {
    param W
    if ndim(W) >= 2 {
        W -= lr * W
        W -= lr * grad(W)
    } else {
        W -= 10 * lr * grad(W)
    }
}
""", "s.nest").graph("S")
    assert g.nodes["W"]["rule"] == "(W -= lr * W; W -= lr * grad(W)) or W -= 10 * lr * grad(W)"
    g = nestc.loads("optimizer S(lr: float = 0.1) {\n    param W\n"
                    "    if ndim(W) >= 2 { W -= lr * grad(W) }\n    W *= 0.5\n}\n",
                    "s.nest").graph("S")
    assert g.nodes["W"]["rule"] == "W -= lr * grad(W) or nothing; W *= 0.5"


def test_the_train_levels_frequency_reaches_the_weights_and_the_rules_states() -> None:
    """`train every 2 steps`: the weights and AdamW's m and v showed every step (1000
    updates in 1000 steps) under a train level of 500."""
    g = nestc.loads("""from "std/optim/adam.nest" import AdamW
model A(dim = 8, vocab = 16) {
    input t : [T] int
    output logits = embed(t, vocab, dim) |> linear(vocab)
    train every 2 steps { objective cross_entropy(logits, next(t)); rule AdamW(lr = 0.1) }
}
""", "a.nest").graph("A")
    for n in ("logits.linear", "AdamW.m", "AdamW.v", "train"):
        assert (g.nodes[n]["unit"], g.nodes[n]["period"]) == ("step", 2), n


def test_a_compound_update_of_a_signal_reads_it() -> None:
    """`g *= 2` made a new version g' fed by nothing: W's step lost its way back to grad(W)."""
    g = nestc.loads("""optimizer Z(lr = 1.0, a = true) {
    param W
    let g = grad(W)
    if a { g *= 2 }
    W -= lr * g
}
""", "z.nest").graph("Z")
    assert set(g.predecessors("g'")) == {"g"} and "g'" in set(g.predecessors("W"))
