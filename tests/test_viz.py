"""`nestc viz`: one layout drawn as SVG, HTML, DOT, Mermaid and PNG."""

from __future__ import annotations

import html.parser
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from itertools import combinations

import networkx as nx
import pytest
from test_nest import load_sketch

import nestc
from nestc.cli import main
from nestc.nest import LEVEL_KINDS, levels
from nestc.viz import LABEL_SIZE, layout, render, text_width

SVG_NS = "{http://www.w3.org/2000/svg}"

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


def test_svg_parses_and_names_every_node(adam: nx.MultiDiGraph, hope: nx.MultiDiGraph) -> None:
    for g in (adam, hope):
        svg = render(g, "svg")
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
    labels = []
    for e in lay.edges:
        if e.label:
            assert e.label_at is not None
            w = text_width(e.label, LABEL_SIZE) + 6
            labels.append((e.label_at[0] - w / 2, e.label_at[1] - 6, e.label_at[0] + w / 2,
                           e.label_at[1] + 6))
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
    hope_text = render(hope, "mermaid")
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
    for name, g in (("adam", adam), ("hope", hope)):
        data = render(g, "png")
        assert isinstance(data, bytes) and data.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", data[16:24])
        lay = layout(g)
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
            "for fmt in ('svg', 'html', 'dot', 'mermaid'):\n"
            "    render(g, fmt)\n"
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
