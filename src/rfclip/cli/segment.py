"""``rfclip segment``: segment images into the classes you name; write a mask PNG, an overlay and a JSON summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._io import atomic_open
from ..errors import RfclipError
from .. import __version__
from . import common

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
    io.add_argument("--overlay-opacity", type=common._float, default=0.5, metavar="A",
                    help="opacity of the class colours in the overlay (default: 0.5)")
    io.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    common.add_model_options(p)
    common.add_method_options(p)
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


def check_classes(classes: list[list[str]]) -> list[list[str]]:
    """Each class's display name (its first synonym) must be unique: outputs are keyed by it."""
    seen = set()
    for names in classes:
        if names[0] in seen:
            raise RfclipError(f"class '{names[0]}' is listed twice; list each class once "
                              "(join synonyms with ',', e.g. \"cat,kitty;dog\")")
        seen.add(names[0])
    return classes


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


def output_paths(out: Path, image: Path) -> dict[str, Path]:
    stem = image.stem
    return {"mask": out / f"{stem}_mask.png", "overlay": out / f"{stem}_overlay.png", "json": out / f"{stem}.json"}


def validate_images(paths: list[Path], out: Path) -> None:
    """Open every image (so a bad one fails before the model loads); check that outputs do not collide."""
    from ..inference import load_image

    for path in paths:
        load_image(path)  # RfclipError for a missing or unreadable file
    owners: dict[str, Path] = {}
    inputs = {os.path.realpath(p): p for p in paths}
    for path in paths:
        for target in output_paths(out, path).values():
            key = os.path.realpath(target)
            if key in owners:
                raise RfclipError(f"images {owners[key]} and {path} would both write {target}; rename one of them "
                                  "or segment them into different --out folders")
            if key in inputs:
                raise RfclipError(f"segmenting {path} would overwrite the input image {inputs[key]}; choose another --out")
            owners[key] = path


# ---------------------------------------------------------------------------------------------- outputs
def _staged(target: Path) -> Path:
    return target.with_name(f".{target.name}.part{os.getpid()}{target.suffix}")


def save_mask(path: Path, mask: np.ndarray, num_classes: int) -> None:
    """A palette PNG for up to 256 classes (pixel value = class index); a 16-bit grey PNG beyond that."""
    from PIL import Image

    from .. import viz

    if num_classes <= 256:
        viz.save_mask_png(path, mask, viz.palette(num_classes))
    else:
        viz.save_image_atomic(Image.fromarray(mask.astype(np.uint16)), path)


def write_outputs(paths: dict[str, Path], image: np.ndarray, seg, record: dict, alpha: float) -> None:
    """Write the three files of one image: each to a temporary name first, then renamed into place, so that an
    error leaves no partial file (and no file of this image unless all three were written). Each staged file is
    itself written through :func:`rfclip._io.atomic_open`, so it is complete, synced and has the usual permissions."""
    from .. import viz

    n = len(seg.classes)
    staged = {key: _staged(target) for key, target in paths.items()}
    try:
        save_mask(staged["mask"], seg.mask, n)
        viz.save_image_atomic(viz.overlay(image, seg.mask, seg.classes, alpha=alpha, palette=viz.palette(n)),
                              staged["overlay"])
        with atomic_open(staged["json"], "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
        for key, target in paths.items():
            os.replace(staged[key], target)
    except OSError as err:
        raise RfclipError(f"cannot write outputs to {paths['json'].parent}: {err.strerror or err}; "
                          "check the free space and permissions of --out") from None
    finally:
        for tmp in staged.values():
            try:
                tmp.unlink()
            except OSError:
                pass


def pixel_fractions(seg) -> list[float]:
    """Fraction of the image's pixels given to each class (sums to 1; class names are unique, see check_classes)."""
    from .. import viz

    return list(viz.class_fractions(seg.mask, seg.classes).values())


def summary(seg) -> str:
    """"road 41.2%, sky 22.0%, ..." (classes present, largest first)."""
    fr = pixel_fractions(seg)
    order = sorted(range(len(seg.classes)), key=lambda i: -fr[i])
    return ", ".join(f"{seg.classes[i]} {100 * fr[i]:.1f}%" for i in order if fr[i] > 0)


def build_record(path: Path, seg, segmenter, args, files: dict[str, Path], seconds: float) -> dict:
    fractions = pixel_fractions(seg)
    height, width = seg.mask.shape
    mask_format = "palette PNG, pixel value = class index" if len(seg.classes) <= 256 else "16-bit grey PNG, pixel value = class index"
    return {
        "image": str(path),
        "image_size": {"width": int(width), "height": int(height)},
        "classes": [
            {"index": i, "name": name, "synonyms": list(syn), "fraction": fractions[i]}
            for i, (name, syn) in enumerate(zip(seg.classes, seg.synonyms))
        ],
        "fractions": {name: fractions[i] for i, name in enumerate(seg.classes)},
        "outputs": {"mask": files["mask"].name, "overlay": files["overlay"].name, "mask_format": mask_format},
        "method": segmenter.method_name,
        "method_options": segmenter.method.options(),
        "model": common.describe_model(segmenter, args),
        "device": str(segmenter.device),
        "precision": {"asked": segmenter.config.precision,
                      "used": str(segmenter.amp_dtype).replace("torch.", "") if segmenter.amp_dtype else "float32"},
        "settings": dataclasses.asdict(segmenter.config),
        "seconds": round(seconds, 3),
        "rfclip_version": __version__,
    }


# ---------------------------------------------------------------------------------------------- run
def run(args) -> int:
    from ..inference import load_image

    # Everything the user typed is checked before the model loads.
    classes = check_classes(read_classes(args))
    out = common.check_output_dir(args.out)
    images = expand_images(args.images)
    validate_images(images, out)
    common.check_checkpoint_path(args.checkpoint)
    quiet = args.quiet
    interactive = not quiet and sys.stderr.isatty()

    if interactive:
        src = args.checkpoint or f"{args.model} ({args.pretrained})"
        print(f"rfclip: loading {src}, method {args.method} ...", file=sys.stderr, flush=True)
    segmenter = common.build_segmenter(args)
    text = segmenter.encode_classes(classes)

    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(images), unit="img", file=sys.stderr, disable=not interactive, leave=False)
    try:
        per = args.images_per_batch
        for start in range(0, len(images), per):
            group = images[start:start + per]
            t0 = time.perf_counter()
            arrays = [load_image(p) for p in group]
            results = segmenter.segment_batch(arrays, text, return_probs=False)
            seconds = (time.perf_counter() - t0) / len(group)
            for path, arr, seg in zip(group, arrays, results):
                files = output_paths(out, path)
                record = build_record(path, seg, segmenter, args, files, seconds)
                write_outputs(files, arr, seg, record, args.overlay_opacity)
                if not quiet:
                    bar.write(f"{path}: {summary(seg)} -> {files['overlay']}", file=sys.stdout)
                bar.update(1)
    finally:
        bar.close()
    if not quiet:
        n = len(images)
        print(f"wrote {3 * n} files to {out}/ ({n} image{'s' if n != 1 else ''}: <name>_mask.png class indices, "
              "<name>_overlay.png picture with legend, <name>.json classes and fractions)")
    return 0
