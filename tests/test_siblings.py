"""MLP memories that run as one (nestc.memories._Siblings): self-modifying Titans' projection
memories stacked head-wise into one chunked computation. Each memory must compute, keep and
get as gradient exactly what it does alone (siblings cleared), None where alone it gets None."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from conftest import spec  # noqa: E402

import nestc  # noqa: E402
from nestc.memories import MLPMemory, run_each_alone  # noqa: E402

SMT = nestc.load("std/memory/self_modifying_titans.nest")
HOPE = nestc.load("std/models/hope.nest")


def alone(module):
    """A copy of module whose memories each run alone."""
    return run_each_alone(copy.deepcopy(module))


def groups(module):
    """The names of the memories of each group that runs as one, sorted."""
    found = {}
    for path, m in module.named_modules():
        if isinstance(m, MLPMemory) and m.siblings is not None:
            found.setdefault(id(m.siblings[0]), []).append(path)
    return sorted(sorted(g) for g in found.values())


def leaves(state):
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in leaves(state[key])]
    if isinstance(state, (tuple, list)):
        return [t for item in state for t in leaves(item)]
    return [state] if isinstance(state, torch.Tensor) else []


def same(a, b, tol=1e-6):
    err = (a - b).abs().max().item()
    assert err <= tol * max(a.abs().max().item(), 1.0), err


def same_run(a, b, run):
    """run(module) -> (outputs, a loss): equal outputs, and equal gradients, None alike."""
    outs_a, loss_a = run(a)
    outs_b, loss_b = run(b)
    for x, y in zip(outs_a, outs_b, strict=True):
        same(x, y)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            same(p.grad, q.grad)


def outputs_as_one_equal_alone(mod, T, dim):
    x = torch.randn(2, T, dim)
    same_run(mod, alone(mod), lambda m: ([m(x)], m(x).pow(2).sum()))


def test_self_modifying_titans_runs_its_four_projection_memories_as_one():
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2)
    assert groups(smt) == [["M_alpha", "M_eta", "M_k", "M_v"]]
    assert groups(SMT.build("SelfModifyingTitans", dim=16, heads=2, paper_memory=True)) == \
        [["M_alpha", "M_eta", "M_k", "M_v"]]  # M_memory reads q, and learns from k and v
    assert groups(SMT.build("SelfModifyingTitans", dim=16, heads=2,
                            backend="reference")) == []  # the definition: one by one
    hope = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    assert len(groups(hope)) == 2


@pytest.mark.parametrize("paper", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_siblings_compute_what_each_computes_alone(paper, beta):
    # pieces that start inside chunks (chunks of 4 and 8), momentum or not; with the paper's
    # main memory M_v reaches the output only under stop_grad: alone its weights get no
    # gradient (None) from a loss of the outputs, and so run as one (the final states are in
    # the loss without it)
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4, memory_chunk=8,
                    momentum_beta=beta, paper_memory=paper)
    x = torch.randn(2, 19, 16)

    def run(mod):
        state, ys, finals = None, [], []
        for a, b in [(0, 3), (3, 10), (10, 19)]:
            y, state = mod(x[:, a:b], state=state, return_state=True)
            ys.append(y)
        finals = leaves(state)
        loss = sum((y * torch.linspace(-1, 1, 16)).sum() for y in ys)
        if not paper:
            loss = loss + sum(t.pow(2).sum() for t in finals if t.requires_grad)
        return [*ys, *finals], loss

    same_run(smt, alone(smt), run)
    if paper:
        assert smt.M_v.A.grad is None and smt.M_k.A.grad is not None


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_projection_memories_learn_without_computing_a_read(backend):
    """Nothing reads the projection memories after their writes (only above, at chunk
    starts): they run for their states alone (MLPMemory.settle, as one on the chunked tier),
    which equal, with their gradients, those a read of their keys leaves (what ran before)."""
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4, memory_chunk=8,
                    momentum_beta=0.5, backend=backend)
    source = SMT.source("SelfModifyingTitans", dim=16)
    for name in ("M_k", "M_v", "M_eta", "M_alpha"):
        assert f"self.{name}.settle(_env)" in source and f"self.{name}.read(" not in source
    reading = copy.deepcopy(smt)
    for m in reading.modules():
        if isinstance(m, MLPMemory):
            def settle(env, m=m):
                k = env[m.env_key]["k"]
                m.read(k.flatten(2), env)
            m.settle = settle
    x = torch.randn(2, 11, 16)

    def run(mod):
        y, state = mod(x, return_state=True)
        return [y, *leaves(state)], y.pow(2).sum() + sum(t.pow(2).sum() for t in leaves(state))

    same_run(smt, reading, run)


def test_hope_lm_runs_as_one_through_the_cms_levels_second_order():
    # the CMS levels' gradients are differentiated by the outer level: a second backward
    # through the stacked memories
    torch.manual_seed(0)
    model = HOPE.build("HopeLM", vocab=20, dim=16, depth=2, heads=2, chunks=[4, 8])
    x = torch.randint(0, 20, (2, 11))

    def run(mod):
        logits = mod(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 x[:, 1:].flatten())
        return [logits], loss

    same_run(model, alone(model), run)


def test_a_copy_runs_as_one_with_its_own_weights():
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4)
    twin = copy.deepcopy(smt)
    with torch.no_grad():
        twin.M_v.A.add_(1.0)
    x = torch.randn(1, 9, 16)
    fresh = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4)
    fresh.load_state_dict(twin.state_dict())
    same(twin(x), fresh(x))
    assert (twin(x) - smt(x)).abs().max() > 1e-3


BODY = """
    block B(dim) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = 2)
        let v = x |> linear(dim)
        memory M1 : mlp(dim / 2) per head = meta every token in chunks of 4 {
            key k; value v; objective l2(M1(k), v); rule gd(lr = 0.5)
        }
        memory M2 : mlp(dim / 2) per head = meta every token in chunks of CHUNK {
            key k; value 2 * v; objective l2(M2(k), 2 * v); rule gd(lr = 0.25)
        }
        READS
    }
"""


@pytest.mark.parametrize("reads,chunk,grouped", [
    ("output M1(x) + M2(x)", 4, True),
    ("let y = M1(x)\n output y + M2(x)", 4, True),
    ("output M1(x) + M2(x)", 8, False),                      # another chunk
    ("output M1(x) + M2(x + 1)", 4, False),                   # another query
    ("output M1(x) + M2(x) + M1(v)", 4, False),               # M1 read twice
    ("let y = x |> linear(dim)\n output M1(y) + M2(y)", 4, True),
])
def test_which_memories_run_as_one(reads, chunk, grouped):
    prog = nestc.loads(spec(BODY.replace("READS", reads).replace("CHUNK", str(chunk))),
                       "b.nest")
    torch.manual_seed(0)
    mod = prog.build("B", dim=8)
    assert groups(mod) == ([["M1", "M2"]] if grouped else [])
    outputs_as_one_equal_alone(mod, 7, 8)


def test_a_memory_read_before_its_sibling_is_written_runs_alone():
    prog = nestc.loads(spec("""
        block B(dim) {
            input x : [T, dim]
            let k = x |> linear(dim)
            memory M1 : mlp(dim) = meta every token { key k; value x; objective l2(M1(k), x); rule gd(lr = 0.5) }
            let y = M1(x)
            memory M2 : mlp(dim) = meta every token { key k; value x; objective l2(M2(k), x); rule gd(lr = 0.5) }
            output y + M2(x)
        }
    """), "b.nest")
    assert groups(prog.build("B", dim=8)) == []


def test_states_from_different_points_of_a_sequence_run_one_by_one():
    # a state put together by hand, M_v 5 tokens into a sequence and the others 3: the
    # memories cannot share chunk boundaries, so each runs alone
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        _, state = smt(x[:, :3], return_state=True)
        _, later = smt(x[:, :5], return_state=True)
    state = {**state, "M_v": later["M_v"]}
    assert state["M_v"]["offset"] != state["M_k"]["offset"]
    twin = alone(smt)
    same_run(smt, twin, lambda m: ([m(x[:, 3:], state=state)],
                                   m(x[:, 3:], state=state).pow(2).sum()))


def test_torch_compile_traces_each_memory_alone_in_one_graph():
    # _Split's note to _Stack is a side effect dynamo does not trace: compiled, the memories
    # run alone, without a graph break, and compute what eager computes, gradients included
    # (the backward failed in torch 2.13 while softplus was F.softplus: nestc.layers.softplus)
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4)
    x = torch.randn(2, 9, 16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(smt)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = copy.deepcopy(smt)

    def run(m):
        y = torch.compile(m, backend="aot_eager")(x) if m is compiled else m(x)
        return [y], y.pow(2).sum()

    same_run(compiled, smt, run)


def test_softplus_is_torchs():
    from nestc.layers import softplus

    x = torch.cat([torch.linspace(-60, 60, 2001), torch.tensor([float("nan"), float("inf"),
                                                                 -float("inf")])])
    for beta in (1.0, 2.0, 0.5):
        ours, ref = softplus(x, beta), torch.nn.functional.softplus(x, beta=beta)
        assert torch.equal(ours.isnan(), ref.isnan())
        fin = ref.isfinite()
        assert torch.equal(ours[~fin & ~ref.isnan()], ref[~fin & ~ref.isnan()])
        assert ((ours[fin] - ref[fin]).abs() <= 1e-6 * ref[fin].abs().clamp_min(1e-30)).all()


def test_the_benchmark_counts_fewer_operations_as_one():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "siblings.py"), "--quick"],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert run.returncode == 0, run.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| what", "| ---"))]
    assert [r[1] for r in rows] == ["as one", "alone"] * 2, run.stdout
    for fused, single in (rows[0:2], rows[2:4]):
        assert int(fused[2].replace(",", "")) < int(single[2].replace(",", "")), run.stdout


SELF_BODY = """
    block B(dim) {
        input x : [T, dim]
        let k = x |> linear(dim) |> l2norm(per = 2)
        let v = x |> linear(dim)
        let g = x |> linear(1) |> sigmoid
        memory M1 : residual_mlp(dim / 2) per head = meta every token in chunks of 4 {
            let target = VALUE1
            key k; value target; objective l2(M1(k), target); rule gd(lr = 0.5)
        }
        memory M2 : residual_mlp(dim / 2) per head = meta every token in chunks of 4 {
            let target = VALUE2
            key k; value target; objective l2(M2(k), target); rule gd(lr = 0.25)
        }
        output M1(x) + M2(x)
    }
"""


@pytest.mark.parametrize("value1,value2,same_values", [
    ("stop_grad(M1(v))", "stop_grad(M2(v))", True),
    ("g * M1(v) + 0.5 * v", "g * M2(v) + 0.5 * v", True),  # a one-feature tensor, arithmetic
    ("stop_grad(M1(v))", "stop_grad(M2(2 * v))", False),
    ("stop_grad(M1(v))", "stop_grad(M2(k))", False),
])
def test_self_generated_values_run_as_one(value1, value2, same_values):
    # one expression of one tensor: evaluated once for both memories, its tensors tiled;
    # else each memory's at its own heads
    prog = nestc.loads(spec(SELF_BODY.replace("VALUE1", value1).replace("VALUE2", value2)),
                       "b.nest")
    torch.manual_seed(0)
    mod = prog.build("B", dim=8)
    assert groups(mod) == [["M1", "M2"]]
    assert mod.M1.siblings[0].same_values is same_values
    outputs_as_one_equal_alone(mod, 11, 8)


def test_one_feature_values_and_a_query_only_the_states_reach():
    # a memory of one feature and one head: its one-feature value is its whole width, tiled;
    # a loss of the final states alone: the query's projection gets no gradient (None), as
    # when each memory runs alone
    prog = nestc.loads(spec("""
        block B(dim) {
            input x : [T, dim]
            let v = x |> linear(1)
            let q = x |> linear(1)
            memory M1 : residual_mlp(1) = meta every token in chunks of 4 {
                let target = stop_grad(M1(v))
                key v; value target; objective l2(M1(v), target); rule gd(lr = 0.5)
            }
            memory M2 : residual_mlp(1) = meta every token in chunks of 4 {
                let target = stop_grad(M2(v))
                key v; value target; objective l2(M2(v), target); rule gd(lr = 0.25)
            }
            output M1(q) + M2(q)
        }
    """), "b.nest")
    torch.manual_seed(0)
    mod = prog.build("B", dim=4)
    assert groups(mod) == [["M1", "M2"]] and mod.M1.siblings[0].same_values
    x = torch.randn(2, 9, 4)
    same_run(mod, alone(mod), lambda m: ([m(x)], m(x).pow(2).sum()))

    def states_only(m):
        _, state = m(x, return_state=True)
        return leaves(state), sum(t.pow(2).sum() for t in leaves(state) if t.requires_grad)

    mod.zero_grad(set_to_none=True)
    twin = alone(mod)
    same_run(mod, twin, states_only)
    assert mod.q_linear.weight.grad is None


def test_reads_and_states_are_tensors_of_their_own():
    # as when each memory runs alone: contiguous reads, states that take in-place updates
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        _, state = smt(x, return_state=True)
        state["M_v"]["M"][0].mul_(0.5)
        _, again = smt(x, state=state, return_state=True)
    assert all(t.is_contiguous() for t in leaves(again["M_k"]))
    # (nothing reads SMT's projection memories after their writes: a block that does)
    mod = nestc.loads(spec(BODY.replace("READS", "output M1(x) + M2(x)").replace("CHUNK", "4")),
                      "b.nest").build("B", dim=8)
    reads = []
    group = mod.M1.siblings[0]
    run = group._run
    group._run = lambda q, env: reads.extend(run(q, env)) or reads[-2:]
    try:
        mod(x[..., :8])
    finally:
        group._run = run
    assert len(reads) == 2 and all(r.is_contiguous() for r in reads)
    reads[0].mul_(2)  # no error: not a view


def test_bfloat16_inputs_run_as_one():
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4).to(torch.bfloat16)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    same_run(smt, alone(smt), lambda m: ([m(x).float()], m(x).float().pow(2).sum()))


@pytest.mark.parametrize("beta", [0.0, 0.8])
def test_projection_memories_under_the_papers_dgd_run_as_one_as_alone(beta):
    """paper_dgd: the four projection memories learn by `dgd literal` (with momentum when
    momentum_beta > 0), still as one group, each computing what it computes alone (outputs
    and every parameter's gradient)."""
    torch.manual_seed(0)
    smt = SMT.build("SelfModifyingTitans", dim=16, heads=2, chunk=4, memory_chunk=8,
                    paper_dgd=True, momentum_beta=beta)
    assert groups(smt) == [["M_alpha", "M_eta", "M_k", "M_v"]]
    names = ("M_k", "M_v", "M_eta", "M_alpha")
    assert all(smt._modules[n].literal and smt._modules[n].momentum == (beta > 0)
               for n in names)
    outputs_as_one_equal_alone(smt, 11, 16)
