"""``rfclip masks``: make class-agnostic region maps once (SAM2, SAM, Mask2Former / EoMT) and save them as
CorrCLIP's ``.npz`` files, for ``--masks npz:DIR`` in every later run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ImageError, RfclipError
from . import _error, common

DESCRIPTION = """\
Make a region map for each image with a mask generator and save it as
DIR/<image stem>.npz (array instance_mask, int32, 0 = not segmented, k > 0 =
region k: CorrCLIP's format). Maps already in DIR are kept (an interrupted run
resumes); every file appears whole or not at all. Then use --masks npz:DIR with
segment, eval and demo. The generators need the masks extra."""

EXAMPLES = """\
examples:
  rfclip masks photos/ --masks sam2:sam2.1_hiera_large.pt --out masks/photos
  rfclip masks --dataset voc21 --root data/VOCdevkit/VOC2012 --masks sam2:sam2_hiera_large.pt --out masks/voc21
  rfclip masks img.jpg --masks "sam2:sam2_hiera_large.pt?points_per_side=32" --out masks/   (CorrCLIP's SAM2_32)
  rfclip masks img.jpg --masks sam:sam_vit_h_4b8939.pth --out masks/
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
    paths, from_dataset = _inputs(args)
    out = common.check_output_dir(args.out)
    todo = paths if args.overwrite else [p for p in paths if not (out / f"{p.stem}.npz").is_file()]
    done_before = len(paths) - len(todo)
    with common.output_folder(out):
        if not todo:
            if not args.quiet:
                print(f"all {len(paths)} region maps are already in {out}/ (--overwrite remakes them)")
            return 0
        source = common.masks_from_args(args)
        written, failed = make_maps(source, todo, out, from_dataset, args.quiet)
    if not args.quiet:
        print(f"wrote {written} region map{'s' if written != 1 else ''} to {out}/"
              + (f"; {done_before} already there, kept" if done_before else "")
              + (f"; {len(failed)} failed" if failed else ""))
    if failed:
        raise RfclipError(f"{len(failed)} of {len(todo)} images got no region map (listed above); fix them and run "
                          "the same command again (the maps made are kept)")
    return 0


def make_maps(source, paths: list[Path], out: Path, from_dataset: bool, quiet: bool) -> tuple[int, list[Path]]:
    """Write ``out/<stem>.npz`` for each image (atomically). Returns ``(written, failed images)``; each failure is
    reported on its own line as it happens."""
    from tqdm import tqdm

    written, failed = 0, []
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=quiet or not sys.stderr.isatty(), leave=False)
    try:
        for path in paths:
            try:
                region_map = source(_read(path, from_dataset), str(path))
                save_region_map(out / f"{path.stem}.npz", region_map)
                written += 1
            except RfclipError as err:  # this image only (unreadable, no saved map, a bad map); the run goes on
                failed.append(path)
                bar.clear()
                _error(f"{path}: {err}")
            bar.update(1)
    finally:
        bar.close()
    return written, failed


def save_region_map(file: Path, region_map) -> None:
    """CorrCLIP's format (``np.savez_compressed(file, instance_mask=...)``), int32, written whole or not at all."""
    import numpy as np

    from .._io import atomic_open
    from ..masks import NPZ_KEY

    with atomic_open(file, "wb") as f:
        np.savez_compressed(f, **{NPZ_KEY: np.asarray(region_map, dtype=np.int32)})


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
