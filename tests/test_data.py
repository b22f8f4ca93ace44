"""Data layer: tokenizers, sources, packing and the stateful loader. Offline, a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from longtrain.config import DataConfig, TokenizerConfig
from longtrain.data.packing import document_positions
from longtrain.data import (
    ByteTokenizer,
    HFTokenizer,
    PackedDataset,
    StatefulLoader,
    build_packed_dataset,
    build_tokenizer,
    load_documents,
    pack_documents,
)


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    # datasets' builders cache Arrow files; keep them out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# --- tokenizers ---------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer(TokenizerConfig(type="byte"))
    assert isinstance(tok, ByteTokenizer)
    text = "def f(x):\n    return 'héllo wörld ✓ 日本語 🐍'\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode_batch([text])[0].tolist() == ids
    # Specials are skipped, and tensors decode like lists.
    wrapped = [tok.bos_id, *ids, tok.eos_id, tok.pad_id]
    assert tok.decode(torch.tensor(wrapped)) == text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    # A window can cut a multi-byte character; decoding must not raise.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_hf_tokenizer_from_local_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path)

    tok = build_tokenizer(TokenizerConfig(type="hf", path=str(tmp_path)))
    assert isinstance(tok, HFTokenizer)
    # No BOS or PAD in this tokenizer: both fall back to EOS.
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (4, 3, 3, 3)
    assert tok.encode("hello world") == [1, 2]
    assert [a.tolist() for a in tok.encode_batch(["hello", "world hello"])] == [[1], [2, 1]]
    assert tok.decode([1, 3, 2]) == "hello world"


# --- sources ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_splits():
    cfg = DataConfig(source="stdlib_code")
    return load_documents(cfg, "train"), load_documents(cfg, "val")


def test_stdlib_source(stdlib_splits):
    train, val = stdlib_splits
    ids, texts = list(train["id"]) + list(val["id"]), list(train["text"]) + list(val["text"])
    assert len(train) > 1000 and len(val) > 20
    assert set(train["id"]).isdisjoint(val["id"])
    assert not any("site-packages" in i for i in ids)
    assert "pydoc_data/topics.py" in ids
    sizes = [len(t.encode("utf-8")) for t in texts]
    assert sum(s > 100_000 for s in sizes) >= 1  # long documents for long-context stages


def test_stdlib_split_is_stable(stdlib_splits):
    _, val = stdlib_splits
    again = load_documents(DataConfig(source="stdlib_code", seed=7), "val")  # the seed must not matter
    assert list(again["id"]) == list(val["id"]) and list(again["text"]) == list(val["text"])


def test_max_docs_caps_documents():
    docs = load_documents(DataConfig(source="stdlib_code", max_docs=10), "train")
    assert len(docs) == 10


def _write_corpus(root: Path) -> list[str]:
    """Two .txt files (one nested), a .jsonl and a .parquet; returns every document's text."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document\nsecond line\n\nsame document\n")
    (root / "sub" / "b.txt").write_text("nested ✓ document\n")
    rows = [{"body": f"json row {i}", "other": i} for i in range(6)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_dict({"body": [f"parquet row {i}" for i in range(6)]}).to_parquet(str(root / "t.parquet"))
    (root / "ignored.csv").write_text("body\nnot a document\n")
    texts = ["first document\nsecond line\n\nsame document\n", "nested ✓ document\n"]
    return texts + [r["body"] for r in rows] + [f"parquet row {i}" for i in range(6)]


def test_local_glob_source(tmp_path):
    expected = _write_corpus(tmp_path / "corpus")
    cfg = DataConfig(source="local", path=str(tmp_path / "corpus" / "**" / "*"), text_field="body", val_percent=50)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "val")
    assert len(train) > 0 and len(val) > 0
    assert set(train["id"]).isdisjoint(val["id"])
    assert sorted(list(train["text"]) + list(val["text"])) == sorted(expected)
    assert {"a.txt", "sub/b.txt", "json:0", "parquet:5"} <= set(train["id"]) | set(val["id"])
    assert list(load_documents(cfg, "val")["id"]) == list(val["id"])


def test_local_source_rejects_missing_text_field(tmp_path):
    _write_corpus(tmp_path)
    cfg = DataConfig(source="local", path=str(tmp_path / "*.jsonl"), text_field="nope")
    with pytest.raises(ValueError, match="data.text_field"):
        load_documents(cfg, "train")


def test_hf_source_from_local_folder(tmp_path):
    with_val, train_only = tmp_path / "with_val", tmp_path / "train_only"
    for folder in (with_val, train_only):
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"train {i}"}) + "\n" for i in range(40)))
    (with_val / "validation.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")

    # A dataset's own validation split wins over the hash split.
    assert list(load_documents(DataConfig(source="hf", path=str(with_val)), "val")["text"]) == ["held out"]
    assert len(load_documents(DataConfig(source="hf", path=str(with_val), max_docs=5), "train")) == 5

    cfg = DataConfig(source="hf", path=str(train_only), val_percent=25)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "val")
    assert len(train) + len(val) == 40 and len(val) > 0
    assert set(train["text"]).isdisjoint(val["text"])


# --- packing ------------------------------------------------------------------------


def test_packed_samples_shift_positions_and_doc_ids():
    tok = ByteTokenizer()
    docs = datasets.Dataset.from_dict({"text": [f"document number {i} " * (i + 1) for i in range(30)]})
    tokens, doc_starts = pack_documents(docs, tok, seed=0)
    assert tokens.dtype == np.uint16 and len(doc_starts) == 30
    assert (tokens[doc_starts] == tok.bos_id).all()
    assert (tokens[np.append(doc_starts[1:], len(tokens)) - 1] == tok.eos_id).all()

    seq_len = 64
    ds = PackedDataset(tokens, doc_starts, seq_len, seed=0)
    assert len(ds) == (len(tokens) - 1) // seq_len
    for i in range(len(ds)):
        s = ds.sample(i)
        assert all(v.dtype == torch.long and v.shape == (seq_len,) for v in s.values())
        assert torch.equal(s["labels"][:-1], s["input_ids"][1:])
        assert torch.equal(s["position_ids"], torch.arange(seq_len))
        # doc_ids start at 0 and step by one exactly where a BOS starts the next document.
        is_bos = s["input_ids"] == tok.bos_id
        steps = torch.diff(s["doc_ids"], prepend=s["doc_ids"][:1])
        assert s["doc_ids"][0] == 0
        assert torch.equal(steps[1:], is_bos[1:].long())


def test_reset_positions_restart_at_each_document():
    tok = ByteTokenizer()
    docs = datasets.Dataset.from_dict({"text": [f"doc {i} " * (i % 7 + 1) for i in range(40)]})
    tokens, doc_starts = pack_documents(docs, tok, seed=0)
    ds = PackedDataset(tokens, doc_starts, 64, seed=0, reset_positions=True)
    for i in range(len(ds)):
        s = ds.sample(i)
        pos, is_bos = s["position_ids"], s["input_ids"] == tok.bos_id
        assert pos.dtype == torch.long and pos[0] == 0
        # 0 exactly at each BOS (after the window's first token), +1 everywhere else.
        assert torch.equal(pos[1:] == 0, is_bos[1:])
        assert (pos[1:][~is_bos[1:]] == pos[:-1][~is_bos[1:]] + 1).all()
    assert document_positions(torch.tensor([0, 0, 1, 2, 2, 2, 5])).tolist() == [0, 1, 0, 0, 1, 2, 0]


def test_packed_dataset_is_deterministic_across_builds():
    cfg = DataConfig(source="stdlib_code", max_docs=60)
    a = build_packed_dataset(cfg, ByteTokenizer(), "train", seq_len=256)
    b = build_packed_dataset(cfg, ByteTokenizer(), "train", seq_len=256)
    for i in (0, 1, 17, len(a) + 3):
        assert all(torch.equal(a.sample(i)[k], b.sample(i)[k]) for k in a.sample(i))


def _arange_dataset(n_tokens: int = 1001, seq_len: int = 10) -> PackedDataset:
    # Token value == stream offset, so a sample's first input id names its window.
    return PackedDataset(np.arange(n_tokens, dtype=np.int32), np.array([0, 5, 500]), seq_len, seed=3)


def test_epochs_cover_every_window_in_a_new_order():
    ds = _arange_dataset()
    n = len(ds)
    epoch0 = [int(ds.sample(i)["input_ids"][0]) for i in range(n)]
    epoch1 = [int(ds.sample(n + i)["input_ids"][0]) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, n * ds.seq_len, ds.seq_len))
    assert epoch0 != epoch1


def test_too_short_stream_is_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(np.arange(10), np.array([0]), seq_len=10, seed=0)


# --- loader -------------------------------------------------------------------------


def _ids(micro_batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(x) for mb in micro_batches for x in mb["input_ids"][:, 0]]


def test_loader_shards_one_global_stream():
    ds = _arange_dataset()
    single = StatefulLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    ranks = [StatefulLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        batch = single.next_batch()
        assert len(batch) == 4 and batch[0]["input_ids"].shape == (2, ds.seq_len)
        # Rank 0 holds the first half of the step's samples, rank 1 the second half.
        assert _ids(batch) == _ids(ranks[0].next_batch()) + _ids(ranks[1].next_batch())
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict() == {"samples_consumed": 24}


def test_loader_resumes_on_a_different_dp_size():
    ds = _arange_dataset()
    reference = StatefulLoader(ds, 8, 2, dp_rank=0, dp_size=1)
    expected = [_ids(reference.next_batch()) for _ in range(4)]

    before = StatefulLoader(ds, 8, 2, dp_rank=0, dp_size=1)
    before.next_batch(), before.next_batch()
    state = before.state_dict()
    resumed = [StatefulLoader(ds, 8, 4, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    for step in (2, 3):
        assert _ids(resumed[0].next_batch()) + _ids(resumed[1].next_batch()) == expected[step]


def test_loader_validates_batch_divisibility():
    ds = _arange_dataset()
    with pytest.raises(ValueError, match="global_batch_size=6 is not a multiple of micro_batch_size\\*dp_size"):
        StatefulLoader(ds, global_batch_size=6, micro_batch_size=2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        StatefulLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2)
