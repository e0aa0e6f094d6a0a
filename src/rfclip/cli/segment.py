"""``rfclip segment``: segment images into the classes you name; write a mask PNG, an overlay and a JSON summary."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import ImageError, RfclipError
from ..outputs import output_paths, segmentation_record, summary, write_outputs
from . import _error, common

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

DESCRIPTION = """\
Segment images into the classes you name (open vocabulary, no training). Writes a
mask PNG, an overlay with a legend and a JSON summary per image. The first run
downloads the model weights (ViT-B-16 openai: about 600 MB) into the open_clip /
Hugging Face cache; offline, pass local weights with --checkpoint FILE."""

EXAMPLES = """\
classes:
  --classes "road;car;tree;sky"      four classes (';' separates classes)
  --classes "road,car,tree,sky"      the same (without ';', ',' separates classes)
  --classes "cat,kitty;dog;grass"    three classes; 'cat' and 'kitty' are synonyms of the first
  --classes-file classes.txt         one class per line, synonyms comma-separated, '#' starts a comment

outputs, per image IMAGE.ext in --out DIR:
  IMAGE_mask.png     palette PNG; pixel value = class index (0-based, in the order given;
                     a 16-bit grey PNG beyond 256 classes)
  IMAGE_overlay.png  the image with the classes coloured and a legend
  IMAGE.json         classes, synonyms, pixel fraction per class, image size, method, model and settings

examples:
  rfclip segment examples/street.jpg --classes "road;car;tree;sky;building" --out out/
  rfclip segment photos/*.jpg --classes "cat,kitty;dog;grass" --method naclip --pamr --out masks/
  rfclip segment img.png --classes "person;background" --checkpoint ViT-B-16.pt --device cpu --out out/
  rfclip segment img.png --classes-file classes.txt --method naclip+fsa --out out/
  rfclip segment img.png --classes "sky;sea" --method naclip --option gaussian_std=3 --out out/
  rfclip segment img.png --classes "road;car;sky" --option beta=0.4 --option fg_rule=max_abs --out out/
  (RF-CLIP's options and presets: README, section "RF-CLIP in rfclip")
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment images into the classes you name",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...) or folders of images")
    io = p.add_argument_group("classes and output")
    cls = io.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", metavar="LIST", help='class names, e.g. "road;car;tree;sky" (see below)')
    cls.add_argument("--classes-file", metavar="FILE", help="a text file with one class per line")
    io.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    common.add_images_per_batch_option(io)
    io.add_argument("--overlay-opacity", type=common._unit_float, default=0.5, metavar="A",
                    help="opacity of the class colours in the overlay, 0..1 (default: 0.5)")
    io.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    common.add_model_options(p)
    common.add_method_options(p)
    common.add_masks_option(p)
    common.add_inference_options(p)


# ---------------------------------------------------------------------------------------------- inputs
def read_classes(args) -> list[list[str]]:
    from ..text import parse_classes

    if args.classes_file is None:
        return parse_classes(args.classes)
    path = args.classes_file
    if not os.path.isfile(path):
        raise RfclipError(f"classes file not found: {path}; check the path given to --classes-file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise RfclipError(f"cannot read classes file {path}: {err}; give a UTF-8 text file, one class per line") from None
    lines = [line for line in lines if line.strip(" ,")]
    if not lines:
        raise RfclipError(f"classes file {path} lists no classes; write one class per line, e.g. 'cat,kitty'")
    return parse_classes(lines)


def expand_images(items: list[str]) -> list[Path]:
    """Image paths; a folder stands for the image files directly inside it (sorted)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise RfclipError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def validate_images(paths: list[Path], out: Path) -> dict[Path, str]:
    """Open every image before the model loads and check that the outputs of the readable ones do not collide.

    Returns the images that cannot be read, each with its one-line reason: they are reported and skipped, so that
    one bad file never costs the others. Colliding outputs are an error for the whole run.
    """
    from ..inference import read_image

    unreadable: dict[Path, str] = {}
    for path in paths:
        try:
            read_image(path)
        except ImageError as err:
            unreadable[path] = str(err)
    owners: dict[str, Path] = {}
    inputs = {os.path.realpath(p): p for p in paths}
    for path in paths:
        if path in unreadable:
            continue
        for target in output_paths(out, path).values():
            key = os.path.realpath(target)
            if key in owners:
                raise RfclipError(f"images {owners[key]} and {path} would both write {target}; rename one of them "
                                  "or segment them into different --out folders")
            if key in inputs:
                raise RfclipError(f"segmenting {path} would overwrite the input image {inputs[key]}; choose another --out")
            owners[key] = path
    return unreadable


def report_skipped(message: str) -> None:
    """One line on stderr for an image that is skipped (the run goes on, and exits with status 2 at the end)."""
    _error(f"{message} (skipped)")


# ---------------------------------------------------------------------------------------------- run
def run(args) -> int:
    classes, out, images, skipped = check_inputs(args)
    with common.output_folder(out):  # created now; removed again if the run ends with nothing in it
        if not args.quiet and sys.stderr.isatty():
            src = args.checkpoint or f"{args.model} ({args.pretrained})"
            print(f"rfclip: loading {src}, method {args.method} ...", file=sys.stderr, flush=True)
        segmenter = common.build_segmenter(args)
        text = segmenter.encode_classes(classes)
        written, failed = segment_images(args, segmenter, text, images, out)
        if not args.quiet and written:
            print(f"wrote {3 * written} files to {out}/ ({written} image{'s' if written != 1 else ''}: "
                  "<name>_mask.png class indices, <name>_overlay.png picture with legend, <name>.json classes "
                  "and fractions)")
    if skipped + failed:
        raise RfclipError(f"{skipped + failed} of {len(images) + skipped} images could not be read and were skipped "
                          "(see above); fix or remove them and segment them again")
    return 0


def check_inputs(args) -> tuple[list[list[str]], Path, list[Path], int]:
    """Everything the user typed, checked before the model loads: ``(classes, output folder, readable images,
    number of unreadable images)``. Unreadable images are reported here, one line each; when no image is
    readable that is the error."""
    classes = read_classes(args)  # parse_classes refuses empty lists and duplicate names
    out = common.check_output_dir(args.out)
    images = expand_images(args.images)
    unreadable = validate_images(images, out)
    common.check_checkpoint_path(args.checkpoint)
    if len(unreadable) == len(images):  # nothing to do: one line
        first = next(iter(unreadable.values()))
        raise RfclipError(first if len(images) == 1 else f"none of the {len(images)} images can be read "
                                                         f"(the first: {first})")
    for message in unreadable.values():
        report_skipped(message)
    return classes, out, [p for p in images if p not in unreadable], len(unreadable)


def segment_images(args, segmenter, text, images: list[Path], out: Path) -> tuple[int, int]:
    """Segment ``images`` ``--images-per-batch`` at a time and write their outputs. Returns ``(written, failed)``:
    an image that cannot be read now (changed since the check) is reported and skipped."""
    from tqdm import tqdm

    from ..inference import read_image

    quiet = args.quiet
    noted: set[str] = set()  # input conversions already announced (once per kind, not per image)
    written = failed = 0
    bar = tqdm(total=len(images), unit="img", file=sys.stderr, disable=quiet or not sys.stderr.isatty(), leave=False)
    try:
        per = args.images_per_batch
        for start in range(0, len(images), per):
            t0 = time.perf_counter()
            loaded = []
            for path in images[start:start + per]:
                try:
                    loaded.append((path, *read_image(path)))
                except ImageError as err:
                    report_skipped(str(err))
                    failed += 1
                    bar.update(1)
            if not loaded:
                continue
            results = segmenter.segment_batch([arr for _, arr, _ in loaded], text, return_probs=False)
            seconds = (time.perf_counter() - t0) / len(loaded)
            for (path, arr, conversion), seg in zip(loaded, results):
                files = output_paths(out, path)
                record = segmentation_record(path, seg, segmenter, files, seconds, checkpoint=args.checkpoint)
                record["input_conversion"] = conversion
                write_outputs(files, arr, seg, record, args.overlay_opacity)
                written += 1
                if conversion and conversion not in noted and not quiet:
                    noted.add(conversion)
                    bar.write(f"rfclip: note: {path} is {conversion} (recorded as input_conversion in its JSON)",
                              file=sys.stderr)
                if not quiet:
                    bar.write(f"{path}: {summary(seg)} -> {files['overlay']}", file=sys.stdout)
                bar.update(1)
    finally:
        bar.close()
    return written, failed
