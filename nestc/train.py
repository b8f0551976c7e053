"""`nestc train`: train a model declaration on a synthetic task with its own outer level.

The model is compiled from its spec (`Program.build`); the outer level is the one the spec
declares in the model's `train` clause: its `rule` names an optimizer declaration (its own or
an imported one), built with the rule's arguments, and its objective is the cross-entropy of
the logits against the task's targets, the mean over the scored positions. Memories that learn
from the task loss in context (CMS levels) learn from the input alone: the next token, as the
spec's `next(tokens)` says, never the task's labels, which for recall and needle tasks are
answers the input does not hold (evaluation would otherwise learn from them).

    nestc train std/models/transformer.nest TransformerLM --task copy -p dim=64 -p depth=2 \\
        -k half=16 --steps 500 --batch 32 --lr 1e-3 --warmup 50 --schedule cosine

writes into `--out` (default `runs/<model>-<task>`):

- `metrics.jsonl`: one line per step (step, phase, loss, lr, tokens_per_s, train_s: seconds
  spent in training steps so far, evaluation and checkpoints left out); at eval steps also
  eval_loss, eval_acc (per scored position) and eval_seq_acc (whole samples right, RULER's
  metric) over every phase trained so far; `acc/<group>` for the task's groups of positions;
  per phase `loss/phaseK`, `acc/phaseK`, ... (tasks with several phases); `bpc` for character
  tasks (`task.bits`);
- `loss.png` and `accuracy.png`: the curves, drawn at every checkpoint (needs matplotlib);
- `checkpoint.pt`: weights, optimizer and schedule state, the step, every random state (the
  data generator's and torch's), the metrics so far, and the in-context memory state of the
  last batch (the model's `return_state=True` state: memories' fast weights; rank 0's rows
  under torchrun); `--resume`
  continues from it and gives the losses an uninterrupted run gives, bit for bit on CPU;
- `summary.json`: the configuration and the final numbers.

Both record the hyperparameters the model was built with (the vocab taken from the task too),
so they rebuild it. A rule whose optimizer has no `lr` trains at its own rates, unscheduled
(--lr, --warmup and --schedule are errors then).

Training is seeded: one seed fixes the initial weights and the training data; the fixed eval
set comes from a generator seeded apart from it. A task with several phases (continual
learning) is trained phase after phase, the steps split evenly, and every eval measures every
phase so far, so what later phases make the model forget is visible.

Launched by `torchrun` (WORLD_SIZE > 1), training is data parallel (DDP): every rank draws the
same global batch and trains on its share of the rows; each rank's summed loss is divided by
the global count of scored positions and multiplied by the number of ranks, so the gradient
DDP averages is the single-process full-batch gradient. Only rank 0 writes files and shows
progress. A rank whose set-up fails, or rank 0 failing to write, stops every rank with an error
(at the end of the set-up or of the step) rather than leave the others waiting for it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nestc import ast
from nestc.errors import NestError
from nestc.module import detached
from nestc.resolve import STD_PREFIX
from nestc.tasks import IGNORE, Task, sequence_correct

SCHEDULES = ("constant", "cosine")
CHECKPOINT = "checkpoint.pt"
# 2: the configuration and identity hold the hyperparameters the model was built with (1: those
# given, without the vocab taken from the task)
CHECKPOINT_FORMAT = 2
# what resume reads from a checkpoint
CHECKPOINT_KEYS = ("model", "optimizer", "schedule", "rng", "memory_state", "metrics", "step",
                   "identity", "format")
METRICS = "metrics.jsonl"
EVAL_SEED = 1_000_003  # the eval set's generator: seed + this, never the training data's
EVAL_SPLIT = "eval"
COSINE_FLOOR = 0.1  # cosine decays the learning rate to this fraction of its peak
# torch seeds take 64 bits unsigned; half of them leaves room for the offsets added to a seed
# (EVAL_SEED, bench's lengths)
MAX_SEED = 2**63 - 1


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults are the CLI's."""

    spec: str
    model: str
    task: str
    hyper: dict[str, Any] = field(default_factory=dict)  # the model's hyperparameters
    knobs: dict[str, Any] = field(default_factory=dict)  # the task's knobs
    steps: int = 1000
    batch: int = 16  # the global batch, split over the ranks under torchrun
    lr: float | None = None  # None: the rule's
    warmup: int = 0  # steps of linear warmup
    schedule: str = "constant"
    seed: int = 0
    eval_every: int | None = None  # None: a tenth of the steps; 0: only at phase ends
    eval_batches: int = 4  # per phase
    out: str | None = None  # None: runs/<model>-<task>
    checkpoint_every: int = 0  # 0: only at the end
    resume: str | bool = False  # True: OUT/checkpoint.pt
    stop_after: int | None = None  # stop after this many steps in all (the schedule spans steps)
    backend: str | None = None  # the model's back end; None: the default
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False


def train(spec: str, model: str, task: str | Task, **options: Any) -> dict[str, Any]:
    """Train `model` from the spec file `spec` on `task` (a name from nestc.tasks, or a Task);
    options are TrainConfig's fields. Returns the summary (also written to summary.json),
    whose "metrics" are the lines of metrics.jsonl.

    Example:
        >>> s = train("std/models/transformer.nest", "TransformerLM", "copy",
        ...           hyper={"dim": 16, "depth": 1}, steps=20, batch=8, quiet=True)
        >>> s["steps"]
        20
    """
    name = task.name if isinstance(task, Task) else task
    config = TrainConfig(spec, model, name, **options)
    return Run(config, task if isinstance(task, Task) else None).train()


# --- the outer level -----------------------------------------------------------------------


@dataclass
class Outer:
    """The outer level a model declares: its optimizer declaration and the rule's arguments."""

    optimizer: Any  # the optimizer's Checked declaration
    kwargs: dict[str, Any]
    span: Any  # the rule, for errors


def outer_level(program: Any, checked: Any, hyper: dict[str, Any]) -> Outer:
    """The `train` clause of a model: its rule resolved to an optimizer declaration (through the
    model's scope, imports included) with the rule's arguments evaluated over the model's
    hyperparameters; NestError at the clause when it is not one nestc train can run."""
    from nestc.check import next_token_objective, qualified_name
    from nestc.hyper import UNKNOWN, const_eval

    decl = checked.decl
    level = next((s for s in decl.body if isinstance(s, ast.StmtTrain)), None)
    if level is None:
        raise NestError(f"{decl.kind} `{decl.name}` has no `train` level", decl.name_span,
                        kind="value", hint="nestc train runs a model: add `train every step "
                        "{ objective cross_entropy(logits, next(tokens)); rule AdamW(...) }`")
    env = checked.bind(hyper)
    freq = level.frequency
    every = 1 if freq.every is None else const_eval(freq.every, env)
    if freq.unit != "step" or every != 1:
        raise NestError("nestc train runs `train every step`: one outer update per batch",
                        freq.span, kind="value", hint="for a larger effective batch, raise "
                        "--batch")
    clauses = {c.kind: c for c in level.body if isinstance(c, ast.Clause)}
    # the checker saw to both clauses
    objective, rule = clauses["objective"], clauses["rule"]
    if not next_token_objective(decl, objective.value):
        raise NestError("nestc train runs the objective cross_entropy(<logits>, next(<tokens>)), "
                        "with the model's output and input", objective.span, kind="value",
                        hint="the task supplies the targets: the next tokens of the input")
    call = rule.value
    assert not isinstance(call, str), rule  # a rule clause holds an expression
    func = call.func if isinstance(call, ast.ExprCall) else call
    name = qualified_name(func)
    target = checked.scope.get(name) if name is not None else None
    if target is None or target.kind != "optimizer":
        what = f"`{name}`" if name is not None else "this rule"
        raise NestError(f"the train level's rule {what} is not an optimizer declaration",
                        func.span, kind="value", hint="nestc train builds the outer level from "
                        "an optimizer, e.g. from \"std/optim/adam.nest\" import AdamW")
    optimizer = program.lookup(target)
    kwargs: dict[str, Any] = {}
    if isinstance(call, ast.ExprCall):
        names = list(optimizer.hypers)
        if len(call.args) > len(names):
            raise NestError(f"optimizer `{target.name}` takes {len(names)} hyperparameters",
                            call.span, kind="value")
        pairs = [(names[i], a) for i, a in enumerate(call.args)]
        pairs += [(k.name, k.value) for k in call.kwargs]
        for key, expr in pairs:
            value = const_eval(expr, env)
            if value is UNKNOWN:
                raise NestError("the outer level's hyperparameters must be constants", expr.span,
                                kind="value", hint="numbers, or arithmetic on the model's "
                                "hyperparameters")
            kwargs[key] = value
    optimizer.bind(kwargs, call=call.span)  # (its requires, reported at the rule)
    return Outer(optimizer, kwargs, func.span)


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise NestError(f"--seed must be from 0 to {MAX_SEED}, got {seed}", kind="value")


def check_lr(lr: float | None) -> None:
    if lr is not None and not 0 <= lr < float("inf"):  # (inf trained to NaN, exit 0)
        raise NestError(f"--lr must be a finite number of at least 0, got {lr}", kind="value")


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of 0-based step `step` as a fraction of the peak: linear warmup over
    `warmup` steps, then constant or a cosine down to COSINE_FLOOR at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


# --- data parallel -------------------------------------------------------------------------


class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self.started = False
        self.failure: Exception | None = None  # this rank's, kept until agree()
        self.together = False  # every rank raised at the same agree()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch: contiguous, as even as they can be."""
        base, extra = divmod(batch, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Work that may fail on some ranks only (rank 0's files, the set-up): under torchrun
        its error is kept until agree(), so the other ranks do not wait for this one in a
        collective it never joins; raised at once in a single process."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except Exception as err:  # noqa: BLE001 - raised on every rank by agree()
            self.failure = self.failure or err

    def agree(self) -> None:
        """Every rank raises if any rank failed since the last agree(): its own error where
        it failed, a NestError naming the first rank that failed elsewhere."""
        if self.world == 1:
            return
        first = torch.tensor([self.rank if self.failure else self.world], device=self.device)
        torch.distributed.all_reduce(first, torch.distributed.ReduceOp.MIN)
        if int(first) == self.world:
            return
        self.together = True
        if self.failure is not None:
            raise self.failure
        raise NestError(f"rank {int(first)} of this torchrun launch failed (its error says "
                        f"why); rank {self.rank} stops with it", kind="value")

    def close(self, wait: bool) -> None:
        """Leave the process group; `wait`: at a barrier first, where every rank is at the
        same point (after an error of this rank alone, the others may be in a collective it
        never joins: they stop when its process exits)."""
        if not self.started:
            return
        if wait:
            # every rank reaches the end before any tears gloo down (a rank that exited while
            # another still used the group aborted with "terminate called without an active
            # exception" once, in a loaded test run)
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# --- one run -------------------------------------------------------------------------------


class Objective(nn.Module):
    """The outer level's objective on a batch, as a module so DDP can wrap it: the summed
    cross-entropy over the scored positions times `scale`, and the in-context state after the
    batch (detached)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, scale: float = 1.0
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, _, state = score(self.model, tokens, targets)
        return loss * scale, state


def score(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(the cross-entropy summed over the scored positions, the argmax at every position
    [B, T], the in-context state after the batch, detached). The model's in-context levels
    learn from the input only (its next tokens), never from `targets`."""
    logits, state = model(tokens, return_state=True)  # (B, T, V)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE, reduction="sum")
    return loss, logits.detach().argmax(-1), detached(state)



def check_triton(device: Any) -> None:
    """NestError unless the triton back end can run on `device`: triton installed, and a CUDA
    device or the interpreter (TRITON_INTERPRET=1)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise NestError("--backend triton: triton is not installed", kind="value",
                        hint="pip install triton (or nestc[triton])")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise NestError(f"--backend triton runs Triton kernels, which need a CUDA device; this "
                        f"run is on {device.type}", kind="value",
                        hint="use --device cuda, or set TRITON_INTERPRET=1 to run the kernels "
                        "on the CPU under the interpreter (slow)")

class Run:
    """One training run: set up by build(), trained by train()."""

    def __init__(self, config: TrainConfig, task: Task | None = None) -> None:
        c = self.config = config
        if c.schedule not in SCHEDULES:
            raise NestError(f"unknown schedule `{c.schedule}`", kind="value",
                            hint=f"schedules are {', '.join(SCHEDULES)}")
        least = {"steps": 1, "batch": 1, "warmup": 0, "eval_every": 0, "eval_batches": 1,
                 "checkpoint_every": 0, "stop_after": 1, "threads": 1}
        for name, low in least.items():
            value = getattr(c, name)
            if value is not None and value < low:
                flag = "--" + name.replace("_", "-")
                raise NestError(f"{flag} must be at least {low}, got {value}", kind="value")
        check_lr(c.lr)
        check_seed(c.seed)
        if c.threads:
            torch.set_num_threads(c.threads)
        try:
            self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                       if c.device == "auto" else c.device)
        except RuntimeError as err:
            raise NestError(f"--device {c.device}: {err}", kind="value") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise NestError(f"--device {c.device}: this torch sees no CUDA device", kind="value")
        if self.device.type not in ("cpu", "cuda"):  # (meta: a raw error at the first .item())
            raise NestError(f"--device {c.device}: nestc train runs on cpu or cuda",
                            kind="value")
        if c.backend == "triton":
            check_triton(self.device)
        if task is None:
            from nestc.tasks import make

            task = make(c.task, **c.knobs)
        self.task = task
        self.out = Path(c.out or f"runs/{c.model}-{c.task}")
        self.eval_every = max(c.steps // 10, 1) if c.eval_every is None else c.eval_every

    # set-up ------------------------------------------------------------------------------

    def build(self) -> None:
        import nestc
        from nestc.runtime import build_optimizer

        c = self.config
        program = nestc.load(c.spec)
        checked = program.decl(c.model)
        if checked.kind != "model":
            raise NestError(f"`{c.model}` is {'an' if checked.kind[0] in 'aeiou' else 'a'} "
                            f"{checked.kind}: nestc train runs a model", checked.decl.name_span,
                            kind="value", hint="a model is a block with a `train` level")
        hyper = dict(c.hyper)
        if "vocab" in checked.hypers and "vocab" not in hyper:
            hyper["vocab"] = self.task.vocab
        self.hyper = hyper  # the hyperparameters the model is built with, as recorded
        outer = outer_level(program, checked, hyper)
        kwargs = dict(outer.kwargs)
        # a rule without `lr` steps at rates of its own: none for --lr to set or to schedule
        scheduled = "lr" in outer.optimizer.hypers
        given = [flag for flag, used in (("--lr", c.lr is not None), ("--warmup", c.warmup > 0),
                                         ("--schedule", c.schedule != "constant")) if used]
        if given and not scheduled:
            raise NestError(f"{given[0]}: optimizer `{outer.optimizer.name}` has no `lr`",
                            outer.span, kind="value", hint="nestc train sets and "
                            "schedules a rule's `lr`; this one's rates are set in the rule")
        if c.lr is not None:
            kwargs["lr"] = c.lr
        torch.manual_seed(c.seed)
        backend = {} if c.backend is None else {"backend": c.backend}
        try:
            self.model = program.build(c.model, **backend, **hyper).to(self.device)
        except ValueError as err:  # an unknown back end
            raise NestError(str(err), kind="value") from None
        if self.model.out_feat < self.task.vocab:
            raise NestError(f"`{c.model}` has {self.model.out_feat} logits, task "
                            f"`{self.task.name}` has {self.task.vocab} tokens", kind="value",
                            hint=f"pass -p vocab={self.task.vocab}")
        rows = min((m.num_embeddings for m in self.model.modules()
                    if isinstance(m, nn.Embedding)), default=None)
        if rows is not None and rows < self.task.vocab:  # (an IndexError, exit 2)
            raise NestError(f"`{c.model}` embeds {rows} token ids, task `{self.task.name}` "
                            f"has {self.task.vocab}", kind="value",
                            hint="its embed takes the vocab of its logits")
        self.optimizer = build_optimizer(outer.optimizer,
                                         self.model.parameters(), **kwargs)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, c.steps, c.warmup, c.schedule)) \
            if scheduled else None
        # this run's peak rates: the schedule's `lr`, and any other `*_lr` hyperparameter
        # (Muon's and M3's `adamw_lr` for vectors), which LambdaLR does not scale but this
        # run does (warmup 0 left the vectors moving)
        self.peaks = [{k: v for k, v in g.items() if k == "initial_lr" or
                       (k.endswith("_lr") and isinstance(v, (int, float)))}
                      for g in self.optimizer.param_groups]
        self.scale_rates()
        self.objective: nn.Module = Objective(self.model)
        if c.steps < self.task.phases:  # (the last phases were never trained nor evaluated)
            raise NestError(f"--steps {c.steps} is fewer than task `{self.task.name}`'s "
                            f"{self.task.phases} phases", kind="value",
                            hint=f"train at least {self.task.phases} steps, or set fewer phases")
        self.data = torch.Generator().manual_seed(c.seed)
        held_out = torch.Generator().manual_seed(c.seed + EVAL_SEED)
        self.eval_set = [[self.task.sample(c.batch, held_out, phase, split=EVAL_SPLIT)
                          for _ in range(c.eval_batches)] for phase in range(self.task.phases)]

    def scale_rates(self) -> None:
        """Each group's rates at the schedule's step: `lr` (LambdaLR's own) and every other
        `*_lr` hyperparameter by the same factor, from this run's peaks (a resumed run's too:
        a new --lr applies from the step it resumes at); none without a schedule."""
        if self.schedule is None:
            return
        factor = lr_factor(self.schedule.last_epoch, self.config.steps, self.config.warmup,
                           self.config.schedule)
        self.schedule.base_lrs = [peak["initial_lr"] for peak in self.peaks]
        for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
            for key, value in peak.items():
                group[key] = value
                group["lr" if key == "initial_lr" else key] = value * factor
        self.schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # noqa: SLF001

    def distribute(self) -> None:
        """Under torchrun, the objective as DDP (whose set-up is a collective: after every
        rank's set-up succeeded)."""
        if self.ranks.world > 1:
            # find_unused: some levels get no outer gradient in some models
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=ids, find_unused_parameters=True)

    def phase_of(self, step: int) -> int:
        """The phase 0-based step `step` trains (the steps split evenly over the phases)."""
        return step * self.task.phases // self.config.steps

    # the loop ----------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.ranks = Ranks(self.device)
        try:
            start = 0
            # before the first collective, so that a rank that fails here (rank 0 on its
            # --out, say) stops every rank rather than leave them waiting for it
            with self.ranks.deferred():
                start = self.set_up()
            self.ranks.agree()
            self.distribute()
            summary = self.loop(start)
        except BaseException:
            self.ranks.close(wait=self.ranks.together)
            raise
        # DDP's reducer freed while the group it was made with is alive: freed after
        # destroy_process_group (this Run collected on return) it hung a rank now and then
        self.objective = getattr(self.objective, "module", self.objective)
        gc.collect()
        self.ranks.close(wait=True)
        return summary

    def set_up(self) -> int:
        """The model and its outer level, the checkpoint resumed, and the output folder with
        metrics.jsonl (rank 0); returns the step to start at."""
        c = self.config
        if c.batch < self.ranks.world:
            raise NestError(f"--batch {c.batch} is smaller than the {self.ranks.world} ranks",
                            kind="value")
        self.build()
        self.metrics: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}
        start = self.resume() if c.resume else 0
        if self.ranks.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "w") as fh:
                fh.writelines(json.dumps(m) + "\n" for m in self.metrics)
        return start

    def loop(self, start: int) -> dict[str, Any]:
        from tqdm import tqdm

        c = self.config
        stop = min(c.steps, c.stop_after if c.stop_after is not None else c.steps)
        stop = max(stop, start)  # a finished run resumed: nothing left to do
        tokens_per_step = c.batch * self.task.seq_len
        bar = tqdm(total=c.steps, initial=start, disable=c.quiet or not self.ranks.main,
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        rows = self.ranks.rows(c.batch)
        speed = None  # tokens/s, smoothed for the bar
        # seconds spent in training steps (evaluation and checkpoints left out), over resumes
        spent = float(self.metrics[-1].get("train_s", 0.0)) if self.metrics else 0.0
        try:
            for step in range(start, stop):
                phase = self.phase_of(step)
                tick = time.perf_counter()
                tokens, targets = self.task.sample(c.batch, self.data, phase)
                scored = int((targets != IGNORE).sum())
                tokens, targets = tokens[rows].to(self.device), targets[rows].to(self.device)
                self.objective.train()
                # DDP averages gradients over the ranks: scale each rank's sum back to the
                # full batch's mean
                scale = self.ranks.world / max(scored, 1)
                loss, self.state = self.objective(tokens, targets, scale)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = self.optimizer.param_groups[0].get("lr")  # (None: a rule without lr)
                self.optimizer.step()
                if self.schedule is not None:
                    self.schedule.step()
                    self.scale_rates()
                total = self.ranks.sum(loss.detach().double().reshape(1) / self.ranks.world)
                elapsed = time.perf_counter() - tick
                spent += elapsed
                record: dict[str, Any] = {"step": step + 1, "phase": phase,
                                          "loss": total.item(), "lr": lr,
                                          "tokens_per_s": round(tokens_per_step / elapsed, 1),
                                          "train_s": round(spent, 3)}
                due = self.eval_every and (step + 1) % self.eval_every == 0
                if step + 1 == c.steps or self.phase_of(step + 1) != phase or due:
                    record.update(self.evaluate(phase))
                    if not c.quiet and self.ranks.main:
                        bar.write(self.describe(record))
                self.log(record)
                speed = tokens_per_step / elapsed if speed is None else \
                    0.9 * speed + 0.1 * tokens_per_step / elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{speed:.0f}")
                if (c.checkpoint_every and (step + 1) % c.checkpoint_every == 0) or \
                        step + 1 == stop:
                    self.save(step + 1)
                self.ranks.agree()  # (rank 0's files of this step written)
        finally:
            bar.close()
        return self.finish(stop)

    def evaluate(self, phase: int) -> dict[str, Any]:
        """Loss and accuracy on the eval set of every phase up to `phase`, over all ranks
        (memories that learn from the task loss still learn in context without grad mode)."""
        with torch.no_grad():
            return self.evaluate_phases(phase)

    def evaluate_phases(self, phase: int) -> dict[str, Any]:
        self.model.eval()
        rows = self.ranks.rows(self.config.batch)
        several = self.task.phases > 1
        # name -> (numerator, denominator), summed over batches and ranks; every rank adds
        # the same names in the same order
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, num: torch.Tensor, den: Any) -> None:
            pair = torch.stack([num.detach().double().cpu(), torch.as_tensor(den).double()])
            sums[name] = sums[name] + pair if name in sums else pair

        for p in range(phase + 1):
            for tokens, targets in self.eval_set[p]:
                tokens, targets = tokens[rows], targets[rows]
                loss, pred, _ = score(self.model, tokens.to(self.device),
                                      targets.to(self.device))
                pred, scored = pred.cpu(), targets != IGNORE  # (B, T)
                right = (pred == targets) & scored
                groups = self.task.groups(tokens, targets)
                for suffix in ("", f"/phase{p}") if several else ("",):
                    add(f"loss{suffix}", loss, scored.sum())
                    add(f"acc{suffix}", right.sum(), scored.sum())
                    add(f"seq_acc{suffix}", sequence_correct(pred, targets).sum(), len(pred))
                    for name, mask in groups.items():
                        add(f"acc/{name}{suffix}", (right & mask).sum(), mask.sum())
        names = list(sums)
        pairs = self.ranks.sum(torch.stack([sums[n] for n in names]))  # (metrics, 2)
        self.model.train()
        out: dict[str, Any] = {}
        for name, (num, den) in zip(names, pairs.tolist()):
            if den == 0 and name.startswith("acc/"):  # a group with no positions here: none
                continue
            value = num / max(den, 1)
            out["eval_" + name if "/" not in name else name] = value
            if self.task.bits and name.startswith("loss"):
                out["bpc" + name[4:]] = value / math.log(2)
        return out

    def describe(self, record: dict[str, Any]) -> str:
        text = f"step {record['step']}: loss {record['loss']:.4f}, eval loss " \
               f"{record['eval_loss']:.4f}, acc {100 * record['eval_acc']:.1f}%"
        if "bpc" in record:
            text += f", {record['bpc']:.3f} bpc"
        parts = [f"{k.split('/', 1)[1]} {100 * v:.0f}%" for k, v in record.items()
                 if k.startswith("acc/") and k.count("/") == 1]
        if parts:
            text += f" ({', '.join(parts)})"
        return text

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self.ranks.main:
            with self.ranks.deferred(), open(self.out / METRICS, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # checkpoints ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this run."""
        c = self.config
        # a task's phases split the steps: another --steps would move their boundaries under
        # the steps already trained (phase 1 trained again after phase 2)
        steps = {"steps": c.steps} if self.task.phases > 1 else {}
        return {"spec": spec_file(c.spec), "model": c.model, "task": self.task.describe(),
                "hyper": self.hyper, "batch": c.batch, "seed": c.seed, **steps}

    def recorded(self) -> dict[str, Any]:
        """The configuration as checkpoints and summary.json record it: with the
        hyperparameters the model was built with, so that they rebuild it."""
        return {**asdict(self.config), "hyper": self.hyper}

    def save(self, step: int) -> None:
        if not self.ranks.main:
            return
        data = {
            "format": CHECKPOINT_FORMAT, "step": step, "identity": self.identity(),
            "config": self.recorded(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "rng": {"data": self.data.get_state(), "torch": torch.get_rng_state()},
            "metrics": self.metrics, "memory_state": self.state,
        }
        path = self.out / CHECKPOINT
        with self.ranks.deferred():
            # opened here: a path that cannot be written is an OSError (torch.save's own
            # open raised a RuntimeError)
            with open(path.with_suffix(".tmp"), "wb") as fh:
                torch.save(data, fh)
            os.replace(path.with_suffix(".tmp"), path)
            plot(self.metrics, self.out)

    def resume(self) -> int:
        c = self.config
        path = self.out / CHECKPOINT if c.resume is True else Path(str(c.resume))
        if not path.is_file():
            raise NestError(f"--resume: no checkpoint at `{path}`", kind="value")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise NestError(f"--resume: cannot read `{path}`: {err}", kind="value") from None
        why = not_a_checkpoint(data)
        if why:
            raise NestError(f"--resume: `{path}` is not a checkpoint of nestc train ({why})",
                            kind="value", hint="resume from the checkpoint.pt of a run")
        identity = self.identity()
        if data["format"] == 1:  # (it held the hyperparameters given, vocab apart)
            identity["hyper"] = c.hyper
            identity.pop("steps", None)
        for key, mine in identity.items():
            theirs = data["identity"].get(key)
            if key == "spec" and isinstance(theirs, str):  # (older ones: the path as typed)
                theirs = spec_file(theirs)
            if _plain(theirs) != _plain(mine):
                raise NestError(f"--resume: `{path}` was made with {key} {theirs!r}, this run "
                                f"has {mine!r}", kind="value")
        try:
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])
            if self.schedule is not None:
                self.schedule.load_state_dict(data["schedule"])
            self.data.set_state(data["rng"]["data"])
            torch.set_rng_state(data["rng"]["torch"])
            self.metrics = list(data["metrics"])
            step = int(data["step"])
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as err:
            # (a spec changed since, or a file edited by hand)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NestError(f"--resume: `{path}` does not fit this run: {first}",
                            kind="value") from None
        self.scale_rates()  # (the checkpoint's rates: this run's --lr, at the step resumed)
        self.state = data["memory_state"]
        return step

    def finish(self, step: int) -> dict[str, Any]:
        c = self.config
        evals = [m for m in self.metrics if "eval_loss" in m]
        losses = [m["loss"] for m in self.metrics]
        speeds = [m["tokens_per_s"] for m in self.metrics]
        summary = {
            "model": c.model, "spec": c.spec, "task": self.task.describe(), "steps": step,
            "params": sum(p.numel() for p in self.model.parameters()),
            "loss": losses[-1] if losses else None,
            "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
            "train_s": self.metrics[-1]["train_s"] if self.metrics else None,
            # the last eval's (a run stopped early ends between evals: its step says which)
            **({"eval_step": evals[-1]["step"]} if evals else {}),
            **({k: v for k, v in evals[-1].items() if k not in ("step", "phase", "loss", "lr",
                                                                "tokens_per_s", "train_s")}
               if evals else {}),
            "out": str(self.out), "config": self.recorded(), "metrics": self.metrics,
        }
        if self.ranks.main:
            with self.ranks.deferred():
                (self.out / "summary.json").write_text(json.dumps(
                    {k: v for k, v in summary.items() if k != "metrics"}, indent=2) + "\n")
        self.ranks.agree()
        return summary


def not_a_checkpoint(data: Any) -> str | None:
    """Why `data`, a file's content, is not a checkpoint resume can read; None if it is."""
    if not isinstance(data, dict):
        return f"a {type(data).__name__}"
    missing = [k for k in CHECKPOINT_KEYS if k not in data]
    if missing:
        return f"no `{missing[0]}`"
    if data["format"] not in (1, CHECKPOINT_FORMAT):
        return f"format {data['format']!r}"
    if not isinstance(data["identity"], dict):
        return f"an identity that is a {type(data['identity']).__name__}"
    return None


def spec_file(spec: str) -> str:
    """A spec as a checkpoint records it: a stdlib name as it is, a path as the file it names
    (`m.nest`, `./m.nest` and its absolute path are one spec; a resume compared the path as
    typed)."""
    return spec if spec.startswith(STD_PREFIX) else str(Path(spec).resolve())


def _plain(value: Any) -> Any:
    """Tuples as lists, so a value compares equal to itself after a round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def plot(metrics: list[dict[str, Any]], out: Path) -> None:
    """loss.png (the training loss per step; the eval loss, pooled and per phase) and
    accuracy.png (the eval accuracy, pooled, per phase, per group of the task); nothing
    without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [m for m in metrics if "eval_loss" in m]
    for name, ylabel, head in (("loss", "loss (nats)", "loss"), ("accuracy", "accuracy", "acc")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if head == "loss":
            ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=0.8,
                    alpha=0.7, label="train")
        # first-seen order: phases come in the order they are trained
        keys = [f"eval_{head}", *dict.fromkeys(k for m in evals for k in m
                                               if k.startswith(f"{head}/") and
                                               k.count("/") == 1)]
        for key in keys:
            points = [(m["step"], m[key]) for m in evals if key in m]
            group = "/" in key and not key.split("/")[1].startswith("phase")
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, ls="--" if group else "-",
                        label="eval" if key.startswith("eval_") else key.split("/", 1)[1])
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:  # (no evals yet: an empty accuracy plot)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
