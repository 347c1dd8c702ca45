"""Distributed profiling over ``torch.distributed`` (gloo on CPUs).

Every worker runs the same forward and backward passes (deterministic, so every worker holds the
same statistics) and scores its share of the candidate schemes: column ``j`` of the table is
scored by rank ``j mod world``. After each block the workers exchange their columns, so every
worker ends with the whole table, cell for cell the numbers one worker computes (each cell is
computed by the same function on the same inputs). Scoring dominates a profile with many
candidates (every scheme quantizes every Linear; GPTQ and AWQ search), so it is what is split.

Launch: ``bitplan profile ... --workers N`` spawns N local processes (rendezvous through a file);
under ``torchrun`` (``WORLD_SIZE`` set) the profile joins the launcher's group instead, e.g. on
two machines sharing ``BITPLAN_CACHE`` on a network file system:

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST --master-port 29500 \\
        --no-python bitplan profile MODEL ...

Rank 0 writes the cache (the block files of a resumable profile and the table); all ranks read
the resume point before any is written.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the running profile: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_launcher_group() -> None:
    """Join the process group a launcher (``torchrun``) describes in the environment, once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def share_columns(scores: torch.Tensor, sizes: torch.Tensor, rows: list[int], slice_scores: torch.Tensor | None = None) -> None:
    """Fill ``rows`` of ``scores``/``sizes`` (and of each slice's ``slice_scores[s]``) with every
    rank's own columns (column j from rank j mod world)."""
    rank, size = world()
    if size == 1 or not rows:
        return
    index = torch.tensor(rows)
    for table in (scores, sizes, *(slice_scores if slice_scores is not None else ())):
        mine = table[index].contiguous()
        gathered = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(gathered, mine)
        for owner in range(size):
            table[index, owner::size] = gathered[owner][:, owner::size]


def run_workers(workers: int, target, *args) -> None:
    """Run ``target(*args)`` in ``workers`` spawned processes joined in one gloo group."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bitplan-rendezvous-") as folder:
        mp.spawn(_worker, args=(workers, f"file://{folder}/rendezvous", target, args), nprocs=workers, join=True)


def _worker(rank: int, workers: int, init_method: str, target, args) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=workers)
    try:
        target(*args)
    finally:
        dist.destroy_process_group()
