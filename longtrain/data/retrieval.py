"""Synthetic retrieval samples: needles hidden in a haystack of real text.

Each kind ends with questions whose answers are the last tokens of the sample:

- ``passkey`` (Landmark Attention, YaRN, LongLoRA): one numeric key, stated twice in a
  needle, asked for at the end.
- ``kv``: several ``key → value`` needles, some of them queried at the end, one question
  each. The other pairs are distractors, so the model has to match the key rather than
  fetch "the" number.
- the RULER tasks (Hsieh et al. 2024), in its formats, over our haystack:
  ``multikey`` (``kv`` asking one key among ``kv_pairs``), ``multiquery`` (``multi_queries``
  of the keys asked in one question, their values answered as one list), ``multivalue``
  (one key stated with ``multi_values`` values, all of them answered, in text order),
  ``vartrack`` (chains of assignments ``VAR a = 12345`` … ``VAR b = a``; answer every name
  the asked value reaches, in chain order) and ``cwe`` (common-word extraction: a list of
  words, no haystack, the ``cwe_words`` most frequent asked for in order of first
  appearance). Multi-part answers are one string joined by ``, ``, so exact match of every
  answer token means every part right.
- ``copy``: tagged segments of haystack text; a query repeats a tag and the answer is
  its whole segment.
- ``induction``: ``copy`` with haystack, tags and segments all uniformly random tokens.
  Nothing in it can be predicted except by matching the tag and copying what followed:
  the match-and-copy (induction) circuit every other kind relies on, in its purest form.
  Short samples of it are how a small model acquires that circuit quickly (the CPU
  demo's first stage); big pretraining runs get it from their token budget.

A sample is a pure function of (seed, split, index), like a PackedDataset sample, so the
loader's global sample count stays the only data state. Training and evaluation never
share text: evaluation haystacks come from the validation split, and every key and
value is drawn from its split's half of the key space (a stable hash decides the half).
Needles are tokenised on their own and inserted between haystack tokens, so they sit on
a token boundary whatever the tokenizer, and their positions are exact.
"""

from __future__ import annotations

import functools
import hashlib
import math
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from longtrain.config import RETRIEVAL_KINDS, Config, RetrievalConfig, check_retrieval_kinds
from longtrain.data.shards import open_prepared
from longtrain.data.sources import Split
from longtrain.data.tokenizer import Tokenizer
from longtrain.optim.loss import IGNORE_INDEX

LOSS_MODES = ("answer", "all")

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is "
KV_INTRO = "Some values are hidden in the text below. Remember them.\n"
KV_NEEDLE = "\nThe value of {key} is {value}.\n"
KV_QUESTION = "\nWhat is the value of {key}? The value of {key} is "
MULTIQUERY_QUESTION = "\nWhat are the values of {keys}? The values of {keys} are "
MULTIVALUE_INTRO = "Some special values are hidden in the text below. Remember them.\n"
MULTIVALUE_NEEDLE = "\nOne of the special values for {key} is {value}.\n"
MULTIVALUE_QUESTION = "\nWhat are all the special values for {key}, in the order they appear? They are "
VARTRACK_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n"
VARTRACK_VALUE = "\nVAR {name} = {value}\n"
VARTRACK_ASSIGN = "\nVAR {name} = VAR {source}\n"
VARTRACK_QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: in the order they are assigned, they are "
)
CWE_INTRO = "Below is a list of words. Memorize the ones that appear most often.\n"
CWE_QUESTION = (
    "\nQuestion: What are the {n} most common words in the list above, in the order they first appear? "
    "Answer: they are "
)
CWE_MAX_COMMON = 30  # RULER's frequencies: a common word 30 times, every other word 3 times
CWE_RARE = 3
ANSWER_SEP = ", "  # joins the parts of a multi-part answer
COPY_NEEDLE = "\n[{key}] "
ANSWER_END = "."  # closes every answer but the last, which ends the sample

_SPLIT_CODE = {"train": 0, "val": 1}


# -- key spaces ------------------------------------------------------------------------


def key_split(key: str) -> Split:
    """The split that owns ``key``: one bit of its sha1 (stable across processes, unlike hash())."""
    return "val" if hashlib.sha1(key.encode("utf-8")).digest()[0] & 1 else "train"


def draw_number(rng: np.random.Generator, digits: int, split: Split) -> str:
    """A ``digits``-digit number (no leading zero) from ``split``'s half of the key space."""
    while True:  # half of all draws qualify: two tries on average
        key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        if key_split(key) == split:
            return key


def draw_word(rng: np.random.Generator, chars: int, split: Split) -> str:
    """A random lowercase word from ``split``'s half of the key space."""
    letters = string.ascii_lowercase
    while True:
        key = "".join(letters[j] for j in rng.integers(0, len(letters), chars))
        if key_split(key) == split:
            return key


def distinct_words(rng: np.random.Generator, n: int, chars: int, split: Split) -> list[str]:
    """``n`` different random words (keys or tags): a repeated one would make a query ambiguous."""
    words: list[str] = []
    while len(words) < n:
        w = draw_word(rng, chars, split)
        if w not in words:
            words.append(w)
    return words


def random_tags(rng: np.random.Generator, alphabet: np.ndarray, n: int, length: int, split: Split) -> list[np.ndarray]:
    """``n`` different random token strings from ``split``'s half of the key space."""
    tags: list[np.ndarray] = []
    while len(tags) < n:
        tag = alphabet[rng.integers(0, len(alphabet), length)]
        if key_split(token_key(tag)) == split and not any(np.array_equal(tag, t) for t in tags):
            tags.append(tag)
    return tags


def distinct_numbers(rng: np.random.Generator, n: int, digits: int, split: Split) -> list[str]:
    """``n`` different numbers from ``split``'s half: a repeated value would make an answer ambiguous."""
    numbers: list[str] = []
    while len(numbers) < n:
        v = draw_number(rng, digits, split)
        if v not in numbers:
            numbers.append(v)
    return numbers


def token_key(tokens: np.ndarray) -> str:
    """A token string as a key (what the split hash and the disjointness checks see)."""
    return "tokens:" + ",".join(map(str, tokens.tolist()))


def needle_depths(
    rng: np.random.Generator, num_needles: int, num_queries: int, depth: float | None
) -> tuple[list[float], list[int]]:
    """Uniform depths for the needles and which of them are asked; with ``depth`` given,
    the first asked needle goes there (the needle grid's cell)."""
    depths = [float(d) for d in rng.random(num_needles)]
    asked = [int(j) for j in rng.permutation(num_needles)[:num_queries]]
    if depth is not None:
        depths[asked[0]] = depth
    return depths, asked


# -- haystack and placement ------------------------------------------------------------


class Haystack:
    """Filler: random slices of a packed token stream with document specials removed.

    BOS/EOS are dropped so that a needle and its question are never separated by a
    document boundary (the model learns to disregard what precedes a BOS).
    """

    def __init__(self, tokens: np.ndarray, special_ids: Sequence[int], vocab_size: int):
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError(f"haystack tokens must be a non-empty 1-D array, got shape {tokens.shape}")
        self.tokens = tokens
        self.special_ids = np.asarray(sorted(set(special_ids)), dtype=np.int64)
        self.vocab_size = vocab_size

    @classmethod
    def of_stream(cls, tokens: np.ndarray, tokenizer: Tokenizer) -> Haystack:
        """A packed token stream as filler, without the tokenizer's BOS/EOS/PAD."""
        return cls(tokens, (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id), tokenizer.vocab_size)

    @functools.cached_property
    def random_text(self) -> RandomText:
        """Uniformly random tokens over the tokenizer's non-special vocabulary.

        The same alphabet in every split: one taken from each split's own text gave the
        evaluation tokens training never showed (a byte in the validation files only),
        and a model that copies every trained token perfectly scored 0.89 on the copies.
        """
        alphabet = np.arange(self.vocab_size, dtype=np.int64)
        return RandomText(alphabet[~np.isin(alphabet, self.special_ids)])

    def take(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` consecutive non-special tokens from a random offset (wrapping at the end)."""
        start = int(rng.integers(0, len(self.tokens)))
        span = n + 64
        while True:
            window = np.take(self.tokens, np.arange(start, start + span), mode="wrap").astype(np.int64)
            window = window[~np.isin(window, self.special_ids)]
            if len(window) >= n:
                return window[:n]
            if span > 2 * len(self.tokens) + n:
                raise ValueError(f"the haystack stream has fewer than {n} non-special tokens")
            span *= 2


class RandomText:
    """Filler of uniformly random tokens: a haystack in which nothing is predictable."""

    def __init__(self, alphabet: np.ndarray):
        if len(alphabet) < 2:
            raise ValueError(f"random text needs at least 2 distinct tokens, got {len(alphabet)}")
        self.alphabet = alphabet

    def take(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.alphabet[rng.integers(0, len(self.alphabet), n)]


def build_haystack(cfg: Config, tokenizer: Tokenizer, split: Split) -> Haystack:
    """The haystack of one split: its prepared documents as packed for training."""
    return Haystack.of_stream(open_prepared(cfg).stream(split).haystack_tokens(), tokenizer)


def depth_index(depth: float, haystack_len: int) -> int:
    """The haystack token a needle at ``depth`` goes before: round(depth·len), halves up."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return math.floor(depth * haystack_len + 0.5)


def place_needles(
    haystack: np.ndarray, needles: Sequence[np.ndarray], depths: Sequence[float]
) -> tuple[np.ndarray, list[int]]:
    """Insert each needle before haystack token ``depth_index(depth, len(haystack))``.

    Depth 0 puts a needle first, depth 1 after the last haystack token; needles at the
    same point keep their order. Returns the combined tokens and each needle's start.
    """
    if len(needles) != len(depths):
        raise ValueError(f"{len(needles)} needles but {len(depths)} depths")
    cuts = [depth_index(d, len(haystack)) for d in depths]
    order = sorted(range(len(needles)), key=lambda j: (cuts[j], j))
    pieces, starts, prev, inserted = [], [0] * len(needles), 0, 0
    for j in order:
        pieces += (haystack[prev : cuts[j]], needles[j])
        starts[j] = cuts[j] + inserted
        inserted += len(needles[j])
        prev = cuts[j]
    pieces.append(haystack[prev:])
    return np.concatenate(pieces).astype(np.int64, copy=False), starts


def place_needle(haystack: np.ndarray, needle: np.ndarray, depth: float) -> tuple[np.ndarray, int]:
    """One needle at ``depth``: (combined tokens, needle start)."""
    tokens, (start,) = place_needles(haystack, [needle], [depth])
    return tokens, start


# -- samples ---------------------------------------------------------------------------


@dataclass
class RetrievalSample:
    """A sample as seq_len + 1 tokens: inputs are ``tokens[:-1]``, labels ``tokens[1:]``.

    Positions are indices into ``tokens``, which equal input positions. The answer to
    query q occupies ``tokens[a:b]`` for ``(a, b) = answer_spans[q]``, so it is predicted
    at input positions ``a-1 .. b-2``; the last answer ends the sample.
    """

    kind: str
    tokens: np.ndarray  # int64 [seq_len + 1]
    loss_mask: np.ndarray  # bool [seq_len + 1]: tokens that are labels (index 0 never is)
    needle_starts: list[int]
    needle_lengths: list[int]
    answer_spans: list[tuple[int, int]]
    keys: list[str]  # every key and value the sample contains

    def tensors(self) -> dict[str, torch.Tensor]:
        """The PackedDataset sample format; one document, positions from 0."""
        seq_len = len(self.tokens) - 1
        labels = np.where(self.loss_mask[1:], self.tokens[1:], IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(self.tokens[:-1].copy()),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.arange(seq_len, dtype=torch.long),
            "doc_ids": torch.zeros(seq_len, dtype=torch.long),
        }


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def assemble(
    kind: str,
    tokenizer: Tokenizer,
    haystack: Haystack | RandomText,
    rng: np.random.Generator,
    seq_len: int,
    intro: np.ndarray,
    needles: Sequence[np.ndarray],
    depths: Sequence[float],
    questions: Sequence[tuple[np.ndarray, np.ndarray]],
    loss: str,
    keys: list[str],
) -> RetrievalSample:
    """BOS, intro, haystack with needles, then each question followed by its answer.

    The haystack takes whatever length is left, so the sample is exactly seq_len + 1
    tokens and its last answer ends it.
    """
    if loss not in LOSS_MODES:
        raise ValueError(f"loss must be one of {LOSS_MODES}, got {loss!r}")
    head = np.concatenate([[tokenizer.bos_id], intro]).astype(np.int64)
    tail, answer_offsets = [], []  # offsets within the tail
    for q, (question, answer) in enumerate(questions):
        if q:
            tail.append(_encode(tokenizer, ANSWER_END))
        tail.append(question)
        start = sum(map(len, tail))
        tail.append(answer)
        answer_offsets.append((start, start + len(answer)))
    tail_ids = np.concatenate(tail).astype(np.int64)
    n_hay = seq_len + 1 - len(head) - sum(map(len, needles)) - len(tail_ids)
    if n_hay < 0:
        raise ValueError(f"seq_len={seq_len} is {-n_hay} tokens too short for this {kind} sample")
    body, starts = place_needles(haystack.take(rng, n_hay), needles, depths)
    tokens = np.concatenate([head, body, tail_ids])
    tail_start = len(head) + len(body)
    spans = [(tail_start + a, tail_start + b) for a, b in answer_offsets]
    if loss == "all":
        mask = np.ones(len(tokens), dtype=bool)
        mask[0] = False
    else:
        mask = np.zeros(len(tokens), dtype=bool)
        for a, b in spans:
            mask[a:b] = True
    return RetrievalSample(
        kind=kind,
        tokens=tokens,
        loss_mask=mask,
        needle_starts=[len(head) + s for s in starts],
        needle_lengths=[len(n) for n in needles],
        answer_spans=spans,
        keys=keys,
    )


def passkey_sample(
    tokenizer: Tokenizer,
    haystack: Haystack,
    rng: np.random.Generator,
    seq_len: int,
    split: Split,
    depth: float | None = None,
    digits: int = 5,
    loss: str = "answer",
) -> RetrievalSample:
    """One pass key at ``depth`` (uniform if None), asked for at the end."""
    key = draw_number(rng, digits, split)
    depth = float(rng.random()) if depth is None else depth
    enc = functools.partial(_encode, tokenizer)
    return assemble(
        "passkey", tokenizer, haystack, rng, seq_len, enc(PASSKEY_INTRO),
        [enc(PASSKEY_NEEDLE.format(key=key))], [depth], [(enc(PASSKEY_QUESTION), enc(key))], loss, [key],
    )


def kv_sample(
    tokenizer: Tokenizer,
    haystack: Haystack,
    rng: np.random.Generator,
    seq_len: int,
    split: Split,
    num_pairs: int = 4,
    num_queries: int = 1,
    depth: float | None = None,
    key_chars: int = 6,
    value_digits: int = 5,
    loss: str = "answer",
    one_question: bool = False,
    kind: str = "kv",
) -> RetrievalSample:
    """``num_pairs`` key–value needles at uniform depths; ``num_queries`` of them asked,
    each in its own question, or with ``one_question`` all in one (RULER multiquery),
    answered as the list of their values.

    With ``depth`` given, the first queried pair is placed there (the needle grid's cell)
    and the others stay uniform.
    """
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"need 1 <= num_queries <= num_pairs, got {num_queries} and {num_pairs}")
    keys = distinct_words(rng, num_pairs, key_chars, split)
    values = distinct_numbers(rng, num_pairs, value_digits, split)
    depths, asked = needle_depths(rng, num_pairs, num_queries, depth)
    enc = functools.partial(_encode, tokenizer)
    if one_question:
        names = ANSWER_SEP.join(keys[j] for j in asked)
        questions = [(enc(MULTIQUERY_QUESTION.format(keys=names)), enc(ANSWER_SEP.join(values[j] for j in asked)))]
    else:
        questions = [(enc(KV_QUESTION.format(key=keys[j])), enc(values[j])) for j in asked]
    return assemble(
        kind, tokenizer, haystack, rng, seq_len, enc(KV_INTRO),
        [enc(KV_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)], depths, questions, loss, keys + values,
    )


def in_text_order(rng: np.random.Generator, n: int, depth: float | None, low: float = 0.0) -> list[float]:
    """``n`` ascending depths in [low, 1], the first at ``depth`` when given (a grid cell):
    needle j then precedes needle j+1 in the text (place_needles keeps index order on ties)."""
    if depth is None:
        return sorted(float(d) for d in low + (1 - low) * rng.random(n))
    return [depth] + sorted(float(d) for d in depth + (1 - depth) * rng.random(n - 1))


def multivalue_sample(
    tokenizer: Tokenizer,
    haystack: Haystack,
    rng: np.random.Generator,
    seq_len: int,
    split: Split,
    num_values: int = 4,
    depth: float | None = None,
    key_chars: int = 6,
    value_digits: int = 5,
    loss: str = "answer",
) -> RetrievalSample:
    """One key stated with ``num_values`` values in as many needles; the answer is every
    value, in the order they appear (the first needle at ``depth`` when given)."""
    (key,) = distinct_words(rng, 1, key_chars, split)
    values = distinct_numbers(rng, num_values, value_digits, split)
    enc = functools.partial(_encode, tokenizer)
    return assemble(
        "multivalue", tokenizer, haystack, rng, seq_len, enc(MULTIVALUE_INTRO),
        [enc(MULTIVALUE_NEEDLE.format(key=key, value=v)) for v in values], in_text_order(rng, num_values, depth),
        [(enc(MULTIVALUE_QUESTION.format(key=key)), enc(ANSWER_SEP.join(values)))], loss, [key, *values],
    )


def vartrack_sample(
    tokenizer: Tokenizer,
    haystack: Haystack,
    rng: np.random.Generator,
    seq_len: int,
    split: Split,
    num_chains: int = 1,
    num_hops: int = 4,
    depth: float | None = None,
    name_chars: int = 5,
    value_digits: int = 5,
    loss: str = "answer",
) -> RetrievalSample:
    """``num_chains`` chains ``VAR a = 12345``, ``VAR b = VAR a``, … of ``num_hops``
    assignments after the first, each chain in text order; the first chain's value is
    asked, the others are distractors. The answer is every name of the asked chain, in
    assignment order. With ``depth`` given, the asked chain starts there."""
    names = distinct_words(rng, num_chains * (num_hops + 1), name_chars, split)
    values = distinct_numbers(rng, num_chains, value_digits, split)
    enc = functools.partial(_encode, tokenizer)
    needles, depths = [], []
    for c, value in enumerate(values):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        needles.append(enc(VARTRACK_VALUE.format(name=chain[0], value=value)))
        needles += [enc(VARTRACK_ASSIGN.format(name=b, source=a)) for a, b in zip(chain, chain[1:])]
        depths += in_text_order(rng, num_hops + 1, depth if c == 0 else None)
    asked = names[: num_hops + 1]
    return assemble(
        "vartrack", tokenizer, haystack, rng, seq_len, enc(VARTRACK_INTRO), needles, depths,
        [(enc(VARTRACK_QUESTION.format(value=values[0])), enc(ANSWER_SEP.join(asked)))], loss, names + values,
    )


def cwe_sample(
    tokenizer: Tokenizer,
    haystack: Haystack,
    rng: np.random.Generator,
    seq_len: int,
    split: Split,
    num_common: int = 3,
    word_chars: int = 6,
    loss: str = "answer",
) -> RetrievalSample:
    """Common-word extraction: a shuffled list of words that fills the sample, ``num_common``
    of them up to 30 times each (half the list, at least CWE_RARE + 1 times), every other
    word CWE_RARE times; the answer is the common words in order of first appearance.

    There is no needle, so no depth; what the list leaves over (less than a word's
    entries) is haystack text before it.
    """
    enc = functools.partial(_encode, tokenizer)
    common = distinct_words(rng, num_common, word_chars, split)
    intro, question = enc(CWE_INTRO), enc(CWE_QUESTION.format(n=num_common))
    # The list's first appearances are renamed below to the order the answer states.
    answer = enc(ANSWER_SEP.join(common))
    budget = seq_len - len(intro) - len(question) - len(answer)  # seq_len + 1 tokens minus BOS
    entry = [len(enc(" " + w)) for w in common]
    times = min(CWE_MAX_COMMON, budget // (2 * sum(entry)))
    if times <= CWE_RARE:
        raise ValueError(f"seq_len={seq_len} is too short for a cwe sample of {num_common} common words")
    budget -= times * sum(entry)
    words, slots = list(common), [j for j in range(num_common) for _ in range(times)]
    while True:  # rare words while CWE_RARE more entries of one fit
        w = draw_word(rng, word_chars, split)
        cost = CWE_RARE * len(enc(" " + w))
        if w in words:
            continue
        if cost > budget:
            break
        budget -= cost
        slots += [len(words)] * CWE_RARE
        words.append(w)
    order = rng.permutation(len(slots))
    slots = [slots[i] for i in order]
    first_seen = list(dict.fromkeys(j for j in slots if j < num_common))
    rename = {j: common[k] for k, j in enumerate(first_seen)}
    listing = np.concatenate([enc(" " + (rename[j] if j < num_common else words[j])) for j in slots])
    return assemble(
        "cwe", tokenizer, haystack, rng, seq_len, intro, [listing], [1.0], [(question, answer)], loss, words,
    )


def copy_sample(
    tokenizer: Tokenizer,
    haystack: Haystack,
    rng: np.random.Generator,
    seq_len: int,
    split: Split,
    num_segments: int = 2,
    segment_len: int = 48,
    num_queries: int = 2,
    depth: float | None = None,
    key_chars: int = 6,
    loss: str = "answer",
    random_text: bool = False,
) -> RetrievalSample:
    """Segments of haystack text, each tagged ``[key]``, hidden at uniform depths; the
    queries repeat a tag and the answer is the whole segment.

    Every answer token is predictable only by copying, so each query gives
    ``segment_len`` tokens of induction signal where a pass key gives a handful. With
    ``random_text`` (the ``induction`` kind) the haystack, the segments and the tags
    (``key_chars`` tokens) are uniformly random tokens instead.
    """
    if not 1 <= num_queries <= num_segments:
        raise ValueError(f"need 1 <= num_queries <= num_segments, got {num_queries} and {num_segments}")
    if random_text:
        filler: Haystack | RandomText = haystack.random_text
        tags = random_tags(rng, filler.alphabet, num_segments, key_chars, split)
        keys = [token_key(t) for t in tags]
    else:
        filler = haystack
        keys = distinct_words(rng, num_segments, key_chars, split)
        tags = [_encode(tokenizer, COPY_NEEDLE.format(key=k)) for k in keys]
    segments = [filler.take(rng, segment_len) for _ in keys]
    depths, asked = needle_depths(rng, num_segments, num_queries, depth)
    return assemble(
        "induction" if random_text else "copy", tokenizer, filler, rng, seq_len, np.zeros(0, dtype=np.int64),
        [np.concatenate([t, s]) for t, s in zip(tags, segments)], depths,
        [(tags[j], segments[j]) for j in asked], loss, keys,
    )


def retrieval_sample(
    cfg: RetrievalConfig,
    tokenizer: Tokenizer,
    haystack: Haystack,
    rng: np.random.Generator,
    seq_len: int,
    split: Split,
    kind: str,
    depth: float | None = None,
) -> RetrievalSample:
    """A sample of ``kind`` with the task sizes of ``cfg``."""
    if kind == "passkey":
        return passkey_sample(tokenizer, haystack, rng, seq_len, split, depth, cfg.key_digits, cfg.loss)
    if kind == "kv":
        return kv_sample(
            tokenizer, haystack, rng, seq_len, split, cfg.kv_pairs, cfg.kv_queries, depth,
            cfg.kv_key_chars, cfg.key_digits, cfg.loss,
        )
    if kind in ("multikey", "multiquery"):
        return kv_sample(
            tokenizer, haystack, rng, seq_len, split, cfg.kv_pairs, 1 if kind == "multikey" else cfg.multi_queries,
            depth, cfg.kv_key_chars, cfg.key_digits, cfg.loss, one_question=kind == "multiquery", kind=kind,
        )
    if kind == "multivalue":
        return multivalue_sample(
            tokenizer, haystack, rng, seq_len, split, cfg.multi_values, depth, cfg.kv_key_chars, cfg.key_digits, cfg.loss
        )
    if kind == "vartrack":
        return vartrack_sample(
            tokenizer, haystack, rng, seq_len, split, cfg.vartrack_chains, cfg.vartrack_hops, depth,
            cfg.kv_key_chars, cfg.key_digits, cfg.loss,
        )
    if kind == "cwe":  # no needle: depth has no meaning
        return cwe_sample(tokenizer, haystack, rng, seq_len, split, cfg.cwe_words, cfg.kv_key_chars, cfg.loss)
    if kind in ("copy", "induction"):
        return copy_sample(
            tokenizer, haystack, rng, seq_len, split, cfg.copy_segments, cfg.copy_segment_len,
            cfg.copy_queries, depth, cfg.kv_key_chars, cfg.loss, random_text=kind == "induction",
        )
    raise ValueError(f"unknown retrieval kind {kind!r}; valid: {', '.join(RETRIEVAL_KINDS)}")


class RetrievalDataset:
    """Infinite synthetic samples; sample ``i`` is a pure function of (seed, split, i).

    Kinds rotate with the index (``cfg.kinds[i % len]``), so any run of consecutive
    samples holds them in equal shares.
    """

    def __init__(self, cfg: RetrievalConfig, tokenizer: Tokenizer, haystack: Haystack, seq_len: int, seed: int, split: Split):
        check_retrieval_kinds(cfg.kinds)
        self.cfg, self.tokenizer, self.haystack = cfg, tokenizer, haystack
        self.seq_len, self.seed, self.split = seq_len, seed, split

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], i])

    def retrieval_sample(self, i: int) -> RetrievalSample:
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        kind = self.cfg.kinds[i % len(self.cfg.kinds)]
        return retrieval_sample(self.cfg, self.tokenizer, self.haystack, self.rng(i), self.seq_len, self.split, kind)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return self.retrieval_sample(i).tensors()
