"""Optimizer step time: compiled nestc optimizers over the fastest torch.optim variant.

Prints ratios (nestc time / torch fused time) measured in this process, interleaved so both
see the same machine state. Usage: python benchmarks/optim.py [--params 10.5e6] [--reps 30]
[--device cuda] [--out results.md]. On CUDA it adds the generated Triton kernels' rows and
times blocks of --inner steps between synchronizations; --quick runs tiny sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import nestc

DEVICE = "cpu"
INNER = 1  # steps per timed block: on a GPU one step can be shorter than a launch round trip
LINES: list[str] = []
HEADER: list[str] = []
OUT = ""


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
        for _ in range(INNER):
            opt.step()
        sync()
        times.append((time.perf_counter() - t) / INNER)
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
    print(f"{label:<60} torch {rm * 1e3:8.3f} ms   nestc {om * 1e3:8.3f} ms   "
          f"ratio {om / rm:5.2f}")
    LINES.append(f"| {label} | {rm * 1e3:.3f} | {om * 1e3:.3f} | {om / rm:.2f} |")
    if OUT:  # written after every row, so a run cut short keeps what it measured
        table = ["| optimizer / baseline | torch ms | nestc ms | ratio |", "|---|---|---|---|"]
        Path(OUT).write_text("\n".join([*HEADER, "", *table, *LINES]) + "\n")
    return rm, om, om / rm


def rows(device: str) -> list[tuple[str, Any, Any]]:
    """(label, torch optimizer, nestc optimizer) for the element-wise optimizers."""
    adam = nestc.load("std/optim/adam.nest")
    sgd = nestc.load("std/optim/sgd.nest")
    # an element-wise optimizer no pattern recognizes: the generic paths' real test
    nested = nestc.load("std/optim/nested.nest")
    T = torch.optim
    fused_adam = lambda p: T.Adam(p, fused=True)  # noqa: E731
    fused_adamw = lambda p: T.AdamW(p, fused=True)  # noqa: E731
    fused_sgd = lambda p: T.SGD(p, lr=1e-3, momentum=0.9, fused=True)  # noqa: E731
    out = [
        ("Adam (nestc auto) / torch Adam fused", fused_adam, lambda p: adam.build("Adam", p)),
        ("AdamW (nestc auto) / torch AdamW fused", fused_adamw, lambda p: adam.build("AdamW", p)),
        ("SGD momentum (nestc auto) / torch SGD fused", fused_sgd,
         lambda p: sgd.build("SGD", p, momentum=0.9)),
        ("SGD plain (nestc auto) / torch SGD fused",
         lambda p: T.SGD(p, lr=1e-3, fused=True), lambda p: sgd.build("SGD", p)),
    ]
    backends = ["generic", *(["triton"] if device == "cuda" else []), "compiled"]
    for b in backends:
        out += [
            (f"Adam (nestc {b}) / torch Adam fused", fused_adam,
             lambda p, b=b: adam.build("Adam", p, backend=b)),
            (f"AdamW (nestc {b}) / torch AdamW fused", fused_adamw,
             lambda p, b=b: adam.build("AdamW", p, backend=b)),
            (f"SGD momentum (nestc {b}) / torch SGD fused", fused_sgd,
             lambda p, b=b: sgd.build("SGD", p, momentum=0.9, backend=b)),
            (f"PreconditionedMomentum (nestc {b}) / torch Adam fused", fused_adam,
             lambda p, b=b: nested.build("PreconditionedMomentum", p, backend=b)),
        ]
    out.append(("torch Adam foreach / torch Adam fused (context)", fused_adam,
                lambda p: T.Adam(p, foreach=True)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=float, default=0, help="default 10.5e6 (CPU), 100e6 (CUDA)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--muon-params", type=float, default=0,
                    help="default 1.3e6 in 256x256 matrices (CPU), 33.6e6 in 1024x1024 (CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU variant)")
    ap.add_argument("--inner", type=int, default=0, help="steps per timed block (default 1 "
                    "on CPU, 20 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no torch.compile rows")
    ap.add_argument("--only", default="", help="run the rows whose label contains this text")
    ap.add_argument("--out", help="also write the table to this file (Markdown)")
    args = ap.parse_args()
    global DEVICE, INNER, OUT
    DEVICE, OUT = args.device, args.out or ""
    cuda = DEVICE == "cuda"
    INNER = args.inner or (20 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.params or (100e6 if cuda else 10.5e6)
    width, muon_width = (2048, 1024) if cuda else (1024, 256)
    muon_n = args.muon_params or (33.6e6 if cuda else 1.3e6)
    if args.quick:
        n, muon_n, width, muon_width, args.reps = 2e4, 2e4, 64, 32, 3
    total = sum(p.numel() for p in make_params(n, width=width))
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    header = (f"torch {torch.__version__}, {where}, {total / 1e6:.1f}M parameters in "
              f"{width}x{width} matrices and vectors, median of {args.reps} blocks of {INNER} "
              "steps")
    print(header)
    HEADER.append(header)
    for label, ref, ours in rows(DEVICE):
        if args.quick and "compiled" in label or args.only not in label:
            continue
        bench(label, ref, ours, n, args.reps, width=width)
    if args.only:
        return
    # Newton-Schulz is five rounds of three matmuls per matrix: a smaller stack keeps it short
    muon = nestc.load("std/optim/muon.nest")
    matrices = lambda ps: [p for p in ps if p.ndim == 2]  # noqa: E731 - torch's Muon: 2-D only
    note = f"Muon and M3: {muon_n / 1e6:.1f}M parameters in {muon_width}x{muon_width} matrices"
    print(note)
    LINES.append(f"| *{note}* | | | |")
    bench("Muon (nestc auto) / torch.optim.Muon", lambda p: torch.optim.Muon(matrices(p)),
          lambda p: muon.build("Muon", matrices(p)), muon_n, args.reps, width=muon_width)
    m3 = nestc.load("std/optim/m3.nest")
    # M3 against Muon, its cost floor: one more Newton-Schulz every slow_every steps
    bench("M3 (nestc auto) / torch.optim.Muon", lambda p: torch.optim.Muon(matrices(p)),
          lambda p: m3.build("M3", matrices(p)), muon_n, args.reps, width=muon_width)
    if OUT:
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
