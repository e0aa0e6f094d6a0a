"""Jobs over many images: the pieces ``rfclip segment`` runs on, reusable by any command that makes files per image.

* :mod:`.inputs`: list the images (folders, ``--recursive``, ``--list FILE``, WebDataset tar shards), name their
  outputs, decode them in DataLoader workers;
* :func:`plan_parts` / :func:`rank_parts`: deterministic shares for torchrun ranks;
* :mod:`.resume`: the settings id recorded in every output, the lock on the output folder;
* :mod:`.writer`: the background writer; :mod:`.progress`: one progress line for the job, counts gathered over ranks;
* :func:`interrupt_on_sigterm`: SIGTERM (``timeout``, docker, Slurm, torchrun) handled like Ctrl-C.

``rfclip segment`` puts them together in :mod:`.segment`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from .inputs import Inputs, Item, ItemDataset, collate, list_inputs  # noqa: F401


def plan_parts(items: list[Item], part_size: int, by_shard: bool = False) -> list[list[int]]:
    """The job's units of work, in input order: consecutive runs of ``part_size`` item indices, or, with
    ``by_shard``, one part per tar shard (files between shards in runs of ``part_size``). Parts do not depend on
    the number of processes, so every image is processed in the same batch whatever the world size."""
    if part_size < 1:
        raise ValueError(f"part_size must be at least 1, got {part_size}")
    parts: list[list[int]] = []
    run: list[int] = []
    shard = None
    for index, item in enumerate(items):
        key = item.shard if by_shard else -1
        if run and (len(run) == part_size and key == -1 or key != shard):
            parts.append(run)
            run = []
        shard = key
        run.append(index)
    if run:
        parts.append(run)
    return parts


def rank_parts(parts: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Part ``p`` goes to rank ``p % world_size``: over all ranks every part exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return parts[rank::world_size]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs; exits with status 143."""

    exit_status = 143


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` in the main thread (the previous handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
