"""Source files, spans, and the caret rendering of a span."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """One spec text and the name it is reported under."""

    name: str
    text: str
    lines: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lines", tuple(self.text.split("\n")))

    def line(self, number: int) -> str:
        """The 1-based line `number`, without its newline ('' past the end)."""
        return self.lines[number - 1] if 1 <= number <= len(self.lines) else ""


@dataclass(frozen=True)
class Span:
    """A region of a source: 1-based line and column of its first and one-past-last character."""

    source: Source = field(repr=False, compare=False)
    line: int
    col: int
    end_line: int
    end_col: int

    @property
    def file(self) -> str:
        return self.source.name

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def to(self, other: Span) -> Span:
        """The span from the start of self to the end of other."""
        return Span(self.source, self.line, self.col, other.end_line, other.end_col)

    def render(self) -> str:
        """The first source line of the span with a caret underline below it."""
        text = self.source.line(self.line).expandtabs(1)
        if self.end_line == self.line:
            width = max(1, self.end_col - self.col)
        else:
            width = max(1, len(text) - self.col + 1)
        width = min(width, max(1, len(text) - self.col + 1))
        gutter = f"{self.line:>4} | "
        pad = " " * (len(gutter) - 2) + "| "
        return f"{gutter}{text}\n{pad}{' ' * (self.col - 1)}^{'~' * (width - 1)}"


def point(source: Source, line: int, col: int, width: int = 1) -> Span:
    """A span of `width` characters on one line."""
    return Span(source, line, col, line, col + width)
