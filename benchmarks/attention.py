"""Sliding-window softmax attention (`softmax_attention(q, C, window = W)`): the chunked tier's
blocked computation against the reference tier's one masked product and against full causal
attention (SDPA is_causal), all measured in this process.

Prints a Markdown table of median forward and forward+backward times, and the ratios blocked /
masked and blocked / full causal, at B=2, H=4, D=64, float32, for each T and window.
Usage: python benchmarks/attention.py [--T 1024 4096] [--window 128 512] [--reps 5]
[--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

from nestc.memories import causal_attention


def timed(fn: Callable[[], torch.Tensor], backward: bool, reps: int, device: str) -> float:
    """Median seconds of fn (and a backward of its output's sum), after one warm-up run."""
    times = []
    for i in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if backward:
            out.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def contenders(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
               ) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "blocked": lambda: causal_attention(q, k, v, window, blocked=True),
        "masked": lambda: causal_attention(q, k, v, window, blocked=False),
        "full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--window", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          "B=2, H=4, D=64, float32; median of "
          f"{args.reps} runs\n")
    print("| T | window | pass | blocked (ms) | masked (ms) | full causal (ms) "
          "| blocked / masked | blocked / full |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for T in args.T:
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, T, 64, device=args.device, requires_grad=True)
                   for _ in range(3))
        for window in args.window:
            for backward in (False, True):
                with torch.set_grad_enabled(backward):
                    ms = {name: 1e3 * timed(fn, backward, args.reps, args.device)
                          for name, fn in contenders(q, k, v, window).items()}
                print(f"| {T} | {window} | {'fwd+bwd' if backward else 'fwd'} "
                      f"| {ms['blocked']:.1f} | {ms['masked']:.1f} | {ms['full']:.1f} "
                      f"| {ms['blocked'] / ms['masked']:.2f} "
                      f"| {ms['blocked'] / ms['full']:.2f} |")


if __name__ == "__main__":
    main()
