"""A data-parallel loader whose whole state is one number.

Every optimizer step consumes the next ``global_batch_size`` samples of the packed
stream, ``[n, n + global_batch_size)``; data-parallel rank ``d`` takes its contiguous
share of them. The position is the global count ``samples_consumed`` rather than
per-rank iterator state, so a checkpoint taken on 8 ranks resumes on 2 (or with a new
global batch size) and still sees exactly the samples that come next.
"""

from __future__ import annotations

import torch

from longtrain.data.packing import PackedDataset


class StatefulLoader:
    def __init__(self, dataset: PackedDataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
        if global_batch_size < 1 or micro_batch_size < 1:
            raise ValueError(
                f"batch sizes must be >= 1, got global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size}"
            )
        if global_batch_size % (dp_size * micro_batch_size) != 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of "
                f"micro_batch_size*dp_size={micro_batch_size}*{dp_size}={micro_batch_size * dp_size}"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.per_rank = global_batch_size // dp_size
        self.samples_consumed = 0

    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for one optimizer step, each a dict of [mb, seq_len] tensors."""
        first = self.samples_consumed + self.dp_rank * self.per_rank
        micro_batches = []
        for mb_start in range(first, first + self.per_rank, self.micro_batch_size):
            samples = [self.dataset.sample(i) for i in range(mb_start, mb_start + self.micro_batch_size)]
            micro_batches.append({key: torch.stack([s[key] for s in samples]) for key in samples[0]})
        # Every rank advances by the global batch, so all ranks agree on the position.
        self.samples_consumed += self.global_batch_size
        return micro_batches

    def state_dict(self) -> dict[str, int]:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples_consumed = int(state["samples_consumed"])
