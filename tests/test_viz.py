"""`nestc viz`: one layout drawn as SVG, HTML, DOT, Mermaid and PNG."""

from __future__ import annotations

import copy
import html.parser
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from itertools import combinations, permutations
from pathlib import Path

import networkx as nx
import pytest
from test_nest import load_sketch

import nestc
from nestc.cli import main
from nestc.nest import DATA_KINDS, LEVEL_KINDS, levels
from nestc.viz import (
    AUTO_FULL_MAX,
    LABEL_SIZE,
    collapse_signals,
    group_weights,
    layout,
    levels_view,
    render,
    text_width,
    view,
)

SVG_NS = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parents[1]

# A spec whose hyperparameters and rule carry every character the formats must escape.
ESC_SPEC = r"""
block Esc(dim = 8, tag = "a<b & \"c\" [d] {e} |f| #g") {
    input x : [T, dim]
    memory M : matrix(dim, dim) = zeros every token {
        key x; value x; objective l2(M(x), x)
        rule gd(lr = if tag == "q\"<&>" then 0.1 else 0.2)
    }
    output M(x)
}
"""
TAG = 'a<b & "c" [d] {e} |f| #g'


@pytest.fixture(scope="module")
def adam() -> nx.MultiDiGraph:
    return nestc.load("std/optim/adam.nest").graph("Adam")


@pytest.fixture(scope="module")
def hope() -> nx.MultiDiGraph:
    return load_sketch().graph("HopeLM")


@pytest.fixture(scope="module")
def esc() -> nx.MultiDiGraph:
    return nestc.loads(ESC_SPEC).graph("Esc")


def svg_texts(svg: str) -> list[str]:
    root = ET.fromstring(svg.encode())
    assert root.tag == f"{SVG_NS}svg"
    return ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]


# --- SVG --------------------------------------------------------------------------------------



def label_boxes(lay) -> list[tuple[float, float, float, float]]:
    """The (x0, y0, x1, y1) box of every edge label of a layout."""
    boxes = []
    for e in lay.edges:
        if e.label:
            assert e.label_at is not None
            w = text_width(e.label, LABEL_SIZE) + 6
            boxes.append((e.label_at[0] - w / 2, e.label_at[1] - 6, e.label_at[0] + w / 2,
                          e.label_at[1] + 6))
    return boxes

def test_svg_parses_and_names_every_node(adam: nx.MultiDiGraph, hope: nx.MultiDiGraph) -> None:
    for g in (adam, hope):
        svg = render(g, "svg", detail="full")
        assert isinstance(svg, str) and svg.startswith("<?xml")
        texts = svg_texts(svg)
        for n, a in g.nodes(data=True):
            label = n + (f"  ×{a['repeat']}" if a["kind"] in LEVEL_KINDS and a["repeat"] != 1
                         else "")
            assert label in texts, label
    texts = svg_texts(render(adam, "svg"))
    assert "optimizer Adam" in texts and "every step" in texts and "levels 0–1" in texts
    assert "L1 · every step" in texts
    assert "l2(m, g) · gd(lr = 1 - betas[0])" in texts
    for kind in ("flow", "read", "init", "generation", "backprop"):
        assert any(t.startswith(f"{kind} (") for t in texts), kind


def test_svg_is_self_contained(hope: nx.MultiDiGraph) -> None:
    svg = render(hope, "svg")
    assert "<image" not in svg and "@import" not in svg and "<script" not in svg
    assert re.findall(r"https?://[^\"]+", svg) == ["http://www.w3.org/2000/svg"]
    assert 'font-family="' in svg and "sans-serif" in svg


def test_svg_escapes_text(esc: nx.MultiDiGraph) -> None:
    svg = render(esc, "svg")
    texts = svg_texts(svg)
    assert any(TAG in t for t in texts)
    assert any('q\\"<&>' in t for t in texts)  # the rule's source text, as written


def test_layout_bands_fastest_at_the_bottom(hope: nx.MultiDiGraph) -> None:
    lay = layout(hope)
    y = {n: b.y for n, b in lay.boxes.items()}
    assert y["Hope.Mk"] > y["Hope.M"] > y["Hope.C[16]"] > y["Hope.C[256]"] > y["h.embed"] \
        > y["AdamW.m"] > y["train"]
    assert [b.label for b in lay.bands] == ["every token", "every 16 tokens", "every 256 tokens",
                                            "every step"]
    for lower, upper in zip(lay.bands, lay.bands[1:]):
        assert upper.y1 <= lower.y0  # each band sits above the faster one
    for i, row in enumerate(lay.rows):
        band = lay.bands[lay.row_band[i]]
        for n in row:
            box = lay.boxes[n]
            assert band.y0 < box.y - box.h / 2 and box.y + box.h / 2 < band.y1, n


def test_layout_has_no_overlaps_and_text_fits(hope: nx.MultiDiGraph) -> None:
    lay = layout(hope)
    boxes = list(lay.boxes.values())
    for a, b in combinations(boxes, 2):
        apart = abs(a.x - b.x) >= (a.w + b.w) / 2 or abs(a.y - b.y) >= (a.h + b.h) / 2
        assert apart, (a.id, b.id)
    for box in boxes:
        assert box.x - box.w / 2 > 0 and box.x + box.w / 2 < lay.width
        assert box.y - box.h / 2 > 0 and box.y + box.h / 2 < lay.height
        for text, size, bold in box.lines:
            assert text_width(text, size, bold) <= box.w - 8, (box.id, text)
    labels = label_boxes(lay)
    assert labels
    for r, q in combinations(labels, 2):
        assert r[2] <= q[0] or q[2] <= r[0] or r[3] <= q[1] or q[3] <= r[1], (r, q)
    assert len(lay.edges) == hope.number_of_edges()


def test_many_nodes_wrap_rows() -> None:
    params = "\n".join(f"    let p{i} = x |> linear(dim)" for i in range(20))
    g = nestc.loads(f"block Wide(dim = 8) {{\n    input x : [T, dim]\n{params}\n"
                    "    output x\n}\n").graph("Wide")
    lay = layout(g)
    assert max(len(r) for r in lay.rows) <= 8
    assert sum(len(r) for r in lay.rows) == g.number_of_nodes()
    assert lay.width < 2200


def test_long_names_are_abbreviated() -> None:
    g = nestc.loads("""
block SelfModifyingThing(dim = 8) {
    input x : [T, dim]
    memory Memory_with_a_long_name : matrix(dim, dim) = zeros every token {
        key x; value x; objective l2(Memory_with_a_long_name(x), x); rule gd(lr = 0.1)
    }
    output Memory_with_a_long_name(x)
}
model Outer(dim = 8) {
    input x : [T, dim]
    output y = SelfModifyingThing(dim)(x)
    train every step { objective l2(y, x); rule gd(lr = 0.1) }
}
""").graph("Outer")
    lay = layout(g)
    assert "abbreviated: SMT = SelfModifyingThing" in lay.subtitle
    assert lay.boxes["SelfModifyingThing.Memory_with_a_long_name"].lines[0][0] == \
        "SMT.Memory_with_a_long_name"


# --- HTML, DOT, Mermaid, PNG ------------------------------------------------------------------


def test_html_embeds_svg_and_a_table(hope: nx.MultiDiGraph, esc: nx.MultiDiGraph) -> None:
    page = render(hope, "html")
    assert isinstance(page, str) and page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 1 and "</svg>" in page and "<?xml" not in page
    assert page.count("<tr>") == 1 + len(levels(hope))
    assert "<td>Hope.C[16]</td>" in page and "<td>every 16 tokens (×4)</td>" in page

    class Check(html.parser.HTMLParser):
        tags: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.tags.append(tag)

    parser = Check()
    parser.feed(page)
    assert {"html", "svg", "table", "td"} <= set(parser.tags)
    escaped = render(esc, "html")
    assert TAG not in escaped and "a&lt;b &amp; &quot;c&quot;" in escaped
    assert 'q\\"<&>' not in escaped


def _dot_skeleton(dot: str) -> str:
    """DOT with its quoted strings blanked: what is left must be well-formed."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', dot)


def test_dot(adam: nx.MultiDiGraph, hope: nx.MultiDiGraph, esc: nx.MultiDiGraph) -> None:
    dot = render(adam, "dot")
    assert isinstance(dot, str) and dot.startswith('digraph "Adam" {\n')
    assert "rankdir=BT" in dot and "rank=same" in dot
    assert 'subgraph cluster_band_0 {' in dot and 'label="every step (levels 0–1)";' in dot
    assert '"m" [shape=box, style="rounded,filled"' in dot
    assert '"grad(W)" [shape=ellipse' in dot
    assert re.search(r'"m" -> "W" \[color="#[0-9a-f]+", style=solid', dot)
    assert re.search(r'"W" -> "grad\(W\)" \[[^]]*style=dotted', dot)
    for text in (dot, render(hope, "dot"), render(esc, "dot")):
        skeleton = _dot_skeleton(text)
        assert '"' not in skeleton.replace('""', "")
        assert skeleton.count("{") == skeleton.count("}")
        assert skeleton.count("[") == skeleton.count("]")
    assert r'gd(lr = if tag == \"q\\\"<&>\" then 0.1 else 0.2)' in render(esc, "dot")
    hope_dot = render(hope, "dot")
    assert hope_dot.count("subgraph cluster_band_") == 4
    assert '"Hope.C[16]" [' in hope_dot and '"train" -> "Hope.M" [color=' in hope_dot


def test_mermaid(adam: nx.MultiDiGraph, hope: nx.MultiDiGraph, esc: nx.MultiDiGraph) -> None:
    text = render(adam, "mermaid")
    assert isinstance(text, str)
    lines = text.splitlines()
    assert lines[0] == "flowchart BT"
    assert '  subgraph band0["every step #40;levels 0–1#41;"]' in lines
    assert '    n3("m<br/>L0 · every step<br/>l2#40;m, g#41; · gd#40;lr = 1 - betas#91;0#93;#41;")' \
        in lines
    assert '    n1(["grad#40;W#41;"])' in lines
    assert '  n2 -->|"objective"| n3' in lines
    assert '  n0 -.->|"gradient"| n1' in lines  # W generates grad(W)
    hope_text = render(hope, "mermaid", detail="full")
    assert hope_text.count("  subgraph band") == 4 and "  band0 ~~~ band1" in hope_text
    assert "Hope.C#91;16#93;" in hope_text
    for t in (text, hope_text, render(esc, "mermaid")):
        for label in re.findall(r'\("(.*?)"\)|\(\["(.*?)"\]\)|\|"(.*?)"\|', t):
            inner = "".join(label).replace("<br/>", "")
            assert not set(inner) & set('"[](){}|<>`'), inner
    links = sum(1 for ln in hope_text.splitlines() if re.match(r"  n\d+ [-=.]+>", ln))
    styles = sum(1 for ln in hope_text.splitlines() if ln.startswith("  linkStyle "))
    assert links == styles == hope.number_of_edges()


def test_png(adam: nx.MultiDiGraph, hope: nx.MultiDiGraph, tmp_path) -> None:
    for name, g, detail in (("adam", adam, "auto"), ("hope", hope, "full"),
                            ("hope_levels", hope, "levels")):
        data = render(g, "png", detail=detail)
        assert isinstance(data, bytes) and data.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", data[16:24])
        lay = layout(view(g, detail))
        assert abs(width - lay.width / 72 * 150) <= 2 and abs(height - lay.height / 72 * 150) <= 2
        (tmp_path / f"viz_{name}.png").write_bytes(data)


def test_unknown_format(adam: nx.MultiDiGraph) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        render(adam, "gif")


def test_cli_viz_writes_each_format(tmp_path, capsys) -> None:
    for suffix in ("svg", "html", "dot", "md", "png"):
        out = tmp_path / f"adam.{suffix}"
        assert main(["viz", "std/optim/adam.nest", "-n", "Adam", "-o", str(out)]) == 0
        assert out.stat().st_size > 200
    ET.parse(tmp_path / "adam.svg")
    assert (tmp_path / "adam.md").read_text().startswith("flowchart BT")
    assert "wrote" in capsys.readouterr().out


def test_svg_needs_neither_torch_nor_matplotlib() -> None:
    code = ("import sys, nestc\n"
            "from nestc.viz import render\n"
            "g = nestc.load('std/optim/sgd.nest').graph('SGD', momentum=0.9)\n"
            "h = nestc.load('std/models/hope.nest').graph('HopeLM')\n"
            "for fmt in ('svg', 'html', 'dot', 'mermaid'):\n"
            "    render(g, fmt)\n"
            "    render(h, fmt, detail='levels')\n"
            "    render(h, fmt, detail='full')\n"
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)\n"
            "render(h, 'png')\n"
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False", "True"]  # PNG: matplotlib only


# --- the levels view --------------------------------------------------------------------------


def signal_paths(g: nx.MultiDiGraph) -> set[tuple[str, str, str]]:
    """(u, v, kind of the first edge) for every edge level -> level and every path from a level
    or an input through signals only to another level."""
    kind = {n: a["kind"] for n, a in g.nodes(data=True)}
    signals = g.subgraph([n for n in g if kind[n] == "signal"])
    out = set()
    for u in g:
        if kind[u] == "signal":
            continue
        for _, s, d in g.out_edges(u, data=True):
            if kind[s] in LEVEL_KINDS:
                ends = {s}
            else:
                ends = {v for t in nx.descendants(signals, s) | {s} for v in g.successors(t)
                        if kind[v] in LEVEL_KINDS}
            out |= {(u, v, d["kind"]) for v in ends if v != u}
    return out


@pytest.mark.parametrize("name", ["DeltaNet", "Hope", "HopeLM"])
def test_collapse_signals_keeps_every_level_and_each_path(name: str) -> None:
    g = load_sketch().graph(name, **({} if name == "HopeLM" else {"dim": 16}))
    before = copy.deepcopy(g)
    c = collapse_signals(g)
    assert nx.utils.graphs_equal(g, before)  # a pure function: g is left as it was
    lv = {n for n, a in g.nodes(data=True) if a["kind"] in LEVEL_KINDS}
    assert {n for n, a in c.nodes(data=True) if a["kind"] in LEVEL_KINDS} == lv
    for n in lv:
        assert c.nodes[n] == g.nodes[n]
    assert not any(a["kind"] == "signal" for _, a in c.nodes(data=True))
    edges = [(u, v, d["kind"]) for u, v, d in c.edges(data=True)]
    assert len(edges) == len(set(edges))  # parallel edges of one kind are one
    paths = signal_paths(g)
    assert {e for e in edges if e[0] in lv} == {p for p in paths if p[0] in lv}
    # between two levels: an edge iff a path through signals only
    for u, v in permutations(lv, 2):
        assert c.has_edge(u, v) == any(p[:2] == (u, v) for p in paths), (u, v)
    # the input stays, as one node, with the paths from it
    inputs = [n for n, a in c.nodes(data=True) if a["kind"] in DATA_KINDS]
    assert inputs == [next(n for n, a in g.nodes(data=True) if a["kind"] == "input")]
    assert {e for e in edges if e[0] in inputs} == {p for p in paths if p[0] in inputs}


def test_collapse_signals_combines_labels() -> None:
    prog = load_sketch()
    delta = collapse_signals(prog.graph("DeltaNet", dim=16))
    assert [d["label"] for _, _, d in delta.edges("x", data=True)] == ["key, value, objective, lr"]
    hope = collapse_signals(prog.graph("HopeLM"))
    data = {(u, v, d["kind"]): d for u, v, d in hope.edges(data=True)}
    assert data[("Hope.Mk", "Hope.M", "read")]["label"] == "key, objective"
    assert data[("Hope.Mk", "Hope.M", "read")]["via"] == ["Hope.k"]
    assert data[("Hope.C[16]", "train", "read")]["label"] == "objective"
    assert data[("train", "Hope.M", "init")]["label"] == "meta"
    assert data[("tokens", "train", "flow")]["label"] == "objective"
    assert not hope.has_edge("Hope.Mk", "Hope.Mk")  # a level's way back to itself goes


def test_collapse_signals_merges_inputs() -> None:
    g = nestc.loads("""
block Two(dim = 8) {
    input x : [T, dim]
    input y : [T, dim]
    input unused : [T, dim]
    memory M : matrix(dim, dim) = zeros every token {
        key x; value y; objective l2(M(x), y); rule gd(lr = 0.1)
    }
    output M(x)
}
""").graph("Two")
    c = collapse_signals(g)
    inputs = [(n, a) for n, a in c.nodes(data=True) if a["kind"] == "input"]
    assert [n for n, _ in inputs] == ["x, y"] and inputs[0][1]["inputs"] == ["x", "y"]
    assert [(u, v, d["label"]) for u, v, d in c.edges(data=True)] == \
        [("x, y", "M", "key, value, objective")]
    lay = layout(c)
    assert lay.boxes["x, y"].y > lay.boxes["M"].y  # at the bottom


def test_a_capitalised_let_in_a_chain_is_no_block_of_its_own() -> None:
    """`let Q = h |> linear(dim)` in a chain: the boxes went by names, and `Q.linear[2]` read
    as the weights of a block `Q` (its let, `Q[2]`, is no node named `Q`). Layers' weights now
    carry their block from the graph."""
    g = nestc.loads("""block U(dim = 8) {
    input x : [T, dim]
    let h = x
    chain c in [2, 4] {
        let Q = h |> linear(dim) |> rmsnorm
        h = h + Q
    }
    output h
}
""", "u.nest").graph("U")
    w = group_weights(collapse_signals(g))
    boxes = {n: a["label"] for n, a in w.nodes(data=True) if a["kind"] == "param"}
    assert boxes == {"*": "U"}


def test_group_weights_one_box_per_block() -> None:
    g = collapse_signals(nestc.load("std/models/hope.nest").graph("HopeLM"))
    before = copy.deepcopy(g)
    w = group_weights(g)
    assert nx.utils.graphs_equal(g, before)
    smt = w.nodes["Hope.SelfModifyingTitans.*"]
    members = [n for n, a in g.nodes(data=True)
               if a["kind"] == "param" and n.startswith("Hope.SelfModifyingTitans.")]
    assert smt["kind"] == "param" and smt["count"] == len(members) == 8
    assert smt["members"] == members and smt["repeat"] == 4 and smt["frequency"] == "every step"
    assert smt["structure"] == "linear ×4 · conv1d ×3 · rmsnorm"
    assert w.nodes["Hope.*"]["members"] == ["Hope.h.rmsnorm", "Hope.output.rmsnorm"]
    assert w.nodes["*"]["members"] == ["h.embed", "logits.rmsnorm", "logits.linear"]
    assert w.nodes["*"]["label"] == "HopeLM"
    # memories and the training level stay one box each
    assert {n for n, a in w.nodes(data=True) if a["kind"] in ("memory", "train")} == \
        {n for n, a in g.nodes(data=True) if a["kind"] in ("memory", "train")}
    assert not any(n.startswith("Hope.SelfModifyingTitans.") and a["kind"] == "param"
                   and not a.get("group") for n, a in w.nodes(data=True))
    # a group's edges are its members' edges, once per kind
    rename = {m: n for n, a in w.nodes(data=True) if a.get("group") for m in a["members"]}
    want = {(rename.get(u, u), rename.get(v, v), d["kind"]) for u, v, d in g.edges(data=True)}
    got = [(u, v, d["kind"]) for u, v, d in w.edges(data=True)]
    assert set(got) == want and len(got) == len(want)
    lv = {n for n, a in w.nodes(data=True) if a["kind"] in LEVEL_KINDS}
    assert len(lv) == 13 and levels(w)[-1] == "train"


def test_view_picks_the_detail(adam: nx.MultiDiGraph, hope: nx.MultiDiGraph) -> None:
    assert adam.number_of_nodes() <= AUTO_FULL_MAX < hope.number_of_nodes()
    assert view(adam) is adam and view(hope, "full") is hope
    assert view(hope).graph["detail"] == "levels"
    assert view(adam, "levels").graph["detail"] == "levels"
    with pytest.raises(ValueError, match="unknown detail"):
        view(adam, "some")
    with pytest.raises(ValueError, match="unknown detail"):
        render(adam, "svg", detail="some")
    # nothing but signals: the levels view has nothing to draw, so it draws them
    bare = nestc.loads("block Bare(dim = 8) {\n input x : [T, dim]\n output x\n}\n").graph("Bare")
    assert view(bare, "levels") is bare


def test_levels_svg_draws_levels_only(hope: nx.MultiDiGraph) -> None:
    texts = svg_texts(render(hope, "svg"))
    full = svg_texts(render(hope, "svg", detail="full"))
    for n, a in hope.nodes(data=True):
        if a["kind"] == "signal":
            assert n in full and n not in texts, n
    assert "Hope.Mk  ×4" in texts and "Hope.M  ×4" in texts and "train" in texts
    assert "HopeLM: 3 weights" in texts and "Hope: 4 weights  ×4" in texts
    assert "tokens" in texts and "key, objective" in texts
    assert any(t.startswith("levels view: 12 signals folded into edges") for t in texts)
    assert "read of a block's weights (light: they feed nearly every level)" in texts
    assert "signal" not in texts  # nor in the legend


def test_deep_momentum_draws_its_mlp_memory_as_a_level() -> None:
    g = nestc.load("std/optim/nested.nest").graph("DeepMomentum")
    assert g.nodes["m"]["kind"] == "memory" and g.nodes["m"]["level"] == 0
    texts = svg_texts(render(g, "svg"))
    assert "m" in texts and "dot(m(g), g) · gd(lr = eta, retain = alpha)" in texts
    assert "key, value, objective" in texts and "L1 · every step" in texts


def test_levels_layout_reads_well() -> None:
    g = nestc.load("std/models/hope.nest").graph("HopeLM")
    shown = levels_view(g)
    lay = layout(shown)
    assert len(lay.edges) == shown.number_of_edges()
    boxes = list(lay.boxes.values())
    for a, b in combinations(boxes, 2):
        assert abs(a.x - b.x) >= (a.w + b.w) / 2 or abs(a.y - b.y) >= (a.h + b.h) / 2, (a.id, b.id)
    for box in boxes:
        assert box.x - box.w / 2 > 0 and box.x + box.w / 2 < lay.width
        for text, size, bold in box.lines:
            assert text_width(text, size, bold) <= box.w - 8, (box.id, text)
    assert lay.boxes["Hope.SelfModifyingTitans.*"].lines[0][0] == "Hope.SMT: 8 weights  ×4"
    y = {n: b.y for n, b in lay.boxes.items()}
    smt = "Hope.SelfModifyingTitans."
    # M_memory reads k, v, eta and alpha of M_k's (...) chunk-start states: parallel with them
    assert y["tokens"] > y[smt + "M_k"] == y[smt + "M_memory"] > y["Hope.CMSIndependent.f[16]"] \
        > y["Hope.CMSIndependent.f[256]"] > y[smt + "*"] > y["train"]
    assert y["AdamW.m"] == y["AdamW.v"] == y["*"]  # level 3: the weights and Adam's states
    assert [b.label for b in lay.bands] == ["every token", "every 16 tokens", "every 256 tokens",
                                            "every step"]
    labels = label_boxes(lay)
    for r, q in combinations(labels, 2):
        assert r[2] <= q[0] or q[2] <= r[0] or r[3] <= q[1] or q[3] <= r[1], (r, q)
    shown_labels = {e.label for e in lay.edges if e.label}
    assert {"key, objective", "value, objective", "lr", "retain", "input", "objective",
            "meta"} <= shown_labels
    assert "key, value, objective, lr, retain" not in shown_labels  # tokens' and weights' words
    # a bundle shares its start: the edges of one kind out of the SMT weights start together
    starts = {e.points[0] for e in lay.edges if e.u == smt + "*" and e.kind == "read"
              and lay.boxes[e.v].y > y[smt + "*"]}
    assert len(starts) == 1
    assert all(e.faint for e in lay.edges if e.kind == "read" and shown.nodes[e.u]["kind"] == "param")


SPECS = sorted(ROOT.glob("stdlib/**/*.nest")) + sorted(ROOT.glob("examples/*.nest"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_spec_draws_in_every_text_format(path) -> None:
    prog = nestc.load(str(path))
    for name in prog.names:
        try:
            g = prog.graph(name)
        except nestc.NestError:
            g = prog.graph(name, dim=16)  # a block that needs its width
        for detail in ("levels", "full"):
            ET.fromstring(render(g, "svg", detail=detail).encode())
            for fmt in ("html", "dot", "mermaid"):
                assert render(g, fmt, detail=detail)


def test_cli_viz_detail(tmp_path, capsys) -> None:
    out = {}
    for detail in ("levels", "full", "auto"):
        path = tmp_path / f"hope_{detail}.svg"
        assert main(["viz", "std/models/hope.nest", "-n", "HopeLM", "--detail", detail,
                     "-o", str(path)]) == 0
        out[detail] = svg_texts(path.read_text())
    assert "Hope.SMT.x" in out["full"] and "Hope.SMT.x" not in out["levels"]
    assert out["auto"] == out["levels"]
    with pytest.raises(SystemExit):
        main(["viz", "std/optim/adam.nest", "--detail", "some"])
    assert "invalid choice" in capsys.readouterr().err


def test_closed_pipe_with_the_full_picture() -> None:
    """The levels view's page of HopeLM is under the 64 KiB a pipe holds; the full one is over
    it, so `| head -1` still makes the write after head exits fail, which must stay quiet."""
    out = subprocess.run(f"{sys.executable} -m nestc.cli viz std/models/hope.nest "
                         "--name HopeLM --format html --detail full | head -1", shell=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("<!DOCTYPE html>")
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr


def test_a_long_declaration_name_is_cut_to_the_pictures_width() -> None:
    """The title was never fitted: a long block name ran 947 pt into a 548 pt picture. The
    full name stays the SVG's <title>."""
    name = "AVeryLongBlockNameThatSomeoneWroteBecauseTheyLikeDescriptiveIdentifiers" * 2
    g = nestc.loads(f"block {name}(dim = 8) {{\n    input x : [T, dim]\n"
                    "    output x |> linear(dim)\n}\n", "t.nest").graph(name)
    svg = render(g, "svg")
    assert isinstance(svg, str)
    root = ET.fromstring(svg)
    width = float(root.get("width"))
    drawn = next(t.text for t in root.iter(f"{SVG_NS}text") if t.get("font-size") == "17")
    assert drawn.endswith("…") and text_width(drawn, 17, True) <= width - 40
    assert root.find(f"{SVG_NS}title").text == f"block {name}"


def test_the_levels_view_of_a_deep_residual_stack_keeps_the_direct_reads() -> None:
    """Each of N residual blocks reads every earlier one through the stream: N (N - 1) / 2
    edges (160 blocks: 25,440 with the memories' reads, a 58 MB SVG in 24 s). Past THIN_READS
    per level the view keeps the transitive reduction, the chain, and says how many it left
    out; HopeLM's view keeps every read."""
    body = "".join("    h = h + Inner(dim)(h)\n" for _ in range(30))
    g = nestc.loads("block Inner(dim) {\n    input x : [T, dim]\n"
                    "    memory M : matrix(dim, dim) = zeros every token {\n"
                    "        key x; value x; objective l2(M(x), x); rule gd(lr = 0.1) }\n"
                    "    output M(x) |> linear(dim)\n}\n"
                    f"block W(dim = 8) {{\n    input x : [T, dim]\n    let h = x\n{body}"
                    "    output h\n}\n", "w.nest").graph("W")
    v = levels_view(g)
    reads = {(u, w) for u, w, d in v.edges(data=True) if d["kind"] == "read"}
    names = ["Inner.M", *(f"Inner_{i}.M" for i in range(1, 30))]
    assert set(zip(names, names[1:])) <= reads
    assert ("Inner.M", "Inner_2.M") not in reads and v.graph["implied"] > 400
    assert "reads implied by the others left out" in render(g, "svg", detail="levels")
    hope = levels_view(nestc.load("std/models/hope.nest").graph("HopeLM"))
    assert "implied" not in hope.graph
