"""Fuzzing the front end (loads + check): every input ends in success or a NestError, quickly;
any other exception (RecursionError, IndexError, KeyError, ...) or a hang is a bug.

Deterministic: hypothesis runs derandomized and the mutations use seeded generators, so CI sees
the same thousands of cases every run. Each case has a time limit.
"""

from __future__ import annotations

import random
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, spec_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nestc
from nestc.builtins import BUILTINS
from nestc.errors import KINDS, NestError
from nestc.parse import keywords, parser

CASE_LIMIT_S = 5
MUTATIONS_PER_KIND = 40  # per file and kind of mutation: bounded as the stdlib grows


class CaseTimeout(BaseException):
    """Not an Exception: nothing in nestc may catch and hide it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise CaseTimeout(f"a front-end case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


LARK_NAMES = re.compile(r"\$END|__ANON|\b(?:NAME|NUMBER|STRING|LPAR|RPAR|LSQB|RSQB|LBRACE|"
                        r"RBRACE|UPDATE_OP|COMP_OP|ADD_OP|MUL_OP|NEG_OP|POW_OP|SEMICOLON|COMMA)\b")


def assert_good_report(err: NestError) -> None:
    text = str(err)
    assert err.diagnostics and err.kind in KINDS
    for d in err.diagnostics:
        d.to_json()
        bare = re.sub(r"`[^`]*`", "", d.message + " " + (d.hint or ""))
        assert not LARK_NAMES.search(bare), text
        if d.span is not None:
            assert d.span.line >= 1 and d.span.col >= 1, text
    if err.span is not None:
        assert text.startswith(f"{err.span}: error: "), text


def front_end(text: str, filename: str = "fuzz.nest") -> nestc.Program | None:
    """Load and check `text`; fail the test on anything but success or a good NestError.
    The program, where it loads."""
    with time_limit(CASE_LIMIT_S):
        try:
            prog = nestc.loads(text, filename)
        except NestError as err:
            assert_good_report(err)
            return None
        for name in prog.names:
            prog.decl(name)
        return prog


def run_cases(cases: list[str]) -> None:
    for text in cases:
        try:
            front_end(text)
        except (AssertionError, CaseTimeout):
            raise
        except BaseException as err:  # noqa: BLE001 - report the input that broke the front end
            raise AssertionError(f"{type(err).__name__}: {err}\ninput:\n{text[:2000]!r}") from err


# --- the vocabulary of the language ----------------------------------------------------------------

KEYWORDS = sorted(keywords())
OPERATORS = sorted({t.pattern.value for t in parser().terminals
                    if t.pattern.type == "str" and not t.pattern.value.isalpha()}
                   | {"+", "-", "*", "/", "%", "@", "**", "==", "!=", "<", ">", "<=", ">=",
                      "=", "+=", "-=", "*=", "/="})
NAMES = ["W", "x", "M", "m", "k", "v", "q", "g", "h", "lr", "dim", "heads", "chunk", "beta",
         "Adam", "AdamW", "SGD", "D", "c", "T", *sorted(BUILTINS)]
LITERALS = ["0", "1", "2", "16", "64", "0.5", "1e-3", "1e999", "10 ** 10 ** 10", "9" * 30,
            '"s"', '"std/optim/adam.nest"', '"missing.nest"', '"std/../x.nest"', "true", "false"]
VOCAB = KEYWORDS + OPERATORS + NAMES + LITERALS + ["\n", ";", "#", "'", "&&", "\t"]

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@SETTINGS
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    front_end(text)


@settings(SETTINGS, max_examples=1200)
@given(st.lists(st.sampled_from(VOCAB), max_size=60))
def test_token_soup(tokens):
    front_end(" ".join(tokens))


@settings(SETTINGS, max_examples=600)
@given(st.lists(st.sampled_from(VOCAB), max_size=40), st.sampled_from(
    ["optimizer O(lr = 0.1) {{ param W\n{} }}", "block B(dim = 8) {{ input x : [T, dim]\n{} }}",
     "model L(v = 8) {{ input t : [T] int\n{} }}", "{}"]))
def test_token_soup_inside_a_declaration(tokens, template):
    front_end(template.format(" ".join(tokens)))


# --- structured specs that mostly parse, to reach the checker ------------------------------------

# mostly names a declaration defines (see PRELUDES) and sound numbers, sometimes anything
names = st.sampled_from(["W", "g", "x", "k", "v", "q", "M", "m", "lr", "dim", "c"] * 4 + NAMES)
atoms = st.one_of(names, st.sampled_from(["1", "2", "4", "16", "0.5", "1e-3", "true"] * 3
                                         + LITERALS), st.integers(0, 300).map(str),
                  st.floats(allow_nan=False, allow_infinity=False).map(repr))


def compound(e):
    args = st.lists(e, max_size=3)
    kwargs = st.lists(st.tuples(names, e).map(lambda p: f"{p[0]} = {p[1]}"), max_size=2)
    return st.one_of(
        st.tuples(e, st.sampled_from(["+", "-", "*", "/", "**", "%", "@", "<", "==", "and", "or"]),
                  e).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["-", "not "]), e).map("".join),
        st.tuples(names, args, kwargs).map(lambda t: f"{t[0]}({', '.join(t[1] + t[2])})"),
        st.tuples(e, names).map(lambda t: f"({t[0]} |> {t[1]})"),
        st.tuples(e, e).map(lambda t: f"({t[0]})[{t[1]}]"),
        st.tuples(names, names).map(lambda t: f"{t[0]}.{t[1]}"),
        args.map(lambda a: f"[{', '.join(a)}]"),
        args.map(lambda a: f"({', '.join(a)}{',' if len(a) == 1 else ''})"),
        st.tuples(e, e, e).map(lambda t: f"(if {t[0]} then {t[1]} else {t[2]})"),
    )


exprs = st.recursive(atoms, compound, max_leaves=8)
amounts = st.one_of(st.sampled_from(["1", "4", "16", "c", "dim", "0", "x"]),
                    exprs.map(lambda e: f"({e})"))
frequencies = st.one_of(
    st.sampled_from(["every token", "every step", "never", ""]),
    st.tuples(amounts, st.sampled_from(["tokens", "steps"])).map(lambda t: f"every {t[0]} {t[1]}"),
    st.tuples(amounts, amounts).map(lambda t: f"every {t[0]} tokens in chunks of {t[1]}"),
    amounts.map(lambda a: f"every token in chunks of {a}"),
)
clauses = st.one_of(
    st.tuples(st.sampled_from(["key", "value", "query", "objective", "rule"]), exprs).map(" ".join),
    st.sampled_from(["read before write", "backprop stopped", "state shared", "state per sample",
                     "partial chunk carry", "dgd literal", "objective task", "rule gd",
                     "rule Adam(lr = 0.1)", "rule A.Adam", "rule D", "objective l2(M(k), v)",
                     "rule gd(lr = lr, retain = 0.9)", "rule momentum(beta = 0.9)"]),
)


def statements(inner):
    body = st.lists(inner, max_size=3).map(lambda b: "{ " + "; ".join(b) + " }")
    return st.one_of(
        st.tuples(names, exprs).map(lambda t: f"let {t[0]} = {t[1]}"),
        st.tuples(names, st.sampled_from(["=", "+=", "-=", "*="]), exprs).map(" ".join),
        st.tuples(names, st.lists(atoms, max_size=3)).map(
            lambda t: f"param {t[0]} : [{', '.join(t[1])}];"),
        st.just("param W"),
        st.tuples(names, st.lists(atoms, max_size=3), st.sampled_from(["", "int", "float"])).map(
            lambda t: f"input {t[0]} : [{', '.join(t[1])}] {t[2]};"),
        st.tuples(names, st.sampled_from(["", ": matrix(dim, dim)", ": mlp(dim)", ": cache",
                                          ": matrix(0, 1)", ": like(W)"]),
                  st.sampled_from(["", "per head"]),
                  st.sampled_from(["", "= zeros", "= meta", "= zeros_like(W)", "= from g"]),
                  frequencies, st.lists(clauses, max_size=4)).map(
            lambda t: f"memory {t[0]} {t[1]} {t[2]} {t[3]} {t[4]} {{ {'; '.join(t[5])} }}"),
        exprs.map(lambda e: f"output {e}"),
        st.tuples(exprs, body).map(lambda t: f"repeat {t[0]} {t[1]}"),
        st.tuples(names, exprs, body).map(lambda t: f"chain {t[0]} in {t[1]} {t[2]}"),
        st.tuples(exprs, body, body).map(lambda t: f"if {t[0]} {t[1]} else {t[2]}"),
        st.tuples(frequencies, st.lists(clauses, max_size=3)).map(
            lambda t: f"train {t[0]} {{ {'; '.join(t[1])} }}"),
        clauses,
    )


stmts = st.recursive(statements(st.just("let z = 1")), statements, max_leaves=8)
defaults = st.one_of(st.sampled_from(["", "= 1", "= 0.5", "= (0.9, 0.99)", "= [16, 64]",
                                     "= true", "= dim * 2", '= "s"']), exprs.map(lambda e: f"= {e}"))
params = st.lists(st.tuples(st.sampled_from(["heads", "chunk", "beta", "n", "lr"]),
                            st.sampled_from(["", ": float", ": int", ": (float, float)",
                                             ": list[int]", ": bool", ": flaot"]),
                            defaults), max_size=3, unique_by=lambda p: p[0]).map(
    lambda ps: [" ".join(p) for p in ps])
PRELUDES = {  # names the statements mostly use, defined the way each kind defines them
    "optimizer": "param W\n    let g = grad(W)\n",
    "block": "input x : [T, dim];\n    let k = x; let v = x; let q = x\n",
    "model": "input x : [T] int;\n    let k = x; let v = x; let q = x\n",
}
decls = st.tuples(params, st.lists(stmts, max_size=8))


def declaration(name: str, kind: str, params: list[str], body: list[str]) -> str:
    head = f"{kind} {name}(dim = 8, c = 4, {', '.join(params)})"
    return head + " {\n    " + PRELUDES[kind] + "\n    ".join(body) + "\n}\n"


imports = st.sampled_from(['import "std/optim/adam.nest"', 'from "std/optim/sgd.nest" import SGD',
                           'import "std/optim/adam.nest" as A', 'import "missing.nest"',
                           'from "std/optim/adam.nest" import Nope', 'import "std/../x.nest"',
                           'from "std/optim/adam.nest" import Adam', ""])


@pytest.mark.parametrize("kind", sorted(PRELUDES))
@settings(SETTINGS, max_examples=300)
@given(imps=st.lists(imports, max_size=2), ds=st.lists(decls, min_size=1, max_size=3))
def test_structured_specs(kind, imps, ds):
    named = [declaration(f"D{i}" if i else "D", kind, *d) for i, d in enumerate(ds)]
    front_end("\n".join(imps) + "\n" + "\n".join(named))


# --- deterministic mutations of every spec in the repository -------------------------------------

INSERTS = [*KEYWORDS, "(", ")", "[", "]", "{", "}", ",", ";", "=", "|>", "**", '"', "#", "\n",
           "\x00", "\u00e9", "\U0001f600", "'", "&&", "every", "1e999", "-"]


def mutations(text: str, kind: str, rng: random.Random) -> list[str]:
    lines = text.split("\n")
    n = MUTATIONS_PER_KIND

    def sample(count: int) -> list[int]:
        return sorted(rng.sample(range(count), min(n, count))) if count else []

    if kind == "delete_line":
        return ["\n".join(lines[:i] + lines[i + 1:]) for i in sample(len(lines))]
    if kind == "duplicate_line":
        return ["\n".join(lines[:i + 1] + lines[i:]) for i in sample(len(lines))]
    if kind == "truncate":
        step = max(1, len(text) // n)
        return [text[:k] for k in range(0, len(text), step)]
    if kind == "swap":
        return [text[:i] + text[i + 1] + text[i] + text[i + 2:] for i in sample(len(text) - 1)]
    if kind == "replace":
        return [text[:i] + chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x2FFF)]))
                + text[i + 1:] for i in sample(len(text))]
    if kind == "insert":
        return [text[:i] + f" {rng.choice(INSERTS)} " + text[i:] for i in sample(len(text))]
    if kind == "word_swap":
        words = sorted(set(re.findall(r"[A-Za-z_]\w*", text)))
        out = []
        for _ in range(n):
            a, b = rng.choice(words), rng.choice(words + KEYWORDS)
            out.append(re.sub(rf"\b{re.escape(a)}\b", b, text, count=rng.randrange(1, 3)))
        return out
    raise AssertionError(kind)


KINDS_OF_MUTATION = ["delete_line", "duplicate_line", "truncate", "swap", "replace", "insert",
                     "word_swap"]


@pytest.mark.parametrize("path", spec_files(), ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("kind", KINDS_OF_MUTATION)
def test_mutated_specs(path: Path, kind: str):
    text = path.read_text()
    run_cases(mutations(text, kind, random.Random(f"{path.name}:{kind}")))


def test_original_specs_load():
    for path in spec_files():
        front_end(path.read_text(), str(path))


# --- pathological inputs -------------------------------------------------------------------------

OPT = "optimizer O(lr = 0.1) {{\n    param W\n    let x = {}\n    W -= lr * grad(W)\n}}\n"

PATHOLOGICAL = {
    "parens": "(" * 10_000,
    "brackets": "[" * 5000,
    "braces": "{" * 3000,
    "closers": ")]}" * 3000,
    "deep_expression": OPT.format("(" * 150 + "1" + ")" * 150),
    "sum_50k_terms": OPT.format("+".join(["1"] * 50_000)),
    "attribute_chain_100k": OPT.format("a" + ".b" * 100_000),
    "huge_float": OPT.format("1e999999"),
    "power_tower": OPT.format("10 ** 10 ** 10"),
    "power_chain": OPT.format("((((2 ** 64) ** 64) ** 64) ** 64) ** 64"),
    "integer_5000_digits": OPT.format("7" * 5000),
    "default_5000_digits": "optimizer O(lr = " + "7" * 5000 + ") { param W\n W -= grad(W) }",
    "long_line": OPT.format("W" + " + W" * 100) * 50,
    "many_declarations": "".join(OPT.replace("O(", f"O{i}(") for i in range(500)),
    "nested_blocks": "block B() { input x : [T]\n" + "if true { " * 120 + "}" * 120 + "}",
    "nested_memories": "block B() {" + "memory M = zeros every token { " * 100 + "}" * 101,
    "else_if_chain": "block B() { if a { } " + "else if a { } " * 3000 + "}",
    "long_list": OPT.format("[" + ", ".join(["1"] * 20_000) + "]"),
    "long_chain_values": "block B() { chain c in [" + ", ".join(map(str, range(5000))) + "] { } }",
    "empty": "",
    "only_comments": "# one\n# two (\n   # three [ {\n",
    "only_whitespace": " \t\n\r\n\f ",
    "nul_bytes": "block B() {\x00}" + "\x00" * 100,
    "binary_junk": bytes(random.Random(0).randrange(256) for _ in range(4000)).decode("latin-1"),
    "unicode_names": OPT.format("\u00e9t\u00e9 + \u0394"),
    "unterminated_string": 'import "std/optim/adam.nest',
    "crlf_line_ends": OPT.replace("\n", "\r\n"),
    "lone_surrogate_escape": OPT.format('"\\ud800"'),
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological(name):
    run_cases([PATHOLOGICAL[name]])


@pytest.mark.parametrize("data", [
    b"\xff\xfe\x00b\x00l\x00o\x00c\x00k", b"optimizer O() {\n  param W \xc3\x28\n}\n",
    b"\xed\xa0\x80", b"\xc0\xaf", bytes(range(256)), b"", b"# only a comment\n",
    b"\xef\xbb\xbfoptimizer O(lr = 0.1) { param W\n W -= lr * grad(W) }\n",
])
def test_files_that_are_not_clean_utf8(tmp_path, data):
    path = tmp_path / "spec.nest"
    path.write_bytes(data)
    with time_limit(CASE_LIMIT_S):
        try:
            nestc.load(path)
        except NestError as err:
            assert_good_report(err)


# --- mutated blocks and models, built and run: the compiler's errors too -----------------------

BUILDS_PER_KIND = 5  # per file and kind of mutation (bounded: each builds and runs a module)
SMALL = {"dim": 8, "vocab": 12, "depth": 1, "heads": 2}


def build_and_run(text: str, filename: str) -> None:
    """Load, build every block and model at small sizes and run it on a few tokens; fail on
    anything but success or a good NestError."""
    torch = pytest.importorskip("torch")
    prog = front_end(text, filename)
    if prog is None:
        return
    with time_limit(30):
        for name in prog.names:
            try:
                checked = prog.decl(name)
                if checked.kind not in ("block", "model"):
                    continue
                mod = prog.build(name, **{h: v for h, v in SMALL.items() if h in checked.hypers})
                x = torch.randint(0, 12, (1, 5)) if checked.kind == "model" else \
                    torch.randn(1, 5, 8)
                task = (lambda y, a, b: y.pow(2).sum()) if mod.tasks and \
                    checked.kind == "block" else None
                mod(x, task=task)
            except NestError as err:
                assert_good_report(err)


@pytest.mark.parametrize("path", [p for p in spec_files()
                                  if re.search(r"^(block|model) ", p.read_text(), re.M)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_mutated_blocks_build_or_fail_with_a_report(path: Path):
    text = path.read_text()
    for kind in KINDS_OF_MUTATION:
        rng = random.Random(f"{path.name}:{kind}:build")
        cases = mutations(text, kind, rng)
        rng.shuffle(cases)
        for case in cases[:BUILDS_PER_KIND]:
            try:
                build_and_run(case, path.name)
            except (AssertionError, CaseTimeout):
                raise
            except BaseException as err:  # noqa: BLE001 - report the input that broke it
                raise AssertionError(f"{type(err).__name__}: {err}\ninput:\n{case[:2000]!r}") \
                    from err
