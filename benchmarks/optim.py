"""Optimizer step time: compiled nestc optimizers over the fastest torch.optim variant.

Prints ratios (nestc time / torch fused time) measured in this process, interleaved so both
see the same machine state. Usage: python benchmarks/optim_step.py [--params 10.5e6]
[--reps 30] [--device cuda --out results.txt] (the GPU variant adds the Triton AdamW row; it
has not been run on a GPU yet).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import nestc

DEVICE = "cpu"
LINES: list[str] = []


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_params(n: float, seed: int = 0, width: int = 1024) -> list[torch.nn.Parameter]:
    """Square matrices and vectors adding up to about n parameters, like an MLP stack."""
    torch.manual_seed(seed)
    params: list[torch.nn.Parameter] = []
    total = 0
    while total + width * (width + 1) <= n:
        w = torch.nn.Parameter(torch.randn(width, width, device=DEVICE) * 0.02)
        b = torch.nn.Parameter(torch.zeros(width, device=DEVICE))
        params += [w, b]
        total += w.numel() + b.numel()
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def time_steps(opt: torch.optim.Optimizer, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def bench(label: str, make_ref, make_ours, n: float, reps: int,
          width: int = 1024) -> tuple[float, float, float]:
    ref_params, our_params = make_params(n, width=width), make_params(n, width=width)
    ref, ours = make_ref(ref_params), make_ours(our_params)
    for _ in range(3):  # warm up: state allocation, first-step paths, torch.compile
        ref.step()
        ours.step()
    r, o = [], []
    for _ in range(reps):  # interleave so drift hits both alike
        r += time_steps(ref, 1)
        o += time_steps(ours, 1)
    rm, om = statistics.median(r), statistics.median(o)
    line = f"{label:<48} torch {rm * 1e3:8.2f} ms   nestc {om * 1e3:8.2f} ms   ratio {om / rm:5.2f}"
    print(line)
    LINES.append(line)
    return rm, om, om / rm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=float, default=10.5e6)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--muon-params", type=float, default=1.3e6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU variant)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.params
    total = sum(p.numel() for p in make_params(n))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {total / 1e6:.1f}M "
          f"parameters, median of {args.reps} steps")
    adam = nestc.load("std/optim/adam.nest")
    sgd = nestc.load("std/optim/sgd.nest")
    # an element-wise optimizer no pattern recognizes: the generic paths' real test
    nested = nestc.load("std/optim/nested.nest")
    T = torch.optim
    rows = [
        ("Adam (nestc auto) / torch Adam fused",
         lambda p: T.Adam(p, fused=True), lambda p: adam.build("Adam", p)),
        ("AdamW (nestc auto) / torch AdamW fused",
         lambda p: T.AdamW(p, fused=True), lambda p: adam.build("AdamW", p)),
        ("SGD momentum (nestc auto) / torch SGD fused",
         lambda p: T.SGD(p, lr=1e-3, momentum=0.9, fused=True),
         lambda p: sgd.build("SGD", p, momentum=0.9)),
        ("SGD plain (nestc auto) / torch SGD fused",
         lambda p: T.SGD(p, lr=1e-3, fused=True), lambda p: sgd.build("SGD", p)),
        ("Adam (nestc generic) / torch Adam fused",
         lambda p: T.Adam(p, fused=True), lambda p: adam.build("Adam", p, backend="generic")),
        ("AdamW (nestc generic) / torch AdamW fused",
         lambda p: T.AdamW(p, fused=True), lambda p: adam.build("AdamW", p, backend="generic")),
        ("SGD momentum (nestc generic) / torch SGD fused",
         lambda p: T.SGD(p, lr=1e-3, momentum=0.9, fused=True),
         lambda p: sgd.build("SGD", p, momentum=0.9, backend="generic")),
        ("Adam (nestc compiled) / torch Adam fused",
         lambda p: T.Adam(p, fused=True), lambda p: adam.build("Adam", p, backend="compiled")),
        ("AdamW (nestc compiled) / torch AdamW fused",
         lambda p: T.AdamW(p, fused=True), lambda p: adam.build("AdamW", p, backend="compiled")),
        ("PreconditionedMomentum (nestc generic) / torch Adam fused",
         lambda p: T.Adam(p, fused=True),
         lambda p: nested.build("PreconditionedMomentum", p, backend="generic")),
        ("PreconditionedMomentum (nestc compiled) / torch Adam fused",
         lambda p: T.Adam(p, fused=True),
         lambda p: nested.build("PreconditionedMomentum", p, backend="compiled")),
        ("torch Adam foreach / torch Adam fused (context)",
         lambda p: T.Adam(p, fused=True), lambda p: T.Adam(p, foreach=True)),
    ]
    if DEVICE == "cuda":  # the generated Triton kernel against torch's fused AdamW
        rows.insert(2, ("AdamW (nestc triton) / torch AdamW fused",
                        lambda p: T.AdamW(p, fused=True),
                        lambda p: adam.build("AdamW", p, backend="triton")))
    for label, ref, ours in rows:
        bench(label, ref, ours, n, args.reps)
    # Newton-Schulz is five rounds of three matmuls per matrix: a smaller stack keeps it short
    muon = nestc.load("std/optim/muon.nest")
    matrices = lambda ps: [p for p in ps if p.ndim == 2]  # noqa: E731 - torch's Muon: 2-D only
    print(f"Muon: {args.muon_params / 1e6:.1f}M parameters in 256x256 matrices")
    bench("Muon (nestc auto) / torch.optim.Muon", lambda p: T.Muon(matrices(p)),
          lambda p: muon.build("Muon", matrices(p)), args.muon_params, args.reps, width=256)
    m3 = nestc.load("std/optim/m3.nest")
    # M3 against Muon, its cost floor: one more Newton-Schulz every slow_every steps
    bench("M3 (nestc auto) / torch.optim.Muon", lambda p: T.Muon(matrices(p)),
          lambda p: m3.build("M3", matrices(p)), args.muon_params, args.reps, width=256)
    if args.out:
        header = (f"torch {torch.__version__}, device {DEVICE}, {total / 1e6:.1f}M parameters, "
                  f"median of {args.reps} steps")
        Path(args.out).write_text("\n".join([header, *LINES]) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
