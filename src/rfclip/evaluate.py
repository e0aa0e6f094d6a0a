"""Benchmark evaluation: mIoU of a :class:`~rfclip.segmenter.Segmenter` on one of the 8 benchmarks.

>>> from rfclip import Segmenter
>>> from rfclip.data import build_dataset
>>> from rfclip.evaluate import evaluate
>>> seg = Segmenter("ViT-B-16", "openai", method="naclip")
>>> result = evaluate(seg, build_dataset("voc21", "data/VOCdevkit/VOC2012"), out="results/voc21.json")
>>> result["miou"], result["images_per_s"]

The dataset's :class:`~rfclip.data.EvalSettings` (resize, sliding window, logit scale, thresholds, background class)
are applied to a copy of the segmenter; ``overrides`` change them. DataLoader workers decode the images, several
images go through :meth:`Segmenter.predict` per call (their sliding-window crops share forward passes), and each
mask is compared with its label at the original resolution (:class:`~rfclip.data.IoUAccumulator`).

Multi-GPU / multi-node: under ``torchrun`` (see :func:`distributed_session`) each process takes a deterministic,
interleaved share of the images and the integer intersect / union counts are summed over processes, so the result
equals the single-process one exactly. Shares are made of whole batches of ``images_per_batch`` consecutive images
(batch ``b`` goes to rank ``b % world_size``): every image is predicted in the same batch as in a single-process run,
so even the floating-point work per image is the same. No image is duplicated or dropped (unlike
``DistributedSampler``, which pads the last share with repeats).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from . import __version__
from .constants import CLIP_PIXEL_MEAN, MMSEG_CLIP_MEAN
from .devices import parse_device
from .errors import RfclipError

RESULT_KEYS = ("miou", "aacc", "macc", "iou", "acc", "per_class_iou", "num_images", "images_per_s", "seconds", "counts")


# ------------------------------------------------------------------------------------------------ distributed
@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # the device this process should use (None = the caller's choice)
    backend: str | None = None  # "nccl" | "gloo" when a process group was initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names this process's place in a torchrun job (``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def current_distributed() -> DistributedInfo:
    """Rank and world size of the initialised process group (rank 0 of 1 when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                               local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=dist.get_backend())
    return DistributedInfo()


def _env_int(name: str) -> int:
    value = os.environ.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise RfclipError(f"environment variable {name}={value!r} is not a whole number; "
                          "launch with torchrun") from None


@contextlib.contextmanager
def distributed_session(device: str | torch.device | None = None) -> Iterator[DistributedInfo]:
    """Initialise torch.distributed when launched by torchrun; destroy the process group on exit.

    Each process takes ``cuda:LOCAL_RANK`` (backend nccl) when ``device`` asks for CUDA or is None with CUDA
    available, otherwise the CPU (backend gloo). Outside torchrun nothing is initialised and ``device`` is
    passed through. Multi-node works the same way (torchrun sets ``MASTER_ADDR`` / ``MASTER_PORT``).
    """
    import torch.distributed as dist

    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield current_distributed() if launched_by_torchrun() else DistributedInfo(device=parse_device(device))
        return
    if not dist.is_available():
        raise RfclipError("this PyTorch build has no torch.distributed; run without torchrun")
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    wanted = parse_device(device)
    use_cuda = wanted.type == "cuda" if wanted is not None else torch.cuda.is_available()
    if use_cuda:
        if not torch.cuda.is_available():
            raise RfclipError(f"--device {device} asked for but CUDA is not available here; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise RfclipError(f"process with LOCAL_RANK {local_rank} has no GPU (only {torch.cuda.device_count()} "
                              "visible); start torchrun with --nproc_per_node at most the number of GPUs")
        run_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(run_device)
        backend = "nccl"
    else:
        run_device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            **({"device_id": run_device} if backend == "nccl" else {}))
    try:
        yield DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=run_device,
                              backend=backend)
    finally:
        dist.destroy_process_group()


def shard_batches(num_images: int, images_per_batch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches: consecutive blocks of ``images_per_batch`` indices, block ``b`` going to rank
    ``b % world_size``. Over all ranks every index in ``range(num_images)`` appears exactly once."""
    if images_per_batch < 1:
        raise RfclipError(f"images_per_batch must be at least 1, got {images_per_batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    starts = range(rank * images_per_batch, num_images, world_size * images_per_batch)
    return [list(range(s, min(s + images_per_batch, num_images))) for s in starts]


# ------------------------------------------------------------------------------------------------ settings
def dataset_config_changes(dataset) -> dict[str, Any]:
    """The :class:`~rfclip.inference.InferenceConfig` fields that the dataset's EvalSettings decide."""
    from .constants import LONG_SIDE_CAP

    s = dataset.settings
    if s.long_side != LONG_SIDE_CAP:
        raise RfclipError(f"evaluation settings ask for long side {s.long_side}, but inference caps it at "
                          f"{LONG_SIDE_CAP}; use long_side={LONG_SIDE_CAP}")
    background = dataset.background_class
    return {
        "short_side": s.short_side,
        "slide_crop": s.slide_crop,
        "slide_stride": s.slide_stride,
        "logit_scale": s.logit_scale,
        "prob_thd": s.prob_thd,
        "area_thd": s.area_thd,
        "background_class": 0 if background is None else background,
        "pixel_mean": tuple(s.pixel_mean),
        "pixel_std": tuple(s.pixel_std),
        "pad_crops_to": s.pad_crops_to,
    }


def preset_method_options(segmenter, dataset) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dataset's preset method options split into ``(applied, not applied)``: applied are those the segmenter's
    method takes and its user did not set."""
    from .methods import method_option_names

    options = dict(getattr(dataset.settings, "method_options", {}) or {})
    taken = method_option_names(segmenter.method_name)
    given = getattr(segmenter, "method_options", {})
    applied = {k: v for k, v in options.items() if k in taken and k not in given}
    return applied, {k: v for k, v in options.items() if k not in applied}


def configure(segmenter, dataset, overrides: Mapping[str, Any] | None = None):
    """A copy of ``segmenter`` with the dataset's settings (its inference settings, and the preset's per-dataset
    method options the method takes and the user did not set), then ``overrides`` (InferenceConfig fields)."""
    from .inference import InferenceConfig

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - InferenceConfig.field_names())
    if unknown:
        raise RfclipError(f"unknown inference setting(s) {', '.join(unknown)}; "
                          f"choose from: {', '.join(sorted(InferenceConfig.field_names()))}")
    changes = dataset_config_changes(dataset)
    changes.update(overrides)
    applied, _ = preset_method_options(segmenter, dataset)
    if applied:
        segmenter = segmenter.with_method_defaults(**applied)
    return segmenter.with_config(**changes)


# ------------------------------------------------------------------------------------------------ evaluate
# DataLoader worker processes by the model's device when ``num_workers`` is None. On a GPU, workers decode the next
# images while the forward runs. On CPU the forward already uses every core and decoding a VOC-sized JPEG takes
# milliseconds against about a second of inference per image, so workers only compete for the cores (measured on
# 2 cores, benchmarks/eval_throughput.py: 2 workers 0.90x the speed of decoding in the main process).
DEFAULT_LOADER_WORKERS = {"cuda": 4, "cpu": 0}


def evaluate(segmenter, dataset, limit: int | None = None, num_workers: int | None = None, images_per_batch: int = 4,
             progress: bool = True, out: str | os.PathLike | None = None,
             overrides: Mapping[str, Any] | None = None, masks=None) -> dict:
    """mIoU of ``segmenter`` on ``dataset`` (a :class:`~rfclip.data.SegDataset`).

    Args:
        segmenter: a :class:`~rfclip.segmenter.Segmenter`; it is not changed (a configured copy is used).
        dataset: the benchmark split; its ``settings`` and ``background_class`` set the inference settings.
        limit: evaluate only the first ``limit`` images (in dataset order).
        num_workers: DataLoader processes decoding images (0 = in this process); None: 4 when the model runs on a
            GPU, 0 on CPU (see :data:`DEFAULT_LOADER_WORKERS`).
        images_per_batch: images per :meth:`Segmenter.predict` call (their crops are batched together).
        progress: show a progress bar (rank 0 only) with images/s.
        out: write ``out`` (JSON) and the per-class CSV next to it (same name, ``.csv``); a folder gets
            ``results.json`` and ``results.csv``. Written by rank 0 only, atomically.
        overrides: InferenceConfig fields that take precedence over the dataset's settings.
        masks: a :class:`rfclip.masks.MaskSource` for methods that need region masks (saved ``.npz`` maps are found
            by each image's file name); default: the segmenter's own ``masks``. Ignored by methods without masks.

    Returns:
        ``dict`` with ``miou``, ``aacc``, ``macc`` (%), per-class ``iou`` / ``acc`` lists (NaN for classes absent
        from both prediction and ground truth), ``per_class_iou`` (name -> IoU), ``class_names`` (class 0 of a
        background dataset is "background"), ``counts`` (the summed ``intersect`` / ``union`` / ``pred_area`` /
        ``gt_area``), ``num_images``, ``images_per_s`` and ``seconds`` (prediction loop, all processes together),
        ``settings`` (the inference settings used), ``eval_settings``, ``overrides``, ``dataset``, ``split``,
        ``root``, ``preset``, ``method``, ``method_options``, ``model``, ``device``, ``precision``,
        ``images_per_batch``, ``num_workers`` (the loader processes used), ``world_size``, ``limit`` and ``outputs``
        (the files written, or None).
    """
    from tqdm import tqdm

    from .data import IoUAccumulator, collate

    if limit is not None and limit < 1:
        raise RfclipError(f"limit must be at least 1, got {limit}")
    if num_workers is not None and num_workers < 0:
        raise RfclipError(f"num_workers must be 0 or more, got {num_workers}")
    dist_info = current_distributed()
    seg = configure(segmenter, dataset, overrides)
    if num_workers is None:
        num_workers = DEFAULT_LOADER_WORKERS.get(seg.device.type, 4)
    text = seg.encode_classes(dataset.classes)
    from .segmenter import check_mask_source, masks_needed_error, region_maps_for

    masks = check_mask_source(masks) if masks is not None else getattr(seg, "masks", None)
    uses_masks = bool(getattr(seg.method, "needs_masks", False))
    if uses_masks and masks is None:
        raise masks_needed_error(seg.method_name)
    if text.num_classes != dataset.num_classes:
        raise RfclipError(f"{dataset.name}: {text.num_classes} class names for {dataset.num_classes} classes")

    total = len(dataset) if limit is None else min(limit, len(dataset))
    batches = shard_batches(total, images_per_batch, dist_info.rank, dist_info.world_size)
    # More decoding processes than usable cores only adds contention (and a DataLoader warning).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(num_workers, len(batches), cores)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                        persistent_workers=False)
    accumulator = IoUAccumulator(dataset.num_classes, ignore_index=dataset.ignore_index, device=seg.device)
    world = dist_info.world_size
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=dataset.name, file=sys.stderr,
               disable=not (progress and dist_info.is_main), dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch in loader:
            images = [item["image"] for item in batch]
            regions = None
            if uses_masks:  # each image's region map, by its file (saved maps) or from its pixels (generators)
                paths = [str(dataset.samples[item["index"]][0]) for item in batch]
                regions = region_maps_for(images, paths, source=masks)
            predictions = seg.predict(images, text, return_probs=False, regions=regions)
            for item, (mask, _) in zip(batch, predictions):
                accumulator.update(mask, torch.from_numpy(item["label"]))
            bar.update(len(batch))
            if not bar.disable:
                elapsed = time.perf_counter() - start
                # every rank runs at about this pace; the estimate counts all of them
                rate = world * bar.n / max(elapsed, 1e-9)
                bar.set_postfix_str(f"{rate:.2f} img/s" + (" (all ranks)" if world > 1 else ""))
    finally:
        bar.close()
    accumulator.all_reduce()  # a no-op in a single process; waits for the slowest rank otherwise
    if seg.device.type == "cuda":
        torch.cuda.synchronize(seg.device)
    seconds = time.perf_counter() - start
    metrics = accumulator.compute()
    if metrics["num_images"] != total:
        raise RuntimeError(f"evaluated {metrics['num_images']} images, expected {total}")

    names = list(dataset.class_names)
    if dataset.background_class is not None:  # its first synonym ("sky" on VOC21) would mislabel the table
        names[dataset.background_class] = "background"
    result = {
        "miou": metrics["miou"],
        "aacc": metrics["aacc"],
        "macc": metrics["macc"],
        "iou": metrics["iou"],
        "acc": metrics["acc"],
        "per_class_iou": dict(zip(names, metrics["iou"])),
        "class_names": names,
        "num_images": total,
        "counts": {name: t.tolist() for name, t in accumulator.state.items()},  # dataset sums, for merging runs
        "images_per_s": total / seconds if seconds > 0 else math.nan,
        "seconds": seconds,
        "dataset": dataset.name,
        "split": dataset.split,
        "root": str(dataset.root),
        "preset": dataset.preset,
        "eval_settings": dataset.settings.as_dict(),
        "overrides": dict(overrides or {}),
        "settings": dataclasses.asdict(seg.config),
        "method": seg.method_name,
        "method_options": seg.method.options(),
        "masks": masks.describe() if uses_masks and hasattr(masks, "describe") else None,
        "preset_method_options": preset_method_options(segmenter, dataset)[0],
        "model": seg.clip.describe(),
        "device": str(seg.device),
        "precision": str(seg.amp_dtype).replace("torch.", "") if seg.amp_dtype is not None else "float32",
        "images_per_batch": images_per_batch,
        "num_workers": workers,
        "world_size": world,
        "limit": limit,
        "outputs": None,
    }
    if out is not None and dist_info.is_main:
        json_path, csv_path = write_results(result, out)
        result["outputs"] = {"json": str(json_path), "csv": str(csv_path)}
    return result


# ------------------------------------------------------------------------------------------------ outputs
def result_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``x/name.json`` -> (``x/name.json``, ``x/name.csv``); a folder (existing, or a path without suffix) gets
    ``results.json`` and ``results.csv`` inside it."""
    path = Path(out).expanduser()
    if path.is_dir() or not path.suffix:
        path = path / "results.json"
    return path, path.with_suffix(".csv")


def write_results(result: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the JSON (``result`` = metrics, ``meta`` = how they were obtained) and the per-class CSV, atomically."""
    from .data import write_csv, write_json

    json_path, csv_path = result_paths(out)
    metrics = {k: result[k] for k in RESULT_KEYS}
    meta = {k: v for k, v in result.items() if k not in RESULT_KEYS and k not in ("class_names", "outputs")}
    meta["rfclip_version"] = __version__
    write_json(json_path, metrics, meta=meta, class_names=result["class_names"])
    write_csv(csv_path, metrics, class_names=result["class_names"])
    return json_path, csv_path


# ------------------------------------------------------------------------------------------------ benchmark table
def describe_settings(settings: Mapping[str, Any]) -> str:
    """One line for a settings dict (InferenceConfig fields): resize, window, logit scale, thresholds, PAMR."""
    short = settings.get("short_side")
    crop, stride = settings.get("slide_crop", 0), settings.get("slide_stride")
    parts = [f"short side {short}" if short else "original size",
             f"slide {crop}/{stride}" if crop and crop > 0 else "whole image",
             f"logit scale {settings.get('logit_scale'):g}"]
    if settings.get("prob_thd"):
        parts.append(f"prob_thd {settings['prob_thd']:g}")
    if settings.get("area_thd") is not None:
        parts.append(f"area_thd {settings['area_thd']:g}")
    if settings.get("pad_crops_to"):
        parts.append(f"crops padded to {settings['pad_crops_to']}")
    mean = settings.get("pixel_mean")
    if mean is not None:
        parts.append("mmseg-rounded CLIP mean/std" if tuple(mean) == MMSEG_CLIP_MEAN else
                     "CLIP mean/std" if tuple(mean) == CLIP_PIXEL_MEAN else
                     f"mean {', '.join(f'{v:g}' for v in mean)}")
    parts.append("PAMR on" if settings.get("pamr") else "PAMR off")
    return ", ".join(parts)


def paper_rfclip_row(model_name: str | None, pamr: bool) -> tuple[float, ...] | None:
    """The RF-CLIP paper's Table 2 mIoU row (columns :data:`~rfclip.constants.PAPER_COLUMNS`) for this backbone
    (ViT-B-16 / ViT-L-14) and PAMR setting, or None."""
    from .constants import PAPER_RFCLIP_MIOU

    return PAPER_RFCLIP_MIOU.get((str(model_name), bool(pamr)))


def paper_corrclip_rows(model_name: str | None) -> list[tuple[str, tuple[float, ...]]]:
    """The CorrCLIP v1 README rows (SAM2_32 and EntitySeg masks) for a ViT-B/16 or ViT-L/14 model, or []."""
    from .constants import PAPER_CORRCLIP_MIOU

    name = str(model_name)
    size = "ViT-B" if name.startswith("ViT-B-16") else "ViT-L" if name.startswith("ViT-L-14") else None
    return [(f"paper (CorrCLIP, {masks} masks)", row) for (s, masks), row in PAPER_CORRCLIP_MIOU.items() if s == size]


def _cell(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def summary_markdown(results: Mapping[str, dict], missing: Mapping[str, str] | None = None) -> str:
    """A markdown report of an ``eval-all`` run: mIoU in the paper's Table 2 column order with the average,
    the RF-CLIP paper row beside ours for ViT-B-16 / ViT-L-14, then per-dataset details and the datasets skipped.

    ``results`` maps dataset names to :func:`evaluate` results (all from one segmenter); ``missing`` maps skipped
    dataset names to the reason.
    """
    from .constants import PAPER_COLUMNS
    from .data import DATASETS

    missing = dict(missing or {})
    if not results:
        raise ValueError("no results to report")
    first = next(iter(results.values()))
    model = first["model"]
    method, preset = first["method"], first["preset"]
    pamr = bool(first["settings"].get("pamr"))
    columns = list(PAPER_COLUMNS) + [n for n in results if n not in PAPER_COLUMNS]
    done = [n for n in columns if n in results]

    ours = [results[n]["miou"] if n in results else None for n in columns]
    ours_avg = sum(results[n]["miou"] for n in done) / len(done)
    label = f"ours ({method}{', PAMR' if pamr else ''}, {preset} preset)"
    rows = [[label] + [_cell(v) for v in ours] + [_cell(ours_avg)]]
    corrclip = str(method).split("+")[0] == "corrclip"
    paper = None if corrclip else paper_rfclip_row(model.get("name"), pamr)
    papers = paper_corrclip_rows(model.get("name")) if corrclip else (
        [("paper (RF-CLIP" + (" + PAMR" if pamr else "") + ")", paper)] if paper is not None else [])
    for paper_label, paper_row in papers:
        paper_by_name = dict(zip(PAPER_COLUMNS, paper_row))
        paper_cells = [paper_by_name.get(n) for n in columns]
        paper_done = [paper_by_name[n] for n in done if n in paper_by_name]
        paper_avg = sum(paper_done) / len(paper_done) if paper_done else None
        rows.append([paper_label] + [_cell(v) for v in paper_cells] + [_cell(paper_avg)])
    header = ["mIoU (%)"] + [DATASETS[n].title if n in DATASETS else n for n in columns] + ["Avg"]

    lines = ["# rfclip benchmark results", ""]
    source = model.get("source") or ""
    lines.append(f"- model: {model.get('name')} ({model.get('pretrained') or source})")
    options = first["method_options"]
    varying = sorted({k for r in results.values() for k in r["method_options"]
                      if any(o["method_options"].get(k) != options.get(k) for o in results.values())})
    shared = {k: v for k, v in options.items() if k not in varying}
    lines.append(f"- method: {method}" + (f" ({_options_text(shared)})" if shared else "")
                 + (f"; per dataset: {', '.join(varying)} (see below)" if varying else ""))
    lines.append(f"- settings: preset '{preset}' per dataset (see below); PAMR {'on' if pamr else 'off'}; "
                 f"precision {first['precision']} on {first['device']}; {first['world_size']} process(es)")
    if first.get("overrides"):
        lines.append(f"- overrides of the preset: {_options_text(first['overrides'])}")
    limited = [n for n in done if results[n].get("limit") is not None]
    if limited:
        lines.append(f"- only the first {first['limit']} images of each dataset were evaluated (--limit): "
                     "not comparable to the paper")
    if corrclip and papers:
        lines.append(f"- 'paper (CorrCLIP, ...)': the CorrCLIP v1 README rows for {model.get('name')} with SAM2 "
                     "(32 points per side) and EntitySeg masks, for comparison")
    if paper is not None:
        lines.append(f"- 'paper (RF-CLIP)': the RF-CLIP paper's Table 2 row for {model.get('name')}"
                     f"{' with PAMR' if pamr else ''}, for comparison")
    if len(done) < len(columns):
        lines.append(f"- Avg: over the {len(done)} dataset(s) evaluated here (both rows)")
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    lines.extend(["", "## Per dataset", "",
                  "| dataset | split | images | mIoU | aAcc | images/s | settings |",
                  "|---|---|---:|---:|---:|---:|---|"])
    for n in done:
        r = results[n]
        lines.append(f"| {DATASETS[n].title if n in DATASETS else n} | {r['split']} | {r['num_images']} | "
                     f"{r['miou']:.2f} | {r['aacc']:.2f} | {r['images_per_s']:.2f} | "
                     f"{describe_settings(r['settings'])}"
                     + "".join(f", {k} {r['method_options'].get(k)}" for k in varying) + " |")
    if missing:
        lines.extend(["", "## Not evaluated", ""])
        lines.extend(f"- {_title(n)}: {_without_name(reason, _title(n), n)}" for n, reason in missing.items())
    return "\n".join(lines) + "\n"


def _title(name: str) -> str:
    from .data import DATASETS

    return DATASETS[name].title if name in DATASETS else name


def _without_name(reason: str, *names: str) -> str:
    """A dataset's error without its leading name ("VOC21: none of ..." -> "none of ..."): the list names it."""
    for name in names:
        if reason.startswith(name + ":") or reason.startswith(name + " "):
            return reason[len(name):].lstrip(": ")
    return reason


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())
