"""Tokenizers as Hugging Face folders that ``AutoTokenizer.from_pretrained`` loads offline.

The byte tokenizer becomes a ``tokenizers`` JSON with the same ids: byte-level
pre-tokenization (each byte a printable stand-in character, as GPT-2 does) without
splitting, and a BPE model without merges whose vocabulary maps byte b's character to
id b; BOS/EOS/PAD are special tokens 256-258. Special tokens never come out of text
(``split_special_tokens``), as with :class:`~longtrain.data.tokenizer.ByteTokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from longtrain.config import TokenizerConfig
from longtrain.data.tokenizer import ByteTokenizer

BYTE_SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte → printable character table, which the ByteLevel pre-tokenizer applies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_fast():
    """A ``PreTrainedTokenizerFast`` whose ids equal ByteTokenizer's for every string."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ours = ByteTokenizer()
    vocab = {char: b for b, char in byte_to_char().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, so every byte is one token whatever surrounds it.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = {"bos_token": ours.bos_id, "eos_token": ours.eos_id, "pad_token": ours.pad_id}
    for role in sorted(specials, key=specials.get):  # added in id order: 256, 257, 258
        backend.add_special_tokens([AddedToken(BYTE_SPECIAL_TOKENS[role], special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, **BYTE_SPECIAL_TOKENS)


def save_tokenizer(cfg: TokenizerConfig, out_dir: Path) -> None:
    """Write the run's tokenizer into ``out_dir`` (tokenizer.json + tokenizer_config.json)."""
    if cfg.type == "byte":
        byte_tokenizer_fast().save_pretrained(out_dir)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(cfg.path, local_files_only=True).save_pretrained(out_dir)
