"""Text -> AST. Builds the Lark LALR parser once and turns every Lark error into a NestError."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import lark
from lark import Token, Transformer_NonRecursive, Tree, v_args

from nestc import ast
from nestc.errors import NestError, nearest
from nestc.source import Source, Span, point

MAX_SOURCE_BYTES = 1 << 20
MAX_NESTING = 200
# Later stages walk the AST recursively: bound its depth well below Python's recursion limit.
MAX_DEPTH = 200
MAX_INT_DIGITS = 100


def grammar_path() -> Path:
    """The grammar shipped inside the wheel, or the repository's when running from a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "grammar" / "nest.lark", here.parent / "grammar" / "nest.lark"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("nest.lark not found beside the nestc package")


@functools.lru_cache(maxsize=1)
def parser() -> lark.Lark:
    return lark.Lark(
        grammar_path().read_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        cache=True,
    )


@functools.lru_cache(maxsize=1)
def _terminal_words() -> dict[str, str]:
    """Each terminal's name -> the words a user reads for it."""
    words = {
        "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "$END": "the end of the file",
        "UPDATE_OP": "an assignment (`=`, `+=`, `-=`)",
        "COMP_OP": "a comparison", "ADD_OP": "`+` or `-`", "MUL_OP": "`*` or `/`",
        "NEG_OP": "`-`", "POW_OP": "`**`", "TOKENS": "`tokens`", "STEPS": "`steps`",
    }
    for term in parser().terminals:
        if term.name not in words and isinstance(term.pattern, lark.lexer.PatternStr):
            words[term.name] = f"`{term.pattern.value}`"
    return words


_EXPR_START = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "NEG_OP", "TRUE", "FALSE", "NOT", "IF"}
_STMT_START = {"PARAM", "INPUT", "LET", "MEMORY", "OUTPUT", "REPEAT", "CHAIN", "TRAIN", "KEY"}
_OPERATORS = {"ADD_OP", "MUL_OP", "POW_OP", "COMP_OP", "AND", "OR", "LPAR", "LSQB", "DOT",
              "__ANON_0", "PIPE", "VBAR"}
_KEYWORDS = (
    "import", "from", "as", "optimizer", "block", "model", "param", "input", "let", "memory",
    "output", "repeat", "chain", "if", "else", "then", "train", "key", "value", "query",
    "objective", "rule", "read", "write", "backprop", "state", "partial", "chunk", "dgd", "every",
    "token", "tokens", "step", "steps", "never", "in", "chunks", "of", "per", "head",
)
FREQUENCY_FORMS = "`every token`, `every N tokens`, `every step`, `every N steps` or `never`"


def describe_expected(expected: set[str]) -> str:
    words = _terminal_words()
    names = set(expected)
    parts: list[str] = []
    if _STMT_START <= names:
        parts.append("a statement")
        names -= _STMT_START | {"VALUE", "QUERY", "OBJECTIVE", "RULE", "READ", "BACKPROP",
                                "STATE", "PARTIAL", "DGD", "IF", "NAME", "SEMICOLON"}
    if names >= {"NAME", "NUMBER", "LPAR"}:
        parts.append("an expression")
        names -= _EXPR_START
    if names & _OPERATORS and len(names) > 3:
        parts.append("an operator")
        names -= _OPERATORS
    listed = sorted(words.get(n, n.lower()) for n in names)
    if len(listed) > 6:
        listed = listed[:6] + ["..."]
    parts.extend(listed)
    if not parts:
        return "something else"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def _word_before(text: str, pos: int) -> str | None:
    m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", text[:pos])
    return m.group(1) if m else None


def _starts_statement(text: str, pos: int, word: str) -> bool:
    """Whether `word`, which ends just before pos, is the first word of a statement."""
    start = text.rstrip()[:pos].rfind(word)
    head = text[:start].rstrip()
    return head == "" or head[-1] in "{};"


def _frequency_hint(text: str, pos: int, bad: str) -> str | None:
    """Hints for a malformed frequency, from the words just before the error."""
    before = text[max(0, pos - 80):pos]
    m = re.search(r"every\s+([A-Za-z_0-9.()]+)?\s*$", before)
    if not m:
        return None
    amount = m.group(1)
    if amount in ("tokens", "steps"):
        return f"did you mean `every {amount[:-1]}`?"
    if amount is None:
        if bad in ("tokens", "steps"):
            return f"did you mean `every {bad[:-1]}`?"
        return f"a frequency is {FREQUENCY_FORMS}"
    if bad in ("token", "step"):
        return f"did you mean `every {amount} {bad}s`?"
    return f"did you mean `every {amount} tokens` or `every {amount} steps`?"


def _syntax_error(source: Source, err: lark.exceptions.LarkError) -> NestError:
    text = source.text
    if isinstance(err, lark.UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        span = point(source, err.line, err.column)
        shown = repr(char)[1:-1] if char.isprintable() else f"\\x{ord(char):02x}" if ord(char) < 256 else f"U+{ord(char):04X}"
        hint = None
        if char == "'":
            hint = 'strings use double quotes: "..."'
        elif char in "!&|":
            hint = "operators are +, -, *, /, **, @, |>, ==, !=, <, >, and, or, not"
        return NestError(f"unexpected character `{shown}`", span, kind="syntax", hint=hint)
    if isinstance(err, lark.UnexpectedToken):
        tok: Token = err.token
        expected = describe_expected(set(err.expected))
        if tok.type == "$END":
            lines = source.lines
            line = len(lines)
            span = point(source, line, len(lines[-1]) + 1)
            missing = "RBRACE" in err.expected
            return NestError("unexpected end of file" if missing else
                             f"unexpected end of file, expected {expected}", span, kind="syntax",
                             hint="a `{` may be missing its `}`" if "RBRACE" in err.expected else None)
        span = Span(source, tok.line or 1, tok.column or 1,
                    tok.end_line or tok.line or 1, tok.end_column or (tok.column or 1) + 1)
        shown = str(tok).replace("\n", " ")
        if len(shown) > 30:
            shown = shown[:27] + "..."
        pos = tok.start_pos or 0
        hint = _frequency_hint(text, pos, str(tok))
        if hint is None and tok.type == "NAME":
            words = _terminal_words()
            allowed = [words[n].strip("`") for n in err.expected
                       if words.get(n, "").strip("`") in _KEYWORDS]
            close = nearest(str(tok), allowed, limit=1)
            if close and close[0] != str(tok):
                hint = f"did you mean `{close[0]}`?"
        if hint is None:
            prev = _word_before(text, pos)
            if prev and prev not in _KEYWORDS and _starts_statement(text, pos, prev):
                close = nearest(prev, _KEYWORDS, limit=1)
                if close:
                    hint = f"`{prev}` is not a keyword: did you mean `{close[0]}`?"
        if hint is None and "RPAR" in err.expected and tok.type in ("NAME", "NUMBER"):
            hint = "a `,` may be missing between arguments"
        return NestError(f"unexpected `{shown}`, expected {expected}", span, kind="syntax", hint=hint)
    if isinstance(err, lark.UnexpectedEOF):
        lines = source.lines
        return NestError("unexpected end of file", point(source, len(lines), len(lines[-1]) + 1),
                         kind="syntax")
    raise err


def _span(source: Source, meta: Any) -> Span:
    if getattr(meta, "empty", True):
        return point(source, 1, 1)
    return Span(source, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(source: Source, tok: Token) -> Span:
    return Span(source, tok.line or 1, tok.column or 1, tok.end_line or 1, tok.end_column or 1)


def _number(text: str) -> float | int:
    if re.fullmatch(r"\d+", text):
        return int(text)
    return float(text)


def _unescape(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
    """Lark tree -> ast nodes; every node gets the span of its rule match. Non-recursive, so a
    long expression cannot exhaust the Python stack here."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source

    def s(self, meta: Any) -> Span:
        return _span(self.source, meta)

    # files and declarations
    def start(self, meta, items):
        imports = tuple(i for i in items if isinstance(i, ast.Import))
        decls = tuple(i for i in items if isinstance(i, ast.Decl))
        return ast.Module(self.source.name, imports, decls, self.s(meta))

    def import_file(self, meta, ch):
        # `("as" NAME)?` is optional without a placeholder: the alias is absent, not None
        path, alias = ch[0], (ch[1] if len(ch) > 1 else None)
        return ast.Import(_unescape(path), str(alias) if alias else None, None, self.s(meta),
                          _tok_span(self.source, path))

    def import_names(self, meta, ch):
        path, *names = ch
        return ast.Import(_unescape(path), None, tuple(str(n) for n in names), self.s(meta),
                          _tok_span(self.source, path))

    def _word(self, meta, ch):
        return ch[0]

    decl_kind = read_when = backprop_mode = partial_mode = dgd_mode = _word

    def decl(self, meta, ch):
        kind, name, params, body = ch
        return ast.Decl(str(kind), str(name), tuple(params or ()), body, self.s(meta),
                        _tok_span(self.source, name))

    def params(self, meta, ch):
        return tuple(ch)

    def param(self, meta, ch):
        name, type_ann, default = ch
        return ast.Param(str(name), type_ann, default, self.s(meta))

    def type_name(self, meta, ch):
        return ast.TypeAnn(str(ch[0]), (), self.s(meta))

    def type_generic(self, meta, ch):
        return ast.TypeAnn(str(ch[0]), tuple(ch[1:]), self.s(meta))

    def type_tuple(self, meta, ch):
        return ast.TypeAnn("tuple", tuple(ch), self.s(meta))

    def body(self, meta, ch):
        return tuple(c for c in ch if c is not None)

    # statements
    def empty_stmt(self, meta, ch):
        return None

    def param_stmt(self, meta, ch):
        *names, shape, init = ch
        return ast.StmtParam(tuple(str(n) for n in names), shape, init, self.s(meta))

    def input_stmt(self, meta, ch):
        name, shape = ch
        return ast.StmtInput(str(name), shape, self.s(meta))

    def shape(self, meta, ch):
        *dims, dtype = ch
        dims = [d for d in dims if d is not None]
        return ast.Shape(tuple(dims), str(dtype) if dtype else None, self.s(meta))

    def let_stmt(self, meta, ch):
        name, value = ch
        return ast.StmtLet(str(name), value, self.s(meta), _tok_span(self.source, name))

    def update_stmt(self, meta, ch):
        (target, index, tspan), op, value = ch
        return ast.StmtUpdate(target, index, str(op), value, self.s(meta), tspan)

    def target_name(self, meta, ch):
        return (str(ch[0]), None, _tok_span(self.source, ch[0]))

    def target_index(self, meta, ch):
        name, args = ch
        index = tuple(a for a in args if not isinstance(a, ast.Kwarg))
        return (str(name), index, _tok_span(self.source, name))

    def output_stmt(self, meta, ch):
        name, value = ch
        return ast.StmtOutput(str(name) if name else None, value, self.s(meta))

    def repeat_stmt(self, meta, ch):
        return ast.StmtRepeat(ch[0], ch[1], self.s(meta))

    def chain_stmt(self, meta, ch):
        return ast.StmtChain(str(ch[0]), ch[1], ch[2], self.s(meta))

    def if_stmt(self, meta, ch):
        cond, then, orelse = ch
        if isinstance(orelse, ast.StmtIf):
            orelse = (orelse,)
        return ast.StmtIf(cond, then, orelse or (), self.s(meta))

    def train_stmt(self, meta, ch):
        return ast.StmtTrain(ch[0], ch[1], self.s(meta))

    def memory_stmt(self, meta, ch):
        name, structure, per_head, init, freq, body = ch
        return ast.StmtMemory(str(name), structure, per_head is not None, init, freq, body or (),
                              self.s(meta), _tok_span(self.source, name))

    def init_from(self, meta, ch):
        return ast.ExprCall(ast.ExprName("from", self.s(meta)), (ch[0],), (), self.s(meta))

    def structure(self, meta, ch):
        return ch[0]

    def per_head(self, meta, ch):
        return True

    def _clause(kind):  # noqa: N805 - a factory used in the class body
        def build(self, meta, ch):
            return ast.Clause(kind, ch[0], self.s(meta))
        return build

    key_clause = _clause("key")
    value_clause = _clause("value")
    query_clause = _clause("query")
    objective_clause = _clause("objective")
    rule_clause = _clause("rule")

    def read_choice(self, meta, ch):
        return ast.Clause("read", f"{ch[0]} write", self.s(meta))

    def backprop_choice(self, meta, ch):
        return ast.Clause("backprop", str(ch[0]), self.s(meta))

    def state_per_sample(self, meta, ch):
        return ast.Clause("state", "per sample", self.s(meta))

    def state_shared(self, meta, ch):
        return ast.Clause("state", "shared", self.s(meta))

    def partial_choice(self, meta, ch):
        return ast.Clause("partial", str(ch[0]), self.s(meta))

    def dgd_choice(self, meta, ch):
        return ast.Clause("dgd", str(ch[0]), self.s(meta))

    # frequencies
    def freq_token(self, meta, ch):
        return ast.Frequency("token", None, ch[0], self.s(meta))

    def freq_tokens(self, meta, ch):
        amount, _, chunk = ch
        return ast.Frequency("token", amount, chunk, self.s(meta))

    def freq_step(self, meta, ch):
        return ast.Frequency("step", None, None, self.s(meta))

    def freq_steps(self, meta, ch):
        return ast.Frequency("step", ch[0], None, self.s(meta))

    def freq_never(self, meta, ch):
        return ast.Frequency("never", None, None, self.s(meta))

    def chunking(self, meta, ch):
        return ch[0]

    # expressions
    def number(self, meta, ch):
        text = str(ch[0])
        if re.fullmatch(r"\d+", text) and len(text.lstrip("0")) > MAX_INT_DIGITS:
            raise NestError("integer literal is too large", self.s(meta), kind="value")
        value = _number(text)
        if isinstance(value, float) and math.isinf(value):
            raise NestError("number is too large for a float", self.s(meta), kind="value")
        return ast.ExprNumber(value, text, self.s(meta))

    def string(self, meta, ch):
        return ast.ExprString(_unescape(str(ch[0])), self.s(meta))

    def true(self, meta, ch):
        return ast.ExprBool(True, self.s(meta))

    def false(self, meta, ch):
        return ast.ExprBool(False, self.s(meta))

    def name(self, meta, ch):
        return ast.ExprName(str(ch[0]), self.s(meta))

    def tuple(self, meta, ch):
        return ast.ExprTuple(tuple(c for c in ch if c is not None), self.s(meta))

    def list(self, meta, ch):
        return ast.ExprList(tuple(c for c in ch if c is not None), self.s(meta))

    def cond(self, meta, ch):
        return ast.ExprCond(ch[0], ch[1], ch[2], self.s(meta))

    def pipe(self, meta, ch):
        value, func = ch
        span = self.s(meta)
        if isinstance(func, ast.ExprCall):
            return ast.ExprCall(func.func, (value, *func.args), func.kwargs, span, piped=True)
        return ast.ExprCall(func, (value,), (), span, piped=True)

    def or_op(self, meta, ch):
        return ast.ExprBinary("or", ch[0], ch[1], self.s(meta))

    def and_op(self, meta, ch):
        return ast.ExprBinary("and", ch[0], ch[1], self.s(meta))

    def not_op(self, meta, ch):
        return ast.ExprUnary("not", ch[0], self.s(meta))

    def compare(self, meta, ch):
        return ast.ExprBinary(str(ch[1]), ch[0], ch[2], self.s(meta))

    def binary(self, meta, ch):
        return ast.ExprBinary(str(ch[1]), ch[0], ch[2], self.s(meta))

    def unary(self, meta, ch):
        return ast.ExprUnary(str(ch[0]), ch[1], self.s(meta))

    def call(self, meta, ch):
        func, args = ch
        pos = tuple(a for a in args or () if not isinstance(a, ast.Kwarg))
        kw = tuple(a for a in args or () if isinstance(a, ast.Kwarg))
        return ast.ExprCall(func, pos, kw, self.s(meta))

    def index(self, meta, ch):
        base, args = ch
        return ast.ExprIndex(base, tuple(a for a in args if not isinstance(a, ast.Kwarg)), self.s(meta))

    def attr(self, meta, ch):
        return ast.ExprAttr(ch[0], str(ch[1]), self.s(meta))

    def args(self, meta, ch):
        return tuple(ch)

    def kwarg(self, meta, ch):
        return ast.Kwarg(str(ch[0]), ch[1], self.s(meta))


def _check_nesting(source: Source) -> None:
    """Reject absurd bracket depth early, with the position of the bracket that goes too deep."""
    depth = 0
    line, col = 1, 0
    skip = ""  # inside a comment ("\n" ends it) or a string ('"' ends it)
    escaped = False
    for ch in source.text:
        col += 1
        if ch == "\n":
            line, col = line + 1, 0
            skip, escaped = "", False  # comments and strings both end at a newline
        elif skip == '"':
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                skip = ""
        elif skip:
            continue
        elif ch == "#":
            skip = "\n"
        elif ch == '"':
            skip = '"'
        elif ch in "([{":
            depth += 1
            if depth > MAX_NESTING:
                raise NestError(f"brackets nested deeper than {MAX_NESTING} levels",
                                point(source, line, col), kind="syntax",
                                hint="split the expression with `let` bindings")
        elif ch in ")]}":
            depth = max(0, depth - 1)


def _check_depth(source: Source, tree: Tree) -> None:
    """Reject a parse tree deeper than MAX_DEPTH (such as `1 + 1 + ... + 1` with thousands of
    terms) before the recursive stages after the parser see it."""
    stack: list[tuple[Tree, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise NestError(f"the spec nests expressions and blocks more than {MAX_DEPTH} levels "
                            "deep", _span(source, node.meta), kind="syntax",
                            hint="split long expressions into steps with `let` bindings")
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))


def parse(source: Source) -> ast.Module:
    """Parse one spec into an AST, or raise NestError at the first syntax error."""
    if len(source.text) > MAX_SOURCE_BYTES:
        raise NestError(f"file is larger than {MAX_SOURCE_BYTES // 1024} KiB",
                        point(source, 1, 1), kind="syntax")
    if "\x00" in source.text:
        line = source.text[: source.text.index("\x00")].count("\n") + 1
        col = source.text.index("\x00") - (source.text.rfind("\n", 0, source.text.index("\x00")) + 1) + 1
        raise NestError("binary data in a spec (a NUL byte)", point(source, line, col), kind="syntax",
                        hint="a .nest file is UTF-8 text")
    _check_nesting(source)
    try:
        tree = parser().parse(source.text)
    except lark.exceptions.LarkError as err:
        raise _syntax_error(source, err) from None
    _check_depth(source, tree)
    try:
        module = _ToAst(source).transform(tree)
    except lark.exceptions.VisitError as err:
        if isinstance(err.orig_exc, NestError):
            raise err.orig_exc from None
        raise
    assert isinstance(module, ast.Module)
    return module


def parse_text(text: str, filename: str = "<string>") -> ast.Module:
    return parse(Source(filename, text))
