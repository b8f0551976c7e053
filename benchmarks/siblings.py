"""Memories that run as one (nestc.memories._Siblings) against the same memories run alone:
training steps of HopeLM and forward+backward of the self-modifying Titans block, in one
process, interleaved, with equal weights.

Prints a Markdown table: aten operations per step (counted with a TorchDispatchMode: views
included, each a dispatch on the host, most a kernel launch on a GPU), the median wall time
of a step, and the ratio of the two. HopeLM's step is its forward (which takes its CMS levels'
gradients piece by piece) and the backward of next-token cross-entropy.
With --settle it compares, instead, the memories that nothing reads after their writes (the
projection memories) run for their states alone (MLPMemory.settle, no read computed) against
the same memories reading their keys, the reads discarded (what the generated code did before).
Usage: python benchmarks/siblings.py [--dim 64] [--depth 2] [--batch 2] [--T 128] [--reps 5]
[--warmup 2] [--threads N] [--device cpu] [--quick] [--settle]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
from collections.abc import Callable
from typing import Any

import torch
from memory import median_seconds  # benchmarks/memory.py: this script's folder is on the path
from torch.utils._python_dispatch import TorchDispatchMode

import nestc
from nestc.memories import MLPMemory, run_each_alone


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_call(fn: Callable[[], None]) -> int:
    with _Count() as count:
        fn()
    return count.n


def lm_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()
                                          ).backward()
        if tokens.is_cuda:
            torch.cuda.synchronize()
    return call


def block_step(block: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        block.zero_grad(set_to_none=True)
        block(x).pow(2).mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    return call


def reading_keys(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of module whose MLP memories that only learn read their keys for their states
    (and drop the reads) instead of settling."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, MLPMemory):
            def settle(env: dict[str, Any], m: MLPMemory = m) -> None:
                m.read(env[m.env_key]["k"].flatten(2), env)
            m.settle = settle  # type: ignore[method-assign]
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    ap.add_argument("--settle", action="store_true",
                    help="the state-only run of memories nothing reads, against reading keys")
    args = ap.parse_args()
    if args.quick:
        args.dim, args.depth, args.batch, args.T, args.reps, args.warmup = 16, 1, 1, 24, 1, 1
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hope = nestc.load("std/models/hope.nest").build(
        "HopeLM", dim=args.dim, depth=args.depth).to(args.device)
    smt = nestc.load("std/memory/self_modifying_titans.nest").build(
        "SelfModifyingTitans", dim=args.dim).to(args.device)
    tokens = torch.randint(0, 256, (args.batch, args.T + 1),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    x = torch.randn(args.batch, args.T, args.dim, generator=torch.Generator().manual_seed(1)
                    ).to(args.device)
    rows = [(f"HopeLM (dim {args.dim}, depth {args.depth}), training step", lm_step, hope,
             tokens),
            (f"SelfModifyingTitans (dim {args.dim}), forward and backward", block_step, smt, x)]
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}, {where}; B={args.batch}, T={args.T}, float32, chunked "
          f"tier, median of {args.reps}\n")
    tags = ("states only", "reading keys") if args.settle else ("as one", "alone")
    print(f"| what | memories | aten ops / step | ms / step | {tags[0]} / {tags[1]} |")
    print("| --- | --- | ---: | ---: | ---: |")
    for what, make, module, inputs in rows:
        other = reading_keys(module) if args.settle else run_each_alone(copy.deepcopy(module))
        calls = [make(module, inputs), make(other, inputs)]
        ops = [ops_per_call(call) for call in calls]
        # a full collection after every call, untimed (as benchmarks/memory.py does)
        fused, single = median_seconds(calls, args.reps, args.warmup, between=gc.collect)
        print(f"| {what} | {tags[0]} | {ops[0]:,} | {fused * 1e3:,.1f} | "
              f"{fused / single:.2f} |")
        print(f"| {what} | {tags[1]} | {ops[1]:,} | {single * 1e3:,.1f} | 1.00 |", flush=True)


if __name__ == "__main__":
    main()
