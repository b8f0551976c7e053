"""Self-modifying Titans with the paper's DGD on its four projection memories (HopeLM's
`paper_dgd = true`: `dgd literal`, each layer's weights also lose lr times its input's outer
product, every token), without and with momentum (`momentum_beta`), against the stdlib's
default (gd with retention), in HopeLM.

All models start from the same weights (the hyperparameters change only the rule). Prints a
Markdown table: the median wall time of a training step (forward, which takes the CMS levels'
gradients piece by piece, and the backward of next-token cross-entropy) of each, interleaved in
one process, and their ratio to the default's.
Usage: python benchmarks/smt_dgd.py [--dim 64] [--depth 1] [--heads 2] [--batch 32] [--T 64]
[--beta 0.9] [--reps 5] [--warmup 2] [--threads N]
To train one: nestc train std/models/hope.nest HopeLM ... -p paper_dgd=true
[-p momentum_beta=0.9].
"""

from __future__ import annotations

import argparse

import torch
from memory import median_seconds  # benchmarks/memory.py: this script's folder is on the path
from siblings import lm_step

import nestc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.9, help="momentum_beta of the third")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prog = nestc.load("std/models/hope.nest")
    hyper = {"vocab": 256, "dim": args.dim, "depth": args.depth, "heads": args.heads}
    torch.manual_seed(0)
    base = prog.build("HopeLM", **hyper)
    models = [base, prog.build("HopeLM", paper_dgd=True, **hyper),
              prog.build("HopeLM", paper_dgd=True, momentum_beta=args.beta, **hyper)]
    for model in models[1:]:
        model.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 256, (args.batch, args.T + 1))
    names = ["gd with retention (default)", "dgd literal (paper_dgd)",
             f"dgd literal with momentum {args.beta:g} (momentum_beta)"]
    times = median_seconds([lm_step(model, tokens) for model in models], args.reps,
                           args.warmup)
    print(f"HopeLM dim {args.dim}, depth {args.depth}, {args.heads} heads, B {args.batch}, "
          f"T {args.T}, {torch.get_num_threads()} threads\n")
    print("| projection memories' rule | step (ms) | vs default |\n| --- | ---: | ---: |")
    for name, t in zip(names, times, strict=True):
        print(f"| {name} | {t * 1e3:.1f} | {t / times[0]:.2f} |")


if __name__ == "__main__":
    main()
