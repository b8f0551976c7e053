"""`nestc bench`: the stdlib language models at equal parameter count and equal budget on the
synthetic tasks, into a results table and plots.

    nestc bench --models TransformerLM DeltaNetLM --tasks mqar s-niah-1 --steps 300 \\
        -k mqar.seq_len=128 --out runs/bench

Every run is nestc train's loop (`nestc.train.Run`) with the same steps, batch, learning rate
(the spec's AdamW unless --lr), schedule and seed. TransformerLM at --dim sets the parameter
count; every other model takes the width (a multiple of its 4 heads) whose count is nearest it,
all at --depth with the task's vocabulary; `-p MODEL.NAME=VALUE` gives one model a
hyperparameter of its own (its depth or heads, say), with which its width is matched.
--minutes caps each run's wall clock: the run is evaluated and stops at the step that passes
it (its row says how many steps it did). A run whose training or eval loss turns NaN or
infinite stops there ("diverged at step N"), and a model that fails to build or train gets a
row with the message; the other runs go on.

The headline metric of each task:

- mqar (and copy): accuracy at the scored (query) positions, and the fraction of samples with
  every query right;
- s-niah-1/2/3, mk-niah: trained at the task's seq_len, the trained weights (from the run's
  checkpoint) evaluated on fresh samples of each of --lengths (default: seq_len times 1, 2, 4):
  accuracy per value position and whole values right (RULER's metric), by length;
- continual: after the last phase, the accuracy on every phase (retention), their mean, and the
  forgetting: how much the earlier phases lost since the end of their own phase;
- charlm: bits per character on the eval split.

Writes into --out (default runs/bench): `<task>/<model>/` (nestc train's metrics.jsonl,
plots, checkpoint.pt, summary.json), `results.md` (the command line, then a table per task),
`results.json` (the same numbers) and `<task>.png` (the models' eval curves, needs
matplotlib); the results are rewritten after every run, so an interrupted bench keeps what it
finished.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from nestc.errors import NestError

# the stdlib language models, reference first
MODELS = {"TransformerLM": "std/models/transformer.nest",
          "DeltaNetLM": "std/models/deltanet.nest",
          "TitansLM": "std/models/titans.nest",
          "HopeLM": "std/models/hope.nest"}
REFERENCE = "TransformerLM"  # at --dim, it sets the parameter count
HEADS = 4  # every model's heads (HopeLM's blocks default to 4): widths are multiples of it
TASKS = ("mqar", "s-niah-1", "continual", "charlm")
NIAH = ("s-niah-1", "s-niah-2", "s-niah-3", "mk-niah")
LENGTH_FACTORS = (1, 2, 4)  # default --lengths: the training length times these

# a CPU-sized suite: sequences of 64 tokens (the tasks' own defaults are GPU-sized)
KNOBS: dict[str, dict[str, Any]] = {
    "mqar": {"seq_len": 64, "pairs": 8}, "charlm": {"seq_len": 64},
    **{name: {"seq_len": 64} for name in NIAH}}
DEFAULTS: dict[str, Any] = {"steps": 300, "batch": 16, "dim": 64, "depth": 2,
                            "eval_batches": 4, "out": "runs/bench"}
# --quick: every run a few steps of a tiny model on short sequences, to check that all runs
QUICK_KNOBS: dict[str, dict[str, Any]] = {
    "copy": {"half": 4}, "mqar": {"seq_len": 16, "pairs": 4}, "charlm": {"seq_len": 16},
    **{name: {"seq_len": 16, "value_len": 3} for name in NIAH[:3]},
    "mk-niah": {"seq_len": 24, "value_len": 3, "needles": 2},
    "continual": {"phases": 2, "keys": 8, "values": 8, "seq_len": 16}}
QUICK: dict[str, Any] = {"steps": 4, "batch": 4, "dim": 8, "depth": 1, "eval_every": 0,
                         "eval_batches": 1, "out": "runs/bench-quick"}


@dataclass
class Settings:
    """One bench: what every run shares. Defaults are the CLI's (see DEFAULTS and QUICK)."""

    models: list[str] = field(default_factory=lambda: list(MODELS))
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    steps: int = DEFAULTS["steps"]
    batch: int = DEFAULTS["batch"]
    minutes: float | None = None  # the wall-clock cap of each run
    dim: int = DEFAULTS["dim"]  # TransformerLM's width: it sets the parameter count
    depth: int = DEFAULTS["depth"]
    lengths: list[int] | None = None  # None: the needle tasks' seq_len times LENGTH_FACTORS
    knobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> its knobs
    # model -> hyperparameters of its own (over --depth and the heads; not its width)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    out: str = DEFAULTS["out"]
    seed: int = 0
    threads: int | None = None
    lr: float | None = None  # None: the spec's
    warmup: int = 0
    schedule: str = "constant"
    eval_every: int | None = None  # None: a tenth of the steps
    eval_batches: int = DEFAULTS["eval_batches"]
    backend: str | None = None
    device: str = "auto"
    quiet: bool = False


def settings(quick: bool = False, **given: Any) -> Settings:
    """Settings from the given options; an option left out or None takes the default (the
    --quick one with quick); task knobs are the suite's, overridden by the given ones."""
    base = QUICK if quick else DEFAULTS
    options = {k: v for k, v in given.items() if v is not None}
    for name, value in base.items():
        options.setdefault(name, value)
    suite = QUICK_KNOBS if quick else KNOBS
    given_knobs = options.pop("knobs", {})
    tasks = options.get("tasks", list(TASKS))
    knobs = {t: {**suite.get(t, {}), **given_knobs.get(t, {})} for t in tasks}
    for task in given_knobs:
        if task not in tasks:
            raise NestError(f"-k {task}.KNOB=VALUE: task `{task}` is not benched", kind="value",
                            hint=f"the tasks benched are {', '.join(tasks)} (--tasks)")
    for name in ("models", "tasks"):  # each once, in the order given
        if name in options:
            options[name] = list(dict.fromkeys(options[name]))
    return Settings(**options, knobs=knobs)


def split_knobs(pairs: list[str], flag: str = "-k") -> dict[str, list[str]]:
    """`-k mqar.seq_len=128` -> {"mqar": ["seq_len=128"]}: the task, then NAME=VALUE for it;
    with flag "-p", `-p HopeLM.heads=1`: the model, then one of its hyperparameters."""
    what, example = ("TASK.KNOB", "mqar.seq_len=128") if flag == "-k" else \
        ("MODEL.NAME", "HopeLM.heads=1")
    out: dict[str, list[str]] = {}
    for pair in pairs:
        task, dot, rest = pair.partition(".")
        if not dot or "=" not in rest or "=" in task:
            raise NestError(f"{flag} takes {what}=VALUE, got `{pair}`", kind="value",
                            hint=f"e.g. {flag} {example}")
        out.setdefault(task, []).append(rest)
    return out


def validate(s: Settings) -> dict[str, Any]:
    """NestError for settings no run could use (so a typo fails at once, not as a row per
    model); returns the tasks by name, built with their knobs."""
    from nestc.tasks import make
    from nestc.train import SCHEDULES, check_lr, check_seed

    for model in s.models:
        if model not in MODELS:
            raise NestError(f"unknown model `{model}`", kind="value",
                            hint=f"the models are {', '.join(MODELS)}")
    if not s.models or not s.tasks:
        raise NestError("nothing to bench: give at least one model and one task", kind="value")
    least = {"steps": 1, "batch": 1, "depth": 1, "warmup": 0, "eval_every": 0,
             "eval_batches": 1, "threads": 1}
    for name, low in least.items():
        value = getattr(s, name)
        if value is not None and value < low:
            raise NestError(f"--{name.replace('_', '-')} must be at least {low}, got {value}",
                            kind="value")
    check_seed(s.seed)
    check_lr(s.lr)
    if s.dim < HEADS or s.dim % HEADS:
        raise NestError(f"--dim must be a multiple of the {HEADS} heads, got {s.dim}",
                        kind="value")
    if s.minutes is not None and not s.minutes > 0:
        raise NestError(f"--minutes must be above 0, got {s.minutes}", kind="value")
    if s.schedule not in SCHEDULES:
        raise NestError(f"unknown schedule `{s.schedule}`", kind="value",
                        hint=f"schedules are {', '.join(SCHEDULES)}")
    if s.lengths is not None and any(n < 1 for n in s.lengths):
        raise NestError(f"--lengths must be at least 1, got {min(s.lengths)}", kind="value")
    for model, given in s.params.items():
        check_params(model, given, s.models)
    if s.backend == "triton":  # before any run, not as a row per model
        import torch

        from nestc.train import check_triton

        auto = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(auto if s.device == "auto" else s.device)
        except RuntimeError as err:
            raise NestError(f"--device {s.device}: {err}", kind="value") from None
        check_triton(device)
    tasks = {}
    for name in s.tasks:
        tasks[name] = make(name, **s.knobs[name])
        for length in lengths_of(s, tasks[name]):
            make(name, **{**s.knobs[name], "seq_len": length})  # each length must fit
    return tasks


def lengths_of(s: Settings, task: Any) -> list[int]:
    """The lengths a needle task is evaluated at; none for the others."""
    if task.name not in NIAH:
        return []
    return list(s.lengths) if s.lengths else [task.seq_len * f for f in LENGTH_FACTORS]


# --- widths at equal parameter count -------------------------------------------------------


def check_params(model: str, given: dict[str, Any], models: list[str]) -> None:
    """NestError unless `-p MODEL.NAME=VALUE` names a benched model and one of its
    hyperparameters other than those the bench sets (vocab, dim)."""
    import nestc

    if model not in models:
        raise NestError(f"-p {model}.NAME=VALUE: model `{model}` is not benched", kind="value",
                        hint=f"the models benched are {', '.join(models)} (--models)")
    hypers = nestc.load(MODELS[model]).decl(model).hypers
    for name in given:
        if name in ("vocab", "dim"):
            why = "to the task's vocabulary" if name == "vocab" else "to the width whose " \
                f"parameter count is nearest {REFERENCE}'s at --dim"
            raise NestError(f"-p {model}.{name}: the bench sets every model's {name} {why}",
                            kind="value")
        if name not in hypers:
            raise NestError(f"-p {model}.{name}: `{model}` has no hyperparameter `{name}`",
                            kind="value", hint=f"its hyperparameters are {', '.join(hypers)}")


def hyper_of(program: Any, model: str, vocab: int, dim: int, depth: int,
             given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's hyperparameters in a run: the bench's, then the model's own (-p)."""
    hyper = {"vocab": vocab, "dim": dim, "depth": depth}
    if "heads" in program.decl(model).hypers:
        hyper["heads"] = HEADS
    return {**hyper, **(given or {})}


def count_params(program: Any, model: str, hyper: dict[str, Any], backend: str | None) -> int:
    options = {} if backend is None else {"backend": backend}
    return sum(p.numel() for p in program.build(model, **options, **hyper).parameters())


def matched_width(program: Any, model: str, target: int, vocab: int, depth: int,
                  backend: str | None, given: dict[str, Any] | None = None
                  ) -> tuple[int, int]:
    """(width, parameter count) of `model` at the multiple of HEADS (and of its own heads,
    if given) whose count is nearest `target`; counts grow with the width."""
    best: tuple[int, int] | None = None
    heads = (given or {}).get("heads", HEADS)
    step = math.lcm(HEADS, heads) if isinstance(heads, int) and heads > 0 else HEADS
    dim = step
    while True:
        hyper = hyper_of(program, model, vocab, dim, depth, given)
        count = count_params(program, model, hyper, backend)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (dim, count)
        if count >= target:
            return best
        dim += step


# --- one run -------------------------------------------------------------------------------


class DivergenceError(Exception):
    """The training loss (or the eval loss) turned NaN or infinite at `step`."""

    def __init__(self, step: int, where: str = "") -> None:
        super().__init__(f"diverged at step {step}{where}")
        self.step = step


class DeadlineError(Exception):
    """The run passed its wall-clock cap at `step` (evaluated there)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by --minutes at step {step}")
        self.step = step


def bench_run_class() -> type:
    """nestc train's Run, stopping at a NaN loss and at a deadline (time.perf_counter())."""
    from nestc.train import Run

    class BenchRun(Run):
        deadline: float | None = None

        def log(self, record: dict[str, Any]) -> None:
            if not math.isfinite(record["loss"]):
                super().log(record)
                raise DivergenceError(record["step"])
            if not math.isfinite(record.get("eval_loss", 0.0)):
                super().log(record)
                raise DivergenceError(record["step"], " (eval loss)")
            late = self.deadline is not None and time.perf_counter() >= self.deadline \
                and record["step"] < self.config.steps
            if late and "eval_loss" not in record:
                record.update(self.evaluate(record["phase"]))
            super().log(record)
            if late:
                raise DeadlineError(record["step"])

    return BenchRun


def train_one(s: Settings, task: str, model: str, hyper: dict[str, Any], out: Path
              ) -> tuple[dict[str, Any], str | None]:
    """Train one model on one task; (nestc train's summary, a note or None). Raises DivergenceError
    and whatever the build or the run raises."""
    from nestc.train import TrainConfig

    config = TrainConfig(MODELS[model], model, task, hyper=hyper, knobs=s.knobs[task],
                         steps=s.steps, batch=s.batch, lr=s.lr, warmup=s.warmup,
                         schedule=s.schedule, seed=s.seed, eval_every=s.eval_every,
                         eval_batches=s.eval_batches, out=str(out), backend=s.backend,
                         device=s.device, threads=s.threads, quiet=s.quiet)
    run = bench_run_class()(config)
    if s.minutes is not None:
        run.deadline = time.perf_counter() + 60 * s.minutes
    try:
        return run.train(), None
    except DeadlineError as stop:
        run.save(stop.step)
        return run.finish(stop.step), str(stop)


def evaluate_lengths(run_dir: str | Path, lengths: list[int], batch: int, batches: int,
                     seed: int = 0, device: str = "auto") -> dict[str, float]:
    """The trained weights of a nestc train run (RUN_DIR/checkpoint.pt, rebuilt from its
    configuration) on fresh eval samples of its task at each length (the other knobs the
    run's): {"acc@L": accuracy per scored position, "exact@L": samples with every scored
    position right (RULER's metric)}. The models are length-agnostic: nothing is retrained."""
    import torch

    import nestc
    from nestc.tasks import IGNORE, make, sequence_correct
    from nestc.train import CHECKPOINT, EVAL_SEED, EVAL_SPLIT, score

    data = torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=True)
    c = data["config"]
    where = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                         if device == "auto" else device)
    backend = {} if c["backend"] is None else {"backend": c["backend"]}
    program, hyper = nestc.load(c["spec"]), dict(c["hyper"])
    # checkpoints of format 1 left out the vocab nestc train took from the task
    if "vocab" in program.decl(c["model"]).hypers and "vocab" not in hyper:
        hyper["vocab"] = make(c["task"], **c["knobs"]).vocab
    model = program.build(c["model"], **backend, **hyper).to(where)
    model.load_state_dict(data["model"])
    model.eval()
    out = {}
    for length in lengths:
        task = make(c["task"], **{**c["knobs"], "seq_len": length})
        # apart from the training data and from the run's own eval set
        held_out = torch.Generator().manual_seed(seed + EVAL_SEED + length)
        right = scored = exact = samples = 0
        for _ in range(batches):
            tokens, targets = task.sample(batch, held_out, split=EVAL_SPLIT)
            with torch.no_grad():
                _, pred, _ = score(model, tokens.to(where), targets.to(where))
            pred, mask = pred.cpu(), targets != IGNORE  # (B, T)
            right += int(((pred == targets) & mask).sum())
            scored += int(mask.sum())
            exact += int(sequence_correct(pred, targets).sum())
            samples += len(pred)
        out[f"acc@{length}"] = right / max(scored, 1)
        out[f"exact@{length}"] = exact / max(samples, 1)
    return out


def headline(task: Any, metrics: list[dict[str, Any]]) -> dict[str, float | None]:
    """The task's numbers from a run's metrics (nestc train's metrics.jsonl lines): the last
    eval's loss, accuracy and exact; bpc for character tasks; for several phases the last
    eval's accuracy on each, their mean, and the forgetting (the mean over the earlier phases
    of their accuracy at the end of their own phase minus the last)."""
    evals = [m for m in metrics if "eval_loss" in m]
    last = evals[-1]
    out: dict[str, float | None] = {"eval_loss": last["eval_loss"], "acc": last["eval_acc"],
                                    "exact": last["eval_seq_acc"]}
    if task.bits:
        out["bpc"] = last["bpc"]
    if task.phases > 1:
        final = [last.get(f"acc/phase{p}") for p in range(task.phases)]
        # the eval at the last step of phase p, the last eval that reports phase p
        learned = [next((m[f"acc/phase{p}"] for m in reversed(evals) if m["phase"] == p),
                        None) for p in range(task.phases)]
        for p in range(task.phases):
            out[f"acc/phase{p}"] = final[p]
            out[f"learned/phase{p}"] = learned[p]
        done = [a for a in final if a is not None]
        out["mean"] = sum(done) / len(done)
        lost = [b - a for a, b in zip(final[:-1], learned[:-1]) if a is not None and
                b is not None]
        out["forgetting"] = sum(lost) / len(lost) if lost and final[-1] is not None else None
    return out


def throughput(metrics: list[dict[str, Any]], tokens_per_step: int) -> float | None:
    """Training tokens/s over the run: all tokens over the summed step times (eval apart)."""
    seconds = sum(tokens_per_step / m["tokens_per_s"] for m in metrics if m["tokens_per_s"])
    return round(len(metrics) * tokens_per_step / seconds, 1) if seconds else None


def bench_task(s: Settings, task: Any, say: Any
               ) -> tuple[int, list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Every model on one task: (the reference's parameter count, a row per model, each
    trained model's eval records)."""
    import nestc

    lengths = lengths_of(s, task)
    reference = nestc.load(MODELS[REFERENCE])
    try:
        target = count_params(reference, REFERENCE,
                              hyper_of(reference, REFERENCE, task.vocab, s.dim, s.depth),
                              s.backend)
    except ValueError as err:  # an unknown back end
        raise NestError(f"--backend: {err}", kind="value") from None
    rows, curves = [], {}
    for model in s.models:
        row: dict[str, Any] = {"model": model, "dim": None, "params": None, "steps": None,
                               "wall_s": None, "tokens_per_s": None, "metrics": {},
                               "note": None, "error": None}
        start = time.perf_counter()
        out = Path(s.out) / task.name / model
        try:
            program = nestc.load(MODELS[model])
            given = s.params.get(model)
            if model == REFERENCE and not given:
                row["dim"], row["params"] = s.dim, target
            else:
                row["dim"], row["params"] = matched_width(program, model, target, task.vocab,
                                                          s.depth, s.backend, given)
            hyper = hyper_of(program, model, task.vocab, row["dim"], s.depth, given)
            summary, row["note"] = train_one(s, task.name, model, hyper, out)
            metrics = summary["metrics"]
            row["steps"] = summary["steps"]
            row["tokens_per_s"] = throughput(metrics, s.batch * task.seq_len)
            row["metrics"] = headline(task, metrics)
            if lengths:
                row["metrics"].update(evaluate_lengths(out, lengths, s.batch, s.eval_batches,
                                                       s.seed, s.device))
            curves[model] = [m for m in metrics if "eval_loss" in m]
        except DivergenceError as err:
            row["steps"], row["error"] = err.step, str(err)
        except NestError as err:
            span = err.span
            where = f" ({span.file}:{span.line}:{span.col})" if span is not None else ""
            row["error"] = f"{err.message}{where}"
        except Exception as err:  # noqa: BLE001 - one model's failure is its row, not the bench's
            row["error"] = f"{type(err).__name__}: {err}"
        row["wall_s"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        say(describe(task, row))
    return target, rows, curves


# --- the results -----------------------------------------------------------------------------


def columns(task: Any, lengths: list[int]) -> list[tuple[str, str, str]]:
    """The headline columns of a task's table: (header, metric, format)."""
    if task.bits:
        return [("bpc", "bpc", "num"), ("acc (%)", "acc", "pct")]
    if lengths:
        return [*((f"acc@{n} (%)", f"acc@{n}", "pct") for n in lengths),
                *((f"exact@{n} (%)", f"exact@{n}", "pct") for n in lengths)]
    if task.phases > 1:
        return [*((f"phase {p} (%)", f"acc/phase{p}", "pct") for p in range(task.phases)),
                ("mean (%)", "mean", "pct"), ("forgetting (pts)", "forgetting", "pct")]
    return [("acc (%)", "acc", "pct"), ("exact (%)", "exact", "pct"),
            ("eval loss", "eval_loss", "num")]


EXPLAIN = {
    "bpc": "bits per character on the eval split (lower is better), and the accuracy of the "
           "next character",
    "niah": "trained at seq_len {seq_len}, evaluated at each length on fresh samples: acc, "
            "the accuracy per value position; exact, the samples whose whole value is right "
            "(RULER's metric)",
    "phases": "accuracy on each phase after the last one (retention), their mean, and the "
              "forgetting: the earlier phases' accuracy at the end of their own phase minus "
              "the last, in points",
    "acc": "acc, the accuracy at the scored positions; exact, the samples with every scored "
           "position right",
}


def explain_task(task: Any, lengths: list[int]) -> str:
    if task.bits:
        return EXPLAIN["bpc"]
    if lengths:
        return EXPLAIN["niah"].format(seq_len=task.seq_len)
    return EXPLAIN["phases"] if task.phases > 1 else EXPLAIN["acc"]


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" if fmt == "pct" else f"{value:.3f}"


def describe(task: Any, row: dict[str, Any]) -> str:
    """One line of progress for a finished run."""
    head = f"{task.name} {row['model']}"
    if row["params"] is not None:
        head += f" (dim {row['dim']}, {row['params']:,} params)"
    if row["error"]:
        return f"{head}: {row['error']}"
    m = row["metrics"]
    score = f"{m['bpc']:.3f} bpc" if "bpc" in m else f"acc {100 * m['acc']:.1f}%"
    note = f" ({row['note']})" if row["note"] else ""
    return f"{head}: {row['steps']} steps in {row['wall_s']:.1f} s, {score}{note}"


def table(task: Any, lengths: list[int], rows: list[dict[str, Any]]) -> list[str]:
    heads = columns(task, lengths)
    lines = ["| model | dim | params | steps | wall (s) | tokens/s | "
             + " | ".join(h for h, _, _ in heads) + " | note |",
             "| --- | " + "---: | " * (5 + len(heads)) + "--- |"]
    for r in rows:
        common = [r["model"], _or_dash(r["dim"]),
                  "—" if r["params"] is None else f"{r['params']:,}", _or_dash(r["steps"]),
                  f"{r['wall_s']:.1f}",
                  "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"]
        metrics = [cell(r["metrics"].get(key), fmt) for _, key, fmt in heads]
        note = (r["error"] or r["note"] or "").replace("|", "\\|").replace("\n", " ")
        lines.append("| " + " | ".join(common + metrics + [note]) + " |")
    return lines


def _or_dash(value: Any) -> str:
    return "—" if value is None else str(value)


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    budget = f"{s['steps']} steps" + (f" (at most {s['minutes']:g} min a run)"
                                      if s["minutes"] else "")
    lr = "the spec's AdamW lr 4e-4" if s["lr"] is None else f"lr {s['lr']:g}"
    lines = ["# nestc bench", "", "```", results["command"], "```", "",
             f"{results['date']}, {results['machine']}, torch {results['torch']}, nestc "
             f"{results['commit']}.", "",
             f"Every model: {budget} of {s['batch']} sequences, {lr}, warmup {s['warmup']}, "
             f"{s['schedule']} schedule, seed {s['seed']}; depth {s['depth']}, {HEADS} heads"
             + "".join(f"; {model}: " + ", ".join(f"{k} {v}" for k, v in given.items())
                       for model, given in s["params"].items()) +
             f"; widths with parameter counts nearest {REFERENCE}'s at dim {s['dim']} (per "
             "task: the vocabularies differ). tokens/s: training steps only."]
    for name, t in results["tasks"].items():
        counts = [r["params"] for r in t["rows"] if r["params"] is not None]
        gap = "" if not counts else f" Parameter counts within " \
            f"{max(abs(n / t['reference_params'] - 1) for n in counts):.1%} of {REFERENCE}'s " \
            f"({t['reference_params']:,})."
        lines += ["", f"## {name}", "", f"`{t['task']}`: {t['explain']}.{gap}", ""]
        lines += t["table"]
    return "\n".join(lines) + "\n"


def plot_task(task: Any, lengths: list[int], rows: list[dict[str, Any]],
              curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """PATH: the models' eval loss (bpc for characters) by step, and their eval accuracy by
    step (by length for needle tasks); nothing without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.get(r["model"]) for r in rows):
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    loss = "bpc" if task.bits else "eval_loss"
    for r in rows:
        evals = curves.get(r["model"])
        if not evals:
            continue
        label = f"{r['model']} ({r['params']:,})"
        left.plot([m["step"] for m in evals], [m[loss] for m in evals], marker="o", ms=3,
                  label=label)
        if lengths:
            right.plot(lengths, [r["metrics"][f"acc@{n}"] for n in lengths], marker="o",
                       label=label)
        else:
            right.plot([m["step"] for m in evals], [m["eval_acc"] for m in evals], marker="o",
                       ms=3, label=label)
    left.set_xlabel("step")
    left.set_ylabel("eval bits per character" if task.bits else "eval loss (nats)")
    if lengths:
        right.set_xscale("log", base=2)
        right.set_xticks(lengths, [str(n) for n in lengths])
        right.set_xlabel(f"context length (trained at {task.seq_len})")
    else:
        right.set_xlabel("step")
    right.set_ylabel("eval accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(task.describe(), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine(device: str) -> str:
    import torch

    if not device.startswith("cpu") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU ({platform.machine()}, {threads} thread{'s' * (threads != 1)})"


def commit() -> str:
    """The source checkout's commit, `+` if it has uncommitted changes; "unknown" outside one."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def bench(command: str | None = None, update_docs: bool = False, quick: bool = False,
          **options: Any) -> dict[str, Any]:
    """Run the bench; options are Settings' fields (None: the default, see `settings`).
    Writes OUT/results.md, OUT/results.json and OUT/<task>.png; returns results.json's
    content. `command` is the command line recorded at the top of results.md; update_docs
    copies results.md to the checkout's docs/results.md.

    Example:
        >>> r = bench(quick=True, models=["TransformerLM"], tasks=["copy"], quiet=True,
        ...           out="/tmp/nestc-bench-doctest")
        >>> r["tasks"]["copy"]["rows"][0]["steps"]
        4
    """
    import torch

    s = settings(quick, **options)
    tasks = validate(s)
    if s.threads:
        torch.set_num_threads(s.threads)
    docs = Path(__file__).resolve().parent.parent / "docs"
    if update_docs and not docs.is_dir():
        raise NestError("--update-docs needs a source checkout with docs/", kind="value")
    if update_docs and quick:
        raise NestError("--update-docs takes a real run's numbers, not --quick's",
                        kind="value")
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda text: None) if s.quiet else (lambda text: print(text, flush=True))
    results: dict[str, Any] = {
        "command": command or "nestc.bench.bench(" + ", ".join(
            f"{k}={v!r}" for k, v in {"quick": quick, **options}.items()) + ")",
        "date": date.today().isoformat(), "machine": machine(s.device),
        "torch": torch.__version__.split("+")[0], "commit": commit(),
        "settings": asdict(s), "tasks": {}}
    for name, task in tasks.items():
        lengths = lengths_of(s, task)
        target, rows, curves = bench_task(s, task, say)
        results["tasks"][name] = {"task": task.describe(), "explain": explain_task(task, lengths),
                                  "lengths": lengths, "reference_params": target, "rows": rows,
                                  "table": table(task, lengths, rows)}
        plot_task(task, lengths, rows, curves, out / f"{name}.png")
        write(results, out)
    if update_docs:
        shutil.copyfile(out / "results.md", docs / "results.md")
        say(f"copied {out / 'results.md'} to {docs / 'results.md'}")
    say(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return results


def write(results: dict[str, Any], out: Path) -> None:
    (out / "results.md").write_text(markdown(results))
    numbers = {**results, "tasks": {name: {k: v for k, v in t.items() if k != "table"}
                                    for name, t in results["tasks"].items()}}
    (out / "results.json").write_text(json.dumps(_finite(numbers), indent=2) + "\n")


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
