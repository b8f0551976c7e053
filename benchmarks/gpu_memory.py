"""Memory recurrences on a CUDA device: nestc's delta rules against fla-core's Triton kernels.

Forward+backward time of fla-core's `chunk_delta_rule` / `chunk_gated_delta_rule` (Triton) and
of nestc's tiers on the same inputs, at B=4, H=8, D in {64, 128}, T in --T, bfloat16; plus a
float32 check that the two agree. Writes a Markdown table (--out). nestc has no Triton tier for
these yet (issue 6): its rows are the chunked PyTorch tier, the floor that tier must beat.
Usage: python benchmarks/gpu_memory.py [--T 1024 4096] [--reps 10] [--out table.md]
(needs a GPU and fla-core with its Triton kernels: pip install --no-deps fla-core einops).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

import nestc.ops


def inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, gated: bool,
           seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(
        torch.randn(B, T, H, D, device="cuda", generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device="cuda", generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, device="cuda", generator=g).to(dtype)
    xs = [q, k, v, beta]
    if gated:  # log retention in (log 0.9, 0)
        xs.append((0.9 + 0.1 * torch.rand(B, T, H, device="cuda", generator=g)).log())
    return [x.requires_grad_(True) for x in xs]


def ms(fn: Callable[[], None], reps: int) -> float:
    """Median of reps timed calls (CUDA events), after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fwd_bwd(run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
            xs: list[torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        for x in xs:
            x.grad = None
        o, _ = run(*xs)
        o.float().sum().backward()
    return call


def ops(gated: bool) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                              Callable[..., tuple[torch.Tensor, torch.Tensor | None]]]:
    """(fla's chunk kernel, nestc's op), both taking (q, k, v, beta[, g])."""
    if gated:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return (lambda q, k, v, b, g: chunk_gated_delta_rule(q, k, v, g, b, scale=1.0,
                                                             output_final_state=True),
                lambda q, k, v, b, g: nestc.ops.gated_delta_rule(q, k, v, g, b, scale=1.0))
    from fla.ops.delta_rule import chunk_delta_rule

    return (lambda q, k, v, b: chunk_delta_rule(q, k, v, b, scale=1.0, output_final_state=True),
            lambda q, k, v, b: nestc.ops.delta_rule(q, k, v, b, scale=1.0))


def agreement(gated: bool) -> float:
    """Largest difference of nestc's output from fla's, relative to fla's largest, float32."""
    fla, ours = ops(gated)
    xs = inputs(2, 300, 4, 64, torch.float32, gated)
    a, _ = fla(*xs)
    b, _ = ours(*xs)
    return ((a - b).abs().max() / a.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    lines = [f"torch {torch.__version__}, {torch.cuda.get_device_name()}, B=4, H=8, bfloat16, "
             "forward+backward, median ms", "",
             "| op | D | T | fla-core chunk (Triton) | nestc chunked (PyTorch) | nestc / fla |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for gated in (False, True):
        name = "gated_delta_rule" if gated else "delta_rule"
        fla, ours = ops(gated)
        for D in args.D:
            for T in args.T:
                xs = inputs(4, T, 8, D, torch.bfloat16, gated)
                t_fla, t_ours = ms(fwd_bwd(fla, xs), args.reps), ms(fwd_bwd(ours, xs), args.reps)
                row = f"| {name} | {D} | {T} | {t_fla:.2f} | {t_ours:.2f} | {t_ours / t_fla:.1f} |"
                print(row)
                lines.append(row)
        note = f"{name}: nestc chunked vs fla chunk, float32, T=300: {agreement(gated):.1e}"
        print(note)
        lines += ["", note, ""]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
