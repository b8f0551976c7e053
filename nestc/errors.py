"""NestError: every mistake a user can make, reported at a span of their spec."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nestc.source import Span

KINDS = ("syntax", "name", "import", "type", "shape", "frequency", "value")


@dataclass
class Diagnostic:
    """One message at one span; a NestError carries one or more."""

    kind: str
    message: str
    span: Span | None
    hint: str | None = None
    notes: tuple[tuple[str, Span], ...] = ()
    file: str | None = None  # the file, for an error about a whole file (no span)

    def render(self) -> str:
        where = f"{self.span}: " if self.span else f"{self.file}: " if self.file else ""
        parts = [f"{where}error: {self.message}"]
        if self.span:
            parts.append(self.span.render())
        for text, span in self.notes:
            parts.append(f"{span}: note: {text}")
            parts.append(span.render())
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        s = self.span
        return {
            "kind": self.kind,
            "message": self.message,
            "hint": self.hint,
            "file": s.file if s else self.file,
            "line": s.line if s else None,
            "col": s.col if s else None,
            "end_line": s.end_line if s else None,
            "end_col": s.end_col if s else None,
        }


class NestError(Exception):
    """A user error in a spec. `span` has file, line and col; str() is the rendered report."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        kind: str = "value",
        hint: str | None = None,
        notes: tuple[tuple[str, Span], ...] = (),
        file: str | None = None,
        unsupported: bool = False,
    ) -> None:
        assert kind in KINDS, kind
        self.diagnostics = [Diagnostic(kind, message, span, hint, notes, file)]
        self.unsupported = unsupported  # a limitation of the compiler, not a spec mistake
        super().__init__(message)

    @classmethod
    def many(cls, diagnostics: list[Diagnostic]) -> NestError:
        assert diagnostics
        err = cls(diagnostics[0].message, diagnostics[0].span, kind=diagnostics[0].kind)
        err.diagnostics = list(diagnostics)
        return err

    @property
    def span(self) -> Span | None:
        return self.diagnostics[0].span

    @property
    def kind(self) -> str:
        return self.diagnostics[0].kind

    @property
    def hint(self) -> str | None:
        return self.diagnostics[0].hint

    @property
    def message(self) -> str:
        return self.diagnostics[0].message

    def __str__(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


class StepDivisionError(ZeroDivisionError):
    """A generated optimizer's step divided a number by zero: a divisor of `step()` or of the
    param's shape that the checker cannot see (nestc.runtime.division_error). The message names
    the spec line; `nestc train` reports it as an error of the spec (exit 1)."""


def nearest(name: str, known: Iterable[str], limit: int = 3) -> list[str]:
    """The known names closest to `name` by edit distance, best first."""
    import difflib

    return difflib.get_close_matches(name, sorted(known), n=limit, cutoff=0.6)


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    close = nearest(name, known)
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
