"""fla-core's naive recurrences, the references of the delta rule tests: loaded by path, since
importing `fla` itself pulls in its Triton kernels (seconds, and warnings on CPU); these files
need only torch and einops. A test that uses them is skipped where fla-core is missing."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@functools.cache
def fla_naive(relpath: str) -> ModuleType:
    """The naive reference file `relpath` of fla-core (e.g. "ops/delta_rule/naive.py")."""
    pytest.importorskip("einops")
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed")
    path = Path(spec.submodule_search_locations[0]) / relpath
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.parent.name}", path)
    assert module_spec is not None and module_spec.loader is not None, path
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def run_fla(op: str, x: dict[str, Any]) -> tuple[Any, Any]:
    """fla's naive delta rule ("delta_rule") or gated delta rule on nestc's inputs x (q, k, v,
    beta[, g][, initial_state], [B, T, H, D]): the output in nestc's layout and the state."""
    if op == "delta_rule":
        # fla's delta_rule_recurrence takes [B, H, T, D] and always scales q by K ** -0.5
        fla = fla_naive("ops/delta_rule/naive.py")
        q, k, v, beta = (x[n].transpose(1, 2) for n in ("q", "k", "v", "beta"))
        o, S = fla.delta_rule_recurrence(q, k, v, beta, initial_state=x.get("initial_state"),
                                         output_final_state=True)
        return o.transpose(1, 2), S
    fla = fla_naive("ops/gated_delta_rule/naive.py")
    return fla.naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                                initial_state=x.get("initial_state"),
                                                output_final_state=True)
