"""What the triton back end fuses: PyTorch operations per training step of the stdlib language
models built with backend="chunked" and backend="triton", in one process, equal weights.

Prints a Markdown table: aten operations per step (counted with a TorchDispatchMode, views
included: each a dispatch on the host, most a kernel launch on a GPU) and, of those, the calls
of nestc's Triton ops (nestc::delta_rule_fwd, nestc::mlp_memory_fwd, their backwards: one
launch each, or a few, whatever the sequence length), and on CUDA the median milliseconds of a
step. A step is the model's forward (HopeLM's takes its CMS levels' gradients piece by piece)
and the backward of next-token cross-entropy. On a CPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1, set here): the counts hold, the times would not, so none are
printed.

Usage: python benchmarks/fusion.py [--dim 64] [--depth 2] [--heads 4] [--batch 2] [--T 128]
[--models HopeLM TitansLM DeltaNetLM] [--reps 5] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Any

MODELS = {"HopeLM": "std/models/hope.nest", "TitansLM": "std/models/titans.nest",
          "DeltaNetLM": "std/models/deltanet.nest"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.dim, args.depth, args.heads, args.batch, args.T = 32, 1, 2, 1, 40
    if args.device == "cpu":  # before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import nestc

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            self.ops[func.namespace] += 1
            return func(*args, **(kwargs or {}))

    tokens = torch.randint(0, 256, (args.batch, args.T + 1),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else "CPU, kernels interpreted"
    print(f"torch {torch.__version__}, {where}; B={args.batch}, T={args.T}, dim {args.dim}, "
          f"depth {args.depth}, heads {args.heads}, float32\n")
    print("| model | back end | aten ops / step | of them nestc kernels | ms / step |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.models:
        program = nestc.load(MODELS[name])
        for backend in ("chunked", "triton"):
            torch.manual_seed(0)
            model = program.build(name, vocab=256, dim=args.dim, depth=args.depth,
                                  heads=args.heads, backend=backend).to(args.device)

            def step(model: Any = model) -> None:
                model.zero_grad(set_to_none=True)
                logits = model(tokens[:, :-1])
                torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                  tokens[:, 1:].flatten()).backward()

            with Count() as count:
                step()
            ms = "-"
            if cuda:
                times = []
                for _ in range(args.reps + 1):
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    step()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                ms = f"{sorted(times[1:])[len(times[1:]) // 2]:,.1f}"
            total = sum(count.ops.values())
            print(f"| {name} | {backend} | {total:,} | {count.ops['nestc']} | {ms} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
