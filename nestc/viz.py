"""`nestc viz`: the nest graph drawn as frequency bands, in SVG, HTML, DOT, Mermaid and PNG.

Every format draws one layout: horizontal bands, one per frequency, fastest at the bottom and the
outer training level with the optimizer states at the top; inside a band, signals sit in the
bottom rows and levels above them by level index. SVG is written by hand (no system binaries);
PNG is drawn with matplotlib, imported only when asked for.

Two details: `full` draws the graph as it is, every signal included; `levels` draws
`levels_view(graph)`, the levels only (each path level -> signals -> level one edge, a block's
weights one box), with the edges that leave (or reach) a box together bundled on one trunk
(or arrowhead) and the weights' reads drawn light. `auto` is `full` for small graphs.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from nestc.nest import DATA_KINDS, EDGE_KINDS, LEVEL_KINDS, frequency_key, levels

FORMATS = ("svg", "html", "dot", "mermaid", "png")
FONT = "DejaVu Sans, Verdana, Arial, Helvetica, sans-serif"
FONT_PNG = "DejaVu Sans"  # matplotlib ships it; the width table below is its metrics

# Edge kinds: colour, SVG dash pattern (None: solid), and what the kind means.
EDGE_STYLE: dict[str, tuple[str, str | None, str]] = {
    "flow": ("#1f6fb5", None, "data a level learns from"),
    "read": ("#4d4d4d", None, "a level's state is read"),
    "init": ("#d35400", "7 4", "initial state from a slower level"),
    "generation": ("#8e44ad", "2 3", "makes another level's context"),
    "backprop": ("#c0392b", "9 3 2 3", "trained through the task gradient"),
}
# A read above the memory's declaration (its state at the chunk's start): a dashed read.
START_DASH = "5 3"
# Node kinds: fill, stroke, legend words.
NODE_STYLE: dict[str, tuple[str, str, str]] = {
    "memory": ("#e3eefa", "#2c6fbb", "memory"),
    "param": ("#eeeeee", "#6b6b6b", "parameter"),
    "train": ("#fbe3e0", "#c0392b", "training level"),
    "input": ("#fff6d6", "#b8860b", "input"),
    "signal": ("#ffffff", "#8c8c8c", "signal"),
}
BAND_FILLS = ("#f7f9fc", "#eef2f7")
FAINT = "#a3abb4"  # a parameter's read edges in the levels view: everywhere, so quiet

# Advance widths of DejaVu Sans (matplotlib's font) in 1/100 em for ASCII 32..126.
_W_NORMAL = (32, 40, 46, 84, 64, 95, 78, 28, 39, 39, 50, 84, 32, 36, 32, 34, 64, 64, 64, 64, 64,
             64, 64, 64, 64, 64, 34, 34, 84, 84, 84, 53, 100, 68, 69, 70, 77, 63, 57, 78, 75, 30,
             30, 66, 56, 86, 75, 79, 60, 79, 70, 64, 61, 73, 68, 99, 68, 61, 68, 39, 34, 39, 84,
             50, 50, 61, 64, 55, 64, 62, 35, 64, 63, 28, 28, 58, 28, 97, 63, 61, 64, 64, 41, 52,
             39, 63, 59, 82, 59, 59, 52, 64, 34, 64, 84)
_W_BOLD = (32, 46, 52, 84, 70, 100, 87, 31, 46, 46, 52, 84, 38, 42, 38, 36, 70, 70, 70, 70, 70,
           70, 70, 70, 70, 70, 40, 40, 84, 84, 84, 58, 100, 77, 76, 73, 83, 68, 68, 82, 84, 37,
           37, 78, 64, 100, 84, 85, 73, 85, 77, 72, 68, 81, 77, 110, 77, 72, 72, 46, 36, 46, 84,
           50, 50, 68, 72, 59, 72, 68, 44, 72, 71, 34, 34, 66, 34, 104, 71, 69, 72, 72, 49, 60,
           48, 71, 65, 92, 64, 65, 58, 71, 36, 71, 84)

# Layout sizes, in points (1 SVG user unit = 1 pt = 1/72 inch in the PNG).
NAME_SIZE, FREQ_SIZE, DETAIL_SIZE, SIGNAL_SIZE, LABEL_SIZE = 12.0, 10.0, 9.5, 10.0, 8.5
BOX_MIN_W, BOX_MAX_W, BOX_H, SIGNAL_H = 120.0, 250.0, 58.0, 24.0
H_GAP, ROW_GAP, BAND_PAD = 26.0, 46.0, 18.0
LEVELS_H_GAP = 64.0  # the levels view spaces its boxes wider: bundles of edges pass between
LEVELS_ROW_GAP = 72.0  # and taller: the branches of the bundles and their words fit between rows
BRANCH = 18.0  # how far above (below) its target's row an edge leaves its bundle's trunk
BRANCH_STEP = {"generation": 6.0, "init": 12.0, "flow": 18.0}  # apart, kind by kind
LEFT, RIGHT, TOP_PAD, BOTTOM = 160.0, 28.0, 16.0, 16.0
SUBTITLE_STEP = 15.0  # between the lines of a subtitle
MAX_ROW = 8  # more nodes than this in one row wrap onto another row
SIGNAL_LAYERS = 4  # rows a chain of signals below one level may take
LANE_PAD, LANE_STEP = 18.0, 11.0  # side lanes for edges that pass several rows


def text_width(text: str, size: float, bold: bool = False) -> float:
    """The width of text in points, from DejaVu Sans metrics (wider than most sans fonts)."""
    table = _W_BOLD if bold else _W_NORMAL
    units = sum(table[ord(c) - 32] if 32 <= ord(c) < 127 else 100 for c in text)
    return units * size / 100.0


def fit(text: str, size: float, width: float, bold: bool = False) -> str:
    """text cut with an ellipsis so that it fits in width points."""
    if text_width(text, size, bold) <= width:
        return text
    while text and text_width(text + "…", size, bold) > width:
        text = text[:-1]
    return text.rstrip() + "…"


# --- views: the levels-only graph ------------------------------------------------------------

DETAILS = ("auto", "levels", "full")
AUTO_FULL_MAX = 25  # `auto` draws every signal up to this many nodes, only the levels above
# the order edge labels are written in when several roles are combined on one edge
_LABEL_ORDER = ("query", "key", "value", "input", "objective", "lr", "retain", "update")


def _merge_labels(labels: list[str | None]) -> str | None:
    """`key, objective` + `value, objective` -> `key, value, objective`."""
    parts: list[str] = []
    for label in labels:
        for p in (label or "").split(", "):
            if p and p not in parts:
                parts.append(p)
    rank = {p: i for i, p in enumerate(_LABEL_ORDER)}
    seen = {p: i for i, p in enumerate(parts)}
    return ", ".join(sorted(parts, key=lambda p: (rank.get(p, len(rank)), seen[p]))) or None


def _add_merged(g: nx.MultiDiGraph, u: str, v: str, kind: str, labels: list[str | None],
                via: set[str], start: bool = False) -> None:
    """One edge u -> v of kind, its labels and the signals it stands for merged in; `start`
    while every path it stands for reads u at the start of a chunk."""
    if u == v:
        return
    for d in (g.get_edge_data(u, v) or {}).values():
        if d["kind"] == kind:
            d["label"] = _merge_labels([d.get("label"), *labels])
            d["via"] = sorted(set(d["via"]) | via)
            d["start"] = d.get("start", False) and start
            return
    g.add_edge(u, v, kind=kind, label=_merge_labels(labels), via=sorted(via), start=start)


def _at_start(d: dict[str, Any]) -> bool:
    """Whether a nest-graph edge is a read of a memory above its declaration."""
    return d["kind"] == "read" and "at chunk start" in (d.get("label") or "")


def collapse_signals(graph: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """The levels-only view of a nest graph: a new graph, graph is left as it is.

    Every level node stays with its attributes; signals go. Each path level -> signal(s) ->
    level becomes one direct edge of the first edge's kind, labelled with the roles of the
    last edges (`key, value`), with the signals it passed through in `via`; a level's path
    back to itself is dropped, and parallel edges of one kind become one. Inputs that feed a
    level through signals stay, as one node (`tokens`, or `x, y` for several) at the bottom.
    """
    out = nx.MultiDiGraph(**graph.graph)
    out.graph["detail"] = "levels"
    kind = {n: a["kind"] for n, a in graph.nodes(data=True)}
    out.graph["folded"] = sum(k == "signal" for k in kind.values())
    for n, a in graph.nodes(data=True):
        if a["kind"] in LEVEL_KINDS:
            out.add_node(n, **a)
    inputs = [n for n in graph.nodes if kind[n] == "input"]
    found: dict[tuple[str, str, str], tuple[list[str | None], set[str], list[bool]]] = {}
    for u in [*(n for n in graph.nodes if kind[n] in LEVEL_KINDS), *inputs]:
        for _, first, d in graph.out_edges(u, data=True):
            if kind[first] in LEVEL_KINDS:
                labels, via, starts = found.setdefault((u, first, d["kind"]), ([], set(), []))
                labels.append(d.get("label"))
                starts.append(_at_start(d))
                continue
            # every level the signal `first` reaches through signals only
            seen, stack = {first}, [first]
            while stack:
                s = stack.pop()
                for _, x, d2 in graph.out_edges(s, data=True):
                    if kind[x] in LEVEL_KINDS:
                        labels, via, starts = found.setdefault((u, x, d["kind"]),
                                                               ([], set(), []))
                        labels.append(d2.get("label") or d.get("label"))
                        starts.append(_at_start(d))
                        via |= seen
                    elif x not in seen:
                        seen.add(x)
                        stack.append(x)
    feeding = [n for n in inputs if any(k[0] == n for k in found)]
    merged = ", ".join(feeding)
    if feeding:
        a = dict(graph.nodes[feeding[0]])
        if len(feeding) > 1:
            a.update(label=merged, shape=None, inputs=feeding, span=None)
        out.add_node(merged, **a)
    for (u, v, k), (labels, via, starts) in found.items():
        _add_merged(out, merged if u in feeding else u, v, k, labels, via, all(starts))
    return out


def _module_of(graph: nx.MultiDiGraph, n: str) -> str:
    """The block a node was made in: its leading capitalised name parts (`Hope.SelfModifying
    Titans` of `Hope.SelfModifyingTitans.q.linear`), "" at the top of the declaration."""
    parts = n.split(".")[:-1]
    keep: list[str] = []
    for p in parts:
        if not p[:1].isupper() or ".".join([*keep, p]) in graph:
            break  # a lower-case let name, or a level's own name (`M.key.linear`)
        keep.append(p)
    return ".".join(keep)


def group_weights(graph: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """A new graph with the parameters of one block at one level in one box.

    Parameters made in the same block (same name prefix), at the same level and repeat count,
    become one `param` node `Block.*` labelled `Block` with `count`, `members` and a
    `structure` such as `linear ×6 · conv1d ×5`; their edges are merged like the edges of
    `collapse_signals`. A block with a single parameter keeps it as it is; memories, the
    training level and everything else stay individual.
    """
    groups: dict[tuple[str, int, int | None], list[str]] = {}
    for n, a in graph.nodes(data=True):
        if a["kind"] == "param":
            # a layer's weights know their block (nest.py); other params go by their names
            block = a["block"] if "block" in a else _module_of(graph, n)
            groups.setdefault((block, a["level"], a.get("repeat")), []).append(n)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    several: dict[str, int] = {}
    for prefix, _, _ in groups:
        several[prefix] = several.get(prefix, 0) + 1
    rename: dict[str, str] = {}
    out = nx.MultiDiGraph(**graph.graph)
    nodes: dict[str, dict[str, Any]] = {}
    for (prefix, level, repeat), members in groups.items():
        nid = f"{prefix}.*" if prefix else "*"
        if several[prefix] > 1:  # the block's weights at two levels, or in and out of a repeat
            nid += f"@L{level}" + (f"x{repeat}" if repeat != 1 else "")
        first = graph.nodes[members[0]]
        counts: dict[str, int] = {}
        for m in members:
            s = graph.nodes[m].get("structure") or ""
            name = s.split("(")[0] if s[:1].isalpha() and "(" in s else "weight"
            counts[name] = counts.get(name, 0) + 1
        structure = " · ".join(f"{k} ×{c}" if c > 1 else k for k, c in
                               sorted(counts.items(), key=lambda kc: (-kc[1], kc[0])))
        nodes[members[0]] = {
            **first, "label": prefix or str(graph.graph.get("name", "")), "group": True,
            "block": prefix, "count": len(members), "members": list(members),
            "structure": structure, "init": None, "span": None}
        rename.update({m: nid for m in members})
    for n, a in graph.nodes(data=True):
        if n in nodes:
            out.add_node(rename[n], **nodes[n])
        elif n not in rename:
            out.add_node(n, **a)
    for u, v, d in graph.edges(data=True):
        _add_merged(out, rename.get(u, u), rename.get(v, v), d["kind"], [d.get("label")],
                    set(d.get("via", ())), bool(d.get("start")))
    for n, a in out.nodes(data=True):
        if a["kind"] in LEVEL_KINDS and a.get("parallel"):
            a["parallel"] = sorted({rename.get(m, m) for m in a["parallel"]} - {n})
    return out


def levels_view(graph: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """What `--detail levels` draws: signals collapsed, then each block's weights grouped,
    then reads implied by others thinned where they crowd (thin_reads)."""
    return thin_reads(group_weights(collapse_signals(graph)))


THIN_READS = 8  # reads per level above which the levels view keeps only the direct ones


def thin_reads(graph: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """graph with its read edges cut to their transitive reduction where there are more than
    THIN_READS per level and they make no cycle: a level that reads another through a third
    keeps the two steps only. A residual stack of N blocks reads every earlier block from every
    later one, N (N - 1) / 2 edges (160 blocks: 12,720, a 58 MB picture); its chain shows the
    same order. The count left out is graph.graph["implied"], for the subtitle."""
    reads = [(u, v, k) for u, v, k, d in graph.edges(keys=True, data=True) if d["kind"] == "read"]
    if len(reads) <= THIN_READS * graph.number_of_nodes():
        return graph
    order = nx.DiGraph((u, v) for u, v, _ in reads)
    if not nx.is_directed_acyclic_graph(order):
        return graph
    keep = set(nx.transitive_reduction(order).edges)
    out = graph.copy()
    out.remove_edges_from([(u, v, k) for u, v, k in reads if (u, v) not in keep])
    out.graph["implied"] = graph.number_of_edges() - out.number_of_edges()
    return out


def view(graph: nx.MultiDiGraph, detail: str = "auto") -> nx.MultiDiGraph:
    """The graph a picture of detail shows: graph itself (`full`), or its levels view."""
    if detail not in DETAILS:
        raise ValueError(f"unknown detail {detail!r}; details are {', '.join(DETAILS)}")
    if detail == "auto":
        detail = "full" if graph.number_of_nodes() <= AUTO_FULL_MAX else "levels"
    if detail == "full":
        return graph
    shown = levels_view(graph)
    # a graph without levels has nothing to show but its signals
    return shown if any(a["kind"] in LEVEL_KINDS for _, a in shown.nodes(data=True)) else graph


# --- layout -----------------------------------------------------------------------------------


@dataclass
class Box:
    """A node drawn at (x, y) (its centre), w x h, with lines of (text, size, bold)."""

    id: str
    kind: str
    x: float
    y: float
    w: float
    h: float
    lines: list[tuple[str, float, bool]]
    title: str  # the full text, for tooltips

    @property
    def level(self) -> bool:
        return self.kind in LEVEL_KINDS


@dataclass
class Band:
    label: str
    sublabel: str
    y0: float
    y1: float


@dataclass
class Edge:
    u: str
    v: str
    kind: str
    label: str | None
    points: list[tuple[float, float]]  # the start, then (control, control, end) per cubic piece
    label_at: tuple[float, float] | None = None
    faint: bool = False  # drawn thin and light: a parameter's state read (the levels view)
    start: bool = False  # dashed: a read of the state the chunk started with

    def segments(self) -> list[tuple[tuple[float, float], ...]]:
        p = self.points
        return [(p[i], p[i + 1], p[i + 2], p[i + 3]) for i in range(0, len(p) - 1, 3)]


@dataclass
class Layout:
    width: float
    height: float
    title: str
    subtitle: str
    bands: list[Band]  # fastest first
    boxes: dict[str, Box]
    edges: list[Edge]
    legend_y: float
    legend_w: float
    rows: list[list[str]] = field(default_factory=list)  # bottom to top
    row_band: list[int] = field(default_factory=list)
    legend: list[tuple[str, str, str]] = field(default_factory=lambda: _legend_items())


def _level_rows(graph: nx.MultiDiGraph) -> tuple[list[tuple[Any, ...]], list[list[str]], list[int]]:
    """Frequency classes (fastest first) and the level rows, bottom to top, with their band.

    One row per level index; parameters sit below optimizer states and the training level;
    a row of more than MAX_ROW nodes wraps.
    """
    keys = sorted({frequency_key(a) for _, a in graph.nodes(data=True) if a["kind"] in LEVEL_KINDS})
    rows: list[list[str]] = []
    band: list[int] = []
    order = levels(graph)
    leveled = graph.graph.get("detail") == "levels"
    for b, key in enumerate(keys):
        members = [n for n in order if frequency_key(graph.nodes[n]) == key]
        for level in sorted({graph.nodes[n]["level"] for n in members}):
            at = [n for n in members if graph.nodes[n]["level"] == level]
            # the levels view keeps a level index on one row (its parameters beside the
            # optimizer states), in sub-rows where parallel levels read one another
            kinds = [LEVEL_KINDS] if leveled else [(k,) for k in ("param", "memory", "train")]
            for kind in kinds:
                group = [n for n in at if graph.nodes[n]["kind"] in kind]
                for sub in _data_layers(graph, group) if leveled else [group]:
                    for part in _wrap(sub):
                        rows.append(part)
                        band.append(b)
    return keys, rows, band


def _data_layers(graph: nx.MultiDiGraph, group: list[str]) -> list[list[str]]:
    """Parallel levels in rows, bottom to top, each above the levels whose data it reads
    (M_k, M_v below the M that learns from them); one row where that data flow has a cycle."""
    members = set(group)
    sub = nx.DiGraph((u, v) for u, v, d in graph.edges(data=True)
                     if u in members and v in members and u != v and d["kind"] in ("flow", "read"))
    if not sub.number_of_edges() or not nx.is_directed_acyclic_graph(sub):
        return [group]
    depth: dict[str, int] = {}
    for n in nx.topological_sort(sub):
        depth[n] = max((depth[m] + 1 for m in sub.predecessors(n)), default=0)
    top = max(depth.values())
    return [[n for n in group if depth.get(n, 0) == d] for d in range(top + 1)]


def _wrap(group: list[str]) -> list[list[str]]:
    if not group:
        return []
    per = math.ceil(len(group) / math.ceil(len(group) / MAX_ROW))
    return [group[i:i + per] for i in range(0, len(group), per)]


def _signal_slots(graph: nx.MultiDiGraph, row_of: dict[str, int]) -> dict[str, int]:
    """Where each signal goes: slot 3i is below level row i, 3i + 2 above it.

    A signal sits below the first (non-parameter) level that learns from it, else above the
    last level that writes it, else beside the signals it is made from or feeds; inputs go to
    the bottom. Parameters are the last resort: they all live in the slowest band.
    """
    signals = [n for n, a in graph.nodes(data=True) if a["kind"] in DATA_KINDS]
    kind = {n: a["kind"] for n, a in graph.nodes(data=True)}
    slot: dict[str, int] = {}
    for n in signals:
        if kind[n] == "input":
            slot[n] = 0
            continue
        cons = [row_of[m] for m in graph.successors(n) if m in row_of and kind[m] != "param"]
        prods = [row_of[m] for m in graph.predecessors(n) if m in row_of and kind[m] != "param"]
        if cons:
            slot[n] = 3 * min(cons)
        elif prods:
            slot[n] = 3 * max(prods) + 2
    for _ in range(len(signals)):
        changed = False
        for n in signals:
            if n in slot:
                continue
            preds = [slot[m] for m in graph.predecessors(n) if m in slot and kind[m] in DATA_KINDS]
            succs = [slot[m] for m in graph.successors(n) if m in slot and kind[m] in DATA_KINDS]
            if preds or succs:
                slot[n] = max(preds) if preds else min(succs)
                changed = True
        if not changed:
            break
    for n in signals:
        if n not in slot:
            cons = [row_of[m] for m in graph.successors(n) if m in row_of]
            prods = [row_of[m] for m in graph.predecessors(n) if m in row_of]
            slot[n] = 3 * min(cons) if cons else 3 * max(prods) + 2 if prods else 0
    return slot


def _signal_layers(graph: nx.MultiDiGraph, group: list[str]) -> list[list[str]]:
    """Signals of one slot in rows, bottom to top: each just below the signals it feeds
    (at most SIGNAL_LAYERS rows)."""
    members = set(group)
    down: dict[str, int] = {}  # rows below the top one
    for n in reversed(group):  # creation order is a topological order of the data flow
        succs = [down[m] for m in graph.successors(n) if m in down and m in members]
        down[n] = min(1 + max(succs, default=-1), SIGNAL_LAYERS - 1)
    return [[n for n in group if down[n] == d] for d in reversed(range(SIGNAL_LAYERS))
            if any(down[n] == d for n in group)]


def _abbreviate(graph: nx.MultiDiGraph) -> tuple[dict[str, str], list[str]]:
    """Display names: long CamelCase prefixes (`SelfModifyingTitans.`) shortened to their
    capitals (`SMT.`) when a name would not fit its box, the same way in every name."""
    labels = {n: str(a.get("label", n)) for n, a in graph.nodes(data=True)}
    # a group's label is a block path (`Hope.SelfModifyingTitans`): every part may shorten
    whole = {n for n, a in graph.nodes(data=True) if a.get("group") and a.get("block")}
    room = BOX_MAX_W - 80  # leaves space for the `×4` of a repeated level
    long: set[str] = set()
    for n, label in labels.items():
        shown = _group_name(label, graph.nodes[n]) if n in whole else label
        if text_width(shown, NAME_SIZE, True) > room:
            parts = label.split(".") if n in whole else label.split(".")[:-1]
            long |= {p for p in parts if len(p) >= 8 and sum(c.isupper() for c in p) >= 2}
    short = {p: "".join(c for c in p if c.isupper() or c.isdigit()) for p in sorted(long)}
    names = {}
    for n, lab in labels.items():
        parts = lab.split(".")
        last = len(parts) if n in whole else len(parts) - 1
        names[n] = ".".join(short.get(p, p) if i < last else p for i, p in enumerate(parts))
    return names, [f"{b} = {a}" for a, b in short.items()]


def _group_name(label: str, a: dict[str, Any]) -> str:
    """`Hope.SMT: 13 weights` for a group of parameters."""
    return f"{label}: {a['count']} weights"


def _box(graph: nx.MultiDiGraph, n: str, label: str) -> Box:
    a = graph.nodes[n]
    kind = a["kind"]
    if kind in DATA_KINDS:
        text = fit(label, SIGNAL_SIZE, BOX_MAX_W - 24)
        w = max(48.0, text_width(text, SIGNAL_SIZE) + 24)
        return Box(n, kind, 0, 0, w, SIGNAL_H, [(text, SIGNAL_SIZE, False)], n)
    if a.get("group"):
        label = _group_name(label, a)
    name = label + (f"  ×{a['repeat']}" if a.get("repeat") not in (1, None) else "")
    freq = f"L{a['level']} · {a['frequency']}"
    if a.get("chunk"):
        freq += f" · chunks of {a['chunk']}"
    detail = _detail(a)
    widths = [text_width(name, NAME_SIZE, True), text_width(freq, FREQ_SIZE),
              text_width(detail, DETAIL_SIZE)]
    w = min(BOX_MAX_W, max(BOX_MIN_W, max(widths) + 20))
    inner = w - 16
    lines = [(fit(name, NAME_SIZE, inner, True), NAME_SIZE, True),
             (fit(freq, FREQ_SIZE, inner), FREQ_SIZE, False)]
    if detail:
        lines.append((fit(detail, DETAIL_SIZE, inner), DETAIL_SIZE, False))
    head = f"{n} ({kind})"
    if a.get("group"):
        head = f"{label} ({kind}):\n" + "\n".join(f"  {m}" for m in a["members"])
    title = "\n".join(x for x in (head, freq, a.get("structure") or "",
                                  f"objective: {a.get('objective') or '-'}",
                                  f"rule: {a.get('rule') or '-'}",
                                  f"init: {a.get('init') or '-'}") if x)
    return Box(n, kind, 0, 0, w, BOX_H, lines, title)


def _detail(a: dict[str, Any]) -> str:
    """The short objective/rule line of a level box."""
    if a["kind"] == "param" and a.get("structure"):
        return a["structure"]
    return " · ".join(p for p in (a.get("objective"), a.get("rule")) if p)


def layout(graph: nx.MultiDiGraph) -> Layout:
    """Positions of bands, boxes and edges for a nest graph."""
    keys, level_rows, level_band = _level_rows(graph)
    row_of = {n: i for i, r in enumerate(level_rows) for n in r}
    slots = _signal_slots(graph, row_of)
    names, notes = _abbreviate(graph)
    boxes = {n: _box(graph, n, names[n]) for n in graph.nodes}
    rows: list[list[str]] = []
    row_band: list[int] = []
    for s in range(3 * max(len(level_rows), 1)):
        i = s // 3
        if s % 3 == 1:
            parts = [level_rows[i]] if i < len(level_rows) else []
        else:
            parts = [p for layer in _signal_layers(graph, [n for n in graph.nodes
                                                           if slots.get(n) == s])
                     for p in _wrap(layer)]
        for part in parts:
            rows.append(part)
            row_band.append(level_band[i] if i < len(level_band) else 0)
    leveled = graph.graph.get("detail") == "levels"
    gap = LEVELS_H_GAP if leveled else H_GAP
    _order_rows(graph, rows, boxes, gap)
    content_w = max([_row_width(r, boxes, gap) for r in rows] + [360.0])
    width = LEFT + content_w + RIGHT
    title = f"{graph.graph.get('kind', '')} {graph.graph.get('name', '')}".strip()
    hyper = graph.graph.get("hyper") or {}
    subtitle = ", ".join(f"{k} = {_short(v)}" for k, v in hyper.items())
    if notes:
        subtitle += ("   ·   " if subtitle else "") + "abbreviated: " + ", ".join(notes)
    subtitle = fit(subtitle, 10.5, width - 40)
    legend_y, legend_w = TOP_PAD + 44, width
    legend = _legend_items()
    if leveled:  # a second line says what the picture leaves out
        subtitle = (subtitle + "\n" if subtitle else "") + fit(_levels_note(graph), 10.5,
                                                                width - 40)
        legend_y += SUBTITLE_STEP * subtitle.count("\n")
        legend = _legend_items(graph, faint=any(
            d["kind"] == "read" and graph.nodes[u]["kind"] == "param"
            for u, _, d in graph.edges(data=True)))
    if any(d.get("start") or _at_start(d) for _, _, d in graph.edges(data=True)):
        legend.insert(sum(typ == "edge" for _, typ, _ in legend),
                      ("start", "edge", "read at the start of each chunk (above the memory's "
                                        "declaration)"))
    y = legend_y + _legend_height(legend_w, legend) + 10
    # bands from the slowest (top) down to the fastest (bottom)
    bands: list[Band] = []
    row_y = [0.0] * len(rows)
    row_gap = LEVELS_ROW_GAP if leveled else ROW_GAP
    for b in reversed(range(len(keys) or 1)):
        idx = [i for i in range(len(rows)) if row_band[i] == b]
        y0 = y
        y += BAND_PAD
        for i in reversed(idx):
            h = max(boxes[n].h for n in rows[i])
            row_y[i] = y + h / 2
            y += h + row_gap
        y += BAND_PAD - (row_gap if idx else -40)
        label, sub = _band_label(graph, keys[b] if keys else None)
        bands.insert(0, Band(label, sub, y0, y))
    height = y + BOTTOM
    for i, r in enumerate(rows):
        x = LEFT + (content_w - _row_width(r, boxes, gap)) / 2
        for n in r:
            boxes[n].x = x + boxes[n].w / 2
            boxes[n].y = row_y[i]
            x += boxes[n].w + gap
    edges, room_left, room_right = _route(graph, boxes, rows, row_y, bundle=leveled)
    # make room for the side lanes of long edges
    for box in boxes.values():
        box.x += room_left
    for e in edges:
        e.points = [(x + room_left, y) for x, y in e.points]
        if e.label_at:
            e.label_at = (e.label_at[0] + room_left, e.label_at[1])
    width += room_left + room_right
    return Layout(width, height, title, subtitle, bands, boxes, edges, legend_y, legend_w, rows,
                  row_band, legend)


def _levels_note(graph: nx.MultiDiGraph) -> str:
    """What the levels view left out, for the subtitle."""
    parts = []
    folded = graph.graph.get("folded")
    if folded:
        parts.append(f"{folded} signal{'s' * (folded != 1)} folded into edges")
    groups = [a for _, a in graph.nodes(data=True) if a.get("group")]
    if groups:
        parts.append(f"{sum(a['count'] for a in groups)} weights in {len(groups)} "
                     f"box{'es' * (len(groups) != 1)}")
    implied = graph.graph.get("implied")
    if implied:
        parts.append(f"{implied} reads implied by the others left out")
    return "levels view: " + (", ".join(parts) if parts else "levels only") + \
        " (--detail full draws them all)"


def _row_width(r: list[str], boxes: dict[str, Box], gap: float = H_GAP) -> float:
    return sum(boxes[n].w for n in r) + gap * (len(r) - 1)


def _short(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        inner = ", ".join(_short(x) for x in v)
        return f"({inner})" if isinstance(v, tuple) else f"[{inner}]"
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def _band_label(graph: nx.MultiDiGraph, key: tuple[Any, ...] | None) -> tuple[str, str]:
    if key is None:
        return "data", ""
    members = [n for n in levels(graph) if frequency_key(graph.nodes[n]) == key]
    texts: list[str] = []
    for n in members:
        if graph.nodes[n]["frequency"] not in texts:
            texts.append(graph.nodes[n]["frequency"])
    lv = sorted({graph.nodes[n]["level"] for n in members})
    sub = f"level {lv[0]}" if len(lv) == 1 else f"levels {lv[0]}–{lv[-1]}"
    return " / ".join(texts), sub


def _order_rows(graph: nx.MultiDiGraph, rows: list[list[str]], boxes: dict[str, Box],
                gap: float = H_GAP) -> None:
    """Reorder each row by the mean position of its neighbours (a few barycentre sweeps).

    In a row of parameters, other levels (optimizer states) go to its two ends, out of the way
    of the edges that pass between the parameters."""
    und = graph.to_undirected(as_view=True)
    kind = {n: a["kind"] for n, a in graph.nodes(data=True)}

    def ends(r: list[str]) -> None:
        if not any(kind[n] == "param" for n in r):
            return
        others = [n for n in r if kind[n] != "param"]
        half = len(others) // 2
        r[:] = others[:half] + [n for n in r if kind[n] == "param"] + others[half:]
    pos: dict[str, float] = {}

    def place() -> None:
        for r in rows:
            x = -_row_width(r, boxes, gap) / 2
            for n in r:
                pos[n] = x + boxes[n].w / 2
                x += boxes[n].w + gap

    place()
    for it in range(8):
        for i in range(len(rows)) if it % 2 == 0 else reversed(range(len(rows))):
            r = rows[i]
            near = {n: [pos[m] for m in und.neighbors(n) if m not in r] for n in r}
            r.sort(key=lambda n: sum(near[n]) / len(near[n]) if near[n] else pos[n])
            ends(r)
            place()


def _route(graph: nx.MultiDiGraph, boxes: dict[str, Box], rows: list[list[str]],
           row_y: list[float], bundle: bool = False) -> tuple[list[Edge], float, float]:
    """Edges as cubic Bezier pieces between box sides; returns them and the room their side
    lanes take on the left and on the right.

    A curve that would cross a box goes through the gap next to it when it passes one row, and
    along a vertical lane beside the drawing when it passes more; lanes are shared by edges
    whose heights do not overlap. Ports spread along each side by where the far end lies.

    With bundle (the levels view), the edges of one kind that leave a box the same way share
    its port and one trunk through the rows they pass, each branching off above (or below)
    its own row, and only edges that say something keep their labels (see `_shown_label`).
    """
    row_of = {n: i for i, r in enumerate(rows) for n in r}
    left = min(b.x - b.w / 2 for b in boxes.values())
    right = max(b.x + b.w / 2 for b in boxes.values())
    margin = 18.0 if bundle else 10.0  # a bundle's trunk keeps clear of the boxes it passes
    gaps = [_gaps(r, boxes, (left - 20, right + 20), margin) for r in rows]
    plans = []
    for u, v, d in graph.edges(data=True):
        if u == v:
            continue
        ra, rb = row_of[u], row_of[v]
        su, sv = ("top", "top") if ra == rb else ("top", "bottom") if rb > ra else ("bottom", "top")
        a, b = boxes[u], boxes[v]
        direct = _curve([(a.x, _side_y(a, su)), (b.x, _side_y(b, sv))], ra == rb)
        lo, hi = sorted((ra, rb))
        lane = None
        if hi - lo > 3 and not bundle:  # (a lane when two rows between block it)
            blocked = 0
            for k in range(lo + 1, hi):
                blocked += not _in_gaps(_x_at(direct, row_y[k]), gaps[k])
                if blocked > 1:
                    lane = "left" if (a.x + b.x) / 2 < (left + right) / 2 else "right"
                    break
        plans.append((u, v, d, su, sv, lane))
    # bundles: lead is the member that goes furthest; every member starts at the lead's port
    lead = list(range(len(plans)))
    members: dict[int, list[int]] = {}
    if bundle:
        by: dict[tuple[str, str, str, str | None], list[int]] = {}
        for i, (u, _, d, su, sv, lane) in enumerate(plans):
            if su != sv:
                by.setdefault((u, d["kind"], su, lane), []).append(i)
        for group in by.values():
            if len(group) > 1:
                top = max(group, key=lambda i: (abs(row_of[plans[i][1]] - row_of[plans[i][0]]),
                                                -i))
                members[top] = group
                for i in group:
                    lead[i] = top
    # the words each edge shows
    words = []
    for u, v, d, *_ in plans:
        label = d.get("label")
        if d["kind"] in ("backprop", "generation") or label == "update":
            label = None  # the colour says it; words would crowd the outer level
        words.append(_shown_label(graph, u, v, label) if bundle else label)
    # and the edges of one kind and words that reach a box from one side share its arrowhead
    into: dict[tuple[str, str, str, str | None, bool], list[int]] = {}

    def into_key(i: int) -> tuple[str, str, str, str | None, bool]:
        u, v, d, su, sv, lane = plans[i]
        if not bundle:
            return (v, sv, str(i), None, False)
        return (v, sv, d["kind"], words[i], boxes[u].x < boxes[v].x)  # (not across the box)

    for i in range(len(plans)):
        into.setdefault(into_key(i), []).append(i)
    head = {i: group[0] for group in into.values() for i in group}
    ports: dict[tuple[str, str], list[tuple[float, int, bool]]] = {}
    for i, (u, v, _, su, sv, lane) in enumerate(plans):
        far_u = -1e9 if lane == "left" else 1e9 if lane == "right" else \
            sum(boxes[plans[m][1]].x for m in members.get(i, [i])) / len(members.get(i, [i]))
        if lead[i] == i:
            ports.setdefault((u, su), []).append((far_u, i, True))
        if head[i] == i:
            group = into[into_key(i)]
            far_v = -1e9 if lane == "left" else 1e9 if lane == "right" else \
                sum(boxes[plans[m][0]].x for m in group) / len(group)
            ports.setdefault((v, sv), []).append((far_v, i, False))
    at: dict[tuple[int, bool], float] = {}
    for (n, _), side_ports in ports.items():
        box = boxes[n]
        side_ports.sort()
        span = max(box.w - 24, 0) if box.level else box.w * 0.5
        for k, (_, i, out) in enumerate(side_ports):
            at[(i, out)] = box.x - span / 2 + span * (k + 1) / (len(side_ports) + 1)
    for i in range(len(plans)):
        at[(i, True)] = at[(lead[i], True)]
        at[(i, False)] = at[(head[i], False)]
    ends = [((at[(i, True)], _side_y(boxes[u], su)), (at[(i, False)], _side_y(boxes[v], sv)))
            for i, (u, v, _, su, sv, _) in enumerate(plans)]
    # lanes: shortest edges innermost, sharing a lane where their heights do not overlap
    lanes: dict[int, tuple[str, int]] = {}
    taken: dict[str, list[list[tuple[float, float]]]] = {"left": [], "right": []}
    order = sorted((i for i, p in enumerate(plans) if p[5] and lead[i] == i),
                   key=lambda i: abs(ends[i][0][1] - ends[i][1][1]))
    for i in order:
        side = plans[i][5] or "right"
        y0, y1 = sorted((ends[i][0][1], ends[i][1][1]))
        k = 0
        while k < len(taken[side]) and any(y0 < b + 24 and a - 24 < y1 for a, b in taken[side][k]):
            k += 1
        if k == len(taken[side]):
            taken[side].append([])
        taken[side][k].append((y0, y1))
        lanes[i] = (side, k)
    for i in range(len(plans)):
        if lead[i] in lanes:
            lanes[i] = lanes[lead[i]]
    # waypoints in the gaps of the rows that block the plain curve (every row, for a trunk)
    passes: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for i, (u, v, *_rest, lane) in enumerate(plans):
        lo, hi = sorted((row_of[u], row_of[v]))
        if lane or lead[i] != i:
            continue
        direct = _curve(list(ends[i]), False)
        if i in members:  # aim the trunk at the middle of the furthest row's targets
            far = [m for m in members[i] if row_of[plans[m][1]] == row_of[v]]
            aim = (sum(ends[m][1][0] for m in far) / len(far), ends[i][1][1])
            direct = _curve([ends[i][0], aim], False)
        for k in range(lo + 1, hi):
            ideal = _x_at(direct, row_y[k])
            if i in members or not any(g[0] <= ideal <= g[1] for g in gaps[k]):
                g = min(range(len(gaps[k])), key=lambda j: _distance(ideal, gaps[k][j]))
                passes.setdefault((k, g), []).append((ideal, i))
    through: dict[int, list[tuple[float, float]]] = {}
    for (k, g), items in passes.items():
        for x, i in _spread(items, gaps[k][g]):
            through.setdefault(i, []).append((x, row_y[k]))
    edges = []
    for i, (u, v, d, su, sv, _) in enumerate(plans):
        start, end = ends[i]
        if i in lanes:
            side, k = lanes[i]
            x = right + LANE_PAD + k * LANE_STEP if side == "right" else \
                left - LANE_PAD - k * LANE_STEP
            sign = 1 if end[1] > start[1] else -1
            turn = 12 + 6 * (k % 4)  # stagger the turns so parallel runs stay apart
            points = _curve([start, (x, start[1] + sign * turn), (x, end[1] - sign * turn), end],
                            False)
        else:
            y_lo, y_hi = sorted((start[1], end[1]))
            mid = [p for p in through.get(lead[i], []) if y_lo < p[1] < y_hi]
            mid.sort(key=lambda p: p[1], reverse=end[1] < start[1])
            if mid and lead[i] in members:
                # leave the trunk just before the target's row
                step = BRANCH + BRANCH_STEP.get(d["kind"], 0.0)
                branch = end[1] - step if end[1] > start[1] else end[1] + step
                mid.append((mid[-1][0], branch))
            points = _curve([start, *mid, end], su == sv)
        label = words[i]
        if bundle:
            group = members.get(lead[i], [])
            if label and i != lead[i] and all(plans[m][2].get("label") == d.get("label")
                                              for m in group):
                label = None  # one word on the trunk for the bundle (`meta`)
        faint = bundle and d["kind"] == "read" and graph.nodes[u]["kind"] == "param"
        edges.append(Edge(u, v, d["kind"], label, points, faint=faint,
                          start=bool(d.get("start")) or _at_start(d)))
    if bundle:  # a word said once per target: `objective` on one of the edges into train
        said: dict[tuple[str, str, str], Edge] = {}
        for e in sorted(edges, key=lambda e: abs(e.points[-1][1] - e.points[0][1])):
            if e.label:
                if (e.v, e.kind, e.label) in said:
                    e.label = None
                else:
                    said[(e.v, e.kind, e.label)] = e
    _place_labels(edges, boxes, avoid_lines=bundle)
    n_left, n_right = len(taken["left"]), len(taken["right"])
    room_left = LANE_PAD + n_left * LANE_STEP if n_left else 0.0
    room_right = LANE_PAD + n_right * LANE_STEP if n_right else 0.0
    return edges, room_left, room_right


def _shown_label(graph: nx.MultiDiGraph, u: str, v: str, label: str | None) -> str | None:
    """The words an edge of the levels view keeps: all but those of an input or parameters
    that feed more than two levels (through a residual stream their data reaches almost every
    level in every role, and `key, value, objective, lr, retain` on each edge would only crowd
    the picture); an input's edge into the training level keeps its `objective`."""
    if label is None or graph.nodes[u]["kind"] not in ("param", "input"):
        return label
    fed = {w for w in graph.successors(u) if graph.nodes[w]["kind"] != "train"}
    if graph.nodes[u]["kind"] == "input" and graph.nodes[v]["kind"] == "train" or len(fed) <= 2:
        return label
    return None


def _side_y(box: Box, side: str) -> float:
    return box.y - box.h / 2 if side == "top" else box.y + box.h / 2


def _gaps(row: list[str], boxes: dict[str, Box], bounds: tuple[float, float],
          margin: float = 10.0) -> list[tuple[float, float]]:
    """The free x intervals of a row."""
    out = []
    left = bounds[0]
    for n in sorted(row, key=lambda n: boxes[n].x):
        b = boxes[n]
        if b.x - b.w / 2 - margin > left:
            out.append((left, b.x - b.w / 2 - margin))
        left = max(left, b.x + b.w / 2 + margin)
    if left < bounds[1]:
        out.append((left, bounds[1]))
    return out or [bounds]


def _distance(x: float, gap: tuple[float, float]) -> float:
    return 0.0 if gap[0] <= x <= gap[1] else min(abs(x - gap[0]), abs(x - gap[1]))


def _spread(items: list[tuple[float, int]], gap: tuple[float, float],
            step: float = 9.0) -> list[tuple[float, int]]:
    """x positions for the edges through one gap: near where they aim, at least step apart."""
    items = sorted(items)
    lo, hi = gap
    if hi - lo <= step * len(items):
        return [(lo + (hi - lo) * (k + 1) / (len(items) + 1), i) for k, (_, i) in enumerate(items)]
    xs = [min(max(x, lo + step / 2), hi - step / 2) for x, _ in items]
    for k in range(1, len(xs)):
        xs[k] = max(xs[k], xs[k - 1] + step)
    over = xs[-1] - (hi - step / 2)
    if over > 0:
        xs = [x - over for x in xs]
        for k in range(len(xs) - 2, -1, -1):
            xs[k] = min(xs[k], xs[k + 1] - step)
    return [(x, i) for x, (_, i) in zip(xs, items)]


def _curve(points: list[tuple[float, float]], same_row: bool) -> list[tuple[float, float]]:
    """Cubic pieces through points, vertical at every point (an arc above for one row)."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    if same_row and len(points) == 2:
        lift = 22 + min(abs(x1 - x0) * 0.1, 14)
        return [(x0, y0), (x0, y0 - lift), (x1, y1 - lift), (x1, y1)]
    out = [points[0]]
    for (ax, ay), (bx, by) in zip(points, points[1:]):
        bend = max(abs(by - ay) * 0.5, 12) * (1 if by > ay else -1)
        out += [(ax, ay + bend), (bx, by - bend), (bx, by)]
    return out


def _in_gaps(x: float, gaps: list[tuple[float, float]]) -> bool:
    return any(g[0] <= x <= g[1] for g in gaps)


def _x_at(points: list[tuple[float, float]], y: float) -> float:
    """The x where a one-piece curve that is monotonic in y crosses height y."""
    p = tuple(points[:4])
    lo, hi = 0.0, 1.0
    rising = p[3][1] < p[0][1]
    for _ in range(30):
        mid = (lo + hi) / 2
        if (_bezier(p, mid)[1] > y) == rising:
            lo = mid
        else:
            hi = mid
    return _bezier(p, (lo + hi) / 2)[0]


def _bezier(p: tuple[tuple[float, float], ...], t: float) -> tuple[float, float]:
    s = 1 - t
    x = s**3 * p[0][0] + 3 * s * s * t * p[1][0] + 3 * s * t * t * p[2][0] + t**3 * p[3][0]
    y = s**3 * p[0][1] + 3 * s * s * t * p[1][1] + 3 * s * t * t * p[2][1] + t**3 * p[3][1]
    return x, y


CELL = 64.0  # the grid _place_labels files edge points in
# _bezier's weights of the control points at t = j / 24, in its order of operations
_DOT_WEIGHTS = [((1 - t) ** 3, 3 * (1 - t) * (1 - t) * t, 3 * (1 - t) * t * t, t ** 3)
                for t in (j / 24 for j in range(25))]


def _place_labels(edges: list[Edge], boxes: dict[str, Box], avoid_lines: bool = False) -> None:
    """Put each edge label near its target where it covers the fewest boxes and labels (and,
    with avoid_lines, the fewest other edges)."""
    taken: list[tuple[float, float, float, float]] = []
    rects = [(b.x - b.w / 2, b.y - b.h / 2, b.x + b.w / 2, b.y + b.h / 2) for b in boxes.values()]
    # 25 points along each piece of every edge count against a label over them. The pieces
    # are filed by the cells of CELL px their control points' box covers (the curve stays in
    # it), and a piece's points are computed when a label looks at its cells: computing them
    # all took minutes on a chain of 300 levels (over half a million pieces, one label)
    pieces: list[tuple[int, Any]] = []
    cells: dict[tuple[int, int], list[int]] = {}
    if avoid_lines and any(e.label for e in edges):
        for k, e in enumerate(edges):
            for seg in e.segments():
                xs, ys = [p[0] for p in seg[:4]], [p[1] for p in seg[:4]]
                for cx in range(int(min(xs) // CELL), int(max(xs) // CELL) + 1):
                    for cy in range(int(min(ys) // CELL), int(max(ys) // CELL) + 1):
                        cells.setdefault((cx, cy), []).append(len(pieces))
                pieces.append((k, seg))
    points: dict[int, list[tuple[float, float]]] = {}

    def dots(i: int) -> list[tuple[float, float]]:
        if i not in points:
            (x0, y0), (x1, y1), (x2, y2), (x3, y3) = pieces[i][1][:4]
            points[i] = [(w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3,  # (_bezier at j / 24)
                          w0 * y0 + w1 * y1 + w2 * y2 + w3 * y3)
                         for w0, w1, w2, w3 in _DOT_WEIGHTS]
        return points[i]

    mine: set[int] = set()

    def overlap(r: tuple[float, float, float, float]) -> float:
        total = 0.0
        for j, q in enumerate(rects + taken):
            w = min(r[2], q[2]) - max(r[0], q[0])
            h = min(r[3], q[3]) - max(r[1], q[1])
            if w > 0 and h > 0:  # (words over words are worse than over a box, with lines)
                total += w * h * (20 if avoid_lines and j >= len(rects) else 1)
        near = {i for cx in range(int(r[0] // CELL), int(r[2] // CELL) + 1)
                for cy in range(int(r[1] // CELL), int(r[3] // CELL) + 1)
                for i in cells.get((cx, cy), ())}
        for i in near:
            if pieces[i][0] not in mine:
                total += 40.0 * sum(r[0] <= x <= r[2] and r[1] <= y <= r[3] for x, y in dots(i))
        return total

    spots = (0.6, 0.45, 0.75, 0.3, 0.85) + ((0.15, 0.5, 0.68, 0.92) if avoid_lines else ())
    ends: dict[Any, set[int]] = {}  # edges by their first and by their last point
    for k, f in enumerate(edges):
        ends.setdefault(("to", f.points[-1]), set()).add(k)
        ends.setdefault(("from", f.points[0]), set()).add(k)
    for now, e in enumerate(edges):
        if not e.label:
            continue
        # the edges that share this one's arrowhead or trunk cover nothing of it
        mine = {now} | ends[("to", e.points[-1])] | ends[("from", e.points[0])]
        w = text_width(e.label, LABEL_SIZE) + 6
        h = LABEL_SIZE + 4
        best = None
        segs = e.segments()
        for seg in reversed(segs):
            for t in spots:
                x, y = _bezier(seg, t)
                r = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
                cost = overlap(r)
                if avoid_lines:  # and stay near the target, where the reader looks for it
                    cost += 1.5 * math.dist((x, y), e.points[-1])
                if best is None or cost < best[0]:
                    best = (cost, (x, y), r)
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None
        e.label_at = best[1]
        taken.append(best[2])


def _legend_items(graph: nx.MultiDiGraph | None = None,
                  faint: bool = False) -> list[tuple[str, str, str]]:
    """(kind, swatch type, words): edge kinds first, then node kinds; for a levels view
    (graph given) the kinds it has, and the light read edges of parameters when it has any."""
    kinds = list(EDGE_KINDS)
    if graph is not None:
        have = {d["kind"] for _, _, d in graph.edges(data=True)}
        kinds = [k for k in kinds if k in have]
    items = [(k, "edge", f"{k} ({EDGE_STYLE[k][2]})") for k in kinds]
    if faint:
        items.append(("faint", "edge", "read of a block's weights (light: they feed nearly "
                                       "every level)"))
    nodes = list(NODE_STYLE)
    if graph is not None:
        have = {a["kind"] for _, a in graph.nodes(data=True)}
        nodes = [k for k in nodes if k in have]
    items += [(k, "node", NODE_STYLE[k][2]) for k in nodes]
    return items


def _edge_look(kind: str) -> tuple[str, str | None]:
    """Colour and dash pattern of an edge kind, of the light `faint` reads, or of the reads
    at a chunk's start (`start`)."""
    if kind == "start":
        return EDGE_STYLE["read"][0], START_DASH
    return (FAINT, None) if kind == "faint" else EDGE_STYLE[kind][:2]


def _legend_rows(width: float, items: list[tuple[str, str, str]] | None = None
                 ) -> list[list[tuple[str, str, str, float]]]:
    rows: list[list[tuple[str, str, str, float]]] = [[]]
    x = 0.0
    limit = width - 40
    for kind, typ, words in _legend_items() if items is None else items:
        w = (34 if typ == "edge" else 22) + text_width(words, 9.5) + 22
        if typ == "node" and rows[-1] and rows[-1][-1][1] == "edge":
            rows.append([])
            x = 0.0
        if x + w > limit and rows[-1]:
            rows.append([])
            x = 0.0
        rows[-1].append((kind, typ, words, x))
        x += w
    return rows


def _legend_height(width: float, items: list[tuple[str, str, str]] | None = None) -> float:
    return 18.0 * len(_legend_rows(width, items))


# --- SVG --------------------------------------------------------------------------------------


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _f(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def to_svg(lay: Layout) -> str:
    """A self-contained SVG document of a layout."""
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(lay.width)}" '
        f'height="{_f(lay.height)}" viewBox="0 0 {_f(lay.width)} {_f(lay.height)}" '
        f'font-family="{FONT}">',
        f"<title>{_esc(lay.title)}</title>",
        "<defs>",
    ]
    for kind, (color, _, _) in EDGE_STYLE.items():
        out.append(f'<marker id="arrow-{kind}" viewBox="0 0 10 10" refX="9" refY="5" '
                   f'markerWidth="7" markerHeight="7" markerUnits="userSpaceOnUse" '
                   f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>')
    if any(e.faint for e in lay.edges):
        out.append(f'<marker id="arrow-faint" viewBox="0 0 10 10" refX="9" refY="5" '
                   f'markerWidth="6" markerHeight="6" markerUnits="userSpaceOnUse" '
                   f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{FAINT}"/></marker>')
    out.append("</defs>")
    out.append(f'<rect width="{_f(lay.width)}" height="{_f(lay.height)}" fill="#ffffff"/>')
    out.append(f'<text x="20" y="{_f(TOP_PAD + 16)}" font-size="17" font-weight="bold" '
               f'fill="#222">{_esc(fit(lay.title, 17, lay.width - 40, bold=True))}</text>')
    for i, line in enumerate(lay.subtitle.split("\n") if lay.subtitle else []):
        out.append(f'<text x="20" y="{_f(TOP_PAD + 34 + SUBTITLE_STEP * i)}" font-size="10.5" '
                   f'fill="#555">{_esc(line)}</text>')
    out += _svg_legend(lay)
    for i, band in enumerate(lay.bands):
        out.append(f'<rect x="0" y="{_f(band.y0)}" width="{_f(lay.width)}" '
                   f'height="{_f(band.y1 - band.y0)}" fill="{BAND_FILLS[i % 2]}" '
                   f'stroke="#d5dbe3" stroke-width="1"/>')
        mid = (band.y0 + band.y1) / 2
        label = fit(band.label, 12, LEFT - 24, True)
        out.append(f'<text x="14" y="{_f(mid - 2)}" font-size="12" font-weight="bold" '
                   f'fill="#34495e">{_esc(label)}</text>')
        if band.sublabel:
            out.append(f'<text x="14" y="{_f(mid + 13)}" font-size="10" fill="#6b7b8c">'
                       f"{_esc(band.sublabel)}</text>")
    for e in lay.edges:
        color, dash, _ = EDGE_STYLE[e.kind]
        p = e.points
        d = f"M{_f(p[0][0])},{_f(p[0][1])}" + "".join(
            f" C{_f(a[0])},{_f(a[1])} {_f(b[0])},{_f(b[1])} {_f(c[0])},{_f(c[1])}"
            for a, b, c in zip(p[1::3], p[2::3], p[3::3]))
        dash = START_DASH if e.start else dash
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        width = "1.8" if e.kind in ("generation", "backprop") else "1.4"
        marker = e.kind
        if e.faint:
            color, width, marker = FAINT, "1.1", "faint"
        out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{width}"'
                   f'{dash_attr} marker-end="url(#arrow-{marker})" opacity="0.85">'
                   f"<title>{_esc(f'{e.u} -> {e.v} ({e.kind})')}</title></path>")
    for box in lay.boxes.values():
        out += _svg_box(box)
    for e in lay.edges:
        if e.label and e.label_at:
            x, y = e.label_at
            color = EDGE_STYLE[e.kind][0]
            out.append(f'<text x="{_f(x)}" y="{_f(y + 3)}" font-size="{LABEL_SIZE}" '
                       f'text-anchor="middle" fill="{color}" stroke="#ffffff" '
                       f'stroke-width="3" paint-order="stroke">{_esc(e.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _svg_legend(lay: Layout) -> list[str]:
    out = []
    for r, row in enumerate(_legend_rows(lay.legend_w, lay.legend)):
        y = lay.legend_y + r * 18 + 9
        for kind, typ, words, x in row:
            x += 20
            if typ == "edge":
                color, dash = _edge_look(kind)
                dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
                marker = "read" if kind == "start" else kind
                out.append(f'<line x1="{_f(x)}" y1="{_f(y)}" x2="{_f(x + 26)}" y2="{_f(y)}" '
                           f'stroke="{color}" stroke-width="1.8"{dash_attr} '
                           f'marker-end="url(#arrow-{marker})"/>')
                tx = x + 34
            else:
                fill, stroke, _ = NODE_STYLE[kind]
                rx = 7 if kind in DATA_KINDS else 3
                out.append(f'<rect x="{_f(x)}" y="{_f(y - 6)}" width="16" height="12" '
                           f'rx="{rx}" fill="{fill}" stroke="{stroke}"/>')
                tx = x + 22
            out.append(f'<text x="{_f(tx)}" y="{_f(y + 3.5)}" font-size="9.5" fill="#333">'
                       f"{_esc(words)}</text>")
    return out


def _svg_box(box: Box) -> list[str]:
    fill, stroke, _ = NODE_STYLE[box.kind]
    out = [f"<g><title>{_esc(box.title)}</title>"]
    if box.level:
        out.append(f'<rect x="{_f(box.x - box.w / 2)}" y="{_f(box.y - box.h / 2)}" '
                   f'width="{_f(box.w)}" height="{_f(box.h)}" rx="9" fill="{fill}" '
                   f'stroke="{stroke}" stroke-width="1.5"/>')
    else:
        out.append(f'<ellipse cx="{_f(box.x)}" cy="{_f(box.y)}" rx="{_f(box.w / 2)}" '
                   f'ry="{_f(box.h / 2)}" fill="{fill}" stroke="{stroke}" stroke-width="1.2"/>')
    for (text, size, bold), y in zip(box.lines, _line_ys(box)):
        weight = ' font-weight="bold"' if bold else ""
        color = "#1c2833" if bold or not box.level else "#444"
        out.append(f'<text x="{_f(box.x)}" y="{_f(y)}" font-size="{size}"{weight} '
                   f'text-anchor="middle" fill="{color}">{_esc(text)}</text>')
    out.append("</g>")
    return out


def _line_ys(box: Box) -> list[float]:
    """Baselines of a box's lines, centred vertically."""
    heights = [size * 1.3 for _, size, _ in box.lines]
    y = box.y - sum(heights) / 2
    out = []
    for (_, size, _), h in zip(box.lines, heights):
        out.append(y + h / 2 + size * 0.36)
        y += h
    return out


# --- HTML -------------------------------------------------------------------------------------


def to_html(graph: nx.MultiDiGraph, lay: Layout, table: nx.MultiDiGraph | None = None) -> str:
    """One self-contained page: the SVG and a table of the levels (of table, the graph before
    its levels view grouped any, when given)."""
    svg = to_svg(lay).split("\n", 1)[1]  # drop the XML declaration inside HTML
    head = ("<tr>" + "".join(f"<th>{h}</th>" for h in (
        "level", "name", "kind", "frequency", "parallel with", "objective", "rule", "init",
        "choices")) + "</tr>")
    rows = []
    graph = graph if table is None else table
    for n in levels(graph):
        a = graph.nodes[n]
        freq = a["frequency"] + (f" in chunks of {a['chunk']}" if a.get("chunk") else "")
        if a.get("repeat") not in (1, None):
            freq += f" (×{a['repeat']})"
        choices = "; ".join(f"{k} {v}" for k, v in (a.get("choices") or {}).items())
        cells = [str(a["level"]), n, a["kind"], freq, ", ".join(a.get("parallel") or []),
                 a.get("objective") or "", a.get("rule") or "", a.get("init") or "", choices]
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    title = _esc(lay.title)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}: nest graph</title>",
        "<style>body{font-family:sans-serif;margin:24px;color:#222}"
        "table{border-collapse:collapse;margin-top:20px;font-size:13px}"
        "th,td{border:1px solid #ccd;padding:4px 8px;text-align:left;vertical-align:top}"
        "th{background:#eef2f7}td:nth-child(6),td:nth-child(7),td:nth-child(8)"
        "{font-family:monospace}.scroll{overflow-x:auto}</style>",
        "</head><body>",
        f"<h1>{title}</h1>",
        f'<div class="scroll">{svg}</div>',
        f"<table>{head}{''.join(rows)}</table>",
        "</body></html>",
    ]) + "\n"


# --- DOT --------------------------------------------------------------------------------------


def _dq(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: nx.MultiDiGraph, lay: Layout) -> str:
    """Graphviz source: one cluster per band, rank=same per row, bottom to top."""
    name = graph.graph.get("name", "nest")
    out = [f"digraph {_dq(name)} {{",
           f"  graph [rankdir=BT, newrank=true, nodesep=0.35, ranksep=0.55, labelloc=t, "
           f"fontname=Helvetica, label={_dq(lay.title)}];",
           "  node [fontname=Helvetica, fontsize=10];",
           "  edge [fontname=Helvetica, fontsize=8];"]
    row_of = {n: i for i, r in enumerate(lay.rows) for n in r}
    for b, band in enumerate(lay.bands):
        members = [i for i in range(len(lay.rows)) if lay.row_band[i] == b]
        out.append(f"  subgraph cluster_band_{b} {{")
        out.append(f"    label={_dq(f'{band.label} ({band.sublabel})' if band.sublabel else band.label)};")
        out.append(f'    style=filled; fillcolor="{BAND_FILLS[b % 2]}"; color="#d5dbe3";')
        for i in members:
            out.append("    { rank=same; " + " ".join(_dq(n) + ";" for n in lay.rows[i]) + " }")
            for n in lay.rows[i]:
                out.append("    " + _dot_node(graph, lay, n))
        out.append("  }")
    for i in range(len(lay.rows) - 1):
        # keep rows stacked in layout order
        out.append(f"  {_dq(lay.rows[i][0])} -> {_dq(lay.rows[i + 1][0])} [style=invis];")
    for u, v, d in graph.edges(data=True):
        color, dash, _ = EDGE_STYLE[d["kind"]]
        style = "solid" if dash is None else ("dotted" if d["kind"] == "generation" else "dashed")
        if d.get("start") or _at_start(d):
            style = "dashed"
        attrs = [f'color="{color}"', f"style={style}", f"tooltip={_dq(d['kind'])}"]
        if d.get("label"):
            attrs.append(f"label={_dq(d['label'])}")
            attrs.append(f'fontcolor="{color}"')
        if row_of.get(u, 0) > row_of.get(v, 0):
            attrs.append("constraint=false")
        out.append(f"  {_dq(u)} -> {_dq(v)} [{', '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def _dot_node(graph: nx.MultiDiGraph, lay: Layout, n: str) -> str:
    box = lay.boxes[n]
    fill, stroke, _ = NODE_STYLE[box.kind]
    label = "\n".join(text for text, _, _ in box.lines)
    if box.level:
        shape = 'shape=box, style="rounded,filled"'
    else:
        shape = 'shape=ellipse, style=filled'
    return (f"{_dq(n)} [{shape}, fillcolor=\"{fill}\", color=\"{stroke}\", "
            f"label={_dq(label)}, tooltip={_dq(box.title)}];")


# --- Mermaid ----------------------------------------------------------------------------------

_MERMAID_ESC = {"#": "#35;", '"': "#quot;", "[": "#91;", "]": "#93;", "(": "#40;",
                ")": "#41;", "{": "#123;", "}": "#125;", "<": "#60;", ">": "#62;", "|": "#124;",
                "&": "#38;", "`": "#96;"}


def _mq(text: str) -> str:
    """Text safe inside a Mermaid quoted label."""
    return "".join(_MERMAID_ESC.get(c, c) for c in text)


def to_mermaid(graph: nx.MultiDiGraph, lay: Layout) -> str:
    """A Mermaid `flowchart BT` with one subgraph per band, fastest first."""
    ids = {n: f"n{i}" for i, n in enumerate(graph.nodes)}
    out = ["flowchart BT"]
    bands = lay.bands
    for b, band in enumerate(bands):
        label = f"{band.label} ({band.sublabel})" if band.sublabel else band.label
        out.append(f'  subgraph band{b}["{_mq(label)}"]')
        out.append("    direction LR")
        for r in (r for i, r in enumerate(lay.rows) if lay.row_band[i] == b):
            for n in r:
                box = lay.boxes[n]
                text = "<br/>".join(_mq(t) for t, _, _ in box.lines)
                if box.level:
                    out.append(f'    {ids[n]}("{text}")')
                else:
                    out.append(f'    {ids[n]}(["{text}"])')
        out.append("  end")
    for b in range(len(bands) - 1):
        out.append(f"  band{b} ~~~ band{b + 1}")
    styles = []
    link = len(bands) - 1 if len(bands) > 1 else 0
    for u, v, d in graph.edges(data=True):
        arrow = {"flow": "-->", "read": "-->", "init": "-.->", "generation": "-.->",
                 "backprop": "==>"}[d["kind"]]
        label = f'|"{_mq(d["label"])}"|' if d.get("label") else ""
        out.append(f"  {ids[u]} {arrow}{label} {ids[v]}")
        color, dash, _ = EDGE_STYLE[d["kind"]]
        dash = START_DASH if d.get("start") or _at_start(d) else dash
        style = f"stroke:{color}" + (f",stroke-dasharray:{dash}" if dash else "")
        styles.append(f"  linkStyle {link} {style}")
        link += 1
    out += styles
    for kind, (fill, stroke, _) in NODE_STYLE.items():
        out.append(f"  classDef {kind} fill:{fill},stroke:{stroke},color:#1c2833")
    for kind in NODE_STYLE:
        members = [ids[n] for n, a in graph.nodes(data=True) if a["kind"] == kind]
        if members:
            out.append(f"  class {','.join(members)} {kind}")
    return "\n".join(out) + "\n"


# --- PNG --------------------------------------------------------------------------------------


def to_png(lay: Layout, dpi: int = 150) -> bytes:
    """The layout drawn with matplotlib (Agg), one point per layout unit."""
    # a bare Figure renders with Agg and leaves the user's pyplot backend alone
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse, FancyArrowPatch, FancyBboxPatch, Rectangle
    from matplotlib.path import Path

    fig = Figure(figsize=(lay.width / 72, lay.height / 72), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(lay.height, 0)
    ax.axis("off")

    def dashes(kind: str) -> Any:
        dash = _edge_look(kind)[1]
        return "solid" if dash is None else (0, tuple(float(x) for x in dash.split()))

    ax.text(20, TOP_PAD + 16, fit(lay.title, 17, lay.width - 40, bold=True), fontsize=17,
            fontweight="bold", color="#222", va="baseline", family=FONT_PNG)
    for i, line in enumerate(lay.subtitle.split("\n") if lay.subtitle else []):
        ax.text(20, TOP_PAD + 34 + SUBTITLE_STEP * i, line, fontsize=10.5, color="#555",
                va="baseline", family=FONT_PNG)
    for r, row in enumerate(_legend_rows(lay.legend_w, lay.legend)):
        y = lay.legend_y + r * 18 + 9
        for kind, typ, words, x in row:
            x += 20
            if typ == "edge":
                color = _edge_look(kind)[0]
                ax.add_patch(FancyArrowPatch((x, y), (x + 26, y), arrowstyle="-|>",
                                             mutation_scale=9, color=color, lw=1.8,
                                             linestyle=dashes(kind)))
                tx = x + 34
            else:
                fill, stroke, _ = NODE_STYLE[kind]
                ax.add_patch(FancyBboxPatch((x, y - 6), 16, 12, boxstyle="round,pad=0,rounding_size=3",
                                            fc=fill, ec=stroke, lw=1))
                tx = x + 22
            ax.text(tx, y + 3.5, words, fontsize=9.5, color="#333", va="baseline", family=FONT_PNG)
    for i, band in enumerate(lay.bands):
        ax.add_patch(Rectangle((0, band.y0), lay.width, band.y1 - band.y0, fc=BAND_FILLS[i % 2],
                               ec="#d5dbe3", lw=1, zorder=0))
        mid = (band.y0 + band.y1) / 2
        ax.text(14, mid - 2, fit(band.label, 12, LEFT - 24, True), fontsize=12,
                fontweight="bold", color="#34495e", va="baseline", family=FONT_PNG)
        if band.sublabel:
            ax.text(14, mid + 13, band.sublabel, fontsize=10, color="#6b7b8c", va="baseline",
                    family=FONT_PNG)
    for e in lay.edges:
        color = EDGE_STYLE[e.kind][0]
        path = Path(e.points, [Path.MOVETO] + [Path.CURVE4] * (len(e.points) - 1))
        lw = 1.8 if e.kind in ("generation", "backprop") else 1.4
        if e.faint:
            color, lw = FAINT, 1.1
        ax.add_patch(FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=10, color=color,
                                     lw=lw, linestyle=dashes("start" if e.start else e.kind),
                                     alpha=0.85, zorder=1,
                                     shrinkA=0, shrinkB=0))
    for box in lay.boxes.values():
        fill, stroke, _ = NODE_STYLE[box.kind]
        if box.level:
            ax.add_patch(FancyBboxPatch((box.x - box.w / 2, box.y - box.h / 2), box.w, box.h,
                                        boxstyle="round,pad=0,rounding_size=9", fc=fill,
                                        ec=stroke, lw=1.5, zorder=2))
        else:
            ax.add_patch(Ellipse((box.x, box.y), box.w, box.h, fc=fill, ec=stroke, lw=1.2,
                                 zorder=2))
        for (text, size, bold), y in zip(box.lines, _line_ys(box)):
            color = "#1c2833" if bold or not box.level else "#444"
            ax.text(box.x, y, text, fontsize=size, fontweight="bold" if bold else "normal",
                    ha="center", va="baseline", color=color, zorder=3, family=FONT_PNG)
    for e in lay.edges:
        if e.label and e.label_at:
            x, y = e.label_at
            ax.text(x, y + 3, e.label, fontsize=LABEL_SIZE, ha="center", va="baseline",
                    color=EDGE_STYLE[e.kind][0], zorder=4, family=FONT_PNG,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                          "alpha": 0.85})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


# --- entry ------------------------------------------------------------------------------------


def render(graph: nx.MultiDiGraph, fmt: str, detail: str = "auto") -> str | bytes:
    """The nest graph in fmt: svg, html, dot, mermaid (text) or png (bytes).

    detail: `full` draws every signal, `levels` only the levels (`levels_view`), `auto` the
    full graph up to AUTO_FULL_MAX nodes and the levels beyond.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
    shown = view(graph, detail)
    lay = layout(shown)
    if fmt == "svg":
        return to_svg(lay)
    if fmt == "html":
        return to_html(shown, lay, table=graph)
    if fmt == "dot":
        return to_dot(shown, lay)
    if fmt == "mermaid":
        return to_mermaid(shown, lay)
    return to_png(lay)
