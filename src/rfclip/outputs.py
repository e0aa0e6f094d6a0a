"""What `rfclip segment` (and the web demo's downloads) write for one image: the mask PNG, the overlay with its
legend and the JSON record, each staged and renamed into place so that an error leaves no partial file.

Formats (``--format``): ``png`` (the index mask), ``overlay`` (the picture with its legend), ``json`` (the record)
are files per image; ``coco`` (one JSON Lines record per image, COCO RLE per class) and ``webdataset`` (result
shards) gather many images per file and are written by :mod:`rfclip.jobs`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from . import __version__, viz
from ._io import atomic_open
from .errors import RfclipError

FORMATS = ("png", "overlay", "json", "coco", "webdataset")
DEFAULT_FORMATS = ("png", "overlay", "json")  # what `rfclip segment` wrote before --format existed
FILE_KEYS = {"png": "mask", "overlay": "overlay", "json": "json"}  # per-image formats -> key in output_paths
TEMP_SUFFIX = ".rfclip-tmp"  # staged files: hidden, and no image reader takes this suffix
SETTINGS_ID_KEY = "rfclip-settings-id"  # PNG text chunk: the settings the file was made with (see jobs.settings_id)


def parse_formats(text: str | None) -> tuple[str, ...]:
    """``"png,coco"`` -> ``("png", "coco")`` (each once, in FORMATS order); None -> :data:`DEFAULT_FORMATS`."""
    if text is None:
        return DEFAULT_FORMATS
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise RfclipError(f"unknown output format {', '.join(unknown) or repr(text)}; choose from "
                          f"{', '.join(FORMATS)} (comma-separated, e.g. --format png,coco)")
    return tuple(f for f in FORMATS if f in names)


def output_paths(out: Path, image: Path | str, formats=DEFAULT_FORMATS) -> dict[str, Path]:
    """The files written for ``image`` into ``out``: ``NAME_mask.png``, ``NAME_overlay.png``, ``NAME.json`` (those
    of ``formats``). NAME is the image's stem; a ``str`` is taken as NAME itself (it may hold sub-folders)."""
    stem = image.stem if isinstance(image, Path) else str(image)
    files = {"mask": out / f"{stem}_mask.png", "overlay": out / f"{stem}_overlay.png", "json": out / f"{stem}.json"}
    return {key: path for fmt, key in FILE_KEYS.items() if fmt in formats for path in [files[key]]}


def staged_path(target: Path) -> Path:
    """The temporary name ``target`` is written under before it is renamed into place: hidden (a leading dot) and
    ending in :data:`TEMP_SUFFIX`, so that no image reader, and no later run over the folder, takes it as an image."""
    return target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")


def mask_pnginfo(settings_id: str | None) -> PngImagePlugin.PngInfo | None:
    if settings_id is None:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_ID_KEY, settings_id)
    return info


def save_png(path: Path, img: Image.Image, settings_id: str | None = None) -> None:
    """Write a PNG through :func:`rfclip._io.atomic_open` (the format is PNG whatever the name's suffix)."""
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG", pnginfo=mask_pnginfo(settings_id))


def save_mask(path: Path, mask: np.ndarray, num_classes: int, settings_id: str | None = None) -> None:
    """A palette PNG for up to 256 classes (pixel value = class index); a 16-bit grey PNG beyond that."""
    save_png(Path(path), viz.mask_image(mask, num_classes), settings_id)


def png_settings_id(path: Path) -> str | None:
    """The settings id a mask or overlay PNG was written with (None when it has none or cannot be read)."""
    try:
        with Image.open(path) as im:
            return im.info.get(SETTINGS_ID_KEY)
    except (OSError, ValueError, SyntaxError):
        return None


def write_outputs(paths: dict[str, Path], image: np.ndarray | None, seg, record: dict | None, alpha: float,
                  settings_id: str | None = None) -> None:
    """Write the files of one image (the keys of ``paths``: ``mask``, ``overlay``, ``json``): each to a temporary
    name first (:func:`staged_path`), then renamed into place, the JSON last, so that an error leaves no partial file
    (and no JSON unless the other files were written). Each staged file is itself written through
    :func:`rfclip._io.atomic_open`, so it is complete, synced and has the usual permissions."""
    n = len(seg.classes)
    staged = {key: staged_path(target) for key, target in paths.items()}
    try:
        if "mask" in paths:
            save_mask(staged["mask"], seg.mask, n, settings_id)
        if "overlay" in paths:
            picture = viz.overlay(image, seg.mask, seg.classes, alpha=alpha, palette=viz.palette(n))
            save_png(staged["overlay"], picture, settings_id)
        if "json" in paths:
            with atomic_open(staged["json"], "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2, default=str)
                f.write("\n")
        for key in sorted(paths, key=lambda k: k == "json"):  # the record last: it says the image is done
            os.replace(staged[key], paths[key])
    except OSError as err:
        folder = next(iter(paths.values())).parent
        raise RfclipError(f"cannot write outputs to {folder}: {err.strerror or err}; "
                          "check the free space and permissions of --out") from None
    finally:
        for tmp in staged.values():
            try:
                tmp.unlink()
            except OSError:
                pass


def pixel_fractions(seg) -> list[float]:
    """Fraction of the image's pixels given to each class (sums to 1; class names are unique, see parse_classes)."""
    return list(viz.class_fractions(seg.mask, seg.classes).values())


def summary(seg) -> str:
    """"road 41.2%, sky 22.0%, ..." (classes present, largest first)."""
    fr = pixel_fractions(seg)
    order = sorted(range(len(seg.classes)), key=lambda i: -fr[i])
    return ", ".join(f"{seg.classes[i]} {100 * fr[i]:.1f}%" for i in order if fr[i] > 0)


def describe_run(segmenter, checkpoint: str | os.PathLike | None = None) -> dict:
    """How a segmenter segments: method and its options, model, device, precision, inference settings."""
    return {
        "method": segmenter.method_name,
        "method_options": segmenter.method.options(),
        "model": {**segmenter.clip.describe(),
                  "checkpoint": os.path.abspath(os.fspath(checkpoint)) if checkpoint else None},
        "device": str(segmenter.device),
        "precision": {"asked": segmenter.config.precision,
                      "used": str(segmenter.amp_dtype).replace("torch.", "") if segmenter.amp_dtype else "float32"},
        "settings": dataclasses.asdict(segmenter.config),
        **segmenter.provenance(checkpoint),  # crops per forward used, distraction dims, templates, checkpoint hash
    }


def segmentation_record(path: Path | str, seg, segmenter, files: dict[str, Path], seconds: float | None,
                        checkpoint: str | os.PathLike | None = None, run: dict | None = None) -> dict:
    """The JSON record of one segmented image (classes, fractions, files, method, model, settings, timing).

    ``segmenter`` may be None when ``run`` (a :func:`describe_run` dict, e.g. ``seg.meta``) says how it was made."""
    fractions = pixel_fractions(seg)
    height, width = seg.mask.shape
    mask_format = "palette PNG, pixel value = class index" if len(seg.classes) <= 256 else "16-bit grey PNG, pixel value = class index"
    run = run if run is not None else describe_run(segmenter, checkpoint)
    return {
        "image": str(path),
        "image_size": {"width": int(width), "height": int(height)},
        "classes": [
            {"index": i, "name": name, "synonyms": list(syn), "fraction": fractions[i]}
            for i, (name, syn) in enumerate(zip(seg.classes, seg.synonyms))
        ],
        "fractions": {name: fractions[i] for i, name in enumerate(seg.classes)},
        "outputs": {**{key: files[key].name for key in ("mask", "overlay") if key in files}, "mask_format": mask_format},
        **run,
        "seconds": round(seconds, 3) if seconds is not None else None,
        "rfclip_version": __version__,
    }
