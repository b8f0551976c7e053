"""std/optim/muon.nest against torch.optim.Muon and against plain-PyTorch references."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import nestc  # noqa: E402
from nestc.compile import lower  # noqa: E402
from nestc.ops.newton_schulz import newton_schulz  # noqa: E402

MUON = nestc.load("std/optim/muon.nest")


def make(seed: int = 0, bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32, bias=bias), torch.nn.Tanh(),
                               torch.nn.Linear(32, 8, bias=bias))


def batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(64, 16, generator=g), torch.randn(64, 8, generator=g)


def train(model, opt, steps):
    for i in range(steps):
        x, y = batch(i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kw", [{}, {"nesterov": False}, {"momentum": 0.9, "weight_decay": 0.0},
                                {"adjust_lr_fn": "match_rms_adamw", "lr": 0.02}],
                         ids=["defaults", "no-nesterov", "momentum", "match_rms_adamw"])
@pytest.mark.parametrize("backend", ["auto", "generic"])
def test_matches_torch_muon_on_matrices(kw, backend):
    ref, got = make(), make()
    torch_kw = {**kw, "adjust_lr_fn": kw.get("adjust_lr_fn")}
    train(ref, torch.optim.Muon(ref.parameters(), **torch_kw), 50)
    train(got, MUON.build("Muon", got.parameters(), backend=backend, **kw), 50)
    # same bf16 Newton-Schulz and the same order of operations: equal to the last bit
    assert max_diff(ref, got) == 0.0


def test_vectors_go_to_the_auxiliary_adamw():
    model = make(bias=True)
    [matrix, vector] = lower(MUON.decl("Muon")).variants
    assert matrix.kernel is None and vector.kernel is not None
    assert vector.kernel.kernel == "adamw"
    opt = MUON.build("Muon", model.parameters(), adamw_lr=1e-2, adamw_weight_decay=0.01)
    biases = [model[0].bias, model[2].bias]
    ref_biases = [b.detach().clone().requires_grad_(True) for b in biases]
    ref = torch.optim.AdamW(ref_biases, lr=1e-2, betas=(0.9, 0.95), eps=1e-10,
                            weight_decay=0.01, fused=True)
    for i in range(20):
        x, y = batch(i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for r, b in zip(ref_biases, biases):
            r.grad = b.grad.clone()
        opt.step()
        ref.step()
    for r, b in zip(ref_biases, biases):
        assert torch.equal(r, b)
    assert set(opt.state[biases[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model[0].weight]) == {"step", "momentum_buffer"}


def reference_muon_step(p, g, buf, lr, wd, mom):
    """Plain PyTorch: Muon on the (dim0, rest) view of a tensor with more than two dims."""
    buf.lerp_(g, 1 - mom)
    u = g.lerp(buf, mom)
    o = newton_schulz(u, 5, 1e-7, (3.4445, -4.7750, 2.0315), "float32")
    rows, cols = p.shape[0], p[0].numel()
    p.mul_(1 - lr * wd)
    p.add_(o, alpha=-lr * max(1, rows / cols) ** 0.5)


def test_conv_weights_use_the_matrix_view():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    ref = w.detach().clone()
    buf = torch.zeros_like(ref)
    opt = MUON.build("Muon", [w], ns_dtype="float32", lr=0.02)
    for _ in range(10):
        g = torch.randn_like(ref)
        w.grad = g.clone()
        opt.step()
        reference_muon_step(ref, g, buf, 0.02, 0.1, 0.95)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-6)


def test_newton_schulz_on_a_vector_names_the_shape_and_the_line():
    spec = ("optimizer OnlyMuon(lr = 0.02) {\n    param W\n"
            "    W -= lr * newton_schulz(grad(W))\n}\n")
    p = torch.nn.Parameter(torch.ones(5))
    opt = nestc.loads(spec, "only.nest").build("OnlyMuon", [p])
    p.grad = torch.ones(5)
    with pytest.raises(ValueError) as info:
        opt.step()
    assert str(info.value).startswith("only.nest:3:5: error: newton_schulz needs a matrix, but a "
                                      "parameter of shape (5,) reached it")


def test_state_dict_round_trip():
    whole = make(bias=True)
    train(whole, MUON.build("Muon", whole.parameters()), 20)
    first = make(bias=True)
    opt = MUON.build("Muon", first.parameters())
    train(first, opt, 10)
    saved = opt.state_dict()
    resumed = make(seed=3, bias=True)
    resumed.load_state_dict(first.state_dict())
    opt2 = MUON.build("Muon", resumed.parameters())
    opt2.load_state_dict(saved)
    for i in range(10, 20):
        x, y = batch(i)
        opt2.zero_grad()
        torch.nn.functional.mse_loss(resumed(x), y).backward()
        opt2.step()
    assert max_diff(whole, resumed) == 0.0
