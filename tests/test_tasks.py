"""The synthetic tasks: shapes, determinism, targets that follow from the construction, knob
errors, and oracles that look back in the sequence and score 1.0 where the task is recall."""

from __future__ import annotations

import pytest
import torch

from nestc import NestError, tasks
from nestc.tasks import IGNORE, Niah

SMALL = {
    "copy": {},
    "mqar": {"seq_len": 64, "pairs": 8},
    "s-niah-1": {"seq_len": 128},
    "s-niah-2": {"seq_len": 128},
    "s-niah-3": {"seq_len": 128},
    "mk-niah": {"seq_len": 128},
    "continual": {},
    "charlm": {"seq_len": 64},
}
NIAH = ["s-niah-1", "s-niah-2", "s-niah-3", "mk-niah"]


def batch(task: tasks.Task, seed: int, n: int = 4, **kw: object) -> tuple[torch.Tensor, ...]:
    return task.sample(n, torch.Generator().manual_seed(seed), **kw)


def test_registry_has_the_benchmark_tasks():
    assert set(tasks.TASKS) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_range_and_determinism(name):
    task = tasks.make(name, **SMALL[name])
    tokens, targets = batch(task, 0)
    assert tokens.shape == targets.shape == (4, task.seq_len)
    assert tokens.dtype == targets.dtype == torch.int64
    assert tokens.min() >= 0 and tokens.max() < task.vocab
    scored = targets != IGNORE
    assert scored.any(1).all()
    assert targets[scored].min() >= 0 and targets[scored].max() < task.vocab
    again = batch(task, 0)
    assert torch.equal(tokens, again[0]) and torch.equal(targets, again[1])
    assert not torch.equal(tokens, batch(task, 1)[0])


def mqar_oracle(tokens: torch.Tensor) -> torch.Tensor:
    """At each position, the token after the first earlier occurrence of the current token
    (-1 where there is none)."""
    T = tokens.shape[1]
    same = (tokens[:, :, None] == tokens[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)
    first = same.int().argmax(2)  # (B, T): 0 where no earlier occurrence
    found = same.any(2)
    return torch.where(found, tokens.gather(1, (first + 1).clamp(max=T - 1)), -1)


@pytest.mark.parametrize("knobs", [{}, {"queries": 5, "answers_in_input": True, "power_a": 1.0},
                                   {"seq_len": 65, "pairs": 4, "vocab": 10}])
def test_mqar_targets_are_the_values_paired_with_the_query_keys(knobs):
    task = tasks.make("mqar", **knobs)
    tokens, targets = batch(task, 3, n=8)
    pairs, half = task.pairs, task.vocab // 2
    keys, values = tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2]
    assert ((keys >= 1) & (keys < half)).all() and (values >= half).all()
    for row in range(8):
        assert len(set(keys[row].tolist())) == pairs
        lookup = dict(zip(keys[row].tolist(), values[row].tolist()))
        where = (targets[row] != IGNORE).nonzero()[:, 0].tolist()
        assert len(where) == task.queries and min(where) >= 2 * pairs
        for t in where:
            assert targets[row, t].item() == lookup[tokens[row, t].item()]
            if task.answers_in_input:
                assert tokens[row, t + 1] == targets[row, t]
    pred = mqar_oracle(tokens)
    scored = targets != IGNORE
    assert (pred[scored] == targets[scored]).all()


def test_mqar_power_law_puts_queries_near_the_context():
    near = tasks.make("mqar")
    tokens, targets = batch(near, 0, n=64)
    flat = tasks.make("mqar", power_a=1.0)
    flat_targets = batch(flat, 0, n=64)[1]
    pos = torch.arange(near.seq_len).expand_as(targets)
    assert pos[targets != IGNORE].float().mean() < pos[flat_targets != IGNORE].float().mean() - 20


def test_mqar_takes_a_steep_power_law():
    """power_a 160: g ** 159 overflowed float64 (NaN probabilities, an internal error); the
    queries all come at the end of the sequence, the largest gaps, as the law says."""
    task = tasks.make("mqar", power_a=160.0)
    targets = batch(task, 0, n=8)[1]
    assert ((targets != IGNORE).sum(1) == task.queries).all()
    scored = (targets != IGNORE).nonzero()[:, 1]
    assert scored.min() >= task.seq_len - 2 * task.queries - 2


def niah_oracle(tokens: torch.Tensor) -> torch.Tensor:
    """After the last QUERY, at each position: find a needle whose key, IS and value so far
    equal what followed the QUERY, and predict its next token (-1 where none matches)."""
    pred = torch.full_like(tokens, -1)
    for b, row in enumerate(tokens.tolist()):
        q = len(row) - 1 - row[::-1].index(Niah.QUERY)
        needles = [i for i, x in enumerate(row[:q]) if x == Niah.NEEDLE]
        for t in range(q + 1, len(row)):
            asked = row[q + 1:t + 1]
            for s in needles:
                if row[s + 1:s + 1 + len(asked)] == asked:
                    pred[b, t] = row[s + 1 + len(asked)]
                    break
    return pred


@pytest.mark.parametrize("name, knobs", [(name, {}) for name in NIAH] + [
    ("mk-niah", {"key_len": 1, "needles": 40, "seq_len": 1024, "depth": 0.3})])
def test_niah_targets_spell_the_asked_needles_value(name, knobs):
    task = tasks.make(name, **{"seq_len": 256, **knobs})
    tokens, targets = batch(task, 5, n=6)
    kl, vl = task.key_len, task.value_len
    for row in range(6):
        seq = tokens[row].tolist()
        starts = [i for i, x in enumerate(seq) if x == Niah.NEEDLE]
        assert len(starts) == task.needles
        assert seq.count(Niah.QUERY) == 1 and seq[-(kl + vl + 2)] == Niah.QUERY
        asked = seq[-(kl + vl + 1):-(vl + 1)]
        keys = [seq[s + 1:s + 1 + kl] for s in starts]
        assert len({tuple(k) for k in keys}) == task.needles and keys.count(asked) == 1
        s = starts[keys.index(asked)]
        assert seq[s + 1 + kl] == Niah.IS
        value = seq[s + 2 + kl:s + 2 + kl + vl]
        assert all(Niah.SYMBOLS <= v < Niah.SYMBOLS + task.symbols for v in value)
        assert targets[row][targets[row] != IGNORE].tolist() == value
        assert seq[-vl:] == value
        assert (targets[row, -vl - 1:-1] != IGNORE).all()
    pred = niah_oracle(tokens)
    assert tasks.sequence_correct(pred, targets).all()


def test_niah_haystacks():
    hay = batch(tasks.make("s-niah-1", seq_len=256, depth=1.0), 0)[0][:, :200]
    filler = bytes(hay[0].tolist()).decode()
    assert "The sun is yellow. Here we go." in filler
    essay = batch(tasks.make("s-niah-2", seq_len=256, depth=1.0), 0)[0][:, :200]
    assert (essay < 128).all() and "The sky" not in bytes(essay[0].tolist()).decode()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_depth_places_the_needle(depth):
    task = tasks.make("s-niah-2", seq_len=200, depth=depth)
    tokens = batch(task, 0)[0]
    hay_len = task.seq_len - 2 * task.span
    where = (tokens == Niah.NEEDLE).nonzero()[:, 1]
    assert (where == round(depth * hay_len)).all()


@pytest.mark.parametrize("name", NIAH)
@pytest.mark.parametrize("seq_len", [64, 16384])
def test_niah_any_context_length(name, seq_len):
    task = tasks.make(name, seq_len=seq_len)
    tokens, targets = batch(task, 2, n=1)
    assert tokens.shape == (1, seq_len)
    assert tasks.sequence_correct(niah_oracle(tokens), targets).all()


def continual_mapping(tokens: torch.Tensor, targets: torch.Tensor) -> dict[int, int]:
    scored = targets != IGNORE
    pairs = set(zip(tokens[scored].tolist(), targets[scored].tolist()))
    mapping = dict(pairs)
    assert len(mapping) == len(pairs)  # one value per key
    return mapping


def test_continual_mappings_persist_across_batches_and_differ_across_phases():
    task = tasks.make("continual")
    maps = []
    for phase in range(task.phases):
        tokens, targets = batch(task, 0, n=16, phase=phase)
        assert (tokens[:, 0] == phase).all()
        a = continual_mapping(tokens, targets)
        b = continual_mapping(*batch(task, 1, n=16, phase=phase))
        assert len(a) == task.keys and a == b
        maps.append(a)
    for key in maps[0]:
        assert len({m[key] for m in maps}) == task.phases
    same = tasks.make("continual", seed=0).sample(16, torch.Generator().manual_seed(0), phase=1)
    assert continual_mapping(*same) == maps[1]
    other = tasks.make("continual", seed=1).sample(16, torch.Generator().manual_seed(0), phase=1)
    assert continual_mapping(*other) != maps[1]


def test_continual_groups_split_repeats_from_first_occurrences():
    task = tasks.make("continual", seq_len=63)
    tokens, targets = batch(task, 0, n=8)
    groups = task.groups(tokens, targets)
    scored = targets != IGNORE
    assert torch.equal(groups["repeat"] | groups["first"], scored)
    assert not (groups["repeat"] & groups["first"]).any()
    for row in range(8):
        keys = tokens[row, 1::2].tolist()
        repeat = groups["repeat"][row, 1::2].tolist()
        assert repeat == [k in keys[:i] for i, k in enumerate(keys)]
    assert 0 < groups["repeat"].sum() < scored.sum()


@pytest.mark.parametrize("phase", [-1, 3, 1.0])
def test_continual_phase_out_of_range(phase):
    with pytest.raises(NestError, match="has phases 0 to 2"):
        batch(tasks.make("continual"), 0, phase=phase)


def test_charlm_shifted_ascii_and_splits():
    task = tasks.make("charlm", seq_len=128)
    assert task.bits and task.vocab == 128
    train_tokens, train_targets = batch(task, 0)
    eval_tokens, _ = batch(task, 0, split="eval")
    assert torch.equal(train_tokens[:, 1:], train_targets[:, :-1])
    assert train_tokens.max() < 128 and train_targets.max() < 128
    assert not torch.equal(train_tokens, eval_tokens)
    train_text = bytes(tasks._text("train").tolist())
    eval_text = bytes(tasks._text("eval").tolist())
    assert len(eval_text) > 16384 and len(train_text) > 8 * len(eval_text)
    assert bytes(train_tokens[0].tolist()) in train_text
    assert bytes(eval_tokens[0].tolist()) in eval_text
    assert torch.equal(eval_tokens, batch(task, 0, split="test")[0])


@pytest.mark.parametrize("name, knobs, message", [
    ("nope", {}, "unknown task `nope`"),
    ("mqar", {"pair": 3}, "task `mqar` has no knob `pair`"),
    ("mqar", {"pairs": 70}, "seq_len 256 cannot hold 70 key-value pairs and 70 query slots"),
    ("mqar", {"vocab": 32, "pairs": 16}, "vocab 32 has 15 key ids"),
    ("mqar", {"queries": 17}, "queries must be at most 16"),
    ("mqar", {"pairs": 2.5}, "pairs must be a whole number of at least 1, got 2.5"),
    ("mqar", {"power_a": 0}, "power_a must be a number above 0"),
    ("mqar", {"answers_in_input": 1}, "answers_in_input must be true or false"),
    ("s-niah-1", {"seq_len": 16}, "seq_len 16 cannot hold a needle and the query of 11 tokens"),
    ("s-niah-3", {"value_len": 0}, "value_len must be a whole number of at least 1"),
    ("s-niah-2", {"depth": 1.5}, "depth must be a fraction from 0 to 1"),
    ("mk-niah", {"needles": 1}, "needles must be a whole number of at least 2"),
    ("mk-niah", {"key_len": 1, "needles": 110, "seq_len": 9999}, "gives 109 distinct keys"),
    ("continual", {"values": 2}, "values 2 is fewer than phases=3"),
    ("continual", {"seed": -1}, "seed must be a whole number of at least 0"),
    ("charlm", {"seq_len": 10**6}, "does not fit in the eval split"),
])
def test_bad_knobs(name, knobs, message):
    with pytest.raises(NestError, match=message) as err:
        tasks.make(name, **knobs)
    assert err.value.kind == "value"
