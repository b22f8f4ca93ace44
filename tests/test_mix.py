import numpy as np
import pytest
import torch

from longtrain.config import load_config
from longtrain.data.mix import MixedDataset, build_train_data, long_documents
from longtrain.data.tokenizer import ByteTokenizer


class Constant:
    def __init__(self, value: int):
        self.value = value

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([self.value, i])}


def test_mix_shares_and_purity():
    mix = MixedDataset([(Constant(0), 0.5), (Constant(1), 0.3), (Constant(2), 0.2)], seed=7)
    parts = np.array([mix.part_of(i) for i in range(20000)])
    assert np.bincount(parts, minlength=3) / len(parts) == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    again = MixedDataset([(Constant(0), 0.5), (Constant(1), 0.3), (Constant(2), 0.2)], seed=7)
    assert all(torch.equal(mix.sample(i)["input_ids"], again.sample(i)["input_ids"]) for i in range(50))
    assert mix.sample(123)["input_ids"][1] == 123  # each part is indexed by the global sample


def test_long_documents_keeps_only_long_ones():
    tokens = np.array([256, 1, 2, 257, 256, 3, 4, 5, 6, 257, 256, 7, 257], dtype=np.uint16)
    doc_starts = np.array([0, 4, 10])
    long_tokens, long_starts = long_documents(tokens, doc_starts, min_tokens=5)
    assert long_tokens.tolist() == [256, 3, 4, 5, 6, 257] and long_starts.tolist() == [0]
    with pytest.raises(ValueError, match="long_doc_share"):
        long_documents(tokens, doc_starts, min_tokens=100)


def test_stage_mix_contains_long_docs_and_retrieval(compose_config):
    cfg = load_config(compose_config(
        "preset=cpu_demo", "stage=cpu/extend_2k", "data.max_docs=200",
        "stage.long_doc_share=0.3", "stage.retrieval_share=0.3",
    ))
    data = build_train_data(cfg, ByteTokenizer())
    kinds = [data.part_of(i) for i in range(60)]
    assert set(kinds) == {0, 1, 2}
    retrieval = next(i for i, k in enumerate(kinds) if k == 2)
    sample = data.sample(retrieval)
    assert sample["input_ids"].shape == (2048,) and (sample["labels"] == -100).any()
    long_one = data.sample(next(i for i, k in enumerate(kinds) if k == 1))
    assert int(long_one["doc_ids"].max()) <= 1  # a long document spans (almost) the whole window
