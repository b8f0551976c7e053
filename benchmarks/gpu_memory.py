"""Memory recurrences on a CUDA device: nestc's delta rules against fla-core's Triton kernels.

Forward+backward time of fla-core's `chunk_delta_rule` / `chunk_gated_delta_rule` (Triton),
nestc's Triton tier and nestc's chunked PyTorch tier on the same inputs, at B=4, H=8, D in
--D, T in --T, bfloat16; plus a float32 check that they agree. Writes a Markdown table (--out).
The targets (issue 6): nestc's Triton tier within 1.25x of fla's chunk kernel, and at least
5x faster than the chunked tier at T=4K. Then Titans' MLP memory (nestc.ops.mlp_memory), its
Triton kernel against the chunked tier, forward and forward+backward, at the sizes where the
kernel fits an H100 (docs/triton.md).

    python benchmarks/gpu_memory.py [--T 1024 4096 16384] [--D 64 128] [--reps 10] [--lm]
                                    [--tiles KERNEL=BV,WARPS,STAGES ...] [--no-mlp]
                                    [--no-delta]
                                    [--out t.md]
    python benchmarks/gpu_memory.py --dry    # CPU, tiny shapes, kernels under the interpreter

--tiles replaces the delta-rule kernels' launch settings (nestc/ops/delta_rule/triton.py's
_TILES, chosen from compile reports, not timings; docs/triton.md) for a timing on the device:
    python benchmarks/gpu_memory.py --T 4096 --D 128 --no-mlp --tiles dqkvbg=32,4,2

--lm adds the stdlib language models' training tokens/s at equal parameter count (B=16, T=512,
depth 2, TransformerLM at width 96 with SDPA attention, HopeLM included, back end triton;
benchmarks/memory.py's table).

The GPU run needs fla-core with its Triton kernels (pip install --no-deps fla-core einops).
`--dry` checks the script itself on a CPU: TRITON_INTERPRET=1, B=1, H=2, D=16, T=32 and 80,
float32, wall-clock timing, and no fla column (its kernels are not run under the interpreter);
with --lm, memory.py's --quick sizes. Its numbers say nothing about speed.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import argparse  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import nestc.ops  # noqa: E402

Run = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, gated: bool, device: str,
           seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, D, device=device, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(
        torch.randn(B, T, H, D, device=device, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=device, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, device=device, generator=g).to(dtype)
    xs = [q, k, v, beta]
    if gated:  # log retention in (log 0.9, 0)
        xs.append((0.9 + 0.1 * torch.rand(B, T, H, device=device, generator=g)).log())
    return [x.requires_grad_(True) for x in xs]


def ms(fn: Callable[[], None], reps: int, cuda: bool) -> float:
    """Median of reps timed calls (CUDA events on a GPU, the wall clock on a CPU), after
    warm-up calls (three on a GPU, one on a CPU)."""
    for _ in range(3 if cuda else 1):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - tick))
    return sorted(times)[len(times) // 2]


class Report:
    """The table's lines, printed and (with --out) written as they come, so that a run stopped
    at the device's time limit keeps what it measured; `failed` counts the cells that raised
    (their tracebacks go to stderr, the cell reads "error", the script exits 1)."""

    def __init__(self, out: str | None) -> None:
        self.out = Path(out) if out else None
        self.failed = 0
        if self.out:
            self.out.write_text("")

    def add(self, *lines: str) -> None:
        print("\n".join(lines), flush=True)
        if self.out:
            with self.out.open("a") as f:
                f.write("".join(line + "\n" for line in lines))

    def time(self, what: str, fn: Callable[[], None], reps: int, cuda: bool) -> float | None:
        """ms(fn), or None when it raises: one implementation's failure (a kernel that does
        not compile for this GPU) leaves the other columns and rows measured."""
        try:
            return ms(fn, reps, cuda)
        except Exception:  # noqa: BLE001 - reported, counted, and the script exits 1
            self.failed += 1
            print(f"{what} failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
            if cuda:  # a failed launch can leave an error behind for the next call to raise
                torch.cuda.synchronize()
            return None


def cell(x: float | None) -> str:
    return "error" if x is None else f"{x:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


def fwd_bwd(run: Run, xs: list[torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        for x in xs:
            x.grad = None
        o, _ = run(*xs)
        o.float().sum().backward()
    return call


def ops(gated: bool, fla: bool) -> dict[str, Run]:
    """The implementations by column, each taking (q, k, v, beta[, g]): fla's chunk kernel
    (when fla), nestc's Triton tier and nestc's chunked tier."""
    out: dict[str, Run] = {}
    if gated:
        if fla:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            out["fla"] = lambda q, k, v, b, g: chunk_gated_delta_rule(
                q, k, v, g, b, scale=1.0, output_final_state=True)
        for backend in ("triton", "chunked"):
            out[backend] = lambda q, k, v, b, g, backend=backend: nestc.ops.gated_delta_rule(
                q, k, v, g, b, scale=1.0, backend=backend)
        return out
    if fla:
        from fla.ops.delta_rule import chunk_delta_rule

        out["fla"] = lambda q, k, v, b: chunk_delta_rule(q, k, v, b, scale=1.0,
                                                         output_final_state=True)
    for backend in ("triton", "chunked"):
        out[backend] = lambda q, k, v, b, backend=backend: nestc.ops.delta_rule(
            q, k, v, b, scale=1.0, backend=backend)
    return out


def agreement(gated: bool, fla: bool, device: str) -> dict[str, float | None]:
    """Largest difference of each tier's output from the chunked tier's, relative to its
    largest entry, in float32 at T=300 (T=45 on a CPU)."""
    runs = ops(gated, fla)
    xs = inputs(2, 300 if device == "cuda" else 45, 4, 64 if device == "cuda" else 16,
                torch.float32, gated, device)
    ref, _ = runs["chunked"](*xs)
    out: dict[str, float | None] = {}
    for name, run in runs.items():
        if name != "chunked":
            try:
                out[name] = ((run(*xs)[0] - ref).abs().max() / ref.abs().max()).item()
            except Exception:  # noqa: BLE001 - the caller reports and counts it
                print(f"{name}'s agreement check failed:", file=sys.stderr, flush=True)
                traceback.print_exc()
                out[name] = None
    return out


def table(report: Report, T_list: list[int], D_list: list[int], reps: int, dry: bool) -> None:
    device = "cpu" if dry else "cuda"
    fla = not dry
    B, H, dtype = (1, 2, torch.float32) if dry else (4, 8, torch.bfloat16)
    where = "CPU, Triton interpreter (dry run: no speed meaning)" if dry else \
        torch.cuda.get_device_name()
    report.add(f"torch {torch.__version__}, triton {triton_version()}, {where}, B={B}, H={H}, "
               f"{str(dtype).removeprefix('torch.')}, forward+backward, median ms of {reps}", "",
               "| op | D | T | fla-core chunk (Triton) | nestc Triton | nestc chunked (PyTorch) "
               "| Triton / fla | chunked / Triton |",
               "|---|---|---|---|---|---|---|---|")
    for gated in (False, True):
        name = "gated_delta_rule" if gated else "delta_rule"
        runs = ops(gated, fla)
        for D in D_list:
            for T in T_list:
                xs = inputs(B, T, H, D, dtype, gated, device)
                t = {col: report.time(f"{name} D={D} T={T} {col}", fwd_bwd(run, xs), reps,
                                      not dry) for col, run in runs.items()}
                fla_ms = cell(t["fla"]) if "fla" in t else "—"
                report.add(f"| {name} | {D} | {T} | {fla_ms} | {cell(t['triton'])} | "
                           f"{cell(t['chunked'])} | {ratio(t['triton'], t.get('fla'))} | "
                           f"{ratio(t['chunked'], t['triton'])} |")
        agree = agreement(gated, fla, device)
        report.failed += sum(v is None for v in agree.values())
        report.add("", f"{name}, float32, largest difference from the chunked tier over its "
                   "largest entry: " + ", ".join(f"{k} {'error' if v is None else f'{v:.1e}'}"
                                                 for k, v in agree.items()), "")


def triton_version() -> str:
    import triton

    return triton.__version__


def mlp_memory_table(report: Report, T_list: list[int], reps: int, dry: bool) -> None:
    """Titans' MLP memory (nestc.ops.mlp_memory: momentum, retention, clip 1), the Triton tier
    against the chunked PyTorch tier, float32 (as MLPMemory runs it), forward and
    forward+backward (both directions fused in the Triton tier), at sizes where the kernels
    fit an H100 (`mlp_kernel_fits`): the stdlib TitansLM's memory (d 32, h 64, chunk 16) and
    a wider one (d 64, h 128, chunk 16)."""
    from nestc.ops.mlp_memory import mlp_memory
    from nestc.ops.mlp_memory.triton import mlp_kernel_fits

    device = "cpu" if dry else "cuda"
    N, H = (1, 2) if dry else (4, 8)
    shapes = [(16, 32, 16)] if dry else [(32, 64, 16), (64, 128, 16)]
    report.add("", f"Titans' MLP memory, N={N}, H={H}, float32, median ms", "",
               "| d | h | chunk | T | Triton fwd | chunked fwd | chunked / Triton fwd "
               "| Triton fwd+bwd | chunked fwd+bwd | chunked / Triton fwd+bwd |",
               "|---|---|---|---|---|---|---|---|---|---|")
    for d, h, chunk in shapes:
        assert mlp_kernel_fits(d, h, chunk), (d, h, chunk)
        for T in T_list:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.nn.functional.normalize(torch.randn(N, H, T, d, device=device,
                                                                 generator=g), dim=-1)
                       for _ in range(3))
            lr, retain, beta = (torch.rand(N, H, T, device=device, generator=g)
                                for _ in range(3))
            A0 = torch.randn(N, H, d, h, device=device, generator=g) * d ** -0.5
            B0 = torch.randn(N, H, h, d, device=device, generator=g) * h ** -0.5
            xs = [x.requires_grad_() for x in (q, k, v, lr, retain, beta, A0, B0)]
            t: dict[str, tuple[float | None, float | None]] = {}
            for backend in ("triton", "chunked"):
                def run(*a: torch.Tensor, backend: str = backend, chunk: int = chunk
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
                    return mlp_memory(*a, clip=1.0, chunk=chunk, backend=backend)[0], None

                def forward(run: Run = run, xs: list[torch.Tensor] = xs) -> None:
                    with torch.no_grad():
                        run(*xs)
                what = f"mlp_memory d={d} h={h} T={T} {backend}"
                t[backend] = (report.time(what + " forward", forward, reps, not dry),
                              report.time(what + " forward+backward", fwd_bwd(run, xs), reps,
                                          not dry))
            (tf, tb), (cf, cb) = t["triton"], t["chunked"]
            report.add(f"| {d} | {h} | {chunk} | {T} | {cell(tf)} | {cell(cf)} | "
                       f"{ratio(cf, tf)} | {cell(tb)} | {cell(cb)} | {ratio(cb, tb)} |")


def language_models(dry: bool) -> list[str]:
    """benchmarks/memory.py's table of training tokens/s, on the GPU (or tiny, on the CPU)."""
    import importlib.util

    path = Path(__file__).with_name("memory.py")
    spec = importlib.util.spec_from_file_location("nestc_memory_benchmark", path)
    assert spec is not None and spec.loader is not None, path
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    sizes = dict(lm_dim=40, depth=1, vocab=64, lm_batch=2, lm_T=64, reps=1, warmup=1) if dry \
        else dict(lm_dim=96, depth=2, vocab=256, lm_batch=16, lm_T=512, reps=5, warmup=3)
    args = argparse.Namespace(**sizes, device="cpu" if dry else "cuda", backend="triton",
                              hope=True, quick=dry)
    lines: list[str] = memory.bench_language_models(args)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=None,
                    help="sequence lengths (default 1024 4096 16384; --dry: 32 80)")
    ap.add_argument("--D", type=int, nargs="+", default=None,
                    help="head widths (default 64 128; --dry: 16)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 10; --dry 1)")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, the interpreter")
    ap.add_argument("--lm", action="store_true", help="also the language models' tokens/s")
    ap.add_argument("--tiles", nargs="+", default=[], metavar="KERNEL=BV,WARPS,STAGES",
                    help="try other launch settings for a delta-rule kernel (prepare, state, "
                    "o, dhu, dqkvbg) at every key width, e.g. dqkvbg=32,4,2")
    ap.add_argument("--no-mlp", action="store_true", help="leave out the MLP-memory table")
    ap.add_argument("--no-delta", action="store_true",
                    help="leave out the delta rules' table (the MLP memory's and --lm's only)")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    if args.tiles:
        from nestc.ops.delta_rule.triton import _TILES as TILES

        for spec in args.tiles:
            kernel, _, values = spec.partition("=")
            numbers = [int(x) for x in values.split(",") if x.isdigit()]
            if kernel not in TILES or len(numbers) != 3 or numbers[0] < 16 or \
                    numbers[0] & (numbers[0] - 1):
                ap.error(f"--tiles {spec}: expected KERNEL=BV,WARPS,STAGES (BV a power of 2 >= 16) "
                         f"with KERNEL one of {', '.join(TILES)}")
            for width in TILES[kernel]:
                TILES[kernel][width] = (numbers[0], numbers[1], numbers[2])
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry needs TRITON_INTERPRET=1 before triton is imported: run the script "
                 "itself, or set the variable")
    if not args.dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or with --dry on a CPU")
    report = Report(args.out)
    if not args.no_delta:
        table(report, args.T or ([32, 80] if args.dry else [1024, 4096, 16384]),
              args.D or ([16] if args.dry else [64, 128]), args.reps or (1 if args.dry else 10),
              args.dry)
    # the chunked tier loops over 16-token chunks: T = 16K would take a minute of the lease
    if not args.no_mlp:
        mlp_memory_table(report, args.T or ([32, 80] if args.dry else [1024, 4096]),
                         args.reps or (1 if args.dry else 10), args.dry)
    if args.lm:
        try:
            report.add("", *language_models(args.dry))
        except Exception:  # noqa: BLE001 - reported and counted, as a table's cell
            report.failed += 1
            print("the language models' table failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
    if report.failed:
        print(f"{report.failed} measurement(s) failed: their tracebacks are above",
              file=sys.stderr)
    return 1 if report.failed else 0

if __name__ == "__main__":
    sys.exit(main())
