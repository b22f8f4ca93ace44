"""Data start-up on a prepared 1 GB token corpus, and preparation throughput.

    python -m bench.data_startup [--gigabytes 1] [--bpe-docs 400] [--part startup|prepare]

Start-up: the stdlib corpus is prepared once (byte tokens, uint16) and its train shards
are repeated by hard links into a corpus of ``--gigabytes`` of tokens on disk, with the
index and manifest to match. In a fresh process each, we time and measure the RSS growth
of what a stage does before its first step (open the prepared data, build the stage's
mix with a length-filtered long source, the validation set, the first batch), against
the in-RAM reference of reading every token into memory (what start-up used to cost,
before tokenising). The model is not built: its memory is its own either way.

Preparation: tokens/s of ``prepare`` with 1 and 2 processes side by side, on the stdlib
corpus with the byte tokenizer and with an 8K BPE tokenizer trained here on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from longtrain.config import DataConfig, TokenizerConfig
from longtrain.data.prepare import prepare


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def repeat_corpus(src: Path, dst: Path, gigabytes: float) -> int:
    """A prepared folder whose train split is ``src``'s train shards hard-linked over and
    over until it holds ``gigabytes`` of tokens; returns its token count."""
    manifest = json.loads((src / "manifest.json").read_text())
    shutil.copytree(src / "val", dst / "val")
    (dst / "train").mkdir(parents=True)
    shards, size, k = [], 0, 0
    while size < gigabytes * 2**30:
        shard = manifest["splits"]["train"]["shards"][k % len(manifest["splits"]["train"]["shards"])]
        name = f"shard_{k:05d}"
        os.link(src / "train" / shard["file"], dst / "train" / f"{name}.bin")
        os.link(src / "train" / shard["file"].replace(".bin", ".idx.npy"), dst / "train" / f"{name}.idx.npy")
        shards.append({**shard, "file": f"{name}.bin"})
        size += (dst / "train" / f"{name}.bin").stat().st_size
        k += 1
    manifest["splits"]["train"]["shards"] = shards
    manifest["splits"]["train"]["tokens"] = sum(s["tokens"] for s in shards)
    manifest["splits"]["train"]["documents"] = sum(s["documents"] for s in shards)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return manifest["splits"]["train"]["tokens"]


def startup_child(folder: str, mode: str) -> None:
    """One measurement in this (fresh) process; prints JSON."""
    from longtrain.run_config import load_config
    from longtrain.data.loader import StatefulLoader
    from longtrain.data.mix import build_train_data
    from longtrain.data.packing import packed_dataset
    from longtrain.data.shards import PreparedData
    from longtrain.data.tokenizer import ByteTokenizer

    cfg = load_config({"data": {"prepared": folder}, "stage": {"seq_len": 8192, "retrieval_share": 0.05,
                       "mix": [{"name": "long", "weight": 0.6, "min_doc_tokens": 16384},
                               {"name": "short", "weight": 0.4, "max_doc_tokens": 8192}]}})
    rss0 = _rss_mib()
    start = time.perf_counter()
    if mode == "memmap":
        prepared = PreparedData(Path(folder))
        data = build_train_data(cfg, ByteTokenizer(), prepared)
        val = packed_dataset(prepared.stream("val"), cfg.stage.seq_len, cfg.data)
        batch = StatefulLoader(data, 8, 8, 0, 1).next_batch()
        assert batch[0]["input_ids"].shape == (8, 8192) and val.sample(0)["input_ids"].shape == (8192,)
    else:  # every token in RAM
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        dtype = np.dtype(manifest["dtype"])
        arrays = [np.fromfile(Path(folder) / "train" / s["file"], dtype=dtype) for s in manifest["splits"]["train"]["shards"]]
        assert sum(len(a) for a in arrays) == manifest["splits"]["train"]["tokens"]
    print(json.dumps({"seconds": time.perf_counter() - start, "rss_mib": _rss_mib() - rss0}))


def measure_startup(folder: Path, mode: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.data_startup", "--child", str(folder), mode],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_bpe(folder: Path, docs: int) -> TokenizerConfig:
    """An 8K byte-level BPE tokenizer trained on ``docs`` stdlib files, saved to ``folder``."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from longtrain.data.sources import documents

    _, rows = documents(DataConfig(), Counter())
    texts = [text for _, (_, _, text) in zip(range(docs), rows)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return TokenizerConfig(type="hf", path=str(folder))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return startup_child(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gigabytes", type=float, default=1.0)
    p.add_argument("--bpe-docs", type=int, default=400, help="stdlib files the BPE tokenizer is trained on")
    p.add_argument("--part", choices=("startup", "prepare"), help="run one part only (default: both)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # on disk, not a tmpfs: memory maps must page from disk
        tmp = Path(tmp)
        if args.part != "startup":
            print("## Preparation throughput (stdlib corpus)\n\n| tokenizer | processes | tokens | seconds | tokens/s |\n|---|---|---|---|---|")
            tokenizers = {"byte": TokenizerConfig(), "BPE 8K": train_bpe(tmp / "bpe", args.bpe_docs)}
            for name, tok in tokenizers.items():
                for procs in (1, 2):
                    out = tmp / f"prep_{name.replace(' ', '')}_{procs}"
                    start = time.perf_counter()
                    manifest = prepare(DataConfig(), tok, out, num_proc=procs, progress=False)
                    seconds = time.perf_counter() - start
                    tokens = sum(s["tokens"] for s in manifest["splits"].values())
                    print(f"| {name} | {procs} | {tokens:,} | {seconds:.1f} | {tokens / seconds:,.0f} |", flush=True)
        if args.part == "prepare":
            return
        prepare(DataConfig(), TokenizerConfig(), tmp / "prep_byte_1", progress=False)  # done already unless --part startup
        corpus = tmp / "corpus_1gb"
        tokens = repeat_corpus(tmp / "prep_byte_1", corpus, args.gigabytes)
        print(f"\n## Stage start-up, {tokens:,} train tokens ({tokens * 2 / 2**30:.2f} GiB of uint16)\n")
        print("| reading | seconds | RSS growth MiB |\n|---|---|---|")
        results = {}
        for mode in ("in RAM", "memmap"):
            r = measure_startup(corpus, "ram" if mode == "in RAM" else "memmap")
            results[mode] = r
            print(f"| {mode} | {r['seconds']:.2f} | {r['rss_mib']:.0f} |", flush=True)
        ratio_t = results["memmap"]["seconds"] / results["in RAM"]["seconds"]
        ratio_m = results["memmap"]["rss_mib"] / results["in RAM"]["rss_mib"]
        print(f"\nmemmap / in RAM: time {ratio_t:.3f}, memory {ratio_m:.3f}")


if __name__ == "__main__":
    main()
