"""nestc train: a run end to end through the command line, determinism, bit-for-bit resume,
continual phases, the spec's outer level, errors without tracebacks, and DDP over two processes
equal to one process on the full batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import ClassVar

import pytest
from conftest import ROOT, spec

torch = pytest.importorskip("torch")

import nestc  # noqa: E402
from nestc import cli  # noqa: E402
from nestc.tasks import Copy  # noqa: E402
from nestc.train import lr_factor, outer_level, train  # noqa: E402

LM = "std/models/transformer.nest"
TINY = {"dim": 16, "depth": 1}
TINY_ARGS = ["-p", "dim=16", "-p", "depth=1"]


CLOCK = ("tokens_per_s", "train_s")  # the wall-clock fields of metrics.jsonl


def losses(metrics: list[dict]) -> list[dict]:
    """The metrics without the wall-clock fields."""
    return [{k: v for k, v in m.items() if k not in CLOCK} for m in metrics]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_tiny_run_through_the_command_line_writes_metrics_plots_and_a_checkpoint(
        tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, "train", LM, "TransformerLM", "--task", "copy", *TINY_ARGS,
                          "-k", "half=4", "--steps", "6", "--batch", "4", "--eval-every", "3",
                          "--out", str(out), "-q")
    assert (rc, stdout, err) == (0, "", "")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in lines)
    spent = [m["train_s"] for m in lines]
    assert spent[0] > 0 and all(a < b for a, b in zip(spent, spent[1:]))
    assert [m["step"] for m in lines if "eval_loss" in m] == [3, 6]
    assert 0 <= lines[-1]["eval_acc"] <= 1 and "bpc" not in lines[-1]
    for png in ("loss.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and losses(ckpt["metrics"]) == losses(lines)
    assert set(ckpt["rng"]) == {"data", "torch"}
    assert ckpt["optimizer"]["state"] and "r0_Attention.q_linear.weight" in ckpt["model"]
    # the attention cache of the last batch: (keys, values), 4 sequences of 8 tokens
    (cache,) = [v for k, v in ckpt["memory_state"].items() if k.endswith("Attention.C")]
    assert [tuple(t.shape[:1]) for t in cache] == [(4,), (4,)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval_acc"] == lines[-1]["eval_acc"]


def test_the_progress_bar_and_a_summary_line_unless_quiet(tmp_path, capsys):
    rc, stdout, err = run(capsys, "train", LM, "TransformerLM", "--task", "copy", *TINY_ARGS,
                          "--steps", "2", "--batch", "2", "--eval-every", "0",
                          "--out", str(tmp_path))
    assert rc == 0
    assert "2/2" in err and "tok_s=" in err
    first, last = stdout.splitlines()
    assert first.startswith("step 2: loss ") and ", eval loss " in first
    assert last.startswith("trained 2 steps: loss ") and last.endswith(f"; wrote {tmp_path}")


def test_two_runs_with_one_seed_are_equal_and_another_seed_differs(tmp_path):
    kw = {"hyper": TINY, "steps": 4, "batch": 4, "eval_every": 2, "quiet": True}
    a = train(LM, "TransformerLM", "copy", out=str(tmp_path / "a"), **kw)
    b = train(LM, "TransformerLM", "copy", out=str(tmp_path / "b"), **kw)
    c = train(LM, "TransformerLM", "copy", out=str(tmp_path / "c"), seed=1, **kw)
    assert losses(a["metrics"]) == losses(b["metrics"])
    assert losses(a["metrics"]) != losses(c["metrics"])


def test_resume_continues_bit_for_bit(tmp_path, capsys):
    kw = {"hyper": TINY, "steps": 8, "batch": 4, "eval_every": 3, "warmup": 2,
          "schedule": "cosine", "quiet": True}
    whole = train(LM, "TransformerLM", "copy", out=str(tmp_path / "whole"), **kw)
    half = train(LM, "TransformerLM", "copy", out=str(tmp_path / "split"), stop_after=4, **kw)
    assert len(half["metrics"]) == 4
    rest = train(LM, "TransformerLM", "copy", out=str(tmp_path / "split"), resume=True, **kw)
    assert losses(rest["metrics"]) == losses(whole["metrics"])  # ==, not approximately
    spent = [m["train_s"] for m in rest["metrics"]]  # the time of training steps goes on
    assert all(a < b for a, b in zip(spent, spent[1:]))
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert losses([json.loads(line) for line in lines]) == losses(whole["metrics"])
    # through the command line: 3 steps, then --resume (a given path) to 6, constant lr
    args = ["train", LM, "TransformerLM", "--task", "copy", *TINY_ARGS, "--batch", "4", "-q"]
    assert run(capsys, *args, "--steps", "6", "--out", str(tmp_path / "c1"))[0] == 0
    assert run(capsys, *args, "--steps", "3", "--out", str(tmp_path / "c2"))[0] == 0
    assert run(capsys, *args, "--steps", "6", "--out", str(tmp_path / "c3"), "--resume",
               str(tmp_path / "c2" / "checkpoint.pt"))[0] == 0
    c1, c3 = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("c1", "c3"))
    assert losses([json.loads(x) for x in c1]) == losses([json.loads(x) for x in c3])


class TwoPhaseCopy(Copy):
    """Copy with low token ids, then copy with high ones: two phases learned in turn."""

    name = "copy2"
    phases = 2
    seen: ClassVar[list[tuple[str, int]]] = []

    def sample(self, batch, generator, phase=0, split="train"):
        self.seen.append((split, phase))
        half = torch.randint(0, self.vocab // 2 - 1, (batch, self.half), generator=generator)
        half = half + 2 + phase * (self.vocab // 2 - 1)
        tokens = torch.cat([half, half], 1)
        targets = torch.full_like(tokens, -100)
        targets[:, self.half - 1:-1] = tokens[:, self.half:]
        return tokens, targets

    def groups(self, tokens, targets):
        first = torch.zeros_like(targets, dtype=torch.bool)
        first[:, self.half - 1] = True
        return {"first": first, "rest": (targets != -100) & ~first}


def test_a_continual_task_is_trained_phase_after_phase_and_every_phase_is_evaluated(tmp_path):
    TwoPhaseCopy.seen.clear()
    s = train(LM, "TransformerLM", TwoPhaseCopy(), hyper=TINY, steps=6, batch=4, eval_every=0,
              eval_batches=1, out=str(tmp_path), quiet=True)
    assert [m["phase"] for m in s["metrics"]] == [0, 0, 0, 1, 1, 1]
    assert [x for x in TwoPhaseCopy.seen if x[0] == "train"] == [("train", 0)] * 3 + \
        [("train", 1)] * 3
    assert sorted(set(x for x in TwoPhaseCopy.seen if x[0] != "train")) == \
        [("eval", 0), ("eval", 1)]
    evals = {m["step"]: m for m in s["metrics"] if "eval_loss" in m}
    assert sorted(evals) == [3, 6]  # at the end of each phase
    assert "acc/phase0" in evals[3] and "acc/phase1" not in evals[3]
    assert {"loss/phase0", "acc/phase0", "loss/phase1", "acc/phase1"} <= set(evals[6])
    # the task's groups, pooled and per phase, and whole-sequence accuracy
    assert {"acc/first", "acc/rest", "acc/first/phase1", "eval_seq_acc", "seq_acc/phase1"} <= \
        set(evals[6])
    # the pooled score is the mean of the phases' (equal counts of scored positions)
    assert evals[6]["eval_acc"] == pytest.approx((evals[6]["acc/phase0"]
                                                  + evals[6]["acc/phase1"]) / 2)


def test_a_character_task_reports_bits_per_character(tmp_path):
    class Chars(Copy):
        name = "chars"
        bits = True

    s = train(LM, "TransformerLM", Chars(), hyper=TINY, steps=1, batch=2, eval_batches=1,
              out=str(tmp_path), quiet=True)
    assert s["bpc"] == pytest.approx(s["eval_loss"] / 0.6931471805599453)


OWN_RULE = spec("""
    import "std/optim/adam.nest" as O
    optimizer Plain(lr = 0.1) {
        param W
        W -= lr * grad(W)
    }
    model Tiny(vocab = 12, dim = 8) {
        input tokens : [T] int
        output logits = embed(tokens, vocab, dim) |> linear(vocab)
        train every step { objective cross_entropy(logits, next(tokens)); rule Plain(1 / dim) }
    }
    model Aliased(vocab = 12, dim = 8) {
        input tokens : [T] int
        output logits = embed(tokens, vocab, dim) |> linear(vocab)
        train every step {
            objective cross_entropy(logits, next(tokens))
            rule O.AdamW(weight_decay = 0.25, betas = (0.8, 0.9))
        }
    }
""")


def test_the_outer_level_is_the_optimizer_the_spec_declares(tmp_path):
    prog = nestc.load(LM)
    outer = outer_level(prog, prog.decl("TransformerLM"), {})
    assert (outer.optimizer.name, outer.kwargs) == ("AdamW", {"lr": 4e-4, "weight_decay": 0.1})
    train(LM, "TransformerLM", "copy", hyper=TINY, steps=1, batch=2, out=str(tmp_path / "a"),
          quiet=True)
    (group,) = torch.load(tmp_path / "a" / "checkpoint.pt",
                          weights_only=True)["optimizer"]["param_groups"]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (4e-4, 0.1, (0.9, 0.999))
    # its own optimizer with an argument over the model's hyperparameters, and an aliased import
    path = tmp_path / "own.nest"
    path.write_text(OWN_RULE)
    prog = nestc.load(path)
    assert outer_level(prog, prog.decl("Tiny"), {"dim": 4}).kwargs == {"lr": 0.25}
    train(str(path), "Tiny", "copy", steps=1, batch=2, out=str(tmp_path / "b"), quiet=True)
    (group,) = torch.load(tmp_path / "b" / "checkpoint.pt",
                          weights_only=True)["optimizer"]["param_groups"]
    assert group["lr"] == 1 / 8 and "weight_decay" not in group
    train(str(path), "Aliased", "copy", steps=1, batch=2, lr=0.01, out=str(tmp_path / "c"),
          quiet=True)
    (group,) = torch.load(tmp_path / "c" / "checkpoint.pt",
                          weights_only=True)["optimizer"]["param_groups"]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.01, 0.25, (0.8, 0.9))


def test_warmup_then_cosine_to_a_tenth():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(9, 10, 2, "cosine") == pytest.approx(0.1)


NOT_TRAINABLE = spec("""
    from "std/optim/adam.nest" import AdamW
    model Tiny(vocab = 12, dim = 8) {
        input tokens : [T] int
        output logits = embed(tokens, vocab, dim) |> linear(vocab)
        train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
    }
    model Slow(vocab = 12, dim = 8) {
        input tokens : [T] int
        output logits = embed(tokens, vocab, dim) |> linear(vocab)
        train every 2 steps { objective cross_entropy(logits, next(tokens)); rule AdamW() }
    }
    model Other(vocab = 12, dim = 8) {
        input tokens : [T] int
        output logits = embed(tokens, vocab, dim) |> linear(vocab)
        train every step { objective l2(logits, logits); rule AdamW() }
    }
""")


@pytest.mark.parametrize(("args", "message"), [
    (["bad.nest", "Tiny"], "bad.nest:1:7: error: "),
    (["m.nest", "Tiny"], "m.nest:5:76: error: the train level's rule `gd` is not an "
                         "optimizer declaration\n"),
    (["m.nest", "Slow"], "m.nest:10:11: error: nestc train runs `train every step`: one outer "
                         "update per batch\n"),
    (["m.nest", "Other"], "m.nest:15:24: error: nestc train runs the objective "
                          "cross_entropy(<logits>, next(<tokens>)), with the model's output and "
                          "input\n"),
    ([LM, "TransformerLM", "--backend", "fast"], "error: backend must be one of "),
    ([LM, "TransformerLM", "--backend", "triton", "--device", "cpu"], "error: --backend triton "
     "runs Triton kernels, which need a CUDA device; this run is on cpu\n"),
    ([LM, "Transformer"], "error: `std/models/transformer.nest` declares no `Transformer`\n"),
    ([LM, "MLP"], "std/models/transformer.nest:16:7: error: `MLP` is a block: nestc train "
                  "runs a model\n"),
    ([LM, "TransformerLM", "-p", "width=3"], "std/models/transformer.nest:22:7: error: model "
                                             "`TransformerLM` has no hyperparameter `width`\n"),
    ([LM, "TransformerLM", "--task", "nope"], "error: unknown task `nope`\n"),
    ([LM, "TransformerLM", "-k", "bogus=1"], "error: task `copy` has no knob `bogus`\n"),
    ([LM, "TransformerLM", "-k", "half=x +"], "error: -k half=x +: "),
    ([LM, "TransformerLM", "--resume"], "error: --resume: no checkpoint at `"),
    ([LM, "TransformerLM", "--lr", "inf"], "error: --lr must be a finite number of at least 0, "
                                           "got inf\n"),
    ([LM, "TransformerLM", "--device", "meta"], "error: --device meta: nestc train runs on cpu "
                                                "or cuda\n"),
    # a run of 0 steps crashed on its summary line and wrote no checkpoint
    ([LM, "TransformerLM", "--stop-after", "0"], "error: --stop-after must be at least 1, "
                                                 "got 0\n"),
    # torch's seeds take 64 bits, and the eval set's generator adds to the seed
    ([LM, "TransformerLM", "--seed", str(2**64)], "error: --seed must be from 0 to "
     f"{2**63 - 1}, got {2**64}\n"),
    ([LM, "TransformerLM", "--seed", "-1"], "error: --seed must be from 0 to "),
])
def test_errors_exit_1_with_a_message_and_no_traceback(tmp_path, monkeypatch, capsys, args,
                                                       message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "bad.nest").write_text("model (\n")
    (tmp_path / "m.nest").write_text(NOT_TRAINABLE)
    task = [] if "--task" in args else ["--task", "copy"]
    rc, stdout, err = run(capsys, "train", *args, *task, "--steps", "1", "--batch", "2", "-q",
                          "--out", str(tmp_path / "run"))
    assert rc == 1 and err.startswith(message), err
    assert "Traceback" not in err


def test_a_rule_that_is_not_an_optimizer_is_shown_at_its_span(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.nest").write_text(NOT_TRAINABLE)
    rc, _, err = run(capsys, "train", "m.nest", "Tiny", "--task", "copy", "-q")
    assert rc == 1 and err == spec("""
        m.nest:5:76: error: the train level's rule `gd` is not an optimizer declaration
           5 |     train every step { objective cross_entropy(logits, next(tokens)); rule gd(lr = 0.1) }
             |                                                                            ^~
          hint: nestc train builds the outer level from an optimizer, e.g. from "std/optim/adam.nest" import AdamW
    """)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    args = ["train", LM, "TransformerLM", "--task", "copy", "--steps", "2", "--batch", "2",
            "-q", "--out", str(tmp_path)]
    assert run(capsys, *args, *TINY_ARGS)[0] == 0
    rc, _, err = run(capsys, *args, "-p", "dim=8", "-p", "depth=1", "--resume")
    assert rc == 1 and err.startswith(f"error: --resume: `{tmp_path}/checkpoint.pt` was made "
                                      "with hyper {'dim': 16, 'depth': 1, 'vocab': 12}, this "
                                      "run has {'dim': 8, 'depth': 1, 'vocab': 12}\n")


def test_two_processes_under_torchrun_equal_one_process_on_the_full_batch(tmp_path):
    args = ["train", LM, "TransformerLM", "--task", "copy", *TINY_ARGS, "--steps", "4",
            "--batch", "6", "--eval-every", "2", "--eval-batches", "1", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "nestc.cli", *args, "--out",
                          str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    one = train(LM, "TransformerLM", "copy", hyper=TINY, steps=4, batch=6, eval_every=2,
                eval_batches=1, out=str(tmp_path / "one"), quiet=True)
    text = (tmp_path / "ddp" / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 4
    for a, b in zip(lines, one["metrics"]):
        assert a.keys() == b.keys()
        for key in a:
            if key not in CLOCK:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    wa = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_in_context_levels_learn_from_the_input_never_from_the_labels(tmp_path):
    """A CMS level's in-context loss is the spec's next(tokens): the task's labels (MQAR's
    answers, absent from the input) must not reach it, or evaluation would learn from them."""
    from nestc.train import score
    (tmp_path / "cms.nest").write_text(spec("""
        import "std/memory/cms.nest"
        from "std/optim/adam.nest" import AdamW
        model CMSLM(vocab = 20, dim = 16) {
            input tokens : [T] int
            let h = embed(tokens, vocab, dim)
            h = h + CMS(dim, chunks = [4], lr = 0.5)(rmsnorm(h))
            output logits = h |> rmsnorm |> linear(vocab)
            train every step {
                objective cross_entropy(logits, next(tokens))
                rule AdamW(lr = 1e-3)
            }
        }
    """))
    torch.manual_seed(0)
    model = nestc.load(tmp_path / "cms.nest").build("CMSLM")
    tokens = torch.randint(0, 20, (2, 12))
    labels = torch.full_like(tokens, -100)
    labels[:, 2:8] = torch.randint(0, 20, (2, 6))
    _, pred, state = score(model, tokens, labels)
    _, pred2, state2 = score(model, tokens, (labels + 7) % 20)
    learned = model(tokens, return_state=True)[1]["CMS.c0_f"]["W"]
    assert torch.equal(pred, pred2)
    for a, b, c in zip(state["CMS.c0_f"]["W"], state2["CMS.c0_f"]["W"], learned):
        assert torch.equal(a, b) and torch.equal(a, c.detach())
    assert not torch.equal(learned[0], model.CMS.c0_f.A)  # the level did learn in context


@pytest.mark.parametrize("spec,name", [("std/models/hope.nest", "HopeLM"),
                                       ("std/models/titans.nest", "TitansLM")])
def test_fsdp_shards_every_block_and_trains_as_one_process(tmp_path, spec, name):
    """FSDP2's fully_shard on each block (a sub-module the generated code calls through
    __call__, so its hooks gather and free the block's weights) and on the root, with nestc's
    SGD on the sharded parameters: two processes equal one on the whole batch. A model with
    task-loss levels (HopeLM) is refused with a NestError: their gradients are taken inside
    the forward, after which FSDP reshards the parameters (once a level's chunk was full,
    the next piece met sharded weights or freed storage: a RuntimeError or a segfault; this
    test passed before only because its 12 tokens never filled a chunk of 16)."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(ROOT / "tests" / "fsdp_worker.py"),
                          spec, name], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    if name == "HopeLM":
        assert run.returncode != 0 and "sharding this model is not supported yet" in run.stderr
        return
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith("max parameter")]
    assert float(line.split()[-1]) < 1e-5, line


def test_a_resume_with_another_lr_trains_with_it_from_there(tmp_path):
    """The checkpoint's optimizer and schedule brought back the old rates while summary.json
    recorded the new --lr (a bug hunt's finding): the new one now applies from the step the
    run resumes at."""
    kw = {"hyper": TINY, "steps": 6, "batch": 4, "eval_every": 0, "quiet": True}
    train(LM, "TransformerLM", "copy", out=str(tmp_path / "r"), stop_after=3, lr=1e-3, **kw)
    rest = train(LM, "TransformerLM", "copy", out=str(tmp_path / "r"), resume=True, lr=1e-2,
                 **kw)
    assert [m["lr"] for m in rest["metrics"]] == [1e-3] * 3 + [1e-2] * 3


def test_the_schedule_scales_every_learning_rate_of_the_rule(tmp_path):
    """Muon's vectors step with `adamw_lr`, which LambdaLR does not scale: under warmup they
    moved at the full rate from the first step. nestc train scales each `*_lr` by the same
    factor: one step at warmup 4 (a factor of 1/4) is one step at a quarter of both rates."""
    text = spec("""
        from "std/optim/muon.nest" import Muon
        model M(vocab = 12, dim = 8) {
            input tokens : [T] int
            output logits = embed(tokens, vocab, dim) |> rmsnorm |> linear(vocab)
            train every step { objective cross_entropy(logits, next(tokens)); rule RULE }
        }
    """)
    kw = {"steps": 1, "batch": 2, "eval_every": 0, "quiet": True}
    models = []
    for name, rule, warmup in (("warm", "Muon()", 4),
                               ("quarter", "Muon(lr = 0.00025, adamw_lr = 0.000075)", 0)):
        (tmp_path / f"{name}.nest").write_text(text.replace("RULE", rule))
        train(str(tmp_path / f"{name}.nest"), "M", "copy", out=str(tmp_path / name),
              warmup=warmup, **kw)
        models.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"])
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], rtol=0, atol=1e-7)


def test_fewer_steps_than_a_tasks_phases_is_an_error(tmp_path, capsys):
    """Phases past the steps were never trained nor evaluated, and the summary named them."""
    rc, out, err = run(capsys, "train", LM, "TransformerLM", "--task", "continual", *TINY_ARGS,
                       "--steps", "2", "--batch", "2", "-q", "--out", str(tmp_path))
    assert rc == 1 and "--steps 2 is fewer than task `continual`'s 3 phases" in err


def test_a_rule_that_divides_by_zero_at_a_step_is_an_error_of_the_spec(tmp_path, capsys):
    """A divisor of the param's shape that is 0 (the linear layer's 8 columns) raised a bare
    ZeroDivisionError that nestc called its own internal error, exit 2."""
    path = tmp_path / "m.nest"
    path.write_text("""optimizer Z(lr = 0.1) {
    param W
    W -= lr * rows(W) / (cols(W) - 8) * grad(W)
}

model M(vocab = 16, dim = 8) {
    input tokens : [T] int
    output logits = embed(tokens, vocab, dim) |> linear(vocab)
    train every step {
        objective cross_entropy(logits, next(tokens))
        rule Z(lr = 0.01)
    }
}
""")
    rc, out, err = run(capsys, "train", str(path), "M", "--task", "copy", "--steps", "2",
                       "--batch", "2", "-q", "--out", str(tmp_path / "run"))
    assert rc == 1 and err.startswith(f"{path}:3: error: division by zero in a step of "
                                      "optimizer `Z`"), err
    assert "Traceback" not in err


NO_LR = spec("""
    optimizer Plain(step_size = 0.1) {
        param W
        W -= step_size * grad(W)
    }
    model Tiny(vocab = 12, dim = 8) {
        input tokens : [T] int
        output logits = embed(tokens, vocab, dim) |> linear(vocab)
        train every step { objective cross_entropy(logits, next(tokens)); rule Plain(0.5) }
    }
""")


def test_a_rule_without_lr_trains_unscheduled_and_refuses_the_lr_flags(tmp_path, capsys):
    """LambdaLR needs every group's `lr`: such a rule was an internal error (KeyError)."""
    path = tmp_path / "m.nest"
    path.write_text(NO_LR)
    kw = {"steps": 4, "batch": 2, "eval_every": 0, "eval_batches": 1, "quiet": True}
    whole = train(str(path), "Tiny", "copy", out=str(tmp_path / "whole"), **kw)
    assert [m["lr"] for m in whole["metrics"]] == [None] * 4
    assert torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["schedule"] is None
    train(str(path), "Tiny", "copy", out=str(tmp_path / "split"), stop_after=2, **kw)
    rest = train(str(path), "Tiny", "copy", out=str(tmp_path / "split"), resume=True, **kw)
    assert losses(rest["metrics"]) == losses(whole["metrics"])
    for flag in (["--lr", "0.1"], ["--warmup", "1"], ["--schedule", "cosine"]):
        rc, _, err = run(capsys, "train", str(path), "Tiny", "--task", "copy", "--steps", "1",
                         "--batch", "2", "-q", "--out", str(tmp_path / "run"), *flag)
        assert rc == 1 and err.startswith(f"{path}:8:76: error: {flag[0]}: optimizer `Plain` "
                                          "has no `lr`\n"), err


def test_resume_refuses_a_file_that_is_not_a_checkpoint_or_does_not_fit(tmp_path, capsys):
    """A readable torch file of another shape was an internal error (AttributeError,
    KeyError)."""
    args = ["train", LM, "TransformerLM", "--task", "copy", *TINY_ARGS, "--steps", "2",
            "--batch", "2", "-q", "--out", str(tmp_path / "run")]
    hint = "  hint: resume from the checkpoint.pt of a run\n"
    for name, data, why in (("list.pt", [1, 2], "a list"),
                            ("partial.pt", {"identity": {}, "step": 1}, "no `model`")):
        torch.save(data, tmp_path / name)
        rc, _, err = run(capsys, *args, "--resume", str(tmp_path / name))
        assert (rc, err) == (1, f"error: --resume: `{tmp_path / name}` is not a checkpoint of "
                                f"nestc train ({why})\n{hint}")
    assert run(capsys, *args)[0] == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ckpt["model"]["h_embed.weight"] = torch.zeros(3, 3)  # (a spec changed since, say)
    torch.save(ckpt, tmp_path / "edited.pt")
    rc, _, err = run(capsys, *args, "--resume", str(tmp_path / "edited.pt"))
    assert rc == 1 and err.startswith(f"error: --resume: `{tmp_path / 'edited.pt'}` does not "
                                      "fit this run: Error(s) in loading state_dict"), err


def test_the_run_records_the_vocab_it_took_from_the_task(tmp_path):
    """config.hyper left out the vocab taken from the task, so it did not rebuild the model;
    a checkpoint written so (format 1) still resumes."""
    kw = {"hyper": TINY, "steps": 4, "batch": 2, "eval_every": 0, "eval_batches": 1,
          "quiet": True}
    whole = train(LM, "TransformerLM", "copy", out=str(tmp_path / "whole"), **kw)
    assert whole["config"]["hyper"] == {**TINY, "vocab": Copy().vocab}
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    ckpt = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert summary["config"]["hyper"] == ckpt["config"]["hyper"] == whole["config"]["hyper"]
    model = nestc.load(LM).build("TransformerLM", **ckpt["config"]["hyper"])
    model.load_state_dict(ckpt["model"])
    train(LM, "TransformerLM", "copy", out=str(tmp_path / "old"), stop_after=2, **kw)
    path = tmp_path / "old" / "checkpoint.pt"
    old = torch.load(path, weights_only=True)
    old["format"], old["identity"]["hyper"], old["config"]["hyper"] = 1, TINY, TINY
    torch.save(old, path)
    rest = train(LM, "TransformerLM", "copy", out=str(tmp_path / "old"), resume=True, **kw)
    assert losses(rest["metrics"]) == losses(whole["metrics"])


def torchrun(args: list[str], cwd, timeout: float = 60) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m nestc.cli ARGS`; a hang fails the test and leaves no
    worker behind: torchrun stops its workers on SIGTERM (they run in sessions of their own,
    and hold the output pipes open)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "nestc.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("where", ["out", "checkpoint"])
def test_a_write_that_fails_on_rank_0_alone_stops_every_rank_with_an_error(tmp_path, where):
    """Rank 0 alone writes the files. When a write failed (--out under a plain file; the
    checkpoint after step 1 of 3), rank 0 waited in the closing barrier and rank 1 in DDP's
    all-reduce, both until gloo's timeout of 30 minutes."""
    (tmp_path / "file").write_text("")
    (tmp_path / "run" / "checkpoint.tmp").mkdir(parents=True)  # where torch.save writes first
    out, why = {"out": ("file/run", "Not a directory: file/run"),
                "checkpoint": ("run", "Is a directory: run/checkpoint.tmp")}[where]
    ddp = torchrun(["train", LM, "TransformerLM", "--task", "copy", *TINY_ARGS, "--steps", "3",
                    "--batch", "2", "--eval-batches", "1", "--checkpoint-every", "1", "-q",
                    "--out", out], tmp_path)
    assert ddp.returncode == 1
    # (the ranks' lines may interleave)
    assert f"error: {why}" in ddp.stderr, ddp.stderr
    assert "error: rank 0 of this torchrun launch failed (its error says why); rank 1 stops " \
        "with it" in ddp.stderr
    assert "internal error" not in ddp.stderr


def test_a_multi_phase_run_resumes_only_with_its_steps(tmp_path, capsys):
    """The phases split the steps: a continual run of 6 steps resumed with --steps 12 trained
    phase 1 again after phase 2 ([0, 0, 1, 1, 2, 2, 1, 1, 2, ...])."""
    args = ["train", LM, "TransformerLM", "--task", "continual", *TINY_ARGS, "--batch", "2",
            "-q", "--out", str(tmp_path)]
    assert run(capsys, *args, "--steps", "6")[0] == 0
    rc, _, err = run(capsys, *args, "--steps", "12", "--resume")
    assert rc == 1 and "was made with steps 6, this run has 12" in err, err


def test_an_embedding_smaller_than_the_tasks_vocab_is_an_error(tmp_path, capsys):
    """Ids past the embedding were an IndexError (exit 2): the logits' width was checked, not
    the embedding's."""
    path = tmp_path / "two.nest"
    path.write_text(spec("""
        from "std/optim/adam.nest" import AdamW
        model TwoVocab(vocab = 256, dim = 16, in_vocab = 8) {
            input tokens : [T] int
            output logits = embed(tokens, in_vocab, dim) |> linear(vocab)
            train every step { objective cross_entropy(logits, next(tokens)); rule AdamW() }
        }
    """))
    rc, _, err = run(capsys, "train", str(path), "TwoVocab", "--task", "copy", "--steps", "1",
                     "--batch", "2", "-q", "--out", str(tmp_path / "run"))
    assert rc == 1 and "`TwoVocab` embeds 8 token ids, task `copy` has 12" in err, err


def test_the_summary_of_a_run_stopped_between_evals_says_which_step_its_eval_is(tmp_path):
    """--stop-after 7 with evals every 4: the summary carried step 4's eval and its train_s
    without saying so; now train_s is the last step's and eval_step is 4."""
    s = train(LM, "TransformerLM", "copy", hyper=TINY, steps=10, batch=2, eval_every=4,
              eval_batches=1, stop_after=7, out=str(tmp_path), quiet=True)
    assert s["steps"] == 7 and s["eval_step"] == 4
    assert s["train_s"] == s["metrics"][-1]["train_s"]
    assert s["eval_loss"] == s["metrics"][3]["eval_loss"]


def test_an_accuracy_group_without_positions_is_left_out(tmp_path):
    """continual with seq_len 3 repeats no key: its `repeat` group has no positions, and was
    reported as 0% accuracy."""
    s = train(LM, "TransformerLM", "continual", hyper=TINY, knobs={"seq_len": 3}, steps=3,
              batch=2, eval_batches=1, out=str(tmp_path), quiet=True)
    assert "acc/first" in s and "acc/repeat" not in s


def test_a_run_resumes_with_its_spec_spelled_another_way(tmp_path, capsys, monkeypatch):
    """The checkpoint kept the spec's path as typed: `m.nest` refused `./m.nest`, its absolute
    path, or `../m.nest` from another folder."""
    (tmp_path / "m.nest").write_text((ROOT / "stdlib" / "models" / "transformer.nest")
                                     .read_text())
    monkeypatch.chdir(tmp_path)
    args = ["TransformerLM", "--task", "copy", *TINY_ARGS, "--batch", "2", "--steps", "3", "-q",
            "--out", str(tmp_path / "run")]
    assert run(capsys, "train", "m.nest", *args, "--stop-after", "1")[0] == 0
    assert run(capsys, "train", "./m.nest", *args, "--stop-after", "2", "--resume")[0] == 0
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    rc, _, err = run(capsys, "train", "../m.nest", *args, "--resume")
    assert rc == 0, err
    (tmp_path / "other.nest").write_text((tmp_path / "m.nest").read_text())  # another file
    rc, _, err = run(capsys, "train", "../other.nest", *args, "--resume")
    assert rc == 1 and "was made with spec" in err
