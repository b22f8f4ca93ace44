"""Prepare a corpus once into memory-mapped token shards.

    python -m longtrain.data.prepare data=stdlib_code tokenizer=byte [out=DIR] [num_proc=1] [shard_tokens=N]
    python -m longtrain.data.prepare data=local data.path='corpus/**/*.txt' out=data/corpus

Every other argument is a Hydra override of the training config, so ``data=...`` and
``tokenizer=...`` mean what they mean for ``train.py``. ``out`` defaults to
``prepared_dir(cfg)``, the folder training looks in (``data/<source>-<tokenizer>-<hash>``).

The source is read as a stream (one document in memory per worker batch), tokenised by
``num_proc`` processes, split into train/val by a hash of each document's key, and
written as:

    plan.json                   what is being prepared; a re-run with other settings is refused
    sources.txt                 input names, one a line (the index's ``source`` points here)
    train/shard_00000.bin       flat tokens: BOS doc EOS BOS doc EOS ... (uint16, or uint32 for
                                vocabularies over 65,536)
    train/shard_00000.idx.npy   the shard's document index: offset, length (tokens, BOS/EOS
                                included), source, doc (input ordinal)
    val/...
    manifest.json               written last: dtype, specials, per-split counts, shards and
                                length histograms, skipped inputs; its presence = complete

Writes are atomic (temp file, then rename; a shard counts once its index exists) and
resumable: a re-run after a kill skips the documents already in complete shards and
writes the same bytes an uninterrupted run would. Unreadable inputs (empty or binary
files, non-UTF-8 text, corrupt jsonl lines, rows without the text field) are skipped,
counted and reported; a split left empty is a one-line config error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from longtrain.config import Config, ConfigError, DataConfig, TokenizerConfig
from longtrain.data.sources import documents, in_val_split
from longtrain.data.tokenizer import Tokenizer, build_tokenizer, tokenizer_identity
from longtrain.run_config import load_config

SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("source", "<i4"), ("doc", "<i8")])
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16: few files, resumable at that grain
_BATCH_DOCS = 64  # documents per tokenizer call in a worker


@dataclass(frozen=True)
class Plan:
    """Everything that determines the bytes of a preparation."""

    source: str
    path: Optional[str]
    name: Optional[str]
    text_field: str
    val_percent: float
    max_docs: Optional[int]
    seed: int
    tokenizer: str  # tokenizer_identity(): type plus a hash of its files
    shard_tokens: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def make_plan(data: DataConfig, tokenizer: TokenizerConfig, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Plan:
    return Plan(
        data.source, data.path, data.name, data.text_field, data.val_percent, data.max_docs, data.seed,
        tokenizer_identity(tokenizer), shard_tokens,
    )


def prepared_dir(data: DataConfig, tokenizer: TokenizerConfig) -> Path:
    """Where training finds (or puts) this data: ``data.prepared``, else a folder under
    ``data/`` named by the source, tokenizer and a hash of the plan."""
    if data.prepared:
        return Path(data.prepared)
    return Path("data") / f"{data.source}-{tokenizer.type}-{make_plan(data, tokenizer).digest()}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ------------------------------------------------ writing shards
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


class ShardWriter:
    """Appends documents to one split's shards; a shard is complete once its index is."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, bos: int, eos: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.bos, self.eos = np.array([bos], dtype=dtype), np.array([eos], dtype=dtype)
        done = sorted(folder.glob("shard_*.idx.npy"))
        self.shard = len(done)
        self.committed = int(np.load(done[-1])["doc"][-1]) if done else -1  # last input ordinal written
        for stale in list(folder.glob("*.tmp")) + [p for p in folder.glob("shard_*.bin") if self._number(p) >= self.shard]:
            stale.unlink()
        self._pieces: list[np.ndarray] = []
        self._rows: list[tuple[int, int, int, int]] = []
        self._tokens = 0

    @staticmethod
    def _number(path: Path) -> int:
        return int(path.name.split("_")[1].split(".")[0])

    def add(self, ids: np.ndarray, source: int, doc: int) -> None:
        length = len(ids) + 2
        self._pieces += (self.bos, ids.astype(self.dtype, copy=False), self.eos)
        self._rows.append((self._tokens, length, source, doc))
        self._tokens += length
        if self._tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        stem = self.folder / f"shard_{self.shard:05d}"
        _atomic_write(stem.with_suffix(".bin"), np.concatenate(self._pieces).tobytes())
        _atomic_write(stem.with_suffix(".idx.npy"), _npy_bytes(np.array(self._rows, dtype=INDEX_DTYPE)))
        self.committed = self._rows[-1][3]
        self.shard += 1
        self._pieces, self._rows, self._tokens = [], [], 0


# ------------------------------------------------ tokenising in parallel
_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(cfg: TokenizerConfig) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(cfg)


def _encode(batch: list[tuple[int, str, int, str]]) -> list[tuple[int, str, int, np.ndarray]]:
    ids = _worker_tokenizer.encode_batch([text for *_, text in batch])  # type: ignore[union-attr]
    return [(doc, split, source, x) for (doc, split, source, _), x in zip(batch, ids)]


def _batches(items: Iterator[tuple[int, str, int, str]]) -> Iterator[list[tuple[int, str, int, str]]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == _BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def _histogram(lengths: np.ndarray) -> dict[str, list[int]]:
    """Document counts by length in powers of two: bin k holds lengths in [2^k, 2^(k+1))."""
    top = int(np.log2(max(int(lengths.max(initial=1)), 1))) + 1
    counts = np.bincount(np.log2(np.maximum(lengths, 1)).astype(np.int64), minlength=top)
    return {"bin_starts": [2**k for k in range(top)], "documents": counts.tolist()}


def _split_summary(folder: Path) -> dict[str, Any]:
    shards, lengths = [], []
    for idx in sorted(folder.glob("shard_*.idx.npy")):
        rows = np.load(idx)
        shards.append({"file": idx.name.replace(".idx.npy", ".bin"), "tokens": int(rows["length"].sum()), "documents": len(rows)})
        lengths.append(rows["length"])
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    return {
        "documents": len(all_lengths),
        "tokens": int(all_lengths.sum()),
        "shards": shards,
        "length_histogram": _histogram(all_lengths),
    }


def prepare(data: DataConfig, tok_cfg: TokenizerConfig, out: Path, num_proc: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Prepare ``data`` into ``out`` (resuming what a killed run left) and return the manifest."""
    from tqdm import tqdm

    plan = make_plan(data, tok_cfg, shard_tokens)
    out.mkdir(parents=True, exist_ok=True)
    plan_path, manifest_path = out / "plan.json", out / "manifest.json"
    plan_json = json.dumps(asdict(plan), indent=2, sort_keys=True)
    if plan_path.exists() and plan_path.read_text() != plan_json:
        raise ConfigError(f"out: {out} holds a preparation with other settings (see its plan.json); delete it or pick another out")
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    _atomic_write(plan_path, plan_json.encode())

    tokenizer = build_tokenizer(tok_cfg)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(out / s, dtype, shard_tokens, tokenizer.bos_id, tokenizer.eos_id) for s in SPLITS}
    skipped: Counter = Counter()
    names, docs = documents(data, skipped)
    _atomic_write(out / "sources.txt", "".join(f"{n}\n" for n in names).encode())

    def pending() -> Iterator[tuple[int, str, int, str]]:
        for doc, (key, source, text) in enumerate(docs):
            if data.max_docs is not None and doc == data.max_docs:
                return
            split = "val" if in_val_split(key, data.val_percent) else "train"
            if doc > writers[split].committed:  # not yet in a complete shard
                yield doc, split, source, text

    # disable=None: a bar on a terminal only, never in logs or a test's captured stderr.
    bar = tqdm(desc=f"preparing {out}", unit="doc", disable=None if progress else True, file=sys.stderr, mininterval=1.0)
    pool = multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (tok_cfg,)) if num_proc > 1 else None
    if pool is None:
        _init_worker(tok_cfg)
    encoded = (pool.imap if pool else map)(_encode, _batches(pending()))
    try:
        for batch in encoded:
            for doc, split, source, ids in batch:
                writers[split].add(ids, source, doc)
            bar.update(len(batch))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    for writer in writers.values():
        writer.flush()

    splits = {s: _split_summary(out / s) for s in SPLITS}
    empty = [s for s, summary in splits.items() if not summary["documents"]]
    if empty:
        shutil.rmtree(out)  # nothing a run could use: leave no half-made dataset behind
        with contextlib.suppress(OSError):
            out.parent.rmdir()  # the data/ folder too, if this made it and it holds nothing else
        total = sum(x["documents"] for x in splits.values())
        if total == 0:
            why = "; ".join(f"{n} skipped: {reason}" for reason, n in sorted(skipped.items())) or "no input"
            raise ConfigError(f"data.path: no usable document in {data.source} {data.path or ''} ({why})")
        raise ConfigError(
            f"data.val_percent: the {empty[0]} split of {data.source} {data.path or ''} is empty "
            f"({total} documents in all, val_percent={data.val_percent}); add documents or change data.val_percent"
        )
    manifest = {
        "format": 1,
        "plan": asdict(plan),
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "splits": splits,
        "skipped": dict(sorted(skipped.items())),
    }
    _atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())
    return manifest


def _positive_int(args: dict[str, str], key: str, default: int) -> int:
    value = args.get(key, str(default))
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    return int(value)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from hydra import compose, initialize_config_dir  # only the command line composes; workers need not import Hydra
    from hydra.errors import HydraException

    args = list(sys.argv[1:] if argv is None else argv)
    own = {k: v for k, _, v in (a.partition("=") for a in args if a.split("=")[0] in ("out", "num_proc", "shard_tokens"))}
    overrides = [a for a in args if a.split("=")[0] not in own]
    try:
        configs = Path(__file__).resolve().parents[2] / "configs"
        with initialize_config_dir(str(configs), version_base=None):
            cfg: Config = load_config(compose("config", overrides=overrides))
        out = Path(own["out"]) if "out" in own else prepared_dir(cfg.data, cfg.tokenizer)
        num_proc = _positive_int(own, "num_proc", 1)  # see data/README.md: measured, not assumed
        shard_tokens = _positive_int(own, "shard_tokens", DEFAULT_SHARD_TOKENS)
        manifest = prepare(cfg.data, cfg.tokenizer, out, num_proc, shard_tokens)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except HydraException as e:  # a malformed override or an unknown config group
        print(f"config error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    for s, summary in manifest["splits"].items():
        print(f"{s}: {summary['documents']:,} documents, {summary['tokens']:,} tokens in {len(summary['shards'])} shard(s)")
    for reason, n in manifest["skipped"].items():
        print(f"skipped {n:,} input(s): {reason}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
