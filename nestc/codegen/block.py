"""Blocks and models -> the Python source of torch.nn.Module subclasses.

The generator walks a checked declaration once, with its hyperparameters bound: arithmetic on
hyperparameters is folded, `if` on them is decided, `repeat` and `chain` are unrolled, and
every layer call, memory and sub-block call becomes a submodule with a name that depends only on
the spec (so every back end has the same `state_dict` keys). What is left is straight-line
code over tensors, the generated class's `run`; each distinct sub-block (a declaration with
its hyperparameters and input width) becomes a class of its own, emitted before its users.

The generated classes subclass nestc.module.Built, which holds what does not depend on the
spec: `forward`, the in-context state, the driver of memories that learn from the task loss.
The memories and layers they construct are nestc.memories' and nestc.layers' runtime classes,
which take plain values. Every check of a spec (widths, heads, ranges) happens here, with its
span; generated code never sees the spec's text except in comments and string literals.

Names: a spec identifier becomes a local through py_name (a name bound twice, e.g. in a
`repeat`, takes `_1`, `_2`, ...); submodules keep their spec-derived names (`state_dict` keys);
every name the generator makes for itself starts with `_`.
"""

from __future__ import annotations

import keyword
import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from nestc import __version__, ast
from nestc.builtins import BUILTINS
from nestc.check import Checked, check_copies, next_token_objective, qualified_name
from nestc.codegen.torch import class_name, comment, fitted, literal, py_name, spec_comment
from nestc.errors import NestError
from nestc.hyper import UNKNOWN, const_eval, show_value

ACTS = ("gelu", "silu", "relu", "tanh", "sigmoid")  # an MLP memory's (nestc.ops ACT_FNS)
# the element-wise functions of blocks, as code
MATH = {"sqrt": "torch.sqrt", "abs": "torch.abs", "exp": "torch.exp", "log": "torch.log",
        "sign": "torch.sign", "tanh": "torch.tanh", "silu": "F.silu", "gelu": "F.gelu",
        "relu": "F.relu", "sigmoid": "torch.sigmoid", "stop_grad": "torch.detach"}
COMPARISONS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# builtins of numbers alone, computed when the block is generated (`x / sqrt(dim)`)
NUMBER_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt, "abs": abs, "exp": math.exp, "log": math.log, "tanh": math.tanh,
    "sign": lambda x: float((x > 0) - (x < 0)), "relu": lambda x: max(x, 0),
    "sigmoid": _sigmoid, "silu": lambda x: x * _sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))),
    "softplus": lambda x: max(x, 0) + math.log1p(math.exp(-abs(x))),
    "min": min, "max": max}


def fold_numbers(e: ast.Expr, consts: dict[str, Any], shadowed: Any = ()) -> ast.Expr:
    """e with each builtin call of numbers alone (`sqrt(dim)`, nested too) replaced by its
    value, as a number literal: const_eval computes no calls. `shadowed`: names that are not
    the builtins here (memories read as M(q), declarations of the program)."""
    if isinstance(e, ast.ExprCall):
        args = tuple(fold_numbers(a, consts, shadowed) for a in e.args)
        name = e.func.name if isinstance(e.func, ast.ExprName) else None
        if name in NUMBER_FUNCTIONS and name not in shadowed and args and not e.kwargs:
            values = [const_eval(a, consts) for a in args]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                shown = f"{name}({', '.join(map(str, values))})"
                try:
                    value = NUMBER_FUNCTIONS[name](*values)
                except (ValueError, OverflowError):
                    value = math.nan
                if not math.isfinite(value):
                    raise NestError(f"{shown} is not a finite number", e.span, kind="value")
                return ast.ExprNumber(value, shown, e.span)
        return e if all(a is b for a, b in zip(args, e.args)) else replace(e, args=args)
    if isinstance(e, ast.ExprBinary):
        left, right = fold_numbers(e.left, consts, shadowed), \
            fold_numbers(e.right, consts, shadowed)
        return e if left is e.left and right is e.right else replace(e, left=left, right=right)
    if isinstance(e, ast.ExprUnary):
        operand = fold_numbers(e.operand, consts, shadowed)
        return e if operand is e.operand else replace(e, operand=operand)
    if isinstance(e, ast.ExprCond):
        parts = tuple(fold_numbers(x, consts, shadowed) for x in (e.cond, e.then, e.orelse))
        return e if all(a is b for a, b in zip(parts, (e.cond, e.then, e.orelse))) else \
            replace(e, cond=parts[0], then=parts[1], orelse=parts[2])
    return e
# what a submodule's name must not be: attributes of nn.Module and nestc.module.Built
# (tests/test_codegen_block.py checks this list against torch's)
_MODULE_ATTRS = """
T_destination add_module apply bfloat16 buffers call_super_init children compile cpu cuda
double dump_patches eval extra_repr float forward get_buffer get_extra_state get_parameter
get_submodule half ipu load_state_dict modules mtia named_buffers named_children
named_modules named_parameters parameters register_backward_hook register_buffer
register_forward_hook register_forward_pre_hook register_full_backward_hook
register_full_backward_pre_hook register_load_state_dict_post_hook
register_load_state_dict_pre_hook register_module register_parameter
register_state_dict_post_hook register_state_dict_pre_hook requires_grad_
set_extra_state set_submodule share_memory state_dict to to_empty train training type xpu
zero_grad decl_name kind backend objective objective_where in_feat out_feat tasks run finish
task_loss forward_in_chunks flushing flushed generate
"""
MODULE_ATTRS = frozenset(_MODULE_ATTRS.split())


def wrapped(head: str, args: list[str], indent: int, width: int = 99) -> list[str]:
    """head(args...) as lines of at most `width` columns where it can (an argument longer
    than a line stays whole), continued 4 columns in; `indent`: the first line's."""
    one = f"{head}({', '.join(args)})"
    if indent + len(one) <= width or not args:
        return [one]
    lines, line = [f"{head}("], " " * 4
    for i, arg in enumerate(args):
        arg += ")" if i == len(args) - 1 else ","
        if line.strip() and indent + len(line) + 1 + len(arg) > width:
            lines.append(line.rstrip())
            line = " " * 4
        line += ("" if not line.strip() else " ") + arg
    return lines + [line]


def without_dead_stores(body: list[str]) -> list[str]:
    """body less the assignments of values nothing reads that compute nothing else (no
    submodule, memory or state: a spec's `let y = 0 * q` that only declares y before an `if`
    rebinds it), and less the spec-line comments left above nothing."""
    body = list(body)
    while True:
        code = [ln for ln in body if not ln.lstrip().startswith("#")]
        dead = [i for i, ln in enumerate(body)
                if (m := re.fullmatch(r"(\w+) = (.*)", ln))
                and (i + 1 == len(body) or not body[i + 1].startswith(" "))  # one line
                and not re.search(r"\bself\.|\b_env\b|\b_state\b|\b_mem\.", m[2])
                and not any(re.search(rf"\b{m[1]}\b", other) for other in code if other != ln)]
        if not dead:
            break
        for i in reversed(dead):
            del body[i]
    return [ln for i, ln in enumerate(body)
            if not (ln.startswith("#") and (i + 1 == len(body) or body[i + 1].startswith("#")))]


def docstring(text: str, indent: int, width: int = 99) -> list[str]:
    """A docstring of spec text (names, values, a path), made safe: printable, no quotes or
    backslashes that could end it, wrapped at `width` columns."""
    safe = comment(text).replace("\\", "/").replace('"', "'")
    return textwrap.wrap(f'"""{safe}"""', width, initial_indent=" " * indent,
                         subsequent_indent=" " * indent, break_long_words=False,
                         break_on_hyphens=False)


def operand(value: Any) -> str:
    """A constant as an operand of a binary operation: a negative one in parentheses (in
    Python, -2 ** y is -(2 ** y))."""
    # a bool is 1 or 0 (torch refuses `x - True`)
    code = literal(int(value) if isinstance(value, bool) else value)
    return f"({code})" if code.startswith("-") else code


def broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape torch broadcasts these to (ValueError where it cannot)."""
    out: list[int] = []
    for shape in shapes:
        for i, n in enumerate(reversed(shape)):
            if i == len(out):
                out.insert(0, n)
            elif out[-1 - i] == 1:
                out[-1 - i] = n
            elif n not in (1, out[-1 - i]):
                raise ValueError(shapes)
    return tuple(out)


def unsupported(what: str, span: Any) -> NestError:
    return NestError(f"{what} is not supported by the block compiler yet", span, kind="value",
                     unsupported=True)


@dataclass(eq=False)
class Ten:
    """A tensor of the generated code: an expression over its locals (a name, a call or a
    parenthesized operation, so it can take a subscript), and the size of its last dim."""

    code: str
    feat: int
    tokens: bool = False  # token ids [B, T] (no feature dim)
    # None: one value per token, [B, T, feat]; else the shape of a tensor of the block's own
    # (a `param`, or an expression of params alone), the same for every token
    shape: tuple[int, ...] | None = None


@dataclass(eq=False)
class _Sub:
    """A submodule of a generated class: its attribute and constructor call, or a memory plan
    whose call is rendered once the whole declaration is seen."""

    attr: str
    code: str = ""
    plan: Any = None
    cls: Any = None  # a sub-block's _Class


@dataclass(eq=False)
class _Ahead:
    """A memory read above its declaration: its submodule, reserved at the first such read
    (its plan comes with the declaration, in the declaration's scope), and each read's query,
    place and code, checked against the plan then."""

    sub: _Sub
    reads: list[tuple[Ten, Any, Ten]] = field(default_factory=list)


@dataclass(eq=False)
class _Class:
    """One generated class: a declaration at one binding of its hyperparameters."""

    checked: Checked
    hyper: dict[str, Any]
    name: str = ""
    subs: list[_Sub] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    # memories that run as one (their names), and whether their values are generated alike
    groups: list[tuple[list[str], bool]] = field(default_factory=list)
    input: str = ""
    in_feat: int | None = None  # the input's width; 0 for token ids
    out: Ten | None = None
    out_line: str = ""  # the output statement's line, as a comment
    objective: str | None = None  # a model's task loss: "next_token", the form built so far
    objective_where: str | None = None  # where its objective is, if not a form built yet

    @property
    def out_feat(self) -> int:
        assert self.out is not None, self.checked.name
        return self.out.feat

    def source(self) -> str:
        c = self.checked
        span = c.decl.span
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        doc = f"{c.kind} {c.name}({hyper}), compiled from {span.file}:{span.line}."
        out = [f"class {self.name}(_Built):", *docstring(doc, 4), "",
               f"    in_feat = {self.in_feat}", f"    out_feat = {self.out_feat}"]
        if self.objective:
            out.append(f"    objective = {self.objective!r}")
        if self.objective_where:
            out.append(f"    objective_where = {self.objective_where!r}")
        out += ["", '    def __init__(self, backend="chunked"):',
                f"        super().__init__({c.name!r}, {c.kind!r}, backend)"]
        for sub in self.subs:
            if sub.plan is None:
                out.append(f"        self.{sub.attr} = {sub.code}")
            else:
                func, args = sub.plan.construct()
                out += ["        " + ln for ln in wrapped(f"self.{sub.attr} = {func}", args, 8)]
        out += [f"        _mem.run_as_one(self, {names!r}, same_values={same})"
                for names, same in self.groups]
        out += ["        self.finish()", "", f"    def run(self, _env, {self.input}):",
                '        _env = {"__state__": _env["__state__"], "__self__": self}',
                '        _state = _env["__state__"]']
        out += [f"        {ln}" if ln else "" for ln in without_dead_stores(self.body)]
        return "\n".join(fit for ln in out for fit in fitted(ln)) + "\n"


class Generator:
    """The classes of one declaration and every sub-block it calls, in the order they are
    needed; equal classes are emitted once."""

    def __init__(self, program: Any) -> None:
        self.program = program
        self.classes: list[_Class] = []
        self.texts: dict[str, str] = {}  # class source with its name blanked -> class name
        self.names: set[str] = set()

    def decl(self, checked: Checked, hyper: dict[str, Any], in_feat: int | None = None,
             call: Any = None, copies: int = 1, arg: Any = None) -> _Class:
        """The class of a declaration at these hyperparameters; `copies`: how many the
        repeats and chains around its call make (each repeat in it makes more); `arg`: the
        span of the input passed to it (a width that does not fit is an error there)."""
        values = checked.bind(hyper, call)
        cls = _Class(checked, values)
        scope = _Scope(self, checked, cls, dict(values))
        scope.copies, scope.arg = copies, arg
        scope.stmts(checked.decl.body, in_feat)
        if cls.out is None:
            raise NestError(f"{checked.kind} `{checked.name}` has no output",
                            checked.decl.name_span, kind="value")
        scope.settle()
        cls.body += [line for line in (cls.out_line, f"return {cls.out.code}") if line]
        scope.run_siblings_as_one()
        cls.name = "_CLASS_"
        text = cls.source()
        if text in self.texts:
            cls.name = self.texts[text]
            return cls
        base = class_name(checked.name)
        name, k = base, 2
        while name in self.names:  # another binding of one declaration
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        cls.name = self.texts[text] = name
        self.classes.append(cls)
        return cls

    def source(self, top: _Class) -> str:
        c = top.checked
        out = [f"# Generated by nestc {__version__} from {comment(c.decl.span.file)}:"
               f"{c.decl.span.line}, {c.kind} {c.name}.",
               "# Do not edit: `nestc compile` regenerates it.",
               f'# Build it with {top.name}(backend="chunked"), or "reference" or "triton".']
        classes = [cls.source().rstrip("\n") for cls in self.classes]
        used = {name for text in classes for name in re.findall(r"\b(\w+)\.", text)}
        # only what the classes use (a user's linter reads the file too)
        out += [line for name, line in (
            ("torch", "import torch"), ("F", "import torch.nn.functional as F  # noqa: N812"),
            ("nn", "from torch import nn")) if name in used]
        out += [""] * (out[-1].startswith(("import", "from")))
        out += [line for name, line in (
            ("_layers", "from nestc import layers as _layers"),
            ("_mem", "from nestc import memories as _mem")) if name in used]
        out.append("from nestc.module import Built as _Built")
        out = [fit for line in out for fit in fitted(line)]
        for text in classes:
            out += ["", "", text]
        return "\n".join(out) + "\n"


def generate_module(program: Any, checked: Checked, hyper: dict[str, Any]) -> tuple[str, str]:
    """(source, class name) of a block or model declaration at these hyperparameters."""
    gen = Generator(program)
    top = gen.decl(checked, hyper)
    return gen.source(top), top.name


def memories_of(program: Any, checked: Checked, hyper: dict[str, Any]
                ) -> list[tuple[str, str]]:
    """(path, what it compiles to) of every memory of a block or model at these
    hyperparameters, in the order they are constructed; paths as in `named_modules()`."""
    def walk(cls: _Class, prefix: str) -> list[tuple[str, str]]:
        out = []
        for sub in cls.subs:
            if sub.plan is not None:
                out.append((prefix + sub.attr, sub.plan.describe()))
            elif sub.cls is not None:
                out += walk(sub.cls, f"{prefix}{sub.attr}.")
        return out

    return walk(Generator(program).decl(checked, hyper), "")


class _Scope:
    """Generates one declaration's body: constants, tensors, submodules and code."""

    def __init__(self, gen: Generator, checked: Checked, cls: _Class,
                 consts: dict[str, Any]) -> None:
        self.g, self.checked, self.cls = gen, checked, cls
        self.consts = consts
        self.copies = 1  # of this body: the repeats' and chains' around it, the callers' too
        self.arg: Any = None  # the span of the input a caller passes (None: the top's)
        self.tens: dict[str, Ten] = {}
        self.mems: dict[str, Any] = {}
        self.prefix = ""
        self.locals: set[str] = {"self"}
        self.rebound: dict[str, int] = {}  # per base name: the suffix its next rebinding tries
        self.fresh_count = 0
        # per memory: the line that writes it, and per read the line that reads it and its
        # query (run_siblings_as_one)
        self.writes: dict[Any, int] = {}
        self.reads: dict[Any, list[tuple[int, Ten]]] = {}
        self.settled: set[Any] = set()  # memories run for their state alone (settle)
        self.writing: Any = None  # the memory whose write is being generated
        # memories declared further down the bodies being generated (with the prefix of
        # theirs), and those of them already read above their declarations (by statement)
        self.ahead: dict[str, tuple[ast.StmtMemory, str]] = {}
        self.early: dict[int, _Ahead] = {}

    def add(self, hint: str, code: str = "", plan: Any = None, cls: Any = None) -> str:
        """A submodule under a spec-derived name, unique in this declaration."""
        base = (self.prefix + hint).replace(".", "_")
        if base.startswith("_") or keyword.iskeyword(base) or base in MODULE_ATTRS:
            base = f"m_{base}"
        taken = {s.attr for s in self.cls.subs}
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        self.cls.subs.append(_Sub(name, code, plan, cls))
        return name

    def local(self, name: str) -> str:
        """A new local for the spec name `name` (a name bound again gets a new local)."""
        base = py_name(name)
        var, k = base, self.rebound.get(base, 1)
        while var in self.locals:
            var, k = f"{base}_{k}", k + 1
        self.rebound[base] = k
        self.locals.add(var)
        return var

    def fresh(self, hint: str) -> str:
        self.fresh_count += 1
        return f"_{hint}_{self.fresh_count}"

    def emit(self, line: str) -> None:
        self.cls.body.append(line)

    # statements ----------------------------------------------------------------------------

    def stmts(self, body: tuple[ast.Stmt, ...], in_feat: int | None) -> None:
        # names are local to their body, as the checker has them: a memory declared in a body
        # (one pass of a repeat or chain, a branch) is not seen after it, and one declared
        # further down shadows an outer one of its name until its declaration
        outer, mems = self.ahead, self.mems
        self.ahead = {**outer, **{s.name: (s, self.prefix) for s in body
                                  if isinstance(s, ast.StmtMemory)}}
        self.mems = dict(mems)
        # and so is a `let` or a `param`: past the body a name it took from outside is the
        # outer one again, as the declaration found it (an update, `h = ...`, before a let
        # changes the outer one; one after it, the let's); it used to stay rebound
        saved: dict[str, tuple[Ten | None, Any]] = {}
        for s in body:
            names = (s.name,) if isinstance(s, ast.StmtLet) else \
                s.names if isinstance(s, ast.StmtParam) else ()
            for name in names:
                if name not in saved:
                    saved[name] = (self.tens.get(name), self.consts.get(name, UNKNOWN))
            self.stmt(s, in_feat)
            if isinstance(s, ast.StmtMemory):
                self.ahead.pop(s.name, None)
        self.ahead, self.mems = outer, mems
        for n, (ten, const) in saved.items():
            self.tens.pop(n, None)
            self.consts.pop(n, None)
            if ten is not None:
                self.tens[n] = ten
            if const is not UNKNOWN:
                self.consts[n] = const

    def stmt(self, s: ast.Stmt, in_feat: int | None) -> None:
        start = len(self.cls.body)
        self.statement(s, in_feat)
        # the spec line above the code it became (an unnamed output's above the return)
        named = isinstance(s, ast.StmtOutput) and s.name is not None
        if (named or isinstance(s, (ast.StmtLet, ast.StmtUpdate, ast.StmtMemory))) and \
                len(self.cls.body) > start:
            self.cls.body.insert(start, spec_comment(s.span))
        elif isinstance(s, ast.StmtOutput):
            self.cls.out_line = spec_comment(s.span)

    def statement(self, s: ast.Stmt, in_feat: int | None) -> None:
        if isinstance(s, ast.StmtInput):
            self.input(s, in_feat)
        elif isinstance(s, ast.StmtParam):
            self.param(s)
        elif isinstance(s, ast.StmtLet):
            self.bind(s.name, s.value)
        elif isinstance(s, ast.StmtUpdate):
            if s.index is not None:
                raise unsupported(f"an indexed update (`{s.target}[...] {s.op} ...`) in a block",
                                  s.span)
            if s.op not in ("=", "+=", "-=", "*=", "/="):
                raise unsupported(f"`{s.target} {s.op} ...` in a block", s.span)
            value = s.value
            if s.op != "=":
                value = ast.ExprBinary(s.op[0], ast.ExprName(s.target, s.target_span), value,
                                       s.span)
            self.bind(s.target, value)
        elif isinstance(s, ast.StmtOutput):
            self.cls.out = self.tensor(s.value, "out")
            if s.name:  # a name later statements may read, as a let's (layers keep `out_`)
                var = self.local(s.name)
                self.emit(f"{var} = {self.cls.out.code}")
                self.cls.out = self.tens[s.name] = replace(self.cls.out, code=var)
        elif isinstance(s, ast.StmtRepeat):
            n = self.size(s.count, "a repeat count", minimum=0)
            check_copies(n, s.count.span, self.copies)  # (a million hung explain and build)
            outer, copies = self.prefix, self.copies
            self.copies *= max(n, 1)
            for i in range(n):
                self.prefix = f"{outer}r{i}_"
                self.stmts(s.body, in_feat)
            self.prefix, self.copies = outer, copies
        elif isinstance(s, ast.StmtChain):
            outer, saved = self.prefix, self.consts.get(s.var, UNKNOWN)
            values, copies = self.const(s.values), self.copies
            self.copies *= max(len(values), 1)
            for i, value in enumerate(values):
                self.prefix = f"{outer}{s.var}{i}_"
                self.consts[s.var] = value
                self.stmts(s.body, in_feat)
            self.prefix, self.copies = outer, copies
            if saved is UNKNOWN:
                self.consts.pop(s.var, None)
            else:
                self.consts[s.var] = saved
        elif isinstance(s, ast.StmtIf):
            self.stmts(s.then if self.const(s.cond) else s.orelse, in_feat)
        elif isinstance(s, ast.StmtMemory):
            self.memory(s)
        elif isinstance(s, ast.StmtTrain):
            self.train(s)
        elif isinstance(s, ast.StmtRequire):
            pass  # met: Checked.bind checked it against these hyperparameters
        else:
            raise unsupported(f"`{type(s).__name__}` in a {self.checked.kind}", s.span)

    def train(self, s: ast.StmtTrain) -> None:
        """The outer level. Its objective is the task loss of `objective task` memories:
        cross_entropy(<output>, next(<input>)) is the form built so far."""
        for c in s.body:
            if isinstance(c, ast.Clause) and c.kind == "objective":
                ok = next_token_objective(self.checked.decl, c.value)
                self.cls.objective = "next_token" if ok else None
                self.cls.objective_where = None if ok else str(c.span)

    def input(self, s: ast.StmtInput, in_feat: int | None) -> None:
        if self.cls.input:
            raise unsupported(f"a second input (`{s.name}`)", s.span)
        var = self.cls.input = self.local(s.name)
        # (token ids against features: checked at the call, subblock)
        if s.shape.dtype == "int":
            self.tens[s.name] = Ten(var, 0, tokens=True)
            self.cls.in_feat = 0
            return
        dims = s.shape.dims
        feat = self.size(dims[-1], f"the width of `{s.name}`") if len(dims) > 1 else in_feat
        if feat is None:
            raise NestError(f"input `{s.name}` needs a feature dim: [T, dim]", s.shape.span,
                            kind="shape")
        if in_feat is not None and feat != in_feat:
            if self.arg is not None:  # at the call, where the mistake most likely is
                raise NestError(f"block `{self.checked.name}` takes {feat} features (its input "
                                f"`{s.name}`), got {in_feat}", self.arg, kind="shape",
                                notes=(("its input", s.shape.span),))
            raise NestError(f"input `{s.name}` has {feat} features, but {in_feat} are passed "
                            "in", s.shape.span, kind="shape")
        self.tens[s.name] = Ten(var, int(feat))
        self.cls.in_feat = int(feat)

    def param(self, s: ast.StmtParam) -> None:
        """`param W : [a, b] = init`: a weight of the block (nestc.layers.param), trained by the
        outer level."""
        assert s.shape is not None, s.span  # (the checker)
        if s.shape.dtype not in (None, "float"):
            raise unsupported(f"a param of {s.shape.dtype}s", s.shape.span)
        shape = tuple(self.size(d, "a param's dim") for d in s.shape.dims)
        init: Any = "default"
        if s.init is not None:
            init = const_eval(s.init, self.consts)
            if isinstance(s.init, ast.ExprName) and s.init.name in ("zeros", "identity"):
                init = s.init.name
            elif isinstance(init, bool) or not isinstance(init, (int, float)):
                raise unsupported("this init of a param (it takes zeros, identity or a number)",
                                  s.init.span)
            else:
                init = float(init)
        if init == "identity" and (len(shape) != 2 or shape[0] != shape[1]):
            raise NestError(f"identity is the init of a square matrix, not of shape "
                            f"{list(shape)}", s.init.span if s.init else s.span, kind="shape")
        for name in s.names:
            attr = self.add(name, f"_layers.param({shape!r}, {init!r})")
            self.consts.pop(name, None)
            self.tens[name] = Ten(f"self.{attr}", shape[-1] if shape else 1, shape=shape)

    def bind(self, name: str, value: ast.Expr) -> None:
        v = self.value(value, name)
        if not isinstance(v, Ten):
            self.consts[name] = v
            self.tens.pop(name, None)
            return
        self.consts.pop(name, None)  # a name bound to a constant before is a tensor now
        var = self.local(name)
        self.emit(f"{var} = {v.code}")
        self.tens[name] = Ten(var, v.feat, v.tokens, v.shape)

    def memory(self, s: ast.StmtMemory) -> None:
        from nestc.codegen.memories import plan

        self.ahead.pop(s.name, None)  # declared: its own clauses read it as it is
        mem = plan(self, s)
        early = self.early.pop(id(s), None)
        if early is None:
            mem.attr = self.add(s.name, plan=mem)
        else:  # read above: the reads' code names the reserved submodule; check them now
            mem.attr, early.sub.plan = early.sub.attr, mem
            for q, span, emitted in early.reads:
                if mem.read_start(self, q, span).feat != emitted.feat:
                    raise NestError(f"the sizes of memory `{s.name}` change between this read "
                                    "and its declaration", span, kind="shape")
        self.mems[s.name] = mem
        self.writing = mem
        write = mem.write(self)
        self.writing = None
        self.writes[mem] = len(self.cls.body)
        if write is not None:
            self.cls.body += wrapped(f"_env[{mem.attr!r}] = {write[0]}", write[1], 8)

    def settle(self) -> None:
        """Memories that nothing reads after their writes (those read only above their
        declarations, at chunk starts) still learn: each is run for its state alone (an MLP
        memory computes no read; the others read their keys, the read discarded)."""
        for mem in self.writes:
            key = getattr(mem, "keys", None)
            if key is not None and not self.reads.get(mem):
                self.emit(f"# memory `{mem.name}` learns, read by nothing after its writes")
                self.reads[mem] = [(len(self.cls.body), key)]
                self.settled.add(mem)
                self.emit(mem.settle(self, key))

    def run_siblings_as_one(self) -> None:
        """MLP memories that can run as one (nestc.memories._Siblings): the same structure,
        one read each, all of the same query, after all of them are written. Not on the
        reference tier, which stays the definition (nestc.memories.run_as_one decides that)."""
        from nestc.codegen.memories import MLPPlan

        groups: dict[Any, list[MLPPlan]] = {}
        for mem in self.writes:
            if isinstance(mem, MLPPlan) and len(self.reads.get(mem, [])) == 1 and \
                    not mem.config["shared"]:
                q = self.reads[mem][0][1]
                # (memories that only learn run together, apart from those read)
                groups.setdefault((mem.sibling_key(), id(q), mem in self.settled),
                                  []).append(mem)
        for members in groups.values():
            if len(members) < 2 or max(self.writes[m] for m in members) >= \
                    min(self.reads[m][0][0] for m in members):
                continue
            keys = {m.value_key for m in members}
            same = len(keys) == 1 and None not in keys
            self.cls.groups.append(([m.attr for m in members], same))
            for m in members:
                m.group = [o.attr for o in members if o is not m]

    # expressions --------------------------------------------------------------------------

    def const(self, e: ast.Expr) -> Any:
        v = const_eval(e, self.consts)
        if v is UNKNOWN:
            raise NestError("this must be known from the hyperparameters alone", e.span,
                            kind="value")
        return v

    def size(self, e: ast.Expr, what: str, minimum: int = 1) -> int:
        """A count fixed by the hyperparameters (a width, heads, a window, a chunk): a whole
        number of at least `minimum`, else a NestError at e."""
        v = self.const(e)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or \
                v < minimum:
            shown = repr(v) if not isinstance(v, float) or v != int(v) else str(v)
            raise NestError(f"{what} must be a whole number of at least {minimum}, got {shown}",
                            e.span, kind="value")
        return int(v)

    def number(self, e: ast.Expr, what: str) -> float:
        """A number fixed by the hyperparameters (an eps, a clip, a rate), else a NestError."""
        v = self.const(e)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise NestError(f"{what} must be a number, got {v!r}", e.span, kind="type")
        return float(v)

    def number_kw(self, call: ast.ExprCall, name: str, default: float, what: str,
                  positive: bool = False) -> float:
        """number() of a keyword argument of call, or its default; above 0 where `positive`
        (an eps of -1 or a softplus beta of 0 made NaN or inf)."""
        for k in call.kwargs:
            if k.name == name:
                v = self.number(k.value, what)
                if positive and not v > 0:
                    raise NestError(f"{what} must be above 0, got {v}", k.value.span,
                                    kind="value")
                return v
        return default

    def size_kw(self, call: ast.ExprCall, name: str, default: int, what: str,
                minimum: int = 1) -> int:
        """size() of a keyword argument of call, or its default."""
        for k in call.kwargs:
            if k.name == name:
                return self.size(k.value, what, minimum)
        return default

    def tensor(self, e: ast.Expr, hint: str, fixed: bool = False) -> Ten:
        """A tensor: one value per token, or (`fixed`: element-wise functions) a param's."""
        v = self.value(e, hint)
        if not isinstance(v, Ten):
            raise NestError("a tensor is needed here, not a constant", e.span, kind="type")
        if v.shape is not None and not fixed:
            raise NestError(f"this takes a sequence [T, features], not a param's tensor of "
                            f"shape {list(v.shape)}", e.span, kind="shape",
                            hint="read the param with a sequence: `x @ W`, `x * b`")
        return v

    def shadowing(self) -> set[str]:
        """Names that are not the builtins here: memories (also those read above their
        declaration) and declarations of the program (a block named `exp`)."""
        return {*self.mems, *self.ahead, *self.checked.scope}

    def value(self, e: ast.Expr, hint: str) -> Any:
        """A constant (Python value) or a Ten."""
        c = const_eval(e, self.consts)
        if c is UNKNOWN:  # builtins of numbers alone, computed (`x / sqrt(dim)`)
            e = fold_numbers(e, self.consts, self.shadowing())
            c = const_eval(e, self.consts)
        if c is not UNKNOWN:
            return c
        if isinstance(e, ast.ExprName):
            if e.name in self.tens:
                return self.tens[e.name]
            raise NestError(f"`{e.name}` is not a tensor here", e.span, kind="name")
        if isinstance(e, ast.ExprBinary):
            return self.binary(e, hint)
        if isinstance(e, ast.ExprUnary):
            x = self.tensor(e.operand, hint, fixed=True)
            if e.op == "-":
                return Ten(f"(-{x.code})", x.feat, shape=x.shape)
            if e.op == "not":  # 1 where x is 0
                return replace(x, code=f"_layers.eq({x.code}, 0)")
            if e.op != "+":
                raise unsupported(f"`{e.op}` on a tensor", e.span)
            return x
        if isinstance(e, ast.ExprCall):
            return self.call(e, hint)
        if isinstance(e, ast.ExprCond):
            cond = const_eval(e.cond, self.consts)
            if cond is not UNKNOWN:  # a hyperparameter's choice: that branch only
                return self.value(e.then if cond else e.orelse, hint)
            return self.elementwise("_layers.where", [e.cond, e.then, e.orelse], e.span,
                                    "`if ... then ... else`", hint)
        raise unsupported(f"this expression ({type(e).__name__}) in a block", e.span)

    def binary(self, e: ast.ExprBinary, hint: str) -> Ten:
        if e.op == "@":
            return self.matmul(e, hint)
        if e.op not in ("+", "-", "*", "/", "**", "%", "and", "or", *COMPARISONS):
            raise unsupported(f"`{e.op}` on tensors", e.span)
        [a, b], like = self.operands([e.left, e.right], e.span, f"`{e.op}`", hint)
        if e.op in COMPARISONS:  # 1 or 0 in the operands' dtype (nestc.layers)
            return replace(like, code=f"_layers.{COMPARISONS[e.op]}({a}, {b})")
        if e.op in ("and", "or"):  # of truths (not 0): 1 or 0, element-wise
            return replace(like, code=f"_layers.{e.op}_({a}, {b})")
        return replace(like, code=f"({a} {e.op} {b})")

    def matmul(self, e: ast.ExprBinary, hint: str) -> Ten:
        """`x @ W`: a sequence (or a param's matrix) times a param's matrix."""
        a = self.tensor(e.left, hint, fixed=True)
        b = self.tensor(e.right, hint, fixed=True)
        if a.tokens or b.shape is None or len(b.shape) != 2 or \
                (a.shape is not None and len(a.shape) != 2):
            raise unsupported("`@` other than a sequence or a param's matrix times a param's "
                              "matrix (`x @ W`)", e.span)
        if a.feat != b.shape[0]:
            raise NestError(f"`@` of {a.feat} features by a matrix of shape {list(b.shape)}",
                            e.span, kind="shape")
        shape = None if a.shape is None else (a.shape[0], b.shape[1])
        return Ten(f"({a.code} @ {b.code})", b.shape[1], shape=shape)

    def operands(self, args: list[ast.Expr], span: Any, what: str,
                 hint: str) -> tuple[list[str], Ten]:
        """The code of element-wise operands (tensors or numbers, at least one a tensor), and
        what the result is (its code to be set): the tensors' widths must agree, or be 1
        (broadcast). With a sequence, a param's tensor has at most one dim (its features);
        params alone broadcast as torch does."""
        values = [self.value(a, hint) for a in args]
        for a, v in zip(args, values):
            if not isinstance(v, (Ten, int, float)):  # (bools are ints: 1 and 0)
                raise NestError(f"{what} takes tensors and numbers, got {show_value(v)}",
                                a.span, kind="type")
        tens = [v for v in values if isinstance(v, Ten)]
        if not tens:  # (the checker computes an all-constant expression)
            raise NestError(f"{what} needs a tensor here", span, kind="type")
        if any(v.tokens for v in tens):
            raise NestError(f"{what} takes features, not token ids; embed them first", span,
                            kind="type")
        fixed = [v.shape for v in tens if v.shape is not None]
        if len(fixed) < len(tens) and any(len(shape) > 1 for shape in fixed):
            raise NestError(f"{what} of a sequence and a param's tensor of shape "
                            f"{list(next(sh for sh in fixed if len(sh) > 1))}", span,
                            kind="shape", hint="a matrix reads a sequence as `x @ W`")
        shape = None
        if len(fixed) == len(tens):
            try:
                shape = broadcast(fixed)
            except ValueError:
                raise NestError(f"{what} of params of shapes "
                                f"{' and '.join(str(list(sh)) for sh in fixed)}", span,
                                kind="shape") from None
        feats = sorted({v.feat for v in tens} - {1})
        if len(feats) > 1:
            raise NestError(f"{what} of tensors with {' and '.join(map(str, feats))} features",
                            span, kind="shape")
        code = [v.code if isinstance(v, Ten) else operand(v) for v in values]
        return code, Ten("", feats[0] if feats else 1, shape=shape)

    def elementwise(self, fn: str, args: list[ast.Expr], span: Any, what: str,
                    hint: str) -> Ten:
        """fn(a, b, ...) of element-wise operands."""
        code, like = self.operands(args, span, what, hint)
        return replace(like, code=f"{fn}({', '.join(code)})")

    def call(self, e: ast.ExprCall, hint: str) -> Any:
        from nestc.codegen.layers import compile_call

        if isinstance(e.func, ast.ExprCall):  # Block(hyper...)(x): a sub-block
            return self.subblock(e, hint)
        if not isinstance(e.func, ast.ExprName):
            raise unsupported("calling this expression", e.span)
        name = e.func.name
        if name in self.ahead and name not in BUILTINS and name not in self.checked.scope:
            return self.read_ahead(e, hint)
        if name in self.mems:
            mem = self.mems[name]
            if len(e.args) != 1:
                raise NestError(f"memory `{name}` is read with one argument", e.span,
                                kind="value")
            if mem is self.writing:  # (an MLP memory's own reads go through its `let`s)
                raise unsupported(f"reading memory `{name}` in its own clauses", e.span)
            q = self.tensor(e.args[0], hint)
            # read in the line being generated (the output: after every other line)
            self.reads.setdefault(mem, []).append((len(self.cls.body), q))
            return mem.read(self, q, e.span)
        decl = self.checked.scope.get(name)
        if decl is not None and decl.kind == "block":
            raise NestError(f"block `{name}` is called as {name}(hyperparameters)(x)", e.span,
                            kind="value")
        return compile_call(self, e, hint)

    def read_ahead(self, e: ast.ExprCall, hint: str) -> Ten:
        """M(q) above M's declaration: a read at the start of M's chunk. The plan waits for
        the declaration (its sizes and chunk are evaluated there); the read's width comes
        from the structure's sizes as they are here, checked against the plan then."""
        from nestc.codegen.memories import _call, unsupported_read_start

        assert isinstance(e.func, ast.ExprName)
        s, prefix = self.ahead[e.func.name]
        if len(e.args) != 1:
            raise NestError(f"memory `{s.name}` is read with one argument", e.span, kind="value")
        q = self.tensor(e.args[0], hint)
        structure = _call(s.structure)
        kind = structure[0] if structure else None
        if kind not in ("matrix", "mlp", "residual_mlp"):
            raise unsupported_read_start(s.name, e.span)
        if q.tokens:
            raise NestError(f"memory `{s.name}` reads features, not token ids", e.span,
                            kind="shape")
        out = q.feat
        if kind == "matrix" and structure is not None:
            a, b = (self.size(x, "a matrix memory's size") for x in structure[1].args[:2])
            if q.feat % a:
                raise NestError(f"memory `{s.name}` reads {a} features per head, got {q.feat}",
                                e.span, kind="shape")
            out = q.feat // a * b
        early = self.early.get(id(s))
        if early is None:
            outer, self.prefix = self.prefix, prefix
            self.add(s.name)  # reserved here, in the order of first use
            self.prefix = outer
            early = self.early[id(s)] = _Ahead(self.cls.subs[-1])
        emitted = Ten(f"self.{early.sub.attr}.read_start({q.code}, _env)", out)
        early.reads.append((q, e.span, emitted))
        return emitted

    def subblock(self, e: ast.ExprCall, hint: str) -> Ten:
        assert isinstance(e.func, ast.ExprCall)
        head = e.func
        name = qualified_name(head.func)  # `Block` or `alias.Block` (imported `as alias`)
        if name is None:
            raise unsupported("calling this expression", e.span)
        decl = self.checked.scope.get(name)
        if decl is None or decl.kind != "block":
            raise NestError(f"`{name}` is not a block", head.func.span, kind="name")
        checked = self.g.program.lookup(decl)
        names = list(checked.hypers)
        if len(head.args) > len(names):
            raise NestError(f"block `{decl.name}` takes {len(names)} hyperparameters",
                            head.span, kind="value")
        hyper = {names[i]: self.const(a) for i, a in enumerate(head.args)}
        hyper.update({k.name: self.const(k.value) for k in head.kwargs})
        if len(e.args) != 1 or e.kwargs:
            raise NestError(f"block `{decl.name}` takes one input", e.span, kind="value")
        x = self.tensor(e.args[0], hint)
        takes = next((st for st in checked.decl.body if isinstance(st, ast.StmtInput)), None)
        if takes is not None and (takes.shape.dtype == "int") != x.tokens:  # at the call
            got = "token ids" if x.tokens else f"a sequence of {x.feat} features"
            raise NestError(f"block `{decl.name}` takes "
                            f"{'token ids' if takes.shape.dtype == 'int' else 'features'} (its "
                            f"input `{takes.name}`), got {got}", e.args[0].span, kind="shape",
                            hint="embed token ids first" if x.tokens else None)
        sub = self.g.decl(checked, hyper, in_feat=x.feat, call=head.span, copies=self.copies,
                          arg=e.args[0].span)
        attr = self.add(decl.name, f"{sub.name}(backend)", cls=sub)
        # through the module's __call__, so that hooks on it run (FSDP's per-block sharding,
        # a sub-block's own torch.compile, forward hooks)
        return Ten(f"self.{attr}({x.code}, _env=_env)", sub.out_feat)
