"""Process group and device mesh (dp × cp).

Rank layout: rank = dp_rank · cp + cp_rank, so the ranks that share one sequence
(a cp group) are neighbours, as in torchtitan. Parameters are sharded by FSDP2 over the
flattened dp×cp mesh: cp ranks hold different tokens of the same samples, so they are
data-parallel for the weights and should not each keep a full optimizer state.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longtrain.config import ConfigError, ParallelConfig, StageConfig, require


@dataclass
class ParallelDims:
    """The run's layout over its ranks (dp × cp = world size, checked on construction) and,
    once the process group is up, its mesh and groups."""

    dp: int
    cp: int
    rank: int
    world_size: int
    device: torch.device
    mesh: Optional[DeviceMesh] = None  # (dp, cp); None when world_size == 1
    dp_cp_mesh: Optional[DeviceMesh] = None  # both dims flattened: FSDP2 shards over it
    health_group: Optional[dist.ProcessGroup] = None  # gloo, only to find ranks that stopped answering
    timeout_s: int = 600
    cp_method: str = "ring"  # parallel.cp_method
    ulysses: int = 1  # the Ulysses degree U (ParallelConfig.ulysses_degree); the ring spans cp / U ranks
    ulysses_group: Optional[dist.ProcessGroup] = None  # ulysses: the cp group; hybrid: cp ranks jU..jU+U−1
    ring_group: Optional[dist.ProcessGroup] = None  # hybrid only: the cp ranks with the same cp_rank % U

    def __post_init__(self) -> None:
        require(
            self.dp * self.cp == self.world_size,
            "parallel",
            f"parallel.dp*parallel.cp = {self.dp}*{self.cp} = {self.dp * self.cp} must equal the world size {self.world_size}",
        )
        require(
            self.cp % self.ulysses == 0,
            "parallel.ulysses",
            f"the Ulysses degree {self.ulysses} must divide parallel.cp={self.cp}",
        )

    @classmethod
    def planned(cls, cfg: ParallelConfig, world_size: int, device: torch.device = torch.device("cpu")) -> ParallelDims:
        """The layout of ``world_size`` ranks before any process group exists (rank 0's view)."""
        return cls(
            cfg.dp, cfg.cp, 0, world_size, device, timeout_s=cfg.timeout_s, cp_method=cfg.cp_method,
            ulysses=cfg.ulysses_degree(),
        )

    def check_stage(self, stage: StageConfig) -> None:
        """A stage's sequence must cut into the ring's 2·cp chunks, and its global batch into
        micro-batches on every data-parallel rank."""
        dp, cp = self.dp, self.cp
        require(
            stage.seq_len % (2 * cp) == 0 or cp == 1,
            "stage.seq_len",
            f"{stage.seq_len} is not divisible by 2*parallel.cp={2 * cp} (zigzag ring attention cuts the sequence into 2*cp chunks)",
        )
        require(
            stage.global_batch_size % dp == 0,
            "stage.global_batch_size",
            f"{stage.global_batch_size} sequences cannot be split over parallel.dp={dp} ranks; "
            f"use a multiple of {dp} (e.g. stage.global_batch_size={dp * max(1, stage.global_batch_size // dp)})",
        )
        require(
            stage.global_batch_size % (stage.micro_batch_size * dp) == 0,
            "stage.global_batch_size",
            f"{stage.global_batch_size} is not a multiple of stage.micro_batch_size*parallel.dp="
            f"{stage.micro_batch_size * dp}",
        )

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def ring_rank(self) -> int:
        """This rank's place in the zigzag ring (0 under plain Ulysses): what document
        plans are made for (``DocumentLayout.zigzag(doc_ids, ring_rank, ring_size)``)."""
        return self.cp_rank // self.ulysses

    @property
    def ring_size(self) -> int:
        """Ranks in the zigzag ring: cp (ring), 1 (ulysses), cp / U (hybrid)."""
        return self.cp // self.ulysses

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def cp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh["cp"].get_group() if self.mesh is not None else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device: cuda requested but no CUDA device is available; valid: auto, cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE, or the size of a process group someone already started."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(cfg: ParallelConfig, device: torch.device) -> ParallelDims:
    """Join the process group started by torchrun (if any) and build the dp×cp mesh."""
    world_size = world_size_from_env()
    dims = ParallelDims.planned(cfg, world_size, device)  # refuses a layout that is not the world's before joining it
    if world_size == 1:
        return dims
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        # Gloo's worker threads must stop while the interpreter is alive: a process that exits
        # with its group still up can abort in finalisation ("terminate called without an
        # active exception", SIGABRT). A multirun's jobs share the group until then.
        atexit.register(_destroy_process_group)
    mesh = init_device_mesh(device.type, (cfg.dp, cfg.cp), mesh_dim_names=("dp", "cp"))
    dp_cp_mesh = mesh["dp", "cp"]._flatten("dp_cp")
    health = dist.new_group(backend="gloo", timeout=timeout)
    dims = replace(dims, rank=dist.get_rank(), mesh=mesh, dp_cp_mesh=dp_cp_mesh, health_group=health)
    return _with_attention_groups(dims, timeout)


def hybrid_group_ranks(dims: ParallelDims) -> tuple[list[list[int]], list[list[int]]]:
    """(Ulysses groups, ring groups) as global ranks: each cp group splits into Ulysses
    groups of U neighbours (cp ranks jU..jU+U−1) and ring groups (the cp ranks with one
    u = cp_rank % U)."""
    u_size, r_size, firsts = dims.ulysses, dims.ring_size, range(0, dims.world_size, dims.cp)
    ulysses = [[first + j * u_size + u for u in range(u_size)] for first in firsts for j in range(r_size)]
    ring = [[first + j * u_size + u for j in range(r_size)] for first in firsts for u in range(u_size)]
    return ulysses, ring


def _with_attention_groups(dims: ParallelDims, timeout: timedelta) -> ParallelDims:
    """Ulysses takes the cp group; the hybrid builds its groups (``hybrid_group_ranks``) in one
    order on every rank (creating a group is collective)."""
    if dims.cp_method == "ulysses":
        return replace(dims, ulysses_group=dims.cp_group)
    if dims.cp_method != "hybrid":
        return dims
    ulysses, ring = (dist.new_subgroups_by_enumeration(ranks, timeout=timeout)[0] for ranks in hybrid_group_ranks(dims))
    return replace(dims, ulysses_group=ulysses, ring_group=ring)


def _destroy_process_group() -> None:
    if dist.is_initialized() and not _peer_lost:
        dist.destroy_process_group()


_peer_lost = False  # after a collective timeout, teardown could wait on the silent rank forever


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than parallel.timeout_s: a rank hung or died."""


def is_peer_failure(e: BaseException) -> bool:
    """An error from a collective that a silent or dead peer explains: gloo's timeouts are
    RuntimeErrors saying so; NCCL's (with TORCH_NCCL_BLOCKING_WAIT=1, set by the command) and
    its aborted or broken communicators are ``DistBackendError``s, whatever their text."""
    if isinstance(e, dist.DistBackendError):
        return True
    return isinstance(e, RuntimeError) and re.search(r"time[d ]*out", str(e), re.IGNORECASE) is not None


@contextlib.contextmanager
def collective_timeouts(pd: ParallelDims) -> Iterator[None]:
    """Turn a timed-out collective into :class:`CollectiveTimeout` naming the silent ranks.

    The ranks still alive meet in a monitored barrier on a gloo group of their own, which
    reports the ranks that do not arrive (gloo's and NCCL's own timeouts name none).
    """
    try:
        yield
    except CollectiveTimeout:  # already named (wait_for_rank0)
        raise
    except RuntimeError as e:  # DistBackendError is one
        if pd.world_size == 1 or not is_peer_failure(e):
            raise
        raise peer_lost(pd, silent_ranks(pd), f"a collective waited more than parallel.timeout_s={pd.timeout_s} s") from None


def peer_lost(pd: ParallelDims, silent: list[int], what: str) -> CollectiveTimeout:
    """The one line that ends the job; teardown is skipped from here on (it would wait on the silent ranks)."""
    global _peer_lost
    _peer_lost = True
    who = f"rank(s) {', '.join(map(str, silent))} did not answer" if silent else "rank 0 did not answer"
    return CollectiveTimeout(f"{what}: {who} (hung or dead); stopping the job")


def _failed_ranks(e: RuntimeError) -> list[int]:
    """The ranks a failed monitored barrier names (on rank 0; other ranks learn nothing)."""
    if found := re.search(r"[Rr]anks? ([\d, ]+) failed to pass", str(e)):
        return [int(r) for r in found.group(1).replace(",", " ").split()]
    return []


def silent_ranks(pd: ParallelDims) -> list[int]:
    """Ranks that miss a monitored barrier (known on rank 0; other ranks learn nothing)."""
    try:
        dist.monitored_barrier(group=pd.health_group, timeout=timedelta(seconds=min(pd.timeout_s, 30)), wait_all_ranks=True)
    except RuntimeError as e:
        return _failed_ranks(e)
    return []


def wait_for_rank0(pd: ParallelDims, wait_s: int) -> None:
    """Every rank meets here after rank 0 worked alone (preparing data), on the gloo health
    group, never on the training group: NCCL's timeout (``parallel.timeout_s``, enforced by
    its watchdog) would fire while rank 0 is busy for longer, and would name nobody.

    The other ranks wait up to ``wait_s`` (``parallel.prepare_timeout_s``) for rank 0;
    rank 0, arriving last, waits ``parallel.timeout_s`` for them and names any that does
    not come (hung or dead meanwhile).
    """
    if pd.world_size == 1:
        return
    timeout = pd.timeout_s if pd.is_rank0 else wait_s
    try:
        dist.monitored_barrier(group=pd.health_group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as e:
        what = (
            f"the ranks' meeting after rank 0 prepared the data timed out (parallel.prepare_timeout_s={wait_s} s, "
            f"parallel.timeout_s={pd.timeout_s} s)"
        )
        raise peer_lost(pd, _failed_ranks(e), what) from None


def all_reduce_sum(t: torch.Tensor, pd: ParallelDims) -> torch.Tensor:
    """Sum over every rank (dp and cp): loss sums and token counts."""
    if pd.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, pd: ParallelDims) -> torch.Tensor:
    """Maximum over every rank: flags that any one rank may raise."""
    if pd.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
