"""``rfclip masks``: make class-agnostic region maps once (SAM2, SAM, Mask2Former / EoMT) and save them as
CorrCLIP's ``.npz`` files, for ``--masks npz:DIR`` in every later run."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from ..errors import ImageError, RfclipError
from . import _error, common

DESCRIPTION = """\
Make a region map for each image with a mask generator and save it as
DIR/<image stem>.npz (array instance_mask, int32, 0 = not segmented, k > 0 =
region k: CorrCLIP's format). Maps already in DIR are kept (an interrupted run
resumes); every file appears whole or not at all; DIR/run.json sums the run up.
Under torchrun each process makes the maps of its share of the sorted images.
Then use --masks npz:DIR with segment, eval and demo. The generators need the
masks extra."""

EXAMPLES = """\
examples:
  rfclip masks photos/ --masks sam2:sam2.1_hiera_large.pt --out masks/photos
  rfclip masks --dataset voc21 --root data/VOCdevkit/VOC2012 --masks sam2:sam2_hiera_large.pt --out masks/voc21
  rfclip masks img.jpg --masks "sam2:sam2_hiera_large.pt?points_per_side=32" --out masks/   (CorrCLIP's SAM2_32)
  rfclip masks img.jpg --masks sam:sam_vit_h_4b8939.pth --out masks/
  torchrun --nproc_per_node 8 -m rfclip masks photos/ --masks sam2:sam2.1_hiera_large.pt --out masks/photos
  rfclip masks img.jpg --masks hf:mask2former-swin-large-coco-panoptic/ --out masks/
  rfclip segment img.jpg --classes "cat;dog" --method corrclip --masks npz:masks/ --out out/
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("masks", help="make region maps with SAM2 / SAM / Mask2Former and save them as .npz",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images (or --dataset)")
    p.add_argument("--dataset", metavar="NAME", help="make maps for a benchmark's images instead (with --root)")
    p.add_argument("--root", "--data-root", dest="root", metavar="DIR", help="the dataset's data_root (as rfclip eval)")
    p.add_argument("--split", metavar="NAME", help="the dataset's split (default: its validation split)")
    p.add_argument("--limit", type=common._positive_int, metavar="N", help="only the first N images")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder of .npz files (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="remake maps already in --out (default: keep them)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    common.add_masks_option(p, required=True)


# ---------------------------------------------------------------------------------------------- inputs
def _inputs(args) -> tuple[list[Path], bool]:
    """(image paths, from a dataset); a dataset's images are read as its evaluation reads them (no EXIF turn)."""
    if args.dataset and args.images:
        raise RfclipError("give image files or --dataset, not both")
    if args.dataset:
        if not args.root:
            raise RfclipError(f"--dataset {args.dataset} needs --root DIR, the dataset's data_root (as rfclip eval)")
        from ..data import build_dataset, canonical_dataset_name

        dataset = build_dataset(canonical_dataset_name(args.dataset), args.root, split=args.split)
        paths, from_dataset = [Path(img) for img, _, _ in dataset.samples], True
    elif args.images:
        paths, from_dataset = image_files(args.images), False
    else:
        raise RfclipError("no images given; name image files or folders, or --dataset NAME --root DIR")
    paths = paths[:args.limit] if args.limit else paths
    owners: dict[str, Path] = {}
    for path in paths:
        if path.stem in owners:
            raise RfclipError(f"images {owners[path.stem]} and {path} would both write {path.stem}.npz (maps are "
                              "found by the image's stem); make their maps into different --out folders")
        owners[path.stem] = path
    return paths, from_dataset


def _read(path: Path, from_dataset: bool):
    if from_dataset:
        from ..data.datasets import read_image

        try:
            return read_image(str(path))
        except (OSError, ValueError) as err:
            raise ImageError(f"cannot read image {path} ({err})") from None
    from ..inference import read_image

    return read_image(path)[0]


# ---------------------------------------------------------------------------------------------- run
def run(args) -> int:
    from ..jobs import interrupt_on_sigterm

    with interrupt_on_sigterm():  # SIGTERM as Ctrl-C: the map being written is dropped, the finished ones stay
        return _run(args)


def _run(args) -> int:
    """One process, or one rank of ``torchrun``: image ``i`` of the sorted list goes to rank ``i % world_size``;
    rank 0 shows the progress and writes ``OUT/run.json``."""
    from ..evaluate import distributed_session
    from ..jobs import plan_parts, rank_parts
    from ..jobs.progress import Counts, gather
    from ..jobs.resume import job_folder_lock

    started = time.time()
    paths, from_dataset = _inputs(args)
    out = common.check_output_dir(args.out)
    with distributed_session(args.device) as dist, contextlib.ExitStack() as stack:
        main = dist.is_main
        if main:
            stack.enter_context(common.output_folder(out))
        stack.enter_context(job_folder_lock(out, main))
        mine = [paths[i] for part in rank_parts(plan_parts(paths, 1), dist.rank, dist.world_size) for i in part]
        todo = mine if args.overwrite else [p for p in mine if not (out / f"{p.stem}.npz").is_file()]
        counts = Counts(rank=dist.rank, done_before=len(mine) - len(todo))
        total = sum(gather(len(todo)))
        if total:
            run_args = argparse.Namespace(**vars(args))
            if dist.device is not None:
                run_args.device = str(dist.device)
            source = common.masks_from_args(run_args)
            counts.device = str(run_args.device or "")
            make_maps(source, todo, out, from_dataset, counts, total, dist.world_size, quiet=args.quiet)
        result = finish(args, out, paths, counts, dist.world_size, started)
    return report(args, out, result, main)


def make_maps(source, paths: list[Path], out: Path, from_dataset: bool, counts, total: int | None = None,
              world_size: int = 1, quiet: bool = False) -> None:
    """Write ``out/<stem>.npz`` for each image, counting into ``counts`` (written, failed with their reasons); each
    failure is reported on its own line as it happens. ``total``: the images of the whole job (the progress)."""
    from ..jobs.progress import Progress

    progress = Progress(len(paths) if total is None else total, world_size=world_size,
                        enabled=counts.rank == 0 and not quiet)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        for path in paths:
            try:
                region_map = source(_read(path, from_dataset), str(path))
            except RfclipError as err:  # this image only (unreadable, no saved map, a bad map); the run goes on
                counts.failed.append({"image": str(path), "reason": " ".join(str(err).split())})
                if progress.tty:
                    progress.bar.clear()
                _error(f"{path}: {err}")
            else:
                save_region_map(out / f"{path.stem}.npz", region_map)  # a full disk stops the run
                counts.written += 1
                counts.files += 1
            progress.update(1)
    finally:
        progress.close()
    counts.seconds = round(time.perf_counter() - start, 3)
    counts.cpu_seconds = round(time.process_time() - cpu_start, 3)


def finish(args, out: Path, paths: list[Path], counts, world_size: int, started: float) -> dict:
    """Every rank's counts gathered; rank 0 writes ``OUT/run.json`` when a map was made or found."""
    from .. import __version__
    from ..jobs.progress import RUN_FILE, barrier, gather, run_outcome, write_run_file

    per_rank = gather(counts)
    barrier()  # every rank's maps are in place
    failed = [f for c in per_rank for f in c.failed]
    result = {
        "rfclip_version": __version__,
        "command": sys.argv,
        "out": str(out),
        "settings": {"masks": args.masks, "dataset": args.dataset, "root": args.root, "split": args.split,
                     "limit": args.limit, "overwrite": args.overwrite},
        "counts": {"inputs": len(paths), "written": sum(c.written for c in per_rank),
                   "skipped_done_before": sum(c.done_before for c in per_rank), "failed": len(failed)},
        **run_outcome(per_rank, failed, world_size, started),
    }
    if counts.rank == 0 and (result["counts"]["written"] or result["counts"]["skipped_done_before"]):
        try:
            write_run_file(out, result)
        except OSError as err:
            raise RfclipError(f"cannot write {out / RUN_FILE}: {err.strerror or err}; check the free space and "
                              "permissions of --out (the maps are done)") from None
    return result


def report(args, out: Path, result: dict, main: bool) -> int:
    """The closing lines (rank 0); images without a map make the exit status 2."""
    if not main:
        return 0
    n = result["counts"]
    if not args.quiet:
        if n["written"] == 0 and n["failed"] == 0:
            print(f"all {n['inputs']} region maps are already in {out}/ (--overwrite remakes them)")
        else:
            print(f"wrote {n['written']} region map{'s' if n['written'] != 1 else ''} to {out}/"
                  + (f"; {n['skipped_done_before']} already there, kept" if n["skipped_done_before"] else "")
                  + (f"; {n['failed']} failed" if n["failed"] else ""))
    if n["failed"]:
        todo = n["inputs"] - n["skipped_done_before"]
        raise RfclipError(f"{n['failed']} of {todo} images got no region map (listed above); fix them and run "
                          "the same command again (the maps made are kept)")
    return 0


def save_region_map(file: Path, region_map) -> None:
    """CorrCLIP's format (``np.savez_compressed(file, instance_mask=...)``), int32, written whole or not at all:
    under a hidden temporary name first (:func:`rfclip.outputs.staged_path`, which a killed run's successor
    removes and no folder listing takes as an image), then renamed into place."""
    import numpy as np

    from .._io import atomic_open
    from ..masks import NPZ_KEY
    from ..outputs import staged_path

    staged = staged_path(file)
    try:
        with atomic_open(staged, "wb") as f:
            np.savez_compressed(f, **{NPZ_KEY: np.asarray(region_map, dtype=np.int32)})
        os.replace(staged, file)
    except OSError as err:
        raise RfclipError(f"cannot write {file}: {err.strerror or err}; check the free space and permissions of "
                          "--out") from None
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()


def image_files(items: list[str]) -> list[Path]:
    """Image paths; a folder stands for the image files directly inside it (sorted, hidden files skipped), as for
    ``rfclip segment``."""
    from ..jobs.inputs import IMAGE_SUFFIXES, folder_images

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = folder_images(path, recursive=False)
            if not found:
                raise RfclipError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        else:
            paths.append(path)
    return paths
