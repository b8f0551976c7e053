"""Every declaration in the stdlib and examples compiles (optimizers step, blocks and models
run); the example scripts run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nestc

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted([*ROOT.glob("stdlib/**/*.nest"), *ROOT.glob("examples/*.nest")])


def assert_tidy(source: str) -> None:
    """What a user's linter checks in a file that `nestc compile -o` writes: lines of at most
    99 columns (the embedded kernel source aside) and no unused import."""
    import ast

    long = [ln for ln in source.splitlines() if len(ln) > 99 and not ln.startswith("_TRITON")]
    assert not long, long
    tree = ast.parse(source)
    imported = {a.asname or a.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert imported <= used, imported - used


def decls(*kinds: str):
    """(path, name) of every stdlib and example declaration of these kinds."""
    for path in SPECS:
        prog = nestc.load(path)
        for name in prog.names:
            if prog.decl(name).kind in kinds:
                yield pytest.param(path, name, id=f"{path.relative_to(ROOT)}:{name}")


@pytest.mark.parametrize(("path", "name"), list(decls("optimizer")))
def test_every_optimizer_compiles_and_steps(path, name):
    torch = pytest.importorskip("torch")
    prog = nestc.load(path)
    source = prog.source(name)
    compile(source, f"<{name}>", "exec")
    assert_tidy(source)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    checked = prog.decl(name)
    required = {h: 0.01 for h, info in checked.hypers.items() if info.required}
    opt = prog.build(name, params, **required)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_optimizers_example_runs(tmp_path):
    out = tmp_path / "losses.png"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "optimizers.py"), "--steps",
                          "12", "--out", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "M3 (lr 2e-4" in run.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("path", "name"), list(decls("block", "model")))
def test_every_block_and_model_compiles_and_runs(path, name):
    torch = pytest.importorskip("torch")
    prog = nestc.load(path)
    checked = prog.decl(name)
    small = {"dim": 8, "vocab": 12, "depth": 1, "heads": 2}
    hyper = {h: v for h, v in small.items() if h in checked.hypers}
    source = prog.source(name, **hyper)
    compile(source, f"<{name}>", "exec")
    assert_tidy(source)
    mod = prog.build(name, **hyper)
    x = torch.randint(0, 12, (1, 5)) if checked.kind == "model" else torch.randn(1, 5, 8)
    # a block's memories that learn from the task loss take it from the caller
    task = (lambda y, start, stop: y.pow(2).sum()) if mod.tasks and checked.kind == "block" \
        else None
    y = mod(x, task=task)
    assert y.shape[:2] == (1, 5) and y.isfinite().all(), name


@pytest.mark.parametrize("path", sorted(ROOT.glob("benchmarks/specs/*.nest")),
                         ids=lambda p: p.name)
def test_every_benchmark_model_builds_and_runs(path):
    torch = pytest.importorskip("torch")
    prog = nestc.load(path)
    for name in prog.names:
        if prog.decl(name).kind == "model":
            logits = prog.build(name, vocab=12, dim=8)(torch.randint(0, 12, (1, 5)))
            assert logits.shape == (1, 5, 12) and logits.isfinite().all(), name


@pytest.mark.parametrize("doc", ["docs/language.md", "docs/optimizers.md"])
def test_every_nest_example_in_the_docs_checks(doc):
    """The docs' ```nest blocks load (parse, resolve, check): what they show is the language."""
    import re

    blocks = re.findall(r"```nest\n(.*?)```", (ROOT / doc).read_text(), re.S)
    assert blocks
    for i, text in enumerate(blocks):
        nestc.loads(text, f"{doc} block {i + 1}")


def test_the_builtins_table_in_the_language_docs_says_what_builtins_take():
    """docs/language.md's builtins table against nestc.builtins.BUILTINS: every builtin once,
    with its positional count, its keywords and its meaning (the table was said to be generated
    from BUILTINS, but nothing regenerated it: `mean`'s `per` and `softmax_attention`'s `rope`
    were missing)."""
    from nestc.builtins import BUILTINS

    text = (ROOT / "docs/language.md").read_text()
    table = text.split("<!-- builtins table: begin -->")[1].split("<!-- builtins table: end -->")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        sig, positional, keywords, meaning = cells
        name = sig.strip("`").split("(")[0]
        assert name not in rows, f"{name} is in the table twice"
        rows[name] = (positional, keywords, meaning.replace("\\|", "|"))
    assert set(rows) == set(BUILTINS)
    for name, b in BUILTINS.items():
        positional = str(b.min_args) if b.min_args == b.max_args else \
            f"{b.min_args}+" if b.max_args is None else f"{b.min_args}-{b.max_args}"
        assert rows[name] == (positional, ", ".join(b.kwargs) or "-", b.doc), name
