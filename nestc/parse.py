"""Text -> AST. Builds the Lark LALR parser once and turns every Lark error into a NestError."""

from __future__ import annotations

import difflib
import functools
import math
import re
from pathlib import Path
from typing import Any

import lark
from lark import Token, Transformer_NonRecursive, Tree, v_args

from nestc import ast
from nestc.builtins import BUILTINS
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
FREQUENCY_FORMS = "`every token`, `every N tokens`, `every step`, `every N steps` or `never`"


def describe_expected(expected: set[str]) -> str:
    words = _terminal_words()
    names = set(expected)
    parts: list[str] = []
    if names >= _STMT_START:
        parts.append("a statement")
        names -= _STMT_START | {"VALUE", "QUERY", "OBJECTIVE", "RULE", "READ", "BACKPROP",
                                "STATE", "PARTIAL", "DGD", "IF", "NAME", "SEMICOLON", "REQUIRE"}
    if names >= {"NAME", "NUMBER", "LPAR"}:
        parts.append("an expression")
        names -= _EXPR_START
    if names & _OPERATORS and len(names) > 3:
        parts.append("an operator")
        names -= _OPERATORS
    listed = sorted(words[n] for n in names if n in words)  # never a Lark terminal name
    if len(listed) > 6:
        listed = listed[:6] + ["..."]
    parts.extend(listed)
    if not parts:
        return "something else"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


@functools.lru_cache(maxsize=1)
def keywords() -> frozenset[str]:
    """Every word the grammar reserves: `memory`, `every`, `true`, `and`, ..."""
    return frozenset(w.strip("`") for w in _terminal_words().values()
                     if w.startswith("`") and w.strip("`").isalpha())


def _pos_span(source: Source, start: int, end: int) -> Span:
    """The span of text[start:end] (on the line where it starts)."""
    text = source.text
    line = text.count("\n", 0, start) + 1
    col = start - (text.rfind("\n", 0, start) + 1) + 1
    return Span(source, line, col, line, col + max(1, end - start))


def _open_brackets(text: str, end: int) -> list[int]:
    """Offsets of the brackets still open at `end`, outermost first (comments and strings
    skipped)."""
    stack: list[int] = []
    closing = {")": "(", "]": "[", "}": "{"}
    for m in re.finditer(r'#[^\n]*|"(?:[^"\\\n]|\\.)*"?|[()\[\]{}]', text[:end]):
        ch = m.group()
        if ch in "([{":
            stack.append(m.start())
        elif ch in closing and stack and text[stack[-1]] == closing[ch]:
            stack.pop()
    return stack


def _misspelled_keyword(source: Source, end: int) -> tuple[str, str, Span] | None:
    """A word on the error's line, before `end`, that is followed by another word as only a
    keyword is (`memroy M`, `evry token`, `improt "..."`) and is a typo of a keyword."""
    text = source.text
    start = text.rfind("\n", 0, end) + 1
    reserved = keywords()
    found = None
    for m in re.finditer(r'(?<![A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]*)[ \t]+(?=[A-Za-z_0-9"])',
                         text[start:end]):
        word = m.group(1)
        head = text[start:start + m.start()]
        if (word in reserved or word in BUILTINS or len(word) < 3 or "#" in head
                or head.count('"') % 2):
            continue
        if len(re.findall(rf"(?<![\w.]){word}(?!\w)", text)) > 1:
            continue  # a word used elsewhere is a name of the spec, not a typo
        close = difflib.get_close_matches(word, sorted(reserved), n=1, cutoff=0.8)
        if close:
            found = (word, close[0], _pos_span(source, start + m.start(), start + m.end(1)))
    return found


def _frequency_error(source: Source, tok: Token, expected: set[str]) -> NestError | None:
    """A frequency that is not one of the five forms, from the words before the bad token."""
    text, pos = source.text, tok.start_pos or 0
    before = text[max(0, pos - 200):pos]
    m = re.search(r"\bevery(\s+([A-Za-z_0-9.]+|\([^()]*\)))?\s*$", before)
    if not m or "#" in before[before.rfind("\n", 0, m.start()) + 1:m.start()]:
        return None  # no `every` just before, or one inside a comment
    bad = str(tok)
    amount = m.group(2)
    if amount in ("tokens", "steps"):
        at = pos - len(m.group(0))
        return NestError(f"`every {amount}` is not a frequency", _pos_span(
            source, at, at + len(m.group(0).rstrip())), kind="syntax",
            hint=f"did you mean `every {amount[:-1]}` or `every N {amount}`?")
    span = _tok_span(source, tok)
    if amount is None:
        if bad in ("tokens", "steps"):
            return NestError(f"`every {bad}` is not a frequency", span, kind="syntax",
                             hint=f"did you mean `every {bad[:-1]}` or `every N {bad}`?")
        return NestError(f"unexpected `{_shown(bad)}` after `every`, expected `token`, `step` "
                         "or a number", span, kind="syntax",
                         hint=f"a frequency is {FREQUENCY_FORMS}")
    if not expected & {"TOKENS", "STEPS"}:
        return None
    hint = (f"did you mean `every {amount} {bad}s`?" if bad in ("token", "step") else
            f"did you mean `every {amount} tokens` or `every {amount} steps`?")
    return NestError(f"unexpected `{_shown(bad)}`, expected `tokens` or `steps`", span,
                     kind="syntax", hint=hint)


def _shown(text: str) -> str:
    shown = text.replace("\n", " ")
    return shown[:27] + "..." if len(shown) > 30 else shown


def _unclosed_note(source: Source, pos: int, line: int) -> tuple[tuple[str, Span], ...]:
    """A note at the innermost `(` or `[` still open at `pos`, when it opened on an earlier
    line: the error is then most likely a forgotten `)` or `]`."""
    opened = _open_brackets(source.text, pos)
    if not opened or source.text[opened[-1]] == "{":
        return ()
    at = opened[-1]
    span = _pos_span(source, at, at + 1)
    if span.line >= line:
        return ()
    closer = {"(": ")", "[": "]"}[source.text[at]]
    return ((f"this `{source.text[at]}` has no matching `{closer}`", span),)


def _unexpected_character(source: Source, err: lark.UnexpectedCharacters) -> NestError:
    text = source.text
    pos = err.pos_in_stream
    char = text[pos] if pos < len(text) else ""
    span = point(source, err.line, err.column)
    if char == '"':
        return NestError("this string is not closed", span, kind="syntax",
                         hint='a string ends with `"` on the same line')
    if char.isprintable():
        shown = char
    else:
        shown = f"\\x{ord(char):02x}" if ord(char) < 256 else f"U+{ord(char):04X}"
    hints = {
        "'": 'strings use double quotes: "..."',
        "&": "write `and` for a logical and",
        "|": "write `or` for a logical or; `|>` is the pipeline operator",
        "!": "write `not` for a logical not; `!=` compares",
        "^": "write `**` for a power",
        "$": None, "?": "write `if c then a else b` for a choice",
        "\\": "a line continues by itself: newlines are whitespace",
    }
    hint = hints.get(char)
    return NestError(f"unexpected character `{shown}`", span, kind="syntax", hint=hint)


def _syntax_error(source: Source, err: lark.exceptions.LarkError) -> NestError:
    text = source.text
    if isinstance(err, lark.UnexpectedCharacters):
        return _unexpected_character(source, err)
    if isinstance(err, lark.UnexpectedEOF):
        lines = source.lines
        return NestError("unexpected end of file", point(source, len(lines), len(lines[-1]) + 1),
                         kind="syntax")
    if not isinstance(err, lark.UnexpectedToken):
        raise err
    tok: Token = err.token
    expected = set(err.expected)
    if tok.type == "$END":
        if tok.end_line:
            span = point(source, tok.end_line, tok.end_column or 1)
        else:
            span = point(source, len(source.lines), len(source.lines[-1]) + 1)
        opened = _open_brackets(text, len(text))
        if opened:
            at = opened[-1]
            ch = text[at]
            closer = {"(": ")", "[": "]", "{": "}"}[ch]
            return NestError(f"unexpected end of file, expected `{closer}`", span, kind="syntax",
                             notes=((f"this `{ch}` has no matching `{closer}`",
                                     _pos_span(source, at, at + 1)),))
        return NestError(f"unexpected end of file, expected {describe_expected(expected)}", span,
                         kind="syntax")
    freq = _frequency_error(source, tok, expected)
    if freq is not None:
        return freq
    span = _tok_span(source, tok)
    pos = tok.start_pos or 0
    end = tok.end_pos if tok.end_pos is not None else pos + len(str(tok))
    typo = _misspelled_keyword(source, end)
    if typo is not None:
        word, keyword, word_span = typo
        return NestError(f"`{word}` is not a keyword", word_span, kind="syntax",
                         hint=f"did you mean `{keyword}`?")
    chunked = re.search(r"\b(steps?|never)\s+in$", text[:pos].rstrip())
    if chunked:
        at = pos - len(text[:pos]) + len(text[:pos].rstrip()) - 2
        return NestError(f"a `{chunked.group(1)}` frequency has no chunks", _pos_span(
            source, at, end), kind="syntax",
            hint="chunks belong to token frequencies: `every 16 tokens in chunks of 64`")
    if tok.type == "COMP_OP" and "COMP_OP" not in expected:
        return NestError("comparisons do not chain", span, kind="syntax",
                         hint="write `a < b and b < c`")
    opened = _open_brackets(text, pos)
    if opened:
        # call arguments and index arguments share a rule: expect only the bracket that is open
        innermost = text[opened[-1]]
        expected -= {"(": {"RSQB"}, "[": {"RPAR"}, "{": set()}[innermost]
    message = f"unexpected `{_shown(str(tok))}`, expected {describe_expected(expected)}"
    hint = None
    if tok.type == "NAME":
        allowed = [w for w in keywords() if w.upper() in expected]
        close = nearest(str(tok), allowed, limit=1)
        if close and close[0] != str(tok):
            hint = f"did you mean `{close[0]}`?"
    if hint is None and str(tok) in (")", "]", "}"):
        opener = {")": "(", "]": "[", "}": "{"}[str(tok)]
        if not opened or text[opened[-1]] != opener:
            hint = f"this `{tok}` has no matching `{opener}`"
    notes = _unclosed_note(source, pos, span.line)
    if (hint is None and not notes and expected & {"RPAR", "RSQB"}
            and tok.type in ("NAME", "NUMBER", "STRING")):
        hint = "a `,` may be missing between items"
    return NestError(message, span, kind="syntax", hint=hint, notes=notes)


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


ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _unescape(text: str, where: Span) -> str:
    """A string literal's text; an escape other than \\" \\\\ \\n \\t is an error (it was dropped:
    "a\\qb" read "aqb")."""
    body = text[1:-1]
    bad = next((m for m in re.finditer(r"\\(.)", body) if m.group(1) not in ESCAPES), None)
    if bad is not None:
        raise NestError(f"unknown escape `\\{bad.group(1)}` in a string", where, kind="syntax",
                        hint='the escapes are \\" \\\\ \\n and \\t; write \\\\ for a backslash')
    return re.sub(r"\\(.)", lambda m: ESCAPES[m.group(1)], body)


def _index_args(args: tuple[Any, ...]) -> tuple[ast.Expr, ...]:
    """The expressions of `x[i, j]`; `name = value` belongs in calls, not in an index."""
    for a in args:
        if isinstance(a, ast.Kwarg):
            raise NestError(f"an index takes no `{a.name} = ...`", a.span, kind="syntax",
                            hint="`name = value` passes a keyword to a call: `f(name = value)`")
    return tuple(args)


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
        return ast.Import(_unescape(path, _tok_span(self.source, path)),
                          str(alias) if alias else None, None, self.s(meta),
                          _tok_span(self.source, path))

    def import_names(self, meta, ch):
        path, *names = ch
        return ast.Import(_unescape(path, _tok_span(self.source, path)), None,
                          tuple(str(n) for n in names), self.s(meta),
                          _tok_span(self.source, path))

    def _word(self, meta, ch):
        return ch[0]

    decl_kind = read_when = backprop_mode = partial_mode = dgd_mode = dtype = _word

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
        return (str(name), _index_args(args), _tok_span(self.source, name))

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

    def require_stmt(self, meta, ch):
        cond, message = ch
        return ast.StmtRequire(cond, None if message is None else
                               _unescape(str(message), _tok_span(self.source, message)),
                               self.s(meta))

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
        return ast.ExprString(_unescape(str(ch[0]), self.s(meta)), self.s(meta))

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
        return ast.ExprIndex(base, _index_args(args), self.s(meta))

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
