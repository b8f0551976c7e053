"""Shared fixtures: the repository root, every spec in it, and the error a spec text raises."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import nestc

ROOT = Path(__file__).resolve().parent.parent


def spec_files() -> list[Path]:
    """Every stdlib and example spec, found when the tests run (the set grows)."""
    return sorted([*ROOT.glob("stdlib/**/*.nest"), *ROOT.glob("examples/*.nest")])


def spec(text: str) -> str:
    """A spec written indented inside a test, as the file a user would save."""
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
def error_of() -> Callable[..., str]:
    """error_of(text, filename="t.nest") -> str() of the NestError that loading the spec raises."""

    def run(text: str, filename: str = "t.nest") -> str:
        with pytest.raises(nestc.NestError) as info:
            nestc.loads(spec(text), filename)
        return str(info.value)

    return run
