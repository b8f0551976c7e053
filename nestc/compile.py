"""The pipeline: a checked declaration through the named lowering passes to generated source."""

from __future__ import annotations

from nestc.check import Checked
from nestc.errors import NestError

OPTIMIZER_PIPELINE = ("lower_optimizer", "select_kernels", "simplify_updates",
                      "generate_optimizer")


_CACHE: dict[tuple[str, str, str], str] = {}


def lower(checked: Checked):
    """The lowered IR of an optimizer, with kernels selected (for explain and tests)."""
    from nestc.passes.lower_optimizer import lower_optimizer
    from nestc.passes.select_kernels import select_kernels
    from nestc.passes.simplify_updates import simplify_updates

    return simplify_updates(select_kernels(lower_optimizer(checked)))


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
