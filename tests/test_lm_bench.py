"""The stdlib language models: benchmarks/memory.py's language-model table runs (quick sizes),
and TitansLM learns an in-context copy task on CPU."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import nestc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["TransformerLM", "TitansLM", "DeltaNetLM"]


def test_quick_language_model_benchmark_has_a_row_per_model():
    # (no timed assertion: under load it failed at 26 s against a 20 s limit; the timeout
    # bounds it)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick",
                          "--lm-only"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    for name in MODELS:
        assert name in rows, run.stdout
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert float(cells[3].replace(",", "")) > 0  # tokens/s
    assert float(rows["TransformerLM"].strip("|").split("|")[4]) == 1.0
    # HopeLM: a measured row, or a line saying what the compiler does not build yet
    assert "HopeLM" in rows or "HopeLM: not measured" in run.stdout, run.stdout


UNBUILT = """
from "std/optim/adam.nest" import AdamW
block Shared(dim, heads = 4) {
    input x : [T, dim]
    let k = x |> linear(dim) |> l2norm(per = heads)
    memory M : matrix(dim / heads, dim / heads) per head = zeros every token {
        dgd literal
        objective dot(M(k), x); rule dgd(lr = 0.5)
    }
    output M(k)
}
model SharedLM(vocab = 256, dim = 128, depth = 4) {
    input tokens : [T] int
    let h = embed(tokens, vocab, dim)
    repeat depth { h = h + Shared(dim)(h) }
    output logits = h |> linear(vocab)
    train every step { objective cross_entropy(logits, next(tokens)); rule AdamW(lr = 4e-4) }
}
"""


def test_a_model_nestc_does_not_build_gets_a_line_not_a_number(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_memory",
                                                  ROOT / "benchmarks" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "shared.nest").write_text(UNBUILT.lstrip())
    monkeypatch.setattr(bench, "LM_SPECS", [bench.LM_SPECS[0],
                                            ("SharedLM", str(tmp_path / "shared.nest"))])
    args = argparse.Namespace(device="cpu", lm_batch=1, lm_T=8, vocab=16, lm_dim=16, depth=1, reps=1,
                              warmup=1, hope=False, quick=False, backend="chunked")
    lines = bench.bench_language_models(args)
    assert [line for line in lines if line.startswith("| TransformerLM |")]
    assert not [line for line in lines if line.startswith("| SharedLM")]
    (note,) = [line for line in lines if line.startswith("SharedLM")]
    assert "not measured" in note and "literal DGD with a dot objective" in note
    assert "shared.nest:5" in note


# The copy task of test_module.py::test_transformer_lm_learns_to_copy: the second half of each
# sequence repeats the first; scored on the 8 tokens after the first half, on fresh sequences.
TITANS_LM = nestc.load("std/models/titans.nest")
COPY_SIZES = {"vocab": 12, "dim": 32, "depth": 2, "heads": 2}


def copy_batch(n, generator=None):
    half = torch.randint(2, 12, (n, 8), generator=generator)
    return torch.cat([half, half], 1)


def learn_to_copy(model, steps, lr=3e-3, check_every=25):
    """Trains on the copy task and returns the accuracy on 128 fresh sequences, checked every
    `check_every` steps (training stops at the first check that reaches 0.9)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    held_out = copy_batch(128, torch.Generator().manual_seed(1))
    acc = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier when other processes share the cores
    try:
        for i in range(1, steps + 1):
            tokens = copy_batch(16)
            logits = model(tokens)[:, 7:-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 12),
                                                     tokens[:, 8:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i % check_every == 0 or i == steps:
                with torch.no_grad():
                    pred = model(held_out)[:, 7:-1].argmax(-1)
                acc = (pred == held_out[:, 8:]).float().mean().item()
                if acc > 0.9:
                    break
    finally:
        torch.set_num_threads(threads)
    return acc


def test_titans_lm_learns_to_copy():
    """Above 0.9 on fresh sequences within 300 steps (about 225 for seeds 0, 1 and 2 when
    measured). With the forgetting gate at 0.5 at initialization (no retain_bias) it reached
    about 0.5 in 150 steps and 0.8 after 500 for two of three seeds."""
    torch.manual_seed(0)
    model = TITANS_LM.build("TitansLM", **COPY_SIZES)
    assert learn_to_copy(model, 300) > 0.9


def test_hope_lm_learns_to_copy():
    """Above 0.9 within 500 steps (about 25 s on one thread). With the main memory's learning
    rate scaled by 0.1 (memory_lr) it was at 0.18 after 300 steps; the default is 0.3, since
    1.0 diverges on sequences of a few hundred tokens."""
    torch.manual_seed(0)
    model = nestc.load("std/models/hope.nest").build("HopeLM", vocab=12, dim=32, depth=2,
                                                     chunks=[16, 64])
    assert learn_to_copy(model, 500) > 0.9
