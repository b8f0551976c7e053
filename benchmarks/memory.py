"""Memory recurrences on CPU: nestc's chunked delta rule over fla-core's and over the token loop,
then the stdlib language models' training throughput at equal parameter count.

Prints a Markdown table of median times and the ratios nestc chunked / fla-core
`delta_rule_chunkwise` (target <= 1.0) and nestc chunked / token loop (target <= 1/3), measured
in this process at B=2, H=4, T=2048, D=64, float32, forward only and forward+backward.
Then a table of training tokens/s (forward, backward, AdamW step) of TransformerLM, TitansLM,
DeltaNetLM (and HopeLM with --hope) built from std/models/ with --backend (chunked), at B=4,
T=256, depth 2, their widths chosen so their parameter counts match TransformerLM's at --lm-dim;
a model the compiler does not build yet gets a line naming the missing construct instead.
Usage: python benchmarks/memory.py [--reps 5] [--warmup 5] [--T 2048] [--chunk-size 64]
[--fla-chunk-size 32] [--lm-only] [--quick] [--hope] [--lm-dim 96] [--depth 2]
[--threads N] [--device cuda] [--backend triton]
(the delta rule part needs fla-core: pip install --no-deps fla-core einops).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
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


def median_seconds(fns: list[Callable[[], None]], reps: int, warmup: int,
                   between: Callable[[], object] | None = None) -> list[float]:
    """Median wall time of each call, the calls interleaved so all see the same machine state;
    `between`, if given, runs untimed after every call."""
    for _ in range(warmup):
        for fn in fns:
            fn()
            if between is not None:
                between()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
            if between is not None:
                between()
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


# the language models compared, each built from its stdlib spec with its default heads (4);
# HopeLM is timed only with --hope (or --quick): at the default size a step takes seconds and
# gigabytes
LM_SPECS = [("TransformerLM", "std/models/transformer.nest"),
            ("TitansLM", "std/models/titans.nest"),
            ("DeltaNetLM", "std/models/deltanet.nest"),
            ("HopeLM", "std/models/hope.nest")]


def build_lm(spec: str, name: str, dim: int, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    return nestc.load(spec).build(name, backend=args.backend, vocab=args.vocab, dim=dim,
                                  depth=args.depth).to(args.device)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_lm(spec: str, name: str, target: int, args: argparse.Namespace,
               ) -> tuple[torch.nn.Module, int]:
    """The model at the width (a multiple of its 4 heads) whose parameter count is nearest
    `target`, and that width; counts grow with the width."""
    best: tuple[int, torch.nn.Module, int] | None = None
    dim = 4
    while True:
        model = build_lm(spec, name, dim, args)
        count = n_params(model)
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), model, dim)
        if count >= target:
            return best[1], best[2]
        dim += 4


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor,
               ) -> Callable[[], None]:
    """One step of the models' outer level: next-token cross-entropy, backward, AdamW."""

    def call() -> None:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tokens.is_cuda:
            torch.cuda.synchronize()

    return call


def bench_language_models(args: argparse.Namespace) -> list[str]:
    """Markdown lines: training tokens/s (forward, backward and the spec's AdamW step, median
    over steps after warm-up, the models' steps interleaved) of the stdlib language models at
    equal parameter count, built with --backend (default chunked); TransformerLM at --lm-dim sets the
    count, the others take the width nearest it. A model the compiler does not build yet gets
    a line naming what is missing instead of a number."""
    B, T, V = args.lm_batch, args.lm_T, args.vocab
    adamw = nestc.load("std/optim/adam.nest")
    tokens = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0)
                           ).to(args.device)
    built, notes = [], []
    for name, spec in LM_SPECS:
        try:
            if not built:
                model, dim = build_lm(spec, name, args.lm_dim, args), args.lm_dim
            else:
                model, dim = matched_lm(spec, name, n_params(built[0][2]), args)
            step = train_step(model, adamw.build("AdamW", model.parameters(), lr=4e-4,
                                                 weight_decay=0.1), tokens)
            if name == "HopeLM" and not (args.hope or args.quick):
                notes.append(f"{name} (dim {dim}, {n_params(model):,} params) builds but is "
                             "not timed by default: a step takes seconds and gigabytes at this "
                             "size; --hope times it")
                continue
            step()  # the first step, untimed: it also builds what is cached (torch.func)
            gc.collect()
        except nestc.NestError as err:
            if not err.unsupported:
                raise
            span = err.span
            where = f" ({span.file}:{span.line})" if span is not None else ""
            notes.append(f"{name}: not measured, nestc does not build it yet: "
                         f"{err.message}{where}")
            continue
        built.append((name, dim, model, step))
    if not built:
        return notes
    # a full collection after every step, untimed, so that no collector pass lands inside a
    # timed step (HopeLM's torch.func transforms leave ~10k small cyclic objects a step)
    seconds = median_seconds([step for *_, step in built], args.reps, max(args.warmup - 1, 0),
                             between=gc.collect)
    base = n_params(built[0][2])
    gap = max(abs(n_params(model) - base) / base for _, _, model, _ in built)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [f"Language models on {where}: training steps (forward, backward, AdamW) at B={B}, "
             f"T={T}, depth {args.depth}, vocab {V}, backend {args.backend}, float32, median of "
             f"{args.reps}; "
             f"parameter counts within {gap:.1%} of TransformerLM's\n",
             "| model | dim | params | tokens/s | / TransformerLM |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {dim} | {n_params(model):,} | {B * T / t:,.0f} | {seconds[0] / t:.3f} |"
              for (name, dim, model, _), t in zip(built, seconds)]
    return lines + ([""] + notes if notes else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions; the median is shown")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions before those")
    ap.add_argument("--T", type=int, default=2048, help="sequence length")
    ap.add_argument("--chunk-size", type=int, default=64, help="chunk size of nestc's chunked op")
    ap.add_argument("--fla-chunk-size", type=int, default=None,
                    help="chunk size of fla-core's (default: the same; fla's own default is 32)")
    ap.add_argument("--lm-only", action="store_true",
                    help="only the language models (skips the delta rule and fla-core)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes and few repetitions: checks that everything runs")
    ap.add_argument("--lm-dim", type=int, default=96, help="TransformerLM's width; the other "
                    "models take the width that matches its parameter count")
    ap.add_argument("--depth", type=int, default=2, help="language models' depth")
    ap.add_argument("--vocab", type=int, default=256, help="language models' vocabulary")
    ap.add_argument("--lm-batch", type=int, default=4, help="language models' batch")
    ap.add_argument("--lm-T", type=int, default=256, help="language models' sequence length")
    ap.add_argument("--device", default="cpu", help="the language models' device (cpu, cuda)")
    ap.add_argument("--backend", default="chunked", choices=("chunked", "triton"),
                    help="the language models' back end (triton: the delta-rule memories "
                    "through the Triton kernels; needs CUDA)")
    ap.add_argument("--hope", action="store_true",
                    help="time HopeLM too (tens of seconds a step at the default size)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                    "torch's; --quick: 1, steadier when other processes share the cores)")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.warmup, args.T = 3, 2, 256
        args.lm_dim, args.depth, args.vocab, args.lm_batch, args.lm_T = 40, 1, 64, 2, 64
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    if not args.lm_only:
        print(f"Delta rule at B=2, H=4, T={args.T}, D=64, float32, chunk {args.chunk_size} "
              f"(fla-core {args.fla_chunk_size or args.chunk_size}), median of {args.reps}\n")
        print("| mode | nestc chunked ms | fla-core chunkwise ms | token loop ms "
              "| chunked / fla (<= 1.0) | chunked / loop (<= 0.333) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for row in bench_delta_rule(args):
            print(row, flush=True)
        print()
    print("\n".join(bench_language_models(args)))


if __name__ == "__main__":
    main()
