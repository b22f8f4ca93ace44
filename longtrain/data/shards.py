"""Read prepared token shards (``prepare.py``) through np.memmap.

Opening a split reads its manifest and document index (a few bytes per document) and
maps the shard files; tokens are paged in only when a sample touches them, and every
rank on a machine shares those pages through the page cache. Start-up time and memory
therefore follow the number of documents, not the number of tokens.

A ``TokenStream`` is a split's documents, or the subset a length filter keeps, seen as
one packed stream ``BOS doc EOS BOS doc EOS ...``: ``PackedDataset`` cuts it into
windows exactly as it cuts an in-memory array (it only needs ``len`` and slicing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch.distributed as dist

from longtrain.config import Config, ConfigError, TokenizerConfig
from longtrain.data.prepare import prepare, prepared_dir
from longtrain.data.tokenizer import tokenizer_identity


class TokenStream:
    """Selected documents of one split as one virtual token stream over memory-mapped shards."""

    ndim = 1  # a 1-D token array to its readers

    def __init__(self, shards: list[np.ndarray], shard_of: np.ndarray, offsets: np.ndarray, lengths: np.ndarray):
        self.shards = shards
        self._shard_of, self._offsets, self._lengths = shard_of, offsets, lengths
        ends = np.cumsum(lengths)
        self.doc_starts = ends - lengths  # of each selected document, in the virtual stream
        self._len = int(ends[-1]) if len(ends) else 0
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return self._len

    @property
    def doc_lengths(self) -> np.ndarray:
        return self._lengths

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self._len)
        if step != 1:
            raise IndexError("a TokenStream is read in contiguous slices")
        pieces = []
        d = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        while start < stop:
            shard, offset = self.shards[self._shard_of[d]], int(self._offsets[d])
            take = min(stop, int(self.doc_starts[d] + self._lengths[d])) - start
            skip = start - int(self.doc_starts[d])
            pieces.append(shard[offset + skip : offset + skip + take])
            start += take
            d += 1
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def haystack_tokens(self) -> np.ndarray:
        """Retrieval filler: the first shard, still memory-mapped (pages are read as
        samples touch them). Whole, not a prefix: random-token filler draws from the
        tokens it holds, and a token missing from the training haystack but present in
        the evaluation one is never learnt (a 16M-token prefix of the stdlib lacked 2 of
        the validation bytes, and induction recall fell from ≥ 0.9 to 0.84)."""
        return self.shards[0]


class PreparedData:
    """A prepared folder: its manifest, and each split's shards and document index."""

    def __init__(self, folder: Path, tokenizer: Optional[TokenizerConfig] = None):
        """With ``tokenizer``, shards made by another tokenizer are refused with one line."""
        self.folder = folder
        self.manifest = json.loads((folder / "manifest.json").read_text())
        made_by = self.manifest["plan"]["tokenizer"]
        if tokenizer is not None and made_by != tokenizer_identity(tokenizer):
            raise ConfigError(
                f"data.prepared: {folder} was prepared with tokenizer {made_by}, this run uses "
                f"{tokenizer_identity(tokenizer)}; prepare it again for this tokenizer"
            )

    def stream(self, split: str, min_doc_tokens: int = 0, max_doc_tokens: Optional[int] = None) -> TokenStream:
        """The split's documents whose length (BOS/EOS included) lies in [min, max], found
        through the index without reading any token."""
        info = self.manifest["splits"][split]
        dtype = np.dtype(self.manifest["dtype"])
        shards, shard_of, offsets, lengths = [], [], [], []
        for k, shard in enumerate(info["shards"]):
            index = np.load(self.folder / split / shard["file"].replace(".bin", ".idx.npy"))
            keep = index["length"] >= min_doc_tokens
            if max_doc_tokens is not None:
                keep &= index["length"] <= max_doc_tokens
            shards.append(np.memmap(self.folder / split / shard["file"], dtype=dtype, mode="r"))
            shard_of.append(np.full(int(keep.sum()), k, dtype=np.int32))
            offsets.append(index["offset"][keep])
            lengths.append(index["length"][keep])
        lengths_all = np.concatenate(lengths)
        if not len(lengths_all):
            bounds = f">= {min_doc_tokens}" + (f" and <= {max_doc_tokens}" if max_doc_tokens is not None else "")
            raise ConfigError(f"data: no {split} document of {self.folder} has {bounds} tokens")
        return TokenStream(shards, np.concatenate(shard_of), np.concatenate(offsets), lengths_all)


def open_prepared(cfg: Config, rank0: bool = True, wait: Optional[Callable[[], None]] = None) -> PreparedData:
    """The run's prepared data, preparing it first if needed: rank 0 prepares while the
    other ranks wait in ``wait`` (the trainer's is a gloo barrier with its own timeout,
    ``parallel.mesh.wait_for_rank0``; by default the process group's barrier, a no-op
    without one)."""
    folder = prepared_dir(cfg.data, cfg.tokenizer)
    error: Optional[ConfigError] = None
    if rank0 and not (folder / "manifest.json").exists():
        try:
            prepare(cfg.data, cfg.tokenizer, folder, num_proc=1, progress=False)
        except ConfigError as e:  # raised after the barrier, so no rank is left waiting
            error = e
    if wait is not None:
        wait()
    elif dist.is_initialized():
        dist.barrier()
    if error is not None:
        raise error
    if not (folder / "manifest.json").exists():
        raise ConfigError(f"data.prepared: {folder} could not be prepared; rank 0 reports why")
    return PreparedData(folder, cfg.tokenizer)
