"""Resuming a job, and one job per output folder at a time.

Every output records the settings it was made with: the per-image JSON in full (``job``) and by id
(``settings_id``, a hash of those settings), the PNGs by id in a text chunk, COCO records and WebDataset members by
id. A rerun skips an image whose outputs of every asked format are there with the same id; an output made with
other settings stops the run before the model loads, naming ``--overwrite``. Files appear whole or not at all
(:func:`rfclip._io.atomic_open`), so a killed run leaves complete images and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from ..errors import RfclipError

LOCK_NAME = ".rfclip.lock"
PARTS_DIR = ".rfclip-parts"  # per-process COCO JSON Lines parts, merged into coco.jsonl at the end of a run


def settings_id(settings: dict) -> str:
    """A short stable hash of the settings that decide the outputs (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def settings_difference(old: dict, new: dict) -> str:
    """``"method naclip (now clearclip)"``: the first setting that differs, for the refusal message."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before = json.dumps(old.get(key), default=str)
            after = json.dumps(new.get(key), default=str)
            if len(before) + len(after) > 120:
                return f"{key} differs"
            return f"{key} {before} (now {after})"
    return "the settings differ"


# ---------------------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def output_lock(out: Path, hold: bool = True) -> Iterator[None]:
    """Hold ``OUT/.rfclip.lock`` (an exclusive ``flock``) for the run: a second run on the same folder is refused
    with the first one's host and process id. Under torchrun only rank 0 holds it (``hold``); the kernel releases
    it when the process dies, and the file is removed at the end of the run."""
    if not hold:
        yield
        return
    import fcntl

    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise RfclipError(f"output folder {out} is in use by another rfclip run ({holder}); wait for it to "
                              "finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def job_folder_lock(out: Path, is_main: bool) -> Iterator[None]:
    """:func:`output_lock` for a job of one or more torchrun ranks: rank 0 takes the lock, every rank raises its
    refusal, and once held rank 0 removes what a killed run left (:func:`remove_stale_temporary_files`)."""
    from .progress import gather

    with contextlib.ExitStack() as stack:
        lock_error = None
        try:
            stack.enter_context(output_lock(out, hold=is_main))
        except RfclipError as err:
            lock_error = str(err)
        lock_error = next((e for e in gather(lock_error) if e), None)
        if lock_error:
            raise RfclipError(lock_error)
        if is_main:
            remove_stale_temporary_files(out)  # of a run that was killed outright; we hold the lock
        yield


def remove_stale_temporary_files(out: Path) -> int:
    """Remove the temporary files a killed run (SIGKILL, a crashed node) left in ``out``: hidden names containing
    ``.rfclip-tmp`` (staged outputs, and :func:`rfclip._io.atomic_open`'s files for them). Safe only under the
    folder's lock: no other run writes there. Returns how many were removed."""
    from ..outputs import TEMP_SUFFIX

    removed = 0
    stack = [out]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.name.startswith(".") and TEMP_SUFFIX in entry.name:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- what is done
def json_record_id(path: Path) -> tuple[str | None, dict | None]:
    """``(settings_id, job settings)`` of a per-image JSON (``(None, None)`` when unreadable or without them)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return record.get("settings_id"), record.get("job")
    except (OSError, ValueError, AttributeError):
        return None, None


def read_jsonl_ids(paths: list[Path]) -> dict[str, str]:
    """``name -> settings_id`` over COCO JSON Lines files (later files win; a torn last line is ignored)."""
    done: dict[str, str] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a kill: that image is done again
                    done[record["name"]] = record.get("settings_id")
        except OSError:
            continue
    return done


def coco_part_files(out: Path) -> list[Path]:
    parts = out / PARTS_DIR
    return sorted(parts.glob("coco-*.jsonl")) if parts.is_dir() else []


def tar_settings_id(path: Path) -> str | None:
    """The settings id recorded in a result shard (its first JSON member), or None."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    return json.load(tar.extractfile(member)).get("settings_id")
    except (tarfile.TarError, OSError, ValueError, AttributeError):
        return None
    return None
