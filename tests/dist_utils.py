"""Run a function on N gloo ranks on the CPU, for distributed tests."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks are forked from a server process that has imported torch and the trainer once per
# test process; a spawned rank imports them afresh, ~2-3 s of CPU each, which on 2 cores is
# most of a small distributed check. The server has run nothing (no thread pool, no process
# group), so forking it is safe; each rank then takes the caller's environment, as a
# spawned one would.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "longtrain.trainer.builder"])


def _worker(rank: int, fn: Callable[..., None], world_size: int, init_file: str, environ: dict[str, str],
            args: tuple[Any, ...]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)  # N ranks share a few cores; oversubscription makes them crawl
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., None], world_size: int, *args: Any, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    ``fn`` must be a module-level function (it is pickled by name). A rank that raises
    fails the caller with that rank's traceback and stops the others; ranks still running
    after ``timeout`` seconds (a deadlock) are killed and a TimeoutError is raised.
    """
    with tempfile.TemporaryDirectory() as tmp:
        # A FileStore rendezvous: no port to pick, so no race with other test processes.
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(
            _worker, args=(fn, world_size, init_file, dict(os.environ), args), nprocs=world_size, join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                    p.join()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout:.0f}s")


def cp_groups(rank: int, world_size: int, layouts: dict[int, list[list[int]]]) -> dict[int, dist.ProcessGroup]:
    """{cp: this rank's group} from ``layouts`` = {cp: [ranks of each group]}; every rank
    builds every group in the same order (new_group is collective)."""
    groups = {}
    for cp, layout in layouts.items():
        for ranks in layout:
            group = dist.group.WORLD if len(ranks) == world_size else dist.new_group(ranks)
            if rank in ranks:
                groups[cp] = group
    return groups


def gather_unshard(local: torch.Tensor, group: dist.ProcessGroup, dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's zigzag shard along ``dim``."""
    from longtrain.parallel.sharding import zigzag_unshard

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return zigzag_unshard(parts, len(parts), dim=dim)
