"""The Triton back end against the generic PyTorch tier, under TRITON_INTERPRET=1 on CPU.

Triton reads TRITON_INTERPRET when it is imported, so the comparisons run in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import torch, nestc
    from nestc import runtime
    launches = []
    real = runtime.triton_module
    runtime.triton_module = lambda source: launches.append(1) or real(source)
    cases = [
        ("std/optim/adam.nest", "Adam", {"weight_decay": 0.1}),
        ("std/optim/adam.nest", "AdamW", {}),
        ("std/optim/sgd.nest", "SGD", {"momentum": 0.9, "nesterov": True}),
        ("std/optim/sgd.nest", "SGD", {"momentum": 0.9, "dampening": 0.1}),
        ("std/optim/nested.nest", "PreconditionedMomentum", {}),
        ("std/optim/nested.nest", "NonlinearMomentum", {"output": "sign"}),
        ("std/optim/muon.nest", "Muon", {"ns_dtype": "float32"}),
        ("slow.nest", "Slow", {"k": 3}),
    ]
    open("slow.nest", "w").write(
        "optimizer Slow(lr = 0.1, b = 0.5, k: int = 2) {\\n    param W\\n"
        "    memory m = zeros_like(W) every k steps { m = b * m + sum(grad(W)) }\\n"
        "    memory u = from grad(W) every step { u = b * u + clamp(grad(W), lo = -1, hi = 1) }\\n"
        "    W -= lr * (m + u) / (1 + abs(debias(u, b)))\\n}\\n")
    for path, name, hyper in cases:
        prog = nestc.load(path)
        torch.manual_seed(0)
        shapes = [(33, 7), (130,), (5, 4, 3)] if name != "Muon" else [(33, 7), (130,)]
        a = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        oa = prog.build(name, a, backend="generic", **hyper)
        ob = prog.build(name, b, backend="triton", **hyper)
        launches.clear()
        for _ in range(7):
            for p, q in zip(a, b):
                g = torch.randn_like(p)
                p.grad, q.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        err = max((p - q).abs().max().item() for p, q in zip(a, b))
        assert err < 1e-5, (name, hyper, err)
        assert launches, (name, "ran no Triton kernel")
        print(name, "ok", err)
''')


def test_triton_kernels_match_the_generic_tier(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(" ok ") == 8


def test_kernel_names_and_fusability():
    import nestc
    from nestc.codegen.triton import fusable
    from nestc.compile import lower

    ns: dict = {}
    exec(compile(nestc.load("std/optim/adam.nest").source("Adam"), "<adam>", "exec"), ns)
    kernels = ns["_TRITON"].splitlines()
    assert "@triton.jit" in kernels
    assert any(ln.startswith("def Adam_fwd_kernel_0(P, G, S_m, S_v, n, s0,") for ln in kernels)
    # one load and one store per tensor: W, grad(W) and the two moments
    assert sum("tl.load(" in ln for ln in kernels) == 4
    assert sum("tl.store(" in ln for ln in kernels) == 3
    muon = lower(nestc.load("std/optim/muon.nest").decl("Muon"))
    assert [fusable(v) for v in muon.variants] == [False, True]  # newton_schulz: no kernel
