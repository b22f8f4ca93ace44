"""Synthetic retrieval samples: exact needle placement, sample layout, disjoint train/eval keys and text."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from longtrain.config import Config, DataConfig, RetrievalConfig
from longtrain.data.retrieval import (
    KV_NEEDLE,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    Haystack,
    RetrievalDataset,
    build_haystack,
    copy_sample,
    depth_index,
    draw_number,
    draw_word,
    key_split,
    kv_sample,
    passkey_sample,
    place_needle,
    place_needles,
)
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.optim.loss import IGNORE_INDEX

TOK = ByteTokenizer()
SPECIALS = (TOK.bos_id, TOK.eos_id, TOK.pad_id)


def text_haystack(text: str = "def f(x):\n    return x + 1\n", docs: int = 200) -> Haystack:
    """A packed-looking stream: BOS doc EOS, repeated."""
    doc = [TOK.bos_id, *TOK.encode(text), TOK.eos_id]
    return Haystack(np.asarray(doc * docs, dtype=np.uint16), SPECIALS, TOK.vocab_size)


# --- placement ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 100, 1001])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_place_needle_exact_position(length, depth):
    haystack = np.arange(length, dtype=np.int64)
    needle = np.array([-1, -2, -3])
    tokens, start = place_needle(haystack, needle, depth)
    expected = {0.0: 0, 0.5: (length + 1) // 2, 1.0: length}[depth]  # round half up
    assert start == expected
    assert len(tokens) == length + 3
    assert tokens[start : start + 3].tolist() == [-1, -2, -3]
    # The haystack is intact around the needle, in order.
    assert np.concatenate([tokens[:start], tokens[start + 3 :]]).tolist() == haystack.tolist()


def test_depth_index_rounds_half_up_and_rejects_out_of_range():
    assert [depth_index(d, 10) for d in (0.0, 0.04, 0.05, 0.25, 0.99, 1.0)] == [0, 0, 1, 3, 10, 10]
    with pytest.raises(ValueError, match="depth"):
        depth_index(1.5, 10)


def test_place_needles_reports_each_start():
    haystack = np.zeros(10, dtype=np.int64)
    needles = [np.array([1, 1]), np.array([2]), np.array([3, 3, 3])]
    tokens, starts = place_needles(haystack, needles, [1.0, 0.2, 0.2])
    # Cuts at 10, 2, 2: needle 1 then needle 2 before haystack token 2, needle 0 at the end.
    assert starts == [14, 2, 3]
    for needle, start in zip(needles, starts):
        assert tokens[start : start + len(needle)].tolist() == needle.tolist()
    assert (tokens == 0).sum() == 10 and len(tokens) == 16


# --- samples --------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [300, 512, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_sample_layout(seq_len, depth):
    rng = np.random.default_rng(0)
    s = passkey_sample(TOK, text_haystack(), rng, seq_len, "val", depth=depth)
    key = s.keys[0]
    needle = TOK.encode(PASSKEY_NEEDLE.format(key=key))
    question = TOK.encode(PASSKEY_QUESTION)
    head = 1 + len(TOK.encode(PASSKEY_INTRO))
    n_hay = seq_len + 1 - head - len(needle) - len(question) - len(key)
    # Exact position: the needle goes before haystack token round(depth·n_hay).
    assert s.needle_starts == [head + depth_index(depth, n_hay)]
    start = s.needle_starts[0]
    assert s.tokens[start : start + len(needle)].tolist() == needle
    assert len(s.tokens) == seq_len + 1 and s.tokens[0] == TOK.bos_id
    assert s.answer_spans == [(seq_len + 1 - len(key), seq_len + 1)]
    assert TOK.decode(s.tokens[-len(key) - len(question) :]) == PASSKEY_QUESTION + key

    t = s.tensors()
    assert set(t) == {"input_ids", "labels", "position_ids", "doc_ids"}
    assert all(v.shape == (seq_len,) and v.dtype == torch.long for v in t.values())
    labelled = t["labels"] != IGNORE_INDEX
    # Loss only where the answer is predicted: the last len(key) positions.
    assert labelled.nonzero().squeeze(1).tolist() == list(range(seq_len - len(key), seq_len))
    assert TOK.decode(t["labels"][labelled]) == key
    assert torch.equal(t["input_ids"][1:], torch.from_numpy(s.tokens[1:-1]))


def test_kv_sample_queries_hidden_pairs():
    rng = np.random.default_rng(1)
    s = kv_sample(TOK, text_haystack(), rng, 700, "train", num_pairs=5, num_queries=3, depth=0.5)
    keys, values = s.keys[:5], s.keys[5:]
    assert len(set(keys)) == 5
    for k, v, start, n in zip(keys, values, s.needle_starts, s.needle_lengths):
        assert TOK.decode(s.tokens[start : start + n]) == KV_NEEDLE.format(key=k, value=v)
    answers = [TOK.decode(s.tokens[a:b]) for a, b in s.answer_spans]
    assert len(answers) == 3 and set(answers) <= set(values)
    for (a, _), ans in zip(s.answer_spans, answers):
        key = keys[values.index(ans)]
        assert TOK.decode(s.tokens[:a]).endswith(f"What is the value of {key}? The value of {key} is ")
    assert s.answer_spans[-1][1] == 701
    assert s.loss_mask.sum() == 15


def test_copy_sample_answers_are_hidden_segments():
    rng = np.random.default_rng(2)
    hay = text_haystack("abcdefghijklmnopqrstuvwxyz0123456789")
    s = copy_sample(TOK, hay, rng, 400, "train", num_segments=3, segment_len=20, num_queries=2)
    segments = [s.tokens[st + n - 20 : st + n].tolist() for st, n in zip(s.needle_starts, s.needle_lengths)]
    for a, b in s.answer_spans:
        assert b - a == 20 and s.tokens[a:b].tolist() in segments


def test_random_text_alphabet_is_the_same_in_every_split():
    """Two splits' texts with different byte sets draw random tokens from one alphabet, so
    an evaluation never asks to copy a token that training never showed."""
    train, val = text_haystack("abc def"), text_haystack("xyz \u00e9")
    assert np.array_equal(train.random_text.alphabet, val.random_text.alphabet)


def test_induction_sample_is_random_tokens_with_tagged_copies():
    hay = text_haystack("abcdefghijklmnopqrstuvwxyz0123456789")
    s = copy_sample(TOK, hay, np.random.default_rng(3), 128, "train", num_segments=3, segment_len=12,
                    num_queries=3, depth=0.5, key_chars=4, random_text=True)
    assert s.kind == "induction" and len(s.tokens) == 129 and s.loss_mask.sum() == 36
    alphabet = set(hay.random_text.alphabet.tolist())
    assert alphabet == set(range(TOK.vocab_size)) - set(SPECIALS)  # the whole vocabulary, specials excluded
    assert set(s.tokens[1:].tolist()) <= alphabet
    needles = [s.tokens[st : st + n].tolist() for st, n in zip(s.needle_starts, s.needle_lengths)]
    for (a, b), key in zip(s.answer_spans, s.keys):
        tag, answer = s.tokens[a - 4 : a].tolist(), s.tokens[a:b].tolist()
        assert tag + answer in needles and key_split(key) == "train"  # the query repeats a needle's tag
    # the first asked needle sits at the requested depth of the 33 filler tokens
    asked = needles.index(s.tokens[s.answer_spans[0][0] - 4 : s.answer_spans[0][1]].tolist())
    filler_before = s.needle_starts[asked] - 1 - sum(n for st, n in zip(s.needle_starts, s.needle_lengths)
                                                     if st < s.needle_starts[asked])
    assert filler_before == depth_index(0.5, 128 + 1 - 1 - 3 * 16 - 3 * 16 - 2)


def test_all_loss_labels_every_token():
    s = passkey_sample(TOK, text_haystack(), np.random.default_rng(0), 400, "train", loss="all")
    t = s.tensors()
    assert torch.equal(t["labels"], torch.from_numpy(s.tokens[1:]))


def test_too_short_and_bad_kinds_fail_clearly():
    with pytest.raises(ValueError, match="too short"):
        passkey_sample(TOK, text_haystack(), np.random.default_rng(0), 100, "train")
    with pytest.raises(ValueError, match="kinds"):
        RetrievalDataset(RetrievalConfig(kinds=["nope"]), TOK, text_haystack(), 512, 0, "train")


def test_haystack_drops_specials_and_wraps():
    hay = text_haystack("xy", docs=3)  # 12 tokens, 6 of them specials
    out = hay.take(np.random.default_rng(0), 50)
    assert len(out) == 50 and set(out.tolist()) == {ord("x"), ord("y")}


def test_dataset_is_a_pure_function_of_seed_and_index():
    cfg = RetrievalConfig(kinds=["passkey", "kv", "copy"])
    a = RetrievalDataset(cfg, TOK, text_haystack(), 600, seed=3, split="train")
    b = RetrievalDataset(cfg, TOK, text_haystack(), 600, seed=3, split="train")
    for i in (5, 0, 17):  # any order
        sa, sb = a.sample(i), b.sample(i)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [a.retrieval_sample(i).kind for i in range(4)] == ["passkey", "kv", "copy", "passkey"]
    assert not torch.equal(a.sample(0)["input_ids"], a.sample(3)["input_ids"])


# --- train / eval disjointness --------------------------------------------------------


def test_key_spaces_are_disjoint():
    rng = np.random.default_rng(0)
    for draw in (lambda s: draw_number(rng, 5, s), lambda s: draw_word(rng, 6, s)):
        train = {draw("train") for _ in range(500)}
        val = {draw("val") for _ in range(500)}
        assert not train & val
        assert all(key_split(k) == "train" for k in train) and all(key_split(k) == "val" for k in val)


def test_train_and_eval_samples_share_no_keys():
    cfg = RetrievalConfig(kinds=["passkey", "kv", "copy", "induction"])
    hay = text_haystack()
    train = RetrievalDataset(cfg, TOK, hay, 600, seed=0, split="train")
    val = RetrievalDataset(cfg, TOK, hay, 600, seed=0, split="val")
    train_keys = {k for i in range(60) for k in train.retrieval_sample(i).keys}
    val_keys = {k for i in range(60) for k in val.retrieval_sample(i).keys}
    assert train_keys and val_keys and not train_keys & val_keys


@pytest.fixture
def local_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(60):
        (folder / f"doc{i:02d}.txt").write_text(f"<document {i:02d}> " * 30)
    return Config(data=DataConfig(source="local", path=str(folder / "*.txt"), val_percent=20.0, prepared=str(tmp_path / "prepared")))


def test_eval_haystack_comes_from_validation_documents(local_corpus):
    train_hay = build_haystack(local_corpus, TOK, "train")
    val_hay = build_haystack(local_corpus, TOK, "val")

    def doc_numbers(hay: Haystack) -> set[str]:
        text = TOK.decode(hay.tokens)
        return {text[j + 10 : j + 12] for j in range(len(text)) if text.startswith("<document ", j)}

    train_docs, val_docs = doc_numbers(train_hay), doc_numbers(val_hay)
    assert train_docs and val_docs and not train_docs & val_docs
    s = passkey_sample(TOK, val_hay, np.random.default_rng(0), 600, "val")
    sample_docs = {TOK.decode(s.tokens)[j + 10 : j + 12] for j in range(600) if TOK.decode(s.tokens).startswith("<document ", j)}
    assert sample_docs and sample_docs <= val_docs
