"""Self-modifying Titans with the paper's DGD on its four projection memories (`dgd literal`:
each layer's weights also lose lr times its input's outer product, every token) against the
stdlib's (momentum with beta 0: gd with retention), in HopeLM.

The variant is the stdlib spec with the projection memories' rule replaced (the block keeps its
name, so both models have the same state_dict keys and start from the same weights). Prints a
Markdown table: the median wall time of a training step (forward, which takes the CMS levels'
gradients piece by piece, and the backward of next-token cross-entropy) of each, interleaved in
one process, and their ratio.
Usage: python benchmarks/smt_dgd.py [--dim 64] [--depth 1] [--heads 2] [--batch 32] [--T 64]
[--reps 5] [--warmup 2] [--threads N] [--write DIR]
--write DIR: also write the variant specs there (DIR/hope_dgd.nest imports DIR/smt_dgd.nest),
to train with `nestc train DIR/hope_dgd.nest HopeLM ...`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from memory import median_seconds  # benchmarks/memory.py: this script's folder is on the path
from siblings import lm_step

import nestc

STDLIB = Path(nestc.__file__).resolve().parent.parent / "stdlib"
GD = """        rule momentum(lr = (1 - momentum_beta) * eta, beta = momentum_beta, retain = alpha,
                      clip = clip)"""
DGD = """        dgd literal
        rule dgd(lr = eta, retain = alpha, clip = clip)"""


def write_variant(folder: Path) -> Path:
    """The DGD variant of self-modifying Titans and a HopeLM of it, in folder; the model's
    spec path."""
    smt = (STDLIB / "memory" / "self_modifying_titans.nest").read_text()
    if smt.count(GD) != 4:  # the four projection memories (the paper's main memory is indented)
        raise SystemExit("smt_dgd: the stdlib's projection memories changed; update GD")
    (folder / "smt_dgd.nest").write_text(smt.replace(GD, DGD))
    hope = (STDLIB / "models" / "hope.nest").read_text()
    old = 'import "std/memory/self_modifying_titans.nest"'
    assert old in hope, old
    spec = folder / "hope_dgd.nest"
    spec.write_text(hope.replace(old, f'import "{folder / "smt_dgd.nest"}"'))
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.write or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    hyper = {"vocab": 256, "dim": args.dim, "depth": args.depth, "heads": args.heads}
    torch.manual_seed(0)
    base = nestc.load("std/models/hope.nest").build("HopeLM", **hyper)
    dgd = nestc.load(str(write_variant(folder.resolve()))).build("HopeLM", **hyper)
    dgd.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 256, (args.batch, args.T + 1))
    names = ["gd (stdlib)", "dgd literal"]
    times = median_seconds([lm_step(base, tokens), lm_step(dgd, tokens)], args.reps,
                           args.warmup)
    print(f"HopeLM dim {args.dim}, depth {args.depth}, {args.heads} heads, B {args.batch}, "
          f"T {args.T}, {torch.get_num_threads()} threads\n")
    print("| projection memories' rule | step (ms) | vs stdlib |\n| --- | ---: | ---: |")
    for name, t in zip(names, times, strict=True):
        print(f"| {name} | {t * 1e3:.1f} | {t / times[0]:.2f} |")
    if args.write:
        print(f"\nspecs in {folder}: nestc train {folder / 'hope_dgd.nest'} HopeLM ...")


if __name__ == "__main__":
    main()
