"""``rfclip segment``: segment images into the classes you name; write a mask PNG, an overlay and a JSON summary."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from ..errors import RfclipError
from ..jobs.inputs import IMAGE_SUFFIXES  # noqa: F401 - where the command line found it before
from . import common

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

outputs in --out DIR (--format, comma-separated; default: png,overlay,json), per image IMAGE.ext:
  png         IMAGE_mask.png     palette PNG; pixel value = class index (0-based, in the order given;
                                 a 16-bit grey PNG beyond 256 classes)
  overlay     IMAGE_overlay.png  the image with the classes coloured and a legend
  json        IMAGE.json         classes, synonyms, pixel fraction per class, image size, method, model,
                                 settings (a rerun skips images done with the same settings)
  coco        coco.jsonl         one line per image: per class, COCO RLE (pycocotools), label, fraction
  webdataset  SHARD.tar          result shards (IMAGE.mask.png, IMAGE.json) beside the input shards' names
and run.json: settings, counts, the images that failed and why, per-process speed.
Two images with the same stem (a.jpg, a.png) get a.jpg_mask.png and a.png_mask.png; images in
sub-folders (--recursive) keep their sub-folders in --out.

examples:
  rfclip segment examples/street.jpg --classes "road;car;tree;sky;building" --out out/
  rfclip segment photos/*.jpg --classes "cat,kitty;dog;grass" --method naclip --pamr --out masks/
  rfclip segment img.png --classes "person;background" --checkpoint ViT-B-16.pt --device cpu --out out/
  rfclip segment img.png --classes-file classes.txt --method naclip+fsa --out out/
  rfclip segment img.png --classes "sky;sea" --method naclip --option gaussian_std=3 --out out/
  rfclip segment img.png --classes "road;car;sky" --option beta=0.4 --option fg_rule=max_abs --out out/
  rfclip segment photos/ --recursive --format png,coco --classes "cat;dog;grass" --out masks/
  rfclip segment --list paths.txt --classes "road;car;sky" --format png --out masks/
  rfclip segment --input 'shards/{000000..000099}.tar' --format webdataset --classes "cat;dog" --out results/
  torchrun --nproc_per_node 8 -m rfclip segment photos/ --recursive --classes "cat;dog" --out masks/
  (rerun the same command after an interruption: it does only what is missing; RF-CLIP's options and
  presets: README, section "RF-CLIP in rfclip"; many GPUs or a Ray cluster: section "Scaling out")
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment images into the classes you name",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files (JPEG, PNG, ...), folders of images or WebDataset .tar shards")
    inp = p.add_argument_group("more inputs")
    inp.add_argument("--recursive", "-r", action="store_true", help="also take the images in sub-folders of folders")
    inp.add_argument("--list", metavar="FILE", help="a text file of image paths, one per line")
    inp.add_argument("--input", action="append", default=[], metavar="SHARDS",
                     help="WebDataset tar shards, with brace ranges: 'shards/{000000..000099}.tar' (repeatable)")
    io = p.add_argument_group("classes and output")
    cls = io.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", metavar="LIST", help='class names, e.g. "road;car;tree;sky" (see below)')
    cls.add_argument("--classes-file", metavar="FILE", help="a text file with one class per line")
    io.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    io.add_argument("--format", metavar="LIST",
                    help="what to write, comma-separated: png, overlay, json, coco, webdataset (default: "
                         "png,overlay,json; see below)")
    io.add_argument("--overwrite", action="store_true",
                    help="segment every image again, replacing outputs made before (also with other settings)")
    common.add_images_per_batch_option(io)
    io.add_argument("--num-workers", type=common._non_negative_int, default=None, metavar="N",
                    help="processes decoding images ahead of the model (default: 4 on a GPU, 0 on CPU)")
    io.add_argument("--shard-size", type=common._positive_int, default=None, metavar="N",
                    help="images per result shard of --format webdataset when the inputs are not shards "
                         "(default: 1000)")
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
    from .._io import file_problem

    if (problem := file_problem(path)) is not None:
        what = f"not found: {path}" if problem == "not found" else f"{path} {problem}"
        raise RfclipError(f"classes file {what}; check the path given to --classes-file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first class
            lines = [line.split("#", 1)[0].strip() for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise RfclipError(f"cannot read classes file {path}: {err}; give a UTF-8 text file, one class per line") from None
    lines = [line for line in lines if line.strip(" ,")]
    if not lines:
        raise RfclipError(f"classes file {path} lists no classes; write one class per line, e.g. 'cat,kitty'")
    return parse_classes(lines)


def check_outputs_spare_inputs(inputs, out: Path, formats) -> None:
    """No output may overwrite an input image (e.g. --out is the images' folder and one is called x_mask.png)."""
    from ..outputs import output_paths

    sources = {os.path.abspath(it.source): it for it in inputs.items if it.member is None}
    for item in inputs.items:
        for target in output_paths(out, item.name, formats).values():
            owner = sources.get(os.path.abspath(target))
            if owner is not None:
                raise RfclipError(f"segmenting {item.label} would overwrite the input image {owner.label}; "
                                  "choose another --out")


def gather_inputs(args):
    """The job's inputs, listed without decoding; a run whose named images are all missing stops here."""
    from ..jobs import list_inputs

    if not (args.images or args.list or args.input):
        raise RfclipError("no images given; name image files or folders, --list FILE or --input 'SHARDS.tar'")
    inputs = list_inputs(args.images, recursive=args.recursive, list_file=args.list, shard_patterns=args.input)
    named_only = not args.list and not args.input and all(not Path(i).is_dir() for i in args.images)
    if named_only:  # stop before the model loads when none can be read (a header check; the first good one ends it)
        from ..jobs.inputs import header_error

        errors = []
        for item in inputs.items:
            error = header_error(item.source)
            if error is None:
                break
            errors.append(error)
        else:
            raise RfclipError(errors[0] if len(errors) == 1 else f"none of the {len(errors)} images can be read "
                                                                 f"(the first: {errors[0]})")
    if not inputs.items:
        first = inputs.problems[0][1] if inputs.problems else "no images found"
        raise RfclipError(first if len(inputs.problems) <= 1 else
                          f"none of the {len(inputs.problems)} inputs can be read (the first: {first})")
    return inputs


def job_options(args, classes, formats, out: Path):
    from ..jobs.segment import DEFAULT_SHARD_SIZE, JobOptions, job_settings

    method = "+".join([args.method, *(args.plugin or [])])
    settings = job_settings(classes, method, common.segmenter_options(args), args.model, args.pretrained,
                            args.checkpoint, getattr(args, "quick_gelu", None), masks=getattr(args, "masks", None))
    return JobOptions(out=out, formats=formats, settings=settings, images_per_batch=args.images_per_batch,
                      overwrite=args.overwrite, overlay_opacity=args.overlay_opacity, quiet=args.quiet,
                      num_workers=args.num_workers, shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
                      checkpoint=args.checkpoint)


# ---------------------------------------------------------------------------------------------- run
def run(args) -> int:
    from ..jobs import interrupt_on_sigterm

    with interrupt_on_sigterm():
        return _run(args)


def _run(args) -> int:
    from ..evaluate import distributed_session
    from ..jobs.progress import gather
    from ..jobs.resume import job_folder_lock
    from ..jobs.segment import cost_note, finish, first_image_size, plan, segment_parts
    from ..outputs import parse_formats

    started = time.time()
    classes = read_classes(args)  # parse_classes refuses empty lists and duplicate names
    formats = parse_formats(args.format)
    out = common.check_output_dir(args.out)
    inputs = gather_inputs(args)
    check_outputs_spare_inputs(inputs, out, formats)
    common.check_checkpoint_path(args.checkpoint)
    job = job_options(args, classes, formats, out)  # checks the inference settings too

    with distributed_session(args.device) as dist, contextlib.ExitStack() as stack:
        main = dist.is_main
        if main:
            stack.enter_context(common.output_folder(out))
        stack.enter_context(job_folder_lock(out, main))
        if main:
            for _, reason in inputs.problems:
                report_skipped(reason)
        the_plan = plan(job, inputs, dist.rank, dist.world_size)
        todo = sum(gather(sum(len(v) for v in the_plan.todo.values())))
        if main and not args.quiet:
            note = cost_note(job.settings, first_image_size(inputs.items[0]))
            if note:
                print(note, file=sys.stderr, flush=True)
        counts = None
        if todo:
            if main and not args.quiet and sys.stderr.isatty():
                src = args.checkpoint or f"{args.model} ({args.pretrained})"
                print(f"rfclip: loading {src}, method {args.method} ...", file=sys.stderr, flush=True)
            run_args = argparse.Namespace(**vars(args))
            if dist.device is not None:
                run_args.device = str(dist.device)
            segmenter = common.build_segmenter(run_args)
            text = segmenter.encode_classes(classes)
            counts = segment_parts(job, inputs, the_plan, segmenter, text, world_size=dist.world_size,
                                   rank=dist.rank, progress_enabled=not args.quiet)
        else:
            from ..jobs.segment import Counts

            counts = Counts(rank=dist.rank, done_before=the_plan.done_before)
        result = finish(job, inputs, counts, dist.world_size, started)
    return report(args, job, result, counts, main)


def report(args, job, result: dict, counts, main: bool) -> int:
    """The closing lines (rank 0): what was written; unreadable images make the exit status 2."""
    n = result["counts"]
    if not main:
        return 0
    if n["segmented"] == 0 and n["skipped_done_before"] == 0:  # nothing could be read: one line
        held = counts.held if counts is not None else []
        first = held[0] if held else (result["failed"][0]["reason"] if result["failed"] else "no images")
        raise RfclipError(first if n["failed"] == 1 else f"none of the {n['failed']} images can be read "
                                                         f"(the first: {first})")
    if not args.quiet:
        if n["segmented"]:
            print(f"wrote {result['files']} files to {job.out}/ ({n['segmented']} image"
                  f"{'s' if n['segmented'] != 1 else ''}: {describe_formats(job.formats)})")
        if n["skipped_done_before"]:
            print(f"skipped {n['skipped_done_before']} image{'s' if n['skipped_done_before'] != 1 else ''} done before "
                  "with the same settings (--overwrite does them again)")
    if n["failed"]:
        raise RfclipError(f"{n['failed']} of {n['inputs']} images could not be read and were skipped (see above); "
                          "fix or remove them and segment them again")
    return 0


FORMAT_TEXT = {"png": "<name>_mask.png class indices", "overlay": "<name>_overlay.png picture with legend",
               "json": "<name>.json classes and fractions", "coco": "coco.jsonl COCO RLE per class",
               "webdataset": "result shards (.tar)"}


def describe_formats(formats) -> str:
    return ", ".join(FORMAT_TEXT[f] for f in formats)


def report_skipped(message: str) -> None:
    """One line on stderr for an image that is skipped (the run goes on, and exits with status 2 at the end)."""
    from . import _error

    _error(f"{message} (skipped)")
