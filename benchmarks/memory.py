"""Memory recurrences on CPU: nestc's chunked delta rule over fla-core's and over the token loop.

Prints a Markdown table of median times and the ratios nestc chunked / fla-core
`delta_rule_chunkwise` (target <= 1.0) and nestc chunked / token loop (target <= 1/3), measured
in this process at B=2, H=4, T=2048, D=64, float32, forward only and forward+backward.
Usage: python benchmarks/memory.py [--reps 5] [--warmup 5] [--T 2048] [--chunk-size 64]
[--fla-chunk-size 32]
(needs fla-core: pip install --no-deps fla-core einops).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

import nestc.ops

Inputs = dict[str, torch.Tensor]


def fla_naive(relpath: str) -> ModuleType:
    """One of fla-core's naive reference files, loaded by path: importing `fla` itself pulls in
    its Triton kernels, which these plain-PyTorch references do not need."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fla-core is not installed: pip install --no-deps fla-core einops")
    path = Path(spec.submodule_search_locations[0]) / relpath
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None, path
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_inputs(B: int, T: int, H: int, D: int, grad: bool) -> Inputs:
    torch.manual_seed(0)
    x = {"q": torch.randn(B, T, H, D),
         "k": torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1),
         "v": torch.randn(B, T, H, D),
         "beta": torch.rand(B, T, H)}
    return {name: t.requires_grad_(grad) for name, t in x.items()}


def head_first(x: Inputs) -> Inputs:
    """fla-core's naive references take [B, H, T, D]; transposed once, outside the timing."""
    return {name: t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)
            for name, t in x.items()}


def median_seconds(fns: list[Callable[[], None]], reps: int, warmup: int) -> list[float]:
    """Median wall time of each call, the calls interleaved so all see the same machine state."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def step(run: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], inputs: Inputs,
         backward: bool) -> Callable[[], None]:
    """One timed call: the forward alone (no graph), or forward and backward of sum(o)."""

    def call() -> None:
        if not backward:
            with torch.no_grad():
                run()
            return
        for t in inputs.values():
            t.grad = None
        o, _ = run()
        o.sum().backward()

    return call


def bench_delta_rule(args: argparse.Namespace) -> list[str]:
    """Markdown rows: median ms of each implementation and the two ratios, per mode."""
    fla = fla_naive("ops/delta_rule/naive.py")
    B, T, H, D, C = 2, args.T, 4, 64, args.chunk_size
    C_fla = args.fla_chunk_size or C
    rows = []
    for backward in (False, True):
        ours = make_inputs(B, T, H, D, backward)
        theirs = head_first(ours)

        def chunked(x: Inputs = ours) -> tuple[torch.Tensor, torch.Tensor | None]:
            return nestc.ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], chunk_size=C)

        def loop(x: Inputs = ours) -> tuple[torch.Tensor, torch.Tensor | None]:
            return nestc.ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], backend="naive")

        def fla_chunkwise(x: Inputs = theirs) -> tuple[torch.Tensor, torch.Tensor | None]:
            return fla.delta_rule_chunkwise(x["q"], x["k"], x["v"], x["beta"], chunk_size=C_fla)

        t_ours, t_fla, t_loop = median_seconds(
            [step(chunked, ours, backward), step(fla_chunkwise, theirs, backward),
             step(loop, ours, backward)], args.reps, args.warmup)
        mode = "forward+backward" if backward else "forward"
        rows.append(f"| {mode} | {t_ours * 1e3:.1f} | {t_fla * 1e3:.1f} | {t_loop * 1e3:.1f} "
                    f"| {t_ours / t_fla:.3f} | {t_ours / t_loop:.4f} |")
    return rows


def bench_language_models(args: argparse.Namespace) -> list[str]:
    """HopeLM against TransformerLM in tokens/s, built from the stdlib specs on the same budget.

    Not measured yet: this is where those rows will be produced, in the same Markdown form.
    """
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions; the median is shown")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions before those")
    ap.add_argument("--T", type=int, default=2048, help="sequence length")
    ap.add_argument("--chunk-size", type=int, default=64, help="chunk size of nestc's chunked op")
    ap.add_argument("--fla-chunk-size", type=int, default=None,
                    help="chunk size of fla-core's (default: the same; fla's own default is 32)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; delta rule at B=2, H=4, "
          f"T={args.T}, D=64, float32, chunk {args.chunk_size} (fla-core "
          f"{args.fla_chunk_size or args.chunk_size}), median of {args.reps}\n")
    print("| mode | nestc chunked ms | fla-core chunkwise ms | token loop ms "
          "| chunked / fla (<= 1.0) | chunked / loop (<= 0.333) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in bench_delta_rule(args):
        print(row)
    lm_rows = bench_language_models(args)
    if lm_rows:
        print()
        print("\n".join(lm_rows))


if __name__ == "__main__":
    main()
