"""Preparation into token shards: read-back equals direct tokenisation, a killed run
resumes to the same bytes, bad inputs are one line or a counted skip, memmap reading."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from longtrain.config import ConfigError, DataConfig, TokenizerConfig
from longtrain.data import prepare as prepare_module
from longtrain.data.prepare import prepare
from longtrain.data.shards import PreparedData
from longtrain.data.sources import in_val_split
from longtrain.data.tokenizer import ByteTokenizer
from tests.cli_utils import ROOT, env, run_main, train_in_process

TOK = ByteTokenizer()
BYTE = TokenizerConfig(type="byte")


def _documents(data: PreparedData, split: str) -> list[str]:
    """Every document of a split, decoded from the shards through the index."""
    stream = data.stream(split)
    ends = np.append(stream.doc_starts[1:], len(stream))
    docs = []
    for a, b in zip(stream.doc_starts, ends):
        tokens = stream[int(a) : int(b)]
        assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id
        docs.append(TOK.decode(tokens))
    return docs


def _write_corpus(root: Path) -> dict[str, str]:
    """Two .txt files (one nested), a .jsonl and a .parquet; {key: text} of every document."""
    (root / "sub").mkdir(parents=True)
    docs = {"a.txt": "first document\nsecond line\n\nsame document\n", "sub/b.txt": "nested ✓ document\n"}
    for key, text in docs.items():
        (root / key).write_text(text)
    rows = [{"body": f"json row {i}", "other": i} for i in range(6)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_dict({"body": [f"parquet row {i}" for i in range(6)]}).to_parquet(str(root / "t.parquet"))
    (root / "ignored.csv").write_text("body\nnot a document\n")
    docs |= {f"rows.jsonl:{i}": r["body"] for i, r in enumerate(rows)}
    return docs | {f"t.parquet:{i}": f"parquet row {i}" for i in range(6)}


def test_local_corpus_reads_back_as_direct_tokenisation(tmp_path):
    expected = _write_corpus(tmp_path / "corpus")
    cfg = DataConfig(source="local", path=str(tmp_path / "corpus" / "**" / "*"), text_field="body", val_percent=30)
    manifest = prepare(cfg, BYTE, tmp_path / "out", num_proc=2, progress=False)
    data = PreparedData(tmp_path / "out")
    for split in ("train", "val"):
        want = sorted(t for k, t in expected.items() if in_val_split(k, 30) == (split == "val"))
        assert sorted(_documents(data, split)) == want and want
        stream = data.stream(split)
        # Read back token for token as the byte tokenizer writes them.
        direct = np.concatenate([np.r_[TOK.bos_id, TOK.encode(t), TOK.eos_id] for t in _documents(data, split)])
        assert np.array_equal(stream[0 : len(stream)], direct)
        assert manifest["splits"][split]["tokens"] == len(stream)
    assert manifest["dtype"] == "uint16" and manifest["plan"]["tokenizer"] == "byte"
    assert set((tmp_path / "out" / "sources.txt").read_text().split()) == {"a.txt", "sub/b.txt", "rows.jsonl", "t.parquet"}
    assert sum(manifest["splits"]["train"]["length_histogram"]["documents"]) == manifest["splits"]["train"]["documents"]


def test_datasets_dataset_on_disk(tmp_path):
    texts = [f"row number {i} " * (i + 1) for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "ds"))
    prepare(DataConfig(source="hf", path=str(tmp_path / "ds"), val_percent=25), BYTE, tmp_path / "out", progress=False)
    data = PreparedData(tmp_path / "out")
    assert sorted(_documents(data, "train") + _documents(data, "val")) == sorted(texts)


def test_bad_inputs_are_counted_skips(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"document {i} " * 20)
    (corpus / "empty.txt").write_text("")
    (corpus / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (corpus / "rows.jsonl").write_text('{"text": "good row"}\n{"text": \n{"other": 1}\n[1, 2]\n\n{"text": "another"}\n')
    manifest = prepare(DataConfig(source="local", path=str(corpus / "*"), val_percent=20), BYTE, tmp_path / "out", progress=False)
    assert manifest["skipped"] == {
        "binary file": 1, "corrupt jsonl line": 1, "empty file": 1, "jsonl row without a 'text' string": 2, "not UTF-8": 1,
    }
    assert sum(s["documents"] for s in manifest["splits"].values()) == 14


def _in_process(*args: str) -> subprocess.CompletedProcess:
    """``python -m longtrain.data.prepare ARGS``, in this process."""
    return run_main(prepare_module.main, args, ROOT)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longtrain.data.prepare", *args], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout
    )


@pytest.mark.parametrize(
    "files,args,message",
    [
        ({"a.txt": "only one document"}, ["data.val_percent=1"], r"data.val_percent: the val split .* is empty"),
        ({"a.jsonl": '{"body": "x"}\n'}, [], r"data.path: no usable document .*1 skipped: jsonl row without a 'text' string"),
        ({"a.parquet": None}, ["data.text_field=nope"], r"data.text_field: .*a.parquet has no column 'nope'"),
        ({"a.txt": "x"}, ["data=nonexistent"], r"config error: .*nonexistent"),
        ({"a.txt": "x"}, ["num_proc=two"], r"num_proc: must be a positive integer, got 'two'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, files, args, message):
    for name, text in files.items():
        if text is None:
            datasets.Dataset.from_dict({"text": ["t"]}).to_parquet(str(tmp_path / name))
        else:
            (tmp_path / name).write_text(text)
    r = _in_process("data=local", f"data.path={tmp_path}/*", f"out={tmp_path}/out", "num_proc=1", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), r.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.e2e  # a process killed mid-write
def test_killed_preparation_resumes_to_the_same_shards(tmp_path):
    args = ["data=stdlib_code", "data.max_docs=400", "shard_tokens=200000", "num_proc=1"]
    reference = _cli(*args, f"out={tmp_path}/ref", timeout=120)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "longtrain.data.prepare", *args, f"out={out}"],
        env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(out.glob("train/shard_00002.idx.npy")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed too late to test resuming"
    again = _cli(*args, f"out={out}", timeout=120)
    assert again.returncode == 0, again.stderr
    assert _tree(out) == _tree(tmp_path / "ref")


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"{i}.txt").write_text(f"doc {i}")
    cfg = DataConfig(source="local", path=str(corpus / "*.txt"), val_percent=30)
    prepare(cfg, BYTE, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="out: .* other settings"):
        prepare(DataConfig(source="local", path=str(corpus / "*.txt"), val_percent=40), BYTE, tmp_path / "out", progress=False)


def test_length_filter_uses_the_index(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    lengths = [3, 50, 7, 120, 64, 1, 300]
    for i, n in enumerate(lengths * 3):
        (corpus / f"{i:02d}.txt").write_text("x" * n)
    prepare(DataConfig(source="local", path=str(corpus / "*.txt"), val_percent=10), BYTE, tmp_path / "out", progress=False)
    data = PreparedData(tmp_path / "out")
    everything = data.stream("train")
    long_docs = data.stream("train", min_doc_tokens=64 + 2)
    assert set(long_docs.doc_lengths - 2) <= {64, 120, 300} and len(long_docs.doc_lengths) > 0
    assert len(long_docs) == int(long_docs.doc_lengths.sum()) < len(everything)
    short = data.stream("train", max_doc_tokens=9)
    assert set(short.doc_lengths - 2) <= {1, 3, 7}
    # A window across two selected documents is the two documents back to back.
    a, b = long_docs.doc_starts[:2]
    assert long_docs[int(b) - 2 : int(b) + 2].tolist() == [ord("x"), TOK.eos_id, TOK.bos_id, ord("x")]
    with pytest.raises(ConfigError, match="no train document"):
        data.stream("train", min_doc_tokens=10_000)


@pytest.mark.e2e  # the commands as a user types them (num_proc=2: worker processes)
def test_data_readme_commands(tmp_path):
    """The three preparation commands of data/README.md, on small inputs."""
    r = _cli("data=stdlib_code", "tokenizer=byte", "data.max_docs=60", "num_proc=1", f"out={tmp_path}/stdlib")
    assert r.returncode == 0 and "train: " in r.stdout and "val: " in r.stdout, r.stderr
    _write_corpus(tmp_path / "corpus")
    r = _cli("data=local", f"data.path={tmp_path}/corpus/**/*", "data.text_field=body", "data.val_percent=30",
             "num_proc=1", f"out={tmp_path}/corpus_out")
    assert r.returncode == 0, r.stderr
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "tok")
    texts = [("hello world " * (i % 5 + 1)).strip() for i in range(200)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "saved"))
    r = _cli("data=hf", f"data.path={tmp_path}/saved", "tokenizer=hf", f"tokenizer.path={tmp_path}/tok", "num_proc=2",
             f"out={tmp_path}/books")
    assert r.returncode == 0, r.stderr
    data = PreparedData(tmp_path / "books")
    assert data.manifest["plan"]["tokenizer"].startswith("hf:")
    assert sum(data.manifest["splits"][s]["tokens"] for s in ("train", "val")) == sum(len(t.split()) + 2 for t in texts)


def test_training_on_a_corpus_with_an_empty_split_is_one_line(tmp_path):
    """A small data=local corpus whose 5% validation split is empty: one line, exit 2."""
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 50)
    r = train_in_process("preset=cpu_demo", "stage=cpu/induction", "data=local", f"data.path={tmp_path}/*.txt",
                         f"data.prepared={tmp_path}/prepared", f"run.dir={tmp_path}/run", cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("config error: data.val_percent: the val split") and "3 documents in all" in r.stderr


def test_shards_of_another_tokenizer_are_refused(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"{i}.txt").write_text(f"doc {i}")
    prepare(DataConfig(source="local", path=str(corpus / "*.txt"), val_percent=30), BYTE, tmp_path / "out", progress=False)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="data.prepared: .* prepared with tokenizer byte, this run uses hf:"):
        PreparedData(tmp_path / "out", TokenizerConfig(type="hf", path=str(tmp_path / "tok")))
