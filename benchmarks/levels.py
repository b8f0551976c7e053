"""Matrix memories at several frequencies: a block whose memory learns every token (the delta
rule, chunk-parallel) against the same block whose memory learns once every N tokens
(nestc.memories.PeriodicMemory: period by period), forward and backward on the chunked tier,
all measured in this process.

Prints a Markdown table of median times and each one's ratio to `every token`, at B=2, H=4,
d=64 per head, T=2048, float32.
Usage: python benchmarks/levels.py [--T 2048] [--periods 16 64 256] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nestc

SPEC = """
block B(dim, heads = 4) {
    input x : [T, dim]
    let k = x |> linear(dim) |> l2norm(per = heads)
    let v = x |> linear(dim)
    let lr = x |> linear(heads) |> sigmoid
    memory M : matrix(dim / heads, dim / heads) per head = zeros every FREQUENCY {
        key k; value v; objective l2(M(k), v); rule gd(lr = lr)
    }
    output M(x)
}
"""


def timed(mod: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    """Median seconds of a forward and backward, after one warm-up run."""
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        mod(x).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--periods", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=2, H=4, d=64, "
          f"T={args.T}, float32, chunked tier, forward+backward; median of {args.reps} runs\n")
    print("| frequency | ms | / every token |")
    print("| --- | ---: | ---: |")
    x = torch.randn(2, args.T, 256)
    base = None
    for frequency in ["token", *(f"{p} tokens" for p in args.periods)]:
        torch.manual_seed(0)
        mod = nestc.loads(SPEC.replace("FREQUENCY", frequency), "levels.nest").build(
            "B", dim=256)
        ms = 1e3 * timed(mod, x, args.reps)
        base = base or ms
        print(f"| every {frequency} | {ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
