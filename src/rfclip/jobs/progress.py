"""One progress display for a whole job (rank 0 under torchrun) and the gathering of every rank's counts.

On a terminal: a tqdm bar (images done, images/s, ETA). Elsewhere (logs of batch jobs): a line every
:data:`LOG_EVERY_SECONDS` with the same numbers, so a short run prints nothing and a long one shows how far it is.
Under torchrun rank 0 counts its own images and estimates the job's pace as ``world_size`` times its own (every rank
runs about equally fast), as ``rfclip eval`` does.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import time
from pathlib import Path

LOG_EVERY_SECONDS = 30.0
RUN_FILE = "run.json"  # a job's summary in its output folder, written by rank 0


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, world_size: int = 1, enabled: bool = True, unit: str = "img"):
        from tqdm import tqdm

        self.total, self.world, self.enabled = total, world_size, enabled
        self.done = 0  # this rank's
        self.start = time.perf_counter()
        self._last_log = self.start
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, disable=not self.tty, dynamic_ncols=True,
                        leave=False)

    def rate(self) -> float:
        """Images per second of the whole job (estimated from this rank's pace)."""
        return self.world * self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.tty:
            self.bar.total = self.total  # tqdm's own rate counts only this rank: show the job's
            self.bar.update(self.world * n)
            self.bar.set_postfix_str(f"{self.rate():.2f} img/s" + (" (all ranks)" if self.world > 1 else ""),
                                     refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        done = min(self.world * self.done, self.total)
        rate = self.rate()
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        return (f"rfclip: {done}/{self.total} images ({100 * done / max(self.total, 1):.0f}%), {rate:.2f} img/s, "
                f"ETA {format_seconds(eta) if eta != float('inf') else '?'}")

    def write(self, text: str, file=None) -> None:
        """Print a line without breaking the bar."""
        if self.tty:
            self.bar.write(text, file=file or sys.stdout)
        else:
            print(text, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        self.bar.close()


def gather(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- counts
@dataclasses.dataclass
class Counts:
    rank: int = 0
    host: str = dataclasses.field(default_factory=socket.gethostname)
    device: str = ""
    written: int = 0
    files: int = 0
    done_before: int = 0
    failed: list = dataclasses.field(default_factory=list)  # [{"image", "reason"}]
    seconds: float = 0.0  # wall time of the loop (first batch read to last file written)
    cpu_seconds: float = 0.0  # CPU time of this process over the loop (all its threads; not loader workers)
    held: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["images_per_s"] = round(self.written / self.seconds, 3) if self.seconds > 0 else None
        d["failed"] = len(self.failed)
        d.pop("held")
        return d


def run_outcome(per_rank: list, failed: list[dict], world_size: int, started: float) -> dict:
    """The part of a ``run.json`` every job shares: failures, ranks, each rank's counts and speed, wall time."""
    return {
        "failed": failed,
        "world_size": world_size,
        "per_rank": [c.as_dict() for c in per_rank],
        "wall_seconds": round(time.time() - started, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run_file(out: Path, summary: dict) -> Path:
    """``OUT/run.json`` (rank 0, at the end of a job), whole or not at all; an OSError is the caller's to word."""
    from .._io import atomic_open

    with atomic_open(out / RUN_FILE, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
    return out / RUN_FILE
