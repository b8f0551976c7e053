"""Generated optimizers follow the interpreter (the semantics' definition) on unusual specs.

Each case is a spec that once broke a back end: names that collide with generated ones,
in-place updates that read their own target, step-dependent numbers, snapshots of W.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import nestc  # noqa: E402
from nestc import interp  # noqa: E402
from nestc.compile import lower  # noqa: E402


def variant_for(opt_ir, hyper, param=None):
    shape = interp.shape_of(param) if param is not None else {}
    env = {"hyper": hyper, "ns": interp.FloatNS, "shape": shape}
    for v in opt_ir.variants:
        if all(bool(interp.evaluate(c, env)) == want for c, want in v.conditions):
            return v
    raise AssertionError("no variant matches")


def follows_interpreter(text: str, name: str, backend: str, steps: int = 6, **hyper):
    prog = nestc.loads(text, "case.nest")
    checked = prog.decl(name)
    values = checked.bind(hyper)
    opt_ir = lower(checked)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    variants = [variant_for(opt_ir, values, p) for p in params]
    opt = prog.build(name, params, backend=backend, **hyper)
    ref = [(p.detach().clone(), {}) for p in params]
    for t in range(1, steps + 1):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (g, (W, st), variant) in enumerate(zip(grads, ref, variants)):
            first = {m.name: m.name not in st for m in variant.memories if m.init == "from"}
            for m in variant.memories:
                if m.init in ("zeros", "ones") and m.name not in st:
                    st[m.name] = torch.zeros_like(W) if m.init == "zeros" else torch.ones_like(W)
            W, st = interp.run(variant, values, W, g, st, t, ns=interp.TorchNS(), first=first,
                               index=i)
            ref[i] = (W, st)
            torch.testing.assert_close(params[i].detach(), W, rtol=1e-5, atol=1e-6)
            for k, v in st.items():
                got = opt.state[params[i]][k]
                # a running sum just emptied is the number 0 in the interpreter
                want = torch.as_tensor(v, dtype=got.dtype).expand_as(got)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return opt


CASES = {
    "abs_weight_decay": ("""
optimizer A(lr = 1e-2, betas = (0.9, 0.999), eps = 1e-8, weight_decay = 0.1) {
    param W
    let g = grad(W) + abs(weight_decay) * W
    memory m = zeros_like(W) every step { objective l2(m, g); rule gd(lr = 1 - betas[0]) }
    memory v = zeros_like(W) every step { objective l2(v, g * g); rule gd(lr = 1 - betas[1]) }
    W -= lr * debias(m, betas[0]) / (sqrt(debias(v, betas[1])) + eps)
}""", {"weight_decay": -0.1}),
    "snapshot_of_W": ("""
optimizer A(lr = 0.1) {
    param W
    let W0 = W
    W -= lr * grad(W)
    W += 0.5 * (W0 - W)
}""", {}),
    "target_read_after_scaling": ("""
optimizer A(lr = 0.1, b = 0.5, s = 0.25) {
    param W
    memory m = ones_like(W) every step { m = b * m + s * m }
    memory n = zeros_like(W) every step { n = n * b + grad(W) * n + grad(W) }
    memory q = zeros_like(W) every step { q = lerp(q, q * grad(W), b) }
    W -= lr * (m + n + q)
}""", {}),
    "colliding_names": ("""
optimizer A(c = 0.9, g = 0.1, t1 = 0.5, steps = 1.0, bufs = 2.0, ps = 0.0, one = 1.0,
            zip = 0.3, len = 0.2, st_m = 0.1, l_x = 0.7) {
    param W
    memory m = zeros_like(W) every step { m = c * m + g * grad(W) }
    let x = debias(m, c) * t1 + steps * bufs * ps + zip * len
    W -= one * st_m * x + l_x * m
}""", {}),
    "numbers_of_hyperparameters": ("""
optimizer A(lr = 0.1, b = -0.5) {
    param W
    W -= lr * abs(b) * sign(b) * sqrt(1 - b) * clamp(grad(W)) * max(b, 0.1)
}""", {}),
    "step_dependent_numbers": ("""
optimizer A(lr = 0.1) {
    param W
    memory m = zeros_like(W) every step { m = (1 - 1 / step()) * m + grad(W) }
    memory n = zeros_like(W) every step { n = 0.5 * n + (1 / step()) * grad(W) }
    memory v = zeros_like(W) every step { v = v - (1 / step()) * (v - grad(W) * grad(W)) }
    W -= lr * (m + n + v) * (step() % 2)
}""", {}),
    "period_as_hyperparameter": ("""
optimizer A(lr = 0.1, k: int = 2) {
    param W
    memory m = zeros_like(W) every k steps { m = m - (1 / step()) * (m - grad(W)) }
    W -= lr * (grad(W) + m)
}""", {}),
    "required_hyperparameter": ("""
optimizer A(lr: float) {
    param W
    W -= lr * grad(W)
}""", {"lr": 0.1}),
    "two_from_memories": ("""
optimizer A(lr = 0.1, b = 0.5) {
    param W
    memory u = from grad(W) every step { u = b * u + grad(W) }
    memory w = from 2 * grad(W) every step { w = b * w - grad(W) }
    W -= lr * (u + w)
}""", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["auto", "generic"])
def test_follows_interpreter(case, backend):
    text, hyper = CASES[case]
    follows_interpreter(text, "A", backend, **hyper)


def test_abs_is_not_taken_for_adam():
    text, _ = CASES["abs_weight_decay"]
    [variant] = lower(nestc.loads(text, "a.nest").decl("A")).variants
    assert variant.kernel is None


@pytest.mark.parametrize(("body", "message"), [
    ("memory m = from grad(W) every 2 steps { m = m + grad(W) }\n    W -= m",
     "`from` with a period other than every step is not supported in an optimizer yet"),
    ("if step() > 2 { W -= grad(W) } else { W -= 2 * grad(W) }",
     "an optimizer's `if` tests hyperparameters and the param's shape only"),
    ("W -= grad(W) % 2", "`%` on tensors is not supported in an optimizer yet"),
    ("memory step = zeros_like(W) every step { step = grad(W) }\n    W -= step",
     "a memory cannot be called `step`: the step count is kept under that name"),
    ("memory A = zeros_like(W) every step { read before write; A = A + W }\n    W -= A",
     "memory `A` reads before write, so it is written at the end of the step, but the param "
     "changes before then"),
    ("memory M = zeros_like(W) every (rows(W)) steps { M = M + grad(W) }\n    W -= M",
     "the period of a memory is a number or a hyperparameter"),
    ("W -= newton_schulz(lr) * grad(W)", "`newton_schulz` takes a matrix"),
    ("W -= newton_schulz(grad(W), dtype = \"float8\")",
     "`dtype` of `newton_schulz` is one of bfloat16, float32, float64, float16, got 'float8'"),
    ("memory M = zeros_like(W) every 2 steps { M = M + sum(grad(W)) }\n"
     "    memory M_sum = zeros_like(W) every step { M_sum = grad(W) }\n    W -= M + M_sum",
     "`M_sum` is taken: a memory of that name is already kept (a running sum `<memory>_sum` "
     "included)"),
    ("let s = step()\n    if s > 3 { W -= grad(W) } else { W -= 2 * grad(W) }",
     "an optimizer's `if` tests hyperparameters and the param's shape only"),
])
def test_unsupported_forms_are_nest_errors(body, message):
    with pytest.raises(nestc.NestError) as info:
        nestc.loads(f"optimizer A(lr = 0.1) {{\n    param W\n    {body}\n}}\n",
                    "a.nest").source("A")
    assert info.value.message == message


def test_backend_is_a_reserved_hyperparameter():
    with pytest.raises(nestc.NestError, match="`backend` is reserved"):
        nestc.loads("optimizer A(backend = 1.0) {\n    param W\n    W -= grad(W)\n}\n", "a.nest")


def test_snapshot_of_W_is_plain_sgd_at_half_the_rate():
    text, _ = CASES["snapshot_of_W"]
    [variant] = lower(nestc.loads(text, "a.nest").decl("A")).variants
    assert variant.kernel is not None and variant.kernel.kernel == "sgd"
    lr = variant.kernel.arg("lr")
    assert interp.evaluate(lr, {"hyper": {"lr": 0.1}, "ns": interp.FloatNS}) == pytest.approx(0.05)


def test_fused_backend_refuses_variants_without_a_kernel():
    text, _ = CASES["target_read_after_scaling"]
    p = torch.nn.Parameter(torch.ones(2))
    opt = nestc.loads(text, "a.nest").build("A", [p], backend="fused")
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="no fused kernel computes this variant"):
        opt.step()


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile needs g++")
@pytest.mark.parametrize("case", ["snapshot_of_W", "colliding_names", "two_from_memories"])
def test_compiled_follows_interpreter(case):
    text, hyper = CASES[case]
    follows_interpreter(text, "A", "compiled", steps=3, **hyper)


NEW_CASES = {
    "number_let_as_condition": ("""
optimizer A(lr = 0.1) {
    param W
    let big = numel(W) > 3
    if big { W -= lr * grad(W) } else { W -= 2 * lr * grad(W) }
}""", {}),
    "number_let_in_newton_schulz": ("""
optimizer A(lr = 0.1) {
    param W
    let n = ndim(W) + 3
    if ndim(W) == 2 { W -= lr * newton_schulz(grad(W), steps = 5, dtype = "float32") }
    else { W -= lr * n * grad(W) }
}""", {}),
    "hoisted_reads_a_number_let": ("""
optimizer A(lr = 0.1) {
    param W
    let s = 2 * lr
    memory M = zeros_like(W) every 2 steps { M = M + grad(W) }
    if ndim(W) == 2 { W -= s * newton_schulz(M, dtype = "float32") } else { W -= s * M }
}""", {}),
    "late_copy_of_W": ("""
optimizer A(lr = 0.5) {
    param W
    let W0 = W
    memory A = zeros_like(W) every step { read before write; A = A + grad(W) + W0 }
    W -= lr * (A + grad(W))
}""", {}),
}


@pytest.mark.parametrize("case", sorted(NEW_CASES))
@pytest.mark.parametrize("backend", ["auto", "generic"])
def test_follows_interpreter_on_reviewed_cases(case, backend):
    text, hyper = NEW_CASES[case]
    follows_interpreter(text, "A", backend, **hyper)


# MLP memories (deep momentum): the interpreter takes their gradients with autograd, the
# generated code with the hand-derived forms of nestc/ops/residual_mlp.py
MLP_CASES = {
    "mlp_l2_every_2_steps": ("""
optimizer A(lr = 0.1, h: int = 3, act: str = "tanh") {
    param W
    memory m : residual_mlp(cols(W), hidden = h, act = act) = identity(seed = 5) every 2 steps {
        objective l2(m(grad(W)), 0.5 * W)
        rule gd(lr = 0.3, retain = 0.9)
    }
    W -= lr * m(grad(W))
}""", {}),
    "mlp_read_before_write_of_a_chunk_sum": ("""
optimizer A(lr = 0.1, k: int = 2) {
    param W
    let g = grad(W)
    memory m : residual_mlp(cols(W), hidden = cols(W) + 1, act = "gelu") every k steps {
        read before write
        key sum(g); value g
        objective dot(m(sum(g)), g)
        rule gd(lr = 0.2 / step(), retain = 0.5)
    }
    W -= lr * (m(g) + g)
}""", {"k": 3}),
    "two_mlp_memories_and_a_state": ("""
optimizer A(lr = 0.1, b = 0.5) {
    param W
    memory u = zeros_like(W) every step { u = b * u + grad(W) }
    memory p : residual_mlp(cols(W), hidden = 2, act = "relu") = identity(seed = 1) {
        objective l2(p(u), grad(W)); rule gd(lr = 0.5)
    }
    memory q : residual_mlp(cols(W), hidden = 4, act = "sigmoid") = identity(seed = 2) {
        objective dot(q(p(u)), u); rule gd(lr = 0.1, retain = b)
    }
    W -= lr * q(p(u))
}""", {}),
}


@pytest.mark.parametrize("case", sorted(MLP_CASES))
@pytest.mark.parametrize("backend", ["auto", "generic"])
def test_mlp_memories_follow_interpreter(case, backend):
    """States included: the interpreter's `m.W1` and `m.W2` are compared with opt.state's."""
    text, hyper = MLP_CASES[case]
    follows_interpreter(text, "A", backend, steps=7, **hyper)


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile needs g++")
@pytest.mark.parametrize("case", ["mlp_l2_every_2_steps", "mlp_read_before_write_of_a_chunk_sum"])
def test_compiled_mlp_memories_follow_interpreter(case):
    text, hyper = MLP_CASES[case]
    follows_interpreter(text, "A", "compiled", steps=4, **hyper)


def test_hoisting_keeps_hyperparameters_live():
    """lr outside the hoisted NS(M): a scheduler's lr = 0 stops W at once."""
    spec = ("optimizer A(lr = 0.1) {\n    param W\n"
            "    memory M = zeros_like(W) every 3 steps { M = M + grad(W) }\n"
            "    W -= lr * newton_schulz(M, dtype = \"float32\")\n}\n")
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = nestc.loads(spec, "h.nest").build("A", [p])
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(p.detach(), before)



def test_check_reports_spec_mistakes_the_lowering_finds_but_not_its_limits():
    bad = "optimizer A(lr = 0.1) {\n    param W\n    if step() > 2 { W -= grad(W) }\n}\n"
    with pytest.raises(nestc.NestError, match="tests hyperparameters and the param's shape"):
        nestc.loads(bad, "bad.nest")
    # an optimizer as a memory's rule is valid nest; compiling it is not supported yet
    deep = ('from "std/optim/sgd.nest" import SGD\n'
            "optimizer B(lr = 0.1) {\n    param W\n"
            "    memory m = zeros_like(W) every step { objective l2(m, grad(W)); rule SGD(lr = 0.1) }\n"
            "    W -= lr * m\n}\n")
    prog = nestc.loads(deep, "deep.nest")
    with pytest.raises(nestc.NestError, match="is not supported in an optimizer yet"):
        prog.source("B")


def test_a_period_of_zero_is_a_clear_error():
    text, _ = CASES["period_as_hyperparameter"]
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(nestc.NestError, match=r"^a\.nest:4:36: error: the update period must "
                                              r"be a positive whole number, got 0"):
        nestc.loads(text, "a.nest").build("A", [p], k=0)  # (at build, no longer at the step)
