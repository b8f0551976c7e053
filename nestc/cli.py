"""The nestc command: check, explain, viz, compile, train, bench.

Every NestError prints as `file:line:col: error: ...` with the source line and a caret and
exits 1; a traceback only with NESTC_DEBUG=1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from nestc.env import DEBUG
from nestc.errors import NestError, StepDivisionError

VIZ_FORMATS = ("svg", "html", "dot", "mermaid", "png")


def _hyper_args(pairs: list[str], flag: str = "--set") -> dict[str, Any]:
    """`--set lr=0.1 --set betas=(0.9,0.99)` -> {"lr": 0.1, "betas": (0.9, 0.99)}; flag names
    the option in errors."""
    from nestc.hyper import UNKNOWN, const_eval
    from nestc.parse import parse_text

    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.isidentifier():
            raise NestError(f"{flag} takes NAME=VALUE, got `{pair}`", kind="value")
        hint = "a value is a number, true or false, a \"string\", a tuple or a list"
        try:
            module = parse_text(f"block B(x = {text}) {{ }}", f"{flag} {name}")
            params = module.decls[0].params if len(module.decls) == 1 else ()
            default = params[0].default if len(params) == 1 else None
            value = UNKNOWN if default is None else const_eval(default, {})
        except NestError as err:  # the message only: its span is in text nestc made up
            raise NestError(f"{flag} {name}={text}: {err.message}", kind="value",
                            hint=hint) from None
        if value is UNKNOWN:
            raise NestError(f"{flag} {name}: `{text}` is not a constant", kind="value",
                            hint=hint)
        out[name] = value
    return out


def _load(path: str):
    import nestc

    return nestc.load(path)


def _decl_name(prog, name: str | None) -> str:
    if name:
        return name
    if len(prog.names) == 1:
        return prog.names[0]
    raise NestError(f"`{prog.file}` declares {', '.join(prog.names) or 'nothing'}: name one "
                    "with --name", kind="name", file=prog.file)


TOO_DEEP = ("the declarations call one another too deeply for nestc (more than about a "
            "hundred levels); build the deep part with `repeat`")


def cmd_check(args: argparse.Namespace) -> int:
    results = []
    failed = 0
    start = time.perf_counter()
    for path in args.files:
        where = None  # the declaration being generated
        try:
            try:
                prog = _load(path)
                for name in prog.names:
                    where = prog.decl(name).decl.name_span
                    _builds(prog, name)
            except RecursionError:  # an error of this file: the others are still checked
                if DEBUG:
                    raise
                raise NestError(TOO_DEEP, where, file=path) from None
            results.append({"file": path, "ok": True, "declarations": prog.names,
                            "diagnostics": []})
        except NestError as err:
            failed += 1
            results.append({"file": path, "ok": False, "declarations": [],
                            "diagnostics": [d.to_json() for d in err.diagnostics]})
            if args.format == "text":
                print(err, file=sys.stderr)
    if args.format == "json":
        print(json.dumps({"files": results, "errors": failed}, indent=2))
    elif not args.quiet:
        ms = (time.perf_counter() - start) * 1000
        ok = len(args.files) - failed
        print(f"checked {len(args.files)} file{'s' * (len(args.files) != 1)}: {ok} ok, "
              f"{failed} with errors ({ms:.0f} ms)")
    return 1 if failed else 0


def _builds(prog: Any, name: str, **hyper: Any) -> None:
    """NestError where block or model `name` cannot be built at these hyperparameters (the
    defaults: skipped where one is required) for a mistake of the spec, such as a shape that
    does not divide (the checker does not size tensors); a feature not built yet is no mistake.
    Generates the source only: no torch."""
    checked = prog.decl(name)
    if checked.kind == "optimizer" or (not hyper and any(h.required for h in
                                                          checked.hypers.values())):
        return
    try:
        prog.source(name, **hyper)
    except NestError as err:
        if not err.unsupported:
            raise


def cmd_explain(args: argparse.Namespace) -> int:
    from nestc.explain import explain

    prog = _load(args.file)
    name = _decl_name(prog, args.name)
    for flag, value in (("--tokens", args.tokens), ("--steps", args.steps)):
        if value is not None and value < 1:  # (-100 printed "updates -7 over -100 tokens")
            raise NestError(f"{flag} counts updates over a positive number, got {value}",
                            kind="value")
    print(explain(prog, name, tokens=args.tokens, steps=args.steps, **_hyper_args(args.set)))
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from nestc.viz import render

    prog = _load(args.file)
    name = _decl_name(prog, args.name)
    suffix = Path(args.output).suffix.lstrip(".").lower() if args.output else ""
    formats = {"md": "mermaid"}
    fmt = formats.get(args.format, args.format) or formats.get(suffix, suffix) or \
        ("svg" if not args.output else "")
    if not fmt:
        raise NestError(f"cannot tell the picture format of `{args.output}`", kind="value",
                        hint=f"end it with .svg, .png, ... or give -f ({', '.join(VIZ_FORMATS)})")
    if fmt not in VIZ_FORMATS:
        raise NestError(f"unknown picture format `{fmt}`", kind="value",
                        hint=f"formats are {', '.join(VIZ_FORMATS)}")
    if args.format and suffix and formats.get(suffix, suffix) in VIZ_FORMATS and \
            formats.get(suffix, suffix) != fmt:  # (svg written into x.png)
        raise NestError(f"-f {args.format} but -o `{args.output}` says {suffix}", kind="value",
                        hint="give one of them, or make them agree")
    hyper = _hyper_args(args.set)
    _builds(prog, name, **hyper)  # (a picture of what cannot be built, --set's values too)
    data = render(prog.graph(name, **hyper), fmt, detail=args.detail)
    if args.output:
        out = Path(args.output)
        if out.parent.exists() and not out.parent.is_dir():
            raise NestError(f"-o `{out}`: `{out.parent}` is a file, not a folder", kind="value")
        out.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            out.write_bytes(data)
        else:
            out.write_text(data, encoding="utf-8")
        print(f"wrote {out}")
    elif isinstance(data, bytes):
        raise NestError("PNG output needs -o FILE", kind="value")
    else:
        print(data)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    prog = _load(args.file)
    name = _decl_name(prog, args.name)
    text = prog.source(name, **_hyper_args(args.set))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nestc.train import train

    summary = train(args.file, args.model, args.task, hyper=_hyper_args(args.param, "-p"),
                    knobs=_hyper_args(args.knob, "-k"), steps=args.steps, batch=args.batch,
                    lr=args.lr, warmup=args.warmup, schedule=args.schedule, seed=args.seed,
                    eval_every=args.eval_every, eval_batches=args.eval_batches, out=args.out,
                    checkpoint_every=args.checkpoint_every, resume=args.resume,
                    stop_after=args.stop_after, backend=args.backend, device=args.device,
                    threads=args.threads, quiet=args.quiet)
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        acc = summary.get("eval_acc")
        tail = f", eval acc {100 * acc:.1f}%" if acc is not None else ""
        print(f"trained {summary['steps']} steps: loss {summary['loss']:.4f}{tail}; "
              f"wrote {summary['out']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nestc.bench import bench, split_knobs

    knobs = {task: _hyper_args(pairs, "-k") for task, pairs in split_knobs(args.knob).items()}
    params = {model: _hyper_args(pairs, "-p")
              for model, pairs in split_knobs(args.param, "-p").items()}
    bench(command=shlex.join(["nestc", *args.argv]), update_docs=args.update_docs,
          quick=args.quick, models=args.models, tasks=args.tasks, steps=args.steps,
          batch=args.batch, minutes=args.minutes, dim=args.dim, depth=args.depth,
          lengths=args.lengths, knobs=knobs, params=params, out=args.out, seed=args.seed,
          threads=args.threads, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
          eval_every=args.eval_every, eval_batches=args.eval_batches, backend=args.backend,
          device=args.device, quiet=args.quiet)
    return 0


def _where_to_run(p: argparse.ArgumentParser, whose: str) -> None:
    """--backend, --device and --threads, which train and bench share."""
    p.add_argument("--backend", default=None,
                   help=f"{whose} back end: reference, chunked or triton")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if "
                   "there is one)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestc", description="Compile nested learning systems.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("check", help="parse and check specs", description="Parse and check "
                       "one or more .nest files; errors go to stderr as file:line:col.")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: diagnostics for editors on stdout")
    c.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    c.set_defaults(run=cmd_check)

    def decl_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("file", metavar="FILE", help="a .nest file, or std/... for the stdlib")
        q.add_argument("--name", "-n", help="the declaration (needed when the file has several)")
        q.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a hyperparameter (repeatable)")

    e = sub.add_parser("explain", help="levels, frequencies, context flow and semantic choices",
                       description="Explain a declaration's levels, fastest first.")
    decl_args(e)
    e.add_argument("--tokens", type=int, default=None, help="count updates over N tokens")
    e.add_argument("--steps", type=int, default=None, help="count updates over N steps")
    e.set_defaults(run=cmd_explain)

    v = sub.add_parser("viz", help="draw the nest graph (svg, html, dot, mermaid, png)",
                       description="Draw the levels of a declaration as frequency bands.")
    decl_args(v)
    v.add_argument("-o", "--output", help="output file; its suffix picks the format")
    v.add_argument("--format", "-f", choices=VIZ_FORMATS, help="picture format (default svg)")
    v.add_argument("--detail", choices=("auto", "levels", "full"), default="auto",
                   help="levels: only the levels, each path through signals one edge, a "
                   "block's weights one box, and where reads crowd (a deep residual stack) "
                   "those the others imply left out; full: every signal too; auto (default): "
                   "full for small graphs, levels for large ones")
    v.set_defaults(run=cmd_viz)

    k = sub.add_parser("compile", help="print the generated PyTorch source",
                       description="Emit the generated PyTorch source for a declaration: an "
                       "optimizer's torch.optim.Optimizer class, or a block's or model's "
                       "torch.nn.Module classes at its hyperparameters (--set).")
    decl_args(k)
    k.add_argument("-o", "--output", help="write the source to this file")
    k.set_defaults(run=cmd_compile)

    t = sub.add_parser(
        "train", help="train a model on a synthetic task with its declared outer level",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model declaration on a synthetic task. The outer level is the "
        "model's `train` clause:\nits rule's optimizer declaration with the rule's arguments, "
        "and the cross-entropy against\nthe task's targets. Writes metrics.jsonl, loss.png, "
        "accuracy.png, checkpoint.pt and\nsummary.json into --out. Under torchrun it trains "
        "data parallel (DDP).",
        epilog="example:\n  nestc train std/models/transformer.nest TransformerLM --task copy "
        "-p dim=64 -k half=16 \\\n      --steps 500 --batch 32 --warmup 50 --schedule cosine\n"
        "  torchrun --nproc_per_node 2 -m nestc.cli train ... (the same arguments)")
    t.add_argument("file", metavar="SPEC", help="a .nest file, or std/... for the stdlib")
    t.add_argument("model", metavar="MODEL", help="the model declaration to train")
    t.add_argument("--task", required=True, help="a task of nestc.tasks: copy, mqar, "
                   "continual, ... (an unknown name lists them)")
    t.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a model hyperparameter (repeatable); vocab defaults to the task's")
    t.add_argument("-k", "--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="a task knob such as seq_len=64 (repeatable)")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    t.add_argument("--batch", type=int, default=16,
                   help="sequences per step, over all ranks (default 16)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the "
                   "rule's)")
    t.add_argument("--warmup", type=int, default=0, help="steps of linear warmup (default 0)")
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup: constant, or cosine down to a tenth (default constant)")
    t.add_argument("--seed", type=int, default=0, help="weights and data (default 0)")
    t.add_argument("--eval-every", type=int, default=None, metavar="N", help="evaluate every "
                   "N steps (default: a tenth of the steps; 0: at the end of each phase only)")
    t.add_argument("--eval-batches", type=int, default=4, metavar="N",
                   help="batches in the fixed eval set, per phase (default 4)")
    t.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default runs/MODEL-TASK)")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps (always at the end)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from OUT/checkpoint.pt or PATH")
    t.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N (the schedule still spans --steps); resume later")
    _where_to_run(t, "the model's")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar or output")
    t.set_defaults(run=cmd_train)

    b = sub.add_parser(
        "bench", help="the stdlib models at equal parameter count on the synthetic tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train HopeLM, TitansLM, DeltaNetLM and TransformerLM at equal parameter "
        "count (widths\nnearest TransformerLM's at --dim) with equal steps, batch and seed on "
        "each task;\nwrite OUT/results.md (a table per task), OUT/results.json, OUT/TASK.png "
        "and every\nrun's nestc train files under OUT/TASK/MODEL/.",
        epilog="example:\n  nestc bench --models TransformerLM DeltaNetLM --tasks mqar "
        "s-niah-1 --steps 300 \\\n      -k mqar.seq_len=128 --lengths 64 128 256 --out "
        "runs/bench")
    b.add_argument("--models", nargs="+", metavar="MODEL", help="default: TransformerLM "
                   "DeltaNetLM TitansLM HopeLM")
    b.add_argument("--tasks", nargs="+", metavar="TASK", help="default: mqar s-niah-1 "
                   "continual charlm (CPU-sized: 64-token sequences)")
    b.add_argument("--steps", type=int, help="optimizer steps of every run (default 300)")
    b.add_argument("--batch", type=int, help="sequences per step (default 16)")
    b.add_argument("--minutes", type=float, help="cap each run's wall clock: it stops at the "
                   "step that passes it")
    b.add_argument("--dim", type=int, help="TransformerLM's width, which sets the parameter "
                   "count (default 64)")
    b.add_argument("--depth", type=int, help="layers of every model (default 2)")
    b.add_argument("--lengths", type=int, nargs="+", metavar="T", help="context lengths the "
                   "needle tasks are evaluated at (default: their seq_len times 1, 2, 4)")
    b.add_argument("-k", "--knob", action="append", default=[], metavar="TASK.NAME=VALUE",
                   help="a task knob such as mqar.seq_len=256 (repeatable)")
    b.add_argument("-p", "--param", action="append", default=[], metavar="MODEL.NAME=VALUE",
                   help="a hyperparameter of one model, such as HopeLM.heads=1, over --depth "
                   "and the 4 heads; not its width (repeatable)")
    b.add_argument("--out", metavar="DIR", help="output directory (default runs/bench)")
    b.add_argument("--seed", type=int, default=0, help="weights and data of every run "
                   "(default 0)")
    b.add_argument("--quick", action="store_true", help="a tiny smoke configuration: tiny "
                   "widths, a few steps, short sequences")
    b.add_argument("--lr", type=float, default=None, help="peak learning rate of every run "
                   "(default: the specs' AdamW, 4e-4)")
    b.add_argument("--warmup", type=int, default=0, help="steps of linear warmup (default 0)")
    b.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup (default constant)")
    b.add_argument("--eval-every", type=int, default=None, metavar="N", help="evaluate every "
                   "N steps (default: a tenth of the steps)")
    b.add_argument("--eval-batches", type=int, default=None, metavar="N",
                   help="eval batches per phase and per length (default 4)")
    _where_to_run(b, "the models'")
    b.add_argument("--update-docs", action="store_true", help="also copy results.md to the "
                   "checkout's docs/results.md")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.set_defaults(run=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # (SVG, explain's · under LC_ALL=C: exit 2)
        if isinstance(stream, io.TextIOWrapper) and stream.encoding.lower().replace("-", "") \
                != "utf8":
            stream.reconfigure(encoding="utf-8")
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # bench records its command
    if args.version:
        from nestc import __version__

        print(f"nestc {__version__}")
        return 0
    if not getattr(args, "run", None):
        parser().print_help()
        return 0
    try:
        return int(args.run(args))
    except NestError as err:
        if DEBUG:
            raise
        print(err, file=sys.stderr)
        return 1
    except StepDivisionError as err:  # the spec's arithmetic, at run time
        if DEBUG:
            raise
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `nestc explain ... | head` closed our stdout: not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a file to read or write: a directory, a missing folder, ...
        if DEBUG:
            raise
        print(f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}",
              file=sys.stderr)
        return 1
    except RecursionError:
        if DEBUG:
            raise
        print(f"error: {TOO_DEEP}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a compiler bug must still not dump a traceback
        if DEBUG:
            raise
        print(f"nestc: internal error: {type(err).__name__}: {err}\n"
              "  this is a bug in nestc; rerun with NESTC_DEBUG=1 for the traceback",
              file=sys.stderr)
        return 2


def script() -> None:
    """The `nestc` command: main's exit status. A process of a torchrun launch leaves without
    tearing the interpreter down (its files are closed by then): a process group's threads
    made that abort ("terminate called without an active exception") now and then on a
    loaded machine, after training had finished and the group was destroyed."""
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    script()
