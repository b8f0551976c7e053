"""`nestc explain`: the plain-text report of levels, fastest first."""

from __future__ import annotations

from test_nest import load_sketch

import nestc
from nestc.cli import main
from nestc.explain import explain


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def test_adam_report() -> None:
    text = explain(nestc.load("std/optim/adam.nest"), "Adam")
    lines = lines_of(text)
    assert lines[:13] == [
        "optimizer Adam  (std/optim/adam.nest:8:1)",
        "  hyperparameters",
        "    lr           = 0.001",
        "    betas        = (0.9, 0.999)",
        "    eps          = 1e-08",
        "    weight_decay = 0.0",
        "  requires (met)",
        "    lr >= 0",
        "    eps >= 0",
        "    0 <= betas[0] and betas[0] < 1 and 0 <= betas[1] and betas[1] < 1",
        "    weight_decay >= 0",
        "",
        "3 levels, fastest first (updates counted over 1000 steps)",
    ]
    start = lines.index("  level 0  m  (memory)")
    assert lines[start - 1] == "every step"
    assert lines[start:start + 9] == [
        "  level 0  m  (memory)",
        "    frequency      every step",
        "    parallel with  v",
        "    learns from    g (objective)",
        "    objective      l2(m, g)",
        "    rule           gd(lr = 1 - betas[0])",
        "    init           zeros_like(W)",
        "    updates        1000 over 1000 steps",
        "  level 0  v  (memory)",
    ]
    w = lines.index("  level 1  W  (param)")
    assert lines[w:w + 8] == [
        "  level 1  W  (param)",
        "    frequency      every step",
        "    after          m, v (reads their state of the same step)",
        "    reads          m (update), v (update)",
        "    objective      - (explicit update)",
        "    rule           W -= lr * debias(m, betas[0]) / (sqrt(debias(v, betas[1])) + eps)",
        "    init           -",
        "    updates        1000 over 1000 steps",
    ]
    sig = lines.index("signals")
    assert lines[sig:sig + 3] == ["signals", "  grad(W)  signal  <- W (gradient)",
                                  "  g        signal  <- grad(W)"]
    # how the compiler lowers it: closed forms of the objective/rule pairs, and the kernel
    assert lines[sig + 4:] == [
        "compiled (1 variant, picked by hyperparameters and the param's shape)",
        "  variant 0: always",
        "    g = grad(W) + weight_decay * W",
        "    m <- lerp(m, g, 1 - betas[0])",
        "    v <- lerp(v, g * g, 1 - betas[1])",
        "    W <- W - lr * debias(m, betas[0]) / (sqrt(debias(v, betas[1])) + eps)",
        "    kernel: torch fused adam(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, "
        "weight_decay=weight_decay)",
    ]
    assert "\x1b" not in text  # no colours
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_steps_and_hyperparameters() -> None:
    text = explain(nestc.load("std/optim/adam.nest"), "Adam", steps=10, lr=0.01)
    assert "    lr           = 0.01" in lines_of(text)
    assert "    updates        10 over 10 steps" in lines_of(text)
    assert "3 levels, fastest first (updates counted over 10 steps)" in lines_of(text)


def test_sgd_momentum_report() -> None:
    lines = lines_of(explain(nestc.load("std/optim/sgd.nest"), "SGD", momentum=0.9))
    assert "    init           from g" in lines
    assert "    after          buf (reads their state of the same step)" in lines
    assert lines.index("  level 0  buf  (memory)") < lines.index("  level 1  W  (param)")


def test_chunks_and_partial_chunks() -> None:
    prog = load_sketch()
    lines = lines_of(explain(prog, "DeltaNet", dim=64))
    assert lines[0] == "block DeltaNet  (sketch.nest:3:1)"
    assert "    frequency      every token in chunks of 64" in lines
    assert "    updates        4096 over 4096 tokens, in 64 chunks of 64" in lines
    assert "    structure      matrix(dim / heads, dim / heads) per head" in lines
    assert "    learns from    k (key, objective), v (value, objective), beta (lr)" in lines
    lines = lines_of(explain(prog, "DeltaNet", tokens=100, dim=64))
    assert "    updates        100 over 100 tokens, in 2 chunks of 64 (last one partial: carry)" \
        in lines


def test_hope_report() -> None:
    text = explain(load_sketch(), "HopeLM")
    lines = lines_of(text)
    assert "15 levels, fastest first (updates counted over 4096 tokens and 1000 steps)" in lines
    bands = [ln for ln in lines if ln and not ln.startswith(" ") and ln.startswith("every")]
    assert bands == ["every token", "every 16 tokens", "every 256 tokens", "every step"]
    c16 = lines.index("  level 2  Hope.C[16]  (memory, x4)")
    assert "    updates        256 over 4096 tokens" in lines[c16:c16 + 16]
    c256 = lines.index("  level 3  Hope.C[256]  (memory, x4)")
    assert "    updates        16 over 4096 tokens" in lines[c256:c256 + 16]
    m = lines.index("  level 1  Hope.M  (memory, x4)")
    block = lines[m:c16]
    assert "    read           before write (set)" in block
    assert "    init           meta (learned by train)" in block
    assert "    after          Hope.Mk (reads their state of the same token)" in block
    assert "                   Hope.alpha (retain)" in block  # wrapped under its field
    assert all(len(ln) <= 100 for ln in lines if not ln.startswith("    rule"))
    train = lines.index("  level 5  train  (train)")
    assert lines[train + 1:train + 4] == [
        "    frequency      every step",
        "    after          AdamW.m, AdamW.v (reads their state of the same step)",
        "    learns from    logits (objective), tokens (objective)",
    ]
    emb = lines.index("  level 4  h.embed  (param)")
    assert "    trained by     train (task gradient)" in lines[emb:emb + 10]
    assert "    structure      embed(256, 128)" in lines[emb:emb + 10]


def test_never_updates_zero_times() -> None:
    prog = nestc.loads("""
block Mlp(dim = 8) {
    input x : [T, dim]
    memory P : mlp(dim) = meta never
    output P(x)
}
""")
    lines = lines_of(explain(prog, "Mlp"))
    assert "    updates        0 in context (only the outer level trains it)" in lines
    assert "never" in lines


def test_cli_explain(capsys) -> None:
    assert main(["explain", "std/optim/adam.nest", "--name", "AdamW", "--steps", "5",
                 "--set", "lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("optimizer AdamW  (std/optim/adam.nest:22:1)\n")
    assert "    lr           = 0.5\n" in out
    assert "    updates        5 over 5 steps\n" in out


def test_deep_momentum_shows_its_mlp_memory_as_a_level() -> None:
    lines = lines_of(explain(nestc.load("std/optim/nested.nest"), "DeepMomentum"))
    start = lines.index("  level 0  m  (memory)")
    assert lines[start:start + 9] == [
        "  level 0  m  (memory)",
        "    frequency      every step",
        "    parallel with  b",
        "    learns from    g (key, value, objective)",
        "    structure      residual_mlp(cols(W), hidden = hidden)",
        "    objective      dot(m(g), g)",
        "    rule           gd(lr = eta, retain = alpha)",
        "    init           identity(seed = seed)",
        "    updates        1000 over 1000 steps",
    ]
    assert "    after          b, m (reads their state of the same step)" in lines
    variant = lines.index("  variant 0: ndim(W) >= 2")
    assert lines[variant + 1:variant + 5] == [
        "    g = grad(W)",
        "    m <- gd(dot(m(g), g), lr = eta, retain = alpha)",
        "    W <- W - lr * m(g)",
        "    kernel: none; MLP memory m runs tensor by tensor (generic code; backend='compiled' "
        "traces it with torch.compile)",
    ]


MEMORY = """block Mem(dim = 8) {
    input x : [T, dim]
    let lr = x |> linear(2) |> sigmoid
    memory M : matrix(4, 4) per head = zeros every token in chunks of 16 {
        CLAUSES
    }
    output M(x)
}
"""


def test_a_blocks_memories_show_what_they_compile_to() -> None:
    # instruction selection: the recurrence the objective, rule and retention amount to
    cases = {"objective l2(M(x), x); rule gd(lr = lr)": "the delta rule (nestc.ops.delta_rule)",
             "objective l2(M(x), x); rule gd(lr = lr, retain = lr)":
                 "the gated delta rule (nestc.ops.gated_delta_rule)",
             "objective l2(M(x), x); rule dgd(lr = lr)": "the delta rule (nestc.ops.delta_rule)",
             "dgd literal; objective l2(M(x), x); rule dgd(lr = lr)":
                 "the gated delta rule (nestc.ops.gated_delta_rule) for literal dgd (lr and "
                 "values rescaled)",
             "objective dot(M(x), x); rule gd(lr = lr)":
                 "linear attention (nestc.ops.linear_attention)",
             "objective huber(M(x), x); rule gd(lr = lr)":
                 "the token loop on every tier (huber: no chunk-parallel form)",
             "objective l2(M(x), x); rule gd(lr = lr, clip = 1)":
                 "the token loop on every tier (clip on l2: no chunk-parallel form)",
             "objective l2(M(x), x); rule dgd(lr = lr, beta = 0.9)":
                 "the token loop on every tier (momentum: no chunk-parallel form)"}
    for clauses, words in cases.items():
        text = explain(nestc.loads(MEMORY.replace("CLAUSES", clauses), "m.nest"), "Mem")
        tail = text.split("compiled: 1 memory (`nestc compile` prints the source)\n")[1]
        chunks = "" if "token loop" in words else ", in chunks of 16"
        assert " ".join(tail.split()).startswith(f"M {words}, 2 heads of 4 x 4{chunks}"), \
            (clauses, tail)
    hope = explain(nestc.load("std/models/hope.nest"), "HopeLM", depth=1)
    assert "compiled: 7 memories" in hope
    assert "  r0_Hope.SelfModifyingTitans.M_k\n" in hope and "runs as one with M_v, M_eta, " \
        "M_alpha" in hope.replace("\n      ", " ")
    assert "  r0_Hope.CMSIndependent.c1_f\n" in hope and "gd every 256 tokens" in hope


def test_a_memory_that_does_not_compile_is_explained_with_its_line() -> None:
    prog = nestc.loads(MEMORY.replace("CLAUSES", "dgd literal; objective dot(M(x), x); "
                                                 "rule dgd(lr = lr)"), "literal.nest")
    text = explain(prog, "Mem")
    assert ("not compiled: literal.nest:4:5: literal DGD with a dot objective is not "
            "supported") in text.replace("\n      ", " ")


def test_explain_lists_what_the_hyperparameters_must_meet() -> None:
    text = explain(nestc.load("std/optim/sgd.nest"), "SGD")
    assert "  requires (met)\n    lr >= 0\n" in text
    assert "    not nesterov or (momentum > 0 and dampening == 0)\n" in text


def test_a_value_the_build_refuses_is_explains_error_too():
    """heads=0 printed the levels and a `not compiled:` note, with exit 0; only what the
    compiler does not build yet is a note."""
    import pytest

    with pytest.raises(nestc.NestError, match="`per` must be a whole number of at least 1, "
                                              "got 0"):
        explain(nestc.load("std/models/hope.nest"), "HopeLM", heads=0)


def test_explain_promises_the_fused_kernel_only_where_the_build_uses_it():
    """At chunk 8 the MLP memory runs the chunked tier on backend='triton' (the kernel takes
    chunks of 16, 32 or 64), where explain said it ran a fused Triton kernel."""
    from nestc.codegen.memories import FUSED_CHUNKS, MIN_KERNEL_CLIP
    from nestc.ops.mlp_memory import MIN_KERNEL_CLIP as OP_MIN_CLIP

    assert MIN_KERNEL_CLIP == OP_MIN_CLIP  # (without triton too)

    titans = nestc.load("std/models/titans.nest")
    assert "a fused Triton kernel" in explain(titans, "TitansLM")
    assert "a fused Triton kernel" not in explain(titans, "TitansLM", chunk=8)
    try:
        from nestc.ops.mlp_memory.triton import CHUNKS
    except ImportError:  # (without triton)
        return
    assert FUSED_CHUNKS == CHUNKS
