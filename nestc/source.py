"""Source files, spans, and the caret rendering of a span."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_SHOWN = 150  # characters of a source line shown above a caret
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Source:
    """One spec text and the name it is reported under. The text is kept as the parser and
    every position see it: without a byte-order mark (Windows editors write one; it is no
    character of the spec) and with `\\n` line ends (`\\r\\n`, and old Macs' `\\r` alone, end
    lines too), whether it came from a file or from `nestc.loads`."""

    name: str
    text: str
    lines: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = self.text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "lines", tuple(text.split("\n")))

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
        """The first source line of the span with a caret underline below it; a very long line
        is cut to a window around the span."""
        # one column per character: a tab shows as one space, other control characters (a
        # carriage return, a terminal escape) as U+FFFD so they cannot disturb the terminal
        text = _CONTROL.sub("\ufffd", self.source.line(self.line).expandtabs(1))
        col = self.col
        if self.end_line == self.line:
            width = max(1, self.end_col - self.col)
        else:
            width = max(1, len(text) - self.col + 1)
        width = min(width, max(1, len(text) - self.col + 1))
        if len(text) > MAX_SHOWN:
            start = max(0, min(col - 1 - MAX_SHOWN // 3, len(text) - MAX_SHOWN))
            head = "..." if start else ""
            tail = "..." if start + MAX_SHOWN < len(text) else ""
            text = head + text[start:start + MAX_SHOWN] + tail
            col = col - start + len(head)
            width = min(width, MAX_SHOWN + len(head) - col + 1)
        gutter = f"{self.line:>4} | "
        pad = " " * (len(gutter) - 2) + "| "
        return f"{gutter}{text}\n{pad}{' ' * (col - 1)}^{'~' * (width - 1)}"


def point(source: Source, line: int, col: int, width: int = 1) -> Span:
    """A span of `width` characters on one line."""
    return Span(source, line, col, line, col + width)


def span_text(span: Span | None) -> str:
    """The source text of a span on one line, whitespace collapsed and comments dropped."""
    if span is None:
        return ""
    lines = span.source.lines
    if span.line == span.end_line:
        parts = [lines[span.line - 1][span.col - 1: span.end_col - 1]]
    else:
        parts = [lines[span.line - 1][span.col - 1:], *lines[span.line: span.end_line - 1],
                 lines[span.end_line - 1][: span.end_col - 1]]
        parts = [re.sub(r"#[^\"]*$", "", p) for p in parts]
    return " ".join(" ".join(parts).split())
