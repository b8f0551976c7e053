"""Generated source of blocks and models (nestc.codegen.block): `nestc compile` writes the code
`build` runs, a file that stands alone; spec names never clash with the generator's."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import spec
from torch import nn

import nestc
from nestc import cli
from nestc.codegen.block import MODULE_ATTRS
from nestc.module import Built

HOPE = "std/models/hope.nest"


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: torch.compile looks modules up there
    spec.loader.exec_module(module)
    return module


def test_the_compiled_file_is_the_module_build_makes(tmp_path, capsys):
    out = tmp_path / "hope_lm.py"
    rc = cli.main(["compile", HOPE, "--name", "HopeLM", "--set", "depth=2", "--set", "dim=16",
                   "--set", "vocab=32", "-o", str(out)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    text = out.read_text()
    assert text == nestc.load(HOPE).source("HopeLM", depth=2, dim=16, vocab=32)
    # one class per distinct sub-block: both layers are one Hope
    assert text.count("\nclass Hope(") == 1 and text.count("= Hope(backend)") == 2
    module = _import(out, "hope_lm_generated")
    torch.manual_seed(0)
    built = nestc.load(HOPE).build("HopeLM", depth=2, dim=16, vocab=32)
    mine = module.HopeLM()
    assert list(mine.state_dict()) == list(built.state_dict())
    mine.load_state_dict(built.state_dict())
    x = torch.randint(0, 32, (2, 20))
    y, state = built(x, return_state=True)
    y2, state2 = mine(x, return_state=True)
    assert torch.equal(y, y2) and state.keys() == state2.keys()


def test_every_backend_runs_one_source():
    prog = nestc.load("std/memory/deltanet.nest")
    text = prog.source("GatedDeltaNet", dim=16)
    assert prog.source("GatedDeltaNet", dim=16) == text  # deterministic
    assert "backend=backend" in text
    mods = {b: prog.build("GatedDeltaNet", dim=16, backend=b) for b in ("reference", "chunked")}
    assert type(mods["reference"]) is type(mods["chunked"])
    mods["chunked"].load_state_dict(mods["reference"].state_dict())
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(mods["chunked"](x), mods["reference"](x), rtol=1e-4, atol=1e-5)


def test_a_submodule_is_never_named_like_an_attribute_of_a_module():
    public = {n for cls in (nn.Module, Built) for n in dir(cls) if not n.startswith("_")}
    assert public <= MODULE_ATTRS, sorted(public - MODULE_ATTRS)


NAMES = """
block B(dim = 8) {
    input torch : [T, dim]
    let F = linear(torch, dim)
    let nn = F + 1
    let a = nn * 2
    let a_1 = sigmoid(a)
    a = a + a_1
    let tile = l2norm(a)
    memory eval : residual_mlp(4) per head = meta every token in chunks of 2 {
        let read = stop_grad(eval(tile))
        key tile; value read
        objective l2(eval(tile), read)
        rule gd(lr = 0.1)
    }
    output eval(a) + F
}
"""
PLAIN = (NAMES.replace("torch", "x").replace("F", "p").replace("nn", "q").replace("a_1", "s")
         .replace("tile", "k").replace("eval", "M").replace("read", "target"))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_spec_names_that_python_or_the_generator_use_change_nothing(backend):
    # names of the generated code's imports (torch, F, nn), of a rebinding's local (a_1 beside
    # a rebound a), of a generated value's arguments (tile, read) and of a Module method (eval)
    torch.manual_seed(0)
    odd = nestc.loads(NAMES, "names.nest").build("B", backend=backend)
    torch.manual_seed(0)
    plain = nestc.loads(PLAIN, "plain.nest").build("B", backend=backend)
    assert "m_eval.A" in odd.state_dict()
    for a, b in zip(odd.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(2, 7, 8)
    assert torch.equal(odd(x), plain(x))


def test_spec_text_cannot_end_a_docstring_or_a_string():
    text = 'block B(tag = "\\"\\"\\" + __import__(\'os\').getcwd() + \\"\\"\\"", dim = 4) {\n' \
        "    input x : [T, dim]\n    output x\n}\n"
    prog = nestc.loads(text, "evil.nest")
    src = prog.source("B")
    assert src.count('"""') == 2  # the class docstring's own
    compile(src, "<evil>", "exec")
    assert torch.equal(prog.build("B")(torch.ones(1, 2, 4)), torch.ones(1, 2, 4))


def test_an_optimizer_source_takes_no_hyperparameters(capsys):
    rc = cli.main(["compile", "std/optim/sgd.nest", "--set", "lr=0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and "does not depend on its hyperparameters" in err and "Traceback" not in err


def test_a_built_module_pickles_and_copies():
    import copy
    import io

    model = nestc.load(HOPE).build("HopeLM", dim=16, depth=1, vocab=32)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randint(0, 32, (2, 9))
    for other in (loaded, copy.deepcopy(model)):  # each runs its own weights
        assert type(other) is type(model) and torch.equal(other(x), model(x))
        with torch.no_grad():
            other.out_linear.weight.zero_()
        assert other(x).abs().max() == 0 and model(x).abs().max() > 0


def test_the_generator_knows_the_runtime_activations():
    from nestc.codegen.block import ACTS
    from nestc.memories import ACTS as RUNTIME

    assert set(ACTS) == set(RUNTIME)


def test_the_excerpt_in_the_language_docs_is_what_the_generator_writes():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "language.md").read_text()
    section = doc.split("## Generated code of blocks and models", 1)[1]
    excerpt = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert excerpt in nestc.load(HOPE).source("HopeLM", dim=32, depth=1)


def _block(body: str, **hyper):
    text = "block B(dim = 2) {\n    input x : [T, dim]\n" + body + "\n}\n"
    return nestc.loads(text, "b.nest").build("B", **hyper)


def test_a_negative_constant_keeps_its_sign_as_an_operand():
    # in Python -2 ** y is -(2 ** y): the generator writes (-2) ** y
    x = torch.ones(1, 3, 2)
    for body in ("    let a = -2\n    output a ** (x * 0 + 2)",
                 "    output (-2) ** (x * 0 + 2)"):
        assert torch.equal(_block(body)(x), torch.full((1, 3, 2), 4.0)), body


def test_a_name_bound_to_a_constant_then_to_a_tensor_is_the_tensor():
    x = torch.randn(1, 3, 2)
    assert torch.equal(_block("    let a = 2\n    a = x * a\n    output a")(x), x * 2)


def test_the_output_is_its_value_where_it_stands():
    # statements after `output` still run, in order; they do not change what it returned
    x = torch.ones(1, 2, 2)
    y = _block("    let y = x + 1\n    output y\n    y = y * 10")(x)
    assert torch.equal(y, torch.full((1, 2, 2), 2.0))


def test_a_class_stays_one_class_when_the_cache_forgets_it():
    import io

    from nestc import compile as compile_mod
    from nestc import runtime

    prog = nestc.load("std/models/transformer.nest")
    first = prog.build("MLP", dim=8)
    runtime._exec.cache_clear()
    compile_mod._MODULES.clear()
    again = prog.build("MLP", dim=8)
    assert type(first) is type(again)
    torch.save(first, io.BytesIO())  # still found where pickle looks for it


SIBLINGS = """
    let k = x |> linear(dim) |> l2norm(per = 2)
    let v = x |> linear(dim)
    memory M1 : residual_mlp(dim / 2) per head = meta every token in chunks of 4 {
        let target = stop_grad(M1(v))
        key k; value target; objective l2(M1(k), target); rule gd(lr = 0.5)
    }
    memory M2 : residual_mlp(dim / 2) per head = meta every token in chunks of 4 {
        let target = 2 * stop_grad(M2(v))
        key k; value target; objective l2(M2(k), target); rule gd(lr = 0.5)
    }
    memory M3 : residual_mlp(dim / 2) per head = meta every token in chunks of 4 {
        let target = stop_grad(M3(v))
        key k; value target; objective l2(M3(k), target); rule gd(lr = 0.5)
    }
    output M1(x) + M2(x) + M3(x)"""


def test_memories_that_differ_only_on_the_triton_tier_group_there_apart():
    # on triton the kernel generates M1's and M3's values itself (stop_grad(M(v))), not M2's:
    # M1 and M3 run as one there; on the chunked tier all three do
    def groups(mod):
        found = {}
        for name in ("M1", "M2", "M3"):
            group = mod._modules[name].siblings
            if group is not None:
                found.setdefault(id(group[0]), []).append(name)
        return sorted(found.values())

    assert groups(_block(SIBLINGS, dim=8)) == [["M1", "M2", "M3"]]
    assert groups(_block(SIBLINGS, dim=8, backend="triton")) == [["M1", "M3"]]


@pytest.mark.parametrize("body,message", [
    ("    let lr = x |> linear(1)\n"
     "    memory M : matrix(2, 2) per head = zeros every token {\n"
     "        objective l2(M(x), x); rule gd(lr = \"fast\")\n    }\n    output M(x)",
     "b.nest:5:45: error: `lr` of memory `M` is a number or a tensor, got 'fast'"),
    ("    memory M : matrix(2, 2) per head = zeros every token {\n"
     "        objective l2(M(M(x)), x); rule gd(lr = 0.1)\n    }\n    output M(x)",
     "b.nest:4:24: error: reading memory `M` in its own clauses is not supported"),
    ("    memory M : residual_mlp(2) = meta every token {\n"
     "        let t = stop_grad(M(x)) * sqrt(dim * 2)\n"
     "        key x; value t; objective l2(M(x), t); rule gd(lr = 0.1)\n    }\n    output M(x)",
     "b.nest:4:40: error: arithmetic of constants alone inside a memory"),
    ("    output rmsnorm(x, eps = \"small\")",
     "b.nest:3:29: error: rmsnorm's `eps` must be a number, got 'small'"),
])
def test_bad_values_in_a_block_are_errors_at_their_place(body, message):
    with pytest.raises(nestc.NestError) as info:
        _block(body)
    assert str(info.value).startswith(message), str(info.value)


def test_generated_lines_break_inside_their_brackets():
    from nestc.codegen.torch import fitted

    line = "        y = torch.sigmoid(" + ", ".join(f"self.layer_{i}(x)" for i in range(8)) + ")"
    lines = fitted(line)
    assert all(len(ln) <= 99 for ln in lines) and len(lines) == 2
    assert lines[1].startswith(" " * 12 + "self.layer_")
    compile("\n".join(ln[8:] for ln in lines), "<fitted>", "exec")
    # a def's arguments go 8 columns in (past its body); a line with no break stays whole
    head = fitted("    def f(" + ", ".join(f"argument_{i}=1" for i in range(8)) + "):")
    assert head[1].startswith(" " * 12 + "argument_")
    long_name = "        " + "x" * 100
    assert fitted(long_name) == [long_name]
    # a spec line's comment: its place first, then the line
    note = fitted("        # std/a.nest:3: let q = " + "x |> silu " * 10)
    assert note[0] == "        # std/a.nest:3:" and note[1].startswith("        #     let q = ")


def test_values_nothing_reads_are_not_computed():
    from nestc.codegen.block import without_dead_stores

    body = ["# a.nest:1: let y = 0 * q", "y = (0 * q)",
            "# a.nest:2: let z = y + 1", "z = (y + 1)",
            "# a.nest:3: let c = conv(x)", "c = self.c_conv1d(x, _state)",
            "# a.nest:4: output q", "return q"]
    # z reads y, but nothing reads z: both go, with their comments; a submodule's call stays
    assert without_dead_stores(body) == body[4:]


def test_sub_blocks_are_called_as_modules_so_their_hooks_run():
    """A block called by another runs through nn.Module.__call__: forward hooks see its input
    and output (FSDP's per-block sharding and a sub-block's own compile rely on the same)."""
    prog = nestc.load("std/models/deltanet.nest")
    torch.manual_seed(0)
    model = prog.build("DeltaNetLM", vocab=12, dim=16, depth=2, heads=2)
    seen = []
    for name, child in model.named_children():
        if isinstance(child, Built):
            child.register_forward_hook(
                lambda mod, args, out, name=name: seen.append((name, args[0].shape, out.shape)))
    tokens = torch.randint(0, 12, (2, 7))
    model(tokens)
    assert [name for name, _, _ in seen] == ["r0_GatedDeltaNet", "r0_MLP",
                                             "r1_GatedDeltaNet", "r1_MLP"]
    assert all(x == y == (2, 7, 16) for _, x, y in seen)


def test_a_statement_over_several_lines_is_quoted_whole_above_its_code():
    """The spec comment above generated code holds all of a statement's lines (each but the
    last without its comment), and a memory's declaration up to the `{` of its body."""
    text = spec("""
        block B(dim = 4) {
            input x : [T, dim]
            let y = x +  # a comment that is not code
                2 * x
            memory M : matrix(dim, dim) = zeros
                       every token {
                key y; value x
                objective l2(M(y), x); rule gd(lr = 0.1)
            }
            output M(y)
        }
    """)
    source = nestc.loads(text, "b.nest").source("B")
    flat = " ".join(line.strip().lstrip("#").strip() for line in source.splitlines())
    assert "b.nest:3: let y = x + 2 * x" in flat
    assert "b.nest:5: memory M : matrix(dim, dim) = zeros every token {" in flat
    assert "a comment that is not code" not in source and "key y; value x" not in source


def test_wrong_inputs_and_arguments_are_errors_that_say_what_is_taken():
    """A bug hunt's raw errors: torch's matmul or embedding error for a wrong input width,
    dtype or rank; a shape error for top_k=0; an IndexError for a 1-D prompt; AttributeErrors
    for loads(None); NaN from an eps of -1 or a softplus beta of 0."""
    block = nestc.load("std/memory/deltanet.nest").build("DeltaNet", dim=16)
    for x, message in ((torch.randn(2, 5, 8), r"takes \[B, T, 16\] floats, got torch.float32 "
                        r"of shape \[2, 5, 8\]"),
                       (torch.randint(0, 3, (2, 5, 16)), "takes \\[B, T, 16\\] floats"),
                       (torch.randn(2, 5, 16, dtype=torch.bfloat16),
                        "has torch.float32 weights and got torch.bfloat16 input")):
        with pytest.raises(ValueError, match=message):
            block(x)
    with pytest.raises(TypeError, match="takes a tensor, got list"):
        block([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (autocast takes any float input)
        assert block(torch.randn(2, 5, 16, dtype=torch.bfloat16)).shape == (2, 5, 16)
    lm = nestc.load("std/models/transformer.nest").build("TransformerLM", vocab=11, dim=16,
                                                         depth=1)
    with pytest.raises(ValueError, match=r"takes token ids \[B, T\] \(an integer tensor\)"):
        lm(torch.randn(2, 5))
    prompt = torch.randint(0, 11, (1, 3))
    for kw, message in (({"top_k": 0}, "top_k at least 1"), ({"temperature": -1.0},
                                                              "temperature is at least 0")):
        with pytest.raises(ValueError, match=message):
            lm.generate(prompt, 2, **kw)
    with pytest.raises(ValueError, match=r"the prompt is \[B, P\] token ids, got shape \[3\]"):
        lm.generate(prompt[0], 2)
    with pytest.raises(TypeError, match="loads takes the spec's text and a file name as str"):
        nestc.loads(None)
    with pytest.raises(TypeError, match="a declaration is named by a str"):
        nestc.load(HOPE).build(None)
    for layer, message in (("layernorm(x, eps = -1)", "layernorm's `eps` must be above 0"),
                           ("softplus(x, beta = 0)", "softplus's `beta` must be above 0")):
        with pytest.raises(nestc.NestError, match=message):
            _block(f"    output {layer}")


ELEMENTWISE = """block E(dim = 4, hi = 0.5) {
    input x : [T, dim]
    let a = if x > 0 then x else 0.1 * x
    let b = min(a, 0.3) + max(-0.1, x) + min(x, a) + max(x, a)
    let c = clamp(x, lo = -0.2, hi = hi) + clamp(x, lo = 0) + clamp(x, hi = 0)
    let d = lerp(x, a, 0.25) + where(x % 2 > 1, x, -x) + (x != a) * 3
    let s = softmax(x) * (x >= 0.5) + (x < -0.5) - (x <= 0) + (x == 1)
        + (x > 0 and x < 1) * 2 + (x > 1 or x < -1) * 4 + (not (x > 0))
    let m = mean(concat(x, a), per = 2)
    output concat(a + b + c + d + s, m)
}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_element_wise_builtins_and_tensor_conditions_build_as_written(dtype):
    """if/then/else on a tensor, comparisons and and/or/not (1 or 0 in the operands' dtype: a
    bool tensor added as `or` and refused `-`), `%`, min, max, clamp, lerp, where, softmax
    and concat checked in a block but were not built ("not supported by the block compiler
    yet"), as docs/language.md's Expressions example was not."""
    x = (torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    x[0, 0, 0] = 1.0
    y = nestc.loads(ELEMENTWISE, "e.nest").build("E")(x)
    one = torch.ones((), dtype=dtype)
    a = torch.where(x > 0, x, 0.1 * x)
    b = a.clamp(max=0.3) + x.clamp(min=-0.1) + torch.minimum(x, a) + torch.maximum(x, a)
    c = x.clamp(-0.2, 0.5) + x.clamp(min=0) + x.clamp(max=0)
    d = x + 0.25 * (a - x) + torch.where(torch.remainder(x, 2) > 1, x, -x) + (x != a) * 3 * one
    s = torch.softmax(x, -1) * (x >= 0.5) + (x < -0.5) * one - (x <= 0) * one + (x == 1) * one \
        + ((x > 0) & (x < 1)) * 2 * one + ((x > 1) | (x < -1)) * 4 * one + (x <= 0) * one
    m = torch.cat([x, a], -1).unflatten(-1, (2, -1)).mean(-1)
    assert y.dtype == dtype
    torch.testing.assert_close(y, torch.cat([a + b + c + d + s, m], -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("body", "want"), [
    ("    output if x > 0 then 1 else 0", lambda x: (x > 0) * 1.0),
    ("    output where(x > 0, 1.0, 0.5)", lambda x: torch.where(x > 0, 1.0, 0.5)),
    ("    output where(true, x, -x) + (if 2 > 1 then x else -x)", lambda x: 2 * x),
    ("    output (true and (x > 0)) * x + ((x > 0) or 1) * x", lambda x: (x > 0) * x + x),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_numbers_in_element_wise_expressions_take_the_tensors_dtype(body, want, dtype):
    """A review found `if x > 0 then 1 else 0` an int64 tensor and `where(c, 1.0, 0.5)` a
    float32 one whatever x's dtype, `where` of a constant condition a TypeError at forward,
    and `and`/`or` of a constant a StopIteration."""
    x = torch.randn(1, 3, 2).to(dtype)
    y = _block(body)(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, want(x).to(dtype))


@pytest.mark.parametrize("body,message", [
    ("    output softmax(x, dim = \"a\")", "3:29: error: softmax's `dim` is a whole number"),
    ("    output concat(x, x, dim = -1.5)", "3:31: error: concat's `dim` is a whole number"),
    ("    output min(x, \"a\")", "3:19: error: `min` takes tensors and numbers, got \"a\""),
    ("    output lerp(x, x, [0.5, 1])", "3:23: error: `lerp` takes tensors and numbers"),
])
def test_arguments_of_element_wise_builtins_are_checked_at_them(body, message):
    """softmax's dim "a" was an internal error (exit 2), a dim of -1.5 was taken as -1, and
    min(x, "a") failed at forward with a TypeError."""
    with pytest.raises(nestc.NestError) as info:
        _block(body)
    assert str(info.value).startswith(f"b.nest:{message}"), str(info.value)


@pytest.mark.parametrize("body,message", [
    ("    output min(x, x |> linear(3))", "`min` of tensors with 2 and 3 features"),
    ("    output clamp(x, lo = 1, hi = 0)", "clamp's `lo` 1.0 is above its `hi` 0.0"),
    ("    output softmax(x, dim = 0)", "`softmax` over a dim other than the last is not supported"),
])
def test_element_wise_builtins_say_what_they_refuse(body, message):
    with pytest.raises(nestc.NestError, match=message):
        _block(body)


PARAMS = """block P(dim = 4, depth = 2) {
    input x : [T, dim]
    let h = x
    repeat depth {
        param W : [dim, dim] = identity
        param g : [dim] = 1.5
        h = h @ W * g
    }
    param s : [1] = 0.5
    param M : [dim, 2 * dim]
    param b : [2 * dim] = zeros
    output concat(h, x) * sigmoid(s) + x @ (M * 2) + b
}
"""


def test_a_blocks_params_are_its_weights():
    """`param W : [a, b] = init` in a block (docs/language.md's Gated example) was refused
    ("`StmtParam` in a block is not supported"). Each is a parameter of the module, one per
    repeat copy, at its init, read by `@` and element-wise, trained by the outer level."""
    torch.manual_seed(0)
    m = nestc.loads(PARAMS, "p.nest").build("P")
    params = dict(m.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items()} == {
        "r0_W": (4, 4), "r0_g": (4,), "r1_W": (4, 4), "r1_g": (4,), "s": (1,), "M": (4, 8),
        "b": (8,)}
    assert torch.equal(params["r0_W"], torch.eye(4)) and (params["r1_g"] == 1.5).all()
    assert params["M"].abs().max() <= 0.5 and params["M"].std() > 0.1  # +-1/sqrt(4)
    x = torch.randn(2, 3, 4)
    h = x @ params["r0_W"] * params["r0_g"] @ params["r1_W"] * params["r1_g"]
    want = torch.cat([h, x], -1) * torch.sigmoid(params["s"]) + x @ (params["M"] * 2) + \
        params["b"]
    y = m(x)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_transpose_outer_and_norm_of_params_and_sequences():
    """transpose and outer of params, and norm of a param (its Frobenius norm) and of a
    sequence (each token's, over its features), were refused by the block compiler."""
    torch.manual_seed(0)
    m = nestc.loads("""block Tied(dim = 6) {
    input x : [T, dim]
    param E : [dim, 3]
    param u : [dim] = 0.5
    param w : [dim]
    let h = x @ E
    let y = h @ transpose(E) + x @ outer(w, u)
    output y / norm(y) * norm(E) + norm(x)
}
""", "t.nest").build("Tied").double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    E, u, w = m.E, m.u, m.w
    y = x @ E @ E.T + x @ torch.outer(w, u)
    want = y / y.norm(dim=-1, keepdim=True) * E.norm() + x.norm(dim=-1, keepdim=True)
    got = m(x)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (E, u, w))


@pytest.mark.parametrize("body,message", [
    ("    param W : [dim, dim]\n    output W",
     "4:12: error: this takes a sequence [T, features], not a param's tensor of shape [2, 2]"),
    ("    param W : [dim, dim]\n    output x * W",
     "4:12: error: `*` of a sequence and a param's tensor of shape [2, 2]"),
    ("    param W : [3, dim]\n    output x @ W",
     "4:12: error: `@` of 2 features by a matrix of shape [3, 2]"),
    ("    param b : [dim]\n    output x @ b", "4:12: error: `@` other than a sequence"),
    ("    param W : [dim, 3] = identity\n    output x @ W",
     "3:26: error: identity is the init of a square matrix, not of shape [2, 3]"),
    ("    param W : [dim, dim] = meta\n    output x @ W",
     "3:28: error: this init of a param (it takes zeros, identity or a number) is not"),
    ("    param W : [2, 3]\n    param V : [3, 2]\n    output x * (W + V)",
     "5:17: error: `+` of params of shapes [2, 3] and [3, 2]"),
    ("    param W : [dim, dim]\n    output linear(W, 3)",
     "4:19: error: this takes a sequence [T, features], not a param's tensor"),
    # transpose and outer: of a param's matrix and vectors
    ("    param b : [dim]\n    output x @ transpose(b)",
     "4:26: error: transpose takes a matrix, got a param's tensor of shape [2]"),
    ("    param W : [dim, dim]\n    output x @ outer(W, W)",
     "4:22: error: outer takes a vector, got a param's tensor of shape [2, 2]"),
    ("    output x @ transpose(x)",
     "3:26: error: `transpose` of a sequence (it takes a param's matrix) is not supported"),
    ("    param W : [dim, 3]\n    output x @ transpose(W)",
     "4:12: error: `@` of 2 features by a matrix of shape [3, 2]"),
])
def test_a_param_where_it_cannot_go_is_an_error_at_it(body, message):
    with pytest.raises(nestc.NestError) as info:
        _block(body)
    assert str(info.value).startswith(f"b.nest:{message}"), str(info.value)


@pytest.mark.parametrize("body", [
    "    let b = x * 3\n    repeat 1 { param b : [dim] = 0.5\n let y = x * b }\n    output x * b",
    "    let b = x * 3\n    if dim > 1 { param b : [dim] = 0.5\n let y = x * b }\n    output x * b",
])
def test_a_param_in_a_body_is_local_to_it(body):
    """Past the body a param was declared in, its name is the outer one again, as a let's is
    (the module read the param there: x * 0.5 for x * 3x), and the nest graph draws the
    param as a level of its own (it was merged into the outer signal of its name)."""
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    m = _block(body).double()
    torch.testing.assert_close(m(x), x * (x * 3))
    prog = nestc.loads("block B(dim = 2) {\n    input x : [T, dim]\n" + body + "\n}\n", "b.nest")
    g = prog.graph("B")
    params = [n for n, a in g.nodes(data=True) if a["kind"] == "param"]
    assert len(params) == 1 and g.nodes["b"]["kind"] == "signal"


def test_bools_in_a_blocks_arithmetic_are_one_and_zero():
    """`x - (dim > 2)` generated `x - True`, which torch refuses for - (a traceback at the
    forward); a bool constant is now 1 or 0 in every operation."""
    x = torch.randn(2, 3, 2)
    m = _block("    output x - (dim > 1) + (dim > 5) - (not true) * x")
    torch.testing.assert_close(m(x), x - 1)


def test_a_divide_update_builds_in_a_block():
    """`h /= e`, in language.md's statement table, was refused by the block compiler."""
    x = torch.randn(2, 3, 2)
    torch.testing.assert_close(_block("    let h = x\n    h /= 4\n    output h")(x), x / 4)


def test_functions_of_numbers_alone_are_numbers_in_a_block():
    """`x / sqrt(dim)` was "a tensor is needed here": builtins of hyperparameters and numbers
    alone are computed when the block is generated, as torch would compute them."""
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    m = _block("    output x / sqrt(dim * 8) + max(dim, 3) + sigmoid(0) + min(1, exp(0))",
               dim=2).double()
    torch.testing.assert_close(m(x), x / 4 + 3 + 0.5 + 1)
    with pytest.raises(nestc.NestError, match=r"b.nest:3:16: error: log\(0\) is not a finite "):
        _block("    output x * log(dim - 2)")


@pytest.mark.parametrize("body,message", [
    ("    input t : [T] int\n    output embed(t, 5, 2)",
     "b.nest:8:25: error: block `E` takes token ids (its input `t`), got a sequence of 2 "
     "features"),
    ("    input h : [T, 2]\n    output h",
     "b.nest:8:25: error: block `E` takes features (its input `h`), got token ids"),
])
def test_a_sub_blocks_input_kind_is_checked_at_the_call(body, message):
    """A sequence of features passed to a block whose input is token ids built, then failed
    in embed with torch's error; token ids into features said "0 are passed in"."""
    text = ("block E() {\n" + body + "\n}\n"
            "model M(dim = 2) {\n    input tokens : [T] int\n"
            "    let h = " + ("embed(tokens, 5, dim)" if "int" in body else "tokens") + "\n"
            "    output logits = E()(h) |> linear(5)\n"
            "    train every step { objective cross_entropy(logits, next(tokens)); "
            "rule gd(lr = 0.1) }\n}\n")
    with pytest.raises(nestc.NestError) as info:
        nestc.loads(text, "b.nest").build("M")
    assert str(info.value).startswith(message), str(info.value)


def test_a_width_that_does_not_fit_a_sub_block_is_an_error_at_the_call():
    """It was reported at the callee's input (in another file for a stdlib block), with no
    word of the call."""
    text = ('import "std/models/transformer.nest" as t\nblock B(dim = 8) {\n'
            '    input x : [T, dim]\n    output t.MLP(4)(x + 1)\n}\n')
    with pytest.raises(nestc.NestError) as info:
        nestc.loads(text, "b.nest").build("B")
    lines = str(info.value).splitlines()
    assert lines[0] == "b.nest:4:21: error: block `MLP` takes 4 features (its input `x`), got 8"
    assert lines[3].endswith("transformer.nest:17:15: note: its input")


def test_a_named_output_is_read_by_later_statements():
    """`output logits = ...; let z = logits * 2` was "`logits` is not a tensor here"; the
    checker takes a named output as a let."""
    m = _block("    output y = x * 3\n    let z = y * 2\n    y = z")
    x = torch.randn(2, 3, 2)
    torch.testing.assert_close(m(x), x * 3)  # the value where the output stands


def test_a_name_that_is_not_the_builtin_is_not_folded_as_one():
    """`exp(1)` is e only where `exp` is the builtin: a block or a memory of that name (one
    read above its declaration too) is not folded to a number."""
    with pytest.raises(nestc.NestError, match=r"block `exp` is called as exp\(hyperparameters\)"):
        nestc.loads("block exp(dim = 4) {\n    input x : [T, dim]\n    output x * 2\n}\n"
                    "block B(dim = 4) {\n    input x : [T, dim]\n    output x * exp(1)\n}\n",
                    "e.nest").build("B")
    with pytest.raises(nestc.NestError, match="a tensor is needed here"):
        nestc.loads("block B(dim = 4) {\n    input x : [T, dim]\n    let y = x * exp(1)\n"
                    "    memory exp : matrix(dim, dim) = zeros every token in chunks of 2 {\n"
                    "        objective l2(exp(x), x); rule gd(lr = 0.1)\n    }\n"
                    "    output y + exp(x)\n}\n", "m.nest").build("B")


def test_a_memorys_numbers_may_be_builtins_of_numbers():
    """`beta = relu(-1)` is a beta of 0 (no momentum: the chunked op), and `sigmoid(2)` a
    number a shared memory takes: the memory compiler read them as data-dependent."""
    text = ("block B(dim = 4) {\n    input x : [T, dim]\n"
            "    memory M : matrix(dim, dim) = zeros every token {\n"
            "        STATE objective l2(M(x), x); rule momentum(lr = 0.1, beta = BETA)\n"
            "    }\n    output M(x)\n}\n")
    zero = nestc.loads(text.replace("STATE", "").replace("BETA", "relu(-1)"), "z.nest")
    assert zero.build("B").M.recurrence == "delta_rule"
    shared = nestc.loads(text.replace("STATE", "state shared;").replace("BETA", "sigmoid(2)"),
                         "s.nest").build("B")
    assert shared.M.momentum and shared.M.shared
