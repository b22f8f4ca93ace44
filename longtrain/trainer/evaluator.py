"""The model's forward over whole sequences, sharded over the cp group, and what is
evaluated with it: validation loss for the trainer, and for the gate the tokenizer, the
prepared validation data, the logger and per-token scores (loss and argmax) of whole
sequences: each rank scores its own shard and only [B, T/cp] results are gathered, so no
rank ever holds [T, vocab] logits.

Training and evaluation go through the one ``loss_sums``, so both shard and cast alike.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist

from longtrain.attention.documents import varlen_available
from longtrain.attention.layout import DocumentLayout, shard_with_layout, use_layout
from longtrain.config import Config
from longtrain.data.packing import PackedDataset
from longtrain.data.shards import PreparedData
from longtrain.data.tokenizer import Tokenizer
from longtrain.hardware import autocast_dtype
from longtrain.logging import MetricsLogger
from longtrain.model.load import ScoreFn
from longtrain.model.transformer import Transformer
from longtrain.optim.loss import LossSums, TokenScores
from longtrain.parallel.mesh import ParallelDims, all_reduce_sum
from longtrain.parallel.sharding import zigzag_shard_batch, zigzag_unshard

Batch = dict[str, torch.Tensor]


def autocast_context(dtype_name: str, device: torch.device) -> Callable[[], ContextManager]:
    """``run.dtype``'s autocast on the device, or nothing (fp32). Without autocast's weight
    cast cache: it would keep a bf16 copy of every weight until the region ends, past the
    block that used it (and past FSDP2's resharding); casts are the same values either way."""
    dtype = autocast_dtype(dtype_name, device.type)
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype, cache_enabled=False)


class Evaluator:
    def __init__(
        self, model: Transformer, cfg: Config, dims: ParallelDims, tokenizer: Tokenizer, prepared: PreparedData,
        val_data: PackedDataset, logger: MetricsLogger,
    ):
        self.model, self.cfg, self.dims = model, cfg, dims
        self.tokenizer, self.prepared, self.val_data = tokenizer, prepared, val_data
        self.logger = logger
        self.autocast = autocast_context(cfg.run.dtype, dims.device)

    @contextlib.contextmanager
    def local_batch(self, batch: Batch) -> Iterator[Batch]:
        """This rank's shard of ``batch`` on the device. Under document masking, attention's
        plan for it (``attention/layout.py``) holds inside the block: run the micro-batch's
        forward and backward there."""
        if not self.cfg.data.document_masking:
            local = zigzag_shard_batch(batch, self.dims.cp_rank, self.dims.cp)
            yield {k: v.to(self.dims.device) for k, v in local.items()}
            return
        if self.cfg.parallel.cp_method == "ring":
            local, layout = shard_with_layout(batch, self.dims.cp_rank, self.dims.cp, self.cfg.parallel.cp_load_balancer)
        else:  # Ulysses attends over whole sequences (balanced as it is); the hybrid's ring runs zigzag over R groups
            local = zigzag_shard_batch(batch, self.dims.cp_rank, self.dims.cp)
            layout = DocumentLayout.zigzag(batch["doc_ids"], self.dims.ring_rank, self.dims.ring_size)
        local = {k: v.to(self.dims.device) for k, v in local.items()}
        layout.prepare(self.dims.device, varlen=varlen_available(self.dims.device))
        with use_layout(local["doc_ids"], layout):
            yield local

    def loss_sums(self, local: Batch) -> LossSums:
        """Summed CE and z-loss terms of this rank's shard (``local_batch``) of whole-sequence samples."""
        with self.autocast():
            return self.model(
                local["input_ids"], local["position_ids"], local["labels"], self.cfg.optim.loss_chunk_size,
                doc_ids=local["doc_ids"] if self.cfg.data.document_masking else None, z_loss=self.cfg.optim.z_loss,
            )

    def score_fn(self) -> ScoreFn:
        """(input_ids, position_ids, labels) of whole sequences → every labelled token's loss
        and argmax over the whole sequence, computed on this rank's cp shard and gathered."""

        def score(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
            whole = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
            batch = zigzag_shard_batch(whole, self.dims.cp_rank, self.dims.cp)
            with torch.no_grad(), self.autocast():
                local = self.model(batch["input_ids"], batch["position_ids"], batch["labels"],
                                   self.cfg.optim.loss_chunk_size, scores=True)
            return TokenScores(*(self._gather_sequence(t) for t in local))

        return score

    def _gather_sequence(self, shard: torch.Tensor) -> torch.Tensor:
        """[B, T/cp] of this rank's zigzag chunks → [B, T] in sequence order, on every cp rank."""
        if self.dims.cp == 1:
            return shard
        shards = [torch.empty_like(shard) for _ in range(self.dims.cp)]
        dist.all_gather(shards, shard.contiguous(), group=self.dims.cp_group)
        return zigzag_unshard(shards, self.dims.cp, dim=1)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode for an evaluation, back in train mode after it (even on error)."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    @torch.no_grad()
    def validate(
        self, data: Optional[PackedDataset] = None, samples: Optional[int] = None, batch_size: Optional[int] = None
    ) -> float:
        """Mean loss per token over validation samples 0 … samples-1 (nats/token).

        Defaults to eval.val_batches micro-batches of the stage's validation set; the gate
        passes a short-context set with its own fixed sample count and batch size.
        """
        data = data or self.val_data
        mb = batch_size or self.cfg.stage.micro_batch_size
        n = samples or self.cfg.eval.val_batches * self.cfg.stage.micro_batch_size
        # Split the fixed set evenly over dp: every rank must run as many forwards (FSDP collectives).
        n = max(n - n % self.dims.dp, self.dims.dp)
        indices = list(range(self.dims.dp_rank, n, self.dims.dp))
        ce = torch.zeros((), device=self.dims.device)
        tokens = torch.zeros((), device=self.dims.device)
        with self.eval_mode():
            for start in range(0, len(indices), mb):
                chunk = [data.sample(i) for i in indices[start : start + mb]]
                batch = {k: torch.stack([s[k] for s in chunk]) for k in chunk[0]}
                with self.local_batch(batch) as local:
                    sums = self.loss_sums(local)
                ce += sums.ce
                tokens += sums.tokens
        return float(all_reduce_sum(ce, self.dims) / all_reduce_sum(tokens, self.dims))
