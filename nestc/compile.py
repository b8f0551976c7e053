"""The pipeline: a checked declaration through the named lowering passes to generated source."""

from __future__ import annotations

import importlib
from typing import Any

from nestc.check import Checked
from nestc.errors import NestError

# each pass is the function of the same name in nestc/passes/<name>.py, applied in this order
OPTIMIZER_PASSES = ("lower_optimizer", "hoist_slow", "select_kernels", "simplify_updates")

_CACHE: dict[tuple[str, str, str], str] = {}


def lower(checked: Checked) -> Any:
    """The lowered IR of an optimizer after every pass (explain and the tests read it)."""
    value: Any = checked
    for name in OPTIMIZER_PASSES:
        value = getattr(importlib.import_module(f"nestc.passes.{name}"), name)(value)
    return value


def generate(checked: Checked) -> str:
    """Generated source, cached by the declaration's file text (an optimizer reads no other)."""
    from nestc.codegen.torch import generate_optimizer

    if checked.kind != "optimizer":
        raise NestError(f"compiling a {checked.kind} is not implemented yet: `{checked.name}` can "
                        "be checked, explained and drawn", checked.decl.name_span, kind="value")
    span = checked.decl.span
    key = (span.file, span.source.text, checked.name)
    if key not in _CACHE:
        _CACHE[key] = generate_optimizer(lower(checked))
    return _CACHE[key]
