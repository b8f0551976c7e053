"""nestc's Triton kernels compiled for a CUDA GPU on a machine without one, and what they need.

Triton can compile for a GPU it is only told about: the PTX comes from LLVM and the cubin from
the ptxas that ships with triton (cuobjdump, which ships too, reads it back), so neither a
device nor a driver is needed. This script calls the kernels' launch wrappers (the same code
the ops run) on CPU tensors, with a stand-in CUDA driver and a launch that compiles instead of
running, and reports for each kernel its num_warps and num_stages, the registers per thread,
the bytes of stack per thread in local memory (where spilled registers go), and the shared
memory it asks for against what one block may have on the GPU. A kernel that asks for more
than that fails to launch (triton's OutOfResources), so this finds on a CPU what would
otherwise show up only on the device.

    python benchmarks/triton_resources.py [--arch 90] [--K 64 128] [--mlp 32,64,16 ...]
                                          [--dtype bf16 f32] [--limit BYTES] [--out t.md]
                                          [--sweep [--jobs N] [--only TEXT ...]]

--K: key widths of the delta rules (V = K, chunk 64, plain and gated); --mlp d,h,chunk: MLP
memory shapes (momentum, retention and clip on; --variants: given values, self-generated
ones, starting inside a chunk);
--limit: the shared memory a block may have, in bytes, instead of the arch's (SHARED_LIMIT).
A launch that needs more is refused as the GPU refuses it (OutOfResources), so the ops answer
as they would there: the delta rules' kernels retry with one stage, the MLP kernels without
retention with a retention of ones (a row of its own, "retried"). Exit status 1 when a kernel the ops would launch does not fit even so (the ops
would compute its part in PyTorch): every delta-rule kernel, and the MLP kernels where
`mlp_kernel_fits` admits the shape (the others run on the chunked tier; their rows are
reported, not checked). The figures depend on the Triton version; the compile times
are this machine's (ptxas included). Registers and stack say where a kernel will be slow, not
how slow: only a GPU run times it (benchmarks/gpu_memory.py).

--sweep compiles instead every specialization the ops' flags and odd sizes produce at those
widths (the interpreter runs any of them, so a shape or flag the GPU compiler rejects shows up
only here): for each dtype and K, the delta rules with and without decay, initial state, final
state and its gradient, at one token and at a partial chunk, and at chunks 16, 32, 64 with value
widths K, 24 and 200; for each MLP shape, every flag of the all-on case turned off in turn
(retention, momentum, clip, initial momenta), silu, read_before, one token, one chunk, and
self-generated values (as self-modifying Titans runs them: silu, read_before, no momentum),
and pieces that start inside a chunk (alone, and with self-generated values). One
row a case; exit status 1 when a case fails to compile or a kernel the ops would launch
outgrows the limit. --jobs runs the cases in that many processes, --only those whose names
contain one of its words ("gated", "chunk=16 bf16").
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_resources.py compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from nestc.ops.delta_rule import triton as delta_kernels  # noqa: E402
from nestc.ops.mlp_memory import triton as mlp_kernels  # noqa: E402

# shared memory one block may have (bytes, opt-in maximum) per compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
GPU_NAMES = {80: "A100", 86: "A10 / RTX 30", 89: "L4 / L40 / RTX 40", 90: "H100 / H200"}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


class _StandIn:
    """What triton's launch path asks the CUDA driver for, answered for a GPU that is not
    there."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def is_active(self) -> bool:
        return True


@contextmanager
def compile_only(arch: int, limit: int | None = None
                 ) -> Iterator[list[tuple[str, Any, float, bool]]]:
    """Within it, `kernel[grid](...)` compiles for sm_<arch> and returns without running;
    the list collects (kernel name, compiled kernel, seconds, refused). With a limit, a
    kernel that asks for more shared memory is refused as a GPU refuses it, with triton's
    OutOfResources, so that the ops' answer runs as it would on the device (a retry with
    one stage, a retention of ones, or PyTorch with a warning). The stand-in driver stays active
    afterwards: this is for a script, not for a process that also runs kernels."""
    launches: list[tuple[str, Any, float, bool]] = []
    run = JITFunction.run
    delta_kernels._ONE_STAGE.clear()  # each case finds its own refusals (not an earlier case's)

    def compile_launch(self: JITFunction, *args: Any, grid: Any, warmup: bool,
                       **kwargs: Any) -> Any:
        start = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        refused = limit is not None and kernel.metadata.shared > limit
        launches.append((self.fn.__name__, kernel, time.perf_counter() - start, refused))
        if refused:
            raise OutOfResources(kernel.metadata.shared, limit, "shared memory")
        return kernel

    driver.set_active(_StandIn(arch))  # type: ignore[arg-type]
    JITFunction.run = compile_launch  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        JITFunction.run = run  # type: ignore[method-assign]


def resource_usage(kernel: Any) -> tuple[int, int]:
    """Registers per thread and bytes of stack a thread keeps in local memory (where spilled
    registers go), read by cuobjdump from the cubin triton built."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(regs.group(1)) if regs else 0, int(stack.group(1)) if stack else 0


@dataclass
class Row:
    case: str
    kernel: str
    warps: int
    stages: int
    registers: int
    stack: int
    shared: int
    checked: bool
    seconds: float
    refused: bool = False  # over the limit: the launch failed (checked rows only)
    retried: bool = False  # and retried by the ops (the next row)


def delta_case(K: int, gated: bool, dtype: torch.dtype, V: int | None = None, chunk: int = 64,
               T: int = 128, h0: bool = False, final: bool = True, dht: bool = False
               ) -> Callable[[], None]:
    """The forward and backward of the delta rule (gated: with decay) at these sizes and
    flags (h0: an initial state, final: the final state returned, dht: its gradient given)."""
    def launch() -> None:
        B, H = 1, 2
        q, k = (torch.randn(B, T, H, K, dtype=dtype) for _ in range(2))
        v = torch.randn(B, T, H, V or K, dtype=dtype)
        beta = torch.rand(B, T, H, dtype=dtype)
        g = -torch.rand(B, T, H, dtype=dtype) if gated else None
        S0 = torch.randn(B, H, K, V or K) if h0 else None
        delta_kernels._forward(q, k, v, g, beta, K ** -0.5, S0, final, chunk)
        delta_kernels._backward(q, k, v, g, beta, K ** -0.5, S0, chunk, torch.randn_like(v),
                                torch.randn(B, H, K, V or K) if dht else None)
    return launch


def mlp_case(d: int, h: int, chunk: int, dtype: torch.dtype, T: int | None = None,
             act: str = "gelu", retain: bool = True, beta: bool = True, clip: bool = True,
             read_before: bool = False, s0: bool = False, v_self: bool = False,
             offset: int = 0) -> Callable[[], None]:
    """The forward and backward of the MLP memory at these sizes and flags (retain, beta:
    retention and momentum; s0: initial momenta given; v_self: values it generates itself,
    as self-modifying Titans' memories do; offset: a piece that starts that many tokens into
    a chunk, whose first gradients are taken at other weights)."""
    def launch() -> None:
        N, H, T_ = 1, 2, T or 2 * chunk
        q, k, v = (torch.randn(N, H, T_, d, dtype=dtype) for _ in range(3))
        lr = torch.rand(N, H, T_)
        rt, bt = (torch.rand(N, H, T_) if on else None for on in (retain, beta))
        A0, B0 = torch.randn(N, H, d, h), torch.randn(N, H, h, d)
        SA0, SB0 = (torch.randn_like(A0), torch.randn_like(B0)) if s0 else (None, None)
        c = 1.0 if clip else None
        vs = torch.randn_like(q) if v_self else None
        G = (torch.randn_like(A0), torch.randn_like(B0)) if offset else None
        out = mlp_kernels._forward(q, k, v, lr, rt, bt, A0, B0, SA0, SB0, act, c, read_before,
                                   chunk, True, vs, G, offset)
        sA, sB, sSA, sSB = out[5:9]
        mlp_kernels._backward(q, k, v, lr, rt, bt, sA, sB, sSA, sSB, act, c, read_before,
                              chunk, torch.randn_like(q), A0, B0, A0, B0, vs, G, offset)
    return launch


# the MLP kernels' calls the main mode compiles at each shape (--variants); "inside" starts
# half a chunk in
VARIANTS: dict[str, dict[str, Any]] = {"given": {}, "self": {"v_self": True}, "inside": {}}


def sweep_cases(Ks: list[int], mlp_shapes: list[tuple[int, int, int]], dtypes: list[str]
                ) -> list[tuple[str, str, dict[str, Any]]]:
    """(case name, "delta" or "mlp", the case function's keyword arguments) for --sweep."""
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for name in dtypes:
        for K in Ks:
            for gated, h0, final, dht, T in itertools.product((False, True), (False, True),
                                                              (False, True), (False, True),
                                                              (1, 100)):
                flags = [f for f, on in (("gated", gated), ("h0", h0), ("final", final),
                                         ("dht", dht and final)) if on]
                cases.append((f"delta K={K} {name} T={T} {' '.join(flags) or 'plain'}", "delta",
                              dict(K=K, gated=gated, dtype=name, T=T, h0=h0, final=final,
                                   dht=dht and final)))
            for gated, chunk, V in itertools.product((False, True), (16, 32, 64),
                                                     (K, 24, 200)):
                cases.append((f"delta K={K} V={V} chunk={chunk} {name}"
                              f"{' gated' if gated else ''} T=100", "delta",
                              dict(K=K, gated=gated, dtype=name, V=V, chunk=chunk, T=100,
                                   h0=True, final=True, dht=True)))
        for d, h, chunk in mlp_shapes:
            base = dict(d=d, h=h, chunk=chunk, dtype=name, T=2 * chunk + 6, s0=True)
            for label, change in (("all on", {}), ("no retention", {"retain": False}),
                                  ("no momentum", {"beta": False}), ("no clip", {"clip": False}),
                                  ("no initial momenta", {"s0": False}),
                                  ("silu", {"act": "silu"}), ("read_before", {"read_before": True}),
                                  ("T=1", {"T": 1}), ("one chunk", {"T": chunk}),
                                  ("self values silu read_before no momentum",
                                   {"v_self": True, "act": "silu", "read_before": True,
                                    "beta": False}),
                                  ("inside a chunk", {"offset": chunk // 2}),
                                  ("inside a chunk self values read_before",
                                   {"offset": 3, "v_self": True, "read_before": True})):
                cases.append((f"mlp d={d} h={h} chunk={chunk} {name} {label}", "mlp",
                              base | change))
    # dedupe: with dht only where there is a final state, some flag sets repeat
    return list({case[0]: case for case in cases}.values())


def sweep_one(arch: int, limit: int, case: tuple[str, str, dict[str, Any]]
              ) -> tuple[str, str, int, int, float]:
    """Compile one sweep case: (name, "ok" / "ok (retried)" / "over the limit"
    / the error, kernels compiled, the most shared memory one of them asks for (a refused one
    included), seconds)."""
    name, kind, kw = case
    kw = kw | {"dtype": DTYPES[kw["dtype"]]}
    start = time.perf_counter()
    checked = kind == "delta" or mlp_kernels.mlp_kernel_fits(kw["d"], kw["h"], kw["chunk"],
                                                             kw["dtype"])
    try:
        with compile_only(arch, limit if checked else None) as launches, \
                fallbacks() as fell_back:
            (delta_case if kind == "delta" else mlp_case)(**kw)()
    except Exception as error:  # a compile error: the case's outcome, not the script's
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return name, f"**{type(error).__name__}**: {first[:200]}", 0, 0, 0.
    shared = max(kernel.metadata.shared for _, kernel, _, _ in launches)  # refused ones too
    if fell_back:
        status = "**over the limit**"
    elif any(refused for *_, refused in launches):
        status = "ok (retried)"
    else:
        status = "ok" if checked else "ok (chunked tier)"
    return name, status, len(launches), shared, time.perf_counter() - start


@contextmanager
def fallbacks() -> Iterator[list[str]]:
    """The ops' warnings, within it, that a kernel did not fit and PyTorch computed its part
    (what a refused launch without a retry, or a refused retry, comes to)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        got: list[str] = []
        yield got
    got += [str(w.message) for w in caught if "needs more of this GPU" in str(w.message)]


def sweep(args: argparse.Namespace, limit: int) -> int:
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.mlp]
    cases = [case for case in sweep_cases(args.K, shapes, args.dtype)  # type: ignore[arg-type]
             if not args.only or any(part in case[0] for part in args.only)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(sweep_one, [args.arch] * len(cases), [limit] * len(cases),
                                cases))
    out = [f"Triton {triton.__version__}, every specialization compiled for sm_{args.arch} "
           f"({limit} bytes of shared memory a block) on a CPU: {len(results)} cases.", "",
           "| case | outcome | launches | most shared bytes | seconds |",
           "| --- | --- | ---: | ---: | ---: |"]
    out += [f"| {n} | {status} | {count} | {shared} | {sec:.1f} |"
            for n, status, count, shared, sec in results]
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    failed = [(n, status) for n, status, *_ in results if not status.startswith("ok")]
    for n, status in failed:
        print(f"error: {n}: {status}", file=sys.stderr)
    return 1 if failed else 0


def measure(case: str, launch: Callable[[], None], checked: bool, arch: int,
            limit: int) -> list[Row]:
    """One row per kernel compiled. A checked launch over the limit is refused (a row that
    does not fit); the ops' retry is the next row, labelled so."""
    with compile_only(arch, limit if checked else None) as launches, fallbacks():
        launch()
    rows: list[Row] = []
    seen = set()
    for name, kernel, seconds, refused in launches:
        if kernel.hash in seen:
            continue
        seen.add(kernel.hash)
        label = name
        if rows and rows[-1].refused and rows[-1].kernel.split(" ")[0] == name:
            rows[-1].retried = True
            label = rows[-1].kernel + " (retried)"
        elif any(r.kernel == name for r in rows):  # the forward's kernels, specialized for
            label += " (backward's)"  # the backward that runs them again
        registers, stack = resource_usage(kernel)
        md = kernel.metadata
        rows.append(Row(case, label, md.num_warps, md.num_stages, registers, stack, md.shared,
                        checked, seconds, refused))
    return rows


def table(rows: list[Row], arch: int, limit: int) -> str:
    out = [f"Triton {triton.__version__}, compiled for sm_{arch} ({GPU_NAMES.get(arch, '?')}: "
           f"{limit} bytes of shared memory a block) on a CPU, no GPU involved.", "",
           "| case | kernel | warps | stages | registers | stack bytes | shared bytes | "
           "fits | compiler picks it | compile s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        fits = ("yes" if r.shared <= limit else "no: retried" if r.retried
                else "**no**" if r.checked else "no")
        picked = "yes" if r.checked else "no (chunked tier)"
        out.append(f"| {r.case} | {r.kernel} | {r.warps} | {r.stages} | {r.registers} | "
                   f"{r.stack} | {r.shared} | {fits} | {picked} | {r.seconds:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    p.add_argument("--K", type=int, nargs="*", default=[64, 128])
    p.add_argument("--mlp", nargs="*", default=["32,64,16", "64,128,16", "32,64,64", "64,64,64"],
                   help="d,h,chunk of the MLP memory shapes")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="the MLP kernels' calls to compile: given values, self-generated "
                   "ones, a piece starting inside a chunk")
    p.add_argument("--limit", type=int, help="bytes of shared memory a block may have")
    p.add_argument("--sweep", action="store_true",
                   help="compile every flag and odd-size specialization instead (one row a case)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="processes for --sweep")
    p.add_argument("--only", nargs="*", help="--sweep: only the cases whose names contain one "
                   "of these")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    limit = args.limit or SHARED_LIMIT[args.arch]
    if args.sweep:
        return sweep(args, limit)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    rows: list[Row] = []
    for name in args.dtype:
        dtype = DTYPES[name]
        for K in args.K:
            for gated in (False, True):
                case = f"{'gated ' if gated else ''}delta K={K} {name}"
                rows += measure(case, delta_case(K, gated, dtype), True, args.arch, limit)
        for shape in args.mlp:
            d, h, chunk = (int(x) for x in shape.split(","))
            admitted = mlp_kernels.mlp_kernel_fits(d, h, chunk, dtype)
            case = f"mlp d={d} h={h} chunk={chunk} {name}"
            for variant in args.variants:
                kw = VARIANTS[variant] | ({"offset": chunk // 2} if variant == "inside" else {})
                label = {"given": "", "self": " self values", "inside": " inside a chunk"}
                rows += measure(case + label[variant], mlp_case(d, h, chunk, dtype, **kw),
                                admitted, args.arch, limit)
    text = table(rows, args.arch, limit)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    over = [r for r in rows if r.checked and r.shared > limit and not r.retried]
    for r in over:
        print(f"error: {r.case}: {r.kernel} needs {r.shared} bytes of shared memory, "
              f"{limit} are allowed", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
