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
    assert "@_triton.jit" in kernels
    assert any(ln.startswith("def Adam_fwd_kernel_0(ADDR, T, MAP, s0,") for ln in kernels)
    # one load and one store per tensor: W, grad(W) and the two moments
    assert sum(" + i, mask=mask)" in ln and "tl.load(" in ln for ln in kernels) == 4
    assert sum("tl.store(" in ln for ln in kernels) == 3
    # one launch per group: the launcher hands every tensor to the multi-tensor runtime
    assert "    _launch(Adam_fwd_kernel_0, [_params, _grads, _st_m, _st_v], _numbers)" in kernels
    muon = lower(nestc.load("std/optim/muon.nest").decl("Muon"))
    assert [fusable(v) for v in muon.variants] == [False, True]  # newton_schulz: no kernel


EDGES = textwrap.dedent('''
    import torch, nestc
    def pair(spec, hyper, make):
        prog = nestc.loads(spec, "e.nest")
        torch.manual_seed(0)
        a = make()
        torch.manual_seed(0)
        b = make()
        oa = prog.build("E", a, backend="generic", **hyper)
        ob = prog.build("E", b, backend="triton", **hyper)
        for _ in range(3):
            for p, q in zip(a, b):
                g = torch.randn(p.shape, dtype=p.dtype)
                if "nan" in spec:
                    g[..., 0] = float("nan")
                p.grad, q.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        for p, q in zip(a, b):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6, equal_nan=True), (spec, p, q)
    vec = lambda: [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(2, 3))]
    # powers of negative numbers, NaN through min/max/relu/clamp, and names the launcher uses
    pair("optimizer E(lr = 0.1) {\\n    param W\\n"
         "    W -= lr * (grad(W) ** 3 + grad(W) ** 2 + grad(W) ** 0 + grad(W) ** 1)\\n}\\n", {},
         vec)
    from nestc.codegen.triton import fusable
    from nestc.compile import lower
    spec = "optimizer E(lr = 0.1, k = 2.0) {\\n    param W\\n    W -= lr * grad(W) ** k\\n}\\n"
    assert not fusable(lower(nestc.loads(spec, "k.nest").decl("E")).variants[0])
    pair("optimizer E(lr = 0.1) {\\n    param W\\n    W -= lr * min(grad(W), 1)  # nan\\n}\\n",
         {}, vec)
    pair("optimizer E(lr = 0.1) {\\n    param W\\n    W -= lr * relu(grad(W)) + lr * "
         "clamp(grad(W), lo = -1, hi = 1)  # nan\\n}\\n", {}, vec)
    pair("optimizer E(lr = 0.1, triton = 0.5, BLOCK = 2.0, tl = 1.0) {\\n    param W\\n"
         "    W -= lr * triton * BLOCK * tl * grad(W)\\n}\\n", {}, vec)
    # float64 and a transposed view take the generic code instead of the float32 kernel
    pair("optimizer E(lr = 1e-9) {\\n    param W\\n    W -= lr * grad(W)\\n}\\n", {},
         lambda: [torch.nn.Parameter(torch.ones(4, dtype=torch.float64)),
                  torch.nn.Parameter(torch.randn(3, 4).t())])
    # many tensors in one launch: empty, one element, block edges, a 2-D one; then steps that
    # differ (a tensor without a grad skips a step) split the launch
    sizes = [(0,), (1,), (1023,), (1024,), (1025,), (3000,), (40, 70)]
    many = lambda: [torch.nn.Parameter(torch.randn(*s)) for s in sizes]
    adam = ("optimizer E(lr = 0.01, b = 0.9) {\\n    param W\\n"
            "    memory m = zeros_like(W) every step { m = b * m + grad(W) }\\n"
            "    W -= lr * debias(m, b)\\n}\\n")
    pair(adam, {}, many)
    prog = nestc.loads(adam, "e.nest")
    a, b = many(), many()
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    oa = prog.build("E", a, backend="generic")
    ob = prog.build("E", b, backend="triton")
    for step in range(4):
        for k, (p, q) in enumerate(zip(a, b)):
            g = torch.randn(p.shape) if (k + step) % 3 else None
            p.grad, q.grad = g, None if g is None else g.clone()
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p, q)
    print("edges ok")
''')


def test_triton_edge_cases_match_the_generic_tier(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", EDGES], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "edges ok" in run.stdout
