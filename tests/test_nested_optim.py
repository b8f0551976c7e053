"""The paper's proposed optimizers (std/optim/nested.nest) against plain-PyTorch references."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import nestc  # noqa: E402
from nestc.ops.newton_schulz import newton_schulz  # noqa: E402

NESTED = nestc.load("std/optim/nested.nest")


def run(name, reference, steps=6, **hyper):
    """Step the compiled optimizer and reference(W, G, state) side by side on two shapes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    refs = [(p.detach().clone(), {}) for p in params]
    opt = NESTED.build(name, params, **hyper)
    for _ in range(steps):
        grads = [torch.randn_like(p) * 0.5 for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        refs = [reference(W, g, st) for (W, st), g in zip(refs, grads)]
        for p, (W, _) in zip(params, refs):
            torch.testing.assert_close(p.detach(), W, rtol=1e-5, atol=1e-6)


def test_preconditioned_momentum():
    lr, mom, b2, eps = 1e-2, 0.9, 0.99, 1e-8

    def ref(W, g, st):
        v = b2 * st.get("v", torch.zeros_like(W)) + (1 - b2) * g * g
        m = mom * st.get("m", torch.zeros_like(W)) - lr * g / (v.sqrt() + eps)
        return W + m, {"v": v, "m": m}

    run("PreconditionedMomentum", ref, lr=lr, momentum=mom, beta2=b2, eps=eps)


def test_delta_momentum():
    lr, alpha = 5e-2, 0.9

    def ref(W, g, st):
        m = st.get("m", torch.zeros_like(W))
        if W.ndim == 2:  # m (alpha I - G^T G) - lr G
            m = m @ (alpha * torch.eye(W.shape[1]) - g.T @ g) - lr * g
        else:
            m = alpha * m - lr * g
        return W + m, {"m": m}

    run("DeltaMomentum", ref, lr=lr, alpha=alpha)


@pytest.mark.parametrize("output", ["newton_schulz", "sign", "identity"])
def test_nonlinear_momentum(output):
    lr, mom = 2e-2, 0.9

    def ref(W, g, st):
        m = mom * st.get("m", torch.zeros_like(W)) + (1 - mom) * g
        if output == "newton_schulz" and W.ndim >= 2:
            step = newton_schulz(m, 5, 1e-7, (3.4445, -4.7750, 2.0315), "float32")
        elif output == "sign":
            step = m.sign()
        else:
            step = m
        return W - lr * step, {"m": m}

    run("NonlinearMomentum", ref, lr=lr, momentum=mom, output=output, ns_dtype="float32")


def test_matrix_rule_on_a_vector_names_the_shape_and_the_line():
    spec = ("optimizer Bad(lr = 0.1) {\n    param W\n"
            "    memory m = zeros_like(W) every step { m = m @ transpose(grad(W)) }\n"
            "    W -= lr * m\n}\n")
    p = torch.nn.Parameter(torch.ones(3))
    opt = nestc.loads(spec, "bad.nest").build("Bad", [p])
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"^bad\.nest:3:\d+: error: `transpose` needs a matrix, "
                                         r"but a parameter of shape \(3,\) reached it"):
        opt.step()
