"""The parser: text -> AST with spans, for every construct of the grammar; the limits that keep
later (recursive) stages safe; every spec in the repository parses."""

from __future__ import annotations

import pytest
from conftest import ROOT, spec, spec_files

from nestc import ast
from nestc.errors import NestError
from nestc.parse import MAX_DEPTH, parse_text


def body_of(text: str) -> tuple:
    return parse_text(f"block B(d = 1) {{\n{text}\n}}\n").decls[0].body


def expr_of(text: str) -> ast.Expr:
    (let,) = body_of(f"let e = {text}")
    return let.value


def shape(e) -> object:
    """An expression as nested tuples, without spans: easy to compare."""
    if isinstance(e, ast.ExprNumber):
        return e.value
    if isinstance(e, ast.ExprString):
        return ("str", e.value)
    if isinstance(e, ast.ExprBool):
        return e.value
    if isinstance(e, ast.ExprName):
        return e.name
    if isinstance(e, ast.ExprBinary):
        return (e.op, shape(e.left), shape(e.right))
    if isinstance(e, ast.ExprUnary):
        return (e.op, shape(e.operand))
    if isinstance(e, ast.ExprCall):
        kw = tuple((k.name, shape(k.value)) for k in e.kwargs)
        return ("call" + "|>" * e.piped, shape(e.func), tuple(map(shape, e.args)), kw)
    if isinstance(e, ast.ExprIndex):
        return ("index", shape(e.base), tuple(map(shape, e.index)))
    if isinstance(e, ast.ExprAttr):
        return ("attr", shape(e.base), e.name)
    if isinstance(e, ast.ExprCond):
        return ("if", shape(e.cond), shape(e.then), shape(e.orelse))
    if isinstance(e, ast.ExprTuple):
        return ("tuple", *map(shape, e.items))
    if isinstance(e, ast.ExprList):
        return ("list", *map(shape, e.items))
    raise AssertionError(type(e).__name__)


@pytest.mark.parametrize("path", spec_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_spec_in_the_repository_parses(path):
    module = parse_text(path.read_text(), str(path))
    assert module.decls or module.imports
    for d in module.decls:
        assert d.kind in ("optimizer", "block", "model")
        assert d.span.file == str(path) and d.name_span.line >= 1


@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3", ("+", 1, ("*", 2, 3))),
    ("(1 + 2) * 3", ("*", ("+", 1, 2), 3)),
    ("1 - 2 - 3", ("-", ("-", 1, 2), 3)),
    ("2 ** 3 ** 2", ("**", 2, ("**", 3, 2))),
    ("-2 ** 2", ("-", ("**", 2, 2))),
    ("2 ** -1", ("**", 2, ("-", 1))),
    ("a @ b % c / d", ("/", ("%", ("@", "a", "b"), "c"), "d")),
    ("a < b and not c or d", ("or", ("and", ("<", "a", "b"), ("not", "c")), "d")),
    ("a == b != c" if False else "a != b", ("!=", "a", "b")),
    ("if a then 1 else 2", ("if", "a", 1, 2)),
    ("x |> f", ("call|>", "f", ("x",), ())),
    ("x |> f(1, k = 2) |> g", ("call|>", "g", (("call|>", "f", ("x", 1), (("k", 2),)),), ())),
    ("a + b |> f", ("call|>", "f", (("+", "a", "b"),), ())),
    ("f(x)(y)", ("call", ("call", "f", ("x",), ()), ("y",), ())),
    ("m.w[0, 1].t", ("attr", ("index", ("attr", "m", "w"), (0, 1)), "t")),
    ("()", ("tuple",)),
    ("(1,)", ("tuple", 1)),
    ("(1)", 1),
    ("(1, 2,)", ("tuple", 1, 2)),
    ("[]", ("list",)),
    ("[1, [2.5, true], false,]", ("list", 1, ("list", 2.5, True), False)),
    ('"a\\"b\\n\\\\"', ("str", 'a"b\n\\')),
    ("1e-3", 1e-3), (".5", 0.5), ("5.", 5.0), ("007", 7), ("1E3", 1000.0),
])
def test_expressions(text, expected):
    assert shape(expr_of(text)) == expected


def test_numbers_keep_their_type_and_text():
    e = expr_of("1.50")
    assert (e.value, e.text, type(expr_of("3").value)) == (1.5, "1.50", int)


def test_spans_are_one_based_and_exclusive_at_the_end():
    (let,) = body_of("  let y = a +\n      bb")
    assert (let.span.line, let.span.col, let.span.end_line, let.span.end_col) == (2, 3, 3, 9)
    assert (let.name_span.line, let.name_span.col, let.name_span.end_col) == (2, 7, 8)
    assert (let.value.right.span.line, let.value.right.span.col) == (3, 7)


def test_imports():
    m = parse_text(spec("""
        import "std/optim/adam.nest"
        import "a.nest" as A
        from "b.nest" import X, Y,
    """))
    assert [(i.path, i.alias, i.names) for i in m.imports] == [
        ("std/optim/adam.nest", None, None), ("a.nest", "A", None), ("b.nest", None, ("X", "Y"))]
    assert (m.imports[1].path_span.col, m.imports[1].path_span.end_col) == (8, 16)


def test_declaration_and_typed_hyperparameters():
    m = parse_text('model M(a, b: int = 4, c: (float, float) = (1.0, 2.0), d: list[int] = [1]) {}')
    (d,) = m.decls
    assert (d.kind, d.name, d.body) == ("model", "M", ())
    assert [(p.name, str(p.type) if p.type else None) for p in d.params] == [
        ("a", None), ("b", "int"), ("c", "(float, float)"), ("d", "list[int]")]
    assert d.params[0].default is None and shape(d.params[2].default) == ("tuple", 1.0, 2.0)


def test_statements():
    body = body_of(spec("""
        param W, V : [d, 2 * d] float = zeros
        input x : [T, d]
        let y = x
        x[0, 1] += 1; ;
        if a { } else if b { let z = 1 } else { }
        repeat 3 { }
        chain c in [1, 2] { }
        output o = y
        output y
        W -= 1
    """))
    kinds = [type(s).__name__ for s in body]
    assert kinds == ["StmtParam", "StmtInput", "StmtLet", "StmtUpdate", "StmtIf", "StmtRepeat",
                     "StmtChain", "StmtOutput", "StmtOutput", "StmtUpdate"]
    param, inp, _, upd, cond, _, chain, named, anon, minus = body
    assert param.names == ("W", "V") and param.shape.dtype == "float"
    assert [shape(x) for x in param.shape.dims] == ["d", ("*", 2, "d")]
    assert inp.shape.dtype is None
    assert (upd.target, upd.op, [shape(i) for i in upd.index]) == ("x", "+=", [0, 1])
    assert isinstance(cond.orelse[0], ast.StmtIf) and len(cond.orelse[0].then) == 1
    assert (chain.var, shape(chain.values)) == ("c", ("list", 1, 2))
    assert (named.name, anon.name, minus.op, minus.index) == ("o", None, "-=", None)


def test_memory_with_every_part():
    (m,) = body_of(spec("""
        memory M : matrix(d, d) per head = from y every 4 tokens in chunks of 8 {
            read before write; backprop stopped; state shared; state per sample
            partial chunk carry; dgd literal
            key k; value v; query q; objective l2(M(k), v); rule gd(lr = 0.1)
        }
    """))
    assert (m.name, m.per_head, shape(m.structure)) == ("M", True, ("call", "matrix", ("d", "d"), ()))
    assert shape(m.init) == ("call", "from", ("y",), ())
    assert (m.frequency.unit, shape(m.frequency.every), shape(m.frequency.chunk)) == ("token", 4, 8)
    assert [(c.kind, c.value if isinstance(c.value, str) else shape(c.value)) for c in m.body] == [
        ("read", "before write"), ("backprop", "stopped"), ("state", "shared"),
        ("state", "per sample"), ("partial", "carry"), ("dgd", "literal"), ("key", "k"),
        ("value", "v"), ("query", "q"), ("objective", ("call", "l2", (("call", "M", ("k",), ()), "v"), ())),
        ("rule", ("call", "gd", (), (("lr", 0.1),)))]


@pytest.mark.parametrize("text, unit, every, chunk", [
    ("every token", "token", None, None),
    ("every token in chunks of 64", "token", None, 64),
    ("every 16 tokens", "token", 16, None),
    ("every (2 * c) tokens in chunks of c", "token", ("*", 2, "c"), "c"),
    ("every step", "step", None, None),
    ("every 100 steps", "step", 100, None),
    ("every k steps", "step", "k", None),
    ("never", "never", None, None),
])
def test_frequencies(text, unit, every, chunk):
    (m,) = body_of(f"memory M = zeros {text}")
    f = m.frequency
    assert (f.unit, f.every and shape(f.every), f.chunk and shape(f.chunk)) == (unit, every, chunk)


def test_a_memory_without_frequency_or_body():
    (m,) = body_of("memory M : cache")
    assert (m.frequency, m.body, m.init, m.per_head) == (None, (), None, False)


def test_train_level():
    m = parse_text("model M() { train every 2 steps { objective task; rule gd } }")
    (train,) = m.decls[0].body
    assert isinstance(train, ast.StmtTrain) and shape(train.frequency.every) == 2


def test_empty_file_and_only_comments():
    assert parse_text("").decls == ()
    assert parse_text("# nothing here\n   \n# ( [ {\n").decls == ()


def test_comments_and_semicolons_are_ignored():
    a = body_of("let x = 1 # one\n;; let y = 2")
    b = body_of("let x = 1\nlet y = 2")
    assert [shape(s.value) for s in a] == [shape(s.value) for s in b]


def test_index_takes_no_keywords():
    with pytest.raises(NestError, match="an index takes no `k = ...`"):
        expr_of("x[k = 1]")


# --- limits --------------------------------------------------------------------------------------


def test_deep_expression_is_a_clear_error():
    with pytest.raises(NestError) as info:
        expr_of(" + ".join(["1"] * 50_000))
    err = info.value
    assert err.kind == "syntax" and err.span.line == 2
    assert err.message == f"the spec nests expressions and blocks more than {MAX_DEPTH} levels deep"
    assert err.hint == "split long expressions into steps with `let` bindings"


@pytest.mark.parametrize("text", [
    "a" + ".b" * 100_000, "-" * 5000 + "1", "not " * 5000 + "x", "x" + " |> f" * 3000,
    "f" + "(1)" * 3000, "x" + "[1]" * 3000, "if a then 1 else " * 2000 + "1",
    " ** ".join(["2"] * 3000), " and ".join(["a"] * 5000),
])
def test_long_chains_are_errors_not_crashes(text):
    with pytest.raises(NestError, match="more than 200 levels deep"):
        expr_of(text)


def test_long_but_reasonable_expressions_parse():
    e = expr_of(" + ".join(["x"] * 150))
    depth = 0
    while isinstance(e, ast.ExprBinary):
        e, depth = e.left, depth + 1
    assert depth == 149


@pytest.mark.parametrize("opener", ["(", "[", "{"])
def test_deep_brackets(opener):
    with pytest.raises(NestError) as info:
        parse_text("block B() { let x = " + opener * 10_000)
    assert info.value.message == "brackets nested deeper than 200 levels"


def test_brackets_in_comments_and_strings_do_not_count():
    text = "# " + "(" * 500 + "\nblock B() { let s = \"" + "[" * 500 + "\" }\n"
    assert parse_text(text).decls[0].name == "B"


@pytest.mark.parametrize("text, message", [
    ("9" * 5000, "integer literal is too large"),  # past Python's int-from-string limit
    ("1" + "0" * 101, "integer literal is too large"),
    ("1e999999", "number is too large for a float"),
    ("1.5e309", "number is too large for a float"),
])
def test_number_limits(text, message):
    with pytest.raises(NestError) as info:
        expr_of(text)
    assert info.value.message == message and info.value.span.col == 9


def test_tiny_numbers_and_leading_zeros():
    assert expr_of("1e-999999").value == 0.0
    assert expr_of("0" * 300 + "1").value == 1


def test_nul_byte():
    with pytest.raises(NestError) as info:
        parse_text("block B() {\n  let x\x00 = 1 }", "n.nest")
    assert str(info.value) == spec("""
        n.nest:2:8: error: binary data in a spec (a NUL byte)
           2 |   let x\ufffd = 1 }
             |        ^
          hint: a .nest file is UTF-8 text
    """).rstrip("\n")


def test_file_size_limit():
    with pytest.raises(NestError, match="file is larger than 1024 KiB"):
        parse_text("#" * (1 << 21))
