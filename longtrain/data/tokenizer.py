"""Tokenizers: a dependency-free byte tokenizer and a wrapper for local Hugging Face ones.

Both expose the same small interface (:class:`Tokenizer`). The packer only needs
``encode_batch`` (numpy arrays, so large corpora never become Python int lists) and the
special ids; ``encode``/``decode`` are for evaluation and humans.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Sequence, Union

import numpy as np

from longtrain.config import TokenizerConfig

if TYPE_CHECKING:
    import torch

Ids = Union[Sequence[int], np.ndarray, "torch.Tensor"]


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus BOS, EOS and PAD.

    No training, no files, and every string round-trips, which is what a CPU demo and
    tests want. Code is ~1 byte per character, so sequence lengths are honest.
    """

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # frombuffer views the encoded bytes without a per-byte Python loop: the whole
        # stdlib (~30 MB) encodes in well under a second.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Ids) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        # Specials carry no text; a window may also cut a multi-byte character in half,
        # hence errors="replace" rather than raising.
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _first(*ids: Optional[int]) -> Optional[int]:
    return next((i for i in ids if i is not None), None)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never downloads)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # heavy import, only needed for tokenizer.type=hf

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        t = self._tok
        # Packing needs a token between documents. Many tokenizers lack one of BOS/EOS
        # (BERT-style ones have CLS/SEP instead), so borrow the nearest equivalent.
        eos = _first(t.eos_token_id, t.sep_token_id, t.bos_token_id, t.cls_token_id)
        if eos is None:
            raise ValueError(f"tokenizer at {path} has no eos/bos/sep/cls token to mark document boundaries")
        self.eos_id: int = eos
        self.bos_id: int = _first(t.bos_token_id, t.cls_token_id, eos)  # type: ignore[assignment]
        self.pad_id: int = _first(t.pad_token_id, eos)  # type: ignore[assignment]
        self.vocab_size: int = len(t)  # includes added tokens, unlike t.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False, verbose=False)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # One batched call lets the Rust backend tokenise in parallel; verbose=False
        # silences the "longer than model_max_length" warning, which is moot for packing.
        out = self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def decode(self, ids: Ids) -> str:
        return self._tok.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=True)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.type == "byte":
        return ByteTokenizer()
    if cfg.type == "hf":
        if not cfg.path:
            raise ValueError("tokenizer.path: tokenizer.type=hf needs a local tokenizer folder")
        return HFTokenizer(cfg.path)
    raise ValueError(f"tokenizer.type: unknown value {cfg.type!r}; valid: byte, hf")


def tokenizer_identity(cfg: TokenizerConfig) -> str:
    """The tokenizer's type plus a hash of its files: prepared shards record it, so shards
    made with another tokenizer are never read as this one's."""
    if cfg.type != "hf":
        return cfg.type
    h = hashlib.sha256()
    for path in sorted(p for p in Path(str(cfg.path)).rglob("*") if p.is_file()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return f"hf:{h.hexdigest()[:16]}"
