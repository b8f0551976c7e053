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


def close(a, b, tol: float = 1e-4, atol: float = 1e-7) -> None:
    """Error relative to the largest entry, as fla's tests measure it (a gradient that is zero
    on one tier is a few ulps off zero on the other: atol)."""
    err = (a - b).abs().max().item()
    assert err <= tol * a.abs().max().item() + atol, (err, a.abs().max().item())


def leaves(state: object) -> list:
    """The tensors of an in-context state (dicts, tuples and lists of tensors) in a fixed
    order, its counters (a chunk's offset) as tensors; None (no momentum yet) left out."""
    import torch

    if isinstance(state, dict):
        return [t for key in sorted(state) for t in leaves(state[key])]
    if isinstance(state, (tuple, list)):
        return [t for item in state for t in leaves(item)]
    if state is None:
        return []
    return [state] if isinstance(state, torch.Tensor) else [torch.tensor(float(state))]


def run_benchmark(name: str, *args: str) -> str:
    """benchmarks/<name> run with args (tiny sizes) in a fresh process: its stdout, after
    checking that it exits 0."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout
