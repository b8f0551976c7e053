"""The checker: hyperparameters (types, defaults, constant arithmetic), names in scope, builtins,
declarations calling declarations, chains, frequencies."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import ROOT, spec, spec_files

import nestc
from nestc.errors import NestError


def checked(text: str, name: str):
    return nestc.loads(spec(text), "t.nest").decl(name)


def error(text: str) -> NestError:
    with pytest.raises(NestError) as info:
        nestc.loads(spec(text), "t.nest")
    return info.value


def block(body: str, params: str = "dim = 8") -> str:
    return f"block B({params}) {{\n    input x : [T, dim]\n{body}\n    output x\n}}\n"


@pytest.mark.parametrize("path", spec_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_spec_in_the_repository_checks(path):
    prog = nestc.load(path)
    for name in prog.names:
        decl = prog.decl(name)
        required = {n: 8 for n, h in decl.hypers.items() if h.required}
        assert set(decl.bind(required)) == set(decl.hypers)


def test_every_std_spec_loads_by_its_std_path():
    for path in sorted((ROOT / "stdlib").glob("**/*.nest")):
        std = "std/" + path.relative_to(ROOT / "stdlib").as_posix()
        assert nestc.load(std).file == std


# --- hyperparameters -----------------------------------------------------------------------------


def test_defaults_and_inferred_types():
    decl = checked("""
        optimizer O(lr = 1e-3, steps = 5, on = true, name = "x", betas = (0.9, 0.99),
                    sizes = [16, 256], k: int = 2, w = lr * 10, half = steps / 5) {
            param W
            W -= lr * grad(W)
        }
    """, "O")
    assert {n: h.default for n, h in decl.hypers.items()} == {
        "lr": 1e-3, "steps": 5, "on": True, "name": "x", "betas": (0.9, 0.99),
        "sizes": [16, 256], "k": 2, "w": 1e-3 * 10, "half": 1}
    assert isinstance(decl.hypers["half"].default, int)  # 5 / 5 divides evenly
    assert decl.bind({"steps": 2.5, "sizes": [1, 2, 3]})["steps"] == 2.5  # an int default takes floats
    with pytest.raises(NestError, match="`k` of `O` must be an int, got 2.5"):
        decl.bind({"k": 2.5})
    with pytest.raises(NestError, match="`sizes` of `O` must be a list of numbers"):
        decl.bind({"sizes": ["a"]})


def test_a_default_follows_the_earlier_hyperparameters_as_bound():
    """`hidden = 4 * heads` is 4 times the `heads` a build, a call or `--set` gives, not the
    default's: it was the default's (a silent wrong width)."""
    decl = checked("""
        block B(heads = 2, hidden = 4 * heads, wide = hidden > 8) {
            input x : [T, 4]
            output x |> linear(hidden)
        }
    """, "B")
    assert decl.bind({}) == {"heads": 2, "hidden": 8, "wide": False}
    assert decl.bind({"heads": 3}) == {"heads": 3, "hidden": 12, "wide": True}
    assert decl.bind({"heads": 3, "hidden": 5}) == {"heads": 3, "hidden": 5, "wide": False}
    with pytest.raises(NestError, match="`heads` of `B` must be"):  # its own error, not hidden's
        decl.bind({"heads": "x"})
    prog = nestc.loads(spec("""
        block B(heads = 2, hidden = 4 * heads) {
            input x : [T, 4]
            output x |> linear(hidden)
        }
        block C(dim = 4) {
            input x : [T, dim]
            output B(heads = 3)(x)
        }
    """), "c.nest")
    assert prog.build("B", heads=3).out_linear.out_features == 12
    assert prog.build("C").B.out_linear.out_features == 12
    assert "B.output.linear" in prog.graph("C").nodes


def test_required_hyperparameter():
    decl = checked(block("", "dim"), "B")
    assert decl.hypers["dim"].required
    assert decl.bind({"dim": 4}) == {"dim": 4}
    with pytest.raises(NestError) as info:
        decl.bind({})
    assert (info.value.message, info.value.hint) == (
        "block `B` needs a value for `dim`", "pass dim=... (it has no default)")


def test_a_default_reads_only_earlier_hyperparameters():
    err = error(block("", "a = b, b = 1, dim = 8"))
    assert err.message == "the default of `a` must be a constant"


def test_mixed_list_default_takes_any_list():
    decl = checked(block("", 'dim = 8, mix = [1, "a"]'), "B")
    assert decl.bind({"mix": [2.5]})["mix"] == [2.5]


@pytest.mark.parametrize("default, message", [
    ("2 ** 64", "integer is too large (more than 64 bits)"),
    ("((2 ** 60) ** 60) ** 60", "integer is too large (more than 64 bits)"),
    ("1e308 * 10", "number is too large for a float"),
    ("(-8) ** 0.5", "a negative number to a fractional power is not a real number"),
    ("2 ** 2000", "exponent is too large"),
    ("1 % 0", "division by zero"),
    ("0.0 ** -1", "division by zero"),
    ('"a" < 1', "`<` needs numbers, got a string and an int"),
    ("-true", "`-` needs a number, got a bool"),
    ("(1, 2)[2]", "index 2 is out of range for 2 items"),
    ("(1, 2)[0.5]", "an index into a tuple or list is one integer"),
])
def test_constant_arithmetic_errors(default, message):
    err = error(block("", f"dim = 8, h = {default}"))
    assert err.message == message and err.kind in ("value", "type")
    assert err.span.line == 1


def test_constant_arithmetic_stays_fast():
    start = time.perf_counter()
    with pytest.raises(NestError):
        nestc.loads(block("", "dim = 8, h = " + "(" * 60 + "2" + " ** 64)" * 60), "t.nest")
    assert time.perf_counter() - start < 5


# --- names, builtins, declarations ---------------------------------------------------------------


def test_builtin_and_declaration_names_resolve():
    checked(block("    let y = x |> linear(dim) |> silu |> l2norm(per = 2)\n"
                  "    let z = softmax_attention(y, y, y, causal = true)"), "B")


def test_piped_block_call_binds_hyperparameters_after_the_input():
    decl = checked("""
        block Inner(dim, heads = 4) {
            input x : [T, dim]
            output x
        }
        block Outer(dim = 8) {
            input x : [T, dim]
            let a = x |> Inner(dim = 8)
            let b = x |> Inner(8, 2)
            output Inner(dim, heads = 2)(a + b)
        }
    """, "Outer")
    assert decl.name == "Outer"


def test_optimizer_as_a_learning_rule():
    text = """
        from "std/optim/adam.nest" import Adam
        block B(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every token { objective l2(M(x), x); rule Adam(lr = 0.1) }
            output M(x)
        }
    """
    checked(text, "B")
    err = error(text.replace("lr = 0.1", "lrr = 0.1"))
    assert (err.message, err.hint) == ("`Adam` has no hyperparameter `lrr`", "did you mean `lr`?")


def test_hyperparameter_is_not_a_function():
    assert error(block("    let y = dim(x)")).message == "`dim` is a hyperparameter here, not a " \
        "function"


def test_memory_updated_inside_another_memory():
    err = error(block("    memory A : matrix(dim, dim) = zeros never\n"
                      "    memory M : matrix(dim, dim) = zeros every token { A = x }"))
    assert err.message == "memory `A` is updated inside the body of `M`"


def test_memory_updated_outside_its_body():
    err = error(block("    memory A : matrix(dim, dim) = zeros never\n    A = A + outer(x, x)"))
    assert err.message == "memory `A` is updated outside its body"


def test_block_memory_needs_a_frequency():
    err = error(block("    memory A : matrix(dim, dim) = zeros { objective l2(A(x), x); "
                      "rule gd(lr = 0.1) }"))
    assert (err.message, err.hint) == (
        "memory `A` needs a frequency",
        "add `every token`, `every N tokens` (optionally `in chunks of C`) or `never`")


def test_block_needs_an_output():
    text = "block B(dim = 4) {\n    input x : [T, dim]\n    let y = x\n}\n"
    assert error(text).message == "block `B` has no `output`"


def test_recursive_blocks_are_rejected():
    text = ("block A(dim = 4) {\n    input x : [T, dim]\n    output B(dim)(x)\n}\n"
            "block B(dim = 4) {\n    input x : [T, dim]\n    output A(dim)(x)\n}\n")
    err = error(text)
    assert err.message == "`A` calls itself: A -> B -> A"
    assert (err.span.line, err.span.col) == (7, 12)


def test_memory_clauses_are_not_train_clauses():
    text = ("model M(dim = 4) {\n    input x : [T, dim]\n    output y = x |> linear(dim)\n"
            "    train every step { objective l2(y, x); rule gd(lr = 0.1); read before write }\n}\n")
    assert error(text).message == ("`read` is a memory clause: the train level has only an "
                                   "objective and a rule")


def test_explicit_update_form():
    checked("""
        optimizer Mom(lr = 0.1, beta = 0.9) {
            param W
            memory m = zeros_like(W) every step { m = beta * m + grad(W) }
            W -= lr * m
        }
    """, "Mom")


@pytest.mark.parametrize("body, message", [
    ("    param W", "`param W` needs a shape: `param W : [a, b]`"),
    ("    memory M : matrix(dim, 0) = zeros never", "a matrix dimension must be a positive whole number, got 0"),
    ("    memory M : matrix(dim, dim) = zeros every 4 tokens in chunks of 0 { objective l2(M(x), x); rule gd }",
     "the chunk size must be a positive whole number, got 0"),
    ("    repeat 2.5 { }", "`repeat` needs a whole number of times, got 2.5"),
    ("    chain c in 5 { }", "`chain` runs over a list, such as [16, 256, 2048]"),
    ("    let y = linear(x, dim, bias = true, bias = false)", "keyword `bias` is given twice"),
])
def test_checker_messages(body, message):
    assert error(block(body)).message == message


def test_input_in_an_optimizer():
    err = error("optimizer O() {\n    param W\n    W -= grad(W)\n    input x : [T]\n}\n")
    assert err.message == "an optimizer has no `input`: it sees `grad(W)`"


# --- chains --------------------------------------------------------------------------------------

CMS = """
    block CMS(dim = 8, chunks = [16, 64, 256]) {
        input x : [T, dim]
        let h = x
        chain c in chunks {
            memory f : mlp(dim) = meta every c tokens in chunks of (2 * c) {
                objective task
                rule gd(lr = 0.1)
            }
            h = f(h)
        }
        output h
    }
"""


def test_chain_builds_one_memory_per_value_with_its_own_frequency():
    checked(CMS, "CMS")


def test_chain_value_reaches_the_frequency_check():
    err = error(CMS.replace("(2 * c)", "(c + 8)"))
    assert err.message == "chunks of 24 tokens never line up with an update every 16 tokens"


def test_long_and_nested_chains_check_fast():
    values = "[" + ", ".join(str(i) for i in range(1, 1001)) + "]"
    text = block(f"    chain a in {values} {{ chain b in {values} {{ chain c in {values} {{"
                 " let y = a + b + c } } }")
    start = time.perf_counter()
    checked(text, "B")
    assert time.perf_counter() - start < 5


def test_empty_chain_body_is_still_checked():
    err = error(block("    chain c in [] { let y = nothere }"))
    assert err.message == "unknown name `nothere`"


# --- silent mistakes a bug hunt found: now errors at load -----------------------------------


@pytest.mark.parametrize(("body", "times"), [
    ("    let h = x\n    if flag { let h = x * 5 }\n    output h", 1),
    ("    let h = x\n    if flag { h = x * 5 }\n    output h", 5),
    ("    let h = x\n    if flag { let h = x * 5\n h = h * 2 }\n    output h", 1),
    ("    let h = x\n    repeat 2 { let h = h * 3 }\n    output h", 1),
    ("    let h = x\n    repeat 2 { h = h * 3 }\n    output h", 9),
    ("    let h = x\n    let z = x\n    repeat 2 { let h = z * 3\n z = h }\n    output z", 9),
    ("    let h = x\n    chain c in [2, 3] { let h = x * c }\n    output h", 1),
    ("    let h = x\n    chain c in [2, 3] { h = h * c }\n    output h", 6),
    # an update before the body's let changes the outer name (it was dropped: the outer name
    # was restored to what it was at the body's start)
    ("    let h = x\n    repeat 3 { h = h * 2\n let h = h + 100\n h = h + 1 }\n    output h", 8),
    ("    let h = x\n    if flag { h = h * 2\n let h = h * 7 }\n    output h", 2),
    ("    let h = x\n    chain c in [2, 3] { h = h * c\n let h = x }\n    output h", 6),
    ("    let s = 2\n    repeat 1 { s = 3\n let s = 10 }\n    output x * s", 3),
])
def test_a_let_in_a_body_is_local_to_it_and_an_update_is_not(body, times):
    """The compiled code left the outer name rebound past the body (a block returned 5 x for
    x): a `let` in an if, repeat or chain body now makes a name of that body, as the checker
    and the docs have it; an update changes the outer one, up to the let."""
    text = "block B(dim = 4, flag = true) {\n    input x : [T, dim]\n" + body + "\n}\n"
    x = torch.randn(1, 3, 4)
    torch.testing.assert_close(nestc.loads(text, "b.nest").build("B")(x), x * times)


@pytest.mark.parametrize(("body", "step"), [
    ("    if flag { let g = grad(W) * 5 }\n    W -= lr * g", 1.0),
    ("    if flag { let g = grad(W) * 5\n W -= lr * g } else { W -= lr * g }", 5.0),
    ("    if ndim(W) >= 1 { let g = g * 3\n W -= lr * g } else { W -= lr * g }\n"
     "    W -= lr * g", 4.0),
    ("    if flag { let g = g * 2\n if flag { let g = g * 3\n W -= lr * g }\n W -= lr * g }\n"
     "    W -= lr * g", 9.0),
    # a let's update (it was refused: "`g` is not a param or memory of this optimizer")
    ("    g *= 2\n    if flag { g += 1 }\n    W -= lr * g", 3.0),
    ("    if flag { g = g * 4\n let g = g + 1\n g = g * 10 }\n    W -= lr * g", 4.0),
    ("    let s = 2\n    if flag { s = s + 1 }\n    W -= lr * s * g", 3.0),
])
@pytest.mark.parametrize("backend", ["auto", "generic"])
def test_a_let_in_an_optimizers_branch_is_local_to_it(body, step, backend):
    """An optimizer's `if` runs on into the statements after it: a `let` of an outer name in
    the branch is renamed there (the step used to read the branch's value: 5 times too far).
    A branch that uses its own `g` (Muon-like orthogonalized steps) still does. An update of
    a let changes it from there on, in the branch and past it, up to a let in the branch."""
    text = ("optimizer O(lr: float = 1.0, flag: bool = true) {\n    param W\n"
            "    let g = grad(W)\n" + body + "\n}\n")
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    nestc.loads(text, "o.nest").build("O", [p], backend=backend).step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -step))


def test_a_block_has_one_output():
    """A second output was dropped (the module returned the last). One in each branch of an
    `if` is one output (a reviewer caught the first version refusing it)."""
    prog = nestc.loads(spec("""
        block Head(dim = 4, gated = false) {
            input x : [T, dim]
            let h = x |> linear(dim)
            if gated { output h * sigmoid(x |> linear(dim)) } else { output h }
        }
    """), "h.nest")
    for gated in (False, True):
        assert prog.build("Head", gated=gated)(torch.randn(1, 2, 4)).shape == (1, 2, 4)
    err = error("""
        block B(dim = 4) {
            input x : [T, dim]
            output x * 2
            output x * 3
        }
    """)
    assert err.message == "block `B` has a second `output`" and err.span.line == 4
    assert err.diagnostics[0].notes[0][1].line == 3


def test_a_cache_takes_only_a_key_and_a_value():
    """An objective, a rule or an initial state on a cache was ignored (explain listed them)."""
    for clauses, init, word in (("key k; value x; objective l2(C(k), x)", "", "objective"),
                                ("key k; value x; rule gd(lr = 0.5)", "", "rule"),
                                ("key k; value x", " = meta", "initial state")):
        err = error(f"""
            block B(dim = 8) {{
                input x : [T, dim]
                let k = x |> linear(dim)
                memory C : cache{init} every token {{ {clauses} }}
                output softmax_attention(k, C)
            }}
        """)
        assert err.span.line == 4 and (word in err.message or word in err.hint or
                                       "takes no initial state" in err.message), err


@pytest.mark.parametrize("name", ["sigmoid", "linear"])
def test_a_let_is_not_called_as_the_builtin_of_its_name(name):
    """`let sigmoid = ...; sigmoid(x)` called the builtin, the let passed over."""
    err = error(block(f"    let {name} = x * 0\n    let y = x |> {name}(8)"
                      if name == "linear" else f"    let {name} = x * 0\n    let y = {name}(x)"))
    assert err.message == f"`{name}` is a `let` here, not a function" and err.span.line == 4
    assert "is a builtin" in err.hint


def test_nestc_train_trains_the_objective_the_model_names():
    """`cross_entropy(logits, tokens)` (no next) and an objective on another name than the
    output were trained as next-token prediction of the output."""
    from nestc.check import next_token_objective

    prog = nestc.loads(spec("""
        model L(vocab = 12, dim = 8) {
            input tokens : [T] int
            output logits = embed(tokens, vocab, dim) |> linear(vocab)
            train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 1) }
        }
    """), "l.nest")
    decl = prog.decl("L").decl
    objective = next(s for s in decl.body if hasattr(s, "frequency") and s.frequency
                     and s.frequency.unit == "step").body[0].value
    assert next_token_objective(decl, objective)
    let_output = nestc.loads(spec("""
        model L(vocab = 12, dim = 8) {
            input tokens : [T] int
            let logits = embed(tokens, vocab, dim) |> linear(vocab)
            output logits
            train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 1) }
        }
    """), "l.nest")  # (`output logits` of a let: a reviewer caught the first version)
    assert let_output.build("L").objective == "next_token"
    for text in ("cross_entropy(logits, tokens)", "cross_entropy(tokens, next(tokens))",
                 "cross_entropy(logits, next(logits))", "l2(logits, next(tokens))"):
        other = nestc.loads(spec(f"""
            model L(vocab = 12, dim = 8) {{
                input tokens : [T] int
                output logits = embed(tokens, vocab, dim) |> linear(vocab)
                train every step {{ objective {text}; rule gd(lr = 1) }}
            }}
        """), "l.nest").decl("L").decl
        value = next(s for s in other.body if hasattr(s, "frequency") and s.frequency
                     and s.frequency.unit == "step").body[0].value
        assert not next_token_objective(other, value), text


def test_an_unknown_escape_in_a_string_is_an_error_not_dropped():
    """"a\\qb" read "aqb"; the escapes are \\" \\\\ \\n and \\t."""
    err = error('block B(dim = 8, act: str = "a\\qb") {\n    input x : [T, dim]\n    output x\n}\n')
    assert err.message == "unknown escape `\\q` in a string" and (err.span.line, err.span.col) \
        == (1, 29)
    decl = checked('block B(dim = 8, s: str = "a\\"b\\\\c\\nd\\te") {\n    input x : [T, dim]\n'
                   '    output x\n}\n', "B")
    assert decl.hypers["s"].default == 'a"b\\c\nd\te'


def test_a_division_by_a_constant_zero_is_an_error():
    """`grad(W) / 0` passed the checker and raised a ZeroDivisionError at the first step. In
    a branch the defaults do not take it is fine (a reviewer's case: `temperature = 0`), and
    so is a period of 0 there."""
    err = error(block("    let y = x / (2 - 2)"))
    assert err.message == "division by zero" and (err.span.line, err.span.col) == (3, 18)
    prog = nestc.loads(spec("""
        block Scaled(dim = 4, temperature = 0.0, period = 0) {
            input x : [T, dim]
            let h = x |> linear(dim)
            if temperature != 0 { h = h / temperature }
            if period > 0 {
                memory M : matrix(dim, dim) = zeros every period tokens {
                    key h; value x; objective l2(M(h), x); rule gd(lr = 0.1)
                }
                h = h + M(h)
            }
            output h
        }
    """), "s.nest")
    x = torch.randn(1, 3, 4)
    assert prog.build("Scaled")(x).shape == prog.build("Scaled", temperature=2.0,
                                                        period=2)(x).shape == (1, 3, 4)


def test_a_memory_named_train_is_a_memory_not_the_train_level():
    """The checker marked the train level's clauses with the owner name "train": a block's
    memory named `train` was refused its `every token` and its key and value (as the train
    level's), and took `every step`, which any other memory name is refused. In a model's
    graph, such a memory and the train level were one node."""
    memory = ("    memory train : matrix(dim, dim) = zeros every {} {{\n"
              "        key x; value x; objective l2(train(x), x); rule gd(lr = 0.1) }}\n")
    text = "block B(dim = 4) {{\n    input x : [T, dim]\n" + memory + \
        "    output train(x)\n}}\n"
    prog = nestc.loads(text.format("token"), "t.nest")
    assert torch.isfinite(prog.build("B")(torch.randn(1, 3, 4))).all()
    err = error(text.format("step"))
    assert err.message == "a memory in a block learns in context, in tokens"
    model = ("model M(vocab = 16, dim = 4) {\n    input tokens : [T] int\n"
             "    let x = embed(tokens, vocab, dim)\n" + memory.format("token") +
             "    output logits = train(x) |> linear(vocab)\n"
             "    train every step { objective cross_entropy(logits, next(tokens))\n"
             "        rule SGD(lr = 0.1) }\n}\n"
             "optimizer SGD(lr = 0.1) {\n    param W\n    W -= lr * grad(W)\n}\n")
    graph = nestc.loads(model, "t.nest").graph("M")
    kinds = {n: k for n, k in graph.nodes(data="kind") if k in ("memory", "train")}
    assert sorted(kinds.values()) == ["memory", "train"], kinds
    [level] = [n for n, k in kinds.items() if k == "train"]
    assert graph.has_edge("x", "train") and not graph.has_edge("x", level)
