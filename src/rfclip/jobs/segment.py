"""``rfclip segment`` over a whole dataset: sharded over torchrun ranks, resumable, written in the background.

Steps (each rank): :func:`plan` its parts and what of them is still to do (before the model loads), load the model,
then :func:`segment_parts` (decode ahead in DataLoader workers, predict a batch, hand its writes to the background
writer), and at the end rank 0 merges the COCO parts and writes ``run.json`` (:func:`finish`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import RfclipError
from ..outputs import (TEMP_SUFFIX, output_paths, png_settings_id, segmentation_record, staged_path,
                       summary, write_outputs)
from . import ItemDataset, collate, plan_parts, rank_parts
from .inputs import Inputs, Item
from .progress import RUN_FILE, Counts, Progress, barrier, gather, run_outcome, write_run_file
from .resume import (PARTS_DIR, coco_part_files, json_record_id, read_jsonl_ids, settings_difference, settings_id,
                     tar_settings_id)

COCO_FILE = "coco.jsonl"
DEFAULT_SHARD_SIZE = 1000  # images per result shard when the inputs are not tar shards
# DataLoader decoding processes by device when not given: on CPU the model already uses every core (see evaluate).
DEFAULT_LOADER_WORKERS = {"cuda": 4, "cpu": 0}
# "far more expensive than usual": a usual run is a few dozen crops per image and a few thousand prompts.
MANY_CROPS = 10_000
MANY_PROMPTS = 50_000


@dataclasses.dataclass
class JobOptions:
    out: Path
    formats: tuple[str, ...]
    settings: dict  # what decides the outputs (see job_settings); recorded in each of them
    images_per_batch: int = 4
    overwrite: bool = False
    overlay_opacity: float = 0.5
    quiet: bool = False
    num_workers: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    checkpoint: str | None = None

    @property
    def settings_id(self) -> str:
        return settings_id(self.settings)


@dataclasses.dataclass
class Plan:
    """This rank's share: its parts, and for each the item indices still to do."""

    parts: list[list[int]]  # all parts of the job
    mine: list[int]  # indices into parts
    todo: dict[int, list[int]]  # part index -> item indices to segment
    done_before: int  # this rank's images whose outputs were complete with these settings


def job_settings(classes, method: str, options: dict, model: str, pretrained: str | None, checkpoint: str | None,
                 quick_gelu: bool | None, masks: str | None = None) -> dict:
    """The settings that decide a job's outputs, known before the model loads: classes with synonyms, method and
    its options, the inference settings (library defaults filled in; crops per forward and compilation left out:
    they change speed, not masks), the weights."""
    from ..inference import InferenceConfig
    from ..text import parse_classes

    config_names = InferenceConfig.field_names()
    config = dataclasses.asdict(InferenceConfig(**{k: v for k, v in options.items() if k in config_names}))
    for speed_only in ("batch_size", "compile"):
        config.pop(speed_only)
    vocabulary = parse_classes(classes) if isinstance(classes, str) else classes
    return json.loads(json.dumps({
        "classes": [[str(s) for s in c] if isinstance(c, (list, tuple)) else [str(c)] for c in vocabulary],
        "method": method,
        "method_options": {k: v for k, v in options.items() if k not in config_names},
        "inference": config,
        "model": model if checkpoint is None else None,
        "pretrained": pretrained if checkpoint is None else None,
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        "quick_gelu": quick_gelu,
        "masks": masks,  # the --masks SPEC of methods that use region masks
    }, default=str))


# ---------------------------------------------------------------------------------------------- where things go
def shard_output(job: JobOptions, inputs: Inputs, part: list[int], part_index: int) -> Path:
    """The result shard of a part: beside the input shard's name (``OUT/000123.tar``), or ``results-NNNNNN.tar``."""
    first = inputs.items[part[0]]
    if first.shard >= 0:
        return job.out / Path(inputs.shards[first.shard]).name
    return job.out / f"results-{part_index:06d}.tar"


def item_files(job: JobOptions, item: Item) -> dict[str, Path]:
    return output_paths(job.out, item.name, job.formats)


# ---------------------------------------------------------------------------------------------- plan
def plan(job: JobOptions, inputs: Inputs, rank: int = 0, world_size: int = 1) -> Plan:
    """This rank's parts and what is left of them. Outputs made with other settings are an error naming
    ``--overwrite`` (checked on every rank for its share; every rank raises the first one found)."""
    by_shard = "webdataset" in job.formats
    parts = plan_parts(inputs.items, job.shard_size if by_shard else job.images_per_batch, by_shard=by_shard)
    mine = list(range(rank, len(parts), world_size))
    assert [parts[p] for p in mine] == rank_parts(parts, rank, world_size)
    sid = job.settings_id
    coco_done = read_jsonl_ids([job.out / COCO_FILE, *coco_part_files(job.out)]) if "coco" in job.formats else {}
    todo: dict[int, list[int]] = {}
    conflicts: list[str] = []
    done_before = 0
    for p in mine:
        part = parts[p]
        if job.overwrite:
            todo[p] = list(part)
            continue
        redo_all = False
        if by_shard:
            shard = shard_output(job, inputs, part, p)
            if shard.exists():
                found = tar_settings_id(shard)
                if found != sid:
                    conflicts.append(f"{shard} was made with other settings")
            else:
                redo_all = True
        left = []
        for i in part:
            state = item_state(job, inputs.items[i], sid, coco_done)
            if state not in ("done", "todo"):
                conflicts.append(state)
            elif state == "todo" or redo_all:
                left.append(i)
        if by_shard and left:  # a result shard is written whole: all of its images again
            left = list(part)
        todo[p] = left
        done_before += len(part) - len(left)
    problems = [c for rank_conflicts in gather(conflicts) for c in rank_conflicts]
    if problems:
        raise RfclipError(f"{problems[0]}" + (f" (and {len(problems) - 1} more outputs)" if len(problems) > 1 else "")
                          + "; rerun with --overwrite to replace them, or choose another --out")
    return Plan(parts=parts, mine=mine, todo=todo, done_before=done_before)


def item_state(job: JobOptions, item: Item, sid: str, coco_done: dict[str, str]) -> str:
    """``"done"`` (every asked output there, made with these settings), ``"todo"``, or why it conflicts."""
    files = item_files(job, item)
    complete = True
    for key, path in files.items():
        if not path.exists():
            complete = False
            continue
        if key == "json":
            found, old = json_record_id(path)
            if found != sid:
                diff = settings_difference(old, job.settings) if isinstance(old, dict) else "made without a settings record"
                return f"{path} was made with other settings ({diff})"
        elif png_settings_id(path) != sid:
            return f"{path} was made with other settings"
    if "coco" in job.formats:
        found = coco_done.get(item.name)
        if found is None:
            complete = False
        elif found != sid:
            return f"{job.out / COCO_FILE} holds {item.name} made with other settings"
    return "done" if complete else "todo"


# ---------------------------------------------------------------------------------------------- cost
def cost_note(settings: dict, image_size: tuple[int, int] | None, num_templates: int = 80) -> str | None:
    """One line when a run will be far more expensive than usual: a sliding window giving over
    :data:`MANY_CROPS` crops per image, or over :data:`MANY_PROMPTS` prompts to embed."""
    cfg = settings["inference"]
    notes = []
    with contextlib.suppress(RfclipError):  # settings that need the model to be judged are checked once it is loaded
        notes += _crop_note(cfg, image_size)
    prompts = sum(len(c) for c in settings["classes"]) * num_templates
    if prompts > MANY_PROMPTS:
        notes.append(f"{prompts} prompts to embed ({len(settings['classes'])} classes x {num_templates} templates)")
    if not notes:
        return None
    return "rfclip: note: this run is far more expensive than usual: " + "; ".join(notes)


def _crop_note(cfg: dict, image_size: tuple[int, int] | None) -> list[str]:
    from ..inference import rescale_size, sliding_windows

    notes = []
    if image_size is not None and cfg.get("slide_crop"):
        h, w = rescale_size(image_size[0], image_size[1], cfg.get("short_side"))
        crop, stride = cfg["slide_crop"], cfg["slide_stride"]
        crops = len(sliding_windows(h, w, crop, stride)) if crop < max(h, w) else 1
        if crops > MANY_CROPS:
            notes.append(f"{crops} crops per {image_size[1]}x{image_size[0]} image (--slide-stride {stride} on "
                         f"{w}x{h}; a stride of {max(crop // 2, 1)} gives "
                         f"{len(sliding_windows(h, w, crop, max(crop // 2, 1)))})")
    return notes


def first_image_size(item: Item) -> tuple[int, int] | None:
    """``(height, width)`` from the image header (no decoding), or None when it cannot be read."""
    import io

    from PIL import Image, ImageOps

    try:
        if item.member is None:
            pil = Image.open(item.source)
        else:
            with open(item.source, "rb") as f:
                f.seek(item.offset)
                pil = Image.open(io.BytesIO(f.read(item.size)))
        with pil:
            w, h = pil.size
            if ImageOps.exif_transpose is not None and pil.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
        return h, w
    except (OSError, ValueError, SyntaxError):
        return None


# ---------------------------------------------------------------------------------------------- run
def error_line(message: str) -> None:
    """``rfclip: error: <message>`` on one line of stderr, as the command line prints its errors."""
    print("rfclip: error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


class SkipReporter:
    """One line per skipped image; held back until an image succeeds, so that a run where nothing can be read
    ends with one line instead of one per image."""

    def __init__(self, write: Callable[[str], None]):
        self.write, self.held, self.live = write, [], False

    def report(self, message: str) -> None:
        if self.live:
            self.write(message)
        else:
            self.held.append(message)

    def success(self) -> None:
        if not self.live:
            self.live = True
            for message in self.held:
                self.write(message)
            self.held = []


def segment_parts(job: JobOptions, inputs: Inputs, the_plan: Plan, segmenter, text, world_size: int = 1,
                  rank: int = 0, progress_enabled: bool = True, say: Callable[[str], None] | None = None) -> Counts:
    """Segment this rank's images (decoded ahead, written in the background); returns its counts."""
    from torch.utils.data import DataLoader

    from .writer import BackgroundWriter

    counts = Counts(rank=rank, device=str(segmenter.device), done_before=the_plan.done_before)
    batches, batch_part, last_batch_of_part = [], [], {}
    for p in the_plan.mine:
        left = the_plan.todo[p]
        for s in range(0, len(left), job.images_per_batch):
            batches.append(left[s:s + job.images_per_batch])
            batch_part.append(p)
            last_batch_of_part[p] = len(batches) - 1
    totals = gather(sum(len(b) for b in batches))
    num_workers = job.num_workers
    if num_workers is None:
        num_workers = DEFAULT_LOADER_WORKERS.get(segmenter.device.type, 4)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(num_workers, len(batches), cores)
    loader = DataLoader(ItemDataset(inputs.items), batch_sampler=batches, collate_fn=collate, num_workers=workers,
                        persistent_workers=False) if batches else []
    progress = Progress(sum(totals), world_size=world_size, enabled=progress_enabled and rank == 0 and not job.quiet)
    skips = SkipReporter(lambda m: (progress.bar.clear() if progress.tty else None, error_line(f"{m} (skipped)")))
    sinks = Sinks(job, inputs, rank, the_plan.parts)
    writer = BackgroundWriter(depth=2 * job.images_per_batch)
    per_image_lines = world_size == 1 and not job.quiet
    noted: set[str] = set()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        for b, batch in enumerate(loader):
            t0 = time.perf_counter()
            good = []
            for entry in batch:
                if entry["error"] is None:
                    entry["error"] = attach_region_map(segmenter, entry, inputs.items[entry["index"]])
                if entry["error"] is not None:
                    item = inputs.items[entry["index"]]
                    counts.failed.append({"image": item.label, "reason": entry["error"]})
                    skips.report(entry["error"])
                    progress.update(1)
                else:
                    good.append(entry)
            if good:
                maps = [e["regions"] for e in good] if "regions" in good[0] else None
                results = segmenter.segment_batch([e["image"] for e in good], text, return_probs=False, masks=maps)
                seconds = (time.perf_counter() - t0) / len(good)
                for entry, seg in zip(good, results):
                    item = inputs.items[entry["index"]]
                    seg.input_conversion = entry["conversion"]
                    writer.submit(sinks.write_image, item, entry["image"], seg, seconds, batch_part[b])
                    counts.written += 1
                    counts.files += len(item_files(job, item))
                    skips.success()
                    conv = entry["conversion"]
                    if conv and conv not in noted and not job.quiet:
                        noted.add(conv)
                        progress.write(f"rfclip: note: {item.label} is {conv} (recorded as input_conversion in its "
                                       "JSON)", file=sys.stderr)
                    if per_image_lines:
                        files = item_files(job, item)
                        shown = files.get("overlay") or files.get("mask") or files.get("json")
                        progress.write(f"{item.label}: {summary(seg)}" + (f" -> {shown}" if shown else ""))
                    progress.update(1)
            if last_batch_of_part.get(batch_part[b]) == b:
                writer.submit(sinks.finish_part, batch_part[b], the_plan.parts[batch_part[b]])
        writer.close()
        counts.seconds = round(time.perf_counter() - start, 3)
        counts.cpu_seconds = round(time.process_time() - cpu_start, 3)
        if world_size > 1:  # other ranks may have succeeded: say what this one skipped
            skips.success()
    except BaseException:
        writer.abort()
        sinks.discard()
        raise
    finally:
        progress.close()
        sinks.close()
    counts.held = skips.held  # not printed: nothing could be read (the caller says it in one line)
    return counts


def attach_region_map(segmenter, entry: dict, item: Item) -> str | None:
    """For methods that need masks: put the image's region map from the segmenter's mask source into ``entry``
    (saved maps are found by the input's file name, a tar member's own name). Returns why it failed, or None: an
    image without a usable map is skipped like an unreadable one."""
    source = getattr(segmenter, "masks", None)
    if not getattr(segmenter.method, "needs_masks", False) or source is None:
        return None
    from ..masks import check_region_map

    try:
        region_map = source(entry["image"], item.source if item.member is None else item.member)
        entry["regions"] = check_region_map(region_map, entry["image"].shape[:2], name=f"region map of {item.label}")
    except RfclipError as err:
        return str(err)
    return None


class Sinks:
    """Where one rank's results go: the per-image files, its COCO part file, its result shards."""

    def __init__(self, job: JobOptions, inputs: Inputs, rank: int, parts: list[list[int]]):
        self.job, self.inputs, self.rank, self.parts = job, inputs, rank, parts
        self.sid = job.settings_id
        self.coco_fd: int | None = None
        self.shard_writer = None  # (webdataset.TarWriter, staged path, target path)

    # per image ------------------------------------------------------------------------------------
    def write_image(self, item: Item, rgb, seg, seconds: float, part: int) -> None:
        job = self.job
        files = item_files(job, item)
        record = segmentation_record(item.label, seg, None, files, seconds, run=dict(seg.meta or {}))
        record["input_conversion"] = seg.input_conversion
        record["name"] = item.name
        record["settings_id"] = self.sid
        record["job"] = job.settings
        if files:
            write_outputs(files, rgb, seg, record, job.overlay_opacity, settings_id=self.sid)
        if "coco" in job.formats:
            self._coco(item, seg, record)
        if "webdataset" in job.formats:
            self._shard_sample(item, seg, record, part)

    def _coco(self, item: Item, seg, record: dict) -> None:
        line = json.dumps({"name": item.name, "image": item.label, "height": int(seg.mask.shape[0]),
                           "width": int(seg.mask.shape[1]), "settings_id": self.sid,
                           "classes": list(seg.classes), "fractions": record["fractions"],
                           "annotations": seg.to_coco_rle()}) + "\n"
        try:
            if self.coco_fd is None:
                parts = self.job.out / PARTS_DIR
                parts.mkdir(exist_ok=True)
                name = f"coco-{socket.gethostname()}-{os.getpid()}-r{self.rank}.jsonl"
                self.coco_fd = os.open(parts / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self.coco_fd, line.encode("utf-8"))  # one write per record: a kill cuts at most the last line
        except OSError as err:
            raise RfclipError(f"cannot write outputs to {self.job.out / PARTS_DIR}: {err.strerror or err}; check the "
                              "free space and permissions of --out") from None

    def _shard_sample(self, item: Item, seg, record: dict, part: int) -> None:
        import io

        import webdataset as wds

        from ..viz import mask_image

        if self.shard_writer is None:
            target = shard_output(self.job, self.inputs, self.parts[part], part)
            staged = staged_path(target)
            self.shard_writer = (wds.TarWriter(str(staged)), staged, target)
        buf = io.BytesIO()
        mask_image(seg.mask, len(seg.classes)).save(buf, format="PNG")
        key = item.name.split("/", 1)[1] if item.shard >= 0 else item.name
        head, _, base = key.rpartition("/")  # WebDataset keys end at the first dot of a member's name
        key = (head + "/" if head else "") + base.replace(".", "_")
        try:
            self.shard_writer[0].write({"__key__": key, "mask.png": buf.getvalue(),
                                        "json": json.dumps(record, default=str).encode("utf-8")})
        except OSError as err:
            raise RfclipError(f"cannot write outputs to {self.shard_writer[1]}: {err.strerror or err}; check the free "
                              "space and permissions of --out") from None

    def finish_part(self, part: int, items: list[int]) -> None:
        """A part is done: its result shard (if any) is renamed into place."""
        if self.shard_writer is None:
            return
        tar, staged, target = self.shard_writer
        self.shard_writer = None
        try:
            tar.close()
            os.replace(staged, target)
        except OSError as err:
            raise RfclipError(f"cannot write outputs to {target}: {err.strerror or err}; check the free space and "
                              "permissions of --out") from None
        finally:
            if staged.exists():
                staged.unlink()

    def discard(self) -> None:
        """After an error or an interrupt: the unfinished shard goes."""
        if self.shard_writer is not None:
            tar, staged, _ = self.shard_writer
            self.shard_writer = None
            try:
                tar.close()
            except Exception:  # noqa: BLE001 - it is removed anyway
                pass
            if staged.exists():
                staged.unlink()

    def close(self) -> None:
        self.discard()
        if self.coco_fd is not None:
            os.close(self.coco_fd)
            self.coco_fd = None


# ---------------------------------------------------------------------------------------------- finish
def merge_coco(out: Path, inputs: Inputs) -> Path:
    """``coco.jsonl`` from the earlier file and every process's parts: one record per image, in input order; the
    parts are removed."""
    from .._io import atomic_open

    records: dict[str, str] = {}
    sources = [out / COCO_FILE, *coco_part_files(out)]
    for path in sources:
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records[json.loads(line)["name"]] = line if line.endswith("\n") else line + "\n"
                except (ValueError, KeyError):
                    continue
    order = {item.name: i for i, item in enumerate(inputs.items)}
    with atomic_open(out / COCO_FILE, "w", encoding="utf-8") as f:
        for name in sorted(records, key=lambda n: (order.get(n, len(order)), n)):
            f.write(records[name])
    for path in sources[1:]:
        path.unlink()
    try:
        (out / PARTS_DIR).rmdir()
    except OSError:
        pass
    return out / COCO_FILE


def finish(job: JobOptions, inputs: Inputs, counts: Counts, world_size: int, started: float, argv=None) -> dict:
    """Gather every rank's counts; rank 0 merges the COCO parts and writes ``run.json``. Returns the run summary
    (on every rank)."""
    per_rank = gather(counts)
    barrier()  # every rank's files are in place
    failed = [f for c in per_rank for f in c.failed] + [{"image": i, "reason": r} for i, r in inputs.problems]
    summary_ = {
        "rfclip_version": __version__,
        "command": list(argv) if argv is not None else sys.argv,
        "out": str(job.out),
        "formats": list(job.formats),
        "settings_id": job.settings_id,
        "settings": job.settings,
        "counts": {"inputs": len(inputs.items) + len(inputs.problems),
                   "segmented": sum(c.written for c in per_rank),
                   "skipped_done_before": sum(c.done_before for c in per_rank),
                   "failed": len(failed)},
        **run_outcome(per_rank, failed, world_size, started),
    }
    if counts.rank == 0 and (summary_["counts"]["segmented"] or summary_["counts"]["skipped_done_before"]):
        try:
            if "coco" in job.formats:
                merge_coco(job.out, inputs)
            write_run_file(job.out, summary_)
        except OSError as err:
            raise RfclipError(f"cannot write {job.out / RUN_FILE} (or {COCO_FILE}): {err.strerror or err}; check the "
                              "free space and permissions of --out, then rerun the command (the images are done)") from None
    summary_["files"] = sum(c.files for c in per_rank)
    return summary_


def leftover_temporary_files(out: Path) -> list[Path]:
    """rfclip's temporary files under ``out`` (none after any run, finished or interrupted)."""
    return [p for p in out.rglob("*") if p.name.endswith((TEMP_SUFFIX, ".tmp"))]

