import numpy as np
import pytest
import torch

from longtrain.data.mix import MixedDataset, build_train_data
from longtrain.data.shards import open_prepared
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.run_config import load_config


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


def test_stage_mix_contains_long_docs_and_retrieval(compose_config):
    cfg = load_config(compose_config(
        "preset=cpu_demo", "stage=cpu/extend_2k", "data.max_docs=200",
        "stage.long_doc_share=0.3", "stage.retrieval_share=0.3",
    ))
    data = build_train_data(cfg, ByteTokenizer(), open_prepared(cfg))
    kinds = [data.part_of(i) for i in range(60)]
    assert set(kinds) == {0, 1, 2}
    retrieval = next(i for i, k in enumerate(kinds) if k == 2)
    sample = data.sample(retrieval)
    assert sample["input_ids"].shape == (2048,) and (sample["labels"] == -100).any()
    long_one = data.sample(next(i for i, k in enumerate(kinds) if k == 1))
    assert int(long_one["doc_ids"].max()) <= 1  # a long document spans (almost) the whole window


def test_stage_mix_sources_with_length_filters(compose_config, tmp_path):
    cfg = load_config(compose_config(
        "preset=cpu_demo", "stage=cpu/extend_2k", "data.max_docs=200", "stage.retrieval_share=0.2",
        "stage.mix=[{name: long, weight: 3, min_doc_tokens: 4096}, {name: short, weight: 1, max_doc_tokens: 1024}]",
    ))
    data = build_train_data(cfg, ByteTokenizer(), open_prepared(cfg))
    parts = np.array([data.part_of(i) for i in range(4000)])
    assert np.bincount(parts, minlength=3) / len(parts) == pytest.approx([0.6, 0.2, 0.2], abs=0.03)
    long_one = data.sample(int(np.flatnonzero(parts == 0)[0]))
    assert int(long_one["doc_ids"].max()) <= 1  # documents of >= 4096 tokens: at most one boundary in 2048
    short_one = data.sample(int(np.flatnonzero(parts == 1)[0]))
    bos = ByteTokenizer().bos_id
    starts = np.flatnonzero(short_one["input_ids"].numpy() == bos)
    assert len(starts) >= 2 and int(np.diff(starts).max()) <= 1024  # every whole document is short


@pytest.mark.parametrize("stage,long_min", [("extend_32k", 16384), ("extend_128k", 65536)])
def test_gpu_stages_default_to_a_long_short_mix(compose_config, stage, long_min):
    cfg = load_config(compose_config(f"stage={stage}"))
    assert [(e.name, e.min_doc_tokens) for e in cfg.stage.mix] == [("long", long_min), ("short", 0)]
    data = build_train_data(cfg, ByteTokenizer(), open_prepared(cfg))
    assert len(data.parts) == 3  # long, short, retrieval
    long_part = data.parts[0]
    assert (np.diff(long_part.doc_starts) >= long_min).all()


def test_mix_config_errors_are_one_line(compose_config):
    from longtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"stage.mix\[0\].prepared: nowhere is not prepared data"):
        load_config(compose_config("stage=extend_32k", "stage.mix=[{name: code, prepared: nowhere}]"))
    with pytest.raises(ConfigError, match="stage.long_doc_share: must be 0 when stage.mix"):
        load_config(compose_config("stage=extend_32k", "stage.long_doc_share=0.2"))
