"""Softmax attention over a `cache` memory with a window (sliding-window attention): against
an explicit softmax per query, on both tiers, streamed in pieces (the cache then keeps only
the keys a later call needs), and its errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import run_benchmark, spec  # noqa: E402

import nestc  # noqa: E402
from nestc.explain import explain  # noqa: E402
from nestc.memories import causal_attention  # noqa: E402

SPEC = spec("""
    block A(dim, heads = 2, window = 5, rope = true) {
        input x : [T, dim]
        let q = x |> linear(dim)
        let k = x |> linear(dim)
        memory C : cache every token { key k; value x }
        output softmax_attention(q, C, heads = heads, window = window, rope = rope)
    }
""")
PROG = nestc.loads(SPEC, "a.nest")


def naive(q, k, v, window):
    """Each query (the last T of L positions) over the keys of its window, one at a time."""
    T, L = q.shape[2], k.shape[2]
    out = []
    for i in range(T):
        p = L - T + i
        lo = 0 if window is None else max(0, p - window + 1)
        s = q[:, :, i:i + 1] @ k[:, :, lo:p + 1].transpose(-1, -2) / q.shape[-1] ** 0.5
        out.append(s.softmax(-1) @ v[:, :, lo:p + 1])
    return torch.cat(out, 2)


@pytest.mark.parametrize("window", [1, 3, 8, 40, None])
@pytest.mark.parametrize("T,L", [(13, 13), (7, 20), (30, 30)])
@pytest.mark.parametrize("blocked", [False, True])
def test_causal_attention_equals_a_softmax_per_query(window, T, L, blocked):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, T, 4), torch.randn(2, 3, L, 4), torch.randn(2, 3, L, 4)
    # blocks of 4 queries (at least the window): several blocks, each over its keys only
    got = causal_attention(q, k, v, window, blocked=blocked, block=4)
    torch.testing.assert_close(got, naive(q, k, v, window), rtol=1e-5, atol=1e-6)


def pair(**hyper):
    torch.manual_seed(0)
    ref = PROG.build("A", backend="reference", **hyper)
    fast = PROG.build("A", backend="chunked", **hyper)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_windowed_attention_in_a_block_equals_the_definition_on_both_tiers():
    ref, fast = pair(dim=8, window=5, rope=False)
    x = torch.randn(2, 300, 8, requires_grad=True)  # T > 256: the chunked tier runs blocks
    heads = lambda t: t.view(2, 300, 2, 4).transpose(1, 2)  # noqa: E731
    want = naive(heads(ref.q_linear(x)), heads(ref.k_linear(x)), heads(x), 5)
    want = want.transpose(1, 2).reshape(2, 300, 8)
    a, b = ref(x), fast(x)
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a.pow(2).sum(), [x, *ref.parameters()])
    gb = torch.autograd.grad(b.pow(2).sum(), [x, *fast.parameters()])
    for u, w in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, w, rtol=1e-4, atol=1e-6)


def test_rotary_positions_of_a_float64_block_are_float64():
    """The angles were float32 whatever the module's dtype: a float64 block was 2e-8 off a
    float64 definition at T = 2000."""
    from nestc.memories import rotary

    x = torch.randn(1, 2, 2000, 8, dtype=torch.float64)
    pos = torch.arange(3, 2003, dtype=torch.float64)[:, None] * \
        10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    a, b = x[..., :4], x[..., 4:]
    want = torch.cat([a * pos.cos() - b * pos.sin(), a * pos.sin() + b * pos.cos()], -1)
    assert (rotary(x, 3) - want).abs().max() < 1e-12
    assert rotary(x.float(), 3).dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_windowed_attention_streams_keeping_only_the_last_keys(backend):
    torch.manual_seed(0)
    mod = PROG.build("A", backend=backend, dim=8, window=5)  # rotary positions as well
    x = torch.randn(2, 23, 8)
    whole, final = mod(x, return_state=True)
    state, pieces = None, []
    for a, b in [(0, 2), (2, 3), (3, 17), (17, 23)]:
        y, state = mod(x[:, a:b], state=state, return_state=True)
        pieces.append(y)
        keys, values, seen = state["C"]
        assert keys.shape == values.shape == (2, min(4, b), 8) and seen == b
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-6)
    for u, w in zip(final["C"][:2], state["C"][:2], strict=True):
        torch.testing.assert_close(u, w)
    # a window wider than the stream is full causal attention
    wide = PROG.build("A", backend=backend, dim=8, window=100)
    full = nestc.loads(SPEC.replace(", window = window", ""), "a.nest").build(
        "A", backend=backend, dim=8)
    full.load_state_dict(wide.state_dict())
    torch.testing.assert_close(wide(x), full(x), rtol=1e-5, atol=1e-6)


def test_a_cache_read_with_and_without_a_window_keeps_every_key():
    prog = nestc.loads(spec("""
        block B(dim) {
            input x : [T, dim]
            memory C : cache every token { key x; value x }
            output softmax_attention(x, C, window = 3) + softmax_attention(x, C)
        }
    """), "b.nest")
    mod = prog.build("B", dim=4)
    _, state = mod(torch.randn(1, 9, 4), return_state=True)
    assert len(state["C"]) == 2 and state["C"][0].shape == (1, 9, 4)
    text = explain(prog, "B", dim=4).replace("\n      ", " ")
    assert "over every token so far and over the last 3 tokens\n" in text
    assert "keeps the last" not in text
    windowed = explain(PROG, "A", dim=8, window=5)
    assert "keeps the last 4 keys for the next call" in windowed.replace("\n      ", " ")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_reads_of_one_cache_in_their_own_heads_and_rotation_stream(backend):
    """The cache keeps keys and values as written; each read splits and rotates them its own
    way, so reads that differ in heads, rope and window stream as one pass."""
    prog = nestc.loads(spec("""
        block B(dim) {
            input x : [T, dim]
            let k = x |> linear(dim)
            memory C : cache every token { key k; value x }
            output softmax_attention(x, C, heads = 2, window = 5) +
                   softmax_attention(k, C, heads = 4, rope = false) +
                   softmax_attention(x, C, heads = 1)
        }
    """), "b.nest")
    torch.manual_seed(0)
    mod = prog.build("B", dim=8, backend=backend)
    x = torch.randn(2, 20, 8)
    whole = mod(x)
    first, state = mod(x[:, :7], return_state=True)
    torch.testing.assert_close(torch.cat([first, mod(x[:, 7:], state=state)], 1), whole,
                               rtol=1e-5, atol=1e-6)


def test_a_window_is_a_whole_number_of_tokens():
    with pytest.raises(nestc.NestError, match="an attention window must be a whole number of "
                                              "at least 0, got -1") as err:
        PROG.build("A", dim=8, window=-1)
    assert "a.nest:6:60" in str(err.value)  # at the window's value
    # 0: no window
    torch.manual_seed(0)
    none = PROG.build("A", dim=8, window=0)
    wide = PROG.build("A", dim=8, window=1000)
    wide.load_state_dict(none.state_dict())
    x = torch.randn(1, 9, 8)
    torch.testing.assert_close(none(x), wide(x))
    assert len(none(x, return_state=True)[1]["C"]) == 2  # every key kept


def test_the_benchmark_runs():
    """benchmarks/attention.py at tiny sizes: its table, one row per T, window and pass."""
    out = run_benchmark("attention.py", "--T", "64", "--window", "8", "--reps", "1",
                        "--threads", "1")
    rows = [ln for ln in out.splitlines() if ln.startswith("| 64 | 8 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["fwd", "fwd+bwd"], out
