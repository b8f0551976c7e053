"""`nestc explain`: a plain-text report of a declaration's levels, fastest first."""

from __future__ import annotations

import math
import textwrap
from typing import Any

import networkx as nx

from nestc.check import CHOICES
from nestc.nest import LEVEL_KINDS, frequency_key, levels

DEFAULT_TOKENS = 4096
DEFAULT_STEPS = 1000
CHOICE_WORDS = {"read": "read", "backprop": "backprop", "state": "state",
                "partial": "partial chunk", "dgd": "dgd"}
KEY_WIDTH = 14  # the width of the field names in a level's block
WIDTH = 100  # wrap long field values (lists of parallel levels) at this column


def explain(program: Any, name: str, /, tokens: int | None = None, steps: int | None = None,
            **hyper: Any) -> str:
    """The report for declaration `name`: header, hyperparameters, then levels by frequency.

    Updates are counted over `tokens` tokens (default 4096) for levels that learn in context and
    over `steps` optimizer steps (default 1000) for the others.
    """
    checked = program.decl(name)
    graph = program.graph(name, **hyper)
    report = render_explain(graph, checked.decl.span, tokens or DEFAULT_TOKENS,
                            steps or DEFAULT_STEPS)
    if checked.kind == "optimizer":
        report += "\n" + render_lowering(checked)
    elif checked.kind in ("block", "model"):
        report += "\n" + render_memories(program, checked, hyper)
    return report


def render_memories(program: Any, checked: Any, hyper: dict[str, Any]) -> str:
    """What each memory of a block or model compiles to (by its path in the module), or what
    the compiler does not build yet (a mistake is the build's NestError)."""
    from nestc.codegen.block import memories_of
    from nestc.errors import NestError

    try:
        mems = memories_of(program, checked, hyper)
    except NestError as err:
        if not err.unsupported:  # a mistake in the spec or its values: the build's error
            raise  # (heads=0 gave a note and exit 0)
        where = f"{err.span}: " if err.span is not None else ""
        return f"not compiled: {where}{err.message}\n"
    lines = [f"compiled: {len(mems)} memor{'y' if len(mems) == 1 else 'ies'} "
             "(`nestc compile` prints the source)"]
    for path, what in mems:
        lines.append(f"  {path}")
        lines += textwrap.wrap(what, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def render_lowering(checked: Any) -> str:
    """How the compiler lowers an optimizer: each variant's closed-form updates and its kernel."""
    from nestc import ir
    from nestc.codegen.triton import fusable
    from nestc.compile import lower

    opt = lower(checked)
    lines = [f"compiled ({len(opt.variants)} variant{'s' * (len(opt.variants) != 1)}, "
             "picked by hyperparameters and the param's shape)"]
    for i, v in enumerate(opt.variants):
        conds = " and ".join(ir.text(c, opt.param) if t else f"not {ir.text(c, opt.param, 3)}"
                             for c, t in v.conditions) or "always"
        lines.append(f"  variant {i}: {conds}")
        periods = {m.name: m.period for m in v.memories}
        for st in v.stmts:
            target = st.name if isinstance(st, ir.Let) else st.target
            op = "=" if isinstance(st, ir.Let) else "<-"
            line = f"    {target} {op} {ir.text(st.value, opt.param)}"
            if isinstance(st, ir.Assign) and st.kind in ("state", "mlp"):
                period = st.every if st.every is not None else periods[st.target]
                notes = [f"every {ir.text(period, opt.param)} steps"] \
                    if period != ir.const(1) else []
                if st.late:
                    notes.append("read before write: at the end of the step")
                if notes:
                    line += f"   ({'; '.join(notes)})"
            lines.append(line)
        for m in v.memories:
            if m.init == "eval" and m.first is not None:
                lines.append(f"    ({m.name} is kept, computed at its level's frequency; it "
                             f"starts as {ir.text(m.first, opt.param)})")
        for m in v.memories:
            if m.init == "from" and m.first is not None:
                lines.append(f"    ({m.name}'s first write stores {ir.text(m.first, opt.param)})")
        mlps = [m.name for m in v.memories if m.mlp is not None]
        if mlps:
            lines.append(f"    kernel: none; MLP memory {', '.join(mlps)} runs tensor by tensor "
                         "(generic code; backend='compiled' traces it with torch.compile)")
        elif v.kernel is None:
            fused = ("backend='triton' (the default on CUDA) and 'compiled' fuse it"
                     if fusable(v) else "backend='compiled' fuses it with torch.compile")
            lines.append(f"    kernel: none recognized; generic multi-tensor code ({fused})")
        else:
            args = ", ".join(f"{k}={ir.text(e, opt.param)}" for k, e in v.kernel.args)
            lines.append(f"    kernel: torch fused {v.kernel.kernel}({args})")
    return "\n".join(lines) + "\n"


def render_explain(graph: nx.MultiDiGraph, span: Any, tokens: int, steps: int) -> str:
    """The explain report of a nest graph (see explain)."""
    g = graph.graph
    lines = [f"{g['kind']} {g['name']}  ({span})" if span is not None else
             f"{g['kind']} {g['name']}"]
    hyper = g.get("hyper") or {}
    if hyper:
        width = max(map(len, hyper))
        lines.append("  hyperparameters")
        lines += [f"    {k:<{width}} = {_value(v)}" for k, v in hyper.items()]
    else:
        lines.append("  no hyperparameters")
    requires = g.get("requires") or []
    if requires:
        lines.append("  requires (met)")
        lines += [f"    {r}" for r in requires]
    order = levels(graph)
    uses_tokens = any(graph.nodes[n]["unit"] == "token" for n in order)
    uses_steps = any(graph.nodes[n]["unit"] != "token" for n in order)
    counted = " and ".join(x for x, used in ((f"{tokens} tokens", uses_tokens),
                                             (f"{steps} steps", uses_steps)) if used)
    lines.append("")
    lines.append(f"{len(order)} level{'s' * (len(order) != 1)}, fastest first"
                 + (f" (updates counted over {counted})" if counted else ""))
    band: tuple[Any, ...] | None = None
    for n in order:
        a = graph.nodes[n]
        key = frequency_key(a)
        if key != band:
            band = key
            lines.append("")
            lines.append(_band_title(graph, key))
        lines += _level(graph, n, tokens, steps)
    signals = [n for n, a in graph.nodes(data=True) if a["kind"] not in LEVEL_KINDS]
    if signals:
        lines.append("")
        lines.append("signals")
        for n in signals:
            a = graph.nodes[n]
            src = _sources(graph, n, ("flow", "read", "generation", "init"))
            what = "input" if a["kind"] == "input" else "output" if a.get("output") else "signal"
            shape = f" {a['shape']}" if a.get("shape") else ""
            lines.append(f"  {n:<{_width(signals)}}  {what}{shape}"
                         + (f"  <- {', '.join(src)}" if src else ""))
    return "\n".join(lines).rstrip() + "\n"


def _band_title(graph: nx.MultiDiGraph, key: tuple[Any, ...]) -> str:
    texts: list[str] = []
    for n in levels(graph):
        a = graph.nodes[n]
        if frequency_key(a) == key and a["frequency"] not in texts:
            texts.append(a["frequency"])
    return " / ".join(texts)


def _level(graph: nx.MultiDiGraph, n: str, tokens: int, steps: int) -> list[str]:
    a = graph.nodes[n]
    title = f"  level {a['level']}  {n}  ({a['kind']}"
    if a.get("repeat") not in (1, None):
        title += f", x{a['repeat']}"
    title += ")"
    rows: list[tuple[str, str]] = []
    freq = a["frequency"] + (f" in chunks of {a['chunk']}" if a.get("chunk") else "")
    rows.append(("frequency", freq))
    if a["parallel"]:
        rows.append(("parallel with", ", ".join(a["parallel"])))
    if a.get("after"):
        when = "token" if a["unit"] == "token" else "step"
        rows.append(("after", ", ".join(a["after"]) + f" (reads their state of the same {when})"))
    flow = _sources(graph, n, ("flow", "generation"))
    if flow:
        rows.append(("learns from", ", ".join(flow)))
    reads = _sources(graph, n, ("read",))
    if reads:
        rows.append(("reads", ", ".join(reads)))
    ahead = sorted({v for _, v, d in graph.out_edges(n, data=True)
                    if "at chunk start" in (d.get("label") or "")})
    if ahead:
        rows.append(("read early", "above its declaration, at the start of each chunk, by "
                     + ", ".join(ahead)))
    trainers = [u for u, _, d in graph.in_edges(n, data=True) if d["kind"] == "backprop"]
    if trainers:
        rows.append(("trained by", ", ".join(trainers) + " (task gradient)"))
    if a.get("structure"):
        rows.append(("structure", a["structure"] + (" per head" if a.get("per_head") else "")))
    rows.append(("objective", a.get("objective") or _no_objective(a)))
    rows.append(("rule", a.get("rule") or "-"))
    learners = [u for u, _, d in graph.in_edges(n, data=True)
                if d["kind"] == "init" and d.get("label") == "meta"]
    init = a.get("init") or "-"
    if learners:
        init += f" (learned by {', '.join(learners)})"
    rows.append(("init", init))
    if a["kind"] == "memory" and a.get("unit") != "step":
        # the sequence-memory choices; an optimizer's element-wise states have none of them
        explicit = set(a.get("explicit") or ())
        for k, (default, _) in CHOICES.items():
            value = (a.get("choices") or {}).get(k, default)
            mark = "(default)" if k not in explicit else "(set)"
            rows.append((CHOICE_WORDS[k], f"{value:<12} {mark}"))
    rows.append(("updates", _updates(a, tokens, steps)))
    return [title] + [line for k, v in rows for line in _field(k, v)]


def _field(key: str, value: str) -> list[str]:
    """`    key            value`, the value wrapped under itself past WIDTH columns."""
    indent = " " * (4 + KEY_WIDTH + 1)
    # keep "name (label)" together: break lines only between list items
    glued = value.replace(" (", "\0(")
    lines = textwrap.wrap(glued, WIDTH, initial_indent=f"    {key:<{KEY_WIDTH}} ",
                          subsequent_indent=indent, break_long_words=False,
                          break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines] or [f"    {key}"]


def _no_objective(a: dict[str, Any]) -> str:
    if a["kind"] == "param" and a.get("rule"):
        return "- (explicit update)"
    return "- (explicit update)" if a.get("rule") else "-"


def _updates(a: dict[str, Any], tokens: int, steps: int) -> str:
    """How many times the level writes over the counted tokens or steps."""
    unit, period = a["unit"], a.get("period")
    if unit == "never":
        return "0 in context (only the outer level trains it)"
    if period is None:
        return "unknown (the period depends on data)"
    total, word = (tokens, "tokens") if unit == "token" else (steps, "steps")
    partial = (a.get("choices") or {}).get("partial", CHOICES["partial"][0])
    flush = unit == "token" and period > 1 and total % period and partial == "flush"
    count = total // period + bool(flush)  # (a flush updates at the call's end too)
    text = f"{count} over {total} {word}"
    if flush:
        text += f" (the last {total % period} update at the call's end: flush)"
    elif unit == "token" and period > 1 and total % period:
        text += f" (the last {total % period} in a partial chunk: {partial})"
    chunk = a.get("chunk")
    if chunk:
        chunks = math.ceil(total / chunk)
        text += f", in {chunks} chunk{'s' * (chunks != 1)} of {chunk}"
        if total % chunk:
            text += f" (last one partial: {partial})"
    return text


def _sources(graph: nx.MultiDiGraph, n: str, kinds: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for u, _, d in graph.in_edges(n, data=True):
        if d["kind"] in kinds:
            text = f"{u} ({d['label']})" if d.get("label") else u
            if text not in out:
                out.append(text)
    return out


def _value(v: Any) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(map(_value, v)) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, list):
        return "[" + ", ".join(map(_value, v)) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def _width(names: list[str]) -> int:
    return max(map(len, names))
