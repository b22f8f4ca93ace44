"""Data layer: tokenizers, sources, packing and the stateful loader. Offline, a few seconds."""

from __future__ import annotations


import datasets
import numpy as np
import pytest
import torch

from longtrain.config import Config, DataConfig, TokenizerConfig
from longtrain.data.loader import StatefulLoader
from longtrain.data.packing import PackedDataset, document_positions, packed_dataset
from longtrain.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from longtrain.data.prepare import prepare
from longtrain.data.shards import open_prepared
from longtrain.data.sources import in_val_split

# Its module-scoped fixture is built once: every test of the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("data")


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
def stdlib():
    return open_prepared(Config())  # the default data, prepared once under data/ and reused


def test_stdlib_source(stdlib):
    splits = stdlib.manifest["splits"]
    sources = (stdlib.folder / "sources.txt").read_text().split()
    assert splits["train"]["documents"] > 1000 and splits["val"]["documents"] > 20
    assert not any("site-packages" in name for name in sources)
    assert "pydoc_data/topics.py" in sources
    assert int(stdlib.stream("train").doc_lengths.max()) > 100_000  # long documents for long-context stages


def test_stdlib_split_is_by_path_hash(stdlib):
    sources = (stdlib.folder / "sources.txt").read_text().split()
    for split in ("train", "val"):
        for shard in stdlib.manifest["splits"][split]["shards"]:
            index = np.load(stdlib.folder / split / shard["file"].replace(".bin", ".idx.npy"))
            assert all(in_val_split(sources[i], 5.0) == (split == "val") for i in index["source"])


def test_max_docs_caps_documents(tmp_path):
    manifest = prepare(DataConfig(source="stdlib_code", max_docs=40), TokenizerConfig(), tmp_path, progress=False)
    assert sum(s["documents"] for s in manifest["splits"].values()) == 40


# --- packing ------------------------------------------------------------------------


def pack(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_starts) of BOS text EOS ... as prepared shards hold them."""
    tok = ByteTokenizer()
    docs = [np.array([tok.bos_id, *tok.encode(t), tok.eos_id], dtype=np.uint16) for t in texts]
    return np.concatenate(docs), np.cumsum([0] + [len(d) for d in docs[:-1]])


def test_packed_samples_shift_positions_and_doc_ids():
    tok = ByteTokenizer()
    tokens, doc_starts = pack([f"document number {i} " * (i + 1) for i in range(30)])
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
    tokens, doc_starts = pack([f"doc {i} " * (i % 7 + 1) for i in range(40)])
    ds = PackedDataset(tokens, doc_starts, 64, seed=0, reset_positions=True)
    for i in range(len(ds)):
        s = ds.sample(i)
        pos, is_bos = s["position_ids"], s["input_ids"] == tok.bos_id
        assert pos.dtype == torch.long and pos[0] == 0
        # 0 exactly at each BOS (after the window's first token), +1 everywhere else.
        assert torch.equal(pos[1:] == 0, is_bos[1:])
        assert (pos[1:][~is_bos[1:]] == pos[:-1][~is_bos[1:]] + 1).all()
    assert document_positions(torch.tensor([0, 0, 1, 2, 2, 2, 5])).tolist() == [0, 1, 0, 0, 1, 2, 0]


def test_packed_dataset_is_deterministic_across_builds(stdlib):
    a = packed_dataset(stdlib.stream("train"), 256, DataConfig())
    b = packed_dataset(open_prepared(Config()).stream("train"), 256, DataConfig())
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
