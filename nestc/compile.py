"""The pipeline: a checked declaration through the named lowering passes to generated source."""

from __future__ import annotations

import importlib
from typing import Any

from nestc.check import Checked
from nestc.errors import NestError

# each pass is the function of the same name in nestc/passes/<name>.py, applied in this order
OPTIMIZER_PASSES = ("lower_optimizer", "hoist_slow", "select_kernels", "simplify_updates")

_CACHE: dict[tuple[str, str, str], str] = {}
_MODULES: dict[tuple[Any, ...], tuple[str, str]] = {}


def lower(checked: Checked) -> Any:
    """The lowered IR of an optimizer after every pass (explain and the tests read it)."""
    value: Any = checked
    for name in OPTIMIZER_PASSES:
        value = getattr(importlib.import_module(f"nestc.passes.{name}"), name)(value)
    return value


def generate(checked: Checked) -> str:
    """An optimizer's generated source, cached by the declaration's file text (an optimizer
    reads no other)."""
    from nestc.codegen.torch import generate_optimizer

    if checked.kind != "optimizer":
        raise NestError(f"`{checked.name}` is a {checked.kind}: generate_module compiles it",
                        checked.decl.name_span, kind="value")
    span = checked.decl.span
    key = (span.file, span.source.text, checked.name)
    if key not in _CACHE:
        _CACHE[key] = generate_optimizer(lower(checked))
    return _CACHE[key]


def generate_module(program: Any, checked: Checked, hyper: dict[str, Any]
                    ) -> tuple[str, str]:
    """A block's or model's generated source at these hyperparameters, and its class's name;
    cached by the text of every file the program loaded (sub-blocks may come from any)."""
    from nestc.codegen.block import generate_module as generate_block

    texts = tuple(sorted((name, u.module.span.source.text)
                         for name, u in program.loader.units.items()))
    key = (texts, checked.decl.span.file, checked.name, repr(sorted(hyper.items())))
    if key not in _MODULES:
        if len(_MODULES) >= 256:  # a sweep over many hyperparameters: forget the old ones
            _MODULES.clear()
        _MODULES[key] = generate_block(program, checked, hyper)
    return _MODULES[key]
