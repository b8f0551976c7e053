"""Synthetic tasks generated in code (no downloads), for `nestc train` and `nestc bench`.

A task makes batches of token ids and their targets: `tokens[:, t]` is the model's input at
position t and `targets[:, t]` the token it must predict there (from tokens[:, :t + 1]), -100
where nothing is scored. Training minimizes the cross-entropy over the scored positions; the
accuracy is the fraction of scored positions whose argmax is the target. A model with memories
that learn from the task loss is called with the tokens alone: its in-context levels learn from
`next(tokens)`, its objective, never from the targets (nestc/train.py).

Every batch comes from a `torch.Generator` the caller seeds: the same seed gives the same data.
A task with several phases (continual learning) is learned one phase after another; `sample`
takes the phase.

The tasks of the Nested Learning benchmarks: `mqar` (Zoology's multi-query associative recall),
`s-niah-1`, `s-niah-2`, `s-niah-3` and `mk-niah` (RULER's needles in a haystack), `continual`
(mappings learned one after another, for retention) and `charlm` (characters of the Python
standard library's own source). Besides `sample`, `groups` names subsets of the scored positions
worth an accuracy of their own, and `sequence_correct` is RULER's whole-answer match.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from typing import Any, ClassVar

import torch

from nestc.errors import NestError

IGNORE = -100  # the target of a position that is not scored (cross_entropy's ignore_index)


class Task:
    """One synthetic task. Subclasses set `name`, `knobs` (the keyword arguments `make`
    accepts, with their defaults) and implement `sample`."""

    name: ClassVar[str]
    knobs: ClassVar[dict[str, Any]] = {}
    vocab: int  # token ids are in [0, vocab)
    seq_len: int  # T of every sample
    phases: int = 1  # sub-tasks learned one after another (continual learning)
    bits: bool = False  # report bits per character, not accuracy alone (character LM)

    def __init__(self, **knobs: Any) -> None:
        self.config = {**self.knobs, **knobs}
        for name, value in self.config.items():
            setattr(self, name, value)

    def sample(self, batch: int, generator: torch.Generator, phase: int = 0,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """tokens and targets, both [batch, seq_len] int64."""
        raise NotImplementedError

    def groups(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Optional sub-metrics: named [batch, seq_len] bool masks, each a subset of the scored
        positions of a batch from `sample` whose accuracy is worth reporting on its own."""
        return {}

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.name}({knobs})"


def sequence_correct(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[batch] bool: every scored position of the sample is predicted right (RULER's metric,
    a whole needle value recalled); `predictions` is the argmax, [batch, seq_len]."""
    return ((predictions == targets) | (targets == IGNORE)).all(1)


class Copy(Task):
    """The second half of each sequence repeats the first: tokens 2..vocab-1 drawn uniformly,
    scored on the second half (each of its tokens is predicted from the position before)."""

    name = "copy"
    knobs: ClassVar[dict[str, Any]] = {"vocab": 12, "half": 8}
    half: int

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        _check_int(self, "vocab", 3)
        _check_int(self, "half", 1)
        self.seq_len = 2 * self.half

    def sample(self, batch: int, generator: torch.Generator, phase: int = 0,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        half = torch.randint(2, self.vocab, (batch, self.half), generator=generator)
        tokens = torch.cat([half, half], 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, self.half - 1:-1] = tokens[:, self.half:]
        return tokens, targets


class MQAR(Task):
    """Multi-query associative recall, built as Zoology's `multiquery_ar` (Arora et al. 2023).

    Keys are the ids 1 .. vocab//2 - 1, values vocab//2 .. vocab - 1. A sample opens with
    `pairs` key-value pairs (key, value, key, value, ...): keys distinct, values distinct, both
    uniform. The rest is a query region of space = (seq_len - 2 pairs) // 2 slots of two
    tokens. `queries` of the pairs (all of them by default, else a uniform subset) are asked, the
    i-th asked pair in context order at slot gap_i: the gaps are drawn without replacement with
    probability proportional to power_a * g ** (power_a - 1), g = 1 .. space (Zoology's power
    law: with 0.01, queries soon after the context are likelier; 1 is uniform). A query is the
    key's token at its slot's first position, and only these positions are scored, target the
    key's value. Every other position of the query region (a slot's second token, unused slots,
    an odd last position) is noise uniform over [0, vocab) (Zoology's random_non_queries, so
    noise may repeat a key; it is never scored). `answers_in_input=True` puts each query's value
    in the position after it instead of noise, so the query region reads like the context;
    Zoology leaves noise there.

    Defaults: seq_len 256 and pairs 16 sit in Zoology's grid (64..512 tokens, 4..64 pairs).
    vocab is 256 rather than Zoology's 8192: the embedding and the output softmax stay cheap on
    CPU, and 127 keys and 128 values still leave recall, not guessing, as the only way to score.
    """

    name = "mqar"
    knobs: ClassVar[dict[str, Any]] = {"seq_len": 256, "pairs": 16, "vocab": 256,
                                       "queries": None, "power_a": 0.01,
                                       "answers_in_input": False}
    pairs: int
    queries: int
    power_a: float
    answers_in_input: bool

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        _check_int(self, "seq_len", 4)
        _check_int(self, "pairs", 1)
        _check_int(self, "vocab", 4)
        if self.queries is None:
            self.queries = self.pairs
        _check_int(self, "queries", 1, most=self.pairs)
        _check_positive(self, "power_a")
        _check_bool(self, "answers_in_input")
        if self.vocab // 2 - 1 < self.pairs:
            raise _error(self, f"vocab {self.vocab} has {self.vocab // 2 - 1} key ids "
                         f"(1 .. vocab/2 - 1), fewer than the {self.pairs} distinct keys of "
                         f"pairs={self.pairs}; use vocab >= {2 * self.pairs + 2}")
        if 2 * self.pairs + 2 * self.queries > self.seq_len:
            raise _error(self, f"seq_len {self.seq_len} cannot hold {self.pairs} key-value "
                         f"pairs and {self.queries} query slots of two tokens; use seq_len >= "
                         f"{2 * self.pairs + 2 * self.queries}")

    def sample(self, batch: int, generator: torch.Generator, phase: int = 0,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        pairs, half = self.pairs, self.vocab // 2
        keys = 1 + _distinct(batch, half - 1, pairs, generator)  # (B, P)
        values = half + _distinct(batch, self.vocab - half, pairs, generator)  # (B, P)
        tokens = torch.randint(self.vocab, (batch, self.seq_len), generator=generator)
        tokens[:, 0:2 * pairs:2] = keys
        tokens[:, 1:2 * pairs:2] = values
        space = (self.seq_len - 2 * pairs) // 2
        g = torch.arange(1, space + 1, dtype=torch.float64)
        p = self.power_a * g ** (self.power_a - 1)
        if not torch.isfinite(p).all():  # (power_a 152 and up overflowed float64: NaN)
            p = (g / space) ** (self.power_a - 1)  # the same distribution, scaled
        gaps = torch.multinomial(p.expand(batch, space), self.queries, replacement=False,
                                 generator=generator)  # (B, Q), in the order drawn
        asked = _distinct(batch, pairs, self.queries, generator).sort(1).values  # (B, Q)
        where = 2 * pairs + 2 * gaps  # (B, Q)
        tokens.scatter_(1, where, keys.gather(1, asked))
        targets = torch.full_like(tokens, IGNORE)
        targets.scatter_(1, where, values.gather(1, asked))
        if self.answers_in_input:
            tokens.scatter_(1, where + 1, values.gather(1, asked))
        return tokens, targets


# RULER's noise haystack, repeated
_FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. "
           b"There and back again. ")


class Niah(Task):
    """Needles in a haystack in the style of RULER (Hsieh et al. 2024); the four registered
    variants differ in haystack, value and needle count.

    Token ids (vocab 256): 0..127 the haystack's ASCII characters (as `charlm`); NEEDLE 128,
    IS 129, QUERY 130; 131..146 value symbols (131..140 the digits 0-9, 141..146 the hex digits
    a-f); 147..255 key tokens. A needle is NEEDLE, `key_len` key tokens, IS, `value_len` value
    tokens; the keys of the needles of one sample are distinct sequences, every token uniform.
    A sample is a haystack of H = seq_len - (needles + 1) * (key_len + value_len + 2) tokens
    with the needles inserted, then the query QUERY, the asked key, IS, followed by the asked
    value. The asked needle sits after round(depth * H) haystack tokens (depth 0: first, 1: just
    before the query; None: uniform over 0..H per sample); the others (mk-niah's distractors) at
    uniform depths. Scored: the value_len positions from the query's IS to the last value token
    but one, each with the next value token as target (RULER's answer, given its prefix).
    Needles go between any two tokens, not only at sentence ends as in RULER. Any seq_len from
    64 (with the defaults) up works; `sequence_correct` is RULER's whole-value match.
    """

    NEEDLE: ClassVar[int] = 128
    IS: ClassVar[int] = 129
    QUERY: ClassVar[int] = 130
    SYMBOLS: ClassVar[int] = 131
    KEYS: ClassVar[int] = 147
    haystack: ClassVar[str] = "essay"  # "filler" (_FILLER repeated) or "essay" (stdlib text)
    symbols: ClassVar[int] = 10  # the value alphabet: 10 digits, or 16 hex digits
    fewest_needles: ClassVar[int] = 1
    key_len: int
    value_len: int
    depth: float | None
    needles: int = 1
    vocab = 256

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        _check_int(self, "seq_len", 1)
        _check_int(self, "key_len", 1)
        _check_int(self, "value_len", 1)
        _check_int(self, "needles", self.fewest_needles)
        _check_fraction(self, "depth")
        self.span = self.key_len + self.value_len + 2  # a needle, and the query with its answer
        least = (self.needles + 1) * self.span + 1
        if self.seq_len < least:
            what = "a needle" if self.needles == 1 else f"{self.needles} needles"
            raise _error(self, f"seq_len {self.seq_len} cannot hold {what} and the query of "
                         f"{self.span} tokens each and a haystack; use seq_len >= {least}")
        keys = (self.vocab - self.KEYS) ** self.key_len
        if self.needles > keys:
            raise _error(self, f"key_len {self.key_len} gives {keys} distinct keys, fewer than "
                         f"needles={self.needles}; use a longer key_len")

    def sample(self, batch: int, generator: torch.Generator, phase: int = 0,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        n, vl = self.needles, self.value_len
        hay_len = self.seq_len - (n + 1) * self.span
        hay = self._haystack(batch, hay_len, generator, split)  # (B, H)
        keys = self.KEYS + _distinct_rows(batch, n, self.key_len, self.vocab - self.KEYS,
                                          generator)  # (B, n, key_len)
        values = self.SYMBOLS + torch.randint(self.symbols, (batch, n, vl),
                                              generator=generator)  # (B, n, value_len)
        needle, is_ = torch.full((batch, n, 1), self.NEEDLE), torch.full((batch, n, 1), self.IS)
        needles = torch.cat([needle, keys, is_, values], 2)  # (B, n, span)
        depths = torch.randint(hay_len + 1, (batch, n), generator=generator)
        if self.depth is not None:
            depths[:, 0] = round(self.depth * hay_len)
        query = torch.full((batch, 1), self.QUERY)
        tokens = torch.cat([_insert(hay, depths, needles), query, keys[:, 0], is_[:, 0],
                            values[:, 0]], 1)  # (B, seq_len)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -vl - 1:-1] = values[:, 0]
        return tokens, targets

    def _haystack(self, batch: int, length: int, generator: torch.Generator,
                  split: str) -> torch.Tensor:
        """(B, length) haystack tokens: a window of the filler or of the split's stdlib text,
        from a uniform start, wrapping around at its end."""
        if self.haystack == "filler":
            text = torch.tensor(list(_FILLER))
        else:
            text = _text(split)
        start = torch.randint(len(text), (batch, 1), generator=generator)
        return text[(start + torch.arange(length)) % len(text)]


class SNiah1(Niah):
    """RULER's S-NIAH-1 (passkey retrieval): one needle in RULER's filler sentences ("The
    grass is green. The sky is blue. ...") repeated, its value a 7-digit number. Built as
    `Niah` describes."""

    name = "s-niah-1"
    knobs: ClassVar[dict[str, Any]] = {"seq_len": 512, "key_len": 2, "value_len": 7,
                                       "depth": None}
    haystack = "filler"


class SNiah2(Niah):
    """RULER's S-NIAH-2: one needle in essay-like text (the stdlib source of `charlm`, from the
    split's part), its value a 7-digit number. Built as `Niah` describes."""

    name = "s-niah-2"
    knobs: ClassVar[dict[str, Any]] = {"seq_len": 512, "key_len": 2, "value_len": 7,
                                       "depth": None}


class SNiah3(Niah):
    """RULER's S-NIAH-3: one needle in the stdlib text, its value a UUID-like string of 16 hex
    digits (half a UUID's 32, so that the default still fits seq_len 64). Built as `Niah`
    describes."""

    name = "s-niah-3"
    knobs: ClassVar[dict[str, Any]] = {"seq_len": 512, "key_len": 2, "value_len": 16,
                                       "depth": None}
    symbols = 16


class MKNiah(Niah):
    """RULER's MK-NIAH-1: `needles` needles with distinct keys in the stdlib text, values
    7-digit numbers; the query asks one of them (at `depth`), the others are distractors. Built
    as `Niah` describes."""

    name = "mk-niah"
    knobs: ClassVar[dict[str, Any]] = {"seq_len": 512, "key_len": 2, "value_len": 7,
                                       "needles": 4, "depth": None}
    fewest_needles = 2


class Continual(Task):
    """A stream of `phases` synthetic languages learned one after another, for retention.

    Token ids: 0..phases-1 the phase markers, then `keys` key tokens, then `values` value
    tokens (vocab = phases + keys + values). Phase p has a fixed mapping f_p from the keys to
    the values, drawn once from the `seed` knob (not from the sampling generator, so it is the
    same in every batch and lives in the weights); for every key the phases map it to distinct
    values, so learning phase p + 1 overwrites what phase p taught. A sample of phase p is its
    marker, then keys uniform with replacement each followed by its value: p, k1, f_p(k1), k2,
    f_p(k2), ..., cut to seq_len (an even seq_len ends on a key, still scored: its target is its
    value). Scored: every key position, target f_p(key). After learning each phase, the trainer
    samples every earlier phase (`phase=q`) and reports its accuracy: retention.

    Keys repeat within a sequence (with 32 keys and 32 pairs, about 12 of the 32 keys asked are
    repeats), so a model can also answer from context: `groups` splits the scored positions
    into "repeat" (the key appeared earlier in the sequence, its value can be copied from there)
    and "first" (only the weights know). Repeat accuracy above first accuracy, most visibly early
    in a new phase, measures in-context learning. `split` is ignored: a different seed gives the
    evaluation batches of the same mappings.
    """

    name = "continual"
    knobs: ClassVar[dict[str, Any]] = {"phases": 3, "keys": 32, "values": 32, "seq_len": 64,
                                       "seed": 0}
    keys: int
    values: int
    seed: int

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        _check_int(self, "phases", 1)
        _check_int(self, "keys", 1)
        _check_int(self, "seq_len", 2)
        _check_int(self, "seed", 0)
        _check_int(self, "values", 1)
        if self.values < self.phases:
            raise _error(self, f"values {self.values} is fewer than phases={self.phases}: every "
                         f"phase must map each key to a different value; use values >= "
                         f"{self.phases}")
        self.vocab = self.phases + self.keys + self.values
        mappings = torch.Generator().manual_seed(self.seed)
        chosen = torch.rand(self.keys, self.values, generator=mappings).argsort(1)
        self.mapping = self.phases + self.keys + chosen[:, :self.phases].T  # (phases, keys)

    def sample(self, batch: int, generator: torch.Generator, phase: int = 0,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(phase, bool) or not isinstance(phase, int) \
                or not 0 <= phase < self.phases:
            raise NestError(f"task `{self.name}` has phases 0 to {self.phases - 1}, got phase "
                            f"{phase!r}", kind="value")
        pairs = self.seq_len // 2
        keys = torch.randint(self.keys, (batch, pairs), generator=generator)  # (B, pairs)
        values = self.mapping[phase][keys]  # (B, pairs)
        tokens = torch.full((batch, 1 + 2 * pairs), phase)
        tokens[:, 1::2] = self.phases + keys
        tokens[:, 2::2] = values
        targets = torch.full_like(tokens, IGNORE)
        targets[:, 1::2] = values
        return tokens[:, :self.seq_len], targets[:, :self.seq_len]

    def groups(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scored positions split in two: "repeat", whose key came earlier in the sequence,
        and "first", the rest."""
        keys = tokens[:, 1::2] - self.phases  # (B, pairs)
        onehot = torch.nn.functional.one_hot(keys, self.keys)  # (B, pairs, keys)
        before = (onehot.cumsum(1) - onehot).gather(2, keys[..., None])[..., 0] > 0
        repeat = torch.zeros_like(tokens, dtype=torch.bool)
        repeat[:, 1::2] = before
        scored = targets != IGNORE
        return {"repeat": repeat & scored, "first": ~repeat & scored}


class CharLM(Task):
    """Character-level language modeling on the source of the Python standard library.

    The corpus is the sorted modules of _CORPUS_MODULES (a dozen well-known pure-Python ones;
    any missing is skipped) from sysconfig's stdlib directory, read as bytes, joined by the
    ASCII file separator (28), every byte >= 128 replaced by ASCII SUB (26): ids in [0, 128).
    On CPython 3.11 it is 491,983 characters (it varies a little with the Python version):
    `split="train"` samples its first 90% (442,784), any other split the last 10% (49,199).
    A sample is a window of seq_len + 1 characters from a uniform start in the split: tokens
    are its first seq_len, targets its last seq_len, all scored. `bits`: the caller reports
    bits per character, the mean cross-entropy / ln 2.
    """

    name = "charlm"
    knobs: ClassVar[dict[str, Any]] = {"seq_len": 256}
    vocab = 128
    bits = True

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        _check_int(self, "seq_len", 1)
        shortest = len(_text("eval"))
        if self.seq_len >= shortest:
            raise _error(self, f"seq_len {self.seq_len} does not fit in the eval split's "
                         f"{shortest} characters; use seq_len <= {shortest - 1}")

    def sample(self, batch: int, generator: torch.Generator, phase: int = 0,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        text = _text(split)
        start = torch.randint(len(text) - self.seq_len, (batch, 1), generator=generator)
        window = text[start + torch.arange(self.seq_len + 1)]  # (B, seq_len + 1)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


_CORPUS_MODULES = ("argparse.py", "calendar.py", "dataclasses.py", "difflib.py", "fractions.py",
                   "functools.py", "heapq.py", "pprint.py", "random.py", "statistics.py",
                   "string.py", "textwrap.py")
_SEPARATOR = 28  # ASCII FS, file separator: between two modules
_REPLACEMENT = 26  # ASCII SUB, substitute: for every byte >= 128


@functools.cache
def _corpus() -> torch.Tensor:
    """The charlm corpus as int64 ids in [0, 128), read once."""
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for module in _CORPUS_MODULES:
        path = os.path.join(root, module)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                texts.append(f.read())
    if not texts:
        raise NestError(f"no standard library sources to read under {root}", kind="value",
                        hint="charlm and the essay haystacks need a Python with its .py files")
    ids = torch.tensor(list(bytes([_SEPARATOR]).join(texts)), dtype=torch.int64)
    ids[ids >= 128] = _REPLACEMENT
    return ids


def _text(split: str) -> torch.Tensor:
    """The first 90% of the corpus for "train", the last 10% for any other split."""
    corpus = _corpus()
    cut = int(0.9 * len(corpus))
    return corpus[:cut] if split == "train" else corpus[cut:]


def _distinct(batch: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, k) ints of [0, n), distinct within a row, uniformly ordered."""
    return torch.rand(batch, n, generator=generator).argsort(1)[:, :k]


def _distinct_rows(batch: int, n: int, length: int, base: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(batch, n, length) ints of [0, base), uniform, no two of a sample's n rows equal: drawn
    without replacement from a small space, else rows that repeat an earlier row are drawn again
    until none do."""
    space = base ** length
    if space <= 4096:
        codes = _distinct(batch, space, n, generator)  # (B, n)
        powers = base ** torch.arange(length - 1, -1, -1)
        return codes[..., None] // powers % base
    rows = torch.randint(base, (batch, n, length), generator=generator)
    while True:
        same = (rows[:, :, None] == rows[:, None]).all(-1).tril(-1).any(-1)  # (B, n)
        if not same.any():
            return rows
        rows[same] = torch.randint(base, (int(same.sum()), length), generator=generator)


def _insert(hay: torch.Tensor, depths: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """hay (B, H) with pieces (B, n, L) inserted, piece i right before hay token depths[:, i]
    (H: at the end; equal depths keep the pieces' order): (B, H + n L)."""
    (batch, length), (n, span) = hay.shape, pieces.shape[1:]
    depths, order = depths.sort(dim=1, stable=True)
    pieces = pieces.gather(1, order[..., None].expand(-1, -1, span))
    starts = depths + span * torch.arange(n)  # (B, n): depth + the pieces before it
    where = (starts[..., None] + torch.arange(span)).flatten(1)  # (B, n L)
    j = torch.arange(length).repeat(batch, 1)  # (B, H)
    hay_where = j + span * torch.searchsorted(depths, j, right=True)  # (B, H)
    out = torch.empty(batch, length + n * span, dtype=hay.dtype)
    out.scatter_(1, hay_where, hay)
    out.scatter_(1, where, pieces.flatten(1))
    return out


TASKS: dict[str, type[Task]] = {t.name: t for t in (Copy, MQAR, SNiah1, SNiah2, SNiah3, MKNiah,
                                                    Continual, CharLM)}


def make(name: str, **knobs: Any) -> Task:
    """The task `name` with its knobs; a NestError names the known tasks or knobs."""
    cls = TASKS.get(name)
    if cls is None:
        raise NestError(f"unknown task `{name}`", kind="value",
                        hint=f"the tasks are {', '.join(sorted(TASKS))}")
    unknown = sorted(set(knobs) - set(cls.knobs))
    if unknown:
        raise NestError(f"task `{name}` has no knob `{unknown[0]}`", kind="value",
                        hint=f"its knobs are {', '.join(sorted(cls.knobs)) or 'none'}")
    return cls(**knobs)


def _error(task: Task, message: str) -> NestError:
    return NestError(f"task `{task.name}`: {message}", kind="value")


def _check_int(task: Task, knob: str, least: int, most: int | None = None) -> None:
    value = getattr(task, knob)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise NestError(f"task `{task.name}`: {knob} must be a whole number of at least "
                        f"{least}, got {value!r}", kind="value")
    if most is not None and value > most:
        raise NestError(f"task `{task.name}`: {knob} must be at most {most}, got {value!r}",
                        kind="value")


def _check_positive(task: Task, knob: str) -> None:
    value = getattr(task, knob)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _error(task, f"{knob} must be a number above 0, got {value!r}")


def _check_bool(task: Task, knob: str) -> None:
    value = getattr(task, knob)
    if not isinstance(value, bool):
        raise _error(task, f"{knob} must be true or false, got {value!r}")


def _check_fraction(task: Task, knob: str) -> None:
    value = getattr(task, knob)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _error(task, f"{knob} must be a fraction from 0 to 1 (or left out: uniform at "
                     f"random per sample), got {value!r}")
