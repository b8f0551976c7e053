"""std/optim/m3.nest against a plain-PyTorch transcription of Algorithm 1 (PAPER.md sec. 6)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import nestc  # noqa: E402

M3 = nestc.load("std/optim/m3.nest")


def ns5(x: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz, written out again here: quintic, 5 steps, Frobenius norm clamped at 1e-7."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / y.norm().clamp(min=1e-7)
    for _ in range(5):
        s = y @ y.T
        y = a * y + (b * s + c * s @ s) @ y
    return y.T if tall else y


class ReferenceM3:
    """Algorithm 1 for one matrix, step by step as the paper's box lists it."""

    def __init__(self, w, lr, betas, alpha, eps, f, ema=False):
        self.ema = ema
        self.w, self.lr, self.betas, self.alpha, self.eps, self.f = w, lr, betas, alpha, eps, f
        self.m1 = torch.zeros_like(w)
        self.m2 = torch.zeros_like(w)
        self.v = torch.zeros_like(w)
        self.s = torch.zeros_like(w)
        self.o2 = torch.zeros_like(w)
        self.t = 0

    def step(self, g):
        b1, b2, b3 = self.betas
        self.t += 1
        if self.ema:  # M3EMA: moving averages; the slow one of each chunk's mean gradient
            self.m1 = b1 * self.m1 + (1 - b1) * g
            self.v = b2 * self.v + (1 - b2) * g * g
        else:
            self.m1 = self.m1 + b1 * g
            self.v = self.v + b2 * g * g
        o1 = ns5(self.m1)
        self.w = self.w - self.lr * (o1 + self.alpha * self.o2) / (self.v.sqrt() + self.eps)
        self.s = self.s + g
        if self.t % self.f == 0:  # the slow level: used from the next step on
            if self.ema:
                self.m2 = b3 * self.m2 + (1 - b3) * self.s / self.f
            else:
                self.m2 = self.m2 + b3 * self.s
            self.s = torch.zeros_like(self.s)
            self.o2 = ns5(self.m2)


@pytest.mark.parametrize("name", ["M3", "M3EMA"])
@pytest.mark.parametrize("backend", ["auto", "generic"])
def test_matches_algorithm_1(backend, name):
    torch.manual_seed(0)
    shapes = [(12, 8), (8, 12), (6, 6)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99, 0.8), "alpha": 0.5, "eps": 1e-3, "slow_every": 3}
    refs = [ReferenceM3(p.detach().clone(), hyper["lr"], hyper["betas"], hyper["alpha"],
                        hyper["eps"], hyper["slow_every"], ema=name == "M3EMA") for p in params]
    opt = M3.build(name, params, ns_dtype="float32", backend=backend, **hyper)
    for _ in range(10):  # the slow level fires at steps 3, 6 and 9
        grads = [torch.randn_like(p) for p in params]
        for p, g, r in zip(params, grads, refs):
            p.grad = g.clone()
            r.step(g)
        opt.step()
        for p, r in zip(params, refs):
            torch.testing.assert_close(p.detach(), r.w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(opt.state[p]["M2_newton_schulz"], r.o2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(opt.state[p]["M2_sum"], r.s, rtol=1e-5, atol=1e-6)


def test_slow_level_changes_only_every_slow_every_steps():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = M3.build("M3", [p], slow_every=4, ns_dtype="float32")
    seen = []
    for _ in range(9):
        p.grad = torch.randn_like(p)
        opt.step()
        seen.append(opt.state[p]["M2"].clone())
    changed = [t + 1 for t in range(9) if t == 0 and seen[0].abs().sum() > 0
               or t > 0 and not torch.equal(seen[t], seen[t - 1])]
    assert changed == [4, 8]


def test_vectors_use_the_auxiliary_adamw():
    torch.manual_seed(2)
    b = torch.nn.Parameter(torch.randn(7))
    ref = b.detach().clone().requires_grad_(True)
    opt = M3.build("M3", [b])
    torch_opt = torch.optim.AdamW([ref], lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0,
                                  fused=True)
    for _ in range(5):
        g = torch.randn(7)
        b.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    assert torch.equal(b, ref)


def test_newton_schulz_of_the_slow_momentum_runs_only_when_it_changes(monkeypatch):
    """hoist_slow: NS(M2) is computed when the state is made and at each slow update."""
    from nestc import runtime

    calls = []
    real = runtime.newton_schulz
    monkeypatch.setattr(runtime, "newton_schulz",
                        lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = M3.build("M3", [p], slow_every=5, ns_dtype="float32")
    for _ in range(10):
        p.grad = torch.randn_like(p)
        opt.step()
    # NS(M1) every step: 10; NS(M2): once when made, then at steps 5 and 10: 3
    assert len(calls) == 13
    assert "M2_newton_schulz" in opt.state[p]
