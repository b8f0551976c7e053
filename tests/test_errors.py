"""Every user mistake is a NestError whose whole text is pinned here: `file:line:col: error:`,
the source line, a caret under the span, notes and a hint. Lark's token names never show."""

from __future__ import annotations

import re

import pytest
from conftest import spec

import nestc
from nestc.errors import Diagnostic, NestError
from nestc.parse import parser
from nestc.source import Source, Span, point

CASES = [
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            output x
        """,
        """
        t.nest:3:13: error: unexpected end of file, expected `}`
           3 |     output x
             |             ^
        t.nest:1:20: note: this `{` has no matching `}`
           1 | block Mem(dim = 8) {
             |                    ^
        """,
        id="missing_brace",
    ),
    pytest.param(
        """
        block Mem(dim = 8 {
            input x : [T, dim]
        }
        """,
        """
        t.nest:1:19: error: unexpected `{`, expected `)` or `,`
           1 | block Mem(dim = 8 {
             |                   ^
        """,
        id="missing_paren_in_params",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            let y = linear(x dim)
            output x
        }
        """,
        """
        t.nest:3:22: error: unexpected `dim`, expected an operator, `)`, `,` or `=`
           3 |     let y = linear(x dim)
             |                      ^~~
          hint: a `,` may be missing between items
        """,
        id="missing_comma_in_args",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1 momentum = 0.9) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:24: error: unexpected `momentum`, expected `)` or `,`
           1 | optimizer SGD(lr = 0.1 momentum = 0.9) {
             |                        ^~~~~~~~
          hint: a `,` may be missing between items
        """,
        id="missing_comma_in_params",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every 16 token { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:50: error: unexpected `token`, expected `tokens` or `steps`
           3 |     memory M : matrix(dim, dim) = zeros every 16 token { objective l2(M(x), x); rule gd }
             |                                                  ^~~~~
          hint: did you mean `every 16 tokens`?
        """,
        id="every_16_token",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every tokens { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:41: error: `every tokens` is not a frequency
           3 |     memory M : matrix(dim, dim) = zeros every tokens { objective l2(M(x), x); rule gd }
             |                                         ^~~~~~~~~~~~
          hint: did you mean `every token` or `every N tokens`?
        """,
        id="every_tokens",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every 16 { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:50: error: unexpected `{`, expected `tokens` or `steps`
           3 |     memory M : matrix(dim, dim) = zeros every 16 { objective l2(M(x), x); rule gd }
             |                                                  ^
          hint: did you mean `every 16 tokens` or `every 16 steps`?
        """,
        id="every_16_brace",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every -4 tokens { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:47: error: unexpected `-` after `every`, expected `token`, `step` or a number
           3 |     memory M : matrix(dim, dim) = zeros every -4 tokens { objective l2(M(x), x); rule gd }
             |                                               ^
          hint: a frequency is `every token`, `every N tokens`, `every step`, `every N steps` or `never`
        """,
        id="every_negative",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            memory m = zeros_like(W) every step in chunks of 4 { objective l2(m, grad(W)); rule gd }
            W -= lr * m
        }
        """,
        """
        t.nest:3:41: error: a `step` frequency has no chunks
           3 |     memory m = zeros_like(W) every step in chunks of 4 { objective l2(m, grad(W)); rule gd }
             |                                         ^~~~~~~~~
          hint: chunks belong to token frequencies: `every 16 tokens in chunks of 64`
        """,
        id="every_steps_chunked",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memroy M : matrix(dim, dim) = zeros every token { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:5: error: `memroy` is not a keyword
           3 |     memroy M : matrix(dim, dim) = zeros every token { objective l2(M(x), x); rule gd }
             |     ^~~~~~
          hint: did you mean `memory`?
        """,
        id="memroy",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros evry token { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:41: error: `evry` is not a keyword
           3 |     memory M : matrix(dim, dim) = zeros evry token { objective l2(M(x), x); rule gd }
             |                                         ^~~~
          hint: did you mean `every`?
        """,
        id="evry",
    ),
    pytest.param(
        """
        optimzer SGD(lr = 0.1) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:1: error: unexpected `optimzer`, expected `block`, `from`, `import`, `model` or `optimizer`
           1 | optimzer SGD(lr = 0.1) {
             | ^~~~~~~~
          hint: did you mean `optimizer`?
        """,
        id="optimzer",
    ),
    pytest.param(
        """
        block Mem(dim = 8, name = 'mem') {
            input x : [T, dim]
            output x
        }
        """,
        """
        t.nest:1:27: error: unexpected character `'`
           1 | block Mem(dim = 8, name = 'mem') {
             |                           ^
          hint: strings use double quotes: "..."
        """,
        id="single_quotes",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            if lr > 0 && lr < 1 { W -= lr * grad(W) }
        }
        """,
        """
        t.nest:3:15: error: unexpected character `&`
           3 |     if lr > 0 && lr < 1 { W -= lr * grad(W) }
             |               ^
          hint: write `and` for a logical and
        """,
        id="double_ampersand",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            let s = "abc
            output x
        }
        """,
        """
        t.nest:3:13: error: this string is not closed
           3 |     let s = "abc
             |             ^
          hint: a string ends with `"` on the same line
        """,
        id="unclosed_string",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            W -= lr * grad(W))
        }
        """,
        """
        t.nest:3:22: error: unexpected `)`, expected a statement or `}`
           3 |     W -= lr * grad(W))
             |                      ^
          hint: this `)` has no matching `(`
        """,
        id="extra_paren",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            let g = sqrt(grad(W)
            W -= lr * g
        }
        """,
        """
        t.nest:4:5: error: unexpected `W`, expected `)` or `,`
           4 |     W -= lr * g
             |     ^
        t.nest:3:17: note: this `(` has no matching `)`
           3 |     let g = sqrt(grad(W)
             |                 ^
        """,
        id="unclosed_paren_before_next_line",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            let ok = 0 < lr < 1
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:3:21: error: comparisons do not chain
           3 |     let ok = 0 < lr < 1
             |                     ^
          hint: write `a < b and b < c`
        """,
        id="chained_comparison",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            y = x
            output x
        }
        """,
        """
        t.nest:3:5: error: `y` is not defined
           3 |     y = x
             |     ^
          hint: define it first: `let y = ...`
        """,
        id="assign_undefined_after_shape",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            lett y = x
            output y
        }
        """,
        """
        t.nest:3:5: error: `lett` is not a keyword
           3 |     lett y = x
             |     ^~~~
          hint: did you mean `let`?
        """,
        id="lett_after_shape",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            W -= lr * grd(W)
        }
        """,
        """
        t.nest:3:15: error: unknown name `grd`
           3 |     W -= lr * grd(W)
             |               ^~~
          hint: did you mean `grad` or `gd`?
        """,
        id="unknown_name",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            W -= lr * zzz
        }
        """,
        """
        t.nest:3:15: error: unknown name `zzz`
           3 |     W -= lr * zzz
             |               ^~~
        """,
        id="unknown_name_no_match",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            memory m = zeros_like(W) every step { objective l2(m, grad(W)); rule gdd(lr = 0.1) }
            W -= lr * m
        }
        """,
        """
        t.nest:3:74: error: unknown learning rule `gdd`
           3 |     memory m = zeros_like(W) every step { objective l2(m, grad(W)); rule gdd(lr = 0.1) }
             |                                                                          ^~~
          hint: did you mean `gd` or `dgd`?
        """,
        id="unknown_rule",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            W -= lr * sqrt(W, grad(W))
        }
        """,
        """
        t.nest:3:15: error: `sqrt` takes 1 positional argument, got 2
           3 |     W -= lr * sqrt(W, grad(W))
             |               ^~~~~~~~~~~~~~~~
          hint: element-wise square root
        """,
        id="builtin_arity",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            let y = x |> linear
            output x
        }
        """,
        """
        t.nest:3:13: error: `linear` takes 2 positional arguments, got 1 (the value before `|>` counts as the first)
           3 |     let y = x |> linear
             |             ^~~~~~~~~~~
          hint: a linear projection to `out` features
        """,
        id="builtin_arity_pipe",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            W -= lr * (grad(W) |> sqrt(W))
        }
        """,
        """
        t.nest:3:16: error: `sqrt` takes 1 positional argument, got 2 (the value before `|>` counts as the first)
           3 |     W -= lr * (grad(W) |> sqrt(W))
             |                ^~~~~~~~~~~~~~~~~~
          hint: element-wise square root
        """,
        id="builtin_arity_pipe_many",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            let y = x |> l2norm(pr = 2)
            output x
        }
        """,
        """
        t.nest:3:25: error: `l2norm` has no keyword `pr`
           3 |     let y = x |> l2norm(pr = 2)
             |                         ^~~~~~
          hint: did you mean `per`?
        """,
        id="builtin_keyword",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            let y = x |> silu(beta = 2)
            output x
        }
        """,
        """
        t.nest:3:23: error: `silu` has no keyword `beta`
           3 |     let y = x |> silu(beta = 2)
             |                       ^~~~~~~~
          hint: it takes no keywords
        """,
        id="builtin_keyword_none",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            let y = linear(x, dim, bias = true, bias = false)
            output x
        }
        """,
        """
        t.nest:3:41: error: keyword `bias` is given twice
           3 |     let y = linear(x, dim, bias = true, bias = false)
             |                                         ^~~~~~~~~~~~
        """,
        id="keyword_twice",
    ),
    pytest.param(
        """
        block Inner(dim, heads = 4) {
            input x : [T, dim]
            output x
        }

        block Outer(dim = 8) {
            input x : [T, dim]
            output x |> Inner(dim, head = 2)
        }
        """,
        """
        t.nest:8:28: error: `Inner` has no hyperparameter `head`
           8 |     output x |> Inner(dim, head = 2)
             |                            ^~~~~~~~
          hint: did you mean `heads`?
        """,
        id="decl_keyword",
    ),
    pytest.param(
        """
        block Inner(dim, heads = 4) {
            input x : [T, dim]
            output x
        }

        block Outer(dim = 8) {
            input x : [T, dim]
            output Inner(heads = 2)(x)
        }
        """,
        """
        t.nest:8:12: error: `Inner` needs a value for `dim`
           8 |     output Inner(heads = 2)(x)
             |            ^~~~~~~~~~~~~~~~
          hint: pass `dim = ...`: it has no default
        """,
        id="decl_missing_hyper",
    ),
    pytest.param(
        """
        block Inner(dim) {
            input x : [T, dim]
            output x
        }

        block Outer(dim = 8) {
            input x : [T, dim]
            output Inner(dim, 2)(x)
        }
        """,
        """
        t.nest:8:12: error: `Inner` takes at most 1 positional argument, got 2
           8 |     output Inner(dim, 2)(x)
             |            ^~~~~~~~~~~~~
          hint: its hyperparameters are dim
        """,
        id="decl_too_many",
    ),
    pytest.param(
        """
        block Inner(dim = 8) {
            input x : [T, dim]
            output x
        }

        optimizer SGD(lr = 0.1) {
            param W
            memory m = zeros_like(W) every step { objective l2(m, grad(W)); rule Inner }
            W -= lr * m
        }
        """,
        """
        t.nest:8:74: error: `Inner` is a block, not a learning rule
           8 |     memory m = zeros_like(W) every step { objective l2(m, grad(W)); rule Inner }
             |                                                                          ^~~~~
          hint: a rule is gd, dgd, momentum, or an optimizer
        """,
        id="rule_is_a_block",
    ),
    pytest.param(
        """
        optimizer SGD(lr: float = "fast") {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:27: error: the default of `lr` must be a float, got "fast"
           1 | optimizer SGD(lr: float = "fast") {
             |                           ^~~~~~
        """,
        id="default_wrong_type",
    ),
    pytest.param(
        """
        optimizer SGD(steps: int = 2.5) {
            param W
            W -= grad(W)
        }
        """,
        """
        t.nest:1:28: error: the default of `steps` must be an int, got 2.5
           1 | optimizer SGD(steps: int = 2.5) {
             |                            ^~~
        """,
        id="default_int_for_float",
    ),
    pytest.param(
        """
        optimizer Adam(betas: (float, float) = (0.9, true)) {
            param W
            W -= grad(W)
        }
        """,
        """
        t.nest:1:40: error: the default of `betas` must be a tuple (float, float), got (0.9, true)
           1 | optimizer Adam(betas: (float, float) = (0.9, true)) {
             |                                        ^~~~~~~~~~~
        """,
        id="default_tuple_type",
    ),
    pytest.param(
        """
        optimizer SGD(lr: flaot = 0.1) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:19: error: unknown type `flaot`
           1 | optimizer SGD(lr: flaot = 0.1) {
             |                   ^~~~~
          hint: did you mean `float`?
        """,
        id="unknown_type",
    ),
    pytest.param(
        """
        optimizer SGD(lr = W) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:20: error: the default of `lr` must be a constant
           1 | optimizer SGD(lr = W) {
             |                    ^
          hint: defaults are numbers, bools, strings, tuples, lists, or arithmetic on earlier hyperparameters
        """,
        id="default_not_constant",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 1 / 0) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:20: error: division by zero
           1 | optimizer SGD(lr = 1 / 0) {
             |                    ^~~~~
        """,
        id="default_division_by_zero",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 1e999999) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:20: error: number is too large for a float
           1 | optimizer SGD(lr = 1e999999) {
             |                    ^~~~~~~~
        """,
        id="huge_number",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 10 ** 10 ** 10) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:20: error: exponent is too large
           1 | optimizer SGD(lr = 10 ** 10 ** 10) {
             |                    ^~~~~~~~~~~~~~
        """,
        id="huge_power",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1, lr = 0.2) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:1:25: error: hyperparameter `lr` is declared twice
           1 | optimizer SGD(lr = 0.1, lr = 0.2) {
             |                         ^~~~~~~~
        """,
        id="duplicate_hyper",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            W -= lr * grad(W)
        }

        optimizer SGD(lr = 0.2) {
            param W
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:6:11: error: `SGD` is declared twice
           6 | optimizer SGD(lr = 0.2) {
             |           ^~~
        t.nest:1:11: note: first declared here
           1 | optimizer SGD(lr = 0.1) {
             |           ^~~
        """,
        id="duplicate_decl",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros never
            memory M : matrix(dim, dim) = zeros never
            output x
        }
        """,
        """
        t.nest:4:12: error: `M` is already defined
           4 |     memory M : matrix(dim, dim) = zeros never
             |            ^
        """,
        id="duplicate_memory",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            lr = lr / 2
            W -= lr * grad(W)
        }
        """,
        """
        t.nest:3:5: error: `lr` is a hyperparameter: it cannot be updated
           3 |     lr = lr / 2
             |     ^~
          hint: bind a new name instead: `let lr2 = ...`
        """,
        id="update_hyper",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            x = x + 1
            output x
        }
        """,
        """
        t.nest:3:5: error: `x` is an input: it cannot be updated
           3 |     x = x + 1
             |     ^
        """,
        id="update_input",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            let dim = 4
            output x
        }
        """,
        """
        t.nest:3:9: error: `dim` is a hyperparameter and cannot be redefined
           3 |     let dim = 4
             |         ^~~
          hint: choose another name
        """,
        id="redefine_hyper",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            memory m = zeros_like(W) every token { objective l2(m, grad(W)); rule gd }
            W -= lr * m
        }
        """,
        """
        t.nest:3:30: error: an optimizer's levels update in steps, not tokens
           3 |     memory m = zeros_like(W) every token { objective l2(m, grad(W)); rule gd }
             |                              ^~~~~~~~~~~
          hint: write `every step` or `every N steps`
        """,
        id="token_frequency_in_optimizer",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every step { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:41: error: a memory in a block learns in context, in tokens
           3 |     memory M : matrix(dim, dim) = zeros every step { objective l2(M(x), x); rule gd }
             |                                         ^~~~~~~~~~
          hint: write `every N tokens`; use `never` for a memory that only the outer training level changes
        """,
        id="step_frequency_in_block",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every 16 tokens in chunks of 24 { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:70: error: chunks of 24 tokens never line up with an update every 16 tokens
           3 |     memory M : matrix(dim, dim) = zeros every 16 tokens in chunks of 24 { objective l2(M(x), x); rule gd }
             |                                                                      ^~
          hint: make the chunk a multiple of 16
        """,
        id="chunk_not_multiple",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros never { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:41: error: memory `M` never updates but has a learning rule
           3 |     memory M : matrix(dim, dim) = zeros never { objective l2(M(x), x); rule gd }
             |                                         ^~~~~
          hint: remove `never`, or its objective and rule
        """,
        id="never_with_rule",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every 0 tokens { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:47: error: the update period must be a positive whole number, got 0
           3 |     memory M : matrix(dim, dim) = zeros every 0 tokens { objective l2(M(x), x); rule gd }
             |                                               ^
        """,
        id="zero_period",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every (dim / 3) tokens { objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:48: error: the update period must be a positive whole number, got 2.6666666666666665
           3 |     memory M : matrix(dim, dim) = zeros every (dim / 3) tokens { objective l2(M(x), x); rule gd }
             |                                                ^~~~~~~
        """,
        id="fractional_period",
    ),
    pytest.param(
        """
        model LM(vocab = 16, dim = 8) {
            input tokens : [T] int
            output logits = embed(tokens, vocab, dim) |> linear(vocab)
            train every token { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
        }
        """,
        """
        t.nest:4:11: error: the train level updates in steps, not tokens
           4 |     train every token { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
             |           ^~~~~~~~~~~
          hint: write `every step` or `every N steps`
        """,
        id="train_every_token",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            let g = 1
        }
        """,
        """
        t.nest:1:11: error: optimizer `SGD` has no `param`
           1 | optimizer SGD(lr = 0.1) {
             |           ^~~
          hint: declare the tensor it updates: `param W`
        """,
        id="optimizer_without_param",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            let g = grad(W)
        }
        """,
        """
        t.nest:1:11: error: optimizer `SGD` never updates `W`
           1 | optimizer SGD(lr = 0.1) {
             |           ^~~
          hint: add an update such as `W -= lr * grad(W)`
        """,
        id="optimizer_never_updates",
    ),
    pytest.param(
        """
        model LM(vocab = 16, dim = 8) {
            input tokens : [T] int
            output logits = embed(tokens, vocab, dim) |> linear(vocab)
        }
        """,
        """
        t.nest:1:7: error: model `LM` has no `train` level
           1 | model LM(vocab = 16, dim = 8) {
             |       ^~
          hint: add `train every step { objective ...; rule ... }`, or declare it as a `block`
        """,
        id="model_without_train",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            memory m = meta every step { objective l2(m, grad(W)); rule gd }
            W -= lr * m
        }
        """,
        """
        t.nest:3:16: error: `meta` needs an outer level to learn the initial state; an optimizer has none
           3 |     memory m = meta every step { objective l2(m, grad(W)); rule gd }
             |                ^~~~
          hint: use `zeros_like(W)`
        """,
        id="meta_in_optimizer",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every token { key x; value x }
            output x
        }
        """,
        """
        t.nest:3:12: error: memory `M` has no learning rule
           3 |     memory M : matrix(dim, dim) = zeros every token { key x; value x }
             |            ^
          hint: add `objective ...; rule ...`, an update such as `m = beta * m + g`, or `never`
        """,
        id="memory_without_rule",
    ),
    pytest.param(
        """
        block B(dim = 6, heads = 4) {
            input x : [T, dim]
            require dim % heads == 0, "heads divide dim"
            output x
        }
        """,
        """
        t.nest:3:5: error: block `B`: heads divide dim
           3 |     require dim % heads == 0, "heads divide dim"
             |     ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
          hint: got dim = 6, heads = 4
        """,
        id="require_unmet_by_the_defaults",
    ),
    pytest.param(
        """
        block B(dim = 8) {
            input x : [T, dim]
            let h = dim / 2
            require h > 2
            output x
        }
        """,
        """
        t.nest:4:13: error: a `require` tests hyperparameters only; `h` is not one
           4 |     require h > 2
             |             ^
        """,
        id="require_of_a_let",
    ),
    pytest.param(
        """
        block B(dim = 8) {
            input x : [T, dim]
            memory M : mlp(dim) = meta every token {
                require dim > 2
                key x; value x; objective l2(M(x), x); rule gd(lr = 0.1)
            }
            output M(x)
        }
        """,
        """
        t.nest:4:9: error: `require` belongs at the top of a declaration's body
           4 |         require dim > 2
             |         ^~~~~~~~~~~~~~~
          hint: it states what the hyperparameters must meet
        """,
        id="require_inside_a_memory",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every token { rule gd }
            output x
        }
        """,
        """
        t.nest:3:55: error: memory `M` has a rule but no objective
           3 |     memory M : matrix(dim, dim) = zeros every token { rule gd }
             |                                                       ^~~~~~~
          hint: add `objective l2(M(k), v)` or another
        """,
        id="rule_without_objective",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : matrix(dim, dim) = zeros every token { key x; key x; objective l2(M(x), x); rule gd }
            output x
        }
        """,
        """
        t.nest:3:62: error: memory `M` has two `key` clauses
           3 |     memory M : matrix(dim, dim) = zeros every token { key x; key x; objective l2(M(x), x); rule gd }
             |                                                              ^~~~~
        t.nest:3:55: note: the first one
           3 |     memory M : matrix(dim, dim) = zeros every token { key x; key x; objective l2(M(x), x); rule gd }
             |                                                       ^~~~~
        """,
        id="two_key_clauses",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            memory M : mlp(dim) = meta every token { dgd literal; objective l2(M(x), x); rule gd }
            output M(x)
        }
        """,
        """
        t.nest:3:46: error: `dgd literal` says how the `dgd` rule resolves, but the rule of memory `M` is `gd`
           3 |     memory M : mlp(dim) = meta every token { dgd literal; objective l2(M(x), x); rule gd }
             |                                              ^~~~~~~~~~~
        t.nest:3:82: note: the rule
           3 |     memory M : mlp(dim) = meta every token { dgd literal; objective l2(M(x), x); rule gd }
             |                                                                                  ^~~~~~~
          hint: write `rule dgd(lr = ..., retain = ...)`, or remove the choice
        """,
        id="dgd_choice_without_the_dgd_rule",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            key x
            output x
        }
        """,
        """
        t.nest:3:5: error: `key` belongs inside a memory or train body
           3 |     key x
             |     ^~~~~
        """,
        id="clause_outside_memory",
    ),
    pytest.param(
        """
        optimizer SGD(lr = 0.1) {
            param W
            output W
        }
        """,
        """
        t.nest:3:5: error: an optimizer has no `output`: it updates its `param`
           3 |     output W
             |     ^~~~~~~~
        """,
        id="output_in_optimizer",
    ),
    pytest.param(
        """
        block Mem(dim = 8) {
            input x : [T, dim]
            train every step { objective task; rule gd }
            output x
        }
        """,
        """
        t.nest:3:5: error: `train` belongs in a model; `Mem` is a block
           3 |     train every step { objective task; rule gd }
             |     ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
          hint: declare it as `model`
        """,
        id="train_in_block",
    ),
    pytest.param(
        """
        import "missing.nest"
        """,
        """
        t.nest:1:8: error: no such file: `missing.nest`
           1 | import "missing.nest"
             |        ^~~~~~~~~~~~~~
        """,
        id="import_missing_file",
    ),
    pytest.param(
        """
        import "std/../secrets.nest"
        """,
        """
        t.nest:1:8: error: `std/../secrets.nest` leaves the standard library
           1 | import "std/../secrets.nest"
             |        ^~~~~~~~~~~~~~~~~~~~~
          hint: std/ paths name files inside the stdlib, such as std/optim/adam.nest
        """,
        id="import_escapes_stdlib",
    ),
    pytest.param(
        """
        from "std/optim/adam.nest" import Adamm
        """,
        """
        t.nest:1:1: error: `std/optim/adam.nest` declares no `Adamm`
           1 | from "std/optim/adam.nest" import Adamm
             | ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
          hint: did you mean `Adam` or `AdamW`?
        """,
        id="import_missing_name",
    ),
    pytest.param(
        """
        import "std/optim"
        """,
        """
        t.nest:1:8: error: `std/optim` is not a .nest file
           1 | import "std/optim"
             |        ^~~~~~~~~~~
        """,
        id="import_not_nest",
    ),
    pytest.param(
        """
        block B(dim = 8) {
            input x : [T, dim]
            output x.foo
        }
        """,
        """
        t.nest:3:12: error: `.foo` names a declaration of a file imported with `as`; `x` is not such a file
           3 |     output x.foo
             |            ^~~~~
          hint: import a file as a name: `import "file.nest" as t`, then `t.Block`
        """,
        id="attribute_of_a_tensor",
    ),
    pytest.param(
        """
        optimizer O(lr = 0.1) {
            param W
            W -= lr * grad(W).T
        }
        """,
        """
        t.nest:3:15: error: `.T` names a declaration of a file imported with `as`; `grad(W)` is not such a file
           3 |     W -= lr * grad(W).T
             |               ^~~~~~~~~
          hint: `transpose(x)` swaps the last two dims
        """,
        id="attribute_T",
    ),
    pytest.param(
        """
        model M(vocab = 16, dim = 8) {
            input tokens : [T] int
            output logits = embed(tokens, vocab, dim) |> linear(vocab)
            train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
            train every 2 steps { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.5) }
        }
        """,
        """
        t.nest:5:5: error: model `M` has a second `train` level
           5 |     train every 2 steps { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.5) }
             |     ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
        t.nest:4:5: note: the first
           4 |     train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
             |     ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
          hint: a model trains on one objective with one rule
        """,
        id="second_train_level",
    ),
    pytest.param(
        """
        model M(vocab = 16, dim = 8, fast = true) {
            input tokens : [T] int
            output logits = embed(tokens, vocab, dim) |> linear(vocab)
            if fast { train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) } }
        }
        """,
        """
        t.nest:4:15: error: `train` is the model's outermost level: it goes at the top of the model's body, not inside another statement
           4 |     if fast { train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) } }
             |               ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
        """,
        id="train_inside_if",
    ),
    pytest.param(
        """
        block B(dim = 8) {
            input x : [T, dim]
            let h = x
            chain dim in [4] { h = h |> linear(dim) }
            output h
        }
        """,
        """
        t.nest:4:5: error: `dim` is a hyperparameter and cannot be redefined
           4 |     chain dim in [4] { h = h |> linear(dim) }
             |     ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
          hint: choose another name for the chain's variable
        """,
        id="chain_over_a_hyperparameter",
    ),
    pytest.param(
        "block B(dim = 8, z: " + "list[" * 40 + "int" + "]" * 40 + " = []) {\n"
        "    input x : [T, dim]\n    output x\n}\n",
        None, id="type_nested_too_deep",
    ),
    pytest.param(
        "optimizer O(lr = " + "[" * 40 + "1" + "]" * 40 + ") {\n"
        "    param W\n    W -= grad(W)\n}\n",
        None, id="default_nested_too_deep",
    ),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_error_text(error_of, text, expected):
    if expected is None:  # (a line too long to pin: its first line)
        first = error_of(text).splitlines()[0]
        assert re.fullmatch(r"t\.nest:1:\d+: error: this (type|value) nests lists or tuples "
                            r"more than 32 deep", first), first
        return
    assert error_of(text) == spec(expected).rstrip("\n")


LARK_NAMES = sorted({t.name for t in parser().terminals} | {"$END"}, key=len, reverse=True)


def assert_no_lark_names(err: NestError) -> None:
    """No terminal name (NAME, LPAR, __ANON_0, $END, ...) in any message, hint or note."""
    for d in err.diagnostics:
        for text in (d.message, d.hint or "", *(n for n, _ in d.notes)):
            # user words are quoted in backticks; Lark's names would stand bare
            bare = re.sub(r"`[^`]*`", "", text)
            for name in LARK_NAMES:
                if len(name) > 1 and name.upper() == name:
                    assert not re.search(rf"(?<![\w$]){re.escape(name)}(?!\w)", bare), (name, text)


@pytest.mark.parametrize("text, expected", CASES)
def test_no_lark_token_names(text, expected):
    with pytest.raises(NestError) as info:
        nestc.loads(spec(text), "t.nest")
    assert_no_lark_names(info.value)


BROKEN = [
    "block", "block B", "block B(", "block B(x", "block B(x,", "block B(x = ", "block B() {",
    "block B() { let", "block B() { let x", "block B() { let x =", "block B() { let x = (",
    "block B() { let x = [1,", "block B() { memory", "block B() { memory M every",
    "block B() { memory M every 4", "import", "import \"a.nest\" as", "from \"a.nest\" import",
    "}", ")", "]", "block B() { output x |> }", "block B() { output x.1 }", "optimizer 3",
    "block B() { input x : [T }", "block B() { key }", "block B() { read during write }",
    "block B() { state per }", "block B() { if }", "block B() { chain c [1] {} }",
    "block B() { repeat {} }", "block B() { train every {} }", "block B() { let x = a ** }",
]


@pytest.mark.parametrize("text", BROKEN)
def test_syntax_errors_speak_words(text):
    with pytest.raises(NestError) as info:
        nestc.loads(text, "t.nest")
    assert info.value.kind == "syntax"
    assert_no_lark_names(info.value)
    assert str(info.value).startswith("t.nest:1:")


# --- overrides at build time ---------------------------------------------------------------------

OPTIMIZER = spec("""
    optimizer SGD(lr: float = 0.1, momentum = 0, betas = (0.9, 0.99), nesterov = false) {
        param W
        W -= lr * grad(W)
    }
""")


def bind_error(**overrides) -> str:
    decl = nestc.loads(OPTIMIZER, "sgd.nest").decl("SGD")
    with pytest.raises(NestError) as info:
        decl.bind(overrides)
    return str(info.value)


def test_override_of_the_wrong_type():
    assert bind_error(lr="fast") == spec("""
        sgd.nest:1:15: error: `lr` of `SGD` must be a float, got "fast"
           1 | optimizer SGD(lr: float = 0.1, momentum = 0, betas = (0.9, 0.99), nesterov = false) {
             |               ^~~~~~~~~~~~~~~
    """).rstrip("\n")


def test_override_with_an_unknown_name():
    assert bind_error(lrr=0.1) == spec("""
        sgd.nest:1:11: error: optimizer `SGD` has no hyperparameter `lrr`
           1 | optimizer SGD(lr: float = 0.1, momentum = 0, betas = (0.9, 0.99), nesterov = false) {
             |           ^~~
          hint: did you mean `lr`?
    """).rstrip("\n")


def test_override_tuple_of_the_wrong_length():
    assert bind_error(betas=(0.9,)) == spec("""
        sgd.nest:1:46: error: `betas` of `SGD` must be a tuple (float, float), got (0.9,)
           1 | optimizer SGD(lr: float = 0.1, momentum = 0, betas = (0.9, 0.99), nesterov = false) {
             |                                              ^~~~~~~~~~~~~~~~~~~
    """).rstrip("\n")


@pytest.mark.parametrize("name, value, words", [
    ("lr", "0.1", 'a float, got "0.1"'),  # no silent str -> float
    ("lr", True, "a float, got true"),  # no silent bool -> float
    ("momentum", None, "a number, got None"),
    ("nesterov", 1, "a bool, got 1"),
])
def test_overrides_are_strict(name, value, words):
    assert f"`{name}` of `SGD` must be {words}" in bind_error(**{name: value})


def test_overrides_that_fit_are_converted():
    decl = nestc.loads(OPTIMIZER, "sgd.nest").decl("SGD")
    assert decl.bind({"lr": 1, "betas": [0.8, 0.9]}) == {
        "lr": 1.0, "momentum": 0, "betas": (0.8, 0.9), "nesterov": False}
    assert isinstance(decl.bind({"lr": 1})["lr"], float)
    assert decl.bind({"momentum": 0.5})["momentum"] == 0.5


# --- the pieces of a report ----------------------------------------------------------------------


def test_caret_under_a_span():
    src = Source("a.nest", "let x = foo(1)\n")
    assert Span(src, 1, 9, 1, 15).render() == "   1 | let x = foo(1)\n     |         ^~~~~~"


def test_caret_with_tabs_and_a_span_past_the_line():
    src = Source("a.nest", "\tlet x = 1\nnext")
    assert Span(src, 1, 2, 2, 3).render() == "   1 |  let x = 1\n     |  ^~~~~~~~~"
    assert point(src, 1, 12).render() == "   1 |  let x = 1\n     |            ^"


def test_control_characters_cannot_reach_the_terminal():
    src = Source("a.nest", "let x = \x1b[2J 1\r\nnext")
    assert point(src, 1, 9).render() == "   1 | let x = \ufffd[2J 1\n     |         ^"


def test_crlf_line_ends(error_of):
    assert error_of("block B() {\r\n  let x = 1 $\r\n}\r\n") == (
        "t.nest:2:13: error: unexpected character `$`\n"
        "   2 |   let x = 1 $\n"
        "     |             ^")


def test_a_byte_order_mark_and_old_mac_line_ends(tmp_path):
    """A file saved with a UTF-8 byte-order mark was refused at 1:1 ("unexpected character
    U+FEFF"); CR alone was no line end, so every error was on line 1."""
    (tmp_path / "bom.nest").write_bytes(b"\xef\xbb\xbfblock B(dim = 8) {\n"
                                        b"    input x : [T, dim]\n    output x\n}\n")
    assert nestc.load(str(tmp_path / "bom.nest")).names == ["B"]
    (tmp_path / "cr.nest").write_bytes(b"block B(dim = 8) {\r    input x : [T, dim]\r"
                                       b"    output y\r}\r")
    with pytest.raises(NestError) as info:
        nestc.load(str(tmp_path / "cr.nest"))
    assert str(info.value).startswith("%s:3:12: error: unknown name `y`\n   3 |     output y"
                                      % (tmp_path / "cr.nest"))


def test_loads_takes_a_byte_order_mark_and_old_mac_line_ends_as_load_does():
    text = "block B(dim = 8) {\r    input x : [T, dim]\r    output y\r}\r"
    with pytest.raises(NestError) as info:
        nestc.loads("\ufeff" + text, "b.nest")
    assert str(info.value).startswith("b.nest:3:12: error: unknown name `y`\n   3 |     output y")


def test_a_divide_update_by_zero_is_an_error_as_a_division_is():
    """`h /= 0` built and gave inf, where `h = h / 0` is an error at check."""
    for update in ("h /= 0", "h /= dim - 4"):
        with pytest.raises(NestError, match="division by zero"):
            nestc.loads("block B(dim = 4) {\n    input x : [T, dim]\n    let h = x\n"
                        f"    {update}\n    output h\n}}\n", "b.nest")


def test_caret_on_a_very_long_line_shows_a_window():
    src = Source("a.nest", "x" * 1000 + " bad " + "y" * 1000)
    lines = Span(src, 1, 1002, 1, 1005).render().split("\n")
    assert lines[0].startswith("   1 | ...x") and lines[0].endswith("y...")
    assert len(lines[0]) == len("   1 | ") + 3 + 150 + 3
    assert lines[0][lines[1].index("^"):][:3] == "bad"
    assert lines[1].endswith("^~~")


def test_error_without_a_span_names_its_file():
    err = NestError("no such file: `x.nest`", kind="import", file="x.nest")
    assert str(err) == "x.nest: error: no such file: `x.nest`"
    assert err.diagnostics[0].to_json()["file"] == "x.nest"
    assert str(NestError("bad")) == "error: bad"


def test_several_diagnostics_render_in_order():
    src = Source("a.nest", "one\ntwo\n")
    err = NestError.many([Diagnostic("name", "first", point(src, 1, 1, 3), hint="h"),
                          Diagnostic("type", "second", point(src, 2, 2))])
    assert str(err) == spec("""
        a.nest:1:1: error: first
           1 | one
             | ^~~
          hint: h
        a.nest:2:2: error: second
           2 | two
             |  ^
    """).rstrip("\n")
    assert (err.kind, err.message, err.span.line) == ("name", "first", 1)


def test_json_diagnostic():
    with pytest.raises(NestError) as info:
        nestc.loads("block B() {\n  output zz\n}\n", "b.nest")
    assert info.value.diagnostics[0].to_json() == {
        "kind": "name", "message": "unknown name `zz`", "hint": None, "file": "b.nest",
        "line": 2, "col": 10, "end_line": 2, "end_col": 12}
