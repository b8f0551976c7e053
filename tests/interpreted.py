"""Checks of Triton kernels that run where the kernels can: compiled on a CUDA device, else on
the CPU under the Triton interpreter.

Triton reads TRITON_INTERPRET when it is first imported, and a pytest session imports it
earlier, so on a CPU a test module's selected cases run in one subprocess started with the
variable set (the module loaded there by path), each reported back as its own pass, skip or
failure. On CUDA, or in a pytest started with TRITON_INTERPRET=1, each case runs in its own
test instead (pytest-xdist can then spread one module's cases over workers). A module defines
CASES (name -> (check, args)), a `run_selected(names)` that imports its kernels and returns
`run_cases(CASES, names, [kernels])`, the fixture `outcomes = outcomes_fixture(__file__,
"run_selected")` and one test per case that calls `report(case, outcomes)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

Cases = dict[str, tuple[Callable[..., None], tuple[Any, ...]]]

# the subprocess: the test module loaded by path (its folder importable), the cases run
CHILD = """
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("interpreted_checks", sys.argv[1])
checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checks)
print(json.dumps(getattr(checks, sys.argv[2])(sys.argv[3:])))
"""


def _tf32(x: Any, nearest: bool) -> Any:
    """float32 array -> TF32 (10 of the 23 mantissa bits): rounded to nearest, ties away from
    zero, as cvt.rna.tf32.f32 does, or cut off, as a tensor core reads a float32 register."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if nearest:
        bits = bits + np.uint32(0x1000)  # a carry into the exponent rounds up to the next power
    return np.where(np.isfinite(x), (bits & np.uint32(0xFFFFE000)).view(np.float32), x)


def _bf16_bits(x: Any) -> Any:
    """float32 array -> bfloat16 bits (uint16), rounded to nearest even as a GPU's cast does
    (the interpreter cuts the mantissa off); NaN stays NaN."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return np.where(np.isnan(x), np.uint16(0x7FC0),
                    (rounded >> np.uint32(16)).astype(np.uint16))


@contextlib.contextmanager
def gpu_rounding() -> Iterator[None]:
    """Within it, the interpreter rounds as a GPU does where it would not: tl.dot's float32
    operands as tensor cores read them, where the interpreter multiplies in full float32
    whatever input_precision asks ("tf32" reads each operand with its mantissa cut to 10
    bits, "tf32x3" splits each into a TF32 part (rounded) and the rest (cut) and adds the
    three products big x small, small x big and big x big, as Triton's compiler does; "ieee"
    is left as it is), and float32 -> bfloat16 casts to nearest even, where the interpreter
    cuts the mantissa off."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    dot, trunc = InterpreterBuilder.create_dot, InterpreterBuilder.create_fp_trunc

    def create_fp_trunc(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_bf16_bits(src.data), dst_type.scalar)
        return trunc(self, src, dst_type)

    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any,
                   max_num_imprecise_acc: Any) -> Any:
        if (a.data.dtype != np.float32 or b.data.dtype != np.float32
                or input_precision not in (ir.INPUT_PRECISION.TF32, ir.INPUT_PRECISION.TF32x3)):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = d.data.dtype
        if input_precision == ir.INPUT_PRECISION.TF32:
            out = np.matmul(_tf32(a.data, False), _tf32(b.data, False), dtype=acc)
        else:
            a_big, b_big = _tf32(a.data, True), _tf32(b.data, True)
            a_small, b_small = _tf32(a.data - a_big, False), _tf32(b.data - b_big, False)
            out = (np.matmul(a_big, b_small, dtype=acc) + np.matmul(a_small, b_big, dtype=acc)
                   + np.matmul(a_big, b_big, dtype=acc))
        return TensorHandle(out + d.data, d.dtype.scalar)

    InterpreterBuilder.create_dot = create_dot  # type: ignore[method-assign]
    InterpreterBuilder.create_fp_trunc = create_fp_trunc  # type: ignore[method-assign]
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = dot  # type: ignore[method-assign]
        InterpreterBuilder.create_fp_trunc = trunc  # type: ignore[method-assign]


def run_cases(cases: Cases, names: list[str], kernels: list[Any]) -> dict[str, dict[str, Any]]:
    """Each named case's outcome: "ok", "skip" or "fail", with the message and the seconds it
    took; every buffer the `kernels` modules write is NaN-filled first (POISON_BUFFERS), so a
    missed store fails. Under the interpreter, tl.dot and casts to bfloat16 round as a GPU's
    do (gpu_rounding), so the tolerances hold for the GPU's arithmetic, not float32's."""
    for module in kernels:
        module.POISON_BUFFERS = True
    out = {}
    precision = (gpu_rounding() if os.environ.get("TRITON_INTERPRET") == "1"
                 else contextlib.nullcontext())
    try:
        with precision:
            for name in names:
                fn, args = cases[name]
                start = time.perf_counter()
                try:
                    fn(*args)
                    outcome, message = "ok", ""
                except pytest.skip.Exception as e:
                    outcome, message = "skip", str(e)
                except Exception:
                    outcome, message = "fail", traceback.format_exc(limit=-3)
                out[name] = {"outcome": outcome, "message": message,
                             "seconds": round(time.perf_counter() - start, 2)}
    finally:
        for module in kernels:
            module.POISON_BUFFERS = False
    return out


class _EachWhenAsked(dict):  # type: ignore[type-arg]
    """Outcomes run one case at a time, when a test asks for it: where the kernels run in this
    process, so that pytest-xdist's workers (`-n 8 --dist load`) share the cases, and the
    compiles, of one module."""

    def __init__(self, run: Callable[[list[str]], dict[str, dict[str, Any]]]) -> None:
        super().__init__()
        self.run = run

    def __missing__(self, name: str) -> dict[str, Any]:
        self[name] = self.run([name])[name]
        return self[name]  # type: ignore[no-any-return]


def outcomes_fixture(file: str, runner: str) -> Any:
    """A module-scoped fixture: the outcomes of the cases this session selected in `file`, by
    its function `runner`: each when its test asks, here, on CUDA or in a process started with
    TRITON_INTERPRET=1; else all at once in the interpreter's subprocess."""

    @pytest.fixture(scope="module")
    def outcomes(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
        cases = request.module.CASES
        names = [item.callspec.params["case"] for item in request.session.items
                 if item.path == Path(file) and hasattr(item, "callspec")
                 and item.callspec.params.get("case") in cases]
        import torch

        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return _EachWhenAsked(getattr(request.module, runner))
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-c", CHILD, file, runner, *names],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]

    return outcomes


def report(case: str, outcomes: dict[str, dict[str, Any]]) -> None:
    """Pass, skip or fail the test of `case` as its check did."""
    result = outcomes[case]
    if result["outcome"] == "skip":
        pytest.skip(result["message"])
    if result["outcome"] != "ok":
        pytest.fail(f"{case} failed in the subprocess:\n{result['message']}", pytrace=False)


@contextlib.contextmanager
def counting(module: Any, name: str) -> Iterator[list[int]]:
    """Within the block, `module.name` (a kernel's op) appends to the list it yields at each
    call: whether, and how often, a code path reached the kernels."""
    calls: list[int] = []
    fn = getattr(module, name)
    setattr(module, name, lambda *a: calls.append(1) or fn(*a))
    try:
        yield calls
    finally:
        setattr(module, name, fn)


class Cramped:
    """Stands in for `kernel` on a GPU whose shared memory holds it with at most `stages`
    stages (0, the default: not at all), or only where `refuse(launch keyword arguments)` is
    false when given: a launch beyond is refused as triton refuses one, with OutOfResources
    before anything runs; one within runs `kernel`. `stages` records each launch's
    num_stages, `launches` its keyword arguments."""

    def __init__(self, kernel: Any = None, max_stages: int = 0,
                 refuse: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.kernel, self.max_stages, self.refuse = kernel, max_stages, refuse
        self.stages: list[int] = []
        self.launches: list[dict[str, Any]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        from triton.runtime.errors import OutOfResources

        def launch(*args: Any, **kwargs: Any) -> None:
            self.stages.append(kwargs.get("num_stages", 1))
            self.launches.append(kwargs)
            if (self.refuse(kwargs) if self.refuse is not None
                    else self.stages[-1] > self.max_stages):
                raise OutOfResources(300000, 232448, "shared memory")
            self.kernel[grid](*args, **kwargs)
        return launch
