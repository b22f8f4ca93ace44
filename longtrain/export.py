"""Export a checkpoint as a Hugging Face folder that transformers loads offline.

    python -m longtrain.export RUN/STAGE/checkpoints/step_00000300 OUT_DIR

Writes config.json (the stage's RoPE as ``rope_parameters``), safetensors (sharded past
``--max-shard-size``), generation_config.json, the tokenizer, and ``longtrain.yaml`` (the
run's config, which lets ``python -m longtrain.eval.needle hf:OUT_DIR`` rebuild the gate's
grid). A checkpoint saved at any dp/cp layout loads here (DCP stores global tensors). A
model no transformers class computes (logn attention, NoPE with QK-norm) is refused
before anything is written. The folder is written beside OUT_DIR and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf

from longtrain import checkpoint as ckpt
from longtrain.config import Config, ConfigError, check_shard_size
from longtrain.data.packing import packed_dataset
from longtrain.data.retrieval import build_haystack
from longtrain.data.shards import open_prepared
from longtrain.data.tokenizer import build_tokenizer
from longtrain.data.tokenizer_export import save_tokenizer
from longtrain.eval.needle import greedy_decode, needle_batch
from longtrain.hf import MODEL_TYPES, export_architecture, hf_config_fields, hf_name
from longtrain.model.load import LONGTRAIN_CONFIG, checkpoint_config, hf_scorer, load_model, load_scorer
from longtrain.optim.loss import IGNORE_INDEX

EXPORT_DIR = "hf"  # export.after_gate: STAGE/hf, next to gate.json


def write_weights(state_dict: dict[str, torch.Tensor], out_dir: Path, max_shard_size: str) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index past ``max_shard_size``."""
    from huggingface_hub import split_torch_state_dict_into_shards  # heavy, like transformers below: export only
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n].contiguous() for n in names}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_hf_folder(cfg: Config, model_state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Write ``model_state`` (our names, full tensors) with ``cfg``'s model, RoPE and tokenizer."""
    from transformers import AutoConfig, GenerationConfig  # heavy; only writing a folder needs it

    tokenizer = build_tokenizer(cfg.tokenizer)
    vocab_size = model_state["tok_embeddings.weight"].shape[0]
    fields = hf_config_fields(cfg.model, cfg.rope, cfg.stage.seq_len, vocab_size)  # refuses first
    specials = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    AutoConfig.for_model(MODEL_TYPES[fields["architectures"][0]], **fields, **specials).save_pretrained(tmp)
    GenerationConfig(do_sample=False, **specials).save_pretrained(tmp)
    write_weights({hf_name(k): v.detach().cpu() for k, v in model_state.items()}, tmp, cfg.export.max_shard_size)
    save_tokenizer(cfg.tokenizer, tmp)
    (tmp / LONGTRAIN_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def export_checkpoint(checkpoint: Path, out_dir: Path, max_shard_size: Optional[str] = None) -> Path:
    """Load a checkpoint's weights in this process (any layout it was saved at) and export them."""
    cfg = checkpoint_config(checkpoint)
    export_architecture(cfg.model, cfg.rope)  # refuse before loading anything
    if max_shard_size is not None:
        check_shard_size(max_shard_size, "--max-shard-size")
        cfg.export.max_shard_size = max_shard_size
    model, _, _, _ = load_model(checkpoint)
    return write_hf_folder(cfg, model.state_dict(), out_dir)


@dataclass
class ParityReport:
    """An export against the checkpoint it came from, as a client would use it."""

    positions_from: int  # per-token losses compared from here on: the original (pretraining) length
    seq_len: int
    max_abs_diff: float  # |transformers' -log p(next token) - ours|, validation text
    ours: list[list[int]]  # our greedy answers to passkey prompts
    transformers: list[list[int]]  # model.generate's greedy answers to the same prompts
    answers: list[list[int]]

    def passed(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance and self.ours == self.transformers

    def summary(self) -> str:
        same = sum(a == b for a, b in zip(self.ours, self.transformers))
        recalled = sum(a == b for a, b in zip(self.transformers, self.answers))
        return (
            f"loss at positions {self.positions_from}..{self.seq_len - 2}: max |transformers - ours| = {self.max_abs_diff:.2e}; "
            f"passkey generate: {same}/{len(self.ours)} prompts decode the digits ours does ({recalled} recalled)"
        )


@torch.no_grad()
def check_parity(checkpoint: Path, out_dir: Path, samples: int = 4) -> ParityReport:
    """transformers on ``out_dir`` vs our model on ``checkpoint``, at the stage length.

    Per-token losses (-log p of the next token: the whole log-softmax row reduced to the
    number that matters, without [T, vocab] logits) on a validation window, compared past
    the original length where the RoPE scaling acts; then ``generate`` (greedy, with transformers' KV cache) on passkey
    prompts at depths spread over the window against our greedy decoding.
    """
    from transformers import AutoModelForCausalLM  # heavy; only --check needs it

    ours_score, cfg, tokenizer, device = load_scorer(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).to(device).eval()
    hf_score = hf_scorer(hf, cfg.optim.loss_chunk_size)
    length, start = cfg.stage.seq_len, cfg.rope.original_max_position_embeddings
    ids = packed_dataset(open_prepared(cfg).stream("val"), length, cfg.data).sample(0)["input_ids"][None].to(device)
    positions, labels = torch.arange(length, device=device)[None], ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX  # the last token has no next one in the window
    ours, theirs = (f(ids, positions, labels).loss for f in (ours_score, hf_score))
    diff = float((theirs - ours)[:, start:].abs().max())

    haystack = build_haystack(cfg, tokenizer, "val")
    cells = [(i / max(samples - 1, 1), 0) for i in range(samples)]
    batch = needle_batch(tokenizer, haystack, length, cells, cfg.run.seed, "passkey", cfg.retrieval)
    report = ParityReport(start, length, diff, [], [], [])
    for sample, labels in zip(batch["input_ids"].to(device), batch["labels"].to(device)):
        answer_at = (labels != IGNORE_INDEX).nonzero().flatten()
        prompt, n = sample[: answer_at[0] + 1], len(answer_at)
        report.ours.append(greedy_decode(ours_score, prompt, n))
        generated = hf.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False)
        report.transformers.append(generated[0, len(prompt) :].tolist())
        report.answers.append(labels[answer_at].tolist())
    return report


def export_model(model: torch.nn.Module, cfg: Config, out_dir: Path) -> None:
    """Export a model in training (plain or FSDP2-sharded); collective, rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # export.after_gate only

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ckpt._is_rank0():
        write_hf_folder(cfg, state, out_dir)
    ckpt.barrier()


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m longtrain.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder (step_XXXXXXXX)")
    p.add_argument("out_dir", type=Path, help="the Hugging Face folder to write")
    p.add_argument("--max-shard-size", help="split safetensors past this size, e.g. 5GB, 500MB (default: the run's export.max_shard_size)")
    p.add_argument("--check", action="store_true", help="then compare transformers on the export with our model (logits, generate)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="--check: largest allowed |difference| of a token's loss (nats)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.max_shard_size)
    except ConfigError as e:
        print(f"export error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    if args.check:
        report = check_parity(args.checkpoint, out)
        print(report.summary())
        if not report.passed(args.tolerance):
            sys.exit(1)


if __name__ == "__main__":
    # Everything runs offline: transformers and datasets must never try the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
