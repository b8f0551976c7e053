"""The paper's proposed optimizers (std/optim/nested.nest) against plain-PyTorch references."""

from __future__ import annotations

import copy

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


# --- DeepMomentum: an MLP memory inside the optimizer ---------------------------------------------

DM = dict(lr=5e-2, eta=2e-2, alpha=0.8, hidden=4, momentum=0.9, seed=3)
DM_SHAPES = [(8, 5), (4, 3, 2), (7,)]  # cols 5 and 6 for the MLPs, a vector for momentum


def deep_momentum_step(W, G, st, index, lr, eta, alpha, hidden, momentum, seed):
    """DeepMomentum in plain PyTorch, from the spec's comments: (new W, state in place)."""
    if W.ndim < 2:
        st["b"] = momentum * st.get("b", torch.zeros_like(W)) + G
        return W - lr * st["b"]
    d = W[0].numel()
    if "W1" not in st:  # m(x) = x at first; W2 ~ N(0, 1/d) drawn in float32 on the CPU
        gen = torch.Generator().manual_seed(seed + index)
        st["W2"] = (torch.randn(hidden, d, generator=gen) / d ** 0.5).to(W.dtype)
        st["W1"] = torch.zeros(d, hidden, dtype=W.dtype)

    def m(x, w1, w2):  # on the rows of the (rows, cols) view
        return x + torch.nn.functional.silu(x @ w2.T) @ w1.T

    X = G.reshape(W.shape[0], d)
    w1 = st["W1"].clone().requires_grad_()
    w2 = st["W2"].clone().requires_grad_()
    g1, g2 = torch.autograd.grad(-(m(X, w1, w2) * X).sum(), (w1, w2))  # dot(m(g), g)
    st["W1"] = alpha * st["W1"] - eta * g1
    st["W2"] = alpha * st["W2"] - eta * g2
    return W - lr * m(X, st["W1"], st["W2"]).reshape(W.shape)  # read after write


def dm_params(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in DM_SHAPES]


def dm_grads(params, steps):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            for _ in range(steps)]


def dm_run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("backend", [
    "generic", "auto",
    pytest.param("compiled", marks=[pytest.mark.slow, pytest.mark.skipif(
        __import__("shutil").which("g++") is None, reason="torch.compile needs g++")])])
def test_deep_momentum_matches_plain_pytorch(backend, dtype, tol):
    params = dm_params(dtype)
    refs = [(p.detach().clone(), {}) for p in params]
    opt = NESTED.build("DeepMomentum", params, backend=backend, **DM)
    for step in dm_grads(params, 10):
        dm_run(opt, params, [step])
        refs = [(deep_momentum_step(W, g, st, i, **DM), st)
                for i, ((W, st), g) in enumerate(zip(refs, step))]
        for p, (W, st) in zip(params, refs):
            torch.testing.assert_close(p.detach(), W, rtol=tol, atol=tol)
            for key, want in st.items():
                got = opt.state[p]["m." + key if key != "b" else key]
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # the MLP did learn: m is no longer the identity
    assert all(opt.state[p]["m.W1"].abs().max() > 1e-2 for p in params[:2])
    assert sorted(opt.state[params[0]]) == ["m.W1", "m.W2", "step"]
    assert opt.state[params[1]]["m.W2"].shape == (4, 6)


def test_deep_momentum_state_dict_round_trip():
    grads = dm_grads(dm_params(torch.float32), 8)
    ref = dm_params(torch.float32)
    ref_opt = NESTED.build("DeepMomentum", ref, **DM)
    dm_run(ref_opt, ref, grads)

    first = dm_params(torch.float32)
    opt = NESTED.build("DeepMomentum", first, **DM)
    dm_run(opt, first, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    assert {"m.W1", "m.W2", "step"} == set(saved["state"][0])
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = NESTED.build("DeepMomentum", resumed, **DM)
    opt2.load_state_dict(saved)
    dm_run(opt2, resumed, grads[4:])
    for p, q in zip(ref, resumed):
        assert torch.equal(p, q)


def test_deep_momentum_trains_a_regression():
    torch.manual_seed(0)
    X = torch.randn(64, 8)
    Y = X @ torch.randn(8, 2) + 0.1 * torch.randn(64, 2)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = NESTED.build("DeepMomentum", net.parameters(), lr=5e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(net(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_deep_momentum_runs_no_fused_kernel():
    from nestc.codegen.triton import fusable
    from nestc.compile import lower

    matrix, vector = lower(NESTED.decl("DeepMomentum")).variants
    assert matrix.kernel is None and not fusable(matrix)
    assert [m.keys for m in matrix.memories] == [("m.W1", "m.W2")]
    assert fusable(vector)


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("act", ["silu", "relu", "tanh", "sigmoid", "gelu"])
def test_hand_derived_mlp_gradients_equal_autograd(act, objective):
    """nestc/ops/residual_mlp.py (generated code) against the interpreter's autograd step."""
    from nestc import interp
    from nestc.ops.residual_mlp import learn

    gen = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((6, 4), (4, 6)))
    key, target = (torch.randn(5, 3, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    got = learn(w1, w2, key, target, 0.3, 0.9, objective, act)
    want = interp.mlp_learn(w1, w2, key, target, 0.3, 0.9, objective, act)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


MLP_SPEC = """optimizer Bad(lr = 0.1) {{
    param W
    let g = grad(W)
    memory m : {structure} = {init} every step {{
        {body}
    }}
    W -= lr * {read}
}}
"""
GOOD = dict(structure="residual_mlp(cols(W), hidden = 4)", init="identity",
            body="key g; value g; objective dot(m(g), g); rule gd(lr = 0.1)", read="m(g)")


@pytest.mark.parametrize(("change", "report"), [
    ({"body": "key transpose(g); value g; objective dot(m(g), g); rule gd(lr = 0.1)"},
     "bad.nest:5:13: error: an MLP memory in an optimizer reads the rows of `W`'s matrix view: "
     "its key is shaped like `W`\n"
     "   5 |         key transpose(g); value g; objective dot(m(g), g); rule gd(lr = 0.1)\n"
     "     |             ^~~~~~~~~~~~\n"
     "  hint: such as `grad(W)` or an element-wise expression of it"),
    ({"body": "objective l2(m(lr), g); rule gd(lr = 0.1)"},
     "bad.nest:5:24: error: an MLP memory in an optimizer reads the rows of `W`'s matrix view: "
     "what it is applied to is shaped like `W`\n"
     "   5 |         objective l2(m(lr), g); rule gd(lr = 0.1)\n"
     "     |                        ^~\n"
     "  hint: such as `grad(W)` or an element-wise expression of it"),
    ({"body": "key g * g; objective dot(m(g), g); rule gd(lr = 0.1)"},
     "bad.nest:5:36: error: the objective of `m` reads `g` where its key is `g * g`\n"
     "   5 |         key g * g; objective dot(m(g), g); rule gd(lr = 0.1)\n"
     "     |                                    ^\n"
     "  hint: write `dot(m(key), value)` with the key and value it names"),
    ({"structure": "residual_mlp(rows(W), hidden = 4)"},
     "bad.nest:4:29: error: an MLP memory in an optimizer reads the rows of `W`'s matrix view: "
     "its dim is `cols(W)`\n"
     "   4 |     memory m : residual_mlp(rows(W), hidden = 4) = identity every step {\n"
     "     |                             ^~~~~~~\n"
     "  hint: write `residual_mlp(cols(W), hidden = ...)`"),
    ({"init": "zeros"},
     "bad.nest:4:52: error: an MLP memory starts as `identity`: W1 = 0, so that m(x) = x, and "
     "W2 random, so that its gradients are not zero\n"
     "   4 |     memory m : residual_mlp(cols(W), hidden = 4) = zeros every step {\n"
     "     |                                                    ^~~~~\n"
     "  hint: write `= identity` or `= identity(seed = k)`"),
    ({"body": "m = m"},
     "bad.nest:5:9: error: MLP memory `m` learns by its objective and rule; it has no explicit "
     "update\n"
     "   5 |         m = m\n"
     "     |         ^~~~~\n"
     "  hint: such as `objective l2(m(grad(W)), grad(W)); rule gd(lr = 0.1)`"),
    ({"read": "m"},
     "bad.nest:7:15: error: `m` is an MLP memory: read it by applying it, `m(x)`\n"
     "   7 |     W -= lr * m\n"
     "     |               ^"),
])
def test_mlp_memory_errors(change, report):
    with pytest.raises(nestc.NestError) as info:
        nestc.loads(MLP_SPEC.format(**{**GOOD, **change}), "bad.nest")
    assert str(info.value) == report


@pytest.mark.parametrize(("change", "message"), [
    ({"body": "objective huber(m(g), g); rule gd(lr = 0.1)"},
     "an MLP memory's objective other than l2 and dot is not supported in an optimizer yet"),
    ({"body": "objective l2(m(g), g); rule dgd(lr = 0.1, retain = 0.9)"},
     "the rule `dgd` (in an optimizer's memory) is not supported in an optimizer yet"),
    ({"body": "query g; objective l2(m(g), g); rule gd(lr = 0.1)"},
     "the `query` clause is not supported in an optimizer yet"),
])
def test_mlp_memory_limits_are_reported_by_compile(change, message):
    prog = nestc.loads(MLP_SPEC.format(**{**GOOD, **change}), "bad.nest")  # valid nest
    with pytest.raises(nestc.NestError) as info:
        prog.source("Bad")
    assert info.value.message == message
